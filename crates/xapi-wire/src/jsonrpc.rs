//! JSON-RPC v1 and v2 envelopes as xapi handles them on `POST /jsonrpc`,
//! sans I/O (xenapi-reference.md §1.3): `"jsonrpc": "2.0"` selects v2,
//! anything else v1; `params` is a positional array; `id` must be present
//! and non-null. Errors are `["CODE", params...]` in v1 and
//! `{"code": 1, "message": "CODE", "data": [params...]}` in v2.

use serde_json::{json, Map, Number};

use super::error::{ApiError, WireError};
use super::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A decoded call.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub version: Version,
    pub id: serde_json::Value,
    pub method: String,
    pub params: Vec<Value>,
}

/// A JSON value as a XenAPI value (numbers that fit become `Int`).
pub fn from_json(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(s),
        serde_json::Value::Array(a) => Value::Array(a.into_iter().map(from_json).collect()),
        serde_json::Value::Object(o) => {
            Value::Struct(o.into_iter().map(|(k, v)| (k, from_json(v))).collect())
        }
    }
}

/// The JSON form of a value: ints are numbers, datetimes strings.
pub fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) | Value::DateTime(s) => serde_json::Value::String(s.clone()),
        Value::Int(i) => serde_json::Value::Number((*i).into()),
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Double(d) => Number::from_f64(*d)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::Array(a) => serde_json::Value::Array(a.iter().map(to_json).collect()),
        Value::Struct(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Nil => serde_json::Value::Null,
    }
}

/// Reads one request object. Malformed input (xapi: HTTP 500) is an error.
pub fn decode_request(body: &[u8]) -> Result<Request, WireError> {
    let bad = |why: &str| WireError::JsonRpc(why.to_string());
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| WireError::JsonRpc(e.to_string()))?;
    let serde_json::Value::Object(mut o) = v else {
        return Err(bad("the request is not an object"));
    };
    let version = match o.get("jsonrpc") {
        Some(serde_json::Value::String(s)) if s == "2.0" => Version::V2,
        _ => Version::V1,
    };
    let method = match o.remove("method") {
        Some(serde_json::Value::String(s)) => s,
        _ => return Err(bad("no method string")),
    };
    let params = match o.remove("params") {
        Some(serde_json::Value::Array(a)) => a.into_iter().map(from_json).collect(),
        _ => return Err(bad("no params array")),
    };
    let id = match o.remove("id") {
        Some(serde_json::Value::Null) | None => {
            return Err(bad("no id (notifications are not accepted)"))
        }
        Some(id) => id,
    };
    Ok(Request {
        version,
        id,
        method,
        params,
    })
}

/// The response body for `result`.
pub fn encode_response(
    version: Version,
    id: &serde_json::Value,
    result: &Result<Value, ApiError>,
) -> Vec<u8> {
    let body = match (version, result) {
        (Version::V1, Ok(v)) => json!({"result": to_json(v), "error": null, "id": id}),
        (Version::V1, Err(e)) => json!({"result": null, "error": e.description(), "id": id}),
        (Version::V2, Ok(v)) => json!({"jsonrpc": "2.0", "result": to_json(v), "id": id}),
        (Version::V2, Err(e)) => json!({
            "jsonrpc": "2.0",
            "error": {"code": 1, "message": e.code, "data": e.params},
            "id": id,
        }),
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_shapes() {
        let r = decode_request(
            br#"{"jsonrpc":"2.0","method":"VDI.get_uuid","params":["s","v"],"id":3}"#,
        )
        .unwrap();
        assert_eq!(r.version, Version::V2);
        assert_eq!(r.params, vec![Value::str("s"), Value::str("v")]);
        let out: serde_json::Value = serde_json::from_slice(&encode_response(
            r.version,
            &r.id,
            &Err(ApiError::session_invalid("OpaqueRef:x")),
        ))
        .unwrap();
        assert_eq!(
            out,
            json!({"jsonrpc":"2.0","error":{"code":1,"message":"SESSION_INVALID","data":["OpaqueRef:x"]},"id":3})
        );
        let r = decode_request(br#"{"method":"m","params":[10737418240, 1.5, null],"id":"xyz"}"#)
            .unwrap();
        assert_eq!(r.version, Version::V1);
        assert_eq!(
            r.params,
            vec![Value::Int(10737418240), Value::Double(1.5), Value::Nil]
        );
        let out: serde_json::Value =
            serde_json::from_slice(&encode_response(r.version, &r.id, &Ok(Value::Int(7)))).unwrap();
        assert_eq!(out, json!({"result": 7, "error": null, "id": "xyz"}));
        let out: serde_json::Value = serde_json::from_slice(&encode_response(
            Version::V1,
            &r.id,
            &Err(ApiError::new("X", ["a"])),
        ))
        .unwrap();
        assert_eq!(
            out,
            json!({"result": null, "error": ["X", "a"], "id": "xyz"})
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode_request(&body);
        }

        #[test]
        fn arbitrary_json_never_panics(text in "[\\[\\]{}\":,0-9a-z. -]{0,80}") {
            let _ = decode_request(text.as_bytes());
        }
    }

    #[test]
    fn malformed() {
        for bad in [
            &br#"{"jsonrpc":"2.0","method":"session.login_with_password","id":0}"#[..],
            br#"{"method":"m","params":[]}"#,
            br#"{"method":"m","params":[],"id":null}"#,
            br#"[1]"#,
            b"{",
        ] {
            assert!(decode_request(bad).is_err());
        }
    }
}
