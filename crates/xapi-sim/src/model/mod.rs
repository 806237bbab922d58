//! The simulated host's objects and the rules of the XenAPI calls on them,
//! written from xenapi-reference.md §2 and §5. Everything here runs under
//! one lock (the caller's); nothing here knows about wires or sockets. VDI
//! data lives in `Disk` files; everything else is in memory.
//!
//! This module owns [`State`] (every object, by class), the fault switches,
//! the host's fixed facts and the lookups; the rules live one class per
//! submodule (`objects` the types, `bootstrap` the host at start, `records`
//! the wire view, then `session`, `vdi`, `vbd`, `vm`, `network`, `task`;
//! `vdi_ops` the VDI calls that make a VDI from another one or grow it:
//! resize, clone, copy, pool_migrate; `sr` the SRs made later and every
//! SR's capacity).
//!
//! The CBT chain is modelled as SM keeps it: each VDI with CBT metadata has
//! a log (bitmap + parent/child pointers). A snapshot of a CBT leaf moves
//! the leaf's log to the snapshot and starts an empty one on the leaf whose
//! parent is the snapshot; `list_changed_blocks(a, b)` ORs the logs after
//! `a` up to and including `b`; destroying a chain member ORs its bitmap
//! into its child; disable drops the leaf's log and the parent's pointer.

mod bootstrap;
mod network;
mod objects;
mod pool;
mod records;
mod session;
mod sr;
mod task;
mod vbd;
mod vdi;
mod vdi_ops;
mod vm;

pub use sr::DEFAULT_SR_PHYSICAL_SIZE;

pub use objects::*;
pub use pool::NewMember;

use std::collections::BTreeMap;
use std::path::PathBuf;

use xapi_wire::ApiError;

/// Fault injection switches (all documented in `sim/mod.rs`).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// An old host (XenServer 7.1): the CBT calls answer
    /// `MESSAGE_METHOD_UNKNOWN`, records have no `cbt_enabled`, and
    /// `/jsonrpc` is not there (404).
    pub legacy_host: bool,
    /// NBD connections drop after serving this many bytes of reads.
    pub nbd_drop_after_bytes: Option<u64>,
    /// Each NBD connection opened afterwards serves at most this many
    /// bytes of reads per second (a host's disk and network, for
    /// benchmarks of many VMs at once; `None`: as fast as the machine).
    pub nbd_rate_bytes_per_s: Option<u64>,
    /// Once an NBD connection has served this many bytes, xapi "restarts":
    /// every session ends (calls answer `SESSION_INVALID`, new NBD
    /// connections with their export names are refused) and that
    /// connection drops. One shot: the switch clears itself.
    pub expire_sessions_after_nbd_bytes: Option<u64>,
    /// Async tasks and HTTP handler tasks stay `pending` this long first.
    pub task_delay_ms: u64,
    /// The pool is not licensed for CBT: `VDI.enable_cbt` answers
    /// `LICENCE_RESTRICTION [CBT]` (`Pool_features.assert_enabled
    /// Features.CBT`, xenapi-reference.md §2.3).
    pub cbt_unlicensed: bool,
    /// Calls (by method name, e.g. `VDI.snapshot`) that fail with this
    /// `[code, params...]` after the session check, changing nothing.
    pub fail_calls: BTreeMap<String, Vec<String>>,
    /// Calls of a method on one object (method, the object's ref: the
    /// first argument after the session) that fail with `[code,
    /// params...]`, changing nothing: one VM of a pool made to fail.
    pub fail_calls_on: BTreeMap<(String, Ref), Vec<String>>,
    /// `/import_raw_vdi` fails its task with `VDI_IO_ERROR` once it has
    /// received this many body bytes (the data before is written).
    pub import_fail_after_bytes: Option<u64>,
    /// `/import_raw_vdi` drops the connection (no more reading, a reset)
    /// once it has received this many body bytes, and fails its task with
    /// `VDI_IO_ERROR`, as xapi does when the handler's socket dies.
    pub import_drop_after_bytes: Option<u64>,
    /// `physical_size` of these SRs (others: [`DEFAULT_SR_PHYSICAL_SIZE`]),
    /// to make an SR full (`SR_FULL`, see `sr`).
    pub sr_physical_size: BTreeMap<Ref, u64>,
    /// Sessions unused for this long end: their next call answers
    /// `SESSION_INVALID [ref]` (xapi destroys idle sessions).
    pub session_idle_timeout_ms: Option<u64>,
    /// How long xapi stays down when it restarts (the
    /// `expire_sessions_after_nbd_bytes` fault, `Simulator::restart_xapi`):
    /// the HTTPS port answers 503 and new NBD connections are refused.
    pub restart_downtime_ms: u64,
    /// Hosts (by ref) whose xapi-nbd is down: it closes every connection
    /// at once, so a client must use another `get_nbd_info` entry.
    pub nbd_down_hosts: std::collections::BTreeSet<Ref>,
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

impl State {
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
    pub(super) fn uuid_of(&self, class: Class, r: &str) -> Option<&str> {
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

    pub(super) fn vdi_mut(&mut self, r: &str) -> Result<&mut Vdi, ApiError> {
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

    pub(super) fn sr_pbds(&self, sr: &str) -> Vec<&Pbd> {
        self.pbds.values().filter(|p| p.sr == sr).collect()
    }

    /// `SR_HAS_NO_PBDS` / `SR_NOT_ATTACHED` as SM calls check them.
    pub(super) fn check_sr_attached(&self, sr: &str) -> Result<(), ApiError> {
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
}
