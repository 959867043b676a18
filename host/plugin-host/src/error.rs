//! Typed errors of the plugin runtime. Every message names the plugin (and its version) and
//! the cause, so an operator can tell a broken plugin from a broken assignment.

use std::path::PathBuf;
use std::sync::Arc;

use crate::quota::QuotaExceeded;

/// Why a call into a plugin failed. The host and every other plugin keep working.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin named `{plugin}` is installed")]
    NotInstalled { plugin: String },

    #[error("plugin `{plugin}` targets world `{found}`, not `{expected}`")]
    WrongWorld { plugin: String, expected: &'static str, found: String },

    #[error("plugin `{plugin}` is not granted site `{site}`")]
    SiteNotGranted { plugin: String, site: String },

    #[error("plugin `{plugin}` ({version}): {cause}")]
    Failed { plugin: String, version: String, cause: FailureCause },

    #[error("plugin `{plugin}` ({version}) vetoed {hook}: {message}")]
    Vetoed { plugin: String, version: String, hook: &'static str, message: String },

    #[error(
        "plugin `{plugin}` ({version}) returned {got} reports for a batch of {expected} commands"
    )]
    BadReports { plugin: String, version: String, expected: usize, got: usize },

    #[error("staging tree {path}: {source}")]
    StagingRoot { path: PathBuf, source: std::io::Error },

    /// wasmtime refused the engine or linker setup (its error is no `std` error; its chain is
    /// kept as text).
    #[error("plugin runtime: {0}")]
    Runtime(String),

    #[error("plugin runtime: {what}: {source}")]
    Io { what: String, source: std::io::Error },

    #[error("plugin runtime: resource table: {0}")]
    ResourceTable(#[from] wasmtime::component::ResourceTableError),

    #[error("plugin runtime: session unusable after an earlier failure: {0}")]
    SessionBroken(#[source] Arc<PluginError>),
}

/// What went wrong inside one call.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FailureCause {
    #[error("exceeded its deadline of {ms} ms (stopped by epoch interruption)")]
    Deadline { ms: u64 },
    #[error(
        "exceeded its memory limit of {} (tried to grow to {}; raise `limits.memory-mib` in its manifest)",
        mib(*limit_bytes),
        mib(*wanted_bytes)
    )]
    MemoryLimit { limit_bytes: u64, wanted_bytes: u64 },
    #[error("trapped: {0}")]
    Trap(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// A per-call quota (bytes written, files created, open files, the disk's reserve). Boxed:
    /// a rare cause should not make every `Result` carrying a `FailureCause` larger.
    #[error("exceeded a quota: {0}")]
    Quota(Box<QuotaExceeded>),
}

impl From<QuotaExceeded> for FailureCause {
    fn from(why: QuotaExceeded) -> Self {
        FailureCause::Quota(Box::new(why))
    }
}

/// Why a plugin could not be installed (nothing changed: the previous version stays).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{file}: not a valid WebAssembly component: {reason}")]
    InvalidComponent { file: String, reason: String },

    #[error(
        "{file}: implements no Content Mover world (exports {exports:?}); expected one of interpreter, cache-invalidator, load-balancer"
    )]
    NoWorld { file: String, exports: Vec<String> },

    #[error("{file}: manifest says world `{manifest}` but the component implements `{component}`")]
    WorldMismatch { file: String, manifest: String, component: String },

    #[error(
        "{file}: imports `{import}`, which the host does not provide (plugins may import only contentmover:plugin interfaces)"
    )]
    UnknownImport { file: String, import: String },

    #[error("manifest {path}: {reason}")]
    Manifest { path: String, reason: String },

    #[error("manifest {manifest}: plugin `{plugin}`: missing grant: {what}")]
    MissingGrant { manifest: String, plugin: String, what: String },

    #[error("plugin `{plugin}` failed its self-check ({}): {source}", kept_or_nothing(kept))]
    SelfCheck { plugin: String, kept: Option<String>, source: Box<PluginError> },

    #[error(
        "manifest {manifest}: plugin `{plugin}` must be granted site `{site}` (this server applies that site with it); add it to `grants.sites`"
    )]
    SiteRequired { manifest: String, plugin: String, site: String },

    #[error("plugin `{plugin}` has no previous version to roll back to")]
    NoPrevious { plugin: String },

    #[error("no plugin named `{plugin}` is installed")]
    NotInstalled { plugin: String },

    #[error("plugin store {path}: {source}")]
    Store { path: PathBuf, source: std::io::Error },

    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// What a refused install leaves live.
fn kept_or_nothing(kept: &Option<String>) -> String {
    match kept {
        Some(version) => format!("version {version} kept"),
        None => "nothing installed".into(),
    }
}

/// Bytes as MiB, the unit of the manifest's `limits.memory-mib`.
fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}
