//! Failover of the manager in the middle of a run, with real processes and a real PostgreSQL
//! (a throwaway cluster): two `cmover manager` replicas on one database, two segments of agents
//! configured with both URLs. The active replica is killed (-9)
//!
//! - (a) while a publish is in the tree (a GL holds the assignment and delivers it by MCTP,
//!   no segment reported yet), and
//! - (b) while a distributed release waits for its commit;
//!
//! the standby takes the lease over, the agents follow it (discovery, the GLs' tree calls and
//! reports), the run completes, no server applies a run twice (counted in every agent's log),
//! and the commit is made once: the site's history names the release once, and every server's
//! live tree is that release, the staging tree.
//!
//! `failover_figures` (`--ignored`) times it: kill → standby active → a write accepted → the
//! run moving again (a GL's report accepted), several trials; `docs/bench/failover-manager.md`.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{
    CommitPolicy, JobKind, JobPolicy, JobState, OnFailure, Payload, Quorum, ServerOutcome,
};
use cm_tests::cluster::{Layout, TestCluster, is_active};
use cm_tests::observe;
use cm_tests::postgres::PgCluster;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// The lease's time to live in these tests: a takeover comes within about this long.
const LEASE_TTL_MS: u64 = 2000;

fn site(len: usize) -> tempfile::TempDir {
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("media")).unwrap();
    fs::write(src.path().join("index.html"), "<h1>failover</h1>").unwrap();
    let mut v = vec![0u8; len];
    // Incompressible, so MCTP at the capped rate keeps the segments busy for a while.
    ChaCha8Rng::seed_from_u64(0x5EED).fill_bytes(&mut v);
    fs::write(src.path().join("media/video.bin"), v).unwrap();
    src
}

/// Two replicas on a fresh database of `pg`, 2 segments × 2 servers following both.
async fn cluster(pg: &PgCluster, test: u8, db: &str, src: &std::path::Path) -> TestCluster {
    let mut layout = Layout::new(test, 2, 2);
    layout.store = Some(pg.create_db(db).unwrap());
    layout.replicas = 1;
    layout.lease_ttl_ms = Some(LEASE_TTL_MS);
    layout.max_rate_mbps = Some(16);
    let mut c = TestCluster::start(&layout, src).await.unwrap();
    // The first replica took the free lease; the helpers call the active one.
    c.follow_active(Duration::from_secs(30)).await.unwrap();
    c
}

fn policy(commit: CommitPolicy) -> JobPolicy {
    JobPolicy {
        on_failure: OnFailure::Cancel,
        commit,
        quorum: Quorum { min_percent: 100, min_servers: 1 },
        ..JobPolicy::default()
    }
}

/// Polls the run until `want` holds for its JSON record.
async fn wait_run(c: &TestCluster, run: u64, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(rr) = c.op.get::<Value>(&c.url(&format!("runs/{run}"))).await
            && want(&rr["run"])
        {
            return rr;
        }
        assert!(Instant::now() < end, "run {run}: {what} never happened\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn statuses(run: &Value) -> Vec<String> {
    run["segments"]
        .as_object()
        .map(|m| m.values().filter_map(|s| s["status"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Kills the active replica (-9) and waits for the standby to take over; returns the kill's
/// instant and the takeover's.
async fn kill_active(c: &mut TestCluster) -> (Instant, Instant) {
    let killed = Instant::now();
    c.manager.guard.kill();
    let active = c.follow_active(Duration::from_secs(30)).await.unwrap();
    (killed, active)
}

/// How many times each server logged applying `run` ("applied run=N").
fn applies(c: &TestCluster, run: u64) -> BTreeMap<String, usize> {
    let needle = format!("run={run} ");
    c.agents
        .iter()
        .map(|a| {
            let log = fs::read_to_string(&a.guard.log).unwrap_or_default();
            let n = log.lines().filter(|l| l.contains(": applied") && l.contains(&needle)).count();
            (a.spec.name.clone(), n)
        })
        .collect()
}

fn assert_applied_once(c: &TestCluster, run: u64, what: &str) {
    let got = applies(c, run);
    assert!(
        got.values().all(|n| *n == 1),
        "{what} (run {run}): applies per server {got:?}\n{}",
        c.logs()
    );
}

/// The committed release: once in the site's history, the live release of every server, its
/// live tree the staging tree.
async fn assert_committed_once(c: &TestCluster) {
    let s: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    let committed: Vec<u64> =
        s["committed"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    let live = *committed.last().expect("a committed release");
    assert_eq!(committed.iter().filter(|r| **r == live).count(), 1, "{s}");
    assert_eq!(s["prepared"], Value::Null, "{s}");
    let want = observe(&c.staging);
    for a in &c.agents {
        assert_eq!(s["holders"][&a.spec.name].as_u64(), Some(live), "{}: {s}", a.spec.name);
        let serial = cm_site::layout::current_serial(&a.site_root).unwrap();
        assert_eq!(serial, Some(live), "{}: live release", a.spec.name);
        assert_eq!(observe(&a.site_root.join("current")), want, "{}", a.spec.name);
    }
}

fn history_of(h: &[Value], run: u64) -> Vec<String> {
    h.iter()
        .filter(|e| e["run"].as_u64() == Some(run))
        .filter_map(|e| e["event"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_manager_killed_while_a_run_is_in_the_tree() {
    let Some(pg) = PgCluster::start().unwrap() else { return };
    let src = site(4 << 20);
    let mut c = cluster(&pg, 230, "failover_tree", src.path()).await;
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy(CommitPolicy::Auto)).await;
    let job = job.unwrap();
    let run = c.run_of(job.id, Duration::from_secs(20)).await.unwrap();
    let before = wait_run(&c, run, "a GL receiving the assignment", |r| {
        let st = statuses(r);
        assert!(
            !st.iter().any(|s| s == "reported"),
            "reported before the kill; slow MCTP further: {r}"
        );
        st.iter().any(|s| s == "received")
    })
    .await;
    assert_eq!(before["run"]["phase"]["phase"], "distributing");
    let (killed, active) = kill_active(&mut c).await;
    eprintln!("takeover {:?} after the kill (lease {LEASE_TTL_MS} ms)", active - killed);

    let (j, reports) = c.finish(job.id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?}; {reports:?}\n{}", j.last_reason, c.logs());
    assert_eq!(reports.len(), c.agents.len(), "{reports:?}");
    assert!(reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded), "{reports:?}");
    // The same run finished on the replica that took over: one distribution, one commit run.
    let rr: Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
    assert_eq!(rr["run"]["phase"]["phase"], "succeeded", "{rr}");
    let runs: Vec<Value> = c.op.get(&c.url("runs")).await.unwrap();
    let of_job: Vec<u64> = runs
        .iter()
        .filter(|r| r["job"].as_u64() == Some(job.id))
        .filter_map(|r| r["id"].as_u64())
        .collect();
    assert_eq!(of_job.len(), 2, "one distribution and one commit run: {runs:?}");
    for r in &of_job {
        assert_applied_once(&c, *r, "after a failover in the tree");
    }
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let events = history_of(&history, run);
    assert!(events.iter().any(|e| e.contains("took over")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("run succeeded")), "{events:?}");
    assert_committed_once(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_manager_killed_while_a_release_waits_for_its_commit() {
    let Some(pg) = PgCluster::start().unwrap() else { return };
    let src = site(256 << 10);
    let mut c = cluster(&pg, 231, "failover_commit", src.path()).await;
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy(CommitPolicy::Manual));
    let job = job.await.unwrap();
    let (_, reports) = c.finish(job.id, Duration::from_secs(90)).await.unwrap();
    assert!(reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded), "{reports:?}");
    let distribution = c.run_of(job.id, Duration::from_secs(1)).await.unwrap();
    let s: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    let prepared = s["prepared"].as_u64().unwrap_or_else(|| panic!("no prepared release: {s}"));
    for a in &c.agents {
        assert!(!a.site_root.join("current").exists(), "{}: live before the commit", a.spec.name);
    }

    let (killed, active) = kill_active(&mut c).await;
    eprintln!("takeover {:?} after the kill (lease {LEASE_TTL_MS} ms)", active - killed);
    // The replica that took over knows the prepared release and commits it.
    let s: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert_eq!(s["prepared"].as_u64(), Some(prepared), "{s}");
    let commit = c.submit_with(
        JobKind::Commit,
        Payload::Commit { serial: None },
        policy(CommitPolicy::Manual),
    );
    let commit = commit.await.unwrap();
    let (j, reports) = c.finish(commit.id, Duration::from_secs(90)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?}; {reports:?}\n{}", j.last_reason, c.logs());
    assert_eq!(reports.len(), c.agents.len(), "{reports:?}");
    assert!(reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded), "{reports:?}");
    let commit_run = c.run_of(commit.id, Duration::from_secs(1)).await.unwrap();
    assert_applied_once(&c, distribution, "the distribution before the failover");
    assert_applied_once(&c, commit_run, "the commit after the failover");
    assert_committed_once(&c).await;
    let s: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert_eq!(s["committed"].as_array().unwrap().last().and_then(Value::as_u64), Some(prepared));

    // A second commit finds nothing to commit; nothing is applied again.
    let again = c.submit_with(
        JobKind::Commit,
        Payload::Commit { serial: None },
        policy(CommitPolicy::Manual),
    );
    let again = again.await.unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let j = loop {
        let j: cm_manager::model::Job =
            c.op.get(&c.url(&format!("jobs/{}", again.id))).await.unwrap();
        if matches!(j.state, JobState::Done | JobState::Cancelled { .. }) || j.attempts > 0 {
            break j;
        }
        assert!(Instant::now() < end, "the second commit never ended: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(j.state, JobState::Done, "a second commit of the same release: {j:?}");
    assert_applied_once(&c, commit_run, "after a repeated commit");
    assert_committed_once(&c).await;
}

/// One failover's times from the kill.
struct Trial {
    active: Duration,
    write: Duration,
    report: Duration,
    /// Without a failover: from "received" to the first report, for comparison.
    baseline: Duration,
}

/// Waits for the run's first segment report; how long since `from`.
async fn first_report(c: &TestCluster, run: u64, from: Instant) -> Duration {
    wait_run(c, run, "a segment reporting", |r| statuses(r).iter().any(|s| s == "reported")).await;
    from.elapsed()
}

/// Publishes the staging tree (a fresh incompressible file) and waits until a GL received it
/// and none reported; returns the job and its run.
async fn publish_until_received(c: &TestCluster, seed: u64) -> (u64, u64) {
    let mut v = vec![0u8; 1 << 20];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    fs::write(c.staging.join("media/video.bin"), v).unwrap();
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy(CommitPolicy::Auto));
    let job = job.await.unwrap().id;
    let run = c.run_of(job, Duration::from_secs(20)).await.unwrap();
    wait_run(c, run, "a GL receiving the assignment", |r| {
        let st = statuses(r);
        !st.iter().any(|s| s == "reported") && st.iter().any(|s| s == "received")
    })
    .await;
    (job, run)
}

async fn trial(pg: &PgCluster, n: u8) -> Trial {
    let src = site(1 << 20);
    let mut c = cluster(pg, 232 + n, &format!("failover_bench_{n}"), src.path()).await;
    // Baseline: the same kind of run with no failover.
    let (job, run) = publish_until_received(&c, 1).await;
    let baseline = first_report(&c, run, Instant::now()).await;
    c.finish(job, Duration::from_secs(90)).await.unwrap();

    let (_, run) = publish_until_received(&c, 2).await;
    let (killed, active) = kill_active(&mut c).await;
    // A write accepted by the new active replica.
    let body = serde_json::json!({ "servers": ["probe"] });
    while c.op.put::<_, Value>(&c.url("groups/probe"), &body).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let write = killed.elapsed();
    let report = first_report(&c, run, killed).await;
    assert!(is_active(&c.manager).await);
    Trial { active: active - killed, write, report, baseline }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test -p cm-tests --test manager_failover -- --ignored --nocapture"]
async fn failover_figures() {
    let Some(pg) = PgCluster::start().unwrap() else { return };
    let trials: u8 = std::env::var("TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(5);
    let mut rows = Vec::new();
    for n in 0..trials {
        rows.push(trial(&pg, n).await);
    }
    let ms = |d: Duration| d.as_millis();
    println!(
        "lease TTL {LEASE_TTL_MS} ms (renewed every third), 2 replicas, 2 segments × 2 servers"
    );
    println!(
        "| trial | kill → standby active | kill → write accepted | kill → first report accepted | no failover: received → first report |"
    );
    println!("|---|---|---|---|---|");
    for (i, t) in rows.iter().enumerate() {
        println!(
            "| {} | {} ms | {} ms | {} ms | {} ms |",
            i + 1,
            ms(t.active),
            ms(t.write),
            ms(t.report),
            ms(t.baseline)
        );
    }
}
