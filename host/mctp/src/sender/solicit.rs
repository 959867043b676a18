//! Asking members again: whom a solicitation names, how long its answers take, the backoff
//! while nobody answers, and when the session has stalled.
//!
//! After each pass the GL solicits reports; when nothing is left to resend but reports are
//! missing, it asks again: unicast to a few, else one multicast naming the shorter list (the
//! members it lacks, or the members it has). It gives up when neither the complete count nor
//! the missing-frame count improved for `stall_limit` rounds and `stall_time`.

use super::SenderConfig;
use super::peers::Peer;
use crate::MemberId;
use crate::wire::{self, Selector};
use cm_sansio::Instant;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// How the rounds are going: what the last round ended with, and the stall and backoff
/// counters.
#[derive(Debug, Clone)]
pub(super) struct Progress {
    /// Rounds without progress, not counting those a member spent verifying.
    stall: u32,
    /// When the complete or missing count last improved (or a member said it was verifying).
    at: Instant,
    /// Consecutive rounds without progress, including those excused because a member was
    /// verifying: it paces the asking-again backoff.
    idle: u32,
    prev_complete: usize,
    prev_missing: u64,
}

impl Progress {
    pub(super) fn new(now: Instant) -> Self {
        Progress { stall: 0, at: now, idle: 0, prev_complete: 0, prev_missing: u64::MAX }
    }

    /// A round ended at `now` with `complete` members complete and `missing` frames missing
    /// over all members. A member that answered that it is `verifying` is alive and busy
    /// (hashing and flushing a large file can take longer than ten rounds): that counts as
    /// progress for the stall limit, though the asking still backs off.
    pub(super) fn round_ended(
        &mut self,
        now: Instant,
        complete: usize,
        missing: u64,
        verifying: bool,
    ) {
        if complete > self.prev_complete || missing < self.prev_missing {
            self.stall = 0;
            self.idle = 0;
            self.at = now;
        } else {
            self.idle += 1;
            self.stall = if verifying { 0 } else { self.stall + 1 };
            if verifying {
                self.at = now;
            }
        }
        self.prev_complete = complete;
        self.prev_missing = missing;
    }

    /// No progress for `stall_limit` rounds and `stall_time`.
    pub(super) fn stalled(&self, now: Instant, cfg: &SenderConfig) -> bool {
        self.stall >= cfg.stall_limit && now >= self.at + cfg.stall_time
    }

    /// How long to wait for answers to asking again: the report window, doubled for each round
    /// nobody answered (so ten tries span seconds, not milliseconds, and a member that is
    /// rebooting gets a chance to come back), at most the longest report window.
    pub(super) fn backoff(&self, window: Duration, cfg: &SenderConfig) -> Duration {
        (window * (1u32 << self.idle.min(6))).min(cfg.max_report_window.max(window))
    }
}

/// Members spread their reports over `report_slot × participants`, capped.
pub(super) fn report_window(participants: usize, cfg: &SenderConfig) -> Duration {
    let n = u32::try_from(participants.max(cfg.min_participants).max(1)).unwrap_or(u32::MAX);
    (cfg.report_slot * n).min(cfg.max_report_window)
}

/// How long members may wait before answering a checkpoint. Short: an answer's delay counts as
/// lag. These answers are tiny, and only members still receiving send them, so a burst of them
/// costs the GL little.
pub(super) fn checkpoint_window(participants: usize, cfg: &SenderConfig) -> Duration {
    let n = u32::try_from(participants.max(cfg.min_participants).max(1)).unwrap_or(u32::MAX);
    (cfg.report_slot * n / 8).min(Duration::from_millis(3))
}

/// `Only(lacking)` or `AllBut(heard)`, whichever is shorter and fits a datagram; else
/// `Everyone` (members then decide from their own state). Heard: answered `round`, or complete.
pub(super) fn shorter_selector(
    peers: &BTreeMap<MemberId, Peer>,
    round: u32,
    min_participants: usize,
) -> Selector {
    let (heard, lacking): (Vec<_>, Vec<_>) = peers
        .iter()
        .partition(|(_, p)| p.heard_round >= round || p.status == super::MemberStatus::Complete);
    let heard: Vec<u64> = heard.into_iter().map(|(id, _)| *id).collect();
    let lacking: Vec<u64> = lacking.into_iter().map(|(id, _)| *id).collect();
    // Unknown joiners are not in `lacking`, so an `Only` list is only safe when we expect
    // no one else; `AllBut` covers them.
    if heard.len() <= wire::MAX_IDS_PER_SOLICIT
        && (heard.len() <= lacking.len() || min_participants > peers.len())
    {
        Selector::AllBut(heard)
    } else if lacking.len() <= wire::MAX_IDS_PER_SOLICIT {
        Selector::Only(lacking)
    } else {
        Selector::Everyone
    }
}

/// The members to ask again by unicast, each at its address: every member not yet complete
/// or failed, when they are few, their addresses known, and no unknown member is awaited.
/// `None`: ask by multicast.
pub(super) fn unicast_targets(
    peers: &BTreeMap<MemberId, Peer>,
    cfg: &SenderConfig,
) -> Option<Vec<(MemberId, SocketAddr)>> {
    let lacking: Vec<(u64, Option<SocketAddr>)> =
        peers.iter().filter(|(_, p)| !p.is_final()).map(|(id, p)| (*id, p.addr)).collect();
    let want_more = peers.len() < cfg.min_participants;
    if want_more || lacking.len() > cfg.unicast_solicit_max {
        return None;
    }
    lacking.into_iter().map(|(id, a)| Some((id, a?))).collect()
}

#[cfg(test)]
mod tests {
    use super::super::MemberStatus;
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> SenderConfig {
        SenderConfig::new("239.1.2.3:5000".parse().unwrap(), 5001)
    }

    fn peers(statuses: &[(u64, MemberStatus, u32)]) -> BTreeMap<MemberId, Peer> {
        statuses
            .iter()
            .map(|(id, s, heard)| {
                let mut p = Peer::new(true, None);
                p.status = s.clone();
                p.heard_round = *heard;
                (*id, p)
            })
            .collect()
    }

    #[test]
    fn stalls_after_enough_rounds_and_time_unless_verifying() {
        let c = cfg(); // ten rounds and five seconds
        let t0 = Instant::ZERO;
        let mut p = Progress::new(t0);
        p.round_ended(t0, 0, 100, false);
        let late = t0 + c.stall_time;
        for _ in 0..9 {
            p.round_ended(t0, 0, 100, false);
        }
        assert!(!p.stalled(late, &c), "nine rounds");
        p.round_ended(t0, 0, 100, false);
        assert!(p.stalled(late, &c) && !p.stalled(late - MS, &c));
        p.round_ended(late, 0, 100, true);
        assert!(!p.stalled(late, &c), "a member verifying is progress");
        p.round_ended(late, 1, 100, false);
        assert_eq!((p.stall, p.idle), (0, 0));
    }

    #[test]
    fn backoff_doubles_while_nobody_answers() {
        let c = cfg(); // one second at most
        let mut p = Progress::new(Instant::ZERO);
        let w = 100 * MS;
        assert_eq!(p.backoff(w, &c), w);
        p.round_ended(Instant::ZERO, 0, 5, false);
        p.round_ended(Instant::ZERO, 0, 5, false);
        p.round_ended(Instant::ZERO, 0, 5, true);
        assert_eq!(p.backoff(w, &c), 4 * w, "verifying does not stop the backoff");
        for _ in 0..10 {
            p.round_ended(Instant::ZERO, 0, 5, false);
        }
        assert_eq!(p.backoff(w, &c), c.max_report_window);
        assert_eq!(p.backoff(2 * c.max_report_window, &c), 2 * c.max_report_window);
    }

    #[test]
    fn windows_grow_with_the_members_up_to_their_caps() {
        let mut c = cfg(); // 2 ms a member, one second at most
        assert_eq!(report_window(0, &c), 2 * MS);
        assert_eq!(report_window(10, &c), 20 * MS);
        assert_eq!(report_window(10_000, &c), c.max_report_window);
        assert_eq!(checkpoint_window(8, &c), 2 * MS);
        assert_eq!(checkpoint_window(100, &c), 3 * MS);
        c.min_participants = 20;
        assert_eq!(report_window(10, &c), 40 * MS);
    }

    #[test]
    fn the_shorter_list() {
        use MemberStatus::*;
        let few_heard =
            peers(&[(1, Complete, 0), (2, NoReport, 0), (3, NoReport, 0), (4, Verifying, 2)]);
        assert_eq!(shorter_selector(&few_heard, 2, 0), Selector::AllBut(vec![1, 4]));
        let many_heard = peers(&[
            (1, Complete, 0),
            (2, Complete, 0),
            (3, Missing { frames: 1 }, 2),
            (4, NoReport, 1),
        ]);
        assert_eq!(shorter_selector(&many_heard, 2, 0), Selector::Only(vec![4]));
        assert_eq!(
            shorter_selector(&many_heard, 2, 5),
            Selector::AllBut(vec![1, 2, 3]),
            "members still unknown: never `Only`"
        );
    }

    #[test]
    fn unicast_to_a_few_known_addresses() {
        use MemberStatus::*;
        let mut c = cfg();
        let mut ps = peers(&[(1, Complete, 0), (2, NoReport, 0), (3, Failed("x".into()), 0)]);
        assert_eq!(unicast_targets(&ps, &c), None, "member 2's address is unknown");
        let addr: SocketAddr = "10.0.0.2:6000".parse().unwrap();
        ps.get_mut(&2).unwrap().addr = Some(addr);
        assert_eq!(unicast_targets(&ps, &c), Some(vec![(2, addr)]));
        c.min_participants = 4;
        assert_eq!(unicast_targets(&ps, &c), None, "waiting for members not yet known");
        c.min_participants = 0;
        c.unicast_solicit_max = 0;
        assert_eq!(unicast_targets(&ps, &c), None, "too many for unicast");
    }
}
