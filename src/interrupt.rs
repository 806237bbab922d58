//! The process-wide stop request. SIGINT or SIGTERM only sets a flag;
//! long-running loops (the backup pipeline, the restore writer, prune and
//! forget steps, the snapshot commit) call [`check`] at their check points
//! and leave through their normal error path, which removes temporary
//! files, releases the lock and destroys host-side snapshots. A second
//! signal ends the process at once. Nothing here prints or knows exit
//! codes (`cli::exit` maps [`Signal`] to 130 or 143).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A stop signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    /// The signal's number (as `kill -l` lists it).
    pub fn number(self) -> u8 {
        match self {
            Signal::Interrupt => 2,
            Signal::Terminate => 15,
        }
    }

    fn from_number(n: u8) -> Option<Signal> {
        match n {
            2 => Some(Signal::Interrupt),
            15 => Some(Signal::Terminate),
            _ => None,
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// A check point found a stop request: the work stops there and nothing
/// after it is committed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("stopped by {signal}")]
pub struct Interrupted {
    pub signal: Signal,
}

/// The first signal received (0: none).
static RECEIVED: AtomicU8 = AtomicU8::new(0);

/// The first stop signal received, if any.
pub fn requested() -> Option<Signal> {
    Signal::from_number(RECEIVED.load(Ordering::SeqCst))
}

/// A check point: `Err` once a stop signal was received.
pub fn check() -> Result<(), Interrupted> {
    match requested() {
        Some(signal) => Err(Interrupted { signal }),
        None => Ok(()),
    }
}

/// Records `signal` as a stop request; `false` when one was already
/// recorded (the caller then ends the process).
fn record(signal: Signal) -> bool {
    RECEIVED
        .compare_exchange(0, signal.number(), Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

/// Installs the handlers for SIGINT and SIGTERM (a thread waiting on
/// them); they are in place when this returns. The first signal is
/// recorded for [`check`]; a second one ends the process at once with
/// status 128 + its number, cleaning up nothing.
pub fn install() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Once per process: a second waiting thread would take the first
    // signal for a second one.
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let (mut interrupt, mut terminate) = match (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) {
                    (Ok(i), Ok(t)) => (i, t),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    let got = tokio::select! {
                        _ = interrupt.recv() => Signal::Interrupt,
                        _ = terminate.recv() => Signal::Terminate,
                    };
                    if !record(got) {
                        std::process::exit(128 + i32::from(got.number()));
                    }
                }
            });
        })?;
    ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("the signal thread ended before it was ready"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        for s in [Signal::Interrupt, Signal::Terminate] {
            assert_eq!(Signal::from_number(s.number()), Some(s));
        }
        assert_eq!(Signal::from_number(0), None);
        assert_eq!(Signal::from_number(9), None);
    }
}
