//! `snapshots`: the list, a VM backup's disks and metadata shown together
//! under their VM (names as they were when backed up), optionally grouped
//! like `forget` groups (`--group-by`).

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::json;

use super::forget_policy::{unit_source, GroupBy};
use super::{filtered, Outcome, SnapshotFilter};
use crate::output::{human_bytes, plural, Ui};
use crate::repo::{Repository, SnapshotEntry};
use crate::source::xenapi::workflow::keys;

#[derive(Debug, Clone, Default)]
pub struct SnapshotsOptions {
    pub filter: SnapshotFilter,
    /// Print one table per group (`None`: one table).
    pub group_by: Option<GroupBy>,
}

pub fn run(ui: &Ui, repo: &Repository, options: &SnapshotsOptions) -> Result<Outcome> {
    let list = filtered(repo, &options.filter)?;
    if ui.json {
        for s in &list {
            let mut v = entry_json(s);
            if let (Some(g), Some(map)) = (options.group_by, v.as_object_mut()) {
                map.insert("group".into(), json!(group_key(s, g)));
            }
            ui.item("snapshot", &v);
        }
        ui.summary(&json!({ "snapshot_count": list.len() }));
        return Ok(Outcome::Ok);
    }
    let groups: BTreeMap<String, Vec<&SnapshotEntry>> = match options.group_by {
        None => BTreeMap::from([(String::new(), list.iter().collect())]),
        Some(g) => {
            let mut out: BTreeMap<String, Vec<&SnapshotEntry>> = BTreeMap::new();
            for s in &list {
                out.entry(group_key(s, g)).or_default().push(s);
            }
            out
        }
    };
    for (key, members) in &groups {
        if !key.is_empty() {
            ui.print(format!("{key}:"));
        }
        ui.table(
            &["ID", "Time (UTC)", "Parent", "Source", "Size", "Tags"],
            &rows(members),
        );
        ui.print(plural(members.len(), "snapshot"));
        if groups.len() > 1 {
            ui.print("");
        }
    }
    Ok(Outcome::Ok)
}

fn group_key(s: &SnapshotEntry, g: GroupBy) -> String {
    let mut key = Vec::new();
    if g.source {
        key.push(format!("source {}", unit_source(&s.meta)));
    }
    if g.host {
        key.push(format!("host {}", s.meta.hostname));
    }
    if g.tags {
        let mut t = s.meta.tags.clone();
        t.sort();
        key.push(format!("tags [{}]", t.join(",")));
    }
    key.join(", ")
}

/// One snapshot's fields for `--json`.
fn entry_json(s: &SnapshotEntry) -> serde_json::Value {
    let m = &s.meta;
    let l = |k: &str| super::select::vm_field(m, k);
    json!({
        "snapshot_id": m.id, "time": m.time, "parent_id": m.parent,
        "source": m.source, "disk_size_bytes": m.disk_size_bytes, "tags": m.tags,
        "hostname": m.hostname, "backup_set_id": m.backup_set,
        "full": m.parent.is_none(), "read_mode": m.read_mode,
        "new_set_reason": m.new_set_reason, "landmark": m.landmark,
        "object": s.object.to_hex(),
        "kind": l(keys::KIND), "vm_uuid": l(keys::VM), "vm_name": l(keys::VM_NAME),
        "disk_name": l(keys::VDI_NAME), "vm_backup_id": l(keys::VM_BACKUP),
    })
}

/// Table rows, oldest first: a snapshot on its own is one row; the
/// snapshots of one VM backup follow a row naming the VM, indented.
fn rows(list: &[&SnapshotEntry]) -> Vec<Vec<String>> {
    // Units in the order of their first snapshot.
    let mut order: Vec<Vec<&SnapshotEntry>> = Vec::new();
    let mut by_backup: BTreeMap<&str, usize> = BTreeMap::new();
    for s in list {
        match super::select::vm_field(&s.meta, keys::VM_BACKUP) {
            Some(vb) => match by_backup.get(vb.as_str()) {
                Some(&k) => order[k].push(s),
                None => {
                    by_backup.insert(vb, order.len());
                    order.push(vec![s]);
                }
            },
            None => order.push(vec![s]),
        }
    }
    let mut out = Vec::new();
    for unit in order {
        let first = &unit[0].meta;
        match super::select::vm_field(first, keys::VM_BACKUP) {
            None => out.push(row(unit[0], "", first.source.clone())),
            Some(vb) => {
                let vm = super::select::vm_field(first, keys::VM)
                    .map(String::as_str)
                    .unwrap_or("?");
                let name = unit
                    .iter()
                    .find_map(|s| super::select::vm_field(&s.meta, keys::VM_NAME))
                    .map(|n| format!("VM '{n}' ({})", short(vm)))
                    .unwrap_or_else(|| format!("VM {vm}"));
                let disks = unit
                    .iter()
                    .filter(|s| {
                        super::select::vm_field(&s.meta, keys::KIND).map(String::as_str)
                            == Some("disk")
                    })
                    .count();
                let full = unit.iter().all(|s| s.meta.parent.is_none());
                let host = super::select::vm_field(first, keys::HOST)
                    .cloned()
                    .unwrap_or_default();
                out.push(vec![
                    format!("vm:{}", short(vb)),
                    first.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                    if full { "(full)" } else { "" }.to_string(),
                    format!(
                        "{name} on {host}: {}{}",
                        plural(disks, "disk"),
                        if unit.len() > disks {
                            " + metadata"
                        } else {
                            ""
                        }
                    ),
                    human_bytes(unit.iter().map(|s| s.meta.disk_size_bytes).sum()),
                    first.tags.join(","),
                ]);
                for s in &unit {
                    let l = &s.meta.landmark;
                    let what = match l.get(keys::KIND).map(String::as_str) {
                        Some("vm-metadata") => "metadata".to_string(),
                        _ => match l.get(keys::VDI_NAME) {
                            Some(n) => format!("disk '{n}' ({})", s.meta.source),
                            None => format!("disk {}", s.meta.source),
                        },
                    };
                    out.push(row(s, "  ", what));
                }
            }
        }
    }
    out
}

fn row(s: &SnapshotEntry, indent: &str, source: String) -> Vec<String> {
    let m = &s.meta;
    vec![
        format!("{indent}{}", m.id.short()),
        m.time.format("%Y-%m-%d %H:%M:%S").to_string(),
        m.parent
            .map(|p| p.short())
            .unwrap_or_else(|| "(full)".into()),
        format!("{indent}{source}"),
        human_bytes(m.disk_size_bytes),
        m.tags.join(","),
    ]
}

fn short(uuid: &str) -> &str {
    uuid.get(..8).unwrap_or(uuid)
}
