//! Feeds arbitrary text to the change-bitmap decoder (spec:
//! format-spec/03-snapshot.md#bitmap), as a hostile XenServer would send it.
//! It must never panic; a decoded bitmap must round-trip through base64 and
//! agree with its own iterators.
#![no_main]

use cbtvault::format::bitmap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 2 bytes choose the disk's block count, the rest is the text.
    if data.len() < 2 {
        return;
    }
    let blocks = u16::from_le_bytes([data[0], data[1]]) as u64;
    let Ok(text) = std::str::from_utf8(&data[2..]) else {
        return;
    };
    let Ok(b) = bitmap::decode_base64(text, blocks) else {
        return;
    };
    assert_eq!(b.len() as u64, bitmap::len_for(blocks));
    assert!(bitmap::validate(&b, blocks).is_ok());
    let encoded = bitmap::encode_base64(&b);
    assert_eq!(bitmap::decode_base64(&encoded, blocks).unwrap(), b);
    let set: Vec<u64> = bitmap::iter_set(&b).collect();
    assert_eq!(set.len() as u64, bitmap::count(&b));
    assert!(set.iter().all(|&i| i < blocks && bitmap::is_set(&b, i)));
    let mut rebuilt = vec![0u8; b.len()];
    for &i in &set {
        bitmap::set(&mut rebuilt, i);
    }
    assert_eq!(rebuilt, b);
});
