//! `prune`: takes the exclusive lock (a shared one for `--dry-run`, which
//! only reads), runs the engine in repo::prune and says what changed.

use anyhow::{Context, Result};

use super::Outcome;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::prune::{self, PruneOptions, PruneReport};
use crate::repo::Repository;

pub fn run(ui: &Ui, repo: &Repository, options: &PruneOptions) -> Result<Outcome> {
    let _lock = repo.lock(!options.dry_run, "prune")?;
    ui.detail(
        1,
        format!(
            "prune: {} lock, unused data tolerated: {}",
            if options.dry_run {
                "shared"
            } else {
                "exclusive"
            },
            match options.max_unused {
                prune::MaxUnused::Percent(p) => format!("{p}%"),
                prune::MaxUnused::Bytes(b) => human_bytes(b),
                prune::MaxUnused::Unlimited => "unlimited".to_string(),
            }
        ),
    );
    let bar = ui.progress("prune", false);
    let report = prune::prune(repo, options, &bar).context("prune")?;
    bar.finish();
    ui.detail(
        1,
        format!(
            "prune: {} marked, {} unused ({}) remain, {} removed from tmp/, took {:.2}s",
            plural(report.snapshot_objects, "snapshot object"),
            plural(report.blobs_unused_remaining, "block"),
            human_bytes(report.bytes_unused_remaining),
            plural(report.tmp_files_removed, "file"),
            report.duration_ms as f64 / 1000.0
        ),
    );
    ui.summary(&report);
    say(ui, &report);
    Ok(if report.damaged.is_empty() {
        Outcome::Ok
    } else {
        Outcome::IntegrityProblem
    })
}

pub(crate) fn say(ui: &Ui, r: &PruneReport) {
    let would = if r.dry_run { "would " } else { "" };
    ui.info(format!(
        "{} marked; {would}delete {} and repack {}{}",
        plural(r.snapshot_objects, "snapshot object"),
        plural(r.packs_deleted, "pack"),
        plural(r.packs_repacked, "pack"),
        if r.dry_run {
            String::new()
        } else {
            format!(" into {}", plural(r.packs_written, "new pack"))
        }
    ));
    ui.info(format!(
        "{would}remove {}, {would}rewrite {}: {} reclaimed; {} ({}) remain",
        human_bytes(r.bytes_deleted),
        human_bytes(r.bytes_rewritten),
        human_bytes(r.bytes_reclaimed),
        plural(r.blobs_unused_remaining, "unused block"),
        human_bytes(r.bytes_unused_remaining)
    ));
    if r.packs_adopted > 0 {
        ui.info(format!(
            "{} without catalog rows held used blocks: adopted",
            plural(r.packs_adopted, "pack")
        ));
    }
    if r.tmp_files_removed > 0 {
        ui.info(format!(
            "removed {} from tmp/",
            plural(r.tmp_files_removed, "old file")
        ));
    }
    for p in &r.unreadable_packs {
        ui.warn(format!(
            "pack {p}: trailer cannot be read; left as it is (run 'cbtvault check')"
        ));
    }
    for d in &r.damaged {
        ui.error(format!(
            "block {} in pack {} is damaged ({}): the pack was kept and the copy recorded damaged; run 'cbtvault check --read-data' and 'cbtvault repair packs'",
            d.block, d.pack, d.reason
        ));
    }
}
