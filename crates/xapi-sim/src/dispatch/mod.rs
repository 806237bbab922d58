//! From a method name and positional parameters to a model call, with
//! xapi's checks in xapi's order: unknown method (`MESSAGE_METHOD_UNKNOWN`),
//! parameter count (`MESSAGE_PARAMETER_COUNT_MISMATCH [method; expected;
//! received]`, counts include the session), session (`SESSION_INVALID`),
//! then argument types and handles (`HANDLE_INVALID [class; ref]`).
//! `Async.CLASS.method` runs the call on a task. Wire-independent: both
//! XML-RPC and JSON-RPC end here.
//!
//! The `sim.*` methods are the simulator's own test hooks; a real host
//! answers them with `MESSAGE_METHOD_UNKNOWN`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use super::model::{Class, NewVbd, NewVdi, Ref, State};
use super::Core;
use xapi_wire::xmlrpc;
use xapi_wire::ApiError;
use xapi_wire::Value;

/// The CBT-era calls an old host (7.1) does not know.
const CBT_METHODS: [&str; 7] = [
    "enable_cbt",
    "disable_cbt",
    "list_changed_blocks",
    "data_destroy",
    "get_nbd_info",
    "get_cbt_enabled",
    "set_cbt_enabled",
];

/// (min, max) parameter counts, session included, of the non-generic calls.
fn arity(class: Class, name: &str) -> Option<(usize, usize)> {
    use Class::*;
    Some(match (class, name) {
        (Session, "logout") => (1, 1),
        (Host, "get_server_certificate") => (2, 2),
        (Vdi, "create") | (Vbd, "create") => (2, 2),
        (Vdi, "destroy") | (Vm, "destroy") | (Vbd, "destroy") | (Task, "destroy") => (2, 2),
        (Vdi, "snapshot") => (2, 3),
        (Vdi, "enable_cbt") | (Vdi, "disable_cbt") | (Vdi, "data_destroy") => (2, 2),
        (Vdi, "get_nbd_info") => (2, 2),
        (Vdi, "list_changed_blocks") => (3, 3),
        (Vdi, "set_on_boot") => (3, 3),
        (Vm, "snapshot") => (3, 4),
        (Vm, "checkpoint") => (3, 3),
        (Vm, "start") => (4, 4),
        (Vm, "clean_shutdown") | (Vm, "hard_shutdown") => (2, 2),
        (Vbd, "plug") | (Vbd, "unplug") => (2, 2),
        (Network, "add_purpose") | (Network, "remove_purpose") => (3, 3),
        (Task, "create") => (3, 3),
        (Task, "cancel") => (2, 2),
        (Vdi | Vm | Sr | Task | Network, "set_name_label" | "set_name_description") => (3, 3),
        (Vdi | Vm | Vbd | Task, "set_other_config") => (3, 3),
        (Vdi | Vm | Vbd | Task, "add_to_other_config") => (4, 4),
        (Vdi | Vm | Vbd | Task, "remove_from_other_config") => (3, 3),
        (_, "get_all" | "get_all_records") => (1, 1),
        (_, "get_record" | "get_by_uuid") => (2, 2),
        (Vdi | Vm | Sr | Host | Pool | Network | Task, "get_by_name_label") => (2, 2),
        (_, n) if n.starts_with("get_") => (2, 2),
        _ => return None,
    })
}

/// Calls that exist as `Async.CLASS.method` (getters and get_nbd_info don't).
fn is_async_capable(class: Class, name: &str) -> bool {
    use Class::*;
    matches!(
        (class, name),
        (
            Vdi,
            "create"
                | "destroy"
                | "snapshot"
                | "enable_cbt"
                | "disable_cbt"
                | "list_changed_blocks"
                | "data_destroy"
                | "set_on_boot"
        ) | (
            Vm,
            "snapshot" | "checkpoint" | "destroy" | "start" | "clean_shutdown" | "hard_shutdown"
        ) | (Vbd, "create" | "destroy" | "plug" | "unplug")
            | (Network, "add_purpose" | "remove_purpose")
    )
}

/// The (min, max) of the simulator's own hooks.
fn sim_arity(name: &str) -> Option<(usize, usize)> {
    Some(match name {
        "guest_write" => (4, 4),
        "system_disable_cbt" => (2, 2),
        "set_fault" => (3, 3),
        "attach_to_dom0" => (2, 2),
        "detach" => (2, 2),
        "create_vm" => (3, 3),
        _ => return None,
    })
}

struct Args<'a> {
    params: &'a [Value],
}

impl Args<'_> {
    fn get(&self, i: usize) -> &Value {
        &self.params[i]
    }

    fn string(&self, i: usize, field: &str) -> Result<String, ApiError> {
        match self.get(i) {
            Value::String(s) => Ok(s.clone()),
            _ => Err(ApiError::field_type(field)),
        }
    }

    /// A live object of `class` (a dead or foreign ref is `HANDLE_INVALID`).
    fn obj(&self, st: &State, i: usize, class: Class) -> Result<Ref, ApiError> {
        let r = self.string(i, class.wire_name())?;
        if st.exists(class, &r) {
            Ok(r)
        } else {
            Err(ApiError::handle_invalid(class.wire_name(), &r))
        }
    }

    fn int(&self, i: usize, field: &str) -> Result<i64, ApiError> {
        self.get(i)
            .as_int()
            .ok_or_else(|| ApiError::field_type(field))
    }

    fn bool(&self, i: usize, field: &str) -> Result<bool, ApiError> {
        self.get(i)
            .as_bool()
            .ok_or_else(|| ApiError::field_type(field))
    }

    fn string_map(&self, i: usize, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
        string_map(self.get(i), field)
    }

    fn refs(&self, i: usize, field: &str) -> Result<Vec<Ref>, ApiError> {
        match self.get(i) {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::field_type(field))
                })
                .collect(),
            _ => Err(ApiError::field_type(field)),
        }
    }
}

fn string_map(v: &Value, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let m = v.as_struct().ok_or_else(|| ApiError::field_type(field))?;
    m.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            Value::Int(i) => Ok((k.clone(), i.to_string())),
            Value::Bool(b) => Ok((k.clone(), b.to_string())),
            _ => Err(ApiError::field_type(field)),
        })
        .collect()
}

/// A required field of a constructor record (`VDI.create`, `VBD.create`).
fn field<'a>(rec: &'a BTreeMap<String, Value>, name: &str) -> Result<&'a Value, ApiError> {
    rec.get(name).ok_or_else(|| ApiError::field_type(name))
}

fn field_string(
    rec: &BTreeMap<String, Value>,
    name: &str,
    default: Option<&str>,
) -> Result<String, ApiError> {
    match (rec.get(name), default) {
        (Some(Value::String(s)), _) => Ok(s.clone()),
        (Some(_), _) => Err(ApiError::field_type(name)),
        (None, Some(d)) => Ok(d.to_string()),
        (None, None) => Err(ApiError::field_type(name)),
    }
}

fn field_map(
    rec: &BTreeMap<String, Value>,
    name: &str,
    required: bool,
) -> Result<BTreeMap<String, String>, ApiError> {
    match rec.get(name) {
        Some(v) => string_map(v, name),
        None if required => Err(ApiError::field_type(name)),
        None => Ok(BTreeMap::new()),
    }
}

fn field_bool(rec: &BTreeMap<String, Value>, name: &str) -> Result<bool, ApiError> {
    field(rec, name)?
        .as_bool()
        .ok_or_else(|| ApiError::field_type(name))
}

fn new_vdi(st: &State, rec: &BTreeMap<String, Value>) -> Result<NewVdi, ApiError> {
    let sr = field_string(rec, "SR", None)?;
    if !st.srs.contains_key(&sr) {
        return Err(ApiError::handle_invalid("SR", &sr));
    }
    let size = field(rec, "virtual_size")?
        .as_int()
        .filter(|&s| s >= 0)
        .ok_or_else(|| ApiError::field_type("virtual_size"))?;
    let tags = match rec.get("tags") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::field_type("tags"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::field_type("tags")),
    };
    let vdi_type = field_string(rec, "type", None)?;
    const TYPES: [&str; 11] = [
        "system",
        "user",
        "ephemeral",
        "suspend",
        "crashdump",
        "ha_statefile",
        "metadata",
        "redo_log",
        "rrd",
        "pvs_cache",
        "cbt_metadata",
    ];
    if !TYPES.contains(&vdi_type.as_str()) {
        return Err(ApiError::new(
            "ENUM_VALUE_UNKNOWN",
            ["vdi_type", vdi_type.as_str()],
        ));
    }
    Ok(NewVdi {
        name_label: field_string(rec, "name_label", Some(""))?,
        name_description: field_string(rec, "name_description", Some(""))?,
        sr,
        virtual_size: size as u64,
        vdi_type,
        sharable: field_bool(rec, "sharable")?,
        read_only: field_bool(rec, "read_only")?,
        other_config: field_map(rec, "other_config", true)?,
        sm_config: field_map(rec, "sm_config", false)?,
        xenstore_data: field_map(rec, "xenstore_data", false)?,
        tags,
    })
}

fn new_vbd(rec: &BTreeMap<String, Value>) -> Result<NewVbd, ApiError> {
    Ok(NewVbd {
        vm: field_string(rec, "VM", None)?,
        vdi: field_string(rec, "VDI", None)?,
        userdevice: field_string(rec, "userdevice", Some("autodetect"))?,
        mode: field_string(rec, "mode", Some("RW"))?,
        bootable: rec
            .get("bootable")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        other_config: field_map(rec, "other_config", false)?,
    })
}

fn void() -> Result<Value, ApiError> {
    Ok(Value::void())
}

/// Splits `CLASS.name`; `None` for an unknown class.
fn split(method: &str) -> Option<(&str, &str)> {
    method.split_once('.')
}

/// Runs one call. `Async.` calls return a task ref at once. A successful
/// call that may have changed objects is followed by a save.
pub(crate) fn call(core: &Arc<Core>, method: &str, params: &[Value]) -> Result<Value, ApiError> {
    let result = call_inner(core, method, params);
    // Getters change nothing; sessions are not kept.
    let read_only = method.starts_with("session.")
        || method
            .rsplit_once('.')
            .is_some_and(|(_, name)| name.starts_with("get_"));
    if result.is_ok() && !read_only {
        core.changed(&core.lock());
    }
    result
}

fn call_inner(core: &Arc<Core>, method: &str, params: &[Value]) -> Result<Value, ApiError> {
    if let Some(inner) = method.strip_prefix("Async.") {
        return call_async(core, method, inner, params);
    }
    let unknown = || ApiError::method_unknown(method);
    let (class_name, name) = split(method).ok_or_else(unknown)?;
    if class_name == "sim" {
        return sim_call(core, method, name, params);
    }
    let class = Class::parse(class_name).ok_or_else(unknown)?;
    if class == Class::Session && name == "login_with_password" {
        if !(2..=4).contains(&params.len()) {
            return Err(ApiError::count_mismatch(method, 4, params.len()));
        }
        let args = Args { params };
        let user = args.string(0, "uname")?;
        let password = args.string(1, "pwd")?;
        let originator = if params.len() == 4 {
            args.string(3, "originator")?
        } else {
            String::new()
        };
        return core
            .lock()
            .login(&user, &password, &originator)
            .map(Value::String);
    }
    let legacy = core.lock().faults.legacy_host;
    if legacy && class == Class::Vdi && CBT_METHODS.contains(&name) {
        return Err(unknown());
    }
    let (min, max) = arity(class, name).ok_or_else(unknown)?;
    if params.len() < min || params.len() > max {
        return Err(ApiError::count_mismatch(method, max, params.len()));
    }
    let session = match &params[0] {
        Value::String(s) => s.clone(),
        other => return Err(ApiError::session_invalid(&format!("{other:?}"))),
    };
    core.lock().check_session(&session)?;
    let injected = core.lock().faults.fail_calls.get(method).cloned();
    if let Some(desc) = injected {
        let mut items = desc.into_iter();
        let code = items.next().unwrap_or_else(|| "INTERNAL_ERROR".into());
        return Err(ApiError::new(&code, items));
    }
    if class == Class::Vdi && name == "data_destroy" {
        return data_destroy(core, params);
    }
    let args = Args { params };
    let mut st = core.lock();
    run(&mut st, method, class, name, &session, &args, legacy)
}

fn run(
    st: &mut State,
    method: &str,
    class: Class,
    name: &str,
    session: &str,
    args: &Args,
    legacy: bool,
) -> Result<Value, ApiError> {
    use Class::*;
    match (class, name) {
        (Session, "logout") => {
            st.logout(session);
            void()
        }
        (Host, "get_server_certificate") => {
            let h = args.obj(st, 1, Host)?;
            Ok(Value::str(&st.hosts[&h].certificate_pem))
        }
        (Vdi, "create") => {
            let rec = args
                .get(1)
                .as_struct()
                .ok_or_else(|| ApiError::field_type("args"))?;
            let new = new_vdi(st, rec)?;
            st.vdi_create(new).map(Value::String)
        }
        (Vdi, "destroy") => {
            let v = args.obj(st, 1, Vdi)?;
            st.vdi_destroy(&v)?;
            void()
        }
        (Vdi, "snapshot") => {
            let v = args.obj(st, 1, Vdi)?;
            if args.params.len() == 3 {
                args.string_map(2, "driver_params")?;
            }
            st.vdi_snapshot(&v).map(Value::String)
        }
        (Vdi, "enable_cbt") => {
            let v = args.obj(st, 1, Vdi)?;
            st.enable_cbt(&v)?;
            void()
        }
        (Vdi, "disable_cbt") => {
            let v = args.obj(st, 1, Vdi)?;
            st.disable_cbt(&v)?;
            void()
        }
        (Vdi, "list_changed_blocks") => {
            // Only vdi_to is locked and checked first (message_forwarding.ml).
            let to = args.obj(st, 2, Vdi)?;
            let from = args.obj(st, 1, Vdi)?;
            st.list_changed_blocks(&from, &to).map(Value::String)
        }
        (Vdi, "get_nbd_info") => {
            let v = args.obj(st, 1, Vdi)?;
            st.get_nbd_info(session, &v)
        }
        (Vdi, "set_on_boot") => {
            let v = args.obj(st, 1, Vdi)?;
            let value = args.string(2, "value")?;
            st.set_on_boot(&v, &value)?;
            void()
        }
        (Vm, "snapshot") | (Vm, "checkpoint") => {
            let vm = args.obj(st, 1, Vm)?;
            let new_name = args.string(2, "new_name")?;
            let ignore = if args.params.len() == 4 {
                args.refs(3, "ignore_vdis")?
            } else {
                Vec::new()
            };
            st.vm_snapshot(&vm, &new_name, &ignore, name == "checkpoint")
                .map(Value::String)
        }
        (Vm, "destroy") => {
            let vm = args.obj(st, 1, Vm)?;
            st.vm_destroy(&vm)?;
            void()
        }
        (Vm, "start") => {
            let vm = args.obj(st, 1, Vm)?;
            args.bool(2, "start_paused")?;
            args.bool(3, "force")?;
            st.vm_set_power(&vm, true)?;
            void()
        }
        (Vm, "clean_shutdown") | (Vm, "hard_shutdown") => {
            let vm = args.obj(st, 1, Vm)?;
            st.vm_set_power(&vm, false)?;
            void()
        }
        (Vbd, "create") => {
            let rec = args
                .get(1)
                .as_struct()
                .ok_or_else(|| ApiError::field_type("args"))?;
            let new = new_vbd(rec)?;
            st.vbd_create(new).map(Value::String)
        }
        (Vbd, "destroy") => {
            let b = args.obj(st, 1, Vbd)?;
            st.vbd_destroy(&b)?;
            void()
        }
        (Vbd, "plug") | (Vbd, "unplug") => {
            let b = args.obj(st, 1, Vbd)?;
            st.vbd_set_attached(&b, name == "plug")?;
            void()
        }
        (Network, "add_purpose") | (Network, "remove_purpose") => {
            let n = args.obj(st, 1, Network)?;
            let purpose = args.string(2, "value")?;
            if name == "add_purpose" {
                st.add_purpose(&n, &purpose)?;
            } else {
                st.remove_purpose(&n, &purpose)?;
            }
            void()
        }
        (Task, "create") => {
            let label = args.string(1, "label")?;
            let description = args.string(2, "description")?;
            Ok(Value::String(st.task_create(&label, &description)))
        }
        (Task, "destroy") => {
            let t = args.obj(st, 1, Task)?;
            st.tasks.remove(&t);
            void()
        }
        (Task, "cancel") => {
            let t = args.obj(st, 1, Task)?;
            st.task_cancel(&t)?;
            void()
        }
        (_, "set_name_label" | "set_name_description") => {
            let r = args.obj(st, 1, class)?;
            let value = args.string(2, "value")?;
            let label = name == "set_name_label";
            let slot = match class {
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
            *slot.ok_or_else(|| ApiError::method_unknown(method))? = value;
            void()
        }
        (_, "set_other_config" | "add_to_other_config" | "remove_from_other_config") => {
            let r = args.obj(st, 1, class)?;
            let config = match class {
                Vdi => st.vdis.get_mut(&r).map(|v| &mut v.other_config),
                Vm => st.vms.get_mut(&r).map(|v| &mut v.other_config),
                Vbd => st.vbds.get_mut(&r).map(|v| &mut v.other_config),
                Task => st.tasks.get_mut(&r).map(|v| &mut v.other_config),
                _ => None,
            }
            .ok_or_else(|| ApiError::method_unknown(method))?;
            match name {
                "set_other_config" => *config = args.string_map(2, "value")?,
                "add_to_other_config" => {
                    let key = args.string(2, "key")?;
                    let value = args.string(3, "value")?;
                    if config.contains_key(&key) {
                        return Err(ApiError::new(
                            "MAP_DUPLICATE_KEY",
                            [class.wire_name(), "other_config", r.as_str(), key.as_str()],
                        ));
                    }
                    config.insert(key, value);
                }
                _ => {
                    config.remove(&args.string(2, "key")?);
                }
            }
            void()
        }
        (_, "get_all") => Ok(Value::strings(st.all_refs(class))),
        (_, "get_all_records") => Ok(Value::Struct(
            st.all_refs(class)
                .into_iter()
                .filter_map(|r| st.record(class, &r).map(|m| (r, Value::Struct(m))))
                .collect(),
        )),
        (_, "get_by_uuid") => {
            let uuid = args.string(1, "uuid")?;
            st.by_uuid(class, &uuid).map(Value::String)
        }
        (_, "get_by_name_label") => {
            let label = args.string(1, "label")?;
            Ok(Value::strings(st.by_name_label(class, &label)))
        }
        (_, "get_record") => {
            let r = args.string(1, "self")?;
            st.record(class, &r)
                .map(Value::Struct)
                .ok_or_else(|| ApiError::handle_invalid(class.wire_name(), &r))
        }
        (_, getter) if getter.starts_with("get_") => {
            let field = &getter[4..];
            if legacy && class == Vdi && field == "cbt_enabled" {
                return Err(ApiError::method_unknown(method));
            }
            let r = args.string(1, "self")?;
            let Some(mut rec) = st.record(class, &r) else {
                return Err(if class.set_ref_fields().contains(&field) {
                    ApiError::new("HANDLE_INVALID", [r.as_str()])
                } else {
                    ApiError::handle_invalid(class.wire_name(), &r)
                });
            };
            rec.remove(field)
                .ok_or_else(|| ApiError::method_unknown(method))
        }
        _ => Err(ApiError::method_unknown(method)),
    }
}

/// `VDI.data_destroy`: the checks, then up to the configured wait (xapi:
/// 4 s) for every VBD to be unplugged and destroyed, without holding the
/// lock meanwhile, then the data goes.
fn data_destroy(core: &Arc<Core>, params: &[Value]) -> Result<Value, ApiError> {
    let args = Args { params };
    let (v, wait_ms) = {
        let st = core.lock();
        let v = args.obj(&st, 1, Class::Vdi)?;
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

/// `Async.CLASS.method`: checked like the synchronous call, then run on a
/// thread under a new task, which is returned at once.
fn call_async(
    core: &Arc<Core>,
    method: &str,
    inner: &str,
    params: &[Value],
) -> Result<Value, ApiError> {
    let unknown = || ApiError::method_unknown(method);
    let (class_name, name) = split(inner).ok_or_else(unknown)?;
    let class = Class::parse(class_name).ok_or_else(unknown)?;
    if !is_async_capable(class, name) {
        return Err(unknown());
    }
    let (legacy, delay_ms) = {
        let st = core.lock();
        (st.faults.legacy_host, st.faults.task_delay_ms)
    };
    if legacy && class == Class::Vdi && CBT_METHODS.contains(&name) {
        return Err(unknown());
    }
    let (min, max) = arity(class, name).ok_or_else(unknown)?;
    if params.len() < min || params.len() > max {
        return Err(ApiError::count_mismatch(method, max, params.len()));
    }
    let session = params[0].as_str().unwrap_or_default().to_string();
    let task = {
        let mut st = core.lock();
        st.check_session(&session)?;
        st.task_create(&format!("Async.{}.{name}", class.wire_name()), "")
    };
    let core = core.clone();
    let inner = inner.to_string();
    let params = params.to_vec();
    let task_ref = task.clone();
    std::thread::spawn(move || {
        run_task(&core, &task_ref, delay_ms, || {
            call(&core, &inner, &params).map(|v| task_result(&v))
        })
    });
    Ok(Value::String(task))
}

/// What a task's `result` holds for a call's value: an XML-RPC `<value>`
/// fragment, or "" for void.
pub(crate) fn task_result(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => String::new(),
        v => xmlrpc::value_fragment(v),
    }
}

/// Runs `work` under `task` after the configured delay, honouring a cancel
/// that arrives during the delay.
pub(crate) fn run_task(
    core: &Arc<Core>,
    task: &str,
    delay_ms: u64,
    work: impl FnOnce() -> Result<String, ApiError>,
) {
    let step = Duration::from_millis(20);
    let mut waited = 0u64;
    while waited < delay_ms {
        std::thread::sleep(step);
        waited += 20;
        let mut st = core.lock();
        if let Some(t) = st.tasks.get_mut(task) {
            t.progress = (waited as f64 / delay_ms as f64).min(0.99);
        }
        if st.task_status(task) == Some("cancelling") {
            st.task_finish(task, Err(ApiError::new("TASK_CANCELLED", [task])));
            return;
        }
    }
    let result = work();
    core.lock().task_finish(task, result);
}

fn sim_call(
    core: &Arc<Core>,
    method: &str,
    name: &str,
    params: &[Value],
) -> Result<Value, ApiError> {
    let (min, max) = sim_arity(name).ok_or_else(|| ApiError::method_unknown(method))?;
    if params.len() < min || params.len() > max {
        return Err(ApiError::count_mismatch(method, max, params.len()));
    }
    let session = params[0].as_str().unwrap_or_default().to_string();
    let args = Args { params };
    let mut st = core.lock();
    st.check_session(&session)?;
    match name {
        "guest_write" => {
            let v = args.obj(&st, 1, Class::Vdi)?;
            let offset = args.int(2, "offset")?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(args.string(3, "data")?)
                .map_err(|_| ApiError::field_type("data"))?;
            let offset = u64::try_from(offset).map_err(|_| ApiError::field_type("offset"))?;
            guest_write_checked(&mut st, &v, offset, &data)?;
            void()
        }
        "system_disable_cbt" => {
            let v = args.obj(&st, 1, Class::Vdi)?;
            st.system_disable_cbt(&v)?;
            void()
        }
        "set_fault" => {
            let fault = args.string(1, "name")?;
            let value = args.get(2);
            match fault.as_str() {
                "legacy_host" => st.faults.legacy_host = args.bool(2, "value")?,
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
            void()
        }
        "attach_to_dom0" => {
            let v = args.obj(&st, 1, Class::Vdi)?;
            st.attach_to_dom0(&v, "RO").map(Value::String)
        }
        "detach" => {
            let b = args.obj(&st, 1, Class::Vbd)?;
            st.detach_and_destroy(&b);
            void()
        }
        "create_vm" => {
            let label = args.string(1, "name")?;
            let sizes: Vec<u64> = args
                .get(2)
                .as_array()
                .ok_or_else(|| ApiError::field_type("disk_sizes"))?
                .iter()
                .map(|v| v.as_int().and_then(|i| u64::try_from(i).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| ApiError::field_type("disk_sizes"))?;
            create_vm_with_disks(&mut st, &label, &sizes).map(Value::String)
        }
        _ => Err(ApiError::method_unknown(method)),
    }
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
