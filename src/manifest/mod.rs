//! Layered manifests: resolving a chain of snapshot manifests into the final
//! block map of a disk, flattening, and comparing two maps. Pure, in memory;
//! the cost is linear in the sizes of the manifests involved (a k-way merge),
//! never in chain depth times disk size.
//!
//! spec: format-spec/03-snapshot.md#resolution

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::format::snapshot::{block_count, BlockRef, SnapshotObject};
use crate::format::BlockId;

/// The resolved content of a disk: every non-zero block's id, sorted by
/// index. Blocks absent from `data` are zero.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockMap {
    pub disk_size_bytes: u64,
    pub block_size: u32,
    pub data: Vec<(u64, BlockId)>,
}

impl BlockMap {
    pub fn block_count(&self) -> u64 {
        block_count(self.disk_size_bytes, self.block_size)
    }

    /// The id at `index`, or `None` for a zero block. O(log n).
    pub fn get(&self, index: u64) -> Option<BlockId> {
        self.data
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|p| self.data[p].1)
    }

    /// Length in bytes of block `index` (the last block may be partial).
    pub fn span_of(&self, index: u64) -> u32 {
        let start = index * self.block_size as u64;
        (self.disk_size_bytes.saturating_sub(start)).min(self.block_size as u64) as u32
    }

    /// Number of non-zero blocks.
    pub fn data_blocks(&self) -> u64 {
        self.data.len() as u64
    }
}

/// Resolves a chain given oldest (a full manifest) first, newest last.
///
/// An entry of level L counts only if its index lies below the block count
/// of every level from L to the newest (a shrink drops blocks for good; a
/// later growth brings them back as zero).
pub fn resolve(chain: &[&SnapshotObject]) -> BlockMap {
    let Some(newest) = chain.last() else {
        return BlockMap::default();
    };
    let counts: Vec<u64> = chain.iter().map(|o| o.meta.block_count()).collect();
    let cut = cutoffs(&counts);
    let levels: Vec<(&[(u64, BlockRef)], u64)> = chain
        .iter()
        .zip(cut)
        .map(|(o, c)| (&o.entries[..], c))
        .collect();
    BlockMap {
        disk_size_bytes: newest.meta.disk_size_bytes,
        block_size: newest.meta.block_size,
        data: resolve_levels(&levels),
    }
}

/// For block counts of a chain (oldest first), the cutoff of each level:
/// the least block count from that level to the newest.
pub fn cutoffs(block_counts: &[u64]) -> Vec<u64> {
    let mut cutoff = vec![0u64; block_counts.len()];
    let mut m = u64::MAX;
    for l in (0..block_counts.len()).rev() {
        m = m.min(block_counts[l]);
        cutoff[l] = m;
    }
    cutoff
}

/// The k-way merge behind [`resolve`], over entry slices (oldest level
/// first), each with its cutoff (see [`cutoffs`]): the resolved non-zero
/// blocks, ascending. Works on whole manifests or on the entries of one
/// range of every level (format-spec/03-snapshot.md#streaming).
pub fn resolve_levels(levels: &[(&[(u64, BlockRef)], u64)]) -> Vec<(u64, BlockId)> {
    // Heap of (index, newest-first priority, level).
    let mut heap = BinaryHeap::with_capacity(levels.len());
    let mut pos = vec![0usize; levels.len()];
    for (l, (entries, _)) in levels.iter().enumerate() {
        if let Some((i, _)) = entries.first() {
            heap.push(Reverse((*i, Reverse(l), l)));
        }
    }
    let mut out = Vec::with_capacity(levels.last().map(|l| l.0.len()).unwrap_or(0));
    let mut last_index: Option<u64> = None;
    while let Some(Reverse((index, _, l))) = heap.pop() {
        let (entries, cutoff) = levels[l];
        let entry = entries[pos[l]].1;
        pos[l] += 1;
        if let Some((next, _)) = entries.get(pos[l]) {
            heap.push(Reverse((*next, Reverse(l), l)));
        }
        // The first pop of an index comes from the newest level holding it.
        if last_index == Some(index) {
            continue;
        }
        last_index = Some(index);
        if index >= cutoff {
            continue;
        }
        if let BlockRef::Data(id) = entry {
            out.push((index, id));
        }
    }
    out
}

/// Merges delta entries (ascending) over resolved base data (ascending),
/// keeping indices below `blocks`: the resolved data of the child.
pub fn apply_entries(
    base: &[(u64, BlockId)],
    delta: &[(u64, BlockRef)],
    blocks: u64,
) -> Vec<(u64, BlockId)> {
    let mut out = Vec::with_capacity(base.len() + delta.len());
    let (mut i, mut j) = (0, 0);
    while i < base.len() || j < delta.len() {
        let bi = base.get(i).map(|x| x.0).unwrap_or(u64::MAX);
        let dj = delta.get(j).map(|x| x.0).unwrap_or(u64::MAX);
        if dj <= bi {
            if let BlockRef::Data(id) = delta[j].1 {
                out.push((dj, id));
            }
            j += 1;
            if dj == bi {
                i += 1;
            }
        } else {
            out.push(base[i]);
            i += 1;
        }
    }
    out.retain(|(i, _)| *i < blocks);
    out
}

/// One block that differs between two maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockChange {
    pub index: u64,
    pub before: Option<BlockId>,
    pub after: Option<BlockId>,
}

/// Blocks whose content differs between `a` and `b`, ascending. Blocks
/// beyond one map's size count as zero there.
pub fn diff(a: &BlockMap, b: &BlockMap) -> Vec<BlockChange> {
    diff_data(&a.data, &b.data)
}

/// [`diff`] over resolved data (e.g. of one range of each map).
pub fn diff_data(a: &[(u64, BlockId)], b: &[(u64, BlockId)]) -> Vec<BlockChange> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let ai = a.get(i).map(|x| x.0).unwrap_or(u64::MAX);
        let bj = b.get(j).map(|x| x.0).unwrap_or(u64::MAX);
        if ai == bj {
            if a[i].1 != b[j].1 {
                out.push(BlockChange {
                    index: ai,
                    before: Some(a[i].1),
                    after: Some(b[j].1),
                });
            }
            i += 1;
            j += 1;
        } else if ai < bj {
            out.push(BlockChange {
                index: ai,
                before: Some(a[i].1),
                after: None,
            });
            i += 1;
        } else {
            out.push(BlockChange {
                index: bj,
                before: None,
                after: Some(b[j].1),
            });
            j += 1;
        }
    }
    out
}

/// The entries of a full manifest for `map` (zero blocks omitted).
pub fn flatten(map: &BlockMap) -> Vec<(u64, BlockRef)> {
    map.data
        .iter()
        .map(|(i, id)| (*i, BlockRef::Data(*id)))
        .collect()
}

/// Merges a delta (ascending) over a base map: the map of the child.
pub fn apply(base: &BlockMap, delta: &[(u64, BlockRef)], disk_size_bytes: u64) -> BlockMap {
    let blocks = block_count(disk_size_bytes, base.block_size);
    BlockMap {
        disk_size_bytes,
        block_size: base.block_size,
        data: apply_entries(&base.data, delta, blocks),
    }
}
