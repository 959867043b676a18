//! A deterministic network simulator for the election: N state machines, virtual time, a
//! seeded RNG, and a network that loses, duplicates, delays and reorders datagrams, splits
//! into partitions that heal, and sees nodes crash and restart and outsiders forge or replay
//! packets. [`run_scenario`] plays one seeded scenario and checks the invariants on every step.
//!
//! Everything here is a pure function of the seed, so a failing seed replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use cm_sansio::{Dest, Instant};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, DataChannelPool, Eligibility, Registration};
use crate::machine::{Election, Event, State};
use crate::priority::{NodeId, PriorityInputs};
use crate::restart::{RestartState, next_incarnation};
use crate::wire;

/// How the simulated network treats each datagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetConfig {
    pub loss: f64,
    pub duplicate: f64,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl NetConfig {
    /// A healthy LAN: nothing lost, 0.1–2 ms latency.
    pub fn perfect() -> Self {
        NetConfig {
            loss: 0.0,
            duplicate: 0.0,
            min_delay: Duration::from_micros(100),
            max_delay: Duration::from_millis(2),
        }
    }
}

/// How many of a node's most recently accepted datagrams an attacker replays to it when it
/// restarts.
const REPLAYED_ON_RESTART: usize = 8;

/// One simulated server.
#[derive(Debug)]
pub struct SimNode {
    /// The configuration it (re)starts with; `incarnation` grows on every restart.
    pub config: Config,
    /// `None` while crashed.
    pub election: Option<Election>,
    pub addr: SocketAddr,
    /// Its "disk": the last restart state it saved (a process crash keeps it).
    pub saved: Option<RestartState>,
    /// Every `(sender, incarnation, seq)` it ever accepted, across restarts: none twice.
    accepted: BTreeSet<(NodeId, u64, u64)>,
    /// Its latest accepted datagrams, which an attacker replays when it restarts.
    recent: VecDeque<Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Delivery {
    at: Instant,
    order: u64,
    to: usize,
    from: usize,
    bytes: Vec<u8>,
}

/// The simulated segment.
#[derive(Debug)]
pub struct Sim {
    pub now: Instant,
    pub nodes: Vec<SimNode>,
    pub net: NetConfig,
    /// Component label per node; nodes with different labels cannot hear each other.
    pub partition: Option<Vec<u8>>,
    queue: BinaryHeap<Reverse<Delivery>>,
    rng: ChaCha8Rng,
    order: u64,
    /// A sample of authentic datagrams, for replay attacks.
    recorded: Vec<Vec<u8>>,
    pub delivered: u64,
    /// Print every event (set `SIM_TRACE=1` when replaying a seed).
    pub trace: bool,
    /// When set, every event is recorded here with its time and node.
    pub log: Option<Vec<(Instant, NodeId, Event)>>,
    /// A broken invariant seen while delivering (reported by [`check_local`]).
    violation: Option<String>,
}

impl Sim {
    /// A segment of `configs.len()` nodes, none started yet.
    pub fn new(seed: u64, configs: Vec<Config>, net: NetConfig) -> Self {
        let nodes = configs
            .into_iter()
            .enumerate()
            .map(|(i, config)| SimNode {
                config,
                election: None,
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1)), 7000),
                saved: None,
                accepted: BTreeSet::new(),
                recent: VecDeque::new(),
            })
            .collect();
        Sim {
            now: Instant::ZERO,
            nodes,
            net,
            partition: None,
            queue: BinaryHeap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            order: 0,
            recorded: Vec::new(),
            delivered: 0,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            log: None,
            violation: None,
        }
    }

    /// Starts (or restarts) node `i` from what it saved, as a driver does: a new incarnation
    /// from a wall clock that is sometimes off or stepped back, the saved control channel and
    /// replay windows. An attacker immediately replays the node's latest accepted datagrams.
    pub fn start(&mut self, i: usize) {
        let skew_ms: i64 = if self.rng.random_bool(0.2) {
            -self.rng.random_range(0..2000)
        } else {
            self.rng.random_range(-20..20)
        };
        let clock =
            (self.now.since_origin().as_micros() as i64 + 1_000_000 + skew_ms * 1000).max(0) as u64;
        let seed = self.rng.random();
        let node = &mut self.nodes[i];
        let incarnation = next_incarnation(node.saved.as_ref(), clock);
        if node.saved.as_ref().is_some_and(|s| incarnation <= s.incarnation) {
            self.violation = Some(format!(
                "node {} restarted with incarnation {incarnation}, not above its last",
                node.config.node
            ));
        }
        node.config.incarnation = incarnation;
        let e = Election::resume(node.config.clone(), self.now, seed, node.saved.as_ref())
            .expect("simulated configs are valid");
        node.election = Some(e);
        let replays: Vec<Vec<u8>> = node.recent.iter().cloned().collect();
        self.flush(i);
        for bytes in replays {
            self.inject(i, bytes);
        }
    }

    /// Runs `f` on live node `i` at the current time (a request such as a channel move), then
    /// sends what it produced.
    pub fn with_node<T>(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Election, Instant) -> T,
    ) -> Option<T> {
        let now = self.now;
        let out = f(self.nodes[i].election.as_mut()?, now);
        self.flush(i);
        Some(out)
    }

    /// Delivers raw bytes to node `i` now (an outsider's packet).
    pub fn inject(&mut self, i: usize, bytes: Vec<u8>) {
        self.order += 1;
        self.queue.push(Reverse(Delivery {
            at: self.now,
            order: self.order,
            to: i,
            from: i,
            bytes,
        }));
    }

    pub fn crash(&mut self, i: usize) {
        self.nodes[i].election = None;
    }

    pub fn is_live(&self, i: usize) -> bool {
        self.nodes[i].election.is_some()
    }

    /// The live elections with their indices.
    pub fn live(&self) -> impl Iterator<Item = (usize, &Election)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| n.election.as_ref().map(|e| (i, e)))
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.partition.as_ref().is_none_or(|p| p[a] == p[b])
    }

    fn flush(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(e) = node.election.as_mut() else { return };
        // Stored before anything is sent, as a driver must.
        if let Some(save) = e.poll_save() {
            node.saved = Some(save.state);
        }
        let mut out = Vec::new();
        while let Some(t) = e.poll_transmit() {
            let channel = match t.dest {
                Dest::Group => e.control_channel(),
                // The election never sends by unicast; a unicast would reach the node
                // listening on that address, as a channel does.
                Dest::Channel(c) | Dest::To(c) => c,
            };
            out.push((channel, t.payload));
        }
        while let Some(ev) = e.poll_event() {
            if self.trace {
                eprintln!("{:>10.1?} node {:>3}: {ev:?}", self.now.since_origin(), e.node());
            }
            if let Some(log) = self.log.as_mut() {
                log.push((self.now, e.node(), ev));
            }
        }
        for (channel, bytes) in out {
            if self.recorded.len() < 64 && self.rng.random_bool(0.05) {
                self.recorded.push(bytes.clone());
            }
            for j in 0..self.nodes.len() {
                let listening =
                    self.nodes[j].election.as_ref().is_some_and(|e| e.control_channel() == channel);
                if j == i || !listening || !self.connected(i, j) {
                    continue;
                }
                let copies = if self.rng.random_bool(self.net.duplicate) { 2 } else { 1 };
                for _ in 0..copies {
                    if self.rng.random_bool(self.net.loss) {
                        continue;
                    }
                    self.enqueue(j, i, bytes.clone());
                }
            }
        }
    }

    fn enqueue(&mut self, to: usize, from: usize, bytes: Vec<u8>) {
        let (lo, hi) = (self.net.min_delay, self.net.max_delay);
        let span = u64::try_from(hi.saturating_sub(lo).as_nanos()).unwrap_or(u64::MAX);
        let at = self.now + lo + Duration::from_nanos(self.rng.random_range(0..=span));
        self.order += 1;
        self.queue.push(Reverse(Delivery { at, order: self.order, to, from, bytes }));
    }

    /// An outsider sends node `to` garbage, a forgery (a recorded datagram with a bit flipped)
    /// or a replay of a recorded datagram.
    pub fn attack(&mut self, to: usize) {
        let bytes = match self.rng.random_range(0..3) {
            0 => {
                let n = self.rng.random_range(0..120);
                (0..n).map(|_| self.rng.random()).collect()
            }
            kind => {
                if self.recorded.is_empty() {
                    return;
                }
                let mut d = self.recorded[self.rng.random_range(0..self.recorded.len())].clone();
                if kind == 1 {
                    let bit = self.rng.random_range(0..d.len() * 8);
                    d[bit / 8] ^= 1 << (bit % 8);
                }
                d
            }
        };
        self.order += 1;
        let from = to; // the source address is irrelevant to authentication
        self.queue.push(Reverse(Delivery { at: self.now, order: self.order, to, from, bytes }));
    }

    /// Processes the next delivery or timer at or before `limit`; false when there is none
    /// (then the clock moves to `limit`).
    pub fn step(&mut self, limit: Instant) -> bool {
        let next_msg = self.queue.peek().map(|d| d.0.at);
        let next_timer = self.live().filter_map(|(_, e)| e.poll_timeout()).min();
        let next = match (next_msg, next_timer) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => {
                    self.now = self.now.max(limit);
                    return false;
                }
            },
        };
        if next > limit {
            self.now = self.now.max(limit);
            return false;
        }
        self.now = self.now.max(next);
        if next_msg == Some(next) {
            let Reverse(d) = self.queue.pop().expect("peeked");
            let from = self.nodes[d.from].addr;
            let node = &mut self.nodes[d.to];
            if let Some(e) = node.election.as_mut() {
                self.delivered += 1;
                let r = e.handle_datagram(self.now, from, &d.bytes);
                if self.trace {
                    eprintln!(
                        "{:>10.1?} node {:>3}: datagram from [{}] {} bytes: {r:?}",
                        self.now.since_origin(),
                        e.node(),
                        d.from,
                        d.bytes.len()
                    );
                }
                if r.is_ok()
                    && let Some(h) = wire::peek_header(&d.bytes)
                {
                    if !node.accepted.insert((h.sender, h.incarnation, h.seq)) {
                        self.violation.get_or_insert(format!(
                            "node {} accepted datagram {h:?} a second time (a replay) at {:?}",
                            node.config.node, self.now
                        ));
                    }
                    if node.recent.len() == REPLAYED_ON_RESTART {
                        node.recent.pop_front();
                    }
                    node.recent.push_back(d.bytes);
                }
                self.flush(d.to);
            }
        }
        // Timers due at this same instant run in the same step (a driver calls
        // handle_timeout whenever poll_timeout has passed).
        for i in 0..self.nodes.len() {
            let now = self.now;
            if let Some(e) = self.nodes[i].election.as_mut()
                && e.poll_timeout().is_some_and(|t| t <= now)
            {
                e.handle_timeout(now);
                self.flush(i);
            }
        }
        true
    }

    /// Runs until `until`, calling `check` after every step.
    pub fn run_until(
        &mut self,
        until: Instant,
        mut check: impl FnMut(&Sim) -> Result<(), String>,
    ) -> Result<(), String> {
        while self.step(until) {
            check(self)?;
        }
        check(self)
    }

    /// Runs until `done` holds (checked after every step) or `deadline`; returns when it held.
    pub fn run_until_true(
        &mut self,
        deadline: Instant,
        mut check: impl FnMut(&Sim) -> Result<(), String>,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Result<Option<Instant>, String> {
        loop {
            check(self)?;
            if done(self) {
                return Ok(Some(self.now));
            }
            if !self.step(deadline) {
                return Ok(None);
            }
        }
    }

    /// One line per node: state, leader, members, counters (for failure messages).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let line = match &n.election {
                None => format!("\n  [{i}] node {} crashed", n.config.node),
                Some(e) => format!(
                    "\n  [{i}] node {} {:?} leader {:?} members {} registered_with {:?} next timer {:?} {:?}",
                    e.node(),
                    e.state(),
                    e.leader(),
                    e.members().len(),
                    e.registered_with(),
                    e.poll_timeout(),
                    e.stats()
                ),
            };
            out.push_str(&line);
        }
        out
    }

    /// The one leader every live node agrees on, if there is exactly one.
    pub fn agreed_leader(&self) -> Option<usize> {
        let leaders: Vec<usize> =
            self.live().filter(|(_, e)| e.is_leader()).map(|(i, _)| i).collect();
        let &[l] = leaders.as_slice() else { return None };
        let lid = self.nodes[l].config.node;
        let all_follow = self.live().all(|(i, e)| {
            if i == l {
                e.state() == State::GlIsMe
            } else {
                e.state() == State::GlKnown && e.leader() == Some(lid)
            }
        });
        all_follow.then_some(l)
    }

    /// True when the leader `l`'s member list is exactly the other live nodes and every one of
    /// them has seen itself in the leader's report.
    pub fn members_converged(&self, l: usize) -> bool {
        let Some(leader) = self.nodes[l].election.as_ref() else { return false };
        let lid = leader.node();
        let listed: BTreeSet<NodeId> = leader.members().map(|m| m.node).collect();
        let others: BTreeSet<NodeId> =
            self.live().filter(|&(i, _)| i != l).map(|(_, e)| e.node()).collect();
        listed == others
            && self.live().filter(|&(i, _)| i != l).all(|(_, e)| e.registered_with() == Some(lid))
    }
}

/// Invariants that hold at every step for every live node, whatever the network does.
pub fn check_local(sim: &Sim) -> Result<(), String> {
    if let Some(v) = &sim.violation {
        return Err(v.clone());
    }
    for (i, e) in sim.live() {
        let id = e.node();
        let s = e.state();
        if s == State::GlIsMe && !e.is_leader() {
            return Err(format!("node {id} in GL-is-me without leadership"));
        }
        if e.is_leader() && !matches!(s, State::GlIsMe | State::VotingOpen) {
            return Err(format!("node {id} leads in state {s:?}"));
        }
        if s == State::GlKnown && (e.leader().is_none() || e.leader() == Some(id)) {
            return Err(format!("node {id} in GL-known without another leader"));
        }
        if !e.config().eligible() && matches!(s, State::GlIsMe | State::VotingOpen) {
            return Err(format!("ineligible node {id} is claiming ({s:?})"));
        }
        if !e.is_leader() && e.members().len() != 0 {
            return Err(format!("node {id} keeps a member list while not leading"));
        }
        if let Some(t) = e.poll_timeout()
            && t <= sim.now
        {
            return Err(format!(
                "node {id} (index {i}) has a timer in the past at {:?}: {e:?}",
                sim.now
            ));
        }
    }
    Ok(())
}

/// What one scenario measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub nodes: usize,
    /// Virtual time from the network healing to one agreed leader.
    pub converge: Duration,
    /// Virtual time from the leader's crash to every live node knowing the new leader.
    pub failover: Option<Duration>,
    pub delivered: u64,
}

const HEARTBEAT: Duration = Duration::from_millis(100);

fn h(n: u32) -> Duration {
    HEARTBEAT * n
}

fn random_config(rng: &mut ChaCha8Rng, id: NodeId, shared: Option<PriorityInputs>) -> Config {
    let channel: SocketAddr = "239.7.7.7:7000".parse().expect("literal address");
    let mut c = Config::new(0xC1, id, 0, b"simulated cluster secret", channel, HEARTBEAT);
    c.priority = shared.unwrap_or_else(|| PriorityInputs {
        cpu_cores: rng.random_range(1..=64),
        cpu_mhz: rng.random_range(1000..=4000),
        free_memory_mib: rng.random_range(0..100_000),
        free_disk_mib: rng.random_range(0..2_000_000),
        uptime_secs: rng.random_range(0..1_000_000),
        recent_failures: rng.random_range(0..3),
        content_lag_secs: rng.random_range(0..10_000),
        operator_weight: if rng.random_bool(0.2) { rng.random_range(0..3) } else { 0 },
    });
    let groups = ["web", "images", "config"];
    c.registration = Registration {
        name: format!("bes-{id}"),
        address: format!("10.0.0.{id}:7001"),
        cpu_cores: 8,
        cpu_mhz: 2000,
        free_disk_mib: 1000,
        content_groups: groups
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .map(|g| g.to_string())
            .collect(),
    };
    c.data_channels = Some(DataChannelPool {
        first: "239.8.0.1:7100".parse().expect("literal address"),
        count: 16,
    });
    c
}

/// Plays the scenario of `seed` and checks every invariant. `Err` names the broken one.
///
/// Phases: staggered start; chaos (loss, duplication, delay/reordering, partitions that heal,
/// crashes and restarts, forged and replayed packets); heal (every node up, perfect network)
/// until one agreed leader and converged member lists; a stable stretch checked on every step;
/// the leader crashes and the strongest remaining candidate must take over within
/// [`crate::Timing::failover_bound`]; the old leader restarts and joins as a member (sticky).
pub fn run_scenario(seed: u64) -> Result<Outcome, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = rng.random_range(2..=6usize);
    let mut ids: BTreeSet<NodeId> = BTreeSet::new();
    while ids.len() < n {
        ids.insert(rng.random_range(1..200));
    }
    let mut ids: Vec<NodeId> = ids.into_iter().collect();
    // Shuffle so index order is not id order.
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let shared = rng.random_bool(0.3).then(|| PriorityInputs {
        cpu_cores: 8,
        cpu_mhz: 3000,
        ..Default::default()
    });
    let mut configs: Vec<Config> = ids
        .iter()
        .map(|&id| {
            let s = if rng.random_bool(0.5) { shared } else { None };
            random_config(&mut rng, id, s)
        })
        .collect();
    if n >= 3 && rng.random_bool(0.2) {
        configs[0].eligibility = Eligibility::Ineligible;
    }
    if rng.random_bool(0.15) {
        let pre: Vec<NodeId> =
            ids.iter().copied().filter(|_| rng.random_bool(0.3)).take(2).collect();
        for c in &mut configs {
            c.preassigned = pre.clone();
        }
    }
    let eligible = configs.iter().filter(|c| c.eligible()).count();

    let chaotic = NetConfig {
        loss: rng.random_range(0.0..0.3),
        duplicate: rng.random_range(0.0..0.1),
        min_delay: Duration::from_micros(100),
        max_delay: Duration::from_millis(rng.random_range(1..30)),
    };
    let mut sim = Sim::new(rng.random(), configs, chaotic);

    // Staggered start.
    let mut starts: Vec<(Instant, usize)> = (0..n)
        .map(|i| (Instant::from_origin(Duration::from_millis(rng.random_range(0..300))), i))
        .collect();
    starts.sort();
    for (at, i) in starts {
        sim.run_until(at, check_local)?;
        sim.start(i);
    }

    // Chaos.
    let chaos_end = sim.now + h(rng.random_range(10..40));
    while sim.now < chaos_end {
        let next = (sim.now + Duration::from_millis(rng.random_range(50..800))).min(chaos_end);
        sim.run_until(next, check_local)?;
        match rng.random_range(0..10) {
            0 | 1 => {
                let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..2)).collect();
                if sim.trace {
                    eprintln!("{:>10.1?} partition {labels:?}", sim.now.since_origin());
                }
                sim.partition = Some(labels);
            }
            2 | 3 => sim.partition = None,
            4 => {
                let i = rng.random_range(0..n);
                if sim.is_live(i) {
                    sim.crash(i);
                } else {
                    sim.start(i);
                }
            }
            5 | 6 => {
                for _ in 0..rng.random_range(1..5) {
                    let i = rng.random_range(0..n);
                    sim.attack(i);
                }
            }
            _ => {}
        }
    }

    // Heal.
    sim.partition = None;
    sim.net = NetConfig::perfect();
    for i in 0..n {
        if !sim.is_live(i) {
            sim.start(i);
        }
    }
    let healed = sim.now;
    if sim.trace {
        eprintln!("{:>10.1?} network healed", healed.since_origin());
    }
    // What chaos left behind (a member that missed heartbeats in a partition, a leader whose
    // list still holds a member that was not heard) surfaces within one failover or one member
    // timeout; judge convergence after that.
    let timing = &sim.nodes[0].config.timing;
    let grace =
        timing.failover_bound(sim.net.max_delay).max(timing.member_timeout) + timing.heartbeat;
    sim.run_until(healed + grace, check_local)?;
    let converged = |s: &Sim| s.agreed_leader().is_some_and(|l| s.members_converged(l));
    let Some(at) = sim.run_until_true(healed + h(80), check_local, converged)? else {
        return Err(format!(
            "no agreed leader with converged members 8 s after healing (leader: {:?})",
            sim.agreed_leader().map(|l| sim.nodes[l].config.node)
        ));
    };
    let mut outcome = Outcome { nodes: n, converge: at - healed, ..Default::default() };

    // Stable: nothing may change while the network is perfect.
    let leader = sim.agreed_leader().expect("converged");
    let stable = |s: &Sim| -> Result<(), String> {
        check_local(s)?;
        if s.agreed_leader() != Some(leader) {
            return Err(format!(
                "leadership changed on a perfect network at {:?}:{}",
                s.now,
                s.describe()
            ));
        }
        if !s.members_converged(leader) {
            return Err(format!(
                "membership changed on a perfect network at {:?}:{}",
                s.now,
                s.describe()
            ));
        }
        Ok(())
    };
    sim.run_until(sim.now + h(rng.random_range(20..40)), stable)?;

    // Failover: crash the leader; the strongest remaining candidate must win within the bound.
    if eligible >= 2 {
        let now = sim.now;
        let expected = sim
            .live()
            .filter(|&(i, e)| i != leader && e.config().eligible())
            .map(|(_, e)| e.claim_key(now))
            .max()
            .expect("another eligible node");
        sim.crash(leader);
        let crashed = sim.now;
        let bound = sim.nodes[leader].config.timing.failover_bound(sim.net.max_delay);
        let Some(at) =
            sim.run_until_true(crashed + bound * 2, check_local, |s| s.agreed_leader().is_some())?
        else {
            return Err("no new leader after the leader crashed".into());
        };
        let took = at - crashed;
        if took > bound {
            return Err(format!("failover took {took:?}, over the documented bound {bound:?}"));
        }
        let winner = sim.agreed_leader().expect("agreed");
        if sim.nodes[winner].config.node != expected.node {
            return Err(format!(
                "node {} won but the strongest live candidate was {} ({expected:?})",
                sim.nodes[winner].config.node, expected.node
            ));
        }
        outcome.failover = Some(took);

        // The old leader comes back and joins as a member: the incumbent keeps its role.
        sim.start(leader);
        let done = |s: &Sim| s.agreed_leader() == Some(winner) && s.members_converged(winner);
        let deadline = sim.now + h(40);
        let sticky = |s: &Sim| -> Result<(), String> {
            check_local(s)?;
            match s.agreed_leader() {
                Some(l) if l != winner => Err("a restarted node deposed the incumbent".into()),
                _ => Ok(()),
            }
        };
        if sim.run_until_true(deadline, sticky, done)?.is_none() {
            return Err("the restarted old leader did not rejoin as a registered member".into());
        }
    }
    outcome.delivered = sim.delivered;
    Ok(outcome)
}
