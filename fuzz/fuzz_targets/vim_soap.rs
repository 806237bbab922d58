//! Hostile vSphere traffic: arbitrary bytes into the vim25 SOAP codec
//! (`vim-wire`) both ways (a server reading a request, a client reading
//! the response of every method, including faults), the changeId parser
//! and the vSphere simulator's HTTP head and Range parsers. Never a panic;
//! a decoded request re-encodes to one that decodes to the same request,
//! a decoded response or fault likewise, and a parsed changeId prints
//! back to a value that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vim_wire::{ChangeId, Method, Request, Response};
use vsphere_sim::http;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::from_envelope(data) {
        let again = Request::from_envelope(req.to_envelope().as_bytes())
            .expect("a request we encoded decodes");
        assert_eq!(again, req);
    }
    for method in Method::ALL {
        match Response::from_envelope(method, data) {
            Ok(Ok(resp)) => {
                let again = Response::from_envelope(method, resp.to_envelope(method).as_bytes())
                    .expect("a response we encoded decodes");
                assert_eq!(again, Ok(resp));
            }
            Ok(Err(fault)) => {
                let again = Response::from_envelope(method, fault.to_envelope().as_bytes())
                    .expect("a fault we encoded decodes");
                assert_eq!(again, Err(fault));
            }
            Err(_) => {}
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = ChangeId::parse(text) {
            assert_eq!(ChangeId::parse(&c.to_string()), Ok(c));
        }
        if let http::RangeRequest::Part(s, e) = http::parse_range(Some(text), 1 << 30) {
            assert!(s <= e && e < 1 << 30);
        }
    }
    if let Ok(Some((head, used))) = http::parse_head(data) {
        assert!(used <= data.len());
        let _ = (head.content_length(), head.keep_alive(), head.basic_auth());
    }
});
