//! Keyed-BLAKE3 message authentication for datagrams.
//!
//! A sealed datagram is `body ‖ tag`, where `tag` is the first [`TAG_LEN`] bytes of
//! `BLAKE3-keyed(key, context ‖ body)`. The context string separates protocols, so a valid
//! election message can never be replayed as an MCTP frame under the same cluster key.
//! Replay protection (sequence numbers, windows) belongs to each protocol, not here.

/// Length of the authentication tag appended to a sealed datagram.
pub const TAG_LEN: usize = 16;

/// A 256-bit key derived from the operator's cluster secret for one purpose.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// Derives a key for `context` (e.g. `"contentmover election v1"`) from a cluster secret of
    /// any length, so one operator secret yields independent keys per protocol.
    pub fn derive(context: &str, secret: &[u8]) -> Self {
        MacKey(blake3::derive_key(context, secret))
    }

    pub fn from_bytes(key: [u8; 32]) -> Self {
        MacKey(key)
    }

    /// The tag of `body` (for layouts that authenticate something other than the datagram's
    /// own bytes, e.g. a header and a digest of the payload).
    pub fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let full = blake3::keyed_hash(&self.0, body);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_bytes()[..TAG_LEN]);
        tag
    }

    /// Appends the tag of `buf` to `buf`.
    pub fn seal(&self, buf: &mut Vec<u8>) {
        let tag = self.tag(buf);
        buf.extend_from_slice(&tag);
    }

    /// Checks the tag at the end of `datagram` and returns the body it authenticates, or `None`
    /// when the datagram is too short or the tag is wrong. Comparison is constant-time.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let split = datagram.len().checked_sub(TAG_LEN)?;
        let (body, tag) = datagram.split_at(split);
        self.verify(body, tag).then_some(body)
    }

    /// True when `tag` is the tag of `body`. Comparison is constant-time.
    pub fn verify(&self, body: &[u8], tag: &[u8]) -> bool {
        let want = self.tag(body);
        // Constant-time compare: fold the XOR of every byte.
        tag.len() == TAG_LEN && want.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open() {
        let k = MacKey::derive("test v1", b"secret");
        let mut d = b"hello".to_vec();
        k.seal(&mut d);
        assert_eq!(k.open(&d), Some(&b"hello"[..]));
    }

    #[test]
    fn any_flipped_bit_or_other_key_is_rejected() {
        let k = MacKey::derive("test v1", b"secret");
        let mut d = b"hello world".to_vec();
        k.seal(&mut d);
        for i in 0..d.len() * 8 {
            let mut bad = d.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(k.open(&bad), None, "bit {i}");
        }
        assert_eq!(MacKey::derive("other v1", b"secret").open(&d), None);
        assert_eq!(MacKey::derive("test v1", b"secreT").open(&d), None);
        assert_eq!(k.open(&d[..3]), None);
    }
}
