//! Repair: the frames members said they lack, and coded repairs.
//!
//! Two kinds of owed frames: those named by end-of-pass reports (NACKs), whose union is the
//! next pass (NACK aggregation), and those named by checkpoint answers during a pass, resent
//! before the pass goes on. With coded repairs one datagram carries the XOR of frames that
//! different members lack (each lacking one of them and holding the others), chosen from each
//! member's remembered gaps, so members losing different frames are repaired together.

use crate::frameset::FrameSet;
use crate::wire;
use cm_sansio::Instant;
use std::time::Duration;

/// How long named repairs wait for other members' answers before going out (coded repairs:
/// a checkpoint's answers come within its window of at most 3 ms).
const REPAIR_HOLD: Duration = Duration::from_millis(4);
/// Frames owed that are looked at, after the first, for a coded repair's other frames.
const CODED_LOOKAHEAD: u32 = 64;

#[derive(Debug, Clone)]
pub(super) struct Repairs {
    /// Frames reported missing at the end of a pass: the next pass.
    nacks: FrameSet,
    /// Frames named by checkpoint answers, sent before the pass goes on.
    named: FrameSet,
    /// When `named` last became non-empty.
    since: Option<Instant>,
}

impl Repairs {
    pub(super) fn new(frames: u32) -> Self {
        Repairs { nacks: FrameSet::new(frames), named: FrameSet::new(frames), since: None }
    }

    /// Frames `first..first + count` are missing at the end of the pass.
    pub(super) fn nack_range(&mut self, first: u32, count: u32) {
        self.nacks.insert_range(first, count);
    }

    pub(super) fn nack(&mut self, seq: u32) {
        self.nacks.insert(seq);
    }

    /// Frames missing at the end of the pass.
    pub(super) fn nacks(&self) -> &FrameSet {
        &self.nacks
    }

    /// The next pass's frames; none are owed after.
    pub(super) fn take_nacks(&mut self) -> FrameSet {
        let frames = self.nacks.universe();
        std::mem::replace(&mut self.nacks, FrameSet::new(frames))
    }

    /// A checkpoint answer at `now` names `seq`: resend it during the pass.
    pub(super) fn name(&mut self, now: Instant, seq: u32) {
        self.named.insert(seq);
        self.since.get_or_insert(now);
    }

    /// Named frames, a coded repair's pool.
    pub(super) fn named(&self) -> &FrameSet {
        &self.named
    }

    /// The first named frame, when named repairs go out at `now`. With coded repairs they wait
    /// a moment after the first of them was named, so the answers to one checkpoint (from
    /// different members, within its few-millisecond window) can be combined; once the pass
    /// has no new frame left (`pass_done`) they go at once.
    pub(super) fn pop_due(
        &mut self,
        now: Instant,
        coding: bool,
        pass_done: impl FnOnce() -> bool,
    ) -> Option<u32> {
        let due = self.since.is_some_and(|t| !coding || now >= t + REPAIR_HOLD || pass_done());
        let seq = self.named.next_present(0).filter(|_| due)?;
        self.named.remove(seq);
        Some(seq)
    }

    /// A named frame goes out in a coded repair.
    pub(super) fn take(&mut self, seq: u32) {
        self.named.remove(seq);
    }

    /// Call after sending: the hold restarts with the next frame named.
    pub(super) fn settle(&mut self) {
        if self.named.is_empty() {
            self.since = None;
        }
    }
}

/// The frames to combine with `first` in one coded repair (`first` included): from the frames
/// owed after it in `pool`, greedily, each one some member lacks while no member lacks two of
/// the combination, so every member that lacks any of them can recover it. `lacking`: each
/// member's remembered gaps. Just `[first]` when nothing combines (e.g. every member lacks
/// `first`).
pub(super) fn coded_combo(lacking: &[&FrameSet], first: u32, pool: &FrameSet) -> Vec<u32> {
    let mut covered: Vec<bool> = lacking.iter().map(|m| m.contains(first)).collect();
    let mut combo = vec![first];
    if !covered.contains(&true) {
        return combo;
    }
    let mut next = first.checked_add(1).and_then(|from| pool.next_present(from));
    let mut scanned = 0;
    while let Some(c) = next {
        if combo.len() >= wire::MAX_CODED || scanned >= CODED_LOOKAHEAD || !covered.contains(&false)
        {
            break;
        }
        scanned += 1;
        let needers: Vec<usize> =
            lacking.iter().enumerate().filter(|(_, m)| m.contains(c)).map(|(i, _)| i).collect();
        if !needers.is_empty() && needers.iter().all(|i| !covered[*i]) {
            needers.iter().for_each(|i| covered[*i] = true);
            combo.push(c);
        }
        next = c.checked_add(1).and_then(|from| pool.next_present(from));
    }
    combo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(frames: u32, seqs: &[u32]) -> FrameSet {
        let mut s = FrameSet::new(frames);
        seqs.iter().for_each(|q| {
            s.insert(*q);
        });
        s
    }

    #[test]
    fn frames_different_members_lack_combine() {
        let (a, b, c) = (set(100, &[1, 5]), set(100, &[2, 5]), set(100, &[3, 9]));
        let pool = set(100, &[1, 2, 3, 5, 9]);
        assert_eq!(coded_combo(&[&a, &b, &c], 1, &pool), vec![1, 2, 3]);
        assert_eq!(coded_combo(&[&a, &b, &c], 5, &pool), vec![5, 9], "5 lacked by a and b");
        assert_eq!(coded_combo(&[&a, &b], 7, &pool), vec![7], "no one lacks it");
        let everyone = set(100, &[1, 2]);
        assert_eq!(coded_combo(&[&everyone, &everyone], 1, &pool), vec![1]);
    }

    #[test]
    fn a_combination_stays_within_its_bounds() {
        let members: Vec<FrameSet> = (0..20).map(|i| set(1000, &[i, 500 + i])).collect();
        let lacking: Vec<&FrameSet> = members.iter().collect();
        let pool = FrameSet::full(1000);
        assert_eq!(
            coded_combo(&lacking, 0, &pool),
            (0..wire::MAX_CODED as u32).collect::<Vec<_>>()
        );
        // The frames a second member lacks lie past the lookahead.
        let far = [set(1000, &[0]), set(1000, &[100])];
        assert_eq!(coded_combo(&[&far[0], &far[1]], 0, &pool), vec![0]);
    }

    #[test]
    fn named_repairs_wait_for_the_others_when_coding() {
        let t0 = Instant::ZERO + Duration::from_secs(1);
        let mut r = Repairs::new(100);
        assert_eq!(r.pop_due(t0, false, || true), None, "nothing named");
        r.name(t0, 7);
        r.name(t0 + Duration::from_millis(1), 3);
        assert_eq!(r.pop_due(t0, true, || false), None, "held for other answers");
        assert_eq!(r.pop_due(t0, true, || true), Some(3), "the pass is done: at once");
        assert_eq!(r.pop_due(t0 + REPAIR_HOLD, true, || false), Some(7), "the hold is over");
        r.settle();
        r.name(t0 + REPAIR_HOLD, 9);
        assert_eq!(r.pop_due(t0 + REPAIR_HOLD, true, || false), None, "a new hold");
        assert_eq!(r.pop_due(t0 + REPAIR_HOLD, false, || false), Some(9), "no coding: no hold");
    }

    #[test]
    fn nacks_make_the_next_pass() {
        let mut r = Repairs::new(10);
        r.nack_range(2, 3);
        r.nack(8);
        assert_eq!(r.nacks().count(), 4);
        let next = r.take_nacks();
        assert_eq!((next.count(), next.universe(), r.nacks().is_empty()), (4, 10, true));
    }
}
