//! The backup pipeline: read -> hash (parallel) -> dedup lookup (batched) ->
//! compress and verify (parallel) -> pack writer -> backend, joined by
//! bounded queues so memory stays fixed whatever the disk size. The snapshot
//! object is written last, after every block it names is durable.
//!
//! spec: format-spec/06-ordering.md#backup

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rayon::prelude::*;
use serde::Serialize;

pub mod bitmap;
pub mod plan;
mod sink;

pub use bitmap::BlockBitmap;
pub use plan::{BackupPlan, KnownZero, ParentInfo};

/// A source's allocation map, walked while the backup reads (a full of a
/// large NBD export need not wait for a block status walk of the whole
/// disk before its first read): calls its argument with the byte ranges
/// that may hold data, window by window in ascending order, until the
/// argument returns false or the map ends.
pub type AllocationWalk<'a> = &'a (dyn Fn(&mut OnRanges<'_>) -> Result<(), SourceError> + Sync);

/// What an [`AllocationWalk`] calls with each window's data ranges
/// (offset, length in bytes); it returns whether to go on.
pub type OnRanges<'f> = dyn FnMut(&[(u64, u64)]) -> bool + 'f;

use super::{Body, ChainReader, RepoError, Repository, Snapshot};
use crate::backend::Kind;
use crate::format::snapshot::{block_count, BlockRef, ReadMode, SnapshotMeta};
use crate::format::{BlockId, SnapshotId};
use crate::pack::{looks_incompressible, prepare_block, CompressedBlock, PackWriter, SharedBytes};
use crate::progress::Progress;
use crate::source::{BlockSource, SourceError};
use ::bytes::BytesMut;
use nbd::bytes::is_zero;
use sink::DeltaSink;

/// Pipeline sizing.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Blocks per read batch.
    pub batch_blocks: usize,
    /// Batches in flight between stages.
    pub queue_depth: usize,
    pub compression_level: i32,
    pub pack_size_target_bytes: u64,
    /// Write the data, the manifest pages and the packs' index, but leave
    /// the snapshot object to the caller ([`BackupSummary::pending`] and
    /// [`Repository::commit_snapshot`]): a VM backup commits all its disks
    /// or none. Until then the new data is like an interrupted backup's,
    /// which prune removes.
    pub defer_commit: bool,
}

impl PipelineOptions {
    pub fn from_repo(repo: &Repository) -> Self {
        PipelineOptions {
            batch_blocks: 64,
            queue_depth: 3,
            compression_level: repo.config().compression_level,
            defer_commit: false,
            pack_size_target_bytes: repo.config().pack_size_target_bytes,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    pub snapshot_id: SnapshotId,
    pub parent_id: Option<SnapshotId>,
    #[serde(rename = "backup_set_id")]
    pub backup_set: SnapshotId,
    pub full: bool,
    pub synthetic_full: bool,
    pub new_set_reason: Option<String>,
    /// What changed in the source while it was read (the snapshot may mix
    /// two versions of the disk); empty when nothing did.
    pub source_changed: Vec<String>,
    pub disk_size_bytes: u64,
    pub blocks_read: u64,
    pub blocks_new: u64,
    pub blocks_deduplicated: u64,
    pub blocks_zero: u64,
    pub blocks_changed: u64,
    #[serde(rename = "read_bytes")]
    pub bytes_read: u64,
    #[serde(rename = "stored_bytes")]
    pub bytes_stored: u64,
    pub packs_written: u64,
    #[serde(rename = "duration_seconds")]
    pub seconds: f64,
    /// The snapshot to commit, with `defer_commit` (else committed).
    #[serde(skip)]
    pub pending: Option<Arc<Snapshot>>,
}

struct ReadBatch {
    /// (block index, offset in data, length)
    blocks: Vec<(u64, usize, usize)>,
    /// Per block: None when all zero, else its id and whether it looks
    /// incompressible.
    hashed: Vec<Option<(BlockId, bool)>>,
    data: PooledBuf,
}

/// A read buffer that goes back to its pool when the last block stored
/// from it has been copied into a pack: batches of tens of MiB are reused,
/// not allocated, zeroed and faulted in again for every batch.
struct PooledBuf {
    data: BytesMut,
    home: Sender<BytesMut>,
}

impl PooledBuf {
    /// A buffer of `len` bytes from `pool` (or a new one). Its old contents
    /// are not cleared: every byte is overwritten by the read or the batch
    /// is dropped.
    fn take(pool: &BufPool, len: usize) -> Self {
        let mut data = pool.get();
        if data.len() >= len {
            data.truncate(len);
        } else {
            data.resize(len, 0);
        }
        PooledBuf {
            data,
            home: pool.home.clone(),
        }
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let _ = self.home.try_send(std::mem::take(&mut self.data));
    }
}

/// Reads one batch: the blocks `indices` (ascending), consecutive blocks
/// in one range each, all ranges handed to the source at once.
fn read_batch(
    source: &dyn BlockSource,
    hasher: crate::crypto::BlockHasher,
    block_size: u32,
    indices: &[u64],
    pool: &BufPool,
) -> Result<ReadBatch, SourceError> {
    let size = source.size_bytes();
    let span = |i: u64| (size - i * block_size as u64).min(block_size as u64) as usize;
    let total: usize = indices.iter().map(|i| span(*i)).sum();
    let mut batch = ReadBatch {
        blocks: Vec::with_capacity(indices.len()),
        hashed: Vec::new(),
        data: PooledBuf::take(pool, total),
    };
    // Runs of consecutive blocks: (first block, byte length).
    let mut runs: Vec<(u64, usize)> = Vec::new();
    let mut off = 0usize;
    for &i in indices {
        match runs.last_mut() {
            Some((first, len)) if *first + (*len as u64).div_ceil(block_size as u64) == i => {
                *len += span(i)
            }
            _ => runs.push((i, span(i))),
        }
        batch.blocks.push((i, off, span(i)));
        off += span(i);
    }
    // One piece of the batch buffer per run, handed to the source, which
    // fills them in place; the pieces join back into one buffer in O(1).
    let pieces = nbd::bytes::split(
        std::mem::take(&mut batch.data.data),
        runs.iter().map(|r| r.1),
    );
    let mut reads: Vec<(u64, BytesMut)> = runs
        .iter()
        .zip(pieces)
        .map(|(&(first, _), piece)| (first * block_size as u64, piece))
        .collect();
    let result = source.read_owned(&mut reads);
    batch.data.data = nbd::bytes::join(reads.into_iter().map(|r| r.1));
    result?;
    // Hash, and guess compressibility, on this thread while the bytes are
    // still in cache; the readers take turns, so hashing runs in parallel
    // with the next reads without a thread pool spinning between batches.
    let data = &batch.data.data[..];
    batch.hashed = batch
        .blocks
        .iter()
        .map(|&(_, off, len)| {
            let raw = &data[off..off + len];
            (!is_zero(raw)).then(|| (hasher.id(raw), looks_incompressible(raw)))
        })
        .collect();
    Ok(batch)
}

/// Read buffers for reuse. Memory the process has not touched yet costs
/// a page fault and a kernel zeroing per 4 KiB page (measured: 40% of a
/// small incremental's CPU when every batch had a fresh buffer), so once
/// `cap` buffers exist a reader waits for one to come back rather than
/// allocating another. The wait is bounded: past [`POOL_WAIT`] a new
/// buffer is allocated anyway, so no arrangement of the stages can
/// deadlock on the pool.
struct BufPool {
    home: Sender<BytesMut>,
    spare: Receiver<BytesMut>,
    made: std::sync::atomic::AtomicUsize,
    cap: usize,
    wait: Duration,
}

/// Read buffers a backup allocates before it waits for returned ones: as
/// many as its stages can hold at once (each reader one in hand and one
/// queued, the processor one, the writer's queue and the writer one each),
/// so waiting never slows a backup whose buffers all come back.
fn pool_fresh(queue_depth: usize) -> usize {
    READERS * (1 + queue_depth.div_ceil(READERS)) + queue_depth + 2
}

/// Blocks in a batch at least (unless the caller asks for fewer).
const MIN_BATCH: usize = 16;

/// Blocks per read batch for a backup that reads `planned` blocks with
/// `fresh` buffers ([`pool_fresh`]), at most `most`: small enough that the
/// buffers it allocates are at most an eighth of what it reads, so a small
/// incremental reuses its buffers rather than faulting in fresh memory for
/// each batch (measured on a 2% incremental of 4 GiB: page faults 12,000 ->
/// 6,000, CPU time 110 -> 95 ms); a backup reading more than about 400 MiB
/// keeps the caller's batch.
fn batch_for(planned: u64, fresh: usize, most: usize) -> usize {
    let fit = usize::try_from(planned / (8 * fresh as u64)).unwrap_or(usize::MAX);
    fit.max(MIN_BATCH).min(most).max(1)
}

/// Longest a reader waits for a buffer to come back to a full pool.
const POOL_WAIT: Duration = Duration::from_millis(50);

impl BufPool {
    /// A pool that allocates up to `cap` buffers before waiting for
    /// returns, and keeps as many returned ones (any made past the cap
    /// after a wait are freed when they come back).
    fn new(cap: usize) -> Self {
        let (home, spare) = bounded::<BytesMut>(cap);
        BufPool {
            home,
            spare,
            made: std::sync::atomic::AtomicUsize::new(0),
            cap,
            wait: POOL_WAIT,
        }
    }

    /// A returned buffer, or a new (empty) one.
    fn get(&self) -> BytesMut {
        use std::sync::atomic::Ordering;
        if let Ok(b) = self.spare.try_recv() {
            return b;
        }
        if self.made.fetch_add(1, Ordering::Relaxed) < self.cap {
            return BytesMut::new();
        }
        self.made.fetch_sub(1, Ordering::Relaxed);
        match self.spare.recv_timeout(self.wait) {
            Ok(b) => b,
            Err(_) => {
                self.made.fetch_add(1, Ordering::Relaxed);
                BytesMut::new()
            }
        }
    }
}

/// A scoped thread with a name (seen in `top -H`, `perf` and panics), so
/// a stage of the pipeline can be told apart from the others. Failing to
/// start a thread is fatal, as for `Scope::spawn`.
fn spawn_named<'scope, 'env, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn_scoped(s, f)
        .expect("start a backup thread")
}

/// Threads reading (and then hashing) batches at once, so the source
/// always has requests in flight while other batches are being hashed.
const READERS: usize = 4;

/// Batches from the reader threads, in the order they were planned (batch
/// k comes from reader k % READERS).
struct InOrder {
    rxs: Vec<Receiver<Result<ReadBatch, SourceError>>>,
    next: usize,
}

impl Iterator for InOrder {
    type Item = Result<ReadBatch, SourceError>;
    fn next(&mut self) -> Option<Self::Item> {
        let item = self.rxs[self.next % self.rxs.len()].recv().ok()?;
        self.next += 1;
        Some(item)
    }
}

/// Packs being written at once: one can be made durable (fsync, rename,
/// catalog rows) while the next one fills.
const PACK_SAVERS: usize = 2;
/// On object storage, where a pack is held in memory and uploaded whole
/// at its commit, up to this many (bounded parallel uploads).
const PACK_SAVERS_REMOTE: usize = 4;
/// A pack goes to its file in chunks of this size while it fills, so the
/// disk works alongside the network and only a chunk per pack is in memory.
const PACK_CHUNK: usize = 4 << 20;
/// Chunk buffers kept for reuse: in the savers' queues, in their hands,
/// and the one being filled.
fn spare_chunks(savers: usize) -> usize {
    savers * (SAVER_QUEUE + 1) + 1
}
/// Chunks queued for each saver.
const SAVER_QUEUE: usize = 2;

struct WriterStats {
    packs: u64,
    /// The packs written, for the backup's index object.
    indexed: Vec<crate::format::index::IndexedPack>,
}

/// What the writer hands to a pack's saver.
enum ToSaver {
    /// The next bytes of the current pack.
    Chunk(crate::pack::PackChunk),
    /// Its last bytes, name and entries.
    Finish(crate::pack::FinishedPack),
}

/// Writes the packs it is handed as their bytes come; when a pack is
/// finished it is made durable first, then its catalog rows are added
/// (spec: 06-ordering), then the dedup stage is told its blocks are indexed.
/// A pack not finished (the writer failed) leaves nothing behind.
fn saver(
    repo: &Repository,
    catalog: &std::sync::Mutex<crate::index::Catalog>,
    rx: Receiver<ToSaver>,
    committed: Sender<Vec<BlockId>>,
    spare: Sender<Vec<u8>>,
) -> Result<Vec<crate::format::index::IndexedPack>, RepoError> {
    let mut packs = Vec::new();
    let mut file: Option<Box<dyn crate::backend::NewObject + '_>> = None;
    for msg in rx {
        let f = match &mut file {
            Some(f) => f,
            None => file.insert(repo.backend().create(Kind::Pack)?),
        };
        #[cfg(debug_assertions)]
        super::test_failpoint("pack_append")?;
        match msg {
            ToSaver::Chunk(chunk) => {
                f.append(chunk.bytes())?;
                let _ = spare.try_send(chunk.into_buffer());
            }
            ToSaver::Finish(done) => {
                f.append(done.tail.bytes())?;
                file.take().expect("open").commit(&done.name.to_hex())?;
                // One connection for all savers: SQLite would make the
                // second writer sleep and poll for the lock instead.
                catalog.lock().expect("catalog").add_pack(
                    &done.name,
                    done.size_bytes,
                    &done.entries,
                )?;
                let _ = committed.send(done.entries.iter().map(|e| e.block_id).collect());
                packs.push(crate::format::index::IndexedPack {
                    name: done.name,
                    size_bytes: done.size_bytes,
                    entries: done.entries,
                    trailer_format: done.trailer_format,
                });
                // Memory stays bounded whatever the disk's size: the packs
                // listed so far go out as an index object of their own.
                if packs.iter().map(|p| p.entries.len()).sum::<usize>()
                    >= crate::repo::INDEX_FLUSH_ENTRIES
                {
                    repo.write_index(std::mem::take(&mut packs))?;
                }
                let _ = spare.try_send(done.tail.into_buffer());
            }
        }
    }
    Ok(packs)
}

fn writer(
    repo: &Repository,
    rx: Receiver<Vec<CompressedBlock>>,
    committed: Sender<Vec<BlockId>>,
    target: u64,
) -> Result<WriterStats, RepoError> {
    let catalog = std::sync::Mutex::new(repo.open_catalog()?);
    let catalog = &catalog;
    // Chunk buffers come back from the savers once written.
    let saver_count = repo
        .backend()
        .parallel_requests()
        .map_or(PACK_SAVERS, |n| n.clamp(PACK_SAVERS, PACK_SAVERS_REMOTE));
    let (spare_tx, spare_rx) = bounded::<Vec<u8>>(spare_chunks(saver_count));
    let fresh = || spare_rx.try_recv().unwrap_or_default();
    // Room for a chunk and one more frame of the largest block, so the
    // staging buffer never moves (and loses its alignment) mid-chunk.
    let room = PACK_CHUNK
        + repo
            .codec()
            .framing()
            .max_stored_length(repo.config().block_size) as usize;
    let next_pack = || PackWriter::with_room(target, fresh(), room, repo.codec());
    std::thread::scope(|s| {
        let mut to_savers = Vec::with_capacity(saver_count);
        let mut savers = Vec::with_capacity(saver_count);
        for _ in 0..saver_count {
            let (tx, rx) = bounded::<ToSaver>(SAVER_QUEUE);
            let committed = committed.clone();
            let spare = spare_tx.clone();
            to_savers.push(tx);
            savers.push(spawn_named(s, "cbt-save", move || {
                saver(repo, catalog, rx, committed, spare)
            }));
        }
        drop(spare_tx);
        // Pack k goes to saver k % saver_count, all its bytes in order.
        let mut k = 0usize;
        let mut pack = next_pack();
        let mut fill = (|| -> Result<bool, RepoError> {
            for blocks in rx {
                // A stop signal: the pack being filled is dropped unfinished
                // (its temporary file removed), nothing more is saved.
                crate::interrupt::check()?;
                for b in &blocks {
                    pack.add(b)?;
                    let msg = if pack.is_full() {
                        let full = std::mem::replace(&mut pack, next_pack());
                        ToSaver::Finish(full.finish()?)
                    } else if pack.staged() >= PACK_CHUNK {
                        ToSaver::Chunk(pack.take_chunk(fresh(), room))
                    } else {
                        continue;
                    };
                    let last = matches!(msg, ToSaver::Finish(_));
                    if to_savers[k % saver_count].send(msg).is_err() {
                        // That saver failed; its error is reported below.
                        return Ok(false);
                    }
                    k += usize::from(last);
                }
            }
            Ok(true)
        })();
        if let Ok(true) = fill {
            if !pack.is_empty() {
                match pack.finish() {
                    Ok(done) => {
                        let _ = to_savers[k % saver_count].send(ToSaver::Finish(done));
                    }
                    Err(e) => fill = Err(e.into()),
                }
            }
        }
        drop(to_savers);
        let mut stats = WriterStats {
            packs: 0,
            indexed: Vec::new(),
        };
        let mut first_err = fill.err();
        for h in savers {
            match h.join().expect("pack saver panicked") {
                Ok(written) => {
                    stats.packs += written.len() as u64;
                    stats.indexed.extend(written);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    })
}

#[derive(Default)]
struct Counters {
    blocks_read: u64,
    blocks_new: u64,
    blocks_zero: u64,
    bytes_read: u64,
    bytes_stored: u64,
}

/// Runs a backup of `source` according to `plan` and commits the snapshot.
pub fn run(
    repo: &Repository,
    source: &dyn BlockSource,
    plan: BackupPlan,
    options: &PipelineOptions,
    progress: &dyn Progress,
    walk: Option<AllocationWalk<'_>>,
) -> Result<BackupSummary, RepoError> {
    let started = Instant::now();
    if walk.is_some() != plan.streamed
        || (plan.streamed && (plan.read.is_some() || plan.parent.is_some()))
    {
        return Err(RepoError::Invalid(
            "a backup plan and its allocation walk disagree; nothing was read".into(),
        ));
    }
    let block_size = repo.config().block_size;
    let disk_size = source.size_bytes();
    let blocks = block_count(disk_size, block_size);
    for b in [&plan.read, &plan.change_bitmap].into_iter().flatten() {
        if b.blocks() != blocks {
            return Err(RepoError::Invalid(format!(
                "block bitmap of {} blocks does not fit '{}' ({disk_size} bytes, {blocks} blocks)",
                b.blocks(),
                source.identity()
            )));
        }
    }
    // A streamed plan's total is known when its walk ends.
    if !plan.streamed {
        let read_total = match &plan.read {
            Some(b) => b.iter().map(|i| span_len(disk_size, block_size, i)).sum(),
            None => disk_size,
        };
        progress.set_total(read_total);
    }

    let mut plan = plan;
    let parent_chain = plan.parent.as_mut().map(|p| std::mem::take(&mut p.chain));
    let parent_reader = match parent_chain {
        Some(chain) => Some(ChainReader::new(repo, chain)?),
        None => None,
    };
    let has_parent = parent_reader.is_some();
    // The manifest, written page by page as the blocks go by.
    let mut sink = DeltaSink::new(
        repo,
        blocks,
        parent_reader,
        plan.synthetic_full,
        plan.change_bitmap.as_ref(),
        plan.known_zero,
        plan.read.as_ref(),
    );

    let (write_tx, write_rx) = bounded::<Vec<CompressedBlock>>(options.queue_depth);
    let (done_tx, done_rx) = unbounded::<Vec<BlockId>>();

    let mut counters = Counters::default();

    // Set when the processing ends: a walk still going stops.
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let fresh = pool_fresh(options.queue_depth);
    let pool = BufPool::new(fresh);
    let batch_blocks = batch_for(
        plan.read.as_ref().map_or(blocks, BlockBitmap::count),
        fresh,
        options.batch_blocks,
    );
    let (process_result, writer_result, planned) = std::thread::scope(|s| {
        let changed = plan.read.as_ref();
        let mut plan_txs = Vec::new();
        let mut read_rxs = Vec::new();
        for _ in 0..READERS {
            let (plan_tx, plan_rx) = bounded::<Vec<u64>>(1);
            let (read_tx, read_rx) =
                bounded::<Result<ReadBatch, SourceError>>(options.queue_depth.div_ceil(READERS));
            plan_txs.push(plan_tx);
            read_rxs.push(read_rx);
            let pool = &pool;
            let hasher = repo.codec().hasher();
            spawn_named(s, "cbt-read", move || {
                for indices in plan_rx {
                    let batch = read_batch(source, hasher, block_size, &indices, pool);
                    let failed = batch.is_err();
                    if read_tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            });
        }
        let stopped = &stopped;
        let plan = move || -> Result<Option<(BlockBitmap, bool)>, RepoError> {
            let mut k = 0;
            let mut send = |indices: Vec<u64>| {
                k += 1;
                plan_txs[(k - 1) % READERS].send(indices).is_ok()
            };
            let Some(walk) = walk else {
                let mut all = 0..blocks;
                let mut marked = changed.map(BlockBitmap::iter);
                let it: &mut dyn Iterator<Item = u64> = match marked.as_mut() {
                    Some(m) => m,
                    None => &mut all,
                };
                loop {
                    let indices: Vec<u64> = (&mut *it).take(batch_blocks).collect();
                    if indices.is_empty() || !send(indices) {
                        return Ok(None);
                    }
                }
            };
            // Blocks are planned as the walk names them, in ascending order;
            // a block named twice (two ranges sharing it) is planned once. A
            // walk that goes back to a block it passed without naming it is
            // an error: that block is already counted as zero.
            let mut read = BlockBitmap::empty(blocks);
            let mut batch = Vec::with_capacity(batch_blocks);
            let mut next = 0u64;
            let mut total = 0u64;
            let mut open = true;
            let mut interrupted = None;
            let mut backwards = None;
            walk(&mut |ranges| {
                // A map with long stretches of holes sends nothing for a
                // while: the pipeline's end and stop signals are checked
                // here too.
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    open = false;
                    return false;
                }
                if let Err(e) = crate::interrupt::check() {
                    interrupted = Some(e);
                    open = false;
                    return false;
                }
                for &(offset, len) in ranges {
                    if len == 0 || blocks == 0 || offset >= disk_size {
                        continue;
                    }
                    let start = offset / block_size as u64;
                    let last =
                        ((offset.saturating_add(len) - 1) / block_size as u64).min(blocks - 1);
                    if (start..next.min(last + 1)).any(|b| !read.is_set(b)) {
                        backwards = Some(offset);
                        open = false;
                        return false;
                    }
                    let first = start.max(next);
                    for b in first..=last {
                        read.set(b);
                        total += span_len(disk_size, block_size, b);
                        batch.push(b);
                        if batch.len() == batch_blocks && !send(std::mem::take(&mut batch)) {
                            open = false;
                            return false;
                        }
                    }
                    next = next.max(last + 1);
                }
                true
            })?;
            if let Some(e) = interrupted {
                return Err(e.into());
            }
            if let Some(offset) = backwards {
                return Err(SourceError::Invalid {
                source_name: source.identity().to_string(),
                reason: format!(
                    "the allocation map went back to byte {offset}, past blocks it had not named; nothing committed"
                ),
            }
            .into());
            }
            if open {
                progress.set_total(total);
                if !batch.is_empty() {
                    open = send(batch);
                }
            }
            Ok(Some((read, open)))
        };
        let planner = spawn_named(s, "cbt-plan", plan);
        let read_rx = InOrder {
            rxs: read_rxs,
            next: 0,
        };
        let writer_handle = spawn_named(s, "cbt-write", move || {
            writer(repo, write_rx, done_tx, options.pack_size_target_bytes)
        });
        let process_result = (|| -> Result<(), RepoError> {
            let catalog = repo.open_catalog()?;
            // More connections for the dedup lookups of large batches: a
            // catalog bigger than the page cache answers each new block
            // with a random read, and several in flight overlap.
            let mut lookers: Vec<crate::index::Catalog> = (1..LOOKUP_CONNECTIONS)
                .map_while(|_| {
                    let c = repo.open_catalog().ok()?;
                    c.set_cache_kib(LOOKUP_CACHE_KIB).ok()?;
                    Some(c)
                })
                .collect();
            // Blocks handed to the writer but not yet in the catalog.
            let mut pending: HashSet<BlockId> = HashSet::new();
            for batch in read_rx {
                #[cfg(debug_assertions)]
                crate::repo::test_delay("backup_batch");
                // Check point: a stop signal ends the run here, before the
                // commit (the writer stops on its own check).
                crate::interrupt::check()?;
                let batch = batch?;
                let blocks = batch.blocks;
                let hashed = batch.hashed;
                let shared: SharedBytes = Arc::new(batch.data);
                let data: &[u8] = (*shared).as_ref();
                for ids in done_rx.try_iter() {
                    for id in ids {
                        pending.remove(&id);
                    }
                }
                let mut candidates: Vec<(usize, BlockId)> = Vec::new();
                for (k, (&(index, _, len), id)) in blocks.iter().zip(&hashed).enumerate() {
                    counters.blocks_read += 1;
                    counters.bytes_read += len as u64;
                    let before = if has_parent {
                        sink.parent_get(index)?
                    } else {
                        None
                    };
                    match id {
                        None => {
                            counters.blocks_zero += 1;
                            if before.is_some() {
                                sink.push(index, BlockRef::Zero)?;
                            }
                        }
                        Some((id, _)) => {
                            if before != Some(*id) {
                                sink.push(index, BlockRef::Data(*id))?;
                                if !pending.contains(id) {
                                    candidates.push((k, *id));
                                }
                            }
                        }
                    }
                }
                let ids: Vec<BlockId> = candidates.iter().map(|c| c.1).collect();
                let known = contains_intact(&catalog, &mut lookers, &ids)?; // spec: 04-catalog.md#damaged
                let mut to_store: Vec<(usize, BlockId)> = Vec::new();
                for ((k, id), known) in candidates.into_iter().zip(known) {
                    if !known && pending.insert(id) {
                        to_store.push((k, id));
                    }
                }
                if !to_store.is_empty() {
                    let level = options.compression_level;
                    let prepare = |&(k, id): &(usize, BlockId)| {
                        let (_, off, len) = blocks[k];
                        let incompressible = hashed[k].is_some_and(|h| h.1);
                        prepare_block(&shared, off..off + len, id, level, incompressible)
                    };
                    // Raw blocks cost nothing to prepare: wake the pool only
                    // when something is to be compressed.
                    let compressed: Result<Vec<CompressedBlock>, _> = if to_store
                        .iter()
                        .all(|&(k, _)| hashed[k].is_some_and(|h| h.1))
                    {
                        to_store.iter().map(prepare).collect()
                    } else {
                        to_store.par_iter().map(prepare).collect()
                    };
                    let compressed = compressed?;
                    counters.blocks_new += compressed.len() as u64;
                    counters.bytes_stored += compressed
                        .iter()
                        .map(|c| c.stored_length() as u64)
                        .sum::<u64>();
                    // Test hook: between the catalog lookups and the pack
                    // writes (two backups that overlap here both store a
                    // block).
                    #[cfg(debug_assertions)]
                    crate::repo::test_delay("backup_deduped");
                    if write_tx.send(compressed).is_err() {
                        // The writer stopped; its error is reported below.
                        return Ok(());
                    }
                }
                progress.advance(data.len() as u64);
            }
            Ok(())
        })();
        stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(write_tx);
        let writer_result = writer_handle.join().expect("pack writer panicked");
        let planned = planner.join().expect("backup planner panicked");
        (process_result, writer_result, planned)
    });
    // A failed walk of the allocation map ended the reads early: its error
    // is the cause of whatever else stopped.
    let walked = planned?;
    process_result?;
    let mut stats = writer_result?;
    let walked = match walked {
        Some((read, true)) => Some(read),
        Some((_, false)) => {
            return Err(RepoError::Invalid(format!(
                "the backup of '{}' stopped before the source's allocation map was read to its end; nothing committed",
                source.identity()
            )))
        }
        None => None,
    };
    let planned = walked
        .as_ref()
        .or(plan.read.as_ref())
        .map(BlockBitmap::count)
        .unwrap_or(blocks);
    if counters.blocks_read != planned {
        return Err(RepoError::Invalid(format!(
            "read {} blocks but {planned} were planned; nothing committed",
            counters.blocks_read
        )));
    }
    // The last pages (blocks known to be zero without reading get a zero
    // entry where the parent had data). Blocks beyond the new end are
    // dropped by resolution; the delta is complete for every block read.
    let (table, blocks_changed) = sink.finish()?;
    if walked.is_some() {
        plan.read = walked;
    }
    let id = SnapshotId(rand::random());
    let (parent, backup_set) = match &plan.parent {
        None => (None, id),
        Some(p) if plan.synthetic_full => (None, p.meta.backup_set),
        Some(p) => (Some(p.meta.id), p.meta.backup_set),
    };
    let meta = SnapshotMeta {
        id,
        generation: 0,
        time: Utc::now(),
        hostname: plan.hostname.clone(),
        source: source.identity().to_string(),
        disk_size_bytes: disk_size,
        block_size,
        parent,
        backup_set,
        tags: plan.tags.clone(),
        landmark: plan.landmark.clone(),
        // Blocks left unread because the source's layout says they are
        // zero (holes, NBD base:allocation) still count as read in full.
        read_mode: if plan.change_bitmap.is_some() {
            ReadMode::ChangedBlocks
        } else {
            ReadMode::All
        },
        new_set_reason: plan.new_set_reason.clone(),
    };
    let obj = Snapshot {
        meta,
        body: Body::Paged(table),
    };
    // After the last read, before the commit: a source that changed while
    // it was read may have given a torn disk.
    let source_changed = source.check_unchanged()?;
    if plan.strict && !source_changed.is_empty() {
        return Err(SourceError::Changed {
            source_name: source.identity().to_string(),
            changes: source_changed,
        }
        .into());
    }
    // The packs' index object, then the snapshot (06-ordering.md#backup).
    repo.write_index(std::mem::take(&mut stats.indexed))?;
    let pending = if options.defer_commit {
        Some(Arc::new(obj))
    } else {
        repo.commit_snapshot(&obj)?;
        None
    };
    let blocks_deduplicated = counters.blocks_read - counters.blocks_zero - counters.blocks_new;
    // Zero blocks: those read as zeros and those the plan knew were zero
    // (holes, NBD zero extents) without reading.
    let blocks_zero = counters.blocks_zero + plan.known_zero_count();
    Ok(BackupSummary {
        snapshot_id: id,
        parent_id: parent,
        backup_set,
        full: plan.parent.is_none(),
        synthetic_full: plan.parent.is_some() && plan.synthetic_full,
        new_set_reason: plan.new_set_reason,
        source_changed,
        disk_size_bytes: disk_size,
        blocks_read: counters.blocks_read,
        blocks_new: counters.blocks_new,
        blocks_deduplicated,
        blocks_zero,
        blocks_changed,
        bytes_read: counters.bytes_read,
        bytes_stored: counters.bytes_stored,
        packs_written: stats.packs,
        seconds: started.elapsed().as_secs_f64(),
        pending,
    })
}

fn span_len(disk_size: u64, block_size: u32, index: u64) -> u64 {
    (disk_size.saturating_sub(index * block_size as u64)).min(block_size as u64)
}

/// Connections the dedup lookups of one backup use at most.
const LOOKUP_CONNECTIONS: usize = 4;
/// SQLite page cache of each extra lookup connection, in KiB.
const LOOKUP_CACHE_KIB: i64 = 16 << 10;
/// Ids per connection below which a batch is looked up on one.
const LOOKUP_SPLIT_MIN: usize = 16;

/// [`crate::index::Catalog::contains_intact_many`] for `ids`, split over
/// `main` and `more` connections on as many threads when the batch is
/// large enough; the answers come back in the order of `ids`.
fn contains_intact(
    main: &crate::index::Catalog,
    more: &mut [crate::index::Catalog],
    ids: &[BlockId],
) -> Result<Vec<bool>, RepoError> {
    let parts = (ids.len() / LOOKUP_SPLIT_MIN).clamp(1, more.len() + 1);
    if parts == 1 {
        return Ok(main.contains_intact_many(ids)?);
    }
    let per = ids.len().div_ceil(parts);
    let mut chunks = ids.chunks(per);
    let first = chunks.next().unwrap_or_default();
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .zip(more.iter_mut())
            .map(|(chunk, conn)| {
                spawn_named(s, "cbt-lookup", move || conn.contains_intact_many(chunk))
            })
            .collect();
        let mut out = main.contains_intact_many(first)?;
        for h in handles {
            match h.join() {
                Ok(r) => out.extend(r?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod lookup_tests {
    use super::*;
    use crate::format::pack::TrailerEntry;
    use crate::index::Catalog;

    /// A batch split over four connections answers exactly as one
    /// connection does, in the order asked.
    #[test]
    fn split_lookups_answer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let mut main = Catalog::open(&path, "repo").unwrap().0;
        let id = |k: u32| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&k.to_be_bytes());
            b[31] = 7;
            BlockId(b)
        };
        let stored: Vec<TrailerEntry> = (0..200u32)
            .filter(|k| k % 3 == 0)
            .map(|k| TrailerEntry {
                block_id: id(k),
                offset: k as u64 * 100,
                stored_length: 10,
                raw_length: 20,
            })
            .collect();
        main.add_pack(&crate::format::ObjectName([1; 32]), 1 << 20, &stored)
            .unwrap();
        let mut more: Vec<Catalog> = (0..3)
            .map(|_| Catalog::reopen(&path, "repo").unwrap())
            .collect();
        // Reversed, so the answer order is not the key order.
        let ids: Vec<BlockId> = (0..200u32).rev().map(id).collect();
        let split = contains_intact(&main, &mut more, &ids).unwrap();
        assert_eq!(split, main.contains_intact_many(&ids).unwrap());
        let want: Vec<bool> = (0..200u32).rev().map(|k| k % 3 == 0).collect();
        assert_eq!(split, want);
        // Small batches stay on one connection and answer the same.
        assert_eq!(
            contains_intact(&main, &mut more, &ids[..5]).unwrap(),
            want[..5].to_vec()
        );
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    /// A full keeps the caller's batch; a small incremental gets batches
    /// small enough to reuse its buffers; a caller asking for fewer blocks
    /// (concurrent backups) is never overruled; the batch is never zero.
    #[test]
    fn batches_fit_what_is_read() {
        let fresh = pool_fresh(3);
        assert_eq!(fresh, 13);
        assert_eq!(batch_for(65536, fresh, 64), 64);
        assert_eq!(batch_for(1310, fresh, 64), MIN_BATCH);
        assert_eq!(batch_for(8 * 13 * 40, fresh, 64), 40);
        assert_eq!(batch_for(0, fresh, 64), MIN_BATCH);
        assert_eq!(batch_for(1 << 40, fresh, 8), 8);
        assert_eq!(batch_for(10, fresh, 0), 1);
    }

    /// Returned buffers are reused (capacity kept); at the cap a reader
    /// waits for a return, and when none comes it allocates anyway rather
    /// than wait for ever.
    #[test]
    fn the_pool_reuses_waits_at_its_cap_and_never_deadlocks() {
        let mut pool = BufPool::new(2);
        pool.wait = Duration::from_millis(20);
        let a = PooledBuf::take(&pool, 1000);
        let b = PooledBuf::take(&pool, 1000);
        assert_eq!(pool.made.load(std::sync::atomic::Ordering::Relaxed), 2);
        // At the cap, nothing returned: a new buffer after the wait.
        let started = Instant::now();
        let c = PooledBuf::take(&pool, 1000);
        assert!(started.elapsed() >= pool.wait);
        assert_eq!(pool.made.load(std::sync::atomic::Ordering::Relaxed), 3);
        // A return is taken at once, with its memory.
        let at = a.data.as_ptr();
        drop(a);
        let started = Instant::now();
        let again = PooledBuf::take(&pool, 500);
        assert!(started.elapsed() < pool.wait);
        assert_eq!(again.data.as_ptr(), at);
        assert_eq!(again.data.len(), 500);
        // A buffer returned while a reader waits at the cap ends its wait
        // (a wait long enough that only the return can end it).
        pool.wait = Duration::from_secs(10);
        let b_at = b.data.as_ptr();
        let pool = &pool;
        std::thread::scope(|s| {
            let waiter = s.spawn(move || PooledBuf::take(pool, 1000));
            std::thread::sleep(Duration::from_millis(5));
            drop(b);
            let got = waiter.join().unwrap();
            assert_eq!(got.data.as_ptr(), b_at);
            assert_eq!(got.data.len(), 1000);
        });
        drop((c, again));
    }
}
