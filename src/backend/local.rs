//! Local-directory backend. Writes go to `tmp/`, are fsynced, renamed into
//! place and the destination folder fsynced (spec: format-spec/06-ordering.md).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Backend, BackendError, Kind};

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
        fs::create_dir_all(&self.root)?;
        for d in ["data", "snapshots", "locks", "tmp"] {
            fs::create_dir_all(self.root.join(d))?;
        }
        for i in 0..=255u8 {
            fs::create_dir_all(self.root.join("data").join(format!("{i:02x}")))?;
        }
        sync_dir(&self.root.join("data"))?;
        sync_dir(&self.root)
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

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn random_tmp_name() -> String {
    format!("{:032x}.tmp", rand::random::<u128>())
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn save(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
        let err = |op, e| BackendError::from_io(kind, name, op, e);
        let tmp = self.root.join("tmp").join(random_tmp_name());
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| err("create temporary file", e))?;
            f.write_all(data).map_err(|e| err("write", e))?;
            // Locks describe live processes, which a crash ends anyway:
            // they need not survive one (spec: 05-locks.md).
            let durable = kind != Kind::Lock;
            if durable {
                f.sync_all().map_err(|e| err("fsync", e))?;
            }
            drop(f);
            let dest = self.path_of(kind, name);
            fs::rename(&tmp, &dest).map_err(|e| err("rename", e))?;
            if durable {
                sync_dir(dest.parent().expect("objects live in a folder"))
                    .map_err(|e| err("fsync folder", e))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
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
                    source: std::io::Error::new(
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
                for entry in fs::read_dir(&data)
                    .map_err(|e| BackendError::from_io(kind, "data/", "list", e))?
                {
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
        };
        let mut out = Vec::new();
        for dir in dirs {
            let shown = dir.display().to_string();
            for entry in
                fs::read_dir(&dir).map_err(|e| BackendError::from_io(kind, &shown, "list", e))?
            {
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
