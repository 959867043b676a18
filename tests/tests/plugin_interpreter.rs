//! The default interpreter plugin (built from `plugins/interpreter`) applying real command
//! batches to a temporary site, including the hard-link invariant shared with `cm-site`.

mod plugin_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use cm_assignment::{Command, DeltaOp, MemoryPayload};
use cm_plugin_host::{Interpreter, PluginError, PluginSlot};
use plugin_support::*;

#[test]
fn applies_every_command_kind() {
    let (runtime, _) = runtime();
    let interpreter =
        Interpreter::new(PluginSlot::new(load_interpreter(&runtime, "interpreter")), "www")
            .unwrap();
    let site = tempfile::tempdir().unwrap();
    let staging = site.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("old.txt"), b"0123456789").unwrap();

    let reports = interpreter
        .apply(
            &staging,
            vec![
                Command::MakeDir { path: "docs/img".into(), mode: 0o750 },
                write("docs/index.html", b"<h1>hello</h1>"),
                Command::ApplyDelta {
                    path: "old.txt".into(),
                    base: "old.txt".into(),
                    base_len: 10,
                    base_hash: *blake3::hash(b"0123456789").as_bytes(),
                    mode: 0o600,
                    mtime: 1_600_000_000,
                    ops: vec![
                        DeltaOp::Copy { offset: 0, len: 3 },
                        DeltaOp::Insert { len: 4 },
                        DeltaOp::Copy { offset: 7, len: 3 },
                    ],
                    payload: MemoryPayload::boxed(*b"ABCD"),
                    len: 10,
                    hash: *blake3::hash(b"012ABCD789").as_bytes(),
                },
                Command::Symlink { path: "docs/home.html".into(), target: "index.html".into() },
                write("tmp.txt", b"temporary"),
                Command::Rename { from: "tmp.txt".into(), to: "docs/moved.txt".into() },
                Command::SetMode { path: "docs/moved.txt".into(), mode: 0o640 },
                Command::Remove { path: "docs/img".into(), recursive: false },
                Command::Remove { path: "never-existed".into(), recursive: false },
                write("after-a-failure.txt", b"still applied"),
            ],
        )
        .unwrap();

    let failed: Vec<u32> = reports.iter().filter(|r| r.outcome.is_err()).map(|r| r.index).collect();
    assert_eq!(failed, vec![8], "only the remove of a missing path fails: {reports:?}");
    assert!(reports[8].outcome.as_ref().unwrap_err().contains("never-existed"), "{reports:?}");
    assert_eq!(std::fs::read(staging.join("docs/index.html")).unwrap(), b"<h1>hello</h1>");
    assert_eq!(std::fs::read(staging.join("old.txt")).unwrap(), b"012ABCD789");
    let meta = std::fs::metadata(staging.join("old.txt")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.mtime(), 1_600_000_000);
    assert_eq!(
        std::fs::read_link(staging.join("docs/home.html")).unwrap().to_str(),
        Some("index.html")
    );
    assert_eq!(std::fs::read(staging.join("docs/moved.txt")).unwrap(), b"temporary");
    assert_eq!(
        std::fs::metadata(staging.join("docs/moved.txt")).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    assert!(!staging.join("docs/img").exists());
    assert_eq!(std::fs::read(staging.join("after-a-failure.txt")).unwrap(), b"still applied");
    assert!(
        !tree(&staging).iter().any(|p| p.contains(".cm-new-")),
        "no temporary files left: {:?}",
        tree(&staging)
    );
}

#[test]
fn never_writes_through_a_hard_link_to_live() {
    let (runtime, _) = runtime();
    let interpreter =
        Interpreter::new(PluginSlot::new(load_interpreter(&runtime, "interpreter")), "www")
            .unwrap();
    let site = tempfile::tempdir().unwrap();
    let (live, staging) = (site.path().join("live"), site.path().join("staging"));
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&staging).unwrap();
    for name in ["a.txt", "b.txt", "c.txt"] {
        std::fs::write(live.join(name), format!("live {name}")).unwrap();
        std::fs::set_permissions(live.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::hard_link(live.join(name), staging.join(name)).unwrap();
    }

    let reports = interpreter
        .apply(
            &staging,
            vec![
                write("a.txt", b"new a"),
                Command::ApplyDelta {
                    path: "b.txt".into(),
                    base: "b.txt".into(),
                    base_len: 10,
                    base_hash: *blake3::hash(b"live b.txt").as_bytes(),
                    mode: 0o644,
                    mtime: 0,
                    ops: vec![DeltaOp::Copy { offset: 0, len: 5 }, DeltaOp::Insert { len: 1 }],
                    payload: MemoryPayload::boxed(*b"!"),
                    len: 6,
                    hash: *blake3::hash(b"live !").as_bytes(),
                },
                Command::SetMode { path: "c.txt".into(), mode: 0o600 },
            ],
        )
        .unwrap();
    assert!(reports.iter().all(|r| r.outcome.is_ok()), "{reports:?}");

    assert_eq!(std::fs::read(staging.join("a.txt")).unwrap(), b"new a");
    assert_eq!(std::fs::read(staging.join("b.txt")).unwrap(), b"live !");
    assert_eq!(
        std::fs::metadata(staging.join("c.txt")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for name in ["a.txt", "b.txt", "c.txt"] {
        assert_eq!(
            std::fs::read(live.join(name)).unwrap(),
            format!("live {name}").as_bytes(),
            "live {name} untouched"
        );
        let meta = std::fs::metadata(live.join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644, "live {name} keeps its mode");
        assert_eq!(meta.nlink(), 1, "{name} now has its own inode in staging");
    }
}

#[test]
fn session_streams_batches_then_commits_and_audit_logs_every_command() {
    let (runtime, logs) = runtime();
    let audit = cm_plugin_host::LoadedPlugin::load(
        &runtime,
        &component("audit"),
        interpreter_manifest("audit", 64, 2_000),
        "audit",
    )
    .unwrap();
    let staging = tempfile::tempdir().unwrap();
    let mut session = audit.interpreter_session(staging.path()).unwrap();
    for batch in 0..3 {
        let reports = session
            .apply(vec![
                write(&format!("f{batch}.txt"), b"x"),
                Command::MakeDir { path: format!("d{batch}"), mode: 0o755 },
            ])
            .unwrap();
        assert!(reports.iter().all(|r| r.outcome.is_ok()), "{reports:?}");
    }
    session.commit(7).unwrap();
    let logs = logs.lock().unwrap();
    let lines: Vec<&str> =
        logs.iter().filter(|(p, ..)| p == "audit").map(|(_, _, m)| m.as_str()).collect();
    assert_eq!(lines.len(), 7, "{lines:?}");
    assert!(lines[0].starts_with("audit: write-file f0.txt 644"), "{lines:?}");
    assert!(lines[5].starts_with("audit: make-dir d2 755"), "{lines:?}");
    assert_eq!(lines[6], "audit: commit 7");
}

#[test]
fn refuses_sites_and_worlds_not_granted() {
    let (runtime, _) = runtime();
    let mut manifest = interpreter_manifest("narrow", 64, 1_000);
    manifest.grants.sites = vec!["www".into()];
    let plugin = cm_plugin_host::LoadedPlugin::load(
        &runtime,
        &component("interpreter"),
        manifest,
        "interpreter",
    )
    .unwrap();
    let slot = PluginSlot::new(plugin);
    assert!(Interpreter::new(slot.clone(), "www").is_ok());
    match Interpreter::new(slot, "shop") {
        Err(PluginError::SiteNotGranted { plugin, site }) => {
            assert_eq!((plugin.as_str(), site.as_str()), ("narrow", "shop"))
        }
        other => panic!("expected SiteNotGranted, got {:?}", other.err()),
    }
}
