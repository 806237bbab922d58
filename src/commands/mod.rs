//! One workflow per subcommand. `anyhow` lives here and above; library
//! errors are given context on the way out.

mod backup;
mod check;
mod demo;
mod inspect;
mod repair;
mod restore;
mod restore_xen;
mod serve;
mod sim;
mod sinks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::{Cli, Command, FilterArgs, RepairCommand};
use crate::output::Ui;
use crate::repo::{Repository, SnapshotEntry};

/// Exit status of a command that ran to the end.
pub enum Outcome {
    Ok,
    /// `check` found an integrity problem.
    IntegrityProblem,
}

impl From<Outcome> for ExitCode {
    fn from(o: Outcome) -> ExitCode {
        match o {
            Outcome::Ok => ExitCode::SUCCESS,
            Outcome::IntegrityProblem => ExitCode::from(3),
        }
    }
}

pub fn run(cli: Cli) -> Result<Outcome> {
    let ui = Ui::new(cli.json, cli.quiet);
    let repo_path = || -> Result<PathBuf> {
        cli.repo
            .clone()
            .context("no repository given: use -r/--repo or set CBTVAULT_REPOSITORY")
    };
    let options = crate::repo::OpenOptions {
        no_lock: cli.no_lock,
    };
    let open = |ui: &Ui, path: &Path| open_with(ui, path, &options);
    match cli.command {
        Command::Init(ref a) => inspect::init(&ui, &repo_path()?, a),
        Command::Backup(ref a) => backup::run(&ui, &open(&ui, &repo_path()?)?, a),
        Command::Snapshots(ref f) => inspect::snapshots(&ui, &open(&ui, &repo_path()?)?, f),
        Command::Restore(ref a) => restore::run(&ui, &open(&ui, &repo_path()?)?, a),
        Command::Check(ref a) => check::run(&ui, &open(&ui, &repo_path()?)?, a),
        Command::Cat(ref a) => inspect::cat(&ui, &open(&ui, &repo_path()?)?, a),
        Command::Diff(ref a) => inspect::diff(&ui, &open(&ui, &repo_path()?)?, a),
        Command::Stats => inspect::stats(&ui, &open(&ui, &repo_path()?)?),
        Command::Unlock(ref a) => inspect::unlock(&ui, &open(&ui, &repo_path()?)?, a),
        Command::Repair(RepairCommand::Index) => check::repair_index(&ui, &repo_path()?),
        Command::Repair(ref r) => repair::run(&ui, &open(&ui, &repo_path()?)?, r),
        Command::Serve(ref a) => serve::run(&ui, open(&ui, &repo_path()?)?, a),
        Command::Demo(ref a) => demo::run(&ui, a),
        Command::Sim(ref a) => sim::run(&ui, a),
    }
}

/// BLAKE3 of a whole file, streamed.
pub(crate) fn hash_file(path: &Path) -> Result<blake3::Hash> {
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
    path: &Path,
    options: &crate::repo::OpenOptions,
) -> Result<Repository> {
    let repo = Repository::open_with(path, options)
        .with_context(|| format!("open repository '{}'", path.display()))?;
    if repo.is_read_only() {
        ui.warn(format!(
            "repository '{}' is on read-only storage: no lock is taken (a concurrent prune could remove what this command reads), catalog kept in '{}'",
            path.display(),
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
    if repo.catalog_rebuilt {
        ui.warn("the catalog was missing or out of date and has been rebuilt from the packs");
    }
    for (name, reason) in &repo.unreadable_snapshots {
        ui.warn(format!("snapshot object {name} is unreadable: {reason}"));
    }
    Ok(repo)
}

/// Snapshots matching a filter, oldest first. A `--source` that names an
/// existing path matches that path's identity.
pub(crate) fn filtered(repo: &Repository, filter: &FilterArgs) -> Result<Vec<SnapshotEntry>> {
    let source = filter.source.as_ref().map(|s| {
        if s.contains(':') {
            s.clone()
        } else {
            // The image may be gone (that is when one restores): fall back
            // to the absolute path it had.
            match std::fs::canonicalize(s).or_else(|_| std::path::absolute(s)) {
                Ok(p) => format!("file:{}", p.display()),
                Err(_) => s.clone(),
            }
        }
    });
    Ok(repo
        .snapshots()?
        .into_iter()
        .filter(|s| source.as_ref().is_none_or(|src| &s.meta.source == src))
        .filter(|s| filter.tags.iter().all(|t| s.meta.tags.contains(t)))
        .collect())
}

/// Resolves `latest` (within the filter) or an id prefix.
pub(crate) fn pick_snapshot(
    repo: &Repository,
    query: &str,
    filter: &FilterArgs,
) -> Result<SnapshotEntry> {
    if query == "latest" {
        match filtered(repo, filter)?.pop() {
            Some(s) => Ok(s),
            None => bail!("no snapshot matches 'latest' with the given filters"),
        }
    } else {
        Ok(repo.find_snapshot(query)?)
    }
}
