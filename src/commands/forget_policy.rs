//! From snapshots to policy decisions: the units a policy counts (one
//! snapshot, or every snapshot of one XenServer VM backup: its disks and
//! its metadata are kept or forgotten together), their groups
//! (`--group-by`), and the keep/remove verdict of each snapshot with its
//! reasons. Pure; the policy rules themselves are `repo::policy`.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use crate::format::snapshot::SnapshotMeta;
use crate::repo::policy::{self, Item, Policy};
use crate::source::xenapi::workflow::keys;

/// What snapshots are grouped by before the policy is applied to each group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupBy {
    /// The source identity (a VM backup: the VM).
    pub source: bool,
    /// The host name that ran the backup.
    pub host: bool,
    /// The set of tags.
    pub tags: bool,
}

impl GroupBy {
    /// The default: each source keeps its own history.
    pub const BY_SOURCE: GroupBy = GroupBy {
        source: true,
        host: false,
        tags: false,
    };

    /// `source`, `host`, `tags`, comma-separated; the empty string groups
    /// everything together.
    pub fn parse(text: &str) -> Result<GroupBy, String> {
        let mut g = GroupBy::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "source" => g.source = true,
                "host" => g.host = true,
                "tags" => g.tags = true,
                other => {
                    return Err(format!(
                        "unknown --group-by field '{other}': use source, host, tags (comma-separated) or ''"
                    ))
                }
            }
        }
        Ok(g)
    }
}

/// The identity a unit is grouped under for `source`: a VM backup's VM,
/// else the snapshot's source.
pub(crate) fn unit_source(meta: &SnapshotMeta) -> String {
    match (
        meta.landmark.get(keys::VM_BACKUP),
        meta.landmark.get(keys::HOST),
        meta.landmark.get(keys::VM),
    ) {
        (Some(_), Some(host), Some(vm)) => format!("xen://{host}/vm/{vm}"),
        _ => meta.source.clone(),
    }
}

/// The verdict on one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Index into the snapshots given.
    #[serde(skip)]
    pub index: usize,
    #[serde(rename = "snapshot_id")]
    pub id: String,
    pub time: DateTime<Utc>,
    pub source: String,
    pub keep: bool,
    pub reasons: Vec<String>,
    /// The VM backup this snapshot belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none", rename = "vm_backup_id")]
    pub vm_backup: Option<String>,
}

/// One group's verdicts, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct GroupVerdicts {
    /// What the group shares (`source=...`, `host=...`, `tags=...`).
    pub group: String,
    pub snapshots: Vec<Verdict>,
}

/// Applies `policy` to `snapshots` grouped by `group_by`, counting periods
/// in `tz`. Every snapshot gets exactly one verdict.
pub fn decide<Tz: TimeZone>(
    snapshots: &[SnapshotMeta],
    policy: &Policy,
    group_by: GroupBy,
    tz: &Tz,
) -> Vec<GroupVerdicts> {
    // Units: snapshots sharing a VM backup id are one; others alone.
    let mut units: Vec<Vec<usize>> = Vec::new();
    let mut by_vm_backup: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, m) in snapshots.iter().enumerate() {
        match m.landmark.get(keys::VM_BACKUP) {
            Some(vb) => match by_vm_backup.get(vb.as_str()) {
                Some(&u) => units[u].push(i),
                None => {
                    by_vm_backup.insert(vb, units.len());
                    units.push(vec![i]);
                }
            },
            None => units.push(vec![i]),
        }
    }
    // Groups of units.
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (u, members) in units.iter().enumerate() {
        let first = &snapshots[members[0]];
        let mut key = Vec::new();
        if group_by.source {
            key.push(format!("source={}", unit_source(first)));
        }
        if group_by.host {
            key.push(format!("host={}", first.hostname));
        }
        if group_by.tags {
            let mut tags = unit_tags(snapshots, members);
            tags.sort();
            key.push(format!("tags={}", tags.join(",")));
        }
        groups.entry(key.join(" ")).or_default().push(u);
    }
    let mut out = Vec::new();
    for (group, unit_ids) in groups {
        let tags: Vec<Vec<String>> = unit_ids
            .iter()
            .map(|&u| unit_tags(snapshots, &units[u]))
            .collect();
        let items: Vec<Item> = unit_ids
            .iter()
            .zip(&tags)
            .map(|(&u, tags)| Item {
                time: units[u]
                    .iter()
                    .map(|&i| snapshots[i].time)
                    .min()
                    .expect("a unit has a member"),
                tags,
            })
            .collect();
        let decisions = policy::apply(policy, &items, tz);
        let mut verdicts: Vec<Verdict> = Vec::new();
        for (&u, d) in unit_ids.iter().zip(decisions) {
            for &i in &units[u] {
                let m = &snapshots[i];
                verdicts.push(Verdict {
                    index: i,
                    id: m.id.to_hex(),
                    time: m.time,
                    source: m.source.clone(),
                    keep: d.keep,
                    reasons: d.reasons.clone(),
                    vm_backup: m.landmark.get(keys::VM_BACKUP).cloned(),
                });
            }
        }
        verdicts.sort_by(|a, b| a.time.cmp(&b.time).then(a.index.cmp(&b.index)));
        out.push(GroupVerdicts {
            group,
            snapshots: verdicts,
        });
    }
    out
}

/// The union of the tags of a unit's members.
fn unit_tags(snapshots: &[SnapshotMeta], members: &[usize]) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for &i in members {
        for t in &snapshots[i].tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ids::SnapshotId;
    use crate::format::snapshot::ReadMode;
    use crate::repo::policy::Count;

    fn meta(n: u8, hour: u32, source: &str, vm_backup: Option<&str>) -> SnapshotMeta {
        let id = SnapshotId([n; 16]);
        let mut landmark = BTreeMap::new();
        if let Some(vb) = vm_backup {
            landmark.insert(keys::VM_BACKUP.to_string(), vb.to_string());
            landmark.insert(keys::HOST.to_string(), "xs1:443".to_string());
            landmark.insert(keys::VM.to_string(), "vm-1".to_string());
        }
        SnapshotMeta {
            id,
            generation: 0,
            time: Utc.with_ymd_and_hms(2025, 1, 1, hour, 0, 0).unwrap(),
            hostname: "backup01".into(),
            source: source.into(),
            disk_size_bytes: 65536,
            block_size: 65536,
            parent: None,
            backup_set: id,
            tags: vec![],
            landmark,
            read_mode: ReadMode::All,
            new_set_reason: Some("first backup".into()),
        }
    }

    #[test]
    fn group_by_parses() {
        assert_eq!(
            GroupBy::parse("source,tags").unwrap(),
            GroupBy {
                source: true,
                host: false,
                tags: true
            }
        );
        assert_eq!(GroupBy::parse("").unwrap(), GroupBy::default());
        assert!(GroupBy::parse("paths").is_err());
    }

    #[test]
    fn each_source_keeps_its_own_history() {
        let snaps = vec![
            meta(1, 1, "file:/a", None),
            meta(2, 2, "file:/b", None),
            meta(3, 3, "file:/a", None),
            meta(4, 4, "file:/b", None),
        ];
        let policy = Policy {
            last: Some(Count::Last(1)),
            ..Policy::default()
        };
        let groups = decide(&snaps, &policy, GroupBy::BY_SOURCE, &Utc);
        assert_eq!(groups.len(), 2);
        let kept: Vec<&str> = groups
            .iter()
            .flat_map(|g| g.snapshots.iter())
            .filter(|v| v.keep)
            .map(|v| v.source.as_str())
            .collect();
        assert_eq!(kept, vec!["file:/a", "file:/b"]);
        // Grouped together, only the newest of all stays.
        let all = decide(&snaps, &policy, GroupBy::default(), &Utc);
        assert_eq!(all.len(), 1);
        let kept: Vec<usize> = all[0]
            .snapshots
            .iter()
            .filter(|v| v.keep)
            .map(|v| v.index)
            .collect();
        assert_eq!(kept, vec![3]);
    }

    #[test]
    fn a_vm_backup_is_kept_or_forgotten_whole() {
        // Two VM backups of two disks and metadata each; keep-last 1 keeps
        // the newer VM backup's three snapshots and none of the older's.
        let snaps = vec![
            meta(1, 1, "xen://xs1:443/vdi/d1", Some("vb1")),
            meta(2, 1, "xen://xs1:443/vdi/d2", Some("vb1")),
            meta(3, 1, "xen://xs1:443/vm/vm-1/metadata", Some("vb1")),
            meta(4, 2, "xen://xs1:443/vdi/d1", Some("vb2")),
            meta(5, 2, "xen://xs1:443/vdi/d2", Some("vb2")),
            meta(6, 2, "xen://xs1:443/vm/vm-1/metadata", Some("vb2")),
        ];
        let policy = Policy {
            last: Some(Count::Last(1)),
            ..Policy::default()
        };
        let groups = decide(&snaps, &policy, GroupBy::BY_SOURCE, &Utc);
        assert_eq!(groups.len(), 1, "{groups:?}");
        let g = &groups[0];
        assert_eq!(g.group, "source=xen://xs1:443/vm/vm-1");
        for v in &g.snapshots {
            assert_eq!(v.keep, v.vm_backup.as_deref() == Some("vb2"), "{v:?}");
        }
    }
}
