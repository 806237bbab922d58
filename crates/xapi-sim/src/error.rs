//! [`SimError`]: why the simulator itself could not start or act. What a
//! XenAPI call answers on failure is `xapi_wire::ApiError`.

use xapi_wire::ApiError;

/// Why the simulator could not start or do what a test asked.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulator state folder '{path}': {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on '{address}': {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("simulator runtime: {0}")]
    Runtime(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}
