//! The Varnish cache-invalidator plugin (`plugins/varnish`) against a real `varnishd`
//! (Debian's varnish 7; `.ci/run` installs it) caching a loopback origin: a `PURGE` really
//! drops the cached object, a site `BAN` really drops every object of that site and nothing
//! of the others, and a cache that refuses is reported.

mod plugin_support;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cm_plugin_host::{LoadedPlugin, PluginError, PluginManifest};
use plugin_support::*;

/// The usual VCL for PURGE and BAN (as in the plugin's documentation), with one hour of TTL
/// so nothing expires by itself during the test. `refuse` answers 405 to both instead.
fn vcl(origin_port: u16, refuse: bool) -> String {
    let recv = if refuse {
        r#"if (req.method == "PURGE" || req.method == "BAN") { return (synth(405, "Not allowed")); }"#.to_string()
    } else {
        r#"if (req.method == "PURGE") { return (purge); }
  if (req.method == "BAN") { ban("req.http.host == " + req.http.host); return (synth(200, "Ban added")); }"#
            .to_string()
    };
    format!(
        "vcl 4.1;\nbackend origin {{ .host = \"127.0.0.1\"; .port = \"{origin_port}\"; }}\n\
         sub vcl_recv {{\n  {recv}\n}}\nsub vcl_backend_response {{ set beresp.ttl = 1h; }}\n"
    )
}

/// A real varnishd in a temp dir (its own working directory, no management port), listening
/// on a loopback port; killed when dropped (its worker process exits with it).
struct Varnish {
    address: String,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

fn start_varnish(binary: &Path, origin: &Origin, refuse: bool) -> Varnish {
    let dir = tempfile::tempdir().unwrap();
    let vcl_path = dir.path().join("test.vcl");
    std::fs::write(&vcl_path, vcl(origin.port(), refuse)).unwrap();
    let port = free_port();
    let child = std::process::Command::new(binary)
        .arg("-F") // foreground: the child is the manager, killing it stops the worker too
        .args(["-j", "none"])
        .arg("-n")
        .arg(dir.path().join("work"))
        .args(["-a", &format!("127.0.0.1:{port}")])
        .arg("-f")
        .arg(&vcl_path)
        .args(["-s", "malloc,16m", "-T", "none", "-p", "thread_pools=1", "-p", "thread_pool_min=5"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("varnishd starts");
    let varnish =
        Varnish { address: format!("127.0.0.1:{port}"), _child: ChildGuard(child), _dir: dir };
    let started = Instant::now();
    // Ready when it answers (from the origin, through the cache).
    while http_get(&varnish.address, "ready.test", "/ready").is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "varnishd did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    varnish
}

fn varnish_binary() -> Option<std::path::PathBuf> {
    let found = find_binary(&["/usr/sbin/varnishd", "/usr/bin/varnishd"]);
    if found.is_none() {
        // `.ci/run` installs varnish; on a bare developer machine there is nothing to drive.
        cm_tests::missing_part("varnishd not installed (the real-Varnish test)");
    }
    found
}

fn plugin(address: &str) -> std::sync::Arc<LoadedPlugin> {
    let manifest = PluginManifest::parse(
        &format!("name = \"varnish\"\nworld = \"cache-invalidator\"\n[grants.endpoints.cache1]\nhttp = \"{address}\"\ntimeout-ms = 3000\n"),
        "varnish.toml",
    )
    .unwrap();
    let (runtime, _) = runtime();
    let plugin = LoadedPlugin::load(&runtime, &component("varnish"), manifest, "varnish").unwrap();
    plugin.self_check().unwrap();
    plugin
}

#[test]
fn purge_and_ban_really_drop_cached_objects_in_a_real_varnish() {
    let Some(binary) = varnish_binary() else { return };
    let origin = Origin::start("origin");
    let varnish = start_varnish(&binary, &origin, false);
    let get = |host: &str, path: &str| {
        let (status, body) = http_get(&varnish.address, host, path).unwrap();
        assert_eq!(status, 200, "{host}{path}: {body}");
        body
    };

    // Fill the cache: three objects, two sites; a second read is a hit (the origin is not asked).
    let index = get("www.example.com", "/index.html");
    let logo = get("www.example.com", "/img/logo.png");
    let shop = get("shop.example.com", "/index.html");
    let served = origin.served.load(Ordering::SeqCst);
    assert_eq!(get("www.example.com", "/index.html"), index, "cached");
    assert_eq!(get("www.example.com", "/img/logo.png"), logo, "cached");
    assert_eq!(origin.served.load(Ordering::SeqCst), served, "hits never reach the origin");

    // PURGE one path: that object is fetched again, the others stay cached.
    let cache = plugin(&varnish.address);
    cache.invalidate("www.example.com", &["/index.html".into()]).unwrap();
    let refetched = get("www.example.com", "/index.html");
    assert_ne!(refetched, index, "the purged object was dropped");
    assert_eq!(origin.served.load(Ordering::SeqCst), served + 1);
    assert_eq!(get("www.example.com", "/img/logo.png"), logo, "other objects stay cached");
    assert_eq!(get("shop.example.com", "/index.html"), shop);

    // BAN the site: every object of www is fetched again, shop's stays cached.
    cache.purge_site("www.example.com").unwrap();
    assert_ne!(get("www.example.com", "/img/logo.png"), logo, "banned with its site");
    assert_ne!(get("www.example.com", "/index.html"), refetched, "banned with its site");
    assert_eq!(get("shop.example.com", "/index.html"), shop, "another site's objects stay cached");
    assert_eq!(origin.served.load(Ordering::SeqCst), served + 3);
}

#[test]
fn a_real_varnish_that_refuses_purges_is_reported_and_keeps_its_objects() {
    let Some(binary) = varnish_binary() else { return };
    let origin = Origin::start("origin");
    let varnish = start_varnish(&binary, &origin, true);
    let (_, cached) = http_get(&varnish.address, "www.example.com", "/a.html").unwrap();
    let cache = plugin(&varnish.address);
    match cache.invalidate("www.example.com", &["/a.html".into()]) {
        Err(PluginError::Vetoed { hook: "invalidate", message, .. }) => {
            assert!(
                message.contains("cache1: PURGE /a.html for www.example.com: HTTP 405"),
                "{message}"
            )
        }
        other => panic!("expected Varnish's refusal, got {other:?}"),
    }
    match cache.purge_site("www.example.com") {
        Err(PluginError::Vetoed { hook: "purge-site", message, .. }) => {
            assert!(message.contains("HTTP 405"), "{message}")
        }
        other => panic!("expected Varnish's refusal, got {other:?}"),
    }
    assert_eq!(
        http_get(&varnish.address, "www.example.com", "/a.html").unwrap().1,
        cached,
        "still cached"
    );
}
