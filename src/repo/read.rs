//! The one read path for stored blocks: where a block is (`locate`),
//! coalesced range reads from packs, then every blob decompressed and
//! re-hashed in parallel (DESIGN.md §4 invariant 4). Restore, the NBD
//! export of a snapshot and `check --read-data` all read through here.
//! It returns a result per block, so a caller decides whether one bad block
//! stops it; it never hands out bytes whose BLAKE3 differs from their id.
//! It writes nothing but the catalog's damage records and healed rows,
//! keeps no cache (the NBD export keeps its own); memory is bounded by the
//! ranges of one call, and `stream` holds one step being read (one chunk
//! of `CHUNK_BLOCKS` blocks locally, eight from object storage, whose
//! range requests go to their own thread pool) and at most
//! `CHUNKS_IN_FLIGHT` chunks handed on.
//!
//! Healing (spec: format-spec/04-catalog.md#damaged): a blob that fails
//! verification is recorded in the catalog (`Repository::mark_damaged`),
//! then the block is located again (another reader may have healed it) and,
//! failing that, every other stored copy (`Repository::intact_copies_many`)
//! is read and verified; the first good one is returned and the catalog
//! pointed at it (`Repository::use_copy`). Only when no copy verifies is
//! the block `ReadError::Damaged`. A catalog that cannot record any of this
//! (read-only cache, full disk) costs a notice (`Repository::notice`),
//! never a read: the bytes handed out are verified either way. The catalog
//! mutex is held for single statements only, never across a pack read.

use crossbeam_channel::bounded;
use rayon::prelude::*;
use thiserror::Error;

use super::Repository;
use crate::backend::Kind;
use crate::crypto::Codec;
use crate::format::{pack as layout, BlockId, ObjectName};
use crate::index::{BlockLocation, IndexError};
use crate::pack::{decompress_verified, PackError};

/// Blocks per chunk `stream` hands on, and chunks read ahead.
pub const CHUNK_BLOCKS: usize = 64;
const CHUNKS_IN_FLIGHT: usize = 4;

/// How ranges are cut and read: local storage and object storage differ.
#[derive(Debug, Clone, Copy)]
struct Profile {
    /// Blobs closer than this in a pack are read with one request.
    coalesce_gap: u64,
    /// Largest single range read from a pack.
    max_range: u64,
    /// Chunks `stream` locates and reads at once (their ranges in
    /// parallel).
    chunks_per_step: usize,
    /// Requests in flight (`None`: the CPU pool's threads).
    requests: Option<usize>,
}

const LOCAL: Profile = Profile {
    coalesce_gap: 4096,
    max_range: 8 << 20,
    chunks_per_step: 1,
    requests: None,
};

/// Object storage: a request costs a round trip, so neighbours up to
/// 256 KiB apart share one, ranges are cut at 4 MiB so a full snapshot's
/// contiguous run still spreads over several requests, and eight chunks
/// (32 MiB of disk) are read per step.
fn remote(requests: usize) -> Profile {
    Profile {
        coalesce_gap: 256 << 10,
        max_range: 4 << 20,
        chunks_per_step: 8,
        requests: Some(requests),
    }
}

/// Threads for range requests to object storage, apart from the CPU pool
/// that decompresses and verifies (sized by the first remote reader).
fn io_pool(threads: usize) -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cbtvault-io-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}
/// Ids looked up in the catalog per query.
const LOOKUP_BATCH: usize = 4096;

/// Why one block could not be read. `index` is the caller's: the block's
/// index in the disk for restore and the NBD export, the blob's position in
/// its pack for `check`.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("block {index} ({block}) is not in any pack; run 'cbtvault check'")]
    Missing { index: u64, block: BlockId },
    /// The stored bytes do not decompress to the block's hash.
    #[error(
        "block {index} ({block}) in pack {pack} at offset {offset} is damaged: {reason}; run 'cbtvault check --read-data'"
    )]
    Damaged {
        index: u64,
        block: BlockId,
        pack: ObjectName,
        offset: u64,
        reason: String,
    },
    /// The pack could not be read there (missing, truncated, I/O error).
    #[error(
        "block {index} ({block}): pack {pack} cannot be read at offset {offset}: {reason}; run 'cbtvault check'"
    )]
    Unreadable {
        index: u64,
        block: BlockId,
        pack: ObjectName,
        offset: u64,
        reason: String,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl ReadError {
    /// The block this error is about (`None` for a catalog failure).
    pub fn block(&self) -> Option<(u64, BlockId, Option<ObjectName>)> {
        match self {
            ReadError::Missing { index, block } => Some((*index, *block, None)),
            ReadError::Damaged {
                index, block, pack, ..
            }
            | ReadError::Unreadable {
                index, block, pack, ..
            } => Some((*index, *block, Some(*pack))),
            ReadError::Index(_) => None,
        }
    }
}

/// A block wanted and where it is stored (`None`: in no pack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub index: u64,
    pub block: BlockId,
    pub location: Option<BlockLocation>,
}

/// The verified content of one block, or why there is none.
pub type BlockResult = Result<Vec<u8>, ReadError>;

/// Reads blocks of one repository. Cheap to create; holds no state.
pub struct BlockReader<'r> {
    repo: &'r Repository,
    profile: Profile,
}

impl<'r> BlockReader<'r> {
    pub fn new(repo: &'r Repository) -> Self {
        let profile = match repo.backend().parallel_requests() {
            Some(n) => remote(n),
            None => LOCAL,
        };
        BlockReader { repo, profile }
    }

    /// Where each of `blocks` (index, id) is stored, in the order given.
    /// The only source of locations for every reader.
    pub fn locate(&self, blocks: &[(u64, BlockId)]) -> Result<Vec<Located>, ReadError> {
        let mut out = Vec::with_capacity(blocks.len());
        for batch in blocks.chunks(LOOKUP_BATCH) {
            let ids: Vec<BlockId> = batch.iter().map(|b| b.1).collect();
            let locations = self.repo.catalog().lookup_many(&ids)?;
            out.extend(
                batch
                    .iter()
                    .zip(locations)
                    .map(|(&(index, block), location)| Located {
                        index,
                        block,
                        location,
                    }),
            );
        }
        Ok(out)
    }

    /// Reads `blocks` (neighbours in a pack with one request, ranges and
    /// blobs in parallel) and returns each one's verified content or error,
    /// in the order given.
    pub fn read(&self, blocks: &[Located]) -> Vec<BlockResult> {
        let mut out: Vec<Option<BlockResult>> = (0..blocks.len()).map(|_| None).collect();
        let mut order: Vec<(usize, BlockLocation)> = Vec::with_capacity(blocks.len());
        for (k, b) in blocks.iter().enumerate() {
            match b.location {
                // Lengths are checked before they size a buffer: a damaged
                // catalog must not make a reader allocate gigabytes.
                Some(l)
                    if l.raw_length > layout::MAX_BLOCK_SIZE
                        || l.stored_length
                            > self.repo.codec().framing().max_stored_length(l.raw_length) =>
                {
                    out[k] = Some(Err(ReadError::Damaged {
                        index: b.index,
                        block: b.block,
                        pack: l.pack,
                        offset: l.offset,
                        reason: format!(
                            "the catalog gives implausible lengths (stored {}, raw {})",
                            l.stored_length, l.raw_length
                        ),
                    }))
                }
                Some(l) => order.push((k, l)),
                None => {
                    out[k] = Some(Err(ReadError::Missing {
                        index: b.index,
                        block: b.block,
                    }))
                }
            }
        }
        order.sort_by_key(|(_, l)| (l.pack, l.offset));
        // Neighbouring blobs of one pack: pack, start, end, members.
        let mut ranges: Vec<(ObjectName, u64, u64, Vec<usize>)> = Vec::new();
        for (k, l) in order {
            let blob_end = l.offset + l.stored_length as u64;
            if let Some((pack, start, end, members)) = ranges.last_mut() {
                if *pack == l.pack
                    && l.offset >= *end
                    && l.offset - *end < self.profile.coalesce_gap
                    && blob_end - *start <= self.profile.max_range
                {
                    *end = blob_end;
                    members.push(k);
                    continue;
                }
            }
            ranges.push((l.pack, l.offset, blob_end, vec![k]));
        }
        // Ranges are read in parallel, then every blob is decompressed and
        // verified in parallel, whatever range it came from (a chunk of a
        // full snapshot is often one range).
        let load = || -> Vec<Result<Vec<u8>, String>> {
            ranges
                .par_iter()
                .map(|(pack, start, end, _)| {
                    let mut buf = vec![0u8; (end - start) as usize];
                    self.repo
                        .backend()
                        .load_into(Kind::Pack, &pack.to_hex(), *start, &mut buf)
                        .map(|()| buf)
                        .map_err(|e| e.to_string())
                })
                .collect()
        };
        let bufs = match self.profile.requests.and_then(io_pool) {
            Some(pool) => pool.install(load),
            None => load(),
        };
        let members: Vec<(usize, usize)> = ranges
            .iter()
            .enumerate()
            .flat_map(|(r, range)| range.3.iter().map(move |&k| (r, k)))
            .collect();
        let pieces: Vec<(usize, BlockResult)> = members
            .par_iter()
            .map(|&(r, k)| {
                let b = &blocks[k];
                let l = b.location.expect("only located blocks are in ranges");
                let got = match &bufs[r] {
                    Ok(buf) => verify_blob(self.repo.codec(), b, buf, ranges[r].1),
                    Err(reason) => Err(ReadError::Unreadable {
                        index: b.index,
                        block: b.block,
                        pack: l.pack,
                        offset: l.offset,
                        reason: reason.clone(),
                    }),
                };
                (k, got)
            })
            .collect();
        for (k, got) in pieces {
            out[k] = Some(got);
        }
        let mut out: Vec<BlockResult> = out
            .into_iter()
            .map(|r| r.expect("every block has a result"))
            .collect();
        self.heal(blocks, &mut out);
        out
    }

    /// Replaces every `Damaged` result of `results` (for `blocks`) by the
    /// content of an intact copy when one exists, recording the damage and
    /// pointing the catalog at the copy used.
    // spec: format-spec/04-catalog.md#damaged, format-spec/02-pack.md#duplicates
    fn heal(&self, blocks: &[Located], results: &mut [BlockResult]) {
        // Damaged block id -> the pack and offset of the copy that failed.
        let mut failed: Vec<(BlockId, ObjectName, u64)> = Vec::new();
        for (b, r) in blocks.iter().zip(results.iter()) {
            if let Err(ReadError::Damaged {
                block,
                pack,
                offset,
                reason,
                ..
            }) = r
            {
                if failed.iter().any(|f| f.0 == *block) {
                    continue;
                }
                self.record(block, pack, reason);
                failed.push((b.block, *pack, *offset));
            }
        }
        if failed.is_empty() {
            return;
        }
        let mut healed: Vec<(BlockId, Vec<u8>)> = Vec::new();
        let mut unhealed: Vec<(BlockId, ObjectName, u64)> = Vec::new();
        // First the catalog: another reader may have moved the row already
        // (the NBD export keeps the locations it found when it opened).
        for &(block, pack, offset) in &failed {
            let now = match self.repo.catalog().lookup(&block) {
                Ok(l) => l,
                Err(e) => {
                    self.repo
                        .notice(format!("block {block}: catalog lookup failed: {e}"));
                    None
                }
            };
            match now.filter(|l| (l.pack, l.offset) != (pack, offset)) {
                Some(l) => match self.read_copy(block, l) {
                    Ok(raw) => healed.push((block, raw)),
                    Err(e) => {
                        if let ReadError::Damaged {
                            pack: bad, reason, ..
                        } = &e
                        {
                            self.record(&block, bad, reason);
                        }
                        unhealed.push((block, pack, offset))
                    }
                },
                None => unhealed.push((block, pack, offset)),
            }
        }
        if !unhealed.is_empty() {
            let ids: Vec<BlockId> = unhealed.iter().map(|u| u.0).collect();
            match self.repo.intact_copies_many(&ids) {
                Ok(mut copies) => {
                    for (block, pack, offset) in unhealed {
                        let candidates = copies.remove(&block).unwrap_or_default();
                        for (l, size) in candidates {
                            if (l.pack, l.offset) == (pack, offset) {
                                continue;
                            }
                            match self.read_copy(block, l) {
                                Ok(raw) => {
                                    if let Err(e) = self.repo.use_copy(&block, &l, size) {
                                        self.repo.notice(format!(
                                            "block {block}: the catalog could not be pointed at the intact copy in pack {}: {e}",
                                            l.pack
                                        ));
                                    }
                                    self.repo.notice(format!(
                                        "block {block}: the copy in pack {pack} is damaged; read the intact copy in pack {} instead; run 'cbtvault repair packs' to salvage the damaged pack",
                                        l.pack
                                    ));
                                    healed.push((block, raw));
                                    break;
                                }
                                Err(ReadError::Damaged {
                                    pack: bad, reason, ..
                                }) => self.record(&block, &bad, &reason),
                                Err(_) => {}
                            }
                        }
                    }
                }
                Err(e) => self.repo.notice(format!(
                    "looking for intact copies of damaged blocks failed: {e}"
                )),
            }
        }
        for (b, r) in blocks.iter().zip(results.iter_mut()) {
            if matches!(r, Err(ReadError::Damaged { .. })) {
                if let Some((_, raw)) = healed.iter().find(|h| h.0 == b.block) {
                    *r = Ok(raw.clone());
                }
            }
        }
    }

    /// Records a damaged copy; a catalog that cannot take the record (a
    /// read-only cache, a full disk) is a notice, not a failed read.
    fn record(&self, block: &BlockId, pack: &ObjectName, reason: &str) {
        if let Err(e) = self.repo.mark_damaged(block, pack, reason) {
            self.repo.notice(format!(
                "block {block}: the damage of its copy in pack {pack} could not be recorded in the catalog: {e}"
            ));
        }
    }

    /// Reads and verifies one copy of `block` at `l`.
    fn read_copy(&self, block: BlockId, l: BlockLocation) -> BlockResult {
        let b = Located {
            index: 0,
            block,
            location: Some(l),
        };
        if l.raw_length > layout::MAX_BLOCK_SIZE
            || l.stored_length > self.repo.codec().framing().max_stored_length(l.raw_length)
        {
            return Err(ReadError::Damaged {
                index: 0,
                block,
                pack: l.pack,
                offset: l.offset,
                reason: "implausible lengths".into(),
            });
        }
        let mut buf = vec![0u8; l.stored_length as usize];
        self.repo
            .backend()
            .load_into(Kind::Pack, &l.pack.to_hex(), l.offset, &mut buf)
            .map_err(|e| ReadError::Unreadable {
                index: 0,
                block,
                pack: l.pack,
                offset: l.offset,
                reason: e.to_string(),
            })?;
        verify_blob(self.repo.codec(), &b, &buf, l.offset)
    }

    /// Verifies blobs out of bytes already read from their pack: `buf`
    /// holds the pack from offset `start` (the whole pack for `check`).
    /// Every block's location must name that pack and lie inside `buf`.
    pub fn verify_loaded(&self, blocks: &[Located], start: u64, buf: &[u8]) -> Vec<BlockResult> {
        blocks
            .par_iter()
            .map(|b| verify_blob(self.repo.codec(), b, buf, start))
            .collect()
    }

    /// Every blob of a whole pack, `bytes` as loaded, against its trailer:
    /// (trailer entry, result) per blob in trailer order, for
    /// `check --read-data` and `repair packs`. `Err` when the trailer
    /// itself does not decode (nothing in the pack can be located).
    pub fn verify_pack(
        &self,
        pack: ObjectName,
        bytes: &[u8],
    ) -> Result<Vec<(layout::TrailerEntry, BlockResult)>, crate::format::FormatError> {
        let codec = self.repo.codec();
        let entries = layout::decode_pack_index_framed(
            bytes,
            self.repo.config().block_size,
            codec.framing(),
            |t| codec.open_trailer(t).map_err(|e| e.to_string()),
        )?;
        let blobs: Vec<Located> = entries
            .iter()
            .enumerate()
            .map(|(k, e)| Located {
                index: k as u64,
                block: e.block_id,
                location: Some(BlockLocation {
                    pack,
                    offset: e.offset,
                    stored_length: e.stored_length,
                    raw_length: e.raw_length,
                }),
            })
            .collect();
        let results = self.verify_loaded(&blobs, 0, bytes);
        Ok(entries.into_iter().zip(results).collect())
    }

    /// Reads `blocks` (index, id; ascending index) in chunks of up to
    /// `CHUNK_BLOCKS`, reading ahead while `consume` works on earlier
    /// chunks on its own thread, and hands each chunk to `consume` in
    /// order with one result per block. Stops reading as soon as `consume`
    /// returns false. A catalog failure ends the stream with an error;
    /// chunks after it are never handed on.
    pub fn stream<F>(&self, blocks: &[(u64, BlockId)], consume: F) -> Result<(), ReadError>
    where
        F: FnMut(Vec<(Located, BlockResult)>) -> bool + Send,
    {
        self.stream_parts(std::iter::once(Ok::<_, ReadError>(blocks)), consume)
    }

    /// [`BlockReader::stream`] over blocks that come in parts (e.g. the
    /// ranges of a chain, resolved one at a time): a part is asked for only
    /// when the reader gets to it, so memory holds one part and the
    /// read-ahead. A part that fails ends the stream with its error.
    pub fn stream_parts<P, B, E, F>(&self, parts: P, consume: F) -> Result<(), E>
    where
        P: Iterator<Item = Result<B, E>>,
        B: AsRef<[(u64, BlockId)]>,
        E: From<ReadError>,
        F: FnMut(Vec<(Located, BlockResult)>) -> bool + Send,
    {
        let mut consume = consume;
        let (tx, rx) = bounded::<Vec<(Located, BlockResult)>>(CHUNKS_IN_FLIGHT);
        std::thread::scope(|s| {
            let consumer = s.spawn(move || {
                for chunk in rx {
                    if !consume(chunk) {
                        // Dropping `rx` stops the reader at its next send.
                        return;
                    }
                }
            });
            let read = (|| -> Result<(), E> {
                let step = CHUNK_BLOCKS * self.profile.chunks_per_step;
                for blocks in parts {
                    let blocks = blocks?;
                    for part in blocks.as_ref().chunks(step) {
                        let located = self.locate(part)?;
                        let results = self.read(&located);
                        let mut pairs = located.into_iter().zip(results);
                        loop {
                            let chunk: Vec<_> = pairs.by_ref().take(CHUNK_BLOCKS).collect();
                            if chunk.is_empty() {
                                break;
                            }
                            if tx.send(chunk).is_err() {
                                return Ok(()); // the consumer stopped
                            }
                        }
                    }
                }
                Ok(())
            })();
            drop(tx);
            if let Err(panic) = consumer.join() {
                std::panic::resume_unwind(panic);
            }
            read
        })
    }
}

/// Decompresses and verifies the blob of `b` out of `buf` (pack bytes from
/// offset `start`).
// spec: format-spec/02-pack.md#blobs (a blob read alone), #duplicates (later)
fn verify_blob(codec: &Codec, b: &Located, buf: &[u8], start: u64) -> BlockResult {
    let l = b.location.expect("a located block");
    let damaged = |reason: String| ReadError::Damaged {
        index: b.index,
        block: b.block,
        pack: l.pack,
        offset: l.offset,
        reason,
    };
    let rel = l
        .offset
        .checked_sub(start)
        .map(|r| r as usize)
        .filter(|&r| r + l.stored_length as usize <= buf.len())
        .ok_or_else(|| damaged("the blob lies outside the pack".into()))?;
    let frame = &buf[rel..rel + l.stored_length as usize];
    decompress_verified(codec, frame, l.raw_length, b.block, l.pack).map_err(|e| match e {
        PackError::Corrupt { reason, .. } => damaged(reason),
        other => damaged(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn located(raw: &[u8], offset: u64, stored_length: u32) -> Located {
        Located {
            index: 7,
            block: BlockId::of(raw),
            location: Some(BlockLocation {
                pack: ObjectName::of(b"pack"),
                offset,
                stored_length,
                raw_length: raw.len() as u32,
            }),
        }
    }

    #[test]
    fn blob_verifies_out_of_a_range_that_starts_inside_the_pack() {
        let raw = vec![5u8; 4096];
        let frame = zstd::bulk::compress(&raw, 3).unwrap();
        let mut buf = vec![0xEEu8; 10];
        buf.extend_from_slice(&frame);
        let b = located(&raw, 1000 + 10, frame.len() as u32);
        assert_eq!(verify_blob(&Codec::Plain, &b, &buf, 1000).unwrap(), raw);
    }

    #[test]
    fn catalog_placing_a_blob_outside_the_bytes_read_is_damage_not_a_panic() {
        let raw = vec![5u8; 4096];
        let frame = zstd::bulk::compress(&raw, 3).unwrap();
        for (offset, len) in [(0u64, frame.len() as u32), (1001, frame.len() as u32 + 1)] {
            let b = located(&raw, offset, len);
            match verify_blob(&Codec::Plain, &b, &frame, 1000) {
                Err(ReadError::Damaged { index: 7, .. }) => {}
                other => panic!("expected damage, got {other:?}"),
            }
        }
    }

    #[test]
    fn flipped_byte_is_damage_naming_block_pack_and_offset() {
        let raw = (0..4096u32).map(|i| (i * 7) as u8).collect::<Vec<_>>();
        let mut frame = zstd::bulk::compress(&raw, 3).unwrap();
        let mid = frame.len() / 2;
        frame[mid] ^= 0x40;
        let b = located(&raw, 0, frame.len() as u32);
        match verify_blob(&Codec::Plain, &b, &frame, 0) {
            Err(ReadError::Damaged {
                block,
                pack,
                offset,
                ..
            }) => {
                assert_eq!(block, BlockId::of(&raw));
                assert_eq!(pack, ObjectName::of(b"pack"));
                assert_eq!(offset, 0);
            }
            other => panic!("expected damage, got {other:?}"),
        }
    }
}
