//! `check`: structure (config, snapshot objects and their chains, packs and
//! their trailers), catalog against packs, manifests against the catalog,
//! and optionally the data itself (every selected blob decompressed and
//! re-hashed). Reports problems, the snapshots they affect and the repair
//! command that fixes each; never modifies the repository (it only records
//! damaged blocks in the catalog, spec: format-spec/04-catalog.md#damaged).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::read::{BlockReader, ReadError};
use super::{RepoError, Repository};
use crate::backend::Kind;
use crate::format::{BlockId, ObjectName, SnapshotId};
use crate::output::plural;
use crate::pack::PackError;
use crate::progress::Progress;

/// Which packs `--read-data` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DataSubset {
    All,
    /// A random share of the packs, in percent (0 < p <= 100).
    Percent(f64),
    /// Part `n` of `t` (1-based) of the packs sorted by name.
    Part {
        n: u32,
        t: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// The object concerned, e.g. `pack 3fa2...` or `snapshot 9c1e...`.
    pub object: String,
    pub message: String,
    /// The command that fixes it, when one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The repair commands `check` points to.
pub mod fix {
    pub const INDEX: &str = "cbtvault repair index";
    pub const PACKS: &str = "cbtvault repair packs";
    pub const SNAPSHOTS: &str = "cbtvault repair snapshots";
    pub const TMP: &str = "cbtvault repair tmp";
    pub const BACKUP_FULL: &str =
        "cbtvault backup --full of the source (stores damaged blocks again)";
}

#[derive(Debug, Clone, Serialize)]
pub struct AffectedSnapshot {
    #[serde(rename = "snapshot_id")]
    pub id: SnapshotId,
    pub source: String,
    pub time: chrono::DateTime<chrono::Utc>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    pub snapshots_checked: u64,
    pub packs_checked: u64,
    pub packs_read: u64,
    pub blocks_read: u64,
    pub problems: Vec<Problem>,
    pub affected_snapshots: Vec<AffectedSnapshot>,
}

impl CheckReport {
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }
    fn error(&mut self, object: String, message: String) {
        self.problems.push(Problem {
            severity: Severity::Error,
            object,
            message,
            fix: None,
        });
    }
    fn warn(&mut self, object: String, message: String) {
        self.problems.push(Problem {
            severity: Severity::Warning,
            object,
            message,
            fix: None,
        });
    }
    /// Sets the fix of the problem just added.
    fn fixed_by(&mut self, fix: &str) {
        if let Some(p) = self.problems.last_mut() {
            p.fix = Some(fix.to_string());
        }
    }
}

fn select_packs(mut packs: Vec<(String, u64)>, subset: DataSubset) -> Vec<(String, u64)> {
    packs.sort();
    match subset {
        DataSubset::All => packs,
        DataSubset::Part { n, t } => {
            let len = packs.len();
            let (n, t) = (n as usize, t as usize);
            let start = len * (n - 1) / t;
            let end = len * n / t;
            packs[start..end].to_vec()
        }
        DataSubset::Percent(p) => {
            use rand::seq::SliceRandom;
            let want = ((packs.len() as f64) * p / 100.0).ceil() as usize;
            let mut rng = rand::thread_rng();
            packs.shuffle(&mut rng);
            packs.truncate(want.min(packs.len()));
            packs
        }
    }
}

/// Runs the check. `read_data` selects packs whose blobs are all verified.
pub fn run(
    repo: &Repository,
    read_data: Option<DataSubset>,
    progress: &dyn Progress,
) -> Result<CheckReport, RepoError> {
    let mut report = CheckReport::default();
    let backend = repo.backend();

    // Snapshot objects that could not even be listed into the catalog.
    for (name, reason) in &repo.unreadable_snapshots {
        report.error(format!("snapshot object {name}"), reason.clone());
    }

    // Packs on storage against the catalog.
    let listed: Vec<(String, u64)> = backend.list(Kind::Pack)?;
    let listed_map: HashMap<String, u64> = listed.iter().cloned().collect();
    let catalog_packs = repo.catalog().packs()?;
    let catalog_names: HashSet<String> = catalog_packs.iter().map(|p| p.0.to_hex()).collect();
    let mut bad_blocks: HashMap<BlockId, String> = HashMap::new();
    let mark_pack_bad = |bad_blocks: &mut HashMap<BlockId, String>,
                         pack: &ObjectName,
                         why: &str|
     -> Result<(), RepoError> {
        for (id, _) in repo.catalog().blocks_in_pack(pack)? {
            bad_blocks
                .entry(id)
                .or_insert_with(|| format!("pack {} {why}", pack.short()));
        }
        Ok(())
    };
    for (name, size, _) in &catalog_packs {
        let hex = name.to_hex();
        match listed_map.get(&hex) {
            None => {
                report.error(
                    format!("pack {hex}"),
                    "listed in the catalog but missing from storage".into(),
                );
                report.fixed_by(fix::INDEX);
                mark_pack_bad(&mut bad_blocks, name, "is missing")?;
            }
            Some(actual) if actual != size => {
                report.error(
                    format!("pack {hex}"),
                    format!(
                        "is {actual} bytes, the catalog recorded {size} (truncated or replaced)"
                    ),
                );
                report.fixed_by(fix::INDEX);
                mark_pack_bad(&mut bad_blocks, name, "has the wrong size")?;
            }
            Some(_) => {}
        }
    }
    // Each readable pack's trailer, to compare index objects with.
    let mut trailer_digests: HashMap<ObjectName, blake3::Hash> = HashMap::new();
    // Packs named by their tail (trailer format 1), whether the tail
    // matches the name: checked and reported here, from the listing
    // reads, and not again by the data pass.
    let mut tail_named: HashMap<ObjectName, bool> = HashMap::new();
    progress.set_total(listed.len() as u64);
    for (name, size) in &listed {
        crate::interrupt::check()?;
        progress.advance(1);
        report.packs_checked += 1;
        let Ok(pack) = name.parse::<ObjectName>() else {
            report.warn(format!("data/{name}"), "not a pack name; ignored".into());
            continue;
        };
        match repo.read_pack_listing(name, *size) {
            Err(e) => {
                report.error(format!("pack {name}"), format!("unreadable trailer: {e}"));
                report.fixed_by(fix::INDEX);
                mark_pack_bad(&mut bad_blocks, &pack, "is unreadable")?;
            }
            Ok(listing) => {
                let entries = listing.entries;
                // A pack named by its tail: its name is checked from the
                // two reads just made (spec: format-spec/02-pack.md#naming).
                if let Some(n) = listing.tail_name {
                    tail_named.insert(pack, n == pack);
                }
                if listing.tail_name.is_some_and(|n| n != pack) {
                    report.error(
                        format!("pack {name}"),
                        "its trailer does not match its name (hash): the file was modified or renamed".into(),
                    );
                    report.fixed_by(fix::PACKS);
                    // As for a whole-file name that does not match while
                    // the blobs verify (below): the copies are recorded
                    // damaged, so that `repair packs` rewrites the pack
                    // under a name of its own; reads still verify each blob.
                    let reason = "its pack's trailer does not match the pack's name (the file was modified or renamed)";
                    let rows = repo.catalog().blocks_in_pack(&pack)?;
                    for (id, _) in rows {
                        repo.mark_damaged(&id, &pack, reason)?;
                    }
                }
                trailer_digests.insert(
                    pack,
                    blake3::hash(&crate::format::pack::encode_trailer(&entries)),
                );
                if !catalog_names.contains(name) {
                    report.warn(
                        format!("pack {name}"),
                        format!(
                            "{} not in the catalog (left by an interrupted backup); 'cbtvault repair index' adopts it",
                            plural(entries.len(), "block")
                        ),
                    );
                    report.fixed_by(fix::INDEX);
                    continue;
                }
                let rows: HashMap<BlockId, _> =
                    repo.catalog().blocks_in_pack(&pack)?.into_iter().collect();
                // One pass over the trailer: linear in the pack's blocks.
                let placed: HashSet<(BlockId, u64, u32, u32)> = entries
                    .iter()
                    .map(|e| (e.block_id, e.offset, e.stored_length, e.raw_length))
                    .collect();
                for (id, loc) in &rows {
                    let found =
                        placed.contains(&(*id, loc.offset, loc.stored_length, loc.raw_length));
                    if !found {
                        report.error(
                            format!("pack {name}"),
                            format!("catalog places block {id} at offset {} but the trailer disagrees; run 'cbtvault repair index'", loc.offset),
                        );
                        report.fixed_by(fix::INDEX);
                        bad_blocks.entry(*id).or_insert_with(|| {
                            format!("catalog entry in pack {} is wrong", pack.short())
                        });
                    }
                }
            }
        }
    }

    // A blob that fails verification is recorded in the catalog; it makes
    // snapshots damaged only while the catalog has no intact copy.
    let record_damage = |report: &mut CheckReport,
                         bad_blocks: &mut HashMap<BlockId, String>,
                         block: BlockId,
                         pack: ObjectName,
                         reason: String|
     -> Result<(), RepoError> {
        report.error(format!("pack {}", pack.to_hex()), reason.clone());
        repo.mark_damaged(&block, &pack, &reason)?;
        let mut current = repo.catalog().lookup(&block)?;
        if current.is_some_and(|loc| loc.pack == pack) {
            // The one read path tries an intact copy elsewhere and points
            // the catalog at it (spec: format-spec/04-catalog.md#damaged).
            let reader = BlockReader::new(repo);
            let _ = reader.read(&reader.locate(&[(0, block)])?);
            current = repo.catalog().lookup(&block)?;
        }
        if current.is_none_or(|loc| loc.pack == pack) {
            bad_blocks.entry(block).or_insert_with(|| {
                format!(
                    "block {} in pack {} is corrupt",
                    block.short(),
                    pack.short()
                )
            });
        }
        Ok(())
    };
    let first_data_problem = report.problems.len();

    // Data: decompress and re-hash every blob of the selected packs.
    if let Some(subset) = read_data {
        // Copies recorded damaged: one that verifies again after a whole
        // pack read whose name still matches its content loses its record.
        let recorded: HashSet<(BlockId, ObjectName)> = repo
            .catalog()
            .damaged()?
            .into_iter()
            .map(|d| (d.block, d.pack))
            .collect();
        let selected = select_packs(listed.clone(), subset);
        progress.set_total(selected.iter().map(|p| p.1).sum());
        for (name, size) in selected {
            crate::interrupt::check()?;
            let Ok(pack) = name.parse::<ObjectName>() else {
                continue;
            };
            report.packs_read += 1;
            let bytes = match backend.load(Kind::Pack, &name) {
                Ok(b) => b,
                Err(e) => {
                    report.error(format!("pack {name}"), format!("cannot read: {e}"));
                    mark_pack_bad(&mut bad_blocks, &pack, "is unreadable")?;
                    continue;
                }
            };
            progress.advance(size);
            // A tail name was checked by the structure pass; a whole-file
            // name (trailer format 0, or a trailer that did not list) needs
            // the whole file, which is at hand now.
            let (name_matches, reported) = match tail_named.get(&pack) {
                Some(&matches) => (matches, true),
                None => (ObjectName::of(&bytes) == pack, false),
            };
            if !name_matches && !reported {
                report.error(
                    format!("pack {name}"),
                    "content does not match its name (hash): the file was modified".into(),
                );
            }
            // Every blob through the one read path, out of the bytes
            // already loaded (the whole pack, for the name check above).
            let verified = match BlockReader::new(repo).verify_pack(pack, &bytes) {
                Ok(v) => v,
                // Already reported by the structure pass.
                Err(_) => continue,
            };
            // A modified file whose blobs all verify (for a pack named by
            // its whole file, a change a zstd decoder ignores; for one
            // named by its tail, a tail whole but not the one named):
            // its copies are recorded damaged, so that
            // `repair packs` rewrites the pack and backups store fresh
            // copies; reads still verify every blob.
            if !name_matches && verified.iter().all(|(_, r)| r.is_ok()) {
                let reason = "its pack's content does not match the pack's name (the file was modified); the blob itself verifies";
                for (e, _) in &verified {
                    repo.mark_damaged(&e.block_id, &pack, reason)?;
                }
            }
            for (e, result) in verified {
                report.blocks_read += 1;
                if result.is_ok() && name_matches && recorded.contains(&(e.block_id, pack)) {
                    repo.catalog().clear_damaged(&e.block_id, &pack)?;
                    repo.notice(format!(
                        "block {} in pack {} verifies again: its damage record is cleared",
                        e.block_id.short(),
                        pack.short()
                    ));
                }
                if let Err(ReadError::Damaged { reason, .. }) = result {
                    let why = PackError::Corrupt {
                        block: e.block_id,
                        pack,
                        reason,
                    }
                    .to_string();
                    record_damage(&mut report, &mut bad_blocks, e.block_id, pack, why)?;
                }
            }
        }
    }

    for p in &mut report.problems[first_data_problem..] {
        p.fix.get_or_insert_with(|| fix::PACKS.to_string());
    }

    // Damage found earlier (by a reader or an earlier check) and not yet
    // healed: the catalog still names the damaged copy.
    let mut damaged_by_pack: std::collections::BTreeMap<ObjectName, (u64, String)> =
        Default::default();
    for d in repo.catalog().damaged()? {
        if !d.current {
            continue;
        }
        let why = format!(
            "block {} in pack {} is damaged (found {}: {})",
            d.block.short(),
            d.pack.short(),
            d.time,
            d.reason
        );
        bad_blocks.entry(d.block).or_insert_with(|| why.clone());
        let e = damaged_by_pack.entry(d.pack).or_insert((0, why));
        e.0 += 1;
    }
    for (pack, (n, first)) in damaged_by_pack {
        let object = format!("pack {}", pack.to_hex());
        // Not said twice for a pack this run has just read.
        if report.problems.iter().any(|p| p.object == object) {
            continue;
        }
        report.error(
            object,
            format!(
                "{} recorded in the catalog, first: {first}",
                plural(n, "damaged block")
            ),
        );
        report.fixed_by(fix::PACKS);
    }

    // Two objects claiming one id's live generation: reported, never picked.
    let mut duplicated: HashSet<SnapshotId> = HashSet::new();
    for dup in repo.duplicate_snapshots()? {
        if let RepoError::DuplicateSnapshot { id, .. } = &dup {
            report.error(format!("snapshot {id}"), dup.to_string());
            duplicated.insert(*id);
        }
    }

    // Snapshots: every chain loads, every referenced block is indexed and
    // good. Each snapshot object and each manifest page is read and its
    // entries looked up once (`sound_levels`); a chain whose every level is
    // sound is sound. Only a snapshot whose chain has an unsound level is
    // resolved, range by range, to say exactly what it loses (a missing
    // block a newer level replaced costs it nothing).
    let snapshots = repo.snapshots()?;
    let sound = sound_levels(repo, &snapshots, &bad_blocks, &duplicated)?;
    for snap in snapshots {
        crate::interrupt::check()?;
        report.snapshots_checked += 1;
        let id = snap.meta.id;
        if chain_is_sound(&sound, id) {
            continue;
        }
        let affected = |reason: String| AffectedSnapshot {
            id,
            source: snap.meta.source.clone(),
            time: snap.meta.time,
            reason,
        };
        // Range by range: one resolved range in memory at a time.
        let mut missing = 0u64;
        let mut corrupt = 0u64;
        let mut first: Option<String> = None;
        let resolved = (|| -> Result<(), RepoError> {
            let mut reader = repo.chain_reader(id)?;
            reader.survey(|_| {})?;
            for m in reader {
                let m = m?;
                for chunk in m.data.chunks(4096) {
                    let ids: Vec<BlockId> = chunk.iter().map(|c| c.1).collect();
                    let known = repo.catalog().contains_many(&ids)?;
                    for ((index, block), known) in chunk.iter().zip(known) {
                        if !known {
                            missing += 1;
                            first.get_or_insert_with(|| {
                                format!("block {index} ({}) is in no pack", block.short())
                            });
                        } else if let Some(why) = bad_blocks.get(block) {
                            corrupt += 1;
                            first.get_or_insert_with(|| format!("block {index}: {why}"));
                        }
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = resolved {
            if matches!(e, RepoError::Index(_)) {
                return Err(e);
            }
            report.error(format!("snapshot {id}"), format!("cannot be resolved: {e}"));
            let parent_missing = matches!(&e, RepoError::InSnapshot { cause, .. }
                if matches!(**cause, RepoError::SnapshotNotFound { .. }));
            if parent_missing {
                report.fixed_by(fix::SNAPSHOTS);
            }
            report.affected_snapshots.push(affected(e.to_string()));
            continue;
        }
        if missing > 0 {
            report.error(
                format!("snapshot {id}"),
                format!("{} not in any pack", plural(missing, "referenced block")),
            );
            report.fixed_by(fix::BACKUP_FULL);
        }
        if missing + corrupt > 0 {
            report.affected_snapshots.push(affected(format!(
                "{}, first: {}",
                plural(missing + corrupt, "damaged block"),
                first.unwrap_or_default()
            )));
        }
    }

    // Manifest pages (spec: 03-snapshot.md#pages): those of live chains
    // were read above. One no snapshot object names is normal garbage (a
    // failed backup's, a forgotten snapshot's) that prune removes.
    for (hex, _) in backend.list(Kind::Page)? {
        if hex.parse::<crate::format::PageId>().is_err() {
            report.warn(
                format!("manifests/{hex}"),
                "not a manifest page name; ignored".into(),
            );
        }
    }

    // Index objects (spec: 08-index.md): a damaged or wrong one costs
    // readers time (they read the trailers instead), never correctness.
    for (hex, _) in backend.list(Kind::Index)? {
        crate::interrupt::check()?;
        let what = format!("index/{hex}");
        let Ok(name) = hex.parse::<ObjectName>() else {
            report.warn(what, "not an index object name; ignored".into());
            continue;
        };
        let packs = match repo.load_index(&name)? {
            None => continue,
            Some(Ok(p)) => p,
            Some(Err(why)) => {
                report.warn(
                    what,
                    format!(
                        "{why}; readers ignore it and read the packs' trailers (it may be deleted)"
                    ),
                );
                continue;
            }
        };
        for p in packs {
            let Some(actual) = trailer_digests.get(&p.name) else {
                continue; // removed by prune, or unreadable (reported above)
            };
            let listed_size = listed_map.get(&p.name.to_hex()).copied();
            let own = blake3::hash(&crate::format::pack::encode_trailer(&p.entries));
            if listed_size != Some(p.size_bytes) || own != *actual {
                report.warn(
                    what.clone(),
                    format!(
                        "its record of pack {} differs from the pack's trailer; readers that use it may look in the wrong place (reads verify every block); it may be deleted",
                        p.name.short()
                    ),
                );
            }
        }
    }

    // Harmless leftovers.
    // (Object storage has no tmp/: uploads are atomic.)
    if let Some(Ok(rd)) = repo.root().map(|r| std::fs::read_dir(r.join("tmp"))) {
        let n = rd.count();
        if n > 0 {
            report.warn(
                "tmp/".into(),
                format!(
                    "{} left by interrupted writers (harmless)",
                    plural(n, "temporary file")
                ),
            );
            report.fixed_by(fix::TMP);
        }
    }
    Ok(report)
}

/// For every snapshot (but those in `duplicated`) whose object loads and
/// whose own entries (inline,
/// or in its manifest pages) name only blocks the catalog holds and no
/// known damage touches: its parent (`None` for a full). Each page is read
/// once however many snapshots name it (synthetic fulls share pages).
/// Catalog failures end the check; anything else only makes a level
/// unsound, for the precise pass to report.
fn sound_levels(
    repo: &Repository,
    snapshots: &[super::SnapshotEntry],
    bad_blocks: &HashMap<BlockId, String>,
    duplicated: &HashSet<SnapshotId>,
) -> Result<HashMap<SnapshotId, Option<SnapshotId>>, RepoError> {
    use crate::format::snapshot::BlockRef;
    use crate::format::PageId;
    let entries_sound = |entries: &[(u64, BlockRef)]| -> Result<bool, RepoError> {
        let ids: Vec<BlockId> = entries
            .iter()
            .filter_map(|(_, r)| match r {
                BlockRef::Data(b) => Some(*b),
                _ => None,
            })
            .collect();
        for chunk in ids.chunks(4096) {
            let known = repo.catalog().contains_many(chunk)?;
            if known.iter().any(|k| !k) || chunk.iter().any(|b| bad_blocks.contains_key(b)) {
                return Ok(false);
            }
        }
        Ok(true)
    };
    // A page's fit depends on the snapshot using it (its block count).
    let mut pages: HashMap<(PageId, u64, u64, bool), bool> = HashMap::new();
    let mut sound = HashMap::new();
    for e in snapshots {
        crate::interrupt::check()?;
        // An id two objects claim is never picked: its chains resolve
        // through the precise pass, which says so.
        if duplicated.contains(&e.meta.id) {
            continue;
        }
        let level = (|| -> Result<bool, RepoError> {
            let snap = repo.load_snapshot(&e.object)?;
            if snap.meta.id != e.meta.id || snap.meta.parent != e.meta.parent {
                return Ok(false);
            }
            match &snap.body {
                super::Body::Inline { entries, .. } => entries_sound(entries),
                super::Body::Paged(table) => {
                    for row in &table.rows {
                        let key = (
                            row.id,
                            row.page_no,
                            snap.meta.block_count(),
                            table.has_bitmap,
                        );
                        let ok = match pages.get(&key) {
                            Some(ok) => *ok,
                            None => {
                                let ok = match repo.load_page(row, table, &snap.meta) {
                                    Ok(page) => entries_sound(&page.entries)?,
                                    Err(e @ RepoError::Index(_)) => return Err(e),
                                    Err(_) => false,
                                };
                                pages.insert(key, ok);
                                ok
                            }
                        };
                        if !ok {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                }
            }
        })();
        match level {
            Ok(true) => {
                sound.insert(e.meta.id, e.meta.parent);
            }
            Ok(false) => {}
            Err(err @ RepoError::Index(_)) => return Err(err),
            Err(err @ RepoError::Interrupted(_)) => return Err(err),
            Err(_) => {}
        }
    }
    Ok(sound)
}

/// Whether every level of `id`'s chain is sound and the chain ends at a
/// full manifest without looping.
fn chain_is_sound(sound: &HashMap<SnapshotId, Option<SnapshotId>>, id: SnapshotId) -> bool {
    let mut next = Some(id);
    let mut steps = 0usize;
    while let Some(at) = next {
        match sound.get(&at) {
            Some(parent) => next = *parent,
            None => return false,
        }
        steps += 1;
        if steps > sound.len() {
            return false;
        }
    }
    true
}
