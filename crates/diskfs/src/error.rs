//! The crate's error types: matchable variants naming what failed and where
//! (which partition, which path, which offset). Nothing here does I/O.

use std::io;

use crate::detect::FsType;

/// Lossy, printable form of an in-image path or name.
pub(crate) fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What went wrong reading a disk image or a file system inside it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("read of {len} bytes at offset {offset} failed: {source}")]
    Io {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("partition table: {0}")]
    Partition(#[from] PartitionError),
    #[error("partition {partition}: file system {fs} is recognised but not supported")]
    Unsupported { partition: u32, fs: FsType },
    #[error("partition {partition}: no known file system at its start")]
    UnknownFs { partition: u32 },
    #[error("'{path}': not found")]
    NotFound { path: String },
    #[error("'{path}': not a directory")]
    NotADirectory { path: String },
    #[error("'{path}': is a directory")]
    IsADirectory { path: String },
    #[error("'{path}': not a regular file")]
    NotAFile { path: String },
    #[error("'{path}': not a symbolic link")]
    NotASymlink { path: String },
    #[error("'{path}': component '{component}' is a symbolic link; lookups do not follow links")]
    SymlinkInPath { path: String, component: String },
    #[error("'{path}': invalid path: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("'{path}': directory has more than {limit} entries")]
    TooManyEntries { path: String, limit: usize },
    #[error("{fs} corrupt at '{path}': {detail}")]
    Corrupt {
        fs: &'static str,
        path: String,
        detail: String,
    },
    #[error("ext4 at '{path}': {source}")]
    Ext4 {
        path: String,
        #[source]
        source: ext4_view::Ext4Error,
    },
    #[error("ntfs at '{path}': {source}")]
    Ntfs {
        path: String,
        #[source]
        source: ntfs::NtfsError,
    },
}

impl Error {
    pub(crate) fn io(offset: u64, len: usize, source: io::Error) -> Error {
        Error::Io {
            offset,
            len,
            source,
        }
    }
    pub(crate) fn corrupt(fs: &'static str, path: &[u8], detail: impl Into<String>) -> Error {
        Error::Corrupt {
            fs,
            path: show(path),
            detail: detail.into(),
        }
    }
}

/// A partition table that cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    #[error("read of the partition table at offset {offset} failed: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("gpt header at lba {lba}: {reason}")]
    GptHeader { lba: u64, reason: String },
    #[error("gpt partition entry array at lba {lba}: {reason}")]
    GptEntries { lba: u64, reason: String },
    #[error("mbr extended partition chain: {reason} (ebr at offset {offset})")]
    ExtendedChain { offset: u64, reason: &'static str },
    #[error("no partition numbered {0}")]
    NoSuchPartition(u32),
}
