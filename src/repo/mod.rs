//! The repository: consistency across objects. Opening and creating,
//! snapshot lookup and chain resolution, locks, and the write ordering of a
//! backup (packs, then catalog rows, then the snapshot object).
//!
//! spec: format-spec/06-ordering.md

pub mod backup;
pub mod check;
pub mod copy;
pub mod forget;
pub mod keys;
pub mod location;
pub mod lock;
pub mod manifests;
pub mod policy;
pub mod prune;
pub mod random;
pub mod read;
pub mod repair;
pub mod restore;
pub mod tag;

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;

use crate::backend::{Backend, BackendError, Kind, LocalBackend};
use crate::crypto::{Bound, Codec, Keys, MasterSecret};
use crate::format::config::{self, RepoConfig};
use crate::format::snapshot::{self, SnapshotMeta};
use crate::format::{pack as pack_layout, FormatError, ObjectName, SnapshotId};
use crate::index::{Catalog, IndexError, OpenState};
use crate::manifest::BlockMap;
use crate::pack::PackError;
use crate::source::SourceError;
pub use manifests::{Body, ChainReader, PageWriter, RangeMap, Snapshot};

pub use keys::{KeyInfo, NewKey, PasswordSource};
pub use location::{Location, S3Settings, S3Style};
pub use lock::{LockError, LockGuard};

pub const CATALOG_FILE: &str = "catalog.sqlite";

/// Entries a writer (backup, copy) collects before it writes them as an
/// index object: about 3 MiB, so memory stays bounded whatever the disk's
/// size (spec: format-spec/08-index.md#writing).
pub(crate) const INDEX_FLUSH_ENTRIES: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "'{location}' is not a cbtvault repository (no config); create one with 'cbtvault init'"
    )]
    NotARepository { location: String },
    #[error("'{location}' already holds a repository or other files")]
    AlreadyExists { location: String },
    /// No key object of an encrypted repository opens with the password.
    #[error("wrong password: no key of '{location}' opens with it")]
    WrongPassword { location: String },
    #[error("'{location}' is encrypted: give its password with --password-file, CBTVAULT_PASSWORD_FILE or CBTVAULT_PASSWORD (or type it at a terminal)")]
    PasswordRequired { location: String },
    #[error("cannot read the password: {0}")]
    PasswordUnavailable(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    S3(#[from] crate::backend::s3::S3Error),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Read(#[from] read::ReadError),
    #[error(transparent)]
    Fold(#[from] forget::FoldError),
    #[error(transparent)]
    Prune(#[from] prune::PruneError),
    /// A stop signal was received: the work stopped at a check point.
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
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
    /// Two objects claim the same id and generation (spec:
    /// format-spec/03-snapshot.md#identity): neither is picked.
    #[error(
        "snapshot {id}: objects {objects} all claim generation {generation}; refusing to pick one (one is forged or left by a broken writer): inspect them and remove the wrong one from snapshots/"
    )]
    DuplicateSnapshot {
        id: SnapshotId,
        generation: u32,
        objects: String,
    },
    /// The catalog file is damaged and this process may not rebuild it now.
    #[error(
        "catalog '{path}' is damaged ({reason}) and cannot be rebuilt now: {why}; run 'cbtvault repair index'"
    )]
    CatalogCorrupt {
        path: String,
        reason: String,
        why: String,
    },
    /// A command that writes or needs the lock, on storage that cannot
    /// hold one (or with `--no-lock`).
    #[error("'{command}' needs the repository lock, but {why}")]
    LockRequired { command: String, why: String },
    /// A command that removes or rewrites objects without holding the
    /// exclusive lock (spec: format-spec/05-locks.md).
    #[error("'{command}' must run under the exclusive repository lock: {why}")]
    ExclusiveLockRequired { command: String, why: String },
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
    /// Encrypted (format version 2) with a first key for this password.
    pub encryption: Option<NewKey>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            block_size: 65536,
            compression_level: 3,
            pack_size_target_bytes: 32 << 20,
            encryption: None,
        }
    }
}

/// How to open a repository.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Take no lock (restic's `--no-lock`): reading commands only.
    pub no_lock: bool,
    /// The password, asked for only if the repository is encrypted.
    pub password: Option<PasswordSource>,
}

/// A pack's trailer as listed from its end.
pub struct PackListing {
    pub entries: Vec<pack_layout::TrailerEntry>,
    /// The name the tail calls for, for a pack named by its tail (trailer
    /// format 1); `None` for one named by its whole file.
    pub tail_name: Option<ObjectName>,
}

impl PackListing {
    /// The trailer format (`02-pack.md#trailer`) the pack was listed with.
    pub fn trailer_format(&self) -> u32 {
        if self.tail_name.is_some() {
            pack_layout::TRAILER_FORMAT_TAIL
        } else {
            pack_layout::TRAILER_FORMAT_WHOLE
        }
    }
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    /// The local folder; None for object storage.
    root: Option<PathBuf>,
    config: RepoConfig,
    /// Plain, or sealed with the keys of the master secret in `unlocked`.
    codec: Codec,
    unlocked: Option<keys::Unlocked>,
    catalog: Mutex<Catalog>,
    /// Set when opening found no usable catalog and rebuilt it.
    pub catalog_rebuilt: bool,
    /// Snapshot objects that could not be read while syncing the catalog.
    pub unreadable_snapshots: Vec<(String, String)>,
    /// Why the catalog could not be rebuilt on open (it lists snapshots
    /// but not blocks), when it could not.
    pub catalog_incomplete: Option<String>,
    /// Set when the catalog file was found damaged and replaced: why, and
    /// where the damaged file was kept (None: a private cache copy).
    pub catalog_replaced: Option<(String, Option<PathBuf>)>,
    /// The health of the lock most recently taken through [`Repository::lock`].
    lock_health: Mutex<Option<Arc<lock::LockHealth>>>,
    /// The storage refuses writes: no locks, catalog in a cache folder.
    read_only: bool,
    no_lock: bool,
    catalog_path: PathBuf,
    /// The private cache folder holding the catalog, removed on drop.
    cache_dir: Option<PathBuf>,
    /// On object storage, and for encrypted repositories: the catalog is
    /// this machine's cache, brought up to date with the listed packs
    /// whenever a lock is taken.
    remote: bool,
    /// What readers want the user told (a healed block, damage the
    /// catalog could not record); commands print them (`take_notices`).
    notices: Mutex<Vec<String>>,
}

/// Notices kept at most; more are counted, not kept.
const MAX_NOTICES: usize = 1000;

impl Drop for Repository {
    fn drop(&mut self) {
        if let Some(dir) = &self.cache_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Where a repository on read-only storage keeps its catalog:
/// `$CBTVAULT_CACHE_DIR`, else `$XDG_CACHE_HOME/cbtvault`, else
/// `~/.cache/cbtvault`, else the temporary folder; one private folder per
/// process (spec: format-spec/04-catalog.md#read-only).
fn private_cache_dir(repo_id: &str) -> PathBuf {
    cache_base().join(repo_id).join(format!(
        "{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// `$CBTVAULT_CACHE_DIR`, else `$XDG_CACHE_HOME/cbtvault`, else
/// `~/.cache/cbtvault`, else the temporary folder.
fn cache_base() -> PathBuf {
    std::env::var_os("CBTVAULT_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("cbtvault")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/cbtvault")))
        .unwrap_or_else(|| std::env::temp_dir().join("cbtvault-cache"))
}

/// Where this machine keeps the catalog of a repository on object
/// storage: `<cache>/<repository id>/catalog.sqlite`, kept between runs
/// (spec: format-spec/04-catalog.md#remote).
fn remote_catalog_path(repo_id: &str) -> Result<PathBuf, RepoError> {
    let dir = cache_base().join(repo_id);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| RepoError::Io {
            what: format!("create the cache folder '{}'", dir.display()),
            source,
        })?;
    Ok(dir.join(CATALOG_FILE))
}

/// Copies the repository's catalog (and its write-ahead log) into `dir`,
/// when there is one; returns the copy's path.
fn copy_catalog(root: &Path, dir: &Path) -> Result<PathBuf, RepoError> {
    let io = |what: String| move |source| RepoError::Io { what, source };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("create cache folder '{}'", dir.display())))?;
    let dest = dir.join(CATALOG_FILE);
    for suffix in ["", "-wal"] {
        let mut from = root.join(CATALOG_FILE).into_os_string();
        from.push(suffix);
        let mut to = dest.clone().into_os_string();
        to.push(suffix);
        match std::fs::copy(&from, &to) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("copy the catalog into '{}'", dir.display()))(e)),
        }
    }
    Ok(dest)
}

/// Replaces a damaged catalog file (spec: format-spec/04-catalog.md#corrupt).
/// A private cache copy (read-only storage) is deleted; the repository's
/// own file is moved aside as `catalog.corrupt-<time>` under the exclusive
/// lock, which is returned for the rebuild to run under. With `--no-lock`,
/// or when the lock is taken, nothing is touched and the error names the
/// file and `repair index`. The returned catalog is empty (`Reset`).
fn replace_corrupt_catalog(
    backend: &Arc<dyn Backend>,
    codec: &Codec,
    path: &Path,
    repo_id: &str,
    read_only: bool,
    no_lock: bool,
    cause: &IndexError,
) -> Result<(Catalog, Option<LockGuard>, Option<PathBuf>), RepoError> {
    let (reason, shown) = match cause {
        IndexError::Corrupt { reason, path } => (reason.clone(), path.clone()),
        other => (other.to_string(), path.display().to_string()),
    };
    let cannot = |why: String| RepoError::CatalogCorrupt {
        path: shown.clone(),
        reason: reason.clone(),
        why,
    };
    if read_only {
        let (catalog, _) = fresh_catalog(path, repo_id, true)?;
        return Ok((catalog, None, None));
    }
    if no_lock {
        return Err(cannot(
            "--no-lock was given and replacing it needs the exclusive lock".into(),
        ));
    }
    let guard = match lock::acquire(backend.clone(), codec, true, "catalog rebuild") {
        Ok(g) => g,
        Err(e) => return Err(cannot(format!("the exclusive lock is not free ({e})"))),
    };
    // Another process may have replaced it while this one waited.
    if let Ok((catalog, _)) = Catalog::open(path, repo_id) {
        if catalog.snapshots().is_ok() {
            return Ok((catalog, Some(guard), None));
        }
    }
    let (catalog, aside) = fresh_catalog(path, repo_id, false)?;
    Ok((catalog, Some(guard), aside))
}

/// An empty catalog in place of a damaged one, whose connections are all
/// closed: a private cache copy is deleted, the repository's own file
/// moved aside (its new name returned).
fn fresh_catalog(
    path: &Path,
    repo_id: &str,
    cache_copy: bool,
) -> Result<(Catalog, Option<PathBuf>), RepoError> {
    let aside = if cache_copy {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
        None
    } else {
        Some(crate::index::move_aside(path)?)
    };
    let (catalog, _) = Catalog::open(path, repo_id)?;
    Ok((catalog, aside))
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
        Ok(Self::init_at(&Location::Local(path.to_path_buf()), options)?.0)
    }

    /// Creates a repository at `location`: an empty or missing folder, or
    /// an S3 prefix without a `config` (the bucket is created if missing).
    pub fn init_at(
        location: &Location,
        options: &InitOptions,
    ) -> Result<(RepoConfig, Option<ObjectName>), RepoError> {
        let shown = location.to_string();
        if !snapshot::valid_block_size(options.block_size) {
            return Err(RepoError::Invalid(format!(
                "block size {} must be a power of two between 512 and 16 MiB",
                options.block_size
            )));
        }
        // The object store's settings and credentials first (no request
        // yet), then the password: nothing is created if either is missing.
        let s3 = match location {
            Location::S3 { .. } => Some(location.s3_backend()?.expect("an S3 location")),
            Location::Local(_) => None,
        };
        // The password: nothing is created if it cannot be had.
        let encryption = match &options.encryption {
            Some(new) => {
                let pw = new.password.get().map_err(RepoError::PasswordUnavailable)?;
                if pw.is_empty() {
                    return Err(RepoError::Invalid("an empty password is refused".into()));
                }
                Some(NewKey {
                    password: PasswordSource::fixed(&pw),
                    kdf: new.kdf,
                })
            }
            None => None,
        };
        let encrypted = encryption.is_some();
        let config = RepoConfig {
            version: if encrypted {
                config::ENCRYPTED_VERSION
            } else {
                config::FORMAT_VERSION
            },
            id: hex::encode(rand::random::<[u8; 32]>()),
            created: Utc::now(),
            block_size: options.block_size,
            hash: if encrypted {
                config::KEYED_HASH.into()
            } else {
                "blake3".into()
            },
            compression: "zstd".into(),
            compression_level: options.compression_level,
            pack_size_target_bytes: options.pack_size_target_bytes,
        };
        let master = encrypted.then(MasterSecret::random);
        // Validate what we are about to write exactly as a reader would.
        let bytes = match &master {
            None => {
                let bytes = config::encode(&config);
                config::decode(&bytes).map_err(|e| RepoError::Invalid(e.to_string()))?;
                bytes
            }
            Some(m) => {
                let keys = Keys::derive(m);
                let id = config_id_bytes(&config.id);
                let sealed = crate::crypto::seal(
                    keys.object_key(),
                    &Bound::Config(id),
                    &config::encode_body(&config),
                );
                let bytes = config::encode_encrypted(&config.id, &sealed);
                let back = match config::decode_outer(&bytes) {
                    Ok(config::Outer::Encrypted { sealed, .. }) => {
                        crate::crypto::open(keys.object_key(), &Bound::Config(id), &sealed)
                            .map_err(|e| RepoError::Invalid(e.to_string()))
                            .and_then(|body| {
                                config::decode_body(&config.id, &body)
                                    .map_err(|e| RepoError::Invalid(e.to_string()))
                            })?
                    }
                    other => {
                        return Err(RepoError::Invalid(format!(
                            "encrypted config does not decode: {other:?}"
                        )))
                    }
                };
                if back != config {
                    return Err(RepoError::Invalid(
                        "encrypted config does not read back (verify before write)".into(),
                    ));
                }
                bytes
            }
        };
        // The first key object, written before the config (a folder or
        // prefix without a config is not a repository yet).
        let write_first_key = |backend: &dyn Backend| -> Result<Option<ObjectName>, RepoError> {
            match (&master, &encryption) {
                (Some(m), Some(new)) => Ok(Some(keys::write_key(backend, &config.id, m, new)?)),
                _ => Ok(None),
            }
        };
        let (catalog_path, key) = match location {
            Location::Local(path) => {
                let key = Self::init_local(path, &bytes, &write_first_key)?;
                let catalog = if encrypted {
                    remote_catalog_path(&config.id)?
                } else {
                    path.join(CATALOG_FILE)
                };
                (catalog, key)
            }
            Location::S3 { .. } => {
                let s3 = s3.expect("built above for an S3 location");
                let policy = crate::backend::retry::RetryPolicy::from_env();
                let counter = Default::default();
                let retried = |op: &dyn Fn() -> Result<bool, BackendError>| {
                    crate::backend::retry::with_retries(&policy, &counter, |_| op())
                };
                retried(&|| s3.ensure_bucket())?;
                for kind in [Kind::Snapshot, Kind::Pack, Kind::Key] {
                    if retried(&|| Ok(!s3.list(kind)?.is_empty()))? {
                        return Err(RepoError::AlreadyExists { location: shown });
                    }
                }
                // Through the retrying wrapper, as every later write.
                let retrying = location.remote_backend()?.expect("an S3 location");
                let key = write_first_key(retrying.as_ref())?;
                if !retried(&|| s3.save_if_absent(Kind::Config, "config", &bytes))? {
                    // Another init won: our key wraps a secret nobody uses.
                    if let Some(k) = key {
                        let _ = s3.remove(Kind::Key, &k.to_hex());
                    }
                    return Err(RepoError::AlreadyExists { location: shown });
                }
                (remote_catalog_path(&config.id)?, key)
            }
        };
        // An empty, complete catalog: the first open has nothing to rebuild.
        Catalog::open(&catalog_path, &config.id)?
            .0
            .mark_complete()?;
        Ok((config, key))
    }

    fn init_local(
        path: &Path,
        config_bytes: &[u8],
        before_config: &BeforeConfig<'_>,
    ) -> Result<Option<ObjectName>, RepoError> {
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
        let backend = LocalBackend::new(path);
        backend.create_layout().map_err(|source| RepoError::Io {
            what: format!("create repository folders in '{location}'"),
            source,
        })?;
        let key = before_config(&backend)?;
        backend.save(Kind::Config, "config", config_bytes)?;
        Ok(key)
    }

    /// Opens a repository; rebuilds the catalog when it is missing or stale
    /// and brings its snapshot table up to date with `snapshots/`.
    pub fn open(path: &Path) -> Result<Repository, RepoError> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// [`Repository::open`] with options. On storage that refuses writes
    /// the catalog is copied into (or rebuilt in) a private cache folder
    /// and no lock is taken (spec: format-spec/04-catalog.md#read-only).
    pub fn open_with(path: &Path, options: &OpenOptions) -> Result<Repository, RepoError> {
        Self::open_at(&Location::Local(path.to_path_buf()), options)
    }

    /// [`Repository::open_with`] for any location. On object storage the
    /// catalog is this machine's cache (spec: format-spec/04-catalog.md#remote).
    pub fn open_at(location: &Location, options: &OpenOptions) -> Result<Repository, RepoError> {
        let remote = location.remote_backend()?;
        let is_remote = remote.is_some();
        let backend = match (remote, location) {
            (Some(b), _) => b,
            // The local folder; in debug builds a test may wrap or replace it.
            (None, Location::Local(path)) => crate::backend::fault::open_backend(path),
            (None, Location::S3 { .. }) => unreachable!("an S3 location has a remote backend"),
        };
        let bytes = match backend.load(Kind::Config, "config") {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(RepoError::NotARepository {
                    location: location.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let outer = config::decode_outer(&bytes)
            .map_err(|e| RepoError::corrupt(Kind::Config, "config", e))?;
        let (config, unlocked) = match outer {
            config::Outer::Plain(c) => (c, None),
            config::Outer::Encrypted { id, sealed } => {
                let password =
                    options
                        .password
                        .as_ref()
                        .ok_or_else(|| RepoError::PasswordRequired {
                            location: location.to_string(),
                        })?;
                let unlocked =
                    keys::find_key(backend.as_ref(), &id, &location.to_string(), password)?;
                let k = Keys::derive(&unlocked.master);
                let body = crate::crypto::open(
                    k.object_key(),
                    &Bound::Config(config_id_bytes(&id)),
                    &sealed,
                )
                .map_err(|e| RepoError::corrupt(Kind::Config, "config", e))?;
                let c = config::decode_body(&id, &body)
                    .map_err(|e| RepoError::corrupt(Kind::Config, "config", e))?;
                (c, Some(unlocked))
            }
        };
        let codec = match &unlocked {
            None => Codec::Plain,
            Some(u) => Codec::Sealed(Arc::new(Keys::derive(&u.master))),
        };
        let encrypted = unlocked.is_some();
        let read_only = !backend.probe_writable();
        let (catalog_path, cache_dir) = match location {
            Location::S3 { .. } => (remote_catalog_path(&config.id)?, None),
            // The catalog holds snapshot metadata in the clear: never in
            // an encrypted repository's folder (spec: 09-encryption.md#catalog).
            Location::Local(_) if encrypted => (remote_catalog_path(&config.id)?, None),
            Location::Local(path) if read_only => {
                let dir = private_cache_dir(&config.id);
                (copy_catalog(path, &dir)?, Some(dir))
            }
            Location::Local(path) => (path.join(CATALOG_FILE), None),
        };
        let mut held: Option<LockGuard> = None;
        let mut replaced = None;
        let (catalog, mut state) = match Catalog::open(&catalog_path, &config.id) {
            Err(e) if e.is_corrupt() => {
                let (catalog, guard, aside) = replace_corrupt_catalog(
                    &backend,
                    &codec,
                    &catalog_path,
                    &config.id,
                    read_only,
                    options.no_lock,
                    &e,
                )?;
                held = guard;
                replaced = Some((e.to_string(), aside));
                (catalog, OpenState::Reset)
            }
            other => other?,
        };
        let mut repo = Repository {
            backend,
            root: location.local_path().map(Path::to_path_buf),
            config,
            codec,
            unlocked,
            catalog: Mutex::new(catalog),
            catalog_rebuilt: false,
            unreadable_snapshots: Vec::new(),
            catalog_incomplete: None,
            catalog_replaced: None,
            lock_health: Mutex::new(None),
            read_only,
            no_lock: options.no_lock,
            catalog_path,
            cache_dir,
            remote: is_remote || encrypted,
            notices: Mutex::new(Vec::new()),
        };
        if state == OpenState::Current {
            // A damaged page met by the first statements is handled as one
            // found by quick_check.
            match repo.sync_snapshots() {
                Err(RepoError::Index(e)) if e.is_corrupt() => {
                    // Every connection to the damaged file closes first.
                    *repo.catalog.get_mut().expect("catalog mutex") = Catalog::detached()?;
                    let (catalog, guard, aside) = replace_corrupt_catalog(
                        &repo.backend,
                        &repo.codec,
                        &repo.catalog_path,
                        &repo.config.id,
                        read_only,
                        options.no_lock,
                        &e,
                    )?;
                    *repo.catalog.get_mut().expect("catalog mutex") = catalog;
                    held = guard;
                    replaced = Some((e.to_string(), aside));
                    state = OpenState::Reset;
                }
                other => other?,
            }
        }
        repo.catalog_replaced = replaced;
        if state == OpenState::Reset {
            // Under a shared lock, one transaction; a process that waited
            // for another's rebuild finds the catalog complete and skips it
            // (spec: format-spec/04-catalog.md#rebuild). A damaged catalog
            // was replaced under the exclusive lock, still held here.
            let lock = match held.take() {
                Some(guard) => Ok(guard),
                None => repo.lock(false, "catalog rebuild"),
            };
            match lock {
                Ok(lock) => {
                    let rebuilt = repo.rebuild_catalog_if(true, &crate::progress::NoProgress);
                    drop(lock);
                    // Released: the command's own lock is the one to watch.
                    *repo.lock_health.lock().expect("lock health") = None;
                    if rebuilt?.is_some() {
                        repo.catalog_rebuilt = true;
                    }
                }
                // An exclusive holder (or an unreadable lock) stops the
                // rebuild, not lock-free commands such as `unlock`: the
                // catalog stays incomplete (rebuilt by the next open), and
                // any command that locks fails on the same conflict.
                Err(RepoError::Lock(e @ LockError::Conflict { .. })) => {
                    repo.catalog_incomplete = Some(e.to_string());
                    repo.sync_snapshots()?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(repo)
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// How this repository's block ids are computed and objects stored.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    pub fn is_encrypted(&self) -> bool {
        self.codec.is_sealed()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// The local folder; None on object storage.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The shared catalog connection.
    pub fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().expect("catalog mutex poisoned")
    }

    /// A new connection to the catalog, for another thread.
    pub fn open_catalog(&self) -> Result<Catalog, RepoError> {
        Ok(Catalog::reopen(&self.catalog_path, &self.config.id)?)
    }

    /// Whether the storage refuses writes (then no lock is taken and the
    /// catalog lives in [`Repository::catalog_path`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether locks are skipped (read-only storage or `--no-lock`).
    pub fn locks_skipped(&self) -> bool {
        self.read_only || self.no_lock
    }

    pub fn catalog_path(&self) -> &Path {
        &self.catalog_path
    }

    /// Takes a shared or exclusive lock (spec: format-spec/05-locks.md).
    /// On read-only storage or with `--no-lock` a shared lock is skipped
    /// (the command only reads); an exclusive one, and `backup`, fail.
    pub fn lock(&self, exclusive: bool, command: &str) -> Result<LockGuard, RepoError> {
        if self.locks_skipped() {
            if exclusive || command == "backup" {
                return Err(RepoError::LockRequired {
                    command: command.to_string(),
                    why: if self.read_only {
                        format!("'{}' is on read-only storage", self.location())
                    } else {
                        "--no-lock was given; run it without --no-lock".to_string()
                    },
                });
            }
            return Ok(LockGuard::skipped(self.backend.clone()));
        }
        let guard = lock::acquire(self.backend.clone(), &self.codec, exclusive, command)?;
        *self.lock_health.lock().expect("lock health") = Some(guard.health());
        if self.remote {
            // Under the lock no prune can remove a pack: from here on the
            // catalog names no pack that is gone.
            self.sync_packs()?;
        }
        Ok(guard)
    }

    /// Brings this machine's catalog of a repository on object storage up
    /// to date with the packs listed there: rows of packs another machine
    /// removed are dropped (a backup must never deduplicate against them),
    /// packs another machine wrote are added from their trailers
    /// (spec: format-spec/04-catalog.md#remote).
    fn sync_packs(&self) -> Result<(), RepoError> {
        let listed: HashMap<ObjectName, u64> = self
            .backend
            .list(Kind::Pack)?
            .into_iter()
            .filter_map(|(name, size)| name.parse::<ObjectName>().ok().map(|n| (n, size)))
            .collect();
        let known: std::collections::HashSet<ObjectName> = self
            .catalog()
            .packs()?
            .into_iter()
            .map(|(name, _, _)| name)
            .collect();
        for gone in known.iter().filter(|n| !listed.contains_key(n)) {
            self.catalog().remove_pack(gone)?;
        }
        let unknown: HashMap<ObjectName, u64> = listed
            .into_iter()
            .filter(|(n, _)| !known.contains(n))
            .collect();
        self.adopt_packs(unknown, true, &crate::progress::NoProgress)?;
        Ok(())
    }

    /// Fails once the lock taken last could not be refreshed for the
    /// give-up time: called before every step that relies on the lock
    /// (committing a snapshot, removing an object).
    /// spec: format-spec/05-locks.md#refresh
    pub fn ensure_lock_held(&self) -> Result<(), RepoError> {
        match &*self.lock_health.lock().expect("lock health") {
            Some(h) => Ok(h.check()?),
            None => Ok(()),
        }
    }

    /// Fails unless the lock taken last through [`Repository::lock`] is an
    /// exclusive one, still held and healthy: for engines that remove
    /// objects a running backup or restore may need.
    pub fn ensure_exclusive_lock(&self, command: &str) -> Result<(), RepoError> {
        let health = self.lock_health.lock().expect("lock health").clone();
        let why = match &health {
            None => "no lock is held",
            Some(h) if !h.is_held_exclusive() => "the lock held is shared or released",
            Some(h) => return Ok(h.check()?),
        };
        Err(RepoError::ExclusiveLockRequired {
            command: command.to_string(),
            why: why.to_string(),
        })
    }

    /// Reads one pack's footer and trailer (two range reads).
    pub fn read_pack_index(
        &self,
        name: &str,
        size: u64,
    ) -> Result<Vec<pack_layout::TrailerEntry>, RepoError> {
        self.read_pack_listing(name, size).map(|l| l.entries)
    }

    /// [`Self::read_pack_index`], with the name the pack's tail calls for
    /// when the pack is named by its tail (trailer format 1).
    pub fn read_pack_listing(&self, name: &str, size: u64) -> Result<PackListing, RepoError> {
        let bad = |e: FormatError| RepoError::corrupt(Kind::Pack, name, e);
        if size < (pack_layout::HEADER_LEN + pack_layout::FOOTER_LEN) as u64 {
            return Err(bad(FormatError::Truncated {
                what: "pack",
                needed: (pack_layout::HEADER_LEN + pack_layout::FOOTER_LEN) as u64,
                available: size,
            }));
        }
        let framing = self.codec.framing();
        let mut header = [0u8; pack_layout::HEADER_LEN];
        self.backend.load_into(Kind::Pack, name, 0, &mut header)?;
        pack_layout::decode_header_framed(&header, framing).map_err(bad)?;
        let mut footer = [0u8; pack_layout::FOOTER_LEN];
        self.backend
            .load_into(Kind::Pack, name, size - footer.len() as u64, &mut footer)?;
        let trailer_len = pack_layout::decode_footer_framed(&footer, size, framing).map_err(bad)?;
        let mut trailer = vec![0u8; trailer_len as usize];
        self.backend.load_into(
            Kind::Pack,
            name,
            size - (pack_layout::FOOTER_LEN as u64) - trailer_len as u64,
            &mut trailer,
        )?;
        let plain = self
            .codec
            .open_trailer(&trailer)
            .map_err(|e| RepoError::corrupt(Kind::Pack, name, format!("trailer: {e}")))?;
        let entries = pack_layout::decode_trailer_framed(
            &plain,
            trailer_len as u64,
            size,
            self.config.block_size,
            framing,
        )
        .map_err(bad)?;
        let tail_name = (pack_layout::naming(&plain) == pack_layout::Naming::Tail).then(|| {
            trailer.extend_from_slice(&footer);
            ObjectName::of(&trailer)
        });
        Ok(PackListing { entries, tail_name })
    }

    /// The packs an index object lists, from its stored bytes (opened when
    /// sealed), or why it cannot be used.
    pub fn decode_index_object(
        &self,
        bytes: &[u8],
    ) -> Result<Vec<crate::format::index::IndexedPack>, String> {
        let plain = self
            .codec
            .open_object(Bound::Index, bytes)
            .map_err(|e| e.to_string())?;
        crate::format::index::decode_framed(&plain, self.config.block_size, self.codec.framing())
            .map_err(|e| e.to_string())
    }

    /// Rebuilds the catalog from the packs and snapshot objects alone, in
    /// one SQLite transaction; known damage is kept
    /// (spec: format-spec/04-catalog.md#rebuild). Returns the packs that
    /// could not be read (name, reason).
    pub fn rebuild_catalog(
        &mut self,
        progress: &dyn crate::progress::Progress,
    ) -> Result<Vec<(String, String)>, RepoError> {
        // Whatever its size, a damaged file is moved aside first: the
        // caller holds the exclusive lock (spec: format-spec/04-catalog.md#corrupt).
        let check = self.catalog().quick_check();
        if let Err(e) = check {
            if !e.is_corrupt() {
                return Err(e.into());
            }
            *self.catalog.get_mut().expect("catalog mutex") = Catalog::detached()?;
            let (catalog, aside) =
                fresh_catalog(&self.catalog_path, &self.config.id, self.read_only)?;
            *self.catalog.get_mut().expect("catalog mutex") = catalog;
            self.catalog_replaced = Some((e.to_string(), aside));
        }
        Ok(self
            .rebuild_catalog_if(false, progress)?
            .unwrap_or_default())
    }

    /// The rebuild; with `only_if_incomplete`, nothing is done (None) when
    /// another process completed the catalog while this one waited.
    fn rebuild_catalog_if(
        &mut self,
        only_if_incomplete: bool,
        progress: &dyn crate::progress::Progress,
    ) -> Result<Option<Vec<(String, String)>>, RepoError> {
        if !self.catalog().begin_rebuild(only_if_incomplete)? {
            self.sync_snapshots()?;
            return Ok(None);
        }
        let result = self.fill_catalog(progress);
        let mut catalog = self.catalog();
        match result {
            Ok(skipped) => {
                catalog.finish_rebuild()?;
                Ok(Some(skipped))
            }
            Err(e) => {
                catalog.abort_rebuild();
                Err(e)
            }
        }
    }

    fn fill_catalog(
        &mut self,
        progress: &dyn crate::progress::Progress,
    ) -> Result<Vec<(String, String)>, RepoError> {
        let mut skipped = Vec::new();
        let mut unknown = HashMap::new();
        for (name, size) in self.backend.list(Kind::Pack)? {
            match name.parse::<ObjectName>() {
                Ok(pack) => {
                    unknown.insert(pack, size);
                }
                Err(_) => skipped.push((name, "not a pack name".to_string())),
            }
        }
        // On object storage index objects save a read per pack; a local
        // rebuild reads every trailer (they are the packs' own word).
        skipped.extend(self.adopt_packs(unknown, self.remote, progress)?);
        self.sync_snapshots()?;
        Ok(skipped)
    }

    /// Adds `unknown` packs (listed, not in the catalog; name -> size):
    /// with `use_index`, first from the index objects this catalog has
    /// not read yet, then every other one from its trailer. Returns the
    /// packs skipped (vanished, damaged) and why; a read that fails stops.
    fn adopt_packs(
        &self,
        mut unknown: HashMap<ObjectName, u64>,
        use_index: bool,
        progress: &dyn crate::progress::Progress,
    ) -> Result<Vec<(String, String)>, RepoError> {
        progress.set_total(unknown.len() as u64);
        if use_index && !unknown.is_empty() {
            let seen = self.catalog().index_seen()?;
            for (hex, _) in self.backend.list(Kind::Index)? {
                if unknown.is_empty() {
                    break;
                }
                let Ok(name) = hex.parse::<ObjectName>() else {
                    continue;
                };
                if seen.contains(&name) {
                    continue;
                }
                let bytes = match self.backend.load(Kind::Index, &hex) {
                    Ok(b) => b,
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e.into()),
                };
                // A damaged index object is passed over: its packs' own
                // trailers are read instead (check reports it).
                if ObjectName::of(&bytes) != name {
                    continue;
                }
                let Ok(packs) = self.decode_index_object(&bytes) else {
                    continue;
                };
                for p in packs {
                    if unknown.get(&p.name) == Some(&p.size_bytes) {
                        self.catalog().add_pack(&p.name, p.size_bytes, &p.entries)?;
                        unknown.remove(&p.name);
                        progress.advance(1);
                    }
                }
                self.catalog().mark_index_seen(&name)?;
            }
        }
        let mut skipped = Vec::new();
        for (pack, size) in unknown {
            progress.advance(1);
            let name = pack.to_hex();
            match self.read_pack_index(&name, size) {
                Ok(entries) => self.catalog().add_pack(&pack, size, &entries)?,
                // A pack that vanished since the listing has nothing to add.
                Err(RepoError::Backend(e)) if e.is_not_found() => {
                    skipped.push((name, e.to_string()))
                }
                // A read that failed says nothing about the pack: a catalog
                // completed without it would lose its blocks until the next
                // rebuild. The rebuild fails (the catalog stays incomplete,
                // so the next open rebuilds again); the error names the pack.
                Err(RepoError::Backend(e)) => return Err(RepoError::Backend(e)),
                // A damaged pack is skipped; check reports it.
                Err(e) => skipped.push((name, e.to_string())),
            }
        }
        Ok(skipped)
    }

    /// Tells the user something through the command (see `take_notices`).
    pub fn notice(&self, line: String) {
        let mut n = self.notices.lock().unwrap_or_else(|e| e.into_inner());
        if n.len() < MAX_NOTICES {
            n.push(line);
        } else if n.len() == MAX_NOTICES {
            n.push("more notices were dropped".to_string());
        }
    }

    /// The notices gathered since the last call, oldest first.
    pub fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut *self.notices.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every stored copy of `block` not recorded as damaged, found by
    /// reading every pack's trailer (the catalog names one copy only): for
    /// a reader whose copy failed verification, to try before failing
    /// (spec: format-spec/06-ordering.md#reading). Costly; failure path only.
    pub fn intact_copies(
        &self,
        block: &crate::format::BlockId,
    ) -> Result<Vec<(crate::index::BlockLocation, u64)>, RepoError> {
        Ok(self
            .intact_copies_many(std::slice::from_ref(block))?
            .remove(block)
            .unwrap_or_default())
    }

    /// [`Repository::intact_copies`] of several blocks with one pass over
    /// the packs. A catalog that cannot list its damage is no reason to
    /// give up: every copy is verified by the reader anyway.
    pub fn intact_copies_many(
        &self,
        blocks: &[crate::format::BlockId],
    ) -> Result<HashMap<crate::format::BlockId, Vec<(crate::index::BlockLocation, u64)>>, RepoError>
    {
        let wanted: std::collections::HashSet<crate::format::BlockId> =
            blocks.iter().copied().collect();
        let damaged: std::collections::HashSet<(crate::format::BlockId, ObjectName)> =
            match self.catalog().damaged() {
                Ok(d) => d
                    .into_iter()
                    .filter(|d| wanted.contains(&d.block))
                    .map(|d| (d.block, d.pack))
                    .collect(),
                Err(_) => Default::default(),
            };
        let mut out: HashMap<_, Vec<_>> = HashMap::new();
        for (name, size) in self.backend.list(Kind::Pack)? {
            let Ok(pack) = name.parse::<ObjectName>() else {
                continue;
            };
            let Ok(entries) = self.read_pack_index(&name, size) else {
                continue;
            };
            for e in entries.iter().filter(|e| wanted.contains(&e.block_id)) {
                if damaged.contains(&(e.block_id, pack)) {
                    continue;
                }
                out.entry(e.block_id).or_default().push((
                    crate::index::BlockLocation {
                        pack,
                        offset: e.offset,
                        stored_length: e.stored_length,
                        raw_length: e.raw_length,
                    },
                    size,
                ));
            }
        }
        Ok(out)
    }

    /// Points the catalog at `location`, a copy of `block` the caller has
    /// just read and verified, when the copy it named is damaged
    /// (spec: format-spec/04-catalog.md#damaged).
    pub fn use_copy(
        &self,
        block: &crate::format::BlockId,
        location: &crate::index::BlockLocation,
        pack_size_bytes: u64,
    ) -> Result<(), RepoError> {
        // The whole pack is adopted (it may have had no rows); only rows
        // naming damaged copies move to it.
        let entries = self.read_pack_index(&location.pack.to_hex(), pack_size_bytes)?;
        if !entries.iter().any(|e| {
            e.block_id == *block
                && e.offset == location.offset
                && e.stored_length == location.stored_length
        }) {
            return Err(RepoError::Invalid(format!(
                "pack {} holds no copy of block {block} at offset {}",
                location.pack, location.offset
            )));
        }
        Ok(self
            .catalog()
            .add_pack(&location.pack, pack_size_bytes, &entries)?)
    }

    /// Records that the copy of `block` in `pack` failed verification, so
    /// no backup deduplicates against it and the next one that reads the
    /// block stores it again. Every reader that finds a damaged blob calls
    /// this (spec: format-spec/04-catalog.md#damaged).
    pub fn mark_damaged(
        &self,
        block: &crate::format::BlockId,
        pack: &ObjectName,
        reason: &str,
    ) -> Result<(), RepoError> {
        Ok(self.catalog().mark_damaged(block, pack, reason)?)
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

    /// Ids whose highest generation is claimed by more than one object,
    /// each as the error readers return for it
    /// (spec: format-spec/03-snapshot.md#identity).
    pub fn duplicate_snapshots(&self) -> Result<Vec<RepoError>, RepoError> {
        let mut by_id: HashMap<SnapshotId, (u32, Vec<ObjectName>)> = HashMap::new();
        for (object, meta) in self.catalog().snapshots()? {
            let e = by_id
                .entry(meta.id)
                .or_insert((meta.generation, Vec::new()));
            if meta.generation > e.0 {
                *e = (meta.generation, Vec::new());
            }
            if meta.generation == e.0 {
                e.1.push(object);
            }
        }
        let mut out: Vec<(SnapshotId, u32, Vec<ObjectName>)> = by_id
            .into_iter()
            .filter(|(_, (_, objects))| objects.len() > 1)
            .map(|(id, (generation, objects))| (id, generation, objects))
            .collect();
        out.sort_by_key(|d| d.0);
        Ok(out
            .into_iter()
            .map(|(id, generation, mut objects)| {
                objects.sort();
                RepoError::DuplicateSnapshot {
                    id,
                    generation,
                    objects: objects
                        .iter()
                        .map(|o| o.to_hex())
                        .collect::<Vec<_>>()
                        .join(" and "),
                }
            })
            .collect())
    }

    /// Fails when the live generation of `id` is claimed by several objects.
    fn ensure_unique(&self, id: SnapshotId) -> Result<(), RepoError> {
        self.live_object(id).map(|_| ())
    }

    /// The live object of snapshot `id` (its highest generation), found
    /// through the catalog's index on ids; a live generation claimed by two
    /// objects is an error.
    fn live_object(&self, id: SnapshotId) -> Result<ObjectName, RepoError> {
        let objects: Vec<(ObjectName, u32)> = self
            .catalog()
            .snapshots_with_id(id)?
            .into_iter()
            .filter(|(_, m)| m.id == id)
            .map(|(o, m)| (o, m.generation))
            .collect();
        let top = objects.iter().map(|o| o.1).max();
        let at_top: Vec<&(ObjectName, u32)> = objects.iter().filter(|o| Some(o.1) == top).collect();
        if at_top.len() > 1 {
            let mut names: Vec<String> = at_top.iter().map(|o| o.0.to_hex()).collect();
            names.sort();
            return Err(RepoError::DuplicateSnapshot {
                id,
                generation: top.unwrap_or_default(),
                objects: names.join(" and "),
            });
        }
        match at_top.first() {
            Some(o) => Ok(o.0),
            None => Err(RepoError::SnapshotNotFound { query: id.to_hex() }),
        }
    }

    /// Live snapshots (highest generation of each id), oldest first. An id
    /// whose live generation is claimed twice is listed once; every read
    /// of it ([`Repository::find_snapshot`], [`Repository::load_chain`])
    /// fails with [`RepoError::DuplicateSnapshot`].
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
            1 => {
                let found = matches.into_iter().next().expect("one match");
                self.ensure_unique(found.meta.id)?;
                Ok(found)
            }
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

    /// The chain of snapshot objects from the full manifest to `id`, oldest
    /// first (version 2 objects without their pages).
    pub fn load_chain(&self, id: SnapshotId) -> Result<Vec<Snapshot>, RepoError> {
        // Parent by parent through the catalog's index on ids: the work
        // grows with the chain, not with the number of snapshots.
        let mut chain: Vec<Snapshot> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = Some(id);
        while let Some(id) = next {
            if !seen.insert(id) {
                return Err(RepoError::Invalid(format!(
                    "snapshot {id}: parent chain loops"
                )));
            }
            let object = self.live_object(id)?;
            let obj = self.load_snapshot(&object)?;
            next = obj.meta.parent;
            chain.push(obj);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The resolved block map of snapshot `id`, whole in memory (40 bytes
    /// per data block): for small disks and tests. Readers of whole disks
    /// go range by range ([`Repository::chain_reader`]).
    pub fn resolve(&self, id: SnapshotId) -> Result<BlockMap, RepoError> {
        self.chain_reader(id)?.collect_map()
    }

    /// Writes a snapshot object (after its blocks are durable) and records it.
    /// Loads index object `name`: None when it is gone, else its packs or
    /// why it cannot be used (content not matching its name, undecodable).
    pub fn load_index(
        &self,
        name: &ObjectName,
    ) -> Result<Option<Result<Vec<crate::format::index::IndexedPack>, String>>, RepoError> {
        let bytes = match self.backend.load(Kind::Index, &name.to_hex()) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if ObjectName::of(&bytes) != *name {
            return Ok(Some(Err("content does not match its name".into())));
        }
        Ok(Some(
            self.decode_index_object(&bytes)
                .map_err(|e| format!("undecodable ({e})")),
        ))
    }

    /// Writes index objects listing `packs`, which are durable
    /// (spec: format-spec/08-index.md, 06-ordering.md#backup): each
    /// encoded, checked as a reader would decode it, named by its hash.
    pub fn write_index(
        &self,
        packs: Vec<crate::format::index::IndexedPack>,
    ) -> Result<(), RepoError> {
        self.write_index_split(packs, crate::format::index::MAX_INDEX_ENTRIES)
            .map(|_| ())
    }

    /// [`Self::write_index`] with objects of at most `max_entries`
    /// entries; returns the names of the objects it wrote.
    pub(crate) fn write_index_split(
        &self,
        packs: Vec<crate::format::index::IndexedPack>,
        max_entries: usize,
    ) -> Result<Vec<ObjectName>, RepoError> {
        use crate::format::index;
        let mut written = Vec::new();
        for part in index::split_at(packs, max_entries) {
            let plain = index::encode(&part);
            index::decode_framed(&plain, self.config.block_size, self.codec.framing()).map_err(
                |e| RepoError::Invalid(format!("index object about to be written: {e}")),
            )?;
            let bytes = self.codec.seal_object(Bound::Index, plain).map_err(|e| {
                RepoError::Invalid(format!("index object about to be written: {e}"))
            })?;
            let name = ObjectName::of(&bytes);
            self.ensure_lock_held()?;
            self.backend.save(Kind::Index, &name.to_hex(), &bytes)?;
            written.push(name);
        }
        Ok(written)
    }

    /// Writes a snapshot object whose pages (version 2) are durable, and
    /// records it.
    pub fn commit_snapshot(&self, obj: &Snapshot) -> Result<ObjectName, RepoError> {
        self.before_commit()?;
        self.write_snapshot_object(obj)
    }

    /// Commits the snapshot objects of one group (a VM backup's disks and
    /// configuration), in order. A stop signal is honoured before the first
    /// and not between them, so a signal never splits the group.
    pub fn commit_snapshots<S: std::ops::Deref<Target = Snapshot>>(
        &self,
        objs: &[S],
    ) -> Result<Vec<ObjectName>, RepoError> {
        self.before_commit()?;
        objs.iter().map(|o| self.write_snapshot_object(o)).collect()
    }

    /// The last check point: nothing is committed after a stop signal
    /// (the test hooks come first, so a test's signal lands before it).
    fn before_commit(&self) -> Result<(), RepoError> {
        #[cfg(debug_assertions)]
        test_failpoint("commit_snapshot")?;
        #[cfg(debug_assertions)]
        test_delay("commit_snapshot");
        crate::interrupt::check()?;
        Ok(())
    }

    fn write_snapshot_object(&self, obj: &Snapshot) -> Result<ObjectName, RepoError> {
        self.ensure_lock_held()?;
        let plain = obj
            .encode()
            .map_err(|e| RepoError::Invalid(e.to_string()))?;
        let bytes = self
            .codec
            .seal_object(Bound::Snapshot, plain)
            .map_err(|e| RepoError::Invalid(format!("snapshot about to be written: {e}")))?;
        let name = ObjectName::of(&bytes);
        self.backend.save(Kind::Snapshot, &name.to_hex(), &bytes)?;
        #[cfg(debug_assertions)]
        test_kill("snapshot_durable");
        self.catalog().upsert_snapshot(&name, &obj.meta)?;
        Ok(name)
    }
}

/// Test hook, debug builds only: `CBTVAULT_TEST_DELAY=NAME:MS[,NAME:MS...]`
/// sleeps MS milliseconds at each pass through point NAME (e.g. to let a
/// lock go stale before a commit, or to make a backup last long enough to
/// be signalled).
#[cfg(debug_assertions)]
pub(crate) fn test_delay(name: &str) {
    let Ok(spec) = std::env::var("CBTVAULT_TEST_DELAY") else {
        return;
    };
    for item in spec.split(',') {
        if let Some((point, ms)) = item.split_once(':') {
            if point == name {
                if let Ok(ms) = ms.parse() {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
            }
        }
    }
}

/// Test hook, debug builds only: `CBTVAULT_TEST_KILL=NAME:N` ends the
/// process at once (`abort`: no destructor, no lock removal, no flush, as
/// a `kill -9` would) on the Nth pass through point NAME, so crash tests
/// can stop a command between two precise steps.
#[cfg(debug_assertions)]
pub(crate) fn test_kill(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("CBTVAULT_TEST_KILL") else {
        return;
    };
    let Some((point, n)) = spec.split_once(':') else {
        return;
    };
    if point != name {
        return;
    }
    let hit = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if n.parse::<u64>().is_ok_and(|n| n == hit) {
        std::process::abort();
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

/// What `init` writes before the config (the first key object).
type BeforeConfig<'a> = dyn Fn(&dyn Backend) -> Result<Option<ObjectName>, RepoError> + 'a;

/// The 32 bytes of a (validated) repository id.
fn config_id_bytes(id: &str) -> [u8; 32] {
    let mut b = [0u8; 32];
    hex::decode_to_slice(id, &mut b).expect("a validated 64-hex-digit repository id");
    b
}
