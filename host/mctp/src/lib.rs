//! Sans-IO MCTP: the reliable multicast transport a group leader uses to hand an assignment to
//! the members of its segment. No sockets, no clocks, no tokio: callers pass time in, feed
//! datagrams, and send what the state machines hand out (like quinn-proto or str0m).
//!
//! - [`Sender`]: the group leader's session (announce, paced passes, NACK aggregation, rate
//!   control, solicitation, quorum, final [`SessionReport`]).
//! - [`Receiver`]: a member (frames out to the driver for writing, missing-frame tracking,
//!   randomly delayed reports, BLAKE3 verification before delivery).
//! - [`replay`]: which announcements are fresh (a member never goes back to an older session).
//! - [`wire`]: datagram layouts; [`keys`]: keyed-BLAKE3 tags and optional ChaCha20-Poly1305.
//! - `sim` (feature `sim`): the deterministic simulation harness (seeded, virtual time, lossy
//!   network), for the tests; release binaries do not carry it.
//!
//! Time is [`Instant`] and control datagrams are [`Transmit`]s to a [`Dest`], the types every
//! protocol core shares (`cm-sansio`, re-exported here). The protocol is described in
//! `docs/mctp.md`.

pub mod frameset;
pub mod keys;
pub mod receiver;
pub mod replay;
pub mod sender;
#[cfg(feature = "sim")]
pub mod sim;
pub mod tree;
pub mod wire;

pub use cm_sansio::{Dest, Instant, Transmit};
pub use keys::Keys;
pub use receiver::{
    AnnouncerFilter, Coded, Receiver, ReceiverConfig, ReceiverStats, RxEvent, Write,
};
pub use replay::Announcers;
pub use sender::{
    CodedRequest, FrameRequest, Member, MemberStatus, Outcome, Output, Sender, SenderConfig,
    SenderError, SenderEvent, SenderStats, SessionReport,
};
pub use wire::{Announce, Origin, SessionInfo, WireError};

/// A member's identity (from election registration).
pub type MemberId = u64;

/// Datagrams dropped, by reason. Nothing dropped ever reaches a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounts {
    /// Tag did not verify: forged, foreign cluster, or damaged.
    pub bad_tag: u64,
    /// Authenticated but undecodable (wrong magic, version or layout).
    pub malformed: u64,
    /// Authenticated ciphertext whose AEAD tag failed, or plaintext in an encrypted session.
    pub bad_ciphertext: u64,
    /// For a session we are not in.
    pub foreign_session: u64,
    /// Sequence, length or runs outside the session.
    pub out_of_range: u64,
    /// Valid but not meant for this role (e.g. our own multicast looped back).
    pub ignored: u64,
    /// Announcements that are not fresh (a replay of an older session, or of a session this
    /// member already finished) or not from the GL it follows.
    pub stale_announce: u64,
}

impl DropCounts {
    pub fn count(&mut self, e: &WireError) {
        match e {
            WireError::BadTag => self.bad_tag += 1,
            WireError::BadCiphertext => self.bad_ciphertext += 1,
            _ => self.malformed += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.bad_tag
            + self.malformed
            + self.bad_ciphertext
            + self.foreign_session
            + self.out_of_range
            + self.ignored
            + self.stale_announce
    }
}
