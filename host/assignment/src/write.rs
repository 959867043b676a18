//! The streaming assignment writer.
//!
//! Commands go to a body spool and payloads to a data spool (temporary files next to the output),
//! so memory stays bounded whatever the assignment's size. `finish` lays out header, body,
//! trailer and data in the output file and renames it into place, so a reader never sees a
//! half-written assignment under the final name.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cm_wire::{EncodeError, Writer};

use crate::cipher::{self, CipherKey};
use crate::delta;
use crate::format::{
    AssignmentType, Codec, Command, HEADER_LEN, Header, MAX_RECORD, Payload, TRAILER_LEN,
    TreeEntry, check_path, check_symlink_target, flags, tree_order,
};
use crate::policy::CompressionPolicy;
use crate::sign::{ASSIGNMENT_DOMAIN, SIGNATURE_BLOCK_LEN, SigningKey};
use crate::{SealKey, trailer_hasher};

/// The administrative fields of a new assignment's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: AssignmentType,
    pub serial: u64,
    pub job_id: u64,
    pub base_serial: u64,
    pub target_serial: u64,
    /// The hosted site it is for (the one name rule, [`crate::names`]).
    pub site: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("cannot encode command for {path:?}: {source}")]
    Encode { path: String, source: EncodeError },
    #[error("invalid command for {path:?}: {why}")]
    Invalid { path: String, why: &'static str },
    #[error("a {kind} assignment carries no commands")]
    SwitchOnly { kind: AssignmentType },
    #[error(transparent)]
    Site(#[from] crate::names::NameError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> WriteError {
    let what = what.into();
    move |source| WriteError::Io { what, source }
}

/// What [`AssignmentWriter::file_change`] put in the assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// The two files hold the same bytes: nothing was written.
    Identical,
    /// An apply-delta command with this many literal bytes.
    Delta { literal: u64 },
    /// A whole-file write (the delta would not have saved enough).
    Full,
}

/// Counts what passes through to the inner writer.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Builds an assignment file command by command.
pub struct AssignmentWriter {
    out: PathBuf,
    meta: Meta,
    policy: CompressionPolicy,
    seal: Option<SealKey>,
    body: BufWriter<File>,
    body_len: u64,
    count: u64,
    data: BufWriter<File>,
    data_len: u64,
    compressed: bool,
    cipher: Option<CipherKey>,
    signer: Option<SigningKey>,
    record: Writer,
    tree_flag: bool,
    /// The tree manifest's records (appended to the body by `finish`), once one is described.
    tree: Option<TreeSpool>,
}

/// The tree manifest being written: its records, how many, and the last path (for the order).
struct TreeSpool {
    records: BufWriter<File>,
    len: u64,
    count: u64,
    last: Option<String>,
}

impl AssignmentWriter {
    /// Starts an assignment that `finish` will write to `out`.
    pub fn create(
        out: &Path,
        meta: Meta,
        policy: CompressionPolicy,
        seal: Option<SealKey>,
    ) -> Result<Self, WriteError> {
        crate::names::check_name("site name", &meta.site)?;
        let dir = parent_dir(out);
        let spool = || {
            tempfile::tempfile_in(dir)
                .map_err(io_err(format!("creating a spool file in {}", dir.display())))
        };
        Ok(AssignmentWriter {
            out: out.to_path_buf(),
            meta,
            policy,
            seal,
            body: BufWriter::with_capacity(256 << 10, spool()?),
            body_len: 0,
            count: 0,
            data: BufWriter::with_capacity(1 << 20, spool()?),
            data_len: 0,
            compressed: false,
            cipher: None,
            signer: None,
            record: Writer::new(),
            tree_flag: false,
            tree: None,
        })
    }

    /// The assignment will carry the manifest of the whole resulting tree (`flags::TREE`),
    /// even an empty one; entries follow with [`tree_entry`](Self::tree_entry).
    pub fn describe_tree(&mut self) -> Result<(), WriteError> {
        if self.tree.is_none() {
            let dir = parent_dir(&self.out);
            let f = tempfile::tempfile_in(dir)
                .map_err(io_err(format!("creating a spool file in {}", dir.display())))?;
            self.tree = Some(TreeSpool {
                records: BufWriter::with_capacity(256 << 10, f),
                len: 0,
                count: 0,
                last: None,
            });
        }
        Ok(())
    }

    /// Adds an entry to the tree manifest; entries come in [`tree_order`].
    pub fn tree_entry(&mut self, entry: &TreeEntry) -> Result<(), WriteError> {
        Self::checked(&entry.path)?;
        self.describe_tree()?;
        let invalid = |why| WriteError::Invalid { path: entry.path.clone(), why };
        if let crate::format::TreeKind::Symlink { target } = &entry.kind {
            check_symlink_target(&entry.path, target).map_err(invalid)?;
        }
        let spool = self.tree.as_mut().expect("described above");
        if spool.last.as_deref().is_some_and(|l| tree_order(l, &entry.path).is_ge()) {
            return Err(invalid("tree entries out of order"));
        }
        let mut w = Writer::new();
        entry
            .encode(&mut w)
            .map_err(|source| WriteError::Encode { path: entry.path.clone(), source })?;
        let rec = w.as_slice();
        spool
            .records
            .write_all(&(rec.len() as u32).to_be_bytes())
            .and_then(|()| spool.records.write_all(rec))
            .map_err(io_err("writing the tree spool"))?;
        spool.len += 4 + rec.len() as u64;
        spool.count += 1;
        spool.last = Some(entry.path.clone());
        Ok(())
    }

    /// Encrypts the data part under `key` (see [`crate::cipher`]); the header gets `ENCRYPTED`.
    pub fn encrypt_with(&mut self, key: CipherKey) {
        self.cipher = Some(key);
    }

    /// Signs the assignment with the manager's key: the header gets `SIGNED` and a signature
    /// block of the trailer follows it (see [`crate::sign`]).
    pub fn sign_with(&mut self, key: SigningKey) {
        self.signer = Some(key);
    }

    fn push(&mut self, cmd: &Command) -> Result<(), WriteError> {
        if self.meta.kind.is_switch_only() {
            return Err(WriteError::SwitchOnly { kind: self.meta.kind });
        }
        self.record = Writer::new();
        cmd.encode(&mut self.record)
            .map_err(|source| WriteError::Encode { path: cmd.path().to_owned(), source })?;
        let rec = self.record.as_slice();
        if rec.len() > MAX_RECORD {
            return Err(WriteError::Invalid {
                path: cmd.path().to_owned(),
                why: "command record over 1 MiB",
            });
        }
        self.body
            .write_all(&(rec.len() as u32).to_be_bytes())
            .map_err(io_err("writing the body spool"))?;
        self.body.write_all(rec).map_err(io_err("writing the body spool"))?;
        self.body_len += 4 + rec.len() as u64;
        self.count += 1;
        Ok(())
    }

    fn checked(path: &str) -> Result<(), WriteError> {
        check_path(path).map_err(|why| WriteError::Invalid { path: path.to_owned(), why })
    }

    pub fn make_dir(&mut self, path: &str, mode: u32) -> Result<(), WriteError> {
        Self::checked(path)?;
        self.push(&Command::MakeDir { path: path.to_owned(), mode: mode & 0o7777 })
    }

    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), WriteError> {
        Self::checked(path)?;
        self.push(&Command::Remove { path: path.to_owned(), recursive })
    }

    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), WriteError> {
        Self::checked(from)?;
        Self::checked(to)?;
        self.push(&Command::Rename { from: from.to_owned(), to: to.to_owned() })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), WriteError> {
        Self::checked(path)?;
        check_symlink_target(path, target)
            .map_err(|why| WriteError::Invalid { path: path.to_owned(), why })?;
        self.push(&Command::Symlink { path: path.to_owned(), target: target.to_owned() })
    }

    pub fn set_mode(&mut self, path: &str, mode: u32) -> Result<(), WriteError> {
        Self::checked(path)?;
        self.push(&Command::SetMode { path: path.to_owned(), mode: mode & 0o7777 })
    }

    /// Drops data-spool bytes written after `start` (a payload we decided not to keep).
    fn truncate_data(&mut self, start: u64) -> Result<(), WriteError> {
        self.data.flush().map_err(io_err("flushing the data spool"))?;
        let f = self.data.get_mut();
        f.set_len(start).map_err(io_err("truncating the data spool"))?;
        f.seek(SeekFrom::Start(start)).map_err(io_err("seeking the data spool"))?;
        self.data_len = start;
        Ok(())
    }

    /// Streams `fill`'s output raw into the data spool; returns its length.
    fn raw_payload(
        &mut self,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<u64, WriteError> {
        let mut counting = Counting { inner: &mut self.data, n: 0 };
        fill(&mut counting).map_err(io_err("writing a payload"))?;
        let n = counting.n;
        self.data_len += n;
        Ok(n)
    }

    /// The raw payload at `offset..offset + len` (the spool's tail) is compressed in place when
    /// `codec` asks for it and it gets smaller; returns the codec and stored length kept.
    fn maybe_compress(
        &mut self,
        offset: u64,
        len: u64,
        codec: Codec,
    ) -> Result<(Codec, u64), WriteError> {
        if codec == Codec::Raw || len < self.policy.min_size {
            return Ok((Codec::Raw, len));
        }
        self.data.flush().map_err(io_err("flushing the data spool"))?;
        let spool = self.data.get_ref().try_clone().map_err(io_err("reopening the data spool"))?;
        let end = offset + len;
        let mut counting = Counting { inner: &mut self.data, n: 0 };
        let mut enc = zstd::stream::Encoder::new(
            &mut counting,
            self.policy.level.min(crate::policy::MAX_LEVEL),
        )
        .map_err(io_err("starting zstd"))?;
        copy_range(&spool, offset, len, |b| enc.write_all(b))
            .map_err(io_err("compressing a payload"))?;
        enc.finish().map_err(io_err("compressing a payload"))?;
        let stored = counting.n;
        self.data.flush().map_err(io_err("flushing the data spool"))?;
        if stored >= len {
            self.truncate_data(end)?;
            return Ok((Codec::Raw, len));
        }
        // Move the compressed bytes down over the raw ones (destination before source, so a
        // forward copy is safe).
        let mut at = 0u64;
        copy_range(&spool, end, stored, |b| {
            spool.write_all_at(b, offset + at)?;
            at += b.len() as u64;
            Ok(())
        })
        .map_err(io_err("moving a compressed payload"))?;
        self.truncate_data(offset + stored)?;
        self.compressed = true;
        Ok((Codec::Zstd, stored))
    }

    /// Writes the bytes of `src` as one payload, compressed when the policy says so and it
    /// helps; returns the payload and the BLAKE3 of the raw bytes. A file the policy compresses
    /// is compressed straight from the source (one read, no raw copy in the spool); only when
    /// zstd did not shrink it is it read again and stored raw.
    fn file_payload(
        &mut self,
        path: &str,
        src: &File,
        len: u64,
    ) -> Result<(Payload, [u8; 32]), WriteError> {
        let offset = self.data_len;
        if self.policy.choose(path, len) == Codec::Zstd && len >= self.policy.min_size {
            let mut h = blake3::Hasher::new();
            let mut counting = Counting { inner: &mut self.data, n: 0 };
            let mut enc = zstd::stream::Encoder::new(
                &mut counting,
                self.policy.level.min(crate::policy::MAX_LEVEL),
            )
            .map_err(io_err("starting zstd"))?;
            copy_range(src, 0, len, |b| {
                h.update(b);
                enc.write_all(b)
            })
            .map_err(io_err(format!("compressing {path}")))?;
            enc.finish().map_err(io_err(format!("compressing {path}")))?;
            let stored = counting.n;
            self.data_len += stored;
            if stored < len {
                self.compressed = true;
                return Ok((
                    Payload { offset, stored_len: stored, len, codec: Codec::Zstd },
                    *h.finalize().as_bytes(),
                ));
            }
            self.truncate_data(offset)?;
        }
        let mut h = blake3::Hasher::new();
        self.raw_payload(|w| {
            copy_range(src, 0, len, |b| {
                h.update(b);
                w.write_all(b)
            })
        })?;
        Ok((Payload { offset, stored_len: len, len, codec: Codec::Raw }, *h.finalize().as_bytes()))
    }

    /// Adds a create-or-replace of `path` with the content of `src`.
    pub fn write_file(
        &mut self,
        path: &str,
        mode: u32,
        mtime: i64,
        src: &File,
    ) -> Result<(), WriteError> {
        Self::checked(path)?;
        let len = src.metadata().map_err(io_err(format!("reading metadata of {path}")))?.len();
        let (payload, hash) = self.file_payload(path, src, len)?;
        self.push(&Command::WriteFile {
            path: path.to_owned(),
            mode: mode & 0o7777,
            mtime,
            payload,
            hash,
        })
    }

    /// Adds the change from `base` (what the server has at `base_path`) to `new` (what `path`
    /// must hold): an apply-delta when it saves at least a fifth of the bytes, else a whole-file write.
    pub fn file_change(
        &mut self,
        path: &str,
        base_path: &str,
        base: &File,
        new: &File,
        mode: u32,
        mtime: i64,
    ) -> Result<ChangeOutcome, WriteError> {
        Self::checked(path)?;
        Self::checked(base_path)?;
        let offset = self.data_len;
        let new_len = new.metadata().map_err(io_err(format!("reading metadata of {path}")))?.len();
        // A delta is sent when it saves at least a fifth: past this many literal bytes it cannot.
        let max_literal = (new_len - new_len / 5).saturating_sub(128);
        let mut result = None;
        self.raw_payload(|w| {
            result = delta::compute_bounded(base, new, w, max_literal)?;
            Ok(())
        })?;
        let worthwhile = |d: &delta::FileDelta| {
            let ops_bytes = d.ops.len() as u64 * 17;
            d.literal + ops_bytes + 128 < new_len - new_len / 5
                && ops_bytes < (MAX_RECORD as u64) / 2
        };
        if let Some(d) = &result
            && d.base_hash == d.new_hash
            && d.base_len == d.new_len
        {
            self.truncate_data(offset)?;
            return Ok(ChangeOutcome::Identical);
        }
        let Some(d) = result.filter(worthwhile) else {
            self.truncate_data(offset)?;
            self.write_file(path, mode, mtime, new)?;
            return Ok(ChangeOutcome::Full);
        };
        let (codec, stored) =
            self.maybe_compress(offset, d.literal, self.policy.choose(path, new_len))?;
        let payload = Payload { offset, stored_len: stored, len: d.literal, codec };
        self.push(&Command::ApplyDelta {
            path: path.to_owned(),
            base: base_path.to_owned(),
            base_len: d.base_len,
            base_hash: d.base_hash,
            mode: mode & 0o7777,
            mtime,
            ops: d.ops,
            payload,
            len: d.new_len,
            hash: d.new_hash,
        })?;
        Ok(ChangeOutcome::Delta { literal: d.literal })
    }

    /// Lays the assignment out in its final file and returns its header.
    pub fn finish(mut self) -> Result<Header, WriteError> {
        if let Some(mut tree) = self.tree.take() {
            tree.records.flush().map_err(io_err("flushing the tree spool"))?;
            let body = &mut self.body;
            copy_range(tree.records.get_ref(), 0, tree.len, |b| body.write_all(b))
                .map_err(io_err("writing the tree manifest"))?;
            self.body_len += tree.len;
            self.count += tree.count;
            self.tree_flag = true;
        }
        self.body.flush().map_err(io_err("flushing the body spool"))?;
        self.data.flush().map_err(io_err("flushing the data spool"))?;
        let dir = parent_dir(&self.out);
        let out = tempfile::NamedTempFile::new_in(dir)
            .map_err(io_err(format!("creating a file in {}", dir.display())))?;
        let block = if self.signer.is_some() { SIGNATURE_BLOCK_LEN as u64 } else { 0 };
        let data_start = HEADER_LEN as u64 + self.body_len + TRAILER_LEN as u64 + block;
        // The data part first, hashed on the way; header and trailer depend on its hash.
        let data = self.data.get_ref();
        let (data_hash, stored_len) = match &self.cipher {
            None => {
                let mut hasher = blake3::Hasher::new();
                let mut at = 0u64;
                copy_range(data, 0, self.data_len, |b| {
                    hasher.update(b);
                    out.as_file().write_all_at(b, data_start + at)?;
                    at += b.len() as u64;
                    Ok(())
                })
                .map_err(io_err("writing the data part"))?;
                (hasher.finalize(), self.data_len)
            }
            Some(key) => (
                write_encrypted(key, data, self.data_len, out.as_file(), data_start)
                    .map_err(io_err("encrypting the data part"))?,
                cipher::stored_len(self.data_len),
            ),
        };
        let mut f = self.flags_byte();
        if self.seal.is_some() {
            f |= flags::SEALED;
        }
        if self.cipher.is_some() {
            f |= flags::ENCRYPTED;
        }
        if self.tree_flag {
            f |= flags::TREE;
        }
        if self.signer.is_some() {
            f |= flags::SIGNED;
        }
        let header = Header {
            kind: self.meta.kind,
            flags: f,
            serial: self.meta.serial,
            job_id: self.meta.job_id,
            base_serial: self.meta.base_serial,
            target_serial: self.meta.target_serial,
            site: self.meta.site.clone(),
            command_count: self.count,
            body_len: self.body_len,
            data_len: stored_len,
            data_hash: *data_hash.as_bytes(),
        };
        let hb = header.encode();
        let mut trailer = trailer_hasher(self.seal.as_ref());
        trailer.update(&hb);
        out.as_file().write_all_at(&hb, 0).map_err(io_err("writing the header"))?;
        let body = self.body.get_ref();
        let mut at = HEADER_LEN as u64;
        copy_range(body, 0, self.body_len, |b| {
            trailer.update(b);
            out.as_file().write_all_at(b, at)?;
            at += b.len() as u64;
            Ok(())
        })
        .map_err(io_err("writing the body"))?;
        let trailer = trailer.finalize();
        out.as_file()
            .write_all_at(trailer.as_bytes(), at)
            .map_err(io_err("writing the trailer"))?;
        if let Some(key) = &self.signer {
            let sig = key.sign(ASSIGNMENT_DOMAIN, trailer.as_bytes());
            out.as_file()
                .write_all_at(&sig.encode(), at + TRAILER_LEN as u64)
                .map_err(io_err("writing the signature"))?;
        }
        out.as_file().sync_all().map_err(io_err("syncing the assignment"))?;
        out.persist(&self.out).map_err(|e| WriteError::Io {
            what: format!("renaming into {}", self.out.display()),
            source: e.error,
        })?;
        Ok(header)
    }

    fn flags_byte(&self) -> u8 {
        if self.compressed { flags::COMPRESSED } else { 0 }
    }
}

/// Writes the `len` plaintext bytes of `spool` encrypted (salt, then chunk ‖ tag …) at `at` in
/// `out`; returns the BLAKE3 of what was written.
fn write_encrypted(
    key: &CipherKey,
    spool: &File,
    len: u64,
    out: &File,
    at: u64,
) -> io::Result<blake3::Hash> {
    let salt: [u8; cipher::SALT as usize] = rand::random();
    let aead = key.for_salt(&salt);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&salt);
    out.write_all_at(&salt, at)?;
    let mut buf = vec![0u8; (cipher::CHUNK + cipher::TAG) as usize];
    let chunks = len.div_ceil(cipher::CHUNK);
    for i in 0..chunks {
        let n = (len - i * cipher::CHUNK).min(cipher::CHUNK) as usize;
        spool.read_exact_at(&mut buf[..n], i * cipher::CHUNK)?;
        let tag = aead.seal(i, i + 1 == chunks, &mut buf[..n]);
        buf[n..n + tag.len()].copy_from_slice(&tag);
        let piece = &buf[..n + tag.len()];
        hasher.update(piece);
        out.write_all_at(piece, at + cipher::chunk_offset(i))?;
    }
    Ok(hasher.finalize())
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Feeds `len` bytes of `f` from `from` to `each` in 1 MiB pieces (positioned reads, so the
/// file's cursor is never moved). A file shorter than expected is an error.
pub(crate) fn copy_range(
    f: &File,
    from: u64,
    len: u64,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; (1usize << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], from + done)?;
        each(&buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// Reads everything `r` yields into `each` (used for streams without positions).
pub(crate) fn pump(
    r: &mut dyn Read,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        each(&buf[..n])?;
        total += n as u64;
    }
}
