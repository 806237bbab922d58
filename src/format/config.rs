//! The repository `config` object: written once by `init`, never modified.
//! spec: format-spec/01-layout.md#config

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::FormatError;

pub const FORMAT_VERSION: u32 = 1;
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
    const WHAT: &str = "config";
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
    if v.version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: WHAT,
            version: v.version,
        });
    }
    let c: RepoConfig =
        serde_json::from_slice(bytes).map_err(|e| FormatError::invalid(WHAT, e.to_string()))?;
    if c.hash != "blake3" || c.compression != "zstd" {
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
    if c.id.len() != 64 || !c.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FormatError::invalid(WHAT, "id is not 64 hex digits"));
    }
    Ok(c)
}
