//! A simulated XenServer host: the XenAPI subset that CBT backup uses,
//! faithful to xenapi-reference.md (names, arguments, wire formats, error
//! codes and behaviour), for tests, `cbtvault sim` and `cbtvault demo`.
//! It never prints (the `sim` command does) and never touches a real host.
//! Builds on the `nbd` and `xapi-wire` crates, never on the product.
//!
//! - One HTTPS port (self-signed certificate, see [`Simulator::fingerprint`])
//!   serves XML-RPC (`POST /`, `/RPC2`), JSON-RPC v1/v2 (`POST /jsonrpc`),
//!   `GET /export_raw_vdi` and `PUT /import_raw_vdi` (raw and `chunked`),
//!   `GET /export_metadata` and `PUT /import_metadata` (ova.xml in a tar).
//! - One NBD port serves VDIs like xapi-nbd through `nbd::server` in
//!   `XapiLike` mode: TLS mandatory with the same certificate, export name
//!   `/<vdi-uuid>?session_id=<ref>` as `VDI.get_nbd_info` returns it, a dom0
//!   VBD attached while a connection is open.
//! - A pool: [`Simulator::add_pool_member`] joins more hosts, each on its
//!   own loopback address (127.0.0.2, ...) with the master's XenAPI port
//!   number, its own NBD port, certificate and dom0, and a local SR only it
//!   sees; [`Simulator::add_shared_sr`] adds an SR every host sees. A
//!   member answers logins with `HOST_IS_SLAVE [master address]` (other
//!   calls act on the pool's objects, as xapi forwards them); its HTTP
//!   handlers answer 302 for a VDI whose SR it does not see; its xapi-nbd
//!   serves only VDIs it sees; `get_nbd_info` lists every host that sees
//!   the SR. [`Simulator::add_disk_on_sr`] places a disk on any SR.
//! - State: objects in memory behind one lock ([`model::State`]); VDI data in
//!   sparse files under the state folder (a temporary one unless
//!   [`SimOptions::dir`] is set). With a folder of one's own the objects are
//!   kept in `state.json` across restarts; after a hard stop CBT comes back
//!   disabled, as after a host crash (see `persist`).
//!
//! Simulator-only hooks (a real host answers `MESSAGE_METHOD_UNKNOWN` / 404):
//! - Guest writes, as a running VM would write (every 64 KiB block touched
//!   gets its CBT bit on the leaf's current log): [`Simulator::guest_write`],
//!   RPC `sim.guest_write(session, vdi_ref, offset, base64_data)`, or HTTP
//!   `PUT /sim/guest_write?session_id=S&vdi=UUID_OR_REF&offset=N` with the
//!   bytes as body (answers `{"Status": "Success"}` or `{"Status":
//!   "Failure", "ErrorDescription": [...]}`).
//! - `sim.create_vm(session, name, [size_bytes...])` -> VM ref: a halted VM
//!   with one user VDI per size ([`Simulator::create_vm_with_disks`]).
//!   [`Simulator::add_disk`] (or `sim.add_disk(session, vm, name, size,
//!   kind)`, kind `cbt`, `sr_without_cbt`, `raw` or `ephemeral`) plugs
//!   more: on an SR without CBT support
//!   (`SR_OPERATION_NOT_SUPPORTED` from `enable_cbt`), a RAW VDI
//!   (`SR_BACKEND_FAILURE_66`), or an `ephemeral` one.
//! - Faults, via [`Simulator::set_faults`] or `sim.set_fault(session, name,
//!   value)`:
//!   - `cbt_unlicensed` (bool): `VDI.enable_cbt` answers
//!     `LICENCE_RESTRICTION [CBT]`.
//!   - `legacy_host` (bool): an old host (7.1): the CBT calls
//!     (`VDI.enable_cbt`, `disable_cbt`, `list_changed_blocks`,
//!     `data_destroy`, `get_nbd_info`, `get_cbt_enabled`) answer
//!     `MESSAGE_METHOD_UNKNOWN`, VDI records lack `cbt_enabled`, and
//!     `/jsonrpc` answers 404. Also [`SimOptions::legacy_host`].
//!   - `expire_sessions_after_nbd_bytes` (only through
//!     [`Simulator::set_faults`]): once an NBD connection has served that
//!     many bytes, every session ends (a xapi restart) and it drops.
//!   - `nbd_down_hosts` (only through [`Simulator::set_faults`]): host
//!     refs whose xapi-nbd closes every connection at once.
//!   - `nbd_drop_after_bytes` (int, or "" to clear): NBD connections opened
//!     afterwards drop (no reply) once they have served that many bytes.
//!   - `nbd_rate_bytes_per_s` (int, or "" to clear): NBD connections
//!     opened afterwards serve at most that many bytes of reads a second.
//!   - `task_delay_ms` (int): async tasks and HTTP handler tasks stay
//!     `pending` that long (cancellable meanwhile) before they complete.
//!   - `import_fail_after_bytes` (only through [`Simulator::set_faults`]):
//!     `/import_raw_vdi` fails its task with `VDI_IO_ERROR` after that many
//!     body bytes.
//!   - `import_drop_after_bytes` (only through [`Simulator::set_faults`]):
//!     `/import_raw_vdi` drops the connection after that many body bytes
//!     (reset, no answer) and fails its task with `VDI_IO_ERROR`.
//!     Both import faults are read when an import starts.
//!   - `fail_calls` (only through [`Simulator::set_faults`]): named
//!     session calls answer the given `[code, params...]` and change
//!     nothing, e.g. to fail a workflow at one step.
//!   - `sim.system_disable_cbt(session, vdi)`: the system turned CBT off
//!     (SM after an inconsistent log): `cbt_enabled` false, chain broken.
//!   - `sim.attach_to_dom0(session, vdi)` -> VBD ref and `sim.detach(session,
//!     vbd)`: a leftover dom0 attachment, so calls see `VDI_IN_USE`.
//!   - `session_idle_timeout_ms` (int, or "" to clear): a session unused
//!     that long ends; its next call (or HTTP handler, or NBD connect)
//!     answers `SESSION_INVALID [ref]`.
//!   - `restart_downtime_ms` (int): how long a xapi restart (the
//!     `expire_sessions_after_nbd_bytes` fault, [`Simulator::restart_xapi`],
//!     `sim.restart_xapi`) keeps the host down: meanwhile every request on
//!     the HTTPS port (XML-RPC, JSON-RPC, HTTP handlers, `sim.*` over the
//!     wire) answers HTTP 503 and new NBD connections are closed at once;
//!     afterwards all works again, every session from before invalid.
//!     Open NBD connections go on (xapi-nbd is its own service). In-process
//!     calls ([`Simulator::call`]) are not affected.
//! - More storage and devices:
//!   - `sim.create_sr(session, name, type)` -> SR ref
//!     ([`Simulator::create_sr`]): a plugged SR of type `ext`, `nfs`,
//!     `lvm`, `lvmoiscsi`, `lvmohba`, `smb` (CBT capable), `iso` or
//!     `rawhba` (not), e.g. to `VDI.pool_migrate` or `VDI.copy` to.
//!   - `sim.set_sr_physical_size(session, sr, bytes)` ("" resets;
//!     [`Simulator::set_sr_physical_size`]): makes an SR small, so that
//!     what does not fit answers `SR_FULL [requested; maximum]` (the
//!     capacity model is in `model/sr.rs`).
//!   - `sim.add_cd(session, vm, iso_name)` -> VBD ref ([`Simulator::add_cd`]):
//!     a CD drive (`type` CD, `mode` RO), empty (`empty` true, `VDI`
//!     null) for "", else with a new ISO (a read-only `user` VDI on the
//!     ISO SR, type and content_type `iso`). `VM.snapshot` copies CD
//!     drives as they are; it never snapshots an ISO.
//!   - `sim.suspend_vm(session, vm)` -> VDI ref ([`Simulator::suspend_vm`]):
//!     the VM becomes `Suspended` with a `suspend_VDI` (type `suspend`, no
//!     VBD). Starting or halting it again destroys that VDI.
//!
//! Layout: `model` (the objects and the rules of the calls on them, one
//! module per class; `cbt`, `disk`, `metadata` beside it), `dispatch` (the
//! method table in `dispatch/table.rs`: every call's name, parameter count
//! and handler; the checks before a handler runs), `server` (the HTTPS port:
//! `rpc`, `tasks`, `raw_vdi`, `metadata`, `guest`), `nbd` (the NBD exports),
//! `persist` (`state.json`).

pub mod cbt;
mod disk;
mod dispatch;
pub mod error;
pub mod http;
pub mod metadata;
pub mod model;
mod nbd;
mod persist;
mod server;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

pub use dispatch::{DiskKind, ISO_BYTES};
pub use error::SimError;
pub use model::Faults;
pub use nbd::parse_export_name;
pub use xapi_wire::{ApiError, Value, WireError};

use ::nbd::server::{self as nbdserver, Listener, Mode, ServerOptions};
use model::{Class, HostConfig, State};

/// The shared state every connection works on.
pub(crate) struct Core {
    state: Mutex<State>,
    /// While xapi "restarts" (`Faults::restart_downtime_ms`): until when.
    down_until: Mutex<Option<std::time::Instant>>,
    /// Keeps the state across restarts (`SimOptions::dir` only).
    persist: Option<Mutex<persist::Saver>>,
    /// Body bytes received by `/import_raw_vdi` so far (a test hook).
    pub(crate) import_bytes: std::sync::atomic::AtomicU64,
    /// Every call and NBD connection, in order (`--log-calls`).
    calls: Mutex<Vec<String>>,
    log_file: Option<Mutex<std::fs::File>>,
}

impl Core {
    /// The state; a panic in another holder does not make it unusable.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one call (`XenAPI VDI.snapshot ok`, `NBD connect UUID
    /// refused`, ...) in the call log, and in the log file when asked.
    pub(crate) fn log_call(&self, line: String) {
        if let Some(f) = &self.log_file {
            use std::io::Write;
            let _ = writeln!(f.lock().unwrap_or_else(|e| e.into_inner()), "{line}");
        }
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    /// xapi restarts: every session ends, and for
    /// `Faults::restart_downtime_ms` the host answers nothing but 503.
    pub(crate) fn restart_xapi(&self, st: &mut State) {
        st.sessions.clear();
        let downtime = Duration::from_millis(st.faults.restart_downtime_ms);
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now() + downtime);
    }

    /// Whether xapi is still down after a restart.
    pub(crate) fn unavailable(&self) -> bool {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        match *down {
            Some(until) if std::time::Instant::now() < until => true,
            Some(_) => {
                *down = None;
                false
            }
            None => false,
        }
    }

    /// Saves the objects after a change (when persistent). A failed save
    /// is not the caller's failure; the next one may succeed.
    pub(crate) fn changed(&self, st: &State) {
        if let Some(saver) = &self.persist {
            saver.lock().unwrap_or_else(|e| e.into_inner()).changed(st);
        }
    }
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// State folder (VDI images, the host certificate). `None`: a new
    /// temporary folder, removed when the simulator stops.
    pub dir: Option<PathBuf>,
    /// HTTPS address, e.g. `127.0.0.1:0` (port 0 picks one).
    pub listen: String,
    /// NBD address; `None`: the HTTPS host with a free port.
    pub nbd_listen: Option<String>,
    pub username: String,
    pub password: String,
    /// The DNS name in the certificate and `get_nbd_info`'s `subject`.
    pub hostname: String,
    /// The address `get_nbd_info` reports; `None`: the NBD listen address,
    /// or 127.0.0.1 when that is unspecified (0.0.0.0 / ::).
    pub advertise_address: Option<String>,
    /// Start as an old host without CBT (see the module docs).
    pub legacy_host: bool,
    /// How long `VDI.data_destroy` waits for VBDs to go (xapi: 4 s).
    pub data_destroy_wait: Duration,
    /// NBD connections served at once; more are closed at once, as
    /// xapi-nbd does when busy (default 16).
    pub nbd_max_connections: usize,
    /// Appends every XenAPI call (method and outcome) and NBD connection,
    /// one per line, to this file ([`Simulator::calls`] holds the same).
    pub log_calls: Option<PathBuf>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            dir: None,
            listen: "127.0.0.1:0".into(),
            nbd_listen: None,
            username: "root".into(),
            password: "sim-password".into(),
            hostname: "localhost".into(),
            advertise_address: None,
            legacy_host: false,
            data_destroy_wait: Duration::from_secs(4),
            nbd_max_connections: 16,
            log_calls: None,
        }
    }
}

/// A disk of a VM made by [`Simulator::create_vm_with_disks`].
#[derive(Debug, Clone)]
pub struct SimDisk {
    pub vdi_ref: String,
    pub vdi_uuid: String,
    pub size_bytes: u64,
}

/// A VM made by [`Simulator::create_vm_with_disks`].
#[derive(Debug, Clone)]
pub struct SimVm {
    pub vm_ref: String,
    pub vm_uuid: String,
    pub disks: Vec<SimDisk>,
}

/// A CD drive made by [`Simulator::add_cd`].
#[derive(Debug, Clone)]
pub struct SimCd {
    pub vbd_ref: String,
    /// The ISO's VDI, `OpaqueRef:NULL` for an empty drive.
    pub vdi_ref: String,
}

/// A running simulator; stops when dropped.
pub struct Simulator {
    runtime: Option<tokio::runtime::Runtime>,
    core: Arc<Core>,
    stop: watch::Sender<bool>,
    https: SocketAddr,
    nbd: SocketAddr,
    certificate_pem: String,
    fingerprint: String,
    username: String,
    password: String,
    dir: PathBuf,
    temporary_dir: bool,
    nbd_max_connections: usize,
    /// Pool members joined so far.
    members: Mutex<Vec<PoolMember>>,
}

/// A host that joined the simulator's pool ([`Simulator::add_pool_member`]).
#[derive(Debug, Clone)]
pub struct PoolMember {
    pub name: String,
    pub host_ref: String,
    pub host_uuid: String,
    /// Its XenAPI port: its own address, the master's port number.
    pub https: SocketAddr,
    pub nbd: SocketAddr,
    pub certificate_pem: String,
    /// SHA-256 of its certificate, `AB:CD:...`.
    pub fingerprint: String,
    /// The SR only this host sees.
    pub local_sr_uuid: String,
}

/// The two listeners of one host and what they serve with.
struct HostPorts {
    https: tokio::net::TcpListener,
    nbd: Listener,
    tls: Arc<rustls::ServerConfig>,
    nbd_max_connections: usize,
}

impl HostPorts {
    /// Serves XenAPI and NBD as `host` until `stop` turns true.
    fn serve(
        self,
        runtime: &tokio::runtime::Runtime,
        core: &Arc<Core>,
        host: model::Ref,
        stop: watch::Receiver<bool>,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        runtime.spawn(server::serve(
            self.https,
            acceptor,
            core.clone(),
            host.clone(),
            stop.clone(),
        ));
        let resolver = Arc::new(nbd::SimResolver {
            core: core.clone(),
            host,
        });
        let nbd_options = ServerOptions {
            tls: Some(self.tls),
            mode: Mode::XapiLike,
            max_connections: self.nbd_max_connections,
            ..ServerOptions::default()
        };
        let mut nbd_stop = stop;
        runtime.spawn(nbdserver::serve(
            self.nbd,
            resolver,
            nbd_options,
            async move {
                let _ = nbd_stop.changed().await;
            },
        ));
    }
}

/// The host certificate and key (PEM), kept in the state folder so that a
/// restarted `cbtvault sim --dir D` keeps its fingerprint.
fn host_certificate(dir: &Path, names: Vec<String>) -> Result<(String, String), SimError> {
    let cert_path = dir.join("host-cert.pem");
    let key_path = dir.join("host-key.pem");
    if let (Ok(cert), Ok(key)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        return Ok((cert, key));
    }
    let bad = |e: rcgen::Error| SimError::Certificate(e.to_string());
    let mut params = rcgen::CertificateParams::new(names.clone()).map_err(bad)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let cert = params.self_signed(&key).map_err(bad)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let storage = |path: &Path| {
        let path = path.display().to_string();
        move |source| SimError::Storage { path, source }
    };
    std::fs::write(&cert_path, &cert_pem).map_err(storage(&cert_path))?;
    // The private key is for the simulator's eyes only.
    let mut key_file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(storage(&key_path))?
    };
    std::io::Write::write_all(&mut key_file, key_pem.as_bytes()).map_err(storage(&key_path))?;
    Ok((cert_pem, key_pem))
}

/// `AB:CD:...`: SHA-256 of the certificate's DER, as `openssl x509
/// -fingerprint -sha256` prints it.
pub fn certificate_fingerprint(cert_pem: &str) -> Result<String, SimError> {
    let certs = ::nbd::tls::certs_from_pem(cert_pem.as_bytes(), "host certificate")
        .map_err(|e| SimError::Certificate(e.to_string()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, certs[0].as_ref());
    Ok(digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// An NBD listener on `address` and the address it got.
fn bind_nbd(
    runtime: &tokio::runtime::Runtime,
    address: &str,
) -> Result<(Listener, SocketAddr), SimError> {
    let listen_error = |source| SimError::Listen {
        address: address.to_string(),
        source,
    };
    let listener = runtime
        .block_on(Listener::bind_tcp(address))
        .map_err(listen_error)?;
    let bound = listener
        .tcp_address()
        .ok_or_else(|| listen_error(std::io::ErrorKind::AddrNotAvailable.into()))?;
    Ok((listener, bound))
}

/// A VDI as [`SimDisk`] describes it.
fn sim_disk(st: &State, vdi: &str) -> Result<SimDisk, ApiError> {
    let v = st.vdi(vdi)?;
    Ok(SimDisk {
        vdi_ref: vdi.to_string(),
        vdi_uuid: v.uuid.clone(),
        size_bytes: v.virtual_size,
    })
}

/// A VM and its disks in userdevice order.
fn describe_vm(st: &State, vm_ref: &str) -> Result<SimVm, ApiError> {
    let mut vbds: Vec<_> = st
        .vbds_of_vm(vm_ref)
        .into_iter()
        .filter_map(|b| st.vbds.get(&b).cloned())
        .filter(|b| b.vbd_type == "Disk")
        .collect();
    vbds.sort_by(|a, b| a.userdevice.cmp(&b.userdevice));
    let disks = vbds
        .iter()
        .filter_map(|b| {
            st.vdis.get(&b.vdi).map(|v| SimDisk {
                vdi_ref: b.vdi.clone(),
                vdi_uuid: v.uuid.clone(),
                size_bytes: v.virtual_size,
            })
        })
        .collect();
    Ok(SimVm {
        vm_uuid: st.vm(vm_ref)?.uuid.clone(),
        vm_ref: vm_ref.to_string(),
        disks,
    })
}

impl Simulator {
    /// Binds both ports, generates (or reloads) the certificate and starts
    /// serving on a runtime of its own.
    pub fn start(options: SimOptions) -> Result<Simulator, SimError> {
        let (dir, temporary_dir) = match &options.dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("cbtvault-sim-{}", model::new_uuid())),
                true,
            ),
        };
        std::fs::create_dir_all(dir.join("vdis")).map_err(|source| SimError::Storage {
            path: dir.display().to_string(),
            source,
        })?;
        let cleanup = |e: SimError| {
            if temporary_dir {
                let _ = std::fs::remove_dir_all(&dir);
            }
            e
        };
        Simulator::start_in(options, dir.clone(), temporary_dir).map_err(cleanup)
    }

    fn start_in(
        options: SimOptions,
        dir: PathBuf,
        temporary_dir: bool,
    ) -> Result<Simulator, SimError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cbtvault-sim")
            .enable_all()
            .build()
            .map_err(|e| SimError::Runtime(e.to_string()))?;
        let listen = options.listen.clone();
        let https_listener = runtime
            .block_on(tokio::net::TcpListener::bind(&listen))
            .map_err(|source| SimError::Listen {
                address: listen.clone(),
                source,
            })?;
        let https = https_listener
            .local_addr()
            .map_err(|source| SimError::Listen {
                address: listen.clone(),
                source,
            })?;
        let nbd_address = options
            .nbd_listen
            .clone()
            .unwrap_or_else(|| SocketAddr::new(https.ip(), 0).to_string());
        let (nbd_listener, nbd) = bind_nbd(&runtime, &nbd_address)?;
        let advertised = options.advertise_address.clone().unwrap_or_else(|| {
            if nbd.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                nbd.ip().to_string()
            }
        });
        let mut names = vec![
            options.hostname.clone(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        if advertised.parse::<IpAddr>().is_ok() && !names.contains(&advertised) {
            names.push(advertised.clone());
        }
        let (certificate_pem, key_pem) = host_certificate(&dir, names)?;
        let fingerprint = certificate_fingerprint(&certificate_pem)?;
        let tls = nbdserver::server_config_from_pem(certificate_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| SimError::Certificate(e.to_string()))?;

        let config = HostConfig {
            username: options.username.clone(),
            password: options.password.clone(),
            hostname: options.hostname.clone(),
            nbd_address: advertised,
            nbd_port: nbd.port(),
            certificate_pem: certificate_pem.clone(),
            data_dir: dir.join("vdis"),
            data_destroy_wait_ms: options.data_destroy_wait.as_millis() as u64,
        };
        // Only a folder the caller chose keeps the host across restarts.
        let persist = (!temporary_dir).then(|| dir.clone());
        let mut state = match &persist {
            Some(d) => persist::load(config.clone(), d)?.unwrap_or_else(|| State::new(config)),
            None => State::new(config),
        };
        state.faults.legacy_host = options.legacy_host;
        if let Some(d) = &persist {
            persist::save(&state, d, false).map_err(|source| SimError::Storage {
                path: d.join(persist::STATE_FILE).display().to_string(),
                source,
            })?;
        }
        let log_file = match &options.log_calls {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SimError::Storage {
                        path: path.display().to_string(),
                        source,
                    })?,
            )),
            None => None,
        };
        let core = Arc::new_cyclic(|me: &std::sync::Weak<Core>| Core {
            state: Mutex::new(state),
            down_until: Mutex::new(None),
            persist: persist.map(|d| {
                let me = me.clone();
                Mutex::new(persist::Saver::start(
                    d,
                    Box::new(move || {
                        let core = me.upgrade()?;
                        let bytes = persist::encode(&core.lock(), false).ok();
                        bytes
                    }),
                ))
            }),
            import_bytes: std::sync::atomic::AtomicU64::new(0),
            calls: Mutex::new(Vec::new()),
            log_file,
        });

        let (stop, stop_rx) = watch::channel(false);
        let master = core.lock().host.clone();
        let ports = HostPorts {
            https: https_listener,
            nbd: nbd_listener,
            tls,
            nbd_max_connections: options.nbd_max_connections,
        };
        ports.serve(&runtime, &core, master, stop_rx);
        Ok(Simulator {
            runtime: Some(runtime),
            core,
            stop,
            https,
            nbd,
            certificate_pem,
            fingerprint,
            username: options.username,
            password: options.password,
            dir,
            temporary_dir,
            nbd_max_connections: options.nbd_max_connections,
            members: Mutex::new(Vec::new()),
        })
    }

    /// `https://ADDR:PORT/` (the XML-RPC endpoint; JSON-RPC is `jsonrpc` below it).
    pub fn url(&self) -> String {
        format!("https://{}/", self.https)
    }

    pub fn https_address(&self) -> SocketAddr {
        self.https
    }

    pub fn nbd_port(&self) -> u16 {
        self.nbd.port()
    }

    pub fn nbd_address(&self) -> SocketAddr {
        self.nbd
    }

    /// The host certificate (PEM), as `get_nbd_info` returns it.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// SHA-256 of the certificate, `AB:CD:...`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The state folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every XenAPI call and NBD connection so far, in order: `XenAPI
    /// METHOD ok` or `XenAPI METHOD CODE`, `NBD connect VDI-UUID` or `NBD
    /// refused VDI-UUID: WHY` (the `sim.*` hooks are not logged).
    pub fn calls(&self) -> Vec<String> {
        self.core
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Joins a host to the pool: it listens on its own loopback address
    /// (127.0.0.2, 127.0.0.3, ...) with the master's XenAPI port number
    /// and a NBD port of its own, with a certificate of its own, answers
    /// logins with `HOST_IS_SLAVE [master address]`, redirects HTTP
    /// handlers for SRs it does not see, and has a local SR only it sees.
    /// Members last while the simulator runs: one with a state folder of
    /// its own (kept across restarts) cannot have them.
    pub fn add_pool_member(&self, name: &str) -> Result<PoolMember, SimError> {
        if self.core.persist.is_some() {
            return Err(SimError::Unsupported(
                "pool members are not kept across restarts: start the simulator without a state folder".into(),
            ));
        }
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| SimError::Runtime("stopped".into()))?;
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let ip = IpAddr::from([127, 0, 0, 2 + members.len() as u8]);
        let https_address = SocketAddr::new(ip, self.https.port());
        let https_listener = runtime
            .block_on(tokio::net::TcpListener::bind(https_address))
            .map_err(|source| SimError::Listen {
                address: https_address.to_string(),
                source,
            })?;
        let nbd_address = SocketAddr::new(ip, 0).to_string();
        let (nbd_listener, nbd) = bind_nbd(runtime, &nbd_address)?;
        let cert_dir = self.dir.join("members").join(name);
        std::fs::create_dir_all(&cert_dir).map_err(|source| SimError::Storage {
            path: cert_dir.display().to_string(),
            source,
        })?;
        let (certificate_pem, key_pem) =
            host_certificate(&cert_dir, vec![name.to_string(), ip.to_string()])?;
        let fingerprint = certificate_fingerprint(&certificate_pem)?;
        let tls = nbdserver::server_config_from_pem(certificate_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| SimError::Certificate(e.to_string()))?;
        let (host_ref, host_uuid, local_sr_uuid) = {
            let mut st = self.core.lock();
            let (host, sr) = st.add_pool_member(model::NewMember {
                name: name.to_string(),
                address: ip.to_string(),
                certificate_pem: certificate_pem.clone(),
                nbd_port: nbd.port(),
            });
            let host_uuid = st.hosts[&host].uuid.clone();
            let sr_uuid = st.srs[&sr].uuid.clone();
            (host, host_uuid, sr_uuid)
        };
        HostPorts {
            https: https_listener,
            nbd: nbd_listener,
            tls,
            nbd_max_connections: self.nbd_max_connections,
        }
        .serve(runtime, &self.core, host_ref.clone(), self.stop.subscribe());
        let member = PoolMember {
            name: name.to_string(),
            host_ref,
            host_uuid,
            https: https_address,
            nbd,
            certificate_pem,
            fingerprint,
            local_sr_uuid,
        };
        members.push(member.clone());
        Ok(member)
    }

    /// A shared SR (type `nfs`, CBT-capable) plugged on every host, now
    /// and joining later; returns its uuid.
    pub fn add_shared_sr(&self, name: &str) -> Result<String, SimError> {
        let mut st = self.core.lock();
        let sr = st.add_shared_sr(name)?;
        self.core.changed(&st);
        Ok(st.srs[&sr].uuid.clone())
    }

    /// Runs a XenAPI call in process (no wire), e.g. for a demo's setup.
    pub fn call(&self, method: &str, params: &[Value]) -> Result<Value, ApiError> {
        dispatch::call(&self.core, method, params)
    }

    /// A halted VM with one user VDI per size.
    pub fn create_vm_with_disks(&self, name: &str, disk_sizes: &[u64]) -> Result<SimVm, SimError> {
        let mut st = self.core.lock();
        let vm_ref = dispatch::create_vm_with_disks(&mut st, name, disk_sizes)?;
        self.core.changed(&st);
        Ok(describe_vm(&st, &vm_ref)?)
    }

    /// Plugs a new disk of `kind` into `vm` (uuid or ref) at its next free
    /// userdevice: a CBT-capable one, one on an SR without CBT, a RAW VDI,
    /// or an ephemeral one.
    pub fn add_disk(
        &self,
        vm: &str,
        name: &str,
        size_bytes: u64,
        kind: DiskKind,
    ) -> Result<SimDisk, SimError> {
        let mut st = self.core.lock();
        let vm_ref = Simulator::vm_ref(&st, vm)?;
        let vdi = dispatch::add_disk(&mut st, &vm_ref, name, size_bytes, kind)?;
        self.core.changed(&st);
        Ok(sim_disk(&st, &vdi)?)
    }

    /// Plugs a new CBT-capable user disk on the SR with uuid `sr_uuid`
    /// (e.g. a shared SR or a pool member's local SR) into `vm`.
    pub fn add_disk_on_sr(
        &self,
        vm: &str,
        name: &str,
        size_bytes: u64,
        sr_uuid: &str,
    ) -> Result<SimDisk, SimError> {
        let mut st = self.core.lock();
        let vm_ref = Simulator::vm_ref(&st, vm)?;
        let vdi = dispatch::add_disk_on_sr(&mut st, &vm_ref, name, size_bytes, sr_uuid)?;
        self.core.changed(&st);
        Ok(sim_disk(&st, &vdi)?)
    }

    /// A VM's ref from its ref or uuid.
    fn vm_ref(st: &State, vm: &str) -> Result<String, ApiError> {
        if st.vms.contains_key(vm) {
            Ok(vm.to_string())
        } else {
            st.by_uuid(Class::Vm, vm)
        }
    }

    /// A new plugged SR of `sr_type` (`ext`, `nfs`, `lvm`, `lvmoiscsi`,
    /// `lvmohba`, `smb`, `iso`, `rawhba`); returns its ref.
    pub fn create_sr(&self, name: &str, sr_type: &str) -> Result<String, SimError> {
        let mut st = self.core.lock();
        let sr = st.sr_create(name, sr_type)?;
        self.core.changed(&st);
        Ok(sr)
    }

    /// Sets an SR's (ref or uuid) `physical_size`; `None`: the default
    /// again ([`model::DEFAULT_SR_PHYSICAL_SIZE`]). Not kept across
    /// restarts (a fault switch).
    pub fn set_sr_physical_size(&self, sr: &str, bytes: Option<u64>) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let sr = if st.srs.contains_key(sr) {
            sr.to_string()
        } else {
            st.by_uuid(Class::Sr, sr)?
        };
        match bytes {
            Some(b) => st.faults.sr_physical_size.insert(sr, b),
            None => st.faults.sr_physical_size.remove(&sr),
        };
        Ok(())
    }

    /// Plugs a CD drive into `vm` (uuid or ref): empty for `None`, else
    /// with a new ISO of that name ([`ISO_BYTES`], on the ISO SR).
    pub fn add_cd(&self, vm: &str, iso_name: Option<&str>) -> Result<SimCd, SimError> {
        let mut st = self.core.lock();
        let vm = Simulator::vm_ref(&st, vm)?;
        let (vbd_ref, vdi_ref) = dispatch::add_cd(&mut st, &vm, iso_name)?;
        self.core.changed(&st);
        Ok(SimCd { vbd_ref, vdi_ref })
    }

    /// Suspends `vm` (uuid or ref, Running or Halted): power state
    /// `Suspended`, a new `suspend_VDI`, whose ref it returns.
    pub fn suspend_vm(&self, vm: &str) -> Result<String, SimError> {
        let mut st = self.core.lock();
        let vm = Simulator::vm_ref(&st, vm)?;
        let vdi = st.vm_suspend(&vm)?;
        self.core.changed(&st);
        Ok(vdi)
    }

    /// A xapi restart now: every session ends and, for `downtime`, the
    /// HTTPS port answers 503 and new NBD connections are refused.
    pub fn restart_xapi(&self, downtime: Duration) {
        let mut st = self.core.lock();
        st.faults.restart_downtime_ms = downtime.as_millis() as u64;
        self.core.restart_xapi(&mut st);
    }

    /// The first non-snapshot VM named `name` (e.g. one kept from an
    /// earlier run in the same state folder).
    pub fn find_vm(&self, name: &str) -> Option<SimVm> {
        let st = self.core.lock();
        let vm = st
            .vms
            .iter()
            .find(|(_, v)| v.name_label == name && !v.is_a_snapshot && !v.is_control_domain)
            .map(|(r, _)| r.clone())?;
        describe_vm(&st, &vm).ok()
    }

    fn vdi_ref(&self, st: &State, vdi: &str) -> Result<String, SimError> {
        Ok(st.vdi_by_ref_or_uuid(vdi)?)
    }

    /// Writes into a live VDI (uuid or ref) as its running VM would.
    pub fn guest_write(&self, vdi: &str, offset: u64, data: &[u8]) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let r = self.vdi_ref(&st, vdi)?;
        Ok(dispatch::guest_write_checked(&mut st, &r, offset, data)?)
    }

    /// Reads a VDI's current content (uuid or ref).
    pub fn read_vdi(&self, vdi: &str, offset: u64, len: usize) -> Result<Vec<u8>, SimError> {
        let disk = {
            let st = self.core.lock();
            let r = self.vdi_ref(&st, vdi)?;
            st.vdi(&r)?
                .data
                .clone()
                .ok_or_else(|| ApiError::incompatible_type(&r, "cbt_metadata"))?
        };
        disk.read(offset, len).map_err(|source| SimError::Storage {
            path: disk.path().display().to_string(),
            source,
        })
    }

    /// CBT switched off by the system on a VDI (uuid or ref).
    pub fn system_disable_cbt(&self, vdi: &str) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let r = self.vdi_ref(&st, vdi)?;
        st.system_disable_cbt(&r)?;
        self.core.changed(&st);
        Ok(())
    }

    /// Starts (`true`) or halts a VM by uuid or ref: its VBDs become
    /// (un)attached, which matters to `list_changed_blocks` on its disks.
    pub fn set_vm_running(&self, vm: &str, running: bool) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let r = if st.vms.contains_key(vm) {
            vm.to_string()
        } else {
            st.by_uuid(Class::Vm, vm)?
        };
        st.vm_set_power(&r, running)?;
        self.core.changed(&st);
        Ok(())
    }

    /// A leftover dom0 attachment of a VDI; returns the VBD ref.
    pub fn attach_to_dom0(&self, vdi: &str) -> Result<String, SimError> {
        let mut st = self.core.lock();
        let r = self.vdi_ref(&st, vdi)?;
        Ok(st.attach_to_dom0(&r, "RO")?)
    }

    pub fn detach(&self, vbd: &str) {
        self.core.lock().detach_and_destroy(vbd);
    }

    /// Changes the fault switches.
    pub fn set_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.core.lock().faults);
    }

    /// Body bytes `/import_raw_vdi` has received since the start (headers
    /// excluded), to check what a chunked import sends.
    pub fn import_bytes_received(&self) -> u64 {
        self.core
            .import_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// VBDs currently attached to any host's dom0 (open NBD connections,
    /// exports).
    pub fn dom0_attachments(&self) -> usize {
        let st = self.core.lock();
        let dom0s = st.control_domains();
        st.vbds
            .values()
            .filter(|b| dom0s.contains(&b.vm) && b.currently_attached)
            .count()
    }

    /// Stops serving and waits for the servers to close.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = self.stop.send(true);
        if let Some(saver) = &self.core.persist {
            let mut saver = saver.lock().unwrap_or_else(|e| e.into_inner());
            // The saver's thread takes the state lock to encode: stop it
            // before taking that lock here.
            saver.finish();
            // NBD connections still open lose their dom0 VBDs with the runtime.
            let st = self.core.lock();
            let _ = persist::save(&st, saver.dir(), true);
        }
        if let Some(rt) = self.runtime.take() {
            // Blocking on a runtime's shutdown is not allowed inside another one.
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
        if self.temporary_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop_now();
    }
}
