//! Hot swap through the plugin store, with real components (`plugins/test-swap` built as
//! version 1 and version 2): callers never fail, each call is answered by exactly one of the
//! versions, a failing self-check keeps the old version, rollback restores the previous one,
//! and a reopened store loads native code from the compiled cache.

mod plugin_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cm_plugin_host::{InstallError, PluginManifest, PluginRuntime, PluginStore, RuntimeConfig};
use plugin_support::*;

fn swap_manifest() -> PluginManifest {
    interpreter_manifest("site-interpreter", 64, 5_000)
}

/// Which version answered the batch applied in `staging`.
fn answered_by(staging: &std::path::Path) -> String {
    std::fs::read_to_string(staging.join(".answered-by")).expect("every answered batch is signed")
}

#[test]
fn ten_swaps_under_eight_busy_callers_lose_no_call() {
    let (runtime, _) = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PluginStore::open(runtime, dir.path()).unwrap());
    let (v1, v2) = (component("test-swap-v1"), component("test-swap-v2"));
    store.install(&v1, swap_manifest(), "test-swap-v1").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let callers: Vec<_> = (0..8)
        .map(|caller| {
            let (store, stop, answers) = (store.clone(), stop.clone(), answers.clone());
            std::thread::spawn(move || {
                let interpreter = store.interpreter("site-interpreter", "www").unwrap();
                let staging = tempfile::tempdir().unwrap();
                let mut calls = 0u64;
                while !stop.load(Ordering::Relaxed) || calls == 0 {
                    let name = format!("c{caller}-{calls}.txt");
                    let reports = interpreter
                        .apply(staging.path(), vec![write(&name, b"x")])
                        .expect("no call fails during hot swap");
                    assert!(reports[0].outcome.is_ok(), "{reports:?}");
                    match answered_by(staging.path()).as_str() {
                        "1" => answers[0].fetch_add(1, Ordering::Relaxed),
                        "2" => answers[1].fetch_add(1, Ordering::Relaxed),
                        other => panic!("answered by unknown version {other:?}"),
                    };
                    calls += 1;
                }
                calls
            })
        })
        .collect();

    let mut versions = Vec::new();
    for swap in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(30));
        let (bytes, file) =
            if swap % 2 == 0 { (&v2, "test-swap-v2") } else { (&v1, "test-swap-v1") };
        let installed = store.install(bytes, swap_manifest(), file).unwrap();
        assert!(installed.replaced.is_some(), "swap {swap} replaced a live version");
        versions.push(installed.version);
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    stop.store(true, Ordering::Relaxed);
    let calls: u64 = callers.into_iter().map(|c| c.join().expect("caller panicked")).sum();

    let (one, two) = (answers[0].load(Ordering::Relaxed), answers[1].load(Ordering::Relaxed));
    assert_eq!(one + two, calls, "every call answered by exactly one version");
    assert!(one > 0 && two > 0, "both versions answered ({one} / {two})");
    // After the last swap (to version 1), new calls go to version 1.
    let staging = tempfile::tempdir().unwrap();
    store
        .interpreter("site-interpreter", "www")
        .unwrap()
        .apply(staging.path(), vec![write("last.txt", b"x")])
        .unwrap();
    assert_eq!(answered_by(staging.path()), "1");
    assert_eq!(versions[9], versions[1]);
    assert_ne!(versions[0], versions[1]);
}

#[test]
fn failing_self_check_keeps_the_old_version_and_rollback_restores_the_previous() {
    let (runtime, _) = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = PluginStore::open(runtime, dir.path()).unwrap();
    store.install(&component("test-swap-v1"), swap_manifest(), "v1").unwrap();
    store.install(&component("test-swap-v2"), swap_manifest(), "v2").unwrap();
    let call = || {
        let staging = tempfile::tempdir().unwrap();
        store
            .interpreter("site-interpreter", "www")
            .unwrap()
            .apply(staging.path(), vec![])
            .unwrap();
        answered_by(staging.path())
    };
    assert_eq!(call(), "2");

    // The HAProxy plugin's self-check fails when its endpoint is not granted.
    let lb = |endpoint: &str| {
        PluginManifest::parse(&format!("name = \"lb\"\nworld = \"load-balancer\"\n[grants.endpoints.{endpoint}]\nunix = \"/nonexistent.sock\"\n"), "lb.toml").unwrap()
    };
    let good = store.install(&component("haproxy"), lb("haproxy"), "haproxy").unwrap();
    match store.install(&component("haproxy"), lb("elsewhere"), "haproxy") {
        Err(InstallError::SelfCheck { plugin, kept, source }) => {
            assert_eq!(plugin, "lb");
            assert_eq!(kept, Some(good.version.clone()), "the live version stays");
            let reason = source.to_string();
            assert!(reason.contains("endpoint `haproxy` is not granted"), "{reason}");
        }
        other => panic!("expected a failed self-check, got {other:?}"),
    }
    let listed = store.list();
    let lb_row = listed.iter().find(|p| p.name == "lb").unwrap();
    assert_eq!(lb_row.version, good.version);
    assert!(store.load_balancer("lb").is_ok());

    let restored = store.rollback("site-interpreter").unwrap();
    assert_eq!(call(), "1");
    assert!(restored.replaced.is_some());
    assert!(matches!(store.rollback("site-interpreter"), Err(InstallError::NoPrevious { .. })));
}

#[test]
fn a_reopened_store_loads_from_the_compiled_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = || RuntimeConfig {
        compiled_cache: Some(PluginStore::compiled_cache_dir(dir.path())),
        max_instances: 8,
        ..Default::default()
    };
    {
        let store = PluginStore::open(PluginRuntime::new(config()).unwrap(), dir.path()).unwrap();
        store
            .install(
                &component("interpreter"),
                interpreter_manifest("default", 64, 1_000),
                "interpreter",
            )
            .unwrap();
        assert!(!store.slot("default").unwrap().current().from_compiled_cache());
    }
    let store = PluginStore::open(PluginRuntime::new(config()).unwrap(), dir.path()).unwrap();
    let plugin = store.slot("default").unwrap().current();
    assert!(plugin.from_compiled_cache(), "restart loads native code, no recompile");
    let staging = tempfile::tempdir().unwrap();
    store
        .interpreter("default", "www")
        .unwrap()
        .apply(staging.path(), vec![write("a", b"a")])
        .unwrap();
    assert_eq!(std::fs::read(staging.path().join("a")).unwrap(), b"a");

    store.remove("default").unwrap();
    assert!(store.interpreter("default", "www").is_err());
    assert!(store.list().is_empty());
}

#[test]
fn each_version_keeps_its_manifest_across_rollback_and_a_torn_install() {
    let (runtime, _) = runtime();
    let dir = tempfile::tempdir().unwrap();
    let with_deadline = |ms| interpreter_manifest("site-interpreter", 64, ms);
    let live_deadline = |store: &PluginStore| {
        store.slot("site-interpreter").unwrap().current().manifest().limits.deadline_ms
    };
    {
        let store = PluginStore::open(runtime.clone(), dir.path()).unwrap();
        store.install(&component("test-swap-v1"), with_deadline(5_000), "v1").unwrap();
        store.install(&component("test-swap-v2"), with_deadline(7_000), "v2").unwrap();
        assert_eq!(live_deadline(&store), 7_000);
        // Version 1 comes back with the limits it was installed with, on disk too.
        store.rollback("site-interpreter").unwrap();
        assert_eq!(live_deadline(&store), 5_000);
        let on_disk =
            PluginManifest::load(&dir.path().join("site-interpreter/manifest.toml")).unwrap();
        assert_eq!(on_disk.limits.deadline_ms, 5_000);
    }
    // An install that stopped after writing its manifest but before its state: the store
    // still runs version 1, with version 1's manifest.
    let torn = with_deadline(9_000).to_toml();
    std::fs::write(dir.path().join("site-interpreter/manifest.toml"), &torn).unwrap();
    let hash = blake3::hash(torn.as_bytes()).to_hex();
    std::fs::write(dir.path().join(format!("site-interpreter/manifest-{hash}.toml")), &torn)
        .unwrap();
    let store = PluginStore::open(runtime, dir.path()).unwrap();
    assert_eq!(
        live_deadline(&store),
        5_000,
        "a torn install's manifest was applied to the old version"
    );
    let staging = tempfile::tempdir().unwrap();
    store.interpreter("site-interpreter", "www").unwrap().apply(staging.path(), vec![]).unwrap();
    assert_eq!(answered_by(staging.path()), "1");
}
