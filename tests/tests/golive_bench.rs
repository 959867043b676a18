//! Go-live figures (issue 17 §6; `docs/bench/golive.md`), on the stack `golive_rolling`
//! proves with (`cm_tests::golive::GoLiveStack`: four agents, nginx per server, HAProxy,
//! Varnish): the latency a steady load client sees through Varnish while the site is idle and
//! during a rolling commit, and the time a commit of a 1,000-file release takes to go live on
//! the 4 servers with each policy. Figures, not assertions: run with
//! `cargo test -p cm-tests --test golive_bench -- --ignored --nocapture`.

use std::path::Path;
use std::time::{Duration, Instant};

use cm_manager::model::{CommitPolicy, JobKind, JobPolicy, JobState, Payload};
use cm_tests::cluster::{Layout, auto_commit_policy};
use cm_tests::golive::GoLiveStack;
use cm_tests::stack::{Load, LoadReport};
use serde_json::{Value, json};

const FILES: usize = 1000;
const DRAIN_GRACE_MS: u64 = 1000;

fn write_site(staging: &Path, g: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(staging.join("f"))?;
    for i in 0..FILES {
        let body = format!("<p>release gen-{g}</p>\n{}\n", "x".repeat(100 + i % 300));
        std::fs::write(staging.join(format!("f/{i:04}.html")), body)?;
    }
    std::fs::write(staging.join("release.txt"), format!("gen-{g}\n"))?;
    Ok(())
}

fn marker(body: &str) -> Option<String> {
    let rest = body.split("release ").nth(1)?;
    Some(rest.split('<').next()?.to_string())
}

fn paths() -> Vec<String> {
    (0..FILES).map(|i| format!("/f/{i:04}.html")).collect()
}

fn load(front: &str) -> Load {
    Load::start(front, paths(), 3, 4, Duration::from_millis(5), marker)
}

fn row(what: &str, r: &LoadReport, secs: f64) {
    println!(
        "| {what} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
        r.requests,
        r.requests as f64 / secs,
        r.latency_ms(0.5),
        r.latency_ms(0.99),
        r.latency_ms(1.0),
        r.failures.len(),
        r.mixed.len()
    );
}

/// Publishes generation `g` without committing it (the release prepared on every server).
async fn prepare(stack: &GoLiveStack, g: u32) -> anyhow::Result<()> {
    let c = &stack.cluster;
    write_site(&c.staging, g)?;
    let policy = JobPolicy { commit: CommitPolicy::Manual, ..auto_commit_policy() };
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await?;
    let (j, _) = c.finish(job.id, Duration::from_secs(300)).await?;
    anyhow::ensure!(j.state == JobState::Done, "publish {g}: {:?}", j.last_reason);
    Ok(())
}

/// Commits the prepared release with `policy` (the job's own go-live); seconds to done.
async fn commit(stack: &GoLiveStack, policy: Value) -> anyhow::Result<f64> {
    let c = &stack.cluster;
    let go_live = Some(serde_json::from_value(policy)?);
    let t = Instant::now();
    let job = c
        .submit_with(
            JobKind::Commit,
            Payload::Commit { serial: None },
            JobPolicy { go_live, ..auto_commit_policy() },
        )
        .await?;
    let (j, _) = c.finish(job.id, Duration::from_secs(300)).await?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(j.state == JobState::Done, "commit: {:?} {:?}", j.state, j.last_reason);
    Ok(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn golive_latency_and_time_to_live() -> anyhow::Result<()> {
    let site = tempfile::tempdir()?;
    write_site(site.path(), 1)?;
    let Some(stack) = GoLiveStack::start(Layout::new(193, 1, 4), site.path(), true).await? else {
        return Ok(());
    };
    let rolling =
        json!({"policy": "rolling", "group": {"servers": 1}, "on_health_failure": "stop"});
    stack.set_golive(rolling.clone(), DRAIN_GRACE_MS).await?;
    prepare(&stack, 1).await?;
    commit(&stack, json!({"policy": "all_at_once"})).await?;

    println!(
        "\nLoad: 3 clients, sessions of 4 files, 5 ms between requests, a new connection each,"
    );
    println!("through Varnish -> HAProxy -> nginx; 4 servers, {FILES}-file site.\n");
    println!("| phase | requests | req/s | p50 ms | p99 ms | max ms | failed | mixed sessions |");
    println!("|---|---|---|---|---|---|---|---|");
    let t = Instant::now();
    let l = load(stack.front());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let r = l.stop();
    row("idle", &r, t.elapsed().as_secs_f64());

    prepare(&stack, 2).await?;
    let t = Instant::now();
    let l = load(stack.front());
    let rolled = commit(&stack, rolling.clone()).await?;
    let r = l.stop();
    row("rolling commit (1 server a group)", &r, t.elapsed().as_secs_f64());

    let policies = [
        ("all-at-once", json!({"policy": "all_at_once"})),
        ("rolling, 1 server a group", rolling),
        (
            "rolling, 50 % a group",
            json!({"policy": "rolling", "group": {"percent": 50}, "on_health_failure": "stop"}),
        ),
        (
            "canary 1 server, 1 s timer, then 1 a group",
            json!({"policy": "canary", "group": {"servers": 1}, "pause": {"until": "timer", "ms": 1000}}),
        ),
    ];
    println!("\nTime to go live: a commit job of a prepared {FILES}-file release on 4 servers,");
    println!(
        "drain grace {DRAIN_GRACE_MS} ms, health check /release.txt, Varnish purged per group.\n"
    );
    println!("| policy | s to done |");
    println!("|---|---|");
    println!("| rolling, 1 server a group (under the load above) | {rolled:.2} |");
    for (g, (name, policy)) in (3..).zip(policies) {
        prepare(&stack, g).await?;
        let secs = commit(&stack, policy).await?;
        println!("| {name} | {secs:.2} |");
    }
    Ok(())
}
