//! The `cbtvault` command: parses arguments, runs one command, maps the
//! outcome to an exit code (the table is `cli::exit`).

use std::process::ExitCode;

use clap::Parser;

use cbtvault::cli::{self, exit, Cli};
use cbtvault::output::Ui;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit::of_parse_error(&e).into(),
    };
    let ui = Ui::new(cli.json, cli.quiet, cli.command.name());
    exit::of_result(&ui, cli::run(cli, &ui)).into()
}
