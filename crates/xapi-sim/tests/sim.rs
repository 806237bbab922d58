//! The XenServer simulator against xenapi-reference.md: the API rules in
//! process (sessions, handles, the CBT chain, data_destroy, attachments,
//! tasks, faults), property tests of the CBT log algebra on the model, the
//! wire forms over real HTTPS (XML-RPC, JSON-RPC, the HTTP handlers), NBD
//! through the `nbd` crate's client with the pinned certificate, and the
//! Python conformance script driving it with the official `XenAPI` binding.
//! (`cbtvault sim`, the command, is tested with the product.)

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine;
use nbd::client::{Address, ConnectOptions, Connection};
use nbd::tls::{client_config, TlsOptions, Trust};
use proptest::prelude::*;
use xapi_sim::model::{HostConfig, NewVdi, State};
use xapi_sim::{self as sim, ApiError, SimOptions, Simulator, Value};
use xapi_wire::{chunked, xmlrpc};

mod extras;
mod util;

use util::{bitmap_base64, random_bytes, BS};

const MIB: u64 = 1 << 20;

fn start() -> Simulator {
    start_with(SimOptions {
        data_destroy_wait: Duration::from_millis(300),
        ..SimOptions::default()
    })
}

fn start_with(options: SimOptions) -> Simulator {
    Simulator::start(options).expect("start the simulator")
}

fn s(v: &str) -> Value {
    Value::str(v)
}

/// A logged-in session used in process (no wire).
struct Api<'a> {
    sim: &'a Simulator,
    session: String,
}

impl<'a> Api<'a> {
    fn login(sim: &'a Simulator) -> Api<'a> {
        let session = sim
            .call(
                "session.login_with_password",
                &[s(sim.username()), s(sim.password()), s("1.0"), s("tests")],
            )
            .expect("login");
        Api {
            sim,
            session: session.as_str().expect("a session ref").to_string(),
        }
    }

    fn call(&self, method: &str, args: &[Value]) -> Result<Value, ApiError> {
        let mut params = vec![s(&self.session)];
        params.extend_from_slice(args);
        self.sim.call(method, &params)
    }

    #[track_caller]
    fn ok(&self, method: &str, args: &[Value]) -> Value {
        self.call(method, args)
            .unwrap_or_else(|e| panic!("{method}: unexpected failure {e}"))
    }

    #[track_caller]
    fn text(&self, method: &str, args: &[Value]) -> String {
        match self.ok(method, args) {
            Value::String(v) => v,
            other => panic!("{method}: not a string: {other:?}"),
        }
    }

    #[track_caller]
    fn err(&self, method: &str, args: &[Value]) -> ApiError {
        match self.call(method, args) {
            Ok(v) => panic!("{method}: succeeded with {v:?} where an error was expected"),
            Err(e) => e,
        }
    }
}

#[track_caller]
fn assert_error(e: &ApiError, code: &str, params: &[&str]) {
    assert_eq!(
        (
            e.code.as_str(),
            e.params.iter().map(String::as_str).collect::<Vec<_>>()
        ),
        (code, params.to_vec()),
        "wrong error"
    );
}

fn unrelated() -> [&'static str; 3] {
    [
        "",
        "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]",
        "",
    ]
}

/// One VM with one disk of `size`, CBT enabled; returns (vm, vdi).
fn cbt_disk(api: &Api, size: u64) -> (String, String) {
    let vm = api
        .sim
        .create_vm_with_disks("vm", &[size])
        .expect("create vm");
    let vdi = vm.disks[0].vdi_ref.clone();
    api.ok("VDI.enable_cbt", &[s(&vdi)]);
    (vm.vm_ref, vdi)
}

// ------------------------------------------------------------- sessions etc.

#[test]
fn sim_sessions_and_generic_errors() {
    let sim = start();
    let e = sim
        .call("session.login_with_password", &[s("root"), s("wrong")])
        .unwrap_err();
    assert_error(&e, "SESSION_AUTHENTICATION_FAILED", &[]);
    let api = Api::login(&sim);
    let pools = api.ok("pool.get_all", &[]);
    let pool = pools.as_array().unwrap()[0].as_str().unwrap().to_string();
    let host = api.text("pool.get_master", &[s(&pool)]);
    assert_eq!(
        api.ok("host.get_API_version_major", &[s(&host)]),
        Value::Int(2)
    );
    assert_error(
        &api.err("VDI.get_by_uuid", &[s("no-such-uuid")]),
        "UUID_INVALID",
        &["VDI", "no-such-uuid"],
    );
    assert_error(
        &api.err("VDI.get_uuid", &[s("OpaqueRef:dead")]),
        "HANDLE_INVALID",
        &["VDI", "OpaqueRef:dead"],
    );
    // Set(Ref) getters on a dead ref name only the ref (gen_db_actions quirk).
    assert_error(
        &api.err("VDI.get_VBDs", &[s("OpaqueRef:dead")]),
        "HANDLE_INVALID",
        &["OpaqueRef:dead"],
    );
    assert_error(
        &api.err("VDI.no_such_call", &[]),
        "MESSAGE_METHOD_UNKNOWN",
        &["VDI.no_such_call"],
    );
    assert_error(
        &api.err("VDI.list_changed_blocks", &[s("a")]),
        "MESSAGE_PARAMETER_COUNT_MISMATCH",
        &["VDI.list_changed_blocks", "3", "2"],
    );
    // Lower-case class names are accepted, as in the seed's `vdi.data_destroy`.
    assert!(api.call("vdi.get_all", &[]).is_ok());
    api.ok("session.logout", &[]);
    assert_error(
        &api.err("VDI.get_all", &[]),
        "SESSION_INVALID",
        &[api.session.as_str()],
    );
}

// ------------------------------------------------------------- CBT toggling

#[test]
fn sim_enable_cbt_checks_in_reference_order() {
    let sim = start();
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, 4 * MIB);
    // Idempotent, both ways.
    api.ok("VDI.enable_cbt", &[s(&vdi)]);
    assert_eq!(api.ok("VDI.get_cbt_enabled", &[s(&vdi)]), Value::Bool(true));
    let snap = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&snap)]),
        Value::Bool(true)
    );
    assert_eq!(
        api.ok("VDI.get_is_a_snapshot", &[s(&snap)]),
        Value::Bool(true)
    );
    assert_eq!(api.text("VDI.get_snapshot_of", &[s(&snap)]), vdi);
    let not_allowed = format!("VDI is a snapshot: {snap}");
    for m in ["VDI.enable_cbt", "VDI.disable_cbt"] {
        assert_error(
            &api.err(m, &[s(&snap)]),
            "OPERATION_NOT_ALLOWED",
            &[&not_allowed],
        );
    }
    // A snapshot of a non-CBT VDI has CBT off.
    api.ok("VDI.disable_cbt", &[s(&vdi)]);
    api.ok("VDI.disable_cbt", &[s(&vdi)]);
    let plain = api.text(
        "VDI.snapshot",
        &[s(&vdi), Value::Struct(Default::default())],
    );
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&plain)]),
        Value::Bool(false)
    );
    // on_boot=reset.
    api.ok("VDI.set_on_boot", &[s(&vdi), s("reset")]);
    assert_error(
        &api.err("VDI.enable_cbt", &[s(&vdi)]),
        "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
        &[],
    );
    api.ok("VDI.set_on_boot", &[s(&vdi), s("persist")]);
    // A type other than user/system.
    let sr = api.text("VDI.get_SR", &[s(&vdi)]);
    let mut rec = std::collections::BTreeMap::new();
    rec.insert("SR".to_string(), s(&sr));
    rec.insert("virtual_size".to_string(), s("1048576"));
    rec.insert("type".to_string(), s("suspend"));
    rec.insert("sharable".to_string(), Value::Bool(false));
    rec.insert("read_only".to_string(), Value::Bool(false));
    rec.insert(
        "other_config".to_string(),
        Value::Struct(Default::default()),
    );
    let suspend = api.text("VDI.create", &[Value::Struct(rec.clone())]);
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&suspend)]),
        Value::Bool(false)
    );
    assert_error(
        &api.err("VDI.enable_cbt", &[s(&suspend)]),
        "VDI_INCOMPATIBLE_TYPE",
        &[&suspend, "suspend"],
    );
    // VDI.create refuses cbt_metadata and wants its required fields.
    rec.insert("type".to_string(), s("cbt_metadata"));
    assert_error(
        &api.err("VDI.create", &[Value::Struct(rec.clone())]),
        "VDI_INCOMPATIBLE_TYPE",
        &["", "cbt_metadata"],
    );
    rec.remove("sharable");
    rec.insert("type".to_string(), s("user"));
    assert_eq!(
        api.err("VDI.create", &[Value::Struct(rec)]).code,
        "FIELD_TYPE_ERROR"
    );
    // cbt_enabled blocks set_on_boot.
    api.ok("VDI.enable_cbt", &[s(&vdi)]);
    assert_error(
        &api.err("VDI.set_on_boot", &[s(&vdi), s("reset")]),
        "VDI_CBT_ENABLED",
        &[&vdi],
    );
}

// ------------------------------------------------------- list_changed_blocks

fn lcb(api: &Api, from: &str, to: &str) -> Result<Value, ApiError> {
    api.call("VDI.list_changed_blocks", &[s(from), s(to)])
}

#[test]
fn sim_list_changed_blocks_follows_the_chain() {
    let sim = start();
    let api = Api::login(&sim);
    let size = 3 * MIB + 5; // 49 blocks, the last partial: 7 bytes of bitmap
    let (_, vdi) = cbt_disk(&api, size);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    sim.guest_write(&uuid, 0, b"before the base").unwrap();
    let base = api.text("VDI.snapshot", &[s(&vdi)]);
    // Writes across block edges and into the partial last block.
    sim.guest_write(&uuid, BS - 1, &[1, 2]).unwrap();
    sim.guest_write(&uuid, 10 * BS, &vec![7u8; 3 * BS as usize])
        .unwrap();
    sim.guest_write(&uuid, size - 1, &[9]).unwrap();
    let first = vec![0, 1, 10, 11, 12, 48];
    // The leaf (not attached) can be vdi_to.
    assert_eq!(
        lcb(&api, &base, &vdi).unwrap(),
        s(&bitmap_base64(size, &first))
    );
    let s1 = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        lcb(&api, &base, &s1).unwrap(),
        s(&bitmap_base64(size, &first))
    );
    assert_eq!(lcb(&api, &s1, &vdi).unwrap(), s(&bitmap_base64(size, &[])));
    sim.guest_write(&uuid, 20 * BS + 5, b"x").unwrap();
    let s2 = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(lcb(&api, &s1, &s2).unwrap(), s(&bitmap_base64(size, &[20])));
    let mut both = first.clone();
    both.push(20);
    assert_eq!(
        lcb(&api, &base, &s2).unwrap(),
        s(&bitmap_base64(size, &both))
    );
    // Wrong order, the same VDI twice, unrelated VDIs.
    assert_error(
        &lcb(&api, &s2, &s1).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &unrelated(),
    );
    assert_error(
        &lcb(&api, &s1, &s1).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &["", "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are same]", ""],
    );
    let other = sim.create_vm_with_disks("other", &[size]).unwrap().disks[0]
        .vdi_ref
        .clone();
    assert_error(
        &lcb(&api, &base, &other).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &unrelated(),
    );
    // Destroying the middle snapshot keeps the chain; its bits move on.
    api.ok("VDI.destroy", &[s(&s1)]);
    assert_eq!(
        lcb(&api, &base, &s2).unwrap(),
        s(&bitmap_base64(size, &both))
    );
    assert_error(
        &api.err("VDI.get_uuid", &[s(&s1)]),
        "HANDLE_INVALID",
        &["VDI", &s1],
    );
    // disable_cbt breaks it for good, even after re-enabling.
    api.ok("VDI.disable_cbt", &[s(&vdi)]);
    assert_error(
        &lcb(&api, &s2, &vdi).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &unrelated(),
    );
    api.ok("VDI.enable_cbt", &[s(&vdi)]);
    let s3 = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_error(
        &lcb(&api, &s2, &s3).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &unrelated(),
    );
    // The snapshots of the old set still compare among themselves.
    assert_eq!(
        lcb(&api, &base, &s2).unwrap(),
        s(&bitmap_base64(size, &both))
    );
}

#[test]
fn sim_system_disable_breaks_the_chain() {
    let sim = start();
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, MIB);
    let base = api.text("VDI.snapshot", &[s(&vdi)]);
    sim.system_disable_cbt(&vdi).unwrap();
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&vdi)]),
        Value::Bool(false)
    );
    let next = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&next)]),
        Value::Bool(false)
    );
    assert_error(
        &lcb(&api, &base, &next).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &unrelated(),
    );
    // The same through the RPC hook.
    api.ok("VDI.enable_cbt", &[s(&vdi)]);
    let again = api.text("VDI.snapshot", &[s(&vdi)]);
    api.ok("sim.system_disable_cbt", &[s(&vdi)]);
    assert_error(
        &lcb(&api, &again, &vdi).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &unrelated(),
    );
}

#[test]
fn sim_attached_vdi_to_is_in_use_except_on_snapshot_vms() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, MIB);
    let base = api.text("VDI.snapshot", &[s(&vdi)]);
    api.ok(
        "VM.start",
        &[s(&vm), Value::Bool(false), Value::Bool(false)],
    );
    assert_error(
        &lcb(&api, &base, &vdi).unwrap_err(),
        "VDI_IN_USE",
        &[&vdi, "list_changed_blocks"],
    );
    assert_error(
        &api.err("VDI.destroy", &[s(&vdi)]),
        "VDI_IN_USE",
        &[&vdi, "destroy"],
    );
    // enable/disable are live operations: attachment does not block them.
    api.ok("VDI.enable_cbt", &[s(&vdi)]);
    // A checkpoint's VBDs are attached, yet its VDIs can be vdi_to.
    let cp = api.text("VM.checkpoint", &[s(&vm), s("cp")]);
    let cp_vbd = api.ok("VM.get_VBDs", &[s(&cp)]).as_array().unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        api.ok("VBD.get_currently_attached", &[s(&cp_vbd)]),
        Value::Bool(true)
    );
    let cp_vdi = api.text("VBD.get_VDI", &[s(&cp_vbd)]);
    assert!(lcb(&api, &base, &cp_vdi).is_ok());
    // A leftover dom0 attachment blocks it too.
    api.ok("VM.hard_shutdown", &[s(&vm)]);
    assert!(lcb(&api, &base, &vdi).is_ok());
    let vbd = sim.attach_to_dom0(&vdi).unwrap();
    assert_error(
        &lcb(&api, &base, &vdi).unwrap_err(),
        "VDI_IN_USE",
        &[&vdi, "list_changed_blocks"],
    );
    sim.detach(&vbd);
    assert!(lcb(&api, &base, &vdi).is_ok());
}

// ------------------------------------------------------------- data_destroy

#[test]
fn sim_data_destroy_rules() {
    let sim = start();
    let api = Api::login(&sim);
    let (vm, vdi) = cbt_disk(&api, 2 * MIB);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    assert_error(
        &api.err("VDI.data_destroy", &[s(&vdi)]),
        "OPERATION_NOT_ALLOWED",
        &[&format!("VDI is not a snapshot: {vdi}")],
    );
    let snap_vm = api.text("VM.snapshot", &[s(&vm), s("backup 1")]);
    let snap_vdi = {
        let vbds = api.ok("VM.get_VBDs", &[s(&snap_vm)]);
        let vbd = vbds.as_array().unwrap()[0].as_str().unwrap().to_string();
        api.text("VBD.get_VDI", &[s(&vbd)])
    };
    // The snapshot VM's VBD is still there: refused after the wait.
    let started = Instant::now();
    assert_error(
        &api.err("VDI.data_destroy", &[s(&snap_vdi)]),
        "VDI_IN_USE",
        &[&snap_vdi, "data_destroy"],
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "data_destroy did not wait for the VBD"
    );
    assert_eq!(api.text("VDI.get_type", &[s(&snap_vdi)]), "user");
    api.ok("VM.destroy", &[s(&snap_vm)]);
    assert_error(
        &api.err("VM.get_uuid", &[s(&snap_vm)]),
        "HANDLE_INVALID",
        &["VM", &snap_vm],
    );
    // VM.destroy keeps the VDIs.
    assert_eq!(
        api.ok("VDI.get_VBDs", &[s(&snap_vdi)]),
        Value::Array(vec![])
    );
    api.ok("VDI.data_destroy", &[s(&snap_vdi)]);
    api.ok("VDI.data_destroy", &[s(&snap_vdi)]);
    assert_eq!(api.text("VDI.get_type", &[s(&snap_vdi)]), "cbt_metadata");
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&snap_vdi)]),
        Value::Bool(true)
    );
    assert_eq!(
        api.ok("VDI.get_is_a_snapshot", &[s(&snap_vdi)]),
        Value::Bool(true)
    );
    assert_eq!(
        api.ok("VDI.get_virtual_size", &[s(&snap_vdi)]),
        Value::Int(2 * MIB as i64)
    );
    let oc = api.ok("VDI.get_other_config", &[s(&snap_vdi)]);
    assert_eq!(
        oc.as_struct().unwrap()["content_id"],
        s("/No content: this is a cbt_metadata VDI/")
    );
    // A cbt_metadata VDI: no NBD, no snapshot, no VBD, no CBT toggling...
    let md = [snap_vdi.as_str(), "cbt_metadata"];
    assert_error(
        &api.err("VDI.get_nbd_info", &[s(&snap_vdi)]),
        "VDI_INCOMPATIBLE_TYPE",
        &md,
    );
    assert_error(
        &api.err("VDI.snapshot", &[s(&snap_vdi)]),
        "VDI_INCOMPATIBLE_TYPE",
        &md,
    );
    assert_error(
        &api.err("VDI.enable_cbt", &[s(&snap_vdi)]),
        "VDI_INCOMPATIBLE_TYPE",
        &md,
    );
    let mut vbd = std::collections::BTreeMap::new();
    vbd.insert("VM".to_string(), s(&vm));
    vbd.insert("VDI".to_string(), s(&snap_vdi));
    vbd.insert("mode".to_string(), s("RO"));
    assert_error(
        &api.err("VBD.create", &[Value::Struct(vbd)]),
        "VDI_INCOMPATIBLE_TYPE",
        &md,
    );
    // ...but a valid end of list_changed_blocks, both ways.
    sim.guest_write(&uuid, 5 * BS, b"after").unwrap();
    let next = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_eq!(
        lcb(&api, &snap_vdi, &next).unwrap(),
        s(&bitmap_base64(2 * MIB, &[5]))
    );
    api.ok("VDI.data_destroy", &[s(&next)]);
    assert_eq!(
        lcb(&api, &snap_vdi, &next).unwrap(),
        s(&bitmap_base64(2 * MIB, &[5]))
    );
    // Without CBT there is no metadata to keep.
    api.ok("VDI.disable_cbt", &[s(&vdi)]);
    let plain = api.text("VDI.snapshot", &[s(&vdi)]);
    assert_error(
        &api.err("VDI.data_destroy", &[s(&plain)]),
        "VDI_NO_CBT_METADATA",
        &[&plain],
    );
    // Destroying metadata VDIs is allowed.
    api.ok("VDI.destroy", &[s(&snap_vdi)]);
}

#[test]
fn sim_vm_snapshot_covers_every_disk() {
    let sim = start();
    let api = Api::login(&sim);
    let vm = sim
        .create_vm_with_disks("two disks", &[MIB, 2 * MIB])
        .unwrap();
    for d in &vm.disks {
        api.ok("VDI.enable_cbt", &[s(&d.vdi_ref)]);
    }
    sim.guest_write(&vm.disks[1].vdi_uuid, 0, b"data").unwrap();
    let snap = api.text(
        "VM.snapshot",
        &[s(&vm.vm_ref), s("snap"), Value::Array(vec![])],
    );
    let rec = api.ok("VM.get_record", &[s(&snap)]);
    let rec = rec.as_struct().unwrap();
    assert_eq!(rec["is_a_snapshot"], Value::Bool(true));
    assert_eq!(rec["snapshot_of"], s(&vm.vm_ref));
    let vbds = rec["VBDs"].as_array().unwrap();
    assert_eq!(vbds.len(), 2);
    for vbd in vbds {
        let vdi = api.text("VBD.get_VDI", std::slice::from_ref(vbd));
        assert_eq!(api.ok("VDI.get_cbt_enabled", &[s(&vdi)]), Value::Bool(true));
        let of = api.text("VDI.get_snapshot_of", &[s(&vdi)]);
        let size = api.ok("VDI.get_virtual_size", &[s(&vdi)]);
        assert_eq!(size, api.ok("VDI.get_virtual_size", &[s(&of)]));
    }
    assert_eq!(
        sim.read_vdi(&vm.disks[1].vdi_uuid, 0, 4).unwrap(),
        b"data".to_vec()
    );
    // ignore_vdis leaves a disk out.
    let snap2 = api.text(
        "VM.snapshot",
        &[
            s(&vm.vm_ref),
            s("snap2"),
            Value::Array(vec![s(&vm.disks[0].vdi_ref)]),
        ],
    );
    assert_eq!(
        api.ok("VM.get_VBDs", &[s(&snap2)])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn sim_nbd_info_and_networks() {
    let sim = start();
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, MIB);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    let info = api.ok("VDI.get_nbd_info", &[s(&vdi)]);
    let info = info.as_array().unwrap();
    assert_eq!(info.len(), 1);
    let rec = info[0].as_struct().unwrap();
    assert_eq!(
        rec["exportname"],
        s(&format!("/{uuid}?session_id={}", api.session))
    );
    assert_eq!(rec["address"], s("127.0.0.1"));
    assert_eq!(rec["port"], Value::Int(sim.nbd_port() as i64));
    assert_eq!(rec["cert"], s(sim.certificate_pem()));
    assert_eq!(rec["subject"], s("localhost"));
    assert_eq!(rec.len(), 5);
    // Without an NBD network: [] rather than an error.
    let nets = api.ok("network.get_all_records", &[]);
    let (nbd_net, _) = nets
        .as_struct()
        .unwrap()
        .iter()
        .find(|(_, n)| n.as_struct().unwrap()["purpose"] == Value::Array(vec![s("nbd")]))
        .expect("an NBD network");
    assert_error(
        &api.err("network.add_purpose", &[s(nbd_net), s("insecure_nbd")]),
        "NETWORK_INCOMPATIBLE_PURPOSES",
        &["insecure_nbd", "nbd"],
    );
    api.ok("network.remove_purpose", &[s(nbd_net), s("nbd")]);
    assert_eq!(api.ok("VDI.get_nbd_info", &[s(&vdi)]), Value::Array(vec![]));
    api.ok("network.add_purpose", &[s(nbd_net), s("nbd")]);
    assert_eq!(
        api.ok("VDI.get_nbd_info", &[s(&vdi)])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn sim_legacy_host_has_no_cbt() {
    let sim = start_with(SimOptions {
        legacy_host: true,
        ..SimOptions::default()
    });
    let api = Api::login(&sim);
    let vm = sim.create_vm_with_disks("old", &[MIB]).unwrap();
    let vdi = &vm.disks[0].vdi_ref;
    for m in [
        "VDI.get_cbt_enabled",
        "VDI.enable_cbt",
        "VDI.disable_cbt",
        "VDI.data_destroy",
        "VDI.get_nbd_info",
    ] {
        assert_error(&api.err(m, &[s(vdi)]), "MESSAGE_METHOD_UNKNOWN", &[m]);
    }
    assert_error(
        &api.err("VDI.list_changed_blocks", &[s(vdi), s(vdi)]),
        "MESSAGE_METHOD_UNKNOWN",
        &["VDI.list_changed_blocks"],
    );
    let rec = api.ok("VDI.get_record", &[s(vdi)]);
    assert!(!rec.as_struct().unwrap().contains_key("cbt_enabled"));
    // Turned off again at run time, CBT is back.
    sim.set_faults(|f| f.legacy_host = false);
    api.ok("VDI.enable_cbt", &[s(vdi)]);
}

#[test]
fn sim_async_tasks_slow_and_cancelled() {
    let sim = start();
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, MIB);
    let wait = |task: &str| {
        let start = Instant::now();
        loop {
            let status = api.text("task.get_status", &[s(task)]);
            if status != "pending" && status != "cancelling" {
                return status;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "task stuck");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let task = api.text("Async.VDI.snapshot", &[s(&vdi)]);
    assert_eq!(wait(&task), "success");
    let result = api.text("task.get_result", &[s(&task)]);
    assert!(
        result.starts_with("<value>OpaqueRef:") && result.ends_with("</value>"),
        "{result}"
    );
    let snap = &result[7..result.len() - 8];
    assert_eq!(
        api.ok("VDI.get_is_a_snapshot", &[s(snap)]),
        Value::Bool(true)
    );
    // A failing call fails its task with the error.
    let task = api.text("Async.VDI.data_destroy", &[s(&vdi)]);
    assert_eq!(wait(&task), "failure");
    assert_eq!(
        api.ok("task.get_error_info", &[s(&task)]),
        Value::strings([
            "OPERATION_NOT_ALLOWED".to_string(),
            format!("VDI is not a snapshot: {vdi}")
        ])
    );
    // Slow tasks stay pending; a cancel lands.
    api.ok("sim.set_fault", &[s("task_delay_ms"), s("400")]);
    let task = api.text("Async.VDI.snapshot", &[s(&vdi)]);
    assert_eq!(api.text("task.get_status", &[s(&task)]), "pending");
    api.ok("task.cancel", &[s(&task)]);
    assert_eq!(wait(&task), "cancelled");
    assert_eq!(
        api.ok("task.get_error_info", &[s(&task)]),
        Value::strings(["TASK_CANCELLED", task.as_str()])
    );
    assert_error(
        &api.err("Async.VDI.get_nbd_info", &[s(&vdi)]),
        "MESSAGE_METHOD_UNKNOWN",
        &["Async.VDI.get_nbd_info"],
    );
}

// -------------------------------------------------- property: the CBT algebra

#[derive(Debug, Clone)]
enum Op {
    /// A guest write of `len` bytes at `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Snapshot,
    /// Destroy the n-th snapshot taken (modulo), if still there.
    Destroy(usize),
    /// data_destroy the n-th snapshot (modulo).
    DataDestroy(usize),
}

const PROP_SIZE: u64 = 40 * BS - 1000;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PROP_SIZE, 1u64..200_000).prop_map(|(offset, len)| Op::Write {
            offset,
            len: len.min(PROP_SIZE - offset)
        }),
        2 => Just(Op::Snapshot),
        1 => (0usize..16).prop_map(Op::Destroy),
        1 => (0usize..16).prop_map(Op::DataDestroy),
    ]
}

fn blocks_of(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    offset / BS..=(offset + len - 1) / BS
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// For any history of writes, snapshots, destroys and data_destroys,
    /// list_changed_blocks(a, b) marks exactly the blocks written between
    /// snapshot a and b (or the leaf), and refuses the wrong order.
    #[test]
    fn sim_cbt_bitmaps_cover_exactly_the_writes(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::new(HostConfig {
            username: "root".into(),
            password: "pw".into(),
            hostname: "localhost".into(),
            nbd_address: "127.0.0.1".into(),
            nbd_port: 10809,
            certificate_pem: String::new(),
            data_dir: dir.path().to_path_buf(),
            data_destroy_wait_ms: 0,
        });
        let sr = st.default_sr.clone();
        let leaf = st.vdi_create(NewVdi::user("disk", sr, PROP_SIZE)).unwrap();
        st.enable_cbt(&leaf).unwrap();
        // snaps[i] = (ref, alive, blocks written between snapshot i-1 and i)
        let mut snaps: Vec<(String, bool, BTreeSet<u64>)> = Vec::new();
        let mut pending: BTreeSet<u64> = BTreeSet::new();
        for op in &ops {
            match *op {
                Op::Write { offset, len } => {
                    st.write_vdi(&leaf, offset, &vec![0xA5; len as usize]).unwrap();
                    pending.extend(blocks_of(offset, len));
                }
                Op::Snapshot => {
                    let r = st.vdi_snapshot(&leaf).unwrap();
                    snaps.push((r, true, std::mem::take(&mut pending)));
                }
                Op::Destroy(n) if !snaps.is_empty() => {
                    let i = n % snaps.len();
                    if snaps[i].1 {
                        st.vdi_destroy(&snaps[i].0).unwrap();
                        snaps[i].1 = false;
                    }
                }
                Op::DataDestroy(n) if !snaps.is_empty() => {
                    let i = n % snaps.len();
                    if snaps[i].1 {
                        prop_assert!(!st.data_destroy_precheck(&snaps[i].0).unwrap() || st.vdi(&snaps[i].0).unwrap().vdi_type == "cbt_metadata");
                        st.data_destroy_finish(&snaps[i].0).unwrap();
                    }
                }
                _ => {}
            }
        }
        let expected = |a: usize, b: Option<usize>| -> Vec<u64> {
            let end = b.map(|b| b + 1).unwrap_or(snaps.len());
            let mut set: BTreeSet<u64> = snaps[a + 1..end].iter().flat_map(|s| s.2.iter().copied()).collect();
            if b.is_none() {
                set.extend(pending.iter().copied());
            }
            set.into_iter().collect()
        };
        for a in 0..snaps.len() {
            if !snaps[a].1 {
                continue;
            }
            let got = st.list_changed_blocks(&snaps[a].0, &leaf).unwrap();
            prop_assert_eq!(got, bitmap_base64(PROP_SIZE, &expected(a, None)));
            for b in 0..snaps.len() {
                if !snaps[b].1 || a == b {
                    continue;
                }
                let got = st.list_changed_blocks(&snaps[a].0, &snaps[b].0);
                if a < b {
                    prop_assert_eq!(got.unwrap(), bitmap_base64(PROP_SIZE, &expected(a, Some(b))));
                } else {
                    prop_assert_eq!(got.unwrap_err().code, "SR_BACKEND_FAILURE_460");
                }
            }
        }
    }
}

// ------------------------------------------------------------ the wire (HTTPS)

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the simulator, its certificate pinned.
fn connect(sim: &Simulator) -> Tls {
    let (config, name) = client_config(&TlsOptions {
        trust: Trust::PinnedPem(sim.certificate_pem().as_bytes().to_vec()),
        server_name: "localhost".into(),
        client: None,
    })
    .expect("tls config");
    let conn = rustls::ClientConnection::new(config, name).expect("tls client");
    let tcp = TcpStream::connect(sim.https_address()).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (the connection closes after it) and reads the
/// response to the end.
fn request(
    sim: &Simulator,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut tls = connect(sim);
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).unwrap();
    tls.write_all(body).unwrap();
    tls.flush().unwrap();
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw)
        .expect("read the response to the end");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let text = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: raw[end..].to_vec(),
    }
}

fn post(sim: &Simulator, path: &str, content_type: &str, body: &[u8]) -> Response {
    let len = body.len().to_string();
    request(
        sim,
        "POST",
        path,
        &[("Content-Type", content_type), ("Content-Length", &len)],
        body,
    )
}

fn xml_call(sim: &Simulator, method: &str, params: &[Value]) -> Result<Value, ApiError> {
    let body = xmlrpc::encode_call(method, params);
    let r = post(sim, "/", "text/xml", body.as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("text/xml"));
    let v = xmlrpc::decode_response(&r.body).expect("a methodResponse");
    xmlrpc::status_result(v).expect("a Status struct")
}

fn json_call(sim: &Simulator, body: serde_json::Value) -> serde_json::Value {
    let r = post(
        sim,
        "/jsonrpc",
        "application/json",
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_slice(&r.body).expect("JSON")
}

#[test]
fn sim_xmlrpc_wire_forms() {
    let sim = start();
    let vm = sim.create_vm_with_disks("wire", &[10 * MIB]).unwrap();
    let session = xml_call(
        &sim,
        "session.login_with_password",
        &[s(sim.username()), s(sim.password())],
    )
    .unwrap();
    let session = session.as_str().unwrap().to_string();
    assert!(session.starts_with("OpaqueRef:"));
    // The raw body: untagged strings, ints as strings, Status first.
    let body = xmlrpc::encode_call(
        "VDI.get_virtual_size",
        &[s(&session), s(&vm.disks[0].vdi_ref)],
    );
    let r = post(&sim, "/RPC2", "text/xml", body.as_bytes());
    assert_eq!(
        String::from_utf8(r.body.clone()).unwrap(),
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>10485760</value></member></struct></value></param></params></methodResponse>"
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let rec = xml_call(
        &sim,
        "VDI.get_record",
        &[s(&session), s(&vm.disks[0].vdi_ref)],
    )
    .unwrap();
    let rec = rec.as_struct().unwrap();
    assert_eq!(rec["virtual_size"], s("10485760"));
    assert_eq!(
        rec["snapshot_time"],
        Value::DateTime("19700101T00:00:00Z".into())
    );
    assert_eq!(rec["cbt_enabled"], Value::Bool(false));
    assert_eq!(rec["type"], s("user"));
    // void is an empty string.
    assert_eq!(
        xml_call(
            &sim,
            "VDI.enable_cbt",
            &[s(&session), s(&vm.disks[0].vdi_ref)]
        ),
        Ok(s(""))
    );
    // A failure is a success methodResponse with Status Failure.
    let e = xml_call(&sim, "VDI.get_uuid", &[s("OpaqueRef:nope"), s("x")]).unwrap_err();
    assert_error(&e, "SESSION_INVALID", &["OpaqueRef:nope"]);
    // Malformed XML-RPC: HTTP 500 with an HTML page.
    let r = post(
        &sim,
        "/",
        "text/xml",
        b"<?xml version=\"1.0\"?><methodCall><methodName>session.logout</methodName></methodCall>",
    );
    assert_eq!(r.status, 500);
    assert_eq!(r.header("content-type"), Some("text/html"));
    // A session from XML-RPC works on JSON-RPC.
    let v = json_call(
        &sim,
        serde_json::json!({"jsonrpc": "2.0", "method": "VDI.get_virtual_size", "params": [session, vm.disks[0].vdi_ref], "id": 7}),
    );
    assert_eq!(
        v,
        serde_json::json!({"jsonrpc": "2.0", "result": 10485760, "id": 7})
    );
}

#[test]
fn sim_jsonrpc_wire_forms() {
    let sim = start();
    let v = json_call(
        &sim,
        serde_json::json!({"method": "session.login_with_password", "params": ["root", "bad"], "id": "a"}),
    );
    assert_eq!(
        v,
        serde_json::json!({"result": null, "error": ["SESSION_AUTHENTICATION_FAILED"], "id": "a"})
    );
    let v = json_call(
        &sim,
        serde_json::json!({"jsonrpc": "2.0", "method": "session.login_with_password", "params": [sim.username(), sim.password()], "id": 1}),
    );
    let session = v["result"].as_str().unwrap().to_string();
    let v = json_call(
        &sim,
        serde_json::json!({"jsonrpc": "2.0", "method": "VDI.get_by_uuid", "params": [session, "nope"], "id": 2}),
    );
    assert_eq!(
        v,
        serde_json::json!({"jsonrpc": "2.0", "error": {"code": 1, "message": "UUID_INVALID", "data": ["VDI", "nope"]}, "id": 2})
    );
    let v = json_call(
        &sim,
        serde_json::json!({"jsonrpc": "2.0", "method": "session.logout", "params": [session], "id": 3}),
    );
    assert_eq!(
        v,
        serde_json::json!({"jsonrpc": "2.0", "result": "", "id": 3})
    );
    let v = json_call(
        &sim,
        serde_json::json!({"jsonrpc": "2.0", "method": "VDI.get_all", "params": [session], "id": 4}),
    );
    assert_eq!(v["error"]["message"], "SESSION_INVALID");
    // No params: malformed, HTTP 500.
    let r = post(
        &sim,
        "/jsonrpc",
        "application/json",
        br#"{"jsonrpc": "2.0", "method": "session.login_with_password", "id": 0}"#,
    );
    assert_eq!(r.status, 500);
    // An old host has no /jsonrpc at all.
    sim.set_faults(|f| f.legacy_host = true);
    let r = post(
        &sim,
        "/jsonrpc",
        "application/json",
        br#"{"method": "x", "params": [], "id": 1}"#,
    );
    assert_eq!(r.status, 404);
}

fn login_xml(sim: &Simulator) -> String {
    xml_call(
        sim,
        "session.login_with_password",
        &[s(sim.username()), s(sim.password())],
    )
    .unwrap()
    .as_str()
    .unwrap()
    .to_string()
}

#[test]
fn sim_export_and_import_raw_vdi() {
    let sim = start();
    let vm = sim.create_vm_with_disks("io", &[3 * MIB]).unwrap();
    let uuid = vm.disks[0].vdi_uuid.clone();
    let data = random_bytes(1, 0, (3 * MIB) as usize);
    sim.guest_write(&uuid, 0, &data).unwrap();
    let session = login_xml(&sim);
    // Export: raw, task-id, no Content-Length, ends at close.
    let r = request(
        &sim,
        "GET",
        &format!("/export_raw_vdi?session_id={session}&vdi={uuid}&format=raw"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(r.header("task-id").unwrap().starts_with("OpaqueRef:"));
    assert_eq!(r.header("content-length"), None);
    assert_eq!(
        r.header("content-disposition"),
        Some(format!("attachment; filename=\"{uuid}.raw\"").as_str())
    );
    assert!(r.body == data, "exported bytes differ");
    // Without a session: 401.
    let r = request(
        &sim,
        "GET",
        &format!("/export_raw_vdi?vdi={uuid}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 401);
    // Basic auth works too (a temporary session).
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        sim.username(),
        sim.password()
    ));
    let auth = format!("Basic {basic}");
    let r = request(
        &sim,
        "GET",
        &format!("/export_raw_vdi?vdi={uuid}"),
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), data.len());
    // Import raw into the existing VDI under the caller's task.
    let task = xml_call(&sim, "task.create", &[s(&session), s("import"), s("")]).unwrap();
    let task = task.as_str().unwrap().to_string();
    let new = random_bytes(2, 0, MIB as usize + 7);
    let len = new.len().to_string();
    let r = request(
        &sim,
        "PUT",
        &format!("/import_raw_vdi?session_id={session}&vdi={uuid}&format=raw&task_id={task}"),
        &[("Content-Length", &len)],
        &new,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("task-id"), Some(task.as_str()));
    let status = xml_call(&sim, "task.get_status", &[s(&session), s(&task)]).unwrap();
    assert_eq!(status, s("success"));
    let result = xml_call(&sim, "task.get_result", &[s(&session), s(&task)]).unwrap();
    assert_eq!(
        result,
        s(&format!("<value>{}</value>", vm.disks[0].vdi_ref))
    );
    assert_eq!(sim.read_vdi(&uuid, 0, new.len()).unwrap(), new);
    assert_eq!(
        sim.read_vdi(&uuid, new.len() as u64, 10).unwrap(),
        data[new.len()..new.len() + 10].to_vec()
    );
    // The chunked format: two pieces, then the terminator.
    let mut body = Vec::new();
    chunked::encode_chunk(2 * MIB, b"chunk one", &mut body);
    chunked::encode_chunk(5, b"two", &mut body);
    body.extend_from_slice(&chunked::END);
    let len = body.len().to_string();
    let r = request(
        &sim,
        "PUT",
        &format!("/import_raw_vdi?session_id={session}&vdi={uuid}&chunked=true"),
        &[("Content-Length", &len)],
        &body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        sim.read_vdi(&uuid, 2 * MIB, 9).unwrap(),
        b"chunk one".to_vec()
    );
    assert_eq!(sim.read_vdi(&uuid, 5, 3).unwrap(), b"two".to_vec());
    // HTTP chunked transfer encoding is refused.
    let r = request(
        &sim,
        "PUT",
        &format!("/import_raw_vdi?session_id={session}&vdi={uuid}"),
        &[("Transfer-Encoding", "chunked")],
        b"0\r\n\r\n",
    );
    assert_eq!(r.status, 404);
    // No VDI and no SR.
    let r = request(
        &sim,
        "PUT",
        &format!("/import_raw_vdi?session_id={session}"),
        &[("Content-Length", "0")],
        b"",
    );
    assert_eq!(r.status, 400);
    // A new VDI in an SR, sized by Content-Length.
    let srs = xml_call(&sim, "SR.get_all", &[s(&session)]).unwrap();
    let sr = srs.as_array().unwrap()[0].as_str().unwrap().to_string();
    let r = request(
        &sim,
        "PUT",
        &format!("/import_raw_vdi?session_id={session}&sr_id={sr}"),
        &[("Content-Length", "131072")],
        &vec![3u8; 131072],
    );
    assert_eq!(r.status, 200);
    let names = xml_call(
        &sim,
        "VDI.get_by_name_label",
        &[s(&session), s("Imported VDI")],
    )
    .unwrap();
    let imported = names.as_array().unwrap()[0].as_str().unwrap().to_string();
    assert_eq!(
        xml_call(&sim, "VDI.get_virtual_size", &[s(&session), s(&imported)]).unwrap(),
        s("131072")
    );
    // Nothing stays attached to dom0 after the handlers.
    assert_eq!(sim.dom0_attachments(), 0);
}

#[test]
fn sim_export_and_import_metadata() {
    let sim = start();
    let vm = sim.create_vm_with_disks("meta", &[MIB, 2 * MIB]).unwrap();
    let session = login_xml(&sim);
    xml_call(
        &sim,
        "VM.snapshot",
        &[s(&session), s(&vm.vm_ref), s("snap")],
    )
    .unwrap();
    let r = request(
        &sim,
        "GET",
        &format!(
            "/export_metadata?session_id={session}&uuid={}&export_snapshots=false",
            vm.vm_uuid
        ),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"export.xva\"")
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert!(r.header("task-id").unwrap().starts_with("OpaqueRef:"));
    let ova = sim::metadata::tar_find(&r.body, "ova.xml").expect("ova.xml in the tar");
    let doc = xmlrpc::decode_value_document(&ova).unwrap();
    let objects = doc.as_struct().unwrap()["objects"]
        .as_array()
        .unwrap()
        .to_vec();
    let classes: Vec<&str> = objects
        .iter()
        .map(|o| o.as_struct().unwrap()["class"].as_str().unwrap())
        .collect();
    assert_eq!(
        classes.iter().filter(|c| **c == "VM").count(),
        1,
        "{classes:?}"
    );
    assert_eq!(classes.iter().filter(|c| **c == "VBD").count(), 2);
    assert_eq!(classes.iter().filter(|c| **c == "VDI").count(), 2);
    // No live reference leaks into the export.
    assert!(!String::from_utf8_lossy(&ova).contains(&vm.vm_ref));
    // With snapshots (the default): the snapshot VM too.
    let r = request(
        &sim,
        "GET",
        &format!("/export_metadata?session_id={session}&uuid={}", vm.vm_uuid),
        &[],
        b"",
    );
    let ova_all = sim::metadata::tar_find(&r.body, "ova.xml").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ova_all)
            .matches("<value>VM</value>")
            .count(),
        2
    );
    assert!(String::from_utf8_lossy(&ova_all).contains("<value>snap</value>"));
    // Import onto a new disk for the first VDI; the second by its uuid.
    let new = sim.create_vm_with_disks("target", &[MIB]).unwrap().disks[0].clone();
    let task = xml_call(&sim, "task.create", &[s(&session), s("import_vm"), s("")]).unwrap();
    let task = task.as_str().unwrap().to_string();
    let map = format!("vdi:{}={}", vm.disks[0].vdi_uuid, new.vdi_uuid);
    let body = sim::metadata::tar_single("ova.xml", &ova);
    let len = body.len().to_string();
    let put = request(
        &sim,
        "PUT",
        &format!("/import_metadata?session_id={session}&task_id={task}&{map}"),
        &[("Content-Length", &len)],
        &body,
    );
    assert_eq!(put.status, 200);
    let status = xml_call(&sim, "task.get_status", &[s(&session), s(&task)]).unwrap();
    assert_eq!(
        status,
        s("success"),
        "{:?}",
        xml_call(&sim, "task.get_error_info", &[s(&session), s(&task)])
    );
    let result = xml_call(&sim, "task.get_result", &[s(&session), s(&task)]).unwrap();
    let result = result.as_str().unwrap().to_string();
    let start = result.find("OpaqueRef:").expect("a VM ref in the result");
    let new_vm = &result[start..start + 46];
    assert_eq!(
        xml_call(&sim, "VM.get_name_label", &[s(&session), s(new_vm)]).unwrap(),
        s("meta")
    );
    let vbds = xml_call(&sim, "VM.get_VBDs", &[s(&session), s(new_vm)]).unwrap();
    let mut vdis: Vec<String> = vbds
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            xml_call(&sim, "VBD.get_VDI", &[s(&session), b.clone()])
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    vdis.sort();
    let mut expect = vec![new.vdi_ref.clone(), vm.disks[1].vdi_ref.clone()];
    expect.sort();
    assert_eq!(vdis, expect);
}

#[test]
fn sim_guest_write_over_http() {
    let sim = start();
    let vm = sim.create_vm_with_disks("gw", &[MIB]).unwrap();
    let uuid = &vm.disks[0].vdi_uuid;
    let session = login_xml(&sim);
    let r = request(
        &sim,
        "PUT",
        &format!("/sim/guest_write?session_id={session}&vdi={uuid}&offset=70000"),
        &[("Content-Length", "5")],
        b"hello",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(sim.read_vdi(uuid, 70000, 5).unwrap(), b"hello".to_vec());
    let r = request(
        &sim,
        "PUT",
        &format!(
            "/sim/guest_write?session_id={session}&vdi={uuid}&offset={}",
            MIB - 2
        ),
        &[("Content-Length", "5")],
        b"hello",
    );
    assert_eq!(r.status, 400);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["ErrorDescription"][0], "VDI_IO_ERROR");
}

// ------------------------------------------------------------------------ NBD

/// Connection settings from one `get_nbd_info` record, as a client uses them.
fn nbd_options(sim: &Simulator, info: &Value) -> ConnectOptions {
    let rec = info.as_struct().unwrap();
    let text = |k: &str| rec[k].as_str().unwrap().to_string();
    assert_eq!(text("address"), "127.0.0.1");
    assert_eq!(rec["port"].as_int(), Some(sim.nbd_port() as i64));
    ConnectOptions {
        address: Address::Tcp {
            host: text("address"),
            port: rec["port"].as_int().unwrap() as u16,
        },
        export: text("exportname"),
        tls: Some(TlsOptions {
            trust: Trust::PinnedPem(text("cert").into_bytes()),
            server_name: text("subject"),
            client: None,
        }),
        meta_contexts: Vec::new(),
        timeout: Duration::from_secs(10),
    }
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sim_nbd_serves_snapshots_like_xapi_nbd() {
    let sim = start();
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, 4 * MIB);
    let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
    let data = random_bytes(3, 0, (4 * MIB) as usize);
    sim.guest_write(&uuid, 0, &data).unwrap();
    let base = api.text("VDI.snapshot", &[s(&vdi)]);
    sim.guest_write(&uuid, 2 * BS, &[0u8; 10]).unwrap();
    let snap = api.text("VDI.snapshot", &[s(&vdi)]);
    let info = api.ok("VDI.get_nbd_info", &[s(&snap)]);
    let options = nbd_options(&sim, &info.as_array().unwrap()[0]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = Connection::open(&options)
            .await
            .expect("NBD connect with the pinned cert");
        assert!(conn.negotiated.used_export_name, "xapi-nbd refuses GO");
        assert_eq!(conn.size_bytes(), 4 * MIB);
        let head = conn.read(0, 3 * BS as u32).await.unwrap();
        let mut expect = data[..3 * BS as usize].to_vec();
        expect[2 * BS as usize..2 * BS as usize + 10].fill(0);
        assert!(head == expect, "NBD bytes differ from the snapshot");
        // Unaligned reads: EINVAL (512-byte units).
        assert!(conn.read(1, 512).await.is_err());
        // While open: a dom0 VBD, so vdi_to is in use.
        assert_eq!(sim.dom0_attachments(), 1);
        assert_error(
            &lcb(&api, &base, &snap).unwrap_err(),
            "VDI_IN_USE",
            &[&snap, "list_changed_blocks"],
        );
        conn.close().await;
    });
    wait_until("the dom0 VBD to go", || sim.dom0_attachments() == 0);
    assert_eq!(
        lcb(&api, &base, &snap).unwrap(),
        s(&bitmap_base64(4 * MIB, &[2]))
    );
    // A bad session or a cbt_metadata VDI: closed without a reply.
    let mut bad = options.clone();
    bad.export = format!(
        "/{}?session_id=OpaqueRef:bogus",
        api.text("VDI.get_uuid", &[s(&snap)])
    );
    rt.block_on(async {
        assert!(Connection::open(&bad).await.is_err());
    });
    api.ok("VDI.data_destroy", &[s(&base)]);
    let mut md = options.clone();
    md.export = format!(
        "/{}?session_id={}",
        api.text("VDI.get_uuid", &[s(&base)]),
        api.session
    );
    rt.block_on(async {
        assert!(Connection::open(&md).await.is_err());
    });
    // A wrong pinned certificate fails the TLS handshake.
    let mut wrong = options.clone();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    wrong.tls = Some(TlsOptions {
        trust: Trust::PinnedPem(other.cert.pem().into_bytes()),
        server_name: "localhost".into(),
        client: None,
    });
    rt.block_on(async {
        assert!(Connection::open(&wrong).await.is_err());
    });
    // Fault: the connection drops mid-read.
    sim.set_faults(|f| f.nbd_drop_after_bytes = Some(BS));
    rt.block_on(async {
        let conn = Connection::open(&options).await.unwrap();
        assert!(conn.read(0, BS as u32).await.is_ok());
        assert!(conn.read(BS, BS as u32).await.is_err());
    });
}

#[test]
fn sim_nbd_allows_sixteen_connections() {
    let sim = start();
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, MIB);
    let snap = api.text("VDI.snapshot", &[s(&vdi)]);
    let info = api.ok("VDI.get_nbd_info", &[s(&snap)]);
    let options = nbd_options(&sim, &info.as_array().unwrap()[0]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut open = Vec::new();
        // Sequential connects, as XO does.
        for i in 0..16 {
            let conn = Connection::open(&options)
                .await
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            open.push(conn);
        }
        assert_eq!(sim.dom0_attachments(), 16);
        // The 17th is accepted and dropped: the client sees EOF.
        assert!(Connection::open(&options).await.is_err());
        open.pop().unwrap().close().await;
        wait_until("a slot to free up", || sim.dom0_attachments() == 15);
        let again = Connection::open(&options).await.expect("a free slot again");
        assert_eq!(again.read(0, 512).await.unwrap().len(), 512);
        for c in open {
            c.close().await;
        }
        again.close().await;
    });
    wait_until("every dom0 VBD to go", || sim.dom0_attachments() == 0);
}

// ------------------------------------------- the official Python binding

#[test]
fn sim_conformance_with_the_python_xenapi_binding() {
    let has_xenapi = std::process::Command::new("python3")
        .args(["-c", "import XenAPI"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_xenapi {
        let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
        assert!(
            !ci,
            "the Python XenAPI package is missing on CI (.ci/run installs it)"
        );
        eprintln!();
        eprintln!("!!! SKIPPED sim_conformance_with_the_python_xenapi_binding: python3 cannot import XenAPI");
        eprintln!("!!! install it with 'pip install XenAPI' to run the conformance script");
        eprintln!();
        return;
    }
    let sim = start();
    // A pool: a member and a shared SR, for the pool checks.
    let member = sim.add_pool_member("host2").expect("a pool member");
    sim.add_shared_sr("NFS").expect("a shared SR");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/xenapi_conformance.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(sim.url())
        .args(["--member", &format!("https://{}/", member.https)])
        .args(["--user", sim.username()])
        .env("XENAPI_CONFORMANCE_PASSWORD", sim.password())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "conformance script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("conformance: all checks passed"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("ok   pool: login on the member")
            && stdout.contains("ok   pool: export on the master redirects"),
        "the pool checks did not run:\n{stdout}"
    );
}

/// A change reaches `state.json` soon after the call, without a stop (the
/// saver gathers changes and encodes off the call's path), and a burst of
/// calls is not written once per call.
#[test]
fn sim_state_is_saved_soon_after_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_with(SimOptions {
        dir: Some(dir.path().to_path_buf()),
        ..SimOptions::default()
    });
    let api = Api::login(&sim);
    let (_, vdi) = cbt_disk(&api, 2 * MIB);
    let state = dir.path().join("state.json");
    for i in 0..50 {
        api.ok("VDI.set_name_label", &[s(&vdi), s(&format!("label {i}"))]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        if text.contains("\"label 49\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last change was not saved within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(sim);
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"clean\":true") && text.contains("\"label 49\""));
}

#[test]
fn sim_state_survives_a_restart_and_a_crash_breaks_cbt() {
    let dir = tempfile::tempdir().unwrap();
    let options = || SimOptions {
        dir: Some(dir.path().to_path_buf()),
        ..SimOptions::default()
    };
    let (vdi_uuid, snap_uuid, fingerprint) = {
        let sim = start_with(options());
        let api = Api::login(&sim);
        let (_, vdi) = cbt_disk(&api, 2 * MIB);
        let snap = api.text("VDI.snapshot", &[s(&vdi)]);
        let uuid = api.text("VDI.get_uuid", &[s(&vdi)]);
        sim.guest_write(&uuid, 3 * BS, b"kept").unwrap();
        let snap_uuid = api.text("VDI.get_uuid", &[s(&snap)]);
        (uuid, snap_uuid, sim.fingerprint().to_string())
        // dropped: a clean stop
    };
    {
        let sim = start_with(options());
        assert_eq!(sim.fingerprint(), fingerprint, "the certificate is kept");
        let api = Api::login(&sim);
        let vdi = api.text("VDI.get_by_uuid", &[s(&vdi_uuid)]);
        let snap = api.text("VDI.get_by_uuid", &[s(&snap_uuid)]);
        assert_eq!(api.ok("VDI.get_cbt_enabled", &[s(&vdi)]), Value::Bool(true));
        assert_eq!(
            lcb(&api, &snap, &vdi).unwrap(),
            s(&bitmap_base64(2 * MIB, &[3]))
        );
        assert_eq!(
            sim.read_vdi(&vdi_uuid, 3 * BS, 4).unwrap(),
            b"kept".to_vec()
        );
        // The session from before is gone, as after a restart of xapi.
    }
    // A hard stop leaves the state marked unclean: CBT comes back off.
    let state = dir.path().join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"clean\":true"));
    std::fs::write(&state, text.replace("\"clean\":true", "\"clean\":false")).unwrap();
    let sim = start_with(options());
    let api = Api::login(&sim);
    let vdi = api.text("VDI.get_by_uuid", &[s(&vdi_uuid)]);
    let snap = api.text("VDI.get_by_uuid", &[s(&snap_uuid)]);
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&vdi)]),
        Value::Bool(false)
    );
    assert_eq!(
        api.ok("VDI.get_cbt_enabled", &[s(&snap)]),
        Value::Bool(true)
    );
    assert_error(
        &lcb(&api, &snap, &vdi).unwrap_err(),
        "SR_BACKEND_FAILURE_460",
        &unrelated(),
    );
}

/// `VM.add_tags` / `remove_tags` / `set_tags` keep a set, as xapi does;
/// a per-object injected failure fails that object's calls only.
#[test]
fn vm_tags_and_per_object_failures() {
    let sim = start();
    let api = Api::login(&sim);
    let a = sim.create_vm_with_disks("a", &[MIB]).unwrap();
    let b = sim.create_vm_with_disks("b", &[MIB]).unwrap();
    let tags = |vm: &str| -> Vec<String> {
        api.ok("VM.get_tags", &[s(vm)])
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    api.ok("VM.add_tags", &[s(&a.vm_ref), s("daily")]);
    api.ok("VM.add_tags", &[s(&a.vm_ref), s("daily")]);
    api.ok("VM.add_tags", &[s(&a.vm_ref), s("web")]);
    assert_eq!(tags(&a.vm_ref), ["daily", "web"]);
    api.ok("VM.remove_tags", &[s(&a.vm_ref), s("daily")]);
    api.ok("VM.remove_tags", &[s(&a.vm_ref), s("absent")]);
    assert_eq!(tags(&a.vm_ref), ["web"]);
    api.ok(
        "VM.set_tags",
        &[
            s(&b.vm_ref),
            Value::strings(["z", "y", "z"].map(String::from)),
        ],
    );
    assert_eq!(tags(&b.vm_ref), ["y", "z"]);
    let e = api.err("VM.add_tags", &[s("OpaqueRef:nope"), s("x")]);
    assert_eq!(e.code, "HANDLE_INVALID");

    let target = a.vm_ref.clone();
    sim.set_faults(|f| {
        f.fail_calls_on.insert(
            ("VM.get_name_label".into(), target),
            vec!["SR_FULL".into(), "1".into()],
        );
    });
    assert_error(
        &api.err("VM.get_name_label", &[s(&a.vm_ref)]),
        "SR_FULL",
        &["1"],
    );
    assert_eq!(api.text("VM.get_name_label", &[s(&b.vm_ref)]), "b");
    sim.set_faults(|f| f.fail_calls_on.clear());
    assert_eq!(api.text("VM.get_name_label", &[s(&a.vm_ref)]), "a");
}
