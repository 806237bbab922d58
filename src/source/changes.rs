//! "What changed" on a disk, as every source reports it: sorted byte
//! extents since a landmark, or "a full read is needed" with the reason, or
//! nothing known. XenServer CBT bitmaps, QEMU dirty bitmaps and NBD block
//! status (and later VMware changed areas) all become [`Changes`] here, in
//! bytes, so nothing above the sources knows their granularity. Knows no
//! repository and no block size of one.

use crate::format::bitmap;

/// A byte range of a disk: `offset..offset + length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Byte extents of one disk: sorted, non-empty, neither overlapping nor
/// touching (adjacent ranges are merged), all within the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extents(Vec<Extent>);

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    #[error("change bitmap does not fit a disk of {disk_size_bytes} bytes: {reason}")]
    BitmapMismatch {
        disk_size_bytes: u64,
        reason: String,
    },
}

impl Extents {
    /// No byte.
    pub fn none() -> Self {
        Extents(Vec::new())
    }

    /// Normalizes `(offset, length)` pairs in any order: empty ones dropped,
    /// overlapping and adjacent ones merged, everything past
    /// `disk_size_bytes` cut off.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>, disk_size_bytes: u64) -> Self {
        let mut v: Vec<Extent> = ranges
            .into_iter()
            .filter_map(|(offset, length)| {
                let end = offset.saturating_add(length).min(disk_size_bytes);
                (end > offset).then(|| Extent {
                    offset,
                    length: end - offset,
                })
            })
            .collect();
        v.sort_by_key(|e| e.offset);
        let mut out: Vec<Extent> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if e.offset <= last.end() => {
                    let end = last.end().max(e.end());
                    last.length = end - last.offset;
                }
                _ => out.push(e),
            }
        }
        Extents(out)
    }

    /// The ranges of NBD block-status style extents `(offset, length,
    /// flags)` whose flags satisfy `pick`.
    pub fn from_flagged(
        extents: &[(u64, u64, u32)],
        disk_size_bytes: u64,
        pick: impl Fn(u32) -> bool,
    ) -> Self {
        Self::from_ranges(
            extents
                .iter()
                .filter(|e| pick(e.2))
                .map(|&(offset, length, _)| (offset, length)),
            disk_size_bytes,
        )
    }

    /// The blocks a change bitmap marks (one bit per `granularity_bytes`,
    /// most significant bit first, as `VDI.list_changed_blocks` returns it
    /// after base64), checked against the disk: the bitmap must have
    /// exactly the bytes the disk needs and no padding bit set.
    ///
    /// spec: format-spec/03-snapshot.md#bitmap
    pub fn from_bitmap(
        bits: &[u8],
        granularity_bytes: u64,
        disk_size_bytes: u64,
    ) -> Result<Self, ChangesError> {
        let blocks = disk_size_bytes.div_ceil(granularity_bytes);
        bitmap::validate(bits, blocks).map_err(|reason| ChangesError::BitmapMismatch {
            disk_size_bytes,
            reason,
        })?;
        Ok(Self::from_ranges(
            bitmap::iter_set(bits).map(|i| (i * granularity_bytes, granularity_bytes)),
            disk_size_bytes,
        ))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Extent> + '_ {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes covered.
    pub fn total_bytes(&self) -> u64 {
        self.0.iter().map(|e| e.length).sum()
    }
}

/// What a source says changed since the landmark of the last backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Nothing known (no tracking, or no landmark yet): every block is
    /// read and compared with the parent, if there is one.
    Unknown,
    /// Exactly these bytes changed since the landmark; the rest is as in
    /// the parent.
    Since(Extents),
    /// Change tracking was lost (why): a new backup set with a full read.
    FullNeeded(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(e: &Extents) -> Vec<(u64, u64)> {
        e.iter().map(|e| (e.offset, e.length)).collect()
    }

    #[test]
    fn ranges_are_sorted_merged_and_cut_at_the_end() {
        let e = Extents::from_ranges(
            [(100, 10), (0, 5), (5, 5), (105, 20), (200, 0), (990, 50)],
            1000,
        );
        assert_eq!(pairs(&e), vec![(0, 10), (100, 25), (990, 10)]);
        assert_eq!(e.total_bytes(), 45);
        assert!(Extents::from_ranges([(1000, 5)], 1000).is_empty());
    }

    #[test]
    fn bitmap_bits_become_bytes_and_the_last_block_is_partial() {
        // 3 blocks of 64 KiB, the last one 1000 bytes: bits 0 and 2.
        let size = 2 * 65536 + 1000;
        let e = Extents::from_bitmap(&[0b1010_0000], 65536, size).unwrap();
        assert_eq!(pairs(&e), vec![(0, 65536), (131072, 1000)]);
    }

    #[test]
    fn bitmap_with_padding_bits_or_wrong_length_is_refused() {
        let size = 3 * 65536;
        assert!(matches!(
            Extents::from_bitmap(&[0b0001_0000], 65536, size),
            Err(ChangesError::BitmapMismatch { .. })
        ));
        assert!(matches!(
            Extents::from_bitmap(&[0, 0], 65536, size),
            Err(ChangesError::BitmapMismatch { .. })
        ));
    }

    #[test]
    fn flagged_extents_keep_only_the_picked_ones() {
        let e = Extents::from_flagged(&[(0, 10, 1), (10, 10, 0), (20, 10, 1)], 100, |f| f & 1 != 0);
        assert_eq!(pairs(&e), vec![(0, 10), (20, 10)]);
    }
}
