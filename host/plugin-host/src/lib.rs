//! The sandboxed WebAssembly plugin runtime: wasmtime components, the host side of the WIT
//! interfaces (`wit/`), the plugin store and hot swap.
//!
//! - [`PluginRuntime`]: the process's one `Engine` (pooling allocator, epoch interruption),
//!   the `Linker` with every host interface, and the on-disk compiled cache.
//! - [`LoadedPlugin`]: one validated version of a plugin, pre-instantiated (`InstancePre`);
//!   every call runs in a fresh instance with a deadline, a memory cap and per-call quotas
//!   (log, bytes written, files created, open files, the disk's reserve).
//! - [`PluginStore`]: installed plugins, hot swap, rollback; hands out [`Interpreter`],
//!   [`CacheInvalidator`] and [`LoadBalancer`] handles that always call the current version.
//! - [`StoreFollower`]: for a long-running process (the agent), follows what other processes
//!   (`cmover plugin install|rollback|remove`) do to the store, hot-swapping validated versions.
//!
//! [`Interpreter`] is the WebAssembly implementation of `cm_site::Interpreter`: `cm-site`
//! drives it with batches of `cm_assignment::StreamedCommand`; payload bytes stream from their
//! `PayloadReader` and never enter the guest in one piece. All calls block the calling
//! thread; from async code, run them with `spawn_blocking`.

mod bindings;
mod endpoint;
mod error;
mod follow;
mod inspect;
mod kernel_copy;
mod manifest;
pub mod metrics;
mod plugin;
mod quota;
mod runtime;
mod sandbox;
mod staging;
mod store;

pub use endpoint::{Endpoint, EndpointAddress};
pub use error::{FailureCause, InstallError, PluginError};
pub use follow::{FollowConfig, StoreEvent, StoreFollower};
pub use inspect::{ComponentInfo, inspect};
pub use manifest::{
    EndpointGrant, Grants, Limits, MAX_CONFIG_KEYS, MAX_CONFIG_TOTAL, MAX_CONFIG_VALUE,
    ManifestOrigin, PluginManifest, World,
};
pub use plugin::{BalancerAction, InterpreterSession, LoadedPlugin, PathRate, ServerState};
pub use quota::{DiskReserve, QuotaExceeded};
pub use runtime::{PluginRuntime, RuntimeConfig};
pub use sandbox::{LogLevel, LogSink};
pub use store::{
    CacheInvalidator, Installed, Interpreter, LoadBalancer, PluginInfo, PluginSlot, PluginStore,
};

/// Components built from this repository by `cargo xtask plugins` (committed in
/// `plugins/dist/`), so the host works on a machine without the wasm toolchain.
pub mod bundled {
    /// The default content interpreter.
    pub const INTERPRETER: &[u8] = include_bytes!("../../../plugins/dist/interpreter.wasm");

    /// The directory holding every bundled component (for tests and tools in this repository).
    pub fn dist_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/dist")
    }

    /// A manifest for the default interpreter granting `sites`.
    pub fn interpreter_manifest(name: &str, sites: &[&str]) -> crate::PluginManifest {
        crate::PluginManifest {
            name: name.into(),
            world: crate::World::Interpreter.name().into(),
            limits: Default::default(),
            grants: crate::Grants {
                sites: sites.iter().map(|s| s.to_string()).collect(),
                endpoints: Default::default(),
            },
            config: Default::default(),
            origin: crate::ManifestOrigin(Some(format!("(bundled manifest of `{name}`)"))),
        }
    }
}
