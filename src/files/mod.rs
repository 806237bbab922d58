//! Partition tables and file systems of a stored snapshot: the `diskfs`
//! readers over the repository's random-access snapshot reader
//! (`repo::random::SnapshotReader`), so every byte a listing or an
//! extraction uses is a verified block of the snapshot, fetched as needed;
//! nothing is restored to disk first. Owns the `pN:/path` syntax, the walk
//! of a tree (`walk`), extraction under a target (`restore`) and tar
//! output (`tar`). Prints nothing; errors are typed and name the partition,
//! the path and, when a block of the snapshot could not be read, the block.

pub mod flush;
pub mod restore;
pub mod tar;

use std::error::Error as StdError;
use std::io;
use std::sync::Arc;

use diskfs::{DirEntry, FileKind, FileSystem, Partition, PartitionTable, Scheme, Source};
use thiserror::Error;

use crate::repo::random::{block_error, SnapshotReader};
use crate::repo::read::ReadError;
use crate::repo::RepoError;

/// Directories deeper than this are not walked (a corrupt file system may
/// loop a directory back onto an ancestor).
pub const MAX_DEPTH: usize = 256;

impl diskfs::ReadAt for SnapshotReader {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // The typed cause travels inside the io::Error, so whatever diskfs
        // wraps it in can still be asked which block failed.
        self.read_into(offset, buf).map_err(io::Error::other)
    }
    fn size(&self) -> u64 {
        self.size_bytes()
    }
}

/// The unreadable block somewhere in `e`'s chain (also inside the
/// `io::Error`s the file-system readers wrap read failures in).
pub fn unreadable_block<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a ReadError> {
    if let Some(r) = e.downcast_ref::<RepoError>() {
        if let Some(b) = block_error(r) {
            return Some(b);
        }
    }
    if let Some(io) = e.downcast_ref::<io::Error>() {
        if let Some(inner) = io.get_ref() {
            if let Some(b) = unreadable_block(inner) {
                return Some(b);
            }
        }
    }
    e.source().and_then(unreadable_block)
}

/// What failed, said once: the unreadable block if that is the cause,
/// else the error itself.
pub fn describe(e: &(dyn StdError + 'static)) -> String {
    match unreadable_block(e) {
        Some(b) => b.to_string(),
        None => e.to_string(),
    }
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FilesError {
    #[error("'{text}': {reason}")]
    PathSyntax { text: String, reason: &'static str },
    #[error("the disk has a partition table ({scheme}): name the partition, e.g. 'p1:{path}' (see 'cbtvault ls SNAPSHOT')")]
    PartitionRequired { scheme: &'static str, path: String },
    #[error("no partition {number} on this disk (partitions: {available})")]
    NoSuchPartition { number: u32, available: String },
    #[error("partition table: {}", describe(.0))]
    Table(#[source] diskfs::PartitionError),
    #[error("partition {number} (type {partition_type}): {fs} is recognised but not supported; file-level restore reads ext2/3/4, FAT and NTFS")]
    Unsupported {
        number: u32,
        partition_type: String,
        fs: diskfs::FsType,
    },
    #[error("partition {number} (type {partition_type}): no known file system at its start")]
    UnknownFs { number: u32, partition_type: String },
    #[error("{what}: {}", describe(.source))]
    Fs {
        what: String,
        #[source]
        source: diskfs::Error,
    },
}

impl FilesError {
    /// The unreadable block behind this error, if that is the cause.
    pub fn block(&self) -> Option<&ReadError> {
        unreadable_block(self)
    }
}

/// `pN:/path`, or a bare `/path` (the disk's only file system, when it has
/// no partition table), as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSpec {
    /// `None`: a bare path.
    pub partition: Option<u32>,
    /// Absolute, `/`-separated; `/` for the root.
    pub path: Vec<u8>,
}

impl PathSpec {
    pub fn parse(text: &str) -> Result<PathSpec, FilesError> {
        let bad = |reason| FilesError::PathSyntax {
            text: text.to_string(),
            reason,
        };
        let (partition, rest) = match text.split_once(':') {
            Some((p, rest)) if p.starts_with('p') && !text.starts_with('/') => {
                let n = p[1..]
                    .parse::<u32>()
                    .map_err(|_| bad("expected pN:/path (N a partition number)"))?;
                (Some(n), rest)
            }
            _ => (None, text),
        };
        if partition.is_none() && !rest.starts_with('/') {
            return Err(bad(
                "expected pN:/path, or /path on a disk without partitions",
            ));
        }
        let path = if rest.is_empty() {
            b"/".to_vec()
        } else if rest.starts_with('/') {
            rest.as_bytes().to_vec()
        } else {
            format!("/{rest}").into_bytes()
        };
        // Refuse what lookups refuse, before any work.
        diskfs::fs::components(&path).map_err(|_| bad("'.', '..' or empty components"))?;
        Ok(PathSpec { partition, path })
    }
}

/// `pN:/path` as shown to the user.
pub fn show_path(partition: u32, path: &[u8]) -> String {
    format!("p{partition}:{}", String::from_utf8_lossy(path))
}

/// A path below `dir`.
pub fn child_path(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A snapshot's disk: its partition table, read through the snapshot
/// reader.
pub struct Disk {
    pub source: Source,
    pub table: PartitionTable,
}

fn scheme_name(s: Scheme) -> &'static str {
    match s {
        Scheme::Mbr => "MBR",
        Scheme::Gpt => "GPT",
        Scheme::None => "none",
    }
}

impl Disk {
    /// Reads the partition table (and what lies at each partition's start).
    pub fn open(reader: Arc<SnapshotReader>) -> Result<Disk, FilesError> {
        let source: Source = reader;
        let table = diskfs::read_partitions(&source).map_err(FilesError::Table)?;
        Ok(Disk { source, table })
    }

    pub fn scheme_name(&self) -> &'static str {
        scheme_name(self.table.scheme)
    }

    /// The partition a path names (a bare path: partition 0 of a disk
    /// without a table).
    pub fn partition(&self, spec: &PathSpec) -> Result<&Partition, FilesError> {
        let number = match spec.partition {
            Some(n) => n,
            None if self.table.scheme == Scheme::None => 0,
            None => {
                return Err(FilesError::PartitionRequired {
                    scheme: self.scheme_name(),
                    path: String::from_utf8_lossy(&spec.path).into_owned(),
                })
            }
        };
        self.table
            .partitions
            .iter()
            .find(|p| p.number == number)
            .ok_or_else(|| FilesError::NoSuchPartition {
                number,
                available: self
                    .table
                    .partitions
                    .iter()
                    .map(|p| format!("p{}", p.number))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Opens the file system of a partition; recognised but unsupported
    /// contents (LVM, LUKS, XFS, Btrfs, ...) are said so with the
    /// partition's type.
    pub fn open_fs(&self, p: &Partition) -> Result<Box<dyn FileSystem>, FilesError> {
        if !p.fs.is_supported() {
            let partition_type = p.partition_type.to_string();
            return Err(if p.fs == diskfs::FsType::Unknown {
                FilesError::UnknownFs {
                    number: p.number,
                    partition_type,
                }
            } else {
                FilesError::Unsupported {
                    number: p.number,
                    partition_type,
                    fs: p.fs,
                }
            });
        }
        diskfs::open(&self.source, p).map_err(|source| FilesError::Fs {
            what: format!("partition {}", p.number),
            source,
        })
    }
}

/// What a walk meets.
pub enum Visit<'a> {
    /// An object, with its absolute in-image path.
    Entry { path: &'a [u8], entry: &'a DirEntry },
    /// A directory that could not be listed (the walk goes on elsewhere).
    Failed {
        path: &'a [u8],
        error: diskfs::Error,
    },
}

/// Walks `root` (a directory, or any object: then only it is visited),
/// depth first, parents before their contents. `descend` says whether a
/// directory's contents are wanted (`recursive` false: only `root`'s own
/// entries). The visitor returns false to stop. Memory: one listing per
/// level, at most [`MAX_DEPTH`] levels.
pub fn walk(
    fs: &dyn FileSystem,
    root: &[u8],
    recursive: bool,
    descend: &dyn Fn(&[u8]) -> bool,
    visit: &mut dyn FnMut(Visit<'_>) -> bool,
) -> Result<(), diskfs::Error> {
    let top = fs.stat(root)?;
    if top.kind != FileKind::Dir {
        visit(Visit::Entry {
            path: root,
            entry: &top,
        });
        return Ok(());
    }
    // (directory path, its entries, next position)
    let mut stack: Vec<(Vec<u8>, Vec<DirEntry>, usize)> = vec![(root.to_vec(), fs.list(root)?, 0)];
    while let Some((dir, entries, next)) = stack.last_mut() {
        let Some(entry) = entries.get(*next) else {
            stack.pop();
            continue;
        };
        *next += 1;
        let path = child_path(dir, &entry.name);
        let entry = entry.clone();
        if !visit(Visit::Entry {
            path: &path,
            entry: &entry,
        }) {
            return Ok(());
        }
        if entry.kind == FileKind::Dir && recursive && descend(&path) {
            if stack.len() >= MAX_DEPTH {
                let error = diskfs::Error::Corrupt {
                    fs: "walk",
                    path: String::from_utf8_lossy(&path).into_owned(),
                    detail: format!("deeper than {MAX_DEPTH} levels; not descended"),
                };
                if !visit(Visit::Failed { path: &path, error }) {
                    return Ok(());
                }
                continue;
            }
            match fs.list(&path) {
                Ok(list) => stack.push((path, list, 0)),
                Err(error) => {
                    if !visit(Visit::Failed { path: &path, error }) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_specs() {
        assert_eq!(
            PathSpec::parse("p1:/etc").unwrap(),
            PathSpec {
                partition: Some(1),
                path: b"/etc".to_vec()
            }
        );
        assert_eq!(PathSpec::parse("p2:").unwrap().path, b"/");
        assert_eq!(PathSpec::parse("p0:etc").unwrap().path, b"/etc");
        assert_eq!(PathSpec::parse("/a:b").unwrap().partition, None);
        assert_eq!(PathSpec::parse("/a:b").unwrap().path, b"/a:b");
        for bad in ["etc", "px:/a", "p1:/a/../b", "/a//b", "q1:/a"] {
            assert!(PathSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn child_paths() {
        assert_eq!(child_path(b"/", b"a"), b"/a");
        assert_eq!(child_path(b"/a", b"b"), b"/a/b");
    }
}
