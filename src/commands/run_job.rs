//! `cbtvault run JOB|--all`, `cbtvault config check` and `cbtvault runs`:
//! a job of the configuration file run end to end. For each job: list the
//! VMs of its hosts, select, back the selected VMs up `concurrency` at a
//! time (at most `max_concurrent` per physical host), then retention
//! (`forget` by the job's policy, host landmarks included, then `prune`),
//! the offsite copies and the read-back of a sample; then the report
//! (table or `--json`, a file under the state folder), the metrics file
//! and the notifications. One VM's failure never stops the others.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};

use super::backup::{xen_backup, xen_session, NbdOptions, XenOptions, DEFAULT_FULL_EVERY};
use super::backup_vmware::{vmware_backup, vmware_session, VmwareOptions};
use super::forget::{ForgetOptions, Selection as ForgetSelection};
use super::forget_policy::GroupBy;
use super::{Outcome, SnapshotFilter};
use crate::jobs::config::{Config, HostConfig, HostKind, JobConfig, RepositoryConfig};
use crate::jobs::report::{self, PassedVm, RunReport, Status, StepResult, VmResult};
use crate::jobs::select::{self, DiskInfo, Selected, VmInfo};
use crate::output::{human_bytes, plural, Ui};
use crate::progress::NoProgress;
use crate::repo::prune::{MaxUnused, PruneOptions};
use crate::repo::Repository;
use crate::source::vmware::inventory::{list_vms, VmwareVm};
use crate::source::vmware::VmwareUrl;
use crate::source::xenapi::inventory::PoolVm;
use crate::source::xenapi::workflow::WorkflowOptions;
use crate::source::xenapi::XenUrl;
use ::nbd::NbdUri;

/// Opens a repository of the configuration (the command edge knows how
/// to ask for passwords and S3 settings).
pub type OpenRepo<'a> = dyn Fn(&Ui, &RepositoryConfig) -> Result<Repository> + Sync + 'a;

/// Validated options of `run`.
pub struct RunOptions {
    pub config: Config,
    /// Jobs to run, in order (every job for `--all`).
    pub jobs: Vec<String>,
    /// Overrides the jobs' `concurrency`.
    pub concurrency: Option<usize>,
    /// Overrides the jobs' `verify_after`.
    pub verify_after: Option<usize>,
}

/// The jobs `names` of `config`; an unknown name is an error listing the
/// known ones.
pub fn jobs_named(config: &Config, names: &[String], all: bool) -> Result<Vec<String>> {
    if all {
        if config.jobs.is_empty() {
            bail!("{} defines no job", config.source.file.display());
        }
        return Ok(config.jobs.keys().cloned().collect());
    }
    if names.is_empty() {
        bail!("name a job (or --all)");
    }
    for n in names {
        if !config.jobs.contains_key(n) {
            bail!(
                "{} has no job '{n}' (jobs: {})",
                config.source.file.display(),
                config.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(names.to_vec())
}

/// A `xen://` URL of `vm` through `host`.
fn vm_url(host: &HostConfig, vm_uuid: &str) -> Result<XenUrl> {
    Ok(XenUrl::parse(&format!("{}/vm/{vm_uuid}", host.url))?)
}

fn xen_options(host: &HostConfig, enable_cbt: bool) -> XenOptions {
    XenOptions {
        user: host.user.clone(),
        password_file: host.password_file.clone(),
        ca_file: host.ca_file.clone(),
        fingerprint: host.fingerprint.clone(),
        insecure: host.insecure,
        enable_cbt,
        keep_snapshot_data: false,
    }
}

/// The uuid `xen_session` needs in a URL when no object is meant.
const ANY_UUID: &str = "00000000-0000-0000-0000-000000000000";

fn vm_info(v: PoolVm) -> VmInfo {
    VmInfo {
        backupable: !v.is_template && !v.is_snapshot && !v.is_control_domain,
        reference: v.reference,
        uuid: v.uuid,
        name: v.name,
        tags: v.tags,
        power_state: v.power_state,
        resident_on_uuid: v.resident_on.as_ref().map(|h| h.0.clone()),
        resident_on: v.resident_on.map(|h| h.1),
        disks: v
            .disks
            .into_iter()
            .map(|d| DiskInfo {
                vdi_uuid: d.vdi_uuid,
                name: d.name,
                userdevice: d.userdevice,
                size_bytes: d.size_bytes,
            })
            .collect(),
    }
}

/// A `vmware://` URL of VM `moref` through `host`.
fn vmware_url(host: &HostConfig, moref: &str) -> Result<VmwareUrl> {
    Ok(VmwareUrl::parse(&format!("{}/vm/{moref}", host.url))?)
}

fn vmware_options(host: &HostConfig, enable_cbt: bool) -> VmwareOptions {
    VmwareOptions {
        user: host.user.clone(),
        password_file: host.password_file.clone(),
        ca_file: host.ca_file.clone(),
        fingerprint: host.fingerprint.clone(),
        insecure: host.insecure,
        enable_cbt,
        datacenter: host.datacenter.clone(),
        ..VmwareOptions::default()
    }
}

/// A vSphere VM as selection sees it: power states in XenServer's words
/// (poweredOn Running, poweredOff Halted, suspended Suspended), no tags
/// (vSphere's live in its REST API), disks by device key (as
/// `userdevices`) and label (as `names`).
fn vmware_vm_info(v: VmwareVm) -> VmInfo {
    let power_state = match v.power_state.as_str() {
        "poweredOn" => "Running",
        "poweredOff" => "Halted",
        "suspended" => "Suspended",
        other => other,
    }
    .to_string();
    let running = power_state == "Running";
    VmInfo {
        backupable: !v.template,
        reference: v.moref,
        uuid: v.instance_uuid,
        name: v.name,
        tags: Vec::new(),
        power_state,
        resident_on_uuid: v.host.clone().filter(|_| running),
        resident_on: v.host.filter(|_| running),
        disks: v
            .disks
            .into_iter()
            .map(|d| DiskInfo {
                vdi_uuid: d.key.to_string(),
                name: d.label,
                userdevice: d.key.to_string(),
                size_bytes: d.capacity_bytes,
            })
            .collect(),
    }
}

/// An NBD host's exports as selection sees them: each a running "VM" of
/// one disk, named by its export name (the URI when it has none), on the
/// server's address (so `max_concurrent` limits each server).
fn nbd_inventory(host: &HostConfig) -> Result<Vec<VmInfo>> {
    host.exports
        .iter()
        .map(|text| {
            let uri = NbdUri::parse(text)?;
            let name = if uri.export.is_empty() {
                text.clone()
            } else {
                uri.export.clone()
            };
            Ok(VmInfo {
                reference: text.clone(),
                uuid: uri.identity(),
                name: name.clone(),
                tags: Vec::new(),
                power_state: "Running".into(),
                resident_on: Some(uri.address.to_string()),
                resident_on_uuid: Some(uri.address.to_string()),
                disks: vec![DiskInfo {
                    vdi_uuid: uri.identity(),
                    name,
                    userdevice: "0".into(),
                    size_bytes: 0,
                }],
                backupable: true,
            })
        })
        .collect()
}

fn nbd_options(host: &HostConfig) -> NbdOptions {
    NbdOptions {
        tls_ca: host.tls_ca.clone(),
        tls_cert_pin: host.tls_cert_pin.clone(),
        tls_name: host.tls_name.clone(),
        connections: host.nbd_connections,
        ..NbdOptions::default()
    }
}

/// The VMs of one configured host (pool).
fn inventory(ui: &Ui, host_name: &str, host: &HostConfig) -> Result<Vec<VmInfo>> {
    if host.kind == HostKind::Nbd {
        return nbd_inventory(host);
    }
    if host.kind == HostKind::Vsphere {
        let url = vmware_url(host, "x")?;
        let session = vmware_session(ui, &url, &vmware_options(host, false))
            .with_context(|| format!("log in to host '{host_name}' ({})", url.authority()))?;
        // The configured datacenter's VMs only: their datastores are read
        // through it.
        let vms = match &host.datacenter {
            Some(dc) => session
                .datacenter(dc)
                .and_then(|root| list_vms(&session, Some(&root))),
            None => list_vms(&session, None),
        };
        session.logout();
        return Ok(vms
            .with_context(|| format!("list the VMs of host '{host_name}'"))?
            .into_iter()
            .map(vmware_vm_info)
            .collect());
    }
    let url = vm_url(host, ANY_UUID)?;
    let session = xen_session(ui, &url, &xen_options(host, false))
        .with_context(|| format!("log in to host '{host_name}' ({})", url.authority()))?;
    let vms = session.pool_inventory();
    session.logout();
    Ok(vms
        .with_context(|| format!("list the VMs of host '{host_name}'"))?
        .into_iter()
        .map(vm_info)
        .collect())
}

/// What a job would back up now, host by host.
pub struct Plan {
    /// (configured host, selected VM).
    pub work: Vec<(String, Selected)>,
    pub passed: Vec<PassedVm>,
    /// Hosts that could not be listed.
    pub errors: Vec<String>,
}

pub fn plan(ui: &Ui, config: &Config, job: &JobConfig) -> Plan {
    let mut plan = Plan {
        work: Vec::new(),
        passed: Vec::new(),
        errors: Vec::new(),
    };
    let mut seen = BTreeSet::new();
    for host_name in &job.hosts {
        let host = &config.hosts[host_name];
        match inventory(ui, host_name, host) {
            Ok(vms) => {
                let r = select::select(&job.selection, &vms);
                for s in r.selected {
                    // Two configured hosts of one pool list the same VMs.
                    if seen.insert(s.vm.uuid.clone()) {
                        plan.work.push((host_name.clone(), s));
                    }
                }
                plan.passed.extend(r.passed.into_iter().map(|p| PassedVm {
                    uuid: p.uuid,
                    name: p.name,
                    reason: p.reason,
                }));
            }
            Err(e) => plan.errors.push(format!("{e:#}")),
        }
    }
    plan
}

/// `config check`: the file is valid; for each job, what it selects now.
pub fn check(ui: &Ui, config: &Config, jobs: &[String], list_vms: bool) -> Result<Outcome> {
    /// What a job selects now (None: not asked, `--offline`).
    #[derive(serde::Serialize)]
    struct JobPlan<'a> {
        job: &'a str,
        repository: &'a str,
        hosts: &'a [String],
        vms: Option<Vec<&'a Selected>>,
        passed: Option<&'a [PassedVm]>,
        errors: &'a [String],
    }
    ui.info(format!(
        "{}: valid ({}, {}, {})",
        config.source.file.display(),
        plural(config.repositories.len(), "repository"),
        plural(config.hosts.len(), "host"),
        plural(config.jobs.len(), "job")
    ));
    if !list_vms {
        let body: Vec<JobPlan> = jobs
            .iter()
            .map(|name| {
                let job = &config.jobs[name];
                JobPlan {
                    job: name,
                    repository: &job.repository,
                    hosts: &job.hosts,
                    vms: None,
                    passed: None,
                    errors: &[],
                }
            })
            .collect();
        ui.summary(&serde_json::json!({
            "config": config.source.file,
            "valid": true,
            "jobs": body,
        }));
        return Ok(Outcome::Ok);
    }
    let mut outcome = Outcome::Ok;
    let mut plans = Vec::new();
    for name in jobs {
        let job = &config.jobs[name];
        let p = plan(ui, config, job);
        ui.info(format!(
            "job '{name}': {} selected (repository '{}')",
            plural(p.work.len(), "VM"),
            job.repository
        ));
        for (host, s) in &p.work {
            let disks: Vec<String> = s
                .disks()
                .map(|d| format!("{} ({})", d.userdevice, human_bytes(d.size_bytes)))
                .collect();
            let mut line = format!(
                "  {} {} on '{host}' [{}]: disks {}",
                s.vm.name,
                s.vm.uuid,
                s.vm.power_state,
                disks.join(", ")
            );
            if !s.excluded_disks.is_empty() {
                let x: Vec<&str> = s
                    .excluded_disks
                    .iter()
                    .map(|d| d.userdevice.as_str())
                    .collect();
                line.push_str(&format!("; excluded disks {}", x.join(", ")));
            }
            ui.info(line);
        }
        for p in &p.passed {
            ui.info(format!("  not backed up: {} ({})", p.name, p.reason));
        }
        for e in &p.errors {
            ui.warn(format!("job '{name}': {e}"));
            outcome = outcome.and(Outcome::Warnings);
        }
        plans.push((name, job, p));
    }
    let body: Vec<JobPlan> = plans
        .iter()
        .map(|(name, job, p)| JobPlan {
            job: name,
            repository: &job.repository,
            hosts: &job.hosts,
            vms: Some(p.work.iter().map(|(_, s)| s).collect()),
            passed: Some(&p.passed),
            errors: &p.errors,
        })
        .collect();
    ui.summary(&serde_json::json!({
        "config": config.source.file,
        "valid": true,
        "jobs": body,
    }));
    Ok(outcome)
}

/// The work queue: the next VM whose physical host has a free slot.
struct Queue {
    state: Mutex<(VecDeque<Work>, BTreeMap<String, usize>)>,
    freed: Condvar,
}

struct Work {
    host: String,
    /// Slot key: configured host and physical host.
    slot: String,
    limit: usize,
    selected: Selected,
}

impl Queue {
    fn next(&self) -> Option<Work> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.0.is_empty() {
                return None;
            }
            let (queue, busy) = &mut *st;
            let free = queue
                .iter()
                .position(|w| busy.get(&w.slot).copied().unwrap_or(0) < w.limit);
            if let Some(i) = free {
                let w = queue.remove(i)?;
                *busy.entry(w.slot.clone()).or_insert(0) += 1;
                return Some(w);
            }
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self, slot: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = st.1.get_mut(slot) {
            *n = n.saturating_sub(1);
        }
        self.freed.notify_all();
    }
}

/// Backs one VM up; never fails: a failure is the result's status.
fn backup_vm(
    ui: &Ui,
    repo: &Repository,
    host: &HostConfig,
    job: &JobConfig,
    work: &Work,
    concurrency: usize,
) -> (VmResult, Vec<crate::format::SnapshotId>) {
    let started = Utc::now();
    let clock = Instant::now();
    let vm = &work.selected.vm;
    let mut result = VmResult {
        uuid: vm.uuid.clone(),
        name: vm.name.clone(),
        host: work.host.clone(),
        resident_on: vm.resident_on.clone(),
        disks: work.selected.disks().count(),
        excluded_disks: work.selected.excluded_disks.len(),
        mode: None,
        full_reasons: Vec::new(),
        bytes_read: 0,
        bytes_stored: 0,
        vm_backup_id: None,
        started,
        finished: started,
        seconds: 0.0,
        status: Status::Ok,
        error: None,
        warnings: Vec::new(),
    };
    let mut committed = Vec::new();
    let quiet = Ui::new(false, true, "run");
    let mut tags = job.tags.clone();
    tags.push(job.job_tag());
    let snapshot = super::backup::SnapshotOptions {
        parent: crate::repo::backup::plan::ParentRequest::Newest,
        full_every: match job.full_every {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some(DEFAULT_FULL_EVERY),
        },
        tags,
        strict: false,
        concurrent: concurrency as u32,
        defer_commit: false,
    };
    if host.kind == HostKind::Nbd {
        let outcome = (|| -> Result<_> {
            let uri = NbdUri::parse(&vm.reference)?;
            super::backup::nbd_backup(
                &quiet,
                repo,
                &uri,
                &vm.reference,
                host.dirty_bitmap.as_deref(),
                &nbd_options(host),
                None,
                &snapshot,
            )
        })();
        match outcome {
            Ok(summary) => {
                result.mode = Some(mode_word(summary.full as usize, !summary.full as usize));
                result.bytes_read = summary.bytes_read;
                result.bytes_stored = summary.bytes_stored;
                committed.push(summary.snapshot_id);
                if let Some(r) = &summary.new_set_reason {
                    result.full_reasons.push(r.clone());
                }
                for c in &summary.source_changed {
                    result.warnings.push(format!("changed while read: {c}"));
                }
                if !result.warnings.is_empty() {
                    result.status = Status::Warnings;
                }
            }
            Err(e) => {
                result.status = Status::Failed;
                result.error = Some(format!("{e:#}"));
            }
        }
        return finish_vm(ui, result, clock, committed);
    }
    if host.kind == HostKind::Vsphere {
        let outcome = (|| -> Result<_> {
            let url = vmware_url(host, &vm.reference)?;
            let options = VmwareOptions {
                exclude_keys: work
                    .selected
                    .excluded_disks
                    .iter()
                    .filter_map(|d| d.userdevice.parse().ok())
                    .collect(),
                ..vmware_options(host, job.enable_cbt)
            };
            vmware_backup(&quiet, repo, &url, &options, &snapshot)
        })();
        match outcome {
            Ok((summary, run)) => {
                let full = summary.disks.iter().filter(|d| d.summary.full).count();
                result.mode = Some(mode_word(full, summary.disks.len() - full));
                for d in &summary.disks {
                    result.bytes_read += d.summary.bytes_read;
                    result.bytes_stored += d.summary.bytes_stored;
                    committed.push(d.summary.snapshot_id);
                    if let Some(r) = d.summary.new_set_reason.as_ref().or(d.full_reason.as_ref()) {
                        result.full_reasons.push(format!("disk {}: {r}", d.label));
                    }
                }
                if let Some(c) = &summary.config {
                    result.bytes_stored += c.bytes_stored;
                    committed.push(c.snapshot_id);
                }
                result.vm_backup_id = Some(summary.vm_backup_id.clone());
                if let Some(s) = &run.left_on_host {
                    result
                        .warnings
                        .push(format!("left on the host: snapshot {s}"));
                }
                for s in &summary.host_leftovers_removed {
                    result
                        .warnings
                        .push(format!("removed snapshot {s} that an interrupted run left"));
                }
                if !result.warnings.is_empty() {
                    result.status = Status::Warnings;
                }
            }
            Err(e) => {
                result.status = Status::Failed;
                result.error = Some(format!("{e:#}"));
            }
        }
        return finish_vm(ui, result, clock, committed);
    }
    let outcome = (|| -> Result<_> {
        let url = vm_url(host, &vm.uuid)?;
        let xen = xen_options(host, job.enable_cbt);
        let session = xen_session(&quiet, &url, &xen)?;
        let workflow = WorkflowOptions {
            enable_cbt: job.enable_cbt,
            nbd_connections: host.nbd_connections,
            exclude_vdis: work
                .selected
                .excluded_disks
                .iter()
                .map(|d| d.vdi_uuid.to_ascii_lowercase())
                .collect(),
            ..WorkflowOptions::default()
        };
        let r = xen_backup(&quiet, repo, &url, &session, &workflow, &snapshot);
        session.logout();
        r
    })();
    match outcome {
        Ok((summary, run)) => {
            let full = summary.disks.iter().filter(|d| d.summary.full).count();
            result.mode = Some(mode_word(full, summary.disks.len() - full));
            for d in &summary.disks {
                result.bytes_read += d.summary.bytes_read;
                result.bytes_stored += d.summary.bytes_stored;
                committed.push(d.summary.snapshot_id);
                if let Some(r) = d.summary.new_set_reason.as_ref().or(d.lost_reason.as_ref()) {
                    result
                        .full_reasons
                        .push(format!("disk {}: {r}", d.name_label));
                }
                if let Some(why) = &d.cbt_unavailable {
                    result.warnings.push(format!(
                        "disk {} has no change tracking (read in full every run): {why}",
                        d.name_label
                    ));
                }
                for c in &d.summary.source_changed {
                    result
                        .warnings
                        .push(format!("disk {} changed while read: {c}", d.name_label));
                }
            }
            if let Some(m) = &summary.metadata {
                result.bytes_stored += m.bytes_stored;
                committed.push(m.snapshot_id);
            }
            result.vm_backup_id = summary.vm_backup.clone();
            for o in &run.left_on_host {
                result.warnings.push(format!("left on the host: {o}"));
            }
            for c in &run.chains_ended {
                result.warnings.push(format!("chain ended: {c}"));
            }
            if !result.warnings.is_empty() {
                result.status = Status::Warnings;
            }
        }
        Err(e) => {
            result.status = Status::Failed;
            result.error = Some(format!("{e:#}"));
        }
    }
    finish_vm(ui, result, clock, committed)
}

/// `full`, `incremental` or `mixed`, from the disks of each kind.
fn mode_word(full: usize, incremental: usize) -> String {
    match (full, incremental) {
        (_, 0) => "full",
        (0, _) => "incremental",
        _ => "mixed",
    }
    .to_string()
}

/// Times the VM's result and says it on the terminal.
fn finish_vm(
    ui: &Ui,
    mut result: VmResult,
    clock: Instant,
    committed: Vec<crate::format::SnapshotId>,
) -> (VmResult, Vec<crate::format::SnapshotId>) {
    result.finished = Utc::now();
    result.seconds = clock.elapsed().as_secs_f64();
    let line = match result.status {
        Status::Failed => format!(
            "{}: FAILED after {:.1}s: {}",
            result.name,
            result.seconds,
            result.error.as_deref().unwrap_or("")
        ),
        _ => format!(
            "{}: {} {} ({} read, {} stored) in {:.1}s{}",
            result.name,
            result.mode.as_deref().unwrap_or("-"),
            plural(result.disks, "disk"),
            human_bytes(result.bytes_read),
            human_bytes(result.bytes_stored),
            result.seconds,
            if result.warnings.is_empty() {
                String::new()
            } else {
                format!(", {}", plural(result.warnings.len(), "warning"))
            }
        ),
    };
    if result.status == Status::Failed {
        ui.warn(line);
    } else {
        ui.info(line);
    }
    (result, committed)
}

/// Reads back every disk snapshot of a VM backup through the restore path
/// (every block checked against its hash), writing nothing.
fn verify(repo: &Repository, snapshots: &[crate::format::SnapshotId]) -> Result<(u64, u64)> {
    struct Discard(u64);
    impl crate::repo::restore::BlockSink for Discard {
        fn write_data(&mut self, _offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0 += data.len() as u64;
            Ok(())
        }
        fn write_zeros(&mut self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn finish(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Held while reading: a prune elsewhere cannot take the packs away.
    let _lock = repo.lock(false, "verify")?;
    let (mut blocks, mut bytes) = (0, 0);
    for id in snapshots {
        let reader = repo.chain_reader(*id)?;
        let mut sink = Discard(0);
        let s = crate::repo::restore::run(
            repo,
            reader,
            &mut sink,
            crate::repo::restore::RestoreOptions::default(),
            &NoProgress,
        )
        .with_context(|| format!("read back snapshot {id}"))?;
        blocks += s.blocks_data;
        bytes += sink.0;
    }
    Ok((blocks, bytes))
}

/// The health check of a VM's newest backup: each disk restored into a
/// new VDI of SR `sr` on the VM's host, read back over NBD, compared and
/// destroyed. Returns the disks and bytes checked.
fn health_check(
    ui: &Ui,
    config: &Config,
    repo: &Repository,
    host_name: &str,
    sr: &str,
    snapshots: &[crate::format::SnapshotId],
) -> Result<(u64, u64)> {
    let host = &config.hosts[host_name];
    let url = vm_url(host, ANY_UUID)?;
    let _lock = repo.lock(false, "verify")?;
    let entries: Vec<crate::repo::SnapshotEntry> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| snapshots.contains(&s.meta.id))
        .filter(|s| {
            s.meta
                .landmark
                .get(crate::source::xenapi::workflow::keys::KIND)
                .is_none_or(|k| k == "disk")
        })
        .collect();
    let session = xen_session(ui, &url, &xen_options(host, false))?;
    let mut bytes = 0;
    let result = (|| -> Result<()> {
        for e in &entries {
            bytes += super::restore_xen::health_check(repo, &session, &url, sr, e)
                .with_context(|| format!("health check of snapshot {}", e.meta.id))?;
        }
        Ok(())
    })();
    session.logout();
    result.map(|()| (entries.len() as u64, bytes))
}

fn step(name: String, clock: Instant, r: Result<(Status, String)>) -> StepResult {
    let (status, detail) = match r {
        Ok(x) => x,
        Err(e) => (Status::Failed, format!("{e:#}")),
    };
    StepResult {
        step: name,
        status,
        detail,
        seconds: clock.elapsed().as_secs_f64(),
    }
}

/// Runs one job; the report says how it went (an `Err` only when the job
/// could not start: its repository does not open).
pub fn run_one(
    ui: &Ui,
    config: &Config,
    job: &JobConfig,
    open: &OpenRepo,
    concurrency: usize,
    verify_after: usize,
) -> RunReport {
    let started = Utc::now();
    let clock = Instant::now();
    let mut report = RunReport {
        run_id: report::run_id(&job.name, started),
        job: job.name.clone(),
        repository: job.repository.clone(),
        started,
        finished: started,
        seconds: 0.0,
        concurrency,
        status: Status::Ok,
        vms: Vec::new(),
        passed: Vec::new(),
        steps: Vec::new(),
        errors: Vec::new(),
    };
    let finish = |mut report: RunReport| {
        report.finished = Utc::now();
        report.seconds = clock.elapsed().as_secs_f64();
        report.status = report.compute_status();
        report
    };
    let repo = match open(ui, &config.repositories[&job.repository]) {
        Ok(r) => r,
        Err(e) => {
            report
                .errors
                .push(format!("repository '{}': {e:#}", job.repository));
            return finish(report);
        }
    };
    let plan = plan(ui, config, job);
    report.passed = plan.passed;
    report.errors = plan.errors;
    ui.info(format!(
        "job '{}': {} selected, {} at a time",
        job.name,
        plural(plan.work.len(), "VM"),
        concurrency
    ));
    let queue = Queue {
        state: Mutex::new((
            plan.work
                .into_iter()
                .map(|(host, selected)| {
                    let h = &config.hosts[&host];
                    Work {
                        slot: format!(
                            "{host}/{}",
                            selected
                                .vm
                                .resident_on
                                .as_deref()
                                .unwrap_or("(not running)")
                        ),
                        limit: h.max_concurrent,
                        host,
                        selected,
                    }
                })
                .collect(),
            BTreeMap::new(),
        )),
        freed: Condvar::new(),
    };
    let results: Mutex<Vec<(VmResult, Vec<crate::format::SnapshotId>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                while let Some(work) = queue.next() {
                    if crate::interrupt::requested().is_some() {
                        queue.done(&work.slot);
                        continue;
                    }
                    let host = &config.hosts[&work.host];
                    let r = backup_vm(ui, &repo, host, job, &work, concurrency);
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                    queue.done(&work.slot);
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by(|a, b| a.0.name.cmp(&b.0.name).then(a.0.uuid.cmp(&b.0.uuid)));
    if crate::interrupt::requested().is_some() {
        report
            .errors
            .push("interrupted: VMs not started were skipped".into());
    }
    // Retention: only after every backup, and only of this job's snapshots.
    if let Some(retention) = &job.retention {
        let clock = Instant::now();
        let r = (|| -> Result<(Status, String)> {
            // Each host's landmarks are released with its own credentials.
            let mut per_host = BTreeMap::new();
            for name in &job.hosts {
                let host = &config.hosts[name];
                if host.kind != HostKind::Xenserver {
                    continue;
                }
                per_host.insert(
                    vm_url(host, ANY_UUID)?.authority(),
                    xen_options(host, false),
                );
            }
            let filter = SnapshotFilter {
                tags: vec![job.job_tag()],
                ..SnapshotFilter::default()
            };
            let before = super::filtered(&repo, &filter)?.len();
            let prune = if retention.prune {
                Some(PruneOptions {
                    max_unused: match &retention.max_unused {
                        Some(v) => MaxUnused::parse(v)?,
                        None => PruneOptions::default().max_unused,
                    },
                    dry_run: false,
                })
            } else {
                None
            };
            let options = ForgetOptions {
                selection: ForgetSelection::Policy {
                    policy: retention.policy.clone(),
                    group_by: GroupBy::parse("source").map_err(anyhow::Error::msg)?,
                },
                filter: filter.clone(),
                dry_run: false,
                prune,
                no_host: false,
                xen: job
                    .hosts
                    .iter()
                    .map(|h| &config.hosts[h])
                    .find(|h| h.kind == HostKind::Xenserver)
                    .map(|h| xen_options(h, false))
                    .unwrap_or_default(),
                per_host,
            };
            let quiet = Ui::new(false, true, "run");
            let outcome = super::forget::run(&quiet, &repo, &options)?;
            let after = super::filtered(&repo, &filter)?.len();
            let status = if outcome == Outcome::Ok {
                Status::Ok
            } else {
                Status::Warnings
            };
            Ok((
                status,
                format!(
                    "{}: forgot {} of {}{}",
                    retention.policy,
                    before - after.min(before),
                    plural(before, "snapshot"),
                    if retention.prune { ", pruned" } else { "" }
                ),
            ))
        })();
        report.steps.push(step("retention".into(), clock, r));
    }
    for name in &job.offsite {
        let clock = Instant::now();
        let r = (|| -> Result<(Status, String)> {
            let to = open(ui, &config.repositories[name])?;
            let _from_lock = repo.lock(false, "copy")?;
            let _to_lock = to.lock(false, "copy")?;
            let filter = SnapshotFilter {
                tags: vec![job.job_tag()],
                ..SnapshotFilter::default()
            };
            let ids: Vec<crate::format::SnapshotId> = super::filtered(&repo, &filter)?
                .iter()
                .map(|s| s.meta.id)
                .collect();
            let c = crate::repo::copy::copy(&repo, &to, &ids, &NoProgress)
                .with_context(|| format!("copy to '{name}' (the next run resumes it)"))?;
            Ok((
                Status::Ok,
                format!(
                    "{} copied, {} already there, {} sent",
                    plural(c.copied_snapshot_ids.len(), "snapshot"),
                    c.present_snapshot_ids.len(),
                    human_bytes(c.sent_stored_bytes)
                ),
            ))
        })();
        report.steps.push(step(format!("copy to {name}"), clock, r));
    }
    if verify_after > 0 {
        let ok: Vec<&(VmResult, Vec<crate::format::SnapshotId>)> = results
            .iter()
            .filter(|(v, ids)| v.status != Status::Failed && !ids.is_empty())
            .collect();
        // A different sample each day, so every VM is read back in turn.
        let offset = if ok.is_empty() {
            0
        } else {
            (started.timestamp() / 86_400) as usize % ok.len()
        };
        for (v, ids) in ok
            .iter()
            .cycle()
            .skip(offset)
            .take(verify_after.min(ok.len()))
        {
            let clock = Instant::now();
            if let Some(sr) = &config.hosts[&v.host].verify_sr {
                let r = health_check(ui, config, &repo, &v.host, sr, ids).map(|(disks, bytes)| {
                    (
                        Status::Ok,
                        format!(
                            "{} restored into SR {sr}, read back over NBD ({}) and removed",
                            plural(disks, "disk"),
                            human_bytes(bytes)
                        ),
                    )
                });
                report
                    .steps
                    .push(step(format!("verify {}", v.name), clock, r));
                continue;
            }
            let r = verify(&repo, ids).map(|(blocks, bytes)| {
                (
                    Status::Ok,
                    format!(
                        "{} read back, {} blocks ({}) checked",
                        plural(ids.len(), "snapshot"),
                        blocks,
                        human_bytes(bytes)
                    ),
                )
            });
            report
                .steps
                .push(step(format!("verify {}", v.name), clock, r));
        }
    }
    report.vms = results.into_iter().map(|(v, _)| v).collect();
    finish(report)
}

/// Where the reports of runs are kept.
pub fn runs_dir(config: &Config) -> PathBuf {
    config.state_dir.join("runs")
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader (node_exporter, `runs`) never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("create '{}'", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("write '{}'", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to '{}'", path.display()))?;
    Ok(())
}

/// Past reports of the runs folder, oldest first (unreadable ones skipped
/// with their reason).
pub fn past_reports(dir: &Path) -> Result<(Vec<RunReport>, Vec<String>)> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((out, bad)),
        Err(e) => return Err(e).with_context(|| format!("list '{}'", dir.display())),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for p in paths {
        match std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<RunReport>(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => out.push(r),
            Err(e) => bad.push(format!("{}: {e}", p.display())),
        }
    }
    // By start time (file names of older versions had whole seconds).
    out.sort_by_key(|r| r.started);
    Ok((out, bad))
}

/// Saves `report` as `DIR/RUN_ID.json` without replacing another run's
/// report: two runs that started in the same millisecond (or a clock set
/// back) get `RUN_ID-2`, `RUN_ID-3`, ... The file appears whole (written
/// aside, then linked under its name, which fails if the name is taken).
pub fn save_report(dir: &Path, report: &mut RunReport) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create '{}'", dir.display()))?;
    let base = report.run_id.clone();
    let tmp = dir.join(format!(".{base}.json.tmp-{}", std::process::id()));
    let result = (|| {
        for n in 1..=1000u32 {
            report.run_id = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            let path = dir.join(format!("{}.json", report.run_id));
            let json = serde_json::to_vec_pretty(&*report).context("encode the report")?;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("create '{}'", tmp.display()))?;
            f.write_all(&json)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("write '{}'", tmp.display()))?;
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                // A file system without hard links: create the name
                // exclusively and write it (a reader may see it partly
                // written, never another run's report replaced).
                Err(_) => match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut f) => {
                        f.write_all(&json)
                            .and_then(|()| f.sync_all())
                            .with_context(|| format!("write '{}'", path.display()))?;
                        return Ok(path);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("create '{}'", path.display()));
                    }
                },
            }
        }
        anyhow::bail!("1000 run reports named {base}[-N] already exist")
    })();
    let _ = std::fs::remove_file(&tmp);
    if result.is_err() {
        report.run_id = base;
    }
    result
}

/// After a run: the report file, the metrics file, the hooks. Problems
/// here are warnings: the backups are done.
fn publish(ui: &Ui, config: &Config, job: &JobConfig, report: &mut RunReport) -> bool {
    let mut clean = true;
    let path = match save_report(&runs_dir(config), report) {
        Ok(path) => path,
        Err(e) => {
            ui.warn(format!("the run report was not saved: {e:#}"));
            clean = false;
            runs_dir(config).join(format!("{}.json", report.run_id))
        }
    };
    let report = &*report;
    let json = serde_json::to_vec_pretty(report).unwrap_or_default();
    if let Some(metrics) = &job.notify.metrics_file {
        let history = past_reports(&runs_dir(config))
            .map(|(r, _)| r)
            .unwrap_or_default();
        let last_success = |uuid: &str| -> Option<DateTime<Utc>> {
            history
                .iter()
                .filter(|r| r.job == job.name && r.run_id != report.run_id)
                .flat_map(|r| r.vms.iter())
                .filter(|v| v.uuid == uuid && v.status != Status::Failed)
                .map(|v| v.finished)
                .max()
        };
        if let Err(e) = write_atomically(metrics, report.metrics(&last_success).as_bytes()) {
            ui.warn(format!("the metrics file was not written: {e:#}"));
            clean = false;
        }
    }
    if let Some(url) = &job.notify.webhook {
        if let Err(e) = post_webhook(url, job.notify.webhook_ca_file.as_deref(), &json) {
            ui.warn(format!("webhook {url}: {e:#}"));
            clean = false;
        }
    }
    let hooks = [
        (
            job.notify
                .on_failure
                .as_ref()
                .filter(|_| report.status == Status::Failed),
            "on_failure",
        ),
        (job.notify.on_completion.as_ref(), "on_completion"),
    ];
    for (command, name) in hooks {
        let Some(command) = command else { continue };
        let status = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .env("CBTVAULT_REPORT", &path)
            .env("CBTVAULT_JOB", &job.name)
            .env("CBTVAULT_STATUS", report.status.word())
            .stdin(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                ui.warn(format!("{name} hook exited with {s}"));
                clean = false;
            }
            Err(e) => {
                ui.warn(format!("{name} hook could not start: {e}"));
                clean = false;
            }
        }
    }
    clean
}

/// POSTs the report; TLS verified with the system's roots or `ca_file`.
fn post_webhook(url: &str, ca_file: Option<&Path>, body: &[u8]) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            let (pem, origin) = nbd::tls::read_pem_file(f, "webhook_ca_file")?;
            for c in nbd::tls::parse_certs(&pem, &origin)? {
                roots.add(c)?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()?;
    if !resp.status().is_success() {
        bail!("answered {}", resp.status());
    }
    Ok(())
}

/// `run`: each job in turn; the outcome is the worst of them.
pub fn run(ui: &Ui, options: &RunOptions, open: &OpenRepo) -> Result<Outcome> {
    let mut reports = Vec::new();
    let mut outcome = Outcome::Ok;
    for name in &options.jobs {
        let job = &options.config.jobs[name];
        let concurrency = options.concurrency.unwrap_or(job.concurrency);
        let verify_after = options.verify_after.unwrap_or(job.verify_after);
        let mut report = run_one(ui, &options.config, job, open, concurrency, verify_after);
        if !ui.json && !ui.quiet {
            ui.print(report.table());
        }
        let published = publish(ui, &options.config, job, &mut report);
        outcome = outcome.and(match report.status {
            Status::Ok if published => Outcome::Ok,
            Status::Ok | Status::Warnings => Outcome::Warnings,
            Status::Failed if report.nothing_done() => Outcome::Failed,
            Status::Failed => Outcome::SomeFailed,
        });
        reports.push(report);
    }
    ui.summary(&serde_json::json!({ "runs": reports }));
    Ok(outcome)
}

/// `runs`: past runs, oldest first.
pub fn list_runs(
    ui: &Ui,
    config: &Config,
    job: Option<&str>,
    last: Option<usize>,
) -> Result<Outcome> {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        run_id: &'a str,
        job: &'a str,
        #[serde(rename = "start_time")]
        started: DateTime<Utc>,
        #[serde(rename = "duration_seconds")]
        seconds: f64,
        status: Status,
        #[serde(rename = "vm_count")]
        vms: usize,
        #[serde(rename = "failed_vm_count")]
        vms_failed: usize,
        #[serde(rename = "read_bytes")]
        bytes_read: u64,
        #[serde(rename = "stored_bytes")]
        bytes_stored: u64,
    }
    let (reports, bad) = past_reports(&runs_dir(config))?;
    for b in &bad {
        ui.warn(format!("unreadable run report {b}"));
    }
    let mut chosen: Vec<&RunReport> = reports
        .iter()
        .filter(|r| job.is_none_or(|j| r.job == j))
        .collect();
    if let Some(n) = last {
        let skip = chosen.len().saturating_sub(n);
        chosen.drain(..skip);
    }
    let rows: Vec<Row> = chosen
        .iter()
        .map(|r| Row {
            run_id: &r.run_id,
            job: &r.job,
            started: r.started,
            seconds: r.seconds,
            status: r.status,
            vms: r.vms.len(),
            vms_failed: r.failed_vms(),
            bytes_read: r.vms.iter().map(|v| v.bytes_read).sum(),
            bytes_stored: r.vms.iter().map(|v| v.bytes_stored).sum(),
        })
        .collect();
    if !ui.json {
        ui.print(format!(
            "{:<32} {:<20} {:>8} {:>6} {:>6} {:>10} {:>10}  Result",
            "Run", "Started (UTC)", "Time", "VMs", "Failed", "Read", "Stored"
        ));
        for r in &rows {
            ui.print(format!(
                "{:<32} {:<20} {:>7.1}s {:>6} {:>6} {:>10} {:>10}  {}",
                r.run_id,
                r.started.format("%Y-%m-%d %H:%M:%S"),
                r.seconds,
                r.vms,
                r.vms_failed,
                human_bytes(r.bytes_read),
                human_bytes(r.bytes_stored),
                r.status.word()
            ));
        }
        ui.print(plural(rows.len(), "run"));
    }
    for r in &rows {
        ui.item("run", r);
    }
    ui.summary(&serde_json::json!({ "run_count": rows.len() }));
    Ok(if bad.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Warnings
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(started: DateTime<Utc>) -> RunReport {
        RunReport {
            run_id: report::run_id("daily", started),
            job: "daily".into(),
            repository: "main".into(),
            started,
            finished: started,
            seconds: 0.0,
            concurrency: 1,
            status: Status::Ok,
            vms: vec![],
            passed: vec![],
            steps: vec![],
            errors: vec![],
        }
    }

    #[test]
    fn a_report_never_replaces_another_runs() {
        let dir = tempfile::tempdir().unwrap();
        let t = DateTime::parse_from_rfc3339("2026-12-07T11:00:00.250Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut first = report(t);
        let mut second = report(t);
        let mut third = report(t);
        third.status = Status::Failed;
        let a = save_report(dir.path(), &mut first).unwrap();
        let b = save_report(dir.path(), &mut second).unwrap();
        let c = save_report(dir.path(), &mut third).unwrap();
        assert_eq!(first.run_id, "20261207T110000.250Z-daily");
        assert_eq!(second.run_id, "20261207T110000.250Z-daily-2");
        assert_eq!(third.run_id, "20261207T110000.250Z-daily-3");
        assert_eq!(c, dir.path().join("20261207T110000.250Z-daily-3.json"));
        assert!(a != b && b != c);
        // Each file holds its own report, nothing else is left behind.
        let (all, bad) = past_reports(dir.path()).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        let ids: Vec<&str> = all.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.contains(&third.run_id.as_str()));
        let saved: RunReport = serde_json::from_slice(&std::fs::read(&c).unwrap()).unwrap();
        assert_eq!((saved.run_id, saved.status), (third.run_id, Status::Failed));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
