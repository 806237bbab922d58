//! Retries with exponential backoff and full jitter around any backend:
//! an operation that fails transiently (a timeout, a reset connection, a
//! 5xx or throttling answer) is tried again, up to a limit; not-found and
//! permanent failures are returned at once. A backup whose uploads keep
//! failing therefore fails as a whole and commits no snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Backend, BackendError, InMemoryObject, Kind, NewObject};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (1: no retry).
    pub attempts: u32,
    /// The first wait's upper bound; doubled each time.
    pub base: Duration,
    /// No wait is longer.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// Ten tries over about a minute and a half at worst.
    fn default() -> Self {
        RetryPolicy {
            attempts: 10,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The policy with `CBTVAULT_RETRY=attempts,base_ms[,cap_ms]` applied
    /// (tests use it to fail fast); a malformed value keeps the default.
    pub fn from_env() -> RetryPolicy {
        let mut p = RetryPolicy::default();
        if let Ok(text) = std::env::var("CBTVAULT_RETRY") {
            let n: Vec<u64> = text
                .split(',')
                .filter_map(|v| v.trim().parse().ok())
                .collect();
            if let [a, b, rest @ ..] = n.as_slice() {
                p.attempts = (*a).clamp(1, 100) as u32;
                p.base = Duration::from_millis(*b);
                if let [c, ..] = rest {
                    p.cap = Duration::from_millis(*c);
                }
            }
        }
        p
    }

    /// The wait before try `attempt + 1` (attempt counts from 1): uniform
    /// in [0, min(cap, base * 2^(attempt-1))] ("full jitter").
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20))
            .min(self.cap);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A backend that retries the transient failures of another.
pub struct RetryBackend {
    inner: Arc<dyn Backend>,
    policy: RetryPolicy,
    retries: AtomicU64,
}

impl RetryBackend {
    pub fn new(inner: Arc<dyn Backend>, policy: RetryPolicy) -> RetryBackend {
        RetryBackend {
            inner,
            policy,
            retries: AtomicU64::new(0),
        }
    }

    /// Retries made so far (for reports).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn run<T>(&self, op: impl FnMut(u32) -> Result<T, BackendError>) -> Result<T, BackendError> {
        with_retries(&self.policy, &self.retries, op)
    }
}

/// Runs `op` (given the try number, from 1) until it succeeds, fails for
/// good, or has failed transiently `policy.attempts` times; counts the
/// retries in `retries`.
pub fn with_retries<T>(
    policy: &RetryPolicy,
    retries: &AtomicU64,
    mut op: impl FnMut(u32) -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    let mut attempt = 1;
    loop {
        match op(attempt) {
            Err(BackendError::Transient { .. }) if attempt < policy.attempts => {
                retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(policy.delay(attempt, rand::random::<f64>()));
                attempt += 1;
            }
            Err(e @ BackendError::Transient { .. }) => return Err(gave_up(e, policy.attempts)),
            other => return other,
        }
    }
}

/// The last transient error, saying how many tries were made.
fn gave_up(e: BackendError, attempts: u32) -> BackendError {
    match e {
        BackendError::Transient {
            kind,
            name,
            op,
            error: source,
        } if attempts > 1 => BackendError::Transient {
            kind,
            name,
            op,
            error: std::io::Error::new(
                source.kind(),
                format!("{source} (gave up after {attempts} tries)"),
            ),
        },
        other => other,
    }
}

impl Backend for RetryBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn save(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
        // Names are content hashes or random: saving again is harmless.
        self.run(|_| self.inner.save(kind, name, data))
    }

    fn save_owned(&self, kind: Kind, name: &str, data: bytes::Bytes) -> Result<(), BackendError> {
        self.run(|_| self.inner.save_owned(kind, name, data.clone()))
    }

    fn load_into(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackendError> {
        self.run(|_| self.inner.load_into(kind, name, offset, buf))
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<u64, BackendError> {
        self.run(|_| self.inner.stat(kind, name))
    }

    fn load(&self, kind: Kind, name: &str) -> Result<Vec<u8>, BackendError> {
        self.run(|_| self.inner.load(kind, name))
    }

    fn list(&self, kind: Kind) -> Result<Vec<(String, u64)>, BackendError> {
        self.run(|_| self.inner.list(kind))
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), BackendError> {
        // A retry that finds the object gone: the failed try removed it.
        self.run(|attempt| match self.inner.remove(kind, name) {
            Err(e) if e.is_not_found() && attempt > 1 => Ok(()),
            other => other,
        })
    }

    fn create(&self, kind: Kind) -> Result<Box<dyn NewObject + '_>, BackendError> {
        if self.inner.buffers_new_objects() {
            // The bytes are in memory anyway: the commit's save is retried.
            Ok(Box::new(InMemoryObject {
                backend: self,
                kind,
                data: Vec::new(),
            }))
        } else {
            self.run(|_| self.inner.create(kind))
        }
    }

    fn probe_writable(&self) -> bool {
        self.inner.probe_writable()
    }

    fn buffers_new_objects(&self) -> bool {
        self.inner.buffers_new_objects()
    }

    fn parallel_requests(&self) -> Option<usize> {
        self.inner.parallel_requests()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Fails the first `fail` calls of each operation with `error`.
    struct Flaky {
        fail: Mutex<u32>,
        transient: bool,
        calls: AtomicU64,
    }

    impl Backend for Flaky {
        fn location(&self) -> String {
            "flaky".into()
        }
        fn save(&self, kind: Kind, name: &str, _: &[u8]) -> Result<(), BackendError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut f = self.fail.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                let source = std::io::Error::other("503 SlowDown");
                return Err(if self.transient {
                    BackendError::Transient {
                        kind,
                        name: name.into(),
                        op: "upload",
                        error: source,
                    }
                } else {
                    BackendError::Permanent {
                        kind,
                        name: name.into(),
                        op: "upload",
                        error: source,
                    }
                });
            }
            Ok(())
        }
        fn load_into(
            &self,
            kind: Kind,
            name: &str,
            _: u64,
            _: &mut [u8],
        ) -> Result<(), BackendError> {
            Err(BackendError::NotFound {
                kind,
                name: name.into(),
            })
        }
        fn stat(&self, _: Kind, _: &str) -> Result<u64, BackendError> {
            Ok(0)
        }
        fn list(&self, _: Kind) -> Result<Vec<(String, u64)>, BackendError> {
            Ok(vec![])
        }
        fn remove(&self, _: Kind, _: &str) -> Result<(), BackendError> {
            Ok(())
        }
        fn buffers_new_objects(&self) -> bool {
            true
        }
    }

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
        }
    }

    fn flaky(fail: u32, transient: bool) -> Arc<Flaky> {
        Arc::new(Flaky {
            fail: Mutex::new(fail),
            transient,
            calls: AtomicU64::new(0),
        })
    }

    #[test]
    fn transient_failures_are_retried_until_success() {
        let inner = flaky(3, true);
        let b = RetryBackend::new(inner.clone(), fast(5));
        b.save(Kind::Pack, "p", b"x").unwrap();
        assert_eq!(inner.calls.load(Ordering::Relaxed), 4);
        assert_eq!(b.retries(), 3);
        // A new object's commit goes through the retried save.
        *inner.fail.lock().unwrap() = 2;
        let mut o = b.create(Kind::Pack).unwrap();
        o.append(b"abc").unwrap();
        o.commit("q").unwrap();
        assert_eq!(b.retries(), 5);
    }

    #[test]
    fn gives_up_after_the_limit_and_says_so() {
        let inner = flaky(10, true);
        let b = RetryBackend::new(inner.clone(), fast(3));
        let e = b.save(Kind::Pack, "p", b"x").unwrap_err();
        assert!(matches!(e, BackendError::Transient { .. }));
        assert!(e.to_string().contains("gave up after 3 tries"), "{e}");
        assert_eq!(inner.calls.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn permanent_and_not_found_are_not_retried() {
        let inner = flaky(10, false);
        let b = RetryBackend::new(inner.clone(), fast(5));
        assert!(matches!(
            b.save(Kind::Pack, "p", b"x").unwrap_err(),
            BackendError::Permanent { .. }
        ));
        assert_eq!(inner.calls.load(Ordering::Relaxed), 1);
        assert!(b
            .load_into(Kind::Pack, "p", 0, &mut [0u8; 1])
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn delays_grow_and_stay_capped() {
        let p = RetryPolicy {
            attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(p.delay(5, 1.0), Duration::from_secs(1));
        assert_eq!(p.delay(40, 1.0), Duration::from_secs(1));
        assert_eq!(p.delay(3, 0.0), Duration::ZERO);
        assert_eq!(p.delay(3, 0.5), Duration::from_millis(200));
    }
}
