//! [`SimError`]: why the simulator could not start or do what a test
//! asked. What a vim25 call answers on failure is a `vim_wire::Fault`.

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulator state folder '{path}': {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error("simulator state '{path}' is unreadable: {reason}")]
    State { path: String, reason: String },
    #[error("cannot listen on '{address}': {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("simulator runtime: {0}")]
    Runtime(String),
    /// A hook asked something impossible (no such VM, write beyond a disk, ...).
    #[error("{0}")]
    Invalid(String),
}
