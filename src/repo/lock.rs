//! Repository locks: shared for backup/restore/check, exclusive for prune and
//! repair. A held lock is refreshed (a new object, then the old one removed)
//! so others can tell a live holder from a stale one.
//!
//! spec: format-spec/05-locks.md

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::backend::{Backend, BackendError, Kind};
use crate::crypto::{Bound, Codec};
use crate::format::lock::{self, LockInfo};

/// A lock is stale when not refreshed for this long.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

/// How often a held lock is refreshed and when a holder that could not
/// refresh it gives up (spec: 05-locks.md#refresh).
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    pub refresh_every: Duration,
    pub give_up_after: Duration,
}

impl LockTiming {
    pub const STANDARD: LockTiming = LockTiming {
        refresh_every: REFRESH_EVERY,
        give_up_after: STALE_AFTER,
    };

    /// The standard timing; debug builds (tests) accept
    /// `CBTVAULT_TEST_LOCK_TIMING=REFRESH_MS,GIVE_UP_MS`.
    pub fn current() -> LockTiming {
        #[cfg(debug_assertions)]
        if let Ok(spec) = std::env::var("CBTVAULT_TEST_LOCK_TIMING") {
            if let Some((r, g)) = spec.split_once(',') {
                if let (Ok(r), Ok(g)) = (r.parse(), g.parse()) {
                    return LockTiming {
                        refresh_every: Duration::from_millis(r),
                        give_up_after: Duration::from_millis(g),
                    };
                }
            }
        }
        LockTiming::STANDARD
    }
}

/// Whether a held lock can still be relied on: shared between the
/// refresher and the work that relies on the lock.
#[derive(Debug)]
pub struct LockHealth {
    last_refresh: Mutex<Instant>,
    last_error: Mutex<Option<String>>,
    give_up_after: Duration,
    lost: AtomicBool,
    /// Whether the lock is exclusive (commands that remove objects check).
    exclusive: bool,
    /// Set when the guard was dropped: the lock is no longer held.
    released: AtomicBool,
}

impl LockHealth {
    fn new(give_up_after: Duration, exclusive: bool) -> Self {
        LockHealth {
            last_refresh: Mutex::new(Instant::now()),
            last_error: Mutex::new(None),
            give_up_after,
            lost: AtomicBool::new(false),
            exclusive,
            released: AtomicBool::new(false),
        }
    }

    /// Whether this is an exclusive lock still held (not yet released).
    pub fn is_held_exclusive(&self) -> bool {
        self.exclusive && !self.released.load(Ordering::SeqCst)
    }

    /// Fails once the lock could not be refreshed for the give-up time;
    /// stays failed (spec: 05-locks.md#refresh).
    pub fn check(&self) -> Result<(), LockError> {
        let since = self.last_refresh.lock().expect("lock health").elapsed();
        if since > self.give_up_after {
            self.lost.store(true, Ordering::SeqCst);
        }
        if self.lost.load(Ordering::SeqCst) {
            return Err(LockError::Lost {
                seconds: since.as_secs(),
                why: self
                    .last_error
                    .lock()
                    .expect("lock health")
                    .clone()
                    .unwrap_or_else(|| "no refresh succeeded".into()),
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("repository is locked by {holder}; if that process is gone run 'cbtvault unlock'")]
    Conflict { holder: String },
    #[error(
        "repository lock lost: not refreshed for {seconds} s ({why}); stopped before relying on it, nothing more was written; run the command again"
    )]
    Lost { seconds: u64, why: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new("/proc").join(pid.to_string()).exists()
}

/// Why a lock is stale, or `None` when its holder may still be alive.
pub fn stale_reason(info: &LockInfo, now: DateTime<Utc>) -> Option<String> {
    let age = now.signed_duration_since(info.time);
    if age.num_seconds() > STALE_AFTER.as_secs() as i64 {
        return Some(format!("not refreshed for {} minutes", age.num_minutes()));
    }
    if info.hostname == hostname() && !pid_alive(info.pid) {
        return Some(format!(
            "process {} no longer exists on this host",
            info.pid
        ));
    }
    None
}

pub fn describe(info: &LockInfo) -> String {
    format!(
        "{} lock of '{}' held by pid {} on {} since {}",
        if info.exclusive {
            "an exclusive"
        } else {
            "a shared"
        },
        info.command,
        info.pid,
        info.hostname,
        info.time.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

/// A lock object's name and its decoded content (or why it is unreadable).
pub type ListedLock = (String, Result<LockInfo, String>);

/// Every lock object with its decoded content (unreadable ones as Err text).
pub fn list(backend: &dyn Backend, codec: &Codec) -> Result<Vec<ListedLock>, BackendError> {
    let mut out = Vec::new();
    for (name, _) in backend.list(Kind::Lock)? {
        match backend.load(Kind::Lock, &name) {
            Ok(bytes) => {
                let info = codec
                    .open_object(Bound::Lock(lock_binding(&name)), &bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|plain| lock::decode(&plain).map_err(|e| e.to_string()));
                out.push((name, info))
            }
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Removes the lock object `name`, whoever holds it (`unlock`: a stale
/// lock, or every lock with `--remove-all`). Apart from a [`LockGuard`]
/// releasing its own, this is the only way a lock object goes.
pub fn remove(backend: &dyn Backend, name: &str) -> Result<(), BackendError> {
    backend.remove(Kind::Lock, name)
}

/// A held lock; released on drop. [`LockGuard::skipped`] holds nothing
/// (read-only storage, `--no-lock`).
pub struct LockGuard {
    held: bool,
    health: Arc<LockHealth>,
    stop: Option<Sender<()>>,
    refresher: Option<JoinHandle<()>>,
    backend: Arc<dyn Backend>,
    current: Arc<Mutex<String>>,
}

fn new_lock_name() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// What a sealed lock object binds: its name's 32 bytes (all zeros for a
/// name that is not 64 hex digits, which then fails to open).
fn lock_binding(name: &str) -> [u8; 32] {
    let mut b = [0u8; 32];
    let _ = hex::decode_to_slice(name, &mut b);
    b
}

fn write_lock(
    backend: &dyn Backend,
    codec: &Codec,
    exclusive: bool,
    command: &str,
) -> Result<String, BackendError> {
    let info = LockInfo {
        exclusive,
        hostname: hostname(),
        pid: std::process::id(),
        time: Utc::now(),
        command: command.to_string(),
    };
    let name = new_lock_name();
    let bytes = codec
        .seal_object(Bound::Lock(lock_binding(&name)), lock::encode(&info))
        .map_err(|e| BackendError::Permanent {
            kind: Kind::Lock,
            name: name.clone(),
            op: "seal",
            error: std::io::Error::other(e.to_string()),
        })?;
    backend.save(Kind::Lock, &name, &bytes)?;
    Ok(name)
}

/// Takes a lock: writes ours, then looks for conflicting live ones.
pub fn acquire(
    backend: Arc<dyn Backend>,
    codec: &Codec,
    exclusive: bool,
    command: &str,
) -> Result<LockGuard, LockError> {
    acquire_with(backend, codec, exclusive, command, LockTiming::current())
}

/// [`acquire`] with an explicit refresh timing.
pub fn acquire_with(
    backend: Arc<dyn Backend>,
    codec: &Codec,
    exclusive: bool,
    command: &str,
    timing: LockTiming,
) -> Result<LockGuard, LockError> {
    let name = write_lock(backend.as_ref(), codec, exclusive, command)?;
    let now = Utc::now();
    for (other, info) in list(backend.as_ref(), codec)? {
        if other == name {
            continue;
        }
        // An unreadable lock may belong to a live holder: treat it as
        // exclusive (spec: 05-locks.md); `unlock` removes it.
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                let _ = backend.remove(Kind::Lock, &name);
                return Err(LockError::Conflict {
                    holder: format!("unreadable lock '{other}' ({e})"),
                });
            }
        };
        if stale_reason(&info, now).is_some() {
            continue;
        }
        if exclusive || info.exclusive {
            let _ = backend.remove(Kind::Lock, &name);
            return Err(LockError::Conflict {
                holder: describe(&info),
            });
        }
    }
    let current = Arc::new(Mutex::new(name));
    let health = Arc::new(LockHealth::new(timing.give_up_after, exclusive));
    let (stop_tx, stop_rx) = channel::<()>();
    let refresher = {
        let backend = backend.clone();
        let codec = codec.clone();
        let current = current.clone();
        let command = command.to_string();
        let health = health.clone();
        std::thread::spawn(move || loop {
            match stop_rx.recv_timeout(timing.refresh_every) {
                Err(RecvTimeoutError::Timeout) => {
                    match refresh_fault()
                        .and_then(|()| write_lock(backend.as_ref(), &codec, exclusive, &command))
                    {
                        Ok(new) => {
                            let old =
                                std::mem::replace(&mut *current.lock().expect("lock name"), new);
                            let _ = backend.remove(Kind::Lock, &old);
                            *health.last_refresh.lock().expect("lock health") = Instant::now();
                        }
                        Err(e) => {
                            *health.last_error.lock().expect("lock health") = Some(e.to_string());
                        }
                    }
                }
                _ => return,
            }
        })
    };
    Ok(LockGuard {
        held: true,
        health,
        stop: Some(stop_tx),
        refresher: Some(refresher),
        backend,
        current,
    })
}

/// Test hook (debug builds only): `CBTVAULT_TEST_LOCK_REFRESH_FAILS=1`
/// makes every refresh fail as a full disk would.
fn refresh_fault() -> Result<(), BackendError> {
    #[cfg(debug_assertions)]
    if std::env::var_os("CBTVAULT_TEST_LOCK_REFRESH_FAILS").is_some() {
        return Err(BackendError::Permanent {
            kind: Kind::Lock,
            name: "(refresh)".into(),
            op: "save",
            error: std::io::Error::other("No space left on device (injected)"),
        });
    }
    Ok(())
}

impl LockGuard {
    /// A guard for work done without a lock: nothing to refresh or remove.
    pub fn skipped(backend: Arc<dyn Backend>) -> LockGuard {
        LockGuard {
            held: false,
            health: Arc::new(LockHealth::new(Duration::MAX, false)),
            stop: None,
            refresher: None,
            backend,
            current: Arc::new(Mutex::new(String::new())),
        }
    }

    /// The health of this lock, for work that must stop once it is lost.
    pub fn health(&self) -> Arc<LockHealth> {
        self.health.clone()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.health.released.store(true, Ordering::SeqCst);
        drop(self.stop.take());
        if let Some(h) = self.refresher.take() {
            let _ = h.join();
        }
        if !self.held {
            return;
        }
        let name = self.current.lock().expect("lock name").clone();
        let _ = self.backend.remove(Kind::Lock, &name);
    }
}
