//! Change detection (manager side): staging tree vs the shadow copy of what servers hold, turned
//! into an assignment. Size and mtime decide first; a file whose size or mtime differs is
//! compared by content (the delta pass hashes both), so a touched-but-equal file costs no bytes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::format::{AssignmentType, Header, check_symlink_target};
use crate::policy::CompressionPolicy;
use crate::reference::mtime_secs;
use crate::write::{AssignmentWriter, ChangeOutcome, Meta, WriteError};
use crate::{CipherKey, SealKey};

/// One entry of a scanned tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    /// `mtime` in whole seconds (what assignments carry); `mtime_nsec` its sub-second part,
    /// compared only when both trees have one (a copy made through an assignment has none).
    File { len: u64, mtime: i64, mode: u32, mtime_nsec: u32 },
    Symlink { target: String },
}

/// Every entry below `root` by relative '/'-separated path (parents sort before children).
/// Names that are not UTF-8 are refused: the format carries UTF-8 paths.
pub fn scan(root: &Path) -> Result<BTreeMap<String, Entry>, BuildError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| BuildError::io(format!("listing {}", dir.display()), e))?;
        for ent in rd {
            let ent = ent.map_err(|e| BuildError::io(format!("listing {}", dir.display()), e))?;
            let name = ent.file_name().into_string().map_err(|n| BuildError::NotUtf8 { path: dir.join(n) })?;
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let full = ent.path();
            let m = fs::symlink_metadata(&full).map_err(|e| BuildError::io(format!("stat {}", full.display()), e))?;
            let mode = m.permissions().mode() & 0o7777;
            let entry = if m.file_type().is_symlink() {
                let t = fs::read_link(&full).map_err(|e| BuildError::io(format!("readlink {}", full.display()), e))?;
                let target = t.into_os_string().into_string().map_err(|_| BuildError::NotUtf8 { path: full.clone() })?;
                Entry::Symlink { target }
            } else if m.is_dir() {
                stack.push((full, path.clone()));
                Entry::Dir { mode }
            } else if m.is_file() {
                Entry::File { len: m.len(), mtime: mtime_secs(&m), mode, mtime_nsec: m.mtime_nsec() as u32 }
            } else {
                return Err(BuildError::Unsupported { path: full });
            };
            out.insert(path, entry);
        }
    }
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
    /// Files at least this long are sent as deltas when that saves bytes.
    pub delta_min: u64,
}

impl BuildOptions {
    pub fn new(kind: AssignmentType, serial: u64) -> Self {
        BuildOptions {
            meta: Meta { kind, serial, job_id: 0, base_serial: 0, target_serial: 0 },
            policy: CompressionPolicy::default(),
            seal: None,
            cipher: None,
            delta_min: 256,
        }
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
pub fn build(staging: &Path, shadow: Option<&Path>, out: &Path, opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let new = scan(staging)?;
    let old = match shadow {
        Some(s) => scan(s)?,
        None => BTreeMap::new(),
    };
    let mut w = AssignmentWriter::create(out, opts.meta, opts.policy.clone(), opts.seal.clone())?;
    if let Some(k) = &opts.cipher {
        w.encrypt_with(k.clone());
    }
    let mut report = BuildReport::default();

    // Removals first (also of entries whose kind changed), outermost only.
    let mut removed_dir: Option<&str> = None;
    for (path, e) in &old {
        if removed_dir.is_some_and(|d| path.len() > d.len() && path.starts_with(d) && path.as_bytes()[d.len()] == b'/') {
            continue;
        }
        let gone = new.get(path).is_none_or(|n| kind_of(n) != kind_of(e));
        if gone {
            let is_dir = matches!(e, Entry::Dir { .. });
            w.remove(path, is_dir)?;
            report.deleted += 1;
            if is_dir {
                removed_dir = Some(path);
            }
        }
    }

    // Directories made writable first, their final mode set once their content is in.
    let mut late_modes = Vec::new();
    for (path, e) in &new {
        let before = old.get(path).filter(|o| kind_of(o) == kind_of(e));
        match (e, before) {
            (Entry::Dir { mode }, None) => {
                w.make_dir(path, mode | 0o700)?;
                if mode & 0o700 != 0o700 {
                    late_modes.push((path, *mode));
                }
                report.new += 1;
            }
            (Entry::Dir { mode }, Some(Entry::Dir { mode: was })) => {
                if mode != was {
                    late_modes.push((path, *mode));
                }
            }
            (Entry::Symlink { target }, before) => {
                check_symlink_target(path, target).map_err(|why| BuildError::SymlinkEscapes {
                    path: path.clone(),
                    target: target.clone(),
                    why,
                })?;
                if before != Some(e) {
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
                Some(Entry::File { len: was_len, mtime: was_mtime, mode: was_mode, mtime_nsec: was_nsec }),
            ) => {
                let shadow = shadow.expect("an old entry implies a shadow tree");
                // The quick check: same size and mtime (to the nanosecond when both sides
                // keep nanoseconds, so a file rewritten within the same second is still seen).
                let same_nsec = mtime_nsec == was_nsec || *mtime_nsec == 0 || *was_nsec == 0;
                let content_same = if len == was_len && mtime == was_mtime && same_nsec {
                    true
                } else if *len >= opts.delta_min && *was_len >= opts.delta_min.min(*len) {
                    let outcome = w.file_change(path, path, &open(shadow, path)?, &open(staging, path)?, *mode, *mtime)?;
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
            _ => unreachable!("kinds matched above"),
        }
    }
    for (path, mode) in late_modes.into_iter().rev() {
        w.set_mode(path, mode)?;
    }
    let header = w.finish()?;
    report.file_len = fs::metadata(out).map_err(|e| BuildError::io(format!("stat {}", out.display()), e))?.len();
    report.header = Some(header);
    Ok(report)
}

fn same_content(a: &Path, b: &Path) -> Result<bool, BuildError> {
    let hash = |p: &Path| -> Result<blake3::Hash, BuildError> {
        let f = File::open(p).map_err(|e| BuildError::io(format!("opening {}", p.display()), e))?;
        let len = f.metadata().map_err(|e| BuildError::io(format!("stat {}", p.display()), e))?.len();
        let mut h = blake3::Hasher::new();
        crate::write::copy_range(&f, 0, len, |b| {
            h.update(b);
            Ok(())
        })
        .map_err(|e| BuildError::io(format!("reading {}", p.display()), e))?;
        Ok(h.finalize())
    };
    Ok(hash(a)? == hash(b)?)
}

/// Writes a header-only assignment (commit, rollback, switch).
pub fn build_switch(out: &Path, meta: Meta, seal: Option<SealKey>) -> Result<Header, WriteError> {
    AssignmentWriter::create(out, meta, CompressionPolicy::none(), seal)?.finish()
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
        let r = build(&new, Some(&old), &d.path().join("out.cma"), &BuildOptions::new(AssignmentType::Publish, 2)).unwrap();
        assert_eq!((r.changed, r.unchanged), (1, 1), "{r:?}");
    }
}
