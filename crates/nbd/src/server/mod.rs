//! A read-only NBD server: accepts clients on TCP or a unix socket, runs the
//! fixed-newstyle handshake (optionally behind mandatory TLS) and answers
//! transmission requests from an [`Export`]. Every byte from a client goes
//! through the sans-IO codec in [`crate::proto`]; a client that breaks
//! the protocol loses its own connection and nothing else. This module never
//! prints and never writes to an export.
//!
//! Two personalities ([`Mode`]): `Standard` (what qemu-img, nbdinfo and
//! nbdcopy expect from a modern server: GO/INFO, structured replies with
//! holes, `base:allocation`) and `XapiLike`, which reproduces XenServer's
//! xapi-nbd byte for byte (xenapi-reference.md §4) for the simulator.
//!
//! What it serves comes from an [`ExportResolver`]: `cbtvault serve` hands
//! it one export of a snapshot; the simulator validates a session in the
//! export name and attaches a VBD for as long as the [`Export`] lives.
//!
//! Modules depend one way: `export` and `error` (plain types) <- `negotiate`
//! (the handshake as a pure state machine, [`ServerHandshake`]) <-
//! `handshake` (its async driver) <- `connection` <- this file (listener
//! and accept loop).

mod connection;
mod error;
mod export;
mod handshake;
mod memory;
mod negotiate;
mod tls;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

use crate::client::Io;

pub use export::{Export, ExportError, ExportResolver, Mode, ServerOptions};
pub use memory::MemoryExport;
pub use negotiate::{ServerHandshake, ServerStep, Transmission};
pub use tls::{server_config_from_pem, server_config_from_pem_files};

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
            serve_connection(io, resolver, options).await;
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

/// Serves one connection that is already open (what [`serve`] runs for
/// every accepted client; also an in-process peer or a fuzzer's pipe): the
/// handshake, then transmission, until the client leaves, breaks the
/// protocol or the handshake times out.
pub async fn serve_connection(
    io: Box<dyn Io>,
    resolver: Arc<dyn ExportResolver>,
    options: Arc<ServerOptions>,
) {
    // Errors end this connection only; there is nobody to tell.
    let _ = connection::run(io, resolver, options).await;
}
