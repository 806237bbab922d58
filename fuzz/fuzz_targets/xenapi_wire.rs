//! Hostile XenAPI traffic: arbitrary bytes into the server halves of the
//! XML-RPC and JSON-RPC codecs (`xapi-wire`), the simulator's HTTP
//! request-head parser, and the chunked `import_raw_vdi` body decoder.
//! Never a panic; a decoded XML-RPC call re-encodes to a call that decodes
//! to the same thing, a decoded JSON-RPC request's method and parameters
//! survive the client's encoder, and the data a chunked body carries
//! survives re-encoding with the one chunked encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xapi_sim::http;
use xapi_wire::chunked::{self, ChunkStep, ChunkedImport};
use xapi_wire::{jsonrpc, xmlrpc, Value};

/// (disk offset, data) runs, adjacent runs merged.
type Runs = Vec<(u64, Vec<u8>)>;

/// Data runs of a chunked body and whether its terminator came; `None`
/// when the body is rejected. Stops at the terminator or the end of input.
fn chunked_runs(body: &[u8]) -> Option<(Runs, bool)> {
    let mut decoder = ChunkedImport::new();
    let mut runs: Runs = Vec::new();
    let mut rest = body;
    while !rest.is_empty() && !decoder.is_done() {
        let (used, step) = decoder.feed(rest).ok()?;
        assert!(used <= rest.len());
        if let ChunkStep::Data { offset, len } = step {
            assert!(len <= used);
            let bytes = &rest[used - len..used];
            match runs.last_mut() {
                Some((at, run)) if *at + run.len() as u64 == offset => run.extend_from_slice(bytes),
                _ => runs.push((offset, bytes.to_vec())),
            }
        }
        if used == 0 {
            break;
        }
        rest = &rest[used..];
    }
    Some((runs, decoder.is_done()))
}

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
    if let Ok((method, params)) = xmlrpc::decode_call(data) {
        let again = xmlrpc::encode_call(&method, &params);
        let (m2, p2) = xmlrpc::decode_call(again.as_bytes()).expect("re-encoded call decodes");
        assert_eq!(m2, method);
        assert_eq!(
            p2.iter().map(xmlrpc::normalize).collect::<Vec<_>>(),
            params.iter().map(xmlrpc::normalize).collect::<Vec<_>>()
        );
    }
    let _ = xmlrpc::decode_response(data);
    if let Ok(request) = jsonrpc::decode_request(data) {
        let again = jsonrpc::encode_request(1, &request.method, &request.params);
        let r2 = jsonrpc::decode_request(&again).expect("re-encoded request decodes");
        assert_eq!(r2.method, request.method);
        assert_eq!(r2.params.len(), request.params.len());
        assert!(r2
            .params
            .iter()
            .zip(&request.params)
            .all(|(a, b)| same(a, b)));
    }
    if let Ok(Some((_, used))) = http::parse_head(data) {
        assert!(used <= data.len());
    }
    if let Some((runs, done)) = chunked_runs(data) {
        let mut body = Vec::new();
        for (offset, bytes) in &runs {
            for (i, piece) in bytes.chunks(1 << 16).enumerate() {
                chunked::encode_chunk(offset + (i as u64) * (1 << 16), piece, &mut body);
            }
        }
        if done {
            body.extend_from_slice(&chunked::END);
        }
        let (again, done_again) = chunked_runs(&body).expect("re-encoded body decodes");
        assert_eq!(again, runs);
        assert_eq!(done_again, done);
    }
});
