//! Following the plugin store on disk from a long-running process.
//!
//! `cmover plugin install|rollback|remove` change the store's files from another process; an
//! agent that opened the same store keeps calling what it loaded until it is told. A
//! [`StoreFollower`] re-reads every plugin's commit record (`<name>/state.toml`, written last
//! by install and rollback) a few times a second, and when it names another version (or the
//! manifest changed) it loads that version, runs its self-check and only then hot-swaps it
//! into the plugin's slot — the same swap as an in-process install, so calls in flight finish
//! on the old version and no call fails. A version that does not load or fails its
//! self-check here is refused: the live version stays, the refusal is reported once (and
//! kept for [`PluginStore::refusal`]), and it is retried only when the files change again.
//!
//! Polling rather than inotify: a handful of small reads every 250 ms costs nothing, works on
//! every filesystem (NFS, overlay) and needs no extra dependency.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{InstallError, PluginError};
use crate::manifest::PluginManifest;
use crate::runtime::{PluginRuntime, RuntimeConfig};
use crate::store::{
    CacheInvalidator, Interpreter, LoadBalancer, PluginStore, VersionState, store_error,
};

/// A change the follower made to the live plugins (or refused to make).
#[derive(Debug, Clone)]
pub enum StoreEvent {
    /// A plugin installed by another process is now live.
    Added { name: String, version: String },
    /// Another process installed or rolled back a version: new calls go to `to`.
    Swapped { name: String, from: String, to: String },
    /// The plugin was removed: new calls fail with `NotInstalled`.
    Removed { name: String },
    /// The version on disk (`version`, short hash) did not load or failed its self-check
    /// here; `kept` (if any) stays live.
    Refused { name: String, version: String, kept: Option<String>, error: Arc<InstallError> },
    /// The store directory itself could not be read.
    Unreadable { error: Arc<InstallError> },
}

impl std::fmt::Display for StoreEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreEvent::Added { name, version } => {
                write!(f, "plugin `{name}`: {version} installed")
            }
            StoreEvent::Swapped { name, from, to } => {
                write!(f, "plugin `{name}`: {to} replaces {from}")
            }
            StoreEvent::Removed { name } => write!(f, "plugin `{name}`: removed"),
            StoreEvent::Refused { name, version, kept: Some(kept), error } => {
                write!(f, "plugin `{name}`: refused {version}, keeping {kept}: {error}")
            }
            StoreEvent::Refused { name, version, kept: None, error } => {
                write!(f, "plugin `{name}`: refused {version}: {error}")
            }
            StoreEvent::Unreadable { error } => write!(f, "plugin store unreadable: {error}"),
        }
    }
}

/// A refused on-disk state, remembered so it is reported once and retried only when the
/// files change.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// BLAKE3 of the state and manifest files that were refused.
    files: blake3::Hash,
    event: StoreEvent,
}

/// What the disk says one plugin should be.
struct OnDisk {
    state: VersionState,
    manifest: PluginManifest,
    files: blake3::Hash,
}

fn short(hash: &str) -> String {
    hash[..12.min(hash.len())].to_string()
}

impl PluginStore {
    /// Bring the live plugins in line with the store's files (what other processes
    /// installed, rolled back or removed), validating and self-checking every new version
    /// first. Returns what changed. [`StoreFollower`] calls this periodically.
    pub fn sync_from_disk(&self) -> Vec<StoreEvent> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let installed = match self.installed_names() {
            Ok(names) => names,
            Err(error) => return vec![StoreEvent::Unreadable { error: Arc::new(error) }],
        };
        let mut events = Vec::new();
        let live: Vec<String> = {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            slots
                .iter()
                .filter(|(_, slot)| !slot.is_removed())
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in live.iter().filter(|name| !installed.contains(*name)) {
            if let Some(slot) = self.slots.read().unwrap_or_else(|e| e.into_inner()).get(name) {
                slot.mark_removed();
            }
            self.refused_map().remove(name);
            events.push(StoreEvent::Removed { name: name.clone() });
        }
        for name in &installed {
            if let Some(event) = self.sync_one(name) {
                events.push(event);
            }
        }
        events
    }

    /// The last refusal of `name`'s on-disk version that still stands (the files have not
    /// changed since), if any.
    pub fn refusal(&self, name: &str) -> Option<StoreEvent> {
        self.refused_map().get(name).map(|r| r.event.clone())
    }

    fn refused_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Refusal>> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plugins whose commit record exists.
    fn installed_names(&self) -> Result<BTreeSet<String>, InstallError> {
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir).map_err(store_error(&self.dir))? {
            let entry = entry.map_err(store_error(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "compiled" && entry.path().join("state.toml").exists() {
                names.insert(name);
            }
        }
        Ok(names)
    }

    /// Read `name`'s state and manifest; `None` while an install is half way (the manifest
    /// is newer than the state) or the plugin vanished under us.
    fn read_on_disk(&self, name: &str) -> Result<Option<OnDisk>, InstallError> {
        let dir = self.plugin_dir(name);
        let (state_path, manifest_path) = (dir.join("state.toml"), dir.join("manifest.toml"));
        let read = |path: &Path| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_error(path)(e)),
        };
        let (Some(state_bytes), Some(manifest_bytes)) = (read(&state_path)?, read(&manifest_path)?)
        else {
            return Ok(None);
        };
        let mut files = blake3::Hasher::new();
        files
            .update(&(state_bytes.len() as u64).to_le_bytes())
            .update(&state_bytes)
            .update(&manifest_bytes);
        let files = files.finalize();
        let state: VersionState =
            toml::from_str(&String::from_utf8_lossy(&state_bytes)).map_err(|e| {
                InstallError::Manifest {
                    path: state_path.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
        if !state.manifest.is_empty()
            && state.manifest != blake3::hash(&manifest_bytes).to_hex().as_str()
        {
            return Ok(None);
        }
        let manifest = PluginManifest::parse(
            &String::from_utf8_lossy(&manifest_bytes),
            &manifest_path.display().to_string(),
        )?;
        Ok(Some(OnDisk { state, manifest, files }))
    }

    fn sync_one(&self, name: &str) -> Option<StoreEvent> {
        let slot = self.slots.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        let live = slot.as_ref().filter(|slot| !slot.is_removed()).map(|slot| slot.current());
        let kept = live.as_ref().map(|p| p.version());
        let refuse = |version: String, files: Option<blake3::Hash>, error: InstallError| {
            let event = StoreEvent::Refused {
                name: name.into(),
                version,
                kept: kept.clone(),
                error: Arc::new(error),
            };
            let files = files.unwrap_or_else(|| blake3::hash(event.to_string().as_bytes()));
            let mut refused = self.refused_map();
            if refused.get(name).is_some_and(|r| r.files == files) {
                return None;
            }
            refused.insert(name.into(), Refusal { files, event: event.clone() });
            Some(event)
        };
        let disk = match self.read_on_disk(name) {
            Ok(Some(disk)) => disk,
            Ok(None) => return None,
            Err(error) => return refuse("(unreadable)".into(), None, error),
        };
        let up_to_date = live.as_ref().is_some_and(|p| {
            p.hash().to_hex().as_str() == disk.state.current && *p.manifest() == disk.manifest
        });
        if up_to_date {
            self.refused_map().remove(name);
            return None;
        }
        if self.refused_map().get(name).is_some_and(|r| r.files == disk.files) {
            return None;
        }
        let version = short(&disk.state.current);
        let loaded =
            self.load_component(name, &disk.state.current, disk.manifest).and_then(|plugin| {
                self.check_required_sites(&plugin)?;
                plugin.self_check().map_err(|source| InstallError::SelfCheck {
                    plugin: name.into(),
                    kept: kept.clone(),
                    source: Box::new(source),
                })?;
                Ok(plugin)
            });
        match loaded {
            Ok(plugin) => {
                self.refused_map().remove(name);
                let to = plugin.version();
                self.swap_in(name, plugin);
                Some(match live {
                    Some(old) => StoreEvent::Swapped { name: name.into(), from: old.version(), to },
                    None => StoreEvent::Added { name: name.into(), version: to },
                })
            }
            Err(error) => refuse(version, Some(disk.files), error),
        }
    }
}

/// A callback on every change and refusal a [`StoreFollower`] sees.
pub type EventHook = Arc<dyn Fn(&StoreEvent) + Send + Sync>;

/// How a [`StoreFollower`] follows the store.
#[derive(Clone)]
pub struct FollowConfig {
    /// How often the store's files are re-read.
    pub every: Duration,
    /// Called (on the follower's thread) with every change and refusal, besides `tracing`.
    pub on_event: Option<EventHook>,
}

impl Default for FollowConfig {
    fn default() -> Self {
        FollowConfig { every: Duration::from_millis(250), on_event: None }
    }
}

/// A plugin store that follows its directory: what `cmover plugin install|rollback|remove`
/// does from another process reaches this process's handles within about `every`, hot-swapped
/// (validated and self-checked first; a version that fails here is refused and the live one
/// stays). Handles taken from it ([`StoreFollower::interpreter`] and friends) always call the
/// current version. Dropping the follower stops following (the handles keep working).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use cm_plugin_host::StoreFollower;
/// let plugins = StoreFollower::open(std::path::Path::new("/var/lib/cmover/plugins"))?;
/// let interpreter = plugins.interpreter("interpreter", "www")?; // follows every install
/// # let staging = std::path::Path::new("/srv/www/releases/.building-8");
/// let reports = interpreter.apply(staging, Vec::new())?;        // blocking: use spawn_blocking
/// # drop(reports);
/// # Ok(()) }
/// ```
///
/// With a runtime of your own and a callback for the agent's reports:
/// `StoreFollower::start(Arc::new(PluginStore::open(runtime, dir)?), FollowConfig { on_event:
/// Some(Arc::new(|event| ...)), ..Default::default() })`.
pub struct StoreFollower {
    store: Arc<PluginStore>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl StoreFollower {
    /// Open the store in `dir` as `cmover plugin` does (default runtime, compiled cache in
    /// `dir/compiled`) and follow it every 250 ms.
    pub fn open(dir: &Path) -> Result<Self, InstallError> {
        let config = RuntimeConfig {
            compiled_cache: Some(PluginStore::compiled_cache_dir(dir)),
            ..Default::default()
        };
        let store = PluginStore::open(PluginRuntime::new(config)?, dir)?;
        Ok(Self::start(Arc::new(store), FollowConfig::default())?)
    }

    /// Follow `store` on a thread of its own.
    pub fn start(store: Arc<PluginStore>, config: FollowConfig) -> Result<Self, PluginError> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cm-plugin-follow".into())
                .spawn(move || {
                    let (stopped, wake) = &*stop;
                    let mut last_unreadable = None;
                    let mut stopped = stopped.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        stopped = wake
                            .wait_timeout(stopped, config.every)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        if *stopped {
                            return;
                        }
                        drop(stopped);
                        let mut events = store.sync_from_disk();
                        // An unreadable store is reported when it starts (or its reason changes), not every poll.
                        let unreadable = events
                            .iter()
                            .find(|e| matches!(e, StoreEvent::Unreadable { .. }))
                            .map(|e| e.to_string());
                        if unreadable.is_some() && unreadable == last_unreadable {
                            events.clear();
                        }
                        last_unreadable = unreadable;
                        report(&events, &config);
                        stopped = stop.0.lock().unwrap_or_else(|e| e.into_inner());
                    }
                })
                .map_err(|source| PluginError::Io {
                    what: "starting the plugin store follower".into(),
                    source,
                })?
        };
        Ok(StoreFollower { store, stop, thread: Some(thread) })
    }

    /// The followed store (install, list, slots, refusals).
    pub fn store(&self) -> &Arc<PluginStore> {
        &self.store
    }

    /// A handle on interpreter `name` for `site` that follows every swap.
    pub fn interpreter(&self, name: &str, site: &str) -> Result<Interpreter, PluginError> {
        self.store.interpreter(name, site)
    }

    /// A handle on cache-invalidator `name` that follows every swap.
    pub fn cache_invalidator(&self, name: &str) -> Result<CacheInvalidator, PluginError> {
        self.store.cache_invalidator(name)
    }

    /// A handle on load-balancer `name` that follows every swap.
    pub fn load_balancer(&self, name: &str) -> Result<LoadBalancer, PluginError> {
        self.store.load_balancer(name)
    }
}

fn report(events: &[StoreEvent], config: &FollowConfig) {
    for event in events {
        match event {
            StoreEvent::Refused { .. } | StoreEvent::Unreadable { .. } => tracing::warn!("{event}"),
            _ => tracing::info!("{event}"),
        }
        if let Some(on_event) = &config.on_event {
            on_event(event);
        }
    }
}

impl Drop for StoreFollower {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
