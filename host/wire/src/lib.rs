//! One codec style for every wire format in Content Mover.
//!
//! Every decoder in the project reads through [`Reader`] and every encoder writes through
//! [`Writer`], so all formats share the same rules:
//!
//! - integers are big-endian (network order), fixed width;
//! - variable-length fields carry an explicit length prefix, and a length is never trusted
//!   before it is checked against what remains (no allocation sized by an attacker);
//! - running out of input is [`DecodeError::Incomplete`] (wait for more bytes), anything that can
//!   never become valid is [`DecodeError::Malformed`] (drop it and count it). Callers rely on the
//!   difference: a stream decoder waits on the first and aborts on the second;
//! - all offset arithmetic is checked.
//!
//! [`mac`] adds keyed-BLAKE3 authentication tags for datagrams.

pub mod mac;

use thiserror::Error;

/// Why a decode failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended early: `needed` more bytes (at least) would let decoding go on.
    #[error("incomplete input: at least {needed} more bytes needed")]
    Incomplete { needed: usize },
    /// The input can never be valid. `what` names the field or rule that failed.
    #[error("malformed input: {what}")]
    Malformed { what: &'static str },
}

impl DecodeError {
    /// Shorthand for a [`DecodeError::Malformed`].
    pub fn malformed(what: &'static str) -> Self {
        DecodeError::Malformed { what }
    }
    /// True when more input could make the decode succeed.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

/// A bounds-checked cursor over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The unconsumed tail, without consuming it.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Fails with `Malformed` unless every byte was consumed (trailing garbage).
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() == 0 { Ok(()) } else { Err(DecodeError::malformed("trailing bytes")) }
    }

    /// Takes exactly `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::malformed("length overflows"))?;
        if end > self.buf.len() {
            return Err(DecodeError::Incomplete { needed: end - self.buf.len() });
        }
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A `u8` that must be 0 or 1.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::malformed("boolean not 0 or 1")),
        }
    }

    /// Bytes with a `u16` length prefix; `max` bounds the length before anything is read.
    pub fn bytes16(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(DecodeError::malformed("length prefix over limit"));
        }
        self.bytes(n)
    }

    /// Bytes with a `u32` length prefix; `max` bounds the length before anything is read.
    pub fn bytes32(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(self.u32()?)
            .map_err(|_| DecodeError::malformed("length prefix too large"))?;
        if n > max {
            return Err(DecodeError::malformed("length prefix over limit"));
        }
        self.bytes(n)
    }

    /// A UTF-8 string with a `u16` length prefix.
    pub fn str16(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes16(max)?)
            .map_err(|_| DecodeError::malformed("string not UTF-8"))
    }
}

/// An append-only encoder; the mirror of [`Reader`].
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

/// Why an encode failed: a field too long for its length prefix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("field too long to encode: {what} is {len} bytes, limit {max}")]
pub struct EncodeError {
    pub what: &'static str,
    pub len: usize,
    pub max: usize,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }
    pub fn with_capacity(n: usize) -> Self {
        Writer { buf: Vec::with_capacity(n) }
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Bytes with a `u16` length prefix.
    pub fn bytes16(&mut self, what: &'static str, b: &[u8]) -> Result<&mut Self, EncodeError> {
        let n = u16::try_from(b.len()).map_err(|_| EncodeError {
            what,
            len: b.len(),
            max: u16::MAX.into(),
        })?;
        Ok(self.u16(n).bytes(b))
    }

    /// Bytes with a `u32` length prefix.
    pub fn bytes32(&mut self, what: &'static str, b: &[u8]) -> Result<&mut Self, EncodeError> {
        let max = u32::MAX as usize;
        let n = u32::try_from(b.len()).map_err(|_| EncodeError { what, len: b.len(), max })?;
        Ok(self.u32(n).bytes(b))
    }

    /// A string with a `u16` length prefix.
    pub fn str16(&mut self, what: &'static str, s: &str) -> Result<&mut Self, EncodeError> {
        self.bytes16(what, s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_input_is_incomplete_not_malformed() {
        let mut r = Reader::new(&[0, 1]);
        assert_eq!(r.u32(), Err(DecodeError::Incomplete { needed: 2 }));
    }

    #[test]
    fn oversized_length_prefix_is_malformed_before_reading() {
        let mut w = Writer::new();
        w.u16(1000);
        let mut r = Reader::new(w.as_slice());
        assert_eq!(r.bytes16(10), Err(DecodeError::malformed("length prefix over limit")));
    }

    #[test]
    fn bad_bool_and_trailing_bytes_are_malformed() {
        assert!(matches!(Reader::new(&[2]).bool(), Err(DecodeError::Malformed { .. })));
        let r = Reader::new(&[1]);
        assert!(r.finish().is_err());
    }

    proptest! {
        #[test]
        fn round_trip(a: u8, b: u16, c: u32, d: u64, e: bool, s in ".{0,40}", v in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut w = Writer::new();
            w.u8(a).u16(b).u32(c).u64(d).bool(e);
            w.str16("s", &s).unwrap();
            w.bytes32("v", &v).unwrap();
            let bytes = w.into_vec();
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.u8().unwrap(), a);
            prop_assert_eq!(r.u16().unwrap(), b);
            prop_assert_eq!(r.u32().unwrap(), c);
            prop_assert_eq!(r.u64().unwrap(), d);
            prop_assert_eq!(r.bool().unwrap(), e);
            prop_assert_eq!(r.str16(usize::MAX).unwrap(), s.as_str());
            prop_assert_eq!(r.bytes32(usize::MAX).unwrap(), v.as_slice());
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn every_prefix_is_incomplete(v in proptest::collection::vec(any::<u8>(), 1..100)) {
            let mut w = Writer::new();
            w.bytes32("v", &v).unwrap();
            let bytes = w.into_vec();
            for cut in 0..bytes.len() {
                let mut r = Reader::new(&bytes[..cut]);
                prop_assert!(r.bytes32(usize::MAX).unwrap_err().is_incomplete());
            }
        }
    }
}
