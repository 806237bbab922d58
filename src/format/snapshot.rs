//! Snapshot object layout: magic, version, a JSON metadata section and the
//! binary layered manifest (block index -> block id or zero), followed by the
//! change bitmap that produced it, if any. The object's name is the BLAKE3 of
//! its bytes; its stable identity is `meta.id`.
//!
//! spec: format-spec/03-snapshot.md

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{bitmap, BlockId, Cursor, FormatError, SnapshotId};

/// "CBTVSNAP"
pub const MAGIC: [u8; 8] = *b"CBTVSNAP";
pub const VERSION: u32 = 1;
pub const MAX_META_LEN: u32 = 1 << 20;
const KIND_ZERO: u8 = 0;
const KIND_DATA: u8 = 1;

/// What a manifest says about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockRef {
    /// Every byte of the block is zero; nothing is stored.
    Zero,
    Data(BlockId),
}

/// How the blocks of this snapshot were chosen for reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadMode {
    /// Only the blocks a change bitmap (or extent list) marked were read;
    /// the rest is inherited from the parent.
    ChangedBlocks,
    /// Every block was read and compared.
    All,
}

/// Landmark key of a snapshot written by `copy`: the id of the repository
/// it was copied from. Its other landmark keys describe the source
/// repository's host-side state, which this repository's retention never
/// releases (spec: format-spec/03-snapshot.md#copied).
pub const COPIED_FROM: &str = "copied_from";

/// The JSON section of a snapshot object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub id: SnapshotId,
    /// Raised when the object is rewritten (e.g. a parent folded in); the
    /// highest generation of an id is the live one.
    pub generation: u32,
    pub time: DateTime<Utc>,
    pub hostname: String,
    /// Source identity, e.g. `file:/var/lib/images/vm1.img`.
    pub source: String,
    pub disk_size_bytes: u64,
    pub block_size: u32,
    /// The snapshot this manifest is layered on; `None` for a full manifest.
    pub parent: Option<SnapshotId>,
    /// The snapshot that started this backup set (itself for the first).
    pub backup_set: SnapshotId,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Opaque per-source marker for the next incremental.
    #[serde(default)]
    pub landmark: BTreeMap<String, String>,
    pub read_mode: ReadMode,
    /// Why this snapshot started a new backup set, when it did.
    #[serde(default)]
    pub new_set_reason: Option<String>,
}

impl SnapshotMeta {
    pub fn block_count(&self) -> u64 {
        block_count(self.disk_size_bytes, self.block_size)
    }
}

/// Number of blocks covering `disk_size_bytes` (the last may be partial).
pub fn block_count(disk_size_bytes: u64, block_size: u32) -> u64 {
    disk_size_bytes.div_ceil(block_size as u64)
}

/// A decoded snapshot object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotObject {
    pub meta: SnapshotMeta,
    /// Strictly ascending block indices below `meta.block_count()`.
    pub entries: Vec<(u64, BlockRef)>,
    /// Raw (decoded) change bitmap, MSB-first, `ceil(block_count / 8)` bytes.
    pub bitmap: Option<Vec<u8>>,
}

pub fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && (512..=super::pack::MAX_BLOCK_SIZE).contains(&block_size)
}

fn validate(obj: &SnapshotObject) -> Result<(), FormatError> {
    const WHAT: &str = "snapshot";
    if !valid_block_size(obj.meta.block_size) {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "block size {} is not a power of two in 512..=16 MiB",
                obj.meta.block_size
            ),
        ));
    }
    let blocks = obj.meta.block_count();
    let mut prev: Option<u64> = None;
    for (index, _) in &obj.entries {
        if *index >= blocks {
            return Err(FormatError::invalid(
                WHAT,
                format!("block index {index} beyond the disk's {blocks} blocks"),
            ));
        }
        if prev.is_some_and(|p| p >= *index) {
            return Err(FormatError::invalid(
                WHAT,
                format!("block index {index} not in strictly ascending order"),
            ));
        }
        prev = Some(*index);
    }
    if let Some(b) = &obj.bitmap {
        bitmap::validate(b, blocks).map_err(|reason| FormatError::invalid(WHAT, reason))?;
    }
    Ok(())
}

/// Encodes a snapshot object. Fails only if the object breaks a rule a
/// decoder would reject, so nothing undecodable is ever written.
pub fn encode(obj: &SnapshotObject) -> Result<Vec<u8>, FormatError> {
    validate(obj)?;
    let meta = serde_json::to_vec(&obj.meta)
        .map_err(|e| FormatError::invalid("snapshot", format!("metadata: {e}")))?;
    if meta.len() > MAX_META_LEN as usize {
        return Err(FormatError::invalid(
            "snapshot",
            "metadata larger than 1 MiB",
        ));
    }
    let bitmap = obj.bitmap.as_deref().unwrap_or(&[]);
    let mut out = Vec::with_capacity(32 + meta.len() + obj.entries.len() * 41 + bitmap.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&(obj.entries.len() as u64).to_le_bytes());
    for (index, r) in &obj.entries {
        out.extend_from_slice(&index.to_le_bytes());
        match r {
            BlockRef::Zero => out.push(KIND_ZERO),
            BlockRef::Data(id) => {
                out.push(KIND_DATA);
                out.extend_from_slice(&id.0);
            }
        }
    }
    out.extend_from_slice(&(bitmap.len() as u64).to_le_bytes());
    out.extend_from_slice(bitmap);
    Ok(out)
}

/// Decodes only the metadata section (cheap listing).
pub fn decode_meta(bytes: &[u8]) -> Result<SnapshotMeta, FormatError> {
    let mut c = Cursor::new("snapshot", bytes);
    read_meta(&mut c)
}

fn read_meta(c: &mut Cursor<'_>) -> Result<SnapshotMeta, FormatError> {
    if c.array::<8>()? != MAGIC {
        return Err(FormatError::BadMagic { what: "snapshot" });
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: "snapshot",
            version,
        });
    }
    let meta_len = c.u32()?;
    if meta_len > MAX_META_LEN {
        return Err(FormatError::invalid(
            "snapshot",
            format!("metadata length {meta_len} exceeds 1 MiB"),
        ));
    }
    let meta = c.take(meta_len as usize)?;
    let meta: SnapshotMeta = serde_json::from_slice(meta)
        .map_err(|e| FormatError::invalid("snapshot", format!("metadata: {e}")))?;
    if !valid_block_size(meta.block_size) {
        return Err(FormatError::invalid(
            "snapshot",
            format!("block size {} invalid", meta.block_size),
        ));
    }
    Ok(meta)
}

pub fn decode(bytes: &[u8]) -> Result<SnapshotObject, FormatError> {
    let mut c = Cursor::new("snapshot", bytes);
    let meta = read_meta(&mut c)?;
    let count = c.u64()?;
    // Each entry takes at least 9 bytes and there are at most block_count.
    if count > meta.block_count() || count > (c.remaining() / 9) as u64 {
        return Err(FormatError::invalid(
            "snapshot",
            format!("entry count {count} impossible"),
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let index = c.u64()?;
        let r = match c.u8()? {
            KIND_ZERO => BlockRef::Zero,
            KIND_DATA => BlockRef::Data(BlockId(c.array()?)),
            k => {
                return Err(FormatError::invalid(
                    "snapshot",
                    format!("block {index}: unknown entry kind {k}"),
                ))
            }
        };
        entries.push((index, r));
    }
    let bitmap_len = c.u64()?;
    if bitmap_len > c.remaining() as u64 {
        return Err(FormatError::Truncated {
            what: "snapshot bitmap",
            needed: bitmap_len,
            available: c.remaining() as u64,
        });
    }
    let bitmap = match bitmap_len {
        0 => None,
        n => Some(c.take(n as usize)?.to_vec()),
    };
    c.finish()?;
    let obj = SnapshotObject {
        meta,
        entries,
        bitmap,
    };
    validate(&obj)?;
    Ok(obj)
}
