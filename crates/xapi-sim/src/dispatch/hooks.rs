//! The `sim.*` calls: the simulator's own test hooks (guest writes, a
//! system CBT disable, fault switches, dom0 attach/detach, a VM with
//! disks, more SRs, CD drives, a suspended VM, an SR's size, a xapi
//! restart). A real host answers them with `MESSAGE_METHOD_UNKNOWN`;
//! nothing in the XenAPI surface depends on them.

use std::sync::Arc;

use base64::Engine;

use super::table::Call;
use crate::model::{Class, NewVbd, NewVdi, Ref, State, NULL_REF};
use crate::Core;
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
        "nbd_drop_after_bytes" => st.faults.nbd_drop_after_bytes = optional_count(value)?,
        "nbd_rate_bytes_per_s" => st.faults.nbd_rate_bytes_per_s = optional_count(value)?,
        "session_idle_timeout_ms" => st.faults.session_idle_timeout_ms = optional_count(value)?,
        "restart_downtime_ms" => {
            st.faults.restart_downtime_ms = optional_count(value)?.unwrap_or(0)
        }
        _ => return Err(ApiError::new("INVALID_VALUE", ["name", fault.as_str()])),
    }
    Ok(Value::void())
}

/// A fault's count: an int (or a decimal string, as XML-RPC sends ints),
/// or `""` / nil for none.
fn optional_count(value: &Value) -> Result<Option<u64>, ApiError> {
    match value {
        Value::String(s) if s.is_empty() => Ok(None),
        Value::Nil => Ok(None),
        v => v
            .as_int()
            .and_then(|i| u64::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| ApiError::field_type("value")),
    }
}

/// A size argument: an int, or a decimal string.
fn size_arg(c: &Call, i: usize, field: &str) -> Result<u64, ApiError> {
    c.args
        .get(i)
        .as_int()
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| ApiError::field_type(field))
}

/// `sim.create_sr(session, name, type)` -> SR ref: a new plugged SR of
/// `type` (`ext`, `nfs`, `lvm`, `lvmoiscsi`, `lvmohba`, `smb`, `iso`,
/// `rawhba`), e.g. to migrate a VDI to.
pub(super) fn create_sr(st: &mut State, c: &Call) -> Reply {
    let name = c.args.string(1, "name")?;
    let sr_type = c.args.string(2, "type")?;
    st.sr_create(&name, &sr_type).map(Value::String)
}

/// `sim.add_cd(session, vm, iso_name)` -> VBD ref: a CD drive (`RO`) at
/// the VM's next free userdevice, empty when `iso_name` is "", else with
/// a new ISO of that name (see [`add_cd`]).
pub(super) fn add_cd_hook(st: &mut State, c: &Call) -> Reply {
    let vm = c.args.obj(st, 1, Class::Vm)?;
    let iso = c.args.string(2, "iso_name")?;
    let iso = (!iso.is_empty()).then_some(iso.as_str());
    add_cd(st, &vm, iso).map(|(vbd, _)| Value::String(vbd))
}

/// `sim.suspend_vm(session, vm)` -> the VM's new `suspend_VDI`.
pub(super) fn suspend_vm(st: &mut State, c: &Call) -> Reply {
    let vm = c.args.obj(st, 1, Class::Vm)?;
    st.vm_suspend(&vm).map(Value::String)
}

/// `sim.set_sr_physical_size(session, sr, size)`: the SR's
/// `physical_size` in bytes ("" for the default again).
pub(super) fn set_sr_physical_size(st: &mut State, c: &Call) -> Reply {
    let sr = c.args.obj(st, 1, Class::Sr)?;
    match optional_count(c.args.get(2))? {
        Some(size) => st.faults.sr_physical_size.insert(sr, size),
        None => st.faults.sr_physical_size.remove(&sr),
    };
    Ok(Value::void())
}

/// `sim.restart_xapi(session, downtime_ms)`: xapi restarts: every session
/// ends (this one too) and the host answers nothing but 503 for
/// `downtime_ms` (see [`Core::restart_xapi`]).
pub(super) fn restart_xapi(core: &Arc<Core>, c: &Call) -> Reply {
    let downtime = size_arg(c, 1, "downtime_ms")?;
    let mut st = core.lock();
    st.faults.restart_downtime_ms = downtime;
    core.restart_xapi(&mut st);
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
    let size = size_arg(c, 3, "size")?;
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
            bootable: i == 0,
            ..NewVbd::disk(&vm, &vdi, &i.to_string(), "RW")
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

/// The SR without CBT support (a raw HBA LUN SR), made on first use.
fn sr_without_cbt(st: &mut State) -> Result<Ref, ApiError> {
    st.sr_of_type("Raw HBA LUNs", "rawhba")
}

/// The VM's lowest userdevice number no VBD uses.
fn next_userdevice(st: &State, vm: &str) -> String {
    let used: Vec<u64> = st
        .vbds_of_vm(vm)
        .into_iter()
        .filter_map(|b| st.vbds.get(&b).and_then(|v| v.userdevice.parse().ok()))
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap_or(0).to_string()
}

/// Size of the ISOs [`add_cd`] makes.
pub const ISO_BYTES: u64 = 4 << 20;

/// Plugs a CD drive (`type` CD, mode `RO`) into `vm` at the next free
/// userdevice: empty (`empty=true`, `VDI` null) when `iso` is `None`,
/// else holding a new ISO named `iso`: a read-only `user` VDI of
/// [`ISO_BYTES`] on the ISO SR (`type` and `content_type` `iso`, made on
/// first use). Returns the VBD and the VDI (null when empty).
pub(crate) fn add_cd(st: &mut State, vm: &str, iso: Option<&str>) -> Result<(Ref, Ref), ApiError> {
    st.vm(vm)?;
    let vdi = match iso {
        None => NULL_REF.to_string(),
        Some(name) => {
            let sr = st.sr_of_type("ISO library", "iso")?;
            let vdi = st.vdi_create(NewVdi::user(name, sr, ISO_BYTES))?;
            st.write_vdi(&vdi, 0, format!("CD001 {name}").as_bytes())?;
            if let Some(v) = st.vdis.get_mut(&vdi) {
                v.read_only = true;
            }
            vdi
        }
    };
    let userdevice = next_userdevice(st, vm);
    let vbd = st.vbd_create(NewVbd {
        vbd_type: "CD".into(),
        empty: iso.is_none(),
        ..NewVbd::disk(vm, &vdi, &userdevice, "RO")
    })?;
    Ok((vbd, vdi))
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
        DiskKind::SrWithoutCbt => sr_without_cbt(st)?,
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
    let userdevice = next_userdevice(st, vm);
    st.vbd_create(NewVbd::disk(vm, &vdi, &userdevice, "RW"))?;
    Ok(vdi)
}
