//! `prune`: removes what no snapshot object references. Marks every block
//! any snapshot object in `snapshots/` names (a SQLite TEMP table, never a
//! set in RAM), measures each pack's used and unused blob bytes, deletes
//! packs with no used blob, repacks (verbatim, after verifying) the packs
//! with the most unused bytes until the repository's unused share is within
//! `--max-unused`, and also adopts or removes packs without catalog rows and
//! reclaims old `tmp/` files. The caller holds the exclusive lock.
//!
//! spec: format-spec/06-ordering.md#prune, format-spec/05-locks.md

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use super::read::BlockReader;
use super::repair::{clean_tmp, TMP_MIN_AGE};
use super::{RepoError, Repository, INDEX_FLUSH_ENTRIES};
use crate::backend::Kind;
use crate::format::snapshot::BlockRef;
use crate::format::{BlockId, ObjectName, PageId};
use crate::pack::{CompressedBlock, PackWriter, Stored};
use crate::progress::Progress;
use crate::repo::Body;

/// Prune's own failures.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// What the object references is unknown, so nothing may be removed.
    #[error(
        "snapshot object {name} cannot be read ({reason}), so what it references is unknown; nothing removed (inspect or remove it, then prune again)"
    )]
    UnreadableSnapshot { name: String, reason: String },
    #[error("--max-unused '{value}': {why}")]
    BadMaxUnused { value: String, why: String },
}

/// How much unused blob data may stay (restic's `--max-unused`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxUnused {
    /// Percent of the repository's blob bytes after prune (0 <= p < 100).
    Percent(f64),
    /// An absolute number of bytes.
    Bytes(u64),
    /// Repack nothing; only delete packs with no used blob.
    Unlimited,
}

impl MaxUnused {
    /// Parses `10%`, `unlimited` or a number of bytes such as `0` (the
    /// command line also takes sizes with units, `500M`).
    pub fn parse(value: &str) -> Result<MaxUnused, PruneError> {
        let bad = |why: &str| PruneError::BadMaxUnused {
            value: value.to_string(),
            why: why.to_string(),
        };
        let v = value.trim();
        if v.eq_ignore_ascii_case("unlimited") {
            return Ok(MaxUnused::Unlimited);
        }
        if let Some(p) = v.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| bad("not a percentage such as 10%"))?;
            if !(0.0..100.0).contains(&p) {
                return Err(bad("a percentage must be at least 0% and below 100%"));
            }
            return Ok(MaxUnused::Percent(p));
        }
        v.parse()
            .map(MaxUnused::Bytes)
            .map_err(|_| bad("expected a percentage (10%), a number of bytes or 'unlimited'"))
    }
}

/// Options of `prune`.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub max_unused: MaxUnused,
    /// Report what would be done; write nothing.
    pub dry_run: bool,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            max_unused: MaxUnused::Percent(10.0),
            dry_run: false,
        }
    }
}

/// One pack's blob bytes, as prune measured them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackUsage {
    pub name: ObjectName,
    /// File size.
    pub size: u64,
    pub used_blobs: u64,
    pub used_bytes: u64,
    pub unused_blobs: u64,
    pub unused_bytes: u64,
}

/// What prune will do with each pack (indices into the usage slice).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// No used blob: the file goes.
    pub delete: Vec<usize>,
    /// Used blobs copied into new packs, then the file goes.
    pub repack: Vec<usize>,
}

/// Decides which packs to delete and repack: a pure function of the usage
/// numbers. Packs with no used blob are deleted. With a percentage `p`,
/// packs whose unused share exceeds `p` are repacked, highest share first,
/// until the unused bytes left are at most `p`% of the blob bytes left
/// (restic's rule); with an absolute limit, any pack with unused bytes is
/// a candidate until the unused bytes left are at most the limit.
pub fn plan(packs: &[PackUsage], max_unused: MaxUnused) -> Plan {
    let mut out = Plan::default();
    let mut used_total: u64 = 0;
    let mut unused_left: u64 = 0;
    let mut candidates = Vec::new();
    for (k, p) in packs.iter().enumerate() {
        if p.used_blobs == 0 {
            out.delete.push(k);
            continue;
        }
        used_total += p.used_bytes;
        unused_left += p.unused_bytes;
        if p.unused_bytes == 0 {
            continue;
        }
        let share = p.unused_bytes as f64 * 100.0 / (p.used_bytes + p.unused_bytes) as f64;
        let candidate = match max_unused {
            MaxUnused::Unlimited => false,
            MaxUnused::Bytes(_) => true,
            MaxUnused::Percent(limit) => share > limit,
        };
        if candidate {
            candidates.push((share, k));
        }
    }
    let allowed = match max_unused {
        MaxUnused::Unlimited => u64::MAX,
        MaxUnused::Bytes(b) => b,
        // unused <= p/100 * (used + unused)  <=>  unused <= p/(100-p) * used
        MaxUnused::Percent(p) => (p / (100.0 - p) * used_total as f64) as u64,
    };
    candidates.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(packs[b.1].unused_bytes.cmp(&packs[a.1].unused_bytes))
            .then(packs[a.1].name.cmp(&packs[b.1].name))
    });
    for (_, k) in candidates {
        if unused_left <= allowed {
            break;
        }
        unused_left -= packs[k].unused_bytes;
        out.repack.push(k);
    }
    out.repack.sort_unstable();
    out
}

/// A used blob that failed verification while being repacked: its pack is
/// kept and the copy recorded damaged.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedBlob {
    #[serde(rename = "block_id")]
    pub block: String,
    pub pack: String,
    pub reason: String,
}

/// What prune did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Serialize, Default)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshot_objects: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    /// Packs found in `data/` without catalog rows that hold used blobs.
    pub packs_adopted: u64,
    /// Old pack files removed (deleted and repacked).
    #[serde(rename = "deleted_bytes")]
    pub bytes_deleted: u64,
    /// New pack bytes written (an estimate in a dry run: the used blobs).
    #[serde(rename = "rewritten_bytes")]
    pub bytes_rewritten: u64,
    /// `bytes_deleted - bytes_rewritten`.
    #[serde(rename = "reclaimed_bytes")]
    pub bytes_reclaimed: u64,
    pub blobs_unused_remaining: u64,
    #[serde(rename = "unused_remaining_bytes")]
    pub bytes_unused_remaining: u64,
    pub tmp_files_removed: u64,
    /// Manifest pages no snapshot object names, removed (or, dry run, to
    /// remove).
    pub manifest_pages_removed: u64,
    /// Index objects replaced: they named removed packs, or were small
    /// and merged with others (spec: 08-index.md#writing).
    pub index_objects_rewritten: u64,
    /// Consolidated index objects written in their place.
    pub index_objects_written: u64,
    pub damaged: Vec<DamagedBlob>,
    /// Packs left as they are because their trailer cannot be read.
    pub unreadable_packs: Vec<String>,
    #[serde(
        rename = "duration_seconds",
        serialize_with = "crate::json::ms_as_seconds"
    )]
    pub duration_ms: u64,
}

/// Runs prune (spec: format-spec/06-ordering.md#prune). The caller holds
/// the exclusive lock (a shared one suffices for `dry_run`). Damaged used
/// blobs do not fail the call: they are in `damaged`, their packs kept.
pub fn prune(
    repo: &Repository,
    options: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport, RepoError> {
    if !options.dry_run {
        repo.ensure_exclusive_lock("prune")?;
    }
    let started = Instant::now();
    let mut report = PruneReport {
        dry_run: options.dry_run,
        ..Default::default()
    };
    let result = prune_marked(repo, options, progress, &mut report);
    let ended = repo.catalog().end_mark();
    result?;
    ended?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

fn prune_marked(
    repo: &Repository,
    options: &PruneOptions,
    progress: &dyn Progress,
    report: &mut PruneReport,
) -> Result<(), RepoError> {
    let backend = repo.backend();
    let (objects, pages) = mark(repo)?;
    report.snapshot_objects = objects;
    let unreferenced_pages: Vec<String> = backend
        .list(Kind::Page)?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.parse::<PageId>().is_ok_and(|id| !pages.contains(&id)))
        .collect();
    report.manifest_pages_removed = unreferenced_pages.len() as u64;
    #[cfg(debug_assertions)]
    super::test_delay("prune_marked");
    // Check points (a stop signal) up to the catalog transaction of step 2;
    // the removals after it are finished.
    crate::interrupt::check()?;

    // Usage of every pack in data/, adopting packs without rows that hold
    // used blobs (rows for a durable pack are always safe to add).
    let listed = backend.list(Kind::Pack)?;
    progress.set_message("measuring packs");
    progress.set_total(listed.len() as u64);
    let mut usage = Vec::new();
    // Per pack: the used blocks it holds a spare copy of (the catalog
    // locates another copy). Rare: killed backups, repacks cut short.
    let mut spares: Vec<Vec<BlockId>> = Vec::new();
    for (hex, size) in listed {
        crate::interrupt::check()?;
        progress.advance(1);
        let Ok(name) = hex.parse::<ObjectName>() else {
            continue;
        };
        let Ok(entries) = repo.read_pack_index(&hex, size) else {
            report.unreadable_packs.push(hex);
            continue;
        };
        let ids: Vec<_> = entries.iter().map(|e| e.block_id).collect();
        let needed = repo.catalog().needed_in_pack(&name, &ids)?;
        let mut u = PackUsage {
            name,
            size,
            used_blobs: 0,
            used_bytes: 0,
            unused_blobs: 0,
            unused_bytes: 0,
        };
        for (e, n) in entries.iter().zip(&needed) {
            if *n {
                u.used_blobs += 1;
                u.used_bytes += e.stored_length as u64;
            } else {
                u.unused_blobs += 1;
                u.unused_bytes += e.stored_length as u64;
            }
        }
        if u.used_blobs > 0 && !options.dry_run && !repo.catalog().has_pack(&name)? {
            repo.catalog().add_pack(&name, size, &entries)?;
            report.packs_adopted += 1;
        }
        let unneeded: Vec<BlockId> = ids
            .iter()
            .zip(&needed)
            .filter(|(_, n)| !**n)
            .map(|(id, _)| *id)
            .collect();
        let marked = repo.catalog().marked(&unneeded)?;
        spares.push(
            unneeded
                .into_iter()
                .zip(marked)
                .filter(|(_, m)| *m)
                .map(|(id, _)| id)
                .collect(),
        );
        usage.push(u);
    }

    let mut plan = plan(&usage, options.max_unused);
    let kept_unused = |skip: &HashSet<usize>| {
        usage
            .iter()
            .enumerate()
            .filter(|(k, _)| !skip.contains(k))
            .fold((0, 0), |(b, n), (_, u)| {
                (b + u.unused_bytes, n + u.unused_blobs)
            })
    };
    if options.dry_run {
        let gone: HashSet<usize> = plan.delete.iter().chain(&plan.repack).copied().collect();
        report.packs_deleted = plan.delete.len() as u64;
        report.packs_repacked = plan.repack.len() as u64;
        report.bytes_deleted = gone.iter().map(|&k| usage[k].size).sum();
        report.bytes_rewritten = plan.repack.iter().map(|&k| usage[k].used_bytes).sum();
        report.bytes_reclaimed = report.bytes_deleted.saturating_sub(report.bytes_rewritten);
        (report.bytes_unused_remaining, report.blobs_unused_remaining) = kept_unused(&gone);
        return Ok(());
    }

    // 0. A spare copy of a used block goes only once the copy the catalog
    // locates has been read and verified: a silently corrupt located copy
    // would otherwise take the only good one with it. The reader records a
    // damaged located copy and points the catalog at an intact spare; a
    // spare that became the located copy makes its pack one to repack, not
    // delete. A located copy that cannot be verified at all leaves the
    // pack of its spare alone this time.
    progress.set_message("verifying spare copies");
    let doomed: Vec<usize> = plan.delete.iter().chain(&plan.repack).copied().collect();
    let (mut leave, mut now_needed) = (Vec::new(), Vec::new());
    for &k in &doomed {
        if spares[k].is_empty() {
            continue;
        }
        let mut failed = false;
        for chunk in spares[k].chunks(256) {
            let wanted: Vec<(u64, BlockId)> = chunk.iter().map(|id| (0, *id)).collect();
            let reader = BlockReader::new(repo);
            let located = reader.locate(&wanted)?;
            for (l, r) in located.iter().zip(reader.read(&located)) {
                if let Err(e) = r {
                    report.damaged.push(DamagedBlob {
                        block: l.block.to_hex(),
                        pack: l.location.map(|x| x.pack.to_hex()).unwrap_or_default(),
                        reason: format!(
                            "{e}; pack {} (a spare copy) is left as it is",
                            usage[k].name.to_hex()
                        ),
                    });
                    failed = true;
                }
            }
        }
        if failed {
            leave.push(k);
        } else if repo
            .catalog()
            .needed_in_pack(&usage[k].name, &spares[k])?
            .contains(&true)
        {
            now_needed.push(k);
        }
    }
    plan.delete
        .retain(|k| !leave.contains(k) && !now_needed.contains(k));
    plan.repack.retain(|k| !leave.contains(k));
    for k in now_needed {
        if !plan.repack.contains(&k) {
            plan.repack.push(k);
        }
    }

    // 1. Repack: used blobs, verified, copied verbatim into new durable packs.
    progress.set_message("repacking");
    progress.set_total(plan.repack.len() as u64);
    let target = repo.config().pack_size_target_bytes.max(1 << 20);
    let mut written: Vec<(ObjectName, u64)> = Vec::new();
    let mut writer = PackWriter::new(target, repo.codec());
    let mut repacked = Vec::new();
    for &k in &plan.repack {
        crate::interrupt::check()?;
        progress.advance(1);
        let pack = usage[k].name;
        let hex = pack.to_hex();
        let bytes = backend.load(Kind::Pack, &hex)?;
        let Ok(verified) = BlockReader::new(repo).verify_pack(pack, &bytes) else {
            // The trailer read before no longer decodes: leave the pack.
            report.unreadable_packs.push(hex);
            continue;
        };
        let ids: Vec<_> = verified.iter().map(|(e, _)| e.block_id).collect();
        let needed = repo.catalog().needed_in_pack(&pack, &ids)?;
        let mut bad = false;
        for ((e, verdict), n) in verified.iter().zip(&needed) {
            if let (true, Err(err)) = (*n, verdict) {
                repo.mark_damaged(&e.block_id, &pack, &err.to_string())?;
                report.damaged.push(DamagedBlob {
                    block: e.block_id.to_hex(),
                    pack: hex.clone(),
                    reason: err.to_string(),
                });
                bad = true;
            }
        }
        if bad {
            // Never lose a block: the pack stays as it is.
            continue;
        }
        for ((e, _), n) in verified.iter().zip(&needed) {
            if !*n {
                continue;
            }
            let frame = &bytes[e.offset as usize..(e.offset + e.stored_length as u64) as usize];
            writer.add(&CompressedBlock {
                id: e.block_id,
                raw_length: e.raw_length,
                stored: Stored::Verbatim(frame.to_vec()),
            })?;
            if writer.is_full() {
                let full = std::mem::replace(&mut writer, PackWriter::new(target, repo.codec()));
                written.push(write_pack(repo, full)?);
            }
        }
        repacked.push(k);
    }
    if !writer.is_empty() {
        written.push(write_pack(repo, writer)?);
    }
    #[cfg(debug_assertions)]
    super::test_kill("prune_repacked");

    // 2. One transaction: old packs' rows out, new packs' rows in.
    let gone: Vec<usize> = plan.delete.iter().chain(&repacked).copied().collect();
    crate::interrupt::check()?;
    repo.ensure_lock_held()?;
    let mut indexed = Vec::new();
    repo.catalog().batch(|cat| -> Result<(), RepoError> {
        for &k in &gone {
            cat.remove_pack(&usage[k].name)?;
        }
        for (name, size) in &written {
            let listing = repo.read_pack_listing(&name.to_hex(), *size)?;
            cat.add_pack(name, *size, &listing.entries)?;
            let trailer_format = listing.trailer_format();
            indexed.push(crate::format::index::IndexedPack {
                name: *name,
                size_bytes: *size,
                entries: listing.entries,
                trailer_format,
            });
        }
        Ok(())
    })?;
    // The new packs' index object, before any old pack goes.
    repo.write_index(indexed)?;
    #[cfg(debug_assertions)]
    super::test_kill("prune_committed");

    // 3. Old files removed, then 4. their damaged rows.
    let new_names: HashSet<ObjectName> = written.iter().map(|w| w.0).collect();
    progress.set_message("removing packs");
    progress.set_total(gone.len() as u64);
    for &k in &gone {
        progress.advance(1);
        let u = &usage[k];
        if new_names.contains(&u.name) {
            // Repacking wrote the same bytes again: the file is the new pack.
            continue;
        }
        repo.ensure_lock_held()?;
        match backend.remove(Kind::Pack, &u.name.to_hex()) {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
        report.bytes_deleted += u.size;
        #[cfg(debug_assertions)]
        super::test_kill("prune_removed");
    }
    for &k in &gone {
        repo.catalog().forget_damage_of_pack(&usage[k].name)?;
    }
    // 5. Index objects naming removed packs, and small ones, consolidated
    // (spec: 08-index.md#writing).
    (report.index_objects_rewritten, report.index_objects_written) = prune_index_objects(repo)?;
    report.packs_deleted = plan.delete.len() as u64;
    report.packs_repacked = repacked.len() as u64;
    report.packs_written = written.len() as u64;
    report.bytes_rewritten = written.iter().map(|w| w.1).sum();
    report.bytes_reclaimed = report.bytes_deleted.saturating_sub(report.bytes_rewritten);
    let gone: HashSet<usize> = gone.into_iter().collect();
    (report.bytes_unused_remaining, report.blobs_unused_remaining) = kept_unused(&gone);
    report.tmp_files_removed = clean_tmp(repo, TMP_MIN_AGE)?.0;
    // 8. Manifest pages no snapshot object names (spec: 06-ordering.md#prune).
    for name in &unreferenced_pages {
        match backend.remove(Kind::Page, name) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Marks every block any snapshot object in `snapshots/` names, one object
/// (and one manifest page) at a time; returns how many objects were read
/// and the manifest pages they name.
fn mark(repo: &Repository) -> Result<(u64, HashSet<PageId>), RepoError> {
    repo.catalog().begin_mark()?;
    let mut objects = 0;
    let mut pages = HashSet::new();
    for (name, _) in repo.backend().list(Kind::Snapshot)? {
        let Ok(object) = name.parse::<ObjectName>() else {
            continue;
        };
        let obj = repo.load_snapshot(&object).map_err(|e| {
            RepoError::from(PruneError::UnreadableSnapshot {
                name: name.clone(),
                reason: e.to_string(),
            })
        })?;
        let unreadable = |e: RepoError| {
            RepoError::from(PruneError::UnreadableSnapshot {
                name: name.clone(),
                reason: e.to_string(),
            })
        };
        let data = |entries: &[(u64, BlockRef)]| -> Vec<BlockId> {
            entries
                .iter()
                .filter_map(|(_, r)| match r {
                    BlockRef::Data(id) => Some(*id),
                    BlockRef::Zero => None,
                })
                .collect()
        };
        match &obj.body {
            Body::Inline { entries, .. } => repo.catalog().mark_used(data(entries).iter())?,
            Body::Paged(table) => {
                for row in &table.rows {
                    let page = repo.load_page(row, table, &obj.meta).map_err(unreadable)?;
                    repo.catalog().mark_used(data(&page.entries).iter())?;
                    pages.insert(row.id);
                }
            }
        }
        objects += 1;
    }
    Ok((objects, pages))
}

/// Rewrites every index object that names a pack no longer in `data/`:
/// the packs still present go into a new index object first, then the old
/// one is removed (nothing is written when none is left). A damaged index
/// object is left for `check` to report. Returns how many were replaced.
/// Index objects with fewer entries than this are merged by prune.
const INDEX_SMALL_ENTRIES: usize = INDEX_FLUSH_ENTRIES / 2;

fn prune_index_objects(repo: &Repository) -> Result<(u64, u64), RepoError> {
    use crate::format::index::IndexedPack;
    let present: HashMap<ObjectName, u64> = repo
        .backend()
        .list(Kind::Pack)?
        .into_iter()
        .filter_map(|(n, size)| n.parse().ok().map(|n| (n, size)))
        .collect();
    // The objects to merge, and the packs they name that remain (each
    // once), written out whenever a full object's worth has gathered so
    // memory stays bounded by one object.
    let mut old: Vec<String> = Vec::new();
    let mut stale = false;
    let mut merged: Vec<IndexedPack> = Vec::new();
    let mut merged_entries = 0;
    let mut taken: HashSet<ObjectName> = HashSet::new();
    let mut written: Vec<ObjectName> = Vec::new();
    for (hex, _) in repo.backend().list(Kind::Index)? {
        crate::interrupt::check()?;
        let Ok(name) = hex.parse::<ObjectName>() else {
            continue;
        };
        // Missing since the listing, or damaged: left alone.
        let Some(Ok(packs)) = repo.load_index(&name)? else {
            continue;
        };
        let names_removed = packs
            .iter()
            .any(|p| present.get(&p.name) != Some(&p.size_bytes));
        let entries: usize = packs.iter().map(|p| p.entries.len()).sum();
        if !names_removed && entries >= INDEX_SMALL_ENTRIES {
            continue;
        }
        stale |= names_removed;
        old.push(hex);
        for p in packs {
            if present.get(&p.name) == Some(&p.size_bytes) && taken.insert(p.name) {
                merged_entries += p.entries.len();
                merged.push(p);
            }
        }
        // Only merges write this early: a lone small object never reaches
        // a full object's worth of entries.
        if merged_entries >= INDEX_FLUSH_ENTRIES {
            let part = std::mem::take(&mut merged);
            merged_entries = 0;
            written.extend(repo.write_index_split(part, INDEX_FLUSH_ENTRIES)?);
        }
    }
    // One small object naming no removed pack gains nothing by a rewrite.
    if old.is_empty() || (old.len() == 1 && !stale) {
        return Ok((0, 0));
    }
    if !merged.is_empty() {
        written.extend(repo.write_index_split(merged, INDEX_FLUSH_ENTRIES)?);
    }
    #[cfg(debug_assertions)]
    super::test_kill("prune_index_written");
    let written_set: HashSet<String> = written.iter().map(|n| n.to_hex()).collect();
    for hex in &old {
        // Merging may reproduce an old object's exact bytes (and name).
        if written_set.contains(hex) {
            continue;
        }
        repo.ensure_lock_held()?;
        match repo.backend().remove(Kind::Index, hex) {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
    }
    let replaced = old.iter().filter(|h| !written_set.contains(*h)).count();
    Ok((replaced as u64, written.len() as u64))
}

/// Makes one new pack durable; returns its name and size.
fn write_pack(repo: &Repository, writer: PackWriter) -> Result<(ObjectName, u64), RepoError> {
    let done = writer.finish()?;
    repo.ensure_lock_held()?;
    let mut object = repo.backend().create(Kind::Pack)?;
    object.append(done.tail.bytes())?;
    object.commit(&done.name.to_hex())?;
    Ok((done.name, done.size_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(n: u8, used: u64, unused: u64) -> PackUsage {
        PackUsage {
            name: ObjectName([n; 32]),
            size: used + unused + 100,
            used_blobs: used.div_ceil(10),
            used_bytes: used,
            unused_blobs: unused.div_ceil(10),
            unused_bytes: unused,
        }
    }

    #[test]
    fn parse_max_unused() {
        assert_eq!(MaxUnused::parse("10%").unwrap(), MaxUnused::Percent(10.0));
        assert_eq!(MaxUnused::parse("0").unwrap(), MaxUnused::Bytes(0));
        assert_eq!(MaxUnused::parse("0%").unwrap(), MaxUnused::Percent(0.0));
        assert_eq!(MaxUnused::parse("unlimited").unwrap(), MaxUnused::Unlimited);
        assert_eq!(MaxUnused::parse("2048").unwrap(), MaxUnused::Bytes(2048));
        for bad in ["100%", "-1%", "x", "", "12Q", "99999999999999999999"] {
            assert!(
                matches!(MaxUnused::parse(bad), Err(PruneError::BadMaxUnused { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn packs_without_used_blobs_are_deleted_whatever_the_limit() {
        let packs = [pack(1, 0, 500), pack(2, 500, 0), pack(3, 0, 10)];
        for m in [
            MaxUnused::Unlimited,
            MaxUnused::Percent(50.0),
            MaxUnused::Bytes(0),
        ] {
            let p = plan(&packs, m);
            assert_eq!(p.delete, vec![0, 2], "{m:?}");
            assert!(p.repack.is_empty(), "{m:?}");
        }
    }

    #[test]
    fn zero_repacks_every_pack_with_unused_bytes() {
        let packs = [pack(1, 900, 100), pack(2, 1000, 0), pack(3, 10, 1)];
        assert_eq!(plan(&packs, MaxUnused::Bytes(0)).repack, vec![0, 2]);
        assert_eq!(plan(&packs, MaxUnused::Percent(0.0)).repack, vec![0, 2]);
    }

    #[test]
    fn percent_repacks_highest_share_first_until_within_limit() {
        // used 3000, unused 1500: 10% allows 333 unused.
        let packs = [
            pack(1, 500, 500), // 50%
            pack(2, 900, 100), // 10%: not above the limit, never a candidate
            pack(3, 200, 800), // 80%
            pack(4, 1400, 100),
        ];
        let p = plan(&packs, MaxUnused::Percent(10.0));
        // 80% first (unused left 700), then 50% (left 200 <= 333): stop.
        assert_eq!(p.repack, vec![0, 2]);
        // 40% allows 2000 unused: nothing to do.
        assert!(plan(&packs, MaxUnused::Percent(40.0)).repack.is_empty());
        // 25% allows 1000: only the 80% pack.
        assert_eq!(plan(&packs, MaxUnused::Percent(25.0)).repack, vec![2]);
        assert!(plan(&packs, MaxUnused::Unlimited).repack.is_empty());
    }

    #[test]
    fn absolute_limit_counts_bytes() {
        let packs = [pack(1, 500, 500), pack(2, 900, 100), pack(3, 200, 800)];
        assert_eq!(plan(&packs, MaxUnused::Bytes(700)).repack, vec![2]);
        assert_eq!(plan(&packs, MaxUnused::Bytes(100)).repack, vec![0, 2]);
        assert_eq!(plan(&packs, MaxUnused::Bytes(99)).repack, vec![0, 1, 2]);
        assert!(plan(&packs, MaxUnused::Bytes(1400)).repack.is_empty());
    }
}
