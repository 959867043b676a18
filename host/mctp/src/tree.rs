//! The file's BLAKE3, assembled from its frames' chaining values ("tree-tagged" sessions).
//!
//! When the frame size is a power of two of at least one BLAKE3 chunk (1 KiB), every frame is
//! a whole subtree of the file's BLAKE3 tree: its chaining value (CV) depends only on its bytes
//! and its offset. A tree-tagged data frame is authenticated by a tag over its header and that
//! CV (see [`crate::wire`]), so a member hashes each payload once, and the same CVs, merged,
//! give the file's BLAKE3: no second pass over the content to verify it.
//!
//! [`FrameTree`] merges CVs in frame order exactly as BLAKE3's own incremental hasher merges
//! chunk CVs (a stack of power-of-two subtrees, merged lazily so the last merge can be the
//! root). Frames that arrive ahead of a gap wait in a bounded map; past the bound their CVs are
//! dropped and the driver recomputes them from the file when the gap is filled.
//!
//! A GL that does not know the file's hash yet hashes it in parallel: [`frame_ranges`] cuts the
//! frames into contiguous ranges, the driver hashes each on a thread of its own
//! ([`range_cvs`]), and [`assemble`] merges them in order (the core itself starts no thread).
//!
//! Invariant: the root is only ever produced from the CVs of every frame `0..frames`, merged in
//! order, so it equals `blake3::hash(file)` exactly when every CV was computed over the bytes
//! that were written (which the driver guarantees by adding a CV only after its write).

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use std::collections::BTreeMap;
use std::ops::Range;

/// Most CVs held for frames ahead of the in-order point (32 bytes each plus the map's own
/// overhead: about 4 MiB at the bound). Frames past it are re-read from the file instead.
pub const MAX_AHEAD: usize = 65_536;

/// What a member needs to assemble a tree-tagged session's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeLayout {
    pub frame_size: u16,
    pub frames: u32,
}

/// True when frames of `frame_size` bytes are whole subtrees of the BLAKE3 tree.
pub fn frame_size_fits_tree(frame_size: u16) -> bool {
    frame_size.is_power_of_two() && usize::from(frame_size) >= blake3::CHUNK_LEN
}

/// The chaining value of `bytes` as the subtree of the file's BLAKE3 tree starting at `offset`.
///
/// The caller guarantees `offset` is a multiple of the frame size (a power of two of at least
/// one chunk), `bytes.len()` is at most the frame size, and the file spans more than one frame
/// (so no frame is the root).
pub fn frame_cv(offset: u64, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(bytes);
    h.finalize_non_root()
}

/// Most frames whose CVs [`assemble`] keeps (32 bytes each: 16 MiB, a 4 GiB assignment in
/// 8 KiB frames). Past it a sender computes each frame's CV when it tags the frame.
pub const MAX_KEPT_CVS: u32 = 1 << 19;

/// The CVs of frames `frames` of a file of `size` bytes in frames of `frame_size`, in order,
/// reading 1 MiB (whole frames) at a time with `read(offset, buf)`. Each read's CVs go to
/// `emit(first frame, cvs)`; it returns false to stop early.
pub fn frame_cvs_in_order<E>(
    size: u64,
    frame_size: u16,
    frames: Range<u32>,
    read: impl Fn(u64, &mut [u8]) -> Result<(), E>,
    mut emit: impl FnMut(u32, &[ChainingValue]) -> bool,
) -> Result<(), E> {
    let fs = u64::from(frame_size);
    let per_read = ((1u64 << 20) / fs).max(1) as u32;
    let mut buf = vec![0u8; (u64::from(per_read) * fs) as usize];
    let mut cvs = Vec::with_capacity(per_read as usize);
    let mut seq = frames.start;
    while seq < frames.end {
        let n = per_read.min(frames.end - seq);
        let offset = u64::from(seq) * fs;
        let len = (u64::from(n) * fs).min(size - offset) as usize;
        read(offset, &mut buf[..len])?;
        cvs.clear();
        cvs.extend(
            buf[..len]
                .chunks(fs as usize)
                .enumerate()
                .map(|(i, frame)| frame_cv(offset + i as u64 * fs, frame)),
        );
        if !emit(seq, &cvs) {
            break;
        }
        seq += n;
    }
    Ok(())
}

/// Most parts [`frame_ranges`] cuts a file into.
pub const MAX_PARTS: usize = 16;

/// The frames of a file of `size` bytes in frames of `frame_size`, cut into at most `parts`
/// (1 to [`MAX_PARTS`]) contiguous ranges of nearly equal length, in order: the per-thread
/// work of hashing a file in parallel. Each range's CVs come from [`frame_cvs_in_order`] (or
/// [`range_cvs`]); [`assemble`] merges them. `frame_size` must fit the tree and `size` exceed
/// one frame. The driver owns the threads (a core starts none).
pub fn frame_ranges(size: u64, frame_size: u16, parts: usize) -> Vec<Range<u32>> {
    assert!(frame_size_fits_tree(frame_size) && size > u64::from(frame_size));
    let frames = u32::try_from(size.div_ceil(u64::from(frame_size))).expect("frame count fits u32");
    let parts = u32::try_from(parts.clamp(1, MAX_PARTS)).unwrap_or(1).min(frames);
    let per = frames.div_ceil(parts);
    (0..parts).map(|t| t * per..((t + 1) * per).min(frames)).filter(|r| !r.is_empty()).collect()
}

/// The CVs of the frames in `range` (one of [`frame_ranges`]), in order, read with `read`.
pub fn range_cvs<E>(
    size: u64,
    frame_size: u16,
    range: Range<u32>,
    read: impl Fn(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Vec<ChainingValue>, E> {
    let mut cvs = Vec::with_capacity(range.len());
    frame_cvs_in_order(size, frame_size, range, read, |_, part| {
        cvs.extend_from_slice(part);
        true
    })?;
    Ok(cvs)
}

/// The file's BLAKE3 from the CVs of all its `frames` frames, given in order in `parts` (the
/// ranges of [`frame_ranges`], in order), and every frame's CV when there are at most
/// [`MAX_KEPT_CVS`] frames.
pub fn assemble(
    frames: u32,
    parts: impl IntoIterator<Item = Vec<ChainingValue>>,
) -> ([u8; 32], Option<Vec<ChainingValue>>) {
    let mut tree = FrameTree::new(frames);
    let mut all = Vec::with_capacity(if frames <= MAX_KEPT_CVS { frames as usize } else { 0 });
    let mut seq = 0;
    for part in parts {
        for cv in part {
            tree.add(seq, cv);
            if frames <= MAX_KEPT_CVS {
                all.push(cv);
            }
            seq += 1;
        }
    }
    let root = tree.root().expect("every frame hashed");
    (root, (frames <= MAX_KEPT_CVS).then_some(all))
}

/// The in-order assembly of a file's BLAKE3 from its frames' CVs.
#[derive(Debug, Clone)]
pub struct FrameTree {
    frames: u32,
    /// Frames `0..next` are merged into `stack`.
    next: u32,
    stack: Vec<ChainingValue>,
    ahead: BTreeMap<u32, ChainingValue>,
}

impl FrameTree {
    /// A tree of `frames` frames; `frames` must be at least 2 (a smaller file has no frames).
    pub fn new(frames: u32) -> Self {
        assert!(frames >= 2, "a tree-tagged session has at least two frames");
        FrameTree { frames, next: 0, stack: Vec::with_capacity(33), ahead: BTreeMap::new() }
    }

    /// Records frame `seq`'s CV. Duplicates and frames out of range are ignored.
    pub fn add(&mut self, seq: u32, cv: ChainingValue) {
        if seq < self.next || seq >= self.frames {
            return;
        }
        if seq > self.next {
            // Past the bound the CV is dropped: `needs` asks the driver for it later.
            if self.ahead.len() < MAX_AHEAD {
                self.ahead.insert(seq, cv);
            }
            return;
        }
        self.push(cv);
        while let Some(cv) = self.ahead.remove(&self.next) {
            self.push(cv);
        }
    }

    fn push(&mut self, cv: ChainingValue) {
        // Before frame `next` joins, merge the completed subtrees of the `next` frames already
        // in: after merging, the stack holds one subtree per set bit of `next` (BLAKE3's rule).
        // The newest subtree is never merged until a later frame arrives, so the final merge
        // can be the root.
        let keep = self.next.count_ones() as usize;
        while self.stack.len() > keep {
            let right = self.stack.pop().expect("stack longer than keep");
            let left = self.stack.pop().expect("stack longer than keep");
            self.stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        self.stack.push(cv);
        self.next += 1;
    }

    /// The first frame not yet merged, when its CV is not waiting ahead (the driver must
    /// compute it from the file once that frame is held). `None` when every frame is merged
    /// or the next one's CV is already here.
    pub fn needs(&self) -> Option<u32> {
        (self.next < self.frames && !self.ahead.contains_key(&self.next)).then_some(self.next)
    }

    /// Frames merged in order so far.
    pub fn merged(&self) -> u32 {
        self.next
    }

    /// The file's BLAKE3, once every frame is merged.
    pub fn root(&self) -> Option<[u8; 32]> {
        if self.next < self.frames {
            return None;
        }
        let mut stack = self.stack.clone();
        while stack.len() > 2 {
            let right = stack.pop()?;
            let left = stack.pop()?;
            stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        let [left, right] = stack.as_slice() else { return None };
        Some(*merge_subtrees_root(left, right, Mode::Hash).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;

    fn cvs(data: &[u8], fs: usize) -> Vec<ChainingValue> {
        data.chunks(fs).enumerate().map(|(i, c)| frame_cv((i * fs) as u64, c)).collect()
    }

    #[test]
    fn fitting_frame_sizes() {
        assert!(
            frame_size_fits_tree(1024) && frame_size_fits_tree(8192) && frame_size_fits_tree(32768)
        );
        assert!(
            !frame_size_fits_tree(512)
                && !frame_size_fits_tree(1400)
                && !frame_size_fits_tree(8800)
        );
    }

    #[test]
    fn exact_powers_and_one_byte_over() {
        for fs in [1024usize, 2048, 8192] {
            for frames in [2usize, 3, 4, 5, 7, 8, 9, 16, 17, 33] {
                for extra in [0usize, 1] {
                    let len = fs * frames + extra;
                    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                    let n = len.div_ceil(fs) as u32;
                    let mut t = FrameTree::new(n);
                    for (i, cv) in cvs(&data, fs).into_iter().enumerate() {
                        t.add(i as u32, cv);
                    }
                    assert_eq!(
                        t.root(),
                        Some(*blake3::hash(&data).as_bytes()),
                        "fs {fs} len {len}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any length, any fitting frame size, frames in any order (with duplicates): the root
        /// is BLAKE3 of the whole.
        #[test]
        fn root_is_blake3_in_any_order(len in 1025usize..200_000, shift in 0u32..4, seed: u64, dups in 0usize..20) {
            let fs = 1024usize << shift;
            prop_assume!(len > fs);
            let data: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1).to_le_bytes()[3]).collect();
            let all = cvs(&data, fs);
            let mut order: Vec<u32> = (0..all.len() as u32).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            order.shuffle(&mut rng);
            order.extend(order.clone().into_iter().take(dups));
            let mut t = FrameTree::new(all.len() as u32);
            for (k, seq) in order.iter().enumerate() {
                prop_assert_eq!(t.root().is_some(), k >= all.len() && t.merged() == all.len() as u32);
                t.add(*seq, all[*seq as usize]);
            }
            prop_assert_eq!(t.root(), Some(*blake3::hash(&data).as_bytes()));
        }
    }

    #[test]
    fn ranges_hashed_in_any_number_of_parts_assemble_to_blake3() {
        for (len, fs) in
            [(2049usize, 1024u16), (5 << 20, 8192), ((3 << 20) + 17, 2048), (70_000, 32768)]
        {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
            let frames = len.div_ceil(usize::from(fs)) as u32;
            for parts in [1, 2, 3, 7, 40] {
                let ranges = frame_ranges(len as u64, fs, parts);
                assert!(ranges.len() <= parts.min(MAX_PARTS));
                assert_eq!(ranges.first().map(|r| r.start), Some(0));
                assert_eq!(ranges.last().map(|r| r.end), Some(frames));
                assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
                let parts_cvs = ranges.into_iter().map(|r| {
                    range_cvs::<()>(len as u64, fs, r, |off, buf| {
                        buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
                        Ok(())
                    })
                    .unwrap()
                });
                let (root, kept) = assemble(frames, parts_cvs);
                assert_eq!(
                    root,
                    *blake3::hash(&data).as_bytes(),
                    "len {len} fs {fs} parts {parts}"
                );
                assert_eq!(kept.unwrap(), cvs(&data, usize::from(fs)));
            }
        }
        let failed =
            range_cvs(10_000, 1024, 5..10, |off, _| if off >= 4096 { Err("disk") } else { Ok(()) });
        assert_eq!(failed, Err("disk"));
    }

    #[test]
    fn wrong_cv_gives_wrong_root_and_dropped_cvs_are_asked_for() {
        let fs = 1024;
        let data = vec![7u8; fs * 5 + 10];
        let all = cvs(&data, fs);
        let mut t = FrameTree::new(all.len() as u32);
        t.add(1, all[1]);
        assert_eq!(t.needs(), Some(0));
        t.add(0, all[0]);
        assert_eq!(t.needs(), Some(2), "frame 1 was waiting ahead and merged");
        for (i, cv) in all.iter().enumerate().skip(2) {
            t.add(i as u32, if i == 4 { [0; 32] } else { *cv });
        }
        assert_eq!(t.needs(), None);
        assert_ne!(t.root(), Some(*blake3::hash(&data).as_bytes()));
    }
}
