//! Feeds arbitrary bytes to the snapshot decoder (spec:
//! format-spec/03-snapshot.md). It must never panic; whatever decodes must
//! encode, and the encoding must decode to the same object.
#![no_main]

use cbtvault::format::snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let meta = snapshot::decode_meta(data);
    let Ok(obj) = snapshot::decode(data) else {
        return;
    };
    assert_eq!(meta.as_ref().ok(), Some(&obj.meta));
    let bytes = snapshot::encode(&obj).expect("a decoded snapshot encodes");
    let again = snapshot::decode(&bytes).expect("an encoded snapshot decodes");
    assert_eq!(again, obj);
    // Encoding is deterministic.
    assert_eq!(snapshot::encode(&again).unwrap(), bytes);
});
