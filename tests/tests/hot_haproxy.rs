//! Hot content and the load balancer, with real parts: three agents, each server's `current`
//! served by its own nginx, HAProxy in front with a `hot` backend that hot paths go to while it
//! has servers. A hot job puts a page only on two servers; the manager puts exactly those two
//! in the hot pool through the bundled HAProxy plugin, and every request for the page through
//! HAProxy reaches a holder (a non-holder would answer 404). The next publish ends the
//! overlay, the pool is emptied, and the page is served by the ordinary pool.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cm_manager::model::{HistoryEntry, Job, JobKind, JobState, Payload};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use cm_tests::stack::{Haproxy, Nginx, get};
use serde_json::json;

async fn run_to_done(c: &TestCluster, kind: JobKind, payload: Payload) -> Job {
    let job = c.submit_with(kind, payload, auto_commit_policy()).await.unwrap();
    let (j, _) = c.finish(job.id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?}\n{}", j.last_reason, c.logs());
    j
}

/// Waits for the `n`-th history line that starts with `prefix`; returns it.
async fn history_line(c: &TestCluster, prefix: &str, n: usize) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let h: Vec<HistoryEntry> = c.op.get(&c.url("history")).await.unwrap();
        if let Some(e) = h.iter().filter(|e| e.event.starts_with(prefix)).nth(n - 1) {
            return e.event.clone();
        }
        assert!(Instant::now() < end, "no `{prefix}` ({n})\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hot_backend_servers(h: &Haproxy) -> Vec<String> {
    let answer = h.command("show servers state hot").unwrap();
    let mut v: Vec<String> = answer
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_for_a_hot_path_reach_only_the_servers_that_hold_it() {
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(site.path().join("flash")).unwrap();
    std::fs::write(site.path().join("index.html"), "home").unwrap();
    std::fs::write(site.path().join("flash/old.html"), "old").unwrap();
    let c = TestCluster::start(&Layout::new(222, 1, 3), site.path()).await.unwrap();
    let mut nginx = Vec::new();
    for a in &c.agents {
        let Some(n) = Nginx::start(&a.site_root, "").unwrap() else {
            cm_tests::missing_part("nginx not installed (the hot-content balancer test)");
            return;
        };
        nginx.push(n);
    }
    let servers: BTreeMap<String, String> = c
        .agents
        .iter()
        .zip(&nginx)
        .map(|(a, n)| (a.spec.name.clone(), n.address.clone()))
        .collect();
    let Some(haproxy) = Haproxy::start_with(
        &servers,
        "  use_backend hot if { path_beg /flash/ } { nbsrv(hot) ge 1 }\n",
        "backend hot\n  balance roundrobin\n",
    )
    .unwrap() else {
        cm_tests::missing_part("haproxy not installed (the hot-content balancer test)");
        return;
    };
    let manifest = c.dir.path().join("lb.toml");
    std::fs::write(&manifest, haproxy.plugin_manifest("lb")).unwrap();
    let out = std::process::Command::new(cm_tests::cmover_bin())
        .args(["plugin", "install"])
        .arg(cm_plugin_host::bundled::dist_dir().join("haproxy.wasm"))
        .arg("--manifest")
        .arg(&manifest)
        .arg("--store")
        .arg(cm_manager::golive::store_dir(&c.dir.path().join("manager")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.publish_committed_everywhere().await.unwrap();
    c.put_site(json!({ "golive": {
        "load_balancer": "lb", "pool": "app", "hot_pool": "hot", "servers": servers,
    }}))
    .await
    .unwrap();

    // A page only the hot servers get.
    std::fs::write(c.staging.join("flash/sale.html"), "sale: NOW").unwrap();
    let payload =
        Payload::Hot { paths: vec!["flash/sale.html".into()], servers: vec![], count: Some(2) };
    let j = run_to_done(&c, JobKind::Hot, payload).await;
    let Payload::Hot { servers: holders, .. } = j.spec.payload else { panic!() };
    assert_eq!(holders.len(), 2);
    let told = history_line(&c, "hot content of site www: balancer pool hot routes to", 1).await;
    assert!(told.contains(&holders.join(", ")), "{told}");
    assert_eq!(hot_backend_servers(&haproxy), holders, "exactly the holders are in the pool");

    let mut answered = 0;
    for _ in 0..30 {
        let (status, _, body) = get(&haproxy.front, "/flash/sale.html", None).unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "sale: NOW"),
            "a hot request reached a non-holder"
        );
        answered += 1;
    }
    println!("{answered} requests for the hot path, every one answered by a holder");
    let (status, _, body) = get(&haproxy.front, "/index.html", None).unwrap();
    assert_eq!((status, body.as_str()), (200, "home"), "other paths: the ordinary pool");

    // The next publish carries the page to every server and ends the overlay: the pool empties.
    run_to_done(&c, JobKind::Publish, Payload::Staging).await;
    let told = history_line(&c, "hot content of site www: balancer pool hot routes to", 2).await;
    assert!(told.contains("routes to no server"), "{told}");
    assert_eq!(hot_backend_servers(&haproxy), Vec::<String>::new());
    for _ in 0..10 {
        let (status, _, body) = get(&haproxy.front, "/flash/sale.html", None).unwrap();
        assert_eq!((status, body.as_str()), (200, "sale: NOW"));
    }
}
