//! End to end against rsync, side by side in one run: a generated site (10,000 files, 200 MiB by
//! default: mixed sizes, half compressible text, half incompressible bytes) published with real
//! processes (a manager and 3 segments × 4 `cmover agent`s on loopback, `TestCluster`) — first
//! the whole site, then a 1 % change (1 % of the files edited a little) — beside a baseline of
//! `rsync -a --delete --stats` from the staging tree to each of the 12 servers' directories, one
//! after another, on the same machine.
//!
//! ```text
//! cargo bench -p cm-tests --bench e2e_vs_rsync
//! CM_E2E_FILES=2000 CM_E2E_MB=40 cargo bench -p cm-tests --bench e2e_vs_rsync   # smaller
//! ```
//! `CM_E2E_SEGMENTS` / `CM_E2E_SERVERS` change the cluster (default 3 × 4). `CMOVER_BIN` runs a
//! `cmover` built beforehand (`cargo build --release --bin cmover`) instead of building one.
//!
//! Time: Content Mover from the job's submission until the job is done, i.e. its commit run
//! succeeded on every server (the live tree of every server equals staging; checked after the
//! clock stops); the distribution run alone is shown too. rsync: the 12 runs one after another.
//! Bytes: ours are the assignment's size × its transfers (one HTTP fetch per group leader down
//! the tree + one multicast pass per segment; MCTP repairs are not counted, loopback loses
//! nothing); the commit run's header-only assignment is left out. rsync's are the sum of its
//! `Total bytes sent`. Every step starts after a `sync` (outside its time), so none pays for the
//! writeback of the one before; rsync does not flush its copies, our apply does (`syncfs`), so
//! rsync is also shown followed by a `sync`. Local rsync copies changed files whole (`--whole-file` is its default
//! between local paths), so the change is also shown with `--no-whole-file` (its delta
//! algorithm, as over a network). Everything the bench creates is removed at the end.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cm_manager::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobState, OnFailure, Payload, Quorum, ServerOutcome,
};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

const WORDS: [&str; 16] = [
    "content",
    "mover",
    "segment",
    "leader",
    "assignment",
    "release",
    "server",
    "publish",
    "commit",
    "staging",
    "tree",
    "multicast",
    "delta",
    "rollback",
    "<div class=\"row\">",
    "</div>\n",
];

/// Text that zstd compresses well but not trivially.
fn text(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 32);
    while v.len() < len {
        v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
        v.push(if rng.random_ratio(1, 9) { b'\n' } else { b' ' });
        if rng.random_ratio(1, 7) {
            v.extend_from_slice(format!("{}", rng.random_range(0..100_000)).as_bytes());
        }
    }
    v.truncate(len);
    v
}

/// The site: `files` files in 100 directories, sizes log-uniform (most small, a few large),
/// scaled to `bytes` in all; even-numbered files are text, odd ones incompressible.
fn generate(root: &Path, files: usize, bytes: u64, seed: u64) -> Result<Vec<PathBuf>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let raw: Vec<f64> = (0..files).map(|_| (9.0 + rng.random::<f64>() * 12.0).exp2()).collect();
    let scale = bytes as f64 / raw.iter().sum::<f64>();
    let mut paths = Vec::with_capacity(files);
    for (i, r) in raw.iter().enumerate() {
        let dir = root.join(format!("d{:02}/s{}", i % 100, i % 7));
        fs::create_dir_all(&dir)?;
        let len = ((r * scale) as usize).max(1);
        let (name, data) = if i % 2 == 0 {
            (format!("page{i:05}.html"), text(&mut rng, len))
        } else {
            let mut b = vec![0u8; len];
            rng.fill_bytes(&mut b);
            (format!("blob{i:05}.bin"), b)
        };
        let p = dir.join(name);
        fs::write(&p, data)?;
        paths.push(p.strip_prefix(root)?.to_path_buf());
    }
    Ok(paths)
}

/// Changes every hundredth file a little: text gets a line inserted in the middle, binary files
/// 64 bytes overwritten in the middle.
fn change_one_percent(root: &Path, paths: &[PathBuf], seed: u64) -> Result<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut n = 0;
    for p in paths.iter().skip(rng.random_range(0..100)).step_by(100) {
        let full = root.join(p);
        let mut data = fs::read(&full)?;
        let mid = data.len() / 2;
        if p.extension().is_some_and(|e| e == "html") {
            let line = format!("\n<p>changed {}</p>\n", rng.next_u64());
            data.splice(mid..mid, line.into_bytes());
        } else {
            let end = (mid + 64).min(data.len());
            rng.fill_bytes(&mut data[mid..end]);
        }
        fs::write(&full, data)?;
        n += 1;
    }
    Ok(n)
}

fn tree_bytes(root: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path()),
                        Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
                        _ => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(root)
}

struct Measured {
    time: Duration,
    /// Our distribution run alone (prepare + tree + MCTP + apply + reports).
    distribution: Option<Duration>,
    bytes: u64,
}

/// Publishes staging with the manager's default commit policy (the release goes live once every
/// server built it), timed from submission until the job is done.
async fn publish(c: &TestCluster, segments: u64) -> Result<Measured> {
    let policy = JobPolicy {
        on_failure: OnFailure::Cancel,
        commit: CommitPolicy::Auto,
        quorum: Quorum { min_percent: 100, min_servers: 1 },
        run_timeout_ms: 1_800_000,
        ..JobPolicy::default()
    };
    settle()?;
    let t0 = Instant::now();
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await?;
    let first_run = c.run_of(job.id, Duration::from_secs(600)).await?;
    let mut distribution = None;
    let end = t0 + Duration::from_secs(3600);
    let job = loop {
        if distribution.is_none() {
            let rr: Value = c.op.get(&c.url(&format!("runs/{first_run}"))).await?;
            if rr["run"]["phase"]["phase"] != "distributing" {
                distribution = Some(t0.elapsed());
            }
        }
        let j: Job = c.op.get(&c.url(&format!("jobs/{}", job.id))).await?;
        if matches!(j.state, JobState::Done | JobState::Cancelled { .. }) {
            break j;
        }
        ensure!(Instant::now() < end, "job {} still {:?}\n{}", j.id, j.state, c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let time = t0.elapsed();
    ensure!(
        job.state == JobState::Done,
        "publish ended {:?}: {:?}\n{}",
        job.state,
        job.last_reason,
        c.logs()
    );
    let rr: Value = c.op.get(&c.url(&format!("runs/{first_run}"))).await?;
    let reports: Vec<(String, ServerOutcome)> = serde_json::from_value(rr["reports"].clone())?;
    ensure!(
        reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded),
        "distribution: {reports:?}"
    );
    let size = rr["run"]["manifest"]["size"].as_u64().context("assignment size")?;
    // One HTTP fetch per GL down the tree, one multicast pass per segment.
    Ok(Measured { time, distribution, bytes: size * 2 * segments })
}

/// Flushes every dirty page (`sync`) outside the timings, so no step pays for the previous
/// one's writeback (our apply ends with `syncfs`, which would flush rsync's copies too).
fn settle() -> Result<()> {
    ensure!(Command::new("sync").status()?.success(), "sync failed");
    Ok(())
}

/// `rsync -a --delete --stats [extra] staging/ dest/` to every destination, one after another;
/// also the time once `sync` has made the copies durable (rsync does not flush; our apply does).
fn rsync_all(staging: &Path, dests: &[PathBuf], extra: &[&str]) -> Result<(Measured, Measured)> {
    settle()?;
    let t0 = Instant::now();
    let mut bytes = 0;
    for d in dests {
        let out = Command::new("rsync")
            .args(["-a", "--delete", "--stats"])
            .args(extra)
            .arg(format!("{}/", staging.display()))
            .arg(format!("{}/", d.display()))
            .output()
            .context("running rsync (is it installed?)")?;
        ensure!(
            out.status.success(),
            "rsync to {}: {}",
            d.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stats = String::from_utf8_lossy(&out.stdout);
        let sent = stats
            .lines()
            .find_map(|l| l.strip_prefix("Total bytes sent: "))
            .map(|v| v.replace(',', ""))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .with_context(|| format!("no `Total bytes sent` in rsync's --stats:\n{stats}"))?;
        bytes += sent;
    }
    let plain = Measured { time: t0.elapsed(), distribution: None, bytes };
    settle()?;
    let durable = Measured { time: t0.elapsed(), distribution: None, bytes };
    Ok((plain, durable))
}

/// Every server's live tree (and every rsync copy) equals staging.
fn check_equal(c: &TestCluster, dests: &[PathBuf]) -> Result<()> {
    let want = observe(&c.staging);
    for a in &c.agents {
        if observe(&a.site_root.join("current")) != want {
            bail!("{}: live differs from staging", a.spec.name);
        }
    }
    for d in dests {
        if observe(d) != want {
            bail!("rsync copy {} differs from staging", d.display());
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn row(what: &str, m: &Measured, base: Option<&Measured>) {
    let dist = m.distribution.map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
    let (tr, br) = match base {
        Some(b) => (
            format!("{:.2}x", m.time.as_secs_f64() / b.time.as_secs_f64().max(1e-9)),
            format!("{:.3}x", m.bytes as f64 / (b.bytes as f64).max(1.0)),
        ),
        None => ("1.00x".into(), "1.000x".into()),
    };
    println!(
        "{what:<44} {:>9.2} {:>12} {:>12.0} {:>10} {:>10}",
        m.time.as_secs_f64(),
        dist,
        m.bytes as f64 / 1024.0,
        tr,
        br
    );
}

fn header(title: &str) {
    println!("\n{title}");
    println!(
        "{:<44} {:>9} {:>12} {:>12} {:>10} {:>10}",
        "", "time s", "distrib. s", "KiB sent", "time/rsync", "bytes/rsync"
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let files = env_or("CM_E2E_FILES", 10_000) as usize;
    let total = env_or("CM_E2E_MB", 200) << 20;
    let segments = env_or("CM_E2E_SEGMENTS", 3);
    let servers = env_or("CM_E2E_SERVERS", 4);
    let scratch = tempfile::tempdir()?;
    let source = scratch.path().join("site");
    let t = Instant::now();
    let paths = generate(&source, files, total, 0x5EED_CAFE_F00D_1234)?;
    println!(
        "site: {files} files, {:.1} MiB (half text, half incompressible), generated in {:.1} s; cluster {segments} segments x {servers} servers",
        mib(tree_bytes(&source)),
        t.elapsed().as_secs_f64()
    );
    let mut layout = Layout::new(20, segments as usize, servers as usize);
    layout.report_wait_ms = 600_000;
    let c = TestCluster::start(&layout, &source).await?;
    fs::remove_dir_all(&source)?;
    let dests: Vec<PathBuf> = (0..segments * servers)
        .map(|i| scratch.path().join(format!("rsync/server{i:02}")))
        .collect();
    for d in &dests {
        fs::create_dir_all(d)?;
    }

    header(&format!(
        "first publish: {files} files, {} MiB, to {} servers",
        total >> 20,
        dests.len()
    ));
    let (rsync_first, durable_first) = rsync_all(&c.staging, &dests, &[])?;
    row("rsync -a --delete, to each server in turn", &rsync_first, None);
    row("  the same, then sync (durable, as ours)", &durable_first, None);
    let ours_first = publish(&c, segments).await?;
    row("content mover (publish + commit)", &ours_first, Some(&rsync_first));
    check_equal(&c, &dests)?;

    let changed = change_one_percent(&c.staging, &paths, 0xC0FF_EE00_1234_5678)?;
    header(&format!("1 % change: {changed} files edited a little"));
    let (rsync_change, durable_change) = rsync_all(&c.staging, &dests, &[])?;
    row("rsync -a --delete (whole changed files)", &rsync_change, None);
    row("  the same, then sync", &durable_change, None);
    let ours_change = publish(&c, segments).await?;
    row("content mover (delta publish + commit)", &ours_change, Some(&rsync_change));
    check_equal(&c, &dests)?;
    // A second 1 % change, rsync this time with its delta algorithm.
    change_one_percent(&c.staging, &paths, 0xC0FF_EE00_8765_4321)?;
    let (rsync_delta, durable_delta) = rsync_all(&c.staging, &dests, &["--no-whole-file"])?;
    row("rsync --no-whole-file (its delta algorithm)", &rsync_delta, None);
    row("  the same, then sync", &durable_delta, None);
    let ours_delta = publish(&c, segments).await?;
    row("content mover (delta publish + commit)", &ours_delta, Some(&rsync_delta));
    check_equal(&c, &dests)?;

    println!(
        "\nsummary (same run): content mover / rsync to {} servers one after another",
        dests.len()
    );
    println!("{:<28} {:>10} {:>16} {:>10}", "", "time", "time vs +sync", "bytes");
    for (what, ours, theirs, durable) in [
        ("first publish", &ours_first, &rsync_first, &durable_first),
        ("1 % change", &ours_change, &rsync_change, &durable_change),
        ("1 % change, rsync delta", &ours_delta, &rsync_delta, &durable_delta),
    ] {
        let t = ours.time.as_secs_f64();
        println!(
            "{what:<28} {:>9.2}x {:>15.2}x {:>9.3}x",
            t / theirs.time.as_secs_f64().max(1e-9),
            t / durable.time.as_secs_f64().max(1e-9),
            ours.bytes as f64 / (theirs.bytes as f64).max(1.0)
        );
    }
    drop(c);
    drop(scratch);
    Ok(())
}
