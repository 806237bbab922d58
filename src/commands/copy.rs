//! `copy --from A --to B [SNAPSHOT...|--all]`.

use anyhow::{Context, Result};

use super::Outcome;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::{copy, Repository};

pub fn run(
    ui: &Ui,
    from: &Repository,
    to: &Repository,
    queries: &[String],
    all: bool,
) -> Result<Outcome> {
    let _from_lock = from.lock(false, "copy")?;
    let _to_lock = to.lock(false, "copy")?;
    let ids = copy::select(from, queries, all)?;
    let bar = ui.progress("copy", false);
    let report = copy::copy(from, to, &ids, &bar).with_context(|| {
        format!(
            "copy from '{}' to '{}' (run it again to resume)",
            from.location(),
            to.location()
        )
    })?;
    bar.finish();
    ui.summary(&report);
    ui.info(format!(
        "copied {} of {} ({} already there): {} sent ({} raw, {} stored in {}), {} already there ({}), in {:.2}s",
        report.copied_snapshot_ids.len(),
        plural(
            report.copied_snapshot_ids.len() + report.present_snapshot_ids.len(),
            "snapshot"
        ),
        report.present_snapshot_ids.len(),
        plural(report.blocks_sent, "block"),
        human_bytes(report.sent_raw_bytes),
        human_bytes(report.sent_stored_bytes),
        plural(report.packs_written, "pack"),
        plural(report.blocks_skipped, "block"),
        human_bytes(report.skipped_raw_bytes),
        report.duration.as_secs_f64()
    ));
    Ok(Outcome::Ok)
}
