//! Lock objects (`locks/<random>`): who holds the repository and how.
//! spec: format-spec/05-locks.md

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::FormatError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockInfo {
    /// Exclusive locks (prune) exclude every other lock.
    pub exclusive: bool,
    pub hostname: String,
    pub pid: u32,
    /// When this lock object was written; refreshing writes a new object.
    pub time: DateTime<Utc>,
    /// The command holding it, for humans.
    pub command: String,
}

pub fn encode(lock: &LockInfo) -> Vec<u8> {
    serde_json::to_vec(lock).expect("lock serializes")
}

pub fn decode(bytes: &[u8]) -> Result<LockInfo, FormatError> {
    if bytes.len() > 64 * 1024 {
        return Err(FormatError::invalid("lock", "larger than 64 KiB"));
    }
    serde_json::from_slice(bytes).map_err(|e| FormatError::invalid("lock", e.to_string()))
}
