//! Random access to a stored snapshot by byte offset, straight from the
//! packs through the repository's one read path (`read::BlockReader`):
//! nothing is restored to disk first, and this module never reads packs
//! itself. The NBD export (`nbdserver`) and file-level restore (`files`)
//! both read snapshots through here.
//!
//! The chain is resolved range by range as reads arrive
//! (format-spec/03-snapshot.md#streaming), keeping a few located ranges
//! ([`CACHE_RANGES`]) and a few verified blocks ([`CACHE_BLOCKS`]): memory
//! does not grow with the disk. Every block is verified by the reader; a
//! block that does not verify fails the read that needs it (with the
//! block, its id and its pack) and nothing else. Zero blocks read as zeros.
//! Reads that continue where the previous one stopped have the next
//! window of blocks fetched on another thread (with one call, so the
//! reader's parallel decompression is used) while they consume this one:
//! a file being extracted reads at the speed of a whole restore.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::read::{BlockReader, Located, ReadError};
use super::{ChainReader, RepoError, Repository, Snapshot};
use crate::format::{BlockId, SnapshotId};

/// Verified blocks kept in memory (128 blocks of 64 KiB = 8 MiB).
pub const CACHE_BLOCKS: usize = 128;
/// Resolved ranges (with their blocks located) kept in memory: 16 of up to
/// 16384 blocks each.
pub const CACHE_RANGES: usize = 16;
/// Blocks fetched ahead, with one `BlockReader::read`, when reads are
/// sequential; a sequential reader also has the window after that one
/// fetched in the background while it consumes this one (two windows and
/// the blocks in use fit `CACHE_BLOCKS`).
const READ_AHEAD_BLOCKS: u64 = 32;

/// Least-recently-used entries by key, evicted by a linear scan (cheaper
/// than keeping order at these sizes).
struct Lru<K, V> {
    entries: HashMap<K, (V, u64)>,
    clock: u64,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Copy, V: Clone> Lru<K, V> {
    fn new(capacity: usize) -> Self {
        Lru {
            entries: HashMap::new(),
            clock: 0,
            capacity,
        }
    }

    fn get(&mut self, key: &K) -> Option<V> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(v, used)| {
            *used = clock;
            v.clone()
        })
    }

    fn insert(&mut self, key: K, value: V) {
        self.clock += 1;
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (value, self.clock));
    }
}

/// The verified blocks kept, and where the last read stopped (to tell a
/// sequential reader).
struct BlockCache {
    blocks: Lru<BlockId, Arc<Vec<u8>>>,
    /// The block index just after the last read's end.
    next_index: u64,
    /// The last block index fetched or being fetched ahead of a
    /// sequential reader.
    frontier: u64,
    /// The window being fetched in the background, if any.
    pending: Option<Prefetch>,
}

/// A window of blocks read ahead on another thread: indices
/// `first..=last`, and the blocks that verified (a block that did not is
/// left out; the read that needs it fetches it again and fails with why).
struct Prefetch {
    first: u64,
    last: u64,
    fetch: std::thread::JoinHandle<Vec<(BlockId, Arc<Vec<u8>>)>>,
}

impl Prefetch {
    /// Waits for the window and keeps its blocks in `blocks`.
    fn land(self, blocks: &mut Lru<BlockId, Arc<Vec<u8>>>) {
        if let Ok(got) = self.fetch.join() {
            for (id, raw) in got {
                blocks.insert(id, raw);
            }
        }
    }
}

/// A snapshot read at any byte offset.
pub struct SnapshotReader {
    repo: Arc<Repository>,
    snapshot: SnapshotId,
    size_bytes: u64,
    block_size: u64,
    range_blocks: u64,
    chain: Vec<Arc<Snapshot>>,
    /// Ranges that may hold data, ascending; the others are all zero.
    ranges: Vec<u64>,
    located: Mutex<Lru<u64, Arc<Vec<Located>>>>,
    cache: Mutex<BlockCache>,
}

/// Holds a mutex whose data is only ever a cache of verified copies: a
/// poisoned one is still valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SnapshotReader {
    /// Opens snapshot `id`: every manifest page of its chain is read once
    /// to learn which ranges hold data; blocks are located as reads need
    /// them.
    pub fn open(repo: Arc<Repository>, snapshot: SnapshotId) -> Result<SnapshotReader, RepoError> {
        let (chain, ranges, size_bytes, block_size, range_blocks) = {
            let mut reader = repo.chain_reader(snapshot)?;
            if reader.block_size() == 0 {
                return Err(RepoError::Invalid(format!(
                    "snapshot {snapshot}: block size 0"
                )));
            }
            reader.survey(|_| {})?;
            (
                reader.shared_chain(),
                reader.nonempty_ranges().to_vec(),
                reader.disk_size_bytes(),
                reader.block_size() as u64,
                reader.range_blocks(),
            )
        };
        Ok(SnapshotReader {
            repo,
            snapshot,
            size_bytes,
            block_size,
            range_blocks,
            chain,
            ranges,
            located: Mutex::new(Lru::new(CACHE_RANGES)),
            cache: Mutex::new(BlockCache {
                blocks: Lru::new(CACHE_BLOCKS),
                next_index: u64::MAX,
                frontier: 0,
                pending: None,
            }),
        })
    }

    pub fn snapshot_id(&self) -> SnapshotId {
        self.snapshot
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Blocks per manifest range.
    pub fn range_blocks(&self) -> u64 {
        self.range_blocks
    }

    /// Whether range `r` may hold data (the others are all zero).
    pub fn range_has_data(&self, r: u64) -> bool {
        self.ranges.binary_search(&r).is_ok()
    }

    /// The first range after `r` that may hold data.
    pub fn next_range_with_data(&self, r: u64) -> Option<u64> {
        let p = self.ranges.partition_point(|x| *x <= r);
        self.ranges.get(p).copied()
    }

    /// Data blocks the catalog cannot locate (every range is located once,
    /// one at a time); reads touching them fail.
    pub fn count_missing(&self) -> Result<u64, RepoError> {
        let mut reader = ChainReader::shared(&self.repo, self.chain.clone())?;
        let locate = BlockReader::new(&self.repo);
        let mut missing = 0u64;
        for m in &mut reader {
            let m = m?;
            missing += locate
                .locate(&m.data)?
                .iter()
                .filter(|b| b.location.is_none())
                .count() as u64;
        }
        Ok(missing)
    }

    /// The data blocks of range `r`, located (location `None`: the catalog
    /// does not know the block, reads of it fail).
    pub fn range(&self, r: u64) -> Result<Arc<Vec<Located>>, RepoError> {
        if !self.range_has_data(r) {
            return Ok(Arc::new(Vec::new()));
        }
        if let Some(list) = lock(&self.located).get(&r) {
            return Ok(list);
        }
        let mut reader = ChainReader::shared(&self.repo, self.chain.clone())?;
        let m = reader.range(r)?;
        let list = Arc::new(BlockReader::new(&self.repo).locate(&m.data)?);
        lock(&self.located).insert(r, list.clone());
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

    fn in_snapshot(&self, cause: RepoError) -> RepoError {
        RepoError::InSnapshot {
            snapshot: self.snapshot,
            cause: Box::new(cause),
        }
    }

    /// The verified content of each of `wanted`, from the cache or the
    /// packs. Blocks the read `[offset, end)` covers only in part are kept
    /// in the cache (those are likely asked for again soon; large reads
    /// then leave the cache alone), and so are blocks read ahead.
    fn contents(
        &self,
        wanted: &[Located],
        offset: u64,
        end: u64,
    ) -> Result<Vec<Arc<Vec<u8>>>, RepoError> {
        let bs = self.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let (mut got, sequential): (Vec<Option<Arc<Vec<u8>>>>, bool) = {
            let mut cache = lock(&self.cache);
            let sequential = cache.next_index == first || cache.next_index == first + 1;
            cache.next_index = end.div_ceil(bs);
            if !sequential {
                cache.frontier = last;
            }
            let mut got: Vec<_> = wanted.iter().map(|b| cache.blocks.get(&b.block)).collect();
            // Blocks being fetched ahead: wait for them rather than fetch
            // them twice.
            let covered = |p: &Prefetch| {
                wanted
                    .iter()
                    .zip(&got)
                    .any(|(b, g)| g.is_none() && b.index >= p.first && b.index <= p.last)
            };
            if cache.pending.as_ref().is_some_and(covered) {
                if let Some(p) = cache.pending.take() {
                    p.land(&mut cache.blocks);
                }
                got = wanted.iter().map(|b| cache.blocks.get(&b.block)).collect();
            }
            (got, sequential)
        };
        if sequential {
            self.read_ahead(last);
        }
        let todo: Vec<Located> = wanted
            .iter()
            .zip(&got)
            .filter(|(_, g)| g.is_none())
            .map(|(b, _)| *b)
            .collect();
        if todo.is_empty() {
            return Ok(got.into_iter().map(|g| g.expect("all cached")).collect());
        }
        let mut order: Vec<usize> = (0..todo.len()).collect();
        order.sort_by_key(|&k| todo[k].block);
        order.dedup_by_key(|k| todo[*k].block);
        let unique: Vec<Located> = order.iter().map(|&k| todo[k]).collect();
        let mut fetched: HashMap<BlockId, Arc<Vec<u8>>> = HashMap::new();
        let reader = BlockReader::new(&self.repo);
        for (b, raw) in unique.iter().zip(reader.read(&unique)) {
            match raw {
                Ok(raw) => {
                    fetched.insert(b.block, Arc::new(raw));
                }
                Err(e) => return Err(self.in_snapshot(e.into())),
            }
        }
        {
            let mut cache = lock(&self.cache);
            for b in wanted {
                let start = b.index * bs;
                let partial = offset > start || end < (start + bs).min(self.size_bytes);
                if partial {
                    if let Some(raw) = fetched.get(&b.block) {
                        cache.blocks.insert(b.block, raw.clone());
                    }
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
                g.ok_or_else(|| RepoError::Invalid("block vanished between lookup and read".into()))
            })
            .collect()
    }

    /// Starts fetching, on another thread, the window after the furthest
    /// block fetched for a sequential reader now at block `last`, unless a
    /// window is in flight or a whole window is fetched ahead already.
    fn read_ahead(&self, last: u64) {
        let blocks_total = self.size_bytes.div_ceil(self.block_size);
        let (from, to) = {
            let cache = lock(&self.cache);
            if cache.pending.is_some() || cache.frontier >= last + READ_AHEAD_BLOCKS {
                return;
            }
            let from = cache.frontier.max(last) + 1;
            (from, (from + READ_AHEAD_BLOCKS).min(blocks_total))
        };
        if from >= to {
            return;
        }
        let Ok(list) = self.blocks_between(from, to - 1) else {
            return;
        };
        let mut cache = lock(&self.cache);
        let list: Vec<Located> = list
            .into_iter()
            .filter(|b| !cache.blocks.entries.contains_key(&b.block))
            .collect();
        cache.frontier = to - 1;
        if list.is_empty() {
            return;
        }
        let repo = self.repo.clone();
        let spawned = std::thread::Builder::new()
            .name("cbtvault-ahead".into())
            .spawn(move || {
                let reader = BlockReader::new(&repo);
                list.iter()
                    .zip(reader.read(&list))
                    .filter_map(|(b, r)| r.ok().map(|raw| (b.block, Arc::new(raw))))
                    .collect()
            });
        if let Ok(fetch) = spawned {
            cache.pending = Some(Prefetch {
                first: from,
                last: to - 1,
                fetch,
            });
        }
    }

    /// Fills `buf` with the snapshot's bytes from `offset`. A read past the
    /// end is [`RepoError::Invalid`]; a block that cannot be read fails the
    /// whole read with [`RepoError::InSnapshot`] around the block's
    /// [`ReadError`] (see [`block_error`]).
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), RepoError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.size_bytes)
            .ok_or_else(|| {
                RepoError::Invalid(format!(
                    "read of {} bytes at offset {offset} beyond the end ({} bytes)",
                    buf.len(),
                    self.size_bytes
                ))
            })?;
        buf.fill(0);
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let wanted = self
            .blocks_between(first, last)
            .map_err(|e| self.in_snapshot(e))?;
        for (b, raw) in wanted.iter().zip(self.contents(&wanted, offset, end)?) {
            let start = b.index * bs;
            // A block inherited across a shrink may be longer than its span,
            // a short last block shorter: the rest reads as zeros.
            let span = (self.size_bytes - start).min(bs);
            let valid_end = start + (raw.len() as u64).min(span);
            let (from, to) = (start.max(offset), valid_end.min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&raw[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(())
    }
}

/// The unreadable block behind a failed read, if that is what failed.
pub fn block_error(e: &RepoError) -> Option<&ReadError> {
    match e {
        RepoError::InSnapshot { cause, .. } => block_error(cause),
        RepoError::Read(r) => Some(r),
        _ => None,
    }
}
