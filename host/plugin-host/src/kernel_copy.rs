//! Copies between two files inside the kernel (`copy_file_range`): no byte passes through user
//! space, and filesystems that share extents (XFS, btrfs, NFS 4.2) clone them instead of
//! copying. Why: a delta against a 1 GiB base otherwise rereads and rewrites the whole
//! unchanged part in user space, which made apply slower than rsync's.

use std::fs::File;
use std::io;

use rustix::io::Errno;

/// How a kernel copy ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KernelCopy {
    /// Every byte asked for was copied.
    Done,
    /// The kernel cannot copy between these files (another filesystem on an old kernel, a
    /// filesystem without support): `copied` bytes were copied, the rest is the caller's.
    Unsupported { copied: u64 },
    /// The source ended `copied` bytes in (it shrank since it was measured).
    SourceEnded { copied: u64 },
}

/// Appends `len` bytes of `from`, starting at `offset`, at `to`'s file position (which moves
/// past them). `from`'s position is not used.
pub(crate) fn append(from: &File, offset: u64, to: &File, len: u64) -> io::Result<KernelCopy> {
    let mut copied = 0u64;
    while copied < len {
        let mut at = offset + copied;
        let want = usize::try_from(len - copied).unwrap_or(usize::MAX).min(1 << 30);
        match rustix::fs::copy_file_range(from, Some(&mut at), to, None, want) {
            Ok(0) => return Ok(KernelCopy::SourceEnded { copied }),
            Ok(n) => copied += n as u64,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP | Errno::PERM) => {
                return Ok(KernelCopy::Unsupported { copied });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(KernelCopy::Done)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn appends_a_range_after_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("base"), &base).unwrap();
        let from = File::open(dir.path().join("base")).unwrap();
        let mut to = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("new"))
            .unwrap();
        to.write_all(b"head").unwrap();
        assert_eq!(append(&from, 1000, &to, 200_000).unwrap(), KernelCopy::Done);
        to.write_all(b"tail").unwrap();
        let mut got = Vec::new();
        to.seek(SeekFrom::Start(0)).unwrap();
        to.read_to_end(&mut got).unwrap();
        let mut want = b"head".to_vec();
        want.extend_from_slice(&base[1000..201_000]);
        want.extend_from_slice(b"tail");
        assert!(got == want, "the copy differs from the base's range");
    }

    #[test]
    fn a_source_shorter_than_asked_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base"), [7u8; 100]).unwrap();
        let from = File::open(dir.path().join("base")).unwrap();
        let to = File::create(dir.path().join("new")).unwrap();
        assert_eq!(append(&from, 50, &to, 100).unwrap(), KernelCopy::SourceEnded { copied: 50 });
    }
}
