//! Read-only, user-space readers of disk images: partition tables (MBR with
//! logical partitions, GPT), file-system detection by magic, and file
//! systems (ext2/3/4, FAT12/16/32, NTFS) behind one [`FileSystem`] trait;
//! plus the pieces a file-level restore needs around them: include globs
//! ([`glob`]) and extraction that cannot write outside its target
//! ([`extract`]).
//!
//! Everything read from an image is untrusted: offsets and lengths are
//! checked before use, allocations are bounded ([`fs::MAX_DIR_ENTRIES`]),
//! and malformed input gives an [`Error`], never a panic. This crate never
//! writes to an image and depends on no other crate of the workspace.
//!
//! ```no_run
//! use std::sync::Arc;
//! let disk: diskfs::Source = Arc::new(std::fs::File::open("disk.img")?);
//! let table = diskfs::read_partitions(&disk)?;
//! for p in &table.partitions {
//!     if p.fs.is_supported() {
//!         let fs = diskfs::open(&disk, p)?;
//!         for e in fs.list(b"/")? {
//!             println!("{} {}", p.number, e.display_name());
//!         }
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod detect;
pub mod error;
mod ext4;
pub mod extract;
mod fat;
pub mod fs;
pub mod glob;
mod ntfs;
pub mod partition;
pub mod read_at;

pub use detect::{detect, FsType};
pub use error::{Error, PartitionError};
pub use fs::{open, open_volume, DirEntry, FileContent, FileKind, FileSystem, Timestamp};
pub use partition::{read_partitions, Partition, PartitionTable, PartitionType, Scheme};
pub use read_at::{ReadAt, Source, Window};
