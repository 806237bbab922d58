//! `repair packs`, `repair snapshots` and `repair tmp`: take the exclusive
//! lock, run the repair in repo::repair and say what changed (`repair
//! index` lives with `check`).

use anyhow::Result;

use super::Outcome;
use crate::output::{human_bytes, Ui};
use crate::repo::{repair, Repository};

/// Which repair to run (`repair index` is run by `check::repair_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairAction {
    /// Salvage damaged packs, or with `unreferenced` remove packs no
    /// snapshot references.
    Packs {
        unreferenced: bool,
    },
    Snapshots,
    Tmp,
}

pub fn run(ui: &Ui, repo: &Repository, action: RepairAction) -> Result<Outcome> {
    match action {
        RepairAction::Packs { unreferenced } => packs(ui, repo, unreferenced),
        RepairAction::Snapshots => snapshots(ui, repo),
        RepairAction::Tmp => tmp(ui, repo),
    }
}

fn packs(ui: &Ui, repo: &Repository, unreferenced: bool) -> Result<Outcome> {
    let _lock = repo.lock(true, "repair packs")?;
    let bar = ui.progress("packs", false);
    if unreferenced {
        let removed = repair::remove_unreferenced_packs(repo, &bar)?;
        bar.finish();
        let bytes: u64 = removed.iter().map(|r| r.1).sum();
        ui.summary(&serde_json::json!({
            "packs_removed": removed.iter().map(|r| &r.0).collect::<Vec<_>>(),
            "removed_bytes": bytes,
        }));
        ui.info(format!(
            "removed {} unreferenced packs ({})",
            removed.len(),
            human_bytes(bytes)
        ));
        return Ok(Outcome::Ok);
    }
    let repaired = repair::repair_packs(repo, &bar)?;
    bar.finish();
    ui.summary(&serde_json::json!({ "packs": repaired }));
    let mut dropped = 0;
    for r in &repaired {
        if let Some(why) = &r.skipped {
            ui.warn(format!("pack {} left as it is: {why}", r.pack));
            continue;
        }
        dropped += r.blocks_dropped.len();
        ui.info(format!(
            "pack {}: {} blocks salvaged{}, {} stored elsewhere, {} damaged blocks dropped",
            r.pack,
            r.blocks_salvaged,
            r.new_pack
                .as_ref()
                .map(|n| format!(" into pack {n}"))
                .unwrap_or_default(),
            r.blocks_elsewhere,
            r.blocks_dropped.len()
        ));
    }
    if dropped > 0 {
        ui.warn(format!(
            "{dropped} damaged blocks are in no pack now: snapshots naming them stay damaged until 'cbtvault backup --full' of their source stores them again ('cbtvault check' names them)"
        ));
    }
    if repaired.is_empty() {
        ui.info("no damaged packs are recorded (run 'cbtvault check --read-data' to find them)");
    }
    Ok(Outcome::Ok)
}

fn snapshots(ui: &Ui, repo: &Repository) -> Result<Outcome> {
    let _lock = repo.lock(true, "repair snapshots")?;
    let repaired = repair::repair_snapshots(repo)?;
    ui.summary(&serde_json::json!({ "snapshots": repaired }));
    let mut unrepaired = 0;
    for r in &repaired {
        match &r.rewritten_as {
            Some(object) => ui.info(format!(
                "snapshot {} ({}): parent {} is missing; rewritten as a full manifest (object {object}, tag 'repaired')",
                r.id, r.source, r.missing_parent
            )),
            None => {
                unrepaired += 1;
                ui.error(format!(
                    "snapshot {} ({}): parent {} is missing and {} blocks were known only to it; it cannot be repaired: back up the source with 'cbtvault backup --full'",
                    r.id, r.source, r.missing_parent, r.blocks_unknown
                ));
            }
        }
    }
    if repaired.is_empty() {
        ui.info("no snapshot has a missing parent");
    }
    Ok(if unrepaired > 0 {
        Outcome::IntegrityProblem
    } else {
        Outcome::Ok
    })
}

fn tmp(ui: &Ui, repo: &Repository) -> Result<Outcome> {
    let _lock = repo.lock(true, "repair tmp")?;
    let (files, bytes) = repair::clean_tmp(repo, repair::TMP_MIN_AGE)?;
    ui.summary(&serde_json::json!({ "files_removed": files, "removed_bytes": bytes }));
    ui.info(format!(
        "removed {files} temporary files ({}) older than {} minutes",
        human_bytes(bytes),
        repair::TMP_MIN_AGE.as_secs() / 60
    ));
    Ok(Outcome::Ok)
}
