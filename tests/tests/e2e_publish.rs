//! End to end with real processes on loopback: a manager and 2 segments × 3 `cmover agent`s that
//! elect their group leaders. A publish leaves live untouched until its commit, then every
//! server's live tree equals the staging tree; a delta publish commits itself once its quorum is
//! met; rollback brings the first tree back.

use std::fs;
use std::time::Duration;

use cm_manager::model::{
    CommitPolicy, JobKind, JobPolicy, JobState, OnFailure, Payload, Quorum, ServerOutcome,
};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;

fn write(root: &std::path::Path, files: &[(&str, &str)]) {
    for (p, content) in files {
        let full = root.join(p);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(full, content).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delta_commit_rollback_reach_every_server() {
    let src = tempfile::tempdir().unwrap();
    write(
        src.path(),
        &[
            ("index.html", "<h1>first</h1>"),
            ("css/site.css", "body { color: black }"),
            ("img/logo.svg", "<svg/>"),
            ("robots.txt", "User-agent: *"),
        ],
    );
    let c = TestCluster::start(&Layout::new(1, 2, 3), src.path()).await.unwrap();
    // Two GLs, one per segment, elected (none pre-assigned).
    for s in &c.segments {
        assert!(c.leader_of(s).is_some(), "segment {s} has no leader\n{}", c.logs());
    }

    c.run_ok(JobKind::Publish, Payload::Staging).await.unwrap();
    for a in &c.agents {
        assert!(!a.site_root.join("current").exists(), "{}: live before any commit", a.spec.name);
    }
    c.run_ok(JobKind::Commit, Payload::Commit { serial: None }).await.unwrap();
    let v1 = observe(&c.staging);
    for a in &c.agents {
        assert_eq!(
            observe(&a.site_root.join("current")),
            v1,
            "{}: live differs from staging after commit 1",
            a.spec.name
        );
    }

    // A delta: an edit, a new file, a removal.
    write(&c.staging, &[("index.html", "<h1>second</h1>"), ("news.html", "news")]);
    fs::remove_file(c.staging.join("robots.txt")).unwrap();
    // This time the publish commits itself once its quorum is met (the manager's default).
    let policy = JobPolicy {
        on_failure: OnFailure::Cancel,
        quorum: Quorum { min_percent: 100, min_servers: 1 },
        ..JobPolicy::default()
    };
    assert_eq!(policy.commit, CommitPolicy::Auto);
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await.unwrap();
    let (j, reports) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?}; {reports:?}\n{}", j.last_reason, c.logs());
    assert_eq!(reports.len(), c.agents.len(), "{reports:?}");
    assert!(
        reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded),
        "the commit run: {reports:?}"
    );
    let v2 = observe(&c.staging);
    assert_ne!(v1, v2);
    for a in &c.agents {
        assert_eq!(
            observe(&a.site_root.join("current")),
            v2,
            "{}: live differs from staging after commit 2",
            a.spec.name
        );
    }

    c.run_ok(JobKind::Rollback, Payload::Rollback { to: None }).await.unwrap();
    for a in &c.agents {
        assert_eq!(
            observe(&a.site_root.join("current")),
            v1,
            "{}: rollback did not bring release 1 back",
            a.spec.name
        );
    }
    // The agents say what they applied.
    for a in &c.agents {
        let st = a.status().unwrap();
        let applied = st["applied"].as_array().unwrap();
        assert_eq!(applied.len(), 5, "{}: {st}", a.spec.name);
        assert!(applied.iter().all(|r| r["ok"] == true), "{}: {st}", a.spec.name);
        // Applied by the interpreter plugin the agent runs now (the bundled one).
        assert!(st["interpreter"].is_string(), "{}: {st}", a.spec.name);
        assert!(
            applied.iter().all(|r| r["interpreter"] == st["interpreter"]),
            "{}: {st}",
            a.spec.name
        );
    }
}
