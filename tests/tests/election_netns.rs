//! The election over real (virtual) interfaces rather than loopback: two network namespaces
//! the test creates, each with a veth link into a bridge (multicast snooping off) in the
//! host namespace. Two `cmover agent`s run in each namespace, their multicast bound to the
//! veth address (`IP_MULTICAST_IF`); a spy on the bridge watches the control group.
//!
//! The strongest agent (namespace a) leads and lists the three others; killed with -9, the
//! strongest survivor — in namespace b — takes over across the link; the killed agent
//! restarts, the incumbent keeps leading and lists it. Needs root (skipped otherwise, with a
//! message); the namespaces, links and bridge are removed when the test ends.

mod election_common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;

use anyhow::{Context, Result, bail};
use cm_election::NodeId;
use election_common::processes::{Agent, SECRET, Spy, cmover_bin, ids, only_from, only_from_alive};
use rand::Rng;

/// Two namespaces joined by a bridge; everything deleted on drop.
struct Lab {
    namespaces: Vec<String>,
    bridge: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Lab {
    /// Namespaces `cmel<tag>a`/`b` at 10.231.<subnet>.1 and .2, the bridge at .254.
    fn create(tag: u32, subnet: u8) -> Result<Lab> {
        let bridge = format!("cmbr{tag}");
        let mut lab = Lab { namespaces: Vec::new(), bridge: bridge.clone() };
        ip(&["link", "add", "name", &bridge, "type", "bridge", "mcast_snooping", "0"])?;
        ip(&["addr", "add", &format!("10.231.{subnet}.254/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for (i, side) in ["a", "b"].iter().enumerate() {
            let ns = format!("cmel{tag}{side}");
            ip(&["netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            let (outside, inside) = (format!("cmv{tag}{side}0"), format!("cmv{tag}{side}1"));
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.231.{subnet}.{}/24", i + 1),
                "dev",
                &inside,
            ])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end and with it the peer on the bridge.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_in_two_namespaces_elect_and_fail_over_across_the_link() -> Result<()> {
    if !is_root() {
        cm_tests::missing_part("creating network namespaces needs root");
        return Ok(());
    }
    let bin = cmover_bin()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("cluster.key"), SECRET)?;
    let mut rng = rand::rng();
    let tag = std::process::id() % 100_000;
    let subnet = rng.random_range(1..=250);
    // Agents (killed first) are declared after the lab (removed last).
    let lab = Lab::create(tag, subnet)?;
    let addr = |host: u8| Ipv4Addr::new(10, 231, subnet, host);
    let channel = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 80, rng.random(), rng.random_range(1..=254)),
        rng.random_range(20_000..40_000),
    ));
    let spy = Spy::on_interface(channel, addr(254))?;

    // (id, weight, namespace index)
    let plan: [(NodeId, u8, usize); 4] = [(31, 10, 0), (32, 40, 0), (33, 30, 1), (34, 20, 1)];
    let mut agents: Vec<Agent> = plan
        .iter()
        .map(|&(id, w, side)| {
            Agent::start_in(
                &bin,
                dir.path(),
                id,
                w,
                "segment-ns",
                channel,
                addr(side as u8 + 1),
                Some(&lab.namespaces[side]),
            )
        })
        .collect::<Result<_>>()?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for a in &mut agents {
        a.check_running()?;
    }
    let all = ids(&agents);
    let others = |l: NodeId, of: &BTreeSet<NodeId>| {
        of.iter().copied().filter(|&i| i != l).collect::<BTreeSet<_>>()
    };

    spy.converged(32, &others(32, &all), only_from(&all)).await.context("first election")?;
    agents[1].kill();
    let survivors = ids(&agents);
    spy.converged(33, &others(33, &survivors), only_from_alive(&all, &survivors))
        .await
        .context("after the leader was killed")?;
    agents[1].spawn(&bin)?;
    spy.converged(33, &others(33, &all), only_from(&all))
        .await
        .context("after the old leader restarted")?;
    for a in &mut agents {
        a.check_running()?;
    }
    drop(agents);
    drop(lab);
    Ok(())
}

/// The effective uid is 0 (from /proc/self/status: `Uid: real effective saved fs`).
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().nth(1))
        == Some("0")
}
