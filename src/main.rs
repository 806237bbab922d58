//! The `cbtvault` command: parses arguments, runs one command, maps the
//! outcome to an exit code (0 ok, 1 error, 3 integrity problem).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cbtvault::cli::Cli::parse();
    let ui = cbtvault::output::Ui::new(cli.json, cli.quiet);
    match cbtvault::commands::run(cli) {
        Ok(outcome) => outcome.into(),
        Err(e) => {
            ui.error(format!("{e:#}"));
            ExitCode::from(1)
        }
    }
}
