//! File-level restore: the objects of a snapshot's file systems that
//! match include patterns, written under a target directory through
//! `diskfs::extract::Extractor` (never outside it, never through a link on
//! disk). Each file is written under a temporary name and renamed into
//! place only after its last byte was read and verified; a file whose data
//! cannot be read is reported and left out, the others go on. Runs of
//! 64 KiB of zeros are skipped with a seek (sparse files stay sparse).
//! Modes are restored as `mode & 0o777` (set-id and sticky bits dropped),
//! modification times on files, links and directories (after their
//! contents), ownership only when asked (root). Hard links become copies.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use diskfs::extract::{ExtractError, Extractor};
use diskfs::glob::Glob;
use diskfs::{DirEntry, FileKind, FileSystem};
use thiserror::Error;

use super::{describe, show_path, walk, Disk, FilesError, PathSpec, Visit};
use crate::progress::Progress;

/// Content is read and written in pieces of this size.
const COPY_BYTES: usize = 1 << 20;
/// Runs of zeros this long (and aligned) are holes in the restored file.
const HOLE_BYTES: usize = 64 * 1024;

/// One `--include` pattern: `pN:GLOB`, or a bare `GLOB` on a disk without
/// partitions.
#[derive(Debug, Clone)]
pub struct Include {
    pub text: String,
    pub partition: Option<u32>,
    pub glob: Glob,
}

impl Include {
    pub fn parse(text: &str) -> Result<Include, FilesError> {
        let bad = |reason| FilesError::PathSyntax {
            text: text.to_string(),
            reason,
        };
        // The glob may hold characters PathSpec refuses; only the prefix
        // is shared.
        let (partition, pattern) = match text.split_once(':') {
            Some((p, rest)) if p.starts_with('p') && !text.starts_with('/') => (
                Some(
                    p[1..]
                        .parse::<u32>()
                        .map_err(|_| bad("expected pN:PATTERN"))?,
                ),
                rest,
            ),
            _ => (None, text),
        };
        if partition.is_none() && !pattern.starts_with('/') {
            return Err(bad(
                "expected pN:/PATTERN, or /PATTERN on a disk without partitions",
            ));
        }
        let glob = Glob::new(pattern.as_bytes()).map_err(|_| bad("not a valid pattern"))?;
        Ok(Include {
            text: text.to_string(),
            partition,
            glob,
        })
    }
}

/// Options of a file-level restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileRestoreOptions {
    /// Restore owners and groups (needs root).
    pub owner: bool,
}

/// An object that was not restored, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failed {
    /// `pN:/path`.
    pub path: String,
    pub message: String,
}

/// What a file-level restore did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FileRestoreSummary {
    pub file_count: u64,
    pub dir_count: u64,
    pub symlink_count: u64,
    /// Devices, FIFOs, sockets: not restored.
    pub skipped_count: u64,
    /// Content bytes of the restored files (holes included).
    pub written_bytes: u64,
    /// Objects not restored: unreadable data, hostile names, conflicts
    /// with what is on disk.
    pub failed: Vec<Failed>,
    /// Includes that matched nothing.
    pub unmatched: Vec<String>,
}

/// A failure that stops the whole restore (the target cannot be written).
#[derive(Debug, Error)]
pub enum FileRestoreError {
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("target: {0}")]
    Target(#[source] ExtractError),
}

/// Why one file's content was not restored.
enum FileFailure {
    /// Reading it from the snapshot failed (damaged block, corrupt file
    /// system): reported, the restore goes on.
    Read(String),
    /// Writing it failed (or was refused) under the target.
    Write(ExtractError),
}

/// Whether an extraction error concerns only this entry (a hostile name, a
/// conflict with what is on disk) rather than the target as a whole.
fn entry_only(e: &ExtractError) -> bool {
    !matches!(e, ExtractError::Io { .. })
}

/// Reads `src` to its end into `dst`, seeking over aligned 64 KiB runs of
/// zeros and setting the length at the end. A read failure is stored in
/// `read_failed` (the returned io::Error only stops the copy).
fn copy_sparse<R: Read + ?Sized>(
    src: &mut R,
    dst: &mut std::fs::File,
    expected: u64,
    progress: &dyn Progress,
    read_failed: &mut Option<String>,
    buf: &mut [u8],
) -> io::Result<u64> {
    let mut done = 0u64;
    // Large files are synced as they are written (small ones are not
    // worth a helper thread).
    let mut flusher =
        (expected >= super::flush::FLUSH_EVERY).then(|| super::flush::Flusher::new(&*dst));
    loop {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    *read_failed = Some(describe(&e));
                    return Err(io::Error::other("read failed"));
                }
            }
        }
        for chunk in buf[..n].chunks(HOLE_BYTES) {
            if chunk.len() == HOLE_BYTES && chunk.iter().all(|b| *b == 0) {
                dst.seek(SeekFrom::Current(HOLE_BYTES as i64))?;
            } else {
                dst.write_all(chunk)?;
            }
        }
        done += n as u64;
        progress.advance(n as u64);
        if let Some(f) = flusher.as_mut() {
            f.wrote(n as u64);
        }
        if n < buf.len() {
            break;
        }
    }
    dst.set_len(done)?;
    if done != expected {
        *read_failed = Some(format!(
            "the file system gave {done} bytes of a {expected}-byte file"
        ));
        return Err(io::Error::other("short file"));
    }
    Ok(done)
}

struct Run<'a> {
    extractor: Extractor,
    options: FileRestoreOptions,
    progress: &'a dyn Progress,
    summary: FileRestoreSummary,
    /// Directories restored, for their metadata after their contents.
    dirs: Vec<(Vec<u8>, DirEntry)>,
    /// The copy buffer, allocated once for all files.
    buf: Vec<u8>,
}

impl Run<'_> {
    fn fail(&mut self, partition: u32, path: &[u8], message: String) {
        self.summary.failed.push(Failed {
            path: show_path(partition, path),
            message,
        });
    }

    /// An extraction error: recorded for this entry, or the end of the
    /// restore when the target itself fails.
    fn extract_failed(
        &mut self,
        partition: u32,
        path: &[u8],
        e: ExtractError,
    ) -> Result<(), FileRestoreError> {
        if entry_only(&e) {
            self.fail(partition, path, e.to_string());
            Ok(())
        } else {
            Err(FileRestoreError::Target(e))
        }
    }

    fn owner(&self, rel: &[u8], e: &DirEntry) -> Result<(), ExtractError> {
        if self.options.owner {
            if let (Some(uid), Some(gid)) = (e.uid, e.gid) {
                self.extractor.set_owner(rel, uid, gid)?;
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        fs: &dyn FileSystem,
        path: &[u8],
        rel: &[u8],
        e: &DirEntry,
    ) -> Result<u64, FileFailure> {
        let mut read_failed: Option<String> = None;
        let progress = self.progress;
        let buf = &mut self.buf;
        let result = {
            let mut fill = |f: &mut std::fs::File| -> io::Result<u64> {
                let mut content = fs.open_file(path).map_err(|err| {
                    read_failed = Some(describe(&err));
                    io::Error::other("open failed")
                })?;
                copy_sparse(&mut *content, f, e.size, progress, &mut read_failed, buf)
            };
            self.extractor
                .write_file_atomic(rel, e.mode.unwrap_or(0o644), e.mtime, &mut fill)
        };
        match (result, read_failed) {
            (_, Some(why)) => Err(FileFailure::Read(why)),
            (Ok(n), None) => Ok(n),
            (Err(err), None) => Err(FileFailure::Write(err)),
        }
    }

    fn entry(
        &mut self,
        fs: &dyn FileSystem,
        partition: u32,
        path: &[u8],
        e: &DirEntry,
    ) -> Result<(), FileRestoreError> {
        let mut rel = format!("p{partition}").into_bytes();
        rel.extend_from_slice(path);
        match e.kind {
            FileKind::Dir => match self.extractor.create_dir(&rel, 0o700) {
                Ok(()) => {
                    self.summary.dir_count += 1;
                    self.dirs.push((rel, e.clone()));
                }
                Err(err) => self.extract_failed(partition, path, err)?,
            },
            FileKind::File => match self.file(fs, path, &rel, e) {
                Ok(n) => {
                    self.summary.file_count += 1;
                    self.summary.written_bytes += n;
                    if let Err(err) = self.owner(&rel, e) {
                        self.extract_failed(partition, path, err)?;
                    }
                }
                Err(FileFailure::Read(why)) => self.fail(partition, path, why),
                Err(FileFailure::Write(err)) => self.extract_failed(partition, path, err)?,
            },
            FileKind::Symlink => {
                let target = match &e.symlink_target {
                    Some(t) => Ok(t.clone()),
                    None => fs.readlink(path),
                };
                match target {
                    Err(err) => self.fail(partition, path, describe(&err)),
                    Ok(target) => {
                        let done = self
                            .extractor
                            .symlink(&rel, &target)
                            .and_then(|()| match e.mtime {
                                Some(t) => self.extractor.set_mtime(&rel, t),
                                None => Ok(()),
                            })
                            .and_then(|()| self.owner(&rel, e));
                        match done {
                            Ok(()) => self.summary.symlink_count += 1,
                            Err(err) => self.extract_failed(partition, path, err)?,
                        }
                    }
                }
            }
            FileKind::Other => self.summary.skipped_count += 1,
        }
        Ok(())
    }

    /// Directory metadata, deepest first (after their contents: a
    /// read-only directory is made read-only last).
    fn finish_dirs(&mut self) -> Result<(), FileRestoreError> {
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, e) in dirs.iter().rev() {
            let mode = e.mode.unwrap_or(0o755);
            let done = self
                .extractor
                .set_dir_mode(rel, mode)
                .and_then(|()| self.owner(rel, e))
                .and_then(|()| match e.mtime {
                    Some(t) => self.extractor.set_mtime(rel, t),
                    None => Ok(()),
                });
            match done {
                Ok(()) => {}
                Err(err) if entry_only(&err) => self.summary.failed.push(Failed {
                    path: String::from_utf8_lossy(rel).into_owned(),
                    message: err.to_string(),
                }),
                Err(err) => return Err(FileRestoreError::Target(err)),
            }
        }
        Ok(())
    }
}

/// Restores what `includes` match from `disk` under `target` (an existing
/// directory), as `target/pN/path`.
pub fn restore_files(
    disk: &Disk,
    includes: &[Include],
    target: &Path,
    options: FileRestoreOptions,
    progress: &dyn Progress,
) -> Result<FileRestoreSummary, FileRestoreError> {
    let extractor = Extractor::new(target).map_err(FileRestoreError::Target)?;
    let mut run = Run {
        extractor,
        options,
        progress,
        summary: FileRestoreSummary::default(),
        dirs: Vec::new(),
        buf: vec![0u8; COPY_BYTES],
    };
    // Partitions in the order the includes first name them.
    let mut numbers: Vec<u32> = Vec::new();
    let mut resolved: Vec<(u32, &Include)> = Vec::new();
    for inc in includes {
        let spec = PathSpec {
            partition: inc.partition,
            path: b"/".to_vec(),
        };
        let number = disk.partition(&spec)?.number;
        if !numbers.contains(&number) {
            numbers.push(number);
        }
        resolved.push((number, inc));
    }
    let mut matched = vec![false; resolved.len()];
    for number in numbers {
        let spec = PathSpec {
            partition: Some(number),
            path: b"/".to_vec(),
        };
        let fs = disk.open_fs(disk.partition(&spec)?)?;
        let mine: Vec<(usize, &Include)> = resolved
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| *n == number)
            .map(|(k, (_, inc))| (k, *inc))
            .collect();
        let descend = |dir: &[u8]| mine.iter().any(|(_, inc)| inc.glob.may_match_under(dir));
        let mut fatal: Option<FileRestoreError> = None;
        let walked = walk(
            &*fs,
            b"/",
            true,
            &descend,
            &mut |visit: Visit<'_>| match visit {
                Visit::Entry { path, entry } => {
                    let mut hit = false;
                    for (k, inc) in &mine {
                        if inc.glob.matches_or_under(path) {
                            matched[*k] = true;
                            hit = true;
                        }
                    }
                    if hit {
                        if let Err(e) = run.entry(&*fs, number, path, entry) {
                            fatal = Some(e);
                            return false;
                        }
                    }
                    true
                }
                Visit::Failed { path, error } => {
                    if mine.iter().any(|(_, inc)| inc.glob.may_match_under(path)) {
                        run.fail(number, path, describe(&error));
                    }
                    true
                }
            },
        );
        if let Some(e) = fatal {
            return Err(e);
        }
        walked.map_err(|source| FilesError::Fs {
            what: show_path(number, b"/"),
            source,
        })?;
    }
    run.finish_dirs()?;
    run.summary.unmatched = resolved
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .map(|((_, inc), _)| inc.text.clone())
        .collect();
    Ok(run.summary)
}
