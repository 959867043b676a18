//! Aborting a running job on a cluster of real processes (manager and agents): the abort lands
//! while the run is in transfer (the GL holds the assignment and its MCTP session to the members
//! is under way, slowed by the agents' rate cap), through `cmover job abort --wait`. Nothing live
//! changes anywhere, no server keeps the prepared release, the job, the run and the history say
//! "aborted by an operator", and a later publish works as usual. Before that, the GL's abort
//! endpoint refuses what an agent could send (no signature, a key the GL does not pin) and the
//! manager's abort endpoint refuses the agent token.

mod cli_common;

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use cli_common::Operator;
use cm_manager::model::{Job, JobKind, JobState, Payload};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use cm_tests::observe;
use cm_tree::abort::AbortOrder;
use cm_tree::http::{ClientError, JsonClient};
use serde_json::Value;

fn status_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    match r {
        Err(ClientError::Status { status, .. }) => status.as_u16(),
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

/// The releases under a server's site root.
fn releases(root: &std::path::Path) -> BTreeSet<u64> {
    fs::read_dir(root.join("releases"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until `cond` holds; panics with `what` and the cluster's logs otherwise.
async fn wait_until(c: &TestCluster, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "{what} not reached within {limit:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_mid_transfer_leaves_live_alone_everywhere_and_the_next_publish_works() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>one</h1>").unwrap();
    let mut layout = Layout::new(70, 1, 3);
    // 5 Mbit/s (MCTP's floor is 4): the large file below takes ~20 s to reach the members,
    // and the abort lands in it.
    layout.max_rate_mbps = Some(5);
    let c = TestCluster::start(&layout, src.path()).await.unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let live_before = observe(&c.staging);
    c.assert_live_everywhere(&live_before, "after the first publish");

    // The next release: a large incompressible file, so the MCTP session lasts.
    let mut big = vec![0u8; 12 << 20];
    blake3::Hasher::new().update(b"abort test").finalize_xof().fill(&mut big);
    fs::write(c.staging.join("big.bin"), &big).unwrap();
    fs::write(c.staging.join("index.html"), "<h1>two</h1>").unwrap();
    let job =
        c.submit_with(JobKind::Publish, Payload::Staging, auto_commit_policy()).await.unwrap();
    let run = c.run_of(job.id, Duration::from_secs(30)).await.unwrap();

    // The run is in transfer: its GL holds the whole assignment, the members are receiving it.
    let end = Instant::now() + Duration::from_secs(60);
    let (gl_address, release) = loop {
        let r: Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
        let seg = &r["run"]["segments"]["seg0"];
        if seg["status"] == "received" {
            break (
                seg["address"].as_str().unwrap().to_string(),
                r["run"]["release"].as_u64().unwrap(),
            );
        }
        assert!(r["run"]["phase"]["phase"] == "distributing", "run ended before the abort: {r}");
        assert!(Instant::now() < end, "run {run} never in transfer: {r}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The GL applies its own copy while MCTP goes on: the release is prepared there.
    let gl_root = c.agents[c.leader_of("seg0").unwrap()].site_root.clone();
    wait_until(&c, "the release prepared on the GL", Duration::from_secs(30), || {
        releases(&gl_root).contains(&release)
    })
    .await;

    // What an agent could send is refused, and changes nothing.
    let agent = JsonClient::new(&c.manager.agent_token, Duration::from_secs(5));
    let abort_url = c.url(&format!("jobs/{}/abort", job.id));
    assert_eq!(status_of(agent.post::<_, Value>(&abort_url, &serde_json::json!({})).await), 404);
    let gl_abort = format!("{}/abort", agent.base_url(&gl_address));
    let mut order = AbortOrder {
        run,
        reason: "forged".into(),
        issued_ms: cm_manager::now_ms(),
        signature: None,
    };
    assert_eq!(status_of(agent.post::<_, Value>(&gl_abort, &order).await), 403, "unsigned");
    order.sign(cm_tests::test_signer());
    assert_eq!(status_of(agent.post::<_, Value>(&gl_abort, &order).await), 403, "unpinned key");
    let r: Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
    assert_eq!(r["run"]["phase"]["phase"], "distributing", "{r}");

    // The operator aborts it and waits until the GL stopped it.
    let op = Operator::new(&c.manager.url, &c.dir.path().join("secrets/operator.token"));
    let id = job.id.to_string();
    let out = op.expect(0, &["job", "abort", &id, "--wait"]);
    assert!(out.stdout.contains("stopped by 1 of 1 group leaders"), "{out:?}");

    let j: Job = c.op.get(&c.url(&format!("jobs/{id}"))).await.unwrap();
    match &j.state {
        JobState::Aborted { run: r, by, at_ms } => {
            assert_eq!(*r, run);
            assert!(by.contains("operator") && *at_ms > 0, "{j:?}");
        }
        other => panic!("job not aborted: {other:?}"),
    }
    assert!(j.pending_commit.is_none(), "{j:?}");
    let r: Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
    assert_eq!(r["run"]["phase"]["phase"], "aborted", "{r}");
    let history: Vec<Value> = c.op.get(&c.url(&format!("history?run={run}"))).await.unwrap();
    let said = |what: &str| history.iter().any(|h| h["event"].as_str().unwrap().contains(what));
    assert!(said("aborted by an operator (bearer token)"), "{history:?}");
    assert!(said("stopped the aborted run"), "{history:?}");

    // Refused again, naming the state; the CLI exits 1.
    let out = op.expect(1, &["job", "abort", &id]);
    assert!(out.stderr.contains("409") && out.stderr.contains("aborted already"), "{out:?}");

    // No server keeps the run's release (the GL discards the one it built; the members never
    // completed the transfer), and live is release 1 everywhere.
    for a in &c.agents {
        let root = a.site_root.clone();
        wait_until(
            &c,
            &format!("{}: only release 1 kept", a.spec.name),
            Duration::from_secs(30),
            || releases(&root) == BTreeSet::from([1]),
        )
        .await;
    }
    c.assert_live_everywhere(&live_before, "after the abort");

    // A later publish goes through as usual and nothing of the aborted run reappears.
    fs::remove_file(c.staging.join("big.bin")).unwrap();
    fs::write(c.staging.join("index.html"), "<h1>three</h1>").unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let live_after = observe(&c.staging);
    c.assert_live_everywhere(&live_after, "after the publish that followed the abort");
    assert!(!live_after.contains_key("big.bin"));
}
