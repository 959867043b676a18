//! Shared by the `plugin_*` tests: the runtime, components from `plugins/dist`, manifests.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use cm_plugin_host::{
    Command, LoadedPlugin, LogLevel, MemoryPayload, PluginManifest, PluginRuntime, RuntimeConfig, bundled,
};

/// The bytes of a component built from this repository (`plugins/dist/<name>.wasm`).
pub fn component(name: &str) -> Vec<u8> {
    let path = bundled::dist_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask plugins`)", path.display()))
}

/// Every log record plugins wrote, as (plugin, level, message).
pub type Logs = Arc<Mutex<Vec<(String, LogLevel, String)>>>;

/// A runtime whose plugin logs are captured.
pub fn runtime() -> (PluginRuntime, Logs) {
    let logs: Logs = Arc::default();
    let sink = logs.clone();
    let config = RuntimeConfig {
        max_instances: 32,
        log_sink: Some(Arc::new(move |plugin: &str, level, message: &str| {
            sink.lock().unwrap().push((plugin.to_string(), level, message.to_string()))
        })),
        ..Default::default()
    };
    (PluginRuntime::new(config).expect("runtime"), logs)
}

/// An interpreter manifest granting every site, with the given limits.
pub fn interpreter_manifest(name: &str, memory_mib: u64, deadline_ms: u64) -> PluginManifest {
    let mut manifest = bundled::interpreter_manifest(name, &["*"]);
    manifest.limits.memory_mib = memory_mib;
    manifest.limits.deadline_ms = deadline_ms;
    manifest
}

/// Load `plugins/dist/<file>.wasm` as interpreter `name`.
pub fn load_interpreter(runtime: &PluginRuntime, file: &str) -> Arc<LoadedPlugin> {
    LoadedPlugin::load(runtime, &component(file), interpreter_manifest(file, 64, 2_000), file).expect("load")
}

pub fn write(path: &str, bytes: &[u8]) -> Command {
    Command::WriteFile { path: path.into(), mode: 0o644, mtime: 1_700_000_000, data: MemoryPayload::boxed(bytes) }
}

/// Every path under `root`, relative, sorted (to prove nothing appeared elsewhere).
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}
