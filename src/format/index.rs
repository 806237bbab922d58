//! Index objects: immutable lists of packs with the entries of their
//! trailers, so a reader learns where blocks are without one read per pack
//! (on object storage, one ranged GET each). Pure codec, no I/O.
//!
//! spec: format-spec/08-index.md

use super::pack::{
    max_stored_length, TrailerEntry, ENTRY_LEN, FOOTER_LEN, HEADER_LEN, MAX_BLOCK_SIZE,
    MAX_ENTRIES, PACK_ID_LEN, TRAILER_FIXED_LEN, TRAILER_FORMAT_TAIL, TRAILER_FORMAT_WHOLE,
};
use super::{BlockId, Cursor, FormatError, ObjectName};

/// "CBTVINDX": first 8 bytes of every index object.
pub const MAGIC: [u8; 8] = *b"CBTVINDX";
pub const VERSION: u32 = 1;
/// Magic, version, pack count, reserved.
pub const HEADER_LEN_INDEX: usize = 8 + 4 + 4 + 4;
/// Pack name, size, entry count, trailer format.
pub const PACK_RECORD_LEN: usize = 32 + 8 + 4 + 4;
/// Most entries (over all packs) one index object may hold: bounds what a
/// reader allocates (48 MiB of entries). Writers split larger lists.
pub const MAX_INDEX_ENTRIES: usize = 1 << 20;

/// One pack as an index object lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPack {
    pub name: ObjectName,
    pub size_bytes: u64,
    /// Its trailer's entries, in offset order.
    pub entries: Vec<TrailerEntry>,
    /// Its trailer's format (`02-pack.md#trailer`): 0, or 1 with a pack id.
    pub trailer_format: u32,
}

const WHAT: &str = "index object";

/// Encodes `packs` (sorted by name here, so equal lists give equal bytes).
///
/// # Panics
/// When the packs hold more than [`MAX_INDEX_ENTRIES`] entries in all, or
/// a pack none (a writer's mistake; [`split`] first).
pub fn encode(packs: &[IndexedPack]) -> Vec<u8> {
    let total: usize = packs.iter().map(|p| p.entries.len()).sum();
    assert!(
        total <= MAX_INDEX_ENTRIES,
        "index object too large: split it"
    );
    let mut sorted: Vec<&IndexedPack> = packs.iter().collect();
    sorted.sort_by_key(|p| p.name);
    sorted.dedup_by_key(|p| p.name);
    let mut out =
        Vec::with_capacity(HEADER_LEN_INDEX + sorted.len() * PACK_RECORD_LEN + total * ENTRY_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(sorted.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for p in sorted {
        assert!(!p.entries.is_empty(), "a pack without entries");
        out.extend_from_slice(&p.name.0);
        out.extend_from_slice(&p.size_bytes.to_le_bytes());
        out.extend_from_slice(&(p.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&p.trailer_format.to_le_bytes());
        for e in &p.entries {
            out.extend_from_slice(&e.block_id.0);
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.stored_length.to_le_bytes());
            out.extend_from_slice(&e.raw_length.to_le_bytes());
        }
    }
    out
}

/// Splits `packs` into lists each small enough for one index object.
pub fn split(packs: Vec<IndexedPack>) -> Vec<Vec<IndexedPack>> {
    split_at(packs, MAX_INDEX_ENTRIES)
}

/// Splits `packs` into lists of at most `max_entries` entries each (a pack
/// with more is a list of its own; `max_entries` at most
/// [`MAX_INDEX_ENTRIES`]).
pub fn split_at(packs: Vec<IndexedPack>, max_entries: usize) -> Vec<Vec<IndexedPack>> {
    let max_entries = max_entries.min(MAX_INDEX_ENTRIES);
    let mut out: Vec<Vec<IndexedPack>> = Vec::new();
    let mut current = Vec::new();
    let mut entries = 0;
    for p in packs {
        if entries + p.entries.len() > max_entries && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            entries = 0;
        }
        entries += p.entries.len();
        current.push(p);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Decodes and validates an index object: every pack's entries must tile
/// the pack exactly as its trailer would (`02-pack.md`), packs strictly
/// ascending by name. `max_block_size` is the repository's block size.
pub fn decode(bytes: &[u8], max_block_size: u32) -> Result<Vec<IndexedPack>, FormatError> {
    decode_framed(bytes, max_block_size, super::pack::Framing::PLAIN)
}

/// [`decode`] for a repository whose packs are framed `framing` (sealed
/// blobs and trailer are 40 bytes longer).
pub fn decode_framed(
    bytes: &[u8],
    max_block_size: u32,
    framing: super::pack::Framing,
) -> Result<Vec<IndexedPack>, FormatError> {
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
    let count = c.u32()?;
    if c.u32()? != 0 {
        return Err(FormatError::invalid(WHAT, "reserved field is not 0"));
    }
    // Each pack takes at least a record and one entry.
    if count as usize > c.remaining() / (PACK_RECORD_LEN + ENTRY_LEN) {
        return Err(FormatError::invalid(
            WHAT,
            format!("{count} packs cannot fit in {} bytes", bytes.len()),
        ));
    }
    let mut packs: Vec<IndexedPack> = Vec::with_capacity(count as usize);
    let mut total = 0usize;
    for k in 0..count {
        let name = ObjectName(c.array()?);
        let size_bytes = c.u64()?;
        let n = c.u32()?;
        let trailer_format = c.u32()?;
        if trailer_format != TRAILER_FORMAT_WHOLE && trailer_format != TRAILER_FORMAT_TAIL {
            return Err(FormatError::invalid(
                WHAT,
                format!("pack {k}: unsupported trailer format {trailer_format}"),
            ));
        }
        if let Some(prev) = packs.last() {
            if prev.name >= name {
                return Err(FormatError::invalid(
                    WHAT,
                    format!("pack {k}: names are not strictly ascending"),
                ));
            }
        }
        if n == 0 || n > MAX_ENTRIES {
            return Err(FormatError::invalid(
                WHAT,
                format!("pack {k}: entry count {n} out of range"),
            ));
        }
        total += n as usize;
        if total > MAX_INDEX_ENTRIES || n as usize > c.remaining() / ENTRY_LEN {
            return Err(FormatError::invalid(
                WHAT,
                format!("pack {k}: {n} entries do not fit"),
            ));
        }
        let mut entries = Vec::with_capacity(n as usize);
        let mut expected = HEADER_LEN as u64;
        for i in 0..n {
            let e = TrailerEntry {
                block_id: BlockId(c.array()?),
                offset: c.u64()?,
                stored_length: c.u32()?,
                raw_length: c.u32()?,
            };
            let bad =
                |why: String| FormatError::invalid(WHAT, format!("pack {k} entry {i}: {why}"));
            if e.offset != expected {
                return Err(bad(format!(
                    "offset {} where {expected} was expected",
                    e.offset
                )));
            }
            if e.raw_length == 0 || e.raw_length > max_block_size.min(MAX_BLOCK_SIZE) {
                return Err(bad(format!("raw length {} out of range", e.raw_length)));
            }
            if e.stored_length <= framing.overhead
                || e.stored_length > max_stored_length(e.raw_length) + framing.overhead
            {
                return Err(bad(format!(
                    "stored length {} out of range",
                    e.stored_length
                )));
            }
            expected = e.offset + e.stored_length as u64;
            entries.push(e);
        }
        let id_len = if trailer_format == TRAILER_FORMAT_TAIL {
            PACK_ID_LEN
        } else {
            0
        };
        let trailer = (TRAILER_FIXED_LEN
            + id_len
            + n as usize * ENTRY_LEN
            + FOOTER_LEN
            + framing.overhead as usize) as u64;
        if expected.checked_add(trailer) != Some(size_bytes) {
            return Err(FormatError::invalid(
                WHAT,
                format!(
                    "pack {k}: blobs end at {expected}, which with its trailer does not make its size {size_bytes}"
                ),
            ));
        }
        packs.push(IndexedPack {
            name,
            size_bytes,
            entries,
            trailer_format,
        });
    }
    c.finish()?;
    Ok(packs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(seed: u8, blobs: &[u32]) -> IndexedPack {
        let mut offset = HEADER_LEN as u64;
        let entries: Vec<TrailerEntry> = blobs
            .iter()
            .enumerate()
            .map(|(i, &stored)| {
                let e = TrailerEntry {
                    block_id: BlockId(*blake3::hash(&[seed, i as u8]).as_bytes()),
                    offset,
                    stored_length: stored,
                    raw_length: 65536,
                };
                offset += stored as u64;
                e
            })
            .collect();
        let size = offset + (TRAILER_FIXED_LEN + blobs.len() * ENTRY_LEN + FOOTER_LEN) as u64;
        IndexedPack {
            name: ObjectName(*blake3::hash(&[seed]).as_bytes()),
            size_bytes: size,
            entries,
            trailer_format: TRAILER_FORMAT_WHOLE,
        }
    }

    #[test]
    fn round_trip_sorted_and_canonical() {
        let a = pack(1, &[100, 65540]);
        let b = pack(2, &[7]);
        let one = encode(&[a.clone(), b.clone()]);
        let two = encode(&[b.clone(), a.clone()]);
        assert_eq!(one, two);
        let mut expected = vec![a, b];
        expected.sort_by_key(|p| p.name);
        assert_eq!(decode(&one, 65536).unwrap(), expected);
        assert_eq!(decode(&encode(&[]), 65536).unwrap(), vec![]);
    }

    #[test]
    fn damage_is_refused_never_a_panic() {
        let bytes = encode(&[pack(1, &[100, 200]), pack(2, &[300])]);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], 65536).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode(&extra, 65536).is_err());
        // Every single flipped byte in a record or entry field is caught or
        // decodes to something self-consistent (block ids are free).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let _ = decode(&b, 65536);
        }
        // A wrong size, an offset gap, an over-long blob, a bad order.
        let mut p = pack(1, &[100]);
        p.size_bytes += 1;
        assert!(decode(&encode(&[p]), 65536).is_err());
        let mut p = pack(1, &[100, 100]);
        p.entries[1].offset += 1;
        assert!(decode(&encode(&[p]), 65536).is_err());
        let p = pack(1, &[100]);
        assert!(
            decode(&encode(&[p]), 4096).is_err(),
            "raw length above the block size"
        );
        let mut swapped = encode(&[pack(1, &[10]), pack(2, &[10])]);
        let first = HEADER_LEN_INDEX;
        let rec = PACK_RECORD_LEN + ENTRY_LEN;
        let (x, y) = swapped.split_at_mut(first + rec);
        x[first..].swap_with_slice(&mut y[..rec]);
        assert!(decode(&swapped, 65536).is_err());
        // A count claiming more packs than the bytes hold allocates nothing.
        let mut huge = encode(&[]);
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge, 65536).is_err());
    }

    /// A record of a tail-named pack (trailer format 1) implies a trailer
    /// 16 bytes longer; the format is checked and kept.
    #[test]
    fn records_carry_the_trailer_format() {
        let mut t = pack(3, &[100]);
        t.trailer_format = TRAILER_FORMAT_TAIL;
        // The size of a format 0 pack does not fit format 1.
        assert!(decode(&encode(std::slice::from_ref(&t)), 65536).is_err());
        t.size_bytes += PACK_ID_LEN as u64;
        let bytes = encode(std::slice::from_ref(&t));
        assert_eq!(decode(&bytes, 65536).unwrap(), vec![t.clone()]);
        // The field sits where the reserved field was.
        let at = HEADER_LEN_INDEX + 44;
        assert_eq!(&bytes[at..at + 4], &1u32.to_le_bytes());
        let mut bad = bytes.clone();
        bad[at] = 2;
        let e = decode(&bad, 65536).unwrap_err().to_string();
        assert!(e.contains("unsupported trailer format 2"), "{e}");
    }

    #[test]
    fn split_bounds_each_object() {
        let packs: Vec<IndexedPack> = (0..5).map(|i| pack(i, &[10])).collect();
        assert_eq!(split(packs.clone()).len(), 1);
        assert_eq!(split(Vec::new()).len(), 0);
        // Two entries per object at most; a pack with more stands alone.
        let mut packs: Vec<IndexedPack> = (0..5).map(|i| pack(i, &[10])).collect();
        packs.insert(2, pack(9, &[10, 10, 10]));
        let parts = split_at(packs, 2);
        let sizes: Vec<Vec<usize>> = parts
            .iter()
            .map(|p| p.iter().map(|x| x.entries.len()).collect())
            .collect();
        assert_eq!(sizes, vec![vec![1, 1], vec![3], vec![1, 1], vec![1]]);
    }
}
