//! Jobs against the simulator: a pool of 10 VMs of 2 disks, a job
//! selecting by tag, 4 at a time, one VM made to fail; the report, the
//! exit codes, retention, the offsite copy, the read-back, the hooks, the
//! metrics file, `runs`, and a configuration with a typo.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::util::{random_bytes, run_in_env, TestRepo, BS};
use crate::xen_util::{self, xen_url, Host};

const PASSWORD: &str = "jobs-secret";
const DISK: u64 = 2 << 20;

/// An HTTP server on loopback that keeps the body of each POST and
/// answers `status` (e.g. `204 No Content`).
fn webhook_server(status: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let keep = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            keep.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            let _ = s.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (url, bodies)
}

fn config(
    dir: &Path,
    main: &TestRepo,
    offsite: &TestRepo,
    sim: &xapi_sim::Simulator,
    webhook: &str,
) -> String {
    let a = sim.https_address();
    let pw = dir.join("xen.pass");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    format!(
        r#"# cbtvault jobs (test)
[state]
dir = "{state}"

[repositories.main]
location = "{main}"

[repositories.offsite]
location = "{offsite}"

[hosts.pool]
type = "xenserver"
url = "xen://root@{ip}:{port}"
password_file = "{pw}"
fingerprint = ["{fp}"]
max_concurrent = 4

[jobs.daily]
repository = "main"
hosts = ["pool"]
concurrency = 4
tags = ["nightly"]
offsite = ["offsite"]
verify_after = 2

[jobs.daily.select]
tags = ["daily"]

[jobs.daily.exclude]
tags = ["nobackup"]

[[jobs.daily.exclude_disks]]
vm = "vm06"
userdevices = ["1"]

[jobs.daily.retention]
keep_last = 1

[jobs.daily.notify]
webhook = "{webhook}"
on_failure = "echo \"$CBTVAULT_STATUS $CBTVAULT_JOB\" > '{hook}'"
metrics_file = "{metrics}"
"#,
        state = dir.join("state").display(),
        main = main.repo.display(),
        offsite = offsite.repo.display(),
        ip = a.ip(),
        port = a.port(),
        pw = pw.display(),
        fp = sim.fingerprint(),
        hook = dir.join("failed").display(),
        metrics = dir.join("metrics/cbtvault.prom").display(),
    )
}

fn cbtvault(dir: &Path, args: &[&str]) -> crate::util::Run {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    run_in_env(
        dir,
        &args,
        &[(
            "CBTVAULT_CONFIG",
            dir.join("cbtvault.toml").to_str().unwrap(),
        )],
    )
}

/// The most VM backups that ran at once, from their start and end times.
fn max_overlap(vms: &[Value]) -> usize {
    let mut edges: Vec<(String, i32)> = Vec::new();
    for v in vms {
        edges.push((v["start_time"].as_str().unwrap().to_string(), 1));
        edges.push((v["end_time"].as_str().unwrap().to_string(), -1));
    }
    // RFC 3339 in UTC with the same precision sorts as text; ends first.
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn a_job_backs_up_the_pool_concurrently_and_survives_a_failing_vm() {
    let sim = xen_util::start(PASSWORD);
    let host = Host::login(&sim, PASSWORD);
    let mut vms = Vec::new();
    for i in 0..10 {
        let vm = sim
            .create_vm_with_disks(&format!("vm{i:02}"), &[DISK, DISK])
            .unwrap();
        for (d, disk) in vm.disks.iter().enumerate() {
            for b in 0..4u64 {
                let data = random_bytes(i * 10 + d as u64, b, BS as usize);
                sim.guest_write(&disk.vdi_uuid, b * 2 * BS, &data).unwrap();
            }
        }
        if i < 8 {
            host.try_call("VM.add_tags", &[&vm.vm_ref, "daily"])
                .unwrap();
        }
        if i == 7 {
            host.try_call("VM.add_tags", &[&vm.vm_ref, "nobackup"])
                .unwrap();
        }
        vms.push(vm);
    }
    // Slow tasks, so that backups overlap measurably.
    sim.set_faults(|f| f.task_delay_ms = 100);
    let failing = vms[3].vm_ref.clone();
    sim.set_faults(|f| {
        f.fail_calls_on.insert(
            ("VM.snapshot".into(), failing.clone()),
            vec!["SR_FULL".into(), "1".into(), "0".into()],
        );
    });

    let main = TestRepo::new();
    let offsite = TestRepo::new();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (webhook, bodies) = webhook_server("204 No Content");
    std::fs::write(
        dir.join("cbtvault.toml"),
        config(dir, &main, &offsite, &sim, &webhook),
    )
    .unwrap();

    // What the job would select, without backing anything up.
    let plan = cbtvault(dir, &["--json", "config", "check", "daily"]).ok();
    let plan = plan.json();
    let names: Vec<&str> = plan["jobs"][0]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["vm00", "vm01", "vm02", "vm03", "vm04", "vm05", "vm06"]
    );
    assert_eq!(plan["jobs"][0]["passed"][0]["name"], "vm07");
    assert!(
        main.snapshot_ids().is_empty(),
        "config check backed something up"
    );

    // First run: 7 VMs, vm03 fails; exit 5 (some failed).
    let run = cbtvault(dir, &["--json", "run", "daily"]).expect_code(5);
    let report = run.json()["runs"][0].clone();
    let vms_done = report["vms"].as_array().unwrap().clone();
    assert_eq!(vms_done.len(), 7, "{report}");
    for v in &vms_done {
        let name = v["name"].as_str().unwrap();
        if name == "vm03" {
            assert_eq!(v["status"], "failed", "{v}");
            assert!(v["error"].as_str().unwrap().contains("SR_FULL"), "{v}");
        } else {
            assert_eq!(v["status"], "ok", "{v}");
            assert_eq!(v["mode"], "full", "{v}");
            let disks = if name == "vm06" { 1 } else { 2 };
            assert_eq!(v["disk_count"], disks, "{v}");
            assert!(v["read_bytes"].as_u64().unwrap() >= disks * 4 * BS, "{v}");
        }
    }
    assert_eq!(vms_done[6]["excluded_disk_count"], 1);
    let overlap = max_overlap(&vms_done);
    assert!(
        overlap >= 2,
        "backups did not overlap ({overlap}): {report}"
    );
    assert_eq!(report["status"], "failed");
    let steps: Vec<(String, String)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().into(),
                s["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(steps.len(), 4, "{steps:?}");
    assert_eq!(steps[0], ("retention".into(), "ok".into()));
    assert_eq!(steps[1], ("copy to offsite".into(), "ok".into()));
    assert!(
        steps[2..]
            .iter()
            .all(|(s, r)| s.starts_with("verify vm") && r == "ok"),
        "{steps:?}"
    );
    // The hooks and files.
    assert_eq!(
        std::fs::read_to_string(dir.join("failed")).unwrap().trim(),
        "FAILED daily"
    );
    let metrics = std::fs::read_to_string(dir.join("metrics/cbtvault.prom")).unwrap();
    assert!(
        metrics.contains("cbtvault_job_vms_failed{job=\"daily\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cbtvault_vm_last_run_success{job=\"daily\",vm=\"vm03\""),
        "{metrics}"
    );
    let posted = bodies.lock().unwrap().clone();
    assert_eq!(posted.len(), 1);
    let posted: Value = serde_json::from_str(&posted[0]).unwrap();
    assert_eq!(posted["job"], "daily");
    assert_eq!(posted["vms"].as_array().unwrap().len(), 7);

    // Bit for bit: vm00's first disk restores to what the host holds.
    let vdi = &vms[0].disks[0].vdi_uuid;
    let snaps = main.snapshots(&["--source", &xen_url(&sim, "vdi", vdi)]);
    assert_eq!(snaps.len(), 1);
    let id = snaps[0]["snapshot_id"].as_str().unwrap();
    main.assert_restores(id, blake3::hash(&host.disk(vdi, DISK)), DISK);
    // Tags: the job's own and the configured one.
    let tags = snaps[0]["tags"].as_array().unwrap();
    assert!(tags.contains(&Value::from("job:daily")) && tags.contains(&Value::from("nightly")));
    // The offsite copy has it.
    assert_eq!(
        offsite
            .snapshots(&["--source", &xen_url(&sim, "vdi", vdi)])
            .len(),
        1
    );
    // No snapshot of the failed, excluded or unselected VMs.
    for i in [3usize, 7, 8, 9] {
        let s = main.snapshots(&["--source", &xen_url(&sim, "vm", &vms[i].vm_uuid)]);
        assert!(s.is_empty(), "vm{i:02}: {s:?}");
    }
    // vm06's excluded disk was not read.
    let s = main.snapshots(&["--source", &xen_url(&sim, "vdi", &vms[6].disks[1].vdi_uuid)]);
    assert!(s.is_empty());

    // Second run, the fault cleared, one at a time: incremental for every
    // VM backed up before, a first full for vm03; retention keeps one.
    sim.set_faults(|f| f.fail_calls_on.clear());
    sim.guest_write(
        &vms[0].disks[0].vdi_uuid,
        0,
        &random_bytes(99, 0, BS as usize),
    )
    .unwrap();
    let run = cbtvault(dir, &["--json", "run", "daily", "--concurrency", "1"]).ok();
    let report = run.json()["runs"][0].clone();
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(report["concurrency"], 1);
    for v in report["vms"].as_array().unwrap() {
        let want = if v["name"] == "vm03" {
            "full"
        } else {
            "incremental"
        };
        assert_eq!(v["mode"], want, "{v}");
    }
    assert_eq!(max_overlap(report["vms"].as_array().unwrap()), 1);
    let snaps = main.snapshots(&["--source", &xen_url(&sim, "vdi", vdi)]);
    assert_eq!(snaps.len(), 1, "retention keeps the newest only");
    main.assert_restores(
        snaps[0]["snapshot_id"].as_str().unwrap(),
        blake3::hash(&host.disk(vdi, DISK)),
        DISK,
    );
    assert_eq!(bodies.lock().unwrap().len(), 2);

    // Both runs are listed, oldest first.
    let runs = cbtvault(dir, &["--json", "runs"]).ok();
    let items = runs.items("run");
    let status: Vec<&str> = items
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["failed", "ok"]);
    assert_eq!(items[0]["failed_vm_count"], 1);
    let text = cbtvault(dir, &["runs"]).ok().out();
    assert!(text.contains("FAILED") && text.contains("2 runs"), "{text}");
}

#[test]
fn a_configuration_with_a_typo_is_refused_with_its_line() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let text = "[repositories.r]\nlocation = \"/tmp/r\"\n\n[hosts.h]\ntype = \"xenserver\"\nurl = \"xen://h\"\n\n[jobs.j]\nrepository = \"r\"\nhosts = [\"h\"]\nconcurency = 4\nselect.all = true\n";
    std::fs::write(dir.join("cbtvault.toml"), text).unwrap();
    let r = cbtvault(dir, &["config", "check", "--offline"]).expect_code(1);
    assert!(r.stderr.contains("cbtvault.toml:11:"), "{}", r.stderr);
    assert!(r.stderr.contains("concurency"), "{}", r.stderr);
    // The run refuses it the same way, before contacting anything.
    let r = cbtvault(dir, &["run", "j"]).expect_code(1);
    assert!(r.stderr.contains("cbtvault.toml:11:"), "{}", r.stderr);
    // An unknown job is named with the known ones.
    std::fs::write(
        dir.join("cbtvault.toml"),
        text.replace("concurency", "concurrency"),
    )
    .unwrap();
    let r = cbtvault(dir, &["run", "nightly"]).expect_code(1);
    assert!(
        r.stderr.contains("no job 'nightly' (jobs: j)"),
        "{}",
        r.stderr
    );
    let r = cbtvault(dir, &["--json", "config", "check", "--offline"]).ok();
    assert_eq!(r.json()["jobs"][0]["job"], "j");
}

/// The shipped systemd units pass `systemd-analyze verify` without a
/// complaint (a bad value is only a warning there: any output fails).
#[test]
fn the_systemd_units_verify() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing"
        );
        eprintln!("skipped: no systemd-analyze");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let mut units = Vec::new();
    for (from, to) in [
        ("cbtvault-job@.service", "cbtvault-job@daily.service"),
        ("cbtvault-job@.timer", "cbtvault-job@daily.timer"),
    ] {
        let text = std::fs::read_to_string(src.join(from))
            .unwrap()
            .replace("/usr/local/bin/cbtvault", crate::util::bin());
        assert!(text.contains(crate::util::bin()) || from.ends_with(".timer"));
        let path = dir.path().join(to);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// The landmark VDIs (`cbt_metadata` snapshots) on a host.
fn landmarks(host: &Host) -> usize {
    host.snapshot_records("VDI")
        .iter()
        .filter(|r| r.vdi_type == "cbt_metadata")
        .count()
}

#[test]
fn a_job_over_two_hosts_reports_failing_steps_and_notifications_and_keeps_one_landmark_each() {
    // Two pools with different passwords, one VM of one disk each.
    let pools = [("alpha", "alpha-secret"), ("beta", "beta-secret")];
    let sims: Vec<xapi_sim::Simulator> = pools.iter().map(|(_, pw)| xen_util::start(pw)).collect();
    let hosts: Vec<Host> = sims
        .iter()
        .zip(pools)
        .map(|(sim, (_, pw))| Host::login(sim, pw))
        .collect();
    let mut disks = Vec::new();
    for (i, (sim, host)) in sims.iter().zip(&hosts).enumerate() {
        let vm = sim
            .create_vm_with_disks(&format!("app{i}"), &[DISK])
            .unwrap();
        host.try_call("VM.add_tags", &[&vm.vm_ref, "daily"])
            .unwrap();
        sim.guest_write(
            &vm.disks[0].vdi_uuid,
            0,
            &random_bytes(i as u64, 0, BS as usize),
        )
        .unwrap();
        disks.push(vm.disks[0].vdi_uuid.clone());
    }
    let main = TestRepo::new();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (webhook, bodies) = webhook_server("500 Internal Server Error");
    // A metrics file under a regular file cannot be written.
    std::fs::write(dir.join("blocker"), "").unwrap();
    let mut text = format!(
        r#"[state]
dir = "{state}"

[repositories.main]
location = "{main}"

[repositories.gone]
location = "{gone}"

[jobs.daily]
repository = "main"
hosts = ["alpha", "beta"]
offsite = ["gone"]
verify_after = 2

[jobs.daily.select]
tags = ["daily"]

[jobs.daily.retention]
keep_last = 1

[jobs.daily.notify]
webhook = "{webhook}"
on_completion = "exit 7"
metrics_file = "{metrics}"
"#,
        state = dir.join("state").display(),
        main = main.repo.display(),
        gone = dir.join("no-such-repository").display(),
        metrics = dir.join("blocker/cbtvault.prom").display(),
    );
    // alpha's VMs are checked by a restore into its SR; beta's by reading
    // the repository.
    let sr = hosts[0].try_call("SR.get_all", &[]).unwrap();
    let sr = sr.as_array().unwrap()[0].as_str().unwrap().to_string();
    let sr_uuid = hosts[0].try_call("SR.get_uuid", &[&sr]).unwrap();
    let sr_uuid = sr_uuid.as_str().unwrap().to_string();
    for ((name, pw), sim) in pools.iter().zip(&sims) {
        let file = dir.join(format!("{name}.pass"));
        std::fs::write(&file, format!("{pw}\n")).unwrap();
        let a = sim.https_address();
        text.push_str(&format!(
            "\n[hosts.{name}]\ntype = \"xenserver\"\nurl = \"xen://root@{}:{}\"\npassword_file = \"{}\"\nfingerprint = [\"{}\"]\n",
            a.ip(),
            a.port(),
            file.display(),
            sim.fingerprint()
        ));
        if *name == "alpha" {
            text.push_str(&format!("verify_sr = \"{sr_uuid}\"\n"));
        }
    }
    let vdis = |host: &Host| {
        host.try_call("VDI.get_all", &[])
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let vdis_before = vdis(&hosts[0]);
    std::fs::write(dir.join("cbtvault.toml"), text).unwrap();

    // Both VMs are backed up; the copy fails (its repository does not
    // exist), which fails the run but not the backups: exit 5. The webhook's
    // 500, the hook's exit 7 and the unwritable metrics file are warnings.
    let run = cbtvault(dir, &["--json", "run", "daily"]).expect_code(5);
    let report = run.json()["runs"][0].clone();
    assert_eq!(report["status"], "failed", "{report}");
    for v in report["vms"].as_array().unwrap() {
        assert_eq!(v["status"], "ok", "{v}");
    }
    let steps = report["steps"].as_array().unwrap();
    let copy = steps.iter().find(|s| s["step"] == "copy to gone").unwrap();
    assert_eq!(copy["status"], "failed", "{copy}");
    assert!(
        copy["detail"]
            .as_str()
            .unwrap()
            .contains("no-such-repository"),
        "{copy}"
    );
    let retention = steps.iter().find(|s| s["step"] == "retention").unwrap();
    assert_eq!(retention["status"], "ok", "{retention}");
    for says in [
        "webhook",
        "500",
        "on_completion hook exited",
        "metrics file was not written",
    ] {
        assert!(run.stderr.contains(says), "no '{says}' in: {}", run.stderr);
    }
    assert_eq!(bodies.lock().unwrap().len(), 1, "the webhook was called");
    // The read-backs: app0 restored into alpha's SR over NBD and removed,
    // app1 read from the repository.
    let detail = |report: &Value, vm: &str| {
        let s = report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step"] == format!("verify {vm}"))
            .unwrap_or_else(|| panic!("no read-back of {vm}: {report}"))
            .clone();
        (
            s["status"].as_str().unwrap().to_string(),
            s["detail"].as_str().unwrap().to_string(),
        )
    };
    let (status, text) = detail(&report, "app0");
    assert_eq!(status, "ok", "{text}");
    assert!(
        text.contains(&format!("restored into SR {sr_uuid}")),
        "{text}"
    );
    let (status, text) = detail(&report, "app1");
    assert_eq!(status, "ok", "{text}");
    assert!(text.contains("read back"), "{text}");
    // Nothing of the check is left on the host but the run's landmark.
    assert_eq!(
        vdis(&hosts[0]),
        vdis_before + 1,
        "a VDI of the check was left"
    );
    for host in &hosts {
        assert_eq!(landmarks(host), 1);
    }

    // Second run: incremental on both hosts (each with its own password);
    // retention forgets the first run's snapshots, whose landmarks the new
    // backups already replaced: one landmark per disk stays on each host.
    for (sim, vdi) in sims.iter().zip(&disks) {
        sim.guest_write(vdi, BS, &random_bytes(7, 7, BS as usize))
            .unwrap();
    }
    let run = cbtvault(dir, &["--json", "run", "daily"]).expect_code(5);
    let report = run.json()["runs"][0].clone();
    for v in report["vms"].as_array().unwrap() {
        assert_eq!(v["mode"], "incremental", "{v}");
    }
    let retention = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "retention")
        .unwrap()
        .clone();
    assert_eq!(retention["status"], "ok", "{retention} {}", run.stderr);
    assert!(!run.stderr.contains("cannot reach"), "{}", run.stderr);
    assert_eq!(detail(&report, "app0").0, "ok");
    for (host, vdi) in hosts.iter().zip(&disks) {
        assert_eq!(landmarks(host), 1, "the old landmark stays on a host");
        let snaps = main.snapshots(&["--source", &xen_url(host.sim, "vdi", vdi)]);
        assert_eq!(snaps.len(), 1);
        main.assert_restores(
            snaps[0]["snapshot_id"].as_str().unwrap(),
            blake3::hash(&host.disk(vdi, DISK)),
            DISK,
        );
    }

    // Damage in the repository: the read-backs of the next run find it;
    // the SR restore stops and its VDI is destroyed.
    for p in main.packs() {
        let len = std::fs::metadata(&p).unwrap().len();
        crate::util::flip_byte(&p, len / 3);
        crate::util::flip_byte(&p, 2 * len / 3);
    }
    let vdis_before = vdis(&hosts[0]);
    let run = cbtvault(dir, &["--json", "run", "daily"]).expect_code(5);
    let report = run.json()["runs"][0].clone();
    for vm in ["app0", "app1"] {
        let (status, text) = detail(&report, vm);
        assert_eq!(status, "failed", "{vm}: {text}");
    }
    assert_eq!(vdis(&hosts[0]), vdis_before, "the failed check left a VDI");
}

#[test]
fn a_job_over_a_vsphere_host_selects_by_name_excludes_a_disk_and_goes_incremental() {
    use vsphere_sim::{SimOptions, Simulator};
    let sim = Simulator::start(SimOptions {
        password: "vsphere-jobs".into(),
        ..SimOptions::default()
    })
    .unwrap();
    let mut vms = Vec::new();
    for (i, name) in ["web1", "web2", "db1"].iter().enumerate() {
        let vm = sim.add_vm(name, &[DISK, DISK]).unwrap();
        for d in &vm.disks {
            sim.guest_write(
                &vm.id,
                d.key,
                0,
                &random_bytes(i as u64, d.key as u64, BS as usize),
            )
            .unwrap();
        }
        vms.push(vm);
    }
    sim.set_powered_on(&vms[0].id, false).unwrap();
    sim.set_powered_on(&vms[1].id, true).unwrap();
    let main = TestRepo::new();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let pw = dir.join("esx.pass");
    std::fs::write(&pw, "vsphere-jobs\n").unwrap();
    let a = sim.address();
    std::fs::write(
        dir.join("cbtvault.toml"),
        format!(
            r#"[state]
dir = "{state}"

[repositories.main]
location = "{main}"

[hosts.esx]
type = "vsphere"
url = "vmware://root@{ip}:{port}"
password_file = "{pw}"
fingerprint = ["{fp}"]

[jobs.web]
repository = "main"
hosts = ["esx"]
concurrency = 2
verify_after = 2

[jobs.web.select]
names = ["web*"]

[[jobs.web.exclude_disks]]
vm = "web2"
userdevices = ["2001"]

[jobs.web.retention]
keep_last = 1
"#,
            state = dir.join("state").display(),
            main = main.repo.display(),
            ip = a.ip(),
            port = a.port(),
            pw = pw.display(),
            fp = sim.fingerprint(),
        ),
    )
    .unwrap();

    let plan = cbtvault(dir, &["--json", "config", "check", "web"])
        .ok()
        .json();
    let names: Vec<&str> = plan["jobs"][0]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web1", "web2"], "{plan}");
    assert_eq!(plan["jobs"][0]["vms"][0]["power_state"], "Halted", "{plan}");
    assert_eq!(
        plan["jobs"][0]["vms"][1]["power_state"], "Running",
        "{plan}"
    );

    let report = cbtvault(dir, &["--json", "run", "web"]).ok().json()["runs"][0].clone();
    let done = report["vms"].as_array().unwrap();
    assert_eq!(done.len(), 2, "{report}");
    for v in done {
        assert_eq!(v["status"], "ok", "{v}");
        assert_eq!(v["mode"], "full", "{v}");
        let disks = if v["name"] == "web2" { 1 } else { 2 };
        assert_eq!(v["disk_count"], disks, "{v}");
    }
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["ok", "ok", "ok"], "{report}");
    // web2's second disk was left out; db1 was not selected.
    let listed = main.snapshots(&["--vm", "web2"]);
    assert_eq!(listed.iter().filter(|l| l["kind"] == "disk").count(), 1);
    assert!(main.snapshots(&["--vm", "db1"]).is_empty());
    for vm in &vms {
        assert!(
            sim.snapshots(&vm.id).unwrap().is_empty(),
            "a vSphere snapshot was left"
        );
    }

    // Second run: incremental; retention keeps one per disk; bit for bit.
    sim.guest_write(&vms[0].id, 2000, 3 * BS, &random_bytes(5, 5, BS as usize))
        .unwrap();
    let report = cbtvault(dir, &["--json", "run", "web"]).ok().json()["runs"][0].clone();
    for v in report["vms"].as_array().unwrap() {
        assert_eq!(v["mode"], "incremental", "{v}");
    }
    let web1 = main.snapshots(&["--vm", "web1"]);
    let disk0: Vec<&Value> = web1
        .iter()
        .filter(|l| l["kind"] == "disk" && l["landmark"]["vmware.disk_key"] == "2000")
        .collect();
    assert_eq!(disk0.len(), 1, "{web1:?}");
    let live = sim.read_disk(&vms[0].id, 2000, 0, DISK as usize).unwrap();
    main.assert_restores(
        disk0[0]["snapshot_id"].as_str().unwrap(),
        blake3::hash(&live),
        DISK,
    );
}

/// nbdkit serving `image` on a unix socket; killed when dropped.
struct Nbdkit(std::process::Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit_file(image: &Path, sock: &Path) -> Nbdkit {
    let child = std::process::Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(sock)
        .arg("file")
        .arg(image)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nbdkit (apt install nbdkit)");
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(sock.exists(), "nbdkit did not start");
    Nbdkit(child)
}

#[test]
fn a_job_over_nbd_exports_selects_them_by_export_name() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let main = TestRepo::new();
    let mut servers = Vec::new();
    let mut uris = Vec::new();
    let mut images = Vec::new();
    for (i, name) in ["web-a", "web-b", "db-c"].iter().enumerate() {
        let img = crate::util::Image::create(&dir.join(format!("{name}.img")), DISK);
        for b in [0, 5, 17] {
            img.write_block(b, &random_bytes(i as u64, b, BS as usize));
        }
        let sock = dir.join(format!("{name}.sock"));
        servers.push(nbdkit_file(&img.path, &sock));
        uris.push(format!("nbd+unix:///{name}?socket={}", sock.display()));
        images.push(img);
    }
    std::fs::write(
        dir.join("cbtvault.toml"),
        format!(
            r#"[state]
dir = "{state}"

[repositories.main]
location = "{main}"

[hosts.lab]
type = "nbd"
exports = [{exports}]
nbd_connections = 2

[jobs.web]
repository = "main"
hosts = ["lab"]
concurrency = 2

[jobs.web.select]
names = ["web-*"]
"#,
            state = dir.join("state").display(),
            main = main.repo.display(),
            exports = uris
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    )
    .unwrap();
    let plan = cbtvault(dir, &["--json", "config", "check", "web"])
        .ok()
        .json();
    let names: Vec<&str> = plan["jobs"][0]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web-a", "web-b"], "{plan}");

    for round in 0..2u64 {
        if round == 1 {
            images[0].write_block(9, &random_bytes(42, 9, BS as usize));
        }
        let report = cbtvault(dir, &["--json", "run", "web"]).ok().json()["runs"][0].clone();
        let done = report["vms"].as_array().unwrap();
        assert_eq!(done.len(), 2, "{report}");
        for v in done {
            assert_eq!(v["status"], "ok", "{v}");
            // Without a dirty bitmap every allocated block is read (nbdkit's
            // base:allocation skips the holes); the second run's snapshot is
            // layered on the first.
            assert_eq!(
                v["mode"],
                if round == 0 { "full" } else { "incremental" },
                "{v}"
            );
            let allocated = if v["name"] == "web-a" && round == 1 {
                4
            } else {
                3
            };
            assert_eq!(v["read_bytes"], allocated * BS, "{v}");
        }
    }
    for (img, uri) in images.iter().zip(&uris).take(2) {
        let snaps = main.snapshots(&[]);
        let mine: Vec<&Value> = snaps
            .iter()
            .filter(|s| s["source"] == uri.as_str())
            .collect();
        assert_eq!(mine.len(), 2, "{snaps:?}");
        let newest = mine.last().unwrap()["snapshot_id"].as_str().unwrap();
        main.assert_restores(newest, img.hash(), DISK);
    }
    assert!(
        !main
            .snapshots(&[])
            .iter()
            .any(|s| s["source"].as_str().unwrap().contains("db-c")),
        "db-c was not selected"
    );
    // A host of another kind's keys is refused with its line.
    let text = std::fs::read_to_string(dir.join("cbtvault.toml")).unwrap();
    std::fs::write(
        dir.join("cbtvault.toml"),
        text.replace(
            "nbd_connections = 2",
            "nbd_connections = 2\nverify_sr = \"x\"",
        ),
    )
    .unwrap();
    let r = cbtvault(dir, &["config", "check", "--offline"]).expect_code(1);
    assert!(
        r.stderr.contains("verify_sr") && r.stderr.contains("xenserver"),
        "{}",
        r.stderr
    );
    drop(servers);
}
