//! The dispatch: one parsed command line -> its options -> its command.

use anyhow::{Context, Result};

use super::{options, Cli, Command, RepairCommand};
use crate::commands::repair::RepairAction;
use crate::commands::{
    backup, check, copy, forget, inspect, open_with, prune, repair, restore, serve, snapshots, tag,
    Outcome,
};
#[cfg(feature = "sim")]
use crate::commands::{demo, sim};
use crate::output::Ui;
use crate::repo::{Location, OpenOptions, S3Settings, S3Style};

/// Runs the command `cli` names. Options are validated before the
/// repository is opened or anything else is done.
pub fn run(cli: Cli, ui: &Ui) -> Result<Outcome> {
    if stops_on_signal(&cli.command) {
        crate::interrupt::install().context("install the SIGINT/SIGTERM handlers")?;
    }
    let settings = S3Settings {
        endpoint: cli.s3_endpoint.clone(),
        region: cli.s3_region.clone(),
        style: cli.s3_url_style.as_deref().map(|s| match s {
            "virtual-host" => S3Style::VirtualHost,
            _ => S3Style::Path,
        }),
        ca_file: cli.s3_ca_file.clone(),
    };
    let repo_path = || -> Result<Location> {
        let text = cli
            .repo
            .as_deref()
            .context("no repository given: use -r/--repo or set CBTVAULT_REPOSITORY")?;
        Ok(Location::parse(text, &settings)?)
    };
    let open_options = OpenOptions {
        no_lock: cli.no_lock,
    };
    let open = |ui: &Ui, location: &Location| open_with(ui, location, &open_options);
    match &cli.command {
        Command::Init(a) => {
            let o = options::init(a)?;
            inspect::init(ui, &repo_path()?, &o)
        }
        Command::Backup(a) => {
            let o = options::backup(a)?;
            backup::run(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Snapshots(a) => {
            let o = options::snapshots(a)?;
            snapshots::run(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Restore(a) => {
            let o = options::restore(a)?;
            restore::run(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Check(a) => {
            let o = options::check(a)?;
            check::run(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Cat(a) => {
            let o = options::cat(a)?;
            inspect::cat(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Diff(a) => inspect::diff(ui, &open(ui, &repo_path()?)?, &options::diff(a)),
        Command::Stats => inspect::stats(ui, &open(ui, &repo_path()?)?),
        Command::Copy(a) => copy::run(
            ui,
            &open(ui, &Location::parse(&a.from, &settings)?)?,
            &open(ui, &Location::parse(&a.to, &settings)?)?,
            &a.snapshots,
            a.all,
        ),
        Command::Unlock(a) => inspect::unlock(ui, &open(ui, &repo_path()?)?, &options::unlock(a)),
        Command::Tag(a) => {
            let o = options::tag(a)?;
            tag::run(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Forget(a) => {
            let o = options::forget(a)?;
            forget::run(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Prune(a) => {
            let o = options::prune(a)?;
            prune::run(ui, &open(ui, &repo_path()?)?, &o)
        }
        Command::Repair(RepairCommand::Index) => check::repair_index(ui, &repo_path()?),
        Command::Repair(RepairCommand::Packs(a)) => repair::run(
            ui,
            &open(ui, &repo_path()?)?,
            RepairAction::Packs {
                unreferenced: a.unreferenced,
            },
        ),
        Command::Repair(RepairCommand::Snapshots) => {
            repair::run(ui, &open(ui, &repo_path()?)?, RepairAction::Snapshots)
        }
        Command::Repair(RepairCommand::Tmp) => {
            repair::run(ui, &open(ui, &repo_path()?)?, RepairAction::Tmp)
        }
        Command::Serve(a) => serve::run(ui, open(ui, &repo_path()?)?, &options::serve(a)),
        #[cfg(feature = "sim")]
        Command::Demo(a) => demo::run(ui, &options::demo(a)),
        #[cfg(feature = "sim")]
        Command::Sim(a) => sim::run(ui, &options::sim(a)),
        Command::Generate(a) => super::generate::run(ui, a),
    }
}

/// Whether a signal is a request to stop the command cleanly (exit 130 or
/// 143, `crate::interrupt`). The servers (`serve`, `sim`) handle their
/// own: a signal is how they are stopped, and they exit 0.
fn stops_on_signal(command: &Command) -> bool {
    match command {
        Command::Serve(_) => false,
        #[cfg(feature = "sim")]
        Command::Sim(_) => false,
        _ => true,
    }
}
