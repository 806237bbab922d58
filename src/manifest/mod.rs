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
    let levels = chain.len();
    // cutoff[l] = min block count over levels l..newest
    let mut cutoff = vec![0u64; levels];
    let mut m = u64::MAX;
    for l in (0..levels).rev() {
        m = m.min(chain[l].meta.block_count());
        cutoff[l] = m;
    }
    // Heap of (index, newest-first priority, level, position).
    let mut heap = BinaryHeap::with_capacity(levels);
    let mut pos = vec![0usize; levels];
    for (l, obj) in chain.iter().enumerate() {
        if let Some((i, _)) = obj.entries.first() {
            heap.push(Reverse((*i, Reverse(l), l)));
        }
    }
    let mut out = Vec::with_capacity(newest.entries.len());
    let mut last_index: Option<u64> = None;
    while let Some(Reverse((index, _, l))) = heap.pop() {
        let entry = chain[l].entries[pos[l]].1;
        pos[l] += 1;
        if let Some((next, _)) = chain[l].entries.get(pos[l]) {
            heap.push(Reverse((*next, Reverse(l), l)));
        }
        // The first pop of an index comes from the newest level holding it.
        if last_index == Some(index) {
            continue;
        }
        last_index = Some(index);
        if index >= cutoff[l] {
            continue;
        }
        if let BlockRef::Data(id) = entry {
            out.push((index, id));
        }
    }
    BlockMap {
        disk_size_bytes: newest.meta.disk_size_bytes,
        block_size: newest.meta.block_size,
        data: out,
    }
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
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.data.len() || j < b.data.len() {
        let ai = a.data.get(i).map(|x| x.0).unwrap_or(u64::MAX);
        let bj = b.data.get(j).map(|x| x.0).unwrap_or(u64::MAX);
        if ai == bj {
            if a.data[i].1 != b.data[j].1 {
                out.push(BlockChange {
                    index: ai,
                    before: Some(a.data[i].1),
                    after: Some(b.data[j].1),
                });
            }
            i += 1;
            j += 1;
        } else if ai < bj {
            out.push(BlockChange {
                index: ai,
                before: Some(a.data[i].1),
                after: None,
            });
            i += 1;
        } else {
            out.push(BlockChange {
                index: bj,
                before: None,
                after: Some(b.data[j].1),
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
    let mut out = Vec::with_capacity(base.data.len() + delta.len());
    let (mut i, mut j) = (0, 0);
    while i < base.data.len() || j < delta.len() {
        let bi = base.data.get(i).map(|x| x.0).unwrap_or(u64::MAX);
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
            out.push(base.data[i]);
            i += 1;
        }
    }
    out.retain(|(i, _)| *i < blocks);
    BlockMap {
        disk_size_bytes,
        block_size: base.block_size,
        data: out,
    }
}
