//! `forget`: removes snapshots named by id or not kept by a `--keep-*`
//! policy (repo::forget folds their changes into the snapshots layered on
//! them), then destroys on the XenServer hosts the landmarks only they
//! recorded (forget_host), then, with `--prune`, runs prune.
//!
//! The exclusive lock is held throughout (a shared one for `--dry-run`,
//! which writes nothing, here or on a host). The repository part is
//! committed before any host is asked: a host that cannot be reached
//! leaves landmarks behind (a warning naming them), never a snapshot that
//! restores differently.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result};
use serde::Serialize;

use super::backup::XenOptions;
use super::forget_host::{self, HostCleanup};
use super::forget_policy::{self, GroupBy, GroupVerdicts};
use super::{filtered, Outcome, SnapshotFilter};
use crate::format::snapshot::SnapshotMeta;
use crate::format::SnapshotId;
use crate::output::{plural, Ui};
use crate::repo::forget::{self, ForgetReport};
use crate::repo::policy::Policy;
use crate::repo::prune::{self, PruneOptions, PruneReport};
use crate::repo::{Repository, SnapshotEntry};
use crate::source::xenapi::landmarks::{self, Landmark};
use crate::source::xenapi::workflow::keys;

/// Which snapshots to forget.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Exactly these (ids or unique prefixes).
    Ids(Vec<String>),
    /// Those the policy does not keep, group by group.
    Policy { policy: Policy, group_by: GroupBy },
}

#[derive(Debug, Clone)]
pub struct ForgetOptions {
    pub selection: Selection,
    /// With a policy: the snapshots it is applied to.
    pub filter: SnapshotFilter,
    pub dry_run: bool,
    /// Run prune afterwards (its `dry_run` follows ours).
    pub prune: Option<PruneOptions>,
    /// Leave the hosts alone; list the landmarks left.
    pub no_host: bool,
    /// How to log in to a host (`xen` for any host not in `per_host`).
    pub xen: XenOptions,
    /// Per host (`HOST:PORT`, as landmarks name it): a job's hosts each
    /// with their own credentials.
    pub per_host: std::collections::BTreeMap<String, XenOptions>,
}

/// The host side in a dry run: what would be asked of each host.
#[derive(Debug, Clone, Serialize)]
struct HostPlan {
    /// Landmarks that would be destroyed if the host confirms each one.
    planned: Vec<Landmark>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    /// With a policy: every snapshot's verdict, by group.
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<&'a [GroupVerdicts]>,
    #[serde(flatten)]
    forget: &'a ForgetReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a HostCleanup>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_plan: Option<&'a HostPlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prune: Option<&'a PruneReport>,
}

pub fn run(ui: &Ui, repo: &Repository, options: &ForgetOptions) -> Result<Outcome> {
    let _lock = repo.lock(!options.dry_run, "forget")?;
    let live = repo.snapshots()?;

    // What goes.
    let (ids, groups) = match &options.selection {
        Selection::Ids(queries) => {
            let mut ids: Vec<SnapshotId> = Vec::new();
            for q in queries {
                let e = repo.find_snapshot(q)?;
                if !ids.contains(&e.meta.id) {
                    ids.push(e.meta.id);
                }
            }
            (ids, None)
        }
        Selection::Policy { policy, group_by } => {
            let selected = filtered(repo, &options.filter)?;
            let metas: Vec<SnapshotMeta> = selected.iter().map(|s| s.meta.clone()).collect();
            let groups = forget_policy::decide(&metas, policy, *group_by, &chrono::Local);
            let ids: Vec<SnapshotId> = groups
                .iter()
                .flat_map(|g| &g.snapshots)
                .filter(|v| !v.keep)
                .map(|v| metas[v.index].id)
                .collect();
            (ids, Some(groups))
        }
    };
    if let Some(groups) = &groups {
        say_verdicts(ui, groups);
    }
    warn_partial_vm_backups(ui, &live, &ids);

    let gone: HashSet<SnapshotId> = ids.iter().copied().collect();
    let (forgotten, remaining): (Vec<&SnapshotEntry>, Vec<&SnapshotEntry>) =
        live.iter().partition(|s| gone.contains(&s.meta.id));
    let forgotten: Vec<SnapshotMeta> = forgotten.into_iter().map(|s| s.meta.clone()).collect();
    let remaining: Vec<SnapshotMeta> = remaining.into_iter().map(|s| s.meta.clone()).collect();
    if !options.dry_run && !options.no_host {
        forget_host::preflight(&options.xen, &options.per_host, &forgotten, &remaining)?;
    }

    // The repository part.
    let report = if ids.is_empty() {
        ForgetReport {
            dry_run: options.dry_run,
            ..Default::default()
        }
    } else {
        let bar = ui.progress("forget", false);
        let r =
            forget::forget_with_progress(repo, &ids, options.dry_run, &bar).context("forget")?;
        bar.finish();
        r
    };
    say_forget(ui, &report);

    // The host part.
    let (host, host_plan) = if options.dry_run {
        let planned: Vec<Landmark> = landmarks::plan(&forgotten, &remaining)
            .into_values()
            .flatten()
            .collect();
        for l in &planned {
            ui.info(format!(
                "would destroy landmark {} of VDI {} on {} (if the host confirms it is a cbt_metadata snapshot of that VDI recorded by this repository)",
                l.landmark, l.vdi, l.host
            ));
        }
        (None, Some(HostPlan { planned }))
    } else {
        let cleanup = forget_host::clean_host(
            ui,
            &options.xen,
            &options.per_host,
            &repo.config().id,
            &forgotten,
            &remaining,
            options.no_host,
        )?;
        (Some(cleanup), None)
    };

    // Landmarks the host part should have destroyed but could not (host
    // not reached, destroy failed) need attention; `--no-host` leaves
    // them on purpose.
    let mut outcome = match &host {
        Some(c) if !options.no_host && c.undone() > 0 => Outcome::Warnings,
        _ => Outcome::Ok,
    };
    // Prune.
    let pruned = match &options.prune {
        Some(_) if options.dry_run => {
            ui.info("--prune with --dry-run: prune is not estimated (it would see the snapshots before this forget); run 'cbtvault prune --dry-run' after the forget");
            None
        }
        Some(p) => {
            let bar = ui.progress("prune", false);
            let r = prune::prune(repo, p, &bar).context("prune")?;
            bar.finish();
            super::prune::say(ui, &r);
            if !r.damaged.is_empty() {
                outcome = outcome.and(Outcome::IntegrityProblem);
            }
            Some(r)
        }
        None => None,
    };

    ui.summary(&Report {
        groups: groups.as_deref(),
        forget: &report,
        host: host.as_ref(),
        host_plan: host_plan.as_ref(),
        prune: pruned.as_ref(),
    });
    Ok(outcome)
}

fn say_verdicts(ui: &Ui, groups: &[GroupVerdicts]) {
    for g in groups {
        let keep = g.snapshots.iter().filter(|v| v.keep).count();
        ui.info(format!(
            "{}: keep {keep}, remove {}",
            if g.group.is_empty() {
                "all snapshots"
            } else {
                &g.group
            },
            g.snapshots.len() - keep
        ));
        let rows: Vec<Vec<String>> = g
            .snapshots
            .iter()
            .rev()
            .map(|v| {
                vec![
                    v.id.chars().take(8).collect(),
                    v.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                    if v.keep { "keep" } else { "remove" }.to_string(),
                    v.reasons.join(", "),
                ]
            })
            .collect();
        if !ui.quiet {
            ui.table(&["ID", "Time (UTC)", "Verdict", "Reasons"], &rows);
            ui.info("");
        }
    }
}

fn say_forget(ui: &Ui, r: &ForgetReport) {
    let would = if r.dry_run { "would " } else { "" };
    if r.removed.is_empty() {
        ui.info("no snapshot to remove");
        return;
    }
    for s in &r.removed {
        ui.info(format!(
            "{would}remove snapshot {} of {} ({})",
            s.id.short(),
            s.source,
            s.time.format("%Y-%m-%d %H:%M:%S")
        ));
    }
    for s in &r.rewritten {
        ui.info(format!(
            "{would}rewrite snapshot {} of {}: {} ({} -> {} entries, generation {} -> {})",
            s.id.short(),
            s.source,
            match (s.became_full, s.new_parent) {
                (true, _) | (_, None) => "becomes a full manifest".to_string(),
                (false, Some(p)) => format!("now layered on {}", p.short()),
            },
            s.entries_before,
            s.entries_after,
            s.old_generation,
            s.new_generation
        ));
    }
    ui.info(format!(
        "{}{} removed, {} rewritten{}; the data stays until 'cbtvault prune'",
        if r.dry_run { "dry run: " } else { "" },
        plural(r.removed.len(), "snapshot"),
        r.rewritten.len(),
        if r.old_generations_removed > 0 {
            format!(
                ", {} removed",
                plural(r.old_generations_removed, "older generation object")
            )
        } else {
            String::new()
        }
    ));
}

/// A VM backup (its disks and its metadata) forgotten in part can no
/// longer be restored as a VM (`restore --new-vm`): said for each one.
fn warn_partial_vm_backups(ui: &Ui, live: &[SnapshotEntry], ids: &[SnapshotId]) {
    let mut units: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for s in live {
        if let Some(vb) = s.meta.landmark.get(keys::VM_BACKUP) {
            let e = units.entry(vb.as_str()).or_default();
            e.0 += 1;
            if ids.contains(&s.meta.id) {
                e.1 += 1;
            }
        }
    }
    for (vb, (all, gone)) in units {
        if gone > 0 && gone < all {
            ui.warn(format!(
                "{gone} of the {all} snapshots of VM backup {vb} are forgotten: the rest restore disk by disk, but no longer as a VM (restore --new-vm)"
            ));
        }
    }
}
