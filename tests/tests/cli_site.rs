//! `cmover assignment build|show|apply` and `cmover site commit|rollback|status`, driven as a
//! user would: the real binary, real trees, the bundled interpreter plugin by default, a
//! component file, an installed plugin, `--native`, sealing and encryption, and refusals that
//! leave live as it was.

mod site_common;

use std::fs;
use std::path::Path;

use site_common::{cmover, fails, noise, observe, ok, write_tree};

/// v1 and v2 (index changed, big.bin edited in the middle, a new file, a symlink).
fn trees(d: &Path) {
    let big = noise(300_000, 1);
    write_tree(
        &d.join("v1"),
        &[("index.html", b"<h1>one</h1>"), ("big.bin", &big), ("sub/a.txt", b"a")],
        1000,
    );
    let mut big2 = big.clone();
    big2[150_000..150_010].copy_from_slice(b"0123456789");
    write_tree(
        &d.join("v2"),
        &[
            ("index.html", b"<h1>two</h1>"),
            ("big.bin", &big2),
            ("sub/a.txt", b"a"),
            ("sub/new.txt", b"new"),
        ],
        2000,
    );
    std::os::unix::fs::symlink("../index.html", d.join("v2/sub/link")).unwrap();
}

#[test]
fn build_show_apply_commit_rollback_with_the_bundled_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    trees(d);
    let out = ok(
        d,
        &[
            "assignment",
            "build",
            "--type",
            "replicate",
            "--serial",
            "1",
            "--staging",
            "v1",
            "-o",
            "1.cma",
        ],
    );
    assert!(out.contains("replicate 1") && out.contains("4 new"), "{out}");
    let out = ok(
        d,
        &[
            "assignment",
            "build",
            "--serial",
            "2",
            "--base-serial",
            "1",
            "--staging",
            "v2",
            "--shadow",
            "v1",
            "-o",
            "2.cma",
        ],
    );
    assert!(out.contains("2 new, 2 changed (1 as deltas, 10 literal bytes)"), "{out}");
    let out = ok(d, &["assignment", "show", "2.cma"]);
    assert!(
        out.contains("type publish  serial 2")
            && out.contains("hashes: ok")
            && out.contains("apply-delta big.bin base=big.bin"),
        "{out}"
    );

    // Default interpreter: the bundled plugin.
    let out = ok(d, &["assignment", "apply", "--unsigned", "1.cma", "--site", "site"]);
    assert!(out.contains("release 1 built"), "{out}");
    let out = ok(d, &["site", "status", "--site", "site"]);
    assert!(out.contains("live: none") && out.contains("prepared"), "{out}");
    ok(d, &["site", "commit", "--site", "site"]);
    assert_eq!(observe(&d.join("site/current")), observe(&d.join("v1")));

    // A component file as the interpreter.
    let wasm = cm_plugin_host::bundled::dist_dir().join("interpreter.wasm");
    ok(
        d,
        &[
            "assignment",
            "apply",
            "--unsigned",
            "2.cma",
            "--site",
            "site",
            "--interpreter",
            wasm.to_str().unwrap(),
        ],
    );
    assert_eq!(
        observe(&d.join("site/current")),
        observe(&d.join("v1")),
        "live untouched before commit"
    );
    let out = ok(d, &["site", "commit", "--site", "site", "--serial", "2", "--native"]);
    assert!(out.contains("release 2 is live"), "{out}");
    assert_eq!(observe(&d.join("site/current")), observe(&d.join("v2")));
    let out = ok(d, &["site", "status", "--site", "site"]);
    assert!(out.contains("live: release 2") && out.contains("backup"), "{out}");

    let out = ok(d, &["site", "rollback", "--site", "site"]);
    assert!(out.contains("release 1 is live"), "{out}");
    assert_eq!(observe(&d.join("site/current")), observe(&d.join("v1")));

    // Header-only assignments: commit 2 again, then roll back through an assignment.
    ok(
        d,
        &[
            "assignment",
            "build",
            "--type",
            "commit",
            "--serial",
            "3",
            "--target",
            "2",
            "-o",
            "c.cma",
        ],
    );
    let out = ok(d, &["assignment", "apply", "--unsigned", "c.cma", "--site", "site"]);
    assert!(out.contains("release 2 is live"), "{out}");
    ok(d, &["assignment", "build", "--type", "rollback", "--serial", "4", "-o", "r.cma"]);
    ok(d, &["assignment", "apply", "--unsigned", "r.cma", "--site", "site", "--native"]);
    assert_eq!(observe(&d.join("site/current")), observe(&d.join("v1")));

    // A publish without --staging, an unknown type, a missing component: clear refusals.
    let out = fails(d, &["assignment", "build", "--serial", "9", "-o", "x.cma"]);
    assert!(out.contains("--staging is required"), "{out}");
    let out = fails(
        d,
        &[
            "assignment",
            "build",
            "--type",
            "bogus",
            "--staging",
            "v1",
            "--serial",
            "9",
            "-o",
            "x.cma",
        ],
    );
    assert!(out.contains("unknown assignment type"), "{out}");
    let out = fails(
        d,
        &[
            "assignment",
            "apply",
            "--unsigned",
            "2.cma",
            "--site",
            "site",
            "--interpreter",
            "missing.wasm",
        ],
    );
    assert!(out.contains("missing.wasm"), "{out}");
}

#[test]
fn installed_plugin_sealing_encryption_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    trees(d);
    fs::write(d.join("secret"), "cluster secret").unwrap();
    fs::write(
        d.join("m.toml"),
        "name = \"interp\"\nworld = \"interpreter\"\n[grants]\nsites = [\"www\"]\n",
    )
    .unwrap();
    let wasm = cm_plugin_host::bundled::dist_dir().join("interpreter.wasm");
    ok(
        d,
        &["plugin", "install", "--manifest", "m.toml", "--store", "store", wasm.to_str().unwrap()],
    );
    let with_plugin =
        ["--interpreter", "interp", "--plugin-store", "store", "--secret-file", "secret"];

    let build = |serial: &str, staging: &str, shadow: Option<&str>, out: &str| {
        let mut args = vec![
            "assignment",
            "build",
            "--serial",
            serial,
            "--staging",
            staging,
            "-o",
            out,
            "--secret-file",
            "secret",
            "--encrypt",
        ];
        if let Some(s) = shadow {
            args.extend(["--shadow", s]);
        }
        ok(d, &args);
    };
    build("1", "v1", None, "1.cma");
    build("2", "v2", Some("v1"), "2.cma");
    let out = ok(d, &["assignment", "show", "2.cma", "--secret-file", "secret"]);
    assert!(
        out.contains("flags 0x16") && out.contains("hashes: ok"),
        "sealed, encrypted, with the tree manifest: {out}"
    );

    let apply = |file: &str, extra: &[&str]| {
        let mut args = vec!["assignment", "apply", "--unsigned", file, "--site", "www"];
        args.extend(extra);
        cmover(d, &args)
    };
    let (success, out) = apply("1.cma", &with_plugin);
    assert!(success, "{out}");
    ok(
        d,
        &[
            "site",
            "commit",
            "--site",
            "www",
            "--interpreter",
            "interp",
            "--plugin-store",
            "store",
            "--secret-file",
            "secret",
        ],
    );
    assert_eq!(observe(&d.join("www/current")), observe(&d.join("v1")));

    // Without the secret: refused before anything is applied.
    let (success, out) = apply("2.cma", &["--interpreter", "interp", "--plugin-store", "store"]);
    assert!(
        !success && out.contains("2.cma") && out.contains("no key was given to decrypt"),
        "{out}"
    );
    // With another cluster's secret: the seal does not match.
    fs::write(d.join("other"), "another secret").unwrap();
    let (success, out) = apply(
        "2.cma",
        &["--interpreter", "interp", "--plugin-store", "store", "--secret-file", "other"],
    );
    assert!(!success && out.contains("2.cma"), "{out}");
    // A plugin whose grants do not name the site.
    let (success, out) = cmover(
        d,
        &[
            "assignment",
            "apply",
            "--unsigned",
            "2.cma",
            "--site",
            "elsewhere",
            "--interpreter",
            "interp",
            "--plugin-store",
            "store",
            "--secret-file",
            "secret",
        ],
    );
    assert!(!success && out.contains("not granted site `elsewhere`"), "{out}");
    let out = ok(d, &["site", "status", "--site", "www"]);
    assert!(out.contains("live: release 1") && !out.contains("prepared"), "{out}");
    assert_eq!(observe(&d.join("www/current")), observe(&d.join("v1")));

    let (success, out) = apply("2.cma", &with_plugin);
    assert!(success, "{out}");
    ok(d, &["site", "commit", "--site", "www", "--native", "--secret-file", "secret"]);
    assert_eq!(observe(&d.join("www/current")), observe(&d.join("v2")));
}

#[test]
fn signing_keys_from_cert_and_signed_applies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    trees(d);
    let out = ok(d, &["cert", "signing-key", "--dir", "keys", "--name", "m"]);
    assert!(out.contains("keys/m.pub"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(d.join("keys/m.pk8")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the signing key is owner-only");
    // Never overwritten: a second run refuses.
    fails(d, &["cert", "signing-key", "--dir", "keys", "--name", "m"]);
    ok(d, &["cert", "signing-key", "--dir", "keys", "--name", "other"]);
    let build = |key: &str, out: &str| {
        ok(
            d,
            &[
                "assignment",
                "build",
                "--staging",
                "v1",
                "--serial",
                "1",
                "-o",
                out,
                "--signing-key",
                key,
            ],
        )
    };
    build("keys/m.pk8", "m.cma");
    build("keys/other.pk8", "other.cma");
    // Applying needs a decision about signatures.
    let out = fails(d, &["assignment", "apply", "m.cma", "--site", "site", "--native"]);
    assert!(out.contains("--manager-key") && out.contains("--unsigned"), "{out}");
    let out = fails(
        d,
        &[
            "assignment",
            "apply",
            "other.cma",
            "--site",
            "site",
            "--native",
            "--manager-key",
            "keys/m.pub",
        ],
    );
    assert!(out.contains("not one of the pinned manager keys"), "{out}");
    assert!(!d.join("site/releases/1").exists());
    // Rotation: the file pins both keys.
    let both = fs::read_to_string(d.join("keys/m.pub")).unwrap()
        + &fs::read_to_string(d.join("keys/other.pub")).unwrap();
    fs::write(d.join("both.pub"), both).unwrap();
    ok(
        d,
        &[
            "assignment",
            "apply",
            "other.cma",
            "--site",
            "site",
            "--native",
            "--manager-key",
            "both.pub",
        ],
    );
    let out = ok(d, &["assignment", "show", "m.cma", "--manager-key", "keys/m.pub"]);
    assert!(out.contains("hashes and signature: ok"), "{out}");
}
