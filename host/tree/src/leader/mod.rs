//! A group leader's side of the tree: take a notification, fetch the assignment from the parent
//! (verified chunk by chunk, resumed after a break, re-parented through the manager when the
//! parent is gone), serve it to children while it still arrives, ask the manager for the next
//! child until the null address, hand the whole assignment to the segment ([`LocalDelivery`]) and
//! send one consolidated report.
//!
//! The segment side (MCTP to members, their reports) is behind [`LocalDelivery`]
//! ([`delivery`]), implemented by the agent; this module never talks to members itself. It only
//! carries the members' apply reports (`POST /members/report`, `MemberApplyReport`) to the
//! delivery, because members reach their GL at the same address the tree uses; and keeps what
//! members report of themselves between runs (`POST /members/state`, [`crate::member_state`])
//! for the agent's discovery report.
//!
//! Here: the node and its HTTP endpoint. [`drive`]: a run's fetch, the manager's questions and
//! the report. [`links`]: what the GL measures of its links ([`LinkWatch`]). [`abort`]: the
//! manager's signed order to stop a run (`POST /abort`).

mod abort;
mod delivery;
mod drive;
mod links;

pub use delivery::{DeliveryOutcome, LocalDelivery};
pub use links::LinkWatch;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

use cm_assignment::TrustedKeys;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::blob::{Blob, Egress, serve_blob};
use crate::forward::{ChildSource, forward_slot};
use crate::http::{self, Body, JsonClient, Role, Tokens};
use crate::member_state::{MemberState, MemberStates};
use crate::message::{MemberApplyReport, Notification};
use drive::ManagerChildSource;
use links::{LinkMeasure, metered};

/// The GL endpoint's routes, for the `route` label of `cmover_http_requests`.
const GL_ROUTES: &[&str] = &[
    "GET /healthz",
    "POST /notify",
    "POST /abort",
    "POST /members/report",
    "POST /members/state",
    "GET /dist/{id}/servers",
    "GET /dist/{id}/blob",
];
/// A GL's endpoint and how it fetches.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub segment: String,
    /// This GL's server name.
    pub leader: String,
    pub listen: SocketAddr,
    pub agent_token: String,
    /// Where received assignments are kept.
    pub data_dir: PathBuf,
    /// Longest wait for a byte from the parent before the fetch counts as broken.
    pub stall: Duration,
    /// Failed fetches from one parent before asking the manager for another.
    pub retries_per_parent: u32,
    /// Upload budget shared by all children (benchmarks simulate a NIC with it).
    pub egress_bytes_per_sec: Option<u64>,
    /// Mutual TLS for the endpoint and this GL's calls (`None`: plain HTTP, agent token).
    pub tls: Option<crate::tls::Tls>,
    /// The manager's public keys: a notification acts only when one of them signed it
    /// (empty: every notification is refused).
    pub manager_keys: TrustedKeys,
    /// The manager replicas this GL calls (the agent's one follower, shared with its discovery
    /// and cache reports); `None`: one of its own that learns the manager from the signed
    /// notifications.
    pub managers: Option<Arc<crate::managers::Managers>>,
}

impl LeaderConfig {
    pub fn new(segment: &str, leader: &str, agent_token: &str, data_dir: &Path) -> LeaderConfig {
        LeaderConfig {
            segment: segment.into(),
            leader: leader.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            agent_token: agent_token.into(),
            data_dir: data_dir.into(),
            stall: Duration::from_secs(5),
            retries_per_parent: 2,
            egress_bytes_per_sec: None,
            tls: None,
            manager_keys: TrustedKeys::default(),
            managers: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum LeaderError {
    #[error("group leader of {segment}: binding {addr}: {source}")]
    Bind { segment: String, addr: SocketAddr, source: std::io::Error },
    #[error("group leader of {segment}: data directory {path}: {source}")]
    DataDir { segment: String, path: PathBuf, source: std::io::Error },
}

struct RunState {
    blob: Arc<Blob>,
    notification: watch::Sender<Notification>,
    /// The run's fetch and forwarding slots (an abort stops them).
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

struct Inner {
    cfg: LeaderConfig,
    tokens: Tokens,
    client: JsonClient,
    /// Every call to the manager goes through it (`crate::managers`).
    managers: Arc<crate::managers::Managers>,
    runs: Mutex<HashMap<u64, Arc<RunState>>>,
    delivery: Arc<dyn LocalDelivery>,
    egress: Option<Arc<Egress>>,
    /// Every task this node started (accept loop, fetches, forwarding slots), for [`LeaderNode::stop`].
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    links: Arc<Mutex<LinkMeasure>>,
    /// Notifications refused because no pinned manager key signed them.
    refused: AtomicU64,
    /// What members reported of themselves (`POST /members/state`), relayed by discovery.
    member_states: Arc<MemberStates>,
    /// Runs the manager aborted here, with its signed order (the newest [`abort::KEPT`]).
    aborted: Mutex<std::collections::BTreeMap<u64, crate::abort::AbortOrder>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running GL tree endpoint. Dropping it does not stop it (the tasks live on the runtime);
/// [`LeaderNode::stop`] does.
pub struct LeaderNode {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl LeaderNode {
    /// Binds the tree endpoint and starts serving on the current tokio runtime.
    pub async fn start(
        cfg: LeaderConfig,
        delivery: Arc<dyn LocalDelivery>,
    ) -> Result<LeaderNode, LeaderError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| LeaderError::DataDir {
            segment: cfg.segment.clone(),
            path: cfg.data_dir.clone(),
            source,
        })?;
        let listener = TcpListener::bind(cfg.listen).await.map_err(|source| LeaderError::Bind {
            segment: cfg.segment.clone(),
            addr: cfg.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| LeaderError::Bind {
            segment: cfg.segment.clone(),
            addr: cfg.listen,
            source,
        })?;
        let client =
            JsonClient::with_tls(&cfg.agent_token, Duration::from_secs(10), cfg.tls.as_ref());
        let managers = cfg
            .managers
            .clone()
            .unwrap_or_else(|| Arc::new(crate::managers::Managers::new(client.clone(), &[])));
        let inner = Arc::new(Inner {
            tokens: Tokens::new("", &cfg.agent_token),
            client,
            managers,
            runs: Mutex::new(HashMap::new()),
            delivery,
            egress: cfg.egress_bytes_per_sec.map(Egress::new),
            tasks: Mutex::new(Vec::new()),
            links: LinkMeasure::new(),
            refused: AtomicU64::new(0),
            member_states: Arc::default(),
            aborted: Mutex::new(Default::default()),
            cfg,
        });
        let h = inner.clone();
        inner.spawn(http::serve_tls(listener, inner.cfg.tls.clone(), move |req| {
            let h = h.clone();
            let route = crate::metrics::route_label(req.method(), req.uri().path(), GL_ROUTES);
            async move {
                let r = h.handle(req).await;
                crate::metrics::request(route, r.status());
                r
            }
        }));
        Ok(LeaderNode { addr, inner })
    }

    /// Stops serving: the listener closes and every fetch, forwarding slot and delivery this
    /// node started is aborted (the GL lost its leadership; the new GL picks the runs up).
    pub fn stop(&self) {
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }

    /// The assignment file of `run` once it is whole and verified.
    pub fn assignment(&self, run: u64) -> Option<PathBuf> {
        let runs = self.inner.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.get(&run).filter(|r| r.blob.is_complete()).map(|r| r.blob.path().to_path_buf())
    }

    /// What the members reported of themselves (their plugins), for the discovery report.
    pub fn member_states(&self) -> Arc<MemberStates> {
        self.inner.member_states.clone()
    }

    /// What this GL measured of its links so far, readable while it runs.
    pub fn links(&self) -> LinkWatch {
        LinkWatch(self.inner.links.clone())
    }

    /// Notifications refused so far because no pinned manager key signed them.
    pub fn refused_notifications(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Bytes of `run` received and verified so far.
    pub fn progress(&self, run: u64) -> Option<u64> {
        let runs = self.inner.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.get(&run).map(|r| r.blob.verified())
    }
}

impl Inner {
    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(
        &self,
        f: F,
    ) -> tokio::task::AbortHandle {
        let h = tokio::spawn(f).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(h.clone());
        h
    }

    /// Spawns one of `run`'s tasks (an abort of the run stops it).
    fn spawn_for<F: std::future::Future<Output = ()> + Send + 'static>(
        &self,
        run: &RunState,
        f: F,
    ) {
        let h = self.spawn(f);
        lock(&run.tasks).push(h);
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return http::json(StatusCode::OK, &serde_json::json!({ "segment": self.cfg.segment }));
        }
        // Agents (parent GLs, members) and the manager (notifications) call a GL. What starts
        // work (`/notify`) must moreover carry the manager's signature: an agent can relay a
        // notification the manager made, never make one.
        if !matches!(self.tokens.role(&req), Some(Role::Agent | Role::Manager)) {
            return http::error(StatusCode::UNAUTHORIZED, "agent bearer token required");
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method().clone(), parts.as_slice()) {
            (Method::POST, ["notify"]) => match http::read_json::<Notification>(req).await {
                Ok(n) => self.on_notify(n),
                Err(r) => r,
            },
            (Method::POST, ["abort"]) => self.on_abort(req).await,
            (Method::POST, ["members", "report"]) => {
                match http::read_json::<MemberApplyReport>(req).await {
                    Ok(r) => {
                        // A member reporting on an aborted run learns it here (and discards).
                        let aborted = self.aborted_order(r.run);
                        if self.delivery.member_report(r) {
                            http::json(
                                StatusCode::ACCEPTED,
                                &serde_json::json!({ "accepted": true, "aborted": aborted }),
                            )
                        } else {
                            http::error(
                                StatusCode::NOT_FOUND,
                                "this group leader does not collect apply reports",
                            )
                        }
                    }
                    Err(r) => r,
                }
            }
            // A member's state between runs (its plugin): checked, kept, relayed by discovery.
            (Method::POST, ["members", "state"]) => {
                match http::read_json::<MemberState>(req).await {
                    Ok(s) => {
                        let server = s.server.clone();
                        match self.member_states.insert(s) {
                            Ok(_) => http::json(
                                StatusCode::ACCEPTED,
                                &serde_json::json!({ "accepted": true }),
                            ),
                            Err(e) => {
                                tracing::debug!(server = %server.escape_debug(), "member state refused: {e}");
                                http::error(StatusCode::BAD_REQUEST, &format!("member state: {e}"))
                            }
                        }
                    }
                    Err(r) => r,
                }
            }
            // A member that received a run asks whether it is one of the run's targets.
            (Method::GET, ["dist", run, "servers"]) => {
                let Ok(run) = run.parse::<u64>() else {
                    return http::error(StatusCode::BAD_REQUEST, "bad run id");
                };
                if let Some(order) = self.aborted_order(run) {
                    return abort::gone(&order);
                }
                let notification = self
                    .runs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&run)
                    .map(|r| r.notification.borrow().clone());
                match notification {
                    // With the newest runs aborted here: a member that missed an abort (it was
                    // unreachable) discards what those prepared before it applies this run.
                    // The manager's signed notification lets the member check the targets
                    // itself (`crate::targets`).
                    Some(n) => http::json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "run": run,
                            "servers": n.servers,
                            "aborted_before": self.recent_aborts(),
                            "notification": n,
                        }),
                    ),
                    None => http::error(StatusCode::NOT_FOUND, "no such run here"),
                }
            }
            (Method::GET, ["dist", run, "blob"]) => {
                let Ok(run) = run.parse::<u64>() else {
                    return http::error(StatusCode::BAD_REQUEST, "bad run id");
                };
                let blob = self
                    .runs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&run)
                    .map(|r| r.blob.clone());
                let Some(blob) = blob else {
                    return http::error(StatusCode::NOT_FOUND, "no such run here");
                };
                metered(&self.links, serve_blob(&blob, &req))
            }
            _ => http::error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    /// Checks a notification's signature; a refusal is logged and counted.
    pub(super) fn check_signed(&self, n: &Notification, from: &str) -> Result<(), String> {
        n.verify(&self.cfg.manager_keys).map(|()| self.managers.prefer(&n.manager)).map_err(|e| {
            let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            let msg = format!("notification for run {} refused: {e}", n.run);
            tracing::warn!(segment = %self.cfg.segment, from, refused_total = total, "{msg}");
            msg
        })
    }

    fn on_notify(self: &Arc<Self>, n: Notification) -> Response<Body> {
        if let Err(msg) = self.check_signed(&n, "POST /notify") {
            return http::error(StatusCode::FORBIDDEN, &msg);
        }
        if n.segment != self.cfg.segment {
            return http::error(
                StatusCode::BAD_REQUEST,
                &format!("notification for {}, this is {}", n.segment, self.cfg.segment),
            );
        }
        if let Err(e) = n.manifest.validate() {
            return http::error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        // Held until the run's tasks are spawned: an abort (which takes this lock) either comes
        // first and is seen here, or finds the run with every task it has to stop.
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(order) = self.aborted_order(n.run) {
            return abort::gone(&order);
        }
        if let Some(r) = runs.get(&n.run) {
            if r.blob.manifest() != &n.manifest {
                return http::error(
                    StatusCode::CONFLICT,
                    "a different assignment for a run already under way",
                );
            }
            // A new parent (re-parented, or the manager resumed the run): the fetch restarts from it.
            r.notification.send_replace(n);
            return http::json(StatusCode::ACCEPTED, &serde_json::json!({ "resumed": true }));
        }
        let path = self.cfg.data_dir.join(format!("run-{}.assignment", n.run));
        let blob = match Blob::create(&path, n.manifest.clone(), self.egress.clone()) {
            Ok(b) => b,
            Err(e) => return http::error(StatusCode::INSUFFICIENT_STORAGE, &e.to_string()),
        };
        let state = Arc::new(RunState {
            blob,
            notification: watch::Sender::new(n.clone()),
            tasks: Mutex::new(Vec::new()),
        });
        runs.insert(n.run, state.clone());
        for _ in 0..n.slots {
            let source: Arc<dyn ChildSource> =
                Arc::new(ManagerChildSource { inner: self.clone(), run: state.clone() });
            self.spawn_for(
                &state,
                forward_slot(state.blob.clone(), self.client.clone(), source, self.cfg.stall),
            );
        }
        self.spawn_for(&state, self.clone().drive(state.clone()));
        drop(runs);
        http::json(StatusCode::ACCEPTED, &serde_json::json!({ "accepted": true }))
    }
}
