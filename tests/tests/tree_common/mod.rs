//! A manager and group leaders on loopback for the multi-node tests: every node on its own
//! thread and runtime (killable), every GL delivering to member directories by checked copy.

#![allow(dead_code)]

use cm_manager::model::{Job, JobKind, JobPolicy, JobSpec, JobState, Payload};
use cm_manager::server::{Manager, ManagerConfig};
use cm_tests::loopback::{CopyDelivery, NodeThread, operator_client, report_discovery};
use cm_tree::BoxFuture;
use cm_tree::http::JsonClient;
use cm_tree::leader::{DeliveryOutcome, LeaderConfig, LeaderNode, LocalDelivery};
use cm_tree::message::DiscoveryReport;
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
/// The segment side of GL `i`, given its members (server name, directory).
pub type MakeDelivery = Box<dyn Fn(usize, &[(String, PathBuf)]) -> Arc<dyn LocalDelivery>>;

pub struct Options {
    pub gls: usize,
    pub members_per_gl: usize,
    pub tweak_manager: Box<dyn Fn(&mut ManagerConfig)>,
    pub tweak_leader: LeaderTweak,
    pub delivery: MakeDelivery,
}

impl Options {
    pub fn new(gls: usize) -> Options {
        Options {
            gls,
            members_per_gl: 1,
            tweak_manager: Box::new(|_| {}),
            tweak_leader: Box::new(|_, _| {}),
            delivery: Box::new(|_, members| Arc::new(CopyDelivery { members: members.to_vec() })),
        }
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
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "off".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut mcfg = ManagerConfig::new(dir.path().join("manager"), OP, AGENT);
        mcfg.tick = Duration::from_millis(50);
        mcfg.start_timeout = Duration::from_secs(3);
        mcfg.probe_interval = Duration::from_millis(300);
        mcfg.signer = Some(cm_tests::test_signer().clone());
        (o.tweak_manager)(&mut mcfg);
        let (manager_url, manager_addr, manager) = start_manager(mcfg);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut gls = Vec::new();
        for i in 0..o.gls {
            let segment = format!("seg{i:02}");
            let members: Vec<(String, PathBuf)> = (0..o.members_per_gl)
                .map(|m| {
                    (
                        format!("{segment}-s{m}"),
                        dir.path().join("servers").join(format!("{segment}-s{m}")),
                    )
                })
                .collect();
            let mut lcfg = LeaderConfig::new(
                &segment,
                &members[0].0,
                AGENT,
                &dir.path().join("gl").join(&segment),
            );
            lcfg.stall = Duration::from_secs(2);
            lcfg.manager_keys = cm_tests::test_pins();
            (o.tweak_leader)(i, &mut lcfg);
            let delivery = (o.delivery)(i, &members);
            let (node, thread) = NodeThread::spawn(&segment, move || async move {
                LeaderNode::start(lcfg, delivery).await.expect("GL starts")
            })
            .unwrap();
            let report = DiscoveryReport {
                segment: segment.clone(),
                leader: members[0].0.clone(),
                address: node.addr.to_string(),
                location: if i % 2 == 0 {
                    "Europe/London".into()
                } else {
                    "America/New_York".into()
                },
                cpu_power: 100,
                free_disk: 1 << 40,
                connections: 1,
                members: members.iter().map(|m| m.0.clone()).collect(),
                links: None,
                plugins: Default::default(),
                spaces: Default::default(),
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
        // A staging directory must exist (the manager checks); runs here send files.
        self.setup_site_from(site, servers, &std::env::temp_dir());
    }

    /// Content group `{site}-group` of `servers` and hosted site `site` published from `staging`.
    pub fn setup_site_from(&self, site: &str, servers: Vec<String>, staging: &Path) {
        let g: serde_json::Value = self
            .rt
            .block_on(self.op.put(
                &self.api(&format!("groups/{site}-group")),
                &serde_json::json!({ "servers": servers }),
            ))
            .unwrap();
        assert!(g["servers"].is_array());
        let _: serde_json::Value = self
            .rt
            .block_on(self.op.put(
                &self.api(&format!("sites/{site}")),
                &serde_json::json!({ "content_group": format!("{site}-group"), "staging": staging.display().to_string() }),
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
                assert!(
                    t0.elapsed() < limit,
                    "job {id} did not get there in {limit:?}: {j:?}\nhistory: {:#?}",
                    self.history()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_finished(&self, id: u64, limit: Duration) -> Job {
        self.wait_job(id, limit, |j| {
            matches!(j.state, JobState::Done | JobState::Cancelled { .. })
                || (j.state == JobState::Idle && j.attempts > 0)
        })
    }

    pub fn history(&self) -> Vec<String> {
        let h: Vec<serde_json::Value> =
            self.rt.block_on(self.op.get(&self.api("history"))).unwrap_or_default();
        h.iter().map(|e| e["event"].as_str().unwrap_or_default().to_string()).collect()
    }

    pub fn run(&self, id: u64) -> serde_json::Value {
        self.rt.block_on(self.op.get(&self.api(&format!("runs/{id}")))).unwrap()
    }
}

/// A real assignment at `path`, signed with the test manager's key (so the manager sends it
/// as it is): hot content (it commits itself, so no automatic commit run follows) carrying one
/// file of `len` pseudo-random bytes, stored raw. Returns the assignment's length.
pub fn random_assignment(path: &Path, len: usize, seed: u64) -> u64 {
    random_assignment_for(path, len, seed, "site")
}

/// [`random_assignment`] for hosted site `site` (its header names it; the default is `site`,
/// the site [`Cluster::publish`] sets up).
pub fn random_assignment_for(path: &Path, len: usize, seed: u64, site: &str) -> u64 {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    let staging = tempfile::tempdir().unwrap();
    // An extension stored raw: random bytes do not compress.
    std::fs::write(staging.path().join("payload.jpg"), v).unwrap();
    let mut opts =
        cm_assignment::BuildOptions::new(cm_assignment::AssignmentType::HotContent, seed)
            .for_site(site);
    opts.signer = Some(cm_tests::test_signer().clone());
    cm_assignment::build(staging.path(), None, path, &opts).unwrap();
    std::fs::metadata(path).unwrap().len()
}

pub fn hash_of(path: &Path) -> Option<blake3::Hash> {
    std::fs::read(path).ok().map(|b| blake3::hash(&b))
}

/// A segment whose servers really apply every assignment: releases built with cm-assignment's
/// reference interpreter under `<member dir>/releases/<serial>`, `current` (the live serial) moved
/// by commit and rollback, `history` of committed serials. Stands in for cm-site without its
/// plugin runtime.
pub struct SiteDelivery {
    pub members: Vec<(String, PathBuf)>,
    /// Members that answer; the others are missing (e.g. not joined yet).
    pub present: Arc<std::sync::Mutex<Vec<String>>>,
}

impl SiteDelivery {
    pub fn all(members: &[(String, PathBuf)]) -> SiteDelivery {
        SiteDelivery {
            members: members.to_vec(),
            present: Arc::new(std::sync::Mutex::new(members.iter().map(|m| m.0.clone()).collect())),
        }
    }
}

impl LocalDelivery for SiteDelivery {
    fn deliver(
        &self,
        _run: u64,
        assignment: PathBuf,
        _m: cm_tree::manifest::Manifest,
    ) -> BoxFuture<'static, DeliveryOutcome> {
        let members = self.members.clone();
        let present = self.present.lock().unwrap().clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut out = DeliveryOutcome::default();
                for (name, dir) in members {
                    if !present.contains(&name) {
                        out.missing.push(name);
                        continue;
                    }
                    match apply(&dir, &assignment) {
                        Ok(()) => out.succeeded.push(name),
                        Err(e) => out.failed.push((name, e)),
                    }
                }
                out
            })
            .await
            .unwrap()
        })
    }
}

/// The live serial of a server applied to by [`SiteDelivery`].
pub fn current(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join("current")).ok()?.trim().parse().ok()
}

/// The live tree of a server applied to by [`SiteDelivery`] (empty when nothing is live).
pub fn live_tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    match current(dir) {
        Some(c) => tree_of(&dir.join("releases").join(c.to_string())),
        None => Default::default(),
    }
}

fn apply(dir: &Path, file: &Path) -> Result<(), String> {
    use cm_assignment::AssignmentType as T;
    let r = cm_assignment::read::AssignmentReader::open(file).map_err(|e| e.to_string())?;
    let h = r.header().clone();
    let releases = dir.join("releases");
    let history_file = dir.join("history");
    let mut history: Vec<u64> = std::fs::read_to_string(&history_file)
        .unwrap_or_default()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let set_live = |history: &[u64], serial: u64| {
        let list: Vec<String> = history.iter().map(u64::to_string).collect();
        std::fs::write(&history_file, list.join(" ")).unwrap();
        std::fs::write(dir.join("current"), serial.to_string()).unwrap();
    };
    match h.kind {
        T::Commit | T::Switch => {
            if !releases.join(h.target_serial.to_string()).is_dir() {
                return Err(format!("no release {}", h.target_serial));
            }
            if current(dir) != Some(h.target_serial) {
                history.push(h.target_serial);
                set_live(&history, h.target_serial);
            }
            Ok(())
        }
        T::Rollback => {
            if history.len() < 2 {
                return Err("nothing to roll back to".into());
            }
            history.pop();
            let back = *history.last().unwrap();
            set_live(&history, back);
            Ok(())
        }
        _ => {
            let out = releases.join(h.serial.to_string());
            if out.is_dir() {
                return Ok(()); // applied before
            }
            let live = current(dir);
            if h.base_serial != 0 && live != Some(h.base_serial) {
                return Err(format!("built against release {}, live is {live:?}", h.base_serial));
            }
            let building = releases.join(format!(".building-{}", h.serial));
            let _ = std::fs::remove_dir_all(&building);
            std::fs::create_dir_all(&building).unwrap();
            if let (Some(l), false) = (live, h.kind.builds_from_empty()) {
                cm_manager::prepare::copy_tree(&releases.join(l.to_string()), &building)
                    .map_err(|e| e.to_string())?;
            }
            cm_assignment::reference::apply_all(&r, &building).map_err(|e| e.to_string())?;
            std::fs::rename(&building, &out).map_err(|e| e.to_string())
        }
    }
}

/// Every file under `dir` (following `current` when given a site): relative path → bytes.
pub fn tree_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = Default::default();
    walk(dir, dir, &mut out);
    out
}

impl Cluster {
    /// GL `i` reports its segment again with these members (as after a join or leave).
    pub fn rediscover(&self, i: usize, members: &[&str]) -> serde_json::Value {
        self.rediscover_with_links(i, members, None)
    }

    /// [`Cluster::rediscover`], carrying the link rates the GL measured.
    pub fn rediscover_with_links(
        &self,
        i: usize,
        members: &[&str],
        links: Option<cm_tree::link::LinkRates>,
    ) -> serde_json::Value {
        let gl = &self.gls[i];
        let report = DiscoveryReport {
            segment: gl.segment.clone(),
            leader: gl.members[0].0.clone(),
            address: gl.node.addr.to_string(),
            location: "Europe/London".into(),
            cpu_power: 100,
            free_disk: 1 << 40,
            connections: 1,
            members: members.iter().map(|m| m.to_string()).collect(),
            links,
            plugins: Default::default(),
            spaces: Default::default(),
        };
        let agent = JsonClient::new(AGENT, Duration::from_secs(10));
        self.rt.block_on(agent.post(&self.api("discovery"), &report)).unwrap()
    }

    pub fn submit_spec(&self, spec: &JobSpec) -> Job {
        self.rt.block_on(self.op.post(&self.api("jobs"), spec)).unwrap()
    }

    pub fn site(&self, name: &str) -> serde_json::Value {
        let sites: Vec<serde_json::Value> =
            self.rt.block_on(self.op.get(&self.api("sites"))).unwrap();
        sites.into_iter().find(|s| s["name"] == name).unwrap()
    }

    pub fn runs(&self) -> Vec<serde_json::Value> {
        self.rt.block_on(self.op.get(&self.api("runs"))).unwrap()
    }
}
