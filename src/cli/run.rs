//! The dispatch: one parsed command line -> its options -> its command.

use anyhow::{Context, Result};

use super::{options, password, Cli, Command, ConfigCommand, KeyCommand, RepairCommand};
use crate::commands::repair::RepairAction;
use crate::commands::{
    backup, check, copy, files, forget, inspect, key, open_with, prune, repair, restore, run_job,
    serve, snapshots, tag, Outcome,
};
#[cfg(feature = "sim")]
use crate::commands::{demo, sim};
use crate::output::Ui;
use crate::repo::{Location, NewKey, OpenOptions, S3Settings, S3Style};

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
    // Each repository's password, asked only if it turns out encrypted.
    let options_for = |location: &Location, file: Option<&std::path::PathBuf>| OpenOptions {
        no_lock: cli.no_lock,
        password: Some(password::existing(
            file.or(cli.password_file.as_ref()).cloned(),
            format!("repository '{location}'"),
        )),
    };
    let open = |ui: &Ui, location: &Location| open_with(ui, location, &options_for(location, None));
    let new_key = |file: Option<&std::path::PathBuf>,
                   env: &'static str,
                   kdf: &super::KdfArgs,
                   location: &Location|
     -> Result<NewKey> {
        Ok(NewKey {
            password: password::new(file.cloned(), env, format!("repository '{location}'")),
            kdf: options::kdf(kdf)?,
        })
    };
    match &cli.command {
        Command::Init(a) => {
            let mut o = options::init(a)?;
            let location = repo_path()?;
            // Encrypted when asked, and by default off this machine.
            let remote = matches!(location, Location::S3 { .. });
            if a.encrypt || (remote && !a.no_encrypt) {
                // The first key's password: the repository password
                // (--password-file, CBTVAULT_PASSWORD_FILE,
                // CBTVAULT_PASSWORD), else typed twice.
                o.encryption = Some(new_key(
                    cli.password_file.as_ref(),
                    "CBTVAULT_PASSWORD",
                    &a.kdf,
                    &location,
                )?);
            }
            inspect::init(ui, &location, &o)
        }
        Command::Key(k) => {
            let location = repo_path()?;
            let repo = open(ui, &location)?;
            match k {
                KeyCommand::List => key::list(ui, &repo),
                KeyCommand::Add(a) => key::add(
                    ui,
                    &repo,
                    &new_key(
                        a.new_password_file.as_ref(),
                        "CBTVAULT_NEW_PASSWORD",
                        &a.kdf,
                        &location,
                    )?,
                ),
                KeyCommand::Remove(a) => key::remove(ui, &repo, &a.key_id),
                KeyCommand::Passwd(a) => {
                    let new = new_key(
                        a.new_password_file.as_ref(),
                        "CBTVAULT_NEW_PASSWORD",
                        &a.kdf,
                        &location,
                    )?;
                    key::passwd(ui, repo, &new)
                }
            }
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
            let repo = open(ui, &repo_path()?)?;
            match &o.target {
                restore::RestoreTarget::Files(target) => files::restore(ui, repo, &o, target),
                _ => restore::run(ui, &repo, &o),
            }
        }
        Command::Ls(a) => {
            let o = options::ls(a)?;
            files::ls(ui, open(ui, &repo_path()?)?, &o)
        }
        Command::Dump(a) => {
            let o = options::dump(a)?;
            files::dump(ui, open(ui, &repo_path()?)?, &o)
        }
        Command::Find(a) => {
            let o = options::find(a)?;
            files::find(ui, open(ui, &repo_path()?)?, &o)
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
        Command::Copy(a) => {
            let from = Location::parse(&a.from, &settings)?;
            let to = Location::parse(&a.to, &settings)?;
            copy::run(
                ui,
                &open_with(
                    ui,
                    &from,
                    &options_for(&from, a.from_password_file.as_ref()),
                )?,
                &open_with(ui, &to, &options_for(&to, a.to_password_file.as_ref()))?,
                &a.snapshots,
                a.all,
            )
        }
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
        Command::Repair(RepairCommand::Index) => {
            let location = repo_path()?;
            check::repair_index(ui, &location, &options_for(&location, None))
        }
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
        Command::Run(a) => {
            let config = options::job_config(&a.file)?;
            if let Some(n) = a.concurrency {
                if !(1..=crate::jobs::config::MAX_CONCURRENCY).contains(&n) {
                    anyhow::bail!(
                        "--concurrency {n}: give 1 to {}",
                        crate::jobs::config::MAX_CONCURRENCY
                    );
                }
            }
            let jobs = run_job::jobs_named(&config, &a.jobs, a.all)?;
            let o = run_job::RunOptions {
                config,
                jobs,
                concurrency: a.concurrency,
                verify_after: a.verify_after,
            };
            run_job::run(ui, &o, &open_configured)
        }
        Command::Config(ConfigCommand::Check(a)) => {
            let config = options::job_config(&a.file)?;
            let jobs = run_job::jobs_named(&config, &a.jobs, a.jobs.is_empty()).or_else(|e| {
                if config.jobs.is_empty() {
                    Ok(Vec::new())
                } else {
                    Err(e)
                }
            })?;
            run_job::check(ui, &config, &jobs, !a.offline)
        }
        Command::Runs(a) => {
            let config = options::job_config(&a.file)?;
            run_job::list_runs(ui, &config, a.job.as_deref(), a.last)
        }
        #[cfg(feature = "sim")]
        Command::Demo(a) => demo::run(ui, &options::demo(a)),
        #[cfg(feature = "sim")]
        Command::Sim(a) => sim::run(ui, &options::sim(a)),
        Command::Generate(a) => super::generate::run(ui, a),
    }
}

/// Opens a repository of the job configuration, with its own password
/// file and S3 settings.
fn open_configured(
    ui: &Ui,
    r: &crate::jobs::config::RepositoryConfig,
) -> Result<crate::repo::Repository> {
    let settings = S3Settings {
        endpoint: r.s3_endpoint.clone(),
        region: r.s3_region.clone(),
        style: r.s3_url_style.as_deref().map(|s| match s {
            "virtual-host" => S3Style::VirtualHost,
            _ => S3Style::Path,
        }),
        ca_file: r.s3_ca_file.clone(),
    };
    let location = Location::parse(&r.location, &settings)?;
    let options = OpenOptions {
        no_lock: false,
        password: Some(password::existing(
            r.password_file.clone(),
            format!("repository '{location}'"),
        )),
    };
    open_with(ui, &location, &options)
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
