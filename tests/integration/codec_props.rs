//! Property tests for every codec in `src/format/`: what is encoded decodes
//! to the same value, and no input, however malformed, makes a decoder
//! panic. Case counts stay modest so the suite is fast; `fuzz/` goes deeper.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use proptest::prelude::*;

use cbtvault::format::lock::{self, LockInfo};
use cbtvault::format::pack::{self, TrailerEntry};
use cbtvault::format::snapshot::{self, BlockRef, ReadMode, SnapshotMeta, SnapshotObject};
use cbtvault::format::{bitmap, config, BlockId, SnapshotId};

use crate::vectors;

fn cases() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

// ---------------------------------------------------------------- strategies

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // 1970 .. 2100, with nanoseconds: RFC 3339 keeps them all.
    (0i64..4_102_444_800, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
}

/// Short text including quotes, backslashes, control and non-ASCII
/// characters, which JSON must escape.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.:/-]{0,24}",
        ".{0,12}",
        "[\"\\\\\u{0}-\u{1f}\u{7f}é✓\u{1F600}]{0,8}",
    ]
}

fn snapshot_id() -> impl Strategy<Value = SnapshotId> {
    any::<[u8; 16]>().prop_map(SnapshotId)
}

fn block_ref() -> impl Strategy<Value = BlockRef> {
    prop_oneof![
        1 => Just(BlockRef::Zero),
        3 => any::<[u8; 32]>().prop_map(|b| BlockRef::Data(BlockId(b))),
    ]
}

fn meta_with(disk_size_bytes: u64, block_size: u32) -> impl Strategy<Value = SnapshotMeta> {
    (
        (snapshot_id(), any::<u32>(), time(), text(), text()),
        (
            proptest::option::of(snapshot_id()),
            snapshot_id(),
            proptest::collection::vec(text(), 0..3),
            proptest::collection::btree_map(text(), text(), 0..3),
            prop_oneof![Just(ReadMode::ChangedBlocks), Just(ReadMode::All)],
            proptest::option::of(text()),
        ),
    )
        .prop_map(
            move |(
                (id, generation, time, hostname, source),
                (parent, backup_set, tags, landmark, read_mode, new_set_reason),
            )| SnapshotMeta {
                id,
                generation,
                time,
                hostname,
                source,
                disk_size_bytes,
                block_size,
                parent,
                backup_set,
                tags,
                landmark,
                read_mode,
                new_set_reason,
            },
        )
}

/// A valid snapshot object: sorted entries below block_count, and a bitmap
/// of the right length with clear padding when there is one.
fn snapshot_object() -> impl Strategy<Value = SnapshotObject> {
    let geometry = (9u32..=24).prop_flat_map(|shift| {
        let block_size = 1u32 << shift;
        let disk = prop_oneof![
            3 => 0u64..=(block_size as u64 * 600),
            1 => any::<u64>(),
        ];
        (disk, Just(block_size))
    });
    geometry.prop_flat_map(|(disk_size_bytes, block_size)| {
        let blocks = snapshot::block_count(disk_size_bytes, block_size);
        let entries = if blocks == 0 {
            Just(BTreeMap::new()).boxed()
        } else {
            proptest::collection::btree_map(0..blocks, block_ref(), 0..24).boxed()
        };
        let bitmap = if blocks == 0 || blocks > 4800 {
            Just(None).boxed()
        } else {
            proptest::option::of(proptest::collection::btree_set(0..blocks, 0..32))
                .prop_map(move |set| {
                    set.map(|set| {
                        let mut b = vec![0u8; bitmap::len_for(blocks) as usize];
                        for i in set {
                            bitmap::set(&mut b, i);
                        }
                        b
                    })
                })
                .boxed()
        };
        (meta_with(disk_size_bytes, block_size), entries, bitmap).prop_map(
            |(meta, entries, bitmap)| SnapshotObject {
                meta,
                entries: entries.into_iter().collect(),
                bitmap,
            },
        )
    })
}

/// Trailer entries that tile the blob area from offset 16, and the pack
/// length that makes them valid.
fn tiled_entries(max_stored: u32) -> impl Strategy<Value = (Vec<TrailerEntry>, u64)> {
    let entry = (any::<[u8; 32]>(), 1u32..=65536).prop_flat_map(move |(id, raw)| {
        let stored = 1..=pack::max_stored_length(raw).min(max_stored);
        (Just(id), stored, Just(raw))
    });
    proptest::collection::vec(entry, 1..24).prop_map(|list| {
        let mut offset = pack::HEADER_LEN as u64;
        let entries: Vec<TrailerEntry> = list
            .into_iter()
            .map(|(id, stored_length, raw_length)| {
                let e = TrailerEntry {
                    block_id: BlockId(id),
                    offset,
                    stored_length,
                    raw_length,
                };
                offset += stored_length as u64;
                e
            })
            .collect();
        let pack_len = offset
            + (pack::TRAILER_FIXED_LEN + entries.len() * pack::ENTRY_LEN + pack::FOOTER_LEN) as u64;
        (entries, pack_len)
    })
}

fn repo_config() -> impl Strategy<Value = config::RepoConfig> {
    (
        any::<[u8; 32]>(),
        time(),
        9u32..=24,
        1i32..=22,
        any::<u64>(),
    )
        .prop_map(|(id, created, shift, level, target)| config::RepoConfig {
            version: 1,
            id: hex::encode(id),
            created,
            block_size: 1 << shift,
            hash: "blake3".into(),
            compression: "zstd".into(),
            compression_level: level,
            pack_size_target_bytes: target,
        })
}

/// A valid vector with a few bytes overwritten.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    proptest::collection::vec((0..len, any::<u8>()), 1..4).prop_map(move |edits| {
        let mut b = base.clone();
        for (at, v) in edits {
            b[at] = v;
        }
        b
    })
}

// ---------------------------------------------------------------- round trips

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn pack_trailer_round_trips((entries, pack_len) in tiled_entries(u32::MAX)) {
        let encoded = pack::encode_trailer(&entries);
        let (trailer, footer) = encoded.split_at(encoded.len() - pack::FOOTER_LEN);
        let trailer_len = pack::decode_footer(footer, pack_len).unwrap();
        prop_assert_eq!(trailer_len as usize, trailer.len());
        prop_assert_eq!(pack::decode_trailer(trailer, pack_len, 65536).unwrap(), entries.clone());
        // Any other pack length breaks the tiling.
        prop_assert!(pack::decode_trailer(trailer, pack_len + 1, 65536).is_err());
        prop_assert!(pack::decode_trailer(trailer, pack_len - 1, 65536).is_err());
    }

    #[test]
    fn whole_pack_round_trips(
        (entries, pack_len) in tiled_entries(2048),
        fill in any::<u8>(),
    ) {
        let mut p = pack::encode_header().to_vec();
        let blobs_len = pack_len as usize - pack::HEADER_LEN
            - pack::TRAILER_FIXED_LEN - entries.len() * pack::ENTRY_LEN - pack::FOOTER_LEN;
        p.resize(pack::HEADER_LEN + blobs_len, fill);
        p.extend_from_slice(&pack::encode_trailer(&entries));
        prop_assert_eq!(p.len() as u64, pack_len);
        prop_assert_eq!(pack::decode_pack_index(&p, 65536).unwrap(), entries);
    }

    #[test]
    fn pack_trailer_with_a_shifted_offset_is_rejected(
        (mut entries, pack_len) in tiled_entries(4096),
        pick in any::<prop::sample::Index>(),
        shift in prop_oneof![-16i64..0, 1i64..=16],
    ) {
        let i = pick.index(entries.len());
        entries[i].offset = entries[i].offset.wrapping_add_signed(shift);
        let encoded = pack::encode_trailer(&entries);
        let trailer = &encoded[..encoded.len() - pack::FOOTER_LEN];
        prop_assert!(pack::decode_trailer(trailer, pack_len, 65536).is_err());
    }

    #[test]
    fn snapshot_round_trips(obj in snapshot_object()) {
        let bytes = snapshot::encode(&obj).unwrap();
        let decoded = snapshot::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded, &obj);
        prop_assert_eq!(snapshot::decode_meta(&bytes).unwrap(), obj.meta);
        // Encoding is deterministic, so a decoded object re-encodes to its bytes.
        prop_assert_eq!(snapshot::encode(&decoded).unwrap(), bytes);
    }

    #[test]
    fn snapshot_with_unsorted_entries_is_refused(
        mut obj in snapshot_object(),
        pick in any::<prop::sample::Index>(),
    ) {
        prop_assume!(obj.entries.len() >= 2);
        let i = pick.index(obj.entries.len() - 1);
        obj.entries.swap(i, i + 1);
        prop_assert!(snapshot::encode(&obj).is_err());
    }

    #[test]
    fn bitmap_round_trips_and_agrees_with_itself(
        (blocks, set) in (0u64..2000).prop_flat_map(|blocks| {
            let set = if blocks == 0 {
                Just(BTreeSet::new()).boxed()
            } else {
                proptest::collection::btree_set(0..blocks, 0..64).boxed()
            };
            (Just(blocks), set)
        })
    ) {
        let mut b = vec![0u8; bitmap::len_for(blocks) as usize];
        for &i in &set {
            bitmap::set(&mut b, i);
        }
        prop_assert!(bitmap::validate(&b, blocks).is_ok());
        prop_assert_eq!(bitmap::iter_set(&b).collect::<BTreeSet<_>>(), set.clone());
        prop_assert_eq!(bitmap::count(&b), set.len() as u64);
        for i in 0..blocks + 16 {
            prop_assert_eq!(bitmap::is_set(&b, i), set.contains(&i), "block {}", i);
        }
        let text = bitmap::encode_base64(&b);
        prop_assert_eq!(bitmap::decode_base64(&text, blocks).unwrap(), b.clone());
        // Any other block count needing a different length is refused.
        if bitmap::len_for(blocks + 8) != b.len() as u64 {
            prop_assert!(bitmap::decode_base64(&text, blocks + 8).is_err());
        }
    }

    #[test]
    fn bitmap_padding_bits_are_refused(blocks in 1u64..2000, bit in 0u64..8) {
        prop_assume!(blocks % 8 != 0);
        let padding_bit = blocks + bit % (8 - blocks % 8);
        let mut b = vec![0u8; bitmap::len_for(blocks) as usize];
        bitmap::set(&mut b, padding_bit);
        prop_assert!(bitmap::validate(&b, blocks).is_err());
        prop_assert!(bitmap::decode_base64(&bitmap::encode_base64(&b), blocks).is_err());
    }

    #[test]
    fn config_round_trips(c in repo_config()) {
        let bytes = config::encode(&c);
        prop_assert_eq!(config::decode(&bytes).unwrap(), c);
    }

    #[test]
    fn lock_round_trips(
        exclusive in any::<bool>(),
        hostname in text(),
        pid in any::<u32>(),
        time in time(),
        command in text(),
    ) {
        let l = LockInfo { exclusive, hostname, pid, time, command };
        prop_assert_eq!(lock::decode(&lock::encode(&l)).unwrap(), l);
    }
}

// ---------------------------------------------------------------- never panic

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn arbitrary_bytes_never_panic_pack_decoders(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        pack_len in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        max_block_size in any::<u32>(),
    ) {
        let _ = pack::decode_pack_index(&bytes, max_block_size);
        let _ = pack::decode_header(&bytes);
        let len = pack_len.unwrap_or(bytes.len() as u64);
        let _ = pack::decode_footer(&bytes, len);
        if bytes.len() >= pack::FOOTER_LEN {
            let _ = pack::decode_footer(&bytes[bytes.len() - pack::FOOTER_LEN..], len);
        }
        let _ = pack::decode_trailer(&bytes, len, max_block_size);
    }

    #[test]
    fn mutated_packs_never_panic(bytes in mutated(vectors::parse_hex(vectors::PACK_HEX))) {
        if let Ok(entries) = pack::decode_pack_index(&bytes, 65536) {
            // Whatever decodes lies inside the pack.
            for e in entries {
                prop_assert!(e.offset + e.stored_length as u64 <= bytes.len() as u64);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_snapshot_decoders(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let _ = snapshot::decode(&bytes);
        let _ = snapshot::decode_meta(&bytes);
    }

    #[test]
    fn snapshot_framing_with_arbitrary_contents_never_panics(
        meta in proptest::collection::vec(any::<u8>(), 0..64),
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = snapshot::MAGIC.to_vec();
        bytes.extend_from_slice(&snapshot::VERSION.to_le_bytes());
        bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&meta);
        bytes.extend_from_slice(&rest);
        let _ = snapshot::decode(&bytes);
    }

    #[test]
    fn mutated_snapshots_never_panic(
        bytes in prop_oneof![
            mutated(vectors::parse_hex(vectors::SNAPSHOT_FULL_HEX)),
            mutated(vectors::parse_hex(vectors::SNAPSHOT_DELTA_HEX)),
        ]
    ) {
        if let Ok(obj) = snapshot::decode(&bytes) {
            // What decodes re-encodes to something that decodes the same.
            let again = snapshot::encode(&obj).unwrap();
            prop_assert_eq!(snapshot::decode(&again).unwrap(), obj);
        }
    }

    #[test]
    fn arbitrary_text_never_panics_bitmap_decoder(text in ".{0,64}", blocks in any::<u64>()) {
        let _ = bitmap::decode_base64(&text, blocks);
        let _ = bitmap::decode_base64(&text, blocks % 512);
    }

    #[test]
    fn arbitrary_base64_never_panics_bitmap_decoder(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        blocks in 0u64..600,
    ) {
        let text = bitmap::encode_base64(&bytes);
        match bitmap::decode_base64(&text, blocks) {
            Ok(b) => prop_assert_eq!(b, bytes),
            Err(_) => prop_assert!(bitmap::validate(&bytes, blocks).is_err()),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_config_and_lock(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            mutated(vectors::CONFIG_JSON.as_bytes().to_vec()),
        ],
    ) {
        if let Ok(c) = config::decode(&bytes) {
            prop_assert_eq!(config::decode(&config::encode(&c)).unwrap(), c);
        }
        let _ = lock::decode(&bytes);
    }
}

// ---------------------------------------------------------------- encryption
// (format-spec/09-encryption.md): sealed objects open to what was sealed,
// only under their own binding, and a changed byte never opens.

fn sealed_codec() -> cbtvault::crypto::Codec {
    use cbtvault::crypto::{Keys, MasterSecret};
    cbtvault::crypto::Codec::Sealed(std::sync::Arc::new(Keys::derive(&MasterSecret([9; 32]))))
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn sealed_snapshots_round_trip_and_any_flip_is_refused(
        obj in snapshot_object(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        use cbtvault::crypto::Bound;
        let codec = sealed_codec();
        let plain = snapshot::encode(&obj).unwrap();
        let sealed = codec.seal_object(Bound::Snapshot, plain.clone()).unwrap();
        prop_assert_eq!(sealed.len(), plain.len() + 48);
        let back = codec.open_object(Bound::Snapshot, &sealed).unwrap();
        prop_assert_eq!(snapshot::decode(&back).unwrap(), obj);
        prop_assert!(codec.open_object(Bound::Index, &sealed).is_err());
        let mut bad = sealed.clone();
        let i = flip.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(codec.open_object(Bound::Snapshot, &bad).is_err());
        prop_assert!(codec.open_object(Bound::Snapshot, &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn sealed_blobs_open_only_as_their_own_block(
        frame in prop::collection::vec(any::<u8>(), 0..4096),
        a in any::<[u8; 32]>(),
        b in any::<[u8; 32]>(),
    ) {
        use cbtvault::crypto::codec::Expected;
        let codec = sealed_codec();
        let mut buf = vec![0u8; cbtvault::crypto::NONCE_LEN];
        buf.extend_from_slice(&frame);
        codec.seal_blob(BlockId(a), &mut buf, 0, Expected::Frame(&frame)).unwrap();
        prop_assert_eq!(&*codec.open_blob(BlockId(a), &buf).unwrap(), &frame[..]);
        if a != b {
            prop_assert!(codec.open_blob(BlockId(b), &buf).is_err());
        }
    }

    #[test]
    fn key_objects_never_panic_and_round_trip(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        use cbtvault::format::key;
        if let Ok(k) = key::decode(&bytes) {
            prop_assert_eq!(key::decode(&key::encode(&k)).unwrap(), k);
        }
    }
}

// ------------------------------------------------ datastore Range answers

proptest! {
    #![proptest_config(cases())]

    /// A host's answer to a direct Range read (head, then body), however
    /// malformed, is an error or exactly the bytes asked for.
    #[test]
    fn range_answers_never_panic_nor_overfill(
        head in prop_oneof![
            Just("HTTP/1.1 206 Partial Content\r\nContent-Length: 7".to_string()),
            Just("HTTP/1.1 206 X\r\nTransfer-Encoding: chunked".to_string()),
            "HTTP/1\\.[01] [0-9]{3} [ -~]{0,10}(\r\n[A-Za-z-]{1,12}: [ -~]{0,16}){0,4}",
            ".{0,40}",
        ],
        body in proptest::collection::vec(any::<u8>(), 0..64),
        chunks in proptest::collection::vec((1usize..6, any::<bool>()), 0..4),
    ) {
        use cbtvault::source::vmware::range_get::{parse_head, read_body};
        let Ok(h) = parse_head(head.as_bytes()) else { return Ok(()); };
        // A well-framed chunked body now and then, from the random bytes.
        let mut framed = Vec::new();
        if h.chunked && !chunks.is_empty() {
            let mut at = 0;
            for (n, _) in &chunks {
                let piece: Vec<u8> = body.iter().skip(at).take(*n).copied().collect();
                at += n;
                framed.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                framed.extend_from_slice(&piece);
                framed.extend_from_slice(b"\r\n");
            }
            framed.extend_from_slice(b"0\r\n\r\n");
        } else {
            framed = body.clone();
        }
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        let mut bufs: Vec<&mut [u8]> = vec![&mut a, &mut b];
        let ok = read_body(&mut std::io::Cursor::new(&framed), h.chunked, &mut bufs).is_ok();
        if ok && !h.chunked {
            prop_assert_eq!(&[&a[..], &b[..]].concat()[..], &framed[..7]);
        }
    }
}
