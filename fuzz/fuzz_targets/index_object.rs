//! Feeds arbitrary bytes to the index object decoder (spec:
//! format-spec/08-index.md). It must never panic, and whatever decodes
//! must re-encode to the same bytes (the encoding is canonical).
#![no_main]

use cbtvault::format::index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 4 bytes choose max_block_size, the rest is the object.
    if data.len() < 4 {
        return;
    }
    let (head, bytes) = data.split_at(4);
    let max_block_size = u32::from_le_bytes(head.try_into().unwrap());
    let Ok(packs) = index::decode(bytes, max_block_size) else {
        return;
    };
    assert_eq!(index::encode(&packs), bytes, "the encoding is canonical");
});
