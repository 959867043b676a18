//! Mid-pass feedback: when the GL sends a checkpoint, and what the answers said.
//!
//! A pass is cut into windows, each closed by a checkpoint after `checkpoint_bytes` of payload
//! or `checkpoint_interval` (with enough frames for the answers to mean something). Members
//! answer with the window's gaps; the sender repairs them during the pass, and the rate follows
//! the worst gap share over all the windows an answer covers (a member that falls behind answers
//! several checkpoints with one report) and the slowest member's lag.

use super::SenderConfig;
use crate::MemberId;
use cm_sansio::Instant;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Fewest new frames in a window that a checkpoint's interval alone may close. The gap share
/// of a window of a few frames is noise (one lost frame of two is 50 %), and the worst of many
/// members' noisy shares would cut the rate, shrinking the windows further, down to the floor.
const MIN_WINDOW_FRAMES: u32 = 128;

/// Checkpoints remembered per pass (older answers only count for repairs).
const CHECKPOINT_LOG: usize = 64;

/// A checkpoint of the current pass, kept while its answers may still come.
#[derive(Debug, Clone)]
struct CheckpointLog {
    number: u32,
    /// Payload bytes of the pass sent when it went out.
    sent_at: u64,
    /// Frames in its window.
    frames: u32,
    /// Per member that answered: its gap frames (parts add up) and the new frames its answer
    /// covers — this window's, plus those of earlier windows it had not answered yet.
    gaps: BTreeMap<MemberId, (u32, u32)>,
}

/// The checkpoints of a session: the current window, the recent checkpoints of this pass, and
/// the worst gap share heard since the rate was last adapted.
#[derive(Debug, Clone)]
pub(super) struct Checkpoints {
    /// Payload bytes that close a window (0: no checkpoints)...
    every_bytes: u64,
    /// ...or this long, with at least `min_frames` new frames.
    every: Duration,
    /// Fewest frames an answer must cover for its gap share to count.
    min_frames: u32,
    /// The next checkpoint's number (numbers run on across passes).
    next: u32,
    /// The current pass's first checkpoint.
    pass_first: u32,
    /// First frame of the current window.
    window_from: u32,
    window_bytes: u64,
    /// New frames (not repairs) sent in the current window.
    window_frames: u32,
    window_started: Instant,
    pass_bytes: u64,
    log: VecDeque<CheckpointLog>,
    worst_share: Option<f64>,
    /// A checkpoint answer came since the rate was last adapted.
    answered: bool,
}

/// A checkpoint to send: its number and the frames of its window, `from..upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Opened {
    pub number: u32,
    pub from: u32,
    pub upto: u32,
}

impl Checkpoints {
    pub(super) fn new(now: Instant, cfg: &SenderConfig) -> Self {
        // A short window (the end of a pass, a repeat) says too little about the rate.
        let enough =
            u32::try_from(cfg.checkpoint_bytes / u64::from(cfg.frame_size) / 2).unwrap_or(u32::MAX);
        Checkpoints {
            every_bytes: cfg.checkpoint_bytes,
            every: cfg.checkpoint_interval,
            min_frames: MIN_WINDOW_FRAMES.min(enough).max(1),
            next: 0,
            pass_first: 0,
            window_from: 0,
            window_bytes: 0,
            window_frames: 0,
            window_started: now,
            pass_bytes: 0,
            log: VecDeque::new(),
            worst_share: None,
            answered: false,
        }
    }

    /// A pass starts: a new first window, and answers to earlier passes no longer count.
    pub(super) fn start_pass(&mut self, now: Instant) {
        self.window_from = 0;
        self.window_bytes = 0;
        self.window_frames = 0;
        self.window_started = now;
        self.pass_bytes = 0;
        self.pass_first = self.next;
        self.log.clear();
        self.worst_share = None;
        self.answered = false;
    }

    /// The first checkpoint of the current pass: older answers are from an earlier pass.
    pub(super) fn pass_first(&self) -> u32 {
        self.pass_first
    }

    /// The pass goes through its frames again from the first (a repeat).
    pub(super) fn restart_window(&mut self) {
        self.window_from = 0;
    }

    /// A new frame of the pass (not a repair) is on its way.
    pub(super) fn new_frame(&mut self) {
        self.window_frames += 1;
    }

    /// `len` payload bytes are on their way.
    pub(super) fn sent(&mut self, len: u16) {
        self.pass_bytes += u64::from(len);
        self.window_bytes += u64::from(len);
    }

    /// Whether the window closes now, the pass's next new frame being `cursor`.
    pub(super) fn due(&self, now: Instant, cursor: u32) -> bool {
        self.every_bytes > 0
            && (self.window_bytes >= self.every_bytes
                || (now >= self.window_started + self.every
                    && self.window_frames >= MIN_WINDOW_FRAMES))
            && cursor > self.window_from
    }

    /// The current window's first frame.
    pub(super) fn window_from(&self) -> u32 {
        self.window_from
    }

    /// Closes the window `window_from..cursor` (`frames` of the pass's frames in it) with a
    /// checkpoint, and opens the next one.
    pub(super) fn open(&mut self, now: Instant, cursor: u32, frames: u32) -> Opened {
        let opened = Opened { number: self.next, from: self.window_from, upto: cursor };
        if self.log.len() == CHECKPOINT_LOG {
            self.log.pop_front();
        }
        self.log.push_back(CheckpointLog {
            number: self.next,
            sent_at: self.pass_bytes,
            frames,
            gaps: BTreeMap::new(),
        });
        self.next += 1;
        self.window_from = cursor;
        self.window_bytes = 0;
        self.window_frames = 0;
        self.window_started = now;
        opened
    }

    /// Payload bytes of the pass sent when checkpoint `number` went out, if it is remembered.
    pub(super) fn sent_at(&self, number: u32) -> Option<u64> {
        self.log.iter().find(|c| c.number == number).map(|c| c.sent_at)
    }

    /// How far behind the sender a member is whose latest answer is to `acked` (payload
    /// bytes); `None` unless it answered in this pass a checkpoint still remembered.
    pub(super) fn lag(&self, acked: Option<u32>) -> Option<u64> {
        acked
            .filter(|a| *a >= self.pass_first)
            .and_then(|a| self.sent_at(a))
            .map(|at| self.pass_bytes.saturating_sub(at))
    }

    /// The new frames of the remembered windows `first..=last`.
    pub(super) fn frames_in(&self, first: u32, last: u32) -> u32 {
        self.log.iter().filter(|c| (first..=last).contains(&c.number)).map(|c| c.frames).sum()
    }

    /// `member` answered `checkpoint` with `gaps` frames missing (parts of one answer add up);
    /// `covered`: the new frames of the windows the answer covers, given with its first part.
    pub(super) fn answer(
        &mut self,
        member: MemberId,
        checkpoint: u32,
        covered: Option<u32>,
        gaps: u32,
    ) {
        let Some(log) = self.log.iter_mut().find(|c| c.number == checkpoint) else {
            return;
        };
        let (total, frames) = log.gaps.entry(member).or_insert((0, log.frames));
        *total = total.saturating_add(gaps);
        if let Some(c) = covered {
            *frames = c.max(1);
        }
        let (total, frames) = (*total, *frames);
        self.answered = true;
        if frames >= self.min_frames {
            let share = f64::from(total) / f64::from(frames);
            self.worst_share = Some(self.worst_share.map_or(share, |w| w.max(share)));
        }
    }

    /// The worst gap share heard since the last call (0 when no answer said), or `None` when
    /// no answer came at all: then the rate stays.
    pub(super) fn take_feedback(&mut self) -> Option<f64> {
        let share = self.worst_share.take().unwrap_or(0.0);
        std::mem::take(&mut self.answered).then_some(share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bytes: u64) -> SenderConfig {
        let mut c = SenderConfig::new("239.1.2.3:5000".parse().unwrap(), 5001);
        c.frame_size = 1000;
        c.checkpoint_bytes = bytes;
        c.checkpoint_interval = Duration::from_millis(20);
        c
    }

    #[test]
    fn a_window_closes_on_bytes_or_on_time_with_enough_frames() {
        let t0 = Instant::ZERO;
        let mut c = Checkpoints::new(t0, &cfg(10_000));
        for _ in 0..9 {
            c.new_frame();
            c.sent(1000);
        }
        assert!(!c.due(t0, 9));
        c.sent(1000);
        assert!(c.due(t0, 10));
        assert!(!c.due(t0, 0), "nothing new past the window's start");
        let later = t0 + Duration::from_millis(20);
        let mut c = Checkpoints::new(t0, &cfg(1 << 30));
        for _ in 0..MIN_WINDOW_FRAMES - 1 {
            c.new_frame();
        }
        assert!(!c.due(later, 200), "too few frames for the interval alone");
        c.new_frame();
        assert!(c.due(later, 200));
        assert!(!Checkpoints::new(t0, &cfg(0)).due(later, 200), "checkpoints off");
    }

    #[test]
    fn opening_logs_the_window_and_starts_the_next() {
        let t0 = Instant::ZERO;
        let mut c = Checkpoints::new(t0, &cfg(10_000));
        c.sent(5000);
        assert_eq!(c.open(t0, 5, 5), Opened { number: 0, from: 0, upto: 5 });
        c.sent(3000);
        assert_eq!(c.open(t0, 8, 3), Opened { number: 1, from: 5, upto: 8 });
        assert_eq!((c.sent_at(0), c.sent_at(1), c.sent_at(2)), (Some(5000), Some(8000), None));
        assert_eq!(c.frames_in(0, 1), 8);
        assert_eq!(c.lag(Some(0)), Some(3000));
        c.start_pass(t0);
        assert_eq!((c.pass_first(), c.window_from(), c.lag(Some(1))), (2, 0, None));
        for _ in 0..CHECKPOINT_LOG + 1 {
            c.open(t0, 1, 1);
        }
        assert_eq!(c.sent_at(2), None, "the oldest checkpoints are forgotten");
    }

    #[test]
    fn the_worst_share_of_windows_large_enough() {
        let t0 = Instant::ZERO;
        // 10 000 bytes of 1 000-byte frames: answers must cover at least 5 frames.
        let mut c = Checkpoints::new(t0, &cfg(10_000));
        assert_eq!(c.take_feedback(), None);
        c.open(t0, 10, 10);
        c.answer(1, 0, Some(10), 1);
        c.answer(2, 0, Some(10), 2);
        c.answer(2, 0, None, 1); // a second part adds up
        c.answer(3, 0, Some(4), 4); // too few frames to count
        c.answer(4, 7, Some(10), 10); // unknown checkpoint
        assert_eq!(c.take_feedback(), Some(0.3));
        c.answer(3, 0, Some(4), 0);
        assert_eq!(c.take_feedback(), Some(0.0), "answered, nothing large enough");
        assert_eq!(c.take_feedback(), None);
    }
}
