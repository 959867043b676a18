//! A canary switch (issue 17 §1) on real processes, without a load balancer: the first group
//! switches alone while the others stay on their release (a commit names its servers; a member
//! not named ignores it), the manager is killed and started again during the pause (the roll's
//! state is in its database), an operator approves with `cmover job approve`, and every server
//! ends on one release.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use cm_manager::golive::RollStep;
use cm_manager::model::{HistoryEntry, Job, JobKind, JobPolicy, JobState, Payload};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use serde_json::json;

fn release_of(a: &cm_agent::launch::AgentProcess) -> String {
    std::fs::read_to_string(a.site_root.join("current/release.txt")).unwrap_or_default()
}

async fn wait_paused(c: &TestCluster, job: u64) -> anyhow::Result<Job> {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let j: Job = c.op.get(&c.url(&format!("jobs/{job}"))).await?;
        if j.roll.as_ref().is_some_and(|r| matches!(r.step, RollStep::Pause { .. })) {
            return Ok(j);
        }
        if Instant::now() > end {
            bail!("job {job} never paused: {:?} {:?}\n{}", j.state, j.roll, c.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cluster whose release "one" is live everywhere and whose release "two" is rolling out as
/// a canary (one server a group, approval), paused after its first group; the publish's job.
async fn paused_canary(
    layout: &Layout,
    site: &std::path::Path,
) -> anyhow::Result<(TestCluster, Job)> {
    std::fs::write(site.join("release.txt"), "one\n")?;
    let c = TestCluster::start(layout, site).await?;
    c.put_site(json!({ "golive": {
        "policy": {"policy": "canary", "group": {"servers": 1}, "pause": {"until": "approval"}},
    }}))
    .await?;
    let first = JobPolicy { go_live: Some(Default::default()), ..auto_commit_policy() };
    let job = c.submit_with(JobKind::Publish, Payload::Staging, first).await?;
    let (j, _) = c.finish(job.id, Duration::from_secs(60)).await?;
    assert_eq!(j.state, JobState::Done, "{:?}", j.last_reason);
    std::fs::write(c.staging.join("release.txt"), "two\n")?;
    let job = c.submit_with(JobKind::Publish, Payload::Staging, auto_commit_policy()).await?;
    let j = wait_paused(&c, job.id).await?;
    Ok((c, j))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canary_pauses_survives_a_manager_restart_and_goes_on_when_approved() -> anyhow::Result<()>
{
    let site = tempfile::tempdir()?;
    let (mut c, j) = paused_canary(&Layout::new(191, 2, 2), site.path()).await?;
    let job = j.clone();
    let roll = j.roll.clone().unwrap_or_else(|| unreachable!());
    let canary = &roll.groups[0];
    assert_eq!(canary.len(), 1);
    let on: BTreeMap<String, String> =
        c.agents.iter().map(|a| (a.spec.name.clone(), release_of(a))).collect();
    for (name, release) in &on {
        let want = if canary.contains(name) { "two\n" } else { "one\n" };
        assert_eq!(release, want, "{name}: only the canary switched; {on:?}");
    }

    // The roll is in the manager's database: a restart picks it up where it was.
    c.kill_manager();
    c.start_manager_again()?;
    let j = wait_paused(&c, job.id).await?;
    assert_eq!(j.roll.as_ref().map(|r| r.current), Some(1));
    for a in &c.agents {
        let want = if canary.contains(&a.spec.name) { "two\n" } else { "one\n" };
        assert_eq!(release_of(a), want, "{} after the restart", a.spec.name);
    }

    // An operator approves with the CLI.
    let out = std::process::Command::new(cm_tests::cmover_bin())
        .args(["job", "approve", &job.id.to_string(), "--manager", &c.manager.url])
        .arg("--token-file")
        .arg(c.dir.path().join("secrets").join("operator.token"))
        .output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (j, _) = c.finish(job.id, Duration::from_secs(90)).await?;
    assert_eq!(j.state, JobState::Done, "{:?}\n{}", j.last_reason, c.logs());
    for a in &c.agents {
        assert_eq!(release_of(a), "two\n", "{}", a.spec.name);
    }
    let roll = j.roll.unwrap_or_else(|| unreachable!());
    assert_eq!(roll.live.len(), 4);
    assert!(roll.approved);
    // Every GL reports its (empty) cache calls at once: no group waited out the bound, however
    // its report raced the roll's steps.
    let history: Vec<HistoryEntry> = c.op.get(&c.url(&format!("history?job={}", job.id))).await?;
    let waited: Vec<&str> = history
        .iter()
        .map(|h| h.event.as_str())
        .filter(|e| e.contains("no cache report from segment"))
        .collect();
    assert!(waited.is_empty(), "{waited:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_canary_switches_back_and_leaves_every_server_on_one_release()
-> anyhow::Result<()> {
    let site = tempfile::tempdir()?;
    let (c, job) = paused_canary(&Layout::new(192, 1, 3), site.path()).await?;
    let j: Job = c.op.post(&c.url(&format!("jobs/{}/abort", job.id)), &json!({})).await?;
    assert!(j.roll.as_ref().is_some_and(|r| r.aborted.is_some()), "{:?}", j.roll);
    let (j, _) = c.finish(job.id, Duration::from_secs(60)).await?;
    assert!(
        matches!(&j.state, JobState::Cancelled { reason } if reason.contains("aborted by")),
        "{:?}",
        j.state
    );
    for a in &c.agents {
        assert_eq!(release_of(a), "one\n", "{} back on the release before", a.spec.name);
    }
    Ok(())
}
