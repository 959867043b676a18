//! Real `cmover agent` processes and a spy on their control group, for the process tests
//! (`election_processes.rs` on loopback, `election_netns.rs` across network namespaces).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cm_agent::election::{self, DriverConfig};
use cm_election::wire::{self, Message};
use cm_election::{Config, NodeId};
use tokio::net::UdpSocket;

pub const HEARTBEAT_MS: u64 = 100;
pub const SECRET: &str = "election process test secret, 32+";
pub const CLUSTER: u64 = 0xE1EC;
/// Everything that waits gives up after this (a broken election fails the test, never hangs it).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The `cmover` binary of this build (see `cm_tests::cmover_bin`).
pub fn cmover_bin() -> Result<PathBuf> {
    Ok(cm_tests::cmover_bin())
}

/// A running `cmover agent`, killed (SIGKILL) and reaped when dropped.
pub struct Agent {
    pub id: NodeId,
    config: PathBuf,
    log: PathBuf,
    pub status: SocketAddr,
    child: Option<Child>,
    /// Runs inside this network namespace (`ip netns exec`).
    netns: Option<String>,
}

impl Agent {
    /// Starts an agent on `channel` with multicast on the loopback interface.
    pub fn start(
        bin: &Path,
        dir: &Path,
        id: NodeId,
        weight: u8,
        segment: &str,
        channel: SocketAddr,
    ) -> Result<Agent> {
        Self::start_in(bin, dir, id, weight, segment, channel, Ipv4Addr::LOCALHOST, None)
    }

    /// Starts an agent whose multicast interface is `interface`, inside `netns` if given.
    /// The cluster secret is `dir/cluster.key` (written once by the test).
    #[allow(clippy::too_many_arguments)]
    pub fn start_in(
        bin: &Path,
        dir: &Path,
        id: NodeId,
        weight: u8,
        segment: &str,
        channel: SocketAddr,
        interface: Ipv4Addr,
        netns: Option<&str>,
    ) -> Result<Agent> {
        let data = dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&data)?;
        let secret = dir.join("cluster.key");
        // A free port for the status listener (the agent binds it right away).
        let status = SocketAddr::from(([127, 0, 0, 1], cm_agent::launch::free_port()?));
        let config = data.join("agent.toml");
        // The agent also receives content on its segment's data channel (MCTP); the election
        // tests do not use it, but `cmover agent` requires one: the control group, port + 1000.
        let data_channel = SocketAddr::new(channel.ip(), channel.port().wrapping_add(1000));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = {id}\nname = \"proc-{id}\"\ndata_dir = {data:?}\n\n\
                 [segment]\nname = {segment:?}\ncluster_id = {CLUSTER}\ncontrol_channel = \"{channel}\"\n\
                 interface = \"{interface}\"\nloopback = true\nsecret_file = {secret:?}\n\n\
                 [election]\nheartbeat_ms = {HEARTBEAT_MS}\noperator_weight = {weight}\n\n\
                 [status]\nlisten = \"{status}\"\n\n\
                 [data]\nchannel = \"{data_channel}\"\n"
            ),
        )?;
        let mut agent = Agent {
            id,
            config,
            log: data.join("agent.log"),
            status,
            child: None,
            netns: netns.map(str::to_owned),
        };
        agent.spawn(bin)?;
        Ok(agent)
    }

    /// (Re)starts the process with the same settings.
    pub fn spawn(&mut self, bin: &Path) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            // `cmover agent` insists on an agent token even with no manager configured.
            .env("CMOVER_AGENT_TOKEN", "election test agent token")
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
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails when the process has exited on its own (e.g. it refused its settings).
    pub fn check_running(&mut self) -> Result<()> {
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
pub struct Heard {
    /// Senders of Leader Alive.
    pub leaders: BTreeSet<NodeId>,
    /// Every authenticated sender.
    pub senders: BTreeSet<NodeId>,
    /// The last member report of each leader: (leader, listed members).
    pub reports: Vec<(NodeId, BTreeSet<NodeId>)>,
}

impl Heard {
    /// The members the last report of `leader` listed.
    pub fn members_of(&self, leader: NodeId) -> Option<&BTreeSet<NodeId>> {
        self.reports.iter().rev().find(|(l, _)| *l == leader).map(|(_, m)| m)
    }
}

pub struct Spy {
    socket: UdpSocket,
}

impl Spy {
    /// A spy on `channel` over loopback.
    pub fn on(channel: SocketAddr) -> Result<Spy> {
        Self::on_interface(channel, Ipv4Addr::LOCALHOST)
    }

    pub fn on_interface(channel: SocketAddr, interface: Ipv4Addr) -> Result<Spy> {
        let driver = DriverConfig { interface, ttl: 1, loopback: true };
        Ok(Spy { socket: election::multicast_socket(channel, &driver)? })
    }

    /// Listens for `window`. Datagrams that do not authenticate (none are expected) fail the test.
    pub async fn listen(&self, window: Duration) -> Result<Heard> {
        let key = Config::derive_key(SECRET.as_bytes());
        let mut heard = Heard::default();
        let mut buf = vec![0u8; 65_536];
        let until = tokio::time::Instant::now() + window;
        while let Ok(r) = tokio::time::timeout_at(until, self.socket.recv_from(&mut buf)).await {
            let (n, _) = r?;
            let (h, msg) = wire::open(&key, CLUSTER, &buf[..n])
                .map_err(|e| anyhow::anyhow!("unexpected datagram on the group: {e}"))?;
            heard.senders.insert(h.sender);
            match msg {
                Message::LeaderAlive { .. } => {
                    heard.leaders.insert(h.sender);
                }
                Message::MemberReport(r) => {
                    heard.reports.push((h.sender, r.members.into_iter().collect()))
                }
                _ => {}
            }
        }
        Ok(heard)
    }

    /// Waits until a window in which exactly `leader` sends Leader Alive and its report lists
    /// exactly `members`. Every window is also passed to `check` (e.g. "never two leaders").
    pub async fn converged(
        &self,
        leader: NodeId,
        members: &BTreeSet<NodeId>,
        mut check: impl FnMut(&Heard) -> Result<()>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        // A report goes out every 10 heartbeats even when nothing changes: windows of 12.
        let window = Duration::from_millis(HEARTBEAT_MS * 12);
        loop {
            let heard = self.listen(window).await?;
            check(&heard)?;
            if heard.leaders == BTreeSet::from([leader])
                && heard.members_of(leader) == Some(members)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "leader {leader} listing {members:?} not heard within {PATIENCE:?}; last window: {heard:?}"
                );
            }
        }
    }
}

/// The ids of the agents that are running.
pub fn ids(agents: &[Agent]) -> BTreeSet<NodeId> {
    agents.iter().filter(|a| a.child.is_some()).map(|a| a.id).collect()
}

/// A check for [`Spy::converged`]: only `segment`'s agents are heard, never two leaders at once.
pub fn only_from(segment: &BTreeSet<NodeId>) -> impl Fn(&Heard) -> Result<()> + '_ {
    only_from_alive(segment, segment)
}

/// [`only_from`] after some of `segment` were killed: never two of the `alive` ones leading at
/// once. A killed leader's last Leader Alive can still be in the spy's socket buffer, so it
/// may be heard in the same window as its successor without any split brain.
pub fn only_from_alive<'a>(
    segment: &'a BTreeSet<NodeId>,
    alive: &'a BTreeSet<NodeId>,
) -> impl Fn(&Heard) -> Result<()> + 'a {
    move |h: &Heard| {
        if !h.senders.is_subset(segment) {
            bail!("heard {:?} on a segment of {segment:?}: the segments interfere", h.senders);
        }
        let leading: BTreeSet<&NodeId> = h.leaders.intersection(alive).collect();
        if leading.len() > 1 {
            bail!("two leaders at once: {leading:?} (heard leading: {:?})", h.leaders);
        }
        Ok(())
    }
}
