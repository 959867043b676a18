//! rsync-class deltas between two local files (the shadow copy's version and staging's).
//!
//! The manager holds both files, so no signature crosses the network; what matters is speed and
//! how few bytes the literal part needs. The algorithm:
//!
//! 1. One sequential pass over both files computes their BLAKE3 hashes and the common prefix
//!    (and, for equal lengths, the common suffix) by plain comparison — most edits in place,
//!    appends and truncations are settled here at memory bandwidth.
//! 2. For unequal lengths the common suffix is found by comparing backwards from the ends.
//! 3. The differing middle is matched rsync-style: the base's middle is cut into blocks of
//!    `B ≈ √len` bytes indexed by a 64-bit two-sum rolling hash (weak) and a truncated
//!    BLAKE3 (strong); the new middle is scanned with the rolling hash, one byte at a time where
//!    nothing matches. A block match is then extended backwards and forwards byte by byte, so the
//!    literal bytes shrink to the bytes that actually changed, not whole blocks.
//!
//! Files are read with positioned reads in bounded buffers: memory stays a few MiB whatever the
//! file size (plus about 32 bytes per base block of the differing middle).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use crate::format::DeltaOp;

/// Size of the sequential read buffers.
const CHUNK: usize = 1 << 20;
/// How much the scan window reads ahead at a time.
const WINDOW_READ: u64 = 4 << 20;

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
    let bl = base.metadata()?.len();
    let nl = new.metadata()?.len();
    let scan = hash_and_prefix(base, bl, new, nl)?;
    let prefix = scan.prefix;
    let suffix = match scan.last_mismatch {
        _ if prefix == bl.min(nl) && bl == nl => 0,
        Some(last) => nl - last - 1,
        None => common_suffix(base, bl, new, nl, prefix)?,
    };
    let mut out = Ops::default();
    out.copy(0, prefix);
    let (base_mid, new_mid) = ((prefix, bl - suffix), (prefix, nl - suffix));
    let mut sink = LiteralSink { new, out: literal, written: 0 };
    if new_mid.1 > new_mid.0 {
        let base_mid_len = base_mid.1 - base_mid.0;
        let block = block_size(base_mid_len);
        if base_mid_len >= block && new_mid.1 - new_mid.0 >= block {
            let index = BlockIndex::build(base, base_mid.0, base_mid_len, block)?;
            Scanner { base, bl, new, index: &index, ne: new_mid.1 }.run(new_mid.0, &mut out, &mut sink)?;
        } else {
            sink.emit(new_mid.0, new_mid.1, &mut out)?;
        }
    }
    out.copy(bl - suffix, suffix);
    Ok(FileDelta {
        ops: out.ops,
        literal: sink.written,
        base_len: bl,
        base_hash: scan.base_hash,
        new_len: nl,
        new_hash: scan.new_hash,
    })
}

/// Block size for a base middle of `len` bytes: √len rounded to 64, within [512, 64 KiB].
fn block_size(len: u64) -> u64 {
    let root = (len as f64).sqrt() as u64;
    root.div_ceil(64).saturating_mul(64).clamp(512, 64 << 10)
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
}

impl LiteralSink<'_> {
    fn emit(&mut self, from: u64, to: u64, ops: &mut Ops) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK.min((to - from) as usize)];
        let mut at = from;
        while at < to {
            let n = ((to - at) as usize).min(buf.len());
            self.new.read_exact_at(&mut buf[..n], at)?;
            self.out.write_all(&buf[..n])?;
            at += n as u64;
        }
        self.written += to - from;
        ops.insert(to - from);
        Ok(())
    }
}

struct PrefixScan {
    prefix: u64,
    /// For equal lengths: the last differing offset, if any.
    last_mismatch: Option<u64>,
    base_hash: [u8; 32],
    new_hash: [u8; 32],
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

fn hash_and_prefix(base: &File, bl: u64, new: &File, nl: u64) -> io::Result<PrefixScan> {
    let (mut hb, mut hn) = (blake3::Hasher::new(), blake3::Hasher::new());
    let (mut bb, mut nb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut prefix = None;
    let mut last_mismatch = None;
    let mut at = 0u64;
    while at < bl.max(nl) {
        let b = if at < bl { read_full_at(base, &mut bb, at)? } else { 0 };
        let n = if at < nl { read_full_at(new, &mut nb, at)? } else { 0 };
        hb.update(&bb[..b]);
        hn.update(&nb[..n]);
        let common = b.min(n);
        let (x, y) = (&bb[..common], &nb[..common]);
        if (prefix.is_none() || bl == nl) && x != y {
            if prefix.is_none() {
                let i = x.iter().zip(y).position(|(p, q)| p != q).expect("slices differ");
                prefix = Some(at + i as u64);
            }
            if bl == nl {
                let i = x.iter().zip(y).rposition(|(p, q)| p != q).expect("slices differ");
                last_mismatch = Some(at + i as u64);
            }
        }
        if b == 0 && n == 0 {
            // A file shrank while being read: treat what we saw as its end.
            break;
        }
        at += b.max(n) as u64;
    }
    Ok(PrefixScan {
        prefix: prefix.unwrap_or(bl.min(nl)),
        last_mismatch,
        base_hash: *hb.finalize().as_bytes(),
        new_hash: *hn.finalize().as_bytes(),
    })
}

/// Length of the common suffix of files of different lengths, not overlapping `prefix`.
fn common_suffix(base: &File, bl: u64, new: &File, nl: u64, prefix: u64) -> io::Result<u64> {
    let max = bl.min(nl) - prefix;
    let (mut bb, mut nb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut done = 0u64;
    while done < max {
        let n = ((max - done) as usize).min(CHUNK);
        base.read_exact_at(&mut bb[..n], bl - done - n as u64)?;
        new.read_exact_at(&mut nb[..n], nl - done - n as u64)?;
        // Slice equality is a vectorised memcmp; the byte loop runs only on the piece that differs.
        if bb[..n] != nb[..n]
            && let Some(i) = bb[..n].iter().rev().zip(nb[..n].iter().rev()).position(|(p, q)| p != q)
        {
            return Ok(done + i as u64);
        }
        done += n as u64;
    }
    Ok(max)
}

/// Per-byte values of the polynomial rolling hash: a fixed pseudo-random table (SplitMix64),
/// so runs of equal or small bytes still spread over the whole 64 bits.
const BYTE_VALUES: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut s: u64 = 0x243F_6A88_85A3_08D3;
    let mut i = 0;
    while i < 256 {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
};
/// The weak rolling hash of a window of `n` bytes: `sum = Σ T[bᵢ]` and `weighted = Σ (n − i)·T[bᵢ]`
/// (rsync's two sums, over 64-bit pseudo-random byte values instead of the bytes themselves).
///
/// Why two sums rather than a polynomial: rolling one byte is two dependent additions, so the
/// per-byte scan is bound by throughput, not by a multiply's latency chain (the polynomial hash
/// held the scan of unrelated files at about 0.15 GiB/s).
#[derive(Clone, Copy)]
struct Rolling {
    sum: u64,
    weighted: u64,
}

impl Rolling {
    /// The hash of a whole window.
    fn of(window: &[u8]) -> Rolling {
        let n = window.len() as u64;
        window.iter().enumerate().fold(Rolling { sum: 0, weighted: 0 }, |r, (i, &b)| {
            let v = BYTE_VALUES[b as usize];
            Rolling { sum: r.sum.wrapping_add(v), weighted: r.weighted.wrapping_add(v.wrapping_mul(n - i as u64)) }
        })
    }

    /// The 64-bit key the index is sorted by.
    #[inline]
    fn key(self) -> u64 {
        self.sum ^ self.weighted.rotate_left(32)
    }

    /// Slides a window of `n` bytes by one: `out` leaves, `inp` enters.
    #[inline]
    fn roll(self, n: u64, out: u8, inp: u8) -> Rolling {
        let o = BYTE_VALUES[out as usize];
        let sum = self.sum.wrapping_sub(o).wrapping_add(BYTE_VALUES[inp as usize]);
        Rolling { sum, weighted: self.weighted.wrapping_sub(o.wrapping_mul(n)).wrapping_add(sum) }
    }
}

fn strong(block: &[u8]) -> u128 {
    let h = blake3::hash(block);
    u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
}

/// The base middle's blocks by weak key: a blocked Bloom prefilter (two bits in one 64-bit word,
/// at most 32 KiB so the per-byte test stays in L1) in front of an open-addressing table. The
/// filter passes a few percent of unrelated windows; those cost one table probe, never a search.
struct BlockIndex {
    start: u64,
    block: u64,
    filter: Vec<u64>,
    filter_shift: u32,
    /// Open addressing over `mix(key)`: block number + 1, 0 = empty; load factor at most 1/2.
    table: Vec<u32>,
    table_shift: u32,
    weak: Vec<u64>,
    strong: Vec<u128>,
}

/// Spreads a weak key over 64 bits (the filter and table take their indexes from the top).
#[inline]
fn mix(key: u64) -> u64 {
    key.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl BlockIndex {
    fn build(base: &File, start: u64, len: u64, block: u64) -> io::Result<BlockIndex> {
        let blocks = len / block;
        let log2 = 64 - blocks.leading_zeros();
        // Filter words: ~16 bits per block, capped at 4096 words (32 KiB).
        let words_log2 = (log2 + 4).saturating_sub(6).clamp(6, 12);
        let table_log2 = (log2 + 1).max(4);
        let mut index = BlockIndex {
            start,
            block,
            filter: vec![0u64; 1usize << words_log2],
            filter_shift: 64 - words_log2,
            table: vec![0u32; 1usize << table_log2],
            table_shift: 64 - table_log2,
            weak: Vec::with_capacity(blocks as usize),
            strong: Vec::with_capacity(blocks as usize),
        };
        let per_read = (CHUNK as u64 / block).max(1);
        let mut buf = vec![0u8; (per_read * block) as usize];
        let mut j = 0u64;
        while j < blocks {
            let n = per_read.min(blocks - j);
            let bytes = &mut buf[..(n * block) as usize];
            base.read_exact_at(bytes, start + j * block)?;
            for b in bytes.chunks_exact(block as usize) {
                index.insert(Rolling::of(b).key(), strong(b));
                j += 1;
            }
        }
        Ok(index)
    }

    fn insert(&mut self, key: u64, strong: u128) {
        let (word, bits) = self.filter_bits(key);
        self.filter[word] |= bits;
        let number = u32::try_from(self.weak.len() + 1).expect("blocks fit in u32 (block ≥ 512 bytes, files < 2 TiB)");
        self.weak.push(key);
        self.strong.push(strong);
        let mask = self.table.len() - 1;
        let mut slot = (mix(key) >> self.table_shift) as usize;
        while self.table[slot] != 0 {
            slot = (slot + 1) & mask;
        }
        self.table[slot] = number;
    }

    #[inline]
    fn filter_bits(&self, key: u64) -> (usize, u64) {
        let m = mix(key);
        ((m >> self.filter_shift) as usize, (1u64 << (m & 63)) | (1u64 << ((m >> 6) & 63)))
    }

    #[inline]
    fn maybe(&self, key: u64) -> bool {
        let (word, bits) = self.filter_bits(key);
        self.filter[word] & bits == bits
    }

    /// The base offset of a block equal to `window` (weak key `key`), if any.
    fn find(&self, key: u64, window: &[u8]) -> Option<u64> {
        let mask = self.table.len() - 1;
        let mut slot = (mix(key) >> self.table_shift) as usize;
        let mut s = None;
        loop {
            let number = self.table[slot];
            if number == 0 {
                return None;
            }
            let j = (number - 1) as usize;
            if self.weak[j] == key {
                let s = *s.get_or_insert_with(|| strong(window));
                if self.strong[j] == s {
                    return Some(self.start + j as u64 * self.block);
                }
            }
            slot = (slot + 1) & mask;
        }
    }
}

/// The scan of the new file's differing middle against the base's block index.
struct Scanner<'a> {
    base: &'a File,
    bl: u64,
    new: &'a File,
    index: &'a BlockIndex,
    /// End of the new middle.
    ne: u64,
}

/// A window of the new file held in memory: bytes `[off, off + buf.len())`.
struct Window {
    buf: Vec<u8>,
    off: u64,
}

impl Window {
    fn end(&self) -> u64 {
        self.off + self.buf.len() as u64
    }
    /// Drops bytes before `keep` and reads until at least `need` (capped at `limit`) is held.
    fn fill(&mut self, file: &File, keep: u64, need: u64, limit: u64) -> io::Result<()> {
        if keep > self.off {
            let drop = ((keep - self.off) as usize).min(self.buf.len());
            self.buf.drain(..drop);
            self.off = keep;
        }
        let need = need.min(limit);
        if self.end() >= need {
            return Ok(());
        }
        let target = (need + WINDOW_READ).min(limit);
        let old = self.buf.len();
        self.buf.resize((target - self.off) as usize, 0);
        file.read_exact_at(&mut self.buf[old..], self.off + old as u64)?;
        Ok(())
    }
}

impl Scanner<'_> {
    fn run(&self, start: u64, ops: &mut Ops, sink: &mut LiteralSink<'_>) -> io::Result<()> {
        let block = self.index.block;
        let mut win = Window { buf: Vec::new(), off: start };
        let (mut pos, mut lit_start) = (start, start);
        let mut h: Option<Rolling> = None;
        while pos + block <= self.ne {
            win.fill(self.new, pos, pos + block + 1, self.ne)?;
            let data = &win.buf;
            let mut i = (pos - win.off) as usize;
            let last = (win.end() - block - win.off) as usize;
            let b = block as usize;
            let mut hv = match h {
                Some(v) => v,
                None => Rolling::of(&data[i..i + b]),
            };
            let mut found = None;
            loop {
                let key = hv.key();
                if self.index.maybe(key)
                    && let Some(bo) = self.index.find(key, &data[i..i + b])
                {
                    found = Some(bo);
                    break;
                }
                if i == last {
                    break;
                }
                hv = hv.roll(block, data[i], data[i + b]);
                i += 1;
            }
            pos = win.off + i as u64;
            let Some(bo) = found else {
                h = Some(hv);
                if win.end() >= self.ne {
                    break;
                }
                continue;
            };
            let back = self.extend_backward(lit_start, pos, bo)?;
            sink.emit(lit_start, pos - back, ops)?;
            let fwd = self.extend_forward(pos + block, bo + block)?;
            ops.copy(bo - back, back + block + fwd);
            pos += block + fwd;
            lit_start = pos;
            h = None;
        }
        sink.emit(lit_start, self.ne, ops)
    }

    /// How many bytes before a match at new `pos` / base `bo` are equal too (not before `lit_start`).
    fn extend_backward(&self, lit_start: u64, pos: u64, bo: u64) -> io::Result<u64> {
        let max = (pos - lit_start).min(bo);
        let mut done = 0u64;
        let (mut nb, mut bb) = (vec![0u8; 0], vec![0u8; 0]);
        let mut step = 4096u64;
        while done < max {
            let n = step.min(max - done) as usize;
            nb.resize(n, 0);
            bb.resize(n, 0);
            self.new.read_exact_at(&mut nb, pos - done - n as u64)?;
            self.base.read_exact_at(&mut bb, bo - done - n as u64)?;
            if nb != bb
                && let Some(i) = nb.iter().rev().zip(bb.iter().rev()).position(|(p, q)| p != q)
            {
                return Ok(done + i as u64);
            }
            done += n as u64;
            step = (step * 2).min(CHUNK as u64);
        }
        Ok(done)
    }

    /// How many bytes from new `n` / base `b` on are equal (staying inside the new middle).
    /// Reads both files directly in growing pieces (not through the scan window, whose
    /// front would be shifted down at every step of a long match).
    fn extend_forward(&self, n: u64, b: u64) -> io::Result<u64> {
        let max = (self.ne - n).min(self.bl - b);
        let mut done = 0u64;
        let (mut nb, mut bb) = (vec![0u8; 0], vec![0u8; 0]);
        let mut step = 4096u64;
        while done < max {
            let len = step.min(max - done) as usize;
            nb.resize(len, 0);
            bb.resize(len, 0);
            self.new.read_exact_at(&mut nb, n + done)?;
            self.base.read_exact_at(&mut bb, b + done)?;
            if nb != bb
                && let Some(i) = nb.iter().zip(&bb).position(|(p, q)| p != q)
            {
                return Ok(done + i as u64);
            }
            done += len as u64;
            step = (step * 2).min(CHUNK as u64);
        }
        Ok(done)
    }
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
                DeltaOp::Copy { offset, len } => out.extend_from_slice(&base[offset as usize..(offset + len) as usize]),
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
        assert!(d.literal < 1000, "{}", d.literal);
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
}
