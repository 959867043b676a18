//! A server applies what it received: one assignment per run, through the site's WebAssembly
//! interpreter plugin (cm-site + cm-plugin-host), exactly once per run.
//!
//! "Exactly once" matters because a run can arrive twice: a new GL elected mid-job delivers the
//! run again, and a rollback applied twice would roll back twice. So every successful apply is
//! journalled (`<state>/applied/<run>.json`, written atomically before the outcome is reported)
//! and a run already journalled answers with the journalled outcome. A failed apply is not
//! journalled: live is unchanged, and a fresh copy of the run may succeed.
//!
//! The plugin store is followed ([`StoreFollower`]): `cmover plugin install|rollback` into the
//! agent's store from another process hot-swaps the running agent's interpreter (validated and
//! self-checked first; a refused version leaves the live one in place). An apply in flight
//! finishes on the version it started with; each outcome names the version that applied it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use cm_plugin_host::{FollowConfig, PluginRuntime, PluginStore, RuntimeConfig, StoreFollower};
use cm_site::{Site, SiteConfig};
use serde::{Deserialize, Serialize};

use super::AgentError;

/// The name the agent installs (and looks up) its content interpreter under.
pub const INTERPRETER: &str = "interpreter";

/// What one run did on this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub run: u64,
    /// `None`: applied; `Some(reason)`: failed, live unchanged.
    pub error: Option<String>,
    /// The live release afterwards.
    pub live: Option<u64>,
    pub summary: String,
    pub at_ms: u64,
    /// The interpreter version (short hash) live when the apply started.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// The release the run built and left prepared (not live), which an abort discards.
    #[serde(default)]
    pub prepared: Option<u64>,
}

/// The assignment type an apply was about, for the metrics' `kind` label.
fn kind_of(r: &Result<cm_site::ApplyReport, cm_site::SiteError>) -> &'static str {
    use cm_site::SiteError;
    match r {
        Ok(rep) => rep.kind.name(),
        Err(SiteError::Apply { kind, .. } | SiteError::Replay { kind, .. }) => kind.name(),
        Err(_) => "unknown",
    }
}

/// How many outcomes `cmover agent status` shows.
const RECENT: usize = 16;

/// Applies runs to one site, serialised, journalled.
pub struct Applier {
    site: Site,
    /// What the site checks (seal, signature, cipher): the GL checks the same before relaying.
    checks: SiteConfig,
    interpreter: cm_plugin_host::Interpreter,
    journal: PathBuf,
    /// Serialises applies (the member loop and the GL's own apply may race on one run).
    lock: Mutex<()>,
    recent: Mutex<VecDeque<Applied>>,
    /// Follows the store on disk; its slots are what the interpreter handle calls into.
    plugins: StoreFollower,
    /// Runs the manager aborted (signed orders seen): never applied here from now on.
    aborted: Mutex<std::collections::BTreeSet<u64>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Applier {
    /// Opens the site and the plugin store; installs `default_interpreter` (granted `site_name`)
    /// when the store has no interpreter yet, so a fresh server needs nothing but the binary.
    pub fn open(
        site_root: &Path,
        site_name: &str,
        store_dir: &Path,
        default_interpreter: &[u8],
        state_dir: &Path,
        checks: SiteConfig,
    ) -> Result<Applier, AgentError> {
        let site =
            Site::open(site_root, checks.clone()).map_err(|e| AgentError::Site(Box::new(e)))?;
        let runtime = PluginRuntime::new(RuntimeConfig {
            compiled_cache: Some(PluginStore::compiled_cache_dir(store_dir)),
            // One apply at a time: a small pool keeps the address-space reservation small.
            max_instances: 4,
            max_memory_mib: 256,
            ..RuntimeConfig::default()
        })
        .map_err(|source| AgentError::Plugin {
            what: "starting the plugin runtime".into(),
            source: Box::new(source),
        })?;
        let store =
            PluginStore::open(runtime, store_dir).map_err(|source| AgentError::PluginStore {
                what: format!("plugin store {}", store_dir.display()),
                source: Box::new(source),
            })?;
        if store.slot(INTERPRETER).is_err() {
            let manifest = cm_plugin_host::bundled::interpreter_manifest(INTERPRETER, &[site_name]);
            store.install(default_interpreter, manifest, "bundled interpreter.wasm").map_err(
                |source| AgentError::PluginStore {
                    what: format!(
                        "installing the bundled interpreter into {}",
                        store_dir.display()
                    ),
                    source: Box::new(source),
                },
            )?;
            tracing::info!(store = %store_dir.display(), site = site_name, "installed the bundled interpreter plugin");
        }
        let interpreter =
            store.interpreter(INTERPRETER, site_name).map_err(|source| AgentError::Plugin {
                what: format!("interpreter for site {site_name}"),
                source: Box::new(source),
            })?;
        let journal = state_dir.join("applied");
        std::fs::create_dir_all(&journal).map_err(|source| AgentError::Io {
            what: format!("creating {}", journal.display()),
            source,
        })?;
        let plugins =
            StoreFollower::start(Arc::new(store), FollowConfig::default()).map_err(|source| {
                AgentError::Plugin {
                    what: format!("following the plugin store {}", store_dir.display()),
                    source: Box::new(source),
                }
            })?;
        let applier = Applier {
            site,
            checks,
            interpreter,
            journal,
            lock: Mutex::new(()),
            recent: Mutex::new(VecDeque::new()),
            plugins,
            aborted: Mutex::new(Default::default()),
        };
        applier.load_recent();
        Ok(applier)
    }

    fn journal_path(&self, run: u64) -> PathBuf {
        self.journal.join(format!("{run}.json"))
    }

    fn journalled(&self, run: u64) -> Option<Applied> {
        let text = std::fs::read(self.journal_path(run)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn load_recent(&self) {
        let mut all: Vec<Applied> = std::fs::read_dir(&self.journal)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        all.sort_by_key(|a: &Applied| (a.at_ms, a.run));
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.extend(all.into_iter().rev().take(RECENT).rev());
    }

    fn remember(&self, a: &Applied) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|r| r.run != a.run);
        recent.push_back(a.clone());
        while recent.len() > RECENT {
            recent.pop_front();
        }
    }

    /// The latest outcomes, oldest first.
    pub fn recent(&self) -> Vec<Applied> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Checks `file` as the site would before applying it — seal, the manager's signature,
    /// trailer, data hash, every encrypted chunk — without applying anything. A GL runs it
    /// before relaying a run by MCTP, so it never spreads what its members would refuse.
    pub fn check(&self, file: &Path) -> Result<(), cm_assignment::ReadError> {
        let mut r = cm_assignment::AssignmentReader::open(file)?;
        if let Some(k) = &self.checks.cipher {
            r.decrypt_with(k)?;
        }
        r.verify(self.checks.key.as_ref(), self.checks.signers.as_ref())
    }

    /// The site's live release.
    pub fn live(&self) -> Option<u64> {
        self.site.status().ok().and_then(|s| s.current)
    }

    /// The interpreter version new applies go to (short hash), if it is installed.
    pub fn interpreter_version(&self) -> Option<String> {
        self.plugins.store().slot(INTERPRETER).ok().and_then(|s| s.live().ok()).map(|p| p.version())
    }

    /// The interpreter new applies go to, as the member state reports it (name, version, hash).
    pub fn plugin_identity(&self) -> Option<cm_tree::member_state::PluginIdentity> {
        let p = self.plugins.store().slot(INTERPRETER).ok()?.live().ok()?;
        Some(cm_tree::member_state::PluginIdentity {
            name: INTERPRETER.to_string(),
            version: p.version(),
            blake3: p.hash().to_hex().to_string(),
        })
    }

    /// A handle on cache-invalidator `name` of this agent's store (`crate::caches`).
    pub fn cache_invalidator(
        &self,
        name: &str,
    ) -> Result<cm_plugin_host::CacheInvalidator, cm_plugin_host::PluginError> {
        self.plugins.cache_invalidator(name)
    }

    /// Re-reads the plugin store now (SIGHUP) instead of at the follower's next poll.
    pub fn rescan_plugins(&self) -> Vec<cm_plugin_host::StoreEvent> {
        self.plugins.store().sync_from_disk()
    }

    pub fn site_root(&self) -> &Path {
        self.site.root()
    }

    /// Applies run `run`'s assignment at `file` (blocking: call from a blocking thread). A run
    /// applied before answers with its journalled outcome and touches nothing.
    pub fn apply(&self, run: u64, file: &Path) -> Applied {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.aborted.lock().unwrap_or_else(|p| p.into_inner()).contains(&run) {
            return Applied {
                run,
                error: Some(format!("run {run} was aborted by the manager; not applied")),
                live: self.live(),
                summary: String::new(),
                at_ms: now_ms(),
                interpreter: None,
                prepared: None,
            };
        }
        if let Some(done) = self.journalled(run) {
            return done;
        }
        let mut interp = self.interpreter.clone();
        let version = self.interpreter_version();
        let started = std::time::Instant::now();
        let applied = self.site.apply(file, &mut interp);
        crate::metrics::applied(kind_of(&applied), applied.is_ok(), started.elapsed());
        let outcome = match applied {
            Ok(rep) => {
                let what = match (rep.now_live, rep.already_applied) {
                    _ if rep.kind == cm_assignment::AssignmentType::RemoveSite => {
                        format!("{} {}: the site's content removed", rep.kind, rep.serial)
                    }
                    (Some(l), _) => format!("{} {}: live is now release {l}", rep.kind, rep.serial),
                    (None, true) => format!("{} {}: release already built", rep.kind, rep.serial),
                    (None, false) => format!(
                        "{} {}: release built ({} commands, {} bytes written)",
                        rep.kind, rep.serial, rep.commands, rep.bytes_written
                    ),
                };
                Applied {
                    run,
                    error: None,
                    live: self.live(),
                    summary: what,
                    at_ms: now_ms(),
                    interpreter: version,
                    prepared: rep.now_live.is_none().then_some(rep.serial),
                }
            }
            Err(e) => Applied {
                run,
                error: Some(e.to_string()),
                live: self.live(),
                summary: String::new(),
                at_ms: now_ms(),
                interpreter: version,
                prepared: None,
            },
        };
        if outcome.error.is_none()
            && let Err(e) = self.write_journal(&outcome)
        {
            // Still applied; a second delivery of this run would apply again (harmless for a
            // build, which finds its release; a commit finds it live).
            tracing::error!(run, "journalling the apply: {e}");
        }
        match &outcome.error {
            None => {
                tracing::info!(run, summary = %outcome.summary, interpreter = ?outcome.interpreter, "applied")
            }
            Some(e) => tracing::warn!(run, error = %e, "apply failed; live unchanged"),
        }
        self.remember(&outcome);
        outcome
    }

    /// Whether an abort of `run` was seen already.
    pub fn knows_aborted(&self, run: u64) -> bool {
        self.aborted.lock().unwrap_or_else(|p| p.into_inner()).contains(&run)
    }

    /// The manager aborted `run`: it is never applied here from now on, and the release it
    /// prepared here (if any) is removed; live is untouched (a committed release is never
    /// removed: [`cm_site::Site::discard_prepared`]). Blocking (it waits for an apply in
    /// flight). Returns the release removed.
    pub fn abort(&self, run: u64) -> Result<Option<u64>, cm_site::SiteError> {
        self.aborted.lock().unwrap_or_else(|p| p.into_inner()).insert(run);
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(done) = self.journalled(run) else { return Ok(None) };
        let _ = std::fs::remove_file(self.journal_path(run));
        let Some(serial) = done.prepared else { return Ok(None) };
        let removed = self.site.discard_prepared(serial)?;
        let summary = format!("run aborted by the manager: prepared release {serial} discarded");
        tracing::info!(run, serial, removed, "{summary}");
        self.remember(&Applied {
            run,
            error: Some(summary.clone()),
            live: self.live(),
            summary,
            at_ms: now_ms(),
            interpreter: done.interpreter,
            prepared: None,
        });
        Ok(removed.then_some(serial))
    }

    fn write_journal(&self, a: &Applied) -> std::io::Result<()> {
        let path = self.journal_path(a.run);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(a).map_err(std::io::Error::other)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)
    }
}
