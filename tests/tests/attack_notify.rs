//! Attacks on what starts work at a group leader, with real processes (issue 14, item 1).
//!
//! The attacker runs an HTTP server of its own ([`Attacker`]): it serves a blob it made and
//! stands in for the manager a notification names (it answers `next` with the null address and
//! records the consolidated report a GL sends, which is how the tests see what the members did).
//!
//! - An agent-token holder POSTs `/notify` with its own manifest: refused (403) before anything
//!   is fetched, logged, nothing live changes.
//! - A GL that pins the wrong key (a rogue or misconfigured relay) hands the members an
//!   assignment signed by another key: every member refuses it.
//! - A genuine but old commit, relayed again under a notification the manager's key signed:
//!   no server goes back to the old release.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cm_agent::launch::{self, AgentSpec};
use cm_assignment::detect::build_switch;
use cm_assignment::{AssignmentType, BuildOptions, Meta, SigningKey, build};
use cm_tests::cluster::{Layout, TestCluster, cmover_bin};
use cm_tests::observe;
use cm_tree::http::{self, ClientError, JsonClient};
use cm_tree::manifest::Manifest;
use cm_tree::message::{Notification, SegmentReport};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

/// The attacker's HTTP server: serves `blob` at `/dist/{run}/blob` and plays the manager.
struct Attacker {
    url: String,
    blob_gets: Arc<AtomicU64>,
    reports: Arc<Mutex<Vec<SegmentReport>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Attacker {
    async fn serve(blob: &Path) -> Attacker {
        let bytes = Arc::new(std::fs::read(blob).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (blob_gets, reports) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (gets, reps) = (blob_gets.clone(), reports.clone());
        let task = tokio::spawn(http::serve(listener, move |req| {
            let (bytes, gets, reps) = (bytes.clone(), gets.clone(), reps.clone());
            async move {
                let path = req.uri().path().to_string();
                let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
                match (req.method().clone(), parts.as_slice()) {
                    (Method::GET, ["dist", _, "blob"]) => {
                        gets.fetch_add(1, Ordering::SeqCst);
                        let start = req
                            .headers()
                            .get(hyper::header::RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(http::parse_range_start)
                            .unwrap_or(0) as usize;
                        let mut r = hyper::Response::new(http::full(bytes[start..].to_vec()));
                        if start > 0 {
                            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                        }
                        r
                    }
                    (Method::POST, ["api", "v1", "dist", _, "next"]) => {
                        http::json(StatusCode::OK, &json!({ "child": null }))
                    }
                    (Method::POST, ["api", "v1", "runs", _, "report"]) => {
                        match http::read_json::<SegmentReport>(req).await {
                            Ok(r) => {
                                reps.lock().unwrap().push(r);
                                http::json(StatusCode::OK, &json!({ "accepted": true }))
                            }
                            Err(r) => r,
                        }
                    }
                    (Method::POST, _) => http::json(StatusCode::OK, &json!({})),
                    _ => http::error(StatusCode::NOT_FOUND, "no"),
                }
            }
        }));
        Attacker { url: format!("http://{addr}"), blob_gets, reports, task }
    }

    /// A notification for `segment` to fetch the attacker's blob, reports going to the attacker.
    fn notification(&self, run: u64, segment: &str, blob: &Path) -> Notification {
        Notification {
            run,
            segment: segment.into(),
            source: self.url.clone(),
            manager: self.url.clone(),
            manifest: Manifest::of_file(blob, 64 << 10).unwrap(),
            slots: 0,
            servers: Vec::new(),
            site: "www".into(),
            cache: None,
            signature: None,
        }
    }

    /// The first consolidated report a GL sent here.
    async fn report(&self, c: &TestCluster, limit: Duration) -> SegmentReport {
        let end = Instant::now() + limit;
        loop {
            if let Some(r) = self.reports.lock().unwrap().first().cloned() {
                return r;
            }
            assert!(Instant::now() < end, "no segment report reached the attacker\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn new_key(dir: &Path, name: &str) -> (SigningKey, PathBuf) {
    let public = dir.join(format!("{name}.pub"));
    let key = SigningKey::generate_files(&dir.join(format!("{name}.pk8")), &public).unwrap();
    (key, public)
}

/// Hot content replacing `index.html` with `text`: what goes live at once if applied.
fn defacement(dir: &Path, text: &str, signer: Option<SigningKey>) -> PathBuf {
    let tree = dir.join("evil");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("index.html"), text).unwrap();
    let file = dir.join("evil.cma");
    let mut opts = BuildOptions::new(AssignmentType::HotContent, 9_000_000);
    opts.signer = signer;
    build(&tree, None, &file, &opts).unwrap();
    file
}

/// The tree endpoint of the segment's GL, as the manager knows it.
async fn gl_address(c: &TestCluster) -> String {
    let segs: Vec<Value> = c.op.get(&c.url("segments")).await.unwrap();
    segs[0]["address"].as_str().unwrap().to_string()
}

fn agent_client(c: &TestCluster) -> JsonClient {
    JsonClient::with_tls(&c.manager.agent_token, Duration::from_secs(10), None)
}

fn assert_live(c: &TestCluster, live: &std::collections::BTreeMap<String, String>, skip: &str) {
    for a in c.agents.iter().filter(|a| a.spec.name != skip) {
        assert_eq!(observe(&a.site_root.join("current")), *live, "{}: live changed", a.spec.name);
    }
}

async fn site_with(text: &str) -> tempfile::TempDir {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("index.html"), text).unwrap();
    src
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_token_cannot_start_a_run() {
    let src = site_with("<h1>real</h1>").await;
    let c = TestCluster::start(&Layout::new(40, 1, 3), src.path()).await.unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let live = observe(&c.staging);
    let work = tempfile::tempdir().unwrap();
    let (own_key, _) = new_key(work.path(), "attacker");
    let blob = defacement(work.path(), "<h1>defaced</h1>", Some(own_key.clone()));
    let attacker = Attacker::serve(&blob).await;
    let url = format!("http://{}/notify", gl_address(&c).await);
    // Unsigned, then signed with the attacker's own key: both refused before any fetch.
    for sign in [false, true] {
        let mut n = attacker.notification(4242, "seg0", &blob);
        if sign {
            n.sign(&own_key);
        }
        match agent_client(&c).post::<_, Value>(&url, &n).await {
            Err(ClientError::Status { status, body, .. }) => {
                assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
                assert!(body.contains("refused"), "{body}");
            }
            other => panic!("an agent token's notification was not refused: {other:?}"),
        }
    }
    assert_eq!(attacker.blob_gets.load(Ordering::SeqCst), 0, "the GL fetched the attacker's blob");
    assert_live(&c, &live, "");
    let gl = c.leader_of("seg0").expect("a GL");
    let log = std::fs::read_to_string(&c.agents[gl].guard.log).unwrap();
    assert!(log.contains("notification for run 4242 refused"), "refusal not logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_refuse_an_assignment_signed_by_another_key() {
    let src = site_with("<h1>real</h1>").await;
    let mut c = TestCluster::start(&Layout::new(41, 1, 3), src.path()).await.unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let live = observe(&c.staging);
    let work = tempfile::tempdir().unwrap();
    let (rogue_key, rogue_pub) = new_key(work.path(), "rogue");
    let blob = defacement(work.path(), "<h1>defaced</h1>", Some(rogue_key.clone()));
    // A rogue server of the segment that pins the attacker's key takes the GL role: it will
    // relay whatever the attacker signs, by MCTP, to the honest members, and report to the
    // attacker (its configured manager: GLs report to configured manager URLs only).
    let attacker = Attacker::serve(&blob).await;
    let spec = AgentSpec {
        name: "seg0-rogue".into(),
        node_id: 99,
        weight: 255,
        manager_key: Some(rogue_pub),
        extra_toml: String::new(),
        ..c.agents[0].spec.clone()
    };
    c.manager.replica_urls = vec![attacker.url.clone()];
    let started = launch::start_agent(&cmover_bin(), c.dir.path(), &c.manager, &c.secret, &spec);
    c.manager.replica_urls.clear();
    c.agents.push(started.unwrap());
    let rogue = c.agents.len() - 1;
    let gl = c.leader_of("seg0").expect("a GL");
    c.agents[gl].guard.kill();
    let end = Instant::now() + Duration::from_secs(30);
    while c.leader_of("seg0") != Some(rogue) {
        assert!(Instant::now() < end, "the rogue never led\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.restart_agent(gl).unwrap();
    // Every honest server registered with the rogue GL before it is handed the run.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let st = c.agents[rogue].status().unwrap();
        if st["members"].as_array().is_some_and(|m| m.len() == 3) {
            break;
        }
        assert!(Instant::now() < end, "members did not register with the rogue: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let serving = c.agents[rogue].status().unwrap()["serving"].as_str().unwrap().to_string();
    let mut n = attacker.notification(4343, "seg0", &blob);
    n.sign(&rogue_key);
    let _: Value = agent_client(&c).post(&format!("http://{serving}/notify"), &n).await.unwrap();
    let report = attacker.report(&c, Duration::from_secs(60)).await;
    for a in c.agents.iter().filter(|a| a.spec.name != "seg0-rogue") {
        let why = report.failed.iter().find(|(s, _)| *s == a.spec.name);
        assert!(
            why.is_some_and(|(_, r)| r.contains("not one of the pinned manager keys")),
            "{}: not refused for its signature: {report:?}\n{}",
            a.spec.name,
            c.logs()
        );
    }
    assert_live(&c, &live, "seg0-rogue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_old_commit_does_not_roll_back() {
    let src = site_with("<h1>release A</h1>").await;
    let c = TestCluster::start(&Layout::new(42, 1, 3), src.path()).await.unwrap();
    c.publish_committed_everywhere().await.unwrap();
    // The commit of release A (the newest run so far), captured: the manager removes its copy
    // once the run is over, so it is rebuilt from the run record with the manager's key
    // (signatures are deterministic) and checked byte for byte against the run's manifest.
    let manager_key = SigningKey::load(&c.manager.signing_key_file).unwrap();
    let runs: Vec<Value> = c.op.get(&c.url("runs")).await.unwrap();
    let run = runs.iter().max_by_key(|r| r["id"].as_u64().unwrap()).unwrap();
    let captured = c.dir.path().join("captured.cma");
    // A switching assignment's base-serial field carries the site's release depth.
    let sites: Vec<Value> = c.op.get(&c.url("sites")).await.unwrap();
    let meta = Meta {
        kind: AssignmentType::Commit,
        serial: run["serial"].as_u64().unwrap(),
        job_id: run["job"].as_u64().unwrap(),
        base_serial: sites[0]["keep_releases"].as_u64().unwrap(),
        target_serial: run["release"].as_u64().unwrap(),
        site: "www".into(),
    };
    build_switch(&captured, meta, None, Some(manager_key.clone())).unwrap();
    assert_eq!(
        Manifest::of_file(&captured, 64 << 10).unwrap().blake3,
        run["manifest"]["blake3"].as_str().unwrap(),
        "the captured commit is not the genuine one"
    );
    std::fs::write(c.staging.join("index.html"), "<h1>release B</h1>").unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let live_b = observe(&c.staging);
    assert_live(&c, &live_b, "");
    // Relayed again under a notification the manager's own key signs (so only the content's
    // age can stop it): a run id no server has journalled, served by the attacker.
    let attacker = Attacker::serve(&captured).await;
    let mut n = attacker.notification(777_777, "seg0", &captured);
    n.sign(&manager_key);
    let url = format!("http://{}/notify", gl_address(&c).await);
    let _: Value = agent_client(&c).post(&url, &n).await.unwrap();
    // The GL reports to its configured manager, never to the notification's: each server's
    // own log says why it refused.
    let end = Instant::now() + Duration::from_secs(60);
    for a in &c.agents {
        loop {
            let log = std::fs::read_to_string(&a.guard.log).unwrap_or_default();
            let refused =
                log.lines().any(|l| l.contains("run=777777") && l.contains("refusing a replay"));
            assert!(
                !log.contains("applied run=777777"),
                "{}: the old commit was applied\n{log}",
                a.spec.name
            );
            if refused {
                break;
            }
            assert!(
                Instant::now() < end,
                "{}: no refusal of the replay\n{}",
                a.spec.name,
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(attacker.blob_gets.load(Ordering::SeqCst) > 0, "the GL fetched the relayed commit");
    assert_live(&c, &live_b, "");
}
