//! Property: for random old/new trees, applying `build(old → new)` to a copy of `old` gives
//! exactly `new` (content, modes, symlinks, deletions). Applied here with the reference
//! interpreter; `site_plugin.rs` runs the same through the interpreter plugin.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use cm_assignment::{
    AssignmentReader, AssignmentType, BuildOptions, SigningKey, TrustedKeys, build, reference,
};
use cm_tests::observe;
use proptest::prelude::*;

/// What one path holds in a generated tree.
#[derive(Debug, Clone)]
enum Node {
    File { seed: u64, len: usize, mode: u32, edit: Option<(usize, u8)> },
    Dir { mode: u32 },
    Link { target: &'static str },
}

const NAMES: [&str; 10] =
    ["a", "b", "a/x", "a/y.html", "b/z.jpg", "a/x/deep", "c.txt", "b/w", "a/y.html/q", "d"];
const TARGETS: [&str; 3] = ["c.txt", "../c.txt", "x"];

fn bytes(seed: u64, len: usize, edit: Option<(usize, u8)>) -> Vec<u8> {
    let mut s = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Half the seeds give text-like (compressible) bytes.
            if seed.is_multiple_of(2) {
                b"abcdefgh <html> "[(s % 16) as usize]
            } else {
                (s >> 24) as u8 ^ i as u8
            }
        })
        .collect();
    if let Some((at, b)) = edit
        && !v.is_empty()
    {
        let at = at % v.len();
        v[at] ^= b | 1;
        v.truncate(v.len() - at / 7);
    }
    v
}

fn arb_node() -> impl Strategy<Value = Option<Node>> {
    prop_oneof![
        2 => Just(None),
        4 => (0u64..4, prop_oneof![0usize..300, 1000usize..40_000], prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o444]), proptest::option::of((any::<usize>(), any::<u8>())))
            .prop_map(|(seed, len, mode, edit)| Some(Node::File { seed, len, mode, edit })),
        2 => prop::sample::select(vec![0o755u32, 0o700, 0o555]).prop_map(|mode| Some(Node::Dir { mode })),
        1 => prop::sample::select(TARGETS.to_vec()).prop_map(|target| Some(Node::Link { target })),
    ]
}

/// Lays out a tree: nodes whose parent is not a directory are skipped; files get `mtime`.
fn make_tree(root: &Path, nodes: &BTreeMap<&str, Node>, mtime: u64) {
    fs::create_dir_all(root).unwrap();
    let mut late = Vec::new();
    for (path, node) in nodes {
        let parent_ok = match path.rsplit_once('/') {
            None => true,
            Some((parent, _)) => root.join(parent).symlink_metadata().is_ok_and(|m| m.is_dir()),
        };
        if !parent_ok {
            continue;
        }
        let p = root.join(path);
        match node {
            Node::File { seed, len, mode, edit } => {
                fs::write(&p, bytes(*seed, *len, *edit)).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
                let f = fs::File::options().write(true).open(&p);
                // Read-only files (0o444) are still openable by root; otherwise set the mode after.
                if let Ok(f) = f {
                    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime + seed)).unwrap();
                }
            }
            Node::Dir { mode } => {
                fs::create_dir(&p).unwrap();
                late.push((p, *mode));
            }
            Node::Link { target } => {
                if cm_assignment::format::check_symlink_target(path, target).is_ok() {
                    symlink(target, &p).unwrap();
                }
            }
        }
    }
    for (p, mode) in late.into_iter().rev() {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

fn check(old: BTreeMap<&str, Node>, new: BTreeMap<&str, Node>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (old_root, new_root, applied) =
        (dir.path().join("old"), dir.path().join("new"), dir.path().join("applied"));
    make_tree(&old_root, &old, 1_000_000);
    make_tree(&new_root, &new, 2_000_000);
    copy_tree(&old_root, &applied);
    let file = dir.path().join("a.cma");
    // Signed, as the manager's are: the round trip covers the signature block too.
    static KEY: std::sync::OnceLock<SigningKey> = std::sync::OnceLock::new();
    let key =
        KEY.get_or_init(|| SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap());
    let mut opts = BuildOptions::new(AssignmentType::Publish, 1);
    opts.signer = Some(key.clone());
    match build(&new_root, Some(&old_root), &file, &opts) {
        // Links that loop, or that combine into an escape, are refused by design.
        Err(cm_assignment::detect::BuildError::SymlinkChain { .. }) => return Ok(()),
        r => r.unwrap(),
    };
    let r = AssignmentReader::open(&file).unwrap();
    r.verify(None, Some(&TrustedKeys::new([key.public_key()]))).unwrap();
    reference::apply_all(&r, &applied).unwrap();
    prop_assert_eq!(observe(&applied), observe(&new_root));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn applying_build_old_to_new_on_old_gives_new(
        old in proptest::collection::vec(arb_node(), NAMES.len()),
        new in proptest::collection::vec(arb_node(), NAMES.len()),
        keep in proptest::collection::vec(0u8..4, NAMES.len()),
    ) {
        let old: BTreeMap<&str, Node> = NAMES.iter().zip(old).filter_map(|(n, v)| v.map(|v| (*n, v))).collect();
        // Keep some old nodes (possibly edited) so deltas and unchanged files occur.
        let mut new_map: BTreeMap<&str, Node> = NAMES.iter().zip(new).filter_map(|(n, v)| v.map(|v| (*n, v))).collect();
        for ((name, k), node) in NAMES.iter().zip(keep).zip(NAMES.iter().map(|n| old.get(n))) {
            let Some(node) = node else { continue };
            let kept = match (k, node.clone()) {
                (0, _) => continue,
                (1, n) => n,
                // Same content and mtime, other mode: only a set-mode can get it right.
                (2, Node::File { seed, len, mode, edit }) => Node::File { seed, len, mode: mode ^ 0o100, edit },
                (2, Node::Dir { mode }) => Node::Dir { mode: mode ^ 0o020 },
                (_, Node::File { seed, len, mode, edit: None }) => Node::File { seed, len, mode, edit: Some((len / 3, 0x55)) },
                (_, n) => n,
            };
            new_map.insert(name, kept);
        }
        check(old, new_map)?;
    }
}

#[test]
fn big_file_small_edit_is_a_small_delta() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    fs::create_dir_all(&old).unwrap();
    fs::create_dir_all(&new).unwrap();
    let base = bytes(3, 4 << 20, None);
    fs::write(old.join("big.bin"), &base).unwrap();
    let mut edited = base.clone();
    edited.splice(2_000_000..2_000_010, b"0123456789abcdef".iter().copied());
    fs::write(new.join("big.bin"), &edited).unwrap();
    let f = fs::File::options().write(true).open(new.join("big.bin")).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(5)).unwrap();
    let out = dir.path().join("a.cma");
    let report =
        build(&new, Some(&old), &out, &BuildOptions::new(AssignmentType::Publish, 2)).unwrap();
    assert_eq!(report.deltas, 1);
    assert!(report.file_len < 1024, "assignment is {} bytes", report.file_len);
    reference::apply_all(&AssignmentReader::open(&out).unwrap(), &old).unwrap();
    assert_eq!(fs::read(old.join("big.bin")).unwrap(), edited);
}
