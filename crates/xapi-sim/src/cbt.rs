//! The changed-block bitmap of one CBT log (`<uuid>.cbtlog` on a real SR):
//! one bit per 64 KiB block, stored exactly as `VDI.list_changed_blocks`
//! returns it once base64-encoded (block *i* is byte `i/8`, mask
//! `0x80 >> (i % 8)`; padding bits are zero). Pure: no I/O, no clock.
//!
//! spec: xenapi-reference.md §2.5 "Bitmap format", §5 rules 2-3, 8.

use base64::Engine;

/// CBT granularity (`CBT_BLOCK_SIZE` in SM, `cbt-util.h`).
pub const CBT_BLOCK_BYTES: u64 = 64 * 1024;

/// Blocks tracked for a disk of `size_bytes`.
pub fn blocks_for(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(CBT_BLOCK_BYTES)
}

/// Bytes of the decoded bitmap for a disk of `size_bytes`:
/// `ceil(ceil(size / 65536) / 8)` (blktap `bitmap_size()`).
pub fn bitmap_len(size_bytes: u64) -> usize {
    blocks_for(size_bytes).div_ceil(8) as usize
}

/// A set of 64 KiB blocks of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBitmap {
    blocks: u64,
    bytes: Vec<u8>,
}

impl ChangeBitmap {
    /// An empty bitmap for a disk of `size_bytes` (the caller bounds the
    /// size: a 2 TiB disk needs 4 MiB).
    pub fn new(size_bytes: u64) -> ChangeBitmap {
        ChangeBitmap {
            blocks: blocks_for(size_bytes),
            bytes: vec![0; bitmap_len(size_bytes)],
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks every block that `[offset, offset+len)` touches. Ranges past
    /// the end of the disk are clipped (the caller refuses such writes).
    pub fn mark_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / CBT_BLOCK_BYTES;
        let last = offset
            .saturating_add(len - 1)
            .checked_div(CBT_BLOCK_BYTES)
            .unwrap_or(0)
            .min(self.blocks.saturating_sub(1));
        let mut block = first;
        while block <= last && block < self.blocks {
            self.set(block);
            block += 1;
        }
    }

    /// Marks one block (ignored past the end).
    pub fn set(&mut self, block: u64) {
        if block < self.blocks {
            self.bytes[(block / 8) as usize] |= 0x80 >> (block % 8);
        }
    }

    pub fn is_set(&self, block: u64) -> bool {
        block < self.blocks && self.bytes[(block / 8) as usize] & (0x80 >> (block % 8)) != 0
    }

    /// `self |= other`; a larger `other` first grows `self` with zeros (a
    /// resized chain follows the largest size, SM `list_changed_blocks`).
    pub fn or_assign(&mut self, other: &ChangeBitmap) {
        if other.blocks > self.blocks {
            self.blocks = other.blocks;
            self.bytes.resize(other.bytes.len(), 0);
        }
        for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
            *a |= *b;
        }
    }

    /// Indexes of the marked blocks, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.blocks).filter(|&b| self.is_set(b))
    }

    pub fn count(&self) -> u64 {
        self.bytes.iter().map(|b| b.count_ones() as u64).sum()
    }

    /// The decoded bitmap bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Standard base64 with padding, as `list_changed_blocks` returns it.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }
}

/// Saved as `{blocks, bits}` with the bits in base64.
impl serde::Serialize for ChangeBitmap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ChangeBitmap", 2)?;
        st.serialize_field("blocks", &self.blocks)?;
        st.serialize_field("bits", &self.to_base64())?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for ChangeBitmap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Saved {
            blocks: u64,
            bits: String,
        }
        let saved = Saved::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&saved.bits)
            .map_err(serde::de::Error::custom)?;
        if bytes.len() as u64 != saved.blocks.div_ceil(8) {
            return Err(serde::de::Error::custom(format!(
                "{} bitmap bytes for {} blocks",
                bytes.len(),
                saved.blocks
            )));
        }
        Ok(ChangeBitmap {
            blocks: saved.blocks,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_follows_blktap() {
        assert_eq!(bitmap_len(0), 0);
        assert_eq!(bitmap_len(1), 1);
        assert_eq!(bitmap_len(8 * CBT_BLOCK_BYTES), 1);
        assert_eq!(bitmap_len(8 * CBT_BLOCK_BYTES + 1), 2);
        // 10 GiB: 163840 blocks, 20480 bytes.
        assert_eq!(bitmap_len(10 << 30), 20480);
    }

    #[test]
    fn msb_first() {
        let mut b = ChangeBitmap::new(16 * CBT_BLOCK_BYTES);
        b.set(1);
        b.set(2);
        b.set(15);
        assert_eq!(b.as_bytes(), &[0b0110_0000, 0b0000_0001]);
        assert_eq!(b.to_base64(), "YAE=");
    }

    #[test]
    fn ranges_touching_block_edges() {
        let mut b = ChangeBitmap::new(4 * CBT_BLOCK_BYTES);
        b.mark_range(CBT_BLOCK_BYTES - 1, 2);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 1]);
        let mut b = ChangeBitmap::new(4 * CBT_BLOCK_BYTES);
        b.mark_range(3 * CBT_BLOCK_BYTES, CBT_BLOCK_BYTES + 100);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![3]);
        b.mark_range(0, 0);
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn or_grows() {
        let mut a = ChangeBitmap::new(CBT_BLOCK_BYTES);
        let mut b = ChangeBitmap::new(20 * CBT_BLOCK_BYTES);
        a.set(0);
        b.set(19);
        a.or_assign(&b);
        assert_eq!(a.blocks(), 20);
        assert_eq!(a.iter_set().collect::<Vec<_>>(), vec![0, 19]);
    }
}
