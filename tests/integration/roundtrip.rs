//! Bit-exact round trips through the real binary: back up an image, restore
//! it to a file and to stdout, compare whole-image BLAKE3. Covers random,
//! zero, mixed and compressible data, sizes that are not a multiple of the
//! block size, empty images, long incremental chains and disks that grow
//! and shrink, and that zero blocks come back as holes.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::*;

/// Backs up `img`, restores the snapshot to a file and to stdout and
/// compares both with the image. Returns the backup summary.
#[track_caller]
fn round_trip(t: &TestRepo, img: &Image) -> serde_json::Value {
    let summary = t.backup(&img.path, &[]);
    let id = TestRepo::id_of(&summary);
    t.assert_restores(&id, img.hash(), img.size());
    let out = t.restore(&id, std::path::Path::new("-"), &[]).ok();
    assert_eq!(
        out.stdout.len() as u64,
        img.size(),
        "restore to stdout: length"
    );
    assert!(
        out.stdout == img.bytes(),
        "restore to stdout: content differs"
    );
    summary
}

#[test]
fn random_image_round_trips() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("random.img"), &random_bytes(1, 0, 35 * BSU));
    let s = round_trip(&t, &img);
    assert_eq!(u64_of(&s, "blocks_read"), 35);
    assert_eq!(u64_of(&s, "blocks_new"), 35);
    assert_eq!(u64_of(&s, "blocks_zero"), 0);
    assert_eq!(u64_of(&s, "blocks_deduplicated"), 0);
    assert_eq!(u64_of(&s, "read_bytes"), 35 * BS);
    assert!(s["parent_id"].is_null());
}

#[test]
fn all_zero_image_stores_nothing_and_restores_sparse() {
    let t = TestRepo::new();
    let size = 64 * BS;
    let img = Image::create(&t.path("zeros.img"), size);
    let s = round_trip(&t, &img);
    assert_eq!(u64_of(&s, "blocks_read"), 0, "a hole is never read");
    assert_eq!(u64_of(&s, "blocks_zero"), 64);
    assert_eq!(u64_of(&s, "blocks_new"), 0);
    assert_eq!(u64_of(&s, "stored_bytes"), 0);
    assert!(
        t.packs().is_empty(),
        "zero blocks must never be stored: {:?}",
        t.packs()
    );

    let target = t.path("zeros.out");
    t.restore(&TestRepo::id_of(&s), &target, &[]).ok();
    assert_eq!(hash_file(&target), img.hash());
    assert!(
        allocated_bytes(&target) < size / 8,
        "restored all-zero image is not sparse: {} bytes allocated for {size}",
        allocated_bytes(&target)
    );
}

#[test]
fn mostly_zero_image_restores_sparse() {
    let t = TestRepo::new();
    let size = 64 * BS;
    let img = Image::create(&t.path("sparse.img"), size);
    for i in [3u64, 17, 40, 63] {
        img.write_block(i, &random_block(2, i));
    }
    let s = t.backup(&img.path, &[]);
    assert_eq!(u64_of(&s, "blocks_zero"), 60);
    assert_eq!(u64_of(&s, "blocks_new"), 4);
    let target = t.path("sparse.out");
    t.restore(&TestRepo::id_of(&s), &target, &[]).ok();
    assert_eq!(hash_file(&target), img.hash());
    assert_eq!(std::fs::metadata(&target).unwrap().len(), size);
    let allocated = allocated_bytes(&target);
    // 4 data blocks; allow file system slack but nowhere near the 64 blocks.
    assert!(
        allocated <= 8 * BS,
        "zero blocks were written instead of left as holes: {allocated} bytes allocated"
    );
}

#[test]
fn mixed_image_counts_every_kind_of_block() {
    let t = TestRepo::new();
    let blocks = 40u64;
    let img = Image::create(&t.path("mixed.img"), blocks * BS);
    let mut expected_zero = 0;
    let mut distinct = HashSet::new();
    let mut non_zero = 0;
    for i in 0..blocks {
        let data = match i % 5 {
            0 => zero_block(),
            1 | 4 => random_block(3, i),
            2 => text_block(3, i),
            _ => random_block(3, 1), // a copy of block 1: deduplicated
        };
        if i % 5 == 0 {
            expected_zero += 1;
        } else {
            non_zero += 1;
            distinct.insert(blake3::hash(&data));
        }
        img.write_block(i, &data);
    }
    let s = round_trip(&t, &img);
    assert_eq!(u64_of(&s, "blocks_read"), blocks);
    assert_eq!(u64_of(&s, "blocks_zero"), expected_zero);
    assert_eq!(u64_of(&s, "blocks_new"), distinct.len() as u64);
    assert_eq!(
        u64_of(&s, "blocks_deduplicated"),
        non_zero - distinct.len() as u64
    );
    // Text blocks compress: less is stored than the distinct raw bytes.
    assert!(u64_of(&s, "stored_bytes") < distinct.len() as u64 * BS);
}

#[test]
fn unaligned_sizes_round_trip() {
    let t = TestRepo::new();
    // A partial last block of random data.
    let a = Image::from_bytes(&t.path("a.img"), &random_bytes(4, 0, 3 * BSU + 1234));
    let s = round_trip(&t, &a);
    assert_eq!(u64_of(&s, "blocks_read"), 4);
    assert_eq!(u64_of(&s, "read_bytes"), 3 * BS + 1234);

    // Smaller than one block.
    let b = Image::from_bytes(&t.path("b.img"), &random_bytes(4, 1, 1234));
    let s = round_trip(&t, &b);
    assert_eq!(u64_of(&s, "blocks_read"), 1);

    // A partial last block that is all zeros: the restored file must still
    // have the exact length.
    let c = Image::create(&t.path("c.img"), 5 * BS + 777);
    for i in 0..5 {
        c.write_block(i, &random_block(4, 10 + i));
    }
    let s = round_trip(&t, &c);
    assert_eq!(u64_of(&s, "blocks_zero"), 1);

    // The same bytes as a's first 1234 bytes but as a whole-block prefix:
    // a short block and a full block with the same start must not be
    // confused by deduplication.
    let mut bytes = random_bytes(4, 0, 3 * BSU + 1234);
    bytes.truncate(BSU + 1234);
    let d = Image::from_bytes(&t.path("d.img"), &bytes);
    round_trip(&t, &d);
}

#[test]
fn empty_image_round_trips() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("empty.img"), 0);
    let s = t.backup(&img.path, &[]);
    assert_eq!(u64_of(&s, "blocks_read"), 0);
    assert_eq!(u64_of(&s, "disk_size_bytes"), 0);
    let id = TestRepo::id_of(&s);
    let snaps = t.snapshots(&[]);
    assert_eq!(snaps.len(), 1);
    assert_eq!(u64_of(&snaps[0], "disk_size_bytes"), 0);

    let target = t.path("empty.out");
    t.restore(&id, &target, &[]).ok();
    assert_eq!(
        std::fs::metadata(&target)
            .expect("restored file exists")
            .len(),
        0
    );
    let out = t.restore(&id, std::path::Path::new("-"), &[]).ok();
    assert!(out.stdout.is_empty());
    // And an incremental on top of an empty disk.
    let s2 = t.backup(&img.path, &[]);
    assert_eq!(s2["parent_id"].as_str(), Some(id.as_str()));
    let (r, _) = t.check(true);
    r.ok();
}

#[test]
fn unchanged_image_adds_an_empty_manifest() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("same.img"), &random_bytes(5, 0, 10 * BSU));
    let first = t.backup(&img.path, &[]);
    let second = t.backup(&img.path, &[]);
    assert_eq!(second["parent_id"], first["snapshot_id"]);
    assert_eq!(u64_of(&second, "blocks_new"), 0);
    assert_eq!(u64_of(&second, "blocks_deduplicated"), 10);
    assert_eq!(u64_of(&second, "stored_bytes"), 0);
    let entries = t.cat_snapshot(&TestRepo::id_of(&second))["entries"]
        .as_array()
        .expect("entries")
        .len();
    assert_eq!(entries, 0);
    t.assert_restores(&TestRepo::id_of(&second), img.hash(), img.size());
}

/// 1 full backup and 50 incrementals with random changes: new random
/// blocks, blocks zeroed again, old content brought back. Every 10th
/// snapshot restores to the image as it was then.
#[test]
fn chain_of_50_incrementals() {
    let seed: u64 = std::env::var("CBTVAULT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0050);
    eprintln!("chain_of_50_incrementals: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let t = TestRepo::new();
    let blocks = 32u64;
    let img = Image::create(&t.path("chain.img"), blocks * BS);
    for i in 0..blocks {
        if i % 4 != 3 {
            img.write_block(i, &random_block(seed, i));
        }
    }
    // Blocks ever written (zeros included): the rest are holes, never read.
    let mut written: HashSet<u64> = (0..blocks).filter(|i| i % 4 != 3).collect();
    let mut history = Vec::new(); // (snapshot id, image hash)
    let s = t.backup(&img.path, &[]);
    history.push((TestRepo::id_of(&s), img.hash()));
    let mut counter = 1000u64;
    for step in 1..=50u64 {
        let mut touched = HashSet::new();
        for _ in 0..rng.gen_range(1..=4) {
            let i = rng.gen_range(0..blocks);
            counter += 1;
            img.write_block(i, &random_block(seed, counter));
            touched.insert(i);
        }
        for _ in 0..rng.gen_range(0..=2) {
            let i = rng.gen_range(0..blocks);
            img.zero_block(i);
            touched.insert(i);
        }
        if rng.gen_bool(0.2) {
            // Old content comes back: deduplicated, not stored again.
            let i = rng.gen_range(0..blocks);
            img.write_block(i, &random_block(seed, i));
            touched.insert(i);
        }
        written.extend(touched.iter().copied());
        let s = t.backup(&img.path, &[]);
        assert_eq!(
            s["parent_id"].as_str(),
            Some(history.last().unwrap().0.as_str()),
            "step {step}: an incremental layers on the previous snapshot"
        );
        assert_eq!(
            u64_of(&s, "blocks_read"),
            written.len() as u64,
            "step {step}: every block holding data is read, no hole"
        );
        assert!(
            u64_of(&s, "blocks_new") <= touched.len() as u64,
            "step {step}: {} new blocks for {} touched",
            u64_of(&s, "blocks_new"),
            touched.len()
        );
        history.push((TestRepo::id_of(&s), img.hash()));
    }
    let snaps = t.snapshots(&[]);
    assert_eq!(snaps.len(), 51);
    for (k, snap) in snaps.iter().enumerate() {
        assert_eq!(
            snap["snapshot_id"].as_str(),
            Some(history[k].0.as_str()),
            "listing order"
        );
    }
    for k in (0..=50).step_by(10) {
        let (id, hash) = &history[k];
        t.assert_restores(id, *hash, blocks * BS);
    }
    // `latest` is the newest, also when restored to stdout.
    let out = t.restore("latest", std::path::Path::new("-"), &[]).ok();
    assert_eq!(blake3::hash(&out.stdout), history[50].1);
    let (r, _) = t.check(true);
    r.ok();
}

/// Disks that grow and shrink between backups (with and without synthetic
/// fulls): a shrink drops blocks for good, a growth brings back zeros.
#[test]
fn chain_with_resizes_round_trips() {
    for full_every in [None, Some("2")] {
        let t = TestRepo::new();
        let img = Image::create(&t.path("resize.img"), 0);
        let sizes = [
            10 * BS,
            14 * BS + 100,
            6 * BS + 500,
            12 * BS,
            0,
            3 * BS,
            9 * BS + 1,
        ];
        let mut history = Vec::new();
        for (step, &size) in sizes.iter().enumerate() {
            let old = img.size();
            img.set_len(size);
            // Change a few blocks, including ones in the grown area.
            for i in 0..img.blocks() {
                // Grown area: even blocks get data, odd ones stay zero.
                if (i + step as u64).is_multiple_of(3) || (i * BS >= old && i.is_multiple_of(2)) {
                    img.write_block(i, &random_block(6, step as u64 * 100 + i));
                }
            }
            let extra: Vec<&str> = match full_every {
                Some(n) => vec!["--full-every", n],
                None => vec![],
            };
            let s = t.backup(&img.path, &extra);
            assert_eq!(u64_of(&s, "disk_size_bytes"), size);
            history.push((TestRepo::id_of(&s), img.hash(), size));
        }
        for (id, hash, size) in &history {
            t.assert_restores(id, *hash, *size);
        }
        let (r, _) = t.check(true);
        r.ok();
    }
}

/// However well blocks compress, a pack holds at most 16384 of them
/// (format-spec/02-pack.md#writing): 20000 distinct, nearly empty 4 KiB
/// blocks make two packs, and the image restores bit-exact.
#[test]
fn packs_are_capped_by_block_count() {
    const BLOCK: usize = 4096;
    const BLOCKS: usize = 20_000;
    let t = TestRepo::init(&["--block-size", "4096"]);
    let mut bytes = vec![0u8; BLOCK * BLOCKS];
    for (i, block) in bytes.chunks_mut(BLOCK).enumerate() {
        block[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    }
    let img = Image::from_bytes(&t.path("compressible.img"), &bytes);
    let j = round_trip(&t, &img);
    assert_eq!(j["blocks_new"].as_u64(), Some(BLOCKS as u64), "{j}");
    let mut counts: Vec<usize> = t
        .packs()
        .iter()
        .map(|p| {
            let raw = std::fs::read(p).unwrap();
            cbtvault::format::pack::decode_pack_index(&raw, BLOCK as u32)
                .expect("trailer decodes")
                .len()
        })
        .collect();
    counts.sort();
    assert_eq!(counts, vec![BLOCKS - 16384, 16384]);
}
