//! Forgetting snapshots: removes a given set of snapshot ids and folds the
//! delta of each forgotten parent into its kept children, so no chain is
//! ever broken and every kept snapshot resolves exactly as before
//! (spec: format-spec/03-snapshot.md#identity, 06-ordering.md#rewrite).
//! Which snapshots to forget is the policy's business (`repo::policy`);
//! blocks are left for prune.
//!
//! The fold itself ([`plan_folds`]) goes range by range and verifies every
//! range of every replacement (the new chain must resolve it to the old
//! content) before any snapshot object is written or removed; only the
//! replacements' manifest pages are written while planning, and nothing
//! names them until the replacement is committed. [`forget`] then writes in the crash-safe order:
//! every replacement durable, then the older generations of the rewritten
//! ids, then every object of the forgotten ids (oldest generation first, so
//! an interrupted run never lets an old generation become live again).
//!
//! A folded object keeps its change bitmap: it still records what the
//! source reported when the backup ran (the subset rule does not hold for
//! a rewritten object, 03-snapshot.md#bitmap).

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::manifests::LevelReader;
use super::{Body, ChainReader, PageWriter, RepoError, Repository, Snapshot};
use crate::backend::Kind;
use crate::format::snapshot::BlockRef;
use crate::format::{ObjectName, SnapshotId};
use crate::manifest;
use crate::progress::{NoProgress, Progress};

/// Why a fold could not be planned; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("snapshot {child}: parent {parent} is not available")]
    MissingParent {
        child: SnapshotId,
        parent: SnapshotId,
    },
    #[error("snapshot {id}: parent chain loops")]
    Loop { id: SnapshotId },
    #[error("snapshot {child}: block size {child_size} differs from its ancestor {ancestor}'s {ancestor_size}")]
    BlockSize {
        child: SnapshotId,
        child_size: u32,
        ancestor: SnapshotId,
        ancestor_size: u32,
    },
    #[error("snapshot {id}: generation {generation} cannot be raised")]
    GenerationOverflow { id: SnapshotId, generation: u32 },
    /// The replacement would not resolve to the same disk: a bug, caught
    /// before anything was written.
    #[error("snapshot {id}: the folded manifest would change the restored disk ({differing} blocks differ); nothing was written (this is a bug, please report it)")]
    WouldChange { id: SnapshotId, differing: u64 },
}

/// One snapshot forgotten (or to be, with `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    pub source: String,
    pub time: DateTime<Utc>,
    pub generation: u32,
    /// Objects of this id removed (every generation).
    #[serde(rename = "objects_removed")]
    pub objects: u64,
}

/// One kept snapshot rewritten because its parent was forgotten.
#[derive(Debug, Clone, Serialize)]
pub struct Rewritten {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    pub source: String,
    pub time: DateTime<Utc>,
    pub old_generation: u32,
    pub new_generation: u32,
    #[serde(rename = "old_parent_id")]
    pub old_parent: Option<SnapshotId>,
    #[serde(rename = "new_parent_id")]
    pub new_parent: Option<SnapshotId>,
    /// The snapshot is a full manifest now (every ancestor was forgotten).
    pub became_full: bool,
    pub entries_before: u64,
    pub entries_after: u64,
    /// The new object's name; `None` with `--dry-run`.
    pub object: Option<String>,
}

/// What [`forget`] did (or would do, with `dry_run`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub removed: Vec<Removed>,
    pub rewritten: Vec<Rewritten>,
    /// Older generations of kept snapshots removed (left behind by the
    /// rewrite, or by an interrupted earlier run).
    pub old_generations_removed: u64,
}

/// The chain of `id` in `objects`, oldest (a full manifest) first.
pub fn chain_of(
    objects: &HashMap<SnapshotId, Snapshot>,
    id: SnapshotId,
) -> Result<Vec<&Snapshot>, FoldError> {
    let mut chain = Vec::new();
    let mut next = Some(id);
    let mut child = id;
    while let Some(id) = next {
        if chain.len() > objects.len() {
            return Err(FoldError::Loop { id });
        }
        let obj = objects
            .get(&id)
            .ok_or(FoldError::MissingParent { child, parent: id })?;
        chain.push(obj);
        child = id;
        next = obj.meta.parent;
    }
    chain.reverse();
    Ok(chain)
}

/// The replacement of `chain.last()` (a kept snapshot) when its parent is
/// in `forgotten`, else `None`: same id, generation + 1, parent = the
/// nearest kept ancestor (or none: a full manifest), and exactly the
/// entries that make the new chain resolve to the old map, with the
/// child's own bitmap. Built range by range: each range's entries are
/// checked (the new chain resolves it to the old content) before its page
/// is written; nothing is written with `dry_run`. The pages are durable
/// before the object that names them is committed by the caller.
pub fn fold(
    repo: &Repository,
    chain: &[&Snapshot],
    forgotten: &HashSet<SnapshotId>,
    dry_run: bool,
) -> Result<Option<Snapshot>, RepoError> {
    let Some((child, ancestors)) = chain.split_last() else {
        return Ok(None);
    };
    match child.meta.parent {
        Some(p) if forgotten.contains(&p) => {}
        _ => return Ok(None),
    }
    // The nearest kept ancestor: every one after it is forgotten.
    let kept = ancestors
        .iter()
        .rposition(|o| !forgotten.contains(&o.meta.id));
    if let Some(k) = kept {
        let base_size = ancestors[k].meta.block_size;
        if base_size != child.meta.block_size {
            return Err(FoldError::BlockSize {
                child: child.meta.id,
                child_size: child.meta.block_size,
                ancestor: ancestors[k].meta.id,
                ancestor_size: base_size,
            }
            .into());
        }
    }
    let owned = |c: &[&Snapshot]| c.iter().map(|s| (*s).clone()).collect::<Vec<Snapshot>>();
    let mut target = ChainReader::new(repo, owned(chain))?;
    let mut base = match kept {
        Some(k) => Some(ChainReader::new(repo, owned(&ancestors[..=k]))?),
        None => None,
    };
    let mut own = LevelReader::new((*child).clone());
    let mut pages = PageWriter::new(repo, child.has_bitmap())
        .dry_run(dry_run)
        .knowing(child.page_ids());
    let step = pages.page_blocks();
    let blocks = child.meta.block_count();
    let mut differing = 0u64;
    // The ranges where anything may be: entries of the old chain or of the
    // new base, or the child's bitmap; the others resolve to zero in both.
    let mut touched: Vec<u64> = Vec::new();
    for reader in std::iter::once(&target).chain(base.as_ref()) {
        let rb = reader.range_blocks();
        for &r in reader.nonempty_ranges() {
            let lo = r * rb;
            touched.extend(lo / step..=(lo + rb - 1) / step);
        }
    }
    touched.extend(child.ranges_touched(step, true));
    touched.sort_unstable();
    touched.dedup();
    touched.retain(|q| q * step < blocks);
    for q in touched {
        let lo = q * step;
        let hi = (lo + step).min(blocks);
        let wanted = target.data_in(lo, hi)?;
        // What the child inherits: the base cut to the child's size (a
        // block beyond it is dropped, a regrown one reads as zero).
        let inherited = match base.as_mut() {
            Some(b) => b.data_in(lo, hi)?,
            None => Vec::new(),
        };
        let entries: Vec<(u64, BlockRef)> = manifest::diff_data(&inherited, &wanted)
            .into_iter()
            .map(|c| {
                (
                    c.index,
                    c.after.map(BlockRef::Data).unwrap_or(BlockRef::Zero),
                )
            })
            .collect();
        // The new chain resolves this range to the old content.
        let after = manifest::apply_entries(&inherited, &entries, blocks);
        if after != wanted {
            differing += manifest::diff_data(&after, &wanted).len() as u64;
            continue;
        }
        let bits = if child.has_bitmap() {
            own.range(repo, lo, lo + step, true)?.bitmap
        } else {
            None
        };
        pages.add(q, entries, bits)?;
    }
    if differing > 0 {
        return Err(FoldError::WouldChange {
            id: child.meta.id,
            differing,
        }
        .into());
    }
    let mut meta = child.meta.clone();
    meta.generation = meta
        .generation
        .checked_add(1)
        .ok_or(FoldError::GenerationOverflow {
            id: meta.id,
            generation: meta.generation,
        })?;
    meta.parent = kept.map(|k| ancestors[k].meta.id);
    Ok(Some(Snapshot {
        meta,
        body: Body::Paged(pages.finish()),
    }))
}

/// The replacements of every kept snapshot in `objects` whose parent is
/// forgotten. `objects` holds the live object of every forgotten id, of
/// every kept child of one, and of all their ancestors.
pub fn plan_folds(
    repo: &Repository,
    objects: &HashMap<SnapshotId, Snapshot>,
    forgotten: &HashSet<SnapshotId>,
    dry_run: bool,
) -> Result<Vec<Snapshot>, RepoError> {
    let mut ids: Vec<SnapshotId> = objects
        .values()
        .filter(|o| !forgotten.contains(&o.meta.id))
        .filter(|o| o.meta.parent.is_some_and(|p| forgotten.contains(&p)))
        .map(|o| o.meta.id)
        .collect();
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let chain = chain_of(objects, id)?;
        if let Some(new) = fold(repo, &chain, forgotten, dry_run)? {
            out.push(new);
        }
    }
    Ok(out)
}

/// [`forget_with_progress`] without progress.
pub fn forget(
    repo: &Repository,
    ids: &[SnapshotId],
    dry_run: bool,
) -> Result<ForgetReport, RepoError> {
    forget_with_progress(repo, ids, dry_run, &NoProgress)
}

/// Removes the live snapshots `ids`, folding each one's delta into its kept
/// children first. Everything is validated (every id live and unique, every
/// chain involved loads, every fold verified) before anything is written.
/// Without `dry_run` the caller must hold the exclusive lock
/// (spec: 05-locks.md: a running backup may be writing a child); with it,
/// nothing is written and any lock will do.
pub fn forget_with_progress(
    repo: &Repository,
    ids: &[SnapshotId],
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<ForgetReport, RepoError> {
    if !dry_run {
        repo.ensure_exclusive_lock("forget")?;
    }
    let live: HashMap<SnapshotId, super::SnapshotEntry> = repo
        .snapshots()?
        .into_iter()
        .map(|s| (s.meta.id, s))
        .collect();
    let forgotten: HashSet<SnapshotId> = ids.iter().copied().collect();
    for id in &forgotten {
        if !live.contains_key(id) {
            return Err(RepoError::SnapshotNotFound { query: id.to_hex() });
        }
    }
    // Every chain involved loads: each forgotten snapshot's and each kept
    // child's (load_chain refuses duplicate generations and loops).
    let children: BTreeSet<SnapshotId> = live
        .values()
        .filter(|s| !forgotten.contains(&s.meta.id))
        .filter(|s| s.meta.parent.is_some_and(|p| forgotten.contains(&p)))
        .map(|s| s.meta.id)
        .collect();
    let mut objects: HashMap<SnapshotId, Snapshot> = HashMap::new();
    let mut involved: Vec<SnapshotId> = forgotten.iter().copied().collect();
    involved.sort();
    involved.extend(children.iter().copied());
    for id in involved {
        if objects.contains_key(&id) {
            continue;
        }
        let chain = repo.load_chain(id).map_err(|e| RepoError::InSnapshot {
            snapshot: id,
            cause: Box::new(e),
        })?;
        for obj in chain {
            objects.entry(obj.meta.id).or_insert(obj);
        }
    }
    // Every fold computed and verified (its pages written unless dry run)
    // before any object is written or removed.
    let folds = plan_folds(repo, &objects, &forgotten, dry_run)?;

    // Every object of the repository, for the generations to remove.
    let all = repo.catalog().snapshots()?;
    let rewritten_ids: HashSet<SnapshotId> = folds.iter().map(|f| f.meta.id).collect();
    let mut old_generations: Vec<(ObjectName, u32)> = all
        .iter()
        .filter(|(object, m)| {
            // A rewritten id: every object it has now (the new generation
            // replaces them all). Another kept id: a generation left by an
            // interrupted earlier run that still names a forgotten parent.
            !forgotten.contains(&m.id)
                && (rewritten_ids.contains(&m.id)
                    || (live.get(&m.id).is_some_and(|l| l.object != *object)
                        && m.parent.is_some_and(|p| forgotten.contains(&p))))
        })
        .map(|(o, m)| (*o, m.generation))
        .collect();
    old_generations.sort_by_key(|(o, g)| (*g, *o));
    // Forgotten ids: every generation, the live one last; children before
    // their parents (the deepest in its chain first), so that a crash never
    // leaves a listed snapshot whose parent is gone.
    let depth = |id: &SnapshotId| -> usize {
        let mut n = 0;
        let mut at = live.get(id).and_then(|s| s.meta.parent);
        while let Some(p) = at {
            n += 1;
            if n > live.len() {
                break; // a loop: load_chain refused it above; be safe anyway
            }
            at = live.get(&p).and_then(|s| s.meta.parent);
        }
        n
    };
    let depths: HashMap<SnapshotId, usize> = forgotten.iter().map(|id| (*id, depth(id))).collect();
    let mut forgotten_objects: Vec<(SnapshotId, u32, ObjectName)> = all
        .iter()
        .filter(|(_, m)| forgotten.contains(&m.id))
        .map(|(o, m)| (m.id, m.generation, *o))
        .collect();
    forgotten_objects.sort_by_key(|(id, g, o)| {
        (
            std::cmp::Reverse(depths[id]),
            *id,
            *g,
            *o == live[id].object,
            *o,
        )
    });

    let mut report = ForgetReport {
        dry_run,
        ..Default::default()
    };
    let mut removed: Vec<Removed> = forgotten
        .iter()
        .map(|id| {
            let m = &live[id].meta;
            Removed {
                id: *id,
                source: m.source.clone(),
                time: m.time,
                generation: m.generation,
                objects: forgotten_objects.iter().filter(|f| f.0 == *id).count() as u64,
            }
        })
        .collect();
    removed.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
    report.removed = removed;
    for new in &folds {
        let old = &objects[&new.meta.id];
        report.rewritten.push(Rewritten {
            id: new.meta.id,
            source: new.meta.source.clone(),
            time: new.meta.time,
            old_generation: old.meta.generation,
            new_generation: new.meta.generation,
            old_parent: old.meta.parent,
            new_parent: new.meta.parent,
            became_full: new.meta.parent.is_none(),
            entries_before: old.entry_count(),
            entries_after: new.entry_count(),
            object: None,
        });
    }
    if dry_run {
        report.old_generations_removed = old_generations.len() as u64;
        return Ok(report);
    }

    // A stop signal stops the forget before its first write (and at each
    // rewrite's commit); once the rewrites are durable the removals, quick
    // and each safe alone, are finished.
    crate::interrupt::check()?;
    progress.set_total((folds.len() + old_generations.len() + forgotten_objects.len()) as u64);
    // 1. Every replacement durable.
    for (new, line) in folds.iter().zip(report.rewritten.iter_mut()) {
        repo.ensure_exclusive_lock("forget")?;
        let name = repo.commit_snapshot(new)?;
        line.object = Some(name.to_hex());
        progress.advance(1);
        #[cfg(debug_assertions)]
        super::test_kill("forget_rewrite");
    }
    // 2. The older generations of the rewritten (and earlier rewritten) ids.
    for (object, _) in &old_generations {
        remove_object(repo, object)?;
        report.old_generations_removed += 1;
        progress.advance(1);
        #[cfg(debug_assertions)]
        super::test_kill("forget_old_generation");
    }
    // 3. Every object of every forgotten id, the live one last.
    for (_, _, object) in &forgotten_objects {
        remove_object(repo, object)?;
        progress.advance(1);
        #[cfg(debug_assertions)]
        super::test_kill("forget_remove");
    }
    Ok(report)
}

/// Removes one snapshot object and its catalog row; one already gone is
/// no error (an interrupted run, or the catalog behind).
fn remove_object(repo: &Repository, object: &ObjectName) -> Result<(), RepoError> {
    repo.ensure_exclusive_lock("forget")?;
    match repo.backend().remove(Kind::Snapshot, &object.to_hex()) {
        Err(e) if !e.is_not_found() => return Err(e.into()),
        _ => {}
    }
    repo.catalog().remove_snapshot(object)?;
    Ok(())
}
