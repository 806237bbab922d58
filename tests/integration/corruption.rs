//! Deliberately broken repositories: one byte flipped inside a stored blob,
//! a truncated pack, a deleted pack, a damaged snapshot object, a damaged
//! pack trailer. For each, `check --read-data` exits 3 and names exactly
//! the affected snapshots, restoring an affected snapshot fails with a
//! message naming what is broken and leaves no target file behind, and a
//! snapshot stored in other packs still restores bit-exact.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use cbtvault::format::pack::{decode_pack_index, TrailerEntry};

use crate::util::*;

/// Two sources in one repository with 1 MiB packs: image A with a full
/// snapshot `a1` and an incremental `a2`, image B with one snapshot `b1`.
/// Each backup writes its own packs, so damage to A's packs spares B.
struct Fixture {
    t: TestRepo,
    a1: (String, blake3::Hash, u64),
    a2: (String, blake3::Hash, u64),
    b1: (String, blake3::Hash, u64),
    /// The pack holding block 0 of A (shared by a1 and a2), and its blob.
    pack: PathBuf,
    blob: TrailerEntry,
}

fn fixture() -> Fixture {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let a = Image::from_bytes(&t.path("a.img"), &random_bytes(20, 0, 48 * BSU));
    let a1 = TestRepo::id_of(&t.backup(&a.path, &[]));
    let a1 = (a1, a.hash(), a.size());
    a.write_block(45, &random_block(21, 45));
    let a2 = TestRepo::id_of(&t.backup(&a.path, &[]));
    let a2 = (a2, a.hash(), a.size());
    let b = Image::from_bytes(&t.path("b.img"), &random_bytes(22, 0, 32 * BSU + 100));
    let b1 = TestRepo::id_of(&t.backup(&b.path, &[]));
    let b1 = (b1, b.hash(), b.size());

    let block0: [u8; 32] = *blake3::hash(&random_bytes(20, 0, 48 * BSU)[..BSU]).as_bytes();
    let mut found = None;
    for pack in t.packs() {
        let bytes = std::fs::read(&pack).unwrap();
        let entries = decode_pack_index(&bytes, BS as u32).expect("a fresh pack decodes");
        if let Some(e) = entries.iter().find(|e| e.block_id.0 == block0) {
            found = Some((pack, *e));
        }
    }
    let (pack, blob) = found.expect("block 0 of image A is in some pack");
    Fixture {
        t,
        a1,
        a2,
        b1,
        pack,
        blob,
    }
}

impl Fixture {
    /// Asserts what `check` and `restore` report for damage that affects
    /// exactly `affected`; `restore_words` must appear in restore's error.
    #[track_caller]
    fn assert_damage(&self, affected: &[&(String, blake3::Hash, u64)], restore_words: &[&str]) {
        let t = &self.t;
        let (check, report) = t.check(true);
        check.expect_code(3);
        assert!(
            !report["problems"].as_array().expect("problems").is_empty(),
            "no problem listed: {report}"
        );
        let named = crate::healing::affected(&report);
        let want: BTreeSet<String> = affected.iter().map(|a| a.0.clone()).collect();
        assert_eq!(named, want, "affected snapshots in check --json: {report}");
        // Human output on stderr names them too.
        let human = t.run(&[&"check", &"--read-data"]).expect_code(3);
        for id in &want {
            human.stderr_mentions(&[id]);
        }

        for (id, _, _) in affected {
            let target = t.path(&format!("restore-{id}.img"));
            let r = t.restore(id, &target, &[]).expect_code(1);
            r.stderr_mentions(restore_words);
            assert!(
                !target.exists(),
                "a failed restore of {id} left '{}' behind",
                target.display()
            );
        }
        for s in [&self.a1, &self.a2, &self.b1] {
            if !want.contains(&s.0) {
                t.assert_restores(&s.0, s.1, s.2);
            }
        }
    }
}

#[test]
fn flipped_byte_in_a_blob_is_found_and_never_restored() {
    let f = fixture();
    flip_byte(&f.pack, f.blob.offset + f.blob.stored_length as u64 / 2);
    f.assert_damage(&[&f.a1, &f.a2], &["block", "pack", "check"]);
    // To stdout too: the command fails.
    f.t.restore(&f.a2.0, Path::new("-"), &[]).expect_code(1);
}

#[test]
fn truncated_pack_is_found() {
    let f = fixture();
    let len = std::fs::metadata(&f.pack).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&f.pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    f.assert_damage(&[&f.a1, &f.a2], &["pack"]);
}

#[test]
fn deleted_pack_is_found() {
    let f = fixture();
    std::fs::remove_file(&f.pack).unwrap();
    f.assert_damage(&[&f.a1, &f.a2], &["pack", "not found"]);
}

#[test]
fn corrupt_snapshot_object_affects_it_and_its_children() {
    let f = fixture();
    let path = object_path(&f.t, &f.a1.0);
    let len = std::fs::metadata(&path).unwrap().len();
    flip_byte(&path, len / 2);
    f.assert_damage(&[&f.a1, &f.a2], &["snapshot", "corrupt"]);
}

#[test]
fn corrupt_snapshot_object_of_a_child_spares_the_parent() {
    let f = fixture();
    let path = object_path(&f.t, &f.a2.0);
    // The first byte of the magic.
    flip_byte(&path, 0);
    f.assert_damage(&[&f.a2], &["snapshot", "corrupt"]);
}

#[test]
fn damaged_pack_trailer_is_found_without_reading_data() {
    let f = fixture();
    let len = std::fs::metadata(&f.pack).unwrap().len();
    // Inside the trailer's checksum, just before the 12-byte footer.
    flip_byte(&f.pack, len - 12 - 5);
    let (check, report) = f.t.check(false);
    check.expect_code(3);
    let named = crate::healing::affected(&report);
    assert_eq!(
        named,
        BTreeSet::from([f.a1.0.clone(), f.a2.0.clone()]),
        "{report}"
    );
    // The blobs themselves are intact and the catalog still locates them:
    // restore verifies every block and may succeed; B certainly does.
    f.t.assert_restores(&f.b1.0, f.b1.1, f.b1.2);
}

/// A damaged snapshot object met while the catalog is rebuilt cannot be
/// listed (its id is unreadable), but it is reported, and the snapshots
/// layered on it are named as affected.
#[test]
fn corrupt_snapshot_object_is_reported_after_a_catalog_rebuild() {
    let f = fixture();
    let object =
        f.t.snapshots(&[])
            .into_iter()
            .find(|s| s["snapshot_id"].as_str() == Some(f.a1.0.as_str()))
            .map(|s| str_of(&s, "object").to_string())
            .expect("a1 listed");
    let path = f.t.repo.join("snapshots").join(&object);
    flip_byte(&path, std::fs::metadata(&path).unwrap().len() / 2);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(f.t.repo.join(format!("catalog.sqlite{suffix}")));
    }
    let (check, report) = f.t.check(true);
    check.expect_code(3).stderr_mentions(&[&object]);
    let named = crate::healing::affected(&report);
    assert!(
        named.contains(&f.a2.0),
        "the child of the damaged object is affected: {report}"
    );
    assert!(!named.contains(&f.b1.0), "{report}");
    f.t.restore(&f.a2.0, &f.t.path("a2.img"), &[])
        .expect_code(1);
    assert!(!f.t.path("a2.img").exists());
    f.t.assert_restores(&f.b1.0, f.b1.1, f.b1.2);
}

/// A modified pack whose every blob still verifies (a flip of the zstd
/// frame header's unused bit, which decoders ignore): check finds it by
/// its name, nothing restores wrong, and `repair packs` (the fix check
/// names) rewrites it so that check is clean again.
#[test]
fn modified_pack_whose_blobs_still_verify_is_repaired() {
    let f = fixture();
    let t = &f.t;
    // Packs are named by their trailer and footer (02-pack.md#naming). A
    // change in the blob area that decodes the same (byte 4 of a frame is
    // its Frame_Header_Descriptor; bit 4 is unused) changes nothing any
    // reader returns: check passes and every snapshot restores bit for bit.
    let flip = |at: u64| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.pack)
            .unwrap();
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, at).unwrap();
        b[0] ^= 0x10;
        std::os::unix::fs::FileExt::write_all_at(&file, &b, at).unwrap();
    };
    flip(f.blob.offset + 4);
    let (check, report) = t.check(true);
    check.ok();
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    for s in [&f.a1, &f.a2, &f.b1] {
        t.assert_restores(&s.0, s.1, s.2);
    }
    flip(f.blob.offset + 4);
    // A pack whose tail is whole but is not the one its name was made of
    // (here: its pack id changed and the trailer hash made to match).
    let misname = |pack: &Path| {
        let bytes = std::fs::read(pack).unwrap();
        let footer_at = bytes.len() - 12;
        let t_len = u32::from_le_bytes(bytes[footer_at + 8..].try_into().unwrap()) as usize;
        let trailer_at = footer_at - t_len;
        assert_eq!(
            &bytes[trailer_at + 4..trailer_at + 8],
            &1u32.to_le_bytes(),
            "trailer format 1"
        );
        let mut body = bytes[trailer_at..footer_at - 32].to_vec();
        body[8] ^= 0xff; // the first byte of the pack id
        let mut renamed = bytes[..trailer_at].to_vec();
        renamed.extend_from_slice(&body);
        renamed.extend_from_slice(blake3::hash(&body).as_bytes());
        renamed.extend_from_slice(&bytes[footer_at..]);
        std::fs::write(pack, &renamed).unwrap();
    };
    misname(&f.pack);
    // Check without --read-data finds it from the two reads that list the
    // pack, names the fix, and records its copies damaged, which is what
    // `repair packs` acts on; its blobs still verify, so restores are
    // unaffected.
    let (check, report) = t.check(false);
    check.expect_code(3);
    let problems = report["problems"].as_array().expect("problems");
    let named: Vec<_> = problems
        .iter()
        .filter(|p| p.to_string().contains("does not match its name"))
        .collect();
    assert_eq!(named.len(), 1, "{report}");
    assert_eq!(named[0]["fix"], "cbtvault repair packs", "{report}");
    for s in [&f.a1, &f.a2, &f.b1] {
        t.assert_restores(&s.0, s.1, s.2);
    }
    t.run(&[&"repair", &"packs"]).ok();
    let (check, report) = t.check(true);
    check.ok();
    assert!(
        !f.pack.exists(),
        "the modified pack is still there: {report}"
    );
    for s in [&f.a1, &f.a2, &f.b1] {
        t.assert_restores(&s.0, s.1, s.2);
    }
    // With --read-data the same damage is reported once, not again by
    // the pass that reads the whole pack.
    let rewritten: Vec<PathBuf> = t
        .packs()
        .into_iter()
        .filter(|p| {
            decode_pack_index(&std::fs::read(p).unwrap(), BS as u32)
                .is_ok_and(|e| e.iter().any(|e| e.block_id == f.blob.block_id))
        })
        .collect();
    assert_eq!(rewritten.len(), 1);
    misname(&rewritten[0]);
    let (check, report) = t.check(true);
    check.expect_code(3);
    assert_eq!(
        report
            .to_string()
            .matches("does not match its name")
            .count(),
        1,
        "reported once: {report}"
    );
    t.run(&[&"repair", &"packs"]).ok();
    t.check(true).0.ok();
}

/// `check` reads each level once and resolves only chains with an unsound
/// level: a pack lost under a full whose every block a later incremental
/// replaced makes the full affected, never the incremental (its resolved
/// disk names none of the lost blocks), and both answers match restore.
#[test]
fn lost_blocks_a_newer_level_replaced_spare_the_newer_snapshot() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("d.img"), &random_bytes(31, 0, 4 * BSU));
    let full = TestRepo::id_of(&t.backup(&img.path, &[]));
    let first_packs = t.packs();
    for i in 0..4 {
        img.write_block(i, &random_block(32, i));
    }
    let inc = TestRepo::id_of(&t.backup(&img.path, &[]));
    let (inc_hash, inc_len) = (img.hash(), img.size());
    for p in &first_packs {
        std::fs::remove_file(p).unwrap();
    }
    let (check, report) = t.check(false);
    check.expect_code(3);
    let named = crate::healing::affected(&report);
    assert_eq!(named, BTreeSet::from([full.clone()]), "{report}");
    t.assert_restores(&inc, inc_hash, inc_len);
    t.restore(&full, &t.path("full.img"), &[]).expect_code(1);
}
