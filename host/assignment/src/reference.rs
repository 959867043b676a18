//! The reference interpreter: each command's exact meaning, executed natively on a directory.
//!
//! Servers apply assignments through the sandboxed interpreter plugin; this module is the
//! specification those plugins are tested against (`build(old → new)` applied here to `old`
//! must give `new`) and a tool for tests. It follows the same rules a plugin must follow:
//! a created or replaced file is always a fresh inode (temp file + rename), because a release's
//! unchanged files are hard links shared with live; no path component may be a symlink.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use crate::format::{Command, DeltaOp};
use crate::read::{AssignmentReader, ReadError};
use crate::write::copy_range;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Refused(String),
}

fn refused(s: impl Into<String>) -> ApplyError {
    ApplyError::Refused(s.into())
}

/// Joins a checked relative path to `root`, refusing to pass through a symlink on the way.
pub fn resolve(root: &Path, rel: &str) -> Result<PathBuf, ApplyError> {
    crate::format::check_path(rel).map_err(refused)?;
    let mut p = root.to_path_buf();
    let mut comps = rel.split('/').peekable();
    while let Some(c) = comps.next() {
        p.push(c);
        if comps.peek().is_some()
            && let Ok(m) = fs::symlink_metadata(&p)
            && m.file_type().is_symlink()
        {
            return Err(refused(format!("{} passes through a symlink", rel)));
        }
    }
    Ok(p)
}

fn set_mtime(f: &File, mtime: i64) -> io::Result<()> {
    let t = if mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(mtime.unsigned_abs())
    };
    f.set_modified(t)
}

/// Writes a fresh file next to `dest` with `fill`, checks its BLAKE3, sets mode and mtime, and
/// renames it over `dest`.
fn replace_file(
    dest: &Path,
    mode: u32,
    mtime: i64,
    hash: Option<&[u8; 32]>,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), ApplyError>,
) -> Result<(), ApplyError> {
    if fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        return Err(refused("a directory is in the way"));
    }
    let dir = dest.parent().ok_or_else(|| refused("no parent directory"))?;
    let tmp = tempfile::Builder::new().prefix(".cm-new-").tempfile_in(dir)?;
    let mut h = blake3::Hasher::new();
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        let mut hashing = HashingWriter { inner: &mut w, hasher: &mut h };
        fill(&mut hashing)?;
        w.flush()?;
    }
    if hash.is_some_and(|want| h.finalize() != blake3::Hash::from_bytes(*want)) {
        return Err(refused("written bytes do not match the command's BLAKE3"));
    }
    tmp.as_file().set_permissions(fs::Permissions::from_mode(mode))?;
    set_mtime(tmp.as_file(), mtime)?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: &'a mut blake3::Hasher,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hasher.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Copies exactly `len` bytes of `payload` to `w`.
fn copy_exact(payload: &mut dyn Read, len: u64, w: &mut dyn Write) -> Result<(), ApplyError> {
    let n = io::copy(&mut payload.take(len), w)?;
    if n != len {
        return Err(refused("payload shorter than the command needs"));
    }
    Ok(())
}

/// Checks that the file at `base` is the one a delta was computed against.
pub fn check_base(base: &Path, base_len: u64, base_hash: &[u8; 32]) -> Result<File, ApplyError> {
    let f = File::open(base).map_err(|e| refused(format!("base file: {e}")))?;
    verify_base(f, base_len, base_hash)
}

/// Checks that the open file `f` is the one a delta was computed against.
pub fn verify_base(f: File, base_len: u64, base_hash: &[u8; 32]) -> Result<File, ApplyError> {
    let len = f.metadata()?.len();
    if len != base_len {
        return Err(refused(format!(
            "delta against the wrong base: base is {len} bytes, the delta expects {base_len}"
        )));
    }
    let mut h = blake3::Hasher::new();
    copy_range(&f, 0, len, |b| {
        h.update(b);
        Ok(())
    })?;
    if h.finalize() != blake3::Hash::from_bytes(*base_hash) {
        return Err(refused("delta against the wrong base: base file's BLAKE3 differs"));
    }
    Ok(f)
}

/// Executes one command in the tree at `root`. `payload` is the command's payload stream
/// (required for write-file and apply-delta). Hashes are checked: the base of a delta before,
/// the written bytes after.
pub fn apply_command(
    root: &Path,
    cmd: &Command,
    payload: Option<&mut dyn Read>,
) -> Result<(), ApplyError> {
    match cmd {
        Command::MakeDir { path, mode } => make_dir(root, path, *mode),
        Command::WriteFile { path, mode, mtime, payload: pl, hash } => {
            let payload = payload.ok_or_else(|| refused("no payload"))?;
            write_file(root, path, *mode, *mtime, payload, pl.len, Some(hash))
        }
        Command::ApplyDelta { path, base, base_len, base_hash, mode, mtime, ops, hash, .. } => {
            check_base(&resolve(root, base)?, *base_len, base_hash)?;
            let payload = payload.ok_or_else(|| refused("no payload"))?;
            apply_delta(root, path, base, *mode, *mtime, ops, payload, Some(hash))
        }
        Command::Remove { path, recursive } => remove(root, path, *recursive),
        Command::Rename { from, to } => rename(root, from, to),
        Command::Symlink { path, target } => make_symlink(root, path, target),
        Command::SetMode { path, mode } => set_mode(root, path, *mode),
    }
}

/// make-dir: creates `path` (an existing directory is fine) and sets its mode.
pub fn make_dir(root: &Path, path: &str, mode: u32) -> Result<(), ApplyError> {
    let p = resolve(root, path)?;
    match fs::create_dir(&p) {
        Err(e)
            if e.kind() == io::ErrorKind::AlreadyExists && fs::symlink_metadata(&p)?.is_dir() => {}
        r => r?,
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// write-file: a fresh file of exactly `len` bytes from `payload`, renamed over `path`.
pub fn write_file(
    root: &Path,
    path: &str,
    mode: u32,
    mtime: i64,
    payload: &mut dyn Read,
    len: u64,
    hash: Option<&[u8; 32]>,
) -> Result<(), ApplyError> {
    let p = resolve(root, path)?;
    replace_file(&p, mode, mtime, hash, |w| copy_exact(payload, len, w))
}

/// apply-delta: a fresh file built from `base` (a file of the same tree) and `payload`
/// following `ops`, renamed over `path`.
#[allow(clippy::too_many_arguments)]
pub fn apply_delta(
    root: &Path,
    path: &str,
    base: &str,
    mode: u32,
    mtime: i64,
    ops: &[DeltaOp],
    payload: &mut dyn Read,
    hash: Option<&[u8; 32]>,
) -> Result<(), ApplyError> {
    let p = resolve(root, path)?;
    let base_file =
        File::open(resolve(root, base)?).map_err(|e| refused(format!("base file {base}: {e}")))?;
    let base_len = base_file.metadata()?.len();
    replace_file(&p, mode, mtime, hash, |w| {
        for op in ops {
            match *op {
                DeltaOp::Copy { offset, len } => {
                    if offset.checked_add(len).is_none_or(|end| end > base_len) {
                        return Err(refused("copy range beyond the base file"));
                    }
                    copy_range(&base_file, offset, len, |b| w.write_all(b))?
                }
                DeltaOp::Insert { len } => copy_exact(payload, len, w)?,
            }
        }
        Ok(())
    })
}

/// remove: a file or symlink, an empty directory, or (`recursive`) any directory.
pub fn remove(root: &Path, path: &str, recursive: bool) -> Result<(), ApplyError> {
    let p = resolve(root, path)?;
    let m = fs::symlink_metadata(&p)?;
    match (m.is_dir(), recursive) {
        (true, true) => fs::remove_dir_all(&p)?,
        (true, false) => fs::remove_dir(&p)?,
        (false, _) => fs::remove_file(&p)?,
    }
    Ok(())
}

pub fn rename(root: &Path, from: &str, to: &str) -> Result<(), ApplyError> {
    fs::rename(resolve(root, from)?, resolve(root, to)?)?;
    Ok(())
}

/// symlink: a fresh link renamed over `path` (replacing is atomic); the target must stay inside.
pub fn make_symlink(root: &Path, path: &str, target: &str) -> Result<(), ApplyError> {
    crate::format::check_symlink_target(path, target).map_err(refused)?;
    let p = resolve(root, path)?;
    if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
        return Err(refused("a directory is in the way"));
    }
    let dir = p.parent().ok_or_else(|| refused("no parent directory"))?;
    let tmp = dir.join(format!(".cm-link-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp)?;
    fs::rename(&tmp, &p)?;
    Ok(())
}

/// set-mode. A file with other hard links (shared with live) is first copied to a fresh inode,
/// so changing its mode never changes live's file.
pub fn set_mode(root: &Path, path: &str, mode: u32) -> Result<(), ApplyError> {
    let p = resolve(root, path)?;
    let m = fs::symlink_metadata(&p)?;
    if m.file_type().is_symlink() {
        return Err(refused("set-mode on a symlink"));
    }
    if m.is_file() && m.nlink() > 1 {
        let src = File::open(&p)?;
        let len = m.len();
        let dir = p.parent().ok_or_else(|| refused("no parent directory"))?;
        let tmp = tempfile::Builder::new().prefix(".cm-new-").tempfile_in(dir)?;
        {
            let mut w = BufWriter::new(tmp.as_file());
            copy_range(&src, 0, len, |b| w.write_all(b))?;
            w.flush()?;
        }
        tmp.as_file().set_permissions(fs::Permissions::from_mode(mode))?;
        if let Ok(t) = m.modified() {
            tmp.as_file().set_modified(t)?;
        }
        tmp.persist(&p).map_err(|e| e.error)?;
        return Ok(());
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A failure of [`apply_all`]: reading the assignment, or command `index`.
#[derive(Debug, thiserror::Error)]
pub enum ApplyAllError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("command {index} ({name} {path}): {source}")]
    Command { index: u64, name: &'static str, path: String, source: ApplyError },
}

/// Verifies `assignment` (unsealed) and applies all its commands to the tree at `root`.
pub fn apply_all(assignment: &AssignmentReader, root: &Path) -> Result<(), ApplyAllError> {
    assignment.verify(None, None)?;
    for c in assignment.commands() {
        let (index, cmd) = c?;
        let mut stream = cmd.payload().map(|p| assignment.payload(p)).transpose()?;
        let fail = |source| ApplyAllError::Command {
            index,
            name: cmd.name(),
            path: cmd.path().to_owned(),
            source,
        };
        let payload = stream.as_mut().map(|s| s as &mut dyn Read);
        apply_command(root, &cmd, payload).map_err(fail)?;
        if let Some(mut s) = stream {
            // The payload must be consumed exactly; the stream errors if it holds more.
            s.read(&mut [0u8; 1]).map_err(|e| fail(e.into()))?;
        }
    }
    Ok(())
}

/// Seconds since the epoch of a file's mtime (negative before 1970).
pub fn mtime_secs(m: &fs::Metadata) -> i64 {
    match m.modified().map(|t| t.duration_since(UNIX_EPOCH)) {
        Ok(Ok(d)) => d.as_secs() as i64,
        Ok(Err(e)) => -(e.duration().as_secs() as i64),
        Err(_) => 0,
    }
}
