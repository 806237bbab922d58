//! Synthetic repository generator for the scale benchmarks (issue 19): a
//! test helper, not a product feature. It adds valid snapshot objects to a
//! local, unencrypted repository that already holds at least one real
//! backup, every entry naming a real block of that backup, so `check`,
//! `restore`, `prune` and listings work on the result.
//!
//! ```text
//! synth_repo REPO chains SOURCES DEPTH      # SOURCES x (1 full + DEPTH-1 deltas)
//! synth_repo REPO big BLOCKS                # one full snapshot of BLOCKS entries
//! synth_repo REPO catalog ROWS              # ROWS more catalog rows
//! ```
//!
//! `chains`: each synthetic source gets a full of 64 entries, then deltas of
//! 4 entries each, layered on one another (10,000 snapshots: 100 x 100).
//! `big`: one snapshot whose disk has BLOCKS blocks, every one of them data
//! (pages name their first index, so each is its own object: about 41
//! bytes per entry, 672 KiB per page of 16,384).
//! `catalog`: ROWS rows added to the local catalog (the SQLite cache, not
//! the repository), distinct random block ids spread over the whole id
//! space, all naming the first pack: for the size of a catalog and the
//! speed of lookups and of a backup at 100 million blocks. `check` calls
//! such a repository damaged (the rows name blobs the pack does not
//! hold); it is for timing only.
//!
//! Build: `cargo build --release --example synth_repo`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cbtvault::format::snapshot::{BlockRef, ReadMode, SnapshotMeta};
use cbtvault::format::{BlockId, SnapshotId};
use cbtvault::repo::{Body, PageWriter, Repository, Snapshot};
use chrono::{Duration, Utc};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        bail!("usage: synth_repo REPO chains SOURCES DEPTH | synth_repo REPO big BLOCKS");
    }
    let repo =
        Repository::open(&PathBuf::from(&args[1])).with_context(|| format!("open {}", args[1]))?;
    if args[2] == "catalog" {
        let rows: u64 = args[3].parse()?;
        let path = repo.catalog_path().to_path_buf();
        drop(repo);
        return catalog_rows(&path, rows);
    }
    let _lock = repo.lock(false, "backup")?;
    let blocks = real_blocks(&repo)?;
    match args[2].as_str() {
        "chains" => {
            let sources: u64 = args[3].parse()?;
            let depth: u64 = args.get(4).context("DEPTH")?.parse()?;
            chains(&repo, &blocks, sources, depth)
        }
        "big" => {
            let n: u64 = args[3].parse()?;
            big(&repo, &blocks, n)
        }
        other => bail!("unknown mode {other}"),
    }
}

/// Up to 4096 distinct data blocks of the newest real snapshot.
fn real_blocks(repo: &Repository) -> Result<Vec<BlockId>> {
    let newest = repo
        .snapshots()?
        .into_iter()
        .max_by_key(|s| s.meta.time)
        .context("the repository needs one real backup first")?;
    let mut out = Vec::new();
    for b in repo.chain_reader(newest.meta.id)?.blocks() {
        let (_, id) = b?;
        if !out.contains(&id) {
            out.push(id);
        }
        if out.len() == 4096 {
            break;
        }
    }
    if out.is_empty() {
        bail!("the newest snapshot holds no data block");
    }
    Ok(out)
}

fn meta(
    source: &str,
    blocks: u64,
    parent: Option<SnapshotId>,
    set: Option<SnapshotId>,
    age: i64,
) -> SnapshotMeta {
    let id = SnapshotId(rand::random());
    SnapshotMeta {
        id,
        generation: 0,
        time: Utc::now() - Duration::seconds(age),
        hostname: "synth".into(),
        source: source.into(),
        disk_size_bytes: blocks * 65536,
        block_size: 65536,
        parent,
        backup_set: set.unwrap_or(id),
        tags: vec!["synthetic".into()],
        landmark: Default::default(),
        read_mode: if parent.is_some() {
            ReadMode::ChangedBlocks
        } else {
            ReadMode::All
        },
        new_set_reason: parent.is_none().then(|| "first backup".into()),
    }
}

/// Writes `entries` (ascending) as pages and commits the snapshot.
fn commit(repo: &Repository, meta: SnapshotMeta, entries: Vec<(u64, BlockRef)>) -> Result<()> {
    let mut w = PageWriter::new(repo, false);
    let pb = w.page_blocks();
    let mut page: Vec<(u64, BlockRef)> = Vec::new();
    let mut page_no = 0;
    for (index, r) in entries {
        if index / pb != page_no && !page.is_empty() {
            w.add(page_no, std::mem::take(&mut page), None)?;
        }
        page_no = index / pb;
        page.push((index, r));
    }
    if !page.is_empty() {
        w.add(page_no, page, None)?;
    }
    let snapshot = Snapshot {
        meta,
        body: Body::Paged(w.finish()),
    };
    repo.commit_snapshot(&snapshot)?;
    Ok(())
}

fn chains(repo: &Repository, blocks: &[BlockId], sources: u64, depth: u64) -> Result<()> {
    const DISK_BLOCKS: u64 = 1 << 20; // a 64 GiB disk
    for s in 0..sources {
        let source = format!("synthetic:disk-{s:05}");
        let mut parent: Option<SnapshotId> = None;
        let mut set = None;
        for d in 0..depth {
            let n = if d == 0 { 64 } else { 4 };
            let mut entries: Vec<(u64, BlockRef)> = (0..n)
                .map(|k| {
                    let index = (s * 7919 + d * 104_729 + k * 16_411) % DISK_BLOCKS;
                    let b = blocks[((s + d + k) as usize) % blocks.len()];
                    (index, BlockRef::Data(b))
                })
                .collect();
            entries.sort_by_key(|e| e.0);
            entries.dedup_by_key(|e| e.0);
            let m = meta(&source, DISK_BLOCKS, parent, set, (depth - d) as i64 * 3600);
            let id = m.id;
            commit(repo, m, entries)?;
            set.get_or_insert(id);
            parent = Some(id);
        }
        eprintln!("source {s}: {depth} snapshots");
    }
    Ok(())
}

fn big(repo: &Repository, blocks: &[BlockId], n: u64) -> Result<()> {
    let m = meta("synthetic:big", n, None, None, 0);
    let mut w = PageWriter::new(repo, false);
    let pb = w.page_blocks();
    for page_no in 0..n.div_ceil(pb) {
        let lo = page_no * pb;
        let hi = (lo + pb).min(n);
        let entries: Vec<(u64, BlockRef)> = (lo..hi)
            .map(|i| {
                let b = blocks[(i as usize) % blocks.len()];
                (i, BlockRef::Data(b))
            })
            .collect();
        w.add(page_no, entries, None)?;
        if page_no % 512 == 0 {
            eprintln!("page {page_no}");
        }
    }
    repo.commit_snapshot(&Snapshot {
        meta: m,
        body: Body::Paged(w.finish()),
    })?;
    Ok(())
}

/// Appends `rows` catalog rows in key order (one transaction; ids ascend,
/// so SQLite appends to its B-tree instead of splitting pages at random).
fn catalog_rows(path: &std::path::Path, rows: u64) -> Result<()> {
    let mut conn =
        rusqlite::Connection::open(path).with_context(|| format!("{}", path.display()))?;
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")?;
    let pack: i64 = conn.query_row("SELECT min(pack_id) FROM packs", [], |r| r.get(0))?;
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare(
            "INSERT OR IGNORE INTO blocks(block_id, pack_id, offset, stored_length, raw_length) VALUES (?1, ?2, ?3, 65536, 65536)",
        )?;
        let slot = u64::MAX / rows.max(1);
        for i in 0..rows {
            let mut id: [u8; 32] = rand::random();
            let prefix = i * slot + rand::random::<u64>() % slot.max(1);
            id[..8].copy_from_slice(&prefix.to_be_bytes());
            stmt.execute(rusqlite::params![&id[..], pack, (i % (1 << 20)) * 65536])?;
            if i % 10_000_000 == 0 && i > 0 {
                eprintln!("{i} rows");
            }
        }
    }
    tx.commit()?;
    Ok(())
}
