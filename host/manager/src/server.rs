//! The manager process: the scheduler loop, job runs (quorum, disk space, distribution down the
//! tree, reports, outcome per policy) and the state every HTTP handler shares. Routing is in
//! [`crate::api`]. Every step of a run is written to the database before it is acted on, so a
//! manager restarted mid-run resumes it ([`Manager::start`] picks up runs still distributing).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use cm_tree::BoxFuture;
use cm_tree::blob::{Blob, BlobError, Egress};
use cm_tree::forward::{ChildSource, forward_slot};
use cm_tree::http::{self, JsonClient, Tokens};
use cm_tree::manifest::{DEFAULT_CHUNK_SIZE, ManifestError};
use cm_tree::message::{ChildTarget, Notification, SegmentReport};
use cm_tree::tls::Tls;

use crate::db::{Db, DbError};
use crate::model::{Job, JobState, Payload, Run, RunPhase, SegmentStatus, ServerOutcome};
use crate::tree::{LeaderInfo, Next, Node, TreeConfig, TreePlan, sort_leaders};
use crate::{now_ms, policy, prepare, scheduler};

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub listen: SocketAddr,
    /// Database and assignment files.
    pub data_dir: PathBuf,
    pub operator_token: String,
    pub agent_token: String,
    pub tree: TreeConfig,
    pub chunk_size: u32,
    /// Scheduler period.
    pub tick: Duration,
    /// A segment not heard from for this long counts as not live (its servers fail the quorum).
    pub live_window: Duration,
    /// How long a notified GL may take to start fetching before it is probed.
    pub start_timeout: Duration,
    /// Upload budget of the manager (benchmarks simulate a NIC with it).
    pub egress_bytes_per_sec: Option<u64>,
    /// How often a run probes the GLs that have not reported yet (a GL that died after its
    /// children were served is noticed this way).
    pub probe_interval: Duration,
    /// Seals manager-built assignments (servers configured with the same key accept only those).
    pub seal: Option<prepare::SealKey>,
    /// Signs every assignment and notification (agents pin its public key and refuse anything
    /// else). `None` only in tests of the tree alone: real agents refuse unsigned runs.
    pub signer: Option<cm_assignment::SigningKey>,
    /// After a replicate job for a server was cancelled, discovery creates no new one for this long.
    pub replicate_backoff: Duration,
    /// Mutual TLS (`None`: plain HTTP with bearer tokens). With it the API takes only clients
    /// whose certificate the cluster CA signed, and the certificate's role stands in for a token;
    /// the tree (the manager to GLs, GL to GL) runs over it too.
    pub tls: Option<Tls>,
    /// Most members one discovery report may list; a longer list is refused (400).
    pub max_segment_members: usize,
    /// Most segments the manager records; a report for one more is refused (400).
    pub max_segments: usize,
    /// Discovery reports per segment: a burst of this many, then one per `discovery_refill`;
    /// faster ones are refused (429) and the GL retries.
    pub discovery_burst: u32,
    pub discovery_refill: Duration,
    /// `/metrics` on the API's port (`None`: not served): the process's registry and the scrape
    /// token that opens it besides the operator role.
    pub metrics: Option<cm_tree::metrics::Exposition>,
    /// On shutdown, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// Where the records live (`None`: redb, `manager.redb` in the data directory).
    pub store: Option<crate::db::StoreSpec>,
    /// This replica among several on a PostgreSQL store (`None` there: its id is made up and
    /// its URL is the API's own; the lease lasts [`DEFAULT_LEASE_TTL`]).
    pub replica: Option<crate::replica::ReplicaConfig>,
}

/// How long a replica's lease lasts unless renewed.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

impl ManagerConfig {
    pub fn new(data_dir: PathBuf, operator_token: &str, agent_token: &str) -> ManagerConfig {
        ManagerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            operator_token: operator_token.into(),
            agent_token: agent_token.into(),
            tree: TreeConfig::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            tick: Duration::from_millis(500),
            live_window: Duration::from_secs(90),
            start_timeout: Duration::from_secs(5),
            egress_bytes_per_sec: None,
            probe_interval: Duration::from_secs(5),
            seal: None,
            signer: None,
            replicate_backoff: Duration::from_secs(600),
            tls: None,
            max_segment_members: 1024,
            max_segments: 4096,
            discovery_burst: 20,
            discovery_refill: Duration::from_millis(500),
            metrics: None,
            shutdown_grace: Duration::from_secs(10),
            store: None,
            replica: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ManagerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("manager: {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Prepare(#[from] crate::prepare::PrepareError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// A client sends faster than it may (answered 429).
    #[error("{0}")]
    TooMany(String),
    /// The client's credentials do not cover what it asked (answered 403).
    #[error("{0}")]
    Forbidden(String),
}

/// A run being distributed, in memory (its durable state is the `Run` record).
pub(crate) struct ActiveRun {
    pub id: u64,
    pub job: u64,
    pub site: String,
    pub servers: BTreeSet<String>,
    pub blob: Arc<Blob>,
    pub plan: Mutex<TreePlan>,
    pub changed: Notify,
    pub deadline_ms: u64,
}

pub(crate) struct Inner {
    pub cfg: ManagerConfig,
    pub db: Db,
    pub tokens: Tokens,
    pub client: JsonClient,
    pub url: String,
    pub runs: Mutex<HashMap<u64, Arc<ActiveRun>>>,
    pub egress: Option<Arc<Egress>>,
    /// Wakes the scheduler before its next tick (a release is ready for its commit run).
    pub wake: Notify,
    /// Rate limits of discovery reports.
    pub discovery_gate: crate::discovery::DiscoveryGate,
    /// The browser console's sessions.
    pub console: crate::console::Console,
    /// Rolls being worked on, rotation's passes (`golive/`).
    pub golive: crate::golive::GoLiveState,
    /// Active or standby ([`crate::replica`]).
    pub role: crate::replica::Role,
}

/// A running manager.
pub struct Manager {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    /// `true` stops the API's accept loop ([`Manager::shutdown`]).
    stop: tokio::sync::watch::Sender<bool>,
    /// The API's accept loop: `true` once every connection ended within the grace period.
    serving: tokio::task::JoinHandle<bool>,
    scheduler: tokio::task::JoinHandle<()>,
    /// Renews the lease (PostgreSQL stores only).
    lease: Option<(tokio::task::JoinHandle<()>, crate::replica::ReplicaConfig)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    /// Opens the database, resumes runs that were distributing, binds the API and starts the scheduler.
    pub async fn start(cfg: ManagerConfig) -> Result<Manager, ManagerError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ManagerError::Io { what, source }
        };
        std::fs::create_dir_all(cfg.data_dir.join("runs"))
            .map_err(io("creating the data directory"))?;
        let listener =
            TcpListener::bind(cfg.listen).await.map_err(io("binding the API address"))?;
        let addr = listener.local_addr().map_err(io("reading the API address"))?;
        let store = cfg
            .store
            .clone()
            .unwrap_or_else(|| crate::db::StoreSpec::Redb(cfg.data_dir.join("manager.redb")));
        let db = Db::open_store(&store)?;
        let inner = Arc::new(Inner {
            tokens: Tokens::new(&cfg.operator_token, &cfg.agent_token),
            client: JsonClient::with_tls(
                &cfg.agent_token,
                Duration::from_secs(10),
                cfg.tls.as_ref(),
            ),
            url: format!("{}://{addr}", if cfg.tls.is_some() { "https" } else { "http" }),
            runs: Mutex::new(HashMap::new()),
            egress: cfg.egress_bytes_per_sec.map(Egress::new),
            wake: Notify::new(),
            discovery_gate: Default::default(),
            console: Default::default(),
            golive: Default::default(),
            role: Default::default(),
            db,
            cfg,
        });
        let lease = match inner.db.postgres() {
            None => {
                inner.take_over()?;
                None
            }
            Some(_) => {
                let me =
                    inner.cfg.replica.clone().unwrap_or_else(|| crate::replica::ReplicaConfig {
                        id: format!("{} {}", inner.url, std::process::id()),
                        url: inner.url.clone(),
                        lease_ttl: DEFAULT_LEASE_TTL,
                    });
                tracing::info!(replica = me.id, store = %store, "standby until it holds the lease");
                Some((tokio::spawn(crate::replica::hold_lease(inner.clone(), me.clone())), me))
            }
        };
        let h = inner.clone();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let serving = tokio::spawn(http::serve_until(
            listener,
            inner.cfg.tls.clone(),
            http::ServeLimits::default(),
            stopping,
            inner.cfg.shutdown_grace,
            move |req| {
                let h = h.clone();
                async move { crate::metrics::answer(h, req).await }
            },
        ));
        let s = inner.clone();
        let scheduler = tokio::spawn(async move {
            loop {
                if s.is_active() {
                    if let Err(e) = s.clone().tick(now_ms()) {
                        tracing::error!("scheduler: {e}");
                    }
                    if let Err(e) = s.golive_tick() {
                        tracing::error!("go-live: {e}");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(s.cfg.tick) => {}
                    _ = s.wake.notified() => {}
                }
            }
        });
        Ok(Manager { addr, inner, stop, serving, scheduler, lease })
    }

    /// Stops gracefully: no new connection is accepted and no job started; requests in flight
    /// get [`ManagerConfig::shutdown_grace`] to finish. Runs in flight stay `Distributing` in
    /// the database (every step of theirs is already written) and resume at the next start.
    /// Returns whether every request finished in time.
    pub async fn shutdown(self) -> bool {
        self.scheduler.abort();
        if let Some((task, me)) = self.lease {
            task.abort();
            let inner = self.inner.clone();
            let _ = tokio::task::spawn_blocking(move || crate::replica::release(&inner, &me)).await;
        }
        let _ = self.stop.send(true);
        self.serving.await.unwrap_or(false)
    }

    /// New bearer tokens (a SIGHUP re-read their files): requests with the old ones are refused
    /// from now on. The manager's own calls to group leaders keep the agent token it started
    /// with (changing that one needs a restart).
    pub fn replace_tokens(&self, operator: &str, agent: &str) {
        self.inner.tokens.replace(operator, agent);
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Whether this replica is the active one (always, on a redb store).
    pub fn is_active(&self) -> bool {
        self.inner.is_active()
    }
}

impl Inner {
    /// Resumes the runs the database has distributing (after a restart, or a takeover).
    pub(crate) fn resume_runs(self: &Arc<Self>) -> Result<(), ManagerError> {
        for run in self.db.runs()? {
            if run.phase == RunPhase::Distributing {
                tracing::info!(run = run.id, "resuming run");
                self.db.write(|t| {
                    t.log(
                        now_ms(),
                        Some(run.job),
                        Some(run.id),
                        "manager restarted or took over: run resumed",
                    )
                })?;
                if let Err(e) = self.clone().resume(run.clone()) {
                    self.finish(&run, Some(format!("could not resume after restart: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// One scheduler pass: start due jobs, queue or cancel conflicting ones.
    pub(crate) fn tick(self: Arc<Self>, now: u64) -> Result<(), ManagerError> {
        let jobs = self.db.jobs()?;
        let due = scheduler::due(&jobs, now);
        if due.is_empty() {
            return Ok(());
        }
        let active: Vec<scheduler::Active> = lock(&self.runs)
            .values()
            .map(|r| scheduler::Active {
                job: r.job,
                site: r.site.clone(),
                servers: r.servers.clone(),
            })
            .collect();
        let mut candidates = Vec::new();
        for job in &due {
            match self.targets(job) {
                Ok(servers) => candidates.push(scheduler::Candidate {
                    job: job.id,
                    // A release waiting for its commit goes first: no other job of the site may
                    // slip in between a distribution and its commit.
                    due_ms: if job.pending_commit.is_some() { 0 } else { job.next_run_ms },
                    site: job.spec.site.clone(),
                    servers: servers.into_iter().collect(),
                    on_conflict: job.spec.policy.on_conflict,
                }),
                Err(e) => {
                    self.set_state(job, JobState::Cancelled { reason: e.to_string() }, now)?
                }
            }
        }
        for d in scheduler::decide(candidates, &active) {
            let job = jobs.iter().find(|j| j.id == d_job(&d)).cloned();
            let Some(job) = job else { continue };
            match d {
                scheduler::Decision::Start { .. } => {
                    if let Err(e) = self.clone().start_run(job.clone(), now) {
                        tracing::error!(job = job.id, "starting a run: {e}");
                        let next = policy::after_failure(&job.spec.policy, job.attempts + 1, now, &e.to_string());
                        self.db.write(|t| {
                            let mut j = job.clone();
                            (j.state, j.next_run_ms, j.attempts) = (next.state, next.next_run_ms, next.attempts);
                            j.last_reason = Some(e.to_string());
                            t.put_job(&j)?;
                            t.log(now, Some(j.id), None, format!("run could not start: {e}"))
                        })?;
                    }
                }
                scheduler::Decision::Queue { conflicts_with, .. } => {
                    self.set_reason(&job, format!("queued: job {conflicts_with} is distributing to the same site on shared servers"), now)?
                }
                scheduler::Decision::Cancel { conflicts_with, .. } => self.set_state(
                    &job,
                    JobState::Cancelled { reason: format!("conflicts with running job {conflicts_with} (same site, shared servers)") },
                    now,
                )?,
            }
        }
        Ok(())
    }

    /// Where a run's assignment file is kept while it is distributed.
    pub(crate) fn run_file(&self, run: u64) -> PathBuf {
        self.cfg.data_dir.join("runs").join(format!("{run}.assignment"))
    }

    /// The servers a job targets: its site's content group (for a replicate of live to named
    /// servers, those of them that are in the group).
    pub(crate) fn targets(&self, job: &Job) -> Result<Vec<String>, ManagerError> {
        let site = self.db.site(&job.spec.site)?.ok_or_else(|| {
            ManagerError::NotFound(format!("hosted site {} does not exist", job.spec.site))
        })?;
        let group = self.db.group(&site.content_group)?.ok_or_else(|| {
            ManagerError::NotFound(format!("content group {} does not exist", site.content_group))
        })?;
        Ok(match &job.spec.payload {
            Payload::Live { servers } | Payload::Remove { servers } if !servers.is_empty() => {
                group.servers.into_iter().filter(|s| servers.contains(s)).collect()
            }
            Payload::Hot { servers, .. } => {
                group.servers.into_iter().filter(|s| servers.contains(s)).collect()
            }
            Payload::Plugin { servers, .. } if !servers.is_empty() => {
                group.servers.into_iter().filter(|s| servers.contains(s)).collect()
            }
            Payload::CatchUp { .. } => self.catch_up_targets(job)?,
            _ => group.servers,
        })
    }

    /// Records why a job did not run, once per distinct reason.
    fn set_reason(&self, job: &Job, reason: String, now: u64) -> Result<(), ManagerError> {
        if job.last_reason.as_deref() == Some(reason.as_str()) {
            return Ok(());
        }
        self.db.write(|t| {
            let mut j = job.clone();
            j.last_reason = Some(reason.clone());
            t.put_job(&j)?;
            t.log(now, Some(j.id), None, reason.clone())
        })?;
        Ok(())
    }

    pub(crate) fn set_state(
        &self,
        job: &Job,
        state: JobState,
        now: u64,
    ) -> Result<(), ManagerError> {
        self.db.write(|t| {
            let mut j = job.clone();
            let what = match &state {
                JobState::Cancelled { reason } => format!("cancelled: {reason}"),
                other => format!("now {other:?}"),
            };
            if let JobState::Cancelled { reason } = &state {
                j.last_reason = Some(reason.clone());
            }
            j.state = state.clone();
            t.put_job(&j)?;
            t.log(now, Some(j.id), None, what)
        })?;
        Ok(())
    }

    /// Live servers: reported by their segment's GL as members, within the live window.
    pub(crate) fn live_servers(&self, now: u64) -> Result<BTreeMap<String, String>, ManagerError> {
        let window = self.cfg.live_window.as_millis() as u64;
        let segments: HashMap<String, _> =
            self.db.segments()?.into_iter().map(|s| (s.name.clone(), s)).collect();
        Ok(self
            .db
            .servers()?
            .into_iter()
            .filter(|s| {
                s.live
                    && segments.get(&s.segment).is_some_and(|g| {
                        g.last_report_ms + window >= now && g.members.contains(&s.name)
                    })
            })
            .map(|s| (s.name, s.segment))
            .collect())
    }

    /// Starts (or, after a restart, resumes) distributing a run down the tree.
    pub(crate) fn resume(self: Arc<Self>, run: Run) -> Result<(), ManagerError> {
        let job = self
            .db
            .job(run.job)?
            .ok_or_else(|| ManagerError::NotFound(format!("job {} of run {}", run.job, run.id)))?;
        let copy = self.run_file(run.id);
        let blob = Blob::complete(&copy, run.manifest.clone(), self.egress.clone())?;
        let mut infos = Vec::new();
        for (name, s) in &run.segments {
            let rec = self.db.segment(name)?;
            infos.push(LeaderInfo {
                segment: name.clone(),
                cpu_power: rec.as_ref().map_or(0, |r| r.cpu_power),
                location: rec.as_ref().map_or(String::new(), |r| r.location.clone()),
                static_rank: rec.as_ref().and_then(|r| r.static_rank),
                links: rec.and_then(|r| r.links),
            });
            let _ = s;
        }
        sort_leaders(&mut infos);
        let tree = self.tree_shape(&run, &infos)?;
        let order: Vec<String> = infos.into_iter().map(|i| i.segment).collect();
        let done: Vec<String> = run
            .segments
            .iter()
            .filter(|(_, s)| matches!(s.status, SegmentStatus::Received | SegmentStatus::Reported))
            .map(|(n, _)| n.clone())
            .collect();
        let mut plan = TreePlan::new(tree, &order, &done);
        for (n, s) in &run.segments {
            if s.status == SegmentStatus::Lost {
                plan.leader_dead(n);
            }
        }
        let slots = plan.slots(&Node::Manager);
        let active = Arc::new(ActiveRun {
            id: run.id,
            job: run.job,
            site: job.spec.site.clone(),
            servers: run.segments.values().flat_map(|s| s.servers.iter().cloned()).collect(),
            blob: blob.clone(),
            plan: Mutex::new(plan),
            changed: Notify::new(),
            deadline_ms: run.deadline_ms,
        });
        lock(&self.runs).insert(run.id, active.clone());
        for _ in 0..slots {
            let source: Arc<dyn ChildSource> =
                Arc::new(RootSource { inner: self.clone(), run: active.clone() });
            tokio::spawn(forward_slot(
                blob.clone(),
                self.client.clone(),
                source,
                self.cfg.start_timeout,
            ));
        }
        tokio::spawn(self.monitor(active));
        Ok(())
    }

    /// Ends the run when every segment reported or was lost, or at its deadline.
    async fn monitor(self: Arc<Self>, active: Arc<ActiveRun>) {
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = active.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if !self.is_active() {
                return; // deposed: the active replica resumed this run
            }
            let run = match self.db.run(active.id) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(run = active.id, "reading run: {e}");
                    continue;
                }
            };
            if run.phase != RunPhase::Distributing {
                if matches!(run.phase, RunPhase::Aborted { .. }) {
                    self.stop_leaders(&run).await;
                }
                return;
            }
            if last_sweep.elapsed() >= self.cfg.probe_interval {
                last_sweep = tokio::time::Instant::now();
                self.sweep(&run).await;
            }
            let settled = run
                .segments
                .values()
                .all(|s| matches!(s.status, SegmentStatus::Reported | SegmentStatus::Lost));
            let late = now_ms() >= active.deadline_ms;
            if settled || late {
                let why = (late && !settled)
                    .then(|| "deadline passed before every segment reported".to_string());
                if let Err(e) = self.finish(&run, why) {
                    tracing::error!(run = run.id, "finishing run: {e}");
                    continue;
                }
                lock(&self.runs).remove(&active.id);
                active.changed.notify_waiters();
                crate::search_refresh::after_run(self.clone(), active.id);
                // Aborted just before it settled: the GLs still discard what it prepared.
                if let Ok(Some(r)) = self.db.run(active.id)
                    && matches!(r.phase, RunPhase::Aborted { .. })
                {
                    self.stop_leaders(&r).await;
                }
                return;
            }
        }
    }

    /// Probes every GL of the run that has not reported; the silent ones are routed around.
    async fn sweep(self: &Arc<Self>, run: &Run) {
        let mut probes = tokio::task::JoinSet::new();
        for (name, s) in &run.segments {
            if matches!(s.status, SegmentStatus::Pending | SegmentStatus::Received) {
                let (me, name, address) = (self.clone(), name.clone(), s.address.clone());
                probes.spawn(async move { (!me.probe(&address).await).then_some(name) });
            }
        }
        while let Some(r) = probes.join_next().await {
            if let Ok(Some(dead)) = r
                && let Err(e) = self.leader_unreachable(run.id, &dead).await
            {
                tracing::error!(run = run.id, "{e}");
            }
        }
    }

    pub(crate) fn active(&self, run: u64) -> Option<Arc<ActiveRun>> {
        lock(&self.runs).get(&run).cloned()
    }

    /// Takes a run out of the running set (it is no longer served, scheduled or waited for).
    pub(crate) fn forget_run(&self, run: u64) -> Option<Arc<ActiveRun>> {
        lock(&self.runs).remove(&run)
    }

    /// Base URL of a tree node in a run.
    fn node_url(&self, run: &Run, node: &Node) -> Option<String> {
        match node {
            Node::Manager => Some(self.url.clone()),
            Node::Leader(s) => run.segments.get(s).map(|s| self.client.base_url(&s.address)),
        }
    }

    /// The notification for `segment` to fetch from `parent`.
    pub(crate) fn child_target(
        &self,
        run: &Run,
        active: &ActiveRun,
        segment: &str,
        parent: &Node,
    ) -> Option<ChildTarget> {
        let seg = run.segments.get(segment)?;
        let slots = lock(&active.plan).slots(&Node::Leader(segment.to_string()));
        Some(ChildTarget {
            segment: segment.to_string(),
            address: seg.address.clone(),
            notification: self.signed(Notification {
                run: run.id,
                segment: segment.to_string(),
                source: self.node_url(run, parent)?,
                manager: self.url.clone(),
                manifest: run.manifest.clone(),
                slots,
                servers: seg.servers.clone(),
                site: active.site.clone(),
                cache: run.cache.clone(),
                signature: None,
            }),
        })
    }

    /// Signs a notification with the manager's key (GLs refuse unsigned ones).
    fn signed(&self, mut n: Notification) -> Notification {
        if let Some(k) = &self.cfg.signer {
            n.sign(k);
        }
        n
    }

    /// Updates one segment's status in the run record.
    pub(crate) fn set_segment_status(
        &self,
        run: u64,
        segment: &str,
        status: SegmentStatus,
        event: Option<String>,
    ) -> Result<(), ManagerError> {
        self.db.write(|t| {
            let Some(mut r) = self.db_run_in(run)? else { return Ok(()) };
            if let Some(s) = r.segments.get_mut(segment) {
                // Reported is final; Received never goes back to Pending except through revival.
                if s.status != SegmentStatus::Reported
                    && !(s.status == SegmentStatus::Received && status == SegmentStatus::Pending)
                {
                    s.status = status;
                }
            }
            t.put_run(&r)?;
            if let Some(e) = &event {
                t.log(now_ms(), Some(r.job), Some(run), e.clone())?;
            }
            Ok::<_, ManagerError>(())
        })
    }

    fn db_run_in(&self, run: u64) -> Result<Option<Run>, ManagerError> {
        Ok(self.db.run(run)?)
    }

    /// Is a GL's tree endpoint answering?
    async fn probe(&self, address: &str) -> bool {
        let c = JsonClient::with_tls("", Duration::from_secs(1), self.cfg.tls.as_ref());
        c.get::<serde_json::Value>(&format!("{}/healthz", c.base_url(address))).await.is_ok()
    }

    /// Someone could not reach `segment`'s GL. If it does not answer, it is dead for this run:
    /// its unfinished children get new parents and fresh notifications.
    pub(crate) async fn leader_unreachable(
        &self,
        run_id: u64,
        segment: &str,
    ) -> Result<bool, ManagerError> {
        let Some(active) = self.active(run_id) else { return Ok(false) };
        let Some(run) = self.db.run(run_id)? else { return Ok(false) };
        let Some(seg) = run.segments.get(segment) else { return Ok(false) };
        if self.probe(&seg.address).await {
            return Ok(false);
        }
        let orphans = lock(&active.plan).leader_dead(segment);
        crate::metrics::leader_lost();
        self.set_segment_status(
            run_id,
            segment,
            SegmentStatus::Lost,
            Some(format!(
                "group leader {} of segment {segment} unreachable; {} children re-parented",
                seg.leader,
                orphans.len()
            )),
        )?;
        self.notify_orphans(&run, &active, orphans);
        active.changed.notify_waiters();
        Ok(true)
    }

    /// Sends each re-parented child its fresh notification (it resumes from its verified offset).
    pub(crate) fn notify_orphans(
        &self,
        run: &Run,
        active: &ActiveRun,
        orphans: Vec<(String, Node)>,
    ) {
        for (child, parent) in orphans {
            if let Some(target) = self.child_target(run, active, &child, &parent) {
                let client = self.client.clone();
                tokio::spawn(async move {
                    let url = format!("{}/notify", client.base_url(&target.address));
                    if let Err(e) =
                        client.post::<_, serde_json::Value>(&url, &target.notification).await
                    {
                        tracing::warn!("re-parent notification to {}: {e}", target.segment);
                    }
                });
            }
        }
    }

    /// A GL cannot fetch from its parent: a new parent (the parent is checked first).
    pub(crate) async fn reparent(
        &self,
        run_id: u64,
        segment: &str,
    ) -> Result<Notification, ManagerError> {
        let active = self
            .active(run_id)
            .ok_or_else(|| ManagerError::NotFound(format!("run {run_id} is not distributing")))?;
        let parent = lock(&active.plan).parent_of(segment).cloned();
        if let Some(Node::Leader(p)) = &parent
            && !self.leader_unreachable(run_id, p).await?
        {
            // The parent answers but the child cannot use it: fetch the reference copy.
            lock(&active.plan).adopt_by_manager(segment);
        }
        let run =
            self.db.run(run_id)?.ok_or_else(|| ManagerError::NotFound(format!("run {run_id}")))?;
        let parent = lock(&active.plan).parent_of(segment).cloned().unwrap_or(Node::Manager);
        self.child_target(&run, &active, segment, &parent).map(|t| t.notification).ok_or_else(
            || ManagerError::NotFound(format!("segment {segment} is not in run {run_id}")),
        )
    }

    /// A GL's consolidated report. `false`: ignored, it came from a GL the segment has replaced.
    pub(crate) fn segment_report(
        &self,
        run_id: u64,
        report: &SegmentReport,
    ) -> Result<bool, ManagerError> {
        let run =
            self.db.run(run_id)?.ok_or_else(|| ManagerError::NotFound(format!("run {run_id}")))?;
        if run.phase != RunPhase::Distributing {
            // Ended (an abort, a deadline): its outcome is decided, a late report changes nothing.
            return Ok(false);
        }
        let seg = run.segments.get(&report.segment).ok_or_else(|| {
            ManagerError::Invalid(format!("segment {} is not in run {run_id}", report.segment))
        })?;
        if seg.leader != report.leader {
            // The segment elected another GL since, and the run went to it: its report stands.
            let line = format!(
                "report of segment {} from former group leader {} ignored: {} leads the segment in this run",
                report.segment, report.leader, seg.leader
            );
            self.db.write(|t| t.log(now_ms(), Some(run.job), Some(run_id), line.clone()))?;
            return Ok(false);
        }
        // The GL names the site of the notification it acted on; another site's report is
        // a confused or lying GL, and its outcomes must not count for this site's holders.
        let site = lock(&self.runs).get(&run_id).map(|a| a.site.clone());
        if let Some(site) = site
            && !report.site.is_empty()
            && report.site != site
        {
            return Err(ManagerError::Invalid(format!(
                "report of segment {} names site {:?}; run {run_id} is for site {site}",
                report.segment, report.site
            )));
        }
        let ours = |s: &String| seg.servers.contains(s);
        let mut outcomes: Vec<(String, ServerOutcome)> = Vec::new();
        outcomes.extend(
            report
                .succeeded
                .iter()
                .filter(|s| ours(s))
                .map(|s| (s.clone(), ServerOutcome::Succeeded)),
        );
        outcomes.extend(
            report
                .failed
                .iter()
                .filter(|(s, _)| ours(s))
                .map(|(s, r)| (s.clone(), ServerOutcome::Failed { reason: r.clone() })),
        );
        outcomes.extend(
            report.missing.iter().filter(|s| ours(s)).map(|s| (s.clone(), ServerOutcome::Missing)),
        );
        // Targets the GL did not mention at all count as missing.
        for s in &seg.servers {
            if !outcomes.iter().any(|(o, _)| o == s) {
                outcomes.push((s.clone(), ServerOutcome::Missing));
            }
        }
        self.db.write(|t| {
            for (s, o) in &outcomes {
                t.put_report(run_id, s, o)?;
            }
            Ok::<_, ManagerError>(())
        })?;
        let ok = outcomes.iter().filter(|(_, o)| *o == ServerOutcome::Succeeded).count();
        self.set_segment_status(
            run_id,
            &report.segment,
            SegmentStatus::Reported,
            Some(format!(
                "segment {} (GL {}) reported: {ok} of {} servers succeeded",
                report.segment,
                report.leader,
                seg.servers.len()
            )),
        )?;
        if let Some(a) = self.active(run_id) {
            a.changed.notify_waiters();
        }
        Ok(true)
    }

    /// A segment's GL holds the whole assignment.
    pub(crate) fn received(&self, run_id: u64, segment: &str) -> Result<(), ManagerError> {
        let active = self
            .active(run_id)
            .ok_or_else(|| ManagerError::NotFound(format!("run {run_id} is not distributing")))?;
        lock(&active.plan).received(segment);
        let run = self.db.run(run_id)?;
        if run.is_some_and(|r| {
            r.segments.get(segment).is_some_and(|s| s.status == SegmentStatus::Pending)
        }) {
            self.set_segment_status(run_id, segment, SegmentStatus::Received, None)?;
        }
        active.changed.notify_waiters();
        Ok(())
    }
}

fn d_job(d: &scheduler::Decision) -> u64 {
    match d {
        scheduler::Decision::Start { job }
        | scheduler::Decision::Queue { job, .. }
        | scheduler::Decision::Cancel { job, .. } => *job,
    }
}

/// The manager's own forwarding slots take children straight from the plan.
pub(crate) struct RootSource {
    pub inner: Arc<Inner>,
    pub run: Arc<ActiveRun>,
}

impl ChildSource for RootSource {
    fn next(&self) -> BoxFuture<'_, Option<ChildTarget>> {
        Box::pin(async move {
            loop {
                self.inner.active(self.run.id)?;
                let notified = self.run.changed.notified();
                let next = lock(&self.run.plan).next_for(&Node::Manager);
                match next {
                    Next::Serve(seg) => {
                        let run = self.inner.db.run(self.run.id).ok().flatten()?;
                        if let Some(t) =
                            self.inner.child_target(&run, &self.run, &seg, &Node::Manager)
                        {
                            return Some(t);
                        }
                    }
                    Next::Done => return None,
                    Next::Wait => {
                        tokio::select! {
                            _ = notified => {}
                            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        }
                    }
                }
            }
        })
    }

    fn unreachable(&self, child: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.inner.leader_unreachable(self.run.id, &child).await {
                tracing::error!("{e}");
            }
        })
    }
}
