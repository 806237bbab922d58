//! forget's host side against the simulator (issue 13): which
//! `cbt_metadata` landmark VDIs forget destroys on the host, which it
//! leaves (not recorded by this repository, another repository's, one that
//! kept its data, `--no-host`, `--dry-run`, an unreachable host), that a
//! backup starting a new set after lost tracking destroys the landmark it
//! superseded, and that incrementals continue after every cleanup, each
//! kept snapshot restoring bit for bit.

use std::ffi::OsStr;

use serde_json::Value as Json;
use xapi_sim::{SimOptions, Simulator};

use crate::util::{Run, TestRepo};
use crate::xen_backup::{backup, disks, restore_bytes, run_with_password, PASSWORD};
use crate::xen_util::{fill, guest_writes, xen_url, Host};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// One committed disk backup, as its `--json` summary tells it.
#[derive(Debug)]
struct Backup {
    id: String,
    /// The landmark VDI it recorded.
    landmark: String,
    full: bool,
    /// The disk summary.
    disk: Json,
    stderr: String,
    /// The guest disk when it was taken.
    bytes: Vec<u8>,
}

/// A one-disk VM filled with data, and its VDI's `xen://` URL.
struct Disk {
    sim: Simulator,
    vdi: String,
    src: String,
}

impl Disk {
    fn new() -> Disk {
        Disk::on(crate::xen_util::start(PASSWORD))
    }

    fn on(sim: Simulator) -> Disk {
        let vm = sim.create_vm_with_disks("vm", &[SIZE]).unwrap();
        let vdi = vm.disks[0].vdi_uuid.clone();
        fill(&sim, &vdi, SIZE, 5);
        let src = xen_url(&sim, "vdi", &vdi);
        Disk { sim, vdi, src }
    }

    fn host(&self) -> Host<'_> {
        Host::login(&self.sim, PASSWORD)
    }

    /// Guest writes from `seed` (none for 0), then a backup into `repo`.
    #[track_caller]
    fn backup(&self, repo: &TestRepo, seed: u64, extra: &[&str]) -> Backup {
        if seed > 0 {
            guest_writes(&self.sim, &self.vdi, SIZE, seed);
        }
        let r = backup(repo, &self.sim, &self.src, extra).ok();
        let j = r.json();
        let d = disks(&j).remove(0);
        Backup {
            id: d["snapshot_id"].as_str().unwrap().to_string(),
            landmark: d["host_snapshot_vdi_uuid"]
                .as_str()
                .unwrap_or_else(|| panic!("no landmark: {j}"))
                .to_string(),
            full: d["full"].as_bool().unwrap(),
            disk: d,
            stderr: r.stderr,
            bytes: self.host().disk(&self.vdi, SIZE),
        }
    }

    /// (uuid, type) of every snapshot VDI of this disk on the host, sorted.
    fn snapshots(&self) -> Vec<(String, String)> {
        snapshots_of(&self.host(), &self.vdi)
    }

    /// `cbtvault --json forget ARGS --fingerprint FP` on `repo`.
    fn forget(&self, repo: &TestRepo, args: &[&str]) -> Run {
        forget(repo, self.sim.fingerprint(), args)
    }
}

/// (uuid, type) of every snapshot VDI of live VDI `vdi`, sorted.
fn snapshots_of(host: &Host, vdi: &str) -> Vec<(String, String)> {
    let live = host.vdi_ref(vdi);
    let all = host.try_call("VDI.get_all_records", &[]).unwrap();
    let mut out: Vec<(String, String)> =
        all.as_struct()
            .unwrap()
            .values()
            .filter_map(|r| {
                let r = r.as_struct()?;
                (r.get("is_a_snapshot")?.as_bool()? && r.get("snapshot_of")?.as_str()? == live)
                    .then(|| {
                        (
                            r["uuid"].as_str().unwrap().to_string(),
                            r["type"].as_str().unwrap().to_string(),
                        )
                    })
            })
            .collect();
    out.sort();
    out
}

fn cbt(uuids: &[&str]) -> Vec<(String, String)> {
    typed(uuids, "cbt_metadata")
}

fn typed(uuids: &[&str], t: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = uuids
        .iter()
        .map(|u| (u.to_string(), t.to_string()))
        .collect();
    v.sort();
    v
}

fn forget(repo: &TestRepo, fingerprint: &str, args: &[&str]) -> Run {
    let mut a: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"forget"];
    for x in args {
        a.push(x);
    }
    a.push(&"--fingerprint");
    a.push(&fingerprint);
    run_with_password(repo, &a, PASSWORD)
}

/// `host.released` of a forget's JSON as (landmark, outcome kind), sorted;
/// each entry names `vdi`.
#[track_caller]
fn released(j: &Json, vdi: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = j["host"]["released"]
        .as_array()
        .unwrap_or_else(|| panic!("no host.released: {j}"))
        .iter()
        .map(|r| {
            assert_eq!(r["vdi_uuid"].as_str(), Some(vdi), "{j}");
            assert!(r["host"].as_str().is_some_and(|h| h.contains(':')), "{j}");
            (
                r["landmark_vdi_uuid"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The landmark uuids of a JSON array of landmarks (`host.left`,
/// `host_plan.planned`), sorted.
#[track_caller]
fn landmark_list(v: &Json) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|l| l["landmark_vdi_uuid"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

/// Ids of the snapshots a forget removed.
fn removed(j: &Json) -> Vec<String> {
    j["removed"]
        .as_array()
        .unwrap_or_else(|| panic!("no removed: {j}"))
        .iter()
        .map(|s| s["snapshot_id"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that `b` continued from the landmark `from` (an incremental
/// reading only what CBT marked), with no warning.
#[track_caller]
fn assert_incremental(b: &Backup) {
    assert!(!b.full, "{}\n{}", b.disk, b.stderr);
    assert!(b.disk["lost_reason"].is_null(), "{}", b.disk);
    assert!(b.disk["new_set_reason"].is_null(), "{}", b.disk);
    // At most 5 whole blocks + 2 for the unaligned piece (guest_writes).
    assert!(b.disk["blocks_read"].as_u64().unwrap() <= 7, "{}", b.disk);
    assert!(b.stderr.is_empty(), "{}", b.stderr);
}

#[track_caller]
fn assert_restores(repo: &TestRepo, b: &Backup) {
    assert!(
        restore_bytes(repo, &b.id) == b.bytes,
        "snapshot {} does not restore what the disk held",
        b.id
    );
}

/// Three backups; a failed superseding destroy leaves the first landmark
/// behind. Forgetting the first snapshot destroys that landmark, the second
/// (already superseded) is reported gone, the newest stays; the next backup
/// continues from it and every kept snapshot restores bit for bit.
#[test]
fn xen_forget_older_snapshots_destroys_their_landmarks_incrementals_continue() {
    let d = Disk::new();
    let repo = TestRepo::new();
    let b1 = d.backup(&repo, 0, &[]);
    assert!(b1.full);
    assert_eq!(d.snapshots(), cbt(&[&b1.landmark]));
    // The backup's own superseding destroy fails: b1's landmark stays.
    d.sim.set_faults(|f| {
        f.fail_calls.insert(
            "VDI.destroy".into(),
            vec!["SR_BACKEND_FAILURE_1".into(), "injected".into()],
        );
    });
    let b2 = d.backup(&repo, 11, &[]);
    d.sim.set_faults(|f| f.fail_calls.clear());
    assert!(!b2.full, "{}", b2.disk);
    assert_eq!(d.snapshots(), cbt(&[&b1.landmark, &b2.landmark]));
    let b3 = d.backup(&repo, 12, &[]);
    assert_incremental(&b3);
    // b2's landmark was superseded by b3 as usual.
    assert_eq!(d.snapshots(), cbt(&[&b1.landmark, &b3.landmark]));

    let r = d.forget(&repo, &[&b1.id]).ok();
    let j = r.json();
    assert_eq!(removed(&j), vec![b1.id.clone()], "{j}");
    assert_eq!(
        released(&j, &d.vdi),
        [(b1.landmark.clone(), "destroyed".to_string())],
        "{j}"
    );
    assert_eq!(j["host"]["left"], serde_json::json!([]), "{j}");
    assert_eq!(d.snapshots(), cbt(&[&b3.landmark]));

    // By policy this time: b2 goes, b3 is kept.
    let j = d.forget(&repo, &["--keep-last", "1"]).ok().json();
    assert_eq!(removed(&j), vec![b2.id.clone()], "{j}");
    assert_eq!(
        released(&j, &d.vdi),
        [(b2.landmark.clone(), "already-gone".to_string())],
        "{j}"
    );
    assert_eq!(d.snapshots(), cbt(&[&b3.landmark]));

    let b4 = d.backup(&repo, 13, &[]);
    assert_incremental(&b4);
    assert_eq!(d.snapshots(), cbt(&[&b4.landmark]));
    assert_eq!(repo.snapshot_ids().len(), 2);
    assert_restores(&repo, &b3);
    assert_restores(&repo, &b4);
    let b5 = d.backup(&repo, 14, &[]);
    assert_incremental(&b5);
    assert_restores(&repo, &b5);
}

/// Forgetting the newest snapshot of a disk destroys its landmark (the
/// remaining newest one's landmark was superseded long ago): the next
/// backup cannot continue, reads the disk in full as a new backup set with
/// a warning and a recorded reason, and the one after is incremental again.
#[test]
fn xen_forget_newest_snapshot_destroys_its_landmark_next_backup_starts_a_new_set() {
    let d = Disk::new();
    let repo = TestRepo::new();
    let b1 = d.backup(&repo, 0, &[]);
    let b2 = d.backup(&repo, 21, &[]);
    let b3 = d.backup(&repo, 22, &[]);
    assert_incremental(&b3);
    assert_eq!(d.snapshots(), cbt(&[&b3.landmark]));

    let j = d.forget(&repo, &[&b3.id]).ok().json();
    assert_eq!(removed(&j), vec![b3.id.clone()], "{j}");
    assert_eq!(
        released(&j, &d.vdi),
        [(b3.landmark.clone(), "destroyed".to_string())],
        "{j}"
    );
    assert_eq!(d.snapshots(), vec![]);

    let b4 = d.backup(&repo, 23, &[]);
    assert!(b4.full, "{}", b4.disk);
    assert!(b4.disk["new_set_reason"].as_str().is_some(), "{}", b4.disk);
    let lost = b4.disk["lost_reason"].as_str().expect("a lost reason");
    assert!(lost.contains(&b2.landmark), "{lost}");
    crate::util::Run {
        command: "backup".into(),
        code: 0,
        stdout: Vec::new(),
        stderr: b4.stderr.clone(),
    }
    .stderr_mentions(&["warning", "no longer exists", "new backup set"]);
    assert!(repo
        .cat_snapshot(&b4.id)
        .to_string()
        .contains("new_set_reason"));
    assert_eq!(d.snapshots(), cbt(&[&b4.landmark]));
    for b in [&b1, &b2, &b4] {
        assert_restores(&repo, b);
    }
    let b5 = d.backup(&repo, 24, &[]);
    assert_incremental(&b5);
    assert_restores(&repo, &b5);
    assert_eq!(d.snapshots(), cbt(&[&b5.landmark]));
}

/// `VDI.disable_cbt` then `VDI.enable_cbt` on the live disk.
fn cbt_cycle(d: &Disk) {
    let host = d.host();
    let r = host.vdi_ref(&d.vdi);
    host.try_call("VDI.disable_cbt", &[&r]).unwrap();
    host.try_call("VDI.enable_cbt", &[&r]).unwrap();
}

/// Two disable/enable CBT cycles with a backup after each: each backup
/// starts a new set and destroys the landmark it superseded, so exactly one
/// `cbt_metadata` VDI of the disk is left; the next backup is incremental.
#[test]
fn xen_lost_tracking_twice_leaves_exactly_one_landmark() {
    let d = Disk::new();
    let repo = TestRepo::new();
    let mut all = vec![d.backup(&repo, 0, &[])];
    for cycle in 0..2u64 {
        let old = all.last().unwrap().landmark.clone();
        cbt_cycle(&d);
        let b = d.backup(&repo, 31 + cycle, &[]);
        assert!(b.full, "{}", b.disk);
        assert!(b.disk["new_set_reason"].as_str().is_some(), "{}", b.disk);
        assert!(
            b.disk["lost_reason"]
                .as_str()
                .is_some_and(|r| r.contains("SR_BACKEND_FAILURE_460")),
            "{}",
            b.disk
        );
        // The superseded landmark was destroyed by the backup itself.
        assert_ne!(old, b.landmark);
        assert_eq!(d.snapshots(), cbt(&[&b.landmark]), "cycle {cycle}");
        all.push(b);
    }
    let last = d.backup(&repo, 39, &[]);
    assert_incremental(&last);
    assert_eq!(d.snapshots(), cbt(&[&last.landmark]));
    all.push(last);
    for b in &all {
        assert_restores(&repo, b);
    }
}

/// The `cbtvault.repository` marker of VDI `uuid`.
fn repository_marker(host: &Host, uuid: &str) -> Option<String> {
    host.snapshot_records("VDI")
        .into_iter()
        .find(|r| r.uuid == uuid)
        .expect("on the host")
        .other_config
        .get("cbtvault.repository")
        .cloned()
}

/// A `cbt_metadata` VDI of the disk made by hand (snapshot, data_destroy),
/// which no repository recorded, survives superseding backups, a lost
/// chain and forgetting every snapshot.
#[test]
fn xen_unrecorded_cbt_metadata_vdi_is_never_touched() {
    let d = Disk::new();
    let repo = TestRepo::new();
    let b1 = d.backup(&repo, 0, &[]);
    let host = d.host();
    let snap = host
        .try_call("VDI.snapshot", &[&host.vdi_ref(&d.vdi)])
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    host.try_call("VDI.data_destroy", &[&snap]).unwrap();
    let foreign = host
        .try_call("VDI.get_uuid", &[&snap])
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(d.snapshots(), cbt(&[&b1.landmark, &foreign]));
    assert_eq!(repository_marker(&host, &foreign), None);

    let b2 = d.backup(&repo, 41, &[]);
    assert_incremental(&b2);
    assert_eq!(d.snapshots(), cbt(&[&b2.landmark, &foreign]));
    cbt_cycle(&d);
    let b3 = d.backup(&repo, 42, &[]);
    assert!(b3.full, "{}", b3.disk);
    assert_eq!(d.snapshots(), cbt(&[&b3.landmark, &foreign]));

    let j = d.forget(&repo, &[&b3.id]).ok().json();
    assert_eq!(
        released(&j, &d.vdi),
        [(b3.landmark.clone(), "destroyed".to_string())],
        "{j}"
    );
    let j = d.forget(&repo, &[&b1.id, &b2.id]).ok().json();
    let mut gone = vec![
        (b1.landmark.clone(), "already-gone".to_string()),
        (b2.landmark.clone(), "already-gone".to_string()),
    ];
    gone.sort();
    assert_eq!(released(&j, &d.vdi), gone, "{j}");
    assert!(repo.snapshot_ids().is_empty());
    assert_eq!(d.snapshots(), cbt(&[&foreign]));
    // A new first backup: a full read, the foreign VDI still untouched.
    let b4 = d.backup(&repo, 43, &[]);
    assert!(b4.full);
    assert_restores(&repo, &b4);
    assert_eq!(d.snapshots(), cbt(&[&b4.landmark, &foreign]));
}

/// Two repositories back up the same disk, each keeping its own landmark.
/// Forgetting in A destroys only A's landmarks and B stays incremental; a
/// landmark A recorded that carries B's marker is refused and left.
#[test]
fn xen_forget_never_destroys_another_repositorys_landmark() {
    let d = Disk::new();
    let a = TestRepo::new();
    let b = TestRepo::new();
    let a1 = d.backup(&a, 0, &[]);
    let b1 = d.backup(&b, 0, &[]);
    let a2 = d.backup(&a, 51, &[]);
    let b2 = d.backup(&b, 52, &[]);
    assert_incremental(&a2);
    assert_incremental(&b2);
    assert_eq!(d.snapshots(), cbt(&[&a2.landmark, &b2.landmark]));
    let host = d.host();
    let mark_a = repository_marker(&host, &a2.landmark).expect("A's marker");
    let mark_b = repository_marker(&host, &b2.landmark).expect("B's marker");
    assert_ne!(mark_a, mark_b);

    // A forgets its newest snapshot, then the other one.
    let j = d.forget(&a, &[&a2.id]).ok().json();
    assert_eq!(
        released(&j, &d.vdi),
        [(a2.landmark.clone(), "destroyed".to_string())],
        "{j}"
    );
    assert_eq!(d.snapshots(), cbt(&[&b2.landmark]));
    let j = d.forget(&a, &[&a1.id]).ok().json();
    assert_eq!(
        released(&j, &d.vdi),
        [(a1.landmark.clone(), "already-gone".to_string())],
        "{j}"
    );
    assert_eq!(d.snapshots(), cbt(&[&b2.landmark]));
    // B continues from its landmark after A's was destroyed.
    let b3 = d.backup(&b, 53, &[]);
    assert_incremental(&b3);
    assert_eq!(d.snapshots(), cbt(&[&b3.landmark]));

    // A starts over; its new landmark is then marked as B's.
    let a3 = d.backup(&a, 54, &[]);
    assert!(a3.full);
    let r = host.vdi_ref(&a3.landmark);
    host.try_call("VDI.remove_from_other_config", &[&r, "cbtvault.repository"])
        .unwrap();
    host.try_call(
        "VDI.add_to_other_config",
        &[&r, "cbtvault.repository", &mark_b],
    )
    .unwrap();
    let r = d.forget(&a, &[&a3.id]).ok();
    let j = r.json();
    assert_eq!(
        released(&j, &d.vdi),
        [(a3.landmark.clone(), "refused".to_string())],
        "{j}"
    );
    let reason = j["host"]["released"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("another repository"), "{reason}");
    assert!(reason.contains(&mark_b), "{reason}");
    r.stderr_mentions(&["warning", &a3.landmark]);
    assert_eq!(d.snapshots(), cbt(&[&a3.landmark, &b3.landmark]));
    assert!(a.snapshot_ids().is_empty());

    let b4 = d.backup(&b, 55, &[]);
    assert_incremental(&b4);
    for x in [&b1, &b2, &b3, &b4] {
        assert_restores(&b, x);
    }
    // The re-marked landmark now claims to be B's, and no snapshot of B
    // records it: B's backup removes it as an orphan of its own.
    assert_eq!(d.snapshots(), cbt(&[&b4.landmark]));
}

/// `--dry-run` lists the landmark in `host_plan.planned` and changes
/// nothing; `--no-host` forgets in the repository only, lists it in
/// `host.left`, and destroys nothing. Neither needs the host's password.
#[test]
fn xen_forget_dry_run_and_no_host_leave_the_host_alone() {
    let d = Disk::new();
    let repo = TestRepo::new();
    let b1 = d.backup(&repo, 0, &[]);
    let b2 = d.backup(&repo, 61, &[]);
    assert_eq!(d.snapshots(), cbt(&[&b2.landmark]));
    let no_password = |args: &[&str]| {
        let mut a: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"forget"];
        for x in args {
            a.push(x);
        }
        run_with_password(&repo, &a, "")
    };

    let j = no_password(&[&b2.id, "--dry-run"]).ok().json();
    assert_eq!(j["dry_run"].as_bool(), Some(true), "{j}");
    assert_eq!(removed(&j), vec![b2.id.clone()], "{j}");
    assert_eq!(
        landmark_list(&j["host_plan"]["planned"]),
        vec![b2.landmark.clone()],
        "{j}"
    );
    assert_eq!(
        j["host_plan"]["planned"][0]["vdi_uuid"].as_str(),
        Some(d.vdi.as_str())
    );
    assert!(j.get("host").is_none(), "{j}");
    assert_eq!(repo.snapshot_ids().len(), 2);
    assert_eq!(d.snapshots(), cbt(&[&b2.landmark]));

    let j = no_password(&[&b2.id, "--no-host"]).ok().json();
    assert_eq!(j["dry_run"].as_bool(), Some(false), "{j}");
    assert_eq!(removed(&j), vec![b2.id.clone()], "{j}");
    assert_eq!(j["host"]["released"], serde_json::json!([]), "{j}");
    assert_eq!(
        landmark_list(&j["host"]["left"]),
        vec![b2.landmark.clone()],
        "{j}"
    );
    let left = &j["host"]["left"][0];
    assert_eq!(left["vdi_uuid"].as_str(), Some(d.vdi.as_str()), "{j}");
    assert_eq!(left["reason"].as_str(), Some("--no-host"), "{j}");
    assert!(j.get("host_plan").is_none(), "{j}");
    assert_eq!(repo.snapshot_ids(), vec![b1.id.clone()]);
    assert_eq!(d.snapshots(), cbt(&[&b2.landmark]));
    assert_restores(&repo, &b1);

    // The next backup finds the landmark no snapshot records any more
    // (marked by this repository, committed, its run over) and destroys
    // it: b1's own landmark is long gone, so it is a full read.
    let b3 = d.backup(&repo, 62, &[]);
    assert!(b3.full, "{}", b3.disk);
    assert_eq!(d.snapshots(), cbt(&[&b3.landmark]), "{}", b3.stderr);
    assert_restores(&repo, &b3);
    let b4 = d.backup(&repo, 63, &[]);
    assert_incremental(&b4);
    assert_restores(&repo, &b4);
}

/// The host is down when forget runs: the repository part still succeeds
/// (exit 4: completed with warnings), a warning names the landmark, `host.left` lists it, and it is
/// still on the host once that is back.
#[test]
fn xen_forget_with_the_host_unreachable_succeeds_and_lists_the_landmark() {
    let state = tempfile::tempdir().unwrap();
    let options = || SimOptions {
        dir: Some(state.path().to_path_buf()),
        password: PASSWORD.into(),
        data_destroy_wait: std::time::Duration::from_millis(500),
        ..SimOptions::default()
    };
    let d = Disk::on(Simulator::start(options()).unwrap());
    let repo = TestRepo::new();
    let b1 = d.backup(&repo, 0, &[]);
    let b2 = d.backup(&repo, 71, &[]);
    let fingerprint = d.sim.fingerprint().to_string();
    let Disk { sim, vdi, .. } = d;
    sim.shutdown();

    let r = forget(&repo, &fingerprint, &[&b2.id]).expect_code(4);
    r.stderr_mentions(&["warning", &b2.landmark]);
    let j = r.json();
    assert_eq!(removed(&j), vec![b2.id.clone()], "{j}");
    assert_eq!(j["host"]["released"], serde_json::json!([]), "{j}");
    assert_eq!(
        landmark_list(&j["host"]["left"]),
        vec![b2.landmark.clone()],
        "{j}"
    );
    let left = &j["host"]["left"][0];
    assert_eq!(left["vdi_uuid"].as_str(), Some(vdi.as_str()), "{j}");
    assert!(
        left["reason"]
            .as_str()
            .is_some_and(|s| s.contains("not reached")),
        "{j}"
    );
    assert_eq!(repo.snapshot_ids(), vec![b1.id.clone()]);
    assert_restores(&repo, &b1);

    let sim = Simulator::start(options()).unwrap();
    assert_eq!(
        snapshots_of(&Host::login(&sim, PASSWORD), &vdi),
        cbt(&[&b2.landmark])
    );
}

/// A landmark that kept its data (`--keep-snapshot-data`: type `user`, not
/// `cbt_metadata`) is refused and stays on the host.
#[test]
fn xen_forget_refuses_a_landmark_that_kept_its_data() {
    let d = Disk::new();
    let repo = TestRepo::new();
    let keep = ["--keep-snapshot-data"];
    let b1 = d.backup(&repo, 0, &keep);
    let b2 = d.backup(&repo, 81, &keep);
    assert_incremental(&b2);
    assert_eq!(d.snapshots(), typed(&[&b1.landmark, &b2.landmark], "user"));

    let r = d.forget(&repo, &[&b2.id]).ok();
    let j = r.json();
    assert_eq!(removed(&j), vec![b2.id.clone()], "{j}");
    assert_eq!(
        released(&j, &d.vdi),
        [(b2.landmark.clone(), "refused".to_string())],
        "{j}"
    );
    let reason = j["host"]["released"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("not cbt_metadata"), "{reason}");
    r.stderr_mentions(&["warning", &b2.landmark]);
    assert_eq!(d.snapshots(), typed(&[&b1.landmark, &b2.landmark], "user"));
    assert_restores(&repo, &b1);
    // b1's landmark is still there: the next backup continues from it.
    let b3 = d.backup(&repo, 82, &[]);
    assert_incremental(&b3);
    assert_restores(&repo, &b3);
    // Without --keep-snapshot-data the superseded b1 landmark (it kept its
    // data) goes; the refused b2 one, recorded by no snapshot, stays.
    let mut expected = [typed(&[&b2.landmark], "user"), cbt(&[&b3.landmark])].concat();
    expected.sort();
    assert_eq!(d.snapshots(), expected);
}

/// The live VDI itself was destroyed (disk deleted): its landmark is
/// destroyed only if it carries this repository's marker.
#[test]
fn xen_forget_after_the_live_vdi_is_gone_needs_our_marker() {
    for marked in [true, false] {
        let d = Disk::new();
        let repo = TestRepo::new();
        let b1 = d.backup(&repo, 0, &[]);
        let host = d.host();
        if !marked {
            host.try_call(
                "VDI.remove_from_other_config",
                &[&host.vdi_ref(&b1.landmark), "cbtvault.repository"],
            )
            .unwrap();
        }
        host.try_call("VDI.destroy", &[&host.vdi_ref(&d.vdi)])
            .unwrap();
        let r = d.forget(&repo, &[&b1.id]).ok();
        let j = r.json();
        assert_eq!(removed(&j), vec![b1.id.clone()], "{j}");
        let left: Vec<String> = host
            .snapshot_records("VDI")
            .into_iter()
            .map(|v| v.uuid)
            .collect();
        if marked {
            assert_eq!(
                released(&j, &d.vdi),
                [(b1.landmark.clone(), "destroyed".to_string())],
                "{j}"
            );
            assert_eq!(left, Vec::<String>::new());
        } else {
            assert_eq!(
                released(&j, &d.vdi),
                [(b1.landmark.clone(), "refused".to_string())],
                "{j}"
            );
            let reason = j["host"]["released"][0]["reason"].as_str().unwrap();
            assert!(reason.contains("no marker"), "{reason}");
            r.stderr_mentions(&["warning", &b1.landmark]);
            assert_eq!(left, vec![b1.landmark.clone()]);
        }
    }
}

/// (vdi, landmark, outcome) of every entry of `host.released`, sorted.
fn released_all(j: &Json) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = j["host"]["released"]
        .as_array()
        .unwrap_or_else(|| panic!("no host.released: {j}"))
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            (s("vdi_uuid"), s("landmark_vdi_uuid"), s("outcome"))
        })
        .collect();
    out.sort();
    out
}

/// VM backups of a two-disk VM: a policy forget releases the (already
/// superseded) landmarks of both disks of the older backups; forgetting the
/// newest VM backup (its disks and metadata) destroys both of its
/// landmarks; the next VM backup is a loud new set for both disks, the
/// one after incremental, all restoring bit for bit.
#[test]
fn xen_forget_vm_backups_releases_every_disks_landmark() {
    let sim = crate::xen_util::start(PASSWORD);
    let sizes = [8 * MIB, 4 * MIB];
    let vm = sim.create_vm_with_disks("vm", &sizes).unwrap();
    for (k, disk) in vm.disks.iter().enumerate() {
        fill(&sim, &disk.vdi_uuid, disk.size_bytes, 90 + k as u64);
    }
    let host = Host::login(&sim, PASSWORD);
    let repo = TestRepo::new();
    let src = xen_url(&sim, "vm", &vm.vm_uuid);
    // Per run: the summary; the (vdi, snapshot id, landmark, bytes) of each disk.
    let run = |seed: u64| {
        if seed > 0 {
            for disk in &vm.disks {
                guest_writes(&sim, &disk.vdi_uuid, disk.size_bytes, seed);
            }
        }
        let j = backup(&repo, &sim, &src, &[]).ok().json();
        let ds: Vec<(String, String, String, Vec<u8>)> = disks(&j)
            .iter()
            .zip(&vm.disks)
            .map(|(d, disk)| {
                assert_eq!(d["vdi_uuid"].as_str(), Some(disk.vdi_uuid.as_str()));
                (
                    disk.vdi_uuid.clone(),
                    d["snapshot_id"].as_str().unwrap().to_string(),
                    d["host_snapshot_vdi_uuid"].as_str().unwrap().to_string(),
                    host.disk(&disk.vdi_uuid, disk.size_bytes),
                )
            })
            .collect();
        (j, ds)
    };
    let landmarks_now = || {
        let mut v: Vec<(String, String)> = vm
            .disks
            .iter()
            .flat_map(|disk| snapshots_of(&host, &disk.vdi_uuid))
            .collect();
        v.sort();
        v
    };
    let (_, v1) = run(0);
    let (_, v2) = run(91);
    let (j3, v3) = run(92);
    let newest: Vec<&str> = v3.iter().map(|d| d.2.as_str()).collect();
    assert_eq!(landmarks_now(), cbt(&newest));

    let j = forget(&repo, sim.fingerprint(), &["--keep-last", "1"])
        .ok()
        .json();
    let mut expected: Vec<(String, String, String)> = v1
        .iter()
        .chain(&v2)
        .map(|d| (d.0.clone(), d.2.clone(), "already-gone".to_string()))
        .collect();
    expected.sort();
    assert_eq!(released_all(&j), expected, "{j}");
    // Two disks and the metadata of each older VM backup.
    assert_eq!(removed(&j).len(), 6, "{j}");
    assert_eq!(landmarks_now(), cbt(&newest));

    // One disk of a VM backup alone: said loudly (a dry run changes nothing).
    let r = forget(&repo, sim.fingerprint(), &["--dry-run", &v3[0].1]).ok();
    r.stderr_mentions(&["1 of the 3 snapshots of VM backup", "--new-vm"]);

    let meta = j3["metadata"]["snapshot_id"].as_str().unwrap();
    let mut ids: Vec<&str> = v3.iter().map(|d| d.1.as_str()).collect();
    ids.push(meta);
    let j = forget(&repo, sim.fingerprint(), &ids).ok().json();
    let mut expected: Vec<(String, String, String)> = v3
        .iter()
        .map(|d| (d.0.clone(), d.2.clone(), "destroyed".to_string()))
        .collect();
    expected.sort();
    assert_eq!(released_all(&j), expected, "{j}");
    assert_eq!(landmarks_now(), vec![]);
    assert!(repo.snapshot_ids().is_empty());

    // Nothing left in the repository: a plain first backup, then incremental.
    let (j4, v4) = run(93);
    for d in disks(&j4) {
        assert_eq!(d["full"].as_bool(), Some(true), "{j4}");
    }
    let (j5, v5) = run(94);
    for d in disks(&j5) {
        assert_eq!(d["full"].as_bool(), Some(false), "{j5}");
    }
    let newest: Vec<&str> = v5.iter().map(|d| d.2.as_str()).collect();
    assert_eq!(landmarks_now(), cbt(&newest));
    for (_, id, _, bytes) in v4.iter().chain(&v5) {
        assert!(restore_bytes(&repo, id) == *bytes, "snapshot {id} differs");
    }
}

/// Without a password the host part could not run, and once the snapshots
/// are gone nothing records their landmarks: forget refuses before
/// changing anything, and says how to go on.
#[test]
fn xen_forget_without_a_password_changes_nothing() {
    let d = Disk::new();
    let repo = TestRepo::new();
    let b1 = d.backup(&repo, 0, &[]);
    let b2 = d.backup(&repo, 65, &[]);
    let fp = d.sim.fingerprint().to_string();
    let a: Vec<&dyn AsRef<OsStr>> = vec![&"forget", &b2.id, &"--fingerprint", &fp];
    let r = run_with_password(&repo, &a, "");
    assert_eq!(r.code, 1, "{}", r.stderr);
    r.stderr_mentions(&["no XenServer password", "nothing was changed", "--no-host"]);
    assert_eq!(repo.snapshot_ids().len(), 2);
    assert_eq!(d.snapshots(), cbt(&[&b2.landmark]));
    // With the password it goes through.
    let j = d.forget(&repo, &[&b2.id]).ok().json();
    assert_eq!(
        released(&j, &d.vdi),
        [(b2.landmark.clone(), "destroyed".to_string())],
        "{j}"
    );
    assert_eq!(repo.snapshot_ids(), vec![b1.id.clone()]);
}
