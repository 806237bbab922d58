//! `backup SOURCE`: choose the parent, validate the change bitmap, run the
//! pipeline, report.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use super::Outcome;
use crate::cli::BackupArgs;
use crate::format::bitmap;
use crate::format::snapshot::{block_count, SnapshotObject};
use crate::manifest;
use crate::output::{human_bytes, Ui};
use crate::repo::backup::{self, BackupPlan, BackupSummary, ParentInfo, PipelineOptions};
use crate::repo::lock::hostname;
use crate::repo::Repository;
use crate::source::{BlockSource, FileSource};

/// Validated options of one backup.
pub struct BackupOptions {
    pub changed_blocks: Option<String>,
    pub parent: Option<String>,
    pub full: bool,
    pub full_every: Option<u32>,
    pub tags: Vec<String>,
}

impl BackupOptions {
    fn from_args(args: &BackupArgs) -> Result<Self> {
        let changed_blocks = match &args.changed_blocks {
            None => None,
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("read changed-block bitmap '{}'", p.display()))?,
            ),
        };
        if args.full && changed_blocks.is_some() {
            bail!("--full reads every block; it cannot be combined with --changed-blocks");
        }
        if args.full_every == Some(0) {
            bail!("--full-every must be at least 1");
        }
        Ok(BackupOptions {
            changed_blocks,
            parent: args.parent.clone(),
            full: args.full,
            full_every: args.full_every,
            tags: args.tags.clone(),
        })
    }
}

pub fn run(ui: &Ui, repo: &Repository, args: &BackupArgs) -> Result<Outcome> {
    let options = BackupOptions::from_args(args)?;
    let source = FileSource::open(&args.source)?;
    let _lock = repo.lock(false, "backup")?;
    let summary = backup_source(ui, repo, &source, &options)?;
    report(ui, &summary);
    Ok(Outcome::Ok)
}

/// Plans and runs one backup of any source. Shared by `backup` and `demo`.
pub(crate) fn backup_source(
    ui: &Ui,
    repo: &Repository,
    source: &dyn BlockSource,
    options: &BackupOptions,
) -> Result<BackupSummary> {
    let blocks = block_count(source.size_bytes(), repo.config().block_size);
    // Decode and check the bitmap before anything is written.
    let mut changed = match &options.changed_blocks {
        Some(text) => Some(bitmap::decode_base64(text, blocks).map_err(|reason| {
            anyhow::anyhow!(
                "changed-block bitmap rejected for '{}' ({} bytes, {blocks} blocks): {reason}; nothing was written",
                source.identity(),
                source.size_bytes()
            )
        })?),
        None => None,
    };

    let parent_entry = if options.full {
        None
    } else if let Some(query) = &options.parent {
        Some(repo.find_snapshot(query)?)
    } else {
        repo.snapshots()?
            .into_iter()
            .filter(|s| s.meta.source == source.identity())
            .last()
    };
    let mut new_set_reason = None;
    let parent = match parent_entry {
        None => {
            new_set_reason = Some(if options.full {
                "full backup requested (--full)".to_string()
            } else {
                "first backup of this source".to_string()
            });
            None
        }
        Some(entry) => {
            if entry.meta.block_size != repo.config().block_size {
                bail!("parent {} uses another block size", entry.meta.id);
            }
            let chain = repo
                .load_chain(entry.meta.id)
                .with_context(|| format!("load parent snapshot {}", entry.meta.id))?;
            let refs: Vec<&SnapshotObject> = chain.iter().collect();
            Some(ParentInfo {
                map: manifest::resolve(&refs),
                depth: chain.len() as u32 - 1,
                meta: entry.meta,
            })
        }
    };
    if parent.is_none() && changed.is_some() {
        ui.warn(format!(
            "no parent snapshot of '{}': a changed-block bitmap alone cannot describe the disk; reading every block",
            source.identity()
        ));
        changed = None;
    }
    let synthetic_full = match (&parent, options.full_every) {
        (Some(p), Some(n)) => p.depth + 1 >= n,
        _ => false,
    };
    if let Some(reason) = &new_set_reason {
        ui.info(format!("new backup set: {reason}"));
    }
    let plan = BackupPlan {
        parent,
        changed,
        synthetic_full,
        tags: options.tags.clone(),
        hostname: hostname(),
        landmark: BTreeMap::new(),
        new_set_reason,
    };
    let bar = ui.progress("backup", true);
    let summary = backup::run(repo, source, plan, &PipelineOptions::from_repo(repo), &bar)
        .with_context(|| format!("back up '{}'", source.identity()))?;
    bar.finish();
    Ok(summary)
}

pub(crate) fn report(ui: &Ui, s: &BackupSummary) {
    ui.json(s);
    let kind = if s.full {
        "full"
    } else if s.synthetic_full {
        "synthetic full"
    } else {
        "incremental"
    };
    ui.info(format!(
        "snapshot {} saved ({kind}{})",
        s.snapshot_id.short(),
        s.parent_id
            .map(|p| format!(", parent {}", p.short()))
            .unwrap_or_default()
    ));
    let rate = s.bytes_read as f64 / s.seconds.max(1e-9);
    ui.info(format!(
        "  read {} blocks ({}) in {:.2}s, {}/s: {} new, {} deduplicated, {} zero; stored {}",
        s.blocks_read,
        human_bytes(s.bytes_read),
        s.seconds,
        human_bytes(rate as u64),
        s.blocks_new,
        s.blocks_deduplicated,
        s.blocks_zero,
        human_bytes(s.bytes_stored)
    ));
}
