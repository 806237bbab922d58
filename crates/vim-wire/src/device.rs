//! Virtual devices as `config.hardware.device` carries them: a
//! [`VirtualDisk`] with its backing (the four changeId-carrying backings
//! typed, any other kept as "other backing type"), any other device kept
//! as its element. Element order follows the WSDL: VirtualDevice's
//! `key, deviceInfo, backing, connectable, slotInfo, controllerKey,
//! unitNumber`, then VirtualDisk's `capacityInKB, capacityInBytes`.

use crate::error::DecodeError;
use crate::types::{
    opt_bool, opt_i32, opt_i64, opt_moref, opt_text, req_i32, req_i64, req_text, Moref,
};
use crate::xml::Element;

/// The backing types that carry a `changeId` (VDDK guide, "Gathering
/// Changed Block Information"), and any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingKind {
    FlatVer2,
    SparseVer2,
    RawDiskMappingVer1,
    RawDiskVer2,
    /// Another backing type, by its vim25 name (no changeId).
    Other(String),
}

impl BackingKind {
    pub fn type_name(&self) -> &str {
        match self {
            BackingKind::FlatVer2 => "VirtualDiskFlatVer2BackingInfo",
            BackingKind::SparseVer2 => "VirtualDiskSparseVer2BackingInfo",
            BackingKind::RawDiskMappingVer1 => "VirtualDiskRawDiskMappingVer1BackingInfo",
            BackingKind::RawDiskVer2 => "VirtualDiskRawDiskVer2BackingInfo",
            BackingKind::Other(name) => name,
        }
    }

    fn from_type_name(name: &str) -> BackingKind {
        match name {
            "VirtualDiskFlatVer2BackingInfo" => BackingKind::FlatVer2,
            "VirtualDiskSparseVer2BackingInfo" => BackingKind::SparseVer2,
            "VirtualDiskRawDiskMappingVer1BackingInfo" => BackingKind::RawDiskMappingVer1,
            "VirtualDiskRawDiskVer2BackingInfo" => BackingKind::RawDiskVer2,
            other => BackingKind::Other(other.to_string()),
        }
    }

    /// Whether this backing can carry a changeId (CBT).
    pub fn carries_change_id(&self) -> bool {
        !matches!(self, BackingKind::Other(_))
    }
}

/// A disk's backing: the fields of the changeId-carrying types. For
/// `RawDiskVer2` `file_name` is its `descriptorFileName` and
/// `device_name` its `deviceName`; for `Other` the element is kept whole
/// in `other` and only `fileName` is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBacking {
    pub kind: BackingKind,
    /// `[datastore1] vm/vm.vmdk`.
    pub file_name: String,
    pub datastore: Option<Moref>,
    /// RDM: `lunUuid`.
    pub lun_uuid: Option<String>,
    /// RDM and RawDiskVer2: `deviceName`.
    pub device_name: Option<String>,
    /// RDM: `physicalMode` or `virtualMode`.
    pub compatibility_mode: Option<String>,
    /// `persistent`, `independent_persistent`, ...
    pub disk_mode: Option<String>,
    pub thin_provisioned: Option<bool>,
    pub uuid: Option<String>,
    pub content_id: Option<String>,
    /// `<uuid>/<sequence>` (see `change_id`), when CBT is on.
    pub change_id: Option<String>,
    pub other: Option<Element>,
}

impl DiskBacking {
    /// A flat ver2 backing on a datastore.
    pub fn flat(file_name: &str, datastore: Option<Moref>) -> DiskBacking {
        DiskBacking {
            kind: BackingKind::FlatVer2,
            file_name: file_name.to_string(),
            datastore,
            lun_uuid: None,
            device_name: None,
            compatibility_mode: None,
            disk_mode: Some("persistent".into()),
            thin_provisioned: Some(true),
            uuid: None,
            content_id: None,
            change_id: None,
            other: None,
        }
    }

    pub fn encode(&self, element: &str) -> Element {
        if let (BackingKind::Other(_), Some(el)) = (&self.kind, &self.other) {
            let mut el = el.clone();
            el.name = element.to_string();
            return el;
        }
        let mut e = Element::vim(element).typed(self.kind.type_name());
        let ds = |e: Element| match &self.datastore {
            Some(d) => e.with(d.encode("datastore")),
            None => e,
        };
        match self.kind {
            BackingKind::FlatVer2 => {
                e = ds(e.with(Element::leaf("fileName", self.file_name.clone())))
                    .with_opt("diskMode", self.disk_mode.as_ref())
                    .with_opt("thinProvisioned", self.thin_provisioned);
            }
            BackingKind::SparseVer2 => {
                e = ds(e.with(Element::leaf("fileName", self.file_name.clone())))
                    .with_opt("diskMode", self.disk_mode.as_ref());
            }
            BackingKind::RawDiskMappingVer1 => {
                e = ds(e.with(Element::leaf("fileName", self.file_name.clone())))
                    .with_opt("lunUuid", self.lun_uuid.as_ref())
                    .with_opt("deviceName", self.device_name.as_ref())
                    .with_opt("compatibilityMode", self.compatibility_mode.as_ref())
                    .with_opt("diskMode", self.disk_mode.as_ref());
            }
            BackingKind::RawDiskVer2 => {
                e = e
                    .with(Element::leaf(
                        "deviceName",
                        self.device_name.clone().unwrap_or_default(),
                    ))
                    .with(Element::leaf("descriptorFileName", self.file_name.clone()));
            }
            BackingKind::Other(_) => {
                e = ds(e.with(Element::leaf("fileName", self.file_name.clone())));
            }
        }
        e = e.with_opt("uuid", self.uuid.as_ref());
        if !matches!(self.kind, BackingKind::RawDiskVer2) {
            e = e.with_opt("contentId", self.content_id.as_ref());
        }
        e.with_opt("changeId", self.change_id.as_ref())
    }

    pub fn decode(el: &Element) -> Result<DiskBacking, DecodeError> {
        let kind = BackingKind::from_type_name(el.type_name().unwrap_or(""));
        let file_name = match kind {
            BackingKind::RawDiskVer2 => req_text(el, "descriptorFileName")?.to_string(),
            BackingKind::Other(_) => opt_text(el, "fileName").unwrap_or_default(),
            _ => req_text(el, "fileName")?.to_string(),
        };
        // Only the fields the backing's type has (WSDL).
        let (file_backed, rdm, raw, flat) = (
            !matches!(kind, BackingKind::RawDiskVer2),
            matches!(kind, BackingKind::RawDiskMappingVer1),
            matches!(kind, BackingKind::RawDiskVer2),
            matches!(kind, BackingKind::FlatVer2),
        );
        let when = |yes: bool, v: Option<String>| v.filter(|_| yes);
        Ok(DiskBacking {
            other: matches!(kind, BackingKind::Other(_)).then(|| el.clone()),
            file_name,
            datastore: if file_backed {
                opt_moref(el, "datastore")?
            } else {
                None
            },
            lun_uuid: when(rdm, opt_text(el, "lunUuid")),
            device_name: when(rdm || raw, opt_text(el, "deviceName")),
            compatibility_mode: when(rdm, opt_text(el, "compatibilityMode")),
            disk_mode: when(file_backed, opt_text(el, "diskMode")),
            thin_provisioned: if flat {
                opt_bool(el, "thinProvisioned")?
            } else {
                None
            },
            uuid: opt_text(el, "uuid"),
            content_id: when(file_backed, opt_text(el, "contentId")),
            change_id: opt_text(el, "changeId"),
            kind,
        })
    }
}

/// `VirtualDisk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualDisk {
    /// The device key (2000, 2001, ...), `deviceKey` of QueryChangedDiskAreas.
    pub key: i32,
    /// `deviceInfo.label`, e.g. `Hard disk 1`.
    pub label: Option<String>,
    pub summary: Option<String>,
    pub backing: DiskBacking,
    pub controller_key: Option<i32>,
    pub unit_number: Option<i32>,
    pub capacity_in_kb: i64,
    pub capacity_in_bytes: Option<i64>,
}

impl VirtualDisk {
    /// The capacity in bytes (`capacityInBytes`, else `capacityInKB` * 1024).
    pub fn capacity_bytes(&self) -> i64 {
        self.capacity_in_bytes
            .unwrap_or_else(|| self.capacity_in_kb.saturating_mul(1024))
    }
}

/// One entry of `config.hardware.device`.
// A VM has a handful of devices: boxing the disk would only cost
// ergonomics at every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtualDevice {
    Disk(VirtualDisk),
    /// Any other device (controller, NIC, ...), kept as its element.
    Other(Element),
}

impl VirtualDevice {
    /// `<element xsi:type="VirtualDisk">...`.
    pub fn encode(&self, element: &str) -> Element {
        match self {
            VirtualDevice::Other(el) => {
                let mut el = el.clone();
                el.name = element.to_string();
                el
            }
            VirtualDevice::Disk(d) => {
                let mut e = Element::vim(element)
                    .typed("VirtualDisk")
                    .with(Element::leaf("key", d.key.to_string()));
                if d.label.is_some() || d.summary.is_some() {
                    e.push(
                        Element::vim("deviceInfo")
                            .with_opt("label", d.label.as_ref())
                            .with_opt("summary", d.summary.as_ref()),
                    );
                }
                e.with(d.backing.encode("backing"))
                    .with_opt("controllerKey", d.controller_key)
                    .with_opt("unitNumber", d.unit_number)
                    .with(Element::leaf("capacityInKB", d.capacity_in_kb.to_string()))
                    .with_opt("capacityInBytes", d.capacity_in_bytes)
            }
        }
    }

    pub fn decode(el: &Element) -> Result<VirtualDevice, DecodeError> {
        if el.type_name() != Some("VirtualDisk") {
            return Ok(VirtualDevice::Other(el.clone()));
        }
        let info = el.child("deviceInfo");
        let backing = el
            .child("backing")
            .ok_or_else(|| DecodeError::missing("backing", "VirtualDisk"))?;
        Ok(VirtualDevice::Disk(VirtualDisk {
            key: req_i32(el, "key")?,
            label: info.and_then(|i| opt_text(i, "label")),
            summary: info.and_then(|i| opt_text(i, "summary")),
            backing: DiskBacking::decode(backing)?,
            controller_key: opt_i32(el, "controllerKey")?,
            unit_number: opt_i32(el, "unitNumber")?,
            capacity_in_kb: req_i64(el, "capacityInKB")?,
            capacity_in_bytes: opt_i64(el, "capacityInBytes")?,
        }))
    }

    /// The device key of any device (`None` when unreadable).
    pub fn key(&self) -> Option<i32> {
        match self {
            VirtualDevice::Disk(d) => Some(d.key),
            VirtualDevice::Other(el) => el.child("key").and_then(|k| k.text.trim().parse().ok()),
        }
    }

    pub fn as_disk(&self) -> Option<&VirtualDisk> {
        match self {
            VirtualDevice::Disk(d) => Some(d),
            VirtualDevice::Other(_) => None,
        }
    }
}

/// Decodes a device list: the children of `ArrayOfVirtualDevice` (a
/// property value) or of `hardware` (named `device`).
pub fn decode_devices<'a>(
    items: impl Iterator<Item = &'a Element>,
) -> Result<Vec<VirtualDevice>, DecodeError> {
    items.map(VirtualDevice::decode).collect()
}

/// The disks of a device list.
pub fn disks(devices: &[VirtualDevice]) -> Vec<&VirtualDisk> {
    devices.iter().filter_map(VirtualDevice::as_disk).collect()
}

/// The `config.hardware.device` list of a `VirtualMachineConfigInfo`
/// element (e.g. the opaque `config` property).
pub fn devices_of_config(config: &Element) -> Result<Vec<VirtualDevice>, DecodeError> {
    let hardware = config
        .child("hardware")
        .ok_or_else(|| DecodeError::missing("hardware", &config.name))?;
    decode_devices(hardware.children_named("device"))
}
