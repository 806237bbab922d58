//! One vSphere VM backup (sources-reference.md §1.1):
//! 1. find the VM (moref, instance or BIOS uuid, inventory path);
//! 2. remove snapshots an earlier, killed run left (by their name prefix);
//! 3. check change tracking; enable it with `ReconfigVM_Task` unless told
//!    not to;
//! 4. `CreateSnapshot_Task` (no memory; quiesced when asked);
//! 5. per disk of the snapshot's `config.hardware.device`: its changeId,
//!    compared with the last backup's (epoch, disk key, file); the changed
//!    areas since then (`QueryChangedDiskAreas`, paged), or on a first or
//!    lost chain the allocated areas (`*`) of a full read, loudly;
//! 6. the committer reads each disk from the frozen base `-flat.vmdk`
//!    ([`super::folder`]) and commits it with the snapshot's changeId as
//!    its landmark, then the VM's configuration;
//! 7. `RemoveSnapshot_Task(removeChildren=false, consolidate=true)`.
//!
//! From step 4 on, every error path removes the snapshot first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vim_wire::{
    ChangeId, ConfigSpec, Moref, PropertyValue, Request, Response, SnapshotTree, TaskInfo,
    TaskResult, VirtualDisk,
};

use super::client::Session;
use super::data_command::{self, DataServer};
use super::folder::FlatFile;
use super::{is_uuid, VmwareError, VmwareUrl};
use crate::source::nbd::NbdLimits;
use crate::source::{BlockSource, Changes, Extents};

/// Landmark keys of vSphere snapshots.
pub mod keys {
    /// `HOST:PORT` the backup went through.
    pub const HOST: &str = "vmware.host";
    /// The VM's instance uuid (or its moref when it has none).
    pub const VM: &str = "vmware.vm";
    /// The VM's name when backed up (listings only).
    pub const VM_NAME: &str = "vmware.vm_name";
    /// The virtual disk's device key (2000, ...).
    pub const DISK_KEY: &str = "vmware.disk_key";
    /// The disk's backing file (`[datastore1] vm/vm.vmdk`).
    pub const DISK_FILE: &str = "vmware.disk_file";
    /// The disk's label (`Hard disk 1`, listings only).
    pub const DISK_LABEL: &str = "vmware.disk_label";
    /// The snapshot's changeId for this disk: the next run's landmark.
    pub const CHANGE_ID: &str = "vmware.change_id";
    /// Groups the disks and configuration of one VM backup.
    pub const VM_BACKUP: &str = "vmware.vm_backup";
    /// `disk` or `vm-config`.
    pub const KIND: &str = "vmware.kind";
}

/// The name prefix of the snapshots this tool creates; a snapshot so named
/// that a run finds is a leftover of a killed run and is removed.
pub const SNAPSHOT_PREFIX: &str = "cbtvault-backup";

#[derive(Debug, Clone)]
pub struct Options {
    /// Enable change tracking when it is off (else refuse).
    pub enable_cbt: bool,
    /// Ask VMware Tools to quiesce the guest.
    pub quiesce: bool,
    /// The datacenter the datastores are in (`dcPath` of `/folder`).
    pub datacenter: String,
    /// How long a task may take.
    pub task_timeout: Duration,
    /// Read the bytes over NBD from a server this command starts per disk
    /// (see `data_command`), not from `/folder`.
    pub data_command: Option<String>,
    /// Device keys of disks left out: neither read nor committed.
    pub exclude_keys: std::collections::BTreeSet<i32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            enable_cbt: true,
            quiesce: false,
            datacenter: "ha-datacenter".into(),
            task_timeout: Duration::from_secs(3600),
            data_command: None,
            exclude_keys: Default::default(),
        }
    }
}

/// One disk, frozen, ready to be read and committed.
pub struct FrozenDisk<'a> {
    pub source: &'a dyn BlockSource,
    pub key: i32,
    pub label: String,
    pub changes: Changes,
    /// The allocated areas (`*`) when the disk is read in full.
    pub allocated: Option<Extents>,
    pub landmark: BTreeMap<String, String>,
}

/// The last backup of a disk, as the workflow needs it.
#[derive(Debug, Clone)]
pub struct Previous {
    pub landmark: BTreeMap<String, String>,
    /// The disk's size then.
    pub disk_size_bytes: u64,
}

/// The repository side.
pub trait Committer {
    type Error: std::error::Error + Send + Sync + 'static;
    /// The last backup of the disk `identity`, if any.
    fn previous(&mut self, identity: &str) -> Result<Option<Previous>, Self::Error>;
    fn commit_disk(&mut self, disk: FrozenDisk<'_>) -> Result<(), Self::Error>;
    /// The VM's configuration (`config` as the host returned it, XML).
    fn commit_config(
        &mut self,
        identity: &str,
        xml: &[u8],
        landmark: BTreeMap<String, String>,
    ) -> Result<(), Self::Error>;
    fn warn(&mut self, message: String);
    fn info(&mut self, message: String);
}

#[derive(Debug, thiserror::Error)]
pub enum WorkflowError<E: std::error::Error + 'static> {
    #[error("{step}: {source}")]
    Host {
        step: String,
        #[source]
        source: VmwareError,
    },
    #[error("{step}: {reason}")]
    Unusable { step: String, reason: String },
    #[error(transparent)]
    Repository(E),
}

/// What one run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub vm_backup: String,
    pub vm_name: String,
    pub disks: Vec<DiskReport>,
    /// Snapshots of killed runs removed first.
    pub removed_leftovers: Vec<String>,
    /// Our snapshot, when it could not be removed (warned about).
    pub left_on_host: Option<String>,
    /// CBT was enabled by this run.
    pub enabled_cbt: bool,
}

#[derive(Debug, Clone)]
pub struct DiskReport {
    pub key: i32,
    pub label: String,
    pub incremental: bool,
    /// Why it was read in full (first backup, tracking lost, ...).
    pub full_reason: Option<String>,
    pub change_id: Option<String>,
}

/// The identity of disk `key` of VM `vm` through `url`'s host.
pub fn disk_identity(url: &VmwareUrl, vm: &str, key: i32) -> String {
    format!("vmware://{}/vm/{vm}/disk/{key}", url.authority())
}

/// `[datastore1] dir/name.vmdk` -> (`datastore1`, `dir/name-flat.vmdk`).
pub fn flat_path(file_name: &str) -> Option<(String, String)> {
    let rest = file_name.strip_prefix('[')?;
    let (ds, path) = rest.split_once(']')?;
    let path = path.trim_start();
    let stem = path.strip_suffix(".vmdk")?;
    Some((ds.to_string(), format!("{stem}-flat.vmdk")))
}

fn host<E: std::error::Error>(
    step: impl Into<String>,
) -> impl FnOnce(VmwareError) -> WorkflowError<E> {
    let step = step.into();
    move |source| WorkflowError::Host { step, source }
}

/// Finds the VM `id` names.
fn find_vm<E: std::error::Error>(s: &Session, id: &str) -> Result<Moref, WorkflowError<E>> {
    if id.starts_with("vm-") && !id.contains('/') {
        return Ok(Moref::new("VirtualMachine", id));
    }
    let index = s
        .content()
        .search_index
        .clone()
        .ok_or_else(|| WorkflowError::Unusable {
            step: "find the VM".into(),
            reason: "the host has no SearchIndex".into(),
        })?;
    let attempts: Vec<Request> = if is_uuid(id) {
        [Some(true), Some(false)]
            .into_iter()
            .map(|instance| Request::FindByUuid {
                this: index.clone(),
                datacenter: None,
                uuid: id.to_string(),
                vm_search: true,
                instance_uuid: instance,
            })
            .collect()
    } else {
        vec![Request::FindByInventoryPath {
            this: index.clone(),
            inventory_path: id.to_string(),
        }]
    };
    for r in attempts {
        match s.call(r).map_err(host(format!("find VM {id}")))? {
            Response::Found(Some(m)) => return Ok(m),
            Response::Found(None) => continue,
            other => {
                return Err(WorkflowError::Unusable {
                    step: format!("find VM {id}"),
                    reason: format!("unexpected answer {other:?}"),
                })
            }
        }
    }
    Err(WorkflowError::Unusable {
        step: format!("find VM {id}"),
        reason:
            "no such VM (give its moref vm-N, its instance or BIOS uuid, or its inventory path)"
                .into(),
    })
}

fn string_prop(p: Option<&PropertyValue>) -> Option<String> {
    match p {
        Some(PropertyValue::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn bool_prop(p: Option<&PropertyValue>) -> Option<bool> {
    match p {
        Some(PropertyValue::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// Every snapshot of a tree, flattened.
fn flatten(trees: &[SnapshotTree], out: &mut Vec<(Moref, String)>) {
    for t in trees {
        out.push((t.snapshot.clone(), t.name.clone()));
        flatten(&t.children, out);
    }
}

/// RemoveSnapshot_Task of one snapshot, its disks consolidated.
fn remove_snapshot(s: &Session, snap: &Moref, timeout: Duration) -> Result<(), VmwareError> {
    s.run_task(
        Request::RemoveSnapshotTask {
            this: snap.clone(),
            remove_children: false,
            consolidate: Some(true),
        },
        timeout,
    )
    .map(drop)
}

/// Removes the VM's snapshots named `name` (a snapshot this run's failed
/// CreateSnapshot_Task may have made); says what is left if it cannot.
fn remove_named(s: &Session, vm: &Moref, name: &str, timeout: Duration) -> Result<(), String> {
    let all = snapshots_of(s, vm)
        .map_err(|e| format!("could not look for snapshot '{name}' to remove it: {e}; check VM {} and remove it by hand", vm.value))?;
    for (snap, _) in all.into_iter().filter(|(_, n)| n == name) {
        remove_snapshot(s, &snap, timeout).map_err(|e| {
            format!(
                "snapshot '{name}' ({}) is left on VM {}: {e}; remove it by hand",
                snap.value, vm.value
            )
        })?;
    }
    Ok(())
}

/// The VM's snapshots now, `(moref, name)`.
fn snapshots_of(s: &Session, vm: &Moref) -> Result<Vec<(Moref, String)>, VmwareError> {
    let props = s.properties(vm, &["snapshot"])?;
    let mut all = Vec::new();
    if let Some(PropertyValue::SnapshotInfo(info)) = props.property("snapshot") {
        flatten(&info.root_snapshot_list, &mut all);
    }
    Ok(all)
}

/// How often an otherwise idle session is used (hosts end sessions idle
/// for about 30 minutes).
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(300);

/// Most QueryChangedDiskAreas pages read for one disk: a host that
/// advances by a few bytes per page is broken, not slow.
const MAX_PAGES: u64 = 1 << 20;

/// The changed areas of disk `key` between `change_id` and `snapshot`,
/// every page.
fn changed_areas(
    s: &Session,
    vm: &Moref,
    snapshot: &Moref,
    key: i32,
    capacity: u64,
    change_id: &str,
) -> Result<Extents, VmwareError> {
    let mut ranges = Vec::new();
    let mut at: u64 = 0;
    let mut pages = 0u64;
    while at < capacity {
        let r = s.call(Request::QueryChangedDiskAreas {
            this: vm.clone(),
            snapshot: Some(snapshot.clone()),
            device_key: key,
            start_offset: at as i64,
            change_id: change_id.to_string(),
        })?;
        let info = match r {
            Response::DiskChangeInfo(i) => i,
            other => {
                return Err(VmwareError::Protocol {
                    what: "QueryChangedDiskAreas".into(),
                    reason: format!("unexpected answer {other:?}"),
                })
            }
        };
        let (start, len) = (info.start_offset, info.length);
        if start < 0 || len <= 0 || start as u64 != at {
            return Err(VmwareError::Protocol {
                what: "QueryChangedDiskAreas".into(),
                reason: format!(
                    "asked from {at}, answered a window of {len} bytes at {start}: it would not advance"
                ),
            });
        }
        pages += 1;
        if pages > MAX_PAGES {
            return Err(VmwareError::Protocol {
                what: "QueryChangedDiskAreas".into(),
                reason: format!(
                    "more than {MAX_PAGES} pages for a disk of {capacity} bytes (at {at}): the host does not advance"
                ),
            });
        }
        for e in &info.changed_area {
            let end = e.start.checked_add(e.length);
            if e.start < 0 || e.length < 0 || end.is_none_or(|end| end as u64 > capacity) {
                return Err(VmwareError::Protocol {
                    what: "QueryChangedDiskAreas".into(),
                    reason: format!(
                        "extent {}+{} outside the disk ({capacity} bytes)",
                        e.start, e.length
                    ),
                });
            }
            ranges.push((e.start as u64, e.length as u64));
        }
        at = match start.checked_add(len) {
            Some(next) => next as u64,
            None => {
                return Err(VmwareError::Protocol {
                    what: "QueryChangedDiskAreas".into(),
                    reason: format!("window {start}+{len} overflows"),
                })
            }
        };
    }
    Ok(Extents::from_ranges(ranges, capacity))
}

/// Why the changes since `then` cannot be asked for at `now`, if they
/// cannot: tracking was reset (a new epoch), or the disk went back to an
/// earlier state (a lower sequence: the VM was reverted to a snapshot
/// older than the last backup, and the changes since `then` are not
/// defined for it).
fn tracking_broken(then: &ChangeId, now: &ChangeId) -> Option<String> {
    if !then.same_epoch(now) {
        return Some(format!(
            "change tracking was reset (changeId epoch {} -> {})",
            then.uuid, now.uuid
        ));
    }
    (now.sequence < then.sequence).then(|| {
        format!(
            "the disk's changeId went back (sequence {} -> {}): the VM was reverted to an earlier state",
            then.sequence, now.sequence
        )
    })
}

/// Whether a QueryChangedDiskAreas failure means "tracking lost" (a full
/// read), not a broken host.
fn lost_tracking(e: &VmwareError) -> bool {
    matches!(
        e.fault_type().as_deref(),
        Some("FileFault" | "NotFound" | "InvalidArgument")
    )
}

/// Backs the VM up. `session` stays logged in; the caller logs out.
pub fn run<C: Committer>(
    session: &Arc<Session>,
    url: &VmwareUrl,
    options: &Options,
    committer: &mut C,
) -> Result<RunReport, WorkflowError<C::Error>> {
    let s = &**session;
    let vm = find_vm(s, &url.vm)?;
    let props = s
        .properties(
            &vm,
            &[
                "name",
                "config.instanceUuid",
                "config.changeTrackingEnabled",
                "capability.changeTrackingSupported",
                "snapshot",
            ],
        )
        .map_err(host(format!("read VM {}", vm.value)))?;
    let name = string_prop(props.property("name")).unwrap_or_else(|| vm.value.clone());
    let vm_id = string_prop(props.property("config.instanceUuid"))
        .map(|u| u.to_ascii_lowercase())
        .unwrap_or_else(|| vm.value.clone());
    let mut report = RunReport {
        vm_backup: hex::encode(rand::random::<[u8; 16]>()),
        vm_name: name.clone(),
        ..RunReport::default()
    };
    // Leftovers of a killed run: our snapshots by name.
    if let Some(PropertyValue::SnapshotInfo(info)) = props.property("snapshot") {
        let mut all = Vec::new();
        flatten(&info.root_snapshot_list, &mut all);
        for (snap, snap_name) in all {
            if !snap_name.starts_with(SNAPSHOT_PREFIX) {
                continue;
            }
            remove_snapshot(s, &snap, options.task_timeout).map_err(host(format!(
                "remove the leftover snapshot '{snap_name}' ({}) of an earlier run",
                snap.value
            )))?;
            committer.warn(format!(
                "removed snapshot '{snap_name}' ({}) that an earlier, interrupted run left on VM '{name}'",
                snap.value
            ));
            report.removed_leftovers.push(snap.value.clone());
        }
    }
    let supported_prop = bool_prop(props.property("capability.changeTrackingSupported"));
    let supported = supported_prop.unwrap_or(false);
    let enabled = bool_prop(props.property("config.changeTrackingEnabled")).unwrap_or(false);
    let mut no_tracking: Option<String> = None;
    if !supported {
        let why = format!(
            "VM '{name}' does not support changed block tracking (capability.changeTrackingSupported is {}): its disks are read in full every run",
            if supported_prop.is_some() { "false" } else { "not reported by the host" }
        );
        committer.warn(why.clone());
        no_tracking = Some(why);
    } else if !enabled {
        if !options.enable_cbt {
            return Err(WorkflowError::Unusable {
                step: "check change tracking".into(),
                reason: format!(
                    "changed block tracking is off on VM '{name}' and --no-enable-cbt was given"
                ),
            });
        }
        s.run_task(
            Request::ReconfigVmTask {
                this: vm.clone(),
                spec: ConfigSpec {
                    change_tracking_enabled: Some(true),
                    ..ConfigSpec::default()
                },
            },
            options.task_timeout,
        )
        .map_err(host(format!(
            "enable change tracking on VM '{name}' (ReconfigVM_Task)"
        )))?;
        committer.info(format!("enabled changed block tracking on VM '{name}'"));
        report.enabled_cbt = true;
    }
    let snap_name = format!("{SNAPSHOT_PREFIX}-{}", report.vm_backup);
    let created = s.run_task(
        Request::CreateSnapshotTask {
            this: vm.clone(),
            name: snap_name.clone(),
            description: Some("cbtvault backup (removed when the backup ends)".into()),
            memory: false,
            quiesce: options.quiesce,
        },
        options.task_timeout,
    );
    let snapshot = match created {
        Ok(TaskInfo {
            result: Some(TaskResult::Moref(m)),
            ..
        }) => m,
        failed => {
            // The task may still have made the snapshot (a wait that timed
            // out, a lost answer): look for it by its name and remove it.
            let leftover = remove_named(s, &vm, &snap_name, options.task_timeout);
            let mut e = match failed {
                Err(e) => host(format!("snapshot VM '{name}' (CreateSnapshot_Task)"))(e),
                Ok(info) => WorkflowError::Unusable {
                    step: "CreateSnapshot_Task".into(),
                    reason: format!("the task returned {:?}, not a snapshot", info.result),
                },
            };
            if let Err(left) = leftover {
                committer.warn(left.clone());
                e = WorkflowError::Unusable {
                    step: "CreateSnapshot_Task".into(),
                    reason: format!("{e}; {left}"),
                };
            }
            return Err(e);
        }
    };
    // Nothing may use the session for hours while a --data-command server
    // is read: keep it from expiring before the snapshot is removed.
    let alive = session.keep_alive(vm.clone(), KEEP_ALIVE_EVERY);
    let result = frozen(
        session,
        url,
        options,
        committer,
        &vm,
        &vm_id,
        &snapshot,
        no_tracking,
        &mut report,
    );
    // The disks were read from the base files our snapshot froze: if the
    // snapshot is gone now (another run or an administrator removed it),
    // the base took the VM's writes while it was read, and nothing of
    // this run may be committed.
    let mut gone = false;
    let result = result.and_then(|()| match snapshots_of(s, &vm) {
        Ok(all) if all.iter().any(|(m, _)| *m == snapshot) => Ok(()),
        Ok(_) => Err(WorkflowError::Unusable {
            step: "check the snapshot after reading".into(),
            reason: {
                gone = true;
                format!(
                    "snapshot '{snap_name}' ({}) of VM '{name}' was removed while its disks were read (by another backup of this VM or by hand): what was read may mix two points in time; nothing is committed",
                    snapshot.value
                )
            },
        }),
        Err(e) => Err(host(format!(
            "check that snapshot '{snap_name}' of VM '{name}' still exists"
        ))(e)),
    });
    // The snapshot goes, whatever happened (unless it is gone already).
    let removed = if gone {
        Ok(())
    } else {
        remove_snapshot(s, &snapshot, options.task_timeout)
    };
    drop(alive);
    if let Err(e) = removed {
        committer.warn(format!(
            "could not remove snapshot '{snap_name}' ({}) of VM '{name}': {e}; the next run removes it, or remove it by hand",
            snapshot.value
        ));
        report.left_on_host = Some(snapshot.value.clone());
    }
    result.map(|()| report)
}

#[allow(clippy::too_many_arguments)]
fn frozen<C: Committer>(
    session: &Arc<Session>,
    url: &VmwareUrl,
    options: &Options,
    committer: &mut C,
    vm: &Moref,
    vm_id: &str,
    snapshot: &Moref,
    no_tracking: Option<String>,
    report: &mut RunReport,
) -> Result<(), WorkflowError<C::Error>> {
    let s = &**session;
    let props = s
        .properties(snapshot, &["config.hardware.device", "config"])
        .map_err(host("read the snapshot's devices"))?;
    let devices = match props.property("config.hardware.device") {
        Some(PropertyValue::Devices(d)) => d.clone(),
        other => {
            return Err(WorkflowError::Unusable {
                step: "read the snapshot's devices".into(),
                reason: format!("config.hardware.device is {other:?}"),
            })
        }
    };
    let disks: Vec<VirtualDisk> = vim_wire::device::disks(&devices)
        .into_iter()
        .filter(|d| !options.exclude_keys.contains(&d.key))
        .cloned()
        .collect();
    if disks.is_empty() {
        return Err(WorkflowError::Unusable {
            step: "find the VM's disks".into(),
            reason: format!("VM '{}' has no virtual disk", report.vm_name),
        });
    }
    // Plan every disk before reading any: a host that cannot answer
    // commits nothing.
    let mut planned = Vec::new();
    for d in &disks {
        let label = d.label.clone().unwrap_or_else(|| format!("disk {}", d.key));
        let capacity = match u64::try_from(d.capacity_bytes()) {
            Ok(c) if c > 0 => c,
            _ => {
                return Err(WorkflowError::Unusable {
                    step: format!("disk {} ({label})", d.key),
                    reason: format!(
                        "the host reports a capacity of {} bytes",
                        d.capacity_bytes()
                    ),
                })
            }
        };
        let identity = disk_identity(url, vm_id, d.key);
        let file = d.backing.file_name.clone();
        let Some((datastore, path)) = flat_path(&file) else {
            return Err(WorkflowError::Unusable {
                step: format!("disk {} ({label})", d.key),
                reason: format!("backing file '{file}' is not a [datastore] path/name.vmdk"),
            });
        };
        let change_id = d.backing.change_id.clone();
        let previous = committer
            .previous(&identity)
            .map_err(WorkflowError::Repository)?;
        let mut full_reason: Option<String> = None;
        let mut changes = None;
        if let Some(why) = &no_tracking {
            full_reason = Some(why.clone());
        } else if !d.backing.kind.carries_change_id() {
            let why = format!(
                "disk {} ({label}) has a backing that carries no changeId: read in full every run",
                d.key
            );
            committer.warn(why.clone());
            full_reason = Some(why);
        } else if change_id.is_none() {
            full_reason = Some(format!("the snapshot records no changeId for disk {} ({label}): change tracking is not active", d.key));
        } else if let Some(Previous {
            disk_size_bytes, ..
        }) = previous.as_ref().filter(|p| p.disk_size_bytes != capacity)
        {
            // Changed areas across a resize are not trusted (vSphere had
            // CBT bugs after extending a disk): read it all.
            full_reason = Some(format!(
                "the disk's size changed ({disk_size_bytes} -> {capacity} bytes)"
            ));
        } else if let Some(prev) = previous.as_ref().map(|p| &p.landmark) {
            let now = change_id.as_deref().and_then(|c| ChangeId::parse(c).ok());
            let then = prev
                .get(keys::CHANGE_ID)
                .and_then(|c| ChangeId::parse(c).ok());
            match (then, now) {
                (None, _) => full_reason = Some("the last backup recorded no changeId".into()),
                (_, None) => {
                    full_reason = Some(format!(
                        "the host's changeId '{}' does not parse",
                        change_id.clone().unwrap_or_default()
                    ))
                }
                (Some(then), Some(now)) if tracking_broken(&then, &now).is_some() => {
                    full_reason = tracking_broken(&then, &now);
                }
                _ if prev.get(keys::DISK_FILE) != Some(&file) => {
                    full_reason = Some(format!(
                        "the disk's file changed ({} -> {file})",
                        prev.get(keys::DISK_FILE).cloned().unwrap_or_default()
                    ));
                }
                _ => {
                    let since = prev.get(keys::CHANGE_ID).cloned().unwrap_or_default();
                    match changed_areas(s, vm, snapshot, d.key, capacity, &since) {
                        Ok(e) => changes = Some(Changes::Since(e)),
                        Err(e) if lost_tracking(&e) => {
                            full_reason = Some(format!(
                                "QueryChangedDiskAreas refused the last changeId ({e})"
                            ));
                        }
                        Err(e) => {
                            return Err(host(format!("changed areas of disk {} ({label})", d.key))(
                                e,
                            ))
                        }
                    }
                }
            }
        } else {
            full_reason = Some("first backup of this disk".into());
        }
        let mut allocated = None;
        let changes = match changes {
            Some(c) => c,
            None => {
                let why = full_reason.clone().unwrap_or_default();
                if previous.is_some() {
                    committer.warn(format!(
                        "disk {} ({label}) of VM '{}': a new full backup: {why}",
                        d.key, report.vm_name
                    ));
                }
                if no_tracking.is_none()
                    && change_id.is_some()
                    && d.backing.kind.carries_change_id()
                {
                    // The allocated areas: holes are not read.
                    match changed_areas(s, vm, snapshot, d.key, capacity, "*") {
                        Ok(e) => allocated = Some(e),
                        Err(e) if lost_tracking(&e) => {}
                        Err(e) => {
                            return Err(host(format!(
                                "allocated areas of disk {} ({label})",
                                d.key
                            ))(e))
                        }
                    }
                }
                if previous.is_some() {
                    Changes::FullNeeded(why)
                } else {
                    Changes::Unknown
                }
            }
        };
        let mut landmark = BTreeMap::from([
            (keys::HOST.to_string(), url.authority()),
            (keys::VM.to_string(), vm_id.to_string()),
            (keys::VM_NAME.to_string(), report.vm_name.clone()),
            (keys::DISK_KEY.to_string(), d.key.to_string()),
            (keys::DISK_FILE.to_string(), file.clone()),
            (keys::DISK_LABEL.to_string(), label.clone()),
            (keys::VM_BACKUP.to_string(), report.vm_backup.clone()),
            (keys::KIND.to_string(), "disk".to_string()),
        ]);
        if let Some(c) = &change_id {
            landmark.insert(keys::CHANGE_ID.to_string(), c.clone());
        }
        report.disks.push(DiskReport {
            key: d.key,
            label: label.clone(),
            incremental: matches!(changes, Changes::Since(_)),
            full_reason: full_reason.clone(),
            change_id: change_id.clone(),
        });
        planned.push((
            identity, datastore, path, capacity, label, changes, allocated, landmark, d.key,
        ));
    }
    for (identity, datastore, path, capacity, label, changes, allocated, landmark, key) in planned {
        let mut served = None;
        let mut flat = None;
        let source: &dyn BlockSource = match &options.data_command {
            Some(command) => {
                let env = [
                    ("CBTVAULT_VSPHERE_HOST", url.authority()),
                    ("CBTVAULT_DATACENTER", options.datacenter.clone()),
                    ("CBTVAULT_VM_MOREF", vm.value.clone()),
                    ("CBTVAULT_SNAPSHOT_MOREF", snapshot.value.clone()),
                    ("CBTVAULT_DISK_KEY", key.to_string()),
                    (
                        "CBTVAULT_DISK_FILE",
                        landmark.get(keys::DISK_FILE).cloned().unwrap_or_default(),
                    ),
                    ("CBTVAULT_DATASTORE", datastore.clone()),
                    ("CBTVAULT_DISK_FLAT_PATH", path.clone()),
                    ("CBTVAULT_DISK_CAPACITY", capacity.to_string()),
                ];
                let server = DataServer::start(
                    command,
                    &env,
                    identity.clone(),
                    capacity,
                    NbdLimits::default(),
                    data_command::START_TIMEOUT,
                )
                .map_err(host(format!("serve disk {key} ({label}) over NBD")))?;
                served.insert(server).source()
            }
            None => flat.insert(FlatFile::new(
                session.clone(),
                identity,
                options.datacenter.clone(),
                datastore,
                path,
                capacity,
            )),
        };
        committer
            .commit_disk(FrozenDisk {
                source,
                key,
                label,
                changes,
                allocated,
                landmark,
            })
            .map_err(WorkflowError::Repository)?;
    }
    if let Some(PropertyValue::Other(config)) = props.property("config") {
        let landmark = BTreeMap::from([
            (keys::HOST.to_string(), url.authority()),
            (keys::VM.to_string(), vm_id.to_string()),
            (keys::VM_NAME.to_string(), report.vm_name.clone()),
            (keys::VM_BACKUP.to_string(), report.vm_backup.clone()),
            (keys::KIND.to_string(), "vm-config".to_string()),
        ]);
        committer
            .commit_config(
                &format!("vmware://{}/vm/{vm_id}/config", url.authority()),
                config.to_document().as_bytes(),
                landmark,
            )
            .map_err(WorkflowError::Repository)?;
    } else {
        committer.warn(format!(
            "the snapshot's configuration of VM '{}' could not be read: the disks are backed up without it",
            report.vm_name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_breaks_on_a_new_epoch_or_a_sequence_that_went_back() {
        let id = |v: &str| ChangeId::parse(v).unwrap();
        let a = "52 3c 2a 7e 1f 0b 4d 9e-a1 b2 c3 d4 e5 f6 07 18";
        let then = id(&format!("{a}/40"));
        assert_eq!(tracking_broken(&then, &id(&format!("{a}/40"))), None);
        assert_eq!(tracking_broken(&then, &id(&format!("{a}/41"))), None);
        let back = tracking_broken(&then, &id(&format!("{a}/39"))).unwrap();
        assert!(back.contains("went back (sequence 40 -> 39)"), "{back}");
        let reset = tracking_broken(
            &then,
            &id("52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 01/1"),
        )
        .unwrap();
        assert!(reset.contains("was reset"), "{reset}");
    }

    #[test]
    fn flat_paths() {
        assert_eq!(
            flat_path("[datastore1] web/web.vmdk"),
            Some(("datastore1".into(), "web/web-flat.vmdk".into()))
        );
        assert_eq!(
            flat_path("[ds 2] a b/c_1.vmdk"),
            Some(("ds 2".into(), "a b/c_1-flat.vmdk".into()))
        );
        assert_eq!(flat_path("web.vmdk"), None);
        assert_eq!(flat_path("[ds] web.raw"), None);
    }
}
