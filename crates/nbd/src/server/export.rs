//! What the server serves and how: the [`Export`] and [`ExportResolver`]
//! traits a caller implements, their [`ExportError`], and the validated
//! [`ServerOptions`] (with the [`Mode`] personality). Plain types; imports
//! nothing else of the server, so every other server module can use them.

use std::sync::Arc;
use std::time::Duration;

use crate::proto;

/// Why an export could not be opened or a request not be answered. Each
/// variant maps to one NBD error ([`ExportError::errno`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("no export named '{0}'")]
    NotFound(String),
    #[error("access to export '{name}' refused: {reason}")]
    Refused { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
}

impl ExportError {
    /// The errno sent to the client for a failed request.
    pub fn errno(&self) -> u32 {
        match self {
            ExportError::Invalid(_) => proto::EINVAL,
            ExportError::Refused { .. } => proto::EPERM,
            ExportError::NotFound(_) | ExportError::Io(_) => proto::EIO,
        }
    }
}

/// One disk image being served. Called from several threads at once.
/// `read` may block on local I/O: reads above 256 KiB run on tokio's
/// blocking pool, smaller ones in place on the runtime (cheaper than a
/// thread hand-off), so it must not wait on the network or on long-held
/// locks. `zero_extents` is always called in place and must be quick:
/// answer from memory or a metadata call.
pub trait Export: Send + Sync {
    fn size_bytes(&self) -> u64;
    /// Exactly `len` bytes at `offset`; the range lies inside the export
    /// (the server checks before calling). An error fails this request only.
    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ExportError>;
    /// `base:allocation` descriptors (length, flags) starting at `offset`
    /// and covering at least one byte of `[offset, offset+len)` when that
    /// range is inside the export; flags are `STATE_HOLE|STATE_ZERO` (3) for
    /// ranges that read as zeros and 0 for data. Descriptors past
    /// `offset+len` are ignored.
    fn zero_extents(&self, offset: u64, len: u32) -> Vec<(u32, u32)>;
    /// Whether a read may wait long (a paced or remote export): such
    /// reads always run on the blocking pool, never inline on a runtime
    /// worker, however small.
    fn reads_may_block(&self) -> bool {
        false
    }
}

/// Turns the export name a client asked for into an export. Called once
/// per GO, INFO or EXPORT_NAME; the returned export lives as long as the
/// connection (or, for INFO, as long as the reply takes).
pub trait ExportResolver: Send + Sync {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, ExportError>;
    /// Names offered to NBD_OPT_LIST (Standard mode).
    fn list(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Which server to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A modern fixed-newstyle server: NO_ZEROES, GO/INFO, LIST, structured
    /// replies, `base:allocation`, up to 32 MiB per read at any alignment.
    #[default]
    Standard,
    /// xapi-nbd (xenapi-reference.md §4): EXPORT_NAME is the only way in,
    /// 134-byte export reply with flags 3, simple replies only, reads in
    /// 512-byte units, no block status. Deviations, both deliberate: reads
    /// above 32 MiB get EINVAL (xapi streams them), and reads beyond the end
    /// get EINVAL (xapi's block device would fail and drop the connection).
    XapiLike,
}

/// Validated server settings.
#[derive(Clone)]
pub struct ServerOptions {
    /// When set, TLS is mandatory: before STARTTLS every option but
    /// STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD and
    /// EXPORT_NAME closes the connection. When unset the server is
    /// plaintext only (in XapiLike mode that is xapi's `insecure_nbd`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub mode: Mode,
    /// Connections open at once; one more is accepted and closed at once
    /// (xapi-nbd: 16 per host).
    pub max_connections: usize,
    /// A client must reach the transmission phase within this time.
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            tls: None,
            mode: Mode::Standard,
            max_connections: 16,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("tls", &self.tls.is_some())
            .field("mode", &self.mode)
            .field("max_connections", &self.max_connections)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}
