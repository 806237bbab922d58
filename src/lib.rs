//! cbtvault: incremental, deduplicating backup of virtual disks driven by
//! changed block tracking. See DESIGN.md in the project's shared folder and
//! `format-spec/` for the on-disk contract.

pub mod backend;
pub mod bytes;
pub mod cli;
pub mod commands;
pub mod format;
pub mod index;
pub mod manifest;
pub mod nbdserver;
pub mod output;
pub mod pack;
pub mod progress;
pub mod repo;
pub mod sim;
pub mod source;
pub mod target;
