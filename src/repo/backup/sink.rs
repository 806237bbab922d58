//! The manifest a backup writes, built page by page while the blocks are
//! read in ascending order: each finished range becomes a manifest page
//! (format-spec/03-snapshot.md#pages), so the backup holds one range of
//! entries and one range of its parent's resolved map, whatever the disk
//! size. A synthetic full merges each range with the parent's resolved
//! range; ranges that come out as the previous full's are named, not
//! written again.
//!
//! spec: format-spec/03-snapshot.md#sets, format-spec/06-ordering.md#backup

use super::bitmap::BlockBitmap;
use super::plan::{known_zero_at, KnownZero};
use crate::format::snapshot::{BlockRef, PageTable};
use crate::format::BlockId;
use crate::manifest;
use crate::repo::manifests::{slice_bits, ChainReader, PageWriter};
use crate::repo::{RepoError, Repository};

/// Receives the backup's changed entries in ascending block order.
pub struct DeltaSink<'r> {
    writer: PageWriter<'r>,
    page_blocks: u64,
    /// Blocks of the disk being backed up.
    block_count: u64,
    /// Page of the entries in `buf`.
    page: u64,
    buf: Vec<(u64, BlockRef)>,
    /// Pages below this one are written.
    next_page: u64,
    last_index: Option<u64>,
    parent: Option<ChainReader<'r>>,
    synthetic: bool,
    change_bits: Option<&'r BlockBitmap>,
    known_zero: KnownZero,
    read: Option<&'r BlockBitmap>,
    /// Entries of the delta (before a synthetic full merges it).
    pub changed: u64,
}

impl<'r> DeltaSink<'r> {
    pub fn new(
        repo: &'r Repository,
        block_count: u64,
        parent: Option<ChainReader<'r>>,
        synthetic: bool,
        change_bits: Option<&'r BlockBitmap>,
        known_zero: KnownZero,
        read: Option<&'r BlockBitmap>,
    ) -> DeltaSink<'r> {
        let known: Vec<_> = parent
            .as_ref()
            .map(|p| p.chain().flat_map(|s| s.page_ids()).collect())
            .unwrap_or_default();
        let writer = PageWriter::new(repo, change_bits.is_some()).knowing(known);
        DeltaSink {
            page_blocks: writer.page_blocks(),
            writer,
            block_count,
            page: 0,
            buf: Vec::new(),
            next_page: 0,
            last_index: None,
            synthetic: synthetic && parent.is_some(),
            parent,
            change_bits,
            known_zero,
            read,
            changed: 0,
        }
    }

    /// What the parent holds at `index` (indices asked in ascending order
    /// read each parent range once).
    pub fn parent_get(&mut self, index: u64) -> Result<Option<BlockId>, RepoError> {
        match self.parent.as_mut() {
            Some(p) => p.get(index),
            None => Ok(None),
        }
    }

    /// The parent's resolved data in blocks `lo..hi`.
    fn parent_data(&mut self, lo: u64, hi: u64) -> Result<Vec<(u64, BlockId)>, RepoError> {
        match self.parent.as_mut() {
            Some(p) => p.data_in(lo, hi),
            None => Ok(Vec::new()),
        }
    }

    /// Adds the entry of block `index`; indices must ascend.
    pub fn push(&mut self, index: u64, r: BlockRef) -> Result<(), RepoError> {
        if self.last_index.is_some_and(|l| l >= index) || index >= self.block_count {
            return Err(RepoError::Invalid(format!(
                "manifest entry for block {index} out of order or beyond the disk"
            )));
        }
        self.last_index = Some(index);
        let p = index / self.page_blocks;
        if p != self.page {
            self.flush_until(p)?;
        }
        self.buf.push((index, r));
        Ok(())
    }

    /// Writes every page below `until`.
    fn flush_until(&mut self, until: u64) -> Result<(), RepoError> {
        for q in self.next_page..until {
            let entries = if q == self.page {
                std::mem::take(&mut self.buf)
            } else {
                Vec::new()
            };
            self.write_page(q, entries)?;
        }
        self.next_page = self.next_page.max(until);
        self.page = until;
        Ok(())
    }

    fn write_page(&mut self, q: u64, mut entries: Vec<(u64, BlockRef)>) -> Result<(), RepoError> {
        let lo = q * self.page_blocks;
        let hi = (lo + self.page_blocks).min(self.block_count);
        // Blocks known zero without reading: a zero entry where the parent
        // has data.
        let rule = self.known_zero;
        let candidates = match rule {
            KnownZero::None => false,
            // Some block of the range is not read.
            KnownZero::Unread => self.read.is_some_and(|r| {
                // `lo` is a multiple of 8: whole bytes, then the tail.
                let whole = (hi / 8 * 8).max(lo);
                r.as_bytes()[(lo / 8) as usize..(whole / 8) as usize]
                    .iter()
                    .any(|b| *b != 0xff)
                    || (whole..hi).any(|i| !r.is_set(i))
            }),
            KnownZero::UnreadChanged => self
                .change_bits
                .is_some_and(|c| slice_bits(c.as_bytes(), lo, lo + self.page_blocks).is_some()),
        };
        if candidates && self.parent.is_some() {
            let (read, changed) = (self.read, self.change_bits);
            let extra: Vec<(u64, BlockRef)> = self
                .parent_data(lo, hi)?
                .into_iter()
                .filter(|(i, _)| known_zero_at(rule, read, changed, *i))
                .map(|(i, _)| (i, BlockRef::Zero))
                .collect();
            if !extra.is_empty() {
                entries.extend(extra);
                entries.sort_by_key(|e| e.0);
            }
        }
        self.changed += entries.len() as u64;
        let bits = self
            .change_bits
            .and_then(|b| slice_bits(b.as_bytes(), lo, lo + self.page_blocks));
        if self.synthetic {
            let base = self.parent_data(lo, hi)?;
            entries = manifest::apply_entries(&base, &entries, self.block_count)
                .into_iter()
                .map(|(i, id)| (i, BlockRef::Data(id)))
                .collect();
        }
        self.writer.add(q, entries, bits)
    }

    /// Writes the remaining pages; returns the page table and the number
    /// of entries written (before a synthetic full merged them).
    pub fn finish(mut self) -> Result<(PageTable, u64), RepoError> {
        let pages = self.block_count.div_ceil(self.page_blocks);
        self.flush_until(pages)?;
        Ok((self.writer.finish(), self.changed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::bitmap;

    #[test]
    fn slices_of_a_bitmap() {
        let mut bits = vec![0u8; 4];
        bitmap::set(&mut bits, 9);
        assert_eq!(slice_bits(&bits, 0, 16), Some(vec![0, 0x40]));
        assert_eq!(slice_bits(&bits, 16, 32), None);
        assert_eq!(slice_bits(&bits, 8, 72), {
            let mut v = vec![0u8; 8];
            v[0] = 0x40;
            Some(v)
        });
        assert_eq!(slice_bits(&bits, 64, 128), None);
    }
}
