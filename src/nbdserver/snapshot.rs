//! A stored snapshot as an NBD export, read straight from the packs
//! through the repository's one read path (`repo::read::BlockReader`):
//! nothing is restored to disk first, and this module never reads packs
//! itself. Every block is verified by the reader; a block that does not
//! verify fails the read that needs it with EIO and nothing else.
//! Zero blocks are holes. A small LRU keeps recently verified blocks, so
//! clients reading in 4 KiB pieces do not decompress a block sixteen times.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::format::{BlockId, SnapshotId};
use crate::manifest::BlockMap;
use crate::repo::read::{BlockReader, Located};
use crate::repo::{RepoError, Repository};
use nbd::proto;
use nbd::server::{Export, ExportError};

/// Verified blocks kept in memory (64 blocks of 64 KiB = 4 MiB).
const CACHE_BLOCKS: usize = 64;
/// Descriptors one `zero_extents` call returns at most.
const MAX_DESCRIPTORS_PER_CALL: usize = 128;

/// Least-recently-used verified blocks by id.
struct BlockCache {
    entries: HashMap<BlockId, (Arc<Vec<u8>>, u64)>,
    clock: u64,
}

impl BlockCache {
    fn get(&mut self, id: &BlockId) -> Option<Arc<Vec<u8>>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(id).map(|(raw, used)| {
            *used = clock;
            raw.clone()
        })
    }

    fn insert(&mut self, id: BlockId, raw: Arc<Vec<u8>>) {
        self.clock += 1;
        if self.entries.len() >= CACHE_BLOCKS && !self.entries.contains_key(&id) {
            // A linear scan over 64 entries costs less than keeping order.
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(id, (raw, self.clock));
    }
}

/// A snapshot served read-only from a repository.
pub struct SnapshotExport {
    repo: Arc<Repository>,
    snapshot: SnapshotId,
    size_bytes: u64,
    block_size: u64,
    /// Non-zero blocks, ascending by index (location `None`: the catalog
    /// does not know the block, reads of it fail).
    blocks: Vec<Located>,
    missing: u64,
    cache: Mutex<BlockCache>,
}

impl SnapshotExport {
    /// Resolves snapshot `id` and looks up where each of its blocks is.
    pub fn open(repo: Arc<Repository>, snapshot: SnapshotId) -> Result<SnapshotExport, RepoError> {
        let map = repo.resolve(snapshot)?;
        SnapshotExport::from_map(repo, snapshot, &map)
    }

    /// Serves an already resolved block map of `snapshot`.
    pub fn from_map(
        repo: Arc<Repository>,
        snapshot: SnapshotId,
        map: &BlockMap,
    ) -> Result<SnapshotExport, RepoError> {
        if map.block_size == 0 {
            return Err(RepoError::Invalid(format!(
                "snapshot {snapshot}: block size 0"
            )));
        }
        let count = map.block_count();
        let sorted = map.data.windows(2).all(|w| w[0].0 < w[1].0);
        if !sorted || map.data.last().is_some_and(|(i, _)| *i >= count) {
            return Err(RepoError::Invalid(format!(
                "snapshot {snapshot}: block map out of order or beyond the disk; run 'cbtvault check'"
            )));
        }
        let blocks = BlockReader::new(&repo).locate(&map.data)?;
        let missing = blocks.iter().filter(|b| b.location.is_none()).count() as u64;
        Ok(SnapshotExport {
            repo,
            snapshot,
            size_bytes: map.disk_size_bytes,
            block_size: map.block_size as u64,
            blocks,
            missing,
            cache: Mutex::new(BlockCache {
                entries: HashMap::new(),
                clock: 0,
            }),
        })
    }

    pub fn snapshot_id(&self) -> SnapshotId {
        self.snapshot
    }

    /// Data blocks the catalog cannot locate; reads touching them fail.
    pub fn missing_blocks(&self) -> u64 {
        self.missing
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BlockCache> {
        // The cache holds only verified copies: a poisoned one is still valid.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verified content of each of `wanted`, from the cache or the
    /// packs. Only blocks the read `[offset, end)` covers in part are kept
    /// in the cache: those are the ones likely asked for again soon, and
    /// large sequential reads then leave the cache (and the CPU's) alone.
    fn contents(
        &self,
        wanted: &[Located],
        offset: u64,
        end: u64,
    ) -> Result<Vec<Arc<Vec<u8>>>, ExportError> {
        let mut got: Vec<Option<Arc<Vec<u8>>>> = {
            let mut cache = self.cache();
            wanted.iter().map(|b| cache.get(&b.block)).collect()
        };
        let mut todo: Vec<Located> = wanted
            .iter()
            .zip(&got)
            .filter(|(_, g)| g.is_none())
            .map(|(b, _)| *b)
            .collect();
        todo.sort_by_key(|b| b.block);
        todo.dedup_by_key(|b| b.block);
        let mut fetched: HashMap<BlockId, Arc<Vec<u8>>> = HashMap::new();
        let reader = BlockReader::new(&self.repo);
        for (b, raw) in todo.iter().zip(reader.read(&todo)) {
            let raw = raw.map_err(|e| {
                ExportError::Io(
                    RepoError::InSnapshot {
                        snapshot: self.snapshot,
                        cause: Box::new(e.into()),
                    }
                    .to_string(),
                )
            })?;
            fetched.insert(b.block, Arc::new(raw));
        }
        let bs = self.block_size;
        let partial: Vec<&Located> = wanted
            .iter()
            .filter(|b| {
                let start = b.index * bs;
                offset > start || end < (start + bs).min(self.size_bytes)
            })
            .collect();
        if !partial.is_empty() {
            let mut cache = self.cache();
            for b in partial {
                if let Some(raw) = fetched.get(&b.block) {
                    cache.insert(b.block, raw.clone());
                }
            }
        }
        for (b, g) in wanted.iter().zip(got.iter_mut()) {
            if g.is_none() {
                *g = fetched.get(&b.block).cloned();
            }
        }
        got.into_iter()
            .map(|g| {
                g.ok_or_else(|| ExportError::Io("block vanished between lookup and read".into()))
            })
            .collect()
    }
}

impl Export for SnapshotExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ExportError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.size_bytes)
            .ok_or_else(|| {
                ExportError::Invalid(format!(
                    "read of {offset}+{len} beyond the end ({} bytes)",
                    self.size_bytes
                ))
            })?;
        let mut out = vec![0u8; len as usize];
        if len == 0 {
            return Ok(out);
        }
        let bs = self.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let lo = self.blocks.partition_point(|b| b.index < first);
        let hi = self.blocks.partition_point(|b| b.index <= last);
        let wanted = &self.blocks[lo..hi];
        for (b, raw) in wanted.iter().zip(self.contents(wanted, offset, end)?) {
            let start = b.index * bs;
            // A block inherited across a shrink may be longer than its span,
            // a short last block shorter: the rest reads as zeros.
            let span = (self.size_bytes - start).min(bs);
            let valid_end = start + (raw.len() as u64).min(span);
            let (from, to) = (start.max(offset), valid_end.min(end));
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&raw[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(out)
    }

    fn zero_extents(&self, offset: u64, len: u32) -> Vec<(u32, u32)> {
        let end = offset.saturating_add(len as u64).min(self.size_bytes);
        let bs = self.block_size;
        let mut out = Vec::new();
        let mut at = offset;
        let mut p = self.blocks.partition_point(|b| b.index < offset / bs);
        // Callers loop; a bounded answer keeps one-descriptor requests
        // (REQ_ONE over the rest of a large disk) cheap.
        while at < end && out.len() < MAX_DESCRIPTORS_PER_CALL {
            let index = at / bs;
            let run_end = if p < self.blocks.len() && self.blocks[p].index == index {
                // A run of consecutive data blocks, up to the end asked for.
                let mut last = index;
                while p + 1 < self.blocks.len()
                    && self.blocks[p + 1].index == last + 1
                    && (last + 1) * bs < end
                {
                    p += 1;
                    last += 1;
                }
                p += 1;
                out.push((((last + 1) * bs).min(end) - at, 0));
                ((last + 1) * bs).min(end)
            } else {
                // Zeros up to the next data block.
                let next = self.blocks.get(p).map_or(u64::MAX, |b| b.index * bs);
                out.push((next.min(end) - at, proto::STATE_HOLE | proto::STATE_ZERO));
                next.min(end)
            };
            at = run_end;
        }
        out.into_iter().map(|(l, f)| (l as u32, f)).collect()
    }
}
