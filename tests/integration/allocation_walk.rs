//! A full backup that reads while the source's allocation map is still
//! being walked (`backup::run` with an `AllocationWalk`, as a full of an NBD
//! export with `base:allocation` runs): what the walk names is read and
//! stored, everything else is zero, whatever shape the walk's ranges have;
//! a walk that fails commits nothing and its error is the one reported; a
//! read that fails stops the walk.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use cbtvault::progress::NoProgress;
use cbtvault::repo::backup::plan::{self, PlanOptions, SourceDisk};
use cbtvault::repo::backup::{self, OnRanges, PipelineOptions};
use cbtvault::repo::restore::{self, RestoreOptions};

use crate::util::VecSink;
use cbtvault::repo::{InitOptions, RepoError, Repository};
use cbtvault::source::{BlockSource, Changes, FileSource, SourceError};

const BS: u64 = 65536;
const BLOCKS: u64 = 40;

/// A disk of `BLOCKS` blocks, every block distinct and non-zero; the last
/// one partial.
fn image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let len = (BLOCKS * BS - 1000) as usize;
    let bytes: Vec<u8> = (0..len)
        .map(|i| ((i / 4093) as u8) ^ (i as u8).wrapping_mul(31) | 1)
        .collect();
    let path = dir.join("disk.img");
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn repo(dir: &Path) -> Repository {
    let path = dir.join("repo");
    Repository::init(
        &path,
        &InitOptions {
            pack_size_target_bytes: 256 << 10,
            ..InitOptions::default()
        },
    )
    .unwrap();
    Repository::open(&path).unwrap()
}

/// One full backup of `source`, its allocation walked by `walk`.
fn full(
    repo: &Repository,
    source: &dyn BlockSource,
    walk: backup::AllocationWalk<'_>,
) -> Result<backup::BackupSummary, RepoError> {
    let _lock = repo.lock(false, "backup")?;
    let disk = SourceDisk {
        identity: source.identity(),
        size_bytes: source.size_bytes(),
        changes: Changes::Unknown,
        allocated: None,
        allocation_streamed: true,
    };
    let plan = plan::plan(
        plan::ParentLookup::NewSet {
            reason: "first backup of this source".into(),
            lost: false,
        },
        disk,
        repo.config().block_size,
        &PlanOptions::default(),
    );
    assert!(plan.streamed && plan.read.is_none());
    let options = PipelineOptions {
        batch_blocks: 4,
        ..PipelineOptions::from_repo(repo)
    };
    backup::run(repo, source, plan, &options, &NoProgress, Some(walk))
}

fn restored(repo: &Repository, id: cbtvault::format::SnapshotId) -> Vec<u8> {
    let reader = repo.chain_reader(id).unwrap();
    let mut sink = VecSink(Vec::new());
    restore::run(
        repo,
        reader,
        &mut sink,
        RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    sink.0
}

#[test]
fn what_the_walk_names_is_stored_and_the_rest_is_zero_whatever_its_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = image(dir.path());
    let repo = repo(dir.path());
    let source = FileSource::open(&path).unwrap();
    let size = bytes.len() as u64;
    // Windows as a server may give them: unaligned ranges sharing a block
    // (3), a range inside an already named block (5 again), empty ranges,
    // a range past the end of the disk, the partial last block.
    let windows: Vec<Vec<(u64, u64)>> = vec![
        vec![(0, 100), (3 * BS + 10, 20)],
        vec![(3 * BS + 100, BS), (5 * BS, 2 * BS)],
        vec![],
        vec![(5 * BS + 7, 1), (9 * BS, 0)],
        vec![(12 * BS, 5 * BS)],
        vec![((BLOCKS - 1) * BS + 3, 1), (size + BS, BS)],
    ];
    let calls = AtomicUsize::new(0);
    let walk = |f: &mut OnRanges<'_>| -> Result<(), SourceError> {
        for w in &windows {
            calls.fetch_add(1, Ordering::Relaxed);
            if !f(w) {
                break;
            }
        }
        Ok(())
    };
    let summary = full(&repo, &source, &walk).unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), windows.len());
    let named: Vec<u64> = vec![0, 3, 4, 5, 6, 12, 13, 14, 15, 16, BLOCKS - 1];
    assert_eq!(summary.blocks_read, named.len() as u64);
    assert_eq!(summary.blocks_zero, BLOCKS - named.len() as u64);
    let mut want = vec![0u8; bytes.len()];
    for b in &named {
        let lo = (b * BS) as usize;
        let hi = (lo + BS as usize).min(bytes.len());
        want[lo..hi].copy_from_slice(&bytes[lo..hi]);
    }
    let mut got = restored(&repo, summary.snapshot_id);
    got.resize(bytes.len(), 0);
    assert!(
        got == want,
        "the restored disk differs from the walked blocks"
    );
    let report = cbtvault::repo::check::run(
        &repo,
        Some(cbtvault::repo::check::DataSubset::All),
        &NoProgress,
    )
    .unwrap();
    assert!(!report.has_errors(), "{:?}", report.problems);
}

#[test]
fn a_walk_that_goes_back_past_blocks_it_did_not_name_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = image(dir.path());
    let repo = repo(dir.path());
    let source = FileSource::open(&path).unwrap();
    // Block 2 comes after block 6: it was passed as zero.
    let walk = |f: &mut OnRanges<'_>| -> Result<(), SourceError> {
        f(&[(0, BS), (6 * BS, BS)]);
        f(&[(2 * BS, 10)]);
        Ok(())
    };
    let err = full(&repo, &source, &walk).unwrap_err();
    assert!(
        err.to_string().contains("went back to byte 131072"),
        "{err}"
    );
    assert!(
        repo.snapshots().unwrap().is_empty(),
        "a snapshot was committed"
    );
}

#[test]
fn a_walk_that_fails_commits_nothing_and_names_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = image(dir.path());
    let repo = repo(dir.path());
    let source = FileSource::open(&path).unwrap();
    // Two windows of data (read, hashed, maybe packed), then the server
    // fails.
    let walk = |f: &mut OnRanges<'_>| -> Result<(), SourceError> {
        f(&[(0, 8 * BS)]);
        f(&[(10 * BS, 8 * BS)]);
        Err(SourceError::Invalid {
            source_name: "disk".into(),
            reason: "block status (base:allocation): server went away at byte 1234".into(),
        })
    };
    let err = full(&repo, &source, &walk).unwrap_err();
    assert!(
        err.to_string().contains("server went away at byte 1234"),
        "{err}"
    );
    assert!(
        repo.snapshots().unwrap().is_empty(),
        "a snapshot was committed"
    );
}

/// A source whose reads fail from block `fail_from` on.
struct Failing {
    inner: FileSource,
    fail_from: u64,
}

impl BlockSource for Failing {
    fn identity(&self) -> &str {
        self.inner.identity()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if offset + buf.len() as u64 > self.fail_from * BS {
            return Err(SourceError::Invalid {
                source_name: "disk".into(),
                reason: format!("read from byte {offset}: injected failure"),
            });
        }
        self.inner.read_at(offset, buf)
    }
}

#[test]
fn a_read_that_fails_stops_the_walk_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = image(dir.path());
    let repo = repo(dir.path());
    let source = Failing {
        inner: FileSource::open(&path).unwrap(),
        fail_from: 6,
    };
    // A map that goes on (each window a millisecond apart, past the disk's
    // blocks after the first 40): only the failed read can end it.
    let walk = |f: &mut OnRanges<'_>| -> Result<(), SourceError> {
        for b in 0u64..10_000 {
            if !f(&[(b * BS, BS)]) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the walk was never stopped");
    };
    let err = full(&repo, &source, &walk).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(
        repo.snapshots().unwrap().is_empty(),
        "a snapshot was committed"
    );
}
