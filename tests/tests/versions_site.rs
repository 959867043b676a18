//! A site's versions (cm-site, native interpreter, and the CLI as a user runs it): serials name
//! one assignment each (the same one again is a no-op, another with a taken serial is refused);
//! the release depth a signed switching assignment carries; a rollback to a named release.

mod site_common;

use cm_assignment::{AssignmentType, Meta};
use cm_site::{NativeInterpreter, ReleaseState, Site, SiteConfig};
use site_common::*;

/// A switching assignment carrying a release depth (the header's base-serial field).
fn switch_with_depth(
    dir: &std::path::Path,
    name: &str,
    kind: AssignmentType,
    serial: u64,
    target: u64,
    depth: u64,
) -> std::path::PathBuf {
    let out = dir.join(name);
    cm_assignment::detect::build_switch(
        &out,
        Meta {
            kind,
            serial,
            job_id: 0,
            base_serial: depth,
            target_serial: target,
            site: "www".into(),
        },
        None,
        None,
    )
    .unwrap();
    out
}

#[test]
fn a_serial_names_one_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let mut interp = NativeInterpreter;
    write_tree(&d.join("a"), &[("index.html", b"a")], 1000);
    write_tree(&d.join("b"), &[("index.html", b"b"), ("more.txt", b"more")], 2000);
    assert_eq!(site.next_serial().unwrap(), 1);
    let a = assignment(d, "a.cma", AssignmentType::Replicate, 1, 0, &d.join("a"), None);
    assert!(!site.apply(&a, &mut interp).unwrap().already_applied);
    // The same assignment again: a no-op that says so.
    assert!(site.apply(&a, &mut interp).unwrap().already_applied);
    // Another assignment with the same serial: refused, release 1 untouched.
    let b = assignment(d, "b.cma", AssignmentType::Replicate, 1, 0, &d.join("b"), None);
    let e = site.apply(&b, &mut interp).unwrap_err().to_string();
    assert!(e.contains("release 1 was built from a different assignment"), "{e}");
    assert!(e.contains("serials are unique per site"), "{e}");
    assert_eq!(observe(&site.release_path(1)), observe(&d.join("a")));
    // The next serial moves past everything applied, builds and switches alike.
    assert_eq!(site.next_serial().unwrap(), 2);
    site.apply(&switch_with_depth(d, "c.cma", AssignmentType::Commit, 2, 1, 0), &mut interp)
        .unwrap();
    assert_eq!(site.next_serial().unwrap(), 3);
    let b3 =
        assignment(d, "b3.cma", AssignmentType::Publish, 3, 1, &d.join("b"), Some(&d.join("a")));
    assert!(!site.apply(&b3, &mut interp).unwrap().already_applied);
}

#[test]
fn the_release_depth_of_a_switching_assignment_and_rollback_to_a_named_release() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The site's own setting: 1 backup; the assignments say 4 (live + 3).
    let site =
        Site::open(&d.join("site"), SiteConfig { backups: 1, ..SiteConfig::default() }).unwrap();
    let mut interp = NativeInterpreter;
    let mut prev: Option<std::path::PathBuf> = None;
    let mut serial = 0;
    let mut releases = Vec::new();
    for v in 1..=5u64 {
        let tree = d.join(format!("v{v}"));
        write_tree(&tree, &[("index.html", format!("v{v}").as_bytes())], 1000 + v);
        serial += 1;
        let base = releases.last().copied().unwrap_or(0);
        let kind = if base == 0 { AssignmentType::Replicate } else { AssignmentType::Publish };
        let a = assignment(d, &format!("{v}.cma"), kind, serial, base, &tree, prev.as_deref());
        site.apply(&a, &mut interp).unwrap();
        releases.push(serial);
        serial += 1;
        let c = switch_with_depth(
            d,
            &format!("c{v}.cma"),
            AssignmentType::Commit,
            serial,
            serial - 1,
            4,
        );
        site.apply(&c, &mut interp).unwrap();
        prev = Some(tree);
    }
    let kept: Vec<u64> = site.status().unwrap().releases.iter().map(|(s, _)| *s).collect();
    assert_eq!(kept, releases[1..].to_vec(), "depth 4 from the assignment, not 1 + 1");

    // Back to the second kept release in one step; the ones after it become prepared.
    serial += 1;
    let r = switch_with_depth(d, "r.cma", AssignmentType::Rollback, serial, releases[2], 4);
    assert_eq!(site.apply(&r, &mut interp).unwrap().now_live, Some(releases[2]));
    assert_eq!(observe(&site.live_path()), observe(&d.join("v3")));
    let st = site.status().unwrap();
    assert_eq!(st.history.last(), Some(&releases[2]));
    assert_eq!(
        st.releases.iter().filter(|(_, s)| *s == ReleaseState::Prepared).count(),
        2,
        "{st:?}"
    );
    // A release never committed before live (or pruned) is refused; live stays.
    serial += 1;
    let bad = switch_with_depth(d, "r2.cma", AssignmentType::Rollback, serial, releases[4], 4);
    let e = site.apply(&bad, &mut interp).unwrap_err().to_string();
    assert!(e.contains("was not committed before the live one"), "{e}");
    serial += 1;
    let gone = switch_with_depth(d, "r3.cma", AssignmentType::Rollback, serial, releases[0], 4);
    let e = site.apply(&gone, &mut interp).unwrap_err().to_string();
    assert!(e.contains(&format!("no release {}", releases[0])), "{e}");
    assert_eq!(observe(&site.live_path()), observe(&d.join("v3")));
    // A switch forward to a kept release; depth 2 now prunes down to live + 1.
    serial += 1;
    let s = switch_with_depth(d, "s.cma", AssignmentType::Switch, serial, releases[4], 2);
    assert_eq!(site.apply(&s, &mut interp).unwrap().now_live, Some(releases[4]));
    let kept: Vec<u64> = site.status().unwrap().releases.iter().map(|(s, _)| *s).collect();
    assert_eq!(kept, vec![releases[2], releases[4]]);
}

#[test]
fn the_cli_takes_the_sites_next_serial_and_refuses_a_reused_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tree(&d.join("v1"), &[("index.html", b"one")], 1000);
    write_tree(&d.join("v2"), &[("index.html", b"two")], 2000);
    // No serial and no site: a usage error, nothing written.
    let (success, out) = cmover(d, &["assignment", "build", "--staging", "v1", "-o", "x.cma"]);
    assert!(!success && out.contains("--serial"), "{out}");
    assert!(!d.join("x.cma").exists());
    std::fs::create_dir(d.join("site")).unwrap();
    let build = |staging: &str, out: &str| {
        ok(
            d,
            &[
                "assignment",
                "build",
                "--type",
                "replicate",
                "--staging",
                staging,
                "--site",
                "site",
                "-o",
                out,
            ],
        )
    };
    let apply = |file: &str| {
        cmover(d, &["assignment", "apply", "--unsigned", file, "--site", "site", "--native"])
    };
    assert!(build("v1", "1.cma").contains("replicate 1"), "the first serial of a new site is 1");
    assert!(apply("1.cma").0);
    let (success, out) = apply("1.cma");
    assert!(success && out.contains("already built from this very assignment"), "{out}");
    // Built twice in the same second: serials still differ.
    let out = build("v2", "2.cma");
    assert!(out.contains("replicate 2"), "{out}");
    // Another assignment with a taken serial is refused with the reason.
    ok(
        d,
        &[
            "assignment",
            "build",
            "--type",
            "replicate",
            "--staging",
            "v2",
            "--serial",
            "1",
            "-o",
            "dup.cma",
        ],
    );
    let (success, out) = apply("dup.cma");
    assert!(!success && out.contains("built from a different assignment"), "{out}");
    assert_eq!(observe(&d.join("site/releases/1")), observe(&d.join("v1")));
}
