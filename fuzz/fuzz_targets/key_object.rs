//! Feeds arbitrary bytes to the key object decoder and the version-2
//! config decoder (spec: format-spec/09-encryption.md#key-object,
//! #config). Neither may panic; a key object that decodes re-encodes to
//! bytes that decode to the same object, and its Argon2id parameters are
//! within the format's limits (so no input makes a reader allocate more
//! than 4 GiB). Argon2 itself is not run here: it is slow by design.
#![no_main]

use cbtvault::format::{config, key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = key::decode(data) {
        assert!(k.kdf.check().is_ok());
        assert_eq!(k.master.len(), key::WRAPPED_LEN);
        assert_eq!(key::decode(&key::encode(&k)).unwrap(), k);
    }
    if let Ok(config::Outer::Encrypted { id, sealed }) = config::decode_outer(data) {
        assert_eq!(id.len(), 64);
        // The body is opened only with a key; a fixed one must refuse
        // without panicking.
        let _ = cbtvault::crypto::open(
            &[0u8; 32],
            &cbtvault::crypto::Bound::Config([0u8; 32]),
            &sealed,
        );
    }
});
