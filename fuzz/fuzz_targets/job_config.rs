//! Feeds arbitrary text to the job configuration parser
//! (src/jobs/config.rs), then selects from a small inventory with every
//! job it accepts. It must never panic; an error must name the file, and a
//! place it gives must lie inside the text.
#![no_main]

use std::path::Path;

use cbtvault::jobs::{config, select};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/etc/cbtvault/cbtvault.toml");
    match config::parse(text, file) {
        Err(e) => {
            assert_eq!(e.file, file);
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{e}");
            }
        }
        Ok(c) => {
            let vm = select::VmInfo {
                reference: "OpaqueRef:1".into(),
                uuid: "00000000-0000-0000-0000-000000000001".into(),
                name: "web-01".into(),
                tags: vec!["daily".into()],
                power_state: "Running".into(),
                resident_on: Some("host-a".into()),
                resident_on_uuid: None,
                disks: vec![select::DiskInfo {
                    vdi_uuid: "v".into(),
                    name: "disk".into(),
                    userdevice: "0".into(),
                    size_bytes: 1,
                }],
                backupable: true,
            };
            for job in c.jobs.values() {
                let r = select::select(&job.selection, std::slice::from_ref(&vm));
                assert!(r.selected.len() + r.passed.len() <= 1);
                assert!(job.concurrency >= 1);
            }
        }
    }
});
