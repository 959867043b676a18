//! Hostile and broken plugins (built from `plugins/test-*`): each fails cleanly with an error
//! naming the plugin and the cause, writes nothing outside its staging tree, and the host and
//! other plugins keep working.

mod plugin_support;

use std::sync::Arc;

use cm_assignment::Command;
use cm_plugin_host::{FailureCause, LoadedPlugin, PluginError};
use plugin_support::*;

fn failure(plugin: &Arc<LoadedPlugin>, staging: &std::path::Path) -> (String, FailureCause) {
    match plugin.interpreter_session(staging).unwrap().apply(vec![write("x.txt", b"x")]) {
        Err(e @ PluginError::Failed { .. }) => {
            let message = e.to_string();
            let PluginError::Failed { cause, plugin: name, .. } = e else { unreachable!() };
            assert_eq!(name, plugin.name());
            (message, cause)
        }
        other => panic!("expected a failed call, got {other:?}"),
    }
}

#[test]
fn a_trapping_plugin_fails_its_call_only() {
    let (runtime, _) = runtime();
    let plugin = load_interpreter(&runtime, "test-trap");
    let staging = tempfile::tempdir().unwrap();
    let (message, cause) = failure(&plugin, staging.path());
    assert!(matches!(cause, FailureCause::Trap(_)), "{cause:?}");
    assert!(message.starts_with("plugin `test-trap` ("), "{message}");
    assert!(message.contains("trapped"), "{message}");
    // The same plugin can be called again (a fresh instance), and fails the same way.
    let (_, again) = failure(&plugin, staging.path());
    assert!(matches!(again, FailureCause::Trap(_)));
    host_still_works(&runtime);
}

#[test]
fn an_endless_loop_is_stopped_at_its_deadline() {
    let (runtime, _) = runtime();
    let plugin = LoadedPlugin::load(
        &runtime,
        &component("test-loop"),
        interpreter_manifest("test-loop", 64, 200),
        "test-loop",
    )
    .unwrap();
    let staging = tempfile::tempdir().unwrap();
    let (message, cause) = failure(&plugin, staging.path());
    assert_eq!(cause, FailureCause::Deadline { ms: 200 });
    assert!(message.contains("deadline of 200 ms"), "{message}");
    assert!(!staging.path().join("x.txt").exists());
    host_still_works(&runtime);
}

#[test]
fn a_memory_hog_is_stopped_at_its_cap() {
    let (runtime, _) = runtime();
    let plugin = LoadedPlugin::load(
        &runtime,
        &component("test-hog"),
        interpreter_manifest("test-hog", 16, 5_000),
        "test-hog",
    )
    .unwrap();
    let staging = tempfile::tempdir().unwrap();
    let (message, cause) = failure(&plugin, staging.path());
    match cause {
        FailureCause::MemoryLimit { limit_bytes, wanted_bytes } => {
            assert_eq!(limit_bytes, 16 << 20);
            assert!(wanted_bytes > limit_bytes);
        }
        other => panic!("expected the memory limit, got {other:?}"),
    }
    assert!(message.contains("memory limit of 16 MiB (tried to grow to "), "{message}");
    assert!(message.contains("limits.memory-mib"), "{message}");
    host_still_works(&runtime);
}

#[test]
fn no_path_leads_out_of_the_staging_tree() {
    let (runtime, _) = runtime();
    let plugin = load_interpreter(&runtime, "test-escape");
    let site = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let staging = site.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(site.path().join("secret"), b"site secret").unwrap();
    std::fs::write(staging.join("inside.txt"), b"inside").unwrap();
    // A symlink already in the tree (e.g. from live content) that points outside it.
    std::os::unix::fs::symlink(outside.path(), staging.join("outside-link")).unwrap();
    let before_site = tree(site.path());
    let before_outside = tree(outside.path());

    // The plugin ignores its commands and reports one outcome per escape attempt (13); the
    // host insists on one report per command, so it is handed 13 placeholders.
    let placeholders =
        (0..13).map(|i| Command::MakeDir { path: format!("unused-{i}"), mode: 0o755 }).collect();
    let reports = plugin.interpreter_session(&staging).unwrap().apply(placeholders).unwrap();
    assert_eq!(reports.len(), 13, "{reports:?}");
    for report in &reports {
        let error = report.outcome.as_ref().expect_err("every escape attempt is refused");
        assert!(
            error.contains("Escape") || error.contains("InvalidPath"),
            "refused as an escape: {error}"
        );
    }

    assert_eq!(
        tree(site.path()),
        before_site,
        "nothing created, moved or removed in or next to the staging tree"
    );
    assert_eq!(tree(outside.path()), before_outside);
    assert_eq!(std::fs::read(site.path().join("secret")).unwrap(), b"site secret");
    assert_eq!(std::fs::read(staging.join("inside.txt")).unwrap(), b"inside");
    host_still_works(&runtime);
}

#[test]
fn commands_with_escaping_paths_are_refused_per_command() {
    let (runtime, _) = runtime();
    let plugin = load_interpreter(&runtime, "interpreter");
    let site = tempfile::tempdir().unwrap();
    let staging = site.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let reports = plugin
        .interpreter_session(&staging)
        .unwrap()
        .apply(vec![
            write("../up.txt", b"x"),
            write("/abs.txt", b"x"),
            Command::Symlink { path: "l".into(), target: "../../etc".into() },
            Command::MakeDir { path: "a/../../b".into(), mode: 0o755 },
            write("fine.txt", b"fine"),
        ])
        .unwrap();
    let outcomes: Vec<bool> = reports.iter().map(|r| r.outcome.is_ok()).collect();
    assert_eq!(outcomes, vec![false, false, false, false, true], "{reports:?}");
    assert_eq!(tree(site.path()), vec!["staging".to_string(), "staging/fine.txt".to_string()]);
}
