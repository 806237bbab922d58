//! A call's positional parameters, read with xapi's type errors
//! (`FIELD_TYPE_ERROR [field]`, `HANDLE_INVALID [class; ref]`), and the
//! constructor records of `VDI.create` / `VBD.create`. Parses; runs nothing.

use std::collections::BTreeMap;

use crate::model::{Class, NewVbd, NewVdi, Ref, State};
use xapi_wire::ApiError;
use xapi_wire::Value;

pub(super) struct Args<'a> {
    pub(super) params: &'a [Value],
}

impl Args<'_> {
    pub(super) fn get(&self, i: usize) -> &Value {
        &self.params[i]
    }

    pub(super) fn string(&self, i: usize, field: &str) -> Result<String, ApiError> {
        match self.get(i) {
            Value::String(s) => Ok(s.clone()),
            _ => Err(ApiError::field_type(field)),
        }
    }

    /// A live object of `class` (a dead or foreign ref is `HANDLE_INVALID`).
    pub(super) fn obj(&self, st: &State, i: usize, class: Class) -> Result<Ref, ApiError> {
        let r = self.string(i, class.wire_name())?;
        if st.exists(class, &r) {
            Ok(r)
        } else {
            Err(ApiError::handle_invalid(class.wire_name(), &r))
        }
    }

    pub(super) fn int(&self, i: usize, field: &str) -> Result<i64, ApiError> {
        self.get(i)
            .as_int()
            .ok_or_else(|| ApiError::field_type(field))
    }

    pub(super) fn bool(&self, i: usize, field: &str) -> Result<bool, ApiError> {
        self.get(i)
            .as_bool()
            .ok_or_else(|| ApiError::field_type(field))
    }

    pub(super) fn string_map(
        &self,
        i: usize,
        field: &str,
    ) -> Result<BTreeMap<String, String>, ApiError> {
        string_map(self.get(i), field)
    }

    pub(super) fn refs(&self, i: usize, field: &str) -> Result<Vec<Ref>, ApiError> {
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

pub(super) fn new_vdi(st: &State, rec: &BTreeMap<String, Value>) -> Result<NewVdi, ApiError> {
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

pub(super) fn new_vbd(rec: &BTreeMap<String, Value>) -> Result<NewVbd, ApiError> {
    // Assumption: as for `mode`, a record without `type` or `empty` is a
    // disk with a medium (xapi's constructor requires both fields).
    let empty = match rec.get("empty") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::field_type("empty"))?,
    };
    Ok(NewVbd {
        vbd_type: field_string(rec, "type", Some("Disk"))?,
        empty,
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
