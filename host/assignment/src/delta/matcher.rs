//! Matching the new file's unsettled middle against the base's cut index.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::chunk::{Chunker, Chunking, CutIndex, WINDOW};
use super::pass1::ShiftedEqual;
use super::{CMP_BLOCK, LiteralSink, Ops, PIECE, common_tail, first_diff};

/// How much of the new file the scan reads at a time.
const WINDOW_READ: u64 = 1 << 20;
/// A match shorter than this costs about as much in ops as it saves.
const MIN_MATCH: u64 = 32;

pub(super) struct Matcher<'a> {
    pub base: &'a File,
    pub bl: u64,
    pub new: &'a File,
    /// End of the new middle.
    pub ne: u64,
    pub index: &'a CutIndex,
    pub chunking: Chunking,
    /// What pass 1 found equal at the lengths' difference, if it kept track.
    pub shifted: Option<&'a ShiftedEqual>,
}

/// Bytes `[off, off + len)` of the new file, in a buffer reused as the scan moves on.
struct Window {
    buf: Vec<u8>,
    len: usize,
    off: u64,
}

impl Window {
    fn held(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn end(&self) -> u64 {
        self.off + self.len as u64
    }

    /// Makes sure the byte at `need` is held (unless `limit` is reached), reading up to
    /// `WINDOW_READ` past it; bytes before `keep` may be dropped to make room.
    fn fill(&mut self, file: &File, keep: u64, need: u64, limit: u64) -> io::Result<()> {
        if self.end() > need || self.end() >= limit {
            return Ok(());
        }
        if keep > self.off {
            let drop = ((keep - self.off) as usize).min(self.len);
            self.buf.copy_within(drop..self.len, 0);
            self.len -= drop;
            self.off += drop as u64;
        }
        let want = ((need + WINDOW_READ).min(limit) - self.off) as usize;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let at = self.end();
        file.read_exact_at(&mut self.buf[self.len..want], at)?;
        self.len = want;
        Ok(())
    }
}

impl Matcher<'_> {
    /// Emits ops and literal bytes for new `[start, ne)`.
    ///
    /// The new file is cut densely in bursts: one right where matching (re)starts — after a
    /// short edit the base's next cut is inside it — then one every `8 · max` bytes. A burst
    /// spans `max + 128` bytes, and the base's cuts are at most `max` apart, so a burst inside
    /// content both files share holds one of the base's cuts: an equal run of `9 · max` bytes
    /// or more is found (unless every base cut in it was forced, which random content makes
    /// rare; a forced cut of the burst finds those in runs of one repeated pattern), and about
    /// seven bytes in eight of content without a match are never hashed.
    pub fn run(&self, start: u64, ops: &mut Ops, sink: &mut LiteralSink<'_>) -> io::Result<()> {
        if self.index.is_empty() || self.ne < start + 2 * WINDOW {
            return sink.emit(start, self.ne, ops);
        }
        let span = self.chunking.max + 2 * WINDOW;
        let period = 8 * self.chunking.max;
        // A match's backward extension reaches back to the end of an earlier match or at most
        // this far (a longer equal run would have held an earlier burst); literal bytes further
        // back are sent as the scan moves on, so the window stays bounded.
        let backlog = period + 2 * span;
        let mut win = Window { buf: Vec::new(), len: 0, off: start };
        let mut ext = Extender::default();
        let mut lit = start;
        let mut burst = start;
        'bursts: while burst + WINDOW < self.ne {
            if burst > lit + 2 * backlog {
                let to = burst - backlog;
                sink.emit_held(win.held(), win.off, lit, to, ops)?;
                lit = to;
            }
            let burst_end = (burst + span).min(self.ne);
            let mut ch = Chunker::dense(self.chunking, burst);
            loop {
                let need = ch.needs_from();
                if need >= burst_end {
                    break;
                }
                win.fill(self.new, lit.min(need), need, self.ne)?;
                let to = win.end().min(burst_end);
                let Some((n, key)) =
                    ch.next(&win.held()[(need - win.off) as usize..(to - win.off) as usize], need)
                else {
                    continue;
                };
                let Some(b) = self.index.get(key) else {
                    continue;
                };
                let back = ext.backward(self.new, self.base, (n - lit).min(b), n, b)?;
                let max = (self.ne - n).min(self.bl - b);
                let known = self.shifted.map_or(0, |se| se.known_equal(n, b)).min(max);
                let fwd =
                    known + ext.forward(self.new, self.base, max - known, n + known, b + known)?;
                if back + fwd < MIN_MATCH {
                    continue;
                }
                sink.emit_held(win.held(), win.off, lit, n - back, ops)?;
                ops.copy(b - back, back + fwd);
                lit = n + fwd;
                burst = lit;
                continue 'bursts;
            }
            burst += period;
        }
        sink.emit_held(win.held(), win.off, lit, self.ne, ops)
    }
}

/// Byte-wise extension of a match, reading both files in growing pieces.
#[derive(Default)]
struct Extender {
    nb: Vec<u8>,
    bb: Vec<u8>,
}

impl Extender {
    /// How many bytes (at most `max`) just before new `n` / base `b` are equal.
    fn backward(&mut self, new: &File, base: &File, max: u64, n: u64, b: u64) -> io::Result<u64> {
        let mut done = 0u64;
        let mut step = CMP_BLOCK as u64;
        while done < max {
            let len = step.min(max - done) as usize;
            self.read(new, n - done - len as u64, base, b - done - len as u64, len)?;
            let tail = common_tail(&self.nb, &self.bb);
            if tail < len {
                return Ok(done + tail as u64);
            }
            done += len as u64;
            step = (step * 2).min(PIECE as u64);
        }
        Ok(done)
    }

    /// How many bytes (at most `max`) from new `n` / base `b` on are equal.
    fn forward(&mut self, new: &File, base: &File, max: u64, n: u64, b: u64) -> io::Result<u64> {
        let mut done = 0u64;
        let mut step = CMP_BLOCK as u64;
        while done < max {
            let len = step.min(max - done) as usize;
            self.read(new, n + done, base, b + done, len)?;
            if let Some(i) = first_diff(&self.nb, &self.bb) {
                return Ok(done + i as u64);
            }
            done += len as u64;
            step = (step * 2).min(PIECE as u64);
        }
        Ok(done)
    }

    fn read(&mut self, new: &File, n: u64, base: &File, b: u64, len: usize) -> io::Result<()> {
        self.nb.resize(len, 0);
        self.bb.resize(len, 0);
        new.read_exact_at(&mut self.nb, n)?;
        base.read_exact_at(&mut self.bb, b)
    }
}
