//! Where the segment talks: the control channel with its moves, and the data channels of
//! content groups.
//!
//! [`ControlChannel`]: the current control channel, the move epoch (only grows; an older move
//! replayed is ignored), the channels left before (most recent first, at most
//! [`MAX_OLD_CHANNELS`], where a leader keeps announcing the move so a node that was down
//! through it finds the segment), and the linger after a move the leader made itself (the move
//! repeated on the old channel every heartbeat for `channel_move_linger`).
//!
//! [`DataChannels`]: the leader's channel for every content group (drawn from the configured
//! pool, or set by the manager) and, on a member, the channels of its own groups.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cm_sansio::Instant;

use crate::config::DataChannelPool;

/// How many earlier control channels a node remembers (and a leader keeps announcing on).
pub const MAX_OLD_CHANNELS: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Linger {
    old: SocketAddr,
    until: Instant,
    next: Instant,
}

/// The control channel and its history.
#[derive(Debug, Clone)]
pub(crate) struct ControlChannel {
    current: SocketAddr,
    epoch: u32,
    old: Vec<SocketAddr>,
    linger: Option<Linger>,
}

impl ControlChannel {
    /// Starting on `current` at move `epoch`, having left `old` before.
    pub(crate) fn new(current: SocketAddr, epoch: u32, old: Vec<SocketAddr>) -> Self {
        ControlChannel { current, epoch, old, linger: None }
    }

    pub(crate) fn current(&self) -> SocketAddr {
        self.current
    }

    pub(crate) fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The channels left before, most recent first.
    pub(crate) fn old(&self) -> &[SocketAddr] {
        &self.old
    }

    /// A ChannelMove heard: `None` if its epoch is not newer than ours (a replayed or stale
    /// move), else `Some(moved)` — the epoch is taken, and `moved` says the channel changed.
    pub(crate) fn heard_move(&mut self, epoch: u32, channel: SocketAddr) -> Option<bool> {
        if epoch <= self.epoch {
            return None;
        }
        self.epoch = epoch;
        if channel == self.current {
            return Some(false);
        }
        self.switch(channel);
        Some(true)
    }

    /// The leader moves the segment to `channel` at `now`: a new epoch, and the move repeated
    /// on the old channel every `heartbeat` until `now + linger`. Returns the old channel, or
    /// `None` if `channel` is already the current one.
    pub(crate) fn start_move(
        &mut self,
        now: Instant,
        channel: SocketAddr,
        heartbeat: Duration,
        linger: Duration,
    ) -> Option<SocketAddr> {
        if channel == self.current {
            return None;
        }
        let old = self.current;
        self.epoch += 1;
        self.switch(channel);
        self.linger = Some(Linger { old, until: now + linger, next: now + heartbeat });
        Some(old)
    }

    /// Runs the linger at `now`: the old channel to repeat the move on, if that is due.
    pub(crate) fn linger_due(&mut self, now: Instant, heartbeat: Duration) -> Option<SocketAddr> {
        let l = self.linger?;
        if now >= l.until {
            self.linger = None;
            None
        } else if now >= l.next {
            self.linger = Some(Linger { next: now + heartbeat, ..l });
            Some(l.old)
        } else {
            None
        }
    }

    /// When the linger next needs [`ControlChannel::linger_due`].
    pub(crate) fn linger_deadline(&self) -> Option<Instant> {
        self.linger.map(|l| l.next.min(l.until))
    }

    /// Moves to `channel`, remembering where we were.
    fn switch(&mut self, channel: SocketAddr) {
        let old = self.current;
        self.old.retain(|&c| c != old && c != channel);
        self.old.insert(0, old);
        self.old.truncate(MAX_OLD_CHANNELS);
        self.current = channel;
    }
}

/// The pool was used up: a content group got no data channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolExhausted;

/// Data channels of content groups: the leader's for every group, a member's for its own.
#[derive(Debug, Clone, Default)]
pub(crate) struct DataChannels {
    /// Leader side: every group's channel.
    assigned: BTreeMap<String, SocketAddr>,
    /// Leader side: how many channels of the pool are handed out.
    pool_next: u16,
    /// Member side: the channels of our own groups.
    mine: BTreeMap<String, SocketAddr>,
}

impl DataChannels {
    /// Leader side: every group's channel.
    pub(crate) fn assigned(&self) -> &BTreeMap<String, SocketAddr> {
        &self.assigned
    }

    /// Member side: our groups' channels.
    pub(crate) fn mine(&self) -> &BTreeMap<String, SocketAddr> {
        &self.mine
    }

    /// Leader side: gives `group` the next channel of `pool` unless it has one already (no pool:
    /// nothing to do).
    pub(crate) fn ensure(
        &mut self,
        group: &str,
        pool: Option<DataChannelPool>,
    ) -> Result<(), PoolExhausted> {
        if self.assigned.contains_key(group) {
            return Ok(());
        }
        let Some(pool) = pool else { return Ok(()) };
        match (self.pool_next < pool.count)
            .then(|| nth_channel(pool.first, self.pool_next))
            .flatten()
        {
            Some(channel) => {
                self.pool_next += 1;
                self.assigned.insert(group.to_owned(), channel);
                Ok(())
            }
            None => Err(PoolExhausted),
        }
    }

    /// Leader side: sets `group`'s channel; true if that changed it.
    pub(crate) fn set(&mut self, group: String, channel: SocketAddr) -> bool {
        self.assigned.insert(group, channel) != Some(channel)
    }

    /// Leader side: the assignments in messages of at most 255 each.
    pub(crate) fn announcements(&self) -> Vec<Vec<(String, SocketAddr)>> {
        let all: Vec<(String, SocketAddr)> =
            self.assigned.iter().map(|(g, a)| (g.clone(), *a)).collect();
        all.chunks(usize::from(u8::MAX)).map(<[_]>::to_vec).collect()
    }

    /// Member side: the leader's announcement, kept for the groups in `ours`; returns what is
    /// new or changed, in the announcement's order.
    pub(crate) fn heard(
        &mut self,
        ours: &[String],
        channels: Vec<(String, SocketAddr)>,
    ) -> Vec<(String, SocketAddr)> {
        let mut changed = Vec::new();
        for (group, channel) in channels {
            if ours.contains(&group) && self.mine.get(&group) != Some(&channel) {
                self.mine.insert(group.clone(), channel);
                changed.push((group, channel));
            }
        }
        changed
    }
}

/// The `i`-th address after `first` (last octet or last IPv6 byte group incremented).
fn nth_channel(first: SocketAddr, i: u16) -> Option<SocketAddr> {
    let ip = match first.ip() {
        IpAddr::V4(v4) => IpAddr::V4(u32::from(v4).checked_add(u32::from(i))?.into()),
        IpAddr::V6(v6) => IpAddr::V6(u128::from(v6).checked_add(u128::from(i))?.into()),
    };
    Some(SocketAddr::new(ip, first.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Instant {
        Instant::from_origin(Duration::from_millis(n))
    }

    #[test]
    fn moves_remember_a_bounded_history_and_ignore_old_epochs() {
        let mut c = ControlChannel::new(a("239.0.0.1:7000"), 0, vec![]);
        assert_eq!(c.heard_move(1, a("239.0.0.2:7000")), Some(true));
        assert_eq!(c.heard_move(1, a("239.0.0.3:7000")), None, "same epoch again");
        assert_eq!(c.heard_move(2, a("239.0.0.2:7000")), Some(false), "epoch taken, no move");
        assert_eq!(c.epoch(), 2);
        for i in 3..10 {
            c.heard_move(i, a(&format!("239.0.0.{i}:7000")));
        }
        assert_eq!(c.current(), a("239.0.0.9:7000"));
        assert_eq!(c.old().len(), MAX_OLD_CHANNELS);
        assert_eq!(c.old()[0], a("239.0.0.8:7000"));
        // Back to a channel in the history: it leaves the history.
        c.heard_move(10, a("239.0.0.7:7000"));
        assert_eq!(c.old()[..2], [a("239.0.0.9:7000"), a("239.0.0.8:7000")]);
        assert!(!c.old().contains(&a("239.0.0.7:7000")));
    }

    #[test]
    fn a_leaders_move_lingers_on_the_old_channel() {
        let hb = Duration::from_millis(10);
        let mut c = ControlChannel::new(a("239.0.0.1:7000"), 0, vec![]);
        assert_eq!(c.start_move(ms(0), a("239.0.0.1:7000"), hb, hb * 3), None);
        assert_eq!(c.start_move(ms(0), a("239.0.0.2:7000"), hb, hb * 3), Some(a("239.0.0.1:7000")));
        assert_eq!(c.epoch(), 1);
        assert_eq!(c.linger_deadline(), Some(ms(10)));
        assert_eq!(c.linger_due(ms(5), hb), None);
        assert_eq!(c.linger_due(ms(10), hb), Some(a("239.0.0.1:7000")));
        assert_eq!(c.linger_deadline(), Some(ms(20)));
        assert_eq!(c.linger_due(ms(30), hb), None, "over");
        assert_eq!(c.linger_deadline(), None);
    }

    #[test]
    fn data_channels_come_from_the_pool_until_it_is_used_up() {
        let pool = Some(DataChannelPool { first: a("239.1.0.250:9000"), count: 2 });
        let mut d = DataChannels::default();
        assert_eq!(d.ensure("a", pool), Ok(()));
        assert_eq!(d.ensure("a", pool), Ok(()), "already has one");
        assert_eq!(d.ensure("b", pool), Ok(()));
        assert_eq!(d.ensure("c", pool), Err(PoolExhausted));
        assert_eq!(d.ensure("c", None), Ok(()));
        assert_eq!(d.assigned()["b"], a("239.1.0.251:9000"));
        assert!(d.set("c".into(), a("239.1.1.1:9000")));
        assert!(!d.set("c".into(), a("239.1.1.1:9000")));
        assert_eq!(d.announcements().len(), 1);
        let ours = vec!["b".to_owned()];
        let heard = d.heard(&ours, d.assigned().iter().map(|(g, c)| (g.clone(), *c)).collect());
        assert_eq!(heard, vec![("b".to_owned(), a("239.1.0.251:9000"))]);
        assert!(d.heard(&ours, vec![("b".into(), a("239.1.0.251:9000"))]).is_empty());
        assert_eq!(nth_channel(a("255.255.255.255:1"), 1), None);
    }
}
