//! Damaged blocks heal: a blob that fails verification is recorded in the
//! catalog (kept across `repair index`), no backup deduplicates against it,
//! and the next full backup of a source holding the good block stores it
//! again, after which every snapshot naming it restores. `repair packs`
//! salvages the rest of a damaged pack; `repair snapshots` rewrites a
//! snapshot whose parent is gone.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cbtvault::format::pack::{decode_pack_index, TrailerEntry};
use serde_json::Value;

use crate::util::*;

/// The pack holding the block with content `block`, and its trailer entry.
pub fn locate(t: &TestRepo, block: &[u8]) -> (PathBuf, TrailerEntry) {
    let id: [u8; 32] = *blake3::hash(block).as_bytes();
    for pack in t.packs() {
        let bytes = std::fs::read(&pack).unwrap();
        let entries = decode_pack_index(&bytes, BS as u32).expect("a fresh pack decodes");
        if let Some(e) = entries.iter().find(|e| e.block_id.0 == id) {
            return (pack, *e);
        }
    }
    panic!("block not in any pack");
}

pub fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

/// Flips a byte in the middle of the stored frame of `block`.
pub fn damage_block(t: &TestRepo, block: &[u8]) -> PathBuf {
    let (pack, e) = locate(t, block);
    flip_byte(&pack, e.offset + e.stored_length as u64 / 2);
    pack
}

pub fn affected(report: &Value) -> BTreeSet<String> {
    report["affected_snapshots"]
        .as_array()
        .expect("affected_snapshots")
        .iter()
        .map(|a| str_of(a, "id").to_string())
        .collect()
}

pub fn fixes(report: &Value) -> BTreeSet<String> {
    report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["fix"].as_str().map(str::to_string))
        .collect()
}

/// The scenario: back up, damage block X, `check --read-data`,
/// `repair index`, then `backup --full` of the image holding the good X.
#[test]
fn damaged_block_is_stored_again_by_the_next_full_backup() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(30, 0, 24 * BSU));
    let old = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(7);
    damage_block(&t, &x);

    let (check, report) = t.check(true);
    check.expect_code(3);
    assert_eq!(affected(&report), BTreeSet::from([old.clone()]), "{report}");
    assert!(
        fixes(&report).iter().any(|f| f.contains("repair packs")),
        "{report}"
    );

    t.run(&[&"repair", &"index"]).ok();
    // The rebuild kept what reading found: a check that reads nothing
    // still names the damage and the snapshot.
    let (check, report) = t.check(false);
    check.expect_code(3);
    assert_eq!(affected(&report), BTreeSet::from([old.clone()]), "{report}");

    let summary = t.backup(&img.path, &["--full"]);
    assert_eq!(
        u64_of(&summary, "blocks_new"),
        1,
        "X stored again: {summary}"
    );
    let new = TestRepo::id_of(&summary);
    t.assert_restores(&new, img.hash(), img.size());
    // X's content is available again, so the old snapshot restores too.
    t.assert_restores(&old, img.hash(), img.size());
    let (check, report) = t.check(false);
    check.ok();
    assert!(affected(&report).is_empty(), "{report}");
}

/// A reader that finds a damaged blob records it (Repository::mark_damaged):
/// an incremental that rewrites the damaged block's content elsewhere does
/// not deduplicate against the damaged copy.
#[test]
fn backup_never_deduplicates_against_a_recorded_damaged_block() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(31, 0, 8 * BSU));
    t.backup(&img.path, &[]);
    let x = img.read_block(2);
    damage_block(&t, &x);
    t.check(true).0.expect_code(3);
    // A second source holding X: X is stored again, not deduplicated.
    let other = Image::from_bytes(&t.path("other.img"), &[x, random_block(32, 1)].concat());
    let s = t.backup(&other.path, &[]);
    assert_eq!(u64_of(&s, "blocks_new"), 2, "{s}");
    assert_eq!(u64_of(&s, "blocks_deduplicated"), 0, "{s}");
    t.assert_restores(&TestRepo::id_of(&s), other.hash(), other.size());
}

/// The file of snapshot `id`'s live object.
pub fn object_path(t: &TestRepo, id: &str) -> PathBuf {
    let object = t
        .snapshots(&[])
        .into_iter()
        .find(|s| s["id"].as_str() == Some(id))
        .map(|s| str_of(&s, "object").to_string())
        .unwrap_or_else(|| panic!("{id} listed"));
    t.repo.join("snapshots").join(object)
}

#[test]
fn repair_packs_salvages_the_good_blocks_of_a_damaged_pack() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(33, 0, 24 * BSU));
    let old = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(7);
    let pack = damage_block(&t, &x);
    let in_pack = decode_pack_index(&std::fs::read(&pack).unwrap(), BS as u32)
        .unwrap()
        .len() as u64;
    t.check(true).0.expect_code(3);

    let r = t.run(&[&"--json", &"repair", &"packs"]).ok();
    let report = r.json();
    let one = &report.as_array().expect("one entry per pack")[0];
    assert_eq!(u64_of(one, "blocks_salvaged"), in_pack - 1, "{report}");
    assert_eq!(
        one["blocks_dropped"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    assert!(!pack.exists(), "the damaged pack is removed");

    // Nothing damaged is stored any more; X is simply missing, and check
    // says which command brings it back.
    let (check, report) = t.check(true);
    check.expect_code(3);
    assert_eq!(affected(&report), BTreeSet::from([old.clone()]), "{report}");
    assert!(
        fixes(&report).iter().any(|f| f.contains("backup --full")),
        "{report}"
    );

    let s = t.backup(&img.path, &["--full"]);
    assert_eq!(u64_of(&s, "blocks_new"), 1, "only X is stored again: {s}");
    t.check(true).0.ok();
    t.assert_restores(&old, img.hash(), img.size());
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

#[test]
fn repair_snapshots_rewrites_a_snapshot_whose_parent_is_gone() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(34, 0, 8 * BSU));
    let s1 = TestRepo::id_of(&t.backup(&img.path, &[]));
    // Every block changes: s2's own entries describe the whole disk.
    for i in 0..8 {
        img.write_block(i, &random_block(35, i));
    }
    let s2 = TestRepo::id_of(&t.backup(&img.path, &[]));
    let at_s2 = (img.hash(), img.size());
    img.write_block(3, &random_block(36, 3));
    let s3 = TestRepo::id_of(&t.backup(&img.path, &[]));
    std::fs::remove_file(object_path(&t, &s1)).unwrap();

    let (check, report) = t.check(false);
    check.expect_code(3);
    assert_eq!(
        affected(&report),
        BTreeSet::from([s2.clone(), s3.clone()]),
        "{report}"
    );
    assert!(
        fixes(&report)
            .iter()
            .any(|f| f.contains("repair snapshots")),
        "{report}"
    );

    t.run(&[&"repair", &"snapshots"]).ok();
    t.check(false).0.ok();
    t.assert_restores(&s2, at_s2.0, at_s2.1);
    t.assert_restores(&s3, img.hash(), img.size());
    let obj = t.cat_snapshot(&s2);
    assert!(obj.to_string().contains("repaired"), "{obj}");
}

#[test]
fn repair_snapshots_reports_a_snapshot_its_own_blocks_cannot_describe() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(37, 0, 8 * BSU));
    let s1 = TestRepo::id_of(&t.backup(&img.path, &[]));
    img.write_block(2, &random_block(38, 2));
    let s2 = TestRepo::id_of(&t.backup(&img.path, &[]));
    std::fs::remove_file(object_path(&t, &s1)).unwrap();
    let r = t.run(&[&"repair", &"snapshots"]).expect_code(3);
    r.stderr_mentions(&[&s2, "cannot be repaired", "backup --full"]);
    // Nothing was rewritten: the snapshot still fails, loudly.
    t.restore(&s2, &t.path("out.img"), &[]).expect_code(1);
}

/// A reader whose copy failed verification finds an intact duplicate in
/// another pack (Repository::intact_copies), verifies it and points the
/// catalog at it (Repository::use_copy): the snapshot restores again
/// without a new backup.
#[test]
fn an_intact_duplicate_in_another_pack_heals_the_catalog() {
    use cbtvault::format::BlockId;
    use cbtvault::pack::{compress_block, decompress_verified, PackWriter};
    use cbtvault::repo::Repository;

    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(39, 0, 6 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(4);
    let damaged_pack = damage_block(&t, &x);
    t.check(true).0.expect_code(3);
    t.restore(&id, &t.path("bad.img"), &[]).expect_code(1);

    // A second pack holding X, as a concurrent backup could have written.
    let xid = BlockId(*blake3::hash(&x).as_bytes());
    let mut w = PackWriter::new(1 << 20);
    w.add(&compress_block(&x, xid, 3).unwrap()).unwrap();
    let done = w.finish();
    let name = done.name.to_hex();
    let dir = t.repo.join("data").join(&name[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&name), done.tail.bytes()).unwrap();

    let repo = Repository::open(&t.repo).unwrap();
    let copies = repo.intact_copies(&xid).unwrap();
    assert_eq!(copies.len(), 1, "the damaged copy is not offered");
    let (loc, size) = copies[0];
    assert_eq!(loc.pack, done.name);
    assert_ne!(dir.join(&name), damaged_pack);
    let bytes = std::fs::read(dir.join(&name)).unwrap();
    let frame = &bytes[loc.offset as usize..(loc.offset + loc.stored_length as u64) as usize];
    decompress_verified(frame, loc.raw_length, xid, loc.pack).unwrap();
    repo.use_copy(&xid, &loc, size).unwrap();
    drop(repo);

    t.assert_restores(&id, img.hash(), img.size());
}

/// `repair packs` stopped after its catalog commit and before removing the
/// old pack (crash table 06-ordering.md#repair-packs, third row): check
/// accepts the state with a warning at most, a `repair index` in between
/// does not bring the damaged copy back into use, and running the repair
/// again finishes the job.
#[test]
fn repair_packs_interrupted_before_removing_the_old_pack_is_finished_by_a_rerun() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(53, 0, 12 * BSU));
    let old = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(5);
    let pack = damage_block(&t, &x);
    t.check(true).0.expect_code(3);
    t.run_env(
        &[&"repair", &"packs"],
        &[("CBTVAULT_TEST_FAILPOINT", "repair_pack_remove:1")],
    )
    .expect_code(1);
    assert!(pack.exists(), "stopped before the removal");
    t.run(&[&"repair", &"index"]).ok();
    // X's only copy is the damaged one, still recorded: a backup stores it.
    let (_, report) = t.check(false);
    assert_eq!(affected(&report), BTreeSet::from([old.clone()]), "{report}");
    t.run(&[&"repair", &"packs"]).ok();
    assert!(!pack.exists());
    let s = t.backup(&img.path, &["--full"]);
    assert_eq!(u64_of(&s, "blocks_new"), 1, "{s}");
    t.check(true).0.ok();
    t.assert_restores(&old, img.hash(), img.size());
}
