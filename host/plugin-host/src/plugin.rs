//! A loaded (compiled, validated, pre-instantiated) plugin version, and the per-world call
//! paths: every call runs in a fresh instance from the `InstancePre` (microseconds with the
//! pooling allocator), so a trap or a runaway guest can never poison a later call.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cm_assignment::{Command, DeltaOp, PayloadReader, StreamedCommand};
use cm_site::CommandReport;
use wasmtime::Store;
use wasmtime::component::Resource;

use crate::bindings::cache_invalidator::CacheInvalidatorPre;
use crate::bindings::interpreter::InterpreterPre;
use crate::bindings::interpreter::exports::contentmover::plugin::content_interpreter as wit;
use crate::bindings::load_balancer::LoadBalancerPre;
use crate::bindings::{interpreter, load_balancer};
use crate::endpoint::Endpoints;
use crate::error::{FailureCause, InstallError, PluginError};
use crate::manifest::{PluginManifest, World};
use crate::quota::Declared;
use crate::runtime::{CallLimits, PluginRuntime, failure_cause};
use crate::sandbox::{DataSource, HostState};

/// One version of one plugin, ready to call.
pub struct LoadedPlugin {
    name: Arc<str>,
    manifest: PluginManifest,
    world: World,
    hash: blake3::Hash,
    size: u64,
    from_cache: bool,
    pre: WorldPre,
    endpoints: Arc<Endpoints>,
    /// The manifest's `[config]`, shared by every call's sandbox.
    config: Arc<BTreeMap<String, String>>,
    runtime: PluginRuntime,
}

enum WorldPre {
    Interpreter(InterpreterPre<HostState>),
    CacheInvalidator(CacheInvalidatorPre<HostState>),
    LoadBalancer(LoadBalancerPre<HostState>),
}

impl LoadedPlugin {
    /// Compile (or load from the compiled cache) and validate `bytes` against `manifest`:
    /// it must be a component implementing the manifest's world and importing nothing else.
    /// `file` names the component in errors.
    pub fn load(
        runtime: &PluginRuntime,
        bytes: &[u8],
        manifest: PluginManifest,
        file: &str,
    ) -> Result<Arc<Self>, InstallError> {
        // The manifest is named by its own file, the component by `file`.
        let origin = manifest.origin_or(file).to_string();
        manifest.validate_shape(&origin)?;
        if manifest.limits.memory_mib > runtime.config().max_memory_mib {
            return Err(InstallError::Manifest {
                path: origin,
                reason: format!(
                    "limits.memory-mib = {} exceeds this host's maximum of {} MiB",
                    manifest.limits.memory_mib,
                    runtime.config().max_memory_mib
                ),
            });
        }
        let compiled = runtime.compile(bytes, file)?;
        let world = runtime.world_of(&compiled.component, file)?;
        // The world first: grants are judged against the world the component really has.
        if Some(world) != manifest.world() {
            return Err(InstallError::WorldMismatch {
                file: file.into(),
                manifest: manifest.world.clone(),
                component: world.name().into(),
            });
        }
        manifest.check_grants(&origin)?;
        runtime.check_imports(&compiled.component, world, file)?;
        let wrong_shape = |e: wasmtime::Error| InstallError::InvalidComponent {
            file: file.into(),
            reason: format!("does not match world `{world}` of contentmover:plugin@0.1.0: {e:#}"),
        };
        let instance_pre =
            runtime.inner.linker.instantiate_pre(&compiled.component).map_err(wrong_shape)?;
        let pre = match world {
            World::Interpreter => {
                WorldPre::Interpreter(InterpreterPre::new(instance_pre).map_err(wrong_shape)?)
            }
            World::CacheInvalidator => WorldPre::CacheInvalidator(
                CacheInvalidatorPre::new(instance_pre).map_err(wrong_shape)?,
            ),
            World::LoadBalancer => {
                WorldPre::LoadBalancer(LoadBalancerPre::new(instance_pre).map_err(wrong_shape)?)
            }
        };
        Ok(Arc::new(LoadedPlugin {
            name: manifest.name.as_str().into(),
            endpoints: Arc::new(manifest.endpoints()),
            config: Arc::new(manifest.config.clone()),
            manifest,
            world,
            hash: compiled.hash,
            size: bytes.len() as u64,
            from_cache: compiled.from_cache,
            pre,
            runtime: runtime.clone(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn world(&self) -> World {
        self.world
    }

    pub fn manifest(&self) -> &PluginManifest {
        &self.manifest
    }

    /// BLAKE3 of the component.
    pub fn hash(&self) -> blake3::Hash {
        self.hash
    }

    /// Short version id: the first 12 hex digits of the component's BLAKE3.
    pub fn version(&self) -> String {
        self.hash.to_hex()[..12].to_string()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the native code came from the on-disk compiled cache.
    pub fn from_compiled_cache(&self) -> bool {
        self.from_cache
    }

    fn limits(&self) -> CallLimits {
        CallLimits {
            memory_bytes: self.manifest.limits.memory_bytes(),
            deadline_ms: self.manifest.limits.deadline_ms,
        }
    }

    fn failed(&self, cause: FailureCause) -> PluginError {
        PluginError::Failed { plugin: self.name.to_string(), version: self.version(), cause }
    }

    fn wrong_world(&self, expected: World) -> PluginError {
        PluginError::WrongWorld {
            plugin: self.name.to_string(),
            expected: expected.name(),
            found: self.world.name().into(),
        }
    }

    fn vetoed(&self, hook: &'static str, message: String) -> PluginError {
        PluginError::Vetoed {
            plugin: self.name.to_string(),
            version: self.version(),
            hook,
            message,
        }
    }

    fn new_store(&self, staging: Option<&Path>) -> Result<Store<HostState>, PluginError> {
        self.runtime.store(
            self.name.clone(),
            self.limits(),
            &self.manifest.limits,
            staging,
            self.endpoints.clone(),
            self.config.clone(),
        )
    }

    /// Run one call on a fresh instance of a stateless world, mapping traps to causes.
    fn call<I, R>(
        &self,
        instantiate: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<I>,
        call: impl FnOnce(&mut Store<HostState>, &I) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let mut store = self.new_store(None)?;
        let instance = instantiate(&mut store)
            .map_err(|e| self.failed(FailureCause::Instantiate(format!("{e:#}"))))?;
        let outcome = call(&mut store, &instance)
            .map_err(|e| self.failed(failure_cause(&store, self.limits(), &e)));
        store.data_mut().end_call();
        crate::metrics::call(&outcome);
        outcome
    }

    /// Start an interpreter session on `staging_root`: one instance for a stream of calls.
    pub fn interpreter_session(
        self: &Arc<Self>,
        staging_root: &Path,
    ) -> Result<InterpreterSession, PluginError> {
        self.session_on(Some(staging_root))
    }

    /// A session with or without a staging tree (`commit`/`rollback` hooks need none).
    pub(crate) fn session_on(
        self: &Arc<Self>,
        staging_root: Option<&Path>,
    ) -> Result<InterpreterSession, PluginError> {
        let WorldPre::Interpreter(pre) = &self.pre else {
            return Err(self.wrong_world(World::Interpreter));
        };
        let mut store = self.new_store(staging_root)?;
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| self.failed(FailureCause::Instantiate(format!("{e:#}"))))?;
        Ok(InterpreterSession { plugin: self.clone(), store, instance, broken: None })
    }

    /// The plugin's own self-check (every world has one). Run at install and hot swap.
    pub fn self_check(self: &Arc<Self>) -> Result<(), PluginError> {
        let verdict = match &self.pre {
            WorldPre::Interpreter(_) => {
                let scratch = tempfile::tempdir().map_err(|source| PluginError::Io {
                    what: "self-check scratch directory".into(),
                    source,
                })?;
                let verdict = self.interpreter_session(scratch.path())?.self_check_raw();
                drop(scratch);
                verdict?
            }
            WorldPre::CacheInvalidator(pre) => self.call(
                |store| pre.instantiate(store),
                |store, i| i.contentmover_plugin_cache_invalidation().call_self_check(store),
            )?,
            WorldPre::LoadBalancer(pre) => self.call(
                |store| pre.instantiate(store),
                |store, i| i.contentmover_plugin_load_balancing().call_self_check(store),
            )?,
        };
        verdict.map_err(|message| self.vetoed("self-check", message))
    }

    /// `cache-invalidation.invalidate`.
    pub fn invalidate(&self, site: &str, paths: &[String]) -> Result<(), PluginError> {
        let pre = self.cache_pre()?;
        self.call(
            |s| pre.instantiate(s),
            |s, i| i.contentmover_plugin_cache_invalidation().call_invalidate(s, site, paths),
        )?
        .map_err(|m| self.vetoed("invalidate", m))
    }

    /// `cache-invalidation.purge-site`.
    pub fn purge_site(&self, site: &str) -> Result<(), PluginError> {
        let pre = self.cache_pre()?;
        self.call(
            |s| pre.instantiate(s),
            |s, i| i.contentmover_plugin_cache_invalidation().call_purge_site(s, site),
        )?
        .map_err(|m| self.vetoed("purge-site", m))
    }

    fn cache_pre(&self) -> Result<&CacheInvalidatorPre<HostState>, PluginError> {
        match &self.pre {
            WorldPre::CacheInvalidator(pre) => Ok(pre),
            _ => Err(self.wrong_world(World::CacheInvalidator)),
        }
    }

    fn balancer_pre(&self) -> Result<&LoadBalancerPre<HostState>, PluginError> {
        match &self.pre {
            WorldPre::LoadBalancer(pre) => Ok(pre),
            _ => Err(self.wrong_world(World::LoadBalancer)),
        }
    }

    /// One `load-balancing` call.
    pub fn balance(&self, action: BalancerAction<'_>) -> Result<Option<ServerState>, PluginError> {
        use load_balancer::exports::contentmover::plugin::load_balancing::ServerState as Wit;
        let pre = self.balancer_pre()?;
        let hook = action.name();
        let outcome = self.call(
            |s| pre.instantiate(s),
            |s, i| {
                let lb = i.contentmover_plugin_load_balancing();
                Ok(match action {
                    BalancerAction::Drain(server) => lb.call_drain(&mut *s, server)?.map(|()| None),
                    BalancerAction::Undrain(server) => {
                        lb.call_undrain(&mut *s, server)?.map(|()| None)
                    }
                    BalancerAction::Add { server, address } => {
                        lb.call_add(&mut *s, server, address)?.map(|()| None)
                    }
                    BalancerAction::Remove(server) => {
                        lb.call_remove(&mut *s, server)?.map(|()| None)
                    }
                    BalancerAction::State(server) => lb.call_state(&mut *s, server)?.map(Some),
                })
            },
        )?;
        let state = outcome.map_err(|m| self.vetoed(hook, m))?;
        Ok(state.map(|state| match state {
            Wit::Ready => ServerState::Ready,
            Wit::Drain => ServerState::Drain,
            Wit::Maint => ServerState::Maint,
            Wit::Absent => ServerState::Absent,
        }))
    }
}

impl LoadedPlugin {
    /// `load-balancing.route-paths`: exactly `paths` go to `pool`.
    pub fn route_paths(&self, pool: &str, paths: &[String]) -> Result<(), PluginError> {
        let pre = self.balancer_pre()?;
        self.call(
            |s| pre.instantiate(s),
            |s, i| i.contentmover_plugin_load_balancing().call_route_paths(s, pool, paths),
        )?
        .map_err(|m| self.vetoed("route-paths", m))
    }

    /// `load-balancing.path-rates`: the balancer's request counts per URL path.
    pub fn path_rates(&self) -> Result<Vec<PathRate>, PluginError> {
        let pre = self.balancer_pre()?;
        let rates = self
            .call(
                |s| pre.instantiate(s),
                |s, i| i.contentmover_plugin_load_balancing().call_path_rates(s),
            )?
            .map_err(|m| self.vetoed("path-rates", m))?;
        Ok(rates
            .into_iter()
            .map(|r| PathRate { path: r.path, requests: r.requests, period_ms: r.period_ms })
            .collect())
    }

    /// `load-balancing.sessions`: the sessions `server` holds on the balancer now.
    pub fn sessions(&self, server: &str) -> Result<u32, PluginError> {
        let pre = self.balancer_pre()?;
        self.call(
            |s| pre.instantiate(s),
            |s, i| i.contentmover_plugin_load_balancing().call_sessions(s, server),
        )?
        .map_err(|m| self.vetoed("sessions", m))
    }
}

/// One URL path's request count over `period_ms`, as a load-balancer plugin reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRate {
    pub path: String,
    pub requests: u64,
    pub period_ms: u64,
}

/// What to ask a load-balancer plugin.
#[derive(Debug, Clone, Copy)]
pub enum BalancerAction<'a> {
    Drain(&'a str),
    Undrain(&'a str),
    Add { server: &'a str, address: &'a str },
    Remove(&'a str),
    State(&'a str),
}

impl BalancerAction<'_> {
    fn name(&self) -> &'static str {
        match self {
            BalancerAction::Drain(_) => "drain",
            BalancerAction::Undrain(_) => "undrain",
            BalancerAction::Add { .. } => "add",
            BalancerAction::Remove(_) => "remove",
            BalancerAction::State(_) => "state",
        }
    }
}

/// A server's state as a load-balancer plugin reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Ready,
    Drain,
    Maint,
    Absent,
}

/// One interpreter instance bound to one staging tree, for a stream of calls (batches of one
/// assignment, then commit or rollback). It pins the plugin version it was started with:
/// a hot swap does not disturb it. After a failed call it refuses further calls.
pub struct InterpreterSession {
    plugin: Arc<LoadedPlugin>,
    store: Store<HostState>,
    instance: interpreter::Interpreter,
    broken: Option<Arc<PluginError>>,
}

impl InterpreterSession {
    /// The plugin version this session runs.
    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.plugin
    }

    /// One call, with a fresh deadline and fresh per-call quotas sized for `declared`.
    fn run<R>(
        &mut self,
        declared: Declared,
        call: impl FnOnce(&mut Store<HostState>, &interpreter::Interpreter) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        if let Some(e) = &self.broken {
            return Err(PluginError::SessionBroken(e.clone()));
        }
        let limits = self.plugin.limits();
        self.plugin.runtime.arm_deadline(&mut self.store, limits.deadline_ms);
        self.store.data_mut().quotas.start_call(declared);
        let outcome = call(&mut self.store, &self.instance).map_err(|e| {
            let error = self.plugin.failed(failure_cause(&self.store, limits, &e));
            self.broken =
                Some(Arc::new(self.plugin.failed(failure_cause(&self.store, limits, &e))));
            error
        });
        self.store.data_mut().end_call();
        crate::metrics::call(&outcome);
        outcome
    }

    /// Apply one batch; one report per command, in order.
    pub fn apply(
        &mut self,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, PluginError> {
        let expected = batch.len();
        let declared = Declared::of(&batch);
        let mut commands = Vec::with_capacity(expected);
        for command in batch {
            commands.push(to_wit(&mut self.store, command)?);
        }
        let reports = self.run(declared, |store, i| {
            i.contentmover_plugin_content_interpreter().call_apply(store, &commands)
        })?;
        let in_order = reports.len() == expected
            && reports.iter().enumerate().all(|(i, r)| r.index as usize == i);
        if !in_order {
            return Err(PluginError::BadReports {
                plugin: self.plugin.name.to_string(),
                version: self.plugin.version(),
                expected,
                got: reports.len(),
            });
        }
        Ok(reports
            .into_iter()
            .map(|r| CommandReport { index: r.index, outcome: r.outcome })
            .collect())
    }

    /// The `commit` hook; a veto is [`PluginError::Vetoed`].
    pub fn commit(&mut self, serial: u64) -> Result<(), PluginError> {
        let verdict = self.run(Declared::default(), |store, i| {
            i.contentmover_plugin_content_interpreter().call_commit(store, serial)
        })?;
        verdict.map_err(|m| self.plugin.vetoed("commit", m))
    }

    /// The `rollback` hook.
    pub fn rollback(&mut self, serial: u64) -> Result<(), PluginError> {
        let verdict = self.run(Declared::default(), |store, i| {
            i.contentmover_plugin_content_interpreter().call_rollback(store, serial)
        })?;
        verdict.map_err(|m| self.plugin.vetoed("rollback", m))
    }

    /// The `self-check` export (also the cheapest call: used to measure call overhead).
    pub fn self_check(&mut self) -> Result<(), PluginError> {
        let verdict = self.self_check_raw()?;
        verdict.map_err(|m| self.plugin.vetoed("self-check", m))
    }

    fn self_check_raw(&mut self) -> Result<Result<(), String>, PluginError> {
        self.run(Declared::default(), |store, i| {
            i.contentmover_plugin_content_interpreter().call_self_check(store)
        })
    }
}

fn push_source(
    store: &mut Store<HostState>,
    data: Box<dyn PayloadReader>,
) -> Result<Resource<DataSource>, PluginError> {
    store.data_mut().table.push(DataSource::new(data)).map_err(PluginError::from)
}

/// A host command as the guest's WIT `command`; payloads become `data-source` resources.
fn to_wit(
    store: &mut Store<HostState>,
    command: StreamedCommand,
) -> Result<wit::Command, PluginError> {
    Ok(match command {
        Command::MakeDir { path, mode } => wit::Command::MakeDir(wit::MakeDir { path, mode }),
        Command::WriteFile { path, mode, mtime, payload, .. } => {
            wit::Command::WriteFile(wit::WriteFile {
                path,
                mode,
                mtime,
                data: push_source(store, payload)?,
            })
        }
        Command::ApplyDelta { path, base, mode, mtime, ops, payload, .. } => {
            wit::Command::ApplyDelta(wit::ApplyDelta {
                path,
                base,
                mode,
                mtime,
                ops: ops
                    .into_iter()
                    .map(|op| match op {
                        DeltaOp::Copy { offset, len } => {
                            wit::DeltaOp::Copy(wit::CopyRange { offset, len })
                        }
                        DeltaOp::Insert { len } => wit::DeltaOp::Insert(len),
                    })
                    .collect(),
                data: push_source(store, payload)?,
            })
        }
        Command::Remove { path, recursive } => {
            wit::Command::Remove(wit::Remove { path, recursive })
        }
        Command::Rename { from, to } => wit::Command::Rename(wit::Rename { from, to }),
        Command::Symlink { path, target } => wit::Command::Symlink(wit::Symlink { path, target }),
        Command::SetMode { path, mode } => wit::Command::SetMode(wit::SetMode { path, mode }),
    })
}
