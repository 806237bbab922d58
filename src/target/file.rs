//! File and block-device targets.
//!
//! A regular file is written under a temporary name in the same folder
//! (`.NAME.cbtvault-partial-PID`, mode 0600 or the caller's, zero blocks
//! left as holes), fsynced, and renamed to its name only by [`FileTarget::commit`],
//! after the last block verified; dropped uncommitted, the temporary file
//! is removed. A failed or killed restore therefore never leaves a file at
//! the final name. A block device is written in place (zeros written out)
//! after its size was checked against the snapshot's. Never prints.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{check_disk_size, TargetError, ZEROS};
use crate::repo::restore::BlockSink;

/// How a file target is opened.
#[derive(Debug, Clone, Copy)]
pub struct FileOptions {
    /// Replace an existing non-empty regular file.
    pub overwrite: bool,
    /// Permission bits of a new image file, applied whatever the umask.
    pub mode: u32,
    /// Accept a disk above `MAX_DISK_SIZE_BYTES`.
    pub force_size: bool,
}

/// Marks temporary restore files; a name holding it is never a finished image.
pub const PARTIAL_MARK: &str = ".cbtvault-partial-";

/// A regular file (via a temporary name) or a block device.
pub struct FileTarget {
    file: File,
    path: PathBuf,
    /// The temporary file being written; `None` for a device or once
    /// committed.
    temp: Option<PathBuf>,
    device: bool,
}

impl FileTarget {
    /// Opens `path` for a disk of `size` bytes; nothing is written yet.
    pub fn open(path: &Path, size: u64, options: FileOptions) -> Result<FileTarget, TargetError> {
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
                Ok(FileTarget {
                    file,
                    path: path.to_path_buf(),
                    temp: None,
                    device: true,
                })
            }
            Ok(m) if m.is_file() && m.len() > 0 && !options.overwrite => Err(TargetError::refused(
                path,
                "exists and is not empty; pass --overwrite to replace it",
            )),
            Ok(m) if !m.is_file() => Err(TargetError::refused(
                path,
                "is neither a regular file nor a block device",
            )),
            _ => {
                check_disk_size(path, size, options.force_size)?;
                let temp = temp_name(path)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(options.mode)
                    .open(&temp)
                    .map_err(|e| TargetError::io("create a temporary file next to", path, e))?;
                // The target owns the file from here: dropped, it is removed.
                let target = FileTarget {
                    file,
                    path: path.to_path_buf(),
                    temp: Some(temp.clone()),
                    device: false,
                };
                // `mode` above is masked by the umask; this is not.
                target
                    .file
                    .set_permissions(std::fs::Permissions::from_mode(options.mode))
                    .map_err(|e| TargetError::io("set permissions of", &temp, e))?;
                // Sized up front so zero blocks stay holes; a size above the
                // file system's maximum fails here, before any write.
                target
                    .file
                    .set_len(size)
                    .map_err(|e| TargetError::io("set the size of", &temp, e))?;
                Ok(target)
            }
        }
    }

    pub fn is_device(&self) -> bool {
        self.device
    }

    /// Gives a regular file its final name (after `finish` made it
    /// durable) and makes the rename durable. A no-op for a device.
    pub fn commit(mut self) -> Result<(), TargetError> {
        let Some(temp) = self.temp.take() else {
            return Ok(());
        };
        let fail = |what, e| {
            let _ = std::fs::remove_file(&temp);
            TargetError::io(what, &self.path, e)
        };
        self.file.sync_all().map_err(|e| fail("sync", e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| fail("rename the restored file to", e))?;
        File::open(parent_of(&self.path))
            .and_then(|d| d.sync_all())
            .map_err(|e| TargetError::io("sync the folder of", &self.path, e))
    }
}

impl Drop for FileTarget {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.NAME.cbtvault-partial-PID` next to `path`.
fn temp_name(path: &Path) -> Result<PathBuf, TargetError> {
    let name = path
        .file_name()
        .ok_or_else(|| TargetError::refused(path, "names no file"))?;
    Ok(parent_of(path).join(format!(
        ".{}{PARTIAL_MARK}{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

impl BlockSink for FileTarget {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_zeros(&mut self, mut offset: u64, mut len: u64) -> std::io::Result<()> {
        // A new file was sized up front: its zeros are holes already.
        if !self.device {
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
