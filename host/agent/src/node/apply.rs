//! A server applies what it received: one assignment per run, to the site its header names
//! ([`super::sites`]), through that site's WebAssembly interpreter plugin (cm-site +
//! cm-plugin-host), exactly once per run. Applies to one site are serialised; two sites' runs
//! apply side by side.
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
use cm_site::SiteConfig;
use serde::{Deserialize, Serialize};

use super::AgentError;
use super::sites::{ServedSite, SiteSpec, open_sites, site_of};

/// The name the agent installs (and looks up) its content interpreter under, unless a site
/// names another.
pub const INTERPRETER: &str = super::sites::DEFAULT_PLUGIN;

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
    /// The site the assignment named, whose root it went to (`live` is that site's); empty
    /// when its header could not be read.
    #[serde(default)]
    pub site: String,
}

/// One served site as `cmover agent status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteState {
    pub name: String,
    pub root: PathBuf,
    pub plugin: String,
    pub live: Option<u64>,
    /// The plugin's version new applies go to (short hash), if it is installed.
    pub interpreter: Option<String>,
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

/// Whether the assignment at `file` is a plugin run (an unreadable one goes on to the site,
/// which reports why).
fn is_plugin_run(file: &Path) -> bool {
    cm_assignment::AssignmentReader::open(file)
        .is_ok_and(|r| r.header().kind == cm_assignment::AssignmentType::Plugin)
}

/// How many outcomes `cmover agent status` shows.
const RECENT: usize = 16;

/// Applies runs to the sites this server serves, each to the site its header names,
/// serialised per site, journalled.
pub struct Applier {
    /// In configuration order; the first is what the single-site status fields show.
    sites: Vec<ServedSite>,
    /// What the site checks (seal, signature, cipher): the GL checks the same before relaying.
    checks: SiteConfig,
    /// One journal for every site: run ids are the manager's, unique across sites.
    journal: PathBuf,
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
    /// Opens the sites (checked with [`super::sites::check_sites`] by the caller) and the
    /// plugin store; a plugin a site names that the store lacks gets `default_interpreter`
    /// (granted the sites that name it), so a fresh server needs nothing but the binary.
    pub fn open(
        sites: &[SiteSpec],
        store_dir: &Path,
        default_interpreter: &[u8],
        state_dir: &Path,
        checks: SiteConfig,
    ) -> Result<Applier, AgentError> {
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
        let sites = open_sites(sites, &store, store_dir, default_interpreter, &checks)?;
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
            sites,
            checks,
            journal,
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

    /// The manager keys this server pins (`None`: signatures are not checked).
    pub fn signers(&self) -> Option<&cm_assignment::TrustedKeys> {
        self.checks.signers.as_ref()
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

    /// The first site's (the only one's, mostly).
    fn first(&self) -> &ServedSite {
        &self.sites[0]
    }

    fn served(&self, name: &str) -> Option<&ServedSite> {
        self.sites.iter().find(|s| s.spec.name == name)
    }

    /// The first site's live release.
    pub fn live(&self) -> Option<u64> {
        Self::live_of(self.first())
    }

    fn live_of(s: &ServedSite) -> Option<u64> {
        s.site.status().ok().and_then(|s| s.current)
    }

    /// Every served site: name, root, plugin, live release, interpreter version.
    pub fn sites(&self) -> Vec<SiteState> {
        self.sites
            .iter()
            .map(|s| SiteState {
                name: s.spec.name.clone(),
                root: s.spec.root.clone(),
                plugin: s.spec.plugin.clone(),
                live: Self::live_of(s),
                interpreter: self.version_of(&s.spec.plugin),
            })
            .collect()
    }

    fn version_of(&self, plugin: &str) -> Option<String> {
        self.plugins.store().slot(plugin).ok().and_then(|s| s.live().ok()).map(|p| p.version())
    }

    /// The first site's interpreter version new applies go to (short hash), if installed.
    pub fn interpreter_version(&self) -> Option<String> {
        self.version_of(&self.first().spec.plugin)
    }

    /// The first site's interpreter, as the member state reports it (name, version, hash).
    pub fn plugin_identity(&self) -> Option<cm_tree::member_state::PluginIdentity> {
        let name = &self.first().spec.plugin;
        let p = self.plugins.store().slot(name).ok()?.live().ok()?;
        Some(cm_tree::member_state::PluginIdentity {
            name: name.clone(),
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

    /// The first site's root.
    pub fn site_root(&self) -> &Path {
        self.first().site.root()
    }

    /// Applies run `run`'s assignment at `file` (blocking: call from a blocking thread) to the
    /// site its header names. A run applied before answers with its journalled outcome and
    /// touches nothing; an assignment for a site this server does not serve is refused
    /// (reported, never applied, not journalled).
    pub fn apply(&self, run: u64, file: &Path) -> Applied {
        let refused = |site: String, live, why: String| {
            tracing::warn!(run, site, "refused: {why}");
            let a = Applied {
                run,
                error: Some(why),
                live,
                summary: String::new(),
                at_ms: now_ms(),
                interpreter: None,
                prepared: None,
                site,
            };
            self.remember(&a);
            a
        };
        let name = match site_of(file) {
            Ok(name) => name,
            Err(why) => return refused(String::new(), None, why),
        };
        let Some(served) = self.served(&name) else {
            let serving: Vec<&str> = self.sites.iter().map(|s| s.spec.name.as_str()).collect();
            let why = format!(
                "the assignment is for site {name}, which this server does not serve (it serves {})",
                serving.join(", ")
            );
            return refused(name, None, why);
        };
        let _one = served.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.aborted.lock().unwrap_or_else(|p| p.into_inner()).contains(&run) {
            return Applied {
                run,
                error: Some(format!("run {run} was aborted by the manager; not applied")),
                live: Self::live_of(served),
                summary: String::new(),
                at_ms: now_ms(),
                interpreter: None,
                prepared: None,
                site: name,
            };
        }
        if let Some(done) = self.journalled(run) {
            return done;
        }
        if is_plugin_run(file) {
            return self.install_plugin(run, file, served);
        }
        let mut interp = served.interpreter.clone();
        let version = self.version_of(&served.spec.plugin);
        let started = std::time::Instant::now();
        let applied = served.site.apply(file, &mut interp);
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
                    live: Self::live_of(served),
                    summary: what,
                    at_ms: now_ms(),
                    interpreter: version,
                    prepared: rep.now_live.is_none().then_some(rep.serial),
                    site: name.clone(),
                }
            }
            Err(e) => Applied {
                run,
                error: Some(e.to_string()),
                live: Self::live_of(served),
                summary: String::new(),
                at_ms: now_ms(),
                interpreter: version,
                prepared: None,
                site: name.clone(),
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
                tracing::info!(run, site = %name, summary = %outcome.summary, interpreter = ?outcome.interpreter, "applied")
            }
            Some(e) => {
                tracing::warn!(run, site = %name, error = %e, "apply failed; live unchanged")
            }
        }
        self.remember(&outcome);
        outcome
    }

    /// A plugin run ([`super::plugin_run`]): installed into the store, or refused with why;
    /// journalled like an apply when installed. `live` is the site's, untouched.
    fn install_plugin(&self, run: u64, file: &Path, served: &ServedSite) -> Applied {
        let started = std::time::Instant::now();
        let serials = self.journal.join("newest-plugin-run");
        let store = self.plugins.store();
        let result = super::plugin_run::install(file, &self.checks, store, &self.sites, &serials);
        crate::metrics::applied("plugin", result.is_ok(), started.elapsed());
        let (summary, error) = match result {
            Ok(line) => (line, None),
            Err(why) => (String::new(), Some(why)),
        };
        let outcome = Applied {
            run,
            error,
            live: Self::live_of(served),
            summary,
            at_ms: now_ms(),
            interpreter: self.version_of(&served.spec.plugin),
            prepared: None,
            site: served.spec.name.clone(),
        };
        match &outcome.error {
            None => {
                tracing::info!(run, summary = %outcome.summary, "plugin run installed");
                if let Err(e) = self.write_journal(&outcome) {
                    tracing::error!(run, "journalling the plugin run: {e}");
                }
            }
            Some(e) => {
                tracing::warn!(run, error = %e, "plugin run refused; the live version stays")
            }
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
        // The journal names the site the run went to; an apply in flight is not journalled
        // yet, so every site's lock is taken in turn (in one order: no deadlock) until found.
        let mut done = None;
        let mut held = None;
        for (i, served) in self.sites.iter().enumerate() {
            let one = served.lock.lock().unwrap_or_else(|p| p.into_inner());
            // Journals written before sites were named are the first (then only) site's.
            let ours = |d: &Applied| d.site == served.spec.name || (d.site.is_empty() && i == 0);
            if let Some(d) = self.journalled(run).filter(ours) {
                done = Some(d);
                held = Some((served, one));
                break;
            }
        }
        let (Some(done), Some((served, _one))) = (done, held) else { return Ok(None) };
        let _ = std::fs::remove_file(self.journal_path(run));
        let Some(serial) = done.prepared else { return Ok(None) };
        let removed = served.site.discard_prepared(serial)?;
        let summary = format!("run aborted by the manager: prepared release {serial} discarded");
        tracing::info!(run, serial, removed, "{summary}");
        self.remember(&Applied {
            run,
            error: Some(summary.clone()),
            live: Self::live_of(served),
            summary,
            at_ms: now_ms(),
            interpreter: done.interpreter,
            prepared: None,
            site: done.site,
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
