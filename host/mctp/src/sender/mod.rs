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
//! ([`Output::Frame`] then [`Sender::encode_frame`]).
//!
//! This module holds the session's phases and what it hands out; each concern has a small
//! type of its own: [`pass`] (the frames of the current sweep), [`pacing`] (when the next
//! datagram may go), [`checkpoint`] (mid-pass feedback windows), [`rate`] (the sending rate),
//! [`repair`] (NACKs, repairs during a pass, coded repairs), [`solicit`] (asking members again,
//! backoff, stall) and [`peers`] (what the GL knows of each member).

mod checkpoint;
mod config;
mod pacing;
mod pass;
mod peers;
mod rate;
mod repair;
mod solicit;

pub use config::{Member, SenderConfig, SenderError};

use crate::frameset::FrameSet;
use crate::keys::{Keys, PayloadCipher};
use crate::wire::{
    self, Announce, Checkpoint, CodedHeader, DataHeader, Message, Report, ReportStatus, Selector,
    SessionInfo, Solicit,
};
use crate::{DropCounts, MemberId};
use checkpoint::Checkpoints;
use cm_sansio::{Dest, Instant, Transmit};
use pacing::Pacer;
use pass::Pass;
use peers::Peer;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rate::RateControl;
use repair::Repairs;
use solicit::Progress;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

/// Coded repairs only with at most this many members (the GL keeps one bit per frame for each).
pub const MAX_CODED_PEERS: usize = 256;

/// A frame for the driver to fill with `len` bytes of the assignment at `offset`, via
/// [`Sender::encode_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRequest {
    pub header: DataHeader,
    pub offset: u64,
}

/// One datagram to send. [`Dest::Group`] means the data channel and every unicast-only member
/// ([`Sender::everyone`]); [`Dest::To`] one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A control datagram (announcement, checkpoint, solicitation), ready as it is.
    Control(Transmit),
    /// A data frame, for the driver to fill via [`Sender::encode_frame`].
    Frame { dest: Dest, frame: FrameRequest },
    /// A coded repair, for the driver to fill via [`Sender::encode_coded`].
    Coded { dest: Dest, coded: CodedRequest },
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Announcing { left: u32, next: Instant },
    Sending,
    Collecting { until: Instant },
    Done,
}

/// The sending state machine of one session.
pub struct Sender {
    cfg: SenderConfig,
    keys: Keys,
    cipher: Option<PayloadCipher>,
    announce: Announce,
    next_announce: Instant,
    /// Every frame's chaining value when the driver provided them (tree-tagged sessions).
    frame_cvs: Vec<[u8; 32]>,
    frames: u32,
    peers: BTreeMap<MemberId, Peer>,
    /// Where [`Dest::Group`] goes: the group, then every unicast-only member.
    everyone: Vec<SocketAddr>,
    phase: Phase,
    round: u32,
    pass: Pass,
    pacer: Pacer,
    rate: RateControl,
    checkpoints: Checkpoints,
    repairs: Repairs,
    progress: Progress,
    queue: VecDeque<Output>,
    events: VecDeque<SenderEvent>,
    stats: SenderStats,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("session", &self.announce.session)
            .field("phase", &self.phase)
            .field("pass", &self.pass.number)
            .finish()
    }
}

impl Sender {
    /// A session sending `info` to `members`. `inline` must hold the whole assignment when it
    /// fits in one frame (then it rides in the announcement), and be `None` otherwise.
    pub fn new(
        now: Instant,
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
            origin: cfg.origin,
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
        Ok(Sender {
            phase: Phase::Announcing { left: cfg.announce_count.max(1), next: now },
            pass: Pass::new(frames),
            pacer: Pacer::new(now, cfg.burst),
            rate: RateControl::new(&cfg),
            checkpoints: Checkpoints::new(now, &cfg),
            repairs: Repairs::new(frames),
            progress: Progress::new(now),
            cfg,
            keys,
            cipher,
            announce,
            next_announce: now,
            frame_cvs: Vec::new(),
            frames,
            peers,
            everyone,
            round: 0,
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
        self.rate.rate()
    }

    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Destinations of [`Dest::Group`]: the group, then every unicast-only member.
    pub fn everyone(&self) -> &[SocketAddr] {
        &self.everyone
    }

    /// The sealed announcement, for the election heartbeat to carry as an opaque payload. A
    /// member hands it to [`crate::Receiver::handle_datagram`] like any MCTP datagram.
    pub fn announcement(&self) -> Vec<u8> {
        let mut a = self.announce.clone();
        a.pass = self.pass.number;
        a.rate = self.rate.rate();
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
    /// ([`crate::tree::frame_cvs_in_order`] and [`crate::tree::assemble`]), so tagging a frame
    /// no longer hashes its payload. Refused (false) unless the session is tree-tagged and
    /// there is one per frame. The driver must send the same bytes it hashed: a frame whose
    /// content changed since fails its tag at every member and the session ends with a problem
    /// report.
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
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Done => return None,
            Phase::Announcing { next, .. } => next,
            Phase::Sending => self.pacer.ready_at(),
            Phase::Collecting { until } => until,
        };
        Some(phase.min(self.next_announce))
    }

    pub fn handle_timeout(&mut self, now: Instant) {
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
                    self.pass.number = 1;
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
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Output> {
        if let Some(t) = self.queue.pop_front() {
            return Some(t);
        }
        if self.phase != Phase::Sending || !self.pacer.is_ready(now) {
            return None;
        }
        // A named repair that is due, else the pass's next new frame, else the pass is over.
        let Some((seq, repair)) = self.next_frame(now) else {
            self.solicit_end_of_pass(now);
            return self.queue.pop_front();
        };
        self.pass.sent += 1;
        // A repair (or any frame of a later pass) may go out combined with others owed to
        // other members.
        let combo = self.combine(seq, repair);
        self.repairs.settle();
        let (out, len, wire_len) = self.frame_output(seq, combo);
        // Paced at the current rate, counted, and perhaps the window's checkpoint after it.
        self.pacer.on_sent(now, wire_len, self.rate.rate());
        self.stats.frames_sent += 1;
        self.stats.payload_bytes_sent += u64::from(len);
        self.checkpoints.sent(len);
        if self.checkpoints.due(now, self.pass.cursor) {
            self.send_checkpoint(now);
        }
        Some(out)
    }

    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Feeds one datagram received on the report port.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
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

    /// The frame to send next and whether it is a repair named during the pass. Repairs go
    /// first: they are the oldest frames owed.
    fn next_frame(&mut self, now: Instant) -> Option<(u32, bool)> {
        let coding = self.coding();
        let pass = &self.pass;
        if let Some(seq) = self.repairs.pop_due(now, coding, || pass.is_done()) {
            self.stats.repairs += 1;
            return Some((seq, true));
        }
        let (next, repeat) = self.pass.next_new();
        if repeat {
            self.checkpoints.restart_window();
        }
        let seq = next?;
        self.checkpoints.new_frame();
        Some((seq, false))
    }

    /// The frames going out with `seq` in one coded repair (`seq` first), taken from what is
    /// owed, or `None` to send `seq` alone.
    fn combine(&mut self, seq: u32, repair: bool) -> Option<Vec<u32>> {
        if !((repair || self.pass.number >= 2) && self.coding()) {
            return None;
        }
        let lacking: Vec<&FrameSet> =
            self.peers.values().filter_map(|p| p.missing.as_ref()).collect();
        let pool = if repair { self.repairs.named() } else { self.pass.to_send() };
        let combo = repair::coded_combo(&lacking, seq, pool);
        for &c in &combo[1..] {
            if repair {
                self.repairs.take(c);
                self.stats.repairs += 1;
            } else {
                self.pass.take(c);
            }
        }
        self.peers.values_mut().for_each(|p| p.sent(&combo));
        Some(combo).filter(|c| c.len() > 1)
    }

    /// The frame `seq`, or the coded repair of `combo`, to everyone; with its payload length
    /// and its length on the wire.
    fn frame_output(&mut self, seq: u32, combo: Option<Vec<u32>>) -> (Output, u16, u64) {
        let fs = u64::from(self.cfg.frame_size);
        let size = self.announce.info.size;
        let frame_len = move |seq: u32| (size - u64::from(seq) * fs).min(fs) as u16;
        let (session, assignment, pass) =
            (self.announce.session, self.announce.info.assignment, self.pass.number);
        match combo {
            Some(mut seqs) => {
                let len = seqs.iter().map(|s| frame_len(*s)).max().unwrap_or(0);
                seqs.sort_unstable();
                self.stats.coded += 1;
                self.stats.coded_frames += seqs.len() as u64;
                let parts = seqs.iter().map(|s| (u64::from(*s) * fs, frame_len(*s))).collect();
                let wire_len = u64::from(len) + wire::coded_overhead(seqs.len()) as u64;
                let header = CodedHeader { session, assignment, pass, seqs, len };
                let coded = CodedRequest { header, parts };
                (Output::Coded { dest: Dest::Group, coded }, len, wire_len)
            }
            None => {
                let len = frame_len(seq);
                let header = DataHeader { session, assignment, pass, seq, len };
                let frame = FrameRequest { header, offset: u64::from(seq) * fs };
                let wire_len = u64::from(len) + wire::DATA_OVERHEAD as u64;
                (Output::Frame { dest: Dest::Group, frame }, len, wire_len)
            }
        }
    }

    fn on_report(&mut self, now: Instant, from: SocketAddr, r: Report) {
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
                if peer.is_final() || r.round < self.checkpoints.pass_first() {
                    return; // a newer fact, or an answer from an earlier pass
                }
                let mut covered = None;
                if peer.acked_checkpoint.is_none_or(|a| r.round > a) {
                    // The windows since its previous answer in this pass, this one included.
                    let first = peer
                        .acked_checkpoint
                        .map_or(0, |a| a + 1)
                        .max(self.checkpoints.pass_first());
                    covered = Some(self.checkpoints.frames_in(first, r.round));
                    peer.acked_checkpoint = Some(r.round);
                    if let Some(sent_at) = self.checkpoints.sent_at(r.round) {
                        peer.answered(now, sent_at);
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
                if peer.is_final() || r.round != round {
                    return; // stale
                }
                peer.status = MemberStatus::Verifying;
                peer.heard_round = round;
            }
            ReportStatus::Missing(runs) => {
                if peer.is_final() || r.round != round {
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
                    self.repairs.nack_range(first, count);
                }
                self.note_missing(r.member, &runs);
            }
        }
        // Close the round early once every participant has answered it, unless someone is
        // still verifying: asking a busy member again at once would only spin the rounds.
        if matches!(self.phase, Phase::Collecting { .. })
            && self.peers.values().all(|p| p.heard_round >= self.round || p.is_final())
            && !self.peers.values().any(|p| p.status == MemberStatus::Verifying)
            && self.participants_enough()
        {
            self.phase = Phase::Collecting { until: Instant::ZERO };
        }
    }

    /// A checkpoint answer: repair its gaps during the pass (or in the next one, if this pass
    /// has ended) and note the member's gap share for the rate.
    /// `covered`: the new frames of the windows the answer covers, given with its first part.
    fn on_gaps(
        &mut self,
        now: Instant,
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
                    self.repairs.nack(seq);
                } else if !self.pass.is_ahead(seq) {
                    // Not still ahead in this pass: resend it now.
                    self.repairs.name(now, seq);
                }
            }
        }
        let gaps: u32 = runs.iter().map(|(_, c)| *c).sum();
        self.checkpoints.answer(member, checkpoint, covered, gaps);
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
            p.lacks(frames, runs);
        }
    }

    /// Mid-pass: ask where members are, and adapt the rate to what the last answers said.
    fn send_checkpoint(&mut self, now: Instant) {
        if let Some(share) = self.checkpoints.take_feedback() {
            // Lag of members that answered in this pass.
            let lags = self
                .peers
                .values()
                .filter(|p| !p.is_final())
                .filter_map(|p| self.checkpoints.lag(p.acked_checkpoint).map(|lag| (lag, p)));
            let lag = self.rate.slowest(lags);
            self.rate.after_checkpoint(share, lag);
        }
        let cursor = self.pass.cursor;
        let frames = self.pass.count_in(self.checkpoints.window_from(), cursor).max(1);
        let window = solicit::checkpoint_window(self.peers.len(), &self.cfg);
        let opened = self.checkpoints.open(now, cursor, frames);
        let c = Checkpoint {
            session: self.announce.session,
            pass: self.pass.number,
            checkpoint: opened.number,
            from: opened.from,
            upto: opened.upto,
            window_us: u32::try_from(window.as_micros()).unwrap_or(u32::MAX),
        };
        let bytes = c.encode(&self.keys);
        self.push_control(Dest::Group, bytes);
        self.stats.checkpoints += 1;
    }

    fn participants_enough(&self) -> bool {
        self.peers.len() >= self.cfg.min_participants
    }

    fn pass_needed_done(&self) -> bool {
        !self.peers.is_empty() || self.cfg.min_participants == 0 && self.pass.number > 0
    }

    fn all_done(&self) -> bool {
        let complete = self.peers.values().filter(|p| p.status == MemberStatus::Complete).count();
        complete >= self.cfg.min_participants
            && self.peers.values().all(|p| p.status == MemberStatus::Complete)
    }

    fn report_window(&self) -> std::time::Duration {
        solicit::report_window(self.peers.len(), &self.cfg)
    }

    fn announce_now(&mut self, now: Instant) {
        self.next_announce = now + self.cfg.reannounce_interval;
        let bytes = self.announcement();
        self.push_control(Dest::Group, bytes);
    }

    fn push_control(&mut self, dest: Dest, payload: Vec<u8>) {
        self.stats.control_datagrams += 1;
        self.queue.push_back(Output::Control(Transmit { dest, payload }));
    }

    fn start_pass(&mut self, now: Instant, frames: FrameSet) {
        self.pass.start(frames, self.frames);
        self.stats.passes = self.pass.number;
        self.checkpoints.start_pass(now);
        self.phase = Phase::Sending;
        self.pacer.start_pass(now);
        // Members learn the new pass number (and late joiners the session) at once.
        self.announce_now(now);
    }

    fn solicit_end_of_pass(&mut self, now: Instant) {
        self.round += 1;
        self.stats.rounds = self.round;
        // Members with missing frames always answer an end-of-pass solicitation; complete ones
        // only when selected, so name the shorter list.
        let selector = self.shorter_selector();
        self.send_solicit(Dest::Group, selector.clone());
        // A second copy: one lost solicitation would otherwise cost a whole report window.
        self.send_solicit(Dest::Group, selector);
        self.phase =
            Phase::Collecting { until: now + self.report_window() + self.cfg.report_grace };
    }

    fn send_solicit(&mut self, dest: Dest, selector: Selector) {
        let window_us = u32::try_from(self.report_window().as_micros()).unwrap_or(u32::MAX);
        let s = Solicit {
            session: self.announce.session,
            round: self.round,
            pass: self.pass.number,
            window_us,
            selector,
        };
        let bytes = s.encode(&self.keys);
        self.push_control(dest, bytes);
    }

    fn shorter_selector(&self) -> Selector {
        solicit::shorter_selector(&self.peers, self.round, self.cfg.min_participants)
    }

    fn end_round(&mut self, now: Instant) {
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
        let verifying = self
            .peers
            .values()
            .any(|p| p.status == MemberStatus::Verifying && p.heard_round >= self.round);
        self.progress.round_ended(now, complete, missing, verifying);

        if self.all_done() && self.pass_needed_done() {
            return self.finish(Outcome::Complete);
        }
        let only_failed_left =
            self.peers.values().all(|p| p.is_final()) && self.participants_enough();
        if self.progress.stalled(now, &self.cfg)
            || self.round >= self.cfg.max_rounds
            || only_failed_left
        {
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
        if !self.repairs.nacks().is_empty() {
            self.rate.after_pass(self.repairs.nacks().count(), self.pass.sent);
            let next = self.repairs.take_nacks();
            if self.frames == 0 {
                self.pass.number += 1;
                self.stats.passes = self.pass.number;
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

    /// Nothing to resend but reports are missing: ask the silent members again, each request
    /// twice (it is tiny, and a lost one costs a whole backed-off wait).
    fn ask_again(&mut self, now: Instant) {
        self.round += 1;
        self.stats.rounds = self.round;
        if let Some(targets) = solicit::unicast_targets(&self.peers, &self.cfg) {
            for (id, addr) in targets {
                for _ in 0..2 {
                    self.send_solicit(Dest::To(addr), Selector::Only(vec![id]));
                }
            }
        } else {
            let selector = self.shorter_selector();
            self.send_solicit(Dest::Group, selector.clone());
            self.send_solicit(Dest::Group, selector);
        }
        let wait = self.progress.backoff(self.report_window(), &self.cfg);
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
            passes: self.pass.number,
            rounds: self.round,
        }));
    }
}
