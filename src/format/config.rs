//! The repository `config` object: written once by `init`, never modified.
//! spec: format-spec/01-layout.md#config

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::FormatError;

pub const FORMAT_VERSION: u32 = 1;
/// The version of encrypted repositories (spec: format-spec/09-encryption.md).
pub const ENCRYPTED_VERSION: u32 = 2;
pub const MAX_CONFIG_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    /// 32 random bytes, 64 hex digits.
    pub id: String,
    pub created: DateTime<Utc>,
    pub block_size: u32,
    /// Always "blake3" in version 1.
    pub hash: String,
    /// Always "zstd" in version 1.
    pub compression: String,
    pub compression_level: i32,
    /// Writers close a pack once it reaches this size.
    pub pack_size_target_bytes: u64,
}

pub fn encode(config: &RepoConfig) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(config).expect("config serializes");
    v.push(b'\n');
    v
}

pub fn decode(bytes: &[u8]) -> Result<RepoConfig, FormatError> {
    match decode_outer(bytes)? {
        Outer::Plain(c) => Ok(c),
        Outer::Encrypted { .. } => Err(FormatError::invalid(
            WHAT,
            "the repository is encrypted; its body needs the key",
        )),
    }
}

const WHAT: &str = "config";

/// A `config` as read before any key is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outer {
    /// Version 1: everything in the clear.
    Plain(RepoConfig),
    /// Version 2 (spec: format-spec/09-encryption.md#config): the id in
    /// the clear, the body sealed.
    Encrypted { id: String, sealed: Vec<u8> },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptedJson {
    version: u32,
    id: String,
    encryption: String,
    sealed: String,
}

/// The sealed part of a version-2 config.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    created: DateTime<Utc>,
    block_size: u32,
    hash: String,
    compression: String,
    compression_level: i32,
    pack_size_target_bytes: u64,
}

/// The `encryption` field of version 2.
pub const ENCRYPTION: &str = "aes256gcm-blake3";
/// The `hash` of a version-2 body.
pub const KEYED_HASH: &str = "blake3-keyed";

/// Decodes `config` as far as it can be without a key.
pub fn decode_outer(bytes: &[u8]) -> Result<Outer, FormatError> {
    use base64::Engine as _;
    if bytes.len() > MAX_CONFIG_LEN {
        return Err(FormatError::invalid(WHAT, "larger than 64 KiB"));
    }
    // Read the version first so a newer format gets a clear message.
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let v: VersionOnly =
        serde_json::from_slice(bytes).map_err(|e| FormatError::invalid(WHAT, e.to_string()))?;
    match v.version {
        FORMAT_VERSION => {
            let c: RepoConfig = serde_json::from_slice(bytes)
                .map_err(|e| FormatError::invalid(WHAT, e.to_string()))?;
            validate(&c)?;
            Ok(Outer::Plain(c))
        }
        ENCRYPTED_VERSION => {
            let j: EncryptedJson = serde_json::from_slice(bytes)
                .map_err(|e| FormatError::invalid(WHAT, e.to_string()))?;
            if j.encryption != ENCRYPTION {
                return Err(FormatError::invalid(
                    WHAT,
                    format!("unsupported encryption '{}'", j.encryption),
                ));
            }
            check_id(&j.id)?;
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(&j.sealed)
                .map_err(|e| FormatError::invalid(WHAT, format!("sealed: {e}")))?;
            Ok(Outer::Encrypted {
                id: j.id.to_ascii_lowercase(),
                sealed,
            })
        }
        version => Err(FormatError::UnsupportedVersion {
            what: WHAT,
            version,
        }),
    }
}

/// The plaintext body of a version-2 config.
pub fn encode_body(config: &RepoConfig) -> Vec<u8> {
    let b = Body {
        created: config.created,
        block_size: config.block_size,
        hash: config.hash.clone(),
        compression: config.compression.clone(),
        compression_level: config.compression_level,
        pack_size_target_bytes: config.pack_size_target_bytes,
    };
    serde_json::to_vec(&b).expect("config body serializes")
}

/// The version-2 config of `id` with its sealed body.
pub fn encode_encrypted(id: &str, sealed: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let j = EncryptedJson {
        version: ENCRYPTED_VERSION,
        id: id.to_string(),
        encryption: ENCRYPTION.into(),
        sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
    };
    let mut v = serde_json::to_vec_pretty(&j).expect("config serializes");
    v.push(b'\n');
    v
}

/// A version-2 config from its id and opened body, checked as version 1's.
pub fn decode_body(id: &str, body: &[u8]) -> Result<RepoConfig, FormatError> {
    if body.len() > MAX_CONFIG_LEN {
        return Err(FormatError::invalid(WHAT, "body larger than 64 KiB"));
    }
    let b: Body =
        serde_json::from_slice(body).map_err(|e| FormatError::invalid(WHAT, e.to_string()))?;
    let c = RepoConfig {
        version: ENCRYPTED_VERSION,
        id: id.to_string(),
        created: b.created,
        block_size: b.block_size,
        hash: b.hash,
        compression: b.compression,
        compression_level: b.compression_level,
        pack_size_target_bytes: b.pack_size_target_bytes,
    };
    validate(&c)?;
    Ok(c)
}

fn check_id(id: &str) -> Result<(), FormatError> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FormatError::invalid(WHAT, "id is not 64 hex digits"));
    }
    Ok(())
}

/// The rules every config obeys, whichever version carried it.
fn validate(c: &RepoConfig) -> Result<(), FormatError> {
    let hash = if c.version == ENCRYPTED_VERSION {
        KEYED_HASH
    } else {
        "blake3"
    };
    if c.hash != hash || c.compression != "zstd" {
        return Err(FormatError::invalid(
            WHAT,
            format!(
                "unsupported hash '{}' or compression '{}'",
                c.hash, c.compression
            ),
        ));
    }
    if !super::snapshot::valid_block_size(c.block_size) {
        return Err(FormatError::invalid(
            WHAT,
            format!("block size {} invalid", c.block_size),
        ));
    }
    if !(1..=22).contains(&c.compression_level) {
        return Err(FormatError::invalid(
            WHAT,
            format!("zstd level {} outside 1..=22", c.compression_level),
        ));
    }
    check_id(&c.id)
}
