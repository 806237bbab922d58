//! cbtvault: incremental, deduplicating backup of virtual disks driven by
//! changed block tracking. See DESIGN.md in the project's shared folder and
//! `format-spec/` for the on-disk contract. The NBD protocol and the XenAPI
//! wire codecs live in the workspace crates `nbd` and `xapi-wire`; the
//! XenServer simulator (`xapi-sim`) is used only by the `sim` and `demo`
//! commands, behind the default cargo feature `sim`.

pub mod backend;
pub mod cli;
pub mod commands;
pub mod crypto;
pub mod files;
pub mod format;
pub mod index;
pub mod interrupt;
pub mod jobs;
pub mod json;
pub mod manifest;
pub mod nbdserver;
pub mod output;
pub mod pack;
pub mod progress;
pub mod repo;
pub mod source;
pub mod target;
