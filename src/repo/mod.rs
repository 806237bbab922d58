//! The repository: consistency across objects. Opening and creating,
//! snapshot lookup and chain resolution, locks, and the write ordering of a
//! backup (packs, then catalog rows, then the snapshot object).
//!
//! spec: format-spec/06-ordering.md

pub mod backup;
pub mod check;
pub mod lock;
pub mod restore;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;

use crate::backend::{Backend, BackendError, Kind, LocalBackend};
use crate::format::config::{self, RepoConfig};
use crate::format::snapshot::{self, SnapshotMeta, SnapshotObject};
use crate::format::{pack as pack_layout, FormatError, ObjectName, SnapshotId};
use crate::index::{Catalog, IndexError, OpenState};
use crate::manifest::{self, BlockMap};
use crate::pack::PackError;
use crate::source::SourceError;

pub use lock::{LockError, LockGuard};

pub const CATALOG_FILE: &str = "catalog.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "'{location}' is not a cbtvault repository (no config); create one with 'cbtvault init'"
    )]
    NotARepository { location: String },
    #[error("'{location}' already holds a repository or other files")]
    AlreadyExists { location: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{kind} '{name}' is corrupt: {reason}; run 'cbtvault check'")]
    CorruptObject {
        kind: Kind,
        name: String,
        reason: String,
    },
    #[error("no snapshot matches '{query}'")]
    SnapshotNotFound { query: String },
    #[error("'{query}' matches several snapshots: {candidates}")]
    AmbiguousSnapshot { query: String, candidates: String },
    #[error(
        "snapshot {snapshot}: block {index} ({block}) is not in any pack; run 'cbtvault check'"
    )]
    BlockMissing {
        snapshot: SnapshotId,
        index: u64,
        block: crate::format::BlockId,
    },
    /// A failure while working on one snapshot. The cause is part of the
    /// message (not a separate source), so a printed chain says it once.
    #[error("snapshot {snapshot}: {cause}")]
    InSnapshot {
        snapshot: SnapshotId,
        cause: Box<RepoError>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl RepoError {
    fn corrupt(kind: Kind, name: impl Into<String>, e: impl ToString) -> Self {
        RepoError::CorruptObject {
            kind,
            name: name.into(),
            reason: e.to_string(),
        }
    }
}

/// Options of `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub block_size: u32,
    pub compression_level: i32,
    pub pack_size_target_bytes: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            block_size: 65536,
            compression_level: 3,
            pack_size_target_bytes: 32 << 20,
        }
    }
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    root: PathBuf,
    config: RepoConfig,
    catalog: Mutex<Catalog>,
    /// Set when opening found no usable catalog and rebuilt it.
    pub catalog_rebuilt: bool,
    /// Snapshot objects that could not be read while syncing the catalog.
    pub unreadable_snapshots: Vec<(String, String)>,
}

/// A snapshot object as listed: its object name and metadata.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub object: ObjectName,
    pub meta: SnapshotMeta,
}

impl Repository {
    /// Creates a repository in an empty or missing folder.
    pub fn init(path: &Path, options: &InitOptions) -> Result<RepoConfig, RepoError> {
        let location = path.display().to_string();
        if path.exists() {
            let non_empty = std::fs::read_dir(path)
                .map_err(|source| RepoError::Io {
                    what: format!("read '{location}'"),
                    source,
                })?
                .next()
                .is_some();
            if non_empty {
                return Err(RepoError::AlreadyExists { location });
            }
        }
        if !snapshot::valid_block_size(options.block_size) {
            return Err(RepoError::Invalid(format!(
                "block size {} must be a power of two between 512 and 16 MiB",
                options.block_size
            )));
        }
        let backend = LocalBackend::new(path);
        backend.create_layout().map_err(|source| RepoError::Io {
            what: format!("create repository folders in '{location}'"),
            source,
        })?;
        let config = RepoConfig {
            version: config::FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 32]>()),
            created: Utc::now(),
            block_size: options.block_size,
            hash: "blake3".into(),
            compression: "zstd".into(),
            compression_level: options.compression_level,
            pack_size_target_bytes: options.pack_size_target_bytes,
        };
        // Validate what we are about to write exactly as a reader would.
        let bytes = config::encode(&config);
        config::decode(&bytes).map_err(|e| RepoError::Invalid(e.to_string()))?;
        backend.save(Kind::Config, "config", &bytes)?;
        // An empty, complete catalog: the first open has nothing to rebuild.
        Catalog::open(&path.join(CATALOG_FILE), &config.id)?
            .0
            .mark_complete()?;
        Ok(config)
    }

    /// Opens a repository; rebuilds the catalog when it is missing or stale
    /// and brings its snapshot table up to date with `snapshots/`.
    pub fn open(path: &Path) -> Result<Repository, RepoError> {
        // The local folder; in debug builds a test may wrap or replace it.
        let backend = crate::backend::fault::open_backend(path);
        let bytes = match backend.load(Kind::Config, "config") {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(RepoError::NotARepository {
                    location: path.display().to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let config =
            config::decode(&bytes).map_err(|e| RepoError::corrupt(Kind::Config, "config", e))?;
        let catalog_path = path.join(CATALOG_FILE);
        let (catalog, state) = Catalog::open(&catalog_path, &config.id)?;
        let mut repo = Repository {
            backend,
            root: path.to_path_buf(),
            config,
            catalog: Mutex::new(catalog),
            catalog_rebuilt: false,
            unreadable_snapshots: Vec::new(),
        };
        if state == OpenState::Reset {
            repo.rebuild_catalog(&crate::progress::NoProgress)?;
            repo.catalog_rebuilt = true;
        } else {
            repo.sync_snapshots()?;
        }
        Ok(repo)
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The shared catalog connection.
    pub fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().expect("catalog mutex poisoned")
    }

    /// A new connection to the catalog, for another thread.
    pub fn open_catalog(&self) -> Result<Catalog, RepoError> {
        Ok(Catalog::open(&self.root.join(CATALOG_FILE), &self.config.id)?.0)
    }

    pub fn lock(&self, exclusive: bool, command: &str) -> Result<LockGuard, RepoError> {
        Ok(lock::acquire(self.backend.clone(), exclusive, command)?)
    }

    /// Reads one pack's footer and trailer (two range reads).
    pub fn read_pack_index(
        &self,
        name: &str,
        size: u64,
    ) -> Result<Vec<pack_layout::TrailerEntry>, RepoError> {
        let bad = |e: FormatError| RepoError::corrupt(Kind::Pack, name, e);
        if size < (pack_layout::HEADER_LEN + pack_layout::FOOTER_LEN) as u64 {
            return Err(bad(FormatError::Truncated {
                what: "pack",
                needed: (pack_layout::HEADER_LEN + pack_layout::FOOTER_LEN) as u64,
                available: size,
            }));
        }
        let mut header = [0u8; pack_layout::HEADER_LEN];
        self.backend.load_into(Kind::Pack, name, 0, &mut header)?;
        pack_layout::decode_header(&header).map_err(bad)?;
        let mut footer = [0u8; pack_layout::FOOTER_LEN];
        self.backend
            .load_into(Kind::Pack, name, size - footer.len() as u64, &mut footer)?;
        let trailer_len = pack_layout::decode_footer(&footer, size).map_err(bad)?;
        let mut trailer = vec![0u8; trailer_len as usize];
        self.backend.load_into(
            Kind::Pack,
            name,
            size - (pack_layout::FOOTER_LEN as u64) - trailer_len as u64,
            &mut trailer,
        )?;
        pack_layout::decode_trailer(&trailer, size, self.config.block_size).map_err(bad)
    }

    /// Rebuilds the catalog from the packs and snapshot objects alone.
    /// Returns the packs that could not be read (name, reason).
    pub fn rebuild_catalog(
        &mut self,
        progress: &dyn crate::progress::Progress,
    ) -> Result<Vec<(String, String)>, RepoError> {
        let packs = self.backend.list(Kind::Pack)?;
        progress.set_total(packs.len() as u64);
        let mut skipped = Vec::new();
        let mut catalog = self.catalog.lock().expect("catalog mutex poisoned");
        catalog.clear()?;
        for (name, size) in packs {
            progress.advance(1);
            let Ok(pack_name) = name.parse::<ObjectName>() else {
                skipped.push((name, "not a pack name".to_string()));
                continue;
            };
            match self.read_pack_index(&name, size) {
                Ok(entries) => catalog.add_pack(&pack_name, size, &entries)?,
                Err(e) => skipped.push((name, e.to_string())),
            }
        }
        drop(catalog);
        self.sync_snapshots()?;
        self.catalog().mark_complete()?;
        Ok(skipped)
    }

    /// Loads a snapshot object, checking its name against its content.
    pub fn load_snapshot(&self, object: &ObjectName) -> Result<SnapshotObject, RepoError> {
        let name = object.to_hex();
        let bytes = self.backend.load(Kind::Snapshot, &name)?;
        if ObjectName::of(&bytes) != *object {
            return Err(RepoError::corrupt(
                Kind::Snapshot,
                name,
                "content does not match its name (hash)",
            ));
        }
        snapshot::decode(&bytes).map_err(|e| RepoError::corrupt(Kind::Snapshot, name, e))
    }

    /// Makes the catalog's snapshot table mirror `snapshots/`.
    pub fn sync_snapshots(&mut self) -> Result<(), RepoError> {
        let listed = self.backend.list(Kind::Snapshot)?;
        let known: HashMap<ObjectName, SnapshotMeta> =
            self.catalog().snapshots()?.into_iter().collect();
        let mut present = std::collections::HashSet::new();
        self.unreadable_snapshots.clear();
        for (name, _) in listed {
            let Ok(object) = name.parse::<ObjectName>() else {
                continue;
            };
            present.insert(object);
            if known.contains_key(&object) {
                continue;
            }
            match self.load_snapshot(&object) {
                Ok(obj) => self.catalog().upsert_snapshot(&object, &obj.meta)?,
                Err(e) => self.unreadable_snapshots.push((name, e.to_string())),
            }
        }
        for object in known.keys() {
            if !present.contains(object) {
                self.catalog().remove_snapshot(object)?;
            }
        }
        Ok(())
    }

    /// Live snapshots (highest generation of each id), oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotEntry>, RepoError> {
        let mut by_id: HashMap<SnapshotId, SnapshotEntry> = HashMap::new();
        for (object, meta) in self.catalog().snapshots()? {
            match by_id.get(&meta.id) {
                Some(e) if e.meta.generation >= meta.generation => {}
                _ => {
                    by_id.insert(meta.id, SnapshotEntry { object, meta });
                }
            }
        }
        let mut v: Vec<SnapshotEntry> = by_id.into_values().collect();
        v.sort_by(|a, b| {
            a.meta
                .time
                .cmp(&b.meta.time)
                .then(a.meta.id.cmp(&b.meta.id))
        });
        Ok(v)
    }

    /// Finds a snapshot by id or unique id prefix.
    pub fn find_snapshot(&self, query: &str) -> Result<SnapshotEntry, RepoError> {
        let q = query.to_ascii_lowercase();
        let matches: Vec<SnapshotEntry> = self
            .snapshots()?
            .into_iter()
            .filter(|s| !q.is_empty() && s.meta.id.to_hex().starts_with(&q))
            .collect();
        match matches.len() {
            0 => Err(RepoError::SnapshotNotFound {
                query: query.to_string(),
            }),
            1 => Ok(matches.into_iter().next().expect("one match")),
            _ => Err(RepoError::AmbiguousSnapshot {
                query: query.to_string(),
                candidates: matches
                    .iter()
                    .map(|s| s.meta.id.short())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The chain of snapshot objects from the full manifest to `id`, oldest first.
    pub fn load_chain(&self, id: SnapshotId) -> Result<Vec<SnapshotObject>, RepoError> {
        let live: HashMap<SnapshotId, SnapshotEntry> = self
            .snapshots()?
            .into_iter()
            .map(|s| (s.meta.id, s))
            .collect();
        let mut chain = Vec::new();
        let mut next = Some(id);
        while let Some(id) = next {
            if chain.len() > live.len() {
                return Err(RepoError::Invalid(format!(
                    "snapshot {id}: parent chain loops"
                )));
            }
            let entry = live
                .get(&id)
                .ok_or_else(|| RepoError::SnapshotNotFound { query: id.to_hex() })?;
            let obj = self.load_snapshot(&entry.object)?;
            next = obj.meta.parent;
            chain.push(obj);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The resolved block map of snapshot `id`.
    pub fn resolve(&self, id: SnapshotId) -> Result<BlockMap, RepoError> {
        let chain = self.load_chain(id).map_err(|e| RepoError::InSnapshot {
            snapshot: id,
            cause: Box::new(e),
        })?;
        let refs: Vec<&SnapshotObject> = chain.iter().collect();
        Ok(manifest::resolve(&refs))
    }

    /// Writes a snapshot object (after its blocks are durable) and records it.
    pub fn commit_snapshot(&self, obj: &SnapshotObject) -> Result<ObjectName, RepoError> {
        #[cfg(debug_assertions)]
        test_failpoint("commit_snapshot")?;
        let bytes = snapshot::encode(obj).map_err(|e| RepoError::Invalid(e.to_string()))?;
        let name = ObjectName::of(&bytes);
        self.backend.save(Kind::Snapshot, &name.to_hex(), &bytes)?;
        self.catalog().upsert_snapshot(&name, &obj.meta)?;
        Ok(name)
    }
}

/// Test hook, compiled into debug builds only (what `cargo test` runs):
/// `CBTVAULT_TEST_FAILPOINT=NAME:N` makes the Nth pass through failpoint
/// NAME in this process fail like a full disk, so tests can stop a backup
/// between two commits (`commit_snapshot`) or in the middle of writing a
/// pack (`pack_append`). Release builds have no hook.
#[cfg(debug_assertions)]
pub(crate) fn test_failpoint(name: &str) -> Result<(), RepoError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("CBTVAULT_TEST_FAILPOINT") else {
        return Ok(());
    };
    let Some((point, n)) = spec.split_once(':') else {
        return Ok(());
    };
    if point != name {
        return Ok(());
    }
    let hit = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if n.parse::<u64>().is_ok_and(|n| n == hit) {
        return Err(RepoError::Io {
            what: format!("failpoint {name} (test hook)"),
            source: std::io::Error::other("No space left on device (injected)"),
        });
    }
    Ok(())
}
