//! The one integration-test binary (STYLE.md): one module per area.

mod codec_props;
mod util;
mod vectors;

mod catalog;
mod changed_blocks;
mod cli;
mod corruption;
mod crash;
mod healing;
mod manifest_props;
mod nbd;
mod roundtrip;
mod serve;
mod sim;
mod trust;
mod xen_backup;
mod xen_restore;
mod xen_util;
