//! A stored snapshot as an NBD export, read through the repository's
//! random-access snapshot reader (`repo::random::SnapshotReader`, over the
//! one read path `repo::read::BlockReader`): nothing is restored to disk
//! first, and this module never reads packs itself. A block that does not
//! verify fails the read that needs it with EIO and nothing else. Zero
//! blocks are holes.

use std::sync::Arc;

use crate::format::SnapshotId;
use crate::repo::random::SnapshotReader;
use crate::repo::{RepoError, Repository};
use nbd::proto;
use nbd::server::{Export, ExportError};

/// Descriptors one `zero_extents` call returns at most.
const MAX_DESCRIPTORS_PER_CALL: usize = 128;
/// Ranges holding data one `zero_extents` call looks at, at most.
const MAX_RANGES_PER_CALL: usize = 4;

/// A snapshot served read-only from a repository.
pub struct SnapshotExport {
    reader: SnapshotReader,
    missing: u64,
}

impl SnapshotExport {
    /// Opens snapshot `id`: every manifest page of its chain is read and
    /// every data block looked up in the catalog (to count those it cannot
    /// locate), one range at a time.
    pub fn open(repo: Arc<Repository>, snapshot: SnapshotId) -> Result<SnapshotExport, RepoError> {
        let reader = SnapshotReader::open(repo, snapshot)?;
        let missing = reader.count_missing()?;
        Ok(SnapshotExport { reader, missing })
    }

    pub fn snapshot_id(&self) -> SnapshotId {
        self.reader.snapshot_id()
    }

    /// Data blocks the catalog cannot locate; reads touching them fail.
    pub fn missing_blocks(&self) -> u64 {
        self.missing
    }
}

impl Export for SnapshotExport {
    fn size_bytes(&self) -> u64 {
        self.reader.size_bytes()
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ExportError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.reader.size_bytes())
        {
            return Err(ExportError::Invalid(format!(
                "read of {offset}+{len} beyond the end ({} bytes)",
                self.reader.size_bytes()
            )));
        }
        let mut out = vec![0u8; len as usize];
        self.reader
            .read_into(offset, &mut out)
            .map_err(|e| ExportError::Io(e.to_string()))?;
        Ok(out)
    }

    fn zero_extents(&self, offset: u64, len: u32) -> Vec<(u32, u32)> {
        let end = offset
            .saturating_add(len as u64)
            .min(self.reader.size_bytes());
        let bs = self.reader.block_size();
        let span = self.reader.range_blocks() * bs;
        let hole = proto::STATE_HOLE | proto::STATE_ZERO;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let push = |out: &mut Vec<(u64, u32)>, len: u64, flags: u32| match out.last_mut() {
            Some((l, f)) if *f == flags => *l += len,
            _ => out.push((len, flags)),
        };
        let mut at = offset;
        let mut resolved = 0;
        // Callers loop; a bounded answer keeps one-descriptor requests
        // (REQ_ONE over the rest of a large disk) cheap: at most a few
        // ranges are resolved per call.
        while at < end && out.len() < MAX_DESCRIPTORS_PER_CALL && resolved < MAX_RANGES_PER_CALL {
            let r = at / span;
            let range_end = ((r + 1) * span).min(end);
            if !self.reader.range_has_data(r) {
                // An all-zero range: a hole up to the next range with data.
                let next = self
                    .reader
                    .next_range_with_data(r)
                    .map_or(u64::MAX, |n| n * span);
                let stop = next.min(end);
                push(&mut out, stop - at, hole);
                at = stop;
                continue;
            }
            resolved += 1;
            let list = match self.reader.range(r) {
                Ok(list) => list,
                Err(_) => {
                    // Unknown content is reported as data: the read of it
                    // then fails with its error.
                    push(&mut out, range_end - at, 0);
                    at = range_end;
                    continue;
                }
            };
            let mut p = list.partition_point(|b| b.index < at / bs);
            while at < range_end && out.len() < MAX_DESCRIPTORS_PER_CALL {
                let index = at / bs;
                if p < list.len() && list[p].index == index {
                    // A run of consecutive data blocks.
                    let mut last = index;
                    while p + 1 < list.len()
                        && list[p + 1].index == last + 1
                        && (last + 1) * bs < range_end
                    {
                        p += 1;
                        last += 1;
                    }
                    p += 1;
                    let stop = ((last + 1) * bs).min(range_end);
                    push(&mut out, stop - at, 0);
                    at = stop;
                } else {
                    // Zeros up to the next data block of the range.
                    let next = list.get(p).map_or(u64::MAX, |b| b.index * bs);
                    let stop = next.min(range_end);
                    push(&mut out, stop - at, hole);
                    at = stop;
                }
            }
        }
        out.into_iter().map(|(l, f)| (l as u32, f)).collect()
    }
}
