//! The repository side of `cbtvault serve`: a snapshot as an
//! `nbd::server::Export`. The server itself (handshake, transmission,
//! listeners, TLS) is the `nbd` crate's; this module only reads blocks.

mod snapshot;

pub use snapshot::SnapshotExport;
