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
use crate::repo::read::{BlockReader, Located};
use crate::repo::{ChainReader, RepoError, Repository, Snapshot};
use nbd::proto;
use nbd::server::{Export, ExportError};

/// Verified blocks kept in memory (64 blocks of 64 KiB = 4 MiB).
const CACHE_BLOCKS: usize = 64;
/// Descriptors one `zero_extents` call returns at most.
const MAX_DESCRIPTORS_PER_CALL: usize = 128;
/// Ranges holding data one `zero_extents` call looks at, at most.
const MAX_RANGES_PER_CALL: usize = 4;

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

/// Resolved ranges (with their blocks located) kept in memory: 16 of up to
/// 16384 blocks each.
const CACHE_RANGES: usize = 16;

/// Least-recently-used resolved and located ranges by range number.
#[derive(Default)]
struct RangeCache {
    entries: HashMap<u64, (Arc<Vec<Located>>, u64)>,
    clock: u64,
}

/// A snapshot served read-only from a repository. Its chain is resolved
/// range by range as clients read (format-spec/03-snapshot.md#streaming),
/// keeping a few resolved ranges: memory does not grow with the disk.
pub struct SnapshotExport {
    repo: Arc<Repository>,
    snapshot: SnapshotId,
    size_bytes: u64,
    block_size: u64,
    range_blocks: u64,
    chain: Vec<Arc<Snapshot>>,
    /// Ranges that may hold data, ascending; the others are all zero.
    ranges: Vec<u64>,
    missing: u64,
    located: Mutex<RangeCache>,
    cache: Mutex<BlockCache>,
}

impl SnapshotExport {
    /// Opens snapshot `id`: every manifest page of its chain is read and
    /// every range resolved once, and every data block looked up in the
    /// catalog (to count those it cannot locate), one range at a time.
    pub fn open(repo: Arc<Repository>, snapshot: SnapshotId) -> Result<SnapshotExport, RepoError> {
        let (chain, ranges, size_bytes, block_size, range_blocks, missing) = {
            let mut reader = repo.chain_reader(snapshot)?;
            if reader.block_size() == 0 {
                return Err(RepoError::Invalid(format!(
                    "snapshot {snapshot}: block size 0"
                )));
            }
            reader.survey(|_| {})?;
            let mut missing = 0u64;
            let locate = BlockReader::new(&repo);
            let chain = reader.shared_chain();
            let ranges = reader.nonempty_ranges().to_vec();
            let (size, bs, rb) = (
                reader.disk_size_bytes(),
                reader.block_size() as u64,
                reader.range_blocks(),
            );
            for m in &mut reader {
                let m = m?;
                missing += locate
                    .locate(&m.data)?
                    .iter()
                    .filter(|b| b.location.is_none())
                    .count() as u64;
            }
            (chain, ranges, size, bs, rb, missing)
        };
        Ok(SnapshotExport {
            repo,
            snapshot,
            size_bytes,
            block_size,
            range_blocks,
            chain,
            ranges,
            missing,
            located: Mutex::new(RangeCache::default()),
            cache: Mutex::new(BlockCache {
                entries: HashMap::new(),
                clock: 0,
            }),
        })
    }

    /// The data blocks of range `r`, located (location `None`: the catalog
    /// does not know the block, reads of it fail).
    fn range(&self, r: u64) -> Result<Arc<Vec<Located>>, RepoError> {
        if self.ranges.binary_search(&r).is_err() {
            return Ok(Arc::new(Vec::new()));
        }
        {
            let mut c = self.located.lock().unwrap_or_else(|e| e.into_inner());
            c.clock += 1;
            let clock = c.clock;
            if let Some((list, used)) = c.entries.get_mut(&r) {
                *used = clock;
                return Ok(list.clone());
            }
        }
        let mut reader = ChainReader::shared(&self.repo, self.chain.clone())?;
        let m = reader.range(r)?;
        let list = Arc::new(BlockReader::new(&self.repo).locate(&m.data)?);
        let mut c = self.located.lock().unwrap_or_else(|e| e.into_inner());
        c.clock += 1;
        let clock = c.clock;
        if c.entries.len() >= CACHE_RANGES && !c.entries.contains_key(&r) {
            if let Some(oldest) = c
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                c.entries.remove(&oldest);
            }
        }
        c.entries.insert(r, (list.clone(), clock));
        Ok(list)
    }

    /// The located data blocks `first..=last`, ascending.
    fn blocks_between(&self, first: u64, last: u64) -> Result<Vec<Located>, RepoError> {
        let mut out = Vec::new();
        for r in first / self.range_blocks..=last / self.range_blocks {
            let list = self.range(r)?;
            let lo = list.partition_point(|b| b.index < first);
            let hi = list.partition_point(|b| b.index <= last);
            out.extend_from_slice(&list[lo..hi]);
        }
        Ok(out)
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
        let wanted = self.blocks_between(first, last).map_err(|e| {
            ExportError::Io(
                RepoError::InSnapshot {
                    snapshot: self.snapshot,
                    cause: Box::new(e),
                }
                .to_string(),
            )
        })?;
        for (b, raw) in wanted.iter().zip(self.contents(&wanted, offset, end)?) {
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
        let span = self.range_blocks * bs;
        let hole = proto::STATE_HOLE | proto::STATE_ZERO;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let push = |out: &mut Vec<(u64, u32)>, len: u64, flags: u32| match out.last_mut() {
            Some((l, f)) if *f == flags => *l += len,
            _ => out.push((len, flags)),
        };
        let mut at = offset;
        let mut resolved = 0;
        // Callers loop; a bounded answer keeps one-descriptor requests
        // (REQ_ONE over the rest of a large disk) cheap: at most a few
        // ranges are resolved per call.
        while at < end && out.len() < MAX_DESCRIPTORS_PER_CALL && resolved < MAX_RANGES_PER_CALL {
            let r = at / span;
            let range_end = ((r + 1) * span).min(end);
            if self.ranges.binary_search(&r).is_err() {
                // An all-zero range: a hole up to the next range with data.
                let p = self.ranges.partition_point(|x| *x <= r);
                let next = self.ranges.get(p).map_or(u64::MAX, |n| n * span);
                let stop = next.min(end);
                push(&mut out, stop - at, hole);
                at = stop;
                continue;
            }
            resolved += 1;
            let list = match self.range(r) {
                Ok(list) => list,
                Err(_) => {
                    // Unknown content is reported as data: the read of it
                    // then fails with its error.
                    push(&mut out, range_end - at, 0);
                    at = range_end;
                    continue;
                }
            };
            let mut p = list.partition_point(|b| b.index < at / bs);
            while at < range_end && out.len() < MAX_DESCRIPTORS_PER_CALL {
                let index = at / bs;
                if p < list.len() && list[p].index == index {
                    // A run of consecutive data blocks.
                    let mut last = index;
                    while p + 1 < list.len()
                        && list[p + 1].index == last + 1
                        && (last + 1) * bs < range_end
                    {
                        p += 1;
                        last += 1;
                    }
                    p += 1;
                    let stop = ((last + 1) * bs).min(range_end);
                    push(&mut out, stop - at, 0);
                    at = stop;
                } else {
                    // Zeros up to the next data block of the range.
                    let next = list.get(p).map_or(u64::MAX, |b| b.index * bs);
                    let stop = next.min(range_end);
                    push(&mut out, stop - at, hole);
                    at = stop;
                }
            }
        }
        out.into_iter().map(|(l, f)| (l as u32, f)).collect()
    }
}
