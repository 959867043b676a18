//! Go-live with real parts (issue 17 §6): four agents, each server's site `current` served by
//! its own nginx, HAProxy in front of them (runtime API on a Unix socket, driven by the
//! manager through the bundled HAProxy plugin), Varnish in front of HAProxy (purged by the
//! GL through the bundled Varnish plugin) — `cm_tests::golive::GoLiveStack`. A steady load
//! through Varnish during a rolling publish + commit of a 1,000-file site and during a rolling
//! rollback sees no failed request and no session reading two releases; once each job ended,
//! Varnish serves no object of the old release for any server's sessions; with one server's
//! health check made to fail, that server stays drained on its old release, the run reports
//! it, and the other servers go live.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cm_manager::golive::RollStep;
use cm_manager::model::{HistoryEntry, Job, JobKind, JobPolicy, JobState, Payload};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use cm_tests::golive::{GoLiveStack, HOST};
use cm_tests::stack::{Load, LoadReport};
use serde_json::json;

const FILES: usize = 1000;

/// Writes generation `g` of the site: every file carries the marker `release gen-<g>`.
fn write_site(staging: &Path, g: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(staging.join("f"))?;
    for i in 0..FILES {
        let body = format!("<p>release gen-{g}</p>\n{}\n", "x".repeat(100 + i % 300));
        let (tmp, path) =
            (staging.join(format!(".tmp{i}")), staging.join(format!("f/{i:04}.html")));
        std::fs::write(&tmp, body)?;
        std::fs::rename(tmp, path)?;
    }
    std::fs::write(staging.join(".release.tmp"), format!("gen-{g}\n"))?;
    std::fs::rename(staging.join(".release.tmp"), staging.join("release.txt"))?;
    Ok(())
}

fn marker(body: &str) -> Option<String> {
    let rest = body.split("release ").nth(1)?;
    Some(rest.split('<').next()?.to_string())
}

fn release_of(site_root: &Path) -> String {
    std::fs::read_to_string(site_root.join("current/release.txt")).unwrap_or_default()
}

async fn run_job(
    c: &TestCluster,
    kind: JobKind,
    payload: Payload,
    policy: JobPolicy,
) -> anyhow::Result<Job> {
    let job = c.submit_with(kind, payload, policy).await?;
    let (j, _) = c.finish(job.id, Duration::from_secs(180)).await?;
    Ok(j)
}

fn assert_clean(phase: &str, r: &LoadReport) {
    println!(
        "{phase}: {} requests in {} sessions, {} failed, {} sessions mixing releases, releases seen {:?}",
        r.requests,
        r.sessions,
        r.failures.len(),
        r.mixed.len(),
        r.markers
    );
    assert!(r.requests > 100, "{phase}: the load ran ({} requests)", r.requests);
    assert!(
        r.failures.is_empty(),
        "{phase}: failed requests: {:?}",
        &r.failures[..r.failures.len().min(10)]
    );
    assert!(r.mixed.is_empty(), "{phase}: sessions saw two releases: {:?}", r.mixed);
}

/// Reads every path through Varnish as a session pinned to each of `servers` would: the
/// release markers it got (path → marker, for the first wrong one) and how many were cache hits.
fn through_cache(
    varnish: &str,
    servers: &[String],
    paths: &[String],
    want: &str,
) -> anyhow::Result<(Vec<String>, usize)> {
    let (mut wrong, mut hits) = (Vec::new(), 0);
    for s in servers {
        let cookie = format!("SRV={s}");
        for p in paths {
            let (status, headers, body) =
                cm_tests::web::http(varnish, "GET", HOST, p, &[("Cookie", &cookie)])?;
            let got = marker(&body).unwrap_or_default();
            if status != 200 || got != want {
                wrong.push(format!("{s} {p}: HTTP {status} {got}"));
            }
            hits += usize::from(headers.iter().any(|(k, v)| k == "x-cache" && v == "HIT"));
        }
    }
    Ok((wrong, hits))
}

/// Waits (bounded) for the GL's report of its Varnish calls after job `job`'s commit.
async fn cache_report_of(c: &TestCluster, job: u64) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let history: Vec<HistoryEntry> = c.op.get(&c.url(&format!("history?job={job}"))).await?;
        if let Some(h) = history.iter().find(|h| h.event.starts_with("cache varnish on segment")) {
            return Ok(h.event.clone());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("no cache report for job {job}\n{}", c.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a job ended: no session of `servers` gets anything but release `want` from Varnish.
fn assert_fresh(phase: &str, varnish: &str, servers: &[String], paths: &[String], want: &str) {
    let (wrong, hits) = through_cache(varnish, servers, paths, want).expect("Varnish answers");
    println!(
        "{phase}: {} reads through Varnish after the job ended ({hits} from its cache), {} not {want}",
        servers.len() * paths.len(),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{phase}: Varnish served the old release: {:?}",
        &wrong[..wrong.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_commit_and_rollback_through_varnish_and_haproxy_lose_no_request()
-> anyhow::Result<()> {
    let site = tempfile::tempdir()?;
    write_site(site.path(), 1)?;
    let Some(stack) = GoLiveStack::start(Layout::new(190, 1, 4), site.path(), true).await? else {
        return Ok(());
    };
    let (c, nginx, haproxy) = (&stack.cluster, &stack.nginx, &stack.haproxy);
    let varnish = stack.front().to_string();
    stack
        .set_golive(
            json!({"policy": "rolling", "group": {"servers": 1}, "on_health_failure": "continue"}),
            1000,
        )
        .await?;
    let names: Vec<String> = stack.servers.keys().cloned().collect();

    // The first release goes live at once (a job's own policy overrides the site's).
    let first = JobPolicy { go_live: Some(Default::default()), ..auto_commit_policy() };
    let j = run_job(c, JobKind::Publish, Payload::Staging, first).await?;
    assert_eq!(j.state, JobState::Done, "{:?}\n{}", j.last_reason, c.logs());
    for a in &c.agents {
        assert_eq!(release_of(&a.site_root), "gen-1\n");
    }

    // An all-at-once commit does not wait for the caches: the GL's purge may still be going.
    cache_report_of(c, j.id).await?;
    let paths: Vec<String> = (0..FILES).map(|i| format!("/f/{i:04}.html")).collect();
    // Varnish holds release 1 for every server's sessions: a late purge would show.
    let (wrong, _) = through_cache(&varnish, &names, &paths, "gen-1")?;
    assert!(wrong.is_empty(), "{:?}", &wrong[..wrong.len().min(10)]);
    let (_, hits) = through_cache(&varnish, &names, &paths, "gen-1")?;
    assert_eq!(hits, names.len() * FILES, "Varnish caches each server's copies");
    let load = Load::start(&varnish, paths.clone(), 3, 4, Duration::from_millis(5), marker);
    // A rolling publish + commit under load.
    write_site(&c.staging, 2)?;
    let t = Instant::now();
    let j = run_job(c, JobKind::Publish, Payload::Staging, auto_commit_policy()).await?;
    let publish_s = t.elapsed().as_secs_f64();
    assert_eq!(j.state, JobState::Done, "{:?}\n{}", j.last_reason, c.logs());
    let roll = j.roll.context("the publish rolled")?;
    assert_eq!(roll.groups.len(), 4);
    assert_eq!(roll.live.len(), 4, "{roll:?}");
    for a in &c.agents {
        assert_eq!(release_of(&a.site_root), "gen-2\n");
        assert_eq!(haproxy.admin_state(&a.spec.name)?, 0, "{} back in rotation", a.spec.name);
    }
    assert_fresh("rolling publish", &varnish, &names, &paths, "gen-2");
    // A rolling rollback under the same load.
    let t = Instant::now();
    let j =
        run_job(c, JobKind::Rollback, Payload::Rollback { to: None }, auto_commit_policy()).await?;
    let rollback_s = t.elapsed().as_secs_f64();
    assert_eq!(j.state, JobState::Done, "{:?}\n{}", j.last_reason, c.logs());
    assert!(j.roll.is_some(), "the rollback rolled");
    for a in &c.agents {
        assert_eq!(release_of(&a.site_root), "gen-1\n");
    }
    assert_fresh("rolling rollback", &varnish, &names, &paths, "gen-1");
    let report = load.stop();
    assert_clean("rolling publish + rollback", &report);
    assert!(report.markers.contains("gen-1") && report.markers.contains("gen-2"));
    println!(
        "rolling publish + commit of {FILES} files on 4 servers: {publish_s:.1} s; rolling rollback: {rollback_s:.1} s"
    );

    // One server's health check fails: its nginx answers the marker path wrongly.
    let bad = 3;
    let bad_name = c.agents[bad].spec.name.clone();
    nginx[bad].reload("location = /release.txt { return 200 \"wrong\\n\"; }")?;
    let start = Instant::now();
    loop {
        let (status, body) = http_get(&nginx[bad].address, "/release.txt")?;
        if status == 200 && body == "wrong\n" {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("nginx did not reload: {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load = Load::start(&varnish, paths.clone(), 3, 4, Duration::from_millis(5), marker);
    write_site(&c.staging, 3)?;
    let j = run_job(c, JobKind::Publish, Payload::Staging, auto_commit_policy()).await?;
    let report = load.stop();
    assert_clean("rolling publish with a failing health check", &report);
    assert_eq!(
        j.state,
        JobState::Done,
        "the other groups went on: {:?}\n{}",
        j.last_reason,
        c.logs()
    );
    let roll = j.roll.clone().context("the publish rolled")?;
    assert!(matches!(roll.step, RollStep::Ended { stopped: None }), "{roll:?}");
    let why =
        roll.failed.get(&bad_name).with_context(|| format!("{bad_name} reported: {roll:?}"))?;
    assert!(why.contains("health check failed"), "{why}");
    assert!(j.last_reason.as_deref().unwrap_or("").contains(&bad_name), "{:?}", j.last_reason);
    for (i, a) in c.agents.iter().enumerate() {
        let (want, state) = if i == bad { ("gen-1\n", 0x08) } else { ("gen-3\n", 0) };
        assert_eq!(release_of(&a.site_root), want, "{}", a.spec.name);
        assert_eq!(haproxy.admin_state(&a.spec.name)? & 0x08, state, "{} drained?", a.spec.name);
    }
    let healthy: Vec<String> = names.iter().filter(|n| **n != bad_name).cloned().collect();
    assert_fresh("rolling publish, one server failing", &varnish, &healthy, &paths, "gen-3");
    let history: Vec<HistoryEntry> = c.op.get(&c.url(&format!("history?job={}", j.id))).await?;
    let ours: Vec<&str> =
        history.iter().filter(|h| h.job == Some(j.id)).map(|h| h.event.as_str()).collect();
    assert!(
        ours.iter().any(|e| e.contains("health check") && e.contains(&bad_name)),
        "the history reports the failed check: {ours:#?}"
    );
    // Each group's drain waited on the sessions HAProxy counted (never the blind grace).
    let drains: Vec<&&str> = ours.iter().filter(|e| e.contains("/4 drained: ")).collect();
    assert_eq!(drains.len(), 4, "{ours:#?}");
    for d in drains {
        assert!(
            d.contains("sessions ended after")
                || d.contains("still open after the 1000 ms grace: switching anyway"),
            "{d}"
        );
    }

    // Rotation follows health: once the drained server caught up (it holds the release: a
    // commit of live, at once, switches it), the manager puts it back into rotation and says
    // so in the history.
    nginx[bad].reload("")?;
    let at_once = JobPolicy { go_live: Some(Default::default()), ..auto_commit_policy() };
    let j = run_job(c, JobKind::Commit, Payload::Commit { serial: None }, at_once).await?;
    assert_eq!(j.state, JobState::Done, "{:?}\n{}", j.last_reason, c.logs());
    assert_eq!(release_of(&c.agents[bad].site_root), "gen-3\n");
    let start = Instant::now();
    while haproxy.admin_state(&bad_name)? & 0x08 != 0 {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{bad_name} was not put back into rotation\n{}", c.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The balancer is told first, the history written right after: wait for it too.
    let line = format!("rotation: {bad_name} of site www undrained");
    loop {
        let history: Vec<HistoryEntry> = c.op.get(&c.url("history")).await?;
        if history.iter().any(|h| h.event.starts_with(&line)) {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("rotation's change is not in the history: {history:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn http_get(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: www\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string()))
}
