//! The repository on its failure paths: forged duplicate snapshot objects,
//! read-only storage, copies without empty folders, permissions under a
//! loose umask, lost locks and garbage left by interrupted writers.

use std::path::Path;

use cbtvault::format::snapshot;
use cbtvault::format::ObjectName;

use crate::util::*;

/// A second object with the same id and generation as `id`'s, describing
/// an all-zero disk; returns its object name.
fn forge_duplicate(t: &TestRepo, id: &str) -> String {
    let bytes = std::fs::read(object_path(t, id)).unwrap();
    let forged = match snapshot::decode_any(&bytes).unwrap() {
        snapshot::StoredSnapshot::Inline(mut obj) => {
            obj.entries.clear();
            snapshot::encode(&obj).unwrap()
        }
        snapshot::StoredSnapshot::Paged(mut obj) => {
            obj.table.rows.clear();
            snapshot::encode_paged(&obj).unwrap()
        }
    };
    let name = ObjectName::of(&forged).to_hex();
    std::fs::write(t.repo.join("snapshots").join(&name), forged).unwrap();
    name
}

#[test]
fn forged_snapshot_with_the_same_id_and_generation_is_never_picked() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(40, 0, 6 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let genuine = object_path(&t, &id)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let forged = forge_duplicate(&t, &id);

    let (check, report) = t.check(false);
    check.expect_code(3);
    let text = report.to_string();
    assert!(
        text.contains(&forged) && text.contains(&genuine),
        "{report}"
    );

    for query in [id.as_str(), &id[..8], "latest"] {
        let target = t.path("out.img");
        let r = t.restore(query, &target, &[]).expect_code(1);
        r.stderr_mentions(&[&forged, &genuine, "generation"]);
        assert!(!target.exists());
    }
    // Removing the forged object is the fix; the genuine one restores.
    std::fs::remove_file(t.repo.join("snapshots").join(&forged)).unwrap();
    t.check(false).0.ok();
    t.assert_restores(&id, img.hash(), img.size());
}

/// Runs `f` with `dir` mounted read-only (a read-only bind mount when
/// running as root, for whom permissions do not stop writes; `chmod -R a-w`
/// otherwise). Returns false, after saying why, when neither is possible.
pub fn with_read_only(dir: &Path, f: impl FnOnce()) -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let bind = std::process::Command::new("mount")
            .args(["--bind"])
            .arg(dir)
            .arg(dir)
            .status();
        if !bind.is_ok_and(|s| s.success()) {
            eprintln!(
                "SKIPPED: cannot bind-mount '{}' (no mount privilege)",
                dir.display()
            );
            return false;
        }
        let ro = std::process::Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir)
            .status();
        if !ro.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount").arg(dir).status();
            eprintln!("SKIPPED: cannot remount '{}' read-only", dir.display());
            return false;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = std::process::Command::new("umount").arg(dir).status();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    } else {
        let chmod = |mode: &str| {
            std::process::Command::new("chmod")
                .args(["-R", mode])
                .arg(dir)
                .status()
                .unwrap()
        };
        chmod("a-w");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        chmod("u+w");
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
    true
}

/// Restores `id` into a file outside the repository and compares it.
#[track_caller]
fn assert_restores_with(t: &TestRepo, id: &str, img_hash: blake3::Hash, envs: &[(&str, &str)]) {
    let target = t.path(&format!("ro-{}.img", rand::random::<u32>()));
    t.run_env(&[&"restore", &id, &"--target", &target], envs)
        .ok();
    assert_eq!(hash_file(&target), img_hash, "restored content differs");
    std::fs::remove_file(&target).unwrap();
}

/// Serves `id` on a unix socket outside the repository and copies the
/// export with qemu-img; the copy must hold the image.
fn assert_serves(t: &TestRepo, id: &str, img: &Image, envs: &[(&str, &str)]) {
    use std::io::BufRead;
    let sock = t.path(&format!("ro-{}.sock", rand::random::<u32>()));
    let mut child = std::process::Command::new(bin())
        .arg("-r")
        .arg(&t.repo)
        .args(["--json", "serve", id, "--socket"])
        .arg(&sock)
        .envs(envs.iter().copied())
        .env_remove("CBTVAULT_REPOSITORY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let copy = t.path("served.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///{id}?socket={}", sock.display()))
        .arg(&copy)
        .status();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        st.unwrap().success(),
        "qemu-img read the export; serve said: {line}"
    );
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(&got[..img.size() as usize], &img.bytes()[..]);
    std::fs::remove_file(&copy).unwrap();
}

fn read_only_repository_serves_every_reader(drop_catalog: bool) {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(41, 0, 12 * BSU));
    t.backup(&img.path, &[]);
    img.write_block(4, &random_block(42, 4));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    if drop_catalog {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(t.repo.join(format!("catalog.sqlite{suffix}")));
        }
    }
    let cache = t.path("cache");
    let cache_s = cache.to_str().unwrap().to_string();
    let envs = [("CBTVAULT_CACHE_DIR", cache_s.as_str())];
    let before = t.files_under("");
    let ran = with_read_only(&t.repo.clone(), || {
        let r = t.run_env(&[&"--json", &"snapshots"], &envs).ok();
        r.stderr_mentions(&["read-only"]);
        assert_eq!(r.items("snapshot").len(), 2);
        t.run_env(&[&"check", &"--read-data"], &envs).ok();
        assert_restores_with(&t, &id, img.hash(), &envs);
        assert_serves(&t, &id, &img, &envs);
        // Writers refuse, naming why.
        t.run_env(&[&"repair", &"tmp"], &envs)
            .expect_code(1)
            .stderr_mentions(&["lock", "read-only"]);
        t.run_env(&[&"backup", &img.path], &envs)
            .expect_code(1)
            .stderr_mentions(&["read-only"]);
    });
    if ran {
        assert_eq!(
            t.files_under(""),
            before,
            "nothing was written to the repository"
        );
    }
}

#[test]
fn read_only_repository_lists_checks_restores_and_serves() {
    read_only_repository_serves_every_reader(false);
}

#[test]
fn read_only_repository_without_a_catalog_rebuilds_it_in_the_cache() {
    read_only_repository_serves_every_reader(true);
}

/// A live exclusive lock (this test process holds it) stops restore;
/// `--no-lock` reads anyway and says so; writers refuse `--no-lock`.
#[test]
fn no_lock_reads_beside_a_live_exclusive_lock() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(43, 0, 4 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lock = format!(
        r#"{{"exclusive":true,"hostname":"{}","pid":{},"time":"{}","command":"prune"}}"#,
        host.trim(),
        std::process::id(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    std::fs::write(t.repo.join("locks").join("ab".repeat(32)), lock).unwrap();
    t.restore(&id, &t.path("x.img"), &[])
        .expect_code(11)
        .stderr_mentions(&["locked"]);
    let target = t.path("y.img");
    t.run(&[&"--no-lock", &"restore", &id, &"--target", &target])
        .ok()
        .stderr_mentions(&["--no-lock"]);
    assert_eq!(hash_file(&target), img.hash());
    t.run(&[&"--no-lock", &"repair", &"tmp"])
        .expect_code(1)
        .stderr_mentions(&["needs the repository lock"]);
}

/// Copies `from` to `to` with `cp -r`, then deletes every empty folder of
/// the copy (as a copy to a store without folders, or an archiver, would).
fn copy_without_empty_folders(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
    let st = std::process::Command::new("find")
        .arg(to)
        .args(["-mindepth", "1", "-type", "d", "-empty", "-delete"])
        .status()
        .unwrap();
    assert!(st.success());
    for gone in ["tmp", "locks", "data/00"] {
        assert!(!to.join(gone).exists(), "{gone} still in the copy");
    }
}

#[test]
fn copy_without_empty_folders_backs_up_and_restores() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(44, 0, 10 * BSU));
    let first = TestRepo::id_of(&t.backup(&img.path, &[]));
    let at_first = img.hash();
    let copy = t.path("copy");
    copy_without_empty_folders(&t.repo, &copy);
    let c = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"-r", &copy];
        all.extend_from_slice(args);
        run_in(t.root(), &all)
    };
    // Restore first: it needs locks/ and tmp/.
    let target = t.path("first.img");
    c(&[&"restore", &first, &"--target", &target]).ok();
    assert_eq!(hash_file(&target), at_first);
    // A backup writes new packs into data/XX folders that are gone.
    for i in 0..10 {
        img.write_block(i, &random_block(45, i));
    }
    let second = c(&[&"--json", &"backup", &img.path, &"--full"]).ok().json();
    let second = TestRepo::id_of(&second);
    let target = t.path("second.img");
    c(&[&"restore", &second, &"--target", &target]).ok();
    assert_eq!(hash_file(&target), img.hash());
    c(&[&"check", &"--read-data"]).ok();
}

/// Under umask 022 every folder the repository gets is 0700 and every
/// file 0600 (config, packs, snapshots, locks, the catalog and its WAL).
#[test]
fn repository_is_private_under_a_loose_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = Image::from_bytes(&dir.path().join("disk.img"), &random_bytes(46, 0, 4 * BSU));
    let sh = |cmd: String| {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("umask 022; {cmd}"))
            .env_remove("CBTVAULT_REPOSITORY")
            .status()
            .unwrap();
        assert!(st.success(), "{cmd}");
    };
    let b = bin();
    sh(format!("'{b}' -r '{}' init", repo.display()));
    sh(format!(
        "'{b}' -r '{}' backup '{}'",
        repo.display(),
        img.path.display()
    ));
    // A lock object too: a check that runs while we look.
    sh(format!("'{b}' -r '{}' check", repo.display()));
    let mut seen = 0;
    fn walk(p: &Path, seen: &mut u32) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            if e.file_type().unwrap().is_dir() {
                assert_eq!(mode, 0o700, "{}", e.path().display());
                walk(&e.path(), seen);
            } else {
                assert_eq!(mode, 0o600, "{}", e.path().display());
                *seen += 1;
            }
        }
    }
    let mode = std::fs::metadata(&repo).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    walk(&repo, &mut seen);
    assert!(seen >= 4, "config, a pack, a snapshot and the catalog");
}

/// A backup whose lock cannot be refreshed stops before it commits once
/// the give-up time has passed (test timing: refresh every 50 ms, give up
/// after 300 ms; the commit waits 800 ms), and leaves a repository that
/// the next backup and check accept.
#[test]
fn failed_lock_refresh_stops_the_backup_before_it_commits() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(47, 0, 6 * BSU));
    let r = t.run_env(
        &[&"backup", &img.path],
        &[
            ("CBTVAULT_TEST_LOCK_TIMING", "50,300"),
            ("CBTVAULT_TEST_LOCK_REFRESH_FAILS", "1"),
            ("CBTVAULT_TEST_DELAY", "commit_snapshot:800"),
        ],
    );
    r.expect_code(1)
        .stderr_mentions(&["lock lost", "no space left"]);
    assert!(t.snapshot_ids().is_empty(), "nothing committed");
    // The same timing with refreshes working commits.
    let r = t.run_env(
        &[&"--json", &"backup", &img.path],
        &[
            ("CBTVAULT_TEST_LOCK_TIMING", "50,300"),
            ("CBTVAULT_TEST_DELAY", "commit_snapshot:800"),
        ],
    );
    let id = TestRepo::id_of(&r.ok().json());
    t.assert_restores(&id, img.hash(), img.size());
    t.check(true).0.ok();
}

/// Commands started together on a repository without a catalog: one
/// rebuilds it under the lock in one transaction, the others wait and use
/// it; none fails with "database is locked".
#[test]
fn commands_started_together_share_one_catalog_rebuild() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(48, 0, 6 * BSU));
    t.backup(&img.path, &[]);
    img.write_block(1, &random_block(49, 1));
    t.backup(&img.path, &[]);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(t.repo.join(format!("catalog.sqlite{suffix}")));
    }
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(bin())
                .arg("-r")
                .arg(&t.repo)
                .args(["--json", "snapshots"])
                .env_remove("CBTVAULT_REPOSITORY")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let v = summary_of("snapshots", &out.stdout);
        assert_eq!(v["snapshot_count"], 2, "{v}");
    }
    t.check(false).0.ok();
}

fn live_lock(t: &TestRepo, exclusive: bool) -> std::path::PathBuf {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lock = format!(
        r#"{{"exclusive":{exclusive},"hostname":"{}","pid":{},"time":"{}","command":"backup"}}"#,
        host.trim(),
        std::process::id(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let path = t.repo.join("locks").join("cd".repeat(32));
    std::fs::write(&path, lock).unwrap();
    path
}

/// A backup that failed after writing its packs (failpoint before the
/// commit) and files left in tmp/ by killed writers: `repair tmp` removes
/// the old files only, `repair packs --unreferenced` the failed backup's
/// packs only, and neither runs beside a live backup's lock.
#[test]
fn garbage_of_failed_backups_is_reclaimed_and_never_a_live_backups() {
    let t = TestRepo::new();
    let a = Image::from_bytes(&t.path("a.img"), &random_bytes(50, 0, 6 * BSU));
    let a1 = TestRepo::id_of(&t.backup(&a.path, &[]));
    let packs_of_a = t.packs();
    let b = Image::from_bytes(&t.path("b.img"), &random_bytes(51, 0, 5 * BSU));
    t.run_env(
        &[&"backup", &b.path],
        &[("CBTVAULT_TEST_FAILPOINT", "commit_snapshot:1")],
    )
    .expect_code(1);
    let orphans: Vec<_> = t
        .packs()
        .into_iter()
        .filter(|p| !packs_of_a.contains(p))
        .collect();
    assert!(!orphans.is_empty(), "the failed backup left packs");
    let old = t.repo.join("tmp").join("0123.tmp");
    let fresh = t.repo.join("tmp").join("4567.tmp");
    std::fs::write(&old, vec![7u8; 1 << 20]).unwrap();
    std::fs::write(&fresh, b"being written").unwrap();
    let st = std::process::Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(st.success());

    let (check, report) = t.check(false);
    check.ok();
    assert!(
        crate::healing::fixes(&report).contains("cbtvault repair tmp"),
        "{report}"
    );

    // A live backup's lock: nothing is removed.
    let lock = live_lock(&t, false);
    for args in [
        &["repair", "tmp"][..],
        &["repair", "packs", "--unreferenced"],
    ] {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = Vec::new();
        for a in args {
            all.push(a);
        }
        t.run(&all).expect_code(11).stderr_mentions(&["locked"]);
    }
    assert!(old.exists() && orphans.iter().all(|p| p.exists()));
    std::fs::remove_file(lock).unwrap();

    t.run(&[&"repair", &"tmp"]).ok();
    assert!(!old.exists(), "an old tmp file is garbage");
    assert!(fresh.exists(), "a fresh tmp file may belong to a writer");

    let r = t
        .run(&[&"--json", &"repair", &"packs", &"--unreferenced"])
        .ok();
    let removed = r.json()["packs_removed"].as_array().unwrap().len();
    assert_eq!(removed, orphans.len());
    assert!(orphans.iter().all(|p| !p.exists()));
    assert!(packs_of_a.iter().all(|p| p.exists()));
    t.assert_restores(&a1, a.hash(), a.size());
    t.check(true).0.ok();
    // The removed blocks are not deduplicated against: B is stored anew.
    let s = t.backup(&b.path, &[]);
    assert_eq!(u64_of(&s, "blocks_new"), 5, "{s}");
    t.assert_restores(&TestRepo::id_of(&s), b.hash(), b.size());
}

/// An unreadable lock object counts as a live exclusive lock; with the
/// catalog missing too, `unlock` must still open the repository and
/// remove it, after which everything works again.
#[test]
fn unreadable_lock_and_missing_catalog_unlock_still_runs() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(52, 0, 3 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    std::fs::write(t.repo.join("locks").join("ef".repeat(32)), b"garbage").unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(t.repo.join(format!("catalog.sqlite{suffix}")));
    }
    t.restore(&id, &t.path("x.img"), &[])
        .expect_code(11)
        .stderr_mentions(&["unreadable lock"]);
    t.run(&[&"unlock"]).ok();
    t.assert_restores(&id, img.hash(), img.size());
}
