//! Checkpoints end to end, with a real manager and real agents: a checkpoint of the live
//! release, a later publish, then a restore job brings every server back to the checkpoint's
//! content as a new, committed release (a delta against live); snapshots name the checkpoint
//! they follow; a damaged archive fails the restore with the reason and leaves live as it was;
//! `keep_checkpoints` prunes the oldest; delete; a scheduled `checkpoint` job; bad requests
//! refused up front.

use std::fs;
use std::time::Duration;

use cm_manager::model::{
    Checkpoint, Job, JobKind, JobSpec, JobState, Payload, ServerOutcome, SnapshotInfo,
};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use cm_tests::observe;
use hyper::Method;
use serde_json::{Value, json};

fn write(root: &std::path::Path, files: &[(&str, &str)]) {
    for (p, content) in files {
        let full = root.join(p);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(full, content).unwrap();
    }
}

async fn wait_job(c: &TestCluster, id: u64, until: impl Fn(&JobState) -> bool) -> Job {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let j: Job = c.op.get(&c.url(&format!("jobs/{id}"))).await.unwrap();
        if until(&j.state) {
            return j;
        }
        assert!(
            std::time::Instant::now() < end,
            "job {id} still {:?}: {:?}",
            j.state,
            j.last_reason
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_restore_damage_prune_delete_and_schedule() {
    let src = tempfile::tempdir().unwrap();
    let big: String = (0..4000).map(|i| format!("line {i} of a page that stays\n")).collect();
    write(
        src.path(),
        &[("index.html", "<h1>first</h1>"), ("css/site.css", "body{}"), ("big.txt", &big)],
    );
    let c = TestCluster::start(&Layout::new(160, 1, 2), src.path()).await.unwrap();
    let cps = c.url("sites/www/checkpoints");
    // Nothing live yet: no checkpoint (409), and nothing stored.
    let e = c.op.post::<_, Value>(&cps, &json!({})).await.unwrap_err();
    assert!(e.to_string().contains("409"), "{e}");

    c.publish_committed_everywhere().await.unwrap();
    let v1 = observe(&c.staging);
    let cp1: Checkpoint = c.op.post(&cps, &json!({ "note": "first" })).await.unwrap();
    assert_eq!((cp1.id, cp1.note.as_deref()), (1, Some("first")));
    assert!(cp1.size > 0 && cp1.blake3.len() == 64 && cp1.entries == 4, "{cp1:?}");
    let archive = c.dir.path().join("manager/checkpoints/www/1.cma");
    assert_eq!(blake3::hash(&fs::read(&archive).unwrap()).to_hex().as_str(), cp1.blake3);
    assert!(cp1.size < big.len() as u64, "compressed: {} of {} bytes", cp1.size, big.len());

    // A change goes live; then the restore brings the first content back everywhere.
    write(&c.staging, &[("index.html", "<h1>second</h1>"), ("news.html", "news")]);
    fs::remove_file(c.staging.join("css/site.css")).unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let v2 = observe(&c.staging);
    c.assert_live_everywhere(&v2, "after the second publish");
    let job = c
        .submit_with(JobKind::Restore, Payload::Checkpoint { id: cp1.id }, auto_commit_policy())
        .await
        .unwrap();
    let (j, reports) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?} {reports:?}\n{}", j.last_reason, c.logs());
    assert!(reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded), "{reports:?}");
    c.assert_live_everywhere(&v1, "after restoring checkpoint 1");
    let history: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    let lines: Vec<&str> = history.iter().filter_map(|h| h["event"].as_str()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("restore of checkpoint 1") && l.contains("a delta against live")),
        "the restore travels as a delta: {lines:#?}"
    );
    assert!(lines.iter().any(|l| l.starts_with("restored checkpoint 1 of site www")), "{lines:#?}");
    let site: Vec<Value> = c.op.get(&c.url("sites")).await.unwrap();
    let live = site[0]["committed"].as_array().unwrap().last().unwrap().as_u64().unwrap();
    // Snapshots: each with the checkpoint it follows.
    let snaps: Vec<SnapshotInfo> = c.op.get(&c.url("sites/www/snapshots")).await.unwrap();
    let restored =
        snaps.iter().find(|s| s.release == live).expect("the restored release's snapshot");
    assert_eq!(
        (restored.state.as_str(), restored.follows_checkpoint),
        ("live", Some(1)),
        "{snaps:?}"
    );
    assert!(snaps.iter().all(|s| s.follows_checkpoint == Some(1)), "{snaps:?}");

    // A damaged archive: the restore fails with the reason; live stays as it was.
    let mut bytes = fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&archive, &bytes).unwrap();
    write(&c.staging, &[("index.html", "<h1>third</h1>")]);
    c.publish_committed_everywhere().await.unwrap();
    let v3 = observe(&c.staging);
    let job = c
        .submit_with(JobKind::Restore, Payload::Checkpoint { id: cp1.id }, auto_commit_policy())
        .await
        .unwrap();
    // It fails before any run starts (the archive is checked first).
    let j = wait_job(&c, job.id, |s| matches!(s, JobState::Cancelled { .. })).await;
    let reason = format!("{:?}", j.state);
    assert!(
        matches!(j.state, JobState::Cancelled { .. })
            && reason.contains("checkpoint 1 of site www is damaged"),
        "{reason}"
    );
    c.assert_live_everywhere(&v3, "after the refused restore");

    // keep_checkpoints: 2 → the oldest go, archive and record.
    c.put_site(json!({ "keep_checkpoints": 2 })).await.unwrap();
    let cp2: Checkpoint = c.op.post(&cps, &json!({})).await.unwrap();
    let cp3: Checkpoint = c.op.post(&cps, &json!({ "note": "third" })).await.unwrap();
    let listed: Vec<Checkpoint> = c.op.get(&cps).await.unwrap();
    assert_eq!(listed.iter().map(|c| c.id).collect::<Vec<_>>(), vec![cp2.id, cp3.id]);
    assert!(!archive.exists(), "checkpoint 1's archive is deleted with it");

    // Delete; a second delete is 404.
    let gone: Checkpoint =
        c.op.call::<(), _>(Method::DELETE, &format!("{cps}/{}", cp2.id), None).await.unwrap();
    assert_eq!(gone.id, cp2.id);
    let e =
        c.op.call::<(), Value>(Method::DELETE, &format!("{cps}/{}", cp2.id), None)
            .await
            .unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");

    // A scheduled checkpoint job: no assignment, a new checkpoint.
    let spec = JobSpec {
        name: "nightly".into(),
        kind: JobKind::Checkpoint,
        site: "www".into(),
        payload: Payload::CreateCheckpoint { note: Some("nightly".into()) },
        start_at_ms: 0,
        every_ms: None,
        policy: auto_commit_policy(),
    };
    let job: Job = c.op.post(&c.url("jobs"), &spec).await.unwrap();
    wait_job(&c, job.id, |s| *s == JobState::Done).await;
    let listed: Vec<Checkpoint> = c.op.get(&cps).await.unwrap();
    assert_eq!(listed.last().unwrap().note.as_deref(), Some("nightly"));
    let runs: Vec<Value> = c.op.get(&c.url("runs")).await.unwrap();
    assert!(
        runs.iter().all(|r| r["job"].as_u64() != Some(job.id)),
        "a checkpoint job makes no run"
    );

    // Refused up front: a restore of a checkpoint that does not exist, a payload of the wrong
    // kind, an over-long note, an unknown site.
    let bad = |kind, payload| JobSpec { kind, payload, ..spec.clone() };
    for (s, want) in [
        (
            bad(JobKind::Restore, Payload::Checkpoint { id: 99 }),
            "checkpoint 99 of site www does not exist",
        ),
        (bad(JobKind::Publish, Payload::Checkpoint { id: cp3.id }), "cannot carry a `checkpoint`"),
        (bad(JobKind::Restore, Payload::Staging), "cannot carry a `staging`"),
    ] {
        let e = c.op.post::<_, Value>(&c.url("jobs"), &s).await.unwrap_err().to_string();
        assert!(e.contains("400") && e.contains(want), "{e}");
    }
    let e = c.op.post::<_, Value>(&cps, &json!({ "note": "x".repeat(2000) })).await.unwrap_err();
    assert!(e.to_string().contains("400"), "{e}");
    let e = c.op.get::<Value>(&c.url("sites/nope/checkpoints")).await.unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    let e = c.op.post::<_, Value>(&cps, &json!({ "nope": 1 })).await.unwrap_err();
    assert!(e.to_string().contains("400"), "{e}");

    // The same through `cmover checkpoint`, as an operator runs it.
    let token = c.dir.path().join("secrets/operator.token");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(cm_tests::cmover_bin())
            .arg("checkpoint")
            .args(args)
            .args(["--manager", &c.manager.url])
            .arg("--token-file")
            .arg(&token)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, out) = cli(&["list", "www"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("checkpoint {} of site www", cp3.id)) && out.contains(": third"),
        "{out}"
    );
    let (code, out) = cli(&["restore", "www", &cp3.id.to_string()]);
    assert!(code == Some(0) && out.contains("checkpoint restored"), "{out}");
    let (code, out) = cli(&["create", "www", "--note", "by hand"]);
    assert!(code == Some(0) && out.contains(": by hand"), "{out}");
    c.assert_live_everywhere(&v3, "after the restore by the CLI");
    let (code, out) = cli(&["restore", "www", "99"]);
    assert!(code == Some(1) && out.contains("checkpoint 99 of site www does not exist"), "{out}");
    let out = std::process::Command::new(cm_tests::cmover_bin())
        .args(["checkpoint", "list", "www", "--manager", "http://127.0.0.1:9"])
        .arg("--token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "manager unreachable");
}
