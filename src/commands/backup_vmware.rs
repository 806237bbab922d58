//! `backup vmware://[USER@]HOST[:PORT]/vm/ID`: a vSphere VM backup
//! (`source::vmware::workflow`) committed into the repository, one
//! snapshot per disk and one for the VM's configuration, grouped as one VM
//! backup.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::backup::{backup_disk, report_human, Allocation, SnapshotOptions};
use super::Outcome;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::backup::plan::ParentRequest;
use crate::repo::backup::BackupSummary;
use crate::repo::{RepoError, Repository};
use crate::source::vmware::client::Session;
use crate::source::vmware::workflow::{self, Committer, FrozenDisk};
use crate::source::vmware::VmwareUrl;
use crate::source::Changes;

/// The environment variable holding the vSphere password.
pub const VMWARE_PASSWORD_ENV: &str = "CBTVAULT_VMWARE_PASSWORD";

/// How to reach a vSphere host, and what the backup may do there.
#[derive(Debug, Clone, Default)]
pub struct VmwareOptions {
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub fingerprint: Vec<String>,
    pub insecure: bool,
    pub enable_cbt: bool,
    pub quiesce: bool,
    /// `dcPath` of the datastore reads (default `ha-datacenter`, ESXi's).
    pub datacenter: Option<String>,
    /// Read the disks' bytes over NBD from a server this command starts
    /// per disk (`source::vmware::data_command`).
    pub data_command: Option<String>,
    /// Device keys of disks neither read nor committed (a job's
    /// `exclude_disks`).
    pub exclude_keys: Vec<i32>,
}

/// Logs in as the command line says; the password from
/// `--vmware-password-file` or the environment, never argv.
pub fn vmware_session(ui: &Ui, url: &VmwareUrl, o: &VmwareOptions) -> Result<Session> {
    vmware_login(
        ui,
        url.user.as_deref(),
        &url.host,
        url.port,
        &url.authority(),
        o,
    )
}

/// Logs in to `host:port` (`authority`) as `--user`, else the URL's user,
/// else root.
pub fn vmware_login(
    ui: &Ui,
    url_user: Option<&str>,
    host: &str,
    port: u16,
    authority: &str,
    o: &VmwareOptions,
) -> Result<Session> {
    let trust = super::backup::https_trust(
        ui,
        authority,
        o.insecure,
        &o.fingerprint,
        o.ca_file.as_deref(),
    )?;
    let user = o
        .user
        .clone()
        .or_else(|| url_user.map(str::to_string))
        .unwrap_or_else(|| "root".to_string());
    let password = match &o.password_file {
        Some(p) => {
            let text =
                zeroize::Zeroizing::new(std::fs::read_to_string(p).with_context(|| {
                    format!("read the vSphere password file '{}'", p.display())
                })?);
            zeroize::Zeroizing::new(text.lines().next().unwrap_or("").to_string())
        }
        None => match std::env::var(VMWARE_PASSWORD_ENV) {
            Ok(p) if !p.is_empty() => zeroize::Zeroizing::new(p),
            _ => bail!(
                "no vSphere password: give --vmware-password-file FILE or set {VMWARE_PASSWORD_ENV}"
            ),
        },
    };
    Session::login(host, port, &trust, &user, &password)
        .with_context(|| format!("log in to '{authority}' as '{user}'"))
}

/// What a vSphere backup stored.
#[derive(Debug, serde::Serialize)]
pub struct VmwareBackupSummary {
    pub source: String,
    pub vm_name: String,
    pub vm_backup_id: String,
    pub disks: Vec<VmwareDiskSummary>,
    pub config: Option<BackupSummary>,
    /// Snapshots of interrupted earlier runs removed from the VM.
    pub host_leftovers_removed: Vec<String>,
    pub duration_seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct VmwareDiskSummary {
    pub device_key: i32,
    pub label: String,
    pub change_id: Option<String>,
    /// Why it was read in full, when it was.
    pub full_reason: Option<String>,
    #[serde(flatten)]
    pub summary: BackupSummary,
}

struct RepoCommitter<'a> {
    ui: &'a Ui,
    repo: &'a Repository,
    options: &'a SnapshotOptions,
    disks: Vec<VmwareDiskSummary>,
    config: Option<BackupSummary>,
    /// The parent each disk's last backup was (by identity).
    found: BTreeMap<String, crate::format::SnapshotId>,
}

impl Committer for RepoCommitter<'_> {
    type Error = RepoError;

    fn previous(&mut self, identity: &str) -> Result<Option<workflow::Previous>, RepoError> {
        let last = self
            .repo
            .snapshots()?
            .into_iter()
            .rfind(|s| s.meta.source == identity);
        Ok(last.map(|s| {
            self.found.insert(identity.to_string(), s.meta.id);
            workflow::Previous {
                landmark: s.meta.landmark.clone(),
                disk_size_bytes: s.meta.disk_size_bytes,
            }
        }))
    }

    fn commit_disk(&mut self, disk: FrozenDisk<'_>) -> Result<(), RepoError> {
        let identity = disk.source.identity().to_string();
        let mut options = self.options.clone();
        if let (ParentRequest::Newest, Some(id)) = (&options.parent, self.found.get(&identity)) {
            options.parent = ParentRequest::NewestFound(*id);
        }
        let full_reason = match &disk.changes {
            Changes::FullNeeded(r) => Some(r.clone()),
            _ => None,
        };
        self.ui.info(format!(
            "disk {} ('{}', {}): {}",
            disk.key,
            disk.label,
            human_bytes(disk.source.size_bytes()),
            match &disk.changes {
                Changes::Since(e) => format!("{} changed", human_bytes(e.total_bytes())),
                Changes::FullNeeded(r) => format!("full read: {r}"),
                Changes::Unknown => "full read (first backup)".to_string(),
            }
        ));
        let allocated = disk.allocated.clone();
        let ask = move || Ok(allocated.clone().unwrap_or_default());
        let allocation = if disk.allocated.is_some() {
            Allocation::Ask(&ask)
        } else {
            Allocation::Unknown
        };
        let change_id = disk.landmark.get(workflow::keys::CHANGE_ID).cloned();
        let summary = backup_disk(
            self.ui,
            self.repo,
            disk.source,
            &options,
            disk.changes,
            allocation,
            disk.landmark,
        )?;
        report_human(self.ui, &summary);
        self.disks.push(VmwareDiskSummary {
            device_key: disk.key,
            label: disk.label,
            change_id,
            full_reason,
            summary,
        });
        Ok(())
    }

    fn commit_config(
        &mut self,
        identity: &str,
        xml: &[u8],
        landmark: BTreeMap<String, String>,
    ) -> Result<(), RepoError> {
        let summary =
            super::backup::commit_bytes(self.ui, self.repo, self.options, identity, xml, landmark)?;
        self.ui.info(format!(
            "VM configuration ({}) saved as snapshot {}",
            human_bytes(xml.len() as u64),
            summary.snapshot_id.short()
        ));
        self.config = Some(summary);
        Ok(())
    }

    fn warn(&mut self, message: String) {
        self.ui.warn(message);
    }

    fn info(&mut self, message: String) {
        self.ui.info(message);
    }
}

/// Backs the VM up; the summary and the run's report.
pub fn vmware_backup(
    ui: &Ui,
    repo: &Repository,
    url: &VmwareUrl,
    vmware: &VmwareOptions,
    options: &SnapshotOptions,
) -> Result<(VmwareBackupSummary, workflow::RunReport)> {
    let started = std::time::Instant::now();
    let _lock = repo.lock(false, "backup")?;
    let session = Arc::new(vmware_session(ui, url, vmware)?);
    // Every snapshot of the VM backup is committed at the end, or none:
    // a failure on a later disk commits nothing.
    let deferred = SnapshotOptions {
        defer_commit: true,
        ..options.clone()
    };
    let mut committer = RepoCommitter {
        ui,
        repo,
        options: &deferred,
        disks: Vec::new(),
        config: None,
        found: BTreeMap::new(),
    };
    let wf = workflow::Options {
        enable_cbt: vmware.enable_cbt,
        quiesce: vmware.quiesce,
        datacenter: vmware
            .datacenter
            .clone()
            .unwrap_or_else(|| "ha-datacenter".into()),
        data_command: vmware.data_command.clone(),
        exclude_keys: vmware.exclude_keys.iter().copied().collect(),
        ..workflow::Options::default()
    };
    let report = workflow::run(&session, url, &wf, &mut committer);
    session.logout();
    let report = report.with_context(|| {
        format!("back up {url}; nothing was committed (a VM backup is committed whole)")
    })?;
    let pending: Vec<_> = committer
        .disks
        .iter()
        .filter_map(|d| d.summary.pending.clone())
        .chain(committer.config.as_ref().and_then(|c| c.pending.clone()))
        .collect();
    repo.commit_snapshots(&pending).with_context(|| {
        format!(
            "commit the snapshots of VM backup {} of {url}",
            report.vm_backup
        )
    })?;
    Ok((
        VmwareBackupSummary {
            source: url.to_string(),
            vm_name: report.vm_name.clone(),
            vm_backup_id: report.vm_backup.clone(),
            disks: committer.disks,
            config: committer.config,
            host_leftovers_removed: report.removed_leftovers.clone(),
            duration_seconds: started.elapsed().as_secs_f64(),
        },
        report,
    ))
}

pub fn run(
    ui: &Ui,
    repo: &Repository,
    url: &VmwareUrl,
    vmware: &VmwareOptions,
    options: &SnapshotOptions,
) -> Result<Outcome> {
    let (summary, report) = vmware_backup(ui, repo, url, vmware, options)?;
    ui.summary(&summary);
    ui.info(format!(
        "backed up {} of VM '{}' and its configuration (VM backup {}) in {:.2}s",
        plural(summary.disks.len(), "disk"),
        summary.vm_name,
        summary.vm_backup_id,
        summary.duration_seconds
    ));
    Ok(if report.left_on_host.is_some() {
        Outcome::Warnings
    } else {
        Outcome::Ok
    })
}
