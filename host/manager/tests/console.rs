//! The console over real HTTP against a manager in this process: without a session every page,
//! fragment and the event stream lead to the login page and show no data; a wrong token gets the
//! login page again; the right one a session cookie (HttpOnly, SameSite=Strict); a POST without
//! the session's CSRF token changes nothing; names with markup render as text; logout ends the
//! session, and a session cookie opens no API route.

use std::time::Duration;

use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::http::JsonClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OP: &str = "operator-token-for-console-test";
const AGENT: &str = "agent-token-for-console-test";
const EVIL: &str = "<script>alert(1)";

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), read to the end.
async fn call(addr: &str, method: &str, path: &str, cookie: Option<&str>, form: &str) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Answer { status, head: head.to_string(), body: body.to_string() }
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
    page[at..at + 64].to_string()
}

#[tokio::test]
async fn the_console_shows_nothing_without_a_session_and_escapes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manager::start(ManagerConfig::new(dir.path().to_path_buf(), OP, AGENT)).await.unwrap();
    let addr = m.addr.to_string();
    let agent = JsonClient::new(AGENT, Duration::from_secs(5));
    let report = serde_json::json!({
        "segment": "seg-a", "leader": "gl-a", "address": "127.0.0.1:9", "location": "Etc/UTC",
        "cpu_power": 1, "free_disk": 1u64 << 30, "connections": 0, "members": ["gl-a", EVIL],
    });
    let _: serde_json::Value =
        agent.post(&format!("{}/api/v1/discovery", m.url()), &report).await.unwrap();

    let pages = [
        "/console/",
        "/console/sites",
        "/console/jobs",
        "/console/runs",
        "/console/runs/1",
        "/console/checkpoints",
        "/console/plugins",
        "/console/history?q=seg",
        "/console/events",
        "/console/nothing-here",
    ];
    for p in pages {
        let a = call(&addr, "GET", p, None, "").await;
        assert_eq!((a.status, a.header("location")), (303, Some("/console/login")), "{p}");
        assert!(!a.body.contains("gl-a") && !a.body.contains("seg-a"), "{p}: {}", a.body);
    }
    // Forms without a session change nothing.
    let a = call(&addr, "POST", "/console/groups", None, "name=g&servers=gl-a").await;
    assert_eq!(a.status, 303);
    assert!(m.db().groups().unwrap().is_empty());
    // A forged cookie is no session.
    let forged = format!("cm_session={}", "a".repeat(64));
    assert_eq!(call(&addr, "GET", "/console/", Some(&forged), "").await.status, 303);

    let wrong = call(&addr, "POST", "/console/login", None, "token=not-it").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("That is not the operator token"));
    assert!(!wrong.body.contains("gl-a") && wrong.header("set-cookie").is_none());

    let login = call(&addr, "POST", "/console/login", None, &format!("token={OP}")).await;
    assert_eq!((login.status, login.header("location")), (303, Some("/console/")));
    let set = login.header("set-cookie").expect("a session cookie").to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(attr), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();

    let overview = call(&addr, "GET", "/console/", Some(&cookie), "").await;
    assert_eq!(overview.status, 200);
    assert!(overview.body.contains("gl-a"));
    assert!(overview.body.contains("&lt;script&gt;alert(1)"), "the name is shown, as text");
    assert!(!overview.body.contains(EVIL), "a name from the store became markup");
    let csp = overview.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");

    // A POST with another token than the session's changes nothing; with it, it does.
    let csrf = csrf_of(&overview.body);
    let evil_group = "name=%3Cscript%3Ealert(1)&servers=gl-a";
    let a = call(&addr, "POST", "/console/groups", Some(&cookie), evil_group).await;
    assert_eq!(a.status, 303);
    let a = call(
        &addr,
        "POST",
        "/console/groups",
        Some(&cookie),
        &format!("{evil_group}&csrf={}", "0".repeat(64)),
    )
    .await;
    assert_eq!(a.status, 303);
    assert!(m.db().groups().unwrap().is_empty(), "no group without the CSRF token");
    let a =
        call(&addr, "POST", "/console/groups", Some(&cookie), &format!("{evil_group}&csrf={csrf}"))
            .await;
    assert_eq!((a.status, a.header("location")), (303, Some("/console/sites")));
    assert_eq!(m.db().groups().unwrap()[0].name, EVIL);
    let sites = call(&addr, "GET", "/console/sites", Some(&cookie), "").await;
    assert!(sites.body.contains("content group &lt;script&gt;alert(1) set"), "the flash");
    assert!(!sites.body.contains(EVIL));
    for p in pages.iter().filter(|p| **p != "/console/events") {
        let a = call(&addr, "GET", p, Some(&cookie), "").await;
        assert!(a.status == 200 || a.status == 404, "{p}: {}", a.status);
        assert!(!a.body.contains(EVIL), "{p}");
    }
    // The session opens the console, not the API.
    let api = call(&addr, "GET", "/api/v1/servers", Some(&cookie), "").await;
    assert_eq!(api.status, 401);

    let out = call(&addr, "POST", "/console/logout", Some(&cookie), &format!("csrf={csrf}")).await;
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(call(&addr, "GET", "/console/", Some(&cookie), "").await.status, 303);
}
