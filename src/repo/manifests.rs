//! Snapshots as the repository holds them (version 1 objects with their
//! manifest inline, version 2 objects with a page table), manifest pages
//! (read verified, written content-addressed) and chains read range by
//! range, so that no reader holds a whole manifest whatever the disk size.
//!
//! spec: format-spec/03-snapshot.md#paged, #pages, #streaming

use std::collections::HashSet;
use std::sync::Arc;

use crate::backend::Kind;
use crate::crypto::Bound;
use crate::format::bitmap;
use crate::format::page::{self, Page};
use crate::format::snapshot::{
    self, BlockRef, PageRow, PageTable, SnapshotMeta, StoredSnapshot, PAGE_BLOCKS,
};
use crate::format::{BlockId, PageId, SnapshotId};
use crate::manifest;

use super::{RepoError, Repository};

/// A snapshot object as read: metadata and manifest, whichever version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub body: Body,
}

/// Where a snapshot's manifest and bitmap are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Version 1: in the object.
    Inline {
        entries: Vec<(u64, BlockRef)>,
        bitmap: Option<Vec<u8>>,
    },
    /// Version 2: in the pages the table names.
    Paged(PageTable),
}

impl Snapshot {
    pub fn from_stored(stored: StoredSnapshot) -> Snapshot {
        match stored {
            StoredSnapshot::Inline(o) => Snapshot {
                meta: o.meta,
                body: Body::Inline {
                    entries: o.entries,
                    bitmap: o.bitmap,
                },
            },
            StoredSnapshot::Paged(p) => Snapshot {
                meta: p.meta,
                body: Body::Paged(p.table),
            },
        }
    }

    /// Entries of the manifest (without reading pages).
    pub fn entry_count(&self) -> u64 {
        match &self.body {
            Body::Inline { entries, .. } => entries.len() as u64,
            Body::Paged(t) => t.entry_count(),
        }
    }

    pub fn has_bitmap(&self) -> bool {
        match &self.body {
            Body::Inline { bitmap, .. } => bitmap.is_some(),
            Body::Paged(t) => t.has_bitmap,
        }
    }

    /// The object version this snapshot is stored as.
    pub fn version(&self) -> u32 {
        match &self.body {
            Body::Inline { .. } => snapshot::VERSION,
            Body::Paged(_) => snapshot::VERSION_PAGED,
        }
    }

    /// Page ids this snapshot names.
    pub fn page_ids(&self) -> impl Iterator<Item = PageId> + '_ {
        let rows: &[PageRow] = match &self.body {
            Body::Paged(t) => &t.rows,
            Body::Inline { .. } => &[],
        };
        rows.iter().map(|r| r.id)
    }

    /// The blocks per range a reader of this snapshot uses.
    pub fn range_blocks(&self) -> u64 {
        match &self.body {
            Body::Paged(t) => t.page_blocks as u64,
            Body::Inline { .. } => PAGE_BLOCKS as u64,
        }
    }

    /// The ranges of `step` blocks that hold an entry (or, `with_bitmap`,
    /// a set bitmap bit) of this snapshot's own manifest, ascending, from
    /// what is in memory (a version 2 object's page table).
    pub fn ranges_touched(&self, step: u64, with_bitmap: bool) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        match &self.body {
            Body::Inline { entries, bitmap } => {
                out.extend(entries.iter().map(|e| e.0 / step));
                if let (Some(b), true) = (bitmap, with_bitmap) {
                    out.extend(bitmap::iter_set(b).map(|i| i / step));
                }
            }
            Body::Paged(t) => {
                let p = t.page_blocks as u64;
                for row in &t.rows {
                    let lo = row.page_no.saturating_mul(p);
                    let hi = lo.saturating_add(p);
                    out.extend(lo / step..=(hi - 1) / step);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Encodes the object (version 1 or 2, as its body).
    pub fn encode(&self) -> Result<Vec<u8>, crate::format::FormatError> {
        match &self.body {
            Body::Inline { entries, bitmap } => snapshot::encode(&snapshot::SnapshotObject {
                meta: self.meta.clone(),
                entries: entries.clone(),
                bitmap: bitmap.clone(),
            }),
            Body::Paged(table) => snapshot::encode_paged(&snapshot::PagedSnapshot {
                meta: self.meta.clone(),
                table: table.clone(),
            }),
        }
    }
}

/// One range of a snapshot's manifest: entries and bitmap slice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeEntries {
    pub entries: Vec<(u64, BlockRef)>,
    /// Bits of the range, `range_blocks / 8` bytes (None: all zero).
    pub bitmap: Option<Vec<u8>>,
}

/// Reads the ranges of one snapshot, keeping the last page read (a range
/// smaller than the snapshot's pages reads each page once).
pub struct LevelReader {
    pub snapshot: Arc<Snapshot>,
    cached: Option<(u64, Page)>,
}

impl LevelReader {
    pub fn new(snapshot: impl Into<Arc<Snapshot>>) -> LevelReader {
        LevelReader {
            snapshot: snapshot.into(),
            cached: None,
        }
    }

    /// Entries (and bitmap bits) of blocks `lo..hi`; `hi - lo` a multiple
    /// of 8 and `lo` of 8.
    pub fn range(
        &mut self,
        repo: &Repository,
        lo: u64,
        hi: u64,
        with_bitmap: bool,
    ) -> Result<RangeEntries, RepoError> {
        let meta = &self.snapshot.meta;
        match &self.snapshot.body {
            Body::Inline { entries, bitmap } => {
                let a = entries.partition_point(|e| e.0 < lo);
                let b = entries.partition_point(|e| e.0 < hi);
                let bits = match bitmap {
                    Some(b) if with_bitmap => slice_bits(b, lo, hi),
                    _ => None,
                };
                Ok(RangeEntries {
                    entries: entries[a..b].to_vec(),
                    bitmap: bits,
                })
            }
            Body::Paged(table) => {
                let p = table.page_blocks as u64;
                let mut out = RangeEntries::default();
                if lo >= hi {
                    return Ok(out);
                }
                for page_no in lo / p..=(hi - 1) / p {
                    let Some(row) = table.row(page_no) else {
                        continue;
                    };
                    if self.cached.as_ref().map(|c| c.0) != Some(page_no) {
                        let page = repo.load_page(row, table, meta)?;
                        self.cached = Some((page_no, page));
                    }
                    let Some((_, page)) = &self.cached else {
                        continue;
                    };
                    let a = page.entries.partition_point(|e| e.0 < lo);
                    let b = page.entries.partition_point(|e| e.0 < hi);
                    out.entries.extend_from_slice(&page.entries[a..b]);
                    if let (Some(bits), true) = (&page.bitmap, with_bitmap) {
                        let dst = out
                            .bitmap
                            .get_or_insert_with(|| vec![0u8; ((hi - lo) / 8) as usize]);
                        let from = lo.max(page.first_index);
                        let to = hi.min(page.end_index());
                        for k in from..to {
                            if bitmap::is_set(bits, k - page.first_index) {
                                bitmap::set(dst, k - lo);
                            }
                        }
                    }
                }
                if out
                    .bitmap
                    .as_ref()
                    .is_some_and(|b| b.iter().all(|x| *x == 0))
                {
                    out.bitmap = None;
                }
                Ok(out)
            }
        }
    }
}

/// The bits `lo..hi` of a whole-disk bitmap as a slice of `(hi - lo) / 8`
/// bytes (bits past the bitmap's end are zero), or None when all are zero.
pub fn slice_bits(bits: &[u8], lo: u64, hi: u64) -> Option<Vec<u8>> {
    let len = ((hi - lo) / 8) as usize;
    let start = (lo / 8) as usize;
    if !lo.is_multiple_of(8) || start >= bits.len() {
        return None;
    }
    let end = (start + len).min(bits.len());
    let mut out = vec![0u8; len];
    out[..end - start].copy_from_slice(&bits[start..end]);
    if out.iter().all(|b| *b == 0) {
        None
    } else {
        Some(out)
    }
}

/// The resolved content of one range of a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeMap {
    /// First block index of the range.
    pub first: u64,
    /// One past the last block index (at most the disk's block count).
    pub end: u64,
    /// Non-zero blocks of the range, ascending.
    pub data: Vec<(u64, BlockId)>,
}

impl RangeMap {
    pub fn get(&self, index: u64) -> Option<BlockId> {
        self.data
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|p| self.data[p].1)
    }
}

/// A chain (full manifest first) read range by range: each range is
/// resolved from the entries every level has in it, holding at most one
/// page per level (format-spec/03-snapshot.md#streaming). Iterating yields
/// the ranges in order; [`ChainReader::range`] reads any one.
pub struct ChainReader<'r> {
    repo: &'r Repository,
    levels: Vec<LevelReader>,
    cutoff: Vec<u64>,
    range_blocks: u64,
    /// Ranges some level has entries in, ascending: the others are all
    /// zero (a hostile or huge disk size costs nothing to walk).
    ranges: Vec<u64>,
    /// Position in `ranges` of the next range the iterator yields.
    next: usize,
    /// The range [`ChainReader::data_in`] resolved last.
    cached: Option<(u64, RangeMap)>,
}

impl<'r> ChainReader<'r> {
    /// `chain` oldest (a full manifest) first; not empty.
    pub fn new(repo: &'r Repository, chain: Vec<Snapshot>) -> Result<ChainReader<'r>, RepoError> {
        Self::shared(repo, chain.into_iter().map(Arc::new).collect())
    }

    /// [`ChainReader::new`] over snapshots shared with other readers.
    pub fn shared(
        repo: &'r Repository,
        chain: Vec<Arc<Snapshot>>,
    ) -> Result<ChainReader<'r>, RepoError> {
        let Some(newest) = chain.last() else {
            return Err(RepoError::Invalid("an empty snapshot chain".into()));
        };
        let range_blocks = newest.range_blocks();
        let counts: Vec<u64> = chain.iter().map(|s| s.meta.block_count()).collect();
        let cutoff = manifest::cutoffs(&counts);
        let mut ranges = Vec::new();
        for (s, cut) in chain.iter().zip(&cutoff) {
            match &s.body {
                Body::Inline { entries, .. } => ranges.extend(
                    entries
                        .iter()
                        .take_while(|e| e.0 < *cut)
                        .map(|e| e.0 / range_blocks),
                ),
                Body::Paged(t) => {
                    let p = t.page_blocks as u64;
                    for row in &t.rows {
                        let lo = row.page_no.saturating_mul(p);
                        if lo >= *cut {
                            break;
                        }
                        let hi = lo.saturating_add(p).min(*cut);
                        ranges.extend(lo / range_blocks..=(hi - 1) / range_blocks);
                    }
                }
            }
            ranges.sort_unstable();
            ranges.dedup();
        }
        Ok(ChainReader {
            repo,
            cutoff,
            levels: chain.into_iter().map(LevelReader::new).collect(),
            range_blocks,
            ranges,
            next: 0,
            cached: None,
        })
    }

    /// The resolved data of blocks `lo..hi` (any bounds), reading each
    /// range once when asked in ascending order.
    pub fn data_in(&mut self, lo: u64, hi: u64) -> Result<Vec<(u64, BlockId)>, RepoError> {
        let hi = hi.min(self.block_count());
        let mut out = Vec::new();
        if lo >= hi {
            return Ok(out);
        }
        for r in self.range_of(lo)..=self.range_of(hi - 1) {
            if self.cached.as_ref().map(|c| c.0) != Some(r) {
                let m = self.range(r)?;
                self.cached = Some((r, m));
            }
            if let Some((_, m)) = &self.cached {
                out.extend(m.data.iter().filter(|e| e.0 >= lo && e.0 < hi));
            }
        }
        Ok(out)
    }

    /// What the chain holds at `index` (indices asked in ascending order
    /// read each range once).
    pub fn get(&mut self, index: u64) -> Result<Option<BlockId>, RepoError> {
        if index >= self.block_count() {
            return Ok(None);
        }
        let r = self.range_of(index);
        if self.cached.as_ref().map(|c| c.0) != Some(r) {
            let m = self.range(r)?;
            self.cached = Some((r, m));
        }
        Ok(self.cached.as_ref().and_then(|c| c.1.get(index)))
    }

    /// The snapshot the chain resolves (the newest).
    pub fn meta(&self) -> &SnapshotMeta {
        &self.levels[self.levels.len() - 1].snapshot.meta
    }

    pub fn id(&self) -> SnapshotId {
        self.meta().id
    }

    pub fn disk_size_bytes(&self) -> u64 {
        self.meta().disk_size_bytes
    }

    pub fn block_size(&self) -> u32 {
        self.meta().block_size
    }

    pub fn block_count(&self) -> u64 {
        self.meta().block_count()
    }

    /// The levels, oldest first.
    pub fn chain(&self) -> impl Iterator<Item = &Snapshot> {
        self.levels.iter().map(|l| &*l.snapshot)
    }

    /// The levels, to share with another reader.
    pub fn shared_chain(&self) -> Vec<Arc<Snapshot>> {
        self.levels.iter().map(|l| l.snapshot.clone()).collect()
    }

    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    pub fn range_blocks(&self) -> u64 {
        self.range_blocks
    }

    pub fn range_count(&self) -> u64 {
        self.block_count().div_ceil(self.range_blocks)
    }

    /// Ranges that may hold data (the others are all zero), ascending.
    pub fn nonempty_ranges(&self) -> &[u64] {
        &self.ranges
    }

    /// The range holding block `index`.
    pub fn range_of(&self, index: u64) -> u64 {
        index / self.range_blocks
    }

    /// Resolves range `r` (blocks `r * range_blocks ..`).
    pub fn range(&mut self, r: u64) -> Result<RangeMap, RepoError> {
        let blocks = self.block_count();
        let lo = r.saturating_mul(self.range_blocks).min(blocks);
        let hi = lo.saturating_add(self.range_blocks).min(blocks);
        let id = self.id();
        let mut parts: Vec<Vec<(u64, BlockRef)>> = Vec::with_capacity(self.levels.len());
        for (l, level) in self.levels.iter_mut().enumerate() {
            if lo >= self.cutoff[l] {
                parts.push(Vec::new());
                continue;
            }
            let part =
                level
                    .range(self.repo, lo, hi, false)
                    .map_err(|e| RepoError::InSnapshot {
                        snapshot: id,
                        cause: Box::new(e),
                    })?;
            parts.push(part.entries);
        }
        let levels: Vec<(&[(u64, BlockRef)], u64)> = parts
            .iter()
            .zip(&self.cutoff)
            .map(|(p, c)| (&p[..], (*c).min(hi)))
            .collect();
        Ok(RangeMap {
            first: lo,
            end: hi,
            data: manifest::resolve_levels(&levels),
        })
    }

    /// Reads every page of the chain and resolves every range once, before
    /// a reader writes anything: a missing or damaged page, or a resolved
    /// range out of order or beyond the disk, fails here. Calls `each` with
    /// each range holding data; returns the number of data blocks. The
    /// iterator starts again from the first range afterwards.
    pub fn survey(&mut self, mut each: impl FnMut(&RangeMap)) -> Result<u64, RepoError> {
        self.next = 0;
        let mut data = 0u64;
        while let Some(m) = self.next() {
            let m = m?;
            let ordered = m.data.windows(2).all(|w| w[0].0 < w[1].0);
            if !ordered || m.data.iter().any(|(i, _)| *i < m.first || *i >= m.end) {
                return Err(RepoError::InSnapshot {
                    snapshot: self.id(),
                    cause: Box::new(RepoError::Invalid(format!(
                        "blocks {}..{} resolve out of order or outside their range; run 'cbtvault check'",
                        m.first, m.end
                    ))),
                });
            }
            data += m.data.len() as u64;
            if !m.data.is_empty() {
                each(&m);
            }
        }
        self.next = 0;
        Ok(data)
    }

    /// Every non-zero block, in order: `(index, id)`.
    pub fn blocks(self) -> impl Iterator<Item = Result<(u64, BlockId), RepoError>> + 'r {
        self.flat_map(|r| match r {
            Ok(m) => m.data.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        })
    }

    /// The whole resolved map in memory (small disks, tests).
    pub fn collect_map(self) -> Result<manifest::BlockMap, RepoError> {
        let disk_size_bytes = self.disk_size_bytes();
        let block_size = self.block_size();
        let mut data = Vec::new();
        for r in self {
            data.extend(r?.data);
        }
        Ok(manifest::BlockMap {
            disk_size_bytes,
            block_size,
            data,
        })
    }
}

impl Iterator for ChainReader<'_> {
    type Item = Result<RangeMap, RepoError>;

    /// The ranges that may hold data, in order (all-zero ranges skipped).
    fn next(&mut self) -> Option<Self::Item> {
        let r = *self.ranges.get(self.next)?;
        self.next += 1;
        Some(self.range(r))
    }
}

/// Writes the pages of a version 2 manifest, range by range in ascending
/// order, each content-addressed (a page already present is not written
/// again), and returns the page table for the object.
pub struct PageWriter<'r> {
    repo: &'r Repository,
    table: PageTable,
    /// Pages known durable in the repository (e.g. the parent chain's).
    present: HashSet<PageId>,
    /// Compute the table, write nothing (`--dry-run`).
    dry_run: bool,
    pub pages_written: u64,
    pub pages_reused: u64,
}

impl<'r> PageWriter<'r> {
    pub fn new(repo: &'r Repository, has_bitmap: bool) -> PageWriter<'r> {
        PageWriter {
            repo,
            table: PageTable {
                page_blocks: PAGE_BLOCKS,
                has_bitmap,
                rows: Vec::new(),
            },
            present: HashSet::new(),
            dry_run: false,
            pages_written: 0,
            pages_reused: 0,
        }
    }

    /// Pages that need not be written again (named by snapshots just read).
    pub fn knowing(mut self, ids: impl IntoIterator<Item = PageId>) -> Self {
        self.present.extend(ids);
        self
    }

    /// Writes nothing: only the table is computed.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    pub fn page_blocks(&self) -> u64 {
        self.table.page_blocks as u64
    }

    /// Adds page `page_no`: its entries (ascending, within the page) and
    /// bitmap slice (`page_blocks / 8` bytes). A page with neither is not
    /// written. Pages must come in ascending order.
    pub fn add(
        &mut self,
        page_no: u64,
        entries: Vec<(u64, BlockRef)>,
        bitmap: Option<Vec<u8>>,
    ) -> Result<(), RepoError> {
        let bitmap = bitmap.filter(|b| b.iter().any(|x| *x != 0));
        if entries.is_empty() && bitmap.is_none() {
            return Ok(());
        }
        if bitmap.is_some() && !self.table.has_bitmap {
            return Err(RepoError::Invalid(
                "a bitmap slice for a manifest without a bitmap".into(),
            ));
        }
        if self.table.rows.last().is_some_and(|r| r.page_no >= page_no) {
            return Err(RepoError::Invalid(format!(
                "manifest page {page_no} written out of order"
            )));
        }
        let page = Page {
            page_blocks: self.table.page_blocks,
            first_index: page_no * self.page_blocks(),
            entries,
            bitmap,
        };
        let entry_count = page.entries.len() as u32;
        let id = if self.dry_run {
            let plain = page::encode(&page).map_err(|e| RepoError::Invalid(e.to_string()))?;
            self.repo.page_id(&plain)
        } else {
            self.repo.save_page(&page, &self.present)?
        };
        if self.present.insert(id) {
            self.pages_written += 1;
        } else {
            self.pages_reused += 1;
        }
        self.table.rows.push(PageRow {
            page_no,
            entry_count,
            id,
        });
        Ok(())
    }

    pub fn finish(self) -> PageTable {
        self.table
    }
}

impl Repository {
    /// Loads a snapshot object of either version, checking its name.
    pub fn load_snapshot(&self, object: &crate::format::ObjectName) -> Result<Snapshot, RepoError> {
        let name = object.to_hex();
        let bytes = self.backend.load(Kind::Snapshot, &name)?;
        if crate::format::ObjectName::of(&bytes) != *object {
            return Err(RepoError::corrupt(
                Kind::Snapshot,
                name,
                "content does not match its name (hash)",
            ));
        }
        let plain = self
            .codec
            .open_object(Bound::Snapshot, &bytes)
            .map_err(|e| RepoError::corrupt(Kind::Snapshot, name.clone(), e))?;
        snapshot::decode_any(&plain)
            .map(Snapshot::from_stored)
            .map_err(|e| RepoError::corrupt(Kind::Snapshot, name, e))
    }

    /// Loads page `row` of a snapshot, verified: its name, its layout and
    /// its fit with the snapshot (format-spec/03-snapshot.md#pages).
    pub fn load_page(
        &self,
        row: &PageRow,
        table: &PageTable,
        meta: &SnapshotMeta,
    ) -> Result<Page, RepoError> {
        let page = self.load_page_by_id(&row.id)?;
        page::check_use(
            &page,
            row,
            table.page_blocks,
            meta.block_count(),
            table.has_bitmap,
        )
        .map_err(|e| RepoError::corrupt(Kind::Page, row.id.to_hex(), e))?;
        Ok(page)
    }

    /// Loads page `id`, checking its name and layout only.
    pub fn load_page_by_id(&self, id: &PageId) -> Result<Page, RepoError> {
        let name = id.to_hex();
        let bytes = self.backend.load(Kind::Page, &name)?;
        let plain = self
            .codec
            .open_object(Bound::Page(id.0), &bytes)
            .map_err(|e| RepoError::corrupt(Kind::Page, name.clone(), e))?;
        if self.page_id(&plain) != *id {
            return Err(RepoError::corrupt(
                Kind::Page,
                name,
                "content does not match its name (hash)",
            ));
        }
        page::decode(&plain).map_err(|e| RepoError::corrupt(Kind::Page, name, e))
    }

    /// The id of a page's bytes: BLAKE3, keyed in an encrypted repository.
    pub fn page_id(&self, plain: &[u8]) -> PageId {
        PageId(self.codec.hasher().id(plain).0)
    }

    /// Writes `page` unless its id is in `present`; returns the id. The
    /// encoded bytes are decoded again before they are written (verify
    /// before write).
    pub fn save_page(&self, page: &Page, present: &HashSet<PageId>) -> Result<PageId, RepoError> {
        let plain = page::encode(page).map_err(|e| RepoError::Invalid(e.to_string()))?;
        let id = self.page_id(&plain);
        if present.contains(&id) {
            return Ok(id);
        }
        if page::decode(&plain).as_ref() != Ok(page) {
            return Err(RepoError::Invalid(format!(
                "manifest page {id} about to be written does not decode to itself"
            )));
        }
        let bytes = self
            .codec
            .seal_object(Bound::Page(id.0), plain)
            .map_err(|e| RepoError::Invalid(format!("manifest page about to be written: {e}")))?;
        self.ensure_lock_held()?;
        self.backend.save(Kind::Page, &id.to_hex(), &bytes)?;
        Ok(id)
    }

    /// Reads snapshot `id`'s chain range by range.
    pub fn chain_reader(&self, id: SnapshotId) -> Result<ChainReader<'_>, RepoError> {
        let chain = self.load_chain(id).map_err(|e| RepoError::InSnapshot {
            snapshot: id,
            cause: Box::new(e),
        })?;
        ChainReader::new(self, chain)
    }

    /// Calls `f` with each range of `step` blocks (a multiple of 8) of a
    /// snapshot's own manifest (not resolved), in order, that holds
    /// something: the range's first block and its entries (and bitmap
    /// slice, `with_bitmap`). One page in memory at a time.
    pub fn each_range(
        &self,
        snapshot: &Snapshot,
        step: u64,
        with_bitmap: bool,
        mut f: impl FnMut(u64, RangeEntries) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        let mut level = LevelReader::new(snapshot.clone());
        for r in snapshot.ranges_touched(step, with_bitmap) {
            let part = level.range(self, r * step, (r + 1) * step, with_bitmap)?;
            if !part.entries.is_empty() || part.bitmap.is_some() {
                f(r * step, part)?;
            }
        }
        Ok(())
    }

    /// Writes `snapshot`'s own manifest as version 2 pages, each range's
    /// entries passed through `keep`, and returns the page table; pages
    /// that come out unchanged are not written again.
    pub fn repage(
        &self,
        snapshot: &Snapshot,
        with_bitmap: bool,
        mut keep: impl FnMut(&(u64, BlockRef)) -> bool,
    ) -> Result<PageTable, RepoError> {
        let mut writer = PageWriter::new(self, with_bitmap && snapshot.has_bitmap())
            .knowing(snapshot.page_ids());
        let step = writer.page_blocks();
        self.each_range(snapshot, step, with_bitmap, |lo, mut part| {
            part.entries.retain(&mut keep);
            writer.add(lo / step, part.entries, part.bitmap)
        })?;
        Ok(writer.finish())
    }

    /// Every entry of a snapshot's own manifest (not resolved), in order,
    /// with its bitmap: for small snapshots and tests; readers of large
    /// ones go range by range ([`LevelReader`]).
    pub fn manifest_of(&self, snapshot: &Snapshot) -> Result<RangeEntries, RepoError> {
        match &snapshot.body {
            Body::Inline { entries, bitmap } => Ok(RangeEntries {
                entries: entries.clone(),
                bitmap: bitmap.clone(),
            }),
            Body::Paged(table) => {
                let blocks = snapshot.meta.block_count();
                let mut out = RangeEntries {
                    entries: Vec::with_capacity(table.entry_count() as usize),
                    bitmap: table
                        .has_bitmap
                        .then(|| vec![0u8; bitmap::len_for(blocks) as usize]),
                };
                for row in &table.rows {
                    let page = self.load_page(row, table, &snapshot.meta)?;
                    if let (Some(dst), Some(bits)) = (&mut out.bitmap, &page.bitmap) {
                        for k in bitmap::iter_set(bits) {
                            bitmap::set(dst, page.first_index + k);
                        }
                    }
                    out.entries.extend(page.entries);
                }
                Ok(out)
            }
        }
    }
}
