//! Decoder throughput on realistic large responses (ignored by default;
//! run with `cargo test -p xapi-wire --release -- --ignored --nocapture`).
//! Prints MB/s so a change of XML reader can be compared before and after.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use xapi_wire::{xmlrpc, Value};

/// A VM record shaped like xapi's (about 60 fields, nested maps, ref lists).
fn vm_record(i: usize) -> Value {
    let mut m = BTreeMap::new();
    let s = |v: String| Value::String(v);
    m.insert(
        "uuid".into(),
        s(format!("{i:08x}-1c2d-4e5f-8a9b-0c1d2e3f4a5b")),
    );
    m.insert("name_label".into(), s(format!("vm-{i} web & db <prod>")));
    m.insert(
        "name_description".into(),
        s("  a description with  spaces ".into()),
    );
    m.insert("power_state".into(), s("Running".into()));
    m.insert("is_a_template".into(), Value::Bool(false));
    m.insert("is_a_snapshot".into(), Value::Bool(i.is_multiple_of(7)));
    m.insert("is_control_domain".into(), Value::Bool(false));
    for k in [
        "memory_static_max",
        "memory_dynamic_max",
        "memory_dynamic_min",
        "memory_static_min",
        "memory_overhead",
        "memory_target",
        "VCPUs_max",
        "VCPUs_at_startup",
        "user_version",
        "domid",
        "hardware_platform_version",
    ] {
        m.insert(k.into(), Value::Int(4294967296 + i as i64));
    }
    for k in [
        "resident_on",
        "affinity",
        "suspend_VDI",
        "suspend_SR",
        "guest_metrics",
        "metrics",
        "protection_policy",
        "snapshot_of",
        "parent",
        "appliance",
        "snapshot_schedule",
        "scheduled_to_be_resident_on",
    ] {
        m.insert(k.into(), s(format!("OpaqueRef:{i:08x}-aaaa-bbbb-cccc-{k}")));
    }
    for k in [
        "VBDs",
        "VIFs",
        "consoles",
        "crash_dumps",
        "VTPMs",
        "VUSBs",
        "snapshots",
        "children",
        "attached_PCIs",
        "VGPUs",
    ] {
        let n = if k == "VBDs" || k == "snapshots" {
            4
        } else {
            2
        };
        m.insert(
            k.into(),
            Value::Array(
                (0..n)
                    .map(|j| s(format!("OpaqueRef:{i:08x}-{j:04x}-dddd-eeee-ffffffffffff")))
                    .collect(),
            ),
        );
    }
    for k in [
        "other_config",
        "platform",
        "xenstore_data",
        "blocked_operations",
        "HVM_boot_params",
        "VCPUs_params",
        "bios_strings",
        "tags_map",
    ] {
        let mut sub = BTreeMap::new();
        for j in 0..8 {
            sub.insert(
                format!("{k}_key_{j}"),
                s(format!("value {j} of {k} for vm {i}")),
            );
        }
        m.insert(k.into(), Value::Struct(sub));
    }
    m.insert(
        "tags".into(),
        Value::Array(vec![s("backup".into()), s("tier-1".into())]),
    );
    for k in [
        "PV_bootloader",
        "PV_kernel",
        "PV_ramdisk",
        "PV_args",
        "PV_bootloader_args",
        "PV_legacy_args",
        "HVM_boot_policy",
        "HVM_shadow_multiplier",
        "actions_after_shutdown",
        "actions_after_reboot",
        "actions_after_crash",
        "recommendations",
        "domarch",
        "generation_id",
        "reference_label",
        "domain_type",
    ] {
        m.insert(k.into(), s(format!("{k}-value")));
    }
    m.insert("last_booted_record".into(), s("".into()));
    m.insert(
        "snapshot_time".into(),
        Value::DateTime("20260101T12:00:00Z".into()),
    );
    m.insert(
        "start_time".into(),
        Value::DateTime("20260102T12:00:00Z".into()),
    );
    Value::Struct(m)
}

/// Best of `rounds` decodes, as MB/s.
fn rate(body: &[u8], rounds: usize, check: impl Fn(Value)) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        let v = xmlrpc::decode_response(body).expect("decodes");
        best = best.min(t.elapsed());
        check(v);
    }
    body.len() as f64 / best.as_secs_f64() / 1e6
}

#[test]
#[ignore = "timing harness; run in release with --ignored --nocapture"]
fn decode_throughput() {
    // VM.get_all_records of 2000 VMs: about 160,000 struct members.
    let vms: BTreeMap<String, Value> = (0..2000)
        .map(|i| {
            (
                format!("OpaqueRef:{i:08x}-0000-0000-0000-000000000000"),
                vm_record(i),
            )
        })
        .collect();
    let body = xmlrpc::encode_response(&Ok(Value::Struct(vms)));
    let mbs = rate(body.as_bytes(), 5, |v| {
        let v = xmlrpc::status_result(v).unwrap().unwrap();
        assert_eq!(v.as_struct().unwrap().len(), 2000);
    });
    println!(
        "VM.get_all_records, 2000 VMs ({:.1} MB): {mbs:.0} MB/s",
        body.len() as f64 / 1e6
    );

    // list_changed_blocks of a 2 TiB disk: a 4 MiB bitmap, base64.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let b64: String = (0..(4 << 20) / 3 * 4)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 64) as usize] as char
        })
        .collect();
    let body = xmlrpc::encode_response(&Ok(Value::String(b64.clone())));
    let mbs = rate(body.as_bytes(), 10, |v| {
        let v = xmlrpc::status_result(v).unwrap().unwrap();
        assert_eq!(v.as_str().unwrap().len(), b64.len());
    });
    println!(
        "VDI.list_changed_blocks, 2 TiB bitmap ({:.1} MB): {mbs:.0} MB/s",
        body.len() as f64 / 1e6
    );
}
