//! A set of byte ranges, kept sorted and merged: a thin face over
//! `rangemap::RangeSet` (a B-tree), so each insert and lookup costs
//! O(log n) however scattered the writes (100,000 out-of-order writes
//! rebuilt a vector each: 30 s).

use std::ops::Range;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: rangemap::RangeSet<u64>,
}

impl RangeSet {
    /// The ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = &Range<u64>> {
        self.ranges.iter()
    }

    pub fn insert(&mut self, r: Range<u64>) {
        if !r.is_empty() {
            self.ranges.insert(r);
        }
    }

    /// Drops everything at or beyond `len`.
    pub fn truncate(&mut self, len: u64) {
        if len < u64::MAX {
            self.ranges.remove(len..u64::MAX);
        }
    }

    /// The parts of `r` not in the set.
    pub fn missing(&self, r: Range<u64>) -> Vec<Range<u64>> {
        if r.is_empty() {
            return Vec::new();
        }
        self.ranges.gaps(&r).collect()
    }

    /// The first byte at or after `pos` that is in the set.
    pub fn next_start(&self, pos: u64) -> Option<u64> {
        if pos == u64::MAX {
            return None;
        }
        self.ranges
            .overlapping(pos..u64::MAX)
            .next()
            .map(|r| r.start.max(pos))
    }

    /// Whether any byte of `r` is in the set.
    pub fn overlaps(&self, r: &Range<u64>) -> bool {
        !r.is_empty() && self.ranges.overlaps(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_and_missing_complements() {
        let mut s = RangeSet::default();
        s.insert(10..20);
        s.insert(30..40);
        s.insert(18..31);
        s.insert(50..50);
        assert_eq!(s.missing(0..60), vec![0..10, 40..60]);
        assert_eq!(s.missing(12..35), vec![]);
        s.insert(0..5);
        assert_eq!(s.missing(0..60), vec![5..10, 40..60]);
        s.truncate(15);
        assert_eq!(s.missing(0..60), vec![5..10, 15..60]);
        assert!(s.overlaps(&(14..100)));
        assert!(!s.overlaps(&(15..100)));
        assert_eq!(s.next_start(3), Some(3));
        assert_eq!(s.next_start(7), Some(10));
        assert_eq!(s.next_start(15), None);
    }

    /// Against a plain bitmap, for random inserts and truncates.
    #[test]
    fn agrees_with_a_bitmap() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let (mut s, mut bits) = (RangeSet::default(), vec![false; 256]);
            for _ in 0..30 {
                let a = next(256);
                let b = (a + next(40)).min(256);
                if next(8) == 0 {
                    s.truncate(a);
                    bits[a as usize..].iter_mut().for_each(|x| *x = false);
                } else {
                    s.insert(a..b);
                    bits[a as usize..b as usize]
                        .iter_mut()
                        .for_each(|x| *x = true);
                }
                let (q, e) = (next(256), next(256));
                let q = q.min(e)..q.max(e);
                let want: Vec<u64> = q.clone().filter(|&i| !bits[i as usize]).collect();
                let got: Vec<u64> = s.missing(q.clone()).into_iter().flatten().collect();
                assert_eq!(got, want, "missing({q:?})");
                assert_eq!(s.overlaps(&q), q.clone().any(|i| bits[i as usize]));
                let first = (q.start..256).find(|&i| bits[i as usize]);
                assert_eq!(s.next_start(q.start), first, "next_start({})", q.start);
            }
        }
    }
}
