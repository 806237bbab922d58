//! JSON-RPC v1 and v2 envelopes as xapi handles them on `POST /jsonrpc`,
//! sans I/O (xenapi-reference.md §1.3): `"jsonrpc": "2.0"` selects v2,
//! anything else v1; `params` is a positional array; `id` must be present
//! and non-null. Errors are `["CODE", params...]` in v1 and
//! `{"code": 1, "message": "CODE", "data": [params...]}` in v2.
//!
//! Both halves: the server's ([`decode_request`], [`encode_response`]) and
//! the client's ([`encode_request`], [`decode_response`]).

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

/// A v2 request body for `method` (the client half; xapi answers v2).
pub fn encode_request(id: u64, method: &str, params: &[Value]) -> Vec<u8> {
    let body = json!({
        "jsonrpc": "2.0",
        "method": method,
        "params": params.iter().map(to_json).collect::<Vec<_>>(),
        "id": id,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Decodes a response body (v1 or v2): `Ok(Ok(result))`, `Ok(Err(api
/// error))` for an `error` member, or a [`WireError::JsonRpc`] for a body
/// that is not a response at all.
pub fn decode_response(body: &[u8]) -> Result<Result<Value, ApiError>, WireError> {
    let bad = |reason: String| WireError::JsonRpc(reason);
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(mut o) = v else {
        return Err(bad("not a JSON object".into()));
    };
    match o.remove("error") {
        None | Some(serde_json::Value::Null) => {}
        // v2: {"code": 1, "message": CODE, "data": [params...]}
        Some(serde_json::Value::Object(e)) => {
            let code = e
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("UNKNOWN_ERROR")
                .to_string();
            let params = match e.get("data") {
                Some(serde_json::Value::Array(a)) => a.iter().map(json_text).collect(),
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(other) => vec![json_text(other)],
            };
            return Ok(Err(ApiError { code, params }));
        }
        // v1: ["CODE", params...]
        Some(serde_json::Value::Array(a)) => {
            let mut items = a.iter().map(json_text);
            let code = items.next().unwrap_or_else(|| "UNKNOWN_ERROR".into());
            return Ok(Err(ApiError {
                code,
                params: items.collect(),
            }));
        }
        Some(other) => return Err(bad(format!("unexpected error value {other}"))),
    }
    match o.remove("result") {
        Some(r) => Ok(Ok(from_json(r))),
        None => Err(bad("neither result nor error".into())),
    }
}

/// An error parameter as text: strings as they are, anything else as JSON.
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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
    fn client_half_round_trips_through_the_server_half() {
        let body = encode_request(7, "VDI.get_uuid", &[Value::str("s"), Value::Int(1 << 40)]);
        let r = decode_request(&body).unwrap();
        assert_eq!(r.version, Version::V2);
        assert_eq!(r.method, "VDI.get_uuid");
        assert_eq!(r.params, vec![Value::str("s"), Value::Int(1 << 40)]);
        for version in [Version::V1, Version::V2] {
            let ok = Ok(Value::strings(["a", "b"]));
            assert_eq!(
                decode_response(&encode_response(version, &r.id, &ok)).unwrap(),
                ok
            );
            let err = Err(ApiError::new("VDI_IN_USE", ["OpaqueRef:v", "snapshot"]));
            assert_eq!(
                decode_response(&encode_response(version, &r.id, &err)).unwrap(),
                err
            );
        }
        for bad in [&b"{"[..], b"[1]", b"{\"id\":1}", b"{\"error\":7}"] {
            assert!(matches!(decode_response(bad), Err(WireError::JsonRpc(_))));
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
