//! The cache-invalidator (`plugins/varnish`) and load-balancer (`plugins/haproxy`) plugins
//! speaking to operator-named endpoints: an HTTP server standing in for Varnish, and a real
//! HAProxy (its runtime API on a Unix socket) when the `haproxy` binary is installed
//! (`.ci/run` installs it).

mod plugin_support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use cm_plugin_host::{
    LoadedPlugin, PluginError, PluginManifest, PluginSlot, PluginStore, ServerState,
};
use cm_tests::stack::Haproxy;
use plugin_support::*;

/// A one-request-per-connection HTTP server recording "METHOD path host" and answering
/// `status` to each request.
fn fake_cache(
    status: u16,
    requests: usize,
) -> (String, Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let server = std::thread::spawn(move || {
        for _ in 0..requests {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut host = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("host:") {
                    host = value.trim().to_string();
                }
            }
            let mut parts = request_line.split_whitespace();
            log.lock().unwrap().push(format!(
                "{} {} {host}",
                parts.next().unwrap(),
                parts.next().unwrap()
            ));
            let body = if status == 200 { "Purged" } else { "Method not allowed" };
            let mut stream = reader.into_inner();
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (address, seen, server)
}

fn varnish(address: &str) -> PluginManifest {
    PluginManifest::parse(
        &format!("name = \"varnish\"\nworld = \"cache-invalidator\"\n[grants.endpoints.cache1]\nhttp = \"{address}\"\ntimeout-ms = 3000\n"),
        "varnish.toml",
    )
    .unwrap()
}

#[test]
fn varnish_plugin_purges_paths_and_bans_sites_over_http() {
    let (runtime, logs) = runtime();
    let (address, seen, server) = fake_cache(200, 3);
    let plugin =
        LoadedPlugin::load(&runtime, &component("varnish"), varnish(&address), "varnish").unwrap();
    plugin.self_check().unwrap();
    plugin.invalidate("www.example.com", &["/index.html".into(), "img/logo.png".into()]).unwrap();
    plugin.purge_site("shop.example.com").unwrap();
    server.join().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            format!("PURGE /index.html www.example.com"),
            format!("PURGE /img/logo.png www.example.com"),
            format!("BAN / shop.example.com"),
        ]
    );
    assert!(
        logs.lock()
            .unwrap()
            .iter()
            .any(|(p, _, m)| p == "varnish" && m == "purged 2 paths of www.example.com")
    );
}

#[test]
fn varnish_plugin_reports_a_refusing_cache_and_an_unreachable_one() {
    let (runtime, _) = runtime();
    let (address, _, server) = fake_cache(405, 1);
    let plugin =
        LoadedPlugin::load(&runtime, &component("varnish"), varnish(&address), "varnish").unwrap();
    match plugin.invalidate("www", &["/a".into()]) {
        Err(PluginError::Vetoed { hook: "invalidate", message, .. }) => {
            assert!(message.contains("HTTP 405"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.join().unwrap();
    // Nothing listens there any more.
    match plugin.invalidate("www", &["/a".into()]) {
        Err(PluginError::Vetoed { message, .. }) => {
            assert!(message.contains("endpoint `cache1`"), "{message}")
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
}

/// A real HAProxy (`cm_tests::stack`) whose backend `app` holds `servers` (HAProxy `server`
/// lines); `None` when it is not installed.
fn start_haproxy(servers: &str) -> Option<Haproxy> {
    let front = format!("127.0.0.1:{}", cm_tests::stack::free_port());
    Haproxy::with_lines(&front, servers).expect("haproxy starts")
}

#[test]
fn haproxy_plugin_drives_a_real_haproxy() {
    let Some(haproxy) =
        start_haproxy("  server s1 127.0.0.1:9 check disabled\n  server s2 127.0.0.1:9\n")
    else {
        // `.ci/run` installs haproxy; on a bare developer machine this one test has nothing to drive.
        cm_tests::missing_part("haproxy not installed (the real-HAProxy test)");
        return;
    };
    let (runtime, _) = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = PluginStore::open(runtime, dir.path()).unwrap();
    let manifest = PluginManifest::parse(
        &format!(
            "name = \"lb\"\nworld = \"load-balancer\"\n[grants.endpoints.haproxy]\nunix = \"{}\"\n",
            haproxy.socket.display()
        ),
        "lb.toml",
    )
    .unwrap();
    store.install(&component("haproxy"), manifest, "haproxy").unwrap();
    let lb = store.load_balancer("lb").unwrap();

    assert_eq!(lb.state("app/s2").unwrap(), ServerState::Ready);
    assert_eq!(lb.state("app/s1").unwrap(), ServerState::Maint);
    lb.drain("app/s2").unwrap();
    assert_eq!(lb.state("app/s2").unwrap(), ServerState::Drain);
    assert_eq!(haproxy.admin_state("s2").unwrap() & 0x08, 0x08, "HAProxy itself has s2 draining");
    lb.undrain("app/s2").unwrap();
    assert_eq!(lb.state("app/s2").unwrap(), ServerState::Ready);
    assert_eq!(haproxy.admin_state("s2").unwrap(), 0);

    lb.add("app/s3", "127.0.0.1:9").unwrap();
    assert_eq!(lb.state("app/s3").unwrap(), ServerState::Ready);
    lb.remove("app/s3").unwrap();
    assert_eq!(lb.state("app/s3").unwrap(), ServerState::Absent);
    match lb.drain("app/nope") {
        Err(PluginError::Vetoed { hook: "drain", message, .. }) => {
            assert!(message.contains("haproxy refused"), "{message}")
        }
        other => panic!("expected HAProxy's refusal, got {other:?}"),
    }
}

/// Which origins answered `n` fresh requests through HAProxy's frontend.
fn answered_by(front: &str, n: usize) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|_| {
            let (status, body) = http_get(front, "www", "/").unwrap();
            assert_eq!(status, 200, "{body}");
            body.split_whitespace().next().unwrap().to_string()
        })
        .collect()
}

fn set(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn haproxy_plugin_changes_where_a_real_haproxy_routes_requests() {
    let (s1, s2, s3) = (Origin::start("s1"), Origin::start("s2"), Origin::start("s3"));
    let servers = format!("  server s1 {}\n  server s2 {}\n", s1.address, s2.address);
    let Some(haproxy) = start_haproxy(&servers) else {
        cm_tests::missing_part("haproxy not installed (the real-HAProxy routing test)");
        return;
    };
    let (runtime, _) = runtime();
    let manifest = PluginManifest::parse(
        &format!(
            "name = \"lb\"\nworld = \"load-balancer\"\n[grants.endpoints.haproxy]\nunix = \"{}\"\n",
            haproxy.socket.display()
        ),
        "lb.toml",
    )
    .unwrap();
    let lb = LoadedPlugin::load(&runtime, &component("haproxy"), manifest, "haproxy").unwrap();
    let act = |action| lb.balance(action).unwrap();
    use cm_plugin_host::BalancerAction::*;

    assert_eq!(answered_by(&haproxy.front, 6), set(&["s1", "s2"]), "round robin over both");
    act(Drain("app/s1"));
    assert_eq!(
        answered_by(&haproxy.front, 6),
        set(&["s2"]),
        "a drained server gets no new requests"
    );
    act(Undrain("app/s1"));
    assert_eq!(answered_by(&haproxy.front, 6), set(&["s1", "s2"]));
    act(Add { server: "app/s3", address: &s3.address });
    assert_eq!(
        answered_by(&haproxy.front, 9),
        set(&["s1", "s2", "s3"]),
        "an added server takes requests"
    );
    act(Remove("app/s1"));
    assert_eq!(answered_by(&haproxy.front, 6), set(&["s2", "s3"]), "a removed server takes none");
    assert_eq!(act(State("app/s1")), Some(ServerState::Absent));
}

#[test]
fn endpoints_not_granted_are_unreachable_for_the_plugin() {
    let (runtime, _) = runtime();
    // Granted only `elsewhere`: the plugin's own name `haproxy` means nothing to the host.
    let manifest = PluginManifest::parse(
        "name = \"lb\"\nworld = \"load-balancer\"\n[grants.endpoints.elsewhere]\ntcp = \"127.0.0.1:9\"\n",
        "lb.toml",
    )
    .unwrap();
    let plugin = LoadedPlugin::load(&runtime, &component("haproxy"), manifest, "haproxy").unwrap();
    let slot = PluginSlot::new(plugin.clone());
    assert!(slot.current().self_check().is_err());
    match plugin.balance(cm_plugin_host::BalancerAction::Drain("app/s1")) {
        Err(PluginError::Vetoed { message, .. }) => {
            assert!(message.contains("not granted"), "{message}")
        }
        other => panic!("expected not-granted, got {other:?}"),
    }
}
