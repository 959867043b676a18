//! The search-engine refresh after a commit, end to end with real processes: a site set to
//! announce its changes by IndexNow to a local HTTP receiver this test runs gets, once per
//! commit, exactly the changed URLs (base URL + path); set to a sitemap ping, the receiver gets
//! one ping per commit. The outcome is in the history.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cm_manager::model::{JobKind, Payload};
use cm_tests::cluster::{Layout, TestCluster};
use serde_json::Value;

/// Every request the receiver got: (method, target, body).
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// An HTTP receiver answering 200 to everything, one request per connection.
fn receiver() -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut parts = line.split_whitespace();
            let (method, target) =
                (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            log.lock().unwrap().push((method, target, String::from_utf8_lossy(&body).into_owned()));
            let _ = reader
                .into_inner()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (address, seen)
}

/// Waits (bounded) until the history holds `n` search refresh lines; returns the last.
async fn refresh_lines(c: &TestCluster, n: usize) -> String {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
        let lines: Vec<&str> = history
            .iter()
            .filter_map(|h| h["event"].as_str())
            .filter(|e| e.starts_with("search refresh"))
            .collect();
        if lines.len() >= n {
            assert_eq!(lines.len(), n, "{lines:?}");
            return lines[n - 1].to_string();
        }
        assert!(Instant::now() < end, "{lines:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_commit_announces_exactly_its_changed_urls() {
    let src = tempfile::tempdir().unwrap();
    for (p, body) in [("index.html", "v1"), ("a.html", "a1"), ("b/c.html", "c1"), ("same.txt", "s")]
    {
        std::fs::create_dir_all(src.path().join(p).parent().unwrap()).unwrap();
        std::fs::write(src.path().join(p), body).unwrap();
    }
    let (address, seen) = receiver();
    let c = TestCluster::start(&Layout::new(196, 1, 2), src.path()).await.unwrap();
    let key = "0123456789abcdef";
    c.put_site(serde_json::json!({ "refresh": { "search": {
        "url": format!("http://{address}/indexnow"), "format": "indexnow",
        "base_url": "https://www.example.com/", "key": key,
    } } }))
    .await
    .unwrap();

    // The first commit: every URL is new.
    c.publish_committed_everywhere().await.unwrap();
    let line = refresh_lines(&c, 1).await;
    assert_eq!(line, "search refresh: IndexNow told of 5 changed URLs");
    // The second: one change, one removal, one addition.
    std::fs::write(c.staging.join("a.html"), "a2").unwrap();
    std::fs::remove_file(c.staging.join("b/c.html")).unwrap();
    std::fs::write(c.staging.join("d.html"), "d2").unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let line = refresh_lines(&c, 2).await;
    assert_eq!(line, "search refresh: IndexNow told of 3 changed URLs");
    {
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "one request per commit: {got:?}");
        let (method, target, body) = &got[1];
        assert_eq!((method.as_str(), target.as_str()), ("POST", "/indexnow"));
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["host"], "www.example.com");
        assert_eq!(body["key"], key);
        assert_eq!(body["keyLocation"], format!("https://www.example.com/{key}.txt"));
        let mut urls: Vec<&str> =
            body["urlList"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
        urls.sort();
        assert_eq!(
            urls,
            [
                "https://www.example.com/a.html",
                "https://www.example.com/b/c.html",
                "https://www.example.com/d.html"
            ]
        );
        let first: Value = serde_json::from_str(&got[0].2).unwrap();
        assert_eq!(first["urlList"].as_array().unwrap().len(), 5, "index.html, /, a, b/c, same");
    }

    // A sitemap ping instead: one GET per commit, naming the sitemap.
    c.put_site(serde_json::json!({ "refresh": { "search": {
        "url": format!("http://{address}/ping"), "format": "sitemap_ping",
        "base_url": "https://www.example.com",
    } } }))
    .await
    .unwrap();
    c.run_ok(JobKind::Rollback, Payload::Rollback { to: None }).await.unwrap();
    let line = refresh_lines(&c, 3).await;
    assert!(line.starts_with("search refresh: sitemap ping sent"), "{line}");
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(
        (got[2].0.as_str(), got[2].1.as_str()),
        ("GET", "/ping?sitemap=https%3A%2F%2Fwww%2Eexample%2Ecom%2Fsitemap%2Exml")
    );
}
