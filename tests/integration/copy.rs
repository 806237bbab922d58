//! `copy` between repositories (issue 14): local -> S3 -> another local,
//! bit for bit; nothing resent on a second run; interrupted at random
//! moments and rerun, only the missing blocks are sent; refusals.

use std::ffi::OsStr;

use serde_json::Value;

use crate::s3::S3Server;
use crate::util::*;

/// `cbtvault --json copy --from A --to B ARGS...` with `env`.
fn copy(
    cwd: &std::path::Path,
    from: &str,
    to: &str,
    args: &[&str],
    env: &[(String, String)],
) -> Run {
    let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"copy", &"--from", &from, &"--to", &to];
    for a in args {
        all.push(a);
    }
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    run_in_env(cwd, &all, &pairs)
}

/// A local repository with three snapshots of one 64-block disk (the
/// later ones change a few blocks); their ids and image hashes.
fn source_with_history(t: &TestRepo) -> (Image, Vec<(String, blake3::Hash)>) {
    let img = Image::create(&t.path("disk.img"), 64 * BS);
    let mut out = Vec::new();
    for round in 0..3u64 {
        for i in 0..64 {
            if round == 0 {
                img.write_block(
                    i,
                    &match i % 5 {
                        0 => zero_block(),
                        1 => text_block(50, i),
                        _ => random_block(50, i),
                    },
                );
            } else if i % 7 == round {
                img.write_block(i, &random_block(50 + round, i));
            }
        }
        let s = t.backup(&img.path, &[]);
        out.push((TestRepo::id_of(&s), img.hash()));
    }
    (img, out)
}

#[test]
fn local_to_s3_to_local_bit_exact_and_nothing_resent() {
    let server = S3Server::shared();
    let a = TestRepo::init(&["--pack-size-mib", "1"]);
    let (img, snaps) = source_with_history(&a);
    let url = server.fresh_url("offsite");
    let b = TestRepo::at(&url, server.env(), &["--pack-size-mib", "1"]);
    let env = b.env.clone();
    let a_path = a.repo.display().to_string();

    let first = copy(a.root(), &a_path, &url, &["--all"], &env).ok();
    let s = first.json();
    assert_eq!(s["copied_snapshot_ids"].as_array().unwrap().len(), 3, "{s}");
    let sent = u64_of(&s, "blocks_sent");
    assert!(sent > 0);
    // The second run finds everything there and sends nothing.
    let again = copy(a.root(), &a_path, &url, &["--all"], &env).ok().json();
    assert_eq!(u64_of(&again, "blocks_sent"), 0, "{again}");
    assert_eq!(u64_of(&again, "sent_stored_bytes"), 0, "{again}");
    assert_eq!(again["present_snapshot_ids"].as_array().unwrap().len(), 3);

    // S3 -> a second local repository; every snapshot restores bit for bit.
    let c = TestRepo::init(&["--pack-size-mib", "1"]);
    let c_path = c.repo.display().to_string();
    let third = copy(c.root(), &url, &c_path, &["--all"], &env).ok().json();
    assert_eq!(u64_of(&third, "blocks_sent"), sent, "{third}");
    for (id, hash) in &snaps {
        c.assert_restores(id, *hash, img.size());
        b.assert_restores(id, *hash, img.size());
    }
    for t in [&b, &c] {
        let (run, report) = t.check(true);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    }
    // The copies are the same snapshots: ids, times, sources, parents.
    let listed = |t: &TestRepo| -> Vec<(String, String, Value)> {
        t.snapshots(&[])
            .iter()
            .map(|s| {
                (
                    str_of(s, "snapshot_id").to_string(),
                    str_of(s, "time").to_string(),
                    s["parent_id"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(listed(&a), listed(&c));
}

#[test]
fn one_snapshot_brings_its_chain_and_a_later_one_only_its_own_blocks() {
    let a = TestRepo::init(&["--pack-size-mib", "1"]);
    let (img, snaps) = source_with_history(&a);
    let b = TestRepo::init(&["--pack-size-mib", "1"]);
    let (a_path, b_path) = (a.repo.display().to_string(), b.repo.display().to_string());
    // The middle snapshot needs the first (its parent).
    let s = copy(a.root(), &a_path, &b_path, &[&snaps[1].0[..8]], &[])
        .ok()
        .json();
    let copied: Vec<&str> = s["copied_snapshot_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(copied, vec![snaps[0].0.as_str(), snaps[1].0.as_str()]);
    b.assert_restores(&snaps[1].0, snaps[1].1, img.size());
    // The last: its parent is there, so only the blocks it changed travel.
    let last = copy(a.root(), &a_path, &b_path, &[&snaps[2].0], &[])
        .ok()
        .json();
    assert_eq!(
        last["copied_snapshot_ids"].as_array().unwrap().len(),
        1,
        "{last}"
    );
    let changed = (0..64).filter(|i| i % 7 == 2).count() as u64;
    assert_eq!(u64_of(&last, "blocks_sent"), changed, "{last}");
    b.assert_restores(&snaps[2].0, snaps[2].1, img.size());
}

#[test]
fn interrupted_at_random_moments_the_rerun_sends_only_what_is_missing() {
    let server = S3Server::shared();
    let a = TestRepo::init(&["--pack-size-mib", "1"]);
    let (img, snaps) = source_with_history(&a);
    let url = server.fresh_url("resume");
    let b = TestRepo::at(&url, server.env(), &["--pack-size-mib", "1"]);
    let env = b.env.clone();
    let a_path = a.repo.display().to_string();
    // Kill points chosen by a seed: a block being packed, a pack just made
    // durable (before its catalog rows).
    let seed = std::env::var("CBTVAULT_COPY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7u64);
    let mut state = seed;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n + 1
    };
    let kills = [
        format!("copy_block:{}", next(40)),
        format!("copy_pack_durable:{}", next(2)),
        format!("copy_block:{}", next(30)),
    ];
    for kill in &kills {
        let mut e = env.clone();
        e.push(("CBTVAULT_TEST_KILL".into(), kill.clone()));
        let r = copy(a.root(), &a_path, &url, &["--all"], &e);
        assert_ne!(r.code, 0, "seed {seed}: {kill} did not stop the copy");
    }
    // What B holds now (a lock-taking command first brings this machine's
    // catalog up to date with the packs in the bucket).
    let (run, _) = b.check(false);
    assert_eq!(run.code, 0, "seed {seed}: {}", run.stderr);
    let before = u64_of(&b.run(&[&"--json", &"stats"]).ok().json(), "unique_blocks");
    let last = copy(a.root(), &a_path, &url, &["--all"], &env).ok().json();
    let after = u64_of(&b.run(&[&"--json", &"stats"]).ok().json(), "unique_blocks");
    // Only the missing blocks travelled on the rerun.
    assert_eq!(
        u64_of(&last, "blocks_sent"),
        after - before,
        "seed {seed}: {last}"
    );
    let total = u64_of(&a.run(&[&"--json", &"stats"]).ok().json(), "unique_blocks");
    assert_eq!(after, total, "seed {seed}: B holds every block once");
    for (id, hash) in &snaps {
        b.assert_restores(id, *hash, img.size());
    }
    let (run, report) = b.check(true);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
}

#[test]
fn refusals_name_what_is_wrong() {
    let a = TestRepo::init(&[]);
    let img = Image::create(&a.path("d.img"), 4 * BS);
    img.write_block(0, &random_block(1, 0));
    let id = TestRepo::id_of(&a.backup(&img.path, &[]));
    let other_bs = TestRepo::init(&["--block-size", "131072"]);
    let (a_path, o_path) = (
        a.repo.display().to_string(),
        other_bs.repo.display().to_string(),
    );
    let r = copy(a.root(), &a_path, &o_path, &["--all"], &[]);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&["different block sizes", "65536", "131072"]);
    let r = copy(a.root(), &a_path, &a_path, &["--all"], &[]);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&["same repository"]);
    let b = TestRepo::init(&[]);
    let b_path = b.repo.display().to_string();
    let r = copy(a.root(), &a_path, &b_path, &["ffffffff"], &[]);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&["ffffffff"]);
    let missing = a.path("nowhere").display().to_string();
    let r = copy(a.root(), &a_path, &missing, &[&id], &[]);
    assert_eq!(r.code, 10, "{}", r.stderr);
    // Nothing selected is a usage error.
    let r = copy(a.root(), &a_path, &b_path, &[], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(b.snapshot_ids().is_empty());
}
