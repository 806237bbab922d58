//! `tag`: adds, removes or sets the tags of snapshots named by id or
//! selected by filters, under the exclusive lock. Each snapshot whose tags
//! change is rewritten as a new generation (repo::tag); one whose tags
//! would not change is left alone.

use anyhow::{Context, Result};
use serde::Serialize;

use super::{filtered, Outcome, SnapshotFilter};
use crate::format::SnapshotId;
use crate::output::{plural, Ui};
use crate::repo::tag::{self, TagChange};
use crate::repo::Repository;

/// Which snapshots to re-tag.
#[derive(Debug, Clone)]
pub enum TagSelection {
    /// Exactly these (ids or unique prefixes).
    Ids(Vec<String>),
    /// Every snapshot the filter selects (it narrows something).
    Filter(SnapshotFilter),
}

#[derive(Debug, Clone)]
pub struct TagOptions {
    pub selection: TagSelection,
    pub change: TagChange,
}

#[derive(Serialize)]
struct Summary<'a> {
    snapshots_changed: usize,
    snapshot_ids: &'a [SnapshotId],
}

pub fn run(ui: &Ui, repo: &Repository, options: &TagOptions) -> Result<Outcome> {
    let _lock = repo.lock(true, "tag")?;
    let ids: Vec<SnapshotId> = match &options.selection {
        TagSelection::Ids(queries) => {
            let mut ids = Vec::new();
            for q in queries {
                let e = repo.find_snapshot(q)?;
                if !ids.contains(&e.meta.id) {
                    ids.push(e.meta.id);
                }
            }
            ids
        }
        TagSelection::Filter(f) => filtered(repo, f)?.iter().map(|s| s.meta.id).collect(),
    };
    let report = tag::retag(repo, &ids, &options.change).context("change tags")?;
    let changed: Vec<SnapshotId> = report.changed.iter().map(|r| r.id).collect();
    for r in &report.changed {
        ui.detail(
            1,
            format!(
                "snapshot {}: generation {} written",
                r.id.short(),
                r.new_generation
            ),
        );
        ui.info(format!(
            "snapshot {}: tags [{}] -> [{}]",
            r.id.short(),
            r.old_tags.join(", "),
            r.new_tags.join(", ")
        ));
    }
    ui.summary(&Summary {
        snapshots_changed: changed.len(),
        snapshot_ids: &changed,
    });
    let same = if report.unchanged.is_empty() {
        String::new()
    } else {
        format!(
            " ({} already as asked, left alone)",
            plural(report.unchanged.len(), "snapshot")
        )
    };
    ui.info(format!(
        "changed the tags of {}{same}",
        plural(changed.len(), "snapshot")
    ));
    Ok(Outcome::Ok)
}
