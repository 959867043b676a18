//! The plugin store: installed plugins on disk, the live version of each in memory, and hot
//! swap.
//!
//! On disk (`dir/`):
//! ```text
//! compiled/<key>.cwasm          native code cache (see runtime.rs)
//! <name>/manifest.toml          the operator's manifest (grants, limits) of the current version
//! <name>/manifest-<blake3>.toml every manifest ever installed, named by its own hash
//! <name>/<blake3>.wasm          every installed version of the component
//! <name>/state.toml             current = "<blake3>", previous = ["<blake3>", ...],
//!                               manifest = "<blake3>", manifests = { <wasm> = <manifest> }
//! ```
//!
//! `state.toml` is the commit record, written last. Everything it names is on disk before it
//! is written, so a crash at any point of an install or rollback leaves the store at the old
//! or the new version, each with the manifest it was installed with: a version is loaded with
//! the manifest its state names (`manifest-<hash>.toml`), never with whatever `manifest.toml`
//! a torn install left behind.
//!
//! Hot swap: each plugin has a [`PluginSlot`] holding an `Arc` of its current version. A call
//! clones that `Arc` when it starts and keeps it to the end, so a swap (one pointer store under
//! a lock) sends new calls to the new version while calls in flight finish on the old one,
//! which is freed when the last of them ends. A new version must pass its self-check before
//! it is swapped in; otherwise the old one stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use cm_assignment::StreamedCommand;
use cm_site::{CommandReport, InterpreterError};
use serde::{Deserialize, Serialize};

use crate::error::{InstallError, PluginError};
use crate::manifest::{PluginManifest, World};
use crate::plugin::{BalancerAction, InterpreterSession, LoadedPlugin, ServerState};
use crate::runtime::PluginRuntime;

/// The live version of one plugin.
pub struct PluginSlot {
    current: RwLock<Arc<LoadedPlugin>>,
    /// Set while the plugin is uninstalled: handles refuse new calls until it is installed
    /// again (then they follow the new version, like after any swap).
    removed: AtomicBool,
}

impl PluginSlot {
    pub fn new(plugin: Arc<LoadedPlugin>) -> Arc<Self> {
        Arc::new(PluginSlot { current: RwLock::new(plugin), removed: AtomicBool::new(false) })
    }

    /// The version new calls go to (the last one, even if the plugin has been removed since).
    pub fn current(&self) -> Arc<LoadedPlugin> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The version a new call goes to, or `NotInstalled` once the plugin has been removed.
    pub fn live(&self) -> Result<Arc<LoadedPlugin>, PluginError> {
        let current = self.current();
        if self.removed.load(Ordering::Acquire) {
            return Err(PluginError::NotInstalled { plugin: current.name().into() });
        }
        Ok(current)
    }

    /// Make `plugin` current (and the slot live again if it was removed); returns the
    /// version it replaced.
    pub fn swap(&self, plugin: Arc<LoadedPlugin>) -> Arc<LoadedPlugin> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        self.removed.store(false, Ordering::Release);
        std::mem::replace(&mut *current, plugin)
    }

    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

/// `<name>/state.toml`: the commit record of an install or rollback (written last).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct VersionState {
    pub current: String,
    #[serde(default)]
    pub previous: Vec<String>,
    /// BLAKE3 of the `manifest.toml` this version was installed with, so a follower that
    /// reads a new manifest with an old state (an install half way) waits for the state.
    /// Empty in stores written before followers existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest: String,
    /// For each installed version, the BLAKE3 of the manifest it was installed with, so a
    /// rollback brings back the grants and limits that version ran with. Absent for versions
    /// installed before manifests were kept per version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub manifests: BTreeMap<String, String>,
}

/// What `install` did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub name: String,
    pub world: World,
    pub version: String,
    /// The version it replaced (hot swap), if any.
    pub replaced: Option<String>,
}

/// One row of `list`.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    pub world: World,
    pub version: String,
    pub size: u64,
    /// Earlier versions, most recent last (what `rollback` restores).
    pub previous: Vec<String>,
}

/// Installed plugins and their live versions.
pub struct PluginStore {
    runtime: PluginRuntime,
    pub(crate) dir: PathBuf,
    /// Every plugin this store has held; a removed one stays (marked) so handles on it
    /// refuse calls, and come back to life if it is installed again.
    pub(crate) slots: RwLock<BTreeMap<String, Arc<PluginSlot>>>,
    /// Serialises install/rollback/remove and following the disk (calls never wait on it).
    pub(crate) admin: std::sync::Mutex<()>,
    /// What following the disk refused, per plugin (see `follow.rs`).
    pub(crate) refused: std::sync::Mutex<BTreeMap<String, crate::follow::Refusal>>,
    /// Sites a plugin's every version must be granted ([`PluginStore::require_sites`]).
    required_sites: RwLock<BTreeMap<String, Vec<String>>>,
}

pub(crate) fn store_error(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Store { path: path.into(), source }
}

/// Write `bytes` to `path` atomically (temp file + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temp, bytes).map_err(store_error(&temp))?;
    std::fs::rename(&temp, path).map_err(store_error(path))
}

impl PluginStore {
    /// Open (creating it if needed) the store in `dir` and load every installed plugin's
    /// current version. A plugin that no longer loads is skipped with a warning, not fatal.
    pub fn open(runtime: PluginRuntime, dir: &Path) -> Result<Self, InstallError> {
        std::fs::create_dir_all(dir).map_err(store_error(dir))?;
        let store = PluginStore {
            runtime,
            dir: dir.into(),
            slots: RwLock::new(BTreeMap::new()),
            admin: Default::default(),
            refused: Default::default(),
            required_sites: Default::default(),
        };
        for entry in std::fs::read_dir(dir).map_err(store_error(dir))? {
            let entry = entry.map_err(store_error(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "compiled" || !entry.path().join("state.toml").exists() {
                continue;
            }
            match store.load_version(&name, None) {
                Ok(plugin) => {
                    store
                        .slots
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name, PluginSlot::new(plugin));
                }
                Err(e) => tracing::warn!("plugin store {}: skipping `{name}`: {e}", dir.display()),
            }
        }
        Ok(store)
    }

    /// Every version of `plugin` installed, rolled back to or followed from now on must be
    /// granted `sites` (an agent applies those sites with it): one that is not is refused
    /// then, not at the next publish.
    pub fn require_sites(&self, plugin: &str, sites: &[&str]) {
        self.required_sites
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(plugin.into(), sites.iter().map(|s| s.to_string()).collect());
    }

    /// Refuse a version whose manifest drops a site this store requires of it.
    pub(crate) fn check_required_sites(&self, plugin: &LoadedPlugin) -> Result<(), InstallError> {
        let required = self.required_sites.read().unwrap_or_else(|e| e.into_inner());
        let manifest = plugin.manifest();
        let missing = required.get(plugin.name()).into_iter().flatten().find(|site| {
            manifest.world() == Some(World::Interpreter) && !manifest.grants_site(site)
        });
        match missing {
            Some(site) => Err(InstallError::SiteRequired {
                manifest: manifest.origin_or("its manifest").into(),
                plugin: plugin.name().into(),
                site: site.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The live version of `name`, if any (what a refused change keeps).
    pub(crate) fn live_version(&self, name: &str) -> Option<String> {
        self.slot(name).ok().map(|slot| slot.current().version())
    }

    /// Refused installs and rollbacks say what stays live.
    fn self_check_error(&self, name: &str, source: PluginError) -> InstallError {
        InstallError::SelfCheck {
            plugin: name.into(),
            kept: self.live_version(name),
            source: Box::new(source),
        }
    }

    /// The default compiled-cache directory of a store in `dir`.
    pub fn compiled_cache_dir(dir: &Path) -> PathBuf {
        dir.join("compiled")
    }

    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    pub(crate) fn plugin_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(crate) fn read_state(&self, name: &str) -> Result<VersionState, InstallError> {
        let path = self.plugin_dir(name).join("state.toml");
        let text = std::fs::read_to_string(&path).map_err(store_error(&path))?;
        toml::from_str(&text).map_err(|e| InstallError::Manifest {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn write_state(&self, name: &str, state: &VersionState) -> Result<(), InstallError> {
        let text = toml::to_string(state).expect("state serializes");
        write_atomic(&self.plugin_dir(name).join("state.toml"), text.as_bytes())
    }

    /// Load `name`'s version `hash` (its current one if `None`) with its stored manifest.
    fn load_version(
        &self,
        name: &str,
        hash: Option<&str>,
    ) -> Result<Arc<LoadedPlugin>, InstallError> {
        let state = self.read_state(name)?;
        let hash = hash.unwrap_or(&state.current);
        let (manifest, _) = self.version_manifest(name, &state, hash)?;
        self.load_component(name, hash, manifest)
    }

    /// The manifest version `hash` of `name` was installed with, and that manifest's text.
    ///
    /// Stores written before manifests were kept per version only have `manifest.toml`; it is
    /// used when the state does not say otherwise, and refused when its hash is not the one
    /// the state recorded (an install that stopped half way overwrote it).
    fn version_manifest(
        &self,
        name: &str,
        state: &VersionState,
        hash: &str,
    ) -> Result<(PluginManifest, Vec<u8>), InstallError> {
        let dir = self.plugin_dir(name);
        let recorded = state
            .manifests
            .get(hash)
            .or((hash == state.current).then_some(&state.manifest))
            .filter(|m| !m.is_empty());
        let path = match recorded {
            Some(m) if dir.join(format!("manifest-{m}.toml")).exists() => {
                dir.join(format!("manifest-{m}.toml"))
            }
            _ => dir.join("manifest.toml"),
        };
        let text = std::fs::read(&path).map_err(store_error(&path))?;
        if let Some(m) = recorded
            && blake3::hash(&text).to_hex().as_str() != m
        {
            return Err(InstallError::Manifest {
                path: path.display().to_string(),
                reason: format!(
                    "is not the manifest version {} was installed with (an install stopped half way?)",
                    &hash[..12.min(hash.len())]
                ),
            });
        }
        let manifest =
            PluginManifest::parse(&String::from_utf8_lossy(&text), &path.display().to_string())?;
        Ok((manifest, text))
    }

    /// Load `<name>/<hash>.wasm` with `manifest`.
    pub(crate) fn load_component(
        &self,
        name: &str,
        hash: &str,
        manifest: PluginManifest,
    ) -> Result<Arc<LoadedPlugin>, InstallError> {
        let path = self.plugin_dir(name).join(format!("{hash}.wasm"));
        let bytes = std::fs::read(&path).map_err(store_error(&path))?;
        LoadedPlugin::load(&self.runtime, &bytes, manifest, &path.display().to_string())
    }

    /// Install `component` under `manifest.name`, hot-swapping any installed version. The
    /// component is validated and self-checked first; on any failure nothing changes.
    pub fn install(
        &self,
        component: &[u8],
        manifest: PluginManifest,
        file: &str,
    ) -> Result<Installed, InstallError> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let name = manifest.name.clone();
        let plugin = LoadedPlugin::load(&self.runtime, component, manifest.clone(), file)?;
        self.check_required_sites(&plugin)?;
        plugin.self_check().map_err(|source| self.self_check_error(&name, source))?;
        let hash = plugin.hash().to_hex().to_string();
        let dir = self.plugin_dir(&name);
        std::fs::create_dir_all(&dir).map_err(store_error(&dir))?;
        write_atomic(&dir.join(format!("{hash}.wasm")), component)?;
        let manifest_text = manifest.to_toml();
        let manifest_hash = blake3::hash(manifest_text.as_bytes()).to_hex().to_string();
        write_atomic(
            &dir.join(format!("manifest-{manifest_hash}.toml")),
            manifest_text.as_bytes(),
        )?;
        write_atomic(&dir.join("manifest.toml"), manifest_text.as_bytes())?;
        let mut state = self.read_state(&name).unwrap_or_default();
        state.manifests.insert(hash.clone(), manifest_hash.clone());
        state.manifest = manifest_hash;
        let replaced =
            (!state.current.is_empty() && state.current != hash).then(|| state.current.clone());
        if let Some(old) = &replaced {
            state.previous.retain(|h| h != old && h != &hash);
            state.previous.push(old.clone());
        }
        state.current = hash;
        self.write_state(&name, &state)?;
        let world = plugin.world();
        let version = plugin.version();
        self.swap_in(&name, plugin);
        tracing::info!(plugin = %name, %version, replaced = ?replaced, "installed plugin");
        Ok(Installed { name, world, version, replaced: replaced.map(|h| h[..12].to_string()) })
    }

    pub(crate) fn swap_in(&self, name: &str, plugin: Arc<LoadedPlugin>) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        match slots.get(name) {
            Some(slot) => {
                slot.swap(plugin);
            }
            None => {
                slots.insert(name.to_string(), PluginSlot::new(plugin));
            }
        }
    }

    /// Restore the version installed before the current one (hot swap, self-checked).
    pub fn rollback(&self, name: &str) -> Result<Installed, InstallError> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = self
            .read_state(name)
            .map_err(|_| InstallError::NotInstalled { plugin: name.into() })?;
        let previous =
            state.previous.pop().ok_or_else(|| InstallError::NoPrevious { plugin: name.into() })?;
        // The previous version comes back with the manifest it was installed with.
        let (manifest, manifest_text) = self.version_manifest(name, &state, &previous)?;
        let plugin = self.load_component(name, &previous, manifest)?;
        self.check_required_sites(&plugin)?;
        plugin.self_check().map_err(|source| self.self_check_error(name, source))?;
        let replaced = std::mem::replace(&mut state.current, previous);
        write_atomic(&self.plugin_dir(name).join("manifest.toml"), &manifest_text)?;
        state.manifest = blake3::hash(&manifest_text).to_hex().to_string();
        self.write_state(name, &state)?;
        let (world, version) = (plugin.world(), plugin.version());
        self.swap_in(name, plugin);
        tracing::info!(plugin = %name, %version, "rolled back plugin");
        Ok(Installed {
            name: name.into(),
            world,
            version,
            replaced: Some(replaced[..12].to_string()),
        })
    }

    /// Uninstall `name`: new calls fail with `NotInstalled`; calls in flight finish.
    pub fn remove(&self, name: &str) -> Result<(), InstallError> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.plugin_dir(name);
        let state = dir.join("state.toml");
        if !state.exists() {
            return Err(InstallError::NotInstalled { plugin: name.into() });
        }
        if let Some(slot) = self.slots.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            slot.mark_removed();
        }
        // The state file first: a follower never sees a half-removed plugin as installed.
        std::fs::remove_file(&state).map_err(store_error(&state))?;
        std::fs::remove_dir_all(&dir).map_err(store_error(&dir))
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter(|(_, slot)| !slot.is_removed())
            .map(|(name, slot)| {
                let current = slot.current();
                let previous = self.read_state(name).map(|s| s.previous).unwrap_or_default();
                PluginInfo {
                    name: name.clone(),
                    world: current.world(),
                    version: current.version(),
                    size: current.size(),
                    previous: previous.iter().map(|h| h[..12.min(h.len())].to_string()).collect(),
                }
            })
            .collect()
    }

    /// The slot of `name` (its live version).
    pub fn slot(&self, name: &str) -> Result<Arc<PluginSlot>, PluginError> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .filter(|slot| !slot.is_removed())
            .cloned()
            .ok_or_else(|| PluginError::NotInstalled { plugin: name.into() })
    }

    /// A handle on interpreter `name` for `site` (checks the world and the site grant).
    pub fn interpreter(&self, name: &str, site: &str) -> Result<Interpreter, PluginError> {
        Interpreter::new(self.slot(name)?, site)
    }

    /// A handle on cache-invalidator `name`.
    pub fn cache_invalidator(&self, name: &str) -> Result<CacheInvalidator, PluginError> {
        let slot = self.slot(name)?;
        expect_world(&slot, World::CacheInvalidator)?;
        Ok(CacheInvalidator { slot })
    }

    /// A handle on load-balancer `name`.
    pub fn load_balancer(&self, name: &str) -> Result<LoadBalancer, PluginError> {
        let slot = self.slot(name)?;
        expect_world(&slot, World::LoadBalancer)?;
        Ok(LoadBalancer { slot })
    }
}

fn expect_world(slot: &PluginSlot, world: World) -> Result<(), PluginError> {
    let current = slot.current();
    if current.world() != world {
        return Err(PluginError::WrongWorld {
            plugin: current.name().into(),
            expected: world.name(),
            found: current.world().name().into(),
        });
    }
    Ok(())
}

/// A content interpreter for one site. Every call goes to the plugin's current version.
/// Calls block: from async code, run them on a blocking thread.
#[derive(Clone)]
pub struct Interpreter {
    slot: Arc<PluginSlot>,
    site: String,
}

impl Interpreter {
    /// A handle on `slot`'s plugin for `site`; it must be an interpreter granted that site.
    pub fn new(slot: Arc<PluginSlot>, site: &str) -> Result<Self, PluginError> {
        expect_world(&slot, World::Interpreter)?;
        let current = slot.current();
        if !current.manifest().grants_site(site) {
            return Err(PluginError::SiteNotGranted {
                plugin: current.name().into(),
                site: site.into(),
            });
        }
        Ok(Interpreter { slot, site: site.into() })
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// The version new calls go to.
    pub fn plugin(&self) -> Arc<LoadedPlugin> {
        self.slot.current()
    }

    /// A session on `staging_root` pinned to the current version (for a stream of batches).
    pub fn session(&self, staging_root: &Path) -> Result<InterpreterSession, PluginError> {
        self.session_on(Some(staging_root))
    }

    fn session_on(&self, staging_root: Option<&Path>) -> Result<InterpreterSession, PluginError> {
        let plugin = self.slot.live()?;
        // The grant is re-checked per call: a hot swap may bring a manifest with other grants.
        if !plugin.manifest().grants_site(&self.site) {
            return Err(PluginError::SiteNotGranted {
                plugin: plugin.name().into(),
                site: self.site.clone(),
            });
        }
        plugin.session_on(staging_root)
    }

    /// Apply one batch of commands to the staging tree at `staging_root`.
    pub fn apply(
        &self,
        staging_root: &Path,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, PluginError> {
        self.session(staging_root)?.apply(batch)
    }

    /// The plugin's `commit` hook for release `serial`; a veto is [`PluginError::Vetoed`].
    /// The hook gets no staging tree (use [`Interpreter::commit_in`] to grant one).
    pub fn commit(&self, serial: u64) -> Result<(), PluginError> {
        self.session_on(None)?.commit(serial)
    }

    /// The plugin's `rollback` hook for release `serial`, without a staging tree.
    pub fn rollback(&self, serial: u64) -> Result<(), PluginError> {
        self.session_on(None)?.rollback(serial)
    }

    /// The `commit` hook with the release's tree (at `release_root`) as its staging tree.
    pub fn commit_in(&self, release_root: &Path, serial: u64) -> Result<(), PluginError> {
        self.session(release_root)?.commit(serial)
    }

    /// The `rollback` hook with the release's tree as its staging tree.
    pub fn rollback_in(&self, release_root: &Path, serial: u64) -> Result<(), PluginError> {
        self.session(release_root)?.rollback(serial)
    }
}

/// The WebAssembly interpreter as a site's: each batch goes to the plugin's current version (a
/// fresh sandboxed instance per call, with the manifest's deadline and memory cap, confined to
/// the staging tree by its capability). The [`PluginError`] is the
/// [`InterpreterError::Failed`] cause.
impl cm_site::Interpreter for Interpreter {
    fn apply(
        &mut self,
        staging_root: &Path,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, InterpreterError> {
        Ok(Interpreter::apply(self, staging_root, batch)?)
    }

    fn commit(&mut self, serial: u64) -> Result<(), InterpreterError> {
        Ok(Interpreter::commit(self, serial)?)
    }

    fn rollback(&mut self, serial: u64) -> Result<(), InterpreterError> {
        Ok(Interpreter::rollback(self, serial)?)
    }
}

impl From<PluginError> for InterpreterError {
    fn from(e: PluginError) -> Self {
        InterpreterError::failed(e)
    }
}

/// A cache invalidator; every call goes to the plugin's current version.
#[derive(Clone)]
pub struct CacheInvalidator {
    slot: Arc<PluginSlot>,
}

impl CacheInvalidator {
    pub fn invalidate(&self, site: &str, paths: &[String]) -> Result<(), PluginError> {
        self.slot.live()?.invalidate(site, paths)
    }

    pub fn purge_site(&self, site: &str) -> Result<(), PluginError> {
        self.slot.live()?.purge_site(site)
    }
}

/// Load-balancer hooks; every call goes to the plugin's current version.
#[derive(Clone)]
pub struct LoadBalancer {
    slot: Arc<PluginSlot>,
}

impl LoadBalancer {
    pub fn drain(&self, server: &str) -> Result<(), PluginError> {
        self.slot.live()?.balance(BalancerAction::Drain(server)).map(drop)
    }

    pub fn undrain(&self, server: &str) -> Result<(), PluginError> {
        self.slot.live()?.balance(BalancerAction::Undrain(server)).map(drop)
    }

    pub fn add(&self, server: &str, address: &str) -> Result<(), PluginError> {
        self.slot.live()?.balance(BalancerAction::Add { server, address }).map(drop)
    }

    pub fn remove(&self, server: &str) -> Result<(), PluginError> {
        self.slot.live()?.balance(BalancerAction::Remove(server)).map(drop)
    }

    pub fn state(&self, server: &str) -> Result<ServerState, PluginError> {
        let state = self.slot.live()?.balance(BalancerAction::State(server))?;
        Ok(state.expect("`state` always yields a state"))
    }

    pub fn route_paths(&self, pool: &str, paths: &[String]) -> Result<(), PluginError> {
        self.slot.live()?.route_paths(pool, paths)
    }

    pub fn path_rates(&self) -> Result<Vec<crate::PathRate>, PluginError> {
        self.slot.live()?.path_rates()
    }

    pub fn sessions(&self, server: &str) -> Result<u32, PluginError> {
        self.slot.live()?.sessions(server)
    }
}
