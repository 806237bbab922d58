//! File and block-device targets: a regular file (zero blocks stay holes)
//! or an existing block device (zeros written out, its size checked first).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use super::{TargetError, ZEROS};
use crate::repo::restore::BlockSink;

/// A regular file (holes for zero blocks) or a block device (zeros written).
pub struct FileTarget {
    file: File,
    sparse: bool,
}

impl FileTarget {
    /// Opens `path` for a disk of `size` bytes. A new or emptied regular
    /// file is sized up front so zero blocks stay holes. The flag says
    /// whether the file was created.
    pub fn create(
        path: &Path,
        size: u64,
        overwrite: bool,
    ) -> Result<(FileTarget, bool), TargetError> {
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| TargetError::io("open block device", path, e))?;
                let dev_size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
                    .map_err(|e| TargetError::io("size of block device", path, e))?;
                if dev_size < size {
                    return Err(TargetError::refused(
                        path,
                        format!("block device has {dev_size} bytes, the snapshot needs {size}"),
                    ));
                }
                Ok((
                    FileTarget {
                        file,
                        sparse: false,
                    },
                    false,
                ))
            }
            Ok(m) if m.is_file() && m.len() > 0 && !overwrite => Err(TargetError::refused(
                path,
                "exists and is not empty; pass --overwrite to replace it",
            )),
            Ok(m) if !m.is_file() => Err(TargetError::refused(
                path,
                "is neither a regular file nor a block device",
            )),
            _ => {
                let created = !path.exists();
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|e| TargetError::io("create", path, e))?;
                file.set_len(size)
                    .map_err(|e| TargetError::io("set the size of", path, e))?;
                Ok((FileTarget { file, sparse: true }, created))
            }
        }
    }
}

impl BlockSink for FileTarget {
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
