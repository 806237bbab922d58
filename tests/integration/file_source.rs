//! Image files and devices as sources: what is refused before anything is
//! read (character devices, FIFOs), and an image that another writer
//! modifies while the backup reads it (the debug-only hook
//! `CBTVAULT_TEST_MODIFY_SOURCE=N` overwrites the image's first 4 KiB at
//! the Nth read): committed with a loud warning, or refused with `--strict`.

use std::ffi::OsStr;
use std::path::Path;

use crate::util::*;

/// A 16 MiB image of random blocks: several read batches, so the hook
/// at the second read changes it between reads.
fn image(t: &TestRepo) -> Image {
    let img = Image::create(&t.path("disk.img"), 16 << 20);
    for i in 0..img.blocks() {
        img.write_block(i, &random_block(22, i));
    }
    img
}

fn backup_modified_at_read(t: &TestRepo, img: &Path, n: &str, extra: &[&str]) -> Run {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"backup", &img];
    for e in extra {
        args.push(e);
    }
    t.run_env(&args, &[("CBTVAULT_TEST_MODIFY_SOURCE", n)])
}

#[test]
fn image_modified_during_backup_warns() {
    let t = TestRepo::new();
    let img = image(&t);
    let r = backup_modified_at_read(&t, &img.path, "2", &[]).ok();
    let shown = img.path.display().to_string();
    r.stderr_mentions(&[
        "\"message_type\":\"warning\"",
        &shown,
        "changed while it was read",
        "modification time",
        "--strict",
    ]);
    let summary = r.json();
    let changed = summary["source_changed"]
        .as_array()
        .expect("source_changed");
    assert!(
        changed
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("modification time")),
        "{summary}"
    );
    // The snapshot is committed (the warning names it) and consistent.
    let id = TestRepo::id_of(&summary);
    assert_eq!(t.snapshot_ids(), vec![id.clone()]);
    r.stderr_mentions(&[&id[..8]]);
    let (check, report) = t.check(true);
    assert_eq!(check.code, 0, "{report}");
}

#[test]
fn image_modified_during_backup_is_refused_with_strict() {
    let t = TestRepo::new();
    let img = image(&t);
    let first = t.backup(&img.path, &[]);
    let r = backup_modified_at_read(&t, &img.path, "2", &["--strict"]).expect_code(1);
    let shown = img.path.display().to_string();
    r.stderr_mentions(&[
        "\"message_type\":\"error\"",
        &shown,
        "changed while it was read",
        "modification time",
        "nothing was committed",
    ]);
    // Status lines, but no summary: nothing was committed.
    assert!(
        r.messages().iter().all(|m| m["message_type"] == "status"),
        "{}",
        r.out()
    );
    // Only the first snapshot; the repository checks clean and the next
    // backup of the (now quiet) image works and restores exactly.
    assert_eq!(t.snapshot_ids(), vec![TestRepo::id_of(&first)]);
    let (check, report) = t.check(true);
    assert_eq!(check.code, 0, "{report}");
    let s = t.backup(&img.path, &["--strict"]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

#[test]
fn unchanged_image_gives_no_warning() {
    let t = TestRepo::new();
    let img = image(&t);
    for extra in [&[][..], &["--strict"]] {
        let r = t.try_backup(&img.path, extra).ok();
        assert!(!r.stderr.contains("warning"), "{}", r.stderr);
        let summary = r.json();
        assert_eq!(
            summary["source_changed"],
            serde_json::json!([]),
            "{summary}"
        );
        t.assert_restores(&TestRepo::id_of(&summary), img.hash(), img.size());
    }
}

#[test]
fn char_device_source_is_refused() {
    let t = TestRepo::new();
    for dev in ["/dev/null", "/dev/zero"] {
        let r = t.try_backup(Path::new(dev), &[]).expect_code(1);
        r.stderr_mentions(&[dev, "character device"]);
    }
    assert!(t.snapshot_ids().is_empty());
}

#[test]
fn fifo_source_is_refused_without_waiting_for_a_writer() {
    let t = TestRepo::new();
    let fifo = t.path("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    let r = t.try_backup(&fifo, &[]).expect_code(1);
    r.stderr_mentions(&[&fifo.display().to_string(), "fifo"]);
    assert!(t.snapshot_ids().is_empty());
}

/// A sparse image file: a full backup reads only what the file system
/// reports as data (`SEEK_DATA` / `SEEK_HOLE`); a block that became a hole
/// since the parent (no bitmap) is recorded as zero without being read;
/// both snapshots restore bit for bit.
#[test]
fn holes_of_a_sparse_image_are_not_read() {
    let t = TestRepo::new();
    let path = t.path("sparse.img");
    let img = Image::create(&path, 64 * BS);
    for i in [0u64, 2, 3, 40, 63] {
        img.write_block(i, &random_block(81, i));
    }
    let (h1, len) = (img.hash(), img.size());
    let first = t.backup(&img.path, &[]);
    assert_eq!(u64_of(&first, "blocks_read"), 5, "{first}");
    t.assert_restores(&TestRepo::id_of(&first), h1, len);

    // The same image rewritten with block 3 a hole and block 50 new: no
    // bitmap, so the layout decides what is read.
    std::fs::remove_file(&path).unwrap();
    let img = Image::create(&path, 64 * BS);
    for i in [0u64, 2, 40, 50, 63] {
        img.write_block(i, &random_block(81, i));
    }
    let second = t.backup(&img.path, &[]);
    assert_eq!(second["parent_id"], first["snapshot_id"]);
    assert_eq!(u64_of(&second, "blocks_read"), 5, "{second}");
    assert_eq!(u64_of(&second, "blocks_new"), 1, "{second}");
    t.assert_restores(&TestRepo::id_of(&second), img.hash(), img.size());
    t.assert_restores(&TestRepo::id_of(&first), h1, len);
}
