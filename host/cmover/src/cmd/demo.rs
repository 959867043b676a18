//! `cmover demo`: a real cluster on this machine. It starts a manager and, for each segment,
//! real `cmover agent` processes (this binary) with their own directories and their segment's
//! control and data multicast groups on 127.0.0.1; each segment elects its group leader (none
//! is pre-assigned), which reports the segment to the manager. The demo then publishes
//! `examples/site`, commits, publishes a small change, commits, rolls back, and prints each
//! server's outcome and where its live tree is. Its children are stopped on exit (also on
//! Ctrl-C: the process guards kill them when dropped). The children log to `<dir>/logs/`, so the
//! progress bars here are never interleaved with log lines.
//!
//! `--serve` keeps the cluster up after the steps: it writes `<dir>/cluster.env` (the manager's
//! URL and the operator's credentials, for `cmover status`, `cmover publish demo --wait` in
//! another shell) once everything is ready, and stops every process on Ctrl-C or SIGTERM.

use anyhow::{Context, bail};
use cm_agent::launch::{self, AgentProcess, AgentSpec, ManagerOptions, ManagerProcess};
use cm_manager::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobSpec, JobState, OnFailure, Payload, ServerOutcome,
};
use cm_manager::prepare::copy_tree;
use cm_tree::http::JsonClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the demo cluster (default: a new one under the system's temp directory; kept
    /// afterwards so the live trees can be looked at).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Segments (each with its own elected group leader and multicast groups).
    #[arg(long, default_value_t = 3)]
    pub segments: usize,
    /// Servers per segment.
    #[arg(long, default_value_t = 4)]
    pub servers: usize,
    /// The site to publish (default: this repository's examples/site).
    #[arg(long)]
    pub site: Option<PathBuf>,
    /// Election heartbeat of the agents, milliseconds.
    #[arg(long, default_value_t = 200)]
    pub heartbeat_ms: u64,
    /// Mutual TLS everywhere: a cluster CA in <dir>/ca and a certificate per process.
    #[arg(long)]
    pub tls: bool,
    /// Seal every assignment with a secret in <dir>/secrets/seal.key (the agents get it too).
    #[arg(long)]
    pub seal: bool,
    /// Keep the cluster running after the steps, with <dir>/cluster.env for the operator
    /// commands, until Ctrl-C or SIGTERM.
    #[arg(long)]
    pub serve: bool,
}

/// The demo's hosted site and its content group (every server).
const SITE: &str = "demo";
const GROUP: &str = "all";

const SEGMENT_NAMES: [&str; 6] = ["london", "paris", "boston", "tokyo", "sydney", "lima"];
const LOCATIONS: [&str; 6] = [
    "Europe/London",
    "Europe/Paris",
    "America/New_York",
    "Asia/Tokyo",
    "Australia/Sydney",
    "America/Lima",
];

/// The running cluster: dropping it kills every child process.
struct Demo {
    manager: ManagerProcess,
    op: JsonClient,
    agents: Vec<AgentProcess>,
    segments: Vec<String>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Demo {
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.manager.url)
    }

    /// Waits until every segment has elected a GL that registered all its servers and reported
    /// them to the manager.
    async fn wait_for_segments(&self, servers: usize) -> anyhow::Result<()> {
        let bar = ProgressBar::new(self.segments.len() as u64)
            .with_style(style("  {spinner} segments ready {pos}/{len} {msg}"));
        bar.enable_steady_tick(Duration::from_millis(100));
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let segs: Vec<serde_json::Value> =
                self.op.get(&self.url("segments")).await.unwrap_or_default();
            let ready: Vec<&serde_json::Value> = segs
                .iter()
                .filter(|s| s["members"].as_array().is_some_and(|m| m.len() == servers))
                .collect();
            bar.set_position(ready.len() as u64);
            if ready.len() == self.segments.len() {
                bar.finish_and_clear();
                for s in ready {
                    println!(
                        "  segment {:<8} elected group leader {:<10} at {} ({} servers)",
                        s["name"].as_str().unwrap_or("?"),
                        s["leader"].as_str().unwrap_or("?"),
                        s["address"].as_str().unwrap_or("?"),
                        servers
                    );
                }
                return Ok(());
            }
            if Instant::now() > end {
                bar.finish_and_clear();
                bail!(
                    "segments not ready after 30 s; see the logs in {}",
                    self.manager
                        .guard
                        .log
                        .parent()
                        .map_or(String::new(), |p| p.display().to_string())
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs one job to its end with a progress bar per segment, then prints each server's outcome.
    async fn step(&self, title: &str, kind: JobKind, payload: Payload) -> anyhow::Result<()> {
        println!("\n== {title}");
        let policy = JobPolicy {
            on_failure: OnFailure::Cancel,
            commit: CommitPolicy::Manual,
            ..JobPolicy::default()
        };
        let spec = JobSpec {
            name: title.into(),
            kind,
            site: SITE.into(),
            payload,
            start_at_ms: 0,
            every_ms: None,
            policy,
        };
        let job: Job = self.op.post(&self.url("jobs"), &spec).await?;
        let multi = MultiProgress::new();
        let bar_style = style("  {prefix:>8} [{bar:20}] {msg}");
        let bars: BTreeMap<String, ProgressBar> = self
            .segments
            .iter()
            .map(|s| {
                let b = multi.add(ProgressBar::new(2).with_style(bar_style.clone()));
                b.set_prefix(s.clone());
                b.set_message("waiting");
                (s.clone(), b)
            })
            .collect();
        let mut run = None;
        let end = Instant::now() + Duration::from_secs(60);
        let job = loop {
            let j: Job = self.op.get(&self.url(&format!("jobs/{}", job.id))).await?;
            if let JobState::Running { run: r } = &j.state {
                run = Some(*r);
            }
            if let Some(r) = run {
                let rr: serde_json::Value = self.op.get(&self.url(&format!("runs/{r}"))).await?;
                for (seg, b) in &bars {
                    let s = &rr["run"]["segments"][seg];
                    let (pos, msg) = match s["status"].as_str() {
                        Some("received") => (
                            1,
                            format!(
                                "GL {} holds it; delivering to members",
                                s["leader"].as_str().unwrap_or("?")
                            ),
                        ),
                        Some("reported") => (2, "reported".to_string()),
                        Some("lost") => (2, "lost".to_string()),
                        _ => (0, "fetching".to_string()),
                    };
                    b.set_position(pos);
                    b.set_message(msg);
                }
            }
            match &j.state {
                JobState::Done | JobState::Cancelled { .. } => break j,
                JobState::Idle if j.attempts > 0 => break j,
                _ => {}
            }
            if Instant::now() > end {
                bail!("job {} did not finish within 60 s (state {:?})", j.id, j.state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for b in bars.values() {
            b.finish();
        }
        let run = run.context("the job finished without a run")?;
        self.print_reports(run).await?;
        if job.state != JobState::Done {
            bail!("job {} ended {:?}: {}", job.id, job.state, job.last_reason.unwrap_or_default());
        }
        Ok(())
    }

    /// The manager's per-server outcome, with what each server says it did for the run.
    async fn print_reports(&self, run: u64) -> anyhow::Result<()> {
        let rr: serde_json::Value = self.op.get(&self.url(&format!("runs/{run}"))).await?;
        let reports: Vec<(String, ServerOutcome)> = serde_json::from_value(rr["reports"].clone())?;
        println!("  {:<12} {:<10} what the server did", "server", "outcome");
        for (server, outcome) in reports {
            let o = match &outcome {
                ServerOutcome::Succeeded => "applied".to_string(),
                ServerOutcome::Failed { .. } => "FAILED".to_string(),
                ServerOutcome::Missing => "missing".to_string(),
            };
            let said = match &outcome {
                ServerOutcome::Failed { reason } => reason.clone(),
                _ => self.applied_summary(&server, run).unwrap_or_default(),
            };
            println!("  {server:<12} {o:<10} {said}");
        }
        Ok(())
    }

    fn applied_summary(&self, server: &str, run: u64) -> Option<String> {
        let a = self.agents.iter().find(|a| a.spec.name == server)?;
        let st = a.status().ok()?;
        let r = st["applied"].as_array()?.iter().find(|r| r["run"].as_u64() == Some(run))?.clone();
        Some(r["summary"].as_str().unwrap_or("").to_string())
    }

    /// Every server's live index.html must contain `needle`.
    fn check_live(&self, needle: &str) -> anyhow::Result<()> {
        for a in &self.agents {
            let index = std::fs::read_to_string(a.site_root.join("current/index.html"))
                .with_context(|| format!("reading {}'s live index.html", a.spec.name))?;
            if !index.contains(needle) {
                bail!("{}'s live index.html does not say {needle:?}", a.spec.name);
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
    if a.segments == 0 || a.segments > SEGMENT_NAMES.len() || a.servers == 0 || a.servers > 50 {
        bail!("--segments must be 1..={} and --servers 1..=50", SEGMENT_NAMES.len());
    }
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cmover-demo-{}", std::process::id()))
    });
    // Absolute, so cluster.env works from any directory.
    let dir = std::path::absolute(&dir).context("the demo directory's path")?;
    let processes = a.segments * a.servers + 1;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("watching for SIGTERM")?;
    // The cluster lives inside this future: a signal drops it, and the guards kill every child.
    let signal = tokio::select! {
        r = demo(a, dir.clone()) => return r,
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    };
    println!(
        "\n{signal}: stopped the cluster ({processes} processes: the manager and {} agents); its files stay in {}",
        processes - 1,
        dir.display()
    );
    Ok(())
}

/// `<dir>/cluster.env`: shell lines for the operator commands (`source` it, then `cmover
/// status`). Written last, through a rename, so its presence means the cluster is ready.
fn write_cluster_env(dir: &Path, manager: &ManagerProcess) -> anyhow::Result<PathBuf> {
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    let mut lines = vec![
        format!("CMOVER_MANAGER={}", manager.url),
        format!("CMOVER_TOKEN_FILE={}", quote(&dir.join("secrets/operator.token"))),
    ];
    let mut names = vec!["CMOVER_MANAGER", "CMOVER_TOKEN_FILE"];
    if let Some(tls) = &manager.tls {
        lines.push(format!("CMOVER_CA={}", quote(&tls.operator.ca)));
        lines.push(format!("CMOVER_CERT={}", quote(&tls.operator.cert)));
        lines.push(format!("CMOVER_KEY={}", quote(&tls.operator.key)));
        names.extend(["CMOVER_CA", "CMOVER_CERT", "CMOVER_KEY"]);
    }
    lines.push(format!("export {}", names.join(" ")));
    let path = dir.join("cluster.env");
    let tmp = dir.join(".cluster.env.tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

async fn demo(a: Args, dir: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let site_src = a.site.clone().unwrap_or_else(default_site);
    let staging = dir.join("staging");
    if dir.join("servers").exists() || dir.join("manager").exists() {
        bail!("{} holds an earlier demo; pass another --dir or remove it", dir.display());
    }
    let _ = std::fs::remove_file(dir.join("cluster.env"));
    copy_tree(&site_src, &staging)
        .with_context(|| format!("copying {} to the staging tree", site_src.display()))?;
    println!("demo cluster in {} (process logs in {}/logs)", dir.display(), dir.display());

    let bin = std::env::current_exe().context("locating the cmover binary")?;
    let opts = ManagerOptions {
        tick_ms: 100,
        star_max: 1,
        root_fanout: 1,
        leader_fanout: 2,
        chunk_kib: 64,
        tls: a.tls,
        seal: a.seal,
        ..ManagerOptions::default()
    };
    let manager = launch::start_manager(&bin, &dir, &opts)?;
    println!(
        "manager at {} (runs signed with {}; agents pin {}{})",
        manager.url,
        manager.signing_key_file.display(),
        manager.public_key_file.display(),
        if a.seal { "; assignments sealed" } else { "" }
    );
    let secret = launch::write_secret(&dir)?;
    // Groups and ports from the process id so two demos on one machine do not collide.
    let salt = (std::process::id() % 200) as u8;
    let base_port = 41000 + (std::process::id() % 1000) as u16 * 16;
    let mut agents = Vec::new();
    let mut segments = Vec::new();
    for s in 0..a.segments {
        let seg = SEGMENT_NAMES[s].to_string();
        let control =
            SocketAddr::from(([239, 78, salt, 2 * s as u8 + 1], base_port + 4 * s as u16));
        let data =
            SocketAddr::from(([239, 78, salt, 2 * s as u8 + 2], base_port + 4 * s as u16 + 2));
        for n in 0..a.servers {
            let spec = AgentSpec {
                name: format!("{seg}-{}", n + 1),
                node_id: (s * 100 + n + 1) as u64,
                segment: seg.clone(),
                location: LOCATIONS[s].into(),
                control,
                data,
                heartbeat_ms: a.heartbeat_ms,
                report_wait_ms: 10_000,
                site_name: SITE.into(),
                weight: 0,
                max_rate_mbps: None,
                seal: Default::default(),
                manager_key: None,
                more_sites: Vec::new(),
                extra_toml: String::new(),
            };
            agents.push(launch::start_agent(&bin, &dir, &manager, &secret, &spec)?);
        }
        println!(
            "segment {seg}: {} agents, control channel {control}, data channel {data}",
            a.servers
        );
        segments.push(seg);
    }
    let op = manager.operator_client()?;
    let demo = Demo { manager, op, agents, segments };
    demo.wait_for_segments(a.servers).await?;

    let all: Vec<String> = demo.agents.iter().map(|a| a.spec.name.clone()).collect();
    let _: serde_json::Value = demo
        .op
        .put(&demo.url(&format!("groups/{GROUP}")), &serde_json::json!({ "servers": all }))
        .await?;
    let staging_abs = std::path::absolute(&staging).context("the staging directory's path")?;
    let _: serde_json::Value = demo
        .op
        .put(&demo.url(&format!("sites/{SITE}")), &serde_json::json!({ "content_group": GROUP, "staging": staging_abs.display().to_string() }))
        .await?;

    demo.step("publish examples/site", JobKind::Publish, Payload::Staging).await?;
    demo.step("commit", JobKind::Commit, Payload::Commit { serial: None }).await?;
    demo.check_live("first publish")?;

    println!(
        "\n== changing the staging tree: index.html edited, news.html added, robots.txt removed"
    );
    let index = std::fs::read_to_string(staging.join("index.html"))?;
    std::fs::write(staging.join("index.html"), index.replace("first publish", "second publish"))?;
    std::fs::write(
        staging.join("news.html"),
        "<!doctype html><title>News</title><p>A delta publish reached every server.</p>\n",
    )?;
    let _ = std::fs::remove_file(staging.join("robots.txt"));
    demo.step("publish the delta", JobKind::Publish, Payload::Staging).await?;
    demo.step("commit", JobKind::Commit, Payload::Commit { serial: None }).await?;
    demo.check_live("second publish")?;
    demo.step("rollback", JobKind::Rollback, Payload::Rollback { to: None }).await?;
    demo.check_live("first publish")?;

    println!("\n== where each server's live tree is");
    for a in &demo.agents {
        let live = a.site_root.join("current");
        let target = std::fs::read_link(&live).map(|t| t.display().to_string()).unwrap_or_default();
        println!("  {:<12} {}  (-> {target})", a.spec.name, live.display());
    }
    let history: Vec<serde_json::Value> = demo.op.get(&demo.url("history")).await?;
    if !a.serve {
        println!(
            "\nthe manager's history log has {} entries; the demo took {:.1} s and is done (stopping {} processes).",
            history.len(),
            started.elapsed().as_secs_f64(),
            demo.agents.len() + 1
        );
        return Ok(());
    }
    let env = write_cluster_env(&dir, &demo.manager)?;
    let login = match &demo.manager.tls {
        Some(t) => format!(
            "log in with the operator certificate {} (key {})",
            t.operator.cert.display(),
            t.operator.key.display()
        ),
        None => format!(
            "log in with the operator token in {}",
            dir.join("secrets/operator.token").display()
        ),
    };
    println!(
        "\nthe demo took {:.1} s; the cluster keeps running ({} processes).",
        started.elapsed().as_secs_f64(),
        demo.agents.len() + 1
    );
    println!("  console:  {}/  ({login})", demo.manager.url);
    println!("  in another shell:");
    println!("    source {}", env.display());
    println!("    cmover status");
    println!("    $EDITOR {}/index.html && cmover publish {SITE} --wait", staging.display());
    println!("  Ctrl-C (or SIGTERM) stops every process.");
    // Until a signal ends the select in `run`, which drops the cluster with this future.
    std::future::pending::<()>().await;
    Ok(())
}
