//! The nginx cache-invalidator plugin (`plugins/nginx`) against a real stock nginx
//! `proxy_cache` configured as `docs/plugins.md` says (`cm_tests::web::nginx_cache`), in front
//! of a real nginx origin: a refreshed path serves its new body, a removed path its 404, a
//! site purge (generation bump) drops every entry of that site and none of another's; an nginx
//! whose config does not honour the refresh header is reported, not trusted.

mod plugin_support;

use std::sync::Arc;

use cm_plugin_host::{LoadedPlugin, PluginError, PluginManifest};
use cm_tests::web::{Nginx, free_port, get, nginx_cache, nginx_origin};
use plugin_support::{component, runtime};

fn plugin(address: &str) -> Arc<LoadedPlugin> {
    let manifest = PluginManifest::parse(
        &format!("name = \"nginx\"\nworld = \"cache-invalidator\"\n[grants.endpoints.edge1]\nhttp = \"{address}\"\ntimeout-ms = 5000\n"),
        "nginx.toml",
    )
    .unwrap();
    let (runtime, _) = runtime();
    let plugin = LoadedPlugin::load(&runtime, &component("nginx"), manifest, "nginx").unwrap();
    plugin.self_check().unwrap();
    plugin
}

fn write(root: &std::path::Path, path: &str, body: &str) {
    std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
    std::fs::write(root.join(path), body).unwrap();
}

#[test]
fn refresh_and_generation_purge_really_change_what_a_stock_nginx_cache_serves() {
    let content = tempfile::tempdir().unwrap();
    let root = content.path();
    write(root, "a.html", "a v1");
    write(root, "b.html", "b v1");
    write(root, "gone.html", "gone v1");
    let (origin_port, cache_port, stamp_port) = (free_port(), free_port(), free_port());
    let origin = format!("127.0.0.1:{origin_port}");
    let cache = format!("127.0.0.1:{cache_port}");
    let config = nginx_origin(origin_port, root) + &nginx_cache(cache_port, &origin, stamp_port);
    let Some(nginx) = Nginx::start(&config, &cache).unwrap() else { return };
    let fetch = |host: &str, path: &str| get(&cache, host, path);

    // Cached: the second read is a HIT with the same body, even after the origin changed.
    assert_eq!(fetch("www", "/a.html"), (200, "MISS".into(), "a v1".into()), "{}", nginx.log());
    for (host, path) in [("www", "/b.html"), ("www", "/gone.html"), ("shop", "/a.html")] {
        assert_eq!(fetch(host, path).0, 200);
    }
    write(root, "a.html", "a v2");
    write(root, "b.html", "b v2");
    std::fs::remove_file(root.join("gone.html")).unwrap();
    assert_eq!(fetch("www", "/a.html"), (200, "HIT".into(), "a v1".into()));

    // Refresh a changed and a removed path: new body, 404; b (not refreshed) stays stale.
    let edge = plugin(&cache);
    edge.invalidate("www", &["/a.html".into(), "gone.html".into()]).unwrap();
    assert_eq!(fetch("www", "/a.html"), (200, "HIT".into(), "a v2".into()), "refreshed in place");
    assert_eq!(fetch("www", "/gone.html").0, 404, "a removed path is gone");
    assert_eq!(fetch("www", "/b.html"), (200, "HIT".into(), "b v1".into()));

    // Purge the site: every entry of www is fetched anew; shop's stays cached.
    edge.purge_site("www").unwrap();
    assert_eq!(fetch("www", "/b.html"), (200, "MISS".into(), "b v2".into()));
    assert_eq!(fetch("www", "/a.html"), (200, "MISS".into(), "a v2".into()));
    assert_eq!(
        fetch("shop", "/a.html"),
        (200, "HIT".into(), "a v1".into()),
        "other sites keep theirs"
    );
    // The purge location refuses clients without the refresh header.
    assert_eq!(fetch("www", "/.cm-purge-site").0, 403);
}

#[test]
fn an_nginx_that_does_not_honour_the_refresh_header_is_reported() {
    let content = tempfile::tempdir().unwrap();
    write(content.path(), "a.html", "a v1");
    let (origin_port, cache_port) = (free_port(), free_port());
    let origin = format!("127.0.0.1:{origin_port}");
    let cache = format!("127.0.0.1:{cache_port}");
    // A cache without `proxy_cache_bypass`: a refresh would be served from the cache.
    let config = nginx_origin(origin_port, content.path())
        + &format!(
            "  proxy_cache_path {{dir}}/cache keys_zone=plain:1m;\n  server {{ listen {cache}; proxy_cache plain; proxy_cache_valid 200 1h;\n    add_header X-CM-Cache $upstream_cache_status always;\n    location / {{ proxy_pass http://{origin}; }} }}\n"
        );
    let Some(_nginx) = Nginx::start(&config, &cache).unwrap() else { return };
    assert_eq!(get(&cache, "www", "/a.html").2, "a v1");
    match plugin(&cache).invalidate("www", &["/a.html".into()]) {
        Err(PluginError::Vetoed { hook: "invalidate", message, .. }) => {
            assert!(message.contains("not BYPASS") && message.contains("X-CM-Refresh"), "{message}")
        }
        other => panic!("expected the refusal to trust a HIT, got {other:?}"),
    }
}
