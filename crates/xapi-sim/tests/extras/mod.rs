//! The simulator's later additions against xenapi-reference.md and xapi's
//! sources: `VDI.resize`, `clone`, `copy`, `pool_migrate`, CD drives,
//! suspended VMs, VMs with snapshots of their own, SR capacity and
//! `SR_FULL`, `task.cancel` of a transfer, an import into a disk in use,
//! idle sessions and a xapi restart with downtime. Part of the `sim`
//! test binary (its helpers are the parent's).

use super::*;

fn record(api: &Api, class: &str, r: &str) -> std::collections::BTreeMap<String, Value> {
    api.ok(&format!("{class}.get_record"), &[s(r)])
        .as_struct()
        .expect("a record")
        .clone()
}

fn text_of(rec: &std::collections::BTreeMap<String, Value>, field: &str) -> String {
    rec[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {:?}", rec[field]))
        .to_string()
}

fn int_of(rec: &std::collections::BTreeMap<String, Value>, field: &str) -> i64 {
    rec[field].as_int().expect("an int")
}

fn refs_of(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

/// Waits for a task to leave `pending`/`cancelling`; its status.
fn wait_task(api: &Api, task: &str) -> String {
    let start = Instant::now();
    loop {
        let status = api.text("task.get_status", &[s(task)]);
        if status != "pending" && status != "cancelling" {
            return status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "task stuck");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ref in a task result `<value>OpaqueRef:...</value>`.
fn result_ref(api: &Api, task: &str) -> String {
    let result = api.text("task.get_result", &[s(task)]);
    result
        .strip_prefix("<value>")
        .and_then(|r| r.strip_suffix("</value>"))
        .unwrap_or_else(|| panic!("not a ref result: {result}"))
        .to_string()
}

fn default_sr(api: &Api) -> String {
    let pool = refs_of(&api.ok("pool.get_all", &[])).remove(0);
    api.text("pool.get_default_SR", &[s(&pool)])
}

// ---------------------------------------------------------------- resize

#[test]
fn sim_resize_grows_the_disk_and_the_cbt_log() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, MIB);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    let first = random_bytes(10, 0, (BS + 100) as usize);
    sim.guest_write(&uuid, 3 * BS, &first).unwrap();
    let before = api.text("VDI.snapshot", &[s(&vdi)]);
    api.ok("VDI.resize", &[s(&vdi), s(&(3 * MIB).to_string())]);
    assert_eq!(
        api.ok("VDI.get_virtual_size", &[s(&vdi)]).as_int(),
        Some(3 * MIB as i64)
    );
    // The snapshot from before keeps its size and content.
    assert_eq!(
        api.ok("VDI.get_virtual_size", &[s(&before)]).as_int(),
        Some(MIB as i64)
    );
    let before_uuid = api.text("VDI.get_uuid", &[s(&before)]);
    assert_eq!(
        sim.read_vdi(&before_uuid, 3 * BS, first.len()).unwrap(),
        first
    );
    assert!(sim.read_vdi(&before_uuid, MIB - 10, 20).is_err());
    // The disk keeps its data; the new part reads as zeros.
    assert_eq!(sim.read_vdi(&uuid, 3 * BS, first.len()).unwrap(), first);
    assert_eq!(
        sim.read_vdi(&uuid, MIB, 2 * MIB as usize).unwrap(),
        vec![0u8; 2 * MIB as usize]
    );
    // A write past the old end, and one before: the bitmap between a
    // snapshot before and one after follows the larger size.
    sim.guest_write(&uuid, 40 * BS + 5, b"grown").unwrap();
    sim.guest_write(&uuid, 2 * BS, b"old part").unwrap();
    let after = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        lcb(&api, &before, &after).unwrap(),
        s(&bitmap_base64(3 * MIB, &[2, 40]))
    );
    // A resize with no write: the extra bits are zero.
    api.ok("VDI.resize", &[s(&vdi), s(&(4 * MIB + 3).to_string())]);
    let grown = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        lcb(&api, &after, &grown).unwrap(),
        s(&bitmap_base64(4 * MIB + 3, &[]))
    );
    assert_eq!(
        lcb(&api, &before, &grown).unwrap(),
        s(&bitmap_base64(4 * MIB + 3, &[2, 40]))
    );
    // The same size: nothing happens. Smaller: SM's VDISize fault.
    api.ok("VDI.resize", &[s(&vdi), s(&(4 * MIB + 3).to_string())]);
    assert_error(
        &api.err("VDI.resize", &[s(&vdi), s(&MIB.to_string())]),
        "SR_BACKEND_FAILURE_79",
        &["", "VDI Invalid size [opterr=shrinking not allowed]", ""],
    );
    assert_error(
        &api.err("VDI.resize", &[s(&vdi), s(&(2041u64 << 30).to_string())]),
        "SR_BACKEND_FAILURE_79",
        &[
            "",
            "VDI Invalid size [opterr=VDI size must be between 1 MB and 2088960 MB]",
            "",
        ],
    );
    assert_eq!(
        api.ok("VDI.get_virtual_size", &[s(&vdi)]).as_int(),
        Some((4 * MIB + 3) as i64)
    );
    // Attached to a running VM: not offline; no SM driver resizes online.
    sim.set_vm_running(&vm, true).unwrap();
    assert_error(
        &api.err("VDI.resize", &[s(&vdi), s(&(5 * MIB).to_string())]),
        "VDI_IN_USE",
        &[&vdi, "resize"],
    );
    let sr = api.text("VDI.get_SR", &[s(&vdi)]);
    assert_error(
        &api.err("VDI.resize_online", &[s(&vdi), s(&(5 * MIB).to_string())]),
        "SR_OPERATION_NOT_SUPPORTED",
        &[&sr],
    );
    sim.set_vm_running(&vm, false).unwrap();
    // A cbt_metadata VDI cannot be resized; the chain still works from it.
    api.ok("VDI.data_destroy", &[s(&before)]);
    assert_error(
        &api.err("VDI.resize", &[s(&before), s(&(5 * MIB).to_string())]),
        "VDI_INCOMPATIBLE_TYPE",
        &[&before, "cbt_metadata"],
    );
    assert_eq!(
        lcb(&api, &before, &grown).unwrap(),
        s(&bitmap_base64(4 * MIB + 3, &[2, 40]))
    );
    // Async, and allowed_operations lists resize (CBT on or not).
    let task = api.text("Async.VDI.resize", &[s(&vdi), s(&(5 * MIB).to_string())]);
    assert_eq!(wait_task(&api, &task), "success");
    assert_eq!(
        api.ok("VDI.get_virtual_size", &[s(&vdi)]).as_int(),
        Some(5 * MIB as i64)
    );
    let ops = refs_of(&api.ok("VDI.get_allowed_operations", &[s(&vdi)]));
    assert!(ops.contains(&"resize".to_string()) && !ops.contains(&"resize_online".to_string()));
}

#[test]
fn sim_resize_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = || SimOptions {
        dir: Some(dir.path().to_path_buf()),
        ..SimOptions::default()
    };
    let (uuid, before_uuid) = {
        let sim = start_with(options());
        let api = Api::login(&sim);
        let (_, vdi) = cbt_disk(&api, MIB + 1000);
        let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
        sim.guest_write(&uuid, MIB, b"in the short last block")
            .unwrap();
        let before = api.text("VDI.snapshot", &[s(&vdi)]);
        api.ok("VDI.resize", &[s(&vdi), s(&(2 * MIB).to_string())]);
        sim.guest_write(&uuid, MIB + 2000, b"past the old end")
            .unwrap();
        (uuid, api.text("VDI.get_uuid", &[s(&before)]))
    };
    let sim = start_with(options());
    let api = Api::login(&sim);
    let vdi = api.text("VDI.get_by_uuid", &[s(&uuid)]);
    let before = api.text("VDI.get_by_uuid", &[s(&before_uuid)]);
    assert_eq!(
        api.ok("VDI.get_virtual_size", &[s(&vdi)]).as_int(),
        Some(2 * MIB as i64)
    );
    assert_eq!(
        api.ok("VDI.get_virtual_size", &[s(&before)]).as_int(),
        Some((MIB + 1000) as i64)
    );
    assert_eq!(
        sim.read_vdi(&uuid, MIB, 23).unwrap(),
        b"in the short last block".to_vec()
    );
    assert_eq!(
        sim.read_vdi(&uuid, MIB + 1000, 1000).unwrap(),
        vec![0u8; 1000]
    );
    assert_eq!(
        sim.read_vdi(&uuid, MIB + 2000, 16).unwrap(),
        b"past the old end".to_vec()
    );
    assert_eq!(
        sim.read_vdi(&before_uuid, MIB, 23).unwrap(),
        b"in the short last block".to_vec()
    );
    assert_eq!(
        lcb(&api, &before, &vdi).unwrap(),
        s(&bitmap_base64(2 * MIB, &[16]))
    );
}

// ------------------------------------------------------------ clone, copy

#[test]
fn sim_clone_and_copy_give_new_vdis_without_cbt() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, 2 * MIB);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    let data = random_bytes(20, 0, (MIB + 7) as usize);
    sim.guest_write(&uuid, 5000, &data).unwrap();
    let base = api.text("VDI.snapshot", &[s(&vdi)]);
    let content = sim.read_vdi(&uuid, 0, 2 * MIB as usize).unwrap();

    let clone = api.text("VDI.clone", &[s(&vdi)]);
    let c = record(&api, "VDI", &clone);
    assert_ne!(text_of(&c, "uuid"), uuid);
    assert_eq!(c["cbt_enabled"], Value::Bool(false));
    assert_eq!(c["is_a_snapshot"], Value::Bool(false));
    assert_eq!(text_of(&c, "snapshot_of"), NULL);
    assert_eq!(int_of(&c, "virtual_size"), 2 * MIB as i64);
    assert_eq!(text_of(&c, "name_label"), "vm disk 0");
    assert_eq!(text_of(&c, "SR"), api.text("VDI.get_SR", &[s(&vdi)]));
    assert_eq!(
        sim.read_vdi(&text_of(&c, "uuid"), 0, 2 * MIB as usize)
            .unwrap(),
        content
    );
    // with driver_params too; the source's chain is untouched.
    let clone2 = api.text("VDI.clone", &[s(&vdi), Value::Struct(Default::default())]);
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&clone2)]),
        Value::Bool(false)
    );
    sim.guest_write(&text_of(&c, "uuid"), 0, b"only the clone")
        .unwrap();
    sim.guest_write(&uuid, 10 * BS, b"source").unwrap();
    let next = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        lcb(&api, &base, &next).unwrap(),
        s(&bitmap_base64(2 * MIB, &[10]))
    );
    assert_eq!(sim.read_vdi(&uuid, 0, 14).unwrap(), content[..14].to_vec());

    // copy(vdi, sr): into a new VDI on another SR.
    let other = sim.create_sr("second", "nfs").unwrap();
    let copy = api.text("VDI.copy", &[s(&base), s(&other)]);
    let c = record(&api, "VDI", &copy);
    assert_eq!(text_of(&c, "SR"), other);
    assert_eq!(c["cbt_enabled"], Value::Bool(false));
    assert_eq!(c["is_a_snapshot"], Value::Bool(false));
    assert_eq!(c["read_only"], Value::Bool(false));
    assert_eq!(
        sim.read_vdi(&text_of(&c, "uuid"), 0, 2 * MIB as usize)
            .unwrap(),
        content
    );
    // copy(vdi, null, base, into): only what differs from base.
    let task = api.text("Async.VDI.copy", &[s(&next), s(NULL), s(&base), s(&copy)]);
    assert_eq!(wait_task(&api, &task), "success");
    assert_eq!(result_ref(&api, &task), copy);
    let next_content = sim.read_vdi(&uuid, 0, 2 * MIB as usize).unwrap();
    assert_eq!(
        sim.read_vdi(&text_of(&c, "uuid"), 0, 2 * MIB as usize)
            .unwrap(),
        next_content
    );
    // Into a CBT-enabled VDI: its log marks what was written.
    let target = sim.create_vm_with_disks("target", &[2 * MIB]).unwrap();
    let tv = target.disks[0].vdi_ref.clone();
    api.ok("VDI.enable_cbt", &[s(&tv)]);
    let t0 = api.text("VDI.snapshot", &[s(&tv)]);
    api.ok("VDI.copy", &[s(&next), s(NULL), s(&base), s(&tv)]);
    let t1 = api.text("VDI.snapshot", &[s(&tv)]);
    assert_eq!(
        lcb(&api, &t0, &t1).unwrap(),
        s(&bitmap_base64(2 * MIB, &[10]))
    );
    assert_eq!(api.ok("VDI.get_cbt_enabled", &[s(&tv)]), Value::Bool(true));

    // Refusals.
    let small = api.text(
        "VDI.create",
        &[Value::Struct(
            [
                ("SR", s(&other)),
                ("virtual_size", s(&MIB.to_string())),
                ("type", s("user")),
                ("sharable", Value::Bool(false)),
                ("read_only", Value::Bool(false)),
                ("other_config", Value::Struct(Default::default())),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        )],
    );
    assert_error(
        &api.err("VDI.copy", &[s(&vdi), s(NULL), s(NULL), s(&small)]),
        "VDI_TOO_SMALL",
        &[&small, &(2 * MIB).to_string()],
    );
    assert_error(
        &api.err("VDI.copy", &[s(&vdi)]),
        "HANDLE_INVALID",
        &["SR", NULL],
    );
    sim.set_vm_running(&vm, true).unwrap();
    assert_error(
        &api.err("VDI.copy", &[s(&vdi), s(&other)]),
        "VDI_IN_USE",
        &[&vdi, "copy"],
    );
    // A clone may be taken live.
    api.ok("VDI.clone", &[s(&vdi)]);
    sim.set_vm_running(&vm, false).unwrap();
    api.ok("VDI.data_destroy", &[s(&base)]);
    for m in ["VDI.clone", "VDI.copy"] {
        let mut args = vec![s(&base)];
        if m == "VDI.copy" {
            args.push(s(&other));
        }
        assert_error(
            &api.err(m, &args),
            "VDI_INCOMPATIBLE_TYPE",
            &[&base, "cbt_metadata"],
        );
    }
}

const NULL: &str = "OpaqueRef:NULL";

// ---------------------------------------------------------- pool_migrate

#[test]
fn sim_pool_migrate_refuses_cbt_and_gives_a_new_vdi() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, MIB);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    sim.guest_write(&uuid, 7, b"moving data").unwrap();
    let snap = api.text("VDI.snapshot", &[s(&vdi)]);
    let other = sim.create_sr("fast storage", "lvmoiscsi").unwrap();
    let opts = Value::Struct(Default::default());
    assert_error(
        &api.err("VDI.pool_migrate", &[s(&vdi), s(&other), opts.clone()]),
        "VDI_CBT_ENABLED",
        &[&vdi],
    );
    // A VDI no VM uses cannot be migrated this way.
    let lone = api.text("VDI.clone", &[s(&vdi)]);
    assert_error(
        &api.err("VDI.pool_migrate", &[s(&lone), s(&other), opts.clone()]),
        "VDI_NEEDS_VM_FOR_MIGRATE",
        &[&lone],
    );
    api.ok("VDI.disable_cbt", &[s(&vdi)]);
    let vbd = refs_of(&api.ok("VM.get_VBDs", &[s(&vm)])).remove(0);
    sim.set_vm_running(&vm, true).unwrap();
    let task = api.text(
        "Async.VDI.pool_migrate",
        &[s(&vdi), s(&other), opts.clone()],
    );
    assert_eq!(wait_task(&api, &task), "success");
    let moved = result_ref(&api, &task);
    assert_ne!(moved, vdi);
    // The old VDI is gone, by ref and by uuid.
    assert_error(
        &api.err("VDI.get_uuid", &[s(&vdi)]),
        "HANDLE_INVALID",
        &["VDI", &vdi],
    );
    assert_error(
        &api.err("VDI.get_by_uuid", &[s(&uuid)]),
        "UUID_INVALID",
        &["VDI", &uuid],
    );
    let m = record(&api, "VDI", &moved);
    assert_ne!(text_of(&m, "uuid"), uuid);
    assert_eq!(text_of(&m, "SR"), other);
    assert_eq!(m["cbt_enabled"], Value::Bool(false));
    assert_eq!(refs_of(&m["VBDs"]), vec![vbd.clone()]);
    assert_eq!(api.text("VBD.get_VDI", &[s(&vbd)]), moved);
    assert_eq!(
        api.ok("VBD.get_currently_attached", &[s(&vbd)]),
        Value::Bool(true)
    );
    assert_eq!(
        sim.read_vdi(&text_of(&m, "uuid"), 7, 11).unwrap(),
        b"moving data".to_vec()
    );
    assert_eq!(api.text("VDI.get_snapshot_of", &[s(&snap)]), moved);
    // Back on the same SR: nothing to do, the same VDI.
    assert_eq!(
        api.text("VDI.pool_migrate", &[s(&moved), s(&other), opts]),
        moved
    );
}

// -------------------------------------------------------------- CD drives

#[test]
fn sim_cd_drives_are_copied_not_snapshotted() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, MIB);
    let empty = sim.add_cd(&vm, None).unwrap();
    let iso = sim.add_cd(&vm, Some("install.iso")).unwrap();
    assert_eq!(empty.vdi_ref, NULL);
    let e = record(&api, "VBD", &empty.vbd_ref);
    assert_eq!(text_of(&e, "type"), "CD");
    assert_eq!(e["empty"], Value::Bool(true));
    assert_eq!(text_of(&e, "mode"), "RO");
    assert_eq!(text_of(&e, "VDI"), NULL);
    let i = record(&api, "VBD", &iso.vbd_ref);
    assert_eq!(text_of(&i, "type"), "CD");
    assert_eq!(i["empty"], Value::Bool(false));
    assert_eq!(text_of(&i, "mode"), "RO");
    assert_eq!(text_of(&i, "VDI"), iso.vdi_ref);
    assert_eq!(text_of(&i, "userdevice"), "2");
    let disk_vbd = refs_of(&api.ok("VDI.get_VBDs", &[s(&vdi)])).remove(0);
    let d = record(&api, "VBD", &disk_vbd);
    assert_eq!(text_of(&d, "type"), "Disk");
    let v = record(&api, "VDI", &iso.vdi_ref);
    assert_eq!(text_of(&v, "type"), "user");
    assert_eq!(text_of(&v, "name_label"), "install.iso");
    assert_eq!(v["read_only"], Value::Bool(true));
    assert_eq!(int_of(&v, "virtual_size"), sim::ISO_BYTES as i64);
    let sr = record(&api, "SR", &text_of(&v, "SR"));
    assert_eq!(text_of(&sr, "type"), "iso");
    assert_eq!(text_of(&sr, "content_type"), "iso");
    assert_eq!(
        text_of(&record(&api, "SR", &default_sr(&api)), "content_type"),
        "user"
    );
    // The VM's disks, as the simulator describes them, are disks only.
    assert_eq!(sim.find_vm("vm").unwrap().disks.len(), 1);

    // VM.snapshot: the disk is snapshotted, the drives copied as they are.
    let vdis_before = refs_of(&api.ok("VDI.get_all", &[]));
    let snap_vm = api.text("VM.snapshot", &[s(&vm), s("with CDs")]);
    let mut by_device = std::collections::BTreeMap::new();
    for b in refs_of(&api.ok("VM.get_VBDs", &[s(&snap_vm)])) {
        let r = record(&api, "VBD", &b);
        by_device.insert(text_of(&r, "userdevice"), r);
    }
    assert_eq!(by_device.len(), 3);
    let disk = &by_device["0"];
    let snap_vdi = text_of(disk, "VDI");
    assert_eq!(api.text("VDI.get_snapshot_of", &[s(&snap_vdi)]), vdi);
    let cd_empty = &by_device["1"];
    assert_eq!(
        (text_of(cd_empty, "type"), cd_empty["empty"].clone()),
        ("CD".into(), Value::Bool(true))
    );
    assert_eq!(text_of(cd_empty, "VDI"), NULL);
    let cd_iso = &by_device["2"];
    assert_eq!(
        text_of(cd_iso, "VDI"),
        iso.vdi_ref,
        "the same ISO, not a snapshot of it"
    );
    assert_eq!(text_of(cd_iso, "mode"), "RO");
    assert_eq!(
        refs_of(&api.ok("VDI.get_snapshots", &[s(&iso.vdi_ref)])),
        Vec::<String>::new()
    );
    let vdis_after = refs_of(&api.ok("VDI.get_all", &[]));
    assert_eq!(
        vdis_after.len(),
        vdis_before.len() + 1,
        "one VDI snapshot only"
    );
    // A running VM's drives are attached; the backup chain is unaffected.
    sim.set_vm_running(&vm, true).unwrap();
    assert_eq!(
        api.ok("VBD.get_currently_attached", &[s(&iso.vbd_ref)]),
        Value::Bool(true)
    );
    sim.set_vm_running(&vm, false).unwrap();

    // VBD.create's checks for drives (xapi_vbd.ml).
    let vbd_rec = |vdi: &str, kind: &str, mode: &str, empty: bool| {
        Value::Struct(
            [
                ("VM", s(&vm)),
                ("VDI", s(vdi)),
                ("userdevice", s("5")),
                ("mode", s(mode)),
                ("type", s(kind)),
                ("empty", Value::Bool(empty)),
                ("bootable", Value::Bool(false)),
                ("other_config", Value::Struct(Default::default())),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        )
    };
    assert_error(
        &api.err("VBD.create", &[vbd_rec(&iso.vdi_ref, "CD", "RW", false)]),
        "VBD_CDS_MUST_BE_READONLY",
        &[],
    );
    assert_error(
        &api.err("VBD.create", &[vbd_rec(NULL, "Disk", "RO", true)]),
        "VBD_NOT_REMOVABLE_MEDIA",
        &["in constructor"],
    );
    assert_error(
        &api.err("VBD.create", &[vbd_rec(&iso.vdi_ref, "Disk", "RW", false)]),
        "VDI_READONLY",
        &[&iso.vdi_ref],
    );
    let cd = api.text("VBD.create", &[vbd_rec(NULL, "CD", "RO", true)]);
    assert_eq!(api.text("VBD.get_type", &[s(&cd)]), "CD");
    assert_eq!(api.ok("VBD.get_empty", &[s(&cd)]), Value::Bool(true));
    // The hook over the wire.
    let vbd = api.text("sim.add_cd", &[s(&vm), s("")]);
    assert_eq!(api.text("VBD.get_VDI", &[s(&vbd)]), NULL);
}

// ---------------------------------------------------------- suspended VMs

#[test]
fn sim_suspended_vm_has_a_suspend_vdi_and_can_be_snapshotted() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, MIB);
    let base = api.text("VDI.snapshot", &[s(&vdi)]);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    sim.guest_write(&uuid, 4 * BS, b"before suspending")
        .unwrap();
    sim.set_vm_running(&vm, true).unwrap();
    let suspend = sim.suspend_vm(&vm).unwrap();
    let r = record(&api, "VM", &vm);
    assert_eq!(text_of(&r, "power_state"), "Suspended");
    assert_eq!(text_of(&r, "suspend_VDI"), suspend);
    let v = record(&api, "VDI", &suspend);
    assert_eq!(text_of(&v, "type"), "suspend");
    assert_eq!(refs_of(&v["VBDs"]), Vec::<String>::new());
    assert_eq!(v["cbt_enabled"], Value::Bool(false));
    // Not a disk of the VM: its VBDs are the disk's only.
    let vbds = refs_of(&api.ok("VM.get_VBDs", &[s(&vm)]));
    assert_eq!(vbds.len(), 1);
    assert_eq!(api.text("VBD.get_VDI", &[s(&vbds[0])]), vdi);
    match sim.suspend_vm(&vm) {
        Err(sim::SimError::Api(e)) => {
            assert_error(&e, "VM_BAD_POWER_STATE", &[&vm, "running", "suspended"])
        }
        other => panic!("suspended twice: {other:?}"),
    }

    // VM.snapshot of a suspended VM: a Halted snapshot, no suspend_VDI,
    // the disks snapshotted (CBT chain extended).
    let snap_vm = api.text("VM.snapshot", &[s(&vm), s("suspended backup")]);
    let sr = record(&api, "VM", &snap_vm);
    assert_eq!(text_of(&sr, "power_state"), "Halted");
    assert_eq!(text_of(&sr, "suspend_VDI"), NULL);
    assert_eq!(sr["is_a_snapshot"], Value::Bool(true));
    assert_eq!(text_of(&sr, "snapshot_of"), vm);
    let snap_vbds = refs_of(&sr["VBDs"]);
    assert_eq!(snap_vbds.len(), 1);
    let snap_vdi = api.text("VBD.get_VDI", &[s(&snap_vbds[0])]);
    assert_eq!(api.text("VDI.get_snapshot_of", &[s(&snap_vdi)]), vdi);
    assert_eq!(
        lcb(&api, &base, &snap_vdi).unwrap(),
        s(&bitmap_base64(MIB, &[4]))
    );
    // The live disk is still attached (suspended): not a vdi_to.
    assert_error(
        &lcb(&api, &base, &vdi).unwrap_err(),
        "VDI_IN_USE",
        &[&vdi, "list_changed_blocks"],
    );
    // VM.checkpoint of a suspended VM: Suspended, with a snapshot of the
    // suspend image.
    let cp = api.text("VM.checkpoint", &[s(&vm), s("checkpoint")]);
    let c = record(&api, "VM", &cp);
    assert_eq!(text_of(&c, "power_state"), "Suspended");
    let cp_image = text_of(&c, "suspend_VDI");
    assert_ne!(cp_image, NULL);
    assert_ne!(cp_image, suspend);
    let ci = record(&api, "VDI", &cp_image);
    assert_eq!(text_of(&ci, "type"), "suspend");
    assert_eq!(ci["is_a_snapshot"], Value::Bool(true));
    assert_eq!(text_of(&ci, "snapshot_of"), suspend);
    // A checkpoint of a halted VM is refused.
    let halted = sim.create_vm_with_disks("halted", &[MIB]).unwrap();
    assert_error(
        &api.err("VM.checkpoint", &[s(&halted.vm_ref), s("x")]),
        "VM_BAD_POWER_STATE",
        &[&halted.vm_ref, "running", "halted"],
    );
    // Halting the suspended VM destroys its suspend VDI.
    sim.set_vm_running(&vm, false).unwrap();
    assert_eq!(api.text("VM.get_power_state", &[s(&vm)]), "Halted");
    assert_eq!(api.text("VM.get_suspend_VDI", &[s(&vm)]), NULL);
    assert_error(
        &api.err("VDI.get_type", &[s(&suspend)]),
        "HANDLE_INVALID",
        &["VDI", &suspend],
    );
    // Over the wire.
    let image = api.text("sim.suspend_vm", &[s(&vm)]);
    assert_eq!(api.text("VM.get_suspend_VDI", &[s(&vm)]), image);
}

// ----------------------------------------------- VMs with snapshots of their own

#[test]
fn sim_vm_with_user_snapshots_lists_them_all() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, MIB);
    let user1 = api.text("VM.snapshot", &[s(&vm), s("before upgrade")]);
    let user2 = api.text("VM.snapshot", &[s(&vm), s("after upgrade")]);
    let backup = api.text("VM.snapshot", &[s(&vm), s("backup")]);
    let mut all = vec![user1.clone(), user2.clone(), backup.clone()];
    all.sort();
    assert_eq!(refs_of(&api.ok("VM.get_snapshots", &[s(&vm)])), all);
    let mut disk_snaps = Vec::new();
    for snap in [&user1, &user2, &backup] {
        let r = record(&api, "VM", snap);
        assert_eq!(r["is_a_snapshot"], Value::Bool(true));
        assert_eq!(text_of(&r, "snapshot_of"), vm);
        assert_eq!(refs_of(&r["snapshots"]), Vec::<String>::new());
        let vbd = refs_of(&r["VBDs"]).remove(0);
        let d = api.text("VBD.get_VDI", &[s(&vbd)]);
        assert_eq!(api.ok("VDI.get_is_a_snapshot", &[s(&d)]), Value::Bool(true));
        assert_eq!(api.text("VDI.get_snapshot_of", &[s(&d)]), vdi);
        disk_snaps.push(d);
    }
    disk_snaps.sort();
    assert_eq!(
        refs_of(&api.ok("VDI.get_snapshots", &[s(&vdi)])),
        disk_snaps
    );
    let r = record(&api, "VM", &vm);
    assert_eq!(r["is_a_snapshot"], Value::Bool(false));
    assert_eq!(text_of(&r, "snapshot_of"), NULL);
    // The backup's bitmap covers what happened after the newest user
    // snapshot only... and from the first one, everything since.
    let d = |i: usize| {
        let vm_snap = [&user1, &user2, &backup][i];
        let vbd = refs_of(&api.ok("VM.get_VBDs", &[s(vm_snap)])).remove(0);
        api.text("VBD.get_VDI", &[s(&vbd)])
    };
    assert_eq!(
        lcb(&api, &d(1), &d(2)).unwrap(),
        s(&bitmap_base64(MIB, &[]))
    );
    // Destroying a user snapshot (VM and disk) keeps the lists right.
    let gone = d(0);
    api.ok("VM.destroy", &[s(&user1)]);
    api.ok("VDI.destroy", &[s(&gone)]);
    assert_eq!(refs_of(&api.ok("VM.get_snapshots", &[s(&vm)])).len(), 2);
    assert_eq!(refs_of(&api.ok("VDI.get_snapshots", &[s(&vdi)])).len(), 2);
}

// ----------------------------------------------------------- SR capacity

#[test]
fn sim_sr_capacity_and_sr_full() {
    let sim = start();
    let api = Api::login(&sim);
    let sr = default_sr(&api);
    let r = record(&api, "SR", &sr);
    assert_eq!(
        int_of(&r, "physical_size"),
        sim::model::DEFAULT_SR_PHYSICAL_SIZE as i64
    );
    assert_eq!(int_of(&r, "physical_utilisation"), 0);
    assert_eq!(int_of(&r, "virtual_allocation"), 0);
    let vm = sim.create_vm_with_disks("full", &[4 * MIB]).unwrap();
    let vdi = vm.disks[0].vdi_ref.clone();
    let uuid = vm.disks[0].vdi_uuid.clone();
    // Three whole blocks and a piece of a fourth; zeros allocate nothing.
    sim.guest_write(&uuid, 0, &random_bytes(30, 0, (3 * BS + 10) as usize))
        .unwrap();
    sim.guest_write(&uuid, 20 * BS, &vec![0u8; BS as usize])
        .unwrap();
    let used = 4 * BS;
    let r = record(&api, "SR", &sr);
    assert_eq!(int_of(&r, "physical_utilisation"), used as i64);
    assert_eq!(int_of(&r, "virtual_allocation"), 4 * MIB as i64);
    // A snapshot shares the data: still the same.
    let snap = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        int_of(&record(&api, "SR", &sr), "physical_utilisation"),
        used as i64
    );
    // One MiB free.
    let size = used + MIB;
    sim.set_sr_physical_size(&sr, Some(size)).unwrap();
    assert_eq!(
        int_of(&record(&api, "SR", &sr), "physical_size"),
        size as i64
    );
    let full = |added: u64| [(used + added).to_string(), size.to_string()];
    let new_vdi = Value::Struct(
        [
            ("SR", s(&sr)),
            ("virtual_size", s(&(2 * MIB).to_string())),
            ("type", s("user")),
            ("sharable", Value::Bool(false)),
            ("read_only", Value::Bool(false)),
            ("other_config", Value::Struct(Default::default())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    let check = |e: ApiError, added: u64| {
        let [a, b] = full(added);
        assert_error(&e, "SR_FULL", &[&a, &b]);
    };
    let vdis = refs_of(&api.ok("VDI.get_all", &[])).len();
    let vms = refs_of(&api.ok("VM.get_all", &[])).len();
    check(api.err("VDI.create", &[new_vdi]), 2 * MIB);
    check(api.err("VDI.snapshot", &[s(&vdi)]), 4 * MIB);
    check(
        api.err("VM.snapshot", &[s(&vm.vm_ref), s("too big")]),
        4 * MIB,
    );
    check(api.err("VDI.clone", &[s(&vdi)]), 4 * MIB);
    check(api.err("VDI.copy", &[s(&vdi), s(&sr)]), 4 * MIB);
    check(
        api.err("VDI.resize", &[s(&vdi), s(&(6 * MIB).to_string())]),
        2 * MIB,
    );
    assert_eq!(
        refs_of(&api.ok("VDI.get_all", &[])).len(),
        vdis,
        "nothing made"
    );
    assert_eq!(
        refs_of(&api.ok("VM.get_all", &[])).len(),
        vms,
        "nothing made"
    );
    // What fits still works: a 1 MiB resize, 16 new blocks of data.
    api.ok("VDI.resize", &[s(&vdi), s(&(5 * MIB).to_string())]);
    sim.guest_write(&uuid, 4 * MIB, &vec![1u8; MIB as usize])
        .unwrap();
    let e = sim
        .guest_write(&uuid, 30 * BS, b"one block more")
        .unwrap_err();
    assert!(e.to_string().contains("SR_FULL"), "{e}");
    // An import stops at the piece that does not fit: SR_FULL on its task.
    sim.set_sr_physical_size(&sr, Some(size + MIB)).unwrap();
    let session = login_xml(&sim);
    let task = api.text("task.create", &[s("import"), s("")]);
    let body = random_bytes(31, 0, (2 * MIB) as usize);
    let len = body.len().to_string();
    let r = request(
        &sim,
        "PUT",
        &format!("/import_raw_vdi?session_id={session}&vdi={uuid}&task_id={task}"),
        &[("Content-Length", &len)],
        &body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(wait_task(&api, &task), "failure");
    // Blocks 0-3 are in the snapshot's layer: the first MiB copies them
    // up, 16 new blocks; the second MiB does not fit.
    let util = used + 2 * MIB;
    assert_eq!(
        api.ok("task.get_error_info", &[s(&task)]),
        Value::strings([
            "SR_FULL".to_string(),
            (util + MIB).to_string(),
            (size + MIB).to_string()
        ])
    );
    assert_eq!(
        sim.read_vdi(&uuid, 0, MIB as usize).unwrap(),
        body[..MIB as usize].to_vec()
    );
    assert_eq!(
        sim.read_vdi(&uuid, MIB, 16).unwrap(),
        vec![0u8; 16],
        "stopped"
    );
    // Back to the default: everything fits again.
    sim.set_sr_physical_size(&sr, None).unwrap();
    api.ok("VDI.clone", &[s(&snap)]);
    api.ok("sim.set_sr_physical_size", &[s(&sr), s("1")]);
    assert_eq!(api.ok("SR.get_physical_size", &[s(&sr)]).as_int(), Some(1));
}

// -------------------------------------------------- task.cancel of transfers

#[test]
fn sim_task_cancel_stops_an_export_and_an_import() {
    let sim = start();
    let api = Api::login(&sim);
    let size = 256 * MIB;
    let vm = sim.create_vm_with_disks("big", &[size]).unwrap();
    let uuid = vm.disks[0].vdi_uuid.clone();
    sim.guest_write(&uuid, 0, &random_bytes(40, 0, MIB as usize))
        .unwrap();
    let session = login_xml(&sim);

    // Export: read a little, cancel, read on: the stream ends early.
    let task = api.text("task.create", &[s("export"), s("")]);
    let mut tls = connect(&sim);
    let head = format!(
        "GET /export_raw_vdi?session_id={session}&vdi={uuid}&task_id={task} HTTP/1.1\r\nHost: localhost\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    while received < 2 * MIB {
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0);
        received += n as u64;
    }
    assert_eq!(api.text("task.get_status", &[s(&task)]), "pending");
    api.ok("task.cancel", &[s(&task)]);
    loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n as u64,
        }
    }
    assert!(received < size / 2, "the export went on: {received} bytes");
    assert_eq!(wait_task(&api, &task), "cancelled");
    assert_eq!(
        api.ok("task.get_error_info", &[s(&task)]),
        Value::strings(["TASK_CANCELLED", task.as_str()])
    );
    wait_until("the export's VBD to go", || sim.dom0_attachments() == 0);

    // Import: send a little, cancel, send on: the connection drops.
    let task = api.text("task.create", &[s("import"), s("")]);
    let mut tls = connect(&sim);
    let head = format!(
        "PUT /import_raw_vdi?session_id={session}&vdi={uuid}&task_id={task} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {size}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).unwrap();
    let piece = vec![0x5au8; 256 * 1024];
    let start_bytes = sim.import_bytes_received();
    for _ in 0..8 {
        tls.write_all(&piece).unwrap();
    }
    tls.flush().unwrap();
    wait_until("the import to read 2 MiB", || {
        sim.import_bytes_received() - start_bytes >= 2 * MIB
    });
    api.ok("task.cancel", &[s(&task)]);
    let mut sent = 2 * MIB;
    let dropped = loop {
        if sent >= size {
            break false;
        }
        if tls.write_all(&piece).and_then(|_| tls.flush()).is_err() {
            break true;
        }
        sent += piece.len() as u64;
    };
    assert!(dropped, "the import kept reading after the cancel");
    assert!(sent < 64 * MIB, "{sent} bytes sent before the drop");
    assert_eq!(wait_task(&api, &task), "cancelled");
    assert_eq!(
        api.ok("task.get_error_info", &[s(&task)]),
        Value::strings(["TASK_CANCELLED", task.as_str()])
    );
    assert_eq!(sim.read_vdi(&uuid, 0, 16).unwrap(), vec![0x5au8; 16]);
    assert_eq!(
        sim.read_vdi(&uuid, 128 * MIB, 16).unwrap(),
        vec![0u8; 16],
        "nothing written after the cancel"
    );
    wait_until("the import's VBD to go", || sim.dom0_attachments() == 0);
}

// --------------------------------------------- an import into a disk in use

#[test]
fn sim_import_into_a_disk_a_running_vm_uses_is_refused() {
    let sim = start();
    let api = Api::login(&sim);
    let vm = sim.create_vm_with_disks("busy", &[MIB]).unwrap();
    let (vdi, uuid) = (vm.disks[0].vdi_ref.clone(), vm.disks[0].vdi_uuid.clone());
    sim.set_vm_running(&vm.vm_ref, true).unwrap();
    let session = login_xml(&sim);
    let import = |task: &str| {
        request(
            &sim,
            "PUT",
            &format!("/import_raw_vdi?session_id={session}&vdi={uuid}&task_id={task}"),
            &[("Content-Length", "4")],
            b"data",
        )
    };
    let task = api.text("task.create", &[s("import"), s("")]);
    let r = import(&task);
    assert_eq!(r.status, 500);
    assert_eq!(api.text("task.get_status", &[s(&task)]), "failure");
    assert_eq!(
        api.ok("task.get_error_info", &[s(&task)]),
        Value::strings(["VDI_IN_USE", vdi.as_str()])
    );
    assert_eq!(
        sim.read_vdi(&uuid, 0, 4).unwrap(),
        vec![0u8; 4],
        "nothing written"
    );
    assert_eq!(sim.dom0_attachments(), 0);
    // A suspended VM's disks are offline: the import goes in.
    sim.suspend_vm(&vm.vm_ref).unwrap();
    let task = api.text("task.create", &[s("import"), s("")]);
    assert_eq!(import(&task).status, 200);
    assert_eq!(wait_task(&api, &task), "success");
    assert_eq!(sim.read_vdi(&uuid, 0, 4).unwrap(), b"data".to_vec());
    // Exports of a running VM's disk are allowed (read-only).
    sim.set_vm_running(&vm.vm_ref, true).unwrap();
    let r = request(
        &sim,
        "GET",
        &format!("/export_raw_vdi?session_id={session}&vdi={uuid}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, MIB);
}

// ------------------------------------- idle sessions, a restart with downtime

#[test]
fn sim_idle_sessions_expire() {
    let sim = start();
    sim.set_faults(|f| f.session_idle_timeout_ms = Some(400));
    let api = Api::login(&sim);
    api.ok("VDI.get_all", &[]);
    // Used within the timeout, again and again: still valid.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        api.ok("VDI.get_all", &[]);
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_error(
        &api.err("VDI.get_all", &[]),
        "SESSION_INVALID",
        &[api.session.as_str()],
    );
    // Gone for good, and a new one works.
    assert_error(
        &api.err("VDI.get_all", &[]),
        "SESSION_INVALID",
        &[api.session.as_str()],
    );
    let again = Api::login(&sim);
    again.ok("VDI.get_all", &[]);
    // Also through the wire and HTTP handlers: an idle session is refused.
    let session = login_xml(&sim);
    std::thread::sleep(Duration::from_millis(600));
    let r = request(
        &sim,
        "GET",
        &format!("/export_raw_vdi?session_id={session}&vdi=x"),
        &[],
        b"",
    );
    assert_eq!(r.status, 401);
    let last = Api::login(&sim);
    last.ok("sim.set_fault", &[s("session_idle_timeout_ms"), s("")]);
    std::thread::sleep(Duration::from_millis(600));
    last.ok("VDI.get_all", &[]);
}

#[test]
fn sim_xapi_restart_with_downtime() {
    let sim = start();
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, 4 * MIB);
    let snap = api.text("VDI.snapshot", &[s(&vdi)]);
    let info = api.ok("VDI.get_nbd_info", &[s(&snap)]);
    let options = nbd_options(&sim, &info.as_array().unwrap()[0]);
    let session = login_xml(&sim);
    let downtime = Duration::from_millis(1500);
    sim.set_faults(|f| {
        f.expire_sessions_after_nbd_bytes = Some(BS);
        f.restart_downtime_ms = downtime.as_millis() as u64;
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let restarted = rt.block_on(async {
        let conn = Connection::open(&options).await.unwrap();
        conn.read(0, BS as u32).await.unwrap();
        assert!(
            conn.read(BS, BS as u32).await.is_err(),
            "the connection drops"
        );
        Instant::now()
    });
    // Down: every request answers 503, new NBD connections are refused.
    let body = xmlrpc::encode_call(
        "session.login_with_password",
        &[s(sim.username()), s(sim.password())],
    );
    let r = post(&sim, "/", "text/xml", body.as_bytes());
    assert_eq!(r.status, 503);
    let r = post(
        &sim,
        "/jsonrpc",
        "application/json",
        br#"{"method": "VDI.get_all", "params": [], "id": 1}"#,
    );
    assert_eq!(r.status, 503);
    let r = request(
        &sim,
        "GET",
        &format!("/export_raw_vdi?session_id={session}&vdi={vdi}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 503);
    rt.block_on(async {
        assert!(Connection::open(&options).await.is_err());
    });
    assert!(restarted.elapsed() < downtime, "the checks took too long");
    // Up again: old sessions are invalid, new ones work, NBD too.
    std::thread::sleep(downtime.saturating_sub(restarted.elapsed()) + Duration::from_millis(100));
    let e = xml_call(&sim, "VDI.get_all", &[s(&session)]).unwrap_err();
    assert_error(&e, "SESSION_INVALID", &[&session]);
    assert_error(
        &api.err("VDI.get_all", &[]),
        "SESSION_INVALID",
        &[api.session.as_str()],
    );
    let fresh = Api::login(&sim);
    let info = fresh.ok("VDI.get_nbd_info", &[s(&snap)]);
    let options = nbd_options(&sim, &info.as_array().unwrap()[0]);
    rt.block_on(async {
        let conn = Connection::open(&options).await.unwrap();
        assert_eq!(conn.read(0, 512).await.unwrap().len(), 512);
        conn.close().await;
    });
    // Simulator::restart_xapi does the same at once.
    sim.restart_xapi(Duration::from_millis(300));
    assert_eq!(post(&sim, "/", "text/xml", body.as_bytes()).status, 503);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(post(&sim, "/", "text/xml", body.as_bytes()).status, 200);
    assert_error(
        &fresh.err("VDI.get_all", &[]),
        "SESSION_INVALID",
        &[fresh.session.as_str()],
    );
}
