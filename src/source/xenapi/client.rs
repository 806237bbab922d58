//! The XenAPI client: JSON-RPC v2 on `POST /jsonrpc`, falling back to
//! XML-RPC on `POST /` when the host has no JSON-RPC (404, old hosts);
//! errors become [`XenApiError::Api`] with the host's code and parameters
//! (reference §1.2-1.3). A [`Session`] logs out when dropped, so every exit
//! path ends the session. The password lives only in [`Password`], which
//! never prints, and is never put in a URL or an error.
//!
//! The pure encoders and decoders are the `xapi-wire` crate's, shared with
//! the simulator: one codec for both ends of the wire.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use xapi_wire::{jsonrpc, xmlrpc, Value, WireError};

use super::tls::{client_config, HttpsTrust};
use super::XenApiError;

/// A password that never shows in `Debug` or `Display`.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Password {
        Password(text.into())
    }

    /// Reads a password file: the first line, without its line ending.
    pub fn from_file(path: &std::path::Path) -> Result<Password, XenApiError> {
        let text = std::fs::read_to_string(path).map_err(|source| XenApiError::Io {
            what: format!("read password file '{}'", path.display()),
            source,
        })?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(XenApiError::Invalid(format!(
                "password file '{}' is empty",
                path.display()
            )));
        }
        Ok(Password(line.to_string()))
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<hidden>)")
    }
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Password,
}

/// Where and how to reach the host.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub host: String,
    pub port: u16,
    pub trust: HttpsTrust,
    /// Per RPC call (not for streamed exports).
    pub call_timeout: Duration,
    /// `originator` of session.login_with_password.
    pub originator: String,
}

impl ClientOptions {
    pub fn new(host: &str, port: u16, trust: HttpsTrust) -> ClientOptions {
        ClientOptions {
            host: host.to_string(),
            port,
            trust,
            call_timeout: Duration::from_secs(600),
            originator: "cbtvault".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    JsonRpc,
    XmlRpc,
}

/// An HTTPS connection to one host, before login.
pub struct Client {
    pub(super) http: reqwest::blocking::Client,
    pub(super) options: ClientOptions,
    /// The host answering (changes after `HOST_IS_SLAVE`).
    host: Mutex<String>,
    wire: Mutex<Wire>,
    next_id: AtomicU64,
}

/// Largest RPC answer accepted (a VDI record list of a big pool is far less).
const MAX_RPC_BYTES: u64 = 64 << 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A transport error talking to `host`, without the URL (it may carry a
/// session id): a refused certificate says why, other failures give
/// their chain of causes.
pub(super) fn transport_error(host: String, e: reqwest::Error) -> XenApiError {
    let e = e.without_url();
    if let Some(refused) = ::nbd::tls::refusal_in(&e) {
        return XenApiError::CertificateRefused {
            host,
            refused: Box::new(refused.clone()),
        };
    }
    if let Some(reason) = ::nbd::tls::failure_text(&e) {
        return XenApiError::Transport { host, reason };
    }
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    XenApiError::Transport { host, reason }
}

/// The HTTPS client for one host's trust. Redirects are not followed here:
/// the session follows them to pool members only, pinned (see `pool`).
pub(super) fn http_client(
    tls: rustls::ClientConfig,
) -> Result<reqwest::blocking::Client, XenApiError> {
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .timeout(None)
        .build()
        .map_err(|e| XenApiError::Tls(e.without_url().to_string()))
}

impl Client {
    pub fn new(options: ClientOptions) -> Result<Client, XenApiError> {
        let tls = client_config(&options.trust)?;
        let http = http_client(tls)?;
        Ok(Client {
            http,
            host: Mutex::new(options.host.clone()),
            options,
            wire: Mutex::new(Wire::JsonRpc),
            next_id: AtomicU64::new(1),
        })
    }

    /// The host currently answering (an address or name, no port).
    pub fn host(&self) -> String {
        lock(&self.host).clone()
    }

    /// `https://HOST:PORT`, of the host currently answering.
    pub fn base_url(&self) -> String {
        format!(
            "https://{}",
            authority(&lock(&self.host), self.options.port)
        )
    }

    pub fn wire(&self) -> Wire {
        *lock(&self.wire)
    }

    /// Forces XML-RPC (e.g. to test the fallback against a modern host).
    pub fn set_wire(&self, wire: Wire) {
        *lock(&self.wire) = wire;
    }

    fn transport(&self, e: reqwest::Error) -> XenApiError {
        transport_error(authority(&lock(&self.host), self.options.port), e)
    }

    fn read_body(
        &self,
        what: &str,
        resp: reqwest::blocking::Response,
    ) -> Result<Vec<u8>, XenApiError> {
        use std::io::Read;
        let mut body = Vec::new();
        resp.take(MAX_RPC_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| XenApiError::Protocol {
                what: what.to_string(),
                reason: format!("reading the answer: {e}"),
            })?;
        if body.len() as u64 > MAX_RPC_BYTES {
            return Err(XenApiError::Protocol {
                what: what.to_string(),
                reason: format!("answer larger than {MAX_RPC_BYTES} bytes"),
            });
        }
        Ok(body)
    }

    /// One call without any session handling; `params` as sent.
    pub fn rpc(&self, method: &str, params: &[Value]) -> Result<Value, XenApiError> {
        if self.wire() == Wire::JsonRpc {
            match self.rpc_json(method, params) {
                // No JSON-RPC on this host (older than 7.3): XML-RPC from now on.
                Err(XenApiError::Http { status: 404, .. }) => self.set_wire(Wire::XmlRpc),
                other => return other,
            }
        }
        self.rpc_xml(method, params)
    }

    fn api_error(method: &str, code: String, params: Vec<String>) -> XenApiError {
        XenApiError::Api {
            method: method.to_string(),
            code,
            params,
        }
    }

    fn rpc_json(&self, method: &str, params: &[Value]) -> Result<Value, XenApiError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = self.post_rpc(
            method,
            "JSON-RPC",
            "/jsonrpc",
            "application/json",
            jsonrpc::encode_request(id, method, params),
        )?;
        match jsonrpc::decode_response(&bytes) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Self::api_error(method, e.code, e.params)),
            Err(e) => Err(XenApiError::Protocol {
                what: method.to_string(),
                reason: match e {
                    WireError::JsonRpc(reason) => reason,
                    other => other.to_string(),
                },
            }),
        }
    }

    /// POSTs one RPC body and returns the response body of a 200 answer.
    fn post_rpc(
        &self,
        method: &str,
        wire: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, XenApiError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base_url()))
            .header("content-type", content_type)
            .timeout(self.options.call_timeout)
            .body(body)
            .send()
            .map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(XenApiError::Http {
                what: format!("{method} ({wire})"),
                status,
            });
        }
        self.read_body(method, resp)
    }

    fn rpc_xml(&self, method: &str, params: &[Value]) -> Result<Value, XenApiError> {
        let bytes = self.post_rpc(
            method,
            "XML-RPC",
            "/",
            "text/xml",
            xmlrpc::encode_call(method, params).into_bytes(),
        )?;
        let bad = |reason: String| XenApiError::Protocol {
            what: method.to_string(),
            reason,
        };
        let value = xmlrpc::decode_response(&bytes).map_err(|e| bad(e.to_string()))?;
        match xmlrpc::status_result(value).map_err(|e| bad(e.to_string()))? {
            Ok(v) => Ok(v),
            Err(e) => Err(Self::api_error(method, e.code, e.params)),
        }
    }

    /// `session.login_with_password`, following `HOST_IS_SLAVE` to the
    /// master once.
    pub fn login(self, credentials: Credentials) -> Result<Session, XenApiError> {
        let session = self.login_ref(&credentials)?;
        Ok(Session {
            client: self,
            credentials,
            session: Mutex::new(Some(session)),
        })
    }

    fn login_ref(&self, c: &Credentials) -> Result<String, XenApiError> {
        let params = [
            Value::str(&c.user),
            Value::str(c.password.expose()),
            Value::str("1.1"),
            Value::str(&self.options.originator),
        ];
        let method = "session.login_with_password";
        let result = match self.rpc(method, &params) {
            Err(XenApiError::Api {
                code, params: p, ..
            }) if code == "HOST_IS_SLAVE" => {
                let master = p.first().cloned().unwrap_or_default();
                if master.is_empty() {
                    return Err(Self::api_error(method, code, p));
                }
                let member = authority(&lock(&self.host), self.options.port);
                *lock(&self.host) = master;
                self.rpc(method, &params).map_err(|e| match e {
                    XenApiError::CertificateRefused { host, refused } => {
                        XenApiError::MasterCertificateRefused {
                            member,
                            master: host,
                            refused,
                        }
                    }
                    other => other,
                })
            }
            other => other,
        }?;
        match result {
            Value::String(s) if !s.is_empty() => Ok(s),
            other => Err(XenApiError::Protocol {
                what: method.into(),
                reason: format!("expected a session ref, got {other:?}"),
            }),
        }
    }
}

/// One entry of `VDI.get_nbd_info` (reference §2.6). `exportname` holds
/// the session: treat it as a secret.
#[derive(Clone)]
pub struct NbdInfo {
    pub address: String,
    pub port: u16,
    pub exportname: String,
    pub cert: String,
    pub subject: String,
}

impl std::fmt::Debug for NbdInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NbdInfo {{ address: {}, port: {}, subject: {} }}",
            self.address, self.port, self.subject
        )
    }
}

/// The VDI fields the workflow reads (reference §2.2).
#[derive(Debug, Clone)]
pub struct VdiRecord {
    pub uuid: String,
    pub name_label: String,
    pub virtual_size: u64,
    pub vdi_type: String,
    /// `None` on hosts without CBT (7.1 records lack the field).
    pub cbt_enabled: Option<bool>,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    /// `other_config` (string values only): carries the cbtvault marker.
    pub other_config: BTreeMap<String, String>,
}

/// The VBD fields the workflow reads.
#[derive(Debug, Clone)]
pub struct VbdRecord {
    pub vdi: String,
    pub vbd_type: String,
    pub userdevice: String,
}

/// What cleanup reads of a VM or VDI from `CLASS.get_all_records`.
#[derive(Debug, Clone)]
pub struct HostObject {
    pub reference: String,
    pub uuid: String,
    pub is_a_snapshot: bool,
    /// The VDI `type` (empty for a VM).
    pub vdi_type: String,
    /// `VBDs` (set of refs).
    pub vbds: Vec<String>,
    pub other_config: BTreeMap<String, String>,
}

/// The string entries of a map field (`other_config`); empty when absent.
pub(super) fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    match v {
        Some(Value::Struct(m)) => m
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A logged-in session; logs out when dropped.
pub struct Session {
    client: Client,
    credentials: Credentials,
    session: Mutex<Option<String>>,
}

fn field<'a>(
    what: &str,
    rec: &'a BTreeMap<String, Value>,
    name: &str,
) -> Result<&'a Value, XenApiError> {
    rec.get(name).ok_or_else(|| XenApiError::Protocol {
        what: what.to_string(),
        reason: format!("record lacks '{name}'"),
    })
}

pub(super) fn text(
    what: &str,
    rec: &BTreeMap<String, Value>,
    name: &str,
) -> Result<String, XenApiError> {
    match field(what, rec, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(XenApiError::Protocol {
            what: what.to_string(),
            reason: format!("'{name}' is not a string: {other:?}"),
        }),
    }
}

pub(super) fn int(what: &str, v: &Value) -> Result<i64, XenApiError> {
    v.as_int().ok_or_else(|| XenApiError::Protocol {
        what: what.to_string(),
        reason: format!("expected an int, got {v:?}"),
    })
}

pub(super) fn boolean(what: &str, v: &Value) -> Result<bool, XenApiError> {
    v.as_bool().ok_or_else(|| XenApiError::Protocol {
        what: what.to_string(),
        reason: format!("expected a bool, got {v:?}"),
    })
}

pub(super) fn string_value(what: &str, v: Value) -> Result<String, XenApiError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(XenApiError::Protocol {
            what: what.to_string(),
            reason: format!("expected a string, got {other:?}"),
        }),
    }
}

pub(super) fn refs(what: &str, v: Value) -> Result<Vec<String>, XenApiError> {
    match v {
        Value::Array(items) => items.into_iter().map(|i| string_value(what, i)).collect(),
        other => Err(XenApiError::Protocol {
            what: what.to_string(),
            reason: format!("expected an array, got {other:?}"),
        }),
    }
}

impl Session {
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The session ref (a secret: it authorises NBD and HTTP exports).
    pub fn session_ref(&self) -> Result<String, XenApiError> {
        lock(&self.session)
            .clone()
            .ok_or_else(|| XenApiError::Invalid("the XenAPI session was logged out".into()))
    }

    /// A session call: the session ref is prepended. `SESSION_INVALID`
    /// (an expired session) logs in again and retries once.
    pub fn call(&self, method: &str, args: &[Value]) -> Result<Value, XenApiError> {
        let mut retried = false;
        loop {
            let mut params = Vec::with_capacity(args.len() + 1);
            params.push(Value::String(self.session_ref()?));
            params.extend_from_slice(args);
            match self.client.rpc(method, &params) {
                Err(e) if e.is_code("SESSION_INVALID") && !retried => {
                    retried = true;
                    let fresh = self.client.login_ref(&self.credentials)?;
                    *lock(&self.session) = Some(fresh);
                }
                other => return other,
            }
        }
    }

    /// Ends the session now (also done on drop). Errors are ignored: the
    /// host expires sessions anyway.
    pub fn logout(&self) {
        if let Some(s) = lock(&self.session).take() {
            let _ = self.client.rpc("session.logout", &[Value::String(s)]);
        }
    }

    /// `QUERY&session_id=S`, form-encoded: an HTTP handler's query.
    pub(crate) fn handler_query(&self, query: &[(&str, &str)]) -> Result<String, XenApiError> {
        let session = self.session_ref()?;
        let mut pairs: Vec<(&str, &str)> = query.to_vec();
        pairs.push(("session_id", &session));
        Ok(url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish())
    }

    /// `BASE/PATH?QUERY&session_id=S`: an HTTP handler's URL.
    pub(super) fn handler_url(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<String, XenApiError> {
        let qs = self.handler_query(query)?;
        Ok(format!("{}{path}?{qs}", self.client.base_url()))
    }

    /// `GET PATH?QUERY&session_id=S` on the host, following redirects to
    /// pool members (see `pool`); anything but 200 is an error.
    pub fn http_get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<reqwest::blocking::Response, XenApiError> {
        let url = self.handler_url(path, query)?;
        self.get_following_redirects(&format!("GET {path}"), url)
    }

    /// A `PUT PATH?QUERY&session_id=S` request on the host, not yet sent
    /// (the caller attaches a streamed body and sends it, possibly from
    /// another thread).
    pub fn http_put_request(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<reqwest::blocking::RequestBuilder, XenApiError> {
        Ok(self.client.http.put(self.handler_url(path, query)?))
    }

    /// A transport error of this client, without the URL (it carries the
    /// session).
    pub fn transport_error(&self, e: reqwest::Error) -> XenApiError {
        self.client.transport(e)
    }

    // ---- typed calls (reference §2) ----

    /// The uuid of the pool the host belongs to (every host is in one).
    pub fn pool_uuid(&self) -> Result<Option<String>, XenApiError> {
        let pools = refs("pool.get_all", self.call("pool.get_all", &[])?)?;
        match pools.first() {
            Some(p) => Ok(Some(string_value(
                "pool.get_uuid",
                self.call("pool.get_uuid", &[p.clone().into()])?,
            )?)),
            None => Ok(None),
        }
    }

    pub fn vdi_by_uuid(&self, uuid: &str) -> Result<String, XenApiError> {
        string_value(
            "VDI.get_by_uuid",
            self.call("VDI.get_by_uuid", &[uuid.into()])?,
        )
    }

    pub fn vm_by_uuid(&self, uuid: &str) -> Result<String, XenApiError> {
        string_value(
            "VM.get_by_uuid",
            self.call("VM.get_by_uuid", &[uuid.into()])?,
        )
    }

    /// `VM.get_name_label`.
    pub fn vm_name_label(&self, vm: &str) -> Result<String, XenApiError> {
        string_value(
            "VM.get_name_label",
            self.call("VM.get_name_label", &[vm.into()])?,
        )
    }

    pub fn vdi_record(&self, vdi: &str) -> Result<VdiRecord, XenApiError> {
        let what = "VDI.get_record";
        let v = self.call(what, &[vdi.into()])?;
        let rec = v.as_struct().ok_or_else(|| XenApiError::Protocol {
            what: what.into(),
            reason: "not a struct".into(),
        })?;
        let size = int(what, field(what, rec, "virtual_size")?)?;
        Ok(VdiRecord {
            uuid: text(what, rec, "uuid")?,
            name_label: text(what, rec, "name_label").unwrap_or_default(),
            virtual_size: u64::try_from(size).map_err(|_| XenApiError::Protocol {
                what: what.into(),
                reason: format!("negative virtual_size {size}"),
            })?,
            vdi_type: text(what, rec, "type")?,
            cbt_enabled: rec
                .get("cbt_enabled")
                .map(|b| boolean(what, b))
                .transpose()?,
            is_a_snapshot: rec
                .get("is_a_snapshot")
                .map(|b| boolean(what, b))
                .transpose()?
                .unwrap_or(false),
            snapshot_of: text(what, rec, "snapshot_of").unwrap_or_default(),
            other_config: string_map(rec.get("other_config")),
        })
    }

    pub fn vdi_uuid(&self, vdi: &str) -> Result<String, XenApiError> {
        string_value("VDI.get_uuid", self.call("VDI.get_uuid", &[vdi.into()])?)
    }

    pub fn vdi_type(&self, vdi: &str) -> Result<String, XenApiError> {
        string_value("VDI.get_type", self.call("VDI.get_type", &[vdi.into()])?)
    }

    pub fn vdi_cbt_enabled(&self, vdi: &str) -> Result<bool, XenApiError> {
        let what = "VDI.get_cbt_enabled";
        boolean(what, &self.call(what, &[vdi.into()])?)
    }

    /// `VDI.enable_cbt`; returns once the host has enabled it.
    pub fn vdi_enable_cbt(&self, vdi: &str) -> Result<(), XenApiError> {
        self.call("VDI.enable_cbt", &[vdi.into()]).map(|_| ())
    }

    pub fn vdi_disable_cbt(&self, vdi: &str) -> Result<(), XenApiError> {
        self.call("VDI.disable_cbt", &[vdi.into()]).map(|_| ())
    }

    /// `VDI.snapshot(vdi)` without driver_params (defaulted, reference §1.2).
    pub fn vdi_snapshot(&self, vdi: &str) -> Result<String, XenApiError> {
        string_value("VDI.snapshot", self.call("VDI.snapshot", &[vdi.into()])?)
    }

    /// `VM.snapshot(vm, new_name, ignore_vdis)`: the VDIs in `ignore` are
    /// not snapshotted (the three-argument form when there are none, which
    /// every host version accepts).
    pub fn vm_snapshot(
        &self,
        vm: &str,
        new_name: &str,
        ignore: &[String],
    ) -> Result<String, XenApiError> {
        let mut args: Vec<Value> = vec![vm.into(), new_name.into()];
        if !ignore.is_empty() {
            args.push(Value::Array(
                ignore.iter().map(|r| Value::String(r.clone())).collect(),
            ));
        }
        string_value("VM.snapshot", self.call("VM.snapshot", &args)?)
    }

    pub fn vm_vbds(&self, vm: &str) -> Result<Vec<String>, XenApiError> {
        refs("VM.get_VBDs", self.call("VM.get_VBDs", &[vm.into()])?)
    }

    pub fn vbd_record(&self, vbd: &str) -> Result<VbdRecord, XenApiError> {
        let what = "VBD.get_record";
        let v = self.call(what, &[vbd.into()])?;
        let rec = v.as_struct().ok_or_else(|| XenApiError::Protocol {
            what: what.into(),
            reason: "not a struct".into(),
        })?;
        Ok(VbdRecord {
            vdi: text(what, rec, "VDI")?,
            vbd_type: text(what, rec, "type").unwrap_or_else(|_| "Disk".into()),
            userdevice: text(what, rec, "userdevice").unwrap_or_default(),
        })
    }

    /// The decoded bitmap of `VDI.list_changed_blocks(from, to)`: one bit
    /// per 64 KiB block, MSB first (reference §2.5).
    pub fn list_changed_blocks(&self, from: &str, to: &str) -> Result<Vec<u8>, XenApiError> {
        let what = "VDI.list_changed_blocks";
        let text = string_value(what, self.call(what, &[from.into(), to.into()])?)?;
        let clean: String = text.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(clean.as_bytes())
            .map_err(|e| XenApiError::Protocol {
                what: what.into(),
                reason: format!("bitmap is not base64: {e}"),
            })
    }

    pub fn vdi_nbd_info(&self, vdi: &str) -> Result<Vec<NbdInfo>, XenApiError> {
        let what = "VDI.get_nbd_info";
        let v = self.call(what, &[vdi.into()])?;
        let items = v.as_array().ok_or_else(|| XenApiError::Protocol {
            what: what.into(),
            reason: "not an array".into(),
        })?;
        items
            .iter()
            .map(|i| {
                let rec = i.as_struct().ok_or_else(|| XenApiError::Protocol {
                    what: what.into(),
                    reason: "entry is not a struct".into(),
                })?;
                let port = int(what, field(what, rec, "port")?)?;
                Ok(NbdInfo {
                    address: text(what, rec, "address")?,
                    port: u16::try_from(port).map_err(|_| XenApiError::Protocol {
                        what: what.into(),
                        reason: format!("port {port} out of range"),
                    })?,
                    exportname: text(what, rec, "exportname")?,
                    cert: text(what, rec, "cert")?,
                    subject: text(what, rec, "subject")?,
                })
            })
            .collect()
    }

    pub fn vdi_data_destroy(&self, vdi: &str) -> Result<(), XenApiError> {
        self.call("VDI.data_destroy", &[vdi.into()]).map(|_| ())
    }

    pub fn vdi_destroy(&self, vdi: &str) -> Result<(), XenApiError> {
        self.call("VDI.destroy", &[vdi.into()]).map(|_| ())
    }

    pub fn vm_destroy(&self, vm: &str) -> Result<(), XenApiError> {
        self.call("VM.destroy", &[vm.into()]).map(|_| ())
    }

    /// `CLASS.add_to_other_config(self, key, value)`; xapi answers
    /// `MAP_DUPLICATE_KEY` when the key is already there.
    pub fn add_to_other_config(
        &self,
        class: &str,
        object: &str,
        key: &str,
        value: &str,
    ) -> Result<(), XenApiError> {
        let method = format!("{class}.add_to_other_config");
        self.call(&method, &[object.into(), key.into(), value.into()])
            .map(|_| ())
    }

    /// `CLASS.remove_from_other_config(self, key)`; a missing key is no error.
    pub fn remove_from_other_config(
        &self,
        class: &str,
        object: &str,
        key: &str,
    ) -> Result<(), XenApiError> {
        let method = format!("{class}.remove_from_other_config");
        self.call(&method, &[object.into(), key.into()]).map(|_| ())
    }

    /// Every object of `class` (`VM` or `VDI`) from `CLASS.get_all_records`:
    /// one call, filtered by the caller.
    pub fn all_objects(&self, class: &str) -> Result<Vec<HostObject>, XenApiError> {
        let what = format!("{class}.get_all_records");
        let v = self.call(&what, &[])?;
        let all = v.as_struct().ok_or_else(|| XenApiError::Protocol {
            what: what.clone(),
            reason: "not a struct".into(),
        })?;
        let mut out = Vec::with_capacity(all.len());
        for (reference, rec) in all {
            let rec = rec.as_struct().ok_or_else(|| XenApiError::Protocol {
                what: what.clone(),
                reason: format!("record of {reference} is not a struct"),
            })?;
            let other_config = string_map(rec.get("other_config"));
            out.push(HostObject {
                reference: reference.clone(),
                uuid: text(&what, rec, "uuid")?,
                is_a_snapshot: rec
                    .get("is_a_snapshot")
                    .map(|b| boolean(&what, b))
                    .transpose()?
                    .unwrap_or(false),
                vdi_type: text(&what, rec, "type").unwrap_or_default(),
                vbds: match rec.get("VBDs") {
                    Some(v) => refs(&what, v.clone())?,
                    None => Vec::new(),
                },
                other_config,
            });
        }
        Ok(out)
    }

    pub fn task_create(&self, label: &str, description: &str) -> Result<String, XenApiError> {
        string_value(
            "task.create",
            self.call("task.create", &[label.into(), description.into()])?,
        )
    }

    pub fn task_status(&self, task: &str) -> Result<String, XenApiError> {
        string_value(
            "task.get_status",
            self.call("task.get_status", &[task.into()])?,
        )
    }

    pub fn task_destroy(&self, task: &str) -> Result<(), XenApiError> {
        self.call("task.destroy", &[task.into()]).map(|_| ())
    }

    /// Waits for a task to leave `pending`; a failed task becomes its
    /// `error_info` as an API error. Returns the result (an XML-RPC value
    /// fragment as a string, reference §2.10). The task is destroyed.
    pub fn task_wait(&self, task: &str, method: &str) -> Result<String, XenApiError> {
        self.task_wait_until(task, method, None)
    }

    /// [`Session::task_wait`], but a task still pending at `deadline` is
    /// cancelled and destroyed: for a task whose handler may never have
    /// run (a request that died in transit).
    pub fn task_wait_until(
        &self,
        task: &str,
        method: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<String, XenApiError> {
        let mut delay = Duration::from_millis(20);
        let outcome = loop {
            let status = self.task_status(task)?;
            match status.as_str() {
                "pending" | "cancelling"
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) =>
                {
                    let _ = self.call("task.cancel", &[task.into()]);
                    break Err(XenApiError::Api {
                        method: method.to_string(),
                        code: "TASK_CANCELLED".into(),
                        params: vec![format!("still {status} after the request failed")],
                    });
                }
                "pending" | "cancelling" => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                "success" => {
                    let r = self.call("task.get_result", &[task.into()])?;
                    break Ok(r.as_str().unwrap_or_default().to_string());
                }
                _ => {
                    let info = refs(
                        "task.get_error_info",
                        self.call("task.get_error_info", &[task.into()])?,
                    )?;
                    let mut items = info.into_iter();
                    let code = items.next().unwrap_or_else(|| format!("TASK_{status}"));
                    break Err(XenApiError::Api {
                        method: method.to_string(),
                        code,
                        params: items.collect(),
                    });
                }
            }
        };
        let _ = self.task_destroy(task);
        outcome
    }

    /// `GET /export_metadata?uuid=VM&export_snapshots=false` (reference
    /// §3.3): the XVA tar holding `ova.xml`, at most `limit_bytes`.
    pub fn export_metadata(&self, vm_uuid: &str, limit_bytes: u64) -> Result<Vec<u8>, XenApiError> {
        use std::io::Read;
        let resp = self.http_get(
            "/export_metadata",
            &[("uuid", vm_uuid), ("export_snapshots", "false")],
        )?;
        let mut body = Vec::new();
        resp.take(limit_bytes + 1)
            .read_to_end(&mut body)
            .map_err(|e| XenApiError::Protocol {
                what: "GET /export_metadata".into(),
                reason: e.to_string(),
            })?;
        if body.len() as u64 > limit_bytes {
            return Err(XenApiError::Protocol {
                what: "GET /export_metadata".into(),
                reason: format!("larger than {limit_bytes} bytes"),
            });
        }
        Ok(body)
    }

    /// `GET /export_raw_vdi?vdi=UUID&format=raw` (reference §3.1): the
    /// body streams the whole disk, no Content-Length.
    pub fn export_raw_vdi(
        &self,
        vdi_uuid: &str,
    ) -> Result<reqwest::blocking::Response, XenApiError> {
        self.http_get("/export_raw_vdi", &[("vdi", vdi_uuid), ("format", "raw")])
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.logout();
    }
}
