//! Which VMs, and which of their disks, a job backs up: the job's
//! [`Selection`] applied to a pool's inventory. Pure: the inventory is read
//! from the host elsewhere.
//!
//! Every criterion the job gives must hold (uuids, names, tags, pool
//! hosts, power states); within one list, any entry will do. Then the
//! exclusions remove VMs (uuid, name, tag) and disks (VDI name or
//! userdevice, for VMs whose name matches). Templates, snapshots and the
//! control domain are never selected. A VM left with no disk is reported,
//! not backed up.

use serde::Serialize;

use super::config::{PowerState, Selection};

/// A VM name pattern: `*` any run of characters (`/` included), `?` one
/// character, `[abc]` / `[a-z]` / `[!a-z]` one of a set, `{a,b}` either.
/// Case-sensitive and anchored at both ends.
#[derive(Debug, Clone)]
pub struct NamePattern(globset::GlobMatcher);

impl NamePattern {
    pub fn new(pattern: &str) -> Result<NamePattern, String> {
        globset::GlobBuilder::new(pattern)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map(|g| NamePattern(g.compile_matcher()))
            .map_err(|e| e.kind().to_string())
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.is_match(name)
    }
}

/// One VM of a pool, as selection sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    /// The XenAPI reference (not shown to users).
    #[serde(skip)]
    pub reference: String,
    #[serde(rename = "vm_uuid")]
    pub uuid: String,
    pub name: String,
    pub tags: Vec<String>,
    pub power_state: String,
    /// The physical host it runs on (name_label), when running.
    pub resident_on: Option<String>,
    /// uuid of that host.
    #[serde(skip)]
    pub resident_on_uuid: Option<String>,
    pub disks: Vec<DiskInfo>,
    /// Templates, snapshots and the control domain are never selected.
    #[serde(skip)]
    pub backupable: bool,
}

/// A disk (a VBD of type Disk with its VDI) of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskInfo {
    pub vdi_uuid: String,
    pub name: String,
    pub userdevice: String,
    pub size_bytes: u64,
}

/// A VM the job backs up, and the disks it leaves out.
#[derive(Debug, Clone, Serialize)]
pub struct Selected {
    #[serde(flatten)]
    pub vm: VmInfo,
    pub excluded_disks: Vec<DiskInfo>,
}

impl Selected {
    /// The disks that will be backed up.
    pub fn disks(&self) -> impl Iterator<Item = &DiskInfo> {
        self.vm
            .disks
            .iter()
            .filter(|d| !self.excluded_disks.iter().any(|x| x.vdi_uuid == d.vdi_uuid))
    }
}

/// A VM the criteria matched but that is not backed up, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Passed {
    pub uuid: String,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SelectionResult {
    pub selected: Vec<Selected>,
    /// Matched, then excluded or left with no disk.
    pub passed: Vec<Passed>,
}

fn patterns(list: &[String]) -> Vec<NamePattern> {
    // Validated when the configuration was parsed; one that no longer
    // compiles matches nothing.
    list.iter()
        .filter_map(|p| NamePattern::new(p).ok())
        .collect()
}

fn power_state_of(vm: &VmInfo) -> Option<PowerState> {
    PowerState::parse(&vm.power_state)
}

/// Applies `selection` to `vms` (one pool's, or several), in name order.
pub fn select(selection: &Selection, vms: &[VmInfo]) -> SelectionResult {
    let names = patterns(&selection.names);
    let exclude_names = patterns(&selection.exclude_names);
    let mut out = SelectionResult::default();
    let mut sorted: Vec<&VmInfo> = vms.iter().filter(|v| v.backupable).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
    for vm in sorted {
        let uuid = vm.uuid.to_ascii_lowercase();
        let matched = selection.all
            || ((selection.vms.is_empty() || selection.vms.contains(&uuid))
                && (names.is_empty() || names.iter().any(|p| p.matches(&vm.name)))
                && (selection.tags.is_empty()
                    || selection.tags.iter().any(|t| vm.tags.contains(t)))
                && (selection.pool_hosts.is_empty()
                    || selection.pool_hosts.iter().any(|h| {
                        vm.resident_on.as_deref() == Some(h.as_str())
                            || vm
                                .resident_on_uuid
                                .as_deref()
                                .is_some_and(|u| u.eq_ignore_ascii_case(h))
                    }))
                && (selection.power_states.is_empty()
                    || power_state_of(vm).is_some_and(|p| selection.power_states.contains(&p))));
        if !matched {
            continue;
        }
        let pass = |reason: String| Passed {
            uuid: vm.uuid.clone(),
            name: vm.name.clone(),
            reason,
        };
        if selection.exclude_vms.contains(&uuid) {
            out.passed.push(pass("excluded by uuid".into()));
            continue;
        }
        if let Some(p) = selection
            .exclude_names
            .iter()
            .zip(&exclude_names)
            .find(|(_, p)| p.matches(&vm.name))
        {
            out.passed
                .push(pass(format!("excluded by name pattern '{}'", p.0)));
            continue;
        }
        if let Some(t) = selection.exclude_tags.iter().find(|t| vm.tags.contains(t)) {
            out.passed.push(pass(format!("excluded by tag '{t}'")));
            continue;
        }
        let mut excluded_disks = Vec::new();
        for rule in &selection.exclude_disks {
            let applies = match &rule.vm {
                None => true,
                Some(p) => NamePattern::new(p).is_ok_and(|p| p.matches(&vm.name)),
            };
            if !applies {
                continue;
            }
            let disk_names = patterns(&rule.names);
            for d in &vm.disks {
                let hit = rule.userdevices.contains(&d.userdevice)
                    || disk_names.iter().any(|p| p.matches(&d.name));
                if hit
                    && !excluded_disks
                        .iter()
                        .any(|x: &DiskInfo| x.vdi_uuid == d.vdi_uuid)
                {
                    excluded_disks.push(d.clone());
                }
            }
        }
        if vm.disks.is_empty() {
            out.passed.push(pass("has no disk".into()));
            continue;
        }
        if excluded_disks.len() == vm.disks.len() {
            out.passed
                .push(pass("every disk is excluded (exclude_disks)".into()));
            continue;
        }
        out.selected.push(Selected {
            vm: vm.clone(),
            excluded_disks,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::config::DiskExclusion;

    fn vm(name: &str, n: u8, tags: &[&str], state: &str, host: Option<&str>) -> VmInfo {
        VmInfo {
            reference: format!("OpaqueRef:{n}"),
            uuid: format!("00000000-0000-0000-0000-0000000000{n:02x}"),
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            power_state: state.into(),
            resident_on: host.map(String::from),
            resident_on_uuid: None,
            disks: (0..2)
                .map(|i| DiskInfo {
                    vdi_uuid: format!("vdi-{n}-{i}"),
                    name: format!("{name} disk {i}"),
                    userdevice: i.to_string(),
                    size_bytes: 1 << 30,
                })
                .collect(),
            backupable: true,
        }
    }

    fn pool() -> Vec<VmInfo> {
        let mut template = vm("template", 9, &["daily"], "Halted", None);
        template.backupable = false;
        vec![
            vm("web-01", 1, &["daily"], "Running", Some("host-a")),
            vm(
                "web-02",
                2,
                &["daily", "nobackup"],
                "Running",
                Some("host-b"),
            ),
            vm("db-01", 3, &["daily"], "Halted", None),
            vm("scratch", 4, &[], "Running", Some("host-a")),
            template,
        ]
    }

    fn names(r: &SelectionResult) -> Vec<&str> {
        r.selected.iter().map(|s| s.vm.name.as_str()).collect()
    }

    #[test]
    fn criteria_all_hold_and_any_entry_of_a_list_will_do() {
        let by_tag = Selection {
            tags: vec!["daily".into()],
            ..Selection::default()
        };
        // Sorted by name; the template is never selected.
        assert_eq!(
            names(&select(&by_tag, &pool())),
            ["db-01", "web-01", "web-02"]
        );
        let tag_and_running = Selection {
            power_states: vec![PowerState::Running],
            ..by_tag.clone()
        };
        assert_eq!(
            names(&select(&tag_and_running, &pool())),
            ["web-01", "web-02"]
        );
        let by_names = Selection {
            names: vec!["web-*".into(), "scr?tch".into()],
            pool_hosts: vec!["host-a".into()],
            ..Selection::default()
        };
        assert_eq!(names(&select(&by_names, &pool())), ["scratch", "web-01"]);
        let by_uuid = Selection {
            vms: vec!["00000000-0000-0000-0000-000000000003".into()],
            ..Selection::default()
        };
        assert_eq!(names(&select(&by_uuid, &pool())), ["db-01"]);
        let all = Selection {
            all: true,
            ..Selection::default()
        };
        assert_eq!(select(&all, &pool()).selected.len(), 4);
    }

    #[test]
    fn exclusions_say_why() {
        let s = Selection {
            tags: vec!["daily".into()],
            exclude_tags: vec!["nobackup".into()],
            exclude_names: vec!["db-*".into()],
            ..Selection::default()
        };
        let r = select(&s, &pool());
        assert_eq!(names(&r), ["web-01"]);
        let why: Vec<(&str, &str)> = r
            .passed
            .iter()
            .map(|p| (p.name.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                ("db-01", "excluded by name pattern 'db-*'"),
                ("web-02", "excluded by tag 'nobackup'")
            ]
        );
    }

    #[test]
    fn disks_are_excluded_per_vm_and_a_vm_without_disks_is_passed() {
        let s = Selection {
            all: true,
            exclude_disks: vec![
                DiskExclusion {
                    vm: Some("web-*".into()),
                    names: vec![],
                    userdevices: vec!["1".into()],
                },
                DiskExclusion {
                    vm: Some("db-01".into()),
                    names: vec!["db-01 disk *".into()],
                    userdevices: vec![],
                },
            ],
            ..Selection::default()
        };
        let r = select(&s, &pool());
        assert_eq!(names(&r), ["scratch", "web-01", "web-02"]);
        let web = &r.selected[1];
        let kept: Vec<&str> = web.disks().map(|d| d.userdevice.as_str()).collect();
        assert_eq!(kept, ["0"]);
        assert_eq!(r.selected[0].disks().count(), 2);
        assert_eq!(r.passed.len(), 1);
        assert_eq!(r.passed[0].name, "db-01");
        assert!(r.passed[0].reason.contains("every disk"));
    }

    #[test]
    fn patterns_cover_the_whole_name() {
        let p = NamePattern::new("web*").unwrap();
        assert!(p.matches("web") && p.matches("web/01") && !p.matches("a-web"));
        assert!(NamePattern::new("[a-").is_err());
    }
}
