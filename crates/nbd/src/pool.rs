//! The client side above one connection: NBD URIs, the error type, and a
//! pool of pipelined connections to one export with reconnect and bounded
//! retry, zero-copy reads and block status extents. Knows nothing of what
//! the blocks are for (the product's sources wrap it).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::bytes::BytesMut;
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;

use crate::client::{Address, ConnectOptions, Connection};
use crate::{proto, tls};

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Protocol(#[from] proto::ProtoError),
    #[error("nbd: cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("nbd: TLS with {address} failed: {reason}")]
    Tls { address: String, reason: String },
    /// The server's certificate was refused: why, what it presented, and
    /// which options would trust it.
    #[error("nbd: the TLS certificate of {address} is refused: {refused}; {}", .refused.nbd_advice())]
    CertificateRefused {
        address: String,
        refused: Box<tls::CertificateRefused>,
    },
    /// The server asked for a client certificate, none was configured,
    /// and the connection then failed.
    #[error("nbd: {address} requires a TLS client certificate and none was given (it asked for one, then: {reason})")]
    ClientCertificateRequired { address: String, reason: String },
    #[error(transparent)]
    TlsSetup(#[from] tls::TlsError),
    /// The cause is part of the message and not a `source`, so that a
    /// chain printed whole (`{:#}`) says it once.
    #[error("nbd: {op}: {error}")]
    Io {
        op: &'static str,
        error: std::io::Error,
    },
    #[error("nbd: connection lost: {0}")]
    Closed(String),
    /// The server sent nothing for the whole I/O timeout while a request
    /// (or the handshake) waited for it.
    #[error("nbd: server {address} stopped answering: no reply to {request} after {:.1} s", waited.as_secs_f64())]
    Stalled {
        address: String,
        request: String,
        waited: Duration,
    },
    /// The export is larger than the caller's limit ([`PoolOptions::max_size_bytes`]).
    #[error("nbd: export '{export}' on {address} claims {size_bytes} bytes, more than the limit of {limit_bytes} bytes")]
    ExportTooLarge {
        export: String,
        address: String,
        size_bytes: u64,
        limit_bytes: u64,
    },
    /// A later connection (or a reconnect) of a pool describes the export
    /// differently from the first one.
    #[error("nbd: {connection} reports {what} {got} where the first connection reported {first}: refusing to read from a different export")]
    Inconsistent {
        connection: String,
        what: &'static str,
        first: String,
        got: String,
    },
    #[error("nbd server error {} ({errno}) for {request}{}", proto::errno_name(*errno), if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        errno: u32,
        request: String,
        message: String,
    },
    #[error("nbd: {0}")]
    Invalid(String),
}

impl NbdError {
    /// Maps an I/O error of `op` into [`NbdError::Io`].
    /// A TLS failure underneath becomes plain words (rustls' own text for
    /// a connection closed without close_notify carries a link).
    pub fn io(op: &'static str) -> impl Fn(std::io::Error) -> NbdError {
        move |source| {
            let source = match tls::failure_text(&source) {
                Some(text) => std::io::Error::new(source.kind(), text),
                None => source,
            };
            NbdError::Io { op, error: source }
        }
    }

    /// A failed TLS handshake with `address`: the refused certificate when
    /// that is the cause, else the failure in plain words.
    pub fn tls_handshake(address: String, error: std::io::Error) -> NbdError {
        if let Some(refused) = tls::refusal_in(&error) {
            return NbdError::CertificateRefused {
                address,
                refused: Box::new(refused.clone()),
            };
        }
        let reason = tls::failure_text(&error).unwrap_or_else(|| error.to_string());
        NbdError::Tls { address, reason }
    }

    /// Worth reconnecting and retrying (the connection broke, not the
    /// request). A server that stopped answering is not: its request has
    /// used up its whole I/O timeout.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            NbdError::Closed(_) | NbdError::Io { .. } | NbdError::Connect { .. }
        )
    }
}

/// A parsed NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    /// The URI scheme asked for TLS (nbds).
    pub tls: bool,
}

impl NbdUri {
    pub fn parse(text: &str) -> Result<NbdUri, NbdError> {
        let bad = |why: &str| NbdError::Invalid(format!("'{text}' is not an NBD URI: {why}"));
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        let (tls, unix) = match url.scheme() {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            other => return Err(bad(&format!("unknown scheme '{other}'"))),
        };
        let path = url.path();
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path));
        let address = if unix {
            let socket = url
                .query_pairs()
                .find(|(k, _)| k == "socket")
                .map(|(_, v)| v.into_owned())
                .ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?;
            Address::Unix {
                path: PathBuf::from(socket),
            }
        } else {
            let host = url
                .host_str()
                .ok_or_else(|| bad("no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            Address::Tcp {
                host,
                port: url.port().unwrap_or(10809),
            }
        };
        Ok(NbdUri {
            address,
            export,
            tls,
        })
    }

    /// Stable identity for finding parents: scheme, address and export.
    pub fn identity(&self) -> String {
        match &self.address {
            Address::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.export),
            Address::Unix { path } => {
                format!("nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub connections: usize,
    /// Largest single read request.
    pub request_bytes: u32,
    /// Reconnect-and-retry attempts per request before giving up (each
    /// within the request's one I/O timeout, [`ConnectOptions::timeout`]).
    pub retries: u32,
    /// Largest export size accepted: a server claiming more is refused
    /// before anything is read.
    pub max_size_bytes: u64,
}

/// The default of [`PoolOptions::max_size_bytes`]: 64 TiB, above any
/// virtual disk in practice and far below what would exhaust memory.
pub const DEFAULT_MAX_SIZE_BYTES: u64 = 64 << 40;

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            connections: 4,
            request_bytes: 2 << 20,
            retries: 1,
            max_size_bytes: DEFAULT_MAX_SIZE_BYTES,
        }
    }
}

/// Read buffers kept for reuse per pool (each at most one request long).
const SPARE_BUFFERS: usize = 64;
/// ... and at most this many bytes of them.
const SPARE_BYTES: usize = 16 << 20;

/// The range one block status walk asks about at a time.
pub const EXTENT_WINDOW_BYTES: u64 = 1 << 30;

/// How many windows of a block status walk are asked at once.
pub const EXTENT_WINDOWS_IN_FLIGHT: usize = 16;

/// Most extents one window may hold (after merging neighbours with the
/// same flags): 4 KiB alternating allocation over a whole window is
/// 262,144; the cap bounds a walk's memory (12 MiB a window) against a
/// server that describes its export byte by byte.
pub const MAX_EXTENTS_PER_WINDOW: usize = 1 << 19;

/// The least time each extra connection of a pool (after the first) gets to
/// connect and finish its handshake: it gets this, or 4 times what the
/// first connection took if that is longer, never more than the I/O
/// timeout. A server that serves one client at a time (qemu-nbd's default
/// `-e 1`) lets the TCP or unix connect succeed but never starts the
/// handshake: a short deadline of its own lets the pool continue on the
/// connections that opened instead of waiting out the whole I/O timeout,
/// while a server that answered the first handshake answers the others
/// about as quickly.
pub const EXTRA_CONNECTION_DEADLINE: Duration = Duration::from_secs(3);

/// Several connections to one export, requests spread across them.
pub struct NbdPool {
    options: ConnectOptions,
    pool: PoolOptions,
    slots: Vec<AsyncMutex<Arc<Connection>>>,
    next: std::sync::atomic::AtomicUsize,
    /// Buffers of finished reads, reused by the next ones.
    spare: std::sync::Mutex<Vec<BytesMut>>,
    /// Why the pool has fewer connections than asked, if it has.
    fewer: Option<String>,
    /// Required read alignment (from block size constraints, or 512 when
    /// the server answered through EXPORT_NAME like xapi-nbd).
    pub alignment: u32,
    pub size_bytes: u64,
    pub negotiated: proto::Negotiated,
}

impl NbdPool {
    /// Opens the first connection (within the I/O timeout), then, when the
    /// server says several connections are safe, the others concurrently,
    /// each within [`EXTRA_CONNECTION_DEADLINE`]. Extra connections that
    /// fail or stall are dropped and the pool continues on those that
    /// opened ([`NbdPool::fewer_connections`] says why). An export larger
    /// than [`PoolOptions::max_size_bytes`] is refused, and every later
    /// connection must describe the export as the first did.
    pub async fn connect(options: ConnectOptions, pool: PoolOptions) -> Result<NbdPool, NbdError> {
        let started = Instant::now();
        let first = Connection::open(&options).await?;
        let first_took = started.elapsed();
        let negotiated = first.negotiated.clone();
        if negotiated.export.size_bytes > pool.max_size_bytes {
            return Err(NbdError::ExportTooLarge {
                export: options.export.clone(),
                address: options.address.to_string(),
                size_bytes: negotiated.export.size_bytes,
                limit_bytes: pool.max_size_bytes,
            });
        }
        let mut slots = vec![AsyncMutex::new(Arc::new(first))];
        let asked = pool.connections.max(1);
        let flags = negotiated.export.transmission_flags;
        // Only a server that says so serves several connections
        // consistently: CAN_MULTI_CONN, a read-only export, or xapi-nbd
        // (EXPORT_NAME), which allows 16 per host.
        let multi = negotiated.used_export_name
            || flags & proto::TFLAG_CAN_MULTI_CONN != 0
            || flags & proto::TFLAG_READ_ONLY != 0;
        let mut fewer = None;
        if asked > 1 && !multi {
            fewer = Some(format!(
                "using 1 of {asked} connections to {}: the export is writable and the server does not offer several connections (no NBD_FLAG_CAN_MULTI_CONN)",
                options.address
            ));
        } else if asked > 1 {
            let mut extra = options.clone();
            extra.timeout = options
                .timeout
                .min(EXTRA_CONNECTION_DEADLINE.max(first_took * 4));
            let opened = join_all((1..asked).map(|_| Connection::open(&extra))).await;
            // Why they failed, with how many failed so.
            let mut failures: Vec<(String, usize)> = Vec::new();
            for (k, result) in opened.into_iter().enumerate() {
                match result {
                    Ok(c) => {
                        let name =
                            format!("connection {} of {asked} to {}", k + 2, options.address);
                        same_export(&negotiated, &c.negotiated, name)?;
                        slots.push(AsyncMutex::new(Arc::new(c)));
                    }
                    // Servers limit connections (qemu-nbd: one client by
                    // default; xapi-nbd: 16 per host): the first one is
                    // enough to go on.
                    Err(e) => {
                        let why = extra_failure(&e, extra.timeout);
                        match failures.iter_mut().find(|(w, _)| *w == why) {
                            Some((_, n)) => *n += 1,
                            None => failures.push((why, 1)),
                        }
                    }
                }
            }
            if !failures.is_empty() {
                let why: Vec<String> = failures
                    .iter()
                    .map(|(why, n)| format!("{n} {why}"))
                    .collect();
                fewer = Some(format!(
                    "continuing with {} of {asked} connections to {}: {} (the server serves fewer clients at once, e.g. qemu-nbd without -e/--shared; --nbd-connections {} avoids the wait)",
                    slots.len(),
                    options.address,
                    why.join("; "),
                    slots.len()
                ));
            }
        }
        let alignment = match negotiated.export.block_size {
            Some((min, _, _)) => min.max(1),
            None if negotiated.used_export_name => 512,
            None => 1,
        };
        let max = negotiated
            .export
            .block_size
            .map(|(_, _, max)| max)
            .unwrap_or(proto::MAX_READ);
        let mut pool = pool;
        pool.request_bytes = pool
            .request_bytes
            .min(max)
            .min(proto::MAX_READ)
            .max(alignment);
        pool.request_bytes -= pool.request_bytes % alignment;
        Ok(NbdPool {
            size_bytes: negotiated.export.size_bytes,
            options,
            pool,
            slots,
            next: std::sync::atomic::AtomicUsize::new(0),
            spare: std::sync::Mutex::new(Vec::new()),
            fewer,
            alignment,
            negotiated,
        })
    }

    /// Why the pool opened fewer connections than [`PoolOptions::connections`]
    /// asked for (one line, for the user), or `None` when it has them all.
    pub fn fewer_connections(&self) -> Option<&str> {
        self.fewer.as_deref()
    }

    pub fn connection_count(&self) -> usize {
        self.slots.len()
    }

    /// The connection of `slot`, reopened if it failed; a reopened one must
    /// describe the export as the first connection did.
    async fn connection(&self, slot: usize) -> Result<Arc<Connection>, NbdError> {
        let mut guard = self.slots[slot].lock().await;
        if guard.is_dead() {
            let c = Connection::open(&self.options).await?;
            let name = format!(
                "reconnect of connection {} to {}",
                slot + 1,
                self.options.address
            );
            same_export(&self.negotiated, &c.negotiated, name)?;
            *guard = Arc::new(c);
        }
        Ok(guard.clone())
    }

    /// Runs `op` on some connection, reconnecting and retrying on
    /// connection failures a bounded number of times. `op` gets the
    /// request's deadline: one I/O timeout from the first attempt, which
    /// retries share (a reconnect's handshake has its own).
    async fn with_retry<T, F, Fut>(&self, op: F) -> Result<T, NbdError>
    where
        F: Fn(Arc<Connection>, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<T, NbdError>>,
    {
        let slot = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.slots.len();
        let deadline = Instant::now() + self.options.timeout;
        let mut attempt = 0;
        loop {
            let result = match self.connection(slot).await {
                Ok(c) => op(c, deadline).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e)
                    if e.is_connection_failure()
                        && attempt < self.pool.retries
                        && Instant::now() < deadline =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    /// Fills every `(offset, buf)` with all their requests in flight at
    /// once, spread over the pool's connections. Ranges must respect the
    /// server's alignment, except at the end of the export. The data goes
    /// through reused buffers and is copied into `reads`; the backup
    /// pipeline uses [`NbdPool::read_owned`], which has no copy.
    pub async fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), NbdError> {
        let mut owned: Vec<(u64, BytesMut)> = {
            let mut spare = self.spare.lock().expect("spare buffers");
            reads
                .iter()
                .map(|(at, buf)| {
                    let mut b = spare.pop().unwrap_or_default();
                    b.resize(buf.len(), 0);
                    (*at, b)
                })
                .collect()
        };
        let result = self.read_owned(&mut owned).await;
        if result.is_ok() {
            for ((_, dst), (_, src)) in reads.iter_mut().zip(&owned) {
                dst.copy_from_slice(src);
            }
        }
        let mut spare = self.spare.lock().expect("spare buffers");
        let mut kept: usize = spare.iter().map(|b| b.capacity()).sum();
        for (_, b) in owned {
            if spare.len() < SPARE_BUFFERS && kept + b.capacity() <= SPARE_BYTES {
                kept += b.capacity();
                spare.push(b);
            }
        }
        result
    }

    /// Fills every `(offset, buf)` in place, `buf.len()` bytes each. A
    /// buffer is split into request-sized pieces, all sent at once over the
    /// pool's connections, and the pieces are joined again in order: the
    /// data lands where the caller wants it, with no copy (a retried piece
    /// gets a new buffer and is copied back). Ranges must respect the
    /// server's alignment, except at the end of the export.
    pub async fn read_owned(&self, reads: &mut [(u64, BytesMut)]) -> Result<(), NbdError> {
        let step = self.pool.request_bytes as usize;
        for (offset, buf) in reads.iter() {
            if offset.saturating_add(buf.len() as u64) > self.size_bytes {
                return Err(NbdError::Invalid(format!(
                    "read {offset}+{} beyond the export's {} bytes",
                    buf.len(),
                    self.size_bytes
                )));
            }
        }
        // (read, offset, piece) of every request.
        let mut pieces: Vec<(usize, u64, BytesMut)> = Vec::new();
        for (k, (offset, buf)) in reads.iter_mut().enumerate() {
            let len = buf.len();
            let lens = (0..len).step_by(step).map(|at| step.min(len - at));
            let mut at = *offset;
            for piece in crate::bytes::split(std::mem::take(buf), lens) {
                let n = piece.len() as u64;
                pieces.push((k, at, piece));
                at += n;
            }
        }
        let futures = pieces.into_iter().map(|(k, at, piece)| {
            let len = piece.len() as u32;
            // A retry starts over with a new buffer.
            let buf = std::sync::Mutex::new(Some(piece));
            async move {
                let r = self
                    .with_retry(|c, deadline| {
                        let b = buf.lock().expect("buffer").take().unwrap_or_default();
                        async move { c.read_before(at, len, b, deadline).await }
                    })
                    .await;
                (k, r)
            }
        });
        let mut first_err = None;
        // In request order, so each piece joins the end of its read.
        for (k, r) in join_all(futures).await {
            match r {
                Ok(piece) => reads[k].1.unsplit(piece),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Extents of the whole export for context `name`: (offset, length,
    /// flags), contiguous and covering the export. The export is walked in
    /// windows of [`EXTENT_WINDOW_BYTES`], [`EXTENT_WINDOWS_IN_FLIGHT`] of
    /// them at once over the pool's connections (a serial walk of a 16 TiB
    /// export waits out 16,384 round trips); each window loops as the spec
    /// requires, since a server may describe less than asked, and an
    /// extent that runs past its window is cut at the window's end.
    pub async fn extents(&self, name: &str) -> Result<Vec<(u64, u64, u32)>, NbdError> {
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        self.extents_each(name, |window| {
            for &(at, len, flags) in window {
                match out.last_mut() {
                    Some(last) if last.2 == flags && last.0 + last.1 == at => last.1 += len,
                    _ => out.push((at, len, flags)),
                }
            }
            true
        })
        .await?;
        Ok(out)
    }

    /// [`Self::extents`] window by window, in ascending order, as they
    /// arrive: `f` gets each window's extents (contiguous, covering the
    /// window) and returns whether to go on. A caller can act on the first
    /// windows while the later ones are still asked, and nothing holds the
    /// whole map. Returns whether the walk reached the end of the export.
    pub async fn extents_each(
        &self,
        name: &str,
        mut f: impl FnMut(&[(u64, u64, u32)]) -> bool,
    ) -> Result<bool, NbdError> {
        let Some(&(id, _)) = self
            .negotiated
            .meta_contexts
            .iter()
            .find(|(_, n)| n == name)
        else {
            return Err(NbdError::Invalid(format!(
                "meta context '{name}' was not negotiated"
            )));
        };
        let size = self.size_bytes;
        let batch_bytes = EXTENT_WINDOW_BYTES * EXTENT_WINDOWS_IN_FLIGHT as u64;
        let mut at = 0u64;
        while at < size {
            let end = at.saturating_add(batch_bytes).min(size);
            let windows = (at..end)
                .step_by(EXTENT_WINDOW_BYTES as usize)
                .map(|from| (from, (from + EXTENT_WINDOW_BYTES).min(end)));
            let walked =
                join_all(windows.map(|(from, to)| self.window_extents(id, name, from, to))).await;
            for window in walked {
                if !f(&window?) {
                    return Ok(false);
                }
            }
            at = end;
        }
        Ok(true)
    }

    /// The extents of context `id` (`name`) from `from` to `to`, contiguous
    /// and covering exactly that range.
    async fn window_extents(
        &self,
        id: u32,
        name: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64, u32)>, NbdError> {
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut at = from;
        while at < to {
            let len = (to - at) as u32;
            let replies = self
                .with_retry(move |c, deadline| async move {
                    c.block_status_before(at, len, deadline).await
                })
                .await?;
            let extents = replies
                .into_iter()
                .find(|(c, _)| *c == id)
                .map(|(_, e)| e)
                .ok_or_else(|| {
                    NbdError::Protocol(proto::ProtoError::Protocol(format!(
                        "block status reply lacks context '{name}'"
                    )))
                })?;
            let before = at;
            for (elen, flags) in extents {
                if at >= to {
                    break;
                }
                let elen = (elen as u64).min(to - at);
                if elen == 0 {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.2 == flags => last.1 += elen,
                    _ => out.push((at, elen, flags)),
                }
                at += elen;
            }
            if out.len() > MAX_EXTENTS_PER_WINDOW {
                return Err(NbdError::Protocol(proto::ProtoError::Protocol(format!(
                    "block status describes bytes {from}..{at} in more than {MAX_EXTENTS_PER_WINDOW} extents"
                ))));
            }
            if at == before {
                return Err(NbdError::Protocol(proto::ProtoError::Protocol(format!(
                    "block status at byte {at} made no progress"
                ))));
            }
        }
        Ok(out)
    }

    /// Disconnects every connection cleanly.
    pub async fn close(self) {
        for slot in self.slots {
            let conn = slot.into_inner();
            if let Ok(c) = Arc::try_unwrap(conn) {
                c.close().await;
            }
        }
    }
}

/// What happened to an extra connection that did not open, briefly.
fn extra_failure(e: &NbdError, deadline: Duration) -> String {
    match e {
        NbdError::Stalled { .. } => format!(
            "did not finish the handshake within {:.0} s",
            deadline.as_secs_f64()
        ),
        NbdError::Closed(_) => "closed by the server during the handshake".into(),
        NbdError::Connect { reason, .. } => format!("could not connect ({reason})"),
        other => format!("failed ({other})"),
    }
}

/// Whether `got` (a later connection, named `connection`) describes the
/// export as `first` did: the same size and transmission flags. Reading
/// through connections that disagree would mix two exports' bytes.
fn same_export(
    first: &proto::Negotiated,
    got: &proto::Negotiated,
    connection: String,
) -> Result<(), NbdError> {
    let (a, b) = (&first.export, &got.export);
    if a.size_bytes != b.size_bytes {
        return Err(NbdError::Inconsistent {
            connection,
            what: "an export size of",
            first: format!("{} bytes", a.size_bytes),
            got: format!("{} bytes", b.size_bytes),
        });
    }
    if a.transmission_flags != b.transmission_flags {
        return Err(NbdError::Inconsistent {
            connection,
            what: "transmission flags",
            first: format!("{:#06x}", a.transmission_flags),
            got: format!("{:#06x}", b.transmission_flags),
        });
    }
    Ok(())
}

/// Runs every future concurrently on the current task and returns their
/// outputs in order.
pub async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    // Poll every future concurrently on the current task.
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in set.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().map(|r| r.expect("all ready")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{self, Export, ExportError, ExportResolver, MemoryExport, ServerOptions};

    struct One(Arc<MemoryExport>);

    impl ExportResolver for One {
        fn open(&self, _name: &str) -> Result<Arc<dyn Export>, ExportError> {
            Ok(self.0.clone())
        }
    }

    fn disk() -> Vec<u8> {
        (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A TCP server that serves the first `serving` connections and
    /// accepts every later one without ever answering (qemu-nbd -e 1 does
    /// the same through the listen backlog). Returns the address.
    async fn server(serving: usize) -> Address {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let resolver: Arc<dyn ExportResolver> = Arc::new(One(Arc::new(MemoryExport::new(disk()))));
        let options = Arc::new(ServerOptions::default());
        tokio::spawn(async move {
            let mut silent = Vec::new();
            let mut accepted = 0;
            while let Ok((s, _)) = listener.accept().await {
                accepted += 1;
                if accepted <= serving {
                    tokio::spawn(server::serve_connection(
                        Box::new(s),
                        resolver.clone(),
                        options.clone(),
                    ));
                } else {
                    silent.push(s);
                }
            }
        });
        Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn options(address: Address) -> ConnectOptions {
        ConnectOptions {
            address,
            export: "disk".into(),
            tls: None,
            meta_contexts: vec!["base:allocation".into()],
            timeout: Duration::from_secs(60),
        }
    }

    fn four() -> PoolOptions {
        PoolOptions {
            connections: 4,
            ..PoolOptions::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn extra_connections_that_never_handshake_are_dropped_quickly() {
        let address = server(1).await;
        let started = std::time::Instant::now();
        let pool = NbdPool::connect(options(address), four()).await.unwrap();
        let took = started.elapsed();
        // One short deadline for all extra connections together, not the
        // 60 s I/O timeout, nor 3 s each one after another.
        assert!(took >= EXTRA_CONNECTION_DEADLINE, "{took:?}");
        assert!(took < EXTRA_CONNECTION_DEADLINE * 2, "{took:?}");
        assert_eq!(pool.connection_count(), 1);
        let why = pool.fewer_connections().expect("a reason");
        assert!(why.contains("continuing with 1 of 4 connections"), "{why}");
        assert!(
            why.contains("3 did not finish the handshake within 3 s"),
            "{why}"
        );
        // The pool works on the connection that opened.
        let mut a = vec![0u8; 100_000];
        let mut b = vec![0u8; 50_000];
        pool.read_many(&mut [(0, &mut a[..]), (200_000, &mut b[..])])
            .await
            .unwrap();
        assert_eq!(a, disk()[..100_000]);
        assert_eq!(b, disk()[200_000..250_000]);
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn some_extra_connections_open_and_are_used() {
        let address = server(3).await;
        let pool = NbdPool::connect(options(address), four()).await.unwrap();
        assert_eq!(pool.connection_count(), 3);
        let why = pool.fewer_connections().expect("a reason");
        assert!(why.contains("continuing with 3 of 4 connections"), "{why}");
        assert!(why.contains("1 did not finish the handshake"), "{why}");
        let mut all = vec![0u8; 256 * 1024];
        let mut reads: Vec<(u64, &mut [u8])> = all
            .chunks_mut(16 * 1024)
            .enumerate()
            .map(|(k, c)| ((k * 16 * 1024) as u64, c))
            .collect();
        pool.read_many(&mut reads).await.unwrap();
        assert_eq!(all, disk());
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_serves_all_gets_every_connection_at_once() {
        let address = server(usize::MAX).await;
        let started = std::time::Instant::now();
        let pool = NbdPool::connect(options(address), four()).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(pool.connection_count(), 4);
        assert_eq!(pool.fewer_connections(), None);
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_extra_deadline_never_exceeds_the_io_timeout() {
        let address = server(1).await;
        let mut o = options(address);
        o.timeout = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let pool = NbdPool::connect(o, four()).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(pool.connection_count(), 1);
        let why = pool.fewer_connections().expect("a reason");
        assert!(why.contains("within 1 s"), "{why}");
    }
}
