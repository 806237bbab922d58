//! A raw image file or block device as a source. Owns opening it (refusing
//! what is not a disk: directories, character devices, FIFOs, sockets),
//! reading it, and telling whether it changed while it was read (size,
//! modification and change times, device and inode). Never writes to it
//! (but for the debug-only test hook below) and never decides what a change
//! means for the backup.

use std::fs::{File, Metadata};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{BlockSource, Extents, SourceError};

/// Extents of data [`FileSource::data_extents`] lists at most (16 bytes
/// each: 64 MiB); a file more fragmented than that is read whole.
pub const MAX_DATA_EXTENTS: usize = 1 << 22;

pub struct FileSource {
    file: File,
    path: PathBuf,
    identity: String,
    shown: String,
    size_bytes: u64,
    opened: Stamp,
    #[cfg(debug_assertions)]
    reads: std::sync::atomic::AtomicU64,
}

/// What is recorded of the file when it is opened and compared after the
/// last read: a change in any of them means the bytes read may mix two
/// versions of the disk. Device and inode tell whether the path still
/// names the file that was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size_bytes: u64,
    device: u64,
    inode: u64,
    /// (seconds, nanoseconds)
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    fn of(meta: &Metadata, size_bytes: u64) -> Self {
        Stamp {
            size_bytes,
            device: meta.dev(),
            inode: meta.ino(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// What differs in `now`, one phrase each.
    fn differences(&self, now: &Stamp) -> Vec<String> {
        let time = |(s, ns): (i64, i64)| {
            chrono::DateTime::from_timestamp(s, ns.clamp(0, 999_999_999) as u32)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
                .unwrap_or_else(|| format!("{s}.{ns:09}"))
        };
        let mut out = Vec::new();
        if self.size_bytes != now.size_bytes {
            out.push(format!(
                "size {} -> {} bytes",
                self.size_bytes, now.size_bytes
            ));
        }
        if self.modified != now.modified {
            out.push(format!(
                "modification time {} -> {}",
                time(self.modified),
                time(now.modified)
            ));
        }
        if self.changed != now.changed {
            out.push(format!(
                "change time {} -> {}",
                time(self.changed),
                time(now.changed)
            ));
        }
        out
    }
}

/// Why a file of this type cannot be backed up, if it cannot.
fn refused_type(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_dir() {
        Some("is a directory")
    } else if t.is_char_device() {
        Some("is a character device, not a disk image or block device (it has no size and no fixed content)")
    } else if t.is_fifo() {
        Some(
            "is a FIFO, not a disk image or block device (it has no size and cannot be read twice)",
        )
    } else if t.is_socket() {
        Some("is a socket, not a disk image or block device")
    } else {
        None
    }
}

impl FileSource {
    /// Opens `path` read-only; the identity is `file:` plus the absolute
    /// path. Only regular files and block devices are accepted.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let shown = path.display().to_string();
        let io = |op, error| SourceError::Io {
            source_name: shown.clone(),
            op,
            offset: 0,
            error,
        };
        let invalid = |reason: &str| SourceError::Invalid {
            source_name: shown.clone(),
            reason: reason.into(),
        };
        // Looked at before opening: opening a FIFO waits for a writer.
        let meta = std::fs::metadata(path).map_err(|e| io("stat", e))?;
        if let Some(reason) = refused_type(&meta) {
            return Err(invalid(reason));
        }
        let mut file = File::open(path).map_err(|e| io("open", e))?;
        // And again on what was opened, which may have been replaced since.
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        if let Some(reason) = refused_type(&meta) {
            return Err(invalid(reason));
        }
        // Block devices report 0 in metadata; their size is where seek ends.
        let size_bytes = if meta.is_file() {
            meta.len()
        } else {
            file.seek(SeekFrom::End(0)).map_err(|e| io("seek", e))?
        };
        let abs = std::fs::canonicalize(path).map_err(|e| io("resolve path", e))?;
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            identity: format!("file:{}", abs.display()),
            shown,
            size_bytes,
            opened: Stamp::of(&meta, size_bytes),
            #[cfg(debug_assertions)]
            reads: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Where a regular file's data lies, from the file system
    /// (`SEEK_DATA` / `SEEK_HOLE`): the bytes outside these extents are
    /// holes and read as zeros, so a backup need not read them. `None` for
    /// block devices ([`FileSource::is_regular`] tells first); the whole
    /// file when it has more than [`MAX_DATA_EXTENTS`] extents. A file
    /// system without hole support reports the whole file as data.
    pub fn data_extents(&self) -> Result<Option<Extents>, SourceError> {
        if !self.is_regular() {
            return Ok(None);
        }
        let mut ranges = Vec::new();
        let mut pos = 0u64;
        while pos < self.size_bytes {
            let start = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(o) => o,
                // No data at or after `pos`.
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => {
                    return Err(SourceError::Io {
                        source_name: self.shown.clone(),
                        op: "seek to data",
                        offset: pos,
                        error: e.into(),
                    })
                }
            };
            let end =
                rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(start)).map_err(|e| {
                    SourceError::Io {
                        source_name: self.shown.clone(),
                        op: "seek to a hole",
                        offset: start,
                        error: e.into(),
                    }
                })?;
            if end <= start {
                break;
            }
            if ranges.len() == MAX_DATA_EXTENTS {
                return Ok(Some(Extents::from_ranges(
                    [(0, self.size_bytes)],
                    self.size_bytes,
                )));
            }
            ranges.push((start, end - start));
            pos = end;
        }
        Ok(Some(Extents::from_ranges(ranges, self.size_bytes)))
    }

    /// Whether the source is a regular file (not a block device).
    pub fn is_regular(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.is_file())
    }

    /// The stamp of the open file now, and of what `path` names now (`None`
    /// when nothing does).
    fn stamps_now(&self) -> Result<(Stamp, Option<Stamp>), SourceError> {
        let io = |op, error| SourceError::Io {
            source_name: self.shown.clone(),
            op,
            offset: 0,
            error,
        };
        let meta = self.file.metadata().map_err(|e| io("stat", e))?;
        let size_bytes = if meta.is_file() {
            meta.len()
        } else {
            (&self.file)
                .seek(SeekFrom::End(0))
                .map_err(|e| io("seek", e))?
        };
        let open = Stamp::of(&meta, size_bytes);
        let named = match std::fs::metadata(&self.path) {
            Ok(m) => Some(Stamp::of(&m, size_bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("stat", e)),
        };
        Ok((open, named))
    }

    /// Test hook, compiled into debug builds only (what `cargo test`
    /// runs): `CBTVAULT_TEST_MODIFY_SOURCE=N` makes the Nth read of a file
    /// source overwrite the file's first 4 KiB with 0xEE through a second
    /// handle, as another writer would while the backup reads, so tests can
    /// change a source during a backup deterministically.
    #[cfg(debug_assertions)]
    fn test_modify_hook(&self) {
        use std::sync::atomic::Ordering;
        let Ok(n) = std::env::var("CBTVAULT_TEST_MODIFY_SOURCE") else {
            return;
        };
        let hit = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        if n.parse::<u64>().is_ok_and(|n| n == hit) {
            // File times tick with the kernel's coarse clock: let it move on
            // so the write is seen even on a file written just before.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let writer = std::fs::OpenOptions::new().write(true).open(&self.path);
            if let Ok(w) = writer {
                let _ = w.write_all_at(&[0xEE; 4096], 0);
                let _ = w.sync_all();
            }
        }
    }
}

impl BlockSource for FileSource {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        #[cfg(debug_assertions)]
        self.test_modify_hook();
        self.file
            .read_exact_at(buf, offset)
            .map_err(|error| SourceError::Io {
                source_name: self.shown.clone(),
                op: "read",
                offset,
                error,
            })
    }

    /// Compares the file (the open handle, and what its path names now)
    /// with what was recorded when it was opened. Times are as fine as the
    /// file system keeps them (a write within the same clock tick as the
    /// open may go unseen); a block device's times may not move on writes,
    /// so for it mainly the size and the inode count.
    fn check_unchanged(&self) -> Result<Vec<String>, SourceError> {
        let (open, named) = self.stamps_now()?;
        let mut changes = self.opened.differences(&open);
        match named {
            None => changes.push("the path no longer exists (removed or renamed)".into()),
            Some(n) if (n.device, n.inode) != (open.device, open.inode) => changes.push(format!(
                "the path now names another file (device and inode {}:{}, was {}:{})",
                n.device, n.inode, open.device, open.inode
            )),
            Some(_) => {}
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> PathBuf {
        let p = dir.join("disk.img");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        p
    }

    #[test]
    fn an_untouched_image_reports_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileSource::open(&image(dir.path())).unwrap();
        let mut buf = [0u8; 4096];
        s.read_at(4096, &mut buf).unwrap();
        assert_eq!(s.check_unchanged().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn an_image_that_grew_reports_its_new_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path());
        let s = FileSource::open(&p).unwrap();
        let f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all_at(&[1u8; 512], 8192).unwrap();
        let changes = s.check_unchanged().unwrap();
        assert!(
            changes.contains(&"size 8192 -> 8704 bytes".to_string()),
            "{changes:?}"
        );
    }

    #[test]
    fn an_image_replaced_or_removed_under_its_path_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path());
        let s = FileSource::open(&p).unwrap();
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![7u8; 8192]).unwrap();
        std::fs::rename(&other, &p).unwrap();
        let changes = s.check_unchanged().unwrap();
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("the path now names another file")),
            "{changes:?}"
        );
        std::fs::remove_file(&p).unwrap();
        let changes = s.check_unchanged().unwrap();
        assert!(
            changes.iter().any(|c| c.contains("no longer exists")),
            "{changes:?}"
        );
    }

    #[test]
    fn character_devices_are_refused() {
        for dev in ["/dev/null", "/dev/zero"] {
            match FileSource::open(Path::new(dev)) {
                Err(SourceError::Invalid { reason, .. }) => {
                    assert!(reason.contains("character device"), "{reason}")
                }
                Err(e) => panic!("{dev}: {e}"),
                Ok(_) => panic!("{dev} was accepted"),
            }
        }
    }
}
