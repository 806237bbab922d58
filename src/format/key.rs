//! Key objects `keys/<name>` of encrypted repositories: JSON with the
//! Argon2id parameters, the salt and the wrapped master secret.
//!
//! spec: format-spec/09-encryption.md#key-object

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::FormatError;

pub const MAX_KEY_LEN: usize = 64 * 1024;
/// Length of the `master` field: a 32-byte secret sealed (40 bytes more).
pub const WRAPPED_LEN: usize = 72;

/// Argon2id parameters, as stored with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    pub const MEMORY_KIB: std::ops::RangeInclusive<u32> = 8192..=4 * 1024 * 1024;
    pub const ITERATIONS: std::ops::RangeInclusive<u32> = 1..=64;
    pub const PARALLELISM: std::ops::RangeInclusive<u32> = 1..=16;

    /// What writers use unless told otherwise: 64 MiB, 3 passes, 1 lane.
    pub const DEFAULT: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };

    pub fn check(&self) -> Result<(), FormatError> {
        let bad = |what: &str, v: u32, r: &std::ops::RangeInclusive<u32>| {
            FormatError::invalid(
                "key object",
                format!("{what} {v} outside {}..={}", r.start(), r.end()),
            )
        };
        if !Self::MEMORY_KIB.contains(&self.memory_kib) {
            return Err(bad("kdf_memory_kib", self.memory_kib, &Self::MEMORY_KIB));
        }
        if !Self::ITERATIONS.contains(&self.iterations) {
            return Err(bad("kdf_iterations", self.iterations, &Self::ITERATIONS));
        }
        if !Self::PARALLELISM.contains(&self.parallelism) {
            return Err(bad("kdf_parallelism", self.parallelism, &Self::PARALLELISM));
        }
        Ok(())
    }
}

/// A decoded key object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyObject {
    pub created: DateTime<Utc>,
    pub hostname: String,
    pub username: String,
    pub kdf: KdfParams,
    pub salt: [u8; 32],
    /// The sealed master secret (seal type 7).
    pub master: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Json {
    created: DateTime<Utc>,
    hostname: String,
    username: String,
    kdf: String,
    kdf_memory_kib: u32,
    kdf_iterations: u32,
    kdf_parallelism: u32,
    salt: String,
    master: String,
}

pub fn encode(key: &KeyObject) -> Vec<u8> {
    let j = Json {
        created: key.created,
        hostname: key.hostname.clone(),
        username: key.username.clone(),
        kdf: "argon2id".into(),
        kdf_memory_kib: key.kdf.memory_kib,
        kdf_iterations: key.kdf.iterations,
        kdf_parallelism: key.kdf.parallelism,
        salt: hex::encode(key.salt),
        master: hex::encode(&key.master),
    };
    let mut v = serde_json::to_vec_pretty(&j).expect("key object serializes");
    v.push(b'\n');
    v
}

pub fn decode(bytes: &[u8]) -> Result<KeyObject, FormatError> {
    const WHAT: &str = "key object";
    if bytes.len() > MAX_KEY_LEN {
        return Err(FormatError::invalid(WHAT, "larger than 64 KiB"));
    }
    let j: Json =
        serde_json::from_slice(bytes).map_err(|e| FormatError::invalid(WHAT, e.to_string()))?;
    if j.kdf != "argon2id" {
        return Err(FormatError::invalid(
            WHAT,
            format!("unsupported kdf '{}'", j.kdf),
        ));
    }
    let kdf = KdfParams {
        memory_kib: j.kdf_memory_kib,
        iterations: j.kdf_iterations,
        parallelism: j.kdf_parallelism,
    };
    kdf.check()?;
    let mut salt = [0u8; 32];
    hex::decode_to_slice(&j.salt, &mut salt)
        .map_err(|_| FormatError::invalid(WHAT, "salt is not 64 hex digits"))?;
    let master = hex::decode(&j.master)
        .ok()
        .filter(|m| m.len() == WRAPPED_LEN)
        .ok_or_else(|| FormatError::invalid(WHAT, "master is not 144 hex digits"))?;
    Ok(KeyObject {
        created: j.created,
        hostname: j.hostname,
        username: j.username,
        kdf,
        salt,
        master,
    })
}
