//! Logging for every command: `--log-format text|json` and `--log-level LEVEL` (global flags;
//! the manager's and agent's `[log]` settings fill in what a flag does not set), to stderr,
//! with ANSI colours only when stderr is a terminal. `RUST_LOG`, where set, wins over both (it
//! takes full `tracing` directives such as `info,cm_tree=debug`). The level can be changed
//! while running ([`set_level`], on SIGHUP); the format cannot.

use std::io::IsTerminal;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (for a log shipper).
    Json,
}

/// The global logging flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level: error, warn, info, debug, trace or off, or `tracing` directives
    /// (`info,cm_tree=debug`). RUST_LOG, when set, wins.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Checks a `--log-level` / `[log] level` value: a level word, or directives with `=` or `,`.
pub fn parse_level(level: &str) -> anyhow::Result<EnvFilter> {
    let word = ["error", "warn", "info", "debug", "trace", "off"];
    if !level.contains(['=', ',']) && !word.contains(&level.to_ascii_lowercase().as_str()) {
        bail!(
            "`{level}` is not a log level (error, warn, info, debug, trace, off, or directives like `info,cm_tree=debug`)"
        );
    }
    EnvFilter::try_new(level).with_context(|| format!("`{level}` is not a valid log filter"))
}

fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty())
}

/// Installs the process's logger. `level`: the flag's or the config file's; `RUST_LOG` wins.
pub fn init(format: LogFormat, level: Option<&str>) -> anyhow::Result<()> {
    let filter = match rust_log() {
        Some(v) => EnvFilter::try_new(&v).with_context(|| format!("RUST_LOG=`{v}`"))?,
        None => parse_level(level.unwrap_or("info")).context("log level")?,
    };
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let lines = match format {
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init()
        .context("installing the logger")?;
    let _ = FILTER.set(handle);
    Ok(())
}

/// Changes the level of a running process (SIGHUP). `Ok(false)`: unchanged, because
/// `RUST_LOG` is set and wins.
pub fn set_level(level: &str) -> anyhow::Result<bool> {
    if rust_log().is_some() {
        return Ok(false);
    }
    let filter = parse_level(level)?;
    let handle = FILTER.get().context("the logger is not installed")?;
    handle.reload(filter).context("changing the log level")?;
    Ok(true)
}
