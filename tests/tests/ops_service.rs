//! The manager and agents as services, with real processes: Prometheus `/metrics` after a
//! publish (the counters moved by what happened; refused without credentials), SIGTERM in the
//! middle of a run (the manager exits 0, starts again and the run finishes), SIGHUP after the
//! operator token file changed (old token refused, new accepted), and systemd's readiness
//! protocol without systemd (READY=1 only once the API answers, STOPPING=1 on SIGTERM).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use cm_agent::launch::{self, ManagerOptions};
use cm_manager::model::{CommitPolicy, JobKind, JobPolicy, JobState, OnFailure, Payload, Quorum};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::{cmover_bin, observe};

/// `GET path` over plain HTTP with an optional bearer token: (status, body).
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// Bytes zstd cannot shrink.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().expect("manager address")
}

/// The sum of every sample of `name` whose labels contain all of `labels` (`k="v"` pieces).
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_publish_on_the_manager_and_every_agent_and_need_credentials() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("index.html"), "<h1>metrics</h1>").unwrap();
    // Incompressible, so the publish takes MCTP frames.
    std::fs::write(src.path().join("big.bin"), noise(300_000)).unwrap();
    let c = TestCluster::start(&Layout::new(61, 1, 3), src.path()).await.unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let m = &c.manager;
    let addr = addr_of(&m.url);

    // Refused without credentials, with the agents' token, with a wrong one.
    assert_eq!(get(addr, "/metrics", None).0, 401);
    assert_eq!(get(addr, "/metrics", Some(&m.agent_token)).0, 401);
    assert_eq!(get(addr, "/metrics", Some("not-the-scrape-token")).0, 401);
    let (status, by_scrape) = get(addr, "/metrics", Some(&m.metrics_token));
    assert_eq!(status, 200, "{by_scrape}");
    let (status, text) = get(addr, "/metrics", Some(&m.operator_token));
    assert_eq!(status, 200, "{text}");

    // The publish's distribution run and its commit run, both succeeded.
    let ok = |kind: &str| {
        sample(&text, "cmover_runs_total", &[&format!("kind=\"{kind}\""), "outcome=\"succeeded\""])
    };
    assert_eq!((ok("publish"), ok("commit")), (1.0, 1.0), "{text}");
    assert_eq!(sample(&text, "cmover_runs_total", &["outcome=\"failed\""]), 0.0, "{text}");
    assert_eq!(sample(&text, "cmover_run_duration_seconds_count", &[]), 2.0, "{text}");
    assert!(sample(&text, "cmover_tree_bytes_sent_total", &[]) > 0.0, "{text}");
    let jobs = ["route=\"POST /api/v1/jobs\"", "status=\"201\""];
    assert_eq!(sample(&text, "cmover_http_requests_total", &jobs), 1.0, "{text}");
    assert!(sample(&text, "cmover_http_requests_total", &["status=\"401\""]) >= 3.0, "{text}");

    let leader = c.leader_of("seg0").expect("a GL");
    for (i, a) in c.agents.iter().enumerate() {
        assert_eq!(get(a.metrics, "/metrics", None).0, 401, "{}", a.spec.name);
        assert_eq!(get(a.metrics, "/metrics", Some(&m.agent_token)).0, 401, "{}", a.spec.name);
        let (status, text) = get(a.metrics, "/metrics", Some(&m.metrics_token));
        assert_eq!(status, 200, "{}: {text}", a.spec.name);
        let applied = |kind: &str| {
            sample(&text, "cmover_applies_total", &[&format!("kind=\"{kind}\""), "outcome=\"ok\""])
        };
        assert_eq!((applied("publish"), applied("commit")), (1.0, 1.0), "{}: {text}", a.spec.name);
        assert_eq!(sample(&text, "cmover_apply_duration_seconds_count", &[]), 2.0, "{text}");
        assert!(sample(&text, "cmover_plugin_calls_total", &["outcome=\"ok\""]) >= 2.0, "{text}");
        assert_eq!(sample(&text, "cmover_plugin_calls_total", &["outcome=\"trap\""]), 0.0);
        let leads = sample(&text, "cmover_election_is_leader", &[]);
        if i == leader {
            assert_eq!(leads, 1.0, "{text}");
            assert!(sample(&text, "cmover_election_leaderships_total", &[]) >= 1.0, "{text}");
            // Both runs went down the tree to this GL and out to the members by MCTP.
            assert!(sample(&text, "cmover_tree_bytes_received_total", &[]) > 0.0, "{text}");
            let complete = sample(&text, "cmover_mctp_sessions_total", &["outcome=\"complete\""]);
            assert_eq!(complete, 2.0, "{text}");
            assert!(sample(&text, "cmover_mctp_passes_total", &[]) >= 1.0, "{text}");
            assert!(sample(&text, "cmover_mctp_frames_sent_total", &[]) > 0.0, "{text}");
            assert!(sample(&text, "cmover_mctp_rate_bytes_per_second", &[]) > 0.0, "{text}");
        } else {
            assert_eq!(leads, 0.0, "{}: {text}", a.spec.name);
            assert_eq!(sample(&text, "cmover_mctp_sessions_total", &[]), 0.0, "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_exits_zero_and_the_run_finishes_after_a_restart() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("index.html"), "<h1>graceful</h1>").unwrap();
    // Large and at a capped MCTP rate: the run is still out when the manager stops.
    let noise: Vec<u8> =
        (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(src.path().join("video.bin"), noise).unwrap();
    let mut layout = Layout::new(62, 1, 2);
    layout.max_rate_mbps = Some(8);
    let mut c = TestCluster::start(&layout, src.path()).await.unwrap();
    let policy = JobPolicy {
        on_failure: OnFailure::Cancel,
        commit: CommitPolicy::Auto,
        quorum: Quorum { min_percent: 100, min_servers: 1 },
        ..JobPolicy::default()
    };
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await.unwrap();
    let run = c.run_of(job.id, Duration::from_secs(20)).await.unwrap();
    let exit = c.manager.guard.terminate(Duration::from_secs(30));
    let exit = exit.expect("the manager stopped by itself within the grace period");
    assert!(exit.success(), "SIGTERM: {exit:?}\n{}", c.manager.guard.log_tail(20));
    let log = std::fs::read_to_string(&c.manager.guard.log).unwrap();
    assert!(log.contains("manager stopped"), "{log}");

    c.start_manager_again().unwrap();
    let (j, reports) = c.finish(job.id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{:?}; {reports:?}\n{}", j.last_reason, c.logs());
    let rr: serde_json::Value = c.op.get(&c.url(&format!("runs/{run}"))).await.unwrap();
    assert_eq!(rr["run"]["phase"]["phase"], "succeeded", "the run from before the stop: {rr}");
    let want = observe(&c.staging);
    for a in &c.agents {
        assert_eq!(observe(&a.site_root.join("current")), want, "{}", a.spec.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_the_new_operator_token_and_refuses_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut m =
        launch::start_manager(&cmover_bin(), dir.path(), &ManagerOptions::default()).unwrap();
    let addr = addr_of(&m.url);
    let old = m.operator_token.clone();
    assert_eq!(get(addr, "/api/v1/jobs", Some(&old)).0, 200);
    let new = launch::token(24);
    std::fs::write(dir.path().join("secrets/operator.token"), &new).unwrap();
    m.guard.hangup();
    let end = Instant::now() + Duration::from_secs(20);
    while get(addr, "/api/v1/jobs", Some(&new)).0 != 200 {
        assert!(Instant::now() < end, "the new token never worked\n{}", m.guard.log_tail(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(addr, "/api/v1/jobs", Some(&old)).0, 401, "the old token still works");
    assert!(m.guard.is_running(), "SIGHUP stopped the manager");
    assert!(m.guard.log_tail(10).contains("SIGHUP: settings reloaded"), "{}", m.guard.log_tail(10));
}

/// Reads one datagram (the systemd notify protocol: `KEY=value` lines) within `limit`.
fn notification(sock: &UnixDatagram, limit: Duration) -> String {
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_sent_once_the_api_answers_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    // A manager started by hand, told where systemd would listen.
    let probe = tempfile::tempdir().unwrap();
    let m = launch::start_manager(&cmover_bin(), probe.path(), &ManagerOptions::default()).unwrap();
    let config = m.config_file.clone();
    drop(m);
    let mut cmd = std::process::Command::new(cmover_bin());
    cmd.arg("manager").arg("--config").arg(&config).env("NOTIFY_SOCKET", &socket_path);
    let mut guard =
        launch::ProcessGuard::spawn("manager", cmd, dir.path().join("manager.log")).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let listen = text.lines().find_map(|l| l.strip_prefix("listen = ")).unwrap().trim_matches('"');
    let addr: SocketAddr = listen.parse().unwrap();

    let ready = notification(&sock, Duration::from_secs(30));
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // READY=1 came after the API started answering, not before.
    assert_eq!(get(addr, "/healthz", None).0, 200, "READY=1 before the API answered");

    assert!(guard.id().is_some());
    let exit = {
        // SIGTERM, then STOPPING=1 and a clean exit.
        let pid = guard.id().unwrap();
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()));
        let stopping = notification(&sock, Duration::from_secs(30));
        assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
        guard.terminate(Duration::from_secs(30))
    };
    // It exited by itself within the grace period, successfully.
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}\n{}", guard.log_tail(20));
}

/// Figure for the report: `/metrics` scrape time on a manager with 1,000 servers in its store
/// (10 segments of 100, registered by discovery reports). Prints the median and worst of 200
/// scrapes. `cargo test -p cm-tests --test ops_service -- --ignored --nocapture scrape`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a figure, not a check"]
async fn scrape_time_with_a_thousand_servers() {
    let dir = tempfile::tempdir().unwrap();
    let m = launch::start_manager(&cmover_bin(), dir.path(), &ManagerOptions::default()).unwrap();
    let agent = cm_tree::http::JsonClient::new(&m.agent_token, Duration::from_secs(10));
    for s in 0..10 {
        let report = serde_json::json!({
            "segment": format!("seg{s}"), "leader": format!("seg{s}-0"),
            "address": "127.0.0.1:9", "location": "Etc/UTC", "cpu_power": 1, "free_disk": 1,
            "connections": 0,
            "members": (0..100).map(|n| format!("seg{s}-{n}")).collect::<Vec<_>>(),
        });
        let _: serde_json::Value =
            agent.post(&format!("{}/api/v1/discovery", m.url), &report).await.unwrap();
    }
    let op = m.operator_client().unwrap();
    let servers: Vec<serde_json::Value> =
        op.get(&format!("{}/api/v1/servers", m.url)).await.unwrap();
    assert_eq!(servers.len(), 1000);
    let addr = addr_of(&m.url);
    let mut took: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            let (status, body) = get(addr, "/metrics", Some(&m.metrics_token));
            assert_eq!(status, 200, "{body}");
            t.elapsed()
        })
        .collect();
    took.sort();
    println!(
        "/metrics with 1,000 servers: median {:?}, worst {:?} (200 scrapes)",
        took[100], took[199]
    );
}
