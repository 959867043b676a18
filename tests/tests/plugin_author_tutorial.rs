//! The tutorial that opens `docs/plugins.md`, run with the real `cmover` binary: new → build →
//! test → install → list. The SDK comes from this checkout (`--sdk path=…`) and the store is a
//! temporary one; otherwise the commands are the tutorial's, which this test checks against
//! the page. Needs a wasm32 toolchain (skipped without one, except under `CI=true`). Prints the
//! cold build's time (a fresh target dir: the standard library, wit-bindgen and the plugin).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").into()
}

/// The `cmover …` lines of the tutorial's command block in docs/plugins.md.
fn tutorial_commands() -> Vec<String> {
    let page = std::fs::read_to_string(repo().join("docs/plugins.md")).unwrap();
    let block = page
        .split("<!-- tutorial:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- tutorial:end -->").next())
        .expect("docs/plugins.md has the tutorial block");
    block
        .lines()
        .map(|line| line.split(" #").next().unwrap().trim())
        .filter(|line| line.starts_with("cmover ") || line.starts_with("sudo cmover "))
        .map(|line| line.trim_start_matches("sudo ").to_string())
        .collect()
}

/// Run `cmover args… extra…` in `dir`; print and return its output, failing on failure.
fn cmover(dir: &Path, args: &str, extra: &[&str]) -> String {
    let mut command = Command::new(cm_tests::cmover_bin());
    command.current_dir(dir).args(args.split_whitespace().skip(1)).args(extra);
    let output = command.output().expect("cmover runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("$ {args} {}\n{text}", extra.join(" "));
    assert!(output.status.success(), "`{args}` failed:\n{text}");
    text
}

#[test]
fn the_tutorial_runs() {
    if let Err(why) = cm_plugin_build::Toolchain::detect() {
        cm_tests::missing_part(&why.to_string());
        return;
    }
    let commands = tutorial_commands();
    let expected = [
        "cmover plugin new hello --world interpreter",
        "cmover plugin build hello",
        "cmover plugin test hello --staging hello/test/staging",
        "cmover plugin install hello/target/component/hello.wasm --manifest hello/manifest.toml",
        "cmover plugin list",
    ];
    assert_eq!(commands, expected, "docs/plugins.md's tutorial and this test must agree");

    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let sdk = format!("path={}", repo().join("sdk").display());
    let store = dir.join("store");
    let store = store.to_str().unwrap();

    let out = cmover(dir, &commands[0], &["--sdk", &sdk]);
    assert!(out.contains("created hello"), "{out}");
    let manifest = std::fs::read_to_string(dir.join("hello/manifest.toml")).unwrap();
    assert!(manifest.contains("# The sites whose staging trees"), "grants are explained");

    let started = Instant::now();
    let out = cmover(dir, &commands[1], &[]);
    let cold = started.elapsed();
    println!("cold build of a new plugin: {:.1} s", cold.as_secs_f64());
    assert!(out.contains("world:    interpreter"), "{out}");
    let blake3 = out.lines().find_map(|l| l.strip_prefix("blake3:   ")).expect("BLAKE3 printed");
    let component = std::fs::read(dir.join("hello/target/component/hello.wasm")).unwrap();
    assert_eq!(blake3, blake3::hash(&component).to_hex().as_str());

    let out = cmover(dir, &commands[2], &[]);
    // The tree, each command's report and the plugin's log lines (it logs every command).
    assert!(out.contains("  ok      write-file index.html"), "{out}");
    assert!(out.contains("  css/site.css  "), "{out}");
    assert!(out.contains("info   write-file index.html"), "{out}");

    let out = cmover(dir, &commands[3], &["--store", store]);
    assert!(out.contains("interpreter (interpreter): "), "{out}");
    let out = cmover(dir, &commands[4], &["--store", store]);
    assert!(out.contains(&blake3[..12]), "{out}");
}
