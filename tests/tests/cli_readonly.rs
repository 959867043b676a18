//! What the CLI does without a cluster: read-only commands create nothing, completions and man
//! pages generate, a second manager on a held data directory says who holds it, and an agent
//! that cannot reach its manager says so in its log.

mod cli_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cli_common::Operator;
use cm_agent::launch::{self, AgentSpec, ManagerOptions};

fn op() -> Operator {
    Operator::new("http://127.0.0.1:9", std::path::Path::new("/nonexistent"))
}

#[test]
fn read_only_commands_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("no-site-here");
    let out = op().run_with(&["site", "status", "--site", site.to_str().unwrap()], &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no site at") && out.stderr.contains("no-site-here"), "{out:?}");
    assert!(!site.exists(), "site status created {}", site.display());

    let store = dir.path().join("plugins");
    let out = op().run_with(&["plugin", "list", "--store", store.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("no plugins installed"), "{out:?}");
    assert!(!store.exists(), "plugin list created {}", store.display());
}

#[test]
fn completions_and_man_pages_generate() {
    for shell in ["bash", "zsh", "fish"] {
        let out = op().run_with(&["completions", shell], &[]);
        assert_eq!(out.code, 0, "{shell}: {out:?}");
        assert!(out.stdout.contains("publish") && out.stdout.contains("rollback"), "{shell}");
    }
    assert_eq!(op().run_with(&["completions", "tcsh"], &[]).code, 2, "an unknown shell is usage");
    let dir = tempfile::tempdir().unwrap();
    let out = op().run_with(&["man", dir.path().to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let page = std::fs::read_to_string(dir.path().join("cmover.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("publish"), "{page}");
    let publish = std::fs::read_to_string(dir.path().join("cmover-publish.1")).unwrap();
    assert!(publish.contains("\\-\\-wait"), "{publish}");
    assert!(dir.path().join("cmover-job-create.1").exists());
}

#[test]
fn a_second_manager_on_a_held_data_directory_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let bin = cm_tests::cmover_bin();
    let first = launch::start_manager(&bin, dir.path(), &ManagerOptions::default()).unwrap();
    let data = dir.path().join("manager");
    // A free port (port 0 is refused by the settings check, before the data directory is opened).
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = std::process::Command::new(&bin)
        .args(["manager", "--listen", &listen.to_string(), "--data-dir"])
        .arg(&data)
        .env("CMOVER_OPERATOR_TOKEN", "operator-token-0123456789")
        .env("CMOVER_AGENT_TOKEN", "agent-token-0123456789")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another manager holds the data directory")
            && stderr.contains(&data.display().to_string()),
        "{stderr}"
    );
    drop(first);
}

#[test]
fn an_agent_that_cannot_reach_the_manager_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let bin = cm_tests::cmover_bin();
    let mut manager = launch::start_manager(&bin, dir.path(), &ManagerOptions::default()).unwrap();
    // The manager goes away; its settings (URL, token, key) stay for the agent.
    manager.guard.kill();
    let secret = launch::write_secret(dir.path()).unwrap();
    let spec = AgentSpec {
        name: "lonely-1".into(),
        node_id: 1,
        segment: "lonely".into(),
        location: "Etc/UTC".into(),
        control: SocketAddr::from(([239, 203, 61, 1], 45_441)),
        data: SocketAddr::from(([239, 203, 61, 2], 45_443)),
        heartbeat_ms: 100,
        report_wait_ms: 1000,
        site_name: "www".into(),
        weight: 0,
        max_rate_mbps: None,
        seal: Default::default(),
        manager_key: None,
        more_sites: Vec::new(),
        extra_toml: String::new(),
    };
    let agent = launch::start_agent(&bin, dir.path(), &manager, &secret, &spec).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let want = format!("cannot reach the manager at {}", manager.url);
    loop {
        let log = std::fs::read_to_string(&agent.guard.log).unwrap_or_default();
        if log.contains(&want) {
            assert!(log.contains("to report segment lonely"), "{log}");
            break;
        }
        assert!(Instant::now() < end, "the agent never said it cannot reach the manager:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
