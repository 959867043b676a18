//! rsync-class deltas between two local files (the shadow copy's version and staging's).
//!
//! The manager holds both files, so no signature crosses the network and a candidate match is
//! confirmed by comparing the bytes themselves (stronger than any checksum, and no strong hash
//! to compute). What matters is speed and how few bytes the literal part needs. The algorithm:
//!
//! 1. One sequential pass over both files (`pass1.rs`) computes their BLAKE3 hashes and compares
//!    them at equal offsets. For equal lengths it records the differing ranges, so in-place
//!    edits are settled here at memory bandwidth; for unequal lengths it finds the common
//!    prefix and, when the lengths differ by less than 256 KiB, the common suffix too, by
//!    comparing at offsets shifted by the difference (else it is found afterwards, comparing
//!    backwards from the ends).
//! 2. Where that does not settle the difference (unequal lengths, or equal lengths with a
//!    differing range over 64 KiB — content that moved — or more than 16384 of them), the same
//!    pass cuts the rest of the base into content-defined chunks (`chunk.rs`: a gear hash that
//!    skips the first seven eighths of each chunk) and keeps the hash of the 64 bytes before
//!    each cut in a small index.
//! 3. The new file's unsettled middle is cut the same way (`matcher.rs`); a cut whose hash is in
//!    the index is checked against the base and the match extended byte-wise both ways, so the
//!    literal bytes shrink to the bytes that actually changed, not whole chunks; cutting resumes
//!    after the match.
//!
//! Files are read with positioned reads in bounded buffers: memory stays a few MiB whatever the
//! file size (plus about 48 bytes per base chunk; chunks average about √len / 2 bytes).

mod chunk;
mod matcher;
mod pass1;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use crate::format::DeltaOp;

/// Size of the sequential reads: small enough that a piece of each file stays in L2 while it is
/// hashed, compared and chunked.
const PIECE: usize = 256 << 10;

/// The outcome of [`compute`]: ops and hashes; the literal bytes went to the sink.
#[derive(Debug, Clone)]
pub struct FileDelta {
    pub ops: Vec<DeltaOp>,
    /// Bytes written to the literal sink (the sum of the inserts).
    pub literal: u64,
    pub base_len: u64,
    pub base_hash: [u8; 32],
    pub new_len: u64,
    pub new_hash: [u8; 32],
}

/// Computes the delta turning `base` into `new`, writing the inserted bytes to `literal`.
pub fn compute(base: &File, new: &File, literal: &mut dyn Write) -> io::Result<FileDelta> {
    Ok(compute_bounded(base, new, literal, u64::MAX)?.expect("no literal limit"))
}

/// Like [`compute`], but gives up (`None`) as soon as the literal bytes would pass `max_literal`
/// (a delta that large is not worth sending): no time or spool space is spent on the rest.
pub fn compute_bounded(
    base: &File,
    new: &File,
    literal: &mut dyn Write,
    max_literal: u64,
) -> io::Result<Option<FileDelta>> {
    match compute_inner(base, new, literal, max_literal) {
        Err(e) if e.get_ref().is_some_and(|inner| inner.is::<LiteralLimit>()) => Ok(None),
        other => other.map(Some),
    }
}

/// The marker error [`LiteralSink`] stops with at its limit.
#[derive(Debug)]
struct LiteralLimit;

impl std::fmt::Display for LiteralLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("delta literal over its limit")
    }
}

impl std::error::Error for LiteralLimit {}

fn compute_inner(
    base: &File,
    new: &File,
    literal: &mut dyn Write,
    max_literal: u64,
) -> io::Result<FileDelta> {
    let bl = base.metadata()?.len();
    let nl = new.metadata()?.len();
    let scan = pass1::run(base, bl, new, nl)?;
    let mut out = Ops::default();
    let mut sink =
        LiteralSink { new, out: literal, written: 0, limit: max_literal, buf: Vec::new() };
    // Ranges settled by comparing at equal offsets.
    let mut done = 0;
    for &(s, e) in &scan.runs {
        out.copy(done, s - done);
        sink.emit(s, e, &mut out)?;
        done = e;
    }
    match scan.rest {
        pass1::Rest::Settled => out.copy(done, nl - done),
        pass1::Rest::Match { from, new_end, base_end, chunking } => {
            out.copy(done, from - done);
            let index = chunk::CutIndex::build(&scan.cuts);
            drop(scan.cuts);
            let shifted = scan.shifted.as_ref();
            matcher::Matcher { base, bl, new, ne: new_end, index: &index, chunking, shifted }
                .run(from, &mut out, &mut sink)?;
            out.copy(base_end, bl - base_end);
        }
    }
    Ok(FileDelta {
        ops: out.ops,
        literal: sink.written,
        base_len: bl,
        base_hash: scan.base_hash,
        new_len: nl,
        new_hash: scan.new_hash,
    })
}

/// Op list builder: merges adjacent copies and inserts, drops empty ones.
#[derive(Default)]
struct Ops {
    ops: Vec<DeltaOp>,
}

impl Ops {
    fn copy(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(DeltaOp::Copy { offset: o, len: l }) = self.ops.last_mut()
            && *o + *l == offset
        {
            *l += len;
            return;
        }
        self.ops.push(DeltaOp::Copy { offset, len });
    }
    fn insert(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(DeltaOp::Insert { len: l }) = self.ops.last_mut() {
            *l += len;
            return;
        }
        self.ops.push(DeltaOp::Insert { len });
    }
}

/// Copies literal ranges of the new file to the payload sink.
struct LiteralSink<'a> {
    new: &'a File,
    out: &'a mut dyn Write,
    written: u64,
    /// More literal bytes than this end the computation with [`LiteralLimit`].
    limit: u64,
    buf: Vec<u8>,
}

impl LiteralSink<'_> {
    fn check(&self, from: u64, to: u64) -> io::Result<()> {
        if self.written + (to - from) > self.limit {
            return Err(io::Error::other(LiteralLimit));
        }
        Ok(())
    }

    /// Inserts new bytes `[from, to)`, read from the file.
    fn emit(&mut self, from: u64, to: u64, ops: &mut Ops) -> io::Result<()> {
        self.check(from, to)?;
        let mut at = from;
        while at < to {
            let n = ((to - at) as usize).min(PIECE);
            self.buf.resize(n, 0);
            self.new.read_exact_at(&mut self.buf, at)?;
            self.out.write_all(&self.buf)?;
            at += n as u64;
        }
        self.written += to - from;
        ops.insert(to - from);
        Ok(())
    }

    /// Inserts new bytes `[from, to)`, taken from `held` (the file's bytes from `held_off`)
    /// when it has them all.
    fn emit_held(
        &mut self,
        held: &[u8],
        held_off: u64,
        from: u64,
        to: u64,
        ops: &mut Ops,
    ) -> io::Result<()> {
        if from < held_off || to > held_off + held.len() as u64 {
            return self.emit(from, to, ops);
        }
        self.check(from, to)?;
        self.out.write_all(&held[(from - held_off) as usize..(to - held_off) as usize])?;
        self.written += to - from;
        ops.insert(to - from);
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `at`, or fewer only at end of file.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Block size of the comparisons: slice equality (a vectorised memcmp) per block, the byte
/// loop only inside a block that differs.
const CMP_BLOCK: usize = 4096;

/// The first index where `x` and `y` differ (over their common length).
fn first_diff(x: &[u8], y: &[u8]) -> Option<usize> {
    let n = x.len().min(y.len());
    let mut at = 0;
    while at < n {
        let e = (at + CMP_BLOCK).min(n);
        if x[at..e] != y[at..e] {
            return x[at..e].iter().zip(&y[at..e]).position(|(p, q)| p != q).map(|i| at + i);
        }
        at = e;
    }
    None
}

/// How many bytes at the ends of `x` and `y` are equal (the whole of the shorter when all are).
fn common_tail(x: &[u8], y: &[u8]) -> usize {
    let n = x.len().min(y.len());
    let (x, y) = (&x[x.len() - n..], &y[y.len() - n..]);
    let mut done = 0;
    while done < n {
        let len = CMP_BLOCK.min(n - done);
        let (a, b) = (&x[n - done - len..n - done], &y[n - done - len..n - done]);
        if a != b {
            return done
                + a.iter()
                    .rev()
                    .zip(b.iter().rev())
                    .position(|(p, q)| p != q)
                    .expect("blocks differ");
        }
        done += len;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn apply(base: &[u8], ops: &[DeltaOp], lit: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut l = 0usize;
        for op in ops {
            match *op {
                DeltaOp::Copy { offset, len } => {
                    out.extend_from_slice(&base[offset as usize..(offset + len) as usize])
                }
                DeltaOp::Insert { len } => {
                    out.extend_from_slice(&lit[l..l + len as usize]);
                    l += len as usize;
                }
            }
        }
        assert_eq!(l, lit.len());
        out
    }

    fn pseudo(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    fn check(base: &[u8], new: &[u8]) -> FileDelta {
        let mut lit = Vec::new();
        let d = compute(&file(base), &file(new), &mut lit).unwrap();
        assert_eq!(apply(base, &d.ops, &lit), new);
        assert_eq!(d.literal as usize, lit.len());
        assert_eq!(d.new_hash, *blake3::hash(new).as_bytes());
        assert_eq!(d.base_hash, *blake3::hash(base).as_bytes());
        d
    }

    #[test]
    fn in_place_change_sends_only_changed_bytes() {
        let base = pseudo(3 << 20, 1);
        let mut new = base.clone();
        new[1_500_000..1_500_100].copy_from_slice(&pseudo(100, 2));
        let d = check(&base, &new);
        assert!(d.literal <= 100, "{}", d.literal);
    }

    #[test]
    fn insertion_and_deletion_in_the_middle() {
        let base = pseudo(2 << 20, 3);
        let mut new = base[..700_000].to_vec();
        new.extend_from_slice(b"inserted bytes here");
        new.extend_from_slice(&base[700_000..1_200_000]);
        new.extend_from_slice(&base[1_300_000..]);
        let d = check(&base, &new);
        assert!(d.literal < 64, "{}", d.literal);
        // A block moved elsewhere is found too.
        let mut moved = base[1_000_000..].to_vec();
        moved.extend_from_slice(&base[..1_000_000]);
        let d = check(&base, &moved);
        assert!(d.literal < 1000, "{} {:?}", d.literal, d.ops);
    }

    #[test]
    fn edge_cases() {
        check(b"", b"");
        check(b"", b"abc");
        check(b"abc", b"");
        check(b"abc", b"abc");
        check(&pseudo(5000, 4), &pseudo(7000, 5));
        check(&pseudo(100_000, 6), &pseudo(100_000, 6)[10..]);
        let mut a = pseudo(100_000, 7);
        a.extend_from_slice(&pseudo(1000, 8));
        check(&pseudo(100_000, 7), &a);
    }

    #[test]
    fn equal_length_with_content_shifted_between_edits() {
        // An insertion and a deletion far apart: equal lengths, everything between them moved
        // by 10 bytes, which comparing at equal offsets cannot settle.
        let base = pseudo(3 << 20, 20);
        let mut new = base.clone();
        new.splice(500_000..500_000, pseudo(10, 21));
        new.drain(2_500_000..2_500_010);
        assert_eq!(new.len(), base.len());
        let d = check(&base, &new);
        assert!(d.literal < 64, "{} {:?}", d.literal, d.ops);
    }

    #[test]
    fn a_long_in_place_change_and_many_scattered_ones() {
        // Over 64 KiB changed in place: matched by content, still only the changed bytes sent.
        let base = pseudo(4 << 20, 22);
        let mut new = base.clone();
        new[1 << 20..(1 << 20) + 300_000].copy_from_slice(&pseudo(300_000, 23));
        let d = check(&base, &new);
        assert!(d.literal <= 300_000, "{}", d.literal);
        // More scattered edits than comparing at equal offsets keeps track of.
        let mut new = base.clone();
        for i in 0..6000 {
            new[i * 600 + 7] ^= 0x55;
        }
        let d = check(&base, &new);
        assert!(d.literal <= 6000 * 2, "{}", d.literal);
    }

    #[test]
    fn repeated_content() {
        // Runs of one byte, and a short pattern repeated: many equal windows, one kept per hash.
        let zeros = vec![0u8; 1 << 20];
        let mut new = zeros.clone();
        new.splice(300_000..300_000, *b"hello");
        let d = check(&zeros, &new);
        assert!(d.literal <= 5, "{} {:?}", d.literal, d.ops);
        let pattern: Vec<u8> = pseudo(100, 24).into_iter().cycle().take(2 << 20).collect();
        let mut new = pattern.clone();
        new.splice(1_000_000..1_000_000, *b"xy");
        new.drain(1_500_000..1_500_033);
        let d = check(&pattern, &new);
        assert!(d.literal < 200, "{} {:?}", d.literal, d.ops);
        // New content built only from a repeated piece of the base.
        let base = pseudo(200_000, 25);
        let new: Vec<u8> = base[50_000..60_000].iter().copied().cycle().take(300_000).collect();
        let d = check(&base, &new);
        assert!(d.literal < 20_000, "{}", d.literal);
    }

    #[test]
    fn a_bounded_delta_gives_up_past_its_literal_limit() {
        let (base, new) = (pseudo(1 << 20, 40), pseudo(1 << 20, 41));
        let mut lit = Vec::new();
        assert!(compute_bounded(&file(&base), &file(&new), &mut lit, 100_000).unwrap().is_none());
        assert!(lit.len() <= 100_000, "{}", lit.len());
        let mut edited = base.clone();
        edited[5000..5100].fill(0);
        let mut lit = Vec::new();
        let d = compute_bounded(&file(&base), &file(&edited), &mut lit, 100)
            .unwrap()
            .expect("within the limit");
        assert_eq!(apply(&base, &d.ops, &lit), edited);
    }

    #[test]
    fn insertions_and_deletions_around_piece_boundaries() {
        let base = pseudo(3 * PIECE + 1000, 42);
        for shift in [1, 999, PIECE - 1, PIECE, PIECE + 7] {
            for at in [0, 5, PIECE - 3, PIECE, 2 * PIECE + 5, base.len() - 10] {
                let mut longer = base.clone();
                longer.splice(at..at, pseudo(shift, at as u64));
                let d = check(&base, &longer);
                assert!(
                    d.literal <= shift as u64 + 8,
                    "insert {shift} at {at}: {} {:?}",
                    d.literal,
                    d.ops
                );
                let mut shorter = base.clone();
                shorter.drain(at..(at + shift).min(base.len()));
                let d = check(&base, &shorter);
                assert!(d.literal <= 8, "delete {shift} at {at}: {} {:?}", d.literal, d.ops);
            }
        }
    }

    #[test]
    fn edits_after_an_insertion_or_a_deletion() {
        // After the insertion, the match runs at the lengths' difference: the extension skips
        // what pass 1 found equal there, and stops at each later edit all the same.
        let base = pseudo(3 << 20, 43);
        for (at, ins, del) in
            [(1 << 20, 5usize, 0usize), (1 << 20, 0, 9), (100, 4000, 0), (PIECE - 1, 0, 300)]
        {
            let mut new = base.clone();
            new[2 << 20] ^= 0x10;
            new[(5 << 19) + 3] ^= 0x20;
            new.splice(at..at + del, pseudo(ins, 44));
            new[50] ^= 1;
            let d = check(&base, &new);
            // (An equal stretch shorter than a cut's 64-byte window, like the 49 bytes between
            // offsets 50 and 100, may go literal too.)
            assert!(
                d.literal <= ins as u64 + 3 + 64,
                "insert {ins} / delete {del} at {at}: {} {:?}",
                d.literal,
                d.ops
            );
        }
    }

    #[test]
    fn tiny_files_and_appends() {
        for (a, b) in [(0, 1), (1, 0), (1, 1), (63, 64), (64, 63), (255, 300), (1000, 1)] {
            check(&pseudo(a, 26), &pseudo(b, 26));
            check(&pseudo(a, 26), &pseudo(b, 27));
        }
        let base = pseudo(1 << 20, 28);
        let mut longer = base.clone();
        longer.extend_from_slice(&pseudo(5000, 29));
        assert_eq!(check(&base, &longer).literal, 5000);
        assert_eq!(check(&longer, &base).literal, 0);
        assert_eq!(check(&base, &base[..999_999]).literal, 0);
    }

    #[test]
    fn chunk_boundaries_shifted_by_an_insertion() {
        // An insertion at the front shifts every cut of the base; two more edits later on.
        for size in [10_000usize, 100_000, 3 << 20] {
            let base = pseudo(size, 30);
            let mut new = pseudo(3, 31);
            new.extend_from_slice(&base);
            new[size / 2] ^= 1;
            new.splice(size * 3 / 4..size * 3 / 4, pseudo(7, 32));
            let d = check(&base, &new);
            assert!(d.literal < 64, "size {size}: {} {:?}", d.literal, d.ops);
        }
    }

    /// Text-like content: few distinct bytes, many repeated words.
    fn text(n: usize, seed: u64) -> Vec<u8> {
        const WORDS: [&[u8]; 8] = [
            b"<div class=\"a\">",
            b"</div>\n",
            b"content ",
            b"mover ",
            b"<p>",
            b"the ",
            b"a ",
            b"group ",
        ];
        let mut v = Vec::new();
        for x in pseudo(n, seed) {
            if v.len() >= n {
                break;
            }
            v.extend_from_slice(WORDS[(x % 8) as usize]);
        }
        v.truncate(n);
        v
    }

    proptest::proptest! {
        #[test]
        fn random_edits_round_trip(seed: u64, edits in proptest::collection::vec((0usize..20_000, 0usize..300, 0usize..300), 0..8)) {
            let base = pseudo(20_000, seed);
            let mut new = base.clone();
            for (at, del, ins) in edits {
                let at = at.min(new.len());
                let del = del.min(new.len() - at);
                new.splice(at..at + del, pseudo(ins, seed ^ at as u64));
            }
            check(&base, &new);
        }
    }

    proptest::proptest! {
        // Files over several read pieces: fewer cases, each bigger.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        #[test]
        fn structured_content_round_trips(seed: u64, size in 0usize..1_200_000, kind in 0u8..3, edits in proptest::collection::vec((0usize..1_200_000, 0usize..5000, 0usize..5000), 0..6)) {
            let base = match kind {
                0 => pseudo(size, seed),
                1 => text(size, seed),
                _ => pseudo(64 + (seed % 4000) as usize, seed).into_iter().cycle().take(size).collect(),
            };
            let mut new = base.clone();
            for (at, del, ins) in edits {
                let at = at.min(new.len());
                let del = del.min(new.len() - at);
                // Inserted bytes: new ones, or a copy of another part of the file (moved content).
                let piece = if ins % 2 == 0 { pseudo(ins, seed ^ at as u64) } else { base[..ins.min(base.len())].to_vec() };
                new.splice(at..at + del, piece);
            }
            check(&base, &new);
        }
    }
}
