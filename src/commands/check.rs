//! `check` and `repair index`.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::Outcome;
use crate::cli::CheckArgs;
use crate::output::Ui;
use crate::repo::check::{self, DataSubset, Severity};
use crate::repo::Repository;

fn parse_subset(s: &str) -> Result<DataSubset> {
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .with_context(|| format!("'{s}' is not a percentage"))?;
        if !(p > 0.0 && p <= 100.0) {
            bail!("--read-data-subset '{s}': percentage must be in (0, 100]");
        }
        return Ok(DataSubset::Percent(p));
    }
    if let Some((n, t)) = s.split_once('/') {
        let n: u32 = n
            .trim()
            .parse()
            .with_context(|| format!("'{s}': n is not a number"))?;
        let t: u32 = t
            .trim()
            .parse()
            .with_context(|| format!("'{s}': t is not a number"))?;
        if n == 0 || t == 0 || n > t {
            bail!("--read-data-subset '{s}': need 1 <= n <= t");
        }
        return Ok(DataSubset::Part { n, t });
    }
    bail!("--read-data-subset '{s}': use N% or n/t")
}

pub fn run(ui: &Ui, repo: &Repository, args: &CheckArgs) -> Result<Outcome> {
    let subset = match (&args.read_data_subset, args.read_data) {
        (Some(s), _) => Some(parse_subset(s)?),
        (None, true) => Some(DataSubset::All),
        (None, false) => None,
    };
    let _lock = repo.lock(false, "check")?;
    let bar = ui.progress("check", subset.is_some());
    let report = check::run(repo, subset, &bar)?;
    bar.finish();
    ui.json(&report);
    for p in &report.problems {
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
    for a in &report.affected_snapshots {
        ui.error(format!(
            "snapshot {} ({} at {}) is damaged: {}",
            a.id, a.source, a.time, a.reason
        ));
    }
    ui.info(format!(
        "checked {} snapshots, {} packs{}",
        report.snapshots_checked,
        report.packs_checked,
        if subset.is_some() {
            format!(
                ", read {} packs and {} blocks",
                report.packs_read, report.blocks_read
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

pub fn repair_index(ui: &Ui, path: &Path) -> Result<Outcome> {
    // Opening rebuilds a missing catalog; rebuild again under an exclusive
    // lock so the result reflects every pack present now.
    let mut repo =
        Repository::open(path).with_context(|| format!("open repository '{}'", path.display()))?;
    let _lock = repo.lock(true, "repair index")?;
    let bar = ui.progress("index", false);
    let skipped = repo.rebuild_catalog(&bar)?;
    bar.finish();
    for (name, why) in &skipped {
        ui.warn(format!("pack {name} skipped: {why}"));
    }
    let (blocks, _, _) = repo.catalog().block_totals()?;
    let packs = repo.catalog().packs()?.len();
    let snapshots = repo.snapshots()?.len();
    ui.json(&serde_json::json!({
        "packs": packs, "blocks": blocks, "snapshots": snapshots,
        "packs_skipped": skipped.iter().map(|s| &s.0).collect::<Vec<_>>(),
    }));
    ui.info(format!(
        "catalog rebuilt: {packs} packs, {blocks} blocks, {snapshots} snapshots"
    ));
    Ok(Outcome::Ok)
}
