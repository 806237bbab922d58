//! ext2/3/4 through the `ext4-view` crate, adapted to [`FileSystem`]: path
//! lookups that never follow links, typed errors naming the path.
//!
//! `ext4-view` 1.0 does not expose inode numbers or link counts, so
//! [`DirEntry::id`] and [`DirEntry::nlink`] are `None` here.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Mutex;

use ext4_view::{Ext4, Ext4Error, FileType, Metadata};

use crate::detect::FsType;
use crate::error::{show, Error};
use crate::fs::{
    components, join, DirEntry, FileContent, FileKind, FileSystem, Timestamp, MAX_DIR_ENTRIES,
    MAX_LINK_BYTES,
};
use crate::read_at::Source;

struct Ext4Source(Source);

impl ext4_view::Ext4Read for Ext4Source {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(start_byte, dst).map_err(Box::new)?;
        Ok(())
    }
}

pub struct Ext4Fs {
    fs: Ext4,
    kind: FsType,
    /// Absolute paths already found to be directories (not links): the
    /// image is read-only, so a prefix checked once stays checked.
    dirs: Mutex<HashSet<Vec<u8>>>,
    /// Metadata of entries listed lately, by absolute path: a walk that
    /// lists a directory and then opens its files resolves each path
    /// once instead of once per component (ext4-view checksums every
    /// directory block it reads on every lookup).
    listed: Mutex<HashMap<Vec<u8>, Metadata>>,
}

/// Entries kept in each of the lookup caches (cleared when full).
const LOOKUP_CACHE: usize = 1 << 16;

/// The cache behind a mutex whose data is only ever a cache.
fn cache<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn map_err(path: &[u8], e: Ext4Error) -> Error {
    let path = show(path);
    match e {
        Ext4Error::NotFound => Error::NotFound { path },
        Ext4Error::NotADirectory => Error::NotADirectory { path },
        Ext4Error::IsADirectory => Error::IsADirectory { path },
        Ext4Error::NotASymlink => Error::NotASymlink { path },
        Ext4Error::IsASpecialFile => Error::NotAFile { path },
        source => Error::Ext4 { path, source },
    }
}

fn kind_of(t: FileType) -> (FileKind, u32) {
    match t {
        FileType::Regular => (FileKind::File, 0o100000),
        FileType::Directory => (FileKind::Dir, 0o040000),
        FileType::Symlink => (FileKind::Symlink, 0o120000),
        FileType::CharacterDevice => (FileKind::Other, 0o020000),
        FileType::BlockDevice => (FileKind::Other, 0o060000),
        FileType::Fifo => (FileKind::Other, 0o010000),
        FileType::Socket => (FileKind::Other, 0o140000),
    }
}

impl Ext4Fs {
    pub(crate) fn open(volume: Source, kind: FsType) -> Result<Ext4Fs, Error> {
        let fs = Ext4::load(Box::new(Ext4Source(volume))).map_err(|e| map_err(b"/", e))?;
        Ok(Ext4Fs {
            fs,
            kind,
            dirs: Mutex::new(HashSet::new()),
            listed: Mutex::new(HashMap::new()),
        })
    }

    /// Resolves `path` to its absolute form and metadata, refusing a symlink
    /// anywhere but in the last component.
    fn lookup(&self, path: &[u8]) -> Result<(Vec<u8>, Metadata), Error> {
        let comps = components(path)?;
        for i in 1..comps.len() {
            let prefix = join(&comps[..i]);
            if cache(&self.dirs).contains(&prefix) {
                continue;
            }
            let md = self.symlink_metadata(&prefix)?;
            if md.is_symlink() {
                return Err(Error::SymlinkInPath {
                    path: show(path),
                    component: show(&prefix),
                });
            }
            if !md.is_dir() {
                return Err(Error::NotADirectory {
                    path: show(&prefix),
                });
            }
            let mut dirs = cache(&self.dirs);
            if dirs.len() >= LOOKUP_CACHE {
                dirs.clear();
            }
            dirs.insert(prefix);
        }
        let full = join(&comps);
        if let Some(md) = cache(&self.listed).get(&full) {
            return Ok((full, md.clone()));
        }
        let md = self.symlink_metadata(&full)?;
        Ok((full, md))
    }

    fn symlink_metadata(&self, abs: &[u8]) -> Result<Metadata, Error> {
        self.fs.symlink_metadata(abs).map_err(|e| map_err(abs, e))
    }

    fn entry(&self, abs: &[u8], name: &[u8], md: &Metadata) -> Result<DirEntry, Error> {
        let (kind, type_bits) = kind_of(md.file_type());
        let symlink_target = if kind == FileKind::Symlink {
            Some(self.link_target(abs, md)?)
        } else {
            None
        };
        let mtime = md.modified();
        Ok(DirEntry {
            name: name.to_vec(),
            kind,
            size: md.len(),
            mode: Some(type_bits | u32::from(md.mode())),
            uid: Some(md.uid()),
            gid: Some(md.gid()),
            mtime: Some(Timestamp {
                seconds: mtime.seconds(),
                nanos: mtime.nanoseconds(),
            }),
            symlink_target,
            id: None,
            nlink: None,
        })
    }

    fn link_target(&self, abs: &[u8], md: &Metadata) -> Result<Vec<u8>, Error> {
        if md.len() > MAX_LINK_BYTES {
            return Err(Error::corrupt(
                "ext4",
                abs,
                format!("symlink target of {} bytes", md.len()),
            ));
        }
        let target = self.fs.read_link(abs).map_err(|e| map_err(abs, e))?;
        Ok(target.as_ref().to_vec())
    }
}

impl FileSystem for Ext4Fs {
    fn fs_type(&self) -> FsType {
        self.kind
    }

    fn list(&self, dir: &[u8]) -> Result<Vec<DirEntry>, Error> {
        let (abs, md) = self.lookup(dir)?;
        if !md.is_dir() {
            return Err(Error::NotADirectory { path: show(&abs) });
        }
        let mut out = Vec::new();
        let mut found = Vec::new();
        for entry in self
            .fs
            .read_dir(abs.as_slice())
            .map_err(|e| map_err(&abs, e))?
        {
            let entry = entry.map_err(|e| map_err(&abs, e))?;
            let name = entry.file_name();
            let name = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(Error::TooManyEntries {
                    path: show(&abs),
                    limit: MAX_DIR_ENTRIES,
                });
            }
            let child = entry.path();
            let md = entry.metadata().map_err(|e| map_err(child.as_ref(), e))?;
            out.push(self.entry(child.as_ref(), name, &md)?);
            found.push((child.as_ref().to_vec(), md));
        }
        let mut listed = cache(&self.listed);
        if listed.len() + found.len() > LOOKUP_CACHE {
            listed.clear();
        }
        listed.extend(found);
        Ok(out)
    }

    fn stat(&self, path: &[u8]) -> Result<DirEntry, Error> {
        let (abs, md) = self.lookup(path)?;
        let name = abs
            .rsplit(|b| *b == b'/')
            .next()
            .unwrap_or_default()
            .to_vec();
        self.entry(&abs, &name, &md)
    }

    fn readlink(&self, path: &[u8]) -> Result<Vec<u8>, Error> {
        let (abs, md) = self.lookup(path)?;
        if !md.is_symlink() {
            return Err(Error::NotASymlink { path: show(&abs) });
        }
        self.link_target(&abs, &md)
    }

    fn open_file(&self, path: &[u8]) -> Result<Box<dyn FileContent + '_>, Error> {
        let (abs, md) = self.lookup(path)?;
        if md.is_dir() {
            return Err(Error::IsADirectory { path: show(&abs) });
        }
        if md.file_type() != FileType::Regular {
            return Err(Error::NotAFile { path: show(&abs) });
        }
        let file = self.fs.open(abs.as_slice()).map_err(|e| map_err(&abs, e))?;
        Ok(Box::new(Ext4File {
            len: md.len(),
            pos: 0,
            file,
        }))
    }
}

struct Ext4File {
    file: ext4_view::File,
    len: u64,
    pos: u64,
}

impl Read for Ext4File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_bytes(buf).map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Ext4File {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = crate::read_at::seek_target(pos, self.len, self.pos)?;
        // ext4-view refuses positions past the end; reading there yields 0.
        self.file
            .seek_to(target.min(self.len))
            .map_err(io::Error::other)?;
        self.pos = target;
        Ok(target)
    }
}

impl FileContent for Ext4File {
    fn len(&self) -> u64 {
        self.len
    }
}
