//! End to end with real processes: a corrupted assignment (its data part damaged after signing,
//! before the manager computed the transfer manifest, so the tree carries it faithfully) is
//! stopped before anything applies it: each group leader checks a run against its signed header
//! before relaying it, every server is reported failed with the reason, and live is untouched.

use std::fs;

use cm_assignment::{AssignmentType, BuildOptions, SigningKey, build};
use cm_manager::model::{JobKind, JobState, Payload, ServerOutcome};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_assignment_is_rejected_reported_and_live_untouched() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>good</h1>").unwrap();
    let c = TestCluster::start(&Layout::new(2, 1, 3), src.path()).await.unwrap();
    c.run_ok(JobKind::Publish, Payload::Staging).await.unwrap();
    c.run_ok(JobKind::Commit, Payload::Commit { serial: None }).await.unwrap();
    let live = observe(&c.staging);

    // A full release 50 of other content, then one byte flipped in its middle.
    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join("index.html"), "<h1>evil</h1>".repeat(200)).unwrap();
    fs::write(
        other.path().join("data.bin"),
        (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let file = other.path().join("bad.cma");
    // Signed with the manager's key (as `cmover assignment build --signing-key` would), so the
    // manager sends it as it is instead of checking it and refusing to sign it.
    let mut opts = BuildOptions::new(AssignmentType::Replicate, 50);
    opts.signer = Some(SigningKey::load(&c.manager.signing_key_file).unwrap());
    build(other.path(), None, &file, &opts).unwrap();
    // The flip lands in the data part (the file's tail): header, body and trailer stay as
    // signed, so only a server's check of the data hash can catch it.
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    fs::write(&file, &bytes).unwrap();

    let job = c
        .submit(JobKind::Publish, Payload::File { path: file.display().to_string() }, 100)
        .await
        .unwrap();
    let (j, reports) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert!(
        matches!(j.state, JobState::Cancelled { .. }),
        "a run nobody applied must fail: {:?}",
        j.state
    );
    assert_eq!(reports.len(), c.agents.len(), "{reports:?}");
    for (server, outcome) in &reports {
        match outcome {
            ServerOutcome::Failed { reason } => assert!(
                reason.contains("corrupted")
                    && (reason.contains("refused by the group leader")
                        || reason.contains("live unchanged")),
                "{server}: {reason}"
            ),
            other => panic!("{server}: {other:?}, expected a failure with its reason"),
        }
    }
    for a in &c.agents {
        assert_eq!(observe(&a.site_root.join("current")), live, "{}: live changed", a.spec.name);
        assert!(
            !a.site_root.join("releases/50").exists(),
            "{}: a release of the corrupt assignment was kept",
            a.spec.name
        );
        // The publish and commit before it applied; nothing after them did.
        let st = a.status().unwrap();
        let applied = st["applied"].as_array().unwrap();
        assert!(applied[2..].iter().all(|r| r["ok"] == false), "{}: {st}", a.spec.name);
    }
}
