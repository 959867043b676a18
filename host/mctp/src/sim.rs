//! Deterministic simulation of one MCTP session: a group leader, N members, a lossy network,
//! all in virtual time driven by one seed.
//!
//! The network can drop (independently or in bursts, per member link), delay, reorder and
//! duplicate every datagram. Scenarios add a member that joins late, a member that crashes and
//! returns (with what it had already delivered still on disk), a member reachable only by
//! unicast, a member that already holds the content, and a group leader that dies mid-session
//! and is replaced (by election) with a new one that resends the same assignment.
//!
//! Invariants checked on every run ([`run`] returns a [`Violation`] naming the seed):
//! - no member ever delivers bytes that differ from the assignment (partial or wrong);
//! - the final report is honest: every member it calls complete delivered, and every live member
//!   that did not deliver is listed as incomplete;
//! - the session ends (the GL finishes) within a bounded virtual time.

use crate::sender::{Member, Outcome, Output, Sender, SenderConfig, SenderEvent, SessionReport};
use crate::tree::{FrameTree, TreeLayout, frame_cv};
use crate::{Keys, Receiver, ReceiverConfig, RxEvent, SessionInfo};
use cm_sansio::{Dest, Instant, Transmit};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Gilbert–Elliott burst loss on each member's link: in the bad state every datagram is lost.
#[derive(Debug, Clone, Copy)]
pub struct BurstLoss {
    /// Per datagram, chance of entering the bad state.
    pub enter: f64,
    /// Per datagram, chance of leaving it.
    pub leave: f64,
}

/// One simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub members: usize,
    pub size: u64,
    pub frame_size: u16,
    /// Independent loss per datagram per link, both directions.
    pub loss: f64,
    pub burst: Option<BurstLoss>,
    /// Chance a datagram is delayed by up to `jitter` more (reordering).
    pub reorder: f64,
    pub jitter: Duration,
    pub duplicate: f64,
    pub encrypt: bool,
    /// Member index that starts listening only at this time.
    pub late_joiner: Option<(usize, Duration)>,
    /// Member index that crashes at the first time and comes back at the second.
    pub crash: Option<(usize, Duration, Duration)>,
    /// The GL dies at this time; a new GL starts `failover` later.
    pub gl_dies: Option<Duration>,
    pub failover: Duration,
    /// Member index that cannot receive multicast (served by unicast).
    pub unicast_only: Option<usize>,
    /// Member index that already holds the content.
    pub already_holds: Option<usize>,
    /// Member index that never comes up (it is expected but dead).
    pub dead: Option<usize>,
    pub quorum: Option<usize>,
    /// Member index whose driver takes this long to hash and flush the file once every frame
    /// is held (a large assignment on a slow disk); the member keeps answering meanwhile.
    pub slow_verify: Option<(usize, Duration)>,
    /// Every member processes at most this many bytes per second and queues at most the
    /// second number of bytes (its socket buffer); what arrives beyond that is dropped — a
    /// member overrun by a sender faster than its CPU, the loss rate control must avoid.
    pub capacity: Option<(u64, u64)>,
    /// Changes to the GL's configuration (e.g. checkpoints off, for a comparison).
    pub tune: Option<fn(&mut SenderConfig)>,
    /// The members (indices) the run is for, announced as its targets: the others must never
    /// start the session. `None`: every member.
    pub targets: Option<Vec<usize>>,
    /// Print every control datagram and report (for replaying a failing seed).
    pub trace: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            members: 6,
            size: 20_000,
            frame_size: 256,
            loss: 0.0,
            burst: None,
            reorder: 0.0,
            jitter: Duration::from_millis(3),
            duplicate: 0.0,
            encrypt: false,
            late_joiner: None,
            crash: None,
            gl_dies: None,
            failover: Duration::from_millis(300),
            unicast_only: None,
            already_holds: None,
            dead: None,
            quorum: None,
            slow_verify: None,
            capacity: None,
            tune: None,
            targets: None,
            trace: std::env::var_os("MCTP_SIM_TRACE").is_some(),
        }
    }
}

impl SimConfig {
    /// A scenario drawn from the seed: loss 0–50 %, sometimes bursts, reordering, duplication,
    /// a late joiner, a crash and return, a dying GL, a unicast-only member, encryption.
    pub fn random(seed: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0xc0ff_ee00);
        let mut c = SimConfig::new(seed);
        c.members = r.random_range(1..=10);
        // Sometimes a power of two of at least 1 KiB, so frames come tree-tagged.
        c.frame_size = if r.random_bool(0.3) {
            1024 << r.random_range(0..2)
        } else {
            r.random_range(64..=512)
        };
        c.size = match r.random_range(0..10) {
            0 => r.random_range(0..=u64::from(c.frame_size)), // inline
            _ => r.random_range(1..=40_000),
        };
        c.loss = r.random_range(0.0..=0.5);
        if r.random_bool(0.3) {
            c.burst = Some(BurstLoss {
                enter: r.random_range(0.001..0.05),
                leave: r.random_range(0.1..0.5),
            });
        }
        c.reorder = if r.random_bool(0.5) { r.random_range(0.0..0.5) } else { 0.0 };
        c.duplicate = if r.random_bool(0.3) { r.random_range(0.0..0.2) } else { 0.0 };
        c.encrypt = r.random_bool(0.3);
        let pick = |r: &mut ChaCha8Rng| r.random_range(0..c.members);
        if r.random_bool(0.3) {
            c.late_joiner = Some((pick(&mut r), Duration::from_millis(r.random_range(0..300))));
        }
        if r.random_bool(0.3) {
            let down = r.random_range(0..400);
            c.crash = Some((
                pick(&mut r),
                Duration::from_millis(down),
                Duration::from_millis(down + r.random_range(10..3000)),
            ));
        }
        if r.random_bool(0.2) {
            c.gl_dies = Some(Duration::from_millis(r.random_range(0..300)));
        }
        if r.random_bool(0.2) {
            c.unicast_only = Some(pick(&mut r));
        }
        c
    }
}

/// A datagram in flight: when it arrives, a tie-breaking sequence number, where, from whom,
/// and its bytes.
type InFlight = (Instant, u64, Node, SocketAddr, Vec<u8>);

/// What a run produced.
#[derive(Debug, Clone)]
pub struct SimResult {
    /// The report of the GL that finished (the replacement, when the first died).
    pub report: SessionReport,
    /// Per member: delivered a verified, byte-identical copy.
    pub delivered: Vec<bool>,
    /// Per member: alive at the end.
    pub alive: Vec<bool>,
    pub virtual_time: Duration,
    /// Data frames the GLs sent, and the frames in the assignment.
    pub frames_sent: u64,
    pub frames: u32,
    /// Datagrams dropped because a member's queue was full (with [`SimConfig::capacity`]).
    pub overrun: u64,
    /// The finishing GL's counters.
    pub stats: crate::SenderStats,
    /// Frames members wrote that came tree-tagged (with a chaining value).
    pub tree_writes: u64,
    /// Frames members recovered from coded repairs.
    pub coded_writes: u64,
}

/// A broken invariant, with the seed that replays it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: {} (replay: MCTP_SIM_SEED={} cargo test -p cm-mctp --test sim replay -- --nocapture)",
            self.seed, self.what, self.seed
        )
    }
}

const GROUP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 1, 2, 3)), 5000);
const REPORT_PORT: u16 = 5001;

fn member_addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8 + 1)), 6000)
}
fn gl_addr(generation: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, generation as u8 + 1)), REPORT_PORT)
}
fn member_id(i: usize) -> u64 {
    1000 + i as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Gl(u32),
    Member(usize),
}

struct SimMember {
    rx: Option<Receiver>,
    disk: Vec<u8>,
    delivered: bool,
    burst_bad: bool,
    /// A verification in progress: (done at, session).
    verifying: Option<(Instant, u64)>,
    /// With a capacity: when this member will have processed everything queued for it.
    busy_until: Instant,
    /// In a tree-tagged session: the hash assembled from the writes' CVs, as the driver does.
    tree: Option<(TreeLayout, FrameTree)>,
}

/// The sender configuration the simulation uses (quick timers for virtual time).
pub fn sim_sender_config() -> SenderConfig {
    let mut c = SenderConfig::new(GROUP, REPORT_PORT);
    c.initial_rate = 20_000_000;
    c.max_rate = 40_000_000;
    c.min_rate = 1_000_000;
    c.report_slot = Duration::from_millis(2);
    c.report_grace = Duration::from_millis(20);
    c.reannounce_interval = Duration::from_millis(200);
    // Sim assignments are tens of kilobytes: checkpoints every few frames exercise them.
    c.checkpoint_bytes = 4096;
    c.max_lag_bytes = 16_384;
    // MCTP_SIM_PLAIN_REPAIRS=1 turns coded repairs off, to compare sweeps with and without.
    c.coded_repairs = std::env::var_os("MCTP_SIM_PLAIN_REPAIRS").is_none();
    c
}

struct Sim {
    cfg: SimConfig,
    keys: Keys,
    content: Vec<u8>,
    info: SessionInfo,
    net: ChaCha8Rng,
    now: Instant,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    gl: Option<(u32, Sender)>,
    members: Vec<SimMember>,
    frames_sent: u64,
    frame_buf: Vec<u8>,
    overrun: u64,
    tree_writes: u64,
    coded_writes: u64,
}

/// Runs one seeded session to its end and checks the invariants.
pub fn run(cfg: &SimConfig) -> Result<SimResult, Violation> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut content = vec![0u8; cfg.size as usize];
    rng.fill(&mut content[..]);
    let info = SessionInfo {
        assignment: 77,
        name: "sim/assignment".into(),
        size: cfg.size,
        hash: *blake3::hash(&content).as_bytes(),
    };
    let keys = Keys::derive(b"simulated cluster");
    let members = (0..cfg.members)
        .map(|_| SimMember {
            rx: None,
            disk: Vec::new(),
            delivered: false,
            burst_bad: false,
            verifying: None,
            busy_until: Instant::ZERO,
            tree: None,
        })
        .collect();
    let sim = Sim {
        cfg: cfg.clone(),
        keys,
        content,
        info,
        net: rng,
        now: Instant::ZERO,
        queue: BinaryHeap::new(),
        seq: 0,
        gl: None,
        members,
        frames_sent: 0,
        frame_buf: Vec::new(),
        overrun: 0,
        tree_writes: 0,
        coded_writes: 0,
    };
    sim.go()
}

impl Sim {
    fn violation(&self, what: impl Into<String>) -> Violation {
        Violation { seed: self.cfg.seed, what: what.into() }
    }

    fn start_gl(&mut self, generation: u32) -> Result<(), Violation> {
        let mut c = sim_sender_config();
        c.frame_size = self.cfg.frame_size;
        c.encrypt = self.cfg.encrypt;
        c.quorum = self.cfg.quorum;
        if let Some(tune) = self.cfg.tune {
            tune(&mut c);
        }
        // Each GL is another node (a replacement after failover): its sessions are fresh.
        c.origin =
            crate::Origin { node: 1 << 32 | u64::from(generation), incarnation: 1, sequence: 1 };
        c.not_for = (0..self.cfg.members).filter(|i| !self.targeted(*i)).map(member_id).collect();
        let members: Vec<Member> = (0..self.cfg.members)
            .filter(|i| self.targeted(*i))
            .map(|i| Member {
                id: member_id(i),
                unicast: (self.cfg.unicast_only == Some(i)).then(|| member_addr(i)),
            })
            .collect();
        let inline = (self.info.size <= u64::from(c.frame_size)).then_some(&self.content[..]);
        let rng = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ 0x5e5d_0000 ^ u64::from(generation));
        let s =
            Sender::new(self.now, c, self.keys.clone(), rng, self.info.clone(), &members, inline)
                .map_err(|e| self.violation(format!("sender: {e}")))?;
        self.gl = Some((generation, s));
        Ok(())
    }

    fn targeted(&self, i: usize) -> bool {
        self.cfg.targets.as_ref().is_none_or(|t| t.contains(&i))
    }

    fn start_member(&mut self, i: usize) {
        let mut c = ReceiverConfig::new(member_id(i));
        c.session_timeout = Duration::from_secs(2);
        let rng = ChaCha8Rng::seed_from_u64(
            self.cfg
                .seed
                .wrapping_mul(31)
                .wrapping_add(i as u64)
                .wrapping_add(self.now.since_origin().as_nanos() as u64),
        );
        let mut rx = Receiver::new(c, self.keys.clone(), rng);
        let m = &mut self.members[i];
        // What a member delivered before is on its disk: after a restart it still holds it.
        if m.delivered || self.cfg.already_holds == Some(i) {
            rx.add_held(self.info.hash);
        }
        m.disk.clear();
        m.verifying = None;
        m.rx = Some(rx);
    }

    /// Puts one datagram on the wire from `from` to each node `dests` names.
    fn send(&mut self, from: SocketAddr, to: Vec<Node>, bytes: &[u8]) {
        if self.cfg.trace
            && let Ok(m) = crate::wire::open(&self.keys, bytes)
            && !matches!(m, crate::wire::Message::Data(..))
        {
            println!("{:>12?} {from} -> {to:?}: {m:?}", self.now.since_origin());
        }
        for node in to {
            let bad = match node {
                Node::Member(i) => {
                    let m = &mut self.members[i];
                    if let Some(b) = self.cfg.burst {
                        let flip = if m.burst_bad { b.leave } else { b.enter };
                        if self.net.random_bool(flip) {
                            m.burst_bad = !m.burst_bad;
                        }
                    }
                    m.burst_bad
                }
                Node::Gl(_) => false,
            };
            if bad || self.net.random_bool(self.cfg.loss) {
                if self.cfg.trace && bytes.len() < 1000 {
                    println!("{:>12?}   lost on the way to {node:?}", self.now.since_origin());
                }
                continue;
            }
            let copies = if self.net.random_bool(self.cfg.duplicate) { 2 } else { 1 };
            for _ in 0..copies {
                let mut delay = Duration::from_micros(100);
                if self.net.random_bool(self.cfg.reorder) {
                    delay += self.cfg.jitter.mul_f64(self.net.random::<f64>());
                }
                let mut at = self.now + delay;
                if let (Node::Member(i), Some((rate, buffer))) = (node, self.cfg.capacity) {
                    // A FIFO queue drained at `rate`: full means dropped.
                    let m = &mut self.members[i];
                    let queued =
                        m.busy_until.since_origin().saturating_sub(at.since_origin()).as_nanos()
                            as u64
                            * rate
                            / 1_000_000_000;
                    if queued + bytes.len() as u64 > buffer {
                        self.overrun += 1;
                        continue;
                    }
                    m.busy_until = m.busy_until.max(at)
                        + Duration::from_nanos(bytes.len() as u64 * 1_000_000_000 / rate);
                    at = m.busy_until;
                }
                self.seq += 1;
                self.queue.push(Reverse((at, self.seq, node, from, bytes.to_vec())));
            }
        }
    }

    fn member_nodes_for(&self, dest: Dest, everyone: &[SocketAddr]) -> Vec<Node> {
        let addrs: Vec<SocketAddr> = match dest {
            Dest::Group => everyone.to_vec(),
            Dest::Channel(a) | Dest::To(a) => vec![a],
        };
        let mut out = Vec::new();
        for a in addrs {
            if a == GROUP {
                out.extend(
                    (0..self.cfg.members)
                        .filter(|i| self.cfg.unicast_only != Some(*i))
                        .map(Node::Member),
                );
            } else if let Some(i) = (0..self.cfg.members).find(|i| member_addr(*i) == a) {
                out.push(Node::Member(i));
            }
        }
        out
    }

    fn pump_gl(&mut self) -> Option<SessionReport> {
        let (generation, mut gl) = self.gl.take()?;
        let from = gl_addr(generation);
        let mut finished = None;
        loop {
            gl.handle_timeout(self.now);
            let mut any = false;
            while let Some(t) = gl.poll_transmit(self.now) {
                any = true;
                match t {
                    Output::Control(Transmit { dest, payload }) => {
                        let to = self.member_nodes_for(dest, gl.everyone());
                        self.send(from, to, &payload);
                    }
                    Output::Frame { dest, frame } => {
                        self.frames_sent += 1;
                        let mut buf = std::mem::take(&mut self.frame_buf);
                        let content = &self.content;
                        gl.encode_frame::<()>(&frame, &mut buf, |p| {
                            let at = frame.offset as usize;
                            p.copy_from_slice(&content[at..at + p.len()]);
                            Ok(())
                        })
                        .expect("in-memory fill");
                        let to = self.member_nodes_for(dest, gl.everyone());
                        self.send(from, to, &buf);
                        self.frame_buf = buf;
                    }
                    Output::Coded { dest, coded } => {
                        self.frames_sent += 1;
                        let mut buf = std::mem::take(&mut self.frame_buf);
                        let content = &self.content;
                        gl.encode_coded::<()>(&coded, &mut buf, |at, p| {
                            p.copy_from_slice(&content[at as usize..at as usize + p.len()]);
                            Ok(())
                        })
                        .expect("in-memory fill");
                        let to = self.member_nodes_for(dest, gl.everyone());
                        self.send(from, to, &buf);
                        self.frame_buf = buf;
                    }
                }
            }
            while let Some(e) = gl.poll_event() {
                if let SenderEvent::Finished(r) = e {
                    finished = Some(r);
                }
            }
            if !any {
                break;
            }
        }
        self.gl = Some((generation, gl));
        finished
    }

    fn pump_member(&mut self, i: usize) -> Result<(), Violation> {
        let Some(mut rx) = self.members[i].rx.take() else { return Ok(()) };
        if let Some((at, session)) = self.members[i].verifying
            && self.now >= at
        {
            self.members[i].verifying = None;
            let ok = self.member_hash_ok(i);
            rx.verified(self.now, session, ok);
        }
        rx.handle_timeout(self.now);
        let me = member_addr(i);
        let gl_node = self.gl.as_ref().map(|(g, _)| Node::Gl(*g));
        while let Some(t) = rx.poll_transmit() {
            let (Dest::To(to) | Dest::Channel(to)) = t.dest else { continue };
            let bytes = t.payload;
            // Reports go to whichever GL owns that address (a dead GL's address goes nowhere).
            let to_node =
                self.gl.as_ref().filter(|(g, _)| gl_addr(*g) == to).map(|(g, _)| Node::Gl(*g));
            let _ = gl_node;
            self.send(me, to_node.into_iter().collect(), &bytes);
        }
        let result = self.member_events(i, &mut rx);
        self.members[i].rx = Some(rx);
        result
    }

    /// The member's verification: the tree's root (CVs it lacks computed from its disk, as the
    /// driver reads them back), or BLAKE3 of its disk.
    fn member_hash_ok(&mut self, i: usize) -> bool {
        let m = &mut self.members[i];
        match m.tree.as_mut() {
            Some((layout, tree)) => {
                let fs = usize::from(layout.frame_size);
                while let Some(seq) = tree.needs() {
                    let at = seq as usize * fs;
                    let Some(bytes) = m.disk.get(at..(at + fs).min(m.disk.len())) else {
                        return false;
                    };
                    tree.add(seq, frame_cv(at as u64, bytes));
                }
                tree.root() == Some(self.info.hash)
            }
            None => blake3::hash(&m.disk).as_bytes() == &self.info.hash,
        }
    }

    fn member_events(&mut self, i: usize, rx: &mut Receiver) -> Result<(), Violation> {
        while let Some(e) = rx.poll_event() {
            match e {
                RxEvent::Started { .. } if !self.targeted(i) => {
                    return Err(self.violation(format!(
                        "member {i} started a session announced for other members"
                    )));
                }
                RxEvent::Started { info, resumed, tree, .. } => {
                    if !resumed {
                        self.members[i].disk = vec![0; info.size as usize];
                    }
                    // Like the driver: a resumed file's earlier frames have no CVs here and are
                    // hashed from the file at verification.
                    self.members[i].tree = tree.map(|l| (l, FrameTree::new(l.frames)));
                }
                RxEvent::Verify { session, .. }
                    if self.cfg.slow_verify.is_some_and(|(m, _)| m == i) =>
                {
                    let delay = self.cfg.slow_verify.map(|(_, d)| d).unwrap_or_default();
                    self.members[i].verifying = Some((self.now + delay, session));
                }
                RxEvent::Verify { session, .. } => {
                    let ok = self.member_hash_ok(i);
                    rx.verified(self.now, session, ok);
                }
                RxEvent::Delivered { .. } => {
                    if self.members[i].disk != self.content {
                        return Err(self.violation(format!(
                            "member {i} delivered bytes that differ from the assignment"
                        )));
                    }
                    self.members[i].delivered = true;
                }
                RxEvent::AlreadyHeld { .. } => {
                    if !self.members[i].delivered && self.cfg.already_holds != Some(i) {
                        return Err(self.violation(format!(
                            "member {i} claims to hold content it never received"
                        )));
                    }
                    self.members[i].delivered = true;
                }
                RxEvent::Abandoned { .. } => self.members[i].disk.clear(),
            }
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        node: Node,
        from: SocketAddr,
        mut bytes: Vec<u8>,
    ) -> Result<(), Violation> {
        match node {
            Node::Gl(g) => {
                if let Some((generation, gl)) = self.gl.as_mut()
                    && *generation == g
                {
                    gl.handle_datagram(self.now, from, &bytes);
                }
            }
            Node::Member(i) => {
                let Some(mut rx) = self.members[i].rx.take() else { return Ok(()) };
                let write = rx.handle_datagram(self.now, from, &mut bytes);
                self.member_events(i, &mut rx)?;
                if let Some(w) = write {
                    let disk = &mut self.members[i].disk;
                    // A coded repair: the frame is the payload XOR the other frames, read from
                    // this member's own copy (as the driver reads its file).
                    let recovered;
                    let bytes = match &w.coded {
                        None => w.bytes,
                        Some(c) => {
                            let mut b = w.bytes.to_vec();
                            for &(off, len) in &c.xor {
                                let Some(part) = disk.get(off as usize..off as usize + len) else {
                                    return Err(self.violation(format!(
                                        "member {i} asked to read past the end of the assignment"
                                    )));
                                };
                                b.iter_mut().zip(part).for_each(|(x, y)| *x ^= y);
                            }
                            b.truncate(c.len);
                            self.coded_writes += 1;
                            recovered = b;
                            &recovered[..]
                        }
                    };
                    let at = w.offset as usize;
                    if at + bytes.len() > disk.len() {
                        return Err(self.violation(format!(
                            "member {i} asked to write past the end of the assignment"
                        )));
                    }
                    disk[at..at + bytes.len()].copy_from_slice(bytes);
                    if let (Some((_, tree)), Some(cv)) = (self.members[i].tree.as_mut(), w.cv) {
                        tree.add(w.seq, cv);
                        self.tree_writes += 1;
                    }
                    rx.written(w.session, w.seq, bytes.len());
                }
                self.members[i].rx = Some(rx);
                self.pump_member(i)?;
            }
        }
        Ok(())
    }

    fn go(mut self) -> Result<SimResult, Violation> {
        let limit = Instant::ZERO + Duration::from_secs(600);
        for i in 0..self.cfg.members {
            let late = self.cfg.late_joiner.is_some_and(|(j, _)| j == i);
            if !late && self.cfg.dead != Some(i) {
                self.start_member(i);
            }
        }
        self.start_gl(0)?;
        let mut generation = 0;
        let mut crashed = false;
        let mut returned = false;
        let mut joined = false;
        let mut gl_dead_since: Option<Instant> = None;
        let at = |d: Duration| Instant::ZERO + d;
        loop {
            // Scenario events due now.
            if let Some((i, t)) = self.cfg.late_joiner
                && !joined
                && self.now >= at(t)
            {
                joined = true;
                self.start_member(i);
            }
            if let Some((i, down, up)) = self.cfg.crash {
                if !crashed && self.now >= at(down) {
                    crashed = true;
                    self.members[i].rx = None;
                }
                if crashed && !returned && self.now >= at(up) {
                    returned = true;
                    self.start_member(i);
                }
            }
            if let Some(t) = self.cfg.gl_dies
                && generation == 0
                && gl_dead_since.is_none()
                && self.now >= at(t)
            {
                self.gl = None;
                gl_dead_since = Some(self.now);
            }
            if let Some(since) = gl_dead_since
                && self.gl.is_none()
                && self.now >= since + self.cfg.failover
            {
                generation += 1;
                self.start_gl(generation)?;
            }

            if let Some(report) = self.pump_gl() {
                return self.check(report);
            }
            for i in 0..self.cfg.members {
                self.pump_member(i)?;
            }
            // Next instant anything happens.
            let mut next = self.queue.peek().map(|Reverse((t, ..))| *t);
            let mut consider = |t: Option<Instant>| {
                if let Some(t) = t {
                    next = Some(next.map_or(t, |n: Instant| n.min(t)));
                }
            };
            consider(self.gl.as_ref().and_then(|(_, g)| g.poll_timeout()));
            for m in &self.members {
                consider(m.rx.as_ref().and_then(Receiver::poll_timeout));
                consider(m.verifying.filter(|_| m.rx.is_some()).map(|(t, _)| t));
            }
            for t in [
                self.cfg.late_joiner.filter(|_| !joined).map(|(_, t)| t),
                self.cfg.crash.filter(|_| !crashed).map(|c| c.1),
                self.cfg.crash.filter(|_| !returned).map(|c| c.2),
            ] {
                consider(t.map(at));
            }
            if generation == 0 && gl_dead_since.is_none() {
                consider(self.cfg.gl_dies.map(at));
            }
            if let Some(since) = gl_dead_since.filter(|_| self.gl.is_none()) {
                consider(Some(since + self.cfg.failover));
            }
            let Some(next) = next else {
                return Err(self.violation(
                    "simulation stalled: nothing scheduled and the GL has not finished",
                ));
            };
            self.now = self.now.max(next);
            if self.now > limit {
                return Err(self.violation("session did not finish within 600 s of virtual time"));
            }
            while let Some(Reverse((t, ..))) = self.queue.peek() {
                if *t > self.now {
                    break;
                }
                let Reverse((_, _, node, from, bytes)) = self.queue.pop().expect("peeked");
                self.deliver(node, from, bytes)?;
            }
        }
    }

    fn check(&self, report: SessionReport) -> Result<SimResult, Violation> {
        let delivered: Vec<bool> = self.members.iter().map(|m| m.delivered).collect();
        let alive: Vec<bool> = self.members.iter().map(|m| m.rx.is_some()).collect();
        for id in &report.complete {
            let i = (id - 1000) as usize;
            if !delivered[i] {
                return Err(self.violation(format!(
                    "report calls member {i} complete but it never delivered"
                )));
            }
        }
        for i in (0..self.cfg.members).filter(|i| self.targeted(*i)) {
            if alive[i]
                && !delivered[i]
                && !report.incomplete.iter().any(|(id, _)| *id == member_id(i))
            {
                return Err(self.violation(format!(
                    "live member {i} did not deliver and the report does not say so"
                )));
            }
        }
        if report.outcome == Outcome::Complete
            && (0..self.cfg.members).any(|i| self.targeted(i) && alive[i] && !delivered[i])
        {
            return Err(self.violation("outcome Complete while a live member lacks the assignment"));
        }
        let frames = self.gl.as_ref().map_or(0, |(_, g)| g.frame_count());
        let stats = self.gl.as_ref().map(|(_, g)| g.stats().clone()).unwrap_or_default();
        Ok(SimResult {
            report,
            delivered,
            alive,
            virtual_time: self.now.since_origin(),
            frames_sent: self.frames_sent,
            frames,
            overrun: self.overrun,
            stats,
            tree_writes: self.tree_writes,
            coded_writes: self.coded_writes,
        })
    }
}
