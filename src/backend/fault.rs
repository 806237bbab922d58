//! TEST-ONLY fault injection: a [`Backend`] that wraps another and makes a
//! seeded random share of its operations fail the way storage fails (EIO,
//! ENOSPC, a short write, an fsync that fails before or after the rename),
//! and the one hook through which a repository's backend is opened, so
//! the torture test (tests/integration/torture.rs) can reach a `cbtvault`
//! process it starts. It owns no repository logic and must never be active
//! in normal use: the hook is compiled into debug builds only (what `cargo
//! test` runs; the long run in bench/torture.sh turns debug assertions on in
//! its release build for the same reason), and it does nothing unless the
//! variable below is set.
//!
//! `CBTVAULT_TEST_FAULTS=SEED:RATE:KINDS`, e.g. `7:0.02:eio,enospc,short,fsync`:
//! each backend operation fails with probability RATE (0 < RATE <= 1),
//! decided by SEED and the operation's sequence number in the process (so a
//! single-threaded command replays exactly; a multi-threaded one replays the
//! same faults in the order its threads reach the backend). KINDS:
//! - `eio`: any operation (reads, listings, removals too) fails, doing nothing;
//! - `enospc`: a write (save, append, commit) fails, doing nothing;
//! - `short`: a write stores only a prefix of its bytes, then fails (ENOSPC);
//! - `fsync`: a commit or save fails at its fsync, either before the rename
//!   (nothing visible) or after it (the object IS visible although the
//!   caller was told it failed), and a removal fails after the unlink.
//!
//! Every injected error says "injected by CBTVAULT_TEST_FAULTS".

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Backend, BackendError, Kind, LocalBackend, NewObject};

/// The variable that turns fault injection on (debug builds only).
pub const FAULTS_VAR: &str = "CBTVAULT_TEST_FAULTS";

/// Which faults a [`FaultBackend`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultKinds {
    pub eio: bool,
    pub enospc: bool,
    pub short: bool,
    pub fsync: bool,
}

/// A parsed `CBTVAULT_TEST_FAULTS` value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSpec {
    pub seed: u64,
    /// Probability that one operation fails, in (0, 1].
    pub rate: f64,
    pub kinds: FaultKinds,
}

impl FaultSpec {
    /// Parses `SEED:RATE:KINDS`; a malformed value is an error naming the part.
    pub fn parse(text: &str) -> Result<FaultSpec, String> {
        let mut parts = text.trim().splitn(3, ':');
        let (Some(seed), Some(rate), Some(kinds)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{FAULTS_VAR}='{text}': expected SEED:RATE:KINDS"));
        };
        let seed: u64 = seed
            .parse()
            .map_err(|_| format!("{FAULTS_VAR}='{text}': seed '{seed}' is not a number"))?;
        let rate: f64 = rate
            .parse()
            .ok()
            .filter(|r: &f64| *r > 0.0 && *r <= 1.0)
            .ok_or_else(|| format!("{FAULTS_VAR}='{text}': rate '{rate}' is not in (0, 1]"))?;
        let mut k = FaultKinds::default();
        for kind in kinds.split(',') {
            match kind.trim() {
                "eio" => k.eio = true,
                "enospc" => k.enospc = true,
                "short" => k.short = true,
                "fsync" => k.fsync = true,
                other => {
                    return Err(format!(
                        "{FAULTS_VAR}='{text}': unknown kind '{other}' (eio, enospc, short, fsync)"
                    ))
                }
            }
        }
        Ok(FaultSpec {
            seed,
            rate,
            kinds: k,
        })
    }
}

/// Opens the backend of the repository at `path`: the local folder, wrapped
/// in a [`FaultBackend`] when a debug build runs with `CBTVAULT_TEST_FAULTS`
/// set, or the backend a test registered for that path in this process
/// ([`register_test_backend`]). Release builds always get the local folder.
///
/// # Panics
/// On a malformed `CBTVAULT_TEST_FAULTS` (a test mistake, never a user's).
pub fn open_backend(path: &Path) -> Arc<dyn Backend> {
    #[cfg(debug_assertions)]
    {
        if let Some(b) = test_backends()
            .lock()
            .expect("test backends")
            .get(path)
            .cloned()
        {
            return b;
        }
        if let Ok(text) = std::env::var(FAULTS_VAR) {
            let spec = FaultSpec::parse(&text).unwrap_or_else(|e| panic!("{e}"));
            return Arc::new(FaultBackend::new(Arc::new(LocalBackend::new(path)), spec));
        }
    }
    Arc::new(LocalBackend::new(path))
}

#[cfg(debug_assertions)]
type Registry = std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, Arc<dyn Backend>>>;

#[cfg(debug_assertions)]
fn test_backends() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// TEST-ONLY (debug builds): makes [`open_backend`] return `backend` for
/// the repository at `path` in this process, e.g. the power-loss model of
/// [`super::powerloss`]; `None` removes the registration.
#[cfg(debug_assertions)]
pub fn register_test_backend(path: &Path, backend: Option<Arc<dyn Backend>>) {
    let mut map = test_backends().lock().expect("test backends");
    match backend {
        Some(b) => map.insert(path.to_path_buf(), b),
        None => map.remove(path),
    };
}

/// What one operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Eio,
    Enospc,
    Short,
    FsyncBefore,
    FsyncAfter,
}

/// A backend whose operations fail at random (see the module comment).
pub struct FaultBackend {
    inner: Arc<dyn Backend>,
    spec: FaultSpec,
    ops: Arc<AtomicU64>,
}

impl FaultBackend {
    pub fn new(inner: Arc<dyn Backend>, spec: FaultSpec) -> Self {
        FaultBackend {
            inner,
            spec,
            ops: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Faults injected so far are not counted; operations are.
    pub fn operations(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }
}

/// splitmix64: a well-mixed 64-bit value for (seed, n).
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Decides the fault of the next operation; `write` and `commit` say which
/// kinds apply to it.
fn decide(spec: &FaultSpec, ops: &AtomicU64, write: bool, commit: bool) -> Fault {
    let n = ops.fetch_add(1, Ordering::SeqCst);
    let r = mix(spec.seed, n);
    if (r >> 11) as f64 / (1u64 << 53) as f64 >= spec.rate {
        return Fault::None;
    }
    let k = spec.kinds;
    let mut options = Vec::with_capacity(5);
    if k.eio {
        options.push(Fault::Eio);
    }
    if write && k.enospc {
        options.push(Fault::Enospc);
    }
    if write && k.short {
        options.push(Fault::Short);
    }
    if commit && k.fsync {
        options.push(Fault::FsyncBefore);
        options.push(Fault::FsyncAfter);
    }
    if options.is_empty() {
        return Fault::None;
    }
    options[(mix(spec.seed ^ 0x5eed, n) % options.len() as u64) as usize]
}

fn injected(kind: Kind, name: &str, op: &'static str, fault: Fault) -> BackendError {
    let what = match fault {
        Fault::Enospc | Fault::Short => "no space left on device",
        Fault::FsyncBefore | Fault::FsyncAfter => "fsync: input/output error",
        _ => "input/output error",
    };
    BackendError::Permanent {
        kind,
        name: name.to_string(),
        op,
        error: std::io::Error::other(format!("{what} (injected by {FAULTS_VAR})")),
    }
}

impl Backend for FaultBackend {
    fn probe_writable(&self) -> bool {
        self.inner.probe_writable()
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn save(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
        match decide(&self.spec, &self.ops, true, true) {
            Fault::None => self.inner.save(kind, name, data),
            Fault::Short => {
                // Part of the bytes reach a temporary object that is never
                // committed: what a failed write leaves behind.
                let mut o = self.inner.create(kind)?;
                o.append(&data[..data.len() / 2])?;
                drop(o);
                Err(injected(kind, name, "write", Fault::Short))
            }
            Fault::FsyncAfter => {
                self.inner.save(kind, name, data)?;
                Err(injected(kind, name, "fsync folder", Fault::FsyncAfter))
            }
            f => Err(injected(kind, name, "save", f)),
        }
    }

    fn load_into(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackendError> {
        match decide(&self.spec, &self.ops, false, false) {
            Fault::None => self.inner.load_into(kind, name, offset, buf),
            f => Err(injected(kind, name, "read", f)),
        }
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<u64, BackendError> {
        match decide(&self.spec, &self.ops, false, false) {
            Fault::None => self.inner.stat(kind, name),
            f => Err(injected(kind, name, "stat", f)),
        }
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>, BackendError> {
        match decide(&self.spec, &self.ops, false, false) {
            Fault::None => self.inner.list(kind),
            f => Err(injected(kind, "(listing)", "list", f)),
        }
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), BackendError> {
        match decide(&self.spec, &self.ops, false, true) {
            Fault::None => self.inner.remove(kind, name),
            Fault::FsyncAfter => {
                self.inner.remove(kind, name)?;
                Err(injected(kind, name, "fsync folder", Fault::FsyncAfter))
            }
            f => Err(injected(kind, name, "remove", f)),
        }
    }

    fn create(&self, kind: Kind) -> Result<Box<dyn NewObject + '_>, BackendError> {
        match decide(&self.spec, &self.ops, true, false) {
            Fault::None => Ok(Box::new(FaultObject {
                inner: self.inner.create(kind)?,
                kind,
                spec: self.spec,
                ops: self.ops.clone(),
            })),
            f => Err(injected(kind, "(new object)", "create", f)),
        }
    }
}

/// An object being written through a [`FaultBackend`].
struct FaultObject<'a> {
    inner: Box<dyn NewObject + 'a>,
    kind: Kind,
    spec: FaultSpec,
    ops: Arc<AtomicU64>,
}

impl NewObject for FaultObject<'_> {
    fn append(&mut self, data: &[u8]) -> Result<(), BackendError> {
        match decide(&self.spec, &self.ops, true, false) {
            Fault::None => self.inner.append(data),
            Fault::Short => {
                self.inner.append(&data[..data.len() / 2])?;
                Err(injected(self.kind, "(new object)", "write", Fault::Short))
            }
            f => Err(injected(self.kind, "(new object)", "write", f)),
        }
    }

    fn commit(self: Box<Self>, name: &str) -> Result<(), BackendError> {
        let kind = self.kind;
        match decide(&self.spec, &self.ops, true, true) {
            Fault::None => self.inner.commit(name),
            Fault::FsyncAfter => {
                self.inner.commit(name)?;
                Err(injected(kind, name, "fsync folder", Fault::FsyncAfter))
            }
            f => Err(injected(kind, name, "commit", f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_rejects_bad_parts() {
        let s = FaultSpec::parse("7:0.5:eio,fsync").unwrap();
        assert_eq!(s.seed, 7);
        assert_eq!(s.rate, 0.5);
        assert!(s.kinds.eio && s.kinds.fsync && !s.kinds.enospc && !s.kinds.short);
        for bad in ["7:0.5", "x:0.5:eio", "7:0:eio", "7:1.5:eio", "7:0.5:bogus"] {
            assert!(FaultSpec::parse(bad).is_err(), "{bad}");
        }
    }

    /// With rate 1 every operation fails with a kind that applies to it;
    /// an fsync failure after the rename leaves the object visible.
    #[test]
    fn every_operation_fails_at_rate_one_and_fsync_after_leaves_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalBackend::new(dir.path().join("repo")));
        local.create_layout().unwrap();
        local.save(Kind::Snapshot, "aa", b"x").unwrap();
        let only_fsync = FaultSpec::parse("1:1:fsync").unwrap();
        let b = FaultBackend::new(local.clone(), only_fsync);
        // Reads are not subject to fsync faults.
        assert_eq!(b.load(Kind::Snapshot, "aa").unwrap(), b"x");
        let mut visible = 0;
        for i in 0..16 {
            let name = format!("b{i:02}");
            let e = b.save(Kind::Snapshot, &name, b"y").unwrap_err();
            assert!(e.to_string().contains(FAULTS_VAR), "{e}");
            visible += usize::from(local.stat(Kind::Snapshot, &name).is_ok());
        }
        assert!(visible > 0 && visible < 16, "{visible} of 16 visible");
        let eio = FaultBackend::new(local.clone(), FaultSpec::parse("1:1:eio").unwrap());
        assert!(eio.load(Kind::Snapshot, "aa").is_err());
        assert!(eio.list(Kind::Snapshot).is_err());
        assert!(eio.remove(Kind::Snapshot, "aa").is_err());
        assert!(local.stat(Kind::Snapshot, "aa").is_ok());
        // A short write leaves nothing under the final name, nor in tmp/.
        let short = FaultBackend::new(local.clone(), FaultSpec::parse("1:1:short").unwrap());
        assert!(short.save(Kind::Snapshot, "cc", b"0123456789").is_err());
        assert!(local.stat(Kind::Snapshot, "cc").unwrap_err().is_not_found());
        assert_eq!(
            std::fs::read_dir(dir.path().join("repo/tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}
