//! Corrupt, truncated, wrong-version and forged assignments are refused before anything is applied.

use std::fs;
use std::path::Path;

use cm_assignment::format::{HEADER_LEN, Header};
use cm_assignment::sign::sign_copy;
use cm_assignment::{
    AssignmentReader, AssignmentType, BuildOptions, ReadError, SealKey, SignatureError, SigningKey,
    TrustedKeys, build,
};

/// Opens, verifies and decodes every command and payload: the whole check a server does.
fn full_check(path: &Path, key: Option<&SealKey>) -> Result<u64, String> {
    signed_check(path, key, None)
}

/// [`full_check`] with pinned manager keys (a server's check).
fn signed_check(
    path: &Path,
    key: Option<&SealKey>,
    signers: Option<&TrustedKeys>,
) -> Result<u64, String> {
    let r = AssignmentReader::open(path).map_err(|e| e.to_string())?;
    r.verify(key, signers).map_err(|e| e.to_string())?;
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

fn new_key() -> SigningKey {
    SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
}

fn sample(dir: &Path, seal: Option<SealKey>) -> std::path::PathBuf {
    sample_signed(dir, seal, None)
}

fn sample_signed(
    dir: &Path,
    seal: Option<SealKey>,
    signer: Option<SigningKey>,
) -> std::path::PathBuf {
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
    opts.signer = signer;
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

#[test]
fn signatures_pin_the_manager_key() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, other) = (new_key(), new_key());
    let pinned = TrustedKeys::new([manager.public_key()]);
    let signed = sample_signed(dir.path(), None, Some(manager.clone()));
    assert!(signed_check(&signed, None, Some(&pinned)).unwrap() >= 3);
    // Every bit counts, the signature block's included.
    let bytes = fs::read(&signed).unwrap();
    let bad = dir.path().join("bad.cma");
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        fs::write(&bad, &b).unwrap();
        assert!(
            signed_check(&bad, None, Some(&pinned)).is_err(),
            "flipping bit {bit} went unnoticed"
        );
    }
    // Cut inside the signature block: truncated (incomplete), not malformed.
    let cut = dir.path().join("cut.cma");
    let unsigned_dir = dir.path().join("u");
    fs::create_dir_all(&unsigned_dir).unwrap();
    let unsigned = sample(&unsigned_dir, None);
    fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(AssignmentReader::open(&cut), Err(ReadError::Truncated { .. })));
    // Unsigned, or signed by a key nobody pinned: refused with a typed error.
    let r = AssignmentReader::open(&unsigned).unwrap();
    assert!(matches!(r.verify(None, Some(&pinned)), Err(ReadError::Unsigned)));
    assert!(r.verify(None, None).is_ok(), "hand tools without pins still read it");
    let forged_dir = dir.path().join("f");
    fs::create_dir_all(&forged_dir).unwrap();
    let forged = sample_signed(&forged_dir, None, Some(other.clone()));
    let r = AssignmentReader::open(&forged).unwrap();
    assert!(matches!(
        r.verify(None, Some(&pinned)),
        Err(ReadError::Signature(SignatureError::UnknownKey { .. }))
    ));
    assert!(matches!(
        r.verify(None, Some(&TrustedKeys::default())),
        Err(ReadError::Signature(SignatureError::NoTrustedKeys))
    ));
    // Rotation: old and next key pinned, either verifies.
    let both = TrustedKeys::new([manager.public_key(), other.public_key()]);
    assert!(signed_check(&forged, None, Some(&both)).is_ok());
    // The manager signs an operator's ready-made file (re-signing a signed one too), sealing
    // it on the way; a corrupted file is refused instead of signed.
    let key = SealKey::derive(b"operator secret");
    let resigned = dir.path().join("resigned.cma");
    sign_copy(&forged, &resigned, Some(&key), &manager).unwrap();
    assert!(signed_check(&resigned, Some(&key), Some(&pinned)).is_ok());
    let mut b = fs::read(&unsigned).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    fs::write(&bad, &b).unwrap();
    assert!(sign_copy(&bad, &dir.path().join("x.cma"), None, &manager).is_err());
    assert!(!dir.path().join("x.cma").exists());
}
