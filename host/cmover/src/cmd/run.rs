//! `cmover run show RUN [--follow]`: a run's segments, servers and outcomes; with `--follow`,
//! progress bars fed by the manager's event stream (`/api/v1/events?run=N`) until the run ends.
//!
//! Exit codes: 0 the run succeeded (or, without `--follow`, is still distributing), 1 it
//! failed, 3 it failed on its quorum, 4 the manager could not be reached (2, usage, is clap's).
//!
//! The manager's address and credentials: `--manager` or `CMOVER_MANAGER`, `--token-file` or
//! `CMOVER_TOKEN_FILE`, or the TLS files. This is a minimal private client until the operator
//! commands' shared one (`client.rs`) is in; it should then take this one's place.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::tls::{Tls, TlsFiles};
use http_body_util::BodyExt;
use hyper::Method;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::Value;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Show a run: its segments, servers and outcomes (`--follow`: live until it ends).
    Show(ShowArgs),
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// The run's id.
    run: u64,
    /// Draw progress bars from the manager's event stream until the run ends.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    manager: ManagerArgs,
}

#[derive(clap::Args)]
pub struct ManagerArgs {
    /// The manager's URL (default: $CMOVER_MANAGER, else http://127.0.0.1:7300).
    #[arg(long)]
    manager: Option<String>,
    /// File holding the operator token (default: $CMOVER_TOKEN_FILE).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Mutual TLS instead of a token: the cluster CA, an operator certificate and its key.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

const EXIT_FAILED: i32 = 1;
const EXIT_QUORUM: i32 = 3;
const EXIT_UNREACHABLE: i32 = 4;

struct Manager {
    url: String,
    client: JsonClient,
}

impl ManagerArgs {
    fn connect(&self) -> anyhow::Result<Manager> {
        let url = self
            .manager
            .clone()
            .or_else(|| std::env::var("CMOVER_MANAGER").ok())
            .unwrap_or_else(|| "http://127.0.0.1:7300".into());
        let tls = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(
                Tls::load(&TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
                    .context("loading the TLS files")?,
            ),
            _ => None,
        };
        let token = match (
            &tls,
            self.token_file
                .clone()
                .or_else(|| std::env::var_os("CMOVER_TOKEN_FILE").map(PathBuf::from)),
        ) {
            (Some(_), _) => String::new(),
            (None, Some(f)) => std::fs::read_to_string(&f)
                .with_context(|| format!("reading the operator token file {}", f.display()))?
                .trim()
                .to_string(),
            (None, None) => anyhow::bail!(
                "no credentials: give --token-file (or CMOVER_TOKEN_FILE), or the --tls-* files"
            ),
        };
        let client = JsonClient::with_tls(&token, Duration::from_secs(10), tls.as_ref());
        Ok(Manager { url: url.trim_end_matches('/').to_string(), client })
    }
}

/// A transport failure means the manager is unreachable (exit 4); anything else is an error.
fn unreachable_or(e: ClientError) -> anyhow::Error {
    if matches!(e, ClientError::Transport { .. } | ClientError::Timeout { .. }) {
        eprintln!("error: the manager is unreachable: {e}");
        std::process::exit(EXIT_UNREACHABLE);
    }
    anyhow!(e)
}

#[derive(Deserialize)]
struct RunView {
    run: Value,
    reports: Vec<(String, Value)>,
}

pub async fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Show(a) => show(a).await,
    }
}

async fn show(a: ShowArgs) -> anyhow::Result<()> {
    let m = a.manager.connect()?;
    let url = format!("{}/api/v1/runs/{}", m.url, a.run);
    let mut view: RunView = m.client.get(&url).await.map_err(unreachable_or)?;
    if a.follow && view.run["phase"] == "distributing" {
        follow(&m, a.run).await?;
        view = m.client.get(&url).await.map_err(unreachable_or)?;
    }
    print!("{}", describe(&view));
    match (view.run["phase"].as_str(), view.run["reason"].as_str()) {
        (Some("failed"), Some(r)) if r.starts_with("quorum not met") => {
            std::process::exit(EXIT_QUORUM)
        }
        (Some("failed"), _) => std::process::exit(EXIT_FAILED),
        _ => Ok(()),
    }
}

/// The run as text: header, segments, every server's outcome.
fn describe(v: &RunView) -> String {
    let r = &v.run;
    let mut s = format!(
        "run {} of job {}: {}{}\n",
        r["id"],
        r["job"],
        r["phase"].as_str().unwrap_or("?"),
        r["reason"].as_str().map(|x| format!(" ({x})")).unwrap_or_default()
    );
    if let Some(rel) = r["release"].as_u64() {
        s += &format!("release {rel}, serial {}\n", r["serial"]);
    }
    if let Some(c) = r["commit_of"].as_u64() {
        s += &format!("commits the release of run {c}\n");
    }
    s += &format!("assignment: {} bytes\n", r["manifest"]["size"]);
    s += "\nsegment\tGL\tstatus\tservers\n";
    if let Some(segs) = r["segments"].as_object() {
        for (name, seg) in segs {
            s += &format!(
                "{name}\t{}\t{}\t{}\n",
                seg["leader"].as_str().unwrap_or(""),
                seg["status"].as_str().unwrap_or(""),
                seg["servers"].as_array().map_or(0, Vec::len)
            );
        }
    }
    s += "\nserver\toutcome\n";
    for (server, o) in &v.reports {
        let reason = o["reason"].as_str().map(|x| format!(": {x}")).unwrap_or_default();
        s += &format!("{server}\t{}{reason}\n", o["status"].as_str().unwrap_or("?"));
    }
    s
}

/// One Server-Sent Event: its kind and data.
fn parse_event(block: &str) -> Option<(String, Value)> {
    let (mut kind, mut data) = (None, String::new());
    for line in block.lines() {
        if let Some(k) = line.strip_prefix("event:") {
            kind = Some(k.trim().to_string());
        } else if let Some(d) = line.strip_prefix("data:") {
            data += d.trim_start();
        }
    }
    Some((kind?, serde_json::from_str(&data).ok()?))
}

/// Bars for the run's servers overall and per segment, moved by its events until it ends.
async fn follow(m: &Manager, run: u64) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let total = bars.add(ProgressBar::new(0).with_style(style.clone()).with_prefix("servers"));
    let mut per_segment: BTreeMap<String, (ProgressBar, Vec<String>)> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, String> = BTreeMap::new();
    let url = format!("{}/api/v1/events?run={run}", m.url);
    loop {
        let resp = m
            .client
            .send(Method::GET, &url, None, &[("accept", "text/event-stream".into())])
            .await
            .map_err(unreachable_or)?;
        let mut body = resp.into_body();
        let mut buf = String::new();
        // Keep-alives come every 15 s: a longer silence is a dead connection.
        'stream: while let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_secs(45), body.frame()).await
        {
            let Ok(data) = frame.context("reading the event stream")?.into_data() else { continue };
            buf += &String::from_utf8_lossy(&data);
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let Some((kind, v)) = parse_event(&block) else { continue };
                match kind.as_str() {
                    "run" => {
                        for seg in v["segments"].as_array().into_iter().flatten() {
                            let name = seg["segment"].as_str().unwrap_or("").to_string();
                            let servers: Vec<String> = seg["servers"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|s| s.as_str().map(str::to_string))
                                .collect();
                            let (bar, list) =
                                per_segment.entry(name.clone()).or_insert_with(|| {
                                    let b = bars.add(
                                        ProgressBar::new(0)
                                            .with_style(style.clone())
                                            .with_prefix(name),
                                    );
                                    (b, vec![])
                                });
                            bar.set_length(servers.len() as u64);
                            bar.set_message(seg["status"].as_str().unwrap_or("").to_string());
                            *list = servers;
                        }
                        total.set_length(per_segment.values().map(|(_, l)| l.len() as u64).sum());
                        if v["phase"] != "distributing" {
                            total
                                .finish_with_message(v["phase"].as_str().unwrap_or("").to_string());
                            for (b, _) in per_segment.values() {
                                b.finish();
                            }
                            return Ok(());
                        }
                    }
                    "report" => {
                        let server = v["server"].as_str().unwrap_or("").to_string();
                        outcomes.insert(server, v["status"].as_str().unwrap_or("").to_string());
                        let ok = outcomes.values().filter(|o| *o == "succeeded").count();
                        total.set_position(outcomes.len() as u64);
                        total.set_message(format!("{ok} succeeded"));
                        for (b, list) in per_segment.values() {
                            b.set_position(
                                list.iter().filter(|s| outcomes.contains_key(*s)).count() as u64,
                            );
                        }
                    }
                    // Dropped for falling behind: start over (the stream opens with the run's state).
                    "lagged" => break 'stream,
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let (k, v) = parse_event("event: report\ndata: {\"run\":3,\"server\":\"a\"}\n\n").unwrap();
        assert_eq!(k, "report");
        assert_eq!(v["server"], "a");
        assert!(parse_event(": keep-alive\n\n").is_none());
    }
}
