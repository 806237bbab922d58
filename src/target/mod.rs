//! Where restored blocks go, the mirror of `source/`: a regular file, a
//! block device, a stream (stdout), a XenServer VDI import. Each target
//! implements `repo::restore::BlockSink`, so the dependency runs one way
//! (commands -> target -> repo). Targets check what they can hold before
//! anything is written. Never parses arguments (no clap) and never prints.

pub mod file;
pub mod stdout;
pub mod vmdk;
pub mod vmware;
pub mod xen;

pub use file::{FileOptions, FileTarget, PARTIAL_MARK};
pub use stdout::StreamSink;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{what} '{path}': {error}")]
    Io {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("'{path}': {reason}")]
    Refused { path: String, reason: String },
}

impl TargetError {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, error: std::io::Error) -> Self {
        TargetError::Io {
            what,
            path: path.display().to_string(),
            error,
        }
    }

    pub(crate) fn refused(path: &std::path::Path, reason: impl Into<String>) -> Self {
        TargetError::Refused {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// The largest disk a snapshot may claim for a file or stdout target unless
/// forced: a hostile or corrupt snapshot claiming an absurd size must not
/// stream terabytes of zeros or create a file no disk can hold. 64 TiB is
/// also the largest VDI XenServer creates.
pub const MAX_DISK_SIZE_BYTES: u64 = 64 << 40;
/// Above this no size is accepted, forced or not (no file system holds it).
pub const HOSTILE_DISK_SIZE_BYTES: u64 = 1 << 56;

/// Refuses a snapshot disk size above what a file or stream target should
/// take: above `MAX_DISK_SIZE_BYTES` unless `force`, above
/// `HOSTILE_DISK_SIZE_BYTES` always.
pub fn check_disk_size(
    target: &std::path::Path,
    size: u64,
    force: bool,
) -> Result<(), TargetError> {
    if size > HOSTILE_DISK_SIZE_BYTES || (size > MAX_DISK_SIZE_BYTES && !force) {
        return Err(TargetError::refused(
            target,
            format!(
                "the snapshot claims a disk of {size} bytes, above the {} limit for file and stdout targets{}; run 'cbtvault check'",
                if force { "2^56-byte" } else { "64 TiB" },
                if force { "" } else { " (pass --force if the size is genuine)" }
            ),
        ));
    }
    Ok(())
}

/// Zeros written out where a target cannot leave holes.
pub(crate) static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

/// The first block of `data` (blocks from `first` on, `bs` bytes each)
/// that differs from what `expected` (the resolved data blocks of that
/// span, ascending) says: its index and the id expected there (None:
/// zeros).
pub fn first_mismatch(
    expected: &[(u64, crate::format::BlockId)],
    bs: u64,
    hasher: crate::crypto::BlockHasher,
    first: u64,
    data: &[u8],
) -> Option<(u64, Option<crate::format::BlockId>)> {
    use rayon::prelude::*;
    data.par_chunks(bs as usize)
        .enumerate()
        .map(|(k, block)| (first + k as u64, block))
        .filter_map(|(index, block)| {
            let want = expected
                .binary_search_by_key(&index, |(i, _)| *i)
                .ok()
                .map(|p| expected[p].1);
            let ok = match want {
                Some(id) => hasher.id(block) == id,
                None => nbd::bytes::is_zero(block),
            };
            (!ok).then_some((index, want))
        })
        .min_by_key(|m| m.0)
}
