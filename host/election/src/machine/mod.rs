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
//!
//! The parts with state of their own live beside it: [`members`] (registration and member
//! liveness on the leader), [`channel`] (control-channel moves, data channels) and `timer` (the
//! timer table; every armed timer matters now, so [`Election::poll_timeout`] is its minimum).

mod channel;
mod members;
mod timer;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use cm_sansio::{Dest, Instant, Transmit};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use self::channel::MAX_OLD_CHANNELS;
use self::channel::{ControlChannel, DataChannels, PoolExhausted};
pub use self::members::Member;
use self::members::{Members, Registered};
use self::timer::{Timer, Timers};
use crate::config::{Config, ConfigError, Registration};
use crate::priority::{ClaimKey, NodeId};
use crate::replay::ReplayGuard;
use crate::restart::{RestartState, RestartStateError, Save, recent_failures};
use crate::wire::{self, DropReason, Header, MAX_PAYLOAD, MemberReport, Message};

/// The five states of the seed's Fig. 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    GlKnown,
    GlUnknown,
    GlIsMe,
    VotingOpen,
    Concede,
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
    timers: Timers,

    // member side
    registered_with: Option<NodeId>,

    // leader side
    members: Members,
    payload: Vec<u8>,

    data_channels: DataChannels,
    control: ControlChannel,
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

fn random_between(rng: &mut ChaCha8Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = u64::try_from((hi - lo).as_nanos()).unwrap_or(u64::MAX);
    lo + Duration::from_nanos(rng.random_range(0..=span))
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
            timers: Timers::default(),
            registered_with: None,
            members: Members::default(),
            payload: Vec::new(),
            data_channels: DataChannels::default(),
            control: ControlChannel::new(control, channel_epoch, old_channels),
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
            e.timers.set(Timer::Claim, now + delay);
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
        self.members.iter()
    }
    /// Member side: the leader whose report listed us.
    pub fn registered_with(&self) -> Option<NodeId> {
        self.registered_with
    }
    pub fn control_channel(&self) -> SocketAddr {
        self.control.current()
    }
    /// Leader side: the data channel of every content group. Member side: our groups' channels.
    pub fn data_channels(&self) -> &BTreeMap<String, SocketAddr> {
        if self.leading { self.data_channels.assigned() } else { self.data_channels.mine() }
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
        // Each timer is armed only in its own state (or while leading), so each check below
        // only sees a timer that matters; the order is the order of the seed's figure.
        if self.timers.due(Timer::LeaderDeadline, now) {
            self.enter_unknown(now);
        }
        if self.timers.due(Timer::Claim, now) {
            self.claim(now);
        }
        if self.timers.due(Timer::WindowEnd, now) {
            self.become_leader(now);
        }
        if self.timers.due(Timer::ConcedeUntil, now) {
            self.enter_unknown(now);
        }
        if self.timers.due(Timer::Heartbeat, now) {
            self.send_heartbeat(now);
        }
        if self.timers.due(Timer::Register, now) {
            self.send_registration(now);
        }
        if self.leading {
            self.expire_members(now);
            if self.timers.due(Timer::Report, now) {
                self.send_report(now);
            }
        }
        if self.leading && self.timers.due(Timer::Reannounce, now) {
            for old in self.control.old().to_vec() {
                self.send_channel_move(Dest::Channel(old));
            }
            self.timers.set(Timer::Reannounce, now + self.cfg.timing.channel_reannounce);
        }
        if let Some(old) = self.control.linger_due(now, self.cfg.timing.heartbeat) {
            self.send_channel_move(Dest::Channel(old));
        }
        self.sync_events();
    }

    /// The next instant at which [`Election::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stopped {
            return None;
        }
        let expiry = if self.leading {
            self.members.next_expiry(self.cfg.timing.member_timeout)
        } else {
            None
        };
        [self.timers.next(), expiry, self.control.linger_deadline()].into_iter().flatten().min()
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
            control_channel: self.control.current(),
            channel_epoch: self.control.epoch(),
            old_channels: self.control.old().to_vec(),
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
        let t = &self.cfg.timing;
        let Some(old) = self.control.start_move(now, channel, t.heartbeat, t.channel_move_linger)
        else {
            return Ok(());
        };
        self.moved(channel);
        self.timers.set(Timer::Reannounce, now + self.cfg.timing.channel_move_linger);
        self.send_channel_move(Dest::Channel(old));
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
        if self.data_channels.set(group, channel) {
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
            self.send(Dest::Group, &Message::Leave { leader: self.cfg.node });
        } else if let (State::GlKnown, Some(l)) = (self.state, &self.leader) {
            let leader = l.key.node;
            self.send(Dest::Group, &Message::Leave { leader });
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
            self.timers.leave_state(self.state);
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

    /// The control channel changed to `channel`: saved durably, and the driver re-joins.
    fn moved(&mut self, channel: SocketAddr) {
        self.save_due = true;
        self.save_sync = true;
        self.events.push_back(Event::ChannelMove { channel });
    }

    fn lose_leadership(&mut self, now: Instant) {
        if self.leading {
            self.leading = false;
            self.timers.clear(Timer::Reannounce);
            self.led_until = Some(now);
            self.former_members = self.members.len();
            self.members.clear();
            self.timers.clear(Timer::Report);
            self.timers.clear(Timer::Heartbeat);
        }
    }

    fn enter_unknown(&mut self, now: Instant) {
        self.lose_leadership(now);
        self.leader = None;
        self.conceded_to = None;
        self.registered_with = None;
        self.timers.clear(Timer::Register);
        self.timers.clear(Timer::LeaderDeadline);
        self.set_state(State::GlUnknown);
        let claim_at = if self.cfg.eligible() { Some(now + self.claim_delay(now)) } else { None };
        self.timers.put(Timer::Claim, claim_at);
    }

    fn concede(&mut self, now: Instant, to: ClaimKey) {
        self.lose_leadership(now);
        self.leader = None;
        self.registered_with = None;
        self.set_state(State::Concede);
        self.conceded_to = Some(to);
        self.timers.set(Timer::ConcedeUntil, now + self.cfg.timing.concede_timeout);
    }

    fn follow(&mut self, now: Instant, key: ClaimKey, payload: Vec<u8>) {
        self.lose_leadership(now);
        let changed = self.leader.as_ref().is_none_or(|l| l.key.node != key.node);
        self.leader = Some(KnownLeader { key, payload: Vec::new() });
        self.conceded_to = None;
        self.set_state(State::GlKnown);
        self.timers.set(Timer::LeaderDeadline, now + self.cfg.timing.leader_timeout);
        if changed {
            self.registered_with = None;
            let spread = self.cfg.timing.registration_spread;
            let at = now + random_between(&mut self.rng, Duration::ZERO, spread);
            self.timers.set(Timer::Register, at);
        }
        self.take_payload(key.node, payload);
    }

    fn claim(&mut self, now: Instant) {
        let key = self.claim_key(now);
        self.send(Dest::Group, &Message::LeaderClaim { key });
        if self.state != State::VotingOpen {
            self.set_state(State::VotingOpen);
            let t = &self.cfg.timing;
            let (lo, hi) = (t.voting_window_min, t.voting_window_max);
            let end = now + random_between(&mut self.rng, lo, hi);
            self.timers.set(Timer::WindowEnd, end);
        }
        self.timers.clear(Timer::Claim);
        self.timers.clear(Timer::Heartbeat);
    }

    fn become_leader(&mut self, now: Instant) {
        self.set_state(State::GlIsMe);
        if !self.leading {
            self.leading = true;
            self.led_until = None;
            self.members.clear();
            self.timers.clear(Timer::Report);
            // Tell nodes still on an earlier channel where the segment went.
            if !self.control.old().is_empty() {
                self.timers.set(Timer::Reannounce, now + self.cfg.timing.heartbeat);
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
                } else if leader == self.cfg.node && self.leading && self.members.remove(sender) {
                    self.member_left(now, sender, LeaveReason::Left);
                }
            }
            Message::MemberReport(report) => {
                if self.state == State::GlKnown && self.leader() == Some(sender) {
                    self.on_report(now, sender, report);
                }
            }
            Message::ChannelMove { epoch, channel } => {
                if let Some(moved) = self.control.heard_move(epoch, channel) {
                    self.save_sync = true;
                    if moved {
                        self.moved(channel);
                    }
                }
            }
            Message::DataChannels { channels } => {
                if self.state == State::GlKnown && self.leader() == Some(sender) {
                    let ours = &self.cfg.registration.content_groups;
                    for (group, channel) in self.data_channels.heard(ours, channels) {
                        self.events.push_back(Event::DataChannelAssigned { group, channel });
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
                        self.timers
                            .set(Timer::LeaderDeadline, now + self.cfg.timing.leader_timeout);
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
                    self.timers.set(Timer::ConcedeUntil, now + self.cfg.timing.concede_timeout);
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
        let changed = match self.members.register(now, from, node, &registration) {
            Registered::Joined(member) => {
                self.events.push_back(Event::MemberJoined(member));
                self.events.push_back(Event::MembersChanged { count: self.members.len() });
                true
            }
            Registered::Updated => true,
            Registered::Refreshed => false,
        };
        for group in &registration.content_groups {
            if let Err(PoolExhausted) = self.data_channels.ensure(group, self.cfg.data_channels) {
                self.stats.data_pool_exhausted += 1;
            }
        }
        if changed {
            // Seed: report 3–5 s after the last registration.
            self.schedule_report(now);
        }
    }

    fn schedule_report(&mut self, now: Instant) {
        let t = &self.cfg.timing;
        let (lo, hi) = (t.report_delay_min, t.report_delay_max);
        let at = now + random_between(&mut self.rng, lo, hi);
        self.timers.set(Timer::Report, at);
    }

    fn member_left(&mut self, now: Instant, node: NodeId, reason: LeaveReason) {
        self.events.push_back(Event::MemberLeft { node, reason });
        self.events.push_back(Event::MembersChanged { count: self.members.len() });
        self.schedule_report(now);
    }

    fn expire_members(&mut self, now: Instant) {
        for node in self.members.expired(now, self.cfg.timing.member_timeout) {
            self.members.remove(node);
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
            let at = self.timers.get(Timer::Register).map_or(retry, |t| t.min(retry));
            self.timers.set(Timer::Register, at);
        }
    }

    // ----- sending ----------------------------------------------------------------------

    fn send(&mut self, dest: Dest, msg: &Message) {
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
            self.transmits.push_back(Transmit { dest, payload });
        }
    }

    fn send_heartbeat(&mut self, now: Instant) {
        let key = self.claim_key(now);
        let members = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        let payload = self.payload.clone();
        self.send(Dest::Group, &Message::LeaderAlive { key, members, payload });
        self.timers.set(Timer::Heartbeat, now + self.cfg.timing.heartbeat);
    }

    fn send_registration(&mut self, now: Instant) {
        let Some(leader) = self.leader.as_ref().map(|l| l.key.node) else { return };
        let registration = self.cfg.registration.clone();
        self.send(Dest::Group, &Message::Register { leader, registration });
        self.timers.set(Timer::Register, now + self.cfg.timing.member_refresh);
    }

    fn send_report(&mut self, now: Instant) {
        for report in self.members.report() {
            self.send(Dest::Group, &Message::MemberReport(report));
        }
        if !self.data_channels.assigned().is_empty() {
            self.send_data_channels();
        }
        self.timers.set(Timer::Report, now + self.cfg.timing.report_refresh);
    }

    fn send_data_channels(&mut self) {
        for channels in self.data_channels.announcements() {
            self.send(Dest::Group, &Message::DataChannels { channels });
        }
    }

    fn send_channel_move(&mut self, dest: Dest) {
        let msg =
            Message::ChannelMove { epoch: self.control.epoch(), channel: self.control.current() };
        self.send(dest, &msg);
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
