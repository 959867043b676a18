//! Aborting a running job (`POST /api/v1/jobs/{id}/abort`, the console's Abort button).
//!
//! What an abort does, in order:
//! 1. One transaction: the run becomes `aborted` (who, when), the job `aborted` with no release
//!    waiting for a commit, and the history says so. From then on nothing of the run is
//!    scheduled: the run is out of the scheduler's running set, the manager's forwarding slots
//!    and `GET /dist/{run}/blob` end, "next"/"reparent" find no run, and a late segment report
//!    is ignored ([`Inner::finish`] and [`Inner::segment_report`] leave an ended run alone).
//! 2. The run's monitor ([`Inner::stop_leaders`]) sends every GL of the run the manager's signed
//!    [`AbortOrder`] (`POST /abort` on the GL): the GL stops its fetch, forwarding and MCTP
//!    session and discards what the run prepared on its servers. Each GL's answer, or that it
//!    could not be reached, goes into the history.
//!
//! The commit of an aborted run is never sent, so nothing of it goes live anywhere; a server
//! that missed the order discards the prepared release when its GL hands it the next run.
//!
//! A run that changes live (a commit, rollback or switch run) is not aborted: it switches each
//! server atomically and is over in moments, so an abort could only leave some servers switched
//! and others not. The abort is refused (409); the operator lets it complete, then rolls back.

use std::sync::Arc;
use std::time::Duration;

use cm_tree::abort::AbortOrder;
use cm_tree::http::{self, Body, PeerRole};
use hyper::{Request, Response, StatusCode};
use thiserror::Error;

use crate::db::DbError;
use crate::model::{Job, JobState, Payload, Run, RunPhase};
use crate::server::{Inner, ManagerError};
use crate::writes::WriteError;

/// Why an abort was refused.
#[derive(Debug, Error)]
pub enum AbortError {
    /// No such job (404).
    #[error("no job {0}")]
    NoJob(u64),
    /// The job is in a state an abort does not apply to, or its run changes live (409).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Failed(#[from] ManagerError),
}

impl From<DbError> for AbortError {
    fn from(e: DbError) -> AbortError {
        AbortError::Failed(e.into())
    }
}

/// The history says this when a GL stopped an aborted run (`cmover job abort --wait` counts it).
pub const LEADER_STOPPED: &str = "stopped the aborted run";
/// … and this when the manager gave up telling a GL.
pub const LEADER_NOT_TOLD: &str = "was not told of the abort";

/// How many times the manager offers a GL the order before it gives up on it (the GL's
/// servers then discard the release with the next run).
const ORDER_ATTEMPTS: u32 = 5;

/// The job's state in words, for a refusal.
fn state_words(j: &Job) -> String {
    match &j.state {
        JobState::Idle if j.pending_commit.is_some() => {
            "idle (its release waits for the commit run; cancel the job instead)".into()
        }
        JobState::Idle => "idle (nothing is running; cancel the job instead)".into(),
        JobState::Running { run } => format!("running run {run}"),
        JobState::Done => "done".into(),
        JobState::Cancelled { reason } => format!("cancelled ({reason})"),
        JobState::Aborted { run, by, .. } => format!("aborted already (run {run}, by {by})"),
    }
}

/// Whether `run` of `job` switches live on the servers (a commit, rollback or switch).
fn changes_live(job: &Job, run: &Run) -> Option<&'static str> {
    if run.commit_of.is_some() {
        return Some("commit");
    }
    match job.spec.payload {
        Payload::Commit { .. } => Some("commit"),
        Payload::Rollback { .. } => Some("rollback"),
        Payload::Switch { .. } => Some("switch"),
        _ => None,
    }
}

/// The order the manager sends the GLs for an aborted run. Deterministic (Ed25519 signatures
/// are), so the order sent again after a restart is the same bytes.
pub(crate) fn order_for(m: &Inner, run: &Run) -> Option<AbortOrder> {
    let RunPhase::Aborted { by, at_ms } = &run.phase else { return None };
    let mut o = AbortOrder {
        run: run.id,
        reason: format!("run {} aborted by {by}", run.id),
        issued_ms: *at_ms,
        signature: None,
    };
    if let Some(k) = &m.cfg.signer {
        o.sign(k);
    }
    Some(o)
}

/// `POST /api/v1/jobs/{id}/abort` (the operator role is checked already): `200` with the job,
/// `404` no such job, `409` naming the job's state or the commit in progress.
pub(crate) fn answer<B>(m: &Inner, id: u64, req: &Request<B>, now: u64) -> Response<Body> {
    let by = if req.extensions().get::<PeerRole>().is_some() {
        "an operator (client certificate)"
    } else {
        "an operator (bearer token)"
    };
    match m.abort_job(id, by, now) {
        Ok(job) => http::json(StatusCode::OK, &job),
        Err(AbortError::NoJob(_)) => http::error(StatusCode::NOT_FOUND, &format!("no job {id}")),
        Err(e @ AbortError::Conflict(_)) => http::error(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The console's Abort button (operator session, CSRF checked): the message for the jobs page.
pub(crate) fn from_console(m: &Inner, id: &str) -> Result<String, WriteError> {
    let id: u64 =
        id.parse().map_err(|_| ManagerError::Invalid(format!("`{id}` is not a job id")))?;
    match m.abort_job(id, "an operator (console)", crate::now_ms()) {
        Ok(j) => Ok(format!("Job {id} aborted: {}", j.last_reason.unwrap_or_default())),
        Err(AbortError::NoJob(_)) => Err(ManagerError::NotFound(format!("no job {id}")).into()),
        Err(AbortError::Conflict(why)) => Err(ManagerError::Invalid(why).into()),
        Err(AbortError::Failed(e)) => Err(e.into()),
    }
}

impl Inner {
    /// Aborts job `id`'s running run on behalf of `by` (who and how they authenticated).
    /// Returns the job as it is now; the GLs are told by the run's monitor.
    pub(crate) fn abort_job(&self, id: u64, by: &str, now: u64) -> Result<Job, AbortError> {
        if let Some(job) = self.abort_roll(id, by, now)? {
            return Ok(job);
        }
        let (job, run) = self.db.write(|t| {
            let mut job = self.db.job(id)?.ok_or(AbortError::NoJob(id))?;
            let JobState::Running { run: run_id } = job.state else {
                return Err(AbortError::Conflict(format!(
                    "job {id} is not running: it is {}",
                    state_words(&job)
                )));
            };
            let mut run = self.db.run(run_id)?.ok_or_else(|| {
                AbortError::Conflict(format!("job {id}: run {run_id} is not recorded yet"))
            })?;
            if run.phase != RunPhase::Distributing {
                return Err(AbortError::Conflict(format!(
                    "job {id}: run {run_id} is ending already ({:?})",
                    run.phase
                )));
            }
            if let Some(what) = changes_live(&job, &run) {
                return Err(AbortError::Conflict(format!(
                    "job {id}: run {run_id} is a {what} in progress, which switches live on each \
                     server at once and is not stopped half-way; it completes, then roll back \
                     (cmover rollback {})",
                    job.spec.site
                )));
            }
            run.phase = RunPhase::Aborted { by: by.to_string(), at_ms: now };
            t.put_run(&run)?;
            job.state = JobState::Aborted { run: run_id, by: by.to_string(), at_ms: now };
            job.pending_commit = None;
            let release = match run.release.or(run.serial) {
                Some(r) => format!("release {r}"),
                None => "what it prepared".to_string(),
            };
            let line = format!(
                "aborted by {by}: run {run_id} stopped; {release} is discarded on every server \
                 and never committed"
            );
            job.last_reason = Some(line.clone());
            t.put_job(&job)?;
            t.log(now, Some(id), Some(run_id), line)?;
            Ok((job, run))
        })?;
        let _ = std::fs::remove_file(self.run_file(run.id));
        if let Some(active) = self.forget_run(run.id) {
            // Wakes the forwarding slots (they find no run) and the monitor (it tells the GLs).
            active.changed.notify_waiters();
        } else {
            tracing::warn!(run = run.id, "aborted run had no monitor: its GLs are not told");
        }
        Ok(job)
    }

    /// Sends every GL of the aborted `run` the manager's signed order, and records each answer.
    pub(crate) async fn stop_leaders(self: &Arc<Self>, run: &Run) {
        let Some(order) = order_for(self, run) else { return };
        let mut calls = tokio::task::JoinSet::new();
        for (segment, s) in &run.segments {
            let (me, order, segment, leader) =
                (self.clone(), order.clone(), segment.clone(), s.leader.clone());
            let url = format!("{}/abort", self.client.base_url(&s.address));
            calls.spawn(async move {
                let mut last = String::new();
                for attempt in 0..ORDER_ATTEMPTS {
                    match me.client.post::<_, serde_json::Value>(&url, &order).await {
                        Ok(_) => {
                            return format!(
                                "group leader {leader} of segment {segment} {LEADER_STOPPED} {} \
                                 and discards its release",
                                order.run
                            );
                        }
                        Err(e) => last = e.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                format!(
                    "group leader {leader} of segment {segment} {LEADER_NOT_TOLD} ({last}); its \
                     servers discard the release when the next run reaches them"
                )
            });
        }
        while let Some(r) = calls.join_next().await {
            let Ok(line) = r else { continue };
            let now = crate::now_ms();
            if let Err(e) = self.db.write(|t| t.log(now, Some(run.job), Some(run.id), line.clone()))
            {
                tracing::error!(run = run.id, "recording the abort: {e}");
            }
        }
    }
}
