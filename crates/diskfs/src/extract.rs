//! Writing entries from an image under a target directory without ever
//! writing outside it.
//!
//! Entry paths are relative, `/`-separated byte strings; `..`, `.`, empty
//! components, a leading `/` and NUL are refused ([`check_entry_path`],
//! pure). The writer ([`Extractor`]) walks from an open handle on the target
//! one component at a time with `openat(O_NOFOLLOW | O_DIRECTORY)` and
//! creates missing directories with `mkdirat`, so a symlink already on disk
//! under the target (planted or restored earlier) is never traversed: it is
//! [`ExtractError::SymlinkOnDisk`]. Files are created with `O_EXCL |
//! O_NOFOLLOW` after unlinking a previous non-directory, so neither a
//! symlink nor a hard link at the destination is written through. Symlinks
//! from the image are recreated verbatim with `symlinkat` and never
//! followed. Permission bits are applied as `mode & 0o777` (set-id and
//! sticky bits dropped); a caller restoring read-only directories should
//! set their modes after their contents.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::error::show;
use crate::fs::Timestamp;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    #[error("entry path '{path}' refused: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("'{path}' under the target is a symbolic link on disk; not followed")]
    SymlinkOnDisk { path: String },
    #[error("'{path}' under the target exists and is not a directory")]
    NotADirectoryOnDisk { path: String },
    #[error("'{path}' under the target is a directory; not replaced by a file or link")]
    IsADirectoryOnDisk { path: String },
    #[error("'{path}': {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The components of an entry path, or why it may not be extracted.
pub fn check_entry_path(path: &[u8]) -> Result<Vec<&[u8]>, ExtractError> {
    let refuse = |reason| ExtractError::InvalidPath {
        path: show(path),
        reason,
    };
    if path.is_empty() {
        return Err(refuse("empty"));
    }
    if path.contains(&0) {
        return Err(refuse("contains a NUL byte"));
    }
    if path.starts_with(b"/") {
        return Err(refuse("absolute"));
    }
    let path = path.strip_suffix(b"/").unwrap_or(path);
    path.split(|b| *b == b'/')
        .map(|c| match c {
            b"" => Err(refuse("empty component")),
            b"." | b".." => Err(refuse("'.' or '..' component")),
            c => Ok(c),
        })
        .collect()
}

/// Where `path` lands under `target` (checked, not touched).
pub fn destination(target: &Path, path: &[u8]) -> Result<PathBuf, ExtractError> {
    let mut out = target.to_path_buf();
    for c in check_entry_path(path)? {
        out.push(OsStr::from_bytes(c));
    }
    Ok(out)
}

/// Writes entries under one target directory.
pub struct Extractor {
    root: OwnedFd,
    /// The directory opened last (its components and handle): entries
    /// come directory by directory, so most need no walk from the root.
    /// A handle reached by a safe walk stays valid for this run; the
    /// extractor never removes or replaces a directory.
    last_dir: std::sync::Mutex<Option<OpenDir>>,
}

/// A directory under the target (its components) and its open handle.
type OpenDir = (Vec<Vec<u8>>, Arc<OwnedFd>);

fn io_err(path: &[u8], e: impl Into<io::Error>) -> ExtractError {
    ExtractError::Io {
        path: show(path),
        source: e.into(),
    }
}

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC);

fn timestamps(t: Timestamp) -> Timestamps {
    let ts = Timespec {
        tv_sec: t.seconds,
        tv_nsec: t.nanos.min(999_999_999).into(),
    };
    Timestamps {
        last_access: ts,
        last_modification: ts,
    }
}

fn perm(mode: u32) -> Mode {
    Mode::from_bits_truncate(mode & 0o777)
}

impl Extractor {
    /// Opens `target`, which must be an existing directory (it may itself
    /// be reached through a symlink: the caller chose it).
    pub fn new(target: &Path) -> Result<Extractor, ExtractError> {
        let bytes = target.as_os_str().as_bytes();
        let root = rustix::fs::open(
            target,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(bytes, e))?;
        Ok(Extractor {
            root,
            last_dir: std::sync::Mutex::new(None),
        })
    }

    /// [`Extractor::walk_dir`] through the one-entry cache of the last
    /// directory opened.
    fn open_dir(&self, comps: &[&[u8]], create: bool) -> Result<Arc<OwnedFd>, ExtractError> {
        let mut last = self.last_dir.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((names, fd)) = last.as_ref() {
            if names.len() == comps.len() && names.iter().zip(comps).all(|(a, b)| a == b) {
                return Ok(fd.clone());
            }
        }
        let fd = Arc::new(self.walk_dir(comps, create)?);
        *last = Some((comps.iter().map(|c| c.to_vec()).collect(), fd.clone()));
        Ok(fd)
    }

    /// Opens the directory `comps` (relative to the target), creating
    /// missing components; `full` names the entry in errors.
    fn walk_dir(&self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, ExtractError> {
        let mut dir = rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| io_err(b".", e))?;
        for (i, c) in comps.iter().enumerate() {
            let so_far = comps[..=i].join(&b'/');
            let name = OsStr::from_bytes(c);
            let opened = match rustix::fs::openat(&dir, name, DIR_FLAGS, Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&dir, name, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(io_err(&so_far, e)),
                    }
                    rustix::fs::openat(&dir, name, DIR_FLAGS, Mode::empty())
                }
                other => other,
            };
            dir = match opened {
                Ok(fd) => fd,
                Err(Errno::LOOP) => {
                    return Err(ExtractError::SymlinkOnDisk {
                        path: show(&so_far),
                    })
                }
                Err(Errno::NOTDIR) => {
                    let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| io_err(&so_far, e))?;
                    return Err(
                        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                            ExtractError::SymlinkOnDisk {
                                path: show(&so_far),
                            }
                        } else {
                            ExtractError::NotADirectoryOnDisk {
                                path: show(&so_far),
                            }
                        },
                    );
                }
                Err(e) => return Err(io_err(&so_far, e)),
            };
        }
        Ok(dir)
    }

    /// The parent directory's handle (created as needed) and the last name.
    fn parent<'p>(&self, path: &'p [u8]) -> Result<(Arc<OwnedFd>, &'p OsStr), ExtractError> {
        let comps = check_entry_path(path)?;
        let (last, parents) = comps
            .split_last()
            .expect("check_entry_path returns at least one component");
        Ok((self.open_dir(parents, true)?, OsStr::from_bytes(last)))
    }

    /// Removes a non-directory at `name` (a symlink is removed, not
    /// followed); a directory there is an error.
    fn clear(&self, dir: &OwnedFd, name: &OsStr, path: &[u8]) -> Result<(), ExtractError> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err(path, e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                Err(ExtractError::IsADirectoryOnDisk { path: show(path) })
            }
            Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| io_err(path, e)),
        }
    }

    /// Creates directory `path` (and missing parents) with `mode`; an
    /// existing directory is kept (its mode set), an existing symlink is an
    /// error.
    pub fn create_dir(&self, path: &[u8], mode: u32) -> Result<(), ExtractError> {
        let comps = check_entry_path(path)?;
        let dir = self.open_dir(&comps, true)?;
        rustix::fs::fchmod(&dir, perm(mode)).map_err(|e| io_err(path, e))
    }

    /// Creates regular file `path` anew (replacing a previous non-directory,
    /// never writing through it) and copies `content` into it.
    pub fn write_file(
        &self,
        path: &[u8],
        content: &mut dyn Read,
        mode: u32,
    ) -> Result<u64, ExtractError> {
        let (dir, name) = self.parent(path)?;
        self.clear(&dir, name, path)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, name, flags, Mode::from_bits_truncate(0o600)).map_err(
            |e| match e {
                Errno::LOOP | Errno::EXIST => ExtractError::SymlinkOnDisk { path: show(path) },
                e => io_err(path, e),
            },
        )?;
        let mut file = std::fs::File::from(fd);
        let copied = io::copy(content, &mut file).map_err(|e| io_err(path, e))?;
        rustix::fs::fchmod(&file, perm(mode)).map_err(|e| io_err(path, e))?;
        Ok(copied)
    }

    /// Creates regular file `path` under a temporary name in its directory,
    /// lets `fill` write its content, and only when `fill` succeeds renames
    /// it into place (replacing a previous non-directory, never writing
    /// through it): a file that fails half-way never appears under its
    /// name. On failure the temporary file is removed. `mode` is applied
    /// (as `mode & 0o777`) and `mtime`, if given, set before the rename.
    pub fn write_file_atomic(
        &self,
        path: &[u8],
        mode: u32,
        mtime: Option<Timestamp>,
        fill: &mut dyn FnMut(&mut std::fs::File) -> io::Result<u64>,
    ) -> Result<u64, ExtractError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (dir, name) = self.parent(path)?;
        // Short and fixed: a name at NAME_MAX must still get a temporary.
        let temp = format!(
            ".cbtvault-partial-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, temp.as_str(), flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| io_err(path, e))?;
        let mut file = std::fs::File::from(fd);
        let written = (|| -> Result<u64, ExtractError> {
            let n = fill(&mut file).map_err(|e| io_err(path, e))?;
            rustix::fs::fchmod(&file, perm(mode)).map_err(|e| io_err(path, e))?;
            if let Some(t) = mtime {
                rustix::fs::futimens(&file, &timestamps(t)).map_err(|e| io_err(path, e))?;
            }
            drop(file);
            self.clear(&dir, name, path)?;
            rustix::fs::renameat(&dir, temp.as_str(), &dir, name).map_err(|e| io_err(path, e))?;
            Ok(n)
        })();
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::empty());
        }
        written
    }

    /// Sets the owner of `path` itself (a symlink is not followed).
    pub fn set_owner(&self, path: &[u8], uid: u32, gid: u32) -> Result<(), ExtractError> {
        let comps = check_entry_path(path)?;
        let (last, parents) = comps.split_last().expect("at least one component");
        let dir = self.open_dir(parents, false)?;
        rustix::fs::chownat(
            &dir,
            OsStr::from_bytes(last),
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(path, e))
    }

    /// Sets the permission bits (`mode & 0o777`) of directory `path`, which
    /// must exist (reached without following links): for modes applied
    /// after a directory's contents are written.
    pub fn set_dir_mode(&self, path: &[u8], mode: u32) -> Result<(), ExtractError> {
        let comps = check_entry_path(path)?;
        let dir = self.open_dir(&comps, false)?;
        rustix::fs::fchmod(&dir, perm(mode)).map_err(|e| io_err(path, e))
    }

    /// Creates symlink `path` pointing at `target`, verbatim (a previous
    /// non-directory at `path` is replaced).
    pub fn symlink(&self, path: &[u8], target: &[u8]) -> Result<(), ExtractError> {
        if target.is_empty() || target.contains(&0) {
            return Err(ExtractError::InvalidPath {
                path: show(path),
                reason: "symlink target empty or contains NUL",
            });
        }
        let (dir, name) = self.parent(path)?;
        self.clear(&dir, name, path)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), &dir, name).map_err(|e| io_err(path, e))
    }

    /// Sets the modification (and access) time of `path` itself (a symlink
    /// is not followed).
    pub fn set_mtime(&self, path: &[u8], mtime: Timestamp) -> Result<(), ExtractError> {
        let comps = check_entry_path(path)?;
        let (last, parents) = comps.split_last().expect("at least one component");
        let dir = self.open_dir(parents, false)?;
        rustix::fs::utimensat(
            &dir,
            OsStr::from_bytes(last),
            &timestamps(mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_entry_paths_are_refused() {
        for bad in [
            &b""[..],
            b"..",
            b"../../etc/passwd",
            b"/etc/passwd",
            b"a/../../b",
            b"a//b",
            b"a/./b",
            b"a\0b",
        ] {
            assert!(check_entry_path(bad).is_err(), "{:?}", show(bad));
        }
        assert_eq!(
            destination(Path::new("/t"), b"a/b/c").unwrap(),
            PathBuf::from("/t/a/b/c")
        );
        assert_eq!(check_entry_path(b"dir/").unwrap(), vec![&b"dir"[..]]);
    }
}
