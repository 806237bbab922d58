//! TEST-ONLY: an in-memory [`Backend`] that models what survives a power
//! loss, for the torture test's power-loss mode (tests/integration/
//! torture.rs drives the library in-process over it through
//! [`super::fault::register_test_backend`]). It owns no repository logic.
//!
//! The local backend's fsync calls happen inside it and cannot be seen
//! through the [`Backend`] trait, so this backend models a file system that
//! implements the trait the way `local.rs` does (spec:
//! format-spec/06-ordering.md#durable), step by step:
//!
//! - save / create+commit: write a temporary file (not durable), fsync it
//!   (its content is durable), rename it to its name (the new directory
//!   entry is visible but NOT durable), fsync the folder (the entry is
//!   durable; only now does the call return Ok).
//! - remove: unlink (gone from view, the removal not durable), fsync the
//!   folder (durable).
//! - lock objects: written and renamed without any fsync, removed without
//!   the folder fsync (spec: 05-locks.md). They are volatile: a power loss
//!   drops every lock (the processes that held them died with it).
//!
//! Each step (and each append) is one *crash point*. [`PowerLoss::arm`]
//! makes the Nth step from now the crash: that step and every later
//! operation fail ("power lost") and reads see nothing any more, so the
//! code under test stops. [`PowerLoss::after_crash`] then builds what a
//! reboot finds: every durable entry; for an entry whose rename or unlink
//! was done but whose folder fsync was not, the old or the new state, chosen
//! at random from the seed; no temporary files; no locks. Nothing of a call
//! that returned Ok is ever lost: that is the trait's contract, and the
//! harness checks that the repository above never relied on more.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Backend, BackendError, Kind, NewObject};

type Key = (Kind, String);

#[derive(Default)]
struct State {
    /// What a reader sees now.
    visible: HashMap<Key, Arc<Vec<u8>>>,
    /// What survives a crash for certain (`None`: certainly absent).
    durable: HashMap<Key, Arc<Vec<u8>>>,
    /// Entries renamed or unlinked whose folder is not fsynced yet: the
    /// state before (`durable`) or after (`visible`) survives.
    pending: HashSet<Key>,
    crashed: bool,
}

/// The power-loss model (see the module comment).
pub struct PowerLoss {
    location: String,
    state: Mutex<State>,
    seed: u64,
    steps: AtomicU64,
    /// Crash when `steps` reaches this value (u64::MAX: never).
    crash_at: AtomicU64,
}

fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn lost(kind: Kind, name: &str, op: &'static str) -> BackendError {
    BackendError::Permanent {
        kind,
        name: name.to_string(),
        op,
        error: std::io::Error::other("power lost (simulated by the power-loss test backend)"),
    }
}

impl PowerLoss {
    /// An empty store; `seed` decides the fate of non-durable entries.
    pub fn new(location: &str, seed: u64) -> PowerLoss {
        PowerLoss {
            location: location.to_string(),
            state: Mutex::new(State::default()),
            seed,
            steps: AtomicU64::new(0),
            crash_at: AtomicU64::new(u64::MAX),
        }
    }

    /// A store holding `objects`, all durable.
    pub fn with_objects(location: &str, seed: u64, objects: Vec<(Kind, String, Vec<u8>)>) -> Self {
        let p = PowerLoss::new(location, seed);
        {
            let mut s = p.state.lock().expect("state");
            for (kind, name, data) in objects {
                let data = Arc::new(data);
                s.visible.insert((kind, name.clone()), data.clone());
                s.durable.insert((kind, name), data);
            }
        }
        p
    }

    /// The power fails at the `n`th crash point from now (n >= 1).
    pub fn arm(&self, n: u64) {
        let now = self.steps.load(Ordering::SeqCst);
        self.crash_at.store(now + n.max(1), Ordering::SeqCst);
    }

    /// No crash point any more.
    pub fn disarm(&self) {
        self.crash_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// Whether the power has failed.
    pub fn crashed(&self) -> bool {
        self.state.lock().expect("state").crashed
    }

    /// Crash points passed so far.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    /// What a reboot finds (module comment), as a new store with seed `seed`.
    pub fn after_crash(&self, seed: u64) -> PowerLoss {
        let s = self.state.lock().expect("state");
        let mut survivors: HashMap<Key, Arc<Vec<u8>>> = s.durable.clone();
        let mut pending: Vec<&Key> = s.pending.iter().collect();
        pending.sort_by_key(|k| (k.0.to_string(), k.1.clone()));
        for (i, key) in pending.into_iter().enumerate() {
            if mix(self.seed ^ 0xc0ffee, i as u64) & 1 == 1 {
                match s.visible.get(key) {
                    Some(v) => survivors.insert(key.clone(), v.clone()),
                    None => survivors.remove(key),
                };
            }
        }
        survivors.retain(|k, _| k.0 != Kind::Lock);
        PowerLoss::with_objects(
            &self.location,
            seed,
            survivors
                .into_iter()
                .map(|((k, n), v)| (k, n, v.as_ref().clone()))
                .collect(),
        )
    }

    /// Passes one crash point: Err when the power fails here or failed before.
    fn step(&self, kind: Kind, name: &str, op: &'static str) -> Result<(), BackendError> {
        let mut s = self.state.lock().expect("state");
        if s.crashed {
            return Err(lost(kind, name, op));
        }
        let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.crash_at.load(Ordering::SeqCst) {
            s.crashed = true;
            return Err(lost(kind, name, op));
        }
        Ok(())
    }

    fn alive(&self, kind: Kind, name: &str, op: &'static str) -> Result<(), BackendError> {
        if self.state.lock().expect("state").crashed {
            return Err(lost(kind, name, op));
        }
        Ok(())
    }

    /// Steps 2-4 of a durable write: fsync the file, rename, fsync the folder.
    fn publish(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<(), BackendError> {
        let key = (kind, name.to_string());
        let data = Arc::new(data);
        if kind != Kind::Lock {
            self.step(kind, name, "fsync")?;
        }
        self.step(kind, name, "rename")?;
        {
            let mut s = self.state.lock().expect("state");
            s.visible.insert(key.clone(), data.clone());
            s.pending.insert(key.clone());
        }
        if kind == Kind::Lock {
            return Ok(());
        }
        self.step(kind, name, "fsync folder")?;
        let mut s = self.state.lock().expect("state");
        s.durable.insert(key.clone(), data);
        s.pending.remove(&key);
        Ok(())
    }
}

impl Backend for PowerLoss {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn save(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.step(kind, name, "write")?;
        self.publish(kind, name, data.to_vec())
    }

    fn load_into(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackendError> {
        self.alive(kind, name, "read")?;
        let s = self.state.lock().expect("state");
        let data =
            s.visible
                .get(&(kind, name.to_string()))
                .ok_or_else(|| BackendError::NotFound {
                    kind,
                    name: name.to_string(),
                })?;
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= data.len() as u64 => {
                buf.copy_from_slice(&data[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(BackendError::Permanent {
                kind,
                name: name.to_string(),
                op: "read",
                error: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("object ends before byte {}", offset + buf.len() as u64),
                ),
            }),
        }
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<u64, BackendError> {
        self.alive(kind, name, "stat")?;
        let s = self.state.lock().expect("state");
        s.visible
            .get(&(kind, name.to_string()))
            .map(|d| d.len() as u64)
            .ok_or_else(|| BackendError::NotFound {
                kind,
                name: name.to_string(),
            })
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>, BackendError> {
        self.alive(kind, "(listing)", "list")?;
        let s = self.state.lock().expect("state");
        Ok(s.visible
            .iter()
            .filter(|(k, _)| k.0 == kind)
            .map(|(k, v)| (k.1.clone(), v.len() as u64))
            .collect())
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), BackendError> {
        let key = (kind, name.to_string());
        self.step(kind, name, "unlink")?;
        {
            let mut s = self.state.lock().expect("state");
            if s.visible.remove(&key).is_none() {
                return Err(BackendError::NotFound {
                    kind,
                    name: name.to_string(),
                });
            }
            s.pending.insert(key.clone());
        }
        if kind == Kind::Lock {
            return Ok(());
        }
        self.step(kind, name, "fsync folder")?;
        let mut s = self.state.lock().expect("state");
        s.durable.remove(&key);
        s.pending.remove(&key);
        Ok(())
    }

    fn create(&self, kind: Kind) -> Result<Box<dyn NewObject + '_>, BackendError> {
        self.step(kind, "(new object)", "create")?;
        Ok(Box::new(PowerLossObject {
            backend: self,
            kind,
            data: Vec::new(),
        }))
    }
}

/// A temporary file being written: never durable, gone at a crash.
struct PowerLossObject<'a> {
    backend: &'a PowerLoss,
    kind: Kind,
    data: Vec<u8>,
}

impl NewObject for PowerLossObject<'_> {
    fn append(&mut self, data: &[u8]) -> Result<(), BackendError> {
        self.backend.step(self.kind, "(new object)", "write")?;
        self.data.extend_from_slice(data);
        Ok(())
    }

    fn commit(self: Box<Self>, name: &str) -> Result<(), BackendError> {
        let PowerLossObject {
            backend,
            kind,
            data,
        } = *self;
        backend.publish(kind, name, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the crash point, a save that returned Ok survives, one that
    /// failed survives whole or not at all, and locks never survive.
    #[test]
    fn saves_that_returned_survive_and_torn_ones_are_whole_or_absent() {
        for crash in 1..=12u64 {
            let p = PowerLoss::new("mem", crash);
            p.save(Kind::Lock, "l", b"lock").unwrap();
            p.arm(crash);
            let mut ok = Vec::new();
            for i in 0..3 {
                let name = format!("s{i}");
                if p.save(Kind::Snapshot, &name, name.as_bytes()).is_ok() {
                    ok.push(name);
                }
            }
            assert!(p.crashed() || crash > 12);
            let after = p.after_crash(0);
            for name in &ok {
                assert_eq!(after.load(Kind::Snapshot, name).unwrap(), name.as_bytes());
            }
            for (name, _) in after.list(Kind::Snapshot).unwrap() {
                assert_eq!(after.load(Kind::Snapshot, &name).unwrap(), name.as_bytes());
            }
            assert!(after.list(Kind::Lock).unwrap().is_empty());
        }
    }
}
