//! A damaged catalog file (garbage pages, garbage header, truncation) is
//! moved aside as `catalog.corrupt-<time>` and rebuilt from the packs with
//! a loud warning; where it cannot be rebuilt (`--no-lock`) the command
//! fails naming the file and `repair index` (spec:
//! format-spec/04-catalog.md#corrupt).

use std::os::unix::fs::FileExt;

use crate::util::*;

const PAGE: u64 = 4096;

fn catalog(t: &TestRepo) -> std::path::PathBuf {
    t.repo.join("catalog.sqlite")
}

/// Overwrites the pages between the first and the last of the catalog
/// with garbage (the header page stays, so SQLite opens the file).
fn garbage_middle_pages(t: &TestRepo) {
    let path = catalog(t);
    let mut wal = path.clone().into_os_string();
    wal.push("-wal");
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "the catalog was checkpointed on close"
    );
    let len = std::fs::metadata(&path).unwrap().len();
    let pages = len / PAGE;
    assert!(
        pages >= 4,
        "a catalog of {pages} pages is too small to damage"
    );
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for p in (1..pages - 1).filter(|p| p % 2 == 1) {
        f.write_all_at(&random_bytes(70, p, PAGE as usize), p * PAGE)
            .unwrap();
    }
}

fn corrupt_copies(t: &TestRepo) -> Vec<String> {
    std::fs::read_dir(&t.repo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("catalog.corrupt-") && !n.ends_with("-wal"))
        .collect()
}

/// A repository whose catalog spans several pages.
fn fixture() -> (TestRepo, Image, String) {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(71, 0, 400 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    (t, img, id)
}

#[test]
fn catalog_with_garbage_pages_is_moved_aside_and_rebuilt_by_snapshots_restore_and_backup() {
    let (t, img, id) = fixture();

    garbage_middle_pages(&t);
    let r = t.run(&[&"--json", &"snapshots"]).ok();
    r.stderr_mentions(&["catalog", "damaged", "catalog.corrupt-", "rebuilt"]);
    assert!(r.out().contains(&id), "{}", r.out());
    assert_eq!(corrupt_copies(&t).len(), 1, "the damaged file is kept");

    garbage_middle_pages(&t);
    let target = t.path("out.img");
    let r = t.restore(&id, &target, &[]).ok();
    r.stderr_mentions(&["damaged", "rebuilt"]);
    assert_eq!(hash_file(&target), img.hash(), "restored bit for bit");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), img.size());

    garbage_middle_pages(&t);
    img.write_block(9, &random_block(72, 9));
    let r = t.try_backup(&img.path, &[]).ok();
    r.stderr_mentions(&["damaged", "rebuilt"]);
    let s = r.json();
    // The rebuilt catalog knows every stored block: only the change is new.
    assert_eq!(u64_of(&s, "blocks_new"), 1, "{s}");
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    t.check(true).0.ok();
    assert_eq!(corrupt_copies(&t).len(), 3);
}

#[test]
fn catalog_that_is_not_a_database_or_truncated_is_rebuilt() {
    let (t, img, id) = fixture();
    std::fs::write(catalog(&t), random_bytes(73, 0, 3 * PAGE as usize)).unwrap();
    t.run(&[&"snapshots"])
        .ok()
        .stderr_mentions(&["damaged", "rebuilt"]);
    t.assert_restores(&id, img.hash(), img.size());

    let len = std::fs::metadata(catalog(&t)).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(catalog(&t))
        .unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    t.assert_restores(&id, img.hash(), img.size());
    assert_eq!(corrupt_copies(&t).len(), 2);
}

/// With `--no-lock` the damaged file is not replaced: the command fails,
/// naming the file and `repair index`, which then fixes it.
#[test]
fn damaged_catalog_under_no_lock_fails_with_the_repair_hint() {
    let (t, img, id) = fixture();
    garbage_middle_pages(&t);
    let r = t
        .run(&[&"--no-lock", &"restore", &id, &"--target", &t.path("x.img")])
        .expect_code(1);
    r.stderr_mentions(&["catalog.sqlite", "damaged", "repair index"]);
    assert!(!t.path("x.img").exists());
    assert!(corrupt_copies(&t).is_empty(), "nothing touched");
    t.run(&[&"repair", &"index"]).ok();
    assert_eq!(corrupt_copies(&t).len(), 1);
    t.run(&[&"--no-lock", &"restore", &id, &"--target", &t.path("x.img")])
        .ok();
    assert_eq!(hash_file(&t.path("x.img")), img.hash());
}
