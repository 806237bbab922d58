//! NTFS through the `ntfs` crate, adapted to [`FileSystem`].
//!
//! Names come from the POSIX/Win32 `$FILE_NAME` index keys (DOS 8.3 aliases
//! are left out); sizes are the unnamed `$DATA` stream's, mtimes and link
//! counts from the file record (`$STANDARD_INFORMATION`), not the
//! directory index's copies, which NTFS lets go stale. Reparse points
//! (symlinks, junctions) are [`FileKind::Other`]: their targets are not
//! decoded, and lookups refuse to pass through them. Named data streams
//! are not exposed. Lookups are case-insensitive through the volume's
//! `$UpCase` table, as Windows does. [`DirEntry::id`] is the MFT record
//! number. A file's content is read through a fresh look-up of its record
//! on each read call (the crate's attribute values borrow the record), in
//! pieces of at most 1 MiB.

use std::io::{self, Read, Seek, SeekFrom};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsError, NtfsFile, NtfsReadSeek, NtfsTime};

use crate::detect::FsType;
use crate::error::{show, Error};
use crate::fs::{
    components, join, DirEntry, FileContent, FileKind, FileSystem, Timestamp, MAX_DIR_ENTRIES,
};
use crate::read_at::Source;

const ROOT_RECORD: u64 = 5;
/// The most read from a file per look-up of its record.
const READ_PIECE: usize = 1024 * 1024;

/// `Read + Seek` over a shared source, as the `ntfs` crate wants.
struct Cursor {
    src: Source,
    pos: u64,
}

impl Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.src.size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        self.src.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Cursor {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = crate::read_at::seek_target(pos, self.src.size(), self.pos)?;
        self.pos = target;
        Ok(target)
    }
}

pub struct NtfsFs {
    src: Source,
    ntfs: Ntfs,
}

pub(crate) fn open(volume: Source) -> Result<Box<dyn FileSystem>, Error> {
    Ok(Box::new(NtfsFs::open(volume)?))
}

fn ntfs_err(path: &[u8], source: NtfsError) -> Error {
    match source {
        NtfsError::NotADirectory { .. } => Error::NotADirectory { path: show(path) },
        source => Error::Ntfs {
            path: show(path),
            source,
        },
    }
}

fn unix_time(t: NtfsTime) -> Timestamp {
    // 100 ns intervals since 1601-01-01.
    let ticks = t.nt_timestamp();
    Timestamp {
        seconds: (ticks / 10_000_000) as i64 - 11_644_473_600,
        nanos: (ticks % 10_000_000) as u32 * 100,
    }
}

impl NtfsFs {
    pub fn open(src: Source) -> Result<NtfsFs, Error> {
        let mut c = Cursor {
            src: src.clone(),
            pos: 0,
        };
        let mut ntfs = Ntfs::new(&mut c).map_err(|e| ntfs_err(b"/", e))?;
        // Case-insensitive look-ups need the volume's $UpCase table.
        ntfs.read_upcase_table(&mut c)
            .map_err(|e| ntfs_err(b"/", e))?;
        Ok(NtfsFs { src, ntfs })
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            src: self.src.clone(),
            pos: 0,
        }
    }

    fn file(&self, c: &mut Cursor, record: u64, path: &[u8]) -> Result<NtfsFile<'_>, Error> {
        self.ntfs.file(c, record).map_err(|e| ntfs_err(path, e))
    }

    /// The MFT record number at `path`, refusing reparse points before the
    /// last component.
    fn lookup(&self, path: &[u8]) -> Result<(Vec<u8>, u64), Error> {
        let comps = components(path)?;
        let mut c = self.cursor();
        let mut record = ROOT_RECORD;
        for (i, name) in comps.iter().enumerate() {
            let here = join(&comps[..i]);
            let dir = self.file(&mut c, record, &here)?;
            if i > 0 && is_reparse(&dir, &here)? {
                return Err(Error::SymlinkInPath {
                    path: show(path),
                    component: show(&here),
                });
            }
            let index = dir
                .directory_index(&mut c)
                .map_err(|e| ntfs_err(&here, e))?;
            let mut finder = index.finder();
            let not_found = || Error::NotFound {
                path: show(&join(&comps[..=i])),
            };
            let name = std::str::from_utf8(name).map_err(|_| not_found())?;
            let entry = NtfsFileNameIndex::find(&mut finder, &self.ntfs, &mut c, name)
                .ok_or_else(not_found)?
                .map_err(|e| ntfs_err(&here, e))?;
            record = entry.file_reference().file_record_number();
        }
        Ok((join(&comps), record))
    }

    fn entry(
        &self,
        c: &mut Cursor,
        record: u64,
        name: Vec<u8>,
        path: &[u8],
    ) -> Result<DirEntry, Error> {
        let file = self.file(c, record, path)?;
        let info = file.info().map_err(|e| ntfs_err(path, e))?;
        let reparse = info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::REPARSE_POINT);
        let kind = if reparse {
            FileKind::Other
        } else if file.is_directory() {
            FileKind::Dir
        } else {
            FileKind::File
        };
        let size = if kind == FileKind::File {
            data_len(&file, c, path)?
        } else {
            0
        };
        Ok(DirEntry {
            name,
            kind,
            size,
            mode: None,
            uid: None,
            gid: None,
            mtime: Some(unix_time(info.modification_time())),
            symlink_target: None,
            id: Some(record),
            nlink: Some(u64::from(file.hard_link_count())),
        })
    }
}

fn is_reparse(file: &NtfsFile<'_>, path: &[u8]) -> Result<bool, Error> {
    let info = file.info().map_err(|e| ntfs_err(path, e))?;
    Ok(info
        .file_attributes()
        .contains(NtfsFileAttributeFlags::REPARSE_POINT))
}

fn data_len(file: &NtfsFile<'_>, c: &mut Cursor, path: &[u8]) -> Result<u64, Error> {
    match file.data(c, "") {
        None => Ok(0),
        Some(item) => {
            let item = item.map_err(|e| ntfs_err(path, e))?;
            let attr = item.to_attribute().map_err(|e| ntfs_err(path, e))?;
            Ok(attr.value_length())
        }
    }
}

impl FileSystem for NtfsFs {
    fn fs_type(&self) -> FsType {
        FsType::Ntfs
    }

    fn list(&self, dir: &[u8]) -> Result<Vec<DirEntry>, Error> {
        let (abs, record) = self.lookup(dir)?;
        let mut c = self.cursor();
        let file = self.file(&mut c, record, &abs)?;
        if is_reparse(&file, &abs)? || !file.is_directory() {
            return Err(Error::NotADirectory { path: show(&abs) });
        }
        let index = file
            .directory_index(&mut c)
            .map_err(|e| ntfs_err(&abs, e))?;
        let mut entries = index.entries();
        // (name, record) first: the iterator borrows the cursor.
        let mut found = Vec::new();
        let mut seen = 0usize;
        while let Some(entry) = entries.next(&mut c) {
            seen += 1;
            if seen > MAX_DIR_ENTRIES * 2 {
                return Err(Error::TooManyEntries {
                    path: show(&abs),
                    limit: MAX_DIR_ENTRIES,
                });
            }
            let entry = entry.map_err(|e| ntfs_err(&abs, e))?;
            let Some(key) = entry.key() else { continue };
            let key = key.map_err(|e| ntfs_err(&abs, e))?;
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let name = key.name().to_string_lossy();
            if name == "." || name.is_empty() || name.contains(['/', '\0']) {
                continue;
            }
            found.push((
                name.into_bytes(),
                entry.file_reference().file_record_number(),
            ));
        }
        let mut out = Vec::with_capacity(found.len());
        for (name, rec) in found {
            let mut path = abs.clone();
            if !path.ends_with(b"/") {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            out.push(self.entry(&mut c, rec, name, &path)?);
        }
        Ok(out)
    }

    fn stat(&self, path: &[u8]) -> Result<DirEntry, Error> {
        let (abs, record) = self.lookup(path)?;
        let name = abs
            .rsplit(|b| *b == b'/')
            .next()
            .unwrap_or_default()
            .to_vec();
        let name = if name.is_empty() { b"/".to_vec() } else { name };
        self.entry(&mut self.cursor(), record, name, &abs)
    }

    fn readlink(&self, path: &[u8]) -> Result<Vec<u8>, Error> {
        let (abs, _) = self.lookup(path)?;
        Err(Error::NotASymlink { path: show(&abs) })
    }

    fn open_file(&self, path: &[u8]) -> Result<Box<dyn FileContent + '_>, Error> {
        let (abs, record) = self.lookup(path)?;
        let e = self.entry(&mut self.cursor(), record, Vec::new(), &abs)?;
        match e.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(Error::IsADirectory { path: show(&abs) }),
            _ => return Err(Error::NotAFile { path: show(&abs) }),
        }
        Ok(Box::new(NtfsContent {
            fs: self,
            path: abs,
            record,
            size: e.size,
            pos: 0,
        }))
    }
}

struct NtfsContent<'a> {
    fs: &'a NtfsFs,
    path: Vec<u8>,
    record: u64,
    size: u64,
    pos: u64,
}

impl NtfsContent<'_> {
    fn read_piece(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let path = &self.path;
        let mut c = self.fs.cursor();
        let file = self.fs.file(&mut c, self.record, path)?;
        let item = file
            .data(&mut c, "")
            .ok_or_else(|| Error::corrupt("ntfs", path, "file without a data stream"))?
            .map_err(|e| ntfs_err(path, e))?;
        let attr = item.to_attribute().map_err(|e| ntfs_err(path, e))?;
        let mut value = attr.value(&mut c).map_err(|e| ntfs_err(path, e))?;
        value
            .seek(&mut c, SeekFrom::Start(self.pos))
            .map_err(|e| ntfs_err(path, e))?;
        let mut done = 0;
        while done < buf.len() {
            match value
                .read(&mut c, &mut buf[done..])
                .map_err(|e| ntfs_err(path, e))?
            {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
}

impl Read for NtfsContent<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len().min(READ_PIECE) as u64).min(self.size - self.pos) as usize;
        let got = self.read_piece(&mut buf[..n]).map_err(io::Error::other)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for NtfsContent<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = crate::read_at::seek_target(pos, self.size, self.pos)?;
        self.pos = target;
        Ok(target)
    }
}

impl FileContent for NtfsContent<'_> {
    fn len(&self) -> u64 {
        self.size
    }
}
