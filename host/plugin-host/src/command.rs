//! The interpreter's command set as the host sees it: the Rust face of the WIT
//! `content-interpreter` types, shared with `cm-site` (which builds these from assignments).
//!
//! Paths are relative, '/'-separated and resolved inside one site's staging tree by the host's
//! `staging` interface; nothing here is trusted to be well-formed.

use std::fmt;
use std::io::{self, Read};

/// The bytes of one command's data, streamed to the plugin in chunks (never copied into the
/// guest in one piece). `cm-site` implements it straight over an assignment's data part,
/// decompressing on the fly.
pub trait PayloadReader: Read + Send {
    /// Total number of bytes the reader yields from its start.
    fn size(&self) -> u64;
}

/// A payload held in memory (tests, small generated files).
#[derive(Debug, Clone)]
pub struct MemoryPayload {
    bytes: io::Cursor<Vec<u8>>,
}

impl MemoryPayload {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self { bytes: io::Cursor::new(bytes.into()) }
    }

    /// Boxed, ready to go into a [`Command`].
    pub fn boxed(bytes: impl Into<Vec<u8>>) -> Box<dyn PayloadReader> {
        Box::new(Self::new(bytes))
    }
}

impl Read for MemoryPayload {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.bytes.read(buf)
    }
}

impl PayloadReader for MemoryPayload {
    fn size(&self) -> u64 {
        self.bytes.get_ref().len() as u64
    }
}

/// One instruction of a delta, applied in order to build the new file: the assignment
/// format's own type (an apply-delta record's ops go to the interpreter unchanged).
pub use cm_assignment::DeltaOp;

/// One assignment command primitive (the WIT `command` variant).
pub enum Command {
    /// Create a directory (and missing parents) with permission bits `mode`.
    MakeDir { path: String, mode: u32 },
    /// Create or replace the file `path` with `data` (always a fresh inode).
    WriteFile { path: String, mode: u32, mtime: i64, data: Box<dyn PayloadReader> },
    /// Build a new `path` from the staging file `base` and `data` following `ops`.
    ApplyDelta {
        path: String,
        base: String,
        mode: u32,
        mtime: i64,
        ops: Vec<DeltaOp>,
        data: Box<dyn PayloadReader>,
    },
    /// Remove a file, symlink or (with `recursive`, non-empty) directory.
    Remove { path: String, recursive: bool },
    /// Rename `from` to `to`.
    Rename { from: String, to: String },
    /// Create a symlink at `path` pointing to `target` (must resolve inside the site).
    Symlink { path: String, target: String },
    /// Set the permission bits of `path`.
    SetMode { path: String, mode: u32 },
}

impl Command {
    /// The command's kind, as in the WIT (`make-dir`, `write-file`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Command::MakeDir { .. } => "make-dir",
            Command::WriteFile { .. } => "write-file",
            Command::ApplyDelta { .. } => "apply-delta",
            Command::Remove { .. } => "remove",
            Command::Rename { .. } => "rename",
            Command::Symlink { .. } => "symlink",
            Command::SetMode { .. } => "set-mode",
        }
    }

    /// The path the command changes (for `rename`, its destination).
    pub fn path(&self) -> &str {
        match self {
            Command::MakeDir { path, .. }
            | Command::WriteFile { path, .. }
            | Command::ApplyDelta { path, .. }
            | Command::Remove { path, .. }
            | Command::Symlink { path, .. }
            | Command::SetMode { path, .. } => path,
            Command::Rename { to, .. } => to,
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::MakeDir { path, mode } => write!(f, "make-dir {path} {mode:o}"),
            Command::WriteFile { path, mode, mtime, data } => {
                write!(f, "write-file {path} {mode:o} mtime={mtime} ({} bytes)", data.size())
            }
            Command::ApplyDelta { path, base, mode, mtime, ops, data } => write!(
                f,
                "apply-delta {path} base={base} {mode:o} mtime={mtime} ({} ops, {} bytes)",
                ops.len(),
                data.size()
            ),
            Command::Remove { path, recursive } => write!(f, "remove {path} recursive={recursive}"),
            Command::Rename { from, to } => write!(f, "rename {from} -> {to}"),
            Command::Symlink { path, target } => write!(f, "symlink {path} -> {target}"),
            Command::SetMode { path, mode } => write!(f, "set-mode {path} {mode:o}"),
        }
    }
}

/// The outcome of one command of a batch, as the plugin reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReport {
    /// Index of the command in its batch.
    pub index: u32,
    /// `Err` holds the plugin's message naming the path and the cause.
    pub outcome: Result<(), String>,
}
