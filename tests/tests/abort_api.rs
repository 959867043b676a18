//! `POST /api/v1/jobs/{id}/abort` against an in-process manager, with job and run records
//! written straight into its store: which states are refused (409 naming the state, 404 for no
//! job), that a commit in progress is never aborted half-way, that only the operator role
//! reaches the endpoint, and what an accepted abort writes (job and run `aborted`, the history).

use std::collections::BTreeMap;
use std::time::Duration;

use cm_manager::db::DbError;
use cm_manager::model::{Job, JobKind, JobSpec, JobState, Payload, Run, RunPhase};
use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::manifest::Manifest;
use serde_json::{Value, json};

fn status_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Status { status, body, .. }) => (status.as_u16(), body),
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

/// A job of `kind` stored as running run `run` (with `commit_of`), as the scheduler leaves it.
fn running(m: &Manager, kind: JobKind, payload: Payload, commit_of: Option<u64>) -> (u64, u64) {
    m.db()
        .write(|t| {
            let spec = JobSpec {
                name: format!("{kind:?}"),
                kind,
                site: "www".into(),
                payload: payload.clone(),
                start_at_ms: u64::MAX,
                every_ms: None,
                policy: Default::default(),
            };
            let mut j = t.insert_job(spec, 0)?;
            let run = t.next_run_id()?;
            j.state = JobState::Running { run };
            t.put_job(&j)?;
            t.put_run(&Run {
                id: run,
                job: j.id,
                started_ms: 1,
                deadline_ms: u64::MAX,
                phase: RunPhase::Distributing,
                serial: Some(7),
                release: Some(7),
                commit_of,
                cache: None,
                manifest: Manifest::of_bytes(b"assignment", 1024),
                disk_needed: 10,
                segments: BTreeMap::new(),
            })?;
            Ok::<_, DbError>((j.id, run))
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_refused_where_it_cannot_apply_and_recorded_where_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::new(dir.path().to_path_buf(), "op-token", "agent-token");
    cfg.tick = Duration::from_secs(3600);
    let m = Manager::start(cfg).await.unwrap();
    let op = JsonClient::new("op-token", Duration::from_secs(5));
    let agent = JsonClient::new("agent-token", Duration::from_secs(5));
    let url = |p: &str| format!("{}/api/v1/{p}", m.url());

    // No job: 404.
    assert_eq!(status_of(op.post::<_, Value>(&url("jobs/99/abort"), &json!({})).await).0, 404);

    // A commit in progress is not stopped half-way: 409, and it goes on.
    let (commit_job, commit_run) = running(&m, JobKind::Publish, Payload::Staging, Some(1));
    let (code, body) =
        status_of(op.post::<_, Value>(&url(&format!("jobs/{commit_job}/abort")), &json!({})).await);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("commit in progress") && body.contains("roll back"), "{body}");
    assert_eq!(m.db().run(commit_run).unwrap().unwrap().phase, RunPhase::Distributing);
    // So is a rollback (it switches live too).
    let (rb_job, _) = running(&m, JobKind::Rollback, Payload::Rollback { to: None }, None);
    let (code, body) =
        status_of(op.post::<_, Value>(&url(&format!("jobs/{rb_job}/abort")), &json!({})).await);
    assert!(code == 409 && body.contains("rollback in progress"), "{code} {body}");

    // A distribution: the agent token does not reach the endpoint; the operator's aborts it.
    let (job, run) = running(&m, JobKind::Publish, Payload::Staging, None);
    let abort = url(&format!("jobs/{job}/abort"));
    assert_eq!(status_of(agent.post::<_, Value>(&abort, &json!({})).await).0, 404);
    assert_eq!(
        status_of(
            JsonClient::new("wrong", Duration::from_secs(5))
                .post::<_, Value>(&abort, &json!({}))
                .await
        )
        .0,
        401
    );
    assert!(matches!(m.db().job(job).unwrap().unwrap().state, JobState::Running { .. }));
    let mut events = m.db().events().subscribe();
    let j: Job = op.post(&abort, &json!({})).await.unwrap();
    // The abort's writes are on the event bus (the console and `cmover run show` follow it).
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push((e.kind, e.data.to_string()));
    }
    assert!(seen.iter().any(|(k, d)| *k == "run" && d.contains("\"aborted\"")), "{seen:?}");
    assert!(seen.iter().any(|(k, d)| *k == "job" && d.contains("\"aborted\"")), "{seen:?}");
    assert!(seen.iter().any(|(k, d)| *k == "history" && d.contains("aborted by")), "{seen:?}");
    match &j.state {
        JobState::Aborted { run: r, by, at_ms } => {
            assert_eq!(*r, run);
            assert_eq!(by, "an operator (bearer token)");
            assert!(*at_ms > 0);
        }
        other => panic!("{other:?}"),
    }
    let r = m.db().run(run).unwrap().unwrap();
    assert!(matches!(&r.phase, RunPhase::Aborted { by, .. } if by.contains("operator")), "{r:?}");
    let history = m.db().history().unwrap();
    assert!(
        history.iter().any(|h| h.run == Some(run)
            && h.event.contains("aborted by an operator (bearer token)")
            && h.event.contains("release 7 is discarded on every server and never committed")),
        "{history:?}"
    );

    // Not running any more: 409 naming the state (and an idle job's too).
    let (code, body) = status_of(op.post::<_, Value>(&abort, &json!({})).await);
    assert!(code == 409 && body.contains("aborted already"), "{code} {body}");
    let idle: Job = m
        .db()
        .write(|t| {
            t.insert_job(
                JobSpec {
                    name: "later".into(),
                    kind: JobKind::Publish,
                    site: "www".into(),
                    payload: Payload::Staging,
                    start_at_ms: u64::MAX,
                    every_ms: None,
                    policy: Default::default(),
                },
                0,
            )
        })
        .unwrap();
    let (code, body) =
        status_of(op.post::<_, Value>(&url(&format!("jobs/{}/abort", idle.id)), &json!({})).await);
    assert!(code == 409 && body.contains("is not running: it is idle"), "{code} {body}");
    m.shutdown().await;
}
