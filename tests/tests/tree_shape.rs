//! The manager shapes each run's tree from the link rates its GLs measured in earlier runs: before
//! any measurement the configured shape (here a fan-out 2 tree), after a run whose GLs report what
//! they measured (each node's upload capped like a NIC, so uploads are no faster than downloads)
//! a pipelined chain. The choice is written to the run's history.

mod tree_common;

use cm_manager::model::{JobPolicy, JobState};
use std::time::Duration;
use tree_common::{Cluster, Options, random_assignment};

const MIB: u64 = 1 << 20;

fn shape_line(c: &Cluster, run: u64) -> String {
    let h: Vec<serde_json::Value> = c.rt.block_on(c.op.get(&c.api("history"))).unwrap();
    h.iter()
        .filter(|e| e["run"].as_u64() == Some(run))
        .filter_map(|e| e["event"].as_str())
        .find(|e| e.starts_with("tree for"))
        .unwrap_or_else(|| panic!("run {run} has no tree line: {h:#?}"))
        .to_string()
}

#[test]
fn measured_link_rates_change_the_tree_shape() {
    let mut o = Options::new(5);
    o.tweak_manager = Box::new(|m| {
        m.egress_bytes_per_sec = Some(8 * MIB);
        m.tree = cm_manager::tree::TreeConfig { root_fanout: 2, leader_fanout: 2, star_max: 3 };
        // Small chunks: each hop of the pipeline lags its parent by one chunk.
        m.chunk_size = 256 << 10;
    });
    o.tweak_leader = Box::new(|_, l| l.egress_bytes_per_sec = Some(8 * MIB));
    let c = Cluster::start(o);
    let file = c.dir.path().join("payload.bin");
    random_assignment(&file, 8 << 20, 7);
    let policy = JobPolicy::default();

    let first = c.publish(&file, policy);
    let j = c.wait_finished(first.id, Duration::from_secs(60));
    assert_eq!(j.state, JobState::Done, "{j:?}");
    let run1 = c
        .runs()
        .iter()
        .filter(|r| r["job"].as_u64() == Some(first.id))
        .filter_map(|r| r["id"].as_u64())
        .min()
        .unwrap();
    let line = shape_line(&c, run1);
    assert!(
        line.contains("configured") && line.contains("a tree (manager fan-out 2, GL fan-out 2)"),
        "{line}"
    );

    // Every GL measured its download; those that served children their upload.
    let mut uploads = 0;
    for (i, gl) in c.gls.iter().enumerate() {
        let rates = gl.node.links().rates().unwrap_or_else(|| panic!("GL {i} measured nothing"));
        assert!(rates.download_bps > 0, "GL {i}: {rates:?}");
        assert!(
            rates.upload_bps <= 9 * MIB && rates.download_bps <= 9 * MIB,
            "GL {i} beat the 8 MiB/s caps: {rates:?}"
        );
        uploads += usize::from(rates.upload_bps > 0);
        let members: Vec<&str> = gl.members.iter().map(|m| m.0.as_str()).collect();
        c.rediscover_with_links(i, &members, Some(rates));
    }
    assert!(uploads >= 1, "in a fan-out 2 tree of 5 GLs some GL serves children");
    let segs: Vec<serde_json::Value> = c.rt.block_on(c.op.get(&c.api("segments"))).unwrap();
    assert!(
        segs.iter().all(|s| s["links"]["download_bps"].as_u64().is_some_and(|d| d > 0)),
        "{segs:?}"
    );

    let second = c.submit("site", &file, policy);
    let j = c.wait_finished(second.id, Duration::from_secs(60));
    assert_eq!(j.state, JobState::Done, "{j:?}");
    let run2 = c
        .runs()
        .iter()
        .filter(|r| r["job"].as_u64() == Some(second.id))
        .filter_map(|r| r["id"].as_u64())
        .min()
        .unwrap();
    let line = shape_line(&c, run2);
    assert!(
        line.contains("from the links 5 of 5 GLs measured") && line.contains("a chain"),
        "{line}"
    );
}
