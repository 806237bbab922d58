//! The one coalescing restore path: a resolved block map is streamed in
//! block order into a sink (file, block device, stdout; later XenServer and
//! NBD). Packs are read in coalesced ranges, blobs decompressed and verified
//! in parallel, and written in order by a separate thread; memory is bounded
//! by the read-ahead depth. No block whose hash mismatches is ever emitted.

use std::time::Instant;

use crossbeam_channel::bounded;
use rayon::prelude::*;
use serde::Serialize;

use super::{RepoError, Repository};
use crate::backend::Kind;
use crate::format::{BlockId, ObjectName, SnapshotId};
use crate::index::BlockLocation;
use crate::manifest::BlockMap;
use crate::pack::decompress_verified;
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

/// Read-ahead: blocks per chunk and chunks in flight.
const CHUNK_BLOCKS: usize = 64;
const CHUNKS_IN_FLIGHT: usize = 4;
/// Largest single range read from a pack.
const MAX_RANGE_BYTES: u64 = 8 << 20;

/// Fetches, decompresses and verifies the blocks of one chunk.
fn fetch_chunk(
    repo: &Repository,
    snapshot: SnapshotId,
    chunk: &[(u64, BlockId)],
    locations: &[Option<BlockLocation>],
) -> Result<Vec<Vec<u8>>, RepoError> {
    // Group by pack, then coalesce adjacent blobs into ranges.
    let mut order: Vec<usize> = (0..chunk.len()).collect();
    let loc = |k: usize| -> Result<BlockLocation, RepoError> {
        locations[k].ok_or(RepoError::BlockMissing {
            snapshot,
            index: chunk[k].0,
            block: chunk[k].1,
        })
    };
    for k in 0..chunk.len() {
        loc(k)?;
    }
    order.sort_by_key(|&k| {
        let l = locations[k].expect("checked");
        (l.pack, l.offset)
    });
    let mut ranges: Vec<(ObjectName, u64, u64, Vec<usize>)> = Vec::new();
    for k in order {
        let l = locations[k].expect("checked");
        if let Some((pack, start, end, members)) = ranges.last_mut() {
            if *pack == l.pack
                && l.offset >= *end
                && l.offset - *end < 4096
                && l.offset + l.stored_length as u64 - *start <= MAX_RANGE_BYTES
            {
                *end = l.offset + l.stored_length as u64;
                members.push(k);
                continue;
            }
        }
        ranges.push((l.pack, l.offset, l.offset + l.stored_length as u64, vec![k]));
    }
    // Ranges are read in parallel, then every blob is decompressed and
    // verified in parallel, whatever range it came from (a chunk of a full
    // snapshot is often one range).
    let bufs: Vec<Vec<u8>> = ranges
        .par_iter()
        .map(|(pack, start, end, _)| {
            let mut buf = vec![0u8; (end - start) as usize];
            repo.backend()
                .load_into(Kind::Pack, &pack.to_hex(), *start, &mut buf)
                .map_err(|e| RepoError::InSnapshot {
                    snapshot,
                    cause: Box::new(e.into()),
                })?;
            Ok(buf)
        })
        .collect::<Result<_, RepoError>>()?;
    let members: Vec<(usize, usize)> = ranges
        .iter()
        .enumerate()
        .flat_map(|(r, range)| range.3.iter().map(move |&k| (r, k)))
        .collect();
    let pieces: Result<Vec<(usize, Vec<u8>)>, RepoError> = members
        .par_iter()
        .map(|&(r, k)| {
            let (pack, start, _, _) = &ranges[r];
            let l = locations[k].expect("checked");
            let rel = (l.offset - start) as usize;
            let frame = &bufs[r][rel..rel + l.stored_length as usize];
            decompress_verified(frame, l.raw_length, chunk[k].1, *pack)
                .map(|raw| (k, raw))
                .map_err(|e| RepoError::InSnapshot {
                    snapshot,
                    cause: Box::new(RepoError::Pack(e)),
                })
        })
        .collect();
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); chunk.len()];
    for (k, raw) in pieces? {
        out[k] = raw;
    }
    Ok(out)
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
    // Validate every block fits its span before writing anything.
    let (tx, rx) = bounded::<Vec<(u64, Vec<u8>)>>(CHUNKS_IN_FLIGHT);
    let (fetch_result, write_result) = std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<u64, RepoError> {
            let mut next = 0u64;
            let mut written = 0u64;
            for chunk in rx {
                for (index, raw) in chunk {
                    let offset = index * bs;
                    if offset > next {
                        sink.write_zeros(next, offset - next)
                            .map_err(|e| io("write zeros", e))?;
                        progress.advance(offset - next);
                    }
                    // A block inherited across a shrink may be longer than
                    // its span: only the part inside the disk is written
                    // (spec: 03-snapshot.md#resolution).
                    let span = bs.min(disk - offset) as usize;
                    let raw = &raw[..raw.len().min(span)];
                    sink.write_data(offset, raw).map_err(|e| io("write", e))?;
                    written += raw.len() as u64;
                    progress.advance(bs.min(disk - offset));
                    // A short final block is padded by the zero run below.
                    next = offset + raw.len() as u64;
                }
            }
            if disk > next {
                sink.write_zeros(next, disk - next)
                    .map_err(|e| io("write zeros", e))?;
                progress.advance(disk - next);
            }
            sink.finish().map_err(|e| io("finish", e))?;
            Ok(written)
        });
        let fetch_result = (|| -> Result<(), RepoError> {
            for chunk in map.data.chunks(CHUNK_BLOCKS) {
                for &(index, _) in chunk {
                    if index >= map.block_count() {
                        return Err(RepoError::Invalid(format!(
                            "snapshot {snapshot}: block {index} beyond the disk"
                        )));
                    }
                }
                let ids: Vec<BlockId> = chunk.iter().map(|c| c.1).collect();
                let locations = repo.catalog().lookup_many(&ids)?;
                let raws = fetch_chunk(repo, snapshot, chunk, &locations)?;
                let items = chunk.iter().map(|c| c.0).zip(raws).collect();
                if tx.send(items).is_err() {
                    return Ok(()); // writer failed; its error wins
                }
            }
            Ok(())
        })();
        drop(tx);
        (
            fetch_result,
            writer.join().expect("restore writer panicked"),
        )
    });
    fetch_result?;
    let written = write_result?;
    Ok(RestoreSummary {
        snapshot_id: snapshot,
        disk_size_bytes: disk,
        blocks_data: map.data.len() as u64,
        blocks_zero: map.block_count() - map.data.len() as u64,
        bytes_written: written,
        seconds: started.elapsed().as_secs_f64(),
    })
}
