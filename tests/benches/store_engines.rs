//! The manager's two store engines side by side, in one run: the same cluster (real processes:
//! a manager and one segment of agents) on redb, then on PostgreSQL (a throwaway cluster),
//! measuring a publish's time (submit → every server committed) and the operator API's
//! requests per second: reads (`GET /api/v1/jobs`, `GET /api/v1/groups/g`) and writes
//! (`PUT /api/v1/groups/…`), from several client threads for a few seconds each.
//!
//! ```text
//! cargo bench -p cm-tests --bench store_engines -- [--servers 3] [--seconds 3] [--clients 4]
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::postgres::PgCluster;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request on a fresh connection; its status.
fn request(addr: &str, method: &str, path: &str, token: &str, body: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else { return 0 };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let head = String::from_utf8_lossy(&out[..out.len().min(32)]).to_string();
    head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Requests per second `clients` threads get through for `secs`; every answer must be `want`.
fn rate(addr: &str, token: &str, clients: u64, secs: u64, write: bool, want: u16) -> f64 {
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (addr, token) = (addr.to_string(), token.to_string());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < end {
                    let status = if write {
                        let body = format!("{{\"servers\": [\"web-{c}-{n}\"]}}");
                        request(&addr, "PUT", &format!("/api/v1/groups/bench-{c}"), &token, &body)
                    } else if n.is_multiple_of(2) {
                        request(&addr, "GET", "/api/v1/jobs", &token, "")
                    } else {
                        request(&addr, "GET", "/api/v1/groups/g", &token, "")
                    };
                    assert_eq!(status, want, "{}", if write { "write" } else { "read" });
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().expect("client thread")).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

struct Row {
    engine: &'static str,
    publish: Duration,
    reads: f64,
    writes: f64,
}

async fn measure(engine: &'static str, store: Option<String>, test: u8) -> anyhow::Result<Row> {
    let (servers, secs, clients) = (arg("--servers", 3), arg("--seconds", 3), arg("--clients", 4));
    let site = tempfile::tempdir()?;
    for i in 0..200 {
        std::fs::write(
            site.path().join(format!("page-{i}.html")),
            format!("page {i}\n").repeat(200),
        )?;
    }
    let mut layout = Layout::new(test, 1, servers as usize);
    layout.store = store;
    let c = TestCluster::start(&layout, site.path()).await?;
    let t = Instant::now();
    c.publish_committed_everywhere().await?;
    let publish = t.elapsed();
    let addr = c.manager.url.trim_start_matches("http://").to_string();
    let token = c.manager.operator_token.clone();
    let (reads, writes) = tokio::task::spawn_blocking(move || {
        (
            rate(&addr, &token, clients, secs, false, 200),
            rate(&addr, &token, clients, secs, true, 200),
        )
    })
    .await?;
    Ok(Row { engine, publish, reads, writes })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(pg) = PgCluster::start()? else {
        anyhow::bail!("PostgreSQL is not installed: nothing to compare");
    };
    let url = pg.create_db("bench")?;
    let rows = vec![measure("redb", None, 61).await?, measure("postgres", Some(url), 62).await?];
    println!(
        "| engine | publish, submit → committed everywhere (s) | API reads/s | API writes/s |"
    );
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.0} | {:.0} |",
            r.engine,
            r.publish.as_secs_f64(),
            r.reads,
            r.writes
        );
    }
    Ok(())
}
