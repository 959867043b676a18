//! The real path: assignments applied through the default interpreter plugin
//! (`plugins/dist/interpreter.wasm`) running in the sandbox, compared with the expected trees.

mod site_common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use cm_assignment::AssignmentType;
use cm_plugin_host::{PluginManifest, PluginRuntime, PluginStore, RuntimeConfig};
use cm_site::{Site, SiteConfig, layout};
use proptest::prelude::*;
use site_common::*;

fn interpreter(store_dir: &Path) -> cm_plugin_host::Interpreter {
    let wasm = fs::read(cm_tests::workspace_root().join("plugins/dist/interpreter.wasm")).unwrap();
    let store = PluginStore::open(PluginRuntime::new(RuntimeConfig::default()).unwrap(), store_dir)
        .unwrap();
    let manifest = PluginManifest::parse(
        "name = \"interpreter\"\nworld = \"interpreter\"\n[grants]\nsites = [\"www\"]\n",
        "test",
    )
    .unwrap();
    store.install(&wasm, manifest, "interpreter.wasm").unwrap();
    store.interpreter("interpreter", "www").unwrap()
}

/// A small random tree: files (text or noise, a few sizes), directories, symlinks.
fn make(root: &Path, spec: &BTreeMap<u8, (u8, u64)>, mtime: u64) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    for (name, (kind, seed)) in spec {
        let p = root.join(match name % 3 {
            0 => format!("f{name}.html"),
            1 => format!("dir/f{name}.bin"),
            _ => format!("dir/sub/f{name}.txt"),
        });
        match kind % 4 {
            0 => fs::write(&p, format!("page {seed} ").repeat((*seed % 500) as usize)).unwrap(),
            1 => fs::write(&p, noise(1000 + (*seed % 50_000) as usize, seed / 3)).unwrap(),
            2 => {
                // Same bytes as kind 1 with an edit: a delta against kind-1 content.
                let mut b = noise(1000 + (*seed % 50_000) as usize, seed / 3);
                let at = b.len() / 2;
                b.splice(at..at + 10, b"edited!".iter().copied());
                fs::write(&p, b).unwrap();
            }
            _ => {
                std::os::unix::fs::symlink("x", &p).unwrap();
                continue;
            }
        }
        let f = fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime)).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn plugin_applies_build_old_to_new(
        old in proptest::collection::btree_map(0u8..12, (0u8..4, 0u64..1_000_000), 0..10),
        new in proptest::collection::btree_map(0u8..12, (0u8..4, 0u64..1_000_000), 0..10),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut interp = interpreter(&d.join("plugins"));
        let (v1, v2) = (d.join("v1"), d.join("v2"));
        // New keeps old's seeds where both have a file, so kinds 1 → 2 become deltas.
        let new: BTreeMap<u8, (u8, u64)> = new.into_iter().map(|(k, (kind, seed))| (k, (kind, old.get(&k).map_or(seed, |o| o.1)))).collect();
        make(&v1, &old, 1000);
        make(&v2, &new, 2000);
        let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
        site.apply(&assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None), &mut interp).unwrap();
        site.commit(Some(1), &mut interp).unwrap();
        prop_assert_eq!(observe(&site.live_path()), observe(&v1));
        site.apply(&assignment(d, "2.cma", AssignmentType::Publish, 2, 1, &v2, Some(&v1)), &mut interp).unwrap();
        prop_assert_eq!(observe(&site.live_path()), observe(&v1), "live untouched before commit");
        site.commit(Some(2), &mut interp).unwrap();
        prop_assert_eq!(observe(&site.live_path()), observe(&v2));
        site.rollback(&mut interp).unwrap();
        prop_assert_eq!(observe(&site.live_path()), observe(&v1));
    }
}

#[test]
fn plugin_path_delta_against_drifted_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut interp = interpreter(&d.join("plugins"));
    let v1 = d.join("v1");
    write_tree(&v1, &[("big.bin", &noise(100_000, 1))], 1000);
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    site.apply(&assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &v1, None), &mut interp)
        .unwrap();
    site.commit(Some(1), &mut interp).unwrap();
    let tmp = site.release_path(1).join("x");
    fs::write(&tmp, noise(100_000, 2)).unwrap();
    fs::rename(&tmp, site.release_path(1).join("big.bin")).unwrap();
    let v2 = d.join("v2");
    let mut b = noise(100_000, 1);
    b[5000] ^= 1;
    write_tree(&v2, &[("big.bin", &b)], 2000);
    let e = site
        .apply(&assignment(d, "2.cma", AssignmentType::Publish, 2, 0, &v2, Some(&v1)), &mut interp)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2.cma") && e.contains("apply-delta big.bin") && e.contains("wrong base"),
        "{e}"
    );
    assert!(layout::leftovers(site.root()).unwrap().is_empty());
    assert_eq!(site.status().unwrap().current, Some(1));
}
