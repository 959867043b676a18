//! The start of a new release: live's tree rebuilt with hard links to its files (no file
//! bytes are copied). Directories are fresh, so the interpreter may add and remove entries
//! freely; files are shared inodes, so they may only ever be *replaced* (the interpreter's
//! rule: fresh inode + rename), never written in place.
//!
//! Both trees are reached by descriptor ([`Tree`]): every call names an entry relative to a
//! release's root, so a path as long as the format allows (4095 bytes, beyond what the
//! release's host path plus it would fit in `PATH_MAX`) is cloned like any other.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::beneath::Tree;

/// Rebuilds `from` at `to` (which must not exist) with hard-linked files. Returns the number
/// of files linked.
pub fn hard_link_tree(from: &Path, to: &Path) -> io::Result<u64> {
    let mut files = 0;
    fs::create_dir(to)?;
    let (src, dst) = (Tree::open(from)?, Tree::open(to)?);
    let mut modes = vec![(PathBuf::new(), fs::metadata(from)?.permissions().mode())];
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for (name, ft) in src.list(&dir)? {
            let rel = dir.join(OsStr::from_bytes(&name));
            match ft {
                FileType::Directory => {
                    let mode = match src.lstat(&rel)? {
                        Some((_, st)) => st.st_mode & 0o7777,
                        None => continue,
                    };
                    dst.mkdir(&rel, 0o700)?;
                    modes.push((rel.clone(), mode));
                    stack.push(rel);
                }
                FileType::Symlink => {
                    if let Some(target) = src.read_link(&rel)? {
                        dst.symlink(&rel, &target)?;
                    }
                }
                _ => {
                    dst.link_from(&src, &rel)?;
                    files += 1;
                }
            }
        }
    }
    // Directories stay owner-writable while the interpreter works; the whole-tree check gives
    // each its described mode before the release is kept.
    for (d, mode) in modes.into_iter().rev() {
        dst.chmod_dir(&d, mode | 0o700)?;
    }
    Ok(files)
}
