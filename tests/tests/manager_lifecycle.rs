//! A job's whole life against servers that really apply assignments (cm-assignment's reference
//! interpreter, releases and a live pointer): publish → automatic commit → live everywhere; a short run never commits;
//! snapshots pruned; rollback; a new GL elected mid-run picks the run up; a server that joins
//! the content group is brought up to the live release.

mod tree_common;

use cm_manager::model::{
    CommitPolicy, JobKind, JobPolicy, JobSpec, JobState, OnFailure, Payload, Quorum,
};
use cm_tests::loopback::CopyDelivery;
use cm_tests::loopback::NodeThread;
use cm_tree::BoxFuture;
use cm_tree::leader::{DeliveryOutcome, LeaderConfig, LeaderNode, LocalDelivery};
use cm_tree::manifest::Manifest;
use cm_tree::message::{DiscoveryReport, SegmentReport};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tree_common::*;

fn spec(kind: JobKind, payload: Payload, policy: JobPolicy) -> JobSpec {
    JobSpec {
        name: format!("{kind:?}"),
        kind,
        site: "www".into(),
        payload,
        start_at_ms: 0,
        every_ms: None,
        policy,
    }
}

fn staging(dir: &Path) -> PathBuf {
    let s = dir.join("staging");
    std::fs::create_dir_all(s.join("css")).unwrap();
    std::fs::write(s.join("index.html"), "<h1>hello</h1>\n".repeat(200)).unwrap();
    std::fs::write(s.join("css/site.css"), "body { margin: 0 }\n").unwrap();
    std::fs::write(s.join("about.html"), "about us\n").unwrap();
    s
}

fn css(round: usize) -> String {
    format!("body {{ margin: {} }}\n", "1".repeat(round + 2))
}

fn site_cluster(gls: usize, members: usize) -> Cluster {
    let mut o = Options::new(gls);
    o.members_per_gl = members;
    o.tweak_manager = Box::new(|c| c.chunk_size = 64 << 10);
    o.delivery = Box::new(|_, m| Arc::new(SiteDelivery::all(m)));
    Cluster::start(o)
}

fn snapshots(c: &Cluster) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(c.dir.path().join("manager/snapshots/www"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn a_publish_commits_itself_and_every_server_goes_live_then_rolls_back_and_prunes_snapshots() {
    let c = site_cluster(2, 2);
    let stage = staging(c.dir.path());
    c.setup_site_from("www", c.all_servers(), &stage);
    let job = c.submit_spec(&spec(JobKind::Publish, Payload::Staging, JobPolicy::default()));
    let job = c.wait_finished(job.id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", c.history());
    let want = tree_of(&stage);
    for gl in &c.gls {
        for (name, dir) in &gl.members {
            assert!(live_tree(dir) == want, "server {name} is live on the published tree");
        }
    }
    // Two runs in one job: the distribution, then its commit.
    let runs = c.runs();
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!((runs[0]["release"].as_u64(), runs[0]["commit_of"].as_u64()), (Some(1), None));
    assert_eq!((runs[1]["release"].as_u64(), runs[1]["commit_of"].as_u64()), (Some(1), Some(1)));
    assert!(runs.iter().all(|r| r["job"] == job.id && r["phase"]["phase"] == "succeeded"));
    let site = c.site("www");
    assert_eq!(site["committed"], serde_json::json!([1]));
    assert!(site["prepared"].is_null());
    assert_eq!(site["holders"].as_object().unwrap().len(), 4);
    assert!(
        c.history().iter().any(|e| e.contains("release 1 goes live next: commit to 4 servers")),
        "{:#?}",
        c.history()
    );

    // Three more publishes of small changes: each a delta against live, each committed; the
    // snapshots kept are the last two committed releases.
    for round in 0..3 {
        // A different length each time: change detection compares size and mtime (seconds) first.
        std::fs::write(stage.join("css/site.css"), css(round)).unwrap();
        let j = c.submit_spec(&spec(JobKind::Publish, Payload::Staging, JobPolicy::default()));
        assert_eq!(
            c.wait_finished(j.id, Duration::from_secs(60)).state,
            JobState::Done,
            "{:#?}",
            c.history()
        );
    }
    let want = tree_of(&stage);
    for gl in &c.gls {
        for (name, dir) in &gl.members {
            assert!(live_tree(dir) == want, "server {name} is live on the newest tree");
        }
    }
    let site = c.site("www");
    assert_eq!(site["committed"], serde_json::json!([1, 3, 5, 7]));
    assert_eq!(snapshots(&c), vec![5, 7], "only what rollback and the next delta need");
    let h = c.history();
    assert!(h.iter().any(|e| e == "snapshots of site www pruned: releases 1 (keeping the last 2 committed)"), "{h:#?}");
    assert!(
        h.iter().any(|e| e.contains("against live release 5: 0 new, 1 changed")),
        "deltas travel: {h:#?}"
    );

    // An operator's rollback: back to 5 everywhere; 5's snapshot is the base of the next delta.
    let before = {
        std::fs::write(stage.join("css/site.css"), css(1)).unwrap(); // what 5 held
        tree_of(&stage)
    };
    let j = c.submit_spec(&spec(
        JobKind::Rollback,
        Payload::Rollback { to: None },
        JobPolicy::default(),
    ));
    assert_eq!(
        c.wait_finished(j.id, Duration::from_secs(60)).state,
        JobState::Done,
        "{:#?}",
        c.history()
    );
    for gl in &c.gls {
        for (name, dir) in &gl.members {
            assert!(live_tree(dir) == before, "server {name} rolled back to release 5");
        }
    }
    assert_eq!(c.site("www")["committed"], serde_json::json!([1, 3, 5]));
    std::fs::write(stage.join("about.html"), "about us, again\n").unwrap();
    let j = c.submit_spec(&spec(JobKind::Publish, Payload::Staging, JobPolicy::default()));
    assert_eq!(
        c.wait_finished(j.id, Duration::from_secs(60)).state,
        JobState::Done,
        "{:#?}",
        c.history()
    );
    let want = tree_of(&stage);
    for gl in &c.gls {
        assert!(live_tree(&gl.members[0].1) == want);
    }
    // An operator's commit with nothing prepared re-commits live: harmless, nothing moves.
    let j = c.submit_spec(&spec(
        JobKind::Commit,
        Payload::Commit { serial: None },
        JobPolicy::default(),
    ));
    assert_eq!(
        c.wait_finished(j.id, Duration::from_secs(60)).state,
        JobState::Done,
        "{:#?}",
        c.history()
    );
    assert!(live_tree(&c.gls[1].members[1].1) == want);
}

/// Reports every member failed (a segment whose servers are out of disk, say).
struct FailingDelivery(Vec<String>);

impl LocalDelivery for FailingDelivery {
    fn deliver(&self, _run: u64, _a: PathBuf, _m: Manifest) -> BoxFuture<'static, DeliveryOutcome> {
        let failed =
            self.0.iter().map(|s| (s.clone(), "no space left on device".to_string())).collect();
        Box::pin(async move { DeliveryOutcome { failed, ..Default::default() } })
    }
}

#[test]
fn a_run_short_of_its_quorum_never_commits() {
    let mut o = Options::new(2);
    o.tweak_manager = Box::new(|c| c.chunk_size = 64 << 10);
    o.delivery = Box::new(|i, m| -> Arc<dyn LocalDelivery> {
        if i == 1 {
            Arc::new(FailingDelivery(m.iter().map(|x| x.0.clone()).collect()))
        } else {
            Arc::new(SiteDelivery::all(m))
        }
    });
    let c = Cluster::start(o);
    let stage = staging(c.dir.path());
    c.setup_site_from("www", c.all_servers(), &stage);
    let policy = JobPolicy {
        on_failure: OnFailure::Retry { max_attempts: 2, delay_ms: 100 },
        ..JobPolicy::default()
    };
    let job = c.submit_spec(&spec(JobKind::Publish, Payload::Staging, policy));
    let job = c.wait_job(job.id, Duration::from_secs(60), |j| {
        matches!(j.state, JobState::Cancelled { .. })
    });
    let JobState::Cancelled { reason } = &job.state else { unreachable!() };
    assert!(
        reason.contains("failed 2 times; last: quorum not met: 1 of 2 servers succeeded"),
        "{reason}"
    );
    let runs = c.runs();
    assert_eq!(runs.len(), 2, "two distribution attempts, no commit run: {runs:#?}");
    assert!(runs.iter().all(|r| r["commit_of"].is_null() && r["phase"]["phase"] == "failed"));
    // The good segment's server built the releases but none went live.
    let good = &c.gls[0].members[0].1;
    assert_eq!(current(good), None, "nothing is live");
    assert!(good.join("releases/1").is_dir());
    let site = c.site("www");
    assert_eq!(
        (site["committed"].clone(), site["prepared"].clone()),
        (serde_json::json!([]), serde_json::Value::Null)
    );
    assert!(
        c.history().iter().any(|e| e.contains("release 1 is not committed")),
        "{:#?}",
        c.history()
    );
}

#[test]
fn a_server_that_joins_the_content_group_is_brought_up_to_the_live_release() {
    let mut o = Options::new(2);
    o.members_per_gl = 2;
    o.tweak_manager = Box::new(|c| c.chunk_size = 64 << 10);
    // seg01-s1 is down at first: its segment neither reports it nor reaches it.
    let late = Arc::new(std::sync::Mutex::new(Vec::new()));
    let late_for_gl = late.clone();
    o.delivery = Box::new(move |i, m| -> Arc<dyn LocalDelivery> {
        if i == 1 {
            *late_for_gl.lock().unwrap() = vec![m[0].0.clone()];
            Arc::new(SiteDelivery { members: m.to_vec(), present: late_for_gl.clone() })
        } else {
            Arc::new(SiteDelivery::all(m))
        }
    });
    let c = Cluster::start(o);
    c.rediscover(1, &["seg01-s0"]);
    let stage = staging(c.dir.path());
    c.setup_site_from("www", c.all_servers(), &stage);
    let policy =
        JobPolicy { quorum: Quorum { min_percent: 75, min_servers: 1 }, ..JobPolicy::default() };
    let job = c.submit_spec(&spec(JobKind::Publish, Payload::Staging, policy));
    assert_eq!(
        c.wait_finished(job.id, Duration::from_secs(60)).state,
        JobState::Done,
        "{:#?}",
        c.history()
    );
    let newcomer = &c.gls[1].members[1].1;
    assert_eq!(current(newcomer), None);
    assert!(c.site("www")["holders"].get("seg01-s1").is_none());

    // The server comes up and its GL reports it: the manager replicates live release 1 to it.
    late.lock().unwrap().push("seg01-s1".into());
    let answer = c.rediscover(1, &["seg01-s0", "seg01-s1"]);
    let jobs = answer["replicate_jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1, "{answer}");
    // A second report while that job is pending creates no other.
    assert_eq!(c.rediscover(1, &["seg01-s0", "seg01-s1"])["replicate_jobs"], serde_json::json!([]));
    let rep = c.wait_finished(jobs[0].as_u64().unwrap(), Duration::from_secs(60));
    assert_eq!(rep.state, JobState::Done, "{:#?}", c.history());
    assert_eq!(rep.spec.kind, JobKind::Replicate);
    assert_eq!(rep.spec.payload, Payload::Live { servers: vec!["seg01-s1".into()] });
    assert!(live_tree(newcomer) == tree_of(&stage), "the newcomer is live on the group's release");
    assert_eq!(current(newcomer), Some(1), "same serial as the rest of the group");
    assert_eq!(c.site("www")["holders"]["seg01-s1"], 1);
    let runs = c.runs();
    let last = &runs[runs.len() - 1];
    assert_eq!(
        (last["commit_of"].as_u64(), last["release"].as_u64()),
        (Some(runs[runs.len() - 2]["id"].as_u64().unwrap()), Some(1))
    );
    // Now it holds live: further reports create nothing.
    assert_eq!(c.rediscover(1, &["seg01-s0", "seg01-s1"])["replicate_jobs"], serde_json::json!([]));
    assert!(
        c.history()
            .iter()
            .any(|e| e.contains("servers seg01-s1 lack live release 1 of site www: replicate job"))
    );
}

#[test]
fn a_new_leader_elected_mid_run_is_notified_and_the_old_leaders_report_is_ignored() {
    let mut o = Options::new(3);
    o.members_per_gl = 2;
    o.tweak_manager = Box::new(|c| {
        c.chunk_size = 64 << 10;
        c.tree.star_max = 0;
        c.tree.root_fanout = 1;
        c.tree.leader_fanout = 2;
        c.egress_bytes_per_sec = Some(4 << 20);
    });
    o.tweak_leader = Box::new(|_, l| l.egress_bytes_per_sec = Some(4 << 20));
    // seg00's first GL is on its way out: whatever it delivers, it reports every server failed.
    o.delivery = Box::new(|i, m| -> Arc<dyn LocalDelivery> {
        if i == 0 {
            Arc::new(FailingDelivery(m.iter().map(|x| x.0.clone()).collect()))
        } else {
            Arc::new(CopyDelivery { members: m.to_vec() })
        }
    });
    let c = Cluster::start(o);
    let file = c.dir.path().join("a.bin");
    let len = random_assignment(&file, 4 << 20, 11);
    let want = hash_of(&file);
    let job = c.publish(&file, JobPolicy { commit: CommitPolicy::Manual, ..JobPolicy::default() });
    let t0 = Instant::now();
    while c.gls[0].node.progress(1).unwrap_or(0) < (512 << 10) {
        assert!(t0.elapsed() < Duration::from_secs(30), "distribution never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // seg00 elects seg00-s1; the new GL's endpoint comes up and it reports discovery.
    let members = c.gls[0].members.clone();
    let mut l = LeaderConfig::new("seg00", "seg00-s1", AGENT, &c.dir.path().join("gl-new"));
    l.stall = Duration::from_secs(2);
    l.manager_keys = cm_tests::test_pins();
    let d = Arc::new(CopyDelivery { members: members.clone() });
    let (new_gl, _new_thread): (LeaderNode, NodeThread) = NodeThread::spawn(
        "seg00-new",
        move || async move { LeaderNode::start(l, d).await.unwrap() },
    )
    .unwrap();
    let report = DiscoveryReport {
        segment: "seg00".into(),
        leader: "seg00-s1".into(),
        address: new_gl.addr.to_string(),
        location: "Europe/London".into(),
        cpu_power: 100,
        free_disk: 1 << 40,
        connections: 1,
        members: members.iter().map(|m| m.0.clone()).collect(),
        links: None,
        plugins: Default::default(),
        spaces: Default::default(),
    };
    c.rt.block_on(cm_tests::loopback::report_discovery(&c.manager_url, AGENT, &report)).unwrap();
    // The old GL's report (it is still alive and finishes its own copy) must not count; here one
    // arrives at once, before the new GL could report.
    let stale = SegmentReport {
        segment: "seg00".into(),
        leader: "seg00-s0".into(),
        succeeded: vec![],
        failed: members.iter().map(|m| (m.0.clone(), "stale".into())).collect(),
        missing: vec![],
        site: String::new(),
    };
    let agent = cm_tree::http::JsonClient::new(AGENT, Duration::from_secs(5));
    let ans: serde_json::Value =
        c.rt.block_on(agent.post(&c.api("runs/1/report"), &stale)).unwrap();
    assert_eq!(ans["accepted"], false);

    let job = c.wait_finished(job.id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", c.history());
    assert_eq!(new_gl.progress(1), Some(len), "the new GL fetched the whole assignment");
    for gl in &c.gls {
        for (name, dir) in &gl.members {
            assert_eq!(hash_of(&dir.join("run-1.assignment")), want, "server {name}");
        }
    }
    let run = c.run(1);
    assert_eq!(run["run"]["segments"]["seg00"]["leader"], "seg00-s1");
    assert_eq!(run["run"]["segments"]["seg00"]["status"], "reported");
    let reports = run["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 6);
    assert!(reports.iter().all(|r| r[1]["status"] == "succeeded"), "{reports:#?}");
    let h = c.history();
    assert!(
        h.iter().any(|e| e.starts_with("segment seg00: new group leader seg00-s1 at")
            && e.ends_with("picks up the run (was seg00-s0)")),
        "{h:#?}"
    );
    assert!(h.iter().any(|e| e == "report of segment seg00 from former group leader seg00-s0 ignored: seg00-s1 leads the segment in this run"));
    // The old GL finishes too and reports; that is ignored as well, the outcome stands.
    let t0 = Instant::now();
    while c
        .history()
        .iter()
        .filter(|e| e.contains("from former group leader seg00-s0 ignored"))
        .count()
        < 2
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "the old GL never reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c.run(1)["reports"].as_array().unwrap().iter().all(|r| r[1]["status"] == "succeeded"));
}

/// Holds every delivery for a while before the servers apply it (slow servers).
struct SlowDelivery(SiteDelivery, Duration);

impl LocalDelivery for SlowDelivery {
    fn deliver(&self, run: u64, a: PathBuf, m: Manifest) -> BoxFuture<'static, DeliveryOutcome> {
        let inner = self.0.deliver(run, a, m);
        let wait = self.1;
        Box::pin(async move {
            tokio::time::sleep(wait).await;
            inner.await
        })
    }
}

#[test]
fn a_manager_restarted_during_the_commit_run_finishes_the_commit() {
    let mut o = Options::new(2);
    o.tweak_manager = Box::new(|c| c.chunk_size = 64 << 10);
    o.delivery =
        Box::new(|_, m| Arc::new(SlowDelivery(SiteDelivery::all(m), Duration::from_millis(1500))));
    let mut c = Cluster::start(o);
    let stage = staging(c.dir.path());
    c.setup_site_from("www", c.all_servers(), &stage);
    let job = c.submit_spec(&spec(JobKind::Publish, Payload::Staging, JobPolicy::default()));
    // The commit run (run 2) is under way: the servers are holding its assignment.
    c.wait_job(job.id, Duration::from_secs(60), |j| j.state == JobState::Running { run: 2 });
    assert_eq!(current(&c.gls[0].members[0].1), None, "not live before the commit");
    c.manager.kill();
    let mut cfg = cm_manager::server::ManagerConfig::new(c.dir.path().join("manager"), OP, AGENT);
    cfg.listen = c.manager_addr;
    cfg.tick = Duration::from_millis(50);
    cfg.probe_interval = Duration::from_millis(300);
    cfg.chunk_size = 64 << 10;
    cfg.signer = Some(cm_tests::test_signer().clone());
    let (_, _, thread) = start_manager(cfg);
    c.manager = thread;
    c.op = cm_tests::loopback::operator_client(OP);
    let done = c.wait_finished(job.id, Duration::from_secs(60));
    assert_eq!(done.state, JobState::Done, "{:#?}", c.history());
    let want = tree_of(&stage);
    for gl in &c.gls {
        assert!(
            live_tree(&gl.members[0].1) == want,
            "{} is live after the restart",
            gl.members[0].0
        );
    }
    assert_eq!(c.runs().len(), 2, "the commit run was resumed, not started again");
    assert_eq!(c.site("www")["committed"], serde_json::json!([1]));
    assert!(c.history().iter().any(|e| e == "manager restarted or took over: run resumed"));
}
