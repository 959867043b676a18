//! Content-defined cut points (a gear hash, FastCDC style) and the base file's index of them.
//!
//! A cut is a position where the gear hash of the 64 bytes before it has its top `k` bits
//! zero: a property of those 64 bytes alone, so the same content yields the same cuts in both
//! files wherever it sits. A chunker never tests (nor hashes most of) the first `min` bytes of
//! a chunk: it restarts the hash 64 bytes before the first allowed cut, so about one byte in
//! eight is hashed at all. After an edit the two files' chunkers may pick different cuts
//! for a few chunks, then meet on a common one and stay together (each step keeps them apart
//! only if a cut candidate falls between them); the byte-wise extension of a match recovers the
//! bytes between the edit and that first common cut, so the chunk size bounds the search, never
//! the literal bytes.

/// Per-byte values of the gear hash: a fixed pseudo-random table (SplitMix64), so runs of equal
/// or small bytes still spread over all 64 bits.
const GEAR: [u64; 256] = {
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

/// Bytes a gear hash depends on: each step shifts the state left by one, so a byte has left
/// all 64 bits after 64 more.
pub(super) const WINDOW: u64 = 64;

/// Chunk-size parameters, derived from the length of the base region so both files use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunking {
    /// A cut needs the hash's top `bits` bits zero: one candidate per `2^bits` bytes.
    bits: u32,
    /// No cut before this many bytes into a chunk (none of them is tested).
    pub min: u64,
    /// A cut is forced here when no candidate came.
    pub max: u64,
}

impl Chunking {
    /// Chunks averaging about √len / 2 bytes (between 256 bytes and 128 KiB): few enough that
    /// the index stays small, small enough that short equal runs between edits still hold a
    /// common cut. The first 7/8 of the average are skipped: only about one byte in eight is
    /// hashed, and the chunkers of two files still meet within about four chunks of an edit.
    pub fn for_len(len: u64) -> Chunking {
        let tail = (((len as f64).sqrt() / 16.0) as u64).next_power_of_two().clamp(32, 16 << 10);
        let min = 7 * tail;
        // `max` odd: in content repeating with a period P that shares no factor with it (no
        // candidate cut in it, so every cut is forced), the base's forced cuts fall on every
        // phase mod P, so a forced cut of the new file finds one with the same 64 bytes.
        Chunking { bits: tail.trailing_zeros(), min, max: min + 8 * tail - 1 }
    }
}

/// A gear-hash chunker over one file, fed contiguous pieces of it.
///
/// Sparse (the base's): each chunk's first `min` bytes are skipped, so its cuts depend on where
/// it started. Dense (the new file's, in bursts): the hash rolls on over every byte and every
/// candidate is a cut, so it sees each of the base's cuts (those not forced) that lie in its
/// span — no need for the two chunkers to meet.
#[derive(Debug, Clone)]
pub(super) struct Chunker {
    p: Chunking,
    dense: bool,
    /// Start of the current chunk (a cut is forced `max` bytes after it).
    start: u64,
    /// No cut before this position.
    test_from: u64,
    /// Bytes before this position are in `h` (or were skipped).
    pos: u64,
    h: u64,
}

impl Chunker {
    pub fn new(p: Chunking, start: u64) -> Chunker {
        Chunker { p, dense: false, start, test_from: start + p.min, pos: start, h: 0 }
    }

    pub fn dense(p: Chunking, start: u64) -> Chunker {
        Chunker { p, dense: true, start, test_from: start + WINDOW, pos: start, h: 0 }
    }

    pub fn chunking(&self) -> Chunking {
        self.p
    }

    /// The first position whose byte the chunker still needs.
    pub fn needs_from(&self) -> u64 {
        if self.dense { self.pos } else { self.pos.max(self.test_from - WINDOW) }
    }

    /// The next cut and the hash of the 64 bytes before it, looking only at `data` (the file's
    /// bytes from `off`, which must not start after [`Chunker::needs_from`]); `None` when it
    /// needs bytes past the end of `data`.
    #[inline]
    pub fn next(&mut self, data: &[u8], off: u64) -> Option<(u64, u64)> {
        let hash_from = self.needs_from();
        if self.pos < hash_from {
            self.pos = hash_from;
            self.h = 0;
        }
        let end = off + data.len() as u64;
        if self.pos >= end {
            return None;
        }
        debug_assert!(self.pos >= off, "chunker fed from {off}, needs {}", self.pos);
        let limit = end.min(self.start + self.p.max);
        let test_from = self.test_from.clamp(self.pos, limit);
        let mut h = self.h;
        // The 64 bytes before the first allowed cut: hashed, not tested.
        for &b in &data[(self.pos - off) as usize..(test_from - off) as usize] {
            h = (h << 1).wrapping_add(GEAR[b as usize]);
        }
        let shift = 64 - self.p.bits;
        let mut cut = None;
        for (i, &b) in data[(test_from - off) as usize..(limit - off) as usize].iter().enumerate() {
            h = (h << 1).wrapping_add(GEAR[b as usize]);
            if h >> shift == 0 {
                cut = Some(test_from + i as u64 + 1);
                break;
            }
        }
        let cut = match cut {
            Some(c) => c,
            None if limit == self.start + self.p.max => limit,
            None => {
                self.pos = limit;
                self.h = h;
                return None;
            }
        };
        self.start = cut;
        self.pos = cut;
        if self.dense {
            self.h = h;
        } else {
            self.h = 0;
            self.test_from = cut + self.p.min;
        }
        Some((cut, h))
    }
}

/// Spreads a key over 64 bits (the table takes its slot from the top bits).
#[inline]
fn mix(key: u64) -> u64 {
    (key ^ (key >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The base's cuts by window hash: open addressing, load at most 1/2, the first position seen
/// for a hash kept (equal windows are interchangeable; a false one is refused when compared).
#[derive(Debug, Default)]
pub(super) struct CutIndex {
    /// (window hash, cut position); position `u64::MAX` marks an empty slot.
    slots: Vec<(u64, u64)>,
    shift: u32,
}

const EMPTY: u64 = u64::MAX;

impl CutIndex {
    pub fn build(cuts: &[(u64, u64)]) -> CutIndex {
        if cuts.is_empty() {
            return CutIndex::default();
        }
        let log2 = (cuts.len() * 2).next_power_of_two().trailing_zeros().max(4);
        let mut index = CutIndex { slots: vec![(0, EMPTY); 1 << log2], shift: 64 - log2 };
        let mask = index.slots.len() - 1;
        for &(pos, key) in cuts {
            let mut slot = (mix(key) >> index.shift) as usize;
            loop {
                let (k, p) = index.slots[slot];
                if p == EMPTY {
                    index.slots[slot] = (key, pos);
                    break;
                }
                if k == key {
                    break;
                }
                slot = (slot + 1) & mask;
            }
        }
        index
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A base cut whose window hash is `key`.
    #[inline]
    pub fn get(&self, key: u64) -> Option<u64> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut slot = (mix(key) >> self.shift) as usize;
        loop {
            let (k, p) = self.slots[slot];
            if p == EMPTY {
                return None;
            }
            if k == key {
                return Some(p);
            }
            slot = (slot + 1) & mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuts(p: Chunking, data: &[u8], piece: usize) -> Vec<(u64, u64)> {
        let mut c = Chunker::new(p, 0);
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < data.len() {
            let end = (off + piece).min(data.len());
            while let Some(cut) = c.next(&data[off..end], off as u64) {
                out.push(cut);
            }
            off = end;
        }
        out
    }

    fn noise(n: usize, mut s: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    #[test]
    fn cuts_do_not_depend_on_how_the_file_is_fed() {
        let data = noise(1 << 20, 9);
        let p = Chunking::for_len(data.len() as u64);
        let whole = cuts(p, &data, data.len());
        assert!(whole.len() > 10, "{}", whole.len());
        for piece in [1, 63, 4096, 100_000] {
            assert_eq!(cuts(p, &data, piece), whole, "piece {piece}");
        }
        for w in whole.windows(2) {
            let len = w[1].0 - w[0].0;
            assert!(len >= p.min && len <= p.max, "{len}");
        }
    }

    #[test]
    fn cuts_follow_content_after_an_insertion() {
        let data = noise(1 << 20, 10);
        let mut shifted = noise(777, 11);
        shifted.extend_from_slice(&data);
        let p = Chunking::for_len(data.len() as u64);
        let a: std::collections::HashSet<_> =
            cuts(p, &data, 4096).into_iter().map(|(c, h)| (c + 777, h)).collect();
        let b = cuts(p, &shifted, 4096);
        // After a few chunks the chunkers meet, and every later cut is shared.
        let shared = b.iter().filter(|c| a.contains(c)).count();
        assert!(shared * 100 >= b.len() * 99, "{shared} of {}", b.len());
    }

    #[test]
    fn a_dense_chunker_sees_every_cut_of_the_base_in_its_span() {
        let data = noise(1 << 20, 12);
        let p = Chunking::for_len(data.len() as u64);
        let base = cuts(p, &data, 4096);
        let mut shifted = noise(333, 13);
        shifted.extend_from_slice(&data);
        let mut dense = Chunker::dense(p, 5000);
        let mut seen = std::collections::HashSet::new();
        while let Some((c, h)) = dense.next(&shifted[5000..], 5000) {
            seen.insert((c - 333, h));
        }
        let inside = base.iter().filter(|&&(c, _)| c >= 5000).collect::<Vec<_>>();
        let natural =
            inside.iter().filter(|&&&(c, _)| seen.contains(&(c, cuts_hash(&data, c)))).count();
        assert!(natural + 2 >= inside.len(), "{natural} of {}", inside.len());
    }

    fn cuts_hash(data: &[u8], c: u64) -> u64 {
        data[c as usize - 64..c as usize]
            .iter()
            .fold(0u64, |h, &b| (h << 1).wrapping_add(GEAR[b as usize]))
    }

    #[test]
    fn index_keeps_the_first_position_per_key() {
        let index = CutIndex::build(&[(10, 5), (20, 6), (30, 5)]);
        assert_eq!(index.get(5), Some(10));
        assert_eq!(index.get(6), Some(20));
        assert_eq!(index.get(7), None);
        assert_eq!(CutIndex::build(&[]).get(5), None);
    }
}
