//! The simulated host's objects and the rules of the calls on them: VMs
//! with their disks (live bytes on the datastore, CBT per disk), snapshots
//! (frozen bytes, changeIds), tasks, sessions, and the fault switches.
//! No wire format here: calls come in as plain arguments and leave as
//! values or a [`VimFault`] (the dispatcher turns them into SOAP).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vim_wire::{DiskChangeExtent, DiskChangeInfo, Moref, VimFault};

use crate::cbt::{CbtRefusal, Tracking};
use crate::extents::{ExtentSet, SECTOR};
use crate::store::{self, Store};

/// Managed object ids of the fixed inventory (ESXi's names).
pub const SERVICE_INSTANCE: &str = "ServiceInstance";
pub const ROOT_FOLDER: &str = "ha-folder-root";
pub const VM_FOLDER: &str = "ha-folder-vm";
pub const DATACENTER: &str = "ha-datacenter";
pub const DATASTORE_ID: &str = "datastore-1";
pub const PROPERTY_COLLECTOR: &str = "ha-property-collector";
pub const SESSION_MANAGER: &str = "ha-sessionmgr";
pub const SEARCH_INDEX: &str = "ha-searchindex";
pub const FILE_MANAGER: &str = "ha-nfc-file-manager";
pub const VIRTUAL_DISK_MANAGER: &str = "ha-vdiskmanager";
/// The one ESXi host (`runtime.host` of every VM).
pub const HOST_SYSTEM: &str = "ha-host";
pub const VIEW_MANAGER: &str = "ViewManager";
/// The first disk's device key, and its SCSI controller's.
pub const FIRST_DISK_KEY: i32 = 2000;
pub const SCSI_CONTROLLER_KEY: i32 = 1000;

/// A disk of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disk {
    pub key: i32,
    pub unit_number: i32,
    /// Datastore-relative descriptor, `vm/vm.vmdk`.
    pub descriptor: String,
    pub capacity_bytes: u64,
    /// The backing's `uuid` (`6000C29...`).
    pub uuid: String,
    pub content_id: String,
    /// CBT while enabled.
    pub tracking: Option<Tracking>,
    /// Sectors ever written (what `*` reports).
    pub allocated: ExtentSet,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: String,
    /// BIOS uuid (`config.uuid`).
    pub uuid: String,
    pub instance_uuid: String,
    pub powered_on: bool,
    pub cbt_enabled: bool,
    pub disks: Vec<Disk>,
    /// Snapshot ids, oldest first: a chain, each the child of the one before.
    pub snapshots: Vec<String>,
    pub change_version: u64,
    pub create_time: String,
}

/// A disk as a snapshot froze it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub key: i32,
    pub unit_number: i32,
    /// The VM disk's descriptor (its base).
    pub descriptor: String,
    pub capacity_bytes: u64,
    pub uuid: String,
    pub content_id: String,
    /// `<epoch>/<seq>` when CBT was on.
    pub change_id: Option<String>,
    /// What was allocated when frozen.
    pub allocated: ExtentSet,
    /// The byte ranges the guest wrote since: their frozen bytes were
    /// copied into the snapshot's file first (copy-on-write); every other
    /// byte is still the live file's.
    #[serde(default)]
    pub saved: ExtentSet,
}

/// What GET /folder serves for a path.
#[derive(Debug, Clone)]
pub enum FolderView {
    /// A file as it is.
    Plain(PathBuf),
    /// A disk's base under a snapshot: `saved` ranges from the frozen
    /// file, the rest from the live one.
    Frozen {
        frozen: PathBuf,
        live: PathBuf,
        saved: ExtentSet,
        size: u64,
    },
}

impl FolderView {
    pub fn size(&self) -> std::io::Result<u64> {
        match self {
            FolderView::Plain(p) => Ok(std::fs::metadata(p)?.len()),
            FolderView::Frozen { size, .. } => Ok(*size),
        }
    }

    /// Fills `buf` from `offset` (zeros past a file's end).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut fill = |path: &std::path::Path, s: u64, e: u64| -> std::io::Result<()> {
            store::read_into(
                path,
                s,
                &mut buf[(s - offset) as usize..(e - offset) as usize],
            )
        };
        match self {
            FolderView::Plain(p) => fill(p, offset, end),
            FolderView::Frozen {
                frozen,
                live,
                saved,
                ..
            } => {
                for (s, e) in saved.clipped(offset, end) {
                    fill(frozen, s, e)?;
                }
                for (s, e) in saved.gaps(offset, end) {
                    fill(live, s, e)?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub vm: String,
    /// `VirtualMachineSnapshotTree.id`.
    pub number: i32,
    pub name: String,
    pub description: String,
    pub create_time: String,
    pub quiesced: bool,
    pub powered_on: bool,
    pub cbt_enabled: bool,
    pub disks: Vec<SnapshotDisk>,
}

/// A task; its effect happened when it was created, its state says
/// `running` until `ready_at` (the `task_duration` fault).
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    /// `VirtualMachine.createSnapshot`, ...
    pub name: String,
    pub description_id: String,
    pub entity: Moref,
    pub entity_name: String,
    pub result: Option<Moref>,
    pub error: Option<(VimFault, String)>,
    pub queue_time: String,
    pub ready_at: Instant,
    pub user: String,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub key: String,
    pub user: String,
    pub call_count: i64,
}

/// Fault switches (not kept across restarts).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next `remaining` calls of `method` answer `fault`.
    pub fail_calls: Vec<FailCalls>,
    /// The next task of a method (`CreateSnapshot_Task`, ...) ends in
    /// error with this fault and changes nothing.
    pub fail_tasks: Vec<(String, VimFault)>,
    /// Responses to cut mid-way: key a method name, or `folder` for GET
    /// /folder; value how many.
    pub drop_responses: BTreeMap<String, u32>,
    /// GET /folder ignores `Range` (200 with the whole file).
    pub ignore_range: bool,
    /// The next PUT /folder stores its body with the byte at this offset
    /// inverted (a host that damages what it stores).
    pub corrupt_put: Option<u64>,
    /// PUTs /folder to let through before one is refused (503, nothing
    /// stored, the body not read): a host that fails an upload outright.
    pub refuse_put_after: Option<u32>,
    /// Every response waits this long first.
    pub delay: Duration,
    /// Tasks stay `running` this long.
    pub task_duration: Duration,
}

#[derive(Debug, Clone)]
pub struct FailCalls {
    pub method: String,
    pub remaining: u32,
    pub fault: VimFault,
    pub message: String,
}

/// Limits of QueryChangedDiskAreas' pages.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    pub window_bytes: u64,
    pub max_extents: usize,
}

/// Everything the simulator knows.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub vms: BTreeMap<String, Vm>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub next_id: u64,
    #[serde(skip)]
    pub tasks: BTreeMap<String, Task>,
    #[serde(skip)]
    pub sessions: BTreeMap<String, Session>,
    #[serde(skip)]
    pub faults: Faults,
    /// RetrievePropertiesEx continuation tokens -> (page size, what is left).
    #[serde(skip)]
    pub pending: BTreeMap<String, (usize, Vec<vim_wire::ObjectContent>)>,
    #[serde(skip, default = "default_paging")]
    pub paging: Paging,
    #[serde(skip, default = "default_store")]
    pub store: Store,
}

fn default_paging() -> Paging {
    Paging {
        window_bytes: 2 << 30,
        max_extents: 1024,
    }
}

fn default_store() -> Store {
    Store {
        datastore: PathBuf::new(),
        frozen: PathBuf::new(),
    }
}

/// `2026-11-21T22:00:00Z`, now.
pub fn now_iso() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let (h, m, s) = ((secs % 86400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// A random uuid, `8-4-4-4-12` lower-case hex, with a fixed prefix.
pub fn new_uuid(prefix: &str) -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    let h = format!("{prefix}{}", &h[prefix.len()..]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn not_found(kind: &str, id: &str) -> VimFault {
    VimFault::ManagedObjectNotFound {
        obj: Moref::new(kind, id),
    }
}

fn invalid_argument(property: &str) -> VimFault {
    VimFault::InvalidArgument {
        invalid_property: Some(property.to_string()),
    }
}

impl State {
    pub fn new(store: Store, paging: Paging) -> State {
        State {
            vms: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            next_id: 1,
            tasks: BTreeMap::new(),
            sessions: BTreeMap::new(),
            faults: Faults::default(),
            pending: BTreeMap::new(),
            paging,
            store,
        }
    }

    pub fn next(&mut self, prefix: &str) -> String {
        let id = format!("{prefix}-{}", self.next_id);
        self.next_id += 1;
        id
    }

    pub fn vm(&self, id: &str) -> Result<&Vm, VimFault> {
        self.vms
            .get(id)
            .ok_or_else(|| not_found("VirtualMachine", id))
    }

    fn vm_mut(&mut self, id: &str) -> Result<&mut Vm, VimFault> {
        self.vms
            .get_mut(id)
            .ok_or_else(|| not_found("VirtualMachine", id))
    }

    pub fn snapshot(&self, id: &str) -> Result<&Snapshot, VimFault> {
        self.snapshots
            .get(id)
            .ok_or_else(|| not_found("VirtualMachineSnapshot", id))
    }

    /// A new powered-on VM with one disk per capacity (bytes, whole KiB),
    /// CBT off. Its files go to `<name>/` on the datastore.
    pub fn add_vm(&mut self, name: &str, capacities: &[u64]) -> Result<String, String> {
        if name.is_empty() || store::safe_relative(name).is_none() || name.contains('/') {
            return Err(format!("bad VM name '{name}'"));
        }
        if self.vms.values().any(|v| v.name == name) {
            return Err(format!("a VM named '{name}' exists"));
        }
        let id = self.next("vm");
        let mut vm = Vm {
            id: id.clone(),
            name: name.to_string(),
            uuid: new_uuid("4230"),
            instance_uuid: new_uuid("5030"),
            powered_on: true,
            cbt_enabled: false,
            disks: Vec::new(),
            snapshots: Vec::new(),
            change_version: 1,
            create_time: now_iso(),
        };
        for &capacity in capacities {
            let disk = self.new_disk(&vm, capacity)?;
            vm.disks.push(disk);
        }
        self.vms.insert(id.clone(), vm);
        Ok(id)
    }

    /// A new disk for `vm` at its next key, unit and file name.
    fn new_disk(&self, vm: &Vm, capacity: u64) -> Result<Disk, String> {
        if capacity == 0 || !capacity.is_multiple_of(1024) {
            return Err(format!(
                "disk capacity {capacity} is not a positive multiple of 1024 bytes"
            ));
        }
        let key = vm
            .disks
            .iter()
            .map(|d| d.key + 1)
            .max()
            .unwrap_or(FIRST_DISK_KEY);
        let mut unit = 0;
        while unit == 7 || vm.disks.iter().any(|d| d.unit_number == unit) {
            unit += 1;
        }
        let mut n = 0;
        let descriptor = loop {
            let d = if n == 0 {
                format!("{0}/{0}.vmdk", vm.name)
            } else {
                format!("{0}/{0}_{n}.vmdk", vm.name)
            };
            if !self.store.datastore.join(&d).exists() {
                break d;
            }
            n += 1;
        };
        let uuid = new_uuid("6000c29");
        self.store
            .create_disk(&descriptor, capacity, &uuid)
            .map_err(|e| format!("create disk '{descriptor}': {e}"))?;
        Ok(Disk {
            key,
            unit_number: unit,
            descriptor,
            capacity_bytes: capacity,
            uuid,
            content_id: hex::encode(rand::random::<[u8; 16]>()),
            tracking: vm.cbt_enabled.then(Tracking::start),
            allocated: ExtentSet::default(),
        })
    }

    /// A guest write to the live disk `key` of `vm`: the bytes, the
    /// allocation record and CBT.
    pub fn guest_write(
        &mut self,
        vm: &str,
        key: i32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let live = {
            let v = self.vms.get(vm).ok_or_else(|| format!("no VM '{vm}'"))?;
            let d = v
                .disks
                .iter()
                .find(|d| d.key == key)
                .ok_or_else(|| format!("VM '{vm}' has no disk {key}"))?;
            let end = offset
                .checked_add(data.len() as u64)
                .filter(|&e| e <= d.capacity_bytes)
                .ok_or_else(|| {
                    format!(
                        "write of {} bytes at {offset} is beyond disk {key} ({} bytes)",
                        data.len(),
                        d.capacity_bytes
                    )
                })?;
            let _ = end;
            (
                self.store.live(&d.descriptor),
                d.descriptor.clone(),
                v.snapshots.clone(),
            )
        };
        let (live, descriptor, snapshots) = live;
        let end = offset + data.len() as u64;
        for id in snapshots {
            let frozen = self.store.frozen_file(&id, key);
            let Some(sd) = self
                .snapshots
                .get_mut(&id)
                .and_then(|s| s.disks.iter_mut().find(|sd| sd.key == key))
            else {
                continue;
            };
            if sd.descriptor != descriptor {
                continue;
            }
            for (s, e) in sd.saved.gaps(offset, end) {
                store::copy_range(&live, &frozen, s, e)
                    .map_err(|e| format!("copy-on-write into '{}': {e}", frozen.display()))?;
                sd.saved.insert(s, e);
            }
        }
        store::write_at(&live, offset, data)
            .map_err(|e| format!("write '{}': {e}", live.display()))?;
        let v = self
            .vms
            .get_mut(vm)
            .ok_or_else(|| format!("no VM '{vm}'"))?;
        if let Some(d) = v.disks.iter_mut().find(|d| d.key == key) {
            d.allocated.insert_sectors(offset, end);
            if let Some(t) = &mut d.tracking {
                t.record(offset, end);
            }
            d.content_id = hex::encode(rand::random::<[u8; 16]>());
        }
        Ok(())
    }

    /// ReconfigVM_Task's `changeTrackingEnabled`.
    pub fn set_change_tracking(&mut self, vm: &str, enabled: bool) -> Result<(), VimFault> {
        let v = self.vm_mut(vm)?;
        if v.cbt_enabled == enabled {
            return Ok(());
        }
        v.cbt_enabled = enabled;
        v.change_version += 1;
        for d in &mut v.disks {
            d.tracking = enabled.then(Tracking::start);
        }
        Ok(())
    }

    /// Tracking restarts on every disk of `vm` (a new epoch), as after a
    /// crash or a storage migration.
    pub fn reset_cbt(&mut self, vm: &str) -> Result<(), VimFault> {
        let v = self.vm_mut(vm)?;
        for d in &mut v.disks {
            if d.tracking.is_some() {
                d.tracking = Some(Tracking::start());
            }
        }
        Ok(())
    }

    /// Disk `key` is replaced by a new empty one (new key, new file).
    pub fn replace_disk(&mut self, vm: &str, key: i32) -> Result<i32, String> {
        let v = self
            .vms
            .get(vm)
            .cloned()
            .ok_or_else(|| format!("no VM '{vm}'"))?;
        let pos = v
            .disks
            .iter()
            .position(|d| d.key == key)
            .ok_or_else(|| format!("VM '{vm}' has no disk {key}"))?;
        let capacity = v.disks[pos].capacity_bytes;
        let mut disk = self.new_disk(&v, capacity)?;
        disk.unit_number = v.disks[pos].unit_number;
        let new_key = disk.key;
        let vm_mut = self
            .vms
            .get_mut(vm)
            .ok_or_else(|| format!("no VM '{vm}'"))?;
        vm_mut.disks[pos] = disk;
        vm_mut.change_version += 1;
        Ok(new_key)
    }

    /// Extends disk `key` of a VM without snapshots to `capacity` bytes
    /// (the new bytes read as zeros; tracking goes on, as ESXi's does).
    pub fn extend_disk(&mut self, vm: &str, key: i32, capacity: u64) -> Result<(), String> {
        let store = self.store.clone();
        let v = self
            .vms
            .get_mut(vm)
            .ok_or_else(|| format!("no VM '{vm}'"))?;
        if !v.snapshots.is_empty() {
            return Err(format!(
                "VM '{vm}' has snapshots: a disk under one cannot grow"
            ));
        }
        let d = v
            .disks
            .iter_mut()
            .find(|d| d.key == key)
            .ok_or_else(|| format!("VM '{vm}' has no disk {key}"))?;
        if capacity <= d.capacity_bytes || !capacity.is_multiple_of(1024) {
            return Err(format!(
                "disk {key} is {} bytes: {capacity} is not larger, or not a multiple of 1024",
                d.capacity_bytes
            ));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(store.live(&d.descriptor))
            .and_then(|f| f.set_len(capacity))
            .map_err(|e| format!("extend disk {key}: {e}"))?;
        d.capacity_bytes = capacity;
        v.change_version += 1;
        Ok(())
    }

    /// CreateSnapshot_Task: freezes every disk and stamps changeIds.
    pub fn create_snapshot(
        &mut self,
        vm: &str,
        name: &str,
        description: &str,
        memory: bool,
        quiesce: bool,
    ) -> Result<String, VimFault> {
        let v = self.vm(vm)?.clone();
        let id = self.next("snapshot");
        let number = v.snapshots.len() as i32 + 1;
        let mut disks = Vec::new();
        for d in &v.disks {
            // Nothing is copied now: the guest's next writes copy the
            // bytes they replace first (as ESXi redirects them to a delta).
            let frozen = self.store.frozen_file(&id, d.key);
            if let Err(e) = store::create_sparse(&frozen, d.capacity_bytes) {
                self.store.remove_frozen(&id);
                return Err(VimFault::FileFault {
                    file: format!("{}: {e}", store::datastore_path(&d.descriptor)),
                });
            }
            disks.push(SnapshotDisk {
                key: d.key,
                unit_number: d.unit_number,
                descriptor: d.descriptor.clone(),
                capacity_bytes: d.capacity_bytes,
                uuid: d.uuid.clone(),
                content_id: d.content_id.clone(),
                change_id: None,
                allocated: d.allocated.clone(),
                saved: ExtentSet::default(),
            });
        }
        let vm_mut = self.vm_mut(vm)?;
        for (d, s) in vm_mut.disks.iter_mut().zip(disks.iter_mut()) {
            if let Some(t) = &mut d.tracking {
                s.change_id = Some(t.snapshot());
            }
        }
        vm_mut.snapshots.push(id.clone());
        vm_mut.change_version += 1;
        let snap = Snapshot {
            id: id.clone(),
            vm: vm.to_string(),
            number,
            name: name.to_string(),
            description: description.to_string(),
            create_time: now_iso(),
            // Quiescing needs VMware Tools in a running guest; the
            // simulated guest has them when powered on.
            quiesced: quiesce && v.powered_on,
            powered_on: memory && v.powered_on,
            cbt_enabled: v.cbt_enabled,
            disks,
        };
        self.snapshots.insert(id.clone(), snap);
        Ok(id)
    }

    /// RemoveSnapshot_Task: the snapshot (and with `remove_children` the
    /// ones after it in the chain) goes; its frozen bytes are dropped
    /// (consolidated: the base is the live disk again once none is left).
    pub fn remove_snapshot(&mut self, id: &str, remove_children: bool) -> Result<(), VimFault> {
        let vm = self.snapshot(id)?.vm.clone();
        let v = self.vm_mut(&vm)?;
        let pos = v
            .snapshots
            .iter()
            .position(|s| s == id)
            .ok_or_else(|| not_found("VirtualMachineSnapshot", id))?;
        let gone: Vec<String> = if remove_children {
            v.snapshots.drain(pos..).collect()
        } else {
            vec![v.snapshots.remove(pos)]
        };
        v.change_version += 1;
        for s in gone {
            self.snapshots.remove(&s);
            self.store.remove_frozen(&s);
        }
        Ok(())
    }

    /// Whether datastore-relative `relative` is a file of a powered-on
    /// VM's disk (its descriptor or base flat file): ESXi locks those.
    pub fn disk_file_in_use(&self, relative: &str) -> bool {
        self.vms.values().filter(|v| v.powered_on).any(|v| {
            v.disks
                .iter()
                .any(|d| d.descriptor == relative || store::flat_name(&d.descriptor) == relative)
        })
    }

    /// FileManager.MakeDirectory: `name` is `[datastore1] PATH`; an
    /// existing folder is `FileAlreadyExists`, a missing parent without
    /// `create_parents` `FileNotFound`.
    pub fn make_directory(&mut self, name: &str, create_parents: bool) -> Result<(), VimFault> {
        let fault = |type_name: &str| VimFault::Other {
            type_name: type_name.to_string(),
        };
        let relative = name
            .strip_prefix(&format!("[{}] ", store::DATASTORE))
            .ok_or_else(|| fault("InvalidDatastore"))?;
        let path = self
            .store
            .file(relative.trim_end_matches('/'))
            .ok_or_else(|| fault("InvalidDatastorePath"))?;
        if path.exists() {
            return Err(fault("FileAlreadyExists"));
        }
        if !create_parents && !path.parent().is_some_and(|p| p.is_dir()) {
            return Err(fault("FileNotFound"));
        }
        std::fs::create_dir_all(&path).map_err(|_| fault("CannotCreateFile"))
    }

    /// FileManager.DeleteDatastoreFile_Task: `name` is `[datastore1] PATH`.
    /// A VM's disk file is locked (`FileLocked`); a missing file is
    /// `FileNotFound`.
    pub fn delete_datastore_file(&mut self, name: &str) -> Result<(), VimFault> {
        let file_fault = |type_name: &str| VimFault::Other {
            type_name: type_name.to_string(),
        };
        let relative = name
            .strip_prefix(&format!("[{}] ", store::DATASTORE))
            .ok_or_else(|| file_fault("InvalidDatastore"))?;
        let path = self
            .store
            .file(relative)
            .ok_or_else(|| file_fault("InvalidDatastorePath"))?;
        if self.disk_file_in_use(relative) {
            return Err(file_fault("FileLocked"));
        }
        if !path.is_file() {
            return Err(file_fault("FileNotFound"));
        }
        std::fs::remove_file(&path).map_err(|_| file_fault("CannotDeleteFile"))
    }

    /// The file GET /folder serves for a datastore-relative path: a
    /// disk's base `-flat.vmdk` is the oldest snapshot's frozen bytes
    /// while the VM has snapshots (the VM writes to a delta), else the
    /// live file. `None`: no such file.
    pub fn folder_view(&self, relative: &str) -> Option<FolderView> {
        let path = self.store.file(relative)?;
        for v in self.vms.values() {
            for d in &v.disks {
                if store::flat_name(&d.descriptor) == relative {
                    let first = v.snapshots.first().and_then(|f| self.snapshots.get(f));
                    if let Some(snap) = first {
                        let saved = snap
                            .disks
                            .iter()
                            .find(|sd| sd.key == d.key && sd.descriptor == d.descriptor)
                            .map(|sd| sd.saved.clone())
                            .unwrap_or_default();
                        return Some(FolderView::Frozen {
                            frozen: self.store.frozen_file(&snap.id, d.key),
                            live: path,
                            saved,
                            size: d.capacity_bytes,
                        });
                    }
                }
            }
        }
        path.is_file().then_some(FolderView::Plain(path))
    }

    /// The backing fileName of disk `descriptor` at chain position `n`
    /// (0: the base; n: the n-th delta).
    pub fn backing_name(descriptor: &str, n: usize) -> String {
        if n == 0 {
            store::datastore_path(descriptor)
        } else {
            store::datastore_path(&store::delta_name(descriptor, n))
        }
    }

    /// QueryChangedDiskAreas.
    pub fn query_changed_disk_areas(
        &self,
        vm: &str,
        snapshot: Option<&str>,
        device_key: i32,
        start_offset: i64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VimFault> {
        let v = self.vm(vm)?;
        // (capacity, changeId stamped on the point queried, allocated, file)
        let (capacity, until, allocated, file) = match snapshot {
            Some(s) => {
                let snap = self.snapshot(s)?;
                if snap.vm != vm {
                    return Err(not_found("VirtualMachineSnapshot", s));
                }
                let d = snap
                    .disks
                    .iter()
                    .find(|d| d.key == device_key)
                    .ok_or_else(|| invalid_argument("deviceKey"))?;
                (
                    d.capacity_bytes,
                    d.change_id.clone(),
                    d.allocated.clone(),
                    store::datastore_path(&d.descriptor),
                )
            }
            None => {
                let d = v
                    .disks
                    .iter()
                    .find(|d| d.key == device_key)
                    .ok_or_else(|| invalid_argument("deviceKey"))?;
                let file = store::datastore_path(&d.descriptor);
                if v.powered_on {
                    // Without a snapshot only a powered-off VM's disk can
                    // be asked (its file is locked otherwise).
                    return Err(VimFault::FileFault { file });
                }
                // The live disk: everything up to now counts.
                let until = d
                    .tracking
                    .as_ref()
                    .map(|t| format!("{}/{}", t.epoch, t.sequence + 1));
                (d.capacity_bytes, until, d.allocated.clone(), file)
            }
        };
        if start_offset < 0
            || start_offset as u64 >= capacity
            || !(start_offset as u64).is_multiple_of(SECTOR)
        {
            return Err(invalid_argument("startOffset"));
        }
        let file_fault = || VimFault::FileFault { file: file.clone() };
        // Tracking must have been on when the point was frozen.
        let until = until.ok_or_else(file_fault)?;
        let areas = if change_id == "*" {
            allocated
        } else {
            let tracking = v
                .disks
                .iter()
                .find(|d| d.key == device_key)
                .and_then(|d| d.tracking.as_ref())
                .ok_or_else(file_fault)?;
            tracking.changes(change_id, &until).map_err(|r| match r {
                CbtRefusal::Malformed => invalid_argument("changeId"),
                CbtRefusal::OtherEpoch | CbtRefusal::AfterSnapshot => file_fault(),
            })?
        };
        Ok(page(&areas, start_offset as u64, capacity, self.paging))
    }

    /// A task that ends (after `faults.task_duration`) with `outcome`.
    pub fn add_task(
        &mut self,
        name: &str,
        entity: Moref,
        entity_name: &str,
        outcome: Result<Option<Moref>, VimFault>,
        user: &str,
    ) -> Moref {
        let id = self.next("task");
        let (result, error) = match outcome {
            Ok(r) => (r, None),
            Err(f) => {
                let msg = fault_message(&f);
                (None, Some((f, msg)))
            }
        };
        self.tasks.insert(
            id.clone(),
            Task {
                id: id.clone(),
                name: name.to_string(),
                description_id: name.to_string(),
                entity,
                entity_name: entity_name.to_string(),
                result,
                error,
                queue_time: now_iso(),
                ready_at: Instant::now() + self.faults.task_duration,
                user: user.to_string(),
            },
        );
        Moref::new("Task", &id)
    }

    /// Takes the injected failure of the next task of `method`, if any.
    pub fn take_task_fault(&mut self, method: &str) -> Option<VimFault> {
        let pos = self
            .faults
            .fail_tasks
            .iter()
            .position(|(m, _)| m == method)?;
        Some(self.faults.fail_tasks.remove(pos).1)
    }

    /// Takes one injected failure of a call to `method`, if any.
    pub fn take_call_fault(&mut self, method: &str) -> Option<(VimFault, String)> {
        let pos = self
            .faults
            .fail_calls
            .iter()
            .position(|f| f.method == method && f.remaining > 0)?;
        let f = &mut self.faults.fail_calls[pos];
        f.remaining -= 1;
        let out = (f.fault.clone(), f.message.clone());
        if f.remaining == 0 {
            self.faults.fail_calls.remove(pos);
        }
        Some(out)
    }

    /// Whether this PUT /folder is the one to refuse (and counts the ones
    /// let through before it).
    pub fn take_refused_put(&mut self) -> bool {
        match self.faults.refuse_put_after {
            Some(0) => {
                self.faults.refuse_put_after = None;
                true
            }
            Some(n) => {
                self.faults.refuse_put_after = Some(n - 1);
                false
            }
            None => false,
        }
    }

    /// Whether the response to `what` is to be cut (and counts it).
    pub fn take_drop(&mut self, what: &str) -> bool {
        match self.faults.drop_responses.get_mut(what) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The `faultstring` vSphere gives each fault.
pub fn fault_message(f: &VimFault) -> String {
    match f {
        VimFault::FileFault { file } => format!("Error caused by file {file}"),
        VimFault::NotFound => "The object or item referred to could not be found.".into(),
        VimFault::InvalidArgument { invalid_property } => format!(
            "A specified parameter was not correct: {}",
            invalid_property.as_deref().unwrap_or("")
        ),
        VimFault::NotAuthenticated { .. } => "The session is not authenticated.".into(),
        VimFault::InvalidLogin => {
            "Cannot complete login due to an incorrect user name or password.".into()
        }
        VimFault::ManagedObjectNotFound { obj } => format!(
            "The object 'vim.{}:{}' has already been deleted or has not been completely created",
            obj.kind, obj.value
        ),
        VimFault::InvalidState => "The operation is not allowed in the current state.".into(),
        VimFault::MethodNotFound { method, .. } => {
            format!("Method {method} not implemented by the simulator")
        }
        VimFault::MethodFault => "A general system error occurred.".into(),
        VimFault::Other { type_name } => type_name.clone(),
    }
}

/// One page of `areas` from `start`: a window of at most
/// `paging.window_bytes`, cut after `paging.max_extents` extents.
pub fn page(areas: &ExtentSet, start: u64, capacity: u64, paging: Paging) -> DiskChangeInfo {
    let mut end = start
        .saturating_add(paging.window_bytes.max(SECTOR))
        .min(capacity);
    let mut extents = areas.clipped(start, end);
    if extents.len() > paging.max_extents.max(1) {
        extents.truncate(paging.max_extents.max(1));
        end = extents.last().map(|e| e.1).unwrap_or(end);
    }
    DiskChangeInfo {
        start_offset: start as i64,
        length: (end - start) as i64,
        changed_area: extents
            .into_iter()
            .map(|(s, e)| DiskChangeExtent {
                start: s as i64,
                length: (e - s) as i64,
            })
            .collect(),
    }
}
