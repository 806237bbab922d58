//! Objects as the wire sees them: `get_record` (and so every field getter)
//! builds each class's record here, including the derived fields
//! (`allowed_operations`, `snapshots`, `VBDs`, ...). Reads only.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::*;
use xapi_wire::value::{format_datetime, Value, EPOCH};

pub(super) fn dt(t: &Option<DateTime<Utc>>) -> Value {
    Value::DateTime(
        t.map(|t| format_datetime(&t))
            .unwrap_or_else(|| EPOCH.into()),
    )
}

pub(super) fn refs<'a>(it: impl IntoIterator<Item = &'a Ref>) -> Value {
    Value::Array(it.into_iter().map(|r| Value::String(r.clone())).collect())
}

pub(super) fn map(m: &BTreeMap<String, String>) -> Value {
    Value::string_map(m)
}

pub(super) fn empty_map() -> Value {
    Value::Struct(BTreeMap::new())
}

pub(super) fn rec<const N: usize>(fields: [(&str, Value); N]) -> BTreeMap<String, Value> {
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}
impl State {
    /// The record of one object as `get_record` returns it.
    pub fn record(&self, class: Class, r: &str) -> Option<BTreeMap<String, Value>> {
        Some(match class {
            Class::Session => {
                let s = self.sessions.get(r)?;
                rec([
                    ("uuid", Value::str(&s.uuid)),
                    ("this_host", Value::str(&self.host)),
                    ("this_user", Value::str(NULL_REF)),
                    (
                        "last_active",
                        Value::DateTime(format_datetime(&s.last_active)),
                    ),
                    ("pool", Value::Bool(false)),
                    ("other_config", empty_map()),
                    ("is_local_superuser", Value::Bool(true)),
                    ("subject", Value::str(NULL_REF)),
                    (
                        "validation_time",
                        Value::DateTime(format_datetime(&s.created)),
                    ),
                    ("auth_user_sid", Value::str("")),
                    ("auth_user_name", Value::str(&s.user)),
                    ("rbac_permissions", Value::Array(vec![])),
                    ("tasks", Value::Array(vec![])),
                    ("parent", Value::str(NULL_REF)),
                    ("originator", Value::str(&s.originator)),
                    ("client_certificate", Value::Bool(false)),
                ])
            }
            Class::Pool => {
                let p = self.pools.get(r)?;
                rec([
                    ("uuid", Value::str(&p.uuid)),
                    ("name_label", Value::str(&p.name_label)),
                    ("name_description", Value::str("")),
                    ("master", Value::str(&p.master)),
                    ("default_SR", Value::str(&p.default_sr)),
                    ("suspend_image_SR", Value::str(&p.default_sr)),
                    ("crash_dump_SR", Value::str(&p.default_sr)),
                    ("other_config", empty_map()),
                    ("ha_enabled", Value::Bool(false)),
                    ("tags", Value::Array(vec![])),
                    ("restrictions", empty_map()),
                ])
            }
            Class::Host => {
                let h = self.hosts.get(r)?;
                let mut sv = BTreeMap::new();
                for (k, v) in [
                    ("product_brand", "XenServer"),
                    ("product_version", "8.4.0"),
                    ("platform_name", "XCP"),
                    ("platform_version", "3.4.0"),
                    ("xapi", "24.19"),
                    ("hostname", h.hostname.as_str()),
                ] {
                    sv.insert(k.to_string(), v.to_string());
                }
                if self.faults.legacy_host {
                    sv.insert("product_version".into(), "7.1.0".into());
                }
                rec([
                    ("uuid", Value::str(&h.uuid)),
                    ("name_label", Value::str(&h.name_label)),
                    ("name_description", Value::str("simulated by cbtvault")),
                    ("hostname", Value::str(&h.hostname)),
                    ("address", Value::str(&h.address)),
                    ("enabled", Value::Bool(true)),
                    ("API_version_major", Value::Int(2)),
                    (
                        "API_version_minor",
                        Value::Int(if self.faults.legacy_host { 7 } else { 21 }),
                    ),
                    ("API_version_vendor", Value::str("XenSource")),
                    ("software_version", map(&sv)),
                    ("other_config", empty_map()),
                    (
                        "PBDs",
                        refs(
                            self.pbds
                                .iter()
                                .filter(|(_, p)| p.host == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    (
                        "PIFs",
                        refs(
                            self.pifs
                                .iter()
                                .filter(|(_, p)| p.host == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    (
                        "resident_VMs",
                        refs(
                            self.vms
                                .iter()
                                .filter(|(_, v)| v.power_state == "Running")
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("control_domain", Value::str(self.dom0_of(r))),
                    ("tags", Value::Array(vec![])),
                ])
            }
            Class::Sr => {
                let s = self.srs.get(r)?;
                let vdis: Vec<&Ref> = self
                    .vdis
                    .iter()
                    .filter(|(_, v)| v.sr == r)
                    .map(|(k, _)| k)
                    .collect();
                let virtual_allocation: u64 = vdis
                    .iter()
                    .filter_map(|k| self.vdis.get(*k))
                    .map(|v| v.virtual_size)
                    .sum();
                rec([
                    ("uuid", Value::str(&s.uuid)),
                    ("name_label", Value::str(&s.name_label)),
                    ("name_description", Value::str(&s.name_description)),
                    ("type", Value::str(&s.sr_type)),
                    (
                        "content_type",
                        Value::str(super::sr::content_type(&s.sr_type)),
                    ),
                    ("shared", Value::Bool(s.shared)),
                    ("physical_size", Value::from(self.sr_physical_size(r))),
                    (
                        "physical_utilisation",
                        Value::from(self.sr_physical_utilisation(r)),
                    ),
                    ("virtual_allocation", Value::from(virtual_allocation)),
                    ("VDIs", refs(vdis)),
                    (
                        "PBDs",
                        refs(self.pbds.iter().filter(|(_, p)| p.sr == r).map(|(k, _)| k)),
                    ),
                    ("other_config", empty_map()),
                    ("sm_config", empty_map()),
                    (
                        "allowed_operations",
                        Value::strings([
                            "vdi_create",
                            "vdi_destroy",
                            "vdi_snapshot",
                            "vdi_enable_cbt",
                            "vdi_disable_cbt",
                            "vdi_data_destroy",
                            "vdi_list_changed_blocks",
                        ]),
                    ),
                    ("current_operations", empty_map()),
                    ("tags", Value::Array(vec![])),
                ])
            }
            Class::Pbd => {
                let p = self.pbds.get(r)?;
                rec([
                    ("uuid", Value::str(&p.uuid)),
                    ("host", Value::str(&p.host)),
                    ("SR", Value::str(&p.sr)),
                    ("device_config", empty_map()),
                    ("currently_attached", Value::Bool(p.currently_attached)),
                    ("other_config", empty_map()),
                ])
            }
            Class::Network => {
                let n = self.networks.get(r)?;
                rec([
                    ("uuid", Value::str(&n.uuid)),
                    ("name_label", Value::str(&n.name_label)),
                    ("name_description", Value::str("")),
                    ("bridge", Value::str(&n.bridge)),
                    ("MTU", Value::Int(1500)),
                    ("managed", Value::Bool(true)),
                    ("purpose", Value::strings(n.purpose.iter().cloned())),
                    (
                        "PIFs",
                        refs(
                            self.pifs
                                .iter()
                                .filter(|(_, p)| p.network == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("VIFs", Value::Array(vec![])),
                    ("other_config", empty_map()),
                    ("tags", Value::Array(vec![])),
                ])
            }
            Class::Pif => {
                let p = self.pifs.get(r)?;
                rec([
                    ("uuid", Value::str(&p.uuid)),
                    ("device", Value::str(&p.device)),
                    ("network", Value::str(&p.network)),
                    ("host", Value::str(&p.host)),
                    ("IP", Value::str(&p.ip)),
                    ("IPv6", Value::strings(p.ipv6.iter().cloned())),
                    ("netmask", Value::str("255.0.0.0")),
                    ("gateway", Value::str("")),
                    ("ip_configuration_mode", Value::str("Static")),
                    ("ipv6_configuration_mode", Value::str("None")),
                    ("primary_address_type", Value::str("IPv4")),
                    ("MAC", Value::str("02:00:00:00:00:01")),
                    ("MTU", Value::Int(1500)),
                    ("VLAN", Value::Int(-1)),
                    ("management", Value::Bool(p.management)),
                    ("physical", Value::Bool(true)),
                    ("currently_attached", Value::Bool(p.currently_attached)),
                    ("other_config", empty_map()),
                ])
            }
            Class::Vm => {
                let v = self.vms.get(r)?;
                rec([
                    ("uuid", Value::str(&v.uuid)),
                    ("name_label", Value::str(&v.name_label)),
                    ("name_description", Value::str(&v.name_description)),
                    ("power_state", Value::str(&v.power_state)),
                    ("is_a_template", Value::Bool(false)),
                    ("is_default_template", Value::Bool(false)),
                    ("is_control_domain", Value::Bool(v.is_control_domain)),
                    ("is_a_snapshot", Value::Bool(v.is_a_snapshot)),
                    ("snapshot_of", Value::str(&v.snapshot_of)),
                    (
                        "snapshots",
                        refs(
                            self.vms
                                .iter()
                                .filter(|(_, s)| s.snapshot_of == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("snapshot_time", dt(&v.snapshot_time)),
                    ("VBDs", refs(&self.vbds_of_vm(r))),
                    ("VIFs", Value::Array(vec![])),
                    ("consoles", Value::Array(vec![])),
                    ("crash_dumps", Value::Array(vec![])),
                    (
                        "resident_on",
                        Value::str(if v.power_state == "Running" {
                            self.host.as_str()
                        } else {
                            NULL_REF
                        }),
                    ),
                    (
                        "domid",
                        Value::Int(if v.is_control_domain {
                            0
                        } else if v.power_state == "Running" {
                            1
                        } else {
                            -1
                        }),
                    ),
                    ("other_config", map(&v.other_config)),
                    ("tags", Value::strings(v.tags.iter().cloned())),
                    ("memory_static_max", Value::Int(1 << 30)),
                    ("VCPUs_max", Value::Int(1)),
                    ("allowed_operations", Value::Array(vec![])),
                    ("current_operations", empty_map()),
                    ("blocked_operations", empty_map()),
                    ("HVM_boot_policy", Value::str("BIOS order")),
                    ("platform", empty_map()),
                    ("suspend_VDI", Value::str(self.suspend_vdi_of(r))),
                ])
            }
            Class::Vbd => {
                let b = self.vbds.get(r)?;
                rec([
                    ("uuid", Value::str(&b.uuid)),
                    ("VM", Value::str(&b.vm)),
                    ("VDI", Value::str(&b.vdi)),
                    ("device", Value::str(&b.device)),
                    ("userdevice", Value::str(&b.userdevice)),
                    ("bootable", Value::Bool(b.bootable)),
                    ("mode", Value::str(&b.mode)),
                    ("type", Value::str(&b.vbd_type)),
                    ("unpluggable", Value::Bool(true)),
                    ("empty", Value::Bool(b.empty)),
                    ("currently_attached", Value::Bool(b.currently_attached)),
                    ("storage_lock", Value::Bool(false)),
                    ("status_code", Value::Int(0)),
                    ("status_detail", Value::str("")),
                    ("other_config", map(&b.other_config)),
                    ("allowed_operations", Value::Array(vec![])),
                    ("current_operations", empty_map()),
                    ("qos_algorithm_type", Value::str("")),
                    ("qos_algorithm_params", empty_map()),
                    ("runtime_properties", empty_map()),
                ])
            }
            Class::Vdi => {
                let v = self.vdis.get(r)?;
                let mut m = rec([
                    ("uuid", Value::str(&v.uuid)),
                    ("name_label", Value::str(&v.name_label)),
                    ("name_description", Value::str(&v.name_description)),
                    (
                        "allowed_operations",
                        Value::strings(self.vdi_allowed_operations(v)),
                    ),
                    ("current_operations", empty_map()),
                    ("SR", Value::str(&v.sr)),
                    ("VBDs", refs(&self.vbds_of_vdi(r))),
                    ("crash_dumps", Value::Array(vec![])),
                    ("virtual_size", Value::from(v.virtual_size)),
                    (
                        "physical_utilisation",
                        Value::from(if v.data.is_some() { v.virtual_size } else { 0 }),
                    ),
                    ("type", Value::str(&v.vdi_type)),
                    ("sharable", Value::Bool(v.sharable)),
                    ("read_only", Value::Bool(v.read_only)),
                    ("other_config", map(&v.other_config)),
                    ("storage_lock", Value::Bool(false)),
                    ("location", Value::str(&v.uuid)),
                    ("managed", Value::Bool(true)),
                    ("missing", Value::Bool(false)),
                    ("parent", Value::str(NULL_REF)),
                    ("xenstore_data", map(&v.xenstore_data)),
                    ("sm_config", map(&v.sm_config)),
                    ("is_a_snapshot", Value::Bool(v.is_a_snapshot)),
                    ("snapshot_of", Value::str(&v.snapshot_of)),
                    (
                        "snapshots",
                        refs(
                            self.vdis
                                .iter()
                                .filter(|(_, s)| s.snapshot_of == r)
                                .map(|(k, _)| k),
                        ),
                    ),
                    ("snapshot_time", dt(&v.snapshot_time)),
                    ("tags", Value::strings(v.tags.iter().cloned())),
                    ("allow_caching", Value::Bool(false)),
                    ("on_boot", Value::str(&v.on_boot)),
                    ("metadata_of_pool", Value::str(NULL_REF)),
                    ("metadata_latest", Value::Bool(false)),
                    ("is_tools_iso", Value::Bool(false)),
                    ("cbt_enabled", Value::Bool(v.cbt_enabled)),
                ]);
                if self.faults.legacy_host {
                    m.remove("cbt_enabled");
                }
                m
            }
            Class::Task => {
                let t = self.tasks.get(r)?;
                rec([
                    ("uuid", Value::str(&t.uuid)),
                    ("name_label", Value::str(&t.name_label)),
                    ("name_description", Value::str(&t.name_description)),
                    (
                        "allowed_operations",
                        Value::strings(if t.status == "pending" {
                            vec!["cancel"]
                        } else {
                            vec![]
                        }),
                    ),
                    ("current_operations", empty_map()),
                    ("created", Value::DateTime(format_datetime(&t.created))),
                    ("finished", dt(&t.finished)),
                    ("status", Value::str(&t.status)),
                    ("resident_on", Value::str(&self.host)),
                    ("progress", Value::Double(t.progress)),
                    ("type", Value::str("<none/>")),
                    ("result", Value::str(&t.result)),
                    ("error_info", Value::strings(t.error_info.iter().cloned())),
                    ("other_config", map(&t.other_config)),
                    ("subtask_of", Value::str(NULL_REF)),
                    ("subtasks", Value::Array(vec![])),
                    ("backtrace", Value::str("()")),
                ])
            }
        })
    }

    pub(super) fn vdi_allowed_operations(&self, v: &Vdi) -> Vec<&'static str> {
        if v.vdi_type == "cbt_metadata" {
            return vec![
                "data_destroy",
                "destroy",
                "list_changed_blocks",
                "forget",
                "generate_config",
                "update",
            ];
        }
        let mut ops = vec![
            "clone",
            "copy",
            "snapshot",
            "generate_config",
            "update",
            "forget",
            "list_changed_blocks",
        ];
        // xapi_vdi.ml `allowed_when_cbt_enabled`: resize is; mirror and
        // set_on_boot are not. No SM driver has VDI_RESIZE_ONLINE.
        ops.push("resize");
        if !v.cbt_enabled {
            ops.extend(["mirror", "set_on_boot"]);
        }
        if !v.is_a_snapshot {
            ops.extend(["enable_cbt", "disable_cbt"]);
        } else if v.cbt_enabled {
            ops.push("data_destroy");
        }
        ops.push("destroy");
        ops
    }
}
