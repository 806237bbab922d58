//! `serve SNAPSHOT`: export a stored snapshot read-only over NBD, straight
//! from the packs, until SIGINT or SIGTERM. Holds a shared repository lock
//! the whole time, so prune cannot remove what is being served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nbd::server::{
    self as nbdserver, Export, ExportError, ExportResolver, Listener, ServerOptions,
};
use serde::Serialize;

use super::{pick_snapshot, Outcome, SnapshotFilter};
use crate::nbdserver::SnapshotExport;
use crate::output::{human_bytes, Ui};
use crate::repo::Repository;

/// Listening address when neither --listen nor --socket is given: loopback
/// only, since anyone who can connect can read the disk.
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Where to listen, validated.
enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

/// One export under one name; an empty name from the client means it too.
struct SingleExport {
    name: String,
    /// `--export-name ''`: every name selects the export.
    any_name: bool,
    export: Arc<SnapshotExport>,
}

impl ExportResolver for SingleExport {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, ExportError> {
        if self.any_name || name.is_empty() || name == self.name {
            Ok(self.export.clone())
        } else {
            Err(ExportError::NotFound(name.to_string()))
        }
    }

    fn list(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
}

#[derive(Serialize)]
struct Serving {
    uri: String,
    snapshot_id: String,
    export_name: String,
    disk_size_bytes: u64,
    tls: bool,
}

/// Validated options of `serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Snapshot id (or unique prefix), or `latest` within `filter`.
    pub snapshot: String,
    /// TCP address (HOST:PORT); exclusive with `socket`.
    pub listen: Option<String>,
    pub socket: Option<PathBuf>,
    /// Export name (default: the snapshot id; empty: any name).
    pub export_name: Option<String>,
    /// Server certificate and key (PEM), both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub filter: SnapshotFilter,
}

pub fn run(ui: &Ui, repo: Repository, options: &ServeOptions) -> Result<Outcome> {
    let endpoint = match (&options.listen, &options.socket) {
        (Some(_), Some(_)) => bail!("give either --listen or --socket, not both"),
        (Some(address), None) => Endpoint::Tcp(address.clone()),
        (None, Some(path)) => Endpoint::Unix(path.clone()),
        (None, None) => Endpoint::Tcp(DEFAULT_LISTEN.to_string()),
    };
    let tls = match (&options.tls_cert, &options.tls_key) {
        (Some(cert), Some(key)) => Some(load_tls(cert, key)?),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let entry = pick_snapshot(&repo, &options.snapshot, &options.filter)?;
    let _lock = repo.lock(false, "serve")?;
    let id = entry.meta.id;
    let repo = Arc::new(repo);
    let export = SnapshotExport::open(repo.clone(), id)
        .with_context(|| format!("open snapshot {id} for serving"))?;
    if export.missing_blocks() > 0 {
        ui.warn(format!(
            "snapshot {id}: {} blocks are not in any pack; reads of them will fail with EIO; run 'cbtvault check'",
            export.missing_blocks()
        ));
    }
    let size_bytes = export.size_bytes();
    let name = options.export_name.clone().unwrap_or_else(|| id.to_hex());
    let resolver = Arc::new(SingleExport {
        any_name: name.is_empty(),
        name: name.clone(),
        export: Arc::new(export),
    });
    let options = ServerOptions {
        tls: tls.clone(),
        ..ServerOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        // Signal handlers first: a client may stop us as soon as it has the URI.
        let stop = stop_signal().context("install signal handlers")?;
        let listener = match &endpoint {
            Endpoint::Tcp(address) => Listener::bind_tcp(address)
                .await
                .with_context(|| format!("listen on '{address}'"))?,
            Endpoint::Unix(path) => bind_unix(path)?,
        };
        let uri = match (&endpoint, listener.tcp_address()) {
            (Endpoint::Tcp(_), Some(address)) => tcp_uri(address, &name, tls.is_some()),
            (Endpoint::Unix(path), _) => unix_uri(path, &name, tls.is_some()),
            (Endpoint::Tcp(address), None) => bail!("no local address for '{address}'"),
        };
        ui.listening(&Serving {
            uri: uri.clone(),
            snapshot_id: id.to_hex(),
            export_name: name.clone(),
            disk_size_bytes: size_bytes,
            tls: tls.is_some(),
        });
        ui.print(format!(
            "serving snapshot {} ({}) read-only at {uri}",
            id.short(),
            human_bytes(size_bytes)
        ));
        ui.info("stop with Ctrl-C or SIGTERM");
        nbdserver::serve(listener, resolver, options, stop).await;
        Ok(())
    })?;
    for line in repo.take_notices() {
        ui.warn(line);
    }
    ui.info("stopped");
    Ok(Outcome::Ok)
}

fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    Ok(nbdserver::server_config_from_pem_files(cert, key)?)
}

/// Binds a unix socket, replacing a stale socket file nobody listens on.
fn bind_unix(path: &Path) -> Result<Listener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("'{}' exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("'{}' is in use by another server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket '{}'", path.display()))?;
    }
    Listener::bind_unix(path).with_context(|| format!("listen on unix socket '{}'", path.display()))
}

/// Resolves once SIGINT or SIGTERM arrives; the handlers are in place when
/// this returns.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Percent-encodes all but RFC 3986 unreserved characters (and `/` when
/// `keep_slash`).
fn encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn tcp_uri(address: std::net::SocketAddr, name: &str, tls: bool) -> String {
    let scheme = if tls { "nbds" } else { "nbd" };
    let host = match address.ip() {
        // Listening everywhere: name this host rather than 0.0.0.0.
        ip if ip.is_unspecified() => crate::repo::lock::hostname(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    format!(
        "{scheme}://{host}:{}/{}",
        address.port(),
        encode(name, false)
    )
}

fn unix_uri(path: &Path, name: &str, tls: bool) -> String {
    let scheme = if tls { "nbds+unix" } else { "nbd+unix" };
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!(
        "{scheme}:///{}?socket={}",
        encode(name, false),
        encode(&absolute.to_string_lossy(), true)
    )
}
