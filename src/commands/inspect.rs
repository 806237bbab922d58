//! `init`, `snapshots`, `cat`, `diff`, `stats`, `unlock`.

use std::path::Path;

use anyhow::Result;
use chrono::Utc;
use serde_json::json;

use super::Outcome;
use crate::format::bitmap;
use crate::format::snapshot::BlockRef;
use crate::manifest;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::{lock, InitOptions, Repository};

pub fn init(ui: &Ui, path: &Path, options: &InitOptions) -> Result<Outcome> {
    let config = Repository::init(path, options)?;
    ui.json(&json!({"id": config.id, "location": path.display().to_string()}));
    ui.info(format!(
        "created repository {} at '{}'",
        &config.id[..8],
        path.display()
    ));
    Ok(Outcome::Ok)
}

/// What `cat` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatOptions {
    Config,
    /// A snapshot (id or unique prefix).
    Snapshot(String),
}

pub fn cat(ui: &Ui, repo: &Repository, what: &CatOptions) -> Result<Outcome> {
    let value = match what {
        CatOptions::Config => serde_json::to_value(repo.config())?,
        CatOptions::Snapshot(id) => {
            let entry = repo.find_snapshot(id)?;
            let obj = repo.load_snapshot(&entry.object)?;
            let entries: Vec<_> = obj
                .entries
                .iter()
                .map(|(i, r)| match r {
                    BlockRef::Zero => json!({"index": i, "block": "zero"}),
                    BlockRef::Data(id) => json!({"index": i, "block": id.to_hex()}),
                })
                .collect();
            json!({
                "object": entry.object.to_hex(),
                "meta": obj.meta,
                "entries": entries,
                "bitmap": obj.bitmap.as_deref().map(bitmap::encode_base64),
            })
        }
    };
    // cat always prints JSON.
    ui.document(serde_json::to_string_pretty(&value)?);
    Ok(Outcome::Ok)
}

/// Runs of consecutive indices as (first, last).
fn ranges(indices: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == i => *last = i,
            _ => out.push((i, i)),
        }
    }
    out
}

/// The two snapshots `diff` compares (ids or unique prefixes).
#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub a: String,
    pub b: String,
    /// Compare snapshots of different sources.
    pub force: bool,
}

pub fn diff(ui: &Ui, repo: &Repository, a: &DiffOptions) -> Result<Outcome> {
    let sa = repo.find_snapshot(&a.a)?;
    let sb = repo.find_snapshot(&a.b)?;
    if sa.meta.source != sb.meta.source && !a.force {
        anyhow::bail!(
            "snapshots {} and {} are of different sources ('{}' and '{}'): their difference says nothing about either; --force compares them anyway",
            sa.meta.id.short(),
            sb.meta.id.short(),
            sa.meta.source,
            sb.meta.source
        );
    }
    let ma = repo.resolve(sa.meta.id)?;
    let mb = repo.resolve(sb.meta.id)?;
    let changes = manifest::diff(&ma, &mb);
    let rs = ranges(changes.iter().map(|c| c.index));
    let added = changes.iter().filter(|c| c.before.is_none()).count();
    let removed = changes.iter().filter(|c| c.after.is_none()).count();
    ui.json(&json!({
        "a": sa.meta.id, "b": sb.meta.id,
        "block_size": mb.block_size,
        "changed_blocks": changes.len(),
        "now_data": added, "now_zero": removed,
        "modified": changes.len() - added - removed,
        "size_a": ma.disk_size_bytes, "size_b": mb.disk_size_bytes,
        "ranges": rs,
    }));
    ui.print(format!(
        "{} differ between {} and {} ({} modified, {} became data, {} became zero)",
        plural(changes.len(), "block"),
        sa.meta.id.short(),
        sb.meta.id.short(),
        changes.len() - added - removed,
        added,
        removed
    ));
    if ma.disk_size_bytes != mb.disk_size_bytes {
        ui.print(format!(
            "disk size changed: {} -> {} bytes",
            ma.disk_size_bytes, mb.disk_size_bytes
        ));
    }
    for (first, last) in rs {
        if first == last {
            ui.print(format!("  block {first}"));
        } else {
            ui.print(format!("  blocks {first}-{last}"));
        }
    }
    Ok(Outcome::Ok)
}

pub fn stats(ui: &Ui, repo: &Repository) -> Result<Outcome> {
    let snaps = repo.snapshots()?;
    let logical: u64 = snaps.iter().map(|s| s.meta.disk_size_bytes).sum();
    let mut logical_data = 0u64;
    for s in &snaps {
        let map = repo.resolve(s.meta.id)?;
        logical_data += map
            .data
            .iter()
            .map(|(i, _)| map.span_of(*i) as u64)
            .sum::<u64>();
    }
    let (blocks, raw, stored_blobs) = repo.catalog().block_totals()?;
    let packs = repo.catalog().packs()?;
    let stored: u64 = packs.iter().map(|p| p.1).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let v = json!({
        "snapshots": snaps.len(),
        "logical_bytes": logical,
        "logical_data_bytes": logical_data,
        "unique_blocks": blocks,
        "unique_raw_bytes": raw,
        "stored_blob_bytes": stored_blobs,
        "stored_bytes": stored,
        "packs": packs.len(),
        "dedup_ratio": ratio(logical_data, raw),
        "compression_ratio": ratio(raw, stored_blobs),
        "total_ratio": ratio(logical, stored),
    });
    ui.json(&v);
    ui.print(format!("snapshots:           {}", snaps.len()));
    ui.print(format!(
        "logical size:        {} (non-zero {})",
        human_bytes(logical),
        human_bytes(logical_data)
    ));
    ui.print(format!(
        "unique blocks:       {blocks} ({})",
        human_bytes(raw)
    ));
    ui.print(format!(
        "stored:              {} in {}",
        human_bytes(stored),
        plural(packs.len(), "pack")
    ));
    ui.print(format!(
        "dedup ratio:         {:.2}x",
        ratio(logical_data, raw)
    ));
    ui.print(format!(
        "compression ratio:   {:.2}x",
        ratio(raw, stored_blobs)
    ));
    ui.print(format!(
        "logical / stored:    {:.2}x",
        ratio(logical, stored)
    ));
    Ok(Outcome::Ok)
}

#[derive(Debug, Clone, Default)]
pub struct UnlockOptions {
    /// Remove every lock, not only stale ones.
    pub remove_all: bool,
}

pub fn unlock(ui: &Ui, repo: &Repository, a: &UnlockOptions) -> Result<Outcome> {
    let now = Utc::now();
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for (name, info) in lock::list(repo.backend().as_ref())? {
        let why = match &info {
            Err(e) => Some(format!("unreadable ({e})")),
            Ok(i) => lock::stale_reason(i, now),
        };
        match (why, a.remove_all) {
            (Some(why), _) => {
                lock::remove(repo.backend().as_ref(), &name)?;
                ui.info(format!("removed stale lock {}: {why}", &name[..8]));
                removed.push(name);
            }
            (None, true) => {
                lock::remove(repo.backend().as_ref(), &name)?;
                ui.info(format!("removed lock {}", &name[..8]));
                removed.push(name);
            }
            (None, false) => {
                if let Ok(i) = &info {
                    ui.info(format!("kept {} (holder alive)", lock::describe(i)));
                }
                kept.push(name);
            }
        }
    }
    ui.json(&json!({"removed": removed, "kept": kept}));
    let held = if kept.is_empty() {
        String::new()
    } else {
        format!(" ({} kept: holder alive)", plural(kept.len(), "lock"))
    };
    let what = if a.remove_all { "lock" } else { "stale lock" };
    ui.info(if removed.is_empty() {
        format!("no {what}s{held}")
    } else {
        format!("removed {}{held}", plural(removed.len(), what))
    });
    Ok(Outcome::Ok)
}
