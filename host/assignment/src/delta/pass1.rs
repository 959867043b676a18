//! The first pass over both files: BLAKE3 of each, the comparison at equal offsets (and, for
//! lengths that differ a little, at offsets shifted by the difference) and, where that cannot
//! settle the difference, the base's content-defined cuts — all from the same buffers, so each
//! file is read once here (but for an insertion or deletion, whose base middle is cut after
//! the pass, up to the common suffix only).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::chunk::{Chunker, Chunking};
use super::{CMP_BLOCK, PIECE, common_tail, first_diff, read_full_at};

/// A differing range longer than this at equal offsets is taken for moved content.
const RUN_BUDGET: u64 = 64 << 10;
/// More differing ranges than this (a delta past the record limit anyway) are matched by content
/// from the last one on instead; this bounds the memory too (16 bytes a range).
const MAX_RUNS: usize = 16384;
/// Differing ranges closer than this are merged: a copy op between them would cost about as much.
const RUN_GAP: u64 = 32;

pub(super) struct Scan {
    pub base_hash: [u8; 32],
    pub new_hash: [u8; 32],
    /// Equal lengths: the ranges (before `Rest::Match::from`, if any) that differ at equal
    /// offsets, to be sent literally; every other byte there is copied from the same offset.
    pub runs: Vec<(u64, u64)>,
    /// The base's cuts from `Rest::Match::from` on: (position, hash of the 64 bytes before it).
    pub cuts: Vec<(u64, u64)>,
    /// Unequal lengths: what comparing at the shifted offsets found equal, if it kept track.
    pub shifted: Option<ShiftedEqual>,
    pub rest: Rest,
}

pub(super) enum Rest {
    /// `runs` describe every difference.
    Settled,
    /// New bytes `[from, new_end)` are to be matched against the base's cuts; new bytes from
    /// `new_end` on equal base bytes from `base_end` on.
    Match { from: u64, new_end: u64, base_end: u64, chunking: Chunking },
}

pub(super) fn run(base: &File, bl: u64, new: &File, nl: u64) -> io::Result<Scan> {
    let equal = bl == nl;
    let (mut hb, mut hn) = (blake3::Hasher::new(), blake3::Hasher::new());
    let (mut bb, mut nb) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    // Unequal lengths whose last piece is equal (an insertion or deletion, most likely): the
    // common suffix is probably long, so the base is cut after this pass, only up to it.
    let defer_cuts = !equal && tail_is_equal(base, bl, new, nl, &mut bb, &mut nb)?;
    let mut shift = ShiftCompare::new(bl, nl);
    let mut runs = Vec::new();
    let mut cuts = Vec::new();
    // Set once comparing at equal offsets stops: where matching starts, and the base's chunker.
    let mut matching: Option<(u64, Chunker)> = None;
    // Equal lengths, once matching: the last differing offset.
    let mut last_diff: Option<u64> = None;
    let mut at = 0u64;
    while at < bl.max(nl) {
        let b = if at < bl { read_full_at(base, &mut bb, at)? } else { 0 };
        let n = if at < nl { read_full_at(new, &mut nb, at)? } else { 0 };
        if b == 0 && n == 0 {
            // A file shrank while being read: treat what we saw as its end (and claim nothing
            // equal past it).
            if let Some(sc) = &mut shift {
                sc.runs = None;
            }
            break;
        }
        hb.update(&bb[..b]);
        hn.update(&nb[..n]);
        let common = b.min(n);
        let (x, y) = (&bb[..common], &nb[..common]);
        match &matching {
            None if equal => {
                diff_runs(x, y, at, &mut runs);
                let over =
                    runs.len() > MAX_RUNS || runs.last().is_some_and(|&(s, e)| e - s > RUN_BUDGET);
                if over {
                    // Content moved: match from the start of the last range on.
                    let (from, end) = runs.pop().expect("a range went over");
                    last_diff = Some(end - 1);
                    let mut ch = Chunker::new(Chunking::for_len(bl - from), from);
                    feed_from_file(base, &mut ch, at, &mut cuts)?;
                    matching = Some((from, ch));
                }
            }
            None => {
                if let Some(i) = first_diff(x, y) {
                    let from = at + i as u64;
                    matching = Some((from, Chunker::new(Chunking::for_len(bl - from), from)));
                }
            }
            Some(_) if equal => {
                if x != y {
                    last_diff = Some(at + (common - 1 - common_tail(x, y)) as u64);
                }
            }
            Some(_) => {}
        }
        if let Some((_, ch)) = &mut matching
            && b > 0
            && !defer_cuts
        {
            while let Some(cut) = ch.next(&bb[..b], at) {
                cuts.push(cut);
            }
        }
        if let Some(sc) = &mut shift {
            let (long, short) = if nl > bl { (&mut nb, &mut bb) } else { (&mut bb, &mut nb) };
            sc.piece(at, &long[..b.max(n)], &short[..b.min(n)]);
            // The shorter file's piece is kept for the next one (its buffer is read into next).
            std::mem::swap(short, &mut sc.prev);
        }
        at += b.max(n) as u64;
    }
    let rest = match matching {
        None if equal => Rest::Settled,
        None => {
            // One file is the other plus a tail (or they are equal up to where one shrank).
            let from = bl.min(nl);
            Rest::Match { from, new_end: nl, base_end: bl, chunking: Chunking::for_len(bl - from) }
        }
        Some((from, ch)) if equal => {
            let end = last_diff.map_or(from, |l| l + 1);
            Rest::Match { from, new_end: end, base_end: end, chunking: ch.chunking() }
        }
        Some((from, mut ch)) => {
            let suffix = match &shift {
                Some(sc) => sc.suffix(bl.max(nl)).min(bl.min(nl) - from),
                None => common_suffix(base, bl, new, nl, from)?,
            };
            if defer_cuts {
                feed_from_file(base, &mut ch, bl - suffix, &mut cuts)?;
            }
            Rest::Match {
                from,
                new_end: nl - suffix,
                base_end: bl - suffix,
                chunking: ch.chunking(),
            }
        }
    };
    let shifted = shift
        .and_then(|sc| sc.runs)
        .map(|runs| ShiftedEqual { shift: nl as i64 - bl as i64, runs });
    Ok(Scan {
        base_hash: *hb.finalize().as_bytes(),
        new_hash: *hn.finalize().as_bytes(),
        runs,
        cuts,
        shifted,
        rest,
    })
}

/// For lengths that differ by less than a piece: the longer file compared with the shorter one
/// shifted by the difference as the pieces go by, which finds the common suffix (what an
/// insertion or a deletion leaves) without reading the files again.
struct ShiftCompare {
    shift: usize,
    /// The shorter file's previous piece.
    prev: Vec<u8>,
    /// The last offset of the longer file whose byte differs from the shorter file's, shifted
    /// (the first `shift` bytes have no counterpart: they differ).
    last_diff: Option<u64>,
    /// Every such differing range, in the longer file's offsets, while there are at most
    /// `MAX_RUNS` (after an insertion or deletion the bytes before it differ in one long range):
    /// the matcher skips the byte-wise extension of a match at this shift over what is known equal.
    runs: Option<Vec<(u64, u64)>>,
}

impl ShiftCompare {
    fn new(bl: u64, nl: u64) -> Option<ShiftCompare> {
        let shift = bl.abs_diff(nl);
        (bl != nl && shift < PIECE as u64).then(|| ShiftCompare {
            shift: shift as usize,
            prev: vec![0u8; PIECE],
            last_diff: None,
            runs: Some(Vec::new()),
        })
    }

    /// `long`, `short`: the pieces at `at` of the longer and the shorter file (`short` may end
    /// early, where that file ends).
    fn piece(&mut self, at: u64, long: &[u8], short: &[u8]) {
        let s = self.shift;
        if long.len() > s && short.len() < long.len() - s {
            // Only if a file changed length while being read: count this piece as different.
            self.last_diff = Some(at + long.len() as u64 - 1);
            self.runs = None;
            return;
        }
        let k = s.min(long.len());
        if let Some(runs) = &mut self.runs {
            // long[..s] against the end of short's previous piece (nothing before offset s),
            // then long[s..] against short's bytes at the same offsets minus s.
            if at == 0 {
                if k > 0 {
                    runs.push((0, k as u64));
                }
            } else {
                diff_runs(&long[..k], &self.prev[PIECE - s..PIECE - s + k], at, runs);
            }
            if long.len() > s {
                diff_runs(&long[s..], &short[..long.len() - s], at + s as u64, runs);
            }
            self.last_diff = runs.last().map(|&(_, e)| e - 1);
            if runs.len() > MAX_RUNS {
                self.runs = None;
            }
            return;
        }
        if long.len() > s {
            let (x, y) = (&long[s..], &short[..long.len() - s]);
            if x != y {
                self.last_diff = Some(at + (long.len() - 1 - common_tail(x, y)) as u64);
                return;
            }
        }
        if at == 0 {
            if k > 0 {
                self.last_diff = Some(k as u64 - 1);
            }
            return;
        }
        let (x, y) = (&long[..k], &self.prev[PIECE - s..PIECE - s + k]);
        if x != y {
            self.last_diff = Some(at + (k - 1 - common_tail(x, y)) as u64);
        }
    }

    /// The common suffix's length, for a longer file of `long_len` bytes.
    fn suffix(&self, long_len: u64) -> u64 {
        long_len - self.last_diff.map_or(0, |l| l + 1)
    }
}

/// What the shifted comparison found equal: a match at that shift extends over it unread.
pub(super) struct ShiftedEqual {
    /// `nl - bl`, not 0, less than a piece either way.
    pub shift: i64,
    /// The differing ranges, in the longer file's offsets, sorted.
    pub runs: Vec<(u64, u64)>,
}

impl ShiftedEqual {
    /// For a match of new `n` with base `b`: how many bytes from there on are known equal.
    pub fn known_equal(&self, n: u64, b: u64) -> u64 {
        if n as i64 - b as i64 != self.shift {
            return 0;
        }
        let x = if self.shift > 0 { n } else { b };
        let next = self.runs.partition_point(|&(_, e)| e <= x);
        match self.runs.get(next) {
            Some(&(s, _)) => s.saturating_sub(x),
            None => u64::MAX,
        }
    }
}

/// Whether the last `PIECE` bytes (or all of the shorter file) of both files are equal.
fn tail_is_equal(
    base: &File,
    bl: u64,
    new: &File,
    nl: u64,
    bb: &mut [u8],
    nb: &mut [u8],
) -> io::Result<bool> {
    let n = (bl.min(nl) as usize).min(PIECE);
    base.read_exact_at(&mut bb[..n], bl - n as u64)?;
    new.read_exact_at(&mut nb[..n], nl - n as u64)?;
    Ok(bb[..n] == nb[..n])
}

/// Feeds the chunker the file's bytes from where it needs them up to `to`.
fn feed_from_file(
    f: &File,
    ch: &mut Chunker,
    to: u64,
    cuts: &mut Vec<(u64, u64)>,
) -> io::Result<()> {
    let mut buf = vec![0u8; PIECE];
    loop {
        let from = ch.needs_from();
        if from >= to {
            return Ok(());
        }
        let n = ((to - from) as usize).min(PIECE);
        f.read_exact_at(&mut buf[..n], from)?;
        while let Some(cut) = ch.next(&buf[..n], from) {
            cuts.push(cut);
        }
    }
}

/// Appends the ranges where `x` and `y` (both at file offset `at`) differ to `runs`, merging
/// ranges less than `RUN_GAP` apart (also with the last range already there).
fn diff_runs(x: &[u8], y: &[u8], at: u64, runs: &mut Vec<(u64, u64)>) {
    const FINE: usize = 64;
    for (i, (xb, yb)) in x.chunks(CMP_BLOCK).zip(y.chunks(CMP_BLOCK)).enumerate() {
        if xb == yb {
            continue;
        }
        for (j, (xf, yf)) in xb.chunks(FINE).zip(yb.chunks(FINE)).enumerate() {
            if xf == yf {
                continue;
            }
            let off = at + (i * CMP_BLOCK + j * FINE) as u64;
            let s = off + xf.iter().zip(yf).position(|(p, q)| p != q).expect("differ") as u64;
            let e = off + xf.iter().zip(yf).rposition(|(p, q)| p != q).expect("differ") as u64 + 1;
            match runs.last_mut() {
                Some(last) if last.1 + RUN_GAP >= s => last.1 = e,
                _ => runs.push((s, e)),
            }
        }
    }
}

/// Length of the common suffix of files of different lengths, not overlapping `prefix`.
fn common_suffix(base: &File, bl: u64, new: &File, nl: u64, prefix: u64) -> io::Result<u64> {
    let max = bl.min(nl) - prefix;
    let (mut bb, mut nb) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    let mut done = 0u64;
    while done < max {
        let n = ((max - done) as usize).min(PIECE);
        base.read_exact_at(&mut bb[..n], bl - done - n as u64)?;
        new.read_exact_at(&mut nb[..n], nl - done - n as u64)?;
        let tail = common_tail(&bb[..n], &nb[..n]);
        if tail < n {
            return Ok(done + tail as u64);
        }
        done += n as u64;
    }
    Ok(max)
}
