//! Election over real UDP multicast on loopback: five nodes elect the strongest, a forger and a
//! replayer on the same group change nothing, the leader is killed and the next strongest takes
//! over; a leader moves the control channel and everyone follows.

mod election_common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use cm_agent::election::{self, DriverConfig, ElectionHandle};
use cm_election::wire::{self, Header, Message};
use cm_election::{ClaimKey, Config, Event, NodeId, Priority};
use election_common::{CLUSTER, HEARTBEAT, SECRET, agreed, node};

fn fresh_channel() -> SocketAddr {
    election_common::fresh_channel(77)
}

fn spawn(id: NodeId, weight: u8, channel: SocketAddr) -> Result<ElectionHandle> {
    Ok(election::spawn(node(id, weight, channel), DriverConfig::loopback(), id)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_fail_over_and_ignore_forgeries() -> Result<()> {
    let channel = fresh_channel();
    let weights = [(1, 10), (2, 50), (3, 30), (4, 40), (5, 20)];
    let handles: Vec<ElectionHandle> =
        weights.iter().map(|&(id, w)| spawn(id, w, channel)).collect::<Result<_>>()?;
    let all: Vec<&ElectionHandle> = handles.iter().collect();
    let leader = agreed(&all, Duration::from_secs(10)).await?;
    assert_eq!(leader, 2, "the strongest node leads");

    // A sixth sender on the same group: it records genuine traffic, then replays it, and sends
    // forged claims (wrong secret), another cluster's claims, truncated and garbage datagrams.
    let spy = election::multicast_socket(channel, &DriverConfig::loopback())?;
    let mut recorded = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let record_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(record_until, spy.recv_from(&mut buf)).await
    {
        recorded.push(buf[..n].to_vec());
    }
    assert!(!recorded.is_empty(), "the spy heard the segment");
    let mut events: Vec<_> = handles.iter().map(|h| h.subscribe()).collect();
    let before: Vec<_> = handles.iter().map(|h| h.status()).collect();
    let strongest = ClaimKey { rank: 255, incumbent: true, priority: Priority::MAX, node: 66 };
    let claim = Message::LeaderClaim { key: strongest };
    let alive = Message::LeaderAlive { key: strongest, members: 0, payload: vec![] };
    let forged_key = Config::derive_key(b"guessed secret");
    let right_key = Config::derive_key(SECRET);
    for round in 0..20u64 {
        let h = Header { cluster: CLUSTER, sender: 66, incarnation: u64::MAX, seq: round };
        let mut bad = vec![
            wire::seal(&forged_key, &h, &claim)?,
            wire::seal(&forged_key, &h, &alive)?,
            wire::seal(&right_key, &Header { cluster: CLUSTER + 1, ..h }, &claim)?,
            b"CMEL\x01\x02garbage".to_vec(),
        ];
        let genuine = &recorded[round as usize % recorded.len()];
        bad.push(genuine.clone());
        bad.push(genuine[..genuine.len() / 2].to_vec());
        for d in bad {
            spy.send_to(&d, channel).await?;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(HEARTBEAT * 5).await;
    for (h, (b, ev)) in handles.iter().zip(before.iter().zip(events.iter_mut())) {
        let s = h.status();
        assert_eq!(s.leader, Some(2), "node {} still follows node 2", s.node);
        let ids =
            |st: &election::ElectionStatus| st.members.iter().map(|m| m.node).collect::<Vec<_>>();
        assert_eq!(ids(&s), ids(b), "node {}'s member list is unchanged", s.node);
        let dropped = s.stats.forged + s.stats.foreign + s.stats.replayed + s.stats.malformed;
        let before_dropped =
            b.stats.forged + b.stats.foreign + b.stats.replayed + b.stats.malformed;
        assert!(
            dropped >= before_dropped + 20 * 5,
            "node {} counted the bad datagrams: {:?}",
            s.node,
            s.stats
        );
        assert!(
            s.stats.forged > b.stats.forged,
            "node {} counted forgeries: {:?}",
            s.node,
            s.stats
        );
        assert!(
            s.stats.replayed + s.stats.own > b.stats.replayed + b.stats.own,
            "node {} counted replays: {:?}",
            s.node,
            s.stats
        );
        while let Ok(e) = ev.try_recv() {
            assert!(
                !matches!(
                    e,
                    Event::LeaderChanged { .. }
                        | Event::LostLeadership
                        | Event::StateChanged { .. }
                ),
                "node {} reacted to an outsider: {e:?}",
                s.node
            );
        }
    }

    // Kill the leader: node 4 (next strongest) takes over and the other three register with it.
    handles[1].abort();
    let rest: Vec<&ElectionHandle> =
        handles.iter().enumerate().filter(|&(i, _)| i != 1).map(|(_, h)| h).collect();
    let new_leader =
        agreed(&rest, Duration::from_secs(10)).await.context("after the leader was killed")?;
    assert_eq!(new_leader, 4);
    for h in &handles {
        h.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_moves_the_control_channel_and_everyone_follows() -> Result<()> {
    let channel = fresh_channel();
    let handles: Vec<ElectionHandle> = [(1, 1), (2, 3), (3, 2)]
        .iter()
        .map(|&(id, w)| spawn(id, w, channel))
        .collect::<Result<_>>()?;
    let all: Vec<&ElectionHandle> = handles.iter().collect();
    assert_eq!(agreed(&all, Duration::from_secs(10)).await?, 2);
    // Every node offers its HTTP address; members read the leader's from its heartbeats.
    for (i, h) in handles.iter().enumerate() {
        h.set_heartbeat_payload(format!("http://127.0.0.{}:7720", i + 1).into_bytes()).await?;
    }
    for h in &handles {
        let mut st = h.watch_status();
        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            st.wait_for(|s| s.leader_payload.as_deref() == Some(b"http://127.0.0.2:7720")),
        )
        .await;
        assert!(
            seen.is_ok_and(|r| r.is_ok()),
            "node {} learns the leader's address: {:?}",
            h.status().node,
            h.status()
        );
    }
    let mut moved = fresh_channel();
    while moved == channel {
        moved = fresh_channel();
    }
    assert!(
        handles[0].move_control_channel(moved).await.is_err(),
        "a member cannot move the channel"
    );
    handles[1].move_control_channel(moved).await?;
    tokio::time::sleep(HEARTBEAT * 10).await;
    for h in &handles {
        assert_eq!(h.status().control_channel, moved);
    }
    // Still one leader, heard on the new channel, long after leader_timeout.
    assert_eq!(agreed(&all, Duration::from_secs(5)).await?, 2);
    let la_before = handles[0].status().stats.accepted;
    tokio::time::sleep(HEARTBEAT * 5).await;
    assert!(handles[0].status().stats.accepted > la_before);
    for h in &handles {
        h.abort();
    }
    Ok(())
}
