//! `copy --from A --to B [SNAPSHOT...|--all]`.

use anyhow::{Context, Result};

use super::Outcome;
use crate::output::{human_bytes, Ui};
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
        "copied {} of {} snapshot(s) ({} already there): {} block(s) sent ({} raw, {} stored in {} pack(s)), {} block(s) already there ({}), in {:.2}s",
        report.copied_snapshot_ids.len(),
        report.copied_snapshot_ids.len() + report.present_snapshot_ids.len(),
        report.present_snapshot_ids.len(),
        report.blocks_sent,
        human_bytes(report.sent_raw_bytes),
        human_bytes(report.sent_stored_bytes),
        report.packs_written,
        report.blocks_skipped,
        human_bytes(report.skipped_raw_bytes),
        report.duration.as_secs_f64()
    ));
    Ok(Outcome::Ok)
}
