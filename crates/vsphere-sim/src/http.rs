//! The HTTP/1.1 pieces the simulator needs, sans I/O: a bounded request
//! head parser, query and cookie lookup (the `vmware_soap_session` cookie
//! as pyVmomi and govmomi send it back, quoted, with the attributes of
//! `Set-Cookie` trailing), Basic credentials, and `Range: bytes=` of a
//! GET /folder.

use base64::Engine;

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
}

/// A parsed request line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path without the query, percent-decoded.
    pub path: String,
    /// Decoded query pairs in order.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
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

    /// A cookie's value, quotes removed.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
    }

    /// `Authorization: Basic` user and password.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        let v = self.header("authorization")?;
        let (scheme, b64) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        Some((u.to_string(), p.to_string()))
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

    pub fn keep_alive(&self) -> bool {
        let c = self
            .header("connection")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        if self.http10 {
            c.contains("keep-alive")
        } else {
            !c.contains("close")
        }
    }
}

/// Parses a head from the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the head and its length.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf).map_err(|e| HttpError::Head(e.to_string()))? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge)
        }
        httparse::Status::Partial => return Ok(None),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let target = req.path.unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(path);
    Ok(Some((
        RequestHead {
            method: req.method.unwrap_or_default().to_string(),
            path,
            query: url::form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).trim().to_string(),
                    )
                })
                .collect(),
            http10: req.version == Some(0),
        },
        len,
    )))
}

/// `%XX` sequences decoded (a bad one is kept as is); not UTF-8 -> lossy.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No (usable) Range: the whole file.
    Whole,
    /// Bytes `[start, end]` inclusive.
    Part(u64, u64),
    /// Outside the file: 416.
    Unsatisfiable,
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n`; one range only (several, or
/// another unit, are served whole as RFC 9110 allows).
pub fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(h) = header else {
        return RangeRequest::Whole;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return RangeRequest::Unsatisfiable,
            Ok(n) => Some((size.saturating_sub(n), size.saturating_sub(1))),
            Err(_) => None,
        },
        (false, true) => a.parse::<u64>().ok().map(|s| (s, size.saturating_sub(1))),
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.min(size.saturating_sub(1)))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeRequest::Whole,
        Some((s, _)) if size == 0 || s >= size => RangeRequest::Unsatisfiable,
        Some((s, e)) => RangeRequest::Part(s, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_cookie_and_auth() {
        let raw = b"GET /folder/vm%201/a-flat.vmdk?dcPath=ha-datacenter&dsName=datastore1 HTTP/1.1\r\nCookie: vmware_soap_session=\"52abc\"; Path=/; HttpOnly; Secure;\r\nAuthorization: Basic cm9vdDpwdw==\r\nRange: bytes=0-9\r\n\r\n";
        let (h, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(n, raw.len());
        assert_eq!(h.path, "/folder/vm 1/a-flat.vmdk");
        assert_eq!(h.query_param("dsName"), Some("datastore1"));
        assert_eq!(h.cookie("vmware_soap_session").as_deref(), Some("52abc"));
        assert_eq!(h.basic_auth(), Some(("root".into(), "pw".into())));
        assert_eq!(
            parse_range(h.header("range"), 100),
            RangeRequest::Part(0, 9)
        );
    }

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(Some("bytes=10-"), 100), Part(10, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Part(90, 99));
        assert_eq!(parse_range(Some("bytes=90-200"), 100), Part(90, 99));
        assert_eq!(parse_range(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-1"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 100), Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), Whole);
        assert_eq!(parse_range(None, 100), Whole);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
                        range in ".{0,30}", size in proptest::prelude::any::<u64>()) {
            if let Ok(Some((h, _))) = parse_head(&raw) {
                let _ = (h.content_length(), h.keep_alive(), h.basic_auth(), h.cookie("a"));
            }
            if let RangeRequest::Part(s, e) = parse_range(Some(&range), size) {
                proptest::prop_assert!(s <= e && e < size);
            }
        }
    }
}
