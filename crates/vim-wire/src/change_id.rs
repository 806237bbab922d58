//! The changeId of a CBT-tracked disk: `<uuid part>/<sequence>`, e.g.
//! `52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/3` (VDDK guide:
//! "a sequence number in the form <UUID>/<nnn>; if <UUID> changes,
//! tracking information has become invalid"). Split on the last `/`.
//! The special value `*` (all allocated areas) is not a changeId; a
//! caller checks for it before parsing.

use crate::error::ChangeIdError;

/// A parsed changeId.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChangeId {
    /// The tracking epoch: a new one means tracking was reset.
    pub uuid: String,
    pub sequence: u64,
}

impl ChangeId {
    pub fn parse(value: &str) -> Result<ChangeId, ChangeIdError> {
        let (uuid, sequence) = value
            .rsplit_once('/')
            .ok_or_else(|| ChangeIdError::NoSeparator(value.to_string()))?;
        if uuid.trim().is_empty() {
            return Err(ChangeIdError::EmptyUuid(value.to_string()));
        }
        if sequence.is_empty() || !sequence.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ChangeIdError::BadSequence {
                value: value.to_string(),
                sequence: sequence.to_string(),
            });
        }
        let sequence = sequence.parse().map_err(|_| ChangeIdError::BadSequence {
            value: value.to_string(),
            sequence: sequence.to_string(),
        })?;
        Ok(ChangeId {
            uuid: uuid.to_string(),
            sequence,
        })
    }

    /// Whether `other` is of the same tracking epoch (incremental possible).
    pub fn same_epoch(&self, other: &ChangeId) -> bool {
        self.uuid == other.uuid
    }
}

impl std::fmt::Display for ChangeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.uuid, self.sequence)
    }
}

impl std::str::FromStr for ChangeId {
    type Err = ChangeIdError;

    fn from_str(s: &str) -> Result<ChangeId, ChangeIdError> {
        ChangeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsphere_form() {
        let c = ChangeId::parse("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/3").unwrap();
        assert_eq!(c.uuid, "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b");
        assert_eq!(c.sequence, 3);
        assert_eq!(
            c.to_string(),
            "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/3"
        );
        // The last '/' separates.
        assert_eq!(ChangeId::parse("a/b/17").unwrap().uuid, "a/b");
    }

    #[test]
    fn malformed() {
        assert_eq!(
            ChangeId::parse("*"),
            Err(ChangeIdError::NoSeparator("*".into()))
        );
        assert_eq!(
            ChangeId::parse("/4"),
            Err(ChangeIdError::EmptyUuid("/4".into()))
        );
        for bad in ["u/", "u/x", "u/-1", "u/+1", "u/99999999999999999999999"] {
            assert!(
                matches!(ChangeId::parse(bad), Err(ChangeIdError::BadSequence { .. })),
                "{bad}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn round_trip(uuid in "[0-9a-f -]{1,47}[0-9a-f]", sequence in proptest::prelude::any::<u64>()) {
            let c = ChangeId { uuid, sequence };
            proptest::prop_assert_eq!(ChangeId::parse(&c.to_string()).unwrap(), c);
        }

        #[test]
        fn never_panics(s in ".{0,80}") {
            let _ = ChangeId::parse(&s);
        }
    }
}
