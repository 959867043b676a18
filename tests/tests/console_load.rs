//! Figures for the console (ignored by default; run by hand):
//!
//! ```text
//! cargo test -p cm-tests --test console_load -- --ignored --nocapture   # add --release for optimized figures
//! ```
//!
//! Fills a manager's store with 1,000 servers in 10 segments, a site on all of them and 10,000
//! history lines, starts the manager in this process and measures each console page's time to
//! first byte and to the last byte (median and worst of 20 loads), then the event-stream latency:
//! from a GL posting its segment's report for a run to the first `report` event on the console's
//! stream (what a browser's page receives), median and worst of 50.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cm_manager::db::{Db, DbError};
use cm_manager::model::{
    ContentGroup, HostedSite, Run, RunPhase, SegmentRecord, SegmentRun, SegmentStatus, ServerRecord,
};
use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::manifest::Manifest;
use cm_tree::message::SegmentReport;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

const SEGMENTS: usize = 10;
const PER_SEGMENT: usize = 100;
const HISTORY: u64 = 10_000;

fn fill(db: &Db) -> Result<(), DbError> {
    let now = cm_manager::now_ms();
    let mut all = Vec::new();
    db.write(|t| {
        for s in 0..SEGMENTS {
            let members: Vec<String> = (0..PER_SEGMENT).map(|n| format!("bes-{s}-{n}")).collect();
            for m in &members {
                t.put_server(&ServerRecord {
                    name: m.clone(),
                    segment: format!("seg{s}"),
                    live: true,
                    last_seen_ms: now,
                    plugin: None,
                    space: None,
                    space_ms: 0,
                })?;
            }
            all.extend(members.iter().cloned());
            t.put_segment(&SegmentRecord {
                name: format!("seg{s}"),
                leader: members[0].clone(),
                address: format!("10.0.{s}.1:7400"),
                location: "Etc/UTC".into(),
                cpu_power: 100,
                free_disk: 1 << 40,
                connections: 0,
                members,
                last_report_ms: now,
                static_rank: None,
                leader_history: vec![],
                links: None,
            })?;
        }
        t.put_group(&ContentGroup { name: "all".into(), servers: all.clone() })?;
        t.put_site(&HostedSite {
            name: "www".into(),
            content_group: "all".into(),
            staging: "/srv/www".into(),
            serial: 3,
            prepared: None,
            committed: vec![2, 3],
            keep_releases: 2,
            keep_checkpoints: cm_manager::model::default_keep_checkpoints(),
            holders: all.iter().map(|s| (s.clone(), 3)).collect(),
            removed: Default::default(),
            filter: Default::default(),
            compression: Default::default(),
            golive: None,
            rotation: Default::default(),
            refresh: Default::default(),
            built: Default::default(),
            hot: Default::default(),
        })?;
        Ok::<_, DbError>(())
    })?;
    for chunk in 0..(HISTORY / 1000) {
        db.write(|t| {
            for i in 0..1000 {
                let n = chunk * 1000 + i;
                t.log(
                    now,
                    Some(n % 50),
                    Some(n % 300),
                    format!("history line {n}: run went fine"),
                )?;
            }
            Ok::<_, DbError>(())
        })?;
    }
    Ok(())
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn request(
    http: &Http,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(Duration, hyper::Response<hyper::body::Incoming>)> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let start = Instant::now();
    let resp = http.request(b.body(Full::new(Bytes::from(body.to_string())))?).await?;
    Ok((start.elapsed(), resp))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "figures: run by hand with --ignored --nocapture"]
async fn console_figures() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let filled = Instant::now();
    {
        let db = Db::open(&dir.path().join("manager.redb"))?;
        fill(&db)?;
    }
    println!("store filled in {:.1} s", filled.elapsed().as_secs_f64());
    let cfg = ManagerConfig::new(dir.path().to_path_buf(), "op-token", "agent-token");
    let m = Manager::start(cfg).await?;
    let base = m.url().to_string();
    let http: Http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    let (_, resp) = request(
        &http,
        Method::POST,
        &format!("{base}/console/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "token=op-token",
    )
    .await?;
    let cookie = resp.headers()["set-cookie"].to_str()?.split(';').next().unwrap_or("").to_string();
    assert!(cookie.starts_with("cm_session="));

    println!(
        "\n| page (1,000 servers, 10,000 history lines) | bytes | first byte, median / worst (ms) | complete, median / worst (ms) |"
    );
    println!("|---|---|---|---|");
    for page in [
        "/console/",
        "/console/sites",
        "/console/jobs",
        "/console/runs",
        "/console/history",
        "/console/history?q=line+9999",
        "/console/plugins",
    ] {
        let (mut first, mut whole, mut size) = (vec![], vec![], 0);
        for _ in 0..20 {
            let start = Instant::now();
            let (ttfb, resp) =
                request(&http, Method::GET, &format!("{base}{page}"), &[("cookie", &cookie)], "")
                    .await?;
            assert_eq!(resp.status(), 200, "{page}");
            size = resp.into_body().collect().await?.to_bytes().len();
            first.push(ttfb);
            whole.push(start.elapsed());
        }
        let ((f50, fmax), (w50, wmax)) = (median_max(first), median_max(whole));
        println!("| `{page}` | {size} | {} / {} | {} / {} |", ms(f50), ms(fmax), ms(w50), ms(wmax));
    }

    // Event latency: a run on one segment of 100 servers, its GL's report, the console's stream.
    let manifest_file = dir.path().join("blob");
    std::fs::write(&manifest_file, b"x")?;
    let manifest = Manifest::of_file(&manifest_file, 1 << 20)?;
    let (_, resp) =
        request(&http, Method::GET, &format!("{base}/console/events"), &[("cookie", &cookie)], "")
            .await?;
    let mut body = resp.into_body();
    let mut lat = vec![];
    for i in 0..50u64 {
        let run_id = 1_000 + i;
        let servers: Vec<String> = (0..PER_SEGMENT).map(|n| format!("bes-0-{n}")).collect();
        let run = Run {
            id: run_id,
            job: 1,
            started_ms: cm_manager::now_ms(),
            deadline_ms: u64::MAX,
            phase: RunPhase::Distributing,
            serial: None,
            release: None,
            commit_of: None,
            cache: None,
            manifest: manifest.clone(),
            disk_needed: 1,
            segments: BTreeMap::from([(
                "seg0".to_string(),
                SegmentRun {
                    leader: "bes-0-0".into(),
                    address: "10.0.0.1:7400".into(),
                    status: SegmentStatus::Received,
                    servers: servers.clone(),
                    caches_reported: false,
                },
            )]),
        };
        m.db().write(|t| t.put_run(&run))?;
        // Drain what the run's write published.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), body.frame()).await
        {
        }
        let report = SegmentReport {
            segment: "seg0".into(),
            leader: "bes-0-0".into(),
            succeeded: servers,
            failed: vec![],
            missing: vec![],
            site: String::new(),
        };
        let start = Instant::now();
        let (_, resp) = request(
            &http,
            Method::POST,
            &format!("{base}/api/v1/runs/{run_id}/report"),
            &[("authorization", "Bearer agent-token"), ("content-type", "application/json")],
            &serde_json::to_string(&report)?,
        )
        .await?;
        assert_eq!(resp.status(), 200);
        let mut buf = String::new();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            if let Ok(d) = frame.into_data() {
                buf += &String::from_utf8_lossy(&d);
            }
            if buf.contains(&format!("event: report\ndata: {{\"run\":{run_id},")) {
                lat.push(start.elapsed());
                break;
            }
        }
    }
    let (l50, lmax) = median_max(lat);
    println!(
        "\n| event latency: GL report posted → first `report` event on /console/events | median (ms) | worst (ms) |"
    );
    println!("|---|---|---|");
    println!("| 50 reports of 100 servers each | {} | {} |", ms(l50), ms(lmax));
    Ok(())
}
