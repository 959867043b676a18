//! The operator CLI against a live cluster of real processes: `publish --wait`, `commit`,
//! `rollback`, `status`, `servers`, `history`, `job`, `site`, `group` in both their table and
//! `--json` forms, the documented exit codes (quorum not met → 3, manager unreachable → 4, bad
//! usage → 2, a refusal → 1) and the manager's validation as an operator meets it.

mod cli_common;

use std::fs;

use cli_common::Operator;
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;

fn live_equals_staging(c: &TestCluster) -> bool {
    let want = observe(&c.staging);
    c.agents.iter().all(|a| observe(&a.site_root.join("current")) == want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_against_a_live_cluster() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("index.html"), "<h1>one</h1>").unwrap();
    let c = TestCluster::start(&Layout::new(60, 1, 3), src.path()).await.unwrap();
    let op = Operator::new(&c.manager.url, &c.dir.path().join("secrets/operator.token"));
    let names: Vec<String> = c.agents.iter().map(|a| a.spec.name.clone()).collect();

    // status: reachable, the segment and its GL, every server, nothing in flight.
    let out = op.expect(0, &["status"]);
    assert!(
        out.stdout.contains("reachable") && out.stdout.contains("no runs in flight"),
        "{out:?}"
    );
    assert!(names.iter().all(|n| out.stdout.contains(n.as_str())), "{out:?}");
    assert!(out.stdout.contains("SEGMENT") && out.stdout.contains("seg0"), "{out:?}");
    let j = op.expect(0, &["status", "--json"]).json();
    assert_eq!(j["reachable"], true);
    assert_eq!(j["servers"].as_array().unwrap().len(), 3);
    assert_eq!(j["segments"][0]["members"].as_array().unwrap().len(), 3);

    // publish --wait: the publish and its automatic commit reach every server.
    let out = op.expect(0, &["publish", "www", "--wait"]);
    assert!(out.stdout.contains("done: 3 of 3 servers succeeded"), "{out:?}");
    assert!(out.stdout.contains("commit of release 1"), "{out:?}");
    assert!(live_equals_staging(&c), "live differs after publish --wait\n{}", c.logs());

    // servers: each with the release it holds.
    let out = op.expect(0, &["servers"]);
    assert!(names.iter().all(|n| out.stdout.contains(n.as_str())), "{out:?}");
    assert!(out.stdout.contains("www=1") && out.stdout.contains("GL"), "{out:?}");
    let j = op.expect(0, &["servers", "--json"]).json();
    assert!(j.as_array().unwrap().iter().all(|s| s["releases"]["www"] == 1), "{j}");

    // history: filtered and limited, in both forms.
    let out = op.expect(0, &["history", "--limit", "3"]);
    assert_eq!(out.stdout.lines().count(), 4, "a header and 3 entries: {out:?}");
    assert!(out.stdout.starts_with("SEQ"), "{out:?}");
    let j = op.expect(0, &["history", "--job", "1", "--json", "--limit", "0"]).json();
    let entries = j.as_array().unwrap();
    assert!(!entries.is_empty() && entries.iter().all(|e| e["job"] == 1), "{j}");

    // A manual commit: the publish leaves live as it was until `cmover commit`.
    let v1 = observe(&c.staging);
    fs::write(c.staging.join("index.html"), "<h1>two</h1>").unwrap();
    op.expect(0, &["publish", "www", "--manual-commit", "--wait"]);
    assert!(c.agents.iter().all(|a| observe(&a.site_root.join("current")) == v1));
    let out = op.expect(0, &["commit", "www", "--wait"]);
    assert!(out.stdout.contains("done"), "{out:?}");
    assert!(live_equals_staging(&c), "live differs after commit\n{}", c.logs());
    let site = op.expect(0, &["site", "show", "www", "--json"]).json();
    // Serials count every assignment: the first commit took 2, so the second release is 3.
    assert_eq!(site["committed"], serde_json::json!([1, 3]));

    // rollback --to: a serial that was never committed is refused before a job is stored; the
    // release committed before live is switched to.
    let out = op.expect(1, &["rollback", "www", "--to", "2"]);
    assert!(out.stderr.contains("never committed"), "{out:?}");
    op.expect(0, &["rollback", "www", "--to", "1", "--wait"]);
    assert!(c.agents.iter().all(|a| observe(&a.site_root.join("current")) == v1));

    // job list / show / create / cancel.
    let jobs = op.expect(0, &["job", "list", "--json"]).json();
    assert_eq!(jobs.as_array().unwrap().len(), 4, "{jobs}");
    let out = op.expect(0, &["job", "list"]);
    assert!(out.stdout.starts_with("ID") && out.stdout.contains("done"), "{out:?}");
    let out = op.expect(0, &["job", "show", "1"]);
    let state = out.stdout.lines().find(|l| l.starts_with("state")).unwrap_or_default();
    assert!(state.ends_with(" done") && out.stdout.contains("RUN"), "{out:?}");
    // A partial policy is completed with each field's default.
    let far = (cm_manager::now_ms() + 3_600_000).to_string();
    let j = op
        .expect(
            0,
            &[
                "job",
                "create",
                "www",
                "--start-at-ms",
                &far,
                "--policy",
                r#"{"quorum":{"min_percent":50}}"#,
                "--json",
            ],
        )
        .json();
    assert_eq!(
        j["spec"]["policy"]["quorum"],
        serde_json::json!({"min_percent": 50, "min_servers": 1})
    );
    assert_eq!(j["spec"]["policy"]["run_timeout_ms"], 600_000);
    let id = j["id"].as_u64().unwrap().to_string();
    op.expect(0, &["job", "cancel", &id]);
    let out = op.expect(0, &["job", "show", &id, "--json"]);
    assert_eq!(out.json()["job"]["state"]["state"], "cancelled");

    // Validation as an operator meets it: the field, the accepted values, nothing created.
    let out = op.expect(1, &["job", "create", "www", "--policy", r#"{"quorom":{}}"#]);
    assert!(
        out.stderr.contains("policy.quorom") && out.stderr.contains("unknown field"),
        "{out:?}"
    );
    let out = op.expect(1, &["job", "create", "www", "--policy", r#"{"on_conflict":"wait"}"#]);
    assert!(out.stderr.contains("policy.on_conflict") && out.stderr.contains("`queue`"), "{out:?}");
    let spec = c.dir.path().join("mismatch.json");
    fs::write(&spec, r#"{"name":"r","kind":"rollback","site":"www","payload":{"type":"staging"}}"#)
        .unwrap();
    let out = op.expect(1, &["job", "create", "--spec", spec.to_str().unwrap()]);
    assert!(out.stderr.contains("payload.type") && out.stderr.contains("cannot carry"), "{out:?}");
    let out = op.expect(1, &["publish", "nosuchsite"]);
    assert!(out.stderr.contains("site: no hosted site `nosuchsite`"), "{out:?}");
    let out = op.expect(1, &["site", "create", "s2", "--group", "nope", "--staging", "/"]);
    assert!(out.stderr.contains("content_group: no content group `nope`"), "{out:?}");
    op.expect(0, &["group", "create", "g2", "seg0-0"]);
    let out = op.expect(1, &["site", "create", "s2", "--group", "g2", "--staging", "/nonexistent"]);
    assert!(out.stderr.contains("staging: no directory `/nonexistent`"), "{out:?}");
    let out = op.expect(1, &["site", "create", "s2", "--group", "g2", "--staging", "relative/dir"]);
    assert!(out.stderr.contains("not an absolute path"), "{out:?}");
    let out = op.expect(1, &["job", "show", "999"]);
    assert!(out.stderr.contains("404") && out.stderr.contains("no job 999"), "{out:?}");
    let out = op.expect(1, &["site", "show", "nope"]);
    assert!(out.stderr.contains("no hosted site `nope`"), "{out:?}");
    assert_eq!(op.expect(0, &["job", "list", "--json"]).json().as_array().unwrap().len(), 5);
    assert_eq!(op.expect(0, &["site", "list", "--json"]).json().as_array().unwrap().len(), 1);

    // Quorum not met → 3: a group with a server that does not exist.
    op.expect(0, &["group", "create", "ghosts", "seg0-0", "ghost"]);
    let staging = c.staging.display().to_string();
    op.expect(0, &["site", "create", "haunted", "--group", "ghosts", "--staging", &staging]);
    let out = op.expect(3, &["publish", "haunted", "--wait"]);
    assert!(out.stderr.contains("quorum not met") && out.stderr.contains("ghost"), "{out:?}");
    let out = op.expect(0, &["group", "show", "ghosts"]);
    assert!(out.stdout.contains("ghost"), "{out:?}");
    assert!(op.expect(0, &["group", "list"]).stdout.contains("ghosts"));

    // Manager unreachable → 4; usage → 2.
    let port = cm_agent::launch::free_port().unwrap();
    let out = op.expect(4, &["status", "--manager", &format!("http://127.0.0.1:{port}")]);
    assert!(out.stderr.contains("unreachable"), "{out:?}");
    let out = op.expect(2, &["publish"]);
    assert!(out.stderr.contains("SITE"), "{out:?}");
    let out = op.run_with(&["status"], &[]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("no manager given"), "{out:?}");
    // A wrong token: refused (1), and said so.
    let wrong = c.dir.path().join("wrong.token");
    fs::write(&wrong, "not-the-token-at-all").unwrap();
    let out = op.run_with(
        &["status"],
        &[("CMOVER_MANAGER", &c.manager.url), ("CMOVER_TOKEN_FILE", wrong.to_str().unwrap())],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("401"), "{out:?}");
    // The config file, when neither flags nor environment say.
    let cfg = op.config_home.path().join("cmover");
    fs::create_dir_all(&cfg).unwrap();
    fs::write(
        cfg.join("cli.toml"),
        format!("manager = \"{}\"\ntoken_file = \"{}\"\n", c.manager.url, op.token_file.display()),
    )
    .unwrap();
    op.run_with(&["servers"], &[]).code.eq(&0).then_some(()).expect("servers from cli.toml");
}
