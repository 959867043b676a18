//! Replay protection: per sender, the newest incarnation and a 64-wide window of sequence numbers.
//!
//! A datagram is fresh when its incarnation is newer than any seen from that sender (the sender
//! restarted: the window resets), or when it has the current incarnation and a sequence number
//! above the window or inside it and not yet seen. Anything else is a replay or a duplicate.
//! Entries exist only for authenticated senders, so an outsider cannot grow the map.

use std::collections::BTreeMap;

use crate::priority::NodeId;

const WINDOW: u64 = 64;

#[derive(Debug, Clone, Copy)]
struct SenderWindow {
    incarnation: u64,
    highest: u64,
    /// Bit i set: `highest - i` was seen.
    seen: u64,
}

/// One sender's window as the restart state stores it (see [`crate::restart`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRecord {
    pub sender: NodeId,
    pub incarnation: u64,
    /// The highest sequence number accepted in `incarnation`.
    pub highest: u64,
    /// Bit i set: `highest - i` was accepted.
    pub seen: u64,
}

/// Replay windows for every sender heard from.
#[derive(Debug, Default, Clone)]
pub struct ReplayGuard {
    senders: BTreeMap<NodeId, SenderWindow>,
}

impl ReplayGuard {
    /// Records `(incarnation, seq)` from `sender`; false when it is a replay or duplicate.
    pub fn accept(&mut self, sender: NodeId, incarnation: u64, seq: u64) -> bool {
        let fresh = SenderWindow { incarnation, highest: seq, seen: 1 };
        let w = match self.senders.get_mut(&sender) {
            None => {
                self.senders.insert(sender, fresh);
                return true;
            }
            Some(w) => w,
        };
        if incarnation > w.incarnation {
            *w = fresh;
            return true;
        }
        if incarnation < w.incarnation {
            return false;
        }
        if seq > w.highest {
            let shift = seq - w.highest;
            w.seen = if shift >= WINDOW { 0 } else { w.seen << shift };
            w.seen |= 1;
            w.highest = seq;
            return true;
        }
        let age = w.highest - seq;
        if age >= WINDOW || w.seen & (1 << age) != 0 {
            return false;
        }
        w.seen |= 1 << age;
        true
    }

    /// Every sender's window, by sender id. Windows are never forgotten while the node runs
    /// (a forgotten window would accept that sender's old datagrams again); their number is
    /// bounded by the cluster's authenticated senders.
    pub fn records(&self) -> Vec<ReplayRecord> {
        self.senders
            .iter()
            .map(|(&sender, w)| ReplayRecord {
                sender,
                incarnation: w.incarnation,
                highest: w.highest,
                seen: w.seen,
            })
            .collect()
    }

    /// The windows a previous run of this node saved: what it accepted stays a replay.
    pub fn from_records(records: &[ReplayRecord]) -> Self {
        let senders = records
            .iter()
            .map(|r| {
                (
                    r.sender,
                    SenderWindow { incarnation: r.incarnation, highest: r.highest, seen: r.seen },
                )
            })
            .collect();
        ReplayGuard { senders }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_old_and_stale_incarnations_are_rejected() {
        let mut g = ReplayGuard::default();
        assert!(g.accept(1, 10, 5));
        assert!(!g.accept(1, 10, 5));
        assert!(g.accept(1, 10, 7));
        assert!(g.accept(1, 10, 6), "reordered but fresh");
        assert!(!g.accept(1, 10, 6));
        assert!(g.accept(1, 10, 100));
        assert!(!g.accept(1, 10, 36), "fell out of the window");
        assert!(g.accept(1, 10, 37));
        assert!(!g.accept(1, 9, 1000), "older incarnation");
        assert!(g.accept(1, 11, 1), "restart resets the window");
        assert!(!g.accept(1, 10, 101));
        assert!(g.accept(2, 10, 5), "senders are independent");
        // A node restarted with its saved windows still rejects everything it accepted.
        let mut restored = ReplayGuard::from_records(&g.records());
        assert_eq!(restored.records(), g.records());
        assert!(
            !restored.accept(1, 11, 1)
                && !restored.accept(2, 10, 5)
                && !restored.accept(1, 10, 100)
        );
        assert!(restored.accept(1, 11, 2) && restored.accept(2, 10, 4));
    }
}
