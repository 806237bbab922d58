//! A set of blocks of one disk in the repository's block size, over the
//! byte layout of `format::bitmap` (one bit per block, most significant bit
//! first, padding bits clear). Every value has exactly the bytes its block
//! count needs, so bitmaps of different disks cannot be mixed by accident.
//!
//! spec: format-spec/03-snapshot.md#bitmap

use crate::format::bitmap;
use crate::source::Extents;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBitmap {
    bits: Vec<u8>,
    blocks: u64,
}

impl BlockBitmap {
    /// No block of a disk of `blocks` blocks.
    pub fn empty(blocks: u64) -> Self {
        BlockBitmap {
            bits: vec![0; bitmap::len_for(blocks) as usize],
            blocks,
        }
    }

    /// Stored bytes, checked: the length must fit `blocks` and padding bits
    /// must be clear.
    pub fn from_bytes(bits: Vec<u8>, blocks: u64) -> Result<Self, String> {
        bitmap::validate(&bits, blocks)?;
        Ok(BlockBitmap { bits, blocks })
    }

    /// Every block that any byte of `extents` falls in.
    pub fn covering(extents: &Extents, block_size: u32, blocks: u64) -> Self {
        let mut out = Self::empty(blocks);
        let bs = block_size as u64;
        for e in extents.iter() {
            if e.length == 0 || blocks == 0 {
                continue;
            }
            let first = e.offset / bs;
            let last = ((e.end() - 1) / bs).min(blocks - 1);
            for b in first..=last {
                out.set(b);
            }
        }
        out
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn is_set(&self, block: u64) -> bool {
        block < self.blocks && bitmap::is_set(&self.bits, block)
    }

    /// Marks `block`; one beyond the disk is ignored.
    pub fn set(&mut self, block: u64) {
        if block < self.blocks {
            bitmap::set(&mut self.bits, block);
        }
    }

    /// Marked blocks.
    pub fn count(&self) -> u64 {
        bitmap::count(&self.bits)
    }

    /// Marked blocks, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        bitmap::iter_set(&self.bits)
    }

    /// Keeps only the blocks also marked in `other` (in place: no second
    /// bitmap of the disk's size).
    pub fn and_assign(&mut self, other: &BlockBitmap) {
        debug_assert_eq!(self.blocks, other.blocks);
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a &= b;
        }
    }

    /// The stored byte layout.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_marks_every_block_an_extent_touches() {
        // 4 KiB blocks, disk of 20 blocks (last partial); 8000..8200
        // straddles blocks 1 and 2.
        let size = 19 * 4096 + 100;
        let e = Extents::from_ranges([(0, 4096), (8000, 200), (19 * 4096, 100)], size);
        let b = BlockBitmap::covering(&e, 4096, 20);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 1, 2, 19]);
        assert_eq!(b.as_bytes().len(), 3);
    }

    #[test]
    fn and_assign_intersects_in_place() {
        let mut a = BlockBitmap::empty(10);
        a.set(1);
        a.set(9);
        a.set(12); // beyond the disk: ignored
        let mut b = BlockBitmap::empty(10);
        b.set(9);
        b.set(3);
        a.and_assign(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![9]);
        assert!(BlockBitmap::from_bytes(a.into_bytes(), 10).is_ok());
    }
}
