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
/// descriptor or its flat file, or those of the base disk under its
/// snapshots' deltas (a VM with snapshots names `NAME-000001.vmdk`, whose
/// chain ends in `NAME.vmdk` and `NAME-flat.vmdk`). Compared without regard
/// to case (NFS and VMFS datastores may not tell case apart).
pub fn disk_owner<'a>(vms: &'a [VmwareVm], datastore: &str, path: &str) -> Option<&'a str> {
    let path = path.to_lowercase();
    let prefix = format!("[{}] ", datastore.to_lowercase());
    vms.iter().find_map(|v| {
        v.disks.iter().find_map(|d| {
            let file = d.file.to_lowercase();
            let descriptor = file.strip_prefix(&prefix)?;
            let mut names = vec![descriptor.to_string()];
            if let Some(base) = base_of_delta(descriptor) {
                names.push(base);
            }
            // A descriptor's own extents and side files.
            let hit = names.iter().any(|n| {
                *n == path
                    || n.strip_suffix(".vmdk").is_some_and(|stem| {
                        DISK_SIDE_FILES
                            .iter()
                            .any(|side| format!("{stem}-{side}.vmdk") == path)
                            || is_replacement_flat(stem, &path)
                    })
            });
            hit.then_some(v.name.as_str())
        })
    })
}

/// Whether `path` is `STEM-XXXXXXXX-flat.vmdk` (8 lower-case hex digits):
/// the flat file a `--force` restore into vSphere gives the disk whose
/// descriptor is `STEM.vmdk`.
pub fn is_replacement_flat(stem: &str, path: &str) -> bool {
    path.strip_prefix(stem)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix("-flat.vmdk"))
        .is_some_and(|hex| {
            hex.len() == 8
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// The files beside a disk's descriptor `NAME.vmdk` that are part of the
/// disk: `NAME-flat.vmdk`, the change tracking file `NAME-ctk.vmdk`, a
/// snapshot's `-delta` / `-sesparse` extent, a raw device mapping.
const DISK_SIDE_FILES: &[&str] = &["flat", "ctk", "delta", "sesparse", "rdm", "rdmp"];

/// `dir/NAME.vmdk` for a snapshot delta `dir/NAME-000001.vmdk` (six
/// digits, as vSphere numbers them).
fn base_of_delta(descriptor: &str) -> Option<String> {
    let stem = descriptor.strip_suffix(".vmdk")?;
    let (base, number) = stem.rsplit_once('-')?;
    (number.len() == 6 && number.bytes().all(|b| b.is_ascii_digit()) && !base.is_empty())
        .then(|| format!("{base}.vmdk"))
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    fn vm(name: &str, files: &[&str]) -> VmwareVm {
        VmwareVm {
            moref: format!("vm-{name}"),
            name: name.into(),
            instance_uuid: name.into(),
            power_state: "poweredOff".into(),
            template: false,
            host: None,
            disks: files
                .iter()
                .enumerate()
                .map(|(i, f)| VmwareDiskInfo {
                    key: 2000 + i as i32,
                    label: format!("Hard disk {}", i + 1),
                    capacity_bytes: 1 << 20,
                    file: f.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_vm_disk_is_found_under_its_snapshots_and_without_regard_to_case() {
        let vms = [
            vm("web", &["[ds1] web/web-000002.vmdk"]),
            vm("db", &["[ds1] db/DB.vmdk"]),
        ];
        for (path, owner) in [
            ("web/web-000002.vmdk", Some("web")),
            ("web/web.vmdk", Some("web")),
            ("web/web-flat.vmdk", Some("web")),
            ("web/web-ctk.vmdk", Some("web")),
            ("web/web-000002-delta.vmdk", Some("web")),
            ("web/web-000002-sesparse.vmdk", Some("web")),
            ("db/db.vmdk", Some("db")),
            ("DB/db-FLAT.vmdk", Some("db")),
            // The flat file a --force restore gave a disk later attached.
            ("db/db-0a1b2c3d-flat.vmdk", Some("db")),
            ("db/db-0a1b2c3-flat.vmdk", None),
            ("db/db-0a1b2c3dd-flat.vmdk", None),
            ("web/web-restored.vmdk", None),
            ("web/web-000001x.vmdk", None),
            ("other/web.vmdk", None),
        ] {
            assert_eq!(disk_owner(&vms, "ds1", path), owner, "{path}");
        }
        assert_eq!(disk_owner(&vms, "ds2", "web/web.vmdk"), None);
    }
}
