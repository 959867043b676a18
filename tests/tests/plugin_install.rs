//! What the plugin store refuses at install, with a message saying what is wrong; and what
//! `inspect` says about a component.

mod plugin_support;

use cm_plugin_host::{InstallError, PluginManifest, PluginStore, World, inspect};
use plugin_support::*;

fn store() -> (PluginStore, tempfile::TempDir) {
    let (runtime, _) = runtime();
    let dir = tempfile::tempdir().unwrap();
    (PluginStore::open(runtime, dir.path()).unwrap(), dir)
}

#[test]
fn rejects_what_is_not_a_component() {
    let (store, _dir) = store();
    let manifest = interpreter_manifest("x", 64, 1_000);
    match store.install(b"certainly not wasm", manifest.clone(), "junk.wasm") {
        Err(InstallError::InvalidComponent { file, .. }) => assert_eq!(file, "junk.wasm"),
        other => panic!("{other:?}"),
    }
    // A core module (what the compiler emits before componentization).
    let core = [b"\0asm".as_slice(), &[1, 0, 0, 0]].concat();
    let error = store.install(&core, manifest, "core.wasm").unwrap_err().to_string();
    assert!(error.contains("core WebAssembly module, not a component"), "{error}");
    assert!(store.list().is_empty(), "nothing installed");
}

#[test]
fn rejects_the_wrong_world_and_missing_grants() {
    let (store, _dir) = store();
    // A cache invalidator offered as an interpreter.
    match store.install(&component("varnish"), interpreter_manifest("x", 64, 1_000), "varnish.wasm")
    {
        Err(InstallError::WorldMismatch { manifest, component, .. }) => {
            assert_eq!(
                (manifest.as_str(), component.as_str()),
                ("interpreter", "cache-invalidator")
            )
        }
        other => panic!("{other:?}"),
    }
    // An interpreter granted no site.
    let mut manifest = interpreter_manifest("x", 64, 1_000);
    manifest.grants.sites.clear();
    let error = store.install(&component("interpreter"), manifest, "interpreter.wasm").unwrap_err();
    assert!(matches!(error, InstallError::MissingGrant { .. }), "{error}");
    assert!(error.to_string().contains("grants.sites"), "{error}");
    // More memory than this host allows.
    let error = store
        .install(&component("interpreter"), interpreter_manifest("x", 100_000, 1_000), "i.wasm")
        .unwrap_err();
    assert!(error.to_string().contains("exceeds this host's maximum"), "{error}");
    // A handle of the wrong world.
    store
        .install(&component("interpreter"), interpreter_manifest("x", 64, 1_000), "i.wasm")
        .unwrap();
    let error = store.cache_invalidator("x").err().unwrap().to_string();
    assert!(error.contains("targets world `interpreter`, not `cache-invalidator`"), "{error}");
    // Parsing checks the manifest alone; the grants its world needs are checked at load.
    let manifest =
        PluginManifest::parse("name = \"y\"\nworld = \"load-balancer\"\n", "y.toml").unwrap();
    let error = manifest.check_grants("y.toml").unwrap_err().to_string();
    assert!(error.contains("grants.endpoints") && error.starts_with("manifest y.toml"), "{error}");
}

#[test]
fn inspect_names_world_imports_exports_size_and_hash() {
    let (runtime, _) = runtime();
    let bytes = component("interpreter");
    let info = inspect(&runtime, &bytes, "interpreter.wasm").unwrap();
    assert_eq!(info.world, Some(World::Interpreter));
    assert_eq!(info.size, bytes.len() as u64);
    assert_eq!(info.blake3, blake3::hash(&bytes).to_hex().to_string());
    assert_eq!(info.exports, vec!["contentmover:plugin/content-interpreter@0.1.0".to_string()]);
    for import in ["contentmover:plugin/staging@0.1.0", "contentmover:plugin/payload@0.1.0"] {
        assert!(info.imports.iter().any(|i| i == import), "{import} in {:?}", info.imports);
    }
    assert!(info.problem.is_none());
    let lb = inspect(&runtime, &component("haproxy"), "haproxy.wasm").unwrap();
    assert_eq!(lb.world, Some(World::LoadBalancer));
    assert!(!lb.imports.iter().any(|i| i.contains("staging")), "{:?}", lb.imports);
}
