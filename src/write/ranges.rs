//! A set of byte ranges, kept sorted and merged.

use std::ops::Range;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    /// The ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = &Range<u64>> {
        self.ranges.iter()
    }

    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut placed = false;
        for cur in self.ranges.drain(..) {
            if cur.end < start {
                out.push(cur);
            } else if cur.start > end {
                if !placed {
                    out.push(start..end);
                    placed = true;
                }
                out.push(cur);
            } else {
                start = start.min(cur.start);
                end = end.max(cur.end);
            }
        }
        if !placed {
            out.push(start..end);
        }
        self.ranges = out;
    }

    /// Drops everything at or beyond `len`.
    pub fn truncate(&mut self, len: u64) {
        self.ranges.retain(|r| r.start < len);
        if let Some(last) = self.ranges.last_mut() {
            last.end = last.end.min(len);
        }
    }

    /// The parts of `r` not in the set.
    pub fn missing(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = r.start;
        for cur in &self.ranges {
            if cur.end <= pos {
                continue;
            }
            if cur.start >= r.end {
                break;
            }
            if cur.start > pos {
                out.push(pos..cur.start);
            }
            pos = pos.max(cur.end);
            if pos >= r.end {
                break;
            }
        }
        if pos < r.end {
            out.push(pos..r.end);
        }
        out
    }

    /// The first byte at or after `pos` that is in the set.
    pub fn next_start(&self, pos: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| r.end > pos)
            .map(|r| r.start.max(pos))
    }

    /// Whether any byte of `r` is in the set.
    pub fn overlaps(&self, r: &Range<u64>) -> bool {
        self.ranges
            .iter()
            .any(|c| c.start < r.end && r.start < c.end)
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
}
