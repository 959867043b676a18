//! The streaming assignment reader: header checks on open, a hash pass (`verify`) before
//! anything is applied, then commands decoded one record at a time and payloads streamed
//! (decompressed on the fly) straight out of the file.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cm_wire::DecodeError;

use crate::cipher::{self, CipherKey, DataCipher};
use crate::format::{
    Codec, Command, HEADER_LEN, Header, HeaderError, MAX_RECORD, Payload, Record, TRAILER_LEN,
    TreeEntry, flags, tree_order,
};
use crate::sign::{ASSIGNMENT_DOMAIN, SIGNATURE_BLOCK_LEN, Signature, SignatureError, TrustedKeys};
use crate::{SealKey, trailer_hasher};

/// Why an assignment cannot be read. Positions name the command (0-based) where one is known.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error("truncated: the header announces {expected} bytes, the file has {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("{0}")]
    Header(#[from] HeaderError),
    #[error("header and body do not match the trailer hash (corrupted or forged)")]
    TrailerMismatch,
    #[error("data part does not match the header's BLAKE3 (corrupted)")]
    DataHashMismatch,
    #[error(
        "assignment is not sealed with this site's key (refusing an unauthenticated assignment)"
    )]
    NotSealed,
    #[error(
        "assignment is not signed by the manager (refusing: this server pins the manager's key)"
    )]
    Unsigned,
    #[error("assignment signature: {0}")]
    Signature(#[from] SignatureError),
    #[error("assignment is sealed but no key was given to check it")]
    KeyRequired,
    #[error("assignment is encrypted but no key was given to decrypt it")]
    CipherKeyRequired,
    #[error(
        "data chunk {chunk} does not decrypt with this key (wrong key, or the data part was altered)"
    )]
    Undecryptable { chunk: u64 },
    #[error("command {index}: {source}")]
    Command { index: u64, source: DecodeError },
    #[error("body: {0}")]
    Body(&'static str),
}

/// A byte range of the assignment file, read with positioned reads (so many readers can
/// share one file handle).
pub struct Region {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Region {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "assignment file shrank while being read",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A plaintext byte range of an encrypted data part: chunks are read, authenticated and
/// decrypted one at a time (one chunk buffered).
pub struct DecryptingRegion {
    file: Arc<File>,
    aead: Arc<DataCipher>,
    /// Where the data part starts in the file.
    data_start: u64,
    /// Plaintext length of the whole data part.
    plain_len: u64,
    pos: u64,
    end: u64,
    /// The decrypted chunk `chunk` (empty: none yet).
    buf: Vec<u8>,
    chunk: u64,
}

impl DecryptingRegion {
    fn load(&mut self, index: u64) -> io::Result<()> {
        let chunks = self.plain_len.div_ceil(cipher::CHUNK);
        let n = (self.plain_len - index * cipher::CHUNK).min(cipher::CHUNK) as usize;
        self.buf.resize(n + cipher::TAG as usize, 0);
        self.file.read_exact_at(&mut self.buf, self.data_start + cipher::chunk_offset(index))?;
        let (data, tag) = self.buf.split_at_mut(n);
        if !self.aead.open(index, index + 1 == chunks, data, tag) {
            self.buf.clear();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("data chunk {index} does not decrypt"),
            ));
        }
        self.buf.truncate(n);
        self.chunk = index;
        Ok(())
    }
}

impl Read for DecryptingRegion {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.end || out.is_empty() {
            return Ok(0);
        }
        let index = self.pos / cipher::CHUNK;
        if self.buf.is_empty() || self.chunk != index {
            self.load(index)?;
        }
        let at = (self.pos - index * cipher::CHUNK) as usize;
        let n = (self.buf.len() - at).min(out.len()).min((self.end - self.pos) as usize);
        out[..n].copy_from_slice(&self.buf[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// The stored bytes of a payload: straight from the file, or decrypted.
enum DataRegion {
    Plain(Region),
    Encrypted(DecryptingRegion),
}

impl DataRegion {
    /// Stored bytes not read yet.
    fn remaining(&self) -> u64 {
        match self {
            DataRegion::Plain(r) => r.end - r.pos,
            DataRegion::Encrypted(r) => r.end - r.pos,
        }
    }
}

impl Read for DataRegion {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            DataRegion::Plain(r) => r.read(buf),
            DataRegion::Encrypted(r) => r.read(buf),
        }
    }
}

/// An opened assignment file.
pub struct AssignmentReader {
    file: Arc<File>,
    path: PathBuf,
    header: Header,
    header_bytes: [u8; HEADER_LEN],
    /// Plaintext length of the data part (what payload offsets refer to).
    plain_data_len: u64,
    /// The data part's AEAD, once a key was given ([`AssignmentReader::decrypt_with`]).
    aead: Option<Arc<DataCipher>>,
}

impl AssignmentReader {
    /// Opens `path` and checks its header and that its length is exactly what the header says.
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        let file = File::open(path)
            .map_err(|source| ReadError::Io { what: "opening the assignment", source })?;
        let actual = file
            .metadata()
            .map_err(|source| ReadError::Io { what: "reading metadata", source })?
            .len();
        let mut hb = [0u8; HEADER_LEN];
        let got = read_up_to(&file, &mut hb)
            .map_err(|source| ReadError::Io { what: "reading the header", source })?;
        let header = Header::decode(&hb[..got])?;
        let expected = header.data_start().and_then(|n| n.checked_add(header.data_len)).ok_or(
            ReadError::Header(HeaderError::Decode(DecodeError::malformed("sizes overflow"))),
        )?;
        if expected != actual {
            return Err(ReadError::Truncated { expected, actual });
        }
        let plain_data_len = if header.flags & flags::ENCRYPTED != 0 {
            cipher::plain_len(header.data_len).ok_or(ReadError::Header(HeaderError::Decode(
                DecodeError::malformed("encrypted data part of impossible length"),
            )))?
        } else {
            header.data_len
        };
        Ok(AssignmentReader {
            file: Arc::new(file),
            path: path.to_owned(),
            header,
            header_bytes: hb,
            plain_data_len,
            aead: None,
        })
    }

    /// Gives the key to decrypt an encrypted data part (does nothing for a plain one).
    /// [`verify`](Self::verify) then authenticates every chunk under it.
    pub fn decrypt_with(&mut self, key: &CipherKey) -> Result<(), ReadError> {
        if !self.is_encrypted() {
            return Ok(());
        }
        let mut salt = [0u8; cipher::SALT as usize];
        self.file
            .read_exact_at(&mut salt, self.data_start())
            .map_err(|source| ReadError::Io { what: "reading the salt", source })?;
        self.aead = Some(Arc::new(key.for_salt(&salt)));
        Ok(())
    }

    pub fn is_encrypted(&self) -> bool {
        self.header.flags & flags::ENCRYPTED != 0
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn region(&self, from: u64, len: u64) -> Region {
        Region { file: self.file.clone(), pos: from, end: from + len }
    }

    /// Plaintext bytes `from..from + len` of the data part.
    fn data_region(&self, from: u64, len: u64) -> Result<DataRegion, ReadError> {
        if !self.is_encrypted() {
            return Ok(DataRegion::Plain(self.region(self.data_start() + from, len)));
        }
        let aead = self.aead.clone().ok_or(ReadError::CipherKeyRequired)?;
        Ok(DataRegion::Encrypted(DecryptingRegion {
            file: self.file.clone(),
            aead,
            data_start: self.data_start(),
            plain_len: self.plain_data_len,
            pos: from,
            end: from + len,
            buf: Vec::new(),
            chunk: 0,
        }))
    }

    fn data_start(&self) -> u64 {
        // Checked not to overflow in `open`.
        HEADER_LEN as u64 + self.header.body_len + TRAILER_LEN as u64 + self.header.signature_len()
    }

    /// Checks the seal (when `key` is given, or the assignment says it is sealed), the trailer
    /// over header and body, the manager's signature of the trailer (when `signers` is given:
    /// then an unsigned assignment, or one no pinned key signed, is refused) and the data
    /// part's hash. Reads the whole file once; call it before applying anything.
    pub fn verify(
        &self,
        key: Option<&SealKey>,
        signers: Option<&TrustedKeys>,
    ) -> Result<(), ReadError> {
        let h = &self.header;
        if self.is_encrypted() && self.aead.is_none() {
            return Err(ReadError::CipherKeyRequired);
        }
        let sealed = h.flags & flags::SEALED != 0;
        match (sealed, key) {
            (false, Some(_)) => return Err(ReadError::NotSealed),
            (true, None) => return Err(ReadError::KeyRequired),
            _ => {}
        }
        let io = |what| move |source| ReadError::Io { what, source };
        let mut t = trailer_hasher(key);
        t.update(&self.header_bytes);
        let mut body = self.region(HEADER_LEN as u64, h.body_len);
        crate::write::pump(&mut body, |b| {
            t.update(b);
            Ok(())
        })
        .map_err(io("reading the body"))?;
        let mut stored = [0u8; TRAILER_LEN];
        self.file
            .read_exact_at(&mut stored, HEADER_LEN as u64 + h.body_len)
            .map_err(io("reading the trailer"))?;
        // blake3::Hash compares in constant time.
        if t.finalize() != blake3::Hash::from_bytes(stored) {
            return Err(ReadError::TrailerMismatch);
        }
        if let Some(signers) = signers {
            if h.flags & flags::SIGNED == 0 {
                return Err(ReadError::Unsigned);
            }
            let mut block = [0u8; SIGNATURE_BLOCK_LEN];
            self.file
                .read_exact_at(&mut block, HEADER_LEN as u64 + h.body_len + TRAILER_LEN as u64)
                .map_err(io("reading the signature"))?;
            signers.verify(ASSIGNMENT_DOMAIN, &stored, &Signature::decode(&block)?)?;
        }
        let data_hash = match &self.aead {
            None => {
                let mut d = blake3::Hasher::new();
                crate::write::copy_range(&self.file, self.data_start(), h.data_len, |b| {
                    d.update(b);
                    Ok(())
                })
                .map_err(io("reading the data part"))?;
                d.finalize()
            }
            Some(aead) => self.hash_and_authenticate(aead)?,
        };
        if data_hash != blake3::Hash::from_bytes(h.data_hash) {
            return Err(ReadError::DataHashMismatch);
        }
        Ok(())
    }

    /// One pass over an encrypted data part: its BLAKE3, and every chunk's tag checked.
    fn hash_and_authenticate(&self, aead: &DataCipher) -> Result<blake3::Hash, ReadError> {
        let io = |source| ReadError::Io { what: "reading the data part", source };
        let start = self.data_start();
        let mut d = blake3::Hasher::new();
        let mut buf = vec![0u8; (cipher::CHUNK + cipher::TAG) as usize];
        self.file.read_exact_at(&mut buf[..cipher::SALT as usize], start).map_err(io)?;
        d.update(&buf[..cipher::SALT as usize]);
        let plain = self.plain_data_len;
        let chunks = plain.div_ceil(cipher::CHUNK);
        for i in 0..chunks {
            let n = (plain - i * cipher::CHUNK).min(cipher::CHUNK) as usize;
            let piece = &mut buf[..n + cipher::TAG as usize];
            self.file.read_exact_at(piece, start + cipher::chunk_offset(i)).map_err(io)?;
            d.update(piece);
            let (data, tag) = piece.split_at_mut(n);
            if !aead.open(i, i + 1 == chunks, data, tag) {
                return Err(ReadError::Undecryptable { chunk: i });
            }
        }
        Ok(d.finalize())
    }

    /// The commands in order, decoded one record at a time (the tree manifest, if any, after
    /// them is left to [`tree`](Self::tree)).
    pub fn commands(&self) -> Commands {
        Commands { records: self.records(), ended: false }
    }

    /// True when the body ends with the manifest of the whole resulting tree.
    pub fn has_tree(&self) -> bool {
        self.header.flags & flags::TREE != 0
    }

    /// The manifest of the whole resulting tree, in [`tree_order`] (the commands before it are
    /// decoded and skipped). Empty when the assignment has none ([`has_tree`](Self::has_tree)).
    pub fn tree(&self) -> impl Iterator<Item = Result<TreeEntry, ReadError>> + use<> {
        self.records().filter_map(|r| match r {
            Ok((_, Record::Tree(t))) => Some(Ok(t)),
            Ok((_, Record::Command(_))) => None,
            Err(e) => Some(Err(e)),
        })
    }

    /// Every body record in order, with the checks that need context.
    fn records(&self) -> Records {
        Records {
            body: BufReader::with_capacity(
                256 << 10,
                self.region(HEADER_LEN as u64, self.header.body_len),
            ),
            left: self.header.body_len,
            index: 0,
            count: self.header.command_count,
            data_cursor: 0,
            data_len: self.plain_data_len,
            record: Vec::new(),
            done: false,
            tree_allowed: self.has_tree(),
            last_tree: None,
        }
    }

    /// A stream of the payload's bytes, decompressed, exactly `payload.len` long.
    pub fn payload(&self, p: &Payload) -> Result<PayloadStream, ReadError> {
        let end = p.offset.checked_add(p.stored_len).filter(|e| *e <= self.plain_data_len);
        if end.is_none() {
            return Err(ReadError::Body("payload outside the data part"));
        }
        let region = self.data_region(p.offset, p.stored_len)?;
        let inner = match p.codec {
            Codec::Raw => Inner::Raw(region),
            Codec::Zstd => {
                let start = |source| ReadError::Io { what: "starting zstd", source };
                // One frame: the decoder stops at its end, and bytes after it are refused below.
                let mut d = zstd::stream::read::Decoder::new(region).map_err(start)?.single_frame();
                // A frame asking for a bigger window (up to 2 GiB in zstd) is refused, so a
                // payload cannot make the reader allocate more than this (see MAX_WINDOW_LOG).
                d.window_log_max(crate::policy::MAX_WINDOW_LOG).map_err(start)?;
                Inner::Zstd(Box::new(d))
            }
        };
        Ok(PayloadStream { inner, len: p.len, produced: 0 })
    }
}

fn read_up_to(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Iterator over the body's records. Besides decoding each record it checks what needs
/// context: payloads laid out in order without gaps, the record count, the body length, and
/// that the tree manifest (only with `flags::TREE`) comes last, in [`tree_order`].
struct Records {
    body: BufReader<Region>,
    left: u64,
    index: u64,
    count: u64,
    data_cursor: u64,
    data_len: u64,
    record: Vec<u8>,
    done: bool,
    tree_allowed: bool,
    /// The last tree entry's path, once the manifest started.
    last_tree: Option<String>,
}

impl Records {
    fn next_record(&mut self) -> Result<Option<(u64, Record)>, ReadError> {
        let index = self.index;
        let bad = |source| ReadError::Command { index, source };
        if self.left == 0 {
            if self.index != self.count {
                return Err(ReadError::Body("fewer commands than the header announces"));
            }
            if self.data_cursor != self.data_len {
                return Err(ReadError::Body("data part longer than its payloads"));
            }
            return Ok(None);
        }
        if self.index == self.count {
            return Err(ReadError::Body("more commands than the header announces"));
        }
        let mut len = [0u8; 4];
        if self.left < 4 {
            return Err(bad(DecodeError::Incomplete { needed: 4 - self.left as usize }));
        }
        self.body
            .read_exact(&mut len)
            .map_err(|source| ReadError::Io { what: "reading the body", source })?;
        let len = cm_wire::Reader::new(&len).u32().map_err(bad)? as usize;
        if len > MAX_RECORD {
            return Err(bad(DecodeError::malformed("record longer than 1 MiB")));
        }
        if len as u64 > self.left - 4 {
            return Err(bad(DecodeError::malformed("record runs past the body")));
        }
        self.record.resize(len, 0);
        self.body
            .read_exact(&mut self.record)
            .map_err(|source| ReadError::Io { what: "reading the body", source })?;
        self.left -= 4 + len as u64;
        let cmd = match Record::decode(&self.record).map_err(bad)? {
            Record::Tree(t) => {
                if !self.tree_allowed {
                    return Err(bad(DecodeError::malformed("tree entry without the TREE flag")));
                }
                if self.last_tree.as_deref().is_some_and(|l| tree_order(l, &t.path).is_ge()) {
                    return Err(bad(DecodeError::malformed("tree entries out of order")));
                }
                self.last_tree = Some(t.path.clone());
                self.index += 1;
                return Ok(Some((index, Record::Tree(t))));
            }
            Record::Command(_) if self.last_tree.is_some() => {
                return Err(bad(DecodeError::malformed("command after the tree manifest")));
            }
            Record::Command(c) => c,
        };
        if let Some(p) = cmd.payload() {
            if p.offset != self.data_cursor {
                return Err(bad(DecodeError::malformed(
                    "payload not where the previous one ended",
                )));
            }
            self.data_cursor = p.offset + p.stored_len;
            if self.data_cursor > self.data_len {
                return Err(bad(DecodeError::malformed("payload runs past the data part")));
            }
        }
        self.index += 1;
        Ok(Some((index, Record::Command(cmd))))
    }
}

impl Iterator for Records {
    type Item = Result<(u64, Record), ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.next_record().transpose();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

/// Iterator over the body's commands; it ends where the tree manifest starts (where every
/// payload must have been consumed).
pub struct Commands {
    records: Records,
    ended: bool,
}

impl Iterator for Commands {
    type Item = Result<(u64, Command), ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        match self.records.next() {
            Some(Ok((i, Record::Command(c)))) => Some(Ok((i, c))),
            Some(Ok((_, Record::Tree(_)))) => {
                self.ended = true;
                (self.records.data_cursor != self.records.data_len)
                    .then_some(Err(ReadError::Body("data part longer than its payloads")))
            }
            Some(Err(e)) => {
                self.ended = true;
                Some(Err(e))
            }
            None => {
                self.ended = true;
                None
            }
        }
    }
}

enum Inner {
    Raw(DataRegion),
    Zstd(Box<zstd::stream::read::Decoder<'static, BufReader<DataRegion>>>),
}

/// A payload's bytes, decompressed on the fly. Fails (InvalidData) when the stored bytes
/// decode to more or fewer bytes than the command announced.
pub struct PayloadStream {
    inner: Inner,
    len: u64,
    produced: u64,
}

impl PayloadStream {
    /// Length after decompression.
    pub fn size(&self) -> u64 {
        self.len
    }

    fn inner(&mut self) -> &mut dyn Read {
        match &mut self.inner {
            Inner::Raw(r) => r,
            Inner::Zstd(d) => d.as_mut(),
        }
    }
}

impl PayloadStream {
    /// At the announced length: the stored bytes must end here too. Nothing may come out past
    /// it (a payload inflating beyond its length), and nothing may follow the zstd frame (a
    /// second frame, or padding).
    fn check_end(&mut self) -> io::Result<()> {
        let mut probe = [0u8; 1];
        if self.inner().read(&mut probe)? != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "payload longer than announced",
            ));
        }
        if let Inner::Zstd(d) = &self.inner
            && (!d.get_ref().buffer().is_empty() || d.get_ref().get_ref().remaining() != 0)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bytes after the payload's zstd frame (one frame per payload)",
            ));
        }
        Ok(())
    }
}

impl Read for PayloadStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len - self.produced;
        if left == 0 {
            return self.check_end().map(|()| 0);
        }
        let want = left.min(buf.len() as u64) as usize;
        let n = self.inner().read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            let after_frame = matches!(&self.inner, Inner::Zstd(d)
                if !d.get_ref().buffer().is_empty() || d.get_ref().get_ref().remaining() != 0);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                if after_frame {
                    "bytes after the payload's zstd frame (one frame per payload)"
                } else {
                    "payload shorter than announced"
                },
            ));
        }
        self.produced += n as u64;
        // Checked as the last bytes go out, so a reader that stops at the length still sees it.
        if self.produced == self.len {
            self.check_end()?;
        }
        Ok(n)
    }
}
