//! Space per server with real processes: one agent's site root is a real 72 MiB tmpfs (mounted
//! by the test; it needs root and skips without it, except under CI). Every agent reports its
//! free space and inodes; the manager computes a run's need from what each server will write
//! and, before distributing, applies the job's space policy:
//!
//! - `fail` (from `cmover publish --space-policy fail`): the run fails before any byte moves,
//!   naming the server with its need and its free space; nothing is built anywhere;
//! - `wait` with a short bound: the job waits, then fails;
//! - `wait`: the job waits until the server has room (the test frees it), then runs everywhere;
//! - `skip`: the run goes on without the short server, which counts as failed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cm_manager::model::{
    CommitPolicy, FsSpace, Job, JobKind, JobPolicy, JobState, OnFailure, OnSpaceShort, Payload,
    Quorum, Run, RunPhase, ServerOutcome, ServerRecord, SpacePolicy,
};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::{missing_part, observe};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A tmpfs of `size` mounted at `at` for the test's life (lazily unmounted when dropped, so a
/// process still inside it does not keep it).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Option<SmallFs> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},nr_inodes=8192"), "tmpfs"])
            .arg(at)
            .output()
            .ok()?;
        if !out.status.success() {
            missing_part(&format!(
                "mounting a {size} tmpfs needs root (CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `n` compressible files of `kib` KiB each under `dir/sub` (so the GL's copy stays small).
fn write_files(dir: &Path, sub: &str, n: usize, kib: usize) {
    fs::create_dir_all(dir.join(sub)).unwrap();
    for f in 0..n {
        let line = format!("{sub} file {f}: the quick brown fox jumps over the lazy dog\n");
        let body: String = line.repeat(kib * 1024 / line.len() + 1)[..kib * 1024].to_string();
        fs::write(dir.join(sub).join(format!("{f:02}.txt")), body).unwrap();
    }
}

fn policy(on_short: OnSpaceShort, wait_ms: u64, min_percent: u8) -> JobPolicy {
    JobPolicy {
        on_failure: OnFailure::Cancel,
        commit: CommitPolicy::Auto,
        quorum: Quorum { min_percent, min_servers: 1 },
        // The default reserve: what the agents' interpreter plugin keeps free (64 MiB).
        space: SpacePolicy { on_short, wait_ms, ..SpacePolicy::default() },
        ..JobPolicy::default()
    }
}

async fn job(c: &TestCluster, id: u64) -> Job {
    c.op.get(&c.url(&format!("jobs/{id}"))).await.unwrap()
}

async fn space_of(c: &TestCluster, server: &str) -> Option<FsSpace> {
    let servers: Vec<ServerRecord> = c.op.get(&c.url("servers")).await.unwrap();
    servers.into_iter().find(|s| s.name == server).and_then(|s| s.space)
}

/// Waits until the manager holds a space report of `server` that passes `ok`.
async fn wait_space(c: &TestCluster, server: &str, ok: impl Fn(&FsSpace) -> bool) -> FsSpace {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = space_of(c, server).await.filter(|s| ok(s)) {
            return s;
        }
        assert!(
            Instant::now() < end,
            "{server}: space {:?}\n{}",
            space_of(c, server).await,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_job(c: &TestCluster, id: u64, what: &str, done: impl Fn(&Job) -> bool) -> Job {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let j = job(c, id).await;
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < end, "job {id} never {what}: {j:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn history(c: &TestCluster, id: u64) -> String {
    let h: Vec<Value> = c.op.get(&c.url(&format!("history?job={id}"))).await.unwrap();
    h.iter().map(|e| e["event"].as_str().unwrap_or_default().to_string() + "\n").collect()
}

async fn runs(c: &TestCluster, id: u64) -> Vec<Run> {
    c.op.get(&c.url(&format!("runs?job={id}"))).await.unwrap()
}

async fn reports(c: &TestCluster, run: u64) -> Vec<(String, ServerOutcome)> {
    let rr: Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
    serde_json::from_value(rr["reports"].clone()).unwrap()
}

fn releases_built(root: &Path) -> usize {
    fs::read_dir(root.join("releases")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_space_policy_decides_for_a_server_on_a_small_filesystem() {
    let src = tempfile::tempdir().unwrap();
    // 2 MiB of content in 16 files.
    write_files(src.path(), "pages", 16, 128);
    let mut c = TestCluster::start(&Layout::new(210, 1, 3), src.path()).await.unwrap();

    // A member (not the GL) gets a 72 MiB filesystem for its site root, 7 MiB of it taken: the
    // 2 MiB of content and the 64 MiB reserve do not fit.
    let leader = c.leader_of("seg0").expect("a GL");
    let small = (0..3).find(|i| *i != leader).unwrap();
    let name = c.agents[small].spec.name.clone();
    c.agents[small].guard.kill();
    let root = c.agents[small].site_root.clone();
    fs::remove_dir_all(&root).unwrap();
    fs::create_dir_all(&root).unwrap();
    let Some(_small_fs) = SmallFs::mount(&root, "72m") else { return };
    let ballast = root.join("ballast");
    fs::write(&ballast, vec![1u8; 7 * MIB as usize]).unwrap();
    c.restart_agent(small).unwrap();
    c.wait_segments(3, Duration::from_secs(30)).await.unwrap();

    // Every server reports its site root's filesystem: the small one its 72 MiB.
    let tight = wait_space(&c, &name, |s| s.total_bytes == 72 * MIB).await;
    assert!(tight.free_bytes < 66 * MIB && tight.total_inodes == 8192, "{tight:?}");
    for a in &c.agents {
        let s = wait_space(&c, &a.spec.name, |_| true).await;
        assert!(s.check().is_ok() && s.free_bytes > 0, "{}: {s:?}", a.spec.name);
    }
    // What an operator sees: the space column of `cmover servers`.
    let token = c.dir.path().join("operator.token");
    fs::write(&token, &c.manager.operator_token).unwrap();
    let cmover = |args: &[&str]| {
        let out = Command::new(cm_tests::cmover_bin())
            .args(args)
            .env("CMOVER_MANAGER", &c.manager.url)
            .env("CMOVER_TOKEN_FILE", &token)
            .env("XDG_CONFIG_HOME", c.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.code(), text + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, table) = cmover(&["servers"]);
    assert_eq!(code, Some(0), "{table}");
    let row = table.lines().find(|l| l.starts_with(&name)).unwrap_or_default();
    assert!(row.contains("of 72.0 MiB free") && row.contains("of 8192 inodes"), "{table}");

    // A space policy is checked like any field of the policy.
    for (space, field) in [
        (json!({"wait_ms": 0}), "policy.space.wait_ms"),
        (json!({"on_short": "later"}), "policy.space.on_short"),
        (json!({"reserve": 1}), "policy.space.reserve"),
    ] {
        let spec = json!({"name": "bad", "kind": "publish", "site": "www",
            "payload": {"type": "staging"}, "policy": {"space": space}});
        let e = c.op.post::<_, Value>(&c.url("jobs"), &spec).await.unwrap_err().to_string();
        assert!(e.contains("400") && e.contains(field), "{field}: {e}");
    }

    // An agent-token holder's space report is checked before anything is stored.
    let agent = cm_tree::http::JsonClient::new(&c.manager.agent_token, Duration::from_secs(10));
    let fs = |free_bytes| {
        json!({"free_bytes": free_bytes, "total_bytes": 10,
        "free_inodes": 1, "total_inodes": 2})
    };
    for (spaces, says) in [
        (json!({"rogue-1": fs(1)}), "spaces name `rogue-1`, which is not a listed member"),
        (json!({"rogue-0": fs(11)}), "space of rogue-0: space report: 11 free bytes of 10"),
    ] {
        let report = json!({"segment": "rogue", "leader": "rogue-0", "address": "127.0.0.1:9",
            "location": "X", "cpu_power": 1, "free_disk": 0, "connections": 0,
            "members": ["rogue-0"], "spaces": spaces});
        let e = agent.post::<_, Value>(&c.url("discovery"), &report).await.unwrap_err();
        assert!(e.to_string().contains("400") && e.to_string().contains(says), "{e}");
    }
    let servers: Value = c.op.get(&c.url("servers")).await.unwrap();
    let segments: Value = c.op.get(&c.url("segments")).await.unwrap();
    assert!(!servers.to_string().contains("rogue"), "nothing stored: {servers}");
    assert!(!segments.to_string().contains("rogue"), "nothing stored: {segments}");

    // fail, from the CLI: the run fails before distribution, naming need against free.
    let (code, out) = cmover(&["publish", "www", "--space-policy", "fail", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let submitted: Job = serde_json::from_str(&out).unwrap();
    assert_eq!(submitted.spec.policy.space.on_short, OnSpaceShort::Fail);
    let j = wait_job(&c, submitted.id, "failed", |j| j.attempts > 0).await;
    let why = j.last_reason.clone().unwrap_or_default();
    assert!(
        why.contains("not enough space before distribution (policy fail)")
            && why.contains(&format!("{name} needs 66.")) // 2 MiB + dirs + 64 MiB reserve
            && why.contains("has 65.0 MiB"),
        "{why}"
    );
    let run = runs(&c, submitted.id).await.pop().unwrap();
    assert!(matches!(&run.phase, RunPhase::Failed { reason } if *reason == why), "{run:?}");
    assert!(
        history(&c, submitted.id).await.contains("run failed before distribution, no byte sent")
    );
    let r = reports(&c, run.id).await;
    assert!(
        matches!(&r[..], [(s, ServerOutcome::Failed { reason })] if *s == name && reason.starts_with("not enough space: ")),
        "{r:?}"
    );
    let _: Value =
        c.op.post(&c.url(&format!("jobs/{}/cancel", submitted.id)), &json!({})).await.unwrap();
    for a in &c.agents {
        assert_eq!(releases_built(&a.site_root), 0, "{}: nothing built", a.spec.name);
    }

    // wait, bounded: the job waits, then fails.
    let short_wait = policy(OnSpaceShort::Wait, 1_500, 100);
    let j = c.submit_with(JobKind::Publish, Payload::Staging, short_wait).await.unwrap();
    let j =
        wait_job(&c, j.id, "cancelled", |j| matches!(j.state, JobState::Cancelled { .. })).await;
    let JobState::Cancelled { reason } = &j.state else { unreachable!() };
    assert!(
        reason.contains("after waiting 1 s (policy wait)") && reason.contains(&name),
        "{reason}"
    );
    assert!(history(&c, j.id).await.contains("before distribution: waiting for space until"));
    for a in &c.agents {
        assert_eq!(releases_built(&a.site_root), 0, "{}: nothing built", a.spec.name);
    }

    // wait: the job waits until the server has room, then goes everywhere.
    let waits = policy(OnSpaceShort::Wait, 120_000, 100);
    let j = c.submit_with(JobKind::Publish, Payload::Staging, waits).await.unwrap();
    let waiting = wait_job(&c, j.id, "waiting", |j| j.space_wait.is_some()).await;
    assert!(waiting.last_reason.as_deref().unwrap_or_default().contains("waiting for space"));
    assert!(runs(&c, j.id).await.is_empty(), "no run while waiting");
    fs::remove_file(&ballast).unwrap();
    let done = wait_job(&c, j.id, "over", |j| {
        matches!(j.state, JobState::Done | JobState::Cancelled { .. })
    })
    .await;
    if done.state != JobState::Done {
        let mut why = Vec::new();
        for r in runs(&c, j.id).await {
            why.push(format!("run {}: {:?} {:?}", r.id, r.phase, reports(&c, r.id).await));
        }
        panic!("{done:?}\n{why:#?}\n{}", c.logs());
    }
    assert!(done.space_wait.is_none());
    c.assert_live_everywhere(&observe(&c.staging), "after waiting for space");

    // skip: 8 MiB more does not fit beside the live release; the others go ahead without it.
    let before = observe(&c.staging);
    // The manager has heard how much the live release took there.
    wait_space(&c, &name, |s| s.free_bytes < 71 * MIB).await;
    write_files(&c.staging, "more", 32, 256);
    let skips = policy(OnSpaceShort::Skip, 1_000, 60);
    let j = c.submit_with(JobKind::Publish, Payload::Staging, skips).await.unwrap();
    wait_job(&c, j.id, "done", |j| {
        assert!(!matches!(j.state, JobState::Cancelled { .. }), "{j:?}\n{}", c.logs());
        j.state == JobState::Done
    })
    .await;
    let dist = runs(&c, j.id).await.into_iter().find(|r| r.commit_of.is_none()).unwrap();
    assert!(dist.segments.values().all(|s| !s.servers.contains(&name)), "{dist:?}");
    let r = reports(&c, dist.id).await;
    let skipped = r.iter().find(|(s, _)| *s == name).map(|(_, o)| o.clone());
    assert!(
        matches!(&skipped, Some(ServerOutcome::Failed { reason }) if reason.starts_with("not enough space (policy skip)")),
        "{r:?}"
    );
    assert_eq!(r.iter().filter(|(_, o)| *o == ServerOutcome::Succeeded).count(), 2, "{r:?}");
    assert!(history(&c, j.id).await.contains("servers short of space, left out (policy skip)"));
    let want = observe(&c.staging);
    for (i, a) in c.agents.iter().enumerate() {
        let live = observe(&a.site_root.join("current"));
        assert_eq!(live, if i == small { before.clone() } else { want.clone() }, "{}", a.spec.name);
    }
}
