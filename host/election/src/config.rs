//! Configuration of one node's election: identity, timing, eligibility, registration details.

use std::net::SocketAddr;
use std::time::Duration;

use cm_wire::mac::MacKey;
use thiserror::Error;

use crate::priority::{NodeId, PriorityInputs};

/// Every timer of the protocol. [`Timing::scaled`] derives them all from the heartbeat.
///
/// The seed gives its timers in seconds (a 5 s minimum claim delay for a deposed leader, a
/// 10 s initial claim period, a 10–15 s voting window, a member report 3–5 s after the last
/// registration, re-registration after a random delay up to 1 s). We keep those ratios and map
/// one "seed second" to `heartbeat / 40`: silence detection (three missed heartbeats) then
/// dominates, and failover stays within VRRP's figure for the same interval (see
/// `docs/election.md`). The voting window (h/4 … 3h/8) still dwarfs LAN latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Interval between the leader's "Leader Alive" messages.
    pub heartbeat: Duration,
    /// Silence after which a member gives up on its leader (the seed: three missed LAs).
    pub leader_timeout: Duration,
    /// Claim delay of a recently deposed leader: the fastest possible claim (seed: 5 s).
    pub claim_min: Duration,
    /// Claim delay of the strongest ordinary candidate (seed: 10 s).
    pub claim_initial: Duration,
    /// Added to `claim_initial` in proportion to how weak a candidate is: the weakest waits
    /// `claim_initial + claim_spread`.
    pub claim_spread: Duration,
    /// Random jitter added to each claim delay so equal candidates do not claim in lockstep.
    pub claim_jitter: Duration,
    /// The voting window after our own claim (seed: 10–15 s), drawn uniformly in this range.
    pub voting_window_min: Duration,
    pub voting_window_max: Duration,
    /// How long to wait in "concede" for the winner's first Leader Alive.
    pub concede_timeout: Duration,
    /// For this long after losing leadership a node claims as the incumbent, fastest.
    pub deposed_memory: Duration,
    /// A new member registers after a random delay below this (spreads the registrations).
    pub registration_spread: Duration,
    /// The leader reports its members this long after the last new registration (seed: 3–5 s).
    pub report_delay_min: Duration,
    pub report_delay_max: Duration,
    /// A member missing from a report re-registers after a random delay below this (seed: 1 s).
    pub reregister_max: Duration,
    /// The leader repeats its member report this often even when nothing changed.
    pub report_refresh: Duration,
    /// A registered member refreshes its registration this often (its liveness signal).
    pub member_refresh: Duration,
    /// The leader drops a member it has not heard from for this long.
    pub member_timeout: Duration,
    /// After moving the control channel the leader keeps announcing the move on the old channel
    /// for this long, so members that missed it follow.
    pub channel_move_linger: Duration,
    /// After the linger, a leader announces the move on each earlier channel this often, for
    /// good: a node that was down through the move, or a new one configured with the
    /// original channel, hears it before it would claim (shorter than `leader_timeout`).
    pub channel_reannounce: Duration,
}

impl Timing {
    /// All timers derived from the heartbeat (see the type's documentation).
    pub fn scaled(heartbeat: Duration) -> Self {
        let seed_second = heartbeat / 40;
        Timing {
            heartbeat,
            leader_timeout: heartbeat * 3,
            claim_min: seed_second * 5,
            claim_initial: seed_second * 10,
            claim_spread: seed_second * 10,
            claim_jitter: seed_second / 4,
            voting_window_min: seed_second * 10,
            voting_window_max: seed_second * 15,
            concede_timeout: seed_second * 15 + heartbeat * 2,
            deposed_memory: heartbeat * 10,
            registration_spread: heartbeat,
            report_delay_min: seed_second * 3,
            report_delay_max: seed_second * 5,
            reregister_max: seed_second,
            report_refresh: heartbeat * 10,
            member_refresh: heartbeat * 10,
            member_timeout: heartbeat * 35,
            channel_move_linger: heartbeat * 10,
            channel_reannounce: heartbeat * 2,
        }
    }

    /// The longest a member can go without knowing a leader after the leader dies, when the
    /// network delivers every message within `max_delay`: silence detection, the slowest
    /// claim, the longest voting window, and the first Leader Alive in flight.
    pub fn failover_bound(&self, max_delay: Duration) -> Duration {
        self.leader_timeout
            + self.claim_initial
            + self.claim_spread
            + self.claim_jitter
            + self.voting_window_max
            + max_delay * 3
    }

    /// Checks the relations the state machine relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what| Err(ConfigError::Timing(what));
        if self.heartbeat.is_zero() {
            return bad("heartbeat must be positive");
        }
        if self.leader_timeout <= self.heartbeat {
            return bad("leader_timeout must exceed the heartbeat");
        }
        if self.claim_min > self.claim_initial {
            return bad(
                "claim_min must not exceed claim_initial (the deposed leader claims first)",
            );
        }
        if self.voting_window_min.is_zero() || self.voting_window_min > self.voting_window_max {
            return bad("voting window must be positive and min <= max");
        }
        if self.voting_window_max >= self.leader_timeout {
            return bad(
                "voting window must be shorter than leader_timeout, or members give up on a reopened vote",
            );
        }
        if self.report_delay_min > self.report_delay_max {
            return bad("report_delay_min must not exceed report_delay_max");
        }
        if self.member_timeout <= self.member_refresh {
            return bad("member_timeout must exceed member_refresh");
        }
        if self.channel_reannounce.is_zero() || self.channel_reannounce >= self.leader_timeout {
            return bad(
                "channel_reannounce must be positive and shorter than leader_timeout, or a node on an old channel claims first",
            );
        }
        if self.concede_timeout <= self.voting_window_max {
            return bad("concede_timeout must exceed the voting window");
        }
        Ok(())
    }
}

/// Whether a node may become group leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eligibility {
    /// Takes part in the voting.
    #[default]
    Candidate,
    /// Never claims; only follows (e.g. a server reserved for other duties).
    Ineligible,
}

/// What a member tells its leader when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registration {
    /// The server's name (host name).
    pub name: String,
    /// Where the leader reaches this server (e.g. its unicast `ip:port` for reports).
    pub address: String,
    pub cpu_cores: u16,
    pub cpu_mhz: u32,
    pub free_disk_mib: u64,
    /// Content groups (configured at the manager) this server belongs to; the leader assigns a
    /// data channel to each.
    pub content_groups: Vec<String>,
}

/// Where the leader draws data channels for content groups from: `first`, then the next
/// addresses (last octet +1 each, same port), up to `count` channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataChannelPool {
    pub first: SocketAddr,
    pub count: u16,
}

/// Everything one node needs to take part in the election of its segment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Identifies the cluster (and through it the segment's deployment); foreign datagrams are
    /// dropped.
    pub cluster_id: u64,
    pub node: NodeId,
    /// Distinguishes this run of the node from earlier ones (replay protection across
    /// restarts). Must grow strictly across restarts: a driver uses
    /// [`crate::restart::next_incarnation`] (its start time in microseconds since the Unix
    /// epoch, or more when the clock stepped back) and saves it before sending.
    pub incarnation: u64,
    /// Key for the election's MACs, derived from the cluster secret (see [`Config::derive_key`]).
    pub key: MacKey,
    /// The control channel (multicast group and port) the node starts on.
    pub control_channel: SocketAddr,
    pub timing: Timing,
    pub eligibility: Eligibility,
    /// Operator's pre-assigned leaders, most preferred first. They outrank every other
    /// candidate; with `preassigned_only` nobody else may lead.
    pub preassigned: Vec<NodeId>,
    pub preassigned_only: bool,
    pub priority: PriorityInputs,
    pub registration: Registration,
    pub data_channels: Option<DataChannelPool>,
}

/// The context string that separates election keys from every other use of the cluster secret.
pub const KEY_CONTEXT: &str = "contentmover election v1";

impl Config {
    /// The election MAC key for a cluster secret.
    pub fn derive_key(cluster_secret: &[u8]) -> MacKey {
        MacKey::derive(KEY_CONTEXT, cluster_secret)
    }

    /// A configuration with default timing for `heartbeat` and everything optional left empty.
    pub fn new(
        cluster_id: u64,
        node: NodeId,
        incarnation: u64,
        cluster_secret: &[u8],
        control_channel: SocketAddr,
        heartbeat: Duration,
    ) -> Self {
        Config {
            cluster_id,
            node,
            incarnation,
            key: Self::derive_key(cluster_secret),
            control_channel,
            timing: Timing::scaled(heartbeat),
            eligibility: Eligibility::Candidate,
            preassigned: Vec::new(),
            preassigned_only: false,
            priority: PriorityInputs::default(),
            registration: Registration::default(),
            data_channels: None,
        }
    }

    /// True when this node may ever claim leadership.
    pub fn eligible(&self) -> bool {
        self.eligibility == Eligibility::Candidate
            && (!self.preassigned_only || self.preassigned.contains(&self.node))
    }

    /// `255 - position` on the pre-assigned list, 0 when not on it.
    pub fn preassigned_rank(&self) -> u8 {
        match self.preassigned.iter().position(|&n| n == self.node) {
            Some(i) => 255u8.saturating_sub(u8::try_from(i).unwrap_or(u8::MAX)).max(1),
            None => 0,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.timing.validate()?;
        crate::wire::check_registration(&self.registration).map_err(ConfigError::Registration)?;
        Ok(())
    }
}

/// A configuration the state machine cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("bad election timing: {0}")]
    Timing(&'static str),
    #[error("bad registration details: {0}")]
    Registration(&'static str),
    #[error("cannot resume from the saved state: {0}")]
    Restart(#[from] crate::restart::RestartStateError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_timing_is_valid_and_keeps_the_seed_ratios() {
        for ms in [10, 100, 1000] {
            let t = Timing::scaled(Duration::from_millis(ms));
            t.validate().unwrap();
            assert_eq!(t.claim_initial, t.claim_min * 2);
            assert!(t.voting_window_max * 10 == t.voting_window_min * 15);
        }
        let t = Timing::scaled(Duration::from_millis(100));
        assert!(t.failover_bound(Duration::ZERO) < Duration::from_secs(1));
    }

    #[test]
    fn invalid_timing_is_refused() {
        let mut t = Timing::scaled(Duration::from_millis(100));
        t.voting_window_max = t.leader_timeout;
        assert!(t.validate().is_err());
        let mut t = Timing::scaled(Duration::from_millis(100));
        t.heartbeat = Duration::ZERO;
        assert!(t.validate().is_err());
    }

    #[test]
    fn preassigned_rank_and_eligibility() {
        let addr: SocketAddr = "239.1.1.1:7000".parse().unwrap();
        let mut c = Config::new(1, 7, 1, b"s", addr, Duration::from_millis(100));
        assert_eq!(c.preassigned_rank(), 0);
        c.preassigned = vec![3, 7];
        assert_eq!(c.preassigned_rank(), 254);
        c.preassigned_only = true;
        assert!(c.eligible());
        c.preassigned = vec![3];
        assert!(!c.eligible());
    }
}
