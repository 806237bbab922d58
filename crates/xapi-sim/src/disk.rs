//! A VDI's data, copy-on-write like a VHD differencing chain: a stack of
//! sparse files (layers) in the simulator's state folder. The bottom ones
//! are read-only and may be shared with other disks (snapshots); the top
//! one is this disk's own and takes every write. Each layer records which
//! 64 KiB blocks were written in it; a block reads from the topmost layer
//! that has it, and as zeros when none has.
//!
//! A snapshot freezes the source's top layer (it becomes shared), gives the
//! source a new empty top and the snapshot its own empty top over the same
//! shared layers: it costs O(bitmap), whatever the data (a source whose top
//! is still empty just shares its layers again). A partial write to
//! a block held by a lower layer first copies the block up. A shared
//! layer's file goes when the last disk using it is removed.
//!
//! So that chains do not grow without end (each backup run snapshots the
//! leaf and then drops the snapshot's data), a snapshot of a disk with
//! [`MAX_SHARED_LAYERS`] shared layers first merges two adjacent layers
//! that no other disk uses any more (SM's coalesce, done inline): the pair
//! whose merge copies the least, typically the data written between two
//! snapshots. Up to that depth a snapshot copies nothing.
//!
//! A disk only grows ([`Disk::resize`], `VDI.resize`): its own top layer
//! grows with it, the shared layers keep the size they were frozen at
//! (snapshots taken before keep theirs), and a layer read past its end
//! reads as zeros.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::cbt::{blocks_for, ChangeBitmap, CBT_BLOCK_BYTES};

/// Shared layers from which on a snapshot first merges layers that only
/// its disk still uses, until it has fewer.
pub const MAX_SHARED_LAYERS: usize = 16;

/// Largest piece a merge copies at once.
const MERGE_CHUNK_BLOCKS: u64 = 32;

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

/// One sparse file of a disk's chain and the blocks written in it.
#[derive(Debug)]
pub struct Layer {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    written: ChangeBitmap,
    /// For a shared layer: the disks using it that were not removed. The
    /// last removal deletes the file (open handles keep working).
    users: AtomicUsize,
}

impl Layer {
    /// A new empty sparse file of `size_bytes` at `path`.
    fn create(path: &Path, size_bytes: u64) -> std::io::Result<Layer> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        if let Err(e) = file.set_len(size_bytes) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Layer {
            path: path.to_path_buf(),
            file,
            size_bytes,
            written: ChangeBitmap::new(size_bytes),
            users: AtomicUsize::new(0),
        })
    }

    /// Reopens a layer written by an earlier run, with the record of
    /// which blocks were written in it.
    pub fn open(path: &Path, size_bytes: u64, written: ChangeBitmap) -> std::io::Result<Layer> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len != size_bytes {
            return Err(invalid(format!(
                "image is {len} bytes, the state says {size_bytes}"
            )));
        }
        if written.blocks() != blocks_for(size_bytes) {
            return Err(invalid(format!(
                "the state has {} blocks for a {size_bytes}-byte image",
                written.blocks()
            )));
        }
        Ok(Layer {
            path: path.to_path_buf(),
            file,
            size_bytes,
            written,
            users: AtomicUsize::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size the layer was made (or last grown) with.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Fills `buf` from `offset`; what lies past the layer's end (a layer
    /// frozen before its disk grew) reads as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let inside = self.size_bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file.read_exact_at(&mut buf[..inside], offset)?;
        buf[inside..].fill(0);
        Ok(())
    }

    /// Grows the layer (file and record) to `size_bytes` with zeros; only
    /// a layer no other disk uses may grow.
    fn grow(&mut self, size_bytes: u64) -> std::io::Result<()> {
        if size_bytes <= self.size_bytes {
            return Ok(());
        }
        self.file.set_len(size_bytes)?;
        let mut written = ChangeBitmap::new(size_bytes);
        written.or_assign(&self.written);
        self.written = written;
        self.size_bytes = size_bytes;
        Ok(())
    }

    /// The blocks written in this layer.
    pub fn written(&self) -> &ChangeBitmap {
        &self.written
    }

    /// One user of a shared layer is gone: the last one deletes the file.
    fn release(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The bytes of `block` (a short last block is short).
    fn block_len(&self, block: u64) -> u64 {
        CBT_BLOCK_BYTES.min(self.size_bytes - block * CBT_BLOCK_BYTES)
    }

    /// Copies `blocks` (ascending) from `self` into `to` (at least as
    /// large) and marks them written there. Stopping half-way leaves every
    /// disk's view unchanged as long as the copied blocks read the same
    /// from both layers.
    fn copy_blocks(
        &self,
        to: &mut Layer,
        blocks: impl Iterator<Item = u64>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut run: Option<(u64, u64)> = None; // (first block, count)
        let flush = |run: (u64, u64), buf: &mut Vec<u8>, to: &mut Layer| {
            let offset = run.0 * CBT_BLOCK_BYTES;
            let last = run.0 + run.1 - 1;
            let end = last * CBT_BLOCK_BYTES + self.block_len(last);
            buf.resize((end - offset) as usize, 0);
            self.file.read_exact_at(buf, offset)?;
            to.file.write_all_at(buf, offset)?;
            for b in run.0..=last {
                to.written.set(b);
            }
            Ok::<(), std::io::Error>(())
        };
        for block in blocks {
            run = match run {
                Some((first, n)) if first + n == block && n < MERGE_CHUNK_BLOCKS => {
                    Some((first, n + 1))
                }
                Some(r) => {
                    flush(r, &mut buf, to)?;
                    Some((block, 1))
                }
                None => Some((block, 1)),
            };
        }
        if let Some(r) = run {
            flush(r, &mut buf, to)?;
        }
        Ok(())
    }
}

/// How a disk is stored, for saving the state.
#[derive(Debug)]
pub struct Layout {
    /// The read-only layers, bottom to top (possibly shared).
    pub shared: Vec<Arc<Layer>>,
    /// The disk's own writable top layer.
    pub top: PathBuf,
    pub top_written: ChangeBitmap,
}

#[derive(Debug)]
struct Chain {
    /// The disk's size (its top layer's); shared layers may be smaller.
    size_bytes: u64,
    /// Read-only layers, bottom to top.
    shared: Vec<Arc<Layer>>,
    /// Takes the writes.
    top: Layer,
    removed: bool,
}

/// Where a block reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Top,
    Shared(usize),
    /// No layer has the block: it reads as zeros without any I/O (as an
    /// unallocated VHD block does in tapdisk).
    Zero,
}

impl Chain {
    /// The topmost layer holding `block`, or `Zero` when none has it.
    fn source(&self, block: u64) -> Source {
        if self.top.written.is_set(block) {
            return Source::Top;
        }
        match self.shared.iter().rposition(|l| l.written.is_set(block)) {
            Some(i) => Source::Shared(i),
            None => Source::Zero,
        }
    }

    /// The layer to read for `source`; none for `Zero`.
    fn layer(&self, source: Source) -> Option<&Layer> {
        match source {
            Source::Zero => None,
            Source::Top => Some(&self.top),
            Source::Shared(i) => Some(&self.shared[i]),
        }
    }

    /// Merges two adjacent layers, among the top and the shared layers
    /// no other disk holds, the pair whose merge copies the least. Those
    /// shared layers are the topmost ones: a snapshot shares every layer
    /// below the ones it shares. Views do not change, even when an I/O
    /// error stops it half-way. False when there is nothing to merge.
    fn merge_cheapest(&mut self) -> std::io::Result<bool> {
        let n = self.shared.len();
        let first = self
            .shared
            .iter()
            .rposition(|l| Arc::strong_count(l) > 1)
            .map_or(0, |i| i + 1);
        let Some(j) = (first..n).min_by_key(|&j| {
            let upper = if j + 1 < n {
                &*self.shared[j + 1]
            } else {
                &self.top
            };
            merge_cost(&self.shared[j], upper)
        }) else {
            return Ok(false);
        };
        if j + 1 == n {
            let Some(lower) = Arc::get_mut(&mut self.shared[j]) else {
                return Ok(false);
            };
            let kept = merge_pair(lower, &mut self.top)?;
            let Some(Ok(lower)) = self.shared.pop().map(Arc::try_unwrap) else {
                unreachable!("the layer was not shared");
            };
            let gone = match kept {
                Kept::Lower => std::mem::replace(&mut self.top, lower),
                Kept::Upper => lower,
            };
            let _ = std::fs::remove_file(&gone.path);
        } else {
            let (below, above) = self.shared.split_at_mut(j + 1);
            let (Some(lower), Some(upper)) =
                (Arc::get_mut(&mut below[j]), Arc::get_mut(&mut above[0]))
            else {
                return Ok(false);
            };
            let kept = merge_pair(lower, upper)?;
            let gone = self.shared.remove(match kept {
                Kept::Lower => j + 1,
                Kept::Upper => j,
            });
            let _ = std::fs::remove_file(&gone.path);
        }
        Ok(true)
    }
}

/// Blocks set in `a` and not in `b`.
fn count_minus(a: &ChangeBitmap, b: &ChangeBitmap) -> u64 {
    a.as_bytes()
        .iter()
        .zip(b.as_bytes())
        .map(|(x, y)| (x & !y).count_ones() as u64)
        .sum()
}

/// Blocks that merging `upper` over `lower` copies: the smaller side.
fn merge_cost(lower: &Layer, upper: &Layer) -> u64 {
    upper
        .written
        .count()
        .min(count_minus(&lower.written, &upper.written))
}

/// Which layer of a merged pair holds the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    Lower,
    Upper,
}

/// Makes one of the two layers read as `upper` over `lower` reads,
/// copying the smaller side, and says which.
fn merge_pair(lower: &mut Layer, upper: &mut Layer) -> std::io::Result<Kept> {
    if upper.written.count() <= count_minus(&lower.written, &upper.written) {
        // A layer frozen before the disk grew takes the upper one's size.
        lower.grow(upper.size_bytes)?;
        let blocks: Vec<u64> = upper.written.iter_set().collect();
        upper.copy_blocks(lower, blocks.into_iter())?;
        Ok(Kept::Lower)
    } else {
        let blocks: Vec<u64> = lower
            .written
            .iter_set()
            .filter(|&b| !upper.written.is_set(b))
            .collect();
        lower.copy_blocks(upper, blocks.into_iter())?;
        Ok(Kept::Upper)
    }
}

/// One disk image.
#[derive(Debug)]
pub struct Disk {
    chain: RwLock<Chain>,
}

impl Disk {
    /// Creates an empty sparse image of `size_bytes` at `path`.
    pub fn create(path: &Path, size_bytes: u64) -> std::io::Result<Disk> {
        Ok(Disk::from_layers(
            size_bytes,
            Vec::new(),
            Layer::create(path, size_bytes)?,
        ))
    }

    /// Reopens a single-file image written by an earlier run, with the
    /// record of which blocks were written.
    pub fn open(path: &Path, size_bytes: u64, allocated: ChangeBitmap) -> std::io::Result<Disk> {
        Disk::open_layered(Vec::new(), path, size_bytes, allocated)
    }

    /// Reopens a disk written by an earlier run: its shared layers (opened
    /// once, see [`Layer::open`]) and its own top file.
    pub fn open_layered(
        shared: Vec<Arc<Layer>>,
        top: &Path,
        size_bytes: u64,
        top_written: ChangeBitmap,
    ) -> std::io::Result<Disk> {
        if let Some(l) = shared.iter().find(|l| l.size_bytes > size_bytes) {
            return Err(invalid(format!(
                "layer {} is {} bytes, more than the disk's {size_bytes}",
                l.path.display(),
                l.size_bytes
            )));
        }
        let top = Layer::open(top, size_bytes, top_written)?;
        Ok(Disk::from_layers(size_bytes, shared, top))
    }

    /// A disk over `shared` (each gains a user) and its own `top`.
    fn from_layers(size_bytes: u64, shared: Vec<Arc<Layer>>, top: Layer) -> Disk {
        for l in &shared {
            l.users.fetch_add(1, Ordering::AcqRel);
        }
        Disk {
            chain: RwLock::new(Chain {
                size_bytes,
                shared,
                top,
                removed: false,
            }),
        }
    }

    fn chain(&self) -> RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|e| e.into_inner())
    }

    fn chain_mut(&self) -> RwLockWriteGuard<'_, Chain> {
        self.chain.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The chain to change, unless the disk was removed (`NotFound`).
    fn live_chain_mut(&self) -> std::io::Result<RwLockWriteGuard<'_, Chain>> {
        let guard = self.chain_mut();
        if guard.removed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} was removed", guard.top.path.display()),
            ));
        }
        Ok(guard)
    }

    /// The layers and their bitmaps (for saving the state).
    pub fn layout(&self) -> Layout {
        let chain = self.chain();
        Layout {
            shared: chain.shared.clone(),
            top: chain.top.path.clone(),
            top_written: chain.top.written.clone(),
        }
    }

    /// Lets the kernel write back and drop its cached pages of this disk's
    /// own file in `[offset, offset+len)`: XenServer's tapdisk writes VDIs
    /// with O_DIRECT, so a host's page cache does not fill up with imported
    /// disks; dirty pages are only queued for writeback by the first call
    /// and dropped by a later one. Advisory: failures are ignored.
    pub fn drop_cached(&self, offset: u64, len: u64) {
        let chain = self.chain();
        let _ = rustix::fs::fadvise(
            &chain.top.file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        );
    }

    pub fn size_bytes(&self) -> u64 {
        self.chain().size_bytes
    }

    /// The file of the writable top layer.
    pub fn path(&self) -> PathBuf {
        self.chain().top.path.clone()
    }

    fn check(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let size_bytes = self.size_bytes();
        match offset.checked_add(len) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} beyond the end of a {size_bytes}-byte disk"),
            )),
        }
    }

    /// Exactly `len` bytes at `offset` (unwritten ranges read as zeros).
    /// Consecutive blocks from the same layer are read at once.
    pub fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.check(offset, len as u64)?;
        let mut buf = vec![0u8; len];
        let chain = self.chain();
        let end = offset + len as u64;
        let mut run_start = offset;
        let mut run_source = Source::Top;
        let mut pos = offset;
        while pos < end {
            let block = pos / CBT_BLOCK_BYTES;
            let source = chain.source(block);
            if source != run_source && pos > run_start {
                let piece = &mut buf[(run_start - offset) as usize..(pos - offset) as usize];
                if let Some(layer) = chain.layer(run_source) {
                    layer.read_at(piece, run_start)?;
                }
                run_start = pos;
            }
            run_source = source;
            pos = ((block + 1) * CBT_BLOCK_BYTES).min(end);
        }
        if end > run_start {
            let piece = &mut buf[(run_start - offset) as usize..];
            if let Some(layer) = chain.layer(run_source) {
                layer.read_at(piece, run_start)?;
            }
        }
        Ok(buf)
    }

    /// Writes `data` at `offset`, into the top layer. All-zero pieces that
    /// fall on blocks never written are skipped: they already read as
    /// zeros. A piece of a block held by a lower layer is written over a
    /// copy of that block (copy-up), zeros included.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let mut guard = self.chain_mut();
        let chain = &mut *guard;
        let mut block_buf = Vec::new();
        // Pieces bound for the top file back to back are written with one
        // call: (offset in `data` where the run starts, its length).
        let mut run: Option<(usize, usize)> = None;
        let flush = |run: &mut Option<(usize, usize)>, top: &Layer| -> std::io::Result<()> {
            if let Some((start, len)) = run.take() {
                top.file
                    .write_all_at(&data[start..start + len], offset + start as u64)?;
            }
            Ok(())
        };
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let block = pos / CBT_BLOCK_BYTES;
            let block_start = block * CBT_BLOCK_BYTES;
            let block_len = chain.top.block_len(block);
            let n = ((block_start + block_len - pos) as usize).min(data.len() - at);
            let piece = &data[at..at + n];
            let direct = if chain.top.written.is_set(block) {
                true
            } else if let Some(lower) = chain.shared.iter().rev().find(|l| l.written.is_set(block))
            {
                if n as u64 == block_len {
                    chain.top.written.set(block);
                    true
                } else {
                    flush(&mut run, &chain.top)?;
                    block_buf.resize(block_len as usize, 0);
                    lower.read_at(&mut block_buf, block_start)?;
                    block_buf[(pos - block_start) as usize..][..n].copy_from_slice(piece);
                    chain.top.file.write_all_at(&block_buf, block_start)?;
                    chain.top.written.set(block);
                    false
                }
            } else if !nbd::bytes::is_zero(piece) {
                chain.top.written.set(block);
                true
            } else {
                flush(&mut run, &chain.top)?;
                false
            };
            if direct {
                match &mut run {
                    Some((start, len)) if *start + *len == at => *len += n,
                    _ => {
                        flush(&mut run, &chain.top)?;
                        run = Some((at, n));
                    }
                }
            }
            at += n;
        }
        flush(&mut run, &chain.top)
    }

    /// Whether 64 KiB block `block` was ever written, as this disk sees it
    /// (in any of its layers).
    pub fn is_allocated(&self, block: u64) -> bool {
        let chain = self.chain();
        chain.top.written.is_set(block) || chain.shared.iter().any(|l| l.written.is_set(block))
    }

    /// The blocks ever written, as this disk sees them (all its layers).
    pub fn allocated(&self) -> ChangeBitmap {
        let chain = self.chain();
        let mut all = chain.top.written.clone();
        for l in &chain.shared {
            all.or_assign(&l.written);
        }
        all
    }

    /// A copy-on-write snapshot: the same content, no data copied. The top
    /// layer becomes shared by both disks (unless it is empty); this disk
    /// continues on a new top at `source_top` (not created when the top is
    /// empty), the snapshot on its own at `snapshot_top`.
    pub fn snapshot(&self, source_top: &Path, snapshot_top: &Path) -> std::io::Result<Disk> {
        let mut guard = self.live_chain_mut()?;
        let chain = &mut *guard;
        while chain.shared.len() >= MAX_SHARED_LAYERS && chain.merge_cheapest()? {}
        let size_bytes = chain.size_bytes;
        let own = Layer::create(snapshot_top, size_bytes)?;
        if chain.top.written.count() > 0 {
            let next = match Layer::create(source_top, size_bytes) {
                Ok(l) => l,
                Err(e) => {
                    let _ = std::fs::remove_file(snapshot_top);
                    return Err(e);
                }
            };
            let frozen = std::mem::replace(&mut chain.top, next);
            frozen.users.store(1, Ordering::Release);
            chain.shared.push(Arc::new(frozen));
        }
        Ok(Disk::from_layers(size_bytes, chain.shared.clone(), own))
    }

    /// Grows the disk to `size_bytes` (the new part reads as zeros): its
    /// own top layer grows; the shared ones, and so the snapshots taken
    /// before, keep their size. Shrinking is refused (`InvalidInput`).
    pub fn resize(&self, size_bytes: u64) -> std::io::Result<()> {
        let mut guard = self.live_chain_mut()?;
        let chain = &mut *guard;
        if size_bytes < chain.size_bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte disk cannot shrink to {size_bytes}",
                    chain.size_bytes
                ),
            ));
        }
        chain.top.grow(size_bytes)?;
        chain.size_bytes = size_bytes;
        Ok(())
    }

    /// The blocks a write of `data` at `offset` would newly allocate in
    /// this disk's own layer (as [`Disk::write`] decides: a copy-up, or
    /// data that is not all zeros on a block no layer has).
    pub fn blocks_to_allocate(&self, offset: u64, data: &[u8]) -> u64 {
        let chain = self.chain();
        let mut count = 0;
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let block = pos / CBT_BLOCK_BYTES;
            let block_end = (block + 1) * CBT_BLOCK_BYTES;
            let n = ((block_end - pos) as usize).min(data.len() - at);
            if !chain.top.written.is_set(block)
                && (chain.shared.iter().any(|l| l.written.is_set(block))
                    || !nbd::bytes::is_zero(&data[at..at + n]))
            {
                count += 1;
            }
            at += n;
        }
        count
    }

    /// Deletes the disk's own file, and the shared ones no other disk
    /// uses; open handles (an export in progress) keep working.
    pub fn remove(&self) {
        let mut chain = self.chain_mut();
        if std::mem::replace(&mut chain.removed, true) {
            return;
        }
        let _ = std::fs::remove_file(&chain.top.path);
        for l in &chain.shared {
            l.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    const BS: u64 = CBT_BLOCK_BYTES;
    /// 20 blocks and a short last one.
    const SIZE: u64 = 20 * BS + 1000;

    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn all(d: &Disk) -> Vec<u8> {
        d.read(0, d.size_bytes() as usize).unwrap()
    }

    fn hash(d: &Disk) -> blake3::Hash {
        blake3::hash(&all(d))
    }

    /// Writes to the disk and to its model.
    fn put(d: &Disk, model: &mut [u8], offset: u64, data: &[u8]) {
        d.write(offset, data).unwrap();
        model[offset as usize..][..data.len()].copy_from_slice(data);
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// A folder of numbered layer files.
    struct Fixture {
        dir: tempfile::TempDir,
        n: u32,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                n: 0,
            }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        fn name(&mut self) -> PathBuf {
            self.n += 1;
            self.dir.path().join(format!("{}.img", self.n))
        }

        /// A new disk of SIZE bytes.
        fn disk(&mut self) -> Disk {
            Disk::create(&self.name(), SIZE).unwrap()
        }

        /// A snapshot of `d`.
        fn snap(&mut self, d: &Disk) -> Disk {
            let (frozen, top) = (self.name(), self.name());
            d.snapshot(&frozen, &top).unwrap()
        }
    }

    fn depth(d: &Disk) -> usize {
        d.chain().shared.len()
    }

    #[test]
    fn writes_read_back_and_zeros_on_unwritten_blocks_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = Disk::create(&dir.path().join("a.img"), SIZE).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        put(&d, &mut model, 3 * BS + 5, &random(1, 2 * BS as usize));
        d.write(10 * BS, &vec![0u8; 3 * BS as usize]).unwrap();
        put(&d, &mut model, SIZE - 10, &random(2, 10));
        assert_eq!(all(&d), model);
        let blocks: Vec<u64> = d.allocated().iter_set().collect();
        assert_eq!(blocks, vec![3, 4, 5, 20]);
        assert!(d.is_allocated(20) && !d.is_allocated(10));
        assert!(d.read(SIZE - 1, 2).is_err());
        assert!(d.write(SIZE, b"x").is_err());
    }

    #[test]
    fn snapshot_then_writes_to_the_source_leave_the_snapshot_unchanged() {
        let mut f = Fixture::new();
        let d = f.disk();
        let mut model = vec![0u8; SIZE as usize];
        put(&d, &mut model, 0, &random(1, (8 * BS) as usize));
        put(&d, &mut model, 12 * BS + 7, &random(2, 100));
        let before = hash(&d);
        let snap = f.snap(&d);
        assert_eq!(hash(&snap), before);
        // Whole blocks, partial blocks, across layers, the short last one.
        put(&d, &mut model, 2 * BS, &random(3, BS as usize));
        put(&d, &mut model, 5 * BS + 100, &random(4, (3 * BS) as usize));
        put(&d, &mut model, 12 * BS, &random(5, 10));
        put(&d, &mut model, SIZE - 500, &random(6, 500));
        assert_eq!(all(&d), model);
        assert_eq!(hash(&snap), before);
        assert_ne!(hash(&d), before);
        // Writes to the snapshot stay there too.
        let source_now = hash(&d);
        snap.write(0, &random(7, 10)).unwrap();
        assert_eq!(hash(&d), source_now);
        assert_ne!(hash(&snap), before);
    }

    #[test]
    fn a_partial_write_copies_the_block_up_first() {
        let mut f = Fixture::new();
        let d = f.disk();
        let mut model = vec![0u8; SIZE as usize];
        put(&d, &mut model, 4 * BS, &random(1, BS as usize));
        put(&d, &mut model, 20 * BS, &random(2, 1000));
        let snap = f.snap(&d);
        let frozen = model.clone();
        put(&d, &mut model, 4 * BS + 1000, b"copied up");
        put(&d, &mut model, 20 * BS + 999, b"!");
        assert_eq!(all(&d), model);
        assert_eq!(all(&snap), frozen);
        // The top has the whole blocks now: the lower layer is not needed.
        let chain = d.chain();
        assert!(chain.top.written.is_set(4) && chain.top.written.is_set(20));
        let mut block = vec![0u8; BS as usize];
        chain.top.file.read_exact_at(&mut block, 4 * BS).unwrap();
        assert_eq!(block, model[(4 * BS) as usize..(5 * BS) as usize]);
    }

    #[test]
    fn zeros_written_over_a_lower_layer_shadow_it() {
        let mut f = Fixture::new();
        let d = f.disk();
        let mut model = vec![0u8; SIZE as usize];
        put(&d, &mut model, 0, &random(1, (6 * BS) as usize));
        let snap = f.snap(&d);
        let frozen = model.clone();
        // A whole block, a partial one, and a piece on a never-written block.
        put(&d, &mut model, BS, &vec![0u8; BS as usize]);
        put(&d, &mut model, 3 * BS + 10, &[0u8; 20]);
        put(&d, &mut model, 9 * BS, &vec![0u8; BS as usize]);
        assert_eq!(all(&d), model);
        assert_eq!(all(&snap), frozen);
        let top: Vec<u64> = d.chain().top.written.iter_set().collect();
        assert_eq!(top, vec![1, 3]);
        assert!(d.is_allocated(1) && !d.is_allocated(9));
    }

    #[test]
    fn a_chain_of_five_snapshots_reads_back_exactly() {
        let mut f = Fixture::new();
        let d = f.disk();
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut snaps = Vec::new();
        for i in 0..5u64 {
            for j in 0..4 {
                let offset = rng.gen_range(0..SIZE);
                let len = rng.gen_range(1..=(2 * BS).min(SIZE - offset));
                put(&d, &mut model, offset, &random(i * 10 + j, len as usize));
            }
            let s = f.snap(&d);
            snaps.push((s, model.clone()));
        }
        put(&d, &mut model, 7 * BS + 3, &random(99, (5 * BS) as usize));
        assert_eq!(depth(&d), 5);
        assert_eq!(all(&d), model);
        for (s, expect) in &snaps {
            assert_eq!(&all(s), expect);
            // Unaligned reads across layers.
            for (offset, len) in [(1, 3 * BS as usize), (BS - 1, 2), (SIZE - 1001, 1001)] {
                assert_eq!(
                    s.read(offset, len).unwrap(),
                    expect[offset as usize..][..len].to_vec()
                );
            }
        }
        // The union of the layers, as the disk sees it.
        let seen: Vec<u64> = d.allocated().iter_set().collect();
        let expect: Vec<u64> = (0..blocks_for(SIZE))
            .filter(|&b| {
                let start = (b * BS) as usize;
                let end = ((b + 1) * BS).min(SIZE) as usize;
                model[start..end].iter().any(|&x| x != 0)
            })
            .collect();
        assert_eq!(seen, expect);
    }

    #[test]
    fn removing_the_source_keeps_the_snapshot_and_the_last_user_deletes_the_files() {
        let mut f = Fixture::new();
        let d = f.disk();
        let mut model = vec![0u8; SIZE as usize];
        put(&d, &mut model, 0, &random(1, (3 * BS) as usize));
        let s1 = f.snap(&d);
        let frozen = model.clone();
        put(&d, &mut model, BS, &random(2, 10));
        let s2 = f.snap(&d);
        assert_eq!(
            files(f.path()),
            ["1.img", "2.img", "3.img", "4.img", "5.img"]
        );
        d.remove();
        // Twice is once. The source's own top (4) goes; 1 and 2 are used by
        // the snapshots.
        d.remove();
        assert_eq!(files(f.path()), ["1.img", "2.img", "3.img", "5.img"]);
        assert_eq!(all(&s1), frozen);
        assert_eq!(all(&s2), model);
        // An export of a removed disk keeps reading its files.
        let export = Arc::new(s2);
        let held = export.clone();
        export.remove();
        assert_eq!(files(f.path()), ["1.img", "3.img"]);
        assert_eq!(all(&held), model);
        s1.remove();
        assert_eq!(files(f.path()), Vec::<String>::new());
        assert_eq!(all(&held), model);
        assert!(s1.snapshot(&f.name(), &f.name()).is_err());
    }

    #[test]
    fn a_snapshot_copies_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let size = 256 * BS;
        let d = Disk::create(&dir.path().join("a.img"), size).unwrap();
        d.write(0, &random(1, (200 * BS) as usize)).unwrap();
        let snap = d
            .snapshot(&dir.path().join("b.img"), &dir.path().join("c.img"))
            .unwrap();
        use std::os::unix::fs::MetadataExt;
        for name in ["b.img", "c.img"] {
            let meta = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(meta.len(), size);
            assert_eq!(meta.blocks(), 0, "{name} holds no data");
        }
        assert_eq!(snap.chain().top.written.count(), 0);
        assert_eq!(d.chain().top.written.count(), 0);
        // A snapshot of a disk whose top is empty shares the same layers
        // and leaves the source on its top.
        let again = d
            .snapshot(&dir.path().join("d.img"), &dir.path().join("e.img"))
            .unwrap();
        assert!(!dir.path().join("d.img").exists());
        assert_eq!(depth(&d), 1);
        assert!(Arc::ptr_eq(
            &again.chain().shared[0],
            &snap.chain().shared[0]
        ));
        assert_eq!(hash(&again), hash(&snap));
    }

    #[test]
    fn layers_nobody_else_uses_are_merged_so_chains_stay_short() {
        let mut f = Fixture::new();
        let d = f.disk();
        let mut model = vec![0u8; SIZE as usize];
        put(&d, &mut model, 0, &random(1, SIZE as usize));
        // A backup run: snapshot, read it, drop its data; the guest writes.
        let mut kept = None;
        let mut held = None;
        for run in 0..(3 * MAX_SHARED_LAYERS as u64) {
            let s = f.snap(&d);
            assert_eq!(all(&s), model, "run {run}");
            if run == 5 {
                kept = Some((s, model.clone()));
            } else if run == 20 {
                // Removed, but an export still reads it: its layers are not
                // merged away while it lasts (two runs).
                s.remove();
                held = Some((s, model.clone()));
            } else {
                s.remove();
            }
            if run == 21 || run == 22 {
                assert_eq!(depth(&d), MAX_SHARED_LAYERS + 1, "run {run}");
            } else {
                assert!(depth(&d) <= MAX_SHARED_LAYERS, "run {run}");
            }
            if run == 22 {
                let (h, expect) = held.take().unwrap();
                assert_eq!(all(&h), expect);
            }
            put(
                &d,
                &mut model,
                (run % 20) * BS + run,
                &random(run + 10, 300),
            );
            put(
                &d,
                &mut model,
                ((run * 7) % 20) * BS,
                &random(run + 90, BS as usize),
            );
            assert_eq!(all(&d), model, "run {run}");
        }
        let (s, expect) = kept.unwrap();
        assert_eq!(all(&s), expect);
        // The layers of the kept snapshot stay; the rest were merged.
        assert!(depth(&d) <= MAX_SHARED_LAYERS);
        assert!(files(f.path()).len() <= MAX_SHARED_LAYERS + 2);
        s.remove();
        d.remove();
        assert_eq!(files(f.path()), Vec::<String>::new());
    }

    #[test]
    fn random_histories_match_a_model() {
        let mut f = Fixture::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        // (disk, its model); the first one is the leaf.
        let mut disks: Vec<(Arc<Disk>, Vec<u8>)> =
            vec![(Arc::new(f.disk()), vec![0u8; SIZE as usize])];
        for step in 0..400 {
            let i = rng.gen_range(0..disks.len());
            match rng.gen_range(0..10) {
                0..=5 => {
                    let offset = rng.gen_range(0..SIZE);
                    let len = rng.gen_range(1..=(3 * BS).min(SIZE - offset)) as usize;
                    let data = if rng.gen_bool(0.3) {
                        vec![0u8; len]
                    } else {
                        random(step, len)
                    };
                    let (d, model) = &mut disks[i];
                    put(d, model, offset, &data);
                }
                6 | 7 => {
                    let s = f.snap(&disks[i].0);
                    let model = disks[i].1.clone();
                    disks.push((Arc::new(s), model));
                }
                _ if i > 0 => {
                    let (d, _) = disks.swap_remove(i);
                    d.remove();
                }
                _ => {}
            }
            if step % 20 == 0 {
                for (d, model) in &disks {
                    assert_eq!(&all(d), model, "step {step}");
                }
            }
        }
        for (d, model) in &disks {
            assert_eq!(&all(d), model);
            d.remove();
        }
        assert_eq!(files(f.path()), Vec::<String>::new());
    }

    #[test]
    fn a_grown_disk_reads_zeros_past_the_old_end_and_older_snapshots_keep_their_size() {
        let mut f = Fixture::new();
        let d = f.disk();
        let mut model = vec![0u8; SIZE as usize];
        // The short last block (1000 bytes) is written before the growth.
        put(
            &d,
            &mut model,
            18 * BS,
            &random(1, (2 * BS + 1000) as usize),
        );
        let before = f.snap(&d);
        let frozen = model.clone();
        let grown = SIZE + 10 * BS + 5;
        d.resize(grown).unwrap();
        assert_eq!(d.size_bytes(), grown);
        model.resize(grown as usize, 0);
        assert_eq!(all(&d), model, "the new part reads as zeros");
        assert_eq!(before.size_bytes(), SIZE);
        assert_eq!(all(&before), frozen);
        // A partial write into the block that was short in the shared
        // layer copies it up, zeros past the old end included.
        put(&d, &mut model, 20 * BS + 2000, b"past the old end");
        put(&d, &mut model, grown - 3, b"end");
        assert_eq!(all(&d), model);
        assert_eq!(all(&before), frozen);
        assert!(d.resize(SIZE).is_err(), "no shrinking");
        assert_eq!(d.size_bytes(), grown);
        // Snapshots after the growth have the new size. Once the one from
        // before is gone, its (smaller) layer is merged with newer ones
        // (the cheapest pair, the first): every view stays.
        before.remove();
        drop(before);
        let mut last: Option<Disk> = None;
        for run in 0..(MAX_SHARED_LAYERS as u64 + 4) {
            if let Some(old) = last.take() {
                old.remove();
            }
            put(&d, &mut model, (run % 30) * BS + 7, &random(run + 10, 500));
            let s = f.snap(&d);
            assert_eq!(s.size_bytes(), grown);
            assert_eq!(all(&s), model, "run {run}");
            last = Some(s);
        }
        assert!(depth(&d) <= MAX_SHARED_LAYERS);
        put(&d, &mut model, 19 * BS, &random(99, 100));
        assert_eq!(all(&d), model);
        last.unwrap().remove();
        d.remove();
        assert_eq!(files(f.path()), Vec::<String>::new());
    }

    /// A layer of `size` with `blocks` written (block `b` filled with
    /// byte `b + seed`).
    fn layer(f: &mut Fixture, size: u64, blocks: &[u64], seed: u8) -> Layer {
        let mut l = Layer::create(&f.name(), size).unwrap();
        for &b in blocks {
            let len = l.block_len(b) as usize;
            l.file
                .write_all_at(&vec![b as u8 + seed; len], b * BS)
                .unwrap();
            l.written.set(b);
        }
        l
    }

    fn block(l: &Layer, b: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![9u8; len as usize];
        l.read_at(&mut buf, b * BS).unwrap();
        buf
    }

    #[test]
    fn merging_a_layer_frozen_before_a_growth_keeps_both_views() {
        let mut f = Fixture::new();
        let grown = SIZE + 3 * BS;
        // Few blocks above: the lower layer keeps the result and grows.
        let mut lower = layer(&mut f, SIZE, &[0, 1, 2, 20], 1);
        let mut upper = layer(&mut f, grown, &[1, 22], 50);
        assert_eq!(merge_pair(&mut lower, &mut upper).unwrap(), Kept::Lower);
        assert_eq!(lower.size_bytes(), grown);
        assert_eq!(lower.file.metadata().unwrap().len(), grown);
        assert_eq!(block(&lower, 1, BS), vec![51u8; BS as usize]);
        assert_eq!(block(&lower, 22, BS), vec![72u8; BS as usize]);
        // The block that was short reads its 1000 bytes, then zeros.
        let mut short = vec![21u8; 1000];
        short.resize(BS as usize, 0);
        assert_eq!(block(&lower, 20, BS), short);
        assert_eq!(
            lower.written().iter_set().collect::<Vec<_>>(),
            vec![0, 1, 2, 20, 22]
        );
        // Many blocks above: the upper one keeps the result.
        let mut lower = layer(&mut f, SIZE, &[20], 1);
        let mut upper = layer(&mut f, grown, &[0, 1, 2, 3, 21], 50);
        assert_eq!(merge_pair(&mut lower, &mut upper).unwrap(), Kept::Upper);
        assert_eq!(block(&upper, 20, BS), short);
        assert_eq!(block(&upper, 3, BS), vec![53u8; BS as usize]);
        // Read past a smaller layer's end: zeros.
        assert_eq!(block(&lower, 21, BS), vec![0u8; BS as usize]);
    }

    #[test]
    fn blocks_to_allocate_follows_write() {
        let mut f = Fixture::new();
        let d = f.disk();
        d.write(0, &random(1, BS as usize)).unwrap();
        let _s = f.snap(&d);
        // Block 0 is in a shared layer: a zero write copies it up; block 1
        // is nowhere: zeros allocate nothing, data one block.
        assert_eq!(d.blocks_to_allocate(10, &[0u8; 10]), 1);
        assert_eq!(d.blocks_to_allocate(BS, &[0u8; 10]), 0);
        assert_eq!(d.blocks_to_allocate(BS - 5, &[1u8; 10]), 2);
        d.write(BS - 5, &[1u8; 10]).unwrap();
        assert_eq!(d.blocks_to_allocate(0, &vec![1u8; 3 * BS as usize]), 1);
    }
}
