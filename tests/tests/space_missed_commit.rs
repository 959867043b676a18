//! A server that built a release and missed only its commit, with real processes: a member is
//! stopped between the distribution (manual commit) and the operator's commit. When it comes
//! back, the job the manager makes from the GL's discovery report sends it the commit alone —
//! a header-only assignment that switches it to the release it already built and verified —
//! instead of the whole release (which it refused before: its serial names a release built
//! from another assignment). Twice: once when it held nothing (the replicate path), once when
//! it held the release before (the synchronize path).

use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobState, OnFailure, Payload, Quorum, Run,
};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use serde_json::Value;

async fn wait_done(c: &TestCluster, id: u64) -> Job {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let j: Job = c.op.get(&c.url(&format!("jobs/{id}"))).await.unwrap();
        if j.state == JobState::Done {
            return j;
        }
        let over = matches!(j.state, JobState::Cancelled { .. });
        assert!(Instant::now() < end && !over, "job {id}: {j:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn policy(commit: CommitPolicy, min_percent: u8) -> JobPolicy {
    JobPolicy {
        on_failure: OnFailure::Cancel,
        commit,
        quorum: Quorum { min_percent, min_servers: 1 },
        ..JobPolicy::default()
    }
}

async fn live_of(c: &TestCluster) -> u64 {
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    site["committed"].as_array().unwrap().last().unwrap().as_u64().unwrap()
}

/// Publishes (manual commit) to every server, stops `down`, commits on the others, starts it
/// again, and checks the job that brings it up to date sends it the commit only.
async fn missed_commit_round(c: &mut TestCluster, down: usize, round: u32) {
    let name = c.agents[down].spec.name.clone();
    for f in 0..40 {
        let body = format!("round {round} file {f}\n").repeat(400);
        fs::write(c.staging.join(format!("page-{f:02}.txt")), body).unwrap();
    }
    let publish = c
        .submit_with(JobKind::Publish, Payload::Staging, policy(CommitPolicy::Manual, 100))
        .await
        .unwrap();
    wait_done(c, publish.id).await;
    let release = {
        let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
        site["prepared"].as_u64().expect("a prepared release")
    };
    assert!(c.agents[down].site_root.join(format!("releases/{release}")).is_dir());

    c.agents[down].guard.kill();
    c.wait_segments(2, Duration::from_secs(30)).await.unwrap();
    let commit = c
        .submit_with(
            JobKind::Commit,
            Payload::Commit { serial: None },
            policy(CommitPolicy::Auto, 60),
        )
        .await
        .unwrap();
    wait_done(c, commit.id).await;
    assert_eq!(live_of(c).await, release);
    let jobs_before: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();

    c.restart_agent(down).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let catch_up = loop {
        let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
        if let Some(j) =
            jobs.into_iter().find(|j| j.id > jobs_before.iter().map(|j| j.id).max().unwrap_or(0))
        {
            break j;
        }
        assert!(Instant::now() < end, "no job for {name}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(catch_up.spec.kind, JobKind::Synchronize, "{catch_up:?}");
    assert_eq!(catch_up.spec.payload, Payload::CatchUp { servers: vec![name.clone()] });
    wait_done(c, catch_up.id).await;

    // One run: the commit of the release it built, header only.
    let runs: Vec<Run> = c.op.get(&c.url(&format!("runs?job={}", catch_up.id))).await.unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(
        (run.commit_of, run.release),
        (Some(publish_run(c, publish.id).await), Some(release))
    );
    assert!(run.manifest.size < 1024, "header only: {} bytes", run.manifest.size);
    assert_eq!(run.disk_needed, 0);
    let h: Vec<Value> = c.op.get(&c.url(&format!("history?job={}", catch_up.id))).await.unwrap();
    let text: String = h.iter().map(|e| format!("{}\n", e["event"].as_str().unwrap())).collect();
    assert!(text.contains("missed only its commit: sending the commit alone"), "{text}");
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert_eq!(site["holders"][&name], release, "{site}");
    assert_eq!(observe(&c.agents[down].site_root.join("current")), observe(&c.staging));
}

async fn publish_run(c: &TestCluster, job: u64) -> u64 {
    let runs: Vec<Run> = c.op.get(&c.url(&format!("runs?job={job}"))).await.unwrap();
    runs.iter().find(|r| r.commit_of.is_none()).expect("the distribution run").id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_missed_only_the_commit_gets_just_the_commit() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>hello</h1>").unwrap();
    let mut c = TestCluster::start(&Layout::new(211, 1, 3), src.path()).await.unwrap();
    let leader = c.leader_of("seg0").expect("a GL");
    let down = (0..3).find(|i| *i != leader).unwrap();
    // It held nothing before: the manager would have replicated the live release whole.
    missed_commit_round(&mut c, down, 1).await;
    // It held the release before: the manager would have sent a delta from it.
    missed_commit_round(&mut c, down, 2).await;
    c.assert_live_everywhere(&observe(&c.staging), "every server live");
}
