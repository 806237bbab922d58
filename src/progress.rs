//! A sink for progress reports, so library code can report work done without
//! knowing how (or whether) it is shown.

/// Receives progress of long work, in bytes. Implementations must be cheap.
pub trait Progress: Sync {
    fn set_total(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    /// Starts a new phase of the work, named `message`: what is done so
    /// far counts from zero again (a `set_total` follows).
    fn set_message(&self, _message: &str) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
