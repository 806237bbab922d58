//! `cbtvault generate`: shell completion scripts and man pages, made from
//! the same clap definition the command line is parsed with, so they never
//! fall behind it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use serde::Serialize;

use super::{Cli, GenerateArgs};
use crate::commands::Outcome;
use crate::output::{plural, Ui};

/// Runs `generate` (exactly one of `--completions`, `--man`; clap checks).
pub fn run(ui: &Ui, a: &GenerateArgs) -> Result<Outcome> {
    if let Some(shell) = a.completions {
        // The script is the output on stdout: JSON, if asked for, goes to
        // stderr (as for `restore --target -`).
        let ui = ui.with_json_on_stderr();
        let mut script = Vec::new();
        let mut cmd = Cli::command();
        clap_complete::generate(shell, &mut cmd, "cbtvault", &mut script);
        ui.document_bytes(&script);
        #[derive(Serialize)]
        struct Summary {
            shell: String,
            script_bytes: usize,
        }
        ui.summary(&Summary {
            shell: shell.to_string(),
            script_bytes: script.len(),
        });
        return Ok(Outcome::Ok);
    }
    let Some(dir) = &a.man else {
        anyhow::bail!("give --completions SHELL or --man DIR");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("create '{}'", dir.display()))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    man_pages(&cmd, dir, &mut written)?;
    #[derive(Serialize)]
    struct Summary<'a> {
        directory: String,
        page_count: usize,
        paths: &'a [String],
    }
    let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    ui.summary(&Summary {
        directory: dir.display().to_string(),
        page_count: paths.len(),
        paths: &paths,
    });
    ui.info(format!(
        "wrote {} to '{}'",
        plural(paths.len(), "man page"),
        dir.display()
    ));
    Ok(Outcome::Ok)
}

/// One page for `cmd` and one for each of its visible subcommands, depth
/// first; the paths written are added to `written` (parents first).
fn man_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    let path = man
        .generate_to(dir)
        .with_context(|| format!("write the man page of '{}'", cmd.get_name()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir, written)?;
    }
    Ok(())
}
