//! Several `cmover manager` processes on one PostgreSQL (a throwaway cluster): exactly one is
//! active; a standby serves reads and redirects writes (307) to it; when the active one is
//! killed (-9) a standby takes the lease over and accepts writes; a replica frozen past its
//! lease and woken again gets no write in (the database refuses its fencing token).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cm_agent::launch::{ManagerOptions, ManagerProcess, start_manager, start_replica};
use cm_tests::postgres::PgCluster;

/// One HTTP/1.1 exchange by hand (no redirect followed): status, headers, body.
fn call(url: &str, method: &str, path: &str, token: &str, body: &str) -> (u16, String, String) {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connecting to a manager");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn location(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")))
        .map(str::to_string)
}

fn active(m: &ManagerProcess) -> Option<bool> {
    let addr = m.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["active"].as_bool()
}

/// Waits (bounded) until `m` says it is active (or standby).
fn wait_role(m: &ManagerProcess, want: bool, what: &str) {
    let end = Instant::now() + Duration::from_secs(40);
    while active(m) != Some(want) {
        assert!(
            Instant::now() < end,
            "{what}: {} never became {}",
            m.url,
            if want { "active" } else { "standby" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn group(servers: &[&str]) -> String {
    serde_json::json!({ "servers": servers }).to_string()
}

#[test]
fn one_replica_is_active_standbys_redirect_and_a_standby_takes_over() -> anyhow::Result<()> {
    let Some(pg) = PgCluster::start()? else { return Ok(()) };
    let url = pg.create_db("replicas")?;
    let bin = cm_tests::cmover_bin();
    let dir = tempfile::tempdir()?;
    let opts =
        ManagerOptions { store: Some(url), lease_ttl_ms: Some(1500), ..ManagerOptions::default() };
    let mut a = start_manager(&bin, dir.path(), &opts)?;
    wait_role(&a, true, "the first replica on a free lease");
    let mut b = start_replica(&bin, &a, "manager-b")?;
    let c = start_replica(&bin, &a, "manager-c")?;
    // b and c had time to try the lease (its renewals come every half second).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!((active(&a), active(&b), active(&c)), (Some(true), Some(false), Some(false)));

    let tok = &a.operator_token;
    // A write to a standby: 307 to the active replica, same path; nothing written by it.
    let (status, head, _) = call(&b.url, "PUT", "/api/v1/groups/g1", tok, &group(&["web-1"]));
    assert_eq!(status, 307, "{head}");
    assert_eq!(location(&head).as_deref(), Some(format!("{}/api/v1/groups/g1", a.url).as_str()));
    let (status, _, body) = call(&b.url, "GET", "/api/v1/groups/g1", tok, "");
    assert_eq!(status, 404, "{body}");
    // Repeated where it points, the write is taken; the standby reads it from the database.
    let (status, _, body) = call(&a.url, "PUT", "/api/v1/groups/g1", tok, &group(&["web-1"]));
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = call(&c.url, "GET", "/api/v1/groups/g1", tok, "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("web-1"));
    // Unauthenticated writes are refused, not redirected.
    assert_eq!(
        call(&b.url, "PUT", "/api/v1/groups/g2", "wrong-token-0123456789", &group(&[])).0,
        401
    );

    // kill -9 of the active replica: one standby takes over once the lease lapses.
    a.guard.kill();
    let end = Instant::now() + Duration::from_secs(40);
    let (new, other) = loop {
        match (active(&b), active(&c)) {
            (Some(true), _) => break (&b, &c),
            (_, Some(true)) => break (&c, &b),
            _ => {}
        }
        assert!(Instant::now() < end, "no standby took over");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(active(other), Some(false), "exactly one replica is active");
    let (status, _, body) = call(&new.url, "PUT", "/api/v1/groups/g1", tok, &group(&["web-2"]));
    assert_eq!(status, 200, "{body}");
    let (status, head, _) = call(&other.url, "PUT", "/api/v1/groups/g3", tok, &group(&[]));
    assert_eq!((status, location(&head)), (307, Some(format!("{}/api/v1/groups/g3", new.url))));

    // Freeze the active replica past its lease: the other takes over. Woken, the old one
    // (which still thinks it is active until its next renewal) gets no write in.
    let frozen_is_b = std::ptr::eq(new, &b);
    let (frozen, woke) = if frozen_is_b { (&b, &c) } else { (&c, &b) };
    frozen.guard.pause();
    wait_role(woke, true, "the standby while the active replica is frozen");
    frozen.guard.unpause();
    let (status, _, body) = call(&frozen.url, "PUT", "/api/v1/groups/g4", tok, &group(&["web-9"]));
    assert!(status == 307 || status == 500, "a deposed replica's write: {status} {body}");
    wait_role(frozen, false, "the deposed replica");
    let (status, _, _) = call(&woke.url, "GET", "/api/v1/groups/g4", tok, "");
    assert_eq!(status, 404, "the deposed replica's write never reached the database");
    let (status, _, body) = call(&woke.url, "GET", "/api/v1/groups/g1", tok, "");
    assert!(status == 200 && body.contains("web-2"), "{body}");
    b.guard.kill();
    drop(c);
    Ok(())
}
