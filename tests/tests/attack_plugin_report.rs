//! The plugins a GL relays in its discovery report (`DiscoveryReport::plugins`) come from
//! whoever holds the agent token. A report whose plugins are malformed (a plugin name outside
//! the plugin store's rule, a hash that is not 64 lowercase hex digits, a version that is not
//! its prefix) or oversized (an entry for a server the report does not list, a name of
//! kilobytes) is refused whole with a 400 naming what was wrong, counted
//! (`cmover_plugin_reports_refused`), and stores nothing: the servers keep what they had.

use std::collections::BTreeMap;
use std::time::Duration;

use cm_manager::model::{PluginIdentity, ServerRecord};
use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::message::DiscoveryReport;

const OPERATOR: &str = "operator-token";
const AGENT: &str = "agent-token";

fn plugin(name: &str, c: char) -> PluginIdentity {
    let blake3: String = std::iter::repeat_n(c, 64).collect();
    PluginIdentity { name: name.into(), version: blake3[..12].into(), blake3 }
}

fn report(plugins: BTreeMap<String, PluginIdentity>) -> DiscoveryReport {
    DiscoveryReport {
        segment: "seg-a".into(),
        leader: "a-0".into(),
        address: "127.0.0.1:9".into(),
        location: "X".into(),
        cpu_power: 1,
        free_disk: 0,
        connections: 1,
        members: vec!["a-0".into(), "a-1".into()],
        links: None,
        plugins,
        spaces: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_oversized_plugin_reports_are_refused_counted_and_store_nothing()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let m = Manager::start(ManagerConfig::new(tmp.path().to_owned(), OPERATOR, AGENT)).await?;
    let url = format!("http://{}", m.addr);
    let agent = JsonClient::new(AGENT, Duration::from_secs(30));
    let op = JsonClient::new(OPERATOR, Duration::from_secs(30));
    let post = |r: DiscoveryReport| {
        let (agent, url) = (agent.clone(), url.clone());
        async move { agent.post::<_, serde_json::Value>(&format!("{url}/api/v1/discovery"), &r).await }
    };
    let servers = || {
        let (op, url) = (op.clone(), url.clone());
        async move { op.get::<Vec<ServerRecord>>(&format!("{url}/api/v1/servers")).await.unwrap() }
    };

    // An honest report: both servers' plugins are stored and listed.
    let good = plugin("interpreter", 'a');
    let honest: BTreeMap<String, PluginIdentity> =
        [("a-0".to_string(), good.clone()), ("a-1".to_string(), good.clone())].into();
    post(report(honest)).await?;
    let before = servers().await;
    assert!(before.iter().all(|s| s.plugin.as_ref() == Some(&good)), "{before:?}");

    let mut bad_hash = plugin("interpreter", 'b');
    bad_hash.blake3 = "B".repeat(64);
    bad_hash.version = bad_hash.blake3[..12].into();
    let mut short_hash = plugin("interpreter", 'c');
    short_hash.blake3.truncate(40);
    let mut wrong_version = plugin("interpreter", 'd');
    wrong_version.version = "eeeeeeeeeeee".into();
    let cases: Vec<(&str, BTreeMap<String, PluginIdentity>, &str)> = vec![
        (
            "a server not listed",
            [("intruder".into(), plugin("interpreter", 'f'))].into(),
            "not a listed member",
        ),
        (
            "a name of 4 KiB",
            [("a-0".into(), plugin(&"x".repeat(4096), 'f'))].into(),
            "must be 1 to 64",
        ),
        ("markup in the name", [("a-0".into(), plugin("<b>x</b>", 'f'))].into(), "must be 1 to 64"),
        ("uppercase hash", [("a-0".into(), bad_hash)].into(), "64 lowercase hex"),
        ("short hash", [("a-0".into(), short_hash)].into(), "64 lowercase hex"),
        (
            "version not the hash's prefix",
            [("a-0".into(), wrong_version)].into(),
            "first 12 hex digits",
        ),
    ];
    let refused_before = cm_manager::metrics::plugin_reports_refused();
    for (i, (what, plugins, says)) in cases.iter().enumerate() {
        match post(report(plugins.clone())).await {
            Err(ClientError::Status { status, body, .. }) => {
                assert_eq!(status.as_u16(), 400, "{what}: {body}");
                assert!(body.contains(says), "{what}: {body}");
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        assert_eq!(
            cm_manager::metrics::plugin_reports_refused(),
            refused_before + i as u64 + 1,
            "{what}: counted"
        );
        assert_eq!(servers().await, before, "{what}: nothing stored");
    }
    // A plugin with a made-up field is not JSON the manager reads at all.
    let raw = serde_json::json!({
        "segment": "seg-a", "leader": "a-0", "address": "127.0.0.1:9", "location": "X",
        "cpu_power": 1, "free_disk": 0, "connections": 1, "members": ["a-0"],
        "plugins": {"a-0": {"name": "interpreter", "version": "aaaaaaaaaaaa",
                            "blake3": "a".repeat(64), "command": "rm -rf /"}},
    });
    let e = agent.post::<_, serde_json::Value>(&format!("{url}/api/v1/discovery"), &raw).await;
    assert!(
        matches!(e, Err(ClientError::Status { status, .. }) if status.as_u16() == 400),
        "{e:?}"
    );
    assert_eq!(servers().await, before, "unknown field: nothing stored");

    // A changed plugin on one server is stored for it alone.
    let swapped = plugin("interpreter", '7');
    post(report([("a-1".to_string(), swapped.clone())].into())).await?;
    let after = servers().await;
    let of = |n: &str| after.iter().find(|s| s.name == n).and_then(|s| s.plugin.clone());
    assert_eq!((of("a-0"), of("a-1")), (Some(good), Some(swapped)));
    m.shutdown().await;
    Ok(())
}
