//! The one wasmtime `Engine` of a process, its `Linker` with every host interface, the
//! on-disk cache of compiled components, and the per-call sandbox (deadline, memory cap,
//! capabilities).
//!
//! Compiled components are cached under `compiled_cache` as `<key>.cwasm`, where the key is
//! BLAKE3 of the component bytes and of the engine's compatibility hash (wasmtime version,
//! target, compiler settings): a restart, or a second process with the same settings, loads
//! native code instead of compiling again.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use crate::bindings;
use crate::endpoint::Endpoints;
use crate::error::{FailureCause, InstallError, PluginError};
use crate::manifest::{Limits, World};
use crate::quota::{DiskReserve, QuotaTrap, Quotas};
use crate::sandbox::{HostState, LogSink, MemoryCap};
use crate::staging::Staging;

/// How the runtime is set up. The defaults suit a server agent.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Directory for compiled components (`None`: compile on every load).
    pub compiled_cache: Option<PathBuf>,
    /// Most plugin instances alive at once (the pooling allocator's slots).
    pub max_instances: u32,
    /// Largest linear memory any plugin may be granted, MiB (the pool's slot size).
    pub max_memory_mib: u64,
    /// Epoch tick: the granularity of call deadlines.
    pub epoch_tick: Duration,
    /// Also send every plugin log record here (besides `tracing`).
    pub log_sink: Option<LogSink>,
    /// Free space and inodes a plugin call must leave on its staging filesystem.
    pub disk_reserve: DiskReserve,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            compiled_cache: None,
            max_instances: 64,
            max_memory_mib: 512,
            epoch_tick: Duration::from_millis(5),
            log_sink: None,
            disk_reserve: DiskReserve::default(),
        }
    }
}

/// The plugin runtime: cheap to clone, shared by every plugin of the process.
#[derive(Clone)]
pub struct PluginRuntime {
    pub(crate) inner: Arc<RuntimeInner>,
}

pub(crate) struct RuntimeInner {
    pub engine: Engine,
    pub linker: Linker<HostState>,
    pub config: RuntimeConfig,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// A compiled component and whether it came from the on-disk cache.
pub struct Compiled {
    pub component: Component,
    pub from_cache: bool,
    pub hash: blake3::Hash,
}

/// BLAKE3 as a `std::hash::Hasher`, to digest the engine's compatibility hash.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn finish(&self) -> u64 {
        unreachable!("only `finalize` is used")
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl PluginRuntime {
    pub fn new(config: RuntimeConfig) -> Result<Self, PluginError> {
        let runtime_error = |e: wasmtime::Error| PluginError::Runtime(format!("{e:#}"));
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances * 4)
            .max_core_instances_per_component(16)
            .total_memories(config.max_instances)
            .max_memories_per_component(2)
            .total_tables(config.max_instances * 4)
            .max_tables_per_component(8)
            .max_memory_size((config.max_memory_mib << 20) as usize);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(runtime_error)?;
        let mut linker = Linker::new(&engine);
        bindings::interpreter::Interpreter::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |state| state,
        )
        .map_err(runtime_error)?;
        if let Some(dir) = &config.compiled_cache {
            std::fs::create_dir_all(dir).map_err(|source| PluginError::Io {
                what: format!("compiled cache {}", dir.display()),
                source,
            })?;
        }
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let (engine, stop, tick) = (engine.clone(), ticker_stop.clone(), config.epoch_tick);
            std::thread::Builder::new()
                .name("cm-plugin-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|source| PluginError::Io {
                    what: "starting the epoch ticker".into(),
                    source,
                })?;
        }
        Ok(PluginRuntime { inner: Arc::new(RuntimeInner { engine, linker, config, ticker_stop }) })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The compiled-cache key of `component` on this engine.
    fn cache_key(&self, component: &[u8]) -> String {
        let mut hasher = Blake3Hasher(blake3::Hasher::new());
        std::hash::Hash::hash(&self.inner.engine.precompile_compatibility_hash(), &mut hasher);
        hasher.0.update(blake3::hash(component).as_bytes());
        hasher.0.finalize().to_hex().to_string()
    }

    /// Compile `bytes` (`file` names it in errors), or load the native code from the cache.
    pub fn compile(&self, bytes: &[u8], file: &str) -> Result<Compiled, InstallError> {
        let hash = blake3::hash(bytes);
        let invalid = |e: wasmtime::Error| InstallError::InvalidComponent {
            file: file.into(),
            reason: format!("{e:#}"),
        };
        let cached_path = self
            .inner
            .config
            .compiled_cache
            .as_ref()
            .map(|dir| dir.join(format!("{}.cwasm", self.cache_key(bytes))));
        if let Some(path) = &cached_path
            && path.exists()
        {
            // SAFETY: the cache directory is the host's own (never plugin-writable); entries are
            // written whole by `compile` below (temp file + rename) for exactly this engine
            // configuration, which the key covers, and wasmtime re-checks compatibility.
            match unsafe { Component::deserialize_file(&self.inner.engine, path) } {
                Ok(component) => return Ok(Compiled { component, from_cache: true, hash }),
                Err(e) => tracing::warn!(
                    "ignoring unusable compiled cache entry {}: {e:#}",
                    path.display()
                ),
            }
        }
        if wasmparser_is_core_module(bytes) {
            return Err(InstallError::InvalidComponent {
                file: file.into(),
                reason: "this is a core WebAssembly module, not a component (componentize it with wit-component)".into(),
            });
        }
        let component = Component::new(&self.inner.engine, bytes).map_err(invalid)?;
        if let Some(path) = cached_path
            && let Err(e) = store_compiled(&component, &path)
        {
            tracing::warn!("could not cache compiled component at {}: {e}", path.display());
        }
        Ok(Compiled { component, from_cache: false, hash })
    }

    /// The world a component implements, from its exports.
    pub fn world_of(&self, component: &Component, file: &str) -> Result<World, InstallError> {
        let exports = self.exports(component);
        World::ALL
            .into_iter()
            .find(|world| exports.iter().any(|e| unversioned(e) == world.export()))
            .ok_or_else(|| InstallError::NoWorld { file: file.into(), exports })
    }

    /// Refuse imports the world does not offer (e.g. WASI), with a message naming them.
    pub fn check_imports(
        &self,
        component: &Component,
        world: World,
        file: &str,
    ) -> Result<(), InstallError> {
        match self
            .imports(component)
            .into_iter()
            .find(|import| !world.imports().contains(&unversioned(import)))
        {
            Some(import) => Err(InstallError::UnknownImport { file: file.into(), import }),
            None => Ok(()),
        }
    }

    pub fn imports(&self, component: &Component) -> Vec<String> {
        component
            .component_type()
            .imports(&self.inner.engine)
            .map(|(name, _)| name.to_string())
            .collect()
    }

    pub fn exports(&self, component: &Component) -> Vec<String> {
        component
            .component_type()
            .exports(&self.inner.engine)
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// A fresh sandbox for one call: memory cap, deadline, quotas, and the granted capabilities.
    pub(crate) fn store(
        &self,
        plugin: Arc<str>,
        limits: CallLimits,
        quotas: &Limits,
        staging: Option<&Path>,
        endpoints: Arc<Endpoints>,
        config: Arc<BTreeMap<String, String>>,
    ) -> Result<Store<HostState>, PluginError> {
        let staging = match staging {
            Some(root) => Some(
                Staging::open(root)
                    .map_err(|source| PluginError::StagingRoot { path: root.into(), source })?,
            ),
            None => None,
        };
        let state = HostState {
            table: ResourceTable::new(),
            memory: MemoryCap { limit_bytes: limits.memory_bytes, refused: None },
            plugin,
            staging,
            endpoints,
            log_sink: self.inner.config.log_sink.clone(),
            quotas: Quotas::new(quotas.clone(), self.inner.config.disk_reserve),
            config,
            panic: None,
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|state| &mut state.memory);
        store.epoch_deadline_trap();
        self.arm_deadline(&mut store, limits.deadline_ms);
        Ok(store)
    }

    /// Give the next call on `store` `deadline_ms` from now.
    pub(crate) fn arm_deadline(&self, store: &mut Store<HostState>, deadline_ms: u64) {
        let tick_ms = self.inner.config.epoch_tick.as_millis().max(1) as u64;
        // One extra tick: the current one may be about to end.
        store.set_epoch_deadline(deadline_ms.div_ceil(tick_ms) + 1);
    }
}

/// Limits of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallLimits {
    pub memory_bytes: u64,
    pub deadline_ms: u64,
}

/// Why a call failed, from the error and what the sandbox saw.
pub(crate) fn failure_cause(
    store: &Store<HostState>,
    limits: CallLimits,
    error: &wasmtime::Error,
) -> FailureCause {
    if let Some(why) = &store.data().quotas.breach {
        return FailureCause::Quota(Box::new(why.clone()));
    }
    if let Some(QuotaTrap(why)) = error.downcast_ref::<QuotaTrap>() {
        return FailureCause::Quota(Box::new(why.clone()));
    }
    if let Some(wanted) = store.data().memory.refused {
        return FailureCause::MemoryLimit {
            limit_bytes: limits.memory_bytes,
            wanted_bytes: wanted,
        };
    }
    if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
        return FailureCause::Deadline { ms: limits.deadline_ms };
    }
    match &store.data().panic {
        // The SDK's panic hook said why before the trap: that first, then the backtrace.
        Some(panic) => FailureCause::Trap(format!("{panic}\n{error:?}")),
        None => FailureCause::Trap(format!("{error:?}")),
    }
}

/// "ns:pkg/iface@1.2.3" -> "ns:pkg/iface".
fn unversioned(name: &str) -> &str {
    name.split_once('@').map_or(name, |(n, _)| n)
}

/// A core module starts with the same magic as a component but a different version/layer.
fn wasmparser_is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

fn store_compiled(component: &Component, path: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, path)
}
