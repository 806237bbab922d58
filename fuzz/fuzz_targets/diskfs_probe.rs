//! Arbitrary bytes as a disk image: partition tables, file-system
//! detection, and a bounded walk of every file system that opens. Nothing
//! may panic or hang; every answer is a value or a typed error.
#![no_main]

use std::sync::Arc;

use diskfs::{FileKind, FileSystem, Source};
use libfuzzer_sys::fuzz_target;

fn walk(fs: &dyn FileSystem, dir: &[u8], depth: usize, budget: &mut usize) {
    let Ok(entries) = fs.list(dir) else { return };
    for e in entries {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let mut path = dir.to_vec();
        if !path.ends_with(b"/") {
            path.push(b'/');
        }
        path.extend_from_slice(&e.name);
        let _ = fs.stat(&path);
        match e.kind {
            FileKind::Dir if depth > 0 => walk(fs, &path, depth - 1, budget),
            FileKind::File => {
                let mut buf = [0u8; 4096];
                let _ = fs.read_at(&path, 0, &mut buf);
                let _ = fs.read_at(&path, e.size.saturating_sub(16), &mut buf[..16]);
            }
            FileKind::Symlink => {
                let _ = fs.readlink(&path);
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = diskfs::detect(data);
    let disk: Source = Arc::new(data.to_vec());
    let Ok(table) = diskfs::read_partitions(&disk) else { return };
    for p in &table.partitions {
        assert!(p.number <= 128 + 4 || table.scheme == diskfs::Scheme::Gpt);
        if let Ok(fs) = diskfs::open(&disk, p) {
            let mut budget = 64;
            walk(&*fs, b"/", 4, &mut budget);
        }
    }
});
