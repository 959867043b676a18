//! What a plugin author meets: a panic that says why, `[config]` reaching the plugin, and the
//! errors of issue 18 (wrong world before grants, memory in MiB, the manifest file named,
//! nothing claimed kept when nothing was installed, a grant that drops the agent's site refused
//! at install and swap, `cmover plugin` and the agent on the same store).

mod plugin_support;

use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cm_plugin_host::{
    FailureCause, FollowConfig, InstallError, LoadedPlugin, LogLevel, PluginError, PluginManifest,
    PluginStore, StoreEvent, StoreFollower,
};
use plugin_support::*;

fn manifest(text: &str) -> PluginManifest {
    PluginManifest::parse(text, "author.toml").unwrap()
}

#[test]
fn a_panic_says_why_in_the_error_and_the_log() {
    let (runtime, logs) = runtime();
    let plugin = load_interpreter(&runtime, "test-trap");
    let staging = tempfile::tempdir().unwrap();
    let error =
        plugin.interpreter_session(staging.path()).unwrap().apply(vec![write("a", b"a")]).err();
    let Some(PluginError::Failed { cause: FailureCause::Trap(trap), .. }) = error else {
        panic!("expected a trap, got {error:?}");
    };
    // The SDK's hook logged the panic before the trap; the host put it first in the error.
    assert!(trap.starts_with("panicked at "), "{trap}");
    assert!(trap.contains("test-trap refuses write-file a"), "{trap}");
    let logged = logs.lock().unwrap().clone();
    assert!(
        logged.iter().any(|(plugin, level, message)| plugin == "test-trap"
            && *level == LogLevel::Error
            && message.contains("test-trap refuses write-file a")),
        "{logged:?}"
    );
}

#[test]
fn the_manifest_config_reaches_the_plugin() {
    let (runtime, logs) = runtime();
    let text = "name = \"cfg\"\nworld = \"interpreter\"\n[grants]\nsites = [\"*\"]\n[config]\ngreeting = \"hello\"\nbatch-size = \"64\"\n";
    let plugin =
        LoadedPlugin::load(&runtime, &component("test-config"), manifest(text), "cfg").unwrap();
    let staging = tempfile::tempdir().unwrap();
    let reports =
        plugin.interpreter_session(staging.path()).unwrap().apply(vec![write("a", b"a")]).unwrap();
    assert!(reports[0].outcome.is_ok(), "{reports:?}");
    let logged: Vec<String> = logs.lock().unwrap().iter().map(|(_, _, m)| m.clone()).collect();
    // entries() is sorted by key.
    assert_eq!(logged, ["config batch-size=64", "config greeting=hello"]);

    // get(): a key the plugin acts on.
    let text = "name = \"cfg\"\nworld = \"interpreter\"\n[grants]\nsites = [\"*\"]\n[config]\nrefuse = \"read-only today\"\n";
    let plugin =
        LoadedPlugin::load(&runtime, &component("test-config"), manifest(text), "cfg").unwrap();
    let reports =
        plugin.interpreter_session(staging.path()).unwrap().apply(vec![write("b", b"b")]).unwrap();
    assert_eq!(reports[0].outcome, Err("refused by config: read-only today".to_string()));
    assert!(!staging.path().join("b").exists());
}

#[test]
fn a_wrong_world_is_reported_before_missing_grants() {
    let (runtime, _) = runtime();
    // An interpreter component with a cache-invalidator manifest that also lacks its
    // endpoint: the world is what is wrong.
    let text = "name = \"x\"\nworld = \"cache-invalidator\"\n";
    let error = LoadedPlugin::load(&runtime, &component("interpreter"), manifest(text), "i.wasm")
        .err()
        .unwrap();
    assert!(matches!(error, InstallError::WorldMismatch { .. }), "{error}");
}

#[test]
fn manifest_errors_name_the_manifest_file() {
    let (runtime, _) = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.toml");
    let shown = path.display().to_string();
    let load_error = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let manifest = PluginManifest::load(&path).unwrap();
        LoadedPlugin::load(&runtime, &component("interpreter"), manifest, "interpreter.wasm")
            .err()
            .unwrap()
            .to_string()
    };
    let error = load_error(
        "name = \"x\"\nworld = \"interpreter\"\n[limits]\nmemory-mib = 100000\n[grants]\nsites = [\"*\"]\n",
    );
    assert!(error.starts_with(&format!("manifest {shown}:")), "{error}");
    assert!(error.contains("exceeds this host's maximum"), "{error}");
    let error = load_error("name = \"x\"\nworld = \"interpreter\"\n");
    assert!(error.starts_with(&format!("manifest {shown}:")), "{error}");
    assert!(error.contains("grants.sites"), "{error}");
}

#[test]
fn a_failed_self_check_says_what_stays() {
    let (runtime, _) = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = PluginStore::open(runtime, dir.path()).unwrap();
    let failing = "name = \"cfg\"\nworld = \"interpreter\"\n[grants]\nsites = [\"*\"]\n[config]\nfail-self-check = \"no database\"\n";
    let error = store.install(&component("test-config"), manifest(failing), "c.wasm").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("(nothing installed): "), "{message}");
    assert!(message.contains("no database"), "{message}");
    assert!(!message.contains("kept"), "{message}");
    let good = store
        .install(&component("test-config"), manifest(&failing.replace("fail-self-check", "x")), "c")
        .unwrap();
    let message =
        store.install(&component("test-config"), manifest(failing), "c.wasm").unwrap_err();
    assert!(message.to_string().contains(&format!("(version {} kept)", good.version)), "{message}");
}

#[test]
fn a_grant_without_the_agents_site_is_refused_at_install_and_at_swap() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere =
        "name = \"interpreter\"\nworld = \"interpreter\"\n[grants]\nsites = [\"blog\"]\n";
    // In-process install.
    let (agent_runtime, _) = runtime();
    let agent_store = Arc::new(PluginStore::open(agent_runtime, dir.path()).unwrap());
    agent_store.require_sites("interpreter", &["www"]);
    let www = manifest(&elsewhere.replace("blog", "www"));
    let live = agent_store.install(&component("interpreter"), www, "i.wasm").unwrap();
    let error =
        agent_store.install(&component("test-config"), manifest(elsewhere), "c.wasm").unwrap_err();
    assert!(matches!(error, InstallError::SiteRequired { .. }), "{error}");
    assert!(error.to_string().contains("must be granted site `www`"), "{error}");
    assert!(error.to_string().starts_with("manifest author.toml:"), "{error}");

    // Another process (`cmover plugin install` without the requirement) writes the store; the
    // agent's follower refuses the version and keeps its own.
    let events: Arc<Mutex<Vec<StoreEvent>>> = Arc::default();
    let sink = events.clone();
    let follower = StoreFollower::start(
        agent_store.clone(),
        FollowConfig {
            every: Duration::from_millis(50),
            on_event: Some(Arc::new(move |event: &StoreEvent| {
                sink.lock().unwrap().push(event.clone())
            })),
        },
    )
    .unwrap();
    let (other_runtime, _) = runtime();
    let other = PluginStore::open(other_runtime, dir.path()).unwrap();
    other.install(&component("test-config"), manifest(elsewhere), "c.wasm").unwrap();
    let refused = wait_until(Duration::from_secs(30), || {
        events.lock().unwrap().iter().any(|e| matches!(e, StoreEvent::Refused { .. }))
    });
    assert!(refused, "{:?}", events.lock().unwrap());
    let event = events
        .lock()
        .unwrap()
        .iter()
        .find(|e| matches!(e, StoreEvent::Refused { .. }))
        .cloned()
        .unwrap()
        .to_string();
    assert!(event.contains("must be granted site `www`"), "{event}");
    assert!(event.contains(&format!("keeping {}", live.version)), "{event}");
    assert_eq!(
        follower.interpreter("interpreter", "www").unwrap().plugin().version(),
        live.version
    );
}

#[test]
fn plugin_install_uses_the_agents_store_and_site() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("agent-data");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[node]\ndata_dir = {:?}\n[site]\nname = \"shop\"\n", data_dir),
    )
    .unwrap();
    let wasm = cm_plugin_host::bundled::dist_dir().join("interpreter.wasm");
    let install = |manifest_text: &str| {
        let manifest = dir.path().join("m.toml");
        std::fs::write(&manifest, manifest_text).unwrap();
        run_cmover(&[
            OsStr::new("plugin"),
            OsStr::new("install"),
            wasm.as_os_str(),
            OsStr::new("--manifest"),
            manifest.as_os_str(),
            OsStr::new("--agent-config"),
            config.as_os_str(),
        ])
    };
    // The agent's site is `shop`: an interpreter for `www` only is refused, with the reason.
    let (ok, out) =
        install("name = \"interpreter\"\nworld = \"interpreter\"\n[grants]\nsites = [\"www\"]\n");
    assert!(!ok, "{out}");
    assert!(out.contains("must be granted site `shop`"), "{out}");
    let (ok, out) =
        install("name = \"interpreter\"\nworld = \"interpreter\"\n[grants]\nsites = [\"shop\"]\n");
    assert!(ok, "{out}");
    // Installed where the agent (data_dir/plugins, the agent's own default) looks.
    assert!(data_dir.join("plugins/interpreter/state.toml").is_file());
    let (ok, out) = run_cmover(&[
        OsStr::new("plugin"),
        OsStr::new("list"),
        OsStr::new("--agent-config"),
        config.as_os_str(),
    ]);
    assert!(ok && out.contains("interpreter"), "{out}");
}
