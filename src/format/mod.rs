//! Pure byte layouts of every repository object: encode and decode over
//! byte slices, no I/O, no clocks, no randomness. Everything here can be
//! fuzzed; every length read from input is checked against a limit before
//! anything is allocated from it.
//!
//! spec: format-spec/ (one file per object type).

pub mod bitmap;
pub mod config;
pub mod ids;
pub mod index;
pub mod key;
pub mod lock;
pub mod pack;
pub mod page;
pub mod raw_frame;
pub mod snapshot;

pub use ids::{BlockId, ObjectName, PageId, SnapshotId};

/// A decode failure: names the object kind and what is wrong with it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what}: truncated: need {needed} bytes, have {available}")]
    Truncated {
        what: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("{what}: bad magic")]
    BadMagic { what: &'static str },
    #[error("{what}: unsupported version {version}")]
    UnsupportedVersion { what: &'static str, version: u32 },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

impl FormatError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        FormatError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// A bounds-checked little-endian reader over a byte slice.
pub(crate) struct Cursor<'a> {
    what: &'static str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(what: &'static str, bytes: &'a [u8]) -> Self {
        Cursor {
            what,
            bytes,
            pos: 0,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::Truncated {
                what: self.what,
                needed: (self.pos as u64).saturating_add(n as u64),
                available: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn finish(self) -> Result<(), FormatError> {
        if self.remaining() != 0 {
            return Err(FormatError::invalid(
                self.what,
                format!("{} trailing bytes", self.remaining()),
            ));
        }
        Ok(())
    }
}
