//! A group leader's side of an abort (cm-tree's `LeaderNode`, in process): the order must carry
//! a pinned manager key's signature; once taken, the run is gone from the GL (`410 Gone` with
//! the order to a member asking for its targets, to a notification for it), a member's report on
//! it is answered with the order, the segment side is told to discard, and every later run's
//! targets name the aborted run (`aborted_before`), so a member that missed the abort discards
//! what the run prepared before it applies the next one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cm_tree::BoxFuture;
use cm_tree::abort::AbortOrder;
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::leader::{DeliveryOutcome, LeaderConfig, LeaderNode, LocalDelivery};
use cm_tree::manifest::Manifest;
use cm_tree::message::{MemberApplyReport, Notification};
use serde_json::Value;

/// Delivers nothing (the fetch never completes: its source does not answer); records aborts.
#[derive(Default)]
struct Recorder {
    aborted: Mutex<Vec<u64>>,
}

impl LocalDelivery for Recorder {
    fn deliver(&self, _: u64, _: PathBuf, _: Manifest) -> BoxFuture<'static, DeliveryOutcome> {
        Box::pin(async { DeliveryOutcome::default() })
    }
    fn member_report(&self, _: MemberApplyReport) -> bool {
        true
    }
    fn abort(&self, order: &AbortOrder) {
        self.aborted.lock().unwrap().push(order.run);
    }
}

fn status_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Status { status, body, .. }) => (status.as_u16(), body),
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

fn notification(run: u64) -> Notification {
    let mut n = Notification {
        run,
        segment: "seg".into(),
        // Nothing listens there: the fetch keeps failing, the run stays under way.
        source: "http://127.0.0.1:9".into(),
        manager: "http://127.0.0.1:9".into(),
        manifest: Manifest::of_bytes(&vec![7u8; 100_000], 16 << 10),
        slots: 1,
        servers: vec!["a".into(), "b".into()],
        site: "www".into(),
        cache: None,
        signature: None,
    };
    n.sign(cm_tests::test_signer());
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gl_takes_only_the_managers_order_and_passes_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LeaderConfig::new("seg", "gl", "agent-token", dir.path());
    cfg.manager_keys = cm_tests::test_pins();
    let delivery = Arc::new(Recorder::default());
    let gl = LeaderNode::start(cfg, delivery.clone()).await.unwrap();
    let c = JsonClient::new("agent-token", Duration::from_secs(5));
    let base = format!("http://{}", gl.addr);

    let _: Value = c.post(&format!("{base}/notify"), &notification(5)).await.unwrap();
    let targets: Value = c.get(&format!("{base}/dist/5/servers")).await.unwrap();
    assert_eq!(targets["servers"], serde_json::json!(["a", "b"]));

    // Unsigned, or signed by a key the GL does not pin: refused, the run goes on.
    let mut order = AbortOrder {
        run: 5,
        reason: "run 5 aborted by an operator".into(),
        issued_ms: 1,
        signature: None,
    };
    assert_eq!(status_of(c.post::<_, Value>(&format!("{base}/abort"), &order).await).0, 403);
    let other = cm_assignment::SigningKey::from_pkcs8(
        &cm_assignment::SigningKey::generate_pkcs8().unwrap(),
    )
    .unwrap();
    order.sign(&other);
    assert_eq!(status_of(c.post::<_, Value>(&format!("{base}/abort"), &order).await).0, 403);
    assert!(gl.progress(5).is_some(), "the run was stopped by an order nobody pinned");
    assert!(delivery.aborted.lock().unwrap().is_empty());

    // The manager's order: the run is stopped and gone, the segment side told.
    order.sign(cm_tests::test_signer());
    let answer: Value = c.post(&format!("{base}/abort"), &order).await.unwrap();
    assert_eq!(answer["was_running"], true, "{answer}");
    assert!(gl.progress(5).is_none());
    assert_eq!(*delivery.aborted.lock().unwrap(), vec![5]);
    assert!(!dir.path().join("run-5.assignment").exists(), "the GL's copy is deleted");

    // A member asking for the run's targets, and a notification for it: 410 with the order.
    let (code, body) = status_of(c.get::<Value>(&format!("{base}/dist/5/servers")).await);
    assert_eq!(code, 410, "{body}");
    let gone: Value = serde_json::from_str(&body).unwrap();
    let relayed: AbortOrder = serde_json::from_value(gone["aborted"].clone()).unwrap();
    assert_eq!(relayed.verify(&cm_tests::test_pins()), Ok(()), "members can check it");
    assert_eq!(
        status_of(c.post::<_, Value>(&format!("{base}/notify"), &notification(5)).await).0,
        410
    );

    // A member's report on the run is answered with the order.
    let report = MemberApplyReport {
        server: "a".into(),
        node: 2,
        run: 5,
        error: None,
        live: Some(1),
        summary: String::new(),
        site: "www".into(),
    };
    let answer: Value = c.post(&format!("{base}/members/report"), &report).await.unwrap();
    assert_eq!(answer["aborted"]["run"], 5, "{answer}");

    // The next run's targets name the aborted run for members that missed it.
    let _: Value = c.post(&format!("{base}/notify"), &notification(6)).await.unwrap();
    let targets: Value = c.get(&format!("{base}/dist/6/servers")).await.unwrap();
    let before: Vec<AbortOrder> =
        serde_json::from_value(targets["aborted_before"].clone()).unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0], relayed);
    gl.stop();
}
