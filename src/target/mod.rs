//! Where restored blocks go, the mirror of `source/`: a regular file, a
//! block device, a stream (stdout), a XenServer VDI import. Each target
//! implements `repo::restore::BlockSink`, so the dependency runs one way
//! (commands -> target -> repo). Targets check what they can hold before
//! anything is written. Never parses arguments (no clap) and never prints.

pub mod file;
pub mod stdout;
pub mod xen;

pub use file::FileTarget;
pub use stdout::StreamSink;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{what} '{path}': {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("'{path}': {reason}")]
    Refused { path: String, reason: String },
}

impl TargetError {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        TargetError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn refused(path: &std::path::Path, reason: impl Into<String>) -> Self {
        TargetError::Refused {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// Zeros written out where a target cannot leave holes.
pub(crate) static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];
