//! Errors of the codec: [`XmlError`] for bytes that are not the XML this
//! crate reads, [`DecodeError`] for well-formed XML that is not the vim25
//! shape expected (naming the element and where it was looked for), and
//! [`ChangeIdError`] for a changeId that is not `<uuid>/<sequence>`.
//! What a vSphere call answers on failure is a [`crate::soap::Fault`], not
//! an error of this module.

/// The bytes are not an XML document this codec accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("malformed XML at byte {at}: {reason}")]
    Malformed { at: usize, reason: String },
    #[error("XML nesting deeper than {0} levels")]
    TooDeep(usize),
    #[error("XML document larger than {0} bytes")]
    TooLarge(usize),
    #[error("XML prefix '{prefix}' is not declared (in <{element}>)")]
    UnboundPrefix { prefix: String, element: String },
}

/// Well-formed XML that is not the vim25 / SOAP shape expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error("not a SOAP envelope: {0}")]
    NotSoap(String),
    #[error("missing <{element}> in <{within}>")]
    Missing { element: String, within: String },
    #[error("bad <{element}> in <{within}>: '{value}' is not {expected}")]
    Invalid {
        element: String,
        within: String,
        value: String,
        expected: &'static str,
    },
    #[error("unexpected <{found}> where {expected} was expected")]
    Unexpected { found: String, expected: String },
    #[error("unknown vim25 method '{0}'")]
    UnknownMethod(String),
}

impl DecodeError {
    pub(crate) fn missing(element: &str, within: &str) -> DecodeError {
        DecodeError::Missing {
            element: element.to_string(),
            within: within.to_string(),
        }
    }

    pub(crate) fn invalid(
        element: &str,
        within: &str,
        value: &str,
        expected: &'static str,
    ) -> DecodeError {
        DecodeError::Invalid {
            element: element.to_string(),
            within: within.to_string(),
            // A hostile value is quoted, not echoed whole.
            value: value.chars().take(80).collect(),
            expected,
        }
    }
}

/// A changeId that is not `<uuid part>/<sequence>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeIdError {
    #[error("changeId '{0}' has no '/' before its sequence number")]
    NoSeparator(String),
    #[error("changeId '{0}' has an empty uuid part")]
    EmptyUuid(String),
    #[error("changeId '{value}': sequence '{sequence}' is not a decimal number")]
    BadSequence { value: String, sequence: String },
}
