//! Exit codes, in one place: every way the process ends maps to one of
//! these. Scripts depend on them; a new code is added here and documented,
//! never returned as a bare number elsewhere.

use std::process::ExitCode;

use crate::commands::Outcome;
use crate::output::Ui;

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
    /// The command ran to the end and found integrity damage (`check`).
    Damage = 3,
}

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
        }
    }
}

/// The exit status of a command's result; an error is printed first, its
/// context chain on one line.
pub fn of_result(ui: &Ui, result: anyhow::Result<Outcome>) -> Exit {
    match result {
        Ok(outcome) => outcome.into(),
        Err(e) => {
            ui.error(format!("{e:#}"));
            Exit::Error
        }
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
