//! `cmover status` (the cluster at a glance: the manager, segments and their GLs, servers with
//! their live release, runs in flight) and `cmover servers` (each server's releases and the
//! interpreter plugin it reported).

use std::collections::BTreeMap;
use std::time::Instant;

use cm_manager::model::{HostedSite, Run, RunPhase, SegmentRecord, ServerRecord};
use serde_json::json;

use super::{ago, now_ms, print_json, table};
use crate::client::{Client, ConnectArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Per server, `site=release` for every site it holds, marked when it is not the site's live one.
fn releases(sites: &[HostedSite]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in sites {
        for (server, rel) in &s.holders {
            let text = match s.live() {
                Some(live) if live != *rel => format!("{}={rel} (live is {live})", s.name),
                _ => format!("{}={rel}", s.name),
            };
            out.entry(server.clone()).or_default().push(text);
        }
    }
    out
}

fn server_rows(
    servers: &[ServerRecord],
    segments: &[SegmentRecord],
    sites: &[HostedSite],
) -> Vec<Vec<String>> {
    let now = now_ms();
    let rel = releases(sites);
    let leaders: BTreeMap<&str, &str> =
        segments.iter().map(|s| (s.name.as_str(), s.leader.as_str())).collect();
    servers
        .iter()
        .map(|s| {
            let gl = leaders.get(s.segment.as_str()) == Some(&s.name.as_str());
            vec![
                s.name.clone(),
                s.segment.clone(),
                if s.live { "up" } else { "down" }.into(),
                if gl { "GL" } else { "" }.into(),
                ago(s.last_seen_ms, now),
                rel.get(&s.name).map_or("-".into(), |r| r.join(" ")),
                s.plugin.as_ref().map_or("-".into(), |p| format!("{} {}", p.name, p.version)),
                s.space.as_ref().map_or("-".into(), cm_manager::space::describe_space),
            ]
        })
        .collect()
}

const SERVER_HEADERS: [&str; 8] =
    ["SERVER", "SEGMENT", "STATE", "ROLE", "CHANGED", "RELEASES", "PLUGIN", "SPACE"];

pub async fn status(a: Args) -> anyhow::Result<()> {
    let c = Client::connect(&a.connect)?;
    let t = Instant::now();
    c.health().await?;
    let health_ms = t.elapsed().as_millis();
    let segments: Vec<SegmentRecord> = c.get("segments").await?;
    let servers: Vec<ServerRecord> = c.get("servers").await?;
    let sites: Vec<HostedSite> = c.get("sites").await?;
    let runs: Vec<Run> = c.get("runs").await?;
    let in_flight: Vec<&Run> = runs.iter().filter(|r| r.phase == RunPhase::Distributing).collect();
    if c.json {
        return print_json(&json!({
            "manager": c.base(),
            "reachable": true,
            "segments": segments,
            "servers": servers,
            "sites": sites,
            "runs_in_flight": in_flight,
        }));
    }
    let now = now_ms();
    let up = servers.iter().filter(|s| s.live).count();
    println!("manager {} reachable ({health_ms} ms)", c.base());
    println!(
        "{} segments, {} servers ({up} up), {} sites, {} runs in flight\n",
        segments.len(),
        servers.len(),
        sites.len(),
        in_flight.len()
    );
    let rows: Vec<Vec<String>> = segments
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.leader.clone(),
                s.address.clone(),
                s.members.len().to_string(),
                s.location.clone(),
                ago(s.last_report_ms, now),
            ]
        })
        .collect();
    table(&["SEGMENT", "GL", "ADDRESS", "MEMBERS", "LOCATION", "LAST REPORT"], &rows);
    println!();
    table(&SERVER_HEADERS, &server_rows(&servers, &segments, &sites));
    if !sites.is_empty() {
        println!();
        super::site::print_sites(&sites);
    }
    println!();
    if in_flight.is_empty() {
        println!("no runs in flight");
    } else {
        let rows: Vec<Vec<String>> = in_flight
            .iter()
            .map(|r| {
                let reported = r
                    .segments
                    .values()
                    .filter(|s| s.status == cm_manager::model::SegmentStatus::Reported)
                    .count();
                vec![
                    r.id.to_string(),
                    r.job.to_string(),
                    if r.commit_of.is_some() { "commit" } else { "distribution" }.into(),
                    ago(r.started_ms, now),
                    format!("{reported}/{}", r.segments.len()),
                ]
            })
            .collect();
        table(&["RUN", "JOB", "WHAT", "STARTED", "SEGMENTS REPORTED"], &rows);
    }
    Ok(())
}

pub async fn servers(a: Args) -> anyhow::Result<()> {
    let c = Client::connect(&a.connect)?;
    let servers: Vec<ServerRecord> = c.get("servers").await?;
    let segments: Vec<SegmentRecord> = c.get("segments").await?;
    let sites: Vec<HostedSite> = c.get("sites").await?;
    if c.json {
        let list: Vec<_> = servers
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                let held: BTreeMap<&str, u64> = sites
                    .iter()
                    .filter_map(|site| site.holders.get(&s.name).map(|r| (site.name.as_str(), *r)))
                    .collect();
                v["releases"] = json!(held);
                v["leader"] = json!(segments.iter().any(|g| g.leader == s.name));
                v
            })
            .collect();
        return print_json(&list);
    }
    table(&SERVER_HEADERS, &server_rows(&servers, &segments, &sites));
    Ok(())
}
