//! Plugins across the fleet with real processes (`cmover plugin publish|rollback --group`):
//! the component travels as a signed plugin run through the tree and MCTP; every agent
//! installs it through its plugin store, or refuses it and the group is rolled back.
//! `test-swap-v1`/`-v2` sign each batch with `.answered-by` (their version), so a content run
//! shows which version applied it. The time from `plugin publish` to every server swapped is
//! printed (`CM_FLEET_SERVERS` servers, default 4): a figure, not an assertion.

#[path = "cli_common/mod.rs"]
mod cli_common;

use std::fs;
use std::time::{Duration, Instant};

use cli_common::Operator;
use cm_manager::model::{Job, JobKind, JobState, Payload};
use cm_plugin_host::bundled;
use cm_tests::cluster::{Layout, TestCluster};
use serde_json::Value;

fn blake3_of(wasm: &str) -> String {
    blake3::hash(&fs::read(bundled::dist_dir().join(wasm)).unwrap()).to_hex().to_string()
}

/// The manifest of the agents' interpreter, granted `sites`, in the cluster's directory.
fn manifest(c: &TestCluster, file: &str, sites: &[&str]) -> String {
    let path = c.dir.path().join(file);
    fs::write(&path, bundled::interpreter_manifest("interpreter", sites).to_toml()).unwrap();
    path.display().to_string()
}

fn publish(op: &Operator, wasm: &str, manifest: &str, extra: &[&str]) -> cli_common::Out {
    let file = bundled::dist_dir().join(wasm).display().to_string();
    let mut args = vec!["plugin", "publish", &file, "--manifest", manifest, "--group", "g"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--wait", "--timeout", "120"]);
    op.run(&args)
}

/// Every agent's interpreter, as its status reports it (short hash).
fn versions(c: &TestCluster) -> Vec<String> {
    c.agents.iter().map(|a| a.status().unwrap()["interpreter"].as_str().unwrap().into()).collect()
}

async fn cluster(test: u8, servers: usize) -> (TestCluster, Operator, tempfile::TempDir) {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>one</h1>").unwrap();
    let c = TestCluster::start(&Layout::new(test, 1, servers), src.path()).await.unwrap();
    c.run_ok(JobKind::Publish, Payload::Staging).await.unwrap();
    c.run_ok(JobKind::Commit, Payload::Commit { serial: None }).await.unwrap();
    let op = Operator::new(&c.manager.url, &c.dir.path().join("secrets/operator.token"));
    (c, op, src)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_publish_reaches_every_server_and_the_next_run_applies_with_it() {
    let servers = std::env::var("CM_FLEET_SERVERS").ok().and_then(|n| n.parse().ok()).unwrap_or(4);
    let (c, op, _src) = cluster(230, servers).await;
    let m = manifest(&c, "interpreter.toml", &["www"]);
    let out = publish(&op, "test-swap-v1.wasm", &m, &[]);
    assert_eq!(out.code, 0, "{out:#?}\n{}", c.logs());
    let v1 = &blake3_of("test-swap-v1.wasm")[..12];
    assert!(versions(&c).iter().all(|v| v == v1), "{:?}", versions(&c));

    let started = Instant::now();
    let out = publish(&op, "test-swap-v2.wasm", &m, &["--canary", "1"]);
    let took = started.elapsed();
    assert_eq!(out.code, 0, "{out:#?}\n{}", c.logs());
    let v2 = &blake3_of("test-swap-v2.wasm")[..12];
    assert!(versions(&c).iter().all(|v| v == v2), "{:?}", versions(&c));
    eprintln!("figure: plugin publish --canary 1 to {servers} servers, all swapped in {took:?}");
    // The canary went first, alone; then the rest.
    let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    let stages: Vec<usize> = jobs
        .iter()
        .filter_map(|j| match &j.spec.payload {
            Payload::Plugin { version, servers, .. } if version.starts_with(v2) => {
                assert_eq!(j.state, JobState::Done, "{j:?}");
                Some(servers.len())
            }
            _ => None,
        })
        .collect();
    assert_eq!(stages, vec![1, servers - 1]);

    fs::write(c.staging.join("index.html"), "<h1>two</h1>").unwrap();
    fs::write(c.staging.join(".answered-by"), "2").unwrap();
    c.run_ok(JobKind::Publish, Payload::Staging).await.unwrap();
    c.run_ok(JobKind::Commit, Payload::Commit { serial: None }).await.unwrap();
    for a in &c.agents {
        let st = a.status().unwrap();
        let last = st["applied"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["interpreter"].as_str(), Some(v2), "{}: {st}", a.spec.name);
        let live = fs::read_to_string(a.site_root.join("current/.answered-by")).unwrap();
        assert_eq!(live, "2", "{}", a.spec.name);
    }
    // `cmover status` and the manager's /metrics show each server's version (as the servers
    // report it through their GL).
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let status = op.run(&["status"]).stdout;
        let metrics = metrics(&c.manager.url, &c.manager.operator_token);
        let gauge = format!("version=\"{v2}\"");
        let shown = metrics
            .lines()
            .filter(|l| {
                l.starts_with("cmover_server_plugin{") && l.contains(&gauge) && l.ends_with(" 1")
            })
            .count();
        if status.matches(v2).count() >= servers && shown == servers {
            break;
        }
        assert!(Instant::now() < end, "{status}\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The manager's `/metrics` text.
fn metrics(url: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_plugin_rolls_the_group_back_and_history_says_why() {
    let (c, op, _src) = cluster(231, 3).await;
    let good = manifest(&c, "interpreter.toml", &["www"]);
    assert_eq!(publish(&op, "test-swap-v1.wasm", &good, &[]).code, 0, "{}", c.logs());
    let v1 = &blake3_of("test-swap-v1.wasm")[..12];

    // Version 2 under a manifest that does not grant the agents' site: every agent must refuse.
    let bad = manifest(&c, "bad.toml", &["elsewhere"]);
    let out = publish(&op, "test-swap-v2.wasm", &bad, &["--canary", "1"]);
    assert_eq!(out.code, 1, "{out:#?}\n{}", c.logs());
    assert!(out.stderr.contains("rolled back"), "{out:#?}");
    assert!(versions(&c).iter().all(|v| v == v1), "{:?}", versions(&c));
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let text: Vec<&str> = history.iter().filter_map(|h| h["event"].as_str()).collect();
    let why = text.iter().find(|t| t.contains("rollback of plugin interpreter"));
    assert!(
        why.is_some_and(|t| t.contains("refused") && t.contains("www")),
        "history does not say why: {text:#?}"
    );

    // By hand: the version before v1 is not known (the bundled one was never published), so
    // the operator's rollback is refused with the reason.
    let out = op.run(&["plugin", "rollback", "interpreter", "--group", "g"]);
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("no previous version"), "{out:#?}");

    // A good v2 installs; its first content run fails (v2 signs each batch with
    // `.answered-by`, which this staging does not describe): the group goes back to v1.
    assert_eq!(publish(&op, "test-swap-v2.wasm", &good, &[]).code, 0, "{}", c.logs());
    let v2 = &blake3_of("test-swap-v2.wasm")[..12];
    assert!(versions(&c).iter().all(|v| v == v2), "{:?}", versions(&c));
    fs::write(c.staging.join("index.html"), "<h1>three</h1>").unwrap();
    let job = c.submit(JobKind::Publish, Payload::Staging, 100).await.unwrap();
    let (j, _) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert!(matches!(j.state, JobState::Cancelled { .. }), "{j:?}");
    wait_for(&c, v1).await;
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let text: Vec<&str> = history.iter().filter_map(|h| h["event"].as_str()).collect();
    assert!(
        text.iter().any(|t| t.contains("the first content run with plugin interpreter")),
        "history does not say why: {text:#?}"
    );

    // By hand: back to the version before (v2), everywhere.
    let out = op.run(&["plugin", "rollback", "interpreter", "--group", "g"]);
    assert_eq!(out.code, 0, "{out:#?}");
    wait_for(&c, v2).await;
}

async fn wait_for(c: &TestCluster, version: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    while !versions(c).iter().all(|v| v == version) {
        assert!(Instant::now() < end, "{:?}\n{}", versions(c), c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
