//! A raw image file or block device as a source.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{BlockSource, SourceError};

pub struct FileSource {
    file: File,
    identity: String,
    shown: String,
    size_bytes: u64,
}

impl FileSource {
    /// Opens `path` read-only; the identity is `file:` plus the absolute path.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let shown = path.display().to_string();
        let io = |op, error| SourceError::Io {
            source_name: shown.clone(),
            op,
            offset: 0,
            error,
        };
        let mut file = File::open(path).map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        if meta.is_dir() {
            return Err(SourceError::Invalid {
                source_name: shown,
                reason: "is a directory".into(),
            });
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
            identity: format!("file:{}", abs.display()),
            shown,
            size_bytes,
        })
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
        self.file
            .read_exact_at(buf, offset)
            .map_err(|error| SourceError::Io {
                source_name: self.shown.clone(),
                op: "read",
                offset,
                error,
            })
    }
}
