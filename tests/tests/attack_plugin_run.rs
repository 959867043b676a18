//! Plugin runs that must not install (docs/security.md, "Plugin runs"): a server's applier —
//! its real plugin store and the shipped components — handed plugin runs signed by a key it
//! does not pin, tampered with after signing, unsigned, replayed, or granting another site.
//! Each is refused with the reason and the live interpreter stays; the genuine one installs.

use std::path::Path;

use cm_agent::node::apply::Applier;
use cm_agent::node::sites::SiteSpec;
use cm_assignment::plugin_run::build_plugin_run;
use cm_assignment::{AssignmentType, Meta, SigningKey, TrustedKeys};
use cm_plugin_host::bundled;
use cm_site::SiteConfig;

fn key() -> SigningKey {
    SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
}

/// A plugin run of `wasm` (shipped) granted `sites`, with `serial`, signed by `signer`.
fn plugin_run(
    dir: &Path,
    wasm: &str,
    sites: &[&str],
    serial: u64,
    signer: Option<&SigningKey>,
) -> std::path::PathBuf {
    let manifest = dir.join(format!("manifest-{serial}.toml"));
    std::fs::write(&manifest, bundled::interpreter_manifest("interpreter", sites).to_toml())
        .unwrap();
    let out = dir.join(format!("run-{serial}"));
    let meta = Meta {
        kind: AssignmentType::Plugin,
        serial,
        job_id: 1,
        base_serial: 0,
        target_serial: 0,
        site: "www".into(),
    };
    build_plugin_run(&out, meta, &bundled::dist_dir().join(wasm), &manifest, None, signer.cloned())
        .unwrap();
    out
}

fn short(wasm: &str) -> String {
    let bytes = std::fs::read(bundled::dist_dir().join(wasm)).unwrap();
    blake3::hash(&bytes).to_hex()[..12].to_string()
}

#[test]
fn only_a_fresh_plugin_run_signed_by_a_pinned_key_installs() {
    let d = tempfile::tempdir().unwrap();
    let manager = key();
    let checks = SiteConfig {
        signers: Some(TrustedKeys::new([manager.public_key()])),
        ..SiteConfig::default()
    };
    let default = std::fs::read(bundled::dist_dir().join("interpreter.wasm")).unwrap();
    let applier = Applier::open(
        &[SiteSpec::new("www", d.path().join("www"))],
        &d.path().join("plugins"),
        &default,
        &d.path().join("state"),
        checks,
    )
    .unwrap();
    let bundled_version = applier.interpreter_version().unwrap();
    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let refused = |run: u64, file: &Path, why: &str| {
        let a = applier.apply(run, file);
        let error = a.error.clone().unwrap_or_else(|| panic!("run {run} installed: {a:?}"));
        assert!(error.contains(why), "run {run}: {error}");
        assert_eq!(applier.interpreter_version().unwrap(), bundled_version, "run {run}");
    };

    let rogue = plugin_run(&work, "test-swap-v2.wasm", &["www"], 10, Some(&key()));
    refused(1, &rogue, "not one of the pinned manager keys");

    let unsigned = plugin_run(&work, "test-swap-v2.wasm", &["www"], 11, None);
    refused(2, &unsigned, "not signed");

    let tampered = plugin_run(&work, "test-swap-v2.wasm", &["www"], 12, Some(&manager));
    let mut bytes = std::fs::read(&tampered).unwrap();
    let at = bytes.len() - 100; // inside the component's payload
    bytes[at] ^= 0x20;
    std::fs::write(&tampered, &bytes).unwrap();
    refused(3, &tampered, "plugin run refused");

    let elsewhere = plugin_run(&work, "test-swap-v2.wasm", &["elsewhere"], 13, Some(&manager));
    refused(4, &elsewhere, "www");

    let genuine = plugin_run(&work, "test-swap-v2.wasm", &["www"], 14, Some(&manager));
    let a = applier.apply(5, &genuine);
    assert_eq!(a.error, None, "{a:?}");
    assert_eq!(applier.interpreter_version().unwrap(), short("test-swap-v2.wasm"));

    // An older genuine run (v1), delivered later under a new run id: a replay.
    let old = plugin_run(&work, "test-swap-v1.wasm", &["www"], 9, Some(&manager));
    let a = applier.apply(6, &old);
    assert!(a.error.as_deref().is_some_and(|e| e.contains("replay")), "{a:?}");
    assert_eq!(applier.interpreter_version().unwrap(), short("test-swap-v2.wasm"));
}
