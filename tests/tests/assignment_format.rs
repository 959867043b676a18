//! Corrupt, truncated, wrong-version and forged assignments are refused before anything is applied.

use std::fs;
use std::path::Path;

use cm_assignment::format::{HEADER_LEN, Header};
use cm_assignment::{AssignmentReader, AssignmentType, BuildOptions, ReadError, SealKey, build};

/// Opens, verifies and decodes every command and payload: the whole check a server does.
fn full_check(path: &Path, key: Option<&SealKey>) -> Result<u64, String> {
    let r = AssignmentReader::open(path).map_err(|e| e.to_string())?;
    r.verify(key).map_err(|e| e.to_string())?;
    let mut n = 0;
    for c in r.commands() {
        let (_, cmd) = c.map_err(|e| e.to_string())?;
        if let Some(p) = cmd.payload() {
            std::io::copy(&mut r.payload(p).map_err(|e| e.to_string())?, &mut std::io::sink())
                .map_err(|e| e.to_string())?;
        }
        n += 1;
    }
    Ok(n)
}

fn sample(dir: &Path, seal: Option<SealKey>) -> std::path::PathBuf {
    let (old, new) = (dir.join("old"), dir.join("new"));
    fs::create_dir_all(old.join("d")).unwrap();
    fs::create_dir_all(new.join("d")).unwrap();
    fs::write(old.join("d/page.html"), "<html>".repeat(200)).unwrap();
    fs::write(
        new.join("d/page.html"),
        "<html>".repeat(150) + "<body>changed</body>" + &"<html>".repeat(50),
    )
    .unwrap();
    fs::write(new.join("img.jpg"), [7u8; 300]).unwrap();
    fs::write(old.join("gone.txt"), "bye").unwrap();
    let out = dir.join("sample.cma");
    let mut opts = BuildOptions::new(AssignmentType::Publish, 9);
    opts.seal = seal;
    let f = fs::File::options().write(true).open(new.join("d/page.html")).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(77)).unwrap();
    build(&new, Some(&old), &out, &opts).unwrap();
    out
}

#[test]
fn every_flipped_bit_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), None);
    assert!(full_check(&good, None).unwrap() >= 3);
    let bytes = fs::read(&good).unwrap();
    let bad = dir.path().join("bad.cma");
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        fs::write(&bad, &b).unwrap();
        assert!(full_check(&bad, None).is_err(), "flipping bit {bit} went unnoticed");
    }
}

#[test]
fn truncated_and_extended_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), None);
    let bytes = fs::read(&good).unwrap();
    let bad = dir.path().join("bad.cma");
    for cut in 0..bytes.len() {
        fs::write(&bad, &bytes[..cut]).unwrap();
        assert!(full_check(&bad, None).is_err(), "cut at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    fs::write(&bad, &longer).unwrap();
    let e = AssignmentReader::open(&bad).err().unwrap();
    assert!(matches!(e, ReadError::Truncated { .. }), "{e}");
}

#[test]
fn wrong_version_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), None);
    let mut bytes = fs::read(&good).unwrap();
    bytes[9] = 7;
    let bad = dir.path().join("v7.cma");
    fs::write(&bad, &bytes).unwrap();
    let e = AssignmentReader::open(&bad).err().unwrap().to_string();
    assert!(e.contains("version 7"), "{e}");
}

#[test]
fn forged_assignments_are_refused_by_a_sealed_site() {
    let dir = tempfile::tempdir().unwrap();
    let key = SealKey::derive(b"operator secret");
    let sealed = sample(dir.path(), Some(key.clone()));
    assert!(full_check(&sealed, Some(&key)).is_ok());
    // Wrong key, no key, and an unsealed (anyone can make it) assignment.
    assert!(full_check(&sealed, Some(&SealKey::derive(b"guess"))).unwrap_err().contains("trailer"));
    assert!(full_check(&sealed, None).unwrap_err().contains("no key"));
    let dir2 = tempfile::tempdir().unwrap();
    let unsealed = sample(dir2.path(), None);
    assert!(full_check(&unsealed, Some(&key)).unwrap_err().contains("not sealed"));
    // A forger who rewrites the header (say, the serial) and recomputes an unkeyed trailer
    // still fails against the keyed trailer.
    let mut bytes = fs::read(&sealed).unwrap();
    let mut h = Header::decode(&bytes[..HEADER_LEN]).unwrap();
    h.serial = 10;
    bytes[..HEADER_LEN].copy_from_slice(&h.encode());
    let forged = dir.path().join("forged.cma");
    fs::write(&forged, &bytes).unwrap();
    assert!(full_check(&forged, Some(&key)).unwrap_err().contains("forged"));
}
