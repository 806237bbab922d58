//! Packs in motion: compressing and verifying blocks, assembling a pack in
//! memory up to its target size, and reading one blob back with its hash
//! re-verified. Owns no storage and no catalog; callers hand bytes to the
//! backend and rows to the index.
//!
//! spec: format-spec/02-pack.md

use crate::format::pack::{self as layout, TrailerEntry};
use crate::format::{BlockId, ObjectName};

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("block {block}: compression failed: {reason}")]
    Compress { block: BlockId, reason: String },
    #[error(
        "block {block}: written bytes do not read back to the same hash (verify before write)"
    )]
    VerifyBeforeWrite { block: BlockId },
    #[error("block {block} in pack {pack}: {reason}; run 'cbtvault check --read-data'")]
    Corrupt {
        block: BlockId,
        pack: ObjectName,
        reason: String,
    },
}

/// A block ready to go into a pack: its zstd frame, verified.
#[derive(Debug, Clone)]
pub struct CompressedBlock {
    pub id: BlockId,
    pub raw_length: u32,
    pub frame: Vec<u8>,
}

/// Compresses `raw` (whose BLAKE3 is `id`) into one zstd frame and checks
/// that the frame decompresses back to the same bytes (verify before write).
pub fn compress_block(raw: &[u8], id: BlockId, level: i32) -> Result<CompressedBlock, PackError> {
    let frame = with_compressor(level, |c| c.compress(raw)).map_err(|e| PackError::Compress {
        block: id,
        reason: e.to_string(),
    })?;
    let back = with_decompressor(|d| d.decompress(&frame, raw.len()))
        .map_err(|_| PackError::VerifyBeforeWrite { block: id })?;
    // `raw` hashed to `id` (the caller's hash of the bytes read), so a frame
    // that decompresses to exactly `raw` decompresses to `id`: comparing the
    // bytes proves it at a fraction of a second hash's cost.
    if back != raw {
        return Err(PackError::VerifyBeforeWrite { block: id });
    }
    if frame.len() as u64 > layout::max_stored_length(raw.len() as u32) as u64 {
        return Err(PackError::Compress {
            block: id,
            reason: "frame larger than the format allows".into(),
        });
    }
    Ok(CompressedBlock {
        id,
        raw_length: raw.len() as u32,
        frame,
    })
}

/// Decompresses one stored blob and checks its hash. Never returns bytes
/// whose BLAKE3 differs from `id`.
pub fn decompress_verified(
    frame: &[u8],
    raw_length: u32,
    id: BlockId,
    pack: ObjectName,
) -> Result<Vec<u8>, PackError> {
    let corrupt = |reason: String| PackError::Corrupt {
        block: id,
        pack,
        reason,
    };
    let raw = with_decompressor(|d| d.decompress(frame, raw_length as usize))
        .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
    if raw.len() != raw_length as usize {
        return Err(corrupt(format!(
            "decompressed to {} bytes, expected {raw_length}",
            raw.len()
        )));
    }
    if BlockId::of(&raw) != id {
        return Err(corrupt("content does not match its hash".into()));
    }
    Ok(raw)
}

thread_local! {
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

/// A pack being assembled in memory.
pub struct PackWriter {
    bytes: Vec<u8>,
    entries: Vec<TrailerEntry>,
    target_bytes: u64,
}

/// A finished pack: its name and bytes, ready to save.
pub struct FinishedPack {
    pub name: ObjectName,
    pub bytes: Vec<u8>,
    pub entries: Vec<TrailerEntry>,
}

impl PackWriter {
    pub fn new(target_bytes: u64) -> Self {
        Self::with_buffer(target_bytes, Vec::new())
    }

    /// A writer that assembles into `buffer` (its contents are discarded,
    /// its capacity kept): reusing the buffer of a saved pack spares the
    /// page faults and zeroing of a fresh tens-of-MiB allocation.
    pub fn with_buffer(target_bytes: u64, mut buffer: Vec<u8>) -> Self {
        let bytes = {
            buffer.clear();
            let want = (target_bytes as usize).min(64 << 20) + (1 << 20);
            buffer.reserve(want);
            buffer.extend_from_slice(&layout::encode_header());
            buffer
        };
        PackWriter {
            bytes,
            entries: Vec::new(),
            target_bytes,
        }
    }

    pub fn add(&mut self, block: &CompressedBlock) {
        self.entries.push(TrailerEntry {
            block_id: block.id,
            offset: self.bytes.len() as u64,
            stored_length: block.frame.len() as u32,
            raw_length: block.raw_length,
        });
        self.bytes.extend_from_slice(&block.frame);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True once the pack has reached its target size (or the entry limit).
    pub fn is_full(&self) -> bool {
        self.bytes.len() as u64 >= self.target_bytes
            || self.entries.len() >= layout::MAX_ENTRIES as usize
    }

    pub fn finish(mut self) -> FinishedPack {
        let trailer = layout::encode_trailer(&self.entries);
        self.bytes.extend_from_slice(&trailer);
        FinishedPack {
            name: ObjectName::of(&self.bytes),
            bytes: self.bytes,
            entries: self.entries,
        }
    }
}
