//! The simulator-only `/sim/*` endpoints (the crate doc lists them): what
//! the product's integration tests use to stand in for a guest and to
//! inject faults over the wire. Answers `(status, JSON)`.

use std::time::Duration;

use serde_json::json;
use vim_wire::VimFault;

use crate::http::RequestHead;
use crate::model::FailCalls;
use crate::{describe, snapshots_of, vm_id, Core};

fn bad(message: impl Into<String>) -> (u16, String) {
    (400, json!({ "error": message.into() }).to_string())
}

fn ok(value: serde_json::Value) -> (u16, String) {
    (200, value.to_string())
}

pub(crate) fn handle(core: &Core, head: &RequestHead, body: &[u8]) -> (u16, String) {
    match run(core, head, body) {
        Ok(v) => ok(v),
        Err(e) => bad(e),
    }
}

fn param<'a>(head: &'a RequestHead, name: &str) -> Result<&'a str, String> {
    head.query_param(name)
        .ok_or_else(|| format!("missing query parameter '{name}'"))
}

fn number<T: std::str::FromStr>(head: &RequestHead, name: &str) -> Result<T, String> {
    let v = param(head, name)?;
    v.parse()
        .map_err(|_| format!("query parameter '{name}': '{v}' is not a number"))
}

fn flag(head: &RequestHead, name: &str) -> Result<bool, String> {
    match param(head, name)? {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        v => Err(format!("query parameter '{name}': '{v}' is not true/false")),
    }
}

fn run(core: &Core, head: &RequestHead, body: &[u8]) -> Result<serde_json::Value, String> {
    match (head.method.as_str(), head.path.as_str()) {
        ("POST", "/sim/add_vm") => {
            let name = param(head, "name")?;
            let sizes = param(head, "disks")?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("bad disk size '{s}'"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut st = core.lock();
            let id = st.add_vm(name, &sizes)?;
            core.changed(&st);
            Ok(to_json(&describe(&st, &id).map_err(|e| e.to_string())?))
        }
        ("POST" | "PUT", "/sim/guest_write") => {
            let offset: u64 = number(head, "offset")?;
            let key: i32 = number(head, "disk")?;
            let mut st = core.lock();
            let id = vm_id(&st, param(head, "vm")?).map_err(|e| e.to_string())?;
            st.guest_write(&id, key, offset, body)?;
            core.changed(&st);
            Ok(json!({ "written": body.len() }))
        }
        ("GET", "/sim/vm") => {
            let st = core.lock();
            let id = vm_id(&st, param(head, "vm")?).map_err(|e| e.to_string())?;
            Ok(to_json(&describe(&st, &id).map_err(|e| e.to_string())?))
        }
        ("GET", "/sim/snapshots") => {
            let st = core.lock();
            let id = vm_id(&st, param(head, "vm")?).map_err(|e| e.to_string())?;
            Ok(to_json(&snapshots_of(&st, &id)))
        }
        ("GET", "/sim/calls") => {
            let calls = core.calls.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Ok(json!({ "calls": calls }))
        }
        ("POST", "/sim/fault") => fault(core, head),
        _ => Err(format!("no hook {} {}", head.method, head.path)),
    }
}

fn fault(core: &Core, head: &RequestHead) -> Result<serde_json::Value, String> {
    let kind = param(head, "kind")?;
    let mut st = core.lock();
    let vm = |st: &crate::model::State| -> Result<String, String> {
        vm_id(st, param(head, "vm")?).map_err(|e| e.to_string())
    };
    let fault_param =
        || -> Result<VimFault, String> { Ok(VimFault::from_type_name(param(head, "fault")?)) };
    match kind {
        "fail_call" => st.faults.fail_calls.push(FailCalls {
            method: param(head, "method")?.to_string(),
            remaining: number(head, "count")?,
            fault: fault_param()?,
            message: head.query_param("message").unwrap_or("").to_string(),
        }),
        "fail_task" => {
            let f = fault_param()?;
            st.faults
                .fail_tasks
                .push((param(head, "method")?.to_string(), f));
        }
        "drop" => {
            let n: u32 = number(head, "count")?;
            *st.faults
                .drop_responses
                .entry(param(head, "target")?.to_string())
                .or_default() += n;
        }
        "ignore_range" => st.faults.ignore_range = flag(head, "on")?,
        "corrupt_put" => st.faults.corrupt_put = Some(number(head, "offset")?),
        "refuse_put" => st.faults.refuse_put_after = Some(number(head, "after")?),
        "delay" => st.faults.delay = Duration::from_millis(number(head, "ms")?),
        "task_duration" => st.faults.task_duration = Duration::from_millis(number(head, "ms")?),
        "reset_cbt" => {
            let id = vm(&st)?;
            st.reset_cbt(&id).map_err(|f| f.type_name().to_string())?;
            core.changed(&st);
        }
        "disable_cbt" => {
            let id = vm(&st)?;
            st.set_change_tracking(&id, false)
                .map_err(|f| f.type_name().to_string())?;
            core.changed(&st);
        }
        "replace_disk" => {
            let id = vm(&st)?;
            let key = st.replace_disk(&id, number(head, "disk")?)?;
            core.changed(&st);
            return Ok(json!({ "key": key }));
        }
        "power" => {
            let id = vm(&st)?;
            let on = flag(head, "on")?;
            if let Some(v) = st.vms.get_mut(&id) {
                v.powered_on = on;
            }
            core.changed(&st);
        }
        "clear" => st.faults = Default::default(),
        other => return Err(format!("unknown fault kind '{other}'")),
    }
    Ok(json!({ "ok": true }))
}

/// A result type as JSON.
fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}
