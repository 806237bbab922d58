//! The simulator's HTTPS port: XML-RPC on `POST /` and `/RPC2`, JSON-RPC
//! on `POST /jsonrpc` (and `/json`), the HTTP handlers `GET
//! /export_raw_vdi` and `PUT /import_raw_vdi` (xenapi-reference.md §3), and
//! the simulator-only `PUT /sim/guest_write`. A small HTTP/1.1 server over
//! the pure pieces in `http`, `xmlrpc` and `jsonrpc`: keep-alive for RPC,
//! bodies bounded before allocation, streaming for disk data.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::dispatch;
use super::http::{self, HttpError, RequestHead};
use super::metadata;
use super::model::Ref;
use super::Core;
use xapi_wire::chunked::{ChunkStep, ChunkedImport};
use xapi_wire::jsonrpc;
use xapi_wire::xmlrpc;
use xapi_wire::ApiError;
use xapi_wire::Value;

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

/// Serves HTTPS until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    core: Arc<Core>,
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
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let work = async {
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                if let Ok(Ok(io)) = tls {
                    let mut conn = Conn {
                        io,
                        buf: Vec::new(),
                        core,
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
    /// Import body bytes received on this connection.
    import_seen: u64,
    /// (`import_fail_after_bytes`, `import_drop_after_bytes`) as they were
    /// when the current import started: read once, not per body read.
    import_faults: (Option<u64>, Option<u64>),
}

/// The disk side of an import: each write runs on a blocking thread while
/// the connection receives the next piece (one write in flight), and the
/// simulator's state lock is held only to find the disk and to record the
/// change, not during the disk I/O.
struct ImportWriter {
    core: Arc<Core>,
    vdi: String,
    in_flight: Option<tokio::task::JoinHandle<Result<(), ApiError>>>,
    /// Recently written ranges, released from the page cache once old
    /// enough to have been written back (see `Disk::drop_cached`).
    written: std::collections::VecDeque<(u64, u64)>,
}

/// Writes an import keeps in the page cache before releasing the oldest.
const IMPORT_CACHE_WINDOW: usize = 8;

impl ImportWriter {
    fn new(core: &Arc<Core>, vdi: &str) -> Self {
        ImportWriter {
            core: core.clone(),
            vdi: vdi.to_string(),
            in_flight: None,
            written: std::collections::VecDeque::new(),
        }
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), ApiError> {
        self.finish().await?;
        let core = self.core.clone();
        let vdi = self.vdi.clone();
        self.written.push_back((offset, data.len() as u64));
        let release = (self.written.len() > IMPORT_CACHE_WINDOW)
            .then(|| self.written.pop_front())
            .flatten();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let disk = core
                .lock()
                .disk_for_write(&vdi, offset, data.len() as u64)?;
            disk.write(offset, &data).map_err(ApiError::vdi_io_from)?;
            // Queue this write for writeback; drop an older one, now clean.
            disk.drop_cached(offset, data.len() as u64);
            if let Some((at, len)) = release {
                disk.drop_cached(at, len);
            }
            core.lock().mark_written(&vdi, offset, data.len() as u64);
            Ok(())
        }));
        Ok(())
    }

    /// Waits for the write in flight; its error, if any.
    async fn finish(&mut self) -> Result<(), ApiError> {
        match self.in_flight.take() {
            Some(h) => h
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(e.to_string()))),
            None => Ok(()),
        }
    }
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
        400 => "Bad Request",
        401 => "Unauthorised",
        403 => "Forbidden",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Request Entity Too Large",
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

    /// Up to `max` body bytes, buffered ones first; empty at EOF.
    /// A body read of `/import_raw_vdi`: counted, and failed once the
    /// `import_fail_after_bytes` fault is reached.
    async fn read_import(&mut self, max: usize) -> Result<Vec<u8>, ApiError> {
        let io_error = ApiError::vdi_io;
        let data = self.read_some(max).await.map_err(|_| io_error())?;
        self.count_import(data.len())?;
        Ok(data)
    }

    /// Counts `n` import body bytes received; fails once the
    /// `import_fail_after_bytes` fault is reached.
    fn count_import(&mut self, n: usize) -> Result<(), ApiError> {
        self.core
            .import_bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.import_seen += n as u64;
        let (fail, _) = self.import_faults;
        if self.import_dropped() || fail.is_some_and(|l| self.import_seen > l) {
            return Err(ApiError::vdi_io());
        }
        Ok(())
    }

    /// The `import_drop_after_bytes` fault fired: close without lingering.
    fn import_dropped(&self) -> bool {
        let (_, drop) = self.import_faults;
        drop.is_some_and(|l| self.import_seen > l)
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

    async fn route(&mut self, head: RequestHead) -> Result<After, ConnError> {
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

    /// One XML-RPC or JSON-RPC call.
    async fn rpc(&mut self, head: RequestHead, json: bool) -> Result<After, ConnError> {
        if head.header("transfer-encoding").is_some() {
            return self
                .fail(411, "send the request with a Content-Length")
                .await;
        }
        let len = match head.content_length() {
            Ok(Some(len)) => len,
            Ok(None) => return self.fail(411, "Content-Length required").await,
            Err(e) => return self.fail(400, &e.to_string()).await,
        };
        if len > MAX_RPC_BODY {
            return self
                .fail(413, &format!("request body over {MAX_RPC_BODY} bytes"))
                .await;
        }
        let body = self.read_body(len as usize).await?;
        let keep = head.keep_alive();
        let (content_type, out) = if json {
            let req = match jsonrpc::decode_request(&body) {
                Ok(r) => r,
                Err(e) => return self.fail(500, &e.to_string()).await,
            };
            let result = self.dispatch(req.method.clone(), req.params.clone()).await;
            (
                "application/json",
                jsonrpc::encode_response(req.version, &req.id, &result),
            )
        } else {
            let (method, params) = match xmlrpc::decode_call(&body) {
                Ok(c) => c,
                Err(e) => return self.fail(500, &e.to_string()).await,
            };
            let result = self.dispatch(method, params).await;
            ("text/xml", xmlrpc::encode_response(&result).into_bytes())
        };
        let headers = [
            ("content-type", content_type.to_string()),
            ("access-control-allow-origin", "*".to_string()),
        ];
        self.respond(200, &headers, &out, keep).await?;
        Ok(if keep { After::KeepAlive } else { After::Close })
    }

    async fn dispatch(&self, method: String, params: Vec<Value>) -> Result<Value, ApiError> {
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || dispatch::call(&core, &method, &params))
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("call panicked: {e}"))))
    }

    /// xapi_http's authentication: a valid `session_id` (cookie, then
    /// query), or HTTP Basic credentials (a session for this request only).
    /// `Ok((session, temporary))`; `Err` when nothing valid was given.
    fn authenticate(&self, head: &RequestHead) -> Option<(Ref, bool)> {
        let mut st = self.core.lock();
        if let Some(s) = head.param("session_id") {
            return st.check_session(&s).is_ok().then_some((s, false));
        }
        let basic = head.header("authorization")?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        st.login(user, password, "http-basic")
            .ok()
            .map(|s| (s, true))
    }

    /// The task an HTTP handler runs under: the caller's `task_id`, or a new
    /// one (destroyed at the end, as xapi's `exec_with_new_task` does).
    fn handler_task(&self, head: &RequestHead, label: &str) -> Result<(Ref, bool), Ref> {
        let mut st = self.core.lock();
        match head.param("task_id") {
            Some(t) if st.tasks.contains_key(&t) => Ok((t, false)),
            Some(t) => Err(t),
            None => Ok((st.task_create(label, ""), true)),
        }
    }

    /// Fails the handler's task, answers `status` and closes.
    async fn fail_task(
        &mut self,
        task: &(Ref, bool),
        status: u16,
        error: ApiError,
    ) -> Result<After, ConnError> {
        self.finish_task(task, Err(error.clone()));
        let body = html_error(
            status,
            reason(status),
            &format!("{:?}", error.description()),
        );
        let headers = [
            ("content-type", "text/html".to_string()),
            ("task-id", task.0.clone()),
        ];
        self.respond(status, &headers, &body, false).await?;
        Ok(After::Close)
    }

    /// Completes a handler task after the configured delay (in the
    /// background); a task the handler created itself is then destroyed.
    fn finish_task(&self, task: &(Ref, bool), result: Result<String, ApiError>) {
        let core = self.core.clone();
        let (task, own) = task.clone();
        let delay = core.lock().faults.task_delay_ms;
        let work = move || {
            dispatch::run_task(&core, &task, delay, || result);
            if own {
                core.lock().tasks.remove(&task);
            }
        };
        if delay == 0 {
            work();
        } else {
            std::thread::spawn(work);
        }
    }

    /// Common start of the handlers: authentication, then the task.
    async fn begin(
        &mut self,
        head: &RequestHead,
        label: &str,
    ) -> Result<Option<(Ref, bool, (Ref, bool))>, ConnError> {
        let Some((session, temporary)) = self.authenticate(head) else {
            if let Some(t) = head.param("task_id") {
                self.core.lock().task_finish(
                    &t,
                    Err(ApiError::new(
                        "SESSION_AUTHENTICATION_FAILED",
                        Vec::<String>::new(),
                    )),
                );
            }
            self.fail(401, "authorisation failed").await?;
            return Ok(None);
        };
        let task = match self.handler_task(head, label) {
            Ok(t) => t,
            Err(t) => {
                self.end_session(&session, temporary);
                self.fail(404, &format!("no task {t}")).await?;
                return Ok(None);
            }
        };
        Ok(Some((session, temporary, task)))
    }

    fn end_session(&self, session: &str, temporary: bool) {
        if temporary {
            self.core.lock().logout(session);
        }
    }

    /// `GET /export_raw_vdi` (§3.1): raw only; the VDI is attached RO to
    /// dom0 while its bytes stream; no Content-Length, the body ends at close.
    async fn export_raw_vdi(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "export_raw_vdi").await? else {
            return Ok(After::Close);
        };
        let outcome = self.export_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    async fn export_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        let Some(key) = head.param("vdi") else {
            return self
                .fail_task(task, 500, ApiError::internal("Missing vdi query parameter"))
                .await;
        };
        let format = head.param("format").unwrap_or_else(|| "raw".into());
        match format.as_str() {
            "raw" => {}
            "vhd" | "tar" | "qcow2" => {
                return self
                    .fail_task(
                        task,
                        404,
                        ApiError::internal(format!("the simulator exports raw only, not {format}")),
                    )
                    .await
            }
            other => {
                return self
                    .fail_task(
                        task,
                        404,
                        ApiError::internal(format!("Unknown format {other}")),
                    )
                    .await
            }
        }
        let attached = {
            let mut st = self.core.lock();
            st.vdi_by_ref_or_uuid(&key).and_then(|vdi| {
                let v = st.vdi(&vdi)?;
                let (uuid, disk) = (v.uuid.clone(), v.data.clone());
                let disk = disk.ok_or_else(|| ApiError::incompatible_type(&vdi, "cbt_metadata"))?;
                let vbd = st.attach_to_dom0(&vdi, "RO")?;
                Ok((uuid, disk, vbd))
            })
        };
        let (uuid, disk, vbd) = match attached {
            Ok(a) => a,
            Err(e) => return self.fail_task(task, 500, e).await,
        };
        let headers = [
            ("task-id", task.0.clone()),
            ("content-type", "application/octet-stream".to_string()),
            (
                "content-disposition",
                format!("attachment; filename=\"{uuid}.raw\""),
            ),
        ];
        let mut result = self
            .respond_streaming(&headers)
            .await
            .map_err(|e| e.to_string());
        let size = disk.size_bytes();
        let mut offset = 0u64;
        while result.is_ok() && offset < size {
            let n = (size - offset).min(IO_CHUNK as u64) as usize;
            let d = disk.clone();
            let read = tokio::task::spawn_blocking(move || d.read(offset, n)).await;
            result = match read {
                Ok(Ok(data)) => self.io.write_all(&data).await.map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            offset += n as u64;
        }
        let _ = self.io.flush().await;
        self.core.lock().detach_and_destroy(&vbd);
        self.finish_task(
            task,
            result
                .map(|_| String::new())
                .map_err(|_| ApiError::vdi_io()),
        );
        Ok(After::Close)
    }

    /// `PUT /import_raw_vdi` (§3.2): raw (Content-Length, or to EOF) or the
    /// `chunked` format, into an existing VDI or a new one in an SR.
    async fn import_raw_vdi(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "import_raw_vdi").await? else {
            return Ok(After::Close);
        };
        let outcome = self.import_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    async fn import_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        if let Some(te) = head.header("transfer-encoding") {
            let e = ApiError::internal(format!("Cannot handle encoding: {te}"));
            return self.fail_task(task, 404, e).await;
        }
        let format = head.param("format").unwrap_or_else(|| "raw".into());
        let chunked = head.has_query("chunked") || head.cookie("chunked").is_some();
        if chunked && format != "raw" {
            return self
                .fail_task(task, 404, ApiError::internal("Cannot handle chunked VHD"))
                .await;
        }
        let content_length = match head.content_length() {
            Ok(l) => l,
            Err(e) => return self.fail(400, &e.to_string()).await,
        };
        let vdi = match head.param("vdi") {
            Some(key) => {
                if format != "raw" {
                    let e =
                        ApiError::internal(format!("the simulator imports raw only, not {format}"));
                    return self.fail_task(task, 404, e).await;
                }
                let found = self.core.lock().vdi_by_ref_or_uuid(&key);
                match found {
                    Ok(v) => v,
                    Err(e) => return self.fail_task(task, 404, e).await,
                }
            }
            None => {
                let sr = {
                    let st = self.core.lock();
                    match (head.param("sr_id"), head.param("sr_uuid")) {
                        (Some(r), _) if st.srs.contains_key(&r) => Some(Ok(r)),
                        (Some(r), _) => Some(Err(ApiError::handle_invalid("SR", &r))),
                        (None, Some(u)) => Some(st.by_uuid(super::model::Class::Sr, &u)),
                        (None, None) => None,
                    }
                };
                let sr = match sr {
                    None => {
                        return self
                            .fail_task(
                                task,
                                400,
                                ApiError::new("VDI_MISSING", Vec::<String>::new()),
                            )
                            .await
                    }
                    Some(Err(e)) => return self.fail_task(task, 400, e).await,
                    Some(Ok(sr)) => sr,
                };
                let Some(size) = content_length.filter(|_| format == "raw" && !chunked) else {
                    let e = ApiError::internal("a new VDI needs format=raw with a Content-Length");
                    return self.fail_task(task, 400, e).await;
                };
                let created = {
                    let mut st = self.core.lock();
                    st.vdi_create(super::model::NewVdi::user("Imported VDI", sr, size))
                };
                match created {
                    Ok(v) => v,
                    Err(e) => return self.fail_task(task, 500, e).await,
                }
            }
        };
        let vbd = {
            let mut st = self.core.lock();
            let has_data = st.vdi(&vdi).map(|v| v.data.is_some()).unwrap_or(false);
            if has_data {
                st.attach_to_dom0(&vdi, "RW")
            } else {
                Err(ApiError::incompatible_type(&vdi, "cbt_metadata"))
            }
        };
        let vbd = match vbd {
            Ok(b) => b,
            Err(e) => return self.fail_task(task, 500, e).await,
        };
        if head
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            self.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        // xapi answers 200 before it reads the body; the outcome is the task's.
        let headers = [
            ("task-id", task.0.clone()),
            ("content-type", "text/plain".to_string()),
        ];
        self.respond(200, &headers, b"", false).await?;
        self.import_faults = {
            let st = self.core.lock();
            (
                st.faults.import_fail_after_bytes,
                st.faults.import_drop_after_bytes,
            )
        };
        let written = if chunked {
            self.write_chunked(&vdi).await
        } else {
            self.write_raw(&vdi, content_length).await
        };
        {
            let mut st = self.core.lock();
            st.detach_and_destroy(&vbd);
            self.core.changed(&st);
        }
        self.finish_task(
            task,
            written.map(|_| xmlrpc::value_fragment(&Value::str(&vdi))),
        );
        if self.import_dropped() {
            // Unread body bytes make the kernel reset the connection.
            return Err(ConnError::Io(std::io::ErrorKind::ConnectionReset.into()));
        }
        Ok(After::Close)
    }

    /// Up to `want` body bytes gathered into one buffer (fewer only at the
    /// end of the body).
    async fn read_import_chunk(&mut self, want: usize) -> Result<Vec<u8>, ApiError> {
        let io_error = ApiError::vdi_io;
        let mut out = Vec::with_capacity(want);
        // Bytes already buffered first, then straight from the stream into
        // `out` (its capacity bounds every read).
        let n = want.min(self.buf.len());
        out.extend_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        self.count_import(n)?;
        while out.len() < want {
            let read = tokio::time::timeout(IDLE_TIMEOUT, self.io.read_buf(&mut out))
                .await
                .map_err(|_| io_error())?
                .map_err(|_| io_error())?;
            if read == 0 {
                break;
            }
            self.count_import(read)?;
        }
        Ok(out)
    }

    async fn write_raw(&mut self, vdi: &str, len: Option<u64>) -> Result<(), ApiError> {
        let mut disk = ImportWriter::new(&self.core, vdi);
        let mut offset = 0u64;
        loop {
            let want = match len {
                Some(l) if offset >= l => break,
                Some(l) => (l - offset).min(IO_CHUNK as u64) as usize,
                None => IO_CHUNK,
            };
            let data = self.read_import_chunk(want).await?;
            if data.is_empty() {
                if len.is_some() {
                    return Err(ApiError::vdi_io());
                }
                break;
            }
            let n = data.len() as u64;
            disk.write(offset, data).await?;
            offset += n;
        }
        disk.finish().await
    }

    async fn write_chunked(&mut self, vdi: &str) -> Result<(), ApiError> {
        let io_error = ApiError::vdi_io;
        let mut disk = ImportWriter::new(&self.core, vdi);
        let mut decoder = ChunkedImport::new();
        let mut input: Vec<u8> = Vec::new();
        let mut pos = 0;
        // Data of consecutive chunks gathered into writes of up to IO_CHUNK.
        let mut run: Option<(u64, Vec<u8>)> = None;
        while !decoder.is_done() {
            if pos == input.len() {
                input = self.read_import(IO_CHUNK).await?;
                pos = 0;
                if input.is_empty() {
                    return Err(io_error());
                }
            }
            let (used, step) = decoder
                .feed(&input[pos..])
                .map_err(|e| ApiError::internal(HttpError::from(e).to_string()))?;
            if let ChunkStep::Data { offset, len } = step {
                let bytes = &input[pos + used - len..pos + used];
                match &mut run {
                    Some((at, buf)) if *at + buf.len() as u64 == offset => {
                        buf.extend_from_slice(bytes)
                    }
                    _ => {
                        if let Some((at, buf)) = run.take() {
                            disk.write(at, buf).await?;
                        }
                        let mut buf = Vec::with_capacity(IO_CHUNK);
                        buf.extend_from_slice(bytes);
                        run = Some((offset, buf));
                    }
                }
                if run.as_ref().is_some_and(|(_, b)| b.len() >= IO_CHUNK) {
                    let (at, buf) = run.take().expect("checked");
                    disk.write(at, buf).await?;
                }
            }
            pos += used;
        }
        if let Some((at, buf)) = run.take() {
            disk.write(at, buf).await?;
        }
        disk.finish().await
    }

    /// `GET /export_metadata` (§3.3): HTTP/1.0, Content-Length, an XVA tar
    /// holding only `ova.xml`. `export_snapshots` defaults to true.
    async fn export_metadata(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "export_metadata").await? else {
            return Ok(After::Close);
        };
        let outcome = self.export_metadata_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    async fn export_metadata_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        // OCaml's bool_of_string: exactly "true" or "false".
        let export_snapshots = match head.param("export_snapshots").as_deref() {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                let e = ApiError::internal(format!("bool_of_string: '{other}'"));
                return self.fail_task(task, 500, e).await;
            }
        };
        let ova = {
            let st = self.core.lock();
            let vm = match (head.param("uuid"), head.param("ref")) {
                (Some(u), _) => st.by_uuid(super::model::Class::Vm, &u),
                (None, Some(r)) => st.vm(&r).map(|_| r.clone()),
                (None, None) => Err(ApiError::internal("Missing uuid or ref query parameter")),
            };
            vm.and_then(|vm| metadata::export_ova(&st, &vm, export_snapshots))
        };
        let ova = match ova {
            Ok(o) => o,
            Err(e) => return self.fail_task(task, 500, e).await,
        };
        let body = metadata::tar_single("ova.xml", ova.as_bytes());
        let head = format!(
            "HTTP/1.0 200 OK\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\n\
             content-disposition: attachment; filename=\"export.xva\"\r\ntask-id: {}\r\n\r\n",
            body.len(),
            task.0
        );
        self.io.write_all(head.as_bytes()).await?;
        self.io.write_all(&body).await?;
        self.io.flush().await?;
        self.finish_task(task, Ok(String::new()));
        Ok(After::Close)
    }

    /// `PUT /import_metadata` (§3.4): creates the VM of an exported
    /// `ova.xml`, remapping disks with `vdi:<source-uuid>=<dest-uuid>`. The
    /// task's result lists the new VM refs.
    async fn import_metadata(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "import_metadata").await? else {
            return Ok(After::Close);
        };
        let outcome = self.import_metadata_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    async fn import_metadata_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        let limit = metadata::MAX_OVA_BYTES + 4096;
        let len = match head.content_length() {
            Ok(Some(l)) if l <= limit => l,
            _ => {
                let e = ApiError::internal(format!("a Content-Length up to {limit} is required"));
                return self.fail_task(task, 400, e).await;
            }
        };
        let vdi_map: std::collections::BTreeMap<String, String> = head
            .query
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("vdi:")
                    .map(|src| (src.to_string(), v.clone()))
            })
            .collect();
        // import.ml's find_query_flag: true only for exactly "true".
        let dry_run = head.param("dry_run").as_deref() == Some("true");
        let headers = [
            ("task-id", task.0.clone()),
            ("content-type", "text/plain".to_string()),
        ];
        self.respond(200, &headers, b"", false).await?;
        let body = self.read_body(len as usize).await?;
        let result = metadata::tar_find(&body, "ova.xml")
            .map_err(|e| ApiError::new("IMPORT_ERROR", [e]))
            .and_then(|ova| {
                let mut st = self.core.lock();
                let vms = metadata::import_ova(&mut st, &ova, &vdi_map, dry_run);
                self.core.changed(&st);
                vms
            })
            .map(|vms| xmlrpc::value_fragment(&Value::strings(vms)));
        self.finish_task(task, result);
        Ok(After::Close)
    }

    /// `PUT /sim/guest_write?vdi=<uuid|ref>&offset=N`: the body is written
    /// as the running VM would (simulator only). Answers JSON.
    async fn guest_write(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary)) = self.authenticate(&head) else {
            return self.fail(401, "authorisation failed").await;
        };
        let len = match head.content_length() {
            Ok(Some(l)) if l <= MAX_GUEST_WRITE => l,
            _ => {
                self.end_session(&session, temporary);
                return self
                    .fail(
                        411,
                        &format!("a Content-Length up to {MAX_GUEST_WRITE} is required"),
                    )
                    .await;
            }
        };
        let body = self.read_body(len as usize).await?;
        let offset = head.param("offset").and_then(|o| o.parse::<u64>().ok());
        let key = head.param("vdi").unwrap_or_default();
        let core = self.core.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut st = core.lock();
            let vdi = st.vdi_by_ref_or_uuid(&key)?;
            let offset = offset.ok_or_else(|| ApiError::field_type("offset"))?;
            dispatch::guest_write_checked(&mut st, &vdi, offset, &body)
        })
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(e.to_string())));
        self.end_session(&session, temporary);
        let (status, body) = match result {
            Ok(()) => (200, serde_json::json!({"Status": "Success"})),
            Err(e) => (
                400,
                serde_json::json!({"Status": "Failure", "ErrorDescription": e.description()}),
            ),
        };
        let keep = head.keep_alive();
        self.respond(
            status,
            &[("content-type", "application/json".into())],
            body.to_string().as_bytes(),
            keep,
        )
        .await?;
        Ok(if keep { After::KeepAlive } else { After::Close })
    }
}
