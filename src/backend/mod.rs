//! The backend: a dumb store of named immutable objects (save, load a range,
//! stat, list, remove). It knows nothing of packs or snapshots beyond which
//! folder a kind of object lives in. Retry, dry-run and the like are wrappers.
//!
//! spec: format-spec/01-layout.md

pub mod fault;
pub mod local;
pub mod powerloss;
pub mod retry;
pub mod s3;

use std::fmt;

pub use local::LocalBackend;

/// The kinds of object a repository stores; each maps to a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Config,
    Pack,
    Snapshot,
    Lock,
    /// Index objects (format-spec/08-index.md).
    Index,
    /// Key objects of encrypted repositories (format-spec/09-encryption.md).
    Key,
    /// Manifest pages of version 2 snapshots (format-spec/03-snapshot.md#pages).
    Page,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Config => "config",
            Kind::Pack => "pack",
            Kind::Snapshot => "snapshot",
            Kind::Lock => "lock",
            Kind::Index => "index object",
            Kind::Key => "key object",
            Kind::Page => "manifest page",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{kind} '{name}' not found")]
    NotFound { kind: Kind, name: String },
    /// Worth retrying (interrupted, timed out, throttled).
    #[error("{kind} '{name}': {op} failed (transient): {error}")]
    Transient {
        kind: Kind,
        name: String,
        op: &'static str,
        error: std::io::Error,
    },
    #[error("{kind} '{name}': {op} failed: {error}")]
    Permanent {
        kind: Kind,
        name: String,
        op: &'static str,
        error: std::io::Error,
    },
}

impl BackendError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound { .. })
    }

    pub(crate) fn from_io(kind: Kind, name: &str, op: &'static str, e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let name = name.to_string();
        match e.kind() {
            K::NotFound => BackendError::NotFound { kind, name },
            K::Interrupted | K::TimedOut | K::WouldBlock => BackendError::Transient {
                kind,
                name,
                op,
                error: e,
            },
            _ => BackendError::Permanent {
                kind,
                name,
                op,
                error: e,
            },
        }
    }
}

/// An object store. Every method is safe to call from many threads.
pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn location(&self) -> String;
    // Durable and atomic when it returns Ok: readers see all of it or nothing.
    // Replaces an object of the same name (names are content hashes or random).
    fn save(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError>;
    // Fills `buf` from `offset`; an object shorter than offset+len is an error.
    fn load_into(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackendError>;
    // Size in bytes of an existing object.
    fn stat(&self, kind: Kind, name: &str) -> Result<u64, BackendError>;
    // Every object of a kind with its size, in no particular order.
    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>, BackendError>;
    // Removing a missing object is NotFound.
    fn remove(&self, kind: Kind, name: &str) -> Result<(), BackendError>;

    /// Starts an object whose name is known only once all its bytes are
    /// (a pack is named by the hash of its tail): bytes are appended in
    /// order while the object is assembled, then [`NewObject::commit`]
    /// makes it durable and visible under its name as atomically as
    /// [`Backend::save`]. Dropped without a commit, it leaves nothing.
    /// The default keeps the bytes in memory and saves them at the commit.
    fn create(&self, kind: Kind) -> Result<Box<dyn NewObject + '_>, BackendError> {
        Ok(Box::new(InMemoryObject {
            backend: self,
            kind,
            data: Vec::new(),
        }))
    }

    /// Whether objects can be written here: false when the storage refuses
    /// writes (read-only file system, no permission). The default says yes.
    fn probe_writable(&self) -> bool {
        true
    }

    /// Whether [`Backend::create`] keeps the bytes in memory and saves
    /// them whole at the commit (object stores): then a wrapper may retry
    /// that save. Local files stream to `tmp/` instead.
    fn buffers_new_objects(&self) -> bool {
        false
    }

    /// How many requests to keep in flight when many objects or ranges
    /// are read or written: an object store answers each request after a
    /// round trip, so throughput needs several at once. `None` for local
    /// storage, which needs no more threads than the CPU has.
    fn parallel_requests(&self) -> Option<usize> {
        None
    }

    /// [`Backend::save`] of bytes the caller gives up: an object store
    /// sends them without a copy (a pack is tens of MiB).
    fn save_owned(&self, kind: Kind, name: &str, data: bytes::Bytes) -> Result<(), BackendError> {
        self.save(kind, name, &data)
    }

    /// Whole object.
    fn load(&self, kind: Kind, name: &str) -> Result<Vec<u8>, BackendError> {
        let len = self.stat(kind, name)?;
        let mut buf = vec![0u8; len as usize];
        self.load_into(kind, name, 0, &mut buf)?;
        Ok(buf)
    }
}

/// An object being written: see [`Backend::create`].
pub trait NewObject: Send {
    /// Appends `data` after the bytes appended so far.
    fn append(&mut self, data: &[u8]) -> Result<(), BackendError>;
    /// Makes the object durable under `name`.
    fn commit(self: Box<Self>, name: &str) -> Result<(), BackendError>;
}

/// [`Backend::create`] for backends that can only save whole objects.
pub(crate) struct InMemoryObject<'a, B: Backend + ?Sized> {
    pub(crate) backend: &'a B,
    pub(crate) kind: Kind,
    pub(crate) data: Vec<u8>,
}

impl<B: Backend + ?Sized> NewObject for InMemoryObject<'_, B> {
    fn append(&mut self, data: &[u8]) -> Result<(), BackendError> {
        self.data.extend_from_slice(data);
        Ok(())
    }

    fn commit(self: Box<Self>, name: &str) -> Result<(), BackendError> {
        let InMemoryObject {
            backend,
            kind,
            data,
        } = *self;
        backend.save_owned(kind, name, bytes::Bytes::from(data))
    }
}
