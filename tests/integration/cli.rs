//! The command line as a user meets it: `snapshots --json` fields, `latest`
//! with filters, `diff`, `stats`, `cat config`, `init` refusing a used
//! folder, a missing repository, `--full`, `--full-every`, and restore
//! refusing to overwrite a file.

use std::collections::BTreeSet;

use serde_json::json;

use crate::util::*;

#[test]
fn snapshots_json_has_every_field() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("fields.img"), &random_bytes(40, 0, 3 * BSU + 7));
    let first = t.backup(&img.path, &["--tag", "daily", "--tag", "vm1"]);
    img.write_block(1, &random_block(41, 1));
    let second = t.backup(&img.path, &[]);
    let snaps = t.snapshots(&[]);
    assert_eq!(snaps.len(), 2);
    let canonical = std::fs::canonicalize(&img.path).unwrap();
    for (s, summary) in snaps.iter().zip([&first, &second]) {
        let id = str_of(s, "snapshot_id");
        assert_eq!(id, str_of(summary, "snapshot_id"));
        assert_eq!(id.len(), 32);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        chrono::DateTime::parse_from_rfc3339(str_of(s, "time")).expect("time is RFC 3339");
        assert_eq!(str_of(s, "source"), format!("file:{}", canonical.display()));
        assert_eq!(u64_of(s, "disk_size_bytes"), 3 * BS + 7);
        assert_eq!(str_of(s, "object").len(), 64);
        assert!(t.repo.join("snapshots").join(str_of(s, "object")).is_file());
        assert_eq!(
            str_of(s, "hostname"),
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
        );
        assert_eq!(str_of(s, "backup_set_id"), str_of(&first, "snapshot_id"));
        assert_eq!(s["read_mode"], "all");
    }
    assert!(snaps[0]["parent_id"].is_null());
    assert_eq!(snaps[0]["full"], true);
    assert_eq!(snaps[0]["tags"], json!(["daily", "vm1"]));
    assert!(snaps[0]["new_set_reason"].is_string());
    assert_eq!(snaps[1]["parent_id"], first["snapshot_id"]);
    assert_eq!(snaps[1]["full"], false);
    assert_eq!(snaps[1]["tags"], json!([]));
    assert!(snaps[1]["new_set_reason"].is_null());
    // Human listing: a table with the short ids and a count.
    let human = t.run(&[&"snapshots"]).ok().out();
    assert!(
        human.contains(&str_of(&first, "snapshot_id")[..8]),
        "{human}"
    );
    assert!(human.contains("2 snapshots"), "{human}");
}

#[test]
fn latest_honours_source_and_tag_filters() {
    let t = TestRepo::new();
    let a = Image::from_bytes(&t.path("a.img"), &random_bytes(42, 0, 4 * BSU));
    let b = Image::from_bytes(&t.path("b.img"), &random_bytes(43, 0, 5 * BSU));
    let a1 = TestRepo::id_of(&t.backup(&a.path, &["--tag", "weekly"]));
    let a1_hash = a.hash();
    a.write_block(0, &random_block(44, 0));
    let a2 = TestRepo::id_of(&t.backup(&a.path, &[]));
    let b1 = TestRepo::id_of(&t.backup(&b.path, &["--tag", "weekly"]));
    let ids = |filters: &[&str]| -> Vec<String> {
        t.snapshots(filters)
            .iter()
            .map(|s| str_of(s, "snapshot_id").to_string())
            .collect()
    };
    let a_path = a.path.to_str().unwrap();
    assert_eq!(ids(&["--source", a_path]), vec![a1.clone(), a2.clone()]);
    // A relative path (commands run in the image's folder) means the same.
    assert_eq!(ids(&["--source", "a.img"]), vec![a1.clone(), a2.clone()]);
    let identity = format!("file:{}", std::fs::canonicalize(&b.path).unwrap().display());
    assert_eq!(ids(&["--source", &identity]), vec![b1.clone()]);
    assert_eq!(ids(&["--tag", "weekly"]), vec![a1.clone(), b1.clone()]);
    assert_eq!(
        ids(&["--tag", "weekly", "--source", a_path]),
        vec![a1.clone()]
    );
    assert!(ids(&["--tag", "nope"]).is_empty());

    let restore_latest = |filters: &[&str]| -> Vec<u8> {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"restore", &"latest", &"--target", &"-"];
        for f in filters {
            args.push(f);
        }
        t.run(&args).ok().stdout
    };
    // Two sources: 'latest' of which? Refused, naming them.
    t.run(&[&"restore", &"latest", &"--target", &"-"])
        .expect_code(1)
        .stderr_mentions(&["ambiguous", "--source", a_path]);
    t.run(&[
        &"restore",
        &"latest",
        &"--tag",
        &"weekly",
        &"--target",
        &"-",
    ])
    .expect_code(1)
    .stderr_mentions(&["ambiguous", "matching the filters"]);
    assert_eq!(
        blake3::hash(&restore_latest(&["--source", a_path])),
        a.hash()
    );
    assert_eq!(
        blake3::hash(&restore_latest(&["--source", a_path, "--tag", "weekly"])),
        a1_hash
    );
    let none = t.run(&[&"restore", &"latest", &"--tag", &"nope", &"--target", &"-"]);
    none.expect_code(1)
        .stderr_mentions(&["no snapshot", "latest"]);
    // An id prefix works as well.
    t.run(&[&"restore", &&a2[..10], &"--target", &"-"]).ok();
}

#[test]
fn diff_lists_exactly_the_changed_blocks() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("diff.img"), 40 * BS);
    for i in 0..30 {
        img.write_block(i, &random_block(45, i));
    }
    let a = TestRepo::id_of(&t.backup(&img.path, &[]));
    for i in [3u64, 4, 5, 10] {
        img.write_block(i, &random_block(46, i));
    }
    img.zero_block(20); // data -> zero
    img.write_block(35, &random_block(46, 35)); // zero -> data
    img.write_block(7, &random_block(45, 7)); // rewritten, same content
    let mid = TestRepo::id_of(&t.backup(&img.path, &[]));
    img.write_block(36, &random_block(47, 36));
    let b = TestRepo::id_of(&t.backup(&img.path, &[]));

    // The ranges as `changed_range` lines, then the summary.
    let ranges = |r: &Run| -> serde_json::Value {
        r.items("changed_range")
            .iter()
            .map(|x| json!([x["first_block"], x["last_block"]]))
            .collect()
    };
    let r = t.run(&[&"--json", &"diff", &a, &mid]).ok();
    let v = r.json();
    assert_eq!(u64_of(&v, "blocks_changed"), 6);
    assert_eq!(ranges(&r), json!([[3, 5], [10, 10], [20, 20], [35, 35]]));
    assert_eq!(u64_of(&v, "range_count"), 4);
    assert_eq!(u64_of(&v, "blocks_modified"), 4);
    assert_eq!(u64_of(&v, "blocks_now_zero"), 1);
    assert_eq!(u64_of(&v, "blocks_now_data"), 1);
    assert_eq!(str_of(&v, "from_snapshot_id"), a);
    assert_eq!(str_of(&v, "to_snapshot_id"), mid);

    // Across two layers, and in reverse.
    let r = t.run(&[&"--json", &"diff", &a, &b]).ok();
    assert_eq!(ranges(&r), json!([[3, 5], [10, 10], [20, 20], [35, 36]]));
    let v = t.run(&[&"--json", &"diff", &b, &a]).ok().json();
    assert_eq!(u64_of(&v, "blocks_changed"), 7);
    assert_eq!(u64_of(&v, "blocks_now_zero"), 2);
    assert_eq!(u64_of(&v, "blocks_now_data"), 1);
    // A snapshot against itself.
    let v = t.run(&[&"--json", &"diff", &b, &b]).ok().json();
    assert_eq!(u64_of(&v, "blocks_changed"), 0);
    // Human output names the ranges.
    let human = t.run(&[&"diff", &a, &mid]).ok().out();
    assert!(human.contains("blocks 3-5"), "{human}");
    assert!(human.contains("block 20"), "{human}");
}

#[test]
fn stats_reports_dedup_and_compression() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("s1.img"), 20 * BS);
    for i in 0..16 {
        img.write_block(i, &text_block(48, i));
    }
    t.backup(&img.path, &[]);
    // The same disk under another name: everything deduplicated.
    std::fs::copy(&img.path, t.path("s2.img")).unwrap();
    let s = t.backup(&t.path("s2.img"), &[]);
    assert_eq!(u64_of(&s, "blocks_new"), 0);
    assert_eq!(u64_of(&s, "blocks_deduplicated"), 16);

    let v = t.run(&[&"--json", &"stats"]).ok().json();
    assert_eq!(u64_of(&v, "snapshot_count"), 2);
    assert_eq!(u64_of(&v, "logical_bytes"), 40 * BS);
    assert_eq!(u64_of(&v, "logical_data_bytes"), 32 * BS);
    assert_eq!(u64_of(&v, "unique_blocks"), 16);
    assert_eq!(u64_of(&v, "unique_raw_bytes"), 16 * BS);
    let dedup = v["dedup_ratio"].as_f64().unwrap();
    assert!((dedup - 2.0).abs() < 1e-9, "dedup ratio {dedup}");
    let compression = v["compression_ratio"].as_f64().unwrap();
    assert!(compression > 2.0, "text compresses well: {compression}");
    assert!(v["total_ratio"].as_f64().unwrap() > compression);
    assert!(u64_of(&v, "pack_count") >= 1);
}

#[test]
fn cat_config_shows_the_block_size() {
    let t = TestRepo::new();
    let v = t.run(&[&"cat", &"config"]).ok().item("config")["config"].clone();
    assert_eq!(u64_of(&v, "block_size"), 65536);
    assert_eq!(str_of(&v, "hash"), "blake3");
    assert_eq!(str_of(&v, "compression"), "zstd");
    assert_eq!(str_of(&v, "id").len(), 64);
    t.run(&[&"cat", &"nonsense"]).expect_code(1);
}

#[test]
fn init_refuses_a_folder_that_is_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    let used = dir.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("precious.txt"), b"keep me").unwrap();
    let r = run_in(dir.path(), &[&"-r", &used, &"init"]).expect_code(1);
    r.stderr_mentions(&["already"]);
    assert!(!used.join("config").exists());
    assert_eq!(
        std::fs::read(used.join("precious.txt")).unwrap(),
        b"keep me"
    );

    // An existing repository is not initialised twice.
    let repo = dir.path().join("repo");
    run_in(dir.path(), &[&"-r", &repo, &"init"]).ok();
    let config = std::fs::read(repo.join("config")).unwrap();
    run_in(dir.path(), &[&"-r", &repo, &"init"]).expect_code(1);
    assert_eq!(std::fs::read(repo.join("config")).unwrap(), config);
}

#[test]
fn missing_repository_says_how_to_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nowhere");
    for args in [
        vec!["snapshots"],
        vec!["check"],
        vec!["restore", "latest", "--target", "-"],
    ] {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"-r", &nowhere];
        for a in &args {
            all.push(a);
        }
        let r = run_in(dir.path(), &all).expect_code(10);
        r.stderr_mentions(&["not a cbtvault repository", "init"]);
    }
    let img = dir.path().join("x.img");
    std::fs::write(&img, b"data").unwrap();
    run_in(dir.path(), &[&"-r", &nowhere, &"backup", &img])
        .expect_code(10)
        .stderr_mentions(&["init"]);
    assert!(
        !nowhere.exists(),
        "a failed command created the repository folder"
    );
    // No repository at all.
    run_in(dir.path(), &[&"snapshots"])
        .expect_code(1)
        .stderr_mentions(&["--repo"]);
}

#[test]
fn full_flag_starts_a_new_backup_set() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("full.img"), &random_bytes(49, 0, 6 * BSU));
    let first = t.backup(&img.path, &[]);
    img.write_block(2, &random_block(50, 2));
    let inc = t.backup(&img.path, &[]);
    assert_eq!(inc["parent_id"], first["snapshot_id"]);
    let full = t.backup(&img.path, &["--full"]);
    assert!(full["parent_id"].is_null());
    assert_eq!(full["full"], true);
    assert_eq!(u64_of(&full, "blocks_read"), 6);
    assert_eq!(
        u64_of(&full, "blocks_new"),
        0,
        "a full backup still deduplicates"
    );
    let id = TestRepo::id_of(&full);
    let snap = t.snapshots(&[]).pop().unwrap();
    assert_eq!(str_of(&snap, "snapshot_id"), id);
    assert!(snap["parent_id"].is_null());
    assert_eq!(
        str_of(&snap, "backup_set_id"),
        id,
        "a new backup set starts at it"
    );
    assert!(snap["new_set_reason"].as_str().unwrap().contains("--full"));
    let entries = t.cat_snapshot(&id)["entries"].as_array().unwrap().len();
    assert_eq!(entries, 6, "a full manifest lists every data block");
    t.assert_restores(&id, img.hash(), img.size());
    // --full cannot take a bitmap.
    let bitmap = t.path("bm.b64");
    write_bitmap(&bitmap, &bitmap_base64(img.size(), &[0]));
    t.try_backup(
        &img.path,
        &["--full", "--changed-blocks", bitmap.to_str().unwrap()],
    )
    .expect_code(1);
}

#[test]
fn full_every_writes_synthetic_fulls() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("fe.img"), 12 * BS);
    for i in 0..12 {
        img.write_block(i, &random_block(51, i));
    }
    let mut history = Vec::new();
    for step in 0..7u64 {
        if step > 0 {
            img.write_block(step, &random_block(52, step));
            img.zero_block(11 - step);
        }
        let s = t.backup(&img.path, &["--full-every", "3"]);
        history.push((s, img.hash()));
    }
    let snaps = t.snapshots(&[]);
    let parents: Vec<bool> = snaps.iter().map(|s| s["parent_id"].is_null()).collect();
    // full, inc, inc, synthetic full (3rd after the full), inc, inc, synthetic full
    assert_eq!(parents, vec![true, false, false, true, false, false, true]);
    let set = str_of(&snaps[0], "backup_set_id").to_string();
    for (k, (s, hash)) in history.iter().enumerate() {
        let id = TestRepo::id_of(s);
        assert_eq!(str_of(&snaps[k], "snapshot_id"), id);
        assert_eq!(
            str_of(&snaps[k], "backup_set_id"),
            set,
            "a synthetic full continues the set"
        );
        if k == 3 || k == 6 {
            assert_eq!(s["synthetic_full"], true);
            // A synthetic full has a full manifest: no parent, in the
            // summary as in the listing.
            assert_eq!(s["parent_id"], serde_json::Value::Null);
            assert_eq!(
                u64_of(s, "blocks_new"),
                1,
                "a synthetic full rewrites no data"
            );
            // Its manifest is complete on its own.
            let entries: BTreeSet<u64> = t.cat_snapshot(&id)["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["index"].as_u64().unwrap())
                .collect();
            let data: BTreeSet<u64> = (0..12)
                .filter(|&i| img_block_was_data(k as u64, i))
                .collect();
            assert_eq!(entries, data, "snapshot {k}");
        }
        t.assert_restores(&id, *hash, 12 * BS);
    }
}

/// Block `i` holds data after step `k` of `full_every_writes_synthetic_fulls`.
fn img_block_was_data(k: u64, i: u64) -> bool {
    // Steps 1..=k wrote block `step` and zeroed block 11 - step, in order.
    let mut data = [true; 12];
    for step in 1..=k {
        data[step as usize] = true;
        data[(11 - step) as usize] = false;
    }
    data[i as usize]
}

#[test]
fn restore_refuses_to_overwrite_without_permission() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("o.img"), &random_bytes(53, 0, 3 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let target = t.path("existing.img");
    std::fs::write(&target, b"precious data").unwrap();
    let r = t.restore(&id, &target, &[]).expect_code(1);
    r.stderr_mentions(&["--overwrite"]);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious data");
    t.restore(&id, &target, &["--overwrite"]).ok();
    assert_eq!(hash_file(&target), img.hash());
    // An existing empty file is fine without --overwrite.
    let empty = t.path("empty-target.img");
    std::fs::write(&empty, b"").unwrap();
    t.restore(&id, &empty, &[]).ok();
    assert_eq!(hash_file(&empty), img.hash());
    // Overwriting a longer file leaves no tail behind.
    let long = t.path("long.img");
    std::fs::write(&long, random_bytes(54, 0, 5 * BSU)).unwrap();
    t.restore(&id, &long, &["--overwrite"]).ok();
    assert_eq!(hash_file(&long), img.hash());
}

/// Disaster recovery: the disk image is gone and its latest snapshot is
/// wanted by the path it had. `--source PATH` must match the identity
/// `file:PATH` also when PATH no longer exists.
#[test]
fn latest_by_source_path_works_after_the_image_is_gone() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("lost.img"), &random_bytes(55, 0, 2 * BSU + 3));
    let hash = img.hash();
    let path = std::fs::canonicalize(&img.path).unwrap();
    t.backup(&path, &[]);
    std::fs::remove_file(&path).unwrap();
    let path_str = path.to_str().unwrap();
    assert_eq!(
        t.snapshots(&["--source", path_str]).len(),
        1,
        "snapshots --source PATH"
    );
    let out = t
        .run(&[
            &"restore",
            &"latest",
            &"--source",
            &path_str,
            &"--target",
            &"-",
        ])
        .ok();
    assert_eq!(blake3::hash(&out.stdout), hash);
}

/// The parent of the newest snapshot was deleted (issue 22): the next
/// backup of that source starts a new backup set with a full read, warns,
/// records why in the snapshot, and restores bit for bit; the one after
/// continues the new set. Naming the broken snapshot with --parent is
/// still refused, with the way out.
#[test]
fn deleted_parent_starts_a_new_backup_set() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("p.img"), &random_bytes(61, 0, 8 * BSU));
    let first = t.backup(&img.path, &[]);
    let bitmap = t.path("bm.b64");
    let bitmap_arg = bitmap.to_str().unwrap();
    img.write_block(3, &random_block(62, 3));
    write_bitmap(&bitmap, &bitmap_base64(img.size(), &[3]));
    let second = t.backup(&img.path, &["--changed-blocks", bitmap_arg]);
    assert_eq!(second["parent_id"], first["snapshot_id"]);
    let second_id = TestRepo::id_of(&second);

    // Delete the first snapshot's object: the second's chain is broken.
    let listed = t.snapshots(&[]);
    let object = listed
        .iter()
        .find(|s| s["snapshot_id"] == first["snapshot_id"])
        .map(|s| str_of(s, "object").to_string())
        .expect("first snapshot listed");
    std::fs::remove_file(t.repo.join("snapshots").join(&object)).expect("delete snapshot");

    img.write_block(5, &random_block(63, 5));
    write_bitmap(&bitmap, &bitmap_base64(img.size(), &[5]));
    let r = t
        .try_backup(&img.path, &["--changed-blocks", bitmap_arg])
        .ok();
    r.stderr_mentions(&["warning", "new backup set", "full read", &second_id[..8]]);
    let third = r.json();
    let id = TestRepo::id_of(&third);
    assert!(third["parent_id"].is_null(), "{third}");
    assert_eq!(third["full"], true);
    assert_eq!(u64_of(&third, "blocks_read"), 8, "every block read");
    let reason = str_of(&third, "new_set_reason").to_string();
    assert!(reason.contains("broken"), "{reason}");
    let snap = t
        .snapshots(&[])
        .into_iter()
        .find(|s| str_of(s, "snapshot_id") == id)
        .expect("new snapshot listed");
    assert_eq!(
        str_of(&snap, "backup_set_id"),
        id,
        "a new backup set starts"
    );
    assert_eq!(str_of(&snap, "new_set_reason"), reason);
    assert_eq!(str_of(&snap, "read_mode"), "all");
    t.assert_restores(&id, img.hash(), img.size());

    // The next backup layers on the new set.
    img.write_block(1, &random_block(64, 1));
    write_bitmap(&bitmap, &bitmap_base64(img.size(), &[1]));
    let fourth = t.backup(&img.path, &["--changed-blocks", bitmap_arg]);
    assert_eq!(str_of(&fourth, "parent_id"), id);
    assert_eq!(u64_of(&fourth, "blocks_read"), 1);
    t.assert_restores(&TestRepo::id_of(&fourth), img.hash(), img.size());

    // Asking for the broken snapshot by name fails and says what to do.
    t.try_backup(&img.path, &["--parent", &second_id])
        .expect_code(1)
        .stderr_mentions(&[&second_id[..8], "--full"]);
}

/// A reader that goes away before the output comes (`cbtvault snapshots |
/// head -1`) is not an error: exit 0, nothing on stderr.
#[test]
fn closed_stdout_is_not_an_error() {
    use std::process::{Command, Stdio};
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("o.img"), &random_bytes(65, 0, 4 * BSU));
    let a = TestRepo::id_of(&t.backup(&img.path, &[]));
    img.write_block(2, &random_block(66, 2));
    let b = TestRepo::id_of(&t.backup(&img.path, &[]));
    let cases: Vec<Vec<&str>> = vec![
        vec!["snapshots"],
        vec!["--json", "snapshots"],
        vec!["cat", "config"],
        vec!["cat", "snapshot", &a],
        vec!["diff", &a, &b],
        vec!["stats"],
        vec!["--help"],
    ];
    for args in cases {
        let mut child = Command::new(bin())
            .arg("-r")
            .arg(&t.repo)
            .args(&args)
            .env_remove("CBTVAULT_REPOSITORY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cbtvault");
        // Close the read end before the command writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait for cbtvault");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "cbtvault {args:?} with stdout closed: {:?}\n{stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "cbtvault {args:?}: {stderr}");
    }
}

/// Exit codes (cli::exit): a malformed command line is 2 with clap's
/// message, `--help` and `--version` are 0, a failing command is 1.
#[test]
fn exit_codes_for_usage_help_and_failure() {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), &[&"--no-such-flag"])
        .expect_code(2)
        .stderr_mentions(&["--no-such-flag"]);
    run_in(dir.path(), &[&"backup"])
        .expect_code(2)
        .stderr_mentions(&["SOURCE"]);
    let help = run_in(dir.path(), &[&"--help"]).ok();
    assert!(help.out().contains("backup"), "{}", help.out());
    run_in(dir.path(), &[&"--version"]).ok();
    run_in(dir.path(), &[&"-r", &"missing-repo", &"snapshots"])
        .expect_code(10)
        .stderr_mentions(&["error", "init"]);
}
