//! The GL's address, carried in the election's heartbeat payload: every Leader Alive tells the
//! members where their GL's HTTP endpoint (tree + apply reports) is, so a member learns a new
//! GL's address in the same heartbeat that tells it who the GL is.
//!
//! Layout (through `cm-wire`): `b"CMGL"`, version `1` (u8), the base URL as `str16`. The
//! election seals the whole heartbeat, so the payload needs no tag of its own.

use cm_wire::{DecodeError, Reader, Writer};

const MAGIC: &[u8; 4] = b"CMGL";
const VERSION: u8 = 1;
/// Longest URL carried (the election's payload limit is 1024 bytes).
pub const MAX_URL: usize = 512;

/// Encodes `url` (e.g. `http://10.0.0.7:7720`) as a heartbeat payload.
pub fn encode(url: &str) -> Result<Vec<u8>, cm_wire::EncodeError> {
    let mut w = Writer::new();
    w.bytes(MAGIC).u8(VERSION);
    if url.len() > MAX_URL {
        return Err(cm_wire::EncodeError { what: "GL url", len: url.len(), max: MAX_URL });
    }
    w.str16("GL url", url)?;
    Ok(w.into_vec())
}

/// Decodes a heartbeat payload; `Ok(None)` for a payload that is not a GL beacon (another
/// version or another user of the hook).
pub fn decode(payload: &[u8]) -> Result<Option<String>, DecodeError> {
    let mut r = Reader::new(payload);
    if r.array::<4>()? != *MAGIC || r.u8()? != VERSION {
        return Ok(None);
    }
    let url = r.str16(MAX_URL)?.to_string();
    r.finish()?;
    Ok(Some(url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn foreign_and_truncated_payloads() {
        assert_eq!(decode(b"ABCD\x01\x00\x00").unwrap(), None);
        let good = encode("http://127.0.0.1:1").unwrap();
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).unwrap_err().is_incomplete(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        assert!(encode(&"x".repeat(MAX_URL + 1)).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(url in "[ -~]{0,512}") {
            prop_assert_eq!(decode(&encode(&url).unwrap()).unwrap(), Some(url));
        }
    }
}
