//! A repository's object codec: how its block ids are computed and how its
//! objects are stored: as they are (version 1) or sealed (version 2). Every
//! reader and writer of repository bytes goes through one, so plain and
//! encrypted repositories share all the code above it.
//!
//! spec: format-spec/09-encryption.md#objects

use std::sync::Arc;

use super::{open_in_place, seal_in_place, BlockHasher, Bound, CryptoError, Keys, SEAL_OVERHEAD};
use crate::format::pack::Framing;
use crate::format::BlockId;

/// The 8 bytes before a sealed snapshot, index or lock object.
pub const SEALED_MAGIC: [u8; 8] = *b"CBTVSEAL";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed object (bad magic)")]
    BadMagic,
    #[error("sealed object: {0}")]
    Crypto(#[from] CryptoError),
    /// What was sealed did not open back to the same bytes.
    #[error("sealed bytes do not open back to what was sealed (verify before write)")]
    VerifyBeforeWrite,
}

/// Plain or sealed, with the keys for the latter.
#[derive(Clone, Debug)]
pub enum Codec {
    Plain,
    Sealed(Arc<Keys>),
}

impl Codec {
    pub fn is_sealed(&self) -> bool {
        matches!(self, Codec::Sealed(_))
    }

    pub fn hasher(&self) -> BlockHasher {
        match self {
            Codec::Plain => BlockHasher::Plain,
            Codec::Sealed(k) => k.hasher(),
        }
    }

    pub fn block_id(&self, raw: &[u8]) -> BlockId {
        self.hasher().id(raw)
    }

    /// How packs are framed.
    pub fn framing(&self) -> Framing {
        match self {
            Codec::Plain => Framing::PLAIN,
            Codec::Sealed(_) => Framing::SEALED,
        }
    }

    /// A snapshot, index or lock object as stored: the bytes themselves,
    /// or the magic and the sealed bytes, opened again and compared before
    /// they are returned (verify before write).
    pub fn seal_object(&self, bound: Bound, plain: Vec<u8>) -> Result<Vec<u8>, SealError> {
        let Codec::Sealed(keys) = self else {
            return Ok(plain);
        };
        let mut out = Vec::with_capacity(SEALED_MAGIC.len() + plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&SEALED_MAGIC);
        out.extend_from_slice(&[0; super::NONCE_LEN]);
        out.extend_from_slice(&plain);
        seal_in_place(
            keys.object_key(),
            super::fresh_nonce(),
            &bound,
            &mut out,
            SEALED_MAGIC.len(),
        );
        if self.open_object(bound, &out)? != plain {
            return Err(SealError::VerifyBeforeWrite);
        }
        Ok(out)
    }

    /// The plaintext of a stored snapshot, index or lock object.
    pub fn open_object(&self, bound: Bound, stored: &[u8]) -> Result<Vec<u8>, SealError> {
        let Codec::Sealed(keys) = self else {
            return Ok(stored.to_vec());
        };
        open_sealed_object(keys.object_key(), bound, stored)
    }

    /// Seals the zstd frame of block `id` in `buf[at + 24..]` in place
    /// (`buf[at..at + 24]` is room for the nonce, see
    /// [`Framing::overhead`]), then opens a copy and compares it with
    /// `expected` (verify before write).
    pub fn seal_blob(
        &self,
        id: BlockId,
        buf: &mut Vec<u8>,
        at: usize,
        expected: Expected<'_>,
    ) -> Result<(), SealError> {
        let Codec::Sealed(keys) = self else {
            return Ok(());
        };
        seal_in_place(
            keys.object_key(),
            super::fresh_nonce(),
            &Bound::Blob(id),
            buf,
            at,
        );
        SCRATCH.with(|cell| {
            let check = &mut *cell.borrow_mut();
            check.clear();
            check.extend_from_slice(&buf[at..]);
            let opened = open_in_place(keys.object_key(), &Bound::Blob(id), check)?;
            let same = match expected {
                Expected::Frame(f) => opened == f,
                Expected::RawFrameOf(raw) => crate::format::raw_frame::matches(opened, raw),
            };
            if !same {
                return Err(SealError::VerifyBeforeWrite);
            }
            Ok(())
        })
    }

    /// The zstd frame of a stored blob of block `id`: the bytes themselves,
    /// or opened (an error, and nothing, when they do not authenticate).
    pub fn open_blob<'a>(
        &self,
        id: BlockId,
        stored: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, CryptoError> {
        self.with_blob(id, stored, |frame| frame.to_vec())
            .map(std::borrow::Cow::Owned)
    }

    /// Calls `f` with the zstd frame of a stored blob of block `id`: the
    /// stored bytes themselves, or their plaintext opened in a per-thread
    /// buffer (no allocation per block); `f` is not called when they do
    /// not authenticate.
    pub fn with_blob<R>(
        &self,
        id: BlockId,
        stored: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, CryptoError> {
        let Codec::Sealed(keys) = self else {
            return Ok(f(stored));
        };
        OPENED.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.clear();
            buf.extend_from_slice(stored);
            let plain = open_in_place(keys.object_key(), &Bound::Blob(id), &mut buf)?;
            Ok(f(plain))
        })
    }

    /// A pack trailer as stored after the blobs, opened again and compared
    /// before it is returned (verify before write).
    pub fn seal_trailer(&self, trailer: Vec<u8>) -> Result<Vec<u8>, SealError> {
        let Codec::Sealed(keys) = self else {
            return Ok(trailer);
        };
        let mut buf = Vec::with_capacity(trailer.len() + SEAL_OVERHEAD);
        buf.resize(super::NONCE_LEN, 0);
        buf.extend_from_slice(&trailer);
        seal_in_place(
            keys.object_key(),
            super::fresh_nonce(),
            &Bound::Trailer,
            &mut buf,
            0,
        );
        if *self.open_trailer(&buf)? != trailer[..] {
            return Err(SealError::VerifyBeforeWrite);
        }
        Ok(buf)
    }

    /// The plaintext of a stored pack trailer.
    pub fn open_trailer<'a>(
        &self,
        stored: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, CryptoError> {
        let Codec::Sealed(keys) = self else {
            return Ok(std::borrow::Cow::Borrowed(stored));
        };
        super::open(keys.object_key(), &Bound::Trailer, stored).map(std::borrow::Cow::Owned)
    }
}

/// Opens `magic || sealed` with `key`: the framing of sealed snapshot,
/// index and lock objects (fuzzed).
pub fn open_sealed_object(
    key: &[u8; 32],
    bound: Bound,
    stored: &[u8],
) -> Result<Vec<u8>, SealError> {
    let body = stored
        .strip_prefix(&SEALED_MAGIC[..])
        .ok_or(SealError::BadMagic)?;
    Ok(super::open(key, &bound, body)?)
}

/// What a sealed blob must open back to.
#[derive(Clone, Copy)]
pub enum Expected<'a> {
    /// These frame bytes.
    Frame(&'a [u8]),
    /// The raw frame (`format::raw_frame`) of these block bytes.
    RawFrameOf(&'a [u8]),
}

thread_local! {
    // Per-thread buffer for the verify-before-write of sealed blobs.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    // Per-thread buffer blobs are opened in on read.
    static OPENED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
