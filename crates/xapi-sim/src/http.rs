//! The HTTP/1.1 pieces the simulator needs, sans I/O: reading a request
//! head (bounded), query and cookie parameters as xapi looks them up
//! (cookie first, then query: xenapi-reference.md §3). The body format of
//! `PUT /import_raw_vdi?chunked` is `xapi_wire::chunked`.

use xapi_wire::ChunkedError;

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
    Chunked(#[from] ChunkedError),
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
    }
}
