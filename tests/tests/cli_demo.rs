//! `cmover demo --serve` end to end: started as a process, it runs the demo's steps and writes
//! `cluster.env` once ready; `cmover status` and `cmover publish demo --wait` work against it
//! from another process with only that file's settings; SIGTERM stops every process it started.

mod cli_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_common::Operator;

/// `KEY=value` lines of cluster.env (values may be single-quoted), without the `export` line.
fn read_env(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// Every process whose parent is `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid …: comm may hold spaces, so read after the last ')'.
        let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1));
        if ppid.and_then(|v| v.parse::<u32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` is still a process that has not exited (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
}

#[test]
fn demo_serve_keeps_a_cluster_an_operator_can_use_and_sigterm_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let mut demo = Command::new(cm_tests::cmover_bin())
        .args([
            "demo",
            "--serve",
            "--segments",
            "2",
            "--servers",
            "2",
            "--heartbeat-ms",
            "100",
            "--dir",
        ])
        .arg(&d)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let output = || std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
    let env_file = d.join("cluster.env");
    let end = Instant::now() + Duration::from_secs(180);
    while !env_file.exists() {
        if let Ok(Some(status)) = demo.try_wait() {
            panic!("the demo ended ({status}) before cluster.env:\n{}", output());
        }
        assert!(Instant::now() < end, "no cluster.env after 180 s:\n{}", output());
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = output();
    assert!(text.contains("console:") && text.contains("operator token"), "{text}");
    let env = read_env(&env_file);
    let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
    let op = Operator::new(&get("CMOVER_MANAGER"), Path::new(&get("CMOVER_TOKEN_FILE")));

    let out = op.expect(0, &["status"]);
    assert!(out.stdout.contains("london") && out.stdout.contains("paris"), "{out:?}");
    assert!(out.stdout.contains("demo=1"), "the rolled-back release is live: {out:?}");
    let j = op.expect(0, &["site", "show", "demo", "--json"]).json();
    assert_eq!(j["content_group"], "all");
    let group = op.expect(0, &["group", "show", "all", "--json"]).json();
    assert_eq!(group["servers"].as_array().unwrap().len(), 4);

    // Edit the staging tree, publish, and every server's live tree has the edit.
    std::fs::write(d.join("staging/index.html"), "<h1>edited by the test</h1>\n").unwrap();
    let out = op.expect(0, &["publish", "demo", "--wait"]);
    assert!(out.stdout.contains("4 of 4 servers succeeded"), "{out:?}");
    let servers = d.join("servers");
    let mut seen = 0;
    for e in std::fs::read_dir(&servers).unwrap().flatten() {
        let index = e.path().join("site/current/index.html");
        if index.exists() {
            assert!(std::fs::read_to_string(&index).unwrap().contains("edited by the test"));
            seen += 1;
        }
    }
    assert_eq!(seen, 4, "live trees under {}", servers.display());

    // SIGTERM: every child goes, and the demo says so.
    let kids = children(demo.id());
    assert_eq!(kids.len(), 5, "the manager and 4 agents: {kids:?}");
    let pid = rustix::process::Pid::from_raw(demo.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status}: {}", output());
    assert!(output().contains("terminated: stopped the cluster"), "{}", output());
    let end = Instant::now() + Duration::from_secs(10);
    while kids.iter().any(|k| alive(*k)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = kids.into_iter().filter(|k| alive(*k)).collect();
    assert!(left.is_empty(), "still running after SIGTERM: {left:?}");
}
