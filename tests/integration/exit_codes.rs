//! Exit codes from real causes (a missing repository, a lock held by a
//! live process, a flipped pack byte, a malformed command line, landmarks
//! or a snapshot VM left on a host), and SIGINT/SIGTERM at random moments
//! of a backup, a restore and a XenServer backup: exit 130/143, no lock,
//! no temporary file, nothing committed after the signal, nothing of the
//! run left on the host, and the next run works.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::util::*;
use crate::xen_backup::{backup as xen_backup, two_disk_vm_with_backup, PASSWORD};
use crate::xen_util::{guest_writes, Host};

/// Sends `signal` (`TERM`, `INT`) to `child`.
pub(crate) fn signal(child: &Child, signal: &str) {
    let st = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -s {signal}");
}

/// Waits (at most 60 s) for `child` to end; its exit code and stderr.
pub(crate) fn finish(mut child: Child) -> (i32, String) {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            let code = out.status.code().unwrap_or_else(|| {
                panic!("ended by a signal it should have handled: {:?}", out.status)
            });
            return (code, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "did not stop after the signal"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn expected_code(sig: &str) -> i32 {
    match sig {
        "INT" => 130,
        "TERM" => 143,
        _ => unreachable!(),
    }
}

#[test]
fn exit_10_when_the_repository_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nowhere");
    let img = dir.path().join("x.img");
    std::fs::write(&img, b"data").unwrap();
    for args in [
        vec![&"snapshots" as &dyn AsRef<std::ffi::OsStr>],
        vec![&"prune"],
        vec![&"backup", &img],
    ] {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"-r", &nowhere];
        all.extend(args);
        run_in(dir.path(), &all)
            .expect_code(10)
            .stderr_mentions(&["not a cbtvault repository"]);
    }
    // Another failure to open (a corrupt config) is not "missing".
    let t = TestRepo::new();
    std::fs::write(t.repo.join("config"), b"garbage").unwrap();
    t.run(&[&"snapshots"]).expect_code(1);
}

#[test]
fn exit_11_when_another_process_holds_the_lock() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("disk.img"), 8 * BS);
    for i in 0..8 {
        img.write_block(i, &random_block(1, i));
    }
    let mut held = spawn(
        &t,
        &[&"backup", &img.path],
        &[("CBTVAULT_TEST_DELAY", "commit_snapshot:3000")],
    );
    wait_for_lock(&t, &mut held);
    t.run(&[&"prune"])
        .expect_code(11)
        .stderr_mentions(&["locked by", "backup"]);
    let (code, stderr) = finish(held);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(t.snapshot_ids().len(), 1);
}

#[test]
fn exit_3_when_check_reads_a_flipped_pack_byte() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("disk.img"), 4 * BS);
    for i in 0..4 {
        img.write_block(i, &random_block(2, i));
    }
    t.backup(&img.path, &[]);
    let (r, _) = t.check(true);
    r.expect_code(0);
    let pack = t.packs().remove(0);
    flip_byte(&pack, 100);
    let (r, _) = t.check(true);
    r.expect_code(3);
}

#[test]
fn exit_2_for_a_malformed_command_line_and_the_table_in_help() {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), &[&"backup", &"--no-such-flag"]).expect_code(2);
    run_in(dir.path(), &[&"no-such-command"]).expect_code(2);
    let help = run_in(dir.path(), &[&"--help"]).ok().out();
    for line in [
        "Exit codes:",
        "  3 ",
        "  4 ",
        "  10 ",
        "  11 ",
        "  12 ",
        "  130 ",
        "  143 ",
    ] {
        assert!(help.contains(line), "--help lacks '{line}':\n{help}");
    }
}

/// A VM backup whose snapshot VM cannot be destroyed commits its disks and
/// exits 4, the warning naming what is left on the host.
#[test]
fn exit_4_when_a_xen_backup_leaves_its_snapshot_vm_on_the_host() {
    let (sim, vm, repo, src) = two_disk_vm_with_backup(41);
    for d in &vm.disks {
        guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 42);
    }
    let before = repo.snapshot_ids().len();
    sim.set_faults(|f| {
        f.fail_calls.insert(
            "VM.destroy".into(),
            vec!["INTERNAL_ERROR".into(), "injected".into()],
        );
    });
    let r = xen_backup(&repo, &sim, &src, &[]).expect_code(4);
    sim.set_faults(|f| f.fail_calls.clear());
    r.stderr_mentions(&["warning", "snapshot VM", "by hand"]);
    // Committed all the same: two disks and the metadata.
    assert_eq!(repo.snapshot_ids().len(), before + 3);
    assert_eq!(Host::login(&sim, PASSWORD).snapshot_vms(), 1);
    // Nothing left undone: 0 (the leftover is not this run's).
    xen_backup(&repo, &sim, &src, &[]).ok();
}

/// Files whose name marks a partial restore, in `dir`.
fn partial_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".cbtvault-partial-"))
        .collect()
}

/// SIGTERM or SIGINT at random moments of a backup (reading, writing
/// packs, before the commit): 130/143, no lock, no temporary file, no new
/// snapshot, `check --read-data` clean; then a backup works and restores.
#[test]
fn backup_stopped_by_a_signal_at_random_moments_leaves_a_clean_repository() {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let blocks = 320; // twenty read batches of 16 blocks (a small disk)
    let img = Image::create(&t.path("disk.img"), blocks * BS);
    for i in 0..blocks {
        img.write_block(i, &random_block(7, i));
    }
    let first = t.backup(&img.path, &[]);
    let kept = vec![TestRepo::id_of(&first)];
    // Each batch sleeps 15 ms; the commit waits 1.5 s: a signal within
    // ~300 ms of the lock lands while reading, one later before the commit.
    let env = [(
        "CBTVAULT_TEST_DELAY",
        "backup_batch:15,commit_snapshot:1500",
    )];
    let mut delays: Vec<u64> = vec![0, 10, 50, 120, 200, 300, 600];
    delays.extend((0..3).map(|_| rand::random::<u64>() % 400));
    for (round, delay) in delays.into_iter().enumerate() {
        let sig = if round % 2 == 0 { "TERM" } else { "INT" };
        // New data every round, so packs are being written.
        for i in (0..blocks).step_by(3) {
            img.write_block(i, &random_block(100 + round as u64, i));
        }
        let mut child = spawn(&t, &[&"backup", &img.path], &env);
        wait_for_lock(&t, &mut child);
        std::thread::sleep(Duration::from_millis(delay));
        signal(&child, sig);
        let (code, stderr) = finish(child);
        let what = format!("SIG{sig} after {delay} ms: {stderr}");
        assert_eq!(code, expected_code(sig), "{what}");
        assert!(stderr.contains(&format!("SIG{sig}")), "{what}");
        assert_eq!(t.files_under("locks"), Vec::<String>::new(), "{what}");
        assert_eq!(t.files_under("tmp"), Vec::<String>::new(), "{what}");
        assert_eq!(t.snapshot_ids(), kept, "{what}: committed after the signal");
    }
    let (r, v) = t.check(true);
    assert_eq!(r.code, 0, "{v}\n{}", r.stderr);
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    t.assert_restores(&id, img.hash(), img.size());
    t.run(&[&"prune"]).ok();
    let (r, v) = t.check(true);
    assert_eq!(r.code, 0, "{v}\n{}", r.stderr);
}

/// A restore to a file stopped by SIGTERM leaves neither the file nor its
/// partial file, and no lock.
#[test]
fn restore_stopped_by_sigterm_leaves_no_partial_file() {
    let t = TestRepo::new();
    let blocks = 320; // five restore chunks of 64 blocks
    let img = Image::create(&t.path("disk.img"), blocks * BS);
    for i in 0..blocks {
        img.write_block(i, &random_block(8, i));
    }
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let out_dir = t.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    let target = out_dir.join("restored.img");
    for (sig, delay) in [("TERM", 0u64), ("TERM", 150), ("INT", 400)] {
        let mut child = spawn(
            &t,
            &[&"restore", &id, &"--target", &target],
            &[("CBTVAULT_TEST_DELAY", "restore_chunk:200")],
        );
        wait_for_lock(&t, &mut child);
        std::thread::sleep(Duration::from_millis(delay));
        signal(&child, sig);
        let (code, stderr) = finish(child);
        assert_eq!(code, expected_code(sig), "{stderr}");
        assert!(!target.exists(), "a stopped restore left its target");
        assert_eq!(partial_files(&out_dir), Vec::<String>::new());
        assert_eq!(t.files_under("locks"), Vec::<String>::new());
    }
    t.restore(&id, &target, &[]).ok();
    assert_eq!(hash_file(&target), img.hash());
}

/// SIGTERM during a XenServer VM backup (with its snapshots taken, or
/// while reading a disk): 143, the run's snapshot VM and VDIs destroyed,
/// the committed landmarks untouched, nothing committed, no lock; the next
/// backup is incremental.
#[test]
fn xen_backup_stopped_by_sigterm_leaves_nothing_of_the_run_on_the_host() {
    let (sim, vm, repo, src) = two_disk_vm_with_backup(51);
    let host = Host::login(&sim, PASSWORD);
    let landmarks = host.snapshot_vdis();
    assert_eq!(landmarks.len(), 2);
    let before = repo.snapshot_ids();
    let fp = sim.fingerprint().to_string();
    for (round, delay) in [0u64, 200, 500, 900].into_iter().enumerate() {
        for d in &vm.disks {
            guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 60 + round as u64);
        }
        let mut child = spawn(
            &repo,
            &[&"backup", &src, &"--fingerprint", &fp],
            &[
                ("CBTVAULT_XEN_PASSWORD", PASSWORD),
                // Snapshots taken, 0.4 s; each read batch 0.1 s; each
                // commit 1.5 s: every signal lands before the first commit.
                (
                    "CBTVAULT_TEST_DELAY",
                    "xen_snapshot_taken:400,backup_batch:100,commit_snapshot:1500",
                ),
            ],
        );
        wait_for_lock(&repo, &mut child);
        std::thread::sleep(Duration::from_millis(delay));
        signal(&child, "TERM");
        let (code, stderr) = finish(child);
        let what = format!("SIGTERM after {delay} ms: {stderr}");
        assert_eq!(code, 143, "{what}");
        assert_eq!(host.snapshot_vms(), 0, "{what}: snapshot VM left");
        assert_eq!(host.snapshot_vdis(), landmarks, "{what}: host snapshots");
        assert_eq!(sim.dom0_attachments(), 0, "{what}: NBD attachment left");
        assert_eq!(repo.snapshot_ids(), before, "{what}: committed");
        assert_eq!(repo.files_under("locks"), Vec::<String>::new(), "{what}");
        assert_eq!(repo.files_under("tmp"), Vec::<String>::new(), "{what}");
    }
    let j = xen_backup(&repo, &sim, &src, &[]).ok().json();
    for d in crate::xen_backup::disks(&j) {
        assert_eq!(d["full"].as_bool(), Some(false), "{j}");
    }
}

/// Three snapshots of a disk whose blocks change between them.
fn three_snapshots(t: &TestRepo) -> (Image, Vec<String>) {
    let img = Image::create(&t.path("disk.img"), 16 * BS);
    let mut ids = Vec::new();
    for v in 0..3u64 {
        for i in 0..16 {
            if v == 0 || i % 4 == v {
                img.write_block(i, &random_block(20 + v, i));
            }
        }
        ids.push(TestRepo::id_of(&t.backup(&img.path, &[])));
    }
    (img, ids)
}

/// SIGINT while `forget` is about to rewrite a child, and SIGTERM while
/// `prune` has marked: 130/143, no snapshot object and no pack changed, no
/// lock, `check` clean; both then run to the end.
#[test]
fn forget_and_prune_stopped_by_a_signal_change_nothing() {
    let t = TestRepo::new();
    let (img, ids) = three_snapshots(&t);
    let snapshots_before = t.files_under("snapshots");
    // Forgetting the middle one rewrites the newest (folds its changes).
    let mut child = spawn(
        &t,
        &[&"forget", &ids[1]],
        &[("CBTVAULT_TEST_DELAY", "commit_snapshot:2000")],
    );
    wait_for_lock(&t, &mut child);
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 300));
    signal(&child, "INT");
    let (code, stderr) = finish(child);
    assert_eq!(code, 130, "{stderr}");
    assert_eq!(t.files_under("snapshots"), snapshots_before, "{stderr}");
    assert_eq!(t.files_under("locks"), Vec::<String>::new());
    let (r, v) = t.check(true);
    assert_eq!(r.code, 0, "{v}");
    t.run(&[&"forget", &ids[0], &ids[1]]).ok();

    let data_before = t.files_under("data");
    let mut child = spawn(
        &t,
        &[&"prune", &"--max-unused", &"0"],
        &[("CBTVAULT_TEST_DELAY", "prune_marked:2000")],
    );
    wait_for_lock(&t, &mut child);
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 300));
    signal(&child, "TERM");
    let (code, stderr) = finish(child);
    assert_eq!(code, 143, "{stderr}");
    assert_eq!(t.files_under("data"), data_before, "{stderr}");
    assert_eq!(t.files_under("locks"), Vec::<String>::new());
    assert_eq!(t.files_under("tmp"), Vec::<String>::new());
    let (r, v) = t.check(true);
    assert_eq!(r.code, 0, "{v}");
    t.run(&[&"prune", &"--max-unused", &"0"]).ok();
    assert_ne!(t.files_under("data"), data_before, "prune removed nothing");
    t.assert_restores(&ids[2], img.hash(), img.size());
    let (r, v) = t.check(true);
    assert_eq!(r.code, 0, "{v}");
}

/// A second signal ends the process at once (here in the middle of a
/// 5-second wait before the commit), still with 143 and nothing committed.
#[test]
fn a_second_signal_ends_the_process_at_once() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("disk.img"), 4 * BS);
    for i in 0..4 {
        img.write_block(i, &random_block(30, i));
    }
    let mut child = spawn(
        &t,
        &[&"backup", &img.path],
        &[("CBTVAULT_TEST_DELAY", "commit_snapshot:5000")],
    );
    wait_for_lock(&t, &mut child);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, "TERM");
    let (code, stderr) = finish(child);
    assert_eq!(code, 143, "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited for the check point: {:?}",
        started.elapsed()
    );
    assert!(t.snapshot_ids().is_empty());
    // Its lock may remain; its process is gone, so it is stale.
    t.run(&[&"unlock"]).ok();
    t.backup(&img.path, &[]);
}
