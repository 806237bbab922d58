//! `prune`: takes the exclusive lock (a shared one for `--dry-run`, which
//! only reads), runs the engine in repo::prune and says what changed.

use anyhow::{Context, Result};

use super::Outcome;
use crate::output::{human_bytes, Ui};
use crate::repo::prune::{self, PruneOptions, PruneReport};
use crate::repo::Repository;

pub fn run(ui: &Ui, repo: &Repository, options: &PruneOptions) -> Result<Outcome> {
    let _lock = repo.lock(!options.dry_run, "prune")?;
    let bar = ui.progress("prune", false);
    let report = prune::prune(repo, options, &bar).context("prune")?;
    bar.finish();
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
        "{} snapshot objects marked; {would}delete {} packs and repack {} packs{}",
        r.snapshot_objects,
        r.packs_deleted,
        r.packs_repacked,
        if r.dry_run {
            String::new()
        } else {
            format!(" into {} new packs", r.packs_written)
        }
    ));
    ui.info(format!(
        "{would}remove {}, {would}rewrite {}: {} reclaimed; {} unused blobs ({}) remain",
        human_bytes(r.bytes_deleted),
        human_bytes(r.bytes_rewritten),
        human_bytes(r.bytes_reclaimed),
        r.blobs_unused_remaining,
        human_bytes(r.bytes_unused_remaining)
    ));
    if r.packs_adopted > 0 {
        ui.info(format!(
            "{} packs without catalog rows held used blocks: adopted",
            r.packs_adopted
        ));
    }
    if r.tmp_files_removed > 0 {
        ui.info(format!(
            "removed {} old files from tmp/",
            r.tmp_files_removed
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
