//! Every VM of a vSphere host (ESXi or vCenter) in one property-collector
//! walk from the root folder (folders, datacenters' VM folders, vApps),
//! paged with ContinueRetrievePropertiesEx: what jobs select from.

use vim_wire::{
    Moref, ObjectContent, ObjectSpec, PropertyFilterSpec, PropertySpec, PropertyValue, Request,
    Response, RetrieveOptions, SelectionSpec, TraversalSpec, VirtualDevice,
};

use super::client::Session;
use super::VmwareError;

/// One VM as a job sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmwareVm {
    pub moref: String,
    pub name: String,
    /// `config.instanceUuid` (lower case); the moref when absent.
    pub instance_uuid: String,
    /// `runtime.powerState`: `poweredOn`, `poweredOff`, `suspended`.
    pub power_state: String,
    pub template: bool,
    /// `runtime.host` (the ESXi host's moref), when known.
    pub host: Option<String>,
    pub disks: Vec<VmwareDiskInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmwareDiskInfo {
    pub key: i32,
    pub label: String,
    pub capacity_bytes: u64,
    /// The backing's `fileName` (`[datastore1] web/web.vmdk`).
    pub file: String,
}

/// Pages asked for at once.
const PAGE_OBJECTS: i32 = 100;
/// At most this many pages (a runaway token loop is an error).
const MAX_PAGES: usize = 10_000;

fn traversals() -> Vec<SelectionSpec> {
    let step = |name: &str, kind: &str, path: &str| {
        SelectionSpec::Traversal(TraversalSpec {
            name: Some(name.into()),
            kind: kind.into(),
            path: path.into(),
            skip: Some(false),
            select_set: ["folder", "datacenter", "vapp"]
                .iter()
                .map(|n| SelectionSpec::Named((*n).into()))
                .collect(),
        })
    };
    vec![
        step("folder", "Folder", "childEntity"),
        step("datacenter", "Datacenter", "vmFolder"),
        step("vapp", "VirtualApp", "vm"),
    ]
}

fn vm_of(o: &ObjectContent) -> Option<VmwareVm> {
    if o.obj.kind != "VirtualMachine" {
        return None;
    }
    let text = |p: &str| match o.property(p) {
        Some(PropertyValue::String(s)) => Some(s.clone()),
        Some(PropertyValue::Enum { value, .. }) => Some(value.clone()),
        _ => None,
    };
    let disks = match o.property("config.hardware.device") {
        Some(PropertyValue::Devices(d)) => d
            .iter()
            .filter_map(|d| match d {
                VirtualDevice::Disk(d) => Some(VmwareDiskInfo {
                    key: d.key,
                    label: d.label.clone().unwrap_or_else(|| format!("disk {}", d.key)),
                    capacity_bytes: d.capacity_bytes().max(0) as u64,
                    file: d.backing.file_name.clone(),
                }),
                VirtualDevice::Other(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(VmwareVm {
        moref: o.obj.value.clone(),
        name: text("name").unwrap_or_else(|| o.obj.value.clone()),
        instance_uuid: text("config.instanceUuid")
            .map(|u| u.to_ascii_lowercase())
            .unwrap_or_else(|| o.obj.value.clone()),
        power_state: text("runtime.powerState").unwrap_or_default(),
        template: matches!(
            o.property("config.template"),
            Some(PropertyValue::Bool(true))
        ),
        host: match o.property("runtime.host") {
            Some(PropertyValue::Moref(m)) => Some(m.value.clone()),
            _ => None,
        },
        disks,
    })
}

/// Every VM under `root` (a datacenter), or under the root folder.
pub fn list_vms(s: &Session, root: Option<&Moref>) -> Result<Vec<VmwareVm>, VmwareError> {
    let collector = s.content().property_collector.clone();
    let spec = PropertyFilterSpec {
        prop_set: vec![PropertySpec::new(
            "VirtualMachine",
            &[
                "name",
                "config.instanceUuid",
                "config.template",
                "config.hardware.device",
                "runtime.powerState",
                "runtime.host",
            ],
        )],
        object_set: vec![ObjectSpec {
            obj: root
                .cloned()
                .unwrap_or_else(|| s.content().root_folder.clone()),
            skip: Some(true),
            select_set: traversals(),
        }],
    };
    let mut vms = Vec::new();
    let mut answer = s.call(Request::RetrievePropertiesEx {
        this: collector.clone(),
        spec_set: vec![spec],
        options: RetrieveOptions {
            max_objects: Some(PAGE_OBJECTS),
        },
    })?;
    for _ in 0..MAX_PAGES {
        let result = match answer {
            Response::RetrieveResult(None) => return Ok(vms),
            Response::RetrieveResult(Some(r)) => r,
            other => {
                return Err(VmwareError::Protocol {
                    what: "RetrievePropertiesEx of the inventory".into(),
                    reason: format!("unexpected answer {other:?}"),
                })
            }
        };
        // A property the host refused (an expired session, a missing
        // privilege) is an error, not an absent value.
        if let Some(e) = result
            .objects
            .iter()
            .find_map(super::client::refused_property)
        {
            return Err(e);
        }
        vms.extend(result.objects.iter().filter_map(vm_of));
        let Some(token) = result.token else {
            return Ok(vms);
        };
        answer = s.call(Request::ContinueRetrievePropertiesEx {
            this: collector.clone(),
            token,
        })?;
    }
    Err(VmwareError::Protocol {
        what: "RetrievePropertiesEx of the inventory".into(),
        reason: format!("more than {MAX_PAGES} pages"),
    })
}

/// The VM (name) one of whose disks is `path` of `datastore`: its
/// descriptor or its flat file.
pub fn disk_owner<'a>(vms: &'a [VmwareVm], datastore: &str, path: &str) -> Option<&'a str> {
    vms.iter().find_map(|v| {
        v.disks.iter().find_map(|d| {
            let descriptor = d.file.strip_prefix(&format!("[{datastore}] "))?;
            let flat = super::workflow::flat_path(&d.file).map(|(_, p)| p);
            (descriptor == path || flat.as_deref() == Some(path)).then_some(v.name.as_str())
        })
    })
}
