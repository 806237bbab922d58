//! The torture test's power-loss mode (issue 22): the library driven
//! in-process (Repository, backup and restore functions) over
//! `cbtvault::backend::powerloss::PowerLoss`, which models what a power
//! loss keeps (only what fsync made durable: file contents after the file
//! fsync, directory entries after the folder fsync; see its module
//! comment). Backups are cut by a power loss at a random crash point; the
//! repository is then reopened over what survived (with or without the
//! SQLite catalog, which a power loss may take back to any committed
//! state, the empty one included) and the invariant checked: every
//! snapshot whose backup returned Ok is still there and restores exactly;
//! a snapshot of a backup cut short restores to that backup's image;
//! `check --read-data` finds no error.
//!
//! Seeded like the main harness: CBTVAULT_TORTURE_SEED, and
//! CBTVAULT_TORTURE_STEPS (a tenth of it here, at least 20).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use cbtvault::backend::fault::register_test_backend;
use cbtvault::backend::powerloss::PowerLoss;
use cbtvault::backend::{Backend, Kind};
use cbtvault::format::SnapshotId;
use cbtvault::progress::NoProgress;
use cbtvault::repo::backup::{self, BackupPlan, BlockBitmap, ParentInfo, PipelineOptions};
use cbtvault::repo::check::{self, DataSubset};
use cbtvault::repo::restore::{self, RestoreOptions};
use cbtvault::repo::{InitOptions, Repository};
use cbtvault::source::FileSource;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::*;

const DISK_BLOCKS: u64 = 20;

/// One backup through the library, as the `backup` command would run it:
/// under a shared lock; incremental on `parent` reading the `marked` blocks
/// (or every block when `marked` is None), or full.
fn backup_once(
    repo: &Repository,
    image: &Path,
    parent: Option<SnapshotId>,
    marked: Option<&[u64]>,
) -> Result<SnapshotId, String> {
    let _lock = repo.lock(false, "backup").map_err(|e| e.to_string())?;
    let source = FileSource::open(image).map_err(|e| e.to_string())?;
    let size = std::fs::metadata(image).unwrap().len();
    let parent = match parent {
        None => None,
        Some(id) => {
            let chain = repo.load_chain(id).map_err(|e| e.to_string())?;
            let meta = chain.last().unwrap().meta.clone();
            Some(ParentInfo {
                depth: chain.len() as u32 - 1,
                chain,
                meta,
            })
        }
    };
    let bitmap = match (&parent, marked) {
        (Some(_), Some(m)) => Some(
            BlockBitmap::from_bytes(bitmap_raw(size, m), size.div_ceil(BS))
                .expect("a bitmap of the image's blocks"),
        ),
        _ => None,
    };
    let plan = BackupPlan {
        new_set_reason: parent
            .is_none()
            .then(|| "power-loss torture: full".to_string()),
        parent,
        read: bitmap.clone(),
        known_zero: cbtvault::repo::backup::KnownZero::None,
        change_bitmap: bitmap,
        synthetic_full: false,
        tags: vec![],
        hostname: "torture".into(),
        landmark: BTreeMap::new(),
        warnings: vec![],
        strict: false,
        streamed: false,
    };
    backup::run(
        repo,
        &source,
        plan,
        &PipelineOptions::from_repo(repo),
        &NoProgress,
        None,
    )
    .map(|s| s.snapshot_id)
    .map_err(|e| e.to_string())
}

fn restore_bytes(repo: &Repository, id: SnapshotId) -> Result<Vec<u8>, String> {
    let reader = repo.chain_reader(id).map_err(|e| e.to_string())?;
    let mut sink = VecSink(Vec::new());
    restore::run(
        repo,
        reader,
        &mut sink,
        RestoreOptions::default(),
        &NoProgress,
    )
    .map_err(|e| e.to_string())?;
    Ok(sink.0)
}

fn open(path: &Path, backend: Arc<PowerLoss>) -> Repository {
    register_test_backend(path, Some(backend as Arc<dyn Backend>));
    Repository::open(path).expect("open the repository over the power-loss model")
}

fn power_loss_run(seed: u64, steps: usize) {
    eprintln!(
        "torture (power loss): seed {seed}, {steps} steps (replay: CBTVAULT_TORTURE_SEED={seed})"
    );
    let fail = |step: usize, what: String| -> ! {
        panic!(
            "power-loss torture failure at step {step} (seed {seed}; replay with \
             CBTVAULT_TORTURE_SEED={seed}): {what}"
        )
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::Builder::new()
        .prefix("cbtvault-powerloss-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("repo");
    Repository::init(
        &path,
        &InitOptions {
            pack_size_target_bytes: 256 << 10,
            ..InitOptions::default()
        },
    )
    .unwrap();
    let config = std::fs::read(path.join("config")).unwrap();
    let mut backend = Arc::new(PowerLoss::with_objects(
        "power-loss model",
        seed,
        vec![(Kind::Config, "config".into(), config)],
    ));
    let mut repo = open(&path, backend.clone());
    let image = dir.path().join("disk.img");
    let mut bytes = vec![0u8; (DISK_BLOCKS * BS) as usize];
    let mut known: BTreeMap<SnapshotId, Vec<u8>> = BTreeMap::new();
    let mut newest: Option<SnapshotId> = None;
    let mut crashes = 0;
    for step in 0..steps {
        // New data in a few blocks, some of it shared with earlier states.
        let mut changed = BTreeSet::new();
        for _ in 0..rng.gen_range(1..6) {
            let b = rng.gen_range(0..DISK_BLOCKS);
            let data = match rng.gen_range(0..3) {
                0 => random_block(seed, rng.gen_range(0..8)),
                1 => zero_block(),
                _ => random_block(seed, 1000 + step as u64 * 16 + b),
            };
            bytes[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
            changed.insert(b);
        }
        std::fs::write(&image, &bytes).unwrap();
        // The parent and the blocks changed since it.
        let parent = if rng.gen_bool(0.2) { None } else { newest };
        let marked: Option<Vec<u64>> = parent.map(|p| {
            let old = &known[&p];
            (0..DISK_BLOCKS)
                .filter(|&b| {
                    let r = (b * BS) as usize..((b + 1) * BS) as usize;
                    old[r.clone()] != bytes[r]
                })
                .collect()
        });
        let marked = if rng.gen_bool(0.3) { None } else { marked };
        let armed = rng.gen_bool(0.6);
        if armed {
            backend.arm(rng.gen_range(1..24));
        }
        let result = backup_once(&repo, &image, parent, marked.as_deref());
        match &result {
            Ok(id) => {
                known.insert(*id, bytes.clone());
                newest = Some(*id);
            }
            Err(e) if !backend.crashed() => {
                fail(step, format!("backup failed without a crash: {e}"))
            }
            Err(_) => {}
        }
        if !backend.crashed() {
            if armed {
                backend.disarm();
            }
            continue;
        }
        // The power failed: reboot over what survived.
        crashes += 1;
        drop(repo);
        backend = Arc::new(backend.after_crash(rng.gen()));
        if rng.gen_bool(0.3) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(path.join(format!("catalog.sqlite{suffix}")));
            }
        }
        repo = open(&path, backend.clone());
        let listed: BTreeSet<SnapshotId> = repo
            .snapshots()
            .unwrap_or_else(|e| fail(step, format!("list after the power loss: {e}")))
            .into_iter()
            .map(|s| s.meta.id)
            .collect();
        for id in known.keys() {
            if !listed.contains(id) {
                fail(
                    step,
                    format!("committed snapshot {id} lost in the power loss"),
                );
            }
        }
        for id in &listed {
            if known.contains_key(id) {
                continue;
            }
            // The cut backup committed after all: it is this image.
            let got = restore_bytes(&repo, *id)
                .unwrap_or_else(|e| fail(step, format!("snapshot {id} of the cut backup: {e}")));
            if got != bytes {
                fail(
                    step,
                    format!("snapshot {id} of the cut backup restores to other bytes"),
                );
            }
            known.insert(*id, bytes.clone());
            newest = Some(*id);
        }
        for (id, want) in &known {
            match restore_bytes(&repo, *id) {
                Ok(got) if &got == want => {}
                Ok(_) => fail(step, format!("snapshot {id} restores to WRONG bytes")),
                Err(e) => fail(step, format!("snapshot {id} does not restore: {e}")),
            }
        }
        let report = check::run(&repo, Some(DataSubset::All), &NoProgress)
            .unwrap_or_else(|e| fail(step, format!("check: {e}")));
        if report.has_errors() {
            fail(
                step,
                format!(
                    "check --read-data after the power loss: {:?}",
                    report.problems
                ),
            );
        }
    }
    register_test_backend(&path, None);
    eprintln!(
        "torture (power loss): seed {seed}: {steps} steps, {crashes} power losses, {} snapshots",
        known.len()
    );
}

#[test]
fn power_loss_keeps_every_committed_snapshot_and_a_consistent_repository() {
    let seed = crate::torture::torture_seed();
    let steps = std::env::var("CBTVAULT_TORTURE_STEPS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .map(|n| (n / 10).max(20))
        .unwrap_or(40);
    power_loss_run(seed, steps);
}
