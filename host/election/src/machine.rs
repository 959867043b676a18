//! The state machine of one node (seed Fig. 5) and its registration duties.
//!
//! States: [`State::GlKnown`], [`State::GlUnknown`], [`State::GlIsMe`], [`State::VotingOpen`],
//! [`State::Concede`]. Transitions (the seed's, with claim strength as the guard where the seed
//! leaves the choice open; see `docs/election.md` for the table):
//!
//! - GL known --no LA for `leader_timeout`--> GL unknown (claim timer armed, shorter the stronger).
//! - GL unknown --LC heard first, stronger than ours (or we are ineligible)--> concede.
//! - GL unknown --our claim timer, or a weaker LC heard--> send LC, voting open.
//! - voting open --window ends with no stronger LC--> GL is me, send LA.
//! - voting open --stronger LC--> GL unknown --> concede to it; weaker LC --> repeat our LC.
//! - GL is me --another LA or any LC--> send LC, voting open (no LA battles).
//! - concede / GL unknown --LA--> GL known. Concede --no LA in time--> GL unknown.
//!
//! Invariant: `leading` (we hold the member list and answer registrations) is true exactly from
//! entering GL is me until we move to GL known, GL unknown or concede; a reopened vote keeps it.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, ConfigError, Registration};
use crate::priority::{ClaimKey, NodeId};
use crate::replay::ReplayGuard;
use crate::restart::{RestartState, RestartStateError, Save, recent_failures};
use crate::time::Instant;
use crate::wire::{self, DropReason, Header, MAX_PAYLOAD, MAX_REPORT_IDS, MemberReport, Message};

/// The five states of the seed's Fig. 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    GlKnown,
    GlUnknown,
    GlIsMe,
    VotingOpen,
    Concede,
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The current control channel.
    Control,
    /// A specific multicast channel (the old control channel after a move).
    Channel(SocketAddr),
}

/// A datagram for the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub destination: Destination,
    pub payload: Vec<u8>,
}

/// A registered member, as the leader knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: NodeId,
    pub registration: Registration,
    /// The address its datagrams came from.
    pub source: SocketAddr,
    pub joined: Instant,
    pub last_seen: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// The member said goodbye.
    Left,
    /// Nothing heard for `member_timeout`.
    TimedOut,
}

/// What happened, for the rest of the agent (the GL duties, MCTP, reports to the manager).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    StateChanged {
        from: State,
        to: State,
    },
    /// The leader this node follows (or itself) changed; `None` while an election runs.
    LeaderChanged {
        leader: Option<NodeId>,
    },
    BecameLeader,
    LostLeadership,
    /// Leader side: a member registered.
    MemberJoined(Member),
    /// Leader side: a member left or timed out.
    MemberLeft {
        node: NodeId,
        reason: LeaveReason,
    },
    /// Leader side: the member list changed; read it with [`Election::members`].
    MembersChanged {
        count: usize,
    },
    /// Member side: our leader's report lists us.
    Registered {
        leader: NodeId,
    },
    /// Move to this control channel (the driver re-joins).
    ChannelMove {
        channel: SocketAddr,
    },
    /// Member side: a content group of ours got (or changed) its data channel.
    DataChannelAssigned {
        group: String,
        channel: SocketAddr,
    },
    /// Member side: the leader's heartbeat payload changed (e.g. an MCTP session announce).
    LeaderPayload {
        leader: NodeId,
        payload: Vec<u8>,
    },
}

/// Counters for everything received and sent: every dropped datagram is counted by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub received: u64,
    pub accepted: u64,
    pub malformed: u64,
    pub foreign: u64,
    pub forged: u64,
    pub replayed: u64,
    pub own: u64,
    pub sent: u64,
    /// A content group got no data channel because the pool was used up.
    pub data_pool_exhausted: u64,
}

/// Errors from operator or agent requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("only the group leader can do that")]
    NotLeader,
    #[error("heartbeat payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(usize),
}

#[derive(Debug, Clone)]
struct KnownLeader {
    key: ClaimKey,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Linger {
    old: SocketAddr,
    until: Instant,
    next: Instant,
}

/// One node's election and registration, sans IO.
#[derive(Debug)]
pub struct Election {
    cfg: Config,
    rng: ChaCha8Rng,
    stopped: bool,
    state: State,
    leader: Option<KnownLeader>,
    conceded_to: Option<ClaimKey>,
    leading: bool,
    /// When we last stopped leading (for the sticky-incumbent rule).
    led_until: Option<Instant>,
    former_members: usize,

    leader_deadline: Option<Instant>,
    claim_at: Option<Instant>,
    window_end: Option<Instant>,
    concede_until: Option<Instant>,
    next_heartbeat: Option<Instant>,

    // member side
    register_at: Option<Instant>,
    registered_with: Option<NodeId>,
    my_data_channels: BTreeMap<String, SocketAddr>,

    // leader side
    members: BTreeMap<NodeId, Member>,
    report_at: Option<Instant>,
    report_round: u32,
    data_channels: BTreeMap<String, SocketAddr>,
    pool_next: u16,
    payload: Vec<u8>,

    control: SocketAddr,
    channel_epoch: u32,
    linger: Option<Linger>,
    /// Channels the segment has moved away from, most recent first (at most
    /// [`MAX_OLD_CHANNELS`]): a leader keeps announcing the move there every
    /// `channel_reannounce`,
    /// so a node that was down through the move, or a new one configured with the original
    /// channel, finds the segment.
    old_channels: Vec<SocketAddr>,
    reannounce_at: Option<Instant>,
    /// Crashed runs of this node in the last week (see [`crate::restart::recent_failures`]).
    failures: Vec<u64>,

    seq: u64,
    replay: ReplayGuard,
    /// The restart state changed since the last [`Election::poll_save`]; `save_sync`: in a
    /// part that must be durable (incarnation, control channel).
    save_due: bool,
    save_sync: bool,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    reported_leader: Option<NodeId>,
    reported_leading: bool,
}

/// How many earlier control channels a node remembers (and a leader keeps announcing on).
pub const MAX_OLD_CHANNELS: usize = 4;

fn random_between(rng: &mut ChaCha8Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = u64::try_from((hi - lo).as_nanos()).unwrap_or(u64::MAX);
    lo + Duration::from_nanos(rng.random_range(0..=span))
}

fn due(timer: Option<Instant>, now: Instant) -> bool {
    timer.is_some_and(|t| t <= now)
}

/// The `i`-th address after `first` (last octet or last IPv6 byte group incremented).
fn nth_channel(first: SocketAddr, i: u16) -> Option<SocketAddr> {
    let ip = match first.ip() {
        IpAddr::V4(v4) => IpAddr::V4(u32::from(v4).checked_add(u32::from(i))?.into()),
        IpAddr::V6(v6) => IpAddr::V6(u128::from(v6).checked_add(u128::from(i))?.into()),
    };
    Some(SocketAddr::new(ip, first.port()))
}

impl Election {
    /// A node that has just started: it does not know a leader and listens for one for
    /// `leader_timeout` before it may claim. `rng_seed` seeds every random delay.
    ///
    /// A node that has run before should start with [`Election::resume`] instead.
    pub fn new(cfg: Config, now: Instant, rng_seed: u64) -> Result<Self, ConfigError> {
        Self::resume(cfg, now, rng_seed, None)
    }

    /// A node starting again with what its previous run saved (the last [`Election::poll_save`]
    /// the driver stored): it keeps rejecting every datagram that run accepted, and comes back
    /// on the control channel the segment had moved to (unless the operator has since
    /// configured another one). `cfg.incarnation` must exceed the saved one
    /// ([`crate::restart::next_incarnation`]); a state saved by another node is refused.
    ///
    /// The priority's `recent_failures` becomes the configured value plus the runs of this node
    /// that crashed (stopped without [`Election::leave`]) in the last week.
    pub fn resume(
        mut cfg: Config,
        now: Instant,
        rng_seed: u64,
        saved: Option<&RestartState>,
    ) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let mut failures = Vec::new();
        let mut control = cfg.control_channel;
        let mut channel_epoch = 0;
        let mut old_channels = Vec::new();
        let mut replay = ReplayGuard::default();
        if let Some(saved) = saved {
            if (saved.cluster_id, saved.node) != (cfg.cluster_id, cfg.node) {
                return Err(RestartStateError::OtherNode {
                    cluster: saved.cluster_id,
                    node: saved.node,
                }
                .into());
            }
            if cfg.incarnation <= saved.incarnation {
                return Err(RestartStateError::StaleIncarnation {
                    configured: cfg.incarnation,
                    saved: saved.incarnation,
                }
                .into());
            }
            if saved.configured_channel == cfg.control_channel {
                control = saved.control_channel;
                channel_epoch = saved.channel_epoch;
                old_channels = saved.old_channels.clone();
            }
            replay = ReplayGuard::from_records(&saved.replay);
            failures = recent_failures(saved, cfg.incarnation);
            let measured = u32::try_from(failures.len()).unwrap_or(u32::MAX);
            cfg.priority.recent_failures = cfg.priority.recent_failures.saturating_add(measured);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let mut e = Election {
            rng: ChaCha8Rng::seed_from_u64(rng.random()),
            cfg,
            stopped: false,
            state: State::GlUnknown,
            leader: None,
            conceded_to: None,
            leading: false,
            led_until: None,
            former_members: 0,
            leader_deadline: None,
            claim_at: None,
            window_end: None,
            concede_until: None,
            next_heartbeat: None,
            register_at: None,
            registered_with: None,
            my_data_channels: BTreeMap::new(),
            members: BTreeMap::new(),
            report_at: None,
            report_round: 0,
            data_channels: BTreeMap::new(),
            pool_next: 0,
            payload: Vec::new(),
            control,
            channel_epoch,
            linger: None,
            old_channels,
            reannounce_at: None,
            failures,
            seq: 0,
            replay,
            // The new incarnation must be stored before the first datagram carries it.
            save_due: true,
            save_sync: true,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            reported_leader: None,
            reported_leading: false,
        };
        if e.cfg.eligible() {
            let delay = e.cfg.timing.leader_timeout + e.claim_delay(now);
            e.claim_at = Some(now + delay);
        }
        Ok(e)
    }

    // ----- queries -----------------------------------------------------------------------

    pub fn node(&self) -> NodeId {
        self.cfg.node
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn state(&self) -> State {
        self.state
    }
    /// The leader this node follows, itself while leading, `None` during an election.
    pub fn leader(&self) -> Option<NodeId> {
        if self.leading {
            Some(self.cfg.node)
        } else if self.state == State::GlKnown {
            self.leader.as_ref().map(|l| l.key.node)
        } else {
            None
        }
    }
    /// True while this node is group leader (including a vote it reopened itself).
    pub fn is_leader(&self) -> bool {
        self.leading
    }
    /// Leader side: the registered members (not including the leader itself), by node id.
    /// Empty unless leading. MCTP expects reports from exactly these; the manager report lists them.
    pub fn members(&self) -> impl ExactSizeIterator<Item = &Member> {
        self.members.values()
    }
    /// Member side: the leader whose report listed us.
    pub fn registered_with(&self) -> Option<NodeId> {
        self.registered_with
    }
    pub fn control_channel(&self) -> SocketAddr {
        self.control
    }
    /// Leader side: the data channel of every content group. Member side: our groups' channels.
    pub fn data_channels(&self) -> &BTreeMap<String, SocketAddr> {
        if self.leading { &self.data_channels } else { &self.my_data_channels }
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// The heartbeat payload of the leader this node knows: its own (see
    /// [`Election::set_heartbeat_payload`]) while leading, the latest one heard from its leader
    /// while following, `None` while no leader is known. An empty payload is `Some(&[])`.
    pub fn leader_payload(&self) -> Option<&[u8]> {
        if self.leading {
            Some(&self.payload)
        } else if self.state == State::GlKnown {
            self.leader.as_ref().map(|l| l.payload.as_slice())
        } else {
            None
        }
    }
    /// The claim this node would make now.
    pub fn claim_key(&self, now: Instant) -> ClaimKey {
        let members_known = if self.leading { self.members.len() } else { self.former_members };
        ClaimKey {
            rank: self.cfg.preassigned_rank(),
            incumbent: self.recently_led(now),
            priority: self.cfg.priority.priority(members_known),
            node: self.cfg.node,
        }
    }

    fn recently_led(&self, now: Instant) -> bool {
        self.leading
            || self
                .led_until
                .is_some_and(|t| now.saturating_since(t) < self.cfg.timing.deposed_memory)
    }

    // ----- sans-IO interface ------------------------------------------------------------

    /// Feeds one received datagram. Anything not authentic, not for this cluster, replayed or
    /// malformed is counted in [`Stats`] and otherwise ignored.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), DropReason> {
        if self.stopped {
            return Ok(());
        }
        self.stats.received += 1;
        let result = self.accept(datagram);
        match result {
            Ok((header, msg)) => {
                self.stats.accepted += 1;
                self.on_message(now, from, header, msg);
                self.handle_timeout(now);
                Ok(())
            }
            Err(reason) => {
                match reason {
                    DropReason::Malformed(_) => self.stats.malformed += 1,
                    DropReason::ForeignCluster(_) => self.stats.foreign += 1,
                    DropReason::BadTag => self.stats.forged += 1,
                    DropReason::Replay => self.stats.replayed += 1,
                    DropReason::Own => self.stats.own += 1,
                }
                Err(reason)
            }
        }
    }

    fn accept(&mut self, datagram: &[u8]) -> Result<(Header, Message), DropReason> {
        let (header, msg) = wire::open(&self.cfg.key, self.cfg.cluster_id, datagram)?;
        if header.sender == self.cfg.node {
            return Err(DropReason::Own);
        }
        if !self.replay.accept(header.sender, header.incarnation, header.seq) {
            return Err(DropReason::Replay);
        }
        self.save_due = true;
        Ok((header, msg))
    }

    /// Runs every timer due at `now`. Calling it early or twice is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stopped {
            return;
        }
        if self.state == State::GlKnown && due(self.leader_deadline, now) {
            self.enter_unknown(now);
        }
        if self.state == State::GlUnknown && due(self.claim_at, now) {
            self.claim(now);
        }
        if self.state == State::VotingOpen && due(self.window_end, now) {
            self.become_leader(now);
        }
        if self.state == State::Concede && due(self.concede_until, now) {
            self.enter_unknown(now);
        }
        if self.state == State::GlIsMe && due(self.next_heartbeat, now) {
            self.send_heartbeat(now);
        }
        if self.state == State::GlKnown && due(self.register_at, now) {
            self.send_registration(now);
        }
        if self.leading {
            self.expire_members(now);
            if due(self.report_at, now) {
                self.send_report(now);
            }
        }
        if self.leading && due(self.reannounce_at, now) {
            for old in self.old_channels.clone() {
                self.send_channel_move(Destination::Channel(old));
            }
            self.reannounce_at = Some(now + self.cfg.timing.channel_reannounce);
        }
        if let Some(l) = self.linger {
            if now >= l.until {
                self.linger = None;
            } else if now >= l.next {
                self.send_channel_move(Destination::Channel(l.old));
                self.linger = Some(Linger { next: now + self.cfg.timing.heartbeat, ..l });
            }
        }
        self.sync_events();
    }

    /// The next instant at which [`Election::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stopped {
            return None;
        }
        let mut timers = vec![];
        match self.state {
            State::GlKnown => timers.extend([self.leader_deadline, self.register_at]),
            State::GlUnknown => timers.push(self.claim_at),
            State::VotingOpen => timers.push(self.window_end),
            State::Concede => timers.push(self.concede_until),
            State::GlIsMe => timers.push(self.next_heartbeat),
        }
        if self.leading {
            timers.push(self.report_at);
            timers.push(self.reannounce_at);
            let timeout = self.cfg.timing.member_timeout;
            timers.push(self.members.values().map(|m| m.last_seen + timeout).min());
        }
        timers.push(self.linger.map(|l| l.next.min(l.until)));
        timers.into_iter().flatten().min()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the rest of the agent.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The restart state to store, when it changed since the last call (always right after
    /// start: the new incarnation). A driver calls it after every input and stores the result
    /// *before* sending that input's datagrams or passing on its events, durably (fsync) when
    /// [`Save::sync`] says so; it hands the last stored state to [`Election::resume`].
    pub fn poll_save(&mut self) -> Option<Save> {
        if !(self.save_due || self.save_sync) {
            return None;
        }
        let sync = self.save_sync;
        self.save_due = false;
        self.save_sync = false;
        Some(Save { state: self.restart_state(), sync })
    }

    /// What this node would need to resume now (see [`crate::restart`]).
    pub fn restart_state(&self) -> RestartState {
        RestartState {
            cluster_id: self.cfg.cluster_id,
            node: self.cfg.node,
            incarnation: self.cfg.incarnation,
            configured_channel: self.cfg.control_channel,
            control_channel: self.control,
            channel_epoch: self.channel_epoch,
            old_channels: self.old_channels.clone(),
            running: !self.stopped,
            failures: self.failures.clone(),
            replay: self.replay.records(),
        }
    }

    // ----- requests ---------------------------------------------------------------------

    /// Sets the opaque payload carried by every Leader Alive from now on (empty: none), at most
    /// [`MAX_PAYLOAD`](crate::wire::MAX_PAYLOAD) bytes. It can be set at any time (also before
    /// this node leads); members read it with [`Election::leader_payload`] and get
    /// [`Event::LeaderPayload`] when it changes. There is one payload: duties that share it
    /// (the GL's HTTP address, an MCTP announce) encode their parts together.
    pub fn set_heartbeat_payload(&mut self, payload: Vec<u8>) -> Result<(), RequestError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(RequestError::PayloadTooLarge(payload.len()));
        }
        self.payload = payload;
        Ok(())
    }

    /// Leader only: moves the whole segment to another control channel.
    pub fn move_control_channel(
        &mut self,
        now: Instant,
        channel: SocketAddr,
    ) -> Result<(), RequestError> {
        if !self.leading {
            return Err(RequestError::NotLeader);
        }
        if channel == self.control {
            return Ok(());
        }
        let old = self.control;
        self.channel_epoch += 1;
        self.switch_channel(channel);
        self.reannounce_at = Some(now + self.cfg.timing.channel_move_linger);
        self.send_channel_move(Destination::Channel(old));
        let t = &self.cfg.timing;
        self.linger =
            Some(Linger { old, until: now + t.channel_move_linger, next: now + t.heartbeat });
        Ok(())
    }

    /// Leader only: assigns (or reassigns) the data channel of a content group, as the manager
    /// configured it, and tells the members.
    pub fn set_data_channel(
        &mut self,
        now: Instant,
        group: String,
        channel: SocketAddr,
    ) -> Result<(), RequestError> {
        if !self.leading {
            return Err(RequestError::NotLeader);
        }
        if self.data_channels.insert(group, channel) != Some(channel) {
            self.send_data_channels();
        }
        self.sync_events();
        let _ = now;
        Ok(())
    }

    /// Leaves the segment gracefully: a member says goodbye, a leader resigns so the members
    /// elect a successor without waiting for `leader_timeout`. The machine stops afterwards.
    pub fn leave(&mut self, now: Instant) {
        if self.stopped {
            return;
        }
        if self.leading {
            self.send(Destination::Control, &Message::Leave { leader: self.cfg.node });
        } else if let (State::GlKnown, Some(l)) = (self.state, &self.leader) {
            let leader = l.key.node;
            self.send(Destination::Control, &Message::Leave { leader });
        }
        self.lose_leadership(now);
        self.leader = None;
        self.set_state(State::GlUnknown);
        self.stopped = true;
        // A clean stop: the next run does not count this one as a failure.
        self.save_sync = true;
        self.sync_events();
    }

    // ----- transitions ------------------------------------------------------------------

    fn set_state(&mut self, to: State) {
        if self.state != to {
            self.events.push_back(Event::StateChanged { from: self.state, to });
            self.state = to;
        }
    }

    fn claim_delay(&mut self, now: Instant) -> Duration {
        let t = &self.cfg.timing;
        let base = if self.recently_led(now) {
            t.claim_min
        } else if let Some(i) = self.cfg.preassigned.iter().position(|&n| n == self.cfg.node) {
            // Pre-assigned leaders claim between the deposed leader and everyone else, in list order.
            let n = self.cfg.preassigned.len() as u32 + 1;
            t.claim_min + (t.claim_initial - t.claim_min) * (i as u32 + 1) / n
        } else {
            let weakness = 1.0 - self.cfg.priority.priority(self.former_members).fraction();
            t.claim_initial + t.claim_spread.mul_f64(weakness.clamp(0.0, 1.0))
        };
        let jitter = t.claim_jitter;
        base + random_between(&mut self.rng, Duration::ZERO, jitter)
    }

    /// Moves to `channel`, remembering where we were.
    fn switch_channel(&mut self, channel: SocketAddr) {
        let old = self.control;
        self.old_channels.retain(|&c| c != old && c != channel);
        self.old_channels.insert(0, old);
        self.old_channels.truncate(MAX_OLD_CHANNELS);
        self.control = channel;
        self.save_due = true;
        self.save_sync = true;
        self.events.push_back(Event::ChannelMove { channel });
    }

    fn lose_leadership(&mut self, now: Instant) {
        if self.leading {
            self.leading = false;
            self.reannounce_at = None;
            self.led_until = Some(now);
            self.former_members = self.members.len();
            self.members.clear();
            self.report_at = None;
            self.next_heartbeat = None;
        }
    }

    fn enter_unknown(&mut self, now: Instant) {
        self.lose_leadership(now);
        self.leader = None;
        self.conceded_to = None;
        self.registered_with = None;
        self.register_at = None;
        self.leader_deadline = None;
        self.set_state(State::GlUnknown);
        self.claim_at = if self.cfg.eligible() { Some(now + self.claim_delay(now)) } else { None };
    }

    fn concede(&mut self, now: Instant, to: ClaimKey) {
        self.lose_leadership(now);
        self.leader = None;
        self.registered_with = None;
        self.set_state(State::Concede);
        self.conceded_to = Some(to);
        self.concede_until = Some(now + self.cfg.timing.concede_timeout);
    }

    fn follow(&mut self, now: Instant, key: ClaimKey, payload: Vec<u8>) {
        self.lose_leadership(now);
        let changed = self.leader.as_ref().is_none_or(|l| l.key.node != key.node);
        self.leader = Some(KnownLeader { key, payload: Vec::new() });
        self.conceded_to = None;
        self.set_state(State::GlKnown);
        self.leader_deadline = Some(now + self.cfg.timing.leader_timeout);
        if changed {
            self.registered_with = None;
            let spread = self.cfg.timing.registration_spread;
            self.register_at = Some(now + random_between(&mut self.rng, Duration::ZERO, spread));
        }
        self.take_payload(key.node, payload);
    }

    fn claim(&mut self, now: Instant) {
        let key = self.claim_key(now);
        self.send(Destination::Control, &Message::LeaderClaim { key });
        if self.state != State::VotingOpen {
            self.set_state(State::VotingOpen);
            let t = &self.cfg.timing;
            let (lo, hi) = (t.voting_window_min, t.voting_window_max);
            self.window_end = Some(now + random_between(&mut self.rng, lo, hi));
        }
        self.claim_at = None;
        self.next_heartbeat = None;
    }

    fn become_leader(&mut self, now: Instant) {
        self.set_state(State::GlIsMe);
        if !self.leading {
            self.leading = true;
            self.led_until = None;
            self.members.clear();
            self.report_at = None;
            // Tell nodes still on an earlier channel where the segment went.
            if !self.old_channels.is_empty() {
                self.reannounce_at = Some(now + self.cfg.timing.heartbeat);
            }
        }
        self.leader = None;
        self.send_heartbeat(now);
    }

    // ----- message handling -------------------------------------------------------------

    fn on_message(&mut self, now: Instant, from: SocketAddr, header: Header, msg: Message) {
        let sender = header.sender;
        match msg {
            Message::LeaderAlive { key, payload, .. } => self.on_leader_alive(now, key, payload),
            Message::LeaderClaim { key } => self.on_leader_claim(now, key),
            Message::Register { leader, registration } => {
                if leader == self.cfg.node && self.leading {
                    self.on_register(now, from, sender, registration);
                }
            }
            Message::Leave { leader } => {
                if leader == sender && self.state == State::GlKnown && self.leader() == Some(sender)
                {
                    // Our leader resigned: elect now rather than after leader_timeout.
                    self.enter_unknown(now);
                } else if leader == self.cfg.node
                    && self.leading
                    && self.members.remove(&sender).is_some()
                {
                    self.member_left(now, sender, LeaveReason::Left);
                }
            }
            Message::MemberReport(report) => {
                if self.state == State::GlKnown && self.leader() == Some(sender) {
                    self.on_report(now, sender, report);
                }
            }
            Message::ChannelMove { epoch, channel } => {
                if epoch > self.channel_epoch {
                    self.channel_epoch = epoch;
                    self.save_sync = true;
                    if channel != self.control {
                        self.switch_channel(channel);
                    }
                }
            }
            Message::DataChannels { channels } => {
                if self.state == State::GlKnown && self.leader() == Some(sender) {
                    for (group, channel) in channels {
                        if self.cfg.registration.content_groups.contains(&group)
                            && self.my_data_channels.get(&group) != Some(&channel)
                        {
                            self.my_data_channels.insert(group.clone(), channel);
                            self.events.push_back(Event::DataChannelAssigned { group, channel });
                        }
                    }
                }
            }
        }
    }

    fn on_leader_alive(&mut self, now: Instant, key: ClaimKey, payload: Vec<u8>) {
        match self.state {
            State::GlKnown => {
                let current = self.leader.as_ref().map(|l| l.key);
                match current {
                    Some(cur) if cur.node == key.node => {
                        self.leader_deadline = Some(now + self.cfg.timing.leader_timeout);
                        if let Some(l) = self.leader.as_mut() {
                            l.key = key;
                        }
                        self.take_payload(key.node, payload);
                    }
                    // Two leaders for a moment (a healed partition): follow the stronger; the
                    // leaders settle it between themselves with claims.
                    Some(cur) if key > cur => self.follow(now, key, payload),
                    _ => {}
                }
            }
            State::GlUnknown | State::Concede => self.follow(now, key, payload),
            // Rather than an LA battle, reopen the vote.
            State::GlIsMe => self.claim(now),
            State::VotingOpen => {
                if key > self.claim_key(now) {
                    self.follow(now, key, payload);
                } else {
                    self.claim(now);
                }
            }
        }
    }

    fn on_leader_claim(&mut self, now: Instant, key: ClaimKey) {
        match self.state {
            // The leader answers claims; its members keep following it.
            State::GlKnown => {}
            State::GlUnknown => {
                if !self.cfg.eligible() || key > self.claim_key(now) {
                    self.concede(now, key);
                } else {
                    self.claim(now);
                }
            }
            State::Concede => {
                if self.conceded_to.is_some_and(|c| key > c) {
                    self.conceded_to = Some(key);
                    self.concede_until = Some(now + self.cfg.timing.concede_timeout);
                }
            }
            State::GlIsMe => self.claim(now),
            State::VotingOpen => {
                if key > self.claim_key(now) {
                    // Seed: another LC during voting open → GL unknown; it was heard before
                    // we claim again, so → concede.
                    self.set_state(State::GlUnknown);
                    self.concede(now, key);
                } else {
                    // Repeat our stronger claim so the weaker candidate concedes.
                    self.claim(now);
                }
            }
        }
    }

    fn take_payload(&mut self, leader: NodeId, payload: Vec<u8>) {
        if let Some(l) = self.leader.as_mut()
            && l.key.node == leader
            && l.payload != payload
        {
            l.payload = payload.clone();
            if !payload.is_empty() {
                self.events.push_back(Event::LeaderPayload { leader, payload });
            }
        }
    }

    fn on_register(
        &mut self,
        now: Instant,
        from: SocketAddr,
        node: NodeId,
        registration: Registration,
    ) {
        let mut changed = false;
        match self.members.get_mut(&node) {
            Some(m) => {
                m.last_seen = now;
                m.source = from;
                if m.registration != registration {
                    m.registration = registration.clone();
                    changed = true;
                }
            }
            None => {
                let member = Member {
                    node,
                    registration: registration.clone(),
                    source: from,
                    joined: now,
                    last_seen: now,
                };
                self.members.insert(node, member.clone());
                self.events.push_back(Event::MemberJoined(member));
                self.events.push_back(Event::MembersChanged { count: self.members.len() });
                changed = true;
            }
        }
        for group in &registration.content_groups {
            if !self.data_channels.contains_key(group) {
                self.allocate_data_channel(group);
            }
        }
        if changed {
            // Seed: report 3–5 s after the last registration.
            let t = &self.cfg.timing;
            let (lo, hi) = (t.report_delay_min, t.report_delay_max);
            self.report_at = Some(now + random_between(&mut self.rng, lo, hi));
        }
    }

    fn allocate_data_channel(&mut self, group: &str) {
        let Some(pool) = self.cfg.data_channels else { return };
        match (self.pool_next < pool.count)
            .then(|| nth_channel(pool.first, self.pool_next))
            .flatten()
        {
            Some(channel) => {
                self.pool_next += 1;
                self.data_channels.insert(group.to_owned(), channel);
            }
            None => self.stats.data_pool_exhausted += 1,
        }
    }

    fn member_left(&mut self, now: Instant, node: NodeId, reason: LeaveReason) {
        self.events.push_back(Event::MemberLeft { node, reason });
        self.events.push_back(Event::MembersChanged { count: self.members.len() });
        let t = &self.cfg.timing;
        let (lo, hi) = (t.report_delay_min, t.report_delay_max);
        self.report_at = Some(now + random_between(&mut self.rng, lo, hi));
    }

    fn expire_members(&mut self, now: Instant) {
        let timeout = self.cfg.timing.member_timeout;
        let dead: Vec<NodeId> = self
            .members
            .values()
            .filter(|m| m.last_seen + timeout <= now)
            .map(|m| m.node)
            .collect();
        for node in dead {
            self.members.remove(&node);
            self.member_left(now, node, LeaveReason::TimedOut);
        }
    }

    fn on_report(&mut self, now: Instant, leader: NodeId, report: MemberReport) {
        let me = self.cfg.node;
        if me < report.lo || me > report.hi {
            return;
        }
        if report.members.binary_search(&me).is_ok() {
            if self.registered_with != Some(leader) {
                self.registered_with = Some(leader);
                self.events.push_back(Event::Registered { leader });
            }
        } else {
            // Missing: re-register after a short random delay (seed: up to 1 s).
            self.registered_with = None;
            let retry =
                now + random_between(&mut self.rng, Duration::ZERO, self.cfg.timing.reregister_max);
            self.register_at = Some(self.register_at.map_or(retry, |t| t.min(retry)));
        }
    }

    // ----- sending ----------------------------------------------------------------------

    fn send(&mut self, destination: Destination, msg: &Message) {
        self.seq += 1;
        let header = Header {
            cluster: self.cfg.cluster_id,
            sender: self.cfg.node,
            incarnation: self.cfg.incarnation,
            seq: self.seq,
        };
        // Every message we build respects the encoder's limits (checked at construction), so
        // an error here is a bug; count it rather than crash the agent.
        if let Ok(payload) = wire::seal(&self.cfg.key, &header, msg) {
            self.stats.sent += 1;
            self.transmits.push_back(Transmit { destination, payload });
        }
    }

    fn send_heartbeat(&mut self, now: Instant) {
        let key = self.claim_key(now);
        let members = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        let payload = self.payload.clone();
        self.send(Destination::Control, &Message::LeaderAlive { key, members, payload });
        self.next_heartbeat = Some(now + self.cfg.timing.heartbeat);
    }

    fn send_registration(&mut self, now: Instant) {
        let Some(leader) = self.leader.as_ref().map(|l| l.key.node) else { return };
        let registration = self.cfg.registration.clone();
        self.send(Destination::Control, &Message::Register { leader, registration });
        self.register_at = Some(now + self.cfg.timing.member_refresh);
    }

    fn send_report(&mut self, now: Instant) {
        self.report_round = self.report_round.wrapping_add(1);
        let ids: Vec<NodeId> = self.members.keys().copied().collect();
        let pages: Vec<&[NodeId]> =
            if ids.is_empty() { vec![&[]] } else { ids.chunks(MAX_REPORT_IDS).collect() };
        let mut lo = 0;
        for (i, page) in pages.iter().enumerate() {
            let hi = if i + 1 == pages.len() { NodeId::MAX } else { *page.last().unwrap_or(&lo) };
            let report = MemberReport { round: self.report_round, lo, hi, members: page.to_vec() };
            self.send(Destination::Control, &Message::MemberReport(report));
            lo = hi.saturating_add(1);
        }
        if !self.data_channels.is_empty() {
            self.send_data_channels();
        }
        self.report_at = Some(now + self.cfg.timing.report_refresh);
    }

    fn send_data_channels(&mut self) {
        let all: Vec<(String, SocketAddr)> =
            self.data_channels.iter().map(|(g, a)| (g.clone(), *a)).collect();
        for chunk in all.chunks(usize::from(u8::MAX)) {
            self.send(Destination::Control, &Message::DataChannels { channels: chunk.to_vec() });
        }
    }

    fn send_channel_move(&mut self, destination: Destination) {
        let msg = Message::ChannelMove { epoch: self.channel_epoch, channel: self.control };
        self.send(destination, &msg);
    }

    /// Emits the derived events (leader and leadership changes) once per input.
    fn sync_events(&mut self) {
        let leader = self.leader();
        if leader != self.reported_leader {
            self.reported_leader = leader;
            self.events.push_back(Event::LeaderChanged { leader });
        }
        if self.leading != self.reported_leading {
            self.reported_leading = self.leading;
            self.events.push_back(if self.leading {
                Event::BecameLeader
            } else {
                Event::LostLeadership
            });
        }
    }
}
