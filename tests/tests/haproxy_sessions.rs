//! The load-balancer plugin's `sessions` against a real HAProxy (`plugins/haproxy`: the `scur`
//! of `show stat`), and a roll's drain wait over it (`cm_manager::golive::Balancer`): 0 for
//! an idle server, 1 while a request is held open on the backend, 0 again once it is answered.
//! The backend is a listener in the test that holds the request until the test releases it.

mod plugin_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use cm_manager::golive::{Balancer, DrainWait, store_dir};
use cm_plugin_host::{PluginError, PluginManifest, PluginStore};
use cm_tests::stack::{Haproxy, free_port};
use plugin_support::*;

/// A backend answering one request: it tells `got` once the request is read, then answers
/// only after `release` says so.
fn held_backend(
    got: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
        }
        got.send(()).unwrap();
        // Bounded: a test that fails before releasing must not hang here.
        let _ = release.recv_timeout(Duration::from_secs(20));
        let mut stream = reader.into_inner();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .unwrap();
    });
    (address, server)
}

/// One GET through `front`, answered when the backend is released; returns the answer.
fn client(front: String) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut stream = TcpStream::connect(&front).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    })
}

/// The bundled HAProxy plugin installed as `lb` in the manager store of `data`.
fn install_plugin(haproxy: &Haproxy, data: &Path) {
    let (runtime, _) = runtime();
    let store = PluginStore::open(runtime, &store_dir(data)).unwrap();
    let manifest = PluginManifest::parse(&haproxy.plugin_manifest("lb"), "lb.toml").unwrap();
    store.install(&component("haproxy"), manifest, "haproxy").unwrap();
}

#[test]
fn sessions_count_a_held_request_and_the_drain_waits_for_it() {
    let (got_tx, got) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let (backend, server) = held_backend(got_tx, release_rx);
    let front = format!("127.0.0.1:{}", free_port());
    let Some(haproxy) =
        Haproxy::with_lines(&front, &format!("  server s1 {backend}\n")).expect("haproxy starts")
    else {
        // `.ci/run` installs haproxy; on a bare developer machine there is nothing to drive.
        cm_tests::missing_part("haproxy not installed (the real-HAProxy sessions test)");
        return;
    };
    let data = tempfile::tempdir().unwrap();
    install_plugin(&haproxy, data.path());
    let lb = Balancer::open(data.path(), "lb").unwrap();
    let s1 = vec!["app/s1".to_string()];

    // Idle: no session, so a drain's wait ends at its first poll.
    assert_eq!(lb.sessions("app/s1").unwrap(), 0);
    let idle = lb.wait_sessions(&s1, Duration::from_secs(10));
    assert!(matches!(idle, DrainWait::Ended { .. }), "{idle}");

    // A request held open on the backend is one session of s1 on the balancer.
    let answer = client(haproxy.front.clone());
    got.recv_timeout(Duration::from_secs(10)).expect("the request reaches the backend");
    assert_eq!(lb.sessions("app/s1").unwrap(), 1);
    lb.drain("app/s1").unwrap();
    // The drain waits for it, up to its grace, and then says how many were left.
    let over = lb.wait_sessions(&s1, Duration::from_millis(200));
    assert_eq!(over, DrainWait::GraceOver { open: 1, grace_ms: 200 });
    assert_eq!(over.to_string(), "1 session still open after the 200 ms grace: switching anyway");

    // Answered: the session ends, and the drain's wait ends with it (well within its grace).
    release.send(()).unwrap();
    assert!(answer.join().unwrap().starts_with("HTTP/1.1 200"));
    server.join().unwrap();
    let ended = lb.wait_sessions(&s1, Duration::from_secs(10));
    assert!(matches!(ended, DrainWait::Ended { .. }), "{ended}");
    assert_eq!(lb.sessions("app/s1").unwrap(), 0);
}

#[test]
fn sessions_of_unknown_or_unsafe_names_are_errors_never_zero() {
    let Some(haproxy) = Haproxy::with_lines(
        &format!("127.0.0.1:{}", free_port()),
        "  server s1 127.0.0.1:9 disabled\n",
    )
    .expect("haproxy starts") else {
        cm_tests::missing_part("haproxy not installed (the real-HAProxy sessions test)");
        return;
    };
    let data = tempfile::tempdir().unwrap();
    install_plugin(&haproxy, data.path());
    let (runtime, _) = runtime();
    let store = PluginStore::open(runtime, &store_dir(data.path())).unwrap();
    let lb = store.load_balancer("lb").unwrap();
    assert_eq!(lb.sessions("app/s1").unwrap(), 0);
    for (server, says) in [
        ("app/nope", "knows no server app/nope"),
        ("nope/s1", "`show stat`"),
        ("app/s1 x", "not a plain"),
        ("app/s1;shutdown", "not a plain"),
        ("s1", "not named backend/server"),
    ] {
        match lb.sessions(server) {
            Err(PluginError::Vetoed { hook: "sessions", message, .. }) => {
                assert!(message.contains(says), "{server}: {message}")
            }
            other => panic!("{server}: expected an error, got {other:?}"),
        }
    }
    // The plugin's refusals reached HAProxy as nothing: it still answers.
    assert!(haproxy.command("show info").unwrap().contains("Name: HAProxy"));
    // A manager's wait over a server it cannot count is not a count of 0.
    let lb = Balancer::open(data.path(), "lb").unwrap();
    let wait = lb.wait_sessions(&["app/nope".into()], Duration::from_secs(1));
    assert!(matches!(wait, DrainWait::Uncounted { grace_ms: 1_000, .. }), "{wait}");
}
