//! Optional encryption of the data part (flag `ENCRYPTED`): ChaCha20-Poly1305 per 64 KiB chunk,
//! so the data part is encrypted and decrypted as a stream and any payload can be read from the
//! middle without touching the rest.
//!
//! Layout of an encrypted data part: `salt (16) ‖ chunk 0 ‖ chunk 1 ‖ …`, each chunk being
//! [`CHUNK`] plaintext bytes (the last one fewer, never zero) encrypted in place, followed by its
//! 16-byte tag. Payload offsets and lengths in the body stay in plaintext coordinates.
//!
//! Keys: the cluster's [`CipherKey`] is derived from the operator's secret; each assignment's
//! AEAD key is the keyed BLAKE3 of a fresh random salt under it, so no (key, nonce) pair is ever
//! used twice however many assignments share a serial. The nonce is the chunk number, with a
//! last-chunk marker: chunks cannot be reordered, and the end cannot be cut off unnoticed.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};

/// Plaintext bytes per encrypted chunk.
pub const CHUNK: u64 = 64 << 10;
/// Bytes of the tag after each chunk.
pub const TAG: u64 = 16;
/// Bytes of salt at the start of an encrypted data part.
pub const SALT: u64 = 16;

/// The cluster's key for encrypting assignments' data parts.
#[derive(Clone)]
pub struct CipherKey([u8; 32]);

impl std::fmt::Debug for CipherKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CipherKey(..)")
    }
}

impl CipherKey {
    /// Derives the assignment cipher key from the operator's cluster secret (a different key
    /// from the [`crate::SealKey`] derived from the same secret).
    pub fn derive(secret: &[u8]) -> Self {
        CipherKey(blake3::derive_key("contentmover assignment cipher v1", secret))
    }

    /// The AEAD of one assignment, from the salt at the start of its data part.
    pub(crate) fn for_salt(&self, salt: &[u8; SALT as usize]) -> DataCipher {
        let k = blake3::keyed_hash(&self.0, salt);
        DataCipher(ChaCha20Poly1305::new(Key::from_slice(k.as_bytes())))
    }
}

/// The AEAD of one assignment's data part.
pub(crate) struct DataCipher(ChaCha20Poly1305);

fn nonce(chunk: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&chunk.to_be_bytes());
    n[8] = u8::from(last);
    *Nonce::from_slice(&n)
}

impl DataCipher {
    /// Encrypts chunk `index` in place; returns its tag.
    pub(crate) fn seal(&self, index: u64, last: bool, plain: &mut [u8]) -> [u8; TAG as usize] {
        let tag = self
            .0
            .encrypt_in_place_detached(&nonce(index, last), b"", plain)
            .expect("chunk within AEAD limits");
        tag.into()
    }

    /// Decrypts chunk `index` in place; false when the tag does not match (wrong key, or the
    /// chunk was changed, moved or cut).
    #[must_use]
    pub(crate) fn open(&self, index: u64, last: bool, cipher: &mut [u8], tag: &[u8]) -> bool {
        tag.len() == TAG as usize
            && self
                .0
                .decrypt_in_place_detached(&nonce(index, last), b"", cipher, Tag::from_slice(tag))
                .is_ok()
    }
}

/// Stored length of an encrypted data part holding `plain` bytes.
pub fn stored_len(plain: u64) -> u64 {
    SALT + plain + plain.div_ceil(CHUNK) * TAG
}

/// Plaintext length of an encrypted data part of `stored` bytes; None when no plaintext length
/// gives exactly that size.
pub fn plain_len(stored: u64) -> Option<u64> {
    let n = stored.checked_sub(SALT)?;
    let chunks = n.div_ceil(CHUNK + TAG);
    let plain = n.checked_sub(chunks * TAG)?;
    (stored_len(plain) == stored).then_some(plain)
}

/// Where plaintext chunk `index` is stored, from the start of the data part.
pub fn chunk_offset(index: u64) -> u64 {
    SALT + index * (CHUNK + TAG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for plain in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 7] {
            assert_eq!(plain_len(stored_len(plain)), Some(plain), "{plain}");
        }
        assert_eq!(plain_len(0), None);
        assert_eq!(plain_len(SALT + 1), None, "a chunk needs its tag");
        assert_eq!(plain_len(SALT + TAG), None, "no empty chunk");
    }

    #[test]
    fn wrong_key_index_or_end_marker_is_refused() {
        let salt = [7u8; 16];
        let c = CipherKey::derive(b"secret").for_salt(&salt);
        let mut buf = b"hello chunk".to_vec();
        let tag = c.seal(3, false, &mut buf);
        assert_ne!(&buf, b"hello chunk");
        let mut b = buf.clone();
        assert!(!CipherKey::derive(b"other").for_salt(&salt).open(3, false, &mut b, &tag));
        let mut b = buf.clone();
        assert!(!CipherKey::derive(b"secret").for_salt(&[8u8; 16]).open(3, false, &mut b, &tag));
        let mut b = buf.clone();
        assert!(!c.open(4, false, &mut b, &tag));
        let mut b = buf.clone();
        assert!(!c.open(3, true, &mut b, &tag));
        let mut b = buf.clone();
        assert!(c.open(3, false, &mut b, &tag));
        assert_eq!(&b, b"hello chunk");
    }
}
