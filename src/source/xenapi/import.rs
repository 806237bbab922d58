//! Streaming a disk into `PUT /import_raw_vdi` (reference §3.2) under a
//! caller-created task: `format=raw` with Content-Length = the disk size,
//! or the `chunked` body (`{offset: u64 LE, len: u32 LE}` + data, ended by
//! a zero header) carrying only the non-zero extents. The body is written
//! straight to the TLS connection as the caller produces it (HTTP/1.1,
//! Content-Length, no `Transfer-Encoding`: xapi refuses it), so memory
//! stays bounded and nothing is copied to a temporary file. Knows nothing
//! of the repository: the caller feeds extents in ascending order.

use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use xapi_wire::chunked::{chunk_header, END};

use super::client::Session;
use super::pool::Endpoint;
use super::XenApiError;

/// How the body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportFormat {
    /// Every byte of the disk, zeros included.
    Raw,
    /// Only the extents given to [`ImportStream::write_extent`].
    Chunked,
}

/// Bytes gathered before a write to the connection.
const PIECE_BYTES: usize = 1 << 20;

static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Largest response head accepted from the handler.
const MAX_RESPONSE_HEAD_BYTES: usize = 64 << 10;
/// How long a stalled host may keep a write or the answer waiting.
const IO_TIMEOUT: Duration = Duration::from_secs(600);

/// One running import: the request body is written straight to the TLS
/// connection from the caller's thread (no extra copy, no thread hop).
/// Dropping it without [`ImportStream::finish`] cuts the connection, so
/// the host sees a short body and fails the task.
pub struct ImportStream {
    format: ImportFormat,
    out: Option<BufWriter<TlsStream>>,
    task: String,
    body_bytes: u64,
    sent_bytes: u64,
    /// Next disk offset expected (raw) or last extent end (chunked).
    position: u64,
}

/// What the host received.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub format: ImportFormat,
    pub body_bytes: u64,
    /// The task's result (the VDI ref as an XML-RPC value fragment).
    pub task_result: String,
}

/// How long a failed upload waits for its task to say why.
const ORPHAN_TASK_WAIT: Duration = Duration::from_secs(60);

fn io_error(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Connects and sends the request head of `PUT PATH?QUERY`.
fn open_put(
    session: &Session,
    endpoint: Endpoint,
    path: &str,
    query: &[(&str, &str)],
    body_bytes: u64,
) -> Result<TlsStream, XenApiError> {
    let Endpoint {
        host,
        port,
        authority,
        tls: config,
    } = endpoint;
    let transport = |reason: String| XenApiError::Transport {
        host: authority.clone(),
        reason,
    };
    let qs = session.handler_query(query)?;
    let tcp = TcpStream::connect((host.as_str(), port)).map_err(|e| transport(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    tcp.set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|_| tcp.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| transport(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| XenApiError::Tls(format!("server name '{host}': {e}")))?;
    let conn =
        rustls::ClientConnection::new(config, name).map_err(|e| XenApiError::Tls(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The session is in the query: never put this head in an error.
    let head = format!(
        "PUT {path}?{qs} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {body_bytes}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(head.as_bytes())
        .and_then(|_| tls.flush())
        .map_err(|e| match ::nbd::tls::refusal_in(&e) {
            Some(refused) => XenApiError::CertificateRefused {
                host: authority.clone(),
                refused: Box::new(refused.clone()),
            },
            None => transport(format!("send PUT {path}: {e}")),
        })?;
    Ok(tls)
}

/// Reads the response head; returns the status code.
fn read_status(tls: &mut TlsStream) -> std::io::Result<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD_BYTES {
            return Err(io_error("response head", "too long"));
        }
        match tls.read(&mut byte) {
            Ok(0) => return Err(io_error("response head", "connection closed")),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(e),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io_error("response head", "no status code"))?;
    Ok(status)
}

impl ImportStream {
    /// Creates a task and starts `PUT /import_raw_vdi?vdi=REF&format=raw`
    /// (plus `chunked`) with a body of exactly `body_bytes`: the disk size
    /// for raw, [`chunked_body_bytes`] for chunked.
    pub fn start(
        session: &Session,
        vdi_ref: &str,
        format: ImportFormat,
        body_bytes: u64,
    ) -> Result<ImportStream, XenApiError> {
        let task = session.task_create("cbtvault restore", "import_raw_vdi")?;
        let mut query = vec![("vdi", vdi_ref), ("format", "raw"), ("task_id", &task)];
        if format == ImportFormat::Chunked {
            query.push(("chunked", "true"));
        }
        // Straight to a host that sees the SR: a redirect would come only
        // after the body (see `pool`).
        let opened = session.endpoint_for_vdi(vdi_ref).and_then(|endpoint| {
            open_put(session, endpoint, "/import_raw_vdi", &query, body_bytes)
        });
        let tls = match opened {
            Ok(t) => t,
            Err(e) => {
                let _ = session.task_destroy(&task);
                return Err(e);
            }
        };
        Ok(ImportStream {
            format,
            out: Some(BufWriter::with_capacity(PIECE_BYTES, tls)),
            task,
            body_bytes,
            sent_bytes: 0,
            position: 0,
        })
    }

    pub fn format(&self) -> ImportFormat {
        self.format
    }

    fn writer(&mut self) -> std::io::Result<&mut BufWriter<TlsStream>> {
        self.out
            .as_mut()
            .ok_or_else(|| io_error("import", "the connection is closed"))
    }

    fn put_bytes(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.check_room(data.len() as u64)?;
        self.sent_bytes += data.len() as u64;
        self.writer()?.write_all(data)
    }

    fn put_zeros(&mut self, len: u64) -> std::io::Result<()> {
        self.check_room(len)?;
        self.sent_bytes += len;
        let out = self.writer()?;
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            out.write_all(&ZEROS[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    fn check_room(&self, len: u64) -> std::io::Result<()> {
        if self.sent_bytes + len > self.body_bytes {
            return Err(io_error(
                "import body overflow",
                format!("{} bytes announced, more written", self.body_bytes),
            ));
        }
        Ok(())
    }

    /// Disk bytes at `offset`: `data` followed by zeros up to `len` bytes
    /// (`data` may be shorter, e.g. a short final block). Offsets ascend.
    pub fn write_extent(&mut self, offset: u64, data: &[u8], len: u64) -> std::io::Result<()> {
        debug_assert!(data.len() as u64 <= len);
        if offset < self.position {
            return Err(io_error(
                "import",
                format!("extent out of order at offset {offset}"),
            ));
        }
        match self.format {
            ImportFormat::Raw => self.put_zeros(offset - self.position)?,
            ImportFormat::Chunked => {
                let length = u32::try_from(len)
                    .map_err(|_| io_error("import", format!("chunk of {len} bytes exceeds u32")))?;
                self.put_bytes(&chunk_header(offset, length))?;
            }
        }
        self.put_bytes(data)?;
        self.put_zeros(len - data.len() as u64)?;
        self.position = offset + len;
        Ok(())
    }

    /// Zeros up to `offset` (raw only; the chunked body skips them).
    pub fn zeros_until(&mut self, offset: u64) -> std::io::Result<()> {
        if self.format == ImportFormat::Raw && offset > self.position {
            self.put_zeros(offset - self.position)?;
            self.position = offset;
        }
        Ok(())
    }

    /// Ends the body, reads the HTTP answer, then follows the task to its
    /// end. A failed task is [`XenApiError::Api`] with the host's code,
    /// which wins over a transport error (the task says what happened).
    pub fn finish(mut self, session: &Session) -> Result<ImportReport, XenApiError> {
        let sent = (|| -> std::io::Result<u16> {
            if self.format == ImportFormat::Chunked {
                self.put_bytes(&END)?;
            }
            if self.sent_bytes != self.body_bytes {
                return Err(io_error(
                    "import body",
                    format!(
                        "{} bytes written where {} were announced",
                        self.sent_bytes, self.body_bytes
                    ),
                ));
            }
            let out = self
                .out
                .take()
                .ok_or_else(|| io_error("import", "closed"))?;
            let mut tls = out.into_inner().map_err(|e| e.into_error())?;
            read_status(&mut tls)
        })();
        self.out = None;
        let task = std::mem::take(&mut self.task);
        if let Ok(status @ 300..=399) = sent {
            // The handler did not run: the task would never end.
            let _ = session.task_destroy(&task);
            return Err(XenApiError::Http {
                what: "PUT /import_raw_vdi (redirected after the body was sent)".into(),
                status,
            });
        }
        // A request that died in transit may never have reached a handler.
        let deadline = sent
            .is_err()
            .then(|| std::time::Instant::now() + ORPHAN_TASK_WAIT);
        let task_result = session.task_wait_until(&task, "import_raw_vdi", deadline)?;
        match sent {
            Ok(200) => Ok(ImportReport {
                format: self.format,
                body_bytes: self.body_bytes,
                task_result,
            }),
            Ok(status) => Err(XenApiError::Http {
                what: "PUT /import_raw_vdi".into(),
                status,
            }),
            Err(e) => Err(XenApiError::Io {
                what: "stream PUT /import_raw_vdi".into(),
                source: e,
            }),
        }
    }

    /// Cuts the upload and waits for the task to end (its error, usually
    /// `VDI_IO_ERROR`, is returned for the report).
    pub fn abort(mut self, session: &Session) -> Option<XenApiError> {
        self.cut();
        let task = std::mem::take(&mut self.task);
        let deadline = std::time::Instant::now() + ORPHAN_TASK_WAIT;
        session
            .task_wait_until(&task, "import_raw_vdi", Some(deadline))
            .err()
    }

    /// Closes the connection without sending what is buffered.
    fn cut(&mut self) {
        if let Some(out) = self.out.take() {
            let (tls, _unsent) = out.into_parts();
            let _ = tls.sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ImportStream {
    fn drop(&mut self) {
        self.cut();
    }
}
