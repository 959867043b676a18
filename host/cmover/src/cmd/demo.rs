//! `cmover demo`: a manager and several segments of servers on loopback, in this process.
//!
//! Each segment has a multicast data channel of its own on 127.0.0.1 and a group leader (its
//! first server, a pre-assigned leader) running the tree endpoint and MCTP delivery; every server
//! receives assignments with MCTP and applies them to its own site directory with cm-site. The
//! demo publishes `examples/site`, commits, publishes a small change, commits, rolls back, and
//! prints where each server's live tree is.

use anyhow::{Context, bail};
use cm_agent::leader::{MctpDelivery, SegmentMembers};
use cm_agent::mctp::{ReceiveOptions, receive};
use cm_manager::cluster::{operator_client, report_discovery};
use cm_manager::http::JsonClient;
use cm_manager::leader::{LeaderConfig, LeaderNode};
use cm_manager::model::{DiscoveryReport, Job, JobKind, JobPolicy, JobSpec, JobState, Payload, ServerOutcome};
use cm_manager::prepare::copy_tree;
use cm_manager::server::{Manager, ManagerConfig};
use cm_mctp::SenderConfig;
use cm_site::{NativeInterpreter, Site, SiteConfig};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::Rng;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the demo cluster (default: a new one under the system's temp directory; kept
    /// afterwards so the live trees can be looked at).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Segments (each with its own group leader and multicast group).
    #[arg(long, default_value_t = 3)]
    pub segments: usize,
    /// Servers per segment.
    #[arg(long, default_value_t = 4)]
    pub servers: usize,
    /// The site to publish (default: this repository's examples/site).
    #[arg(long)]
    pub site: Option<PathBuf>,
}

const SEGMENT_NAMES: [&str; 6] = ["london", "paris", "boston", "tokyo", "sydney", "lima"];
const LOCATIONS: [&str; 6] = ["Europe/London", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "America/Lima"];

/// What a server did with one assignment.
struct Applied {
    server: String,
    result: Result<String, String>,
}

struct Server {
    name: String,
    root: PathBuf,
}

fn token() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A server: receive each assignment by MCTP, apply it to the site, tell the demo.
async fn server_loop(name: String, id: u64, group: SocketAddr, secret: Vec<u8>, root: PathBuf, tx: mpsc::UnboundedSender<Applied>) {
    let inbox = root.with_extension("inbox");
    loop {
        let opts = ReceiveOptions {
            group,
            interface: Ipv4Addr::LOCALHOST,
            member: id,
            secret: secret.clone(),
            dir: inbox.clone(),
            timeout: Duration::from_secs(24 * 3600),
            linger: Duration::from_millis(300),
            session_timeout: Duration::from_secs(20),
            inject_loss: 0.0,
        };
        let result = match receive(opts).await {
            Ok(got) => {
                let root = root.clone();
                let path = got.path.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let site = Site::open(&root, SiteConfig::default()).map_err(|e| e.to_string())?;
                    let rep = site.apply(&path, &mut NativeInterpreter).map_err(|e| e.to_string())?;
                    Ok::<_, String>(match rep.now_live {
                        Some(l) => format!("{:?} {}: live is now release {l}", rep.kind, rep.serial),
                        None => format!("{:?} {}: release built, {} commands, {} bytes written", rep.kind, rep.serial, rep.commands, rep.bytes_written),
                    })
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                let _ = std::fs::remove_file(&got.path);
                r
            }
            Err(e) => Err(e.to_string()),
        };
        if tx.send(Applied { server: name.clone(), result }).is_err() {
            return;
        }
    }
}

struct Demo {
    url: String,
    op: JsonClient,
    leaders: Vec<(String, Arc<LeaderNode>)>,
    servers: Vec<Server>,
    applied: mpsc::UnboundedReceiver<Applied>,
}

impl Demo {
    async fn submit(&self, name: &str, kind: JobKind, payload: Payload) -> anyhow::Result<Job> {
        let spec = JobSpec { name: name.into(), kind, site: "www".into(), payload, start_at_ms: 0, every_ms: None, policy: JobPolicy::default() };
        Ok(self.op.post(&format!("{}/api/v1/jobs", self.url), &spec).await?)
    }

    /// Runs one job to its end with a progress bar per segment, then waits for every server's apply.
    async fn step(&mut self, title: &str, kind: JobKind, payload: Payload) -> anyhow::Result<()> {
        println!("\n== {title}");
        let job = self.submit(title, kind, payload).await?;
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("  {prefix:>8} [{bar:30}] {bytes:>9}/{total_bytes:<9} {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let mut bars: Vec<ProgressBar> = Vec::new();
        let mut run = None;
        let job = loop {
            let j: Job = self.op.get(&format!("{}/api/v1/jobs/{}", self.url, job.id)).await?;
            if let (None, JobState::Running { run: r }) = (run, &j.state) {
                run = Some(*r);
                let rr: serde_json::Value = self.op.get(&format!("{}/api/v1/runs/{r}", self.url)).await?;
                let size = rr["run"]["manifest"]["size"].as_u64().unwrap_or(0);
                for (seg, _) in &self.leaders {
                    let b = multi.add(ProgressBar::new(size));
                    b.set_style(style.clone());
                    b.set_prefix(seg.clone());
                    bars.push(b);
                }
            }
            if let Some(r) = run {
                for ((_, gl), b) in self.leaders.iter().zip(&bars) {
                    let p = gl.progress(r).unwrap_or(0);
                    b.set_position(p);
                    if p == b.length().unwrap_or(0) {
                        b.set_message("received");
                    }
                }
            }
            match &j.state {
                JobState::Done | JobState::Cancelled { .. } => break j,
                JobState::Idle if j.attempts > 0 => break j,
                JobState::Idle if j.last_reason.is_some() => bail!("job {} did not start: {}", j.id, j.last_reason.unwrap_or_default()),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for b in &bars {
            b.finish();
        }
        if job.state != JobState::Done {
            bail!("job {} ended {:?}: {}", job.id, job.state, job.last_reason.unwrap_or_default());
        }
        let run = run.context("the job finished without a run")?;
        // Every server applies what it received; collect that before the next step.
        let mut applied: BTreeMap<String, Result<String, String>> = BTreeMap::new();
        while applied.len() < self.servers.len() {
            let a = tokio::time::timeout(Duration::from_secs(60), self.applied.recv())
                .await
                .context("servers did not finish applying within 60 s")?
                .context("server tasks ended")?;
            applied.insert(a.server, a.result);
        }
        let rr: serde_json::Value = self.op.get(&format!("{}/api/v1/runs/{run}", self.url)).await?;
        let reports: Vec<(String, ServerOutcome)> = serde_json::from_value(rr["reports"].clone())?;
        println!("  {:<12} {:<12} {}", "server", "delivery", "applied");
        for (server, outcome) in reports {
            let o = match outcome {
                ServerOutcome::Succeeded => "ok".to_string(),
                ServerOutcome::Failed { reason } => format!("failed: {reason}"),
                ServerOutcome::Missing => "missing".to_string(),
            };
            let a = match applied.get(&server) {
                Some(Ok(s)) => s.clone(),
                Some(Err(e)) => format!("FAILED: {e}"),
                None => "no report".into(),
            };
            println!("  {server:<12} {o:<12} {a}");
        }
        if applied.values().any(|r| r.is_err()) {
            bail!("some servers failed to apply; see above");
        }
        Ok(())
    }

    /// Every server's live index.html must contain `needle`.
    fn check_live(&self, needle: &str) -> anyhow::Result<()> {
        for s in &self.servers {
            let site = Site::open(&s.root, SiteConfig::default())?;
            let index = std::fs::read_to_string(site.live_path().join("index.html"))
                .with_context(|| format!("reading {}'s live index.html", s.name))?;
            if !index.contains(needle) {
                bail!("{}'s live index.html does not say {needle:?}", s.name);
            }
        }
        println!("  every server's live index.html says {needle:?}");
        Ok(())
    }
}

fn default_site() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/site")
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.segments == 0 || a.segments > SEGMENT_NAMES.len() || a.servers == 0 {
        bail!("--segments must be 1..={} and --servers at least 1", SEGMENT_NAMES.len());
    }
    let dir = a.dir.unwrap_or_else(|| std::env::temp_dir().join(format!("cmover-demo-{}", std::process::id())));
    let site_src = a.site.unwrap_or_else(default_site);
    let staging = dir.join("staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    copy_tree(&site_src, &staging).with_context(|| format!("copying {} to the staging tree", site_src.display()))?;
    println!("demo cluster in {}", dir.display());

    let (operator, agent) = (token(), token());
    let mut cfg = ManagerConfig::new(dir.join("manager"), &operator, &agent);
    cfg.tick = Duration::from_millis(100);
    cfg.probe_interval = Duration::from_secs(1);
    // A small tree even for three segments: the manager serves the first GL, which forwards.
    cfg.tree.star_max = 1;
    cfg.tree.root_fanout = 1;
    cfg.tree.leader_fanout = 2;
    let manager = Manager::start(cfg).await.context("starting the manager")?;
    let url = manager.url().to_string();
    println!("manager at {url}");

    let secret: Vec<u8> = token().into_bytes();
    let (tx, applied) = mpsc::unbounded_channel();
    let mut leaders = Vec::new();
    let mut servers = Vec::new();
    // Ports from the process id so two demos on one machine do not collide.
    let base_port = 40000 + (std::process::id() % 2000) as u16 * 10;
    for s in 0..a.segments {
        let seg = SEGMENT_NAMES[s].to_string();
        let group: SocketAddr = SocketAddr::from(([239, 77, 200, s as u8 + 1], base_port + s as u16 * 2));
        let report_port = base_port + s as u16 * 2 + 1;
        let mut members = BTreeMap::new();
        for n in 0..a.servers {
            let name = format!("{seg}-{}", n + 1);
            let root = dir.join("servers").join(&name);
            members.insert(name.clone(), n as u64 + 1);
            tokio::spawn(server_loop(name.clone(), n as u64 + 1, group, secret.clone(), root.clone(), tx.clone()));
            servers.push(Server { name, root });
        }
        let names: Vec<String> = members.keys().cloned().collect();
        let mut config = SenderConfig::new(group, report_port);
        config.frame_size = 8192;
        let delivery = Arc::new(MctpDelivery {
            config,
            interface: Ipv4Addr::LOCALHOST,
            ttl: 0,
            secret: secret.clone(),
            segment: SegmentMembers { members },
        });
        let gl = LeaderNode::start(LeaderConfig::new(&seg, &names[0], &agent, &dir.join("gl").join(&seg)), delivery).await?;
        report_discovery(
            &url,
            &agent,
            &DiscoveryReport {
                segment: seg.clone(),
                leader: names[0].clone(),
                address: gl.addr.to_string(),
                location: LOCATIONS[s].into(),
                cpu_power: 100 - s as u32,
                free_disk: 1 << 34,
                connections: 1,
                members: names.clone(),
            },
        )
        .await?;
        println!("segment {seg}: group leader {} at {}, {} servers on {group}", names[0], gl.addr, names.len());
        leaders.push((seg, Arc::new(gl)));
    }
    // Let every server join its multicast group before the first session.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let op = operator_client(&operator);
    let all: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
    let _: serde_json::Value = op.put(&format!("{url}/api/v1/groups/demo"), &serde_json::json!({ "servers": all })).await?;
    let _: serde_json::Value = op
        .put(&format!("{url}/api/v1/sites/www"), &serde_json::json!({ "content_group": "demo", "staging": staging.display().to_string() }))
        .await?;

    let mut demo = Demo { url, op, leaders, servers, applied };
    demo.step("publish examples/site", JobKind::Publish, Payload::Staging).await?;
    demo.step("commit", JobKind::Commit, Payload::Commit { serial: None }).await?;
    demo.check_live("first publish")?;

    println!("\n== changing the staging tree: index.html edited, news.html added, robots.txt removed");
    let index = std::fs::read_to_string(staging.join("index.html"))?;
    std::fs::write(staging.join("index.html"), index.replace("first publish", "second publish"))?;
    std::fs::write(staging.join("news.html"), "<!doctype html><title>News</title><p>A delta publish reached every server.</p>\n")?;
    let _ = std::fs::remove_file(staging.join("robots.txt"));
    demo.step("publish the delta", JobKind::Publish, Payload::Staging).await?;
    demo.step("commit", JobKind::Commit, Payload::Commit { serial: None }).await?;
    demo.check_live("second publish")?;
    demo.step("rollback", JobKind::Rollback, Payload::Rollback).await?;
    demo.check_live("first publish")?;

    println!("\n== where each server's live tree is");
    for s in &demo.servers {
        let site = Site::open(&s.root, SiteConfig::default())?;
        let target = std::fs::read_link(site.live_path()).map(|t| t.display().to_string()).unwrap_or_default();
        println!("  {:<12} {}  (-> {target})", s.name, site.live_path().display());
    }
    let history: Vec<serde_json::Value> = demo.op.get(&format!("{}/api/v1/history", demo.url)).await?;
    println!("\nthe manager's history log has {} entries ({}/api/v1/history); the demo is done.", history.len(), demo.url);
    drop(manager);
    Ok(())
}
