//! Caches stay fresh, end to end with real processes: a manager and one segment of two
//! `cmover agent`s, a real nginx serving server 0's live tree as the origin, and two real
//! caches in front of it — a stock nginx `proxy_cache` (the nginx invalidator plugin) and
//! Varnish (the Varnish invalidator, with warming). Both plugins are installed in every agent's
//! store and named in every agent's `[[caches]]`; the GL calls them after its segment committed.
//!
//! After each commit (and a rollback purging the whole site) the history says what each cache
//! did, and from then on neither cache serves the old body of a changed path, a removed path
//! is gone, and an unchanged path is still served from the cache.

use std::time::{Duration, Instant};

use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::web::{Nginx, Varnish, free_port, get, nginx_cache, nginx_origin, varnish_vcl};
use serde_json::Value;

const HOST: &str = "www.example.com";
/// What release 1 serves: URL path, body.
const RELEASE_1: [(&str, &str); 4] =
    [("/", "index v1"), ("/a.html", "a v1"), ("/gone.html", "gone v1"), ("/keep.css", "keep")];

fn write(root: &std::path::Path, files: &[(&str, &str)]) {
    for (p, body) in files {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, body).unwrap();
    }
}

/// Installs `plugins/dist/<plugin>.wasm` into every agent's store with a grant to `cache`.
fn install(c: &TestCluster, plugin: &str, cache: &str) {
    let manifest = c.dir.path().join(format!("{plugin}.toml"));
    std::fs::write(
        &manifest,
        format!(
            "name = \"{plugin}\"\nworld = \"cache-invalidator\"\n[grants.endpoints.edge]\nhttp = \"{cache}\"\ntimeout-ms = 5000\n"
        ),
    )
    .unwrap();
    for a in &c.agents {
        let out = std::process::Command::new(cm_tests::cmover_bin())
            .args(["plugin", "install"])
            .arg(cm_plugin_host::bundled::dist_dir().join(format!("{plugin}.wasm")))
            .arg("--manifest")
            .arg(&manifest)
            .arg("--store")
            .arg(a.dir.join("plugins"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Waits (bounded) until the history holds `n` lines of cache `cache`; returns the last.
async fn cache_lines(c: &TestCluster, cache: &str, n: usize) -> String {
    let prefix = format!("cache {cache} on segment seg0: ");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
        let lines: Vec<String> = history
            .iter()
            .filter_map(|h| h["event"].as_str())
            .filter(|e| e.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        if lines.len() >= n {
            assert_eq!(lines.len(), n, "one report per cache per commit: {lines:?}");
            return lines[n - 1].clone();
        }
        assert!(Instant::now() < end, "{cache}: {lines:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_each_commit_nginx_and_varnish_never_serve_an_old_body() {
    let src = tempfile::tempdir().unwrap();
    write(
        src.path(),
        &[
            ("index.html", "index v1"),
            ("a.html", "a v1"),
            ("gone.html", "gone v1"),
            ("keep.css", "keep"),
        ],
    );
    let (origin_port, edge_port, stamp_port) = (free_port(), free_port(), free_port());
    let origin = format!("127.0.0.1:{origin_port}");
    let edge = format!("127.0.0.1:{edge_port}");
    let Some(varnish) = Varnish::start(&varnish_vcl(&origin)).unwrap() else { return };
    let caches = format!(
        "[[caches]]\nplugin = \"nginx\"\nhost = \"{HOST}\"\nbatch = 2\n\n\
         [[caches]]\nplugin = \"varnish\"\nhost = \"{HOST}\"\nwarm_through = \"{}\"\n",
        varnish.address
    );
    let mut layout = Layout::new(195, 1, 2);
    layout.tweak = Some(Box::new(move |_, spec| spec.extra_toml = caches.clone()));
    let c = TestCluster::start(&layout, src.path()).await.unwrap();
    let live = c.agents[0].site_root.join("current");
    let config = nginx_origin(origin_port, &live) + &nginx_cache(edge_port, &origin, stamp_port);
    let Some(nginx) = Nginx::start(&config, &edge).unwrap() else { return };
    install(&c, "nginx", &edge);
    install(&c, "varnish", &varnish.address);
    let both = [("nginx", edge.as_str()), ("varnish", varnish.address.as_str())];
    // Go-live settings (their defaults: all at once) declare caches in front of the site: a
    // switch's job ends once the caches reported.
    c.put_site(serde_json::json!({ "golive": {} })).await.unwrap();

    // Release 1 live; both caches fill up with it.
    c.publish_committed_everywhere().await.unwrap();
    for (name, _) in both {
        let line = cache_lines(&c, name, 1).await;
        assert!(line.contains("purged 5 paths"), "{line}");
    }
    for (name, at) in both {
        for (path, body) in RELEASE_1 {
            assert_eq!(get(at, HOST, path).2, body, "{name} {path}\n{}", nginx.log());
            assert_eq!(get(at, HOST, path).1, "HIT", "{name} {path} is cached");
        }
    }

    // Release 2: two changes, one removal, one addition; committed automatically.
    write(&c.staging, &[("index.html", "index v2"), ("a.html", "a v2"), ("new.html", "new v2")]);
    std::fs::remove_file(c.staging.join("gone.html")).unwrap();
    c.publish_committed_everywhere().await.unwrap();
    // All at once, the job ends only after its segment's GL reported the cache calls: both
    // caches' lines are in the history as the job is done, and the run's history says so.
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let events: Vec<&str> = history.iter().filter_map(|e| e["event"].as_str()).collect();
    for name in ["nginx", "varnish"] {
        let prefix = format!("cache {name} on segment seg0: ");
        assert_eq!(events.iter().filter(|e| e.starts_with(&prefix)).count(), 2, "{events:#?}");
    }
    assert_eq!(
        events.iter().filter(|e| e.contains("caches confirmed by every segment's report")).count(),
        2,
        "{events:#?}"
    );
    let line = cache_lines(&c, "nginx", 2).await;
    // index.html (and /), a.html, new.html, gone.html: 5 paths, batches of 2.
    assert!(line.contains("purged 5 paths of www.example.com in 3 batches"), "{line}");
    let line = cache_lines(&c, "varnish", 2).await;
    assert!(line.contains("purged 5 paths") && line.contains("warmed 4 of 4"), "{line}");
    for (name, at) in both {
        for _ in 0..3 {
            for (path, body) in [
                ("/", "index v2"),
                ("/index.html", "index v2"),
                ("/a.html", "a v2"),
                ("/new.html", "new v2"),
            ] {
                let (status, _, got) = get(at, HOST, path);
                assert_eq!((status, got.as_str()), (200, body), "{name} {path}");
            }
            assert_eq!(get(at, HOST, "/gone.html").0, 404, "{name}: a removed path is gone");
        }
        assert_eq!(
            get(at, HOST, "/keep.css"),
            (200, "HIT".into(), "keep".into()),
            "{name}: unchanged stays cached"
        );
    }
    // Varnish was warmed: the changed paths were in its cache before any client asked.
    assert_eq!(get(&varnish.address, HOST, "/new.html").1, "HIT");

    // A rollback with a path limit of 1: the whole site is purged from both caches.
    c.put_site(serde_json::json!({ "refresh": { "cache_max_paths": 1 } })).await.unwrap();
    c.run_ok(
        cm_manager::model::JobKind::Rollback,
        cm_manager::model::Payload::Rollback { to: None },
    )
    .await
    .unwrap();
    for (name, _) in both {
        let line = cache_lines(&c, name, 3).await;
        assert!(
            line.contains("purged the whole site www.example.com (more than 1 paths changed)"),
            "{line}"
        );
    }
    for (name, at) in both {
        for (path, body) in RELEASE_1 {
            assert_eq!(get(at, HOST, path).2, body, "{name} {path} after the rollback");
        }
        assert_eq!(get(at, HOST, "/new.html").0, 404, "{name}: release 1 has no new.html");
    }
}
