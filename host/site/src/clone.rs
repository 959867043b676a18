//! The start of a new release: live's tree rebuilt with hard links to its files (no file
//! bytes are copied). Directories are fresh, so the interpreter may add and remove entries
//! freely; files are shared inodes, so they may only ever be *replaced* (the interpreter's
//! rule: fresh inode + rename), never written in place.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

/// Rebuilds `from` at `to` (which must not exist) with hard-linked files. Returns the number
/// of files linked.
pub fn hard_link_tree(from: &Path, to: &Path) -> io::Result<u64> {
    let mut files = 0;
    let mut modes = Vec::new();
    fs::create_dir(to)?;
    modes.push((to.to_path_buf(), fs::metadata(from)?.permissions().mode()));
    let mut stack = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((src, dst)) = stack.pop() {
        for e in fs::read_dir(&src)? {
            let e = e?;
            let (s, d) = (e.path(), dst.join(e.file_name()));
            let ft = e.file_type()?;
            if ft.is_dir() {
                fs::create_dir(&d)?;
                modes.push((d.clone(), fs::symlink_metadata(&s)?.permissions().mode()));
                stack.push((s, d));
            } else if ft.is_symlink() {
                symlink(fs::read_link(&s)?, &d)?;
            } else {
                fs::hard_link(&s, &d)?;
                files += 1;
            }
        }
    }
    // Directories stay writable while the interpreter works; their modes are restored before
    // the interpreter runs only when they already allow the owner to write.
    for (d, mode) in modes.into_iter().rev() {
        fs::set_permissions(&d, fs::Permissions::from_mode(mode | 0o700))?;
    }
    Ok(files)
}
