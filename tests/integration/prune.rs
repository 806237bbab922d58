//! `prune` through the real binary: it removes exactly the blobs no
//! snapshot object references, every remaining snapshot restores bit for
//! bit, `--max-unused` and `--dry-run` do what they say, a damaged used
//! blob keeps its pack, packs without rows are adopted or removed, old
//! `tmp/` files go, a kill at each of prune's steps leaves a repository
//! that checks and restores, and prune and backup exclude each other.
//!
//! Until `forget` lands, a forget is simulated by removing the snapshot
//! object file directly: every test snapshot is a `--full` backup (a full
//! manifest, no parent), so removing one breaks no chain.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use cbtvault::format::pack::{decode_pack_index, TrailerEntry};
use cbtvault::format::snapshot::BlockRef;
use cbtvault::format::BlockId;
use serde_json::Value;

use crate::util::*;

const BLOCKS: u64 = 24;

/// A repository with `versions` full snapshots of one image (1 MiB packs,
/// 6 of 24 blocks changed per version) and the bytes each one holds.
struct History {
    t: TestRepo,
    /// (snapshot id, image hash, image length), oldest first.
    snaps: Vec<(String, blake3::Hash, u64)>,
}

fn history(versions: u64) -> History {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::create(&t.path("disk.img"), BLOCKS * BS);
    for i in 0..BLOCKS {
        img.write_block(i, &random_block(1, i));
    }
    let mut snaps = Vec::new();
    for v in 0..versions {
        if v > 0 {
            for k in 0..6 {
                let i = (v * 7 + k * 5) % BLOCKS;
                img.write_block(i, &random_block(100 + v, i));
            }
        }
        let s = t.backup(&img.path, &["--full"]);
        snaps.push((TestRepo::id_of(&s), img.hash(), img.size()));
    }
    History { t, snaps }
}

impl History {
    /// Simulated forget (see the module comment): removes the snapshot
    /// object of `snaps[k]`.
    fn forget(&mut self, ks: &[usize]) {
        let mut ks = ks.to_vec();
        ks.sort_unstable();
        for &k in ks.iter().rev() {
            let (id, _, _) = self.snaps.remove(k);
            std::fs::remove_file(object_path(&self.t, &id)).expect("remove snapshot object");
        }
    }

    fn assert_all_restore(&self) {
        for (id, h, len) in &self.snaps {
            self.t.assert_restores(id, *h, *len);
        }
    }

    fn prune(&self, extra: &[&str]) -> Value {
        self.try_prune(extra, &[]).ok().json()
    }

    fn try_prune(&self, extra: &[&str], env: &[(&str, &str)]) -> Run {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--json", &"prune"];
        for e in extra {
            args.push(e);
        }
        self.t.run_env(&args, env)
    }

    fn check_passes(&self) {
        let (r, report) = self.t.check(true);
        assert_eq!(r.code, 0, "check --read-data: {report}\n{}", r.stderr);
    }
}

/// Every block id some snapshot object in `snapshots/` names.
fn referenced(t: &TestRepo) -> HashSet<BlockId> {
    let mut out = HashSet::new();
    let codec = repo_codec(t);
    for name in t.files_under("snapshots") {
        for (_, r) in object_entries(t, &codec, &name).expect("snapshot decodes") {
            if let BlockRef::Data(id) = r {
                out.insert(id);
            }
        }
    }
    out
}

/// Every pack's trailer entries, by pack path.
fn trailers(t: &TestRepo) -> HashMap<String, Vec<TrailerEntry>> {
    t.packs()
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let entries = decode_pack_index(&bytes, BS as u32).expect("trailer decodes");
            (p.display().to_string(), entries)
        })
        .collect()
}

/// Blobs (pack path, block) whose block no snapshot object names, with an
/// oracle independent of prune's own: every snapshot object decoded, every
/// pack trailer read. `Err` when a snapshot object does not decode (what it
/// references is unknown); packs whose trailer does not decode are skipped.
pub(crate) fn unreferenced_blobs(t: &TestRepo) -> Result<Vec<(String, BlockId)>, String> {
    let codec = repo_codec(t);
    let mut used = HashSet::new();
    for name in t.files_under("snapshots") {
        for (_, r) in object_entries(t, &codec, &name)? {
            if let BlockRef::Data(id) = r {
                used.insert(id);
            }
        }
    }
    let mut out = Vec::new();
    for p in t.packs() {
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        let Ok(entries) = cbtvault::format::pack::decode_pack_index_framed(
            &bytes,
            BS as u32,
            codec.framing(),
            |t| codec.open_trailer(t).map_err(|e| e.to_string()),
        ) else {
            continue;
        };
        for e in entries {
            if !used.contains(&e.block_id) {
                out.push((p.display().to_string(), e.block_id));
            }
        }
    }
    Ok(out)
}

/// (used blob bytes, unused blob bytes) over every pack.
fn blob_bytes(t: &TestRepo) -> (u64, u64) {
    let used = referenced(t);
    let mut seen = HashSet::new();
    let (mut u, mut n) = (0, 0);
    for e in trailers(t).values().flatten() {
        if used.contains(&e.block_id) && seen.insert(e.block_id) {
            u += e.stored_length as u64;
        } else {
            n += e.stored_length as u64;
        }
    }
    (u, n)
}

/// The packs hold every referenced block exactly once and nothing else.
#[track_caller]
fn assert_exactly_referenced(t: &TestRepo) {
    let used = referenced(t);
    let mut stored = Vec::new();
    for entries in trailers(t).values() {
        stored.extend(entries.iter().map(|e| e.block_id));
    }
    let set: HashSet<BlockId> = stored.iter().copied().collect();
    assert_eq!(set.len(), stored.len(), "a block is stored twice");
    let unreferenced = set.difference(&used).count();
    let missing = used.difference(&set).count();
    assert_eq!(
        (unreferenced, missing),
        (0, 0),
        "blobs no snapshot references / referenced blocks in no pack"
    );
}

fn listing(t: &TestRepo) -> Vec<(String, Vec<u8>)> {
    t.files_under("")
        .into_iter()
        .filter(|n| !n.starts_with("catalog"))
        .map(|n| {
            let bytes = std::fs::read(t.repo.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

#[test]
fn prune_removes_exactly_the_unreferenced_blobs() {
    let mut h = history(6);
    let before = referenced(&h.t);
    h.forget(&[0, 2, 3]);
    let after = referenced(&h.t);
    assert!(after.len() < before.len(), "the forget left garbage");
    let packs_before = h.t.packs().len();
    let r = h.prune(&["--max-unused", "0"]);
    for key in [
        "packs_deleted",
        "packs_repacked",
        "packs_written",
        "deleted_bytes",
        "rewritten_bytes",
        "reclaimed_bytes",
        "blobs_unused_remaining",
    ] {
        assert!(r[key].is_u64(), "{key} in {r}");
    }
    assert!(r["duration_seconds"].is_f64(), "{r}");
    assert!(r["damaged"].as_array().unwrap().is_empty(), "{r}");
    assert!(
        u64_of(&r, "packs_deleted") + u64_of(&r, "packs_repacked") > 0,
        "{r}"
    );
    assert_eq!(u64_of(&r, "blobs_unused_remaining"), 0, "{r}");
    assert_eq!(
        u64_of(&r, "reclaimed_bytes"),
        u64_of(&r, "deleted_bytes") - u64_of(&r, "rewritten_bytes")
    );
    assert!(h.t.packs().len() <= packs_before);
    assert_exactly_referenced(&h.t);
    h.assert_all_restore();
    h.check_passes();
    // Nothing left to do.
    let again = h.prune(&["--max-unused", "0"]);
    assert_eq!(u64_of(&again, "packs_deleted"), 0, "{again}");
    assert_eq!(u64_of(&again, "packs_repacked"), 0, "{again}");
    // Forgetting everything but the newest still keeps it whole.
    let all: Vec<usize> = (0..h.snaps.len() - 1).collect();
    h.forget(&all);
    h.prune(&["--max-unused", "0"]);
    assert_exactly_referenced(&h.t);
    h.assert_all_restore();
    h.check_passes();
}

#[test]
fn max_unused_bounds_what_stays() {
    let mut h = history(8);
    h.forget(&[0, 1, 3, 5]);
    let (used, unused) = blob_bytes(&h.t);
    assert!(unused * 10 > used + unused, "too little garbage to test");

    // unlimited: only packs with no used blob go; nothing is rewritten.
    let r = h.prune(&["--max-unused", "unlimited"]);
    assert_eq!(u64_of(&r, "packs_repacked"), 0, "{r}");
    assert_eq!(u64_of(&r, "packs_written"), 0, "{r}");
    assert_eq!(u64_of(&r, "rewritten_bytes"), 0, "{r}");

    // default 10%: the unused share ends at or below 10%.
    let r = h.prune(&[]);
    let (used, unused) = blob_bytes(&h.t);
    assert!(
        unused * 100 <= 10 * (used + unused),
        "unused {unused} of {} after the default prune: {r}",
        used + unused
    );
    assert_eq!(u64_of(&r, "unused_remaining_bytes"), unused, "{r}");
    h.assert_all_restore();
    h.check_passes();
    assert!(matches!(
        h.try_prune(&["--max-unused", "100%"], &[]).code,
        1 | 2
    ));
    assert!(matches!(
        h.try_prune(&["--max-unused", "lots"], &[]).code,
        1 | 2
    ));
}

#[test]
fn dry_run_writes_nothing_and_predicts_the_run() {
    let mut h = history(5);
    h.forget(&[1, 2]);
    let before = listing(&h.t);
    let dry = h.prune(&["--dry-run", "--max-unused", "0"]);
    assert_eq!(dry["dry_run"], Value::Bool(true));
    assert!(listing(&h.t) == before, "--dry-run changed the repository");
    let real = h.prune(&["--max-unused", "0"]);
    for key in ["packs_deleted", "packs_repacked", "deleted_bytes"] {
        assert_eq!(dry[key], real[key], "{key}: dry {dry} real {real}");
    }
    assert_exactly_referenced(&h.t);
    h.assert_all_restore();
}

#[test]
fn a_damaged_used_blob_keeps_its_pack_and_fails_the_run() {
    let mut h = history(5);
    h.forget(&[0, 1]);
    let used = referenced(&h.t);
    // A pack with both used and unused blobs is repacked with 0.
    let (pack, victim) = trailers(&h.t)
        .into_iter()
        .find_map(|(p, es)| {
            let u: Vec<_> = es.iter().filter(|e| used.contains(&e.block_id)).collect();
            (!u.is_empty() && u.len() < es.len()).then(|| (p, *u[0]))
        })
        .expect("a pack with used and unused blobs");
    flip_byte(
        Path::new(&pack),
        victim.offset + victim.stored_length as u64 / 2,
    );
    let r = h.try_prune(&["--max-unused", "0"], &[]).expect_code(3);
    let report = r.json();
    let damaged = report["damaged"].as_array().unwrap();
    assert!(
        damaged
            .iter()
            .any(|d| d["block_id"].as_str() == Some(&victim.block_id.to_hex())),
        "{report}"
    );
    assert!(
        Path::new(&pack).exists(),
        "the damaged block's pack was removed"
    );
    // Everything else is stored exactly once more: only the kept pack
    // holds garbage, and every block but the victim is still stored.
    let stored: HashSet<BlockId> = trailers(&h.t)
        .values()
        .flatten()
        .map(|e| e.block_id)
        .collect();
    assert!(used.iter().all(|b| stored.contains(b)));
}

#[test]
fn packs_without_rows_are_adopted_or_removed_and_old_tmp_files_go() {
    let h = history(3);
    // A failed backup: its packs are durable, its snapshot never written.
    let img = Image::create(&h.t.path("other.img"), 8 * BS);
    for i in 0..8 {
        img.write_block(i, &random_block(77, i));
    }
    let packs_before = h.t.packs().len();
    h.t.run_env(
        &[&"backup", &img.path],
        &[("CBTVAULT_TEST_FAILPOINT", "commit_snapshot:1")],
    )
    .expect_code(1);
    let failed_packs = h.t.packs().len() - packs_before;
    // Drop the catalog rows of every pack (as a crash before the rows
    // were committed leaves them): used packs must be adopted, the failed
    // backup's removed.
    let config: Value =
        serde_json::from_slice(&std::fs::read(h.t.repo.join("config")).unwrap()).unwrap();
    {
        let mut cat = cbtvault::index::Catalog::reopen(
            &h.t.repo.join("catalog.sqlite"),
            str_of(&config, "id"),
        )
        .unwrap();
        for p in h.t.files_under("data") {
            let name = Path::new(&p).file_name().unwrap().to_str().unwrap();
            cat.remove_pack(&name.parse().unwrap()).unwrap();
        }
    }
    let tmp = h.t.repo.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("old"), b"left by a crash").unwrap();
    std::fs::write(tmp.join("fresh"), b"being written").unwrap();
    let ok = Command::new("touch")
        .args(["-d", "10 minutes ago"])
        .arg(tmp.join("old"))
        .status()
        .unwrap();
    assert!(ok.success());

    let r = h.prune(&["--max-unused", "unlimited"]);
    assert!(u64_of(&r, "packs_adopted") > 0, "{r}");
    assert!(
        u64_of(&r, "packs_deleted") >= failed_packs as u64,
        "{failed_packs} packs of the failed backup: {r}"
    );
    assert_eq!(u64_of(&r, "tmp_files_removed"), 1, "{r}");
    assert!(!tmp.join("old").exists() && tmp.join("fresh").exists());
    h.assert_all_restore();
    h.check_passes();
    h.prune(&["--max-unused", "0"]);
    assert_exactly_referenced(&h.t);
}

#[test]
fn a_kill_at_each_step_leaves_a_repository_that_checks_and_restores() {
    for point in ["prune_repacked", "prune_committed", "prune_removed"] {
        let mut h = history(5);
        h.forget(&[0, 2]);
        let r = h.try_prune(
            &["--max-unused", "0"],
            &[("CBTVAULT_TEST_KILL", &format!("{point}:1"))],
        );
        assert_eq!(r.code, -1, "{point}: prune was not killed: {}", r.stderr);
        let (c, report) = h.t.check(true);
        assert_eq!(c.code, 0, "{point}: check after the kill: {report}");
        h.assert_all_restore();
        let again = h.prune(&["--max-unused", "0"]);
        assert!(again["damaged"].as_array().unwrap().is_empty(), "{point}");
        assert_exactly_referenced(&h.t);
        h.assert_all_restore();
        h.check_passes();
    }
}

/// Starts `cbtvault -r REPO ARGS` in the background.
#[test]
fn prune_and_backup_exclude_each_other() {
    let mut h = history(3);
    h.forget(&[0]);
    let img = Image::create(&h.t.path("disk2.img"), 4 * BS);
    for i in 0..4 {
        img.write_block(i, &random_block(9, i));
    }
    // A backup holds its shared lock: prune fails naming it.
    let mut backup = spawn(
        &h.t,
        &[&"backup", &img.path],
        &[("CBTVAULT_TEST_DELAY", "commit_snapshot:3000")],
    );
    wait_for_lock(&h.t, &mut backup);
    let r = h.try_prune(&[], &[]).expect_code(11);
    r.stderr_mentions(&["locked by", "backup"]);
    assert!(backup.wait().unwrap().success(), "the backup failed");

    // Prune holds the exclusive lock: a backup fails naming it.
    let mut prune = spawn(
        &h.t,
        &[&"prune", &"--max-unused", &"0"],
        &[("CBTVAULT_TEST_DELAY", "prune_marked:3000")],
    );
    wait_for_lock(&h.t, &mut prune);
    let b = h.t.try_backup(&img.path, &[]).expect_code(11);
    b.stderr_mentions(&["locked by", "prune"]);
    let out = prune.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    h.check_passes();
    h.assert_all_restore();
    let ids = h.t.snapshot_ids();
    assert_eq!(
        ids.len(),
        h.snaps.len() + 1,
        "the first backup's snapshot is missing"
    );
    assert_exactly_referenced(&h.t);
}

#[test]
fn a_spare_copy_outlives_a_silently_corrupt_located_copy() {
    let mut h = history(2);
    let img = Image::create(&h.t.path("other.img"), 8 * BS);
    for i in 0..8 {
        img.write_block(i, &random_block(55, i));
    }
    // A copy of it with another first block (so its pack differs).
    let twin = Image::create(&h.t.path("twin.img"), 8 * BS);
    for i in 1..8 {
        twin.write_block(i, &random_block(55, i));
    }
    twin.write_block(0, &random_block(56, 0));
    // Both backed up at once (both hold shared locks, neither sees the
    // other's blocks before it commits): blocks 1..8 are stored twice; the
    // catalog locates one copy, the other is a spare.
    // Each waits between its catalog lookups and its pack writes, so
    // neither sees the other's copies however the two start.
    let env = [("CBTVAULT_TEST_DELAY", "backup_deduped:3000")];
    let a = spawn(&h.t, &[&"backup", &img.path], &env);
    let b = spawn(&h.t, &[&"backup", &twin.path], &env);
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for s in h.t.snapshots(&[]) {
        let id = str_of(&s, "snapshot_id").to_string();
        if !h.snaps.iter().any(|k| k.0 == id) {
            let i = if str_of(&s, "source").ends_with("twin.img") {
                &twin
            } else {
                &img
            };
            h.snaps.push((id, i.hash(), i.size()));
        }
    }
    assert_eq!(h.snaps.len(), 4);
    // The located copy of one new block rots silently.
    let block = BlockId::of(&random_block(55, 3));
    let config: Value =
        serde_json::from_slice(&std::fs::read(h.t.repo.join("config")).unwrap()).unwrap();
    let located =
        cbtvault::index::Catalog::reopen(&h.t.repo.join("catalog.sqlite"), str_of(&config, "id"))
            .unwrap()
            .lookup(&block)
            .unwrap()
            .expect("the block is catalogued");
    let copies: Vec<(String, TrailerEntry)> = trailers(&h.t)
        .into_iter()
        .flat_map(|(p, es)| {
            es.into_iter()
                .filter(|e| e.block_id == block)
                .map(move |e| (p.clone(), e))
        })
        .collect();
    assert_eq!(copies.len(), 2, "the block is stored twice: {copies:?}");
    let (path, e) = copies
        .iter()
        .find(|(p, _)| p.ends_with(&located.pack.to_hex()))
        .expect("the located copy");
    flip_byte(Path::new(path), e.offset + e.stored_length as u64 / 2);

    // The spare's pack holds nothing the catalog locates, or little: with
    // no look at the located copies it would go, and the block with it.
    let r = h.try_prune(&["--max-unused", "0"], &[]);
    assert!(r.code == 0 || r.code == 3, "prune: {}", r.stderr);
    h.assert_all_restore();
    // The rot is garbage now; another prune reclaims it and all checks.
    h.prune(&["--max-unused", "0"]);
    h.check_passes();
    h.assert_all_restore();
}
