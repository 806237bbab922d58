//! Pack file layout: a 16-byte header, blobs (one independent zstd frame per
//! block), a trailer that lists every blob, and a 12-byte footer whose last
//! field is the trailer length, so a pack can be listed from its end alone.
//!
//! spec: format-spec/02-pack.md

use super::{BlockId, Cursor, FormatError};

/// "CBTVPACK": first 8 bytes of every pack.
pub const HEADER_MAGIC: [u8; 8] = *b"CBTVPACK";
/// "CBTVTRLR": the footer's magic, just before the trailer length.
pub const FOOTER_MAGIC: [u8; 8] = *b"CBTVTRLR";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 16;
pub const FOOTER_LEN: usize = 12;
pub const ENTRY_LEN: usize = 48;
/// Fixed trailer bytes around the entries: count, reserved, hash.
pub const TRAILER_FIXED_LEN: usize = 8 + 32;
/// Upper bound on blobs per pack; bounds the trailer a reader will allocate.
pub const MAX_ENTRIES: u32 = 1 << 20;
/// Largest raw block any version-1 repository may use.
pub const MAX_BLOCK_SIZE: u32 = 1 << 24;

/// One blob in a pack, as listed in the trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrailerEntry {
    pub block_id: BlockId,
    /// Byte offset of the blob's zstd frame from the start of the pack.
    pub offset: u64,
    pub stored_length: u32,
    pub raw_length: u32,
}

/// Largest stored length a blob of `raw_length` bytes may have (zstd's
/// worst-case expansion is far below this).
pub fn max_stored_length(raw_length: u32) -> u32 {
    raw_length
        .saturating_add(raw_length / 64)
        .saturating_add(1024)
}

pub fn encode_header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&HEADER_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

pub fn decode_header(bytes: &[u8]) -> Result<(), FormatError> {
    let mut c = Cursor::new("pack header", bytes);
    if c.array::<8>()? != HEADER_MAGIC {
        return Err(FormatError::BadMagic {
            what: "pack header",
        });
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: "pack header",
            version,
        });
    }
    if c.u32()? != 0 {
        return Err(FormatError::invalid(
            "pack header",
            "reserved field is not 0",
        ));
    }
    Ok(())
}

/// Encodes trailer and footer for blobs written back to back after the
/// header. The caller appends the result to the blobs.
pub fn encode_trailer(entries: &[TrailerEntry]) -> Vec<u8> {
    let trailer_len = TRAILER_FIXED_LEN + entries.len() * ENTRY_LEN;
    let mut out = Vec::with_capacity(trailer_len + FOOTER_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.block_id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_length.to_le_bytes());
        out.extend_from_slice(&e.raw_length.to_le_bytes());
    }
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(&FOOTER_MAGIC);
    out.extend_from_slice(&(trailer_len as u32).to_le_bytes());
    out
}

/// Decodes the 12-byte footer (the last bytes of a pack) into the trailer
/// length, checked against what a pack of `pack_len` bytes can hold.
pub fn decode_footer(footer: &[u8], pack_len: u64) -> Result<u32, FormatError> {
    let mut c = Cursor::new("pack footer", footer);
    if c.array::<8>()? != FOOTER_MAGIC {
        return Err(FormatError::BadMagic {
            what: "pack footer",
        });
    }
    let trailer_len = c.u32()?;
    c.finish()?;
    let max = TRAILER_FIXED_LEN as u64 + MAX_ENTRIES as u64 * ENTRY_LEN as u64;
    let room = pack_len.saturating_sub((HEADER_LEN + FOOTER_LEN) as u64);
    if (trailer_len as u64) < TRAILER_FIXED_LEN as u64 + ENTRY_LEN as u64
        || trailer_len as u64 > max
        || trailer_len as u64 > room
    {
        return Err(FormatError::invalid(
            "pack footer",
            format!("trailer length {trailer_len} impossible for a pack of {pack_len} bytes"),
        ));
    }
    Ok(trailer_len)
}

/// Decodes and validates a trailer (without the footer). `pack_len` is the
/// whole pack's size: blobs must tile the bytes between header and trailer
/// exactly, in offset order.
pub fn decode_trailer(
    trailer: &[u8],
    pack_len: u64,
    max_block_size: u32,
) -> Result<Vec<TrailerEntry>, FormatError> {
    const WHAT: &str = "pack trailer";
    if trailer.len() < TRAILER_FIXED_LEN {
        return Err(FormatError::Truncated {
            what: WHAT,
            needed: TRAILER_FIXED_LEN as u64,
            available: trailer.len() as u64,
        });
    }
    let (body, hash) = trailer.split_at(trailer.len() - 32);
    if blake3::hash(body).as_bytes() != hash {
        return Err(FormatError::invalid(WHAT, "checksum mismatch"));
    }
    let mut c = Cursor::new(WHAT, body);
    let count = c.u32()?;
    if count == 0 || count > MAX_ENTRIES {
        return Err(FormatError::invalid(
            WHAT,
            format!("entry count {count} out of range"),
        ));
    }
    if c.u32()? != 0 {
        return Err(FormatError::invalid(WHAT, "reserved field is not 0"));
    }
    if c.remaining() != count as usize * ENTRY_LEN {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "{count} entries need {} bytes, have {}",
                count as usize * ENTRY_LEN,
                c.remaining()
            ),
        ));
    }
    let blobs_end = pack_len
        .checked_sub((trailer.len() + FOOTER_LEN) as u64)
        .ok_or_else(|| FormatError::invalid(WHAT, "longer than the pack"))?;
    let mut expected_offset = HEADER_LEN as u64;
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let e = TrailerEntry {
            block_id: BlockId(c.array()?),
            offset: c.u64()?,
            stored_length: c.u32()?,
            raw_length: c.u32()?,
        };
        if e.offset != expected_offset {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "entry {i}: offset {} where {expected_offset} was expected",
                    e.offset
                ),
            ));
        }
        if e.raw_length == 0 || e.raw_length > max_block_size.min(MAX_BLOCK_SIZE) {
            return Err(FormatError::invalid(
                WHAT,
                format!("entry {i}: raw length {} out of range", e.raw_length),
            ));
        }
        if e.stored_length == 0 || e.stored_length > max_stored_length(e.raw_length) {
            return Err(FormatError::invalid(
                WHAT,
                format!("entry {i}: stored length {} out of range", e.stored_length),
            ));
        }
        expected_offset = e.offset + e.stored_length as u64;
        entries.push(e);
    }
    if expected_offset != blobs_end {
        return Err(FormatError::invalid(
            WHAT,
            format!("blobs end at {expected_offset} but the trailer starts at {blobs_end}"),
        ));
    }
    Ok(entries)
}

/// Decodes a whole pack held in memory: header, footer, trailer. Blob
/// contents are not touched.
pub fn decode_pack_index(
    pack: &[u8],
    max_block_size: u32,
) -> Result<Vec<TrailerEntry>, FormatError> {
    if pack.len() < HEADER_LEN + FOOTER_LEN {
        return Err(FormatError::Truncated {
            what: "pack",
            needed: (HEADER_LEN + FOOTER_LEN) as u64,
            available: pack.len() as u64,
        });
    }
    decode_header(&pack[..HEADER_LEN])?;
    let len = pack.len() as u64;
    let trailer_len = decode_footer(&pack[pack.len() - FOOTER_LEN..], len)? as usize;
    let start = pack.len() - FOOTER_LEN - trailer_len;
    decode_trailer(&pack[start..pack.len() - FOOTER_LEN], len, max_block_size)
}
