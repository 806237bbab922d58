//! Index objects (format-spec/08-index.md): what backup, copy and prune
//! write covers exactly the packs in `data/`; a machine with an empty
//! cache finds the packs through them, and through the trailers when an
//! index object is damaged or missing.

use std::collections::BTreeSet;

use cbtvault::backend::{Backend, Kind, LocalBackend};
use cbtvault::format::index;
use cbtvault::format::ObjectName;

use crate::s3::S3Server;
use crate::util::*;

/// The packs all index objects of `b` name, and whether every object
/// hashes to its name and decodes.
fn indexed_packs(b: &dyn Backend) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (name, _) in b.list(Kind::Index).unwrap() {
        let bytes = b.load(Kind::Index, &name).unwrap();
        assert_eq!(
            ObjectName::of(&bytes).to_hex(),
            name,
            "index object misnamed"
        );
        for p in index::decode(&bytes, BS as u32).unwrap() {
            out.insert(p.name.to_hex());
        }
    }
    out
}

fn packs(b: &dyn Backend) -> BTreeSet<String> {
    b.list(Kind::Pack)
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect()
}

#[test]
fn backup_and_prune_keep_the_index_objects_exactly_covering_the_packs() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let b = LocalBackend::new(&t.repo);
    let img = Image::create(&t.path("disk.img"), 48 * BS);
    let mut ids = Vec::new();
    for round in 0..3u64 {
        for i in 0..48 {
            if round == 0 || i % 3 == round {
                img.write_block(i, &random_block(70 + round, i));
            }
        }
        ids.push(TestRepo::id_of(&t.backup(&img.path, &[])));
        assert_eq!(indexed_packs(&b), packs(&b), "after backup {round}");
    }
    t.run(&[&"forget", &ids[0]]).ok();
    let p = t
        .run(&[&"--json", &"prune", &"--max-unused", &"0"])
        .ok()
        .json();
    assert!(
        u64_of(&p, "packs_repacked") + u64_of(&p, "packs_deleted") > 0,
        "{p}"
    );
    assert!(u64_of(&p, "index_objects_rewritten") > 0, "{p}");
    assert_eq!(indexed_packs(&b), packs(&b), "after prune");
    t.assert_restores(&ids[2], img.hash(), img.size());
}

#[test]
fn a_second_machine_uses_index_objects_and_survives_a_damaged_one() {
    let server = S3Server::shared();
    let url = server.fresh_url("idx");
    let t = TestRepo::at(
        &url,
        server.env(),
        // Plain: the test reads the index objects' bytes itself.
        &["--pack-size-mib", "1", "--no-encrypt"],
    );
    let img = Image::create(&t.path("disk.img"), 48 * BS);
    for i in 0..48 {
        img.write_block(i, &random_block(80, i));
    }
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let b = server.backend_at(&url);
    assert_eq!(indexed_packs(&b), packs(&b));
    // A fresh machine restores through the index objects.
    t.other_machine()
        .assert_restores(&id, img.hash(), img.size());
    // One index object damaged, another removed: the trailers stand in.
    let objects = b.list(Kind::Index).unwrap();
    assert!(!objects.is_empty());
    b.save(Kind::Index, &objects[0].0, b"CBTVINDX garbage")
        .unwrap();
    if let Some((second, _)) = objects.get(1) {
        b.remove(Kind::Index, second).unwrap();
    }
    let other = t.other_machine();
    other.assert_restores(&id, img.hash(), img.size());
    // And it deduplicates against every pack it learnt of.
    let again = other.backup(&img.path, &[]);
    assert_eq!(u64_of(&again, "blocks_new"), 0, "{again}");
}

#[test]
fn check_reports_a_damaged_index_object_as_a_warning() {
    let t = TestRepo::init(&[]);
    let img = Image::create(&t.path("disk.img"), 8 * BS);
    for i in 0..8 {
        img.write_block(i, &random_block(90, i));
    }
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let (run, report) = t.check(false);
    assert_eq!(run.code, 0);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    let objects = t.files_under("index");
    assert_eq!(objects.len(), 1, "{objects:?}");
    flip_byte(&t.repo.join("index").join(&objects[0]), 30);
    let (run, report) = t.check(false);
    assert_eq!(
        run.code, 0,
        "a damaged index object is not an error: {}",
        run.stderr
    );
    let text = report["problems"].to_string();
    assert!(text.contains("does not match its name"), "{report}");
    t.assert_restores(&id, img.hash(), img.size());
}

#[test]
fn prune_merges_many_small_index_objects_into_one_even_across_a_crash() {
    let server = S3Server::shared();
    let url = server.fresh_url("idxmerge");
    let t = TestRepo::at(
        &url,
        server.env(),
        // Plain: the test reads the index objects' bytes itself.
        &["--pack-size-mib", "1", "--no-encrypt"],
    );
    let b = server.backend_at(&url);
    let img = Image::create(&t.path("disk.img"), 16 * BS);
    let mut ids = Vec::new();
    for round in 0..8u64 {
        for i in 0..16 {
            if round == 0 || i % 4 == round % 4 {
                img.write_block(i, &random_block(200 + round, i));
            }
        }
        ids.push(TestRepo::id_of(&t.backup(&img.path, &[])));
    }
    let before = b.list(Kind::Index).unwrap().len();
    assert_eq!(before, 8, "one index object per backup");
    // Killed after the merged object is written, before the old ones go:
    // both are there, and everything still reads.
    let r = t.run_env(
        &[&"prune"],
        &[("CBTVAULT_TEST_KILL", "prune_index_written:1")],
    );
    assert_eq!(r.code, -1, "prune was not killed: {}", r.stderr);
    assert_eq!(b.list(Kind::Index).unwrap().len(), before + 1);
    assert_eq!(indexed_packs(&b), packs(&b));
    t.other_machine()
        .assert_restores(&ids[7], img.hash(), img.size());
    // The next prune finishes the merge: one object, covering every pack
    // (the one the killed prune wrote comes out byte for byte the same, so
    // it stays).
    let p = t.run(&[&"--json", &"prune"]).ok().json();
    assert_eq!(u64_of(&p, "packs_deleted"), 0, "{p}");
    assert_eq!(u64_of(&p, "index_objects_rewritten"), before as u64, "{p}");
    assert_eq!(u64_of(&p, "index_objects_written"), 1, "{p}");
    assert_eq!(b.list(Kind::Index).unwrap().len(), 1);
    assert_eq!(indexed_packs(&b), packs(&b));
    let (c, report) = t.check(false);
    assert_eq!(c.code, 0, "{report}");
    // A lone small object is left as it is.
    let p = t.run(&[&"--json", &"prune"]).ok().json();
    assert_eq!(u64_of(&p, "index_objects_rewritten"), 0, "{p}");
    assert_eq!(u64_of(&p, "index_objects_written"), 0, "{p}");
    // A machine with an empty cache restores every snapshot through it.
    let other = t.other_machine();
    for id in [&ids[0], &ids[4], &ids[7]] {
        let run = other.run(&[&"--json", &"snapshots"]).ok();
        assert!(
            String::from_utf8_lossy(&run.stdout).contains(id.as_str()),
            "{id}"
        );
    }
    other.assert_restores(&ids[7], img.hash(), img.size());
}
