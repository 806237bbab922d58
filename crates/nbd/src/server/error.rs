//! Why a server connection ended early. Shared by the handshake and the
//! transmission phase; imports no other server module.

use crate::proto;

/// Why a connection ended early. Nobody reads these but tests and
/// debuggers: a server has no one to report a client's misbehaviour to.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] proto::ProtoError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("handshake timed out")]
    Timeout,
}
