//! A fixed-size set of frame sequence numbers, one bit each.
//!
//! A 4 GiB assignment in 1 400-byte frames has about three million frames: 384 KiB of bits,
//! which is the whole of a receiver's per-session memory besides constants.

/// Bit set over `0..len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSet {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl FrameSet {
    pub fn new(len: u32) -> Self {
        FrameSet { words: vec![0; (len as usize).div_ceil(64)], len, count: 0 }
    }

    /// Every member of `0..len` present.
    pub fn full(len: u32) -> Self {
        let mut s = FrameSet::new(len);
        s.insert_range(0, len);
        s
    }

    /// Size of the universe `0..len`.
    pub fn universe(&self) -> u32 {
        self.len
    }

    /// Members present.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    pub fn contains(&self, seq: u32) -> bool {
        seq < self.len && self.words[(seq / 64) as usize] & (1 << (seq % 64)) != 0
    }

    /// Inserts `seq`; returns false when it was already present or out of range.
    pub fn insert(&mut self, seq: u32) -> bool {
        if seq >= self.len {
            return false;
        }
        let w = &mut self.words[(seq / 64) as usize];
        let bit = 1u64 << (seq % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }

    /// Removes `seq`; returns false when it was not present.
    pub fn remove(&mut self, seq: u32) -> bool {
        if !self.contains(seq) {
            return false;
        }
        self.words[(seq / 64) as usize] &= !(1u64 << (seq % 64));
        self.count -= 1;
        true
    }

    /// Members present within `from..upto`.
    pub fn count_in(&self, from: u32, upto: u32) -> u32 {
        let upto = upto.min(self.len);
        let mut n = 0;
        let mut at = from;
        while let Some(p) = self.next_present(at).filter(|p| *p < upto) {
            let end = self.next_absent(p).unwrap_or(self.len).min(upto);
            n += end - p;
            at = end;
        }
        n
    }

    /// Inserts `start..start+len`, clipped to the universe.
    pub fn insert_range(&mut self, start: u32, len: u32) {
        let end = start.saturating_add(len).min(self.len);
        for seq in start..end {
            self.insert(seq);
        }
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }

    /// The first present member at or after `from`.
    pub fn next_present(&self, from: u32) -> Option<u32> {
        self.scan(from, false)
    }

    /// The first absent member at or after `from`.
    pub fn next_absent(&self, from: u32) -> Option<u32> {
        self.scan(from, true)
    }

    fn scan(&self, from: u32, absent: bool) -> Option<u32> {
        if from >= self.len {
            return None;
        }
        let mut i = (from / 64) as usize;
        let mut word = if absent { !self.words[i] } else { self.words[i] };
        word &= u64::MAX << (from % 64);
        loop {
            if word != 0 {
                let seq = (i as u32) * 64 + word.trailing_zeros();
                return (seq < self.len).then_some(seq);
            }
            i += 1;
            if i >= self.words.len() {
                return None;
            }
            word = if absent { !self.words[i] } else { self.words[i] };
        }
    }

    /// Maximal runs of absent members, as `(start, len)`, in order.
    pub fn absent_runs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.absent_runs_in(0, self.len)
    }

    /// Runs of absent members within `from..upto` (clipped to the universe), in order.
    pub fn absent_runs_in(&self, from: u32, upto: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
        let upto = upto.min(self.len);
        let mut at = from;
        std::iter::from_fn(move || {
            let start = self.next_absent(at).filter(|s| *s < upto)?;
            let end = self.next_present(start).unwrap_or(self.len).min(upto);
            at = end;
            Some((start, end - start))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn runs_are_exactly_the_absent_members(len in 0u32..400, present in proptest::collection::vec(0u32..400, 0..300)) {
            let mut s = FrameSet::new(len);
            for p in &present { s.insert(*p); }
            let mut absent = FrameSet::new(len);
            for (start, n) in s.absent_runs() {
                prop_assert!(n > 0);
                for q in start..start + n { prop_assert!(!s.contains(q)); absent.insert(q); }
            }
            prop_assert_eq!(absent.count() + s.count(), len);
            prop_assert_eq!(s.count() as usize, present.iter().filter(|p| **p < len).collect::<std::collections::BTreeSet<_>>().len());
        }

        #[test]
        fn runs_in_a_window_are_the_absent_members_there(len in 0u32..400, present in proptest::collection::vec(0u32..400, 0..300), a in 0u32..450, b in 0u32..450) {
            let (from, upto) = (a.min(b), a.max(b));
            let mut s = FrameSet::new(len);
            for p in &present { s.insert(*p); }
            let got: Vec<u32> = s.absent_runs_in(from, upto).flat_map(|(start, n)| start..start + n).collect();
            let want: Vec<u32> = (from..upto.min(len)).filter(|q| !s.contains(*q)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(s.count_in(from, upto), (from..upto.min(len)).filter(|q| s.contains(*q)).count() as u32);
            let mut r = s.clone();
            for q in from..upto { r.remove(q); }
            prop_assert_eq!(r.count() + s.count_in(from, upto), s.count());
        }
    }

    #[test]
    fn full_has_no_runs() {
        let s = FrameSet::full(130);
        assert!(s.is_full());
        assert_eq!(s.absent_runs().count(), 0);
        assert_eq!(FrameSet::new(130).absent_runs().collect::<Vec<_>>(), vec![(0, 130)]);
    }
}
