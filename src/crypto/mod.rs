//! Encryption of version-2 repositories: the master secret and the keys
//! derived from it, sealing and opening (AES-256-GCM under per-value keys
//! from keyed BLAKE3), associated data, keyed block ids, and the password
//! key (Argon2id). Pure computation: no I/O, no clock; randomness only
//! where a fresh nonce or secret is made, and `*_with` variants that take
//! it as input for test vectors and fuzzing.
//!
//! spec: format-spec/09-encryption.md

pub mod codec;
pub mod password;

pub use codec::Codec;

use ring::aead;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::format::BlockId;

/// Bytes a sealed value adds to its plaintext: nonce and tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

const CONTEXT_BLOCK_ID: &str = "cbtvault 2026-12 block id";
const CONTEXT_OBJECT_SEAL: &str = "cbtvault 2026-12 object seal";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The tag did not verify: the value was changed, truncated, sealed
    /// with another key, or belongs elsewhere (its associated data).
    #[error("authentication failed (changed, truncated, or not this repository's)")]
    Authentication,
    #[error("sealed value of {0} bytes is shorter than the 40-byte overhead")]
    TooShort(usize),
    #[error("key derivation: {0}")]
    Kdf(String),
}

/// What a sealed value is, bound into its associated data
/// (spec: format-spec/09-encryption.md#ad).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Blob(BlockId),
    Trailer,
    Snapshot,
    Index,
    /// A lock object, by its 32-byte name.
    Lock([u8; 32]),
    /// The config body, by the repository id.
    Config([u8; 32]),
    /// The master secret in a key object, by the repository id.
    Key([u8; 32]),
    /// A manifest page, by its page id.
    Page([u8; 32]),
}

impl Bound {
    /// The associated data: "cbtvault", the type byte, the binding.
    pub fn associated_data(&self) -> Vec<u8> {
        let mut ad = Vec::with_capacity(41);
        ad.extend_from_slice(b"cbtvault");
        let (kind, bound): (u8, Option<&[u8; 32]>) = match self {
            Bound::Blob(id) => (1, Some(&id.0)),
            Bound::Trailer => (2, None),
            Bound::Snapshot => (3, None),
            Bound::Index => (4, None),
            Bound::Lock(n) => (5, Some(n)),
            Bound::Config(id) => (6, Some(id)),
            Bound::Key(id) => (7, Some(id)),
            Bound::Page(id) => (8, Some(id)),
        };
        ad.push(kind);
        if let Some(b) = bound {
            ad.extend_from_slice(b);
        }
        ad
    }
}

/// The repository's 32-byte master secret (never stored in the clear).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterSecret(pub [u8; 32]);

impl MasterSecret {
    pub fn random() -> MasterSecret {
        MasterSecret(rand::random())
    }
}

/// The keys derived from a master secret.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Keys {
    id_key: [u8; 32],
    object_key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub fn derive(master: &MasterSecret) -> Keys {
        Keys {
            id_key: blake3::derive_key(CONTEXT_BLOCK_ID, &master.0),
            object_key: blake3::derive_key(CONTEXT_OBJECT_SEAL, &master.0),
        }
    }

    /// The keyed block id of `raw`.
    pub fn block_id(&self, raw: &[u8]) -> BlockId {
        BlockId(*blake3::keyed_hash(&self.id_key, raw).as_bytes())
    }

    pub fn hasher(&self) -> BlockHasher {
        BlockHasher::Keyed(self.id_key)
    }

    pub fn object_key(&self) -> &[u8; 32] {
        &self.object_key
    }
}

/// How a repository computes block ids: plain BLAKE3 (version 1) or keyed
/// (version 2).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BlockHasher {
    Plain,
    Keyed([u8; 32]),
}

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockHasher::Plain => "BlockHasher::Plain",
            BlockHasher::Keyed(_) => "BlockHasher::Keyed(..)",
        })
    }
}

impl BlockHasher {
    pub fn id(&self, raw: &[u8]) -> BlockId {
        match self {
            BlockHasher::Plain => BlockId::of(raw),
            BlockHasher::Keyed(k) => BlockId(*blake3::keyed_hash(k, raw).as_bytes()),
        }
    }
}

/// The one-time AES-256-GCM key and IV for `nonce` under `key`.
fn value_key(key: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> (aead::LessSafeKey, aead::Nonce) {
    let mut k = *blake3::keyed_hash(key, &nonce[..12]).as_bytes();
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, &k).expect("a 32-byte AES-256 key");
    k.zeroize();
    let iv = aead::Nonce::try_assume_unique_for_key(&nonce[12..]).expect("a 12-byte IV");
    (aead::LessSafeKey::new(unbound), iv)
}

/// Seals in place: `buf[at..at + 24]` is room for the nonce and
/// `buf[at + 24..]` the plaintext; on return `buf[at..]` is nonce,
/// ciphertext and tag. `nonce` is fresh randomness ([`fresh_nonce`]) or
/// fixed for a test vector.
pub fn seal_in_place(
    key: &[u8; 32],
    nonce: [u8; NONCE_LEN],
    bound: &Bound,
    buf: &mut Vec<u8>,
    at: usize,
) {
    let (k, iv) = value_key(key, &nonce);
    buf[at..at + NONCE_LEN].copy_from_slice(&nonce);
    let tag = k
        .seal_in_place_separate_tag(
            iv,
            aead::Aad::from(bound.associated_data()),
            &mut buf[at + NONCE_LEN..],
        )
        .expect("AES-GCM seals any value under 64 GiB");
    buf.extend_from_slice(tag.as_ref());
}

/// `seal(key, bound, plaintext)` with a fresh nonce.
pub fn seal(key: &[u8; 32], bound: &Bound, plaintext: &[u8]) -> Vec<u8> {
    seal_with(key, fresh_nonce(), bound, plaintext)
}

/// `seal` with the given nonce (test vectors).
pub fn seal_with(
    key: &[u8; 32],
    nonce: [u8; NONCE_LEN],
    bound: &Bound,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
    buf.resize(NONCE_LEN, 0);
    buf.extend_from_slice(plaintext);
    seal_in_place(key, nonce, bound, &mut buf, 0);
    buf
}

/// Opens a sealed value: its plaintext, or an error and nothing.
pub fn open(key: &[u8; 32], bound: &Bound, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut buf = sealed.to_vec();
    let n = open_in_place(key, bound, &mut buf)?.len();
    buf.copy_within(NONCE_LEN..NONCE_LEN + n, 0);
    buf.truncate(n);
    Ok(buf)
}

/// Opens `buf` (nonce, ciphertext, tag) in place; the plaintext is the
/// returned slice of `buf`. On failure `buf` holds no plaintext.
pub fn open_in_place<'a>(
    key: &[u8; 32],
    bound: &Bound,
    buf: &'a mut [u8],
) -> Result<&'a mut [u8], CryptoError> {
    if buf.len() < SEAL_OVERHEAD {
        return Err(CryptoError::TooShort(buf.len()));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&buf[..NONCE_LEN]);
    let (k, iv) = value_key(key, &nonce);
    let ad = aead::Aad::from(bound.associated_data());
    if k.open_in_place(iv, ad, &mut buf[NONCE_LEN..]).is_err() {
        // ring leaves the buffer in an unspecified state on failure.
        buf.fill(0);
        return Err(CryptoError::Authentication);
    }
    let n = buf.len() - SEAL_OVERHEAD;
    Ok(&mut buf[NONCE_LEN..NONCE_LEN + n])
}

/// 24 bytes from `rand`'s thread-local CSPRNG (ChaCha, seeded and
/// reseeded from the operating system).
pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_every_binding_matters() {
        let key = [7u8; 32];
        let id = BlockId::of(b"x");
        let sealed = seal(&key, &Bound::Blob(id), b"hello");
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(open(&key, &Bound::Blob(id), &sealed).unwrap(), b"hello");
        // Another block's id, another type, another key: refused.
        assert_eq!(
            open(&key, &Bound::Blob(BlockId::of(b"y")), &sealed),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            open(&key, &Bound::Snapshot, &sealed),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            open(&[8u8; 32], &Bound::Blob(id), &sealed),
            Err(CryptoError::Authentication)
        );
        // Any flipped bit, any truncation: refused.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(open(&key, &Bound::Blob(id), &bad).is_err(), "byte {i}");
        }
        for n in 0..sealed.len() {
            assert!(open(&key, &Bound::Blob(id), &sealed[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn nonces_differ_and_in_place_matches_copying() {
        let key = [1u8; 32];
        let a = seal(&key, &Bound::Index, b"same");
        let b = seal(&key, &Bound::Index, b"same");
        assert_ne!(a, b);
        let nonce = [9u8; NONCE_LEN];
        let mut buf = b"prefix".to_vec();
        buf.extend_from_slice(&[0; NONCE_LEN]);
        buf.extend_from_slice(b"payload");
        seal_in_place(&key, nonce, &Bound::Trailer, &mut buf, 6);
        assert_eq!(&buf[..6], b"prefix");
        assert_eq!(
            buf[6..],
            seal_with(&key, nonce, &Bound::Trailer, b"payload")[..]
        );
    }

    #[test]
    fn keyed_ids_differ_from_plain_and_between_repositories() {
        let a = Keys::derive(&MasterSecret([1; 32]));
        let b = Keys::derive(&MasterSecret([2; 32]));
        let raw = [0x61u8; 100];
        assert_ne!(a.block_id(&raw), BlockId::of(&raw));
        assert_ne!(a.block_id(&raw), b.block_id(&raw));
        assert_eq!(a.hasher().id(&raw), a.block_id(&raw));
        assert_eq!(BlockHasher::Plain.id(&raw), BlockId::of(&raw));
    }
}
