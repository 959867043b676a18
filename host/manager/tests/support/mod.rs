//! A manager and group leaders on loopback for the multi-node tests: every node on its own
//! thread and runtime (killable), every GL delivering to member directories by checked copy.

#![allow(dead_code)]

use cm_manager::cluster::{CopyDelivery, NodeThread, operator_client, report_discovery};
use cm_manager::http::JsonClient;
use cm_manager::leader::{LeaderConfig, LeaderNode};
use cm_manager::model::{DiscoveryReport, Job, JobKind, JobPolicy, JobSpec, JobState, Payload};
use cm_manager::server::{Manager, ManagerConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const OP: &str = "operator-token-for-tests";
pub const AGENT: &str = "agent-token-for-tests";

pub struct Gl {
    pub segment: String,
    pub node: LeaderNode,
    pub thread: NodeThread,
    pub members: Vec<(String, PathBuf)>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub manager_url: String,
    pub manager_addr: SocketAddr,
    pub manager: NodeThread,
    pub gls: Vec<Gl>,
    pub op: JsonClient,
    pub rt: tokio::runtime::Runtime,
}

pub type LeaderTweak = Box<dyn Fn(usize, &mut LeaderConfig)>;

pub struct Options {
    pub gls: usize,
    pub members_per_gl: usize,
    pub tweak_manager: Box<dyn Fn(&mut ManagerConfig)>,
    pub tweak_leader: LeaderTweak,
}

impl Options {
    pub fn new(gls: usize) -> Options {
        Options { gls, members_per_gl: 1, tweak_manager: Box::new(|_| {}), tweak_leader: Box::new(|_, _| {}) }
    }
}

pub fn start_manager(cfg: ManagerConfig) -> (String, SocketAddr, NodeThread) {
    let ((url, addr), thread) = NodeThread::spawn("manager", move || async move {
        let m = Manager::start(cfg).await.expect("manager starts");
        let out = (m.url().to_string(), m.addr);
        // The manager's tasks hold what they need; the handle itself may go.
        drop(m);
        out
    })
    .expect("manager thread");
    (url, addr, thread)
}

impl Cluster {
    pub fn start(o: Options) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()))
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut mcfg = ManagerConfig::new(dir.path().join("manager"), OP, AGENT);
        mcfg.tick = Duration::from_millis(50);
        mcfg.start_timeout = Duration::from_secs(3);
        mcfg.probe_interval = Duration::from_millis(300);
        (o.tweak_manager)(&mut mcfg);
        let (manager_url, manager_addr, manager) = start_manager(mcfg);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut gls = Vec::new();
        for i in 0..o.gls {
            let segment = format!("seg{i:02}");
            let members: Vec<(String, PathBuf)> = (0..o.members_per_gl)
                .map(|m| (format!("{segment}-s{m}"), dir.path().join("servers").join(format!("{segment}-s{m}"))))
                .collect();
            let mut lcfg = LeaderConfig::new(&segment, &members[0].0, AGENT, &dir.path().join("gl").join(&segment));
            lcfg.stall = Duration::from_secs(2);
            (o.tweak_leader)(i, &mut lcfg);
            let delivery = Arc::new(CopyDelivery { members: members.clone() });
            let (node, thread) = NodeThread::spawn(&segment, move || async move {
                LeaderNode::start(lcfg, delivery).await.expect("GL starts")
            })
            .unwrap();
            let report = DiscoveryReport {
                segment: segment.clone(),
                leader: members[0].0.clone(),
                address: node.addr.to_string(),
                location: if i % 2 == 0 { "Europe/London".into() } else { "America/New_York".into() },
                cpu_power: 100,
                free_disk: 1 << 40,
                connections: 1,
                members: members.iter().map(|m| m.0.clone()).collect(),
            };
            rt.block_on(report_discovery(&manager_url, AGENT, &report)).unwrap();
            gls.push(Gl { segment, node, thread, members });
        }
        Cluster { dir, manager_url, manager_addr, manager, gls, op: operator_client(OP), rt }
    }

    pub fn all_servers(&self) -> Vec<String> {
        self.gls.iter().flat_map(|g| g.members.iter().map(|m| m.0.clone())).collect()
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.manager_url)
    }

    /// Content group `g` of every server, hosted site `site`, and a job publishing `file`.
    pub fn publish(&self, file: &Path, policy: JobPolicy) -> Job {
        self.setup_site("site", self.all_servers());
        self.submit("site", file, policy)
    }

    pub fn setup_site(&self, site: &str, servers: Vec<String>) {
        let g: serde_json::Value = self
            .rt
            .block_on(self.op.put(&self.api(&format!("groups/{site}-group")), &serde_json::json!({ "servers": servers })))
            .unwrap();
        assert!(g["servers"].is_array());
        let _: serde_json::Value = self
            .rt
            .block_on(self.op.put(
                &self.api(&format!("sites/{site}")),
                &serde_json::json!({ "content_group": format!("{site}-group"), "staging": "unused" }),
            ))
            .unwrap();
    }

    pub fn submit(&self, site: &str, file: &Path, policy: JobPolicy) -> Job {
        let spec = JobSpec {
            name: format!("publish {site}"),
            kind: JobKind::Publish,
            site: site.into(),
            payload: Payload::File { path: file.display().to_string() },
            start_at_ms: 0,
            every_ms: None,
            policy,
        };
        self.rt.block_on(self.op.post(&self.api("jobs"), &spec)).unwrap()
    }

    pub fn job(&self, id: u64) -> Job {
        self.rt.block_on(self.op.get(&self.api(&format!("jobs/{id}")))).unwrap()
    }

    /// Polls until `done(job)` or panics after `limit`.
    pub fn wait_job(&self, id: u64, limit: Duration, done: impl Fn(&Job) -> bool) -> Job {
        let t0 = Instant::now();
        loop {
            if let Ok(j) = self.rt.block_on(self.op.get::<Job>(&self.api(&format!("jobs/{id}")))) {
                if done(&j) {
                    return j;
                }
                assert!(t0.elapsed() < limit, "job {id} did not get there in {limit:?}: {j:?}\nhistory: {:#?}", self.history());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_finished(&self, id: u64, limit: Duration) -> Job {
        self.wait_job(id, limit, |j| matches!(j.state, JobState::Done | JobState::Cancelled { .. }) || (j.state == JobState::Idle && j.attempts > 0))
    }

    pub fn history(&self) -> Vec<String> {
        let h: Vec<serde_json::Value> = self.rt.block_on(self.op.get(&self.api("history"))).unwrap_or_default();
        h.iter().map(|e| e["event"].as_str().unwrap_or_default().to_string()).collect()
    }

    pub fn run(&self, id: u64) -> serde_json::Value {
        self.rt.block_on(self.op.get(&self.api(&format!("runs/{id}")))).unwrap()
    }
}

/// `len` pseudo-random bytes written to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    std::fs::write(path, v).unwrap();
}

pub fn hash_of(path: &Path) -> Option<blake3::Hash> {
    std::fs::read(path).ok().map(|b| blake3::hash(&b))
}
