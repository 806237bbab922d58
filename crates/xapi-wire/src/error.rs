//! Errors: [`ApiError`] is what a XenAPI call answers on failure (code and
//! string parameters, exactly as xapi sends them, xenapi-reference.md §2.1);
//! [`WireError`] is a body that cannot be read at all; [`ChunkedError`] a
//! broken `chunked` import body.

/// A XenAPI failure: `ErrorDescription` = `[code, params...]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {params:?}")]
pub struct ApiError {
    pub code: String,
    pub params: Vec<String>,
}

/// SM's message for `CBTChangedBlocksError` (XE_SR_ERRORCODES.xml 460).
pub const CBT_460_PREFIX: &str = "Failed to calculate changed blocks for given VDIs.";

impl ApiError {
    pub fn new<S: Into<String>>(code: &str, params: impl IntoIterator<Item = S>) -> ApiError {
        ApiError {
            code: code.to_string(),
            params: params.into_iter().map(Into::into).collect(),
        }
    }

    pub fn session_invalid(session: &str) -> ApiError {
        ApiError::new("SESSION_INVALID", [session])
    }

    pub fn handle_invalid(class: &str, reference: &str) -> ApiError {
        ApiError::new("HANDLE_INVALID", [class, reference])
    }

    pub fn uuid_invalid(class: &str, uuid: &str) -> ApiError {
        ApiError::new("UUID_INVALID", [class, uuid])
    }

    pub fn method_unknown(method: &str) -> ApiError {
        ApiError::new("MESSAGE_METHOD_UNKNOWN", [method])
    }

    pub fn count_mismatch(method: &str, expected: usize, received: usize) -> ApiError {
        ApiError::new(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            [
                method.to_string(),
                expected.to_string(),
                received.to_string(),
            ],
        )
    }

    pub fn operation_not_allowed(reason: impl Into<String>) -> ApiError {
        ApiError::new("OPERATION_NOT_ALLOWED", [reason.into()])
    }

    pub fn incompatible_type(vdi: &str, vdi_type: &str) -> ApiError {
        ApiError::new("VDI_INCOMPATIBLE_TYPE", [vdi, vdi_type])
    }

    /// What tapdisk's I/O failures surface as.
    pub fn vdi_io() -> ApiError {
        ApiError::new("VDI_IO_ERROR", ["Device I/O errors"])
    }

    /// As [`Self::vdi_io`], with the cause.
    pub fn vdi_io_from(e: impl std::fmt::Display) -> ApiError {
        ApiError::new("VDI_IO_ERROR", [format!("Device I/O errors: {e}")])
    }

    pub fn in_use(vdi: &str, operation: &str) -> ApiError {
        ApiError::new("VDI_IN_USE", [vdi, operation])
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new("INTERNAL_ERROR", [message.into()])
    }

    /// A value of the wrong type (xapi: `FIELD_TYPE_ERROR [field]`).
    pub fn field_type(field: &str) -> ApiError {
        ApiError::new("FIELD_TYPE_ERROR", [field])
    }

    /// `SR_BACKEND_FAILURE_460` as SM raises it for `list_changed_blocks`
    /// (`["", "<description> [opterr=<detail>]", stderr]`).
    pub fn cbt_changed_blocks(detail: &str) -> ApiError {
        ApiError::new(
            "SR_BACKEND_FAILURE_460",
            [
                String::new(),
                format!("{CBT_460_PREFIX} [opterr={detail}]"),
                String::new(),
            ],
        )
    }

    /// `[code, params...]`, the XML-RPC `ErrorDescription` / JSON-RPC v1 `error`.
    pub fn description(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(self.params.len() + 1);
        v.push(self.code.clone());
        v.extend(self.params.iter().cloned());
        v
    }
}

/// A request the RPC layer cannot even read (xapi answers HTTP 500 with an
/// HTML page, not an API error: xenapi-reference.md §1.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed XML at byte {at}: {reason}")]
    Xml { at: usize, reason: String },
    #[error("malformed XML-RPC: {0}")]
    XmlRpc(String),
    #[error("malformed JSON-RPC: {0}")]
    JsonRpc(String),
    #[error("nesting deeper than {0} levels")]
    TooDeep(usize),
}

/// A `chunked` import body that breaks the format (the decoder stops there).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChunkedError(pub String);
