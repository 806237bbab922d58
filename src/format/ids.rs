//! Identifiers: 32-byte BLAKE3 digests shown as 64 lower-case hex digits,
//! and random snapshot ids. Owns parsing and display, nothing else.

use std::fmt;
use std::str::FromStr;

use super::FormatError;

macro_rules! digest_id {
    ($name:ident, $what:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// BLAKE3 of `bytes`.
            pub fn of(bytes: &[u8]) -> Self {
                $name(*blake3::hash(bytes).as_bytes())
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 8 hex digits, as shown in tables.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = FormatError;
            fn from_str(s: &str) -> Result<Self, FormatError> {
                let mut out = [0u8; 32];
                if s.len() != 64 {
                    return Err(FormatError::invalid(
                        $what,
                        format!("'{s}' is not 64 hex digits"),
                    ));
                }
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| FormatError::invalid($what, format!("'{s}' is not hex")))?;
                Ok($name(out))
            }
        }
    };
}

digest_id!(
    BlockId,
    "block id",
    "BLAKE3 of a block's raw (uncompressed) bytes."
);
digest_id!(
    PageId,
    "page id",
    "Name of a manifest page: BLAKE3 of its bytes (keyed, like a block id, in an encrypted repository)."
);
digest_id!(
    ObjectName,
    "object name",
    "an immutable repository file's name: the BLAKE3 of its bytes (of a pack's trailer and footer, format-spec/02-pack.md#naming)."
);

/// A snapshot's stable identity: 16 random bytes, 32 hex digits. It stays the
/// same when the snapshot object is rewritten (a higher generation), so
/// children can name their parent by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({})", self.short())
    }
}

impl FromStr for SnapshotId {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, FormatError> {
        let mut out = [0u8; 16];
        if s.len() != 32 {
            return Err(FormatError::invalid(
                "snapshot id",
                format!("'{s}' is not 32 hex digits"),
            ));
        }
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| FormatError::invalid("snapshot id", format!("'{s}' is not hex")))?;
        Ok(SnapshotId(out))
    }
}

impl serde::Serialize for SnapshotId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for SnapshotId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
