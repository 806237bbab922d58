//! Hostile XenAPI traffic: arbitrary bytes into the simulator's XML-RPC and
//! JSON-RPC decoders, the HTTP request-head parser and the chunked
//! import_raw_vdi body decoder. Never a panic; a decoded XML-RPC call
//! re-encodes to a call that decodes to the same thing.
#![no_main]

use cbtvault::sim::{http, jsonrpc, xmlrpc};
use libfuzzer_sys::fuzz_target;

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
    let _ = jsonrpc::decode_request(data);
    if let Ok(Some((_, used))) = http::parse_head(data) {
        assert!(used <= data.len());
    }
    let mut chunked = http::ChunkedImport::new();
    let mut rest = data;
    while !rest.is_empty() {
        match chunked.feed(rest) {
            Ok((used, step)) => {
                assert!(used <= rest.len());
                if used == 0 && matches!(step, http::ChunkStep::Need) {
                    break;
                }
                rest = &rest[used..];
                if chunked.is_done() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
});
