//! The simulator's HTTPS port: `POST /sdk` (SOAP, see `dispatch`), `GET
//! /sdk/vimServiceVersions.xml`, datastore file access `GET`/`HEAD`/`PUT
//! /folder/<path>?dcPath=ha-datacenter&dsName=datastore1` (session cookie
//! or Basic credentials; `Range: bytes=` answered 206 with
//! `Content-Range`), and the simulator-only `/sim/*` hooks (`hooks`). A
//! small HTTP/1.1 server with keep-alive, bodies bounded before
//! allocation, file bodies streamed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::dispatch::{self, COOKIE};
use crate::http::{self, parse_range, HttpError, RangeRequest, RequestHead};
use crate::{hooks, store, Core};

/// Largest SOAP request body.
const MAX_SOAP_BODY: u64 = 16 << 20;
/// Largest `/sim/*` body (a guest write).
const MAX_HOOK_BODY: u64 = 64 << 20;
const IO_CHUNK: usize = 1 << 20;
const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
        let (open, acceptor, core, mut stop) = (
            open.clone(),
            acceptor.clone(),
            core.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let work = async {
                if let Ok(Ok(io)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    let mut conn = Conn {
                        io,
                        buf: Vec::new(),
                        core,
                    };
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
    buf: Vec<u8>,
    core: Arc<Core>,
}

#[derive(PartialEq, Eq)]
enum After {
    KeepAlive,
    Close,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Request Entity Too Large",
        416 => "Range Not Satisfiable",
        _ => "Internal Server Error",
    }
}

impl Conn {
    async fn run(&mut self) -> Result<(), ConnError> {
        loop {
            let head = match tokio::time::timeout(IDLE_TIMEOUT, self.read_head()).await {
                Err(_) => return Err(ConnError::Timeout),
                Ok(Ok(Some(h))) => h,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(ConnError::Http(e))) => {
                    self.respond(400, &[], e.to_string().as_bytes(), false)
                        .await?;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
            };
            let delay = self.core.lock().faults.delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if self.route(head).await? == After::Close {
                let _ = self.io.shutdown().await;
                return Ok(());
            }
        }
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(64 * 1024);
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

    async fn read_body(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < len {
            if self.read_more().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        let rest = self.buf.split_off(len);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    fn head_text(status: u16, headers: &[(&str, String)], length: u64, keep: bool) -> String {
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {length}\r\n"));
        head.push_str(if keep {
            "connection: keep-alive\r\n\r\n"
        } else {
            "connection: close\r\n\r\n"
        });
        head
    }

    async fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
        keep: bool,
    ) -> std::io::Result<()> {
        let mut out = Conn::head_text(status, headers, body.len() as u64, keep).into_bytes();
        out.extend_from_slice(body);
        self.io.write_all(&out).await?;
        self.io.flush().await
    }

    /// The head and half the body, then the connection ends.
    async fn respond_cut(
        &mut self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<After, ConnError> {
        let mut out = Conn::head_text(status, headers, body.len() as u64, true).into_bytes();
        out.extend_from_slice(&body[..body.len() / 2]);
        self.io.write_all(&out).await?;
        self.io.flush().await?;
        Ok(After::Close)
    }

    async fn text(&mut self, status: u16, text: &str, keep: bool) -> Result<After, ConnError> {
        self.respond(
            status,
            &[("content-type", "text/plain; charset=utf-8".into())],
            text.as_bytes(),
            keep,
        )
        .await?;
        Ok(if keep { After::KeepAlive } else { After::Close })
    }

    /// A body of at most `max` bytes (Content-Length required).
    async fn bounded_body(
        &mut self,
        head: &RequestHead,
        max: u64,
    ) -> Result<Result<Vec<u8>, After>, ConnError> {
        let len = match head.content_length()? {
            Some(n) => n,
            None if head.method == "GET" || head.method == "HEAD" => 0,
            None => {
                return Ok(Err(self
                    .text(411, "Content-Length required", false)
                    .await?))
            }
        };
        if len > max {
            return Ok(Err(self.text(413, "body too large", false).await?));
        }
        Ok(Ok(self.read_body(len as usize).await?))
    }

    async fn route(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let keep = head.keep_alive();
        match (head.method.as_str(), head.path.as_str()) {
            ("POST", "/sdk") => self.soap(head).await,
            ("GET", "/sdk/vimServiceVersions.xml") => {
                self.respond(
                    200,
                    &[("content-type", "text/xml".into())],
                    dispatch::service_versions().as_bytes(),
                    keep,
                )
                .await?;
                Ok(if keep { After::KeepAlive } else { After::Close })
            }
            (_, p) if p.starts_with("/folder/") => self.folder(head).await,
            (_, p) if p.starts_with("/sim/") => {
                if !self.authorized(&head) {
                    return self
                        .text(401, "log in first (session cookie or Basic)", false)
                        .await;
                }
                let body = match self.bounded_body(&head, MAX_HOOK_BODY).await? {
                    Ok(b) => b,
                    Err(after) => return Ok(after),
                };
                let (status, text) = hooks::handle(&self.core, &head, &body);
                self.respond(
                    status,
                    &[("content-type", "application/json".into())],
                    text.as_bytes(),
                    keep,
                )
                .await?;
                Ok(if keep { After::KeepAlive } else { After::Close })
            }
            _ => {
                let _ = self.bounded_body(&head, MAX_SOAP_BODY).await?;
                self.text(
                    404,
                    &format!("no handler for {} {}", head.method, head.path),
                    keep,
                )
                .await
            }
        }
    }

    async fn soap(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let body = match self.bounded_body(&head, MAX_SOAP_BODY).await? {
            Ok(b) => b,
            Err(after) => return Ok(after),
        };
        let cookie = head.cookie(COOKIE);
        let agent = head.header("user-agent").unwrap_or("").to_string();
        let core = self.core.clone();
        let out = dispatch::handle(&core, cookie.as_deref(), &agent, &body);
        let mut headers = vec![("content-type", vim_wire::soap::CONTENT_TYPE.to_string())];
        if let Some(c) = out.set_cookie {
            headers.push(("set-cookie", c));
        }
        if out.drop {
            return self
                .respond_cut(out.status, &headers, out.body.as_bytes())
                .await;
        }
        let keep = head.keep_alive();
        self.respond(out.status, &headers, out.body.as_bytes(), keep)
            .await?;
        Ok(if keep { After::KeepAlive } else { After::Close })
    }

    /// A valid session cookie, or Basic credentials of the host's user.
    fn authorized(&self, head: &RequestHead) -> bool {
        self.session_cookie(head) || self.basic_credentials(head)
    }

    fn session_cookie(&self, head: &RequestHead) -> bool {
        head.cookie(COOKIE)
            .is_some_and(|c| self.core.lock().sessions.contains_key(&c))
    }

    fn basic_credentials(&self, head: &RequestHead) -> bool {
        matches!(head.basic_auth(), Some((u, p)) if u == self.core.username && p == self.core.password)
    }

    async fn folder(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let keep = head.keep_alive();
        let relative = head.path.trim_start_matches("/folder/").to_string();
        if !self.authorized(&head) {
            // Refused without reading a body; the connection closes.
            self.core
                .log_call(format!("HTTP {} /folder/{relative} 401", head.method));
            return self.text(401, "not authenticated", false).await;
        }
        let ds_ok = head.query_param("dsName") == Some(store::DATASTORE)
            && head
                .query_param("dcPath")
                .is_none_or(|dc| dc == crate::model::DATACENTER);
        if !ds_ok || store::safe_relative(&relative).is_none() {
            // Refused without reading a body; the connection closes.
            self.core
                .log_call(format!("HTTP {} /folder/{relative} 404", head.method));
            return self.text(404, "no such datastore or file", false).await;
        }
        match head.method.as_str() {
            "GET" | "HEAD" => self.folder_get(head, &relative).await,
            "PUT" => self.folder_put(head, &relative).await,
            _ => self.text(405, "GET, HEAD or PUT", keep).await,
        }
    }

    async fn folder_get(&mut self, head: RequestHead, relative: &str) -> Result<After, ConnError> {
        let keep = head.keep_alive();
        let (file, ignore_range, cut) = {
            let mut st = self.core.lock();
            let file = st.folder_view(relative);
            let cut = head.method == "GET" && file.is_some() && st.take_drop("folder");
            (file, st.faults.ignore_range, cut)
        };
        let Some(file) = file else {
            self.core
                .log_call(format!("HTTP GET /folder/{relative} 404"));
            return self.text(404, "no such file", keep).await;
        };
        let size = file.size()?;
        let range = if ignore_range {
            RangeRequest::Whole
        } else {
            parse_range(head.header("range"), size)
        };
        let (status, start, len, mut headers) = match range {
            RangeRequest::Whole => (200, 0, size, vec![]),
            RangeRequest::Part(s, e) => (
                206,
                s,
                e - s + 1,
                vec![("content-range", format!("bytes {s}-{e}/{size}"))],
            ),
            RangeRequest::Unsatisfiable => {
                self.core
                    .log_call(format!("HTTP GET /folder/{relative} 416"));
                self.respond(
                    416,
                    &[("content-range", format!("bytes */{size}"))],
                    b"",
                    keep,
                )
                .await?;
                return Ok(if keep { After::KeepAlive } else { After::Close });
            }
        };
        headers.push(("content-type", "application/octet-stream".into()));
        headers.push(("accept-ranges", "bytes".into()));
        // Reads authorized by Basic credentials alone (no session cookie:
        // another client than the SOAP session's, e.g. nbdkit's curl
        // plugin) are marked, so tests can tell who read.
        let by_basic = if self.session_cookie(&head) {
            ""
        } else {
            " basic"
        };
        self.core.log_call(format!(
            "HTTP {} /folder/{relative} {status}{}{by_basic}",
            head.method,
            if status == 206 {
                format!(" {start}+{len}")
            } else {
                String::new()
            }
        ));
        let head_text = Conn::head_text(status, &headers, len, keep && !cut);
        self.io.write_all(head_text.as_bytes()).await?;
        if head.method == "HEAD" {
            self.io.flush().await?;
            return Ok(if keep { After::KeepAlive } else { After::Close });
        }
        let send = if cut { len / 2 } else { len };
        let mut at = start;
        let mut left = send;
        let mut buf = vec![0u8; IO_CHUNK.min(send as usize)];
        while left > 0 {
            let n = (left as usize).min(IO_CHUNK);
            {
                // Under the lock: a guest write copies the bytes it
                // replaces into the snapshot first, never mid-chunk.
                let st = self.core.lock();
                let view = st.folder_view(relative).unwrap_or_else(|| file.clone());
                view.read(at, &mut buf[..n])?;
            }
            self.io.write_all(&buf[..n]).await?;
            at += n as u64;
            left -= n as u64;
        }
        self.io.flush().await?;
        Ok(if keep && !cut {
            After::KeepAlive
        } else {
            After::Close
        })
    }

    async fn folder_put(&mut self, head: RequestHead, relative: &str) -> Result<After, ConnError> {
        let Some(len) = head.content_length()? else {
            return self.text(411, "Content-Length required", false).await;
        };
        let path = {
            let st = self.core.lock();
            st.store.file(relative)
        };
        let Some(path) = path else {
            return self.text(404, "bad path", false).await;
        };
        let existed = path.exists();
        // As on ESXi, the folder must exist (FileManager.MakeDirectory).
        if !path.parent().is_some_and(|p| p.is_dir()) {
            // Refused without reading a body; the connection closes.
            self.core
                .log_call(format!("HTTP PUT /folder/{relative} 404 no folder"));
            return self.text(404, "no such folder", false).await;
        }
        if self.core.lock().disk_file_in_use(relative) {
            // Refused without reading a body; the connection closes.
            self.core
                .log_call(format!("HTTP PUT /folder/{relative} 403 locked"));
            return self.text(403, "the file is locked by a VM", false).await;
        }
        if self.core.lock().take_refused_put() {
            // Refused without reading a body; the connection closes.
            self.core
                .log_call(format!("HTTP PUT /folder/{relative} 503 refused"));
            return self.text(503, "the host refused the upload", false).await;
        }
        // The `folder_put` drop fault: the connection closes after half
        // the body, and what arrived stays in place as a partial file (as
        // a host may leave it).
        let cut = self.core.lock().take_drop("folder_put").then_some(len / 2);
        let corrupt = self.core.lock().faults.corrupt_put.take();
        let tmp = if cut.is_some() {
            path.clone()
        } else {
            path.with_extension("upload-tmp")
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut left = len;
        while left > 0 {
            if cut.is_some_and(|c| len - left >= c) {
                self.core
                    .log_call(format!("HTTP PUT /folder/{relative} cut {}", len - left));
                return Ok(After::Close);
            }
            if self.buf.is_empty() && self.read_more().await? == 0 {
                let _ = std::fs::remove_file(&tmp);
                return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let mut n = (left as usize).min(self.buf.len());
            if let Some(c) = cut {
                n = n.min((c - (len - left)).max(1) as usize);
            }
            std::io::Write::write_all(&mut file, &self.buf[..n])?;
            self.buf.drain(..n);
            left -= n as u64;
        }
        if let Some(at) = corrupt.filter(|&at| at < len) {
            use std::os::unix::fs::FileExt;
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, at)?;
            file.write_all_at(&[!byte[0]], at)?;
            self.core
                .log_call(format!("HTTP PUT /folder/{relative} corrupted at {at}"));
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        let status = if existed { 200 } else { 201 };
        self.core
            .log_call(format!("HTTP PUT /folder/{relative} {status} {len}"));
        self.text(status, "", head.keep_alive()).await
    }
}
