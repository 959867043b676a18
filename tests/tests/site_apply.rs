//! Applying assignments to a site with the native interpreter: releases, commit, rollback,
//! backups, hot content, header-only assignments. (`site_plugin.rs` runs the interpreter plugin.)

mod site_common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cm_assignment::AssignmentType;
use cm_site::{NativeInterpreter, ReleaseState, Site, SiteConfig};
use site_common::*;

#[test]
fn publish_commit_rollback_and_backups() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site =
        Site::open(&d.join("site"), SiteConfig { backups: 1, ..SiteConfig::default() }).unwrap();
    let mut interp = NativeInterpreter;

    // Release 1: the whole site (replicate), from empty.
    let v1 = d.join("v1");
    let big = noise(300_000, 1);
    write_tree(
        &v1,
        &[("index.html", b"<h1>one</h1>"), ("img/logo.png", &[1, 2, 3]), ("big.bin", &big)],
        1000,
    );
    let a1 = assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None);
    let r = site.apply(&a1, &mut interp).unwrap();
    assert_eq!(r.now_live, None);
    assert!(!site.live_path().exists(), "nothing is live before a commit");
    assert_eq!(site.commit(None, &mut interp).unwrap(), 1);
    assert_eq!(observe(&site.live_path()), observe(&v1));

    // Release 2: a publish with a delta, a new file and a deletion; live untouched until commit.
    let v2 = d.join("v2");
    let mut big2 = big.clone();
    big2[150_000..150_010].copy_from_slice(b"0123456789");
    write_tree(
        &v2,
        &[("index.html", b"<h1>two</h1>"), ("new.txt", b"new"), ("big.bin", &big2)],
        2000,
    );
    let a2 = assignment(d, "2.cma", AssignmentType::Publish, 2, 1, &v2, Some(&v1));
    let r = site.apply(&a2, &mut interp).unwrap();
    assert!(r.linked >= 1, "unchanged files are hard links");
    assert_eq!(observe(&site.live_path()), observe(&v1), "live unchanged before commit");
    assert_eq!(observe(&site.release_path(2)), observe(&v2));
    // Re-delivery of the same assignment is recognised.
    assert!(site.apply(&a2, &mut interp).unwrap().already_applied);
    site.commit(Some(2), &mut interp).unwrap();
    assert_eq!(observe(&site.live_path()), observe(&v2));

    // Release 3 via a commit assignment (header only), then backups: only 1 kept.
    let v3 = d.join("v3");
    write_tree(&v3, &[("index.html", b"<h1>three</h1>"), ("big.bin", &big2)], 3000);
    site.apply(&assignment(d, "3.cma", AssignmentType::Publish, 3, 2, &v3, Some(&v2)), &mut interp)
        .unwrap();
    let r = site
        .apply(&switch_assignment(d, "c3.cma", AssignmentType::Commit, 4, 3), &mut interp)
        .unwrap();
    assert_eq!(r.now_live, Some(3));
    let st = site.status().unwrap();
    assert_eq!(st.current, Some(3));
    assert_eq!(
        st.releases,
        vec![(2, ReleaseState::Backup), (3, ReleaseState::Live)],
        "release 1 pruned (backups = 1)"
    );

    // Rollback: back to 2, via the API and then a rollback assignment fails (1 is gone).
    assert_eq!(site.rollback(&mut interp).unwrap(), 2);
    assert_eq!(observe(&site.live_path()), observe(&v2));
    let e = site
        .apply(&switch_assignment(d, "rb.cma", AssignmentType::Rollback, 5, 0), &mut interp)
        .unwrap_err();
    assert!(e.to_string().contains("no release 1"), "{e}");
    assert_eq!(observe(&site.live_path()), observe(&v2));
    // Release 3 is now prepared again: a switch assignment makes it live.
    let r = site
        .apply(&switch_assignment(d, "sw.cma", AssignmentType::Switch, 6, 3), &mut interp)
        .unwrap();
    assert_eq!(r.now_live, Some(3));
    assert_eq!(observe(&site.live_path()), observe(&v3));
}

#[test]
fn set_mode_on_a_linked_file_does_not_touch_live() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let mut interp = NativeInterpreter;
    let v1 = d.join("v1");
    write_tree(&v1, &[("a.sh", b"echo hi")], 1000);
    fs::set_permissions(v1.join("a.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    site.apply(&assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None), &mut interp)
        .unwrap();
    site.commit(None, &mut interp).unwrap();
    let v2 = d.join("v2");
    write_tree(&v2, &[("a.sh", b"echo hi")], 1000);
    fs::set_permissions(v2.join("a.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    site.apply(&assignment(d, "2.cma", AssignmentType::Publish, 2, 1, &v2, Some(&v1)), &mut interp)
        .unwrap();
    let live_mode =
        fs::metadata(site.live_path().join("a.sh")).unwrap().permissions().mode() & 0o777;
    assert_eq!(live_mode, 0o644, "live's inode was changed through a hard link");
    assert_eq!(
        fs::metadata(site.release_path(2).join("a.sh")).unwrap().permissions().mode() & 0o777,
        0o755
    );
}

#[test]
fn hot_content_goes_live_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let mut interp = NativeInterpreter;
    let v1 = d.join("v1");
    write_tree(&v1, &[("flash/sale.html", b"50% off")], 1000);
    let r = site
        .apply(&assignment(d, "h.cma", AssignmentType::HotContent, 7, 0, &v1, None), &mut interp)
        .unwrap();
    assert_eq!(r.now_live, Some(7));
    assert_eq!(fs::read(site.live_path().join("flash/sale.html")).unwrap(), b"50% off");
}

#[test]
fn hot_content_overlays_live_and_the_next_publish_commit_and_rollback_work_as_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = SiteConfig { backups: 1, ..SiteConfig::default() };
    let site = Site::open(&d.join("site"), cfg.clone()).unwrap();
    let mut interp = NativeInterpreter;
    let (v1, v2, hot, hot2, v4) =
        (d.join("v1"), d.join("v2"), d.join("h"), d.join("h2"), d.join("v4"));
    write_tree(&v1, &[("index.html", b"one"), ("sale.html", b"sale 1")], 1000);
    write_tree(&v2, &[("index.html", b"two"), ("sale.html", b"sale 2")], 2000);
    write_tree(&hot, &[("index.html", b"two"), ("sale.html", b"HOT")], 3000);
    write_tree(&hot2, &[("index.html", b"two"), ("sale.html", b"HOTTER")], 4000);
    write_tree(&v4, &[("index.html", b"four"), ("sale.html", b"sale 2")], 2000);
    site.apply(&assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None), &mut interp)
        .unwrap();
    site.commit(None, &mut interp).unwrap();
    site.apply(&assignment(d, "2.cma", AssignmentType::Publish, 2, 1, &v2, Some(&v1)), &mut interp)
        .unwrap();
    site.commit(None, &mut interp).unwrap();

    // Hot release 3 on live 2: live at once, the history unchanged (2 is still the committed live).
    let r = site
        .apply(
            &assignment(d, "3.cma", AssignmentType::HotContent, 3, 2, &hot, Some(&v2)),
            &mut interp,
        )
        .unwrap();
    assert_eq!(r.now_live, Some(3));
    assert_eq!(observe(&site.live_path()), observe(&hot));
    let st = site.status().unwrap();
    assert_eq!((st.current, st.history.clone()), (Some(3), vec![1, 2]));
    // Reopening (the crash repair) leaves the overlay alone.
    let site = Site::open(&d.join("site"), cfg).unwrap();
    assert_eq!(site.status().unwrap(), st);

    // A publish against 2 builds on 2, not on the hot release.
    site.apply(&assignment(d, "4.cma", AssignmentType::Publish, 4, 2, &v4, Some(&v2)), &mut interp)
        .unwrap();
    assert_eq!(observe(&site.release_path(4)), observe(&v4));
    assert_eq!(observe(&site.live_path()), observe(&hot), "live unchanged before commit");

    // Hot on hot: the hot release before is discarded.
    site.apply(
        &assignment(d, "5.cma", AssignmentType::HotContent, 5, 2, &hot2, Some(&v2)),
        &mut interp,
    )
    .unwrap();
    assert_eq!(observe(&site.live_path()), observe(&hot2));
    assert!(!site.release_path(3).exists(), "the first hot release is gone");

    // The commit of 4 replaces the overlay; the hot release is discarded, 2 kept for rollback.
    let r = site
        .apply(&switch_assignment(d, "c4.cma", AssignmentType::Commit, 6, 4), &mut interp)
        .unwrap();
    assert_eq!(r.now_live, Some(4));
    assert_eq!(observe(&site.live_path()), observe(&v4));
    let st = site.status().unwrap();
    assert_eq!(st.history, vec![1, 2, 4]);
    assert_eq!(st.releases, vec![(2, ReleaseState::Backup), (4, ReleaseState::Live)]);
    assert_eq!(site.rollback(&mut interp).unwrap(), 2);
    assert_eq!(observe(&site.live_path()), observe(&v2));

    // Hot again, then a rollback: to the release before the base, as without the overlay.
    site.apply(
        &assignment(d, "7.cma", AssignmentType::HotContent, 7, 2, &hot, Some(&v2)),
        &mut interp,
    )
    .unwrap();
    site.apply(&assignment(d, "8.cma", AssignmentType::Publish, 8, 2, &v4, Some(&v2)), &mut interp)
        .unwrap();
    let r = site
        .apply(&switch_assignment(d, "s2.cma", AssignmentType::Switch, 9, 2), &mut interp)
        .unwrap();
    assert_eq!(r.now_live, Some(2), "a switch to the base ends the overlay");
    assert_eq!(observe(&site.live_path()), observe(&v2));
    assert!(!site.release_path(7).exists());
    assert_eq!(site.status().unwrap().history, vec![1, 2], "the base is not committed twice");
}

#[test]
fn an_old_switching_assignment_is_refused_as_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let mut interp = NativeInterpreter;
    let (v1, v2) = (d.join("v1"), d.join("v2"));
    write_tree(&v1, &[("index.html", b"one")], 1000);
    write_tree(&v2, &[("index.html", b"two")], 2000);
    site.apply(&assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None), &mut interp)
        .unwrap();
    let commit_1 = switch_assignment(d, "c1.cma", AssignmentType::Commit, 2, 1);
    site.apply(&commit_1, &mut interp).unwrap();
    site.apply(&assignment(d, "3.cma", AssignmentType::Publish, 3, 1, &v2, Some(&v1)), &mut interp)
        .unwrap();
    site.apply(&switch_assignment(d, "c3.cma", AssignmentType::Commit, 4, 3), &mut interp).unwrap();
    // The genuine commit of release 1, delivered again: refused, live stays release 3.
    let e = site.apply(&commit_1, &mut interp).unwrap_err();
    assert!(matches!(e, cm_site::SiteError::Replay { serial: 2, newest: 4, .. }), "{e}");
    assert_eq!(site.status().unwrap().current, Some(3));
    // So is an old rollback or hot content; a newer one still works.
    let old_rb = switch_assignment(d, "rb.cma", AssignmentType::Rollback, 4, 0);
    assert!(matches!(site.apply(&old_rb, &mut interp), Err(cm_site::SiteError::Replay { .. })));
    let rb = switch_assignment(d, "rb5.cma", AssignmentType::Rollback, 5, 0);
    assert_eq!(site.apply(&rb, &mut interp).unwrap().now_live, Some(1));
    // The newest serial survives reopening the site.
    drop(site);
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let e = site.apply(&switch_assignment(d, "c4.cma", AssignmentType::Commit, 5, 3), &mut interp);
    assert!(matches!(e, Err(cm_site::SiteError::Replay { serial: 5, newest: 5, .. })), "{e:?}");
}
