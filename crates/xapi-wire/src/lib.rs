//! XenAPI on the wire, both ends: the [`Value`] model, XML-RPC and JSON-RPC
//! (calls and responses, encoders and decoders, API errors), and the
//! `chunked` body of `PUT /import_raw_vdi`. The product's XenAPI client and
//! the XenServer simulator share these codecs, so one encoder and one decoder
//! exist per form.
//!
//! Pure: bytes and values in, bytes and values out, no I/O. Depends on no
//! other crate of the workspace. Every decoder bounds what a peer can make
//! it allocate and is fuzzed (fuzz/).

pub mod chunked;
pub mod error;
pub mod jsonrpc;
pub mod value;
pub mod xmlrpc;

pub use error::{ApiError, ChunkedError, WireError, CBT_460_PREFIX};
pub use value::Value;
