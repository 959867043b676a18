//! Tree distribution benchmark: one assignment from the manager to N group leaders on loopback.
//!
//! For each upload configuration, every row measured in this run: a single transfer (1 GL), the
//! dynamic tree (fan-out 2), a chain (fan-out 1, fully pipelined: the fan-out
//! `TreeConfig::for_links` picks when uploads are as fast as downloads), a star (the manager
//! sends to each GL itself) and the automatic choice (configured fan-out 2; the GLs measure their
//! links in a first run of an eighth of the size and report them, and the manager shapes the
//! measured run from them: `TreeConfig::for_measured`); then one summary of the ratios to the
//! single transfer side by side.
//! Time is measured from the first byte any GL verifies to the last GL holding the whole
//! assignment; the manager's preparation (copy + chunk hashes) is shown apart.
//!
//! ```text
//! cargo bench -p cm-tests --bench tree -- [--size-mib 512] [--gls 16] [--egress-mib 0,64] [--chunk-kib 1024]
//! ```
//! `--egress-mib N[,M..]` gives every node an upload budget of N MiB/s shared by all its children
//! (a simulated NIC), one configuration per value; 0 = unlimited (then the 2 shared cores are the
//! bottleneck, not the links: 16 receivers do 16 times the hashing, copying and writing of one).

use cm_manager::model::{Job, JobKind, JobPolicy, JobSpec, JobState, Payload};
use cm_manager::server::{Manager, ManagerConfig};
use cm_manager::tree::TreeConfig;
use cm_tests::loopback::{NodeThread, operator_client, report_discovery};
use cm_tree::BoxFuture;
use cm_tree::leader::{DeliveryOutcome, LeaderConfig, LeaderNode, LocalDelivery};
use cm_tree::link::LinkRates;
use cm_tree::manifest::Manifest;
use cm_tree::message::DiscoveryReport;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OP: &str = "bench-operator";
const AGENT: &str = "bench-agent";

/// The benchmark measures the tree alone: the segment side reports success without work.
struct ReportOnlyDelivery(String);

impl LocalDelivery for ReportOnlyDelivery {
    fn deliver(&self, _run: u64, _a: PathBuf, _m: Manifest) -> BoxFuture<'static, DeliveryOutcome> {
        let me = self.0.clone();
        Box::pin(async move { DeliveryOutcome { succeeded: vec![me], ..Default::default() } })
    }
}

struct Args {
    size_mib: u64,
    gls: usize,
    egress_mib: Vec<u64>,
    chunk_kib: u32,
}

fn args() -> Args {
    let mut a = Args { size_mib: 512, gls: 16, egress_mib: vec![0, 64], chunk_kib: 1024 };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = || v.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        match v[i].as_str() {
            "--size-mib" => a.size_mib = next().unwrap_or(a.size_mib),
            "--gls" => a.gls = next().map_or(a.gls, |n| n as usize),
            "--egress-mib" => {
                a.egress_mib = v
                    .get(i + 1)
                    .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
                    .unwrap_or_default();
                if a.egress_mib.is_empty() {
                    a.egress_mib = vec![0];
                }
            }
            "--chunk-kib" => a.chunk_kib = next().map_or(a.chunk_kib, |n| n as u32),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

struct Measured {
    prep: Duration,
    transfer: Duration,
    /// The manager's history line on the run's tree shape.
    shape: String,
}

/// Submits a job publishing `file` to site `s` and returns its id.
fn submit(rt: &tokio::runtime::Runtime, url: &str, file: &Path) -> u64 {
    let spec = JobSpec {
        name: "bench".into(),
        kind: JobKind::Publish,
        site: "s".into(),
        payload: Payload::File { path: file.display().to_string() },
        start_at_ms: 0,
        every_ms: None,
        policy: JobPolicy::default(),
    };
    let job: Job =
        rt.block_on(operator_client(OP).post(&format!("{url}/api/v1/jobs"), &spec)).expect("job");
    job.id
}

/// Waits until the job is over (the GLs of this benchmark report at once).
fn wait_done(rt: &tokio::runtime::Runtime, url: &str, job: u64) {
    let t0 = Instant::now();
    loop {
        let j: Job =
            rt.block_on(operator_client(OP).get(&format!("{url}/api/v1/jobs/{job}"))).expect("job");
        if matches!(j.state, JobState::Done | JobState::Cancelled { .. }) {
            assert_eq!(j.state, JobState::Done, "{:?}", j.last_reason);
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(3600), "job {job} did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn discovery(seg: &str, addr: String, links: Option<LinkRates>) -> DiscoveryReport {
    DiscoveryReport {
        segment: seg.to_string(),
        leader: format!("{seg}-gl"),
        address: addr,
        location: "UTC".into(),
        cpu_power: 100,
        free_disk: 1 << 40,
        connections: 1,
        members: vec![format!("{seg}-gl")],
        links,
        plugins: Default::default(),
        spaces: Default::default(),
    }
}

/// One measured distribution of `file` to `gls` GLs. With `warm_up`, the manager first
/// distributes that (smaller) file with `tree` as its configured shape, the GLs report the link
/// rates they measured, and the measured run is shaped from them (the automatic choice); the
/// shape the manager wrote to its history comes back with the figure.
fn run_one(
    a: &Args,
    egress_mib: u64,
    file: &Path,
    gls: usize,
    tree: TreeConfig,
    warm_up: Option<&Path>,
) -> Measured {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = a.size_mib << 20;
    let egress = (egress_mib > 0).then_some(egress_mib << 20);
    let mut cfg = ManagerConfig::new(dir.path().join("manager"), OP, AGENT);
    cfg.tree = tree;
    cfg.chunk_size = a.chunk_kib << 10;
    cfg.tick = Duration::from_millis(10);
    cfg.egress_bytes_per_sec = egress;
    cfg.signer = Some(cm_tests::test_signer().clone());
    let (url, _m) = NodeThread::spawn("manager", move || async move {
        Manager::start(cfg).await.expect("manager").url().to_string()
    })
    .expect("manager thread");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut nodes = Vec::new();
    for i in 0..gls {
        let seg = format!("seg{i:02}");
        let mut l = LeaderConfig::new(&seg, &format!("{seg}-gl"), AGENT, &dir.path().join(&seg));
        l.egress_bytes_per_sec = egress;
        l.stall = Duration::from_secs(30);
        l.manager_keys = cm_tests::test_pins();
        let d = Arc::new(ReportOnlyDelivery(format!("{seg}-gl")));
        let (node, thread) =
            NodeThread::spawn(
                &seg,
                move || async move { LeaderNode::start(l, d).await.expect("GL") },
            )
            .expect("GL thread");
        rt.block_on(report_discovery(&url, AGENT, &discovery(&seg, node.addr.to_string(), None)))
            .expect("discovery");
        nodes.push((seg, node, thread));
    }
    let op = operator_client(OP);
    let servers: Vec<String> = (0..gls).map(|i| format!("seg{i:02}-gl")).collect();
    let _: serde_json::Value = rt
        .block_on(
            op.put(&format!("{url}/api/v1/groups/g"), &serde_json::json!({ "servers": servers })),
        )
        .expect("group");
    let _: serde_json::Value = rt
        .block_on(op.put(
            &format!("{url}/api/v1/sites/s"),
            &serde_json::json!({ "content_group": "g", "staging": std::env::temp_dir() }),
        ))
        .expect("site");
    let mut run = 1;
    if let Some(warm) = warm_up {
        wait_done(&rt, &url, submit(&rt, &url, warm));
        for (seg, node, _) in &nodes {
            let r = discovery(seg, node.addr.to_string(), node.links().rates());
            rt.block_on(report_discovery(&url, AGENT, &r)).expect("discovery");
        }
        // The warm-up left its copies in dirty pages; flushed during the measured run they
        // would be charged to the automatic row only (the other rows start on a clean cache).
        let _ = std::process::Command::new("sync").status();
        run = 2;
    }
    let t_submit = Instant::now();
    let job = submit(&rt, &url, file);
    let mut t_first = None;
    loop {
        let progress: Vec<u64> =
            nodes.iter().map(|(_, n, _)| n.progress(run).unwrap_or(0)).collect();
        if t_first.is_none() && progress.iter().any(|p| *p > 0) {
            t_first = Some(Instant::now());
        }
        if progress.iter().all(|p| *p == size) {
            break;
        }
        assert!(t_submit.elapsed() < Duration::from_secs(3600), "benchmark run did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
    let t_end = Instant::now();
    let t_first = t_first.unwrap_or(t_end);
    wait_done(&rt, &url, job);
    let history: Vec<serde_json::Value> =
        rt.block_on(op.get(&format!("{url}/api/v1/history"))).expect("history");
    let shape = history
        .iter()
        .filter(|h| h["run"].as_u64() == Some(run))
        .filter_map(|h| h["event"].as_str())
        .find(|e| e.starts_with("tree for"))
        .unwrap_or("")
        .to_string();
    // Every GL verified every chunk on arrival; check one whole copy once more, outside the timing.
    let want = Manifest::of_file(file, 1 << 20).expect("hash source").blake3;
    let last = dir.path().join(format!("seg{:02}", gls - 1)).join(format!("run-{run}.assignment"));
    assert_eq!(Manifest::of_file(&last, 1 << 20).expect("hash copy").blake3, want, "copy differs");
    Measured { prep: t_first - t_submit, transfer: t_end - t_first, shape }
}

fn write_random(path: &Path, mib: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x: u64 = seed;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).expect("write");
    }
}

fn main() {
    let a = args();
    let src = tempfile::tempdir().expect("tempdir");
    let file = src.path().join("assignment.bin");
    write_random(&file, a.size_mib, 0x9E3779B97F4A7C15);
    // The automatic row's first run, whose transfers the GLs measure their links on.
    let warm = src.path().join("warm-up.bin");
    write_random(&warm, (a.size_mib / 8).max(8), 0x2545F4914F6CDD1D);
    let n = a.gls;
    let mut summary = Vec::new();
    for &egress_mib in &a.egress_mib {
        let egress = if egress_mib == 0 {
            "unlimited".to_string()
        } else {
            format!("{egress_mib} MiB/s per node")
        };
        println!(
            "\ntree distribution: {} MiB to {n} GLs on loopback, chunk {} KiB, upload {egress}",
            a.size_mib, a.chunk_kib
        );
        let chain = TreeConfig::for_links(1, 1, 1, n);
        let fan2 = TreeConfig { root_fanout: 2, leader_fanout: 2, star_max: 0 };
        let rows: Vec<(&str, usize, TreeConfig, Option<&Path>)> = vec![
            (
                "single transfer (1 GL)",
                1,
                TreeConfig { root_fanout: 1, leader_fanout: 1, star_max: 1 },
                None,
            ),
            ("dynamic tree, fan-out 2", n, fan2, None),
            ("chain, fan-out 1 (pipelined)", n, chain, None),
            (
                "star (manager sends to each)",
                n,
                TreeConfig { root_fanout: n, leader_fanout: 0, star_max: n },
                None,
            ),
            // Configured as fan-out 2; shaped from what the GLs measured in a first, smaller run.
            ("automatic (measured links)", n, fan2, Some(warm.as_path())),
        ];
        println!(
            "{:<32} {:>6} {:>10} {:>10} {:>12} {:>10}",
            "shape", "GLs", "prep s", "transfer s", "MiB/s per GL", "vs single"
        );
        let mut single = None;
        let mut ratios = Vec::new();
        for (name, gls, tree, warm_up) in rows {
            let m = run_one(&a, egress_mib, &file, gls, tree, warm_up);
            let t = m.transfer.as_secs_f64();
            let base = *single.get_or_insert(t);
            println!(
                "{name:<32} {gls:>6} {:>10.2} {:>10.2} {:>12.1} {:>9.2}x",
                m.prep.as_secs_f64(),
                t,
                a.size_mib as f64 / t,
                t / base
            );
            if warm_up.is_some() {
                println!("    manager: {}", m.shape);
            }
            ratios.push(t / base);
        }
        summary.push((egress, single.unwrap_or(0.0), ratios));
    }
    println!(
        "\nsummary ({} MiB to {n} GLs): total time / one single transfer of the same bytes, same run",
        a.size_mib
    );
    println!(
        "{:<24} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "upload per node", "single s", "tree/single", "chain/single", "star/single", "auto/single"
    );
    for (egress, single, r) in summary {
        println!(
            "{egress:<24} {single:>10.2} {:>11.2}x {:>11.2}x {:>11.2}x {:>11.2}x",
            r[1], r[2], r[3], r[4]
        );
    }
}
