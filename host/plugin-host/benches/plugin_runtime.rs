//! `cargo bench -p cm-plugin-host --bench plugin_runtime`: the plugin runtime's costs, side by
//! side in one run (the machine is shared: compare ratios, not absolute times).
//!
//! cold compile · load from the compiled cache · instantiate from `InstancePre` · an empty
//! call · applying 10,000 files of 4 KiB through the interpreter plugin versus a native Rust
//! loop writing the same files with the same semantics (fresh inode, mode, mtime, rename).

use std::fs::FileTimes;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use cm_assignment::{Command, MemoryPayload, StreamedCommand};
use cm_plugin_host::{LoadedPlugin, PluginRuntime, RuntimeConfig, bundled};

const FILES: usize = 10_000;
const FILE_SIZE: usize = 4096;
const BATCH: usize = 500;
const ROUNDS: usize = 5;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn per(d: Duration, n: usize) -> String {
    let ns = d.as_nanos() as f64 / n as f64;
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn content(i: usize) -> Vec<u8> {
    let mut bytes = vec![(i % 251) as u8; FILE_SIZE];
    bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
    bytes
}

fn path_of(i: usize) -> String {
    format!("d{:02}/f{i:05}.html", i % 100)
}

/// Through the plugin: batches of `BATCH` write-file commands, one session per batch (as
/// `cm-site` streams an assignment).
fn plugin_apply(plugin: &std::sync::Arc<LoadedPlugin>, root: &Path) -> Duration {
    let started = Instant::now();
    let mut session = plugin.interpreter_session(root).unwrap();
    let dirs: Vec<StreamedCommand> =
        (0..100).map(|d| Command::MakeDir { path: format!("d{d:02}"), mode: 0o755 }).collect();
    session.apply(dirs).unwrap();
    for start in (0..FILES).step_by(BATCH) {
        let batch = (start..start + BATCH)
            .map(|i| Command::WriteFile {
                path: path_of(i),
                mode: 0o644,
                mtime: 1_700_000_000,
                payload: MemoryPayload::boxed(content(i)),
                // Checked by the site after the batch, never by the interpreter: not computed
                // here, so the timing is the plugin's alone.
                hash: [0; 32],
            })
            .collect();
        let reports = session.apply(batch).unwrap();
        assert!(reports.iter().all(|r| r.outcome.is_ok()));
    }
    started.elapsed()
}

/// Native, same semantics as the staging interface: temp file, mode, mtime, rename.
fn native_apply(root: &Path) -> Duration {
    let started = Instant::now();
    for d in 0..100 {
        let dir = root.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for i in 0..FILES {
        let target = root.join(path_of(i));
        let temp = target.with_file_name(format!(".tmp-{i}"));
        let mut file = std::fs::File::create_new(&temp).unwrap();
        file.write_all(&content(i)).unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(0o644)).unwrap();
        file.set_times(
            FileTimes::new()
                .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        )
        .unwrap();
        drop(file);
        std::fs::rename(&temp, &target).unwrap();
    }
    started.elapsed()
}

/// Native, the simplest loop: `std::fs::write`.
fn native_plain(root: &Path) -> Duration {
    let started = Instant::now();
    for d in 0..100 {
        std::fs::create_dir_all(root.join(format!("d{d:02}"))).unwrap();
    }
    for i in 0..FILES {
        std::fs::write(root.join(path_of(i)), content(i)).unwrap();
    }
    started.elapsed()
}

fn main() {
    let bytes = std::fs::read(bundled::dist_dir().join("interpreter.wasm"))
        .expect("plugins/dist/interpreter.wasm");
    let manifest = bundled::interpreter_manifest("interpreter", &["*"]);
    let cache = tempfile::tempdir().unwrap();
    let uncached = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let cached = PluginRuntime::new(RuntimeConfig {
        compiled_cache: Some(cache.path().into()),
        ..Default::default()
    })
    .unwrap();

    let compile = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                LoadedPlugin::load(&uncached, &bytes, manifest.clone(), "interpreter").unwrap();
                t.elapsed()
            })
            .collect(),
    );
    LoadedPlugin::load(&cached, &bytes, manifest.clone(), "interpreter").unwrap();
    let from_cache = median(
        (0..20)
            .map(|_| {
                let t = Instant::now();
                let plugin =
                    LoadedPlugin::load(&cached, &bytes, manifest.clone(), "interpreter").unwrap();
                assert!(plugin.from_compiled_cache());
                t.elapsed()
            })
            .collect(),
    );

    let plugin = LoadedPlugin::load(&cached, &bytes, manifest.clone(), "interpreter").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    const INSTANTIATIONS: usize = 2_000;
    let instantiate = median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..INSTANTIATIONS {
                    drop(plugin.interpreter_session(scratch.path()).unwrap());
                }
                t.elapsed()
            })
            .collect(),
    );
    // A whole stateless call as the cache-invalidator and load-balancer handles make it:
    // fresh store + instance from the `InstancePre`, deadline, memory cap, one call, teardown.
    let fresh_call = median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..INSTANTIATIONS {
                    plugin.interpreter_session(scratch.path()).unwrap().self_check().unwrap();
                }
                t.elapsed()
            })
            .collect(),
    );
    const CALLS: usize = 100_000;
    let mut session = plugin.interpreter_session(scratch.path()).unwrap();
    let call = median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..CALLS {
                    session.self_check().unwrap();
                }
                t.elapsed()
            })
            .collect(),
    );

    let (mut through_plugin, mut native, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        through_plugin.push(plugin_apply(&plugin, dir.path()));
        let dir = tempfile::tempdir().unwrap();
        native.push(native_apply(dir.path()));
        let dir = tempfile::tempdir().unwrap();
        plain.push(native_plain(dir.path()));
    }
    let (through_plugin, native, plain) = (median(through_plugin), median(native), median(plain));

    println!("plugin runtime, interpreter component {} bytes (medians of one run)", bytes.len());
    println!("{:<58} {:>12}", "measure", "time");
    println!(
        "{:<58} {:>12}",
        "cold compile (Component::new + validation + InstancePre)",
        per(compile, 1)
    );
    println!(
        "{:<58} {:>12}",
        "load from the compiled cache (same, deserialize_file)",
        per(from_cache, 1)
    );
    println!(
        "{:<58} {:>12}",
        "instantiate from InstancePre (store + staging dir + inst.)",
        per(instantiate, INSTANTIATIONS)
    );
    println!("{:<58} {:>12}", "empty call (self-check on a live instance)", per(call, CALLS));
    println!(
        "{:<58} {:>12}",
        "fresh instance + empty call + teardown",
        per(fresh_call, INSTANTIATIONS)
    );
    println!("{:<58} {:>12}", "apply 10,000 x 4 KiB through the plugin", per(through_plugin, 1));
    println!(
        "{:<58} {:>12}",
        "native loop, same semantics (temp, mode, mtime, rename)",
        per(native, 1)
    );
    println!("{:<58} {:>12}", "native loop, plain std::fs::write", per(plain, 1));
    println!("ratios:");
    println!(
        "  cache load / cold compile           {:>8.4}",
        from_cache.as_secs_f64() / compile.as_secs_f64()
    );
    println!(
        "  plugin speed / native (same semantics) {:>5.2}x",
        native.as_secs_f64() / through_plugin.as_secs_f64()
    );
    println!(
        "  plugin speed / native (plain write)    {:>5.2}x",
        plain.as_secs_f64() / through_plugin.as_secs_f64()
    );
}
