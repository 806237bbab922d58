//! A XenServer pool of two hosts (the simulator's master and a member with
//! its own address and certificate): backups through either host, a
//! member's login following `HOST_IS_SLAVE` only with the master trusted,
//! data read from the host that sees each SR, restores sent to the host
//! that sees the target SR, and every snapshot restored bit-exact.

use std::ffi::OsStr;

use serde_json::Value as Json;
use xapi_sim::{PoolMember, Simulator};

use crate::util::TestRepo;
use crate::xen_backup::{disks, restore_bytes, run_with_password, PASSWORD};
use crate::xen_util::{fill, guest_writes, Host};

const MIB: u64 = 1 << 20;

fn url(address: std::net::SocketAddr, kind: &str, uuid: &str) -> String {
    format!(
        "xen://root@{}:{}/{kind}/{uuid}",
        address.ip(),
        address.port()
    )
}

/// `cbtvault --json ARGS --fingerprint FP...`.
fn run(repo: &TestRepo, args: &[&str], fingerprints: &[&str]) -> crate::util::Run {
    let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"--json"];
    for a in args {
        all.push(a);
    }
    for fp in fingerprints {
        all.push(&"--fingerprint");
        all.push(fp);
    }
    run_with_password(repo, &all, PASSWORD)
}

struct Pool {
    sim: Simulator,
    member: PoolMember,
}

impl Pool {
    fn both(&self) -> [&str; 2] {
        [self.member.fingerprint.as_str(), self.sim.fingerprint()]
    }
}

#[test]
fn xen_pool_backup_through_either_host_and_restore_where_the_sr_is() {
    let sim = crate::xen_util::start(PASSWORD);
    let member = sim.add_pool_member("host2").unwrap();
    let pool = Pool { sim, member };
    let (sim, m) = (&pool.sim, &pool.member);
    let shared = sim.add_shared_sr("NFS").unwrap();
    let vm = sim.create_vm_with_disks("vm", &[4 * MIB]).unwrap();
    let on_shared = sim
        .add_disk_on_sr(&vm.vm_uuid, "shared", 3 * MIB, &shared)
        .unwrap();
    let on_member = sim
        .add_disk_on_sr(&vm.vm_uuid, "member local", 2 * MIB, &m.local_sr_uuid)
        .unwrap();
    let all = [vm.disks[0].clone(), on_shared.clone(), on_member.clone()];
    for (k, d) in all.iter().enumerate() {
        fill(sim, &d.vdi_uuid, d.size_bytes, 300 + k as u64);
    }
    let host = Host::login(sim, PASSWORD);
    let repo = TestRepo::new();
    let via_member = url(m.https, "vm", &vm.vm_uuid);
    let via_master = url(sim.https_address(), "vm", &vm.vm_uuid);

    // Through the member with only its certificate trusted: the master it
    // names is not, and the message says how to trust it; nothing is done.
    run(&repo, &["backup", &via_member], &[&m.fingerprint])
        .expect_code(1)
        .stderr_mentions(&["pool member", sim.fingerprint(), "--fingerprint"]);
    assert_eq!(host.snapshot_vms(), 0);

    // Three runs: through the member, the master, the member again. The
    // disks are the same disks whichever host answers: incrementals.
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for (run_no, source) in [&via_member, &via_master, &via_member].iter().enumerate() {
        if run_no > 0 {
            for (k, d) in all.iter().enumerate() {
                guest_writes(
                    sim,
                    &d.vdi_uuid,
                    d.size_bytes,
                    310 + 10 * run_no as u64 + k as u64,
                );
            }
        }
        let j: Json = run(&repo, &["backup", source], &pool.both()).ok().json();
        let ds = disks(&j);
        assert_eq!(ds.len(), 3, "{j}");
        for (d, disk) in ds.iter().zip(&all) {
            assert_eq!(d["vdi_uuid"].as_str(), Some(disk.vdi_uuid.as_str()), "{d}");
            assert_eq!(d["full"].as_bool(), Some(run_no == 0), "run {run_no}: {d}");
            expected.push((
                d["snapshot_id"].as_str().unwrap().to_string(),
                host.disk(&disk.vdi_uuid, disk.size_bytes),
            ));
        }
        assert_eq!(host.snapshot_vms(), 0, "run {run_no}");
        assert_eq!(sim.dom0_attachments(), 0, "run {run_no}");
    }
    let calls = sim.calls();
    assert!(
        calls
            .iter()
            .any(|c| c == "XenAPI session.login_with_password HOST_IS_SLAVE"),
        "the member was never asked: {calls:?}"
    );
    // One landmark per disk is all a run leaves on the pool.
    let landmarks: Vec<_> = host
        .snapshot_vdis()
        .into_iter()
        .filter(|(_, t)| t == "cbt_metadata")
        .collect();
    assert_eq!(landmarks.len(), 3, "{landmarks:?}");
    for (id, bytes) in &expected {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }

    // A disk's snapshots, however the host in its URL is written.
    let listed = |source: &str| -> usize { repo.snapshots(&["--source", source]).len() };
    assert_eq!(listed(&url(m.https, "vdi", &on_member.vdi_uuid)), 3);
    assert_eq!(
        listed(&url(sim.https_address(), "vdi", &on_member.vdi_uuid)),
        3
    );

    // Restore the member-local disk's newest snapshot through the master
    // into a new VDI on the member's SR: the import goes to the member
    // (its certificate as the master gives it), and --verify reads it
    // back over the member's NBD.
    let (id, bytes) = expected[expected.len() - 1].clone();
    let target = url(sim.https_address(), "sr", &m.local_sr_uuid);
    let j = run(
        &repo,
        &["restore", &id, "--target", &target, "--verify"],
        &[sim.fingerprint()],
    )
    .ok()
    .json();
    assert_eq!(j["created"].as_bool(), Some(true), "{j}");
    assert_eq!(j["verified"].as_bool(), Some(true), "{j}");
    let new = j["vdi_uuid"].as_str().unwrap();
    assert!(
        host.disk(new, on_member.size_bytes) == bytes,
        "restored VDI differs"
    );
    // And over the original, an older snapshot.
    let (id, bytes) = expected[2].clone();
    let target = url(sim.https_address(), "vdi", &on_member.vdi_uuid);
    run(
        &repo,
        &["restore", &id, "--target", &target],
        &[sim.fingerprint()],
    )
    .ok();
    assert!(host.disk(&on_member.vdi_uuid, on_member.size_bytes) == bytes);
    assert_eq!(sim.dom0_attachments(), 0);
}

/// Without NBD (an old host), a disk is read with `/export_raw_vdi`: the
/// master redirects it to the member that sees the SR, and the client
/// follows with the member's certificate as the master gives it (the user
/// trusts only the master's).
#[test]
fn xen_pool_export_redirected_to_the_member_is_followed_pinned() {
    let sim = crate::xen_util::start(PASSWORD);
    let member = sim.add_pool_member("host2").unwrap();
    let vm = sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let disk = sim
        .add_disk_on_sr(&vm.vm_uuid, "member local", 2 * MIB, &member.local_sr_uuid)
        .unwrap();
    fill(&sim, &disk.vdi_uuid, disk.size_bytes, 77);
    sim.set_faults(|f| f.legacy_host = true);
    let repo = TestRepo::new();
    let source = url(sim.https_address(), "vdi", &disk.vdi_uuid);
    let j = run(&repo, &["backup", &source], &[sim.fingerprint()])
        .ok()
        .json();
    let host = Host::login(&sim, PASSWORD);
    let id = disks(&j)[0]["snapshot_id"].as_str().unwrap().to_string();
    assert!(restore_bytes(&repo, &id) == host.disk(&disk.vdi_uuid, disk.size_bytes));
    assert_eq!(sim.dom0_attachments(), 0);
}

/// The same VDI uuid in another pool (a disaster-recovery import keeps
/// uuids): its tracking is not trusted, the disk is read in full with a
/// warning naming both pools, and the new snapshot restores bit-exact.
/// The second pool is the same simulator state with its pool uuid
/// changed, restarted on another port.
#[test]
fn xen_same_vdi_in_another_pool_is_read_in_full() {
    let state = tempfile::tempdir().unwrap();
    let options = || xapi_sim::SimOptions {
        dir: Some(state.path().to_path_buf()),
        password: PASSWORD.into(),
        data_destroy_wait: std::time::Duration::from_millis(500),
        ..xapi_sim::SimOptions::default()
    };
    let sim = Simulator::start(options()).unwrap();
    let vm = sim.create_vm_with_disks("vm", &[2 * MIB]).unwrap();
    let disk = vm.disks[0].clone();
    fill(&sim, &disk.vdi_uuid, disk.size_bytes, 91);
    let repo = TestRepo::new();
    run(
        &repo,
        &["backup", &url(sim.https_address(), "vdi", &disk.vdi_uuid)],
        &[sim.fingerprint()],
    )
    .ok();
    let old_pool = {
        let host = Host::login(&sim, PASSWORD);
        let pools = host.try_call("pool.get_all", &[]).unwrap();
        let pool = pools.as_array().unwrap()[0].as_str().unwrap().to_string();
        host.try_call("pool.get_uuid", &[&pool])
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    sim.shutdown();
    let path = state.path().join("state.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let new_pool = "0badc0de-0000-4000-8000-00000000d15a";
    assert!(text.contains(&old_pool));
    std::fs::write(&path, text.replace(&old_pool, new_pool)).unwrap();

    let sim = Simulator::start(options()).unwrap();
    guest_writes(&sim, &disk.vdi_uuid, disk.size_bytes, 92);
    let source = url(sim.https_address(), "vdi", &disk.vdi_uuid);
    let r = run(&repo, &["backup", &source], &[sim.fingerprint()]).ok();
    r.stderr_mentions(&[&old_pool, new_pool]);
    let j = r.json();
    let d = &disks(&j)[0];
    assert_eq!(d["full"].as_bool(), Some(true), "{d}");
    assert!(
        d["lost_reason"]
            .as_str()
            .is_some_and(|s| s.contains("pool")),
        "{d}"
    );
    // Back in one pool, the next run is incremental again.
    guest_writes(&sim, &disk.vdi_uuid, disk.size_bytes, 93);
    let again = run(&repo, &["backup", &source], &[sim.fingerprint()])
        .ok()
        .json();
    assert_eq!(disks(&again)[0]["full"].as_bool(), Some(false), "{again}");
    let host = Host::login(&sim, PASSWORD);
    let id = disks(&again)[0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(restore_bytes(&repo, &id) == host.disk(&disk.vdi_uuid, disk.size_bytes));
}

/// `VDI.get_nbd_info` lists a shared-SR disk on both hosts; with the first
/// entry's xapi-nbd down the read goes to the other host, even with a
/// single connection asked for.
#[test]
fn xen_pool_nbd_falls_back_to_the_next_host() {
    let sim = crate::xen_util::start(PASSWORD);
    let _member = sim.add_pool_member("host2").unwrap();
    let shared = sim.add_shared_sr("NFS").unwrap();
    let vm = sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let disk = sim
        .add_disk_on_sr(&vm.vm_uuid, "shared", 2 * MIB, &shared)
        .unwrap();
    fill(&sim, &disk.vdi_uuid, disk.size_bytes, 95);
    // The host of the first entry (the order is the pool's, not fixed) is
    // the one whose xapi-nbd goes down.
    let first = {
        let host = Host::login(&sim, PASSWORD);
        let info = host.try_call("VDI.get_nbd_info", &[&disk.vdi_ref]).unwrap();
        let entries = info.as_array().unwrap();
        assert_eq!(entries.len(), 2, "{entries:?}");
        let address = entries[0].as_struct().unwrap()["address"]
            .as_str()
            .unwrap()
            .to_string();
        let hosts = host.try_call("host.get_all", &[]).unwrap();
        hosts
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .find(|h| host.try_call("host.get_address", &[h]).unwrap().as_str() == Some(&address))
            .expect("the entry's host")
    };
    sim.set_faults(|f| {
        f.nbd_down_hosts.insert(first.clone());
    });
    let repo = TestRepo::new();
    let source = url(sim.https_address(), "vdi", &disk.vdi_uuid);
    let j = run(
        &repo,
        &["backup", &source, "--nbd-connections", "1"],
        &[sim.fingerprint()],
    )
    .ok()
    .json();
    let calls = sim.calls();
    let uuid = &disk.vdi_uuid;
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("NBD refused") && c.contains("down")),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.starts_with("NBD connect")),
        "{calls:?}"
    );
    let host = Host::login(&sim, PASSWORD);
    let id = disks(&j)[0]["snapshot_id"].as_str().unwrap().to_string();
    assert!(restore_bytes(&repo, &id) == host.disk(uuid, disk.size_bytes));
    assert_eq!(sim.dom0_attachments(), 0);
}
