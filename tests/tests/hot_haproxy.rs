//! Hot content and the load balancer, with real parts: three agents, each server's `current`
//! served by its own nginx, HAProxy in front with a `hot` backend and a map file of the paths
//! routed to it (`Haproxy::start_routed`). A hot job puts a page only on two servers; the
//! manager puts exactly those two in the hot pool and the page's path in the map through the
//! bundled HAProxy plugin, so every request for the page through HAProxy reaches a holder
//! through the hot pool, and every other path the ordinary pool. The next publish ends the
//! overlay: the path is unrouted and the pool emptied. A rule of the site's go-live settings
//! starts such a job from real traffic, HAProxy's stick table being the rate it reads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// The map's entries: (path, backend).
fn hot_map(h: &Haproxy) -> Vec<(String, String)> {
    let map = h.hot_map.as_ref().unwrap().display().to_string();
    let answer = h.command(&format!("show map {map}")).unwrap();
    answer
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

/// A cluster of three agents with nginx each and HAProxy routing hot paths by its map, the
/// bundled HAProxy plugin installed in the manager's store as `lb`, the site published with
/// `flash/sale.html` = "sale v1". `None`: a real part is missing (reported).
async fn routed_stack(
    test: u8,
) -> Option<(TestCluster, Vec<Nginx>, Haproxy, BTreeMap<String, String>, tempfile::TempDir)> {
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(site.path().join("flash")).unwrap();
    std::fs::write(site.path().join("index.html"), "home").unwrap();
    std::fs::write(site.path().join("flash/sale.html"), "sale v1").unwrap();
    let c = TestCluster::start(&Layout::new(test, 1, 3), site.path()).await.unwrap();
    let mut nginx = Vec::new();
    for a in &c.agents {
        let Some(n) = Nginx::start(&a.site_root, "").unwrap() else {
            cm_tests::missing_part("nginx not installed (the hot-content balancer test)");
            return None;
        };
        nginx.push(n);
    }
    let servers: BTreeMap<String, String> = c
        .agents
        .iter()
        .zip(&nginx)
        .map(|(a, n)| (a.spec.name.clone(), n.address.clone()))
        .collect();
    let Some(haproxy) = Haproxy::start_routed(&servers).unwrap() else {
        cm_tests::missing_part("haproxy not installed (the hot-content balancer test)");
        return None;
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
    Some((c, nginx, haproxy, servers, site))
}

/// Which servers of the ordinary pool answered `path` over `n` fresh requests (by the `SRV`
/// cookie it sets; a request through the hot pool sets none).
fn pool_answers(h: &Haproxy, path: &str, n: usize, want: &str) -> (BTreeSet<String>, usize) {
    let mut app = BTreeSet::new();
    let mut hot = 0;
    for _ in 0..n {
        let (status, srv, body) = get(&h.front, path, None).unwrap();
        assert_eq!((status, body.as_str()), (200, want), "{path}");
        match srv {
            Some(s) => {
                app.insert(s);
            }
            None => hot += 1,
        }
    }
    (app, hot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_for_a_hot_path_reach_only_the_servers_that_hold_it() {
    let Some((c, _nginx, haproxy, servers, _site)) = routed_stack(222).await else { return };
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
    assert!(told.contains("paths routed to it: /flash/sale.html"), "{told}");
    assert_eq!(hot_backend_servers(&haproxy), holders, "exactly the holders are in the pool");
    assert_eq!(hot_map(&haproxy), vec![("/flash/sale.html".to_string(), "hot".to_string())]);

    // Every request for the hot path goes through the hot pool to a holder (a non-holder
    // still has "sale v1"); every other path through the ordinary pool, to every server.
    let (app, hot) = pool_answers(&haproxy, "/flash/sale.html", 30, "sale: NOW");
    assert_eq!((app.len(), hot), (0, 30), "a hot request went through the ordinary pool");
    let (app, hot) = pool_answers(&haproxy, "/index.html", 30, "home");
    assert_eq!(hot, 0, "another path went through the hot pool");
    assert_eq!(app, servers.keys().cloned().collect(), "other paths: every server");
    println!("30 requests for the hot path, every one through the hot pool to a holder");

    // The next publish carries the page to every server and ends the overlay: the path is
    // unrouted and the pool empties.
    run_to_done(&c, JobKind::Publish, Payload::Staging).await;
    let told = history_line(&c, "hot content of site www: balancer pool hot routes to", 2).await;
    assert!(told.contains("routes to no server"), "{told}");
    assert!(told.contains("no path routed to it"), "{told}");
    assert_eq!(hot_backend_servers(&haproxy), Vec::<String>::new());
    assert_eq!(hot_map(&haproxy), vec![]);
    let (app, hot) = pool_answers(&haproxy, "/flash/sale.html", 30, "sale: NOW");
    assert_eq!(hot, 0);
    assert_eq!(app, servers.keys().cloned().collect(), "the page from every server again");
}

/// Requests for `path` through `front`, one after the other, until stopped; counts them.
fn load(front: String, path: &'static str) -> (Arc<AtomicBool>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (s, n) = (stop.clone(), sent.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let _ = get(&front, path, None);
            n.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (stop, sent)
}

fn hot_jobs(jobs: &[Job]) -> Vec<Job> {
    jobs.iter().filter(|j| j.spec.kind == JobKind::Hot).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_starts_one_hot_job_from_real_traffic() {
    let Some((c, _nginx, haproxy, servers, _site)) = routed_stack(229).await else { return };
    c.put_site(json!({ "golive": {
        "load_balancer": "lb", "pool": "app", "hot_pool": "hot", "servers": servers,
        "hot_poll_ms": 200,
        "hot_rules": [{"name": "flash", "requests_per_s": 20, "for_ms": 2000, "servers": 2,
                       "cooldown_ms": 600000, "max_hot_paths": 3}],
    }}))
    .await
    .unwrap();
    std::fs::write(c.staging.join("flash/sale.html"), "sale v2").unwrap();

    // A few requests a second stay under the rule's rate: nothing starts.
    for _ in 0..10 {
        get(&haproxy.front, "/flash/sale.html", None).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    assert!(hot_jobs(&jobs).is_empty(), "started under the rate");

    // Over the rate: one hot job, then the path routed to its holders.
    let started = Instant::now();
    let (stop, sent) = load(haproxy.front.clone(), "/flash/sale.html");
    let fired = history_line(&c, "hot rule `flash` of site www: flash/sale.html", 1).await;
    let fired_at = started.elapsed();
    assert!(fired.contains("started hot job"), "{fired}");
    let routed = loop {
        let h: Vec<HistoryEntry> = c.op.get(&c.url("history")).await.unwrap();
        if let Some(e) = h.iter().find(|e| e.event.contains("paths routed to it: /flash/sale.html"))
        {
            break e.event.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never routed\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let live_at = started.elapsed();
    let (app, hot) = pool_answers(&haproxy, "/flash/sale.html", 10, "sale v2");
    assert_eq!((app.len(), hot), (0, 10), "{routed}");

    // The traffic goes on: still one job. The next publish ends the overlay; within the
    // cooldown the rule starts nothing though the path stays over the rate.
    tokio::time::sleep(Duration::from_secs(3)).await;
    run_to_done(&c, JobKind::Publish, Payload::Staging).await;
    history_line(&c, "hot content of site www: balancer pool hot routes to no server", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    let hot = hot_jobs(&jobs);
    assert_eq!(hot.len(), 1, "{hot:?}");
    assert_eq!(hot[0].spec.name, "hot-flash", "the job names its rule");
    let h: Vec<HistoryEntry> = c.op.get(&c.url("history")).await.unwrap();
    assert_eq!(h.iter().filter(|e| e.event.starts_with("hot rule `flash`")).count(), 1);
    let n = sent.load(Ordering::Relaxed);
    println!(
        "figure: rule `flash` (20 req/s for 2000 ms): load start -> job started {} ms, -> \
         committed and routed {} ms (threshold crossing to routing live, less the rule's 2000 ms: {} ms); {n} requests sent",
        fired_at.as_millis(),
        live_at.as_millis(),
        live_at.as_millis().saturating_sub(2000)
    );
}
