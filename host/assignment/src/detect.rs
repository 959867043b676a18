//! Change detection (manager side): staging tree vs the shadow copy of what servers hold, turned
//! into an assignment. Size and mtime decide first; a file whose size or mtime differs is
//! compared by content (the delta pass hashes both), so a touched-but-equal file costs no bytes.
//! The two trees are walked together a directory at a time (entries sorted by name), so memory
//! grows with the depth and the widest directory, not with the number of files.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::format::{AssignmentType, Header, TreeEntry, TreeKind, check_symlink_target};
use crate::links::{ChainError, resolve_chain};
use crate::policy::{CompressionPolicy, SpecialBits};
use crate::reference::mtime_secs;
use crate::write::{AssignmentWriter, ChangeOutcome, Meta, WriteError};
use crate::{CipherKey, SealKey, SigningKey};

/// One entry of a scanned tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    /// `mtime` in whole seconds (what assignments carry); `mtime_nsec` its sub-second part,
    /// compared only when both trees have one (a copy made through an assignment has none).
    File {
        len: u64,
        mtime: i64,
        mode: u32,
        mtime_nsec: u32,
    },
    Symlink {
        target: String,
    },
}

/// Every entry below `root` by relative '/'-separated path (parents sort before children).
/// Names that are not UTF-8 are refused: the format carries UTF-8 paths. This holds the whole
/// tree in memory; [`build`] walks both trees a directory at a time instead.
pub fn scan(root: &Path) -> Result<BTreeMap<String, Entry>, BuildError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        for (name, entry) in list_dir(root, &rel)? {
            let path = join(&rel, &name);
            if matches!(entry, Entry::Dir { .. }) {
                stack.push(path.clone());
            }
            out.insert(path, entry);
        }
    }
    Ok(out)
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") }
}

/// The entries of directory `rel` below `root`, sorted by name (bytewise).
fn list_dir(root: &Path, rel: &str) -> Result<Vec<(String, Entry)>, BuildError> {
    let dir = root.join(rel);
    let rd =
        fs::read_dir(&dir).map_err(|e| BuildError::io(format!("listing {}", dir.display()), e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| BuildError::io(format!("listing {}", dir.display()), e))?;
        let name =
            ent.file_name().into_string().map_err(|n| BuildError::NotUtf8 { path: dir.join(n) })?;
        let full = ent.path();
        let m = fs::symlink_metadata(&full)
            .map_err(|e| BuildError::io(format!("stat {}", full.display()), e))?;
        let mode = m.permissions().mode() & 0o7777;
        let entry = if m.file_type().is_symlink() {
            let t = fs::read_link(&full)
                .map_err(|e| BuildError::io(format!("readlink {}", full.display()), e))?;
            let target = t
                .into_os_string()
                .into_string()
                .map_err(|_| BuildError::NotUtf8 { path: full.clone() })?;
            Entry::Symlink { target }
        } else if m.is_dir() {
            Entry::Dir { mode }
        } else if m.is_file() {
            Entry::File {
                len: m.len(),
                mtime: mtime_secs(&m),
                mode,
                mtime_nsec: m.mtime_nsec() as u32,
            }
        } else {
            return Err(BuildError::Unsupported { path: full });
        };
        out.push((name, entry));
    }
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub meta: Meta,
    pub policy: CompressionPolicy,
    pub seal: Option<SealKey>,
    /// When set, the data part is encrypted under this key.
    pub cipher: Option<CipherKey>,
    /// When set, the assignment is signed with the manager's key.
    pub signer: Option<SigningKey>,
    /// Files at least this long are sent as deltas when that saves bytes.
    pub delta_min: u64,
    /// What becomes of setuid, setgid and sticky bits in staging.
    pub special_bits: SpecialBits,
}

impl BuildOptions {
    /// For site [`DEFAULT_SITE`](crate::names::DEFAULT_SITE) (hand tools); the manager names
    /// the site with [`BuildOptions::for_site`].
    pub fn new(kind: AssignmentType, serial: u64) -> Self {
        BuildOptions {
            meta: Meta {
                kind,
                serial,
                job_id: 0,
                base_serial: 0,
                target_serial: 0,
                site: crate::names::DEFAULT_SITE.into(),
            },
            policy: CompressionPolicy::default(),
            seal: None,
            cipher: None,
            signer: None,
            delta_min: 256,
            special_bits: SpecialBits::default(),
        }
    }

    /// The same, for hosted site `site` (the header's site field).
    pub fn for_site(mut self, site: &str) -> Self {
        self.meta.site = site.into();
        self
    }
}

/// What a build found and wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildReport {
    pub new: u64,
    pub changed: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub deltas: u64,
    pub literal_bytes: u64,
    pub header: Option<Header>,
    pub file_len: u64,
    /// The most directory entries the walk held at once (both trees, every level): the
    /// memory bound of change detection, independent of the number of files.
    pub peak_entries_held: u64,
    /// Staging entries whose setuid, setgid or sticky bits were cleared (policy `strip`).
    pub modes_stripped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{path}: name is not UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("{path}: not a file, directory or symlink")]
    Unsupported { path: PathBuf },
    #[error("staging symlink {path} -> {target} {why}")]
    SymlinkEscapes { path: String, target: String, why: &'static str },
    #[error("staging symlink {path} -> {target} {source}")]
    SymlinkChain { path: String, target: String, source: ChainError },
    #[error("staging {path} has mode {mode:o}: setuid, setgid and sticky bits are refused")]
    SpecialBits { path: String, mode: u32 },
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl BuildError {
    fn io(what: String, source: io::Error) -> Self {
        BuildError::Io { what, source }
    }
}

fn kind_of(e: &Entry) -> u8 {
    match e {
        Entry::Dir { .. } => 0,
        Entry::File { .. } => 1,
        Entry::Symlink { .. } => 2,
    }
}

fn open(root: &Path, rel: &str) -> Result<File, BuildError> {
    let p = root.join(rel);
    File::open(&p).map_err(|e| BuildError::io(format!("opening {}", p.display()), e))
}

/// Builds the assignment that turns `shadow` (None: an empty tree) into `staging`, written to `out`.
///
/// Both trees are walked together, one directory at a time with its entries sorted by name, so
/// memory is one listing of each tree per level of the walk, whatever the number of files.
pub fn build(
    staging: &Path,
    shadow: Option<&Path>,
    out: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    let mut w =
        AssignmentWriter::create(out, opts.meta.clone(), opts.policy.clone(), opts.seal.clone())?;
    if let Some(k) = &opts.cipher {
        w.encrypt_with(k.clone());
    }
    w.describe_tree()?;
    if let Some(k) = &opts.signer {
        w.sign_with(k.clone());
    }
    let mut walk = Walk { staging, shadow, opts, w, report: BuildReport::default(), held: 0 };
    walk.run()?;
    let Walk { w, mut report, .. } = walk;
    let header = w.finish()?;
    report.file_len =
        fs::metadata(out).map_err(|e| BuildError::io(format!("stat {}", out.display()), e))?.len();
    report.header = Some(header);
    Ok(report)
}

/// The merged walk of staging and shadow behind [`build`].
struct Walk<'a> {
    staging: &'a Path,
    shadow: Option<&'a Path>,
    opts: &'a BuildOptions,
    w: AssignmentWriter,
    report: BuildReport,
    /// Directory entries held right now (both trees, every level of the walk).
    held: u64,
}

/// One directory being walked: the rest of its entries in both trees, sorted by name.
struct Frame {
    rel: String,
    new: std::iter::Peekable<std::vec::IntoIter<(String, Entry)>>,
    old: std::iter::Peekable<std::vec::IntoIter<(String, Entry)>>,
    held: u64,
    /// The directory's mode, set once its content is in.
    final_mode: Option<u32>,
}

impl Walk<'_> {
    /// Emits the changes, depth first with an explicit stack (a tree may be as deep as paths
    /// allow, ~2000 levels). For each name, in order: the shadow's entry removed (when staging
    /// has none, or one of another kind), then staging's entry added or changed; a directory's
    /// content is handled before its final mode is set.
    fn run(&mut self) -> Result<(), BuildError> {
        let mut stack = vec![self.frame(String::new(), self.shadow.is_some(), None)?];
        while let Some(top) = stack.last_mut() {
            let order = match (top.new.peek(), top.old.peek()) {
                (None, None) => {
                    let done = stack.pop().expect("a frame");
                    self.held -= done.held;
                    if let Some(mode) = done.final_mode {
                        self.w.set_mode(&done.rel, mode)?;
                    }
                    continue;
                }
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((n, _)), Some((o, _))) => n.cmp(o),
            };
            let (was, now) = match order {
                std::cmp::Ordering::Less => (None, top.new.next()),
                std::cmp::Ordering::Greater => (top.old.next(), None),
                std::cmp::Ordering::Equal => (top.old.next(), top.new.next()),
            };
            let name = now
                .as_ref()
                .or(was.as_ref())
                .map(|(n, _)| n.as_str())
                .expect("one side has the name");
            let path = join(&top.rel, name);
            if let Some((_, e)) = &now {
                self.describe(&path, e)?;
            }
            let was = was.map(|(_, e)| e);
            let before = match (was, &now) {
                (Some(o), Some((_, n))) if kind_of(&o) == kind_of(n) => Some(o),
                (Some(o), _) => {
                    self.w.remove(&path, matches!(o, Entry::Dir { .. }))?;
                    self.report.deleted += 1;
                    None
                }
                (None, _) => None,
            };
            match (now, before) {
                (None, _) => {}
                (Some((_, Entry::Dir { mode })), None) => {
                    // Made owner-writable so its content can go in; the final mode once it has.
                    self.w.make_dir(&path, mode | 0o700)?;
                    self.report.new += 1;
                    let late = (mode & 0o700 != 0o700).then_some(mode);
                    let frame = self.frame(path, false, late)?;
                    stack.push(frame);
                }
                (Some((_, Entry::Dir { mode })), Some(Entry::Dir { mode: was })) => {
                    let frame = self.frame(path, true, (mode != was).then_some(mode))?;
                    stack.push(frame);
                }
                (Some((_, entry)), before) => self.entry(&path, &entry, before.as_ref())?,
            }
        }
        Ok(())
    }

    /// Lists staging's directory `rel` (and the shadow's, when `in_shadow`) for the walk.
    fn frame(
        &mut self,
        rel: String,
        in_shadow: bool,
        final_mode: Option<u32>,
    ) -> Result<Frame, BuildError> {
        let mut new = list_dir(self.staging, &rel)?;
        for (name, e) in &mut new {
            if let Entry::Dir { mode } | Entry::File { mode, .. } = e {
                let (m, stripped) = self.opts.special_bits.apply(*mode).ok_or_else(|| {
                    BuildError::SpecialBits { path: join(&rel, name), mode: *mode }
                })?;
                *mode = m;
                self.report.modes_stripped += u64::from(stripped);
            }
        }
        let old = match self.shadow {
            Some(s) if in_shadow => list_dir(s, &rel)?,
            _ => Vec::new(),
        };
        let held = (new.len() + old.len()) as u64;
        self.held += held;
        self.report.peak_entries_held = self.report.peak_entries_held.max(self.held);
        Ok(Frame {
            rel,
            new: new.into_iter().peekable(),
            old: old.into_iter().peekable(),
            held,
            final_mode,
        })
    }

    /// Adds or changes staging's file or symlink `entry` at `path` (`before`: the shadow's, of
    /// the same kind).
    fn entry(
        &mut self,
        path: &str,
        entry: &Entry,
        before: Option<&Entry>,
    ) -> Result<(), BuildError> {
        let (staging, opts) = (self.staging, self.opts);
        let report = &mut self.report;
        let w = &mut self.w;
        match (entry, before) {
            (Entry::Symlink { target }, before) => {
                check_symlink_target(path, target).map_err(|why| BuildError::SymlinkEscapes {
                    path: path.to_owned(),
                    target: target.clone(),
                    why,
                })?;
                resolve_chain(path, target, |p| read_link_at(staging, p)).map_err(|source| {
                    BuildError::SymlinkChain {
                        path: path.to_owned(),
                        target: target.clone(),
                        source,
                    }
                })?;
                if before != Some(entry) {
                    w.symlink(path, target)?;
                    if before.is_some() { report.changed += 1 } else { report.new += 1 }
                } else {
                    report.unchanged += 1;
                }
            }
            (Entry::File { mode, mtime, .. }, None) => {
                w.write_file(path, *mode, *mtime, &open(staging, path)?)?;
                report.new += 1;
            }
            (
                Entry::File { len, mtime, mode, mtime_nsec },
                Some(Entry::File {
                    len: was_len,
                    mtime: was_mtime,
                    mode: was_mode,
                    mtime_nsec: was_nsec,
                }),
            ) => {
                let shadow = self.shadow.expect("an old entry implies a shadow tree");
                // The quick check: same size and mtime (to the nanosecond when both sides
                // keep nanoseconds, so a file rewritten within the same second is still seen).
                let same_nsec = mtime_nsec == was_nsec || *mtime_nsec == 0 || *was_nsec == 0;
                let content_same = if len == was_len && mtime == was_mtime && same_nsec {
                    true
                } else if *len >= opts.delta_min && *was_len >= opts.delta_min.min(*len) {
                    let outcome = w.file_change(
                        path,
                        path,
                        &open(shadow, path)?,
                        &open(staging, path)?,
                        *mode,
                        *mtime,
                    )?;
                    if let ChangeOutcome::Delta { literal } = outcome {
                        report.deltas += 1;
                        report.literal_bytes += literal;
                    }
                    outcome == ChangeOutcome::Identical
                } else if len == was_len && same_content(&shadow.join(path), &staging.join(path))? {
                    true
                } else {
                    w.write_file(path, *mode, *mtime, &open(staging, path)?)?;
                    false
                };
                if content_same {
                    report.unchanged += 1;
                    if mode != was_mode {
                        w.set_mode(path, *mode)?;
                    }
                } else {
                    report.changed += 1;
                }
            }
            _ => unreachable!("directories are walked in run(); kinds matched there"),
        }
        Ok(())
    }
}

impl Walk<'_> {
    /// Adds staging's `entry` at `path` to the manifest of the resulting tree.
    fn describe(&mut self, path: &str, entry: &Entry) -> Result<(), BuildError> {
        let kind = match entry {
            Entry::Dir { mode } => TreeKind::Dir { mode: *mode },
            Entry::File { mode, len, .. } => TreeKind::File {
                mode: *mode,
                len: *len,
                hash: *hash_file(&self.staging.join(path))?.as_bytes(),
            },
            Entry::Symlink { target } => TreeKind::Symlink { target: target.clone() },
        };
        self.w.tree_entry(&TreeEntry { path: path.to_owned(), kind })?;
        Ok(())
    }
}

/// The target of `rel` below `root` when it is a symlink (for [`resolve_chain`]).
fn read_link_at(root: &Path, rel: &str) -> io::Result<Option<String>> {
    let p = root.join(rel);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.file_type().is_symlink() => {
            let t = fs::read_link(&p)?;
            t.into_os_string()
                .into_string()
                .map(Some)
                .map_err(|_| io::Error::other("link target is not UTF-8"))
        }
        Ok(_) => Ok(None),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn hash_file(p: &Path) -> Result<blake3::Hash, BuildError> {
    let f = File::open(p).map_err(|e| BuildError::io(format!("opening {}", p.display()), e))?;
    let len = f.metadata().map_err(|e| BuildError::io(format!("stat {}", p.display()), e))?.len();
    let mut h = blake3::Hasher::new();
    crate::write::copy_range(&f, 0, len, |b| {
        h.update(b);
        Ok(())
    })
    .map_err(|e| BuildError::io(format!("reading {}", p.display()), e))?;
    Ok(h.finalize())
}

fn same_content(a: &Path, b: &Path) -> Result<bool, BuildError> {
    Ok(hash_file(a)? == hash_file(b)?)
}

/// Writes a header-only assignment (commit, rollback, switch), signed when `signer` is given.
pub fn build_switch(
    out: &Path,
    meta: Meta,
    seal: Option<SealKey>,
    signer: Option<SigningKey>,
) -> Result<Header, WriteError> {
    let mut w = AssignmentWriter::create(out, meta, CompressionPolicy::none(), seal)?;
    if let Some(k) = signer {
        w.sign_with(k);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn file(root: &Path, name: &str, content: &[u8], secs: u64, nanos: u32) {
        fs::create_dir_all(root).unwrap();
        fs::write(root.join(name), content).unwrap();
        let f = File::options().write(true).open(root.join(name)).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::new(secs, nanos)).unwrap();
    }

    #[test]
    fn a_file_rewritten_within_the_same_second_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (d.path().join("old"), d.path().join("new"));
        file(&old, "a.txt", b"one", 1000, 100);
        file(&new, "a.txt", b"two", 1000, 200);
        // Same second and size, no sub-second part on one side (a copy made by applying an
        // assignment): the quick check trusts it, as rsync's does.
        file(&old, "b.txt", b"bbb", 1000, 0);
        file(&new, "b.txt", b"bbb", 1000, 300);
        let r = build(
            &new,
            Some(&old),
            &d.path().join("out.cma"),
            &BuildOptions::new(AssignmentType::Publish, 2),
        )
        .unwrap();
        assert_eq!((r.changed, r.unchanged), (1, 1), "{r:?}");
    }

    /// What a tree holds, as comparable lines (path, kind, mode, content hash or target).
    fn observe(root: &Path) -> Vec<String> {
        scan(root)
            .unwrap()
            .into_iter()
            .map(|(p, e)| match e {
                Entry::Dir { mode } => format!("{p} dir {mode:o}"),
                Entry::File { mode, .. } => {
                    format!("{p} file {mode:o} {}", blake3::hash(&fs::read(root.join(&p)).unwrap()))
                }
                Entry::Symlink { target } => format!("{p} link {target}"),
            })
            .collect()
    }

    fn apply(assignment: &Path, root: &Path) {
        let r = crate::AssignmentReader::open(assignment).unwrap();
        r.verify(None, None).unwrap();
        crate::reference::apply_all(&r, root).unwrap();
    }

    #[test]
    fn the_walk_handles_kind_changes_removed_trees_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (d.path().join("old"), d.path().join("new"));
        // old: a (file), b/ (dir with content), c/ (dir that becomes a symlink), keep/x
        file(&old, "a", b"file a", 10, 0);
        file(&old.join("b/deep/er"), "f", b"deep", 10, 0);
        file(&old.join("c"), "g", b"in c", 10, 0);
        file(&old.join("keep"), "x", &vec![7u8; 5000], 10, 0);
        file(&old, "a.txt", b"sorts between a and a/ by string, after a by name", 10, 0);
        // new: a/ (dir), b (file), c -> keep (symlink), keep/x changed, ro/ read-only with content
        file(&new.join("a"), "inner", b"now a dir", 20, 0);
        file(&new, "b", b"now a file", 20, 0);
        file(
            &new.join("keep"),
            "x",
            &{
                let mut v = vec![7u8; 5000];
                v[2500] = 8;
                v
            },
            20,
            0,
        );
        file(&new, "a.txt", b"sorts between a and a/ by string, after a by name", 10, 0);
        file(&new.join("ro/sub"), "y", b"read-only dir content", 20, 0);
        std::os::unix::fs::symlink("keep", new.join("c")).unwrap();
        fs::set_permissions(new.join("ro/sub"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(new.join("ro"), fs::Permissions::from_mode(0o500)).unwrap();

        let out = d.path().join("out.cma");
        let r =
            build(&new, Some(&old), &out, &BuildOptions::new(AssignmentType::Publish, 2)).unwrap();
        assert_eq!((r.deleted, r.deltas, r.unchanged), (3, 1, 1), "{r:?}");
        let site = d.path().join("site");
        copy_tree(&old, &site);
        apply(&out, &site);
        assert_eq!(observe(&site), observe(&new));
        for p in [&new.join("ro"), &new.join("ro/sub"), &site.join("ro"), &site.join("ro/sub")] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn the_assignment_describes_the_whole_resulting_tree() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (d.path().join("old"), d.path().join("new"));
        file(&old, "same.txt", b"unchanged", 10, 0);
        file(&old.join("dir"), "gone", b"removed", 10, 0);
        file(&new, "same.txt", b"unchanged", 10, 0);
        file(&new.join("dir"), "added", b"new", 20, 0);
        file(&new, "suid", b"#!", 20, 0);
        fs::set_permissions(new.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("dir/added", new.join("link")).unwrap();
        let out = d.path().join("out.cma");
        let r =
            build(&new, Some(&old), &out, &BuildOptions::new(AssignmentType::Publish, 2)).unwrap();
        assert_eq!(r.modes_stripped, 1);
        let reader = crate::AssignmentReader::open(&out).unwrap();
        reader.verify(None, None).unwrap();
        assert!(reader.has_tree());
        let tree: Vec<String> = reader
            .tree()
            .map(|t| {
                let t = t.unwrap();
                match t.kind {
                    TreeKind::Dir { mode } => format!("{} dir {mode:o}", t.path),
                    TreeKind::File { mode, hash, .. } => {
                        format!("{} file {mode:o} {}", t.path, blake3::Hash::from_bytes(hash))
                    }
                    TreeKind::Symlink { target } => format!("{} link {target}", t.path),
                }
            })
            .collect();
        fs::set_permissions(new.join("suid"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(tree, observe(&new), "every entry, the unchanged one too, setuid stripped");
        // Special bits refused by policy, and a chain of links that leaves the tree.
        fs::set_permissions(new.join("suid"), fs::Permissions::from_mode(0o2755)).unwrap();
        let mut opts = BuildOptions::new(AssignmentType::Publish, 2);
        opts.special_bits = SpecialBits::Refuse;
        let e = build(&new, Some(&old), &out, &opts).unwrap_err();
        assert!(matches!(e, BuildError::SpecialBits { ref path, .. } if path == "suid"), "{e}");
        fs::remove_file(new.join("suid")).unwrap();
        std::os::unix::fs::symlink("..", new.join("dir/up")).unwrap();
        std::os::unix::fs::symlink("dir/up/dir/up/../../x", new.join("out")).unwrap();
        let e = build(&new, Some(&old), &out, &BuildOptions::new(AssignmentType::Publish, 2))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("staging symlink out -> dir/up/dir/up/../../x resolves outside the site"),
            "{e}"
        );
    }

    fn copy_tree(from: &Path, to: &Path) {
        assert!(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(from)
                .arg(to)
                .status()
                .unwrap()
                .success()
        );
    }

    #[test]
    fn memory_follows_the_widest_directory_not_the_file_count() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (d.path().join("old"), d.path().join("new"));
        for i in 0..30 {
            for j in 0..40 {
                file(
                    &old.join(format!("d{i}")),
                    &format!("f{j}"),
                    format!("{i} {j}").as_bytes(),
                    10,
                    0,
                );
            }
        }
        copy_tree(&old, &new);
        file(&new.join("d7"), "f3", b"changed", 20, 0);
        let r = build(
            &new,
            Some(&old),
            &d.path().join("out.cma"),
            &BuildOptions::new(AssignmentType::Publish, 2),
        )
        .unwrap();
        assert_eq!((r.changed, r.unchanged), (1, 1199), "{r:?}");
        // The root listing (30) and one directory's (40), in both trees.
        assert_eq!(r.peak_entries_held, 2 * (30 + 40), "{r:?}");
    }

    #[test]
    fn a_tree_as_deep_as_paths_allow_walks_on_a_small_stack() {
        // Paths are at most 4096 bytes, so at most ~2048 levels; the walk recurses once per level.
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (d.path().join("old"), d.path().join("new"));
        let deep = ["a"; 2000].join("/");
        fs::create_dir_all(old.join(&deep)).unwrap();
        fs::create_dir_all(new.join(&deep)).unwrap();
        file(&new.join(&deep), "f", b"at the bottom", 10, 0);
        let out = d.path().join("out.cma");
        let r = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                build(&new, Some(&old), &out, &BuildOptions::new(AssignmentType::Publish, 2))
                    .unwrap()
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!((r.new, r.unchanged), (1, 0), "{r:?}");
    }
}
