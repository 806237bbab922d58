//! `restore SNAPSHOT --target PATH|-`.

use anyhow::{Context, Result};

use super::sinks::{FileSink, StreamSink};
use super::{pick_snapshot, Outcome};
use crate::cli::RestoreArgs;
use crate::output::{human_bytes, Ui};
use crate::repo::restore::{self, RestoreSummary};
use crate::repo::Repository;

pub fn run(ui: &Ui, repo: &Repository, args: &RestoreArgs) -> Result<Outcome> {
    let entry = pick_snapshot(repo, &args.snapshot, &args.filter)?;
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
    let (mut sink, created) = FileSink::create(target, map.disk_size_bytes, overwrite)?;
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
