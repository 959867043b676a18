//! A pass: one paced sweep over the frames still owed, in order.
//!
//! Pass 1 sends every frame; each later pass sends the union of what members reported missing.
//! A small tail that keeps getting lost is swept twice: on a very lossy segment this turns many
//! rounds (each a report window) into one, for a few extra frames.

use crate::frameset::FrameSet;

#[derive(Debug, Clone)]
pub(super) struct Pass {
    /// The pass's number (0 before the first).
    pub number: u32,
    /// Frames of this pass not sent yet ahead of `cursor` (and all of them, for a repeat).
    to_send: FrameSet,
    /// The next new frame is at or after this one.
    pub cursor: u32,
    /// Frames sent in this pass, repairs and coded ones included.
    pub sent: u32,
    /// Extra times the pass goes through its frames (tail redundancy).
    repeats_left: u32,
}

impl Pass {
    /// Before the first pass of a session of `frames` frames.
    pub(super) fn new(frames: u32) -> Self {
        Pass { number: 0, to_send: FrameSet::new(frames), cursor: 0, sent: 0, repeats_left: 0 }
    }

    /// The next pass, over `frames` of the session's `total`.
    pub(super) fn start(&mut self, frames: FrameSet, total: u32) {
        self.number += 1;
        self.repeats_left = u32::from(self.number >= 3 && frames.count() <= (total / 100).max(32));
        self.to_send = frames;
        self.cursor = 0;
        self.sent = 0;
    }

    /// The next new frame, moving the cursor past it, and whether the pass went back to its
    /// first frame for a repeat (the repeat starts even when that leaves nothing to send).
    pub(super) fn next_new(&mut self) -> (Option<u32>, bool) {
        let (next, repeat) = match self.to_send.next_present(self.cursor) {
            None if self.repeats_left > 0 => {
                self.repeats_left -= 1;
                (self.to_send.next_present(0), true)
            }
            n => (n, false),
        };
        if let Some(seq) = next {
            self.cursor = seq + 1;
        }
        (next, repeat)
    }

    /// No new frame is left in this pass.
    pub(super) fn is_done(&self) -> bool {
        self.repeats_left == 0 && self.to_send.next_present(self.cursor).is_none()
    }

    /// `seq` is still to come in this pass (ahead of the cursor).
    pub(super) fn is_ahead(&self, seq: u32) -> bool {
        seq >= self.cursor && self.to_send.contains(seq)
    }

    /// The frames still to send, a coded repair's pool.
    pub(super) fn to_send(&self) -> &FrameSet {
        &self.to_send
    }

    /// `seq` goes out in a coded repair: not again in this sweep.
    pub(super) fn take(&mut self, seq: u32) {
        self.to_send.remove(seq);
    }

    /// Frames of the pass within `from..upto`.
    pub(super) fn count_in(&self, from: u32, upto: u32) -> u32 {
        self.to_send.count_in(from, upto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(p: &mut Pass) -> Vec<u32> {
        std::iter::from_fn(|| p.next_new().0).collect()
    }

    #[test]
    fn the_first_pass_sends_every_frame_once() {
        let mut p = Pass::new(5);
        p.start(FrameSet::full(5), 5);
        assert_eq!(p.number, 1);
        assert!(p.is_ahead(0) && !p.is_done());
        assert_eq!(sweep(&mut p), vec![0, 1, 2, 3, 4]);
        assert!(p.is_done() && !p.is_ahead(3));
    }

    #[test]
    fn a_small_tail_from_the_third_pass_goes_twice() {
        let mut p = Pass::new(1000);
        let tail = || {
            let mut s = FrameSet::new(1000);
            s.insert_range(10, 3);
            s
        };
        p.start(tail(), 1000);
        p.start(tail(), 1000);
        assert_eq!((p.number, sweep(&mut p)), (2, vec![10, 11, 12]));
        p.start(tail(), 1000);
        assert_eq!(p.next_new(), (Some(10), false));
        p.take(11);
        assert_eq!(p.next_new(), (Some(12), false));
        assert!(!p.is_done(), "a repeat is left");
        assert_eq!(p.next_new(), (Some(10), true));
        assert_eq!(sweep(&mut p), vec![12]);
        assert_eq!(p.next_new(), (None, false));
        let mut big = FrameSet::new(1000);
        big.insert_range(0, 33);
        p.start(big, 1000);
        assert_eq!(sweep(&mut p).len(), 33, "a larger pass goes once");
        assert_eq!(p.count_in(0, 1000), 33);
    }
}
