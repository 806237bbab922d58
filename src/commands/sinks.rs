//! Restore targets: sparse regular files, block devices and streams.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::repo::restore::BlockSink;

static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

/// A regular file (holes for zero blocks) or a block device (zeros written).
pub struct FileSink {
    file: File,
    sparse: bool,
}

impl FileSink {
    /// Opens `path` for a disk of `size` bytes. A new or emptied regular
    /// file is sized up front so zero blocks stay holes.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<(FileSink, bool)> {
        let shown = path.display();
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("open block device '{shown}'"))?;
                let dev_size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
                if dev_size < size {
                    bail!("block device '{shown}' has {dev_size} bytes, the snapshot needs {size}");
                }
                Ok((
                    FileSink {
                        file,
                        sparse: false,
                    },
                    false,
                ))
            }
            Ok(m) if m.is_file() && m.len() > 0 && !overwrite => {
                bail!("'{shown}' exists and is not empty; pass --overwrite to replace it")
            }
            Ok(m) if !m.is_file() => {
                bail!("'{shown}' is neither a regular file nor a block device")
            }
            _ => {
                let created = !path.exists();
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .with_context(|| format!("create '{shown}'"))?;
                file.set_len(size)
                    .with_context(|| format!("size '{shown}' to {size} bytes"))?;
                Ok((FileSink { file, sparse: true }, created))
            }
        }
    }
}

impl BlockSink for FileSink {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_zeros(&mut self, mut offset: u64, mut len: u64) -> std::io::Result<()> {
        if self.sparse {
            return Ok(());
        }
        while len > 0 {
            let n = len.min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

/// A sequential stream (stdout): zeros are written out.
pub struct StreamSink<W: Write + Send> {
    out: W,
    position: u64,
}

impl<W: Write + Send> StreamSink<W> {
    pub fn new(out: W) -> Self {
        StreamSink { out, position: 0 }
    }
}

impl<W: Write + Send> BlockSink for StreamSink<W> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        debug_assert_eq!(offset, self.position);
        self.out.write_all(data)?;
        self.position = offset + data.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, offset: u64, mut len: u64) -> std::io::Result<()> {
        debug_assert_eq!(offset, self.position);
        self.position = offset + len;
        while len > 0 {
            let n = len.min(ZEROS.len() as u64) as usize;
            self.out.write_all(&ZEROS[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
