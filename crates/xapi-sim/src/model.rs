//! The simulated host's objects and the rules of the XenAPI calls on them,
//! written from xenapi-reference.md §2 and §5. Everything here runs under
//! one lock (the caller's); nothing here knows about wires or sockets. VDI
//! data lives in [`Disk`] files; everything else is in memory.
//!
//! The CBT chain is modelled as SM keeps it: each VDI with CBT metadata has
//! a log (bitmap + parent/child pointers). A snapshot of a CBT leaf moves
//! the leaf's log to the snapshot and starts an empty one on the leaf whose
//! parent is the snapshot; `list_changed_blocks(a, b)` ORs the logs after
//! `a` up to and including `b`; destroying a chain member ORs its bitmap
//! into its child; disable drops the leaf's log and the parent's pointer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::cbt::ChangeBitmap;
use super::disk::Disk;
use xapi_wire::value::{format_datetime, Value, EPOCH};
use xapi_wire::ApiError;

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sr {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub sr_type: String,
    /// The SM driver has `VDI_CONFIG_CBT`.
    pub cbt_capable: bool,
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

/// Fault injection switches (all documented in `sim/mod.rs`).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// An old host (XenServer 7.1): the CBT calls answer
    /// `MESSAGE_METHOD_UNKNOWN`, records have no `cbt_enabled`, and
    /// `/jsonrpc` is not there (404).
    pub legacy_host: bool,
    /// NBD connections drop after serving this many bytes of reads.
    pub nbd_drop_after_bytes: Option<u64>,
    /// Async tasks and HTTP handler tasks stay `pending` this long first.
    pub task_delay_ms: u64,
    /// Calls (by method name, e.g. `VDI.snapshot`) that fail with this
    /// `[code, params...]` after the session check, changing nothing.
    pub fail_calls: BTreeMap<String, Vec<String>>,
    /// `/import_raw_vdi` fails its task with `VDI_IO_ERROR` once it has
    /// received this many body bytes (the data before is written).
    pub import_fail_after_bytes: Option<u64>,
    /// `/import_raw_vdi` drops the connection (no more reading, a reset)
    /// once it has received this many body bytes, and fails its task with
    /// `VDI_IO_ERROR`, as xapi does when the handler's socket dies.
    pub import_drop_after_bytes: Option<u64>,
}

/// Static facts about the simulated host, fixed at start.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub username: String,
    pub password: String,
    pub hostname: String,
    /// The NBD PIF's address as get_nbd_info reports it.
    pub nbd_address: String,
    pub nbd_port: u16,
    pub certificate_pem: String,
    /// The name get_nbd_info gives as `subject`.
    pub subject: String,
    pub data_dir: PathBuf,
    /// How long `data_destroy` waits for VBDs to go (xapi: 4 s).
    pub data_destroy_wait_ms: u64,
}

/// The whole host.
#[derive(Debug)]
pub struct State {
    pub config: HostConfig,
    pub faults: Faults,
    pub sessions: BTreeMap<Ref, Session>,
    pub pools: BTreeMap<Ref, Pool>,
    pub hosts: BTreeMap<Ref, Host>,
    pub srs: BTreeMap<Ref, Sr>,
    pub pbds: BTreeMap<Ref, Pbd>,
    pub networks: BTreeMap<Ref, Network>,
    pub pifs: BTreeMap<Ref, Pif>,
    pub vms: BTreeMap<Ref, Vm>,
    pub vbds: BTreeMap<Ref, Vbd>,
    pub vdis: BTreeMap<Ref, Vdi>,
    pub tasks: BTreeMap<Ref, Task>,
    pub host: Ref,
    pub dom0: Ref,
    pub default_sr: Ref,
    pub nbd_network: Ref,
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
}

fn dt(t: &Option<DateTime<Utc>>) -> Value {
    Value::DateTime(
        t.map(|t| format_datetime(&t))
            .unwrap_or_else(|| EPOCH.into()),
    )
}

fn refs<'a>(it: impl IntoIterator<Item = &'a Ref>) -> Value {
    Value::Array(it.into_iter().map(|r| Value::String(r.clone())).collect())
}

fn map(m: &BTreeMap<String, String>) -> Value {
    Value::string_map(m)
}

fn empty_map() -> Value {
    Value::Struct(BTreeMap::new())
}

fn rec<const N: usize>(fields: [(&str, Value); N]) -> BTreeMap<String, Value> {
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

impl State {
    /// A host with one pool, a local SR (CBT-capable, plugged), a
    /// management network and an NBD network (purpose `nbd`), and dom0.
    pub fn new(config: HostConfig) -> State {
        let host = new_ref();
        let pool = new_ref();
        let sr = new_ref();
        let pbd = new_ref();
        let mgmt_net = new_ref();
        let nbd_net = new_ref();
        let dom0 = new_ref();
        let mut st = State {
            faults: Faults::default(),
            sessions: BTreeMap::new(),
            pools: BTreeMap::new(),
            hosts: BTreeMap::new(),
            srs: BTreeMap::new(),
            pbds: BTreeMap::new(),
            networks: BTreeMap::new(),
            pifs: BTreeMap::new(),
            vms: BTreeMap::new(),
            vbds: BTreeMap::new(),
            vdis: BTreeMap::new(),
            tasks: BTreeMap::new(),
            host: host.clone(),
            dom0: dom0.clone(),
            default_sr: sr.clone(),
            nbd_network: nbd_net.clone(),
            config,
        };
        st.hosts.insert(
            host.clone(),
            Host {
                uuid: new_uuid(),
                name_label: "cbtvault-sim".into(),
                hostname: st.config.hostname.clone(),
                address: st.config.nbd_address.clone(),
                certificate_pem: st.config.certificate_pem.clone(),
            },
        );
        st.pools.insert(
            pool,
            Pool {
                uuid: new_uuid(),
                name_label: "cbtvault-sim pool".into(),
                master: host.clone(),
                default_sr: sr.clone(),
            },
        );
        st.srs.insert(
            sr.clone(),
            Sr {
                uuid: new_uuid(),
                name_label: "Local storage".into(),
                name_description: "simulated EXT SR".into(),
                sr_type: "ext".into(),
                cbt_capable: true,
            },
        );
        st.pbds.insert(
            pbd,
            Pbd {
                uuid: new_uuid(),
                host: host.clone(),
                sr,
                currently_attached: true,
            },
        );
        st.networks.insert(
            mgmt_net.clone(),
            Network {
                uuid: new_uuid(),
                name_label: "Pool-wide network associated with eth0".into(),
                bridge: "xenbr0".into(),
                purpose: Vec::new(),
            },
        );
        st.networks.insert(
            nbd_net.clone(),
            Network {
                uuid: new_uuid(),
                name_label: "NBD network".into(),
                bridge: "xenbr1".into(),
                purpose: vec!["nbd".into()],
            },
        );
        st.pifs.insert(
            new_ref(),
            Pif {
                uuid: new_uuid(),
                device: "eth0".into(),
                network: mgmt_net,
                host: host.clone(),
                ip: st.config.nbd_address.clone(),
                ipv6: Vec::new(),
                management: true,
                currently_attached: true,
            },
        );
        st.pifs.insert(
            new_ref(),
            Pif {
                uuid: new_uuid(),
                device: "eth1".into(),
                network: nbd_net,
                host,
                ip: st.config.nbd_address.clone(),
                ipv6: Vec::new(),
                management: false,
                currently_attached: true,
            },
        );
        st.vms.insert(
            dom0,
            Vm {
                uuid: new_uuid(),
                name_label: "Control domain on host: cbtvault-sim".into(),
                name_description:
                    "The domain which manages physical devices and manages other domains".into(),
                power_state: "Running".into(),
                is_control_domain: true,
                is_a_snapshot: false,
                snapshot_of: NULL_REF.into(),
                snapshot_time: None,
                other_config: BTreeMap::new(),
                tags: Vec::new(),
            },
        );
        st
    }

    // ---- lookups -------------------------------------------------------

    pub fn exists(&self, class: Class, r: &str) -> bool {
        match class {
            Class::Session => self.sessions.contains_key(r),
            Class::Pool => self.pools.contains_key(r),
            Class::Host => self.hosts.contains_key(r),
            Class::Sr => self.srs.contains_key(r),
            Class::Pbd => self.pbds.contains_key(r),
            Class::Network => self.networks.contains_key(r),
            Class::Pif => self.pifs.contains_key(r),
            Class::Vm => self.vms.contains_key(r),
            Class::Vbd => self.vbds.contains_key(r),
            Class::Vdi => self.vdis.contains_key(r),
            Class::Task => self.tasks.contains_key(r),
        }
    }

    pub fn all_refs(&self, class: Class) -> Vec<Ref> {
        fn keys<T>(m: &BTreeMap<Ref, T>) -> Vec<Ref> {
            m.keys().cloned().collect()
        }
        match class {
            Class::Session => keys(&self.sessions),
            Class::Pool => keys(&self.pools),
            Class::Host => keys(&self.hosts),
            Class::Sr => keys(&self.srs),
            Class::Pbd => keys(&self.pbds),
            Class::Network => keys(&self.networks),
            Class::Pif => keys(&self.pifs),
            Class::Vm => keys(&self.vms),
            Class::Vbd => keys(&self.vbds),
            Class::Vdi => keys(&self.vdis),
            Class::Task => keys(&self.tasks),
        }
    }

    /// The uuid of an object, without building its record.
    fn uuid_of(&self, class: Class, r: &str) -> Option<&str> {
        Some(match class {
            Class::Session => &self.sessions.get(r)?.uuid,
            Class::Pool => &self.pools.get(r)?.uuid,
            Class::Host => &self.hosts.get(r)?.uuid,
            Class::Sr => &self.srs.get(r)?.uuid,
            Class::Pbd => &self.pbds.get(r)?.uuid,
            Class::Network => &self.networks.get(r)?.uuid,
            Class::Pif => &self.pifs.get(r)?.uuid,
            Class::Vm => &self.vms.get(r)?.uuid,
            Class::Vbd => &self.vbds.get(r)?.uuid,
            Class::Vdi => &self.vdis.get(r)?.uuid,
            Class::Task => &self.tasks.get(r)?.uuid,
        })
    }

    pub fn by_uuid(&self, class: Class, uuid: &str) -> Result<Ref, ApiError> {
        self.all_refs(class)
            .into_iter()
            .find(|r| self.uuid_of(class, r) == Some(uuid))
            .ok_or_else(|| ApiError::uuid_invalid(class.wire_name(), uuid))
    }

    pub fn by_name_label(&self, class: Class, name: &str) -> Vec<Ref> {
        self.all_refs(class)
            .into_iter()
            .filter(|r| {
                self.record(class, r)
                    .and_then(|m| {
                        m.get("name_label")
                            .and_then(|v| v.as_str().map(|s| s == name))
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    pub fn vdi(&self, r: &str) -> Result<&Vdi, ApiError> {
        self.vdis
            .get(r)
            .ok_or_else(|| ApiError::handle_invalid("VDI", r))
    }

    fn vdi_mut(&mut self, r: &str) -> Result<&mut Vdi, ApiError> {
        self.vdis
            .get_mut(r)
            .ok_or_else(|| ApiError::handle_invalid("VDI", r))
    }

    pub fn vm(&self, r: &str) -> Result<&Vm, ApiError> {
        self.vms
            .get(r)
            .ok_or_else(|| ApiError::handle_invalid("VM", r))
    }

    /// A VDI by reference or UUID (the HTTP handlers accept both).
    pub fn vdi_by_ref_or_uuid(&self, key: &str) -> Result<Ref, ApiError> {
        if self.vdis.contains_key(key) {
            return Ok(key.to_string());
        }
        if key.starts_with("OpaqueRef:") {
            return Err(ApiError::handle_invalid("VDI", key));
        }
        self.by_uuid(Class::Vdi, key)
    }

    pub fn vbds_of_vdi(&self, vdi: &str) -> Vec<Ref> {
        self.vbds
            .iter()
            .filter(|(_, b)| b.vdi == vdi)
            .map(|(r, _)| r.clone())
            .collect()
    }

    pub fn vbds_of_vm(&self, vm: &str) -> Vec<Ref> {
        self.vbds
            .iter()
            .filter(|(_, b)| b.vm == vm)
            .map(|(r, _)| r.clone())
            .collect()
    }

    fn sr_pbds(&self, sr: &str) -> Vec<&Pbd> {
        self.pbds.values().filter(|p| p.sr == sr).collect()
    }

    /// `SR_HAS_NO_PBDS` / `SR_NOT_ATTACHED` as SM calls check them.
    fn check_sr_attached(&self, sr: &str) -> Result<(), ApiError> {
        let pbds = self.sr_pbds(sr);
        if pbds.is_empty() {
            return Err(ApiError::new("SR_HAS_NO_PBDS", [sr]));
        }
        if !pbds.iter().any(|p| p.currently_attached) {
            return Err(ApiError::new("SR_NOT_ATTACHED", [sr]));
        }
        Ok(())
    }

    // ---- records -------------------------------------------------------

    /// The record of one object as `get_record` returns it.
    pub fn record(&self, class: Class, r: &str) -> Option<BTreeMap<String, Value>> {
        Some(match class {
            Class::Session => {
                let s = self.sessions.get(r)?;
                rec([
                    ("uuid", Value::str(&s.uuid)),
                    ("this_host", Value::str(&self.host)),
                    ("this_user", Value::str(NULL_REF)),
                    ("last_active", Value::DateTime(format_datetime(&s.created))),
                    ("pool", Value::Bool(false)),
                    ("other_config", empty_map()),
                    ("is_local_superuser", Value::Bool(true)),
                    ("subject", Value::str(NULL_REF)),
                    (
                        "validation_time",
                        Value::DateTime(format_datetime(&s.created)),
                    ),
                    ("auth_user_sid", Value::str("")),
                    ("auth_user_name", Value::str(&s.user)),
                    ("rbac_permissions", Value::Array(vec![])),
                    ("tasks", Value::Array(vec![])),
                    ("parent", Value::str(NULL_REF)),
                    ("originator", Value::str(&s.originator)),
                    ("client_certificate", Value::Bool(false)),
                ])
            }
            Class::Pool => {
                let p = self.pools.get(r)?;
                rec([
                    ("uuid", Value::str(&p.uuid)),
                    ("name_label", Value::str(&p.name_label)),
                    ("name_description", Value::str("")),
                    ("master", Value::str(&p.master)),
                    ("default_SR", Value::str(&p.default_sr)),
                    ("suspend_image_SR", Value::str(&p.default_sr)),
                    ("crash_dump_SR", Value::str(&p.default_sr)),
                    ("other_config", empty_map()),
                    ("ha_enabled", Value::Bool(false)),
                    ("tags", Value::Array(vec![])),
                    ("restrictions", empty_map()),
                ])
            }
            Class::Host => {
                let h = self.hosts.get(r)?;
                let mut sv = BTreeMap::new();
                for (k, v) in [
                    ("product_brand", "XenServer"),
                    ("product_version", "8.4.0"),
                    ("platform_name", "XCP"),
                    ("platform_version", "3.4.0"),
                    ("xapi", "24.19"),
                    ("hostname", h.hostname.as_str()),
                ] {
                    sv.insert(k.to_string(), v.to_string());
                }
                if self.faults.legacy_host {
                    sv.insert("product_version".into(), "7.1.0".into());
                }
                rec([
                    ("uuid", Value::str(&h.uuid)),
                    ("name_label", Value::str(&h.name_label)),
                    ("name_description", Value::str("simulated by cbtvault")),
                    ("hostname", Value::str(&h.hostname)),
                    ("address", Value::str(&h.address)),
                    ("enabled", Value::Bool(true)),
                    ("API_version_major", Value::Int(2)),
                    (
                        "API_version_minor",
                        Value::Int(if self.faults.legacy_host { 7 } else { 21 }),
                    ),
                    ("API_version_vendor", Value::str("XenSource")),
                    ("software_version", map(&sv)),
                    ("other_config", empty_map()),
                    (
                        "PBDs",
                        refs(
                            self.pbds
                                .iter()
                                .filter(|(_, p)| p.host == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    (
                        "PIFs",
                        refs(
                            self.pifs
                                .iter()
                                .filter(|(_, p)| p.host == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    (
                        "resident_VMs",
                        refs(
                            self.vms
                                .iter()
                                .filter(|(_, v)| v.power_state == "Running")
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("control_domain", Value::str(&self.dom0)),
                    ("tags", Value::Array(vec![])),
                ])
            }
            Class::Sr => {
                let s = self.srs.get(r)?;
                let vdis: Vec<&Ref> = self
                    .vdis
                    .iter()
                    .filter(|(_, v)| v.sr == r)
                    .map(|(k, _)| k)
                    .collect();
                let virtual_allocation: u64 = vdis
                    .iter()
                    .filter_map(|k| self.vdis.get(*k))
                    .map(|v| v.virtual_size)
                    .sum();
                rec([
                    ("uuid", Value::str(&s.uuid)),
                    ("name_label", Value::str(&s.name_label)),
                    ("name_description", Value::str(&s.name_description)),
                    ("type", Value::str(&s.sr_type)),
                    ("content_type", Value::str("user")),
                    ("shared", Value::Bool(false)),
                    ("physical_size", Value::from(MAX_VDI_BYTES * 4)),
                    ("physical_utilisation", Value::Int(0)),
                    ("virtual_allocation", Value::from(virtual_allocation)),
                    ("VDIs", refs(vdis)),
                    (
                        "PBDs",
                        refs(self.pbds.iter().filter(|(_, p)| p.sr == r).map(|(k, _)| k)),
                    ),
                    ("other_config", empty_map()),
                    ("sm_config", empty_map()),
                    (
                        "allowed_operations",
                        Value::strings([
                            "vdi_create",
                            "vdi_destroy",
                            "vdi_snapshot",
                            "vdi_enable_cbt",
                            "vdi_disable_cbt",
                            "vdi_data_destroy",
                            "vdi_list_changed_blocks",
                        ]),
                    ),
                    ("current_operations", empty_map()),
                    ("tags", Value::Array(vec![])),
                ])
            }
            Class::Pbd => {
                let p = self.pbds.get(r)?;
                rec([
                    ("uuid", Value::str(&p.uuid)),
                    ("host", Value::str(&p.host)),
                    ("SR", Value::str(&p.sr)),
                    ("device_config", empty_map()),
                    ("currently_attached", Value::Bool(p.currently_attached)),
                    ("other_config", empty_map()),
                ])
            }
            Class::Network => {
                let n = self.networks.get(r)?;
                rec([
                    ("uuid", Value::str(&n.uuid)),
                    ("name_label", Value::str(&n.name_label)),
                    ("name_description", Value::str("")),
                    ("bridge", Value::str(&n.bridge)),
                    ("MTU", Value::Int(1500)),
                    ("managed", Value::Bool(true)),
                    ("purpose", Value::strings(n.purpose.iter().cloned())),
                    (
                        "PIFs",
                        refs(
                            self.pifs
                                .iter()
                                .filter(|(_, p)| p.network == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("VIFs", Value::Array(vec![])),
                    ("other_config", empty_map()),
                    ("tags", Value::Array(vec![])),
                ])
            }
            Class::Pif => {
                let p = self.pifs.get(r)?;
                rec([
                    ("uuid", Value::str(&p.uuid)),
                    ("device", Value::str(&p.device)),
                    ("network", Value::str(&p.network)),
                    ("host", Value::str(&p.host)),
                    ("IP", Value::str(&p.ip)),
                    ("IPv6", Value::strings(p.ipv6.iter().cloned())),
                    ("netmask", Value::str("255.0.0.0")),
                    ("gateway", Value::str("")),
                    ("ip_configuration_mode", Value::str("Static")),
                    ("ipv6_configuration_mode", Value::str("None")),
                    ("primary_address_type", Value::str("IPv4")),
                    ("MAC", Value::str("02:00:00:00:00:01")),
                    ("MTU", Value::Int(1500)),
                    ("VLAN", Value::Int(-1)),
                    ("management", Value::Bool(p.management)),
                    ("physical", Value::Bool(true)),
                    ("currently_attached", Value::Bool(p.currently_attached)),
                    ("other_config", empty_map()),
                ])
            }
            Class::Vm => {
                let v = self.vms.get(r)?;
                rec([
                    ("uuid", Value::str(&v.uuid)),
                    ("name_label", Value::str(&v.name_label)),
                    ("name_description", Value::str(&v.name_description)),
                    ("power_state", Value::str(&v.power_state)),
                    ("is_a_template", Value::Bool(false)),
                    ("is_default_template", Value::Bool(false)),
                    ("is_control_domain", Value::Bool(v.is_control_domain)),
                    ("is_a_snapshot", Value::Bool(v.is_a_snapshot)),
                    ("snapshot_of", Value::str(&v.snapshot_of)),
                    (
                        "snapshots",
                        refs(
                            self.vms
                                .iter()
                                .filter(|(_, s)| s.snapshot_of == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("snapshot_time", dt(&v.snapshot_time)),
                    ("VBDs", refs(&self.vbds_of_vm(r))),
                    ("VIFs", Value::Array(vec![])),
                    ("consoles", Value::Array(vec![])),
                    ("crash_dumps", Value::Array(vec![])),
                    (
                        "resident_on",
                        Value::str(if v.power_state == "Running" {
                            self.host.as_str()
                        } else {
                            NULL_REF
                        }),
                    ),
                    (
                        "domid",
                        Value::Int(if v.is_control_domain {
                            0
                        } else if v.power_state == "Running" {
                            1
                        } else {
                            -1
                        }),
                    ),
                    ("other_config", map(&v.other_config)),
                    ("tags", Value::strings(v.tags.iter().cloned())),
                    ("memory_static_max", Value::Int(1 << 30)),
                    ("VCPUs_max", Value::Int(1)),
                    ("allowed_operations", Value::Array(vec![])),
                    ("current_operations", empty_map()),
                    ("blocked_operations", empty_map()),
                    ("HVM_boot_policy", Value::str("BIOS order")),
                    ("platform", empty_map()),
                ])
            }
            Class::Vbd => {
                let b = self.vbds.get(r)?;
                rec([
                    ("uuid", Value::str(&b.uuid)),
                    ("VM", Value::str(&b.vm)),
                    ("VDI", Value::str(&b.vdi)),
                    ("device", Value::str(&b.device)),
                    ("userdevice", Value::str(&b.userdevice)),
                    ("bootable", Value::Bool(b.bootable)),
                    ("mode", Value::str(&b.mode)),
                    ("type", Value::str("Disk")),
                    ("unpluggable", Value::Bool(true)),
                    ("empty", Value::Bool(false)),
                    ("currently_attached", Value::Bool(b.currently_attached)),
                    ("storage_lock", Value::Bool(false)),
                    ("status_code", Value::Int(0)),
                    ("status_detail", Value::str("")),
                    ("other_config", map(&b.other_config)),
                    ("allowed_operations", Value::Array(vec![])),
                    ("current_operations", empty_map()),
                    ("qos_algorithm_type", Value::str("")),
                    ("qos_algorithm_params", empty_map()),
                    ("runtime_properties", empty_map()),
                ])
            }
            Class::Vdi => {
                let v = self.vdis.get(r)?;
                let mut m = rec([
                    ("uuid", Value::str(&v.uuid)),
                    ("name_label", Value::str(&v.name_label)),
                    ("name_description", Value::str(&v.name_description)),
                    (
                        "allowed_operations",
                        Value::strings(self.vdi_allowed_operations(v)),
                    ),
                    ("current_operations", empty_map()),
                    ("SR", Value::str(&v.sr)),
                    ("VBDs", refs(&self.vbds_of_vdi(r))),
                    ("crash_dumps", Value::Array(vec![])),
                    ("virtual_size", Value::from(v.virtual_size)),
                    (
                        "physical_utilisation",
                        Value::from(if v.data.is_some() { v.virtual_size } else { 0 }),
                    ),
                    ("type", Value::str(&v.vdi_type)),
                    ("sharable", Value::Bool(v.sharable)),
                    ("read_only", Value::Bool(v.read_only)),
                    ("other_config", map(&v.other_config)),
                    ("storage_lock", Value::Bool(false)),
                    ("location", Value::str(&v.uuid)),
                    ("managed", Value::Bool(true)),
                    ("missing", Value::Bool(false)),
                    ("parent", Value::str(NULL_REF)),
                    ("xenstore_data", map(&v.xenstore_data)),
                    ("sm_config", map(&v.sm_config)),
                    ("is_a_snapshot", Value::Bool(v.is_a_snapshot)),
                    ("snapshot_of", Value::str(&v.snapshot_of)),
                    (
                        "snapshots",
                        refs(
                            self.vdis
                                .iter()
                                .filter(|(_, s)| s.snapshot_of == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("snapshot_time", dt(&v.snapshot_time)),
                    ("tags", Value::strings(v.tags.iter().cloned())),
                    ("allow_caching", Value::Bool(false)),
                    ("on_boot", Value::str(&v.on_boot)),
                    ("metadata_of_pool", Value::str(NULL_REF)),
                    ("metadata_latest", Value::Bool(false)),
                    ("is_tools_iso", Value::Bool(false)),
                    ("cbt_enabled", Value::Bool(v.cbt_enabled)),
                ]);
                if self.faults.legacy_host {
                    m.remove("cbt_enabled");
                }
                m
            }
            Class::Task => {
                let t = self.tasks.get(r)?;
                rec([
                    ("uuid", Value::str(&t.uuid)),
                    ("name_label", Value::str(&t.name_label)),
                    ("name_description", Value::str(&t.name_description)),
                    (
                        "allowed_operations",
                        Value::strings(if t.status == "pending" {
                            vec!["cancel"]
                        } else {
                            vec![]
                        }),
                    ),
                    ("current_operations", empty_map()),
                    ("created", Value::DateTime(format_datetime(&t.created))),
                    ("finished", dt(&t.finished)),
                    ("status", Value::str(&t.status)),
                    ("resident_on", Value::str(&self.host)),
                    ("progress", Value::Double(t.progress)),
                    ("type", Value::str("<none/>")),
                    ("result", Value::str(&t.result)),
                    ("error_info", Value::strings(t.error_info.iter().cloned())),
                    ("other_config", map(&t.other_config)),
                    ("subtask_of", Value::str(NULL_REF)),
                    ("subtasks", Value::Array(vec![])),
                    ("backtrace", Value::str("()")),
                ])
            }
        })
    }

    fn vdi_allowed_operations(&self, v: &Vdi) -> Vec<&'static str> {
        if v.vdi_type == "cbt_metadata" {
            return vec![
                "data_destroy",
                "destroy",
                "list_changed_blocks",
                "forget",
                "generate_config",
                "update",
            ];
        }
        let mut ops = vec![
            "clone",
            "copy",
            "snapshot",
            "generate_config",
            "update",
            "forget",
            "list_changed_blocks",
        ];
        if !v.cbt_enabled {
            ops.extend(["resize", "mirror", "set_on_boot"]);
        }
        if !v.is_a_snapshot {
            ops.extend(["enable_cbt", "disable_cbt"]);
        } else if v.cbt_enabled {
            ops.push("data_destroy");
        }
        ops.push("destroy");
        ops
    }

    // ---- sessions ------------------------------------------------------

    pub fn login(&mut self, user: &str, password: &str, originator: &str) -> Result<Ref, ApiError> {
        if user != self.config.username || password != self.config.password {
            return Err(ApiError::new(
                "SESSION_AUTHENTICATION_FAILED",
                Vec::<String>::new(),
            ));
        }
        let r = new_ref();
        self.sessions.insert(
            r.clone(),
            Session {
                uuid: new_uuid(),
                user: user.to_string(),
                originator: originator.to_string(),
                created: Utc::now(),
            },
        );
        Ok(r)
    }

    pub fn check_session(&self, session: &str) -> Result<(), ApiError> {
        if self.sessions.contains_key(session) {
            Ok(())
        } else {
            Err(ApiError::session_invalid(session))
        }
    }

    pub fn logout(&mut self, session: &str) {
        self.sessions.remove(session);
    }

    // ---- VDI -----------------------------------------------------------

    fn disk_path(&self, uuid: &str) -> PathBuf {
        self.config.data_dir.join(format!("{uuid}.img"))
    }

    /// `VDI.create` (xenapi-reference.md §2.9).
    pub fn vdi_create(&mut self, new: NewVdi) -> Result<Ref, ApiError> {
        if new.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type("", "cbt_metadata"));
        }
        if !self.srs.contains_key(&new.sr) {
            return Err(ApiError::handle_invalid("SR", &new.sr));
        }
        self.check_sr_attached(&new.sr)?;
        if new.virtual_size > MAX_VDI_BYTES {
            return Err(ApiError::new(
                "VDI_TOO_LARGE",
                [String::new(), MAX_VDI_BYTES.to_string()],
            ));
        }
        let uuid = new_uuid();
        let disk = Disk::create(&self.disk_path(&uuid), new.virtual_size)
            .map_err(ApiError::vdi_io_from)?;
        let r = new_ref();
        self.vdis.insert(
            r.clone(),
            Vdi {
                uuid,
                name_label: new.name_label,
                name_description: new.name_description,
                sr: new.sr,
                virtual_size: new.virtual_size,
                vdi_type: new.vdi_type,
                sharable: new.sharable,
                read_only: new.read_only,
                other_config: new.other_config,
                sm_config: new.sm_config,
                xenstore_data: new.xenstore_data,
                is_a_snapshot: false,
                snapshot_of: NULL_REF.into(),
                snapshot_time: None,
                tags: new.tags,
                on_boot: "persist".into(),
                cbt_enabled: false,
                log: None,
                data: Some(Arc::new(disk)),
            },
        );
        Ok(r)
    }

    /// The checks xapi makes for `enable_cbt`/`disable_cbt`, in its order
    /// (§2.3: SM feature, cbt_metadata, snapshot, type, on_boot).
    fn check_cbt_toggle(&self, r: &str) -> Result<(), ApiError> {
        let v = self.vdi(r)?;
        let sr_capable = self.srs.get(&v.sr).map(|s| s.cbt_capable).unwrap_or(false);
        if !sr_capable {
            return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [v.sr.as_str()]));
        }
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        if v.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(format!(
                "VDI is a snapshot: {r}"
            )));
        }
        if v.vdi_type != "user" && v.vdi_type != "system" {
            return Err(ApiError::incompatible_type(r, &v.vdi_type));
        }
        if v.on_boot == "reset" {
            return Err(ApiError::new(
                "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
                Vec::<String>::new(),
            ));
        }
        self.check_sr_attached(&v.sr)
    }

    /// `VDI.enable_cbt`: starts a new, empty log (a new backup set).
    pub fn enable_cbt(&mut self, r: &str) -> Result<(), ApiError> {
        self.check_cbt_toggle(r)?;
        let v = self.vdi_mut(r)?;
        if !v.cbt_enabled {
            v.cbt_enabled = true;
            v.log = Some(CbtLog {
                bits: ChangeBitmap::new(v.virtual_size),
                parent: None,
                child: None,
            });
        }
        Ok(())
    }

    /// `VDI.disable_cbt`: drops the leaf's log and the parent's pointer to
    /// it, so the chain to older snapshots is broken for good.
    pub fn disable_cbt(&mut self, r: &str) -> Result<(), ApiError> {
        self.check_cbt_toggle(r)?;
        self.drop_leaf_log(r);
        Ok(())
    }

    fn drop_leaf_log(&mut self, r: &str) {
        let Some(v) = self.vdis.get_mut(r) else {
            return;
        };
        if !v.cbt_enabled && v.log.is_none() {
            return;
        }
        v.cbt_enabled = false;
        let parent = v.log.take().and_then(|l| l.parent);
        if let Some(p) = parent {
            if let Some(log) = self.vdis.get_mut(&p).and_then(|pv| pv.log.as_mut()) {
                if log.child.as_deref() == Some(r) {
                    log.child = None;
                }
            }
        }
    }

    /// CBT turned off by the system (SM `_disable_cbt_on_error`, §5 rule 4):
    /// like `disable_cbt` but without the API checks.
    pub fn system_disable_cbt(&mut self, r: &str) -> Result<(), ApiError> {
        self.vdi(r)?;
        self.drop_leaf_log(r);
        Ok(())
    }

    /// `VDI.snapshot`: a read-only copy; for a CBT leaf the current log moves
    /// to the snapshot and the leaf starts an empty one after it.
    pub fn vdi_snapshot(&mut self, r: &str) -> Result<Ref, ApiError> {
        let v = self.vdi(r)?.clone();
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        if v.sharable {
            return Err(ApiError::new("VDI_IS_SHARABLE", [r]));
        }
        if v.on_boot == "reset" {
            return Err(ApiError::new(
                "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
                Vec::<String>::new(),
            ));
        }
        self.check_sr_attached(&v.sr)?;
        let source = v
            .data
            .clone()
            .ok_or_else(|| ApiError::incompatible_type(r, "cbt_metadata"))?;
        let uuid = new_uuid();
        // Copy-on-write: the source goes on in a new file of its own.
        let copy = source
            .snapshot(
                &self.disk_path(&format!("{}.{}", v.uuid, new_uuid())),
                &self.disk_path(&uuid),
            )
            .map_err(ApiError::vdi_io_from)?;
        let s = new_ref();
        let chain = v.cbt_enabled && !v.is_a_snapshot;
        let snap = Vdi {
            uuid,
            name_label: v.name_label.clone(),
            name_description: v.name_description.clone(),
            sr: v.sr.clone(),
            virtual_size: v.virtual_size,
            vdi_type: v.vdi_type.clone(),
            sharable: false,
            read_only: v.read_only,
            other_config: v.other_config.clone(),
            sm_config: BTreeMap::new(),
            xenstore_data: BTreeMap::new(),
            is_a_snapshot: true,
            snapshot_of: r.to_string(),
            snapshot_time: Some(Utc::now()),
            tags: v.tags.clone(),
            on_boot: v.on_boot.clone(),
            cbt_enabled: chain,
            log: None,
            data: Some(Arc::new(copy)),
        };
        self.vdis.insert(s.clone(), snap);
        if chain {
            // SM `_cbt_snapshot`: the leaf's log becomes the snapshot's.
            let leaf = self.vdi_mut(r)?;
            let size = leaf.virtual_size;
            let moved = leaf.log.replace(CbtLog {
                bits: ChangeBitmap::new(size),
                parent: Some(s.clone()),
                child: None,
            });
            let mut moved = moved.unwrap_or(CbtLog {
                bits: ChangeBitmap::new(size),
                parent: None,
                child: None,
            });
            moved.child = Some(r.to_string());
            if let Some(p) = moved.parent.clone() {
                if let Some(log) = self.vdis.get_mut(&p).and_then(|pv| pv.log.as_mut()) {
                    log.child = Some(s.clone());
                }
            }
            self.vdi_mut(&s)?.log = Some(moved);
        }
        Ok(s)
    }

    /// A VBD (attached or reserved) that blocks `list_changed_blocks` on
    /// `vdi_to`: any attached VBD unless it belongs to a snapshot VM.
    fn attached_outside_snapshots(&self, vdi: &str) -> bool {
        self.vbds.values().any(|b| {
            b.vdi == vdi
                && b.currently_attached
                && !self
                    .vms
                    .get(&b.vm)
                    .map(|vm| vm.is_a_snapshot)
                    .unwrap_or(false)
        })
    }

    /// `VDI.list_changed_blocks(vdi_from, vdi_to)` (§2.5).
    pub fn list_changed_blocks(&self, from: &str, to: &str) -> Result<String, ApiError> {
        let to_vdi = self.vdi(to)?;
        self.vdi(from)?;
        if self.attached_outside_snapshots(to) {
            return Err(ApiError::in_use(to, "list_changed_blocks"));
        }
        self.check_sr_attached(&to_vdi.sr)?;
        if from == to {
            return Err(ApiError::cbt_changed_blocks(
                "Source and target VDI are same",
            ));
        }
        let unrelated = || ApiError::cbt_changed_blocks("Source and target VDI are unrelated");
        let mut acc = ChangeBitmap::new(to_vdi.virtual_size);
        let mut cursor = self
            .vdi(from)?
            .log
            .as_ref()
            .ok_or_else(unrelated)?
            .child
            .clone();
        // A chain can't be longer than the number of VDIs; the bound only
        // guards against a cycle from a bug.
        for _ in 0..=self.vdis.len() {
            let Some(c) = cursor else {
                break;
            };
            let Some(log) = self.vdis.get(&c).and_then(|v| v.log.as_ref()) else {
                break;
            };
            acc.or_assign(&log.bits);
            if c == to {
                return Ok(acc.to_base64());
            }
            cursor = log.child.clone();
        }
        Err(unrelated())
    }

    /// `VDI.data_destroy` checks before the wait for VBDs (§2.7). `Ok(true)`:
    /// already `cbt_metadata`, nothing to do.
    pub fn data_destroy_precheck(&self, r: &str) -> Result<bool, ApiError> {
        let v = self.vdi(r)?;
        if !v.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(format!(
                "VDI is not a snapshot: {r}"
            )));
        }
        if !v.cbt_enabled {
            return Err(ApiError::new("VDI_NO_CBT_METADATA", [r]));
        }
        if v.vdi_type == "cbt_metadata" {
            return Ok(true);
        }
        self.check_sr_attached(&v.sr)?;
        Ok(false)
    }

    /// Whether any VBD of the VDI still exists (data_destroy waits for them
    /// to be unplugged *and* destroyed).
    pub fn has_vbds(&self, r: &str) -> bool {
        self.vbds.values().any(|b| b.vdi == r)
    }

    /// The data part of `data_destroy`, once no VBD is left.
    pub fn data_destroy_finish(&mut self, r: &str) -> Result<(), ApiError> {
        if self.has_vbds(r) {
            return Err(ApiError::in_use(r, "data_destroy"));
        }
        let v = self.vdi_mut(r)?;
        if v.vdi_type == "cbt_metadata" {
            return Ok(());
        }
        v.vdi_type = "cbt_metadata".into();
        v.other_config
            .insert("content_id".into(), NO_CONTENT_ID.into());
        if let Some(d) = v.data.take() {
            d.remove();
        }
        Ok(())
    }

    /// `VDI.destroy` (§2.8): refused while attached; CBT bits move to the child.
    pub fn vdi_destroy(&mut self, r: &str) -> Result<(), ApiError> {
        self.vdi(r)?;
        if self
            .vbds
            .values()
            .any(|b| b.vdi == r && b.currently_attached)
        {
            return Err(ApiError::in_use(r, "destroy"));
        }
        let vbds = self.vbds_of_vdi(r);
        for b in vbds {
            self.vbds.remove(&b);
        }
        let v = self
            .vdis
            .remove(r)
            .ok_or_else(|| ApiError::handle_invalid("VDI", r))?;
        if let Some(log) = v.log {
            if let Some(c) = &log.child {
                if let Some(clog) = self.vdis.get_mut(c).and_then(|cv| cv.log.as_mut()) {
                    clog.bits.or_assign(&log.bits);
                    clog.parent = log.parent.clone();
                }
            }
            if let Some(p) = &log.parent {
                if let Some(plog) = self.vdis.get_mut(p).and_then(|pv| pv.log.as_mut()) {
                    plog.child = log.child.clone();
                }
            }
        }
        if let Some(d) = v.data {
            d.remove();
        }
        Ok(())
    }

    /// `VDI.get_nbd_info` (§2.6) for the caller's session.
    pub fn get_nbd_info(&self, session: &str, r: &str) -> Result<Value, ApiError> {
        let v = self.vdi(r)?;
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        let mut out = Vec::new();
        for pbd in self
            .sr_pbds(&v.sr)
            .into_iter()
            .filter(|p| p.currently_attached)
        {
            let Some(host) = self.hosts.get(&pbd.host) else {
                continue;
            };
            for pif in self
                .pifs
                .values()
                .filter(|p| p.host == pbd.host && p.currently_attached)
            {
                let nbd = self
                    .networks
                    .get(&pif.network)
                    .map(|n| n.purpose.iter().any(|p| p == "nbd" || p == "insecure_nbd"))
                    .unwrap_or(false);
                if !nbd {
                    continue;
                }
                let addresses = std::iter::once(pif.ip.clone())
                    .filter(|ip| !ip.is_empty())
                    .chain(pif.ipv6.iter().filter(|ip| !ip.is_empty()).cloned());
                for address in addresses {
                    out.push(Value::Struct(rec([
                        (
                            "exportname",
                            Value::String(format!("/{}?session_id={session}", v.uuid)),
                        ),
                        ("address", Value::String(address)),
                        ("port", Value::Int(self.config.nbd_port as i64)),
                        ("cert", Value::str(&host.certificate_pem)),
                        ("subject", Value::str(&self.config.subject)),
                    ])));
                }
            }
        }
        Ok(Value::Array(out))
    }

    pub fn set_on_boot(&mut self, r: &str, value: &str) -> Result<(), ApiError> {
        let v = self.vdi(r)?;
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        if v.cbt_enabled {
            return Err(ApiError::new("VDI_CBT_ENABLED", [r]));
        }
        if value != "reset" && value != "persist" {
            return Err(ApiError::new("INVALID_VALUE", ["on_boot", value]));
        }
        self.vdi_mut(r)?.on_boot = value.to_string();
        Ok(())
    }

    /// The disk behind VDI `r` for a write of `len` bytes at `offset`: a
    /// `cbt_metadata` VDI has none, and a write past the end fails as a
    /// block device would. The caller writes without holding the state.
    pub fn disk_for_write(
        &self,
        r: &str,
        offset: u64,
        len: u64,
    ) -> Result<std::sync::Arc<Disk>, ApiError> {
        let v = self.vdi(r)?;
        let disk = v
            .data
            .clone()
            .ok_or_else(|| ApiError::incompatible_type(r, "cbt_metadata"))?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > v.virtual_size)
        {
            return Err(ApiError::vdi_io());
        }
        Ok(disk)
    }

    /// A write by the guest (or an import): data, then the CBT bit of every
    /// 64 KiB block touched on the leaf's current log.
    pub fn write_vdi(&mut self, r: &str, offset: u64, data: &[u8]) -> Result<(), ApiError> {
        let disk = self.disk_for_write(r, offset, data.len() as u64)?;
        disk.write(offset, data).map_err(ApiError::vdi_io_from)?;
        self.mark_written(r, offset, data.len() as u64);
        Ok(())
    }

    /// Sets CBT bits for a range already written to the disk.
    pub fn mark_written(&mut self, r: &str, offset: u64, len: u64) {
        if let Some(v) = self.vdis.get_mut(r) {
            if v.cbt_enabled && !v.is_a_snapshot {
                if let Some(log) = v.log.as_mut() {
                    log.bits.mark_range(offset, len);
                }
            }
        }
    }

    // ---- VBD and VM ----------------------------------------------------

    pub fn vbd_create(&mut self, new: NewVbd) -> Result<Ref, ApiError> {
        self.vm(&new.vm)?;
        let v = self.vdi(&new.vdi)?;
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(&new.vdi, "cbt_metadata"));
        }
        if new.mode != "RO" && new.mode != "RW" {
            return Err(ApiError::new("INVALID_VALUE", ["mode", new.mode.as_str()]));
        }
        let r = new_ref();
        let device = match new.userdevice.parse::<u8>() {
            Ok(n) if n < 26 => format!("xvd{}", (b'a' + n) as char),
            _ => String::new(),
        };
        self.vbds.insert(
            r.clone(),
            Vbd {
                uuid: new_uuid(),
                vm: new.vm,
                vdi: new.vdi,
                userdevice: new.userdevice,
                device,
                mode: new.mode,
                bootable: new.bootable,
                currently_attached: false,
                other_config: new.other_config,
            },
        );
        Ok(r)
    }

    pub fn vbd_destroy(&mut self, r: &str) -> Result<(), ApiError> {
        let b = self
            .vbds
            .get(r)
            .ok_or_else(|| ApiError::handle_invalid("VBD", r))?;
        if b.currently_attached {
            return Err(ApiError::operation_not_allowed("VBD is currently attached"));
        }
        self.vbds.remove(r);
        Ok(())
    }

    pub fn vbd_set_attached(&mut self, r: &str, attached: bool) -> Result<(), ApiError> {
        let b = self
            .vbds
            .get(r)
            .ok_or_else(|| ApiError::handle_invalid("VBD", r))?;
        let vm_state = self.vm(&b.vm)?.power_state.clone();
        if vm_state != "Running" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [b.vm.as_str(), "running", &vm_state.to_ascii_lowercase()],
            ));
        }
        if b.currently_attached == attached {
            return Err(ApiError::new(
                if attached {
                    "DEVICE_ALREADY_ATTACHED"
                } else {
                    "DEVICE_ALREADY_DETACHED"
                },
                [r],
            ));
        }
        if let Some(b) = self.vbds.get_mut(r) {
            b.currently_attached = attached;
        }
        Ok(())
    }

    /// A dom0 VBD, attached, as xapi-nbd and the HTTP handlers create.
    pub fn attach_to_dom0(&mut self, vdi: &str, mode: &str) -> Result<Ref, ApiError> {
        let dom0 = self.dom0.clone();
        let r = self.vbd_create(NewVbd {
            vm: dom0,
            vdi: vdi.to_string(),
            userdevice: "autodetect".into(),
            mode: mode.into(),
            bootable: false,
            other_config: BTreeMap::new(),
        })?;
        if let Some(b) = self.vbds.get_mut(&r) {
            b.currently_attached = true;
        }
        Ok(r)
    }

    /// Unplugs and destroys a VBD (no checks: the cleanup path).
    pub fn detach_and_destroy(&mut self, vbd: &str) {
        self.vbds.remove(vbd);
    }

    pub fn vm_create(&mut self, name_label: &str) -> Ref {
        let r = new_ref();
        self.vms.insert(
            r.clone(),
            Vm {
                uuid: new_uuid(),
                name_label: name_label.to_string(),
                name_description: String::new(),
                power_state: "Halted".into(),
                is_control_domain: false,
                is_a_snapshot: false,
                snapshot_of: NULL_REF.into(),
                snapshot_time: None,
                other_config: BTreeMap::new(),
                tags: Vec::new(),
            },
        );
        r
    }

    pub fn vm_set_power(&mut self, r: &str, running: bool) -> Result<(), ApiError> {
        let vm = self.vm(r)?;
        if vm.is_control_domain || vm.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(
                "VM is a snapshot or the control domain",
            ));
        }
        let (expected, actual) = if running {
            ("halted", "running")
        } else {
            ("running", "halted")
        };
        let now_running = vm.power_state == "Running";
        if now_running == running {
            return Err(ApiError::new("VM_BAD_POWER_STATE", [r, expected, actual]));
        }
        for b in self.vbds_of_vm(r) {
            if let Some(vbd) = self.vbds.get_mut(&b) {
                vbd.currently_attached = running;
            }
        }
        if let Some(vm) = self.vms.get_mut(r) {
            vm.power_state = if running { "Running" } else { "Halted" }.into();
        }
        Ok(())
    }

    /// `VM.snapshot` / `VM.checkpoint`: every disk VDI not ignored is
    /// snapshotted (same rules as `VDI.snapshot`); the snapshot VM's VBDs
    /// point at the VDI snapshots. A checkpoint copies `currently_attached`.
    pub fn vm_snapshot(
        &mut self,
        r: &str,
        new_name: &str,
        ignore_vdis: &[Ref],
        checkpoint: bool,
    ) -> Result<Ref, ApiError> {
        let vm = self.vm(r)?.clone();
        if vm.is_control_domain || vm.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(
                "VM is a snapshot or the control domain",
            ));
        }
        if checkpoint && vm.power_state != "Running" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [r, "running", &vm.power_state.to_ascii_lowercase()],
            ));
        }
        let vbds: Vec<Vbd> = self
            .vbds_of_vm(r)
            .iter()
            .filter_map(|b| self.vbds.get(b).cloned())
            .filter(|b| !ignore_vdis.contains(&b.vdi))
            .collect();
        // Check every disk before changing anything.
        for b in &vbds {
            let v = self.vdi(&b.vdi)?;
            if v.vdi_type == "cbt_metadata" || v.data.is_none() {
                return Err(ApiError::incompatible_type(&b.vdi, "cbt_metadata"));
            }
        }
        let snap_vm = new_ref();
        self.vms.insert(
            snap_vm.clone(),
            Vm {
                uuid: new_uuid(),
                name_label: new_name.to_string(),
                name_description: vm.name_description.clone(),
                power_state: if checkpoint { "Suspended" } else { "Halted" }.into(),
                is_control_domain: false,
                is_a_snapshot: true,
                snapshot_of: r.to_string(),
                snapshot_time: Some(Utc::now()),
                other_config: vm.other_config.clone(),
                tags: vm.tags.clone(),
            },
        );
        for b in vbds {
            let snap_vdi = self.vdi_snapshot(&b.vdi)?;
            let vbd = self.vbd_create(NewVbd {
                vm: snap_vm.clone(),
                vdi: snap_vdi,
                userdevice: b.userdevice.clone(),
                mode: b.mode.clone(),
                bootable: b.bootable,
                other_config: b.other_config.clone(),
            })?;
            if checkpoint && b.currently_attached {
                if let Some(v) = self.vbds.get_mut(&vbd) {
                    v.currently_attached = true;
                }
            }
        }
        Ok(snap_vm)
    }

    /// `VM.destroy`: the VM and its VBDs, never its VDIs.
    pub fn vm_destroy(&mut self, r: &str) -> Result<(), ApiError> {
        let vm = self.vm(r)?;
        if vm.is_control_domain {
            return Err(ApiError::operation_not_allowed(
                "cannot destroy the control domain",
            ));
        }
        if vm.power_state == "Running" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [r, "halted", "running"],
            ));
        }
        for b in self.vbds_of_vm(r) {
            self.vbds.remove(&b);
        }
        self.vms.remove(r);
        Ok(())
    }

    // ---- network -------------------------------------------------------

    /// `network.add_purpose`: `nbd` and `insecure_nbd` exclude each other pool-wide.
    pub fn add_purpose(&mut self, r: &str, purpose: &str) -> Result<(), ApiError> {
        if !self.networks.contains_key(r) {
            return Err(ApiError::handle_invalid("network", r));
        }
        if purpose != "nbd" && purpose != "insecure_nbd" {
            return Err(ApiError::new("INVALID_VALUE", ["purpose", purpose]));
        }
        let other = if purpose == "nbd" {
            "insecure_nbd"
        } else {
            "nbd"
        };
        if self
            .networks
            .values()
            .any(|n| n.purpose.iter().any(|p| p == other))
        {
            return Err(ApiError::new(
                "NETWORK_INCOMPATIBLE_PURPOSES",
                [purpose, other],
            ));
        }
        if let Some(n) = self.networks.get_mut(r) {
            if !n.purpose.iter().any(|p| p == purpose) {
                n.purpose.push(purpose.to_string());
            }
        }
        Ok(())
    }

    pub fn remove_purpose(&mut self, r: &str, purpose: &str) -> Result<(), ApiError> {
        let n = self
            .networks
            .get_mut(r)
            .ok_or_else(|| ApiError::handle_invalid("network", r))?;
        n.purpose.retain(|p| p != purpose);
        Ok(())
    }

    // ---- tasks ---------------------------------------------------------

    pub fn task_create(&mut self, label: &str, description: &str) -> Ref {
        let r = new_ref();
        self.tasks.insert(
            r.clone(),
            Task {
                uuid: new_uuid(),
                name_label: label.to_string(),
                name_description: description.to_string(),
                status: "pending".into(),
                progress: 0.0,
                created: Utc::now(),
                finished: None,
                result: String::new(),
                error_info: Vec::new(),
                other_config: BTreeMap::new(),
            },
        );
        r
    }

    /// Completes a task with `result` stored as an XML-RPC value fragment
    /// (TaskHelper), or fails it with the error's description.
    pub fn task_finish(&mut self, r: &str, result: Result<String, ApiError>) {
        if let Some(t) = self.tasks.get_mut(r) {
            if t.status != "pending" && t.status != "cancelling" {
                return;
            }
            t.finished = Some(Utc::now());
            t.progress = 1.0;
            match result {
                Ok(v) => {
                    t.status = "success".into();
                    t.result = v;
                }
                Err(e) => {
                    t.status = if e.code == "TASK_CANCELLED" {
                        "cancelled"
                    } else {
                        "failure"
                    }
                    .into();
                    t.error_info = e.description();
                }
            }
        }
    }

    pub fn task_cancel(&mut self, r: &str) -> Result<(), ApiError> {
        let t = self
            .tasks
            .get_mut(r)
            .ok_or_else(|| ApiError::handle_invalid("task", r))?;
        if t.status != "pending" {
            return Err(ApiError::operation_not_allowed(format!(
                "task {r} is not pending"
            )));
        }
        t.status = "cancelling".into();
        Ok(())
    }

    pub fn task_status(&self, r: &str) -> Option<&str> {
        self.tasks.get(r).map(|t| t.status.as_str())
    }
}
