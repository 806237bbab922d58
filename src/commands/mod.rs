//! One workflow per subcommand, each taking validated `*Options` (built
//! from the command line by `cli`; no clap type below `cli`). `anyhow`
//! lives here and above; library errors are given context on the way out.

pub mod backup;
pub mod backup_vmware;
pub mod check;
pub mod copy;
#[cfg(feature = "sim")]
pub mod demo;
pub mod files;
pub mod forget;
pub mod forget_host;
pub mod forget_policy;
pub mod inspect;
pub mod key;
pub mod prune;
pub mod repair;
pub(crate) mod restore;
mod restore_vmware;
mod restore_xen;
pub mod run_job;
pub mod select;
pub mod serve;
#[cfg(feature = "sim")]
pub mod sim;
pub mod snapshots;
pub mod tag;

use anyhow::{bail, Context, Result};

use crate::output::Ui;
use crate::repo::{Repository, SnapshotEntry};

/// Exit status of a command that ran to the end (mapped to a code in
/// `cli::exit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Ran to the end, but some data could not be read or some snapshot
    /// is damaged (`check`, `restore --allow-damaged`, `prune`).
    IntegrityProblem,
    /// Ran to the end, but something asked for was left undone and needs
    /// attention (the warnings say what): e.g. landmarks left on an
    /// unreachable host, a host-side snapshot not destroyed.
    Warnings,
    /// Ran to the end, but some of its items failed while the others
    /// completed (`run`: some VMs' backups failed).
    SomeFailed,
    /// Ran to the end, and every item failed (`run`: no VM was backed up).
    Failed,
}

impl Outcome {
    /// The worse of two outcomes (failures outrank an integrity problem,
    /// which outranks warnings; one item failed beside others done is
    /// `SomeFailed`).
    pub fn and(self, other: Outcome) -> Outcome {
        use Outcome::*;
        match (self, other) {
            (Failed, Failed) => Failed,
            (Failed, _) | (_, Failed) | (SomeFailed, _) | (_, SomeFailed) => SomeFailed,
            (IntegrityProblem, _) | (_, IntegrityProblem) => IntegrityProblem,
            (Warnings, _) | (_, Warnings) => Warnings,
            (Ok, Ok) => Ok,
        }
    }
}

/// Which snapshots a command looks at.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    /// Only snapshots of this source identity (e.g. `file:/path`), or of
    /// this path's identity.
    pub source: Option<String>,
    /// Only snapshots carrying every one of these tags.
    pub tags: Vec<String>,
    /// Only snapshots of this VM (uuid or name), from VM backups.
    pub vm: Option<String>,
}

impl SnapshotFilter {
    /// Whether anything narrows the selection.
    pub fn is_empty(&self) -> bool {
        self.source.is_none() && self.tags.is_empty() && self.vm.is_none()
    }
}

/// BLAKE3 of a whole file, streamed.
#[cfg(feature = "sim")]
pub(crate) fn hash_file(path: &std::path::Path) -> Result<blake3::Hash> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("open '{}'", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// Opens the repository, saying so when the catalog had to be rebuilt or
/// no lock will be taken.
pub(crate) fn open_with(
    ui: &Ui,
    location: &crate::repo::Location,
    options: &crate::repo::OpenOptions,
) -> Result<Repository> {
    let repo = Repository::open_at(location, options)
        .with_context(|| format!("open repository '{location}'"))?;
    if repo.is_read_only() {
        ui.warn(format!(
            "repository '{location}' is on read-only storage: no lock is taken (a concurrent prune could remove what this command reads), catalog kept in '{}'",
            repo.catalog_path().display()
        ));
    } else if options.no_lock {
        ui.warn(
            "--no-lock: no lock is taken (a concurrent prune could remove what this command reads)",
        );
    }
    if let Some(why) = &repo.catalog_incomplete {
        ui.warn(format!(
            "the catalog is missing and could not be rebuilt now: {why}"
        ));
    }
    if let Some((why, aside)) = &repo.catalog_replaced {
        ui.warn(format!(
            "THE CATALOG WAS DAMAGED and has been rebuilt from the packs: {why}; {}; damage recorded by earlier reads is forgotten until a read or 'cbtvault check --read-data' finds it again",
            match aside {
                Some(p) => format!("the damaged file is kept as '{}' for diagnosis", p.display()),
                None => "it was a private cache copy".to_string(),
            }
        ));
    } else if repo.catalog_rebuilt {
        ui.warn("the catalog was missing or out of date and has been rebuilt from the packs");
    }
    for (name, reason) in &repo.unreadable_snapshots {
        ui.warn(format!("snapshot object {name} is unreadable: {reason}"));
    }
    Ok(repo)
}

/// Snapshots matching a filter, oldest first. A `--source` matches
/// however it was typed ([`select::SourceMatch`]).
pub(crate) fn filtered(repo: &Repository, filter: &SnapshotFilter) -> Result<Vec<SnapshotEntry>> {
    let source = filter
        .source
        .as_deref()
        .map(select::SourceMatch::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--source: {e}"))?;
    Ok(repo
        .snapshots()?
        .into_iter()
        .filter(|s| source.as_ref().is_none_or(|m| m.matches(&s.meta)))
        .filter(|s| filter.tags.iter().all(|t| s.meta.tags.contains(t)))
        .filter(|s| {
            filter
                .vm
                .as_deref()
                .is_none_or(|v| select::of_vm(&s.meta, v))
        })
        .collect())
}

/// Resolves `latest` (within the filter) or an id prefix.
pub(crate) fn pick_snapshot(
    repo: &Repository,
    query: &str,
    filter: &SnapshotFilter,
) -> Result<SnapshotEntry> {
    if query == "latest" {
        let list = filtered(repo, filter)?;
        one_source(&list, filter, |m| m.source.clone())?;
        match list.into_iter().next_back() {
            Some(s) => Ok(s),
            None => bail!("no snapshot matches 'latest' with the given filters"),
        }
    } else {
        Ok(repo.find_snapshot(query)?)
    }
}

/// Refuses to pick 'latest' among snapshots of several sources (as `key`
/// tells them apart): the newest of which disk? The error names them.
pub(crate) fn one_source(
    list: &[SnapshotEntry],
    filter: &SnapshotFilter,
    key: impl Fn(&crate::format::snapshot::SnapshotMeta) -> String,
) -> Result<()> {
    let sources: std::collections::BTreeSet<String> = list.iter().map(|s| key(&s.meta)).collect();
    if sources.len() > 1 {
        let names: Vec<String> = sources.into_iter().collect();
        bail!(
            "'latest' is ambiguous: {} sources have snapshots{}; pick one with --source (one of: {})",
            names.len(),
            if filter.is_empty() {
                ""
            } else {
                " matching the filters"
            },
            names.join(", ")
        );
    }
    Ok(())
}
