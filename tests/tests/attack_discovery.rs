//! Attacks on the manager's API with an agent's (or operator's) credentials (issue 14, item 7):
//!
//! - Five discovery reports with the agent token, 20,000 made-up members each, used to create
//!   100,000 server records and 100,005 history entries (the database grew from 72 KiB to
//!   70 MiB). Now a report lists at most `max_segment_members`, is refused whole with a 400
//!   naming the limit when it lists more, reports per segment are rate-limited (429), a report
//!   cannot take a server away from the segment that reported it, and the history gets one line
//!   per report for its joins.
//! - A site named `..` (its snapshots would have gone to `DATA_DIR/snapshots/..`, the data
//!   directory itself) is refused with a 400 that names the field.

use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::message::DiscoveryReport;
use std::time::Duration;

const OPERATOR: &str = "operator-token";
const AGENT: &str = "agent-token";

fn report(segment: &str, members: Vec<String>) -> DiscoveryReport {
    DiscoveryReport {
        segment: segment.into(),
        leader: members.first().cloned().unwrap_or_else(|| "gl".into()),
        address: "127.0.0.1:9".into(),
        location: "X".into(),
        cpu_power: 1,
        free_disk: 0,
        connections: 0,
        members,
        links: None,
        plugins: Default::default(),
        spaces: Default::default(),
    }
}

/// The HTTP status and body of a refused request.
fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Status { status, body, .. }) => (status.as_u16(), body),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn count(op: &JsonClient, url: &str, what: &str) -> usize {
    op.get::<Vec<serde_json::Value>>(&format!("{url}/api/v1/{what}")).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_flood_is_refused_and_the_database_stays_small() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut cfg = ManagerConfig::new(tmp.path().to_owned(), OPERATOR, AGENT);
    // A burst of 5 reports per segment and no refill while the test runs: which report is
    // refused does not depend on timing.
    cfg.discovery_burst = 5;
    cfg.discovery_refill = Duration::from_secs(3600);
    let m = Manager::start(cfg).await?;
    let url = format!("http://{}", m.addr);
    let discovery = format!("{url}/api/v1/discovery");
    let (agent, op) = (
        JsonClient::new(AGENT, Duration::from_secs(60)),
        JsonClient::new(OPERATOR, Duration::from_secs(30)),
    );
    let post = |r: DiscoveryReport| {
        let (agent, discovery) = (agent.clone(), discovery.clone());
        async move { agent.post::<_, serde_json::Value>(&discovery, &r).await }
    };

    // An honest GL of segment A with three servers.
    let honest: Vec<String> = (0..3).map(|i| format!("a-s{i}")).collect();
    post(report("seg-a", honest.clone())).await?;

    // The flood: 5 reports, 20,000 invented members each, each on a segment of its own.
    for i in 0..5 {
        let members = (0..20_000).map(|k| format!("flood-{i}-{k:05}")).collect();
        let (status, body) = refused(post(report(&format!("flood-{i}"), members)).await);
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("lists 20000 members") && body.contains("max_segment_members"),
            "{body}"
        );
    }
    assert_eq!(count(&op, &url, "servers").await, 3, "no record for an invented member");
    assert_eq!(count(&op, &url, "segments").await, 1);
    let history = count(&op, &url, "history").await;
    assert!(history <= 3, "{history} history entries");
    let db = std::fs::metadata(tmp.path().join("manager.redb"))?.len();
    assert!(db < 2 << 20, "the database grew to {db} bytes");

    // Names that are not names.
    let (status, body) = refused(post(report("seg-x", vec!["x-gl".into(), "..".into()])).await);
    assert_eq!(status, 400);
    assert!(body.contains("member name `..`"), "{body}");

    // Another segment's report cannot take segment A's servers away.
    let out = post(report("seg-b", vec!["b-s0".into(), "a-s1".into()])).await?;
    assert_eq!(out["refused_members"][0][0], "a-s1", "{out}");
    let servers: Vec<serde_json::Value> = op.get(&format!("{url}/api/v1/servers")).await?;
    let a1 = servers.iter().find(|s| s["name"] == "a-s1").unwrap();
    assert_eq!(a1["segment"], "seg-a");
    assert_eq!(a1["live"], true);

    // Within the bounds, reports come at most as fast as the rate allows: segment A has used
    // one of its five; four more pass (changing nothing: no history, no record), the sixth is
    // refused with 429 and says why.
    let history = count(&op, &url, "history").await;
    for _ in 0..4 {
        post(report("seg-a", honest.clone())).await?;
    }
    assert_eq!(count(&op, &url, "history").await, history, "unchanged reports write no history");
    let (status, body) = refused(post(report("seg-a", honest.clone())).await);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("segment seg-a") && body.contains("retry later"), "{body}");
    // The limit is per segment: segment B still reports.
    post(report("seg-b", vec!["b-s0".into(), "b-s1".into()])).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_named_dot_dot_is_refused_naming_the_field() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let m = Manager::start(ManagerConfig::new(tmp.path().to_owned(), OPERATOR, AGENT)).await?;
    let url = format!("http://{}", m.addr);
    let op = JsonClient::new(OPERATOR, Duration::from_secs(30));
    let site = serde_json::json!({ "content_group": "g", "staging": tmp.path() });
    for (path, body, field) in [
        ("sites/..", site.clone(), "site name `..`"),
        ("sites/.", site.clone(), "site name `.`"),
        (
            "sites/ok",
            serde_json::json!({ "content_group": "a/b", "staging": "/" }),
            "content_group `a/b`",
        ),
        ("groups/..", serde_json::json!({ "servers": [] }), "content group name `..`"),
        ("groups/g", serde_json::json!({ "servers": ["s\u{0}"] }), "server name"),
    ] {
        let r = op.put::<_, serde_json::Value>(&format!("{url}/api/v1/{path}"), &body).await;
        let (status, text) = refused(r);
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains(field), "{path}: {text}");
    }
    let job = serde_json::json!({ "name": "j", "kind": "publish", "site": "..", "payload": { "type": "file", "path": "/" } });
    let (status, text) =
        refused(op.post::<_, serde_json::Value>(&format!("{url}/api/v1/jobs"), &job).await);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("site `..`"), "{text}");
    assert_eq!(count(&op, &url, "sites").await, 0);
    assert_eq!(count(&op, &url, "groups").await, 0);
    assert_eq!(count(&op, &url, "jobs").await, 0);
    // A good name still works (its content group must exist).
    op.put::<_, serde_json::Value>(
        &format!("{url}/api/v1/groups/g"),
        &serde_json::json!({ "servers": [] }),
    )
    .await?;
    op.put::<_, serde_json::Value>(&format!("{url}/api/v1/sites/www"), &site).await?;
    assert_eq!(count(&op, &url, "sites").await, 1);
    Ok(())
}
