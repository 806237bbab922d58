//! [`ExtentSet`]: a set of byte ranges, kept sorted, disjoint and merged.
//! What CBT records per sequence, what a disk has allocated, and what
//! `QueryChangedDiskAreas` returns are all extent sets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The sector size extents are aligned to.
pub const SECTOR: u64 = 512;

/// Sorted, disjoint, non-adjacent `[start, end)` byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct ExtentSet {
    /// start -> end
    ranges: BTreeMap<u64, u64>,
}

impl From<Vec<(u64, u64)>> for ExtentSet {
    fn from(v: Vec<(u64, u64)>) -> ExtentSet {
        let mut s = ExtentSet::default();
        for (start, end) in v {
            s.insert(start, end);
        }
        s
    }
}

impl From<ExtentSet> for Vec<(u64, u64)> {
    fn from(s: ExtentSet) -> Vec<(u64, u64)> {
        s.iter().collect()
    }
}

impl ExtentSet {
    /// Adds `[start, end)`, merging with what it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // The range starting at or before `start` that reaches it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        // Ranges starting inside [start, end].
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// Adds `[start, end)` widened to whole sectors.
    pub fn insert_sectors(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let s = start / SECTOR * SECTOR;
        let e = end.div_ceil(SECTOR).saturating_mul(SECTOR);
        self.insert(s, e);
    }

    pub fn union_with(&mut self, other: &ExtentSet) {
        for (s, e) in other.iter() {
            self.insert(s, e);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The ranges intersecting `[start, end)`, clipped to it.
    pub fn clipped(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((_, &e)) = self.ranges.range(..start).next_back() {
            if e > start {
                out.push((start, e.min(end)));
            }
        }
        for (&s, &e) in self.ranges.range(start..end) {
            out.push((s, e.min(end)));
        }
        out
    }

    /// The parts of `[start, end)` not in the set, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for (s, e) in self.clipped(start, end) {
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Removes everything at or beyond `end` (a disk shrank or was cut).
    pub fn truncate(&mut self, end: u64) {
        let kept = self.clipped(0, end);
        self.ranges = kept.into_iter().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_the_complement_within_the_window() {
        let mut x = ExtentSet::default();
        x.insert(10, 20);
        x.insert(30, 40);
        assert_eq!(x.gaps(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(x.gaps(15, 35), vec![(20, 30)]);
        assert_eq!(x.gaps(12, 18), vec![]);
        assert_eq!(ExtentSet::default().gaps(5, 9), vec![(5, 9)]);
    }
    use proptest::prelude::*;

    #[test]
    fn merges_overlaps_and_neighbours() {
        let mut s = ExtentSet::default();
        s.insert(10, 20);
        s.insert(30, 40);
        s.insert(20, 30);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(10, 40)]);
        s.insert(5, 12);
        s.insert(50, 60);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(5, 40), (50, 60)]);
        assert_eq!(s.clipped(35, 55), vec![(35, 40), (50, 55)]);
        s.insert_sectors(700, 701);
        assert_eq!(s.clipped(512, 1024), vec![(512, 1024)]);
    }

    proptest! {
        #[test]
        fn equals_a_byte_map(ops in proptest::collection::vec((0u64..300, 0u64..40), 0..30),
                             window in (0u64..340, 0u64..340)) {
            let mut s = ExtentSet::default();
            let mut bytes = [false; 340];
            for (start, len) in ops {
                s.insert(start, start + len);
                for b in &mut bytes[start as usize..(start + len) as usize] { *b = true; }
            }
            let mut expected = Vec::new();
            let mut i = 0;
            while i < 340 {
                if bytes[i] {
                    let j = (i..340).find(|&j| !bytes[j]).unwrap_or(340);
                    expected.push((i as u64, j as u64));
                    i = j;
                } else { i += 1; }
            }
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), expected.clone());
            let (a, b) = (window.0.min(window.1), window.0.max(window.1));
            let clipped: Vec<_> = expected.iter()
                .filter(|(x, y)| *y > a && *x < b)
                .map(|(x, y)| ((*x).max(a), (*y).min(b))).collect();
            prop_assert_eq!(s.clipped(a, b), clipped);
        }
    }
}
