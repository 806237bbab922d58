//! The password key: Argon2id over the password with a key object's salt
//! and parameters, and wrapping / unwrapping the master secret with it.
//!
//! spec: format-spec/09-encryption.md#key-object

use zeroize::Zeroize;

use super::{open, seal_with, Bound, CryptoError, MasterSecret, NONCE_LEN};
use crate::format::key::{KdfParams, KeyObject};

/// `W = Argon2id(password, salt, m, t, p)`, 32 bytes. The parameters are
/// checked first (a hostile key object must not make us allocate more
/// than the format allows).
pub fn password_key(
    password: &[u8],
    salt: &[u8; 32],
    params: &KdfParams,
) -> Result<[u8; 32], CryptoError> {
    params
        .check()
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    let p = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(32),
    )
    .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(password, salt, &mut out)
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    Ok(out)
}

/// The master secret wrapped for `password`: the `master` field of a key
/// object (seal type 7, bound to the repository id).
pub fn wrap_with(
    master: &MasterSecret,
    password: &[u8],
    salt: &[u8; 32],
    params: &KdfParams,
    repo_id: &[u8; 32],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, CryptoError> {
    let mut w = password_key(password, salt, params)?;
    let sealed = seal_with(&w, nonce, &Bound::Key(*repo_id), &master.0);
    w.zeroize();
    Ok(sealed)
}

/// The master secret from `key` if `password` opens it; `Ok(None)` when
/// it does not (another key's password, or a wrong one).
pub fn unwrap(
    key: &KeyObject,
    password: &[u8],
    repo_id: &[u8; 32],
) -> Result<Option<MasterSecret>, CryptoError> {
    let mut w = password_key(password, &key.salt, &key.kdf)?;
    let opened = open(&w, &Bound::Key(*repo_id), &key.master);
    w.zeroize();
    match opened {
        Ok(mut bytes) if bytes.len() == 32 => {
            let mut m = [0u8; 32];
            m.copy_from_slice(&bytes);
            bytes.zeroize();
            Ok(Some(MasterSecret(m)))
        }
        Ok(mut bytes) => {
            bytes.zeroize();
            Ok(None)
        }
        Err(_) => Ok(None),
    }
}
