//! A group leader's side of the tree: take a notification, fetch the assignment from the parent
//! (verified chunk by chunk, resumed after a break, re-parented through the manager when the
//! parent is gone), serve it to children while it still arrives, ask the manager for the next
//! child until the null address, hand the whole assignment to the segment ([`LocalDelivery`]) and
//! send one consolidated report.
//!
//! The segment side (MCTP to members, their reports) is behind [`LocalDelivery`], implemented by
//! the agent; this module never talks to members itself. It only carries the members' apply
//! reports (`POST /members/report`, [`MemberApplyReport`]) to the delivery, because members
//! reach their GL at the same address the tree uses.

use hyper::body::Incoming;
use hyper::header::RANGE;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::blob::{Blob, BlobError, Egress};
use crate::forward::{BoxFuture, ChildSource, forward_slot};
use crate::http::{self, Body, JsonClient, Role, Tokens};
use crate::manifest::Manifest;
use crate::model::{ChildTarget, NextChild, Notification, SegmentReport, TreeCall};
use crate::tree::{LinkRates, UploadMeter};
use http_body_util::BodyExt;

/// Transfers smaller than this are not timed: connection set-up and the pipeline's last chunk
/// would say more than the link.
const MIN_MEASURED_BYTES: u64 = 1 << 20;
/// How long a GL keeps offering its consolidated report to a manager that does not answer.
const REPORT_PATIENCE: Duration = Duration::from_secs(600);

/// What the segment made of an assignment: the GL's consolidated report, less its names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryOutcome {
    pub succeeded: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub missing: Vec<String>,
}

/// Hands a whole, verified assignment to the members of the GL's segment and collects their reports.
pub trait LocalDelivery: Send + Sync + 'static {
    fn deliver(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
    ) -> BoxFuture<'static, DeliveryOutcome>;

    /// Delivers to `servers` only (the notification's targets; empty: every member). The
    /// default delivers to everyone; a delivery that can leave servers out overrides it.
    fn deliver_to(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
        servers: Vec<String>,
    ) -> BoxFuture<'static, DeliveryOutcome> {
        let _ = servers;
        self.deliver(run, assignment, manifest)
    }

    /// A member's apply report arrived at this GL (`POST /members/report`). Returns whether the
    /// delivery takes such reports; the default (deliveries that end at MCTP completion) does not.
    fn member_report(&self, _report: MemberApplyReport) -> bool {
        false
    }
}

/// What a member did with one run's assignment, sent to its current GL: the apply outcome
/// (not just "received"), so the GL's consolidated report says which servers hold it applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberApplyReport {
    /// The member's server name (its election registration name).
    pub server: String,
    /// Its election node id (= its MCTP member id).
    pub node: u64,
    pub run: u64,
    /// `None`: applied; `Some(reason)`: the apply failed and live is unchanged.
    pub error: Option<String>,
    /// The member site's live release after the apply.
    pub live: Option<u64>,
    /// One line on what the apply did (release built, live switched, already applied).
    #[serde(default)]
    pub summary: String,
}

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
}

struct Inner {
    cfg: LeaderConfig,
    tokens: Tokens,
    client: JsonClient,
    runs: Mutex<HashMap<u64, Arc<RunState>>>,
    delivery: Arc<dyn LocalDelivery>,
    egress: Option<Arc<Egress>>,
    /// Every task this node started (accept loop, fetches, forwarding slots), for [`LeaderNode::stop`].
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    links: Mutex<LinkMeasure>,
}

/// What this GL measured of its links (see [`LinkRates`]).
struct LinkMeasure {
    epoch: std::time::Instant,
    /// Everything sent to children, over the time any child was pulling.
    upload: UploadMeter,
    /// The last whole fetch's bytes/s.
    download: Option<u64>,
}

impl LinkMeasure {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// Reads a GL's measured link rates (for its discovery reports) while it runs.
#[derive(Clone)]
pub struct LinkWatch(Arc<Inner>);

impl LinkWatch {
    /// `None` until the GL timed a fetch or a send of at least a MiB.
    pub fn rates(&self) -> Option<LinkRates> {
        let m = lock(&self.0.links);
        let upload = m.upload.rate(m.now(), MIN_MEASURED_BYTES);
        (upload.is_some() || m.download.is_some()).then(|| LinkRates {
            upload_bps: upload.unwrap_or(0),
            download_bps: m.download.unwrap_or(0),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes its child stream in the upload meter when the response body is dropped (sent or not).
struct OpenStream(Arc<Inner>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut m = lock(&self.0.links);
        let now = m.now();
        m.upload.stream_closed(now);
    }
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
        let inner = Arc::new(Inner {
            tokens: Tokens::new("", &cfg.agent_token),
            client: JsonClient::with_tls(
                &cfg.agent_token,
                Duration::from_secs(10),
                cfg.tls.as_ref(),
            ),
            runs: Mutex::new(HashMap::new()),
            delivery,
            egress: cfg.egress_bytes_per_sec.map(Egress::new),
            tasks: Mutex::new(Vec::new()),
            links: Mutex::new(LinkMeasure {
                epoch: std::time::Instant::now(),
                upload: UploadMeter::default(),
                download: None,
            }),
            cfg,
        });
        let h = inner.clone();
        inner.spawn(http::serve_tls(listener, inner.cfg.tls.clone(), move |req| {
            let h = h.clone();
            async move { h.handle(req).await }
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

    /// What this GL measured of its links so far, readable while it runs.
    pub fn links(&self) -> LinkWatch {
        LinkWatch(self.inner.clone())
    }

    /// Bytes of `run` received and verified so far.
    pub fn progress(&self, run: u64) -> Option<u64> {
        let runs = self.inner.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.get(&run).map(|r| r.blob.verified())
    }
}

impl Inner {
    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
        let h = tokio::spawn(f).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(h);
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return http::json(StatusCode::OK, &serde_json::json!({ "segment": self.cfg.segment }));
        }
        // Agents (parent GLs, members) and the manager (notifications) call a GL.
        if !matches!(self.tokens.role(&req), Some(Role::Agent | Role::Manager)) {
            return http::error(StatusCode::UNAUTHORIZED, "agent bearer token required");
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method().clone(), parts.as_slice()) {
            (Method::POST, ["notify"]) => match http::read_json::<Notification>(req).await {
                Ok(n) => self.on_notify(n),
                Err(r) => r,
            },
            (Method::POST, ["members", "report"]) => {
                match http::read_json::<MemberApplyReport>(req).await {
                    Ok(r) => {
                        if self.delivery.member_report(r) {
                            http::json(
                                StatusCode::ACCEPTED,
                                &serde_json::json!({ "accepted": true }),
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
            // A member that received a run asks whether it is one of the run's targets.
            (Method::GET, ["dist", run, "servers"]) => {
                let Ok(run) = run.parse::<u64>() else {
                    return http::error(StatusCode::BAD_REQUEST, "bad run id");
                };
                let servers = self
                    .runs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&run)
                    .map(|r| r.notification.borrow().servers.clone());
                match servers {
                    Some(servers) => http::json(
                        StatusCode::OK,
                        &serde_json::json!({ "run": run, "servers": servers }),
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
                self.metered(serve_blob(&blob, &req))
            }
            _ => http::error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    /// Counts a blob response's bytes in the upload meter as hyper sends them.
    fn metered(self: &Arc<Self>, response: Response<Body>) -> Response<Body> {
        if !response.status().is_success() {
            return response;
        }
        {
            let mut m = lock(&self.links);
            let now = m.now();
            m.upload.stream_opened(now);
        }
        let open = OpenStream(self.clone());
        response.map(move |body| {
            body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    lock(&open.0.links).upload.sent(data.len() as u64);
                }
                frame
            })
            .boxed()
        })
    }

    fn on_notify(self: &Arc<Self>, n: Notification) -> Response<Body> {
        if n.segment != self.cfg.segment {
            return http::error(
                StatusCode::BAD_REQUEST,
                &format!("notification for {}, this is {}", n.segment, self.cfg.segment),
            );
        }
        if let Err(e) = n.manifest.validate() {
            return http::error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
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
        let state = Arc::new(RunState { blob, notification: watch::Sender::new(n.clone()) });
        runs.insert(n.run, state.clone());
        drop(runs);
        for _ in 0..n.slots {
            let source: Arc<dyn ChildSource> =
                Arc::new(ManagerChildSource { inner: self.clone(), run: state.clone() });
            self.spawn(forward_slot(
                state.blob.clone(),
                self.client.clone(),
                source,
                self.cfg.stall,
            ));
        }
        self.spawn(self.clone().drive(state));
        http::json(StatusCode::ACCEPTED, &serde_json::json!({ "accepted": true }))
    }

    fn manager_url(&self, run: &RunState, what: &str) -> String {
        let n = run.notification.borrow();
        format!("{}/api/v1/dist/{}/{what}", n.manager, n.run)
    }

    /// Tells the manager something, retrying with a growing pause (up to a second) for as long
    /// as `patience` (it may be restarting).
    async fn tell_manager<T: serde::Serialize>(
        &self,
        url: &str,
        body: &T,
        patience: Duration,
    ) -> bool {
        let end = tokio::time::Instant::now() + patience;
        for attempt in 0u64.. {
            match self.client.post::<_, serde_json::Value>(url, body).await {
                Ok(_) => return true,
                Err(e) => {
                    tracing::warn!(segment = %self.cfg.segment, "{e}");
                    if tokio::time::Instant::now() >= end {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(100 * (attempt + 1).min(10))).await;
                }
            }
        }
        false
    }

    /// Fetch until whole (switching parents as told or when one fails), then report received,
    /// deliver to the segment and send the consolidated report.
    async fn drive(self: Arc<Self>, run: Arc<RunState>) {
        let mut rx = run.notification.subscribe();
        let (started, from) = (std::time::Instant::now(), run.blob.verified());
        let mut failures = 0u32;
        let mut total_failures = 0u32;
        loop {
            let n = rx.borrow_and_update().clone();
            let url = format!("{}/dist/{}/blob?from={}", n.source, n.run, n.segment);
            let result = tokio::select! {
                r = run.blob.fetch_from(&self.client, &url, self.cfg.stall) => r,
                _ = rx.changed() => { failures = 0; continue; }
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    total_failures += 1;
                    tracing::warn!(segment = %self.cfg.segment, "{e}");
                    if total_failures > 200 {
                        tracing::error!(segment = %self.cfg.segment, run = n.run, "giving up on the run after {total_failures} failed fetches");
                        // Forgotten, so a later notification (the manager resuming the run)
                        // starts it afresh instead of finding a run nobody fetches.
                        lock(&self.runs).remove(&n.run);
                        return;
                    }
                    if failures >= self.cfg.retries_per_parent
                        || matches!(e, BlobError::Corrupt { .. }) && failures >= 2
                    {
                        failures = 0;
                        let url = self.manager_url(&run, "reparent");
                        match self
                            .client
                            .post::<_, Notification>(
                                &url,
                                &TreeCall { segment: self.cfg.segment.clone() },
                            )
                            .await
                        {
                            Ok(new) => {
                                tracing::info!(segment = %self.cfg.segment, "re-parented to {}", new.source);
                                run.notification.send_replace(new);
                                rx.borrow_and_update();
                            }
                            Err(e) => {
                                tracing::warn!(segment = %self.cfg.segment, "asking for a new parent: {e}")
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.max(1))))
                        .await;
                }
            }
        }
        let fetched = run.blob.manifest().size - from;
        if fetched >= MIN_MEASURED_BYTES {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            lock(&self.links).download = Some(LinkRates::rate(fetched, micros));
        }
        let n = run.notification.borrow().clone();
        let call = TreeCall { segment: self.cfg.segment.clone() };
        self.tell_manager(&self.manager_url(&run, "received"), &call, Duration::from_secs(15))
            .await;
        let outcome = self
            .delivery
            .deliver_to(n.run, run.blob.path().to_path_buf(), n.manifest.clone(), n.servers.clone())
            .await;
        let report = SegmentReport {
            segment: self.cfg.segment.clone(),
            leader: self.cfg.leader.clone(),
            succeeded: outcome.succeeded,
            failed: outcome.failed,
            missing: outcome.missing,
        };
        let url = format!("{}/api/v1/runs/{}/report", n.manager, n.run);
        // The segment's outcome exists nowhere else: keep trying through a manager restart.
        if !self.tell_manager(&url, &report, REPORT_PATIENCE).await {
            tracing::error!(segment = %self.cfg.segment, run = n.run, "the manager never took the segment's report");
        }
    }
}

/// Serves a blob GET: `Range: bytes=N-` resumes; `?from=<segment>` names the child pulling.
pub fn serve_blob(blob: &Arc<Blob>, req: &Request<Incoming>) -> Response<Body> {
    let start =
        match req.headers().get(RANGE).map(|v| v.to_str().ok().and_then(http::parse_range_start)) {
            None => None,
            Some(Some(s)) => Some(s),
            Some(None) => {
                return http::error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "only `Range: bytes=N-` is supported",
                );
            }
        };
    let child = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("from=")))
        .map(str::to_string);
    blob.serve(start, child)
}

/// A GL's forwarding slots ask the manager over HTTP.
struct ManagerChildSource {
    inner: Arc<Inner>,
    run: Arc<RunState>,
}

impl ChildSource for ManagerChildSource {
    fn next(&self) -> BoxFuture<'_, Option<ChildTarget>> {
        Box::pin(async move {
            let url = self.inner.manager_url(&self.run, "next");
            let call = TreeCall { segment: self.inner.cfg.segment.clone() };
            for attempt in 0..20u64 {
                match self.inner.client.post::<_, NextChild>(&url, &call).await {
                    Ok(next) => return next.child,
                    Err(e) => {
                        tracing::warn!(segment = %self.inner.cfg.segment, "asking for the next GL: {e}");
                        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1).min(10)))
                            .await;
                    }
                }
            }
            None
        })
    }

    fn unreachable(&self, child: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let url = self.inner.manager_url(&self.run, "dead");
            self.inner
                .tell_manager(&url, &TreeCall { segment: child }, Duration::from_secs(15))
                .await;
        })
    }
}
