//! End to end with real processes: `cmover plugin install` into a running agent's plugin store
//! hot-swaps the agent's interpreter. The agents (1 segment × 2) apply a first publish with the
//! bundled interpreter; then a new interpreter version (the `test-swap` plugin, version 2, which
//! signs every batch with a `.answered-by` file, which staging therefore describes) is installed into each agent's store by the
//! real `cmover` binary; the agents report the new version, and the next publish is applied by
//! it on every server.

use std::fs;
use std::time::{Duration, Instant};

use cm_manager::model::{JobKind, Payload};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_into_a_running_agents_store_applies_the_next_run() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>v1</h1>").unwrap();
    let c = TestCluster::start(&Layout::new(5, 1, 2), src.path()).await.unwrap();
    c.run_ok(JobKind::Publish, Payload::Staging).await.unwrap();
    c.run_ok(JobKind::Commit, Payload::Commit { serial: None }).await.unwrap();
    let bundled_version: Vec<String> = c
        .agents
        .iter()
        .map(|a| a.status().unwrap()["interpreter"].as_str().unwrap().to_string())
        .collect();

    // The operator installs a new interpreter version into each running agent's store.
    for (i, a) in c.agents.iter().enumerate() {
        c.install_interpreter(i, "test-swap-v2.wasm")
            .unwrap_or_else(|e| panic!("{}: {e}", a.spec.name));
    }
    // Each agent follows its store: the new version is live without a restart.
    let end = Instant::now() + Duration::from_secs(30);
    for (a, old) in c.agents.iter().zip(&bundled_version) {
        while a.status().unwrap()["interpreter"].as_str() == Some(old.as_str()) {
            assert!(
                Instant::now() < end,
                "{}: the install never reached the running agent\n{}",
                a.spec.name,
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fs::write(c.staging.join("index.html"), "<h1>v2</h1>").unwrap();
    // Version 2 signs every batch with `.answered-by`. The host keeps a release only if it is
    // exactly the tree the assignment describes (attack_site shows an undescribed file refused),
    // so staging describes that signature too; which version applied is in the status below.
    fs::write(c.staging.join(".answered-by"), "2").unwrap();
    c.run_ok(JobKind::Publish, Payload::Staging).await.unwrap();
    c.run_ok(JobKind::Commit, Payload::Commit { serial: None }).await.unwrap();
    let want = observe(&c.staging);
    for a in &c.agents {
        let st = a.status().unwrap();
        let new = st["interpreter"].as_str().unwrap();
        let applied = st["applied"].as_array().unwrap();
        assert_eq!(applied.len(), 4, "{}: {st}", a.spec.name);
        // The first publish and commit by the bundled version, the second pair by the new one.
        assert!(applied[..2].iter().all(|r| r["interpreter"] != new), "{}: {st}", a.spec.name);
        assert!(applied[2..].iter().all(|r| r["interpreter"] == new), "{}: {st}", a.spec.name);
        let live = a.site_root.join("current");
        assert_eq!(observe(&live), want, "{}", a.spec.name);
    }
}
