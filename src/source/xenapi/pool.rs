//! Pool members reached directly. An HTTP handler on a host that does not
//! see the VDI's SR answers 302 to one that does (reference §3.1, §3.2),
//! and an import is best sent straight to such a host, since its body
//! cannot be sent twice. A member is trusted through the verified session:
//! its certificate is the one the master gives for it
//! (`host.get_server_certificate`), pinned by digest, never whatever the
//! redirect's target presents; a redirect to an address that is no host of
//! the pool is refused. (`HOST_IS_SLAVE` at login is the client's: there is
//! no session yet, so the master must pass the user's own trust.)

use std::sync::Arc;

use super::client::{
    authority, boolean, http_client, refs, string_value, text, transport_error, Session,
};
use super::tls::{client_config, HttpsTrust};
use super::XenApiError;

/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 3;

/// One host's HTTPS endpoint and the trust to use for it.
pub struct Endpoint {
    /// Address or name, no port.
    pub host: String,
    pub port: u16,
    /// `HOST:PORT`, for the `Host:` header and messages.
    pub authority: String,
    pub tls: Arc<rustls::ClientConfig>,
}

/// One host of the pool as its record gives it.
struct PoolHost {
    reference: String,
    address: String,
    hostname: String,
}

impl PoolHost {
    fn is(&self, name: &str) -> bool {
        let name = name.trim_start_matches('[').trim_end_matches(']');
        self.address.eq_ignore_ascii_case(name) || self.hostname.eq_ignore_ascii_case(name)
    }
}

impl Session {
    fn pool_hosts(&self) -> Result<Vec<PoolHost>, XenApiError> {
        let what = "host.get_all_records";
        let all = self.call(what, &[])?;
        let all = all.as_struct().ok_or_else(|| XenApiError::Protocol {
            what: what.into(),
            reason: "not a struct".into(),
        })?;
        all.iter()
            .map(|(reference, rec)| {
                let rec = rec.as_struct().ok_or_else(|| XenApiError::Protocol {
                    what: what.into(),
                    reason: format!("record of {reference} is not a struct"),
                })?;
                Ok(PoolHost {
                    reference: reference.clone(),
                    address: text(what, rec, "address")?,
                    hostname: text(what, rec, "hostname").unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The host answering now, with the user's trust.
    pub fn current_endpoint(&self) -> Result<Endpoint, XenApiError> {
        let host = self.client().host();
        let port = self.client().options.port;
        Ok(Endpoint {
            authority: authority(&host, port),
            tls: Arc::new(client_config(&self.client().options.trust)?),
            host,
            port,
        })
    }

    /// The pool member `name` (its address or host name) at `port`, pinned
    /// to the certificate the master gives for it.
    pub fn member_endpoint(&self, name: &str, port: u16) -> Result<Endpoint, XenApiError> {
        let hosts = self.pool_hosts()?;
        let host = hosts.iter().find(|h| h.is(name)).ok_or_else(|| {
            XenApiError::Invalid(format!(
                "the pool sent this request to '{name}', which is no host of the pool: refused"
            ))
        })?;
        self.pinned_endpoint(host, name, port)
    }

    /// `host`, reached as `name` at `port`, pinned to the certificate the
    /// master gives for it.
    fn pinned_endpoint(
        &self,
        host: &PoolHost,
        name: &str,
        port: u16,
    ) -> Result<Endpoint, XenApiError> {
        let pem = string_value(
            "host.get_server_certificate",
            self.call(
                "host.get_server_certificate",
                &[host.reference.clone().into()],
            )?,
        )?;
        let certs = ::nbd::tls::certs_from_pem(pem.as_bytes(), "host.get_server_certificate")
            .map_err(|e| {
                XenApiError::Tls(format!("the certificate of pool member '{name}': {e}"))
            })?;
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, certs[0].as_ref())
            .as_ref()
            .try_into()
            .map_err(|_| XenApiError::Tls("SHA-256 digest length".into()))?;
        let host_name = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Endpoint {
            authority: authority(&host_name, port),
            tls: Arc::new(client_config(&HttpsTrust::Fingerprint(vec![digest]))?),
            host: host_name,
            port,
        })
    }

    /// Where to send an HTTP handler's request for `vdi` (a ref): the host
    /// answering now if it sees the VDI's SR (or if no host does: the
    /// handler then says why), else the first host that does, so that no
    /// body is sent to a host that would redirect it.
    pub fn endpoint_for_vdi(&self, vdi: &str) -> Result<Endpoint, XenApiError> {
        let sr = string_value("VDI.get_SR", self.call("VDI.get_SR", &[vdi.into()])?)?;
        let mut seeing = Vec::new();
        for pbd in refs("SR.get_PBDs", self.call("SR.get_PBDs", &[sr.into()])?)? {
            let attached = self.call("PBD.get_currently_attached", &[pbd.clone().into()])?;
            if boolean("PBD.get_currently_attached", &attached)? {
                seeing.push(string_value(
                    "PBD.get_host",
                    self.call("PBD.get_host", &[pbd.into()])?,
                )?);
            }
        }
        let current = self.client().host();
        let hosts = self.pool_hosts()?;
        let seeing: Vec<&PoolHost> = hosts
            .iter()
            .filter(|h| seeing.contains(&h.reference))
            .collect();
        match seeing.first() {
            Some(first) if !seeing.iter().any(|h| h.is(&current)) => {
                self.pinned_endpoint(first, &first.address, self.client().options.port)
            }
            _ => self.current_endpoint(),
        }
    }

    /// GET `url` (a handler URL on the host answering now), following up
    /// to [`MAX_REDIRECTS`] redirects to pool members; anything but 200 at
    /// the end is an error.
    pub(super) fn get_following_redirects(
        &self,
        what: &str,
        mut url: String,
    ) -> Result<reqwest::blocking::Response, XenApiError> {
        let mut http = self.client().http.clone();
        let mut host = authority(&self.client().host(), self.client().options.port);
        let mut hops = 0;
        loop {
            let resp = http
                .get(&url)
                .send()
                .map_err(|e| transport_error(host.clone(), e))?;
            let status = resp.status().as_u16();
            if status == 200 {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match location {
                Some(location) if resp.status().is_redirection() && hops < MAX_REDIRECTS => {
                    hops += 1;
                    let target = url::Url::parse(&location).map_err(|e| XenApiError::Protocol {
                        what: what.into(),
                        reason: format!("HTTP {status} to an address that is not a URL: {e}"),
                    })?;
                    let name = match (target.scheme(), target.host_str()) {
                        ("https", Some(name)) => name.to_string(),
                        _ => {
                            return Err(XenApiError::Protocol {
                                what: what.into(),
                                reason: format!(
                                    "HTTP {status} to '{}://{}': only https to a pool member is followed",
                                    target.scheme(),
                                    target.host_str().unwrap_or("")
                                ),
                            })
                        }
                    };
                    let member = self.member_endpoint(&name, target.port().unwrap_or(443))?;
                    http = http_client((*member.tls).clone())?;
                    host = member.authority;
                    url = location;
                }
                _ => {
                    return Err(XenApiError::Http {
                        what: what.into(),
                        status,
                    })
                }
            }
        }
    }
}
