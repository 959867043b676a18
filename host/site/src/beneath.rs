//! A release's tree reached by descriptor: every path is resolved by the kernel beneath the
//! release's root (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so a host-side read
//! (a delta's base, a written file, the whole-tree check) never follows a link anywhere, let
//! alone out of the site, and no call ever builds a host path longer than the release root
//! plus one relative path (the format's [`MAX_PATH`](cm_assignment::format::MAX_PATH) fits one
//! system call).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

/// One directory tree, held by its root's descriptor.
#[derive(Debug)]
pub(crate) struct Tree {
    root: OwnedFd,
}

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// "" (the root itself) as the kernel wants it.
fn rel_or_dot(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() { Path::new(".") } else { rel }
}

fn missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

impl Tree {
    pub(crate) fn open(dir: &Path) -> io::Result<Tree> {
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree { root })
    }

    fn at(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat2(
            &self.root,
            rel_or_dot(rel),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve(),
        )?)
    }

    /// A regular file, opened for reading.
    pub(crate) fn open_file(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        let f = File::from(self.at(rel.as_ref(), OFlags::RDONLY)?);
        if !f.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(f)
    }

    /// The entry itself (a symlink is not followed); `None` when there is none.
    pub(crate) fn lstat(&self, rel: impl AsRef<Path>) -> io::Result<Option<(OwnedFd, Stat)>> {
        match self.at(rel.as_ref(), OFlags::PATH) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd)?;
                Ok(Some((fd, st)))
            }
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The target of `rel` when it is a symlink.
    pub(crate) fn read_link(&self, rel: impl AsRef<Path>) -> io::Result<Option<Vec<u8>>> {
        match self.lstat(rel)? {
            Some((fd, st)) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                let t = rustix::fs::readlinkat(&fd, "", Vec::new())?;
                Ok(Some(t.into_bytes()))
            }
            _ => Ok(None),
        }
    }

    /// The entries of directory `rel` (without `.` and `..`), each with its type.
    pub(crate) fn list(&self, rel: impl AsRef<Path>) -> io::Result<Vec<(Vec<u8>, FileType)>> {
        let rel = rel.as_ref();
        let fd = self.at(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut out = Vec::new();
        for e in rustix::fs::Dir::read_from(&fd)? {
            let e = e?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = name.to_vec();
            let ft = match e.file_type() {
                FileType::Unknown => {
                    let p = rel.join(OsStr::from_bytes(&name));
                    match self.lstat(&p)? {
                        Some((_, st)) => FileType::from_raw_mode(st.st_mode),
                        None => continue,
                    }
                }
                ft => ft,
            };
            out.push((name, ft));
        }
        Ok(out)
    }

    /// Sets the mode of directory `rel`.
    pub(crate) fn chmod_dir(&self, rel: impl AsRef<Path>, mode: u32) -> io::Result<()> {
        let fd = self.at(rel.as_ref(), OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok(rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?)
    }

    /// Gives the entry opened as `fd` by [`lstat`](Self::lstat) (a symlink itself, not its
    /// target) to `uid:gid`.
    pub(crate) fn chown(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
        let (uid, gid) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
        Ok(rustix::fs::chownat(fd, "", Some(uid), Some(gid), AtFlags::EMPTY_PATH)?)
    }

    /// Creates directory `rel` (its parent must be a directory of this tree).
    pub(crate) fn mkdir(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let (parent, name) = self.parent_of(rel)?;
        Ok(rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(mode))?)
    }

    /// Creates symlink `rel` -> `target`.
    pub(crate) fn symlink(&self, rel: &Path, target: &[u8]) -> io::Result<()> {
        let (parent, name) = self.parent_of(rel)?;
        Ok(rustix::fs::symlinkat(OsStr::from_bytes(target), &parent, name)?)
    }

    /// Hard-links `from`'s file `rel` at the same place in this tree.
    pub(crate) fn link_from(&self, from: &Tree, rel: &Path) -> io::Result<()> {
        let (src_parent, name) = from.parent_of(rel)?;
        let (dst_parent, _) = self.parent_of(rel)?;
        Ok(rustix::fs::linkat(&src_parent, name, &dst_parent, name, AtFlags::empty())?)
    }

    /// The directory holding `rel` (opened beneath the root) and `rel`'s last component.
    fn parent_of<'p>(&self, rel: &'p Path) -> io::Result<(OwnedFd, &'p OsStr)> {
        let name = rel.file_name().ok_or_else(|| io::Error::other("no file name"))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.at(parent, OFlags::RDONLY | OFlags::DIRECTORY)?, name))
    }

    /// Free bytes (for an unprivileged writer) and free inodes of the tree's filesystem
    /// (`None`: the filesystem has no inode limit, e.g. btrfs reports none).
    pub(crate) fn free_space(&self) -> io::Result<(u64, Option<u64>)> {
        let v = rustix::fs::fstatvfs(&self.root)?;
        let inodes = (v.f_files != 0).then_some(v.f_favail);
        Ok((v.f_bavail.saturating_mul(v.f_frsize), inodes))
    }
}
