//! S3-compatible object storage as a [`Backend`]: objects under
//! `PREFIX/config`, `PREFIX/data/XX/NAME`, `PREFIX/snapshots/NAME`,
//! `PREFIX/locks/NAME` (the local layout, format-spec/01-layout.md).
//! Requests are signed (AWS Signature V4, query-string form) by `rusty-s3`
//! and sent with a blocking `reqwest` client over verified TLS; plain HTTP
//! only to an endpoint given explicitly as `http://`.
//!
//! The parsing here is pure (the `s3://` argument, the shared credentials
//! file, S3 error documents) and unit-tested; the I/O is in [`S3Backend`].
//! Retrying transient failures is [`super::retry::RetryBackend`]'s job: this
//! backend only classifies each failure as not-found, transient or
//! permanent.

use std::io::Read;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CreateMultipartUpload, DeleteObject, GetObject,
    HeadObject, ListObjectsV2, PutObject, S3Action, UploadPart,
};
pub use rusty_s3::UrlStyle;
use rusty_s3::{Bucket, Credentials};
use url::Url;

use super::{Backend, BackendError, Kind};

/// Whole objects above this size are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
/// Size of each part but the last (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 16 << 20;
/// Requests kept in flight by default (CBTVAULT_S3_CONNECTIONS, at most 64).
pub const CONNECTIONS: usize = 8;
/// How long a signed request stays valid.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(3600);
/// Keys per LIST page (S3's maximum).
const LIST_PAGE: usize = 1000;

/// What went wrong setting up an S3 repository (before any request).
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("S3 repository '{url}': {reason}")]
    Url { url: String, reason: String },
    #[error("S3 credentials: {0}")]
    Credentials(String),
    #[error("S3 endpoint '{endpoint}': {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("S3 TLS: {0}")]
    Tls(String),
}

/// The parts of an `s3://[ENDPOINT/]BUCKET[/PREFIX]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// `host[:port]` when the argument names one.
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
}

/// Parses `s3://[ENDPOINT/]BUCKET[/PREFIX]`. The first component is the
/// endpoint when `endpoint_given` is false and it looks like a host: it
/// has a port (`:`), is `localhost`, or has a dot and is followed by a
/// bucket. With an endpoint given elsewhere (`--s3-endpoint`), the first
/// component is always the bucket.
pub fn parse_url(text: &str, endpoint_given: bool) -> Result<S3Url, S3Error> {
    let bad = |reason: &str| S3Error::Url {
        url: text.to_string(),
        reason: reason.to_string(),
    };
    let rest = text
        .strip_prefix("s3://")
        .ok_or_else(|| bad("does not start with s3://"))?;
    if rest.contains(['?', '#', '@']) {
        return Err(bad(
            "no query, fragment or user belongs in it; credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the shared credentials file",
        ));
    }
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let Some(first) = parts.first() else {
        return Err(bad("names no bucket (s3://[ENDPOINT/]BUCKET[/PREFIX])"));
    };
    let looks_like_host =
        first.contains(':') || *first == "localhost" || (first.contains('.') && parts.len() > 1);
    let (endpoint, rest) = if !endpoint_given && looks_like_host {
        (Some(first.to_string()), &parts[1..])
    } else {
        (None, &parts[..])
    };
    let Some(bucket) = rest.first() else {
        return Err(bad(
            "names an endpoint but no bucket (s3://ENDPOINT/BUCKET[/PREFIX])",
        ));
    };
    if !valid_bucket(bucket) {
        return Err(bad(&format!(
            "'{bucket}' is not a valid bucket name (3 to 63 lower-case letters, digits, '.' and '-')"
        )));
    }
    let prefix = rest[1..].join("/");
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/._-".contains(*c)))
    {
        return Err(bad(&format!(
            "the prefix '{prefix}' holds '{c}'; use letters, digits, '/', '.', '_' and '-'"
        )));
    }
    Ok(S3Url {
        endpoint,
        bucket: bucket.to_string(),
        prefix,
    })
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The key of an object: the local layout under the prefix.
pub fn key_of(prefix: &str, kind: Kind, name: &str) -> String {
    let rel = match kind {
        Kind::Config => "config".to_string(),
        Kind::Pack => format!("data/{}/{name}", name.get(..2).unwrap_or("00")),
        Kind::Snapshot => format!("snapshots/{name}"),
        Kind::Lock => format!("locks/{name}"),
        Kind::Index => format!("index/{name}"),
        Kind::Page => format!("manifests/{name}"),
        Kind::Key => format!("keys/{name}"),
    };
    if prefix.is_empty() {
        rel
    } else {
        format!("{prefix}/{rel}")
    }
}

/// The folder listed for a kind, with its trailing slash.
fn folder_of(prefix: &str, kind: Kind) -> String {
    let rel = match kind {
        Kind::Config => "",
        Kind::Pack => "data/",
        Kind::Snapshot => "snapshots/",
        Kind::Lock => "locks/",
        Kind::Index => "index/",
        Kind::Page => "manifests/",
        Kind::Key => "keys/",
    };
    if prefix.is_empty() {
        rel.to_string()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// The object name of a listed key: its last component when the key sits
/// where objects of `kind` live (packs one folder deeper), else None.
pub fn name_of_key(prefix: &str, kind: Kind, key: &str) -> Option<String> {
    let rel = key.strip_prefix(&folder_of(prefix, kind))?;
    let name = match kind {
        Kind::Pack => {
            let (dir, name) = rel.split_once('/')?;
            if dir.len() != 2 || name.contains('/') {
                return None;
            }
            name
        }
        _ if rel.contains('/') => return None,
        _ => rel,
    };
    (!name.is_empty()).then(|| name.to_string())
}

/// Where credentials and region come from: an environment lookup and the
/// text of the shared credentials file (when there is one).
pub struct CredentialSources<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub shared_file: Option<(String, String)>,
}

/// Credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`
/// (`AWS_SESSION_TOKEN` optional), else the profile `AWS_PROFILE`
/// (`default`) of the shared credentials file. Never from the command line.
pub fn credentials(src: &CredentialSources<'_>) -> Result<Credentials, S3Error> {
    let env = |k: &str| (src.env)(k).filter(|v| !v.is_empty());
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(key), Some(secret)) => {
            return Ok(match env("AWS_SESSION_TOKEN") {
                Some(token) => Credentials::new_with_token(key, secret, token),
                None => Credentials::new(key, secret),
            })
        }
        (Some(_), None) => {
            return Err(S3Error::Credentials(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(S3Error::Credentials(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into(),
            ))
        }
        (None, None) => {}
    }
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let Some((path, text)) = &src.shared_file else {
        return Err(S3Error::Credentials(
            "none found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to the shared credentials file (~/.aws/credentials, or the file AWS_SHARED_CREDENTIALS_FILE names)".into(),
        ));
    };
    let section = ini_section(text, &profile)
        .ok_or_else(|| S3Error::Credentials(format!("'{path}' has no profile [{profile}]")))?;
    let get = |k: &str| {
        section
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(key), Some(secret)) => Ok(match get("aws_session_token") {
            Some(token) => Credentials::new_with_token(key, secret, token),
            None => Credentials::new(key, secret),
        }),
        _ => Err(S3Error::Credentials(format!(
            "profile [{profile}] of '{path}' lacks aws_access_key_id or aws_secret_access_key"
        ))),
    }
}

/// The `key = value` pairs of `[name]` in an INI text (keys lower-cased).
pub fn ini_section(text: &str, name: &str) -> Option<Vec<(String, String)>> {
    let mut inside = false;
    let mut found = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            found |= inside;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    found.then_some(out)
}

/// One page of a ListObjectsV2 answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Key (as sent: URL-encoded when asked so) and size of each object.
    pub objects: Vec<(String, u64)>,
    pub truncated: bool,
    pub next: Option<String>,
}

/// Reads a ListObjectsV2 answer: `Key` and `Size` of every `Contents`,
/// `IsTruncated` and `NextContinuationToken`; every other element (ETag,
/// LastModified, Owner, which some servers omit) is ignored.
pub fn parse_listing(body: &str) -> Result<Listing, String> {
    if !body.contains("<ListBucketResult") {
        return Err("not a ListBucketResult document".into());
    }
    let mut out = Listing::default();
    let mut rest = body;
    while let Some(start) = rest.find("<Contents>") {
        let after = &rest[start + "<Contents>".len()..];
        let end = after
            .find("</Contents>")
            .ok_or("a Contents element is not closed")?;
        let item = &after[..end];
        let key = element(item, "Key").ok_or("an object without a Key")?;
        let size = element(item, "Size")
            .ok_or("an object without a Size")?
            .trim()
            .parse::<u64>()
            .map_err(|_| "an object whose Size is not a number".to_string())?;
        out.objects.push((xml_unescape(&key)?, size));
        rest = &after[end + "</Contents>".len()..];
    }
    let head = body.split("<Contents>").next().unwrap_or("");
    let tail = body.rsplit("</Contents>").next().unwrap_or("");
    let top = |tag: &str| element(head, tag).or_else(|| element(tail, tag));
    out.truncated = top("IsTruncated").is_some_and(|t| t.trim() == "true");
    out.next = top("NextContinuationToken")
        .map(|t| xml_unescape(&t))
        .transpose()?;
    Ok(out)
}

/// The text of the first `<tag>...</tag>` in `s`.
fn element(s: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = s.find(&open)? + open.len();
    let len = s[start..].find(&close)?;
    Some(s[start..start + len].to_string())
}

/// Undoes XML's five predefined entities and numeric references.
fn xml_unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after.find(';').ok_or("an unterminated entity")?;
        let ent = &after[..end];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(h) = ent.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| format!("an unknown entity '&{ent};'"))?
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `Code` and `Message` of an S3 error document, when it is one.
pub fn error_document(body: &str) -> (Option<String>, Option<String>) {
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let start = body.find(&open)? + open.len();
        let len = body[start..].find(&close)?;
        Some(body[start..start + len].trim().to_string())
    };
    (field("Code"), field("Message"))
}

/// How a failed request is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    NotFound,
    Transient,
    Permanent,
}

/// Classifies an HTTP status and S3 error code: throttling, timeouts and
/// server errors are worth retrying; a missing key is not-found; a missing
/// bucket, refused credentials and the rest are permanent.
pub fn classify(status: u16, code: Option<&str>) -> Class {
    match (status, code) {
        (_, Some("NoSuchBucket")) => Class::Permanent,
        (404, _) | (_, Some("NoSuchKey")) => Class::NotFound,
        (_, Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable"))
        | (408 | 429 | 500..=599, _) => Class::Transient,
        _ => Class::Permanent,
    }
}

/// What the user may do about a permanent refusal.
fn advice(code: Option<&str>, bucket: &str) -> &'static str {
    match code {
        Some("InvalidAccessKeyId" | "NotSignedUp") => {
            " (the server does not know this AWS_ACCESS_KEY_ID; check the credentials)"
        }
        Some("SignatureDoesNotMatch") => {
            " (the secret key does not match the access key, or this machine's clock is off)"
        }
        Some("AccessDenied") => " (the credentials lack permission on this bucket or prefix)",
        Some("NoSuchBucket") if !bucket.is_empty() => {
            " (create the bucket, or run 'cbtvault init', which creates it)"
        }
        Some("RequestTimeTooSkewed") => " (this machine's clock is off; fix it)",
        _ => "",
    }
}

/// How to reach an S3 repository.
#[derive(Clone)]
pub struct S3Options {
    /// `https://host[:port]` or, only when given so, `http://...`.
    pub endpoint: Url,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub style: UrlStyle,
    pub credentials: Credentials,
    /// PEM certificate authorities to trust instead of the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Per-request time limit (a stalled transfer fails as transient).
    pub request_timeout: Duration,
    /// Objects above this size are uploaded in parts of `part_size`.
    pub multipart_threshold: usize,
    pub part_size: usize,
    /// Requests kept in flight by readers and writers of many objects.
    pub connections: usize,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        write!(
            f,
            "S3Options({}, bucket {}, prefix '{}', region {})",
            self.endpoint, self.bucket, self.prefix, self.region
        )
    }
}

/// An S3 bucket prefix holding a repository.
pub struct S3Backend {
    options: S3Options,
    bucket: Bucket,
    http: Client,
}

impl S3Backend {
    pub fn new(options: S3Options) -> Result<S3Backend, S3Error> {
        let bucket = Bucket::new(
            options.endpoint.clone(),
            options.style,
            options.bucket.clone(),
            options.region.clone(),
        )
        .map_err(|e| S3Error::Endpoint {
            endpoint: options.endpoint.to_string(),
            reason: e.to_string(),
        })?;
        let tls = tls_config(options.ca_pem.as_deref())?;
        let http = Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(options.endpoint.scheme() == "https")
            .connect_timeout(Duration::from_secs(30))
            .timeout(options.request_timeout)
            .pool_max_idle_per_host(options.connections.max(16))
            .build()
            .map_err(|e| S3Error::Tls(e.to_string()))?;
        Ok(S3Backend {
            options,
            bucket,
            http,
        })
    }

    /// The bucket, as messages about it name it.
    fn bucket_name(&self) -> String {
        format!("bucket {}", self.options.bucket)
    }

    fn key(&self, kind: Kind, name: &str) -> String {
        key_of(&self.options.prefix, kind, name)
    }

    fn creds(&self) -> Option<&Credentials> {
        Some(&self.options.credentials)
    }

    /// Sends a request; maps transport failures and non-success answers to
    /// a [`BackendError`] naming the object and the operation.
    fn send(
        &self,
        kind: Kind,
        name: &str,
        op: &'static str,
        req: RequestBuilder,
    ) -> Result<Response, BackendError> {
        let resp = req.send().map_err(|e| transport(kind, name, op, e))?;
        if resp.status().is_success() || resp.status() == StatusCode::PARTIAL_CONTENT {
            return Ok(resp);
        }
        Err(self.refusal(kind, name, op, resp))
    }

    fn refusal(&self, kind: Kind, name: &str, op: &'static str, resp: Response) -> BackendError {
        let status = resp.status();
        let mut body = String::new();
        let _ = resp.take(64 << 10).read_to_string(&mut body);
        let (code, message) = error_document(&body);
        let class = classify(status.as_u16(), code.as_deref());
        let text = format!(
            "HTTP {}{}{}{}",
            status.as_u16(),
            code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(),
            message
                .filter(|m| !m.is_empty() && !m.starts_with("HTTP "))
                .map(|m| format!(": {m}"))
                .unwrap_or_default(),
            advice(code.as_deref(), &self.options.bucket)
        );
        let source = std::io::Error::other(text);
        let name = name.to_string();
        match class {
            Class::NotFound => BackendError::NotFound { kind, name },
            Class::Transient => BackendError::Transient {
                kind,
                name,
                op,
                error: source,
            },
            Class::Permanent => BackendError::Permanent {
                kind,
                name,
                op,
                error: source,
            },
        }
    }

    fn put(
        &self,
        kind: Kind,
        name: &str,
        data: bytes::Bytes,
        if_absent: bool,
    ) -> Result<(), BackendError> {
        let key = self.key(kind, name);
        if data.len() > self.options.multipart_threshold {
            return self.put_multipart(kind, name, &key, data);
        }
        let mut action = PutObject::new(&self.bucket, self.creds(), &key);
        if if_absent {
            action.headers_mut().insert("if-none-match", "*");
        }
        let url = action.sign(SIGNATURE_LIFETIME);
        let mut req = self.http.put(url).body(data);
        if if_absent {
            req = req.header("if-none-match", "*");
        }
        self.send(kind, name, "upload", req)?;
        Ok(())
    }

    fn put_multipart(
        &self,
        kind: Kind,
        name: &str,
        key: &str,
        data: bytes::Bytes,
    ) -> Result<(), BackendError> {
        let create = CreateMultipartUpload::new(&self.bucket, self.creds(), key);
        let resp = self.send(
            kind,
            name,
            "start a multipart upload",
            self.http.post(create.sign(SIGNATURE_LIFETIME)),
        )?;
        let body = resp
            .text()
            .map_err(|e| transport(kind, name, "start a multipart upload", e))?;
        let started =
            CreateMultipartUpload::parse_response(&body).map_err(|e| BackendError::Permanent {
                kind,
                name: name.to_string(),
                op: "start a multipart upload",
                error: std::io::Error::other(format!("unreadable answer: {e}")),
            })?;
        let upload_id = started.upload_id().to_string();
        let result = (|| {
            let mut etags = Vec::new();
            let size = self.options.part_size.max(1);
            for (i, start) in (0..data.len()).step_by(size).enumerate() {
                let part = data.slice(start..(start + size).min(data.len()));
                let number = u16::try_from(i + 1).map_err(|_| BackendError::Permanent {
                    kind,
                    name: name.to_string(),
                    op: "upload a part",
                    error: std::io::Error::other("more than 65535 parts"),
                })?;
                let action = UploadPart::new(&self.bucket, self.creds(), key, number, &upload_id);
                let resp = self.send(
                    kind,
                    name,
                    "upload a part",
                    self.http.put(action.sign(SIGNATURE_LIFETIME)).body(part),
                )?;
                let etag = resp
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| BackendError::Permanent {
                        kind,
                        name: name.to_string(),
                        op: "upload a part",
                        error: std::io::Error::other("the answer has no ETag"),
                    })?
                    .to_string();
                etags.push(etag);
            }
            let complete = CompleteMultipartUpload::new(
                &self.bucket,
                self.creds(),
                key,
                &upload_id,
                etags.iter().map(String::as_str),
            );
            let url = complete.sign(SIGNATURE_LIFETIME);
            let resp = self.send(
                kind,
                name,
                "complete a multipart upload",
                self.http.post(url).body(complete.body()),
            )?;
            // S3 may answer 200 with an error document after a long wait.
            let body = resp
                .text()
                .map_err(|e| transport(kind, name, "complete a multipart upload", e))?;
            if let (Some(code), message) = error_document(&body) {
                let class = classify(500, Some(&code));
                let source =
                    std::io::Error::other(format!("{code}: {}", message.unwrap_or_default()));
                return Err(if class == Class::Transient {
                    BackendError::Transient {
                        kind,
                        name: name.to_string(),
                        op: "complete a multipart upload",
                        error: source,
                    }
                } else {
                    BackendError::Permanent {
                        kind,
                        name: name.to_string(),
                        op: "complete a multipart upload",
                        error: source,
                    }
                });
            }
            Ok(())
        })();
        if result.is_err() {
            // Best effort: parts of an abandoned upload cost storage.
            let abort = AbortMultipartUpload::new(&self.bucket, self.creds(), key, &upload_id);
            let _ = self.http.delete(abort.sign(SIGNATURE_LIFETIME)).send();
        }
        result
    }

    /// Creates the bucket (for `init`) unless it exists; true if created.
    pub fn ensure_bucket(&self) -> Result<bool, BackendError> {
        let head = rusty_s3::actions::HeadBucket::new(&self.bucket, self.creds());
        let resp = self
            .http
            .head(head.sign(SIGNATURE_LIFETIME))
            .send()
            .map_err(|e| transport(Kind::Config, &self.bucket_name(), "look up the bucket", e))?;
        if resp.status().is_success() {
            return Ok(false);
        }
        if resp.status() != StatusCode::NOT_FOUND {
            return Err(self.refusal(
                Kind::Config,
                &self.bucket_name(),
                "look up the bucket",
                resp,
            ));
        }
        let create = rusty_s3::actions::CreateBucket::new(&self.bucket, &self.options.credentials);
        let mut req = self
            .http
            .put(create.sign(SIGNATURE_LIFETIME))
            .body(Vec::new());
        if self.options.region != "us-east-1" {
            req = req.body(format!(
                "<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.options.region
            ));
        }
        self.send(Kind::Config, &self.bucket_name(), "create the bucket", req)?;
        Ok(true)
    }

    /// Saves `data` unless an object of that name exists: false when one
    /// does (a server that ignores `If-None-Match` is checked by a HEAD
    /// first, which is enough for `init`'s `config`).
    pub fn save_if_absent(
        &self,
        kind: Kind,
        name: &str,
        data: &[u8],
    ) -> Result<bool, BackendError> {
        match self.stat(kind, name) {
            Ok(_) => return Ok(false),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        match self.put(kind, name, bytes::Bytes::copy_from_slice(data), true) {
            Ok(()) => Ok(true),
            Err(BackendError::Permanent { error: source, .. })
                if source.to_string().starts_with("HTTP 412") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// A transport failure (no answer, or the answer cut off): transient,
/// since the next attempt may well succeed.
fn transport(kind: Kind, name: &str, op: &'static str, e: reqwest::Error) -> BackendError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "connection failed"
    };
    let e = e.without_url();
    let mut text = format!("{what}: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(&format!(": {s}"));
        }
        cause = c.source();
    }
    // A refused certificate will not be accepted on a retry.
    if text.contains("certificate") || text.contains("InvalidCertificate") {
        return BackendError::Permanent {
            kind,
            name: name.to_string(),
            op,
            error: std::io::Error::other(text),
        };
    }
    BackendError::Transient {
        kind,
        name: name.to_string(),
        op,
        error: std::io::Error::other(text),
    }
}

fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, S3Error> {
    let provider = nbd::tls::provider();
    let tls = |e: nbd::tls::TlsError| S3Error::Tls(e.to_string());
    let verifier = match ca_pem {
        Some(pem) => {
            nbd::tls::authorities_from_pem(pem, "S3 CA file", provider.clone()).map_err(tls)?
        }
        None => {
            let mut store = rustls::RootCertStore::empty();
            let _ignored =
                store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            nbd::tls::Verifier::authorities(store, provider.clone()).map_err(tls)?
        }
    };
    nbd::tls::verified_client(verifier, provider).map_err(tls)
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        let mut s = format!("s3://{}", self.options.endpoint.authority());
        s.push('/');
        s.push_str(&self.options.bucket);
        if !self.options.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.options.prefix);
        }
        s
    }

    fn save(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.put(kind, name, bytes::Bytes::copy_from_slice(data), false)
    }

    fn save_owned(&self, kind: Kind, name: &str, data: bytes::Bytes) -> Result<(), BackendError> {
        self.put(kind, name, data, false)
    }

    fn load_into(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackendError> {
        if buf.is_empty() {
            return self.stat(kind, name).map(|_| ());
        }
        let key = self.key(kind, name);
        let action = GetObject::new(&self.bucket, self.creds(), &key);
        let end = offset + buf.len() as u64 - 1;
        let req = self
            .http
            .get(action.sign(SIGNATURE_LIFETIME))
            .header("range", format!("bytes={offset}-{end}"));
        let resp = match self.send(kind, name, "read", req) {
            // Asked past its end: the object is shorter than the caller
            // expects (a truncated object), not a transient failure.
            Err(BackendError::Permanent { error: source, .. })
                if source.to_string().starts_with("HTTP 416") =>
            {
                return Err(short(kind, name, offset, buf.len()));
            }
            other => other?,
        };
        let whole = resp.status() == StatusCode::OK;
        let mut reader = resp;
        if whole && offset > 0 {
            // A server that ignores Range sends the whole object.
            std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
                .map_err(|e| read_failed(kind, name, e))?;
        }
        read_full(&mut reader, buf)
            .map_err(|e| read_failed(kind, name, e))
            .and_then(|n| {
                if n < buf.len() {
                    Err(short(kind, name, offset, buf.len()))
                } else {
                    Ok(())
                }
            })
    }

    /// One GET (not a HEAD and a GET); a missing bucket is named as such.
    fn load(&self, kind: Kind, name: &str) -> Result<Vec<u8>, BackendError> {
        let key = self.key(kind, name);
        let action = GetObject::new(&self.bucket, self.creds(), &key);
        let resp = self.send(
            kind,
            name,
            "read",
            self.http.get(action.sign(SIGNATURE_LIFETIME)),
        )?;
        let expected = resp.content_length();
        let mut out = Vec::with_capacity(expected.unwrap_or(0).min(64 << 20) as usize);
        let mut reader = resp;
        reader
            .read_to_end(&mut out)
            .map_err(|e| read_failed(kind, name, e))?;
        if expected.is_some_and(|n| n != out.len() as u64) {
            return Err(read_failed(
                kind,
                name,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the answer ended after {} bytes", out.len()),
                ),
            ));
        }
        Ok(out)
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<u64, BackendError> {
        let key = self.key(kind, name);
        let action = HeadObject::new(&self.bucket, self.creds(), &key);
        let resp = self.send(
            kind,
            name,
            "look up",
            self.http.head(action.sign(SIGNATURE_LIFETIME)),
        )?;
        resp.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| BackendError::Permanent {
                kind,
                name: name.to_string(),
                op: "look up",
                error: std::io::Error::other("the answer has no Content-Length"),
            })
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>, BackendError> {
        let folder = folder_of(&self.options.prefix, kind);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, self.creds());
            action.with_prefix(folder.as_str());
            action.with_max_keys(LIST_PAGE);
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let resp = self.send(
                kind,
                &folder,
                "list",
                self.http.get(action.sign(SIGNATURE_LIFETIME)),
            )?;
            let body = resp
                .text()
                .map_err(|e| transport(kind, &folder, "list", e))?;
            let page = parse_listing(&body).map_err(|e| BackendError::Permanent {
                kind,
                name: folder.clone(),
                op: "list",
                error: std::io::Error::other(format!("unreadable listing: {e}")),
            })?;
            for (key, size) in page.objects {
                let key = percent_decode(&key);
                if kind == Kind::Config && key != self.key(Kind::Config, "config") {
                    continue;
                }
                if let Some(name) = name_of_key(&self.options.prefix, kind, &key) {
                    out.push((name, size));
                }
            }
            match page.next {
                Some(t) if page.truncated && !t.is_empty() => token = Some(t),
                _ if page.truncated => {
                    return Err(BackendError::Permanent {
                        kind,
                        name: folder.clone(),
                        op: "list",
                        error: std::io::Error::other(
                            "the listing is truncated but gives no continuation token",
                        ),
                    })
                }
                _ => break,
            }
        }
        Ok(out)
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), BackendError> {
        // S3 answers a DELETE of a missing key with success: look first,
        // so that removing a missing object is NotFound as everywhere.
        self.stat(kind, name)?;
        let key = self.key(kind, name);
        let action = DeleteObject::new(&self.bucket, self.creds(), &key);
        self.send(
            kind,
            name,
            "remove",
            self.http.delete(action.sign(SIGNATURE_LIFETIME)),
        )?;
        Ok(())
    }

    fn buffers_new_objects(&self) -> bool {
        true
    }

    fn parallel_requests(&self) -> Option<usize> {
        Some(self.options.connections)
    }
}

fn short(kind: Kind, name: &str, offset: u64, len: usize) -> BackendError {
    BackendError::Permanent {
        kind,
        name: name.to_string(),
        op: "read",
        error: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the object ends before byte {}", offset + len as u64),
        ),
    }
}

fn read_failed(kind: Kind, name: &str, e: std::io::Error) -> BackendError {
    BackendError::Transient {
        kind,
        name: name.to_string(),
        op: "read",
        error: e,
    }
}

/// Reads until `buf` is full or the stream ends; the count read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Decodes `%XX` escapes (listings are asked for with encoding-type=url).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("s3://127.0.0.1:9000/bucket/a/b/", false).unwrap();
        assert_eq!(u.endpoint.as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(u.bucket, "bucket");
        assert_eq!(u.prefix, "a/b");
        let u = parse_url("s3://bucket", false).unwrap();
        assert_eq!(
            (u.endpoint, u.bucket.as_str(), u.prefix.as_str()),
            (None, "bucket", "")
        );
        let u = parse_url("s3://s3.example.com/bucket/x", false).unwrap();
        assert_eq!(u.endpoint.as_deref(), Some("s3.example.com"));
        // With --s3-endpoint the first component is the bucket.
        let u = parse_url("s3://my.bucket/x", true).unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("my.bucket", "x"));
        for bad in [
            "s3://",
            "s3://host:9000",
            "s3://Bucket_Upper/x",
            "s3://bucket/x?y=1",
            "s3://key:secret@host/bucket",
            "s3://bucket/pre fix",
            "file:///x",
        ] {
            assert!(parse_url(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_and_listing_names() {
        let name = "ab".repeat(32);
        assert_eq!(
            key_of("p/q", Kind::Pack, &name),
            format!("p/q/data/ab/{name}")
        );
        assert_eq!(key_of("", Kind::Snapshot, "s"), "snapshots/s");
        assert_eq!(key_of("p", Kind::Config, "config"), "p/config");
        assert_eq!(
            name_of_key("p", Kind::Pack, &format!("p/data/ab/{name}")),
            Some(name.clone())
        );
        assert_eq!(name_of_key("p", Kind::Pack, "p/data/abc/x"), None);
        assert_eq!(name_of_key("p", Kind::Pack, "p/data/x"), None);
        assert_eq!(
            name_of_key("p", Kind::Lock, "p/locks/l1"),
            Some("l1".into())
        );
        assert_eq!(name_of_key("p", Kind::Lock, "p/locks/a/b"), None);
        assert_eq!(name_of_key("p", Kind::Lock, "q/locks/l1"), None);
    }

    #[test]
    fn credentials_env_then_file() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AK".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("SK".to_string()),
            _ => None,
        };
        let c = credentials(&CredentialSources {
            env: &env,
            shared_file: None,
        })
        .unwrap();
        assert_eq!((c.key(), c.secret(), c.token()), ("AK", "SK", None));
        let half = |k: &str| (k == "AWS_ACCESS_KEY_ID").then(|| "AK".to_string());
        let e = credentials(&CredentialSources {
            env: &half,
            shared_file: None,
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("AWS_SECRET_ACCESS_KEY is set but")
                || e.to_string().contains("AWS_SECRET_ACCESS_KEY is not")
        );
        let file = "[default]\naws_access_key_id = D1\naws_secret_access_key=D2\n\n[other]\naws_access_key_id=O1\naws_secret_access_key = O2\naws_session_token = T\n";
        let profile = |k: &str| (k == "AWS_PROFILE").then(|| "other".to_string());
        let c = credentials(&CredentialSources {
            env: &profile,
            shared_file: Some(("creds".into(), file.into())),
        })
        .unwrap();
        assert_eq!((c.key(), c.secret(), c.token()), ("O1", "O2", Some("T")));
        let none = |_: &str| None;
        let c = credentials(&CredentialSources {
            env: &none,
            shared_file: Some(("creds".into(), file.into())),
        })
        .unwrap();
        assert_eq!(c.key(), "D1");
        let missing = |k: &str| (k == "AWS_PROFILE").then(|| "nope".to_string());
        let e = credentials(&CredentialSources {
            env: &missing,
            shared_file: Some(("creds".into(), file.into())),
        })
        .unwrap_err();
        assert!(e.to_string().contains("[nope]"), "{e}");
        // The secret never appears in a Debug of the options' credentials.
        assert!(credentials(&CredentialSources {
            env: &none,
            shared_file: None
        })
        .is_err());
    }

    #[test]
    fn error_documents_and_classes() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>";
        let (code, msg) = error_document(body);
        assert_eq!(code.as_deref(), Some("SlowDown"));
        assert_eq!(msg.as_deref(), Some("Reduce your rate"));
        assert_eq!(classify(503, code.as_deref()), Class::Transient);
        assert_eq!(classify(404, Some("NoSuchKey")), Class::NotFound);
        assert_eq!(classify(404, None), Class::NotFound);
        assert_eq!(classify(404, Some("NoSuchBucket")), Class::Permanent);
        assert_eq!(classify(403, Some("AccessDenied")), Class::Permanent);
        assert_eq!(classify(400, Some("RequestTimeout")), Class::Transient);
        assert_eq!(classify(429, None), Class::Transient);
        assert_eq!(classify(400, None), Class::Permanent);
        assert_eq!(error_document("not xml"), (None, None));
    }

    #[test]
    fn listings_with_and_without_optional_elements() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>
<Contents><Key>p/locks/a&amp;b</Key><LastModified>2026-12-05T00:00:00.000Z</LastModified><ETag>"x"</ETag><Size>12</Size></Contents>
<Contents><Key>p/locks/c</Key><Size>0</Size></Contents>
<NextContinuationToken>tok&lt;1&gt;</NextContinuationToken></ListBucketResult>"#;
        let l = parse_listing(body).unwrap();
        assert_eq!(
            l.objects,
            vec![
                ("p/locks/a&b".to_string(), 12),
                ("p/locks/c".to_string(), 0)
            ]
        );
        assert!(l.truncated);
        assert_eq!(l.next.as_deref(), Some("tok<1>"));
        let empty =
            parse_listing("<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>")
                .unwrap();
        assert_eq!(empty, Listing::default());
        for bad in [
            "<Error><Code>x</Code></Error>",
            "<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>k</Key><Size>1</Size>",
            "<ListBucketResult><Contents><Key>a&bogus;</Key><Size>1</Size></Contents></ListBucketResult>",
        ] {
            assert!(parse_listing(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("abc"), "abc");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%é"), "%é");
    }
}
