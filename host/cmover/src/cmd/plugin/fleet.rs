//! `cmover plugin publish FILE --manifest M --group G [--canary N] [--wait]` and
//! `cmover plugin rollback NAME --group G`: plugins across a content group, through the
//! manager (`POST /api/v1/plugins/publish|rollback`; `cm_manager::fleet`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use cm_manager::model::{Job, JobState, Payload};
use serde_json::json;

use crate::client::{CliError, Client, ConnectArgs};

#[derive(clap::Args)]
pub struct PublishArgs {
    /// The component (.wasm).
    file: PathBuf,
    /// The operator's manifest (TOML): name, world, limits, grants.
    #[arg(long)]
    manifest: PathBuf,
    /// The content group whose servers get it.
    #[arg(long)]
    group: String,
    /// This many servers first; the rest once they all installed it.
    #[arg(long)]
    canary: Option<u32>,
    /// Wait until every server installed it (exit 0) or the group was rolled back (exit 1).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub async fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let component =
        std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let manifest = std::fs::read_to_string(&a.manifest)
        .with_context(|| format!("reading {}", a.manifest.display()))?;
    // Checked here too, so a bad manifest is named by its file before anything is sent.
    cm_plugin_host::PluginManifest::parse(&manifest, &a.manifest.display().to_string())?;
    let c = Client::connect(&a.connect)?;
    let body = json!({
        "group": a.group,
        "component": base64::engine::general_purpose::STANDARD.encode(&component),
        "manifest": manifest,
        "canary": a.canary,
    });
    let job: Job = c.post("plugins/publish", &body).await?;
    println!("job {}: {}", job.id, job.spec.name);
    if !a.wait {
        return Ok(());
    }
    let Payload::Plugin { version, group, name, .. } = &job.spec.payload else {
        anyhow::bail!("job {} is not a plugin job", job.id);
    };
    let end = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let jobs: Vec<Job> = c.get("jobs").await?;
        let ours = |j: &&Job| {
            j.id >= job.id
                && matches!(&j.spec.payload, Payload::Plugin { group: g, name: n, .. }
                    if g == group && n == name)
        };
        let mine: Vec<&Job> = jobs.iter().filter(ours).collect();
        let last_stage = |j: &&&Job| {
            matches!(&j.spec.payload, Payload::Plugin { version: v, then, rollback: None, .. }
                if v == version && then.is_empty())
        };
        if let Some(j) = mine.iter().find(last_stage)
            && j.state == JobState::Done
        {
            println!("{name} {} installed on every server of group {group}", &version[..12]);
            return Ok(());
        }
        if let Some(r) = mine.iter().find(|j| {
            matches!(&j.spec.payload, Payload::Plugin { rollback: Some(_), .. })
                && matches!(j.state, JobState::Done | JobState::Cancelled { .. })
        }) {
            let Payload::Plugin { rollback: Some(why), .. } = &r.spec.payload else {
                unreachable!()
            };
            return Err(CliError::Failed(format!(
                "group {group} rolled back ({:?}): {why}",
                r.state
            ))
            .into());
        }
        if Instant::now() > end {
            return Err(CliError::Failed(format!(
                "{name} {}: not on every server of group {group} after {} s",
                &version[..12],
                a.timeout
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn rollback(connect: &ConnectArgs, group: &str, name: &str) -> anyhow::Result<()> {
    let c = Client::connect(connect)?;
    let job: Job = c.post("plugins/rollback", &json!({ "group": group, "name": name })).await?;
    println!("job {}: {}", job.id, job.spec.name);
    Ok(())
}
