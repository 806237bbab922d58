//! The one restore engine: a snapshot's chain, resolved range by range, is
//! streamed in block order
//! into a sink (file, block device, stdout, XenServer import). Blocks come
//! from `read::BlockReader` (coalesced, verified, read ahead in parallel)
//! and are written in order on one thread; memory is bounded by the
//! read-ahead depth. No block whose hash mismatches is ever emitted.
//!
//! The first failure stops the writer at once: nothing is written at or
//! after the failing block, the sink is not finished, and the error says
//! how many bytes (always a prefix `0..n` of the disk) were written. Only
//! with `allow_damaged` is a damaged block zero-filled and listed instead.
//! Knows no concrete target; targets implement [`BlockSink`].

use std::time::Instant;

use serde::Serialize;

use super::read::BlockReader;
use super::{ChainReader, RepoError, Repository};
use crate::format::{BlockId, ObjectName, SnapshotId};
use crate::progress::Progress;

/// Where restored bytes go. Calls come in ascending offset order and cover
/// the disk at most once; after a failure no call follows.
pub trait BlockSink: Send {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// `len` zero bytes at `offset`.
    fn write_zeros(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Flushes and makes the result durable where that applies. Called only
    /// when every block was written.
    fn finish(&mut self) -> std::io::Result<()>;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Zero-fill blocks that are missing or fail verification (listed in
    /// the summary) instead of stopping: salvage.
    pub allow_damaged: bool,
}

/// A block that `allow_damaged` replaced with zeros.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedBlock {
    pub index: u64,
    #[serde(serialize_with = "as_text", rename = "block_id")]
    pub block: BlockId,
    /// The pack the catalog placed it in (`None`: in no pack).
    #[serde(serialize_with = "as_text_or_null")]
    pub pack: Option<ObjectName>,
    pub reason: String,
}

fn as_text<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn as_text_or_null<T: std::fmt::Display, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreSummary {
    pub snapshot_id: SnapshotId,
    pub disk_size_bytes: u64,
    pub blocks_data: u64,
    pub blocks_zero: u64,
    #[serde(rename = "written_bytes")]
    pub bytes_written: u64,
    #[serde(rename = "duration_seconds")]
    pub seconds: f64,
    /// Blocks zero-filled under `allow_damaged`; empty for a clean restore.
    pub damaged_blocks: Vec<DamagedBlock>,
}

/// A restore that stopped. Bytes `0..written_bytes` of the disk went to
/// the sink (verified, in order); nothing at or after that offset did,
/// except when `target_failed`: then the write that failed may have left
/// part of its bytes from `written_bytes` on.
#[derive(Debug, thiserror::Error)]
#[error("{cause}")]
pub struct RestoreError {
    pub snapshot: SnapshotId,
    pub written_bytes: u64,
    pub target_failed: bool,
    pub cause: Box<RepoError>,
}

/// Streams the disk `reader` resolves into `sink`, verifying every block.
/// Every page of the chain is read and every range resolved once before
/// the first byte is written ([`ChainReader::survey`]); then the ranges
/// are resolved again one at a time as the blocks stream, so memory holds
/// one range and the read-ahead whatever the disk size.
pub fn run(
    repo: &Repository,
    mut reader: ChainReader<'_>,
    sink: &mut dyn BlockSink,
    options: RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let snapshot = reader.id();
    let disk = reader.disk_size_bytes();
    let bs = reader.block_size() as u64;
    let stopped = |written_bytes: u64, cause: RepoError| RestoreError {
        snapshot,
        written_bytes,
        target_failed: matches!(cause, RepoError::Io { .. }),
        cause: Box::new(cause),
    };
    let in_snapshot = |e: RepoError| RepoError::InSnapshot {
        snapshot,
        cause: Box::new(e),
    };
    let io = |what: &str, source| RepoError::Io {
        what: format!("restore of snapshot {snapshot}: {what}"),
        source,
    };
    // The whole map is checked before the first byte is written.
    if bs == 0 {
        return Err(stopped(
            0,
            in_snapshot(RepoError::Invalid("block size 0".into())),
        ));
    }
    let count = reader.block_count();
    let data_blocks = reader.survey(|_| {}).map_err(|e| stopped(0, e))?;
    progress.set_total(disk);
    // Everything before `next` has been written.
    let mut next = 0u64;
    let mut written = 0u64;
    let mut damaged: Vec<DamagedBlock> = Vec::new();
    let mut failed: Option<RepoError> = None;
    let parts = (&mut reader).map(|r| r.map(|m| m.data));
    let read_result = BlockReader::new(repo).stream_parts(parts, |chunk| {
        #[cfg(debug_assertions)]
        super::test_delay("restore_chunk");
        // Check point: a stop signal ends the restore before this chunk;
        // the target is not finished (a file target removes its
        // temporary file).
        if let Err(e) = crate::interrupt::check() {
            failed = Some(e.into());
            return false;
        }
        for (block, raw) in chunk {
            let offset = block.index * bs;
            let span = bs.min(disk - offset);
            let raw = match raw {
                Ok(raw) => Some(raw),
                Err(e) if options.allow_damaged && e.block().is_some() => {
                    let (index, block, pack) = e.block().expect("checked");
                    damaged.push(DamagedBlock {
                        index,
                        block,
                        pack,
                        reason: e.to_string(),
                    });
                    None
                }
                Err(e) => {
                    failed = Some(in_snapshot(e.into()));
                    return false;
                }
            };
            if offset > next {
                if let Err(e) = sink.write_zeros(next, offset - next) {
                    failed = Some(io("write zeros", e));
                    return false;
                }
                progress.advance(offset - next);
                next = offset;
            }
            let end = match raw {
                Some(raw) => {
                    // A block inherited across a shrink may be longer than
                    // its span: only the part inside the disk is written
                    // (spec: 03-snapshot.md#resolution). A short final
                    // block is padded by the zero run at the end.
                    let raw = &raw[..raw.len().min(span as usize)];
                    if let Err(e) = sink.write_data(offset, raw) {
                        failed = Some(io("write", e));
                        return false;
                    }
                    written += raw.len() as u64;
                    offset + raw.len() as u64
                }
                None => {
                    if let Err(e) = sink.write_zeros(offset, span) {
                        failed = Some(io("write zeros", e));
                        return false;
                    }
                    offset + span
                }
            };
            progress.advance(span);
            next = end;
        }
        true
    });
    if let Err(e) = read_result {
        let e = match e {
            e @ RepoError::InSnapshot { .. } => e,
            e => in_snapshot(e),
        };
        return Err(stopped(next, e));
    }
    if let Some(e) = failed {
        return Err(stopped(next, e));
    }
    if let Err(e) = crate::interrupt::check() {
        return Err(stopped(next, e.into()));
    }
    if disk > next {
        sink.write_zeros(next, disk - next)
            .map_err(|e| stopped(next, io("write zeros", e)))?;
        progress.advance(disk - next);
    }
    sink.finish().map_err(|e| stopped(disk, io("finish", e)))?;
    Ok(RestoreSummary {
        snapshot_id: snapshot,
        disk_size_bytes: disk,
        blocks_data: data_blocks,
        blocks_zero: count - data_blocks,
        bytes_written: written,
        seconds: started.elapsed().as_secs_f64(),
        damaged_blocks: damaged,
    })
}

/// For callers that only want the cause.
impl From<RestoreError> for RepoError {
    fn from(e: RestoreError) -> RepoError {
        *e.cause
    }
}
