//! `cmover agent` with no manager and no data channel runs the election only: it starts without
//! an agent token or a `[data]` section, elects a leader with its peers, answers
//! `cmover agent status`, and creates no site or plugin store.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cm_agent::launch::{ProcessGuard, free_port};
use cm_tests::cmover_bin;
use serde_json::Value;

fn status(addr: SocketAddr) -> Option<Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    serde_json::from_str(&body).ok()
}

#[test]
fn an_agent_without_manager_or_data_channel_runs_the_election_only() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cluster.key");
    std::fs::write(&secret, "election-only test secret, 32+ bytes").unwrap();
    let control = "239.203.13.1:44520";
    let mut agents = Vec::new();
    for id in 1..=2u64 {
        let data = dir.path().join(format!("node-{id}"));
        std::fs::create_dir_all(&data).unwrap();
        let status_addr = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
        let config = data.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nid = {id}\nname = \"e-{id}\"\ndata_dir = {data:?}\n\n\
                 [segment]\nname = \"election-only\"\ncontrol_channel = \"{control}\"\ninterface = \"127.0.0.1\"\nloopback = true\nsecret_file = {secret:?}\n\n\
                 [election]\nheartbeat_ms = 100\n\n[status]\nlisten = \"{status_addr}\"\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(cmover_bin());
        cmd.args(["agent", "--config"])
            .arg(&config)
            .env_remove("CMOVER_AGENT_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        let guard = ProcessGuard::spawn(&format!("e-{id}"), cmd, data.join("agent.log")).unwrap();
        agents.push((guard, status_addr, data));
    }
    let end = Instant::now() + Duration::from_secs(20);
    let statuses = loop {
        let st: Vec<Option<Value>> = agents.iter().map(|(_, a, _)| status(*a)).collect();
        let leaders = st.iter().flatten().filter(|s| s["role"] == "leader").count();
        let members = st.iter().flatten().filter(|s| s["role"] == "member").count();
        if leaders == 1 && members == 1 {
            break st;
        }
        for (g, _, _) in agents.iter_mut() {
            assert!(g.is_running(), "{} stopped:\n{}", g.name, g.log_tail(20));
        }
        assert!(Instant::now() < end, "no leader elected: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for (s, (g, _, data)) in statuses.iter().flatten().zip(&agents) {
        assert_eq!(s["segment"], "election-only", "{s}");
        assert!(s["save_errors"].is_u64(), "{s}");
        // No content side: no site, no plugin store.
        assert!(!data.join("site").exists() && !data.join("plugins").exists(), "{}", g.name);
        assert!(g.log_tail(50).contains("election only"), "{}", g.log_tail(50));
    }
    // `cmover agent status` prints it (and the save-error counter is part of the JSON).
    let out = Command::new(cmover_bin())
        .args(["agent", "status", "--status", &agents[0].1.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("segment election-only"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
