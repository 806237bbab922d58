//! The simulator's HTTPS port: XML-RPC on `POST /` and `/RPC2`, JSON-RPC
//! on `POST /jsonrpc` (and `/json`), the HTTP handlers `GET
//! /export_raw_vdi` and `PUT /import_raw_vdi` (xenapi-reference.md §3), and
//! the simulator-only `PUT /sim/guest_write`. A small HTTP/1.1 server over
//! the pure pieces in `http`, `xmlrpc` and `jsonrpc`: keep-alive for RPC,
//! bodies bounded before allocation, streaming for disk data.
//!
//! This module owns the listener, the connection (reading heads and
//! bodies, responding, lingering) and the routing table of paths; each
//! handler lives in its own submodule: `rpc`, `tasks` (what all HTTP
//! handlers share), `raw_vdi`, `metadata`, `guest`.

mod guest;
mod metadata;
mod raw_vdi;
mod rpc;
mod tasks;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::http::{self, HttpError, RequestHead};
use super::Core;
use xapi_wire::xmlrpc;

/// Largest RPC request body.
const MAX_RPC_BODY: u64 = 16 << 20;
/// Largest `/sim/guest_write` body.
const MAX_GUEST_WRITE: u64 = 64 << 20;
/// Bytes per disk read or write when streaming.
const IO_CHUNK: usize = 1 << 20;
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long and how much a closing connection keeps reading (see `linger`).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 << 20;

type Stream = TlsStream<TcpStream>;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("timed out")]
    Timeout,
}

/// Serves HTTPS as `host` (a pool member or the master) until `shutdown`
/// turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    core: Arc<Core>,
    host: crate::model::Ref,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        open.fetch_add(1, Ordering::AcqRel);
        let open = open.clone();
        let acceptor = acceptor.clone();
        let core = core.clone();
        let host = host.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let work = async {
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                if let Ok(Ok(io)) = tls {
                    let mut conn = Conn {
                        io,
                        buf: Vec::new(),
                        core,
                        host,
                        import_seen: 0,
                        import_faults: (None, None),
                    };
                    // A client that breaks HTTP loses its own connection only.
                    let _ = conn.run().await;
                }
            };
            tokio::select! {
                _ = work => {}
                _ = stop.changed() => {}
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

struct Conn {
    io: Stream,
    /// Bytes read past the current request head.
    buf: Vec<u8>,
    core: Arc<Core>,
    /// The host this port belongs to.
    host: crate::model::Ref,
    /// Import body bytes received on this connection.
    import_seen: u64,
    /// (`import_fail_after_bytes`, `import_drop_after_bytes`) as they were
    /// when the current import started: read once, not per body read.
    import_faults: (Option<u64>, Option<u64>),
}

/// What to do with the connection after a response.
#[derive(PartialEq, Eq)]
enum After {
    KeepAlive,
    Close,
}

fn html_error(status: u16, reason: &str, detail: &str) -> Vec<u8> {
    let mut d = String::new();
    xmlrpc::escape(detail, &mut d);
    format!(
        "<html><body><h1>HTTP {status} {reason}</h1>{d}</body></html>",
        reason = reason.to_ascii_lowercase()
    )
    .into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorised",
        403 => "Forbidden",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Request Entity Too Large",
        503 => "Service Unavailable",
        _ => "Internal Error",
    }
}

impl Conn {
    async fn run(&mut self) -> Result<(), ConnError> {
        loop {
            let head = match tokio::time::timeout(IDLE_TIMEOUT, self.read_head()).await {
                Err(_) => return Err(ConnError::Timeout),
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(ConnError::Http(e))) => {
                    let body = html_error(400, "Bad Request", &e.to_string());
                    self.respond(400, &[("content-type", "text/html".into())], &body, false)
                        .await?;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
            };
            if self.route(head).await? == After::Close {
                let _ = self.io.shutdown().await;
                self.linger().await;
                return Ok(());
            }
        }
    }

    /// Reads and discards what the client still sends (a body we refused
    /// to read) until it closes, so that closing does not reset the
    /// connection before the client has read our answer. Bounded in bytes
    /// and time.
    async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut discarded = 0usize;
        let mut tmp = vec![0u8; 64 * 1024];
        while discarded < LINGER_BYTES {
            match tokio::time::timeout_at(deadline, self.io.read(&mut tmp)).await {
                Ok(Ok(n)) if n > 0 => discarded += n,
                _ => return,
            }
        }
    }

    /// Reads what the client sent next; a client silent for
    /// `IDLE_TIMEOUT` mid-request is an error.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        // Straight into the buffer's spare room: no zeroed bounce buffer.
        self.buf.reserve(256 * 1024);
        tokio::time::timeout(IDLE_TIMEOUT, self.io.read_buf(&mut self.buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    async fn read_head(&mut self) -> Result<Option<RequestHead>, ConnError> {
        loop {
            if let Some((head, n)) = http::parse_head(&self.buf)? {
                self.buf.drain(..n);
                return Ok(Some(head));
            }
            if self.read_more().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    /// Exactly `len` body bytes (the caller bounded `len`).
    async fn read_body(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < len {
            if self.read_more().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        let rest = self.buf.split_off(len);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    async fn read_some(&mut self, max: usize) -> std::io::Result<Vec<u8>> {
        if self.buf.is_empty() && self.read_more().await? == 0 {
            return Ok(Vec::new());
        }
        let n = max.min(self.buf.len());
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    async fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
        keep_alive: bool,
    ) -> std::io::Result<()> {
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n", body.len()));
        head.push_str(if keep_alive {
            "connection: keep-alive\r\n"
        } else {
            "connection: close\r\n"
        });
        head.push_str("cache-control: no-cache, no-store\r\n\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.io.write_all(&out).await?;
        self.io.flush().await
    }

    /// A response head without Content-Length; the body ends at close.
    async fn respond_streaming(&mut self, headers: &[(&str, String)]) -> std::io::Result<()> {
        let mut head = String::from(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncache-control: no-cache, no-store\r\n",
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.io.write_all(head.as_bytes()).await?;
        self.io.flush().await
    }

    async fn fail(&mut self, status: u16, detail: &str) -> Result<After, ConnError> {
        let body = html_error(status, reason(status), detail);
        self.respond(
            status,
            &[("content-type", "text/html".into())],
            &body,
            false,
        )
        .await?;
        Ok(After::Close)
    }

    /// A handler on a host that does not see `sr` answers 302 to one that
    /// does, same path and query (reference §3.1, `importexport.ml`
    /// `return_302_redirect`). `None`: this host sees it (or no host
    /// does, and the handler fails as it would). The caller's `task_id`
    /// stays pending for the other host.
    // Assumption: xapi's Location is `https://ADDRESS/PATH?QUERY` on port
    // 443; every simulated host listens on the master's port, which the
    // Location carries when it is not 443.
    async fn redirect_unless_seen(
        &mut self,
        head: &RequestHead,
        task: &(crate::model::Ref, bool),
        sr: &str,
    ) -> Result<Option<After>, ConnError> {
        let target = {
            let mut st = self.core.lock();
            if st.host_sees_sr(&self.host, sr) {
                return Ok(None);
            }
            let Some(other) = st.hosts_seeing_sr(sr).into_iter().next() else {
                return Ok(None);
            };
            // The caller's task goes on at the other host; one made here
            // for this request is gone with it.
            if task.1 {
                st.tasks.remove(&task.0);
            }
            st.hosts.get(&other).map(|h| h.address.clone())
        };
        let Some(address) = target else {
            return Ok(None);
        };
        let port = self.io.get_ref().0.local_addr()?.port();
        let authority = match (address.contains(':'), port) {
            (true, 443) => format!("[{address}]"),
            (true, p) => format!("[{address}]:{p}"),
            (false, 443) => address,
            (false, p) => format!("{address}:{p}"),
        };
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(head.query.iter())
            .finish();
        let location = format!("https://{authority}{}?{query}", head.path);
        self.respond(302, &[("location", location)], b"", false)
            .await?;
        Ok(Some(After::Close))
    }

    async fn route(&mut self, head: RequestHead) -> Result<After, ConnError> {
        if self.core.unavailable() {
            // Restarting (Faults::restart_downtime_ms): nothing answers.
            return self.fail(503, "xapi is restarting").await;
        }
        let legacy = self.core.lock().faults.legacy_host;
        match (head.method.as_str(), head.path.as_str()) {
            ("POST", "/" | "/RPC2") => self.rpc(head, false).await,
            ("POST", "/jsonrpc" | "/json") if !legacy => self.rpc(head, true).await,
            ("OPTIONS", "/" | "/json" | "/jsonrpc") => {
                let headers = [
                    ("access-control-allow-origin", "*".to_string()),
                    ("access-control-allow-methods", "POST, OPTIONS".to_string()),
                    ("access-control-allow-headers", "content-type".to_string()),
                ];
                let keep = head.keep_alive();
                self.respond(200, &headers, b"", keep).await?;
                Ok(if keep { After::KeepAlive } else { After::Close })
            }
            ("GET", "/export_raw_vdi") => self.export_raw_vdi(head).await,
            ("PUT", "/import_raw_vdi") => self.import_raw_vdi(head).await,
            ("GET", "/export_metadata") => self.export_metadata(head).await,
            ("PUT", "/import_metadata") => self.import_metadata(head).await,
            ("PUT" | "POST", "/sim/guest_write") => self.guest_write(head).await,
            _ => {
                self.fail(
                    404,
                    &format!("no handler for {} {}", head.method, head.path),
                )
                .await
            }
        }
    }
}
