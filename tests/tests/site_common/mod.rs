//! Helpers shared by the site_*.rs tests: trees, assignments, observing a tree.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use cm_assignment::{AssignmentType, BuildOptions, Meta, build};
pub use cm_tests::observe;

/// Writes `files` (path → content) under `root`, creating directories; every file gets `mtime`.
pub fn write_tree(root: &Path, files: &[(&str, &[u8])], mtime: u64) {
    fs::create_dir_all(root).unwrap();
    for (p, content) in files {
        let full = root.join(p);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(&full, content).unwrap();
        let f = fs::File::options().write(true).open(&full).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime)).unwrap();
    }
}

/// Builds an assignment of `kind` turning `shadow` into `staging`.
pub fn assignment(
    dir: &Path,
    name: &str,
    kind: AssignmentType,
    serial: u64,
    base: u64,
    staging: &Path,
    shadow: Option<&Path>,
) -> PathBuf {
    let out = dir.join(name);
    let mut opts = BuildOptions::new(kind, serial);
    opts.meta.base_serial = base;
    build(staging, shadow, &out, &opts).unwrap();
    out
}

/// A header-only assignment.
pub fn switch_assignment(
    dir: &Path,
    name: &str,
    kind: AssignmentType,
    serial: u64,
    target: u64,
) -> PathBuf {
    let out = dir.join(name);
    cm_assignment::detect::build_switch(
        &out,
        Meta { kind, serial, job_id: 0, base_serial: 0, target_serial: target, site: "www".into() },
        None,
        None,
    )
    .unwrap();
    out
}

/// Pseudo-random bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// Runs `cmover ARGS` in `dir`; returns (success, stdout + stderr).
pub fn cmover(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(cm_tests::cmover_bin())
        .current_dir(dir)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, text) = cmover(dir, args);
    assert!(success, "cmover {args:?} failed:\n{text}");
    text
}

pub fn fails(dir: &Path, args: &[&str]) -> String {
    let (success, text) = cmover(dir, args);
    assert!(!success, "cmover {args:?} should have failed:\n{text}");
    text
}
