//! `copy`: snapshots of one repository into another (either local or on
//! object storage), with their parent chains, sending only the blocks the
//! destination lacks. Every block is read through the source's verifying
//! reader, packed anew for the destination (its own compression level),
//! and the destination's write order holds: packs durable, catalog rows,
//! then the snapshot object (spec: format-spec/06-ordering.md#copy).
//!
//! Idempotent and resumable: a snapshot whose id the destination already
//! holds is skipped, and the packs of an interrupted run are in the
//! destination's catalog (or found there by the next lock's
//! reconciliation), so a rerun sends only what did not arrive.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::read::BlockReader;
use super::{Body, PageWriter, RepoError, Repository, Snapshot};
use crate::format::index::IndexedPack;
use crate::format::snapshot::{BlockRef, COPIED_FROM};
use crate::format::{BlockId, SnapshotId};
use crate::pack::{self, CompressedBlock, PackWriter, SharedBytes};
use crate::progress::Progress;

/// What `copy` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// Snapshots written to the destination, oldest first (chains included).
    pub copied_snapshot_ids: Vec<String>,
    /// Snapshots the destination already held (skipped).
    pub present_snapshot_ids: Vec<String>,
    /// Blocks read from the source and written to the destination.
    pub blocks_sent: u64,
    /// Their raw (uncompressed) bytes.
    pub sent_raw_bytes: u64,
    /// Bytes written into the destination's packs.
    pub sent_stored_bytes: u64,
    /// Blocks the destination already held (not sent).
    pub blocks_skipped: u64,
    /// Their raw bytes.
    pub skipped_raw_bytes: u64,
    pub packs_written: u64,
    #[serde(
        rename = "duration_seconds",
        serialize_with = "crate::json::duration_seconds"
    )]
    pub duration: std::time::Duration,
}

/// Copies the snapshots `ids` of `from` (and the ancestors each is layered
/// on) into `to`. The caller holds a shared lock on both.
pub fn copy(
    from: &Repository,
    to: &Repository,
    ids: &[SnapshotId],
    progress: &dyn Progress,
) -> Result<CopyReport, RepoError> {
    let started = Instant::now();
    let (a, b) = (from.config(), to.config());
    if a.block_size != b.block_size {
        return Err(RepoError::Invalid(format!(
            "the repositories have different block sizes ({} and {} bytes): copy needs the same; create the destination with 'cbtvault init --block-size {}'",
            a.block_size, b.block_size, a.block_size
        )));
    }
    if a.id == b.id {
        return Err(RepoError::Invalid(
            "source and destination are the same repository".into(),
        ));
    }
    let present: HashSet<SnapshotId> = to.snapshots()?.iter().map(|s| s.meta.id).collect();
    // The chains, oldest first, each snapshot once (version 2 objects
    // without their pages: those are read range by range).
    let mut order: Vec<Snapshot> = Vec::new();
    let mut queued: HashSet<SnapshotId> = HashSet::new();
    let mut report = CopyReport::default();
    for id in ids {
        for obj in from.load_chain(*id)? {
            if !queued.insert(obj.meta.id) {
                continue;
            }
            if present.contains(&obj.meta.id) {
                report.present_snapshot_ids.push(obj.meta.id.to_hex());
            } else {
                order.push(obj);
            }
        }
    }
    let total: u64 = order.iter().map(Snapshot::entry_count).sum();
    progress.set_message("copying blocks");
    progress.set_total(total);
    for obj in order {
        copy_one(from, to, obj, &mut report, progress)?;
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// One snapshot, range by range: the blocks of each range the
/// destination lacks into new packs and the range's manifest page (block
/// ids translated when the repositories compute them differently,
/// format-spec/09-encryption.md#copy); then, every pack durable, the
/// index objects and the snapshot object. Memory holds one range.
fn copy_one(
    from: &Repository,
    to: &Repository,
    obj: Snapshot,
    report: &mut CopyReport,
    progress: &dyn Progress,
) -> Result<(), RepoError> {
    let translate = from.codec().hasher() != to.codec().hasher();
    let mut packs = Packs::default();
    let mut pages = PageWriter::new(to, obj.has_bitmap());
    let step = pages.page_blocks();
    from.each_range(&obj, step, true, |lo, mut part| {
        progress.advance(part.entries.len() as u64);
        let mut unique: Vec<BlockId> = Vec::new();
        let mut seen = HashSet::new();
        for (_, r) in &part.entries {
            if let BlockRef::Data(id) = r {
                if seen.insert(*id) {
                    unique.push(*id);
                }
            }
        }
        if translate {
            let ids = copy_translated(from, to, &unique, &mut packs, report)?;
            for (_, r) in part.entries.iter_mut() {
                if let BlockRef::Data(id) = r {
                    *id = *ids.get(id).ok_or_else(|| {
                        RepoError::Invalid(format!("copy: block {id} was not read from the source"))
                    })?;
                }
            }
        } else {
            copy_missing(from, to, &unique, &mut packs, report)?;
        }
        pages.add(lo / step, part.entries, part.bitmap)
    })?;
    let indexed = packs.finish(to, report)?;
    let copied = Snapshot {
        meta: obj.meta,
        body: Body::Paged(pages.finish()),
    };
    commit_copy(from, to, copied, indexed, report)
}

/// Sends the blocks of `unique` that the destination lacks (ids the same
/// in both repositories).
fn copy_missing(
    from: &Repository,
    to: &Repository,
    unique: &[BlockId],
    packs: &mut Packs,
    report: &mut CopyReport,
) -> Result<(), RepoError> {
    let mut missing: Vec<BlockId> = Vec::new();
    let mut skipped: Vec<BlockId> = Vec::new();
    for batch in unique.chunks(4096) {
        let have = to.catalog().contains_intact_many(batch)?;
        for (id, has) in batch.iter().zip(have) {
            if has || packs.pending.contains(id) {
                report.blocks_skipped += 1;
                skipped.push(*id);
            } else {
                missing.push(*id);
            }
        }
    }
    // Raw sizes of what is skipped, from the source's catalog.
    for batch in skipped.chunks(4096) {
        for l in from.catalog().lookup_many(batch)?.into_iter().flatten() {
            report.skipped_raw_bytes += l.raw_length as u64;
        }
    }
    let level = to.config().compression_level;
    let mut failure: Option<RepoError> = None;
    let wanted: Vec<(u64, BlockId)> = missing
        .iter()
        .enumerate()
        .map(|(k, id)| (k as u64, *id))
        .collect();
    let stream = BlockReader::new(from).stream(&wanted, |chunk| {
        for (located, result) in chunk {
            let step = (|| -> Result<(), RepoError> {
                crate::interrupt::check()?;
                let raw = result?;
                packs.add(to, prepare(raw, located.block, level)?, report)?;
                #[cfg(debug_assertions)]
                super::test_kill("copy_block");
                Ok(())
            })();
            if let Err(e) = step {
                failure = Some(e);
                return false;
            }
        }
        true
    });
    if let Some(e) = failure {
        return Err(e);
    }
    stream?;
    Ok(())
}

/// Writes the destination's index objects and then the snapshot object:
/// the same snapshot (id, generation, content), marked as a copy so that
/// the destination's retention never touches the source's host-side
/// landmarks.
fn commit_copy(
    from: &Repository,
    to: &Repository,
    mut obj: Snapshot,
    indexed: Vec<IndexedPack>,
    report: &mut CopyReport,
) -> Result<(), RepoError> {
    obj.meta
        .landmark
        .insert(COPIED_FROM.to_string(), from.config().id.clone());
    let id = obj.meta.id;
    to.write_index(indexed)?;
    to.commit_snapshot(&obj)?;
    report.copied_snapshot_ids.push(id.to_hex());
    Ok(())
}

/// Between repositories whose block ids differ: each block of `unique` is
/// read and verified in the source, its destination id computed from its
/// bytes, and stored unless the destination holds it. Returns the source
/// id -> destination id map of the range.
fn copy_translated(
    from: &Repository,
    to: &Repository,
    unique: &[BlockId],
    packs: &mut Packs,
    report: &mut CopyReport,
) -> Result<HashMap<BlockId, BlockId>, RepoError> {
    let level = to.config().compression_level;
    let mut failure: Option<RepoError> = None;
    let mut ids: HashMap<BlockId, BlockId> = HashMap::with_capacity(unique.len());
    let wanted: Vec<(u64, BlockId)> = unique
        .iter()
        .enumerate()
        .map(|(k, id)| (k as u64, *id))
        .collect();
    let stream = BlockReader::new(from).stream(&wanted, |chunk| {
        let step = (|| -> Result<(), RepoError> {
            crate::interrupt::check()?;
            let mut blocks = Vec::with_capacity(chunk.len());
            for (located, result) in chunk {
                let raw = result?;
                blocks.push((located.block, to.codec().block_id(&raw), raw));
            }
            let dst: Vec<BlockId> = blocks.iter().map(|b| b.1).collect();
            let present = to.catalog().contains_intact_many(&dst)?;
            for ((src, dst, raw), has) in blocks.into_iter().zip(present) {
                ids.insert(src, dst);
                if has || packs.pending.contains(&dst) {
                    report.blocks_skipped += 1;
                    report.skipped_raw_bytes += raw.len() as u64;
                    continue;
                }
                packs.add(to, prepare(raw, dst, level)?, report)?;
                #[cfg(debug_assertions)]
                super::test_kill("copy_block");
            }
            Ok(())
        })();
        match step {
            Ok(()) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    stream?;
    Ok(ids)
}

/// A verified block ready for a pack (stored raw when it looks
/// incompressible, else compressed and checked), as a backup prepares it.
fn prepare(raw: Vec<u8>, id: BlockId, level: i32) -> Result<CompressedBlock, RepoError> {
    let incompressible = pack::looks_incompressible(&raw);
    let len = raw.len();
    let shared: SharedBytes = Arc::new(raw);
    Ok(pack::prepare_block(
        &shared,
        0..len,
        id,
        level,
        incompressible,
    )?)
}

/// The destination's pack being filled and the packs written so far.
#[derive(Default)]
struct Packs {
    writer: Option<PackWriter>,
    /// Blocks in the pack being filled (not yet in the catalog).
    pending: HashSet<BlockId>,
    indexed: Vec<IndexedPack>,
}

impl Packs {
    /// Adds a prepared block, writing the pack out once it is full.
    fn add(
        &mut self,
        to: &Repository,
        block: CompressedBlock,
        report: &mut CopyReport,
    ) -> Result<(), RepoError> {
        let target = to.config().pack_size_target_bytes;
        let w = self
            .writer
            .get_or_insert_with(|| PackWriter::new(target, to.codec()));
        w.add(&block)?;
        self.pending.insert(block.id);
        report.blocks_sent += 1;
        report.sent_raw_bytes += block.raw_length as u64;
        if w.is_full() {
            let full = self.writer.take().expect("a writer");
            report.sent_stored_bytes += flush(to, full, &mut self.indexed)?;
            self.pending.clear();
            report.packs_written += 1;
        }
        Ok(())
    }

    /// Writes out the last pack; the packs still to be named by an index
    /// object.
    fn finish(
        mut self,
        to: &Repository,
        report: &mut CopyReport,
    ) -> Result<Vec<IndexedPack>, RepoError> {
        if let Some(w) = self.writer.take() {
            if !w.is_empty() {
                report.sent_stored_bytes += flush(to, w, &mut self.indexed)?;
                report.packs_written += 1;
            }
        }
        Ok(self.indexed)
    }
}

/// Makes a pack durable in `to`, then adds its catalog rows; its size.
/// The pack joins `indexed`, written as an index object when it is large
/// and in any case before the snapshot.
fn flush(
    to: &Repository,
    writer: PackWriter,
    indexed: &mut Vec<IndexedPack>,
) -> Result<u64, RepoError> {
    let done = writer.finish()?;
    to.ensure_lock_held()?;
    let mut object = to.backend().create(crate::backend::Kind::Pack)?;
    object.append(done.tail.bytes())?;
    object.commit(&done.name.to_hex())?;
    #[cfg(debug_assertions)]
    super::test_kill("copy_pack_durable");
    to.catalog()
        .add_pack(&done.name, done.size_bytes, &done.entries)?;
    let size = done.size_bytes;
    indexed.push(IndexedPack {
        name: done.name,
        size_bytes: done.size_bytes,
        entries: done.entries,
        trailer_format: done.trailer_format,
    });
    if indexed.iter().map(|p| p.entries.len()).sum::<usize>() >= super::INDEX_FLUSH_ENTRIES {
        to.write_index(std::mem::take(indexed))?;
    }
    Ok(size)
}

/// Snapshot ids chosen by the user: each query (an id or unique prefix)
/// resolved in `from`, or every live snapshot with `all`.
pub fn select(
    from: &Repository,
    queries: &[String],
    all: bool,
) -> Result<Vec<SnapshotId>, RepoError> {
    if all {
        return Ok(from.snapshots()?.iter().map(|s| s.meta.id).collect());
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for q in queries {
        let e = from.find_snapshot(q)?;
        if seen.insert(e.meta.id) {
            out.push(e.meta.id);
        }
    }
    Ok(out)
}
