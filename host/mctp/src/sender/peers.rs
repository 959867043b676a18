//! What the GL knows of each member: its status, its latest checkpoint answer, how fast it
//! takes data in, and (for coded repairs) the frames it said it lacks.

use super::MemberStatus;
use crate::frameset::FrameSet;
use cm_sansio::Instant;
use std::collections::VecDeque;
use std::net::SocketAddr;

/// Checkpoint answers a member's intake rate is measured over (a few, so the random answer
/// delay averages out).
const INTAKE_SAMPLES: usize = 8;

#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub expected: bool,
    pub unicast_only: Option<SocketAddr>,
    /// Last address a report came from.
    pub addr: Option<SocketAddr>,
    pub status: MemberStatus,
    pub heard_round: u32,
    /// Latest checkpoint this member answered.
    pub acked_checkpoint: Option<u32>,
    /// When its recent checkpoint answers arrived, with the pass's payload bytes sent at each
    /// checkpoint: how fast this member really takes in data (newest last).
    answers: VecDeque<(Instant, u64)>,
    /// Frames it said it lacks that were not sent since (for coded repairs; created at its
    /// first gap, dropped when it completes).
    pub missing: Option<FrameSet>,
}

impl Peer {
    pub(super) fn new(expected: bool, unicast: Option<SocketAddr>) -> Self {
        Peer {
            expected,
            unicast_only: unicast,
            addr: unicast,
            status: MemberStatus::NoReport,
            heard_round: 0,
            acked_checkpoint: None,
            answers: VecDeque::new(),
            missing: None,
        }
    }

    /// Complete or failed: a final fact that no later report changes.
    pub(super) fn is_final(&self) -> bool {
        matches!(self.status, MemberStatus::Complete | MemberStatus::Failed(_))
    }

    /// It answered at `now` a checkpoint sent when the pass had sent `sent_at` payload bytes.
    pub(super) fn answered(&mut self, now: Instant, sent_at: u64) {
        if self.answers.len() == INTAKE_SAMPLES {
            self.answers.pop_front();
        }
        self.answers.push_back((now, sent_at));
    }

    /// Payload bytes per second this member took in over its recent checkpoint answers.
    pub(super) fn intake(&self) -> Option<f64> {
        let (&(t0, s0), &(t1, s1)) = (self.answers.front()?, self.answers.back()?);
        let secs = t1.saturating_since(t0).as_secs_f64();
        (self.answers.len() >= 3 && secs > 0.0 && s1 > s0).then(|| (s1 - s0) as f64 / secs)
    }

    /// Remembers that it lacks `runs` of a session of `frames` frames, for coded repairs.
    pub(super) fn lacks(&mut self, frames: u32, runs: &[(u32, u32)]) {
        let set = self.missing.get_or_insert_with(|| FrameSet::new(frames));
        for &(first, count) in runs {
            set.insert_range(first, count);
        }
    }

    /// `seqs` are on their way to everyone: it is not owed them any more (if it loses them
    /// again, it says so).
    pub(super) fn sent(&mut self, seqs: &[u32]) {
        if let Some(m) = self.missing.as_mut() {
            seqs.iter().for_each(|s| {
                m.remove(*s);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(ms: u64) -> Instant {
        Instant::ZERO + Duration::from_millis(ms)
    }

    #[test]
    fn intake_over_the_recent_answers() {
        let mut p = Peer::new(true, None);
        p.answered(at(0), 0);
        p.answered(at(10), 1000);
        assert_eq!(p.intake(), None, "two answers are too few");
        p.answered(at(20), 2000);
        assert_eq!(p.intake(), Some(100_000.0));
        for k in 3..20 {
            p.answered(at(10 * k), 1000 * k + if k >= 12 { 1000 * (k - 11) } else { 0 });
        }
        // Only the last eight count: 10 ms apart, 2 000 bytes apart.
        assert!((p.intake().unwrap() - 200_000.0).abs() < 1e-6);
        let mut idle = Peer::new(true, None);
        for k in 0..4 {
            idle.answered(at(10 * k), 500);
        }
        assert_eq!(idle.intake(), None, "no progress: no intake");
    }

    #[test]
    fn what_it_lacks_until_sent() {
        let mut p = Peer::new(false, None);
        p.sent(&[1]);
        assert!(p.missing.is_none());
        p.lacks(100, &[(3, 2), (10, 1)]);
        p.sent(&[4, 10, 50]);
        let m = p.missing.as_ref().unwrap();
        assert_eq!((m.count(), m.contains(3)), (1, true));
        p.status = MemberStatus::Failed("disk".into());
        assert!(p.is_final());
    }
}
