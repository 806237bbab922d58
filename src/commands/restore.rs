//! `restore SNAPSHOT --target PATH|-|xen://...`, `--at TIME` for a point
//! in time. XenServer targets live in `restore_xen`; every target goes
//! through the one engine, `repo::restore::run`.

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};

use super::restore_xen;
use super::{filtered, pick_snapshot, Outcome};
use crate::cli::RestoreArgs;
use crate::output::{human_bytes, Ui};
use crate::repo::restore::{self, RestoreSummary};
use crate::repo::{Repository, SnapshotEntry};
use crate::source::xenapi::workflow::keys;
use crate::source::xenapi::XenUrl;
use crate::target::{FileTarget, StreamSink};

fn parse_time(text: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("--at '{text}': expected RFC 3339, e.g. 2026-11-21T12:00:00Z"))
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
fn select(repo: &Repository, args: &RestoreArgs) -> Result<SnapshotEntry> {
    let Some(at) = &args.at else {
        return pick_snapshot(repo, &args.snapshot, &args.filter);
    };
    let at = parse_time(at)?;
    if args.snapshot == "latest" {
        return newest_at(filtered(repo, &args.filter)?, at, "the given filters");
    }
    let anchor = repo.find_snapshot(&args.snapshot)?;
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
fn select_vm_backup(repo: &Repository, args: &RestoreArgs) -> Result<String> {
    let all = repo.snapshots()?;
    let group_of = |s: &SnapshotEntry| s.meta.landmark.get(keys::VM_BACKUP).cloned();
    let anchor = match all
        .iter()
        .find(|s| group_of(s).as_deref() == Some(args.snapshot.as_str()))
    {
        Some(s) => s.clone(),
        None => {
            let s = select(repo, args)?;
            if group_of(&s).is_none() {
                bail!(
                    "snapshot {} is not part of a VM backup (back up xen://HOST/vm/UUID)",
                    s.meta.id.short()
                );
            }
            return Ok(group_of(&s).expect("checked"));
        }
    };
    let Some(at) = &args.at else {
        return Ok(group_of(&anchor).expect("found by group"));
    };
    let at = parse_time(at)?;
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

pub fn run(ui: &Ui, repo: &Repository, args: &RestoreArgs) -> Result<Outcome> {
    let target_text = args.target.to_string_lossy();
    if XenUrl::is_xen(&target_text) {
        let _lock = repo.lock(false, "restore")?;
        if args.new_vm {
            let group = select_vm_backup(repo, args)?;
            restore_xen::run_new_vm(ui, repo, args, &group)?;
        } else {
            let entry = select(repo, args)?;
            restore_xen::run_disk(ui, repo, args, &entry)?;
        }
        return Ok(Outcome::Ok);
    }
    if args.force || args.verify || args.new_vm {
        bail!("--force, --verify and --new-vm apply to xen:// targets only");
    }
    let entry = select(repo, args)?;
    let _lock = repo.lock(false, "restore")?;
    let id = entry.meta.id;
    let map = repo.resolve(id)?;
    let summary = if args.target.as_os_str() == "-" {
        let mut sink = StreamSink::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        ));
        let bar = ui.progress("restore", true);
        restore::run(repo, id, &map, &mut sink, &bar)?
    } else {
        restore_to_path(ui, repo, id, &map, &args.target, args.overwrite)?
    };
    if args.target.as_os_str() != "-" {
        report(ui, &summary, &args.target.display().to_string());
    }
    Ok(Outcome::Ok)
}

pub(crate) fn restore_to_path(
    ui: &Ui,
    repo: &Repository,
    id: crate::format::SnapshotId,
    map: &crate::manifest::BlockMap,
    target: &std::path::Path,
    overwrite: bool,
) -> Result<RestoreSummary> {
    let (mut sink, created) = FileTarget::create(target, map.disk_size_bytes, overwrite)?;
    let bar = ui.progress("restore", true);
    let result = restore::run(repo, id, map, &mut sink, &bar);
    bar.finish();
    match result {
        Ok(s) => Ok(s),
        Err(e) => {
            // Never leave a half-restored new file that looks complete.
            if created {
                let _ = std::fs::remove_file(target);
            }
            Err(e).with_context(|| {
                format!(
                    "restore of snapshot {id} to '{}' failed{}",
                    target.display(),
                    if created {
                        "; the partial file was removed"
                    } else {
                        "; the target is incomplete"
                    }
                )
            })
        }
    }
}

fn report(ui: &Ui, s: &RestoreSummary, target: &str) {
    ui.json(s);
    ui.info(format!(
        "restored snapshot {} to '{target}': {} ({} data blocks, {} zero) in {:.2}s, {}/s",
        s.snapshot_id.short(),
        human_bytes(s.disk_size_bytes),
        s.blocks_data,
        s.blocks_zero,
        s.seconds,
        human_bytes((s.disk_size_bytes as f64 / s.seconds.max(1e-9)) as u64)
    ));
}
