//! `demo`: a full backup, an incremental driven by a change bitmap and a
//! verified restore of a generated image, in a temporary repository.
//! (Runs against the XenServer simulator once that exists.)

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::backup::{backup_source, report, BackupOptions, Changes, SourceFacts};
use super::restore::restore_to_path;
use super::Outcome;
use crate::cli::DemoArgs;
use crate::format::bitmap;
use crate::output::{human_bytes, Ui};
use crate::repo::{InitOptions, Repository};
use crate::source::FileSource;

const BLOCK: u64 = 65536;

/// Deterministic pseudo-random bytes (BLAKE3 in XOF mode).
fn fill_random(seed: u64, buf: &mut [u8]) {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(buf);
}

/// Hash of a whole file, streamed.
pub(crate) fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open '{}'", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

pub fn run(ui: &Ui, args: &DemoArgs) -> Result<Outcome> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("cbtvault-demo-{:08x}", rand::random::<u32>()));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let result = demo_in(ui, &dir, args.size_mib.max(1));
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn demo_in(ui: &Ui, dir: &Path, size_mib: u64) -> Result<Outcome> {
    let image = dir.join("disk.img");
    let repo_path = dir.join("repo");
    let restored = dir.join("restored.img");
    let blocks = size_mib * 1024 * 1024 / BLOCK;
    ui.info(format!(
        "1. generating a {size_mib} MiB disk image (60% random data, 40% zero) in '{}'",
        dir.display()
    ));
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&image)?;
    f.set_len(blocks * BLOCK)?;
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..blocks {
        if i % 5 < 3 {
            fill_random(i, &mut buf);
            f.write_all_at(&buf, i * BLOCK)?;
        }
    }
    f.sync_all()?;

    ui.info(format!(
        "2. creating a repository at '{}'",
        repo_path.display()
    ));
    Repository::init(&repo_path, &InitOptions::default())?;
    let repo = Repository::open(&repo_path)?;
    let source_opts = BackupOptions {
        parent: None,
        full: false,
        full_every: None,
        tags: vec!["demo".into()],
    };

    ui.info("3. full backup");
    let full = {
        let _lock = repo.lock(false, "demo backup")?;
        let facts = SourceFacts {
            changes: Changes::Unknown,
            nonzero: None,
        };
        backup_source(ui, &repo, &FileSource::open(&image)?, &source_opts, facts)?
    };
    report(ui, &full);

    let changed = (blocks / 50).max(1);
    ui.info(format!(
        "4. the guest writes {changed} blocks (2%); the change bitmap marks them, as VDI.list_changed_blocks would"
    ));
    let mut bits = vec![0u8; bitmap::len_for(blocks) as usize];
    for k in 0..changed {
        let i = (k * 7919) % blocks;
        fill_random(1_000_000 + k, &mut buf);
        f.write_all_at(&buf, i * BLOCK)?;
        bitmap::set(&mut bits, i);
    }
    f.sync_all()?;
    let incremental = {
        let _lock = repo.lock(false, "demo backup")?;
        let facts = SourceFacts {
            changes: Changes::Since(bits.clone()),
            nonzero: None,
        };
        backup_source(ui, &repo, &FileSource::open(&image)?, &source_opts, facts)?
    };
    ui.info("5. incremental backup of the changed blocks only");
    report(ui, &incremental);

    ui.info(format!(
        "6. restoring the incremental to '{}'",
        restored.display()
    ));
    let map = repo.resolve(incremental.snapshot_id)?;
    let summary = {
        let _lock = repo.lock(false, "demo restore")?;
        restore_to_path(ui, &repo, incremental.snapshot_id, &map, &restored, true)?
    };
    let (a, b) = (hash_file(&image)?, hash_file(&restored)?);
    ui.info(format!(
        "7. verify: source BLAKE3 {}…, restored BLAKE3 {}… ({} in {:.2}s)",
        &a.to_hex()[..16],
        &b.to_hex()[..16],
        human_bytes(summary.disk_size_bytes),
        summary.seconds
    ));
    ui.json(&serde_json::json!({
        "full": full, "incremental": incremental, "restore": summary,
        "verified": a == b,
    }));
    if a != b {
        bail!("restored image differs from the source");
    }
    ui.info(format!(
        "demo passed: the incremental read {} of {} and the restore is bit-exact",
        human_bytes(incremental.bytes_read),
        human_bytes(full.bytes_read)
    ));
    Ok(Outcome::Ok)
}
