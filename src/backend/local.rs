//! Local-directory backend. Writes go to `tmp/`, are fsynced, renamed into
//! place and the destination folder fsynced (spec: format-spec/06-ordering.md).
//! Folders are created when missing (a copy may lack empty ones), 0700, and
//! files 0600, whatever the umask (spec: format-spec/01-layout.md).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Backend, BackendError, Kind, NewObject};

/// Open pack files kept for random reads; bounded.
const OPEN_FILE_CACHE: usize = 64;

pub struct LocalBackend {
    root: PathBuf,
    open_files: Mutex<HashMap<(Kind, String), Arc<File>>>,
}

impl LocalBackend {
    /// A backend over an existing or future repository folder.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend {
            root: root.into(),
            open_files: Mutex::new(HashMap::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the folder tree of a new repository.
    pub fn create_layout(&self) -> std::io::Result<()> {
        create_dirs(&self.root)?;
        for d in ["data", "snapshots", "manifests", "locks", "index", "tmp"] {
            create_dirs(&self.root.join(d))?;
        }
        for i in 0..=255u8 {
            create_dirs(&self.root.join("data").join(format!("{i:02x}")))?;
        }
        sync_dir(&self.root.join("data"))?;
        sync_dir(&self.root)
    }

    /// Makes the written file `f` at `tmp` the object `name`: fsync, rename
    /// into place, fsync the folder (spec: 06-ordering.md).
    fn publish(&self, f: File, tmp: &Path, kind: Kind, name: &str) -> Result<(), BackendError> {
        let err = |op, e| BackendError::from_io(kind, name, op, e);
        // Locks describe live processes, which a crash ends anyway: they
        // need not survive one (spec: 05-locks.md).
        let durable = kind != Kind::Lock;
        if durable {
            f.sync_all().map_err(|e| err("fsync", e))?;
        }
        if kind == Kind::Pack {
            // A pack just written is not read again by this process; keep
            // the page cache for the disk being backed up, not for its copy
            // (the clean pages are dropped; a failure is harmless).
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
        drop(f);
        let dest = self.path_of(kind, name);
        let parent = dest.parent().expect("objects live in a folder");
        match fs::rename(tmp, &dest) {
            // A copied repository may lack empty folders (`locks/`,
            // `data/XX/`): writers create them (spec: 01-layout.md).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !parent.exists() => {
                create_dirs(parent).map_err(|e| err("create folder", e))?;
                if let Some(grand) = parent.parent() {
                    sync_dir(grand).map_err(|e| err("fsync folder", e))?;
                }
                fs::rename(tmp, &dest).map_err(|e| err("rename", e))?;
            }
            other => other.map_err(|e| err("rename", e))?,
        }
        if durable {
            sync_dir(dest.parent().expect("objects live in a folder"))
                .map_err(|e| err("fsync folder", e))?;
        }
        Ok(())
    }

    pub fn path_of(&self, kind: Kind, name: &str) -> PathBuf {
        match kind {
            Kind::Config => self.root.join("config"),
            Kind::Pack => self
                .root
                .join("data")
                .join(name.get(..2).unwrap_or("00"))
                .join(name),
            Kind::Snapshot => self.root.join("snapshots").join(name),
            Kind::Lock => self.root.join("locks").join(name),
            Kind::Index => self.root.join("index").join(name),
            Kind::Page => self.root.join("manifests").join(name),
            Kind::Key => self.root.join("keys").join(name),
        }
    }

    fn open_cached(&self, kind: Kind, name: &str) -> Result<Arc<File>, BackendError> {
        let key = (kind, name.to_string());
        if let Some(f) = self.open_files.lock().expect("cache lock").get(&key) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            File::open(self.path_of(kind, name))
                .map_err(|e| BackendError::from_io(kind, name, "open", e))?,
        );
        let mut cache = self.open_files.lock().expect("cache lock");
        if cache.len() >= OPEN_FILE_CACHE {
            cache.clear();
        }
        cache.insert(key, f.clone());
        Ok(f)
    }

    fn forget_cached(&self, kind: Kind, name: &str) {
        self.open_files
            .lock()
            .expect("cache lock")
            .remove(&(kind, name.to_string()));
    }
}

/// Alignment of buffer address, file offset and length that direct I/O
/// accepts on any Linux block device and filesystem.
const DIRECT_ALIGN: usize = 4096;
/// Smaller files are not worth a second open.
const DIRECT_MIN: usize = 1 << 20;

/// An object of [`LocalBackend::create`] (and of `save`): `tmp` until the
/// commit renames it. Pack bytes go to the disk with O_DIRECT when they are
/// aligned: a backup writes gigabytes it will not read again, and copying
/// them through the page cache costs a CPU pass and evicts the cache of the
/// disk being read. Unaligned bytes go through the page cache, and so does
/// everything on a filesystem without direct I/O.
struct LocalObject<'a> {
    backend: &'a LocalBackend,
    kind: Kind,
    tmp: PathBuf,
    /// Opened at the first append.
    file: Option<File>,
    /// Whether `file` was opened (or is still to be opened) with O_DIRECT.
    direct: bool,
    len: u64,
}

impl LocalObject<'_> {
    fn err(&self, op: &'static str, e: std::io::Error) -> BackendError {
        BackendError::from_io(self.kind, &self.tmp.display().to_string(), op, e)
    }

    /// How much of `data`, appended now, may go with O_DIRECT: its aligned
    /// head, when the buffer and the file offset are aligned too (and the
    /// object is large enough to be worth a second open for its tail).
    fn direct_head(&self, data: &[u8]) -> usize {
        let head = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let aligned = data.as_ptr().align_offset(DIRECT_ALIGN) == 0
            && self.len.is_multiple_of(DIRECT_ALIGN as u64);
        if self.direct && aligned && (self.file.is_some() || head >= DIRECT_MIN) {
            head
        } else {
            0
        }
    }

    /// The file, opened without O_DIRECT from now on; created here,
    /// exclusively, if nothing was written yet (spec: 06-ordering).
    fn buffered(&mut self) -> std::io::Result<&File> {
        if self.direct || self.file.is_none() {
            let f = OpenOptions::new()
                .write(true)
                .create_new(self.file.is_none())
                .mode(0o600)
                .open(&self.tmp)?;
            self.file = Some(f);
            self.direct = false;
        }
        Ok(self.file.as_ref().expect("just opened"))
    }

    /// Writes the aligned `data` with O_DIRECT; Ok(false) when the
    /// filesystem refuses direct I/O (then nothing was written).
    fn write_direct(&mut self, data: &[u8]) -> std::io::Result<bool> {
        let refused = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
        if self.file.is_none() {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_DIRECT)
                .open(&self.tmp)
            {
                Ok(f) => self.file = Some(f),
                // Refused after it may have created the file.
                Err(e) if refused(&e) => {
                    self.direct = false;
                    match fs::remove_file(&self.tmp) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => return Ok(false),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let f = self.file.as_ref().expect("open");
        match f.write_all_at(data, self.len) {
            Ok(()) => Ok(true),
            Err(e) if refused(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl NewObject for LocalObject<'_> {
    fn append(&mut self, data: &[u8]) -> Result<(), BackendError> {
        let head = self.direct_head(data);
        let mut done = 0;
        if head > 0
            && self
                .write_direct(&data[..head])
                .map_err(|e| self.err("write", e))?
        {
            done = head;
            self.len += head as u64;
        }
        if done < data.len() || self.file.is_none() {
            let at = self.len;
            let r = self
                .buffered()
                .and_then(|f| f.write_all_at(&data[done..], at));
            r.map_err(|e| self.err("write", e))?;
            self.len += (data.len() - done) as u64;
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>, name: &str) -> Result<(), BackendError> {
        let (kind, backend) = (self.kind, self.backend);
        // An empty object still becomes a file.
        self.append(&[])?;
        let f = self.file.take().expect("open");
        backend.publish(f, &self.tmp, kind, name)?;
        // Renamed: nothing left for Drop to remove.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for LocalObject<'_> {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, each 0700 (the umask can only
/// take bits away).
pub(crate) fn create_dirs(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn random_tmp_name() -> String {
    format!("{:032x}.tmp", rand::random::<u128>())
}

impl Backend for LocalBackend {
    /// Whether objects can be written here: false when the storage refuses
    /// writes (read-only file system, no permission). Creates `tmp/` when
    /// it is missing and a probe file in it, removed at once.
    fn probe_writable(&self) -> bool {
        let refused = |e: &std::io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
            )
        };
        let tmp = self.root.join("tmp");
        if let Err(e) = fs::create_dir(&tmp) {
            if refused(&e) {
                return false;
            }
        }
        let probe = tmp.join(format!("{:032x}.probe", rand::random::<u128>()));
        match OpenOptions::new().write(true).create_new(true).open(&probe) {
            Ok(_) => {
                let _ = fs::remove_file(&probe);
                true
            }
            Err(e) => !refused(&e),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn save(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
        let mut object = self.create(kind)?;
        object.append(data)?;
        object.commit(name)
    }

    /// A file under `tmp/` written as the bytes come: aligned appends go
    /// to the disk with O_DIRECT (packs), the rest through the page cache.
    fn create(&self, kind: Kind) -> Result<Box<dyn NewObject + '_>, BackendError> {
        let tmp = self.root.join("tmp");
        if !tmp.is_dir() {
            create_dirs(&tmp)
                .map_err(|e| BackendError::from_io(kind, "tmp/", "create folder", e))?;
        }
        Ok(Box::new(LocalObject {
            backend: self,
            kind,
            tmp: self.root.join("tmp").join(random_tmp_name()),
            file: None,
            direct: kind == Kind::Pack,
            len: 0,
        }))
    }

    fn load_into(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackendError> {
        let f = self.open_cached(kind, name)?;
        f.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                BackendError::Permanent {
                    kind,
                    name: name.to_string(),
                    op: "read",
                    error: std::io::Error::new(
                        e.kind(),
                        format!("object ends before byte {}", offset + buf.len() as u64),
                    ),
                }
            } else {
                BackendError::from_io(kind, name, "read", e)
            }
        })
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<u64, BackendError> {
        fs::metadata(self.path_of(kind, name))
            .map(|m| m.len())
            .map_err(|e| BackendError::from_io(kind, name, "stat", e))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>, BackendError> {
        let dirs: Vec<PathBuf> = match kind {
            Kind::Config => {
                return match self.stat(kind, "config") {
                    Ok(n) => Ok(vec![("config".into(), n)]),
                    Err(e) if e.is_not_found() => Ok(vec![]),
                    Err(e) => Err(e),
                }
            }
            Kind::Pack => {
                let data = self.root.join("data");
                let mut v = Vec::new();
                let listing = match fs::read_dir(&data) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                    other => other.map_err(|e| BackendError::from_io(kind, "data/", "list", e))?,
                };
                for entry in listing {
                    let entry =
                        entry.map_err(|e| BackendError::from_io(kind, "data/", "list", e))?;
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        v.push(entry.path());
                    }
                }
                v
            }
            Kind::Snapshot => vec![self.root.join("snapshots")],
            Kind::Lock => vec![self.root.join("locks")],
            Kind::Index => vec![self.root.join("index")],
            Kind::Page => vec![self.root.join("manifests")],
            Kind::Key => vec![self.root.join("keys")],
        };
        let mut out = Vec::new();
        for dir in dirs {
            let shown = dir.display().to_string();
            // A folder missing from a copied repository holds nothing.
            let listing = match fs::read_dir(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                other => other.map_err(|e| BackendError::from_io(kind, &shown, "list", e))?,
            };
            for entry in listing {
                let entry = entry.map_err(|e| BackendError::from_io(kind, &shown, "list", e))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Removed between listing and stat.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(BackendError::from_io(kind, &name, "stat", e)),
                };
                if meta.is_file() {
                    out.push((name, meta.len()));
                }
            }
        }
        Ok(out)
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), BackendError> {
        self.forget_cached(kind, name);
        let path = self.path_of(kind, name);
        fs::remove_file(&path).map_err(|e| BackendError::from_io(kind, name, "remove", e))?;
        if kind == Kind::Lock {
            return Ok(());
        }
        sync_dir(path.parent().expect("objects live in a folder"))
            .map_err(|e| BackendError::from_io(kind, name, "fsync folder", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 253) as u8).collect()
    }

    #[test]
    fn packs_written_directly_or_buffered_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("repo"));
        b.create_layout().unwrap();
        // An aligned buffer (direct I/O for the head, the page cache for
        // the 123-byte tail), an aligned one with no tail, and an
        // unaligned one (buffered).
        let mut aligned = vec![0u8; (3 << 20) + 123 + DIRECT_ALIGN];
        let start = aligned.as_ptr().align_offset(DIRECT_ALIGN);
        let want = pattern((3 << 20) + 123);
        aligned[start..start + want.len()].copy_from_slice(&want);
        let cases: [(&str, &[u8]); 3] = [
            ("aa01", &aligned[start..start + want.len()]),
            ("aa02", &aligned[start..start + (2 << 20)]),
            ("aa03", &aligned[start + 1..start + want.len()]),
        ];
        for (name, data) in cases {
            b.save(Kind::Pack, name, data).unwrap();
            assert_eq!(b.load(Kind::Pack, name).unwrap(), data, "{name}");
        }
        // Nothing is left behind in tmp/.
        assert_eq!(
            fs::read_dir(dir.path().join("repo/tmp")).unwrap().count(),
            0
        );
    }

    /// Objects written as their bytes come: aligned chunks (direct I/O), an
    /// unaligned chunk (buffered from then on), an aligned chunk after it,
    /// and an empty object. An object dropped before its commit leaves
    /// nothing, and no commit leaves anything in tmp/.
    #[test]
    fn objects_appended_in_chunks_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("repo"));
        b.create_layout().unwrap();
        let mut aligned = vec![0u8; (6 << 20) + DIRECT_ALIGN];
        let start = aligned.as_ptr().align_offset(DIRECT_ALIGN);
        let want = pattern(6 << 20);
        aligned[start..start + want.len()].copy_from_slice(&want);
        let data = &aligned[start..start + want.len()];
        let cuts: [(&str, &[usize]); 4] = [
            ("bb01", &[0, 2 << 20, 4 << 20, (6 << 20) - 100, 6 << 20]),
            ("bb02", &[0, 1 << 20, (1 << 20) + 5, (3 << 20) + 5, 6 << 20]),
            ("bb03", &[0, 6 << 20]),
            ("bb04", &[0, 0]),
        ];
        for (name, cuts) in cuts {
            let mut o = b.create(Kind::Pack).unwrap();
            for w in cuts.windows(2) {
                o.append(&data[w[0]..w[1]]).unwrap();
            }
            o.commit(name).unwrap();
            let end = *cuts.last().unwrap();
            assert_eq!(b.load(Kind::Pack, name).unwrap(), &data[..end], "{name}");
        }
        let mut o = b.create(Kind::Pack).unwrap();
        o.append(&data[..2 << 20]).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join("repo/tmp")).unwrap().count(),
            1
        );
        drop(o);
        assert_eq!(
            fs::read_dir(dir.path().join("repo/tmp")).unwrap().count(),
            0
        );
        assert!(b
            .list(Kind::Pack)
            .unwrap()
            .iter()
            .all(|(n, _)| n.starts_with("bb")));
    }
}
