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

mod election_common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cm_election::{NodeId, Timing};
use election_common::processes::{
    Agent, HEARTBEAT_MS, PATIENCE, SECRET, Spy, cmover_bin, ids, only_from, only_from_alive,
};
use rand::Rng;

fn channel(group: (u8, u8), port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 79, group.0, group.1), port))
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
    let mut seg_a: Vec<Agent> = weights_a
        .iter()
        .map(|&(id, w)| Agent::start(&bin, dir.path(), id, w, "segment-a", chan_a))
        .collect::<Result<_>>()?;
    let mut seg_b: Vec<Agent> = weights_b
        .iter()
        .map(|&(id, w)| Agent::start(&bin, dir.path(), id, w, "segment-b", chan_b))
        .collect::<Result<_>>()?;
    let (all_a, all_b) = (ids(&seg_a), ids(&seg_b));
    // An agent that refuses its settings exits at once: say so rather than wait for an election.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for agent in seg_a.iter_mut().chain(seg_b.iter_mut()) {
        agent.check_running()?;
    }

    // One leader per segment, the strongest, listing exactly its segment's other agents.
    let others = |all: &BTreeSet<NodeId>, l: NodeId| {
        all.iter().copied().filter(|&i| i != l).collect::<BTreeSet<_>>()
    };
    let (members_a, members_b) = (others(&all_a, 12), others(&all_b, 21));
    let (a, b) = tokio::join!(
        spy_a.converged(12, &members_a, only_from(&all_a)),
        spy_b.converged(21, &members_b, only_from(&all_b))
    );
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
    spy_a
        .converged(14, &others(&survivors, 14), only_from_alive(&all_a, &survivors))
        .await
        .context("after the leader was killed")?;

    // The killed agent comes back: no split brain, the incumbent keeps leading and lists it.
    seg_a[1].spawn(&bin)?;
    spy_a
        .converged(14, &others(&all_a, 14), only_from(&all_a))
        .await
        .context("after the old leader restarted")?;
    // A few more windows: still one leader, nothing from segment b.
    for _ in 0..3 {
        let heard = spy_a.listen(Duration::from_millis(HEARTBEAT_MS * 5)).await?;
        only_from(&all_a)(&heard)?;
        assert_eq!(heard.leaders, BTreeSet::from([14]), "the incumbent keeps leading");
    }
    spy_b
        .converged(21, &others(&all_b, 21), only_from(&all_b))
        .await
        .context("segment b undisturbed")?;

    // The operator's view agrees.
    let out = Command::new(&bin)
        .args(["agent", "status", "--status"])
        .arg(seg_a[3].status.to_string())
        .env_remove("RUST_BACKTRACE")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cmover agent status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().any(|l| l.starts_with("leader") && l.contains("this node")),
        "node 14 says it leads:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["members", "4"]),
        "node 14 lists 4 members:\n{text}"
    );
    for agent in seg_a.iter_mut() {
        agent.check_running()?;
    }
    drop(seg_b);
    Ok(())
}
