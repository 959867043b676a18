//! Keys derived from the operator's cluster secret.
//!
//! Every MCTP datagram carries a keyed-BLAKE3 tag under [`Keys::mac`]. When a session is
//! encrypted, frame payloads are additionally sealed with ChaCha20-Poly1305 under a key unique to
//! (session, assignment, content hash); the nonce is the frame's sequence number. A nonce is only
//! ever reused for the very same plaintext (a retransmission of the same frame of the same
//! content), which is what makes a sequence-number nonce safe here.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use cm_wire::mac::MacKey;

/// Length of the ChaCha20-Poly1305 tag appended to an encrypted payload.
pub const AEAD_TAG_LEN: usize = 16;

/// The MCTP keys of one cluster.
#[derive(Clone)]
pub struct Keys {
    mac: MacKey,
    payload_master: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Derives the MCTP keys from a cluster secret of any length.
    pub fn derive(secret: &[u8]) -> Self {
        Keys {
            mac: MacKey::derive("contentmover mctp datagram v1", secret),
            payload_master: blake3::derive_key("contentmover mctp payload v1", secret),
        }
    }

    pub fn mac(&self) -> &MacKey {
        &self.mac
    }

    /// The payload cipher of one session.
    pub fn payload_cipher(&self, session: u64, assignment: u64, hash: &[u8; 32]) -> PayloadCipher {
        let mut h = blake3::Hasher::new_keyed(&self.payload_master);
        h.update(&session.to_be_bytes()).update(&assignment.to_be_bytes()).update(hash);
        let key = *h.finalize().as_bytes();
        PayloadCipher(ChaCha20Poly1305::new(Key::from_slice(&key)))
    }
}

/// ChaCha20-Poly1305 bound to one session's key.
#[derive(Clone)]
pub struct PayloadCipher(ChaCha20Poly1305);

impl std::fmt::Debug for PayloadCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadCipher(..)")
    }
}

fn nonce(seq: u32) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&seq.to_be_bytes());
    *Nonce::from_slice(&n)
}

impl PayloadCipher {
    /// Encrypts `buf[..len - AEAD_TAG_LEN]` in place and writes the tag into the last
    /// [`AEAD_TAG_LEN`] bytes.
    pub fn seal_in_place(&self, seq: u32, buf: &mut [u8]) {
        let split = buf.len() - AEAD_TAG_LEN;
        let (plain, tag_out) = buf.split_at_mut(split);
        let tag = self
            .0
            .encrypt_in_place_detached(&nonce(seq), b"", plain)
            .expect("frame payload within AEAD limits");
        tag_out.copy_from_slice(&tag);
    }

    /// Decrypts `buf` (ciphertext ‖ tag) in place; returns the plaintext prefix, or `None` when
    /// the tag does not verify.
    pub fn open_in_place<'a>(&self, seq: u32, buf: &'a mut [u8]) -> Option<&'a mut [u8]> {
        let split = buf.len().checked_sub(AEAD_TAG_LEN)?;
        let (cipher, tag) = buf.split_at_mut(split);
        let tag = *Tag::from_slice(tag);
        self.0.decrypt_in_place_detached(&nonce(seq), b"", cipher, &tag).ok()?;
        Some(cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_reject_tamper() {
        let k = Keys::derive(b"s");
        let c = k.payload_cipher(1, 2, &[3; 32]);
        let mut buf = b"hello world\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec();
        c.seal_in_place(7, &mut buf);
        assert_ne!(&buf[..11], b"hello world");
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(c.open_in_place(7, &mut bad).is_none());
        assert!(c.open_in_place(8, &mut buf.clone()).is_none());
        assert!(k.payload_cipher(9, 2, &[3; 32]).open_in_place(7, &mut buf.clone()).is_none());
        assert_eq!(c.open_in_place(7, &mut buf).unwrap(), b"hello world");
    }
}
