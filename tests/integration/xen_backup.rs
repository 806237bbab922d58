//! XenServer backups end to end: the real `cbtvault` binary against the
//! simulator on loopback. VDI and VM backups over 20 incremental runs with
//! random guest writes (each restore bit-exact with the guest disk at that
//! time), every lost-tracking case (a full read and a warning), a failure
//! injected at each workflow step (no leaked host snapshot, a valid
//! landmark afterwards), TLS pin mismatch, and the password kept out of
//! argv and output.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use serde_json::Value as Json;
use xapi_sim::{SimVm, Simulator, Value};

use crate::util::{Run, TestRepo};

const MIB: u64 = 1 << 20;
pub(crate) const PASSWORD: &str = "s3cret-xen-pw";

fn start() -> Simulator {
    crate::xen_util::start(PASSWORD)
}

use crate::xen_util::{fill, guest_writes, xen_url as source, Host};

impl<'a> Host<'a> {
    pub(crate) fn vdi_ref(&self, uuid: &str) -> String {
        self.try_call("VDI.get_by_uuid", &[uuid])
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    /// (uuid, type) of every snapshot VDI on the host.
    pub(crate) fn snapshot_vdis(&self) -> Vec<(String, String)> {
        let all = self.try_call("VDI.get_all_records", &[]).unwrap();
        all.as_struct()
            .unwrap()
            .values()
            .filter_map(|r| {
                let r = r.as_struct()?;
                (r.get("is_a_snapshot")?.as_bool()?).then(|| {
                    (
                        r["uuid"].as_str().unwrap().to_string(),
                        r["type"].as_str().unwrap().to_string(),
                    )
                })
            })
            .collect()
    }

    /// Snapshot VDIs that still hold data (anything but cbt_metadata).
    fn data_snapshots(&self) -> usize {
        self.snapshot_vdis()
            .iter()
            .filter(|(_, t)| t != "cbt_metadata")
            .count()
    }

    pub(crate) fn snapshot_vms(&self) -> usize {
        let all = self.try_call("VM.get_all_records", &[]).unwrap();
        all.as_struct()
            .unwrap()
            .values()
            .filter(|r| {
                r.as_struct()
                    .and_then(|r| r.get("is_a_snapshot"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            })
            .count()
    }
}

/// `cbtvault -r REPO --json backup SOURCE --fingerprint FP ARGS`, with the
/// password in the environment only.
pub(crate) fn backup(repo: &TestRepo, sim: &Simulator, src: &str, extra: &[&str]) -> Run {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"backup", &src];
    let fp = sim.fingerprint().to_string();
    args.push(&"--fingerprint");
    args.push(&fp);
    for e in extra {
        args.push(e);
    }
    run_with_password(repo, &args, PASSWORD)
}

pub(crate) fn run_with_password(
    repo: &TestRepo,
    args: &[&dyn AsRef<OsStr>],
    password: &str,
) -> Run {
    run_with_password_env(repo, args, password, &[])
}

fn run_with_password_env(
    repo: &TestRepo,
    args: &[&dyn AsRef<OsStr>],
    password: &str,
    envs: &[(&str, &str)],
) -> Run {
    let mut cmd = Command::new(crate::util::bin());
    cmd.envs(envs.iter().copied());
    cmd.current_dir(repo.root())
        .env_remove("CBTVAULT_REPOSITORY")
        .env("CBTVAULT_XEN_PASSWORD", password)
        .stdin(Stdio::null())
        .arg("-r")
        .arg(&repo.repo);
    let mut shown = String::from("cbtvault");
    for a in args {
        cmd.arg(a.as_ref());
        shown.push(' ');
        shown.push_str(&a.as_ref().to_string_lossy());
    }
    assert!(
        password.is_empty() || !shown.contains(password),
        "the password is in argv: {shown}"
    );
    let out = cmd.output().expect("run cbtvault");
    let run = Run {
        command: shown,
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.out().contains(PASSWORD) && !run.stderr.contains(PASSWORD),
        "the password appears in the output of {}",
        run.command
    );
    run
}

pub(crate) fn disks(summary: &Json) -> Vec<Json> {
    summary["disks"].as_array().expect("disks").clone()
}

pub(crate) fn restore_bytes(repo: &TestRepo, id: &str) -> Vec<u8> {
    let target = repo.path(&format!("r-{id}-{}.img", rand::random::<u32>()));
    repo.restore(id, &target, &[]).ok();
    let bytes = std::fs::read(&target).unwrap();
    std::fs::remove_file(&target).unwrap();
    bytes
}

#[test]
fn xen_vdi_twenty_incrementals_restore_bit_exact() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let size = 8 * MIB;
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    fill(&sim, &vdi, size, 1);
    let repo = TestRepo::new();
    let src = source(&sim, "vdi", &vdi);
    let mut expected = Vec::new();
    for run in 0..21u64 {
        if run > 0 {
            guest_writes(&sim, &vdi, size, run);
        }
        let r = backup(&repo, &sim, &src, &[]).ok();
        let j = r.json();
        let d = &disks(&j)[0];
        assert_eq!(d["full"].as_bool(), Some(run == 0), "run {run}: {j}");
        if run > 0 {
            // Only what CBT marked: at most 5 whole blocks + 2 for the piece.
            assert!(d["blocks_read"].as_u64().unwrap() <= 7, "run {run}: {d}");
            assert!(r.stderr.is_empty(), "run {run}: {}", r.stderr);
        }
        expected.push((
            d["snapshot_id"].as_str().unwrap().to_string(),
            host.disk(&vdi, size),
        ));
        // Only the cbt_metadata landmark stays on the host.
        assert_eq!(host.data_snapshots(), 0, "run {run}");
        assert_eq!(host.snapshot_vdis().len(), 1, "run {run}");
    }
    for (id, bytes) in &expected {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }
    assert_eq!(sim.dom0_attachments(), 0);
}

#[test]
fn xen_vm_twenty_incrementals_restore_bit_exact() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let sizes = [8 * MIB, 4 * MIB];
    let vm: SimVm = sim.create_vm_with_disks("vm", &sizes).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 10 + k as u64);
    }
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for run in 0..21u64 {
        if run > 0 {
            for (k, d) in vm.disks.iter().enumerate() {
                if !(run + k as u64).is_multiple_of(3) {
                    guest_writes(&sim, &d.vdi_uuid, d.size_bytes, run * 10 + k as u64);
                }
            }
        }
        let j = backup(&repo, &sim, &src, &[]).ok().json();
        let ds = disks(&j);
        assert_eq!(ds.len(), 2);
        let group = j["vm_backup_id"]
            .as_str()
            .expect("a VM backup id")
            .to_string();
        for (d, disk) in ds.iter().zip(&vm.disks) {
            assert_eq!(d["vdi_uuid"].as_str(), Some(disk.vdi_uuid.as_str()));
            assert_eq!(d["full"].as_bool(), Some(run == 0), "run {run}: {d}");
            let id = d["snapshot_id"].as_str().unwrap().to_string();
            let cat = repo.cat_snapshot(&id);
            let text = cat.to_string();
            assert!(
                text.contains(&group),
                "snapshot {id} lacks the VM backup id"
            );
            expected.push((id, host.disk(&disk.vdi_uuid, disk.size_bytes)));
        }
        // The VM metadata, stored with the backup: an XVA tar with ova.xml.
        let meta = j["metadata"]["snapshot_id"]
            .as_str()
            .expect("metadata")
            .to_string();
        if run == 0 || run == 20 {
            let tar = restore_bytes(&repo, &meta);
            assert!(xapi_sim::metadata::tar_find(&tar, "ova.xml").is_ok());
        }
        assert_eq!(host.snapshot_vms(), 0, "run {run}: snapshot VM leaked");
        assert_eq!(host.data_snapshots(), 0, "run {run}");
        assert_eq!(host.snapshot_vdis().len(), 2, "run {run}");
    }
    for (id, bytes) in &expected {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }
}

/// One disk, backed up once (full) so that a landmark exists.
fn one_disk_with_backup(size: u64) -> (Simulator, TestRepo, String, String) {
    let sim = start();
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    fill(&sim, &vdi, size, 3);
    let repo = TestRepo::new();
    let src = source(&sim, "vdi", &vdi);
    backup(&repo, &sim, &src, &[]).ok();
    (sim, repo, vdi, src)
}

/// A VM with two disks (8 and 4 MiB) filled from `seed`, backed up once.
pub(crate) fn two_disk_vm_with_backup(seed: u64) -> (Simulator, SimVm, TestRepo, String) {
    let sim = start();
    let vm = sim.create_vm_with_disks("vm", &[8 * MIB, 4 * MIB]).unwrap();
    for d in &vm.disks {
        fill(&sim, &d.vdi_uuid, d.size_bytes, seed);
    }
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    backup(&repo, &sim, &src, &[]).ok();
    (sim, vm, repo, src)
}

/// The next backup must be a full read with a warning mentioning `words`,
/// restore bit-exact, and the one after it be incremental again.
#[track_caller]
fn expect_lost(sim: &Simulator, repo: &TestRepo, vdi: &str, src: &str, words: &[&str]) {
    let host = Host::login(sim, PASSWORD);
    guest_writes(sim, vdi, 8 * MIB, 77);
    let r = backup(repo, sim, src, &[]).ok();
    let j = r.json();
    let d = &disks(&j)[0];
    assert_eq!(d["full"].as_bool(), Some(true), "{j}");
    assert!(d["new_set_reason"].as_str().is_some(), "{j}");
    assert!(d["lost_reason"].as_str().is_some(), "{j}");
    r.stderr_mentions(&["warning"]);
    r.stderr_mentions(words);
    let id = d["snapshot_id"].as_str().unwrap();
    assert!(restore_bytes(repo, id) == host.disk(vdi, 8 * MIB));
    // The snapshot records the reason.
    assert!(repo.cat_snapshot(id).to_string().contains("new_set_reason"));
    assert_eq!(host.data_snapshots(), 0);
}

#[track_caller]
fn expect_incremental_again(sim: &Simulator, repo: &TestRepo, vdi: &str, src: &str) {
    let host = Host::login(sim, PASSWORD);
    guest_writes(sim, vdi, 8 * MIB, 78);
    let r = backup(repo, sim, src, &[]).ok();
    let j = r.json();
    let d = &disks(&j)[0];
    assert_eq!(d["full"].as_bool(), Some(false), "{j}\n{}", r.stderr);
    let id = d["snapshot_id"].as_str().unwrap();
    assert!(restore_bytes(repo, id) == host.disk(vdi, 8 * MIB));
}

#[test]
fn xen_lost_cbt_disabled_by_user() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    let host = Host::login(&sim, PASSWORD);
    host.try_call("VDI.disable_cbt", &[&host.vdi_ref(&vdi)])
        .unwrap();
    expect_lost(&sim, &repo, &vdi, &src, &["disabled"]);
    expect_incremental_again(&sim, &repo, &vdi, &src);
}

#[test]
fn xen_lost_cbt_disabled_by_system() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    sim.system_disable_cbt(&vdi).unwrap();
    expect_lost(&sim, &repo, &vdi, &src, &["disabled"]);
    expect_incremental_again(&sim, &repo, &vdi, &src);
}

#[test]
fn xen_lost_unrelated_460_after_disable_enable() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    let host = Host::login(&sim, PASSWORD);
    let r = host.vdi_ref(&vdi);
    host.try_call("VDI.disable_cbt", &[&r]).unwrap();
    host.try_call("VDI.enable_cbt", &[&r]).unwrap();
    expect_lost(&sim, &repo, &vdi, &src, &["SR_BACKEND_FAILURE_460"]);
    expect_incremental_again(&sim, &repo, &vdi, &src);
}

#[test]
fn xen_lost_landmark_gone() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    let host = Host::login(&sim, PASSWORD);
    for (uuid, _) in host.snapshot_vdis() {
        host.try_call("VDI.destroy", &[&host.vdi_ref(&uuid)])
            .unwrap();
    }
    expect_lost(&sim, &repo, &vdi, &src, &["no longer exists"]);
    expect_incremental_again(&sim, &repo, &vdi, &src);
}

/// The repository lost the parent of the newest snapshot of a disk (its
/// object deleted): the next backup reads the disk in full as a new backup
/// set with a warning though the host still has a landmark, restores
/// bit-exact, and the one after is incremental again.
#[test]
fn xen_deleted_parent_snapshot_starts_a_new_set() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    let host = Host::login(&sim, PASSWORD);
    guest_writes(&sim, &vdi, 8 * MIB, 79);
    let j = backup(&repo, &sim, &src, &[]).ok().json();
    assert_eq!(disks(&j)[0]["full"].as_bool(), Some(false), "{j}");
    let first = repo.snapshots(&[]).remove(0);
    let object = first["object"].as_str().unwrap();
    std::fs::remove_file(repo.repo.join("snapshots").join(object)).unwrap();

    guest_writes(&sim, &vdi, 8 * MIB, 80);
    let r = backup(&repo, &sim, &src, &[]).ok();
    r.stderr_mentions(&["warning", "broken", "new backup set"]);
    let j = r.json();
    let d = &disks(&j)[0];
    assert_eq!(d["full"].as_bool(), Some(true), "{j}");
    assert!(
        d["new_set_reason"].as_str().unwrap().contains("broken"),
        "{j}"
    );
    let id = d["snapshot_id"].as_str().unwrap();
    assert!(restore_bytes(&repo, id) == host.disk(&vdi, 8 * MIB));
    assert_eq!(host.data_snapshots(), 0);
    expect_incremental_again(&sim, &repo, &vdi, &src);
}

#[test]
fn xen_lost_injected_codes() {
    for code in ["VDI_NO_CBT_METADATA", "SR_BACKEND_FAILURE_459"] {
        let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
        sim.set_faults(|f| {
            f.fail_calls.insert(
                "VDI.list_changed_blocks".into(),
                vec![code.into(), "".into(), "injected".into()],
            );
        });
        expect_lost(&sim, &repo, &vdi, &src, &[code]);
        sim.set_faults(|f| f.fail_calls.clear());
        expect_incremental_again(&sim, &repo, &vdi, &src);
    }
}

#[test]
fn xen_lost_legacy_host_uses_xmlrpc_and_export() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    // An old host: no CBT calls, no JSON-RPC, no get_nbd_info.
    sim.set_faults(|f| f.legacy_host = true);
    expect_lost(&sim, &repo, &vdi, &src, &["MESSAGE_METHOD_UNKNOWN"]);
    // Every run is then a (deduplicated) full read, with a warning.
    expect_lost(&sim, &repo, &vdi, &src, &["MESSAGE_METHOD_UNKNOWN"]);
    sim.set_faults(|f| f.legacy_host = false);
}

#[test]
fn xen_no_nbd_network_falls_back_to_export_raw_vdi() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    let host = Host::login(&sim, PASSWORD);
    let nets = host.try_call("network.get_all_records", &[]).unwrap();
    for (r, rec) in nets.as_struct().unwrap() {
        let purposes = rec.as_struct().unwrap()["purpose"]
            .as_array()
            .unwrap()
            .to_vec();
        for p in purposes {
            host.try_call("network.remove_purpose", &[r, p.as_str().unwrap()])
                .unwrap();
        }
    }
    expect_lost(&sim, &repo, &vdi, &src, &["export_raw_vdi"]);
}

#[test]
fn xen_failure_at_each_step_leaks_nothing_and_keeps_the_landmark() {
    type Inject = fn(&Simulator);
    let steps: Vec<(&str, Inject)> = vec![
        ("VDI.get_cbt_enabled", |s| fail(s, "VDI.get_cbt_enabled")),
        ("VM.snapshot", |s| fail(s, "VM.snapshot")),
        ("VM.get_VBDs", |s| fail(s, "VM.get_VBDs")),
        ("VDI.list_changed_blocks", |s| {
            fail(s, "VDI.list_changed_blocks")
        }),
        ("VDI.get_nbd_info", |s| fail(s, "VDI.get_nbd_info")),
        ("nbd read", |s| {
            s.set_faults(|f| f.nbd_drop_after_bytes = Some(0))
        }),
    ];
    fn fail(sim: &Simulator, method: &str) {
        sim.set_faults(|f| {
            f.fail_calls.insert(
                method.into(),
                vec!["INTERNAL_ERROR".into(), "injected".into()],
            );
        });
    }
    let (sim, vm, repo, src) = two_disk_vm_with_backup(5);
    let host = Host::login(&sim, PASSWORD);
    let landmarks = host.snapshot_vdis();
    assert_eq!(landmarks.len(), 2);
    for (name, inject) in steps {
        let before = repo.snapshot_ids().len();
        for d in &vm.disks {
            guest_writes(&sim, &d.vdi_uuid, d.size_bytes, before as u64);
        }
        inject(&sim);
        // VM.get_VBDs fails before the snapshot too; the point is the same.
        let r = backup(&repo, &sim, &src, &[]);
        sim.set_faults(|f| {
            f.fail_calls.clear();
            f.nbd_drop_after_bytes = None;
        });
        assert_eq!(r.code, 1, "{name}: the backup should fail\n{}", r.stderr);
        assert_eq!(
            repo.snapshot_ids().len(),
            before,
            "{name}: committed anyway"
        );
        assert_eq!(host.snapshot_vms(), 0, "{name}: snapshot VM leaked");
        assert_eq!(
            host.snapshot_vdis(),
            landmarks,
            "{name}: host snapshots changed"
        );
        assert_eq!(sim.dom0_attachments(), 0, "{name}: NBD attachment leaked");
    }
    // The landmark is still good: the next run is incremental.
    let j = backup(&repo, &sim, &src, &[]).ok().json();
    for (d, disk) in disks(&j).iter().zip(&vm.disks) {
        assert_eq!(d["full"].as_bool(), Some(false), "{j}");
        let id = d["snapshot_id"].as_str().unwrap();
        assert!(restore_bytes(&repo, id) == host.disk(&disk.vdi_uuid, disk.size_bytes));
    }
}

#[test]
fn xen_repository_failure_between_two_disks_keeps_every_chain_valid() {
    let (sim, vm, repo, src) = two_disk_vm_with_backup(21);
    let host = Host::login(&sim, PASSWORD);
    let before = repo.snapshot_ids().len();
    for d in &vm.disks {
        guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 22);
    }
    // The repository fails at the second disk's commit (the first went in).
    let fp = sim.fingerprint().to_string();
    let args: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"backup", &src, &"--fingerprint", &fp];
    let r = run_with_password_env(
        &repo,
        &args,
        PASSWORD,
        &[("CBTVAULT_TEST_FAILPOINT", "commit_snapshot:2")],
    );
    assert_eq!(r.code, 1, "the backup should fail\n{}", r.stderr);
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    // Disk 1's snapshot is committed, disk 2's and the VM metadata are not.
    assert_eq!(repo.snapshot_ids().len(), before + 1);
    // Host: no snapshot VM, no attachment, and exactly one landmark per
    // disk, none holding data (disk 1's new one, disk 2's old one).
    assert_eq!(host.snapshot_vms(), 0);
    assert_eq!(sim.dom0_attachments(), 0);
    assert_eq!(host.data_snapshots(), 0);
    assert_eq!(host.snapshot_vdis().len(), 2);
    // Both chains go on incrementally and restore bit-exact.
    for d in &vm.disks {
        guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 23);
    }
    let j = backup(&repo, &sim, &src, &[]).ok().json();
    for (d, disk) in disks(&j).iter().zip(&vm.disks) {
        assert_eq!(d["full"].as_bool(), Some(false), "{j}");
        let id = d["snapshot_id"].as_str().unwrap();
        assert!(restore_bytes(&repo, id) == host.disk(&disk.vdi_uuid, disk.size_bytes));
    }
    repo.run(&[&"check", &"--read-data"]).ok();
}

#[test]
fn xen_data_destroy_failure_after_commit_keeps_a_valid_landmark() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    let host = Host::login(&sim, PASSWORD);
    guest_writes(&sim, &vdi, 8 * MIB, 5);
    sim.set_faults(|f| {
        f.fail_calls.insert(
            "VDI.data_destroy".into(),
            vec!["INTERNAL_ERROR".into(), "injected".into()],
        );
    });
    let r = backup(&repo, &sim, &src, &[]).ok();
    r.stderr_mentions(&["warning", "data_destroy"]);
    sim.set_faults(|f| f.fail_calls.clear());
    // The snapshot kept its data; it is still the landmark.
    assert_eq!(host.data_snapshots(), 1);
    expect_incremental_again(&sim, &repo, &vdi, &src);
    assert_eq!(host.data_snapshots(), 0);
}

/// A backup running in the background that sleeps right after its
/// snapshots are taken and marked; SIGKILLed when dropped (or by
/// [`Stalled::kill`]).
struct Stalled(std::process::Child);

impl Stalled {
    fn start(repo: &TestRepo, sim: &Simulator, src: &str) -> Stalled {
        let fp = sim.fingerprint().to_string();
        let child = Command::new(crate::util::bin())
            .current_dir(repo.root())
            .env_remove("CBTVAULT_REPOSITORY")
            .env("CBTVAULT_XEN_PASSWORD", PASSWORD)
            .env("CBTVAULT_TEST_DELAY", "xen_snapshot_taken:120000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .arg("-r")
            .arg(&repo.repo)
            .args(["--json", "backup", src, "--fingerprint", &fp])
            .spawn()
            .expect("start cbtvault");
        Stalled(child)
    }

    /// SIGKILL, as a crash or an OOM kill would.
    fn kill(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (class, uuid) of what a backup reports it removed, all of run `run`.
fn removed_leftovers(j: &Json, run: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = j["host_leftovers_removed"]
        .as_array()
        .expect("host_leftovers_removed")
        .iter()
        .map(|r| {
            assert_eq!(r["run_id"].as_str(), Some(run), "{j}");
            assert!(r["reason"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
            (
                r["class"].as_str().unwrap().to_string(),
                r["uuid"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn xen_killed_vm_backup_leftovers_removed_by_next_run_others_untouched() {
    let (sim, vm, repo, src) = two_disk_vm_with_backup(31);
    let host = Host::login(&sim, PASSWORD);
    // The committed landmarks are marked as such.
    let landmarks = host.snapshot_records("VDI");
    assert_eq!(landmarks.len(), 2);
    for l in &landmarks {
        assert_eq!(l.vdi_type, "cbt_metadata");
        assert_eq!(
            l.other_config.get("cbtvault.state").map(String::as_str),
            Some("landmark"),
            "{l:?}"
        );
    }
    // Someone else's snapshot (no marker), and another repository's one
    // left by a run whose process is long gone: never touched.
    let d0 = host.vdi_ref(&vm.disks[0].vdi_uuid);
    let snap = |h: &Host| -> (String, String) {
        let r = h.try_call("VDI.snapshot", &[&d0]).unwrap();
        let r = r.as_str().unwrap().to_string();
        let u = h.try_call("VDI.get_uuid", &[&r]).unwrap();
        (r, u.as_str().unwrap().to_string())
    };
    let (_, foreign) = snap(&host);
    let (other_ref, other) = snap(&host);
    for (k, v) in [
        ("cbtvault.run", "0123"),
        ("cbtvault.state", "in-progress"),
        ("cbtvault.started", "2001-01-01T00:00:00Z"),
        ("cbtvault.process", "gone-host:1"),
        ("cbtvault.repository", "another-repository"),
    ] {
        host.try_call("VDI.add_to_other_config", &[&other_ref, k, v])
            .unwrap();
    }
    // The host refuses a second value for a key, as xapi does.
    let dup = host
        .try_call(
            "VDI.add_to_other_config",
            &[&other_ref, "cbtvault.run", "x"],
        )
        .unwrap_err();
    assert_eq!(dup.code, "MAP_DUPLICATE_KEY");

    for d in &vm.disks {
        guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 32);
    }
    // A backup killed right after its snapshot was taken (and marked).
    let mut stalled = Stalled::start(&repo, &sim, &src);
    let run = host.wait_for_marked_run(&[], 2);
    stalled.kill();
    let mut left: Vec<(String, String)> = Vec::new();
    for (class, recs) in [
        ("VM", host.snapshot_records("VM")),
        ("VDI", host.snapshot_records("VDI")),
    ] {
        for r in recs.iter().filter(|r| r.run() == Some(run.as_str())) {
            if class == "VDI" {
                assert_eq!(r.vdi_type, "user", "the leftover holds data: {r:?}");
            }
            left.push((class.to_string(), r.uuid.clone()));
        }
    }
    left.sort();
    assert_eq!(left.len(), 3, "{left:?}");
    // As if killed between a commit and the landmark's marker update: the
    // committed landmark says in-progress; the repository still protects it.
    for l in &landmarks {
        let r = host.vdi_ref(&l.uuid);
        host.try_call("VDI.remove_from_other_config", &[&r, "cbtvault.state"])
            .unwrap();
        host.try_call(
            "VDI.add_to_other_config",
            &[&r, "cbtvault.state", "in-progress"],
        )
        .unwrap();
    }

    let r = backup(&repo, &sim, &src, &[]).ok();
    let j = r.json();
    assert_eq!(removed_leftovers(&j, &run), left, "{j}");
    // Nothing of the killed run remains; no snapshot VM at all.
    assert_eq!(host.snapshot_vms(), 0);
    let now = host.snapshot_records("VDI");
    assert!(now.iter().all(|v| v.run() != Some(run.as_str())), "{now:?}");
    // Untouched, still holding data.
    for u in [&foreign, &other] {
        let v = now.iter().find(|v| &v.uuid == u).expect("left alone");
        assert_eq!(v.vdi_type, "user");
    }
    // The landmark survived the cleanup: the run was incremental, and it
    // restores bit for bit; the new landmarks are marked.
    for (d, disk) in disks(&j).iter().zip(&vm.disks) {
        assert_eq!(d["full"].as_bool(), Some(false), "{j}");
        let id = d["snapshot_id"].as_str().unwrap();
        assert!(restore_bytes(&repo, id) == host.disk(&disk.vdi_uuid, disk.size_bytes));
        let l = d["host_snapshot_vdi_uuid"].as_str().unwrap();
        let v = now.iter().find(|v| v.uuid == l).expect("new landmark");
        assert_eq!(v.vdi_type, "cbt_metadata");
        assert_eq!(
            v.other_config.get("cbtvault.state").map(String::as_str),
            Some("landmark")
        );
    }
    assert_eq!(now.len(), 4, "two landmarks and the two others: {now:?}");
    assert_eq!(sim.dom0_attachments(), 0);
}

#[test]
fn xen_leftover_of_a_live_concurrent_run_is_left_alone() {
    let (sim, repo, vdi, src) = one_disk_with_backup(8 * MIB);
    let host = Host::login(&sim, PASSWORD);
    guest_writes(&sim, &vdi, 8 * MIB, 41);
    let mut stalled = Stalled::start(&repo, &sim, &src);
    let run = host.wait_for_marked_run(&[], 1);
    let live: Vec<String> = host
        .snapshot_records("VDI")
        .iter()
        .filter(|v| v.run() == Some(run.as_str()))
        .map(|v| v.uuid.clone())
        .collect();
    assert_eq!(live.len(), 1);
    // A second backup of the same disk while the first one runs.
    let r = backup(&repo, &sim, &src, &[]).ok();
    let j = r.json();
    assert_eq!(removed_leftovers(&j, &run), vec![], "{j}");
    r.stderr_mentions(&["warning", &live[0], "still holds"]);
    let d = &disks(&j)[0];
    let id = d["snapshot_id"].as_str().unwrap();
    assert!(restore_bytes(&repo, id) == host.disk(&vdi, 8 * MIB));
    let now = host.snapshot_records("VDI");
    let v = now.iter().find(|v| v.uuid == live[0]).expect("left alone");
    assert_eq!(v.vdi_type, "user");
    // Once that run is killed, the next backup removes its snapshot.
    stalled.kill();
    guest_writes(&sim, &vdi, 8 * MIB, 42);
    let j = backup(&repo, &sim, &src, &[]).ok().json();
    assert_eq!(
        removed_leftovers(&j, &run),
        vec![("VDI".to_string(), live[0].clone())],
        "{j}"
    );
    let now = host.snapshot_records("VDI");
    assert_eq!(now.len(), 1, "only the landmark: {now:?}");
    assert_eq!(now[0].vdi_type, "cbt_metadata");
    let d = &disks(&j)[0];
    assert_eq!(d["full"].as_bool(), Some(false), "{j}");
    let id = d["snapshot_id"].as_str().unwrap();
    assert!(restore_bytes(&repo, id) == host.disk(&vdi, 8 * MIB));
}

#[test]
fn xen_tls_pin_mismatch_is_refused() {
    let sim = start();
    let vm = sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let repo = TestRepo::new();
    let src = source(&sim, "vdi", &vm.disks[0].vdi_uuid);
    let presented = sim.fingerprint().to_string();
    let wrong = "00:".repeat(31) + "00";
    let args: Vec<&dyn AsRef<OsStr>> = vec![&"backup", &src, &"--fingerprint", &wrong];
    let r = run_with_password(&repo, &args, PASSWORD);
    assert_eq!(r.code, 1);
    // Both fingerprints: the one expected and the one presented.
    r.stderr_mentions(&["certificate", &wrong, &presented, "--fingerprint"]);
    assert_said_once(&r.stderr);
    assert!(repo.snapshot_ids().is_empty());
    // Neither does the system trust store know the simulator: the
    // message says so in words, with the fingerprint and the option that
    // would trust it, and not --insecure.
    let args: Vec<&dyn AsRef<OsStr>> = vec![&"backup", &src];
    let r = run_with_password(&repo, &args, PASSWORD);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&["self-signed", &format!("--fingerprint {presented}")]);
    assert!(!r.stderr.contains("insecure"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("UnsupportedSignatureAlgorithm"),
        "{}",
        r.stderr
    );
    assert_said_once(&r.stderr);
    assert!(Host::login(&sim, PASSWORD).snapshot_vdis().is_empty());
    // --insecure works but says so.
    let args: Vec<&dyn AsRef<OsStr>> = vec![&"backup", &src, &"--insecure"];
    let r = run_with_password(&repo, &args, PASSWORD).ok();
    r.stderr_mentions(&["warning", "insecure"]);
}

#[test]
fn xen_tls_name_mismatch_names_both_sides() {
    // A host whose certificate is for xs1.example (and its IPs), trusted
    // as a CA, reached as 'localhost'.
    let sim = Simulator::start(xapi_sim::SimOptions {
        password: PASSWORD.into(),
        hostname: "xs1.example".into(),
        ..xapi_sim::SimOptions::default()
    })
    .unwrap();
    let vm = sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let repo = TestRepo::new();
    let ca = repo.path("host-cert.pem");
    std::fs::write(&ca, sim.certificate_pem()).unwrap();
    let ca = ca.display().to_string();
    let port = sim.https_address().port();
    let src = format!("xen://root@localhost:{port}/vdi/{}", vm.disks[0].vdi_uuid);
    let args: Vec<&dyn AsRef<OsStr>> = vec![&"backup", &src, &"--ca-file", &ca];
    let r = run_with_password(&repo, &args, PASSWORD);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&[
        "it is for 'xs1.example', '127.0.0.1'",
        "not for 'localhost'",
        "connect to a name the certificate carries",
        &format!("--fingerprint {}", sim.fingerprint()),
    ]);
    assert!(!r.stderr.contains("self-signed"), "{}", r.stderr);
    assert_said_once(&r.stderr);
    // The same certificate reached by a name it carries is trusted.
    let src = source(&sim, "vdi", &vm.disks[0].vdi_uuid);
    let args: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"backup", &src, &"--ca-file", &ca];
    run_with_password(&repo, &args, PASSWORD).ok();
}

/// One error line, and no clause of it twice (a cause printed again by
/// a wrapping error).
fn assert_said_once(stderr: &str) {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let clauses: Vec<&str> = errors[0].split([':', ';']).map(str::trim).collect();
    for (i, c) in clauses.iter().enumerate() {
        assert!(
            c.len() < 12 || !clauses[i + 1..].contains(c),
            "'{c}' twice in {stderr}"
        );
    }
    assert!(!stderr.contains("docs.rs"), "{stderr}");
}

#[test]
fn xen_password_only_from_file_or_env_and_never_shown() {
    let sim = start();
    let vm = sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let repo = TestRepo::new();
    let src = source(&sim, "vdi", &vm.disks[0].vdi_uuid);
    // No option takes the password itself.
    let help = crate::util::run_in(repo.root(), &[&"backup", &"--help"]).ok();
    assert!(!help.out().contains("--password "), "{}", help.out());
    // A wrong password: refused, and not echoed.
    let wrong = "wrong-pw-123";
    let fp = sim.fingerprint().to_string();
    let args: Vec<&dyn AsRef<OsStr>> = vec![&"backup", &src, &"--fingerprint", &fp];
    let r = run_with_password(&repo, &args, wrong);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&["SESSION_AUTHENTICATION_FAILED"]);
    assert!(!r.stderr.contains(wrong));
    // From a file.
    let pw = repo.path("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let pws = pw.display().to_string();
    let args: Vec<&dyn AsRef<OsStr>> = vec![
        &"backup",
        &src,
        &"--fingerprint",
        &fp,
        &"--xen-password-file",
        &pws,
    ];
    run_with_password(&repo, &args, "").ok();
    // In a URL: refused without echoing it.
    let bad = src.replace("root@", &format!("root:{PASSWORD}@"));
    let r = crate::util::run_in(repo.root(), &[&"-r", &repo.repo, &"backup", &bad]);
    assert_eq!(r.code, 1);
    assert!(!r.stderr.contains(PASSWORD), "{}", r.stderr);
}

#[test]
fn xen_client_json_and_xml_rpc_agree_on_values_and_errors() {
    use cbtvault::source::xenapi::client::Wire;
    use cbtvault::source::xenapi::tls::parse_fingerprint;
    use cbtvault::source::xenapi::{
        Client, ClientOptions, Credentials, HttpsTrust, Password, XenApiError,
    };
    let sim = start();
    let vm = sim.create_vm_with_disks("vm", &[3 * MIB]).unwrap();
    let uuid = &vm.disks[0].vdi_uuid;
    for wire in [Wire::JsonRpc, Wire::XmlRpc] {
        let a = sim.https_address();
        let trust = HttpsTrust::Fingerprint(vec![parse_fingerprint(sim.fingerprint()).unwrap()]);
        let client = Client::new(ClientOptions::new(&a.ip().to_string(), a.port(), trust)).unwrap();
        client.set_wire(wire);
        let s = client
            .login(Credentials {
                user: "root".into(),
                password: Password::new(PASSWORD),
            })
            .unwrap();
        let r = s.vdi_by_uuid(uuid).unwrap();
        let rec = s.vdi_record(&r).unwrap();
        // 64-bit ints arrive as strings in XML-RPC, numbers in JSON.
        assert_eq!(rec.virtual_size, 3 * MIB, "{wire:?}");
        assert_eq!(rec.cbt_enabled, Some(false));
        assert_eq!(s.vdi_type(&r).unwrap(), "user");
        match s.vdi_by_uuid("00000000-0000-0000-0000-000000000000") {
            Err(XenApiError::Api { code, params, .. }) => {
                assert_eq!(code, "UUID_INVALID");
                assert_eq!(params[0], "VDI");
            }
            other => panic!("{wire:?}: {other:?}"),
        }
        match s.vdi_data_destroy(&r) {
            Err(e) => assert!(e.is_code("OPERATION_NOT_ALLOWED"), "{e}"),
            Ok(()) => panic!("data_destroy of a live VDI"),
        }
        assert_eq!(s.client().wire(), wire);
        // An expired session is renewed once, transparently.
        let old = s.session_ref().unwrap();
        sim.call("session.logout", &[Value::str(&old)]).unwrap();
        assert_eq!(s.vdi_uuid(&r).unwrap(), *uuid);
        assert_ne!(s.session_ref().unwrap(), old);
    }
}

/// The workflow's errors are typed: the committer's own error comes back
/// as `WorkflowError::Commit` carrying it (and the run's host snapshot is
/// destroyed), a host refusal as `WorkflowError::Host` with its XenAPI code.
#[test]
fn xen_workflow_errors_are_matchable() {
    use std::collections::BTreeMap;

    use cbtvault::source::xenapi::tls::parse_fingerprint;
    use cbtvault::source::xenapi::workflow::{
        self, Committer, FrozenDisk, Previous, WorkflowError, WorkflowOptions,
    };
    use cbtvault::source::xenapi::{
        Client, ClientOptions, Credentials, HttpsTrust, Password, XenUrl,
    };

    #[derive(Debug, thiserror::Error)]
    #[error("repository full")]
    struct RepositoryFull;

    /// A repository side that refuses every disk.
    struct Refusing;
    impl Committer for Refusing {
        type Error = RepositoryFull;
        fn previous(&mut self, _: workflow::DiskKey<'_>) -> Result<Previous, RepositoryFull> {
            Ok(Previous::None)
        }
        fn commit_disk(&mut self, _: FrozenDisk<'_>) -> Result<(), RepositoryFull> {
            Err(RepositoryFull)
        }
        fn commit_metadata(
            &mut self,
            _: &str,
            _: &[u8],
            _: BTreeMap<String, String>,
        ) -> Result<(), RepositoryFull> {
            Ok(())
        }
        fn warn(&mut self, _: String) {}
        fn info(&mut self, _: String) {}
    }

    let sim = start();
    let vm = sim.create_vm_with_disks("vm", &[4 * MIB]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    let url = XenUrl::parse(&source(&sim, "vdi", &vdi)).unwrap();
    let client = Client::new(ClientOptions::new(
        &url.host,
        url.port,
        HttpsTrust::Fingerprint(vec![parse_fingerprint(sim.fingerprint()).unwrap()]),
    ))
    .unwrap();
    let session = client
        .login(Credentials {
            user: "root".into(),
            password: Password::new(PASSWORD),
        })
        .unwrap();
    let options = WorkflowOptions::default();

    let err = workflow::run(&session, &url, &options, &mut Refusing).unwrap_err();
    assert!(
        matches!(
            err,
            WorkflowError::Commit {
                source: RepositoryFull,
                ..
            }
        ),
        "{err}"
    );
    let host = Host::login(&sim, PASSWORD);
    assert_eq!(host.data_snapshots(), 0, "the run's snapshot was destroyed");

    let unknown =
        XenUrl::parse(&source(&sim, "vdi", "00000000-0000-4000-8000-000000000000")).unwrap();
    match workflow::run(&session, &unknown, &options, &mut Refusing) {
        Err(WorkflowError::Host { source, .. }) => {
            assert!(source.is_code("UUID_INVALID"), "{source}")
        }
        other => panic!("expected a host error, got {other:?}"),
    }
    session.logout();
}

/// Regression (issue 21): a host refusing a call was printed twice, once
/// in the wrapping step's message and again as its cause. Each cause
/// appears once on the text error line and once in the JSON `causes`.
#[test]
fn xen_refused_call_cause_is_said_once() {
    let (sim, vm, repo, src) = two_disk_vm_with_backup(11);
    let cause = "refused-by-test-5d1c";
    sim.set_faults(|f| {
        f.fail_calls.insert(
            "VM.snapshot".into(),
            vec!["INTERNAL_ERROR".into(), cause.into()],
        );
    });
    let _ = vm;
    let fp = sim.fingerprint().to_string();
    let text = run_with_password(&repo, &[&"backup", &src, &"--fingerprint", &fp], PASSWORD);
    assert_eq!(text.code, 1, "{}", text.stderr);
    assert_eq!(text.stderr.matches(cause).count(), 1, "{}", text.stderr);
    assert_said_once(&text.stderr);

    let json = backup(&repo, &sim, &src, &[]);
    assert_eq!(json.code, 1, "{}", json.stderr);
    json.messages();
    let errors: Vec<serde_json::Value> = json
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["message_type"] == "error")
        .collect();
    assert_eq!(errors.len(), 1, "{}", json.stderr);
    let message = errors[0]["message"].as_str().unwrap();
    assert_eq!(message.matches(cause).count(), 1, "{message}");
    let causes: Vec<&str> = errors[0]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(causes.len() >= 2, "{causes:?}");
    assert_eq!(
        causes
            .iter()
            .map(|c| c.matches(cause).count())
            .sum::<usize>(),
        1,
        "{causes:?}"
    );
    // Joined, the causes are the message.
    assert_eq!(causes.join(": "), message);
}

/// A host that serves one NBD connection at a time: the backup goes on
/// with the one that opened and says so once, in one line.
#[test]
fn xen_fewer_nbd_connections_than_asked_continue_and_say_so() {
    let sim = Simulator::start(xapi_sim::SimOptions {
        password: PASSWORD.into(),
        data_destroy_wait: std::time::Duration::from_millis(500),
        nbd_max_connections: 1,
        ..xapi_sim::SimOptions::default()
    })
    .expect("start the simulator");
    let size = 4 * MIB;
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    fill(&sim, &vdi, size, 3);
    let repo = TestRepo::new();
    let src = source(&sim, "vdi", &vdi);
    let started = std::time::Instant::now();
    let r = backup(&repo, &sim, &src, &["--nbd-connections", "4"]).ok();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "stalled"
    );
    let said: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("of 4 NBD connections open"))
        .collect();
    assert_eq!(said.len(), 1, "{}", r.stderr);
    assert!(said[0].contains("1 of 4"), "{}", said[0]);
    let id = disks(&r.json())[0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let host = Host::login(&sim, PASSWORD);
    assert!(restore_bytes(&repo, &id) == host.disk(&vdi, size));
}

/// Issue 17, item 1: a disk whose `VDI.enable_cbt` is refused (an SR
/// without CBT support, a RAW VDI, an unlicensed pool) is read in full
/// every run with a warning naming the cause; the VM's other disks stay
/// incremental; the exit code says "completed with warnings" (4); every
/// snapshot restores bit-exact and nothing but the landmarks stays on the
/// host.
#[test]
fn xen_enable_cbt_refused_for_one_disk_keeps_the_others_incremental() {
    use xapi_sim::DiskKind;
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm: SimVm = sim.create_vm_with_disks("vm", &[4 * MIB]).unwrap();
    let lun = sim
        .add_disk(&vm.vm_uuid, "lun", 2 * MIB, DiskKind::SrWithoutCbt)
        .unwrap();
    let raw = sim
        .add_disk(&vm.vm_uuid, "raw", 2 * MIB, DiskKind::Raw)
        .unwrap();
    let all = [vm.disks[0].clone(), lun.clone(), raw.clone()];
    for (k, d) in all.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 40 + k as u64);
    }
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    let mut expected = Vec::new();
    for run in 0..3u64 {
        if run > 0 {
            for (k, d) in all.iter().enumerate() {
                guest_writes(&sim, &d.vdi_uuid, d.size_bytes, run * 7 + k as u64);
            }
        }
        let r = backup(&repo, &sim, &src, &[]).expect_code(4);
        r.stderr_mentions(&[
            "SR_OPERATION_NOT_SUPPORTED",
            "SR_BACKEND_FAILURE_66",
            "read in full",
        ]);
        let j = r.json();
        let ds = disks(&j);
        assert_eq!(ds.len(), 3, "{j}");
        for (d, disk) in ds.iter().zip(&all) {
            assert_eq!(d["vdi_uuid"].as_str(), Some(disk.vdi_uuid.as_str()));
            let refused = disk.vdi_uuid != vm.disks[0].vdi_uuid;
            assert_eq!(d["cbt_unavailable"].is_string(), refused, "{d}");
            // The CBT disk is incremental after the first run; the others
            // are read whole every time.
            assert_eq!(
                d["full"].as_bool(),
                Some(run == 0 || refused),
                "run {run}: {d}"
            );
            if refused {
                assert_eq!(
                    crate::util::u64_of(d, "blocks_read"),
                    disk.size_bytes / crate::util::BS,
                    "{d}"
                );
            }
            expected.push((
                d["snapshot_id"].as_str().unwrap().to_string(),
                host.disk(&disk.vdi_uuid, disk.size_bytes),
            ));
        }
        assert_eq!(host.snapshot_vms(), 0, "run {run}: snapshot VM leaked");
        assert_eq!(host.data_snapshots(), 0, "run {run}: a snapshot VDI leaked");
        // One landmark: the CBT disk's.
        assert_eq!(host.snapshot_vdis().len(), 1, "run {run}");
    }
    for (id, bytes) in &expected {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }
    // An unlicensed pool refuses CBT for every disk: still a backup, with
    // warnings, never a failure. (A disk whose CBT is on stays tracked.)
    let other: SimVm = sim.create_vm_with_disks("unlicensed", &[MIB]).unwrap();
    sim.set_faults(|f| f.cbt_unlicensed = true);
    let r = backup(&repo, &sim, &source(&sim, "vm", &other.vm_uuid), &[]).expect_code(4);
    r.stderr_mentions(&["LICENCE_RESTRICTION"]);
    sim.set_faults(|f| f.cbt_unlicensed = false);
}

/// Issue 17, item 2: a VM disk that is not backed up (type `ephemeral`) is
/// left out of `VM.snapshot` (`ignore_vdis`), so nothing of a run stays on
/// the host but the landmarks.
#[test]
fn xen_disks_not_backed_up_leave_no_snapshot_on_the_host() {
    use xapi_sim::DiskKind;
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm: SimVm = sim.create_vm_with_disks("vm", &[2 * MIB]).unwrap();
    let scratch = sim
        .add_disk(&vm.vm_uuid, "scratch", MIB, DiskKind::Ephemeral)
        .unwrap();
    fill(&sim, &vm.disks[0].vdi_uuid, 2 * MIB, 3);
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    for run in 0..3u64 {
        guest_writes(&sim, &vm.disks[0].vdi_uuid, 2 * MIB, run);
        let j = backup(&repo, &sim, &src, &[]).ok().json();
        let ds = disks(&j);
        assert_eq!(ds.len(), 1, "{j}");
        assert_ne!(ds[0]["vdi_uuid"].as_str(), Some(scratch.vdi_uuid.as_str()));
        assert_eq!(host.snapshot_vms(), 0, "run {run}");
        let snaps = host.snapshot_vdis();
        assert_eq!(snaps.len(), 1, "run {run}: {snaps:?}");
        assert_eq!(snaps[0].1, "cbt_metadata", "run {run}: {snaps:?}");
    }
}

/// Issue 17, item 4: a VM disk replaced by one with a new uuid (moved to
/// another SR, replaced) is not quietly a first backup: the run warns that
/// the previous disk's chain ended, naming it and its last snapshot, and
/// exits 4; the new disk is read in full and restores bit-exact.
#[test]
fn xen_replaced_disk_warns_that_the_old_chain_ended() {
    use xapi_sim::DiskKind;
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm: SimVm = sim.create_vm_with_disks("vm", &[2 * MIB, MIB]).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 60 + k as u64);
    }
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    let first = backup(&repo, &sim, &src, &[]).ok().json();
    let old = &vm.disks[1];
    let old_snapshot = disks(&first)[1]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Replace the second disk: unplug it, plug a new VDI in its place.
    let vbds = host.try_call("VDI.get_VBDs", &[&old.vdi_ref]).unwrap();
    let vbd = vbds.as_array().unwrap()[0].as_str().unwrap().to_string();
    host.try_call("VBD.destroy", &[&vbd]).unwrap();
    let new = sim
        .add_disk(&vm.vm_uuid, "replacement", MIB, DiskKind::Cbt)
        .unwrap();
    fill(&sim, &new.vdi_uuid, MIB, 70);
    let r = backup(&repo, &sim, &src, &[]).expect_code(4);
    r.stderr_mentions(&[&old.vdi_uuid, &old_snapshot, "chain ends", &new.vdi_uuid]);
    let j = r.json();
    let ds = disks(&j);
    assert_eq!(ds.len(), 2, "{j}");
    assert_eq!(
        ds[0]["full"].as_bool(),
        Some(false),
        "the kept disk stays incremental"
    );
    assert_eq!(ds[1]["vdi_uuid"].as_str(), Some(new.vdi_uuid.as_str()));
    assert_eq!(ds[1]["full"].as_bool(), Some(true));
    let id = ds[1]["snapshot_id"].as_str().unwrap().to_string();
    assert!(restore_bytes(&repo, &id) == host.disk(&new.vdi_uuid, MIB));
    // The next run has nothing to say.
    let again = backup(&repo, &sim, &src, &[]).ok();
    assert!(!again.stderr.contains("chain ends"), "{}", again.stderr);
}

/// Issue 17, item 5: an error names the source as typed (`/vm/` or `/vdi/`
/// kept) and says each cause once.
#[test]
fn xen_error_messages_keep_the_url_and_say_each_cause_once() {
    let sim = start();
    let vm: SimVm = sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let repo = TestRepo::new();
    let check = |r: Run, url: &str| {
        assert_eq!(r.code, 1, "{}", r.stderr);
        let err = r
            .stderr
            .lines()
            .find(|l| l.starts_with('{') && l.contains("\"error\""))
            .unwrap_or_else(|| panic!("no error message: {}", r.stderr));
        let err: Json = serde_json::from_str(err).unwrap();
        let line = err["message"].as_str().unwrap().to_string();
        let causes: Vec<&str> = err["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        for (i, c) in causes.iter().enumerate() {
            for later in &causes[i + 1..] {
                assert!(
                    !later.contains(c),
                    "cause '{c}' is said again in '{later}': {line}"
                );
            }
        }
        assert!(line.contains(url), "{line}");
        let parts: Vec<&str> = line.split(": ").collect();
        for (i, p) in parts.iter().enumerate() {
            assert!(
                !parts[i + 1..].contains(p),
                "'{p}' appears twice in: {line}"
            );
        }
    };
    // A call that fails, and NBD reads that keep dropping.
    let vm_src = source(&sim, "vm", &vm.vm_uuid);
    sim.set_faults(|f| {
        f.fail_calls.insert(
            "VM.snapshot".into(),
            vec!["SR_FULL".into(), "1".into(), "2".into()],
        );
    });
    let r = backup(&repo, &sim, &vm_src, &[]);
    check(r, &format!("/vm/{}", vm.vm_uuid));
    sim.set_faults(|f| {
        f.fail_calls.clear();
        f.nbd_drop_after_bytes = Some(1);
    });
    let vdi_src = source(&sim, "vdi", &vm.disks[0].vdi_uuid);
    let r = backup(&repo, &sim, &vdi_src, &[]);
    check(r, &format!("/vdi/{}", vm.disks[0].vdi_uuid));
}

/// Issue 17, item 3: xapi restarts mid-read (every session ends) and an
/// NBD connection drops: the backup logs in again, fetches
/// `VDI.get_nbd_info` again, reconnects and finishes; every block is
/// restored bit-exact and nothing of the run stays on the host.
#[test]
fn xen_backup_survives_the_session_dying_mid_read() {
    let sim = start();
    let vm: SimVm = sim.create_vm_with_disks("vm", &[8 * MIB, 4 * MIB]).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 80 + k as u64);
    }
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    let mut expected = Vec::new();
    for run in 0..2u64 {
        if run > 0 {
            for (k, d) in vm.disks.iter().enumerate() {
                guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 90 + k as u64);
            }
        }
        // Mid-read in the full and in the incremental (which reads less).
        let after = if run == 0 { MIB / 2 } else { 16 << 10 };
        sim.set_faults(move |f| f.expire_sessions_after_nbd_bytes = Some(after));
        let r = backup(&repo, &sim, &src, &["--nbd-connections", "2"]).ok();
        let all = format!("{}{}", r.out(), r.stderr);
        assert!(
            all.contains("opened again") && all.contains("session expired or xapi restarted"),
            "run {run}: {all}"
        );
        let j = r.json();
        // The restart happened during this run (the switch is one shot).
        let armed = std::sync::Arc::new(std::sync::Mutex::new(true));
        let seen = armed.clone();
        sim.set_faults(move |f| {
            *seen.lock().unwrap() = f.expire_sessions_after_nbd_bytes.is_some()
        });
        assert!(
            !*armed.lock().unwrap(),
            "run {run}: the sessions never expired"
        );
        let host = Host::login(&sim, PASSWORD);
        for (d, disk) in disks(&j).iter().zip(&vm.disks) {
            assert_eq!(d["full"].as_bool(), Some(run == 0), "run {run}: {d}");
            expected.push((
                d["snapshot_id"].as_str().unwrap().to_string(),
                host.disk(&disk.vdi_uuid, disk.size_bytes),
            ));
        }
        assert_eq!(host.snapshot_vms(), 0, "run {run}");
        assert_eq!(host.data_snapshots(), 0, "run {run}");
        assert_eq!(sim.dom0_attachments(), 0, "run {run}");
    }
    for (id, bytes) in &expected {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }
}

/// The simulator's call log shows the workflow's order (seeds' procedure,
/// reference §2): CBT on before the snapshot, every bitmap before any NBD
/// connection, the snapshot VM gone before `data_destroy`, logout last.
#[test]
fn xen_call_log_shows_the_workflow_order() {
    let sim = start();
    let vm: SimVm = sim.create_vm_with_disks("vm", &[2 * MIB, MIB]).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 5 + k as u64);
    }
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    let pos = |calls: &[String], what: &str, from: usize| -> Option<usize> {
        calls[from..]
            .iter()
            .position(|c| c.contains(what))
            .map(|p| p + from)
    };
    for run in 0..2 {
        if run == 1 {
            for d in &vm.disks {
                guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 11);
            }
        }
        let start = sim.calls().len();
        backup(&repo, &sim, &src, &[]).ok();
        let calls = sim.calls();
        let at = |what: &str| {
            pos(&calls, what, start)
                .unwrap_or_else(|| panic!("run {run}: no {what} in {:?}", &calls[start..]))
        };
        let last = |what: &str| {
            (start..calls.len())
                .rev()
                .find(|&i| calls[i].contains(what))
                .unwrap_or_else(|| panic!("run {run}: no {what}"))
        };
        let snapshot = at("VM.snapshot ok");
        if run == 0 {
            assert!(
                last("VDI.enable_cbt ok") < snapshot,
                "run 0: CBT enabled after the snapshot"
            );
        } else {
            assert!(
                pos(&calls, "VDI.enable_cbt", start).is_none(),
                "run 1 enabled CBT again"
            );
            assert!(
                last("VDI.list_changed_blocks ok") < at("NBD connect"),
                "run 1: an NBD connection before every bitmap was read: {:?}",
                &calls[start..]
            );
        }
        assert!(snapshot < at("NBD connect"), "run {run}");
        let destroy_vm = at("VM.destroy ok");
        assert!(
            last("NBD connect") < destroy_vm,
            "run {run}: read after the VM went"
        );
        assert!(destroy_vm < at("VDI.data_destroy ok"), "run {run}");
        assert_eq!(
            pos(&calls, "session.logout", start),
            Some(calls.len() - 1),
            "run {run}: logout is not the last call: {:?}",
            &calls[start..]
        );
    }
}
