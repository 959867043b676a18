//! `cmover run show RUN [--follow]`: a run's segments, servers and outcomes; with `--follow`,
//! progress bars fed by the manager's event stream (`/api/v1/events?run=N`) until the run ends.
//!
//! It talks to the manager through [`crate::client::Client`] like the other operator commands
//! (same flags, environment and config file) and exits by their codes: 0 the run succeeded (or,
//! without `--follow`, is still distributing), 1 it failed, 2 usage, 3 it failed on its quorum,
//! 4 the manager could not be reached.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ops::print_json;
use crate::client::{CliError, Client, ConnectArgs};

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
    connect: ConnectArgs,
}

#[derive(Deserialize, Serialize)]
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
    let c = Client::connect(&a.connect)?;
    let path = format!("runs/{}", a.run);
    let mut view: RunView = c.get(&path).await?;
    if a.follow && view.run["phase"] == "distributing" {
        follow(&c, a.run).await?;
        view = c.get(&path).await?;
    }
    if c.json {
        print_json(&view)?;
    } else {
        print!("{}", describe(&view));
    }
    match (view.run["phase"].as_str(), view.run["reason"].as_str()) {
        (Some("failed"), Some(r)) if r.starts_with("quorum not met") => {
            Err(CliError::Partial(format!("run {} failed: {r}", a.run)).into())
        }
        (Some("failed"), r) => {
            Err(CliError::Failed(format!("run {} failed: {}", a.run, r.unwrap_or("?"))).into())
        }
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
async fn follow(c: &Client, run: u64) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let total = bars.add(ProgressBar::new(0).with_style(style.clone()).with_prefix("servers"));
    let mut per_segment: BTreeMap<String, (ProgressBar, Vec<String>)> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, String> = BTreeMap::new();
    let path = format!("events?run={run}");
    loop {
        let mut body = c.stream(&path).await?;
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
