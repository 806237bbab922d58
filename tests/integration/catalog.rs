//! The SQLite catalog is a rebuildable cache: deleting, replacing or
//! damaging it loses nothing. And repository locks: stale ones (dead pid on
//! this host, or too old) are ignored and removed by `unlock`; a live
//! exclusive lock stops a backup before it writes anything.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{Duration as ChronoDuration, Utc};
use serde_json::json;

use crate::util::*;

/// A repository with two sources and a few snapshots, with the hash each
/// snapshot must restore to.
fn populated() -> (TestRepo, BTreeMap<String, (blake3::Hash, u64)>) {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let mut expected = BTreeMap::new();
    let a = Image::create(&t.path("a.img"), 40 * BS + 10);
    for i in 0..41 {
        if i % 3 != 0 {
            a.write_block(i, &random_block(30, i));
        }
    }
    let b = Image::from_bytes(&t.path("b.img"), &random_bytes(31, 0, 20 * BSU));
    for step in 0..3u64 {
        a.write_block(step * 7, &random_block(32, step));
        let s = t.backup(&a.path, &[]);
        expected.insert(TestRepo::id_of(&s), (a.hash(), a.size()));
        b.write_block(step, &text_block(33, step));
        let s = t.backup(&b.path, &[]);
        expected.insert(TestRepo::id_of(&s), (b.hash(), b.size()));
    }
    (t, expected)
}

fn remove_catalog(repo: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let p = repo.join(format!("catalog.sqlite{suffix}"));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", p.display()),
        }
    }
}

/// The snapshot listing without the fields a rebuild may not preserve.
fn listing(t: &TestRepo) -> Vec<serde_json::Value> {
    t.snapshots(&[])
}

#[track_caller]
fn assert_all_restore(t: &TestRepo, expected: &BTreeMap<String, (blake3::Hash, u64)>) {
    assert_eq!(t.snapshot_ids().len(), expected.len());
    for (id, (hash, len)) in expected {
        t.assert_restores(id, *hash, *len);
    }
}

#[test]
fn repair_index_rebuilds_a_deleted_catalog() {
    let (t, expected) = populated();
    let before = listing(&t);
    remove_catalog(&t.repo);
    let r = t.run(&[&"--json", &"repair", &"index"]).ok();
    let v = r.json();
    assert_eq!(u64_of(&v, "snapshots_found"), expected.len() as u64);
    assert_eq!(u64_of(&v, "packs_indexed"), t.packs().len() as u64);
    assert!(v["packs_skipped"].as_array().unwrap().is_empty());
    assert_eq!(listing(&t), before);
    assert_all_restore(&t, &expected);
    t.check(true).0.ok();
}

#[test]
fn opening_rebuilds_a_missing_catalog_with_a_warning() {
    let (t, expected) = populated();
    let before = listing(&t);
    remove_catalog(&t.repo);
    let r = t.run(&[&"--json", &"snapshots"]).ok();
    r.stderr_mentions(&["warning", "catalog"]);
    assert_eq!(r.items("snapshot"), before);
    // Rebuilt once; the next command is quiet about it.
    let again = t.run(&[&"--json", &"snapshots"]).ok();
    assert!(
        !again.stderr.contains("catalog"),
        "rebuilt twice: {}",
        again.stderr
    );
    assert_all_restore(&t, &expected);
    // Deduplication still works against the rebuilt catalog.
    let s = t.backup(&t.path("b.img"), &[]);
    assert_eq!(u64_of(&s, "blocks_new"), 0);
}

#[test]
fn catalog_of_another_repository_is_replaced() {
    let (t, expected) = populated();
    let other = TestRepo::new();
    let img = Image::from_bytes(&other.path("x.img"), &random_bytes(34, 0, 4 * BSU));
    other.backup(&img.path, &[]);
    // Copy the other repository's catalog over ours (both closed now).
    remove_catalog(&t.repo);
    std::fs::copy(
        other.repo.join("catalog.sqlite"),
        t.repo.join("catalog.sqlite"),
    )
    .unwrap();
    let r = t.run(&[&"--json", &"snapshots"]).ok();
    r.stderr_mentions(&["catalog"]);
    assert_all_restore(&t, &expected);
    t.check(true).0.ok();
}

/// A catalog file that is not a SQLite database (e.g. damaged by a full
/// disk) is a cache like any other: it is rebuilt, or at the very least
/// `repair index` repairs it.
#[test]
fn damaged_catalog_file_is_rebuilt() {
    let (t, expected) = populated();
    remove_catalog(&t.repo);
    std::fs::write(t.repo.join("catalog.sqlite"), random_bytes(35, 0, 8192)).unwrap();
    let repair = t.run(&[&"repair", &"index"]);
    assert_eq!(
        repair.code, 0,
        "repair index cannot repair a damaged catalog:\n{}",
        repair.stderr
    );
    assert_all_restore(&t, &expected);
}

/// A rebuild of the catalog interrupted after some packs were added (kill
/// during the automatic rebuild of `Repository::open`, or during `repair
/// index`) must not leave a catalog that is taken as complete: the next
/// command has to finish the job (or notice the packs it lacks), otherwise
/// restores fail and `check` reports damage that is not there.
///
/// Simulated exactly: a fresh catalog created by the library (schema and
/// repository id written, as `Catalog::open` does first) holding only the
/// first pack, as a rebuild killed after its first pack leaves it.
#[test]
fn interrupted_catalog_rebuild_is_completed() {
    use cbtvault::format::ObjectName;
    use cbtvault::index::Catalog;

    let (t, expected) = populated();
    let repo_id = t.run(&[&"cat", &"config"]).ok().item("config")["config"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    remove_catalog(&t.repo);
    {
        let (mut catalog, _) = Catalog::open(&t.repo.join("catalog.sqlite"), &repo_id).unwrap();
        let first = t.packs().into_iter().next().unwrap();
        let bytes = std::fs::read(&first).unwrap();
        let entries = cbtvault::format::pack::decode_pack_index(&bytes, BS as u32).unwrap();
        let name: ObjectName = first
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        catalog
            .add_pack(&name, bytes.len() as u64, &entries)
            .unwrap();
    }
    let (check, report) = t.check(true);
    assert_eq!(
        check.code, 0,
        "after an interrupted catalog rebuild, check reports damage: {report}"
    );
    assert_all_restore(&t, &expected);
}

// ------------------------------------------------------------------ locks

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// A pid that no process has (above the usual pid_max, and checked).
fn dead_pid() -> u32 {
    let pid = 4_194_300;
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    pid
}

/// Writes a lock object as another process would; returns its name.
fn write_lock(t: &TestRepo, exclusive: bool, host: &str, pid: u32, age: ChronoDuration) -> String {
    let name = hex::encode(rand::random::<[u8; 32]>());
    let lock = json!({
        "exclusive": exclusive,
        "hostname": host,
        "pid": pid,
        "time": (Utc::now() - age).to_rfc3339(),
        "command": "prune",
    });
    std::fs::write(
        t.repo.join("locks").join(&name),
        serde_json::to_vec(&lock).unwrap(),
    )
    .unwrap();
    name
}

fn small_image(t: &TestRepo) -> Image {
    Image::from_bytes(&t.path("lock.img"), &random_bytes(36, 0, 4 * BSU))
}

#[test]
fn lock_of_a_dead_process_is_stale_and_removed_by_unlock() {
    let t = TestRepo::new();
    let img = small_image(&t);
    let name = write_lock(&t, true, &this_host(), dead_pid(), ChronoDuration::zero());
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    // Backup leaves other holders' lock objects alone...
    assert_eq!(t.files_under("locks"), vec![name.clone()]);
    // ...and unlock removes the stale one.
    let r = t.run(&[&"--json", &"unlock"]).ok();
    let v = r.json();
    assert_eq!(v["locks_removed"], json!([name]));
    assert!(t.files_under("locks").is_empty());
}

#[test]
fn exclusive_lock_of_a_live_process_blocks_backup() {
    let t = TestRepo::new();
    let img = small_image(&t);
    let first = t.backup(&img.path, &[]);
    let name = write_lock(
        &t,
        true,
        &this_host(),
        std::process::id(),
        ChronoDuration::zero(),
    );
    img.write_block(1, &random_block(37, 1));
    let data_before = t.files_under("data");
    let r = t.try_backup(&img.path, &[]).expect_code(11);
    r.stderr_mentions(&["locked"]);
    assert_eq!(t.snapshot_ids(), vec![TestRepo::id_of(&first)]);
    assert_eq!(
        t.files_under("data"),
        data_before,
        "a blocked backup wrote data"
    );
    assert_eq!(
        t.files_under("locks"),
        vec![name.clone()],
        "the blocked backup left its lock"
    );
    // Restore takes a shared lock and is blocked too.
    let target = t.path("blocked.img");
    t.restore(&TestRepo::id_of(&first), &target, &[])
        .expect_code(11)
        .stderr_mentions(&["locked"]);
    // unlock keeps a live holder's lock; --remove-all removes it.
    let v = t.run(&[&"--json", &"unlock"]).ok().json();
    assert_eq!(v["locks_kept"], json!([name]));
    assert_eq!(t.files_under("locks"), vec![name.clone()]);
    t.run(&[&"unlock", &"--remove-all"]).ok();
    assert!(t.files_under("locks").is_empty());
    t.backup(&img.path, &[]);
}

#[test]
fn shared_lock_of_a_live_process_does_not_block_backup() {
    let t = TestRepo::new();
    let img = small_image(&t);
    write_lock(
        &t,
        false,
        &this_host(),
        std::process::id(),
        ChronoDuration::zero(),
    );
    t.backup(&img.path, &[]);
}

#[test]
fn exclusive_lock_on_another_host_blocks_backup() {
    let t = TestRepo::new();
    let img = small_image(&t);
    // The pid cannot be checked on another host; only age makes it stale.
    write_lock(
        &t,
        true,
        "some-other-host.example",
        dead_pid(),
        ChronoDuration::minutes(1),
    );
    t.try_backup(&img.path, &[])
        .expect_code(11)
        .stderr_mentions(&["locked"]);
    assert!(t.snapshot_ids().is_empty());
}

#[test]
fn old_lock_counts_as_stale() {
    let t = TestRepo::new();
    let img = small_image(&t);
    // A live pid, but not refreshed for two hours; and one from another host.
    let a = write_lock(
        &t,
        true,
        &this_host(),
        std::process::id(),
        ChronoDuration::hours(2),
    );
    let b = write_lock(
        &t,
        true,
        "some-other-host.example",
        1,
        ChronoDuration::hours(2),
    );
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    let v = t.run(&[&"--json", &"unlock"]).ok().json();
    let mut removed: Vec<String> = v["locks_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    removed.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(removed, want);
    assert!(t.files_under("locks").is_empty());
}

/// A lock object that cannot be decoded may belong to a live holder: it is
/// treated as exclusive (spec 05-locks.md), named in the error, and
/// `unlock` removes it.
#[test]
fn unreadable_lock_blocks_until_unlock_removes_it() {
    let t = TestRepo::new();
    let img = small_image(&t);
    let name = hex::encode(rand::random::<[u8; 32]>());
    std::fs::write(t.repo.join("locks").join(&name), b"{not json").unwrap();
    let r = t.try_backup(&img.path, &[]).expect_code(11);
    r.stderr_mentions(&["locked", "unreadable lock", &name]);
    assert!(t.snapshot_ids().is_empty(), "nothing may be committed");
    assert_eq!(t.files_under("locks"), vec![name.clone()]);
    let v = t.run(&[&"--json", &"unlock"]).ok().json();
    assert_eq!(v["locks_removed"], json!([name]));
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

/// Found by the torture test (seed 3, step 35): a catalog rebuild that
/// could not read a pack because of an I/O error skipped it, marked the
/// catalog complete and exited 0, and every snapshot with blocks in that
/// pack then failed to restore ("not in any pack") until another rebuild.
/// A read error must fail the rebuild, name the pack, and leave the
/// catalog incomplete so that the next command rebuilds it again.
#[test]
#[cfg(debug_assertions)]
fn repair_index_fails_on_a_pack_read_error_and_the_next_open_rebuilds() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::from_bytes(&t.path("d.img"), &random_bytes(41, 0, 64 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    assert!(t.packs().len() >= 4, "the image spans several packs");
    let mut pack_errors = 0;
    for seed in 1..=12 {
        let spec = format!("{seed}:0.2:eio");
        let r = t.run_env(
            &[&"repair", &"index"],
            &[("CBTVAULT_TEST_FAULTS", spec.as_str())],
        );
        assert!(
            r.code == 0 || r.code == 1,
            "repair index with faults {spec}: exit {}: {}",
            r.code,
            r.stderr
        );
        assert!(
            !r.stderr.contains("skipped") && !r.out().contains("skipped"),
            "repair index with faults {spec} skipped a pack it could not read: {}{}",
            r.out(),
            r.stderr
        );
        if r.code != 0 {
            r.stderr_mentions(&["injected by CBTVAULT_TEST_FAULTS"]);
            if r.stderr.contains("pack '") {
                pack_errors += 1;
            }
        }
        // Without faults, whatever the repair left: the snapshot restores.
        t.assert_restores(&id, img.hash(), img.size());
    }
    assert!(pack_errors > 0, "no seed made a pack read fail");
}
