//! Restores into XenServer end to end: the real `cbtvault` binary against
//! the simulator. Snapshots of a 30-deep chain restored bit-exact into a
//! new VDI and into the original one, the chunked body sending about the
//! data only, a new VM from a VM backup, point-in-time selection, and the
//! faults: the target in use, a missing SR, the import task failing
//! midway, a corrupt block in the repository (no VDI left behind, the
//! repository untouched).

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::time::Duration;

use cbtvault::format::pack::decode_pack_index;
use serde_json::Value as Json;
use xapi_sim::{Simulator, Value};

use crate::util::{flip_byte, random_bytes, Run, TestRepo, BS};

const MIB: u64 = 1 << 20;
const PASSWORD: &str = "restore-xen-pw";

fn start() -> Simulator {
    crate::xen_util::start(PASSWORD)
}

use crate::xen_util::{fill, guest_writes, xen_url as url, Host};

impl<'a> Host<'a> {
    fn call(&self, method: &str, args: &[&str]) -> Value {
        self.try_call(method, args)
            .unwrap_or_else(|e| panic!("{method}: {e:?}"))
    }

    fn text(&self, method: &str, args: &[&str]) -> String {
        self.call(method, args).as_str().unwrap().to_string()
    }

    /// The uuid of the SR holding VDI `uuid`.
    fn sr_of(&self, vdi_uuid: &str) -> String {
        let vdi = self.text("VDI.get_by_uuid", &[vdi_uuid]);
        let sr = self.text("VDI.get_SR", &[&vdi]);
        self.text("SR.get_uuid", &[&sr])
    }

    fn vdi_count(&self) -> usize {
        self.call("VDI.get_all", &[]).as_array().unwrap().len()
    }
}

/// `cbtvault -r REPO --json ARGS --fingerprint FP`, the password in the
/// environment only.
fn xen_run(repo: &TestRepo, sim: &Simulator, args: &[&str]) -> Run {
    let mut cmd = Command::new(crate::util::bin());
    cmd.current_dir(repo.root())
        .env_remove("CBTVAULT_REPOSITORY")
        .env("CBTVAULT_XEN_PASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .arg("-r")
        .arg(&repo.repo)
        .arg("--json");
    let mut shown = String::from("cbtvault --json");
    let fp = sim.fingerprint().to_string();
    let all: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--fingerprint", fp.as_str()])
        .collect();
    for a in &all {
        cmd.arg(AsRef::<OsStr>::as_ref(a));
        shown.push(' ');
        shown.push_str(a);
    }
    let out = cmd.output().expect("run cbtvault");
    let run = Run {
        command: shown,
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!run.stderr.contains(PASSWORD) && !run.out().contains(PASSWORD));
    run
}

fn backup(repo: &TestRepo, sim: &Simulator, src: &str) -> Json {
    xen_run(repo, sim, &["backup", src]).ok().json()
}

fn disk_snapshot(j: &Json, k: usize) -> String {
    j["disks"][k]["snapshot_id"].as_str().unwrap().to_string()
}

fn restore(repo: &TestRepo, sim: &Simulator, id: &str, target: &str, extra: &[&str]) -> Run {
    let mut args = vec!["restore", id, "--target", target];
    args.extend_from_slice(extra);
    xen_run(repo, sim, &args)
}

/// The repository is untouched by a failed restore and still restores.
fn assert_repo_fine(repo: &TestRepo, id: &str, expected: &[u8]) {
    let (check, _) = repo.check(true);
    check.ok();
    let target = repo.path(&format!("fine-{}.img", rand::random::<u32>()));
    repo.restore(id, &target, &[]).ok();
    assert!(std::fs::read(&target).unwrap() == expected);
    std::fs::remove_file(&target).unwrap();
}

#[test]
fn xen_restore_chain_snapshots_into_new_and_original_vdi_bit_exact() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let size = 8 * MIB;
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    fill(&sim, &vdi, size, 1);
    let sr = host.sr_of(&vdi);
    let repo = TestRepo::new();
    let src = url(&sim, "vdi", &vdi);
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for run in 0..30u64 {
        if run > 0 {
            guest_writes(&sim, &vdi, size, run);
        }
        let j = backup(&repo, &sim, &src);
        expected.push((disk_snapshot(&j, 0), host.disk(&vdi, size)));
    }
    let sr_target = url(&sim, "sr", &sr);
    let vdi_target = url(&sim, "vdi", &vdi);
    for k in [0usize, 9, 29] {
        let (id, bytes) = &expected[k];
        // A new VDI in the SR, read back over NBD too.
        let j = restore(
            &repo,
            &sim,
            id,
            &sr_target,
            &["--verify", "--import-format", "raw"],
        )
        .ok()
        .json();
        assert_eq!(j["created"].as_bool(), Some(true), "{j}");
        assert_eq!(j["verified"].as_bool(), Some(true), "{j}");
        let new = j["vdi_uuid"].as_str().unwrap();
        assert_ne!(new, vdi);
        assert!(
            host.disk(new, size) == *bytes,
            "snapshot {k} into a new VDI differs"
        );
        let name = host.text(
            "VDI.get_name_label",
            &[&host.text("VDI.get_by_uuid", &[new])],
        );
        assert!(name.ends_with(" (restored)"), "name '{name}'");
        // The original VDI, overwritten: raw, since a chunked body would
        // leave the current bytes where the snapshot has zeros.
        restore(
            &repo,
            &sim,
            id,
            &vdi_target,
            &["--import-format", "chunked"],
        )
        .expect_code(1)
        .stderr_mentions(&["stale", "raw"]);
        let j = restore(&repo, &sim, id, &vdi_target, &[]).ok().json();
        assert_eq!(j["created"].as_bool(), Some(false), "{j}");
        assert_eq!(j["import_format"].as_str(), Some("raw"), "{j}");
        assert!(
            host.disk(&vdi, size) == *bytes,
            "snapshot {k} into the original differs"
        );
    }
    assert_eq!(sim.dom0_attachments(), 0);
}

#[test]
fn xen_restore_chunked_sends_about_the_data_size() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let size = 256 * MIB;
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    // About 1% of the disk: 40 blocks of 64 KiB spread over it.
    for k in 0..40u64 {
        sim.guest_write(&vdi, k * 97 * BS, &random_bytes(7, k, BS as usize))
            .unwrap();
    }
    let data = 40 * BS;
    let repo = TestRepo::new();
    let j = backup(&repo, &sim, &url(&sim, "vdi", &vdi));
    let id = disk_snapshot(&j, 0);
    let before = sim.import_bytes_received();
    let r = restore(
        &repo,
        &sim,
        &id,
        &url(&sim, "sr", &host.sr_of(&vdi)),
        &["--verify"],
    )
    .ok();
    let j = r.json();
    let sent = sim.import_bytes_received() - before;
    assert_eq!(j["import_format"].as_str(), Some("chunked"), "{j}");
    assert!(
        sent >= data && sent <= data + 41 * 12,
        "sent {sent} for {data} bytes of data"
    );
    assert_eq!(j["body_bytes"].as_u64(), Some(sent));
    let new = j["vdi_uuid"].as_str().unwrap();
    assert!(host.disk(new, size) == host.disk(&vdi, size));
}

/// One VM with an 8 MiB disk backed up once.
fn one_backup() -> (Simulator, TestRepo, String, String, String, Vec<u8>) {
    let sim = start();
    let size = 8 * MIB;
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    fill(&sim, &vdi, size, 3);
    let repo = TestRepo::new();
    let j = backup(&repo, &sim, &url(&sim, "vdi", &vdi));
    let bytes = sim.read_vdi(&vdi, 0, size as usize).unwrap();
    (sim, repo, vm.vm_uuid, vdi, disk_snapshot(&j, 0), bytes)
}

#[test]
fn xen_restore_refuses_a_vdi_in_use_or_of_another_size() {
    let (sim, repo, vm, vdi, id, bytes) = one_backup();
    sim.set_vm_running(&vm, true).unwrap();
    sim.guest_write(&vdi, 0, b"live data").unwrap();
    let r = restore(&repo, &sim, &id, &url(&sim, "vdi", &vdi), &[]).expect_code(1);
    r.stderr_mentions(&["in use", "--force"]);
    assert_eq!(&sim.read_vdi(&vdi, 0, 9).unwrap(), b"live data");
    // --force: the host itself refuses an import into a disk a running VM
    // writes, with its code; nothing is written, no task is left.
    let r = restore(&repo, &sim, &id, &url(&sim, "vdi", &vdi), &["--force"]).expect_code(1);
    r.stderr_mentions(&["VDI_IN_USE"]);
    assert_eq!(&sim.read_vdi(&vdi, 0, 9).unwrap(), b"live data");
    let tasks = Host::login(&sim, PASSWORD).call("task.get_all", &[]);
    assert_eq!(tasks.as_array().map(|a| a.len()), Some(0), "{tasks:?}");
    sim.set_vm_running(&vm, false).unwrap();
    // Attached to dom0 (say, by another tool): refused here too.
    let vbd = sim.attach_to_dom0(&vdi).unwrap();
    let r = restore(&repo, &sim, &id, &url(&sim, "vdi", &vdi), &[]).expect_code(1);
    r.stderr_mentions(&["in use"]);
    assert_eq!(&sim.read_vdi(&vdi, 0, 9).unwrap(), b"live data");
    sim.detach(&vbd);
    // The host's own refusal comes back with its code: the backup's
    // landmark is a cbt_metadata VDI without data.
    let host = Host::login(&sim, PASSWORD);
    let all = host.call("VDI.get_all_records", &[]);
    let landmark = all
        .as_struct()
        .unwrap()
        .values()
        .filter_map(|r| r.as_struct())
        .find(|r| r["type"].as_str() == Some("cbt_metadata"))
        .map(|r| r["uuid"].as_str().unwrap().to_string())
        .expect("a cbt_metadata landmark");
    let r = restore(&repo, &sim, &id, &url(&sim, "vdi", &landmark), &["--force"]).expect_code(1);
    r.stderr_mentions(&["VDI_INCOMPATIBLE_TYPE"]);
    let other = sim.create_vm_with_disks("other", &[4 * MIB]).unwrap();
    let r = restore(
        &repo,
        &sim,
        &id,
        &url(&sim, "vdi", &other.disks[0].vdi_uuid),
        &[],
    )
    .expect_code(1);
    r.stderr_mentions(&["bytes", "--force"]);
    assert_repo_fine(&repo, &id, &bytes);
}

#[test]
fn xen_restore_into_a_missing_sr_fails_cleanly() {
    let (sim, repo, _, _, id, bytes) = one_backup();
    let host = Host::login(&sim, PASSWORD);
    let before = host.vdi_count();
    let r = restore(
        &repo,
        &sim,
        &id,
        &url(&sim, "sr", "00000000-0000-4000-8000-00000000dead"),
        &[],
    )
    .expect_code(1);
    r.stderr_mentions(&["SR", "does not exist"]);
    assert_eq!(host.vdi_count(), before);
    assert_repo_fine(&repo, &id, &bytes);
}

#[test]
fn xen_restore_import_failing_or_dropped_midway_leaves_no_vdi() {
    type Fault = fn(&mut xapi_sim::Faults, Option<u64>);
    let faults: [(&str, Fault); 2] = [
        ("task fails", |f, v| f.import_fail_after_bytes = v),
        // The socket dies mid-body; the task's code is what is reported.
        ("connection drops", |f, v| f.import_drop_after_bytes = v),
    ];
    for (name, set) in faults {
        let (sim, repo, _, vdi, id, bytes) = one_backup();
        let host = Host::login(&sim, PASSWORD);
        let sr = url(&sim, "sr", &host.sr_of(&vdi));
        let vdi_target = url(&sim, "vdi", &vdi);
        let before = host.vdi_count();
        sim.set_faults(|f| set(f, Some(MIB)));
        for format in ["raw", "chunked"] {
            let r = restore(&repo, &sim, &id, &sr, &["--import-format", format]).expect_code(1);
            r.stderr_mentions(&["VDI_IO_ERROR", "destroyed"]);
            assert_eq!(
                host.vdi_count(),
                before,
                "{name}, {format}: a created VDI was left behind"
            );
        }
        // Into the existing VDI: fails the same way, the VDI itself stays.
        restore(&repo, &sim, &id, &vdi_target, &["--force"])
            .expect_code(1)
            .stderr_mentions(&["VDI_IO_ERROR"]);
        assert_eq!(host.vdi_count(), before, "{name}");
        sim.set_faults(|f| set(f, None));
        assert_eq!(sim.dom0_attachments(), 0, "{name}");
        assert_repo_fine(&repo, &id, &bytes);
        // Once the host is healthy: a new VDI, and the damaged original
        // whole again.
        let j = restore(&repo, &sim, &id, &sr, &[]).ok().json();
        assert!(host.disk(j["vdi_uuid"].as_str().unwrap(), 8 * MIB) == bytes);
        restore(&repo, &sim, &id, &vdi_target, &["--force"]).ok();
        assert!(host.disk(&vdi, 8 * MIB) == bytes, "{name}");
    }
}

#[test]
fn xen_restore_stops_at_a_corrupt_block_and_names_it() {
    let (sim, repo, _, vdi, id, _) = one_backup();
    let host = Host::login(&sim, PASSWORD);
    let before = host.vdi_count();
    let pack = repo.packs().into_iter().next().expect("a pack");
    let bytes = std::fs::read(&pack).unwrap();
    let entries = decode_pack_index(&bytes, BS as u32).expect("a fresh pack decodes");
    let blob = entries.last().expect("a blob");
    flip_byte(&pack, blob.offset + blob.stored_length as u64 / 2);
    let pack_name = pack.file_name().unwrap().to_string_lossy().to_string();
    let block = hex::encode(blob.block_id.0);
    let r = restore(&repo, &sim, &id, &url(&sim, "sr", &host.sr_of(&vdi)), &[]).expect_code(1);
    r.stderr_mentions(&["block", &block[..16], &pack_name[..16], &id[..8]]);
    assert_eq!(host.vdi_count(), before);
    assert_eq!(sim.dom0_attachments(), 0);
}

#[test]
fn xen_restore_new_vm_from_a_vm_backup() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let sizes = [8 * MIB, 4 * MIB];
    let vm = sim.create_vm_with_disks("vm", &sizes).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 30 + k as u64);
    }
    let repo = TestRepo::new();
    let j = backup(&repo, &sim, &url(&sim, "vm", &vm.vm_uuid));
    let group = j["vm_backup_id"].as_str().unwrap().to_string();
    let expected: Vec<Vec<u8>> = vm
        .disks
        .iter()
        .map(|d| host.disk(&d.vdi_uuid, d.size_bytes))
        .collect();
    let sr = url(&sim, "sr", &host.sr_of(&vm.disks[0].vdi_uuid));
    let r = restore(&repo, &sim, &group, &sr, &["--new-vm", "--verify"]).ok();
    let j = r.json();
    let new_vm = j["vm_uuid"].as_str().expect("vm_uuid").to_string();
    assert_ne!(new_vm, vm.vm_uuid);
    let vm_ref = host.text("VM.get_by_uuid", &[&new_vm]);
    let vbds = host.call("VM.get_VBDs", &[&vm_ref]);
    let mut seen = Vec::new();
    for vbd in vbds.as_array().unwrap() {
        let v = host.text("VBD.get_VDI", &[vbd.as_str().unwrap()]);
        seen.push(host.text("VDI.get_uuid", &[&v]));
    }
    assert_eq!(seen.len(), 2, "one VBD per original disk: {seen:?}");
    for (k, d) in vm.disks.iter().enumerate() {
        let restored = j["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["original_vdi_uuid"].as_str() == Some(d.vdi_uuid.as_str()))
            .expect("each disk restored");
        let new = restored["vdi_uuid"].as_str().unwrap();
        assert!(seen.iter().any(|s| s == new), "VM lacks VDI {new}");
        assert!(
            host.disk(new, d.size_bytes) == expected[k],
            "disk {k} differs"
        );
    }
}

#[test]
fn xen_restore_at_time_picks_the_newest_at_or_before() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let size = 4 * MIB;
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    fill(&sim, &vdi, size, 5);
    let repo = TestRepo::new();
    let src = url(&sim, "vdi", &vdi);
    let mut expected = Vec::new();
    for run in 0..3u64 {
        if run > 0 {
            guest_writes(&sim, &vdi, size, 50 + run);
        }
        let j = backup(&repo, &sim, &src);
        expected.push((disk_snapshot(&j, 0), host.disk(&vdi, size)));
        std::thread::sleep(Duration::from_millis(20));
    }
    let snaps = repo.snapshots(&[]);
    let time_of = |id: &str| {
        snaps
            .iter()
            .find(|s| s["snapshot_id"].as_str() == Some(id))
            .and_then(|s| s["time"].as_str())
            .expect("time")
            .to_string()
    };
    let t1 = time_of(&expected[1].0);
    let sr = url(&sim, "sr", &host.sr_of(&vdi));
    // Named by the newest snapshot: the one at t1 is chosen.
    let j = restore(&repo, &sim, &expected[2].0, &sr, &["--at", &t1])
        .ok()
        .json();
    assert_eq!(
        j["snapshot_id"].as_str(),
        Some(expected[1].0.as_str()),
        "{j}"
    );
    assert!(host.disk(j["vdi_uuid"].as_str().unwrap(), size) == expected[1].1);
    // Before the first snapshot: nothing.
    let r = restore(
        &repo,
        &sim,
        &expected[2].0,
        &sr,
        &["--at", "2000-01-01T00:00:00Z"],
    )
    .expect_code(1);
    r.stderr_mentions(&["at or before"]);
}

#[test]
fn xen_restore_short_last_block_raw_and_chunked() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let size = 3 * MIB + 4096;
    let vm = sim.create_vm_with_disks("vm", &[size]).unwrap();
    let vdi = vm.disks[0].vdi_uuid.clone();
    sim.guest_write(&vdi, BS, &random_bytes(9, 1, BS as usize))
        .unwrap();
    sim.guest_write(&vdi, size - 3000, &random_bytes(9, 2, 3000))
        .unwrap();
    let repo = TestRepo::new();
    let id = disk_snapshot(&backup(&repo, &sim, &url(&sim, "vdi", &vdi)), 0);
    let expected = host.disk(&vdi, size);
    let sr = url(&sim, "sr", &host.sr_of(&vdi));
    for format in ["raw", "chunked"] {
        let j = restore(
            &repo,
            &sim,
            &id,
            &sr,
            &["--import-format", format, "--verify"],
        )
        .ok()
        .json();
        assert_eq!(j["import_format"].as_str(), Some(format));
        let new = j["vdi_uuid"].as_str().unwrap();
        assert!(host.disk(new, size) == expected, "{format} differs");
    }
    // Into the original, after the guest scribbled over a zero block.
    sim.guest_write(&vdi, 2 * MIB, b"scribble").unwrap();
    restore(&repo, &sim, &id, &url(&sim, "vdi", &vdi), &["--verify"]).ok();
    assert!(host.disk(&vdi, size) == expected);
}

#[test]
fn xen_restore_new_vm_at_time_and_cleanup_on_failure() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm = sim.create_vm_with_disks("vm", &[2 * MIB, 4 * MIB]).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 60 + k as u64);
    }
    let repo = TestRepo::new();
    let src = url(&sim, "vm", &vm.vm_uuid);
    let first = backup(&repo, &sim, &src);
    let first_bytes: Vec<Vec<u8>> = vm
        .disks
        .iter()
        .map(|d| host.disk(&d.vdi_uuid, d.size_bytes))
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    guest_writes(&sim, &vm.disks[1].vdi_uuid, 4 * MIB, 61);
    let second = backup(&repo, &sim, &src);
    let meta_first = first["metadata"]["snapshot_id"].as_str().unwrap();
    let t = repo
        .snapshots(&[])
        .into_iter()
        .find(|s| s["snapshot_id"].as_str() == Some(meta_first))
        .and_then(|s| s["time"].as_str().map(str::to_string))
        .expect("time of the first VM backup");
    let sr = url(&sim, "sr", &host.sr_of(&vm.disks[0].vdi_uuid));
    let group2 = second["vm_backup_id"].as_str().unwrap();

    // The second disk's import fails (the first, 2 MiB, gets through):
    // the disk restored so far is destroyed again.
    let before = host.vdi_count();
    let received = sim.import_bytes_received();
    sim.set_faults(|f| f.import_fail_after_bytes = Some(3 * MIB));
    // (raw: every disk's body is its whole size, which the byte counts
    // below rely on)
    let r = restore(
        &repo,
        &sim,
        group2,
        &sr,
        &["--new-vm", "--import-format", "raw"],
    )
    .expect_code(1);
    assert!(
        sim.import_bytes_received() - received > 2 * MIB + 3 * MIB,
        "the first disk was not imported before the failure"
    );
    r.stderr_mentions(&["VDI_IO_ERROR", "new VDIs were destroyed"]);
    assert_eq!(host.vdi_count(), before);
    sim.set_faults(|f| f.import_fail_after_bytes = None);

    // Named by the second VM backup, --at picks the first.
    let j = restore(&repo, &sim, group2, &sr, &["--new-vm", "--at", &t])
        .ok()
        .json();
    assert_eq!(
        j["vm_backup_id"].as_str(),
        first["vm_backup_id"].as_str(),
        "{j}"
    );
    for (k, d) in vm.disks.iter().enumerate() {
        let restored = j["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["original_vdi_uuid"].as_str() == Some(d.vdi_uuid.as_str()))
            .expect("each disk restored");
        let new = restored["vdi_uuid"].as_str().unwrap();
        assert!(
            host.disk(new, d.size_bytes) == first_bytes[k],
            "disk {k} differs"
        );
    }
}

/// Sessions that idle out (xapi destroys unused sessions) while the
/// client waits on a slow import task: the client logs in again and the
/// restore completes bit-exact.
#[test]
fn xen_restore_outlives_sessions_that_idle_out() {
    let (sim, repo, _vm, vdi, id, bytes) = one_backup();
    let host = Host::login(&sim, PASSWORD);
    let sr = host.sr_of(&vdi);
    sim.set_faults(|f| {
        f.session_idle_timeout_ms = Some(300);
        f.task_delay_ms = 1500;
    });
    let j = restore(&repo, &sim, &id, &url(&sim, "sr", &sr), &[])
        .ok()
        .json();
    sim.set_faults(|f| {
        f.session_idle_timeout_ms = None;
        f.task_delay_ms = 0;
    });
    let host = Host::login(&sim, PASSWORD);
    let new = j["vdi_uuid"].as_str().unwrap();
    assert!(host.disk(new, bytes.len() as u64) == bytes);
    let expired = sim
        .calls()
        .iter()
        .filter(|c| c.ends_with("SESSION_INVALID"))
        .count();
    assert!(expired > 0, "no session idled out: {:?}", sim.calls());
}
