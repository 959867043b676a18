//! A long-running process (this test, standing in for the agent) follows the plugin store
//! with a `StoreFollower` while another process — the real `cmover plugin` binary — installs,
//! rolls back and removes versions: busy callers switch versions with no failed call; a
//! version this host cannot run is refused with a clear reason and the live one stays.

mod plugin_support;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cm_plugin_host::{
    FollowConfig, InstallError, PluginError, PluginManifest, PluginRuntime, PluginStore,
    RuntimeConfig, StoreEvent, StoreFollower, bundled,
};
use plugin_support::*;

const NAME: &str = "site-interpreter";
const PATIENCE: Duration = Duration::from_secs(60);

/// Write `manifest` and the component `file` of `plugins/dist` into `work`, then
/// `cmover plugin install` them into the store at `store`.
fn cli_install(work: &Path, store: &Path, file: &str, manifest: &PluginManifest) -> (bool, String) {
    let manifest_path = work.join(format!("{file}-{}.toml", manifest.limits.memory_mib));
    std::fs::write(&manifest_path, manifest.to_toml()).unwrap();
    let component = bundled::dist_dir().join(format!("{file}.wasm"));
    run_cmover(&[
        OsStr::new("plugin"),
        OsStr::new("install"),
        component.as_os_str(),
        OsStr::new("--manifest"),
        manifest_path.as_os_str(),
        OsStr::new("--store"),
        store.as_os_str(),
    ])
}

fn cli(store: &Path, args: &[&str]) -> (bool, String) {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend([OsStr::new("--store"), store.as_os_str()]);
    run_cmover(&all)
}

/// A follower on `store` whose host allows at most 64 MiB per plugin, recording its events.
fn follower(store: &Path) -> (StoreFollower, Arc<Mutex<Vec<StoreEvent>>>) {
    let config = RuntimeConfig {
        compiled_cache: Some(PluginStore::compiled_cache_dir(store)),
        max_instances: 32,
        max_memory_mib: 64,
        ..Default::default()
    };
    let events: Arc<Mutex<Vec<StoreEvent>>> = Arc::default();
    let sink = events.clone();
    let follow = FollowConfig {
        every: Duration::from_millis(100),
        on_event: Some(Arc::new(move |event: &StoreEvent| {
            sink.lock().unwrap().push(event.clone())
        })),
    };
    let store = PluginStore::open(PluginRuntime::new(config).unwrap(), store).unwrap();
    (StoreFollower::start(Arc::new(store), follow).unwrap(), events)
}

/// Replace `path` whole, as the store does (the follower never sees half a file).
fn write_atomic(path: &Path, text: &str) {
    let temp = path.with_extension("tmp-test");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Which version answered one batch applied through `interpreter`.
fn call(interpreter: &cm_plugin_host::Interpreter) -> Result<String, PluginError> {
    let staging = tempfile::tempdir().unwrap();
    interpreter.apply(staging.path(), vec![write("a.txt", b"a")])?;
    Ok(std::fs::read_to_string(staging.path().join(".answered-by"))
        .expect("every answered batch is signed"))
}

#[test]
fn installs_by_cmover_reach_a_running_follower_with_no_failed_call() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let manifest = interpreter_manifest(NAME, 32, 5_000);
    let (ok, out) = cli_install(work.path(), &store, "test-swap-v1", &manifest);
    assert!(ok, "{out}");
    let (plugins, events) = follower(&store);
    let interpreter = plugins.interpreter(NAME, "www").unwrap();
    assert_eq!(call(&interpreter).unwrap(), "1");

    let stop = Arc::new(AtomicBool::new(false));
    let (answers, failures) =
        (Arc::new([AtomicU64::new(0), AtomicU64::new(0)]), Arc::new(Mutex::new(Vec::new())));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (interpreter, stop, answers, failures) =
                (interpreter.clone(), stop.clone(), answers.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match call(&interpreter).as_deref() {
                        Ok("1") => answers[0].fetch_add(1, Ordering::Relaxed),
                        Ok("2") => answers[1].fetch_add(1, Ordering::Relaxed),
                        Ok(other) => panic!("answered by unknown version {other:?}"),
                        Err(e) => {
                            failures.lock().unwrap().push(e.to_string());
                            0
                        }
                    };
                }
            })
        })
        .collect();

    // Another process installs version 2: the follower swaps it in under the callers.
    let (ok, out) = cli_install(work.path(), &store, "test-swap-v2", &manifest);
    assert!(ok, "{out}");
    assert!(out.contains("replaces"), "{out}");
    assert!(
        wait_until(PATIENCE, || answers[1].load(Ordering::Relaxed) > 0),
        "version 2 never answered"
    );
    // ... and rolls back: calls go to version 1 again.
    let before = answers[0].load(Ordering::Relaxed);
    let (ok, out) = cli(&store, &["plugin", "rollback", NAME]);
    assert!(ok, "{out}");
    assert!(
        wait_until(PATIENCE, || call(&interpreter).unwrap() == "1"),
        "rollback never reached the follower"
    );
    assert!(wait_until(PATIENCE, || answers[0].load(Ordering::Relaxed) > before));
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.join().expect("caller panicked");
    }
    assert_eq!(
        *failures.lock().unwrap(),
        Vec::<String>::new(),
        "no call fails while the store is followed"
    );

    let events = events.lock().unwrap().clone();
    let swaps: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            StoreEvent::Swapped { name, from, to } if name == NAME => {
                Some((from.clone(), to.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(swaps.len(), 2, "one swap to version 2, one back: {events:?}");
    assert_eq!(swaps[0].0, swaps[1].1, "the rollback restored the first version");
    assert!(events.iter().all(|e| !matches!(e, StoreEvent::Refused { .. })), "{events:?}");
}

#[test]
fn a_version_this_host_cannot_run_is_refused_and_the_live_one_stays() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let (ok, out) =
        cli_install(work.path(), &store, "test-swap-v1", &interpreter_manifest(NAME, 32, 5_000));
    assert!(ok, "{out}");
    let (plugins, events) = follower(&store);
    let interpreter = plugins.interpreter(NAME, "www").unwrap();
    let refused = || {
        events.lock().unwrap().iter().filter(|e| matches!(e, StoreEvent::Refused { .. })).count()
    };

    // Version 2 asks for 128 MiB: `cmover` (a 512 MiB host) installs it, this 64 MiB host refuses it.
    let (ok, out) =
        cli_install(work.path(), &store, "test-swap-v2", &interpreter_manifest(NAME, 128, 5_000));
    assert!(ok, "{out}");
    assert!(wait_until(PATIENCE, || refused() == 1), "no refusal: {:?}", events.lock().unwrap());
    let refusal = plugins.store().refusal(NAME).expect("the refusal stands");
    let message = refusal.to_string();
    assert!(message.contains(&format!("plugin `{NAME}`: refused")), "{message}");
    assert!(message.contains("keeping"), "{message}");
    assert!(message.contains("exceeds this host's maximum of 64 MiB"), "{message}");
    assert_eq!(call(&interpreter).unwrap(), "1", "the live version stays");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(refused(), 1, "a refusal is reported once, not every poll");

    // The operator fixes the manifest: now it swaps.
    let (ok, out) =
        cli_install(work.path(), &store, "test-swap-v2", &interpreter_manifest(NAME, 32, 5_000));
    assert!(ok, "{out}");
    assert!(
        wait_until(PATIENCE, || call(&interpreter).unwrap() == "2"),
        "{:?}",
        events.lock().unwrap()
    );
    assert!(plugins.store().refusal(NAME).is_none(), "the refusal is cleared");

    // A damaged component on disk (the state names a version whose file is garbage).
    let plugin_dir = store.join(NAME);
    let garbage = "0".repeat(64);
    std::fs::write(plugin_dir.join(format!("{garbage}.wasm")), b"not a component").unwrap();
    let state = std::fs::read_to_string(plugin_dir.join("state.toml")).unwrap();
    let current = state.lines().find(|l| l.starts_with("current")).unwrap().to_string();
    write_atomic(
        &plugin_dir.join("state.toml"),
        &state.replace(&current, &format!("current = \"{garbage}\"")),
    );
    assert!(wait_until(PATIENCE, || refused() == 2), "{:?}", events.lock().unwrap());
    match plugins.store().refusal(NAME) {
        Some(StoreEvent::Refused { version, kept, error, .. }) => {
            assert_eq!(version, &garbage[..12]);
            assert!(kept.is_some());
            assert!(matches!(*error, InstallError::InvalidComponent { .. }), "{error}");
            assert!(
                error.to_string().contains(&format!("{garbage}.wasm")),
                "names the file: {error}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(call(&interpreter).unwrap(), "2");
    write_atomic(&plugin_dir.join("state.toml"), &state);

    // Removed by `cmover`: calls through the old handle fail as not installed; installed again:
    // the same handle follows the new version.
    let (ok, out) = cli(&store, &["plugin", "remove", NAME]);
    assert!(ok, "{out}");
    assert!(wait_until(PATIENCE, || matches!(
        call(&interpreter),
        Err(PluginError::NotInstalled { .. })
    )));
    assert!(plugins.store().list().is_empty());
    let (ok, out) =
        cli_install(work.path(), &store, "test-swap-v1", &interpreter_manifest(NAME, 32, 5_000));
    assert!(ok, "{out}");
    assert!(wait_until(PATIENCE, || call(&interpreter).is_ok_and(|v| v == "1")));
    let events = events.lock().unwrap().clone();
    assert!(
        events.iter().any(|e| matches!(e, StoreEvent::Removed { name } if name == NAME)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, StoreEvent::Added { name, .. } if name == NAME)),
        "{events:?}"
    );
}
