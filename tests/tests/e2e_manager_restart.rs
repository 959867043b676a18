//! End to end with real processes: the manager is killed (SIGKILL) while a publish is out on the
//! segments (group leaders hold the assignment and are delivering it to their members, reports
//! not in yet) and started again on the same database. The run it had written down resumes: the
//! GLs' reports reach it, the distribution's success hands the release to the job's commit run,
//! and every server's live tree equals the staging tree. No job state is lost: the same run
//! finishes (nothing is distributed twice), and the history from before the crash is still there.

use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobState, OnFailure, Payload, Quorum, ServerOutcome,
};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Polls the run until `want` holds for its JSON record.
async fn wait_run(c: &TestCluster, run: u64, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(60);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_mid_job_resumes_from_its_database_and_completes_it() {
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("media")).unwrap();
    fs::write(src.path().join("index.html"), "<h1>restart</h1>").unwrap();
    fs::write(src.path().join("about.html"), "<p>about</p>").unwrap();
    // Incompressible, so MCTP at the capped rate keeps the segments busy for a few seconds.
    fs::write(src.path().join("media/video.bin"), incompressible(5 << 20, 0x9E37_79B9_7F4A_7C15))
        .unwrap();
    let mut layout = Layout::new(9, 2, 3);
    layout.max_rate_mbps = Some(16);
    let mut c = TestCluster::start(&layout, src.path()).await.unwrap();

    let policy = JobPolicy {
        on_failure: OnFailure::Cancel,
        commit: CommitPolicy::Auto,
        quorum: Quorum { min_percent: 100, min_servers: 1 },
        ..JobPolicy::default()
    };
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await.unwrap();
    let run = c.run_of(job.id, Duration::from_secs(20)).await.unwrap();
    // Kill once some GL holds the assignment and delivers it, before any segment has reported.
    let before = wait_run(&c, run, "a GL receiving the assignment", |r| {
        let st: Vec<&str> = r["segments"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(|s| s["status"].as_str())
            .collect();
        assert!(
            !st.contains(&"reported"),
            "a segment reported before the manager could be killed; slow MCTP down further: {r}"
        );
        st.contains(&"received")
    })
    .await;
    c.kill_manager();
    assert_eq!(before["run"]["phase"]["phase"], "distributing", "{before}");
    // Down long enough that the GLs finish delivering and their reports find nobody for longer
    // than a few quick retries would cover (an operator's restart, not a blip).
    tokio::time::sleep(Duration::from_secs(18)).await;
    c.start_manager_again().unwrap();

    let (j, reports) = c.finish(job.id, Duration::from_secs(90)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?}; reports {reports:?}\n{}", j.last_reason, c.logs());
    assert_eq!(reports.len(), c.agents.len(), "{reports:?}");
    assert!(
        reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded),
        "the commit run: {reports:?}"
    );
    let want = observe(&c.staging);
    for a in &c.agents {
        assert_eq!(
            observe(&a.site_root.join("current")),
            want,
            "{}: live differs from staging",
            a.spec.name
        );
    }

    // No job state lost: the run from before the crash finished (succeeded, every server), the
    // job took exactly that run and its commit run, and the history still has its start.
    let rr: Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
    assert_eq!(rr["run"]["phase"]["phase"], "succeeded", "{rr}");
    let first: Vec<(String, ServerOutcome)> =
        serde_json::from_value(rr["reports"].clone()).unwrap();
    assert_eq!(first.len(), c.agents.len(), "{first:?}");
    assert!(
        first.iter().all(|(_, o)| *o == ServerOutcome::Succeeded),
        "the distribution run: {first:?}"
    );
    let runs: Vec<Value> = c.op.get(&c.url("runs")).await.unwrap();
    let of_job: Vec<u64> = runs
        .iter()
        .filter(|r| r["job"].as_u64() == Some(job.id))
        .filter_map(|r| r["id"].as_u64())
        .collect();
    assert_eq!(of_job.len(), 2, "one distribution and one commit run, nothing redone: {runs:?}");
    assert!(of_job.contains(&run));
    let j: Job = c.op.get(&c.url(&format!("jobs/{}", job.id))).await.unwrap();
    assert_eq!(j.pending_commit, None, "{j:?}");
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let events: Vec<&str> = history
        .iter()
        .filter(|h| h["run"].as_u64() == Some(run))
        .filter_map(|h| h["event"].as_str())
        .collect();
    assert!(events.iter().any(|e| e.starts_with("run started")), "{events:?}");
    assert!(events.iter().any(|e| e.contains("manager restarted")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("run succeeded")), "{events:?}");
}
