//! Crash safety: a child process commits, rolls back and builds releases in a loop and is
//! killed (SIGKILL) at random moments. After every kill, `current` must be a complete old or
//! new release, and `Site::open` must repair the rest (history, half-built releases).

mod site_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cm_assignment::AssignmentType;
use cm_site::{NativeInterpreter, Site, SiteConfig, layout};
use site_common::*;

const DIR_ENV: &str = "CM_SITE_CRASH_DIR";

fn trees(d: &Path) -> [std::path::PathBuf; 3] {
    let v: Vec<_> = (1..=3u64)
        .map(|i| {
            let p = d.join(format!("v{i}"));
            if !p.exists() {
                let files: Vec<(String, Vec<u8>)> = (0..40)
                    .map(|f| {
                        (
                            format!("d{}/f{f}.html", f % 5),
                            format!("release {i} file {f}").repeat(50).into_bytes(),
                        )
                    })
                    .collect();
                let refs: Vec<(&str, &[u8])> =
                    files.iter().map(|(a, b)| (a.as_str(), b.as_slice())).collect();
                write_tree(&p, &refs, 1000 * i);
                write_tree(&p, &[("big.bin", &noise(2 << 20, i))], 1000 * i);
            }
            p
        })
        .collect();
    [v[0].clone(), v[1].clone(), v[2].clone()]
}

/// The child: loops over commit / rollback / building release 3 until killed.
#[test]
#[ignore = "run by site_crash_kill_at_random_points as a child process"]
fn child_commit_loop() {
    let Ok(d) = std::env::var(DIR_ENV) else { return };
    let d = Path::new(&d);
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let mut i = NativeInterpreter;
    loop {
        if !site.release_path(3).exists() {
            site.apply(&d.join("3.cma"), &mut i).unwrap();
        }
        site.commit(Some(2), &mut i).unwrap();
        site.rollback(&mut i).unwrap();
        if site.status().unwrap().current == Some(1) {
            // Drop release 3 now and then so it is rebuilt (and killed mid-build).
            layout::discard(site.root(), &site.release_path(3)).unwrap();
        }
    }
}

#[test]
fn site_crash_kill_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [v1, v2, v3] = trees(d);
    {
        let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
        let mut i = NativeInterpreter;
        site.apply(&assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None), &mut i)
            .unwrap();
        site.commit(Some(1), &mut i).unwrap();
        site.apply(&assignment(d, "2.cma", AssignmentType::Publish, 2, 0, &v2, Some(&v1)), &mut i)
            .unwrap();
        assignment(d, "3.cma", AssignmentType::Publish, 3, 0, &v3, Some(&v1));
    }
    let (o1, o2, o3) = (observe(&v1), observe(&v2), observe(&v3));
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            | 1;
    eprintln!("site_crash seed {seed}");
    let mut s = seed;
    let mut lives = [0u32; 2];
    for round in 0..25 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_commit_loop", "--ignored", "--test-threads=1"])
            .env(DIR_ENV, d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        std::thread::sleep(Duration::from_millis(20 + s % 120));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round} (seed {seed}): the child stopped by itself: {status}"
        );

        // Before any repair: `current` is a complete release, old or new.
        let live = observe(&d.join("site/current"));
        let which = if live == o1 {
            0
        } else if live == o2 {
            1
        } else {
            panic!("round {round} (seed {seed}): live is neither release 1 nor 2")
        };
        lives[which] += 1;
        // Repair and check consistency.
        let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
        let st = site.status().unwrap();
        assert_eq!(st.current, Some(which as u64 + 1));
        assert_eq!(st.history.last(), st.current.as_ref(), "round {round} (seed {seed})");
        assert!(layout::leftovers(site.root()).unwrap().is_empty());
        if site.release_path(3).exists() {
            assert_eq!(
                observe(&site.release_path(3)),
                o3,
                "round {round} (seed {seed}): release 3 incomplete under its final name"
            );
        }
        // Rollback after a crash still works whenever there is something to roll back to.
        if st.current == Some(2) {
            assert_eq!(site.rollback(&mut NativeInterpreter).unwrap(), 1);
            assert_eq!(observe(&site.live_path()), o1);
        }
    }
    eprintln!("live after kill: release 1 ×{}, release 2 ×{}", lives[0], lives[1]);
}
