//! Building a release from an assignment: hard-link clone of live, commands streamed to the
//! interpreter in batches, every written file checked against the assignment, then the
//! release synced and given its final name.

use std::fs;
use std::io;
use std::path::Path;

use cm_assignment::policy::SpecialBits;
use cm_assignment::reference::verify_base;
use cm_assignment::{AssignmentReader, Command, PayloadReader, StreamedCommand};

use crate::beneath::Tree;
use crate::verify::{self, Policy};
use crate::{ApplyReport, Interpreter, InterpreterError, Site, SiteError, built, clone, layout};

/// Why building a release failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyCause {
    #[error("built against release {base}, but live is {}", live.map_or("none".to_string(), |l| l.to_string()))]
    WrongBase { base: u64, live: Option<u64> },
    #[error("command {index} ({name} {path}): {why}")]
    Command { index: u64, name: &'static str, path: String, why: String },
    #[error("interpreter failed on the batch of commands {first}..={last}: {source}")]
    Interpreter { first: u64, last: u64, source: InterpreterError },
    #[error("reading the assignment: {0}")]
    Read(#[from] cm_assignment::ReadError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(
        "the assignment does not describe the resulting tree (no tree manifest): the release cannot be verified"
    )]
    NoTree,
    #[error("the built release differs from the tree the assignment describes: {path}: {why}")]
    TreeDiffers { path: String, why: String },
    #[error(
        "not enough space for the release: it needs {bytes} bytes and {inodes} inodes, the filesystem has {free_bytes} bytes and {free_inodes} inodes free"
    )]
    NoSpace { bytes: u64, inodes: u64, free_bytes: u64, free_inodes: u64 },
}

fn io_cause(what: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyCause {
    let what = what.into();
    move |source| ApplyCause::Io { what, source }
}

pub(crate) fn build_release(
    site: &Site,
    reader: &AssignmentReader,
    interp: &mut dyn Interpreter,
) -> Result<ApplyReport, SiteError> {
    let h = reader.header().clone();
    let root = site.root();
    let mut report = ApplyReport {
        kind: h.kind,
        serial: h.serial,
        commands: h.command_count,
        linked: 0,
        bytes_written: 0,
        now_live: None,
        already_applied: false,
        modes_stripped: 0,
    };
    let fail = |cause| SiteError::Apply {
        file: reader.path().to_path_buf(),
        kind: h.kind,
        serial: h.serial,
        cause,
    };
    let io_fail = |what: &str| {
        let what = what.to_string();
        move |e| fail(ApplyCause::Io { what, source: e })
    };
    let id = built::identity(reader).map_err(io_fail("reading the assignment's trailer"))?;
    if site.release_path(h.serial).is_dir() {
        // Serials name releases: the same assignment again is a no-op, another one is refused.
        return match built::built_by(root, h.serial).map_err(io_fail("reading built/"))? {
            Some(by) if by != id => Err(SiteError::SerialReused {
                file: reader.path().to_path_buf(),
                kind: h.kind,
                serial: h.serial,
                built_by: by,
                this: id,
            }),
            _ => {
                report.already_applied = true;
                Ok(report)
            }
        };
    }
    // A hot release live now stands for its base (`hot.rs`).
    let live = crate::hot::committed_live(root)
        .map_err(|e| fail(ApplyCause::Io { what: "reading `current`".into(), source: e }))?;
    if h.base_serial != 0 && live != Some(h.base_serial) {
        return Err(fail(ApplyCause::WrongBase { base: h.base_serial, live }));
    }
    let staging = layout::building_dir(root, h.serial);
    let built = (|| -> Result<(), ApplyCause> {
        layout::discard(root, &staging).map_err(io_cause("removing an old partial release"))?;
        match live {
            Some(l) if !h.kind.builds_from_empty() => {
                report.linked = clone::hard_link_tree(&site.release_path(l), &staging)
                    .map_err(io_cause(format!("linking release {l} into the new release")))?;
            }
            _ => fs::create_dir(&staging).map_err(io_cause("creating the new release"))?,
        }
        let tree = Tree::open(&staging).map_err(io_cause("opening the new release"))?;
        check_space(reader, &tree)?;
        let special = site.config.special_bits;
        report.bytes_written =
            Streamer::new(reader, &staging, &tree, interp, site.config.batch_commands, special)
                .run()?;
        let policy = Policy { special_bits: special, owner: site.owner() };
        let checked = verify::check_tree(&tree, reader, &policy)?;
        report.modes_stripped = checked.modes_stripped;
        if checked.modes_stripped > 0 {
            tracing::warn!(
                serial = h.serial,
                count = checked.modes_stripped,
                "setuid, setgid or sticky bits stripped from the release (site policy)"
            );
        }
        layout::sync_filesystem(&staging).map_err(io_cause("syncing the new release"))?;
        built::record(root, h.serial, &id).map_err(io_cause("recording what built the release"))?;
        fs::rename(&staging, site.release_path(h.serial))
            .map_err(io_cause("naming the new release"))?;
        layout::sync_dir(&root.join(layout::RELEASES)).map_err(io_cause("syncing releases/"))?;
        Ok(())
    })();
    if let Err(cause) = built {
        if let Err(e) = layout::discard(root, &staging) {
            tracing::error!(path = %staging.display(), error = %e, "could not remove the partial release; the next open will");
        }
        if let Err(e) = interp.rollback(h.serial) {
            tracing::warn!(serial = h.serial, error = %e, "interpreter rollback hook failed after an aborted apply");
        }
        return Err(fail(cause));
    }
    Ok(report)
}

/// Streams commands to the interpreter in batches and checks the results.
struct Streamer<'a> {
    reader: &'a AssignmentReader,
    staging: &'a Path,
    /// The release being built, reached by descriptor for the host's own reads.
    tree: &'a Tree,
    special: SpecialBits,
    interp: &'a mut dyn Interpreter,
    max: usize,
    batch: Vec<StreamedCommand>,
    /// The assignment's commands of the pending batch (with their hashes) and their indexes.
    pending: Vec<(u64, Command)>,
    /// Paths the pending batch changes (not counting make-dir).
    touched: Vec<String>,
    payloads: usize,
    written: u64,
}

/// Most payload streams open at once (each zstd decoder holds its window).
const MAX_PAYLOADS: usize = 16;

/// `a` and `b` are the same path or one contains the other.
fn overlaps(a: &str, b: &str) -> bool {
    let nested =
        |x: &str, y: &str| x.len() > y.len() && x.starts_with(y) && x.as_bytes()[y.len()] == b'/';
    a == b || nested(a, b) || nested(b, a)
}

fn paths_of(cmd: &Command) -> Vec<&str> {
    match cmd {
        Command::MakeDir { .. } => vec![],
        Command::ApplyDelta { path, base, .. } => vec![path, base],
        Command::Rename { from, to } => vec![from, to],
        other => vec![other.path()],
    }
}

impl<'a> Streamer<'a> {
    fn new(
        reader: &'a AssignmentReader,
        staging: &'a Path,
        tree: &'a Tree,
        interp: &'a mut dyn Interpreter,
        max: usize,
        special: SpecialBits,
    ) -> Self {
        Streamer {
            reader,
            staging,
            tree,
            special,
            interp,
            max: max.max(1),
            batch: Vec::new(),
            pending: Vec::new(),
            touched: Vec::new(),
            payloads: 0,
            written: 0,
        }
    }

    fn run(mut self) -> Result<u64, ApplyCause> {
        for item in self.reader.commands() {
            let (index, mut cmd) = item?;
            police_mode(&mut cmd, self.special).map_err(|why| ApplyCause::Command {
                index,
                name: cmd.name(),
                path: cmd.path().to_owned(),
                why,
            })?;
            // A command that touches what the pending batch changes waits for it: the base of a
            // delta is checked before the command goes out, written files after the batch.
            if paths_of(&cmd).iter().any(|p| self.touched.iter().any(|t| overlaps(p, t))) {
                self.flush()?;
            }
            if let Command::ApplyDelta { base, base_len, base_hash, .. } = &cmd {
                let why = |e: String| ApplyCause::Command {
                    index,
                    name: "apply-delta",
                    path: cmd.path().to_owned(),
                    why: e,
                };
                // Opened beneath the release, through no symlink: a base is a file of the tree.
                let f = self.tree.open_file(base).map_err(|e| why(format!("base file: {e}")))?;
                verify_base(f, *base_len, base_hash).map_err(|e| why(e.to_string()))?;
            }
            self.touched.extend(paths_of(&cmd).into_iter().map(str::to_owned));
            let out = self.convert(&cmd)?;
            if cmd.payload().is_some() {
                self.payloads += 1;
            }
            self.batch.push(out);
            self.pending.push((index, cmd));
            if self.batch.len() >= self.max || self.payloads >= MAX_PAYLOADS {
                self.flush()?;
            }
        }
        self.flush()?;
        Ok(self.written)
    }

    /// The command as the interpreter gets it: its payload opened as a stream.
    fn convert(&self, cmd: &Command) -> Result<StreamedCommand, ApplyCause> {
        cmd.clone().try_map_payload(|p| -> Result<Box<dyn PayloadReader>, ApplyCause> {
            Ok(Box::new(self.reader.payload(&p)?))
        })
    }

    fn flush(&mut self) -> Result<(), ApplyCause> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let pending = std::mem::take(&mut self.pending);
        self.touched.clear();
        self.payloads = 0;
        let (first, last) = (pending[0].0, pending[pending.len() - 1].0);
        let reports = self
            .interp
            .apply(self.staging, batch)
            .map_err(|source| ApplyCause::Interpreter { first, last, source })?;
        if reports.len() != pending.len() {
            return Err(ApplyCause::Interpreter {
                first,
                last,
                source: InterpreterError::BadReports {
                    expected: pending.len(),
                    got: reports.len(),
                },
            });
        }
        for (report, (index, cmd)) in reports.iter().zip(&pending) {
            let fail = |why: String| ApplyCause::Command {
                index: *index,
                name: cmd.name(),
                path: cmd.path().to_owned(),
                why,
            };
            if report.index as usize >= pending.len() {
                return Err(fail(format!(
                    "interpreter reported on command {} of a batch of {}",
                    report.index,
                    pending.len()
                )));
            }
            if let Err(msg) = &report.outcome {
                return Err(fail(format!("interpreter: {msg}")));
            }
        }
        for (index, cmd) in &pending {
            self.check_result(*index, cmd)?;
        }
        Ok(())
    }

    /// The host does not trust the interpreter: a written file must have the assignment's
    /// length, BLAKE3 and mode.
    fn check_result(&mut self, index: u64, cmd: &Command) -> Result<(), ApplyCause> {
        let (path, mode, len, hash) = match cmd {
            Command::WriteFile { path, mode, payload, hash, .. } => {
                (path, *mode, payload.len, hash)
            }
            Command::ApplyDelta { path, mode, len, hash, .. } => (path, *mode, *len, hash),
            _ => return Ok(()),
        };
        let fail =
            |why: String| ApplyCause::Command { index, name: cmd.name(), path: path.clone(), why };
        let f = self
            .tree
            .open_file(path)
            .map_err(|e| fail(format!("written file cannot be opened: {e}")))?;
        let m = f.metadata().map_err(|e| fail(format!("written file: {e}")))?;
        if m.len() != len {
            return Err(fail(format!(
                "written file is {} bytes, the assignment says {len}",
                m.len()
            )));
        }
        let has = std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777;
        if has != mode {
            return Err(fail(format!(
                "written file has mode {has:o}, the assignment says {mode:o}"
            )));
        }
        let mut h = blake3::Hasher::new();
        h.update_reader(&f).map_err(|e| fail(format!("reading the written file: {e}")))?;
        if h.finalize() != blake3::Hash::from_bytes(*hash) {
            return Err(fail("written file's BLAKE3 differs from the assignment".into()));
        }
        self.written += len;
        Ok(())
    }
}

/// Applies the site's policy for setuid, setgid and sticky bits to a command's mode: cleared
/// (the interpreter is handed the cleared mode and the result is checked against it) or refused.
fn police_mode(cmd: &mut Command, policy: SpecialBits) -> Result<(), String> {
    let mode = match cmd {
        Command::MakeDir { mode, .. }
        | Command::WriteFile { mode, .. }
        | Command::ApplyDelta { mode, .. }
        | Command::SetMode { mode, .. } => mode,
        _ => return Ok(()),
    };
    let (m, _) = policy
        .apply(*mode)
        .ok_or_else(|| format!("mode {mode:o}: setuid, setgid and sticky bits are refused"))?;
    *mode = m;
    Ok(())
}

/// Refuses up front a run the filesystem cannot hold: the bytes every write-file and
/// apply-delta declares (the reader holds each payload and delta to its declared length) and
/// an inode per created entry, against what `statvfs` says is free. A compression or delta
/// bomb is thus refused before a byte of it is written.
fn check_space(reader: &AssignmentReader, tree: &Tree) -> Result<(), ApplyCause> {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    for item in reader.commands() {
        let (_, cmd) = item?;
        match &cmd {
            Command::WriteFile { payload, .. } => bytes = bytes.saturating_add(payload.len),
            Command::ApplyDelta { len, .. } => bytes = bytes.saturating_add(*len),
            _ => {}
        }
        if !matches!(cmd, Command::Remove { .. } | Command::Rename { .. }) {
            inodes += 1;
        }
    }
    let (free_bytes, free_inodes) =
        tree.free_space().map_err(io_cause("reading the filesystem's free space"))?;
    if bytes > free_bytes || free_inodes.is_some_and(|free| inodes > free) {
        let free_inodes = free_inodes.unwrap_or(u64::MAX);
        return Err(ApplyCause::NoSpace { bytes, inodes, free_bytes, free_inodes });
    }
    Ok(())
}
