//! Helpers shared by the integration tests in `tests/tests/`: locating the `cmover` binary,
//! temporary sites, and process guards that kill what a test started.

pub mod cluster;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use cm_assignment::detect::{Entry, scan};

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A tree's observable content, path by path: kind, mode, symlink target, BLAKE3 of file bytes.
/// Two trees are "the same" for the tests exactly when their observations are equal.
pub fn observe(root: &Path) -> BTreeMap<String, String> {
    scan(root)
        .unwrap()
        .into_iter()
        .map(|(p, e)| {
            let v = match e {
                Entry::Dir { mode } => format!("dir {mode:o}"),
                Entry::File { mode, .. } => format!("file {mode:o} {}", blake3::hash(&fs::read(root.join(&p)).unwrap())),
                Entry::Symlink { target } => format!("link {target}"),
            };
            (p, v)
        })
        .collect()
}
