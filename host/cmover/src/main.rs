//! `cmover`: the one binary. Each subcommand group lives in its own module under `cmd/`;
//! this file only parses the command line, sets up logging ([`logging`]) and dispatches. The
//! manager and the agent set up their logging themselves, once their settings file is read
//! (its `[log]` section), and run as services ([`service`]: signals, systemd readiness).

mod client;
mod cmd;
mod logging;
mod service;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cmover",
    version,
    about = "Content Mover: publish content to many servers through elected group leaders"
)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process; boxing buys nothing")]
enum Command {
    /// Run a local demo cluster: a manager and several segments of servers on loopback.
    Demo(cmd::demo::Args),
    /// Manage WebAssembly plugins: install (hot swap), list, inspect, remove, rollback.
    #[command(subcommand)]
    Plugin(cmd::plugin::Command),
    /// Build and inspect assignments, and apply one to a local site.
    #[command(subcommand)]
    Assignment(cmd::assignment::Command),
    /// Commit, roll back or inspect a local site's releases.
    #[command(subcommand)]
    Site(cmd::site::Command),
    /// Run a server agent: join a segment's election, receive and apply assignments.
    Agent(cmd::agent::Args),
    /// Send or receive one file with MCTP reliable multicast.
    #[command(subcommand)]
    Mctp(cmd::mctp::Command),
    /// Run the Content Control Manager.
    Manager(cmd::manager::Args),
    /// The cluster's certificate authority for mutual TLS: create it, issue certificates.
    #[command(subcommand)]
    Cert(cmd::cert::Command),
    /// Publish a site's staging tree to its content group (then commit it, unless --manual-commit).
    Publish(cmd::ops::publish::PublishArgs),
    /// Make a site's prepared release live on its servers.
    Commit(cmd::ops::publish::CommitArgs),
    /// Switch a site's servers back to the release committed before live (or --to an earlier one).
    Rollback(cmd::ops::publish::RollbackArgs),
    /// Hot content: named staging files live at once on N chosen servers (on top of live).
    Hot(cmd::ops::publish::HotArgs),
    /// Jobs on the manager: create, list, show, cancel.
    #[command(subcommand)]
    Job(cmd::ops::job::Command),
    /// The cluster at a glance: manager, segments and GLs, servers and their live release, runs.
    Status(cmd::ops::status::Args),
    /// The servers the manager knows: segment, state, GL, releases held.
    Servers(cmd::ops::status::Args),
    /// The manager's history log.
    History(cmd::ops::history::Args),
    /// Content groups on the manager: create, list, show.
    #[command(subcommand)]
    Group(cmd::ops::group::Command),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages (cmover.1 and one per subcommand) into a directory.
    Man { dir: std::path::PathBuf },
    /// Runs on the manager: show one, or follow it live until it ends.
    #[command(subcommand)]
    Run(cmd::run::Command),
    /// A site's checkpoints on the manager: create, list, delete, restore.
    Checkpoint(cmd::checkpoint::Args),
}

/// Whether the command runs for a long time and must outlive a closed stdout (the manager, an
/// agent, the demo with its child processes to clean up).
fn long_running(c: &Command) -> bool {
    match c {
        Command::Demo(_) | Command::Manager(_) => true,
        Command::Agent(a) => !a.is_status(),
        _ => false,
    }
}

/// `cmover … | head`: Rust ignores SIGPIPE, so a write to a closed pipe is an error and
/// `println!` panics on it. A short command whose reader went away should just stop, quietly,
/// as other command-line tools do: the default action (termination) is restored for it.
/// Sockets are unaffected (std and tokio send with `MSG_NOSIGNAL`).
fn stop_quietly_on_closed_stdout() {
    // SAFETY: signal(2) with SIG_DFL, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A long-running process raises its open-file limit to the hard limit: the manager and the GL
/// serve many connections besides their files, and the common soft default (1,024) is what a
/// slowloris exhausts first. The HTTP servers cap their own connections below it
/// (`cm_tree::http::ServeLimits`), so raising it leaves the process room for its own work.
pub(crate) fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else { return };
    if soft >= hard {
        tracing::debug!(soft, hard, "open-file limit already at its hard limit");
        return;
    }
    let raised = rustix::process::Rlimit { current: Some(hard), maximum: Some(hard) };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
        Err(e) => tracing::warn!(soft, hard, "could not raise the open-file limit: {e}"),
    }
}

/// Exit codes (`client::Exit`): 0 done, 1 failed, 2 usage (clap's own errors too), 3 quorum
/// not met or partial, 4 manager unreachable.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !long_running(&cli.command) {
        stop_quietly_on_closed_stdout();
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            let result = runtime.block_on(run(cli.command, cli.log));
            // Tasks still running (a manager's runs in flight) are dropped here, which closes
            // what they hold (the manager's database); blocking work gets a few seconds to end.
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            result
        });
    match result {
        Ok(()) => std::process::ExitCode::from(client::Exit::Done as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(client::exit_code(&e))
        }
    }
}

/// Whether the command installs its logger itself (after reading its settings file).
fn logs_itself(c: &Command) -> bool {
    match c {
        Command::Manager(_) => true,
        Command::Agent(a) => !a.is_status(),
        _ => false,
    }
}

async fn run(command: Command, log: logging::LogArgs) -> anyhow::Result<()> {
    if !logs_itself(&command) {
        logging::init(log.log_format.unwrap_or_default(), log.log_level.as_deref())?;
    }
    if long_running(&command) && !logs_itself(&command) {
        raise_fd_limit();
    }
    match command {
        Command::Demo(a) => cmd::demo::run(a).await,
        Command::Plugin(c) => cmd::plugin::run(c).await,
        Command::Assignment(c) => cmd::assignment::run(c).await,
        Command::Site(c) => cmd::site::run(c).await,
        Command::Agent(a) => cmd::agent::run(a, log).await,
        Command::Mctp(c) => cmd::mctp::run(c).await,
        Command::Manager(a) => cmd::manager::run(a, log).await,
        Command::Cert(c) => cmd::cert::run(c).await,
        Command::Publish(a) => cmd::ops::publish::publish(a).await,
        Command::Commit(a) => cmd::ops::publish::commit(a).await,
        Command::Rollback(a) => cmd::ops::publish::rollback(a).await,
        Command::Hot(a) => cmd::ops::publish::hot(a).await,
        Command::Job(c) => cmd::ops::job::run(c).await,
        Command::Status(a) => cmd::ops::status::status(a).await,
        Command::Servers(a) => cmd::ops::status::servers(a).await,
        Command::History(a) => cmd::ops::history::run(a).await,
        Command::Group(c) => cmd::ops::group::run(c).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "cmover", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => cmd::ops::man_pages(Cli::command(), &dir),
        Command::Run(c) => cmd::run::run(c).await,
        Command::Checkpoint(a) => cmd::checkpoint::run(a).await,
    }
}
