//! `backup SOURCE`: open the source, learn what changed (a CBT bitmap, a
//! QEMU dirty bitmap, allocation extents), choose the parent, run the
//! pipeline, report. Lost change tracking starts a new backup set, loudly.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nbd::{proto, tls, NbdUri, PoolOptions};

use super::Outcome;
use crate::cli::{BackupArgs, NbdArgs};
use crate::format::bitmap;
use crate::format::snapshot::{block_count, SnapshotObject};
use crate::manifest;
use crate::output::{human_bytes, Ui};
use crate::repo::backup::{self, BackupPlan, BackupSummary, ParentInfo, PipelineOptions};
use crate::repo::lock::hostname;
use crate::repo::Repository;
use crate::source::nbd::NbdSource;
use crate::source::xenapi::workflow::{
    self, BoxError, Committer, DiskChanges, FrozenDisk, Previous, RunReport, WorkflowOptions,
};
use crate::source::xenapi::{
    Client, ClientOptions, Credentials, HttpsTrust, Password, Session, XenUrl,
};
use crate::source::{BlockSource, FileSource};

/// Validated options of one backup.
pub struct BackupOptions {
    pub parent: Option<String>,
    pub full: bool,
    pub full_every: Option<u32>,
    pub tags: Vec<String>,
    /// Source landmark recorded in the snapshot (e.g. the XenServer
    /// snapshot VDI that the next incremental compares against).
    pub landmark: BTreeMap<String, String>,
}

/// What the source says changed.
pub enum Changes {
    /// Nothing known: read every block that is not known to be zero.
    Unknown,
    /// Exactly these blocks changed since the parent's point in time.
    Since(Vec<u8>),
    /// The source lost track of changes: a new backup set with a full read.
    Lost(String),
}

/// Source-side facts gathered before planning.
pub struct SourceFacts {
    pub changes: Changes,
    /// Blocks that hold any non-zero extent, when the source can tell.
    pub nonzero: Option<Vec<u8>>,
}

impl BackupOptions {
    fn from_args(args: &BackupArgs) -> Result<Self> {
        if args.full && args.changed_blocks.is_some() {
            bail!("--full reads every block; it cannot be combined with --changed-blocks");
        }
        if args.full_every == Some(0) {
            bail!("--full-every must be at least 1");
        }
        Ok(BackupOptions {
            parent: args.parent.clone(),
            full: args.full,
            full_every: args.full_every,
            tags: args.tags.clone(),
            landmark: BTreeMap::new(),
        })
    }
}

fn is_nbd_uri(s: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|p| s.starts_with(p))
}

/// TLS options from the command line for a server at `host`.
pub(crate) fn nbd_tls(args: &NbdArgs, uri: &NbdUri) -> Result<Option<tls::TlsOptions>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read '{}'", p.display()));
    let trust = match (&args.tls_ca, &args.tls_cert_pin) {
        (Some(ca), _) => Some(tls::Trust::CaPem(read(ca)?)),
        (None, Some(pin)) => Some(tls::Trust::PinnedPem(read(pin)?)),
        (None, None) => None,
    };
    let Some(trust) = trust else {
        if uri.tls {
            bail!("'nbds' asks for TLS: give --tls-ca FILE or --tls-cert-pin FILE");
        }
        return Ok(None);
    };
    let server_name = match (&args.tls_name, &uri.address) {
        (Some(n), _) => n.clone(),
        (None, nbd::client::Address::Tcp { host, .. }) => host.clone(),
        (None, _) => bail!("TLS over a unix socket needs --tls-name NAME"),
    };
    Ok(Some(tls::TlsOptions { trust, server_name }))
}

/// Blocks (of `block_size`) touched by extents whose flags satisfy `pick`.
pub(crate) fn blocks_with(
    extents: &[(u64, u64, u32)],
    disk_size: u64,
    block_size: u32,
    pick: impl Fn(u32) -> bool,
) -> Vec<u8> {
    let blocks = block_count(disk_size, block_size);
    let mut out = vec![0u8; bitmap::len_for(blocks) as usize];
    let bs = block_size as u64;
    for &(offset, length, flags) in extents {
        if length == 0 || !pick(flags) {
            continue;
        }
        let first = offset / bs;
        let last = ((offset + length - 1) / bs).min(blocks.saturating_sub(1));
        for b in first..=last {
            bitmap::set(&mut out, b);
        }
    }
    out
}

/// XenServer CBT granularity: one bit per 64 KiB, whatever the repository's
/// block size.
const CBT_BLOCK_BYTES: u64 = 65536;

/// Re-expresses a 64 KiB change bitmap in the repository's blocks.
fn cbt_to_repo_blocks(cbt: &[u8], disk_size: u64, block_size: u32) -> Vec<u8> {
    if block_size as u64 == CBT_BLOCK_BYTES {
        return cbt.to_vec();
    }
    let extents: Vec<(u64, u64, u32)> = bitmap::iter_set(cbt)
        .map(|i| {
            let start = i * CBT_BLOCK_BYTES;
            (start, CBT_BLOCK_BYTES.min(disk_size - start), 1)
        })
        .collect();
    blocks_with(&extents, disk_size, block_size, |_| true)
}

/// Runs a planned backup under the given identity override.
fn backup_as(
    ui: &Ui,
    repo: &Repository,
    source: &dyn BlockSource,
    source_id: &Option<String>,
    options: &BackupOptions,
    facts: SourceFacts,
) -> Result<BackupSummary> {
    match source_id {
        Some(id) => {
            let renamed = crate::source::Renamed {
                inner: source,
                identity: id.clone(),
            };
            backup_source(ui, repo, &renamed, options, facts)
        }
        None => backup_source(ui, repo, source, options, facts),
    }
}

pub fn run(ui: &Ui, repo: &Repository, args: &BackupArgs) -> Result<Outcome> {
    let options = BackupOptions::from_args(args)?;
    let block_size = repo.config().block_size;
    if XenUrl::is_xen(&args.source) {
        return run_xen(ui, repo, args, options);
    }
    let summary = if is_nbd_uri(&args.source) {
        if args.changed_blocks.is_some() {
            bail!("--changed-blocks applies to image files; for NBD use --dirty-bitmap");
        }
        let uri = NbdUri::parse(&args.source)?;
        let tls = nbd_tls(&args.nbd, &uri)?;
        let mut contexts = vec!["base:allocation".to_string()];
        let dirty_context = args
            .dirty_bitmap
            .as_ref()
            .map(|n| format!("qemu:dirty-bitmap:{n}"));
        contexts.extend(dirty_context.clone());
        let source = NbdSource::connect(
            &uri,
            uri.identity(),
            tls,
            contexts,
            PoolOptions {
                connections: args.nbd.nbd_connections.max(1),
                ..PoolOptions::default()
            },
        )
        .with_context(|| format!("connect to '{}'", args.source))?;
        let size = source.size_bytes();
        let nonzero = if source.has_context("base:allocation") {
            let ex = source.extents("base:allocation")?;
            Some(blocks_with(&ex, size, block_size, |f| {
                f & proto::STATE_ZERO == 0
            }))
        } else {
            None
        };
        let changes = match (&dirty_context, &args.dirty_bitmap) {
            (Some(ctx), Some(name)) if source.has_context(ctx) => {
                let ex = source.extents(ctx)?;
                let _ = name;
                Changes::Since(blocks_with(&ex, size, block_size, |f| f & proto::STATE_DIRTY != 0))
            }
            (Some(_), Some(name)) => Changes::Lost(format!(
                "the server does not offer dirty bitmap '{name}' (qemu:dirty-bitmap:{name}): change tracking lost"
            )),
            _ => Changes::Unknown,
        };
        let _lock = repo.lock(false, "backup")?;
        let s = backup_as(
            ui,
            repo,
            &source,
            &args.source_id,
            &options,
            SourceFacts { changes, nonzero },
        )?;
        source.close();
        s
    } else {
        if args.dirty_bitmap.is_some() {
            bail!("--dirty-bitmap applies to NBD sources");
        }
        let source = FileSource::open(Path::new(&args.source))?;
        let blocks = block_count(source.size_bytes(), CBT_BLOCK_BYTES as u32);
        // Decode and check the bitmap before anything is written.
        let changes = match &args.changed_blocks {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("read changed-block bitmap '{}'", p.display()))?;
                let cbt = bitmap::decode_base64(&text, blocks).map_err(|reason| {
                    anyhow::anyhow!(
                        "changed-block bitmap '{}' rejected for '{}' ({} bytes, {blocks} blocks): {reason}; nothing was written",
                        p.display(),
                        source.identity(),
                        source.size_bytes()
                    )
                })?;
                Changes::Since(cbt_to_repo_blocks(&cbt, source.size_bytes(), block_size))
            }
            None => Changes::Unknown,
        };
        let _lock = repo.lock(false, "backup")?;
        let facts = SourceFacts {
            changes,
            nonzero: None,
        };
        backup_as(ui, repo, &source, &args.source_id, &options, facts)?
    };
    report(ui, &summary);
    Ok(Outcome::Ok)
}

/// Plans and runs one backup of any source. Shared by `backup` and `demo`.
pub(crate) fn backup_source(
    ui: &Ui,
    repo: &Repository,
    source: &dyn BlockSource,
    options: &BackupOptions,
    facts: SourceFacts,
) -> Result<BackupSummary> {
    let blocks = block_count(source.size_bytes(), repo.config().block_size);
    let mut new_set_reason = None;
    let candidate = match &options.parent {
        Some(query) => Some(repo.find_snapshot(query)?),
        None => repo
            .snapshots()?
            .into_iter()
            .filter(|s| s.meta.source == source.identity())
            .last(),
    };
    let parent_entry = match (&facts.changes, candidate) {
        _ if options.full => {
            new_set_reason = Some("full backup requested (--full)".to_string());
            None
        }
        (_, None) => {
            new_set_reason = Some("first backup of this source".to_string());
            None
        }
        (Changes::Lost(reason), Some(_)) => {
            ui.warn(format!(
                "{reason}; starting a new backup set with a full read"
            ));
            new_set_reason = Some(reason.clone());
            None
        }
        (_, Some(c)) => Some(c),
    };
    let parent = match parent_entry {
        None => None,
        Some(entry) => {
            if entry.meta.block_size != repo.config().block_size {
                bail!("parent {} uses another block size", entry.meta.id);
            }
            let chain = repo
                .load_chain(entry.meta.id)
                .with_context(|| format!("load parent snapshot {}", entry.meta.id))?;
            let refs: Vec<&SnapshotObject> = chain.iter().collect();
            Some(ParentInfo {
                map: manifest::resolve(&refs),
                depth: chain.len() as u32 - 1,
                meta: entry.meta,
            })
        }
    };
    let not = |b: &[u8]| -> Vec<u8> {
        let mut out: Vec<u8> = b.iter().map(|x| !x).collect();
        // Keep padding bits clear.
        if !blocks.is_multiple_of(8) {
            if let Some(last) = out.last_mut() {
                *last &= 0xffu8 << (8 - blocks % 8);
            }
        }
        out
    };
    let and = |a: &[u8], b: &[u8]| -> Vec<u8> { a.iter().zip(b).map(|(x, y)| x & y).collect() };
    let (read, known_zero, change_bitmap) = match (&parent, facts.changes) {
        (Some(_), Changes::Since(changed)) => match &facts.nonzero {
            Some(nz) => (
                Some(and(&changed, nz)),
                Some(and(&changed, &not(nz))),
                Some(changed),
            ),
            None => (Some(changed.clone()), None, Some(changed)),
        },
        (None, Changes::Since(_)) => {
            ui.warn(format!(
                "no parent snapshot of '{}': a change bitmap alone cannot describe the disk; reading every block",
                source.identity()
            ));
            (facts.nonzero.clone(), None, None)
        }
        (_, _) => (
            facts.nonzero.clone(),
            facts.nonzero.as_deref().map(not),
            None,
        ),
    };
    let synthetic_full = match (&parent, options.full_every) {
        (Some(p), Some(n)) => p.depth + 1 >= n,
        _ => false,
    };
    if let Some(reason) = &new_set_reason {
        ui.info(format!("new backup set: {reason}"));
    }
    let plan = BackupPlan {
        parent,
        read,
        known_zero,
        change_bitmap,
        synthetic_full,
        tags: options.tags.clone(),
        hostname: hostname(),
        landmark: options.landmark.clone(),
        new_set_reason,
    };
    let bar = ui.progress("backup", true);
    let summary = backup::run(repo, source, plan, &PipelineOptions::from_repo(repo), &bar)
        .with_context(|| format!("back up '{}'", source.identity()))?;
    bar.finish();
    Ok(summary)
}

pub(crate) fn report(ui: &Ui, s: &BackupSummary) {
    ui.json(s);
    report_human(ui, s);
}

pub(crate) fn report_human(ui: &Ui, s: &BackupSummary) {
    if let Some(reason) = &s.new_set_reason {
        if s.full && !reason.starts_with("first backup") {
            ui.info(format!("  (new backup set: {reason})"));
        }
    }
    let kind = if s.full {
        "full"
    } else if s.synthetic_full {
        "synthetic full"
    } else {
        "incremental"
    };
    ui.info(format!(
        "snapshot {} saved ({kind}{})",
        s.snapshot_id.short(),
        s.parent_id
            .map(|p| format!(", parent {}", p.short()))
            .unwrap_or_default()
    ));
    let rate = s.bytes_read as f64 / s.seconds.max(1e-9);
    ui.info(format!(
        "  read {} blocks ({}) in {:.2}s, {}/s: {} new, {} deduplicated, {} zero; stored {}",
        s.blocks_read,
        human_bytes(s.bytes_read),
        s.seconds,
        human_bytes(rate as u64),
        s.blocks_new,
        s.blocks_deduplicated,
        s.blocks_zero,
        human_bytes(s.bytes_stored)
    ));
}

/// The environment variable holding the XenServer password.
pub const XEN_PASSWORD_ENV: &str = "CBTVAULT_XEN_PASSWORD";

/// Logs in to the host of `url` as the command line says. The password
/// comes from `--password-file` or the environment, never from argv.
pub(crate) fn xen_session(ui: &Ui, url: &XenUrl, args: &crate::cli::XenArgs) -> Result<Session> {
    let trust = if args.insecure {
        ui.warn(format!(
            "--insecure: the certificate of '{}' is NOT verified; anyone on the path can read the password and the disks",
            url.authority()
        ));
        HttpsTrust::Insecure
    } else if let Some(fp) = &args.fingerprint {
        HttpsTrust::Fingerprint(crate::source::xenapi::tls::parse_fingerprint(fp)?)
    } else if let Some(ca) = &args.ca_file {
        HttpsTrust::CaPem(
            std::fs::read(ca).with_context(|| format!("read CA file '{}'", ca.display()))?,
        )
    } else {
        HttpsTrust::System
    };
    let user = args
        .user
        .clone()
        .or_else(|| url.user.clone())
        .unwrap_or_else(|| "root".to_string());
    let password = match &args.password_file {
        Some(p) => Password::from_file(p)?,
        None => match std::env::var(XEN_PASSWORD_ENV) {
            Ok(p) if !p.is_empty() => Password::new(p),
            _ => {
                bail!("no XenServer password: give --password-file FILE or set {XEN_PASSWORD_ENV}")
            }
        },
    };
    let client = Client::new(ClientOptions::new(&url.host, url.port, trust))?;
    let session = client
        .login(Credentials {
            user: user.clone(),
            password,
        })
        .with_context(|| format!("log in to '{}' as '{user}'", url.authority()))?;
    Ok(session)
}

/// What a XenServer backup stored.
#[derive(Debug, serde::Serialize)]
pub(crate) struct XenBackupSummary {
    pub source: String,
    pub vm_backup: Option<String>,
    pub disks: Vec<XenDiskSummary>,
    pub metadata: Option<BackupSummary>,
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct XenDiskSummary {
    pub vdi: String,
    pub name_label: String,
    pub host_snapshot_vdi: Option<String>,
    pub lost_reason: Option<String>,
    #[serde(flatten)]
    pub summary: BackupSummary,
}

/// The repository side of the XenServer workflow.
struct RepoCommitter<'a> {
    ui: &'a Ui,
    repo: &'a Repository,
    options: &'a BackupOptions,
    disks: Vec<XenDiskSummary>,
    metadata: Option<BackupSummary>,
}

fn boxed(e: anyhow::Error) -> BoxError {
    // Keep the whole context chain on one line.
    format!("{e:#}").into()
}

impl Committer for RepoCommitter<'_> {
    fn previous(&mut self, identity: &str) -> std::result::Result<Previous, BoxError> {
        let last = self
            .repo
            .snapshots()
            .map_err(|e| boxed(e.into()))?
            .into_iter()
            .rfind(|s| s.meta.source == identity);
        Ok(match last {
            None => Previous::None,
            Some(s) => match s.meta.landmark.get(workflow::keys::SNAPSHOT_VDI) {
                Some(uuid) => Previous::Landmark(uuid.clone()),
                None => Previous::NoLandmark(format!(
                    "the last backup of '{identity}' (snapshot {}) recorded no CBT landmark",
                    s.meta.id.short()
                )),
            },
        })
    }

    fn commit_disk(&mut self, disk: FrozenDisk<'_>) -> std::result::Result<(), BoxError> {
        let block_size = self.repo.config().block_size;
        let (changes, lost_reason) = match &disk.changes {
            DiskChanges::Since(cbt) => (
                Changes::Since(cbt_to_repo_blocks(cbt, disk.size_bytes, block_size)),
                None,
            ),
            DiskChanges::Full(Some(reason)) => {
                (Changes::Lost(reason.clone()), Some(reason.clone()))
            }
            DiskChanges::Full(None) => (Changes::Unknown, None),
        };
        self.ui.info(format!(
            "disk {} ('{}', {}): {}",
            disk.vdi_uuid,
            disk.name_label,
            human_bytes(disk.size_bytes),
            match &changes {
                Changes::Since(b) => format!("{} changed blocks", bitmap::iter_set(b).count()),
                Changes::Lost(_) => "change tracking lost, full read".to_string(),
                Changes::Unknown => "full read".to_string(),
            }
        ));
        let mut options = BackupOptions {
            parent: None,
            full: self.options.full,
            full_every: self.options.full_every,
            tags: self.options.tags.clone(),
            landmark: disk.landmark.clone(),
        };
        options.landmark.extend(self.options.landmark.clone());
        let facts = SourceFacts {
            changes,
            nonzero: None,
        };
        let summary =
            backup_source(self.ui, self.repo, disk.source, &options, facts).map_err(boxed)?;
        report_human(self.ui, &summary);
        self.disks.push(XenDiskSummary {
            vdi: disk.vdi_uuid.clone(),
            name_label: disk.name_label.clone(),
            host_snapshot_vdi: disk.landmark.get(workflow::keys::SNAPSHOT_VDI).cloned(),
            lost_reason,
            summary,
        });
        Ok(())
    }

    fn commit_metadata(
        &mut self,
        identity: &str,
        tar: &[u8],
        landmark: BTreeMap<String, String>,
    ) -> std::result::Result<(), BoxError> {
        let source = crate::source::xenapi::nbd::MemorySource {
            identity: identity.to_string(),
            bytes: tar.to_vec(),
        };
        let options = BackupOptions {
            parent: None,
            full: false,
            full_every: self.options.full_every,
            tags: self.options.tags.clone(),
            landmark,
        };
        let facts = SourceFacts {
            changes: Changes::Unknown,
            nonzero: None,
        };
        let summary = backup_source(self.ui, self.repo, &source, &options, facts).map_err(boxed)?;
        self.ui.info(format!(
            "VM metadata ({}) saved as snapshot {}",
            human_bytes(tar.len() as u64),
            summary.snapshot_id.short()
        ));
        self.metadata = Some(summary);
        Ok(())
    }

    fn warn(&mut self, message: String) {
        self.ui.warn(message);
    }

    fn info(&mut self, message: String) {
        self.ui.info(message);
    }
}

/// Backs up a XenServer VDI or VM (the workflow, then the repository).
pub(crate) fn xen_backup(
    ui: &Ui,
    repo: &Repository,
    url: &XenUrl,
    session: &Session,
    workflow_options: &WorkflowOptions,
    options: &BackupOptions,
) -> Result<(XenBackupSummary, RunReport)> {
    let started = std::time::Instant::now();
    let _lock = repo.lock(false, "backup")?;
    let mut committer = RepoCommitter {
        ui,
        repo,
        options,
        disks: Vec::new(),
        metadata: None,
    };
    let report = workflow::run(session, url, workflow_options, &mut committer)
        .with_context(|| format!("back up xen://{}/{}", url.authority(), url.uuid))?;
    Ok((
        XenBackupSummary {
            source: format!(
                "xen://{}/{}/{}",
                url.authority(),
                match url.object {
                    crate::source::xenapi::XenObject::Vdi => "vdi",
                    crate::source::xenapi::XenObject::Vm => "vm",
                },
                url.uuid
            ),
            vm_backup: report.vm_backup.clone(),
            disks: committer.disks,
            metadata: committer.metadata,
            seconds: started.elapsed().as_secs_f64(),
        },
        report,
    ))
}

fn run_xen(
    ui: &Ui,
    repo: &Repository,
    args: &BackupArgs,
    options: BackupOptions,
) -> Result<Outcome> {
    if args.changed_blocks.is_some() || args.dirty_bitmap.is_some() || args.parent.is_some() {
        bail!("--changed-blocks, --dirty-bitmap and --parent do not apply to xen:// sources: the host tracks changes");
    }
    if args.source_id.is_some() {
        bail!("--source-id does not apply to xen:// sources: disks are identified by host and VDI uuid");
    }
    let url = XenUrl::parse(&args.source)?;
    let session = xen_session(ui, &url, &args.xen)?;
    let workflow_options = WorkflowOptions {
        enable_cbt: !args.xen.no_enable_cbt,
        keep_snapshot_data: args.xen.keep_snapshot_data,
        nbd_connections: args.nbd.nbd_connections.max(1),
        ..WorkflowOptions::default()
    };
    let result = xen_backup(ui, repo, &url, &session, &workflow_options, &options);
    session.logout();
    let (summary, _) = result?;
    ui.json(&summary);
    ui.info(format!(
        "backed up {} disk(s){} in {:.2}s",
        summary.disks.len(),
        summary
            .vm_backup
            .as_ref()
            .map(|id| format!(" and the VM metadata (VM backup {id})"))
            .unwrap_or_default(),
        summary.seconds
    ));
    Ok(Outcome::Ok)
}
