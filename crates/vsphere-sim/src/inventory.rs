//! What the PropertyCollector sees: the inventory tree (rootFolder ->
//! ha-datacenter -> vmFolder -> VMs; datastore1), each object's
//! properties by path (VMs' `config` built as a `VirtualMachineConfigInfo`
//! with its device list, snapshots' `config`, tasks' `info`), traversal
//! of `TraversalSpec`s, and RetrievePropertiesEx's result with paging.

use std::collections::BTreeSet;
use std::time::Instant;

use vim_wire::device::{DiskBacking, VirtualDevice, VirtualDisk};
use vim_wire::{
    DynamicProperty, Element, LocalizedMethodFault, Moref, ObjectContent, PropertyFilterSpec,
    PropertyValue, SelectionSpec, SnapshotInfo, SnapshotTree, TaskInfo, TaskResult, TaskState,
    VimFault,
};

use crate::model::{self, State, Vm};
use crate::store;

/// An unknown path (`InvalidProperty`; its `name` field is not modelled).
fn invalid_property(_path: &str) -> VimFault {
    VimFault::Other {
        type_name: "InvalidProperty".into(),
    }
}

/// The type of an existing object, `None` if there is no such object.
pub fn kind_of(st: &State, obj: &Moref) -> Option<&'static str> {
    let v = obj.value.as_str();
    let k = match obj.kind.as_str() {
        "ServiceInstance" if v == model::SERVICE_INSTANCE => "ServiceInstance",
        "Folder" if v == model::ROOT_FOLDER || v == model::VM_FOLDER => "Folder",
        "Datacenter" if v == model::DATACENTER => "Datacenter",
        "Datastore" if v == model::DATASTORE_ID => "Datastore",
        "PropertyCollector" if v == model::PROPERTY_COLLECTOR => "PropertyCollector",
        "SessionManager" if v == model::SESSION_MANAGER => "SessionManager",
        "SearchIndex" if v == model::SEARCH_INDEX => "SearchIndex",
        "VirtualMachine" if st.vms.contains_key(v) => "VirtualMachine",
        "VirtualMachineSnapshot" if st.snapshots.contains_key(v) => "VirtualMachineSnapshot",
        "Task" if st.tasks.contains_key(v) => "Task",
        _ => return None,
    };
    Some(k)
}

fn is_a(kind: &str, wanted: &str) -> bool {
    kind == wanted
        || (wanted == "ManagedEntity"
            && matches!(
                kind,
                "Folder" | "Datacenter" | "Datastore" | "VirtualMachine"
            ))
}

/// The devices of a VM (`snapshot` None) or of a snapshot of it.
fn devices(st: &State, vm: &Vm, snapshot: Option<&model::Snapshot>) -> Vec<VirtualDevice> {
    struct D {
        key: i32,
        unit: i32,
        descriptor: String,
        capacity: u64,
        uuid: String,
        content_id: String,
        change_id: Option<String>,
        chain_position: usize,
    }
    let disks: Vec<D> = match snapshot {
        None => vm
            .disks
            .iter()
            .map(|d| D {
                key: d.key,
                unit: d.unit_number,
                descriptor: d.descriptor.clone(),
                capacity: d.capacity_bytes,
                uuid: d.uuid.clone(),
                content_id: d.content_id.clone(),
                change_id: d.tracking.as_ref().map(|t| t.change_id()),
                chain_position: vm.snapshots.len(),
            })
            .collect(),
        Some(s) => {
            let pos = vm.snapshots.iter().position(|x| *x == s.id).unwrap_or(0);
            s.disks
                .iter()
                .map(|d| D {
                    key: d.key,
                    unit: d.unit_number,
                    descriptor: d.descriptor.clone(),
                    capacity: d.capacity_bytes,
                    uuid: d.uuid.clone(),
                    content_id: d.content_id.clone(),
                    change_id: d.change_id.clone(),
                    chain_position: pos,
                })
                .collect()
        }
    };
    let _ = st;
    let controller = Element::vim("device")
        .typed("ParaVirtualSCSIController")
        .with(Element::leaf("key", model::SCSI_CONTROLLER_KEY.to_string()))
        .with(
            Element::vim("deviceInfo")
                .with(Element::leaf("label", "SCSI controller 0"))
                .with(Element::leaf("summary", "VMware paravirtual SCSI")),
        )
        .with(Element::leaf("controllerKey", "100"))
        .with(Element::leaf("unitNumber", "3"))
        .with(Element::leaf("busNumber", "0"))
        .with_all(
            disks
                .iter()
                .map(|d| Element::leaf("device", d.key.to_string())),
        )
        .with(Element::leaf("hotAddRemove", "true"))
        .with(Element::leaf("sharedBus", "noSharing"))
        .with(Element::leaf("scsiCtlrUnitNumber", "7"));
    let mut out = vec![VirtualDevice::Other(controller)];
    for (i, d) in disks.iter().enumerate() {
        let mut backing = DiskBacking::flat(
            &State::backing_name(&d.descriptor, d.chain_position),
            Some(Moref::new("Datastore", model::DATASTORE_ID)),
        );
        backing.uuid = Some(d.uuid.clone());
        backing.content_id = Some(d.content_id.clone());
        backing.change_id = d.change_id.clone();
        out.push(VirtualDevice::Disk(VirtualDisk {
            key: d.key,
            label: Some(format!("Hard disk {}", i + 1)),
            summary: Some(format!("{} KB", d.capacity / 1024)),
            backing,
            controller_key: Some(model::SCSI_CONTROLLER_KEY),
            unit_number: Some(d.unit),
            capacity_in_kb: (d.capacity / 1024) as i64,
            capacity_in_bytes: Some(d.capacity as i64),
        }));
    }
    out
}

/// A `VirtualMachineConfigInfo` (element `config`, typed).
fn config_element(vm: &Vm, cbt: bool, devices: &[VirtualDevice], modified: &str) -> Element {
    let vmx = store::datastore_path(&format!("{0}/{0}.vmx", vm.name));
    let dir = store::datastore_path(&format!("{}/", vm.name));
    Element::vim("config")
        .typed("VirtualMachineConfigInfo")
        .with(Element::leaf(
            "changeVersion",
            vm.change_version.to_string(),
        ))
        .with(Element::leaf("modified", modified))
        .with(Element::leaf("name", vm.name.clone()))
        .with(Element::leaf("guestFullName", "Other Linux (64-bit)"))
        .with(Element::leaf("version", "vmx-19"))
        .with(Element::leaf("uuid", vm.uuid.clone()))
        .with(Element::leaf("createDate", vm.create_time.clone()))
        .with(Element::leaf("instanceUuid", vm.instance_uuid.clone()))
        .with(Element::leaf("template", "false"))
        .with(Element::leaf("guestId", "otherLinux64Guest"))
        .with(Element::leaf("alternateGuestName", ""))
        .with(
            Element::vim("files")
                .with(Element::leaf("vmPathName", vmx))
                .with(Element::leaf("snapshotDirectory", dir.clone()))
                .with(Element::leaf("suspendDirectory", dir.clone()))
                .with(Element::leaf("logDirectory", dir)),
        )
        .with(Element::vim("flags").with(Element::leaf("snapshotLocked", "false")))
        .with(Element::vim("defaultPowerOps").with(Element::leaf("powerOffType", "soft")))
        .with(
            Element::vim("hardware")
                .with(Element::leaf("numCPU", "1"))
                .with(Element::leaf("numCoresPerSocket", "1"))
                .with(Element::leaf("memoryMB", "1024"))
                .with_all(devices.iter().map(|d| d.encode("device"))),
        )
        .with(Element::leaf("changeTrackingEnabled", cbt.to_string()))
        .with(Element::leaf("firmware", "bios"))
}

fn vm_config(st: &State, vm: &Vm) -> Element {
    config_element(
        vm,
        vm.cbt_enabled,
        &devices(st, vm, None),
        &model::now_iso(),
    )
}

fn snapshot_config(st: &State, vm: &Vm, s: &model::Snapshot) -> Element {
    config_element(vm, s.cbt_enabled, &devices(st, vm, Some(s)), &s.create_time)
}

/// A path under `config` of a VM or snapshot.
fn config_path(
    config: Element,
    devices: Vec<VirtualDevice>,
    cbt: bool,
    vm: &Vm,
    path: &str,
) -> Result<Option<PropertyValue>, VimFault> {
    Ok(Some(match path {
        "config" => PropertyValue::Other(config),
        "config.hardware.device" => PropertyValue::Devices(devices),
        "config.changeTrackingEnabled" => PropertyValue::Bool(cbt),
        "config.uuid" => PropertyValue::String(vm.uuid.clone()),
        "config.instanceUuid" => PropertyValue::String(vm.instance_uuid.clone()),
        "config.name" => PropertyValue::String(vm.name.clone()),
        "config.template" => PropertyValue::Bool(false),
        "config.hardware" => {
            let Some(h) = config.child("hardware") else {
                return Ok(None);
            };
            PropertyValue::Other(h.clone().typed("VirtualHardware"))
        }
        other => return Err(invalid_property(other)),
    }))
}

fn snapshot_tree(st: &State, vm: &Vm, from: usize) -> Vec<SnapshotTree> {
    let Some(id) = vm.snapshots.get(from) else {
        return Vec::new();
    };
    let Some(s) = st.snapshots.get(id) else {
        return Vec::new();
    };
    vec![SnapshotTree {
        snapshot: Moref::new("VirtualMachineSnapshot", &s.id),
        vm: Moref::new("VirtualMachine", &vm.id),
        name: s.name.clone(),
        description: s.description.clone(),
        id: s.number,
        create_time: s.create_time.clone(),
        state: if s.powered_on {
            "poweredOn"
        } else {
            "poweredOff"
        }
        .into(),
        quiesced: s.quiesced,
        children: snapshot_tree(st, vm, from + 1),
    }]
}

/// A task's `info` now.
pub fn task_info(t: &model::Task) -> TaskInfo {
    let done = Instant::now() >= t.ready_at;
    let state = match (done, &t.error) {
        (false, _) => TaskState::Running,
        (true, None) => TaskState::Success,
        (true, Some(_)) => TaskState::Error,
    };
    TaskInfo {
        key: t.id.clone(),
        task: Moref::new("Task", &t.id),
        name: Some(t.name.clone()),
        description_id: t.description_id.clone(),
        entity: Some(t.entity.clone()),
        entity_name: Some(t.entity_name.clone()),
        state,
        cancelled: false,
        cancelable: false,
        error: match (done, &t.error) {
            (true, Some((f, msg))) => Some(LocalizedMethodFault {
                fault: f.clone(),
                localized_message: Some(msg.clone()),
            }),
            _ => None,
        },
        result: if done {
            t.result.clone().map(TaskResult::Moref)
        } else {
            None
        },
        progress: (!done).then_some(50),
        queue_time: t.queue_time.clone(),
        start_time: Some(t.queue_time.clone()),
        complete_time: done.then(|| t.queue_time.clone()),
        event_chain_id: 1,
        reason_user_name: t.user.clone(),
    }
}

/// Property `path` of `obj`: `Ok(None)` when it is unset.
pub fn property(st: &State, obj: &Moref, path: &str) -> Result<Option<PropertyValue>, VimFault> {
    let kind =
        kind_of(st, obj).ok_or_else(|| VimFault::ManagedObjectNotFound { obj: obj.clone() })?;
    let s = |v: &str| Ok(Some(PropertyValue::String(v.to_string())));
    let moref = |k: &str, v: &str| Ok(Some(PropertyValue::Moref(Moref::new(k, v))));
    let vms = || {
        PropertyValue::Morefs(
            st.vms
                .keys()
                .map(|id| Moref::new("VirtualMachine", id))
                .collect(),
        )
    };
    match (kind, obj.value.as_str(), path) {
        ("ServiceInstance", _, "content") => Ok(Some(PropertyValue::Other(
            crate::dispatch::service_content()
                .encode("val")
                .typed("ServiceContent"),
        ))),
        ("Folder", model::ROOT_FOLDER, "name") => s("ha-folder-root"),
        ("Folder", model::ROOT_FOLDER, "childEntity") => {
            Ok(Some(PropertyValue::Morefs(vec![Moref::new(
                "Datacenter",
                model::DATACENTER,
            )])))
        }
        ("Folder", model::VM_FOLDER, "name") => s("vm"),
        ("Folder", model::VM_FOLDER, "childEntity") => Ok(Some(vms())),
        ("Folder", model::VM_FOLDER, "parent") => moref("Datacenter", model::DATACENTER),
        ("Datacenter", _, "name") => s(model::DATACENTER),
        ("Datacenter", _, "vmFolder") => moref("Folder", model::VM_FOLDER),
        ("Datacenter", _, "datastore") => Ok(Some(PropertyValue::Morefs(vec![Moref::new(
            "Datastore",
            model::DATASTORE_ID,
        )]))),
        ("Datacenter", _, "parent") => moref("Folder", model::ROOT_FOLDER),
        ("Datastore", _, "name") => s(store::DATASTORE),
        ("Datastore", _, "vm") => Ok(Some(vms())),
        ("VirtualMachine", id, p) => {
            let vm = st.vm(id)?;
            match p {
                "name" => s(&vm.name),
                "parent" => moref("Folder", model::VM_FOLDER),
                "datastore" => Ok(Some(PropertyValue::Morefs(vec![Moref::new(
                    "Datastore",
                    model::DATASTORE_ID,
                )]))),
                "runtime.powerState" => Ok(Some(PropertyValue::Enum {
                    type_name: "VirtualMachinePowerState".into(),
                    value: if vm.powered_on {
                        "poweredOn"
                    } else {
                        "poweredOff"
                    }
                    .into(),
                })),
                "capability.changeTrackingSupported" => Ok(Some(PropertyValue::Bool(true))),
                "runtime.host" => moref("HostSystem", model::HOST_SYSTEM),
                "snapshot" if vm.snapshots.is_empty() => Ok(None),
                "snapshot" => Ok(Some(PropertyValue::SnapshotInfo(SnapshotInfo {
                    current_snapshot: vm
                        .snapshots
                        .last()
                        .map(|s| Moref::new("VirtualMachineSnapshot", s)),
                    root_snapshot_list: snapshot_tree(st, vm, 0),
                }))),
                "rootSnapshot" => Ok(Some(PropertyValue::Morefs(
                    vm.snapshots
                        .first()
                        .map(|s| Moref::new("VirtualMachineSnapshot", s))
                        .into_iter()
                        .collect(),
                ))),
                p if p == "config" || p.starts_with("config.") => config_path(
                    vm_config(st, vm),
                    devices(st, vm, None),
                    vm.cbt_enabled,
                    vm,
                    p,
                ),
                other => Err(invalid_property(other)),
            }
        }
        ("VirtualMachineSnapshot", id, p) => {
            let snap = st.snapshot(id)?;
            let vm = st.vm(&snap.vm)?;
            match p {
                "vm" => moref("VirtualMachine", &vm.id),
                "childSnapshot" => {
                    let pos = vm.snapshots.iter().position(|x| x == id).unwrap_or(0);
                    Ok(Some(PropertyValue::Morefs(
                        vm.snapshots
                            .get(pos + 1)
                            .map(|s| Moref::new("VirtualMachineSnapshot", s))
                            .into_iter()
                            .collect(),
                    )))
                }
                p if p == "config" || p.starts_with("config.") => config_path(
                    snapshot_config(st, vm, snap),
                    devices(st, vm, Some(snap)),
                    snap.cbt_enabled,
                    vm,
                    p,
                ),
                other => Err(invalid_property(other)),
            }
        }
        ("Task", id, p) => {
            let t = st
                .tasks
                .get(id)
                .ok_or_else(|| VimFault::ManagedObjectNotFound { obj: obj.clone() })?;
            let info = task_info(t);
            Ok(match p {
                "info" => Some(PropertyValue::TaskInfo(Box::new(info))),
                "info.state" => Some(PropertyValue::TaskState(info.state)),
                "info.key" => Some(PropertyValue::String(info.key)),
                "info.result" => match info.result {
                    Some(TaskResult::Moref(m)) => Some(PropertyValue::Moref(m)),
                    Some(TaskResult::Other(e)) => Some(PropertyValue::Other(e)),
                    None => None,
                },
                "info.error" => info.error.map(PropertyValue::Fault),
                "info.progress" => info.progress.map(PropertyValue::Int),
                "info.entity" => info.entity.map(PropertyValue::Moref),
                "info.descriptionId" => Some(PropertyValue::String(info.description_id)),
                other => return Err(invalid_property(other)),
            })
        }
        (_, _, "name") => s(&obj.value),
        (_, _, other) => Err(invalid_property(other)),
    }
}

/// The paths `all=true` means for a type.
fn all_paths(kind: &str) -> &'static [&'static str] {
    match kind {
        "Folder" => &["name", "childEntity"],
        "Datacenter" => &["name", "vmFolder", "datastore"],
        "Datastore" => &["name"],
        "VirtualMachine" => &["name", "config", "runtime.powerState", "snapshot"],
        "VirtualMachineSnapshot" => &["config", "vm"],
        "Task" => &["info"],
        _ => &["name"],
    }
}

/// The objects a filter spec selects, in order, each once.
fn select(st: &State, spec: &PropertyFilterSpec) -> Result<Vec<Moref>, VimFault> {
    let named: Vec<&vim_wire::TraversalSpec> = spec
        .object_set
        .iter()
        .flat_map(|o| o.select_set.iter())
        .flat_map(|s| collect_traversals(s))
        .collect();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for o in &spec.object_set {
        if kind_of(st, &o.obj).is_none() {
            return Err(VimFault::ManagedObjectNotFound { obj: o.obj.clone() });
        }
        if o.skip != Some(true) && seen.insert(o.obj.clone()) {
            out.push(o.obj.clone());
        }
        let mut visited = BTreeSet::new();
        traverse(
            st,
            &o.obj,
            &o.select_set,
            &named,
            &mut visited,
            &mut seen,
            &mut out,
        );
    }
    Ok(out)
}

fn collect_traversals(s: &SelectionSpec) -> Vec<&vim_wire::TraversalSpec> {
    match s {
        SelectionSpec::Named(_) => Vec::new(),
        SelectionSpec::Traversal(t) => {
            let mut v = vec![t];
            for c in &t.select_set {
                v.extend(collect_traversals(c));
            }
            v
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn traverse(
    st: &State,
    from: &Moref,
    select_set: &[SelectionSpec],
    named: &[&vim_wire::TraversalSpec],
    visited: &mut BTreeSet<(Moref, String)>,
    seen: &mut BTreeSet<Moref>,
    out: &mut Vec<Moref>,
) {
    let Some(kind) = kind_of(st, from) else {
        return;
    };
    for s in select_set {
        let t = match s {
            SelectionSpec::Traversal(t) => t.clone(),
            SelectionSpec::Named(n) => match named.iter().find(|t| t.name.as_deref() == Some(n)) {
                Some(t) => (*t).clone(),
                None => continue,
            },
        };
        if !is_a(kind, &t.kind) || !visited.insert((from.clone(), t.path.clone())) {
            continue;
        }
        let targets = match property(st, from, &t.path) {
            Ok(Some(PropertyValue::Moref(m))) => vec![m],
            Ok(Some(PropertyValue::Morefs(ms))) => ms,
            _ => Vec::new(),
        };
        for target in targets {
            if t.skip != Some(true) && seen.insert(target.clone()) {
                out.push(target.clone());
            }
            traverse(st, &target, &t.select_set, named, visited, seen, out);
        }
    }
}

/// RetrievePropertiesEx over all specs: the objects with their values.
pub fn retrieve(st: &State, specs: &[PropertyFilterSpec]) -> Result<Vec<ObjectContent>, VimFault> {
    let mut out: Vec<ObjectContent> = Vec::new();
    for spec in specs {
        for obj in select(st, spec)? {
            let Some(kind) = kind_of(st, &obj) else {
                continue;
            };
            let mut paths: Vec<String> = Vec::new();
            let mut matched = false;
            for p in spec.prop_set.iter().filter(|p| is_a(kind, &p.kind)) {
                matched = true;
                if p.all == Some(true) {
                    paths.extend(all_paths(kind).iter().map(|s| s.to_string()));
                }
                paths.extend(p.path_set.iter().cloned());
            }
            if !matched {
                continue;
            }
            let mut seen = BTreeSet::new();
            let mut props = Vec::new();
            for path in paths {
                if !seen.insert(path.clone()) {
                    continue;
                }
                if let Some(val) = property(st, &obj, &path)? {
                    props.push(DynamicProperty { name: path, val });
                }
            }
            match out.iter_mut().find(|o| o.obj == obj) {
                Some(existing) => existing.prop_set.extend(props),
                None => out.push(ObjectContent {
                    obj,
                    prop_set: props,
                    missing_set: Vec::new(),
                }),
            }
        }
    }
    Ok(out)
}

/// FindByUuid: a VM by BIOS uuid, or by instance uuid.
pub fn find_by_uuid(st: &State, uuid: &str, instance: bool) -> Option<Moref> {
    let want = uuid.to_ascii_lowercase();
    st.vms
        .values()
        .find(|v| {
            let have = if instance { &v.instance_uuid } else { &v.uuid };
            have.to_ascii_lowercase() == want
        })
        .map(|v| Moref::new("VirtualMachine", &v.id))
}

/// FindByInventoryPath: `ha-datacenter`, `ha-datacenter/vm`,
/// `ha-datacenter/vm/NAME`, `ha-datacenter/datastore/datastore1`.
pub fn find_by_inventory_path(st: &State, path: &str) -> Option<Moref> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        [dc] if *dc == model::DATACENTER => Some(Moref::new("Datacenter", model::DATACENTER)),
        [dc, "vm"] if *dc == model::DATACENTER => Some(Moref::new("Folder", model::VM_FOLDER)),
        [dc, "vm", name] if *dc == model::DATACENTER => st
            .vms
            .values()
            .find(|v| v.name == *name)
            .map(|v| Moref::new("VirtualMachine", &v.id)),
        [dc, "datastore", ds] if *dc == model::DATACENTER && *ds == store::DATASTORE => {
            Some(Moref::new("Datastore", model::DATASTORE_ID))
        }
        _ => None,
    }
}
