//! A hostile XenAPI host's JSON-RPC answers fed to the client's response
//! decoder (`xapi_wire::jsonrpc::decode_response`). Never a panic; whatever
//! decodes (a result or an API error) re-encodes through the server half,
//! as v1 and as v2, to a body that decodes to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xapi_wire::jsonrpc::{self, Version};
use xapi_wire::Value;

/// Doubles compared by value within a rounding step (JSON text need not
/// give back every last bit of an f64).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Double(x), Value::Double(y)) => x == y || (x - y).abs() <= x.abs() * 1e-15,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Struct(x), Value::Struct(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((k, x), (l, y))| k == l && same(x, y))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = jsonrpc::decode_response(data) else {
        return;
    };
    let id = serde_json::Value::from(7);
    for version in [Version::V1, Version::V2] {
        let body = jsonrpc::encode_response(version, &id, &decoded);
        let again = jsonrpc::decode_response(&body).expect("re-encoded response decodes");
        match (&decoded, &again) {
            (Ok(a), Ok(b)) => assert!(same(a, b), "{a:?} became {b:?}"),
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("{decoded:?} became {again:?}"),
        }
    }
});
