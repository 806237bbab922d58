//! Feeds arbitrary bytes to the framing of sealed objects and sealed packs
//! (spec: format-spec/09-encryption.md#objects, #pack) under a fixed key.
//! Nothing may panic, nothing forged may open, and a value sealed with the
//! fixed key opens back to exactly what was sealed.
#![no_main]

use std::sync::Arc;

use cbtvault::crypto::codec::open_sealed_object;
use cbtvault::crypto::{Bound, Codec, Keys, MasterSecret};
use cbtvault::format::pack::{self, Framing};
use cbtvault::format::BlockId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = Keys::derive(&MasterSecret([7u8; 32]));
    let key = *keys.object_key();
    // Arbitrary bytes never open (a forgery would need the key).
    for bound in [Bound::Snapshot, Bound::Index, Bound::Lock([1; 32])] {
        assert!(open_sealed_object(&key, bound, data).is_err());
    }
    let codec = Codec::Sealed(Arc::new(keys));
    let id = BlockId([3u8; 32]);
    assert!(codec.open_blob(id, data).is_err());
    // A sealed pack's index never decodes from arbitrary bytes either,
    // and never panics on the way.
    let r = pack::decode_pack_index_framed(data, 1 << 16, Framing::SEALED, |t| {
        codec.open_trailer(t).map_err(|e| e.to_string())
    });
    assert!(r.is_err());
    // Round trip: what is sealed opens to itself, bound to what it is.
    let sealed = codec.seal_object(Bound::Index, data.to_vec()).unwrap();
    assert_eq!(codec.open_object(Bound::Index, &sealed).unwrap(), data);
    assert!(codec.open_object(Bound::Snapshot, &sealed).is_err());
    let mut buf = vec![0u8; cbtvault::crypto::NONCE_LEN];
    buf.extend_from_slice(data);
    codec
        .seal_blob(id, &mut buf, 0, cbtvault::crypto::codec::Expected::Frame(data))
        .unwrap();
    assert_eq!(&*codec.open_blob(id, &buf).unwrap(), data);
});
