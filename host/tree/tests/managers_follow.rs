//! `cm_tree::managers::Managers` over real sockets: a dead replica is skipped, a standby's 503
//! moves on, a standby's 307 to a configured replica is followed and the follower sticks to the
//! one that answers; a redirect to a URL that is not a configured manager is never called (the
//! token goes nowhere else).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cm_tree::http::JsonClient;
use cm_tree::managers::Managers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A one-answer-fits-all HTTP server; counts the requests it got.
async fn responder(
    answer: impl Fn(u16) -> String + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let (h, answer) = (hits.clone(), Arc::new(answer));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let (h, answer) = (h.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                // The request is small: head and body arrive together on loopback.
                let _ = s.read(&mut buf).await;
                h.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(answer(port).as_bytes()).await;
            });
        }
    });
    (format!("http://127.0.0.1:{port}"), hits)
}

fn reply(status: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn follows_the_active_replica_past_a_dead_one_and_a_standby() {
    let (active, active_hits) = responder(|_| reply("200 OK", "", r#"{"ok":true}"#)).await;
    let target = active.clone();
    let (standby, _) = responder(move |_| {
        reply("307 Temporary Redirect", &format!("location: {target}/api/v1/x\r\n"), "{}")
    })
    .await;
    let (unavailable, _) =
        responder(|_| reply("503 Service Unavailable", "retry-after: 1\r\n", "{}")).await;
    let m = Managers::new(
        JsonClient::new("secret-token", Duration::from_secs(2)),
        &[dead_url(), unavailable, standby, active.clone()],
    );
    let v: serde_json::Value =
        m.post("/api/v1/x", &serde_json::json!({}), Duration::from_secs(10)).await.unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(m.current(), Some(active.clone()));
    // It sticks to the replica that answered.
    let _: serde_json::Value =
        m.post("/api/v1/x", &serde_json::json!({}), Duration::from_secs(10)).await.unwrap();
    assert_eq!(active_hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_redirect_to_an_unconfigured_url_is_never_followed() {
    let (elsewhere, elsewhere_hits) =
        responder(|_| reply("200 OK", "", r#"{"stolen":true}"#)).await;
    let to = elsewhere.clone();
    let (hostile, _) = responder(move |_| {
        reply("307 Temporary Redirect", &format!("location: {to}/api/v1/x\r\n"), "{}")
    })
    .await;
    let m = Managers::new(JsonClient::new("secret-token", Duration::from_secs(2)), &[hostile]);
    let r = m
        .post::<_, serde_json::Value>("/api/v1/x", &serde_json::json!({}), Duration::from_secs(1))
        .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(elsewhere_hits.load(Ordering::SeqCst), 0, "the token went to an unconfigured URL");
}

#[tokio::test]
async fn a_client_error_is_the_callers_at_once() {
    let (bad, hits) = responder(|_| reply("400 Bad Request", "", r#"{"error":"no"}"#)).await;
    let m = Managers::new(JsonClient::new("t", Duration::from_secs(2)), &[bad]);
    let r =
        m.post::<_, serde_json::Value>("/x", &serde_json::json!({}), Duration::from_secs(30)).await;
    assert!(r.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a 400 is not retried");
}
