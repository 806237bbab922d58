//! Hostile images: truncated, corrupted superblock, randomly damaged
//! metadata (seeded), MBR extended-partition loops. Every operation ends in
//! Ok or a typed error within a time bound; none panics.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskfs::{Error, FileKind, FileSystem, PartitionError, Source};
use rand::{Rng, SeedableRng};

use crate::common::*;

/// Walks at most `budget` entries below `dir`, reading up to 64 KiB of each
/// file; errors are expected and ignored, panics are not.
pub fn bounded_walk(fs: &dyn FileSystem, dir: &[u8], depth: usize, budget: &mut usize) {
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
            FileKind::Dir if depth > 0 => bounded_walk(fs, &path, depth - 1, budget),
            FileKind::File => {
                let mut buf = vec![0u8; 65536];
                let _ = fs.read_at(&path, 0, &mut buf);
                let _ = fs.read_at(&path, e.size.saturating_sub(100), &mut buf[..100]);
            }
            FileKind::Symlink => {
                let _ = fs.readlink(&path);
            }
            _ => {}
        }
    }
}

/// Everything a reader may do with a disk image; returns how many entries
/// the walks visited.
pub fn probe(disk: &Source) -> usize {
    let Ok(table) = diskfs::read_partitions(disk) else {
        return 0;
    };
    let mut visited = 0;
    for p in &table.partitions {
        if let Ok(fs) = diskfs::open(disk, p) {
            let mut budget = 300;
            bounded_walk(&*fs, b"/", 8, &mut budget);
            visited += 300 - budget;
        }
    }
    visited
}

/// Runs `f` on a thread and fails if it takes longer than `limit`.
fn within<F: FnOnce() + Send + 'static>(limit: Duration, what: &str, f: F) {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {limit:?} (a hang)")
        }
    }
}

fn small_ext4() -> Option<Vec<u8>> {
    if !have("mkfs.ext4", "e2fsprogs") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    build_tree(
        &tree,
        &TreeOptions {
            unix: false,
            random_bytes: 20_000,
        },
    );
    for i in 0..40 {
        std::fs::write(
            tree.join(format!("f{i:02}")),
            vec![b'a' + (i % 26) as u8; i * 300],
        )
        .unwrap();
    }
    let image = dir.path().join("small.img");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "1024",
            "-d",
            tree.to_str().unwrap(),
            image.to_str().unwrap(),
            "2M",
        ],
    );
    Some(std::fs::read(&image).unwrap())
}

#[test]
fn truncated_ext4_images_give_errors() {
    let Some(image) = small_ext4() else { return };
    within(Duration::from_secs(120), "truncated images", move || {
        for len in [
            0,
            100,
            511,
            512,
            1024,
            1100,
            2048,
            4096,
            8192,
            65536,
            300_000,
            image.len() - 1,
        ] {
            let disk: Source = Arc::new(image[..len].to_vec());
            probe(&disk);
        }
    });
}

#[test]
fn corrupted_ext4_superblock_is_a_typed_error() {
    let Some(mut image) = small_ext4() else {
        return;
    };
    // Block size exponent far out of range; magic intact.
    image[1024 + 24..1024 + 28].copy_from_slice(&40u32.to_le_bytes());
    let disk: Source = Arc::new(image);
    let table = diskfs::read_partitions(&disk).unwrap();
    match diskfs::open(&disk, &table.partitions[0]) {
        Err(Error::Ext4 { .. }) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(_) => panic!("opened a file system with a corrupt superblock"),
    }
}

fn small_fat() -> Option<Vec<u8>> {
    if !have("mkfs.fat", "dosfstools") || !have("mcopy", "mtools") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    build_tree(
        &tree,
        &TreeOptions {
            unix: false,
            random_bytes: 20_000,
        },
    );
    let image = dir.path().join("small.img");
    let img = image.to_str().unwrap();
    run("mkfs.fat", &["-F", "12", "-C", img, "1024"]);
    let entries: Vec<String> = std::fs::read_dir(&tree)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let mut args = vec!["-s", "-i", img];
    args.extend(entries.iter().map(String::as_str));
    args.push("::/");
    run("mcopy", &args);
    Some(std::fs::read(&image).unwrap())
}

#[test]
fn randomly_damaged_ext4_metadata_never_panics_or_hangs() {
    let Some(image) = small_ext4() else { return };
    // Metadata lives in the first ~100 KiB of this 2 MiB image.
    damage(image, 0..128 * 1024, 0x00D1_5CF5);
}

#[test]
fn randomly_damaged_fat_metadata_never_panics_or_hangs() {
    let Some(image) = small_fat() else { return };
    // Boot sector, FATs, root directory and the first data clusters.
    damage(image, 0..64 * 1024, 0xFA7);
}

fn small_ntfs() -> Option<Vec<u8>> {
    if !have("mkntfs", "ntfs-3g") || !have("ntfscp", "ntfs-3g") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("small.img");
    let img = image.to_str().unwrap();
    run("truncate", &["-s", "8M", img]);
    run("mkntfs", &["-F", "-Q", "-q", img]);
    for (i, len) in [10usize, 700, 5000, 70_000].into_iter().enumerate() {
        let src = dir.path().join("src");
        std::fs::write(&src, vec![b'n'; len]).unwrap();
        run(
            "ntfscp",
            &["-f", img, src.to_str().unwrap(), &format!("file{i}")],
        );
    }
    Some(std::fs::read(&image).unwrap())
}

#[test]
fn randomly_damaged_ntfs_metadata_never_panics_or_hangs() {
    let Some(image) = small_ntfs() else { return };
    // The MFT's first records: boot sector fields give its cluster.
    let cluster = u64::from(u16::from_le_bytes([image[11], image[12]])) * u64::from(image[13]);
    let mft = (u64::from_le_bytes(image[0x30..0x38].try_into().unwrap()) * cluster) as usize;
    damage(image, mft..mft + 32 * 1024, 0x0E7F5);
}

/// 300 copies of `image`, each with a few random bytes changed (mostly in
/// `hot`, sometimes in the first sector), probed under a time bound.
fn damage(image: Vec<u8>, hot: std::ops::Range<usize>, seed: u64) {
    let start = Instant::now();
    within(Duration::from_secs(240), "damaged images", move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut visited = 0;
        for i in 0..300 {
            let mut img = image.clone();
            let flips = rng.gen_range(1..16);
            for _ in 0..flips {
                let at = if rng.gen_bool(0.2) {
                    rng.gen_range(0..2048)
                } else {
                    rng.gen_range(hot.clone())
                };
                img[at] ^= 1 << rng.gen_range(0..8);
                if rng.gen_bool(0.3) {
                    img[at] = rng.gen();
                }
            }
            let t = Instant::now();
            let disk: Source = Arc::new(img);
            visited += probe(&disk);
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "iteration {i} took {:?}",
                t.elapsed()
            );
        }
        // Most damage leaves the file system readable: the walks did run.
        assert!(
            visited > 300 * 10,
            "only {visited} entries visited in 300 images"
        );
    });
    eprintln!("300 damaged images in {:?}", start.elapsed());
}

#[test]
fn mbr_extended_partition_loop_is_refused() {
    let mut disk = vec![0u8; 1 << 20];
    let entry = |d: &mut [u8], sector: usize, slot: usize, kind: u8, lba: u32, count: u32| {
        let at = sector * 512 + 446 + slot * 16;
        d[at + 4] = kind;
        d[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
        d[at + 12..at + 16].copy_from_slice(&count.to_le_bytes());
        d[sector * 512 + 510] = 0x55;
        d[sector * 512 + 511] = 0xAA;
    };
    entry(&mut disk, 0, 0, 0x0f, 100, 1000);
    // EBR 1 (sector 100) -> EBR 2 (sector 300) -> EBR 1 again.
    entry(&mut disk, 100, 0, 0x83, 10, 50);
    entry(&mut disk, 100, 1, 0x05, 200, 100);
    entry(&mut disk, 300, 0, 0x83, 10, 50);
    entry(&mut disk, 300, 1, 0x05, 0, 100);
    let src: Source = Arc::new(disk);
    let err = diskfs::read_partitions(&src).unwrap_err();
    assert!(matches!(err, PartitionError::ExtendedChain { .. }), "{err}");
}

#[test]
fn random_bytes_as_a_disk_never_panic() {
    within(Duration::from_secs(120), "random disks", || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..200 {
            let len = rng.gen_range(0..200_000);
            let mut d = vec![0u8; len];
            rng.fill(&mut d[..]);
            let disk: Source = Arc::new(d);
            probe(&disk);
        }
    });
}
