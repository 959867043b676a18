//! `--wait`: follows a job until its runs (a distribution and its automatic commit) end, and
//! turns the outcome into the command's exit: done on every server, partial or short of its
//! quorum (3), failed (1).

use std::time::{Duration, Instant};

use cm_manager::model::{Job, JobState, Run, RunPhase, ServerOutcome};
use serde::Serialize;

use crate::client::{CliError, Client};

/// A run of the job with its per-server outcomes.
#[derive(Serialize)]
pub struct RunOutcome {
    pub run: Run,
    pub reports: Vec<(String, ServerOutcome)>,
}

/// How a job ended (or why waiting stopped).
#[derive(Serialize)]
pub struct Finished {
    pub job: Job,
    pub runs: Vec<RunOutcome>,
}

/// The runs of `job`, oldest first, with their reports.
pub async fn runs_of(c: &Client, job: u64) -> Result<Vec<RunOutcome>, CliError> {
    let runs: Vec<Run> = c.get(&format!("runs?job={job}")).await?;
    let mut out = Vec::new();
    for r in runs {
        let detail: serde_json::Value = c.get(&format!("runs/{}", r.id)).await?;
        let reports = serde_json::from_value(detail["reports"].clone())
            .map_err(|e| CliError::Failed(format!("run {}: reports do not decode: {e}", r.id)))?;
        out.push(RunOutcome { run: r, reports });
    }
    Ok(out)
}

/// Whether waiting is over: the job ended, or a run failed and the job waits to retry, or it
/// was deferred before starting (quorum short).
fn settled(j: &Job) -> bool {
    match &j.state {
        JobState::Done | JobState::Cancelled { .. } | JobState::Aborted { .. } => true,
        JobState::Running { .. } => false,
        JobState::Idle => {
            j.pending_commit.is_none()
                && (j.attempts > 0
                    || j.last_reason.as_deref().is_some_and(|r| r.starts_with("deferred:")))
        }
    }
}

/// Polls the job until [`settled`]; prints each run's phase change on stderr unless `quiet`.
pub async fn wait(c: &Client, id: u64, limit: Duration, quiet: bool) -> anyhow::Result<Finished> {
    let end = Instant::now() + limit;
    let mut seen: Vec<(u64, String)> = Vec::new();
    loop {
        let job: Job = c.get(&format!("jobs/{id}")).await?;
        if !quiet && let JobState::Running { run } = job.state {
            let r: serde_json::Value = c.get(&format!("runs/{run}")).await?;
            let segs = r["run"]["segments"].as_object().map_or(0, |s| s.len());
            let reported = r["run"]["segments"]
                .as_object()
                .map_or(0, |s| s.values().filter(|v| v["status"] == "reported").count());
            let line = format!("{reported}/{segs} segments reported");
            if seen.last() != Some(&(run, line.clone())) {
                let what = if r["run"]["commit_of"].is_u64() { "commit" } else { "distribution" };
                eprintln!("  run {run} ({what}): {line}");
                seen.push((run, line));
            }
        }
        if settled(&job) {
            let runs = runs_of(c, id).await?;
            return Ok(Finished { job, runs });
        }
        if Instant::now() > end {
            return Err(CliError::Failed(format!(
                "job {id} is still {} after {limit:?} (it goes on; `cmover job show {id}`)",
                super::job::state_text(&job)
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Finished {
    /// The command's verdict: `Ok` when the job is done and every server of its last run
    /// succeeded.
    pub fn verdict(&self) -> Result<String, CliError> {
        let j = &self.job;
        let last = self.runs.last();
        let tally = last.map(|r| {
            let ok = r.reports.iter().filter(|(_, o)| *o == ServerOutcome::Succeeded).count();
            (ok, r.reports.len())
        });
        let quorum = |s: &str| s.contains("quorum not met");
        match &j.state {
            JobState::Done => match tally {
                Some((ok, n)) if ok < n => Err(CliError::Partial(format!(
                    "job {} done, but only {ok} of {n} servers succeeded (the quorum was met)",
                    j.id
                ))),
                Some((ok, n)) => Ok(format!("job {} done: {ok} of {n} servers succeeded", j.id)),
                None => Ok(format!("job {} done", j.id)),
            },
            JobState::Cancelled { reason } if quorum(reason) => {
                Err(CliError::Partial(format!("job {} cancelled: {reason}", j.id)))
            }
            JobState::Cancelled { reason } => {
                Err(CliError::Failed(format!("job {} cancelled: {reason}", j.id)))
            }
            JobState::Aborted { run, by, .. } => {
                Err(CliError::Failed(format!("job {} aborted by {by} (run {run})", j.id)))
            }
            _ => {
                let reason = j.last_reason.clone().unwrap_or_default();
                let retry = format!(
                    "; it tries again at {} (`cmover job cancel {}` to stop it)",
                    super::utc(j.next_run_ms),
                    j.id
                );
                let failed_run = last.filter(|r| matches!(r.run.phase, RunPhase::Failed { .. }));
                let text = match failed_run {
                    Some(r) => format!("job {}: run {} failed: {reason}{retry}", j.id, r.run.id),
                    None => format!("job {}: {reason}{retry}", j.id),
                };
                Err(if quorum(&reason) { CliError::Partial(text) } else { CliError::Failed(text) })
            }
        }
    }

    /// The runs as a table (run, what, outcome, servers succeeded).
    pub fn print(&self) {
        let rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                let ok = r.reports.iter().filter(|(_, o)| *o == ServerOutcome::Succeeded).count();
                let what = match (r.run.commit_of, r.run.release) {
                    (Some(_), Some(rel)) => format!("commit of release {rel}"),
                    (Some(_), None) => "commit".into(),
                    (None, Some(rel)) => format!("release {rel}"),
                    (None, None) => format!("serial {}", r.run.serial.unwrap_or(0)),
                };
                let outcome = match &r.run.phase {
                    RunPhase::Distributing => "running".to_string(),
                    RunPhase::Succeeded => "succeeded".to_string(),
                    RunPhase::Failed { reason } => format!("failed: {reason}"),
                    RunPhase::Aborted { by, .. } => format!("aborted by {by}"),
                };
                vec![r.run.id.to_string(), what, format!("{ok}/{}", r.reports.len()), outcome]
            })
            .collect();
        super::table(&["RUN", "WHAT", "SERVERS OK", "OUTCOME"], &rows);
        let failed: Vec<String> = self
            .runs
            .last()
            .map(|r| {
                r.reports
                    .iter()
                    .filter_map(|(s, o)| match o {
                        ServerOutcome::Succeeded => None,
                        ServerOutcome::Missing => Some(format!("  {s}: missing")),
                        ServerOutcome::Failed { reason } => Some(format!("  {s}: {reason}")),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !failed.is_empty() {
            println!(
                "servers that did not succeed in run {}:",
                self.runs.last().map_or(0, |r| r.run.id)
            );
            for f in failed {
                println!("{f}");
            }
        }
    }
}
