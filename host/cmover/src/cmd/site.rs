//! `cmover site ...`: commit, roll back or inspect a local site's releases; and `site create|
//! list|show`, the hosted sites on the manager (`cmd/ops/site.rs`).

use std::path::PathBuf;

use anyhow::bail;

use super::assignment::{InterpreterArgs, SiteArgs};
use crate::client::ConnectArgs;

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
    /// Show the live release, backups and prepared releases (reads only: creates nothing).
    Status {
        #[arg(long)]
        site: PathBuf,
    },
    /// On the manager: create a hosted site (or change its group or staging directory).
    Create {
        name: String,
        /// The content group it goes to.
        #[arg(long)]
        group: String,
        /// The staging directory, on the manager's machine (absolute).
        #[arg(long)]
        staging: String,
        /// Snapshots kept: the last this many committed releases.
        #[arg(long)]
        keep_releases: Option<u32>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// On the manager: list the hosted sites.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// On the manager: show one hosted site (releases, and which server holds which).
    Show {
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    use super::ops::site;
    match command {
        Command::Create { name, group, staging, keep_releases, connect } => {
            site::create(name, group, staging, keep_releases, connect).await
        }
        Command::List { connect } => site::list(connect).await,
        Command::Show { name, connect } => site::show(name, connect).await,
        local => tokio::task::spawn_blocking(move || run_blocking(local)).await?,
    }
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
            // Opening a site creates its layout; a status must not, so a path that holds no site
            // is refused before it is opened.
            if !site.join("releases").is_dir() {
                bail!(
                    "no site at {}: it has no releases directory (nothing was applied there)",
                    site.display()
                );
            }
            let s = cm_site::Site::open(&site, Default::default())?;
            print!("{}", s.status()?);
        }
        Command::Create { .. } | Command::List { .. } | Command::Show { .. } => {
            unreachable!("manager commands run in `run`")
        }
    }
    Ok(())
}
