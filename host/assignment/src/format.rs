//! The byte layout of an assignment (see `docs/assignment-format.md`): the fixed header, the
//! command records of the body, and the validation rules every decoder applies.
//!
//! Everything here works on byte slices through `cm_wire`; streaming (files of up to several
//! GiB) is the business of [`crate::write`] and [`crate::read`], which move whole records in and
//! out of these functions one at a time.

use cm_wire::{DecodeError, EncodeError, Reader, Writer};

/// First eight bytes of every assignment.
pub const MAGIC: [u8; 8] = *b"CMASSIGN";
/// The format version this code writes and the only one it reads (2: the header names its site).
pub const VERSION: u16 = 2;
/// Longest site name in the header, in bytes: the one name rule's bound
/// ([`crate::names::MAX_NAME`]).
pub const MAX_SITE: usize = crate::names::MAX_NAME;
/// Size of the header's site field: a length byte, then the name, zero-padded to [`MAX_SITE`].
/// Fixed, so the header stays fixed-size and every offset after it is known before it is read.
pub const SITE_FIELD: usize = 1 + MAX_SITE;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 8 + 2 + 1 + 1 + 8 * 7 + 32 + SITE_FIELD;
/// Size of the trailer (BLAKE3 of header and body, keyed when sealed).
pub const TRAILER_LEN: usize = 32;
/// Longest path or symlink target, in bytes: what one system call takes relative to a
/// directory (`PATH_MAX` counts the NUL), so every path the format allows can be opened from
/// the release's root descriptor. The one definition of path limits, used at build and apply.
pub const MAX_PATH: usize = 4095;
/// Longest path component, in bytes (`NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Longest command record. Bounds the memory a decoder spends on one command; the writer
/// falls back to a whole-file write when a delta would need a longer record.
pub const MAX_RECORD: usize = 1 << 20;
/// Unix permission bits a mode may carry (no file-type bits).
pub const MODE_MASK: u32 = 0o7777;

/// What an assignment asks a server to do. Each type's meaning on a server is in the docs of
/// its variant and in `docs/assignment-format.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AssignmentType {
    /// Changes against the live release (`base_serial`): build release `serial` = live + changes.
    Publish = 1,
    /// The whole site for a server that has none: build release `serial` from empty.
    Replicate = 2,
    /// Bring a server that drifted back to the shadow copy: like publish, built from live.
    Synchronize = 3,
    /// A checkpoint's full content: build release `serial` from empty.
    Restore = 4,
    /// Remove content: like publish, carrying only remove commands.
    Remove = 5,
    /// Header only: switch live back to the release committed before the current one.
    Rollback = 6,
    /// Header only: switch live to the kept release `target_serial`.
    Switch = 7,
    /// Header only: switch live to the prepared release `target_serial`.
    Commit = 8,
    /// Flash content for a few servers: built like publish and switched live at once.
    HotContent = 9,
    /// Header only: remove the site's content from the server — every release, the live link
    /// and the history — keeping only the record of the newest serial applied (replays).
    RemoveSite = 10,
    /// A plugin for the servers' plugin store, not content: exactly two write-file commands,
    /// `component.wasm` and `manifest.toml` ([`crate::plugin_run`]); builds no release. The
    /// header's site is one the servers serve (the run reaches them like any of its runs).
    Plugin = 11,
}

impl AssignmentType {
    pub const ALL: [AssignmentType; 11] = [
        Self::Publish,
        Self::Replicate,
        Self::Synchronize,
        Self::Restore,
        Self::Remove,
        Self::Rollback,
        Self::Switch,
        Self::Commit,
        Self::HotContent,
        Self::RemoveSite,
        Self::Plugin,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Replicate => "replicate",
            Self::Synchronize => "synchronize",
            Self::Restore => "restore",
            Self::Remove => "remove",
            Self::Rollback => "rollback",
            Self::Switch => "switch",
            Self::Commit => "commit",
            Self::HotContent => "hot-content",
            Self::RemoveSite => "remove-site",
            Self::Plugin => "plugin",
        }
    }

    /// True for the types that carry no body and only move `current` between releases (or,
    /// remove-site, take it and every release away).
    pub fn is_switch_only(self) -> bool {
        matches!(self, Self::Rollback | Self::Switch | Self::Commit | Self::RemoveSite)
    }

    /// True when the new release starts empty instead of from live.
    pub fn builds_from_empty(self) -> bool {
        matches!(self, Self::Replicate | Self::Restore)
    }
}

impl std::fmt::Display for AssignmentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Header flag bits.
pub mod flags {
    /// At least one payload is zstd-compressed.
    pub const COMPRESSED: u8 = 1;
    /// The data part is encrypted (ChaCha20-Poly1305 per 64 KiB chunk, see [`crate::cipher`]);
    /// payload offsets stay in plaintext coordinates.
    pub const ENCRYPTED: u8 = 2;
    /// The trailer is a keyed BLAKE3 under the cluster's assignment key (see [`crate::SealKey`]).
    pub const SEALED: u8 = 4;
    /// A signature block (key id ‖ Ed25519 signature of the trailer, see [`crate::sign`])
    /// follows the trailer.
    pub const SIGNED: u8 = 8;
    /// The body ends with the manifest of the whole resulting tree ([`TreeEntry`] records).
    ///
    /// [`TreeEntry`]: super::TreeEntry
    pub const TREE: u8 = 16;
    pub const KNOWN: u8 = COMPRESSED | ENCRYPTED | SEALED | SIGNED | TREE;
}

/// The fixed-size header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: AssignmentType,
    pub flags: u8,
    /// Unique, increasing number of this assignment; a release built from it is `releases/<serial>`.
    pub serial: u64,
    /// The manager's job this assignment belongs to (0 when built by hand).
    pub job_id: u64,
    /// The release the changes were computed against (0: no requirement).
    pub base_serial: u64,
    /// For switch and commit: the release to make live (0 for the others).
    pub target_serial: u64,
    pub command_count: u64,
    pub body_len: u64,
    pub data_len: u64,
    /// BLAKE3 of the data part.
    pub data_hash: [u8; 32],
    /// The hosted site the assignment is for ([`crate::names::check_name`]): a server serving
    /// several sites applies it to this one's root, and refuses it when it serves no such site.
    /// Covered by the trailer, so by the manager's signature: no relay can move a run from one
    /// site to another.
    pub site: String,
}

impl Header {
    /// Bytes of the signature block after the trailer: 72 when `SIGNED`, else 0.
    pub fn signature_len(&self) -> u64 {
        if self.flags & flags::SIGNED != 0 { crate::sign::SIGNATURE_BLOCK_LEN as u64 } else { 0 }
    }

    /// Where the data part starts: header, body, trailer and signature block before it.
    pub fn data_start(&self) -> Option<u64> {
        (HEADER_LEN as u64)
            .checked_add(self.body_len)?
            .checked_add(TRAILER_LEN as u64 + self.signature_len())
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut w = Writer::with_capacity(HEADER_LEN);
        w.bytes(&MAGIC).u16(VERSION).u8(self.kind as u8).u8(self.flags);
        w.u64(self.serial).u64(self.job_id).u64(self.base_serial).u64(self.target_serial);
        w.u64(self.command_count).u64(self.body_len).u64(self.data_len).bytes(&self.data_hash);
        // The writers check the name first (`write::check_site`); a longer one cannot be
        // encoded and is cut, which the decoder then refuses.
        let site = &self.site.as_bytes()[..self.site.len().min(MAX_SITE)];
        w.u8(site.len() as u8).bytes(site).bytes(&[0u8; MAX_SITE][site.len()..]);
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(w.as_slice());
        out
    }

    /// Decodes a header. A wrong version is reported separately, so an operator sees
    /// "version 2, this build reads 1" rather than "malformed".
    pub fn decode(buf: &[u8]) -> Result<Header, HeaderError> {
        let mut r = Reader::new(buf);
        if r.array::<8>()? != MAGIC {
            return Err(HeaderError::NotAnAssignment);
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(HeaderError::Version { found: version });
        }
        let kind = AssignmentType::from_u8(r.u8()?)
            .ok_or(DecodeError::malformed("unknown assignment type"))?;
        let flags = r.u8()?;
        if flags & !flags::KNOWN != 0 {
            return Err(DecodeError::malformed("unknown header flag").into());
        }
        let h = Header {
            kind,
            flags,
            serial: r.u64()?,
            job_id: r.u64()?,
            base_serial: r.u64()?,
            target_serial: r.u64()?,
            command_count: r.u64()?,
            body_len: r.u64()?,
            data_len: r.u64()?,
            data_hash: r.array()?,
            site: decode_site(r.array::<SITE_FIELD>()?)?,
        };
        if kind.is_switch_only() && (h.body_len != 0 || h.data_len != 0) {
            return Err(DecodeError::malformed("switch-only assignment with a body").into());
        }
        if h.serial == 0 {
            return Err(DecodeError::malformed("serial 0").into());
        }
        Ok(h)
    }
}

/// The header's site field: length byte, name, zero padding (one encoding per name), and the
/// name rule of [`crate::names`].
fn decode_site(field: [u8; SITE_FIELD]) -> Result<String, DecodeError> {
    let len = usize::from(field[0]);
    let (name, padding) = field[1..].split_at(len);
    if padding.iter().any(|b| *b != 0) {
        return Err(DecodeError::malformed("site field padding is not zero"));
    }
    let name =
        std::str::from_utf8(name).map_err(|_| DecodeError::malformed("site name is not UTF-8"))?;
    crate::names::check_name("site name", name).map_err(|e| DecodeError::malformed(e.why))?;
    Ok(name.to_owned())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not an assignment (bad magic)")]
    NotAnAssignment,
    #[error("format version {found}, this build reads version {VERSION}")]
    Version { found: u16 },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// How a payload is stored in the data part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// Where a command's bytes are in the data part. Payloads are laid out in command order with
/// no gaps, so a reader can also consume the data part as a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Offset from the start of the data part.
    pub offset: u64,
    /// Bytes stored (after compression).
    pub stored_len: u64,
    /// Bytes after decompression.
    pub len: u64,
    pub codec: Codec,
}

/// One piece of a delta: bytes from the base file, or the next bytes of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaOp {
    /// Append `len` bytes of the base file starting at `offset`.
    Copy { offset: u64, len: u64 },
    /// Append the next `len` bytes of the command's payload.
    Insert { len: u64 },
}

impl DeltaOp {
    pub fn len(&self) -> u64 {
        match *self {
            DeltaOp::Copy { len, .. } | DeltaOp::Insert { len } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A command primitive of the body, with its parameters. Paths are relative to the root of
/// the release being built, '/'-separated, and checked by [`check_path`].
///
/// This is the one command vocabulary of the system: the body's records (`P` = [`Payload`],
/// where the bytes are in the data part) and the batches an interpreter is handed (`P` = a
/// [`PayloadReader`](crate::PayloadReader), the bytes themselves, see
/// [`StreamedCommand`](crate::StreamedCommand)) are the same type, converted with
/// [`Command::try_map_payload`]. The lengths and hashes are what the host checks the result
/// against; an interpreter needs only the paths, modes, times, ops and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<P = Payload> {
    MakeDir {
        path: String,
        mode: u32,
    },
    /// Create or replace `path` with the payload's bytes, whose BLAKE3 is `hash`.
    WriteFile {
        path: String,
        mode: u32,
        mtime: i64,
        payload: P,
        hash: [u8; 32],
    },
    /// Replace `path` with `ops` applied to `base` (which must be `base_len` bytes with BLAKE3
    /// `base_hash`); the result is `len` bytes with BLAKE3 `hash`.
    ApplyDelta {
        path: String,
        base: String,
        base_len: u64,
        base_hash: [u8; 32],
        mode: u32,
        mtime: i64,
        ops: Vec<DeltaOp>,
        payload: P,
        len: u64,
        hash: [u8; 32],
    },
    Remove {
        path: String,
        recursive: bool,
    },
    Rename {
        from: String,
        to: String,
    },
    /// `target` is relative to the link's directory and must stay inside the site.
    Symlink {
        path: String,
        target: String,
    },
    SetMode {
        path: String,
        mode: u32,
    },
}

mod tag {
    pub const MAKE_DIR: u8 = 1;
    pub const WRITE_FILE: u8 = 2;
    pub const APPLY_DELTA: u8 = 3;
    pub const REMOVE: u8 = 4;
    pub const RENAME: u8 = 5;
    pub const SYMLINK: u8 = 6;
    pub const SET_MODE: u8 = 7;
    pub const TREE_ENTRY: u8 = 8;
    pub const OP_COPY: u8 = 1;
    pub const OP_INSERT: u8 = 2;
}

impl<P> Command<P> {
    /// The command's kind, as in the WIT and the spec (`make-dir`, `write-file`, ...).
    pub fn name(&self) -> &'static str {
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

    /// The path the command acts on (the destination for a rename).
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

    pub fn payload(&self) -> Option<&P> {
        match self {
            Command::WriteFile { payload, .. } | Command::ApplyDelta { payload, .. } => {
                Some(payload)
            }
            _ => None,
        }
    }

    /// The same command with its payload held another way (e.g. a [`Payload`] location
    /// opened as a reader); `f` is called only for write-file and apply-delta.
    pub fn try_map_payload<Q, E>(self, f: impl FnOnce(P) -> Result<Q, E>) -> Result<Command<Q>, E> {
        Ok(match self {
            Command::MakeDir { path, mode } => Command::MakeDir { path, mode },
            Command::WriteFile { path, mode, mtime, payload, hash } => {
                Command::WriteFile { path, mode, mtime, payload: f(payload)?, hash }
            }
            Command::ApplyDelta {
                path,
                base,
                base_len,
                base_hash,
                mode,
                mtime,
                ops,
                payload,
                len,
                hash,
            } => Command::ApplyDelta {
                path,
                base,
                base_len,
                base_hash,
                mode,
                mtime,
                ops,
                payload: f(payload)?,
                len,
                hash,
            },
            Command::Remove { path, recursive } => Command::Remove { path, recursive },
            Command::Rename { from, to } => Command::Rename { from, to },
            Command::Symlink { path, target } => Command::Symlink { path, target },
            Command::SetMode { path, mode } => Command::SetMode { path, mode },
        })
    }
}

impl Command {
    /// Encodes the record (without its length prefix).
    pub fn encode(&self, w: &mut Writer) -> Result<(), EncodeError> {
        match self {
            Command::MakeDir { path, mode } => {
                w.u8(tag::MAKE_DIR).str16("path", path)?.u32(*mode);
            }
            Command::WriteFile { path, mode, mtime, payload, hash } => {
                w.u8(tag::WRITE_FILE).str16("path", path)?.u32(*mode).u64(*mtime as u64);
                encode_payload(w, payload);
                w.bytes(hash);
            }
            Command::ApplyDelta {
                path,
                base,
                base_len,
                base_hash,
                mode,
                mtime,
                ops,
                payload,
                len,
                hash,
            } => {
                w.u8(tag::APPLY_DELTA).str16("path", path)?.str16("base", base)?;
                w.u64(*base_len).bytes(base_hash).u32(*mode).u64(*mtime as u64);
                let n = u32::try_from(ops.len()).map_err(|_| EncodeError {
                    what: "ops",
                    len: ops.len(),
                    max: u32::MAX as usize,
                })?;
                w.u32(n);
                for op in ops {
                    match *op {
                        DeltaOp::Copy { offset, len } => w.u8(tag::OP_COPY).u64(offset).u64(len),
                        DeltaOp::Insert { len } => w.u8(tag::OP_INSERT).u64(len),
                    };
                }
                encode_payload(w, payload);
                w.u64(*len).bytes(hash);
            }
            Command::Remove { path, recursive } => {
                w.u8(tag::REMOVE).str16("path", path)?.bool(*recursive);
            }
            Command::Rename { from, to } => {
                w.u8(tag::RENAME).str16("from", from)?.str16("to", to)?;
            }
            Command::Symlink { path, target } => {
                w.u8(tag::SYMLINK).str16("path", path)?.str16("target", target)?;
            }
            Command::SetMode { path, mode } => {
                w.u8(tag::SET_MODE).str16("path", path)?.u32(*mode);
            }
        }
        Ok(())
    }

    /// Decodes one whole record and checks every rule that needs no context: paths inside the
    /// site, modes, delta arithmetic. Unknown tags are malformed.
    pub fn decode(record: &[u8]) -> Result<Command, DecodeError> {
        let mut r = Reader::new(record);
        let cmd = match r.u8()? {
            tag::MAKE_DIR => Command::MakeDir { path: path(&mut r)?, mode: mode(&mut r)? },
            tag::WRITE_FILE => {
                let path = path(&mut r)?;
                let mode = mode(&mut r)?;
                let mtime = r.u64()? as i64;
                let payload = decode_payload(&mut r)?;
                Command::WriteFile { path, mode, mtime, payload, hash: r.array()? }
            }
            tag::APPLY_DELTA => {
                let path = path(&mut r)?;
                let base = path_named(&mut r)?;
                let base_len = r.u64()?;
                let base_hash = r.array()?;
                let mode = mode(&mut r)?;
                let mtime = r.u64()? as i64;
                let n = r.u32()?;
                // Each op is at least 9 bytes: refuse a count the record cannot hold before
                // allocating anything for it.
                if u64::from(n) * 9 > r.remaining() as u64 {
                    return Err(DecodeError::malformed("delta op count exceeds record"));
                }
                let mut ops = Vec::with_capacity(n as usize);
                let (mut inserted, mut total) = (0u64, 0u64);
                for _ in 0..n {
                    let op = match r.u8()? {
                        tag::OP_COPY => {
                            let (offset, len) = (r.u64()?, r.u64()?);
                            let end = offset
                                .checked_add(len)
                                .ok_or(DecodeError::malformed("copy range overflows"))?;
                            if end > base_len {
                                return Err(DecodeError::malformed(
                                    "copy range beyond base length",
                                ));
                            }
                            DeltaOp::Copy { offset, len }
                        }
                        tag::OP_INSERT => {
                            let len = r.u64()?;
                            inserted = inserted
                                .checked_add(len)
                                .ok_or(DecodeError::malformed("insert length overflows"))?;
                            DeltaOp::Insert { len }
                        }
                        _ => return Err(DecodeError::malformed("unknown delta op")),
                    };
                    total = total
                        .checked_add(op.len())
                        .ok_or(DecodeError::malformed("delta length overflows"))?;
                    ops.push(op);
                }
                let payload = decode_payload(&mut r)?;
                let len = r.u64()?;
                if payload.len != inserted {
                    return Err(DecodeError::malformed("delta inserts differ from payload length"));
                }
                if total != len {
                    return Err(DecodeError::malformed("delta ops differ from result length"));
                }
                Command::ApplyDelta {
                    path,
                    base,
                    base_len,
                    base_hash,
                    mode,
                    mtime,
                    ops,
                    payload,
                    len,
                    hash: r.array()?,
                }
            }
            tag::REMOVE => Command::Remove { path: path(&mut r)?, recursive: r.bool()? },
            tag::RENAME => Command::Rename { from: path(&mut r)?, to: path_named(&mut r)? },
            tag::SYMLINK => {
                let path = path(&mut r)?;
                let target = r.str16(MAX_PATH)?.to_owned();
                check_symlink_target(&path, &target).map_err(DecodeError::malformed)?;
                Command::Symlink { path, target }
            }
            tag::SET_MODE => Command::SetMode { path: path(&mut r)?, mode: mode(&mut r)? },
            _ => return Err(DecodeError::malformed("unknown command")),
        };
        r.finish()?;
        Ok(cmd)
    }
}

/// One entry of the manifest of the whole resulting tree (`flags::TREE`): what the release must
/// hold at `path` once every command ran. The host checks the built release against these
/// records (every path, kind, mode, length, hash and symlink target, nothing more); they are
/// never handed to an interpreter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub path: String,
    pub kind: TreeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeKind {
    Dir { mode: u32 },
    File { mode: u32, len: u64, hash: [u8; 32] },
    Symlink { target: String },
}

impl TreeEntry {
    pub fn encode(&self, w: &mut Writer) -> Result<(), EncodeError> {
        w.u8(tag::TREE_ENTRY).str16("path", &self.path)?;
        match &self.kind {
            TreeKind::Dir { mode } => {
                w.u8(0).u32(*mode);
            }
            TreeKind::File { mode, len, hash } => {
                w.u8(1).u32(*mode).u64(*len).bytes(hash);
            }
            TreeKind::Symlink { target } => {
                w.u8(2).str16("target", target)?;
            }
        }
        Ok(())
    }

    pub fn decode(record: &[u8]) -> Result<TreeEntry, DecodeError> {
        let mut r = Reader::new(record);
        if r.u8()? != tag::TREE_ENTRY {
            return Err(DecodeError::malformed("not a tree entry"));
        }
        let path = path(&mut r)?;
        let kind = match r.u8()? {
            0 => TreeKind::Dir { mode: mode(&mut r)? },
            1 => TreeKind::File { mode: mode(&mut r)?, len: r.u64()?, hash: r.array()? },
            2 => {
                let target = r.str16(MAX_PATH)?.to_owned();
                check_symlink_target(&path, &target).map_err(DecodeError::malformed)?;
                TreeKind::Symlink { target }
            }
            _ => return Err(DecodeError::malformed("unknown tree entry kind")),
        };
        r.finish()?;
        Ok(TreeEntry { path, kind })
    }
}

/// A body record: a command, or (after the last command) an entry of the tree manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Command(Command),
    Tree(TreeEntry),
}

impl Record {
    pub fn decode(record: &[u8]) -> Result<Record, DecodeError> {
        match record.first() {
            Some(&tag::TREE_ENTRY) => TreeEntry::decode(record).map(Record::Tree),
            _ => Command::decode(record).map(Record::Command),
        }
    }
}

/// The order of the tree manifest (and of the manager's walk): paths compared component by
/// component, bytewise, so a directory comes right before its content.
pub fn tree_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

fn encode_payload(w: &mut Writer, p: &Payload) {
    w.u64(p.offset).u64(p.stored_len).u64(p.len).u8(p.codec as u8);
}

fn decode_payload(r: &mut Reader<'_>) -> Result<Payload, DecodeError> {
    let (offset, stored_len, len) = (r.u64()?, r.u64()?, r.u64()?);
    let codec = match r.u8()? {
        0 => Codec::Raw,
        1 => Codec::Zstd,
        _ => return Err(DecodeError::malformed("unknown payload codec")),
    };
    offset.checked_add(stored_len).ok_or(DecodeError::malformed("payload range overflows"))?;
    if codec == Codec::Raw && stored_len != len {
        return Err(DecodeError::malformed("raw payload with two lengths"));
    }
    Ok(Payload { offset, stored_len, len, codec })
}

fn path(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    path_named(r)
}

fn path_named(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let p = r.str16(MAX_PATH)?;
    check_path(p).map_err(DecodeError::malformed)?;
    Ok(p.to_owned())
}

fn mode(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    let m = r.u32()?;
    if m & !MODE_MASK != 0 {
        return Err(DecodeError::malformed("mode has bits beyond 0o7777"));
    }
    Ok(m)
}

/// A path inside the site: relative, '/'-separated, no empty, `.` or `..` component, no NUL.
pub fn check_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty path");
    }
    if p.len() > MAX_PATH {
        return Err("path too long");
    }
    if p.starts_with('/') {
        return Err("absolute path escapes the site");
    }
    if p.contains('\0') {
        return Err("NUL in path");
    }
    for c in p.split('/') {
        match c {
            "" => return Err("empty path component"),
            "." | ".." => return Err("dot component in path escapes or aliases"),
            c if c.len() > MAX_NAME => return Err("path component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// A symlink at `link` may point to `target` only if, read relative to the link's directory,
/// it never climbs above the site root. Absolute targets are refused.
pub fn check_symlink_target(link: &str, target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("empty symlink target");
    }
    if target.starts_with('/') {
        return Err("absolute symlink target escapes the site");
    }
    if target.contains('\0') {
        return Err("NUL in symlink target");
    }
    // Depth of the link's directory below the root.
    let mut depth = link.split('/').count() as i64 - 1;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err("symlink target escapes the site");
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_escaping_the_site_are_refused() {
        for bad in ["", "/etc/passwd", "a/../../b", "..", "a//b", "./a", "a/.", "a\0b"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "a/b/c.html", "...", "a b/ü"] {
            assert!(check_path(good).is_ok(), "{good:?}");
        }
        assert!(check_symlink_target("a/link", "../b").is_ok());
        assert!(check_symlink_target("link", "../b").is_err());
        assert!(check_symlink_target("a/link", "../../b").is_err());
        assert!(check_symlink_target("a/link", "c/../../b").is_ok());
        assert!(check_symlink_target("a/link", "/etc").is_err());
    }

    #[test]
    fn path_limits_are_what_one_system_call_takes() {
        let name = "n".repeat(MAX_NAME);
        let long = [name.as_str(); 16].join("/");
        assert_eq!(long.len(), 4095);
        assert!(check_path(&long).is_ok());
        assert_eq!(check_path(&format!("{long}x")), Err("path too long"));
        assert_eq!(check_path(&format!("{name}x/a")), Err("path component longer than 255 bytes"));
    }

    #[test]
    fn tree_entries_round_trip_and_sort_directories_before_their_content() {
        for kind in [
            TreeKind::Dir { mode: 0o755 },
            TreeKind::File { mode: 0o644, len: 7, hash: [3; 32] },
            TreeKind::Symlink { target: "../b".into() },
        ] {
            let e = TreeEntry { path: "a/x".into(), kind };
            let mut w = Writer::new();
            e.encode(&mut w).unwrap();
            assert_eq!(Record::decode(w.as_slice()).unwrap(), Record::Tree(e));
        }
        let mut w = Writer::new();
        TreeEntry { path: "x".into(), kind: TreeKind::Symlink { target: "../b".into() } }
            .encode(&mut w)
            .unwrap();
        assert!(Record::decode(w.as_slice()).is_err(), "a manifest link must stay inside too");
        let mut paths = vec!["a.txt", "a/x", "a", "b", "a/x/y"];
        paths.sort_by(|a, b| tree_order(a, b));
        assert_eq!(paths, ["a", "a/x", "a/x/y", "a.txt", "b"]);
    }

    #[test]
    fn header_round_trip_and_version() {
        let h = Header {
            kind: AssignmentType::Publish,
            flags: flags::COMPRESSED,
            serial: 7,
            job_id: 3,
            base_serial: 6,
            target_serial: 0,
            command_count: 2,
            body_len: 40,
            data_len: 100,
            data_hash: [9; 32],
            site: "www".into(),
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
        let mut v1 = b;
        v1[9] = 1;
        assert_eq!(Header::decode(&v1), Err(HeaderError::Version { found: 1 }));
        assert!(Header::decode(&b[..50]).is_err());
    }

    #[test]
    fn the_site_field_is_bounded_padded_and_named_by_the_one_rule() {
        let h = |site: &str| Header {
            kind: AssignmentType::Commit,
            flags: 0,
            serial: 1,
            job_id: 0,
            base_serial: 0,
            target_serial: 0,
            command_count: 0,
            body_len: 0,
            data_len: 0,
            data_hash: [0; 32],
            site: site.into(),
        };
        let longest = "s".repeat(MAX_SITE);
        assert_eq!(Header::decode(&h(&longest).encode()).unwrap().site, longest);
        // Every prefix of a header, the site field's included, is "incomplete", never valid.
        let b = h("shop").encode();
        for cut in 0..HEADER_LEN {
            let e = Header::decode(&b[..cut]).unwrap_err();
            assert!(
                matches!(e, HeaderError::Decode(ref d) if d.is_incomplete())
                    || e == HeaderError::NotAnAssignment,
                "{cut}: {e:?}"
            );
        }
        let site_at = HEADER_LEN - SITE_FIELD;
        let check = |why: &'static str, tamper: &dyn Fn(&mut [u8])| {
            let mut t = b;
            tamper(&mut t[site_at..]);
            assert_eq!(
                Header::decode(&t),
                Err(HeaderError::Decode(DecodeError::malformed(why))),
                "{why}"
            );
        };
        check("site field padding is not zero", &|f| f[SITE_FIELD - 1] = 1);
        check("site field padding is not zero", &|f| f[0] = 3);
        check("must not be empty", &|f| f.fill(0));
        check("must not contain `/` or `\\`", &|f| f[2] = b'/');
        check("must not be `.` or `..`", &|f| {
            f.fill(0);
            f[..3].copy_from_slice(b"\x02..");
        });
        check("site name is not UTF-8", &|f| f[1] = 0xff);
    }
}

#[cfg(test)]
mod round_trip {
    use super::*;
    use proptest::prelude::*;

    fn arb_path() -> impl Strategy<Value = String> {
        proptest::collection::vec("[a-zA-Z0-9._ -]{1,12}", 1..4)
            .prop_map(|v| v.join("/"))
            .prop_filter("no dot components", |p| check_path(p).is_ok())
    }

    fn arb_payload() -> impl Strategy<Value = Payload> {
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(o, l, z)| {
            let (offset, len) = (u64::from(o), u64::from(l));
            if z {
                Payload { offset, stored_len: len / 2, len, codec: Codec::Zstd }
            } else {
                Payload { offset, stored_len: len, len, codec: Codec::Raw }
            }
        })
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let mode = 0u32..=0o7777;
        prop_oneof![
            (arb_path(), mode.clone()).prop_map(|(path, mode)| Command::MakeDir { path, mode }),
            (arb_path(), mode.clone(), any::<i64>(), arb_payload(), any::<[u8; 32]>()).prop_map(
                |(path, mode, mtime, payload, hash)| Command::WriteFile {
                    path,
                    mode,
                    mtime,
                    payload,
                    hash
                }
            ),
            (
                arb_path(),
                arb_path(),
                mode.clone(),
                any::<i64>(),
                proptest::collection::vec((any::<bool>(), 0u64..1000), 0..20),
                any::<[u8; 32]>()
            )
                .prop_map(|(path, base, mode, mtime, raw_ops, hash)| {
                    let mut ops = Vec::new();
                    let (mut inserted, mut total) = (0, 0);
                    for (copy, len) in raw_ops {
                        ops.push(if copy {
                            DeltaOp::Copy { offset: len, len }
                        } else {
                            inserted += len;
                            DeltaOp::Insert { len }
                        });
                        total += len;
                    }
                    let payload = Payload {
                        offset: 5,
                        stored_len: inserted,
                        len: inserted,
                        codec: Codec::Raw,
                    };
                    Command::ApplyDelta {
                        path,
                        base,
                        base_len: 2000,
                        base_hash: hash,
                        mode,
                        mtime,
                        ops,
                        payload,
                        len: total,
                        hash,
                    }
                }),
            (arb_path(), any::<bool>())
                .prop_map(|(path, recursive)| Command::Remove { path, recursive }),
            (arb_path(), arb_path()).prop_map(|(from, to)| Command::Rename { from, to }),
            (arb_path(), "[a-z]{1,8}").prop_map(|(path, target)| Command::Symlink { path, target }),
            (arb_path(), mode).prop_map(|(path, mode)| Command::SetMode { path, mode }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode(cmd in arb_command()) {
            let mut w = Writer::new();
            cmd.encode(&mut w).unwrap();
            let bytes = w.into_vec();
            prop_assert_eq!(Command::decode(&bytes).unwrap(), cmd);
            // Every strict prefix fails to decode (never panics, never succeeds).
            for cut in 0..bytes.len() {
                prop_assert!(Command::decode(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn header_encode_decode(
            kind in 0usize..AssignmentType::ALL.len(),
            flags in 0u8..=flags::KNOWN,
            serial in 1u64..,
            rest in any::<[u64; 6]>(),
            data_hash in any::<[u8; 32]>(),
            site in "[a-zA-Z0-9._-]{1,40}|[a-z]{255}",
        ) {
            prop_assume!(crate::names::check_name("site", &site).is_ok());
            let kind = AssignmentType::ALL[kind];
            let (body_len, data_len) =
                if kind.is_switch_only() { (0, 0) } else { (rest[4], rest[5]) };
            let h = Header {
                kind,
                flags,
                serial,
                job_id: rest[0],
                base_serial: rest[1],
                target_serial: rest[2],
                command_count: rest[3],
                body_len,
                data_len,
                data_hash,
                site,
            };
            prop_assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Command::decode(&bytes);
            let _ = Header::decode(&bytes);
        }
    }

    #[test]
    fn unknown_command_and_escaping_paths_are_decode_errors() {
        assert_eq!(Command::decode(&[99]), Err(DecodeError::malformed("unknown command")));
        let mut w = Writer::new();
        Command::Remove { path: "x".into(), recursive: false }.encode(&mut w).unwrap();
        let mut bytes = w.into_vec();
        bytes[3] = b'/';
        assert!(Command::decode(&bytes).is_err());
        let mut w = Writer::new();
        w.u8(6).str16("p", "a").unwrap().str16("t", "../../etc").unwrap();
        assert_eq!(
            Command::decode(w.as_slice()),
            Err(DecodeError::malformed("symlink target escapes the site"))
        );
    }
}
