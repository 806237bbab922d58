//! A read-only NBD server: accepts clients on TCP or a unix socket, runs the
//! fixed-newstyle handshake (optionally behind mandatory TLS) and answers
//! transmission requests from an [`Export`]. Every byte from a client goes
//! through the sans-IO codec in `source::nbd::proto`; a client that breaks
//! the protocol loses its own connection and nothing else. This module never
//! prints and never writes to an export.
//!
//! Two personalities ([`Mode`]): `Standard` (what qemu-img, nbdinfo and
//! nbdcopy expect from a modern server: GO/INFO, structured replies with
//! holes, `base:allocation`) and `XapiLike`, which reproduces XenServer's
//! xapi-nbd byte for byte (xenapi-reference.md §4) for the simulator.
//!
//! What it serves comes from an [`ExportResolver`]: `cbtvault serve` hands
//! it one [`SnapshotExport`]; the simulator validates a session in the
//! export name and attaches a VBD for as long as the [`Export`] lives.

mod connection;
mod handshake;
mod memory;
mod snapshot;
mod tls;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

use crate::source::nbd::client::Io;
use crate::source::nbd::proto;

pub use memory::MemoryExport;
pub use snapshot::SnapshotExport;
pub use tls::server_config_from_pem;

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

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    /// Binds a TCP address such as `127.0.0.1:10809` (port 0 picks one).
    pub async fn bind_tcp(address: &str) -> std::io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(address).await?))
    }

    /// Binds a unix socket at `path`, which must not exist.
    pub fn bind_unix(path: &Path) -> std::io::Result<Listener> {
        Ok(Listener::Unix {
            listener: UnixListener::bind(path)?,
            path: path.to_path_buf(),
        })
    }

    /// The bound TCP address (with the port chosen for port 0).
    pub fn tcp_address(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Replies are written whole; don't let Nagle hold the tail.
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                Ok(Box::new(s))
            }
        }
    }
}

/// Decrements the open-connection count when a connection task ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves clients until `shutdown` completes, one task per connection.
/// On shutdown the listener closes (a unix socket file is removed) and open
/// connections are dropped, their exports with them, before this returns.
pub async fn serve(
    listener: Listener,
    resolver: Arc<dyn ExportResolver>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let options = Arc::new(options);
    let open = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connection tasks as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = listener.accept() => a,
        };
        let io = match accepted {
            Ok(io) => io,
            // Out of descriptors or a client that vanished mid-accept: the
            // listener itself is fine, try again shortly.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= options.max_connections {
            // xapi-nbd: "Server busy"; the client sees EOF.
            drop(io);
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(open.clone());
        let resolver = resolver.clone();
        let options = options.clone();
        tasks.spawn(async move {
            let _slot = slot;
            // Errors end this connection only; there is nobody to tell.
            let _ = connection::run(io, resolver, options).await;
        });
    }
    // A unix socket file would otherwise outlive the server.
    if let Listener::Unix { path, .. } = &listener {
        let path = path.clone();
        drop(listener);
        let _ = std::fs::remove_file(path);
    }
    tasks.shutdown().await;
}
