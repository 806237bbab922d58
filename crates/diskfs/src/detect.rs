//! File-system detection by magic numbers, over the first bytes of a
//! partition (pure: bytes in, a verdict out). Owns no reading and no parsing
//! beyond the few fields that tell file systems apart.

use std::fmt;

/// How many bytes from a partition's start detection looks at (ZFS's first
/// uberblock lies at 128 KiB; Btrfs's superblock at 64 KiB).
pub const PROBE_BYTES: usize = 132 * 1024;

/// A file system (or other content) recognised at a partition's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FsType {
    Ext2,
    Ext3,
    Ext4,
    Fat12,
    Fat16,
    Fat32,
    Ntfs,
    // Recognised, not readable by this crate:
    ExFat,
    Lvm2,
    Xfs,
    Btrfs,
    Luks,
    Swap,
    Zfs,
    /// Nothing recognised.
    Unknown,
}

impl FsType {
    /// True for the file systems this crate can read.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            FsType::Ext2
                | FsType::Ext3
                | FsType::Ext4
                | FsType::Fat12
                | FsType::Fat16
                | FsType::Fat32
                | FsType::Ntfs
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext2 => "ext2",
            FsType::Ext3 => "ext3",
            FsType::Ext4 => "ext4",
            FsType::Fat12 => "fat12",
            FsType::Fat16 => "fat16",
            FsType::Fat32 => "fat32",
            FsType::Ntfs => "ntfs",
            FsType::ExFat => "exfat",
            FsType::Lvm2 => "lvm2 physical volume",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
            FsType::Luks => "luks",
            FsType::Swap => "linux swap",
            FsType::Zfs => "zfs",
            FsType::Unknown => "unknown",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn at(head: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    head.get(offset..offset.checked_add(len)?)
}

fn u16_at(head: &[u8], offset: usize) -> Option<u16> {
    at(head, offset, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(head: &[u8], offset: usize) -> Option<u32> {
    at(head, offset, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The FAT variant a boot sector describes, or `None` if its BIOS parameter
/// block is not a sane FAT one. The variant follows from the cluster count
/// alone (Microsoft's FAT specification), not from the label strings.
pub(crate) fn fat_type(head: &[u8]) -> Option<FsType> {
    if at(head, 510, 2)? != [0x55, 0xAA] && at(head, 0x36, 3)? != b"FAT" {
        return None;
    }
    let bytes_per_sector = u32::from(u16_at(head, 11)?);
    let sectors_per_cluster = u32::from(*head.get(13)?);
    let reserved = u32::from(u16_at(head, 14)?);
    let fats = u32::from(*head.get(16)?);
    let root_entries = u32::from(u16_at(head, 17)?);
    let total16 = u32::from(u16_at(head, 19)?);
    let fat16 = u32::from(u16_at(head, 22)?);
    let total32 = u32_at(head, 32)?;
    let fat32 = u32_at(head, 36)?;
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        || !sectors_per_cluster.is_power_of_two()
        || reserved == 0
        || !(1..=4).contains(&fats)
        || !matches!(head.first()?, 0xEB | 0xE9)
    {
        return None;
    }
    let total = if total16 != 0 { total16 } else { total32 };
    let fat_size = if fat16 != 0 { fat16 } else { fat32 };
    let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
    let meta =
        u64::from(reserved) + u64::from(fats) * u64::from(fat_size) + u64::from(root_sectors);
    let data = u64::from(total).checked_sub(meta)?;
    let clusters = data / u64::from(sectors_per_cluster);
    if fat_size == 0 || clusters == 0 {
        return None;
    }
    Some(if clusters < 4085 {
        FsType::Fat12
    } else if clusters < 65525 {
        FsType::Fat16
    } else {
        FsType::Fat32
    })
}

/// What lies at the start of a partition, from its first bytes (up to
/// [`PROBE_BYTES`]; fewer are fine, the magics past the end are then absent).
pub fn detect(head: &[u8]) -> FsType {
    // ext2/3/4: superblock at 1024, magic 0xEF53 at +56.
    if u16_at(head, 1024 + 56) == Some(0xEF53) {
        let compat = u32_at(head, 1024 + 92).unwrap_or(0);
        let incompat = u32_at(head, 1024 + 96).unwrap_or(0);
        const HAS_JOURNAL: u32 = 0x4;
        // extents, 64bit, flex_bg
        const EXT4_ONLY: u32 = 0x40 | 0x80 | 0x200;
        return if incompat & EXT4_ONLY != 0 {
            FsType::Ext4
        } else if compat & HAS_JOURNAL != 0 {
            FsType::Ext3
        } else {
            FsType::Ext2
        };
    }
    match at(head, 3, 8) {
        Some(b"NTFS    ") => return FsType::Ntfs,
        Some(b"EXFAT   ") => return FsType::ExFat,
        _ => {}
    }
    if at(head, 0, 4) == Some(b"XFSB") {
        return FsType::Xfs;
    }
    if at(head, 0, 6) == Some(b"LUKS\xba\xbe") {
        return FsType::Luks;
    }
    // LVM2: the label may sit in any of the first four sectors.
    for sector in 0..4 {
        let base = sector * 512;
        if at(head, base, 8) == Some(b"LABELONE") && at(head, base + 24, 8) == Some(b"LVM2 001") {
            return FsType::Lvm2;
        }
    }
    if at(head, 65536 + 0x40, 8) == Some(b"_BHRfS_M") {
        return FsType::Btrfs;
    }
    for page in [4096usize, 8192, 16384, 65536] {
        if let Some(magic) = at(head, page - 10, 10) {
            if magic == b"SWAPSPACE2" || magic == b"SWAP-SPACE" {
                return FsType::Swap;
            }
        }
    }
    // ZFS: label 0's uberblock array starts 128 KiB in; magic 0x00bab10c in
    // either byte order.
    if let Some(b) = at(head, 128 * 1024, 8) {
        let magic = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        if magic == 0x00ba_b10c || magic.swap_bytes() == 0x00ba_b10c {
            return FsType::Zfs;
        }
    }
    if let Some(fat) = fat_type(head) {
        return fat;
    }
    FsType::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; PROBE_BYTES];
        v[offset..offset + magic.len()].copy_from_slice(magic);
        v
    }

    #[test]
    fn magics() {
        assert_eq!(detect(&with(0, b"XFSB")), FsType::Xfs);
        assert_eq!(detect(&with(0, b"LUKS\xba\xbe")), FsType::Luks);
        assert_eq!(detect(&with(65536 + 0x40, b"_BHRfS_M")), FsType::Btrfs);
        assert_eq!(detect(&with(4086, b"SWAPSPACE2")), FsType::Swap);
        assert_eq!(detect(&with(3, b"NTFS    ")), FsType::Ntfs);
        assert_eq!(detect(&with(3, b"EXFAT   ")), FsType::ExFat);
        let mut lvm = with(512, b"LABELONE");
        lvm[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        assert_eq!(detect(&lvm), FsType::Lvm2);
        assert_eq!(
            detect(&with(128 * 1024, &0x00bab10cu64.to_le_bytes())),
            FsType::Zfs
        );
        assert_eq!(detect(&[0u8; 10]), FsType::Unknown);
        assert_eq!(detect(&[]), FsType::Unknown);
    }
}
