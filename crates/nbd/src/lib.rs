//! The NBD protocol (NBD doc/proto.md, and XenServer's xapi-nbd dialect):
//! the sans-IO codec for both halves ([`proto`]), the async client and its
//! connection pool ([`client`], [`pool`]), a read-only server loop over an
//! [`server::Export`] trait ([`server`]), TLS helpers ([`tls`]) and the
//! byte-buffer helpers the data paths share ([`bytes`]).
//!
//! Knows nothing of repositories, backups or XenAPI, and depends on no other
//! crate of the workspace: the product and the simulator both build on it.

pub mod bytes;
pub mod client;
pub mod pool;
pub mod proto;
pub mod server;
pub mod tls;

pub use pool::{join_all, NbdError, NbdPool, NbdUri, PoolOptions};
