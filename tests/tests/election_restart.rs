//! Restart safety of the election driver over real UDP multicast on loopback, with each
//! node's state file in its own temporary data directory:
//!
//! - a node restarted after the leader moved the control channel (and stopped announcing the
//!   move on the old one) comes back on the new channel and registers again; its incarnation grew;
//! - a node restarted while its leader is dead refuses the dead leader's recorded heartbeats
//!   that an attacker replays (it had accepted them before it stopped), and never follows it;
//! - the killed run is recorded as a recent failure, a clean leave is not;
//! - the incarnation grows past a saved one from the future (a wall clock that stepped back);
//! - a corrupt or foreign state file stops the start with an error naming the file.

mod election_common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cm_agent::election::{self, DriverConfig, DriverError, ElectionHandle, StateFile};
use cm_election::wire;
use cm_election::{Config, Event, NodeId, RestartState, Save};
use election_common::{CLUSTER, HEARTBEAT, agreed, node};

fn fresh_channel() -> SocketAddr {
    election_common::fresh_channel(78)
}

fn spawn(id: NodeId, weight: u8, channel: SocketAddr, dir: &Path) -> Result<ElectionHandle> {
    Ok(election::spawn_persistent(
        node(id, weight, channel),
        DriverConfig::loopback(),
        id,
        StateFile::in_dir(dir),
    )?)
}

fn saved(dir: &Path) -> Result<RestartState> {
    StateFile::in_dir(dir).load()?.context("a state file was written")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_resumes_on_the_moved_channel() -> Result<()> {
    let channel = fresh_channel();
    let dirs: Vec<tempfile::TempDir> =
        (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let mut handles: Vec<ElectionHandle> = [(1, 1), (2, 3), (3, 2)]
        .iter()
        .zip(&dirs)
        .map(|(&(id, w), d)| spawn(id, w, channel, d.path()))
        .collect::<Result<_>>()?;
    assert_eq!(agreed(&handles.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?, 2);
    let mut moved = fresh_channel();
    while moved == channel {
        moved = fresh_channel();
    }
    handles[1].move_control_channel(moved).await?;
    // Past the leader's lingering announcements on the old channel (10 heartbeats).
    tokio::time::sleep(HEARTBEAT * 15).await;
    let before = saved(dirs[0].path())?;
    assert_eq!((before.control_channel, before.channel_epoch), (moved, 1), "the move is on disk");

    handles[0].abort();
    tokio::time::sleep(HEARTBEAT * 2).await;
    handles[0] = spawn(1, 1, channel, dirs[0].path())?;
    assert_eq!(handles[0].status().control_channel, moved, "resumed on the moved channel");
    let after = saved(dirs[0].path())?;
    assert!(
        after.incarnation > before.incarnation,
        "incarnation grew: {} -> {}",
        before.incarnation,
        after.incarnation
    );
    assert_eq!(after.failures, vec![before.incarnation], "the killed run is a recent failure");
    assert_eq!(agreed(&handles.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?, 2);
    for h in &handles {
        assert_eq!(h.status().control_channel, moved);
    }
    // A clean stop is saved as one: the next run will not count it as a failure.
    assert!(saved(dirs[2].path())?.running);
    handles.pop().context("three handles")?.leave().await?;
    assert!(!saved(dirs[2].path())?.running);
    for h in &handles {
        h.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_heartbeats_of_a_dead_leader_are_refused_after_a_restart() -> Result<()> {
    let channel = fresh_channel();
    let dirs: Vec<tempfile::TempDir> =
        (0..2).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let leader = spawn(1, 9, channel, dirs[0].path())?;
    let mut member = spawn(2, 1, channel, dirs[1].path())?;
    assert_eq!(agreed(&[&leader, &member], Duration::from_secs(10)).await?, 1);

    // An attacker on the group records the leader's heartbeats (the member accepts them too).
    let spy = election::multicast_socket(channel, &DriverConfig::loopback())?;
    let key = Config::derive_key(election_common::SECRET);
    let mut recorded = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let until = tokio::time::Instant::now() + HEARTBEAT * 8;
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(until, spy.recv_from(&mut buf)).await {
        if let Ok((h, wire::Message::LeaderAlive { .. })) = wire::open(&key, CLUSTER, &buf[..n])
            && h.sender == 1
        {
            recorded.push(buf[..n].to_vec());
        }
    }
    assert!(recorded.len() >= 4, "recorded {} heartbeats", recorded.len());
    // Let the member take in the last ones before both stop.
    tokio::time::sleep(HEARTBEAT).await;
    leader.abort();
    member.abort();
    tokio::time::sleep(HEARTBEAT).await;

    // The member restarts alone; the attacker replays every recorded heartbeat, again and again.
    member = spawn(2, 1, channel, dirs[1].path())?;
    let mut events = member.subscribe();
    for _ in 0..5 {
        for d in &recorded {
            spy.send_to(d, channel).await?;
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
    let st = member.status();
    assert!(st.stats.replayed >= recorded.len() as u64, "the replays were counted: {:?}", st.stats);
    assert_ne!(st.leader, Some(1), "the dead leader is not followed");
    while let Ok(ev) = events.try_recv() {
        if ev == (Event::LeaderChanged { leader: Some(1) }) {
            bail!("the restarted member followed the dead leader on a replay");
        }
    }
    // Alone, it becomes leader itself.
    let mut watch = member.watch_status();
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|s| s.is_leader))
        .await
        .context("the lone member leads")??;
    member.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_incarnation_grows_past_a_saved_one_from_the_future() -> Result<()> {
    let channel = fresh_channel();
    let dir = tempfile::tempdir()?;
    let future = u64::MAX / 2;
    let state = RestartState::first_run(CLUSTER, 5, future, channel);
    StateFile::in_dir(dir.path()).store(&Save { state, sync: true })?;
    let h = spawn(5, 1, channel, dir.path())?;
    assert_eq!(saved(dir.path())?.incarnation, future + 1);
    h.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_foreign_state_file_stops_the_start_and_names_the_file() -> Result<()> {
    let channel = fresh_channel();
    let dir = tempfile::tempdir()?;
    // Two runs: each start saves its incarnation, to the other slot.
    for _ in 0..2 {
        let h = spawn(6, 1, channel, dir.path())?;
        tokio::time::sleep(HEARTBEAT).await;
        h.abort();
    }
    let file = StateFile::in_dir(dir.path());
    let slots = file.slot_paths();
    let good: Vec<Vec<u8>> = slots.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    assert!(good.iter().all(|g| !g.is_empty()), "two starts fill both slots");
    let newest = file.load()?.context("a saved state")?;
    // One torn slot: the other one is used.
    let mut torn = good[0].clone();
    let mid = torn.len() / 2;
    torn[mid] ^= 0x40;
    std::fs::write(&slots[0], &torn)?;
    assert!(file.load()?.is_some(), "the intact slot is used");
    // Both corrupt (one flipped, one truncated): the start stops and names a slot file.
    std::fs::write(&slots[1], &good[1][..good[1].len() / 2])?;
    match spawn(6, 1, channel, dir.path()).map_err(|e| e.downcast::<DriverError>()) {
        Err(Ok(e @ DriverError::StateCorrupt { .. })) => {
            assert!(e.to_string().contains(&slots[0].display().to_string()), "{e}");
        }
        other => bail!("a corrupt state file was accepted: {:?}", other.map(|h| h.status())),
    }
    // Another node's state (a copied data directory) is refused too.
    for (slot, bytes) in slots.iter().zip(&good) {
        std::fs::write(slot, bytes)?;
    }
    assert_eq!(file.load()?.as_ref(), Some(&newest));
    let err =
        spawn(7, 1, channel, dir.path()).err().context("another node's state was accepted")?;
    assert!(err.to_string().contains("node 6"), "{err}");
    // Slot files created by a start that stopped before its first save count as absent.
    for slot in &slots {
        std::fs::write(slot, b"")?;
    }
    assert_eq!(file.load()?, None);
    Ok(())
}
