//! The whole-tree check before a release is kept: the built tree must be exactly the tree the
//! assignment describes (its manifest, `flags::TREE`) — every path, kind, mode, length, content
//! hash and symlink target, and nothing else. The interpreter is not trusted: whatever it did
//! (rewrote a file it was never asked to touch, added one), a release that differs is refused.
//!
//! The release is walked by descriptor in the manifest's own order ([`tree_order`]: each
//! directory's names sorted, depth first), so the two streams are compared in one merge pass
//! with memory for one directory listing per level. On the way the site's policy is applied:
//! directory modes are set to the described ones (the clone left them owner-writable),
//! entries are given to the site's owner, and every symlink's whole chain is resolved inside
//! the release (two links that each pass the lexical check must not combine into an escape).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use cm_assignment::AssignmentReader;
use cm_assignment::format::{TreeEntry, TreeKind, tree_order};
use cm_assignment::links::resolve_chain;
use cm_assignment::policy::SpecialBits;
use rustix::fs::FileType;

use crate::apply::ApplyCause;
use crate::beneath::Tree;

/// What the check did besides checking.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    /// Described entries whose setuid/setgid/sticky bits the policy cleared.
    pub modes_stripped: u64,
}

/// The site's policy for what the check enforces.
pub(crate) struct Policy {
    pub special_bits: SpecialBits,
    /// Owner for every entry (when the site runs as root).
    pub owner: Option<(u32, u32)>,
}

fn differs(path: &str, why: impl Into<String>) -> ApplyCause {
    ApplyCause::TreeDiffers { path: path.to_owned(), why: why.into() }
}

/// A directory's entries (name and type).
type Listing = Vec<(Vec<u8>, FileType)>;

/// Walks a tree in [`tree_order`], yielding each entry's path and type.
struct Walk<'a> {
    tree: &'a Tree,
    /// Per level: the directory's path and the rest of its entries (sorted, reversed).
    stack: Vec<(String, Listing)>,
}

impl<'a> Walk<'a> {
    fn new(tree: &'a Tree) -> Result<Self, ApplyCause> {
        let mut w = Walk { tree, stack: Vec::new() };
        w.push(String::new())?;
        Ok(w)
    }

    fn push(&mut self, dir: String) -> Result<(), ApplyCause> {
        let mut names = self.tree.list(&dir).map_err(|e| differs(&dir, format!("listing: {e}")))?;
        names.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        self.stack.push((dir, names));
        Ok(())
    }

    fn next(&mut self) -> Result<Option<(String, FileType)>, ApplyCause> {
        while let Some((dir, names)) = self.stack.last_mut() {
            let Some((name, ft)) = names.pop() else {
                self.stack.pop();
                continue;
            };
            let name = String::from_utf8(name).map_err(|n| {
                differs(dir, format!("holds {:?}, a name that is not UTF-8", n.as_bytes()))
            })?;
            let path = if dir.is_empty() { name } else { format!("{dir}/{name}") };
            if ft == FileType::Directory {
                self.push(path.clone())?;
            }
            return Ok(Some((path, ft)));
        }
        Ok(None)
    }
}

/// Checks the release at `tree` against `reader`'s manifest (see the module doc).
pub(crate) fn check_tree(
    tree: &Tree,
    reader: &AssignmentReader,
    policy: &Policy,
) -> Result<Checked, ApplyCause> {
    if !reader.has_tree() {
        return Err(ApplyCause::NoTree);
    }
    let mut checked = Checked::default();
    let mut manifest = reader.tree();
    let mut walk = Walk::new(tree)?;
    let mut want: Option<TreeEntry> = manifest.next().transpose()?;
    let mut have = walk.next()?;
    // Directory modes are set last, deepest first: a read-only directory still takes its
    // content's ownership change while the walk is in it.
    let mut dir_modes = Vec::new();
    loop {
        match (want.take(), have.take()) {
            (None, None) => break,
            (Some(w), None) => return Err(differs(&w.path, "described but missing")),
            (None, Some((p, _))) => return Err(differs(&p, "not described by the assignment")),
            (Some(w), Some((p, ft))) => match tree_order(&w.path, &p) {
                std::cmp::Ordering::Less => {
                    return Err(differs(&w.path, "described but missing"));
                }
                std::cmp::Ordering::Greater => {
                    return Err(differs(&p, "not described by the assignment"));
                }
                std::cmp::Ordering::Equal => {
                    check_entry(tree, &w, ft, policy, &mut checked, &mut dir_modes)?;
                }
            },
        }
        want = manifest.next().transpose()?;
        have = walk.next()?;
    }
    for (path, mode) in dir_modes.into_iter().rev() {
        tree.chmod_dir(&path, mode)
            .map_err(|e| differs(&path, format!("setting its mode: {e}")))?;
    }
    if let Some((uid, gid)) = policy.owner
        && let Ok(Some((fd, _))) = tree.lstat("")
    {
        Tree::chown(&fd, uid, gid).map_err(|e| differs("", format!("changing owner: {e}")))?;
    }
    Ok(checked)
}

fn check_entry(
    tree: &Tree,
    want: &TreeEntry,
    ft: FileType,
    policy: &Policy,
    checked: &mut Checked,
    dir_modes: &mut Vec<(String, u32)>,
) -> Result<(), ApplyCause> {
    let path = &want.path;
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| differs(path, format!("{what}: {e}"))
    };
    let mode_of = |mode: u32, checked: &mut Checked| -> Result<u32, ApplyCause> {
        let (m, stripped) = policy.special_bits.apply(mode).ok_or_else(|| {
            differs(path, format!("mode {mode:o}: setuid, setgid and sticky bits are refused"))
        })?;
        checked.modes_stripped += u64::from(stripped);
        Ok(m)
    };
    let (fd, st) =
        tree.lstat(path).map_err(io("stat"))?.ok_or_else(|| differs(path, "vanished"))?;
    let has_mode = st.st_mode & 0o7777;
    match (&want.kind, ft) {
        (TreeKind::Dir { mode }, FileType::Directory) => {
            dir_modes.push((path.clone(), mode_of(*mode, checked)?));
        }
        (TreeKind::File { mode, len, hash }, FileType::RegularFile) => {
            let mode = mode_of(*mode, checked)?;
            if has_mode != mode {
                return Err(differs(path, format!("has mode {has_mode:o}, described {mode:o}")));
            }
            if st.st_size as u64 != *len {
                return Err(differs(path, format!("is {} bytes, described {len}", st.st_size)));
            }
            let f = tree.open_file(path).map_err(io("opening"))?;
            let mut h = blake3::Hasher::new();
            h.update_reader(&f).map_err(io("reading"))?;
            if h.finalize() != blake3::Hash::from_bytes(*hash) {
                return Err(differs(path, "content differs from the described BLAKE3"));
            }
        }
        (TreeKind::Symlink { target }, FileType::Symlink) => {
            let has = tree.read_link(path).map_err(io("reading the link"))?.unwrap_or_default();
            if has != target.as_bytes() {
                return Err(differs(
                    path,
                    format!("links to {:?}, described {target}", OsStr::from_bytes(&has)),
                ));
            }
            resolve_chain(path, target, |p| {
                Ok(tree.read_link(p)?.map(|t| String::from_utf8_lossy(&t).into_owned()))
            })
            .map_err(|e| differs(path, format!("symlink -> {target} {e}")))?;
        }
        (_, ft) => return Err(differs(path, format!("is a {ft:?}, described {}", kind(want)))),
    }
    if let Some((uid, gid)) = policy.owner
        && (st.st_uid, st.st_gid) != (uid, gid)
    {
        Tree::chown(&fd, uid, gid).map_err(io("changing owner"))?;
    }
    Ok(())
}

fn kind(e: &TreeEntry) -> &'static str {
    match e.kind {
        TreeKind::Dir { .. } => "a directory",
        TreeKind::File { .. } => "a file",
        TreeKind::Symlink { .. } => "a symlink",
    }
}
