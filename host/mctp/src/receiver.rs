//! A member's side of a session: listen, hand frames to the driver for writing, track which
//! sequence numbers are held, answer solicitations after a random delay, verify, deliver.
//!
//! The receiver never touches the file. For each new frame [`Receiver::handle_datagram`] returns
//! a [`Write`] (bytes and offset). The driver first handles pending events (a new session's
//! [`RxEvent::Started`] comes before its first write), applies the write, then confirms it with
//! [`Receiver::written`]; only a confirmed frame counts as held, so a failed write is simply
//! asked for again (or reported with [`Receiver::storage_failed`]). When every
//! frame is held the receiver asks the driver to hash the file ([`RxEvent::Verify`]) and only a
//! matching BLAKE3 leads to [`RxEvent::Delivered`]: a wrong or partial assignment is never
//! delivered. Memory per session is one bit per frame.
//!
//! Only fresh announcements start or change a session ([`crate::replay`]): the receiver keeps
//! the newest origin it accepted from each GL ([`Receiver::announcers`]; the driver carries them
//! from one session to the next and across restarts), so a recorded announcement replayed later
//! is ignored and a member never goes back to an older session. A driver that knows which GL its
//! member follows narrows it further ([`Receiver::set_announcer_filter`]).

use crate::frameset::FrameSet;
use crate::keys::{Keys, PayloadCipher};
use crate::replay::{Announcers, Freshness};
use crate::tree::TreeLayout;
use crate::wire::{
    self, Announce, Checkpoint, MAX_RUNS_PER_REPORT, Message, Report, ReportStatus, SessionInfo,
    Solicit,
};
use crate::{DropCounts, MemberId};
use cm_sansio::{Dest, Instant, Transmit};
use cm_wire::mac::TAG_LEN;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

/// Tunables of a receiving member.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub member: MemberId,
    /// An incomplete session with no datagram for this long is abandoned (the GL died).
    pub session_timeout: Duration,
    /// A report with more runs than fit this many datagrams is cut short (the rest is asked for
    /// in a later round).
    pub max_report_parts: u16,
}

impl ReceiverConfig {
    pub fn new(member: MemberId) -> Self {
        ReceiverConfig { member, session_timeout: Duration::from_secs(10), max_report_parts: 256 }
    }
}

/// Bytes for the driver to write into the session's file.
#[derive(Debug, PartialEq, Eq)]
pub struct Write<'a> {
    pub session: u64,
    pub seq: u32,
    pub offset: u64,
    pub bytes: &'a [u8],
    /// The payload's BLAKE3 chaining value, in a tree-tagged session (see [`crate::tree`]).
    pub cv: Option<[u8; 32]>,
    /// Set when the frame comes out of a coded repair: `bytes` is then the XOR of several
    /// frames, not the frame itself.
    pub coded: Option<Coded>,
}

/// How to recover a frame from a coded repair: XOR into the repair's payload each listed
/// stretch of the file `(offset, len)` (frames this member holds, zero-padded to the payload's
/// length), then keep the first `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coded {
    pub len: usize,
    pub xor: Vec<(u64, usize)>,
}

/// What the receiver tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxEvent {
    /// A session began. Prepare a file of `info.size` bytes keyed by `info.hash`; when `resumed`
    /// is true, the same content was already partly received (a new GL took over): keep the file.
    /// `tree` is set when frames come tree-tagged: the file's hash can then be assembled from
    /// the writes' [`Write::cv`] instead of hashing the file.
    Started { session: u64, info: SessionInfo, resumed: bool, tree: Option<TreeLayout> },
    /// Every frame is held: hash the file and call [`Receiver::verified`].
    Verify { session: u64, info: SessionInfo },
    /// The verified assignment may be handed on (to the interpreter).
    Delivered { session: u64, info: SessionInfo },
    /// This member already held the announced content and said so.
    AlreadyHeld { session: u64, info: SessionInfo },
    /// The session ended without delivery; discard its file.
    Abandoned { session: u64, info: SessionInfo, reason: String },
}

/// Whose announcements may start a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AnnouncerFilter {
    /// Any GL's (the CLI, tests, a member that knows no election).
    #[default]
    Any,
    /// Only this node's: the GL the member's election follows.
    Only(u64),
    /// Nobody's: the member knows no GL right now (an election is going on).
    Nobody,
}

impl AnnouncerFilter {
    fn allows(self, node: u64) -> bool {
        match self {
            AnnouncerFilter::Any => true,
            AnnouncerFilter::Only(n) => n == node,
            AnnouncerFilter::Nobody => false,
        }
    }
}

/// Counters for operators and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    pub frames: u64,
    pub bytes: u64,
    pub duplicates: u64,
    pub reports_sent: u64,
    /// Coded repairs that gave this member a frame, and those it could not use (it lacked
    /// none, or more than one, of their frames).
    pub coded_used: u64,
    pub coded_useless: u64,
    /// Of those, the ones it lacked several frames of: it needed one, but had also lost
    /// another that the GL did not know of when it combined them.
    pub coded_lacking_several: u64,
    /// Announcements of sessions for other members (ignored).
    pub not_targeted: u64,
    pub dropped: DropCounts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Receiving,
    Verifying,
    Complete,
    Failed(String),
}

#[derive(Debug)]
struct Session {
    announce: Announce,
    frames: u32,
    held: FrameSet,
    report_to: SocketAddr,
    state: State,
    last_heard: Instant,
    cipher: Option<PayloadCipher>,
    /// (when, round) of the report we owe.
    report_due: Option<(Instant, u32)>,
    /// The checkpoint answer we owe: when, and the checkpoint's number and window (merged with
    /// any earlier one not yet answered).
    gaps_due: Option<GapsDue>,
}

#[derive(Debug, Clone, Copy)]
struct GapsDue {
    at: Instant,
    checkpoint: u32,
    from: u32,
    upto: u32,
}

impl Session {
    /// The frame belongs to this session's assignment, its sequence number is in range and its
    /// length is exactly that frame's.
    fn frame_in_range(&self, h: &wire::DataHeader) -> bool {
        let fs = u64::from(self.announce.frame_size);
        h.seq < self.frames
            && h.assignment == self.announce.info.assignment
            && u64::from(h.len) == (self.announce.info.size - u64::from(h.seq) * fs).min(fs)
    }
}

/// How long a member that already holds an announced assignment may wait to say so.
const HELD_ANSWER_SPREAD: Duration = Duration::from_millis(4);

/// The layout a member assembles the hash with, when the session is tree-tagged.
fn tree_layout(a: &Announce) -> Option<TreeLayout> {
    a.tree.then(|| TreeLayout { frame_size: a.frame_size, frames: a.frame_count() })
}

/// Datagrams one checkpoint answer may take; more gaps than fit wait for the end of the pass.
const MAX_GAP_PARTS: usize = 4;

/// The receiving state machine of one member (one session at a time).
pub struct Receiver {
    cfg: ReceiverConfig,
    keys: Keys,
    rng: ChaCha8Rng,
    held_hashes: Vec<[u8; 32]>,
    /// The newest origin accepted from each GL, and whether it changed since the driver last
    /// took it.
    announcers: Announcers,
    announcers_changed: bool,
    announcer_filter: AnnouncerFilter,
    session: Option<Session>,
    queue: VecDeque<Transmit>,
    events: VecDeque<RxEvent>,
    stats: ReceiverStats,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("member", &self.cfg.member).finish()
    }
}

impl Receiver {
    pub fn new(cfg: ReceiverConfig, keys: Keys, rng: ChaCha8Rng) -> Self {
        Receiver {
            cfg,
            keys,
            rng,
            held_hashes: Vec::new(),
            announcers: Announcers::default(),
            announcers_changed: false,
            announcer_filter: AnnouncerFilter::Any,
            session: None,
            queue: VecDeque::new(),
            events: VecDeque::new(),
            stats: ReceiverStats::default(),
        }
    }

    /// Content this member already holds: an announcement of it is answered "complete" at once.
    pub fn add_held(&mut self, hash: [u8; 32]) {
        if !self.held_hashes.contains(&hash) {
            self.held_hashes.push(hash);
        }
    }

    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// What an earlier receiver of this member accepted (kept by the driver between sessions
    /// and across restarts): those sessions and older ones are never started again.
    pub fn set_announcers(&mut self, announcers: Announcers) {
        self.announcers = announcers;
    }

    /// The newest origin accepted from each GL, for the driver to keep.
    pub fn announcers(&self) -> &Announcers {
        &self.announcers
    }

    /// True once after an announcement was accepted as fresh: time for the driver to store
    /// [`Receiver::announcers`].
    pub fn take_announcers_changed(&mut self) -> bool {
        std::mem::take(&mut self.announcers_changed)
    }

    /// Whose announcements may start a session from now on (the session under way goes on).
    pub fn set_announcer_filter(&mut self, filter: AnnouncerFilter) {
        self.announcer_filter = filter;
    }

    /// An announcement that may start or continue a session: from a GL the filter allows, and
    /// either fresh or the current session's own (announcements repeat during a session). A
    /// replay of an older session, or of one this receiver is not in, is refused.
    fn admits(&self, a: &Announce) -> bool {
        if !self.announcer_filter.allows(a.origin.node) {
            return false;
        }
        match self.announcers.freshness(&a.origin) {
            Freshness::Fresh => true,
            Freshness::Newest => self
                .session
                .as_ref()
                .is_some_and(|s| s.announce.origin == a.origin && s.announce.session == a.session),
            Freshness::Stale => false,
        }
    }

    /// The content of an authenticated announcement that would start a session this receiver
    /// is not in and does not know it holds, without acting on it: the driver can look in its
    /// store and call [`Receiver::add_held`] before handing the datagram over, so a member that
    /// already holds the assignment answers "complete" at once. Cheap for every other datagram
    /// (only announcements have their tag checked).
    pub fn new_announcement(&self, datagram: &[u8]) -> Option<SessionInfo> {
        if !wire::is_announce(datagram) {
            return None;
        }
        let Ok(Message::Announce(a)) = wire::open(&self.keys, datagram) else { return None };
        if !a.targets.selects(self.cfg.member) || !self.admits(&a) {
            return None;
        }
        let known = self
            .session
            .as_ref()
            .is_some_and(|s| s.announce.session == a.session || s.announce.info == a.info);
        (!known && !self.held_hashes.contains(&a.info.hash)).then_some(a.info)
    }

    /// End of the run of held frames that starts at byte `offset` of the current session
    /// (`offset` itself when that frame is not held or `offset` is not a frame boundary). A
    /// driver that hashes the file as it arrives uses it to catch up over frames that arrived
    /// ahead of a repaired one.
    pub fn held_through(&self, offset: u64) -> u64 {
        let Some(s) = self.session.as_ref().filter(|s| s.frames > 0) else { return offset };
        let fs = u64::from(s.announce.frame_size);
        let Some(seq) = u32::try_from(offset / fs).ok().filter(|_| offset.is_multiple_of(fs))
        else {
            return offset;
        };
        let end = s.held.next_absent(seq).unwrap_or(s.frames);
        (u64::from(end) * fs).min(s.announce.info.size).max(offset)
    }

    /// `(held, total)` frames of the current session.
    pub fn progress(&self) -> Option<(u32, u32)> {
        self.session.as_ref().map(|s| (s.held.count(), s.frames))
    }

    /// Feeds one datagram (from the data channel, a unicast, or an announcement carried by the
    /// election heartbeat). Decrypts in place. Apply the returned [`Write`] before polling events.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &'a mut [u8],
    ) -> Option<Write<'a>> {
        if let Some((session, seq)) = wire::tree_frame_claim(datagram) {
            return self.on_tree_frame(now, session, seq, datagram);
        }
        if let Some((session, seqs)) = wire::coded_claim(datagram)
            && let Some(sess) = self
                .session
                .as_ref()
                .filter(|s| s.announce.session == session && s.state == State::Receiving)
            && let lacking = seqs.filter(|s| !sess.held.contains(*s)).count()
            && lacking != 1
        {
            // A coded repair this member cannot use (it lacks none, or several, of its frames):
            // skipped before its tag is hashed. The claim is unverified, so a forgery lands
            // here too, and changes nothing.
            self.stats.coded_useless += 1;
            self.stats.coded_lacking_several += u64::from(lacking > 1);
            return None;
        }
        let (header, payload_len, announce, solicit) = match wire::open(&self.keys, datagram) {
            Err(e) => {
                self.stats.dropped.count(&e);
                return None;
            }
            Ok(Message::Checkpoint(c)) => {
                self.on_checkpoint(now, c);
                return None;
            }
            Ok(Message::Data(h, p)) => (Some(h), p.len(), None, None),
            Ok(Message::Coded(h, p)) => {
                let n = p.len();
                return self.on_coded(now, h, n, datagram);
            }
            Ok(Message::Announce(a)) => (None, 0, Some(a), None),
            Ok(Message::Solicit(s)) => (None, 0, None, Some(s)),
            Ok(Message::Report(_)) => {
                self.stats.dropped.ignored += 1;
                return None;
            }
        };
        if let Some(a) = announce {
            let inline = a.inline.as_ref().map(Vec::len);
            if !self.on_announce(now, from, a) {
                return None;
            }
            // The inline payload is the last field before the tag.
            let n = inline?;
            let end = datagram.len() - TAG_LEN;
            return self.accept_frame(now, 0, &mut datagram[end - n..end]);
        }
        if let Some(s) = solicit {
            self.on_solicit(now, s);
            return None;
        }
        let h = header.expect("data frame");
        let Some(sess) = self.session.as_mut().filter(|s| s.announce.session == h.session) else {
            self.stats.dropped.foreign_session += 1;
            return None;
        };
        sess.last_heard = now;
        if !sess.frame_in_range(&h) {
            self.stats.dropped.out_of_range += 1;
            return None;
        }
        let end = datagram.len() - TAG_LEN;
        self.accept_frame(now, h.seq, &mut datagram[end - payload_len..end])
    }

    /// A coded repair: usable when this member lacks exactly one of its frames (the driver
    /// XORs the others, read from the file, out of the payload).
    fn on_coded<'a>(
        &mut self,
        now: Instant,
        h: wire::CodedHeader,
        payload_len: usize,
        datagram: &'a mut [u8],
    ) -> Option<Write<'a>> {
        let Some(sess) = self.session.as_mut().filter(|s| s.announce.session == h.session) else {
            self.stats.dropped.foreign_session += 1;
            return None;
        };
        let fs = u64::from(sess.announce.frame_size);
        let (size, frames) = (sess.announce.info.size, sess.frames);
        let frame_len = |seq: u32| (size - u64::from(seq) * fs).min(fs);
        if sess.announce.encrypted
            || h.assignment != sess.announce.info.assignment
            || h.seqs.iter().any(|s| *s >= frames)
            || h.seqs.iter().map(|s| frame_len(*s)).max() != Some(u64::from(h.len))
        {
            self.stats.dropped.out_of_range += 1;
            return None;
        }
        sess.last_heard = now;
        let mut missing = h.seqs.iter().filter(|s| !sess.held.contains(**s));
        let (first, second) = (missing.next(), missing.next());
        let (Some(&target), None) = (first, second) else {
            self.stats.coded_useless += 1;
            self.stats.coded_lacking_several += u64::from(second.is_some());
            return None;
        };
        if sess.state != State::Receiving {
            self.stats.duplicates += 1;
            return None;
        }
        let xor = h
            .seqs
            .iter()
            .filter(|s| **s != target)
            .map(|s| (u64::from(*s) * fs, frame_len(*s) as usize))
            .collect();
        self.stats.coded_used += 1;
        let end = datagram.len() - TAG_LEN;
        let bytes: &'a [u8] = &datagram[end - payload_len..end];
        Some(Write {
            session: h.session,
            seq: target,
            offset: u64::from(target) * fs,
            bytes,
            cv: None,
            coded: Some(Coded { len: frame_len(target) as usize, xor }),
        })
    }

    /// A tree-tagged data frame: found by its (unverified) session and sequence number, then
    /// verified with the session's frame size.
    fn on_tree_frame<'a>(
        &mut self,
        now: Instant,
        session: u64,
        seq: u32,
        datagram: &'a mut [u8],
    ) -> Option<Write<'a>> {
        let Some(sess) =
            self.session.as_mut().filter(|s| s.announce.session == session && s.announce.tree)
        else {
            // Unverifiable without the session's frame size: foreign, stale or forged.
            self.stats.dropped.foreign_session += 1;
            return None;
        };
        if sess.state != State::Receiving || sess.held.contains(seq) {
            // A repair of a frame we hold: skipped before hashing it (the claim is unverified,
            // so a forgery lands here too, and changes nothing).
            self.stats.duplicates += 1;
            return None;
        }
        let frame = match wire::open_tree_data(&self.keys, datagram, sess.announce.frame_size) {
            Ok(f) => f,
            Err(e) => {
                self.stats.dropped.count(&e);
                return None;
            }
        };
        sess.last_heard = now;
        let h = frame.header;
        if !sess.frame_in_range(&h) {
            self.stats.dropped.out_of_range += 1;
            return None;
        }
        let cv = frame.cv;
        self.accept_frame(now, h.seq, &mut datagram[frame.payload])
            .map(|w| Write { cv: Some(cv), ..w })
    }

    /// Common path for a data frame's payload (or an inline announcement's): dedupe, decrypt,
    /// record, and hand out the write.
    fn accept_frame<'a>(
        &mut self,
        _now: Instant,
        seq: u32,
        payload: &'a mut [u8],
    ) -> Option<Write<'a>> {
        let sess = self.session.as_mut()?;
        if sess.state != State::Receiving || (sess.frames > 0 && sess.held.contains(seq)) {
            self.stats.duplicates += 1;
            return None;
        }
        let plain: &'a mut [u8] = match &sess.cipher {
            Some(c) => match c.open_in_place(seq, payload) {
                Some(p) => p,
                None => {
                    self.stats.dropped.bad_ciphertext += 1;
                    return None;
                }
            },
            None if sess.announce.encrypted => {
                self.stats.dropped.bad_ciphertext += 1;
                return None;
            }
            None => payload,
        };
        let offset = u64::from(seq) * u64::from(sess.announce.frame_size);
        Some(Write {
            session: sess.announce.session,
            seq,
            offset,
            bytes: plain,
            cv: None,
            coded: None,
        })
    }

    /// The driver stored `write` durably enough: the frame now counts as held. When it was the
    /// last one, [`RxEvent::Verify`] follows.
    pub fn written(&mut self, session: u64, seq: u32, len: usize) {
        let Some(sess) = self
            .session
            .as_mut()
            .filter(|s| s.announce.session == session && s.state == State::Receiving)
        else {
            return;
        };
        if sess.frames > 0 && !sess.held.insert(seq) {
            return;
        }
        self.stats.frames += 1;
        self.stats.bytes += len as u64;
        if sess.frames == 0 || sess.held.is_full() {
            sess.state = State::Verifying;
            self.events.push_back(RxEvent::Verify { session, info: sess.announce.info.clone() });
        }
    }

    /// Returns true when an inline payload in this announcement should be accepted.
    fn on_announce(&mut self, now: Instant, from: SocketAddr, a: Announce) -> bool {
        if !a.targets.selects(self.cfg.member) {
            // A run for other servers of the segment: not ours to receive or report on.
            self.stats.not_targeted += 1;
            return false;
        }
        if !self.admits(&a) {
            self.stats.dropped.stale_announce += 1;
            return false;
        }
        if self.announcers.accept(&a.origin) {
            self.announcers_changed = true;
        }
        let report_to = SocketAddr::new(from.ip(), a.report_port);
        if let Some(s) = self.session.as_mut()
            && s.announce.session == a.session
        {
            s.report_to = report_to;
            s.last_heard = now;
            s.announce.pass = a.pass;
            return s.state == State::Receiving && a.inline.is_some();
        }
        let cipher = a
            .encrypted
            .then(|| self.keys.payload_cipher(a.session, a.info.assignment, &a.info.hash));
        let same_content = |s: &Session| {
            s.announce.info == a.info
                && s.announce.frame_size == a.frame_size
                && s.frames == a.frame_count()
        };
        // A new GL resending the same content: keep what we have.
        if let Some(s) = self.session.as_mut()
            && same_content(s)
            && matches!(s.state, State::Receiving | State::Verifying | State::Complete)
        {
            s.announce = a.clone();
            s.report_to = report_to;
            s.last_heard = now;
            s.cipher = cipher;
            s.report_due = None;
            if s.state == State::Complete {
                self.schedule_report(now, 0, Duration::from_millis(20));
            } else {
                self.events.push_back(RxEvent::Started {
                    session: a.session,
                    info: a.info.clone(),
                    resumed: true,
                    tree: tree_layout(&a),
                });
            }
            return false;
        }
        if let Some(old) = self.session.take()
            && matches!(old.state, State::Receiving | State::Verifying)
        {
            self.events.push_back(RxEvent::Abandoned {
                session: old.announce.session,
                info: old.announce.info.clone(),
                reason: "superseded by a new session".into(),
            });
        }
        let frames = a.frame_count();
        let tree = tree_layout(&a);
        let already = self.held_hashes.contains(&a.info.hash);
        let info = a.info.clone();
        let session = a.session;
        let inline = a.inline.is_some();
        self.session = Some(Session {
            announce: a,
            frames,
            held: FrameSet::new(frames),
            report_to,
            state: if already { State::Complete } else { State::Receiving },
            last_heard: now,
            cipher,
            report_due: None,
            gaps_due: None,
        });
        if already {
            self.events.push_back(RxEvent::AlreadyHeld { session, info });
            // Answer at once, spread over a few milliseconds so a thousand members do not
            // collide, yet inside the GL's announcing phase (announcements 5 ms apart), so a GL
            // whose members all hold the content sends none of it.
            self.schedule_report(now, 0, HELD_ANSWER_SPREAD);
            false
        } else {
            self.events.push_back(RxEvent::Started { session, info, resumed: false, tree });
            inline
        }
    }

    fn on_solicit(&mut self, now: Instant, s: Solicit) {
        let me = self.cfg.member;
        let Some(sess) = self.session.as_mut().filter(|x| x.announce.session == s.session) else {
            self.stats.dropped.foreign_session += 1;
            return;
        };
        sess.last_heard = now;
        let incomplete = matches!(sess.state, State::Receiving | State::Verifying);
        if incomplete || s.selector.selects(me) {
            self.schedule_report(now, s.round, Duration::from_micros(u64::from(s.window_us)));
        }
    }

    /// Mid-pass: answer with the window's gaps (possibly none) after a random delay. Only a
    /// member still receiving answers; one that holds every frame has nothing to say.
    fn on_checkpoint(&mut self, now: Instant, c: Checkpoint) {
        let Some(sess) = self.session.as_mut().filter(|x| x.announce.session == c.session) else {
            self.stats.dropped.foreign_session += 1;
            return;
        };
        sess.last_heard = now;
        if sess.state != State::Receiving || sess.frames == 0 {
            return;
        }
        let window = Duration::from_micros(u64::from(c.window_us));
        let at = now + window * self.rng.random_range(0..16u32) / 16;
        sess.gaps_due = Some(match sess.gaps_due {
            // Not answered yet: one answer covers both windows, at the earlier time.
            Some(d) => GapsDue {
                at: d.at.min(at),
                checkpoint: c.checkpoint.max(d.checkpoint),
                from: d.from.min(c.from),
                upto: d.upto.max(c.upto),
            },
            None => GapsDue { at, checkpoint: c.checkpoint, from: c.from, upto: c.upto },
        });
    }

    /// A report at a random multiple of window/16 from now: no report implosion.
    fn schedule_report(&mut self, now: Instant, round: u32, window: Duration) {
        let slot = self.rng.random_range(0..16u32);
        let at = now + window * slot / 16;
        if let Some(s) = self.session.as_mut() {
            s.report_due = Some((at, round));
        }
    }

    /// The driver's answer to [`RxEvent::Verify`]: does the file's BLAKE3 match?
    pub fn verified(&mut self, now: Instant, session: u64, ok: bool) {
        let Some(s) = self
            .session
            .as_mut()
            .filter(|s| s.announce.session == session && s.state == State::Verifying)
        else {
            return;
        };
        let info = s.announce.info.clone();
        if ok {
            s.state = State::Complete;
            self.held_hashes.push(info.hash);
            self.events.push_back(RxEvent::Delivered { session, info });
        } else {
            s.state = State::Failed(
                "BLAKE3 of the received assignment does not match the announcement".into(),
            );
            self.events.push_back(RxEvent::Abandoned {
                session,
                info,
                reason: "hash mismatch".into(),
            });
        }
        // Tell the GL promptly: a report owed (not yet sent) goes now, and a
        // member nobody asked yet says "complete" unprompted after a short random delay, so a
        // lost end-of-pass solicitation does not leave the GL guessing.
        match self.session.as_mut().and_then(|s| s.report_due.map(|d| (s, d))) {
            Some((s, (at, round))) => s.report_due = Some((at.min(now), round)),
            None => self.schedule_report(now, 0, Duration::from_millis(20)),
        }
    }

    /// The driver could not store the session's data (disk full, I/O error): the member gives up
    /// on this session and says why in its reports.
    pub fn storage_failed(&mut self, session: u64, reason: String) {
        let Some(s) = self.session.as_mut().filter(|s| s.announce.session == session) else {
            return;
        };
        if matches!(s.state, State::Receiving | State::Verifying) {
            s.state = State::Failed(format!("storage: {reason}"));
            self.events.push_back(RxEvent::Abandoned {
                session,
                info: s.announce.info.clone(),
                reason,
            });
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let s = self.session.as_ref()?;
        let gaps = s.gaps_due.filter(|_| s.state == State::Receiving).map(|g| g.at);
        let report = match (s.report_due.map(|(t, _)| t), gaps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expiry = matches!(s.state, State::Receiving | State::Verifying)
            .then(|| s.last_heard + self.cfg.session_timeout);
        match (report, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(s) = self.session.as_mut() else { return };
        if matches!(s.state, State::Receiving | State::Verifying)
            && now >= s.last_heard + self.cfg.session_timeout
        {
            let s = self.session.take().expect("checked");
            self.events.push_back(RxEvent::Abandoned {
                session: s.announce.session,
                info: s.announce.info,
                reason: "no datagram from the group leader within the session timeout".into(),
            });
            return;
        }
        if let Some(g) = s.gaps_due
            && now >= g.at
        {
            s.gaps_due = None;
            if s.state == State::Receiving {
                self.send_gaps(g);
            }
        }
        let Some(s) = self.session.as_mut() else { return };
        if let Some((at, round)) = s.report_due
            && now >= at
        {
            s.report_due = None;
            self.send_report(round);
        }
    }

    fn send_gaps(&mut self, g: GapsDue) {
        let me = self.cfg.member;
        let s = self.session.as_ref().expect("caller checked");
        let runs: Vec<(u32, u32)> = s
            .held
            .absent_runs_in(g.from, g.upto)
            .take(MAX_GAP_PARTS * MAX_RUNS_PER_REPORT)
            .collect();
        let chunks: Vec<&[(u32, u32)]> =
            if runs.is_empty() { vec![&[]] } else { runs.chunks(MAX_RUNS_PER_REPORT).collect() };
        let parts = chunks.len() as u16;
        let to = s.report_to;
        for (i, c) in chunks.into_iter().enumerate() {
            let r = Report {
                session: s.announce.session,
                member: me,
                round: g.checkpoint,
                part: i as u16,
                parts,
                status: ReportStatus::Gaps(c.to_vec()),
            };
            self.stats.reports_sent += 1;
            self.queue.push_back(Transmit { dest: Dest::To(to), payload: r.encode(&self.keys) });
        }
    }

    fn send_report(&mut self, round: u32) {
        let me = self.cfg.member;
        let s = self.session.as_ref().expect("caller checked");
        let base = |part, parts, status| Report {
            session: s.announce.session,
            member: me,
            round,
            part,
            parts,
            status,
        };
        let reports: Vec<Report> = match &s.state {
            State::Complete => vec![base(0, 1, ReportStatus::Complete)],
            State::Failed(reason) => vec![base(0, 1, ReportStatus::Failed(reason.clone()))],
            // Hashing and flushing a large file takes a while: say so, or the GL counts our
            // silence as a stalled round and may give up on a member about to deliver.
            State::Verifying => vec![base(0, 1, ReportStatus::Verifying)],
            State::Receiving if s.frames == 0 => return, // inline: nothing to NACK until the announcement arrives
            State::Receiving => {
                let max = usize::from(self.cfg.max_report_parts) * MAX_RUNS_PER_REPORT;
                let runs: Vec<(u32, u32)> = s.held.absent_runs().take(max).collect();
                let chunks: Vec<&[(u32, u32)]> = runs.chunks(MAX_RUNS_PER_REPORT).collect();
                let parts = chunks.len() as u16;
                chunks
                    .iter()
                    .enumerate()
                    .map(|(i, c)| base(i as u16, parts, ReportStatus::Missing(c.to_vec())))
                    .collect()
            }
        };
        let to = s.report_to;
        for r in reports {
            self.stats.reports_sent += 1;
            self.queue.push_back(Transmit { dest: Dest::To(to), payload: r.encode(&self.keys) });
        }
    }

    /// The next datagram to send: always `Dest::To` the GL's report port.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.queue.pop_front()
    }

    /// True when [`Receiver::poll_event`] has something: a driver that batches writes applies
    /// them before handling a new session's events.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<RxEvent> {
        self.events.pop_front()
    }
}
