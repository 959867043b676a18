//! The server agent (`cmover agent`): what every server runs.
//!
//! - It joins its segment's election (the [`election`](crate::election) driver).
//! - It is always a member ([`member`]): it receives assignments by MCTP on the segment's data
//!   channel, applies each with cm-site through the WebAssembly interpreter plugin
//!   ([`apply`]) to the hosted site its header names ([`sites`]: one agent serves several
//!   sites, each with its own root, releases and plugin), and reports the outcome to its
//!   current GL ([`report`]).
//! - When elected GL it takes up the duties in [`duty`]: the tree endpoint, discovery reports,
//!   and per run: apply here, MCTP to the members, wait for their apply reports, one
//!   consolidated report to the manager. When it loses the leadership it stops them.
//! - It tells its GL which interpreter plugin it runs and how much space its site root's
//!   filesystem has ([`state`], [`space`]); the GL relays both to the manager in its discovery
//!   report.
//!
//! One mapping, written down: **MCTP member id = election node id**, and the server name a GL
//! reports is the member's election registration name. A member learns its GL's HTTP address
//! from the GL's heartbeat payload ([`beacon`], read from `ElectionStatus::leader_payload`).

pub mod abort;
pub mod apply;
pub mod beacon;
pub mod duty;
pub mod member;
mod plugin_run;
pub mod report;
pub mod sites;
pub mod space;
pub mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cm_election::Event;
use cm_tree::http::JsonClient;
use cm_tree::managers::Managers;
use cm_tree::message::MemberApplyReport;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::election::{ElectionHandle, ElectionStatus};
use apply::{Applied, Applier};
use duty::GlDuty;
use report::ReportBoard;

/// Why the agent could not start. Each variant keeps its typed cause (boxed: they are large);
/// `what` names the step and the path or site it was on.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("site: {0}")]
    Site(#[source] Box<cm_site::SiteError>),
    #[error("interpreter plugin: {what}: {source}")]
    Plugin { what: String, source: Box<cm_plugin_host::PluginError> },
    #[error("interpreter plugin: {what}: {source}")]
    PluginStore { what: String, source: Box<cm_plugin_host::InstallError> },
    #[error("agent state: {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("agent state: opening the site: {0}")]
    Opening(#[from] tokio::task::JoinError),
    #[error("sites: {0}")]
    Sites(#[from] sites::SitesError),
    #[error("the election task has stopped")]
    ElectionStopped,
}

/// The segment's data channel (MCTP).
#[derive(Debug, Clone)]
pub struct DataChannel {
    /// Multicast group and port of the segment's MCTP sessions.
    pub channel: SocketAddr,
    /// UDP port on the GL where members send MCTP reports.
    pub report_port: u16,
    /// Interface for multicast (`IP_MULTICAST_IF`) and the GL's report socket.
    pub interface: Ipv4Addr,
    pub ttl: u32,
    /// MCTP payload bytes per frame.
    pub frame_size: u16,
    /// Cap on the GL's sending rate, bytes per second (`None`: MCTP's default cap).
    pub max_rate: Option<u64>,
    /// A member abandons a session that is silent this long (its GL died).
    pub session_timeout: Duration,
}

/// Everything the agent needs beyond its election.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This server's name (its election registration name; what reports call it).
    pub name: String,
    pub segment: String,
    /// Location or time zone reported to the manager.
    pub location: String,
    /// Every manager replica's base URL (`http://host:port`), the first tried first; the
    /// agent follows the active one (`cm_tree::managers`). Empty: a GL reports to no one.
    pub manager_urls: Vec<String>,
    /// The agents' bearer token (manager API, GL endpoints, apply reports).
    pub agent_token: String,
    /// Mutual TLS (this server's agent certificate) for the manager's API, the GL endpoints
    /// and apply reports; `None`: plain HTTP with `agent_token`.
    pub tls: Option<cm_tree::tls::Tls>,
    /// The cluster secret (MCTP datagram authentication).
    pub secret: Vec<u8>,
    /// The manager's public keys (current and next): the GL acts on a notification, and the
    /// site applies an assignment, only when one of them signed it. Empty: nothing is applied.
    pub manager_keys: cm_assignment::TrustedKeys,
    /// When set, only assignments sealed with this key are applied (sealed-only).
    pub seal: Option<cm_assignment::SealKey>,
    /// Decrypts encrypted assignments.
    pub cipher: Option<cm_assignment::CipherKey>,
    /// The hosted sites this server serves (at least one; `[site]` or `[[site]]`): each
    /// assignment goes to the one its header names.
    pub sites: Vec<sites::SiteSpec>,
    pub plugin_store: PathBuf,
    /// Installed at first start under each plugin name a site uses that the store lacks.
    pub default_interpreter: &'static [u8],
    /// Received assignments, the apply journal, the GL's copies.
    pub state_dir: PathBuf,
    pub data: DataChannel,
    /// The GL's tree endpoint (port 0: any).
    pub leader_listen: SocketAddr,
    /// How long a GL waits for its members' apply reports after MCTP delivery.
    pub report_wait: Duration,
    /// A GL re-sends its discovery report at least this often.
    pub discovery_interval: Duration,
    /// How long a newly elected GL lets its members register before it delivers a run (they
    /// register within the election's `registration_spread`, one heartbeat; a run delivered
    /// earlier would miss them). A few heartbeats.
    pub registration_settle: Duration,
    /// The caches in front of this segment's servers, told what a commit changed while this
    /// server leads the segment (`crate::caches`).
    pub caches: Vec<crate::caches::CacheConfig>,
}

/// What the agent parts share.
pub struct Shared {
    pub cfg: AgentConfig,
    pub applier: Arc<Applier>,
    pub board: ReportBoard,
    pub status: watch::Receiver<ElectionStatus>,
    /// The current GL's base URL (this node's own while it leads).
    pub gl_url: watch::Sender<Option<String>>,
    /// This node's GL endpoint while it leads.
    pub serving: watch::Sender<Option<SocketAddr>>,
    pub client: JsonClient,
    /// Every call to the manager (discovery, the GL's tree calls, cache reports) goes through
    /// this one follower of the active replica.
    pub managers: Arc<Managers>,
    /// The segment's data channel carries one MCTP session at a time (a member receives one
    /// session at a time and takes a new announcement for a replacement of the one under way):
    /// a GL delivering two runs at once — two sites' — sends them in turn.
    pub data_channel: tokio::sync::Mutex<()>,
}

/// Applies `run` here (on a blocking thread) and words it as an apply report.
async fn apply_report(shared: &Arc<Shared>, run: u64, file: PathBuf) -> MemberApplyReport {
    let applier = shared.applier.clone();
    let a =
        tokio::task::spawn_blocking(move || applier.apply(run, &file)).await.unwrap_or_else(|e| {
            Applied {
                run,
                error: Some(format!("apply task failed: {e}")),
                live: None,
                summary: String::new(),
                at_ms: 0,
                interpreter: None,
                prepared: None,
                site: String::new(),
            }
        });
    MemberApplyReport {
        server: shared.cfg.name.clone(),
        node: shared.status.borrow().node,
        run,
        error: a.error,
        live: a.live,
        summary: a.summary,
        site: a.site,
    }
}

/// A snapshot for `cmover agent status`.
#[derive(Debug, Clone)]
pub struct AgentStatus {
    pub election: ElectionStatus,
    pub role: &'static str,
    pub gl_url: Option<String>,
    /// This node's GL endpoint while it leads.
    pub serving: Option<SocketAddr>,
    /// The first site's live release, root and interpreter version (the next apply's; it
    /// follows `cmover plugin install`).
    pub live: Option<u64>,
    pub site_root: PathBuf,
    pub interpreter: Option<String>,
    /// Every served site.
    pub sites: Vec<apply::SiteState>,
    pub recent: Vec<Applied>,
}

/// A handle that takes [`AgentStatus`] snapshots of a running agent.
#[derive(Clone)]
pub struct AgentStatusReader(Arc<Shared>);

impl AgentStatusReader {
    pub fn status(&self) -> AgentStatus {
        let shared = &self.0;
        let election = shared.status.borrow().clone();
        AgentStatus {
            role: ServerAgent::role_of(&election),
            gl_url: shared.gl_url.borrow().clone(),
            serving: *shared.serving.borrow(),
            live: shared.applier.live(),
            site_root: shared.applier.site_root().to_path_buf(),
            interpreter: shared.applier.interpreter_version(),
            sites: shared.applier.sites(),
            recent: shared.applier.recent(),
            election,
        }
    }
}

/// A running server agent.
pub struct ServerAgent {
    shared: Arc<Shared>,
    election: Arc<ElectionHandle>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServerAgent {
    /// Opens the site and plugin store (blocking work: the plugin is compiled on first use),
    /// then runs the member side and the role loop on the current runtime.
    pub async fn start(
        cfg: AgentConfig,
        election: ElectionHandle,
    ) -> Result<ServerAgent, AgentError> {
        sites::check_sites(&cfg.sites)?;
        let applier = {
            let c = cfg.clone();
            tokio::task::spawn_blocking(move || {
                Applier::open(
                    &c.sites,
                    &c.plugin_store,
                    c.default_interpreter,
                    &c.state_dir,
                    cm_site::SiteConfig {
                        key: c.seal.clone(),
                        cipher: c.cipher.clone(),
                        // Always checked: no pinned key means nothing is accepted.
                        signers: Some(c.manager_keys.clone()),
                        ..cm_site::SiteConfig::default()
                    },
                )
            })
            .await??
        };
        if cfg.manager_keys.is_empty() {
            tracing::error!(
                "no manager public key pinned (--manager-key): this server refuses every assignment and notification"
            );
        }
        let events = election.subscribe();
        let client =
            JsonClient::with_tls(&cfg.agent_token, Duration::from_secs(10), cfg.tls.as_ref());
        let shared = Arc::new(Shared {
            managers: Arc::new(Managers::new(client.clone(), &cfg.manager_urls)),
            client,
            applier: Arc::new(applier),
            board: ReportBoard::default(),
            status: election.watch_status(),
            gl_url: watch::Sender::new(None),
            serving: watch::Sender::new(None),
            data_channel: tokio::sync::Mutex::new(()),
            cfg,
        });
        let election = Arc::new(election);
        let tasks = vec![
            tokio::spawn(member::member_loop(shared.clone())),
            tokio::spawn(state::state_loop(shared.clone())),
            tokio::spawn(role_loop(shared.clone(), election.clone(), events)),
        ];
        Ok(ServerAgent { shared, election, tasks })
    }

    /// The role an election status amounts to: `leader`, `member` or `electing`.
    pub fn role_of(election: &ElectionStatus) -> &'static str {
        if election.is_leader {
            "leader"
        } else if election.leader.is_some() {
            "member"
        } else {
            "electing"
        }
    }

    pub fn status(&self) -> AgentStatus {
        self.status_reader().status()
    }

    /// Reads [`ServerAgent::status`] from elsewhere (the status port) while the agent runs.
    pub fn status_reader(&self) -> AgentStatusReader {
        AgentStatusReader(self.shared.clone())
    }

    /// Re-reads the plugin store at once (SIGHUP): what changed is returned (and logged by the
    /// follower as on its own polls).
    pub fn rescan_plugins(&self) -> Vec<cm_plugin_host::StoreEvent> {
        self.shared.applier.rescan_plugins()
    }

    /// Whether the election task or an agent task has ended (the agent cannot go on).
    pub fn is_finished(&self) -> bool {
        self.election.is_finished() || self.tasks.iter().any(|t| t.is_finished())
    }

    /// Stops every duty and leaves the segment gracefully (a GL resigns at once).
    pub async fn leave(self) -> Result<(), crate::election::DriverError> {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        match Arc::try_unwrap(self.election) {
            Ok(e) => e.leave().await,
            Err(e) => {
                e.abort();
                Ok(())
            }
        }
    }
}

/// Follows the election: starts and stops the GL duties, and keeps `gl_url` pointing at the
/// current GL (learnt from its heartbeat payload).
async fn role_loop(
    shared: Arc<Shared>,
    election: Arc<ElectionHandle>,
    mut events: broadcast::Receiver<Event>,
) {
    let mut status = shared.status.clone();
    let mut duty: Option<GlDuty> = None;
    loop {
        let st = status.borrow_and_update().clone();
        if st.is_leader && duty.is_none() {
            match GlDuty::start(shared.clone()).await {
                Ok(d) => {
                    let addr = d.address(&shared);
                    let url = shared.client.base_url(&addr.to_string());
                    match beacon::encode(&url) {
                        Ok(p) => {
                            if let Err(e) = election.set_heartbeat_payload(p).await {
                                tracing::error!(
                                    "cannot advertise the GL address in heartbeats: {e}"
                                );
                            }
                        }
                        Err(e) => tracing::error!("GL address {url}: {e}"),
                    }
                    shared.serving.send_replace(Some(addr));
                    duty = Some(d);
                }
                Err(e) => {
                    tracing::error!("cannot take up the group leader's duties: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        } else if !st.is_leader
            && let Some(d) = duty.take()
        {
            tracing::info!(segment = %shared.cfg.segment, "no longer group leader: stopping the GL duties");
            d.stop();
            shared.serving.send_replace(None);
            let _ = election.set_heartbeat_payload(Vec::new()).await;
        }
        let url = if st.is_leader {
            shared.serving.borrow().map(|a| shared.client.base_url(&a.to_string()))
        } else {
            match st.leader_payload.as_deref().map(beacon::decode) {
                Some(Ok(url)) => url,
                Some(Err(e)) => {
                    tracing::debug!(leader = ?st.leader, "leader heartbeat payload: {e}");
                    None
                }
                None => None,
            }
        };
        shared.gl_url.send_if_modified(|u| {
            let changed = *u != url;
            *u = url;
            changed
        });
        tokio::select! {
            r = status.changed() => if r.is_err() { break },
            ev = events.recv() => match ev {
                // Every event is logged in words (`crate::words`) by the process that owns the
                // election; here only what the duties follow.
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!(missed = n, "election events fell behind"),
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    if let Some(d) = duty.take() {
        d.stop();
    }
}
