//! Feeds arbitrary bytes to the snapshot decoders (spec:
//! format-spec/03-snapshot.md, both versions). It must never panic;
//! whatever decodes must encode, and the encoding must decode to the same
//! object.
#![no_main]

use cbtvault::format::snapshot::{self, StoredSnapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let meta = snapshot::decode_meta(data);
    let any = snapshot::decode_any(data);
    // The version 1 decoder agrees with decode_any on version 1 objects.
    match (snapshot::decode(data), &any) {
        (Ok(v1), Ok(StoredSnapshot::Inline(o))) => assert_eq!(&v1, o),
        (Ok(v1), other) => panic!("version 1 decoded {v1:?} but decode_any gave {other:?}"),
        _ => {}
    }
    let Ok(obj) = any else {
        return;
    };
    assert_eq!(meta.as_ref().ok(), Some(obj.meta()));
    match obj {
        StoredSnapshot::Inline(obj) => {
            let bytes = snapshot::encode(&obj).expect("a decoded snapshot encodes");
            let again = snapshot::decode(&bytes).expect("an encoded snapshot decodes");
            assert_eq!(again, obj);
            // Encoding is deterministic.
            assert_eq!(snapshot::encode(&again).unwrap(), bytes);
        }
        StoredSnapshot::Paged(obj) => {
            let bytes = snapshot::encode_paged(&obj).expect("a decoded object encodes");
            match snapshot::decode_any(&bytes).expect("an encoded object decodes") {
                StoredSnapshot::Paged(again) => assert_eq!(again, obj),
                other => panic!("version 2 re-decoded as {other:?}"),
            }
        }
    }
});
