//! Synchronize as a real catch-up, with real processes: a server that was down for five
//! publishes comes back, and the synchronize job the manager makes from the GL's discovery
//! report sends it a delta from the snapshot of the release it holds to live (one assignment,
//! then its commit), not the whole site; the servers already live receive nothing. The site's
//! exclude glob keeps a scratch file off every server, and its compression setting is used.
//! Prints the bytes the returning server received against what a full replicate sends.

use std::fs;
use std::time::{Duration, Instant};

use cm_assignment::{AssignmentType, BuildOptions};
use cm_manager::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobState, OnFailure, Payload, Quorum, Run, RunPhase,
};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use rand::{RngCore, SeedableRng};
use serde_json::{Value, json};

const FILES: usize = 300;
const FILE_BYTES: usize = 8 * 1024;

fn applied(st: &Value) -> usize {
    st["applied"].as_array().map_or(0, Vec::len)
}

async fn wait_job_done(c: &TestCluster, id: u64) -> Job {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let j: Job = c.op.get(&c.url(&format!("jobs/{id}"))).await.unwrap();
        if j.state == JobState::Done {
            return j;
        }
        assert!(
            Instant::now() < end && !matches!(j.state, JobState::Cancelled { .. }),
            "job {id}: {j:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_back_after_five_publishes_catches_up_by_a_delta_from_the_release_it_holds() {
    let src = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(177);
    let mut content = vec![0u8; FILE_BYTES];
    fs::create_dir_all(src.path().join("pages")).unwrap();
    for i in 0..FILES {
        rng.fill_bytes(&mut content);
        fs::write(src.path().join(format!("pages/{i:03}.bin")), &content).unwrap();
    }
    fs::write(src.path().join("index.html"), "<h1>v0</h1>".repeat(50)).unwrap();
    fs::write(src.path().join("scratch.tmp"), "never leaves the manager").unwrap();
    let mut c = TestCluster::start(&Layout::new(177, 1, 3), src.path()).await.unwrap();
    let site = c
        .put_site(json!({
            "keep_releases": 8,
            "filter": {"exclude": ["**/*.tmp"]},
            "compression": {"level": 5, "skip_extensions": ["bin"]}
        }))
        .await
        .unwrap();
    assert_eq!(site["compression"]["level"], 5, "{site}");
    c.publish_committed_everywhere().await.unwrap();
    let first_live: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    let held = first_live["committed"].as_array().unwrap().last().unwrap().as_u64().unwrap();

    // A member (not the GL) goes down; five publishes go live on the others.
    let leader = c.leader_of("seg0").expect("a GL");
    let down = (0..3).find(|i| *i != leader).unwrap();
    let name = c.agents[down].spec.name.clone();
    c.agents[down].guard.kill();
    c.wait_segments(2, Duration::from_secs(30)).await.unwrap();
    let policy = JobPolicy {
        on_failure: OnFailure::Cancel,
        commit: CommitPolicy::Auto,
        quorum: Quorum { min_percent: 60, min_servers: 1 },
        ..JobPolicy::default()
    };
    for round in 1..=5u8 {
        rng.fill_bytes(&mut content);
        fs::write(c.staging.join(format!("pages/{:03}.bin", round * 7)), &content).unwrap();
        fs::write(c.staging.join(format!("new-{round}.html")), format!("<p>{round}</p>")).unwrap();
        fs::write(c.staging.join("scratch.tmp"), format!("scratch {round}")).unwrap();
        let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await.unwrap();
        wait_job_done(&c, job.id).await;
    }
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    let live = site["committed"].as_array().unwrap().last().unwrap().as_u64().unwrap();
    assert_eq!(site["holders"][&name], held, "{site}");
    let mut want = observe(&c.staging);
    want.remove("scratch.tmp");
    let others: Vec<usize> = (0..3).filter(|i| *i != down).collect();
    let before: Vec<usize> =
        others.iter().map(|i| applied(&c.agents[*i].status().unwrap())).collect();
    for i in &others {
        assert_eq!(
            observe(&c.agents[*i].site_root.join("current")),
            want,
            "excluded file kept off"
        );
    }

    // It comes back: the manager makes a synchronize job for it from the discovery report.
    c.restart_agent(down).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let sync = loop {
        let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
        if let Some(j) = jobs.into_iter().find(|j| j.spec.kind == JobKind::Synchronize) {
            break j;
        }
        assert!(Instant::now() < end, "no synchronize job\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sync.spec.payload, Payload::CatchUp { servers: vec![name.clone()] });
    wait_job_done(&c, sync.id).await;
    assert_eq!(observe(&c.agents[down].site_root.join("current")), want, "{name} is live");
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert_eq!(site["holders"][&name], live, "{site}");

    // One delta (from the release it held, with the live serial) and its commit, for it alone.
    let runs: Vec<Run> = c.op.get(&c.url("runs")).await.unwrap();
    let ours: Vec<&Run> = runs.iter().filter(|r| r.job == sync.id).collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    for r in &ours {
        assert_eq!(r.phase, RunPhase::Succeeded, "{r:?}");
        let rr: Value = c.op.get(&c.url(&format!("runs/{}", r.id))).await.unwrap();
        assert_eq!(rr["reports"], json!([[name, {"status": "succeeded"}]]), "{rr}");
    }
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let line = format!("synchronize of {name} from release {held} to live release {live}");
    assert!(
        history.iter().any(|h| h["event"].as_str().is_some_and(|e| e.contains(&line))),
        "no `{line}` in the history"
    );
    for (i, n) in others.iter().zip(&before) {
        let st = c.agents[*i].status().unwrap();
        assert_eq!(applied(&st), *n, "{} applied a catch-up run: {st}", c.agents[*i].spec.name);
    }

    // What a full replicate of live sends, built as the manager builds one (same policy).
    let whole_src = tempfile::tempdir().unwrap();
    cm_manager::prepare::copy_tree(&c.staging, whole_src.path()).unwrap();
    fs::remove_file(whole_src.path().join("scratch.tmp")).unwrap();
    let whole = whole_src.path().join("whole.cma");
    let tree = whole_src.path().join("tree");
    fs::create_dir(&tree).unwrap();
    for e in fs::read_dir(whole_src.path()).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "tree" {
            fs::rename(e.path(), tree.join(e.file_name())).unwrap();
        }
    }
    let mut opts = BuildOptions::new(AssignmentType::Replicate, live);
    opts.policy = cm_manager::filter::compression_policy(
        &serde_json::from_value(json!({"level": 5, "skip_extensions": ["bin"]})).unwrap(),
    );
    let full = cm_assignment::build(&tree, None, &whole, &opts).unwrap().file_len;
    let received = ours[0].manifest.size;
    println!(
        "synchronize of a server that missed 5 runs: {received} bytes received, a full replicate sends {full} bytes ({:.1} %)",
        received as f64 * 100.0 / full as f64
    );
    assert!(received * 10 < full, "a delta, not the whole site: {received} of {full}");

    // Nothing lags now: an operator's synchronize ends at once, with no run.
    let job = c
        .submit_with(JobKind::Synchronize, Payload::CatchUp { servers: vec![] }, policy)
        .await
        .unwrap();
    let j = wait_job_done(&c, job.id).await;
    assert!(
        j.last_reason.as_deref().is_some_and(|r| r.starts_with("nothing to synchronize")),
        "{j:?}"
    );
    let runs: Vec<Run> = c.op.get(&c.url("runs")).await.unwrap();
    assert!(runs.iter().all(|r| r.job != job.id));

    // A change to an excluded file alone: a recurring publish makes no release.
    fs::write(c.staging.join("scratch.tmp"), "edited again, still excluded").unwrap();
    let spec = json!({
        "name": "every second", "kind": "publish", "site": "www",
        "payload": {"type": "staging"}, "every_ms": 1000, "policy": {"quorum": {"min_percent": 60}}
    });
    let job: Job = c.op.post(&c.url("jobs"), &spec).await.unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let j: Job = c.op.get(&c.url(&format!("jobs/{}", job.id))).await.unwrap();
        if j.last_reason.as_deref().is_some_and(|r| r.starts_with("unchanged, nothing to publish"))
        {
            break;
        }
        assert!(Instant::now() < end, "{j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs: Vec<Run> = c.op.get(&c.url("runs")).await.unwrap();
    assert!(runs.iter().all(|r| r.job != job.id), "no run, no release");
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert_eq!(site["committed"].as_array().unwrap().last().unwrap(), live);
}
