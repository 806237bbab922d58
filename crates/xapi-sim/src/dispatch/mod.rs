//! From a method name and positional parameters to a handler, with
//! xapi's checks in xapi's order: unknown method (`MESSAGE_METHOD_UNKNOWN`),
//! parameter count (`MESSAGE_PARAMETER_COUNT_MISMATCH [method; expected;
//! received]`, counts include the session), session (`SESSION_INVALID`),
//! then argument types and handles (`HANDLE_INVALID [class; ref]`).
//! `Async.CLASS.method` runs the call on a task. Wire-independent: both
//! XML-RPC and JSON-RPC end here. Which calls exist, their counts and
//! handlers are data, in `table`; this module only looks them up and checks.
//!
//! The `sim.*` methods are the simulator's own test hooks; a real host
//! answers them with `MESSAGE_METHOD_UNKNOWN`.

mod args;
mod calls;
mod hooks;
mod table;

use std::sync::Arc;
use std::time::Duration;

pub use hooks::DiskKind;
pub use hooks::ISO_BYTES;
pub(crate) use hooks::{
    add_cd, add_disk, add_disk_on_sr, create_vm_with_disks, guest_write_checked,
};

use self::args::Args;
use self::table::{Call, Handler, Kind, Method, Table};
use super::model::Class;
use super::Core;
use xapi_wire::xmlrpc;
use xapi_wire::ApiError;
use xapi_wire::Value;

/// Splits `CLASS.name`; `None` for an unknown class.
fn split(method: &str) -> Option<(&str, &str)> {
    method.split_once('.')
}

/// Runs one call. `Async.` calls return a task ref at once. A successful
/// call that may have changed objects is followed by a save.
pub(crate) fn call(core: &Arc<Core>, method: &str, params: &[Value]) -> Result<Value, ApiError> {
    let result = call_inner(core, method, params);
    if !method.starts_with("sim.") {
        core.log_call(format!(
            "XenAPI {method} {}",
            match &result {
                Ok(_) => "ok".to_string(),
                Err(e) => e.code.to_string(),
            }
        ));
    }
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
    let table = Table::get();
    let entry = if class_name == "sim" {
        table.hook(name)
    } else {
        let class = Class::parse(class_name).ok_or_else(unknown)?;
        table.lookup(class, name)
    }
    .ok_or_else(unknown)?;
    if entry.cbt && core.lock().faults.legacy_host {
        return Err(unknown());
    }
    check_count(entry, method, params)?;
    let session = match entry.kind {
        Kind::Login => String::new(),
        Kind::Hook => {
            let session = params[0].as_str().unwrap_or_default().to_string();
            core.lock().check_session(&session)?;
            session
        }
        Kind::Api => {
            let session = match &params[0] {
                Value::String(s) => s.clone(),
                other => return Err(ApiError::session_invalid(&format!("{other:?}"))),
            };
            core.lock().check_session(&session)?;
            let injected = {
                let st = core.lock();
                st.faults.fail_calls.get(method).cloned().or_else(|| {
                    let target = params.get(1).and_then(Value::as_str)?;
                    st.faults
                        .fail_calls_on
                        .get(&(method.to_string(), target.to_string()))
                        .cloned()
                })
            };
            if let Some(desc) = injected {
                let mut items = desc.into_iter();
                let code = items.next().unwrap_or_else(|| "INTERNAL_ERROR".into());
                return Err(ApiError::new(&code, items));
            }
            session
        }
    };
    let call = Call {
        method,
        class: entry.class,
        name,
        session: &session,
        args: Args { params },
    };
    match entry.handler {
        Handler::State(run) => run(&mut core.lock(), &call),
        Handler::Core(run) => run(core, &call),
    }
}

/// `MESSAGE_PARAMETER_COUNT_MISMATCH [method; max; received]` unless the
/// count is within the entry's range.
fn check_count(entry: &Method, method: &str, params: &[Value]) -> Result<(), ApiError> {
    if params.len() < entry.min || params.len() > entry.max {
        return Err(ApiError::count_mismatch(method, entry.max, params.len()));
    }
    Ok(())
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
    let entry = Table::get()
        .lookup(class, name)
        .filter(|m| m.async_ok)
        .ok_or_else(unknown)?;
    let (legacy, delay_ms) = {
        let st = core.lock();
        (st.faults.legacy_host, st.faults.task_delay_ms)
    };
    if legacy && entry.cbt {
        return Err(unknown());
    }
    check_count(entry, method, params)?;
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
