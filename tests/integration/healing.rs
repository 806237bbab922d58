//! Damaged blocks heal: a blob that fails verification is recorded in the
//! catalog (kept across `repair index`), no backup deduplicates against it,
//! and the next full backup of a source holding the good block stores it
//! again, after which every snapshot naming it restores. `repair packs`
//! salvages the rest of a damaged pack; `repair snapshots` rewrites a
//! snapshot whose parent is gone.

use std::collections::BTreeSet;
use std::path::PathBuf;

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
        .map(|a| str_of(a, "snapshot_id").to_string())
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

/// The issue's scenario: back up, damage block X, `check --read-data`,
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
    let one = &report["packs"].as_array().expect("one entry per pack")[0];
    assert_eq!(u64_of(one, "blocks_salvaged"), in_pack - 1, "{report}");
    assert_eq!(
        one["dropped_block_ids"].as_array().unwrap().len(),
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
    let mut w = PackWriter::new(1 << 20, &cbtvault::crypto::Codec::Plain);
    w.add(&compress_block(&x, xid, 3).unwrap()).unwrap();
    let done = w.finish().unwrap();
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
    decompress_verified(
        &cbtvault::crypto::Codec::Plain,
        frame,
        loc.raw_length,
        xid,
        loc.pack,
    )
    .unwrap();
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

/// Writes a pack holding only `block` straight into `data/`, as a
/// concurrent backup could have left it: the catalog does not know it.
pub fn write_duplicate_pack(t: &TestRepo, block: &[u8]) -> (PathBuf, cbtvault::format::ObjectName) {
    use cbtvault::format::BlockId;
    use cbtvault::pack::{compress_block, PackWriter};
    let id = BlockId(*blake3::hash(block).as_bytes());
    let mut w = PackWriter::new(1 << 20, &cbtvault::crypto::Codec::Plain);
    w.add(&compress_block(block, id, 3).unwrap()).unwrap();
    let done = w.finish().unwrap();
    let name = done.name.to_hex();
    let dir = t.repo.join("data").join(&name[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&name), done.tail.bytes()).unwrap();
    (dir.join(name), done.name)
}

/// The damaged copies the catalog records: (block, pack, still current).
pub fn recorded_damage(t: &TestRepo) -> Vec<([u8; 32], [u8; 32], bool)> {
    let repo = cbtvault::repo::Repository::open(&t.repo).unwrap();
    let v = repo
        .catalog()
        .damaged()
        .unwrap()
        .into_iter()
        .map(|d| (d.block.0, d.pack.0, d.current))
        .collect();
    v
}

/// Block X is damaged in the pack the catalog names and intact in another
/// pack the catalog does not know: restore reads the intact copy, writes
/// the exact image, records the damage and points the catalog at the copy.
#[test]
fn restore_reads_an_intact_duplicate_when_the_catalogs_copy_is_damaged() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(60, 0, 10 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(6);
    let bad_pack = damage_block(&t, &x);
    let bad_pack = bad_pack.file_name().unwrap().to_str().unwrap().to_string();
    let (_, dup) = write_duplicate_pack(&t, &x);

    let target = t.path("out.img");
    let r = t.restore(&id, &target, &[]).ok();
    r.stderr_mentions(&[&dup.to_hex(), "intact copy"]);
    assert_eq!(hash_file(&target), img.hash(), "restored bit for bit");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), img.size());

    let xid = *blake3::hash(&x).as_bytes();
    let damage = recorded_damage(&t);
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].0, xid);
    assert_eq!(hex::encode(damage[0].1), bad_pack);
    assert!(!damage[0].2, "the catalog now names the intact copy");
    // Healed for good: the next restore needs no second search.
    let r = t.restore(&id, &t.path("again.img"), &[]).ok();
    assert!(!r.stderr.contains("intact copy"), "{}", r.stderr);
    assert_eq!(hash_file(&t.path("again.img")), img.hash());
}

/// The same through `serve`: nbdcopy reads the whole export, bit for bit,
/// though the catalog's copy of a block is damaged.
#[test]
fn serve_reads_an_intact_duplicate_when_the_catalogs_copy_is_damaged() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(61, 0, 10 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(3);
    damage_block(&t, &x);
    let (_, dup) = write_duplicate_pack(&t, &x);

    let socket = t.path("serve.sock");
    let stderr = t.path("serve.stderr");
    let mut child = Command::new(bin())
        .arg("-r")
        .arg(&t.repo)
        .args(["--json", "serve", &id, "--socket"])
        .arg(&socket)
        .env_remove("CBTVAULT_REPOSITORY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start cbtvault serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = match serde_json::from_str::<Value>(&line) {
        Ok(v) => str_of(&v, "uri").to_string(),
        Err(e) => {
            let _ = child.kill();
            panic!(
                "serve printed no uri ({e}): {line}\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
    };
    let copy = t.path("copy.img");
    let out = Command::new("nbdcopy")
        .args([&uri, copy.to_str().unwrap()])
        .output()
        .expect("nbdcopy (libnbd-bin) runs");
    // A second pass: the export found its locations at open and must not
    // fail on the damaged one now that the catalog is healed.
    let again = t.path("again.img");
    let out2 = Command::new("nbdcopy")
        .args([&uri, again.to_str().unwrap()])
        .output()
        .expect("nbdcopy runs");
    let _ = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        out.status.success() && out2.status.success(),
        "nbdcopy failed: {}{}\nserve:\n{log}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out2.stderr)
    );
    assert!(status.success(), "serve stopped cleanly: {status}\n{log}");
    assert_eq!(hash_file(&copy), img.hash(), "served bit for bit");
    assert_eq!(hash_file(&again), img.hash());
    assert!(
        log.contains(&dup.to_hex()),
        "serve names the copy it used:\n{log}"
    );
    let damage = recorded_damage(&t);
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(!damage[0].2, "{damage:?}");
}

/// No intact copy anywhere: restore stops at the damaged block (no wrong
/// bytes, no complete-looking file), the damage is recorded by the restore
/// alone (no check ran), and the next full backup stores the block again.
#[test]
fn restore_without_an_intact_copy_stops_and_records_the_damage_for_the_next_backup() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(62, 0, 10 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(5);
    let pack = damage_block(&t, &x);

    let target = t.path("out.img");
    let r = t.restore(&id, &target, &[]).expect_code(1);
    r.stderr_mentions(&["damaged", "check --read-data"]);
    assert!(!target.exists(), "no file that looks complete");
    let damage = recorded_damage(&t);
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].0, *blake3::hash(&x).as_bytes());
    assert_eq!(
        hex::encode(damage[0].1),
        pack.file_name().unwrap().to_str().unwrap()
    );
    assert!(damage[0].2, "still the catalog's only copy");

    let s = t.backup(&img.path, &["--full"]);
    assert_eq!(u64_of(&s, "blocks_new"), 1, "X stored again: {s}");
    t.assert_restores(&id, img.hash(), img.size());
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

/// A pack put back from a good copy (or damage that was in the reading):
/// the whole-pack read verifies, so `check --read-data` clears the record
/// instead of reporting the block damaged forever.
#[test]
fn damage_record_of_a_copy_that_verifies_again_is_cleared_by_check_read_data() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(31, 0, 8 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let x = img.read_block(3);
    let (pack, e) = locate(&t, &x);
    let at = e.offset + e.stored_length as u64 / 2;
    flip_byte(&pack, at);
    let (check, report) = t.check(true);
    check.expect_code(3);
    assert_eq!(affected(&report), BTreeSet::from([id.clone()]), "{report}");

    flip_byte(&pack, at); // the pack is whole again
    let (check, report) = t.check(true);
    let check = check.expect_code(0);
    check.stderr_mentions(&["verifies again", "damage record is cleared"]);
    assert!(affected(&report).is_empty(), "{report}");
    let (check, _) = t.check(false);
    check.expect_code(0);
    t.assert_restores(&id, img.hash(), img.size());
}
