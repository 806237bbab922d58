//! vSphere backups against the simulator (crates/vsphere-sim): a full and
//! 20 incrementals of a VM with two disks, each restored bit for bit; every
//! cause of lost tracking a new full with its reason; failures that leave
//! no vSphere snapshot behind and commit nothing; a host that ignores
//! Range refused.

use serde_json::Value;
use vim_wire::VimFault;
use vsphere_sim::{SimOptions, SimVm, Simulator};

use crate::util::{random_bytes, Run, TestRepo, BS};

const PASSWORD: &str = "vsphere-secret";
const DISK: u64 = 4 << 20;

fn start() -> Simulator {
    Simulator::start(SimOptions {
        password: PASSWORD.into(),
        // Small pages: every backup pages QueryChangedDiskAreas.
        changed_areas_window_bytes: 1 << 20,
        changed_areas_max_extents: 4,
        ..SimOptions::default()
    })
    .expect("start the vSphere simulator")
}

fn url(sim: &Simulator, vm: &str) -> String {
    let a = sim.address();
    format!("vmware://root@{}:{}/vm/{vm}", a.ip(), a.port())
}

fn backup(t: &TestRepo, sim: &Simulator, vm: &str, extra: &[&str]) -> Run {
    let u = url(sim, vm);
    let fp = sim.fingerprint().to_string();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"--json", &"backup", &u, &"--fingerprint", &fp];
    for e in extra {
        args.push(e);
    }
    t.run_env(&args, &[("CBTVAULT_VMWARE_PASSWORD", PASSWORD)])
}

/// A SOAP session on the simulator, its certificate pinned.
fn login(sim: &Simulator) -> cbtvault::source::vmware::client::Session {
    use cbtvault::source::xenapi::tls::{parse_fingerprint, HttpsTrust};
    cbtvault::source::vmware::client::Session::login(
        &sim.address().ip().to_string(),
        sim.address().port(),
        &HttpsTrust::Fingerprint(vec![parse_fingerprint(sim.fingerprint()).unwrap()]),
        "root",
        PASSWORD,
    )
    .unwrap()
}

/// Random writes: a few whole blocks and one unaligned piece per disk.
fn writes(sim: &Simulator, vm: &SimVm, seed: u64) {
    for d in &vm.disks {
        for k in 0..1 + seed % 3 {
            let b = (seed * 7 + k * 13 + d.key as u64) % (DISK / BS);
            sim.guest_write(&vm.id, d.key, b * BS, &random_bytes(seed, k, BS as usize))
                .unwrap();
        }
        let off = (seed * 104_729 + 511) % (DISK - 3000);
        sim.guest_write(&vm.id, d.key, off, &random_bytes(seed, 99, 3000))
            .unwrap();
    }
}

/// Each disk's snapshot restores to the sim's live disk (nothing was
/// written since the backup).
fn assert_disks_restore(t: &TestRepo, sim: &Simulator, vm: &SimVm, summary: &Value) {
    for d in summary["disks"].as_array().unwrap() {
        let key = d["device_key"].as_i64().unwrap() as i32;
        let live = sim.read_disk(&vm.id, key, 0, DISK as usize).unwrap();
        t.assert_restores(
            d["snapshot_id"].as_str().unwrap(),
            blake3::hash(&live),
            DISK,
        );
    }
}

#[test]
fn a_full_and_20_incrementals_of_two_disks_restore_bit_for_bit() {
    let sim = start();
    let vm = sim.add_vm("web01", &[DISK, DISK]).unwrap();
    assert!(!vm.cbt_enabled);
    writes(&sim, &vm, 1);
    let t = TestRepo::new();
    let full = backup(&t, &sim, &vm.id, &[]).ok();
    let s = full.json();
    assert_eq!(s["disks"].as_array().unwrap().len(), 2);
    for d in s["disks"].as_array().unwrap() {
        assert_eq!(d["full"], true, "{d}");
        // CBT was enabled by this run: the snapshot is the epoch's first.
        let change_id = d["change_id"].as_str().unwrap();
        assert!(change_id.ends_with("/1"), "{change_id}");
        // The first full reads the allocated areas only.
        assert!(d["blocks_read"].as_u64().unwrap() < DISK / BS / 2, "{d}");
    }
    assert!(s["config"]["snapshot_id"].is_string());
    assert_disks_restore(&t, &sim, &vm, &s);
    // Listed as one VM backup: its two disks and its configuration.
    let listed = t.snapshots(&["--vm", &vm.instance_uuid]);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed
        .iter()
        .all(|l| l["vm_backup_id"] == s["vm_backup_id"]));
    assert_eq!(listed.iter().filter(|l| l["kind"] == "disk").count(), 2);
    assert_eq!(t.snapshots(&["--vm", "web01"]).len(), 3);
    // The landmark keys are those format-spec/03-snapshot.md lists
    // (test-vectors/landmark-vmware.json).
    for l in &listed {
        let keys: std::collections::BTreeSet<String> =
            l["landmark"].as_object().unwrap().keys().cloned().collect();
        let which = if l["kind"] == "disk" {
            "disk"
        } else {
            "vm_config"
        };
        assert_eq!(keys, crate::vectors::vmware_landmark_keys(which), "{l}");
    }
    let table = t.run(&[&"snapshots"]).ok().out();
    assert!(table.contains("VM 'web01'"), "{table}");
    assert!(
        sim.snapshots(&vm.id).unwrap().is_empty(),
        "the backup's snapshot stays"
    );
    assert!(sim.vm(&vm.id).unwrap().cbt_enabled, "CBT was enabled");
    for round in 2..=21u64 {
        writes(&sim, &vm, round);
        let s = backup(&t, &sim, &vm.id, &[]).ok().json();
        for d in s["disks"].as_array().unwrap() {
            assert_eq!(d["full"], false, "round {round}: {d}");
            assert_eq!(d["full_reason"], Value::Null);
            // Only what changed: at most 4 blocks and the unaligned piece's.
            assert!(
                d["blocks_read"].as_u64().unwrap() <= 6,
                "round {round}: {d}"
            );
        }
        if round % 5 == 1 || round == 21 {
            assert_disks_restore(&t, &sim, &vm, &s);
        }
        assert!(sim.snapshots(&vm.id).unwrap().is_empty());
    }
    // The VM by its instance uuid and by its inventory path: the same disks.
    let by_uuid = backup(&t, &sim, &vm.instance_uuid, &[]).ok().json();
    assert_eq!(by_uuid["disks"][0]["full"], false);
    let path = format!("ha-datacenter/vm/{}", vm.name);
    let by_path = backup(&t, &sim, &path, &[]).ok().json();
    assert_eq!(by_path["disks"][1]["full"], false);
}

#[test]
fn lost_tracking_starts_a_new_full_and_says_why() {
    let sim = start();
    let vm = sim.add_vm("db01", &[DISK]).unwrap();
    writes(&sim, &vm, 1);
    let t = TestRepo::new();
    backup(&t, &sim, &vm.id, &[]).ok();
    let full_reason = |r: &Run| {
        r.json()["disks"][0]["full_reason"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    // A reset epoch.
    sim.reset_cbt(&vm.id).unwrap();
    writes(&sim, &vm, 2);
    let r = backup(&t, &sim, &vm.id, &[]).ok();
    assert!(
        full_reason(&r).contains("change tracking was reset"),
        "{}",
        r.out()
    );
    assert!(r.stderr.contains("a new full backup"), "{}", r.stderr);
    assert_eq!(r.json()["disks"][0]["full"], true);
    assert_disks_restore(&t, &sim, &vm, &r.json());

    // CBT disabled: enabled again (a new epoch), a new full.
    sim.disable_cbt(&vm.id).unwrap();
    writes(&sim, &vm, 3);
    let r = backup(&t, &sim, &vm.id, &[]).ok();
    assert!(full_reason(&r).contains("reset"), "{}", r.out());
    assert_disks_restore(&t, &sim, &vm, &r.json());
    // ... unless told not to enable it.
    sim.disable_cbt(&vm.id).unwrap();
    let r = backup(&t, &sim, &vm.id, &["--no-enable-cbt"]).expect_code(1);
    assert!(r.stderr.contains("--no-enable-cbt"), "{}", r.stderr);
    assert!(sim.snapshots(&vm.id).unwrap().is_empty());

    // QueryChangedDiskAreas refusing the changeId (FileFault).
    backup(&t, &sim, &vm.id, &[]).ok();
    writes(&sim, &vm, 4);
    sim.fail_calls(
        "QueryChangedDiskAreas",
        1,
        VimFault::FileFault {
            file: "[datastore1] db01/db01.vmdk".into(),
        },
    );
    let r = backup(&t, &sim, &vm.id, &[]).ok();
    assert!(
        full_reason(&r).contains("refused the last changeId"),
        "{}",
        r.out()
    );
    assert_disks_restore(&t, &sim, &vm, &r.json());

    // A replaced disk: a new key and file, a first backup of it.
    let new_key = sim.replace_disk(&vm.id, 2000).unwrap();
    let vm = sim.vm(&vm.id).unwrap();
    sim.guest_write(&vm.id, new_key, 0, &random_bytes(5, 0, BS as usize))
        .unwrap();
    let r = backup(&t, &sim, &vm.id, &[]).ok();
    let d = &r.json()["disks"][0];
    assert_eq!(d["device_key"], new_key);
    assert_eq!(d["full"], true);
    assert_eq!(d["full_reason"], Value::Null);
    assert_eq!(d["new_set_reason"], "first backup of this source");
    // The replaced disk's own chain has no newer snapshot: it ended.
    assert_disks_restore(&t, &sim, &vm, &r.json());
}

#[test]
fn a_failure_at_any_step_leaves_no_vsphere_snapshot_and_commits_nothing() {
    let sim = start();
    let vm = sim.add_vm("app01", &[DISK, DISK]).unwrap();
    writes(&sim, &vm, 1);
    let t = TestRepo::new();
    backup(&t, &sim, &vm.id, &[]).ok();
    let committed = t.snapshot_ids().len();
    type Inject<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Inject)> = vec![
        (
            "CreateSnapshot_Task",
            Box::new(|| sim.fail_next_task("CreateSnapshot_Task", VimFault::InvalidState)),
        ),
        (
            "QueryChangedDiskAreas",
            Box::new(|| sim.fail_calls("QueryChangedDiskAreas", 1, VimFault::InvalidState)),
        ),
        (
            "RetrievePropertiesEx",
            Box::new(|| {
                sim.fail_calls(
                    "RetrievePropertiesEx",
                    1,
                    VimFault::Other {
                        type_name: "SystemError".into(),
                    },
                )
            }),
        ),
        ("folder", Box::new(|| sim.drop_responses("folder", 1))),
    ];
    for (step, inject) in cases {
        writes(&sim, &vm, 7);
        inject();
        let r = backup(&t, &sim, &vm.id, &[]).expect_code(1);
        assert!(!r.stderr.is_empty(), "{step}");
        sim.clear_faults();
        assert!(
            sim.snapshots(&vm.id).unwrap().is_empty(),
            "{step}: a vSphere snapshot was left behind"
        );
        assert_eq!(
            t.snapshot_ids().len(),
            committed,
            "{step}: something was committed"
        );
    }
    // And the next run is an incremental as if nothing had happened.
    let s = backup(&t, &sim, &vm.id, &[]).ok().json();
    assert_eq!(s["disks"][0]["full"], false);
    assert_disks_restore(&t, &sim, &vm, &s);
}

#[test]
fn a_host_that_ignores_range_is_refused() {
    let sim = start();
    let vm = sim.add_vm("ignored", &[DISK]).unwrap();
    writes(&sim, &vm, 1);
    let t = TestRepo::new();
    sim.set_ignore_range(true);
    let r = backup(&t, &sim, &vm.id, &[]).expect_code(1);
    assert!(
        r.stderr.contains("ignored the Range request"),
        "{}",
        r.stderr
    );
    assert!(t.snapshot_ids().is_empty());
    assert!(sim.snapshots(&vm.id).unwrap().is_empty());
}

#[test]
fn the_password_never_comes_from_the_command_line_and_tls_is_verified() {
    let sim = start();
    let vm = sim.add_vm("tls", &[DISK]).unwrap();
    let t = TestRepo::new();
    let u = url(&sim, &vm.id);
    // No fingerprint: the self-signed certificate is refused.
    let r = t
        .run_env(&[&"backup", &u], &[("CBTVAULT_VMWARE_PASSWORD", PASSWORD)])
        .expect_code(1);
    assert!(
        r.stderr.to_lowercase().contains("certificate"),
        "{}",
        r.stderr
    );
    // A password in the URL is refused outright.
    let a = sim.address();
    let with_pw = format!(
        "vmware://root:{PASSWORD}@{}:{}/vm/{}",
        a.ip(),
        a.port(),
        vm.id
    );
    let r = t.run(&[&"backup", &with_pw]).expect_code(1);
    assert!(
        r.stderr.contains("a password in the URL is refused"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains(PASSWORD), "{}", r.stderr);
    // A wrong password: InvalidLogin, named.
    let fp = sim.fingerprint().to_string();
    let r = t
        .run_env(
            &[&"backup", &u, &"--fingerprint", &fp],
            &[("CBTVAULT_VMWARE_PASSWORD", "wrong")],
        )
        .expect_code(1);
    assert!(
        r.stderr.contains("InvalidLogin") || r.stderr.contains("login"),
        "{}",
        r.stderr
    );
}

fn datastore_file(sim: &Simulator, path: &str) -> std::path::PathBuf {
    sim.dir().join("datastore1").join(path)
}

/// The names of the files in datastore folder `dir`, sorted.
fn datastore_files(sim: &Simulator, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(datastore_file(sim, dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn target(sim: &Simulator, path: &str) -> String {
    let a = sim.address();
    format!(
        "vmware://root@{}:{}/datastore/datastore1/{path}",
        a.ip(),
        a.port()
    )
}

fn restore_to(t: &TestRepo, sim: &Simulator, id: &str, path: &str, extra: &[&str]) -> Run {
    // A temporary directory of the test's own (where a descriptor that
    // could not be put back is saved).
    let tmp = t.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    restore_to_in(t, sim, id, path, extra, &tmp)
}

/// [`restore_to`] with `tmp` as the command's temporary directory.
fn restore_to_in(
    t: &TestRepo,
    sim: &Simulator,
    id: &str,
    path: &str,
    extra: &[&str],
    tmp: &std::path::Path,
) -> Run {
    let to = target(sim, path);
    let fp = sim.fingerprint().to_string();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"--json",
        &"restore",
        &id,
        &"--target",
        &to,
        &"--fingerprint",
        &fp,
    ];
    for e in extra {
        args.push(e);
    }
    t.run_env(
        &args,
        &[
            ("CBTVAULT_VMWARE_PASSWORD", PASSWORD),
            ("TMPDIR", tmp.to_str().unwrap()),
        ],
    )
}

/// The message of a `--json` run's `error` line on stderr.
fn error_message(r: &Run) -> String {
    r.stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|m| m["message_type"] == "error")
        .and_then(|m| m["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no error message: {}", r.stderr))
}

/// The disk a descriptor describes, as qemu-img (a real VMDK reader)
/// converts it to raw: its hash and size.
fn qemu_img_raw(descriptor: &std::path::Path, out: &std::path::Path) -> (blake3::Hash, u64) {
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "vmdk", "-O", "raw"])
        .arg(descriptor)
        .arg(out)
        .status()
        .expect("run qemu-img (qemu-utils)");
    assert!(st.success(), "qemu-img could not read {descriptor:?}");
    let bytes = std::fs::read(out).unwrap();
    (blake3::hash(&bytes), bytes.len() as u64)
}

#[test]
fn restore_into_vsphere_uploads_a_flat_vmdk_that_qemu_img_reads_bit_for_bit() {
    let sim = start();
    let vm = sim.add_vm("db01", &[DISK, DISK]).unwrap();
    writes(&sim, &vm, 3);
    let t = TestRepo::new();
    let s = backup(&t, &sim, &vm.id, &[]).ok().json();
    writes(&sim, &vm, 4);
    let s = {
        let _ = s;
        backup(&t, &sim, &vm.id, &[]).ok().json()
    };
    let disk = &s["disks"][1];
    let id = disk["snapshot_id"].as_str().unwrap();
    let live = sim
        .read_disk(
            &vm.id,
            disk["device_key"].as_i64().unwrap() as i32,
            0,
            DISK as usize,
        )
        .unwrap();
    let r = restore_to(&t, &sim, id, "restored/db01 disk1.vmdk", &["--verify"]).ok();
    let j = r.json();
    assert_eq!(j["complete"], true, "{j}");
    assert_eq!(j["verified"], true, "{j}");
    assert_eq!(j["replaced"], false, "{j}");
    assert_eq!(
        j["descriptor_path"],
        "[datastore1] restored/db01 disk1.vmdk"
    );
    assert_eq!(j["flat_path"], "[datastore1] restored/db01 disk1-flat.vmdk");
    assert_eq!(j["flat_bytes"], DISK);
    let flat = datastore_file(&sim, "restored/db01 disk1-flat.vmdk");
    assert_eq!(crate::util::hash_file(&flat), blake3::hash(&live));
    let descriptor = datastore_file(&sim, "restored/db01 disk1.vmdk");
    let text = std::fs::read_to_string(&descriptor).unwrap();
    assert!(
        text.contains("RW 8192 VMFS \"db01 disk1-flat.vmdk\""),
        "{text}"
    );
    assert_eq!(
        qemu_img_raw(&descriptor, &t.path("via-qemu.raw")),
        (blake3::hash(&live), DISK)
    );
    assert!(sim.calls().iter().any(|c| c == "SOAP MakeDirectory ok"));
    // The calls: the flat file first, the descriptor last.
    let puts: Vec<String> = sim
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("HTTP PUT"))
        .collect();
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert!(
        puts[0].contains("-flat.vmdk") && !puts[1].contains("-flat.vmdk"),
        "{puts:?}"
    );

    // Never over existing files unless --force.
    let before = crate::util::hash_file(&flat);
    let other = s["disks"][0]["snapshot_id"].as_str().unwrap();
    let r = restore_to(&t, &sim, other, "restored/db01 disk1.vmdk", &[]).expect_code(1);
    assert!(r.stderr.contains("already exist"), "{}", r.stderr);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(crate::util::hash_file(&flat), before);
    let live0 = sim.read_disk(&vm.id, 2000, 0, DISK as usize).unwrap();

    // --force whose upload fails halfway: the old disk stays as it was,
    // descriptor and flat file byte for byte, and the partial new flat
    // file is deleted.
    let old_text = std::fs::read(&descriptor).unwrap();
    let files_before = datastore_files(&sim, "restored");
    sim.drop_responses("folder_put", 1);
    let r = restore_to(&t, &sim, other, "restored/db01 disk1.vmdk", &["--force"]).expect_code(1);
    assert!(
        r.stderr.contains("the old disk was left as it was"),
        "{}",
        r.stderr
    );
    assert!(
        sim.calls().iter().any(|c| c.contains("-flat.vmdk cut")),
        "the fault did not fire: {:?}",
        sim.calls()
    );
    assert_eq!(crate::util::hash_file(&flat), before);
    assert_eq!(std::fs::read(&descriptor).unwrap(), old_text);
    assert_eq!(datastore_files(&sim, "restored"), files_before);
    assert_eq!(
        qemu_img_raw(&descriptor, &t.path("old-via-qemu.raw")),
        (blake3::hash(&live), DISK)
    );

    // A --force --verify restore of the other snapshot over the same disk.
    let replace_verified = || {
        restore_to(
            &t,
            &sim,
            other,
            "restored/db01 disk1.vmdk",
            &["--force", "--verify"],
        )
    };

    // --force whose read-back fails (the host damages the new flat file
    // after the descriptor was replaced): the old descriptor is put back,
    // the new flat file deleted, the old disk reads as before.
    let calls_before = sim.calls().len();
    sim.corrupt_next_put(4096);
    let r = replace_verified().expect_code(1);
    assert!(
        r.stderr.contains("the old disk was left as it was"),
        "{}",
        r.stderr
    );
    let calls: Vec<String> = sim.calls().into_iter().skip(calls_before).collect();
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("HTTP PUT") && !c.contains("corrupted"))
            .count(),
        3,
        "new flat file, new descriptor, old descriptor put back: {calls:?}"
    );
    assert_eq!(crate::util::hash_file(&flat), before);
    assert_eq!(std::fs::read(&descriptor).unwrap(), old_text);
    assert_eq!(datastore_files(&sim, "restored"), files_before);

    // The same, and the host then refuses the old descriptor's put-back
    // too: the new flat file is still deleted, the old data file is
    // untouched, and the error says what to write back where; the old
    // descriptor's exact bytes (the only copy left) are in a local file
    // only the user can read, which the error names.
    sim.corrupt_next_put(4096);
    sim.refuse_put_after(2);
    let r = replace_verified().expect_code(1);
    assert!(
        sim.calls().iter().any(|c| c.ends_with("503 refused")),
        "the fault did not fire: {:?}",
        sim.calls()
    );
    let message = &error_message(&r);
    assert!(
        message.contains("the old descriptor could not be put back")
            && message.contains("(the new data file, deleted)")
            && message.contains(
                "write the old descriptor (442 bytes) back to [datastore1] restored/db01 disk1.vmdk: its exact bytes are saved in \""
            ),
        "{message}"
    );
    assert_eq!(old_text.len(), 442);
    // The one file in the run's temporary directory, named by the error.
    let kept: Vec<std::path::PathBuf> = std::fs::read_dir(t.path("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?} {message}");
    let saved = kept[0].clone();
    assert!(
        message.contains(&format!("saved in {saved:?}")),
        "{message}"
    );
    assert_eq!(std::fs::read(&saved).unwrap(), old_text);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(crate::util::hash_file(&flat), before);
    assert_ne!(std::fs::read(&descriptor).unwrap(), old_text);
    assert_eq!(datastore_files(&sim, "restored"), files_before);
    // The administrator writes the saved file back, and the old disk
    // reads as before.
    std::fs::copy(&saved, &descriptor).unwrap();
    std::fs::remove_file(&saved).unwrap();
    assert_eq!(std::fs::read(&descriptor).unwrap(), old_text);
    assert_eq!(
        qemu_img_raw(&descriptor, &t.path("old-again-via-qemu.raw")),
        (blake3::hash(&live), DISK)
    );

    // The same with no temporary directory to save the copy in: the error
    // then carries the old descriptor's bytes, escaped, and unescaping
    // them gives the exact bytes back.
    sim.corrupt_next_put(4096);
    sim.refuse_put_after(2);
    let r = restore_to_in(
        &t,
        &sim,
        other,
        "restored/db01 disk1.vmdk",
        &["--force", "--verify"],
        &t.path("no-such-dir"),
    )
    .expect_code(1);
    let message = &error_message(&r);
    let marker = "\\\": ";
    let text = message
        .split_once("it could not be saved locally either (")
        .and_then(|(_, rest)| rest.split_once(marker))
        .map(|(_, text)| text)
        .unwrap_or_else(|| panic!("{message}"));
    let mut unescaped = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            unescaped.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'x') => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                unescaped.push(u8::from_str_radix(&hex, 16).unwrap());
            }
            Some(b'n') => unescaped.push(b'\n'),
            Some(b't') => unescaped.push(b'\t'),
            Some(b'r') => unescaped.push(b'\r'),
            Some(c) => unescaped.push(c),
            None => panic!("a lone backslash at the end: {message}"),
        }
    }
    assert!(
        unescaped.starts_with(&old_text),
        "{}",
        String::from_utf8_lossy(&unescaped)
    );
    // What follows the text is the error's cause (the failed read-back).
    assert!(
        String::from_utf8_lossy(&unescaped[old_text.len()..]).starts_with(": verify: "),
        "{message}"
    );
    assert!(!t.path("no-such-dir").exists());
    assert_eq!(crate::util::hash_file(&flat), before);
    assert_eq!(datastore_files(&sim, "restored"), files_before);
    std::fs::write(&descriptor, &old_text).unwrap();

    // --force that succeeds: the new disk under a flat file of its own
    // name, the descriptor naming it, the old flat file deleted last.
    let j = replace_verified().ok().json();
    assert_eq!(j["replaced"], true);
    let new_flat = j["flat_path"]
        .as_str()
        .unwrap()
        .strip_prefix("[datastore1] ")
        .unwrap()
        .to_string();
    assert!(
        new_flat.starts_with("restored/db01 disk1-") && new_flat.ends_with("-flat.vmdk"),
        "{new_flat}"
    );
    assert!(!flat.exists(), "the old flat file is deleted");
    assert_eq!(
        crate::util::hash_file(&datastore_file(&sim, &new_flat)),
        blake3::hash(&live0)
    );
    assert_eq!(
        qemu_img_raw(&descriptor, &t.path("new-via-qemu.raw")),
        (blake3::hash(&live0), DISK)
    );
    assert_eq!(datastore_files(&sim, "restored").len(), 2);
    // Replaced again: the flat file the descriptor named is the one
    // deleted, whatever its name.
    let j = restore_to(&t, &sim, id, "restored/db01 disk1.vmdk", &["--force"])
        .ok()
        .json();
    assert_eq!(j["replaced"], true);
    assert!(!datastore_file(&sim, &new_flat).exists());
    assert_eq!(datastore_files(&sim, "restored").len(), 2);
    assert_eq!(
        qemu_img_raw(&descriptor, &t.path("again-via-qemu.raw")),
        (blake3::hash(&live), DISK)
    );

    // A VM's own disk is never replaced, even with --force and the VM
    // powered off (so that the host does not lock it): refused before
    // anything is written or deleted.
    sim.set_powered_on(&vm.id, false).unwrap();
    let writes = |sim: &Simulator| {
        sim.calls()
            .into_iter()
            .filter(|c| c.contains("HTTP PUT") || c.contains("DeleteDatastoreFile"))
            .count()
    };
    let written = writes(&sim);
    let own = format!("{0}/{0}.vmdk", vm.name);
    let r = restore_to(&t, &sim, id, &own, &["--force"]).expect_code(1);
    assert!(r.stderr.contains("is a disk of VM 'db01'"), "{}", r.stderr);
    assert_eq!(writes(&sim), written, "{:?}", sim.calls());
    assert_eq!(
        blake3::hash(&sim.read_disk(&vm.id, 2000, 0, DISK as usize).unwrap()),
        blake3::hash(&live0)
    );

    // Nor the base disk under a snapshot (the VM's backing then names the
    // delta NAME-000001.vmdk). (Other letter cases: inventory's unit test;
    // this simulator's datastore tells case apart.)
    let session = login(&sim);
    session
        .run_task(
            vim_wire::Request::CreateSnapshotTask {
                this: vim_wire::Moref::new("VirtualMachine", &vm.id),
                name: "admin".into(),
                description: None,
                memory: false,
                quiesce: false,
            },
            std::time::Duration::from_secs(30),
        )
        .unwrap();
    for own in [
        format!("{0}/{0}.vmdk", vm.name),
        format!("{0}/{0}-ctk.vmdk", vm.name),
    ] {
        std::fs::write(
            datastore_file(&sim, &format!("{0}/{0}-ctk.vmdk", vm.name)),
            b"ctk",
        )
        .unwrap();
        let r = restore_to(&t, &sim, id, &own, &["--force"]).expect_code(1);
        assert!(
            r.stderr.contains("is a disk of VM 'db01'"),
            "{own}: {}",
            r.stderr
        );
    }
    assert_eq!(writes(&sim), written, "{:?}", sim.calls());
    for snap in sim.snapshots(&vm.id).unwrap() {
        session
            .run_task(
                vim_wire::Request::RemoveSnapshotTask {
                    this: vim_wire::Moref::new("VirtualMachineSnapshot", &snap.id),
                    remove_children: false,
                    consolidate: Some(true),
                },
                std::time::Duration::from_secs(30),
            )
            .unwrap();
    }

    // An old descriptor naming a file a restore does not write: replaced,
    // that file left in place, and said so.
    let text = std::fs::read_to_string(&descriptor).unwrap();
    let named = text.split('"').nth(1).unwrap().to_string();
    std::fs::write(
        datastore_file(&sim, "restored/hand.vmdk"),
        text.replace(&named, "kept.vmdk"),
    )
    .unwrap();
    std::fs::write(datastore_file(&sim, "restored/kept.vmdk"), b"keep me").unwrap();
    let r = restore_to(&t, &sim, id, "restored/hand.vmdk", &["--force"]).ok();
    assert!(r.stderr.contains("left in place"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(datastore_file(&sim, "restored/kept.vmdk")).unwrap(),
        b"keep me"
    );
    // An old file too large to be a descriptor kept in memory: refused
    // before anything is written, the file untouched.
    let big = vec![7u8; 100 << 10];
    std::fs::write(datastore_file(&sim, "restored/big.vmdk"), &big).unwrap();
    let files = datastore_files(&sim, "restored");
    let r = restore_to(&t, &sim, id, "restored/big.vmdk", &["--force"]).expect_code(1);
    assert!(
        r.stderr.contains("not a descriptor a restore can keep"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read(datastore_file(&sim, "restored/big.vmdk")).unwrap(),
        big
    );
    assert_eq!(datastore_files(&sim, "restored"), files);

    // An unknown datacenter is named before anything is written.
    let r = restore_to(&t, &sim, id, "x/y.vmdk", &["--datacenter", "dc-nowhere"]).expect_code(1);
    assert!(r.stderr.contains("dc-nowhere"), "{}", r.stderr);
    assert!(!datastore_file(&sim, "x").exists());
}

#[test]
fn a_restore_into_vsphere_that_fails_halfway_leaves_no_file() {
    let sim = start();
    let vm = sim.add_vm("cut", &[DISK]).unwrap();
    writes(&sim, &vm, 5);
    for b in 0..DISK / BS {
        sim.guest_write(&vm.id, 2000, b * BS, &random_bytes(b, 1, BS as usize))
            .unwrap();
    }
    let t = TestRepo::new();
    let s = backup(&t, &sim, &vm.id, &[]).ok().json();
    let id = s["disks"][0]["snapshot_id"].as_str().unwrap().to_string();

    // The host closes the upload halfway and keeps the partial file: it
    // is deleted, and no descriptor is written.
    sim.drop_responses("folder_put", 1);
    let r = restore_to(&t, &sim, &id, "r/cut.vmdk", &[]).expect_code(1);
    assert!(
        r.stderr.contains("no descriptor was written"),
        "{}",
        r.stderr
    );
    assert!(
        sim.calls()
            .iter()
            .any(|c| c.contains("PUT /folder/r/cut-flat.vmdk cut")),
        "the fault did not fire"
    );
    assert!(
        sim.calls()
            .iter()
            .any(|c| c == "SOAP DeleteDatastoreFile_Task ok"),
        "{:?}",
        sim.calls()
    );
    assert!(!datastore_file(&sim, "r/cut-flat.vmdk").exists());
    assert!(!datastore_file(&sim, "r/cut.vmdk").exists());

    // A damaged block in the repository: the restore stops there, the
    // upload is cut (never a short body taken as whole), nothing is left.
    for p in t.packs() {
        let len = std::fs::metadata(&p).unwrap().len();
        crate::util::flip_byte(&p, len / 2);
    }
    let r = restore_to(&t, &sim, &id, "r/cut.vmdk", &[]).expect_code(1);
    assert!(r.stderr.contains("upload was cut"), "{}", r.stderr);
    assert!(!datastore_file(&sim, "r/cut-flat.vmdk").exists());
    assert!(!datastore_file(&sim, "r/cut.vmdk").exists());
}

#[test]
fn a_disk_of_partial_sectors_is_padded_and_verified() {
    let sim = start();
    let t = TestRepo::new();
    let size = 3 * BS + 700;
    let bytes = random_bytes(9, 9, size as usize);
    let img = crate::util::Image::from_bytes(&t.path("odd.img"), &bytes);
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let r = restore_to(&t, &sim, &id, "odd/odd.vmdk", &["--verify"]).ok();
    assert!(
        r.stderr.contains("not whole 512-byte sectors"),
        "{}",
        r.stderr
    );
    let j = r.json();
    assert_eq!(j["flat_bytes"], 3 * BS + 1024);
    let (_, len) = qemu_img_raw(&datastore_file(&sim, "odd/odd.vmdk"), &t.path("odd.raw"));
    assert_eq!(len, 3 * BS + 1024);
    let raw = std::fs::read(t.path("odd.raw")).unwrap();
    assert_eq!(&raw[..size as usize], &bytes[..]);
    assert!(raw[size as usize..].iter().all(|b| *b == 0));
}

/// A new folder of `t` for a data command's records.
fn data_command_dir(t: &TestRepo) -> std::path::PathBuf {
    let dir = t.path("data-command");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `--data-command` that records its environment and pid, then serves
/// the disk's frozen base flat file over NBD with nbdkit's curl plugin
/// (Range reads of the simulator's `/folder`, Basic credentials): the
/// stand-in for nbdkit's VDDK plugin, which needs VMware's library.
fn curl_data_command(sim: &Simulator, dir: &std::path::Path) -> String {
    let pw = dir.join("vsphere-password");
    std::fs::write(&pw, PASSWORD).unwrap();
    let a = sim.address();
    format!(
        "env | grep -e ^CBTVAULT_ -e {PASSWORD} | grep -v SOCKET > {d}/env-$CBTVAULT_DISK_KEY; echo $$ > {d}/pid-$CBTVAULT_DISK_KEY; \
         exec nbdkit -f -U \"$CBTVAULT_NBD_SOCKET\" curl \
         url=\"https://{ip}:{port}/folder/$CBTVAULT_DISK_FLAT_PATH?dcPath=$CBTVAULT_DATACENTER&dsName=$CBTVAULT_DATASTORE\" \
         user=root password=+{pw} sslverify=false",
        d = dir.display(),
        ip = a.ip(),
        port = a.port(),
        pw = pw.display()
    )
}

#[test]
fn the_nbd_data_path_reads_the_frozen_disks_from_a_server_started_per_disk() {
    let sim = start();
    let vm = sim.add_vm("nbd01", &[DISK, DISK]).unwrap();
    writes(&sim, &vm, 11);
    let t = TestRepo::new();
    let dir = data_command_dir(&t);
    let command = curl_data_command(&sim, &dir);
    let s = backup(&t, &sim, &vm.id, &["--data-command", &command])
        .ok()
        .json();
    assert_disks_restore(&t, &sim, &vm, &s);
    let env = std::fs::read_to_string(dir.join("env-2001")).unwrap();
    assert!(
        env.contains("CBTVAULT_DISK_FILE=[datastore1] nbd01/nbd01_1.vmdk"),
        "{env}"
    );
    assert!(env.contains("CBTVAULT_SNAPSHOT_MOREF=snapshot-"), "{env}");
    assert!(
        env.contains(&format!("CBTVAULT_VM_MOREF={}", vm.id)),
        "{env}"
    );
    assert!(
        env.contains(&format!("CBTVAULT_DISK_CAPACITY={DISK}")),
        "{env}"
    );
    // The data came through nbdkit (curl's Range requests, Basic
    // credentials), none through cbtvault's own reads (its SOAP session's
    // cookie); the changed areas from QueryChangedDiskAreas.
    let reads: Vec<String> = sim
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("HTTP GET /folder/"))
        .collect();
    assert!(!reads.is_empty(), "no /folder reads at all");
    assert!(
        reads.iter().all(|c| c.ends_with(" basic")),
        "cbtvault read the datastore itself: {reads:?}"
    );
    // The servers are gone.
    for key in [2000, 2001] {
        let pid = std::fs::read_to_string(dir.join(format!("pid-{key}"))).unwrap();
        assert!(
            !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "the data server of disk {key} outlived the backup"
        );
    }
    // An incremental over the same path: only the changes, bit for bit.
    writes(&sim, &vm, 12);
    let s = backup(&t, &sim, &vm.id, &["--data-command", &command])
        .ok()
        .json();
    for d in s["disks"].as_array().unwrap() {
        assert_eq!(d["full"], false, "{d}");
        assert!(d["blocks_read"].as_u64().unwrap() <= 6, "{d}");
    }
    assert_disks_restore(&t, &sim, &vm, &s);
    let committed = t.snapshot_ids().len();

    // The second disk's server fails after the first disk was read: the
    // VM backup is committed whole or not at all, so nothing is.
    writes(&sim, &vm, 14);
    let second_fails = format!("[ \"$CBTVAULT_DISK_KEY\" = 2001 ] && exit 3; {command}");
    std::fs::remove_file(dir.join("env-2000")).unwrap();
    let r = backup(&t, &sim, &vm.id, &["--data-command", &second_fails]).expect_code(1);
    assert!(r.stderr.contains("nothing was committed"), "{}", r.stderr);
    assert!(r.stderr.contains("serve disk 2001"), "{}", r.stderr);
    assert!(dir.join("env-2000").exists(), "the first disk was not read");
    assert_eq!(t.snapshot_ids().len(), committed);
    assert!(sim.snapshots(&vm.id).unwrap().is_empty());
    // A command that fails, or serves another disk: a clear error, nothing
    // committed, no vSphere snapshot left.
    for (bad, says) in [
        ("echo vddk: no such library >&2; exit 3", "exited"),
        (
            "exec nbdkit -f -U \"$CBTVAULT_NBD_SOCKET\" memory size=1M",
            "not this disk",
        ),
    ] {
        writes(&sim, &vm, 13);
        let r = backup(&t, &sim, &vm.id, &["--data-command", bad]).expect_code(1);
        assert!(r.stderr.contains(says), "{bad}: {}", r.stderr);
        if says == "exited" {
            assert!(r.stderr.contains("no such library"), "{}", r.stderr);
        }
        assert_eq!(t.snapshot_ids().len(), committed, "{bad}");
        assert!(sim.snapshots(&vm.id).unwrap().is_empty(), "{bad}");
    }
}

/// Two backups of one VM at once (into two repositories): the second
/// removes the first's snapshot as a leftover of an earlier run, so the
/// first read base files that took the VM's writes. The first finds its
/// snapshot gone once its disks are read and commits nothing, loudly; no
/// snapshot is left on the VM.
#[test]
fn a_snapshot_removed_while_its_disks_are_read_commits_nothing() {
    let sim = start();
    let vm = sim.add_vm("torn01", &[DISK]).unwrap();
    writes(&sim, &vm, 21);
    let (a, b) = (TestRepo::new(), TestRepo::new());
    let dir = data_command_dir(&a);
    let go = dir.join("go");
    // A's data server starts only once the test says so.
    let command = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; {}",
        go.display(),
        curl_data_command(&sim, &dir)
    );
    let (u, fp) = (url(&sim, &vm.id), sim.fingerprint().to_string());
    let child = crate::util::spawn(
        &a,
        &[
            &"--json",
            &"backup",
            &u,
            &"--fingerprint",
            &fp,
            &"--data-command",
            &command,
        ],
        &[("CBTVAULT_VMWARE_PASSWORD", PASSWORD)],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sim.snapshots(&vm.id).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "A made no snapshot");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = backup(&b, &sim, &vm.id, &[]).ok();
    assert!(r.stderr.contains("removed snapshot"), "{}", r.stderr);
    writes(&sim, &vm, 22);
    std::fs::write(&go, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("was removed while its disks were read") && stderr.contains("nothing"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("could not remove snapshot"),
        "a snapshot already gone is not reported as left behind: {stderr}"
    );
    assert!(a.snapshot_ids().is_empty(), "A committed a torn backup");
    assert!(sim.snapshots(&vm.id).unwrap().is_empty());
    assert_eq!(
        b.snapshot_ids().len(),
        2,
        "B: the disk and the configuration"
    );
}

/// An otherwise idle session is used every so often (hosts end sessions
/// idle for ~30 minutes), and no more once the guard is dropped.
#[test]
fn keep_alive_uses_the_session_until_dropped() {
    let sim = start();
    let vm = sim.add_vm("idle01", &[DISK]).unwrap();
    let session = std::sync::Arc::new(login(&sim));
    let reads = || {
        sim.calls()
            .iter()
            .filter(|c| c.as_str() == "SOAP RetrievePropertiesEx ok")
            .count()
    };
    let before = reads();
    let alive = session.keep_alive(
        vim_wire::Moref::new("VirtualMachine", &vm.id),
        std::time::Duration::from_millis(50),
    );
    std::thread::sleep(std::time::Duration::from_millis(600));
    drop(alive);
    let during = reads() - before;
    assert!(during >= 3, "{during} calls in 600 ms at one per 50 ms");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        reads() - before,
        during,
        "calls after the guard was dropped"
    );
}

/// A disk grown since the last backup is read in full (changed areas
/// across a resize are not trusted), and restores at its new size.
#[test]
fn a_grown_disk_is_read_in_full() {
    let sim = start();
    let vm = sim.add_vm("grow01", &[DISK]).unwrap();
    writes(&sim, &vm, 41);
    let t = TestRepo::new();
    backup(&t, &sim, &vm.id, &[]).ok();
    sim.extend_disk(&vm.id, 2000, 2 * DISK).unwrap();
    sim.guest_write(
        &vm.id,
        2000,
        DISK + 3 * BS,
        &random_bytes(42, 0, BS as usize),
    )
    .unwrap();
    let r = backup(&t, &sim, &vm.id, &[]).ok();
    let d = &r.json()["disks"][0];
    assert_eq!(d["full"], true, "{d}");
    assert!(
        d["full_reason"]
            .as_str()
            .unwrap()
            .contains(&format!("size changed ({DISK} -> {} bytes)", 2 * DISK)),
        "{d}"
    );
    assert!(r.stderr.contains("a new full backup"), "{}", r.stderr);
    let live = sim.read_disk(&vm.id, 2000, 0, 2 * DISK as usize).unwrap();
    t.assert_restores(
        d["snapshot_id"].as_str().unwrap(),
        blake3::hash(&live),
        2 * DISK,
    );
}

/// A --data-command that leaves a process behind which ignores SIGTERM:
/// the whole process group is gone when the backup ends (KILL after the
/// grace period), not only the command's shell.
#[test]
fn a_data_command_leaves_no_process_behind() {
    let sim = start();
    let vm = sim.add_vm("group01", &[DISK]).unwrap();
    writes(&sim, &vm, 51);
    let t = TestRepo::new();
    let dir = data_command_dir(&t);
    let sleeper = dir.join("sleeper");
    let command = format!(
        "(trap '' TERM; exec sleep 1000) & echo $! > {}; {}",
        sleeper.display(),
        curl_data_command(&sim, &dir)
    );
    let s = backup(&t, &sim, &vm.id, &["--data-command", &command])
        .ok()
        .json();
    assert_disks_restore(&t, &sim, &vm, &s);
    let pid = std::fs::read_to_string(&sleeper).unwrap();
    let proc = format!("/proc/{}", pid.trim());
    // Gone, or a zombie about to be reaped by init.
    let alive = std::fs::read_to_string(format!("{proc}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false);
    assert!(
        !alive,
        "process {} of the data command outlived the backup",
        pid.trim()
    );
}
