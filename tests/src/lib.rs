//! Helpers shared by the integration tests in `tests/tests/`: locating the `cmover` binary,
//! temporary sites, and process guards that kill what a test started; nodes on loopback threads
//! ([`loopback`]) for the manager's and the tree's multi-node tests.

pub mod cluster;
pub mod golive;
pub mod loopback;
pub mod postgres;
pub mod stack;
pub mod web;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cm_assignment::detect::{Entry, scan};

/// One manager signing key for the in-process tests (the manager signs with it, the GLs pin
/// it), made once per test process.
pub fn test_signer() -> &'static cm_assignment::SigningKey {
    static KEY: OnceLock<cm_assignment::SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let der = cm_assignment::SigningKey::generate_pkcs8().expect("generating a key");
        cm_assignment::SigningKey::from_pkcs8(&der).expect("a fresh key loads")
    })
}

/// The pins matching [`test_signer`].
pub fn test_pins() -> cm_assignment::TrustedKeys {
    cm_assignment::TrustedKeys::new([test_signer().public_key()])
}

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A test that drives a real server or needs root stops here when the part is missing: on a
/// developer's bare machine it skips with `why`; under `CI=true` (where `.ci/run` installed
/// every part) a missing part is a failure, so CI always drives the real thing.
pub fn missing_part(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}, and CI=true: .ci/run should have installed it");
    }
    eprintln!("{why}: skipping");
}

/// The `cmover` binary of this target directory and profile, built once per test process.
///
/// It is built with the same target selection as `cargo test --workspace` (`--workspace --tests
/// --bins`), so cargo resolves the same features and reuses every dependency the test build
/// compiled: only `cmover` itself is linked. (`cargo build -p cmover` would resolve features for
/// that one package and rebuild most of the dependency graph.) `cargo test` has released the
/// build lock by the time tests run.
pub fn cmover_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // A prebuilt binary (e.g. a release build for the benchmarks) skips the build below.
        if let Some(bin) = std::env::var_os("CMOVER_BIN") {
            return PathBuf::from(bin);
        }
        // Test executables live in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir =
            exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps").to_path_buf();
        let target = profile_dir.parent().expect("<target>").to_path_buf();
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(workspace_root())
            .args(["build", "--quiet", "--workspace", "--tests", "--bins"])
            .env("CARGO_TARGET_DIR", &target);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("running cargo build for cmover");
        assert!(status.success(), "building cmover failed: {status}");
        profile_dir.join("cmover")
    })
    .clone()
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
                Entry::File { mode, .. } => {
                    format!("file {mode:o} {}", blake3::hash(&fs::read(root.join(&p)).unwrap()))
                }
                Entry::Symlink { target } => format!("link {target}"),
            };
            (p, v)
        })
        .collect()
}
