//! A site's directory layout and the durable, atomic steps everything else is made of.
//!
//! ```text
//! SITE/
//!   current -> releases/<serial>     the live tree (a symlink, replaced by rename: atomic)
//!   history                          committed serials, oldest first (rewritten by rename)
//!   releases/<serial>/               complete releases (live, backups, prepared)
//!   releases/.building-<serial>/     a release being built (never live; removed on failure or at open)
//!   releases/.trash-<n>/             a release being deleted (removed at open)
//!   .lock                            flock: one operation at a time
//! ```
//!
//! Crash safety rests on three facts: a directory or symlink rename is atomic; a release only
//! gets its final name after its content is synced; and `current` is the truth — `history` is
//! rewritten *before* `current` is switched and reconciled against `current` at open, so a
//! crash between the two leaves a state that `open` repairs in either direction.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

pub const RELEASES: &str = "releases";
pub const CURRENT: &str = "current";
pub const HISTORY: &str = "history";
pub const BUILDING_PREFIX: &str = ".building-";
pub const TRASH_PREFIX: &str = ".trash-";

pub fn release_dir(site: &Path, serial: u64) -> PathBuf {
    site.join(RELEASES).join(serial.to_string())
}

pub fn building_dir(site: &Path, serial: u64) -> PathBuf {
    site.join(RELEASES).join(format!("{BUILDING_PREFIX}{serial}"))
}

/// fsync of a directory, so the renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flushes every dirty page of the filesystem holding `path` (one call instead of an fsync
/// per file of a freshly built release).
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: syncfs takes a valid open descriptor, which `f` holds for the whole call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The serial `current` points at, if any.
pub fn current_serial(site: &Path) -> io::Result<Option<u64>> {
    match fs::read_link(site.join(CURRENT)) {
        Ok(t) => {
            let name = t.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.parse().map(Some).map_err(|_| {
                io::Error::other(format!("`current` points to {}, not a release", t.display()))
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Points `current` at release `serial` atomically: a new link renamed over the old one.
pub fn switch_current(site: &Path, serial: u64) -> io::Result<()> {
    let tmp = site.join(format!(".current-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    symlink(Path::new(RELEASES).join(serial.to_string()), &tmp)?;
    fs::rename(&tmp, site.join(CURRENT))?;
    sync_dir(site)
}

pub fn read_history(site: &Path) -> io::Result<Vec<u64>> {
    match fs::read_to_string(site.join(HISTORY)) {
        Ok(s) => s
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.trim().parse().map_err(|_| io::Error::other(format!("history: bad line {l:?}")))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Most history entries kept (the oldest are dropped).
const HISTORY_MAX: usize = 256;

/// Replaces `history` durably: temp file, fsync, rename, fsync of the directory.
pub fn write_history(site: &Path, serials: &[u64]) -> io::Result<()> {
    let from = serials.len().saturating_sub(HISTORY_MAX);
    let tmp = site.join(format!(".history-{}", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        for s in &serials[from..] {
            writeln!(f, "{s}")?;
        }
        f.sync_all()?;
    }
    fs::rename(&tmp, site.join(HISTORY))?;
    sync_dir(site)
}

/// Removes a directory tree so that a crash half-way never leaves a partial tree under a
/// meaningful name: it is first renamed to `.trash-…`, which `open` clears.
pub fn discard(site: &Path, dir: &Path) -> io::Result<()> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    let trash = site.join(RELEASES).join(format!(
        "{TRASH_PREFIX}{}-{}",
        std::process::id(),
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    fs::rename(dir, &trash)?;
    remove_tree(&trash)
}

/// remove_dir_all, after making read-only directories writable (a release may hold 0o555 dirs).
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(dir)?;
            fs::remove_dir_all(dir)
        }
        Err(e) => Err(e),
    }
}

fn make_writable(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Ok(());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    for e in fs::read_dir(dir)? {
        make_writable(&e?.path())?;
    }
    Ok(())
}

/// The serials of complete releases, ascending.
pub fn list_releases(site: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in fs::read_dir(site.join(RELEASES))? {
        if let Some(s) = e?.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.push(s);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Leftovers of interrupted operations: `.building-*` and `.trash-*` under releases/.
pub fn leftovers(site: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in fs::read_dir(site.join(RELEASES))? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(BUILDING_PREFIX) || name.starts_with(TRASH_PREFIX) {
            out.push(e.path());
        }
    }
    Ok(out)
}
