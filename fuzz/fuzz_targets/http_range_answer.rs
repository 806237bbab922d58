//! Feeds arbitrary bytes, as a host's answer to a datastore Range read, to
//! the direct reader's head decoder and body framing
//! (src/source/vmware/range_get.rs). Neither may panic; a body that is
//! accepted filled the buffers exactly, never more.
#![no_main]

use cbtvault::source::vmware::range_get::{parse_head, read_body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        let _ = parse_head(data);
        return;
    };
    let Ok(head) = parse_head(&data[..at]) else {
        return;
    };
    let body = &data[at + 4..];
    // Buffers shaped by the first body byte: one to three pieces.
    let lens: Vec<usize> = match body.first().map(|b| b % 3) {
        Some(0) | None => vec![7],
        Some(1) => vec![3, 5],
        _ => vec![1, 0, 9],
    };
    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
    let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let mut r = std::io::Cursor::new(body);
    if read_body(&mut r, head.chunked, &mut refs).is_ok() && !head.chunked {
        let total: usize = lens.iter().sum();
        assert_eq!(&bufs.concat()[..], &body[..total]);
    }
});
