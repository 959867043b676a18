//! What one node must remember across restarts, and its byte format. No file IO here: the
//! machine hands out [`Save`]s ([`crate::Election::poll_save`]), the driver stores them, and
//! gives the last one back to [`crate::Election::resume`] when the node starts again.
//!
//! - **Incarnation.** Every datagram's header carries the sender's incarnation, and receivers
//!   reject an incarnation lower than one they have seen. A restarted node must therefore use
//!   a strictly higher one even if the wall clock stepped back: [`next_incarnation`] takes the
//!   larger of the clock and the saved incarnation + 1, and the driver stores it (synced) before
//!   the first datagram goes out.
//! - **Control channel and its epoch.** A node that restarts after the leader moved the segment
//!   must come back on the new channel, and must not follow an old (replayed) move.
//! - **Replay windows.** Without them a restarted node would accept, once, any datagram it had
//!   already accepted before it stopped (a recorded Leader Alive of a leader that has since
//!   died, say). Windows change with every accepted datagram; such saves are marked not
//!   `sync`: the driver writes them without fsync, which survives a process crash (the page
//!   cache keeps them) though an OS crash may lose the last seconds.
//!
//! Layout (big-endian, `cm_wire`):
//!
//! ```text
//! magic "CMES" | version u8 = 1 | cluster u64 | node u64 | incarnation u64
//! configured channel (addr) | control channel (addr) | channel epoch u32
//! k u8 (≤ 4) | k × old channel (addr)
//! running u8 (0/1) | f u8 (≤ 16) | f × crashed incarnation u64
//! n u32 | n × (sender u64 | incarnation u64 | highest u64 | seen u64)
//! check: 16-byte keyed BLAKE3 of everything before it (cm_wire::mac, a fixed public key:
//!        a corruption check, not authentication — whoever can write the node's data
//!        directory can do worse)
//! ```
//! (`addr` = `family u8 (4/6) · ip · port u16`, as in the datagrams.)

use std::net::SocketAddr;

use cm_wire::mac::{MacKey, TAG_LEN};
use cm_wire::{DecodeError, Reader, Writer};

use crate::machine::MAX_OLD_CHANNELS;
use crate::priority::NodeId;
use crate::replay::ReplayRecord;
use crate::wire::{read_addr, write_addr};

pub const MAGIC: [u8; 4] = *b"CMES";
pub const VERSION: u8 = 1;
const CHECK_LEN: usize = TAG_LEN;
const RECORD_LEN: usize = 32;

/// Everything a node carries from one run to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartState {
    pub cluster_id: u64,
    pub node: NodeId,
    /// The incarnation of the run that saved this.
    pub incarnation: u64,
    /// The control channel the configuration named when this was saved: when the operator
    /// configures another one, the saved channel (and its epoch) no longer applies.
    pub configured_channel: SocketAddr,
    /// Where the segment's control traffic was when this was saved (after any moves).
    pub control_channel: SocketAddr,
    /// The epoch of the last channel move followed; older moves are ignored.
    pub channel_epoch: u32,
    /// Channels the segment moved away from, most recent first (a leader keeps announcing
    /// the move there); at most [`crate::machine::MAX_OLD_CHANNELS`].
    pub old_channels: Vec<SocketAddr>,
    /// True while the run that saved this is going; a clean stop ([`crate::Election::leave`])
    /// saves false. Found true at the next start, the previous run crashed.
    pub running: bool,
    /// Incarnations (start times, µs) of the runs that crashed within
    /// [`RECENT_FAILURE_WINDOW`], most recent first, at most [`MAX_FAILURES`]: the measured
    /// "recent failures" of the priority formula.
    pub failures: Vec<u64>,
    /// Every sender's replay window.
    pub replay: Vec<ReplayRecord>,
}

/// How long a crash counts as a recent failure: a week, the formula's uptime horizon.
pub const RECENT_FAILURE_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(7 * 24 * 3600);
/// Most crashes remembered (each halves the reliability term; more change nothing).
pub const MAX_FAILURES: usize = 16;

/// The crash history a run starting with `incarnation` carries: the saved one, plus the saved
/// run itself if it never stopped cleanly, without those older than [`RECENT_FAILURE_WINDOW`].
pub fn recent_failures(saved: &RestartState, incarnation: u64) -> Vec<u64> {
    let window = u64::try_from(RECENT_FAILURE_WINDOW.as_micros()).unwrap_or(u64::MAX);
    let crashed = saved.running.then_some(saved.incarnation);
    let mut failures: Vec<u64> = crashed
        .into_iter()
        .chain(saved.failures.iter().copied())
        .filter(|&f| incarnation.saturating_sub(f) < window)
        .collect();
    failures.truncate(MAX_FAILURES);
    failures
}

/// A restart state to store, from [`crate::Election::poll_save`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Save {
    pub state: RestartState,
    /// The incarnation or the control channel changed: make it durable (fsync) before sending
    /// anything else. Otherwise only replay windows changed; a plain write is enough.
    pub sync: bool,
}

/// Why a stored restart state cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestartStateError {
    #[error("not an election restart state: {0}")]
    Malformed(DecodeError),
    #[error("restart state check failed (the file is corrupt or truncated)")]
    BadCheck,
    #[error("restart state belongs to node {node} of cluster {cluster:#x}, not to this node")]
    OtherNode { cluster: u64, node: NodeId },
    #[error(
        "incarnation {configured} does not exceed the saved incarnation {saved}; use next_incarnation"
    )]
    StaleIncarnation { configured: u64, saved: u64 },
}

/// The incarnation of a run starting now: the wall clock (µs since the Unix epoch) unless a
/// previous run used that much or more (the clock stepped back), then one more than that.
pub fn next_incarnation(saved: Option<&RestartState>, clock_micros: u64) -> u64 {
    let floor = saved.map_or(0, |s| s.incarnation.saturating_add(1));
    clock_micros.max(floor).max(1)
}

fn check_key() -> MacKey {
    MacKey::derive("contentmover election restart state v1", b"")
}

impl RestartState {
    /// The state of a node that has never moved channel, failed or heard a peer: where a saved
    /// state's history starts (tests and tools build on it with struct update syntax).
    pub fn first_run(
        cluster_id: u64,
        node: u64,
        incarnation: u64,
        channel: SocketAddr,
    ) -> RestartState {
        RestartState {
            cluster_id,
            node,
            incarnation,
            configured_channel: channel,
            control_channel: channel,
            channel_epoch: 0,
            old_channels: vec![],
            running: false,
            failures: vec![],
            replay: vec![],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(80 + self.replay.len() * RECORD_LEN + CHECK_LEN);
        w.bytes(&MAGIC).u8(VERSION).u64(self.cluster_id).u64(self.node).u64(self.incarnation);
        write_addr(&mut w, &self.configured_channel);
        write_addr(&mut w, &self.control_channel);
        w.u32(self.channel_epoch);
        w.u8(u8::try_from(self.old_channels.len()).expect("a handful of old channels"));
        for c in &self.old_channels {
            write_addr(&mut w, c);
        }
        w.bool(self.running);
        w.u8(u8::try_from(self.failures.len()).expect("at most MAX_FAILURES"));
        for &f in &self.failures {
            w.u64(f);
        }
        w.u32(u32::try_from(self.replay.len()).expect("fewer than 2^32 senders"));
        for r in &self.replay {
            w.u64(r.sender).u64(r.incarnation).u64(r.highest).u64(r.seen);
        }
        let mut out = w.into_vec();
        check_key().seal(&mut out);
        out
    }

    /// Decodes a stored state. Never panics; a truncated or altered file fails the check.
    pub fn decode(bytes: &[u8]) -> Result<Self, RestartStateError> {
        if bytes.len() < MAGIC.len() + CHECK_LEN {
            return Err(RestartStateError::Malformed(DecodeError::Incomplete {
                needed: MAGIC.len() + CHECK_LEN - bytes.len(),
            }));
        }
        if Reader::new(bytes).array::<4>().map_err(RestartStateError::Malformed)? != MAGIC {
            return Err(RestartStateError::Malformed(DecodeError::malformed("bad magic")));
        }
        let body = check_key().open(bytes).ok_or(RestartStateError::BadCheck)?;
        let mut r = Reader::new(body);
        r.array::<4>().map_err(RestartStateError::Malformed)?;
        Self::decode_body(&mut r).map_err(RestartStateError::Malformed)
    }

    fn decode_body(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8()? != VERSION {
            return Err(DecodeError::malformed("unsupported restart state version"));
        }
        let (cluster_id, node, incarnation) = (r.u64()?, r.u64()?, r.u64()?);
        let configured_channel = read_addr(r)?;
        let control_channel = read_addr(r)?;
        let channel_epoch = r.u32()?;
        let k = usize::from(r.u8()?);
        if k > MAX_OLD_CHANNELS {
            return Err(DecodeError::malformed("too many old channels"));
        }
        let old_channels = (0..k).map(|_| read_addr(r)).collect::<Result<Vec<_>, _>>()?;
        let running = r.bool()?;
        let f = usize::from(r.u8()?);
        if f > MAX_FAILURES {
            return Err(DecodeError::malformed("too many recorded failures"));
        }
        let failures = (0..f).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
        let n = r.u32()? as usize;
        // The count is checked against what remains before anything is sized by it.
        if n.checked_mul(RECORD_LEN) != Some(r.remaining()) {
            return Err(DecodeError::malformed("replay record count does not match the length"));
        }
        let mut replay = Vec::with_capacity(n);
        for _ in 0..n {
            let rec = ReplayRecord {
                sender: r.u64()?,
                incarnation: r.u64()?,
                highest: r.u64()?,
                seen: r.u64()?,
            };
            if replay.last().is_some_and(|p: &ReplayRecord| p.sender >= rec.sender) {
                return Err(DecodeError::malformed("replay records not sorted by sender"));
            }
            replay.push(rec);
        }
        r.finish()?;
        Ok(RestartState {
            cluster_id,
            node,
            incarnation,
            configured_channel,
            control_channel,
            channel_epoch,
            old_channels,
            running,
            failures,
            replay,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
        ]
    }

    fn arb_state() -> impl Strategy<Value = RestartState> {
        let records =
            proptest::collection::btree_map(any::<u64>(), any::<(u64, u64, u64)>(), 0..40);
        let olds = proptest::collection::vec(arb_addr(), 0..=MAX_OLD_CHANNELS);
        let failures = (any::<bool>(), proptest::collection::vec(any::<u64>(), 0..=MAX_FAILURES));
        (any::<(u64, u64, u64, u32)>(), arb_addr(), arb_addr(), olds, failures, records).prop_map(
            |(
                (cluster_id, node, incarnation, channel_epoch),
                a,
                b,
                old_channels,
                (running, failures),
                recs,
            )| {
                let replay = recs
                    .into_iter()
                    .map(|(sender, (incarnation, highest, seen))| ReplayRecord {
                        sender,
                        incarnation,
                        highest,
                        seen,
                    })
                    .collect();
                RestartState {
                    cluster_id,
                    node,
                    incarnation,
                    configured_channel: a,
                    control_channel: b,
                    channel_epoch,
                    old_channels,
                    running,
                    failures,
                    replay,
                }
            },
        )
    }

    proptest! {
        #[test]
        fn round_trip(state in arb_state()) {
            prop_assert_eq!(RestartState::decode(&state.encode()), Ok(state));
        }

        #[test]
        fn every_truncation_or_flipped_bit_is_refused(state in arb_state(), cut in any::<prop::sample::Index>(), bit in any::<prop::sample::Index>()) {
            let bytes = state.encode();
            prop_assert!(RestartState::decode(&bytes[..cut.index(bytes.len())]).is_err());
            let mut flipped = bytes.clone();
            let b = bit.index(bytes.len() * 8);
            flipped[b / 8] ^= 1 << (b % 8);
            prop_assert!(RestartState::decode(&flipped).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = RestartState::decode(&bytes);
        }
    }

    #[test]
    fn incarnations_grow_even_when_the_clock_steps_back() {
        let channel: SocketAddr = "239.1.1.1:7000".parse().unwrap();
        let saved = |incarnation| RestartState::first_run(1, 2, incarnation, channel);
        assert_eq!(next_incarnation(None, 5_000), 5_000);
        assert_eq!(next_incarnation(Some(&saved(4_000)), 5_000), 5_000);
        assert_eq!(next_incarnation(Some(&saved(9_000)), 5_000), 9_001, "the clock went back");
        assert_eq!(next_incarnation(None, 0), 1);
    }

    #[test]
    fn crashes_count_for_a_week() {
        let day = 24 * 3600 * 1_000_000u64;
        let mut s = RestartState {
            running: true,
            failures: vec![9 * day, 2 * day],
            ..RestartState::first_run(1, 2, 10 * day, "239.1.1.1:7000".parse().unwrap())
        };
        assert_eq!(
            recent_failures(&s, 11 * day),
            vec![10 * day, 9 * day],
            "the crashed run counts, the 9-day-old crash does not"
        );
        s.running = false;
        assert_eq!(recent_failures(&s, 11 * day), vec![9 * day], "a clean stop is no failure");
        s.failures = (0..40).map(|i| 10 * day - i).collect();
        assert_eq!(recent_failures(&s, 11 * day).len(), MAX_FAILURES);
    }
}
