//! Listings that know VMs and sources: `snapshots` shows a VM backup's disks
//! and metadata together under the VM's name (disk names too), `--vm`
//! filters by VM name or uuid, `--source` matches a XenServer URL however
//! it was typed (user, default port) and a VM URL selects its disks and
//! metadata; `restore latest` refuses to guess between sources and names
//! them; `diff` refuses snapshots of two sources unless `--force`;
//! `snapshots --group-by` prints one table per group.

use serde_json::Value as Json;

use crate::util::*;
use crate::xen_backup::{backup, disks, PASSWORD};
use crate::xen_util::{fill, start, xen_url, Host};

const MIB: u64 = 1024 * 1024;

fn ids(list: &[Json]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .map(|s| str_of(s, "snapshot_id").to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_vm_backup_is_listed_under_its_vm_and_selected_however_typed() {
    let sim = start(PASSWORD);
    let vm = sim
        .create_vm_with_disks("web01", &[4 * MIB, 2 * MIB])
        .unwrap();
    for (k, d) in vm.disks.iter().enumerate() {
        fill(&sim, &d.vdi_uuid, d.size_bytes, 40 + k as u64);
    }
    let host = Host::login(&sim, PASSWORD);
    let names: Vec<String> = vm
        .disks
        .iter()
        .map(|d| {
            let r = host.try_call("VDI.get_by_uuid", &[&d.vdi_uuid]).unwrap();
            let r = r.as_str().unwrap().to_string();
            host.try_call("VDI.get_name_label", &[&r])
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let repo = TestRepo::new();
    let src = xen_url(&sim, "vm", &vm.vm_uuid);
    let j = backup(&repo, &sim, &src, &[]).ok().json();
    let disk_ids: Vec<String> = disks(&j)
        .iter()
        .map(|d| str_of(d, "snapshot_id").to_string())
        .collect();
    let meta_id = j["metadata"]["snapshot_id"].as_str().unwrap().to_string();
    // A file backup beside it.
    let img = Image::create(&repo.path("other.img"), 4 * BS);
    img.write_block(0, &random_block(1, 0));
    let other = TestRepo::id_of(&repo.backup(&img.path, &[]));

    // --json carries the names and the VM backup.
    let all = repo.snapshots(&[]);
    assert_eq!(all.len(), 4);
    for s in &all {
        if str_of(s, "snapshot_id") == other {
            assert!(s["vm_uuid"].is_null() && s["kind"].is_null(), "{s}");
            continue;
        }
        assert_eq!(s["vm_uuid"], vm.vm_uuid.as_str(), "{s}");
        assert_eq!(s["vm_name"], "web01", "{s}");
        assert_eq!(s["vm_backup_id"], j["vm_backup_id"], "{s}");
    }
    for (id, name) in disk_ids.iter().zip(&names) {
        let s = all.iter().find(|s| str_of(s, "snapshot_id") == id).unwrap();
        assert_eq!(s["disk_name"], name.as_str(), "{s}");
        assert_eq!(s["kind"], "disk");
    }

    // The table: one row naming the VM, its members indented under it.
    let out = repo.run(&[&"snapshots"]).ok().out();
    let vm_row = out
        .lines()
        .position(|l| l.contains("VM 'web01'") && l.contains("2 disks + metadata"))
        .unwrap_or_else(|| panic!("no VM row:\n{out}"));
    let members: Vec<&str> = out.lines().skip(vm_row + 1).take(3).collect();
    for name in &names {
        assert!(
            members
                .iter()
                .any(|l| l.starts_with("  ") && l.contains(&format!("disk '{name}'"))),
            "{name} not under the VM row:\n{out}"
        );
    }
    assert!(members.iter().any(|l| l.contains("metadata")), "{out}");
    assert!(out.contains("4 snapshots"), "{out}");

    // --vm by name and by uuid; a VM URL typed without the user.
    let mut want = disk_ids.clone();
    want.push(meta_id.clone());
    want.sort();
    assert_eq!(ids(&repo.snapshots(&["--vm", "web01"])), want);
    assert_eq!(
        ids(&repo.snapshots(&["--vm", &vm.vm_uuid.to_uppercase()])),
        want
    );
    assert!(repo.snapshots(&["--vm", "web02"]).is_empty());
    let a = sim.https_address();
    let vm_url = format!("xen://{}:{}/vm/{}", a.ip(), a.port(), vm.vm_uuid);
    assert_eq!(ids(&repo.snapshots(&["--source", &vm_url])), want);
    // One disk, by a URL with the user, by one without.
    let d0 = &vm.disks[0].vdi_uuid;
    for typed in [
        xen_url(&sim, "vdi", d0),
        format!("xen://{}:{}/vdi/{d0}", a.ip(), a.port()),
    ] {
        assert_eq!(
            ids(&repo.snapshots(&["--source", &typed])),
            vec![disk_ids[0].clone()],
            "{typed}"
        );
    }
    // --group-by source: one table per VM or source.
    let out = repo
        .run(&[&"snapshots", &"--group-by", &"source"])
        .ok()
        .out();
    assert_eq!(out.matches("source ").count(), 2, "{out}");
    assert!(
        out.contains("3 snapshots") && out.contains("1 snapshot\n"),
        "{out}"
    );
    repo.run(&[&"snapshots", &"--group-by", &"colour"])
        .expect_code(1)
        .stderr_mentions(&["colour"]);

    // restore latest must not guess between the sources.
    let target = repo.path("r.img");
    let r = repo.restore("latest", &target, &[]).expect_code(1);
    r.stderr_mentions(&["ambiguous", "--source", &img.path.display().to_string()]);
    assert!(!target.exists());
    repo.restore(
        "latest",
        &target,
        &["--source", &img.path.display().to_string()],
    )
    .ok();
    assert_eq!(hash_file(&target), img.hash());
}

#[test]
fn diff_refuses_snapshots_of_two_sources_unless_forced() {
    let t = TestRepo::init(&[]);
    let a = Image::create(&t.path("a.img"), 4 * BS);
    let b = Image::create(&t.path("b.img"), 4 * BS);
    a.write_block(1, &random_block(2, 1));
    b.write_block(2, &random_block(3, 2));
    let sa = TestRepo::id_of(&t.backup(&a.path, &[]));
    let sb = TestRepo::id_of(&t.backup(&b.path, &[]));
    t.run(&[&"diff", &sa, &sb])
        .expect_code(1)
        .stderr_mentions(&["different sources", "--force"]);
    let j = t
        .run(&[&"--json", &"diff", &sa, &sb, &"--force"])
        .ok()
        .json();
    assert_eq!(u64_of(&j, "blocks_changed"), 2, "{j}");
    // Same source: no --force needed.
    a.write_block(3, &random_block(4, 3));
    let sa2 = TestRepo::id_of(&t.backup(&a.path, &[]));
    let j = t.run(&[&"--json", &"diff", &sa, &sa2]).ok().json();
    assert_eq!(u64_of(&j, "blocks_changed"), 1, "{j}");
}
