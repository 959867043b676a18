//! Building a plugin crate into a component, shared by `cmover plugin build` and
//! `cargo xtask plugins`: which wasm32 toolchain this machine has ([`Toolchain::detect`]),
//! cargo for `wasm32-unknown-unknown` ([`Toolchain::build`]), and the core module turned into a
//! component in-process with `wit-component` ([`componentize`]), so no external `wasm-tools`.
//!
//! Two toolchains work: rustup with the `wasm32-unknown-unknown` target (plain `cargo build`),
//! or Debian's `rustc-web`, `cargo-web`, `rust-web-src` and `lld-19` (nightly features through
//! `RUSTC_BOOTSTRAP`, the standard library built from source with `-Zbuild-std`, linked by
//! `wasm-ld-19`). When neither is there, the error gives the command that installs either.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target every plugin is built for.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// What to run to get a toolchain (the [`BuildError::NoToolchain`] message).
pub const INSTALL_HINT: &str = "install one: `rustup target add wasm32-unknown-unknown`, or (Debian/Ubuntu) `sudo apt-get install rustc-web cargo-web rust-web-src lld-19`";

/// Why a plugin could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no wasm32 toolchain on this machine; {INSTALL_HINT}")]
    NoToolchain,
    #[error("running cargo in {dir}: {source}")]
    Spawn { dir: PathBuf, source: std::io::Error },
    #[error("cargo failed building `{package}` for {TARGET} ({status}); its errors are above")]
    Cargo { package: String, status: std::process::ExitStatus },
    #[error("reading the built module {path}: {source}")]
    Artifact { path: PathBuf, source: std::io::Error },
    #[error("componentizing `{package}` (is it built with cm-plugin-sdk?): {reason}")]
    Componentize { package: String, reason: String },
}

/// How to compile for `wasm32-unknown-unknown` on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// rustup with the `wasm32-unknown-unknown` target installed: plain `cargo build`.
    Rustup,
    /// Debian's `rustc-web`/`cargo-web`/`rust-web-src`/`lld-19`: the standard library built
    /// from source.
    Debian,
}

/// One cargo build of a plugin package.
#[derive(Debug, Clone)]
pub struct Build<'a> {
    /// The cargo workspace (or lone crate) to run cargo in.
    pub workspace: &'a Path,
    pub package: &'a str,
    pub features: &'a [&'a str],
    pub target_dir: &'a Path,
    /// `--locked` (reproducible builds of a committed lock file).
    pub locked: bool,
    /// Path prefixes replaced in the module (panic locations), e.g. the repository by `/cm`,
    /// so a component carries no path of the machine that built it.
    pub remap: Vec<(PathBuf, &'a str)>,
}

impl Toolchain {
    /// The toolchain this machine has: rustup's target first, then Debian's packages.
    pub fn detect() -> Result<Self, BuildError> {
        let rustup = Command::new("rustup").args(["target", "list", "--installed"]).output();
        if let Ok(out) = rustup
            && String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == TARGET)
        {
            return Ok(Toolchain::Rustup);
        }
        let debian = Path::new("/usr/bin/cargo").exists()
            && Path::new("/usr/bin/wasm-ld-19").exists()
            && Path::new("/usr/lib/rustlib/src/rust/library").exists();
        if debian {
            return Ok(Toolchain::Debian);
        }
        Err(BuildError::NoToolchain)
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Toolchain::Rustup => "rustup's wasm32-unknown-unknown target",
            Toolchain::Debian => "Debian's rustc-web (build-std)",
        }
    }

    /// Build `build.package` in release mode and return its core module (cargo's output goes
    /// to this process's stdout and stderr).
    pub fn build(&self, build: &Build<'_>) -> Result<Vec<u8>, BuildError> {
        let mut cargo = match self {
            Toolchain::Rustup => Command::new("cargo"),
            Toolchain::Debian => Command::new("/usr/bin/cargo"),
        };
        // A clean slate: variables a surrounding cargo set (`cargo xtask`, `cargo test`) would
        // point the inner build at the host toolchain or another target dir.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let inherited = (key.starts_with("CARGO") && key != "CARGO_HOME")
                || key.starts_with("RUST")
                || key == "RUSTUP_TOOLCHAIN";
            if inherited {
                cargo.env_remove(key.as_ref());
            }
        }
        let rustflags: Vec<String> = build
            .remap
            .iter()
            .map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display()))
            .collect();
        cargo
            .current_dir(build.workspace)
            .args(["build", "--release", "--target", TARGET, "-p", build.package])
            .arg("--target-dir")
            .arg(build.target_dir)
            .env("RUSTFLAGS", rustflags.join(" "));
        if build.locked {
            cargo.arg("--locked");
        }
        if !build.features.is_empty() {
            cargo.args(["--features", &build.features.join(",")]);
        }
        if let Toolchain::Debian = self {
            let path = std::env::var("PATH").unwrap_or_default();
            cargo
                .arg("-Zbuild-std=std,panic_abort")
                .env("PATH", format!("/usr/bin:{path}"))
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", "wasm-ld-19");
        }
        let status = cargo
            .status()
            .map_err(|source| BuildError::Spawn { dir: build.workspace.into(), source })?;
        if !status.success() {
            return Err(BuildError::Cargo { package: build.package.into(), status });
        }
        let artifact = build
            .target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{}.wasm", build.package.replace('-', "_")));
        std::fs::read(&artifact).map_err(|source| BuildError::Artifact { path: artifact, source })
    }
}

/// The user's cargo home (`CARGO_HOME`, else `~/.cargo`): remapped out of built modules.
pub fn cargo_home() -> PathBuf {
    std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"))
}

/// Turn the core module wit-bindgen produced into a component (validated), using the
/// component-type sections wit-bindgen embedded in it.
pub fn componentize(package: &str, core: &[u8]) -> Result<Vec<u8>, BuildError> {
    wit_component::ComponentEncoder::default()
        .module(core)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| BuildError::Componentize { package: package.into(), reason: format!("{e:#}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_module_is_refused_with_the_package_named() {
        let error = componentize("bare", b"not wasm").map(drop).unwrap_err().to_string();
        assert!(error.starts_with("componentizing `bare`"), "{error}");
    }

    #[test]
    fn the_missing_toolchain_error_gives_both_install_commands() {
        let message = BuildError::NoToolchain.to_string();
        assert!(message.contains("rustup target add wasm32-unknown-unknown"), "{message}");
        assert!(message.contains("apt-get install rustc-web cargo-web rust-web-src lld-19"));
    }
}
