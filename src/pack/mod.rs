//! Packs in motion: compressing and verifying blocks, assembling a pack in
//! memory up to its target size, and reading one blob back with its hash
//! re-verified. Owns no storage and no catalog; callers hand bytes to the
//! backend and rows to the index.
//!
//! spec: format-spec/02-pack.md

use crate::crypto::codec::Expected;
use crate::crypto::Codec;
use crate::format::pack::{self as layout, TrailerEntry};
use crate::format::{raw_frame, BlockId, ObjectName};

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("block {block}: compression failed: {reason}")]
    Compress { block: BlockId, reason: String },
    #[error(
        "block {block}: written bytes do not read back to the same hash (verify before write)"
    )]
    VerifyBeforeWrite { block: BlockId },
    #[error("block {block}: {source}")]
    Seal {
        block: BlockId,
        #[source]
        source: crate::crypto::codec::SealError,
    },
    #[error("pack trailer: {0}")]
    SealTrailer(crate::crypto::codec::SealError),
    #[error(
        "pack trailer about to be written does not list the blobs appended (verify before write)"
    )]
    TrailerMismatch,
    #[error("block {block} in pack {pack}: {reason}; run 'cbtvault check --read-data'")]
    Corrupt {
        block: BlockId,
        pack: ObjectName,
        reason: String,
    },
}

/// Bytes shared between the stage that read them and the pack writer, so an
/// incompressible block reaches its pack with one copy.
pub type SharedBytes = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// How a block will be stored.
pub enum Stored {
    /// A zstd frame from the compressor, verified.
    Frame(Vec<u8>),
    /// Incompressible content, stored as a frame of raw zstd blocks that the
    /// pack writer builds in place from these bytes.
    Raw(SharedBytes, std::ops::Range<usize>),
    /// A blob exactly as another pack of the same repository stores it
    /// (opened and verified by the caller): copied verbatim.
    Verbatim(Vec<u8>),
}

/// Blobs a writer puts in one pack at most, however well they compress: a
/// trailer stays under 1 MiB (40 + 48 x 16384 bytes), so reading, checking
/// and repacking a pack stays cheap. Far below the format's limit
/// (`MAX_ENTRIES`). spec: format-spec/02-pack.md#writing
pub const WRITER_MAX_BLOBS: usize = 16384;
const _: () = assert!(WRITER_MAX_BLOBS <= layout::MAX_ENTRIES as usize);

/// A block ready to go into a pack.
pub struct CompressedBlock {
    pub id: BlockId,
    pub raw_length: u32,
    pub stored: Stored,
}

impl CompressedBlock {
    /// Bytes the block's frame takes (before any sealing).
    pub fn stored_length(&self) -> u32 {
        match &self.stored {
            Stored::Frame(f) | Stored::Verbatim(f) => f.len() as u32,
            Stored::Raw(_, r) => raw_frame::encoded_len(r.len()) as u32,
        }
    }
}

/// Prepares the block `shared[range]` (whose BLAKE3 is `id`) for a pack:
/// stored raw when `incompressible` (the caller's [`looks_incompressible`],
/// taken while the bytes were hot in cache), else compressed and verified
/// ([`compress_block`]).
pub fn prepare_block(
    shared: &SharedBytes,
    range: std::ops::Range<usize>,
    id: BlockId,
    level: i32,
    incompressible: bool,
) -> Result<CompressedBlock, PackError> {
    let raw = &(**shared).as_ref()[range.clone()];
    if incompressible {
        return Ok(CompressedBlock {
            id,
            raw_length: raw.len() as u32,
            stored: Stored::Raw(shared.clone(), range),
        });
    }
    compress_block(raw, id, level)
}

/// Whether zstd's own frame parser agrees that `frame` is one frame of
/// content size `len` and exactly its length (the check of a raw frame,
/// which has nothing to decompress).
fn raw_frame_agrees(frame: &[u8], len: usize) -> bool {
    matches!(zstd::zstd_safe::get_frame_content_size(frame), Ok(Some(n)) if n == len as u64)
        && zstd::zstd_safe::find_frame_compressed_size(frame) == Ok(frame.len())
}

/// Bytes sampled by [`looks_incompressible`], in runs of `SAMPLE_RUN`.
const SAMPLE_BYTES: usize = 8 * 1024;
const SAMPLE_RUN: usize = 256;
/// Order-0 entropy (bits per byte) at or above which a block is stored raw:
/// uniform random bytes measure about 7.98 on an 8 KiB sample, and entropy
/// this high leaves Huffman coding under 1% to gain.
const RAW_ENTROPY_BITS: f64 = 7.93;

/// True when a spread sample of `raw` has byte entropy so close to 8 bits
/// that zstd would spend its time finding nothing (compressed, encrypted or
/// random data). Costs an 8 KiB histogram instead of a compressor pass.
/// A wrong guess costs space, never correctness: either way the block is
/// stored in a zstd frame that decodes to exactly `raw`.
pub fn looks_incompressible(raw: &[u8]) -> bool {
    raw.len() >= 8 * SAMPLE_BYTES && sample_entropy(raw) >= RAW_ENTROPY_BITS
}

/// Order-0 entropy (bits per byte) of [`looks_incompressible`]'s sample:
/// `SAMPLE_BYTES / SAMPLE_RUN` runs spread evenly over `raw` (at least
/// `8 * SAMPLE_BYTES` long).
fn sample_entropy(raw: &[u8]) -> f64 {
    let runs = SAMPLE_BYTES / SAMPLE_RUN;
    let stride = raw.len() / runs;
    // Four interleaved tables, so consecutive equal bytes do not wait on
    // one counter.
    let mut counts = [[0u16; 256]; 4];
    for r in 0..runs {
        for q in raw[r * stride..r * stride + SAMPLE_RUN].chunks_exact(4) {
            counts[0][q[0] as usize] += 1;
            counts[1][q[1] as usize] += 1;
            counts[2][q[2] as usize] += 1;
            counts[3][q[3] as usize] += 1;
        }
    }
    // H = -sum p log2 p = log2 n - (sum c log2 c) / n, with c log2 c from a
    // table: 256 lookups instead of 256 logarithms (which cost more than
    // the histogram itself).
    let table = c_log2_c();
    let [c0, c1, c2, c3] = &counts;
    let sum: f64 = (c0.iter().zip(c1).zip(c2).zip(c3))
        .map(|(((a, b), c), d)| {
            table[usize::from(*a) + usize::from(*b) + usize::from(*c) + usize::from(*d)]
        })
        .sum();
    let n = SAMPLE_BYTES as f64;
    n.log2() - sum / n
}

/// `c * log2(c)` for every count `c` a sample can hold (0 for 0).
fn c_log2_c() -> &'static [f64; SAMPLE_BYTES + 1] {
    static TABLE: std::sync::OnceLock<Box<[f64; SAMPLE_BYTES + 1]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f64; SAMPLE_BYTES + 1]);
        for (c, v) in t.iter_mut().enumerate().skip(1) {
            *v = c as f64 * (c as f64).log2();
        }
        t
    })
}

/// Compresses `raw` (whose BLAKE3 is `id`) into one zstd frame and checks
/// that the frame decompresses back to the same bytes (verify before write).
pub fn compress_block(raw: &[u8], id: BlockId, level: i32) -> Result<CompressedBlock, PackError> {
    // Compressed and decompressed in this thread's scratch buffers; the
    // frame leaves in an allocation of its own size (a very compressible
    // block's frame is a few dozen bytes, where a fresh buffer per block
    // would hold the whole bound and fault in new pages for each).
    let frame = SCRATCH.with(|cell| {
        let (packed, back) = &mut *cell.borrow_mut();
        packed.clear();
        packed.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        with_compressor(level, |c| c.compress_to_buffer(raw, packed)).map_err(|e| {
            PackError::Compress {
                block: id,
                reason: e.to_string(),
            }
        })?;
        back.clear();
        back.reserve(raw.len());
        with_decompressor(|d| d.decompress_to_buffer(&packed[..], back))
            .map_err(|_| PackError::VerifyBeforeWrite { block: id })?;
        // `raw` hashed to `id` (the caller's hash of the bytes read), so a
        // frame that decompresses to exactly `raw` decompresses to `id`:
        // comparing the bytes proves it at a fraction of a second hash's
        // cost.
        if back[..] != *raw {
            return Err(PackError::VerifyBeforeWrite { block: id });
        }
        Ok(packed.to_vec())
    })?;
    if frame.len() as u64 > layout::max_stored_length(raw.len() as u32) as u64 {
        return Err(PackError::Compress {
            block: id,
            reason: "frame larger than the format allows".into(),
        });
    }
    Ok(CompressedBlock {
        id,
        raw_length: raw.len() as u32,
        stored: Stored::Frame(frame),
    })
}

/// Decompresses one stored blob and checks its hash. Never returns bytes
/// whose BLAKE3 differs from `id`.
pub fn decompress_verified(
    codec: &Codec,
    stored: &[u8],
    raw_length: u32,
    id: BlockId,
    pack: ObjectName,
) -> Result<Vec<u8>, PackError> {
    let corrupt = |reason: String| PackError::Corrupt {
        block: id,
        pack,
        reason,
    };
    let raw = codec
        .with_blob(id, stored, |frame| {
            with_decompressor(|d| d.decompress(frame, raw_length as usize))
        })
        .map_err(|e| corrupt(format!("cannot be opened: {e}")))?
        .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
    if raw.len() != raw_length as usize {
        return Err(corrupt(format!(
            "decompressed to {} bytes, expected {raw_length}",
            raw.len()
        )));
    }
    if codec.block_id(&raw) != id {
        return Err(corrupt("content does not match its hash".into()));
    }
    Ok(raw)
}

thread_local! {
    /// [`compress_block`]'s frame and read-back buffers.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    // zstd contexts are costly to set up; one per thread is reused.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        f(&mut slot.as_mut().expect("just set").1)
    })
}

fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        f(slot.as_mut().expect("just set"))
    })
}

/// A pack being assembled. Its bytes are staged in an aligned buffer and
/// taken out in chunks ([`PackWriter::take_chunk`]) while the pack fills,
/// so a pack is written to its file as it grows rather than held whole.
pub struct PackWriter {
    /// `[..start]` is alignment padding; the staged bytes are
    /// `buffer[start..]`, pack bytes from `taken` on.
    buffer: Vec<u8>,
    start: usize,
    /// Pack bytes already taken out in chunks.
    taken: u64,
    entries: Vec<TrailerEntry>,
    target_bytes: u64,
    /// Plain or sealed blobs and trailer.
    codec: Codec,
}

/// Consecutive bytes of a pack: they start at a [`PACK_ALIGN`] boundary in
/// memory (unless the buffer had to grow) and, except for a pack's last
/// chunk, are a multiple of [`PACK_ALIGN`] long.
pub struct PackChunk {
    buffer: Vec<u8>,
    start: usize,
}

impl PackChunk {
    pub fn bytes(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// The buffer, for a later [`PackWriter::with_room`] or
    /// [`PackWriter::take_chunk`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buffer
    }
}

/// A finished pack: its name, its entries, and its last bytes (all of them
/// when no chunk was taken).
pub struct FinishedPack {
    pub name: ObjectName,
    /// The trailer format written (`02-pack.md#trailer`), for index records.
    pub trailer_format: u32,
    pub entries: Vec<TrailerEntry>,
    pub tail: PackChunk,
    pub size_bytes: u64,
}

/// Memory alignment of a pack's first byte, so a backend can hand the
/// buffer to the disk without copying it (O_DIRECT).
pub const PACK_ALIGN: usize = 4096;

/// Staging room beyond what the caller asks for: the alignment padding
/// and the frame header of a raw block.
const STAGING_SLACK: usize = 2 * PACK_ALIGN;

/// Empties `buffer` (keeping its capacity), makes room for `bytes` staged
/// bytes and pads it to an aligned start; returns the start.
fn prepare_staging(buffer: &mut Vec<u8>, bytes: usize) -> usize {
    buffer.clear();
    buffer.reserve(bytes + STAGING_SLACK);
    let start = buffer.as_ptr().align_offset(PACK_ALIGN).min(PACK_ALIGN);
    buffer.resize(start, 0);
    start
}

impl PackWriter {
    /// A writer with room for a whole pack (it need not take chunks).
    pub fn new(target_bytes: u64, codec: &Codec) -> Self {
        let room = (target_bytes as usize).min(64 << 20) + (1 << 20);
        Self::with_room(target_bytes, Vec::new(), room, codec)
    }

    /// A writer that stages into `buffer` (its contents are discarded, its
    /// capacity kept: reusing buffers spares the page faults and zeroing of
    /// fresh allocations), with room for `room` staged bytes. A caller that
    /// takes the pack out in chunks ([`Self::take_chunk`]) asks for a chunk
    /// plus the largest frame it may append after reaching the chunk size,
    /// so the buffer never moves (and loses its alignment).
    pub fn with_room(target_bytes: u64, mut buffer: Vec<u8>, room: usize, codec: &Codec) -> Self {
        let start = prepare_staging(&mut buffer, room);
        let header = layout::encode_header_framed(codec.framing());
        buffer.extend_from_slice(&header);
        PackWriter {
            buffer,
            start,
            taken: 0,
            entries: Vec::new(),
            target_bytes,
            codec: codec.clone(),
        }
    }

    /// Bytes appended and not yet taken out in a chunk.
    pub fn staged(&self) -> usize {
        self.buffer.len() - self.start
    }

    fn len(&self) -> u64 {
        self.taken + self.staged() as u64
    }

    /// Takes the staged bytes, down to a multiple of [`PACK_ALIGN`], out as
    /// a chunk; the rest (less than [`PACK_ALIGN`] bytes) moves to `fresh`,
    /// which becomes the staging buffer with room for `chunk_bytes`.
    pub fn take_chunk(&mut self, fresh: Vec<u8>, chunk_bytes: usize) -> PackChunk {
        let cut = self.staged() / PACK_ALIGN * PACK_ALIGN;
        let mut next = fresh;
        let start = prepare_staging(&mut next, chunk_bytes);
        next.extend_from_slice(&self.buffer[self.start + cut..]);
        self.buffer.truncate(self.start + cut);
        let chunk = PackChunk {
            buffer: std::mem::replace(&mut self.buffer, next),
            start: std::mem::replace(&mut self.start, start),
        };
        self.taken += cut as u64;
        chunk
    }

    /// Appends a block. A raw block's frame is built here, straight into
    /// the pack, and checked: zstd's own frame parser must agree on its
    /// content size and extent, and its content is the hashed bytes copied
    /// verbatim (verify before write for a frame with nothing to decode).
    pub fn add(&mut self, block: &CompressedBlock) -> Result<(), PackError> {
        let at = self.buffer.len();
        let offset = self.len();
        let sealed = self.codec.is_sealed() && !matches!(block.stored, Stored::Verbatim(_));
        // Room for the nonce before the frame.
        let frame_at = if sealed {
            self.buffer.resize(at + crate::crypto::NONCE_LEN, 0);
            at + crate::crypto::NONCE_LEN
        } else {
            at
        };
        match &block.stored {
            Stored::Frame(f) | Stored::Verbatim(f) => self.buffer.extend_from_slice(f),
            Stored::Raw(shared, range) => {
                let raw = &(**shared).as_ref()[range.clone()];
                raw_frame::encode_into(raw, &mut self.buffer);
                let agrees = raw_frame_agrees(&self.buffer[frame_at..], raw.len());
                if !agrees || raw.len() as u32 != block.raw_length {
                    self.buffer.truncate(at);
                    return Err(PackError::VerifyBeforeWrite { block: block.id });
                }
            }
        }
        if sealed {
            // What the opened blob must equal: the frame, or for a raw one
            // the frame of these bytes.
            let expected = match &block.stored {
                Stored::Frame(f) | Stored::Verbatim(f) => Expected::Frame(f),
                Stored::Raw(shared, range) => {
                    Expected::RawFrameOf(&(**shared).as_ref()[range.clone()])
                }
            };
            if let Err(source) = self
                .codec
                .seal_blob(block.id, &mut self.buffer, at, expected)
            {
                self.buffer.truncate(at);
                return Err(PackError::Seal {
                    block: block.id,
                    source,
                });
            }
        }
        self.entries.push(TrailerEntry {
            block_id: block.id,
            offset,
            stored_length: (self.buffer.len() - at) as u32,
            raw_length: block.raw_length,
        });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True once the pack has reached its target size or holds
    /// [`WRITER_MAX_BLOBS`] blobs.
    pub fn is_full(&self) -> bool {
        self.len() >= self.target_bytes || self.entries.len() >= WRITER_MAX_BLOBS
    }

    /// Closes the pack: a trailer format 1 trailer under a fresh random
    /// pack id, the footer, and the name, the BLAKE3 of those tail bytes
    /// (spec: format-spec/02-pack.md#naming).
    pub fn finish(self) -> Result<FinishedPack, PackError> {
        self.finish_with_id(rand::random())
    }

    /// [`Self::finish`] under a given pack id (tests).
    pub fn finish_with_id(
        mut self,
        pack_id: [u8; layout::PACK_ID_LEN],
    ) -> Result<FinishedPack, PackError> {
        let body = layout::encode_trailer_body_named(&self.entries, Some(pack_id));
        let mut tail = self
            .codec
            .seal_trailer(body)
            .map_err(PackError::SealTrailer)?;
        let stored_len = tail.len();
        tail.extend_from_slice(&layout::encode_footer(stored_len as u32));
        let tail_at = self.buffer.len();
        self.buffer.extend_from_slice(&tail);
        let size_bytes = self.len();
        // Verify before write: the tail decodes, as a reader lists it, to
        // the entries appended.
        let listed =
            layout::decode_footer_framed(&tail[stored_len..], size_bytes, self.codec.framing())
                .and_then(|t| {
                    let plain = self.codec.open_trailer(&tail[..t as usize]).map_err(|e| {
                        crate::format::FormatError::invalid("pack trailer", e.to_string())
                    })?;
                    layout::decode_trailer_framed(
                        &plain,
                        t as u64,
                        size_bytes,
                        u32::MAX,
                        self.codec.framing(),
                    )
                });
        if listed.as_deref() != Ok(&self.entries[..]) {
            return Err(PackError::TrailerMismatch);
        }
        let name = ObjectName::of(&self.buffer[tail_at..]);
        Ok(FinishedPack {
            name,
            trailer_format: layout::TRAILER_FORMAT_TAIL,
            entries: self.entries,
            tail: PackChunk {
                buffer: self.buffer,
                start: self.start,
            },
            size_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The table form of the entropy equals the textbook sum.
    #[test]
    fn sample_entropy_is_the_order_0_entropy_of_the_sample() {
        let skewed: Vec<u8> = random(65536, 3).iter().map(|b| b % 37 + b / 200).collect();
        for raw in [random(65536, 9), skewed, vec![5u8; 65536]] {
            let runs = SAMPLE_BYTES / SAMPLE_RUN;
            let stride = raw.len() / runs;
            let mut counts = [0u32; 256];
            for r in 0..runs {
                for b in &raw[r * stride..r * stride + SAMPLE_RUN] {
                    counts[*b as usize] += 1;
                }
            }
            let n = SAMPLE_BYTES as f64;
            let want: f64 = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| -(c as f64 / n) * (c as f64 / n).log2())
                .sum();
            let got = sample_entropy(&raw);
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
    }

    /// The frames written are byte for byte what zstd's one-shot
    /// compression gives at the same level (the scratch buffers change
    /// where the frame is built, not its bytes), also when a thread
    /// compresses blocks of different sizes one after the other.
    #[test]
    fn compressed_frames_are_zstd_one_shot_frames() {
        let text: Vec<u8> = b"cbtvault frames; "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let mut half = random(65536, 11);
        half[20000..].fill(7);
        for raw in [text.clone(), half, text[..1000].to_vec(), vec![0u8; 65536]] {
            for level in [1, 3, 9] {
                let id = BlockId(*blake3::hash(&raw).as_bytes());
                let block = compress_block(&raw, id, level).unwrap();
                let Stored::Frame(frame) = block.stored else {
                    panic!("not a frame");
                };
                assert_eq!(frame, zstd::bulk::compress(&raw, level).unwrap());
                assert_eq!(frame.capacity(), frame.len());
            }
        }
    }

    #[test]
    fn entropy_sample_tells_random_from_compressible() {
        for seed in 1..200 {
            assert!(looks_incompressible(&random(65536, seed)), "seed {seed}");
        }
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        assert!(!looks_incompressible(&text));
        assert!(!looks_incompressible(&[0u8; 65536]));
        // Half random, half zeros compresses about 2:1: not raw.
        let mut half = random(65536, 7);
        half[32768..].fill(0);
        assert!(!looks_incompressible(&half));
        // Too small to judge: always compressed.
        assert!(!looks_incompressible(&random(4096, 3)));
    }

    /// Verify before write, for the tail: a writer whose entries no longer
    /// describe the blobs it appended (here an entry made to run into the
    /// trailer, then one made to overlap its neighbour) refuses to finish
    /// the pack rather than name and hand out bytes a reader would refuse.
    #[test]
    fn writer_refuses_a_tail_that_does_not_list_its_blobs() {
        let rnd = random(65536, 5);
        let other = random(65536, 6);
        let shared: SharedBytes = Arc::new([rnd.clone(), other.clone()].concat());
        let a = prepare_block(&shared, 0..65536, BlockId::of(&rnd), 3, true).unwrap();
        let b = prepare_block(&shared, 65536..131072, BlockId::of(&other), 3, true).unwrap();
        let written = |damage: &dyn Fn(&mut Vec<TrailerEntry>)| {
            let mut w = PackWriter::new(1 << 20, &Codec::Plain);
            w.add(&a).unwrap();
            w.add(&b).unwrap();
            damage(&mut w.entries);
            w.finish()
        };
        assert!(written(&|_| {}).is_ok());
        let past_the_end = written(&|e| e[1].stored_length += 64);
        assert!(
            matches!(past_the_end, Err(PackError::TrailerMismatch)),
            "{:?}",
            past_the_end.err()
        );
        let overlapping = written(&|e| e[1].offset -= 16);
        assert!(
            matches!(overlapping, Err(PackError::TrailerMismatch)),
            "{:?}",
            overlapping.err()
        );
    }

    #[test]
    fn pack_with_raw_and_compressed_blocks_reads_back() {
        let rnd = random(65536, 42);
        let txt = vec![7u8; 65536];
        let shared: SharedBytes = Arc::new([rnd.clone(), txt.clone()].concat());
        let a = prepare_block(&shared, 0..65536, BlockId::of(&rnd), 3, true).unwrap();
        let b = prepare_block(&shared, 65536..131072, BlockId::of(&txt), 3, false).unwrap();
        assert!(matches!(a.stored, Stored::Raw(..)));
        assert!(matches!(b.stored, Stored::Frame(..)));
        assert_eq!(a.stored_length(), 65546);
        let mut w = PackWriter::new(1 << 20, &Codec::Plain);
        w.add(&a).unwrap();
        w.add(&b).unwrap();
        let done = w.finish().unwrap();
        // The name is the one the finished bytes call for (their tail's
        // hash, not the whole file's), and the pack starts at an aligned
        // address.
        let bytes = done.tail.bytes();
        assert_eq!(done.size_bytes, bytes.len() as u64);
        assert_eq!(done.name, name_of(bytes));
        assert_ne!(done.name, ObjectName::of(bytes));
        assert_eq!(bytes.as_ptr().align_offset(PACK_ALIGN), 0);
        let index = layout::decode_pack_index(bytes, 65536).unwrap();
        for (e, want) in index.iter().zip([&rnd, &txt]) {
            let blob = &bytes[e.offset as usize..][..e.stored_length as usize];
            let back =
                decompress_verified(&Codec::Plain, blob, e.raw_length, e.block_id, done.name)
                    .unwrap();
            assert_eq!(&back, want);
        }
        // Reusing the buffer gives the same pack again.
        let again = {
            let mut w =
                PackWriter::with_room(1 << 20, done.tail.into_buffer(), 2 << 20, &Codec::Plain);
            w.add(&a).unwrap();
            w.add(&b).unwrap();
            w.finish().unwrap()
        };
        assert_eq!(again.name, name_of(again.tail.bytes()));
        // The same blobs in the same order: another pack id, another name.
        assert_ne!(again.name, done.name);
        assert_eq!(again.entries, done.entries);
    }

    /// The name a reader expects for plain pack bytes.
    fn name_of(bytes: &[u8]) -> ObjectName {
        layout::name_of_pack(bytes, layout::Framing::PLAIN, |t| {
            Ok(std::borrow::Cow::Borrowed(t))
        })
        .unwrap()
    }

    const ID: [u8; layout::PACK_ID_LEN] = [9; layout::PACK_ID_LEN];

    /// A raw block whose frame does not describe it is refused before a
    /// byte reaches the pack, and the pack (name included) goes on as if
    /// it had never been offered.
    #[test]
    fn a_raw_block_that_fails_verification_leaves_the_pack_untouched() {
        let rnd = random(65536, 9);
        let shared: SharedBytes = Arc::new(rnd.clone());
        let good = prepare_block(&shared, 0..65536, BlockId::of(&rnd), 3, true).unwrap();
        let bad = CompressedBlock {
            raw_length: 65535,
            ..prepare_block(&shared, 0..65536, BlockId::of(&rnd), 3, true).unwrap()
        };
        let mut w = PackWriter::new(1 << 20, &Codec::Plain);
        let staged = w.staged();
        assert!(matches!(
            w.add(&bad),
            Err(PackError::VerifyBeforeWrite { .. })
        ));
        assert_eq!(w.staged(), staged);
        assert!(w.is_empty());
        w.add(&good).unwrap();
        let done = w.finish_with_id(ID).unwrap();
        let mut alone = PackWriter::new(1 << 20, &Codec::Plain);
        alone.add(&good).unwrap();
        let alone = alone.finish_with_id(ID).unwrap();
        assert_eq!(done.tail.bytes(), alone.tail.bytes());
        assert_eq!(done.name, name_of(done.tail.bytes()));
        assert_eq!(done.entries.len(), 1);
    }

    /// A pack taken out in chunks as it fills is byte for byte the pack
    /// assembled whole: same name, same entries, aligned chunks.
    #[test]
    fn pack_taken_in_chunks_equals_the_pack_assembled_whole() {
        let blocks: Vec<(Vec<u8>, bool)> = (0..40u64)
            .map(|k| match k % 3 {
                0 => (random(65536, k + 1), true),
                1 => (vec![k as u8; 65536], false),
                _ => ([random(30000, k), vec![1; 35536]].concat(), false),
            })
            .collect();
        let prepared: Vec<CompressedBlock> = blocks
            .iter()
            .map(|(b, raw)| {
                let shared: SharedBytes = Arc::new(b.clone());
                prepare_block(&shared, 0..b.len(), BlockId::of(b), 3, *raw).unwrap()
            })
            .collect();
        let mut whole = PackWriter::new(64 << 20, &Codec::Plain);
        let mut chunked = PackWriter::with_room(64 << 20, Vec::new(), 512 << 10, &Codec::Plain);
        let mut streamed: Vec<u8> = Vec::new();
        for (k, b) in prepared.iter().enumerate() {
            whole.add(b).unwrap();
            chunked.add(b).unwrap();
            if k % 7 == 6 {
                let c = chunked.take_chunk(Vec::new(), 512 << 10);
                assert_eq!(c.bytes().len() % PACK_ALIGN, 0);
                assert_eq!(c.bytes().as_ptr().align_offset(PACK_ALIGN), 0);
                streamed.extend_from_slice(c.bytes());
            }
        }
        let (whole, chunked) = (
            whole.finish_with_id(ID).unwrap(),
            chunked.finish_with_id(ID).unwrap(),
        );
        streamed.extend_from_slice(chunked.tail.bytes());
        assert_eq!(streamed, whole.tail.bytes());
        assert_eq!(chunked.name, whole.name);
        assert_eq!(chunked.name, name_of(&streamed));
        assert_eq!(chunked.size_bytes, streamed.len() as u64);
        assert_eq!(chunked.entries, whole.entries);
        let index = layout::decode_pack_index(&streamed, 65536).unwrap();
        for (e, (want, _)) in index.iter().zip(&blocks) {
            let blob = &streamed[e.offset as usize..][..e.stored_length as usize];
            let back =
                decompress_verified(&Codec::Plain, blob, e.raw_length, e.block_id, chunked.name)
                    .unwrap();
            assert_eq!(&back, want);
        }
    }

    #[test]
    fn sealed_blocks_round_trip_and_refuse_a_swap_or_the_plain_codec() {
        use crate::crypto::{Keys, MasterSecret};
        let codec = Codec::Sealed(Arc::new(Keys::derive(&MasterSecret([5; 32]))));
        let rnd = random(65536, 3);
        let txt: Vec<u8> = b"abc ".iter().cycle().take(65536).copied().collect();
        let mut both = rnd.clone();
        both.extend_from_slice(&txt);
        let shared: SharedBytes = Arc::new(both);
        let (ia, ib) = (codec.block_id(&rnd), codec.block_id(&txt));
        let a = prepare_block(&shared, 0..65536, ia, 3, true).unwrap();
        let b = prepare_block(&shared, 65536..131072, ib, 3, false).unwrap();
        let mut w = PackWriter::new(1 << 20, &codec);
        w.add(&a).unwrap();
        w.add(&b).unwrap();
        let done = w.finish().unwrap();
        let bytes = done.tail.bytes().to_vec();
        assert_eq!(&bytes[8..12], &2u32.to_le_bytes(), "header version 2");
        let entries = layout::decode_pack_index_framed(&bytes, 65536, codec.framing(), |t| {
            codec.open_trailer(t).map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(entries, done.entries);
        // Named by the sealed trailer and footer; the pack id is inside
        // the seal.
        let open = |t| codec.open_trailer(t).map_err(|e| e.to_string());
        assert_eq!(
            layout::name_of_pack(&bytes, codec.framing(), open).unwrap(),
            done.name
        );
        let footer_at = bytes.len() - layout::FOOTER_LEN;
        let t =
            layout::decode_footer_framed(&bytes[footer_at..], bytes.len() as u64, codec.framing())
                .unwrap() as usize;
        assert_eq!(done.name, ObjectName::of(&bytes[footer_at - t..]));
        let plain = codec
            .open_trailer(&bytes[footer_at - t..footer_at])
            .unwrap();
        assert_eq!(layout::naming(&plain), layout::Naming::Tail);
        assert!(layout::pack_id(&plain).is_some());
        let blob = |e: &TrailerEntry| {
            &bytes[e.offset as usize..(e.offset + e.stored_length as u64) as usize]
        };
        for (e, raw) in entries.iter().zip([&rnd, &txt]) {
            let back =
                decompress_verified(&codec, blob(e), e.raw_length, e.block_id, done.name).unwrap();
            assert_eq!(&back, raw);
        }
        // Blob a presented as block b, or read without the key: refused.
        assert!(decompress_verified(&codec, blob(&entries[0]), 65536, ib, done.name).is_err());
        assert!(
            decompress_verified(&Codec::Plain, blob(&entries[0]), 65536, ia, done.name).is_err()
        );
        // The plain reader refuses the pack (version 2).
        assert!(layout::decode_pack_index(&bytes, 65536).is_err());
    }
}
