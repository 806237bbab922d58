//! The CBT backup workflow of a VDI or a whole VM (seed 002, reference §5
//! and §7), host side only; the repository side is a [`Committer`] the
//! command supplies.
//!
//! Per run: check `cbt_enabled` (enable it and wait, unless told not to);
//! for a VM fetch `/export_metadata?export_snapshots=false`; snapshot
//! (`VDI.snapshot`, or one `VM.snapshot` for every disk); for each disk
//! with a landmark, `VDI.list_changed_blocks(landmark, snapshot)` **before**
//! any NBD connection to the snapshot (an attached `vdi_to` answers
//! `VDI_IN_USE`); then per disk read over NBD (or `/export_raw_vdi` when
//! `get_nbd_info` is empty) and commit, the snapshot's uuid recorded as
//! the next landmark in the committed object; disconnect; destroy the
//! snapshot VM; `VDI.data_destroy` each snapshot so only a `cbt_metadata`
//! landmark stays on the host; destroy the superseded landmark.
//!
//! Lost tracking (CBT off, `SR_BACKEND_FAILURE_460`/`459`, a vanished
//! landmark, `VDI_NO_CBT_METADATA`, `MESSAGE_METHOD_UNKNOWN`, ...) is a
//! normal event: the disk is read in full with the reason, never silently.
//! On failure nothing more is committed, every snapshot taken by this run
//! and not committed is destroyed, and the previous landmark is untouched
//! (invariant 5 of DESIGN.md). Failures are a [`WorkflowError`]: the step,
//! and the host's, the NBD client's or the committer's own typed error.
//! What changed on each disk reaches the committer as [`Changes`] (byte
//! extents), never as the host's bitmap.
//!
//! Every host object a run creates (snapshot VM, snapshot VDIs) carries a
//! [`marker`] in `other_config`, set right after creation. At the start of
//! a run, marked objects of the same repository left by an earlier run
//! that is gone (killed) are destroyed: never an object without the
//! marker, never a committed landmark, never one of a run that may still
//! be live (the committer judges, from the repository's locks); when in
//! doubt the object stays and a warning says why.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::client::{HostObject, NbdInfo, Session, VdiRecord};
use super::landmarks;
use super::nbd::{NbdSet, SpooledExport};
use super::{XenApiError, XenObject, XenUrl};
use crate::source::nbd::NbdLimits;
use crate::source::{BlockSource, Changes, Extents};
use nbd::NbdError;

/// XenServer CBT granularity: one bit of `VDI.list_changed_blocks` per
/// 64 KiB, whatever the repository's block size.
pub const CBT_BLOCK_BYTES: u64 = 65536;

/// Landmark map keys (stored in each committed snapshot).
pub mod keys {
    /// `HOST:PORT` of the XenAPI endpoint.
    pub const HOST: &str = "xen.host";
    /// The live VDI backed up.
    pub const VDI: &str = "xen.vdi";
    /// The snapshot VDI of this run: the `vdi_from` of the next one.
    pub const SNAPSHOT_VDI: &str = "xen.snapshot_vdi";
    /// The VM, for VM backups.
    pub const VM: &str = "xen.vm";
    /// Groups the disks and the metadata of one VM backup.
    pub const VM_BACKUP: &str = "xen.vm_backup";
    /// `nbd` or `export_raw_vdi`.
    pub const READ_VIA: &str = "xen.read_via";
    /// `disk` or `vm-metadata`.
    pub const KIND: &str = "xen.kind";
    /// The VM's `name_label` when it was backed up (VM backups; for
    /// listings only, never used to find anything).
    pub const VM_NAME: &str = "xen.vm_name";
    /// The disk's `name_label` when it was backed up (listings only).
    pub const VDI_NAME: &str = "xen.vdi_name";
    /// The pool's uuid: a disk is the same disk through any host of its
    /// pool, and its tracking is not trusted across pools.
    pub const POOL: &str = "xen.pool";
}

/// `other_config` keys marking the host objects a run creates.
pub mod marker {
    /// The repository id (`config` id) the run writes to.
    pub const REPOSITORY: &str = "cbtvault.repository";
    /// The run id (random, one per backup run).
    pub const RUN: &str = "cbtvault.run";
    /// [`IN_PROGRESS`] from creation, [`LANDMARK`] once committed.
    pub const STATE: &str = "cbtvault.state";
    /// When the run started (RFC 3339, UTC).
    pub const STARTED: &str = "cbtvault.started";
    /// `HOSTNAME:PID` of the process that ran it.
    pub const PROCESS: &str = "cbtvault.process";
    pub const IN_PROGRESS: &str = "in-progress";
    pub const LANDMARK: &str = "landmark";
}

/// Who this run is, written into the [`marker`] of what it creates.
#[derive(Debug, Clone)]
pub struct RunMarker {
    pub repository: String,
    pub run: String,
    pub started: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub pid: u32,
}

impl RunMarker {
    /// A new run of this process writing to `repository`.
    pub fn new(repository: &str, hostname: &str) -> RunMarker {
        RunMarker {
            repository: repository.to_string(),
            run: format!("{:032x}", rand::random::<u128>()),
            started: chrono::Utc::now(),
            hostname: hostname.to_string(),
            pid: std::process::id(),
        }
    }

    fn entries(&self) -> [(&'static str, String); 5] {
        // The repository key last: an object that carries it is fully
        // marked (cleanup looks for it).
        [
            (marker::RUN, self.run.clone()),
            (marker::STATE, marker::IN_PROGRESS.to_string()),
            (
                marker::STARTED,
                self.started
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
            (marker::PROCESS, format!("{}:{}", self.hostname, self.pid)),
            (marker::REPOSITORY, self.repository.clone()),
        ]
    }
}

/// An earlier run found in the marker of a leftover host object.
#[derive(Debug, Clone)]
pub struct MarkedRun {
    pub run: String,
    /// `None` when the marker's time is missing or unreadable.
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    /// Empty when the marker names no process.
    pub hostname: String,
    pub pid: Option<u32>,
}

impl MarkedRun {
    fn from_config(config: &BTreeMap<String, String>) -> Option<MarkedRun> {
        let run = config.get(marker::RUN)?.clone();
        let started = config
            .get(marker::STARTED)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        let (hostname, pid) = match config.get(marker::PROCESS).and_then(|p| p.rsplit_once(':')) {
            Some((h, p)) => (h.to_string(), p.parse().ok()),
            None => (String::new(), None),
        };
        Some(MarkedRun {
            run,
            started,
            hostname,
            pid,
        })
    }
}

/// Whether the run that left an object is over.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Over (why): its leftovers may go.
    Gone(String),
    /// Maybe still running (why): leave its objects.
    MaybeLive(String),
}

/// One host object destroyed as a leftover of an earlier run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemovedLeftover {
    /// `VM` or `VDI`.
    pub class: String,
    pub uuid: String,
    /// The run that created it.
    #[serde(rename = "run_id")]
    pub run: String,
    /// Why that run is known to be over.
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct WorkflowOptions {
    /// Enable CBT on disks that have it off (then wait for the call).
    pub enable_cbt: bool,
    /// Keep the snapshot's data instead of `VDI.data_destroy`.
    pub keep_snapshot_data: bool,
    /// NBD connections in total (at most 16).
    pub nbd_connections: usize,
    /// Export size limit and I/O timeout of the NBD connections.
    pub nbd_limits: NbdLimits,
    /// Where `/export_raw_vdi` is spooled when there is no NBD.
    pub spool_dir: PathBuf,
    /// Destroy the previous landmark (a `cbt_metadata` VDI) once superseded.
    pub destroy_superseded_landmark: bool,
    /// Largest VM metadata export accepted.
    pub metadata_limit_bytes: u64,
    /// Marks created objects and cleans up earlier runs' leftovers; `None`
    /// does neither.
    pub marker: Option<RunMarker>,
    /// VDIs (uuids, lower case) of a VM backup left out: not snapshotted,
    /// not read (a job's `exclude_disks`).
    pub exclude_vdis: std::collections::BTreeSet<String>,
}

impl Default for WorkflowOptions {
    fn default() -> Self {
        WorkflowOptions {
            enable_cbt: true,
            keep_snapshot_data: false,
            nbd_connections: 4,
            nbd_limits: NbdLimits::default(),
            spool_dir: std::env::temp_dir(),
            destroy_superseded_landmark: true,
            metadata_limit_bytes: 64 << 20,
            marker: None,
            exclude_vdis: Default::default(),
        }
    }
}

/// What the repository knows of the last backup of a disk.
#[derive(Debug, Clone)]
pub enum Previous {
    /// Never backed up.
    None,
    /// Backed up, but that snapshot records no usable landmark (why).
    NoLandmark(String),
    /// The landmark (a snapshot VDI uuid) recorded by the last backup.
    Landmark(String),
}

/// A frozen disk, ready to be read and committed.
pub struct FrozenDisk<'a> {
    pub vdi_uuid: String,
    pub name_label: String,
    pub identity: String,
    pub size_bytes: u64,
    /// What changed since the landmark, in bytes.
    pub changes: Changes,
    pub source: &'a dyn BlockSource,
    /// To be stored in the committed snapshot (see [`keys`]).
    pub landmark: BTreeMap<String, String>,
}

/// A disk of the last backup of a VM, as the repository recorded it.
#[derive(Debug, Clone)]
pub struct PreviousDisk {
    pub vdi_uuid: String,
    pub name_label: Option<String>,
    /// The snapshot that ends its chain if the disk is gone.
    pub snapshot_id: String,
}

/// Which disk a backup is of: VDI uuids are unique, so the repository
/// finds its last backup by the uuid through whichever host of the pool it
/// was taken (`identity`, the URL's form, is matched too).
#[derive(Debug, Clone, Copy)]
pub struct DiskKey<'a> {
    pub identity: &'a str,
    pub vdi_uuid: &'a str,
    /// The pool the disk is in now, when the host said.
    pub pool: Option<&'a str>,
}

/// The repository side of the workflow.
pub trait Committer {
    /// Why the repository side failed (its own typed error).
    type Error: std::error::Error + Send + Sync + 'static;
    /// What the repository knows of the last backup of this disk.
    fn previous(&mut self, disk: DiskKey<'_>) -> Result<Previous, Self::Error>;
    /// Reads and commits one disk; the snapshot object must carry
    /// `disk.landmark`. Called once per disk.
    fn commit_disk(&mut self, disk: FrozenDisk<'_>) -> Result<(), Self::Error>;
    /// Stores a VM's metadata export (after its disks).
    fn commit_metadata(
        &mut self,
        identity: &str,
        tar: &[u8],
        landmark: BTreeMap<String, String>,
    ) -> Result<(), Self::Error>;
    fn warn(&mut self, message: String);
    fn info(&mut self, message: String);
    /// The disks of the last backup of VM `vm` on this host (none when
    /// there is none), to tell when one of them is gone.
    fn previous_vm_disks(&mut self, _vm: &str) -> Result<Vec<PreviousDisk>, Self::Error> {
        Ok(Vec::new())
    }
    /// Uuids of every landmark a committed snapshot of the repository
    /// records (`xen.snapshot_vdi`): never destroyed as leftovers.
    fn committed_landmarks(&mut self) -> Result<BTreeSet<String>, Self::Error> {
        Ok(BTreeSet::new())
    }
    /// Whether the run that marked a leftover is over. The default knows
    /// nothing, so nothing is destroyed.
    fn judge_run(&mut self, run: &MarkedRun) -> Verdict {
        Verdict::MaybeLive(format!("nothing tells whether run {} is over", run.run))
    }
}

/// Which step failed, and why. `E` is the [`Committer`]'s error.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError<E: std::error::Error + 'static> {
    /// A XenAPI call or HTTP handler failed.
    #[error("{step}: {source}")]
    Host {
        step: String,
        #[source]
        source: XenApiError,
    },
    /// The host's objects cannot be backed up as asked (why).
    #[error("{step}: {reason}")]
    Unusable { step: String, reason: String },
    /// No NBD connection to a snapshot could be opened.
    #[error("connect NBD for VDI {vdi}: {source}")]
    Nbd {
        vdi: String,
        #[source]
        source: NbdError,
    },
    /// The repository side failed; nothing more was committed.
    #[error("{step}: {source}")]
    Commit {
        step: String,
        #[source]
        source: E,
    },
    /// A stop signal: the run stopped at a check point between steps
    /// (host-side snapshots of the run destroyed as on any failure).
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
}

/// Maps a XenAPI failure of `step`.
fn on_host<E: std::error::Error + 'static>(
    step: impl Into<String>,
) -> impl FnOnce(XenApiError) -> WorkflowError<E> {
    let step = step.into();
    move |source| WorkflowError::Host { step, source }
}

/// Maps a repository-side failure of `step`.
fn commit<E: std::error::Error + 'static>(
    step: impl Into<String>,
) -> impl FnOnce(E) -> WorkflowError<E> {
    let step = step.into();
    move |source| WorkflowError::Commit { step, source }
}

fn unusable<E: std::error::Error + 'static>(
    step: impl Into<String>,
    reason: impl Into<String>,
) -> WorkflowError<E> {
    WorkflowError::Unusable {
        step: step.into(),
        reason: reason.into(),
    }
}

/// What one run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub vm_backup: Option<String>,
    pub disks: Vec<DiskReport>,
    /// Leftovers of earlier runs destroyed at the start of this one.
    pub removed: Vec<RemovedLeftover>,
    /// This run's own host-side objects (snapshot VM, snapshot VDIs) it
    /// could not destroy (each also warned about): left to remove by hand.
    pub left_on_host: Vec<String>,
    /// Disks of the VM's last backup that are no longer its disks (moved
    /// to another SR, replaced): their chains end (each warned about).
    pub chains_ended: Vec<String>,
    pub seconds_host: f64,
}

#[derive(Debug, Clone)]
pub struct DiskReport {
    pub vdi_uuid: String,
    pub snapshot_vdi: String,
    pub incremental: bool,
    pub lost_reason: Option<String>,
    /// Why this disk has no change tracking the host would enable (it is
    /// read in full every run), when `VDI.enable_cbt` was refused.
    pub cbt_unavailable: Option<String>,
}

const NULL_REF: &str = "OpaqueRef:NULL";

/// Codes that mean "no usable change tracking between these two VDIs".
fn lost_code(code: &str) -> bool {
    matches!(
        code,
        "SR_BACKEND_FAILURE_460"
            | "SR_BACKEND_FAILURE_459"
            | "VDI_NO_CBT_METADATA"
            | "MESSAGE_METHOD_UNKNOWN"
            | "VDI_INCOMPATIBLE_TYPE"
            | "HANDLE_INVALID"
            | "UUID_INVALID"
    )
}

fn describe(e: &XenApiError) -> String {
    match e {
        XenApiError::Api { code, params, .. } => {
            let detail: Vec<&str> = params
                .iter()
                .map(String::as_str)
                .filter(|p| !p.is_empty())
                .collect();
            if detail.is_empty() {
                code.clone()
            } else {
                format!("{code} ({})", detail.join("; "))
            }
        }
        other => other.to_string(),
    }
}

/// One disk of the run.
struct Disk {
    vdi_ref: String,
    record: VdiRecord,
    identity: String,
    /// The pool's uuid (see [`keys::POOL`]).
    pool: Option<String>,
    /// Set when tracking is already known to be lost (or never started).
    full_reason: Option<Option<String>>,
    landmark: Option<String>,
    landmark_ref: Option<String>,
    /// The landmark the repository recorded for this disk, whether or not
    /// tracking still holds: superseded once this run commits.
    recorded_landmark: Option<String>,
    snapshot_ref: Option<String>,
    snapshot_uuid: String,
    snapshot_cbt: bool,
    changes: Option<Changes>,
    committed: bool,
    /// `VDI.enable_cbt` was refused (the SR, the licence, a RAW VDI):
    /// why, as the host said it.
    cbt_unavailable: Option<String>,
}

/// Error codes with which `VDI.enable_cbt` says this disk cannot have
/// change tracking (xenapi-reference.md §2.3): the disk is then read in
/// full every run, and the VM's other disks go on incrementally.
fn cbt_refused(e: &XenApiError) -> bool {
    [
        "SR_OPERATION_NOT_SUPPORTED",
        "LICENCE_RESTRICTION",
        "SR_BACKEND_FAILURE_66",
        "VDI_INCOMPATIBLE_TYPE",
        "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
    ]
    .iter()
    .any(|c| e.is_code(c))
}

/// Host-side objects of this run, cleaned up on every path.
struct HostSide<'s> {
    session: &'s Session,
    snapshot_vm: Option<String>,
    marker: Option<&'s RunMarker>,
    /// Snapshot VDIs of the snapshot VM that belong to no backed-up disk
    /// (a host that snapshotted a disk it was told to ignore): destroyed
    /// with the snapshot VM.
    stray_snapshot_vdis: Vec<(String, String)>,
}

impl HostSide<'_> {
    /// `VDI.destroy`, retried while the host still sees a dom0 VBD (an NBD
    /// connection being torn down): reference §6, XO issue 7956.
    fn destroy_vdi(&self, vdi: &str) -> Result<(), XenApiError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.session.vdi_destroy(vdi) {
                Err(e) if e.is_code("VDI_IN_USE") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) if e.is_code("HANDLE_INVALID") => return Ok(()),
                other => return other,
            }
        }
    }

    fn data_destroy(&self, vdi: &str) -> Result<(), XenApiError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.session.vdi_data_destroy(vdi) {
                Err(e) if e.is_code("VDI_IN_USE") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => return other,
            }
        }
    }

    /// `CLASS.add_to_other_config` of `key`, replacing a value the object
    /// inherited (`VDI.snapshot` and `VM.snapshot` copy `other_config`;
    /// xapi answers `MAP_DUPLICATE_KEY` for a key already there).
    fn set_key(
        &self,
        class: &str,
        object: &str,
        key: &str,
        value: &str,
    ) -> Result<(), XenApiError> {
        let s = self.session;
        match s.add_to_other_config(class, object, key, value) {
            Err(e) if e.is_code("MAP_DUPLICATE_KEY") => {
                s.remove_from_other_config(class, object, key)?;
                s.add_to_other_config(class, object, key, value)
            }
            other => other,
        }
    }

    /// Marks a VM or VDI this run just created (see [`marker`]).
    fn mark(&self, class: &str, object: &str) -> Result<(), XenApiError> {
        let Some(m) = self.marker else {
            return Ok(());
        };
        for (key, value) in m.entries() {
            self.set_key(class, object, key, &value)?;
        }
        Ok(())
    }

    /// Marks a committed snapshot VDI as a landmark (a warning on failure:
    /// the committed snapshot records it anyway).
    fn mark_landmark<C: Committer>(&self, vdi: &str, uuid: &str, committer: &mut C) {
        if self.marker.is_none() {
            return;
        }
        if let Err(e) = self.set_key("VDI", vdi, marker::STATE, marker::LANDMARK) {
            committer.warn(format!(
                "could not mark landmark VDI {uuid} as such in its other_config: {}",
                describe(&e)
            ));
        }
    }

    fn destroy_snapshot_vm(&mut self) -> Result<(), XenApiError> {
        if let Some(vm) = self.snapshot_vm.take() {
            match self.session.vm_destroy(&vm) {
                Err(e) if !e.is_code("HANDLE_INVALID") => {
                    self.snapshot_vm = Some(vm);
                    return Err(e);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Runs one backup of `url` (a VDI or a VM) through `committer`.
pub fn run<C: Committer>(
    session: &Session,
    url: &XenUrl,
    options: &WorkflowOptions,
    committer: &mut C,
) -> Result<RunReport, WorkflowError<C::Error>> {
    let started = Instant::now();
    let mut host = HostSide {
        session,
        snapshot_vm: None,
        marker: options.marker.as_ref(),
        stray_snapshot_vdis: Vec::new(),
    };
    // Best effort: without it, a disk is still found by its uuid.
    let pool = session.pool_uuid().ok().flatten();
    let (mut disks, ignored) = discover(
        session,
        url,
        pool.as_deref(),
        &options.exclude_vdis,
        committer,
    )?;
    let chains_ended = match url.object {
        XenObject::Vm => ended_chains(url, &disks, committer)?,
        XenObject::Vdi => Vec::new(),
    };
    let removed = match &options.marker {
        Some(m) => clean_leftovers(&host, m, committer),
        None => Vec::new(),
    };
    let vm_ref = match url.object {
        XenObject::Vm => Some(
            session
                .vm_by_uuid(&url.uuid)
                .map_err(on_host("VM.get_by_uuid"))?,
        ),
        XenObject::Vdi => None,
    };
    for d in disks.iter_mut() {
        prepare_cbt(session, d, options, committer)?;
    }
    let vm_backup = vm_ref
        .as_ref()
        .map(|_| format!("{:032x}", rand::random::<u128>()));
    // The VM's name, for listings: best effort (a name is never needed).
    let vm_name = vm_ref
        .as_deref()
        .and_then(|r| session.vm_name_label(r).ok());
    let metadata = match &vm_ref {
        Some(_) => Some(
            session
                .export_metadata(&url.uuid, options.metadata_limit_bytes)
                .map_err(on_host("GET /export_metadata"))?,
        ),
        None => None,
    };

    // A stop signal before the snapshots: nothing to clean up on the host.
    crate::interrupt::check()?;
    // From the snapshot on, every exit path cleans up; the check points
    // between steps make a stop signal one of them.
    let result = (|| -> Result<(), WorkflowError<C::Error>> {
        take_snapshots(&mut host, vm_ref.as_deref(), &mut disks, &ignored)?;
        // Test hook: lets a test kill the process with marked snapshots.
        #[cfg(debug_assertions)]
        crate::repo::test_delay("xen_snapshot_taken");
        crate::interrupt::check()?;
        // Every bitmap before any NBD connection to a snapshot.
        for d in disks.iter_mut() {
            changes_of(session, d)?;
        }
        for d in disks.iter_mut() {
            crate::interrupt::check()?;
            read_and_commit(
                session,
                url,
                options,
                vm_backup.as_deref().map(|id| (id, vm_name.as_deref())),
                d,
                committer,
            )?;
        }
        crate::interrupt::check()?;
        if let (Some(tar), Some(id)) = (&metadata, &vm_backup) {
            let mut landmark = BTreeMap::new();
            landmark.insert(keys::HOST.into(), url.authority());
            if let Some(pool) = &pool {
                landmark.insert(keys::POOL.into(), pool.clone());
            }
            landmark.insert(keys::VM.into(), url.uuid.clone());
            landmark.insert(keys::VM_BACKUP.into(), id.clone());
            landmark.insert(keys::KIND.into(), "vm-metadata".into());
            if let Some(name) = &vm_name {
                landmark.insert(keys::VM_NAME.into(), name.clone());
            }
            committer
                .commit_metadata(&url.vm_metadata_identity(&url.uuid), tar, landmark)
                .map_err(commit("commit the VM metadata"))?;
        }
        Ok(())
    })();

    // Host-side clean-up: the snapshot VM first (its VBDs block data_destroy).
    let mut left_on_host = Vec::new();
    if let Err(e) = host.destroy_snapshot_vm() {
        left_on_host.push("the snapshot VM".to_string());
        committer.warn(format!(
            "could not destroy the snapshot VM: {}; remove it by hand",
            describe(&e)
        ));
    }
    for (vdi, uuid) in std::mem::take(&mut host.stray_snapshot_vdis) {
        if let Err(e) = host.destroy_vdi(&vdi) {
            left_on_host.push(format!("snapshot VDI {uuid}"));
            committer.warn(format!(
                "could not destroy snapshot VDI {uuid} (of a disk not backed up): {}; remove it by hand",
                describe(&e)
            ));
        }
    }
    let mut reports = Vec::new();
    for d in disks.iter() {
        let Some(snap) = &d.snapshot_ref else {
            continue;
        };
        if d.committed && d.snapshot_cbt {
            // Now the next landmark: keep only its CBT metadata.
            if !options.keep_snapshot_data {
                if let Err(e) = host.data_destroy(snap) {
                    committer.warn(format!(
                        "VDI.data_destroy of snapshot {} failed: {}; the snapshot keeps its data and stays a valid landmark",
                        d.snapshot_uuid,
                        describe(&e)
                    ));
                }
            }
            host.mark_landmark(snap, &d.snapshot_uuid, committer);
            if options.destroy_superseded_landmark {
                if let Some(old) = &d.landmark_ref {
                    supersede(&host, old, &d.vdi_ref, options, committer);
                }
            }
        } else if let Err(e) = host.destroy_vdi(snap) {
            // Not committed (failure) or useless as a landmark (no CBT).
            left_on_host.push(format!("snapshot VDI {}", d.snapshot_uuid));
            committer.warn(format!(
                "could not destroy snapshot VDI {}: {}; remove it by hand",
                d.snapshot_uuid,
                describe(&e)
            ));
        }
        if d.committed && d.landmark_ref.is_none() && options.destroy_superseded_landmark {
            release_lost_landmark(session, url, options, d, committer);
        }
        if d.committed {
            let (incremental, lost_reason) = match &d.changes {
                Some(Changes::Since(_)) => (true, None),
                Some(Changes::FullNeeded(r)) => (false, Some(r.clone())),
                Some(Changes::Unknown) | None => (false, None),
            };
            reports.push(DiskReport {
                vdi_uuid: d.record.uuid.clone(),
                snapshot_vdi: d.snapshot_uuid.clone(),
                incremental,
                lost_reason,
                cbt_unavailable: d.cbt_unavailable.clone(),
            });
        }
    }
    result?;
    Ok(RunReport {
        vm_backup,
        disks: reports,
        removed,
        left_on_host,
        chains_ended,
        seconds_host: started.elapsed().as_secs_f64(),
    })
}

/// The disks of the VM's last backup that are not among `disks` now: a
/// disk moved to another SR or replaced gets a new uuid, and its chain
/// ends. Warns once per disk, naming it and the snapshot that ends it.
fn ended_chains<C: Committer>(
    url: &XenUrl,
    disks: &[Disk],
    committer: &mut C,
) -> Result<Vec<String>, WorkflowError<C::Error>> {
    let previous = committer
        .previous_vm_disks(&url.uuid)
        .map_err(commit("read the VM's last backup"))?;
    let new: Vec<&str> = disks
        .iter()
        .filter(|d| !previous.iter().any(|p| p.vdi_uuid == d.record.uuid))
        .map(|d| d.record.uuid.as_str())
        .collect();
    let mut ended = Vec::new();
    for p in previous
        .iter()
        .filter(|p| !disks.iter().any(|d| d.record.uuid == p.vdi_uuid))
    {
        committer.warn(format!(
            "VDI {}{} was backed up with VM {} last time but is no longer one of its disks (moved to another SR, replaced or detached): its chain ends at snapshot {}{}",
            p.vdi_uuid,
            p.name_label
                .as_deref()
                .map(|n| format!(" ('{n}')"))
                .unwrap_or_default(),
            url.uuid,
            p.snapshot_id,
            if new.is_empty() {
                String::new()
            } else {
                format!(
                    "; new to this repository, read in full: VDI {}",
                    new.join(", VDI ")
                )
            }
        ));
        ended.push(p.vdi_uuid.clone());
    }
    Ok(ended)
}

/// How long a leftover of a run that holds no lock on the repository and
/// ran on another machine is left alone (it may still be reading).
pub const LEFTOVER_SAFETY_AGE: Duration = Duration::from_secs(6 * 3600);

/// The verdict on `run`, asked of the committer once per run.
fn verdict<C: Committer>(
    cache: &mut BTreeMap<String, Verdict>,
    run: &MarkedRun,
    committer: &mut C,
) -> Verdict {
    cache
        .entry(run.run.clone())
        .or_insert_with(|| committer.judge_run(run))
        .clone()
}

/// Destroys what earlier, finished runs of this repository left on the
/// host (a killed run's snapshot VM and snapshot VDIs, and committed
/// `cbt_metadata` landmarks that no live snapshot records any more),
/// found by their [`marker`] only. Never: an object without this
/// repository's marker, one of this run, a landmark a snapshot records or
/// one that kept its data, a VDI that is not a snapshot, an object of a
/// run that may still be live. Best effort: a failure is a
/// warning and the backup goes on.
fn clean_leftovers<C: Committer>(
    host: &HostSide<'_>,
    me: &RunMarker,
    committer: &mut C,
) -> Vec<RemovedLeftover> {
    let s = host.session;
    let mut removed = Vec::new();
    let (vms, vdis) = match (s.all_objects("VM"), s.all_objects("VDI")) {
        (Ok(vms), Ok(vdis)) => (vms, vdis),
        (Err(e), _) | (_, Err(e)) => {
            committer.warn(format!(
                "could not look for leftovers of earlier backups on the host: {}; any stay there",
                describe(&e)
            ));
            return removed;
        }
    };
    let earlier = |o: &HostObject| -> Option<MarkedRun> {
        if o.other_config.get(marker::REPOSITORY) != Some(&me.repository) || !o.is_a_snapshot {
            return None;
        }
        MarkedRun::from_config(&o.other_config).filter(|r| r.run != me.run)
    };
    if !vms.iter().chain(&vdis).any(|o| earlier(o).is_some()) {
        return removed;
    }
    let landmarks = match committer.committed_landmarks() {
        Ok(l) => l,
        Err(e) => {
            committer.warn(format!(
                "could not read the repository's landmarks: {e}; leftovers of earlier backups stay on the host"
            ));
            return removed;
        }
    };
    let by_ref: BTreeMap<&str, &HostObject> =
        vdis.iter().map(|o| (o.reference.as_str(), o)).collect();
    let mut cache = BTreeMap::new();
    'vms: for vm in &vms {
        let Some(run) = earlier(vm) else {
            continue;
        };
        let reason = match verdict(&mut cache, &run, committer) {
            Verdict::Gone(why) => why,
            Verdict::MaybeLive(why) => {
                committer.warn(format!(
                    "left snapshot VM {} of backup run {} on the host: {why}",
                    vm.uuid, run.run
                ));
                continue;
            }
        };
        let mut disks = Vec::new();
        for vbd in &vm.vbds {
            match s.vbd_record(vbd) {
                Ok(b) if b.vdi != NULL_REF && !b.vdi.is_empty() => disks.push(b.vdi),
                Ok(_) => {}
                Err(e) => {
                    committer.warn(format!(
                        "could not read a disk of leftover snapshot VM {}: {}; left on the host",
                        vm.uuid,
                        describe(&e)
                    ));
                    continue 'vms;
                }
            }
        }
        match s.vm_destroy(&vm.reference) {
            Err(e) if !e.is_code("HANDLE_INVALID") => {
                committer.warn(format!(
                    "could not destroy leftover snapshot VM {}: {}; remove it by hand",
                    vm.uuid,
                    describe(&e)
                ));
                continue;
            }
            _ => {}
        }
        committer.info(format!(
            "removed snapshot VM {} left on the host by backup run {} ({reason})",
            vm.uuid, run.run
        ));
        removed.push(RemovedLeftover {
            class: "VM".into(),
            uuid: vm.uuid.clone(),
            run: run.run.clone(),
            reason: reason.clone(),
        });
        // Its marked snapshot VDIs go below (now without VBDs); one that
        // carries no marker (a kill before it was marked) is not touched.
        for r in disks {
            if let Some(vdi) = by_ref.get(r.as_str()) {
                if vdi.is_a_snapshot && !vdi.other_config.contains_key(marker::REPOSITORY) {
                    committer.warn(format!(
                        "snapshot VDI {} of leftover snapshot VM {} carries no cbtvault marker; left on the host, remove it by hand if nobody needs it",
                        vdi.uuid, vm.uuid
                    ));
                }
            }
        }
    }
    // Listed again: VBDs of the snapshot VMs destroyed above are gone.
    let vdis = match s.all_objects("VDI") {
        Ok(v) => v,
        Err(e) => {
            committer.warn(format!(
                "could not list the host's VDIs again: {}; leftover snapshot VDIs stay there",
                describe(&e)
            ));
            return removed;
        }
    };
    for vdi in &vdis {
        let Some(run) = earlier(vdi) else {
            continue;
        };
        if landmarks.contains(&vdi.uuid) {
            continue;
        }
        // A committed landmark no live snapshot records any more (its
        // snapshots forgotten while the host was out of reach, or its
        // destroy failed when a newer one replaced it) is of no use: it
        // goes too, unless it kept its data (left as the run was asked).
        let orphan =
            vdi.other_config.get(marker::STATE).map(String::as_str) == Some(marker::LANDMARK);
        if orphan && vdi.vdi_type != "cbt_metadata" {
            continue;
        }
        let reason = match verdict(&mut cache, &run, committer) {
            Verdict::Gone(_) if orphan => {
                "a landmark no snapshot of this repository records any more".to_string()
            }
            Verdict::Gone(why) => why,
            Verdict::MaybeLive(why) => {
                committer.warn(format!(
                    "left snapshot VDI {} of backup run {} on the host: {why}",
                    vdi.uuid, run.run
                ));
                continue;
            }
        };
        if !vdi.vbds.is_empty() {
            committer.warn(format!(
                "leftover snapshot VDI {} of backup run {} has a VBD (a VM or dom0 uses it); left on the host",
                vdi.uuid, run.run
            ));
            continue;
        }
        if let Err(e) = host.destroy_vdi(&vdi.reference) {
            committer.warn(format!(
                "could not destroy leftover snapshot VDI {}: {}; remove it by hand",
                vdi.uuid,
                describe(&e)
            ));
            continue;
        }
        committer.info(format!(
            "removed snapshot VDI {} left on the host by backup run {} ({reason})",
            vdi.uuid, run.run
        ));
        removed.push(RemovedLeftover {
            class: "VDI".into(),
            uuid: vdi.uuid.clone(),
            run: run.run.clone(),
            reason,
        });
    }
    removed
}

/// Destroys the previous landmark once a newer one is committed, if it is
/// a snapshot of the same VDI: a `cbt_metadata` one always, one that kept
/// its data (its data_destroy failed) unless snapshot data is to be kept.
/// Destroying a chain member merges its bitmap into its child (reference
/// §2.8), so the chain stays whole.
fn supersede<C: Committer>(
    host: &HostSide<'_>,
    old: &str,
    vdi_ref: &str,
    options: &WorkflowOptions,
    committer: &mut C,
) {
    let s = host.session;
    let ok = match s.vdi_record(old) {
        Ok(r) => {
            r.is_a_snapshot
                && r.snapshot_of == vdi_ref
                && (r.vdi_type == "cbt_metadata" || !options.keep_snapshot_data)
        }
        Err(_) => false,
    };
    if ok {
        if let Err(e) = host.destroy_vdi(old) {
            committer.warn(format!(
                "could not destroy the superseded landmark: {}",
                describe(&e)
            ));
        }
    }
}

/// After a committed backup that did not continue from the landmark the
/// repository recorded (tracking lost: CBT disabled, unrelated VDIs,
/// `VDI_NO_CBT_METADATA`, ...), that landmark is useless: released with
/// the checks of [`landmarks::release_one`] (only a `cbt_metadata`
/// snapshot of this disk not marked by another repository). A vanished
/// one is simply gone; anything else is a warning, never a failure.
fn release_lost_landmark<C: Committer>(
    session: &Session,
    url: &XenUrl,
    options: &WorkflowOptions,
    d: &Disk,
    committer: &mut C,
) {
    let Some(old) = d
        .recorded_landmark
        .as_ref()
        .filter(|l| **l != d.snapshot_uuid)
    else {
        return;
    };
    let Some(m) = &options.marker else {
        // Without our repository id nothing proves the landmark is ours.
        return;
    };
    let item = landmarks::Landmark {
        host: url.authority(),
        vdi: d.record.uuid.clone(),
        landmark: old.clone(),
    };
    match landmarks::release_one(session, &m.repository, &item) {
        landmarks::Outcome::Destroyed => committer.info(format!(
            "destroyed landmark {old} of VDI {} on the host (superseded by the new backup set)",
            d.record.uuid
        )),
        landmarks::Outcome::AlreadyGone => {}
        landmarks::Outcome::Refused { reason } => committer.warn(format!(
            "left the superseded landmark {old} of VDI {} on the host: {reason}",
            d.record.uuid
        )),
        landmarks::Outcome::Failed { error } => committer.warn(format!(
            "could not destroy the superseded landmark {old} of VDI {}: {error}; forget removes it later, or remove it by hand",
            d.record.uuid
        )),
    }
}

/// The disks to back up, and the refs of the VM's disks that are not
/// backed up (other VDI types), which `VM.snapshot` is told to ignore.
type Discovered = (Vec<Disk>, Vec<String>);

fn discover<C: Committer>(
    session: &Session,
    url: &XenUrl,
    pool: Option<&str>,
    exclude: &std::collections::BTreeSet<String>,
    committer: &mut C,
) -> Result<Discovered, WorkflowError<C::Error>> {
    let new_disk = |vdi_ref: String, record: VdiRecord| Disk {
        identity: url.disk_identity(&record.uuid),
        pool: pool.map(str::to_string),
        vdi_ref,
        record,
        full_reason: None,
        landmark: None,
        landmark_ref: None,
        recorded_landmark: None,
        snapshot_ref: None,
        snapshot_uuid: String::new(),
        snapshot_cbt: false,
        changes: None,
        committed: false,
        cbt_unavailable: None,
    };
    let mut disks = Vec::new();
    let mut ignored = Vec::new();
    match url.object {
        XenObject::Vdi => {
            let r = session
                .vdi_by_uuid(&url.uuid)
                .map_err(on_host(format!("find VDI {}", url.uuid)))?;
            let rec = session.vdi_record(&r).map_err(on_host("VDI.get_record"))?;
            if rec.is_a_snapshot {
                return Err(unusable(
                    "check the VDI",
                    format!(
                        "VDI {} is a snapshot; name the live VDI (its snapshot_of)",
                        rec.uuid
                    ),
                ));
            }
            if rec.vdi_type != "user" && rec.vdi_type != "system" {
                return Err(unusable(
                    "check the VDI",
                    format!(
                        "VDI {} has type '{}'; only user and system disks are backed up",
                        rec.uuid, rec.vdi_type
                    ),
                ));
            }
            disks.push(new_disk(r, rec));
        }
        XenObject::Vm => {
            let vm = session
                .vm_by_uuid(&url.uuid)
                .map_err(on_host(format!("find VM {}", url.uuid)))?;
            let mut found = Vec::new();
            for vbd in session.vm_vbds(&vm).map_err(on_host("VM.get_VBDs"))? {
                let b = session
                    .vbd_record(&vbd)
                    .map_err(on_host("VBD.get_record"))?;
                if b.vbd_type != "Disk" || b.vdi == NULL_REF || b.vdi.is_empty() {
                    continue;
                }
                let rec = session
                    .vdi_record(&b.vdi)
                    .map_err(on_host("VDI.get_record"))?;
                if rec.vdi_type != "user" && rec.vdi_type != "system" {
                    committer.info(format!(
                        "skipping VDI {} of type '{}'",
                        rec.uuid, rec.vdi_type
                    ));
                    ignored.push(b.vdi.clone());
                    continue;
                }
                if exclude.contains(&rec.uuid.to_ascii_lowercase()) {
                    committer.info(format!("leaving out VDI {} (excluded)", rec.uuid));
                    ignored.push(b.vdi.clone());
                    continue;
                }
                found.push((b.userdevice, b.vdi, rec));
            }
            found.sort_by(|a, b| {
                let n = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
                n(&a.0).cmp(&n(&b.0)).then(a.0.cmp(&b.0))
            });
            for (_, r, rec) in found {
                disks.push(new_disk(r, rec));
            }
            if disks.is_empty() {
                return Err(unusable(
                    "find the VM's disks",
                    format!("VM {} has no user or system disk", url.uuid),
                ));
            }
        }
    }
    Ok((disks, ignored))
}

/// Checks CBT and the repository's landmark; enables CBT when asked.
fn prepare_cbt<C: Committer>(
    session: &Session,
    d: &mut Disk,
    options: &WorkflowOptions,
    committer: &mut C,
) -> Result<(), WorkflowError<C::Error>> {
    let previous = committer
        .previous(DiskKey {
            identity: &d.identity,
            vdi_uuid: &d.record.uuid,
            pool: d.pool.as_deref(),
        })
        .map_err(commit("read the previous backup"))?;
    let uuid = d.record.uuid.clone();
    if let Previous::Landmark(l) = &previous {
        d.recorded_landmark = Some(l.clone());
    }
    let cbt = match session.vdi_cbt_enabled(&d.vdi_ref) {
        Ok(b) => Some(b),
        Err(e) if e.is_code("MESSAGE_METHOD_UNKNOWN") => None,
        Err(e) => return Err(on_host("VDI.get_cbt_enabled")(e)),
    };
    let had_backup = !matches!(previous, Previous::None);
    let lost = |why: String| if had_backup { Some(why) } else { None };
    match cbt {
        None => {
            d.full_reason = Some(lost(format!(
                "the host has no changed block tracking (MESSAGE_METHOD_UNKNOWN for VDI.get_cbt_enabled): VDI {uuid} is read in full every time"
            )));
            if !had_backup {
                committer.warn(format!(
                    "the host has no changed block tracking: VDI {uuid} will be read in full every time"
                ));
            }
            return Ok(());
        }
        Some(false) => {
            if options.enable_cbt {
                match session.vdi_enable_cbt(&d.vdi_ref) {
                    Ok(()) => {}
                    Err(e) if cbt_refused(&e) => {
                        let why = describe(&e);
                        committer.warn(format!(
                            "VDI {uuid} ('{}') cannot have changed block tracking: VDI.enable_cbt was refused ({why}); it is read in full every run, the other disks stay incremental",
                            d.record.name_label
                        ));
                        d.full_reason = Some(lost(format!(
                            "VDI.enable_cbt on {uuid} was refused ({why}): read in full"
                        )));
                        d.cbt_unavailable = Some(why);
                        return Ok(());
                    }
                    Err(e) => return Err(on_host(format!("VDI.enable_cbt on {uuid}"))(e)),
                }
                committer.info(format!("enabled changed block tracking on VDI {uuid}"));
                d.full_reason = Some(lost(format!(
                    "changed block tracking was disabled on VDI {uuid} (by a user, or by the host after a crash); enabled it again"
                )));
            } else {
                d.full_reason = Some(lost(format!(
                    "changed block tracking is disabled on VDI {uuid} (--no-enable-cbt)"
                )));
            }
            return Ok(());
        }
        Some(true) => {}
    }
    match previous {
        Previous::None => d.full_reason = Some(None),
        Previous::NoLandmark(why) => d.full_reason = Some(Some(why)),
        Previous::Landmark(uuid) => d.landmark = Some(uuid),
    }
    Ok(())
}

fn take_snapshots<E: std::error::Error + 'static>(
    side: &mut HostSide<'_>,
    vm_ref: Option<&str>,
    disks: &mut [Disk],
    ignored: &[String],
) -> Result<(), WorkflowError<E>> {
    let s = side.session;
    match vm_ref {
        None => {
            let d = &mut disks[0];
            let snap = s
                .vdi_snapshot(&d.vdi_ref)
                .map_err(on_host(format!("VDI.snapshot of {}", d.record.uuid)))?;
            d.snapshot_ref = Some(snap.clone());
            side.mark("VDI", &snap)
                .map_err(on_host("mark the snapshot VDI (VDI.add_to_other_config)"))?;
        }
        Some(vm) => {
            let name = format!(
                "cbtvault {}",
                chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
            );
            let snap_vm = s
                .vm_snapshot(vm, &name, ignored)
                .map_err(on_host("VM.snapshot"))?;
            side.snapshot_vm = Some(snap_vm.clone());
            side.mark("VM", &snap_vm)
                .map_err(on_host("mark the snapshot VM (VM.add_to_other_config)"))?;
            let mut snapshot_vdis = Vec::new();
            for vbd in s
                .vm_vbds(&snap_vm)
                .map_err(on_host("VM.get_VBDs of the snapshot"))?
            {
                let b = s.vbd_record(&vbd).map_err(on_host("VBD.get_record"))?;
                if b.vdi == NULL_REF || b.vdi.is_empty() {
                    continue;
                }
                let rec = s.vdi_record(&b.vdi).map_err(on_host("VDI.get_record"))?;
                if rec.is_a_snapshot {
                    snapshot_vdis.push(b.vdi.clone());
                }
                match disks.iter_mut().find(|d| d.vdi_ref == rec.snapshot_of) {
                    Some(d) => d.snapshot_ref = Some(b.vdi.clone()),
                    // A disk not backed up that the host snapshotted anyway.
                    None if rec.is_a_snapshot => side
                        .stray_snapshot_vdis
                        .push((b.vdi.clone(), rec.uuid.clone())),
                    None => {}
                }
            }
            // Every snapshot VDI of the VM, backed up or not.
            for vdi in &snapshot_vdis {
                side.mark("VDI", vdi)
                    .map_err(on_host("mark the snapshot VDI (VDI.add_to_other_config)"))?;
            }
            if let Some(d) = disks.iter().find(|d| d.snapshot_ref.is_none()) {
                return Err(unusable(
                    "VM.snapshot",
                    format!("the snapshot has no disk for VDI {}", d.record.uuid),
                ));
            }
        }
    }
    for d in disks.iter_mut() {
        let Some(snap) = &d.snapshot_ref else {
            continue;
        };
        let rec = s
            .vdi_record(snap)
            .map_err(on_host("VDI.get_record of the snapshot"))?;
        if rec.virtual_size != d.record.virtual_size {
            // Resized between the record and the snapshot: use the snapshot's.
            d.record.virtual_size = rec.virtual_size;
        }
        d.snapshot_uuid = rec.uuid;
        d.snapshot_cbt = rec.cbt_enabled == Some(true);
    }
    Ok(())
}

/// `list_changed_blocks(landmark, snapshot)` or the reason for a full read.
fn changes_of<E: std::error::Error + 'static>(
    session: &Session,
    d: &mut Disk,
) -> Result<(), WorkflowError<E>> {
    if let Some(reason) = &d.full_reason {
        d.changes = Some(match reason {
            Some(why) => Changes::FullNeeded(why.clone()),
            None => Changes::Unknown,
        });
        return Ok(());
    }
    let Some(landmark) = d.landmark.clone() else {
        d.changes = Some(Changes::Unknown);
        return Ok(());
    };
    let Some(snap) = d.snapshot_ref.clone() else {
        return Err(unusable("list changed blocks", "no snapshot"));
    };
    let uuid = &d.record.uuid;
    let lost = |why: String| Some(Changes::FullNeeded(why));
    let from = match session.vdi_by_uuid(&landmark) {
        Ok(r) => r,
        Err(e) if e.is_code("UUID_INVALID") => {
            d.changes = lost(format!(
                "the landmark of VDI {uuid} (snapshot {landmark}) no longer exists on the host"
            ));
            return Ok(());
        }
        Err(e) => return Err(on_host("VDI.get_by_uuid of the landmark")(e)),
    };
    d.landmark_ref = Some(from.clone());
    let size = d.record.virtual_size;
    let expected = size.div_ceil(CBT_BLOCK_BYTES).div_ceil(8);
    d.changes = match session.list_changed_blocks(&from, &snap) {
        Ok(bits) if bits.len() as u64 == expected => {
            match Extents::from_bitmap(&bits, CBT_BLOCK_BYTES, size) {
                Ok(extents) => Some(Changes::Since(extents)),
                Err(e) => lost(format!(
                    "VDI.list_changed_blocks for VDI {uuid} returned an unusable bitmap: {e}"
                )),
            }
        }
        Ok(bits) => lost(format!(
            "VDI.list_changed_blocks for VDI {uuid} returned {} bitmap bytes where its size needs {expected}",
            bits.len()
        )),
        Err(e) if e.code().is_some_and(lost_code) => lost(format!(
            "changed block tracking of VDI {uuid} since snapshot {landmark} is lost: {}",
            describe(&e)
        )),
        Err(e) => return Err(on_host(format!("VDI.list_changed_blocks for {uuid}"))(e)),
    };
    if let Some(Changes::FullNeeded(_)) = &d.changes {
        // Not a chain member of the new snapshot: released after the
        // commit with the checks of `landmarks::release_one`.
        d.landmark_ref = None;
    }
    Ok(())
}

fn read_and_commit<C: Committer>(
    session: &Session,
    url: &XenUrl,
    options: &WorkflowOptions,
    // The VM backup's id and the VM's name, for a VM backup.
    vm_backup: Option<(&str, Option<&str>)>,
    d: &mut Disk,
    committer: &mut C,
) -> Result<(), WorkflowError<C::Error>> {
    let Some(snap) = d.snapshot_ref.clone() else {
        return Err(unusable("read the snapshot", "no snapshot"));
    };
    let uuid = d.record.uuid.clone();
    let entries: Vec<NbdInfo> = match session.vdi_nbd_info(&snap) {
        Ok(e) => e,
        Err(e) if e.is_code("MESSAGE_METHOD_UNKNOWN") => Vec::new(),
        Err(e) => return Err(on_host(format!("VDI.get_nbd_info for {uuid}"))(e)),
    };
    let mut landmark = BTreeMap::new();
    landmark.insert(keys::HOST.to_string(), url.authority());
    if let Some(pool) = &d.pool {
        landmark.insert(keys::POOL.to_string(), pool.clone());
    }
    landmark.insert(keys::VDI.to_string(), uuid.clone());
    landmark.insert(keys::KIND.to_string(), "disk".to_string());
    landmark.insert(keys::VDI_NAME.to_string(), d.record.name_label.clone());
    if d.snapshot_cbt {
        landmark.insert(keys::SNAPSHOT_VDI.to_string(), d.snapshot_uuid.clone());
    }
    if let Some((id, vm_name)) = vm_backup {
        landmark.insert(keys::VM.to_string(), url.uuid.clone());
        landmark.insert(keys::VM_BACKUP.to_string(), id.to_string());
        if let Some(name) = vm_name {
            landmark.insert(keys::VM_NAME.to_string(), name.to_string());
        }
    }
    let mut changes = d.changes.clone().unwrap_or(Changes::Unknown);
    let size = d.record.virtual_size;
    // How often the NBD connections were opened again mid-read.
    let mut renewed = None;
    let source: Box<dyn BlockSource + '_> = if entries.is_empty() {
        committer.warn(format!(
            "VDI.get_nbd_info returned no NBD server for VDI {uuid} (no network with purpose nbd): reading it with /export_raw_vdi, in full"
        ));
        if let Changes::Since(_) = changes {
            // The export streams the whole disk: tell the truth about it.
            changes = Changes::FullNeeded(
                "no NBD network on the host: the disk was exported in full with /export_raw_vdi"
                    .into(),
            );
        }
        landmark.insert(keys::READ_VIA.to_string(), "export_raw_vdi".into());
        Box::new(
            SpooledExport::fetch(
                session,
                &d.snapshot_uuid,
                d.identity.clone(),
                size,
                &options.spool_dir,
            )
            .map_err(on_host(format!("GET /export_raw_vdi of {uuid}")))?,
        )
    } else {
        landmark.insert(keys::READ_VIA.to_string(), "nbd".into());
        let set = NbdSet::connect(
            &entries,
            d.identity.clone(),
            size,
            options.nbd_connections,
            options.nbd_limits,
        )
        .map_err(|source| WorkflowError::Nbd {
            vdi: uuid.clone(),
            source,
        })?
        // A connection that drops after the session died (logged out,
        // expired, xapi restarted) cannot reconnect with its export name:
        // fetch get_nbd_info again (the session call logs in again) and
        // reconnect (xenapi-reference.md §2.6, §4).
        .renewing_with(Box::new({
            let snap = snap.clone();
            move || session.vdi_nbd_info(&snap).map_err(|e| describe(&e))
        }));
        renewed = Some(set.renewal_counter());
        if let Some(why) = set.fewer_connections(options.nbd_connections) {
            committer.warn(format!("VDI {uuid}: {why}"));
        }
        Box::new(set)
    };
    d.changes = Some(changes.clone());
    let result = committer.commit_disk(FrozenDisk {
        vdi_uuid: uuid.clone(),
        name_label: d.record.name_label.clone(),
        identity: d.identity.clone(),
        size_bytes: size,
        changes,
        source: source.as_ref(),
        landmark,
    });
    // Disconnect NBD (or drop the spool file) before anything else.
    drop(source);
    let renewals = renewed.map_or(0, |r| r.load(std::sync::atomic::Ordering::Relaxed));
    if renewals > 0 && result.is_ok() {
        committer.warn(format!(
            "VDI {uuid}: NBD connections were lost mid-read and opened again with a fresh VDI.get_nbd_info {renewals} time(s) (the session expired or xapi restarted); every block was read and verified"
        ));
    }
    result.map_err(commit(format!("back up VDI {uuid}")))?;
    d.committed = true;
    Ok(())
}
