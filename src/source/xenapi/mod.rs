//! XenServer as a source: the XenAPI control plane (JSON-RPC v2 over HTTPS,
//! XML-RPC as the fallback for hosts without `/jsonrpc`), the HTTP handlers
//! (`/export_raw_vdi`, `/export_metadata`), NBD reads of a snapshot as
//! `VDI.get_nbd_info` describes them, and the CBT backup workflow.
//! Names, arguments, wire forms and error codes follow
//! ../shared/xenapi-reference.md. Never imports the repository modules: the
//! workflow hands each frozen disk to a caller-supplied committer.

pub mod client;
pub mod import;
pub mod inventory;
pub mod landmarks;
pub mod nbd;
pub mod pool;
pub mod tls;
pub mod workflow;

pub use client::{Client, ClientOptions, Credentials, Password, Session};
pub use tls::HttpsTrust;

/// A XenAPI or transport failure, matchable by code.
#[derive(Debug, thiserror::Error)]
pub enum XenApiError {
    /// The host answered the call with `[code, params...]` (reference §2.1).
    #[error("XenAPI {method}: {code} {params:?}")]
    Api {
        method: String,
        code: String,
        params: Vec<String>,
    },
    /// The HTTPS request did not get an answer (connection, TLS, timeout).
    #[error("XenAPI: cannot reach '{host}': {reason}")]
    Transport { host: String, reason: String },
    /// An HTTP status other than the expected one.
    #[error("XenAPI: {what}: HTTP {status}")]
    Http { what: String, status: u16 },
    /// An answer that is not what the protocol says.
    #[error("XenAPI: {what}: malformed answer: {reason}")]
    Protocol { what: String, reason: String },
    /// The host's certificate was refused: why, what it presented, and
    /// which options would trust it.
    #[error("XenAPI: the certificate of '{host}' is refused: {refused}; {}", tls::advice(.refused))]
    CertificateRefused {
        host: String,
        refused: Box<::nbd::tls::CertificateRefused>,
    },
    /// The host in the URL is a pool member and the master it named
    /// presented a certificate this command does not trust.
    #[error("XenAPI: '{member}' is a pool member and its master '{master}' presented a certificate that is refused: {refused}; trust the master's certificate as well (--fingerprint {fp} beside the member's, once per host, or a --ca-file that issued both), or connect to the master", fp = .refused.fingerprint)]
    MasterCertificateRefused {
        member: String,
        master: String,
        refused: Box<::nbd::tls::CertificateRefused>,
    },
    /// TLS or certificate setup.
    #[error("XenAPI TLS: {0}")]
    Tls(String),
    /// Bad input from our side (URL, options).
    #[error("{0}")]
    Invalid(String),
    /// Local I/O (spooling an export, reading a file).
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl XenApiError {
    /// The API error code, when the host gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            XenApiError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn is_code(&self, wanted: &str) -> bool {
        self.code() == Some(wanted)
    }
}

/// `text` with any `user:secret@` userinfo shown as `user:***@`, so that
/// a password typed into a URL by mistake is never echoed.
pub(crate) fn redact(text: &str) -> String {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_string();
    };
    let rest = &text[start..];
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &text[..start], &rest[..colon], &rest[at..]),
            None => text.to_string(),
        },
        None => text.to_string(),
    }
}

/// What a `xen://` source names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenObject {
    Vdi,
    Vm,
}

/// `xen://[USER@]HOST[:PORT]/vdi/UUID` or `xen://[USER@]HOST[:PORT]/vm/UUID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenUrl {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
    pub object: XenObject,
    pub uuid: String,
}

impl XenUrl {
    pub fn is_xen(text: &str) -> bool {
        text.starts_with("xen://")
    }

    pub fn parse(text: &str) -> Result<XenUrl, XenApiError> {
        let shown = redact(text);
        let bad = |why: &str| {
            XenApiError::Invalid(format!(
                "'{shown}' is not a XenServer source ({why}); expected xen://[USER@]HOST[:PORT]/vdi/UUID or .../vm/UUID"
            ))
        };
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "xen" {
            return Err(bad("scheme is not xen"));
        }
        let (user, host) =
            crate::source::url_user_host(&url, "use --xen-password-file or CBTVAULT_XEN_PASSWORD")
                .map_err(|why| bad(&why))?;
        let segments: Vec<&str> = url
            .path_segments()
            .map(|s| s.filter(|x| !x.is_empty()).collect())
            .unwrap_or_default();
        let (object, uuid) = match segments.as_slice() {
            ["vdi", uuid] => (XenObject::Vdi, *uuid),
            ["vm", uuid] => (XenObject::Vm, *uuid),
            _ => return Err(bad("the path must be /vdi/UUID or /vm/UUID")),
        };
        let uuid_ok = uuid.len() == 36 && uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if !uuid_ok {
            return Err(bad(&format!("'{uuid}' is not a uuid")));
        }
        Ok(XenUrl {
            user,
            host,
            port: url.port().unwrap_or(443),
            object,
            uuid: uuid.to_ascii_lowercase(),
        })
    }

    /// `HOST:PORT` as used in identities and `https://` URLs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL as the user would type it again: `xen://HOST:PORT/vm/UUID`
    /// or `.../vdi/UUID` (no user, no password).
    pub fn shown(&self) -> String {
        format!(
            "xen://{}/{}/{}",
            self.authority(),
            match self.object {
                XenObject::Vdi => "vdi",
                XenObject::Vm => "vm",
            },
            self.uuid
        )
    }

    /// The identity of one disk of this host, shared by VDI and VM backups
    /// so that either finds the other's parent.
    pub fn disk_identity(&self, vdi_uuid: &str) -> String {
        format!("xen://{}/vdi/{vdi_uuid}", self.authority())
    }

    /// The identity of a VM's metadata export.
    pub fn vm_metadata_identity(&self, vm_uuid: &str) -> String {
        format!("xen://{}/vm/{vm_uuid}/metadata", self.authority())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u =
            XenUrl::parse("xen://root@host.example:8443/vdi/0F0E0D0C-0000-4000-8000-000000000001")
                .unwrap();
        assert_eq!(u.user.as_deref(), Some("root"));
        assert_eq!(u.host, "host.example");
        assert_eq!(u.port, 8443);
        assert_eq!(u.object, XenObject::Vdi);
        assert_eq!(u.uuid, "0f0e0d0c-0000-4000-8000-000000000001");
        let v = XenUrl::parse("xen://10.0.0.1/vm/0f0e0d0c-0000-4000-8000-000000000001").unwrap();
        assert_eq!((v.port, v.object, v.user), (443, XenObject::Vm, None));
        assert!(XenUrl::parse("xen://u:pw@h/vdi/0f0e0d0c-0000-4000-8000-000000000001").is_err());
        assert!(XenUrl::parse("xen://h/sr/0f0e0d0c-0000-4000-8000-000000000001").is_err());
        assert!(XenUrl::parse("xen://h/vdi/nope").is_err());
        let e = XenUrl::parse("xen://u:hunter2@h/vdi/x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
