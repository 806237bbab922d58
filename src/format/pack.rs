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
/// Fixed trailer bytes around the entries: count, trailer format, hash.
pub const TRAILER_FIXED_LEN: usize = 8 + 32;
/// Bytes of a trailer format 1 pack id.
pub const PACK_ID_LEN: usize = 16;
/// Trailer format 0: no pack id; the pack is named by the whole file.
pub const TRAILER_FORMAT_WHOLE: u32 = 0;
/// Trailer format 1: a pack id; the pack is named by its trailer and footer.
pub const TRAILER_FORMAT_TAIL: u32 = 1;
/// Upper bound on blobs per pack; bounds the trailer a reader will allocate.
pub const MAX_ENTRIES: u32 = 1 << 20;
/// Largest raw block any version-1 repository may use.
pub const MAX_BLOCK_SIZE: u32 = 1 << 24;

/// How a pack's blobs and trailer are stored: version 1 as they are,
/// version 2 sealed, 40 bytes longer each (spec: format-spec/09-encryption.md#pack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// The header's version field.
    pub version: u32,
    /// Bytes sealing adds to each blob and to the trailer.
    pub overhead: u32,
}

impl Framing {
    pub const PLAIN: Framing = Framing {
        version: 1,
        overhead: 0,
    };
    pub const SEALED: Framing = Framing {
        version: 2,
        overhead: 40,
    };

    /// Largest stored length of a blob of `raw_length` bytes.
    pub fn max_stored_length(&self, raw_length: u32) -> u32 {
        max_stored_length(raw_length).saturating_add(self.overhead)
    }
}

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
    encode_header_framed(Framing::PLAIN)
}

pub fn encode_header_framed(framing: Framing) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&HEADER_MAGIC);
    h[8..12].copy_from_slice(&framing.version.to_le_bytes());
    h
}

pub fn decode_header(bytes: &[u8]) -> Result<(), FormatError> {
    decode_header_framed(bytes, Framing::PLAIN)
}

/// The header of a pack of a repository whose packs are framed `framing`.
pub fn decode_header_framed(bytes: &[u8], framing: Framing) -> Result<(), FormatError> {
    let mut c = Cursor::new("pack header", bytes);
    if c.array::<8>()? != HEADER_MAGIC {
        return Err(FormatError::BadMagic {
            what: "pack header",
        });
    }
    let version = c.u32()?;
    if version != framing.version {
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

/// Encodes a trailer format 0 trailer and footer for blobs written back
/// to back after the header. The caller appends the result to the blobs.
pub fn encode_trailer(entries: &[TrailerEntry]) -> Vec<u8> {
    with_footer(encode_trailer_body(entries))
}

/// [`encode_trailer`] of trailer format 1, carrying `pack_id`: what
/// writers write (spec: format-spec/02-pack.md#naming).
pub fn encode_trailer_named(entries: &[TrailerEntry], pack_id: [u8; PACK_ID_LEN]) -> Vec<u8> {
    with_footer(encode_trailer_body_named(entries, Some(pack_id)))
}

fn with_footer(mut trailer: Vec<u8>) -> Vec<u8> {
    let trailer_len = trailer.len() as u32;
    trailer.extend_from_slice(&encode_footer(trailer_len));
    trailer
}

/// The footer after a trailer of `stored_len` bytes.
pub fn encode_footer(stored_len: u32) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[..8].copy_from_slice(&FOOTER_MAGIC);
    f[8..].copy_from_slice(&stored_len.to_le_bytes());
    f
}

/// The trailer format 0 plaintext (count, format, entries, hash), without
/// the footer.
pub fn encode_trailer_body(entries: &[TrailerEntry]) -> Vec<u8> {
    encode_trailer_body_named(entries, None)
}

/// The trailer's plaintext, format 1 when given a pack id, without the
/// footer.
pub fn encode_trailer_body_named(
    entries: &[TrailerEntry],
    pack_id: Option<[u8; PACK_ID_LEN]>,
) -> Vec<u8> {
    let id_len = pack_id.map_or(0, |_| PACK_ID_LEN);
    let trailer_len = TRAILER_FIXED_LEN + id_len + entries.len() * ENTRY_LEN;
    let mut out = Vec::with_capacity(trailer_len + FOOTER_LEN + 40);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    match pack_id {
        None => out.extend_from_slice(&TRAILER_FORMAT_WHOLE.to_le_bytes()),
        Some(id) => {
            out.extend_from_slice(&TRAILER_FORMAT_TAIL.to_le_bytes());
            out.extend_from_slice(&id);
        }
    }
    for e in entries {
        out.extend_from_slice(&e.block_id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_length.to_le_bytes());
        out.extend_from_slice(&e.raw_length.to_le_bytes());
    }
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out
}

/// Decodes the 12-byte footer (the last bytes of a pack) into the trailer
/// length, checked against what a pack of `pack_len` bytes can hold.
pub fn decode_footer(footer: &[u8], pack_len: u64) -> Result<u32, FormatError> {
    decode_footer_framed(footer, pack_len, Framing::PLAIN)
}

/// [`decode_footer`] for packs framed `framing`: the stored trailer
/// length, bounds widened by the seal overhead.
pub fn decode_footer_framed(
    footer: &[u8],
    pack_len: u64,
    framing: Framing,
) -> Result<u32, FormatError> {
    let mut c = Cursor::new("pack footer", footer);
    if c.array::<8>()? != FOOTER_MAGIC {
        return Err(FormatError::BadMagic {
            what: "pack footer",
        });
    }
    let trailer_len = c.u32()?;
    c.finish()?;
    let over = framing.overhead as u64;
    let max =
        (TRAILER_FIXED_LEN + PACK_ID_LEN) as u64 + MAX_ENTRIES as u64 * ENTRY_LEN as u64 + over;
    let room = pack_len.saturating_sub((HEADER_LEN + FOOTER_LEN) as u64);
    if (trailer_len as u64) < TRAILER_FIXED_LEN as u64 + ENTRY_LEN as u64 + over
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
    decode_trailer_framed(
        trailer,
        trailer.len() as u64,
        pack_len,
        max_block_size,
        Framing::PLAIN,
    )
}

/// [`decode_trailer`] of an opened trailer (`trailer`, plaintext) that
/// took `stored_len` bytes in a pack framed `framing`.
pub fn decode_trailer_framed(
    trailer: &[u8],
    stored_len: u64,
    pack_len: u64,
    max_block_size: u32,
    framing: Framing,
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
    if Naming::of_format(c.u32()?)? == Naming::Tail {
        c.array::<PACK_ID_LEN>()?;
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
        .checked_sub(stored_len + FOOTER_LEN as u64)
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
        if e.stored_length <= framing.overhead
            || e.stored_length > framing.max_stored_length(e.raw_length)
        {
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
    decode_pack_index_framed(pack, max_block_size, Framing::PLAIN, |t| {
        Ok(std::borrow::Cow::Borrowed(t))
    })
}

/// [`decode_pack_index`] of a pack framed `framing`; `open` turns the
/// stored trailer into its plaintext (an error names why it cannot).
pub fn decode_pack_index_framed<'a>(
    pack: &'a [u8],
    max_block_size: u32,
    framing: Framing,
    open: impl FnOnce(&'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String>,
) -> Result<Vec<TrailerEntry>, FormatError> {
    if pack.len() < HEADER_LEN + FOOTER_LEN {
        return Err(FormatError::Truncated {
            what: "pack",
            needed: (HEADER_LEN + FOOTER_LEN) as u64,
            available: pack.len() as u64,
        });
    }
    decode_header_framed(&pack[..HEADER_LEN], framing)?;
    let len = pack.len() as u64;
    let trailer_len =
        decode_footer_framed(&pack[pack.len() - FOOTER_LEN..], len, framing)? as usize;
    let start = pack.len() - FOOTER_LEN - trailer_len;
    let plain = open(&pack[start..pack.len() - FOOTER_LEN])
        .map_err(|e| FormatError::invalid("pack trailer", e))?;
    decode_trailer_framed(&plain, trailer_len as u64, len, max_block_size, framing)
}

/// What a pack's name is the BLAKE3 of (spec: format-spec/02-pack.md#naming).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Trailer format 0: all of the file.
    WholeFile,
    /// Trailer format 1: the stored trailer and the footer.
    Tail,
}

impl Naming {
    /// The naming of a trailer's `trailer_format` field.
    fn of_format(format: u32) -> Result<Naming, FormatError> {
        match format {
            TRAILER_FORMAT_WHOLE => Ok(Naming::WholeFile),
            TRAILER_FORMAT_TAIL => Ok(Naming::Tail),
            other => Err(FormatError::invalid(
                "pack trailer",
                format!("unsupported trailer format {other}"),
            )),
        }
    }
}

/// The naming of a pack whose opened trailer is `plain`, already accepted
/// by [`decode_trailer_framed`].
pub fn naming(plain: &[u8]) -> Naming {
    match plain.get(4..8) {
        Some(f) if f == TRAILER_FORMAT_TAIL.to_le_bytes() => Naming::Tail,
        _ => Naming::WholeFile,
    }
}

/// The pack id of a trailer format 1 trailer (`plain`, opened and
/// accepted by [`decode_trailer_framed`]); `None` for format 0.
pub fn pack_id(plain: &[u8]) -> Option<[u8; PACK_ID_LEN]> {
    (naming(plain) == Naming::Tail)
        .then(|| plain.get(8..8 + PACK_ID_LEN)?.try_into().ok())
        .flatten()
}

/// The name a whole pack held in memory calls for (its naming read from
/// its trailer, which `open` turns into plaintext). Only the footer and
/// the trailer format are checked here; [`decode_pack_index_framed`]
/// checks the rest.
pub fn name_of_pack<'a>(
    pack: &'a [u8],
    framing: Framing,
    open: impl FnOnce(&'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String>,
) -> Result<super::ObjectName, FormatError> {
    let len = pack.len() as u64;
    let footer_at = pack
        .len()
        .checked_sub(FOOTER_LEN)
        .ok_or(FormatError::Truncated {
            what: "pack",
            needed: FOOTER_LEN as u64,
            available: len,
        })?;
    let trailer_len = decode_footer_framed(&pack[footer_at..], len, framing)? as usize;
    let tail = &pack[footer_at - trailer_len..];
    let plain = open(&tail[..trailer_len]).map_err(|e| FormatError::invalid("pack trailer", e))?;
    let mut c = super::Cursor::new("pack trailer", &plain[..]);
    c.u32()?;
    Ok(match Naming::of_format(c.u32()?)? {
        Naming::Tail => super::ObjectName::of(tail),
        Naming::WholeFile => super::ObjectName::of(pack),
    })
}
