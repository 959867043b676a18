//! `cmover publish SITE`, `cmover commit SITE [--serial N]`, `cmover rollback SITE [--to N]`,
//! `cmover hot SITE PATH... (--servers A,B | --count N)`:
//! each submits one job to the manager and, with `--wait`, follows it to its end and exits by
//! its outcome (see [`super::wait`]).

use std::time::Duration;

use cm_manager::model::Job;
use serde_json::{Value, json};

use crate::client::{Client, ConnectArgs};

/// What every job-submitting command takes.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// The hosted site.
    pub site: String,
    /// Wait for the job's runs (a publish and its automatic commit) to end; exit by outcome.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this many seconds (the job goes on).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// The job's name (default: the command and the site).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Servers of the content group that must be live, and succeed, in percent.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub quorum: Option<u8>,
    /// Leave the release prepared instead of committing it (then `cmover commit SITE`).
    #[arg(long)]
    pub manual_commit: bool,
    /// Servers short of the space the run needs: `fail` the run before it distributes
    /// (default), `skip` them (they count as failed), or `wait` for them (see --space-wait).
    #[arg(long, value_parser = ["fail", "skip", "wait"])]
    pub space_policy: Option<String>,
    /// With --space-policy wait: how long to wait for space, in seconds (default 600).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub space_wait: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The release to make live (default: the newest prepared one).
    #[arg(long)]
    pub serial: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The release to go back to (default: the one committed before live).
    #[arg(long)]
    pub to: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct HotArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Files of the staging tree (relative to it) that go to the servers as hot content.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// The servers that get them (comma-separated; servers of the content group).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "count",
        required_unless_present = "count"
    )]
    pub servers: Vec<String>,
    /// How many servers get them: the manager picks live, up-to-date ones, spread over segments.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
}

pub async fn hot(a: HotArgs) -> anyhow::Result<()> {
    let mut payload = json!({ "type": "hot", "paths": a.paths });
    if let Some(n) = a.count {
        payload["count"] = n.into();
    } else {
        payload["servers"] = json!(a.servers);
    }
    submit(a.job, "hot", payload, json!({})).await
}

pub async fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let mut policy = serde_json::Map::new();
    if let Some(q) = a.quorum {
        policy.insert("quorum".into(), json!({ "min_percent": q }));
    }
    if a.manual_commit {
        policy.insert("commit".into(), json!("manual"));
    }
    let mut space = serde_json::Map::new();
    if let Some(on_short) = a.space_policy {
        space.insert("on_short".into(), json!(on_short));
    }
    if let Some(secs) = a.space_wait {
        space.insert("wait_ms".into(), json!(secs * 1000));
    }
    if !space.is_empty() {
        policy.insert("space".into(), Value::Object(space));
    }
    submit(a.job, "publish", json!({ "type": "staging" }), Value::Object(policy)).await
}

pub async fn commit(a: CommitArgs) -> anyhow::Result<()> {
    submit(a.job, "commit", json!({ "type": "commit", "serial": a.serial }), json!({})).await
}

pub async fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let mut payload = json!({ "type": "rollback" });
    if let Some(to) = a.to {
        payload["to"] = to.into();
    }
    submit(a.job, "rollback", payload, json!({})).await
}

async fn submit(a: JobArgs, kind: &str, payload: Value, policy: Value) -> anyhow::Result<()> {
    let c = Client::connect(&a.connect)?;
    let spec = json!({
        "name": a.name.clone().unwrap_or_else(|| format!("{kind} {}", a.site)),
        "kind": kind,
        "site": a.site,
        "payload": payload,
        "policy": policy,
    });
    let job: Job = c.post("jobs", &spec).await?;
    submitted(&c, job, a.wait, a.timeout).await
}

/// After a job was created: print it, or wait for it and print how it ended.
pub async fn submitted(c: &Client, job: Job, wait: bool, timeout: u64) -> anyhow::Result<()> {
    if !wait {
        if c.json {
            return super::print_json(&job);
        }
        println!("job {} created ({} of site {})", job.id, job.spec.name, job.spec.site);
        println!("follow it with `cmover job show {}`", job.id);
        return Ok(());
    }
    if !c.json {
        eprintln!("job {} created ({}); waiting for its runs", job.id, job.spec.name);
    }
    let done = super::wait::wait(c, job.id, Duration::from_secs(timeout), c.json).await?;
    if c.json {
        super::print_json(&done)?;
    } else {
        done.print();
    }
    let verdict = done.verdict()?;
    if !c.json {
        println!("{verdict}");
    }
    Ok(())
}
