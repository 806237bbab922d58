//! Feeds arbitrary bytes to the flat VMDK descriptor reader
//! (src/target/vmdk.rs) that a vSphere restore's `--verify` runs on what
//! the host returns. It must never panic; a descriptor it accepts must
//! write back (same extent and size) and read back the same.
#![no_main]

use cbtvault::target::vmdk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = vmdk::parse_flat_descriptor(data) {
        if let Ok(text) = vmdk::flat_descriptor(&d.extent_file, d.sectors, [7; 16]) {
            let again = vmdk::parse_flat_descriptor(text.as_bytes()).expect("own output reads");
            assert_eq!(again.extent_file, d.extent_file);
            assert_eq!(again.sectors, d.sectors);
        }
    }
});
