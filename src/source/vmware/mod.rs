//! VMware vSphere as a source: the control path over vim25 SOAP (the
//! `vim-wire` codec), changed areas from `QueryChangedDiskAreas`, and the
//! bytes of the frozen base `-flat.vmdk` read with HTTP Range requests on
//! the datastore's `/folder` (no VDDK). sources-reference.md §1.
//!
//! - [`client`]: login (the `vmware_soap_session` cookie), calls, property
//!   reads, tasks, `/folder` Range reads; TLS verified and pinnable as for
//!   XenServer.
//! - [`folder`]: one disk's flat file as a [`crate::source::BlockSource`].
//! - [`workflow`]: one VM backup, from CBT check to snapshot removal, with
//!   a repository-side [`workflow::Committer`].

pub mod client;
pub mod data_command;
pub mod folder;
pub mod inventory;
pub mod range_get;
pub mod workflow;

use std::fmt;

/// Why a vSphere call or transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum VmwareError {
    /// The URL or an option is not usable (why).
    #[error("{0}")]
    Invalid(String),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server's certificate was refused.
    #[error("{host}: {refused}")]
    CertificateRefused {
        host: String,
        refused: Box<::nbd::tls::CertificateRefused>,
    },
    /// The connection failed or broke.
    #[error("{host}: {reason}")]
    Transport { host: String, reason: String },
    /// An HTTP status that is not the expected one.
    #[error("{what}: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Http {
        what: String,
        status: u16,
        body: String,
    },
    /// The host answered a vim25 fault.
    #[error("{call}: {fault}")]
    Fault {
        call: String,
        fault: Box<vim_wire::Fault>,
    },
    /// A task ended in error.
    #[error("{call}: the task failed: {reason}")]
    TaskFailed {
        call: String,
        /// The vim25 fault type, e.g. `FileFault`.
        fault_type: Option<String>,
        reason: String,
    },
    /// An answer that does not decode or says something impossible.
    #[error("{what}: {reason}")]
    Protocol { what: String, reason: String },
    /// The host ignored a Range request (a whole-file answer is never
    /// taken for a part).
    #[error("GET {path}: the host ignored the Range request (HTTP 200 with the whole file); cbtvault never reads a whole disk file in place of its changed areas")]
    RangeIgnored { path: String },
}

impl VmwareError {
    /// The vim25 fault type of a fault or failed task (`FileFault`, ...).
    pub fn fault_type(&self) -> Option<String> {
        match self {
            VmwareError::Fault { fault, .. } => fault
                .detail
                .as_ref()
                .map(|d| d.type_name().to_string())
                .or_else(|| Some(fault.code.clone())),
            VmwareError::TaskFailed { fault_type, .. } => fault_type.clone(),
            _ => None,
        }
    }
}

/// `vmware://[USER@]HOST[:PORT]/vm/ID`: ID is a managed object id
/// (`vm-42`), an instance or BIOS uuid, or an inventory path
/// (`ha-datacenter/vm/web01`, `/` kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmwareUrl {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
    pub vm: String,
}

impl VmwareUrl {
    pub fn is_vmware(text: &str) -> bool {
        text.starts_with("vmware://")
    }

    pub fn parse(text: &str) -> Result<VmwareUrl, VmwareError> {
        let shown = crate::source::xenapi::redact(text);
        let bad = |why: &str| {
            VmwareError::Invalid(format!(
                "'{shown}' is not a vSphere source ({why}); expected vmware://[USER@]HOST[:PORT]/vm/ID"
            ))
        };
        let (url, user, host) = parse_head(text).map_err(|why| bad(&why))?;
        let path = url.path();
        let vm = path
            .strip_prefix("/vm/")
            .ok_or_else(|| bad("the path must be /vm/ID"))?;
        let vm: String = url::form_urlencoded::parse(format!("v={vm}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let vm = vm.trim_end_matches('/').to_string();
        if vm.is_empty() {
            return Err(bad("no VM id"));
        }
        Ok(VmwareUrl {
            user,
            host,
            port: url.port().unwrap_or(443),
            vm,
        })
    }

    /// `HOST:PORT`.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for VmwareUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vmware://{}/vm/{}", self.authority(), self.vm)
    }
}

/// A `vmware://[USER@]HOST[:PORT]/...` URL, its user and its host; the
/// reason when it is not one (a password in it is refused).
pub(crate) fn parse_head(text: &str) -> Result<(url::Url, Option<String>, String), String> {
    let url = url::Url::parse(text).map_err(|e| e.to_string())?;
    if url.scheme() != "vmware" {
        return Err("scheme is not vmware".into());
    }
    let (user, host) = crate::source::url_user_host(
        &url,
        "use --vmware-password-file or CBTVAULT_VMWARE_PASSWORD",
    )?;
    Ok((url, user, host))
}

/// Whether `text` looks like a uuid (8-4-4-4-12 hex).
pub(crate) fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u =
            VmwareUrl::parse("vmware://admin%40vsphere.local@vc.example:8443/vm/vm-42").unwrap();
        assert_eq!(u.user.as_deref(), Some("admin@vsphere.local"));
        assert_eq!(
            (u.host.as_str(), u.port, u.vm.as_str()),
            ("vc.example", 8443, "vm-42")
        );
        assert_eq!(u.to_string(), "vmware://vc.example:8443/vm/vm-42");
        let p = VmwareUrl::parse("vmware://esx/vm/ha-datacenter/vm/web%2001").unwrap();
        assert_eq!((p.port, p.vm.as_str()), (443, "ha-datacenter/vm/web 01"));
        for bad in [
            "vmware://u:pw@esx/vm/vm-1",
            "vmware://esx/vdi/x",
            "vmware://esx/vm/",
            "xen://esx/vm/vm-1",
        ] {
            assert!(VmwareUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(is_uuid("4203d8a6-0a2e-4d0b-9c65-0c3bd3a0ad5e") && !is_uuid("vm-42"));
    }
}
