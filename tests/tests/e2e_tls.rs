//! End to end over mutual TLS with real processes: a cluster CA made with `cmover cert init`,
//! a certificate per process (`cmover cert issue`: the manager, the operator, every agent), the
//! manager's API, the tree from the manager to the GLs and the members' apply reports to their
//! GL all over HTTPS with client certificates. A publish reaches every server and commits
//! itself; a client without a certificate, or with a certificate from another CA, is refused.

use std::fs;
use std::time::Duration;

use cm_agent::launch;
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::{cmover_bin, observe};
use cm_tree::http::{ClientError, JsonClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_commit_over_mutual_tls_reach_every_server() {
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("css")).unwrap();
    fs::write(src.path().join("index.html"), "<h1>over TLS</h1>").unwrap();
    fs::write(src.path().join("css/site.css"), "body { color: green }").unwrap();
    let mut layout = Layout::new(11, 2, 2);
    layout.tls = true;
    let c = TestCluster::start(&layout, src.path()).await.unwrap();
    assert!(c.manager.url.starts_with("https://"), "{}", c.manager.url);
    // Every GL serves its endpoint over HTTPS (the URL its members learn from its heartbeats).
    for s in &c.segments {
        let gl =
            c.leader_of(s).unwrap_or_else(|| panic!("segment {s} has no leader\n{}", c.logs()));
        let st = c.agents[gl].status().unwrap();
        assert!(st["gl_url"].as_str().is_some_and(|u| u.starts_with("https://")), "{st}");
    }

    c.publish_committed_everywhere().await.unwrap();
    let staged = observe(&c.staging);
    for a in &c.agents {
        assert_eq!(
            observe(&a.site_root.join("current")),
            staged,
            "{}: live differs from staging",
            a.spec.name
        );
    }

    // Refused: a plain-HTTP client with the operator's token, and an operator certificate of
    // another CA; the jobs are unchanged.
    let jobs_before: serde_json::Value = c.op.get(&c.url("jobs")).await.unwrap();
    let body = serde_json::json!({ "servers": ["intruder"] });
    let plain = JsonClient::new(&c.manager.operator_token, Duration::from_secs(5));
    assert!(
        plain
            .put::<_, serde_json::Value>(&c.url("groups/g").replacen("https", "http", 1), &body)
            .await
            .is_err()
    );
    let other = tempfile::tempdir().unwrap();
    let ca = other.path().join("ca");
    let st = std::process::Command::new(cmover_bin())
        .args(["cert", "init", "--dir"])
        .arg(&ca)
        .status()
        .unwrap();
    assert!(st.success());
    let files = launch::issue_cert(
        &cmover_bin(),
        &ca,
        "mallory",
        "operator",
        &other.path().join("mallory"),
    )
    .unwrap();
    let foreign = JsonClient::with_tls(
        "",
        Duration::from_secs(5),
        Some(&cm_tree::tls::Tls::load(&files).unwrap()),
    );
    let r = foreign.put::<_, serde_json::Value>(&c.url("groups/g"), &body).await;
    assert!(matches!(r, Err(ClientError::Transport { .. })), "{r:?}");
    let groups: serde_json::Value = c.op.get(&c.url("groups")).await.unwrap();
    assert!(!groups.to_string().contains("intruder"), "{groups}");
    let jobs_after: serde_json::Value = c.op.get(&c.url("jobs")).await.unwrap();
    assert_eq!(jobs_before, jobs_after);
}
