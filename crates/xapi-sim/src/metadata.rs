//! VM metadata export and import (xenapi-reference.md §3.3-3.4): an
//! XVA-style tar holding only `ova.xml`, a single XML-RPC `<value>` struct
//! `{version: {...}, objects: [{class, id, snapshot: record}...]}` in which
//! references between exported objects are rewritten to `Ref:N` ids and
//! references to anything else become `OpaqueRef:NULL`. Import creates a
//! halted VM whose VBDs point at existing VDIs, found through the
//! `vdi:<source-uuid>=<dest-uuid>` map or else by the source VDI's uuid
//! (the simulator's location).

use std::collections::BTreeMap;

use super::model::{Class, NewVbd, Ref, State, NULL_REF};
use xapi_wire::value::{format_datetime, Value};
use xapi_wire::xmlrpc;
use xapi_wire::ApiError;

/// Largest `ova.xml` accepted on import.
pub const MAX_OVA_BYTES: u64 = 16 << 20;

/// A ustar archive holding one regular file.
pub fn tar_single(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let put =
        |h: &mut [u8; 512], at: usize, field: &[u8]| h[at..at + field.len()].copy_from_slice(field);
    put(&mut header, 0, &name.as_bytes()[..name.len().min(99)]);
    put(&mut header, 100, b"0000644\0");
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(
        &mut header,
        124,
        format!("{:011o}\0", data.len()).as_bytes(),
    );
    put(
        &mut header,
        136,
        format!("{:011o}\0", chrono::Utc::now().timestamp().max(0)).as_bytes(),
    );
    put(&mut header, 148, b"        ");
    header[156] = b'0';
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    let sum: u32 = header.iter().map(|&b| b as u32).sum();
    put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The content of the member `name` of a ustar archive.
pub fn tar_find(archive: &[u8], name: &str) -> Result<Vec<u8>, String> {
    let mut at = 0usize;
    while at + 512 <= archive.len() {
        let header = &archive[at..at + 512];
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let member = String::from_utf8_lossy(&header[..end]).into_owned();
        let size = octal(&header[124..136]).ok_or("bad size in a tar header")?;
        let start = at + 512;
        let stop = usize::try_from(size)
            .ok()
            .and_then(|s| start.checked_add(s))
            .filter(|&s| s <= archive.len())
            .ok_or("tar member runs past the end of the archive")?;
        if member.trim_start_matches("./") == name {
            return Ok(archive[start..stop].to_vec());
        }
        at = start + (stop - start).div_ceil(512) * 512;
    }
    Err(format!("no {name} in the archive"))
}

/// Replaces refs to exported objects by their ids and all others by NULL.
fn rewrite(v: Value, ids: &BTreeMap<Ref, String>) -> Value {
    match v {
        Value::String(s) if s.starts_with("OpaqueRef:") => {
            Value::String(ids.get(&s).cloned().unwrap_or_else(|| NULL_REF.to_string()))
        }
        Value::Array(items) => Value::Array(items.into_iter().map(|v| rewrite(v, ids)).collect()),
        Value::Struct(m) => {
            Value::Struct(m.into_iter().map(|(k, v)| (k, rewrite(v, ids))).collect())
        }
        other => other,
    }
}

/// `ova.xml` for a VM (and its snapshots when asked).
pub fn export_ova(st: &State, vm: &str, export_snapshots: bool) -> Result<String, ApiError> {
    st.vm(vm)?;
    let mut vms = vec![vm.to_string()];
    if export_snapshots {
        vms.extend(
            st.vms
                .iter()
                .filter(|(_, v)| v.snapshot_of == vm)
                .map(|(r, _)| r.clone()),
        );
    }
    let mut objects: Vec<(Class, Ref)> = Vec::new();
    for v in &vms {
        objects.push((Class::Vm, v.clone()));
        for b in st.vbds_of_vm(v) {
            let vdi = st.vbds[&b].vdi.clone();
            objects.push((Class::Vbd, b));
            if let Some(d) = st.vdis.get(&vdi) {
                if !objects.contains(&(Class::Sr, d.sr.clone())) {
                    objects.push((Class::Sr, d.sr.clone()));
                }
                if !objects.contains(&(Class::Vdi, vdi.clone())) {
                    objects.push((Class::Vdi, vdi));
                }
            }
        }
    }
    let ids: BTreeMap<Ref, String> = objects
        .iter()
        .enumerate()
        .map(|(i, (_, r))| (r.clone(), format!("Ref:{i}")))
        .collect();
    let items = objects
        .iter()
        .filter_map(|(class, r)| {
            let record = st.record(*class, r)?;
            let mut o = BTreeMap::new();
            o.insert("class".to_string(), Value::str(class.wire_name()));
            o.insert("id".to_string(), Value::str(&ids[r]));
            o.insert("snapshot".to_string(), rewrite(Value::Struct(record), &ids));
            Some(Value::Struct(o))
        })
        .collect();
    let host = st.hosts.get(&st.host);
    let mut version = BTreeMap::new();
    for (k, v) in [
        (
            "hostname",
            host.map(|h| h.hostname.clone()).unwrap_or_default(),
        ),
        ("date", format_datetime(&chrono::Utc::now())),
        ("product_version", "8.4.0".to_string()),
        ("product_brand", "XenServer".to_string()),
        ("build_number", "cbtvault-sim".to_string()),
        ("xapi_major", "24".to_string()),
        ("xapi_minor", "19".to_string()),
        ("export_vsn", "2".to_string()),
    ] {
        version.insert(k.to_string(), Value::String(v));
    }
    let mut top = BTreeMap::new();
    top.insert("version".to_string(), Value::Struct(version));
    top.insert("objects".to_string(), Value::Array(items));
    Ok(xmlrpc::value_fragment(&Value::Struct(top)))
}

/// One exported object's fields.
type Record = BTreeMap<String, Value>;

fn text<'a>(rec: &'a BTreeMap<String, Value>, key: &str) -> &'a str {
    rec.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Creates the (non-snapshot) VMs of an `ova.xml`; returns their refs.
/// `vdi_map`: source VDI uuid -> destination VDI uuid.
pub fn import_ova(
    st: &mut State,
    ova: &[u8],
    vdi_map: &BTreeMap<String, String>,
    dry_run: bool,
) -> Result<Vec<Ref>, ApiError> {
    let bad = |why: String| ApiError::new("IMPORT_ERROR", [why]);
    let doc = xmlrpc::decode_value_document(ova).map_err(|e| bad(e.to_string()))?;
    let objects = doc
        .as_struct()
        .and_then(|m| m.get("objects"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad("ova.xml has no objects".into()))?;
    let mut by_id: BTreeMap<String, (String, BTreeMap<String, Value>)> = BTreeMap::new();
    for o in objects {
        let Some(m) = o.as_struct() else { continue };
        let rec = m
            .get("snapshot")
            .and_then(Value::as_struct)
            .cloned()
            .unwrap_or_default();
        by_id.insert(
            text(m, "id").to_string(),
            (text(m, "class").to_string(), rec),
        );
    }
    // Resolve every VBD's VDI before creating anything.
    let mut plan: Vec<(Record, Vec<(Record, Ref)>)> = Vec::new();
    for (id, (class, rec)) in &by_id {
        if class != "VM" || rec.get("is_a_snapshot") == Some(&Value::Bool(true)) {
            continue;
        }
        let mut disks = Vec::new();
        for (_, (c, vbd)) in by_id
            .iter()
            .filter(|(_, (c, r))| c == "VBD" && text(r, "VM") == id)
        {
            debug_assert_eq!(c, "VBD");
            if vbd.get("empty") == Some(&Value::Bool(true)) {
                // An empty CD drive: no VDI to find.
                disks.push((vbd.clone(), NULL_REF.to_string()));
                continue;
            }
            let Some((_, vdi)) = by_id.get(text(vbd, "VDI")) else {
                continue;
            };
            let source = text(vdi, "uuid");
            let target = vdi_map.get(source).map(String::as_str).unwrap_or(source);
            let dest = st
                .by_uuid(Class::Vdi, target)
                .map_err(|_| ApiError::new("VDI_MISSING", ["", target]))?;
            disks.push((vbd.clone(), dest));
        }
        plan.push((rec.clone(), disks));
    }
    if dry_run {
        return Ok(Vec::new());
    }
    let mut created = Vec::new();
    for (rec, disks) in plan {
        let vm = st.vm_create(text(&rec, "name_label"));
        if let Some(v) = st.vms.get_mut(&vm) {
            v.name_description = text(&rec, "name_description").to_string();
            if let Some(Value::Struct(oc)) = rec.get("other_config") {
                v.other_config = oc
                    .iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect();
            }
        }
        for (vbd, vdi) in disks {
            st.vbd_create(NewVbd {
                vm: vm.clone(),
                vdi,
                userdevice: text(&vbd, "userdevice").to_string(),
                mode: match text(&vbd, "mode") {
                    "RO" => "RO".to_string(),
                    _ => "RW".to_string(),
                },
                bootable: vbd.get("bootable") == Some(&Value::Bool(true)),
                other_config: BTreeMap::new(),
                vbd_type: match text(&vbd, "type") {
                    "" => "Disk".to_string(),
                    t => t.to_string(),
                },
                empty: vbd.get("empty") == Some(&Value::Bool(true)),
            })?;
        }
        created.push(vm);
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_round_trip() {
        let t = tar_single("ova.xml", b"<value>x</value>");
        assert_eq!(t.len() % 512, 0);
        assert_eq!(&t[257..263], b"ustar\0");
        assert_eq!(tar_find(&t, "ova.xml").unwrap(), b"<value>x</value>");
        assert!(tar_find(&t, "other").is_err());
        assert!(tar_find(&t[..520], "ova.xml").is_err());
        let mut hostile = t.clone();
        hostile[124..136].copy_from_slice(b"77777777777\0");
        assert!(tar_find(&hostile, "ova.xml").is_err());
    }
}
