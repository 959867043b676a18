//! `cmover manager --check-config` and `cmover agent --check-config` (as `haproxy -c`): the
//! annotated example files in docs/ and the files the demo's launcher writes are accepted;
//! bad files are refused with exit 1 and the key named; flags override the file. Real
//! `cmover` processes; nothing is started by a check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cm_agent::launch::{self, ManagerOptions};
use cm_tests::{cmover_bin, workspace_root};

fn cmover(args: &[&str]) -> Output {
    Command::new(cmover_bin()).args(args).env_remove("RUST_LOG").output().expect("run cmover")
}

fn check(role: &str, config: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![role, "--check-config", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = cmover(&args);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(matches!(out.status.code(), Some(0 | 1)), "exit {:?}: {text}", out.status);
    (out.status.success(), text)
}

/// Real secrets and keys under `dir/etc`, for the example files' `/etc/cmover/…` paths.
fn secrets(dir: &Path) -> PathBuf {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    for (f, v) in [
        ("operator.token", "operator-token-0123456789"),
        ("agent.token", "agent-token-0123456789abc"),
        ("metrics.token", "metrics-token-0123456789a"),
        ("seal.key", "seal-secret-0123456789abcd"),
        ("cluster.key", "cluster-secret-0123456789ab"),
    ] {
        std::fs::write(etc.join(f), v).unwrap();
    }
    let out = cmover(&[
        "cert",
        "signing-key",
        "--dir",
        etc.to_str().unwrap(),
        "--name",
        "manager-signing",
    ]);
    assert!(out.status.success(), "{out:?}");
    std::fs::copy(etc.join("manager-signing.pub"), etc.join("manager.pub")).unwrap();
    etc
}

/// The example file with its paths moved under `dir` and its `[tls]` section dropped (TLS
/// needs a cluster CA; `cmover cert` has tests of its own).
fn example(name: &str, dir: &Path, etc: &Path) -> PathBuf {
    let text = std::fs::read_to_string(workspace_root().join("docs").join(name)).unwrap();
    let text = text.split("\n[tls]").next().unwrap().to_string();
    let var = dir.join("var");
    std::fs::create_dir_all(&var).unwrap();
    let text = text
        .replace("/etc/cmover", etc.to_str().unwrap())
        .replace("/var/lib/cmover", var.to_str().unwrap())
        .replace("/srv/www", dir.join("www").to_str().unwrap())
        .replace("10.0.0.1", "127.0.0.1")
        .replace("10.0.0.7", "127.0.0.1");
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    f
}

/// `text` as `role`'s settings is refused, naming everything in `want`.
fn refused(role: &str, dir: &Path, name: &str, text: String, want: &[&str]) {
    let f = dir.join(format!("{name}.toml"));
    std::fs::write(&f, text).unwrap();
    let (ok, out) = check(role, &f, &[]);
    assert!(!ok, "{name}: accepted\n{out}");
    for w in want {
        assert!(out.contains(w), "{name}: `{w}` not named in\n{out}");
    }
}

#[test]
fn the_annotated_examples_pass_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let etc = secrets(dir.path());
    let m = example("manager.example.toml", dir.path(), &etc);
    let (ok, text) = check("manager", &m, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    let a = example("agent.example.toml", dir.path(), &etc);
    let (ok, text) = check("agent", &a, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("configuration OK"), "{text}");
}

#[test]
fn flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let etc = secrets(dir.path());
    let m = example("manager.example.toml", dir.path(), &etc);
    let (ok, text) = check("manager", &m, &["--listen", "127.0.0.1:7999"]);
    assert!(ok && text.contains("API on 127.0.0.1:7999"), "{text}");
    // A bad key in the file is still reported; a flag fixing it makes the check pass.
    let bad = dir.path().join("bad.toml");
    let t = std::fs::read_to_string(&m).unwrap().replace("chunk_kib = 1024", "chunk_kib = 2");
    std::fs::write(&bad, t).unwrap();
    let (ok, text) = check("manager", &bad, &[]);
    assert!(!ok && text.contains("tree.chunk_kib"), "{text}");
    let (ok, text) = check("manager", &bad, &["--chunk-kib", "64"]);
    assert!(ok, "{text}");
}

#[test]
fn bad_manager_settings_are_refused_with_every_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let etc = secrets(dir.path());
    let good = std::fs::read_to_string(example("manager.example.toml", dir.path(), &etc)).unwrap();
    let case =
        |name: &str, text: String, want: &[&str]| refused("manager", dir.path(), name, text, want);
    case("unknown-key", good.replace("[tree]", "[tree]\nfanout = 3"), &["unknown field `fanout`"]);
    case("bad-port", good.replace("127.0.0.1:7700", "127.0.0.1:70000"), &["listen"]);
    case(
        "missing-files",
        good.replace("operator.token", "nope.token").replace("manager-signing.pk8", "nope.pk8"),
        &["auth.operator_token_file", "nope.token", "signing.key_file", "nope.pk8"],
    );
    case(
        "several",
        good.replace("tick_ms = 500", "tick_ms = 1")
            .replace("root_fanout = 2", "root_fanout = 0")
            .replace("level = \"info\"", "level = \"loud\""),
        &["manager.tick_ms", "tree.root_fanout", "log.level"],
    );
    case("port-zero", good.replace("127.0.0.1:7700", "127.0.0.1:0"), &["manager.listen", "port 0"]);
    let short = dir.path().join("short.token");
    std::fs::write(&short, "short").unwrap();
    case(
        "short-token",
        good.replace(etc.join("metrics.token").to_str().unwrap(), short.to_str().unwrap()),
        &["auth.metrics_token_file", "at least 16"],
    );
    case(
        "no-data-dir-parent",
        good.replace("data_dir = \"", "data_dir = \"/nonexistent/deeper"),
        &["manager.data_dir"],
    );
}

#[test]
fn bad_agent_settings_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let etc = secrets(dir.path());
    let good = std::fs::read_to_string(example("agent.example.toml", dir.path(), &etc)).unwrap();
    let case =
        |name: &str, text: String, want: &[&str]| refused("agent", dir.path(), name, text, want);
    case(
        "unknown-key",
        good.replace("[site]", "[site]\nowner = \"www-data\""),
        &["unknown field `owner`"],
    );
    case("no-secret", good.replace("cluster.key", "missing.key"), &["secret_file", "missing.key"]);
    case(
        "metrics-without-token",
        good.replace("token_file = \"", "# token_file = \""),
        &["[metrics]", "token_file"],
    );
    case("bad-level", good.replace("level = \"info\"", "level = \"chatty\""), &["[log] level"]);
    case("bad-address", good.replace("239.192.0.1:7700", "239.192.0.1"), &["control_channel"]);
}

#[test]
fn the_launcher_writes_settings_files_the_check_accepts() {
    // `cmover demo` and the e2e tests start the manager and agents from these files.
    let dir = tempfile::tempdir().unwrap();
    let bin = cmover_bin();
    let m = launch::start_manager(&bin, dir.path(), &ManagerOptions::default()).unwrap();
    let (ok, text) = check("manager", &m.config_file, &[]);
    assert!(ok, "{text}");
    let secret = launch::write_secret(dir.path()).unwrap();
    let spec = launch::AgentSpec {
        name: "a1".into(),
        node_id: 1,
        segment: "seg".into(),
        location: "Etc/UTC".into(),
        control: "239.203.63.1:43901".parse().unwrap(),
        data: "239.203.63.2:43903".parse().unwrap(),
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
    let a = launch::start_agent(&bin, dir.path(), &m, &secret, &spec).unwrap();
    let (ok, text) = check("agent", &a.dir.join("agent.toml"), &[]);
    assert!(ok, "{text}");
}
