//! Manifest page layout: the entries and bitmap slice of one range of block
//! indices of a version 2 snapshot object. Pure: bytes in, bytes out. The
//! page's name (its id) and the checks that need the snapshot naming it
//! (`check_use`) are separate from decoding.
//!
//! spec: format-spec/03-snapshot.md#pages

use super::snapshot::{read_entry, write_entry, BlockRef, PageRow};
use super::{bitmap, Cursor, FormatError};

/// "CBTVPAGE"
pub const MAGIC: [u8; 8] = *b"CBTVPAGE";
pub const VERSION: u32 = 1;
const WHAT: &str = "manifest page";

/// One decoded page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Blocks per page, as in the snapshot object naming it.
    pub page_blocks: u32,
    /// First block index of the range (a multiple of `page_blocks`).
    pub first_index: u64,
    /// Strictly ascending indices within the range.
    pub entries: Vec<(u64, BlockRef)>,
    /// The range's bitmap slice, `page_blocks / 8` bytes, MSB-first.
    pub bitmap: Option<Vec<u8>>,
}

impl Page {
    /// One past the last index of the range.
    pub fn end_index(&self) -> u64 {
        self.first_index + self.page_blocks as u64
    }
}

fn validate(page: &Page) -> Result<(), FormatError> {
    if !super::snapshot::valid_page_blocks(page.page_blocks) {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "page_blocks {} is not a power of two in 64..=65536",
                page.page_blocks
            ),
        ));
    }
    if !page.first_index.is_multiple_of(page.page_blocks as u64) {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "first index {} is not a multiple of {}",
                page.first_index, page.page_blocks
            ),
        ));
    }
    let end = page
        .first_index
        .checked_add(page.page_blocks as u64)
        .ok_or_else(|| {
            FormatError::invalid(WHAT, format!("first index {} too large", page.first_index))
        })?;
    let mut prev: Option<u64> = None;
    for (index, _) in &page.entries {
        if *index < page.first_index || *index >= end {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "block index {index} outside the page's range {}..{end}",
                    page.first_index
                ),
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
    if let Some(b) = &page.bitmap {
        if b.len() as u64 != page.page_blocks as u64 / 8 {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "bitmap of {} bytes for a page of {} blocks",
                    b.len(),
                    page.page_blocks
                ),
            ));
        }
    }
    if page.entries.is_empty() && page.bitmap.is_none() {
        return Err(FormatError::invalid(
            WHAT,
            "a page with neither entries nor a bitmap",
        ));
    }
    Ok(())
}

/// Encodes a page. Fails only if the page breaks a rule a decoder would
/// reject, so nothing undecodable is ever written.
pub fn encode(page: &Page) -> Result<Vec<u8>, FormatError> {
    validate(page)?;
    let bitmap = page.bitmap.as_deref().unwrap_or(&[]);
    let mut out = Vec::with_capacity(32 + page.entries.len() * 41 + bitmap.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&page.page_blocks.to_le_bytes());
    out.extend_from_slice(&page.first_index.to_le_bytes());
    out.extend_from_slice(&(page.entries.len() as u32).to_le_bytes());
    for e in &page.entries {
        write_entry(&mut out, e);
    }
    out.extend_from_slice(&(bitmap.len() as u32).to_le_bytes());
    out.extend_from_slice(bitmap);
    Ok(out)
}

/// Decodes a page's bytes (every rule that needs no context).
pub fn decode(bytes: &[u8]) -> Result<Page, FormatError> {
    let mut c = Cursor::new(WHAT, bytes);
    if c.array::<8>()? != MAGIC {
        return Err(FormatError::BadMagic { what: WHAT });
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: WHAT,
            version,
        });
    }
    let page_blocks = c.u32()?;
    if !super::snapshot::valid_page_blocks(page_blocks) {
        return Err(FormatError::invalid(
            WHAT,
            format!("page_blocks {page_blocks} is not a power of two in 64..=65536"),
        ));
    }
    let first_index = c.u64()?;
    let count = c.u32()?;
    if count > page_blocks || count as usize > c.remaining() / 9 {
        return Err(FormatError::invalid(
            WHAT,
            format!("entry count {count} impossible"),
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        entries.push(read_entry(&mut c, WHAT)?);
    }
    let bitmap_len = c.u32()?;
    let bitmap = match bitmap_len {
        0 => None,
        n if n == page_blocks / 8 => Some(c.take(n as usize)?.to_vec()),
        n => {
            return Err(FormatError::invalid(
                WHAT,
                format!("bitmap length {n} is neither 0 nor {}", page_blocks / 8),
            ))
        }
    };
    c.finish()?;
    let page = Page {
        page_blocks,
        first_index,
        entries,
        bitmap,
    };
    validate(&page)?;
    Ok(page)
}

/// The checks that need the snapshot naming the page: its row (range and
/// entry count), the object's `page_blocks`, the disk's block count and
/// whether the snapshot has a bitmap.
pub fn check_use(
    page: &Page,
    row: &PageRow,
    page_blocks: u32,
    block_count: u64,
    has_bitmap: bool,
) -> Result<(), FormatError> {
    if page.page_blocks != page_blocks {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "page of {} blocks named by a snapshot of {page_blocks}-block pages",
                page.page_blocks
            ),
        ));
    }
    if Some(page.first_index) != row.page_no.checked_mul(page_blocks as u64) {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "page starts at block {} but is named as page {}",
                page.first_index, row.page_no
            ),
        ));
    }
    if page.entries.len() as u64 != row.entry_count as u64 {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "{} entries where the snapshot's table says {}",
                page.entries.len(),
                row.entry_count
            ),
        ));
    }
    if let Some((index, _)) = page.entries.last() {
        if *index >= block_count {
            return Err(FormatError::invalid(
                WHAT,
                format!("block index {index} beyond the disk's {block_count} blocks"),
            ));
        }
    }
    if let Some(b) = &page.bitmap {
        if !has_bitmap {
            return Err(FormatError::invalid(
                WHAT,
                "a bitmap in a page of a snapshot without one",
            ));
        }
        // Bits at or beyond the disk's end must be clear.
        let valid = block_count.saturating_sub(page.first_index);
        if valid < page.page_blocks as u64 {
            if let Some(bad) = bitmap::iter_set(b).find(|k| *k >= valid) {
                return Err(FormatError::invalid(
                    WHAT,
                    format!(
                        "bitmap bit for block {} beyond the disk's {block_count} blocks",
                        page.first_index + bad
                    ),
                ));
            }
        }
    }
    Ok(())
}
