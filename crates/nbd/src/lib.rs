//! The NBD protocol (NBD doc/proto.md, and XenServer's xapi-nbd dialect):
//! the sans-IO codec for both halves and the client's handshake state
//! machine ([`proto`]), the async client and its connection pool
//! ([`client`], [`pool`]), a read-only server loop over an
//! [`server::Export`] trait whose handshake is a state machine too
//! ([`server::ServerHandshake`]), TLS helpers ([`tls`]) and the byte-buffer
//! helpers the data paths share ([`bytes`]).
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
