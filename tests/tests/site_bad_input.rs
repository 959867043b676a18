//! Bad input never touches live: wrong base, a delta against a drifted file, forged,
//! truncated, corrupted or escaping assignments, a failing interpreter, a full disk. Each
//! error names the assignment, the command and why; the half-built release is gone.

mod site_common;

use std::fs;
use std::path::{Path, PathBuf};

use cm_assignment::format::HEADER_LEN;
use cm_assignment::{AssignmentType, SealKey, StreamedCommand};
use cm_site::{
    CommandReport, Interpreter, InterpreterError, NativeInterpreter, Site, SiteConfig, layout,
};
use site_common::*;

/// A site with release 1 live (`v1`), plus the directory holding everything.
fn live_site(d: &Path, config: SiteConfig) -> (Site, PathBuf) {
    let site = Site::open(&d.join("site"), config).unwrap();
    let v1 = d.join("v1");
    write_tree(
        &v1,
        &[("index.html", b"<h1>one</h1>"), ("big.bin", &noise(200_000, 1)), ("sub/a.txt", b"a")],
        1000,
    );
    site.apply(
        &assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None),
        &mut NativeInterpreter,
    )
    .unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();
    (site, v1)
}

/// v2: index changed, big.bin edited in the middle (a delta), a new file.
fn v2(d: &Path) -> PathBuf {
    let v2 = d.join("v2");
    let mut big = noise(200_000, 1);
    big[100_000..100_020].copy_from_slice(&[0xAA; 20]);
    write_tree(
        &v2,
        &[
            ("index.html", b"<h1>two</h1>"),
            ("big.bin", &big),
            ("sub/a.txt", b"a"),
            ("new.txt", b"n"),
        ],
        2000,
    );
    v2
}

/// Live is release 1 with v1's content, and nothing half-built is left.
fn assert_untouched(site: &Site, v1: &Path) {
    assert_eq!(site.status().unwrap().current, Some(1));
    assert_eq!(observe(&site.live_path()), observe(v1));
    assert!(
        layout::leftovers(site.root()).unwrap().is_empty(),
        "a half-built release was left behind"
    );
    assert!(!site.release_path(2).exists());
}

#[test]
fn wrong_base_release() {
    let dir = tempfile::tempdir().unwrap();
    let (site, v1) = live_site(dir.path(), SiteConfig::default());
    let a =
        assignment(dir.path(), "2.cma", AssignmentType::Publish, 2, 5, &v2(dir.path()), Some(&v1));
    let e = site.apply(&a, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("2.cma") && e.contains("built against release 5, but live is 1"), "{e}");
    assert_untouched(&site, &v1);
}

#[test]
fn delta_against_a_drifted_file() {
    let dir = tempfile::tempdir().unwrap();
    let (site, v1) = live_site(dir.path(), SiteConfig::default());
    // The server's copy of big.bin drifted from the shadow copy (a new inode, as an operator's
    // editor would write it).
    let live_big = site.release_path(1).join("big.bin");
    let tmp = site.release_path(1).join("big.tmp");
    fs::write(&tmp, noise(200_000, 99)).unwrap();
    fs::rename(&tmp, &live_big).unwrap();
    let before = observe(&site.live_path());
    let a =
        assignment(dir.path(), "2.cma", AssignmentType::Publish, 2, 0, &v2(dir.path()), Some(&v1));
    let e = site.apply(&a, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(
        e.contains("2.cma") && e.contains("apply-delta big.bin") && e.contains("wrong base"),
        "{e}"
    );
    assert!(e.contains("discarded, live unchanged"), "{e}");
    assert_eq!(observe(&site.live_path()), before);
    assert!(layout::leftovers(site.root()).unwrap().is_empty());
}

#[test]
fn forged_truncated_and_corrupted_assignments() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = SealKey::derive(b"cluster secret");
    let site =
        Site::open(&d.join("site"), SiteConfig { key: Some(key.clone()), ..SiteConfig::default() })
            .unwrap();
    let v1 = d.join("v1");
    write_tree(&v1, &[("index.html", b"<h1>one</h1>")], 1000);
    let mut opts = cm_assignment::BuildOptions::new(AssignmentType::Replicate, 1);
    opts.seal = Some(key);
    cm_assignment::build(&v1, None, &d.join("1.cma"), &opts).unwrap();
    site.apply(&d.join("1.cma"), &mut NativeInterpreter).unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();

    let unsealed = assignment(d, "2.cma", AssignmentType::Publish, 2, 1, &v2(d), Some(&v1));
    let e = site.apply(&unsealed, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("2.cma") && e.contains("not sealed"), "{e}");

    let mut opts = cm_assignment::BuildOptions::new(AssignmentType::Publish, 2);
    opts.seal = Some(SealKey::derive(b"attacker guess"));
    cm_assignment::build(&v2(d), Some(&v1), &d.join("forged.cma"), &opts).unwrap();
    let e = site.apply(&d.join("forged.cma"), &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("forged.cma") && e.contains("forged"), "{e}");

    let bytes = fs::read(d.join("1.cma")).unwrap();
    fs::write(d.join("cut.cma"), &bytes[..bytes.len() - 3]).unwrap();
    let e = site.apply(&d.join("cut.cma"), &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("cut.cma") && e.contains("truncated"), "{e}");

    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    fs::write(d.join("flip.cma"), &flipped).unwrap();
    let e = site.apply(&d.join("flip.cma"), &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("flip.cma") && e.contains("corrupted"), "{e}");
    assert_untouched(&site, &v1);
}

#[test]
fn a_command_escaping_the_site_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (site, v1) = live_site(d, SiteConfig::default());
    // A well-formed assignment whose symlink target is then rewritten to climb out of the site,
    // with the (unkeyed) trailer recomputed, as a forger without the key could.
    let v2 = d.join("v2x");
    write_tree(
        &v2,
        &[("index.html", b"<h1>one</h1>"), ("big.bin", &noise(200_000, 1)), ("sub/a.txt", b"a")],
        1000,
    );
    std::os::unix::fs::symlink("aaaaaaaa", v2.join("link")).unwrap();
    let a = assignment(d, "esc.cma", AssignmentType::Publish, 2, 1, &v2, Some(&v1));
    let mut bytes = fs::read(&a).unwrap();
    let at = bytes.windows(8).position(|w| w == b"aaaaaaaa").unwrap();
    bytes[at..at + 8].copy_from_slice(b"../../..");
    let h = cm_assignment::format::Header::decode(&bytes[..HEADER_LEN]).unwrap();
    let body_end = HEADER_LEN + h.body_len as usize;
    let trailer = blake3::hash(&bytes[..body_end]);
    bytes[body_end..body_end + 32].copy_from_slice(trailer.as_bytes());
    fs::write(&a, &bytes).unwrap();
    let e = site.apply(&a, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(
        e.contains("esc.cma") && e.contains("command 0") && e.contains("escapes the site"),
        "{e}"
    );
    assert_untouched(&site, &v1);
}

/// Fails command `fail_at` (counted over the whole assignment) and records rollback calls.
struct Failing {
    seen: usize,
    fail_at: usize,
    rolled_back: Vec<u64>,
}

impl Interpreter for Failing {
    fn apply(
        &mut self,
        root: &Path,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, InterpreterError> {
        let mut reports = Vec::new();
        for (i, cmd) in batch.into_iter().enumerate() {
            let outcome = if self.seen == self.fail_at {
                Err(format!("{}: permission denied (injected)", cmd.path()))
            } else {
                NativeInterpreter.apply(root, vec![cmd])?.remove(0).outcome
            };
            self.seen += 1;
            reports.push(CommandReport { index: i as u32, outcome });
        }
        Ok(reports)
    }
    fn commit(&mut self, _: u64) -> Result<(), InterpreterError> {
        Ok(())
    }
    fn rollback(&mut self, serial: u64) -> Result<(), InterpreterError> {
        self.rolled_back.push(serial);
        Ok(())
    }
}

#[test]
fn interpreter_failure_mid_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (site, v1) =
        live_site(dir.path(), SiteConfig { batch_commands: 2, ..SiteConfig::default() });
    let a =
        assignment(dir.path(), "2.cma", AssignmentType::Publish, 2, 1, &v2(dir.path()), Some(&v1));
    let mut interp = Failing { seen: 0, fail_at: 2, rolled_back: vec![] };
    let e = site.apply(&a, &mut interp).unwrap_err().to_string();
    assert!(
        e.contains("2.cma")
            && e.contains("command 2 (")
            && e.contains("permission denied (injected)"),
        "{e}"
    );
    assert_eq!(interp.rolled_back, vec![2]);
    assert_untouched(&site, &v1);
}

/// Mounts a small tmpfs for the test and unmounts it when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_mid_apply() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        eprintln!("full_disk_mid_apply needs root to mount a tmpfs; not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _guard = Tmpfs(mnt.clone());
    let site = Site::open(&mnt.join("site"), SiteConfig::default()).unwrap();
    let v1 = dir.path().join("v1");
    write_tree(&v1, &[("index.html", b"<h1>one</h1>")], 1000);
    site.apply(
        &assignment(dir.path(), "1.cma", AssignmentType::Replicate, 1, 0, &v1, None),
        &mut NativeInterpreter,
    )
    .unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();
    let v2 = dir.path().join("v2");
    // 3 MiB of incompressible bytes cannot fit in 2 MiB.
    write_tree(&v2, &[("index.html", b"<h1>one</h1>"), ("video.mp4", &noise(3 << 20, 5))], 2000);
    let a = assignment(dir.path(), "2.cma", AssignmentType::Publish, 2, 1, &v2, Some(&v1));
    let e = site.apply(&a, &mut NativeInterpreter).unwrap_err().to_string();
    // Refused up front from the declared lengths, before a byte is written.
    assert!(e.contains("2.cma") && e.contains("not enough space for the release"), "{e}");
    assert_untouched(&site, &v1);
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
