//! Slowloris against real processes (issue 14, item 5): 3,000 connections that send half a
//! request and then nothing, held against the manager's API and a group leader's endpoint and
//! opened again as the servers close them, while a publish runs. The processes start under the
//! common soft limit of 1,024 open files (as under systemd), which such an attack used to exhaust
//! ("accept: Too many open files", then "quorum not met: 0 of 3").
//!
//! What must hold: the publish completes and commits everywhere and the operator API answers
//! during the attack; a peer over its share is answered `503`; every half-open connection is
//! closed by the server (the header-read timeout) once the attacker stops opening new ones.
//! Attackers connect from other loopback addresses (127.0.0.2–4), as other hosts would.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cm_tests::cluster::{Layout, TestCluster};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

/// Half-open connections per attacker address and target.
const PER_ADDRESS: usize = 500;
const ATTACKERS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 4)];

/// What the attackers saw.
#[derive(Default)]
struct Seen {
    /// Connections answered `503` (shed).
    shed: AtomicUsize,
    /// Connections the server closed without an answer (header timeout).
    closed: AtomicUsize,
    /// Connections currently open and unanswered.
    held: AtomicUsize,
}

/// One attacker slot: connect from `from`, send half a request, wait for the server to end it,
/// and again until `stop`. Returns once the server closed its last connection.
async fn half_open(from: Ipv4Addr, to: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    while !stop.load(Ordering::Relaxed) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::from((from, 0))).expect("bind an attacker address");
        let connect = tokio::time::timeout(Duration::from_secs(5), socket.connect(to)).await;
        let Ok(Ok(mut stream)) = connect else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let _ = stream.write_all(b"POST /api/v1/jobs HTTP/1.1\r\nhost: victim\r\nx-slow: ").await;
        seen.held.fetch_add(1, Ordering::Relaxed);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        seen.held.fetch_sub(1, Ordering::Relaxed);
        if answer.starts_with(b"HTTP/1.1 503") {
            seen.shed.fetch_add(1, Ordering::Relaxed);
        } else {
            seen.closed.fetch_add(1, Ordering::Relaxed);
        }
        // A shed slot comes back a little later, as a patient attacker would.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn address_of(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).expect("a URL");
    rest.split('/').next().unwrap().parse().expect("host:port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_do_not_stop_a_publish_or_the_operator_api() {
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(65_536);
    if hard < 8_192 {
        cm_tests::missing_part(&format!("an open-file hard limit of 8,192 (it is {hard})"));
        return;
    }
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("index.html"), "<h1>under attack</h1>").unwrap();
    // The cluster's processes inherit the common soft default; the test itself needs more.
    setrlimit(Resource::Nofile, Rlimit { current: Some(1_024), maximum: Some(hard) }).unwrap();
    let started = TestCluster::start(&Layout::new(41, 1, 3), src.path()).await;
    setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) }).unwrap();
    let c = started.unwrap();

    let leader = c.leader_of("seg0").expect("seg0 has a leader");
    let member = (leader + 1) % c.agents.len();
    // A member learns its GL's endpoint from the election shortly after it has registered.
    let mut gl_url = None;
    for _ in 0..300 {
        gl_url = c.agents[member].status().unwrap()["gl_url"].as_str().map(str::to_string);
        if gl_url.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gl_url = gl_url.expect("the member knows its group leader's endpoint within 30 s");
    let targets = [address_of(&c.manager.url), address_of(&gl_url)];

    let stop = Arc::new(AtomicBool::new(false));
    let seen: [Arc<Seen>; 2] = Default::default();
    let mut attack = JoinSet::new();
    for (target, seen) in targets.iter().zip(&seen) {
        for from in ATTACKERS {
            for _ in 0..PER_ADDRESS {
                attack.spawn(half_open(from, *target, stop.clone(), seen.clone()));
            }
        }
    }
    // Bounded wait until the attack is in place: both servers hold half-open connections.
    for _ in 0..300 {
        if seen.iter().all(|s| s.held.load(Ordering::Relaxed) >= 500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    c.publish_committed_everywhere().await.expect("a publish under attack");
    let segments: Vec<serde_json::Value> = c.op.get(&c.url("segments")).await.unwrap();
    assert_eq!(segments.len(), 1, "the operator API answers under attack");
    for (name, seen) in ["manager", "group leader"].iter().zip(&seen) {
        let (shed, held) = (seen.shed.load(Ordering::Relaxed), seen.held.load(Ordering::Relaxed));
        assert!(shed > 0, "the {name} answered no attacker 503 (held {held})");
    }

    // The attacker stops opening; the servers close what it still holds (header timeout).
    stop.store(true, Ordering::Relaxed);
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        while attack.join_next().await.is_some() {}
    })
    .await;
    let held: Vec<usize> = seen.iter().map(|s| s.held.load(Ordering::Relaxed)).collect();
    assert!(drained.is_ok(), "half-open connections still held after 120 s: {held:?}");
    for (name, seen) in ["manager", "group leader"].iter().zip(&seen) {
        assert!(seen.closed.load(Ordering::Relaxed) > 0, "the {name} never closed a half-open one");
    }
}
