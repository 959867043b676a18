//! The group leader's side of a session: announce, paced passes, NACK aggregation, rate
//! control, report solicitation, quorum and the final report.
//!
//! Flow: a few announcements (members that already hold the content answer "complete"), then
//! pass 1 sends every frame at the current rate and ends with a solicitation. Members answer
//! after a random delay with their missing runs. The union of those runs is the next pass
//! (NACK aggregation). When nothing is left to resend but reports are missing, the GL asks
//! again: unicast to a few, else one multicast list (whichever is shorter: the members it
//! lacks, or the members it has). It stops when every participant is complete, or when neither
//! the complete count nor the missing-frame count improved for `stall_limit` rounds and `stall_time`; then it
//! reports success with a quorum or a problem naming who misses what.
//!
//! The sender never holds the assignment: it asks its driver for frame bytes by offset
//! ([`Transmit::Frame`] then [`Sender::encode_frame`]).

use crate::frameset::FrameSet;
use crate::keys::{Keys, PayloadCipher};
use crate::time::Time;
use crate::wire::{
    self, Announce, Checkpoint, CodedHeader, DataHeader, Message, Report, ReportStatus, Selector,
    SessionInfo, Solicit,
};
use crate::{DropCounts, MemberId};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;

/// Tunables of a sending group leader.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The data channel (multicast group and port).
    pub group: SocketAddr,
    /// Where members send reports (a port on the GL's address).
    pub report_port: u16,
    /// Payload bytes per frame.
    pub frame_size: u16,
    /// Starting rate, bytes per second of datagrams.
    pub initial_rate: u64,
    /// The rate never exceeds this cap...
    pub max_rate: u64,
    /// ...and never falls below this floor.
    pub min_rate: u64,
    /// Encrypt frame payloads (ChaCha20-Poly1305) in addition to authenticating them.
    pub encrypt: bool,
    /// Tree-tag the frames (see [`crate::tree`]) when the session allows it: not encrypted, a
    /// power-of-two frame size of at least 1 KiB, more than one frame. Members then hash each
    /// payload once instead of twice. Off only to compare or to test the plain tags.
    pub tree_tags: bool,
    /// Repair with coded frames where it helps: one datagram carrying the XOR of frames that
    /// different members lack (each lacking one of them and holding the others), so members
    /// losing different frames are repaired together. Plaintext sessions with at most
    /// [`MAX_CODED_PEERS`] members (the GL keeps each member's gaps).
    pub coded_repairs: bool,
    /// Members the session is not for (a run for some servers of the segment): the
    /// announcement names them and they ignore the session, no file and no report. Anyone
    /// else on the channel may join, members that registered late included. A list longer than
    /// one datagram holds ([`wire::MAX_IDS_PER_SOLICIT`]) is not announced (those members
    /// then receive the session and must skip it themselves).
    pub not_for: Vec<MemberId>,
    /// Announcements sent before pass 1, `announce_interval` apart. The interval is short (a
    /// LAN's round trip is well under a millisecond): members that already hold the content
    /// answer within it, and every session's first frame waits `(count − 1) × interval`.
    pub announce_count: u32,
    pub announce_interval: Duration,
    /// The announcement is repeated this often during the session, for members that join late.
    pub reannounce_interval: Duration,
    /// Members spread their reports over `report_slot × participants`, capped at
    /// `max_report_window` (the seed: "up to approximately one second").
    pub report_slot: Duration,
    pub max_report_window: Duration,
    /// Extra wait after the report window for datagrams in flight.
    pub report_grace: Duration,
    /// Ask missing members by unicast when there are at most this many; else one multicast.
    pub unicast_solicit_max: usize,
    /// Rounds without progress before giving up (the seed's "ten tries")...
    pub stall_limit: u32,
    /// ...and at least this long without progress: ten quick rounds can pass while a member
    /// restarts, or while an unlucky member misses a frame or an announcement ten times.
    pub stall_time: Duration,
    /// Hard cap on rounds, whatever happens.
    pub max_rounds: u32,
    /// Complete members needed for success when some never complete (`None`: all expected).
    pub quorum: Option<usize>,
    /// Wait for at least this many complete participants (known or not), for senders that do
    /// not know their members by id (the CLI's `--expect`).
    pub min_participants: usize,
    /// Pacing burst: up to this much sending time may go out back to back.
    pub burst: Duration,
    /// Mid-pass feedback: after this many payload bytes of a pass the GL sends a checkpoint;
    /// members answer with the window's gaps, which are repaired at once, and the rate follows
    /// their answers. 0 turns checkpoints off (feedback only at the end of each pass).
    pub checkpoint_bytes: u64,
    /// ...or after this long, whichever comes first (so the feedback loop keeps its pace when
    /// the rate is low).
    pub checkpoint_interval: Duration,
    /// A member whose last checkpoint answer is this many payload bytes behind the sender is
    /// falling behind (its socket buffer fills): the rate goes down before it overflows. About
    /// a third of the members' socket buffer (the driver's is 32 MiB).
    pub max_lag_bytes: u64,
}

impl SenderConfig {
    /// Whether a session of `size` bytes under this configuration sends tree-tagged frames.
    pub fn tree_tagged(&self, size: u64) -> bool {
        self.tree_tags
            && !self.encrypt
            && size > u64::from(self.frame_size)
            && crate::tree::frame_size_fits_tree(self.frame_size)
    }

    pub fn new(group: SocketAddr, report_port: u16) -> Self {
        SenderConfig {
            group,
            report_port,
            frame_size: 1400,
            initial_rate: 50_000_000,
            max_rate: 125_000_000,
            min_rate: 500_000,
            encrypt: false,
            tree_tags: true,
            coded_repairs: true,
            not_for: Vec::new(),
            announce_count: 3,
            announce_interval: Duration::from_millis(5),
            reannounce_interval: Duration::from_millis(500),
            report_slot: Duration::from_millis(2),
            max_report_window: Duration::from_secs(1),
            report_grace: Duration::from_millis(30),
            unicast_solicit_max: 4,
            stall_limit: 10,
            stall_time: Duration::from_secs(5),
            max_rounds: 500,
            quorum: None,
            min_participants: 0,
            burst: Duration::from_millis(2),
            checkpoint_bytes: 2 << 20,
            checkpoint_interval: Duration::from_millis(20),
            max_lag_bytes: 12 << 20,
        }
    }
}

/// Why a sender could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SenderError {
    #[error("frame size {0} outside {min}..={max}", min = wire::MIN_FRAME_SIZE, max = wire::MAX_FRAME_SIZE)]
    FrameSize(u16),
    #[error("assignment of {0} bytes needs more than 2^32 frames")]
    TooLarge(u64),
    #[error("assignment name longer than {} bytes", wire::MAX_NAME)]
    NameTooLong,
    #[error("inline payload given for {given} bytes but the assignment is {size} bytes")]
    InlineMismatch { given: usize, size: u64 },
    #[error("assignment of {0} bytes fits one datagram: pass its bytes as the inline payload")]
    InlineMissing(u64),
    #[error("rates must satisfy 0 < min_rate <= initial_rate <= max_rate")]
    Rates,
}

/// A member the GL expects, from election registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: MemberId,
    /// Set for a member that cannot receive multicast: it gets every datagram of the session by
    /// unicast to this address.
    pub unicast: Option<SocketAddr>,
}

/// Where a transmit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The group, and every unicast-only member ([`Sender::everyone`]).
    Everyone,
    /// One member.
    To(SocketAddr),
}

/// A frame for the driver to fill with `len` bytes of the assignment at `offset`, via
/// [`Sender::encode_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRequest {
    pub header: DataHeader,
    pub offset: u64,
}

/// One datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    Control {
        dest: Dest,
        bytes: Vec<u8>,
    },
    Frame {
        dest: Dest,
        frame: FrameRequest,
    },
    /// A coded repair, for the driver to fill via [`Sender::encode_coded`].
    Coded {
        dest: Dest,
        coded: CodedRequest,
    },
}

/// A coded repair: the XOR of several frames, each `(offset, len)` of the assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodedRequest {
    pub header: CodedHeader,
    pub parts: Vec<(u64, u16)>,
}

/// A member's state in the final report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberStatus {
    NoReport,
    Missing {
        frames: u64,
    },
    /// Holds every frame and was still checking the hash when last heard.
    Verifying,
    Failed(String),
    Complete,
}

/// How the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every participant holds the verified assignment.
    Complete,
    /// Progress stopped, but at least the quorum is complete.
    QuorumMet,
    /// Progress stopped short of the quorum: report a problem upward.
    Problem,
}

/// The comprehensive report the GL sends upward (to the manager).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    pub session: u64,
    pub assignment: u64,
    pub outcome: Outcome,
    pub complete: Vec<MemberId>,
    /// Every participant not complete, with what it lacks.
    pub incomplete: Vec<(MemberId, MemberStatus)>,
    pub passes: u32,
    pub rounds: u32,
}

/// What the sender tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// A new participant (not in the expected list) reported.
    Joined(MemberId),
    Finished(SessionReport),
}

/// Counters for the benchmark and operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderStats {
    pub frames_sent: u64,
    pub payload_bytes_sent: u64,
    pub control_datagrams: u64,
    pub reports: u64,
    pub passes: u32,
    pub rounds: u32,
    /// Checkpoints sent (mid-pass feedback requests).
    pub checkpoints: u32,
    /// Frames resent during a pass because a checkpoint answer named them.
    pub repairs: u64,
    /// Coded repairs sent, and the frames they carried (each usable by the members lacking it).
    pub coded: u64,
    pub coded_frames: u64,
    pub dropped: DropCounts,
}

#[derive(Debug, Clone)]
struct Peer {
    expected: bool,
    unicast_only: Option<SocketAddr>,
    /// Last address a report came from.
    addr: Option<SocketAddr>,
    status: MemberStatus,
    heard_round: u32,
    /// Latest checkpoint this member answered.
    acked_checkpoint: Option<u32>,
    /// When its recent checkpoint answers arrived, with the pass's payload bytes sent at each
    /// checkpoint: how fast this member really takes in data (newest last).
    answers: VecDeque<(Time, u64)>,
    /// Frames it said it lacks that were not sent since (for coded repairs; created at its
    /// first gap, dropped when it completes).
    missing: Option<FrameSet>,
}

/// Checkpoint answers a member's intake rate is measured over (a few, so the random answer
/// delay averages out).
const INTAKE_SAMPLES: usize = 8;

/// Coded repairs only with at most this many members (the GL keeps one bit per frame for each).
pub const MAX_CODED_PEERS: usize = 256;
/// How long named repairs wait for other members' answers before going out (coded repairs:
/// a checkpoint's answers come within its window of at most 3 ms).
const REPAIR_HOLD: Duration = Duration::from_millis(4);
/// Frames owed that are looked at, after the first, for a coded repair's other frames.
const CODED_LOOKAHEAD: u32 = 64;

impl Peer {
    fn new(expected: bool, unicast: Option<SocketAddr>) -> Self {
        Peer {
            expected,
            unicast_only: unicast,
            addr: unicast,
            status: MemberStatus::NoReport,
            heard_round: 0,
            acked_checkpoint: None,
            answers: VecDeque::new(),
            missing: None,
        }
    }

    /// Payload bytes per second this member took in over its recent checkpoint answers.
    fn intake(&self) -> Option<f64> {
        let (&(t0, s0), &(t1, s1)) = (self.answers.front()?, self.answers.back()?);
        let secs = t1.saturating_since(t0).as_secs_f64();
        (self.answers.len() >= 3 && secs > 0.0 && s1 > s0).then(|| (s1 - s0) as f64 / secs)
    }
}

/// A checkpoint of the current pass, kept while its answers may still come.
#[derive(Debug, Clone)]
struct CheckpointLog {
    number: u32,
    /// Payload bytes of the pass sent when it went out.
    sent_at: u64,
    /// Frames in its window.
    frames: u32,
    /// Per member that answered: its gap frames (parts add up) and the new frames its answer
    /// covers — this window's, plus those of earlier windows it had not answered yet (a
    /// member that falls behind answers several checkpoints with one report).
    gaps: BTreeMap<MemberId, (u32, u32)>,
}

/// Fewest new frames in a window that a checkpoint's interval alone may close. The gap share
/// of a window of a few frames is noise (one lost frame of two is 50 %), and the worst of many
/// members' noisy shares would cut the rate, shrinking the windows further, down to the floor.
const MIN_WINDOW_FRAMES: u32 = 128;

/// Checkpoints remembered per pass (older answers only count for repairs).
const CHECKPOINT_LOG: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Announcing { left: u32, next: Time },
    Sending,
    Collecting { until: Time },
    Done,
}

/// The sending state machine of one session.
pub struct Sender {
    cfg: SenderConfig,
    keys: Keys,
    cipher: Option<PayloadCipher>,
    announce: Announce,
    frames: u32,
    peers: BTreeMap<MemberId, Peer>,
    everyone: Vec<SocketAddr>,
    phase: Phase,
    pass: u32,
    round: u32,
    to_send: FrameSet,
    cursor: u32,
    sent_this_pass: u32,
    /// Extra times the current pass goes through its frames (tail redundancy).
    repeats_left: u32,
    nacks: FrameSet,
    rate: u64,
    /// Mid-pass feedback: next checkpoint number, start of its window, payload bytes since the
    /// last one and in the whole pass, the recent checkpoints, and the worst gap share and lag
    /// heard since the rate was last adapted.
    checkpoint: u32,
    pass_first_checkpoint: u32,
    window_from: u32,
    window_bytes: u64,
    /// New frames (not repairs) sent in the current window.
    window_frames: u32,
    window_started: Time,
    pass_bytes: u64,
    checkpoints: VecDeque<CheckpointLog>,
    worst_share: Option<f64>,
    /// A checkpoint answer came since the rate was last adapted.
    answered: bool,
    /// Frames named by checkpoint answers, sent before the pass goes on.
    repairs: FrameSet,
    /// When `repairs` last became non-empty.
    repairs_since: Option<Time>,
    next_send: Time,
    next_announce: Time,
    /// Every frame's chaining value when the driver provided them (tree-tagged sessions).
    frame_cvs: Vec<[u8; 32]>,
    stall: u32,
    /// When the complete or missing count last improved (or a member said it was verifying).
    progress_at: Time,
    /// Consecutive rounds without progress, including those excused because a member was
    /// verifying: it paces the asking-again backoff.
    idle: u32,
    prev_complete: usize,
    prev_missing: u64,
    queue: VecDeque<Transmit>,
    events: VecDeque<SenderEvent>,
    stats: SenderStats,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("session", &self.announce.session)
            .field("phase", &self.phase)
            .field("pass", &self.pass)
            .finish()
    }
}

impl Sender {
    /// A session sending `info` to `members`. `inline` must hold the whole assignment when it
    /// fits in one frame (then it rides in the announcement), and be `None` otherwise.
    pub fn new(
        now: Time,
        cfg: SenderConfig,
        keys: Keys,
        mut rng: ChaCha8Rng,
        info: SessionInfo,
        members: &[Member],
        inline: Option<&[u8]>,
    ) -> Result<Self, SenderError> {
        if !(wire::MIN_FRAME_SIZE..=wire::MAX_FRAME_SIZE).contains(&cfg.frame_size) {
            return Err(SenderError::FrameSize(cfg.frame_size));
        }
        if info.name.len() > wire::MAX_NAME {
            return Err(SenderError::NameTooLong);
        }
        if !(0 < cfg.min_rate
            && cfg.min_rate <= cfg.initial_rate
            && cfg.initial_rate <= cfg.max_rate)
        {
            return Err(SenderError::Rates);
        }
        let fits = info.size <= u64::from(cfg.frame_size);
        match inline {
            Some(b) if b.len() as u64 != info.size || !fits => {
                return Err(SenderError::InlineMismatch { given: b.len(), size: info.size });
            }
            None if fits => return Err(SenderError::InlineMissing(info.size)),
            _ => {}
        }
        let frames = if fits {
            0
        } else {
            wire::frame_count(info.size, cfg.frame_size).ok_or(SenderError::TooLarge(info.size))?
        };
        let session = rng.random::<u64>();
        let cipher = cfg.encrypt.then(|| keys.payload_cipher(session, info.assignment, &info.hash));
        let inline = inline.map(|b| {
            let mut v = b.to_vec();
            if let Some(c) = &cipher {
                v.resize(b.len() + crate::keys::AEAD_TAG_LEN, 0);
                c.seal_in_place(0, &mut v);
            }
            v
        });
        let size = info.size;
        let targets = if !cfg.not_for.is_empty() && cfg.not_for.len() <= wire::MAX_IDS_PER_SOLICIT {
            Selector::AllBut(cfg.not_for.clone())
        } else {
            Selector::Everyone
        };
        let mut announce = Announce {
            session,
            info,
            frame_size: cfg.frame_size,
            rate: cfg.initial_rate,
            report_port: cfg.report_port,
            encrypted: cfg.encrypt,
            tree: cfg.tree_tagged(size),
            targets,
            pass: 0,
            inline,
        };
        if announce.encode(&keys).len() > wire::MAX_DATAGRAM {
            // A large inline payload leaves no room for the list.
            announce.targets = Selector::Everyone;
        }
        let mut peers = BTreeMap::new();
        let mut everyone = vec![cfg.group];
        for m in members {
            if let Some(a) = m.unicast {
                everyone.push(a);
            }
            peers.insert(m.id, Peer::new(true, m.unicast));
        }
        let rate = cfg.initial_rate;
        Ok(Sender {
            phase: Phase::Announcing { left: cfg.announce_count.max(1), next: now },
            cfg,
            keys,
            cipher,
            announce,
            frames,
            peers,
            everyone,
            pass: 0,
            round: 0,
            to_send: FrameSet::new(frames),
            cursor: 0,
            sent_this_pass: 0,
            repeats_left: 0,
            nacks: FrameSet::new(frames),
            rate,
            checkpoint: 0,
            pass_first_checkpoint: 0,
            window_from: 0,
            window_bytes: 0,
            window_frames: 0,
            window_started: now,
            pass_bytes: 0,
            checkpoints: VecDeque::new(),
            worst_share: None,
            answered: false,
            repairs: FrameSet::new(frames),
            repairs_since: None,
            next_send: now,
            next_announce: now,
            frame_cvs: Vec::new(),
            stall: 0,
            progress_at: now,
            idle: 0,
            prev_complete: 0,
            prev_missing: u64::MAX,
            queue: VecDeque::new(),
            events: VecDeque::new(),
            stats: SenderStats::default(),
        })
    }

    pub fn session(&self) -> u64 {
        self.announce.session
    }

    /// Frames in the session (0 when the assignment rides inline in the announcement).
    pub fn frame_count(&self) -> u32 {
        self.frames
    }

    /// Current sending rate, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Destinations of [`Dest::Everyone`]: the group, then every unicast-only member.
    pub fn everyone(&self) -> &[SocketAddr] {
        &self.everyone
    }

    /// The sealed announcement, for the election heartbeat to carry as an opaque payload. A
    /// member hands it to [`crate::Receiver::handle_datagram`] like any MCTP datagram.
    pub fn announcement(&self) -> Vec<u8> {
        let mut a = self.announce.clone();
        a.pass = self.pass;
        a.rate = self.rate;
        a.encode(&self.keys)
    }

    /// Replaces the expected member list (from election registration). Members already heard
    /// keep their state; a member dropped from the list stays a participant only if it reported.
    pub fn set_members(&mut self, members: &[Member]) {
        for p in self.peers.values_mut() {
            p.expected = false;
        }
        for m in members {
            let p = self.peers.entry(m.id).or_insert_with(|| Peer::new(true, None));
            p.expected = true;
            p.unicast_only = m.unicast;
            if m.unicast.is_some() {
                p.addr = m.unicast;
            }
        }
        self.peers.retain(|_, p| p.expected || p.status != MemberStatus::NoReport);
        self.everyone.truncate(1);
        self.everyone.extend(self.peers.values().filter_map(|p| p.unicast_only));
    }

    /// Fills `out` with the datagram for a coded repair; `read` receives each frame's offset and
    /// a slice of its exact length to read it into.
    pub fn encode_coded<E>(
        &self,
        coded: &CodedRequest,
        out: &mut Vec<u8>,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        wire::encode_coded(&self.keys, &coded.header, out, |payload| {
            let mut frame = vec![0u8; payload.len()];
            for &(offset, len) in &coded.parts {
                let part = &mut frame[..usize::from(len)];
                read(offset, part)?;
                payload.iter_mut().zip(part.iter()).for_each(|(p, b)| *p ^= b);
            }
            Ok(())
        })
    }

    /// Fills `out` with the datagram for `frame`; `fill` receives the payload slice to read the
    /// assignment's bytes into (at `frame.offset`, exactly `frame.header.len` bytes).
    pub fn encode_frame<E>(
        &self,
        frame: &FrameRequest,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let tag = if self.announce.tree {
            wire::FrameTag::Tree {
                offset: frame.offset,
                cv: self.frame_cvs.get(frame.header.seq as usize).copied(),
            }
        } else {
            wire::FrameTag::Plain
        };
        wire::encode_data(&self.keys, self.cipher.as_ref(), tag, &frame.header, out, fill)
    }

    /// Hands over every frame's chaining value, computed when the driver hashed the file
    /// ([`crate::tree::hash_frames`]), so tagging a frame no longer hashes its payload. Refused
    /// (false) unless the session is tree-tagged and there is one per frame. The driver must
    /// send the same bytes it hashed: a frame whose content changed since fails its tag at
    /// every member and the session ends with a problem report.
    pub fn set_frame_cvs(&mut self, cvs: Vec<[u8; 32]>) -> bool {
        let ok = self.announce.tree && cvs.len() == self.frames as usize;
        if ok {
            self.frame_cvs = cvs;
        }
        ok
    }

    /// Appends chaining values of frames `first..` as a helper computes them ahead of the
    /// sending (the driver's choice when it knows the file's BLAKE3 and so skipped hashing it
    /// first). Frames without one yet are hashed as they are tagged. Refused (false) unless the
    /// session is tree-tagged and `first` continues what was given, within the frame count.
    pub fn extend_frame_cvs(&mut self, first: u32, cvs: &[[u8; 32]]) -> bool {
        let ok = self.announce.tree
            && first as usize == self.frame_cvs.len()
            && self.frame_cvs.len() + cvs.len() <= self.frames as usize;
        if ok {
            self.frame_cvs.extend_from_slice(cvs);
        }
        ok
    }

    /// When the driver should call [`Sender::handle_timeout`] or [`Sender::poll_transmit`] next.
    pub fn poll_timeout(&self) -> Option<Time> {
        let phase = match self.phase {
            Phase::Done => return None,
            Phase::Announcing { next, .. } => next,
            Phase::Sending => self.next_send - self.cfg.burst,
            Phase::Collecting { until } => until,
        };
        Some(phase.min(self.next_announce))
    }

    pub fn handle_timeout(&mut self, now: Time) {
        if self.phase == Phase::Done {
            return;
        }
        if now >= self.next_announce {
            self.announce_now(now);
        }
        match self.phase {
            Phase::Announcing { left, next } if now >= next => {
                if left > 1 {
                    // The re-announce above covered this one.
                    self.phase = Phase::Announcing {
                        left: left - 1,
                        next: now + self.cfg.announce_interval,
                    };
                    self.next_announce = now + self.cfg.announce_interval;
                } else if self.all_done() && self.pass_needed_done() {
                    self.finish(Outcome::Complete);
                } else if self.frames == 0 {
                    // Inline: the announcements were the pass; collect reports.
                    self.pass = 1;
                    self.stats.passes = 1;
                    self.solicit_end_of_pass(now);
                } else {
                    let all = FrameSet::full(self.frames);
                    self.start_pass(now, all);
                }
            }
            Phase::Collecting { until } if now >= until => self.end_round(now),
            _ => {}
        }
    }

    /// The next datagram to send, if any is due at `now`.
    pub fn poll_transmit(&mut self, now: Time) -> Option<Transmit> {
        if let Some(t) = self.queue.pop_front() {
            return Some(t);
        }
        if self.phase != Phase::Sending || now < self.next_send - self.cfg.burst {
            return None;
        }
        // Repairs named by checkpoint answers go first: they are the oldest frames owed. With
        // coded repairs they wait a moment after the first of them was named, so the answers
        // to one checkpoint (from different members, within its few-millisecond window) can be
        // combined; once the pass has no new frame left they go at once.
        let repairs_due = self.repairs_since.is_some_and(|t| {
            let pass_done =
                self.repeats_left == 0 && self.to_send.next_present(self.cursor).is_none();
            !self.coding() || now >= t + REPAIR_HOLD || pass_done
        });
        let (seq, from_repairs) =
            if let Some(seq) = self.repairs.next_present(0).filter(|_| repairs_due) {
                self.repairs.remove(seq);
                self.stats.repairs += 1;
                (seq, true)
            } else {
                let next = match self.to_send.next_present(self.cursor) {
                    None if self.repeats_left > 0 => {
                        self.repeats_left -= 1;
                        self.window_from = 0;
                        self.to_send.next_present(0)
                    }
                    n => n,
                };
                let Some(seq) = next else {
                    self.solicit_end_of_pass(now);
                    return self.queue.pop_front();
                };
                self.cursor = seq + 1;
                self.window_frames += 1;
                (seq, false)
            };
        self.sent_this_pass += 1;
        let fs = u64::from(self.cfg.frame_size);
        let size = self.announce.info.size;
        let frame_len = move |seq: u32| (size - u64::from(seq) * fs).min(fs) as u16;
        // A repair (or any frame of a later pass) may go out combined with others owed to
        // other members.
        let combo = if (from_repairs || self.pass >= 2) && self.coding() {
            let combo =
                self.coded_combo(seq, if from_repairs { &self.repairs } else { &self.to_send });
            for &c in &combo[1..] {
                if from_repairs {
                    self.repairs.remove(c);
                    self.stats.repairs += 1;
                } else {
                    self.to_send.remove(c);
                }
            }
            self.sent_to_all(&combo);
            Some(combo).filter(|c| c.len() > 1)
        } else {
            None
        };
        if self.repairs.is_empty() {
            self.repairs_since = None;
        }
        let offset = u64::from(seq) * fs;
        let len = match &combo {
            Some(c) => c.iter().map(|s| frame_len(*s)).max().unwrap_or(0),
            None => frame_len(seq),
        };
        let wire_len = u64::from(len)
            + combo.as_ref().map_or(wire::DATA_OVERHEAD, |c| wire::coded_overhead(c.len())) as u64;
        // Pacing: never bank more than one burst of credit.
        let base = self.next_send.max(now - self.cfg.burst);
        self.next_send = base + Duration::from_nanos(wire_len * 1_000_000_000 / self.rate.max(1));
        self.stats.frames_sent += 1;
        self.stats.payload_bytes_sent += u64::from(len);
        self.pass_bytes += u64::from(len);
        self.window_bytes += u64::from(len);
        if self.cfg.checkpoint_bytes > 0
            && (self.window_bytes >= self.cfg.checkpoint_bytes
                || (now >= self.window_started + self.cfg.checkpoint_interval
                    && self.window_frames >= MIN_WINDOW_FRAMES))
            && self.cursor > self.window_from
        {
            self.send_checkpoint(now);
        }
        if let Some(mut seqs) = combo {
            seqs.sort_unstable();
            self.stats.coded += 1;
            self.stats.coded_frames += seqs.len() as u64;
            let parts = seqs.iter().map(|s| (u64::from(*s) * fs, frame_len(*s))).collect();
            let header = CodedHeader {
                session: self.announce.session,
                assignment: self.announce.info.assignment,
                pass: self.pass,
                seqs,
                len,
            };
            return Some(Transmit::Coded {
                dest: Dest::Everyone,
                coded: CodedRequest { header, parts },
            });
        }
        let header = DataHeader {
            session: self.announce.session,
            assignment: self.announce.info.assignment,
            pass: self.pass,
            seq,
            len,
        };
        Some(Transmit::Frame { dest: Dest::Everyone, frame: FrameRequest { header, offset } })
    }

    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Feeds one datagram received on the report port.
    pub fn handle_datagram(&mut self, now: Time, from: SocketAddr, datagram: &[u8]) {
        let msg = match wire::open(&self.keys, datagram) {
            Ok(m) => m,
            Err(e) => return self.stats.dropped.count(&e),
        };
        let Message::Report(r) = msg else {
            // Our own multicast looped back, or another GL's traffic: not for us.
            self.stats.dropped.ignored += 1;
            return;
        };
        if r.session != self.announce.session {
            self.stats.dropped.foreign_session += 1;
            return;
        }
        if let ReportStatus::Missing(runs) | ReportStatus::Gaps(runs) = &r.status
            && runs.iter().any(|(first, count)| {
                u64::from(*first) + u64::from(*count) > u64::from(self.frames)
            })
        {
            self.stats.dropped.out_of_range += 1;
            return;
        }
        if self.phase == Phase::Done {
            self.stats.dropped.ignored += 1;
            return;
        }
        self.stats.reports += 1;
        self.on_report(now, from, r);
    }

    fn on_report(&mut self, now: Time, from: SocketAddr, r: Report) {
        let round = self.round;
        let peer = self.peers.entry(r.member).or_insert_with(|| {
            self.events.push_back(SenderEvent::Joined(r.member));
            Peer::new(false, None)
        });
        if peer.unicast_only.is_none() {
            peer.addr = Some(from);
        }
        match r.status {
            ReportStatus::Gaps(runs) => {
                if matches!(peer.status, MemberStatus::Complete | MemberStatus::Failed(_))
                    || r.round < self.pass_first_checkpoint
                {
                    return; // a newer fact, or an answer from an earlier pass
                }
                let mut covered = None;
                if peer.acked_checkpoint.is_none_or(|a| r.round > a) {
                    // The windows since its previous answer in this pass, this one included.
                    let first =
                        peer.acked_checkpoint.map_or(0, |a| a + 1).max(self.pass_first_checkpoint);
                    covered = Some(
                        self.checkpoints
                            .iter()
                            .filter(|c| (first..=r.round).contains(&c.number))
                            .map(|c| c.frames)
                            .sum::<u32>(),
                    );
                    peer.acked_checkpoint = Some(r.round);
                    if let Some(c) = self.checkpoints.iter().find(|c| c.number == r.round) {
                        if peer.answers.len() == INTAKE_SAMPLES {
                            peer.answers.pop_front();
                        }
                        peer.answers.push_back((now, c.sent_at));
                    }
                }
                return self.on_gaps(now, r.member, r.round, covered, &runs);
            }
            // Completion and failure are final facts whatever round they answer.
            ReportStatus::Complete => {
                peer.missing = None;
                peer.status = MemberStatus::Complete;
                peer.heard_round = peer.heard_round.max(r.round);
            }
            ReportStatus::Failed(reason) => {
                peer.status = MemberStatus::Failed(reason);
                peer.heard_round = peer.heard_round.max(r.round);
            }
            ReportStatus::Verifying => {
                if matches!(peer.status, MemberStatus::Complete | MemberStatus::Failed(_))
                    || r.round != round
                {
                    return; // stale
                }
                peer.status = MemberStatus::Verifying;
                peer.heard_round = round;
            }
            ReportStatus::Missing(runs) => {
                if matches!(peer.status, MemberStatus::Complete | MemberStatus::Failed(_))
                    || r.round != round
                {
                    return; // stale: a newer fact or an older round
                }
                let frames: u64 = runs.iter().map(|(_, c)| u64::from(*c)).sum();
                // Parts of one report add up; a repeated report for the round replaces.
                let prior = match (&peer.status, peer.heard_round == round && r.part > 0) {
                    (MemberStatus::Missing { frames }, true) => *frames,
                    _ => 0,
                };
                peer.status = MemberStatus::Missing { frames: prior + frames };
                peer.heard_round = round;
                for &(first, count) in &runs {
                    self.nacks.insert_range(first, count);
                }
                self.note_missing(r.member, &runs);
            }
        }
        // Close the round early once every participant has answered it, unless someone is
        // still verifying: asking a busy member again at once would only spin the rounds.
        if matches!(self.phase, Phase::Collecting { .. })
            && self.peers.values().all(|p| {
                p.heard_round >= self.round
                    || matches!(p.status, MemberStatus::Complete | MemberStatus::Failed(_))
            })
            && !self.peers.values().any(|p| p.status == MemberStatus::Verifying)
            && self.participants_enough()
        {
            self.phase = Phase::Collecting { until: Time::ZERO };
        }
    }

    /// A checkpoint answer: repair its gaps during the pass (or in the next one, if this pass
    /// has ended) and note the member's gap share for the rate.
    /// `covered`: the new frames of the windows the answer covers, given with its first part.
    fn on_gaps(
        &mut self,
        now: Time,
        member: MemberId,
        checkpoint: u32,
        covered: Option<u32>,
        runs: &[(u32, u32)],
    ) {
        self.note_missing(member, runs);
        let sending = self.phase == Phase::Sending;
        for &(first, count) in runs {
            for seq in first..first + count {
                if !sending {
                    self.nacks.insert(seq);
                } else if !(seq >= self.cursor && self.to_send.contains(seq)) {
                    // Not still ahead in this pass: resend it now.
                    self.repairs.insert(seq);
                    self.repairs_since.get_or_insert(now);
                }
            }
        }
        if let Some(log) = self.checkpoints.iter_mut().find(|c| c.number == checkpoint) {
            let gaps: u32 = runs.iter().map(|(_, c)| *c).sum();
            let (total, frames) = log.gaps.entry(member).or_insert((0, log.frames));
            *total = total.saturating_add(gaps);
            if let Some(c) = covered {
                *frames = c.max(1);
            }
            let (total, frames) = (*total, *frames);
            // A short window (the end of a pass, a repeat) says too little about the rate.
            self.answered = true;
            let enough =
                u32::try_from(self.cfg.checkpoint_bytes / u64::from(self.cfg.frame_size) / 2)
                    .unwrap_or(u32::MAX);
            if frames >= MIN_WINDOW_FRAMES.min(enough).max(1) {
                let share = f64::from(total) / f64::from(frames);
                self.worst_share = Some(self.worst_share.map_or(share, |w| w.max(share)));
            }
        }
    }

    /// Coded repairs are possible in this session.
    fn coding(&self) -> bool {
        self.cfg.coded_repairs
            && self.cipher.is_none()
            && self.frames > 2
            && self.peers.len() <= MAX_CODED_PEERS
    }

    /// Remembers what `member` lacks, for coded repairs.
    fn note_missing(&mut self, member: MemberId, runs: &[(u32, u32)]) {
        if !self.coding() || runs.is_empty() {
            return;
        }
        let frames = self.frames;
        if let Some(p) = self.peers.get_mut(&member) {
            let set = p.missing.get_or_insert_with(|| FrameSet::new(frames));
            for &(first, count) in runs {
                set.insert_range(first, count);
            }
        }
    }

    /// `seqs` are on their way to everyone: no member is owed them any more (a member that
    /// loses them again says so).
    fn sent_to_all(&mut self, seqs: &[u32]) {
        for p in self.peers.values_mut() {
            if let Some(m) = p.missing.as_mut() {
                seqs.iter().for_each(|s| {
                    m.remove(*s);
                });
            }
        }
    }

    /// The frames to combine with `first` in one coded repair (`first` included): from
    /// the frames owed after it in `pool`, greedily, each one some member lacks while no member
    /// lacks two of the combination, so every member that lacks any of them can recover it.
    /// Just `[first]` when nothing combines (e.g. every member lacks `first`).
    fn coded_combo(&self, first: u32, pool: &FrameSet) -> Vec<u32> {
        let sets: Vec<&FrameSet> = self.peers.values().filter_map(|p| p.missing.as_ref()).collect();
        let mut covered: Vec<bool> = sets.iter().map(|m| m.contains(first)).collect();
        let mut combo = vec![first];
        if !covered.contains(&true) {
            return combo;
        }
        let mut next = first.checked_add(1).and_then(|from| pool.next_present(from));
        let mut scanned = 0;
        while let Some(c) = next {
            if combo.len() >= wire::MAX_CODED
                || scanned >= CODED_LOOKAHEAD
                || !covered.contains(&false)
            {
                break;
            }
            scanned += 1;
            let needers: Vec<usize> =
                sets.iter().enumerate().filter(|(_, m)| m.contains(c)).map(|(i, _)| i).collect();
            if !needers.is_empty() && needers.iter().all(|i| !covered[*i]) {
                needers.iter().for_each(|i| covered[*i] = true);
                combo.push(c);
            }
            next = c.checked_add(1).and_then(|from| pool.next_present(from));
        }
        combo
    }

    /// Mid-pass: ask where members are, and adapt the rate to what the last answers said.
    fn send_checkpoint(&mut self, now: Time) {
        self.adapt_rate_mid_pass();
        let frames = self.to_send.count_in(self.window_from, self.cursor).max(1);
        let n = u32::try_from(self.peers.len().max(self.cfg.min_participants).max(1))
            .unwrap_or(u32::MAX);
        // Short: an answer's delay counts as lag. These answers are tiny, and only members
        // still receiving send them, so a burst of them costs the GL little.
        let window = (self.cfg.report_slot * n / 8).min(Duration::from_millis(3));
        let c = Checkpoint {
            session: self.announce.session,
            pass: self.pass,
            checkpoint: self.checkpoint,
            from: self.window_from,
            upto: self.cursor,
            window_us: u32::try_from(window.as_micros()).unwrap_or(u32::MAX),
        };
        let bytes = c.encode(&self.keys);
        self.push_control(Dest::Everyone, bytes);
        if self.checkpoints.len() == CHECKPOINT_LOG {
            self.checkpoints.pop_front();
        }
        self.checkpoints.push_back(CheckpointLog {
            number: self.checkpoint,
            sent_at: self.pass_bytes,
            frames,
            gaps: BTreeMap::new(),
        });
        self.stats.checkpoints += 1;
        self.checkpoint += 1;
        self.window_from = self.cursor;
        self.window_bytes = 0;
        self.window_frames = 0;
        self.window_started = now;
    }

    /// Rate from checkpoint answers: down when a member's window misses a large share (it is
    /// overrun, or the network is congested) or when a member lags far behind the sender (its
    /// socket buffer is filling: it would soon drop), gently up when every answer is good.
    /// No answer since the last adaptation: the rate stays.
    fn adapt_rate_mid_pass(&mut self) {
        let share = self.worst_share.take().unwrap_or(0.0);
        if !std::mem::take(&mut self.answered) {
            return;
        }
        let log = &self.checkpoints;
        let sent_at = |n: u32| log.iter().find(|c| c.number == n).map(|c| c.sent_at);
        // Lag of members that answered in this pass; one that fell far behind (crashed, or
        // overflowed long ago) is left to the end-of-pass repair rather than stall everyone.
        let (lag, intake) = self
            .peers
            .values()
            .filter(|p| !matches!(p.status, MemberStatus::Complete | MemberStatus::Failed(_)))
            .filter_map(|p| {
                p.acked_checkpoint
                    .filter(|a| *a >= self.pass_first_checkpoint)
                    .and_then(sent_at)
                    .map(|at| (self.pass_bytes.saturating_sub(at), p))
            })
            .filter(|(lag, _)| *lag <= 4 * self.cfg.max_lag_bytes)
            .fold((0, None::<f64>), |(lag, intake), (l, p)| {
                // The intake that matters is that of the members falling behind.
                let i = if l > self.cfg.max_lag_bytes / 2 { p.intake() } else { None };
                (
                    lag.max(l),
                    match (intake, i) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    },
                )
            });
        let mut factor: f64 = if share > 0.25 {
            0.6
        } else if share > 0.10 {
            0.85
        } else {
            1.15
        };
        if lag > self.cfg.max_lag_bytes / 2 {
            factor = factor.min(1.0);
        }
        let mut rate = self.rate as f64 * factor;
        if lag > self.cfg.max_lag_bytes {
            // Falling behind: send a little slower than the slowest lagging member takes data
            // in, so its backlog drains — a measured target, not a cut per checkpoint (the
            // answers come late, by the backlog itself, and repeated cuts would overshoot).
            let wire = f64::from(self.cfg.frame_size) + wire::DATA_OVERHEAD as f64;
            // At most halved per checkpoint: one member descheduled for a while measures a
            // tiny intake that says little about the next moment.
            rate = match intake {
                Some(i) => rate
                    .min(0.9 * i * wire / f64::from(self.cfg.frame_size))
                    .max(self.rate as f64 * 0.5),
                None => rate * 0.8,
            };
        }
        self.rate = (rate as u64).clamp(self.cfg.min_rate, self.cfg.max_rate);
    }

    fn participants_enough(&self) -> bool {
        self.peers.len() >= self.cfg.min_participants
    }

    fn pass_needed_done(&self) -> bool {
        !self.peers.is_empty() || self.cfg.min_participants == 0 && self.pass > 0
    }

    fn all_done(&self) -> bool {
        let complete = self.peers.values().filter(|p| p.status == MemberStatus::Complete).count();
        complete >= self.cfg.min_participants
            && self.peers.values().all(|p| p.status == MemberStatus::Complete)
    }

    fn report_window(&self) -> Duration {
        let n = u32::try_from(self.peers.len().max(self.cfg.min_participants).max(1))
            .unwrap_or(u32::MAX);
        (self.cfg.report_slot * n).min(self.cfg.max_report_window)
    }

    fn announce_now(&mut self, now: Time) {
        self.next_announce = now + self.cfg.reannounce_interval;
        let bytes = self.announcement();
        self.push_control(Dest::Everyone, bytes);
    }

    fn push_control(&mut self, dest: Dest, bytes: Vec<u8>) {
        self.stats.control_datagrams += 1;
        self.queue.push_back(Transmit::Control { dest, bytes });
    }

    fn start_pass(&mut self, now: Time, frames: FrameSet) {
        self.pass += 1;
        self.stats.passes = self.pass;
        // A small tail that keeps getting lost is sent twice: on a very lossy segment this turns
        // many rounds (each a report window) into one, for a few extra frames.
        self.repeats_left =
            u32::from(self.pass >= 3 && frames.count() <= (self.frames / 100).max(32));
        self.to_send = frames;
        self.cursor = 0;
        self.sent_this_pass = 0;
        self.window_from = 0;
        self.window_bytes = 0;
        self.window_frames = 0;
        self.window_started = now;
        self.pass_bytes = 0;
        self.pass_first_checkpoint = self.checkpoint;
        self.checkpoints.clear();
        self.worst_share = None;
        self.answered = false;
        self.phase = Phase::Sending;
        self.next_send = self.next_send.max(now);
        // Members learn the new pass number (and late joiners the session) at once.
        self.announce_now(now);
    }

    fn solicit_end_of_pass(&mut self, now: Time) {
        self.round += 1;
        self.stats.rounds = self.round;
        // Members with missing frames always answer an end-of-pass solicitation; complete ones
        // only when selected, so name the shorter list.
        let selector = self.shorter_selector();
        self.send_solicit(now, Dest::Everyone, selector.clone());
        // A second copy: one lost solicitation would otherwise cost a whole report window.
        self.send_solicit(now, Dest::Everyone, selector);
        self.phase =
            Phase::Collecting { until: now + self.report_window() + self.cfg.report_grace };
    }

    fn send_solicit(&mut self, _now: Time, dest: Dest, selector: Selector) {
        let window_us = u32::try_from(self.report_window().as_micros()).unwrap_or(u32::MAX);
        let s = Solicit {
            session: self.announce.session,
            round: self.round,
            pass: self.pass,
            window_us,
            selector,
        };
        let bytes = s.encode(&self.keys);
        self.push_control(dest, bytes);
    }

    /// `Only(lacking)` or `AllBut(heard)`, whichever is shorter and fits a datagram; else
    /// `Everyone` (members then decide from their own state).
    fn shorter_selector(&self) -> Selector {
        let (heard, lacking): (Vec<_>, Vec<_>) = self
            .peers
            .iter()
            .partition(|(_, p)| p.heard_round >= self.round || p.status == MemberStatus::Complete);
        let heard: Vec<u64> = heard.into_iter().map(|(id, _)| *id).collect();
        let lacking: Vec<u64> = lacking.into_iter().map(|(id, _)| *id).collect();
        // Unknown joiners are not in `lacking`, so an `Only` list is only safe when we expect
        // no one else; `AllBut` covers them.
        if heard.len() <= wire::MAX_IDS_PER_SOLICIT
            && (heard.len() <= lacking.len() || self.cfg.min_participants > self.peers.len())
        {
            Selector::AllBut(heard)
        } else if lacking.len() <= wire::MAX_IDS_PER_SOLICIT {
            Selector::Only(lacking)
        } else {
            Selector::Everyone
        }
    }

    fn end_round(&mut self, now: Time) {
        let complete = self.peers.values().filter(|p| p.status == MemberStatus::Complete).count();
        let missing: u64 = self
            .peers
            .values()
            .map(|p| match p.status {
                MemberStatus::Missing { frames } => frames,
                // Silence counts as worse than missing everything, so a first report is progress.
                MemberStatus::NoReport => u64::from(self.frames) + 1,
                _ => 0,
            })
            .sum();
        // A member that answered this round that it is verifying is alive and busy (hashing
        // and flushing a large file can take longer than ten rounds): that counts as progress
        // for the stall limit, though the asking still backs off. `max_rounds` bounds the wait.
        let verifying = self
            .peers
            .values()
            .any(|p| p.status == MemberStatus::Verifying && p.heard_round >= self.round);
        if complete > self.prev_complete || missing < self.prev_missing {
            self.stall = 0;
            self.idle = 0;
            self.progress_at = now;
        } else {
            self.idle += 1;
            self.stall = if verifying { 0 } else { self.stall + 1 };
            if verifying {
                self.progress_at = now;
            }
        }
        self.prev_complete = complete;
        self.prev_missing = missing;

        if self.all_done() && self.pass_needed_done() {
            return self.finish(Outcome::Complete);
        }
        let only_failed_left = self
            .peers
            .values()
            .all(|p| matches!(p.status, MemberStatus::Complete | MemberStatus::Failed(_)))
            && self.participants_enough();
        let stalled =
            self.stall >= self.cfg.stall_limit && now >= self.progress_at + self.cfg.stall_time;
        if stalled || self.round >= self.cfg.max_rounds || only_failed_left {
            let quorum = self.cfg.quorum.unwrap_or_else(|| {
                self.peers.values().filter(|p| p.expected).count().max(self.cfg.min_participants)
            });
            let outcome = if complete >= quorum && complete >= self.cfg.min_participants {
                Outcome::QuorumMet
            } else {
                Outcome::Problem
            };
            return self.finish(outcome);
        }
        if !self.nacks.is_empty() {
            self.adapt_rate();
            let next = std::mem::replace(&mut self.nacks, FrameSet::new(self.frames));
            if self.frames == 0 {
                self.pass += 1;
                self.stats.passes = self.pass;
                self.announce_now(now);
                return self.solicit_end_of_pass(now);
            }
            return self.start_pass(now, next);
        }
        if self.frames == 0
            && self.peers.values().any(|p| matches!(p.status, MemberStatus::NoReport))
        {
            // Inline session: a silent member may simply have lost the announcement.
            self.announce_now(now);
        }
        self.ask_again(now);
    }

    /// NACK share → rate. Loss on a LAN is mostly receivers overrun, so back off hard when a
    /// large share is missing, gently when a little is, and probe upward when almost nothing is.
    fn adapt_rate(&mut self) {
        let share = f64::from(self.nacks.count()) / f64::from(self.sent_this_pass.max(1));
        let factor = if share > 0.25 {
            0.6
        } else if share > 0.10 {
            0.85
        } else if share < 0.03 {
            1.25
        } else {
            1.0
        };
        self.rate =
            ((self.rate as f64 * factor) as u64).clamp(self.cfg.min_rate, self.cfg.max_rate);
    }

    /// Nothing to resend but reports are missing: ask the silent members again.
    fn ask_again(&mut self, now: Time) {
        self.round += 1;
        self.stats.rounds = self.round;
        let lacking: Vec<(u64, Option<SocketAddr>)> = self
            .peers
            .iter()
            .filter(|(_, p)| !matches!(p.status, MemberStatus::Complete | MemberStatus::Failed(_)))
            .map(|(id, p)| (*id, p.addr))
            .collect();
        let want_more = self.peers.len() < self.cfg.min_participants;
        // Each request goes out twice: it is tiny, and a lost one costs a whole (backed-off) wait.
        if !want_more
            && lacking.len() <= self.cfg.unicast_solicit_max
            && lacking.iter().all(|(_, a)| a.is_some())
        {
            for (id, addr) in lacking {
                let addr = addr.expect("checked above");
                for _ in 0..2 {
                    self.send_solicit(now, Dest::To(addr), Selector::Only(vec![id]));
                }
            }
        } else {
            let selector = self.shorter_selector();
            self.send_solicit(now, Dest::Everyone, selector.clone());
            self.send_solicit(now, Dest::Everyone, selector);
        }
        // Back off while nobody answers: ten tries then span seconds, not milliseconds, so a
        // member that is rebooting gets a chance to come back.
        let wait = (self.report_window() * (1u32 << self.idle.min(6)))
            .min(self.cfg.max_report_window.max(self.report_window()));
        self.phase = Phase::Collecting { until: now + wait + self.cfg.report_grace };
    }

    fn finish(&mut self, outcome: Outcome) {
        self.phase = Phase::Done;
        let mut complete = Vec::new();
        let mut incomplete = Vec::new();
        for (id, p) in &self.peers {
            if p.status == MemberStatus::Complete {
                complete.push(*id);
            } else {
                incomplete.push((*id, p.status.clone()));
            }
        }
        self.events.push_back(SenderEvent::Finished(SessionReport {
            session: self.announce.session,
            assignment: self.announce.info.assignment,
            outcome,
            complete,
            incomplete,
            passes: self.pass,
            rounds: self.round,
        }));
    }
}
