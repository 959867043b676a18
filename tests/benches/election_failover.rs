//! Failover with real UDP multicast on loopback, beside VRRP's formula, and the steady-state
//! message rate. `cargo bench -p cm-tests --bench election_failover`
//! (`ELECTION_BENCH_SIZES=3,10,50`, `ELECTION_BENCH_RUNS=5` change the sweep).
//!
//! Each size runs three ways, side by side: a crash of the leader with nodes without memory
//! (`spawn`), the same with nodes that store their restart state in a file after every input
//! (`spawn_persistent`, as `cmover agent` does: what the state file costs), and a planned stop
//! (the leader resigns on the wire, as `cmover agent` does on SIGTERM).
//!
//! Failover = from the leader's end (a kill, or the resignation, at a random point of its
//! heartbeat cycle) until every live node reports the same new leader and that node reports
//! itself leader. VRRP (RFC 5798) is counted from the same event: a crashed master is noticed
//! after master down interval = 3 × interval + skew, skew = (256 − priority)/256 × interval,
//! from its last advertisement, i.e. on average half an interval less from a kill at a random
//! phase; a master that stops cleanly sends priority 0 and the backup takes over after the
//! skew alone. Shown for priority 100 (the default backup) and 254 (the best possible).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cm_agent::election::{self, DriverConfig, ElectionHandle, ElectionStatus, StateFile};
use cm_election::{Config, NodeId, PriorityInputs, Timing};
use rand::Rng;
use tokio::sync::watch;

const HEARTBEAT: Duration = Duration::from_millis(100);

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn fresh_channel() -> SocketAddr {
    let mut rng = rand::rng();
    let ip = Ipv4Addr::new(239, 78, rng.random_range(0..=255), rng.random_range(1..=254));
    SocketAddr::V4(SocketAddrV4::new(ip, rng.random_range(40_000..50_000)))
}

/// How the leader ends.
#[derive(Clone, Copy, PartialEq)]
enum Ending {
    /// Killed without a word; `true`: the nodes keep a state file.
    Crash { state_file: bool },
    /// Stops cleanly and resigns on the wire.
    Resign,
}

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Ending::Crash { state_file: false } => "crash",
            Ending::Crash { state_file: true } => "crash+file",
            Ending::Resign => "resign",
        }
    }

    /// VRRP's mean takeover time for a backup of `priority`, counted from the same event.
    fn vrrp(self, priority: u32) -> Duration {
        let skew = HEARTBEAT * (256 - priority) / 256;
        match self {
            Ending::Crash { .. } => HEARTBEAT * 3 + skew - HEARTBEAT / 2,
            Ending::Resign => skew,
        }
    }
}

struct Cluster {
    /// `None` once that node ended.
    handles: Vec<Option<ElectionHandle>>,
    watches: Vec<watch::Receiver<ElectionStatus>>,
}

impl Cluster {
    /// `n` nodes; with `state_dir`, each keeps its restart state in a file there.
    fn start(n: usize, state_dir: Option<&Path>) -> Result<Self> {
        let channel = fresh_channel();
        let mut handles = Vec::new();
        for i in 1..=n {
            let id = i as NodeId;
            let mut c = Config::new(0xBE7C, id, 1, b"failover bench secret", channel, HEARTBEAT);
            c.priority = PriorityInputs { operator_weight: i as u8, ..Default::default() };
            let handle = match state_dir {
                Some(dir) => election::spawn_persistent(
                    c,
                    DriverConfig::loopback(),
                    id,
                    StateFile::at(dir.join(format!("node-{id}.state"))),
                )?,
                None => election::spawn(c, DriverConfig::loopback(), id)?,
            };
            handles.push(Some(handle));
        }
        let watches = handles.iter().flatten().map(|h| h.watch_status()).collect();
        Ok(Cluster { handles, watches })
    }

    /// The leader every live node agrees on (and which leads), if any.
    fn agreed(&self, live: &[usize], with_members: bool) -> Option<NodeId> {
        let first = self.watches[live[0]].borrow().leader?;
        let mut leader_ok = false;
        for &i in live {
            let s = self.watches[i].borrow();
            if s.leader != Some(first) {
                return None;
            }
            if s.node == first {
                leader_ok = s.is_leader && (!with_members || s.members.len() == live.len() - 1);
            }
        }
        leader_ok.then_some(first)
    }

    async fn wait_agreed(
        &self,
        live: &[usize],
        with_members: bool,
        within: Duration,
    ) -> Result<(NodeId, Instant)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.agreed(live, with_members) {
                return Ok((l, Instant::now()));
            }
            if Instant::now() > deadline {
                bail!("no agreement within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn sent(&self) -> (u64, u64) {
        let total = self.watches.iter().map(|w| w.borrow().stats.sent).sum();
        let leader = self
            .watches
            .iter()
            .filter(|w| w.borrow().is_leader)
            .map(|w| w.borrow().stats.sent)
            .sum();
        (total, leader)
    }
}

struct Row {
    n: usize,
    ending: Ending,
    failovers: Vec<Duration>,
    per_node_rate: f64,
    leader_rate: f64,
    member_rate: f64,
    strongest_won: usize,
}

async fn measure(n: usize, runs: usize, ending: Ending) -> Result<Row> {
    let persistent = ending == Ending::Crash { state_file: true };
    let mut failovers = Vec::new();
    let (mut per_node_rate, mut leader_rate, mut member_rate) = (0.0, 0.0, 0.0);
    let mut strongest_won = 0;
    for run in 0..runs {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start(n, persistent.then_some(dir.path()))?;
        let all: Vec<usize> = (0..n).collect();
        // Usually the strongest (node n) leads. Nodes that store their state start one after
        // the other (an fsync each), and a weaker early node may win before the strongest has
        // started (a starting node then joins the working leader): kill whoever leads.
        let (leader, _) = cluster.wait_agreed(&all, true, Duration::from_secs(30)).await?;
        let leader_index = (leader - 1) as usize;
        if run == 0 {
            // Steady state: registered, reports done; count what everyone sends.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let window = Duration::from_secs(5);
            let (t0, l0) = cluster.sent();
            tokio::time::sleep(window).await;
            let (t1, l1) = cluster.sent();
            let secs = window.as_secs_f64();
            per_node_rate = (t1 - t0) as f64 / n as f64 / secs;
            leader_rate = (l1 - l0) as f64 / secs;
            member_rate = ((t1 - t0) - (l1 - l0)) as f64 / (n - 1) as f64 / secs;
        }
        // End the leader at a random point of its heartbeat cycle.
        let phase =
            Duration::from_micros(rand::rng().random_range(0..HEARTBEAT.as_micros() as u64));
        tokio::time::sleep(phase).await;
        let killed = Instant::now();
        let leader_handle = cluster.handles[leader_index].take().expect("the leader runs");
        match ending {
            Ending::Crash { .. } => leader_handle.abort(),
            Ending::Resign => {
                tokio::spawn(leader_handle.leave());
            }
        }
        let live: Vec<usize> = (0..n).filter(|&i| i != leader_index).collect();
        let strongest_survivor = live.iter().map(|&i| (i + 1) as NodeId).max().expect("n >= 2");
        let (new, at) = cluster.wait_agreed(&live, false, Duration::from_secs(10)).await?;
        // On a loaded host a weaker node can claim first and keep the role (sticky incumbent);
        // count how often the strongest survivor won rather than fail the run.
        if new == strongest_survivor {
            strongest_won += 1;
        }
        failovers.push(at - killed);
        for h in cluster.handles.iter().flatten() {
            h.abort();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    failovers.sort();
    Ok(Row { n, ending, failovers, per_node_rate, leader_rate, member_rate, strongest_won })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let sizes = env_list("ELECTION_BENCH_SIZES", &[3, 10, 50]);
    let runs = env_list("ELECTION_BENCH_RUNS", &[5])[0].max(1);
    let bound = Timing::scaled(HEARTBEAT).failover_bound(Duration::ZERO);
    println!(
        "election failover, real UDP multicast on loopback, heartbeat {} ms, {runs} runs per size",
        HEARTBEAT.as_millis()
    );
    println!("documented bound (from the last heartbeat heard): {}", ms(bound));
    println!(
        "{:>5} | {:>10} | {:>9} | {:>9} | {:>9} | {:>12} | {:>12} | {:>14} | {:>12} | {:>12} | {:>12} | {:>9}",
        "nodes",
        "ending",
        "min",
        "median",
        "max",
        "VRRP p=100",
        "VRRP p=254",
        "median/VRRP100",
        "msg/s/node",
        "leader msg/s",
        "member msg/s",
        "strongest"
    );
    let endings =
        [Ending::Crash { state_file: false }, Ending::Crash { state_file: true }, Ending::Resign];
    for (n, ending) in sizes.into_iter().flat_map(|n| endings.map(|e| (n, e))) {
        let row = rt.block_on(measure(n, runs, ending))?;
        let median = row.failovers[row.failovers.len() / 2];
        println!(
            "{:>5} | {:>10} | {:>9} | {:>9} | {:>9} | {:>12} | {:>12} | {:>14.2} | {:>12.2} | {:>12.2} | {:>12.2} | {:>9}",
            row.n,
            row.ending.name(),
            ms(row.failovers[0]),
            ms(median),
            ms(*row.failovers.last().expect("runs >= 1")),
            ms(row.ending.vrrp(100)),
            ms(row.ending.vrrp(254)),
            median.as_secs_f64() / row.ending.vrrp(100).as_secs_f64(),
            row.per_node_rate,
            row.leader_rate,
            row.member_rate,
            format!("{}/{}", row.strongest_won, row.failovers.len()),
        );
    }
    Ok(())
}
