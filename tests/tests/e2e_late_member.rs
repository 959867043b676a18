//! A server that joins its segment after the live release was committed (long after its GL's
//! settle wait) is brought up to date by a replicate job the manager creates from the GL's
//! discovery report: real processes on loopback. The replicate and its commit target only the
//! newcomer: the servers that already hold the release hear the runs on the data channel and
//! skip them (their apply journals do not grow).

use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{Job, JobKind, JobState, Payload, Run, RunPhase};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use serde_json::Value;

fn applied(st: &Value) -> usize {
    st["applied"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_late_ends_with_the_live_release_and_the_others_skip_its_runs() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>live before the newcomer</h1>").unwrap();
    fs::write(src.path().join("about.html"), "about").unwrap();
    let mut c = TestCluster::start(&Layout::new(12, 1, 3), src.path()).await.unwrap();
    c.run_ok(JobKind::Publish, Payload::Staging).await.unwrap();
    c.run_ok(JobKind::Commit, Payload::Commit { serial: None }).await.unwrap();
    let live = observe(&c.staging);
    let before: Vec<usize> = c.agents.iter().map(|a| applied(&a.status().unwrap())).collect();
    assert!(before.iter().all(|n| *n == 2), "{before:?}");

    // The newcomer is in the content group, then starts (well after the GL settled).
    let mut group: Vec<String> = c.agents.iter().map(|a| a.spec.name.clone()).collect();
    group.push("seg0-late".into());
    let _: Value =
        c.op.put(&c.url("groups/g"), &serde_json::json!({ "servers": group })).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = c.add_agent(0, "seg0-late", 99).unwrap();

    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let st = c.agents[late].status().ok();
        let current = c.agents[late].site_root.join("current");
        if current.exists() && observe(&current) == live {
            break;
        }
        assert!(
            Instant::now() < end,
            "the late member never got the live release: {st:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The replicate job (and its commit run) went to the newcomer only.
    let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    let replicate =
        jobs.iter().find(|j| j.spec.kind == JobKind::Replicate).expect("a replicate job");
    assert_eq!(replicate.spec.payload, Payload::Live { servers: vec!["seg0-late".into()] });
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let j: Job = c.op.get(&c.url(&format!("jobs/{}", replicate.id))).await.unwrap();
        if j.state == JobState::Done {
            break;
        }
        assert!(Instant::now() < end, "replicate job: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs: Vec<Run> = c.op.get(&c.url("runs")).await.unwrap();
    let ours: Vec<&Run> = runs.iter().filter(|r| r.job == replicate.id).collect();
    assert_eq!(ours.len(), 2, "a replicate run and its commit run: {ours:?}");
    for r in ours {
        assert_eq!(r.phase, RunPhase::Succeeded, "{r:?}");
        let rr: Value = c.op.get(&c.url(&format!("runs/{}", r.id))).await.unwrap();
        let reports = rr["reports"].as_array().unwrap();
        assert_eq!(reports.len(), 1, "run {}: {rr}", r.id);
        assert_eq!(reports[0][0], "seg0-late");
    }
    // The servers that held the release skipped both runs.
    for (a, n) in c.agents.iter().zip(&before) {
        let st = a.status().unwrap();
        assert_eq!(applied(&st), *n, "{} applied a run meant for the newcomer: {st}", a.spec.name);
        assert_eq!(observe(&a.site_root.join("current")), live, "{}", a.spec.name);
        // The MCTP announcement named the servers the runs were not for: they did not even
        // receive them (before, they received each run whole and then skipped it).
        let log = a.guard.log_tail(usize::MAX);
        assert!(
            !log.contains("targets other servers of the segment"),
            "{} received a run meant for the newcomer:\n{}",
            a.spec.name,
            a.guard.log_tail(40)
        );
    }
    assert_eq!(
        applied(&c.agents[late].status().unwrap()),
        2,
        "the newcomer applied the replicate and its commit"
    );
}
