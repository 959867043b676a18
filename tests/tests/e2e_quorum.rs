//! End to end with real processes: a segment below its quorum. Two of three servers die (kill
//! -9); their GL notices they left and tells the manager; a publish that needs every server is
//! deferred with a reason naming the quorum and the servers that are not live, starts no run and
//! touches nothing. When the servers come back the deferred job runs and reaches all of them.

use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{
    CommitPolicy, JobKind, JobPolicy, JobState, OnBlocked, OnFailure, Payload, Quorum,
};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_below_quorum_defers_the_job_with_its_reason() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>quorum</h1>").unwrap();
    let mut c = TestCluster::start(&Layout::new(4, 1, 3), src.path()).await.unwrap();
    let seg = c.segments[0].clone();
    let gl = c.leader_of(&seg).expect("a leader");
    let dead: Vec<usize> = (0..c.agents.len()).filter(|i| *i != gl).collect();
    for &i in &dead {
        c.agents[i].guard.kill();
    }
    // The GL drops them from its segment and reports it.
    c.wait_segments(1, Duration::from_secs(30)).await.unwrap();

    let policy = JobPolicy {
        quorum: Quorum { min_percent: 100, min_servers: 1 },
        commit: CommitPolicy::Auto,
        on_failure: OnFailure::Cancel,
        on_quorum_shortfall: OnBlocked::Queue,
        defer_ms: 1000,
        ..JobPolicy::default()
    };
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await.unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let j: cm_manager::model::Job =
            c.op.get(&c.url(&format!("jobs/{}", job.id))).await.unwrap();
        assert_eq!(j.state, JobState::Idle, "a job short of its quorum must not run: {j:?}");
        if let Some(r) = j.last_reason.clone().filter(|r| r.starts_with("deferred")) {
            break r;
        }
        assert!(Instant::now() < end, "the job was never deferred: {j:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for &i in &dead {
        assert!(
            reason.contains(&c.agents[i].spec.name),
            "the reason names the servers that are not live: {reason}"
        );
    }
    let runs: Vec<Value> = c.op.get(&c.url("runs")).await.unwrap();
    assert!(
        runs.iter().all(|r| r["job"].as_u64() != Some(job.id)),
        "a deferred job started a run: {runs:?}"
    );
    assert!(!c.agents[gl].site_root.join("current").exists(), "nothing may go live");

    // The servers come back: the deferred job runs on its next try and reaches every server.
    for &i in &dead {
        c.restart_agent(i).unwrap();
    }
    c.wait_segments(3, Duration::from_secs(30)).await.unwrap();
    let (j, reports) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?}; {reports:?}\n{}", j.last_reason, c.logs());
    let want = observe(&c.staging);
    for a in &c.agents {
        assert_eq!(observe(&a.site_root.join("current")), want, "{}", a.spec.name);
    }
}
