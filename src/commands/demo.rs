//! `demo`: the XenServer workflow end to end on loopback, with nothing to
//! set up: start the simulator, create a VM with two disks holding data,
//! back the whole VM up (full), let the guest write, back it up again
//! (incremental, only the blocks CBT reports), restore a disk to a file and
//! compare it bit for bit with the simulated host's disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::backup::{xen_backup, SnapshotOptions, XenBackupSummary};
use super::restore::restore_to_path;
use super::Outcome;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::backup::plan::ParentRequest;
use crate::repo::{InitOptions, Repository};
use crate::source::xenapi::workflow::WorkflowOptions;
use crate::source::xenapi::{
    tls::parse_fingerprint, Client, ClientOptions, Credentials, HttpsTrust, Password, XenUrl,
};
use xapi_sim::{SimOptions, SimVm, Simulator};

const BLOCK: u64 = 65536;

/// Deterministic pseudo-random bytes (BLAKE3 in XOF mode).
fn fill_random(seed: u64, buf: &mut [u8]) {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(buf);
}

/// Validated options of `demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Size of the first simulated disk in MiB (at least 1).
    pub size_mib: u64,
    /// Work folder (default: a new temporary one, removed afterwards).
    pub dir: Option<std::path::PathBuf>,
    /// The vSphere workflow instead of the XenServer one.
    pub vmware: bool,
}

pub fn run(ui: &Ui, options: &DemoOptions) -> Result<Outcome> {
    let tmp;
    let dir = match &options.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("cbtvault-demo-{:08x}", rand::random::<u32>()));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let result = if options.vmware {
        demo_vmware(ui, &dir, options.size_mib)
    } else {
        demo_in(ui, &dir, options.size_mib)
    };
    if options.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Restores snapshot `id` to `restored` and compares it with `host`'s
/// bytes (read `len` at a time by `read(offset, len)`): the step 7/8 of
/// both demos. The summary of the restore and whether they are equal.
fn restore_and_compare(
    ui: &Ui,
    repo: &Repository,
    id: crate::format::SnapshotId,
    restored: &Path,
    size: u64,
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
) -> Result<(crate::repo::restore::RestoreSummary, bool)> {
    let summary = {
        let _lock = repo.lock(false, "demo restore")?;
        // Its own summary would be a second one: the demo's comes last.
        restore_to_path(&Ui::new(false, true, "demo"), repo, id, restored, true)?
    };
    let mut host_hash = blake3::Hasher::new();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(4 << 20) as usize;
        host_hash.update(&read(at, n)?);
        at += n as u64;
    }
    let (a, b) = (host_hash.finalize(), super::hash_file(restored)?);
    ui.info(format!(
        "8. verify: host disk BLAKE3 {}…, restored BLAKE3 {}…: {}",
        &a.to_hex()[..16],
        &b.to_hex()[..16],
        if a == b { "identical" } else { "DIFFERENT" }
    ));
    Ok((summary, a == b))
}

/// Guest data: 60% of the 64 KiB blocks random, the rest never written.
fn fill_disk(sim: &Simulator, vdi: &str, size: u64, seed: u64) -> Result<()> {
    let blocks = size / BLOCK;
    let mut run = Vec::with_capacity(16 * BLOCK as usize);
    let mut run_start = 0;
    let mut buf = vec![0u8; BLOCK as usize];
    let flush = |run: &mut Vec<u8>, start: u64| -> Result<()> {
        if !run.is_empty() {
            sim.guest_write(vdi, start * BLOCK, run)?;
            run.clear();
        }
        Ok(())
    };
    for i in 0..blocks {
        if (i / 4) % 5 < 3 {
            if run.is_empty() {
                run_start = i;
            }
            fill_random(seed.wrapping_mul(1_000_003) + i, &mut buf);
            run.extend_from_slice(&buf);
            if run.len() >= 16 * BLOCK as usize {
                flush(&mut run, run_start)?;
            }
        } else {
            flush(&mut run, run_start)?;
        }
    }
    flush(&mut run, run_start)
}

fn print_backup(ui: &Ui, s: &XenBackupSummary) {
    let (mut read, mut new, mut dedup, mut zero) = (0, 0, 0, 0);
    for d in &s.disks {
        read += d.summary.blocks_read;
        new += d.summary.blocks_new;
        dedup += d.summary.blocks_deduplicated;
        zero += d.summary.blocks_zero;
    }
    ui.info(format!(
        "   => {} + VM metadata in {:.2}s: {} read, {new} new, {dedup} deduplicated, {zero} zero",
        plural(s.disks.len(), "disk"),
        s.seconds,
        plural(read, "block")
    ));
}

fn demo_in(ui: &Ui, dir: &Path, size_mib: u64) -> Result<Outcome> {
    let started = Instant::now();
    let size = size_mib * 1024 * 1024;
    let sizes = [size, (size / 2).max(BLOCK) / BLOCK * BLOCK];

    ui.info("1. starting a simulated XenServer host on loopback (XenAPI over HTTPS, NBD with TLS)");
    let sim = Simulator::start(SimOptions {
        dir: Some(dir.join("host")),
        data_destroy_wait: Duration::from_secs(2),
        ..SimOptions::default()
    })
    .context("start the XenServer simulator")?;
    ui.info(format!(
        "   XenAPI at {} (certificate SHA-256 {}), NBD on port {}",
        sim.url(),
        sim.fingerprint(),
        sim.nbd_port()
    ));

    let vm: SimVm = sim.create_vm_with_disks("demo-vm", &sizes)?;
    ui.info(format!(
        "2. created VM {} with disks of {} and {}; the guest writes data (60% of blocks)",
        vm.vm_uuid,
        human_bytes(sizes[0]),
        human_bytes(sizes[1])
    ));
    for (k, d) in vm.disks.iter().enumerate() {
        fill_disk(&sim, &d.vdi_uuid, d.size_bytes, k as u64 + 1)?;
    }

    let repo_path = dir.join("repo");
    ui.info(format!(
        "3. creating a repository at '{}'",
        repo_path.display()
    ));
    Repository::init(&repo_path, &InitOptions::default())?;
    let repo = Repository::open(&repo_path)?;

    let addr = sim.https_address();
    let url = XenUrl::parse(&format!(
        "xen://{}@{}:{}/vm/{}",
        sim.username(),
        addr.ip(),
        addr.port(),
        vm.vm_uuid
    ))?;
    // The password is handed over in process: never on a command line.
    let client = Client::new(ClientOptions::new(
        &url.host,
        url.port,
        HttpsTrust::Fingerprint(vec![parse_fingerprint(sim.fingerprint())?]),
    ))?;
    let session = client
        .login(Credentials {
            user: sim.username().to_string(),
            password: Password::new(sim.password()),
        })
        .context("log in to the simulator")?;
    let workflow_options = WorkflowOptions {
        spool_dir: dir.to_path_buf(),
        ..WorkflowOptions::default()
    };
    let options = SnapshotOptions {
        parent: ParentRequest::Newest,
        full_every: None,
        tags: vec!["demo".into()],
        strict: false,
        concurrent: 1,
        defer_commit: false,
    };

    ui.info(format!(
        "4. full VM backup of xen://{}/vm/{}: enable CBT, VM.snapshot, read every disk over NBD, commit, VDI.data_destroy",
        url.authority(),
        vm.vm_uuid
    ));
    let (full, _) = xen_backup(ui, &repo, &url, &session, &workflow_options, &options)?;
    print_backup(ui, &full);

    let mut buf = vec![0u8; BLOCK as usize];
    let mut written = 0;
    for (k, d) in vm.disks.iter().enumerate() {
        let blocks = d.size_bytes / BLOCK;
        let changed = (blocks / 100).max(1);
        for j in 0..changed {
            let i = (j * 7919 + k as u64 * 31) % blocks;
            fill_random(9_000_000 + k as u64 * 100_000 + j, &mut buf);
            sim.guest_write(&d.vdi_uuid, i * BLOCK, &buf)?;
            written += 1;
        }
    }
    ui.info(format!(
        "5. the guest writes {written} blocks (1% of each disk); CBT marks them"
    ));

    ui.info("6. incremental VM backup: VM.snapshot, VDI.list_changed_blocks against the landmark, read only those blocks");
    let (incremental, _) = xen_backup(ui, &repo, &url, &session, &workflow_options, &options)?;
    print_backup(ui, &incremental);
    session.logout();

    let disk = &vm.disks[0];
    let snap = incremental
        .disks
        .iter()
        .find(|d| d.vdi == disk.vdi_uuid)
        .context("the incremental has the first disk")?;
    let restored = dir.join("restored-disk0.img");
    ui.info(format!(
        "7. restoring disk {} from snapshot {} to '{}'",
        disk.vdi_uuid,
        snap.summary.snapshot_id.short(),
        restored.display()
    ));
    let (summary, same) = restore_and_compare(
        ui,
        &repo,
        snap.summary.snapshot_id,
        &restored,
        disk.size_bytes,
        &|at, n| Ok(sim.read_vdi(&disk.vdi_uuid, at, n)?),
    )?;
    ui.info(format!(
        "   restored {} in {:.2}s",
        human_bytes(summary.disk_size_bytes),
        summary.seconds
    ));
    let leftovers = sim.dom0_attachments();
    ui.summary(&serde_json::json!({
        "full_backup": full, "incremental_backup": incremental, "restore": summary,
        "verified": same,
    }));
    if !same {
        bail!("the restored disk differs from the host's disk");
    }
    if leftovers != 0 {
        bail!(
            "{} still attached to dom0 on the simulated host",
            crate::output::plural(leftovers, "VDI")
        );
    }
    let full_read: u64 = full.disks.iter().map(|d| d.summary.bytes_read).sum();
    let inc_read: u64 = incremental.disks.iter().map(|d| d.summary.bytes_read).sum();
    ui.info(format!(
        "demo passed in {:.1}s: the incremental read {} where the full read {}, and the restore is bit-exact",
        started.elapsed().as_secs_f64(),
        human_bytes(inc_read),
        human_bytes(full_read)
    ));
    sim.shutdown();
    Ok(Outcome::Ok)
}

/// `demo --vmware`: the same story against the vSphere simulator: CBT
/// enabled, a snapshot, changed areas, Range reads of the frozen base,
/// the snapshot removed; restore and compare.
fn demo_vmware(ui: &Ui, dir: &Path, size_mib: u64) -> Result<Outcome> {
    use super::backup_vmware::{vmware_backup, VmwareBackupSummary, VmwareOptions};
    let started = Instant::now();
    let size = size_mib * 1024 * 1024;
    let sizes = [size, (size / 2).max(BLOCK) / BLOCK * BLOCK];
    ui.info("1. starting a simulated vSphere (ESXi) host on loopback (vim25 SOAP and datastore files over HTTPS)");
    let sim = vsphere_sim::Simulator::start(vsphere_sim::SimOptions {
        dir: Some(dir.join("host")),
        ..vsphere_sim::SimOptions::default()
    })
    .context("start the vSphere simulator")?;
    ui.info(format!(
        "   SOAP at {} (certificate SHA-256 {})",
        sim.url(),
        sim.fingerprint()
    ));
    let vm = sim.add_vm("demo-vm", &sizes)?;
    ui.info(format!(
        "2. created VM {} ({}) with disks of {} and {}; the guest writes data (60% of blocks)",
        vm.id,
        vm.instance_uuid,
        human_bytes(sizes[0]),
        human_bytes(sizes[1])
    ));
    let mut buf = vec![0u8; 16 * BLOCK as usize];
    for (k, d) in vm.disks.iter().enumerate() {
        let mut at = 0;
        while at < d.capacity_bytes {
            let n = (d.capacity_bytes - at).min(buf.len() as u64) as usize;
            fill_random(k as u64 * 1_000_000 + at / BLOCK, &mut buf[..n]);
            // 60%: blocks whose index is 0, 1, 2 mod 5 hold data.
            for (j, b) in buf[..n].chunks_mut(BLOCK as usize).enumerate() {
                if (at / BLOCK + j as u64) % 5 >= 3 {
                    b.fill(0);
                }
            }
            sim.guest_write(&vm.id, d.key, at, &buf[..n])?;
            at += n as u64;
        }
    }
    let repo_path = dir.join("repo");
    ui.info(format!(
        "3. creating a repository at '{}'",
        repo_path.display()
    ));
    Repository::init(&repo_path, &InitOptions::default())?;
    let repo = Repository::open(&repo_path)?;
    // The password goes through a private file: never on a command line.
    let pw = dir.join("vsphere.pass");
    std::fs::write(&pw, format!("{}\n", sim.password()))?;
    let a = sim.address();
    let url = crate::source::vmware::VmwareUrl::parse(&format!(
        "vmware://{}@{}:{}/vm/{}",
        sim.username(),
        a.ip(),
        a.port(),
        vm.id
    ))?;
    let vmware = VmwareOptions {
        password_file: Some(pw),
        fingerprint: vec![sim.fingerprint().to_string()],
        enable_cbt: true,
        ..VmwareOptions::default()
    };
    let options = SnapshotOptions {
        parent: ParentRequest::Newest,
        full_every: None,
        tags: vec!["demo".into()],
        strict: false,
        concurrent: 1,
        defer_commit: false,
    };
    let print = |s: &VmwareBackupSummary| {
        let read: u64 = s.disks.iter().map(|d| d.summary.blocks_read).sum();
        let new: u64 = s.disks.iter().map(|d| d.summary.blocks_new).sum();
        ui.info(format!(
            "   {}: {read} blocks read, {new} new; changeIds {}",
            plural(s.disks.len(), "disk"),
            s.disks
                .iter()
                .map(|d| d.change_id.clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    ui.info(format!(
        "4. full VM backup of {url}: enable CBT (ReconfigVM_Task), CreateSnapshot_Task, allocated areas ('*'), Range reads of the frozen base, RemoveSnapshot_Task"
    ));
    let (full, _) = vmware_backup(ui, &repo, &url, &vmware, &options)?;
    print(&full);
    let mut written = 0;
    let mut block = vec![0u8; BLOCK as usize];
    for (k, d) in vm.disks.iter().enumerate() {
        let blocks = d.capacity_bytes / BLOCK;
        for j in 0..(blocks / 100).max(1) {
            let i = (j * 7919 + k as u64 * 31) % blocks;
            fill_random(9_000_000 + k as u64 * 100_000 + j, &mut block);
            sim.guest_write(&vm.id, d.key, i * BLOCK, &block)?;
            written += 1;
        }
    }
    ui.info(format!(
        "5. the guest writes {written} blocks (1% of each disk); CBT records them"
    ));
    ui.info("6. incremental VM backup: QueryChangedDiskAreas against the last changeId, only those areas read");
    let (incremental, _) = vmware_backup(ui, &repo, &url, &vmware, &options)?;
    print(&incremental);
    let disk = &vm.disks[0];
    let snap = incremental
        .disks
        .iter()
        .find(|d| d.device_key == disk.key)
        .context("the incremental has the first disk")?;
    let restored = dir.join("restored-disk0.img");
    ui.info(format!(
        "7. restoring disk {} from snapshot {} to '{}'",
        disk.key,
        snap.summary.snapshot_id.short(),
        restored.display()
    ));
    let (summary, same) = restore_and_compare(
        ui,
        &repo,
        snap.summary.snapshot_id,
        &restored,
        disk.capacity_bytes,
        &|at, n| Ok(sim.read_disk(&vm.id, disk.key, at, n)?),
    )?;
    let left = sim.snapshots(&vm.id)?.len();
    ui.summary(&serde_json::json!({
        "full_backup": full, "incremental_backup": incremental, "restore": summary,
        "verified": same,
    }));
    if !same {
        bail!("the restored disk differs from the host's disk");
    }
    if left != 0 {
        bail!(
            "{} left on the simulated host",
            plural(left, "vSphere snapshot")
        );
    }
    let full_read: u64 = full.disks.iter().map(|d| d.summary.bytes_read).sum();
    let inc_read: u64 = incremental.disks.iter().map(|d| d.summary.bytes_read).sum();
    ui.info(format!(
        "demo passed in {:.1}s: the incremental read {} where the full read {}, the restore is bit-exact, and no snapshot was left on the host",
        started.elapsed().as_secs_f64(),
        human_bytes(inc_read),
        human_bytes(full_read)
    ));
    sim.shutdown();
    Ok(Outcome::Ok)
}
