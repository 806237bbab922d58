//! `backup SOURCE`: wires options -> source -> plan -> pipeline -> output.
//! Opens the source and asks it what changed (a CBT bitmap, a QEMU dirty
//! bitmap, allocation extents: all [`Changes`] and [`Extents`]); choosing
//! the parent and what to read is `repo::backup::plan`, reading and storing
//! is `repo::backup::run`. XenServer sources run the host workflow, whose
//! repository side ([`Committer`]) does the same for every disk. Lost change
//! tracking starts a new backup set, loudly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nbd::{proto, tls, NbdUri, PoolOptions};

use super::Outcome;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::backup::plan::{self, ParentRequest, PlanOptions, SourceDisk};
use crate::repo::backup::{
    self, AllocationWalk, BackupSummary, BlockBitmap, OnRanges, PipelineOptions,
};
use crate::repo::lock::hostname;
use crate::repo::{RepoError, Repository};
use crate::source::nbd::{NbdLimits, NbdSource};
use crate::source::xenapi::workflow::{
    self, Committer, FrozenDisk, MarkedRun, Previous, RemovedLeftover, RunMarker, RunReport,
    Verdict, WorkflowOptions, CBT_BLOCK_BYTES, LEFTOVER_SAFETY_AGE,
};
use crate::source::xenapi::{
    Client, ClientOptions, Credentials, HttpsTrust, Password, Session, XenUrl,
};
use crate::source::SourceError;
use crate::source::{BlockSource, Changes, Extents, FileSource};

/// Validated options of `backup`.
pub struct BackupOptions {
    pub source: BackupSource,
    pub snapshot: SnapshotOptions,
}

/// What to back up, with the options that apply to that kind of source.
pub enum BackupSource {
    /// A raw image file or block device.
    File {
        path: PathBuf,
        /// A base64 CBT bitmap (64 KiB blocks) of the changes since the parent.
        changed_blocks: Option<PathBuf>,
        /// Identity for finding the parent, instead of the path's.
        source_id: Option<String>,
    },
    /// An NBD export.
    Nbd {
        uri: NbdUri,
        /// The URI as given, for messages.
        text: String,
        /// Only the extents this QEMU dirty bitmap marks changed.
        dirty_bitmap: Option<String>,
        nbd: NbdOptions,
        source_id: Option<String>,
    },
    /// A vSphere VM.
    Vmware {
        url: crate::source::vmware::VmwareUrl,
        vmware: super::backup_vmware::VmwareOptions,
    },
    /// A XenServer VDI or VM.
    Xen {
        url: XenUrl,
        xen: XenOptions,
        /// NBD connections in total.
        nbd_connections: usize,
        /// Export size limit and I/O timeout of the NBD connections.
        nbd_limits: NbdLimits,
    },
}

/// Chain length (snapshots since the last full) at which a backup writes a
/// synthetic full unless told otherwise: restores, exports and
/// incrementals then resolve at most this many manifests, whatever the
/// number of backups.
pub const DEFAULT_FULL_EVERY: u32 = 64;

/// How each snapshot of a run chooses its parent and what it records.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub parent: ParentRequest,
    /// Write a synthetic full manifest once the chain since the last full
    /// reaches this many snapshots.
    pub full_every: Option<u32>,
    pub tags: Vec<String>,
    /// Commit nothing when the source changed while it was read.
    pub strict: bool,
    /// Backups running at once in this process (a job's concurrency):
    /// each takes its share of the read buffers, so memory stays bounded
    /// however many run together. 1 for a lone backup.
    pub concurrent: u32,
    /// Leave each snapshot object to the caller (`BackupSummary::pending`):
    /// a vSphere VM backup commits all its snapshots or none.
    pub defer_commit: bool,
}

/// How to reach an NBD server.
#[derive(Debug, Clone, Default)]
pub struct NbdOptions {
    /// Trust server certificates issued by these CAs (PEM); enables TLS.
    pub tls_ca: Option<PathBuf>,
    /// Trust exactly this server certificate (PEM); enables TLS.
    pub tls_cert_pin: Option<PathBuf>,
    /// Name the server certificate must carry (default: the URI's host).
    pub tls_name: Option<String>,
    /// Certificate chain (PEM) presented when the server asks for one;
    /// given together with `tls_client_key`.
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_client_cert`.
    pub tls_client_key: Option<PathBuf>,
    /// Connections to open (at least 1).
    pub connections: usize,
    /// Export size limit and I/O timeout.
    pub limits: NbdLimits,
}

/// How to reach a XenServer host, and what the backup may do there.
#[derive(Debug, Clone, Default)]
pub struct XenOptions {
    /// XenServer user (default: the one in the URL, else root).
    pub user: Option<String>,
    /// File whose first line is the password (else the environment).
    pub password_file: Option<PathBuf>,
    /// Trust XenAPI certificates issued by these CAs (PEM).
    pub ca_file: Option<PathBuf>,
    /// Trust exactly the certificates with these SHA-256 fingerprints.
    pub fingerprint: Vec<String>,
    /// Do not verify the certificate (warns every run).
    pub insecure: bool,
    /// Enable changed block tracking on disks that have it off.
    pub enable_cbt: bool,
    /// Keep the host-side snapshot's data (skip VDI.data_destroy).
    pub keep_snapshot_data: bool,
}

/// TLS options from the command line for a server at `host`. Trust files
/// are parsed, and the client certificate and key read and matched, here,
/// so that a bad file is named before anything connects; a key readable by
/// others is a warning.
fn nbd_tls(ui: &Ui, options: &NbdOptions, uri: &NbdUri) -> Result<Option<tls::TlsOptions>> {
    let read_certs = |p: &Path, what: &str| -> Result<Vec<u8>> {
        let (pem, origin) = tls::read_pem_file(p, what)?;
        tls::parse_certs(&pem, &origin)?;
        Ok(pem)
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read '{}'", p.display()));
    let trust = match (&options.tls_ca, &options.tls_cert_pin) {
        (Some(ca), _) => Some(tls::Trust::CaPem(read_certs(ca, "--tls-ca file")?)),
        (None, Some(pin)) => Some(tls::Trust::PinnedPem(read_certs(
            pin,
            "--tls-cert-pin file",
        )?)),
        (None, None) => None,
    };
    let Some(trust) = trust else {
        if uri.tls {
            bail!("'nbds' asks for TLS: give --tls-ca FILE or --tls-cert-pin FILE");
        }
        if options.tls_client_cert.is_some() {
            bail!("--tls-client-cert needs TLS: use an nbds:// URI with --tls-ca FILE or --tls-cert-pin FILE");
        }
        return Ok(None);
    };
    let server_name = match (&options.tls_name, &uri.address) {
        (Some(n), _) => n.clone(),
        (None, nbd::client::Address::Tcp { host, .. }) => host.clone(),
        (None, _) => bail!("TLS over a unix socket needs --tls-name NAME"),
    };
    let client = match (&options.tls_client_cert, &options.tls_client_key) {
        (Some(cert), Some(key)) => {
            warn_if_key_readable_by_others(ui, key);
            let cert_what = format!("client certificate '{}'", cert.display());
            let key_what = format!("client key '{}'", key.display());
            let identity = tls::client_identity(&read(cert)?, &cert_what, &read(key)?, &key_what)?;
            Some(identity)
        }
        (None, None) => None,
        _ => bail!("--tls-client-cert and --tls-client-key go together"),
    };
    Ok(Some(tls::TlsOptions {
        trust,
        server_name,
        client,
    }))
}

/// A private key file that group or others can read is worth a warning
/// (not a refusal: the user may have reasons, e.g. a group-shared secret).
fn warn_if_key_readable_by_others(ui: &Ui, key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            ui.warn(format!(
                "client key '{}' is readable by others (mode {mode:03o}); chmod 600 it",
                key.display()
            ));
        }
    }
}

/// Runs one backup of `source` under another identity, when given.
fn backup_as(
    ui: &Ui,
    repo: &Repository,
    source: &dyn BlockSource,
    source_id: &Option<String>,
    options: &SnapshotOptions,
    changes: Changes,
    allocated: Allocation<'_>,
) -> Result<BackupSummary> {
    let summary = match source_id {
        Some(id) => {
            let renamed = crate::source::Renamed {
                inner: source,
                identity: id.clone(),
            };
            backup_disk(
                ui,
                repo,
                &renamed,
                options,
                changes,
                allocated,
                BTreeMap::new(),
            )
        }
        None => backup_disk(
            ui,
            repo,
            source,
            options,
            changes,
            allocated,
            BTreeMap::new(),
        ),
    };
    summary.with_context(|| {
        format!(
            "back up '{}'",
            source_id.as_deref().unwrap_or(source.identity())
        )
    })
}

pub fn run(ui: &Ui, repo: &Repository, options: &BackupOptions) -> Result<Outcome> {
    let summary = match &options.source {
        BackupSource::Vmware { url, vmware } => {
            return super::backup_vmware::run(ui, repo, url, vmware, &options.snapshot);
        }
        BackupSource::Xen {
            url,
            xen,
            nbd_connections,
            nbd_limits,
        } => {
            let nbd = (*nbd_connections, *nbd_limits);
            return run_xen(ui, repo, url, xen, nbd, &options.snapshot);
        }
        BackupSource::Nbd {
            uri,
            text,
            dirty_bitmap,
            nbd,
            source_id,
        } => nbd_backup(
            ui,
            repo,
            uri,
            text,
            dirty_bitmap.as_deref(),
            nbd,
            source_id.as_deref(),
            &options.snapshot,
        )?,
        BackupSource::File {
            path,
            changed_blocks,
            source_id,
        } => {
            let source = FileSource::open(path)?;
            // Decode and check the bitmap before anything is written.
            let changes = match changed_blocks {
                Some(p) => Changes::Since(read_cbt_bitmap(p, &source)?),
                None => Changes::Unknown,
            };
            // Holes of a sparse image read as zeros: a full read skips them.
            let holes = || {
                source.data_extents()?.ok_or(SourceError::Invalid {
                    source_name: path.display().to_string(),
                    reason: "not a regular file with a known layout".into(),
                })
            };
            let allocated = if source.is_regular() {
                Allocation::Ask(&holes)
            } else {
                Allocation::Unknown
            };
            let _lock = repo.lock(false, "backup")?;
            backup_as(
                ui,
                repo,
                &source,
                source_id,
                &options.snapshot,
                changes,
                allocated,
            )?
        }
    };
    report(ui, &summary);
    Ok(Outcome::Ok)
}

/// Backs up an NBD export (`base:allocation` skips holes on a full read;
/// a QEMU dirty bitmap, when named and offered, limits the read to what
/// it marks).
#[allow(clippy::too_many_arguments)]
pub(crate) fn nbd_backup(
    ui: &Ui,
    repo: &Repository,
    uri: &NbdUri,
    text: &str,
    dirty_bitmap: Option<&str>,
    nbd: &NbdOptions,
    source_id: Option<&str>,
    snapshot: &SnapshotOptions,
) -> Result<BackupSummary> {
    let tls = nbd_tls(ui, nbd, uri)?;
    let allocation_context = "base:allocation".to_string();
    let dirty_context = dirty_bitmap
        .as_ref()
        .map(|n| format!("qemu:dirty-bitmap:{n}"));
    let connect = |contexts: Vec<String>| -> Result<NbdSource> {
        NbdSource::connect(
            uri,
            uri.identity(),
            tls.clone(),
            contexts,
            PoolOptions {
                connections: nbd.connections,
                ..PoolOptions::default()
            },
            nbd.limits,
        )
        .map_err(|e| match e {
            nbd::NbdError::ClientCertificateRequired { .. } => anyhow::anyhow!(
                "{e}; give --tls-client-cert FILE --tls-client-key FILE (a certificate the server trusts)"
            ),
            e => anyhow::Error::new(e),
        })
        .with_context(|| format!("connect to '{text}'"))
    };
    // A server answers each block status request for every context the
    // connection negotiated, and base:allocation of a large qcow2 chain
    // costs far more than its dirty bitmap (30 s against a fraction of it
    // at 16 TiB). A change bitmap over a parent never asks the allocation,
    // so then only the bitmap is negotiated; should the bitmap be missing
    // (a new full), the export is opened again with the allocation.
    // The lock first, so that the parent found here is the one the backup
    // layers on (no forget or prune in between).
    let _lock = repo.lock(false, "backup")?;
    let parent_expected = dirty_context.is_some() && {
        let identity = source_id.map_or_else(|| uri.identity(), str::to_string);
        matches!(
            plan::find_parent(repo, &identity, &snapshot.parent, &Changes::Unknown),
            Ok(plan::ParentLookup::Found(_))
        )
    };
    let mut source = if parent_expected {
        connect(dirty_context.clone().into_iter().collect())?
    } else {
        connect(
            std::iter::once(allocation_context.clone())
                .chain(dirty_context.clone())
                .collect(),
        )?
    };
    if parent_expected
        && dirty_context
            .as_ref()
            .is_some_and(|c| !source.has_context(c))
    {
        source.close();
        source = connect(vec![allocation_context])?;
    }
    if let Some(why) = source.pool().fewer_connections() {
        ui.warn(format!("nbd: {why}"));
    }
    ui.detail(
        1,
        format!(
            "nbd: {} open to '{text}' ({} requested), export {}",
            plural(source.pool().connection_count(), "connection"),
            nbd.connections,
            human_bytes(source.size_bytes())
        ),
    );
    let size = source.size_bytes();
    let walk_allocation = |f: &mut OnRanges<'_>| -> Result<(), SourceError> {
        let mut data = Vec::new();
        source
            .extents_each("base:allocation", |window| {
                // Test hook: a slow map (a signal lands mid-walk).
                #[cfg(debug_assertions)]
                crate::repo::test_delay("allocation_window");
                data.clear();
                data.extend(
                    window
                        .iter()
                        .filter(|e| e.2 & proto::STATE_ZERO == 0)
                        .map(|e| (e.0, e.1)),
                );
                f(&data)
            })
            .map(|_| ())
            .map_err(|e| SourceError::Invalid {
                source_name: text.to_string(),
                reason: format!("block status (base:allocation): {e}"),
            })
    };
    let allocated = if source.has_context("base:allocation") {
        Allocation::Walk(&walk_allocation)
    } else {
        Allocation::Unknown
    };
    let changes = match (&dirty_context, dirty_bitmap) {
                (Some(ctx), Some(_)) if source.has_context(ctx) => {
                    let ex = source.extents(ctx)?;
                    Changes::Since(Extents::from_flagged(&ex, size, |f| {
                        f & proto::STATE_DIRTY != 0
                    }))
                }
                (Some(_), Some(name)) => Changes::FullNeeded(format!(
                    "the server does not offer dirty bitmap '{name}' (qemu:dirty-bitmap:{name}): change tracking lost"
                )),
                _ => Changes::Unknown,
            };
    let s = backup_as(
        ui,
        repo,
        &source,
        &source_id.map(str::to_string),
        snapshot,
        changes,
        allocated,
    )?;
    source.close();
    Ok(s)
}

/// The changed extents a base64 CBT bitmap file (64 KiB blocks, as
/// `VDI.list_changed_blocks` returns it) marks on `source`.
fn read_cbt_bitmap(path: &Path, source: &FileSource) -> Result<Extents> {
    let size = source.size_bytes();
    let blocks = size.div_ceil(CBT_BLOCK_BYTES);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read changed-block bitmap '{}'", path.display()))?;
    let rejected = |reason: String| {
        anyhow::anyhow!(
            "changed-block bitmap '{}' rejected for '{}' ({size} bytes, {blocks} blocks): {reason}; nothing was written",
            path.display(),
            source.identity(),
        )
    };
    let bits = crate::format::bitmap::decode_base64(&text, blocks).map_err(rejected)?;
    Extents::from_bitmap(&bits, CBT_BLOCK_BYTES, size).map_err(|e| rejected(e.to_string()))
}

/// Plans and runs one backup of any source, the plan's warnings printed
/// first. Shared by every kind of source and by `demo`.
/// Where the source's data lies (NBD `base:allocation`), when it can tell.
pub(crate) enum Allocation<'a> {
    Unknown,
    /// Asked of the source only when the backup reads more than a change
    /// bitmap marks: an incremental driven by a bitmap reads the marked
    /// blocks whatever the allocation (a hole reads as a zero block), so
    /// it does not pay for a block-status walk of the whole disk (minutes
    /// over a 16 TiB qcow2 chain).
    Ask(&'a dyn Fn() -> Result<Extents, SourceError>),
    /// As `Ask`, walked window by window: a backup without a parent reads
    /// while the walk goes on (a 16 TiB export's block status walk takes
    /// as long as reading its data); with a parent the walk is collected
    /// first, since the manifest needs it for every page.
    Walk(AllocationWalk<'a>),
}

/// Commits a small object (a VM's metadata or configuration) as a
/// snapshot of its own source `identity`: never a forced full, always
/// layered on the last one.
pub(crate) fn commit_bytes(
    ui: &Ui,
    repo: &Repository,
    options: &SnapshotOptions,
    identity: &str,
    bytes: &[u8],
    landmark: BTreeMap<String, String>,
) -> Result<BackupSummary, RepoError> {
    let source = crate::source::xenapi::nbd::MemorySource {
        identity: identity.to_string(),
        bytes: bytes.to_vec(),
    };
    let options = SnapshotOptions {
        parent: ParentRequest::Newest,
        ..options.clone()
    };
    backup_disk(
        ui,
        repo,
        &source,
        &options,
        Changes::Unknown,
        Allocation::Unknown,
        landmark,
    )
}

/// Read batch size of one of `concurrent` backups running together: the
/// read buffers (READERS x queue x batch) are shared out, down to a
/// quarter (16 blocks: 1 MiB batches at 64 KiB still fill a request
/// pipeline).
fn pipeline_batch(alone: usize, concurrent: u32) -> usize {
    (alone / concurrent.max(1) as usize).max(alone / 4).max(1)
}

pub(crate) fn backup_disk(
    ui: &Ui,
    repo: &Repository,
    source: &dyn BlockSource,
    options: &SnapshotOptions,
    changes: Changes,
    allocated: Allocation<'_>,
    landmark: BTreeMap<String, String>,
) -> Result<BackupSummary, RepoError> {
    let lookup = plan::find_parent(repo, source.identity(), &options.parent, &changes)?;
    let found = matches!(lookup, plan::ParentLookup::Found(_));
    let (allocated, walk) = match allocated {
        Allocation::Unknown => (None, None),
        Allocation::Ask(_) | Allocation::Walk(_)
            if found && matches!(changes, Changes::Since(_)) =>
        {
            ui.detail(
                1,
                "change bitmap over a found parent: the source's allocation is not asked",
            );
            (None, None)
        }
        Allocation::Ask(ask) => (Some(ask()?), None),
        Allocation::Walk(walk) if !found => (None, Some(walk)),
        Allocation::Walk(walk) => {
            let mut ranges = Vec::new();
            walk(&mut |window| {
                ranges.extend_from_slice(window);
                true
            })?;
            (
                Some(Extents::from_ranges(ranges, source.size_bytes())),
                None,
            )
        }
    };
    let disk = SourceDisk {
        identity: source.identity(),
        size_bytes: source.size_bytes(),
        changes,
        allocated,
        allocation_streamed: walk.is_some(),
    };
    let plan_options = PlanOptions {
        full_every: options.full_every,
        tags: options.tags.clone(),
        hostname: hostname(),
        landmark,
        strict: options.strict,
    };
    let plan = plan::plan(lookup, disk, repo.config().block_size, &plan_options);
    for w in &plan.warnings {
        ui.warn(w);
    }
    // Said once: a warning above already names a lost set's reason.
    if let Some(reason) = &plan.new_set_reason {
        if !plan.warnings.iter().any(|w| w.contains(reason.as_str())) {
            ui.info(format!("new backup set: {reason}"));
        }
    }
    detail_plan(ui, source, &plan, repo.config().block_size);
    let bar = ui.progress("backup", true);
    let mut pipeline = PipelineOptions::from_repo(repo);
    pipeline.batch_blocks = pipeline_batch(pipeline.batch_blocks, options.concurrent);
    pipeline.defer_commit = options.defer_commit;
    let summary = backup::run(repo, source, plan, &pipeline, &bar, walk)?;
    bar.finish();
    ui.detail(
        1,
        format!(
            "{}: {} changed, {} new, {} written in {}",
            source.identity(),
            plural(summary.blocks_changed, "block"),
            plural(summary.blocks_new, "block"),
            human_bytes(summary.bytes_stored),
            plural(summary.packs_written, "pack")
        ),
    );
    if !summary.source_changed.is_empty() {
        ui.warn(format!(
            "'{}' changed while it was read ({}): snapshot {} may hold a torn disk; back up a frozen copy (an LVM, qemu or file-system snapshot), or pass --strict to refuse such a backup",
            source.identity(),
            summary.source_changed.join(", "),
            summary.snapshot_id.short()
        ));
    }
    Ok(summary)
}

/// `-v`: the parent chosen and how much will be read; `-vv`: the set's
/// depth and the planned counts in detail.
fn detail_plan(ui: &Ui, source: &dyn BlockSource, plan: &plan::BackupPlan, block_size: u32) {
    if !ui.shows_detail(1) {
        return;
    }
    let id = source.identity();
    match &plan.parent {
        Some(p) => ui.detail(
            1,
            format!(
                "{id}: parent snapshot {} of {} (backup set {}, {} since its full)",
                p.meta.id.short(),
                p.meta
                    .time
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                p.meta.backup_set.short(),
                plural(p.depth, "manifest")
            ),
        ),
        None => ui.detail(
            1,
            format!(
                "{id}: no parent ({})",
                plan.new_set_reason.as_deref().unwrap_or("new backup set")
            ),
        ),
    }
    let blocks = source.size_bytes().div_ceil(block_size as u64);
    let read = match &plan.read {
        _ if plan.streamed => "the allocated blocks, mapped while reading,".to_string(),
        Some(r) => r.count().to_string(),
        None => blocks.to_string(),
    };
    ui.detail(
        1,
        format!(
            "{id}: reading {read} of {} ({})",
            plural(blocks, "block"),
            human_bytes(source.size_bytes())
        ),
    );
    ui.detail(
        2,
        format!(
            "{id}: known zero {}, change bitmap {}, synthetic full {}, tags [{}], host {}",
            plan.known_zero_count(),
            plan.change_bitmap
                .as_ref()
                .map_or("none".to_string(), |c| plural(c.count(), "block")),
            plan.synthetic_full,
            plan.tags.join(", "),
            plan.hostname
        ),
    );
}

pub(crate) fn report(ui: &Ui, s: &BackupSummary) {
    ui.summary(s);
    report_human(ui, s);
}

pub(crate) fn report_human(ui: &Ui, s: &BackupSummary) {
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
        "  read {} ({}) in {:.2}s, {}/s: {} new, {} deduplicated, {} zero; stored {}",
        plural(s.blocks_read, "block"),
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

/// How to trust a host's HTTPS certificate, as the command line says
/// (`--insecure` warns every run; `--fingerprint` pins; `--ca-file`).
pub(crate) fn https_trust(
    ui: &Ui,
    authority: &str,
    insecure: bool,
    fingerprint: &[String],
    ca_file: Option<&std::path::Path>,
) -> Result<HttpsTrust> {
    Ok(if insecure {
        ui.warn(format!(
            "--insecure: the certificate of '{authority}' is NOT verified; anyone on the path can read the password and the disks"
        ));
        HttpsTrust::Insecure
    } else if !fingerprint.is_empty() {
        HttpsTrust::Fingerprint(
            fingerprint
                .iter()
                .map(|fp| crate::source::xenapi::tls::parse_fingerprint(fp))
                .collect::<Result<_, _>>()?,
        )
    } else if let Some(ca) = ca_file {
        // Checked here, where the file's name is known.
        let (pem, origin) = nbd::tls::read_pem_file(ca, "--ca-file")?;
        nbd::tls::parse_certs(&pem, &origin)?;
        HttpsTrust::CaPem(pem)
    } else {
        HttpsTrust::System
    })
}

/// Logs in to the host of `url` as the command line says. The password
/// comes from `--xen-password-file` or the environment, never from argv.
pub(crate) fn xen_session(ui: &Ui, url: &XenUrl, options: &XenOptions) -> Result<Session> {
    let trust = https_trust(
        ui,
        &url.authority(),
        options.insecure,
        &options.fingerprint,
        options.ca_file.as_deref(),
    )?;
    let user = options
        .user
        .clone()
        .or_else(|| url.user.clone())
        .unwrap_or_else(|| "root".to_string());
    let password = xen_password(options)?;
    let client = Client::new(ClientOptions::new(&url.host, url.port, trust))?;
    let session = client
        .login(Credentials {
            user: user.clone(),
            password,
        })
        .with_context(|| format!("log in to '{}' as '{user}'", url.authority()))?;
    Ok(session)
}

/// The XenServer password: the first line of `--xen-password-file`, else
/// the environment ([`XEN_PASSWORD_ENV`]); never argv.
pub(crate) fn xen_password(options: &XenOptions) -> Result<Password> {
    Ok(match &options.password_file {
        Some(p) => Password::from_file(p)?,
        None => match std::env::var(XEN_PASSWORD_ENV) {
            Ok(p) if !p.is_empty() => Password::new(p),
            _ => {
                bail!("no XenServer password: give --xen-password-file FILE or set {XEN_PASSWORD_ENV}")
            }
        },
    })
}

/// What a XenServer backup stored.
#[derive(Debug, serde::Serialize)]
pub(crate) struct XenBackupSummary {
    pub source: String,
    #[serde(rename = "vm_backup_id")]
    pub vm_backup: Option<String>,
    pub disks: Vec<XenDiskSummary>,
    pub metadata: Option<BackupSummary>,
    /// Leftovers of earlier (killed) runs destroyed on the host.
    pub host_leftovers_removed: Vec<RemovedLeftover>,
    #[serde(rename = "duration_seconds")]
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct XenDiskSummary {
    #[serde(rename = "vdi_uuid")]
    pub vdi: String,
    pub name_label: String,
    #[serde(rename = "host_snapshot_vdi_uuid")]
    pub host_snapshot_vdi: Option<String>,
    pub lost_reason: Option<String>,
    /// `VDI.enable_cbt` was refused: this disk is read in full every run.
    pub cbt_unavailable: Option<String>,
    #[serde(flatten)]
    pub summary: BackupSummary,
}

/// The repository side of the XenServer workflow.
struct RepoCommitter<'a> {
    ui: &'a Ui,
    repo: &'a Repository,
    options: &'a SnapshotOptions,
    disks: Vec<XenDiskSummary>,
    metadata: Option<BackupSummary>,
    /// The last backup of each VDI (by uuid) that `previous` found: the
    /// parent of its next snapshot, through whichever host it was taken.
    found: BTreeMap<String, crate::format::SnapshotId>,
}

impl Committer for RepoCommitter<'_> {
    type Error = RepoError;

    fn previous(&mut self, disk: workflow::DiskKey<'_>) -> Result<Previous, RepoError> {
        use workflow::keys;
        let last = self.repo.snapshots()?.into_iter().rfind(|s| {
            s.meta.source == disk.identity
                || crate::commands::select::is_xen_disk(&s.meta, disk.vdi_uuid)
        });
        let Some(s) = last else {
            return Ok(Previous::None);
        };
        self.found.insert(disk.vdi_uuid.to_string(), s.meta.id);
        let short = s.meta.id.short();
        if let (Some(then), Some(now)) = (s.meta.landmark.get(keys::POOL), disk.pool) {
            if then != now {
                return Ok(Previous::NoLandmark(format!(
                    "the last backup of VDI {} (snapshot {short}) was taken in pool {then}, and the VDI is now in pool {now}: changed blocks are not trusted across pools",
                    disk.vdi_uuid
                )));
            }
        }
        Ok(match s.meta.landmark.get(keys::SNAPSHOT_VDI) {
            Some(uuid) => Previous::Landmark(uuid.clone()),
            None => Previous::NoLandmark(format!(
                "the last backup of '{}' (snapshot {short}) recorded no CBT landmark",
                disk.identity
            )),
        })
    }

    fn previous_vm_disks(&mut self, vm: &str) -> Result<Vec<workflow::PreviousDisk>, RepoError> {
        use workflow::keys;
        let snaps = self.repo.snapshots()?;
        let of_vm = |s: &&crate::repo::SnapshotEntry| {
            s.meta.landmark.get(keys::VM).map(String::as_str) == Some(vm)
                && s.meta.landmark.get(keys::KIND).map(String::as_str) != Some("vm-metadata")
        };
        // The newest VM backup of this VM (snapshots are oldest first).
        let Some(last) = snaps
            .iter()
            .rev()
            .filter(of_vm)
            .find_map(|s| s.meta.landmark.get(keys::VM_BACKUP).cloned())
        else {
            return Ok(Vec::new());
        };
        Ok(snaps
            .iter()
            .filter(of_vm)
            .filter(|s| s.meta.landmark.get(keys::VM_BACKUP) == Some(&last))
            .filter_map(|s| {
                Some(workflow::PreviousDisk {
                    vdi_uuid: s.meta.landmark.get(keys::VDI)?.clone(),
                    name_label: s.meta.landmark.get(keys::VDI_NAME).cloned(),
                    snapshot_id: s.meta.id.to_hex(),
                })
            })
            .collect())
    }

    fn commit_disk(&mut self, disk: FrozenDisk<'_>) -> Result<(), RepoError> {
        let block_size = self.repo.config().block_size;
        let lost_reason = match &disk.changes {
            Changes::FullNeeded(reason) => Some(reason.clone()),
            Changes::Since(_) | Changes::Unknown => None,
        };
        self.ui.info(format!(
            "disk {} ('{}', {}): {}",
            disk.vdi_uuid,
            disk.name_label,
            human_bytes(disk.size_bytes),
            match &disk.changes {
                Changes::Since(e) => format!(
                    "{} changed blocks",
                    BlockBitmap::covering(
                        e,
                        block_size,
                        disk.size_bytes.div_ceil(block_size as u64)
                    )
                    .count()
                ),
                Changes::FullNeeded(_) => "change tracking lost, full read".to_string(),
                Changes::Unknown => "full read".to_string(),
            }
        ));
        let mut options = self.options.clone();
        if let (ParentRequest::Newest, Some(id)) = (&options.parent, self.found.get(&disk.vdi_uuid))
        {
            options.parent = ParentRequest::NewestFound(*id);
        }
        let summary = backup_disk(
            self.ui,
            self.repo,
            disk.source,
            &options,
            disk.changes,
            Allocation::Unknown,
            disk.landmark.clone(),
        )?;
        report_human(self.ui, &summary);
        self.disks.push(XenDiskSummary {
            vdi: disk.vdi_uuid.clone(),
            name_label: disk.name_label.clone(),
            host_snapshot_vdi: disk.landmark.get(workflow::keys::SNAPSHOT_VDI).cloned(),
            lost_reason,
            cbt_unavailable: None,
            summary,
        });
        Ok(())
    }

    fn commit_metadata(
        &mut self,
        identity: &str,
        tar: &[u8],
        landmark: BTreeMap<String, String>,
    ) -> Result<(), RepoError> {
        let summary = commit_bytes(self.ui, self.repo, self.options, identity, tar, landmark)?;
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

    fn committed_landmarks(&mut self) -> Result<BTreeSet<String>, RepoError> {
        // An unreadable snapshot object may record a landmark still in use:
        // then nothing is known to be unrecorded.
        if let Some((name, reason)) = self.repo.unreadable_snapshots.first() {
            return Err(RepoError::CorruptObject {
                kind: crate::backend::Kind::Snapshot,
                name: name.clone(),
                reason: reason.clone(),
            });
        }
        Ok(self
            .repo
            .snapshots()?
            .into_iter()
            .filter_map(|s| s.meta.landmark.get(workflow::keys::SNAPSHOT_VDI).cloned())
            .collect())
    }

    /// Over when the repository's lock listing proves it: the run's
    /// process holds a stale lock, or holds none and is gone from this
    /// machine; a run of another machine that holds no lock once it is
    /// older than [`LEFTOVER_SAFETY_AGE`] (every backup holds its lock to
    /// the end). Anything else may be live.
    fn judge_run(&mut self, run: &MarkedRun) -> Verdict {
        use crate::repo::lock;
        let now = chrono::Utc::now();
        let Some(pid) = run.pid.filter(|_| !run.hostname.is_empty()) else {
            return Verdict::MaybeLive(format!("its marker names no process (run {})", run.run));
        };
        let here = hostname();
        if run.hostname == here && pid == std::process::id() {
            return Verdict::MaybeLive("it is this process".into());
        }
        let locks = match lock::list(self.repo.backend().as_ref(), self.repo.codec()) {
            Ok(l) => l,
            Err(e) => {
                return Verdict::MaybeLive(format!("the repository's locks cannot be listed: {e}"))
            }
        };
        let held = locks
            .into_iter()
            .filter_map(|(_, info)| info.ok())
            .filter(|i| i.hostname == run.hostname && i.pid == pid)
            .max_by_key(|i| i.time);
        if let Some(info) = held {
            return match lock::stale_reason(&info, now) {
                Some(why) => Verdict::Gone(format!("its process holds only a stale lock: {why}")),
                None => {
                    Verdict::MaybeLive(format!("its process still holds {}", lock::describe(&info)))
                }
            };
        }
        // No lock: the process is checked as a lock of it would be.
        let probe = crate::format::lock::LockInfo {
            exclusive: false,
            hostname: run.hostname.clone(),
            pid,
            time: now,
            command: "backup".into(),
        };
        if let Some(why) = lock::stale_reason(&probe, now) {
            return Verdict::Gone(format!("it holds no lock and {why}"));
        }
        if run.hostname == here {
            return Verdict::MaybeLive(format!("process {pid} still exists on this host"));
        }
        let age = run.started.map(|t| now.signed_duration_since(t));
        match age {
            Some(age) if age.num_seconds() > LEFTOVER_SAFETY_AGE.as_secs() as i64 => {
                Verdict::Gone(format!(
                    "it started {} hours ago on {} and holds no lock on the repository",
                    age.num_hours(),
                    run.hostname
                ))
            }
            _ => Verdict::MaybeLive(format!(
                "it ran on {} less than {} hours ago and may still be running",
                run.hostname,
                LEFTOVER_SAFETY_AGE.as_secs() / 3600
            )),
        }
    }
}

/// Backs up a XenServer VDI or VM (the workflow, then the repository).
pub(crate) fn xen_backup(
    ui: &Ui,
    repo: &Repository,
    url: &XenUrl,
    session: &Session,
    workflow_options: &WorkflowOptions,
    options: &SnapshotOptions,
) -> Result<(XenBackupSummary, RunReport)> {
    let started = std::time::Instant::now();
    let _lock = repo.lock(false, "backup")?;
    let mut workflow_options = workflow_options.clone();
    if workflow_options.marker.is_none() {
        workflow_options.marker = Some(RunMarker::new(&repo.config().id, &hostname()));
    }
    let workflow_options = &workflow_options;
    let mut committer = RepoCommitter {
        ui,
        repo,
        options,
        disks: Vec::new(),
        metadata: None,
        found: BTreeMap::new(),
    };
    let report = workflow::run(session, url, workflow_options, &mut committer)
        .with_context(|| format!("back up {}", url.shown()))?;
    for d in committer.disks.iter_mut() {
        d.cbt_unavailable = report
            .disks
            .iter()
            .find(|r| r.vdi_uuid == d.vdi)
            .and_then(|r| r.cbt_unavailable.clone());
    }
    Ok((
        XenBackupSummary {
            source: url.shown(),
            vm_backup: report.vm_backup.clone(),
            disks: committer.disks,
            metadata: committer.metadata,
            host_leftovers_removed: report.removed.clone(),
            seconds: started.elapsed().as_secs_f64(),
        },
        report,
    ))
}

fn run_xen(
    ui: &Ui,
    repo: &Repository,
    url: &XenUrl,
    xen: &XenOptions,
    (nbd_connections, nbd_limits): (usize, NbdLimits),
    options: &SnapshotOptions,
) -> Result<Outcome> {
    let session = xen_session(ui, url, xen)?;
    let workflow_options = WorkflowOptions {
        enable_cbt: xen.enable_cbt,
        keep_snapshot_data: xen.keep_snapshot_data,
        nbd_connections,
        nbd_limits,
        ..WorkflowOptions::default()
    };
    let result = xen_backup(ui, repo, url, &session, &workflow_options, options);
    session.logout();
    let (summary, run) = result?;
    ui.summary(&summary);
    ui.info(format!(
        "backed up {}{} in {:.2}s",
        plural(summary.disks.len(), "disk"),
        summary
            .vm_backup
            .as_ref()
            .map(|id| format!(" and the VM metadata (VM backup {id})"))
            .unwrap_or_default(),
        summary.seconds
    ));
    // Committed, but the host keeps what this run could not remove, or a
    // disk could not have change tracking: completed with warnings.
    Ok(
        if run.left_on_host.is_empty()
            && run.chains_ended.is_empty()
            && run.disks.iter().all(|d| d.cbt_unavailable.is_none())
        {
            Outcome::Ok
        } else {
            Outcome::Warnings
        },
    )
}

#[cfg(test)]
mod pipeline_share_tests {
    use super::pipeline_batch;

    #[test]
    fn concurrent_backups_share_the_read_buffers_down_to_a_quarter() {
        assert_eq!(pipeline_batch(64, 1), 64);
        assert_eq!(pipeline_batch(64, 0), 64);
        assert_eq!(pipeline_batch(64, 2), 32);
        assert_eq!(pipeline_batch(64, 4), 16);
        assert_eq!(pipeline_batch(64, 64), 16);
    }
}
