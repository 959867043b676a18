//! Helpers shared by the integration tests in `tests/tests/`: locating the `cmover` binary,
//! temporary sites, and process guards that kill what a test started.

use std::path::PathBuf;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}
