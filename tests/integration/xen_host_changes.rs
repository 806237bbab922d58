//! What administrators do to VMs between backups, against the simulator:
//! disks resized, CD drives and user snapshots, suspended VMs, a disk
//! migrated to another SR (a new uuid), a full SR, xapi restarting for a
//! few seconds in the middle of a read. Every committed snapshot restores
//! bit-exact and nothing of a run stays on the host but its landmarks.

use std::time::Duration;

use xapi_sim::{SimVm, Simulator, Value};

use crate::util::TestRepo;
use crate::xen_backup::{backup, disks, restore_bytes, PASSWORD};
use crate::xen_util::{fill, guest_writes, xen_url as source, Host};

const MIB: u64 = 1 << 20;

fn start() -> Simulator {
    crate::xen_util::start(PASSWORD)
}

fn virtual_size(host: &Host, vdi_ref: &str) -> u64 {
    host.try_call("VDI.get_virtual_size", &[vdi_ref])
        .unwrap()
        .as_int()
        .unwrap() as u64
}

/// Every VDI on the host, by (uuid, type, is_a_snapshot).
fn all_vdis(host: &Host) -> Vec<(String, String, bool)> {
    let all = host.try_call("VDI.get_all_records", &[]).unwrap();
    let mut out: Vec<_> = all
        .as_struct()
        .unwrap()
        .values()
        .map(|r| {
            let r = r.as_struct().unwrap();
            (
                r["uuid"].as_str().unwrap().to_string(),
                r["type"].as_str().unwrap().to_string(),
                r["is_a_snapshot"].as_bool().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn xen_twenty_incrementals_across_resizes_restore_bit_exact() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm = sim.create_vm_with_disks("vm", &[4 * MIB]).unwrap();
    let disk = vm.disks[0].clone();
    fill(&sim, &disk.vdi_uuid, disk.size_bytes, 500);
    let repo = TestRepo::new();
    let src = source(&sim, "vdi", &disk.vdi_uuid);
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for run in 0..21u64 {
        // Two resizes: to a size that ends in a partial 64 KiB block (whole
        // sectors, as every real SR keeps), then to a bigger aligned one;
        // data written into the new space.
        let grow = match run {
            7 => Some(6 * MIB + 24 * 512),
            14 => Some(9 * MIB),
            _ => None,
        };
        if let Some(size) = grow {
            sim.call(
                "VDI.resize",
                &[
                    Value::str(&host.session),
                    Value::str(&disk.vdi_ref),
                    Value::str(size.to_string()),
                ],
            )
            .unwrap();
            assert_eq!(virtual_size(&host, &disk.vdi_ref), size);
            sim.guest_write(&disk.vdi_uuid, size - 5000, &[0xA5; 5000])
                .unwrap();
        }
        let size = virtual_size(&host, &disk.vdi_ref);
        if run > 0 {
            guest_writes(&sim, &disk.vdi_uuid, size, 500 + run);
        }
        let j = backup(&repo, &sim, &src, &[]).ok().json();
        let d = &disks(&j)[0];
        // A resize does not break the chain: CBT's log grows with the disk.
        assert_eq!(d["full"].as_bool(), Some(run == 0), "run {run}: {d}");
        assert_eq!(d["disk_size_bytes"].as_u64(), Some(size), "run {run}");
        if run > 0 {
            assert!(d["blocks_read"].as_u64().unwrap() <= 10, "run {run}: {d}");
        }
        expected.push((
            d["snapshot_id"].as_str().unwrap().to_string(),
            host.disk(&disk.vdi_uuid, size),
        ));
    }
    for (id, bytes) in &expected {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }
    let (check, _) = repo.check(true);
    check.ok();
    assert_eq!(sim.dom0_attachments(), 0);
}

/// A suspended VM with an empty CD drive, an ISO in another, and a
/// snapshot its owner took: only its disks are read, its own snapshot and
/// the ISO are left as they were, and a run adds only its landmarks.
#[test]
fn xen_suspended_vm_with_cd_drives_and_user_snapshots() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm: SimVm = sim.create_vm_with_disks("vm", &[2 * MIB, MIB]).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 520 + k as u64);
    }
    sim.add_cd(&vm.vm_uuid, None).unwrap();
    let iso = sim.add_cd(&vm.vm_uuid, Some("install.iso")).unwrap();
    host.try_call("VM.snapshot", &[&vm.vm_ref, "before the upgrade"])
        .unwrap();
    let suspend_vdi = sim.suspend_vm(&vm.vm_uuid).unwrap();
    let before = all_vdis(&host);
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    let mut expected = Vec::new();
    for run in 0..3u64 {
        if run > 0 {
            for (k, d) in vm.disks.iter().enumerate() {
                guest_writes(&sim, &d.vdi_uuid, d.size_bytes, 530 + run * 3 + k as u64);
            }
        }
        let j = backup(&repo, &sim, &src, &[]).ok().json();
        let ds = disks(&j);
        let uuids: Vec<&str> = ds.iter().map(|d| d["vdi_uuid"].as_str().unwrap()).collect();
        let want: Vec<&str> = vm.disks.iter().map(|d| d.vdi_uuid.as_str()).collect();
        assert_eq!(uuids, want, "only the disks are backed up");
        for (d, disk) in ds.iter().zip(&vm.disks) {
            assert_eq!(d["full"].as_bool(), Some(run == 0), "run {run}: {d}");
            expected.push((
                d["snapshot_id"].as_str().unwrap().to_string(),
                host.disk(&disk.vdi_uuid, disk.size_bytes),
            ));
        }
        // Only the user's snapshot VM; the VM still suspended with its image.
        assert_eq!(host.snapshot_vms(), 1, "run {run}");
        let state = host.try_call("VM.get_power_state", &[&vm.vm_ref]).unwrap();
        assert_eq!(state.as_str(), Some("Suspended"));
        let image = host.try_call("VM.get_suspend_VDI", &[&vm.vm_ref]).unwrap();
        assert_eq!(image.as_str(), Some(suspend_vdi.as_str()));
        // What is new on the host: the two landmarks, nothing else.
        let now = all_vdis(&host);
        let added: Vec<_> = now.iter().filter(|v| !before.contains(v)).collect();
        assert_eq!(added.len(), 2, "run {run}: {added:?}");
        assert!(added
            .iter()
            .all(|(_, t, snap)| t == "cbt_metadata" && *snap));
        assert!(now.iter().all(|v| before.contains(v) || added.contains(&v)));
        assert_eq!(sim.dom0_attachments(), 0);
    }
    assert!(host.try_call("VDI.get_uuid", &[&iso.vdi_ref]).is_ok());
    for (id, bytes) in &expected {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }
}

/// A disk moved to another SR comes back with a new uuid (CBT had to be
/// disabled first: `VDI_CBT_ENABLED` otherwise): its old chain is said to
/// end, the new VDI is read in full, the other disk stays incremental.
#[test]
fn xen_disk_migrated_to_another_sr_starts_a_new_chain_loudly() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm: SimVm = sim.create_vm_with_disks("vm", &[2 * MIB, MIB]).unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 540 + k as u64);
    }
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    backup(&repo, &sim, &src, &[]).ok();
    let other_sr = sim.create_sr("Other storage", "ext").unwrap();
    let moved = &vm.disks[1];
    let migrate = || {
        sim.call(
            "VDI.pool_migrate",
            &[
                Value::str(&host.session),
                Value::str(&moved.vdi_ref),
                Value::str(&other_sr),
                Value::Struct(Default::default()),
            ],
        )
    };
    let refused = migrate().map(|_| ());
    assert!(
        refused.as_ref().is_err_and(|e| e.code == "VDI_CBT_ENABLED"),
        "{refused:?}"
    );
    host.try_call("VDI.disable_cbt", &[&moved.vdi_ref]).unwrap();
    let new_ref = migrate().unwrap().as_str().unwrap().to_string();
    let new_uuid = host
        .try_call("VDI.get_uuid", &[&new_ref])
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_uuid, moved.vdi_uuid);
    let r = backup(&repo, &sim, &src, &[]).expect_code(4);
    r.stderr_mentions(&[&moved.vdi_uuid, "chain ends", &new_uuid]);
    let j = r.json();
    let ds = disks(&j);
    assert_eq!(ds[0]["full"].as_bool(), Some(false), "{j}");
    assert_eq!(ds[1]["vdi_uuid"].as_str(), Some(new_uuid.as_str()));
    assert_eq!(ds[1]["full"].as_bool(), Some(true), "{j}");
    let id = ds[1]["snapshot_id"].as_str().unwrap().to_string();
    assert!(restore_bytes(&repo, &id) == host.disk(&new_uuid, moved.size_bytes));
    // The migrated disk has CBT again (enabled by the run): incremental next.
    guest_writes(&sim, &new_uuid, moved.size_bytes, 549);
    let again = backup(&repo, &sim, &src, &[]).ok().json();
    assert_eq!(disks(&again)[1]["full"].as_bool(), Some(false), "{again}");
}

/// A full SR refuses the snapshot: the run fails naming `SR_FULL`, commits
/// nothing and leaves nothing on the host; with room again it succeeds.
#[test]
fn xen_full_sr_fails_the_run_cleanly() {
    let sim = start();
    let host = Host::login(&sim, PASSWORD);
    let vm: SimVm = sim.create_vm_with_disks("vm", &[2 * MIB]).unwrap();
    fill(&sim, &vm.disks[0].vdi_uuid, 2 * MIB, 560);
    let sr = host
        .try_call("VDI.get_SR", &[&vm.disks[0].vdi_ref])
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    let before = all_vdis(&host);
    // 1 MiB written; a 2 MiB snapshot does not fit in 2.5 MiB.
    sim.set_sr_physical_size(&sr, Some(2 * MIB + MIB / 2))
        .unwrap();
    let r = backup(&repo, &sim, &src, &[]).expect_code(1);
    r.stderr_mentions(&["SR_FULL"]);
    assert!(repo.snapshot_ids().is_empty());
    assert_eq!(all_vdis(&host), before);
    assert_eq!(host.snapshot_vms(), 0);
    sim.set_sr_physical_size(&sr, None).unwrap();
    backup(&repo, &sim, &src, &[]).ok();
}

/// xapi restarts in the middle of a read and is down for three seconds
/// (HTTPS answers 503, NBD refuses): the run waits, logs in again, fetches
/// `VDI.get_nbd_info` again and finishes; the restores are bit-exact.
#[test]
fn xen_backup_survives_a_xapi_restart_with_downtime() {
    let sim = start();
    let vm: SimVm = sim.create_vm_with_disks("vm", &[8 * MIB]).unwrap();
    let disk = vm.disks[0].clone();
    fill(&sim, &disk.vdi_uuid, disk.size_bytes, 580);
    let repo = TestRepo::new();
    let src = source(&sim, "vm", &vm.vm_uuid);
    sim.set_faults(|f| {
        f.expire_sessions_after_nbd_bytes = Some(MIB);
        f.restart_downtime_ms = 3000;
    });
    let started = std::time::Instant::now();
    let r = backup(&repo, &sim, &src, &["--nbd-connections", "2"]).ok();
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "no downtime seen"
    );
    let all = format!("{}{}", r.out(), r.stderr);
    assert!(all.contains("opened again"), "{all}");
    let host = Host::login(&sim, PASSWORD);
    let id = disks(&r.json())[0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(restore_bytes(&repo, &id) == host.disk(&disk.vdi_uuid, disk.size_bytes));
    assert_eq!(host.snapshot_vms(), 0);
    assert_eq!(sim.dom0_attachments(), 0);
}
