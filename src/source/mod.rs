//! Where blocks come from. A source gives a stable identity, a size and
//! random reads of a frozen point-in-time view; which blocks changed is told
//! separately (a bitmap, extents, or "read everything"). Never imports the
//! repository modules.

pub mod changes;

/// The host and the user (percent-decoded) of a `SCHEME://[USER@]HOST...`
/// URL; a password in it is refused (`why` says where to put it instead).
pub(crate) fn url_user_host(
    url: &url::Url,
    password_advice: &str,
) -> Result<(Option<String>, String), String> {
    if url.password().is_some() {
        return Err(format!(
            "a password in the URL is refused: {password_advice}"
        ));
    }
    let host = url
        .host_str()
        .ok_or("no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let user = match url.username() {
        "" => None,
        u => Some(
            url::form_urlencoded::parse(format!("u={u}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default(),
        ),
    };
    Ok((user, host))
}
pub mod file;
pub mod nbd;
pub mod vmware;
pub mod xenapi;

pub use changes::{Changes, Extent, Extents};
pub use file::FileSource;

use ::bytes::BytesMut;

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
    /// The source changed while it was read, and the caller refuses a
    /// snapshot that may mix two versions of the disk (`backup --strict`).
    #[error("source '{source_name}' changed while it was read ({}); refused by --strict, nothing was committed: back up a frozen copy (an LVM, qemu or file-system snapshot)", .changes.join(", "))]
    Changed {
        source_name: String,
        changes: Vec<String>,
    },
}

/// A readable point-in-time view of a disk.
pub trait BlockSource: Send + Sync {
    /// Stable identity used to find the parent, e.g. `file:/abs/path`.
    fn identity(&self) -> &str;
    fn size_bytes(&self) -> u64;
    /// Fills `buf` from byte `offset`; a range past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Fills every `(offset, buf)`. The default reads scattered ranges from
    /// several threads at once so the device sees a queue, not one read at a
    /// time; sources that pipeline requests themselves (NBD) override it.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        read_in_lanes(self, reads)
    }

    /// Fills every `(offset, buf)`, `buf.len()` bytes each, handing over
    /// the buffers themselves: a source whose reads complete on other
    /// threads (NBD) fills them in place rather than through a buffer of
    /// its own and a copy. The buffers come back holding the data, in the
    /// same order (a buffer may be replaced by another of the same length).
    fn read_owned(&self, reads: &mut [(u64, BytesMut)]) -> Result<(), SourceError> {
        let mut slices: Vec<(u64, &mut [u8])> =
            reads.iter_mut().map(|(at, b)| (*at, &mut b[..])).collect();
        self.read_many(&mut slices)
    }

    /// Called after the last read and before the snapshot is committed:
    /// what changed in the source since it was opened (one phrase each,
    /// e.g. "size 1048576 -> 1052672 bytes"), empty when nothing did or the
    /// source cannot tell. A source whose view is frozen (a hypervisor
    /// snapshot) keeps the default.
    fn check_unchanged(&self) -> Result<Vec<String>, SourceError> {
        Ok(Vec::new())
    }
}

/// Threads used by the default [`BlockSource::read_many`].
const READ_LANES: usize = 8;

fn read_in_lanes<S: BlockSource + ?Sized>(
    source: &S,
    reads: &mut [(u64, &mut [u8])],
) -> Result<(), SourceError> {
    if reads.len() < 2 {
        return reads
            .iter_mut()
            .try_for_each(|(at, buf)| source.read_at(*at, buf));
    }
    let lanes = reads.len().min(READ_LANES);
    let per = reads.len().div_ceil(lanes);
    let read = |group: &mut [(u64, &mut [u8])]| {
        group
            .iter_mut()
            .try_for_each(|(at, buf)| source.read_at(*at, buf))
    };
    std::thread::scope(|s| {
        // The first group is read on this thread, the others on lanes.
        let mut groups = reads.chunks_mut(per);
        let first = groups.next();
        let handles: Vec<_> = groups.map(|group| s.spawn(move || read(group))).collect();
        let here = first.map_or(Ok(()), read);
        handles
            .into_iter()
            .map(|h| h.join().expect("reader lane panicked"))
            .fold(here, |acc, r| acc.and(r))
    })
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
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        self.inner.read_many(reads)
    }
    fn read_owned(&self, reads: &mut [(u64, BytesMut)]) -> Result<(), SourceError> {
        self.inner.read_owned(reads)
    }
    fn check_unchanged(&self) -> Result<Vec<String>, SourceError> {
        self.inner.check_unchanged()
    }
}
