//! Where blocks come from. A source gives a stable identity, a size and
//! random reads of a frozen point-in-time view; which blocks changed is told
//! separately (a bitmap, extents, or "read everything"). Never imports the
//! repository modules.

pub mod file;
pub mod nbd;
pub mod xenapi;

pub use file::FileSource;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source '{source_name}': {op} at byte {offset}: {error}")]
    Io {
        source_name: String,
        op: &'static str,
        offset: u64,
        error: std::io::Error,
    },
    #[error("source '{source_name}': {reason}")]
    Invalid { source_name: String, reason: String },
}

/// A readable point-in-time view of a disk.
pub trait BlockSource: Send + Sync {
    /// Stable identity used to find the parent, e.g. `file:/abs/path`.
    fn identity(&self) -> &str;
    fn size_bytes(&self) -> u64;
    /// Fills `buf` from byte `offset`; a range past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
}

/// A source under another identity (`backup --source-id`).
pub struct Renamed<'a> {
    pub inner: &'a dyn BlockSource,
    pub identity: String,
}

impl BlockSource for Renamed<'_> {
    fn identity(&self) -> &str {
        &self.identity
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.inner.read_at(offset, buf)
    }
}
