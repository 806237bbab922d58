//! A thin tokio driver around the NBD codec: connect (TCP or unix socket),
//! run the handshake (with STARTTLS when asked, never falling back to
//! plaintext), then pipeline requests by cookie over one connection. A
//! reader task matches replies to requests and validates every chunk
//! against its request before copying a byte.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::bytes::BytesMut;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::proto::{
    self, ClientHandshake, Decoded, HandshakeOptions, Negotiated, ReplyHeader, Request, Step,
};
use super::tls::{self, TlsOptions};
use super::NbdError;

/// Any byte stream we can speak NBD over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix { path: std::path::PathBuf },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Everything needed to (re)open a connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub address: Address,
    pub export: String,
    pub tls: Option<TlsOptions>,
    pub meta_contexts: Vec<String>,
    /// The one I/O timeout: the longest the handshake, and each request
    /// (with its retries, in a pool), may wait for the server.
    pub timeout: Duration,
}

enum Pending {
    Read {
        offset: u64,
        buf: BytesMut,
        covered: Vec<(u64, u64)>,
        error: Option<(u32, String)>,
        tx: oneshot::Sender<Result<BytesMut, NbdError>>,
    },
    BlockStatus {
        replies: Vec<(u32, Vec<(u32, u32)>)>,
        error: Option<(u32, String)>,
        tx: oneshot::Sender<Result<ContextExtents, NbdError>>,
    },
}

/// Block status descriptors (length, flags) per meta context id.
pub type ContextExtents = Vec<(u32, Vec<(u32, u32)>)>;

type PendingMap = Arc<Mutex<HashMap<u64, (Request, Pending)>>>;

/// One open NBD connection in the transmission phase.
pub struct Connection {
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn Io>>>,
    pending: PendingMap,
    dead: Arc<Mutex<Option<String>>>,
    next_cookie: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    pub negotiated: Negotiated,
    timeout: Duration,
    address: String,
}

async fn open_stream(address: &Address) -> Result<Box<dyn Io>, NbdError> {
    let io_err = |e: std::io::Error| NbdError::Connect {
        address: address.to_string(),
        reason: e.to_string(),
    };
    Ok(match address {
        Address::Tcp { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(io_err)?;
            s.set_nodelay(true).map_err(io_err)?;
            Box::new(s)
        }
        Address::Unix { path } => Box::new(
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(io_err)?,
        ),
    })
}

/// `e`, or [`NbdError::ClientCertificateRequired`] when the server asked
/// for a client certificate that was not configured (`asked`) and then the
/// connection broke.
fn no_client_cert(
    e: NbdError,
    asked: &Option<Arc<std::sync::atomic::AtomicBool>>,
    opts: &ConnectOptions,
) -> NbdError {
    let asked = asked.as_ref().is_some_and(|a| a.load(Ordering::Relaxed));
    if asked
        && matches!(
            e,
            NbdError::Tls { .. } | NbdError::Io { .. } | NbdError::Closed(_)
        )
    {
        let reason = e.to_string();
        // rustls appends a manual's address to an unexpected EOF.
        let reason = match reason.split_once(": https://") {
            Some((head, _)) => head.to_string(),
            None => reason,
        };
        NbdError::ClientCertificateRequired {
            address: opts.address.to_string(),
            reason,
        }
    } else {
        e
    }
}

async fn negotiate(
    io: Box<dyn Io>,
    opts: &ConnectOptions,
) -> Result<(Box<dyn Io>, Negotiated, Vec<u8>), NbdError> {
    let mut cert_asked = None;
    negotiate_watched(io, opts, &mut cert_asked)
        .await
        .map_err(|e| no_client_cert(e, &cert_asked, opts))
}

async fn negotiate_watched(
    mut io: Box<dyn Io>,
    opts: &ConnectOptions,
    cert_asked: &mut Option<Arc<std::sync::atomic::AtomicBool>>,
) -> Result<(Box<dyn Io>, Negotiated, Vec<u8>), NbdError> {
    let mut hs = ClientHandshake::new(HandshakeOptions {
        export: opts.export.clone(),
        tls: opts.tls.is_some(),
        structured_replies: true,
        meta_contexts: opts.meta_contexts.clone(),
    });
    let mut step = hs.feed(&[])?;
    let mut buf = vec![0u8; 4096];
    loop {
        match step {
            Step::Send(bytes) => {
                io.write_all(&bytes)
                    .await
                    .map_err(NbdError::io("send option"))?;
                io.flush().await.map_err(NbdError::io("send option"))?;
            }
            Step::NeedMore(_) => {}
            Step::StartTls(bytes) => {
                io.write_all(&bytes)
                    .await
                    .map_err(NbdError::io("send option"))?;
                let tls = opts
                    .tls
                    .as_ref()
                    .expect("STARTTLS only when TLS was asked for");
                let (config, name, asked) = tls::client_config_watched(tls)?;
                let connector = tokio_rustls::TlsConnector::from(config);
                let stream = connector
                    .connect(name, io)
                    .await
                    .map_err(|e| NbdError::tls_handshake(opts.address.to_string(), e));
                // TLS 1.3 servers reject a missing client certificate only
                // after the client's side of the handshake is done: the
                // next read or write breaks.
                *cert_asked = tls.client.is_none().then_some(asked);
                io = Box::new(stream?);
                step = hs.tls_established()?;
                continue;
            }
            Step::Done(n) => return Ok((io, n, hs.leftover().to_vec())),
        }
        let n = io.read(&mut buf).await.map_err(NbdError::io("negotiate"))?;
        if n == 0 {
            return Err(NbdError::Closed(
                "server closed the connection during negotiation (export name or session refused?)"
                    .into(),
            ));
        }
        step = hs.feed(&buf[..n])?;
    }
}

impl Connection {
    /// Connects and negotiates.
    pub async fn open(opts: &ConnectOptions) -> Result<Connection, NbdError> {
        let fut = async {
            let io = open_stream(&opts.address).await?;
            negotiate(io, opts).await
        };
        let (io, negotiated, leftover) =
            tokio::time::timeout(opts.timeout, fut)
                .await
                .map_err(|_| NbdError::Stalled {
                    address: opts.address.to_string(),
                    request: format!("the handshake for export '{}'", opts.export),
                    waited: opts.timeout,
                })??;
        if !leftover.is_empty() {
            return Err(NbdError::Protocol(proto::ProtoError::Protocol(
                "server sent data before any request".into(),
            )));
        }
        let (rd, wr) = tokio::io::split(io);
        let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(Mutex::new(None));
        let reader = tokio::spawn(reader_loop(
            rd,
            pending.clone(),
            dead.clone(),
            negotiated.clone(),
        ));
        Ok(Connection {
            writer: tokio::sync::Mutex::new(wr),
            pending,
            dead,
            next_cookie: AtomicU64::new(1),
            reader,
            negotiated,
            timeout: opts.timeout,
            address: opts.address.to_string(),
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.negotiated.export.size_bytes
    }

    /// Whether the connection has failed (replies will never come).
    pub fn is_dead(&self) -> bool {
        self.dead.lock().expect("dead flag").is_some()
    }

    async fn send(&self, req: Request, pending: Pending) -> Result<(), NbdError> {
        if let Some(why) = self.dead.lock().expect("dead flag").clone() {
            return Err(NbdError::Closed(why));
        }
        self.pending
            .lock()
            .expect("pending map")
            .insert(req.cookie, (req, pending));
        let mut w = self.writer.lock().await;
        let r = w.write_all(&proto::encode_request(&req)).await;
        if let Err(e) = r {
            self.pending
                .lock()
                .expect("pending map")
                .remove(&req.cookie);
            return Err(NbdError::io("send request")(e));
        }
        Ok(())
    }

    fn cookie(&self) -> u64 {
        self.next_cookie.fetch_add(1, Ordering::Relaxed)
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&self, offset: u64, length: u32) -> Result<BytesMut, NbdError> {
        self.read_reusing(offset, length, BytesMut::new()).await
    }

    /// [`Self::read_reusing`] with one I/O timeout from now.
    pub async fn read_reusing(
        &self,
        offset: u64,
        length: u32,
        buf: BytesMut,
    ) -> Result<BytesMut, NbdError> {
        let deadline = Instant::now() + self.timeout;
        self.read_before(offset, length, buf, deadline).await
    }

    /// Reads `length` bytes at `offset` into `buf`'s memory (a buffer from
    /// an earlier read, or a piece split off the caller's buffer: no
    /// allocation, no zeroing, no copy). Every byte returned is covered by
    /// a data or hole chunk, or by a simple reply, of this read. A reply
    /// not complete by `deadline` is [`NbdError::Stalled`].
    pub async fn read_before(
        &self,
        offset: u64,
        length: u32,
        mut buf: BytesMut,
        deadline: Instant,
    ) -> Result<BytesMut, NbdError> {
        if length == 0 || length > proto::MAX_READ {
            return Err(NbdError::Invalid(format!("read of {length} bytes")));
        }
        let (tx, rx) = oneshot::channel();
        let req = Request {
            flags: 0,
            kind: proto::CMD_READ,
            cookie: self.cookie(),
            offset,
            length,
        };
        if buf.len() > length as usize {
            buf.truncate(length as usize);
        } else {
            buf.resize(length as usize, 0);
        }
        self.send(
            req,
            Pending::Read {
                offset,
                buf,
                covered: Vec::new(),
                error: None,
                tx,
            },
        )
        .await?;
        self.wait(rx, &req, deadline).await
    }

    /// Block status of `[offset, offset+length)` for every selected context;
    /// the server may describe less than asked (callers loop).
    pub async fn block_status(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<(u32, Vec<(u32, u32)>)>, NbdError> {
        let deadline = Instant::now() + self.timeout;
        self.block_status_before(offset, length, deadline).await
    }

    /// [`Self::block_status`], failing with [`NbdError::Stalled`] when the
    /// reply is not complete by `deadline`.
    pub async fn block_status_before(
        &self,
        offset: u64,
        length: u32,
        deadline: Instant,
    ) -> Result<Vec<(u32, Vec<(u32, u32)>)>, NbdError> {
        let (tx, rx) = oneshot::channel();
        let req = Request {
            flags: 0,
            kind: proto::CMD_BLOCK_STATUS,
            cookie: self.cookie(),
            offset,
            length,
        };
        self.send(
            req,
            Pending::BlockStatus {
                replies: Vec::new(),
                error: None,
                tx,
            },
        )
        .await?;
        self.wait(rx, &req, deadline).await
    }

    /// Waits for the reply to `req` until `deadline`. A server silent that
    /// long has stopped answering: the connection is marked dead, so that
    /// the pool opens a new one for the next request.
    async fn wait<T>(
        &self,
        rx: oneshot::Receiver<Result<T, NbdError>>,
        req: &Request,
        deadline: Instant,
    ) -> Result<T, NbdError> {
        let sent = Instant::now();
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => {
                self.pending
                    .lock()
                    .expect("pending map")
                    .remove(&req.cookie);
                let error = NbdError::Stalled {
                    address: self.address.clone(),
                    request: describe(req),
                    waited: sent.elapsed(),
                };
                self.dead
                    .lock()
                    .expect("dead flag")
                    .get_or_insert_with(|| error.to_string());
                Err(error)
            }
            Ok(Err(_)) => Err(NbdError::Closed(
                self.dead
                    .lock()
                    .expect("dead flag")
                    .clone()
                    .unwrap_or_else(|| "connection closed".into()),
            )),
            Ok(Ok(r)) => r,
        }
    }

    /// Sends NBD_CMD_DISC and closes.
    pub async fn close(self) {
        let req = Request {
            flags: 0,
            kind: proto::CMD_DISC,
            cookie: self.cookie(),
            offset: 0,
            length: 0,
        };
        let mut w = self.writer.lock().await;
        let _ = w.write_all(&proto::encode_request(&req)).await;
        let _ = w.shutdown().await;
        drop(w);
        self.reader.abort();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn fail_all(pending: &PendingMap, dead: &Mutex<Option<String>>, why: String) {
    *dead.lock().expect("dead flag") = Some(why.clone());
    let drained: Vec<_> = pending.lock().expect("pending map").drain().collect();
    for (_, (_, p)) in drained {
        match p {
            Pending::Read { tx, .. } => {
                let _ = tx.send(Err(NbdError::Closed(why.clone())));
            }
            Pending::BlockStatus { tx, .. } => {
                let _ = tx.send(Err(NbdError::Closed(why.clone())));
            }
        }
    }
}

async fn reader_loop(
    rd: ReadHalf<Box<dyn Io>>,
    pending: PendingMap,
    dead: Arc<Mutex<Option<String>>>,
    negotiated: Negotiated,
) {
    // Small: reply headers come through it, while payloads (larger than
    // the buffer) are read straight into their destination.
    let mut rd = tokio::io::BufReader::with_capacity(8 * 1024, rd);
    let result = reply_loop(&mut rd, &pending, &negotiated).await;
    let why = match result {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    fail_all(&pending, &dead, why);
}

/// Largest chunk payload: a whole read plus its offset.
const MAX_CHUNK: u32 = proto::MAX_READ + 8;

async fn reply_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    pending: &PendingMap,
    negotiated: &Negotiated,
) -> Result<(), NbdError> {
    let structured = negotiated.structured_replies;
    let mut head = [0u8; 20];
    loop {
        // The magic tells which header follows.
        match rd.read_exact(&mut head[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(NbdError::io("read reply")(e)),
        }
        let need = match proto::decode_reply_header(&head[..4], structured, MAX_CHUNK)? {
            Decoded::Incomplete(n) => n,
            Decoded::Done(..) => 0,
        };
        rd.read_exact(&mut head[4..4 + need])
            .await
            .map_err(NbdError::io("read reply header"))?;
        let header = match proto::decode_reply_header(&head[..4 + need], structured, MAX_CHUNK)? {
            Decoded::Done(h, _) => h,
            Decoded::Incomplete(_) => unreachable!("header length was computed"),
        };
        match header {
            ReplyHeader::Simple { error, cookie } => {
                let (req, p) = pending
                    .lock()
                    .expect("pending map")
                    .remove(&cookie)
                    .ok_or_else(|| {
                        proto_err(format!("simple reply for unknown cookie {cookie}"))
                    })?;
                match p {
                    Pending::Read { mut buf, tx, .. } => {
                        if error != 0 {
                            let _ = tx.send(Err(server_error(&req, (error, String::new()))));
                            continue;
                        }
                        rd.read_exact(&mut buf)
                            .await
                            .map_err(NbdError::io("read reply data"))?;
                        let _ = tx.send(Ok(buf));
                    }
                    Pending::BlockStatus { tx, .. } => {
                        if error == 0 {
                            return Err(proto_err("simple success reply to BLOCK_STATUS"));
                        }
                        let _ = tx.send(Err(server_error(&req, (error, String::new()))));
                    }
                }
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                length,
            } => {
                // What the request expects, looked up without holding the
                // lock across I/O.
                enum Plan {
                    Data { base: u64, buf: BytesMut },
                    Other { limit: u32 },
                }
                let (req, plan) = {
                    let mut guard = pending.lock().expect("pending map");
                    let Some((req, p)) = guard.get_mut(&cookie) else {
                        return Err(proto_err(format!(
                            "reply chunk for unknown cookie {cookie}"
                        )));
                    };
                    let plan = match (kind, p) {
                        (proto::REPLY_TYPE_OFFSET_DATA, Pending::Read { offset, buf, .. }) => {
                            Plan::Data {
                                base: *offset,
                                buf: std::mem::take(buf),
                            }
                        }
                        (proto::REPLY_TYPE_OFFSET_DATA, _) => {
                            return Err(proto_err("OFFSET_DATA chunk for a non-read request"))
                        }
                        (_, Pending::Read { .. }) => Plan::Other { limit: 4096 + 8 },
                        (_, Pending::BlockStatus { .. }) => Plan::Other {
                            limit: 4 + 8 * proto::MAX_EXTENTS,
                        },
                    };
                    (*req, plan)
                };
                match plan {
                    Plan::Data { base, mut buf } => {
                        if length < 9 {
                            return Err(proto_err("OFFSET_DATA chunk too short"));
                        }
                        let data_len = (length - 8) as u64;
                        let mut off = [0u8; 8];
                        rd.read_exact(&mut off)
                            .await
                            .map_err(NbdError::io("read chunk"))?;
                        let at = u64::from_be_bytes(off);
                        if at < base || at + data_len > base + buf.len() as u64 {
                            return Err(proto_err(format!(
                                "OFFSET_DATA at {at}+{data_len} outside the request {base}+{}",
                                buf.len()
                            )));
                        }
                        let rel = (at - base) as usize;
                        rd.read_exact(&mut buf[rel..rel + data_len as usize])
                            .await
                            .map_err(NbdError::io("read chunk data"))?;
                        let mut guard = pending.lock().expect("pending map");
                        let Some((
                            _,
                            Pending::Read {
                                buf: slot, covered, ..
                            },
                        )) = guard.get_mut(&cookie)
                        else {
                            return Err(proto_err("request vanished while reading"));
                        };
                        *slot = buf;
                        add_coverage(covered, at, data_len)?;
                    }
                    Plan::Other { limit } => {
                        if length > limit {
                            return Err(proto_err(format!(
                                "reply chunk of {length} bytes for {req}"
                            )));
                        }
                        let mut payload = vec![0u8; length as usize];
                        rd.read_exact(&mut payload)
                            .await
                            .map_err(NbdError::io("read chunk"))?;
                        let chunk = proto::decode_chunk(kind, &payload)?;
                        let mut guard = pending.lock().expect("pending map");
                        let Some((_, p)) = guard.get_mut(&cookie) else {
                            return Err(proto_err("request vanished while reading"));
                        };
                        apply_chunk(&req, p, chunk, negotiated)?;
                    }
                }
                if flags & proto::REPLY_FLAG_DONE != 0 {
                    let (req, p) = pending
                        .lock()
                        .expect("pending map")
                        .remove(&cookie)
                        .expect("present");
                    finish(&req, p)?;
                }
            }
        }
    }
}

/// A request as messages name it: what, and which bytes.
fn describe(req: &Request) -> String {
    let what = match req.kind {
        proto::CMD_READ => "read",
        proto::CMD_BLOCK_STATUS => "block status",
        _ => "request",
    };
    format!("{what} of {} bytes at offset {}", req.length, req.offset)
}

fn proto_err(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(proto::ProtoError::Protocol(msg.into()))
}

/// Records `[at, at+len)` as covered; overlaps are a protocol error.
fn add_coverage(covered: &mut Vec<(u64, u64)>, at: u64, len: u64) -> Result<(), NbdError> {
    let end = at + len;
    if covered.iter().any(|&(s, e)| at < e && s < end) {
        return Err(proto_err(format!("reply chunks overlap at {at}")));
    }
    covered.push((at, end));
    Ok(())
}

fn apply_chunk(
    req: &Request,
    p: &mut Pending,
    chunk: proto::Chunk<'_>,
    negotiated: &Negotiated,
) -> Result<(), NbdError> {
    use proto::Chunk;
    match (p, chunk) {
        (_, Chunk::None) => Ok(()),
        (
            Pending::Read { error, .. } | Pending::BlockStatus { error, .. },
            Chunk::Error {
                error: e, message, ..
            },
        ) => {
            error.get_or_insert((e, message));
            Ok(())
        }
        (
            Pending::Read {
                offset,
                buf,
                covered,
                ..
            },
            Chunk::OffsetHole { offset: at, length },
        ) => {
            let (base, len) = (*offset, buf.len() as u64);
            if at < base || at + length as u64 > base + len {
                return Err(proto_err(format!(
                    "OFFSET_HOLE at {at}+{length} outside {req}"
                )));
            }
            let rel = (at - base) as usize;
            buf[rel..rel + length as usize].fill(0);
            add_coverage(covered, at, length as u64)
        }
        (Pending::BlockStatus { replies, .. }, Chunk::BlockStatus { context, extents }) => {
            if !negotiated
                .meta_contexts
                .iter()
                .any(|(id, _)| *id == context)
            {
                return Err(proto_err(format!(
                    "block status for unselected context {context}"
                )));
            }
            if replies.iter().any(|(c, _)| *c == context) {
                return Err(proto_err(format!(
                    "two block status chunks for context {context}"
                )));
            }
            replies.push((context, extents));
            Ok(())
        }
        (_, other) => Err(proto_err(format!("unexpected chunk {other:?} for {req}"))),
    }
}

fn server_error(req: &Request, (errno, message): (u32, String)) -> NbdError {
    NbdError::Server {
        errno,
        request: req.to_string(),
        message,
    }
}

/// Completes a request whose last chunk arrived: a server error goes to
/// the caller, an incomplete reply breaks the connection.
fn finish(req: &Request, p: Pending) -> Result<(), NbdError> {
    match p {
        Pending::Read {
            buf,
            covered,
            error,
            tx,
            ..
        } => {
            let result = match error {
                Some(e) => Err(server_error(req, e)),
                None => {
                    let total: u64 = covered.iter().map(|(s, e)| e - s).sum();
                    if total != buf.len() as u64 {
                        return Err(proto_err(format!(
                            "read reply covers {total} of {} bytes for {req}",
                            buf.len()
                        )));
                    }
                    Ok(buf)
                }
            };
            let _ = tx.send(result);
        }
        Pending::BlockStatus { replies, error, tx } => {
            let result = match error {
                Some(e) => Err(server_error(req, e)),
                None if replies.is_empty() => {
                    return Err(proto_err(format!(
                        "block status reply without extents for {req}"
                    )))
                }
                None => Ok(replies),
            };
            let _ = tx.send(result);
        }
    }
    Ok(())
}
