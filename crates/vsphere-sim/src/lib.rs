//! A simulated VMware ESXi host: the vim25 subset that CBT backup uses,
//! faithful to sources-reference.md §1 (names, parameters, faults,
//! behaviour) and checked with the official pyVmomi SDK
//! (tests/conformance/pyvmomi_conformance.py), for tests, `cbtvault sim
//! --vmware` and `cbtvault demo --vmware`. Builds on `vim-wire` (the
//! codec the product's client uses too), never on the product. Never prints.
//!
//! ## Model
//! - One HTTPS port (self-signed certificate, [`Simulator::fingerprint`]):
//!   `POST /sdk` (SOAP; `Login` sets the `vmware_soap_session` cookie,
//!   every call but `RetrieveServiceContent`/`Login` needs it, else
//!   `NotAuthenticated`), `GET /sdk/vimServiceVersions.xml` (what
//!   SmartConnect reads), and datastore files `GET|HEAD|PUT
//!   /folder/<path>?dcPath=ha-datacenter&dsName=datastore1` (cookie or
//!   Basic credentials; `Range: bytes=a-b` -> 206 with `Content-Range`).
//! - Inventory as on an ESXi host: `ServiceInstance`, root folder
//!   `ha-folder-root` -> datacenter `ha-datacenter` -> VM folder
//!   `ha-folder-vm` -> VMs `vm-N`; datastore `datastore1` (`datastore-1`).
//!   Inventory paths `ha-datacenter/vm/<name>`.
//! - A VM ([`Simulator::add_vm`]) has disks with keys 2000, 2001, ... on a
//!   paravirtual SCSI controller (key 1000), each a flat ver2 backing
//!   `[datastore1] NAME/NAME.vmdk` (`NAME_1.vmdk`, ...): a descriptor and a
//!   sparse `-flat.vmdk` holding the live bytes.
//! - CBT (see `cbt`): per disk an epoch in vSphere's `52 2d ... 7b` form
//!   and a sequence. Enabling CBT (ReconfigVM_Task) starts a new epoch,
//!   disabling drops it. Every snapshot freezes each disk's bytes (a copy
//!   of its written areas; never changed afterwards) and stamps
//!   `changeId = <epoch>/<seq>` on the snapshot's backing; the live
//!   backing carries the current changeId. Guest writes
//!   ([`Simulator::guest_write`]) record their sectors.
//! - QueryChangedDiskAreas(vm, snapshot, deviceKey, startOffset,
//!   changeId): `*` -> the areas written before the snapshot; a changeId
//!   of the current epoch -> the union of the areas written between it
//!   and the snapshot; another epoch, a disk whose tracking restarted, a
//!   snapshot taken without CBT -> `FileFault`; unknown device key or bad
//!   startOffset -> `InvalidArgument`; unknown snapshot ->
//!   `ManagedObjectNotFound`. Paged: a window of
//!   [`SimOptions::changed_areas_window_bytes`], cut after
//!   [`SimOptions::changed_areas_max_extents`] extents; `startOffset +
//!   length` is where the next call starts. Extents are 512-byte aligned.
//!   Without `snapshot` only a powered-off VM can be asked (`FileFault`).
//! - While a VM has snapshots, its base `-flat.vmdk` served by `/folder`
//!   is the oldest snapshot's frozen bytes (the VM writes to a delta,
//!   `NAME-000001.vmdk`, as its live backing then says); after
//!   RemoveSnapshot_Task (consolidate) it is the live disk again.
//! - Tasks complete at once (their effect happens when called) unless
//!   [`Simulator::set_task_duration`] keeps them `running` for a while.
//! - State: in memory behind one lock; files and `state.json` under the
//!   state folder (a temporary one unless [`SimOptions::dir`] is set); with
//!   a folder of one's own VMs, disks, CBT and snapshots survive a restart
//!   (sessions and tasks do not).
//!
//! ## Test hooks (a real host answers 404)
//! In process: [`Simulator::add_vm`], [`Simulator::guest_write`],
//! [`Simulator::snapshots`], and the faults below. Over HTTPS (session
//! cookie or Basic credentials), answers JSON, errors `{"error": "..."}`
//! with 400:
//! - `POST /sim/add_vm?name=N&disks=BYTES,BYTES` -> the VM.
//! - `POST /sim/guest_write?vm=ID_OR_NAME&disk=KEY&offset=N`, body = bytes.
//! - `GET /sim/vm?vm=ID_OR_NAME`, `GET /sim/snapshots?vm=ID_OR_NAME`, `GET /sim/calls`.
//! - `POST /sim/fault?kind=K&...`: `fail_call` (`method`, `fault` (vim25
//!   name), `count`, optional `message`): the next calls answer that fault;
//!   `fail_task` (`method`, `fault`): its next task ends in error, changing
//!   nothing; `drop` (`target` = a method name or `folder`, `count`): the
//!   response is cut mid-way and the connection closed; `target` =
//!   `folder_put`: a PUT's connection closes after half the body and the
//!   partial file stays; `corrupt_put` (`offset`): the next PUT /folder
//!   stores its body with the byte at that offset inverted; `refuse_put`
//!   (`after`; 0: the next one): the PUT /folder after that many more
//!   stored ones is refused with 503 and the connection closed, nothing
//!   stored and the body not read (a client still sending a large body
//!   may see the connection reset instead; PUTs refused for another reason
//!   do not count); `ignore_range`
//!   (`on`): GET /folder answers 200 with the whole file; `delay` (`ms`):
//!   every response waits; `task_duration` (`ms`); `reset_cbt` (`vm`): a
//!   new epoch on every tracked disk; `disable_cbt` (`vm`); `replace_disk`
//!   (`vm`, `disk`): a new empty disk with a new key and file; `power`
//!   (`vm`, `on`); `clear`: every switch off.
//!
//! ## Limits
//! No vCenter (one host, one datacenter, one datastore), no
//! WaitForUpdatesEx/CreateFilter/ContainerView (poll tasks with
//! RetrievePropertiesEx), no snapshot delta files over `/folder` (only the
//! base), no revert, no memory state, CBT active as soon as enabled (no
//! stun/unstun), `config` holds the fields the workflow needs, not every
//! field of a real VirtualMachineConfigInfo. `PUT /folder` stores a file
//! into an existing folder (refused with 403 for a powered-on VM's disk
//! files, which are locked); `FileManager.MakeDirectory` makes folders,
//! `FileManager.DeleteDatastoreFile_Task` removes a file; nothing
//! registers an uploaded disk with a VM.

mod cbt;
mod dispatch;
pub mod error;
mod extents;
mod hooks;
pub mod http;
mod inventory;
mod model;
mod persist;
mod server;
mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

pub use dispatch::{API_VERSION, COOKIE};
pub use error::SimError;
pub use vim_wire::VimFault;

use model::State;

/// The shared state every connection works on.
pub(crate) struct Core {
    state: Mutex<State>,
    persist: Option<PathBuf>,
    calls: Mutex<Vec<String>>,
    log_file: Option<Mutex<std::fs::File>>,
    pub(crate) username: String,
    pub(crate) password: String,
}

impl Core {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One line of the call log (`SOAP Login ok`, `HTTP GET /folder/... 206 0+512`).
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

    /// Saves the state after a change (when persistent); a failed save
    /// is not the caller's failure.
    pub(crate) fn changed(&self, st: &State) {
        if let Some(dir) = &self.persist {
            let _ = persist::save(st, dir);
        }
    }
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// State folder (datastore, frozen snapshots, certificate, state.json).
    /// `None`: a new temporary folder, removed when the simulator stops.
    pub dir: Option<PathBuf>,
    /// HTTPS address, e.g. `127.0.0.1:0` (port 0 picks one).
    pub listen: String,
    pub username: String,
    pub password: String,
    /// The DNS name in the certificate (besides 127.0.0.1 and ::1).
    pub hostname: String,
    /// QueryChangedDiskAreas covers at most this many bytes per call
    /// (default 2 GiB, the window of the reference's example answer; tests
    /// of the paging loop set a few MiB).
    pub changed_areas_window_bytes: u64,
    /// ... and at most this many extents (default 1024).
    pub changed_areas_max_extents: usize,
    /// Appends every call (and /folder access) to this file, one per line.
    pub log_calls: Option<PathBuf>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            dir: None,
            listen: "127.0.0.1:0".into(),
            username: "root".into(),
            password: "sim-password".into(),
            hostname: "localhost".into(),
            changed_areas_window_bytes: 2 << 30,
            changed_areas_max_extents: 1024,
            log_calls: None,
        }
    }
}

/// A disk of a simulated VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SimDisk {
    /// The device key (`deviceKey`).
    pub key: i32,
    pub capacity_bytes: u64,
    /// The live backing's fileName, `[datastore1] vm/vm.vmdk` (a delta
    /// name while snapshots exist).
    pub file_name: String,
    /// The base flat file's datastore-relative path for `/folder`.
    pub flat_path: String,
    /// The live backing's changeId, when CBT is on.
    pub change_id: Option<String>,
}

/// A simulated VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SimVm {
    /// The moref value, `vm-N`.
    pub id: String,
    pub name: String,
    /// `config.uuid` (BIOS).
    pub uuid: String,
    pub instance_uuid: String,
    pub cbt_enabled: bool,
    pub disks: Vec<SimDisk>,
}

/// A snapshot of a simulated VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SimSnapshot {
    /// The moref value, `snapshot-N`.
    pub id: String,
    pub name: String,
    /// (device key, changeId) per disk.
    pub change_ids: Vec<(i32, Option<String>)>,
}

/// A running simulator; stops when dropped.
pub struct Simulator {
    runtime: Option<tokio::runtime::Runtime>,
    core: Arc<Core>,
    stop: watch::Sender<bool>,
    address: SocketAddr,
    certificate_pem: String,
    fingerprint: String,
    dir: PathBuf,
    temporary_dir: bool,
}

impl Simulator {
    /// Binds the port, makes (or reloads) the certificate and state, and
    /// serves on a runtime of its own.
    pub fn start(options: SimOptions) -> Result<Simulator, SimError> {
        let (dir, temporary_dir) = match &options.dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!(
                    "cbtvault-vsphere-sim-{}",
                    hex::encode(rand::random::<[u8; 8]>())
                )),
                true,
            ),
        };
        std::fs::create_dir_all(&dir).map_err(|source| SimError::Storage {
            path: dir.display().to_string(),
            source,
        })?;
        Simulator::start_in(options, dir.clone(), temporary_dir).inspect_err(|_| {
            if temporary_dir {
                let _ = std::fs::remove_dir_all(&dir);
            }
        })
    }

    fn start_in(
        options: SimOptions,
        dir: PathBuf,
        temporary_dir: bool,
    ) -> Result<Simulator, SimError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cbtvault-vsphere-sim")
            .enable_all()
            .build()
            .map_err(|e| SimError::Runtime(e.to_string()))?;
        let listen_error = |source| SimError::Listen {
            address: options.listen.clone(),
            source,
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&options.listen))
            .map_err(listen_error)?;
        let address = listener.local_addr().map_err(listen_error)?;
        let names = vec![
            options.hostname.clone(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let (certificate_pem, key_pem) = host_certificate(&dir, names)?;
        let fingerprint = certificate_fingerprint(&certificate_pem)?;
        let tls = server_config(&certificate_pem, &key_pem)?;

        let storage = |source| SimError::Storage {
            path: dir.display().to_string(),
            source,
        };
        let store = store::Store::new(&dir).map_err(storage)?;
        let paging = model::Paging {
            window_bytes: options.changed_areas_window_bytes.max(512),
            max_extents: options.changed_areas_max_extents.max(1),
        };
        let persist = (!temporary_dir).then(|| dir.clone());
        let mut state = match &persist {
            Some(d) => persist::load(d)?.unwrap_or_else(|| State::new(store.clone(), paging)),
            None => State::new(store.clone(), paging),
        };
        state.store = store;
        state.paging = paging;
        if let Some(d) = &persist {
            persist::save(&state, d)?;
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
        let core = Arc::new(Core {
            state: Mutex::new(state),
            persist,
            calls: Mutex::new(Vec::new()),
            log_file,
            username: options.username.clone(),
            password: options.password.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        runtime.spawn(server::serve(listener, acceptor, core.clone(), stop_rx));
        Ok(Simulator {
            runtime: Some(runtime),
            core,
            stop,
            address,
            certificate_pem,
            fingerprint,
            dir,
            temporary_dir,
        })
    }

    /// The HTTPS address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `https://ADDR:PORT/sdk`, the SOAP endpoint.
    pub fn url(&self) -> String {
        format!("https://{}/sdk", self.address)
    }

    /// The host certificate (PEM), to pin.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// SHA-256 of the certificate, `AB:CD:...`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn username(&self) -> &str {
        &self.core.username
    }

    pub fn password(&self) -> &str {
        &self.core.password
    }

    /// The state folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every call so far, in order: `SOAP METHOD ok`, `SOAP METHOD
    /// FAULTTYPE`, `HTTP GET /folder/PATH STATUS[ START+LEN]`, `HTTP PUT
    /// /folder/PATH STATUS LEN`.
    pub fn calls(&self) -> Vec<String> {
        self.core
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A new powered-on VM with one disk per size (bytes, multiples of
    /// 1024), CBT off.
    pub fn add_vm(&self, name: &str, disk_sizes: &[u64]) -> Result<SimVm, SimError> {
        let mut st = self.core.lock();
        let id = st.add_vm(name, disk_sizes).map_err(SimError::Invalid)?;
        self.core.changed(&st);
        describe(&st, &id)
    }

    /// A VM by moref value or name.
    pub fn vm(&self, vm: &str) -> Option<SimVm> {
        let st = self.core.lock();
        let id = vm_id(&st, vm).ok()?;
        describe(&st, &id).ok()
    }

    /// Writes into a VM's live disk as its guest would (CBT records it).
    pub fn guest_write(
        &self,
        vm: &str,
        disk_key: i32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let id = vm_id(&st, vm)?;
        st.guest_write(&id, disk_key, offset, data)
            .map_err(SimError::Invalid)?;
        self.core.changed(&st);
        Ok(())
    }

    /// Reads a VM's live disk.
    pub fn read_disk(
        &self,
        vm: &str,
        disk_key: i32,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, SimError> {
        let path = {
            let st = self.core.lock();
            let id = vm_id(&st, vm)?;
            let v = st
                .vm(&id)
                .map_err(|f| SimError::Invalid(f.type_name().into()))?;
            let d =
                v.disks.iter().find(|d| d.key == disk_key).ok_or_else(|| {
                    SimError::Invalid(format!("VM '{vm}' has no disk {disk_key}"))
                })?;
            st.store.live(&d.descriptor)
        };
        store::read_at(&path, offset, len).map_err(|source| SimError::Storage {
            path: path.display().to_string(),
            source,
        })
    }

    /// A VM's snapshots, oldest first.
    pub fn snapshots(&self, vm: &str) -> Result<Vec<SimSnapshot>, SimError> {
        let st = self.core.lock();
        let id = vm_id(&st, vm)?;
        Ok(snapshots_of(&st, &id))
    }

    /// Powers a VM on or off.
    pub fn set_powered_on(&self, vm: &str, on: bool) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let id = vm_id(&st, vm)?;
        if let Some(v) = st.vms.get_mut(&id) {
            v.powered_on = on;
        }
        self.core.changed(&st);
        Ok(())
    }

    /// The next `count` calls of `method` (`QueryChangedDiskAreas`, ...)
    /// answer `fault`.
    pub fn fail_calls(&self, method: &str, count: u32, fault: VimFault) {
        self.core.lock().faults.fail_calls.push(model::FailCalls {
            method: method.to_string(),
            remaining: count,
            fault,
            message: String::new(),
        });
    }

    /// The next task of `method` (`CreateSnapshot_Task`, ...) ends in
    /// error with `fault` and changes nothing.
    pub fn fail_next_task(&self, method: &str, fault: VimFault) {
        self.core
            .lock()
            .faults
            .fail_tasks
            .push((method.to_string(), fault));
    }

    /// The next `count` responses to `target` (a method name, or
    /// `folder` for GET /folder) stop half-way and the connection closes.
    pub fn drop_responses(&self, target: &str, count: u32) {
        *self
            .core
            .lock()
            .faults
            .drop_responses
            .entry(target.to_string())
            .or_default() += count;
    }

    /// The next PUT /folder stores its body with the byte at `offset`
    /// inverted (answering as if all were well).
    pub fn corrupt_next_put(&self, offset: u64) {
        self.core.lock().faults.corrupt_put = Some(offset);
    }

    /// The PUT /folder after `after` more is refused (503, nothing stored,
    /// the body not read; see `refuse_put` above).
    pub fn refuse_put_after(&self, after: u32) {
        self.core.lock().faults.refuse_put_after = Some(after);
    }

    /// GET /folder ignores `Range` (answers 200 with the whole file).
    pub fn set_ignore_range(&self, on: bool) {
        self.core.lock().faults.ignore_range = on;
    }

    /// Every response waits this long.
    pub fn set_delay(&self, delay: Duration) {
        self.core.lock().faults.delay = delay;
    }

    /// Tasks created from now stay `running` this long.
    pub fn set_task_duration(&self, duration: Duration) {
        self.core.lock().faults.task_duration = duration;
    }

    /// Every fault switch off.
    pub fn clear_faults(&self) {
        self.core.lock().faults = model::Faults::default();
    }

    /// CBT restarts on the VM's tracked disks (a new epoch).
    pub fn reset_cbt(&self, vm: &str) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let id = vm_id(&st, vm)?;
        st.reset_cbt(&id)
            .map_err(|f| SimError::Invalid(f.type_name().into()))?;
        self.core.changed(&st);
        Ok(())
    }

    /// CBT switched off on the VM (as ReconfigVM_Task would).
    pub fn disable_cbt(&self, vm: &str) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let id = vm_id(&st, vm)?;
        st.set_change_tracking(&id, false)
            .map_err(|f| SimError::Invalid(f.type_name().into()))?;
        self.core.changed(&st);
        Ok(())
    }

    /// Disk `key` is replaced by a new empty disk of the same size with a
    /// new key and file; returns the new key.
    pub fn replace_disk(&self, vm: &str, key: i32) -> Result<i32, SimError> {
        let mut st = self.core.lock();
        let id = vm_id(&st, vm)?;
        let k = st.replace_disk(&id, key).map_err(SimError::Invalid)?;
        self.core.changed(&st);
        Ok(k)
    }

    /// Extends disk `key` of a VM without snapshots to `capacity` bytes
    /// (a test hook: an administrator growing a disk).
    pub fn extend_disk(&self, vm: &str, key: i32, capacity: u64) -> Result<(), SimError> {
        let mut st = self.core.lock();
        let id = vm_id(&st, vm)?;
        st.extend_disk(&id, key, capacity)
            .map_err(SimError::Invalid)?;
        self.core.changed(&st);
        Ok(())
    }

    /// Stops serving and waits for the server to close.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = self.stop.send(true);
        if let Some(dir) = &self.core.persist {
            let _ = persist::save(&self.core.lock(), dir);
        }
        if let Some(rt) = self.runtime.take() {
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

/// A VM's id from its id or name.
pub(crate) fn vm_id(st: &State, vm: &str) -> Result<String, SimError> {
    if st.vms.contains_key(vm) {
        return Ok(vm.to_string());
    }
    st.vms
        .values()
        .find(|v| v.name == vm)
        .map(|v| v.id.clone())
        .ok_or_else(|| SimError::Invalid(format!("no VM '{vm}'")))
}

pub(crate) fn describe(st: &State, id: &str) -> Result<SimVm, SimError> {
    let v = st
        .vms
        .get(id)
        .ok_or_else(|| SimError::Invalid(format!("no VM '{id}'")))?;
    Ok(SimVm {
        id: v.id.clone(),
        name: v.name.clone(),
        uuid: v.uuid.clone(),
        instance_uuid: v.instance_uuid.clone(),
        cbt_enabled: v.cbt_enabled,
        disks: v
            .disks
            .iter()
            .map(|d| SimDisk {
                key: d.key,
                capacity_bytes: d.capacity_bytes,
                file_name: State::backing_name(&d.descriptor, v.snapshots.len()),
                flat_path: store::flat_name(&d.descriptor),
                change_id: d.tracking.as_ref().map(|t| t.change_id()),
            })
            .collect(),
    })
}

pub(crate) fn snapshots_of(st: &State, id: &str) -> Vec<SimSnapshot> {
    let Some(v) = st.vms.get(id) else {
        return Vec::new();
    };
    v.snapshots
        .iter()
        .filter_map(|s| st.snapshots.get(s))
        .map(|s| SimSnapshot {
            id: s.id.clone(),
            name: s.name.clone(),
            change_ids: s
                .disks
                .iter()
                .map(|d| (d.key, d.change_id.clone()))
                .collect(),
        })
        .collect()
}

/// The certificate and key (PEM), kept in the state folder so that a
/// restarted simulator keeps its fingerprint.
fn host_certificate(dir: &Path, names: Vec<String>) -> Result<(String, String), SimError> {
    let cert_path = dir.join("host-cert.pem");
    let key_path = dir.join("host-key.pem");
    if let (Ok(c), Ok(k)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        return Ok((c, k));
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

/// The DER certificates of a PEM text.
fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(b) = rest.find(&begin) {
        let after = &rest[b + begin.len()..];
        let Some(e) = after.find(&end) else { break };
        let body: String = after[..e].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body) {
            out.push(der);
        }
        rest = &after[e + end.len()..];
    }
    out
}

/// `AB:CD:...`: SHA-256 of the certificate's DER, as `openssl x509
/// -fingerprint -sha256` prints it.
pub fn certificate_fingerprint(cert_pem: &str) -> Result<String, SimError> {
    let der = pem_blocks(cert_pem, "CERTIFICATE")
        .into_iter()
        .next()
        .ok_or_else(|| SimError::Certificate("no certificate in PEM".into()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    Ok(digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, SimError> {
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        pem_blocks(cert_pem, "CERTIFICATE")
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect();
    let key = pem_blocks(key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .ok_or_else(|| SimError::Certificate("no PKCS#8 private key in PEM".into()))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SimError::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| SimError::Certificate(e.to_string()))?;
    Ok(Arc::new(config))
}
