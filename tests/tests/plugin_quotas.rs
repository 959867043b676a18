//! Per-call quotas against a hostile interpreter (`plugins/test-flood`, issue 14 item 6): a log
//! flood is cut to the quota and summed up in one record; hoarding open files, writing without
//! end, creating files without end, or writing onto a filesystem at its reserve fails the call
//! with a quota cause, leaves no temporary file behind, and the host keeps working.

mod plugin_support;

use std::sync::Arc;

use cm_plugin_host::{
    DiskReserve, FailureCause, LoadedPlugin, LogLevel, PluginError, PluginManifest, PluginRuntime,
    QuotaExceeded, RuntimeConfig,
};
use plugin_support::*;

fn flood(runtime: &PluginRuntime, manifest: impl FnOnce(&mut PluginManifest)) -> Arc<LoadedPlugin> {
    let mut m = interpreter_manifest("test-flood", 64, 10_000);
    manifest(&mut m);
    LoadedPlugin::load(runtime, &component("test-flood"), m, "test-flood").expect("load")
}

/// The quota that failed a call of `attack` (the path the plugin reads as its orders).
fn quota_failure(
    plugin: &Arc<LoadedPlugin>,
    staging: &std::path::Path,
    attack: &str,
) -> QuotaExceeded {
    match plugin.interpreter_session(staging).unwrap().apply(vec![write(attack, b"")]) {
        Err(PluginError::Failed { cause: FailureCause::Quota(why), .. }) => *why,
        other => panic!("{attack}: expected a quota failure, got {other:?}"),
    }
}

#[test]
fn a_log_flood_is_cut_at_the_quota_and_summed_up_once() {
    let (runtime, logs) = runtime();
    let plugin = flood(&runtime, |_| {});
    let staging = tempfile::tempdir().unwrap();
    // 100,000 records of 4 KiB (400 MiB), then the command itself.
    let reports = plugin
        .interpreter_session(staging.path())
        .unwrap()
        .apply(vec![write("log-flood", b"done")]);
    assert!(reports.unwrap()[0].outcome.is_ok(), "a chatty plugin still does its work");
    assert_eq!(std::fs::read(staging.path().join("log-flood")).unwrap(), b"done");
    let logs = logs.lock().unwrap();
    let bytes: usize = logs.iter().map(|(_, _, m)| m.len()).sum();
    // The default quota: 1,000 records or 256 KiB per call, whichever comes first.
    assert!(bytes <= 256 * 1024 + 200, "{bytes} bytes of log from one call");
    let summaries: Vec<_> =
        logs.iter().filter(|(_, l, m)| *l == LogLevel::Warn && m.contains("log quota")).collect();
    assert_eq!(summaries.len(), 1, "one summary record");
    assert!(summaries[0].2.contains("dropped 99936 records"), "{}", summaries[0].2);
    assert_eq!(logs.len(), 64 + 1, "64 records of 4 KiB fit in 256 KiB, then the summary");
}

#[test]
fn hoarding_open_files_fails_the_call_at_the_quota() {
    let (runtime, _) = runtime();
    let plugin = flood(&runtime, |m| m.limits.open_files = 32);
    let staging = tempfile::tempdir().unwrap();
    std::fs::write(staging.path().join("base.txt"), b"base").unwrap();
    // The plugin tries to hold 20,000 readers.
    let why = quota_failure(&plugin, staging.path(), "hoard-handles");
    assert_eq!(why, QuotaExceeded::OpenFiles { limit: 32 });
    host_still_works(&runtime);
}

#[test]
fn a_write_flood_fails_the_call_past_what_the_batch_declares() {
    let (runtime, _) = runtime();
    let plugin = flood(&runtime, |m| m.limits.extra_write_mib = 1);
    let staging = tempfile::tempdir().unwrap();
    // The batch declares 0 bytes; the plugin tries to write 1 GiB.
    let why = quota_failure(&plugin, staging.path(), "write-flood");
    assert_eq!(why, QuotaExceeded::WriteBytes { limit: 1 << 20 });
    assert_eq!(tree(staging.path()), Vec::<String>::new(), "the unfinished file is gone");
    host_still_works(&runtime);
}

#[test]
fn a_create_flood_fails_the_call_past_what_the_batch_declares() {
    let (runtime, _) = runtime();
    let plugin = flood(&runtime, |m| m.limits.extra_files = 10);
    let staging = tempfile::tempdir().unwrap();
    // The batch declares one file; the plugin tries to create 100,000.
    let why = quota_failure(&plugin, staging.path(), "create-flood");
    assert_eq!(why, QuotaExceeded::FilesCreated { limit: 11 });
    assert!(tree(staging.path()).len() <= 11, "{:?}", tree(staging.path()));
    host_still_works(&runtime);
}

#[test]
fn a_write_that_would_eat_the_disk_reserve_fails_the_call() {
    // A reserve larger than any disk: every filesystem is "full" for this runtime.
    let config = RuntimeConfig {
        disk_reserve: DiskReserve { bytes: u64::MAX / 4, inodes: 0 },
        ..RuntimeConfig::default()
    };
    let runtime = PluginRuntime::new(config).unwrap();
    let plugin = load_interpreter(&runtime, "interpreter");
    let staging = tempfile::tempdir().unwrap();
    let outcome =
        plugin.interpreter_session(staging.path()).unwrap().apply(vec![write("a.txt", b"a")]);
    match outcome {
        Err(PluginError::Failed { cause: FailureCause::Quota(why), .. })
            if matches!(*why, QuotaExceeded::DiskReserve { .. }) =>
        {
            let QuotaExceeded::DiskReserve { path, .. } = *why else { unreachable!() };
            assert_eq!(path, "a.txt")
        }
        other => panic!("expected the disk reserve to stop the call, got {other:?}"),
    }
    assert_eq!(tree(staging.path()), Vec::<String>::new());
}
