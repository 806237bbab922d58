//! A VDI's data: a sparse file in the simulator's state folder. Which 64 KiB
//! blocks were ever written is tracked here, so that a snapshot copies only
//! those and a large, mostly empty disk costs nothing to snapshot.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::cbt::{ChangeBitmap, CBT_BLOCK_BYTES};

/// One disk image.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    allocated: Mutex<ChangeBitmap>,
}

impl Disk {
    /// Creates an empty sparse image of `size_bytes` at `path`.
    pub fn create(path: &Path, size_bytes: u64) -> std::io::Result<Disk> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size_bytes)?;
        Ok(Disk {
            path: path.to_path_buf(),
            file,
            size_bytes,
            allocated: Mutex::new(ChangeBitmap::new(size_bytes)),
        })
    }

    /// Reopens an image written by an earlier run, with the record of
    /// which blocks were written.
    pub fn open(path: &Path, size_bytes: u64, allocated: ChangeBitmap) -> std::io::Result<Disk> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len != size_bytes || allocated.blocks() != super::cbt::blocks_for(size_bytes) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("image is {len} bytes, the state says {size_bytes}"),
            ));
        }
        Ok(Disk {
            path: path.to_path_buf(),
            file,
            size_bytes,
            allocated: Mutex::new(allocated),
        })
    }

    /// The blocks ever written (for saving the state).
    pub fn allocated(&self) -> ChangeBitmap {
        self.allocated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} beyond the end of a {}-byte disk",
                    self.size_bytes
                ),
            )),
        }
    }

    /// Exactly `len` bytes at `offset` (unwritten ranges read as zeros).
    pub fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.check(offset, len as u64)?;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`. All-zero pieces that fall on blocks never
    /// written are skipped: they already read as zeros.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let block = pos / CBT_BLOCK_BYTES;
            let block_end = (block + 1) * CBT_BLOCK_BYTES;
            let n = ((block_end - pos) as usize).min(data.len() - at);
            let piece = &data[at..at + n];
            if allocated.is_set(block) || piece.iter().any(|&b| b != 0) {
                self.file.write_all_at(piece, pos)?;
                allocated.set(block);
            }
            at += n;
        }
        Ok(())
    }

    /// Whether 64 KiB block `block` was ever written.
    pub fn is_allocated(&self, block: u64) -> bool {
        self.allocated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_set(block)
    }

    /// A new image at `path` with the same content (written blocks only).
    pub fn copy_to(&self, path: &Path) -> std::io::Result<Disk> {
        let copy = Disk::create(path, self.size_bytes)?;
        let blocks: Vec<u64> = self
            .allocated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_set()
            .collect();
        for block in blocks {
            let offset = block * CBT_BLOCK_BYTES;
            let len = CBT_BLOCK_BYTES.min(self.size_bytes - offset) as usize;
            let data = self.read(offset, len)?;
            copy.file.write_all_at(&data, offset)?;
            copy.allocated
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set(block);
        }
        Ok(copy)
    }

    /// Deletes the file; open handles (an export in progress) keep working.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
