//! The handlers of the XenAPI calls: each reads its arguments (in xapi's
//! order) and calls the model. Arity, session and fault checks happen
//! before, in `dispatch`; which call reaches which handler is `table`'s.

use std::sync::Arc;
use std::time::Duration;

use super::args::{new_vbd, new_vdi};
use super::table::Call;
use crate::model::{Class, State, NULL_REF};
use crate::Core;
use xapi_wire::ApiError;
use xapi_wire::Value;

type Reply = Result<Value, ApiError>;

fn void() -> Reply {
    Ok(Value::void())
}

pub(super) fn login(st: &mut State, c: &Call) -> Reply {
    let user = c.args.string(0, "uname")?;
    let password = c.args.string(1, "pwd")?;
    let originator = if c.args.params.len() == 4 {
        c.args.string(3, "originator")?
    } else {
        String::new()
    };
    st.login(&user, &password, &originator).map(Value::String)
}

pub(super) fn logout(st: &mut State, c: &Call) -> Reply {
    st.logout(c.session);
    void()
}

pub(super) fn host_get_server_certificate(st: &mut State, c: &Call) -> Reply {
    let h = c.args.obj(st, 1, Class::Host)?;
    Ok(Value::str(&st.hosts[&h].certificate_pem))
}

// ---- VDI ---------------------------------------------------------------

pub(super) fn vdi_create(st: &mut State, c: &Call) -> Reply {
    let rec = c
        .args
        .get(1)
        .as_struct()
        .ok_or_else(|| ApiError::field_type("args"))?;
    let new = new_vdi(st, rec)?;
    st.vdi_create(new).map(Value::String)
}

pub(super) fn vdi_destroy(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    st.vdi_destroy(&v)?;
    void()
}

pub(super) fn vdi_snapshot(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    if c.args.params.len() == 3 {
        c.args.string_map(2, "driver_params")?;
    }
    st.vdi_snapshot(&v).map(Value::String)
}

pub(super) fn vdi_enable_cbt(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    st.enable_cbt(&v)?;
    void()
}

pub(super) fn vdi_disable_cbt(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    st.disable_cbt(&v)?;
    void()
}

pub(super) fn vdi_list_changed_blocks(st: &mut State, c: &Call) -> Reply {
    // Only vdi_to is locked and checked first (message_forwarding.ml).
    let to = c.args.obj(st, 2, Class::Vdi)?;
    let from = c.args.obj(st, 1, Class::Vdi)?;
    st.list_changed_blocks(&from, &to).map(Value::String)
}

/// `VDI.resize` and `VDI.resize_online`.
pub(super) fn vdi_resize(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    let size = c.args.int(2, "size")?;
    st.vdi_resize(&v, size, c.name == "resize_online")?;
    void()
}

pub(super) fn vdi_clone(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    if c.args.params.len() == 3 {
        c.args.string_map(2, "driver_params")?;
    }
    st.vdi_clone(&v).map(Value::String)
}

/// `VDI.copy(vdi, sr = null, base_vdi = null, into_vdi = null)`: a null
/// `base_vdi` or `into_vdi` is absent; `sr` is only read without `into_vdi`.
pub(super) fn vdi_copy(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    let optional = |i: usize, field: &str| -> Result<Option<String>, ApiError> {
        if c.args.params.len() <= i {
            return Ok(None);
        }
        let r = c.args.string(i, field)?;
        if r == NULL_REF {
            return Ok(None);
        }
        c.args.obj(st, i, Class::Vdi).map(Some)
    };
    let sr = if c.args.params.len() > 2 {
        c.args.string(2, "sr")?
    } else {
        NULL_REF.to_string()
    };
    let base = optional(3, "base_vdi")?;
    let into = optional(4, "into_vdi")?;
    st.vdi_copy(&v, &sr, base.as_deref(), into.as_deref())
        .map(Value::String)
}

pub(super) fn vdi_pool_migrate(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    let sr = c.args.obj(st, 2, Class::Sr)?;
    // Assumption: the options (`dest-img-format`) change nothing here.
    c.args.string_map(3, "options")?;
    st.vdi_pool_migrate(&v, &sr).map(Value::String)
}

pub(super) fn vdi_get_nbd_info(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    st.get_nbd_info(c.session, &v)
}

pub(super) fn vdi_set_on_boot(st: &mut State, c: &Call) -> Reply {
    let v = c.args.obj(st, 1, Class::Vdi)?;
    let value = c.args.string(2, "value")?;
    st.set_on_boot(&v, &value)?;
    void()
}

/// `VDI.data_destroy`: the checks, then up to the configured wait (xapi:
/// 4 s) for every VBD to be unplugged and destroyed, without holding the
/// lock meanwhile, then the data goes.
pub(super) fn vdi_data_destroy(core: &Arc<Core>, c: &Call) -> Reply {
    let (v, wait_ms) = {
        let st = core.lock();
        let v = c.args.obj(&st, 1, Class::Vdi)?;
        if st.data_destroy_precheck(&v)? {
            return void();
        }
        (v, st.config.data_destroy_wait_ms)
    };
    let deadline = std::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let mut st = core.lock();
        if !st.has_vbds(&v) || std::time::Instant::now() >= deadline {
            st.data_destroy_finish(&v)?;
            return void();
        }
        drop(st);
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- VM ----------------------------------------------------------------

/// `VM.snapshot` and `VM.checkpoint`.
pub(super) fn vm_snapshot(st: &mut State, c: &Call) -> Reply {
    let vm = c.args.obj(st, 1, Class::Vm)?;
    let new_name = c.args.string(2, "new_name")?;
    let ignore = if c.args.params.len() == 4 {
        c.args.refs(3, "ignore_vdis")?
    } else {
        Vec::new()
    };
    st.vm_snapshot(&vm, &new_name, &ignore, c.name == "checkpoint")
        .map(Value::String)
}

pub(super) fn vm_destroy(st: &mut State, c: &Call) -> Reply {
    let vm = c.args.obj(st, 1, Class::Vm)?;
    st.vm_destroy(&vm)?;
    void()
}

pub(super) fn vm_start(st: &mut State, c: &Call) -> Reply {
    let vm = c.args.obj(st, 1, Class::Vm)?;
    c.args.bool(2, "start_paused")?;
    c.args.bool(3, "force")?;
    st.vm_set_power(&vm, true)?;
    void()
}

/// `VM.clean_shutdown` and `VM.hard_shutdown`.
pub(super) fn vm_shutdown(st: &mut State, c: &Call) -> Reply {
    let vm = c.args.obj(st, 1, Class::Vm)?;
    st.vm_set_power(&vm, false)?;
    void()
}

// ---- VBD ---------------------------------------------------------------

pub(super) fn vbd_create(st: &mut State, c: &Call) -> Reply {
    let rec = c
        .args
        .get(1)
        .as_struct()
        .ok_or_else(|| ApiError::field_type("args"))?;
    let new = new_vbd(rec)?;
    st.vbd_create(new).map(Value::String)
}

pub(super) fn vbd_destroy(st: &mut State, c: &Call) -> Reply {
    let b = c.args.obj(st, 1, Class::Vbd)?;
    st.vbd_destroy(&b)?;
    void()
}

/// `VBD.plug` and `VBD.unplug`.
pub(super) fn vbd_plug(st: &mut State, c: &Call) -> Reply {
    let b = c.args.obj(st, 1, Class::Vbd)?;
    st.vbd_set_attached(&b, c.name == "plug")?;
    void()
}

// ---- network -----------------------------------------------------------

/// `network.add_purpose` and `network.remove_purpose`.
pub(super) fn network_purpose(st: &mut State, c: &Call) -> Reply {
    let n = c.args.obj(st, 1, Class::Network)?;
    let purpose = c.args.string(2, "value")?;
    if c.name == "add_purpose" {
        st.add_purpose(&n, &purpose)?;
    } else {
        st.remove_purpose(&n, &purpose)?;
    }
    void()
}

// ---- task --------------------------------------------------------------

pub(super) fn task_create(st: &mut State, c: &Call) -> Reply {
    let label = c.args.string(1, "label")?;
    let description = c.args.string(2, "description")?;
    Ok(Value::String(st.task_create(&label, &description)))
}

pub(super) fn task_destroy(st: &mut State, c: &Call) -> Reply {
    let t = c.args.obj(st, 1, Class::Task)?;
    st.tasks.remove(&t);
    void()
}

pub(super) fn task_cancel(st: &mut State, c: &Call) -> Reply {
    let t = c.args.obj(st, 1, Class::Task)?;
    st.task_cancel(&t)?;
    void()
}

// ---- fields of any class -----------------------------------------------

/// `set_name_label` and `set_name_description`.
pub(super) fn set_name(st: &mut State, c: &Call) -> Reply {
    use Class::*;
    let r = c.args.obj(st, 1, c.class)?;
    let value = c.args.string(2, "value")?;
    let label = c.name == "set_name_label";
    let slot = match c.class {
        Vdi => st.vdis.get_mut(&r).map(|v| {
            if label {
                &mut v.name_label
            } else {
                &mut v.name_description
            }
        }),
        Vm => st.vms.get_mut(&r).map(|v| {
            if label {
                &mut v.name_label
            } else {
                &mut v.name_description
            }
        }),
        Sr => st.srs.get_mut(&r).map(|v| {
            if label {
                &mut v.name_label
            } else {
                &mut v.name_description
            }
        }),
        Task => st.tasks.get_mut(&r).map(|v| {
            if label {
                &mut v.name_label
            } else {
                &mut v.name_description
            }
        }),
        Network if label => st.networks.get_mut(&r).map(|v| &mut v.name_label),
        _ => None,
    };
    *slot.ok_or_else(|| ApiError::method_unknown(c.method))? = value;
    void()
}

/// `VM.set_tags`, `VM.add_tags`, `VM.remove_tags` (xapi: a set of
/// strings; adding one present or removing one absent changes nothing).
pub(super) fn vm_tags(st: &mut State, c: &Call) -> Reply {
    let r = c.args.obj(st, 1, Class::Vm)?;
    let vm = st
        .vms
        .get_mut(&r)
        .ok_or_else(|| ApiError::handle_invalid("VM", &r))?;
    match c.name {
        "set_tags" => {
            let mut tags = c.args.refs(2, "value")?;
            tags.sort();
            tags.dedup();
            vm.tags = tags;
        }
        "add_tags" => {
            let t = c.args.string(2, "value")?;
            if !vm.tags.contains(&t) {
                vm.tags.push(t);
            }
        }
        _ => {
            let t = c.args.string(2, "value")?;
            vm.tags.retain(|x| *x != t);
        }
    }
    void()
}

/// `set_other_config`, `add_to_other_config`, `remove_from_other_config`.
pub(super) fn other_config(st: &mut State, c: &Call) -> Reply {
    use Class::*;
    let r = c.args.obj(st, 1, c.class)?;
    let config = match c.class {
        Vdi => st.vdis.get_mut(&r).map(|v| &mut v.other_config),
        Vm => st.vms.get_mut(&r).map(|v| &mut v.other_config),
        Vbd => st.vbds.get_mut(&r).map(|v| &mut v.other_config),
        Task => st.tasks.get_mut(&r).map(|v| &mut v.other_config),
        _ => None,
    }
    .ok_or_else(|| ApiError::method_unknown(c.method))?;
    match c.name {
        "set_other_config" => *config = c.args.string_map(2, "value")?,
        "add_to_other_config" => {
            let key = c.args.string(2, "key")?;
            let value = c.args.string(3, "value")?;
            if config.contains_key(&key) {
                return Err(ApiError::new(
                    "MAP_DUPLICATE_KEY",
                    [
                        c.class.wire_name(),
                        "other_config",
                        r.as_str(),
                        key.as_str(),
                    ],
                ));
            }
            config.insert(key, value);
        }
        _ => {
            config.remove(&c.args.string(2, "key")?);
        }
    }
    void()
}

pub(super) fn get_all(st: &mut State, c: &Call) -> Reply {
    Ok(Value::strings(st.all_refs(c.class)))
}

pub(super) fn get_all_records(st: &mut State, c: &Call) -> Reply {
    Ok(Value::Struct(
        st.all_refs(c.class)
            .into_iter()
            .filter_map(|r| st.record(c.class, &r).map(|m| (r, Value::Struct(m))))
            .collect(),
    ))
}

pub(super) fn get_by_uuid(st: &mut State, c: &Call) -> Reply {
    let uuid = c.args.string(1, "uuid")?;
    st.by_uuid(c.class, &uuid).map(Value::String)
}

pub(super) fn get_by_name_label(st: &mut State, c: &Call) -> Reply {
    let label = c.args.string(1, "label")?;
    Ok(Value::strings(st.by_name_label(c.class, &label)))
}

pub(super) fn get_record(st: &mut State, c: &Call) -> Reply {
    let r = c.args.string(1, "self")?;
    st.record(c.class, &r)
        .map(Value::Struct)
        .ok_or_else(|| ApiError::handle_invalid(c.class.wire_name(), &r))
}

/// `get_<field>`: one field of the record; a field the record does not
/// have is `MESSAGE_METHOD_UNKNOWN`, after the handle check.
pub(super) fn get_field(st: &mut State, c: &Call) -> Reply {
    let field = &c.name[4..];
    let r = c.args.string(1, "self")?;
    let Some(mut rec) = st.record(c.class, &r) else {
        return Err(if c.class.set_ref_fields().contains(&field) {
            ApiError::new("HANDLE_INVALID", [r.as_str()])
        } else {
            ApiError::handle_invalid(c.class.wire_name(), &r)
        });
    };
    rec.remove(field)
        .ok_or_else(|| ApiError::method_unknown(c.method))
}
