//! An export held in memory: for tests and for the simulator's small
//! disks. Zero ranges are reported per 64 KiB granule.

use super::export::{Export, ExportError};
use crate::proto;

const GRANULE: u64 = 64 * 1024;

/// A byte vector served as a disk.
pub struct MemoryExport {
    data: Vec<u8>,
}

impl MemoryExport {
    pub fn new(data: Vec<u8>) -> MemoryExport {
        MemoryExport { data }
    }
}

impl Export for MemoryExport {
    fn size_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ExportError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.data.len() as u64)
            .ok_or_else(|| {
                ExportError::Invalid(format!("read of {offset}+{len} beyond the end"))
            })?;
        Ok(self.data[offset as usize..end as usize].to_vec())
    }

    fn zero_extents(&self, offset: u64, len: u32) -> Vec<(u32, u32)> {
        let size = self.data.len() as u64;
        let end = offset.saturating_add(len as u64).min(size);
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / GRANULE + 1) * GRANULE).min(end);
            let zero = crate::bytes::is_zero(&self.data[at as usize..next as usize]);
            let flags = if zero {
                proto::STATE_HOLE | proto::STATE_ZERO
            } else {
                0
            };
            let n = (next - at) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => out.push((n, flags)),
            }
            at = next;
        }
        out
    }
}
