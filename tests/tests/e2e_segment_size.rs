//! A segment of 50 servers (issue 19's run size): one GL hands every run to 49 members by MCTP,
//! and runs follow each other back to back — a publish, its automatic commit, the next publish —
//! so each new MCTP session starts while the previous one on the same GL may still be ending.
//! Every run must reach every server, whatever the timing; at 4 servers per segment the window
//! in which two sessions overlap is too short to show a collision.

use std::fs;
use std::time::Instant;

use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;

const SERVERS: usize = 50;
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_servers_in_one_segment_take_back_to_back_runs() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>round 0</h1>").unwrap();
    cm_tests::cmover_bin(); // built before the clock starts
    let started = Instant::now();
    let c = TestCluster::start(&Layout::new(90, 1, SERVERS), src.path()).await.unwrap();
    assert_eq!(c.agents.len(), SERVERS);
    eprintln!("{SERVERS} agents started and registered in {:?}", started.elapsed());

    for round in 1..=ROUNDS {
        let t = Instant::now();
        // Each round changes one file and adds one, so every run carries content.
        fs::write(c.staging.join("index.html"), format!("<h1>round {round}</h1>")).unwrap();
        fs::write(c.staging.join(format!("page-{round}.html")), format!("page {round}")).unwrap();
        c.publish_committed_everywhere()
            .await
            .unwrap_or_else(|e| panic!("round {round} of {ROUNDS}: {e:#}"));
        let want = observe(&c.staging);
        c.assert_live_everywhere(&want, &format!("after round {round}"));
        eprintln!("round {round}: publish and commit on {SERVERS} servers in {:?}", t.elapsed());
    }
}
