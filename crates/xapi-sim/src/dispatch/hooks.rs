//! The `sim.*` calls: the simulator's own test hooks (guest writes, a
//! system CBT disable, fault switches, dom0 attach/detach, a VM with
//! disks). A real host answers them with `MESSAGE_METHOD_UNKNOWN`; nothing
//! in the XenAPI surface depends on them.

use std::collections::BTreeMap;

use base64::Engine;

use super::table::Call;
use crate::model::{Class, NewVbd, NewVdi, Ref, State};
use xapi_wire::ApiError;
use xapi_wire::Value;

type Reply = Result<Value, ApiError>;

pub(super) fn guest_write(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    let offset = c.args.int(2, "offset")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(c.args.string(3, "data")?)
        .map_err(|_| ApiError::field_type("data"))?;
    let offset = u64::try_from(offset).map_err(|_| ApiError::field_type("offset"))?;
    guest_write_checked(st, &v, offset, &data)?;
    Ok(Value::void())
}

pub(super) fn system_disable_cbt(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    st.system_disable_cbt(&v)?;
    Ok(Value::void())
}

pub(super) fn set_fault(st: &mut State, c: &Call) -> Reply {
    let fault = c.args.string(1, "name")?;
    let value = c.args.get(2);
    match fault.as_str() {
        "legacy_host" => st.faults.legacy_host = c.args.bool(2, "value")?,
        "cbt_unlicensed" => st.faults.cbt_unlicensed = c.args.bool(2, "value")?,
        "task_delay_ms" => {
            st.faults.task_delay_ms = value
                .as_int()
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| ApiError::field_type("value"))?
        }
        "nbd_drop_after_bytes" => {
            st.faults.nbd_drop_after_bytes = match value {
                Value::String(s) if s.is_empty() => None,
                Value::Nil => None,
                v => Some(
                    v.as_int()
                        .and_then(|i| u64::try_from(i).ok())
                        .ok_or_else(|| ApiError::field_type("value"))?,
                ),
            }
        }
        _ => return Err(ApiError::new("INVALID_VALUE", ["name", fault.as_str()])),
    }
    Ok(Value::void())
}

pub(super) fn attach_to_dom0(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    st.attach_to_dom0(&v, "RO").map(Value::String)
}

pub(super) fn detach(st: &mut State, c: &Call) -> Reply {
    let b = c.args.obj(st, 1, Class::Vbd)?;
    st.detach_and_destroy(&b);
    Ok(Value::void())
}

pub(super) fn create_vm(st: &mut State, c: &Call) -> Reply {
    let label = c.args.string(1, "name")?;
    let sizes: Vec<u64> = c
        .args
        .get(2)
        .as_array()
        .ok_or_else(|| ApiError::field_type("disk_sizes"))?
        .iter()
        .map(|v| v.as_int().and_then(|i| u64::try_from(i).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| ApiError::field_type("disk_sizes"))?;
    create_vm_with_disks(st, &label, &sizes).map(Value::String)
}

/// `sim.add_disk(session, vm, name, size, kind)` -> VDI ref, `kind` one of
/// `cbt`, `sr_without_cbt`, `raw`, `ephemeral` ([`DiskKind`]).
pub(super) fn add_disk_hook(st: &mut State, c: &Call) -> Reply {
    let vm = c.args.obj(st, 1, Class::Vm)?;
    let name = c.args.string(2, "name")?;
    let size = c
        .args
        .get(3)
        .as_int()
        .and_then(|i| u64::try_from(i).ok())
        .or_else(|| c.args.get(3).as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| ApiError::field_type("size"))?;
    let kind = match c.args.string(4, "kind")?.as_str() {
        "cbt" => DiskKind::Cbt,
        "sr_without_cbt" => DiskKind::SrWithoutCbt,
        "raw" => DiskKind::Raw,
        "ephemeral" => DiskKind::Ephemeral,
        other => return Err(ApiError::new("INVALID_VALUE", ["kind", other])),
    };
    add_disk(st, &vm, &name, size, kind).map(Value::String)
}

/// Guest writes go to live disks only: a snapshot is read-only and a
/// cbt_metadata VDI has no data.
pub(crate) fn guest_write_checked(
    st: &mut State,
    vdi: &str,
    offset: u64,
    data: &[u8],
) -> Result<(), ApiError> {
    let v = st.vdi(vdi)?;
    if v.vdi_type == "cbt_metadata" {
        return Err(ApiError::incompatible_type(vdi, "cbt_metadata"));
    }
    if v.is_a_snapshot {
        return Err(ApiError::operation_not_allowed(format!(
            "VDI is a snapshot: {vdi}"
        )));
    }
    st.write_vdi(vdi, offset, data)
}

/// A halted VM with one user VDI per size, plugged as xvda, xvdb, ...
pub(crate) fn create_vm_with_disks(
    st: &mut State,
    name: &str,
    sizes: &[u64],
) -> Result<Ref, ApiError> {
    let vm = st.vm_create(name);
    let sr = st.default_sr.clone();
    for (i, &size) in sizes.iter().enumerate() {
        let vdi = st.vdi_create(NewVdi::user(format!("{name} disk {i}"), sr.clone(), size))?;
        st.vbd_create(NewVbd {
            vm: vm.clone(),
            vdi,
            userdevice: i.to_string(),
            mode: "RW".into(),
            bootable: i == 0,
            other_config: BTreeMap::new(),
        })?;
    }
    Ok(vm)
}

/// What kind of disk [`add_disk`] plugs into a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A user VDI on the default SR (CBT capable).
    Cbt,
    /// A user VDI on an SR whose driver lacks `VDI_CONFIG_CBT` (a raw HBA
    /// LUN SR, created on first use): `enable_cbt` answers
    /// `SR_OPERATION_NOT_SUPPORTED [sr]`.
    SrWithoutCbt,
    /// A RAW user VDI on the default SR: `enable_cbt` answers
    /// `SR_BACKEND_FAILURE_66`.
    Raw,
    /// A VDI of type `ephemeral` (not backed up).
    Ephemeral,
}

/// The SR without CBT support, created with its PBD on first use.
fn sr_without_cbt(st: &mut State) -> Ref {
    use crate::model::{new_ref, new_uuid, Pbd, Sr};
    if let Some((r, _)) = st.srs.iter().find(|(_, s)| s.sr_type == "rawhba") {
        return r.clone();
    }
    let sr = new_ref();
    st.srs.insert(
        sr.clone(),
        Sr {
            uuid: new_uuid(),
            name_label: "Raw HBA LUNs".into(),
            name_description: "simulated raw HBA SR (no CBT)".into(),
            sr_type: "rawhba".into(),
            cbt_capable: false,
            shared: false,
        },
    );
    let host = st.hosts.keys().next().cloned().unwrap_or_default();
    st.pbds.insert(
        new_ref(),
        Pbd {
            uuid: new_uuid(),
            host,
            sr: sr.clone(),
            currently_attached: true,
        },
    );
    sr
}

/// Plugs a new disk of `kind` into `vm` at the next free userdevice;
/// returns the VDI ref.
pub(crate) fn add_disk(
    st: &mut State,
    vm: &str,
    name: &str,
    size: u64,
    kind: DiskKind,
) -> Result<Ref, ApiError> {
    st.vm(vm)?;
    let sr = match kind {
        DiskKind::SrWithoutCbt => sr_without_cbt(st),
        _ => st.default_sr.clone(),
    };
    let mut new = NewVdi::user(name, sr, size);
    match kind {
        DiskKind::Raw => {
            new.sm_config.insert("type".into(), "raw".into());
        }
        DiskKind::Ephemeral => new.vdi_type = "ephemeral".into(),
        DiskKind::Cbt | DiskKind::SrWithoutCbt => {}
    }
    plug_new_disk(st, vm, new)
}

/// A user VDI on the SR with this uuid, plugged into `vm` at its next free
/// userdevice.
pub(crate) fn add_disk_on_sr(
    st: &mut State,
    vm: &str,
    name: &str,
    size: u64,
    sr_uuid: &str,
) -> Result<Ref, ApiError> {
    st.vm(vm)?;
    let sr = st.by_uuid(Class::Sr, sr_uuid)?;
    plug_new_disk(st, vm, NewVdi::user(name, sr, size))
}

/// Creates the VDI and plugs it into `vm` at its next free userdevice.
fn plug_new_disk(st: &mut State, vm: &str, new: NewVdi) -> Result<Ref, ApiError> {
    let vdi = st.vdi_create(new)?;
    let used: Vec<u64> = st
        .vbds_of_vm(vm)
        .into_iter()
        .filter_map(|b| st.vbds.get(&b).and_then(|v| v.userdevice.parse().ok()))
        .collect();
    let userdevice = (0..).find(|n| !used.contains(n)).unwrap_or(0);
    st.vbd_create(NewVbd {
        vm: vm.to_string(),
        vdi: vdi.clone(),
        userdevice: userdevice.to_string(),
        mode: "RW".into(),
        bootable: false,
        other_config: BTreeMap::new(),
    })?;
    Ok(vdi)
}
