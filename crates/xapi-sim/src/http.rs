//! The HTTP/1.1 pieces the simulator needs, sans I/O: reading a request
//! head (bounded), query and cookie parameters as xapi looks them up
//! (cookie first, then query: xenapi-reference.md §3), and the body format
//! of `PUT /import_raw_vdi?chunked` (vhd-tool `chunked.ml`: repeated
//! `{offset: u64 LE, len: u32 LE}` headers each followed by `len` bytes,
//! ended by a header with offset 0 and length 0).

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request head: {0}")]
    Head(String),
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("bad Content-Length '{0}'")]
    ContentLength(String),
    #[error("chunked import: {0}")]
    Chunked(String),
}

/// A parsed request line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path without the query, not percent-decoded.
    pub path: String,
    /// Decoded query pairs in order.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// HTTP/1.0 (no keep-alive unless asked).
    pub http10: bool,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has_query(&self, name: &str) -> bool {
        self.query.iter().any(|(k, _)| k == name)
    }

    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }

    /// xapi's `lookup_param_of_req`: cookie first, then query.
    pub fn param(&self, name: &str) -> Option<String> {
        self.cookie(name)
            .or_else(|| self.query_param(name).map(str::to_string))
    }

    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        match self.header("content-length") {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| HttpError::ContentLength(v.chars().take(40).collect())),
        }
    }

    /// Whether the client wants the connection kept after this request.
    pub fn keep_alive(&self) -> bool {
        let connection = self
            .header("connection")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        if self.http10 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        }
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` when more
/// bytes are needed, else the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|e| HttpError::Head(e.to_string()))?;
    let len = match status {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge)
        }
        httparse::Status::Partial => return Ok(None),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let query = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let headers = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    Ok(Some((
        RequestHead {
            method,
            path: path.to_string(),
            query,
            headers,
            http10: req.version == Some(0),
        },
        len,
    )))
}

/// What the chunked-import decoder found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStep {
    /// More input is needed.
    Need,
    /// The last `len` bytes consumed are data for disk offset `offset`.
    Data { offset: u64, len: usize },
    /// The terminating header was read.
    Done,
}

/// Incremental decoder of the `chunked` import body. Data is handed out
/// as it arrives, so a chunk's declared length never sizes an allocation.
#[derive(Debug, Default)]
pub struct ChunkedImport {
    header: Vec<u8>,
    /// Data of the current chunk still to come: (next offset, bytes left).
    data: Option<(u64, u64)>,
    done: bool,
}

impl ChunkedImport {
    pub fn new() -> ChunkedImport {
        ChunkedImport::default()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Consumes some of `input`; returns how many bytes and what they were.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, ChunkStep), HttpError> {
        if self.done {
            return if input.is_empty() {
                Ok((0, ChunkStep::Done))
            } else {
                Err(HttpError::Chunked(
                    "data after the terminating header".into(),
                ))
            };
        }
        if let Some((offset, left)) = self.data {
            if input.is_empty() {
                return Ok((0, ChunkStep::Need));
            }
            let n = (left.min(input.len() as u64)) as usize;
            let rest = left - n as u64;
            self.data = (rest > 0).then_some((offset + n as u64, rest));
            return Ok((n, ChunkStep::Data { offset, len: n }));
        }
        let want = 12 - self.header.len();
        let n = want.min(input.len());
        self.header.extend_from_slice(&input[..n]);
        if self.header.len() < 12 {
            return Ok((n, ChunkStep::Need));
        }
        let mut offset_bytes = [0u8; 8];
        offset_bytes.copy_from_slice(&self.header[..8]);
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&self.header[8..12]);
        self.header.clear();
        let offset = u64::from_le_bytes(offset_bytes);
        let len = u32::from_le_bytes(len_bytes) as u64;
        if offset == 0 && len == 0 {
            self.done = true;
            return Ok((n, ChunkStep::Done));
        }
        if offset.checked_add(len).is_none() {
            return Err(HttpError::Chunked(format!(
                "chunk at {offset} of {len} bytes overflows"
            )));
        }
        if len > 0 {
            self.data = Some((offset, len));
        }
        Ok((n, ChunkStep::Need))
    }
}

/// Encodes one chunk of the import format (for tests and clients).
pub fn encode_import_chunk(offset: u64, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

/// The terminating header of the import format.
pub const IMPORT_CHUNK_END: [u8; 12] = [0; 12];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_params() {
        let raw = b"PUT /import_raw_vdi?vdi=abc&session_id=OpaqueRef%3Ax&chunked HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nCookie: a=b; session_id=OpaqueRef:c\r\n\r\nBODY";
        assert_eq!(parse_head(&raw[..20]).unwrap(), None);
        let (h, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], b"BODY");
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/import_raw_vdi");
        assert_eq!(h.query_param("session_id"), Some("OpaqueRef:x"));
        assert!(h.has_query("chunked"));
        assert_eq!(h.param("session_id").as_deref(), Some("OpaqueRef:c"));
        assert_eq!(h.content_length().unwrap(), Some(12));
        assert!(h.keep_alive());
    }

    #[test]
    fn oversized_head() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        while raw.len() < MAX_HEAD_BYTES + 10 {
            raw.extend_from_slice(b"X-A: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(parse_head(&raw).is_err());
    }

    proptest::proptest! {
        #[test]
        fn heads_never_panic(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Ok(Some((h, _))) = parse_head(&raw) {
                let _ = h.content_length();
                let _ = h.keep_alive();
                let _ = h.param("session_id");
            }
        }

        /// Any byte stream: the decoder never hands out more data than the
        /// input held, and never panics.
        #[test]
        fn chunked_never_overreads(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), split in 1usize..40) {
            let mut d = ChunkedImport::new();
            for piece in raw.chunks(split) {
                let mut at = 0;
                while at < piece.len() {
                    match d.feed(&piece[at..]) {
                        Ok((n, step)) => {
                            if let ChunkStep::Data { len, .. } = step {
                                proptest::prop_assert!(len <= n);
                            }
                            proptest::prop_assert!(n <= piece.len() - at);
                            if n == 0 {
                                break;
                            }
                            at += n;
                        }
                        Err(_) => return Ok(()),
                    }
                }
            }
        }
    }

    #[test]
    fn chunked_import_byte_by_byte() {
        let mut body = Vec::new();
        encode_import_chunk(65536, b"hello", &mut body);
        encode_import_chunk(7, b"", &mut body);
        encode_import_chunk(1 << 40, b"xy", &mut body);
        body.extend_from_slice(&IMPORT_CHUNK_END);
        let mut d = ChunkedImport::new();
        let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut i = 0;
        while i < body.len() {
            let (n, step) = d.feed(&body[i..i + 1]).unwrap();
            assert!(n <= 1);
            if let ChunkStep::Data { offset, len } = step {
                got.push((offset, body[i + n - len..i + n].to_vec()));
            }
            i += n;
        }
        assert!(d.is_done());
        let joined: Vec<(u64, Vec<u8>)> = got.iter().fold(Vec::new(), |mut acc, (o, b)| {
            match acc.last_mut() {
                Some((lo, lb)) if *lo + lb.len() as u64 == *o => lb.extend_from_slice(b),
                _ => acc.push((*o, b.clone())),
            }
            acc
        });
        assert_eq!(
            joined,
            vec![(65536, b"hello".to_vec()), (1 << 40, b"xy".to_vec())]
        );
        assert!(d.feed(b"x").is_err());
    }
}
