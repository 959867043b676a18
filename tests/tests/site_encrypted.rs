//! Encrypted assignments (flag ENCRYPTED, ChaCha20-Poly1305 per data chunk): they apply with the
//! cluster's key and give exactly the staged tree; the plaintext is not in the file; a wrong key,
//! a missing key or a tampered chunk (even with the hashes recomputed, as anyone without the
//! seal key could) is refused before anything is applied, and live stays as it was.

mod site_common;

use std::fs;
use std::path::{Path, PathBuf};

use cm_assignment::format::{HEADER_LEN, Header};
use cm_assignment::{AssignmentReader, AssignmentType, BuildOptions, CipherKey, build};
use cm_site::{NativeInterpreter, Site, SiteConfig, layout};
use site_common::*;

const MARKER: &[u8] = b"private marker: only key holders may read this";

fn encrypted(
    dir: &Path,
    name: &str,
    kind: AssignmentType,
    serial: u64,
    staging: &Path,
    shadow: Option<&Path>,
    key: &CipherKey,
) -> PathBuf {
    let out = dir.join(name);
    let mut opts = BuildOptions::new(kind, serial);
    opts.cipher = Some(key.clone());
    build(staging, shadow, &out, &opts).unwrap();
    out
}

fn trees(d: &Path) -> (PathBuf, PathBuf) {
    let (v1, v2) = (d.join("v1"), d.join("v2"));
    let page = MARKER.repeat(50);
    // big.bin spans several 64 KiB chunks, and its change in v2 is sent as a delta.
    let big = noise(300_000, 1);
    write_tree(&v1, &[("index.html", &page), ("big.bin", &big), ("raw.jpg", MARKER)], 1000);
    let mut big2 = big.clone();
    big2[150_000..150_050].copy_from_slice(&[0x55; 50]);
    write_tree(
        &v2,
        &[
            ("index.html", b"<h1>two</h1>"),
            ("big.bin", &big2),
            ("raw.jpg", MARKER),
            ("new.txt", &noise(70_000, 3)),
        ],
        2000,
    );
    (v1, v2)
}

#[test]
fn encrypted_assignments_apply_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = CipherKey::derive(b"cluster secret");
    let (v1, v2) = trees(d);
    let a1 = encrypted(d, "1.cma", AssignmentType::Replicate, 1, &v1, None, &key);
    let a2 = encrypted(d, "2.cma", AssignmentType::Publish, 2, &v2, Some(&v1), &key);
    for a in [&a1, &a2] {
        let bytes = fs::read(a).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "{}: plaintext visible",
            a.display()
        );
        assert!(AssignmentReader::open(a).unwrap().is_encrypted());
    }
    let r = AssignmentReader::open(&a2).unwrap();
    assert!(
        r.commands().any(|c| matches!(c.unwrap().1, cm_assignment::Command::ApplyDelta { .. })),
        "a delta is encrypted too"
    );

    let site = Site::open(
        &d.join("site"),
        SiteConfig { cipher: Some(key.clone()), ..SiteConfig::default() },
    )
    .unwrap();
    site.apply(&a1, &mut NativeInterpreter).unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();
    assert_eq!(observe(&site.live_path()), observe(&v1));
    site.apply(&a2, &mut NativeInterpreter).unwrap();
    site.commit(Some(2), &mut NativeInterpreter).unwrap();
    assert_eq!(observe(&site.live_path()), observe(&v2));
}

/// Live is release 1 = `v1`, nothing half-built, no release 2.
fn assert_untouched(site: &Site, v1: &Path) {
    assert_eq!(site.status().unwrap().current, Some(1));
    assert_eq!(observe(&site.live_path()), observe(v1));
    assert!(layout::leftovers(site.root()).unwrap().is_empty());
    assert!(!site.release_path(2).exists());
}

#[test]
fn wrong_key_missing_key_and_tampering_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = CipherKey::derive(b"cluster secret");
    let (v1, v2) = trees(d);
    let site = Site::open(
        &d.join("site"),
        SiteConfig { cipher: Some(key.clone()), ..SiteConfig::default() },
    )
    .unwrap();
    site.apply(
        &encrypted(d, "1.cma", AssignmentType::Replicate, 1, &v1, None, &key),
        &mut NativeInterpreter,
    )
    .unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();

    let wrong = encrypted(
        d,
        "wrong.cma",
        AssignmentType::Publish,
        2,
        &v2,
        Some(&v1),
        &CipherKey::derive(b"another cluster"),
    );
    let e = site.apply(&wrong, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("wrong.cma") && e.contains("does not decrypt"), "{e}");
    assert_untouched(&site, &v1);

    let good = encrypted(d, "2.cma", AssignmentType::Publish, 2, &v2, Some(&v1), &key);
    let keyless = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let e = keyless.apply(&good, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("2.cma") && e.contains("no key was given to decrypt"), "{e}");
    assert_untouched(&site, &v1);

    // Flip one ciphertext byte in the second chunk, then recompute the data hash and the
    // (unkeyed) trailer so only the AEAD can notice.
    let mut bytes = fs::read(&good).unwrap();
    let mut h = Header::decode(&bytes[..HEADER_LEN]).unwrap();
    let data_start = HEADER_LEN + h.body_len as usize + 32;
    let at = data_start + (cm_assignment::cipher::chunk_offset(1) + 100) as usize;
    assert!(at < bytes.len(), "the sample spans two chunks");
    bytes[at] ^= 0x01;
    h.data_hash = *blake3::hash(&bytes[data_start..]).as_bytes();
    bytes[..HEADER_LEN].copy_from_slice(&h.encode());
    let body_end = HEADER_LEN + h.body_len as usize;
    let trailer = blake3::hash(&bytes[..body_end]);
    bytes[body_end..body_end + 32].copy_from_slice(trailer.as_bytes());
    let tampered = d.join("tampered.cma");
    fs::write(&tampered, &bytes).unwrap();
    let e = site.apply(&tampered, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("tampered.cma") && e.contains("data chunk 1 does not decrypt"), "{e}");
    assert_untouched(&site, &v1);

    // Cutting the last chunk off (hashes recomputed) is refused as well.
    let mut cut = fs::read(&good).unwrap();
    let mut h = Header::decode(&cut[..HEADER_LEN]).unwrap();
    let plain = cm_assignment::cipher::plain_len(h.data_len).unwrap();
    let keep = cm_assignment::cipher::stored_len(
        (plain - 1) / cm_assignment::cipher::CHUNK * cm_assignment::cipher::CHUNK,
    );
    cut.truncate(data_start + keep as usize);
    h.data_len = keep;
    h.data_hash = *blake3::hash(&cut[data_start..]).as_bytes();
    cut[..HEADER_LEN].copy_from_slice(&h.encode());
    let trailer = blake3::hash(&cut[..body_end]);
    cut[body_end..body_end + 32].copy_from_slice(trailer.as_bytes());
    fs::write(d.join("cut.cma"), &cut).unwrap();
    let e = site.apply(&d.join("cut.cma"), &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("cut.cma") && e.contains("does not decrypt"), "{e}");
    assert_untouched(&site, &v1);

    site.apply(&good, &mut NativeInterpreter).unwrap();
    site.commit(Some(2), &mut NativeInterpreter).unwrap();
    assert_eq!(observe(&site.live_path()), observe(&v2));
}
