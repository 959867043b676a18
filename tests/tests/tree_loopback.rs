//! Multi-node tree distribution on loopback: a manager and group leaders, each on its own runtime.

mod tree_common;

use cm_manager::model::{JobPolicy, JobState, Quorum};
use std::time::{Duration, Instant};
use tree_common::*;

fn small_chunks(c: &mut cm_manager::server::ManagerConfig) {
    c.chunk_size = 64 << 10;
}

#[test]
fn sixteen_leaders_get_identical_bytes() {
    let mut o = Options::new(16);
    o.members_per_gl = 2;
    o.tweak_manager = Box::new(|c| {
        small_chunks(c);
        c.tree.star_max = 3;
        c.tree.root_fanout = 2;
        c.tree.leader_fanout = 2;
    });
    let c = Cluster::start(o);
    let file = c.dir.path().join("assignment.bin");
    let len = random_assignment(&file, 6 << 20, 1);
    let want = hash_of(&file).unwrap();
    let job = c.publish(&file, JobPolicy::default());
    let job = c.wait_finished(job.id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:?}", c.history());
    for gl in &c.gls {
        for (name, dir) in &gl.members {
            assert_eq!(hash_of(&dir.join("run-1.assignment")), Some(want), "server {name}");
        }
        assert_eq!(gl.node.progress(1), Some(len));
    }
    let run = c.run(1);
    assert_eq!(run["run"]["phase"]["phase"], "succeeded");
    let reports = run["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 32);
    assert!(reports.iter().all(|r| r[1]["status"] == "succeeded"), "{reports:?}");
    let h = c.history();
    assert!(h.iter().any(|e| e.starts_with("run succeeded: 32 of 32 servers succeeded")), "{h:?}");
}

#[test]
fn a_dead_leader_is_routed_around_and_its_subtree_completes() {
    let mut o = Options::new(8);
    o.tweak_manager = Box::new(|c| {
        small_chunks(c);
        // A chain-like tree so the first GL has a subtree: M → seg00 → {seg01, seg02} → …
        c.tree.star_max = 0;
        c.tree.root_fanout = 1;
        c.tree.leader_fanout = 2;
        c.egress_bytes_per_sec = Some(8 << 20);
    });
    // Slow uploads so the kill lands mid-distribution.
    o.tweak_leader = Box::new(|_, l| l.egress_bytes_per_sec = Some(8 << 20));
    let mut c = Cluster::start(o);
    let file = c.dir.path().join("assignment.bin");
    random_assignment(&file, 8 << 20, 2);
    let want = hash_of(&file).unwrap();
    let policy =
        JobPolicy { quorum: Quorum { min_percent: 80, min_servers: 1 }, ..JobPolicy::default() };
    let job = c.publish(&file, policy);
    // Kill seg00 once it has started forwarding but before it has everything.
    let t0 = Instant::now();
    loop {
        let p = c.gls[0].node.progress(1).unwrap_or(0);
        if p > (1 << 20) && c.gls[1].node.progress(1).unwrap_or(0) > 0 {
            assert!(p < (8 << 20), "seg00 finished before it could be killed; slow the test down");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "distribution never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    c.gls[0].thread.kill();
    let job = c.wait_finished(job.id, Duration::from_secs(90));
    assert_eq!(job.state, JobState::Done, "{:#?}", c.history());
    for gl in &c.gls[1..] {
        let (name, dir) = &gl.members[0];
        assert_eq!(hash_of(&dir.join("run-1.assignment")), Some(want), "server {name}");
    }
    let run = c.run(1);
    assert_eq!(run["run"]["segments"]["seg00"]["status"], "lost");
    let reports = run["reports"].as_array().unwrap();
    let missing: Vec<_> =
        reports.iter().filter(|r| r[1]["status"] == "missing").map(|r| r[0].clone()).collect();
    assert_eq!(missing, vec![serde_json::json!("seg00-s0")]);
    let h = c.history();
    assert!(
        h.iter().any(|e| e.contains("group leader seg00-s0 of segment seg00 unreachable")),
        "{h:?}"
    );
}

#[test]
fn few_leaders_are_served_as_a_star() {
    let mut o = Options::new(3);
    o.tweak_manager = Box::new(small_chunks);
    let c = Cluster::start(o);
    let file = c.dir.path().join("a.bin");
    random_assignment(&file, 300_000, 3);
    let job = c.publish(&file, JobPolicy::default());
    assert_eq!(c.wait_finished(job.id, Duration::from_secs(30)).state, JobState::Done);
    let want = hash_of(&file);
    for gl in &c.gls {
        assert_eq!(hash_of(&gl.members[0].1.join("run-1.assignment")), want);
    }
}
