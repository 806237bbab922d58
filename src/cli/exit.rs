//! Exit codes, in one place: every way the process ends maps to one of
//! these. Scripts depend on them; a new code is added here and documented
//! (README, [`TABLE`] in `--help`), never returned as a bare number
//! elsewhere. Codes follow restic's where restic has one.
//!
//! A failed command's code comes from the typed errors in its `anyhow`
//! chain ([`of_error`]); anything not recognised is 1.

use std::error::Error as StdError;
use std::process::ExitCode;

use crate::commands::Outcome;
use crate::interrupt::{self, Interrupted, Signal};
use crate::output::Ui;
use crate::repo::restore::RestoreError;
use crate::repo::{LockError, RepoError};

/// The process's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The command did what was asked.
    Ok = 0,
    /// The command failed (the message says why).
    Error = 1,
    /// The command line is malformed (clap's own errors).
    Usage = 2,
    /// The command ran to the end, but some data could not be read or
    /// some snapshot is damaged (`check`, `restore --allow-damaged`,
    /// `prune` finding damage).
    Damage = 3,
    /// The command ran to the end with warnings: something asked for was
    /// left undone and needs attention (not a restic code).
    Warnings = 4,
    /// The command ran to the end, but some of its items failed while
    /// the others completed (`run`: some VMs' backups failed).
    SomeFailed = 5,
    /// The repository does not exist (no config at the location).
    NoRepository = 10,
    /// The repository lock could not be taken (another process holds it).
    Locked = 11,
    /// Wrong password. Reserved for repository encryption: nothing returns
    /// it yet.
    WrongPassword = 12,
    /// Stopped by SIGINT (128 + 2).
    Interrupted = 130,
    /// Stopped by SIGTERM (128 + 15).
    Terminated = 143,
}

/// The table for `--help` (the README has the same one).
pub const TABLE: &str = "\
Exit codes:
  0    success
  1    fatal error (the message says why)
  2    command line not understood
  3    finished, but some data could not be read or some snapshot is damaged
  4    finished with warnings: something asked for was left undone
  5    finished, but some items failed (run: some VMs were not backed up)
  10   the repository does not exist
  11   the repository lock could not be taken (another process holds it)
  12   wrong or missing password of an encrypted repository
  130  stopped by SIGINT (nothing committed after it, lock released)
  143  stopped by SIGTERM (nothing committed after it, lock released)";

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

impl From<Outcome> for Exit {
    fn from(o: Outcome) -> Exit {
        match o {
            Outcome::Ok => Exit::Ok,
            Outcome::IntegrityProblem => Exit::Damage,
            Outcome::Warnings => Exit::Warnings,
            Outcome::SomeFailed => Exit::SomeFailed,
            Outcome::Failed => Exit::Error,
        }
    }
}

impl From<Signal> for Exit {
    fn from(s: Signal) -> Exit {
        match s {
            Signal::Interrupt => Exit::Interrupted,
            Signal::Terminate => Exit::Terminated,
        }
    }
}

/// The exit status of a command's result; an error is printed first, its
/// context chain on one line.
pub fn of_result(ui: &Ui, result: anyhow::Result<Outcome>) -> Exit {
    match result {
        Ok(outcome) => outcome.into(),
        Err(e) => {
            let code = of_error(&e);
            ui.fatal(&e, code as u8);
            code
        }
    }
}

/// The exit status of a failed command. A stop signal decides first (a
/// command stopped by one may fail in any way on its way out); then the
/// first typed error of the chain that has a code of its own; else 1.
pub fn of_error(e: &anyhow::Error) -> Exit {
    if let Some(signal) = interrupt::requested() {
        return signal.into();
    }
    e.chain().find_map(code_of).unwrap_or(Exit::Error)
}

/// The code of one error of a chain, if its type gives one.
fn code_of(e: &(dyn StdError + 'static)) -> Option<Exit> {
    if let Some(r) = e.downcast_ref::<RepoError>() {
        repo_code(r)
    } else if let Some(r) = e.downcast_ref::<RestoreError>() {
        // Its cause is part of its message, not a source.
        repo_code(&r.cause)
    } else if let Some(l) = e.downcast_ref::<LockError>() {
        lock_code(l)
    } else {
        e.downcast_ref::<Interrupted>().map(|i| i.signal.into())
    }
}

fn repo_code(e: &RepoError) -> Option<Exit> {
    match e {
        RepoError::NotARepository { .. } => Some(Exit::NoRepository),
        RepoError::WrongPassword { .. }
        | RepoError::PasswordRequired { .. }
        | RepoError::PasswordUnavailable(_) => Some(Exit::WrongPassword),
        RepoError::Lock(l) => lock_code(l),
        RepoError::InSnapshot { cause, .. } => repo_code(cause),
        RepoError::Interrupted(i) => Some(i.signal.into()),
        _ => None,
    }
}

/// Only a lock held by another process is "could not lock": a lock lost
/// mid-run is a failure of the run (1), as restic's.
fn lock_code(e: &LockError) -> Option<Exit> {
    match e {
        LockError::Conflict { .. } => Some(Exit::Locked),
        LockError::Lost { .. } | LockError::Backend(_) => None,
    }
}

/// The exit status of a command line clap refused (or of `--help` and
/// `--version`, which clap reports the same way), after printing it. A
/// closed stdout is ignored: `cbtvault --help | head -1` is fine.
pub fn of_parse_error(e: &clap::Error) -> Exit {
    let _ = e.print();
    if e.use_stderr() {
        Exit::Usage
    } else {
        Exit::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_errors_anywhere_in_the_chain_give_their_code() {
        let missing = anyhow::Error::from(RepoError::NotARepository {
            location: "/nowhere".into(),
        })
        .context("open repository '/nowhere'");
        assert_eq!(of_error(&missing), Exit::NoRepository);
        let locked = anyhow::Error::from(RepoError::Lock(LockError::Conflict {
            holder: "someone".into(),
        }))
        .context("prune");
        assert_eq!(of_error(&locked), Exit::Locked);
        let nested = anyhow::Error::from(RepoError::InSnapshot {
            snapshot: crate::format::SnapshotId([0; 16]),
            cause: Box::new(RepoError::Lock(LockError::Conflict {
                holder: "someone".into(),
            })),
        });
        assert_eq!(of_error(&nested), Exit::Locked);
        let lost = anyhow::Error::from(RepoError::Lock(LockError::Lost {
            seconds: 1,
            why: "gone".into(),
        }));
        assert_eq!(of_error(&lost), Exit::Error);
        let plain = anyhow::anyhow!("something else").context("back up");
        assert_eq!(of_error(&plain), Exit::Error);
    }

    #[test]
    fn the_help_table_lists_every_code() {
        for e in [
            Exit::Ok,
            Exit::Error,
            Exit::Usage,
            Exit::Damage,
            Exit::Warnings,
            Exit::NoRepository,
            Exit::Locked,
            Exit::WrongPassword,
            Exit::Interrupted,
            Exit::Terminated,
        ] {
            let code = format!("\n  {:<4} ", e as u8);
            assert!(TABLE.contains(&code), "{e:?} missing from the table");
        }
    }
}
