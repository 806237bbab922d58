//! The simulated host's object types (xenapi-reference.md §2): references,
//! classes and their wire names, one struct per class, and the constructor
//! records `VDI.create` / `VBD.create` read. Plain data: no rules here.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cbt::ChangeBitmap;
use crate::disk::Disk;

pub type Ref = String;
pub const NULL_REF: &str = "OpaqueRef:NULL";

/// Largest VDI the simulator creates (VHD's limit, 2040 GiB).
pub const MAX_VDI_BYTES: u64 = 2040 << 30;

/// `other_config["content_id"]` after `data_destroy` (storage_smapiv1.ml).
pub const NO_CONTENT_ID: &str = "/No content: this is a cbt_metadata VDI/";

/// A random (version 4) UUID.
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn new_ref() -> Ref {
    format!("OpaqueRef:{}", new_uuid())
}

/// The object classes, with their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Session,
    Pool,
    Host,
    Sr,
    Pbd,
    Network,
    Pif,
    Vm,
    Vbd,
    Vdi,
    Task,
}

impl Class {
    pub const ALL: [Class; 11] = [
        Class::Session,
        Class::Pool,
        Class::Host,
        Class::Sr,
        Class::Pbd,
        Class::Network,
        Class::Pif,
        Class::Vm,
        Class::Vbd,
        Class::Vdi,
        Class::Task,
    ];

    pub fn wire_name(self) -> &'static str {
        match self {
            Class::Session => "session",
            Class::Pool => "pool",
            Class::Host => "host",
            Class::Sr => "SR",
            Class::Pbd => "PBD",
            Class::Network => "network",
            Class::Pif => "PIF",
            Class::Vm => "VM",
            Class::Vbd => "VBD",
            Class::Vdi => "VDI",
            Class::Task => "task",
        }
    }

    /// Class names are matched case-insensitively (xapi accepts `vdi.x` too).
    pub fn parse(name: &str) -> Option<Class> {
        Class::ALL
            .into_iter()
            .find(|c| c.wire_name().eq_ignore_ascii_case(name))
    }

    /// Fields of type `Set(Ref)`: their getters on a dead ref raise
    /// `HANDLE_INVALID [ref]` without the class (gen_db_actions.ml quirk).
    pub fn set_ref_fields(self) -> &'static [&'static str] {
        match self {
            Class::Vdi => &["VBDs", "crash_dumps", "snapshots"],
            Class::Vm => &["VBDs", "VIFs", "snapshots", "consoles", "crash_dumps"],
            Class::Sr => &["VDIs", "PBDs"],
            Class::Host => &["PBDs", "PIFs", "resident_VMs"],
            Class::Network => &["PIFs", "VIFs"],
            Class::Task => &["subtasks"],
            _ => &[],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub uuid: String,
    pub user: String,
    pub originator: String,
    pub created: DateTime<Utc>,
    /// The last call made with it (`last_active`).
    pub last_active: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pool {
    pub uuid: String,
    pub name_label: String,
    pub master: Ref,
    pub default_sr: Ref,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub uuid: String,
    pub name_label: String,
    pub hostname: String,
    pub address: String,
    pub certificate_pem: String,
    /// A pool member's own NBD port (members exist only while the
    /// simulator runs; `None`: the first host's, `HostConfig::nbd_port`).
    #[serde(skip)]
    pub nbd_port: Option<u16>,
    /// A pool member's control domain (`None`: `State::dom0`).
    #[serde(skip)]
    pub control_domain: Option<Ref>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sr {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub sr_type: String,
    /// The SM driver has `VDI_CONFIG_CBT`.
    pub cbt_capable: bool,
    /// Visible from every host of the pool (a PBD on each), like NFS.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pbd {
    pub uuid: String,
    pub host: Ref,
    pub sr: Ref,
    pub currently_attached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    pub uuid: String,
    pub name_label: String,
    pub bridge: String,
    pub purpose: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pif {
    pub uuid: String,
    pub device: String,
    pub network: Ref,
    pub host: Ref,
    pub ip: String,
    pub ipv6: Vec<String>,
    pub management: bool,
    pub currently_attached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    /// `Halted`, `Running` or `Suspended`.
    pub power_state: String,
    pub is_control_domain: bool,
    pub is_a_snapshot: bool,
    pub snapshot_of: Ref,
    pub snapshot_time: Option<DateTime<Utc>>,
    pub other_config: BTreeMap<String, String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vbd {
    pub uuid: String,
    pub vm: Ref,
    pub vdi: Ref,
    pub userdevice: String,
    pub device: String,
    /// `RO` or `RW`.
    pub mode: String,
    pub bootable: bool,
    pub currently_attached: bool,
    pub other_config: BTreeMap<String, String>,
    /// `Disk`, `CD` or `Floppy` (the record's `type`).
    #[serde(default = "disk_type")]
    pub vbd_type: String,
    /// A drive with no medium (a CD only): `vdi` is `OpaqueRef:NULL`.
    #[serde(default)]
    pub empty: bool,
}

/// The VBD type of states saved before CD drives existed.
fn disk_type() -> String {
    "Disk".into()
}

/// One CBT log (SM's `<uuid>.cbtlog`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CbtLog {
    pub bits: ChangeBitmap,
    pub parent: Option<Ref>,
    pub child: Option<Ref>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vdi {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub sr: Ref,
    pub virtual_size: u64,
    pub vdi_type: String,
    pub sharable: bool,
    pub read_only: bool,
    pub other_config: BTreeMap<String, String>,
    pub sm_config: BTreeMap<String, String>,
    pub xenstore_data: BTreeMap<String, String>,
    pub is_a_snapshot: bool,
    pub snapshot_of: Ref,
    pub snapshot_time: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub on_boot: String,
    pub cbt_enabled: bool,
    pub log: Option<CbtLog>,
    /// The VM whose `suspend_VDI` this is (a `suspend` VDI), kept here so
    /// that the VM record need not change; the VM record shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend_of: Option<Ref>,
    /// `None` once `data_destroy` removed the data.
    #[serde(skip)]
    pub data: Option<Arc<Disk>>,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    /// pending, success, failure, cancelling, cancelled
    pub status: String,
    pub progress: f64,
    pub created: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    pub result: String,
    pub error_info: Vec<String>,
    pub other_config: BTreeMap<String, String>,
}

/// The fields `VDI.create` reads (xenapi-reference.md §2.9).
#[derive(Debug, Clone)]
pub struct NewVdi {
    pub name_label: String,
    pub name_description: String,
    pub sr: Ref,
    pub virtual_size: u64,
    pub vdi_type: String,
    pub sharable: bool,
    pub read_only: bool,
    pub other_config: BTreeMap<String, String>,
    pub sm_config: BTreeMap<String, String>,
    pub xenstore_data: BTreeMap<String, String>,
    pub tags: Vec<String>,
}

impl NewVdi {
    /// A plain read-write `user` VDI with no configuration maps or tags.
    pub fn user(name_label: impl Into<String>, sr: Ref, virtual_size: u64) -> NewVdi {
        NewVdi {
            name_label: name_label.into(),
            name_description: String::new(),
            sr,
            virtual_size,
            vdi_type: "user".into(),
            sharable: false,
            read_only: false,
            other_config: BTreeMap::new(),
            sm_config: BTreeMap::new(),
            xenstore_data: BTreeMap::new(),
            tags: Vec::new(),
        }
    }
}

/// The fields `VBD.create` reads.
#[derive(Debug, Clone)]
pub struct NewVbd {
    pub vm: Ref,
    pub vdi: Ref,
    pub userdevice: String,
    pub mode: String,
    pub bootable: bool,
    pub other_config: BTreeMap<String, String>,
    /// `Disk`, `CD` or `Floppy`.
    pub vbd_type: String,
    /// A CD drive with no medium.
    pub empty: bool,
}

impl NewVbd {
    /// A plugged-in disk: a `Disk` VBD, not bootable, no configuration.
    pub fn disk(vm: &str, vdi: &str, userdevice: &str, mode: &str) -> NewVbd {
        NewVbd {
            vm: vm.to_string(),
            vdi: vdi.to_string(),
            userdevice: userdevice.to_string(),
            mode: mode.to_string(),
            bootable: false,
            other_config: BTreeMap::new(),
            vbd_type: "Disk".into(),
            empty: false,
        }
    }
}
