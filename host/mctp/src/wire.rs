//! MCTP datagrams: layouts, encoding and authenticated decoding (see docs/mctp.md).
//!
//! Every datagram is `"CM" ‖ version ‖ kind ‖ body ‖ tag`, where `tag` is the 16-byte keyed
//! BLAKE3 of everything before it ([`cm_wire::mac`]). Nothing is parsed before the tag verifies,
//! so an outsider's bytes never reach the field decoders; the decoders are fuzzed anyway.
//!
//! One exception, for speed: a *tree-tagged* data frame (kind 6, used when the announcement
//! says so) carries the tag of `header ‖ CV`, where CV is the BLAKE3 chaining value of its
//! payload as a subtree of the file (see [`crate::tree`]). Checking it costs one hash of the
//! payload, and the member keeps the CV to assemble the file's BLAKE3 without hashing the file
//! again. Only the fixed header's session id is read before the tag verifies (to find the
//! frame size the CV needs).

use crate::keys::{AEAD_TAG_LEN, Keys};
use cm_wire::{DecodeError, Reader, Writer};
use thiserror::Error;

pub const MAGIC: [u8; 2] = *b"CM";
/// 2: announcements carry their [`Origin`] (who sent them, and how fresh they are).
pub const VERSION: u8 = 2;
const KIND_ANNOUNCE: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_REPORT: u8 = 3;
const KIND_SOLICIT: u8 = 4;
const KIND_CHECKPOINT: u8 = 5;
const KIND_DATA_TREE: u8 = 6;
const KIND_CODED: u8 = 7;
/// Most frames one coded repair combines.
pub const MAX_CODED: usize = 8;
/// Announcement flags.
const FLAG_ENCRYPTED: u8 = 1;
const FLAG_TREE: u8 = 2;

/// Largest UDP payload we ever build or accept.
pub const MAX_DATAGRAM: usize = 65_507;
/// Fixed size of a data frame's header; the payload starts here.
pub const DATA_HEADER_LEN: usize = 4 + 8 + 8 + 4 + 4 + 2;
/// Bytes a datagram adds around a data frame's payload (header and MAC tag, no encryption).
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + cm_wire::mac::TAG_LEN;
/// Largest frame payload: the datagram must fit in [`MAX_DATAGRAM`] even when encrypted.
pub const MAX_FRAME_SIZE: u16 = (MAX_DATAGRAM - DATA_OVERHEAD - AEAD_TAG_LEN) as u16;
/// Smallest frame payload we accept (keeps the frame count of a 4 GiB file within `u32`).
pub const MIN_FRAME_SIZE: u16 = 64;
/// Missing-frame runs in one report datagram (keeps a report near 1 300 bytes).
pub const MAX_RUNS_PER_REPORT: usize = 160;
/// Member ids in one solicitation datagram.
pub const MAX_IDS_PER_SOLICIT: usize = 160;
/// Longest assignment name.
pub const MAX_NAME: usize = 255;
/// Longest failure reason in a report.
pub const MAX_REASON: usize = 512;

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("authentication tag does not verify (foreign key, forged or damaged)")]
    BadTag,
    #[error("not an MCTP datagram (bad magic)")]
    BadMagic,
    #[error("unsupported MCTP version {0}")]
    BadVersion(u8),
    #[error("unknown datagram kind {0}")]
    UnknownKind(u8),
    #[error("encrypted payload does not verify")]
    BadCiphertext,
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
}

/// What a session transfers; part of every announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub assignment: u64,
    pub name: String,
    pub size: u64,
    pub hash: [u8; 32],
}

/// Who announced a session and how fresh the announcement is: the announcing GL's node id, its
/// incarnation (grows with every start of the GL's process, as the election's does) and the
/// session's sequence number within that incarnation (grows with every session). Members accept
/// a new session only from an origin newer than any they accepted from that node
/// ([`crate::replay`]), so a recorded announcement replayed later is ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub node: u64,
    pub incarnation: u64,
    pub sequence: u64,
}

impl Origin {
    /// Newer than `other` from the same node: a later incarnation, or a later session of the
    /// same one.
    pub fn newer_than(&self, incarnation: u64, sequence: u64) -> bool {
        (self.incarnation, self.sequence) > (incarnation, sequence)
    }
}

/// "A session is starting": id, origin, size, name, hash, rate and frame size; sent on the
/// data channel and also carried, opaque, in the election's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub session: u64,
    pub origin: Origin,
    pub info: SessionInfo,
    pub frame_size: u16,
    /// Current sending rate in bytes per second (informational for members).
    pub rate: u64,
    /// UDP port on the announcer's address where members send reports.
    pub report_port: u16,
    pub encrypted: bool,
    /// Data frames are tree-tagged (kind 6): never with encryption, only with a frame size
    /// that fits the BLAKE3 tree ([`crate::tree::frame_size_fits_tree`]) and never inline.
    pub tree: bool,
    /// The members the session is for (`AllBut` the members a run for some servers of the
    /// segment leaves out); the others ignore it: no file, no report.
    pub targets: Selector,
    /// Pass in progress when this was sent (1 = first transmission).
    pub pass: u32,
    /// The whole assignment, when it fits in one datagram (then there are no data frames).
    /// Encrypted like frame 0 when the session is encrypted.
    pub inline: Option<Vec<u8>>,
}

impl Announce {
    /// Frames in the session (0 when the assignment rides inline).
    pub fn frame_count(&self) -> u32 {
        if self.inline.is_some() {
            0
        } else {
            frame_count(self.info.size, self.frame_size).unwrap_or(0)
        }
    }
}

/// Number of frames for `size` bytes in frames of `frame_size`, if it fits in `u32`.
pub fn frame_count(size: u64, frame_size: u16) -> Option<u32> {
    u32::try_from(size.div_ceil(u64::from(frame_size.max(1)))).ok()
}

/// Fixed header of a data frame. The payload (plaintext, or ciphertext ‖ AEAD tag) follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub session: u64,
    pub assignment: u64,
    pub pass: u32,
    pub seq: u32,
    /// Plaintext payload length.
    pub len: u16,
}

impl DataHeader {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DataHeader {
            session: r.u64()?,
            assignment: r.u64()?,
            pass: r.u32()?,
            seq: r.u32()?,
            len: r.u16()?,
        })
    }
}

/// A member's status for one solicitation round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportStatus {
    /// Frames still missing, as `(first, count)` runs (a NACK). Never empty: an empty NACK is
    /// `Complete`.
    Missing(Vec<(u32, u32)>),
    /// Holds the whole assignment and its BLAKE3 verified.
    Complete,
    /// Cannot complete (hash mismatch, disk error); the reason goes into the GL's report.
    Failed(String),
    /// Holds every frame and is checking the BLAKE3 (and flushing the file): alive and busy,
    /// so the GL keeps waiting instead of counting the round as stalled.
    Verifying,
    /// The answer to a [`Checkpoint`] (`round` carries its number): the frames of the
    /// checkpoint's window this member lacks, possibly none. It tells the GL what to repair
    /// while the pass goes on and how far behind the sender this member is.
    Gaps(Vec<(u32, u32)>),
}

/// One datagram of a member's status report. A long NACK is split into `parts` datagrams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub session: u64,
    pub member: u64,
    /// The solicitation round this answers (0: unsolicited, on announcement).
    pub round: u32,
    pub part: u16,
    pub parts: u16,
    pub status: ReportStatus,
}

/// Who a solicitation asks to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every member (end of a pass: members with missing frames always answer).
    Everyone,
    /// Exactly these members.
    Only(Vec<u64>),
    /// Everyone except these members (the GL already has their reports).
    AllBut(Vec<u64>),
}

/// "Send me your report": end of a pass, or the GL asking again for reports it lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Solicit {
    pub session: u64,
    pub round: u32,
    /// The pass that just ended.
    pub pass: u32,
    /// Members spread their answers over this many microseconds (no report implosion).
    pub window_us: u32,
    pub selector: Selector,
}

impl Selector {
    /// True when the member `id` is asked to report.
    pub fn selects(&self, id: u64) -> bool {
        match self {
            Selector::Everyone => true,
            Selector::Only(ids) => ids.contains(&id),
            Selector::AllBut(ids) => !ids.contains(&id),
        }
    }
}

/// "Where are you?" in the middle of a pass: members still receiving answer with the frames of
/// `from..upto` they lack ([`ReportStatus::Gaps`], possibly empty), so the GL repairs during
/// the pass and adapts its rate to how far its slowest members lag behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub session: u64,
    pub pass: u32,
    /// Increases by one per checkpoint over the whole session.
    pub checkpoint: u32,
    /// The window: every frame of the pass before `upto` was sent before this datagram.
    pub from: u32,
    pub upto: u32,
    /// Members spread their answers over this many microseconds.
    pub window_us: u32,
}

/// A decoded, authenticated datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Announce(Announce),
    /// `payload` is the raw payload bytes (ciphertext ‖ tag when encrypted).
    Data(DataHeader, &'a [u8]),
    Report(Report),
    Solicit(Solicit),
    Checkpoint(Checkpoint),
    /// `payload` is the XOR of the named frames, each zero-padded to `len`.
    Coded(CodedHeader, &'a [u8]),
}

/// Header of a coded repair: one payload that is the XOR of several frames, for members that
/// each lack exactly one of them (and hold the others). Never used in encrypted sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodedHeader {
    pub session: u64,
    pub assignment: u64,
    pub pass: u32,
    /// 2..=[`MAX_CODED`] sequence numbers, strictly increasing.
    pub seqs: Vec<u32>,
    /// Payload length: the longest of the frames.
    pub len: u16,
}

/// Bytes a coded repair adds around its payload.
pub fn coded_overhead(frames: usize) -> usize {
    4 + 8 + 8 + 4 + 1 + 4 * frames + 2 + cm_wire::mac::TAG_LEN
}

/// Writes a coded repair into `out` (replacing what it held): header, then `fill` produces the
/// XOR payload of `h.len` bytes into the slice it is given (zeroed), then the MAC tag.
pub fn encode_coded<E>(
    keys: &Keys,
    h: &CodedHeader,
    out: &mut Vec<u8>,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    debug_assert!(
        (2..=MAX_CODED).contains(&h.seqs.len()) && h.seqs.windows(2).all(|w| w[0] < w[1])
    );
    let mut w = Writer::with_capacity(coded_overhead(h.seqs.len()));
    header(&mut w, KIND_CODED);
    w.u64(h.session).u64(h.assignment).u32(h.pass).u8(h.seqs.len() as u8);
    for s in &h.seqs {
        w.u32(*s);
    }
    w.u16(h.len);
    out.clear();
    out.extend_from_slice(w.as_slice());
    let start = out.len();
    out.resize(start + usize::from(h.len), 0);
    fill(&mut out[start..])?;
    keys.mac().seal(out);
    Ok(())
}

/// The session id and frames of what claims to be a coded repair (nothing is verified): a
/// member that lacks none or several of them skips it without checking its tag.
pub fn coded_claim(datagram: &[u8]) -> Option<(u64, impl Iterator<Item = u32> + '_)> {
    let mut r = Reader::new(datagram);
    if r.array::<4>().ok()? != [MAGIC[0], MAGIC[1], VERSION, KIND_CODED] {
        return None;
    }
    let session = r.u64().ok()?;
    r.u64().ok()?; // assignment
    r.u32().ok()?; // pass
    let n = usize::from(r.u8().ok()?).min(MAX_CODED);
    let mut seqs = Reader::new(r.bytes(4 * n).ok()?);
    Some((session, std::iter::from_fn(move || seqs.u32().ok())))
}

impl CodedHeader {
    fn decode<'a>(r: &mut Reader<'a>) -> Result<(Self, &'a [u8]), DecodeError> {
        let session = r.u64()?;
        let assignment = r.u64()?;
        let pass = r.u32()?;
        let n = usize::from(r.u8()?);
        if !(2..=MAX_CODED).contains(&n) {
            return Err(DecodeError::malformed("coded repair combines 2 to 8 frames"));
        }
        let mut seqs = Vec::with_capacity(n);
        for _ in 0..n {
            let s = r.u32()?;
            if seqs.last().is_some_and(|last| *last >= s) {
                return Err(DecodeError::malformed("coded repair sequence numbers not increasing"));
            }
            seqs.push(s);
        }
        let len = r.u16()?;
        let payload = r.rest();
        if payload.len() != usize::from(len) {
            return Err(DecodeError::malformed("coded payload length differs from header"));
        }
        r.bytes(payload.len())?;
        Ok((CodedHeader { session, assignment, pass, seqs, len }, payload))
    }
}

fn header(w: &mut Writer, kind: u8) {
    w.bytes(&MAGIC).u8(VERSION).u8(kind);
}

impl Announce {
    pub fn encode(&self, keys: &Keys) -> Vec<u8> {
        let mut w = Writer::with_capacity(128 + self.inline.as_ref().map_or(0, Vec::len));
        header(&mut w, KIND_ANNOUNCE);
        w.u64(self.session)
            .u64(self.origin.node)
            .u64(self.origin.incarnation)
            .u64(self.origin.sequence)
            .u64(self.info.assignment)
            .u64(self.info.size)
            .bytes(&self.info.hash);
        let flags =
            if self.encrypted { FLAG_ENCRYPTED } else { 0 } | if self.tree { FLAG_TREE } else { 0 };
        w.u16(self.frame_size).u64(self.rate).u16(self.report_port).u8(flags).u32(self.pass);
        w.str16("name", &self.info.name).expect("name length checked by the sender");
        self.targets.encode(&mut w);
        w.bool(self.inline.is_some());
        if let Some(b) = &self.inline {
            w.bytes16("inline", b).expect("inline payload fits a frame");
        }
        seal(keys, w)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let session = r.u64()?;
        let origin = Origin { node: r.u64()?, incarnation: r.u64()?, sequence: r.u64()? };
        let assignment = r.u64()?;
        let size = r.u64()?;
        let hash = r.array()?;
        let frame_size = r.u16()?;
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&frame_size) {
            return Err(DecodeError::malformed("frame size out of range"));
        }
        if frame_count(size, frame_size).is_none() {
            return Err(DecodeError::malformed("too many frames"));
        }
        let rate = r.u64()?;
        let report_port = r.u16()?;
        let flags = r.u8()?;
        if flags & !(FLAG_ENCRYPTED | FLAG_TREE) != 0 {
            return Err(DecodeError::malformed("unknown announcement flags"));
        }
        let (encrypted, tree) = (flags & FLAG_ENCRYPTED != 0, flags & FLAG_TREE != 0);
        if tree
            && (encrypted
                || !crate::tree::frame_size_fits_tree(frame_size)
                || size <= u64::from(frame_size))
        {
            return Err(DecodeError::malformed(
                "tree-tagged frames need plaintext, a power-of-two frame size and several frames",
            ));
        }
        let pass = r.u32()?;
        let name = r.str16(MAX_NAME)?.to_owned();
        let targets = Selector::decode(r)?;
        let inline = if r.bool()? {
            let b = r.bytes16(usize::from(frame_size) + AEAD_TAG_LEN)?;
            let want = size + if encrypted { AEAD_TAG_LEN as u64 } else { 0 };
            if b.len() as u64 != want {
                return Err(DecodeError::malformed("inline payload length differs from size"));
            }
            Some(b.to_vec())
        } else {
            None
        };
        if tree && inline.is_some() {
            return Err(DecodeError::malformed("tree-tagged session with an inline payload"));
        }
        Ok(Announce {
            session,
            origin,
            info: SessionInfo { assignment, name, size, hash },
            frame_size,
            rate,
            report_port,
            encrypted,
            tree,
            targets,
            pass,
            inline,
        })
    }
}

/// How a data frame is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameTag {
    /// Tag over the whole datagram (optionally with an encrypted payload).
    Plain,
    /// Tag over the header and the payload's chaining value as the subtree of the file at this
    /// byte offset (`seq × frame_size`); `cv` when the sender already has it (computed when it
    /// hashed the file), else it is computed from the payload.
    Tree { offset: u64, cv: Option<[u8; 32]> },
}

/// Writes a data frame into `out` (replacing what it held): header, then `payload_len` bytes produced by
/// `fill`, then (when `cipher` is set) encryption, then the MAC tag. `fill` receives the exact
/// payload slice to fill, so a driver can read the file straight into the datagram buffer.
pub fn encode_data<E>(
    keys: &Keys,
    cipher: Option<&crate::keys::PayloadCipher>,
    tag: FrameTag,
    h: &DataHeader,
    out: &mut Vec<u8>,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut w = Writer::with_capacity(DATA_HEADER_LEN);
    header(&mut w, if matches!(tag, FrameTag::Tree { .. }) { KIND_DATA_TREE } else { KIND_DATA });
    w.u64(h.session).u64(h.assignment).u32(h.pass).u32(h.seq).u16(h.len);
    let extra = if cipher.is_some() { AEAD_TAG_LEN } else { 0 };
    // Resized, not cleared: a reused buffer keeps its bytes (every one is overwritten below),
    // so a sender does not zero each payload before reading the file into it.
    out.resize(DATA_HEADER_LEN + usize::from(h.len) + extra, 0);
    out[..DATA_HEADER_LEN].copy_from_slice(w.as_slice());
    fill(&mut out[DATA_HEADER_LEN..DATA_HEADER_LEN + usize::from(h.len)])?;
    match tag {
        FrameTag::Plain => {
            if let Some(c) = cipher {
                c.seal_in_place(h.seq, &mut out[DATA_HEADER_LEN..]);
            }
            keys.mac().seal(out);
        }
        FrameTag::Tree { offset, cv } => {
            debug_assert!(cipher.is_none(), "tree-tagged frames are never encrypted");
            let cv = cv.unwrap_or_else(|| crate::tree::frame_cv(offset, &out[DATA_HEADER_LEN..]));
            let t = keys.mac().tag(&tree_tag_body(&out[..DATA_HEADER_LEN], &cv));
            out.extend_from_slice(&t);
        }
    }
    Ok(())
}

/// What a tree-tagged frame's tag covers: its header, then its payload's chaining value.
fn tree_tag_body(header: &[u8], cv: &[u8; 32]) -> [u8; DATA_HEADER_LEN + 32] {
    let mut b = [0u8; DATA_HEADER_LEN + 32];
    b[..DATA_HEADER_LEN].copy_from_slice(header);
    b[DATA_HEADER_LEN..].copy_from_slice(cv);
    b
}

/// Appends the tree tag to `datagram` (a tree-tagged data frame's header and payload, without
/// a tag) as a sender of a session with `frame_size` frames would; false, leaving it unchanged,
/// when it is not laid out as one. For tests and the fuzz target (a sender uses [`encode_data`]).
pub fn seal_tree_data(keys: &Keys, datagram: &mut Vec<u8>, frame_size: u16) -> bool {
    let Some((kind, header)) = data_header_claim(datagram) else {
        return false;
    };
    let (seq, payload_len) = (header.seq, datagram.len() - DATA_HEADER_LEN);
    if kind != [MAGIC[0], MAGIC[1], VERSION, KIND_DATA_TREE]
        || payload_len == 0
        || payload_len > usize::from(frame_size)
        || !crate::tree::frame_size_fits_tree(frame_size)
    {
        return false;
    }
    let cv =
        crate::tree::frame_cv(u64::from(seq) * u64::from(frame_size), &datagram[DATA_HEADER_LEN..]);
    let t = keys.mac().tag(&tree_tag_body(&datagram[..DATA_HEADER_LEN], &cv));
    datagram.extend_from_slice(&t);
    true
}

/// The session id and sequence number of what claims to be a tree-tagged data frame. Nothing
/// is verified: the caller finds the session's frame size with them (and may skip a frame it
/// already holds without hashing it), then calls [`open_tree_data`].
pub fn tree_frame_claim(datagram: &[u8]) -> Option<(u64, u32)> {
    if datagram.len() < DATA_HEADER_LEN + cm_wire::mac::TAG_LEN {
        return None;
    }
    let (kind, header) = data_header_claim(datagram)?;
    (kind == [MAGIC[0], MAGIC[1], VERSION, KIND_DATA_TREE]).then_some((header.session, header.seq))
}

/// The first four bytes (magic, version, kind) and the data frame header of what claims to be a
/// data frame, read without verifying anything; `None` when it is shorter than a header.
fn data_header_claim(datagram: &[u8]) -> Option<([u8; 4], DataHeader)> {
    let mut r = Reader::new(datagram);
    let kind = r.array::<4>().ok()?;
    let header = DataHeader::decode(&mut r).ok()?;
    Some((kind, header))
}

/// A verified tree-tagged data frame: its header, where its payload lies in the datagram, and
/// the payload's chaining value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFrame {
    pub header: DataHeader,
    pub payload: std::ops::Range<usize>,
    pub cv: [u8; 32],
}

/// Verifies and decodes a tree-tagged data frame of a session whose frames are `frame_size`
/// bytes (a size that fits the tree). The payload is hashed only when its length is possible
/// for that frame size, so a forged length never reaches the hasher's preconditions.
pub fn open_tree_data(
    keys: &Keys,
    datagram: &[u8],
    frame_size: u16,
) -> Result<TreeFrame, WireError> {
    debug_assert!(crate::tree::frame_size_fits_tree(frame_size));
    if datagram.len() > MAX_DATAGRAM {
        return Err(WireError::Decode(DecodeError::malformed("datagram too long")));
    }
    let split = datagram.len().checked_sub(cm_wire::mac::TAG_LEN).ok_or(WireError::BadTag)?;
    let (body, tag) = datagram.split_at(split);
    let mut r = Reader::new(body);
    if r.array::<2>()? != MAGIC || r.u8()? != VERSION || r.u8()? != KIND_DATA_TREE {
        return Err(WireError::BadMagic);
    }
    let header = DataHeader::decode(&mut r)?;
    let payload = r.rest();
    if payload.len() != usize::from(header.len) || header.len == 0 || header.len > frame_size {
        // Unauthenticated: it could be a forgery as well as a bad layout.
        return Err(WireError::BadTag);
    }
    let offset = u64::from(header.seq) * u64::from(frame_size);
    let cv = crate::tree::frame_cv(offset, payload);
    if !keys.mac().verify(&tree_tag_body(&body[..DATA_HEADER_LEN], &cv), tag) {
        return Err(WireError::BadTag);
    }
    Ok(TreeFrame { header, payload: DATA_HEADER_LEN..split, cv })
}

impl Report {
    pub fn encode(&self, keys: &Keys) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        header(&mut w, KIND_REPORT);
        w.u64(self.session).u64(self.member).u32(self.round).u16(self.part).u16(self.parts);
        match &self.status {
            ReportStatus::Missing(runs) => {
                w.u8(0);
                runs_out(&mut w, runs);
            }
            ReportStatus::Complete => {
                w.u8(1);
            }
            ReportStatus::Failed(reason) => {
                let cut = truncate_utf8(reason, MAX_REASON);
                w.u8(2).str16("reason", cut).expect("reason truncated");
            }
            ReportStatus::Verifying => {
                w.u8(3);
            }
            ReportStatus::Gaps(runs) => {
                w.u8(4);
                runs_out(&mut w, runs);
            }
        }
        seal(keys, w)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let session = r.u64()?;
        let member = r.u64()?;
        let round = r.u32()?;
        let part = r.u16()?;
        let parts = r.u16()?;
        if parts == 0 || part >= parts {
            return Err(DecodeError::malformed("report part out of range"));
        }
        let status = match r.u8()? {
            0 => ReportStatus::Missing(runs_in(r, 1)?),
            1 => ReportStatus::Complete,
            2 => ReportStatus::Failed(r.str16(MAX_REASON)?.to_owned()),
            3 => ReportStatus::Verifying,
            4 => ReportStatus::Gaps(runs_in(r, 0)?),
            _ => return Err(DecodeError::malformed("unknown report status")),
        };
        Ok(Report { session, member, round, part, parts, status })
    }
}

fn runs_out(w: &mut Writer, runs: &[(u32, u32)]) {
    w.u16(u16::try_from(runs.len()).expect("runs bounded by MAX_RUNS_PER_REPORT"));
    for (first, count) in runs {
        w.u32(*first).u32(*count);
    }
}

/// At least `min` and at most [`MAX_RUNS_PER_REPORT`] runs, none empty or overflowing.
fn runs_in(r: &mut Reader<'_>, min: usize) -> Result<Vec<(u32, u32)>, DecodeError> {
    let n = usize::from(r.u16()?);
    if n < min || n > MAX_RUNS_PER_REPORT {
        return Err(DecodeError::malformed("run count out of range"));
    }
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let first = r.u32()?;
        let count = r.u32()?;
        if count == 0 || first.checked_add(count).is_none() {
            return Err(DecodeError::malformed("empty or overflowing run"));
        }
        runs.push((first, count));
    }
    Ok(runs)
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Solicit {
    pub fn encode(&self, keys: &Keys) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        header(&mut w, KIND_SOLICIT);
        w.u64(self.session).u32(self.round).u32(self.pass).u32(self.window_us);
        self.selector.encode(&mut w);
        seal(keys, w)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let session = r.u64()?;
        let round = r.u32()?;
        let pass = r.u32()?;
        let window_us = r.u32()?;
        let selector = Selector::decode(r)?;
        Ok(Solicit { session, round, pass, window_us, selector })
    }
}

impl Selector {
    /// `kind u8 (0 everyone, 1 only, 2 all but) | n u16 | n × id u64`; at most
    /// [`MAX_IDS_PER_SOLICIT`] ids.
    fn encode(&self, w: &mut Writer) {
        let (tag, ids): (u8, &[u64]) = match self {
            Selector::Everyone => (0, &[]),
            Selector::Only(ids) => (1, ids),
            Selector::AllBut(ids) => (2, ids),
        };
        w.u8(tag).u16(u16::try_from(ids.len()).expect("ids bounded by MAX_IDS_PER_SOLICIT"));
        for id in ids {
            w.u64(*id);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let tag = r.u8()?;
        let n = usize::from(r.u16()?);
        if n > MAX_IDS_PER_SOLICIT || (tag == 0 && n != 0) {
            return Err(DecodeError::malformed("member list length out of range"));
        }
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(r.u64()?);
        }
        match tag {
            0 => Ok(Selector::Everyone),
            1 => Ok(Selector::Only(ids)),
            2 => Ok(Selector::AllBut(ids)),
            _ => Err(DecodeError::malformed("unknown selector")),
        }
    }
}

impl Checkpoint {
    pub fn encode(&self, keys: &Keys) -> Vec<u8> {
        let mut w = Writer::with_capacity(48);
        header(&mut w, KIND_CHECKPOINT);
        w.u64(self.session)
            .u32(self.pass)
            .u32(self.checkpoint)
            .u32(self.from)
            .u32(self.upto)
            .u32(self.window_us);
        seal(keys, w)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let c = Checkpoint {
            session: r.u64()?,
            pass: r.u32()?,
            checkpoint: r.u32()?,
            from: r.u32()?,
            upto: r.u32()?,
            window_us: r.u32()?,
        };
        if c.from > c.upto {
            return Err(DecodeError::malformed("checkpoint window ends before it starts"));
        }
        Ok(c)
    }
}

fn seal(keys: &Keys, w: Writer) -> Vec<u8> {
    let mut v = w.into_vec();
    keys.mac().seal(&mut v);
    v
}

/// True when `datagram` claims to be an announcement (its plaintext header says so; nothing
/// is verified).
pub fn is_announce(datagram: &[u8]) -> bool {
    datagram.len() > 4
        && Reader::new(datagram)
            .array::<4>()
            .is_ok_and(|k| k == [MAGIC[0], MAGIC[1], VERSION, KIND_ANNOUNCE])
}

/// Verifies the tag, then decodes. The payload of a data frame is returned as it is on the wire.
pub fn open<'a>(keys: &Keys, datagram: &'a [u8]) -> Result<Message<'a>, WireError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(WireError::Decode(DecodeError::malformed("datagram too long")));
    }
    let body = keys.mac().open(datagram).ok_or(WireError::BadTag)?;
    decode_body(body)
}

/// Decodes an already-authenticated body (public for the fuzz target and tests).
pub fn decode_body(body: &[u8]) -> Result<Message<'_>, WireError> {
    let mut r = Reader::new(body);
    if r.array::<2>()? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let msg = match r.u8()? {
        KIND_ANNOUNCE => Message::Announce(Announce::decode(&mut r)?),
        KIND_DATA => {
            let h = DataHeader::decode(&mut r)?;
            let payload = r.rest();
            let extra = payload.len().checked_sub(usize::from(h.len));
            if !matches!(extra, Some(0) | Some(AEAD_TAG_LEN)) {
                return Err(WireError::Decode(DecodeError::malformed(
                    "payload length differs from header",
                )));
            }
            r.bytes(payload.len())?;
            Message::Data(h, payload)
        }
        KIND_REPORT => Message::Report(Report::decode(&mut r)?),
        KIND_SOLICIT => Message::Solicit(Solicit::decode(&mut r)?),
        KIND_CHECKPOINT => Message::Checkpoint(Checkpoint::decode(&mut r)?),
        KIND_CODED => {
            let (h, payload) = CodedHeader::decode(&mut r)?;
            Message::Coded(h, payload)
        }
        k => return Err(WireError::UnknownKind(k)),
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::derive(b"test cluster")
    }

    fn arb_info() -> impl Strategy<Value = SessionInfo> {
        // Sizes up to the product's 4 GiB ceiling: at the smallest frame size that is 2^26 frames,
        // well inside the u32 sequence space the decoder enforces.
        (any::<u64>(), "[a-z/._-]{0,40}", 0u64..=1 << 32, any::<[u8; 32]>())
            .prop_map(|(assignment, name, size, hash)| SessionInfo { assignment, name, size, hash })
    }

    proptest! {
        #[test]
        fn announce_round_trips(session: u64, origin in any::<(u64, u64, u64)>().prop_map(|(node, incarnation, sequence)| Origin { node, incarnation, sequence }), info in arb_info(), fs in prop_oneof![MIN_FRAME_SIZE..=MAX_FRAME_SIZE, (0u32..6).prop_map(|k| 1024u16 << k)], rate: u64, port: u16, pass: u32, enc: bool, tree: bool, ids in proptest::collection::vec(any::<u64>(), 0..MAX_IDS_PER_SOLICIT), which in 0u8..3) {
            let tree = tree && !enc && crate::tree::frame_size_fits_tree(fs) && info.size > u64::from(fs);
            let targets = match which % 3 { 0 => Selector::Everyone, 1 => Selector::Only(ids), _ => Selector::AllBut(ids) };
            let a = Announce { session, origin, info, frame_size: fs, rate, report_port: port, encrypted: enc, tree, targets, pass, inline: None };
            let bytes = a.encode(&keys());
            prop_assert_eq!(open(&keys(), &bytes).unwrap(), Message::Announce(a));
        }

        #[test]
        fn report_round_trips(session: u64, member: u64, round: u32, parts in 1u16..5, status in prop_oneof![
            Just(ReportStatus::Complete),
            Just(ReportStatus::Verifying),
            "[ -~]{0,60}".prop_map(ReportStatus::Failed),
            proptest::collection::vec((0u32..1 << 30, 1u32..1000), 1..MAX_RUNS_PER_REPORT).prop_map(ReportStatus::Missing),
            proptest::collection::vec((0u32..1 << 30, 1u32..1000), 0..MAX_RUNS_PER_REPORT).prop_map(ReportStatus::Gaps),
        ]) {
            let r = Report { session, member, round, part: parts - 1, parts, status };
            let bytes = r.encode(&keys());
            prop_assert_eq!(open(&keys(), &bytes).unwrap(), Message::Report(r));
        }

        #[test]
        fn solicit_round_trips(session: u64, round: u32, pass: u32, window_us: u32, ids in proptest::collection::vec(any::<u64>(), 0..MAX_IDS_PER_SOLICIT), which in 0..3) {
            let selector = match which { 0 => Selector::Everyone, 1 => Selector::Only(ids), _ => Selector::AllBut(ids) };
            let s = Solicit { session, round, pass, window_us, selector };
            let bytes = s.encode(&keys());
            prop_assert_eq!(open(&keys(), &bytes).unwrap(), Message::Solicit(s));
        }

        #[test]
        fn checkpoint_round_trips(session: u64, pass: u32, checkpoint: u32, a: u32, b: u32, window_us: u32) {
            let c = Checkpoint { session, pass, checkpoint, from: a.min(b), upto: a.max(b), window_us };
            let bytes = c.encode(&keys());
            prop_assert_eq!(open(&keys(), &bytes).unwrap(), Message::Checkpoint(c));
            // Flipping any bit breaks the tag.
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << (i % 8);
                prop_assert_eq!(open(&keys(), &bad), Err(WireError::BadTag));
            }
        }

        #[test]
        fn data_round_trips(session: u64, assignment: u64, pass: u32, seq: u32, payload in proptest::collection::vec(any::<u8>(), 0..2000), enc: bool) {
            let k = keys();
            let cipher = k.payload_cipher(session, assignment, &[1; 32]);
            let h = DataHeader { session, assignment, pass, seq, len: payload.len() as u16 };
            let mut out = Vec::new();
            encode_data::<()>(&k, enc.then_some(&cipher), FrameTag::Plain, &h, &mut out, |b| { b.copy_from_slice(&payload); Ok(()) }).unwrap();
            let Message::Data(h2, p) = open(&k, &out).unwrap() else { panic!("not data") };
            prop_assert_eq!(h2, h);
            if enc {
                let mut p = p.to_vec();
                prop_assert_eq!(cipher.open_in_place(seq, &mut p).unwrap(), payload.as_slice());
            } else {
                prop_assert_eq!(p, payload.as_slice());
            }
        }

        #[test]
        fn tree_data_round_trips(session: u64, assignment: u64, pass: u32, seq in 0u32..1 << 20, shift in 0u32..5, len_cut in 0usize..2000, byte: u8) {
            let fs = 1024u16 << shift;
            let len = usize::from(fs).saturating_sub(len_cut).max(1);
            let payload = vec![byte; len];
            let k = keys();
            let h = DataHeader { session, assignment, pass, seq, len: len as u16 };
            let offset = u64::from(seq) * u64::from(fs);
            let mut out = Vec::new();
            encode_data::<()>(&k, None, FrameTag::Tree { offset, cv: None }, &h, &mut out, |b| { b.copy_from_slice(&payload); Ok(()) }).unwrap();
            prop_assert_eq!(tree_frame_claim(&out), Some((session, seq)));
            let f = open_tree_data(&k, &out, fs).unwrap();
            prop_assert_eq!(f.header, h);
            prop_assert_eq!(&out[f.payload.clone()], payload.as_slice());
            prop_assert_eq!(f.cv, crate::tree::frame_cv(offset, &payload));
            let mut resealed = out[..out.len() - cm_wire::mac::TAG_LEN].to_vec();
            prop_assert!(seal_tree_data(&k, &mut resealed, fs));
            prop_assert_eq!(&resealed, &out);
            // The generic opener refuses it (its tag is not over the datagram), another frame
            // size (another offset) or key refuses it, and so does any flipped bit.
            prop_assert_eq!(open(&k, &out), Err(WireError::BadTag));
            prop_assert!(open_tree_data(&Keys::derive(b"other"), &out, fs).is_err());
            if seq > 0 {
                prop_assert!(open_tree_data(&k, &out, fs.checked_mul(2).unwrap_or(1024)).is_err());
            }
            for i in (0..out.len()).step_by(7) {
                let mut bad = out.clone();
                bad[i] ^= 1 << (i % 8);
                prop_assert!(open_tree_data(&k, &bad, fs).is_err(), "bit flipped at {}", i);
            }
        }

        #[test]
        fn coded_round_trips(session: u64, assignment: u64, pass: u32, mut seqs in proptest::collection::btree_set(any::<u32>(), 2..=MAX_CODED), payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let seqs: Vec<u32> = std::mem::take(&mut seqs).into_iter().collect();
            let h = CodedHeader { session, assignment, pass, seqs, len: payload.len() as u16 };
            let mut out = vec![9; 5];
            encode_coded::<()>(&keys(), &h, &mut out, |b| { b.copy_from_slice(&payload); Ok(()) }).unwrap();
            prop_assert_eq!(out.len(), payload.len() + coded_overhead(h.seqs.len()));
            prop_assert_eq!(open(&keys(), &out).unwrap(), Message::Coded(h.clone(), &payload));
            let (claimed, seqs) = coded_claim(&out).unwrap();
            prop_assert_eq!(claimed, session);
            prop_assert_eq!(seqs.collect::<Vec<_>>(), h.seqs.clone());
            let mut bad = out.clone();
            let i = out.len() / 2;
            bad[i] ^= 0x10;
            prop_assert_eq!(open(&keys(), &bad), Err(WireError::BadTag));
        }

        #[test]
        fn arbitrary_tree_frames_never_panic(body in proptest::collection::vec(any::<u8>(), 0..3000), shift in 0u32..5) {
            let mut d = [&MAGIC[..], &[VERSION, KIND_DATA_TREE]].concat();
            d.extend_from_slice(&body);
            prop_assert!(open_tree_data(&keys(), &d, 1024 << shift).is_err());
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_body(&body);
            let mut with_magic = [&MAGIC[..], &[VERSION]].concat();
            with_magic.extend_from_slice(&body);
            let _ = decode_body(&with_magic);
        }
    }

    #[test]
    fn foreign_key_and_truncation_are_rejected() {
        let s =
            Solicit { session: 1, round: 2, pass: 3, window_us: 9, selector: Selector::Everyone }
                .encode(&keys());
        assert_eq!(open(&Keys::derive(b"other"), &s), Err(WireError::BadTag));
        assert_eq!(open(&keys(), &s[..s.len() - 1]), Err(WireError::BadTag));
        assert_eq!(open(&keys(), &[]), Err(WireError::BadTag));
    }
}
