//! Crash safety (DESIGN.md invariant 2): a backup killed with SIGKILL at any
//! instant leaves a repository that `check --read-data` accepts, every
//! committed snapshot still restores bit-exact, and the next backup works.
//!
//! The kill moments come from a seeded generator; the seed is printed and
//! can be set with CBTVAULT_CRASH_SEED to replay a failure.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::*;

const IMAGE_BYTES: u64 = 64 << 20;
const REGION: usize = 1 << 20;

/// Fills the 1 MiB regions `regions` of the image with fresh random data.
fn rewrite(path: &std::path::Path, seed: u64, generation: u64, regions: &[u64]) {
    let f = File::options().write(true).open(path).expect("open image");
    for &r in regions {
        let data = random_bytes(seed ^ (generation << 32), r, REGION);
        f.write_all_at(&data, r * REGION as u64)
            .expect("write image");
    }
}

/// When to send SIGKILL to a running backup.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// After a fixed delay from the start (startup, open, lock, first reads).
    Delay(Duration),
    /// Once `n` new pack files are visible, plus a short delay: in the
    /// middle of writing packs and catalog rows.
    AfterPacks(usize, Duration),
    /// As soon as the new snapshot object is visible: between the commit of
    /// the object and its catalog row.
    SnapshotVisible,
}

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Starts a backup, kills it at `at` and reaps it (a zombie would keep its
/// lock looking alive). Returns how it ended.
fn killed_backup(t: &TestRepo, image: &std::path::Path, at: KillAt) -> String {
    let packs_before = count_files(&t.repo.join("data"));
    let snapshots_before = count_files(&t.repo.join("snapshots"));
    let mut child = Command::new(bin())
        .arg("-r")
        .arg(&t.repo)
        .args(["--quiet", "backup"])
        .arg(image)
        .current_dir(t.root())
        .env_remove("CBTVAULT_REPOSITORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start backup");
    let started = Instant::now();
    let mut wait_for = |done: &dyn Fn() -> bool| {
        while !done() && started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    match at {
        KillAt::Delay(d) => std::thread::sleep(d),
        KillAt::AfterPacks(n, d) => {
            wait_for(&|| count_files(&t.repo.join("data")) >= packs_before + n);
            std::thread::sleep(d);
        }
        KillAt::SnapshotVisible => {
            wait_for(&|| count_files(&t.repo.join("snapshots")) > snapshots_before)
        }
    }
    let _ = child.kill(); // SIGKILL; fails only if it already exited
    let status = child.wait().expect("reap backup");
    match status.code() {
        Some(c) => format!("finished first (exit {c}) after {:?}", started.elapsed()),
        None => format!("killed after {:?}", started.elapsed()),
    }
}

#[test]
fn backup_killed_at_random_moments_leaves_a_consistent_repository() {
    killed_at_random_moments(false);
}

/// The same on an encrypted repository.
#[test]
fn encrypted_backup_killed_at_random_moments_leaves_a_consistent_repository() {
    killed_at_random_moments(true);
}

fn killed_at_random_moments(encrypted: bool) {
    let seed: u64 = std::env::var("CBTVAULT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc4a5_4001 ^ u64::from(encrypted));
    eprintln!("crash test: seed {seed}, encrypted {encrypted} (set CBTVAULT_CRASH_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);

    let t = if encrypted {
        TestRepo::encrypted(&["--pack-size-mib", "1"])
    } else {
        TestRepo::init(&["--pack-size-mib", "1"])
    };
    let image = t.path("crash.img");
    File::create(&image).unwrap().set_len(IMAGE_BYTES).unwrap();
    let all: Vec<u64> = (0..IMAGE_BYTES / REGION as u64).collect();

    // The kill moments: the first three before any snapshot exists, the
    // rest with earlier snapshots in the repository.
    let ms = |rng: &mut StdRng, max: u64| Duration::from_millis(rng.gen_range(0..=max));
    let packs = |rng: &mut StdRng, max: usize| rng.gen_range(1..=max);
    let mut plan = vec![
        KillAt::Delay(ms(&mut rng, 40)),
        KillAt::AfterPacks(packs(&mut rng, 40), ms(&mut rng, 3)),
        KillAt::AfterPacks(packs(&mut rng, 60), ms(&mut rng, 3)),
    ];
    const BEFORE_ANY_SNAPSHOT: usize = 3;
    let mut later = vec![
        KillAt::Delay(ms(&mut rng, 60)),
        KillAt::Delay(ms(&mut rng, 400)),
        KillAt::AfterPacks(packs(&mut rng, 10), ms(&mut rng, 3)),
        KillAt::AfterPacks(packs(&mut rng, 30), Duration::ZERO),
        KillAt::AfterPacks(packs(&mut rng, 30), ms(&mut rng, 3)),
        KillAt::SnapshotVisible,
    ];
    rand::seq::SliceRandom::shuffle(&mut later[..], &mut rng);
    plan.extend(later);

    // snapshot id -> hash of the image it was taken from
    let mut expected: BTreeMap<String, blake3::Hash> = BTreeMap::new();
    for (it, at) in plan.iter().enumerate() {
        // Fresh data every time, so that the backup has packs to write
        // (blocks stored by an earlier killed backup are deduplicated).
        let regions: Vec<u64> = if it < BEFORE_ANY_SNAPSHOT {
            all.clone()
        } else {
            all.iter().copied().filter(|_| rng.gen_bool(0.6)).collect()
        };
        rewrite(&image, seed, it as u64 + 1, &regions);
        let current = hash_file(&image);
        let how = killed_backup(&t, &image, *at);
        eprintln!("crash test: iteration {it}: {at:?}: {how}");

        // A killed backup may have committed its snapshot just before dying.
        for id in t.snapshot_ids() {
            expected.entry(id).or_insert(current);
        }
        let (check, report) = t.check(true);
        assert_eq!(
            check.code, 0,
            "iteration {it} (seed {seed}, {at:?}): check --read-data after a kill: {report}\n{}",
            check.stderr
        );
        assert_eq!(
            t.snapshot_ids().len(),
            expected.len(),
            "iteration {it}: snapshots vanished"
        );
        for (id, hash) in &expected {
            t.assert_restores(id, *hash, IMAGE_BYTES);
        }
        if it + 1 >= BEFORE_ANY_SNAPSHOT {
            let s = t.backup(&image, &[]);
            expected.insert(TestRepo::id_of(&s), current);
            t.assert_restores(&TestRepo::id_of(&s), current, IMAGE_BYTES);
        }
    }
    let (check, report) = t.check(true);
    assert_eq!(check.code, 0, "final check: {report}\n{}", check.stderr);
    // Locks of killed backups are stale (dead pid on this host).
    t.run(&[&"unlock"]).ok();
    assert!(
        t.files_under("locks").is_empty(),
        "unlock left {:?}",
        t.files_under("locks")
    );
}

/// Backups of several disks running at once share the repository (shared
/// locks, one catalog): all succeed, duplicates across them are fine, and
/// the result checks clean and restores bit-exact.
#[test]
fn concurrent_backups_share_the_repository() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let mut images = Vec::new();
    for k in 0..3u64 {
        let img = Image::create(&t.path(&format!("c{k}.img")), 96 * BS);
        for i in 0..96 {
            // Half the blocks are common to all three disks.
            let data = if i % 2 == 0 {
                random_block(60, i)
            } else {
                random_block(61 + k, i)
            };
            img.write_block(i, &data);
        }
        images.push(img);
    }
    let children: Vec<_> = images
        .iter()
        .map(|img| {
            Command::new(bin())
                .arg("-r")
                .arg(&t.repo)
                .args(["--json", "backup"])
                .arg(&img.path)
                .env_remove("CBTVAULT_REPOSITORY")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start backup")
        })
        .collect();
    let mut ids = Vec::new();
    for (child, img) in children.into_iter().zip(&images) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "concurrent backup of {} failed: {}",
            img.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v = summary_of("backup", &out.stdout);
        ids.push(TestRepo::id_of(&v));
    }
    let (check, report) = t.check(true);
    assert_eq!(check.code, 0, "{report}");
    for (id, img) in ids.iter().zip(&images) {
        t.assert_restores(id, img.hash(), img.size());
    }
}

/// A pack that fails in the middle of being written (a full disk after its
/// first 4 MiB went to its file) fails the backup with the cause, leaves no
/// file in tmp/ and no pack, and the next backup of the image works.
#[test]
fn a_pack_failing_mid_write_leaves_nothing_behind() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("disk.img"), 16 << 20);
    for i in 0..img.blocks() {
        img.write_block(i, &random_block(41, i));
    }
    let args: [&dyn AsRef<std::ffi::OsStr>; 3] = [&"--json", &"backup", &img.path];
    let r = t.run_env(&args, &[("CBTVAULT_TEST_FAILPOINT", "pack_append:2")]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    r.stderr_mentions(&["No space left on device"]);
    assert!(t.snapshot_ids().is_empty());
    assert_eq!(t.files_under("tmp"), Vec::<String>::new());
    assert!(t.packs().is_empty(), "{:?}", t.packs());
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    let (check, _) = t.check(true);
    assert_eq!(check.code, 0, "{}", check.stderr);
}
