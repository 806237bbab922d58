//! Snapshot object layout: magic, version, a JSON metadata section and the
//! binary layered manifest (block index -> block id or zero), followed by the
//! change bitmap that produced it, if any. The object's name is the BLAKE3 of
//! its bytes; its stable identity is `meta.id`.
//!
//! spec: format-spec/03-snapshot.md

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{bitmap, BlockId, Cursor, FormatError, PageId, SnapshotId};

/// "CBTVSNAP"
pub const MAGIC: [u8; 8] = *b"CBTVSNAP";
/// Version 1: manifest and bitmap inline.
pub const VERSION: u32 = 1;
/// Version 2: a page table naming manifest pages (format-spec/03-snapshot.md#paged).
pub const VERSION_PAGED: u32 = 2;
/// Blocks per manifest page that writers use (1 GiB at 64 KiB blocks).
pub const PAGE_BLOCKS: u32 = 16384;
/// Flag bit of a version 2 object: the snapshot has a change bitmap.
pub const FLAG_BITMAP: u8 = 0x01;
/// Bytes of one page table row.
const ROW_LEN: usize = 44;
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

/// The metadata JSON of an object of either version, within its limit.
fn meta_bytes(meta: &SnapshotMeta) -> Result<Vec<u8>, FormatError> {
    let bytes = serde_json::to_vec(meta)
        .map_err(|e| FormatError::invalid("snapshot", format!("metadata: {e}")))?;
    if bytes.len() > MAX_META_LEN as usize {
        return Err(FormatError::invalid(
            "snapshot",
            "metadata larger than 1 MiB",
        ));
    }
    Ok(bytes)
}

/// Encodes a snapshot object. Fails only if the object breaks a rule a
/// decoder would reject, so nothing undecodable is ever written.
pub fn encode(obj: &SnapshotObject) -> Result<Vec<u8>, FormatError> {
    validate(obj)?;
    let meta = meta_bytes(&obj.meta)?;
    let bitmap = obj.bitmap.as_deref().unwrap_or(&[]);
    let mut out = Vec::with_capacity(32 + meta.len() + obj.entries.len() * 41 + bitmap.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&(obj.entries.len() as u64).to_le_bytes());
    for e in &obj.entries {
        write_entry(&mut out, e);
    }
    out.extend_from_slice(&(bitmap.len() as u64).to_le_bytes());
    out.extend_from_slice(bitmap);
    Ok(out)
}

/// Decodes only the metadata section (cheap listing), of either version.
pub fn decode_meta(bytes: &[u8]) -> Result<SnapshotMeta, FormatError> {
    let mut c = Cursor::new("snapshot", bytes);
    read_meta(&mut c).map(|(_, meta)| meta)
}

/// Magic, version (1 or 2) and metadata.
fn read_meta(c: &mut Cursor<'_>) -> Result<(u32, SnapshotMeta), FormatError> {
    if c.array::<8>()? != MAGIC {
        return Err(FormatError::BadMagic { what: "snapshot" });
    }
    let version = c.u32()?;
    if version != VERSION && version != VERSION_PAGED {
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
    Ok((version, meta))
}

/// Decodes a version 1 object; a version 2 object is refused (use
/// [`decode_any`]).
pub fn decode(bytes: &[u8]) -> Result<SnapshotObject, FormatError> {
    let mut c = Cursor::new("snapshot", bytes);
    let (version, meta) = read_meta(&mut c)?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: "snapshot (version 1 expected)",
            version,
        });
    }
    decode_inline(c, meta)
}

fn decode_inline(mut c: Cursor<'_>, meta: SnapshotMeta) -> Result<SnapshotObject, FormatError> {
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
        entries.push(read_entry(&mut c, "snapshot")?);
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

/// Writes one manifest entry (9 or 41 bytes; the same in version 1 objects
/// and in pages).
pub(crate) fn write_entry(out: &mut Vec<u8>, (index, r): &(u64, BlockRef)) {
    out.extend_from_slice(&index.to_le_bytes());
    match r {
        BlockRef::Zero => out.push(KIND_ZERO),
        BlockRef::Data(id) => {
            out.push(KIND_DATA);
            out.extend_from_slice(&id.0);
        }
    }
}

pub(crate) fn read_entry(
    c: &mut Cursor<'_>,
    what: &'static str,
) -> Result<(u64, BlockRef), FormatError> {
    let index = c.u64()?;
    let r = match c.u8()? {
        KIND_ZERO => BlockRef::Zero,
        KIND_DATA => BlockRef::Data(BlockId(c.array()?)),
        k => {
            return Err(FormatError::invalid(
                what,
                format!("block {index}: unknown entry kind {k}"),
            ))
        }
    };
    Ok((index, r))
}

/// Valid `page_blocks`: a power of two in 64 ..= 65536.
pub fn valid_page_blocks(page_blocks: u32) -> bool {
    page_blocks.is_power_of_two() && (64..=65536).contains(&page_blocks)
}

/// One row of a version 2 page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRow {
    /// Page *p* covers blocks `p * page_blocks .. (p + 1) * page_blocks`.
    pub page_no: u64,
    /// Entries in the page.
    pub entry_count: u32,
    pub id: PageId,
}

/// The manifest of a version 2 object: which page holds which range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    pub page_blocks: u32,
    /// The snapshot has a change bitmap (slices in its pages).
    pub has_bitmap: bool,
    /// Strictly ascending by `page_no`.
    pub rows: Vec<PageRow>,
}

impl PageTable {
    /// Total entries over all pages.
    pub fn entry_count(&self) -> u64 {
        self.rows.iter().map(|r| r.entry_count as u64).sum()
    }

    /// The row of page `page_no`, if the table has one.
    pub fn row(&self, page_no: u64) -> Option<&PageRow> {
        self.rows
            .binary_search_by_key(&page_no, |r| r.page_no)
            .ok()
            .map(|p| &self.rows[p])
    }
}

/// A decoded version 2 snapshot object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedSnapshot {
    pub meta: SnapshotMeta,
    pub table: PageTable,
}

/// A decoded snapshot object of either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredSnapshot {
    Inline(SnapshotObject),
    Paged(PagedSnapshot),
}

impl StoredSnapshot {
    pub fn meta(&self) -> &SnapshotMeta {
        match self {
            StoredSnapshot::Inline(o) => &o.meta,
            StoredSnapshot::Paged(p) => &p.meta,
        }
    }
}

/// Number of pages of `page_blocks` blocks covering `block_count` blocks.
pub fn page_count(block_count: u64, page_blocks: u32) -> u64 {
    block_count.div_ceil(page_blocks as u64)
}

fn validate_paged(obj: &PagedSnapshot) -> Result<(), FormatError> {
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
    let t = &obj.table;
    if !valid_page_blocks(t.page_blocks) {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "page_blocks {} is not a power of two in 64..=65536",
                t.page_blocks
            ),
        ));
    }
    let pages = page_count(obj.meta.block_count(), t.page_blocks);
    let mut prev: Option<u64> = None;
    for row in &t.rows {
        if row.page_no >= pages {
            return Err(FormatError::invalid(
                WHAT,
                format!("page {} beyond the disk's {pages} pages", row.page_no),
            ));
        }
        if prev.is_some_and(|p| p >= row.page_no) {
            return Err(FormatError::invalid(
                WHAT,
                format!("page {} not in strictly ascending order", row.page_no),
            ));
        }
        if row.entry_count > t.page_blocks {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "page {}: {} entries in a page of {} blocks",
                    row.page_no, row.entry_count, t.page_blocks
                ),
            ));
        }
        prev = Some(row.page_no);
    }
    Ok(())
}

/// Encodes a version 2 object. Fails only if it breaks a rule a decoder
/// would reject.
pub fn encode_paged(obj: &PagedSnapshot) -> Result<Vec<u8>, FormatError> {
    validate_paged(obj)?;
    let meta = meta_bytes(&obj.meta)?;
    let t = &obj.table;
    let mut out = Vec::with_capacity(32 + meta.len() + t.rows.len() * ROW_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION_PAGED.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&t.page_blocks.to_le_bytes());
    out.push(if t.has_bitmap { FLAG_BITMAP } else { 0 });
    out.extend_from_slice(&(t.rows.len() as u64).to_le_bytes());
    for row in &t.rows {
        out.extend_from_slice(&row.page_no.to_le_bytes());
        out.extend_from_slice(&row.entry_count.to_le_bytes());
        out.extend_from_slice(&row.id.0);
    }
    Ok(out)
}

/// Decodes an object of either version.
pub fn decode_any(bytes: &[u8]) -> Result<StoredSnapshot, FormatError> {
    let mut c = Cursor::new("snapshot", bytes);
    let (version, meta) = read_meta(&mut c)?;
    if version == VERSION {
        return decode_inline(c, meta).map(StoredSnapshot::Inline);
    }
    if !valid_block_size(meta.block_size) {
        return Err(FormatError::invalid(
            "snapshot",
            format!("block size {} invalid", meta.block_size),
        ));
    }
    let page_blocks = c.u32()?;
    let flags = c.u8()?;
    if !valid_page_blocks(page_blocks) {
        return Err(FormatError::invalid(
            "snapshot",
            format!("page_blocks {page_blocks} is not a power of two in 64..=65536"),
        ));
    }
    if flags & !FLAG_BITMAP != 0 {
        return Err(FormatError::invalid(
            "snapshot",
            format!("unknown flags {flags:#04x}"),
        ));
    }
    let count = c.u64()?;
    if count > page_count(meta.block_count(), page_blocks)
        || count > (c.remaining() / ROW_LEN) as u64
    {
        return Err(FormatError::invalid(
            "snapshot",
            format!("page count {count} impossible"),
        ));
    }
    let mut rows = Vec::with_capacity(count as usize);
    for _ in 0..count {
        rows.push(PageRow {
            page_no: c.u64()?,
            entry_count: c.u32()?,
            id: PageId(c.array()?),
        });
    }
    c.finish()?;
    let obj = PagedSnapshot {
        meta,
        table: PageTable {
            page_blocks,
            has_bitmap: flags & FLAG_BITMAP != 0,
            rows,
        },
    };
    validate_paged(&obj)?;
    Ok(StoredSnapshot::Paged(obj))
}
