//! Per-call quotas: what one call into a plugin may take of the host besides time and memory
//! (those are `runtime.rs`'s deadline and memory cap): log records and bytes, bytes written,
//! files created, open files, and the staging filesystem's free space and inodes.
//!
//! Logging past its quota is no error: records are dropped and counted, and one summary
//! record says how many when the call ends (a plugin's log is for people, and a chatty plugin
//! should not fail a release). Every other quota fails the call: the host function traps (the
//! guest cannot catch it), the call ends with [`FailureCause::Quota`](crate::FailureCause),
//! and tearing its store down removes unfinished writers' temporary files.
//!
//! Bytes and files are sized from what the call's batch declares (its write-file and
//! apply-delta lengths, the entries its commands create) plus the manifest's `extra-*`
//! allowance, so an honest interpreter never meets them and a hostile one gets no more than
//! the assignment asked for.

use cap_std::fs::Dir;
use cm_assignment::{Command, DeltaOp, StreamedCommand};

use crate::manifest::Limits;

/// Free space the host keeps on a staging filesystem: a write that would leave less fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskReserve {
    pub bytes: u64,
    pub inodes: u64,
}

impl Default for DiskReserve {
    fn default() -> Self {
        DiskReserve { bytes: 64 << 20, inodes: 4096 }
    }
}

/// Why a call was stopped by a quota.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuotaExceeded {
    #[error("wrote more than its {limit} bytes in one call")]
    WriteBytes { limit: u64 },
    #[error("created more than its {limit} files, directories or links in one call")]
    FilesCreated { limit: u64 },
    #[error("held more than its {limit} open files at once")]
    OpenFiles { limit: u64 },
    #[error(
        "`{path}`: the staging filesystem would keep less than its reserve ({free_bytes} bytes and {free_inodes} inodes free; reserve {reserve_bytes} bytes, {reserve_inodes} inodes)"
    )]
    DiskReserve {
        path: String,
        free_bytes: u64,
        free_inodes: u64,
        reserve_bytes: u64,
        reserve_inodes: u64,
    },
}

/// The host's trap for a quota: carries nothing; the cause is kept in [`Quotas::breach`].
#[derive(Debug, thiserror::Error)]
#[error("stopped by the host: {0}")]
pub(crate) struct QuotaTrap(pub QuotaExceeded);

/// How many bytes may be written between two looks at the filesystem's free space.
const SPACE_CHECK_INTERVAL: u64 = 1 << 20;

/// What a batch declares it will write and create.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Declared {
    pub bytes: u64,
    pub files: u64,
}

impl Declared {
    pub fn of(batch: &[StreamedCommand]) -> Declared {
        let mut d = Declared::default();
        for command in batch {
            let (bytes, files) = match command {
                Command::WriteFile { payload, .. } => (payload.size(), 1),
                Command::ApplyDelta { ops, .. } => (
                    ops.iter()
                        .map(|op| match op {
                            DeltaOp::Copy { len, .. } | DeltaOp::Insert { len } => *len,
                        })
                        .fold(0u64, u64::saturating_add),
                    1,
                ),
                Command::MakeDir { path, .. } => {
                    (0, path.split('/').filter(|p| !p.is_empty()).count() as u64)
                }
                Command::Symlink { .. } => (0, 1),
                Command::Remove { .. } | Command::Rename { .. } | Command::SetMode { .. } => (0, 0),
            };
            d.bytes = d.bytes.saturating_add(bytes);
            d.files = d.files.saturating_add(files);
        }
        d
    }
}

/// One instance's quotas and what its current call used.
pub(crate) struct Quotas {
    limits: Limits,
    reserve: DiskReserve,
    /// This call's budgets.
    write_limit: u64,
    files_limit: u64,
    written: u64,
    created: u64,
    /// Written since the free space was last looked at.
    unchecked: u64,
    /// Open readers and writers (they live across the calls of a session).
    open: u64,
    log_lines: u64,
    log_bytes: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
    /// The quota that stopped the current call, if one did.
    pub breach: Option<QuotaExceeded>,
}

impl Quotas {
    pub fn new(limits: Limits, reserve: DiskReserve) -> Self {
        let mut quotas = Quotas {
            limits,
            reserve,
            write_limit: 0,
            files_limit: 0,
            written: 0,
            created: 0,
            unchecked: 0,
            open: 0,
            log_lines: 0,
            log_bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
            breach: None,
        };
        quotas.start_call(Declared::default());
        quotas
    }

    /// A new call begins: fresh per-call counters, budgets for what it declares.
    pub fn start_call(&mut self, declared: Declared) {
        self.write_limit =
            declared.bytes.saturating_add(self.limits.extra_write_mib.saturating_mul(1 << 20));
        self.files_limit = declared.files.saturating_add(self.limits.extra_files);
        (self.written, self.created, self.unchecked) = (0, 0, 0);
        (self.log_lines, self.log_bytes, self.dropped_lines, self.dropped_bytes) = (0, 0, 0, 0);
        self.breach = None;
    }

    fn stop(&mut self, why: QuotaExceeded) -> QuotaTrap {
        self.breach = Some(why.clone());
        QuotaTrap(why)
    }

    /// Whether a log record of `len` bytes may go out; if not it is counted as dropped.
    pub fn log(&mut self, len: usize) -> bool {
        let len = len as u64;
        let fits = self.log_lines < self.limits.log_lines
            && self.log_bytes.saturating_add(len) <= self.limits.log_kib.saturating_mul(1024);
        if fits {
            self.log_lines += 1;
            self.log_bytes += len;
        } else {
            self.dropped_lines += 1;
            self.dropped_bytes = self.dropped_bytes.saturating_add(len);
        }
        fits
    }

    /// The summary of records dropped in this call (once; `None` if none were).
    pub fn take_dropped_summary(&mut self) -> Option<String> {
        if self.dropped_lines == 0 {
            return None;
        }
        let summary = format!(
            "log quota of {} records or {} KiB per call reached: dropped {} records ({} bytes)",
            self.limits.log_lines, self.limits.log_kib, self.dropped_lines, self.dropped_bytes
        );
        (self.dropped_lines, self.dropped_bytes) = (0, 0);
        Some(summary)
    }

    /// A reader or writer is about to be opened.
    pub fn open_file(&mut self) -> Result<(), QuotaTrap> {
        if self.open >= self.limits.open_files {
            return Err(self.stop(QuotaExceeded::OpenFiles { limit: self.limits.open_files }));
        }
        self.open += 1;
        Ok(())
    }

    /// A reader or writer was closed (dropped, finished, or its opening failed).
    pub fn close_file(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// `path` is about to be created on the filesystem of `tree` (one inode).
    pub fn create(&mut self, tree: &Dir, path: &str) -> Result<(), QuotaTrap> {
        if self.created >= self.files_limit {
            return Err(self.stop(QuotaExceeded::FilesCreated { limit: self.files_limit }));
        }
        self.check_space(tree, path, 0, 1)?;
        self.created += 1;
        Ok(())
    }

    /// `len` more bytes are about to be written to `path` on the filesystem of `tree`.
    pub fn write(&mut self, tree: &Dir, path: &str, len: u64) -> Result<(), QuotaTrap> {
        let written = self.written.saturating_add(len);
        if written > self.write_limit {
            return Err(self.stop(QuotaExceeded::WriteBytes { limit: self.write_limit }));
        }
        let unchecked = self.unchecked.saturating_add(len);
        if unchecked >= SPACE_CHECK_INTERVAL {
            self.check_space(tree, path, unchecked, 0)?;
            self.unchecked = 0;
        } else {
            self.unchecked = unchecked;
        }
        self.written = written;
        Ok(())
    }

    /// `path` may take `bytes` and `inodes` more only if the reserve stays free afterwards.
    /// A filesystem without an inode count (btrfs reports none) is judged on bytes alone.
    pub fn check_space(
        &mut self,
        tree: &Dir,
        path: &str,
        bytes: u64,
        inodes: u64,
    ) -> Result<(), QuotaTrap> {
        // A failed statvfs is not a full disk: the write itself will report what is wrong.
        let Ok(fs) = rustix::fs::fstatvfs(tree) else { return Ok(()) };
        let free_bytes = fs.f_bavail.saturating_mul(fs.f_frsize);
        let free_inodes = fs.f_favail;
        let short_of_bytes = free_bytes < self.reserve.bytes.saturating_add(bytes);
        let short_of_inodes =
            fs.f_files > 0 && free_inodes < self.reserve.inodes.saturating_add(inodes);
        if short_of_bytes || short_of_inodes {
            return Err(self.stop(QuotaExceeded::DiskReserve {
                path: path.into(),
                free_bytes,
                free_inodes,
                reserve_bytes: self.reserve.bytes,
                reserve_inodes: self.reserve.inodes,
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cm_assignment::MemoryPayload;

    fn dir() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open_ambient_dir(t.path(), cap_std::ambient_authority()).unwrap();
        (t, d)
    }

    #[test]
    fn budgets_are_what_the_batch_declares_plus_the_allowance() {
        let batch: Vec<StreamedCommand> = vec![
            Command::MakeDir { path: "a/b".into(), mode: 0o755 },
            Command::WriteFile {
                path: "a/b/c".into(),
                mode: 0o644,
                mtime: 0,
                payload: MemoryPayload::boxed([7; 3000]),
                hash: [0; 32],
            },
            Command::Symlink { path: "l".into(), target: "a".into() },
            Command::Remove { path: "x".into(), recursive: true },
        ];
        assert_eq!(Declared::of(&batch), Declared { bytes: 3000, files: 4 });
        let limits = Limits { extra_write_mib: 0, extra_files: 1, ..Limits::default() };
        let mut q = Quotas::new(limits, DiskReserve { bytes: 0, inodes: 0 });
        q.start_call(Declared::of(&batch));
        let (_t, tree) = dir();
        q.write(&tree, "a/b/c", 3000).unwrap();
        assert_eq!(
            q.write(&tree, "a/b/c", 1).unwrap_err().0,
            QuotaExceeded::WriteBytes { limit: 3000 }
        );
        for _ in 0..5 {
            q.create(&tree, "f").unwrap();
        }
        assert!(matches!(q.create(&tree, "f"), Err(QuotaTrap(QuotaExceeded::FilesCreated { .. }))));
        assert!(q.breach.is_some());
        // The next call starts afresh.
        q.start_call(Declared::default());
        assert!(q.breach.is_none());
        q.create(&tree, "f").unwrap();
    }

    #[test]
    fn logs_past_the_quota_are_dropped_and_summed_up_once() {
        let limits = Limits { log_lines: 2, log_kib: 1, ..Limits::default() };
        let mut q = Quotas::new(limits, DiskReserve::default());
        assert!(q.log(10) && q.log(10));
        assert!(!q.log(10) && !q.log(20));
        let summary = q.take_dropped_summary().unwrap();
        assert!(summary.contains("dropped 2 records (30 bytes)"), "{summary}");
        assert_eq!(q.take_dropped_summary(), None);
        q.start_call(Declared::default());
        assert!(q.log(1000));
        assert!(!q.log(100), "1 KiB of bytes per call");
    }

    #[test]
    fn a_reserve_larger_than_the_free_space_refuses_writes_and_creates() {
        let (_t, tree) = dir();
        let mut q = Quotas::new(Limits::default(), DiskReserve { bytes: u64::MAX / 2, inodes: 0 });
        assert!(matches!(
            q.create(&tree, "new"),
            Err(QuotaTrap(QuotaExceeded::DiskReserve { .. }))
        ));
        q.start_call(Declared { bytes: 4 << 20, files: 0 });
        q.write(&tree, "new", 1000).unwrap(); // under the check interval: not looked at yet
        assert!(matches!(
            q.write(&tree, "new", 2 << 20),
            Err(QuotaTrap(QuotaExceeded::DiskReserve { .. }))
        ));
    }

    #[test]
    fn open_files_are_counted_across_opens_and_closes() {
        let limits = Limits { open_files: 2, ..Limits::default() };
        let mut q = Quotas::new(limits, DiskReserve::default());
        q.open_file().unwrap();
        q.open_file().unwrap();
        assert!(q.open_file().is_err());
        q.close_file();
        q.open_file().unwrap();
    }
}
