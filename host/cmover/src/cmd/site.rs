//! `cmover site ...`: commit, roll back or inspect a local site's releases.

use std::path::PathBuf;

use super::assignment::{InterpreterArgs, SiteArgs};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Make a prepared release live (default: the newest prepared one).
    Commit {
        #[arg(long)]
        site: PathBuf,
        #[arg(long)]
        serial: Option<u64>,
        #[command(flatten)]
        site_args: SiteArgs,
        #[command(flatten)]
        interpreter: InterpreterArgs,
    },
    /// Switch live back to the release committed before the current one.
    Rollback {
        #[arg(long)]
        site: PathBuf,
        #[command(flatten)]
        site_args: SiteArgs,
        #[command(flatten)]
        interpreter: InterpreterArgs,
    },
    /// Show the live release, backups and prepared releases.
    Status {
        #[arg(long)]
        site: PathBuf,
    },
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(command)).await?
}

fn run_blocking(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Commit { site, serial, site_args, interpreter } => {
            let site = site_args.open(&site)?;
            let live = site.commit(serial, interpreter.load(site.root())?.get())?;
            println!("release {live} is live");
        }
        Command::Rollback { site, site_args, interpreter } => {
            let site = site_args.open(&site)?;
            let live = site.rollback(interpreter.load(site.root())?.get())?;
            println!("rolled back: release {live} is live");
        }
        Command::Status { site } => {
            let s = cm_site::Site::open(&site, Default::default())?;
            print!("{}", s.status()?);
        }
    }
    Ok(())
}
