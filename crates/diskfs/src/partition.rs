//! Partition tables: MBR (with extended/logical partitions) and GPT.
//!
//! The parsers (`parse_*`) take byte slices and return values; only
//! [`read_partitions`] reads, through [`ReadAt`]. Every offset and count
//! taken from the disk is checked against the disk's size and fixed limits
//! before use.

use std::collections::HashSet;
use std::fmt;

use crate::detect::{self, FsType};
use crate::error::PartitionError;
use crate::read_at::{read_head, ReadAt, Source, Window};

/// MBR sector size; GPT is looked for at 512- and 4096-byte sectors.
const MBR_SECTOR: u64 = 512;
/// More logical partitions than this in an extended chain is taken as a loop.
const MAX_LOGICAL: usize = 128;
/// Largest GPT entry array read (the usual one is 16 KiB).
const MAX_GPT_ARRAY_BYTES: u64 = 1024 * 1024;

/// A GPT GUID, kept in on-disk byte order (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses the textual form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn parse(text: &str) -> Option<Guid> {
        let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 || text.len() != 36 {
            return None;
        }
        let mut be = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            be[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        let mut disk = be;
        disk[0..4].reverse();
        disk[4..6].reverse();
        disk[6..8].reverse();
        Some(Guid(disk))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..16] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

const GPT_NAMES: &[(&str, &str)] = &[
    ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EFI System"),
    ("21686148-6449-6E6F-744E-656564454649", "BIOS boot"),
    ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", "Linux filesystem"),
    ("E6D6D379-F507-44C2-A23C-238F2A3DF928", "Linux LVM"),
    ("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "Linux swap"),
    ("A19D880F-05FC-4D3B-A006-743F0F84911E", "Linux RAID"),
    (
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        "Linux root (x86-64)",
    ),
    (
        "BC13C2FF-59E6-4262-A352-B275FD6F7172",
        "Linux extended boot",
    ),
    ("933AC7E1-2EB4-4F13-B844-0E14E2AEF915", "Linux home"),
    (
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "Microsoft basic data",
    ),
    ("E3C9E316-0B5C-4DB8-817D-F92DF00215AE", "Microsoft reserved"),
    ("DE94BBA4-06D1-4D40-A16A-BFD50179D6AC", "Windows recovery"),
];

fn mbr_type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0e => "FAT16",
        0x05 | 0x0f | 0x85 => "Extended",
        0x07 => "NTFS/exFAT",
        0x0b | 0x0c => "FAT32",
        0x27 => "Windows recovery",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xef => "EFI System",
        0xee => "GPT protective",
        0xfd => "Linux RAID",
        _ => return None,
    })
}

/// A partition's type as the table records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionType {
    Mbr(u8),
    Gpt(Guid),
    /// The pseudo-partition of a disk without a partition table.
    WholeDisk,
}

impl PartitionType {
    /// A human name for common types.
    pub fn name(&self) -> Option<&'static str> {
        match self {
            PartitionType::Mbr(t) => mbr_type_name(*t),
            PartitionType::Gpt(g) => {
                let text = g.to_string();
                GPT_NAMES
                    .iter()
                    .find(|(id, _)| *id == text)
                    .map(|(_, n)| *n)
            }
            PartitionType::WholeDisk => Some("whole disk"),
        }
    }
}

impl fmt::Display for PartitionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionType::Mbr(t) => write!(f, "0x{t:02x}")?,
            PartitionType::Gpt(g) => write!(f, "{g}")?,
            PartitionType::WholeDisk => f.write_str("-")?,
        }
        if let Some(name) = self.name() {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

/// Which kind of table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Mbr,
    Gpt,
    /// No partition table: one pseudo-partition numbered 0 covering the disk.
    None,
}

/// One partition and what lies at its start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// MBR: 1-4 primary, 5.. logical in chain order. GPT: 1-based entry
    /// index. No table: 0 (the whole disk).
    pub number: u32,
    pub partition_type: PartitionType,
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// GPT partition name, if any.
    pub name: Option<String>,
    pub fs: FsType,
}

/// The disk's table and its partitions, in number order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    pub scheme: Scheme,
    pub partitions: Vec<Partition>,
}

impl PartitionTable {
    pub fn get(&self, number: u32) -> Result<&Partition, PartitionError> {
        self.partitions
            .iter()
            .find(|p| p.number == number)
            .ok_or(PartitionError::NoSuchPartition(number))
    }
}

// ---- pure parsers ----------------------------------------------------------

/// One 16-byte MBR/EBR partition entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MbrEntry {
    pub status: u8,
    pub kind: u8,
    pub first_lba: u32,
    pub sectors: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The four entries of an MBR or EBR sector, or `None` without the 0x55AA
/// signature. Empty entries (type 0 or no sectors) are `None`.
pub fn parse_mbr(sector: &[u8; 512]) -> Option<[Option<MbrEntry>; 4]> {
    if sector[510..512] != [0x55, 0xAA] {
        return None;
    }
    let mut out = [None; 4];
    for (i, slot) in out.iter_mut().enumerate() {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        let entry = MbrEntry {
            status: e[0],
            kind: e[4],
            first_lba: le32(e, 8),
            sectors: le32(e, 12),
        };
        if entry.kind != 0 && entry.sectors != 0 {
            *slot = Some(entry);
        }
    }
    Some(out)
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A checked GPT header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptHeader {
    pub current_lba: u64,
    pub backup_lba: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
}

/// Parses and checks the header in `sector` (one logical block read at
/// `lba`): signature, header size, header CRC, entry size and count limits.
pub fn parse_gpt_header(sector: &[u8], lba: u64) -> Result<GptHeader, PartitionError> {
    let bad = |reason: &str| PartitionError::GptHeader {
        lba,
        reason: reason.to_string(),
    };
    if sector.len() < 92 || &sector[0..8] != b"EFI PART" {
        return Err(bad("no 'EFI PART' signature"));
    }
    let header_size = le32(sector, 12) as usize;
    if header_size < 92 || header_size > sector.len() {
        return Err(bad("header size out of range"));
    }
    let mut copy = sector[..header_size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(sector, 16) {
        return Err(bad("header crc mismatch"));
    }
    let header = GptHeader {
        current_lba: le64(sector, 24),
        backup_lba: le64(sector, 32),
        entries_lba: le64(sector, 72),
        entry_count: le32(sector, 80),
        entry_size: le32(sector, 84),
        entries_crc: le32(sector, 88),
    };
    if header.entry_size < 128 || !header.entry_size.is_multiple_of(8) || header.entry_size > 4096 {
        return Err(bad("partition entry size out of range"));
    }
    if u64::from(header.entry_count) * u64::from(header.entry_size) > MAX_GPT_ARRAY_BYTES {
        return Err(bad("partition entry array larger than 1 MiB"));
    }
    Ok(header)
}

/// One used GPT entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptEntry {
    /// 1-based index in the array.
    pub index: u32,
    pub type_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub name: String,
}

/// The used entries of a GPT entry array (checked against the header's CRC).
pub fn parse_gpt_entries(
    array: &[u8],
    header: &GptHeader,
) -> Result<Vec<GptEntry>, PartitionError> {
    let bad = |reason: &str| PartitionError::GptEntries {
        lba: header.entries_lba,
        reason: reason.to_string(),
    };
    let len = header.entry_count as usize * header.entry_size as usize;
    if array.len() < len {
        return Err(bad("entry array truncated"));
    }
    let array = &array[..len];
    if crc32(array) != header.entries_crc {
        return Err(bad("entry array crc mismatch"));
    }
    let mut out = Vec::new();
    for (i, e) in array.chunks_exact(header.entry_size as usize).enumerate() {
        let type_guid = Guid(e[0..16].try_into().expect("16 bytes"));
        if type_guid.0 == [0; 16] {
            continue;
        }
        let first_lba = le64(e, 32);
        let last_lba = le64(e, 40);
        if last_lba < first_lba {
            return Err(bad("an entry ends before it starts"));
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        let name = char::decode_utf16(units)
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect();
        out.push(GptEntry {
            index: i as u32 + 1,
            type_guid,
            first_lba,
            last_lba,
            name,
        });
    }
    Ok(out)
}

// ---- reading ---------------------------------------------------------------

fn read_exact(src: &dyn ReadAt, offset: u64, buf: &mut [u8]) -> Result<(), PartitionError> {
    src.read_at(offset, buf)
        .map_err(|source| PartitionError::Io { offset, source })
}

fn read_sector(src: &dyn ReadAt, offset: u64) -> Result<Option<[u8; 512]>, PartitionError> {
    if offset.checked_add(512).is_none_or(|end| end > src.size()) {
        return Ok(None);
    }
    let mut s = [0u8; 512];
    read_exact(src, offset, &mut s)?;
    Ok(Some(s))
}

/// What lies at `start` of `src` for `len` bytes.
pub fn detect_at(src: &Source, start: u64, len: u64) -> Result<FsType, PartitionError> {
    let window = Window::new(src.clone(), start, len);
    let head = read_head(&window, detect::PROBE_BYTES).map_err(|source| PartitionError::Io {
        offset: start,
        source,
    })?;
    Ok(detect::detect(&head))
}

fn try_gpt(src: &Source) -> Result<Option<Vec<Partition>>, PartitionError> {
    let size = src.size();
    for block in [512u64, 4096] {
        if size < block * 2 {
            continue;
        }
        let mut sector = vec![0u8; block as usize];
        read_exact(&**src, block, &mut sector)?;
        if &sector[0..8] != b"EFI PART" {
            continue;
        }
        // Primary header; on a bad one, the backup in the disk's last block.
        let header = match parse_gpt_header(&sector, 1) {
            Ok(h) => h,
            Err(primary) => {
                let last = size / block - 1;
                read_exact(&**src, last * block, &mut sector)?;
                parse_gpt_header(&sector, last).map_err(|_| primary)?
            }
        };
        let array_len = u64::from(header.entry_count) * u64::from(header.entry_size);
        let array_off = header.entries_lba.checked_mul(block);
        let Some(array_off) =
            array_off.filter(|o| o.checked_add(array_len).is_some_and(|e| e <= size))
        else {
            return Err(PartitionError::GptEntries {
                lba: header.entries_lba,
                reason: "entry array lies past the disk's end".into(),
            });
        };
        let mut array = vec![0u8; array_len as usize];
        read_exact(&**src, array_off, &mut array)?;
        let mut parts = Vec::new();
        for e in parse_gpt_entries(&array, &header)? {
            let start = e.first_lba.saturating_mul(block);
            let size_bytes = (e.last_lba - e.first_lba + 1).saturating_mul(block);
            parts.push(Partition {
                number: e.index,
                partition_type: PartitionType::Gpt(e.type_guid),
                start_bytes: start,
                size_bytes,
                name: Some(e.name),
                fs: detect_at(src, start, size_bytes)?,
            });
        }
        return Ok(Some(parts));
    }
    Ok(None)
}

fn mbr_partition(
    src: &Source,
    number: u32,
    e: &MbrEntry,
    base: u64,
) -> Result<Partition, PartitionError> {
    let start = base.saturating_add(u64::from(e.first_lba) * MBR_SECTOR);
    let size_bytes = u64::from(e.sectors) * MBR_SECTOR;
    Ok(Partition {
        number,
        partition_type: PartitionType::Mbr(e.kind),
        start_bytes: start,
        size_bytes,
        name: None,
        fs: detect_at(src, start, size_bytes)?,
    })
}

fn walk_extended(
    src: &Source,
    ext_start: u64,
    out: &mut Vec<Partition>,
) -> Result<(), PartitionError> {
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    let mut number = 5;
    loop {
        if !seen.insert(ebr) || seen.len() > MAX_LOGICAL {
            return Err(PartitionError::ExtendedChain {
                offset: ebr,
                reason: "the chain loops or is too long",
            });
        }
        let Some(sector) = read_sector(&**src, ebr)? else {
            return Err(PartitionError::ExtendedChain {
                offset: ebr,
                reason: "an ebr lies past the disk's end",
            });
        };
        let Some(entries) = parse_mbr(&sector) else {
            return Err(PartitionError::ExtendedChain {
                offset: ebr,
                reason: "an ebr lacks the 0x55aa signature",
            });
        };
        // Entry 0: the logical partition, relative to this EBR.
        if let Some(e) = entries[0].filter(|e| !is_extended(e.kind)) {
            out.push(mbr_partition(src, number, &e, ebr)?);
            number += 1;
        }
        // Entry 1: the next EBR, relative to the extended partition's start.
        match entries[1].filter(|e| is_extended(e.kind)) {
            Some(next) => ebr = ext_start.saturating_add(u64::from(next.first_lba) * MBR_SECTOR),
            None => return Ok(()),
        }
    }
}

/// Reads the partition table of `src` and detects the file system at each
/// partition's start. A disk with a file system at offset 0 (or no valid
/// table) is one pseudo-partition numbered 0 with scheme [`Scheme::None`].
pub fn read_partitions(src: &Source) -> Result<PartitionTable, PartitionError> {
    let whole = |fs| PartitionTable {
        scheme: Scheme::None,
        partitions: vec![Partition {
            number: 0,
            partition_type: PartitionType::WholeDisk,
            start_bytes: 0,
            size_bytes: src.size(),
            name: None,
            fs,
        }],
    };
    let sector0 = read_sector(&**src, 0)?;
    let mbr = sector0.as_ref().and_then(parse_mbr);
    let protective = mbr.is_some_and(|m| m.iter().flatten().any(|e| e.kind == 0xee));
    if protective {
        if let Some(parts) = try_gpt(src)? {
            return Ok(PartitionTable {
                scheme: Scheme::Gpt,
                partitions: parts,
            });
        }
    }
    // A file system boot sector (FAT, NTFS) also ends in 0x55AA: a file
    // system found at offset 0 wins over reading its boot code as a table.
    let fs0 = detect_at(src, 0, src.size())?;
    if fs0 != FsType::Unknown {
        return Ok(whole(fs0));
    }
    let Some(entries) = mbr else {
        return Ok(whole(FsType::Unknown));
    };
    if entries.iter().flatten().any(|e| e.status & 0x7f != 0) {
        // Not a partition table (boot flags are 0x00 or 0x80).
        return Ok(whole(FsType::Unknown));
    }
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(e) = e else { continue };
        if is_extended(e.kind) {
            let ext_start = u64::from(e.first_lba) * MBR_SECTOR;
            parts.push(Partition {
                number: i as u32 + 1,
                partition_type: PartitionType::Mbr(e.kind),
                start_bytes: ext_start,
                size_bytes: u64::from(e.sectors) * MBR_SECTOR,
                name: None,
                fs: FsType::Unknown,
            });
            let mut logical = Vec::new();
            walk_extended(src, ext_start, &mut logical)?;
            parts.extend(logical);
        } else {
            parts.push(mbr_partition(src, i as u32 + 1, e, 0)?);
        }
    }
    parts.sort_by_key(|p| p.number);
    Ok(PartitionTable {
        scheme: Scheme::Mbr,
        partitions: parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn guid_text_round_trip() {
        let text = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
        let g = Guid::parse(text).unwrap();
        assert_eq!(g.0[0..4], [0x28, 0x73, 0x2A, 0xC1]);
        assert_eq!(g.to_string(), text);
        assert_eq!(PartitionType::Gpt(g).name(), Some("EFI System"));
    }

    fn entry(sector: &mut [u8], slot: usize, kind: u8, lba: u32, sectors: u32) {
        let e = &mut sector[446 + 16 * slot..446 + 16 * (slot + 1)];
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }

    #[test]
    fn extended_chain_that_loops_is_an_error() {
        let mut disk = vec![0u8; 64 * 512];
        disk[510] = 0x55;
        disk[511] = 0xAA;
        entry(&mut disk, 0, 0x05, 8, 32);
        // EBR at sector 8: a logical partition, then "next" pointing back
        // at itself (relative 0).
        let ebr = &mut disk[8 * 512..9 * 512];
        ebr[510] = 0x55;
        ebr[511] = 0xAA;
        entry(ebr, 0, 0x83, 2, 4);
        entry(ebr, 1, 0x05, 0, 16);
        let src: Source = Arc::new(disk);
        let err = read_partitions(&src).unwrap_err();
        assert!(matches!(err, PartitionError::ExtendedChain { .. }), "{err}");
    }

    #[test]
    fn empty_disk_is_one_unknown_pseudo_partition() {
        let src: Source = Arc::new(vec![0u8; 4096]);
        let t = read_partitions(&src).unwrap();
        assert_eq!(t.scheme, Scheme::None);
        assert_eq!(t.partitions[0].number, 0);
        assert_eq!(t.partitions[0].fs, FsType::Unknown);
    }
}
