//! The leader's side of registration: who is registered, when each was last heard, and the
//! paged member report that tells members whether they are listed.
//!
//! [`Members`] only keeps the list; the machine decides when to report (3–5 s after the last
//! change, then every `report_refresh`) and turns changes into events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cm_sansio::Instant;

use crate::config::Registration;
use crate::priority::NodeId;
use crate::wire::{MAX_REPORT_IDS, MemberReport};

/// A registered member, as the leader knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: NodeId,
    pub registration: Registration,
    /// The address its datagrams came from.
    pub source: SocketAddr,
    pub joined: Instant,
    pub last_seen: Instant,
}

/// What a registration changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Registered {
    /// A node we did not list.
    Joined(Member),
    /// A listed member whose registration differs from what it said before.
    Updated,
    /// A listed member refreshing the same registration.
    Refreshed,
}

/// The registered members (not including the leader) and the report round.
#[derive(Debug, Clone, Default)]
pub(crate) struct Members {
    by_node: BTreeMap<NodeId, Member>,
    report_round: u32,
}

impl Members {
    pub(crate) fn len(&self) -> usize {
        self.by_node.len()
    }

    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = &Member> {
        self.by_node.values()
    }

    /// Forgets every member (leadership starts or ends); the report round keeps counting.
    pub(crate) fn clear(&mut self) {
        self.by_node.clear();
    }

    /// A Register from `node`, heard from `from` at `now`.
    pub(crate) fn register(
        &mut self,
        now: Instant,
        from: SocketAddr,
        node: NodeId,
        registration: &Registration,
    ) -> Registered {
        match self.by_node.get_mut(&node) {
            Some(m) => {
                m.last_seen = now;
                m.source = from;
                if m.registration != *registration {
                    m.registration = registration.clone();
                    Registered::Updated
                } else {
                    Registered::Refreshed
                }
            }
            None => {
                let member = Member {
                    node,
                    registration: registration.clone(),
                    source: from,
                    joined: now,
                    last_seen: now,
                };
                self.by_node.insert(node, member.clone());
                Registered::Joined(member)
            }
        }
    }

    /// Removes `node`; true if it was listed.
    pub(crate) fn remove(&mut self, node: NodeId) -> bool {
        self.by_node.remove(&node).is_some()
    }

    /// The members not heard from for `timeout` at `now`, in id order (still listed: the
    /// machine removes them one at a time, reporting each).
    pub(crate) fn expired(&self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        self.by_node.values().filter(|m| m.last_seen + timeout <= now).map(|m| m.node).collect()
    }

    /// When the next member times out.
    pub(crate) fn next_expiry(&self, timeout: Duration) -> Option<Instant> {
        self.by_node.values().map(|m| m.last_seen + timeout).min()
    }

    /// The next report round: the sorted member ids in pages of at most [`MAX_REPORT_IDS`],
    /// which together speak for every id (the last page reaches `NodeId::MAX`; an empty list is
    /// one empty page).
    pub(crate) fn report(&mut self) -> Vec<MemberReport> {
        self.report_round = self.report_round.wrapping_add(1);
        let ids: Vec<NodeId> = self.by_node.keys().copied().collect();
        let pages: Vec<&[NodeId]> =
            if ids.is_empty() { vec![&[]] } else { ids.chunks(MAX_REPORT_IDS).collect() };
        let mut lo = 0;
        let mut out = Vec::with_capacity(pages.len());
        for (i, page) in pages.iter().enumerate() {
            let hi = if i + 1 == pages.len() { NodeId::MAX } else { *page.last().unwrap_or(&lo) };
            out.push(MemberReport { round: self.report_round, lo, hi, members: page.to_vec() });
            lo = hi.saturating_add(1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Instant {
        Instant::from_origin(Duration::from_secs(s))
    }

    fn reg(name: &str) -> Registration {
        Registration { name: name.into(), ..Registration::default() }
    }

    #[test]
    fn join_refresh_update_and_expiry() {
        let mut m = Members::default();
        let from: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        assert!(matches!(m.register(at(1), from, 2, &reg("a")), Registered::Joined(_)));
        assert_eq!(m.register(at(2), from, 2, &reg("a")), Registered::Refreshed);
        assert_eq!(m.register(at(3), from, 2, &reg("b")), Registered::Updated);
        m.register(at(5), from, 3, &reg("c"));
        let timeout = Duration::from_secs(10);
        assert_eq!(m.next_expiry(timeout), Some(at(13)));
        assert_eq!(m.expired(at(12), timeout), Vec::<NodeId>::new());
        assert_eq!(m.expired(at(13), timeout), vec![2]);
        assert_eq!(m.expired(at(15), timeout), vec![2, 3]);
        assert!(m.remove(3) && !m.remove(3));
        assert_eq!(m.iter().map(|x| x.node).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn report_pages_cover_every_id() {
        let mut m = Members::default();
        let empty = m.report();
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].lo, empty[0].hi, empty[0].round), (0, NodeId::MAX, 1));
        let from: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        for node in 1..=(MAX_REPORT_IDS as u64 + 5) {
            m.register(at(0), from, node, &reg("n"));
        }
        let pages = m.report();
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0].round, 2);
        assert_eq!((pages[0].lo, pages[0].hi), (0, MAX_REPORT_IDS as u64));
        assert_eq!((pages[1].lo, pages[1].hi), (MAX_REPORT_IDS as u64 + 1, NodeId::MAX));
        assert_eq!(pages[1].members.len(), 5);
    }
}
