//! The free space and inodes of the site root's filesystem (`statvfs`), reported to the GL
//! with the member's state (`node/state.rs`, `cm_tree::space`): the manager checks a run's
//! need against it before distributing.

use std::path::Path;

use cm_tree::space::FsSpace;

/// What an unprivileged writer may still use on the filesystem holding `root` (`f_bavail`,
/// `f_favail`); `None` when it cannot be measured (logged at debug: the report just lacks it).
pub fn measure(root: &Path) -> Option<FsSpace> {
    match rustix::fs::statvfs(root) {
        Ok(st) => Some(FsSpace {
            free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            // Filesystems without a fixed inode count report 0 inodes in all.
            free_inodes: if st.f_files == 0 { 0 } else { st.f_favail.min(st.f_files) },
            total_inodes: st.f_files,
        }),
        Err(e) => {
            tracing::debug!(root = %root.display(), "statvfs of the site root: {e}");
            None
        }
    }
}

/// The tightest of several site roots' filesystems (the manager checks one figure per server):
/// the fewest free bytes, and the fewest free inodes, each from whichever root has them.
pub fn measure_all<'a>(roots: impl IntoIterator<Item = &'a Path>) -> Option<FsSpace> {
    roots.into_iter().filter_map(measure).reduce(|a, b| FsSpace {
        free_bytes: a.free_bytes.min(b.free_bytes),
        total_bytes: if a.free_bytes <= b.free_bytes { a.total_bytes } else { b.total_bytes },
        free_inodes: a.free_inodes.min(b.free_inodes),
        total_inodes: if a.free_inodes <= b.free_inodes { a.total_inodes } else { b.total_inodes },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_filesystem() {
        let d = tempfile::tempdir().unwrap();
        let s = measure(d.path()).expect("statvfs of a temporary directory");
        assert!(s.total_bytes > 0 && s.check().is_ok(), "{s:?}");
        assert!(measure(&d.path().join("missing")).is_none());
    }
}
