//! End to end with real processes: the group leader is killed (SIGKILL) while it delivers a run
//! to its members; the segment elects a new GL, which reports itself to the manager, is handed
//! the run, and completes it: every remaining server applies it (those that already had answer
//! with their result again).

use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{JobKind, JobState, Payload, ServerOutcome};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_gl_mid_distribution_elects_a_new_one_that_completes_the_job() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>failover</h1>").unwrap();
    // Incompressible, so MCTP at the capped rate takes a couple of seconds.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..4 << 20)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    fs::write(src.path().join("video.bin"), big).unwrap();
    let mut layout = Layout::new(3, 1, 4);
    layout.max_rate_mbps = Some(12);
    let mut c = TestCluster::start(&layout, src.path()).await.unwrap();
    let seg = c.segments[0].clone();
    let old = c.leader_of(&seg).expect("a leader");
    let old_name = c.agents[old].spec.name.clone();

    let job = c.submit(JobKind::Publish, Payload::Staging, 75).await.unwrap();
    let run = c.run_of(job.id, Duration::from_secs(20)).await.unwrap();
    // Kill the GL once it holds the assignment and is delivering it to its members.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let rr: Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
        match rr["run"]["segments"][&seg]["status"].as_str() {
            Some("received") => break,
            Some("reported") => {
                panic!("the run finished before the GL could be killed; slow MCTP down further")
            }
            _ => {}
        }
        assert!(Instant::now() < end, "the GL never received the run\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.agents[old].guard.kill();

    let (j, reports) = c.finish(job.id, Duration::from_secs(90)).await.unwrap();
    let new = c.leader_of(&seg).expect("a new leader");
    assert_ne!(new, old, "the killed GL cannot lead");
    assert_eq!(j.state, JobState::Done, "{:?}; reports {reports:?}\n{}", j.last_reason, c.logs());
    for (i, a) in c.agents.iter().enumerate().filter(|(i, _)| *i != old) {
        let outcome = reports.iter().find(|(s, _)| *s == a.spec.name).map(|(_, o)| o.clone());
        assert_eq!(
            outcome,
            Some(ServerOutcome::Succeeded),
            "server {i} {}: {reports:?}",
            a.spec.name
        );
    }
    let segs: Vec<Value> = c.op.get(&c.url("segments")).await.unwrap();
    assert_ne!(
        segs[0]["leader"].as_str(),
        Some(old_name.as_str()),
        "the manager still names the dead GL: {segs:?}"
    );

    // The job completed for real: committing makes the staging tree live on every survivor.
    let commit = c.submit(JobKind::Commit, Payload::Commit { serial: None }, 75).await.unwrap();
    let (j, _) = c.finish(commit.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(j.state, JobState::Done);
    let want = observe(&c.staging);
    for a in c.agents.iter().enumerate().filter(|(i, _)| *i != old).map(|(_, a)| a) {
        assert_eq!(observe(&a.site_root.join("current")), want, "{}", a.spec.name);
    }
}
