//! Datastore Range reads (`GET /folder` with `Range`) over HTTP/1.1 on
//! rustls, in the calling thread, straight into the caller's buffers: no
//! client runtime thread between the socket and the reader (reqwest's
//! blocking client hands every body chunk across threads and copies it
//! twice), so each read lane decrypts its own connection. Connections are
//! kept for the next request unless the host closes them; one that fails
//! before its answer began is retried once on a new connection (a kept
//! connection the host closed while idle).
//!
//! The answer's head is decoded by [`parse_head`] (pure, fuzzed); the body
//! is framed by `Content-Length` or chunked, and must be exactly the bytes
//! asked for.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::VmwareError;

/// Longest answer head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Kept connections.
const MAX_IDLE: usize = 32;
/// Trailer lines accepted after a chunked body.
const MAX_TRAILERS: usize = 64;
/// The longest one request may take, answer included (a host that
/// trickles bytes cannot hold a read forever).
const REQUEST_DEADLINE: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A host silent this long in the middle of a request has stalled.
const IO_TIMEOUT: Duration = Duration::from_secs(300);

type Conn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Direct Range reads from one host.
pub struct RangeGet {
    /// Host name or address, as the certificate is checked against.
    host: String,
    port: u16,
    /// `Host` header: `host:port` (`[v6]:port`).
    authority: String,
    tls: Arc<rustls::ClientConfig>,
    idle: Mutex<Vec<Conn>>,
}

/// What [`parse_head`] keeps of an answer's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub content_range: Option<String>,
    pub chunked: bool,
    /// The host closes the connection after this answer.
    pub close: bool,
}

/// Decodes an HTTP/1.1 answer head (status line and headers, without the
/// blank line that ends it).
pub fn parse_head(bytes: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "answer head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(format!(
            "not an HTTP/1.x answer: {:?}",
            truncate(status_line)
        ));
    }
    let status: u16 = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", truncate(status_line)))?;
    let mut head = Head {
        status,
        content_length: None,
        content_range: None,
        chunked: false,
        close: version == "HTTP/1.0",
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {:?}", truncate(line)));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| format!("bad Content-Length {:?}", truncate(value)))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err("two different Content-Length headers".into());
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("content-range") {
            head.content_range = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only chunked framing: any other coding would put encoded
            // bytes where the disk's bytes go.
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!(
                    "unsupported Transfer-Encoding {:?}",
                    truncate(value)
                ));
            }
            head.chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            let tokens = value.split(',').map(str::trim);
            for t in tokens {
                if t.eq_ignore_ascii_case("close") {
                    head.close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    head.close = false;
                }
            }
        }
    }
    if head.chunked && head.content_length.is_some() {
        return Err("both Transfer-Encoding and Content-Length".into());
    }
    Ok(head)
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Reads an answer head from `r`: the head's bytes (without the blank
/// line) and whatever body bytes came with it. `Ok(None)` when the
/// connection ended before the first byte.
fn read_head(r: &mut impl Read) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            // A kept connection the host dropped (without TLS close_notify,
            // or with a reset) before the answer's first byte.
            Err(e)
                if buf.is_empty()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection ended inside the answer head",
            ));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = find(&buf[from..], b"\r\n\r\n") {
            let end = from + at;
            let rest = buf[end + 4..].to_vec();
            buf.truncate(end);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("answer head longer than {MAX_HEAD_BYTES} bytes"),
            ));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A connection read under a deadline: each read waits at most until the
/// deadline (and at most [`IO_TIMEOUT`]).
struct Timed<'a> {
    conn: &'a mut Conn,
    deadline: std::time::Instant,
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the answer took longer than {} s",
                    REQUEST_DEADLINE.as_secs()
                ),
            ));
        }
        // The socket waits IO_TIMEOUT (set before each request); only in
        // the deadline's last stretch is it shortened, one call per read.
        if left < IO_TIMEOUT {
            self.conn.sock.set_read_timeout(Some(left))?;
        }
        self.conn.read(buf)
    }
}

/// An I/O failure in words, a timeout named as one.
fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no answer in time ({e})")
        }
        _ => e.to_string(),
    }
}

/// `r` after `first`: the bytes already read, then the stream.
struct Prefixed<'a, R> {
    first: &'a [u8],
    r: &'a mut R,
}

impl<R: Read> Read for Prefixed<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.len());
            buf[..n].copy_from_slice(&self.first[..n]);
            self.first = &self.first[n..];
            return Ok(n);
        }
        self.r.read(buf)
    }
}

/// How a body went wrong.
#[derive(Debug)]
pub enum BodyError {
    /// The stream failed or ended early.
    Io(std::io::Error),
    /// The framing broke the protocol (bad chunk size, more bytes than
    /// asked for).
    Protocol(String),
}

/// Fills `bufs` from a body of exactly their total length: `Content-Length`
/// framed (`chunked` false; the caller checked the length) or chunked,
/// whose end must come right after the last byte asked for.
pub fn read_body(
    r: &mut impl Read,
    chunked: bool,
    bufs: &mut [&mut [u8]],
) -> Result<(), BodyError> {
    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    let mut got = 0u64;
    let mut fill = |r: &mut dyn Read, mut limit: u64, got: &mut u64| -> Result<u64, BodyError> {
        // Copies up to `limit` bytes of `r` into the buffers from `got` on.
        let mut moved = 0;
        let mut at = *got;
        for buf in bufs.iter_mut() {
            let len = buf.len() as u64;
            if at >= len {
                at -= len;
                continue;
            }
            while at < len && limit > 0 {
                let want = ((len - at).min(limit)) as usize;
                let n = r
                    .read(&mut buf[at as usize..at as usize + want])
                    .map_err(BodyError::Io)?;
                if n == 0 {
                    return Err(BodyError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the answer ended after {} of {total} bytes", *got + moved),
                    )));
                }
                at += n as u64;
                moved += n as u64;
                limit -= n as u64;
            }
            if limit == 0 {
                break;
            }
            at = 0;
        }
        *got += moved;
        Ok(moved)
    };
    if !chunked {
        fill(r, total, &mut got)?;
        return Ok(());
    }
    loop {
        let size = chunk_size(r)?;
        if size == 0 {
            // Trailers, up to the blank line (a few at most).
            let mut trailers = 0;
            while !read_line(r)?.is_empty() {
                trailers += 1;
                if trailers > MAX_TRAILERS {
                    return Err(BodyError::Protocol("too many trailer lines".into()));
                }
            }
            if got != total {
                return Err(BodyError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the answer ended after {got} of {total} bytes"),
                )));
            }
            return Ok(());
        }
        if got + size > total {
            return Err(BodyError::Protocol("more bytes than the range".into()));
        }
        fill(r, size, &mut got)?;
        if !read_line(r)?.is_empty() {
            return Err(BodyError::Protocol("a chunk does not end with CRLF".into()));
        }
    }
}

/// One CRLF-ended line, without the CRLF (at most 4 KiB).
fn read_line(r: &mut (impl Read + ?Sized)) -> Result<Vec<u8>, BodyError> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if r.read(&mut b).map_err(BodyError::Io)? == 0 {
            return Err(BodyError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the answer ended inside its chunk framing",
            )));
        }
        if b[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
                return Ok(line);
            }
            return Err(BodyError::Protocol("bare LF in the chunk framing".into()));
        }
        line.push(b[0]);
        if line.len() > 4096 {
            return Err(BodyError::Protocol("chunk framing line too long".into()));
        }
    }
}

fn chunk_size(r: &mut impl Read) -> Result<u64, BodyError> {
    let line = read_line(r)?;
    let text = std::str::from_utf8(&line)
        .map_err(|_| BodyError::Protocol("chunk size is not text".into()))?;
    let digits = text.split(';').next().unwrap_or_default().trim();
    if digits.is_empty() || digits.len() > 15 {
        return Err(BodyError::Protocol(format!(
            "bad chunk size {:?}",
            truncate(text)
        )));
    }
    u64::from_str_radix(digits, 16)
        .map_err(|_| BodyError::Protocol(format!("bad chunk size {:?}", truncate(text))))
}

/// Whether a request on a kept connection failed in a way that a new
/// connection may not (the host closed it while idle).
enum Attempt {
    Done(Result<(), VmwareError>),
    Stale,
}

impl RangeGet {
    /// `host` without brackets; `authority` as the `Host` header.
    pub fn new(host: &str, port: u16, authority: String, tls: Arc<rustls::ClientConfig>) -> Self {
        RangeGet {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            authority,
            tls,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn connect(&self) -> Result<Conn, VmwareError> {
        let transport = |reason: String| VmwareError::Transport {
            host: self.authority.clone(),
            reason,
        };
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| transport(format!("resolve: {e}")))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            transport(format!(
                "connect: {}",
                last.map_or("no address".to_string(), |e| e.to_string())
            ))
        })?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| tcp.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| transport(format!("socket: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| transport(format!("server name: {e}")))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| transport(format!("TLS: {e}")))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        // The handshake now, so that a refused certificate is named as such.
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| tls_error(&self.authority, e))?;
        }
        Ok(stream)
    }

    /// Reads bytes `offset ..` of `target` (path and query of a `/folder`
    /// URL) into `bufs`, with `cookie` as the session cookie header value.
    /// `what` and `path` name the request in errors.
    pub fn get(
        &self,
        target: &str,
        cookie: Option<&str>,
        offset: u64,
        bufs: &mut [&mut [u8]],
        path: &str,
    ) -> Result<(), VmwareError> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if total == 0 {
            return Ok(());
        }
        let last = offset + total - 1;
        let mut request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nRange: bytes={offset}-{last}\r\nAccept: */*\r\nUser-Agent: cbtvault\r\n",
            self.authority
        );
        if let Some(c) = cookie {
            request.push_str(&format!("Cookie: {c}\r\n"));
        }
        request.push_str("\r\n");
        let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(conn) = kept {
            match self.attempt(conn, &request, offset, last, bufs, path) {
                Attempt::Done(r) => return r,
                Attempt::Stale => {}
            }
        }
        match self.attempt(self.connect()?, &request, offset, last, bufs, path) {
            Attempt::Done(r) => r,
            Attempt::Stale => Err(VmwareError::Transport {
                host: self.authority.clone(),
                reason: format!("GET {path}: the connection closed before the answer"),
            }),
        }
    }

    fn attempt(
        &self,
        mut conn: Conn,
        request: &str,
        offset: u64,
        last: u64,
        bufs: &mut [&mut [u8]],
        path: &str,
    ) -> Attempt {
        let what = format!("GET {path} bytes {offset}-{last}");
        if conn.sock.set_read_timeout(Some(IO_TIMEOUT)).is_err() {
            return Attempt::Stale;
        }
        let transport = |reason: String| VmwareError::Transport {
            host: self.authority.clone(),
            reason: format!("{what}: {reason}"),
        };
        if conn
            .write_all(request.as_bytes())
            .and_then(|_| conn.flush())
            .is_err()
        {
            return Attempt::Stale;
        }
        let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
        let (head, rest) = match read_head(&mut Timed {
            conn: &mut conn,
            deadline,
        }) {
            Ok(Some(h)) => h,
            Ok(None) => return Attempt::Stale,
            Err(e) => return Attempt::Done(Err(transport(io_text(&e)))),
        };
        let head = match parse_head(&head) {
            Ok(h) => h,
            Err(reason) => {
                return Attempt::Done(Err(VmwareError::Protocol { what, reason }));
            }
        };
        let total = last - offset + 1;
        if head.status == 200 {
            // The whole file follows: never read.
            return Attempt::Done(Err(VmwareError::RangeIgnored {
                path: path.to_string(),
            }));
        }
        if head.status != 206 {
            let mut body = rest;
            body.truncate(200);
            return Attempt::Done(Err(VmwareError::Http {
                what,
                status: head.status,
                body: String::from_utf8_lossy(&body).into_owned(),
            }));
        }
        let want = format!("bytes {offset}-{last}/");
        if !head
            .content_range
            .as_deref()
            .is_some_and(|r| r.starts_with(&want))
        {
            return Attempt::Done(Err(VmwareError::Protocol {
                what,
                reason: format!(
                    "Content-Range {:?} does not match the request",
                    head.content_range
                ),
            }));
        }
        match (head.chunked, head.content_length) {
            (false, Some(n)) if n == total => {}
            (false, Some(n)) if n > total => {
                return Attempt::Done(Err(VmwareError::Protocol {
                    what,
                    reason: "more bytes than the range".into(),
                }))
            }
            (false, Some(n)) => {
                return Attempt::Done(Err(transport(format!(
                    "the answer ended after {n} of {total} bytes"
                ))))
            }
            (false, None) => {
                return Attempt::Done(Err(VmwareError::Protocol {
                    what,
                    reason: "an answer with neither Content-Length nor chunked framing".into(),
                }))
            }
            (true, _) => {}
        }
        let mut timed = Timed {
            conn: &mut conn,
            deadline,
        };
        let mut body = Prefixed {
            first: &rest,
            r: &mut timed,
        };
        let read = read_body(&mut body, head.chunked, bufs);
        let mut leftover = !body.first.is_empty();
        match read {
            Ok(()) => {}
            Err(BodyError::Io(e)) => return Attempt::Done(Err(transport(io_text(&e)))),
            Err(BodyError::Protocol(reason)) => {
                return Attempt::Done(Err(VmwareError::Protocol { what, reason }))
            }
        }
        // Decrypted bytes already waiting past the answer (a look at what
        // TLS holds, no socket read).
        let mut probe = [0u8; 1];
        let mut closed = false;
        match conn.conn.reader().read(&mut probe) {
            Ok(0) => closed = true,
            Ok(_) => leftover = true,
            Err(_) => {}
        }
        if leftover {
            // Bytes past the answer: the connection is out of step.
            return Attempt::Done(Err(VmwareError::Protocol {
                what,
                reason: "more bytes than the range".into(),
            }));
        }
        if !head.close && !closed {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        Attempt::Done(Ok(()))
    }
}

/// A TLS or socket failure of the handshake, a refused certificate named
/// as such.
fn tls_error(host: &str, e: std::io::Error) -> VmwareError {
    if let Some(inner) = e.get_ref() {
        if let Some(refused) = ::nbd::tls::refusal_in(inner) {
            return VmwareError::CertificateRefused {
                host: host.to_string(),
                refused: Box::new(refused.clone()),
            };
        }
        if let Some(reason) = ::nbd::tls::failure_text(inner) {
            return VmwareError::Transport {
                host: host.to_string(),
                reason,
            };
        }
    }
    VmwareError::Transport {
        host: host.to_string(),
        reason: format!("TLS handshake: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_decode_and_bad_ones_are_named() {
        let h = parse_head(
            b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\ncontent-range: bytes 5-14/100\r\nConnection: keep-alive",
        )
        .unwrap();
        assert_eq!(h.status, 206);
        assert_eq!(h.content_length, Some(10));
        assert_eq!(h.content_range.as_deref(), Some("bytes 5-14/100"));
        assert!(!h.chunked && !h.close);
        assert!(parse_head(b"HTTP/1.1 206 X\r\nTransfer-Encoding: gzip, chunked").is_err());
        let h = parse_head(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: Chunked").unwrap();
        assert!(h.chunked && h.close);
        for bad in [
            &b"SSH-2.0 x"[..],
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 206\r\nno colon",
            b"HTTP/1.1 206\r\nContent-Length: -1",
            b"HTTP/1.1 206\r\nContent-Length: 1\r\nContent-Length: 2",
            b"HTTP/1.1 206\r\nTransfer-Encoding: gzip",
            b"HTTP/1.1 206\r\nTransfer-Encoding: chunked\r\nContent-Length: 3",
            b"HTTP/1.1 206\r\n\xff: x",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_head_and_the_body_bytes_after_it_are_split() {
        let mut r = std::io::Cursor::new(b"HTTP/1.1 206 X\r\nA: b\r\n\r\nbody".to_vec());
        let (head, rest) = read_head(&mut r).unwrap().unwrap();
        assert_eq!(head, b"HTTP/1.1 206 X\r\nA: b");
        assert_eq!(rest, b"body");
        assert!(read_head(&mut std::io::Cursor::new(Vec::new()))
            .unwrap()
            .is_none());
        assert!(read_head(&mut std::io::Cursor::new(b"HTTP/1.1 2".to_vec())).is_err());
        let endless = vec![b'a'; MAX_HEAD_BYTES + 8192];
        assert!(read_head(&mut std::io::Cursor::new(endless)).is_err());
    }

    type Answer = fn(usize) -> Vec<u8>;

    /// A TLS peer on 127.0.0.1 that answers one request per connection
    /// with `answer(n)` (n: the connection's number, from 0), then closes
    /// the connection without saying so (as a host closing an idle kept
    /// connection does). Returns the port and the connection counter.
    fn peer(answer: Answer) -> (u16, Arc<std::sync::atomic::AtomicUsize>, [u8; 32]) {
        peer_with(answer, true)
    }

    /// [`peer`], closing with TLS close_notify or (`notify` false) by
    /// dropping the socket alone.
    fn peer_with(
        answer: Answer,
        notify: bool,
    ) -> (u16, Arc<std::sync::atomic::AtomicUsize>, [u8; 32]) {
        use std::net::TcpListener;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = cert.cert.der().to_vec();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone().into()], key)
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                if let Ok(Some(_)) = read_head(&mut s) {
                    let _ = s.write_all(&answer(n));
                    let _ = s.flush();
                }
                if notify {
                    s.conn.send_close_notify();
                    let _ = s.flush();
                }
            }
        });
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &der)
            .as_ref()
            .try_into()
            .unwrap();
        (port, count, digest)
    }

    fn client(port: u16, pin: [u8; 32]) -> RangeGet {
        let tls = crate::source::xenapi::tls::client_config(
            &crate::source::xenapi::tls::HttpsTrust::Fingerprint(vec![pin]),
        )
        .unwrap();
        RangeGet::new(
            "localhost",
            port,
            format!("localhost:{port}"),
            Arc::new(tls),
        )
    }

    #[test]
    fn a_kept_connection_the_host_closed_is_replaced_once() {
        let (port, count, pin) = peer(|n| {
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: 4\r\nContent-Range: bytes 8-11/100\r\n\r\nab{n:02}"
            )
            .into_bytes()
        });
        let get = client(port, pin);
        for want in [b"ab00", b"ab01"] {
            let mut a = [0u8; 1];
            let mut b = [0u8; 3];
            get.get(
                "/folder/x?dcPath=d&dsName=s",
                Some("c=1"),
                8,
                &mut [&mut a, &mut b],
                "x",
            )
            .unwrap();
            assert_eq!(&[&a[..], &b[..]].concat(), want);
        }
        // The second read found its kept connection closed and opened one.
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_kept_connection_dropped_without_close_notify_is_replaced_once() {
        let (port, count, pin) = peer_with(
            |n| {
                format!(
                    "HTTP/1.1 206 P\r\nContent-Length: 4\r\nContent-Range: bytes 8-11/100\r\n\r\ncd{n:02}"
                )
                .into_bytes()
            },
            false,
        );
        let get = client(port, pin);
        for want in [b"cd00", b"cd01"] {
            let mut buf = [0u8; 4];
            get.get("/folder/x", None, 8, &mut [&mut buf], "x").unwrap();
            assert_eq!(&buf, want);
        }
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn answers_that_do_not_fit_the_request_are_named() {
        let cases: [(Answer, &str); 5] = [
            (
                |_| {
                    b"HTTP/1.1 206 P\r\nContent-Length: 4\r\nContent-Range: bytes 8-11/100\r\n\r\nabcdEXTRA".to_vec()
                },
                "more bytes than the range",
            ),
            (
                |_| {
                    b"HTTP/1.1 206 P\r\nContent-Length: 4\r\nContent-Range: bytes 0-3/100\r\n\r\nabcd".to_vec()
                },
                "does not match the request",
            ),
            (
                |_| {
                    let mut a = b"HTTP/1.1 206 P\r\nContent-Length: 4\r\nContent-Range: bytes 8-11/100\r\n\r\nabcd".to_vec();
                    // Well past what the head's first read takes.
                    a.extend_from_slice(&[b'x'; 9000]);
                    a
                },
                "more bytes than the range",
            ),
            (
                |_| b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabcd".to_vec(),
                "Range",
            ),
            (
                |_| {
                    b"HTTP/1.1 206 P\r\nContent-Length: 4\r\nContent-Range: bytes 8-11/100\r\n\r\nab".to_vec()
                },
                "ended after 2 of 4 bytes",
            ),
        ];
        for (answer, words) in cases {
            let (port, _, pin) = peer(answer);
            let mut buf = [0u8; 4];
            let err = client(port, pin)
                .get("/folder/x", None, 8, &mut [&mut buf], "x")
                .unwrap_err()
                .to_string();
            assert!(err.contains(words), "{err}");
        }
    }

    fn fill(body: &[u8], chunked: bool, lens: &[usize]) -> Result<Vec<u8>, BodyError> {
        let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        read_body(&mut std::io::Cursor::new(body.to_vec()), chunked, &mut refs)?;
        Ok(bufs.concat())
    }

    #[test]
    fn bodies_fill_the_buffers_exactly() {
        assert_eq!(fill(b"abcdefg", false, &[3, 4]).unwrap(), b"abcdefg");
        // Chunks that straddle the buffers, an extension, trailers.
        let chunked = b"2\r\nab\r\n4;x=y\r\ncdef\r\n1\r\ng\r\n0\r\nT: v\r\n\r\n";
        assert_eq!(fill(chunked, true, &[3, 4]).unwrap(), b"abcdefg");
        assert!(matches!(
            fill(b"abc", false, &[3, 4]),
            Err(BodyError::Io(_))
        ));
        // More than asked for, short, bad framing.
        assert!(matches!(
            fill(b"8\r\nabcdefgh\r\n0\r\n\r\n", true, &[3, 4]),
            Err(BodyError::Protocol(_))
        ));
        assert!(matches!(
            fill(b"3\r\nabc\r\n0\r\n\r\n", true, &[3, 4]),
            Err(BodyError::Io(_))
        ));
        assert!(matches!(
            fill(b"zz\r\n", true, &[3]),
            Err(BodyError::Protocol(_))
        ));
        assert!(matches!(
            fill(b"3\r\nabcX\r\n", true, &[3]),
            Err(BodyError::Protocol(_))
        ));
        assert!(matches!(
            fill(b"3\nabc", true, &[3]),
            Err(BodyError::Protocol(_))
        ));
        assert!(matches!(
            fill(b"3\r\nab", true, &[3]),
            Err(BodyError::Io(_))
        ));
        // Trailers: a few pass, an endless run of them is refused.
        let mut few = b"3\r\nabc\r\n0\r\n".to_vec();
        few.extend(b"T: v\r\n".repeat(MAX_TRAILERS));
        few.extend_from_slice(b"\r\n");
        assert_eq!(fill(&few, true, &[3]).unwrap(), b"abc");
        let mut many = b"3\r\nabc\r\n0\r\n".to_vec();
        many.extend(b"T: v\r\n".repeat(MAX_TRAILERS + 1));
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            fill(&many, true, &[3]),
            Err(BodyError::Protocol(_))
        ));
    }
}
