//! `cmover job create|list|show|cancel|abort|approve`. `cancel` stops a job that is not
//! running; `abort` stops a running one (its run ends `aborted`, nothing of it goes live:
//! [`abort`]; a rolling switch stops and its switched servers go back); `approve` lets a canary
//! go on after its pause.

use std::path::PathBuf;

use anyhow::Context;
use cm_manager::model::{Job, JobState};
use serde_json::{Value, json};

use super::{ago, now_ms, print_json, table, utc};
use crate::client::{CliError, Client, ConnectArgs};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create a job: one-off or recurring, of any kind, with a policy.
    Create(CreateArgs),
    /// List the jobs: state, next run, last reason.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show one job and its runs.
    Show {
        id: u64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Cancel a job that is not running (a running job can be cancelled when its run ends).
    Cancel {
        id: u64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Abort a running job: its run stops, the servers discard the release it prepared and
    /// nothing of it goes live. A commit, rollback or switch in progress is not aborted (it
    /// completes; roll back afterwards). Exit 0 aborted (with --wait: every group leader of
    /// the run stopped it), 1 refused (not running, a commit in progress), 3 with --wait: some
    /// group leader was not reached (its servers discard the release with the next run),
    /// 4 manager unreachable.
    Abort {
        id: u64,
        /// Wait until every group leader of the run answered (or was given up on).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Approve a canary's pause: the rest of the servers go live, group by group.
    Approve {
        id: u64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Kind {
    Publish,
    Replicate,
    Synchronize,
    Commit,
    Rollback,
    /// Destructive: removes the site's content from --servers (default: the whole group).
    Remove,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The hosted site (ignored with --spec).
    #[arg(required_unless_present = "spec")]
    pub site: Option<String>,
    /// What the job does; its payload follows from it (publish: the staging tree; replicate:
    /// the live release; synchronize: servers that missed runs catch up to live; commit: the
    /// prepared release; rollback; remove: the site's content off --servers, destructive).
    #[arg(long, value_enum, default_value = "publish")]
    pub kind: Kind,
    /// Send this ready-made assignment file (on the manager's machine) instead.
    #[arg(long)]
    pub file: Option<String>,
    /// commit: the release to make live.
    #[arg(long)]
    pub serial: Option<u64>,
    /// replicate, synchronize, remove: only these servers of the group (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Repeat every this many seconds after a successful run.
    #[arg(long)]
    pub every: Option<u64>,
    /// First run at this time (ms since the epoch; default now).
    #[arg(long, default_value_t = 0)]
    pub start_at_ms: u64,
    /// The policy as JSON; fields left out take their defaults (docs/api.md), e.g.
    /// '{"quorum":{"min_percent":50},"commit":"manual"}'.
    #[arg(long)]
    pub policy: Option<String>,
    /// The job's name (default: the kind and the site).
    #[arg(long)]
    pub name: Option<String>,
    /// Send this JSON job spec (a file, or - for stdin) as it is, instead of the flags above.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Wait for the job's runs to end and exit by outcome.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl CreateArgs {
    fn spec(&self) -> anyhow::Result<Value> {
        if let Some(path) = &self.spec {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading the spec from stdin")?
            } else {
                std::fs::read_to_string(path)
                    .map_err(|e| CliError::Usage(format!("reading {}: {e}", path.display())))?
            };
            return Ok(serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{} is not JSON: {e}", path.display())))?);
        }
        let site = self.site.clone().unwrap_or_default();
        let (kind, payload) = match (self.kind, &self.file) {
            (k, Some(path)) => (k, json!({ "type": "file", "path": path })),
            (Kind::Publish, None) => (Kind::Publish, json!({ "type": "staging" })),
            (Kind::Synchronize, None) => {
                (Kind::Synchronize, json!({ "type": "catch_up", "servers": self.servers }))
            }
            (Kind::Remove, None) => {
                (Kind::Remove, json!({ "type": "remove", "servers": self.servers }))
            }
            (Kind::Replicate, None) => {
                (Kind::Replicate, json!({ "type": "live", "servers": self.servers }))
            }
            (Kind::Commit, None) => {
                (Kind::Commit, json!({ "type": "commit", "serial": self.serial }))
            }
            (Kind::Rollback, None) => (Kind::Rollback, json!({ "type": "rollback" })),
        };
        let kind = format!("{kind:?}").to_lowercase();
        let policy: Value = match &self.policy {
            Some(p) => serde_json::from_str(p)
                .map_err(|e| CliError::Usage(format!("--policy is not JSON: {e}")))?,
            None => json!({}),
        };
        Ok(json!({
            "name": self.name.clone().unwrap_or_else(|| format!("{kind} {site}")),
            "kind": kind,
            "site": site,
            "payload": payload,
            "start_at_ms": self.start_at_ms,
            "every_ms": self.every.map(|s| s * 1000),
            "policy": policy,
        }))
    }
}

/// A job's state in words.
pub fn state_text(j: &Job) -> String {
    match &j.state {
        JobState::Idle if j.pending_commit.is_some() => "committing".into(),
        JobState::Idle => "idle".into(),
        JobState::Running { run } => format!("running (run {run})"),
        JobState::Done => "done".into(),
        JobState::Cancelled { .. } => "cancelled".into(),
        JobState::Aborted { run, .. } => format!("aborted (run {run})"),
    }
}

fn kind_text(j: &Job) -> String {
    serde_json::to_value(j.spec.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create(a) => {
            let c = Client::connect(&a.connect)?;
            let spec = a.spec()?;
            let job: Job = c.post("jobs", &spec).await?;
            super::publish::submitted(&c, job, a.wait, a.timeout).await
        }
        Command::List { connect } => {
            let c = Client::connect(&connect)?;
            let jobs: Vec<Job> = c.get("jobs").await?;
            if c.json {
                return print_json(&jobs);
            }
            let now = now_ms();
            let rows: Vec<Vec<String>> = jobs
                .iter()
                .map(|j| {
                    let next = match j.state {
                        JobState::Idle => ago(j.next_run_ms, now),
                        _ => "-".into(),
                    };
                    vec![
                        j.id.to_string(),
                        j.spec.name.clone(),
                        kind_text(j),
                        j.spec.site.clone(),
                        state_text(j),
                        next,
                        j.spec.every_ms.map_or("once".into(), |e| format!("every {}s", e / 1000)),
                        j.last_reason.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &["ID", "NAME", "KIND", "SITE", "STATE", "NEXT RUN", "REPEAT", "LAST REASON"],
                &rows,
            );
            Ok(())
        }
        Command::Show { id, connect } => {
            let c = Client::connect(&connect)?;
            let job: Job = c.get(&format!("jobs/{id}")).await?;
            let runs = super::wait::runs_of(&c, id).await?;
            if c.json {
                return print_json(&json!({ "job": job, "runs": runs }));
            }
            let p = &job.spec.policy;
            let fields = [
                ("job", format!("{} ({})", job.id, job.spec.name)),
                ("kind", kind_text(&job)),
                ("site", job.spec.site.clone()),
                ("payload", serde_json::to_string(&job.spec.payload)?),
                ("state", state_text(&job)),
                ("next run", utc(job.next_run_ms)),
                (
                    "repeat",
                    job.spec.every_ms.map_or("once".into(), |e| format!("every {} s", e / 1000)),
                ),
                ("attempts", job.attempts.to_string()),
                ("last reason", job.last_reason.clone().unwrap_or_else(|| "-".into())),
                (
                    "policy",
                    format!(
                        "quorum {}% (at least {}), commit {}, on failure {}, timeout {} s",
                        p.quorum.min_percent,
                        p.quorum.min_servers,
                        serde_json::to_value(p.commit)?.as_str().unwrap_or("?"),
                        serde_json::to_string(&p.on_failure)?,
                        p.run_timeout_ms / 1000
                    ),
                ),
            ];
            for (k, v) in fields {
                println!("{k:<12} {v}");
            }
            if let Some(pc) = &job.pending_commit {
                println!(
                    "{:<12} release {} from run {}",
                    "to commit", pc.release, pc.distributed_by
                );
            }
            println!();
            let done = super::wait::Finished { job, runs };
            done.print();
            Ok(())
        }
        Command::Cancel { id, connect } => {
            let c = Client::connect(&connect)?;
            let job: Job = c.post(&format!("jobs/{id}/cancel"), &json!({})).await?;
            if c.json {
                return print_json(&job);
            }
            println!("job {id} cancelled");
            Ok(())
        }
        Command::Approve { id, connect } => {
            let c = Client::connect(&connect)?;
            let job: Job = c.post(&format!("jobs/{id}/approve"), &json!({})).await?;
            if c.json {
                return print_json(&job);
            }
            println!("job {id}: canary approved, the rest goes live");
            Ok(())
        }
        Command::Abort { id, wait, timeout, connect } => {
            let c = Client::connect(&connect)?;
            abort(&c, id, wait.then(|| std::time::Duration::from_secs(timeout))).await
        }
    }
}

/// `cmover job abort ID [--wait]`: asks the manager to abort; with `wait`, follows the run's
/// history until each of its group leaders stopped the run or was given up on.
async fn abort(c: &Client, id: u64, wait: Option<std::time::Duration>) -> anyhow::Result<()> {
    use cm_manager::abort::{LEADER_NOT_TOLD, LEADER_STOPPED};
    let job: Job = c.post(&format!("jobs/{id}/abort"), &json!({})).await?;
    if let Some(roll) = job.roll.as_ref().filter(|r| r.aborted.is_some()) {
        if c.json {
            return print_json(&job);
        }
        let back =
            roll.previous.map_or("the release live before".into(), |p| format!("release {p}"));
        println!("job {id}: its rolling switch stops; switched servers go back to {back}");
        return Ok(());
    }
    let JobState::Aborted { run, .. } = job.state else {
        return Err(
            CliError::Failed(format!("job {id} is {} after the abort", state_text(&job))).into()
        );
    };
    let Some(limit) = wait else {
        if c.json {
            return print_json(&job);
        }
        println!("job {id} aborted: {}", job.last_reason.clone().unwrap_or_default());
        return Ok(());
    };
    let detail: Value = c.get(&format!("runs/{run}")).await?;
    let leaders = detail["run"]["segments"].as_object().map_or(0, |s| s.len());
    let end = std::time::Instant::now() + limit;
    let (stopped, not_told) = loop {
        let lines: Vec<cm_manager::model::HistoryEntry> =
            c.get(&format!("history?run={run}")).await?;
        let count = |what: &str| lines.iter().filter(|l| l.event.contains(what)).count();
        let (stopped, not_told) = (count(LEADER_STOPPED), count(LEADER_NOT_TOLD));
        if stopped + not_told >= leaders {
            break (stopped, not_told);
        }
        if std::time::Instant::now() > end {
            return Err(CliError::Partial(format!(
                "job {id} aborted; after {limit:?} {stopped} of {leaders} group leaders confirmed \
                 stopping run {run} (`cmover history --run {run}`)"
            ))
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    if c.json {
        print_json(
            &json!({ "job": job, "leaders": leaders, "stopped": stopped, "not_told": not_told }),
        )?;
    } else {
        println!(
            "job {id} aborted: run {run} stopped by {stopped} of {leaders} group leaders; \
             nothing of it goes live"
        );
    }
    if not_told > 0 {
        return Err(CliError::Partial(format!(
            "{not_told} group leaders of run {run} were not reached: their servers discard the \
             release when the next run reaches them"
        ))
        .into());
    }
    Ok(())
}
