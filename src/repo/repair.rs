//! Repairs that remove or rewrite objects: salvaging damaged packs,
//! rewriting snapshots whose parent is gone, and reclaiming `tmp/` files
//! and packs no snapshot references. Every function here expects the
//! caller to hold the exclusive lock (spec: format-spec/05-locks.md) and
//! follows the orders of format-spec/06-ordering.md#repair-packs and
//! #cleanup; none prints.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::read::BlockReader;
use super::{Body, RepoError, Repository, Snapshot};
use crate::backend::Kind;
use crate::format::snapshot::BlockRef;
use crate::format::{BlockId, ObjectName, SnapshotId};
use crate::pack::{CompressedBlock, PackWriter, Stored};
use crate::progress::Progress;

/// Files in `tmp/` younger than this are left alone (06-ordering.md#cleanup).
pub const TMP_MIN_AGE: Duration = Duration::from_secs(5 * 60);

/// What `repair packs` did to one damaged pack.
#[derive(Debug, Clone, Serialize)]
pub struct PackRepair {
    pub pack: String,
    /// The pack holding the salvaged blocks, when any were needed.
    pub new_pack: Option<String>,
    pub blocks_salvaged: u64,
    /// Good blocks not copied because an intact copy is stored elsewhere.
    pub blocks_elsewhere: u64,
    /// Damaged blocks dropped from the catalog (hex ids): a backup must
    /// store them again.
    #[serde(rename = "dropped_block_ids")]
    pub blocks_dropped: Vec<String>,
    /// Why the pack was left as it is, when it was.
    #[serde(rename = "skipped_reason")]
    pub skipped: Option<String>,
}

/// Salvages the good blocks of every pack with recorded damage into new
/// packs and drops the damaged ones (spec: 06-ordering.md#repair-packs).
pub fn repair_packs(
    repo: &Repository,
    progress: &dyn Progress,
) -> Result<Vec<PackRepair>, RepoError> {
    let backend = repo.backend();
    let listed: HashMap<String, u64> = backend.list(Kind::Pack)?.into_iter().collect();
    let damaged = repo.catalog().damaged()?;
    let damaged_copies: HashSet<(BlockId, ObjectName)> =
        damaged.iter().map(|d| (d.block, d.pack)).collect();
    let packs: BTreeSet<ObjectName> = damaged.iter().map(|d| d.pack).collect();
    progress.set_total(packs.len() as u64);
    let mut out = Vec::new();
    for pack in packs {
        crate::interrupt::check()?;
        progress.advance(1);
        let hex = pack.to_hex();
        let Some(&size) = listed.get(&hex) else {
            // Removed earlier (step 4 interrupted): only its rows remain.
            repo.catalog().forget_damage_of_pack(&pack)?;
            continue;
        };
        let mut result = PackRepair {
            pack: hex.clone(),
            new_pack: None,
            blocks_salvaged: 0,
            blocks_elsewhere: 0,
            blocks_dropped: Vec::new(),
            skipped: None,
        };
        let bytes = backend.load(Kind::Pack, &hex)?;
        let verified = match BlockReader::new(repo).verify_pack(pack, &bytes) {
            Ok(v) => v,
            Err(e) => {
                // Without its trailer nothing in it can be located.
                result.skipped = Some(format!(
                    "unreadable trailer ({e}); 'cbtvault repair index' drops its rows"
                ));
                out.push(result);
                continue;
            }
        };
        let mut writer = PackWriter::new(size.max(1 << 20), repo.codec());
        for (e, verdict) in &verified {
            if let Err(err) = verdict {
                repo.mark_damaged(&e.block_id, &pack, &err.to_string())?;
                result.blocks_dropped.push(e.block_id.to_hex());
                continue;
            }
            let frame = &bytes[e.offset as usize..(e.offset + e.stored_length as u64) as usize];
            let (location, intact) = {
                let catalog = repo.catalog();
                (
                    catalog.lookup(&e.block_id)?,
                    catalog.contains_intact_many(std::slice::from_ref(&e.block_id))?[0],
                )
            };
            let elsewhere = intact
                && location.is_some_and(|l| {
                    l.pack != pack && !damaged_copies.contains(&(e.block_id, l.pack))
                });
            if elsewhere {
                result.blocks_elsewhere += 1;
                continue;
            }
            // Just verified: copied verbatim.
            writer.add(&CompressedBlock {
                id: e.block_id,
                raw_length: e.raw_length,
                stored: Stored::Verbatim(frame.to_vec()),
            })?;
            result.blocks_salvaged += 1;
        }
        repo.ensure_lock_held()?;
        let new = if writer.is_empty() {
            None
        } else {
            let done = writer.finish()?;
            let mut object = backend.create(Kind::Pack)?;
            object.append(done.tail.bytes())?;
            object.commit(&done.name.to_hex())?;
            Some(done)
        };
        repo.ensure_lock_held()?;
        repo.catalog().replace_pack(
            &pack,
            new.as_ref()
                .map(|d| (&d.name, d.size_bytes, &d.entries[..])),
        )?;
        result.new_pack = new.as_ref().map(|d| d.name.to_hex());
        #[cfg(debug_assertions)]
        super::test_failpoint("repair_pack_remove")?;
        if new.as_ref().is_none_or(|d| d.name != pack) {
            match backend.remove(Kind::Pack, &hex) {
                Err(e) if !e.is_not_found() => return Err(e.into()),
                _ => {}
            }
        }
        repo.catalog().forget_damage_of_pack(&pack)?;
        out.push(result);
    }
    Ok(out)
}

/// What `repair snapshots` did to one snapshot whose parent is gone.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRepair {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    pub source: String,
    #[serde(rename = "missing_parent_id")]
    pub missing_parent: SnapshotId,
    /// The new object (a full manifest), when the snapshot was rewritten.
    #[serde(rename = "rewritten_object")]
    pub rewritten_as: Option<String>,
    /// Blocks only the missing parent described, when it could not be.
    pub blocks_unknown: u64,
}

/// Rewrites each live snapshot whose parent is missing as a full manifest
/// when its own entries name every block; reports the others
/// (spec: 06-ordering.md#rewrite).
pub fn repair_snapshots(repo: &Repository) -> Result<Vec<SnapshotRepair>, RepoError> {
    let live = repo.snapshots()?;
    let ids: HashSet<SnapshotId> = live.iter().map(|s| s.meta.id).collect();
    let mut out = Vec::new();
    for s in live {
        let Some(parent) = s.meta.parent else {
            continue;
        };
        if ids.contains(&parent) {
            continue;
        }
        let obj = repo.load_snapshot(&s.object)?;
        let blocks = obj.meta.block_count();
        let covered = obj.entry_count();
        let mut result = SnapshotRepair {
            id: s.meta.id,
            source: s.meta.source.clone(),
            missing_parent: parent,
            rewritten_as: None,
            blocks_unknown: blocks.saturating_sub(covered),
        };
        if covered == blocks {
            let mut meta = obj.meta.clone();
            meta.generation += 1;
            meta.parent = None;
            meta.new_set_reason = Some(format!(
                "parent {parent} is missing; rewritten as a full manifest by 'cbtvault repair snapshots'"
            ));
            if !meta.tags.iter().any(|t| t == "repaired") {
                meta.tags.push("repaired".into());
            }
            repo.ensure_lock_held()?;
            // Its pages first (format-spec/06-ordering.md#rewrite).
            let table = repo.repage(&obj, true, |e| e.1 != BlockRef::Zero)?;
            let new = Snapshot {
                meta,
                body: Body::Paged(table),
            };
            let name = repo.commit_snapshot(&new)?;
            repo.ensure_lock_held()?;
            match repo.backend().remove(Kind::Snapshot, &s.object.to_hex()) {
                Err(e) if !e.is_not_found() => return Err(e.into()),
                _ => {}
            }
            repo.catalog().remove_snapshot(&s.object)?;
            result.rewritten_as = Some(name.to_hex());
        }
        out.push(result);
    }
    Ok(out)
}

/// Removes the files in `tmp/` not modified for `min_age`; returns how
/// many and their bytes (spec: 06-ordering.md#cleanup).
pub fn clean_tmp(repo: &Repository, min_age: Duration) -> Result<(u64, u64), RepoError> {
    // Object storage has no tmp/: its uploads are atomic.
    let Some(root) = repo.root() else {
        return Ok((0, 0));
    };
    let dir = root.join("tmp");
    let io = |what: String| move |source| RepoError::Io { what, source };
    let entries = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io(format!("list '{}'", dir.display()))(e)),
    };
    let now = SystemTime::now();
    let (mut files, mut bytes) = (0, 0);
    for entry in entries {
        let entry = entry.map_err(io(format!("list '{}'", dir.display())))?;
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= min_age);
        if !meta.is_file() || !old {
            continue;
        }
        repo.ensure_lock_held()?;
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                files += 1;
                bytes += meta.len();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("remove '{}'", entry.path().display()))(e)),
        }
    }
    if files > 0 {
        crate::backend::local::sync_dir(&dir).map_err(io(format!("fsync '{}'", dir.display())))?;
    }
    Ok((files, bytes))
}

/// Removes every pack none of whose blocks any snapshot object (live or
/// not) names: the packs of failed backups. Refuses when a snapshot object
/// cannot be read. Returns the packs removed with their sizes.
pub fn remove_unreferenced_packs(
    repo: &Repository,
    progress: &dyn Progress,
) -> Result<Vec<(String, u64)>, RepoError> {
    let backend = repo.backend();
    let mut referenced: HashSet<BlockId> = HashSet::new();
    for (name, _) in backend.list(Kind::Snapshot)? {
        let Ok(object) = name.parse::<ObjectName>() else {
            continue;
        };
        let obj = repo.load_snapshot(&object).map_err(|e| {
            RepoError::Invalid(format!(
                "snapshot object {name} cannot be read ({e}), so what it references is unknown; nothing removed"
            ))
        })?;
        let step = obj.range_blocks();
        repo.each_range(&obj, step, false, |_, part| {
            for (_, r) in part.entries {
                if let BlockRef::Data(id) = r {
                    referenced.insert(id);
                }
            }
            Ok(())
        })?;
    }
    let packs = backend.list(Kind::Pack)?;
    progress.set_total(packs.len() as u64);
    let mut removed = Vec::new();
    for (name, size) in packs {
        progress.advance(1);
        let Ok(pack) = name.parse::<ObjectName>() else {
            continue;
        };
        // A pack whose trailer cannot be read may hold anything: kept.
        let Ok(entries) = repo.read_pack_index(&name, size) else {
            continue;
        };
        if entries.iter().any(|e| referenced.contains(&e.block_id)) {
            continue;
        }
        repo.ensure_lock_held()?;
        repo.catalog().remove_pack(&pack)?;
        match backend.remove(Kind::Pack, &name) {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
        repo.catalog().forget_damage_of_pack(&pack)?;
        removed.push((name, size));
    }
    Ok(removed)
}
