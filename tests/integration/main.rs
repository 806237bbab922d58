//! The one integration-test binary (STYLE.md): one module per area.

mod codec_props;
mod conveniences;
mod util;
mod vectors;
mod vectors_encrypted;

mod allocation_walk;
mod catalog;
mod catalog_damage;
mod changed_blocks;
mod cli;
mod copy;
mod corruption;
mod crash;
mod encryption;
mod exit_codes;
mod file_source;
mod files;
mod forget;
mod healing;
mod index_objects;
mod jobs;
mod json_contract;
mod layering;
mod listings;
mod manifest_props;
mod nbd;
mod paged;
mod prune;
mod restore_failure;
mod roundtrip;
mod s3;
mod serve;
#[cfg(feature = "sim")]
mod sim_command;
mod torture;
mod trust;
// Drives the library over a test backend registered by a debug-only hook.
#[cfg(debug_assertions)]
mod torture_powerloss;
mod vcsim;
mod vmware;
mod xen_backup;
mod xen_host_changes;
mod xen_landmarks;
mod xen_pool;
mod xen_restore;
mod xen_util;
