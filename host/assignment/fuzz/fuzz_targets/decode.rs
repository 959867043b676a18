//! Fuzzes every decoder of the assignment format: the header and command records on raw
//! slices, and the whole streaming reader (open, verify with and without pinned signing keys,
//! commands, payloads, tree manifest) on a file.
//! Run (see docs/assignment-format.md): `cargo +nightly fuzz run decode` in host/assignment/fuzz,
//! or with the stable toolchain `RUSTC_BOOTSTRAP=1 cargo fuzz run decode`.
#![no_main]

use std::io::{Read, Write};

use cm_assignment::format::{Command, Header, Record};
use cm_assignment::{AssignmentReader, CipherKey, PublicKey, TrustedKeys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    let _ = Command::decode(data);
    let _ = Record::decode(data);
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write");
    let Ok(mut r) = AssignmentReader::open(f.path()) else { return };
    // Encrypted inputs go through the chunk decryption too (tags will not match, which is
    // exactly the path that must fail cleanly).
    let _ = r.decrypt_with(&CipherKey::derive(b"fuzz"));
    // Decode everything even when the hashes fail: the decoder must never panic or
    // over-allocate on bytes nobody vouched for.
    let _ = r.verify(None, None);
    // And through the signature check (a fixed pinned key: the block must fail cleanly).
    let _ = r.verify(None, Some(&TrustedKeys::new([PublicKey::from_bytes([7; 32])])));
    for c in r.commands() {
        let Ok((_, cmd)) = c else { break };
        if let Some(p) = cmd.payload()
            && let Ok(mut s) = r.payload(p)
        {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
    }
    for t in r.tree() {
        if t.is_err() {
            break;
        }
    }
});
