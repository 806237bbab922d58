//! A vim25 SOAP session over HTTPS: `RetrieveServiceContent`, `Login`
//! (the `vmware_soap_session` cookie, sent back on every later request,
//! the `/folder` reads included), calls through the `vim-wire` codec,
//! property reads, task polling, and datastore Range reads. Logs out when
//! dropped. The password never appears in errors or logs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vim_wire::{
    Moref, ObjectContent, PropertyFilterSpec, PropertyValue, Request, Response, RetrieveOptions,
    ServiceContent, TaskInfo, TaskState,
};

use super::VmwareError;
use crate::source::xenapi::tls::{client_config, HttpsTrust};

/// Largest SOAP answer accepted.
const MAX_SOAP_BYTES: u64 = 64 << 20;
/// The API version asked for in `SOAPAction` (vSphere 7.0 and later
/// answer it; older hosts ignore the version part).
const API_VERSION: &str = "7.0.3.0";
/// The session cookie.
const COOKIE: &str = "vmware_soap_session";

/// A logged-in session on one host (vCenter or ESXi).
pub struct Session {
    http: reqwest::blocking::Client,
    /// `/folder` Range reads in the calling thread ([`super::range_get`]);
    /// `None` when a proxy is configured (reqwest honours it).
    direct: Option<super::range_get::RangeGet>,
    /// `https://HOST:PORT`.
    base: String,
    host: String,
    cookie: Mutex<Option<String>>,
    content: Option<ServiceContent>,
    logged_in: Mutex<bool>,
}

fn transport(host: &str, e: reqwest::Error) -> VmwareError {
    let e = e.without_url();
    if let Some(refused) = ::nbd::tls::refusal_in(&e) {
        return VmwareError::CertificateRefused {
            host: host.to_string(),
            refused: Box::new(refused.clone()),
        };
    }
    if let Some(reason) = ::nbd::tls::failure_text(&e) {
        return VmwareError::Transport {
            host: host.to_string(),
            reason,
        };
    }
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    VmwareError::Transport {
        host: host.to_string(),
        reason,
    }
}

/// Reads at most `limit` bytes of a response body.
fn body(host: &str, resp: reqwest::blocking::Response, limit: u64) -> Result<Vec<u8>, VmwareError> {
    use std::io::Read;
    let mut out = Vec::new();
    resp.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| VmwareError::Transport {
            host: host.to_string(),
            reason: format!("reading the answer: {e}"),
        })?;
    if out.len() as u64 > limit {
        return Err(VmwareError::Protocol {
            what: host.to_string(),
            reason: format!("an answer larger than {limit} bytes"),
        });
    }
    Ok(out)
}

/// Keeps a session from expiring while nothing else uses it (a long read
/// through `--data-command`, a long upload): hosts end sessions idle for
/// about 30 minutes, and the calls after the long step (removing the
/// snapshot, deleting a partial file) would then fail. Stops when dropped.
pub struct KeepAlive {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Session {
    /// Reads `probe`'s `name` every `every` until the returned guard is
    /// dropped (an authenticated call resets the host's idle timer).
    /// Failures are ignored: the steps that need the session report theirs.
    pub fn keep_alive(self: &std::sync::Arc<Self>, probe: Moref, every: Duration) -> KeepAlive {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let session = self.clone();
        let thread = std::thread::Builder::new()
            .name("vsphere-keepalive".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                    let _ = session.properties(&probe, &["name"]);
                }
            })
            .ok();
        KeepAlive {
            stop: Some(tx),
            thread,
        }
    }

    /// Connects, reads the service content and logs in.
    pub fn login(
        host: &str,
        port: u16,
        trust: &HttpsTrust,
        user: &str,
        password: &str,
    ) -> Result<Session, VmwareError> {
        let tls = client_config(trust).map_err(|e| VmwareError::Tls(e.to_string()))?;
        let http = reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| VmwareError::Tls(e.without_url().to_string()))?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let direct = (!proxy_configured()).then(|| {
            super::range_get::RangeGet::new(host, port, authority.clone(), std::sync::Arc::new(tls))
        });
        let mut s = Session {
            http,
            direct,
            base: format!("https://{authority}"),
            host: authority,
            cookie: Mutex::new(None),
            content: None,
            logged_in: Mutex::new(false),
        };
        let content = match s.call(Request::RetrieveServiceContent {
            this: Moref::new("ServiceInstance", "ServiceInstance"),
        })? {
            Response::ServiceContent(c) => *c,
            other => return Err(s.unexpected("RetrieveServiceContent", &other)),
        };
        let manager = content.session_manager.clone();
        s.content = Some(content);
        let manager = manager.ok_or_else(|| VmwareError::Protocol {
            what: "RetrieveServiceContent".into(),
            reason: "no sessionManager: not a host cbtvault can log in to".into(),
        })?;
        s.call(Request::Login {
            this: manager,
            user_name: user.to_string(),
            password: password.to_string(),
            locale: None,
        })?;
        *s.logged_in.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(s)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The service content read at login.
    pub fn content(&self) -> &ServiceContent {
        self.content
            .as_ref()
            .expect("a Session exists only once its service content was read")
    }

    fn unexpected(&self, call: &str, got: &Response) -> VmwareError {
        VmwareError::Protocol {
            what: call.to_string(),
            reason: format!("unexpected answer {got:?}"),
        }
    }

    /// One call; a fault is [`VmwareError::Fault`].
    pub fn call(&self, request: Request) -> Result<Response, VmwareError> {
        let name = request.method_name().to_string();
        let method = request
            .method()
            .ok_or_else(|| VmwareError::Invalid(format!("{name}: not a call this client makes")))?;
        let mut req = self
            .http
            .post(format!("{}/sdk", self.base))
            .header("content-type", vim_wire::soap::CONTENT_TYPE)
            .header("soapaction", vim_wire::soap_action(API_VERSION))
            .body(request.to_envelope());
        if let Some(c) = self
            .cookie
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            req = req.header("cookie", format!("{COOKIE}={c}"));
        }
        let resp = req.send().map_err(|e| transport(&self.host, e))?;
        for v in resp.headers().get_all("set-cookie") {
            if let Some(value) = v
                .to_str()
                .ok()
                .and_then(|s| s.split(';').next())
                .and_then(|kv| kv.trim().strip_prefix(&format!("{COOKIE}=")))
            {
                *self.cookie.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(value.trim_matches('"').to_string());
            }
        }
        let status = resp.status().as_u16();
        let bytes = body(&self.host, resp, MAX_SOAP_BYTES)?;
        // A fault comes with status 500; anything else but 200 is not SOAP.
        if status != 200 && status != 500 {
            return Err(VmwareError::Http {
                what: format!("{name} ({})", self.host),
                status,
                body: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            });
        }
        match Response::from_envelope(method, &bytes) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(fault)) => Err(VmwareError::Fault {
                call: name,
                fault: Box::new(fault),
            }),
            Err(e) => Err(VmwareError::Protocol {
                what: name,
                reason: e.to_string(),
            }),
        }
    }

    /// The properties `paths` of `obj`: one the host does not set is
    /// absent; one it refuses to read for want of a session or a privilege
    /// is an error (see [`refused_property`]).
    pub fn properties(&self, obj: &Moref, paths: &[&str]) -> Result<ObjectContent, VmwareError> {
        let r = self.call(Request::RetrievePropertiesEx {
            this: self.content().property_collector.clone(),
            spec_set: vec![PropertyFilterSpec::of(obj, paths)],
            options: RetrieveOptions::default(),
        })?;
        match r {
            Response::RetrieveResult(Some(mut r)) if !r.objects.is_empty() => {
                let content = r.objects.swap_remove(0);
                match refused_property(&content) {
                    Some(e) => Err(e),
                    None => Ok(content),
                }
            }
            Response::RetrieveResult(_) => Err(VmwareError::Protocol {
                what: format!("RetrievePropertiesEx of {}", obj.value),
                reason: "no object returned".into(),
            }),
            other => Err(self.unexpected("RetrievePropertiesEx", &other)),
        }
    }

    /// Waits for `task` to end (polling its `info`), up to `timeout`; its
    /// info when it succeeded, [`VmwareError::TaskFailed`] when not.
    pub fn wait_task(
        &self,
        call: &str,
        task: &Moref,
        timeout: Duration,
    ) -> Result<TaskInfo, VmwareError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let content = self.properties(task, &["info"])?;
            let info = match content.property("info") {
                Some(PropertyValue::TaskInfo(i)) => (**i).clone(),
                other => {
                    return Err(VmwareError::Protocol {
                        what: format!("{call}: task {}", task.value),
                        reason: format!("info is {other:?}"),
                    })
                }
            };
            match info.state {
                TaskState::Success => return Ok(info),
                TaskState::Error => {
                    let (fault_type, reason) = match &info.error {
                        Some(e) => (
                            Some(e.fault.type_name().to_string()),
                            e.localized_message
                                .clone()
                                .unwrap_or_else(|| e.fault.type_name().to_string()),
                        ),
                        None => (None, "no error given".into()),
                    };
                    return Err(VmwareError::TaskFailed {
                        call: call.to_string(),
                        fault_type,
                        reason,
                    });
                }
                TaskState::Queued | TaskState::Running => {}
            }
            if started.elapsed() > timeout {
                return Err(VmwareError::Protocol {
                    what: format!("{call}: task {}", task.value),
                    reason: format!("still {:?} after {timeout:?}", info.state),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Calls a `*_Task` method and waits for its task.
    pub fn run_task(&self, request: Request, timeout: Duration) -> Result<TaskInfo, VmwareError> {
        let name = request.method_name().to_string();
        match self.call(request)? {
            Response::Task(task) => self.wait_task(&name, &task, timeout),
            other => Err(self.unexpected(&name, &other)),
        }
    }

    /// Reads bytes `offset ..` of datastore file `path` into `bufs`, one
    /// after the other (one Range request for their total length, read
    /// straight into them). The answer must be 206 with a matching
    /// `Content-Range` and exactly the bytes asked for; a 200 (the host
    /// ignored Range) is [`VmwareError::RangeIgnored`], never a whole-file
    /// read.
    pub fn read_range(
        &self,
        datacenter: &str,
        datastore: &str,
        path: &str,
        offset: u64,
        bufs: &mut [&mut [u8]],
    ) -> Result<(), VmwareError> {
        use std::io::Read;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if total == 0 {
            return Ok(());
        }
        let last = offset + total - 1;
        if let Some(direct) = &self.direct {
            let url = folder_url("", datacenter, datastore, path);
            let cookie = self
                .cookie
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|c| format!("{COOKIE}={c}"));
            return direct.get(&url, cookie.as_deref(), offset, bufs, path);
        }
        let resp = self
            .folder_request(reqwest::Method::GET, datacenter, datastore, path)
            .header("range", format!("bytes={offset}-{last}"))
            .send()
            .map_err(|e| transport(&self.host, e))?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Err(VmwareError::RangeIgnored {
                path: path.to_string(),
            });
        }
        if status != 206 {
            let b = body(&self.host, resp, 4096).unwrap_or_default();
            return Err(VmwareError::Http {
                what: format!("GET {path} bytes {offset}-{last}"),
                status,
                body: String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned(),
            });
        }
        let range = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let want = format!("bytes {offset}-{last}/");
        if !range.as_deref().is_some_and(|r| r.starts_with(&want)) {
            return Err(VmwareError::Protocol {
                what: format!("GET {path} bytes {offset}-{last}"),
                reason: format!("Content-Range {range:?} does not match the request"),
            });
        }
        let transport_error = |e: std::io::Error| VmwareError::Transport {
            host: self.host.clone(),
            reason: format!("GET {path}: {e}"),
        };
        let mut r = resp.take(total + 1);
        let mut got = 0u64;
        for buf in bufs.iter_mut() {
            let mut filled = 0;
            while filled < buf.len() {
                let n = r.read(&mut buf[filled..]).map_err(transport_error)?;
                if n == 0 {
                    return Err(VmwareError::Transport {
                        host: self.host.clone(),
                        reason: format!(
                            "GET {path} bytes {offset}-{last}: the answer ended after {} of {total} bytes",
                            got + filled as u64
                        ),
                    });
                }
                filled += n;
            }
            got += filled as u64;
        }
        let mut extra = [0u8; 1];
        if r.read(&mut extra).map_err(transport_error)? != 0 {
            return Err(VmwareError::Protocol {
                what: format!("GET {path} bytes {offset}-{last}"),
                reason: "more bytes than the range".into(),
            });
        }
        Ok(())
    }

    /// A `/folder` request for datastore file `path`, with the session cookie.
    fn folder_request(
        &self,
        method: reqwest::Method,
        datacenter: &str,
        datastore: &str,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        let url = folder_url(&self.base, datacenter, datastore, path);
        let mut req = self.http.request(method, url);
        if let Some(c) = self
            .cookie
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            req = req.header("cookie", format!("{COOKIE}={c}"));
        }
        req
    }

    /// The size of datastore file `path` (`HEAD /folder`), `None` when
    /// there is no such file.
    pub fn file_size(
        &self,
        datacenter: &str,
        datastore: &str,
        path: &str,
    ) -> Result<Option<u64>, VmwareError> {
        let resp = self
            .folder_request(reqwest::Method::HEAD, datacenter, datastore, path)
            .send()
            .map_err(|e| transport(&self.host, e))?;
        match resp.status().as_u16() {
            404 => Ok(None),
            200 => resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| VmwareError::Protocol {
                    what: format!("HEAD {path}"),
                    reason: "no Content-Length".into(),
                }),
            status => Err(VmwareError::Http {
                what: format!("HEAD {path}"),
                status,
                body: String::new(),
            }),
        }
    }

    /// The whole datastore file `path`, at most `max` bytes.
    pub fn read_file(
        &self,
        datacenter: &str,
        datastore: &str,
        path: &str,
        max: u64,
    ) -> Result<Vec<u8>, VmwareError> {
        let resp = self
            .folder_request(reqwest::Method::GET, datacenter, datastore, path)
            .send()
            .map_err(|e| transport(&self.host, e))?;
        let status = resp.status().as_u16();
        let bytes = body(&self.host, resp, max)?;
        if status != 200 {
            return Err(VmwareError::Http {
                what: format!("GET {path}"),
                status,
                body: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            });
        }
        Ok(bytes)
    }

    /// Uploads `len` bytes read from `body` as datastore file `path`
    /// (`PUT /folder`, Content-Length `len`). An error from `body` cuts
    /// the upload. The time limit allows 1 MiB/s on average (at least 10
    /// minutes): a slower upload counts as stalled.
    pub fn put_file(
        &self,
        datacenter: &str,
        datastore: &str,
        path: &str,
        len: u64,
        body_reader: impl std::io::Read + Send + 'static,
    ) -> Result<(), VmwareError> {
        let limit = Duration::from_secs((len >> 20).max(600));
        let resp = self
            .folder_request(reqwest::Method::PUT, datacenter, datastore, path)
            .header("content-type", "application/octet-stream")
            .timeout(limit)
            .body(reqwest::blocking::Body::sized(body_reader, len))
            .send()
            .map_err(|e| transport(&self.host, e))?;
        let status = resp.status().as_u16();
        if status != 200 && status != 201 {
            let b = body(&self.host, resp, 4096).unwrap_or_default();
            return Err(VmwareError::Http {
                what: format!("PUT {path} ({len} bytes)"),
                status,
                body: String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned(),
            });
        }
        Ok(())
    }

    /// The FileManager of the service content.
    fn file_manager(&self) -> Result<Moref, VmwareError> {
        self.content()
            .file_manager
            .clone()
            .ok_or_else(|| VmwareError::Protocol {
                what: "RetrieveServiceContent".into(),
                reason: "no fileManager".into(),
            })
    }

    /// The Datacenter named `name` (SearchIndex.FindByInventoryPath).
    pub fn datacenter(&self, name: &str) -> Result<Moref, VmwareError> {
        let index = self
            .content()
            .search_index
            .clone()
            .ok_or_else(|| VmwareError::Protocol {
                what: "RetrieveServiceContent".into(),
                reason: "no searchIndex".into(),
            })?;
        match self.call(Request::FindByInventoryPath {
            this: index,
            inventory_path: name.to_string(),
        })? {
            Response::Found(Some(m)) if m.kind == "Datacenter" => Ok(m),
            Response::Found(_) => Err(VmwareError::Invalid(format!(
                "no datacenter '{name}' on {} (give --datacenter)",
                self.host
            ))),
            other => Err(self.unexpected("FindByInventoryPath", &other)),
        }
    }

    /// Makes folder `dir` of `datastore` and its parents
    /// (FileManager.MakeDirectory); an existing folder is fine. Returns
    /// whether it was made.
    pub fn make_directory(
        &self,
        datacenter: &Moref,
        datastore: &str,
        dir: &str,
    ) -> Result<bool, VmwareError> {
        let manager = self.file_manager()?;
        match self.call(Request::MakeDirectory {
            this: manager,
            name: format!("[{datastore}] {dir}"),
            datacenter: Some(datacenter.clone()),
            create_parent_directories: Some(true),
        }) {
            Ok(_) => Ok(true),
            Err(e) if e.fault_type().as_deref() == Some("FileAlreadyExists") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes datastore file `path` (FileManager.DeleteDatastoreFile_Task).
    pub fn delete_file(
        &self,
        datacenter: &Moref,
        datastore: &str,
        path: &str,
    ) -> Result<(), VmwareError> {
        let manager = self.file_manager()?;
        self.run_task(
            Request::DeleteDatastoreFileTask {
                this: manager,
                name: format!("[{datastore}] {path}"),
                datacenter: Some(datacenter.clone()),
            },
            Duration::from_secs(600),
        )
        .map(|_| ())
    }

    /// Logs out (once); errors are ignored: the session ends anyway.
    pub fn logout(&self) {
        let mut logged_in = self.logged_in.lock().unwrap_or_else(|e| e.into_inner());
        if !*logged_in {
            return;
        }
        *logged_in = false;
        if let Some(m) = self
            .content
            .as_ref()
            .and_then(|c| c.session_manager.clone())
        {
            let _ = self.call(Request::Logout { this: m });
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.logout();
    }
}

/// The first property of `content` the host refused to read for want of a
/// session or a privilege, as a `RetrievePropertiesEx` fault. The
/// PropertyCollector answers such a read not with a fault but with the
/// property in `missingSet`, its fault `NotAuthenticated` (a subtype of
/// `NoPermission`), e.g. once the session expired (vcsim does the same);
/// taken for an absent property, that would read as "change tracking off"
/// or "no snapshot". Other missing properties (`InvalidProperty`, a path
/// the host does not know) stay absent.
pub fn refused_property(content: &ObjectContent) -> Option<VmwareError> {
    let m = content.missing_set.iter().find(|m| {
        matches!(
            m.fault.fault.type_name(),
            "NotAuthenticated" | "NoPermission"
        )
    })?;
    let privilege = match &m.fault.fault {
        vim_wire::VimFault::NotAuthenticated {
            privilege_id: Some(p),
            ..
        } => format!(", privilege {p}"),
        _ => String::new(),
    };
    Some(VmwareError::Fault {
        call: "RetrievePropertiesEx".into(),
        fault: Box::new(vim_wire::Fault {
            code: vim_wire::soap::SERVER_FAULT_CODE.into(),
            message: format!(
                "the host refused to read property '{}' of {} (no valid session, or no permission{privilege})",
                m.path, content.obj
            ),
            detail: Some(m.fault.fault.clone()),
        }),
    })
}

/// `https://HOST/folder/PATH?dcPath=DC&dsName=DS`, each part escaped.
/// Whether the environment names a proxy for HTTPS (reqwest's client
/// honours it; the direct Range reads do not, so they stand aside).
fn proxy_configured() -> bool {
    ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

pub fn folder_url(base: &str, datacenter: &str, datastore: &str, path: &str) -> String {
    let escaped: Vec<String> = path
        .split('/')
        .map(|p| {
            url::form_urlencoded::byte_serialize(p.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect();
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("dcPath", datacenter)
        .append_pair("dsName", datastore)
        .finish();
    format!("{base}/folder/{}?{query}", escaped.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_property_refused_for_want_of_a_session_is_an_error_not_absent() {
        let vm = Moref::new("VirtualMachine", "vm-9");
        let missing = |path: &str, fault: vim_wire::VimFault| vim_wire::MissingProperty {
            path: path.into(),
            fault: vim_wire::LocalizedMethodFault {
                fault,
                localized_message: None,
            },
        };
        let mut content = ObjectContent {
            obj: vm.clone(),
            prop_set: vec![],
            missing_set: vec![missing(
                "no.such.path",
                vim_wire::VimFault::Other {
                    type_name: "InvalidProperty".into(),
                },
            )],
        };
        // A path the host does not know stays an absent property.
        assert!(refused_property(&content).is_none());
        // What vSphere (and vcsim) answer once the session is gone.
        content.missing_set.push(missing(
            "config.changeTrackingEnabled",
            vim_wire::VimFault::NotAuthenticated {
                object: Some(vm.clone()),
                privilege_id: Some("System.Read".into()),
            },
        ));
        let e = refused_property(&content).expect("an error");
        assert_eq!(e.fault_type().as_deref(), Some("NotAuthenticated"));
        let text = e.to_string();
        assert!(
            text.starts_with("RetrievePropertiesEx: NotAuthenticated")
                && text.contains("'config.changeTrackingEnabled' of VirtualMachine:vm-9")
                && text.contains("privilege System.Read"),
            "{text}"
        );
        content.missing_set = vec![missing(
            "snapshot",
            vim_wire::VimFault::Other {
                type_name: "NoPermission".into(),
            },
        )];
        assert_eq!(
            refused_property(&content)
                .and_then(|e| e.fault_type())
                .as_deref(),
            Some("NoPermission")
        );
    }

    #[test]
    fn folder_urls_escape_each_part() {
        assert_eq!(
            folder_url(
                "https://h",
                "ha-datacenter",
                "datastore1",
                "web 01/web 01-flat.vmdk"
            ),
            "https://h/folder/web%2001/web%2001-flat.vmdk?dcPath=ha-datacenter&dsName=datastore1"
        );
    }
}
