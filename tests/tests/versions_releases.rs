//! Release depth and recurring jobs end to end, with a real manager and real agents.
//!
//! - The site's `keep_releases` reaches the servers (in the signed switching assignments): with 3,
//!   every server keeps 3 releases after four publishes (2 before); `rollback --to` the oldest
//!   kept one works, to one no longer kept is refused up front; `switch` makes a kept release
//!   live again.
//! - "How often": a recurring publish over several periods with one change in the middle makes
//!   exactly one new release; the unchanged periods say "unchanged, nothing to publish".

use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{Job, JobKind, JobSpec, JobState, Payload};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use cm_tests::observe;
use serde_json::{Value, json};

fn releases_on(c: &TestCluster, i: usize) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(c.agents[i].site_root.join("releases"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    v.sort_unstable();
    v
}

async fn committed(c: &TestCluster) -> Vec<u64> {
    let sites: Vec<Value> = c.op.get(&c.url("sites")).await.unwrap();
    serde_json::from_value(sites[0]["committed"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_releases_reaches_the_servers_rollback_to_and_switch() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "v1").unwrap();
    let c = TestCluster::start(&Layout::new(161, 1, 2), src.path()).await.unwrap();
    c.put_site(json!({ "keep_releases": 3 })).await.unwrap();
    let mut versions = Vec::new();
    for v in 1..=4 {
        fs::write(c.staging.join("index.html"), format!("v{v}")).unwrap();
        c.publish_committed_everywhere().await.unwrap();
        versions.push(observe(&c.staging));
    }
    let releases = committed(&c).await;
    assert_eq!(releases.len(), 4, "{releases:?}");
    for i in 0..c.agents.len() {
        assert_eq!(releases_on(&c, i), releases[1..].to_vec(), "server {i} keeps the last 3");
    }

    // The oldest is gone from the servers: refused before any job exists.
    let spec = |kind, payload| JobSpec {
        name: "v".into(),
        kind,
        site: "www".into(),
        payload,
        start_at_ms: 0,
        every_ms: None,
        policy: auto_commit_policy(),
    };
    let jobs_before: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    let e =
        c.op.post::<_, Value>(
            &c.url("jobs"),
            &spec(JobKind::Rollback, Payload::Rollback { to: Some(releases[0]) }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("400") && e.contains("no longer kept"), "{e}");
    let e =
        c.op.post::<_, Value>(
            &c.url("jobs"),
            &spec(JobKind::Rollback, Payload::Rollback { to: Some(999) }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("never committed"), "{e}");
    let jobs_after: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    assert_eq!(jobs_before.len(), jobs_after.len(), "a refused job is not stored");

    // Back two releases at once, to the oldest kept one.
    let job: Job = c
        .op
        .post(&c.url("jobs"), &spec(JobKind::Rollback, Payload::Rollback { to: Some(releases[1]) }))
        .await
        .unwrap();
    let (j, r) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?} {r:?}\n{}", j.last_reason, c.logs());
    c.assert_live_everywhere(&versions[1], "after rollback --to");
    assert_eq!(committed(&c).await, releases[..2].to_vec());

    // Switch forward to the newest, still kept on the servers.
    let job: Job =
        c.op.post(&c.url("jobs"), &spec(JobKind::Switch, Payload::Switch { serial: releases[3] }))
            .await
            .unwrap();
    let (j, r) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?} {r:?}\n{}", j.last_reason, c.logs());
    c.assert_live_everywhere(&versions[3], "after switch");
    let e =
        c.op.post::<_, Value>(
            &c.url("jobs"),
            &spec(JobKind::Switch, Payload::Switch { serial: releases[3] }),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already live"), "{e}");
    // The servers went 4 → 2 → 4: release 3 was pruned with the switch (not in their history).
    for i in 0..c.agents.len() {
        let on = releases_on(&c, i);
        assert!(on.contains(&releases[1]) && on.contains(&releases[3]), "server {i}: {on:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurring_publish_makes_a_release_only_when_staging_changed() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "first").unwrap();
    fs::create_dir(src.path().join("css")).unwrap();
    fs::write(src.path().join("css/site.css"), "body{}").unwrap();
    let c = TestCluster::start(&Layout::new(162, 1, 2), src.path()).await.unwrap();
    let period = 1500;
    let spec = JobSpec {
        name: "every 1.5 s".into(),
        kind: JobKind::Publish,
        site: "www".into(),
        payload: Payload::Staging,
        start_at_ms: 0,
        every_ms: Some(period),
        policy: auto_commit_policy(),
    };
    let job: Job = c.op.post(&c.url("jobs"), &spec).await.unwrap();
    let wait_committed = |n: usize| {
        let c = &c;
        async move {
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let got = committed(c).await;
                if got.len() >= n {
                    return got;
                }
                assert!(Instant::now() < end, "{n} releases not committed: {got:?}\n{}", c.logs());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let first = wait_committed(1).await;
    // Several periods with nothing changed, and a touch that keeps the bytes: only the mtime
    // moves (a rewrite would truncate first, and a check landing in that instant rightly sees
    // an empty file; the touch comes half a period off the checks' phase).
    tokio::time::sleep(Duration::from_millis(2 * period + period / 2)).await;
    fs::File::options()
        .write(true)
        .open(c.staging.join("css/site.css"))
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2 * period)).await;
    assert_eq!(committed(&c).await, first, "no release while staging is unchanged");
    // One change: one release.
    fs::write(c.staging.join("index.html"), "second").unwrap();
    let second = wait_committed(2).await;
    c.assert_live_everywhere(&observe(&c.staging), "after the change");
    tokio::time::sleep(Duration::from_millis(3 * period)).await;
    let after = committed(&c).await;
    assert_eq!(after, second, "exactly one new release for one change");
    assert_eq!(after.len(), 2, "{after:?}");
    let runs: Vec<Value> = c.op.get(&c.url("runs")).await.unwrap();
    let ours = runs.iter().filter(|r| r["job"].as_u64() == Some(job.id)).count();
    assert_eq!(ours, 4, "two publishes and their commits, nothing else: {runs:#?}");
    let j: Job = c.op.get(&c.url(&format!("jobs/{}", job.id))).await.unwrap();
    assert_eq!(j.state, JobState::Idle, "still recurring");
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let unchanged = history
        .iter()
        .filter(|h| {
            h["event"].as_str().is_some_and(|e| e.starts_with("unchanged, nothing to publish"))
        })
        .count();
    assert!(unchanged >= 2, "one line per unchanged stretch: {history:#?}");
    for i in 0..c.agents.len() {
        assert_eq!(releases_on(&c, i), after, "server {i}");
    }
}
