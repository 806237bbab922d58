//! File-level restore: `ls`, `dump`, `find` and `restore --include`, over
//! the file systems of a snapshot (`crate::files`), read block by block
//! from the packs; nothing is restored to disk first.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use chrono::DateTime;
use diskfs::glob::Glob;
use diskfs::{DirEntry, FileKind, FileSystem, Timestamp};
use serde::Serialize;

use super::restore::{select, RestoreOptions};
use super::{pick_snapshot, Outcome, SnapshotFilter};
use crate::files::restore::{restore_files, FileRestoreOptions, FileRestoreSummary, Include};
use crate::files::tar::{EntryType, Header, TarWriter};
use crate::files::{describe, show_path, walk, Disk, PathSpec, Visit};
use crate::format::SnapshotId;
use crate::output::{human_bytes, plural, Ui};
use crate::progress::Progress;
use crate::repo::random::SnapshotReader;
use crate::repo::{Repository, SnapshotEntry};

/// Validated options of `ls`.
pub struct LsOptions {
    pub snapshot: String,
    pub filter: SnapshotFilter,
    /// `None`: the partitions.
    pub path: Option<PathSpec>,
    pub long: bool,
    pub recursive: bool,
}

/// Validated options of `dump`.
pub struct DumpOptions {
    pub snapshot: String,
    pub filter: SnapshotFilter,
    pub path: PathSpec,
}

/// What `find` looks for.
pub enum FindPattern {
    /// No `/`: a glob over file names, at any depth of every partition.
    Name { text: String, glob: Glob },
    /// With a `/`: a glob over whole paths, of one partition (`pN:`) or
    /// of every one.
    Path {
        text: String,
        partition: Option<u32>,
        glob: Glob,
    },
}

impl FindPattern {
    pub fn parse(text: &str) -> Result<FindPattern> {
        if !text.contains('/') {
            let glob = Glob::new(format!("/**/{text}").as_bytes())
                .with_context(|| format!("pattern '{text}'"))?;
            return Ok(FindPattern::Name {
                text: text.to_string(),
                glob,
            });
        }
        let (partition, pattern) = match text.split_once(':') {
            Some((p, rest)) if p.starts_with('p') && !text.starts_with('/') => {
                let n = p[1..]
                    .parse::<u32>()
                    .with_context(|| format!("pattern '{text}': expected pN:/PATTERN"))?;
                (Some(n), rest)
            }
            _ => (None, text),
        };
        let glob = Glob::new(pattern.as_bytes()).with_context(|| format!("pattern '{text}'"))?;
        Ok(FindPattern::Path {
            text: text.to_string(),
            partition,
            glob,
        })
    }

    fn text(&self) -> &str {
        match self {
            FindPattern::Name { text, .. } | FindPattern::Path { text, .. } => text,
        }
    }

    fn partition(&self) -> Option<u32> {
        match self {
            FindPattern::Name { .. } => None,
            FindPattern::Path { partition, .. } => *partition,
        }
    }

    fn glob(&self) -> &Glob {
        match self {
            FindPattern::Name { glob, .. } | FindPattern::Path { glob, .. } => glob,
        }
    }
}

/// Validated options of `find`.
pub struct FindOptions {
    pub snapshots: Vec<String>,
    pub filter: SnapshotFilter,
    pub pattern: FindPattern,
}

/// `restore --include`: where and what.
pub struct FileRestoreTarget {
    /// The directory files are restored into (created if missing).
    pub dir: PathBuf,
    pub includes: Vec<Include>,
    /// Restore into a non-empty directory.
    pub overwrite: bool,
}

/// One partition, as `ls` prints it.
#[derive(Serialize)]
struct PartitionItem {
    partition_number: u32,
    partition_type: String,
    type_name: Option<&'static str>,
    partition_name: Option<String>,
    start_bytes: u64,
    size_bytes: u64,
    file_system: &'static str,
    supported: bool,
}

/// One object of a file system, as `ls` and `find` print it.
#[derive(Serialize)]
struct FileItem {
    /// `pN:/path`.
    path: String,
    name: String,
    kind: &'static str,
    size_bytes: u64,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    modified_time: Option<String>,
    symlink_target: Option<String>,
}

#[derive(Serialize)]
struct FoundItem {
    snapshot_id: SnapshotId,
    #[serde(flatten)]
    file: FileItem,
}

fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::Other => "other",
    }
}

fn time_text(t: Timestamp) -> Option<DateTime<chrono::Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos)
}

fn file_item(partition: u32, path: &[u8], e: &DirEntry) -> FileItem {
    FileItem {
        path: show_path(partition, path),
        name: e.display_name(),
        kind: kind_name(e.kind),
        size_bytes: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        modified_time: e.mtime.and_then(time_text).map(|t| crate::json::time(&t)),
        symlink_target: e
            .symlink_target
            .as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
    }
}

/// `drwxr-xr-x`-style text of a mode (or of the kind alone).
fn mode_text(e: &DirEntry) -> String {
    let t = match e.kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::File => '-',
        FileKind::Other => '?',
    };
    let Some(mode) = e.mode else {
        return format!("{t}?????????");
    };
    let mut s = String::from(t);
    for (bit, c) in [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ] {
        s.push(if mode & bit != 0 { c } else { '-' });
    }
    s
}

fn long_line(shown: &str, e: &DirEntry) -> String {
    let owner = match (e.uid, e.gid) {
        (Some(u), Some(g)) => format!("{u}/{g}"),
        _ => "-".to_string(),
    };
    let time = e.mtime.and_then(time_text).map_or("-".to_string(), |t| {
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    });
    let link = e
        .symlink_target
        .as_ref()
        .map(|t| format!(" -> {}", String::from_utf8_lossy(t)))
        .unwrap_or_default();
    format!(
        "{} {:>11} {:>14} {time} {shown}{link}",
        mode_text(e),
        owner,
        e.size
    )
}

/// The snapshot a query names, its reader and its disk's partition table,
/// under a shared lock (returned).
fn open_disk(
    repo: Repository,
    query: &str,
    filter: &SnapshotFilter,
    command: &str,
) -> Result<(SnapshotEntry, Disk, crate::repo::LockGuard)> {
    let entry = pick_snapshot(&repo, query, filter)?;
    let lock = repo.lock(false, command)?;
    let disk = open_entry(Arc::new(repo), &entry)?;
    Ok((entry, disk, lock))
}

fn open_entry(repo: Arc<Repository>, entry: &SnapshotEntry) -> Result<Disk> {
    let id = entry.meta.id;
    let reader = SnapshotReader::open(repo, id).with_context(|| format!("open snapshot {id}"))?;
    Disk::open(Arc::new(reader)).with_context(|| format!("snapshot {id}"))
}

#[derive(Serialize)]
struct LsPartitionsDone {
    snapshot_id: SnapshotId,
    partition_scheme: &'static str,
    partition_count: usize,
}

#[derive(Serialize)]
struct LsDone {
    snapshot_id: SnapshotId,
    path: String,
    entry_count: u64,
    error_count: u64,
}

pub fn ls(ui: &Ui, repo: Repository, options: &LsOptions) -> Result<Outcome> {
    let (entry, disk, _lock) = open_disk(repo, &options.snapshot, &options.filter, "ls")?;
    let id = entry.meta.id;
    let Some(spec) = &options.path else {
        let mut rows = Vec::new();
        for p in &disk.table.partitions {
            let fs = if p.fs.is_supported() {
                p.fs.name().to_string()
            } else if p.fs == diskfs::FsType::Unknown {
                "unknown (not readable)".to_string()
            } else {
                format!("{} (not supported)", p.fs.name())
            };
            rows.push(vec![
                format!("p{}", p.number),
                p.partition_type.to_string(),
                p.start_bytes.to_string(),
                human_bytes(p.size_bytes),
                fs,
            ]);
            ui.item(
                "partition",
                &PartitionItem {
                    partition_number: p.number,
                    partition_type: p.partition_type.to_string(),
                    type_name: p.partition_type.name(),
                    partition_name: p.name.clone(),
                    start_bytes: p.start_bytes,
                    size_bytes: p.size_bytes,
                    file_system: p.fs.name(),
                    supported: p.fs.is_supported(),
                },
            );
        }
        ui.info(format!(
            "snapshot {} of '{}': partition table {}",
            id.short(),
            entry.meta.source,
            disk.scheme_name()
        ));
        ui.table(
            &["partition", "type", "start", "size", "file system"],
            &rows,
        );
        ui.summary(&LsPartitionsDone {
            snapshot_id: id,
            partition_scheme: disk.scheme_name(),
            partition_count: disk.table.partitions.len(),
        });
        return Ok(Outcome::Ok);
    };
    let part = disk.partition(spec)?;
    let number = part.number;
    let fs = disk.open_fs(part)?;
    let root = spec.path.clone();
    let shown_root = show_path(number, &root);
    let (mut entries, mut errors) = (0u64, 0u64);
    let top_is_dir = fs
        .stat(&root)
        .map(|e| e.kind == FileKind::Dir)
        .map_err(|e| anyhow::anyhow!("{shown_root}: {}", describe(&e)))?;
    let result = walk(
        &*fs,
        &root,
        options.recursive,
        &|_: &[u8]| true,
        &mut |visit: Visit<'_>| {
            match visit {
                Visit::Entry { path, entry } => {
                    entries += 1;
                    ui.item("file", &file_item(number, path, entry));
                    let shown = if options.recursive || !top_is_dir {
                        show_path(number, path)
                    } else {
                        let mut name = entry.display_name();
                        if entry.kind == FileKind::Dir {
                            name.push('/');
                        }
                        name
                    };
                    if options.long {
                        ui.print(long_line(&shown, entry));
                    } else {
                        ui.print(shown);
                    }
                }
                Visit::Failed { path, error } => {
                    errors += 1;
                    ui.error(format!("{}: {}", show_path(number, path), describe(&error)));
                }
            }
            true
        },
    );
    result.map_err(|e| anyhow::anyhow!("{shown_root}: {}", describe(&e)))?;
    ui.summary(&LsDone {
        snapshot_id: id,
        path: shown_root,
        entry_count: entries,
        error_count: errors,
    });
    Ok(if errors > 0 {
        Outcome::IntegrityProblem
    } else {
        Outcome::Ok
    })
}

#[derive(Serialize)]
struct DumpDone {
    snapshot_id: SnapshotId,
    path: String,
    kind: &'static str,
    entry_count: u64,
    written_bytes: u64,
}

/// Copies a file's content to `out` in 1 MiB pieces.
fn copy_content(
    fs: &dyn FileSystem,
    path: &[u8],
    expected: u64,
    mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
    progress: &dyn Progress,
) -> Result<u64> {
    let mut content = fs
        .open_file(path)
        .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("{}", describe(&e)),
        };
        out(&buf[..n]).context("write to stdout")?;
        done += n as u64;
        progress.advance(n as u64);
    }
    if done != expected {
        bail!("the file system gave {done} bytes of a {expected}-byte file");
    }
    Ok(done)
}

pub fn dump(ui: &Ui, repo: Repository, options: &DumpOptions) -> Result<Outcome> {
    // stdout carries the data: JSON messages go to stderr.
    let ui = &ui.with_json_on_stderr();
    let (entry, disk, _lock) = open_disk(repo, &options.snapshot, &options.filter, "dump")?;
    let part = disk.partition(&options.path)?;
    let number = part.number;
    let fs = disk.open_fs(part)?;
    let root = &options.path.path;
    let shown_root = show_path(number, root);
    let top = fs
        .stat(root)
        .map_err(|e| anyhow::anyhow!("{shown_root}: {}", describe(&e)))?;
    let bar = ui.progress("dump", true);
    let stdout = std::io::stdout();
    // Redirected to a file, the data is synced as it goes (write-behind).
    let flusher = crate::files::flush::Flusher::new(&stdout);
    let mut out = crate::files::flush::WriteBehind::new(
        std::io::BufWriter::with_capacity(1 << 20, stdout.lock()),
        flusher,
    );
    let (kind, entries, written) = match top.kind {
        FileKind::File => {
            bar.set_total(top.size);
            let n = copy_content(&*fs, root, top.size, |b| out.write_all(b), &bar)
                .with_context(|| format!("file {shown_root}"))?;
            out.flush().context("write to stdout")?;
            ("file", 1, n)
        }
        FileKind::Dir => {
            let (entries, written) = dump_tar(&*fs, number, root, &mut out, &bar)?;
            ("dir", entries, written)
        }
        FileKind::Symlink | FileKind::Other => {
            bail!("{shown_root}: not a regular file or a directory")
        }
    };
    drop(out);
    bar.finish();
    ui.summary(&DumpDone {
        snapshot_id: entry.meta.id,
        path: shown_root,
        kind,
        entry_count: entries,
        written_bytes: written,
    });
    Ok(Outcome::Ok)
}

/// Writes the tree at `root` as a tar stream, names relative to `root`'s
/// parent (`dump p1:/etc` gives `etc/`, `etc/passwd`, ...). A file that
/// cannot be read stops the stream (a tar member is never padded with
/// bytes that are not the file's).
fn dump_tar(
    fs: &dyn FileSystem,
    number: u32,
    root: &[u8],
    out: &mut dyn Write,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let base_len = match root.iter().rposition(|b| *b == b'/') {
        Some(i) => i + 1,
        None => 0,
    };
    let mut tar = TarWriter::new(out);
    let (mut entries, mut written) = (0u64, 0u64);
    let mut failure: Option<anyhow::Error> = None;
    let top = fs
        .stat(root)
        .map_err(|e| anyhow::anyhow!("{}: {}", show_path(number, root), describe(&e)))?;
    let mut emit = |path: &[u8], e: &DirEntry| -> Result<()> {
        let name: &[u8] = if path.len() > base_len {
            &path[base_len..]
        } else {
            b"."
        };
        let kind = match e.kind {
            FileKind::File => EntryType::File,
            FileKind::Dir => EntryType::Dir,
            FileKind::Symlink => EntryType::Symlink,
            FileKind::Other => return Ok(()),
        };
        let link = e.symlink_target.clone().unwrap_or_default();
        let default_mode = if e.kind == FileKind::Dir {
            0o755
        } else {
            0o644
        };
        tar.header(&Header {
            name,
            kind,
            size_bytes: e.size,
            mode: e.mode.unwrap_or(default_mode),
            uid: e.uid.unwrap_or(0),
            gid: e.gid.unwrap_or(0),
            mtime_seconds: e.mtime.map_or(0, |t| t.seconds),
            link_target: &link,
        })
        .context("write to stdout")?;
        if kind == EntryType::File {
            written += copy_content(fs, path, e.size, |b| tar.write_content(b), progress)
                .with_context(|| format!("file {}", show_path(number, path)))?;
            tar.finish_entry().context("write to stdout")?;
        }
        entries += 1;
        Ok(())
    };
    emit(root, &top)?;
    let walked = walk(
        fs,
        root,
        true,
        &|_: &[u8]| true,
        &mut |visit: Visit<'_>| match visit {
            Visit::Entry { path, entry } => match emit(path, entry) {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            },
            Visit::Failed { path, error } => {
                failure = Some(anyhow::anyhow!(
                    "{}: {}",
                    show_path(number, path),
                    describe(&error)
                ));
                false
            }
        },
    );
    if let Some(e) = failure {
        return Err(e.context("dump stopped; the tar stream on stdout is incomplete"));
    }
    walked.map_err(|e| anyhow::anyhow!("{}: {}", show_path(number, root), describe(&e)))?;
    tar.finish().context("write to stdout")?;
    Ok((entries, written))
}

#[derive(Serialize)]
struct FindDone {
    pattern: String,
    snapshot_count: usize,
    match_count: u64,
    error_count: u64,
}

pub fn find(ui: &Ui, repo: Repository, options: &FindOptions) -> Result<Outcome> {
    let mut entries = Vec::new();
    for q in &options.snapshots {
        let e = pick_snapshot(&repo, q, &options.filter)?;
        if !entries
            .iter()
            .any(|x: &SnapshotEntry| x.meta.id == e.meta.id)
        {
            entries.push(e);
        }
    }
    let _lock = repo.lock(false, "find")?;
    let repo = Arc::new(repo);
    let glob = options.pattern.glob();
    let (mut matches, mut errors) = (0u64, 0u64);
    for entry in &entries {
        let id = entry.meta.id;
        let disk = open_entry(repo.clone(), entry)?;
        let mut found_here = 0u64;
        for p in &disk.table.partitions {
            if options.pattern.partition().is_some_and(|n| n != p.number) {
                continue;
            }
            if !p.fs.is_supported() {
                if options.pattern.partition().is_some() {
                    disk.open_fs(p)?;
                }
                continue;
            }
            let fs = match disk.open_fs(p) {
                Ok(fs) => fs,
                Err(e) => {
                    errors += 1;
                    ui.error(format!("snapshot {}: {e}", id.short()));
                    continue;
                }
            };
            let number = p.number;
            let walked = walk(
                &*fs,
                b"/",
                true,
                &|dir: &[u8]| glob.may_match_under(dir),
                &mut |visit: Visit<'_>| {
                    match visit {
                        Visit::Entry { path, entry: e } => {
                            if glob.matches(path) {
                                matches += 1;
                                found_here += 1;
                                ui.item(
                                    "found",
                                    &FoundItem {
                                        snapshot_id: id,
                                        file: file_item(number, path, e),
                                    },
                                );
                                ui.print(format!(
                                    "{}  {}",
                                    id.short(),
                                    long_line(&show_path(number, path), e)
                                ));
                            }
                        }
                        Visit::Failed { path, error } => {
                            errors += 1;
                            ui.error(format!(
                                "snapshot {}: {}: {}",
                                id.short(),
                                show_path(number, path),
                                describe(&error)
                            ));
                        }
                    }
                    true
                },
            );
            if let Err(e) = walked {
                errors += 1;
                ui.error(format!(
                    "snapshot {}: {}: {}",
                    id.short(),
                    show_path(number, b"/"),
                    describe(&e)
                ));
            }
        }
        ui.detail(1, format!("snapshot {}: {found_here} matches", id.short()));
    }
    ui.summary(&FindDone {
        pattern: options.pattern.text().to_string(),
        snapshot_count: entries.len(),
        match_count: matches,
        error_count: errors,
    });
    Ok(if errors > 0 {
        Outcome::IntegrityProblem
    } else {
        Outcome::Ok
    })
}

#[derive(Serialize)]
struct FileRestoreDone<'a> {
    snapshot_id: SnapshotId,
    target: &'a str,
    complete: bool,
    #[serde(flatten)]
    summary: &'a FileRestoreSummary,
}

/// `restore SNAPSHOT --include PATTERN... --target DIR`.
pub fn restore(
    ui: &Ui,
    repo: Repository,
    options: &RestoreOptions,
    target: &FileRestoreTarget,
) -> Result<Outcome> {
    let entry = select(&repo, options)?;
    let dir = &target.dir;
    let shown = dir.display().to_string();
    match std::fs::read_dir(dir) {
        Ok(mut list) => {
            if list.next().is_some() && !target.overwrite {
                bail!("--target '{shown}' is not empty; give an empty or new directory, or --overwrite to restore into it (files and links of the same names are replaced, never followed)");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("create '{shown}'"))?;
        }
        Err(e) => return Err(e).with_context(|| format!("--target '{shown}'")),
    }
    let _lock = repo.lock(false, "restore")?;
    let disk = open_entry(Arc::new(repo), &entry)?;
    let id = entry.meta.id;
    ui.detail(
        1,
        format!(
            "restoring files of snapshot {} of '{}' into '{shown}'",
            id.short(),
            entry.meta.source
        ),
    );
    let bar = ui.progress("restore", true);
    let restore_options = FileRestoreOptions {
        owner: rustix::process::geteuid().is_root(),
    };
    let summary = restore_files(&disk, &target.includes, dir, restore_options, &bar)
        .with_context(|| format!("restore files of snapshot {id} into '{shown}'"))?;
    bar.finish();
    for inc in &summary.unmatched {
        ui.warn(format!("--include '{inc}' matched nothing"));
    }
    for f in &summary.failed {
        ui.error(format!("{}: {} (not restored)", f.path, f.message));
    }
    ui.summary(&FileRestoreDone {
        snapshot_id: id,
        target: &shown,
        complete: summary.failed.is_empty(),
        summary: &summary,
    });
    ui.info(format!(
        "restored {}, {}, {} ({}) of snapshot {} into '{shown}'{}",
        plural(summary.file_count, "file"),
        plural(summary.dir_count, "dir"),
        plural(summary.symlink_count, "symlink"),
        human_bytes(summary.written_bytes),
        id.short(),
        if summary.failed.is_empty() {
            String::new()
        } else {
            format!("; {} NOT restored", plural(summary.failed.len(), "object"))
        }
    ));
    Ok(if summary.failed.is_empty() {
        Outcome::Ok
    } else {
        Outcome::IntegrityProblem
    })
}
