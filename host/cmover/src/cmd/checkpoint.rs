//! `cmover checkpoint create|list|delete|restore SITE …`: a site's checkpoints on the manager
//! (`docs/manager.md`, "Checkpoints"), over its operator API.
//!
//! The manager's URL and the operator token come from `--manager`/`CMOVER_MANAGER` and
//! `--token-file`/`CMOVER_TOKEN_FILE`: a minimal private client until the operator client
//! (`client.rs`) is shared by every operator command. Exit codes: 0 done, 1 failed, 2 usage,
//! 4 manager unreachable.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cm_manager::model::{Checkpoint, Job, JobKind, JobPolicy, JobSpec, JobState, Payload};
use cm_tree::http::{ClientError, JsonClient};
use hyper::Method;

#[derive(clap::Args)]
pub struct Args {
    /// The manager's base URL (default: `CMOVER_MANAGER`, else http://127.0.0.1:8080).
    #[arg(long, global = true)]
    manager: Option<String>,
    /// A file holding the operator token (default: `CMOVER_TOKEN_FILE`).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Take a checkpoint of the site's live release now.
    Create {
        site: String,
        #[arg(long)]
        note: Option<String>,
    },
    /// List the site's checkpoints, oldest first.
    List { site: String },
    /// Delete a checkpoint (its archive too).
    Delete { site: String, id: u64 },
    /// Restore a checkpoint to every server of the site's group (a job of kind `restore`,
    /// committed automatically unless `--manual`); waits for the job to end.
    Restore {
        site: String,
        id: u64,
        /// Leave the restored release prepared for an operator's commit.
        #[arg(long)]
        manual: bool,
        /// Return once the job is created instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Exit code when the manager cannot be reached.
const UNREACHABLE: i32 = 4;

fn exit_for(e: &ClientError) -> i32 {
    match e {
        ClientError::Status { .. } => 1,
        _ => UNREACHABLE,
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let Some(token_file) =
        a.token_file.or_else(|| std::env::var_os("CMOVER_TOKEN_FILE").map(Into::into))
    else {
        eprintln!("give --token-file FILE or set CMOVER_TOKEN_FILE (the operator token)");
        std::process::exit(2);
    };
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the operator token {}", token_file.display()))?;
    let client = JsonClient::new(token.trim(), Duration::from_secs(600));
    let manager = a
        .manager
        .or_else(|| std::env::var("CMOVER_MANAGER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let base = manager.trim_end_matches('/').to_string();
    let url = |p: &str| format!("{base}/api/v1/{p}");
    let r = match a.command {
        Command::Create { site, note } => client
            .post::<_, Checkpoint>(
                &url(&format!("sites/{site}/checkpoints")),
                &serde_json::json!({ "note": note }),
            )
            .await
            .map(|c| println!("{}", line(&c))),
        Command::List { site } => client
            .get::<Vec<Checkpoint>>(&url(&format!("sites/{site}/checkpoints")))
            .await
            .map(|all| {
                if all.is_empty() {
                    println!("site {site} has no checkpoints");
                }
                for c in &all {
                    println!("{}", line(c));
                }
            }),
        Command::Delete { site, id } => client
            .call::<(), Checkpoint>(
                Method::DELETE,
                &url(&format!("sites/{site}/checkpoints/{id}")),
                None,
            )
            .await
            .map(|c| println!("deleted checkpoint {} of site {}", c.id, c.site)),
        Command::Restore { site, id, manual, no_wait } => {
            let mut policy = JobPolicy::default();
            if manual {
                policy.commit = cm_manager::model::CommitPolicy::Manual;
            }
            let spec = JobSpec {
                name: format!("restore checkpoint {id}"),
                kind: JobKind::Restore,
                site: site.clone(),
                payload: Payload::Checkpoint { id },
                start_at_ms: 0,
                every_ms: None,
                policy,
            };
            match client.post::<_, Job>(&url("jobs"), &spec).await {
                Ok(job) if no_wait => {
                    println!("job {}: restore of checkpoint {id} of site {site}", job.id);
                    Ok(())
                }
                Ok(job) => return wait(&client, &url(&format!("jobs/{}", job.id)), job.id).await,
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = r {
        eprintln!("{e}");
        std::process::exit(exit_for(&e));
    }
    Ok(())
}

fn line(c: &Checkpoint) -> String {
    format!(
        "checkpoint {} of site {}: release {}, {} entries, {} bytes in {} (blake3 {}){}",
        c.id,
        c.site,
        c.release,
        c.entries,
        c.content_bytes,
        c.size,
        &c.blake3[..16.min(c.blake3.len())],
        c.note.as_ref().map_or(String::new(), |n| format!(": {n}"))
    )
}

/// Follows a job until it is done (exit 0) or cancelled (exit 1).
async fn wait(client: &JsonClient, url: &str, id: u64) -> anyhow::Result<()> {
    loop {
        let j: Job = match client.get(url).await {
            Ok(j) => j,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(exit_for(&e));
            }
        };
        match &j.state {
            JobState::Done => {
                println!("job {id} done: checkpoint restored");
                return Ok(());
            }
            JobState::Cancelled { reason } => {
                eprintln!("job {id} failed: {reason}");
                std::process::exit(1);
            }
            JobState::Idle if j.attempts > 0 && j.pending_commit.is_none() => {
                // Retried per its policy: say why and keep following.
                if let Some(r) = &j.last_reason {
                    eprintln!("job {id}: {r}; retrying");
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
