//! The manager over its HTTP API: authentication, quorum, conflicts, restart mid-job, discovery.

mod tree_common;

use cm_manager::model::{Job, JobPolicy, JobState, OnBlocked, Quorum};
use cm_manager::server::ManagerConfig;
use cm_tests::loopback::{operator_client, report_discovery};
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::message::DiscoveryReport;
use std::time::{Duration, Instant};
use tree_common::*;

fn status_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    match r {
        Err(ClientError::Status { status, .. }) => status.as_u16(),
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

/// Everything an operator can read: compared before and after the refused requests.
fn state(c: &Cluster) -> Vec<serde_json::Value> {
    ["groups", "sites", "jobs", "runs", "segments", "servers", "history"]
        .iter()
        .map(|p| c.rt.block_on(c.op.get::<serde_json::Value>(&c.api(p))).unwrap())
        .collect()
}

#[test]
fn unauthenticated_or_wrong_role_requests_are_refused_on_every_route_and_change_nothing() {
    let c = Cluster::start(Options::new(1));
    let file = c.dir.path().join("a.bin");
    random_assignment(&file, 1000, 9);
    c.setup_site("site", c.all_servers());
    // A job that is not due yet, so there is something to cancel.
    let spec = serde_json::json!({
        "name": "later", "kind": "publish", "site": "site", "start_at_ms": cm_manager::now_ms() + 3_600_000,
        "payload": { "type": "file", "path": file.display().to_string() }
    });
    let job: Job = c.rt.block_on(c.op.post(&c.api("jobs"), &spec)).unwrap();
    let before = state(&c);
    let report = DiscoveryReport {
        segment: "seg00".into(),
        leader: "intruder".into(),
        address: "127.0.0.1:9".into(),
        location: "X".into(),
        cpu_power: 1,
        free_disk: 0,
        connections: 0,
        members: vec!["intruder".into()],
        links: None,
        plugins: Default::default(),
        spaces: Default::default(),
    };
    let seg_report = serde_json::json!({ "segment": "seg00", "leader": "intruder", "succeeded": ["seg00-s0"], "failed": [], "missing": [] });
    let tree = serde_json::json!({ "segment": "seg00" });
    let id = job.id;
    // (method, path, body, role that may use it) for every route of the API.
    let routes: Vec<(&str, String, serde_json::Value, &str)> = vec![
        ("PUT", "groups/site-group".into(), serde_json::json!({ "servers": ["x"] }), "operator"),
        ("GET", "groups".into(), serde_json::Value::Null, "operator"),
        (
            "PUT",
            "sites/site".into(),
            serde_json::json!({ "content_group": "g", "staging": "/" }),
            "operator",
        ),
        ("GET", "sites".into(), serde_json::Value::Null, "operator"),
        ("POST", "jobs".into(), spec.clone(), "operator"),
        ("GET", "jobs".into(), serde_json::Value::Null, "operator"),
        ("GET", format!("jobs/{id}"), serde_json::Value::Null, "operator"),
        ("POST", format!("jobs/{id}/cancel"), serde_json::json!({}), "operator"),
        ("GET", "runs".into(), serde_json::Value::Null, "operator"),
        ("GET", "runs/1".into(), serde_json::Value::Null, "operator"),
        ("GET", "segments".into(), serde_json::Value::Null, "operator"),
        ("PUT", "segments/seg00/rank".into(), serde_json::json!({ "rank": 1 }), "operator"),
        ("GET", "servers".into(), serde_json::Value::Null, "operator"),
        ("GET", "history".into(), serde_json::Value::Null, "operator"),
        ("POST", "discovery".into(), serde_json::to_value(&report).unwrap(), "agent"),
        ("POST", "dist/1/next".into(), tree.clone(), "agent"),
        ("POST", "dist/1/received".into(), tree.clone(), "agent"),
        ("POST", "dist/1/dead".into(), tree.clone(), "agent"),
        ("POST", "dist/1/reparent".into(), tree.clone(), "agent"),
        ("POST", "runs/1/report".into(), seg_report, "agent"),
    ];
    let send = |client: &JsonClient,
                method: &str,
                url: &str,
                body: &serde_json::Value|
     -> Result<serde_json::Value, ClientError> {
        let m = hyper::Method::from_bytes(method.as_bytes()).unwrap();
        let body = (!body.is_null()).then_some(body);
        c.rt.block_on(client.call::<serde_json::Value, serde_json::Value>(m, url, body))
    };
    let agent = JsonClient::new(AGENT, Duration::from_secs(5));
    for (method, path, body, role) in &routes {
        let url = c.api(path);
        for token in ["", "wrong-token", "operator-token-for-test", "agent-token-for-testsX"] {
            let client = JsonClient::new(token, Duration::from_secs(5));
            assert_eq!(
                status_of(send(&client, method, &url, body)),
                401,
                "{method} {path} with token {token:?}"
            );
        }
        // The other role's token: not a route of that role.
        let other = if *role == "operator" { &agent } else { &c.op };
        assert_eq!(
            status_of(send(other, method, &url, body)),
            404,
            "{method} {path} with the wrong role"
        );
    }
    // The blob of a run, on the manager and on a GL, and the GL's notify endpoint.
    let gl = c.gls[0].node.addr;
    for (url, operator_gets) in
        [(format!("{}/dist/1/blob", c.manager_url), 404), (format!("http://{gl}/dist/1/blob"), 401)]
    {
        for client in [
            JsonClient::new("", Duration::from_secs(5)),
            JsonClient::new("nope", Duration::from_secs(5)),
        ] {
            assert_eq!(
                status_of(send(&client, "GET", &url, &serde_json::Value::Null)),
                401,
                "GET {url}"
            );
        }
        assert_eq!(
            status_of(send(&c.op, "GET", &url, &serde_json::Value::Null)),
            operator_gets,
            "GET {url} as an operator"
        );
    }
    for client in [
        JsonClient::new("", Duration::from_secs(5)),
        JsonClient::new("wrong", Duration::from_secs(5)),
        c.op.clone(),
    ] {
        assert_eq!(
            status_of(send(
                &client,
                "POST",
                &format!("http://{gl}/notify"),
                &serde_json::json!({})
            )),
            401
        );
    }
    assert_eq!(state(&c), before, "refused requests changed nothing");
    assert_eq!(c.gls[0].node.progress(1), None, "no run was started on the GL");
    // The same requests with the right role do change things (the check above is not vacuous).
    assert_eq!(
        c.rt.block_on(
            c.op.post::<_, Job>(&c.api(&format!("jobs/{id}/cancel")), &serde_json::json!({}))
        )
        .unwrap()
        .id,
        id
    );
    assert_ne!(state(&c), before);
}

#[test]
fn a_quorum_shortfall_defers_the_job_with_a_reason() {
    let c = Cluster::start(Options::new(2));
    let file = c.dir.path().join("a.bin");
    random_assignment(&file, 1000, 5);
    // The group has two servers that no GL reports: 2 of 4 live.
    let mut servers = c.all_servers();
    servers.extend(["ghost-1".to_string(), "ghost-2".to_string()]);
    c.setup_site("site", servers);
    let policy = JobPolicy {
        quorum: Quorum { min_percent: 75, min_servers: 1 },
        defer_ms: 60_000,
        ..JobPolicy::default()
    };
    let job = c.submit("site", &file, policy);
    let job = c.wait_job(job.id, Duration::from_secs(10), |j| j.last_reason.is_some());
    assert_eq!(job.state, JobState::Idle);
    let reason = job.last_reason.unwrap();
    assert!(
        reason.starts_with(
            "deferred: quorum not met: 2 of 4 servers live, 3 needed; not live: ghost-1, ghost-2"
        ),
        "{reason}"
    );
    assert!(job.next_run_ms > cm_manager::now_ms() + 50_000, "deferred by defer_ms");
    let runs: Vec<serde_json::Value> = c.rt.block_on(c.op.get(&c.api("runs"))).unwrap();
    assert!(runs.is_empty(), "no run was started");
    assert!(c.history().iter().any(|e| e.starts_with("deferred: quorum not met")));
    // With a cancel policy the same shortfall cancels.
    let policy = JobPolicy {
        quorum: Quorum { min_percent: 75, min_servers: 1 },
        on_quorum_shortfall: OnBlocked::Cancel,
        ..JobPolicy::default()
    };
    let job = c.submit("site", &file, policy);
    let job = c.wait_job(job.id, Duration::from_secs(10), |j| j.state != JobState::Idle);
    assert!(
        matches!(&job.state, JobState::Cancelled { reason } if reason.contains("quorum not met")),
        "{job:?}"
    );
}

#[test]
fn a_conflicting_job_waits_for_the_running_one_or_is_cancelled() {
    let mut o = Options::new(2);
    o.tweak_manager = Box::new(|c| {
        c.chunk_size = 64 << 10;
        c.egress_bytes_per_sec = Some(4 << 20);
    });
    let c = Cluster::start(o);
    let file = c.dir.path().join("a.bin");
    random_assignment_for(&file, 4 << 20, 6, "site");
    // The other site's own assignment (a header names one site).
    let other_file = c.dir.path().join("b.bin");
    random_assignment_for(&other_file, 1000, 7, "other");
    c.setup_site("site", c.all_servers());
    c.setup_site("other", vec![c.all_servers()[0].clone()]);
    let first = c.submit("site", &file, JobPolicy::default());
    c.wait_job(first.id, Duration::from_secs(10), |j| matches!(j.state, JobState::Running { .. }));
    let queued = c.submit("site", &file, JobPolicy::default());
    let cancelled = c.submit(
        "site",
        &file,
        JobPolicy { on_conflict: OnBlocked::Cancel, ..JobPolicy::default() },
    );
    // A different site on the same server is no conflict.
    let other = c.submit("other", &other_file, JobPolicy::default());
    let q = c.wait_job(queued.id, Duration::from_secs(10), |j| j.last_reason.is_some());
    assert_eq!(q.state, JobState::Idle);
    assert_eq!(
        q.last_reason.as_deref(),
        Some(
            format!("queued: job {} is distributing to the same site on shared servers", first.id)
                .as_str()
        )
    );
    let x = c.wait_job(cancelled.id, Duration::from_secs(10), |j| j.state != JobState::Idle);
    assert_eq!(
        x.state,
        JobState::Cancelled {
            reason: format!("conflicts with running job {} (same site, shared servers)", first.id)
        }
    );
    assert_eq!(c.wait_finished(other.id, Duration::from_secs(60)).state, JobState::Done);
    assert_eq!(c.wait_finished(first.id, Duration::from_secs(60)).state, JobState::Done);
    // Once the first is done the queued one runs.
    assert_eq!(c.wait_finished(queued.id, Duration::from_secs(60)).state, JobState::Done);
}

#[test]
fn a_manager_restart_mid_job_loses_no_job_state() {
    let mut o = Options::new(4);
    o.tweak_manager = Box::new(|c| {
        c.chunk_size = 64 << 10;
        c.tree.star_max = 0;
        c.tree.root_fanout = 1;
        c.egress_bytes_per_sec = Some(4 << 20);
    });
    let mut c = Cluster::start(o);
    let file = c.dir.path().join("a.bin");
    random_assignment(&file, 6 << 20, 7);
    let job = c.publish(&file, JobPolicy::default());
    let t0 = Instant::now();
    while c.gls.iter().map(|g| g.node.progress(1).unwrap_or(0)).max().unwrap_or(0) < (1 << 20) {
        assert!(t0.elapsed() < Duration::from_secs(30), "distribution never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let running = c.job(job.id);
    assert_eq!(running.state, JobState::Running { run: 1 });
    c.manager.kill();
    // The manager comes back on the same address and data directory.
    let mut cfg = ManagerConfig::new(c.dir.path().join("manager"), OP, AGENT);
    cfg.listen = c.manager_addr;
    cfg.tick = Duration::from_millis(50);
    cfg.probe_interval = Duration::from_millis(300);
    cfg.chunk_size = 64 << 10;
    cfg.tree.star_max = 0;
    cfg.tree.root_fanout = 1;
    let (url, _, thread) = start_manager(cfg);
    c.manager = thread;
    assert_eq!(url, c.manager_url);
    c.op = operator_client(OP); // the old client's pooled connection died with the old manager
    let after = c.job(job.id);
    assert_eq!(after.state, JobState::Running { run: 1 }, "the run survives the restart");
    assert_eq!((after.attempts, after.spec.clone()), (running.attempts, running.spec.clone()));
    let done = c.wait_finished(job.id, Duration::from_secs(60));
    assert_eq!(done.state, JobState::Done, "{:#?}", c.history());
    let want = hash_of(&file);
    for gl in &c.gls {
        assert_eq!(hash_of(&gl.members[0].1.join("run-1.assignment")), want);
    }
    let h = c.history();
    assert!(h.iter().any(|e| e == "manager restarted or took over: run resumed"), "{h:?}");
    assert_eq!(
        h.iter().filter(|e| e.starts_with("run started")).count(),
        1,
        "the run was resumed, not restarted"
    );
}

#[test]
fn discovery_keeps_segment_names_across_leader_changes_and_tracks_joins_and_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ManagerConfig::new(dir.path().to_path_buf(), OP, AGENT);
    let (url, _, _m) = start_manager(cfg);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut r = DiscoveryReport {
        segment: "boston".into(),
        leader: "b1".into(),
        address: "127.0.0.1:1".into(),
        location: "America/New_York".into(),
        cpu_power: 10,
        free_disk: 1 << 30,
        connections: 3,
        members: vec!["b1".into(), "b2".into(), "b3".into()],
        links: None,
        plugins: Default::default(),
        spaces: Default::default(),
    };
    rt.block_on(report_discovery(&url, AGENT, &r)).unwrap();
    // b1 leaves; b2 takes over; b4 joins.
    r.leader = "b2".into();
    r.address = "127.0.0.1:2".into();
    r.members = vec!["b2".into(), "b3".into(), "b4".into()];
    rt.block_on(report_discovery(&url, AGENT, &r)).unwrap();
    let op = operator_client(OP);
    let segs: Vec<serde_json::Value> =
        rt.block_on(op.get(&format!("{url}/api/v1/segments"))).unwrap();
    assert_eq!(segs.len(), 1, "the segment keeps its name");
    assert_eq!(segs[0]["leader"], "b2");
    let hist: Vec<String> = segs[0]["leader_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hist, ["b1", "b2"]);
    let servers: Vec<serde_json::Value> =
        rt.block_on(op.get(&format!("{url}/api/v1/servers"))).unwrap();
    let live =
        |n: &str| servers.iter().find(|s| s["name"] == n).map(|s| s["live"].as_bool().unwrap());
    assert_eq!((live("b1"), live("b2"), live("b4")), (Some(false), Some(true), Some(true)));
    let history: Vec<serde_json::Value> =
        rt.block_on(op.get(&format!("{url}/api/v1/history"))).unwrap();
    let events: Vec<&str> = history.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(events.contains(&"server b1 left segment boston"), "{events:?}");
    assert!(events.contains(&"server b4 joined segment boston"), "{events:?}");
    assert!(events.contains(&"segment boston: group leader is b2 (was b1)"), "{events:?}");
}
