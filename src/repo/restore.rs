//! The one coalescing restore path: a resolved block map is streamed in
//! block order into a sink (file, block device, stdout; later XenServer and
//! NBD). Packs are read in coalesced ranges, blobs decompressed and verified
//! in parallel, and written in order by a separate thread; memory is bounded
//! by the read-ahead depth. No block whose hash mismatches is ever emitted.

use std::time::Instant;

use serde::Serialize;

use super::read::BlockReader;
use super::{RepoError, Repository};
use crate::format::SnapshotId;
use crate::manifest::BlockMap;
use crate::progress::Progress;

/// Where restored bytes go. Calls come in ascending offset order and cover
/// the disk exactly once.
pub trait BlockSink: Send {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// `len` zero bytes at `offset`.
    fn write_zeros(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Flushes and makes the result durable where that applies.
    fn finish(&mut self) -> std::io::Result<()>;
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreSummary {
    pub snapshot_id: SnapshotId,
    pub disk_size_bytes: u64,
    pub blocks_data: u64,
    pub blocks_zero: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// Streams the disk described by `map` into `sink`, verifying every block.
pub fn run(
    repo: &Repository,
    snapshot: SnapshotId,
    map: &BlockMap,
    sink: &mut dyn BlockSink,
    progress: &dyn Progress,
) -> Result<RestoreSummary, RepoError> {
    let started = Instant::now();
    let disk = map.disk_size_bytes;
    let bs = map.block_size as u64;
    progress.set_total(disk);
    let io = |what: &str, source| RepoError::Io {
        what: format!("restore of snapshot {snapshot}: {what}"),
        source,
    };
    for &(index, _) in &map.data {
        if index >= map.block_count() {
            return Err(RepoError::Invalid(format!(
                "snapshot {snapshot}: block {index} beyond the disk"
            )));
        }
    }
    let mut next = 0u64;
    let mut written = 0u64;
    let mut failed: Option<RepoError> = None;
    let read_result = BlockReader::new(repo).stream(&map.data, |chunk| {
        for (block, raw) in chunk {
            let raw = match raw {
                Ok(raw) => raw,
                Err(e) => {
                    failed = Some(RepoError::InSnapshot {
                        snapshot,
                        cause: Box::new(e.into()),
                    });
                    return false;
                }
            };
            let offset = block.index * bs;
            if offset > next {
                if let Err(e) = sink.write_zeros(next, offset - next) {
                    failed = Some(io("write zeros", e));
                    return false;
                }
                progress.advance(offset - next);
            }
            // A block inherited across a shrink may be longer than
            // its span: only the part inside the disk is written
            // (spec: 03-snapshot.md#resolution).
            let span = bs.min(disk - offset) as usize;
            let raw = &raw[..raw.len().min(span)];
            if let Err(e) = sink.write_data(offset, raw) {
                failed = Some(io("write", e));
                return false;
            }
            written += raw.len() as u64;
            progress.advance(bs.min(disk - offset));
            // A short final block is padded by the zero run below.
            next = offset + raw.len() as u64;
        }
        true
    });
    read_result.map_err(|e| RepoError::InSnapshot {
        snapshot,
        cause: Box::new(e.into()),
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    if disk > next {
        sink.write_zeros(next, disk - next)
            .map_err(|e| io("write zeros", e))?;
        progress.advance(disk - next);
    }
    sink.finish().map_err(|e| io("finish", e))?;
    Ok(RestoreSummary {
        snapshot_id: snapshot,
        disk_size_bytes: disk,
        blocks_data: map.data.len() as u64,
        blocks_zero: map.block_count() - map.data.len() as u64,
        bytes_written: written,
        seconds: started.elapsed().as_secs_f64(),
    })
}
