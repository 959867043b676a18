//! Real-process clusters for the end-to-end tests (`tests/e2e_*.rs`): the `cmover` binary as a
//! manager and agents on loopback (cm-agent's `launch`), each test on multicast groups and
//! ports of its own, everything killed when the [`TestCluster`] drops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cm_agent::launch::{self, AgentProcess, AgentSpec, ManagerOptions, ManagerProcess};
use cm_manager::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobSpec, JobState, OnFailure, Payload, Quorum,
    ServerOutcome,
};
use cm_tree::http::JsonClient;
use serde_json::Value;

pub use crate::cmover_bin;

/// A manager and segments of agents, all real processes; dropped → all killed, files removed.
pub struct TestCluster {
    /// The manager (with replicas: the one the helpers below call; a test that kills the
    /// active replica swaps the new active one in, [`TestCluster::follow_active`]).
    pub manager: ManagerProcess,
    /// The other manager replicas (`Layout::replicas`), on the same PostgreSQL store.
    pub replicas: Vec<ManagerProcess>,
    pub agents: Vec<AgentProcess>,
    pub op: JsonClient,
    pub staging: PathBuf,
    pub segments: Vec<String>,
    /// The cluster secret file every agent shares.
    pub secret: PathBuf,
    /// Times the manager was started again ([`TestCluster::start_manager_again`]).
    pub restarts: u32,
    // Last: the directory goes after the processes are dead.
    pub dir: tempfile::TempDir,
}

/// A policy for tests: quorum 100 %, the release committed automatically, cancelled on failure.
pub fn auto_commit_policy() -> JobPolicy {
    JobPolicy {
        on_failure: OnFailure::Cancel,
        commit: CommitPolicy::Auto,
        quorum: Quorum { min_percent: 100, min_servers: 1 },
        ..JobPolicy::default()
    }
}

/// What a test cluster looks like.
pub struct Layout {
    /// Distinct per test (multicast groups 239.203.<test>.x and ports derived from it).
    pub test: u8,
    pub segments: usize,
    pub servers: usize,
    pub heartbeat_ms: u64,
    pub report_wait_ms: u64,
    /// Cap on each GL's MCTP rate (slows a distribution down).
    pub max_rate_mbps: Option<u64>,
    /// Mutual TLS between every process (`cmover cert` certificates) instead of tokens.
    pub tls: bool,
    /// The manager seals every assignment (`--seal-secret-file`); agents get the secret.
    pub seal: bool,
    /// The manager's `manager.store` (`None`: redb in its data directory).
    pub store: Option<String>,
    /// Manager replicas besides the first (a PostgreSQL `store`); every agent is configured
    /// with every replica's URL.
    pub replicas: usize,
    /// `manager.lease_ttl_ms` (replicas).
    pub lease_ttl_ms: Option<u64>,
    /// Changes server `n`'s spec before it starts (its seal secret, weight, pinned key…).
    #[allow(clippy::type_complexity)]
    pub tweak: Option<Box<dyn Fn(usize, &mut AgentSpec)>>,
}

impl Layout {
    pub fn new(test: u8, segments: usize, servers: usize) -> Layout {
        Layout {
            test,
            segments,
            servers,
            heartbeat_ms: 100,
            report_wait_ms: 5000,
            max_rate_mbps: None,
            tls: false,
            seal: false,
            store: None,
            replicas: 0,
            lease_ttl_ms: None,
            tweak: None,
        }
    }
}

impl TestCluster {
    /// Starts everything, publishes nothing yet; returns once every segment has an elected GL
    /// that reported all its servers to the manager.
    pub async fn start(layout: &Layout, site: &std::path::Path) -> anyhow::Result<TestCluster> {
        let bin = cmover_bin();
        let dir = tempfile::tempdir()?;
        let mut manager = launch::start_manager(
            &bin,
            dir.path(),
            &ManagerOptions {
                tls: layout.tls,
                seal: layout.seal,
                store: layout.store.clone(),
                lease_ttl_ms: layout.lease_ttl_ms,
                ..ManagerOptions::default()
            },
        )?;
        let mut replicas = Vec::new();
        for r in 0..layout.replicas {
            replicas.push(launch::start_replica(&bin, &manager, &format!("manager-r{}", r + 1))?);
        }
        if !replicas.is_empty() {
            manager.replica_urls = std::iter::once(manager.url.clone())
                .chain(replicas.iter().map(|r| r.url.clone()))
                .collect();
        }
        let secret = launch::write_secret(dir.path())?;
        let staging = dir.path().join("staging");
        cm_manager::prepare::copy_tree(site, &staging)?;
        let mut agents = Vec::new();
        let mut segments = Vec::new();
        let port = 43_000 + u16::from(layout.test) * 40;
        for s in 0..layout.segments {
            let seg = format!("seg{s}");
            let control =
                SocketAddr::from(([239, 203, layout.test, 2 * s as u8 + 1], port + 4 * s as u16));
            let data = SocketAddr::from((
                [239, 203, layout.test, 2 * s as u8 + 2],
                port + 4 * s as u16 + 2,
            ));
            for n in 0..layout.servers {
                let mut spec = AgentSpec {
                    name: format!("{seg}-{n}"),
                    node_id: (s * 100 + n + 1) as u64,
                    segment: seg.clone(),
                    location: "Etc/UTC".into(),
                    control,
                    data,
                    heartbeat_ms: layout.heartbeat_ms,
                    report_wait_ms: layout.report_wait_ms,
                    site_name: "www".into(),
                    weight: 0,
                    max_rate_mbps: layout.max_rate_mbps,
                    seal: Default::default(),
                    manager_key: None,
                    more_sites: Vec::new(),
                    extra_toml: String::new(),
                };
                if let Some(t) = &layout.tweak {
                    t(n, &mut spec);
                }
                let a = launch::start_agent(&bin, dir.path(), &manager, &secret, &spec)?;
                agents.push(a);
            }
            segments.push(seg);
        }
        let op = manager.operator_client()?;
        let mut c = TestCluster {
            manager,
            replicas,
            agents,
            op,
            staging,
            segments,
            secret,
            restarts: 0,
            dir,
        };
        if !c.replicas.is_empty() {
            // The writes below go to whichever replica took the lease.
            c.follow_active(Duration::from_secs(30)).await?;
        }
        // Registration takes longer the more agents share the machine's cores.
        let agents = (layout.segments * layout.servers) as u64;
        c.wait_segments(layout.servers, Duration::from_secs(30 + agents / 2)).await?;
        let all: Vec<String> = c.agents.iter().map(|a| a.spec.name.clone()).collect();
        let _: Value = c.op.put(&c.url("groups/g"), &serde_json::json!({ "servers": all })).await?;
        let _: Value =
            c.op.put(&c.url("sites/www"), &serde_json::json!({ "content_group": "g", "staging": c.staging.display().to_string() })).await?;
        Ok(c)
    }

    /// Starts agent `i` again (same spec and directory) after it was killed.
    pub fn restart_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let spec = self.agents[i].spec.clone();
        self.agents[i].guard.kill();
        self.agents[i] = launch::start_agent(
            &cmover_bin(),
            self.dir.path(),
            &self.manager,
            &self.secret,
            &spec,
        )?;
        Ok(())
    }

    /// Kills the manager at once (SIGKILL, like a crash); [`TestCluster::start_manager_again`]
    /// brings it back.
    pub fn kill_manager(&mut self) {
        self.manager.guard.kill();
    }

    /// Starts the manager again after [`TestCluster::kill_manager`]: same port, tokens, database
    /// and options, as an operator restarting it would (its log goes to `logs/manager-<n>.log`).
    pub fn start_manager_again(&mut self) -> anyhow::Result<()> {
        let m = &self.manager;
        let port = m.url.rsplit(':').next().context("manager URL without a port")?.to_string();
        // Its settings file: the same port, tokens, database, keys and options.
        let mut cmd = std::process::Command::new(cmover_bin());
        cmd.arg("manager").arg("--config").arg(&m.config_file);
        self.restarts += 1;
        let log = self.dir.path().join("logs").join(format!("manager-{}.log", self.restarts));
        self.manager.guard = launch::ProcessGuard::spawn("manager", cmd, log)?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if !self.manager.guard.is_running() || Instant::now() > end {
                bail!("the manager did not start again:\n{}", self.manager.guard.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// With replicas: waits (up to `limit`) until a replica other than a dead one says it is
    /// active (`GET /healthz`) and makes it [`TestCluster::manager`], the one the helpers call.
    /// Returns when it did.
    pub async fn follow_active(&mut self, limit: Duration) -> anyhow::Result<Instant> {
        let end = Instant::now() + limit;
        loop {
            for i in 0..self.replicas.len() {
                if self.replicas[i].guard.is_running() && is_active(&self.replicas[i]).await {
                    std::mem::swap(&mut self.manager, &mut self.replicas[i]);
                    return Ok(Instant::now());
                }
            }
            if self.manager.guard.is_running() && is_active(&self.manager).await {
                return Ok(Instant::now());
            }
            if Instant::now() > end {
                bail!("no replica became active within {limit:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts one more agent like agent `like` (same segment, channels and settings) named
    /// `name` with node id `node_id`; returns its index.
    pub fn add_agent(&mut self, like: usize, name: &str, node_id: u64) -> anyhow::Result<usize> {
        let spec = AgentSpec { name: name.into(), node_id, ..self.agents[like].spec.clone() };
        self.agents.push(launch::start_agent(
            &cmover_bin(),
            self.dir.path(),
            &self.manager,
            &self.secret,
            &spec,
        )?);
        Ok(self.agents.len() - 1)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.manager.url)
    }

    /// Waits until the manager knows every segment with `servers` members.
    pub async fn wait_segments(
        &self,
        servers: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let end = Instant::now() + limit;
        loop {
            let segs: Vec<Value> = self.op.get(&self.url("segments")).await.unwrap_or_default();
            let ready = segs
                .iter()
                .filter(|s| s["members"].as_array().is_some_and(|m| m.len() == servers))
                .count();
            if ready == self.segments.len() {
                return Ok(segs);
            }
            if Instant::now() > end {
                bail!("segments not ready: {segs:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The tail of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- manager\n{}\n", self.manager.guard.log_tail(15));
        for r in &self.replicas {
            s += &format!("--- replica {}\n{}\n", r.url, r.guard.log_tail(15));
        }
        for a in &self.agents {
            s += &format!("--- {}\n{}\n", a.spec.name, a.guard.log_tail(15));
        }
        s
    }

    /// Submits a job (cancelled on failure, committed only by an explicit commit job, quorum
    /// `min_percent`).
    pub async fn submit(
        &self,
        kind: JobKind,
        payload: Payload,
        min_percent: u8,
    ) -> anyhow::Result<Job> {
        let policy = JobPolicy {
            on_failure: OnFailure::Cancel,
            commit: CommitPolicy::Manual,
            quorum: Quorum { min_percent, min_servers: 1 },
            ..JobPolicy::default()
        };
        self.submit_with(kind, payload, policy).await
    }

    /// Submits a job with the given policy.
    pub async fn submit_with(
        &self,
        kind: JobKind,
        payload: Payload,
        policy: JobPolicy,
    ) -> anyhow::Result<Job> {
        let spec = JobSpec {
            name: format!("{kind:?}"),
            kind,
            site: "www".into(),
            payload,
            start_at_ms: 0,
            every_ms: None,
            policy,
        };
        Ok(self.op.post(&self.url("jobs"), &spec).await?)
    }

    /// The job's run once it started.
    pub async fn run_of(&self, job: u64, limit: Duration) -> anyhow::Result<u64> {
        let end = Instant::now() + limit;
        loop {
            let j: Job = self.op.get(&self.url(&format!("jobs/{job}"))).await?;
            if let JobState::Running { run } = j.state {
                return Ok(run);
            }
            let runs: Vec<Value> = self.op.get(&self.url("runs")).await?;
            if let Some(r) = runs.iter().rev().find(|r| r["job"].as_u64() == Some(job)) {
                return r["id"].as_u64().context("run id");
            }
            if Instant::now() > end {
                bail!("job {job} did not start: {:?}", j.last_reason);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the job to end; returns it and its last run's per-server outcomes.
    pub async fn finish(
        &self,
        job: u64,
        limit: Duration,
    ) -> anyhow::Result<(Job, Vec<(String, ServerOutcome)>)> {
        let end = Instant::now() + limit;
        loop {
            let j: Job = self.op.get(&self.url(&format!("jobs/{job}"))).await?;
            let over = matches!(j.state, JobState::Done | JobState::Cancelled { .. })
                || (j.state == JobState::Idle && j.attempts > 0);
            if over {
                let run = self.run_of(job, Duration::from_secs(1)).await?;
                let rr: Value = self.op.get(&self.url(&format!("runs/{run}"))).await?;
                let reports: Vec<(String, ServerOutcome)> =
                    serde_json::from_value(rr["reports"].clone())?;
                return Ok((j, reports));
            }
            if Instant::now() > end {
                bail!("job {job} still {:?} after {limit:?}\n{}", j.state, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a job to its end and requires success on every server.
    pub async fn run_ok(&self, kind: JobKind, payload: Payload) -> anyhow::Result<()> {
        let job = self.submit(kind, payload, 100).await?;
        let (j, reports) = self.finish(job.id, Duration::from_secs(60)).await?;
        if j.state != JobState::Done {
            bail!(
                "{kind:?} ended {:?}: {:?}; reports {reports:?}\n{}",
                j.state,
                j.last_reason,
                self.logs()
            );
        }
        let bad: Vec<_> = reports.iter().filter(|(_, o)| *o != ServerOutcome::Succeeded).collect();
        if !bad.is_empty() || reports.len() != self.agents.len() {
            bail!("{kind:?}: not every server applied: {reports:?}");
        }
        Ok(())
    }

    /// Publishes the staging tree with the default automatic commit (quorum 100 %) and requires
    /// the job done with every server's commit succeeded.
    pub async fn publish_committed_everywhere(&self) -> anyhow::Result<()> {
        let policy = JobPolicy {
            on_failure: OnFailure::Cancel,
            quorum: Quorum { min_percent: 100, min_servers: 1 },
            ..JobPolicy::default()
        };
        let job = self.submit_with(JobKind::Publish, Payload::Staging, policy).await?;
        let (j, reports) = self.finish(job.id, Duration::from_secs(60)).await?;
        if j.state != JobState::Done
            || reports.len() != self.agents.len()
            || reports.iter().any(|(_, o)| *o != ServerOutcome::Succeeded)
        {
            bail!(
                "publish with automatic commit ended {:?} ({:?}); commit run reports {reports:?}\n{}",
                j.state,
                j.last_reason,
                self.logs()
            );
        }
        Ok(())
    }

    /// Sets site `www` again (group `g`, the cluster's staging) with `settings` added, e.g.
    /// `{"keep_releases": 3}`.
    pub async fn put_site(&self, settings: Value) -> anyhow::Result<Value> {
        let mut body = serde_json::json!({ "content_group": "g", "staging": self.staging.display().to_string() });
        if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), settings) {
            b.extend(extra);
        }
        Ok(self.op.put(&self.url("sites/www"), &body).await?)
    }

    /// Creates (or sets again) hosted site `name` on the cluster's group `g`, its staging tree
    /// at `staging`: a second site on the same servers.
    pub async fn put_site_named(
        &self,
        name: &str,
        staging: &std::path::Path,
    ) -> anyhow::Result<Value> {
        let body =
            serde_json::json!({ "content_group": "g", "staging": staging.display().to_string() });
        Ok(self.op.put(&self.url(&format!("sites/{name}")), &body).await?)
    }

    /// Submits a job for site `site` with the given policy.
    pub async fn submit_for(
        &self,
        site: &str,
        kind: JobKind,
        payload: Payload,
        policy: JobPolicy,
    ) -> anyhow::Result<Job> {
        let spec = JobSpec {
            name: format!("{kind:?} {site}"),
            kind,
            site: site.into(),
            payload,
            start_at_ms: 0,
            every_ms: None,
            policy,
        };
        Ok(self.op.post(&self.url("jobs"), &spec).await?)
    }

    /// Panics unless every server's live tree is `want` (observed with [`crate::observe`]).
    pub fn assert_live_everywhere(
        &self,
        want: &std::collections::BTreeMap<String, String>,
        when: &str,
    ) {
        for a in &self.agents {
            let live = crate::observe(&a.site_root.join("current"));
            assert_eq!(&live, want, "{}: {when}\n{}", a.spec.name, self.logs());
        }
    }

    /// Index of the agent that leads `segment` now.
    pub fn leader_of(&self, segment: &str) -> Option<usize> {
        self.agents.iter().position(|a| {
            a.spec.segment == segment
                && a.status().is_ok_and(|s| s["is_leader"] == Value::Bool(true))
        })
    }

    /// Installs `wasm` (from `plugins/dist/`) as the interpreter of site `www` into agent `i`'s
    /// plugin store with the real `cmover plugin install`; the running agent hot-swaps to it.
    pub fn install_interpreter(&self, i: usize, wasm: &str) -> anyhow::Result<()> {
        use cm_plugin_host::bundled;
        let manifest = self.dir.path().join("interpreter.toml");
        std::fs::write(
            &manifest,
            bundled::interpreter_manifest("interpreter", &["www"]).to_toml(),
        )?;
        let out = std::process::Command::new(cmover_bin())
            .args(["plugin", "install"])
            .arg(bundled::dist_dir().join(wasm))
            .arg("--manifest")
            .arg(&manifest)
            .arg("--store")
            .arg(self.agents[i].dir.join("plugins"))
            .output()?;
        if !out.status.success() {
            bail!("{}: {}", self.agents[i].spec.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

/// Whether manager `m` says it is the active replica (`GET /healthz`).
pub async fn is_active(m: &ManagerProcess) -> bool {
    let Ok(client) = m.operator_client() else { return false };
    let url = format!("{}/healthz", m.url);
    let h = client.get::<Value>(&url);
    matches!(tokio::time::timeout(Duration::from_secs(2), h).await, Ok(Ok(v)) if v["active"] == true)
}
