//! Helpers for the simulator's tests, written independently of the
//! simulator's code: a reqwest client pinned to the simulator's
//! certificate, a SOAP client over `vim-wire` that keeps the session
//! cookie, and the expected extents computed from a list of writes.
// The helpers hand back vim_wire::Fault as it came; its size does not
// matter in tests.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use vim_wire::{
    DiskChangeExtent, Fault, Method, Moref, PropertyFilterSpec, PropertyValue, Request, Response,
    RetrieveOptions, TaskInfo, TaskState,
};
use vsphere_sim::{SimOptions, Simulator};

pub const MIB: u64 = 1 << 20;

/// Deterministic bytes, distinct per seed.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1)
        .collect()
}

pub fn start_with(options: SimOptions) -> Simulator {
    Simulator::start(options).expect("start the simulator")
}

/// Small pages so that the tests exercise paging.
pub fn start() -> Simulator {
    start_with(SimOptions {
        changed_areas_window_bytes: 4 * MIB,
        changed_areas_max_extents: 3,
        ..SimOptions::default()
    })
}

/// An HTTPS client that trusts only the simulator's certificate.
pub fn http(sim: &Simulator) -> reqwest::blocking::Client {
    let pem = sim.certificate_pem();
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("certificate PEM");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der))
        .expect("add the simulator's certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// A vim25 SOAP client over `vim-wire`, keeping `vmware_soap_session`.
pub struct Soap {
    pub http: reqwest::blocking::Client,
    pub base: String,
    pub cookie: Option<String>,
}

impl Soap {
    pub fn new(sim: &Simulator) -> Soap {
        Soap {
            http: http(sim),
            base: format!("https://127.0.0.1:{}", sim.address().port()),
            cookie: None,
        }
    }

    pub fn logged_in(sim: &Simulator) -> Soap {
        let mut s = Soap::new(sim);
        s.login(sim.username(), sim.password()).expect("login");
        s
    }

    /// One call: the response, or the fault; panics on transport errors.
    pub fn call(&mut self, req: &Request) -> Result<Response, Fault> {
        self.try_call(req).expect("transport")
    }

    pub fn try_call(&mut self, req: &Request) -> Result<Result<Response, Fault>, String> {
        let method = req.method().expect("a modelled method");
        let mut r = self
            .http
            .post(format!("{}/sdk", self.base))
            .header("content-type", "text/xml; charset=utf-8")
            .header("soapaction", vim_wire::soap_action("8.0.3.0"))
            .body(req.to_envelope());
        if let Some(c) = &self.cookie {
            r = r.header("cookie", c.clone());
        }
        let resp = r.send().map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        if let Some(c) = resp.headers().get("set-cookie") {
            let c = c.to_str().unwrap_or_default();
            self.cookie = c.split(';').next().map(str::to_string);
        }
        let body = resp.bytes().map_err(|e| e.to_string())?;
        let out = Response::from_envelope(method, &body).map_err(|e| e.to_string())?;
        match (&out, status) {
            (Ok(_), 200) | (Err(_), 500) => Ok(out),
            _ => Err(format!("status {status} for {out:?}")),
        }
    }

    pub fn login(&mut self, user: &str, password: &str) -> Result<Response, Fault> {
        self.call(&Request::Login {
            this: Moref::new("SessionManager", "ha-sessionmgr"),
            user_name: user.into(),
            password: password.into(),
            locale: None,
        })
    }

    /// Properties of one object: `(path, value)` in answer order.
    pub fn props(
        &mut self,
        obj: &Moref,
        paths: &[&str],
    ) -> Result<Vec<(String, PropertyValue)>, Fault> {
        match self.call(&Request::RetrievePropertiesEx {
            this: Moref::new("PropertyCollector", "ha-property-collector"),
            spec_set: vec![PropertyFilterSpec::of(obj, paths)],
            options: RetrieveOptions::default(),
        })? {
            Response::RetrieveResult(None) => Ok(Vec::new()),
            Response::RetrieveResult(Some(r)) => Ok(r
                .objects
                .into_iter()
                .flat_map(|o| o.prop_set)
                .map(|p| (p.name, p.val))
                .collect()),
            other => panic!("not a RetrieveResult: {other:?}"),
        }
    }

    pub fn prop(&mut self, obj: &Moref, path: &str) -> Option<PropertyValue> {
        self.props(obj, &[path])
            .expect("property read")
            .into_iter()
            .next()
            .map(|(_, v)| v)
    }

    /// Runs a `*_Task` call and polls it to its end.
    pub fn task(&mut self, req: &Request) -> TaskInfo {
        let task = match self.call(req).expect("task call") {
            Response::Task(t) => t,
            other => panic!("not a task: {other:?}"),
        };
        for _ in 0..400 {
            match self.prop(&task, "info") {
                Some(PropertyValue::TaskInfo(info)) if info.state.is_done() => return *info,
                Some(PropertyValue::TaskInfo(info)) => {
                    assert!(matches!(info.state, TaskState::Running | TaskState::Queued))
                }
                other => panic!("task info: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("task {task} did not end");
    }

    /// Pages QueryChangedDiskAreas over the whole disk; returns the merged
    /// extents and the number of pages.
    pub fn changed_areas(
        &mut self,
        vm: &Moref,
        snapshot: Option<&Moref>,
        key: i32,
        capacity: u64,
        change_id: &str,
    ) -> Result<(Vec<(u64, u64)>, usize), Fault> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let (mut start, mut pages) = (0i64, 0);
        while (start as u64) < capacity {
            let info = match self.call(&Request::QueryChangedDiskAreas {
                this: vm.clone(),
                snapshot: snapshot.cloned(),
                device_key: key,
                start_offset: start,
                change_id: change_id.into(),
            })? {
                Response::DiskChangeInfo(i) => i,
                other => panic!("not a DiskChangeInfo: {other:?}"),
            };
            assert_eq!(info.start_offset, start, "a page starts where asked");
            assert!(info.length > 0, "a page makes progress");
            for DiskChangeExtent { start: s, length } in &info.changed_area {
                assert!(*s >= info.start_offset && s + length <= info.next_offset());
                assert_eq!((s % 512, length % 512), (0, 0), "sector-aligned");
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == *s as u64 => last.1 += *length as u64,
                    _ => out.push((*s as u64, *length as u64)),
                }
            }
            start = info.next_offset();
            pages += 1;
        }
        assert_eq!(start as u64, capacity, "the pages end at the capacity");
        Ok((out, pages))
    }
}

/// The sector-aligned union of `(offset, len)` writes, as `(start, len)`.
pub fn expected_extents(writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut sectors: Vec<(u64, u64)> = writes
        .iter()
        .filter(|w| w.1 > 0)
        .map(|&(o, l)| (o / 512 * 512, (o + l).div_ceil(512) * 512))
        .collect();
    sectors.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in sectors {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

pub fn vm_ref(id: &str) -> Moref {
    Moref::new("VirtualMachine", id)
}

pub fn method_name(m: Method) -> &'static str {
    m.name()
}
