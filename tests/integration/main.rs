//! The one integration-test binary (STYLE.md): one module per area.

mod codec_props;
mod util;
mod vectors;

mod catalog;
mod changed_blocks;
mod cli;
mod corruption;
mod crash;
mod manifest_props;
mod nbd;
mod roundtrip;
mod serve;
mod sim;
mod torture;
// Drives the library over a test backend registered by a debug-only hook.
#[cfg(debug_assertions)]
mod torture_powerloss;
mod xen_backup;
mod xen_restore;
mod xen_util;
