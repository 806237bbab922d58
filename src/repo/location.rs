//! Where a repository lives: a local folder or an S3 bucket prefix, parsed
//! from the `-r` argument. A URL with a scheme cbtvault does not support
//! is refused, never taken for a folder name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusty_s3::UrlStyle;
use url::Url;

use super::RepoError;
use crate::backend::retry::{RetryBackend, RetryPolicy};
use crate::backend::s3::{self, S3Backend, S3Error, S3Options, S3Url};
use crate::backend::Backend;

/// How S3 requests are addressed when the URL alone does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Style {
    /// `https://ENDPOINT/BUCKET/KEY` (MinIO, most self-hosted servers).
    Path,
    /// `https://BUCKET.ENDPOINT/KEY` (AWS).
    VirtualHost,
}

/// The S3 settings given beside the URL (`--s3-*` options, environment).
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// `https://host[:port]`, `http://...` (plain, only when written so),
    /// or `host[:port]` (HTTPS).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub style: Option<S3Style>,
    /// PEM certificate authorities to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
}

/// A repository's place.
#[derive(Debug, Clone)]
pub enum Location {
    Local(PathBuf),
    S3 {
        /// The argument as given.
        text: String,
        url: S3Url,
        settings: S3Settings,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { text, .. } => f.write_str(text),
        }
    }
}

impl Location {
    /// Parses `-r`: `s3://...`, or a local path. Any other `scheme://`
    /// (and restic's `s3:host/...` spelling) is refused.
    pub fn parse(text: &str, settings: &S3Settings) -> Result<Location, RepoError> {
        let unsupported = |scheme: &str| {
            RepoError::Invalid(format!(
                "repository '{text}': cbtvault does not support '{scheme}' repositories; give a local folder or s3://[ENDPOINT/]BUCKET[/PREFIX]"
            ))
        };
        if let Some((scheme, _)) = text.split_once("://") {
            if !scheme.contains('/') {
                return match scheme {
                    "s3" => Ok(Location::S3 {
                        text: text.to_string(),
                        url: s3::parse_url(text, settings.endpoint.is_some())?,
                        settings: settings.clone(),
                    }),
                    other => Err(unsupported(&format!("{other}://"))),
                };
            }
        }
        for restic in [
            "s3:", "sftp:", "rest:", "b2:", "azure:", "gs:", "swift:", "rclone:",
        ] {
            if text.starts_with(restic) {
                return Err(RepoError::Invalid(format!(
                    "repository '{text}' looks like a restic location; cbtvault takes a local folder or s3://[ENDPOINT/]BUCKET[/PREFIX] (write './{text}' for a folder of that name)"
                )));
            }
        }
        Ok(Location::Local(PathBuf::from(text)))
    }

    /// The local folder, when it is one.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            Location::S3 { .. } => None,
        }
    }

    /// The S3 backend (not yet wrapped for retries), for S3 locations.
    pub(crate) fn s3_backend(&self) -> Result<Option<S3Backend>, RepoError> {
        let Location::S3 { url, settings, .. } = self else {
            return Ok(None);
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = settings
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        let endpoint_text = settings
            .endpoint
            .clone()
            .or_else(|| url.endpoint.clone())
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("s3.{region}.amazonaws.com"));
        let endpoint = endpoint_url(&endpoint_text)?;
        let style = match settings.style {
            Some(S3Style::Path) => UrlStyle::Path,
            Some(S3Style::VirtualHost) => UrlStyle::VirtualHost,
            None => {
                let aws = endpoint
                    .host_str()
                    .is_some_and(|h| h.ends_with(".amazonaws.com"));
                if aws && !url.bucket.contains('.') {
                    UrlStyle::VirtualHost
                } else {
                    UrlStyle::Path
                }
            }
        };
        let shared_file = {
            let path = env("AWS_SHARED_CREDENTIALS_FILE")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
            path.and_then(|p| {
                std::fs::read_to_string(&p)
                    .ok()
                    .map(|t| (p.display().to_string(), t))
            })
        };
        let credentials = s3::credentials(&s3::CredentialSources {
            env: &env,
            shared_file,
        })?;
        let ca_file = settings
            .ca_file
            .clone()
            .or_else(|| env("CBTVAULT_S3_CA_FILE").map(PathBuf::from));
        let ca_pem = match ca_file {
            Some(p) => Some(std::fs::read(&p).map_err(|source| RepoError::Io {
                what: format!("read the S3 CA file '{}'", p.display()),
                source,
            })?),
            None => None,
        };
        let request_timeout = Duration::from_secs(
            env("CBTVAULT_S3_TIMEOUT_SECS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(300),
        );
        Ok(Some(S3Backend::new(S3Options {
            endpoint,
            bucket: url.bucket.clone(),
            prefix: url.prefix.clone(),
            region,
            style,
            credentials,
            ca_pem,
            request_timeout,
            // CBTVAULT_S3_PART_SIZE (bytes, at least S3's 5 MiB minimum)
            // lowers both, for tests of multipart uploads.
            multipart_threshold: part_size_override().unwrap_or(s3::MULTIPART_THRESHOLD),
            part_size: part_size_override().unwrap_or(s3::PART_SIZE),
            connections: env("CBTVAULT_S3_CONNECTIONS")
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or(s3::CONNECTIONS)
                .min(64),
        })?))
    }

    /// The backend for a remote location, retrying transient failures.
    pub fn remote_backend(&self) -> Result<Option<Arc<dyn Backend>>, RepoError> {
        Ok(self.s3_backend()?.map(|b| {
            Arc::new(RetryBackend::new(Arc::new(b), RetryPolicy::from_env())) as Arc<dyn Backend>
        }))
    }
}

fn part_size_override() -> Option<usize> {
    std::env::var("CBTVAULT_S3_PART_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|n| n.max(5 << 20))
}

/// `host[:port]` as HTTPS; `https://...` as given; `http://...` as given
/// (plain HTTP is never chosen, only accepted when written).
fn endpoint_url(text: &str) -> Result<Url, RepoError> {
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("https://{text}")
    };
    let bad = |reason: String| {
        RepoError::from(S3Error::Endpoint {
            endpoint: text.to_string(),
            reason,
        })
    };
    let url = Url::parse(&with_scheme).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(bad("the scheme must be https:// (or http://)".into()));
    }
    if url.host_str().is_none() {
        return Err(bad("names no host".into()));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(bad(
            "must be only scheme, host and port; the bucket and prefix go in the s3:// URL".into(),
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        let none = S3Settings::default();
        assert!(matches!(
            Location::parse("/srv/repo", &none).unwrap(),
            Location::Local(_)
        ));
        assert!(matches!(
            Location::parse("rel/dir", &none).unwrap(),
            Location::Local(_)
        ));
        assert!(matches!(
            Location::parse("s3://bucket/p", &none).unwrap(),
            Location::S3 { .. }
        ));
        for bad in [
            "sftp://host/x",
            "http://host/x",
            "file:///x",
            "S3://bucket",
            "s3:host/bucket",
            "rest:http://host/",
        ] {
            let e = Location::parse(bad, &none).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        // A folder whose name merely holds "://" after a slash is a path.
        assert!(matches!(
            Location::parse("./a://b", &none).unwrap(),
            Location::Local(_)
        ));
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint_url("minio.lan:9000").unwrap().as_str(),
            "https://minio.lan:9000/"
        );
        assert_eq!(
            endpoint_url("http://127.0.0.1:5000").unwrap().scheme(),
            "http"
        );
        assert!(endpoint_url("ftp://x").is_err());
        assert!(endpoint_url("https://x/bucket").is_err());
    }
}
