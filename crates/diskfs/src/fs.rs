//! The uniform, read-only file-system interface every reader implements, the
//! in-image path rules, and [`open`], which picks the reader for a
//! partition.

use std::io::{self, Read, Seek, SeekFrom};

use crate::detect::FsType;
use crate::error::{show, Error};
use crate::partition::Partition;
use crate::read_at::{Source, Window};

/// A directory listing longer than this is refused (a hostile image may
/// claim any number of entries; listings are held in memory).
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Symlink targets longer than this are refused.
pub const MAX_LINK_BYTES: u64 = 64 * 1024;

/// What kind of object an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Devices, FIFOs, sockets, reparse points other than links.
    Other,
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: u32,
}

/// One object of a file system, as `list` and `stat` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name as stored (UTF-8 for FAT long names and NTFS, whose on-disk
    /// names are UTF-16); never contains `/` or NUL.
    pub name: Vec<u8>,
    pub kind: FileKind,
    /// Bytes of content (a sparse file's apparent size).
    pub size: u64,
    /// Full Unix mode (type and permission bits), where the file system has
    /// one (ext); `None` on FAT and NTFS.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<Timestamp>,
    /// The link's target, verbatim, for symlinks.
    pub symlink_target: Option<Vec<u8>>,
    /// Inode / MFT record / first cluster, where the reader knows it.
    pub id: Option<u64>,
    pub nlink: Option<u64>,
}

impl DirEntry {
    /// The name for display (invalid UTF-8 replaced).
    pub fn display_name(&self) -> String {
        show(&self.name)
    }
}

/// An open regular file: read sequentially or seek; the content is streamed
/// from the image, never held whole.
pub trait FileContent: Read + Seek {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A read-only file system inside a partition.
///
/// Paths are `/`-separated byte strings from the file system's root (a
/// leading `/` is optional, `/` alone is the root). `.` and `..` components,
/// empty components and NUL bytes are refused. Path lookup never follows a
/// symbolic link: a link met before the last component is
/// [`Error::SymlinkInPath`], and `stat`/`list`/`open_file` on a link
/// describe or refuse the link itself; [`FileSystem::readlink`] is the
/// explicit way to read where it points.
pub trait FileSystem {
    fn fs_type(&self) -> FsType;
    /// The directory's entries without `.` and `..`, in on-disk order.
    fn list(&self, dir: &[u8]) -> Result<Vec<DirEntry>, Error>;
    /// The object at `path` (not following a final symlink).
    fn stat(&self, path: &[u8]) -> Result<DirEntry, Error>;
    /// A symlink's target, verbatim.
    fn readlink(&self, path: &[u8]) -> Result<Vec<u8>, Error>;
    /// A regular file's content as a stream.
    fn open_file(&self, path: &[u8]) -> Result<Box<dyn FileContent + '_>, Error>;

    /// Reads into `buf` from `offset` of a file; returns the bytes read
    /// (fewer only at the end of the file).
    fn read_at(&self, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        let mut file = self.open_file(path)?;
        let io_err = |e: io::Error| Error::io(offset, buf.len(), e);
        file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        let mut done = 0;
        while done < buf.len() {
            match file.read(&mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(offset, buf.len(), e)),
            }
        }
        Ok(done)
    }
}

/// Splits an in-image path into its components, refusing what could escape
/// or confuse a lookup.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, Error> {
    let invalid = |reason| Error::InvalidPath {
        path: show(path),
        reason,
    };
    if path.contains(&0) {
        return Err(invalid("contains a NUL byte"));
    }
    let trimmed = path.strip_prefix(b"/").unwrap_or(path);
    let trimmed = trimmed.strip_suffix(b"/").unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for c in trimmed.split(|b| *b == b'/') {
        match c {
            b"" => return Err(invalid("empty component")),
            b"." | b".." => return Err(invalid("'.' or '..' component")),
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// `/`-joined absolute form of components.
pub(crate) fn join(components: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in components {
        out.push(b'/');
        out.extend_from_slice(c);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// Opens the file system in `partition` of the disk `disk`. Recognised but
/// unsupported contents are [`Error::Unsupported`], unrecognised ones
/// [`Error::UnknownFs`].
pub fn open(disk: &Source, partition: &Partition) -> Result<Box<dyn FileSystem>, Error> {
    let window: Source = std::sync::Arc::new(Window::new(
        disk.clone(),
        partition.start_bytes,
        partition.size_bytes,
    ));
    open_volume(window, partition.fs, partition.number)
}

/// Opens a file system of a known type over a source that starts with it.
pub fn open_volume(
    volume: Source,
    fs: FsType,
    partition: u32,
) -> Result<Box<dyn FileSystem>, Error> {
    match fs {
        FsType::Ext2 | FsType::Ext3 | FsType::Ext4 => {
            Ok(Box::new(crate::ext4::Ext4Fs::open(volume, fs)?))
        }
        FsType::Fat12 | FsType::Fat16 | FsType::Fat32 => crate::fat::open(volume),
        FsType::Ntfs => crate::ntfs::open(volume),
        FsType::Unknown => Err(Error::UnknownFs { partition }),
        other => Err(Error::Unsupported {
            partition,
            fs: other,
        }),
    }
}

/// Unix seconds of a proleptic Gregorian civil date (UTC).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_components() {
        assert!(components(b"/").unwrap().is_empty());
        assert!(components(b"").unwrap().is_empty());
        assert_eq!(components(b"/a/b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert_eq!(components(b"a/b").unwrap(), vec![&b"a"[..], b"b"]);
        for bad in [&b"/a/../b"[..], b"/a//b", b"/./a", b"/a\0b", b".."] {
            assert!(
                matches!(components(bad), Err(Error::InvalidPath { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1980, 1, 1) * 86_400, 315_532_800);
    }
}
