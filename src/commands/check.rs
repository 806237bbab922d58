//! `check` and `repair index`.

use anyhow::{Context, Result};

use super::Outcome;
use crate::output::{plural, Ui};
use crate::repo::check::{self, DataSubset, Severity};
use crate::repo::{Location, Repository};

/// Validated options of `check`.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Which packs to read and re-hash; `None` checks structure only.
    pub read_data: Option<DataSubset>,
}

pub fn run(ui: &Ui, repo: &Repository, options: &CheckOptions) -> Result<Outcome> {
    let subset = options.read_data;
    let _lock = repo.lock(false, "check")?;
    let bar = ui.progress("check", subset.is_some());
    let report = check::run(repo, subset, &bar)?;
    bar.finish();
    for line in repo.take_notices() {
        ui.warn(line);
    }
    ui.summary(&report);
    // With --json the summary lists them.
    let problems = if ui.json {
        &[][..]
    } else {
        &report.problems[..]
    };
    let affected = if ui.json {
        &[][..]
    } else {
        &report.affected_snapshots[..]
    };
    for p in problems {
        let fix = p
            .fix
            .as_ref()
            .map(|f| format!(" (fix: {f})"))
            .unwrap_or_default();
        match p.severity {
            Severity::Error => ui.error(format!("{}: {}{fix}", p.object, p.message)),
            Severity::Warning => ui.warn(format!("{}: {}{fix}", p.object, p.message)),
        }
    }
    for a in affected {
        ui.error(format!(
            "snapshot {} ({} at {}) is damaged: {}",
            a.id,
            a.source,
            crate::json::time(&a.time),
            a.reason
        ));
    }
    ui.info(format!(
        "checked {}, {}{}",
        plural(report.snapshots_checked, "snapshot"),
        plural(report.packs_checked, "pack"),
        if subset.is_some() {
            format!(
                ", read {} and {}",
                plural(report.packs_read, "pack"),
                plural(report.blocks_read, "block")
            )
        } else {
            String::new()
        }
    ));
    if report.has_errors() {
        ui.info("integrity problems found");
        Ok(Outcome::IntegrityProblem)
    } else {
        ui.info("no errors were found");
        Ok(Outcome::Ok)
    }
}

pub fn repair_index(
    ui: &Ui,
    location: &Location,
    options: &crate::repo::OpenOptions,
) -> Result<Outcome> {
    // Opening rebuilds a missing catalog; rebuild again under an exclusive
    // lock so the result reflects every pack present now.
    let mut repo = Repository::open_at(location, options)
        .with_context(|| format!("open repository '{location}'"))?;
    let _lock = repo.lock(true, "repair index")?;
    let bar = ui.progress("index", false);
    let skipped = repo.rebuild_catalog(&bar)?;
    bar.finish();
    if let Some((why, Some(aside))) = &repo.catalog_replaced {
        ui.warn(format!(
            "the catalog was damaged ({why}); kept as '{}' for diagnosis",
            aside.display()
        ));
    }
    for (name, why) in &skipped {
        ui.warn(format!("pack {name} skipped: {why}"));
    }
    let (blocks, _, _) = repo.catalog().block_totals()?;
    let packs = repo.catalog().packs()?.len();
    let snapshots = repo.snapshots()?.len();
    ui.summary(&serde_json::json!({
        "packs_indexed": packs, "blocks_indexed": blocks, "snapshots_found": snapshots,
        "packs_skipped": skipped.iter().map(|(name, why)| serde_json::json!({"pack": name, "reason": why})).collect::<Vec<_>>(),
    }));
    ui.info(format!(
        "catalog rebuilt: {}, {}, {}",
        plural(packs, "pack"),
        plural(blocks, "block"),
        plural(snapshots, "snapshot")
    ));
    Ok(Outcome::Ok)
}
