//! Helpers shared by the election tests on loopback (`election_*.rs`): fresh multicast
//! channels, node configurations, and waiting for one agreed leader.
#![allow(dead_code)]

pub mod processes;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Result, bail};
use cm_agent::election::ElectionHandle;
use cm_election::{Config, NodeId, PriorityInputs};
use rand::Rng;

pub const HEARTBEAT: Duration = Duration::from_millis(100);
pub const SECRET: &[u8] = b"loopback test secret";
pub const CLUSTER: u64 = 0x10_0b;

/// A group and port no other test uses (random within `239.<block>.x.y`, a block per test file).
pub fn fresh_channel(block: u8) -> SocketAddr {
    let mut rng = rand::rng();
    let ip = Ipv4Addr::new(239, block, rng.random_range(0..=255), rng.random_range(1..=254));
    SocketAddr::V4(SocketAddrV4::new(ip, rng.random_range(20_000..40_000)))
}

/// A node whose priority is its operator weight.
pub fn node(id: NodeId, weight: u8, channel: SocketAddr) -> Config {
    let mut c = Config::new(CLUSTER, id, 1, SECRET, channel, HEARTBEAT);
    c.priority = PriorityInputs { operator_weight: weight, ..Default::default() };
    c.registration.name = format!("bes-{id}");
    c
}

/// Waits until every handle agrees on one leader that lists all the others as members.
pub async fn agreed(handles: &[&ElectionHandle], within: Duration) -> Result<NodeId> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let st: Vec<_> = handles.iter().map(|h| h.status()).collect();
        if let Some(leader) = st[0].leader
            && st.iter().all(|s| s.leader == Some(leader))
            && let Some(ls) = st.iter().find(|s| s.node == leader)
            && ls.is_leader
            && ls.members.len() == handles.len() - 1
            && st.iter().filter(|s| s.node != leader).all(|s| s.registered_with == Some(leader))
        {
            return Ok(leader);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no agreed leader with registered members within {within:?}: {st:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
