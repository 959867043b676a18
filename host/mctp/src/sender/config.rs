//! What a sending group leader is told: its tunables, and the members it expects.

use crate::MemberId;
use crate::wire;
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
    /// Who announces, and the session's place among this GL's sessions: the announcement
    /// carries it and members start only sessions newer than any they accepted from this node
    /// ([`crate::replay`]). The driver sets it: node id, an incarnation that grows with every
    /// start of the GL's process, and a sequence that grows with every session. Starting two
    /// sessions with the same origin makes members ignore the second.
    pub origin: wire::Origin,
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
    /// [`super::MAX_CODED_PEERS`] members (the GL keeps each member's gaps).
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
            origin: wire::Origin::default(),
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
