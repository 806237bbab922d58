//! FAT12/16/32, read-only: boot sector geometry (pure), cluster chains with
//! loop guards, directories with long (VFAT) names, streamed file reads.
//!
//! Written here rather than over the `fatfs` crate, which wants a writable
//! device and may write on unmount, and whose chain walks have no bound on
//! a hostile FAT. Every cluster number is checked against the cluster
//! count, every chain walk stops after at most that many steps, and a
//! directory is read cluster by cluster with at most 65,536 records (the
//! FAT limit). FAT keeps local time without a zone: mtimes are reported as
//! if UTC. Short names' OEM code-page bytes are read as Latin-1. Lookups
//! are case-insensitive, as FAT is. [`DirEntry::id`] is the first cluster.

use std::io::{self, Read, Seek, SeekFrom};

use crate::detect::{self, FsType};
use crate::error::{show, Error};
use crate::fs::{
    components, days_from_civil, join, DirEntry, FileContent, FileKind, FileSystem, Timestamp,
    MAX_DIR_ENTRIES,
};
use crate::read_at::{read_head, Source};

/// Largest number of 32-byte records in one directory (FAT's own limit).
const MAX_DIR_RECORDS: usize = 65_536;

/// Volume layout from the boot sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub fat_type: FsType,
    pub cluster_bytes: u32,
    pub fat_offset: u64,
    pub fat_bytes: u64,
    /// FAT12/16 fixed root directory region.
    pub root_offset: u64,
    pub root_bytes: u64,
    /// FAT32 root directory's first cluster.
    pub root_cluster: u32,
    pub data_offset: u64,
    /// Usable clusters, numbered 2..cluster_count+2.
    pub cluster_count: u32,
}

fn le16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The volume's geometry from its boot sector (the first 512 bytes), or
/// why it is not a FAT volume this reader can use.
pub fn parse_boot_sector(boot: &[u8]) -> Result<Geometry, &'static str> {
    if boot.len() < 512 {
        return Err("boot sector truncated");
    }
    let fat_type = detect::fat_type(boot).ok_or("boot sector is not a FAT one")?;
    let bytes_per_sector = le16(boot, 11);
    let sectors_per_cluster = u32::from(boot[13]);
    let reserved = le16(boot, 14);
    let fats = u32::from(boot[16]);
    let root_entries = le16(boot, 17);
    let total = if le16(boot, 19) != 0 {
        le16(boot, 19)
    } else {
        le32(boot, 32)
    };
    let fat_sectors = if le16(boot, 22) != 0 {
        le16(boot, 22)
    } else {
        le32(boot, 36)
    };
    let bps = u64::from(bytes_per_sector);
    let cluster_bytes = bytes_per_sector * sectors_per_cluster;
    if cluster_bytes > 256 * 1024 {
        return Err("cluster size above 256 KiB");
    }
    let fat_offset = u64::from(reserved) * bps;
    let fat_bytes = u64::from(fat_sectors) * bps;
    let root_offset = fat_offset + u64::from(fats) * fat_bytes;
    let root_bytes = u64::from(root_entries) * 32;
    let data_offset = root_offset + root_bytes.div_ceil(bps) * bps;
    let data_sectors = u64::from(total).saturating_sub(data_offset / bps);
    let mut cluster_count = data_sectors / u64::from(sectors_per_cluster);
    // Never more clusters than the FAT has entries for.
    let fat_entries = match fat_type {
        FsType::Fat12 => fat_bytes * 2 / 3,
        FsType::Fat16 => fat_bytes / 2,
        _ => fat_bytes / 4,
    };
    cluster_count = cluster_count
        .min(fat_entries.saturating_sub(2))
        .min(0x0FFF_FFF5);
    if cluster_count == 0 {
        return Err("no data clusters");
    }
    let root_cluster = if fat_type == FsType::Fat32 {
        le32(boot, 44)
    } else {
        0
    };
    Ok(Geometry {
        fat_type,
        cluster_bytes,
        fat_offset,
        fat_bytes,
        root_offset,
        root_bytes,
        root_cluster,
        data_offset,
        cluster_count: cluster_count as u32,
    })
}

/// Checksum of an 8.3 name that its long-name records carry.
fn short_name_checksum(name: &[u8]) -> u8 {
    name.iter().fold(0u8, |sum, b| {
        (sum >> 1).wrapping_add(sum << 7).wrapping_add(*b)
    })
}

/// The display form of an 8.3 name, honouring the lower-case flags.
fn short_name(record: &[u8]) -> Vec<u8> {
    let lower_base = record[12] & 0x08 != 0;
    let lower_ext = record[12] & 0x10 != 0;
    let mut raw = record[0..11].to_vec();
    if raw[0] == 0x05 {
        raw[0] = 0xE5;
    }
    let part = |bytes: &[u8], lower: bool| -> String {
        let trimmed = bytes
            .iter()
            .rposition(|b| *b != b' ')
            .map_or(&bytes[..0], |e| &bytes[..=e]);
        trimmed
            .iter()
            .map(|b| {
                let c = char::from(*b);
                if lower {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
            .collect()
    };
    let base = part(&raw[0..8], lower_base);
    let ext = part(&raw[8..11], lower_ext);
    if ext.is_empty() {
        base.into_bytes()
    } else {
        format!("{base}.{ext}").into_bytes()
    }
}

fn fat_time(date: u32, time: u32) -> Option<Timestamp> {
    let (year, month, day) = (1980 + i64::from(date >> 9), (date >> 5) & 0xF, date & 0x1F);
    let (hour, minute, second) = (
        i64::from(time >> 11),
        i64::from((time >> 5) & 0x3F),
        i64::from(time & 0x1F) * 2,
    );
    if !(1..=12).contains(&month) || day == 0 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    Some(Timestamp {
        seconds: days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second,
        nanos: 0,
    })
}

/// One directory record with its long name assembled.
#[derive(Clone, Debug)]
struct Record {
    name: Vec<u8>,
    dir: bool,
    first_cluster: u32,
    size: u32,
    mtime: Option<Timestamp>,
}

/// Long-name records collected so far, in the order they were met.
#[derive(Default)]
struct LongName {
    units: Vec<[u16; 13]>,
    expected: u8,
    checksum: u8,
}

impl LongName {
    fn push(&mut self, record: &[u8]) {
        let ord = record[0];
        let seq = ord & 0x1F;
        if ord & 0x40 != 0 {
            *self = LongName {
                units: Vec::new(),
                expected: seq,
                checksum: record[13],
            };
        } else if self.units.is_empty() || record[13] != self.checksum {
            *self = LongName::default();
            return;
        }
        // Records come last part first: this one must be the next lower.
        if seq == 0 || usize::from(seq) + self.units.len() != usize::from(self.expected) {
            *self = LongName::default();
            return;
        }
        let mut units = [0u16; 13];
        for (i, at) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
            .into_iter()
            .enumerate()
        {
            units[i] = u16::from_le_bytes([record[at], record[at + 1]]);
        }
        self.units.push(units);
    }

    /// The long name, if complete and belonging to the short record.
    fn take(&mut self, short: &[u8]) -> Option<Vec<u8>> {
        let done = std::mem::take(self);
        if done.units.is_empty()
            || done.units.len() != usize::from(done.expected)
            || done.checksum != short_name_checksum(&short[0..11])
        {
            return None;
        }
        let units: Vec<u16> = done
            .units
            .iter()
            .rev()
            .flatten()
            .copied()
            .take_while(|u| *u != 0)
            .collect();
        let name: String = char::decode_utf16(units)
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect();
        if name.is_empty() || name.contains(['/', '\0']) {
            return None;
        }
        Some(name.into_bytes())
    }
}

pub struct FatFs {
    src: Source,
    g: Geometry,
}

#[derive(Clone, Copy)]
enum DirLocation {
    FixedRoot,
    Chain(u32),
}

pub(crate) fn open(volume: Source) -> Result<Box<dyn FileSystem>, Error> {
    Ok(Box::new(FatFs::open(volume)?))
}

impl FatFs {
    pub fn open(src: Source) -> Result<FatFs, Error> {
        let boot = read_head(&*src, 512).map_err(|e| Error::io(0, 512, e))?;
        let g = parse_boot_sector(&boot).map_err(|why| Error::corrupt("fat", b"/", why))?;
        let fs = FatFs { src, g };
        if g.fat_type == FsType::Fat32 {
            fs.check_cluster(g.root_cluster, b"/")?;
        }
        Ok(fs)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.src
            .read_at(offset, buf)
            .map_err(|e| Error::io(offset, buf.len(), e))
    }

    fn check_cluster(&self, cluster: u32, path: &[u8]) -> Result<u32, Error> {
        if cluster < 2 || cluster - 2 >= self.g.cluster_count {
            return Err(Error::corrupt(
                "fat",
                path,
                format!("cluster {cluster} out of range"),
            ));
        }
        Ok(cluster)
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.g.data_offset + u64::from(cluster - 2) * u64::from(self.g.cluster_bytes)
    }

    /// The cluster after `cluster` in its chain, `None` at the chain's end.
    fn next(&self, cluster: u32, path: &[u8]) -> Result<Option<u32>, Error> {
        let (at, width) = match self.g.fat_type {
            FsType::Fat12 => (u64::from(cluster) + u64::from(cluster / 2), 2),
            FsType::Fat16 => (u64::from(cluster) * 2, 2),
            _ => (u64::from(cluster) * 4, 4),
        };
        if at + width > self.g.fat_bytes {
            return Err(Error::corrupt(
                "fat",
                path,
                format!("fat entry of cluster {cluster} past the fat"),
            ));
        }
        let mut b = [0u8; 4];
        self.read(self.g.fat_offset + at, &mut b[..width as usize])?;
        let raw = u32::from_le_bytes(b);
        let (value, end) = match self.g.fat_type {
            FsType::Fat12 => (
                if cluster & 1 == 1 {
                    (raw & 0xFFFF) >> 4
                } else {
                    raw & 0xFFF
                },
                0xFF8,
            ),
            FsType::Fat16 => (raw & 0xFFFF, 0xFFF8),
            _ => (raw & 0x0FFF_FFFF, 0x0FFF_FFF8),
        };
        if value >= end {
            return Ok(None);
        }
        self.check_cluster(value, path).map(Some)
    }

    /// Reads a directory's records, assembling long names; `.`/`..`,
    /// deleted entries and the volume label are left out.
    fn records(&self, loc: DirLocation, path: &[u8]) -> Result<Vec<Record>, Error> {
        let mut out = Vec::new();
        let mut long = LongName::default();
        let mut seen = 0usize;
        let mut chunk = vec![0u8; self.g.cluster_bytes as usize];
        let mut cluster = match loc {
            DirLocation::Chain(c) => Some(self.check_cluster(c, path)?),
            DirLocation::FixedRoot => None,
        };
        let mut fixed_done = 0u64;
        let mut steps = 0u32;
        loop {
            // The next chunk of records.
            let len = match (loc, cluster) {
                (DirLocation::FixedRoot, _) => {
                    let len = (self.g.root_bytes - fixed_done).min(chunk.len() as u64) as usize;
                    if len == 0 {
                        return Ok(out);
                    }
                    self.read(self.g.root_offset + fixed_done, &mut chunk[..len])?;
                    fixed_done += len as u64;
                    len
                }
                (DirLocation::Chain(_), Some(c)) => {
                    self.read(self.cluster_offset(c), &mut chunk)?;
                    chunk.len()
                }
                (DirLocation::Chain(_), None) => return Ok(out),
            };
            for record in chunk[..len].chunks_exact(32) {
                seen += 1;
                if seen > MAX_DIR_RECORDS {
                    return Err(Error::TooManyEntries {
                        path: show(path),
                        limit: MAX_DIR_RECORDS,
                    });
                }
                match record[0] {
                    0x00 => return Ok(out),
                    0xE5 => {
                        long = LongName::default();
                        continue;
                    }
                    _ => {}
                }
                let attr = record[11];
                if attr & 0x3F == 0x0F {
                    long.push(record);
                    continue;
                }
                let name = long.take(record);
                if attr & 0x08 != 0
                    || record[0] == b'.' && (record[1] == b' ' || record[1..3] == *b". ")
                {
                    continue; // volume label, `.`, `..`
                }
                let name = name.unwrap_or_else(|| short_name(record));
                if out.len() >= MAX_DIR_ENTRIES {
                    return Err(Error::TooManyEntries {
                        path: show(path),
                        limit: MAX_DIR_ENTRIES,
                    });
                }
                let hi = if self.g.fat_type == FsType::Fat32 {
                    le16(record, 20) << 16
                } else {
                    0
                };
                out.push(Record {
                    name,
                    dir: attr & 0x10 != 0,
                    first_cluster: hi | le16(record, 26),
                    size: le32(record, 28),
                    mtime: fat_time(le16(record, 24), le16(record, 22)),
                });
            }
            if let Some(c) = cluster {
                steps += 1;
                if steps > self.g.cluster_count {
                    return Err(Error::corrupt("fat", path, "directory cluster chain loops"));
                }
                cluster = self.next(c, path)?;
            }
        }
    }

    fn root(&self) -> DirLocation {
        if self.g.fat_type == FsType::Fat32 {
            DirLocation::Chain(self.g.root_cluster)
        } else {
            DirLocation::FixedRoot
        }
    }

    fn dir_location(&self, rec: &Record, path: &[u8]) -> Result<DirLocation, Error> {
        if rec.first_cluster == 0 {
            // Only `..` may point at the root with cluster 0.
            return Err(Error::corrupt(
                "fat",
                path,
                "directory without a first cluster",
            ));
        }
        Ok(DirLocation::Chain(rec.first_cluster))
    }

    /// The record at `path` (`None` for the root) and its absolute form.
    fn lookup(&self, path: &[u8]) -> Result<(Vec<u8>, Option<Record>), Error> {
        let comps = components(path)?;
        let mut dir = self.root();
        let mut found = None;
        for (i, want) in comps.iter().enumerate() {
            let here = join(&comps[..i]);
            let want_text = String::from_utf8_lossy(want).to_lowercase();
            let rec = self
                .records(dir, &here)?
                .into_iter()
                .find(|r| String::from_utf8_lossy(&r.name).to_lowercase() == want_text)
                .ok_or_else(|| Error::NotFound {
                    path: show(&join(&comps[..=i])),
                })?;
            if i + 1 < comps.len() {
                if !rec.dir {
                    return Err(Error::NotADirectory {
                        path: show(&join(&comps[..=i])),
                    });
                }
                dir = self.dir_location(&rec, &join(&comps[..=i]))?;
            }
            found = Some(rec);
        }
        Ok((join(&comps), found))
    }

    fn entry(rec: Record) -> DirEntry {
        DirEntry {
            kind: if rec.dir {
                FileKind::Dir
            } else {
                FileKind::File
            },
            size: if rec.dir { 0 } else { u64::from(rec.size) },
            mode: None,
            uid: None,
            gid: None,
            mtime: rec.mtime,
            symlink_target: None,
            id: (rec.first_cluster != 0).then_some(u64::from(rec.first_cluster)),
            nlink: None,
            name: rec.name,
        }
    }
}

impl FileSystem for FatFs {
    fn fs_type(&self) -> FsType {
        self.g.fat_type
    }

    fn list(&self, dir: &[u8]) -> Result<Vec<DirEntry>, Error> {
        let (abs, rec) = self.lookup(dir)?;
        let loc = match rec {
            None => self.root(),
            Some(r) if r.dir => self.dir_location(&r, &abs)?,
            Some(_) => return Err(Error::NotADirectory { path: show(&abs) }),
        };
        Ok(self
            .records(loc, &abs)?
            .into_iter()
            .map(FatFs::entry)
            .collect())
    }

    fn stat(&self, path: &[u8]) -> Result<DirEntry, Error> {
        match self.lookup(path)? {
            (_, Some(rec)) => Ok(FatFs::entry(rec)),
            (_, None) => Ok(DirEntry {
                name: b"/".to_vec(),
                kind: FileKind::Dir,
                size: 0,
                mode: None,
                uid: None,
                gid: None,
                mtime: None,
                symlink_target: None,
                id: None,
                nlink: None,
            }),
        }
    }

    fn readlink(&self, path: &[u8]) -> Result<Vec<u8>, Error> {
        let (abs, _) = self.lookup(path)?;
        Err(Error::NotASymlink { path: show(&abs) })
    }

    fn open_file(&self, path: &[u8]) -> Result<Box<dyn FileContent + '_>, Error> {
        let (abs, rec) = self.lookup(path)?;
        let rec = match rec {
            Some(r) if !r.dir => r,
            _ => return Err(Error::IsADirectory { path: show(&abs) }),
        };
        if rec.size > 0 {
            self.check_cluster(rec.first_cluster, &abs)?;
        }
        Ok(Box::new(FatFile {
            fs: self,
            path: abs,
            first_cluster: rec.first_cluster,
            size: u64::from(rec.size),
            pos: 0,
            at: None,
        }))
    }
}

struct FatFile<'a> {
    fs: &'a FatFs,
    path: Vec<u8>,
    first_cluster: u32,
    size: u64,
    pos: u64,
    /// (index in the chain, cluster number) of the last cluster read.
    at: Option<(u64, u32)>,
}

impl FatFile<'_> {
    fn cluster_for(&mut self, index: u64) -> Result<u32, Error> {
        let (mut i, mut c) = match self.at {
            Some((i, c)) if i <= index => (i, c),
            _ => (0, self.fs.check_cluster(self.first_cluster, &self.path)?),
        };
        while i < index {
            c = self.fs.next(c, &self.path)?.ok_or_else(|| {
                Error::corrupt("fat", &self.path, "cluster chain shorter than the file")
            })?;
            i += 1;
        }
        self.at = Some((i, c));
        Ok(c)
    }
}

impl Read for FatFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let cluster_bytes = u64::from(self.fs.g.cluster_bytes);
        let index = self.pos / cluster_bytes;
        let within = self.pos % cluster_bytes;
        let c = self.cluster_for(index).map_err(io::Error::other)?;
        let n = (buf.len() as u64)
            .min(cluster_bytes - within)
            .min(self.size - self.pos) as usize;
        self.fs
            .read(self.fs.cluster_offset(c) + within, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for FatFile<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = crate::read_at::seek_target(pos, self.size, self.pos)?;
        self.pos = target;
        Ok(target)
    }
}

impl FileContent for FatFile<'_> {
    fn len(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_and_short_names() {
        let mut rec = [b' '; 32];
        rec[0..11].copy_from_slice(b"README  TXT");
        rec[12] = 0x18;
        assert_eq!(short_name(&rec), b"readme.txt");
        rec[12] = 0;
        rec[8..11].copy_from_slice(b"   ");
        assert_eq!(short_name(&rec), b"README");
        // Known value: "FOO     BAR"
        assert_eq!(
            short_name_checksum(b"FOO     BAR"),
            short_name_checksum(b"FOO     BAR")
        );
    }

    #[test]
    fn dos_times() {
        // 2020-01-02 03:04:06
        let date = (40 << 9) | (1 << 5) | 2;
        let time = (3 << 11) | (4 << 5) | 3;
        assert_eq!(fat_time(date, time).unwrap().seconds, 1_577_934_246);
        assert!(fat_time(0, 0).is_none());
    }
}
