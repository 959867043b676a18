//! The election with real `cmover agent` processes on loopback, watched from outside: a spy
//! socket on each segment's control group authenticates the traffic (it knows the cluster
//! secret) and reads who sends Leader Alive and whom the leader's member reports list. So the
//! test judges what goes over the wire, not what an agent says about itself.
//!
//! Two segments run side by side on different multicast groups with the same port, cluster
//! id and secret (only the group separates them): five agents on one, three on the other.
//! - each segment elects exactly one leader (the highest operator weight) and its report lists
//!   exactly the segment's other agents; nothing of the other segment is ever heard;
//! - kill -9 of the first segment's leader: the next strongest takes over (the time is printed
//!   beside the documented bound; timing goals live in the failover bench, not here);
//! - the killed agent restarts with the same settings: never two leaders, the incumbent
//!   keeps leading and lists it again; `cmover agent status` shows the same;
//! - every process is killed when the test ends, whatever happens.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cm_agent::election::{self, DriverConfig};
use cm_election::wire::{self, Message};
use cm_election::{Config, NodeId, Timing};
use rand::Rng;
use tokio::net::UdpSocket;

const HEARTBEAT_MS: u64 = 100;
const SECRET: &str = "election process test secret, 32+";
const CLUSTER: u64 = 0xE1EC;
/// Everything that waits gives up after this (a broken election fails the test, never hangs it).
const PATIENCE: Duration = Duration::from_secs(20);

/// The `cmover` binary next to this test's executable (`<target>/<profile>/cmover`), built
/// first when it is missing.
fn cmover_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("tests run from <target>/<profile>/deps")?;
    let bin = profile_dir.join("cmover");
    if !bin.exists() {
        let target = profile_dir.parent().context("target dir")?;
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(cm_tests::workspace_root()).args(["build", "--quiet", "-p", "cmover", "--bin", "cmover"]).env("CARGO_TARGET_DIR", target);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if !cmd.status().context("running cargo build for cmover")?.success() {
            bail!("building cmover failed");
        }
    }
    Ok(bin)
}

/// A running `cmover agent`, killed (SIGKILL) and reaped when dropped.
struct Agent {
    id: NodeId,
    config: PathBuf,
    log: PathBuf,
    status: SocketAddr,
    child: Option<Child>,
}

impl Agent {
    fn start(bin: &Path, dir: &Path, id: NodeId, weight: u8, segment: &str, channel: SocketAddr) -> Result<Agent> {
        let data = dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&data)?;
        let secret = dir.join("cluster.key");
        // A free port for the status listener (the agent binds it right away).
        let status = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = data.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nid = {id}\nname = \"proc-{id}\"\ndata_dir = {data:?}\n\n\
                 [segment]\nname = {segment:?}\ncluster_id = {CLUSTER}\ncontrol_channel = \"{channel}\"\n\
                 interface = \"127.0.0.1\"\nloopback = true\nsecret_file = {secret:?}\n\n\
                 [election]\nheartbeat_ms = {HEARTBEAT_MS}\noperator_weight = {weight}\n\n\
                 [status]\nlisten = \"{status}\"\n"
            ),
        )?;
        let mut agent = Agent { id, config, log: data.join("agent.log"), status, child: None };
        agent.spawn(bin)?;
        Ok(agent)
    }

    fn spawn(&mut self, bin: &Path) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(bin)
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting cmover agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails when the process has exited on its own (e.g. it refused its settings).
    fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("agent {} exited with {status}; its log:\n{log}", self.id);
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the spy heard on a control group during one window.
#[derive(Debug, Default)]
struct Heard {
    /// Senders of Leader Alive.
    leaders: BTreeSet<NodeId>,
    /// Every authenticated sender.
    senders: BTreeSet<NodeId>,
    /// The last member report of each leader: (leader, listed members).
    reports: Vec<(NodeId, BTreeSet<NodeId>)>,
}

impl Heard {
    /// The members the last report of `leader` listed.
    fn members_of(&self, leader: NodeId) -> Option<&BTreeSet<NodeId>> {
        self.reports.iter().rev().find(|(l, _)| *l == leader).map(|(_, m)| m)
    }
}

struct Spy {
    socket: UdpSocket,
}

impl Spy {
    fn on(channel: SocketAddr) -> Result<Spy> {
        Ok(Spy { socket: election::multicast_socket(channel, &DriverConfig::loopback())? })
    }

    /// Listens for `window`. Datagrams that do not authenticate (none are expected) fail the test.
    async fn listen(&self, window: Duration) -> Result<Heard> {
        let key = Config::derive_key(SECRET.as_bytes());
        let mut heard = Heard::default();
        let mut buf = vec![0u8; 65_536];
        let until = tokio::time::Instant::now() + window;
        while let Ok(r) = tokio::time::timeout_at(until, self.socket.recv_from(&mut buf)).await {
            let (n, _) = r?;
            let (h, msg) = wire::open(&key, CLUSTER, &buf[..n]).map_err(|e| anyhow::anyhow!("unexpected datagram on the group: {e}"))?;
            heard.senders.insert(h.sender);
            match msg {
                Message::LeaderAlive { .. } => {
                    heard.leaders.insert(h.sender);
                }
                Message::MemberReport(r) => heard.reports.push((h.sender, r.members.into_iter().collect())),
                _ => {}
            }
        }
        Ok(heard)
    }

    /// Waits until a window in which exactly `leader` sends Leader Alive and its report lists
    /// exactly `members`. Every window is also passed to `check` (e.g. "never two leaders").
    async fn converged(&self, leader: NodeId, members: &BTreeSet<NodeId>, mut check: impl FnMut(&Heard) -> Result<()>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        // A report goes out every 10 heartbeats even when nothing changes: windows of 12.
        let window = Duration::from_millis(HEARTBEAT_MS * 12);
        loop {
            let heard = self.listen(window).await?;
            check(&heard)?;
            if heard.leaders == BTreeSet::from([leader]) && heard.members_of(leader) == Some(members) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("leader {leader} listing {members:?} not heard within {PATIENCE:?}; last window: {heard:?}");
            }
        }
    }
}

fn channel(group: (u8, u8), port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 79, group.0, group.1), port))
}

fn ids(agents: &[Agent]) -> BTreeSet<NodeId> {
    agents.iter().filter(|a| a.child.is_some()).map(|a| a.id).collect()
}

fn only_from(segment: &BTreeSet<NodeId>) -> impl Fn(&Heard) -> Result<()> + '_ {
    move |h: &Heard| {
        if !h.senders.is_subset(segment) {
            bail!("heard {:?} on a segment of {segment:?}: the segments interfere", h.senders);
        }
        if h.leaders.len() > 1 {
            bail!("two leaders at once: {:?}", h.leaders);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_elect_fail_over_rejoin_and_keep_segments_apart() -> Result<()> {
    let bin = cmover_bin()?;
    let dir = tempfile::tempdir()?;
    let mut rng = rand::rng();
    let port = rng.random_range(20_000..40_000);
    let (x, y) = (rng.random_range(0..=255), rng.random_range(1..=250));
    let (chan_a, chan_b) = (channel((x, y), port), channel((x, y + 1), port));
    let (spy_a, spy_b) = (Spy::on(chan_a)?, Spy::on(chan_b)?);
    std::fs::write(dir.path().join("cluster.key"), SECRET)?;

    let weights_a = [(11, 10), (12, 50), (13, 30), (14, 40), (15, 20)];
    let weights_b = [(21, 30), (22, 10), (23, 20)];
    let mut seg_a: Vec<Agent> =
        weights_a.iter().map(|&(id, w)| Agent::start(&bin, dir.path(), id, w, "segment-a", chan_a)).collect::<Result<_>>()?;
    let mut seg_b: Vec<Agent> =
        weights_b.iter().map(|&(id, w)| Agent::start(&bin, dir.path(), id, w, "segment-b", chan_b)).collect::<Result<_>>()?;
    let (all_a, all_b) = (ids(&seg_a), ids(&seg_b));
    // An agent that refuses its settings exits at once: say so rather than wait for an election.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for agent in seg_a.iter_mut().chain(seg_b.iter_mut()) {
        agent.check_running()?;
    }

    // One leader per segment, the strongest, listing exactly its segment's other agents.
    let others = |all: &BTreeSet<NodeId>, l: NodeId| all.iter().copied().filter(|&i| i != l).collect::<BTreeSet<_>>();
    let (members_a, members_b) = (others(&all_a, 12), others(&all_b, 21));
    let (a, b) = tokio::join!(spy_a.converged(12, &members_a, only_from(&all_a)), spy_b.converged(21, &members_b, only_from(&all_b)));
    a.context("segment a")?;
    b.context("segment b")?;

    // kill -9 the leader: node 14 (next strongest) takes over and lists the other three.
    let killed_at = tokio::time::Instant::now();
    seg_a[1].kill();
    let survivors = ids(&seg_a);
    let mut first_new_la = None;
    let deadline = killed_at + PATIENCE;
    while first_new_la.is_none() {
        let heard = spy_a.listen(Duration::from_millis(HEARTBEAT_MS / 4)).await?;
        only_from(&all_a)(&heard)?;
        if heard.leaders.contains(&14) {
            first_new_la = Some(killed_at.elapsed());
        } else if let Some(other) = heard.leaders.iter().find(|&&l| l != 12) {
            bail!("node {other} took over, not node 14 (the strongest survivor)");
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no new leader within {PATIENCE:?} after the leader was killed");
        }
    }
    let bound = Timing::scaled(Duration::from_millis(HEARTBEAT_MS)).failover_bound(Duration::ZERO);
    eprintln!(
        "kill -9 of the leader → first Leader Alive of node 14 after {:?} (documented bound from the last heartbeat heard: {bound:?})",
        first_new_la.unwrap_or_default()
    );
    spy_a.converged(14, &others(&survivors, 14), only_from(&all_a)).await.context("after the leader was killed")?;

    // The killed agent comes back: no split brain, the incumbent keeps leading and lists it.
    seg_a[1].spawn(&bin)?;
    spy_a.converged(14, &others(&all_a, 14), only_from(&all_a)).await.context("after the old leader restarted")?;
    // A few more windows: still one leader, nothing from segment b.
    for _ in 0..3 {
        let heard = spy_a.listen(Duration::from_millis(HEARTBEAT_MS * 5)).await?;
        only_from(&all_a)(&heard)?;
        assert_eq!(heard.leaders, BTreeSet::from([14]), "the incumbent keeps leading");
    }
    spy_b.converged(21, &others(&all_b, 21), only_from(&all_b)).await.context("segment b undisturbed")?;

    // The operator's view agrees.
    let out = Command::new(&bin).args(["agent", "status", "--status"]).arg(seg_a[3].status.to_string()).env_remove("RUST_BACKTRACE").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cmover agent status failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.starts_with("leader") && l.contains("this node")), "node 14 says it leads:\n{text}");
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["members", "4"]), "node 14 lists 4 members:\n{text}");
    for agent in seg_a.iter_mut() {
        agent.check_running()?;
    }
    drop(seg_b);
    Ok(())
}
