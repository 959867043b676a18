//! The console's read-only pages: overview (segments, servers, runs in flight), runs and one run,
//! and history. The pages with forms are in [`super::config`] (sites, groups, jobs) and
//! [`super::checkpoints`]; the plugins page is [`super::plugins`]. Sections that change live carry `data-live` and an id: the console's script
//! swaps them in place when an event arrives.

use std::collections::{BTreeMap, HashMap};

use maud::{Markup, html};

use crate::db::DbError;
use crate::model::{HostedSite, Run, RunPhase, SegmentStatus, ServerOutcome};
use crate::now_ms;
use crate::server::Inner;

use super::config;
use super::layout::{ago, bar, button, bytes, span, time};

/// History lines per page.
const HISTORY_PAGE: usize = 50;
/// Runs listed on the runs page.
const RUNS_LISTED: usize = 200;

/// The page at `path` (with its query's fields): its title and body; `None` if there is none.
pub(crate) fn render(
    m: &Inner,
    path: &str,
    q: &HashMap<String, String>,
    csrf: &str,
) -> Option<(String, Markup)> {
    let now = now_ms();
    let (title, body) = match path {
        "/console/" => ("Overview".to_string(), overview(m, now)),
        "/console/sites" => ("Sites and content groups".into(), config::sites(m, csrf)),
        "/console/jobs" => ("Jobs".into(), config::jobs(m, now, csrf)),
        "/console/runs" => ("Runs".into(), runs(m, now)),
        "/console/checkpoints" => ("Checkpoints".into(), super::checkpoints::page(m, csrf)),
        "/console/plugins" => ("Plugins".into(), super::plugins::page(m)),
        "/console/history" => ("History".into(), history(m, q)),
        _ => {
            let id = path.strip_prefix("/console/runs/")?.parse::<u64>().ok()?;
            (format!("Run {id}"), run_page(m, id, now))
        }
    };
    Some((
        title,
        body.unwrap_or_else(
            |e| html! { p.flash.error { "The store could not be read: " (e.to_string()) } },
        ),
    ))
}

pub(crate) fn phase(p: &RunPhase) -> Markup {
    match p {
        RunPhase::Distributing => html! { span.warn { "distributing" } },
        RunPhase::Succeeded => html! { span.ok { "succeeded" } },
        RunPhase::Failed { reason } => html! { span.bad title=(reason) { "failed" } ": " (reason) },
        RunPhase::Aborted { by, .. } => html! { span.bad { "aborted" } " by " (by) },
    }
}

fn outcome(o: &ServerOutcome) -> Markup {
    match o {
        ServerOutcome::Succeeded => html! { span.ok { "succeeded" } },
        ServerOutcome::Failed { reason } => html! { span.bad { "failed" } ": " (reason) },
        ServerOutcome::Missing => html! { span.warn { "missing" } },
    }
}

fn segment_status(s: SegmentStatus) -> Markup {
    match s {
        SegmentStatus::Pending => html! { span.dim { "pending" } },
        SegmentStatus::Received => html! { span.warn { "received" } },
        SegmentStatus::Reported => html! { span.ok { "reported" } },
        SegmentStatus::Lost => html! { span.bad { "lost" } },
    }
}

/// A site's release on a server: (site, the release the server holds, the site's live release).
type Held = (String, Option<u64>, Option<u64>);

/// The releases each server holds, per site of its content groups.
fn releases_by_server(
    m: &Inner,
    sites: &[HostedSite],
) -> Result<HashMap<String, Vec<Held>>, DbError> {
    let groups: HashMap<String, Vec<String>> =
        m.db.groups()?.into_iter().map(|g| (g.name, g.servers)).collect();
    let mut out: HashMap<String, Vec<_>> = HashMap::new();
    for site in sites {
        for server in groups.get(&site.content_group).into_iter().flatten() {
            out.entry(server.clone()).or_default().push((
                site.name.clone(),
                site.holders.get(server).copied(),
                site.live(),
            ));
        }
    }
    Ok(out)
}

fn overview(m: &Inner, now: u64) -> Result<Markup, DbError> {
    let segments = m.db.segments()?;
    let servers = m.db.servers()?;
    let sites = m.db.sites()?;
    let releases = releases_by_server(m, &sites)?;
    let window = m.cfg.live_window.as_millis() as u64;
    let fresh: HashMap<&str, (bool, u64, &[String])> = segments
        .iter()
        .map(|s| {
            (s.name.as_str(), (s.last_report_ms + window >= now, s.last_report_ms, &s.members[..]))
        })
        .collect();
    let mut active: Vec<u64> =
        m.runs.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
    active.sort_unstable();
    let mut in_flight = Vec::new();
    for id in active {
        if let Some(r) = m.db.run(id)? {
            let reports: BTreeMap<String, ServerOutcome> = m.db.reports(id)?.into_iter().collect();
            in_flight.push((r, reports));
        }
    }
    Ok(html! {
        h2 { "Runs in flight" }
        div #inflight data-live {
            @if in_flight.is_empty() { p.dim { "No run is distributing." } }
            @for (run, reports) in &in_flight { (run_progress(run, reports, now)) }
        }
        h2 { "Segments" }
        div #segments data-live {
            table {
                tr { th { "segment" } th { "group leader" } th { "address" } th { "members" } th { "last report" } th { "links up/down" } th { "leader changes" } }
                @for s in &segments {
                    tr {
                        td { (s.name) } td { (s.leader) } td { (s.address) }
                        td.num { (s.members.len()) }
                        td class=(if s.last_report_ms + window >= now { "ok" } else { "bad" }) { (ago(s.last_report_ms, now)) }
                        td { @if let Some(l) = s.links { (bytes(l.upload_bps)) "/s / " (bytes(l.download_bps)) "/s" } @else { span.dim { "not measured" } } }
                        td.num { (s.leader_history.len()) }
                    }
                }
            }
        }
        h2 { "Servers" }
        div #servers data-live {
            p.dim { (servers.len()) " servers known" }
            table {
                tr { th { "server" } th { "segment" } th { "health" } th { "live release per site" } th { "last report" } th { "space (site root)" } }
                @for s in &servers {
                    @let seg = fresh.get(s.segment.as_str());
                    tr id=(format!("server-{}", s.name)) {
                        td { (s.name) } td { (s.segment) }
                        td {
                            @match (s.live, seg) {
                                (true, Some((true, _, members))) if members.contains(&s.name) => span.ok { "up" },
                                (true, _) => span.warn { "silent" },
                                (false, _) => span.bad { "left" },
                            }
                        }
                        td {
                            @for (site, held, live) in releases.get(&s.name).into_iter().flatten() {
                                (site) ": "
                                @match (held, live) {
                                    (Some(h), Some(l)) if h == l => span.ok { (h) },
                                    (Some(h), _) => span.warn title="not the site's live release" { (h) },
                                    (None, _) => span.dim { "none" },
                                }
                                " "
                            }
                        }
                        td { (ago(seg.map_or(0, |s| s.1), now)) }
                        td { (s.space.as_ref().map_or("not reported".into(), crate::space::describe_space)) }
                    }
                }
            }
        }
    })
}

/// A run's progress: per segment and per server.
fn run_progress(run: &Run, reports: &BTreeMap<String, ServerOutcome>, now: u64) -> Markup {
    let targets: usize = run.segments.values().map(|s| s.servers.len()).sum();
    let ok = reports.values().filter(|o| **o == ServerOutcome::Succeeded).count();
    let segs_done = run
        .segments
        .values()
        .filter(|s| matches!(s.status, SegmentStatus::Reported | SegmentStatus::Lost))
        .count();
    html! {
        div.run id=(format!("run-{}", run.id)) {
            p {
                a href=(format!("/console/runs/{}", run.id)) { "Run " (run.id) } " of job " (run.job) " — " (phase(&run.phase))
                ", started " (ago(run.started_ms, now)) ", " (bytes(run.manifest.size))
                " — segments " (bar(segs_done, run.segments.len()))
                " — servers succeeded " (bar(ok, targets))
            }
            table {
                tr { th { "segment" } th { "GL" } th { "status" } th { "servers" } }
                @for (name, s) in &run.segments {
                    tr {
                        td { (name) } td { (s.leader) } td { (segment_status(s.status)) }
                        td {
                            @for server in &s.servers {
                                @match reports.get(server) {
                                    Some(o) => span title=(server) { (server) " " (outcome(o)) },
                                    None => span.dim { (server) " waiting" },
                                }
                                "; "
                            }
                        }
                    }
                }
            }
        }
    }
}

fn runs(m: &Inner, now: u64) -> Result<Markup, DbError> {
    let mut runs = m.db.runs()?;
    runs.reverse();
    runs.truncate(RUNS_LISTED);
    Ok(html! {
        div #runs data-live {
            table {
                tr { th { "run" } th { "job" } th { "phase" } th { "started" } th { "release" } th { "size" } th { "segments" } th { "servers" } }
                @for r in &runs {
                    tr {
                        td { a href=(format!("/console/runs/{}", r.id)) { (r.id) } }
                        td.num { (r.job) @if let Some(c) = r.commit_of { " (commit of run " (c) ")" } }
                        td { (phase(&r.phase)) }
                        td { (time(r.started_ms)) " (" (ago(r.started_ms, now)) ")" }
                        td.num { (r.release.map(|v| v.to_string()).unwrap_or_default()) }
                        td.num { (bytes(r.manifest.size)) }
                        td.num { (r.segments.len()) }
                        td.num { (r.segments.values().map(|s| s.servers.len()).sum::<usize>()) }
                    }
                }
            }
            @if runs.len() == RUNS_LISTED { p.dim { "The newest " (RUNS_LISTED) " runs; older ones are in the history." } }
        }
    })
}

fn run_page(m: &Inner, id: u64, now: u64) -> Result<Markup, DbError> {
    let Some(run) = m.db.run(id)? else {
        return Ok(html! { p { "There is no run " (id) "." } });
    };
    let reports: BTreeMap<String, ServerOutcome> = m.db.reports(id)?.into_iter().collect();
    let (lines, _) = m.db.history_page(None, 1000, |e| e.run == Some(id))?;
    let ended = (run.phase != RunPhase::Distributing).then(|| lines.first().map_or(0, |l| l.at_ms));
    let shape: Vec<&str> = lines
        .iter()
        .filter(|l| l.event.starts_with("tree for "))
        .map(|l| l.event.as_str())
        .collect();
    Ok(html! {
        div #run data-live {
            table {
                tr { th { "job" } td { (run.job) } }
                tr { th { "phase" } td { (phase(&run.phase)) } }
                tr { th { "serial / release" } td { (run.serial.map(|v| v.to_string()).unwrap_or("—".into())) " / " (run.release.map(|v| v.to_string()).unwrap_or("—".into())) } }
                @if let Some(c) = run.commit_of { tr { th { "commits" } td { "the release of run " a href=(format!("/console/runs/{c}")) { (c) } } } }
                tr { th { "assignment" } td { (bytes(run.manifest.size)) ", blake3 " code { (run.manifest.blake3.get(..16).unwrap_or("")) } } }
                tr { th { "started" } td { (time(run.started_ms)) } }
                tr { th { "deadline" } td { (time(run.deadline_ms)) } }
                tr { th { "ended" } td {
                    @match ended {
                        Some(at) => { (time(at)) " (took " (span(at.saturating_sub(run.started_ms))) ")" }
                        None => { "running for " (span(now.saturating_sub(run.started_ms))) }
                    }
                } }
                tr { th { "tree" } td { @for s in &shape { (s) br; } @if shape.is_empty() { span.dim { "not recorded" } } } }
            }
            h2 { "Segments and servers" }
            (run_progress(&run, &reports, now))
            h2 { "Per-server outcome" }
            table {
                tr { th { "server" } th { "outcome" } }
                @for (server, o) in &reports { tr { td { (server) } td { (outcome(o)) } } }
            }
            h2 { "History of the run" }
            table {
                tr { th { "time" } th { "event" } }
                @for l in lines.iter().rev() { tr { td { (time(l.at_ms)) } td { (l.event) } } }
            }
        }
    })
}

fn history(m: &Inner, q: &HashMap<String, String>) -> Result<Markup, DbError> {
    let num = |k: &str| q.get(k).and_then(|v| v.trim().parse::<u64>().ok());
    let (job, run, before) = (num("job"), num("run"), num("before"));
    let text = q.get("q").map(|s| s.trim().to_lowercase()).unwrap_or_default();
    let (lines, more) = m.db.history_page(before, HISTORY_PAGE, |e| {
        job.is_none_or(|j| e.job == Some(j))
            && run.is_none_or(|r| e.run == Some(r))
            && (text.is_empty() || e.event.to_lowercase().contains(&text))
    })?;
    let show = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let older = lines.last().map(|l| {
        let mut link = format!("/console/history?before={}", l.seq);
        for (k, v) in [("job", show(job)), ("run", show(run)), ("q", text.clone())] {
            if !v.is_empty() {
                let enc =
                    percent_encoding::utf8_percent_encode(&v, percent_encoding::NON_ALPHANUMERIC);
                link += &format!("&{k}={enc}");
            }
        }
        link
    });
    Ok(html! {
        form.box method="get" action="/console/history" {
            label for="job" { "job" } input #job name="job" value=(show(job)) inputmode="numeric";
            label for="run" { "run" } input #run name="run" value=(show(run)) inputmode="numeric";
            label for="q" { "text" } input #q name="q" value=(text);
            button type="submit" { "Filter" }
        }
        div #history data-live {
            table {
                tr { th { "#" } th { "time" } th { "job" } th { "run" } th { "event" } }
                @for l in &lines {
                    tr {
                        td.num { (l.seq) } td { (time(l.at_ms)) }
                        td.num { (show(l.job)) }
                        td.num { @if let Some(r) = l.run { a href=(format!("/console/runs/{r}")) { (r) } } }
                        td { (l.event) }
                    }
                }
            }
        }
        p {
            @if before.is_some() { a href="/console/history" { "newest" } " · " }
            @if let (true, Some(link)) = (more, older) { a #older href=(link) { "older" } } @else { span.dim { "no older lines" } }
        }
    })
}

/// A rollback button for a site, for the sites page.
pub(crate) fn rollback_button(site: &str, csrf: &str) -> Markup {
    button(&format!("/console/sites/{}/rollback", enc(site)), csrf, "Roll back")
}

/// A path segment, percent-encoded.
pub(crate) fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
