//! Feeds arbitrary bytes to the pack decoders (spec: format-spec/02-pack.md).
//! They must never panic, and whatever decodes must survive
//! encode -> decode unchanged.
#![no_main]

use cbtvault::format::pack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 4 bytes choose max_block_size, the rest is the pack.
    if data.len() < 4 {
        return;
    }
    let (head, pack_bytes) = data.split_at(4);
    let max_block_size = u32::from_le_bytes(head.try_into().unwrap());
    // Naming must not panic on any input; it decodes only footer and format.
    let name = pack::name_of_pack(pack_bytes, pack::Framing::PLAIN, |t| {
        Ok(std::borrow::Cow::Borrowed(t))
    });
    let Ok(entries) = pack::decode_pack_index(pack_bytes, max_block_size) else {
        // The footer decoder alone must not panic either.
        if pack_bytes.len() >= pack::FOOTER_LEN {
            let footer = &pack_bytes[pack_bytes.len() - pack::FOOTER_LEN..];
            let _ = pack::decode_footer(footer, pack_bytes.len() as u64);
        }
        return;
    };
    assert!(!entries.is_empty());
    // Round trip: the blobs as they are, trailer and footer re-encoded.
    let blobs_end =
        (entries.last().unwrap().offset + entries.last().unwrap().stored_length as u64) as usize;
    let mut again = pack_bytes[..blobs_end].to_vec();
    // Trailer format 0, or 1 with its pack id.
    let trailer = &pack_bytes[blobs_end..pack_bytes.len() - pack::FOOTER_LEN];
    match pack::pack_id(trailer) {
        None => again.extend_from_slice(&pack::encode_trailer(&entries)),
        Some(id) => {
            again.extend_from_slice(&pack::encode_trailer_named(&entries, id));
            // A tail-named pack's name is the hash of what follows the blobs.
            let tail = cbtvault::format::ObjectName::of(&pack_bytes[blobs_end..]);
            assert_eq!(name.as_ref().ok(), Some(&tail));
        }
    }
    assert_eq!(again, pack_bytes, "trailer encoding is canonical");
    let decoded = pack::decode_pack_index(&again, max_block_size).expect("re-encoded pack decodes");
    assert_eq!(decoded, entries);
});
