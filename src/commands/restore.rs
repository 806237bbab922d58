//! `restore SNAPSHOT --target PATH|-|xen://...`, `--at TIME` for a point
//! in time. XenServer targets live in `restore_xen`; every target goes
//! through the one engine, `repo::restore::run`.

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, Utc};

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::forget_policy::unit_source;
pub use super::restore_vmware::VmwareRestoreOptions;
use super::restore_xen;
pub use super::restore_xen::XenRestoreOptions;
use super::{filtered, one_source, pick_snapshot, Outcome, SnapshotFilter};
use crate::format::SnapshotId;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::restore::{self, BlockSink, RestoreSummary};
use crate::repo::ChainReader;
use crate::repo::{Repository, SnapshotEntry};
use crate::source::xenapi::workflow::keys;
use crate::target::{self, FileOptions, FileTarget, StreamSink};

/// Validated options of `restore`.
pub struct RestoreOptions {
    /// A snapshot id (or unique prefix) or `latest`; with a new VM, a VM
    /// backup id or any snapshot of that VM backup.
    pub snapshot: String,
    /// Which snapshots `latest` chooses from.
    pub filter: SnapshotFilter,
    /// The newest snapshot of the same source taken at or before this
    /// time, instead of `snapshot` itself.
    pub at: Option<DateTime<Utc>>,
    pub target: RestoreTarget,
}

/// Where a restore writes, with the options that apply to that target.
pub enum RestoreTarget {
    /// A file path, a block device, or stdout (`-`).
    Local {
        path: PathBuf,
        options: LocalOptions,
    },
    /// A XenServer disk to overwrite or an SR to create disks (or a VM) in.
    Xen(XenRestoreOptions),
    /// A new flat VMDK on a vSphere datastore.
    Vmware(VmwareRestoreOptions),
    /// Files of the snapshot's file systems into a directory (`--include`,
    /// run by `commands::files::restore`).
    Files(super::files::FileRestoreTarget),
}

/// The newest of `candidates` taken at or before `at`.
fn newest_at(
    candidates: Vec<SnapshotEntry>,
    at: DateTime<Utc>,
    what: &str,
) -> Result<SnapshotEntry> {
    candidates
        .into_iter()
        .filter(|s| s.meta.time <= at)
        .max_by_key(|s| s.meta.time)
        .ok_or_else(|| {
            anyhow!(
                "no snapshot of {what} was taken at or before {}",
                at.to_rfc3339()
            )
        })
}

/// SNAPSHOT, or with `--at` the newest snapshot of SNAPSHOT's source (of
/// the filtered ones for `latest`) at or before that time.
pub(crate) fn select(repo: &Repository, options: &RestoreOptions) -> Result<SnapshotEntry> {
    let Some(at) = options.at else {
        return pick_snapshot(repo, &options.snapshot, &options.filter);
    };
    if options.snapshot == "latest" {
        let list = filtered(repo, &options.filter)?;
        one_source(&list, &options.filter, |m| m.source.clone())?;
        return newest_at(list, at, "the given filters");
    }
    let anchor = repo.find_snapshot(&options.snapshot)?;
    let source = anchor.meta.source.clone();
    let same: Vec<SnapshotEntry> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.meta.source == source)
        .collect();
    newest_at(same, at, &format!("'{source}'"))
}

/// The VM backup id named by SNAPSHOT (a VM backup id or any of its
/// snapshots); with `--at`, the VM backup of that VM at or before TIME.
fn select_vm_backup(repo: &Repository, options: &RestoreOptions) -> Result<String> {
    let all = repo.snapshots()?;
    let group_of = |s: &SnapshotEntry| s.meta.landmark.get(keys::VM_BACKUP).cloned();
    let anchor = match all
        .iter()
        .find(|s| group_of(s).as_deref() == Some(options.snapshot.as_str()))
    {
        Some(s) => s.clone(),
        // The newest VM backup of the one VM the filters select.
        None if options.snapshot == "latest" => {
            let list: Vec<SnapshotEntry> = filtered(repo, &options.filter)?
                .into_iter()
                .filter(|s| group_of(s).is_some())
                .collect();
            one_source(&list, &options.filter, unit_source)?;
            match list.into_iter().next_back() {
                Some(s) => s,
                None => bail!("no VM backup matches 'latest' with the given filters"),
            }
        }
        None => {
            let s = select(repo, options)?;
            if group_of(&s).is_none() {
                bail!(
                    "snapshot {} is not part of a VM backup (back up xen://HOST/vm/UUID)",
                    s.meta.id.short()
                );
            }
            return Ok(group_of(&s).expect("checked"));
        }
    };
    let Some(at) = options.at else {
        return Ok(group_of(&anchor).expect("found by group"));
    };
    let vm = anchor.meta.landmark.get(keys::VM).cloned();
    let same: Vec<SnapshotEntry> = all
        .into_iter()
        .filter(|s| {
            s.meta.landmark.get(keys::KIND).map(String::as_str) == Some("vm-metadata")
                && s.meta.landmark.get(keys::VM) == vm.as_ref()
        })
        .collect();
    let chosen = newest_at(same, at, "that VM")?;
    Ok(group_of(&chosen).expect("a VM metadata snapshot has a VM backup id"))
}

pub fn run(ui: &Ui, repo: &Repository, options: &RestoreOptions) -> Result<Outcome> {
    let (path, local) = match &options.target {
        RestoreTarget::Xen(xen) => {
            let _lock = repo.lock(false, "restore")?;
            if xen.new_vm {
                let group = select_vm_backup(repo, options)?;
                restore_xen::run_new_vm(ui, repo, xen, &group)?;
            } else {
                let entry = select(repo, options)?;
                restore_xen::run_disk(ui, repo, xen, &entry)?;
            }
            return Ok(Outcome::Ok);
        }
        RestoreTarget::Vmware(vmware) => {
            let _lock = repo.lock(false, "restore")?;
            let entry = select(repo, options)?;
            super::restore_vmware::run_disk(ui, repo, vmware, &entry)?;
            return Ok(Outcome::Ok);
        }
        RestoreTarget::Local { path, options } => (path, options),
        RestoreTarget::Files(_) => bail!("file-level restore is run by commands::files::restore"),
    };
    let entry = select(repo, options)?;
    let _lock = repo.lock(false, "restore")?;
    let id = entry.meta.id;
    ui.detail(
        1,
        format!(
            "restoring snapshot {} of '{}' taken {}",
            id.short(),
            entry.meta.source,
            entry
                .meta
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    );
    let reader = repo.chain_reader(id)?;
    ui.detail(
        1,
        format!(
            "{} ({} disk), resolved from a chain of {}",
            plural(reader.block_count(), "block"),
            human_bytes(reader.disk_size_bytes()),
            plural(reader.depth() as u64, "manifest")
        ),
    );
    let summary = restore_local(ui, repo, reader, path, local)?;
    Ok(if summary.damaged_blocks.is_empty() {
        Outcome::Ok
    } else {
        Outcome::IntegrityProblem
    })
}

/// Options of a restore to a file, a block device or stdout.
pub struct LocalOptions {
    pub restore: restore::RestoreOptions,
    pub overwrite: bool,
    /// Permission bits of a new image file.
    pub mode: u32,
    /// Accept a disk above `target::MAX_DISK_SIZE_BYTES`.
    pub force_size: bool,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            restore: restore::RestoreOptions::default(),
            overwrite: false,
            mode: 0o600,
            force_size: false,
        }
    }
}

/// The `--json` summary of a restore that completed.
#[derive(Serialize)]
struct RestoreDone<'a> {
    target: &'a str,
    complete: bool,
    #[serde(flatten)]
    summary: &'a RestoreSummary,
}

/// The `--json` summary of a restore that stopped (the `error` message
/// follows on stderr).
#[derive(Serialize)]
struct RestoreStopped<'a> {
    snapshot_id: SnapshotId,
    target: &'a str,
    complete: bool,
    disk_size_bytes: u64,
    /// Bytes `0..written_bytes` of the disk were written to the target,
    /// nothing after them (a file target: nothing at all, the partial file
    /// removed).
    written_bytes: u64,
    /// The failing write may have changed bytes from `written_bytes` on.
    failed_write_may_have_changed_more: bool,
}

/// Restores `map` to a path (a new file, renamed into place only when
/// complete; a block device, written in place) or to stdout (`-`).
pub(crate) fn restore_local(
    ui: &Ui,
    repo: &Repository,
    reader: ChainReader<'_>,
    target: &Path,
    options: &LocalOptions,
) -> Result<RestoreSummary> {
    let id = reader.id();
    let disk = reader.disk_size_bytes();
    let stdout = target.as_os_str() == "-";
    // A disk image is binary: written to a terminal it is garbage on the
    // screen (and may send it control sequences), never what was meant.
    if stdout && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        bail!("--target -: stdout is a terminal; pipe it (cbtvault restore ... --target - | ...) or give a file (--target FILE)");
    }
    // With stdout the target, JSON messages go to stderr.
    let ui = &if stdout {
        ui.with_json_on_stderr()
    } else {
        *ui
    };
    let shown = if stdout {
        "stdout".to_string()
    } else {
        target.display().to_string()
    };
    // Sizes are checked before anything is written.
    let mut file = None;
    let mut stream = None;
    let mut device = false;
    let sink: &mut dyn BlockSink = if stdout {
        target::check_disk_size(Path::new("stdout"), disk, options.force_size)?;
        stream.insert(StreamSink::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )))
    } else {
        let opened = FileTarget::open(
            target,
            disk,
            FileOptions {
                overwrite: options.overwrite,
                mode: options.mode,
                force_size: options.force_size,
            },
        )?;
        device = opened.is_device();
        file.insert(opened)
    };
    ui.detail(
        2,
        format!(
            "target '{shown}': {}",
            if stdout {
                "a stream"
            } else if device {
                "a block device, written in place"
            } else {
                "a new file, renamed into place when complete"
            }
        ),
    );
    let bar = ui.progress("restore", true);
    let result = restore::run(repo, reader, sink, options.restore, &bar);
    bar.finish();
    for line in repo.take_notices() {
        ui.warn(line);
    }
    match result {
        Ok(summary) => {
            if let Some(file) = file {
                file.commit()?;
            }
            ui.summary(&RestoreDone {
                target: &shown,
                complete: true,
                summary: &summary,
            });
            report(ui, &summary, &shown);
            Ok(summary)
        }
        Err(e) => {
            drop(stream);
            // A regular file: the temporary file goes with the target.
            drop(file);
            let written = e.written_bytes;
            let what = if stdout || device {
                format!(
                    "restore of snapshot {id} to '{shown}' stopped after writing bytes 0..{written} of {disk} (nothing from byte {written} on{}); the target is not a usable copy",
                    if e.target_failed {
                        " except what the failed write may have left"
                    } else {
                        " was written"
                    }
                )
            } else {
                format!(
                    "restore of snapshot {id} to '{shown}' failed; nothing was written to '{shown}' (the partial file was removed)"
                )
            };
            ui.summary(&RestoreStopped {
                snapshot_id: id,
                target: &shown,
                complete: false,
                disk_size_bytes: disk,
                written_bytes: if stdout || device { written } else { 0 },
                failed_write_may_have_changed_more: e.target_failed,
            });
            Err(anyhow::Error::new(e).context(what))
        }
    }
}

/// A restore to a path with default options (demo).
#[cfg(feature = "sim")]
pub(crate) fn restore_to_path(
    ui: &Ui,
    repo: &Repository,
    id: SnapshotId,
    target: &Path,
    overwrite: bool,
) -> Result<RestoreSummary> {
    let options = LocalOptions {
        overwrite,
        ..LocalOptions::default()
    };
    restore_local(ui, repo, repo.chain_reader(id)?, target, &options)
}

fn report(ui: &Ui, s: &RestoreSummary, target: &str) {
    if target != "stdout" {
        ui.info(format!(
            "restored snapshot {} to '{target}': {} ({}, {} zero) in {:.2}s, {}/s",
            s.snapshot_id.short(),
            human_bytes(s.disk_size_bytes),
            plural(s.blocks_data, "data block"),
            s.blocks_zero,
            s.seconds,
            human_bytes((s.disk_size_bytes as f64 / s.seconds.max(1e-9)) as u64)
        ));
    }
    if !s.damaged_blocks.is_empty() {
        ui.warn(format!(
            "restore of snapshot {} to '{target}' completed with damage: {} written as zeros (--allow-damaged); run 'cbtvault check --read-data'",
            s.snapshot_id.short(),
            plural(s.damaged_blocks.len(), "block")
        ));
        for d in &s.damaged_blocks {
            ui.warn(format!(
                "zero-filled block {} ({}) {}",
                d.index,
                d.block,
                d.pack
                    .map_or("in no pack".to_string(), |p| format!("in pack {p}"))
            ));
        }
    }
}
