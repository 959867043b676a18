//! Fresh announcements only: per announcing GL, the newest origin a member accepted.
//!
//! Every datagram is authenticated with the cluster key, but a tag says nothing about *when* a
//! datagram was made: someone on the LAN can record a session's announcement and multicast it
//! again during a later session. Announcements therefore carry an [`Origin`] (the GL's node
//! id, its incarnation and the session's sequence number in it), and a member starts a session
//! only for an origin newer than every one it accepted from that node — the election's replay
//! rule (`cm_election::replay`) applied to sessions, which one GL runs one after another, so no
//! window of out-of-order numbers is needed: a member never goes back to an older session.
//! The same origin again is the current session repeating its announcement.
//!
//! A member carries these records from one session to the next and across restarts (like the
//! election's restart state): [`Announcers::encode`] / [`Announcers::decode`], a small file
//! the driver keeps. Layout (big-endian, `cm_wire`):
//!
//! ```text
//! magic "CMAN" | version u8 = 1 | n u16 (≤ MAX_ANNOUNCERS) | n × (node u64 | incarnation u64 | sequence u64)
//! check: 16-byte keyed BLAKE3 of everything before it (a fixed public key: a corruption
//!        check, not authentication — whoever can write the node's state can do worse)
//! ```

use std::collections::BTreeMap;

use cm_wire::mac::MacKey;
use cm_wire::{DecodeError, Reader, Writer};

use crate::wire::Origin;

/// Announcing nodes remembered. Entries exist only for authenticated announcements, so their
/// number is bounded by the cluster's GLs; the cap only guards against a key holder inventing
/// node ids. When full, the node with the oldest incarnation (a GL long gone) is forgotten.
pub const MAX_ANNOUNCERS: usize = 1024;

const MAGIC: [u8; 4] = *b"CMAN";
const VERSION: u8 = 1;

/// How an announcement's origin compares with what this member accepted before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Newer than anything accepted from its node (or the node is new): a new session.
    Fresh,
    /// Exactly the newest accepted from its node: that session announcing itself again.
    Newest,
    /// Older than what was accepted from its node: a replay, ignored.
    Stale,
}

/// The newest `(incarnation, sequence)` accepted from each announcing node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announcers {
    newest: BTreeMap<u64, (u64, u64)>,
}

impl Announcers {
    pub fn freshness(&self, o: &Origin) -> Freshness {
        match self.newest.get(&o.node) {
            None => Freshness::Fresh,
            Some(&(inc, seq)) if o.newer_than(inc, seq) => Freshness::Fresh,
            Some(&(inc, seq)) if (o.incarnation, o.sequence) == (inc, seq) => Freshness::Newest,
            Some(_) => Freshness::Stale,
        }
    }

    /// Records `o` as accepted; true when it changed anything (it was fresh).
    pub fn accept(&mut self, o: &Origin) -> bool {
        if self.freshness(o) != Freshness::Fresh {
            return false;
        }
        if !self.newest.contains_key(&o.node)
            && self.newest.len() >= MAX_ANNOUNCERS
            && let Some(oldest) =
                self.newest.iter().min_by_key(|(_, (inc, _))| *inc).map(|(node, _)| *node)
        {
            self.newest.remove(&oldest);
        }
        self.newest.insert(o.node, (o.incarnation, o.sequence));
        true
    }

    pub fn len(&self) -> usize {
        self.newest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.newest.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(8 + 24 * self.newest.len() + cm_wire::mac::TAG_LEN);
        w.bytes(&MAGIC).u8(VERSION);
        w.u16(u16::try_from(self.newest.len()).expect("bounded by MAX_ANNOUNCERS"));
        for (node, (inc, seq)) in &self.newest {
            w.u64(*node).u64(*inc).u64(*seq);
        }
        let mut v = w.into_vec();
        check_key().seal(&mut v);
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let body = check_key().open(bytes).ok_or(DecodeError::malformed(
            "announcer records check failed (corrupt or truncated)",
        ))?;
        let mut r = Reader::new(body);
        if r.array::<4>()? != MAGIC {
            return Err(DecodeError::malformed("not announcer records (bad magic)"));
        }
        if r.u8()? != VERSION {
            return Err(DecodeError::malformed("unsupported announcer records version"));
        }
        let n = usize::from(r.u16()?);
        if n > MAX_ANNOUNCERS {
            return Err(DecodeError::malformed("too many announcer records"));
        }
        let mut newest = BTreeMap::new();
        for _ in 0..n {
            let (node, inc, seq) = (r.u64()?, r.u64()?, r.u64()?);
            if newest.insert(node, (inc, seq)).is_some() {
                return Err(DecodeError::malformed("announcer recorded twice"));
            }
        }
        r.finish()?;
        Ok(Announcers { newest })
    }
}

fn check_key() -> MacKey {
    MacKey::derive("contentmover mctp announcer records v1", b"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(node: u64, incarnation: u64, sequence: u64) -> Origin {
        Origin { node, incarnation, sequence }
    }

    #[test]
    fn only_newer_sessions_of_a_node_are_fresh() {
        let mut a = Announcers::default();
        assert!(a.accept(&o(1, 10, 5)));
        assert_eq!(a.freshness(&o(1, 10, 5)), Freshness::Newest);
        assert!(!a.accept(&o(1, 10, 5)), "a repeat changes nothing");
        assert_eq!(a.freshness(&o(1, 10, 4)), Freshness::Stale);
        assert_eq!(a.freshness(&o(1, 9, 99)), Freshness::Stale, "older incarnation");
        assert!(a.accept(&o(1, 11, 1)), "a restarted GL starts its sequence again");
        assert_eq!(a.freshness(&o(1, 10, 6)), Freshness::Stale);
        assert!(a.accept(&o(2, 1, 1)), "nodes are independent");
        let restored = Announcers::decode(&a.encode()).unwrap();
        assert_eq!(restored, a);
        assert_eq!(restored.freshness(&o(1, 11, 1)), Freshness::Newest);
    }

    #[test]
    fn a_full_table_forgets_the_oldest_incarnation() {
        let mut a = Announcers::default();
        for n in 0..MAX_ANNOUNCERS as u64 {
            a.accept(&o(n, 100 + n, 1));
        }
        assert!(a.accept(&o(u64::MAX, 50, 1)));
        assert_eq!(a.len(), MAX_ANNOUNCERS);
        assert_eq!(a.freshness(&o(0, 100, 1)), Freshness::Fresh, "node 0 was forgotten");
        assert_eq!(a.freshness(&o(1, 101, 1)), Freshness::Newest);
    }

    #[test]
    fn damaged_records_are_refused() {
        let mut a = Announcers::default();
        a.accept(&o(7, 8, 9));
        let bytes = a.encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Announcers::decode(&bad).is_err(), "bit flipped at {i}");
        }
        assert!(Announcers::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn records_round_trip(entries in proptest::collection::vec(any::<(u64, u64, u64)>(), 0..50)) {
            let mut a = Announcers::default();
            for (n, i, s) in entries {
                a.accept(&o(n, i, s));
            }
            prop_assert_eq!(Announcers::decode(&a.encode()).unwrap(), a);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Announcers::decode(&bytes);
        }
    }
}
