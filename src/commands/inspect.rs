//! `init`, `snapshots`, `cat`, `diff`, `stats`, `unlock`.

use anyhow::Result;
use chrono::Utc;
use serde::Serialize;
use serde_json::json;

use super::Outcome;
use crate::format::bitmap;
use crate::format::snapshot::{BlockRef, PAGE_BLOCKS};
use crate::manifest;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::manifests::LevelReader;
use crate::repo::{lock, Body, InitOptions, Location, Repository};

pub fn init(ui: &Ui, location: &Location, options: &InitOptions) -> Result<Outcome> {
    let (config, key) = Repository::init_at(location, options)?;
    ui.summary(&json!({
        "repository_id": config.id,
        "location": location.to_string(),
        "encrypted": key.is_some(),
        "key_id": key.map(|k| k.to_hex()),
    }));
    ui.info(format!(
        "created {}repository {} at '{location}'",
        if key.is_some() { "encrypted " } else { "" },
        &config.id[..8],
    ));
    if key.is_some() {
        ui.info(
            "keep the password safe: without it (or another key's) nothing in the repository can be read",
        );
    }
    Ok(Outcome::Ok)
}

/// What `cat` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatOptions {
    Config,
    /// A snapshot (id or unique prefix).
    Snapshot(String),
}

/// One manifest entry as `cat` prints it.
#[derive(Serialize)]
struct CatEntry {
    index: u64,
    /// `None`: an all-zero block.
    block_id: Option<String>,
}

/// `cat` always prints JSON lines: the object, then (a snapshot) one line
/// per manifest entry, streamed; with --json, a summary.
pub fn cat(ui: &Ui, repo: &Repository, what: &CatOptions) -> Result<Outcome> {
    match what {
        CatOptions::Config => {
            ui.document_lines("config", [json!({ "config": repo.config() })]);
            ui.summary(&json!({ "entries_printed": 0 }));
        }
        CatOptions::Snapshot(id) => {
            let entry = repo.find_snapshot(id)?;
            let obj = repo.load_snapshot(&entry.object)?;
            let pages: Vec<serde_json::Value> = match &obj.body {
                Body::Paged(t) => t
                    .rows
                    .iter()
                    .map(|r| json!({ "page_no": r.page_no, "entry_count": r.entry_count, "page_id": r.id.to_hex() }))
                    .collect(),
                Body::Inline { .. } => Vec::new(),
            };
            // The bitmap, assembled from the pages of a version 2 object (one
            // bit per block); the entries stream range by range below.
            let bitmap = match &obj.body {
                Body::Inline { bitmap, .. } => bitmap.clone(),
                Body::Paged(t) if t.has_bitmap => {
                    let blocks = obj.meta.block_count();
                    let mut bits = vec![0u8; bitmap::len_for(blocks) as usize];
                    let mut level = LevelReader::new(obj.clone());
                    let step = obj.range_blocks();
                    for r in 0..blocks.div_ceil(step) {
                        let part = level.range(repo, r * step, (r + 1) * step, true)?;
                        for k in part.bitmap.iter().flat_map(|b| bitmap::iter_set(b)) {
                            bitmap::set(&mut bits, r * step + k);
                        }
                    }
                    Some(bits)
                }
                Body::Paged(_) => None,
            };
            ui.document_lines(
                "snapshot_object",
                [json!({
                    "object": entry.object.to_hex(),
                    "snapshot_id": obj.meta.id,
                    "version": obj.version(),
                    "meta": obj.meta,
                    "entry_count": obj.entry_count(),
                    "bitmap": bitmap.as_deref().map(bitmap::encode_base64),
                    "pages": pages,
                })],
            );
            let step = obj.range_blocks();
            let blocks = obj.meta.block_count();
            let mut level = LevelReader::new(obj);
            let mut printed = 0u64;
            for r in 0..blocks.div_ceil(step) {
                let part = level.range(repo, r * step, (r + 1) * step, false)?;
                printed += part.entries.len() as u64;
                ui.document_lines(
                    "entry",
                    part.entries.iter().map(|(i, r)| CatEntry {
                        index: *i,
                        block_id: match r {
                            BlockRef::Zero => None,
                            BlockRef::Data(id) => Some(id.to_hex()),
                        },
                    }),
                );
            }
            ui.summary(&json!({ "entries_printed": printed }));
        }
    }
    Ok(Outcome::Ok)
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
    // Both chains range by range: memory holds one range of each.
    let mut ra = repo.chain_reader(sa.meta.id)?;
    let mut rb = repo.chain_reader(sb.meta.id)?;
    ra.survey(|_| {})?;
    rb.survey(|_| {})?;
    let step = PAGE_BLOCKS as u64;
    let mut touched: Vec<u64> = Vec::new();
    for r in [&ra, &rb] {
        let rbk = r.range_blocks();
        for &x in r.nonempty_ranges() {
            touched.extend(x * rbk / step..=(x * rbk + rbk - 1) / step);
        }
    }
    touched.sort_unstable();
    touched.dedup();
    let (mut changed, mut added, mut removed, mut range_count) = (0u64, 0u64, 0u64, 0u64);
    let mut run: Option<(u64, u64)> = None;
    let emit = |(first, last): (u64, u64)| {
        ui.item(
            "changed_range",
            &json!({ "first_block": first, "last_block": last }),
        );
        if first == last {
            ui.print(format!("  block {first}"));
        } else {
            ui.print(format!("  blocks {first}-{last}"));
        }
    };
    for q in touched {
        let (lo, hi) = (q * step, (q + 1) * step);
        let changes = manifest::diff_data(&ra.data_in(lo, hi)?, &rb.data_in(lo, hi)?);
        for c in changes {
            changed += 1;
            added += u64::from(c.before.is_none());
            removed += u64::from(c.after.is_none());
            run = match run {
                Some((first, last)) if last + 1 == c.index => Some((first, c.index)),
                Some(done) => {
                    emit(done);
                    range_count += 1;
                    Some((c.index, c.index))
                }
                None => Some((c.index, c.index)),
            };
        }
    }
    if let Some(done) = run {
        emit(done);
        range_count += 1;
    }
    let (size_a, size_b) = (ra.disk_size_bytes(), rb.disk_size_bytes());
    ui.summary(&json!({
        "from_snapshot_id": sa.meta.id, "to_snapshot_id": sb.meta.id,
        "block_size_bytes": rb.block_size(),
        "blocks_changed": changed,
        "blocks_now_data": added, "blocks_now_zero": removed,
        "blocks_modified": changed - added - removed,
        "from_disk_size_bytes": size_a, "to_disk_size_bytes": size_b,
        "range_count": range_count,
    }));
    ui.print(format!(
        "{} differ between {} and {} ({} modified, {} became data, {} became zero)",
        plural(changed, "block"),
        sa.meta.id.short(),
        sb.meta.id.short(),
        changed - added - removed,
        added,
        removed
    ));
    if size_a != size_b {
        ui.print(format!(
            "disk size changed: {} -> {} ({} -> {} bytes)",
            human_bytes(size_a),
            human_bytes(size_b),
            size_a,
            size_b
        ));
    }
    Ok(Outcome::Ok)
}

pub fn stats(ui: &Ui, repo: &Repository) -> Result<Outcome> {
    let snaps = repo.snapshots()?;
    let logical: u64 = snaps.iter().map(|s| s.meta.disk_size_bytes).sum();
    let mut logical_data = 0u64;
    for s in &snaps {
        let mut reader = repo.chain_reader(s.meta.id)?;
        let (disk, bs) = (reader.disk_size_bytes(), reader.block_size() as u64);
        reader.survey(|m| {
            logical_data += m
                .data
                .iter()
                .map(|(i, _)| bs.min(disk.saturating_sub(i * bs)))
                .sum::<u64>();
        })?;
    }
    let (blocks, raw, stored_blobs) = repo.catalog().block_totals()?;
    let packs = repo.catalog().packs()?;
    let stored: u64 = packs.iter().map(|p| p.1).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let v = json!({
        "snapshot_count": snaps.len(),
        "logical_bytes": logical,
        "logical_data_bytes": logical_data,
        "unique_blocks": blocks,
        "unique_raw_bytes": raw,
        "stored_blob_bytes": stored_blobs,
        "stored_bytes": stored,
        "pack_count": packs.len(),
        "dedup_ratio": ratio(logical_data, raw),
        "compression_ratio": ratio(raw, stored_blobs),
        "total_ratio": ratio(logical, stored),
    });
    ui.summary(&v);
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
    for (name, info) in lock::list(repo.backend().as_ref(), repo.codec())? {
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
    ui.summary(&json!({"locks_removed": removed, "locks_kept": kept}));
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
