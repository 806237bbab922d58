//! `serve SNAPSHOT`: export a stored snapshot read-only over NBD.

use anyhow::{bail, Result};

use super::Outcome;
use crate::cli::ServeArgs;
use crate::output::Ui;
use crate::repo::Repository;

pub fn run(_ui: &Ui, _repo: Repository, _args: &ServeArgs) -> Result<Outcome> {
    bail!("serve is not implemented yet")
}
