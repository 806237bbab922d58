//! A pool's VMs with their disks, read in four calls
//! (`VM`/`VBD`/`VDI`/`host.get_all_records`), for job selection.

use std::collections::BTreeMap;

use xapi_wire::Value;

use super::client::{boolean, int, refs, text, Session};
use super::XenApiError;

/// One VM of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolVm {
    pub reference: String,
    pub uuid: String,
    pub name: String,
    pub tags: Vec<String>,
    pub power_state: String,
    /// The host it runs on: (uuid, name_label), when running.
    pub resident_on: Option<(String, String)>,
    pub is_template: bool,
    pub is_snapshot: bool,
    pub is_control_domain: bool,
    /// Its disks (VBDs of type Disk with a VDI of type user or system), by
    /// userdevice.
    pub disks: Vec<PoolDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDisk {
    pub vdi_uuid: String,
    pub name: String,
    pub userdevice: String,
    pub size_bytes: u64,
}

type Records = BTreeMap<String, BTreeMap<String, Value>>;

fn all(session: &Session, class: &str) -> Result<Records, XenApiError> {
    let what = format!("{class}.get_all_records");
    let v = session.call(&what, &[])?;
    let bad = |reason: String| XenApiError::Protocol {
        what: what.clone(),
        reason,
    };
    let Value::Struct(map) = v else {
        return Err(bad("not a struct".into()));
    };
    map.into_iter()
        .map(|(r, rec)| match rec {
            Value::Struct(m) => Ok((r, m)),
            _ => Err(bad(format!("record of {r} is not a struct"))),
        })
        .collect()
}

fn flag(what: &str, rec: &BTreeMap<String, Value>, name: &str) -> Result<bool, XenApiError> {
    rec.get(name)
        .map(|v| boolean(what, v))
        .transpose()
        .map(|b| b.unwrap_or(false))
}

impl Session {
    /// Every VM of the pool this session is on, with its disks.
    pub fn pool_inventory(&self) -> Result<Vec<PoolVm>, XenApiError> {
        let hosts = all(self, "host")?;
        let vdis = all(self, "VDI")?;
        let vbds = all(self, "VBD")?;
        let vms = all(self, "VM")?;
        let mut out = Vec::with_capacity(vms.len());
        for (reference, rec) in &vms {
            let what = format!("VM {reference}");
            let resident_on = match rec.get("resident_on").and_then(Value::as_str) {
                Some(h) => hosts.get(h).map(|hr| -> Result<_, XenApiError> {
                    Ok((text(&what, hr, "uuid")?, text(&what, hr, "name_label")?))
                }),
                None => None,
            }
            .transpose()?;
            let mut disks = Vec::new();
            let vm_vbds = match rec.get("VBDs") {
                Some(v) => refs(&what, v.clone())?,
                None => Vec::new(),
            };
            for vbd in vm_vbds {
                let Some(b) = vbds.get(&vbd) else { continue };
                if text(&what, b, "type")? != "Disk" {
                    continue;
                }
                let vdi = text(&what, b, "VDI")?;
                let Some(d) = vdis.get(&vdi) else { continue };
                let kind = text(&what, d, "type")?;
                if kind != "user" && kind != "system" {
                    continue;
                }
                disks.push(PoolDisk {
                    vdi_uuid: text(&what, d, "uuid")?.to_ascii_lowercase(),
                    name: text(&what, d, "name_label").unwrap_or_default(),
                    userdevice: text(&what, b, "userdevice").unwrap_or_default(),
                    size_bytes: d
                        .get("virtual_size")
                        .map(|v| int(&what, v))
                        .transpose()?
                        .unwrap_or(0)
                        .max(0) as u64,
                });
            }
            disks.sort_by(|a, b| {
                let n = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
                n(&a.userdevice)
                    .cmp(&n(&b.userdevice))
                    .then(a.userdevice.cmp(&b.userdevice))
            });
            out.push(PoolVm {
                reference: reference.clone(),
                uuid: text(&what, rec, "uuid")?.to_ascii_lowercase(),
                name: text(&what, rec, "name_label").unwrap_or_default(),
                tags: match rec.get("tags") {
                    Some(v) => refs(&what, v.clone())?,
                    None => Vec::new(),
                },
                power_state: text(&what, rec, "power_state").unwrap_or_default(),
                resident_on,
                is_template: flag(&what, rec, "is_a_template")?,
                is_snapshot: flag(&what, rec, "is_a_snapshot")?,
                is_control_domain: flag(&what, rec, "is_control_domain")?,
                disks,
            });
        }
        Ok(out)
    }
}
