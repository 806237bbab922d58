//! Decodes the annotated objects in `format-spec/test-vectors/`, checks every
//! field against the values the vectors' README states, re-encodes them byte
//! for byte, and checks that damaged copies are rejected with the right
//! error. The vectors are the spec's examples; if a test here fails, either
//! the code or the spec is wrong.

use std::collections::BTreeMap;

use cbtvault::format::pack::{self, TrailerEntry};
use cbtvault::format::page::{self, Page};
use cbtvault::format::snapshot::{
    self, BlockRef, PageRow, ReadMode, SnapshotObject, StoredSnapshot,
};
use cbtvault::format::{bitmap, config, BlockId, FormatError, SnapshotId};

pub(crate) const PACK_HEX: &str =
    include_str!("../../format-spec/test-vectors/pack-two-blocks.hex");
pub(crate) const SNAPSHOT_FULL_HEX: &str =
    include_str!("../../format-spec/test-vectors/snapshot-full.hex");
pub(crate) const SNAPSHOT_DELTA_HEX: &str =
    include_str!("../../format-spec/test-vectors/snapshot-delta.hex");
pub(crate) const SNAPSHOT_PAGED_HEX: &str =
    include_str!("../../format-spec/test-vectors/snapshot-paged.hex");
pub(crate) const PAGE_DELTA_HEX: &str =
    include_str!("../../format-spec/test-vectors/page-delta.hex");
pub(crate) const BITMAP_XEN_TXT: &str =
    include_str!("../../format-spec/test-vectors/bitmap-xen.txt");
pub(crate) const RAW_FRAME_HEX: &str = include_str!("../../format-spec/test-vectors/raw-frame.hex");
pub(crate) const PACK_TAIL_HEX: &str =
    include_str!("../../format-spec/test-vectors/pack-tail-named.hex");
pub(crate) const CONFIG_JSON: &str = include_str!("../../format-spec/test-vectors/config.json");

const BLOCK_SIZE: u32 = 65536;
const PACK_NAME: &str = "e51a00737837b775064cff4cb7bb4ddf414e8b5bbf12da575fa86e7c0f795a43";
const PACK_TAIL_NAME: &str = "acdcfb213980d83c8001c3c07cee76352e7cef3f24d8cbaa1901b61dd37123aa";
const PACK_TAIL_ID: [u8; 16] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];
const FULL_NAME: &str = "5c4b58fcc931419ac79edf5faa86dd45b185437551ffabd16ef949a1a17b390d";
const DELTA_NAME: &str = "54966580097761144e290da410ba412244e25a20b4b8eba0ad02894f2e5fd450";
const PAGED_NAME: &str = "06dee157ed4eada79756bbd2c3984118362bc277aaab2ce437543650c2a41ef3";
const PAGE_NAME: &str = "aed2d2704327ae35b601cb7b8a2569fe2ae488cc6ee3c7de78622f49a0f10c56";
const BLOCK_A_ID: &str = "9e7e2312ee1bbd641438c1a39226faa78a69507009b6cee3fdca413eecc1cfe0";
const BLOCK_B_ID: &str = "139b2cb243b54e040137449cfa605a6a20d3e51e8e3d0433ab0506fe6647d5c0";
const FULL_ID: &str = "5f1e9a3c7b2d4e6f8091a2b3c4d5e6f7";
const DELTA_ID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
const SOURCE: &str = "xenserver:xs1.example.org/vdi/6c0fa1e2-5b5d-4f43-9c3a-2f4f9d1b7e10";

/// Parses the `.hex` vector format: `#` starts a comment to end of line,
/// the rest is hex byte pairs, whitespace ignored.
pub(crate) fn parse_hex(text: &str) -> Vec<u8> {
    let mut digits = String::new();
    for line in text.lines() {
        let data = line.split('#').next().unwrap_or("");
        digits.extend(data.chars().filter(|c| !c.is_whitespace()));
    }
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in a vector"
    );
    hex::decode(&digits).expect("vector holds only hex digits outside comments")
}

/// The one non-comment line of a base64 vector.
fn parse_base64_txt(text: &str) -> &str {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.len(), 1, "bitmap vector has exactly one data line");
    lines[0]
}

fn block_a() -> Vec<u8> {
    vec![0x61; 100]
}

fn block_b() -> Vec<u8> {
    (0..3392u32).map(|i| (i % 251) as u8).collect()
}

fn block_id(hex: &str) -> BlockId {
    hex.parse().unwrap()
}

fn snapshot_id(hex: &str) -> SnapshotId {
    hex.parse().unwrap()
}

fn expected_entries() -> Vec<TrailerEntry> {
    vec![
        TrailerEntry {
            block_id: block_id(BLOCK_A_ID),
            offset: 16,
            stored_length: 17,
            raw_length: 100,
        },
        TrailerEntry {
            block_id: block_id(BLOCK_B_ID),
            offset: 33,
            stored_length: 271,
            raw_length: 3392,
        },
    ]
}

/// What a reader does with a blob: decompress into at most `raw_length`
/// bytes, check length and BLAKE3. Returns the raw bytes or why not.
fn read_blob(pack_bytes: &[u8], e: &TrailerEntry) -> Result<Vec<u8>, String> {
    let start = e.offset as usize;
    let blob = &pack_bytes[start..start + e.stored_length as usize];
    let raw = zstd::bulk::decompress(blob, e.raw_length as usize)
        .map_err(|err| format!("decompress: {err}"))?;
    if raw.len() != e.raw_length as usize {
        return Err(format!("{} bytes, want {}", raw.len(), e.raw_length));
    }
    if BlockId::of(&raw) != e.block_id {
        return Err("hash mismatch".into());
    }
    Ok(raw)
}

/// The reason of an `Invalid` error about `what`; panics on anything else.
fn invalid_reason<T: std::fmt::Debug>(r: Result<T, FormatError>, what: &str) -> String {
    match r {
        Err(FormatError::Invalid { what: w, reason }) if w == what => reason,
        other => panic!("expected Invalid {{ what: {what:?}, .. }}, got {other:?}"),
    }
}

fn with_byte<F: FnOnce(&mut u8)>(bytes: &[u8], at: usize, f: F) -> Vec<u8> {
    let mut v = bytes.to_vec();
    f(&mut v[at]);
    v
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------- pack

fn pack_bytes() -> Vec<u8> {
    parse_hex(PACK_HEX)
}

/// The pack with its trailer replaced by `body` plus a correct hash, so a
/// test reaches the rules behind the checksum.
fn pack_with_trailer_body(p: &[u8], body: &[u8]) -> Vec<u8> {
    let trailer_start = p.len() - pack::FOOTER_LEN - 136;
    let mut out = p[..trailer_start].to_vec();
    out.extend_from_slice(body);
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out.extend_from_slice(&pack::FOOTER_MAGIC);
    out.extend_from_slice(&((body.len() + 32) as u32).to_le_bytes());
    out
}

fn trailer_body(p: &[u8]) -> Vec<u8> {
    let trailer_start = p.len() - pack::FOOTER_LEN - 136;
    p[trailer_start..trailer_start + 104].to_vec()
}

#[test]
fn pack_vector_decodes_to_the_documented_entries() {
    let p = pack_bytes();
    assert_eq!(p.len(), 452);
    assert_eq!(blake3::hash(&p).to_hex().as_str(), PACK_NAME);
    pack::decode_header(&p[..pack::HEADER_LEN]).unwrap();
    let entries = pack::decode_pack_index(&p, BLOCK_SIZE).unwrap();
    assert_eq!(entries, expected_entries());
}

#[test]
fn pack_vector_blobs_decompress_to_their_block_ids() {
    let p = pack_bytes();
    let entries = pack::decode_pack_index(&p, BLOCK_SIZE).unwrap();
    let raw: Vec<Vec<u8>> = entries.iter().map(|e| read_blob(&p, e).unwrap()).collect();
    assert_eq!(raw, vec![block_a(), block_b()]);
    for (e, r) in entries.iter().zip(&raw) {
        assert_eq!(e.raw_length as usize, r.len());
        assert_eq!(BlockId::of(r), e.block_id);
        // Every blob is one zstd frame starting with the zstd magic.
        let start = e.offset as usize;
        assert_eq!(&p[start..start + 4], &[0x28, 0xb5, 0x2f, 0xfd]);
    }
}

#[test]
fn pack_vector_lists_from_its_end_with_two_reads() {
    let p = pack_bytes();
    let len = p.len() as u64;
    let footer = &p[p.len() - pack::FOOTER_LEN..];
    let trailer_len = pack::decode_footer(footer, len).unwrap() as usize;
    assert_eq!(trailer_len, 136);
    let end = p.len() - pack::FOOTER_LEN;
    let entries = pack::decode_trailer(&p[end - trailer_len..end], len, BLOCK_SIZE).unwrap();
    assert_eq!(entries, expected_entries());
}

#[test]
fn pack_vector_reencodes_byte_for_byte() {
    let p = pack_bytes();
    let entries = pack::decode_pack_index(&p, BLOCK_SIZE).unwrap();
    let mut out = pack::encode_header().to_vec();
    for e in &entries {
        out.extend_from_slice(&p[e.offset as usize..(e.offset + e.stored_length as u64) as usize]);
    }
    out.extend_from_slice(&pack::encode_trailer(&entries));
    assert_eq!(out, p);
}

// ------------------------------------------------ pack, trailer format 1

#[test]
fn tail_named_pack_vector_decodes_names_and_reencodes() {
    let p = parse_hex(PACK_TAIL_HEX);
    assert_eq!(p.len(), 468);
    // Header and blobs are those of the format 0 vector.
    assert_eq!(p[..304], pack_bytes()[..304]);
    let entries = pack::decode_pack_index(&p, BLOCK_SIZE).unwrap();
    assert_eq!(entries, expected_entries());
    // Listed from its end with two reads, as a reader lists any pack.
    let footer_at = p.len() - pack::FOOTER_LEN;
    let t = pack::decode_footer(&p[footer_at..], p.len() as u64).unwrap() as usize;
    assert_eq!(t, 152);
    let trailer = &p[footer_at - t..footer_at];
    assert_eq!(
        pack::decode_trailer(trailer, p.len() as u64, BLOCK_SIZE).unwrap(),
        expected_entries()
    );
    assert_eq!(pack::naming(trailer), pack::Naming::Tail);
    assert_eq!(pack::pack_id(trailer), Some(PACK_TAIL_ID));
    // The name is the BLAKE3 of trailer and footer, not of the file.
    let tail = &p[footer_at - t..];
    assert_eq!(blake3::hash(tail).to_hex().as_str(), PACK_TAIL_NAME);
    assert_ne!(blake3::hash(&p).to_hex().as_str(), PACK_TAIL_NAME);
    let named = |bytes: &[u8]| {
        pack::name_of_pack(bytes, pack::Framing::PLAIN, |t| {
            Ok(std::borrow::Cow::Borrowed(t))
        })
    };
    assert_eq!(named(&p).unwrap().to_hex(), PACK_TAIL_NAME);
    // The format 0 vector is still named by its whole file.
    let old = pack_bytes();
    assert_eq!(named(&old).unwrap().to_hex(), PACK_NAME);
    assert_eq!(pack::naming(&trailer_body(&old)), pack::Naming::WholeFile);
    assert_eq!(pack::pack_id(&trailer_body(&old)), None);
    // Byte for byte from the entries and the pack id.
    let mut out = pack::encode_header().to_vec();
    out.extend_from_slice(&p[16..304]);
    out.extend_from_slice(&pack::encode_trailer_named(&entries, PACK_TAIL_ID));
    assert_eq!(out, p);
}

#[test]
fn tail_named_pack_vector_damage_is_caught() {
    let p = parse_hex(PACK_TAIL_HEX);
    let footer_at = p.len() - pack::FOOTER_LEN;
    let trailer_at = footer_at - 152;
    let named = |bytes: &[u8]| {
        pack::name_of_pack(bytes, pack::Framing::PLAIN, |t| {
            Ok(std::borrow::Cow::Borrowed(t))
        })
    };
    // A flipped pack id byte: the trailer hash no longer matches, and
    // the name would change with it.
    let flipped = with_byte(&p, trailer_at + 8, |b| *b ^= 1);
    let r = invalid_reason(
        pack::decode_pack_index(&flipped, BLOCK_SIZE),
        "pack trailer",
    );
    assert!(r.contains("checksum mismatch"), "{r}");
    assert_ne!(named(&flipped).unwrap().to_hex(), PACK_TAIL_NAME);
    // Another pack id with a recomputed trailer hash: a valid pack under
    // another name (pack ids make names unique).
    let mut body = p[trailer_at..footer_at - 32].to_vec();
    body[8] ^= 1;
    let mut other = p[..trailer_at].to_vec();
    other.extend_from_slice(&body);
    other.extend_from_slice(blake3::hash(&body).as_bytes());
    other.extend_from_slice(&p[footer_at..]);
    assert_eq!(
        pack::decode_pack_index(&other, BLOCK_SIZE).unwrap(),
        expected_entries()
    );
    assert_ne!(named(&other).unwrap().to_hex(), PACK_TAIL_NAME);
    // A blob byte changed: the name (of the tail) is unchanged; the blob
    // fails its own check on read.
    let blob = with_byte(&p, 0x30, |b| *b ^= 0x40);
    assert_eq!(named(&blob).unwrap().to_hex(), PACK_TAIL_NAME);
    let e = pack::decode_pack_index(&blob, BLOCK_SIZE).unwrap();
    assert!(read_blob(&blob, &e[1]).is_err());
    assert!(read_blob(&blob, &e[0]).is_ok());
    // An unknown trailer format is named nothing.
    let mut bad = body.clone();
    bad[4] = 2;
    let mut unknown = p[..trailer_at].to_vec();
    unknown.extend_from_slice(&bad);
    unknown.extend_from_slice(blake3::hash(&bad).as_bytes());
    unknown.extend_from_slice(&p[footer_at..]);
    let r = invalid_reason(named(&unknown), "pack trailer");
    assert!(r.contains("unsupported trailer format 2"), "{r}");
    let r = invalid_reason(
        pack::decode_pack_index(&unknown, BLOCK_SIZE),
        "pack trailer",
    );
    assert!(r.contains("unsupported trailer format 2"), "{r}");
}

#[test]
fn pack_header_damage_is_rejected() {
    let p = pack_bytes();
    let e = pack::decode_pack_index(&with_byte(&p, 0, |b| *b ^= 0x20), BLOCK_SIZE);
    assert_eq!(
        e,
        Err(FormatError::BadMagic {
            what: "pack header"
        })
    );
    let e = pack::decode_pack_index(&with_byte(&p, 8, |b| *b = 2), BLOCK_SIZE);
    assert_eq!(
        e,
        Err(FormatError::UnsupportedVersion {
            what: "pack header",
            version: 2
        })
    );
    let r = invalid_reason(
        pack::decode_pack_index(&with_byte(&p, 12, |b| *b = 1), BLOCK_SIZE),
        "pack header",
    );
    assert!(r.contains("reserved"), "{r}");
}

#[test]
fn pack_footer_damage_is_rejected() {
    let p = pack_bytes();
    let footer_at = p.len() - pack::FOOTER_LEN;
    let e = pack::decode_pack_index(&with_byte(&p, footer_at + 3, |b| *b ^= 1), BLOCK_SIZE);
    assert_eq!(
        e,
        Err(FormatError::BadMagic {
            what: "pack footer"
        })
    );
    // Shorter than one entry.
    let mut short = p.clone();
    put_u32(&mut short, footer_at + 8, 87);
    let r = invalid_reason(pack::decode_pack_index(&short, BLOCK_SIZE), "pack footer");
    assert!(r.contains("trailer length 87 impossible"), "{r}");
    // Longer than the pack.
    let mut long = p.clone();
    put_u32(&mut long, footer_at + 8, 425);
    invalid_reason(pack::decode_pack_index(&long, BLOCK_SIZE), "pack footer");
    // Longer than the largest trailer, checked before any allocation.
    let mut huge = p[footer_at..].to_vec();
    put_u32(&mut huge, 8, u32::MAX);
    invalid_reason(pack::decode_footer(&huge, u64::MAX), "pack footer");
    // Plausible but wrong: the trailer no longer hashes.
    let mut off = p.clone();
    put_u32(&mut off, footer_at + 8, 137);
    let r = invalid_reason(pack::decode_pack_index(&off, BLOCK_SIZE), "pack trailer");
    assert!(r.contains("checksum"), "{r}");
    // A footer of the wrong size.
    assert!(matches!(
        pack::decode_footer(&p[footer_at..p.len() - 1], p.len() as u64),
        Err(FormatError::Truncated {
            what: "pack footer",
            ..
        })
    ));
}

#[test]
fn pack_trailer_damage_fails_the_checksum() {
    let p = pack_bytes();
    let trailer_start = p.len() - pack::FOOTER_LEN - 136;
    for at in trailer_start..p.len() - pack::FOOTER_LEN {
        let r = invalid_reason(
            pack::decode_pack_index(&with_byte(&p, at, |b| *b ^= 0x01), BLOCK_SIZE),
            "pack trailer",
        );
        assert!(r.contains("checksum mismatch"), "byte {at}: {r}");
    }
}

#[test]
fn pack_trailer_rules_behind_the_checksum() {
    let p = pack_bytes();
    let body = trailer_body(&p);
    let check = |body: &[u8], want: &str| {
        let r = invalid_reason(
            pack::decode_pack_index(&pack_with_trailer_body(&p, body), BLOCK_SIZE),
            "pack trailer",
        );
        assert!(r.contains(want), "want '{want}', got '{r}'");
    };
    // Unchanged body with a recomputed hash still decodes.
    assert_eq!(
        pack::decode_pack_index(&pack_with_trailer_body(&p, &body), BLOCK_SIZE).unwrap(),
        expected_entries()
    );
    let mut b = body.clone();
    put_u32(&mut b, 0, 0);
    check(&b, "entry count 0 out of range");
    let mut b = body.clone();
    put_u32(&mut b, 0, pack::MAX_ENTRIES + 1);
    check(&b, "out of range");
    let mut b = body.clone();
    put_u32(&mut b, 0, 3);
    check(&b, "3 entries need 144 bytes");
    let mut b = body.clone();
    put_u32(&mut b, 4, 7);
    check(&b, "unsupported trailer format 7");
    // Format 1 needs its 16-byte pack id: the same entries no longer fit.
    let mut b = body.clone();
    put_u32(&mut b, 4, 1);
    check(&b, "2 entries need 96 bytes, have 80");
    // Entry 0: offset not 16.
    let mut b = body.clone();
    put_u64(&mut b, 8 + 32, 17);
    check(&b, "entry 0: offset 17 where 16 was expected");
    // Entry 1: a gap after blob 0.
    let mut b = body.clone();
    put_u64(&mut b, 8 + 48 + 32, 34);
    check(&b, "entry 1: offset 34 where 33 was expected");
    // raw_length 0 and beyond the block size.
    let mut b = body.clone();
    put_u32(&mut b, 8 + 44, 0);
    check(&b, "entry 0: raw length 0 out of range");
    let mut b = body.clone();
    put_u32(&mut b, 8 + 44, BLOCK_SIZE + 1);
    check(&b, "entry 0: raw length 65537 out of range");
    // stored_length 0, and beyond raw + raw/64 + 1024.
    let mut b = body.clone();
    put_u32(&mut b, 8 + 40, 0);
    check(&b, "entry 0: stored length 0 out of range");
    let mut b = body.clone();
    put_u32(&mut b, 8 + 48 + 40, pack::max_stored_length(3392) + 1);
    check(&b, "entry 1: stored length");
    // Blobs that do not reach the trailer.
    let mut b = body.clone();
    put_u32(&mut b, 8 + 48 + 40, 270);
    check(&b, "blobs end at 303 but the trailer starts at 304");
    // A smaller max_block_size makes blob 1 too large.
    let r = invalid_reason(pack::decode_pack_index(&p, 2048), "pack trailer");
    assert!(r.contains("entry 1: raw length 3392 out of range"), "{r}");
}

#[test]
fn pack_blob_damage_is_caught_on_read() {
    let p = pack_bytes();
    let entries = pack::decode_pack_index(&p, BLOCK_SIZE).unwrap();
    let mut caught = 0;
    for e in &entries {
        for at in e.offset as usize..(e.offset + e.stored_length as u64) as usize {
            let damaged = with_byte(&p, at, |b| *b ^= 0x01);
            // The trailer does not cover blob bytes: listing still works.
            assert_eq!(
                pack::decode_pack_index(&damaged, BLOCK_SIZE).unwrap(),
                entries
            );
            match read_blob(&damaged, e) {
                Err(_) => caught += 1,
                // A flip that does not change the output is harmless.
                Ok(raw) => assert_eq!(raw, read_blob(&p, e).unwrap(), "byte {at}"),
            }
        }
    }
    assert!(caught > 250, "only {caught} blob flips were detected");
}

#[test]
fn pack_any_single_byte_flip_is_detected_or_harmless() {
    let p = pack_bytes();
    let good = expected_entries();
    for at in 0..p.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let damaged = with_byte(&p, at, |b| *b ^= mask);
            let Ok(entries) = pack::decode_pack_index(&damaged, BLOCK_SIZE) else {
                continue;
            };
            assert_eq!(
                entries, good,
                "byte {at} mask {mask:#x} changed the listing"
            );
            for e in &entries {
                if let Ok(raw) = read_blob(&damaged, e) {
                    assert_eq!(raw, read_blob(&p, e).unwrap(), "byte {at} mask {mask:#x}");
                }
            }
        }
    }
}

#[test]
fn pack_truncated_or_extended_is_rejected() {
    let p = pack_bytes();
    for len in 0..p.len() {
        assert!(
            pack::decode_pack_index(&p[..len], BLOCK_SIZE).is_err(),
            "prefix {len}"
        );
        assert!(
            pack::decode_pack_index(&p[len + 1..], BLOCK_SIZE).is_err(),
            "suffix from {}",
            len + 1
        );
    }
    let mut longer = p.clone();
    longer.push(0);
    assert!(pack::decode_pack_index(&longer, BLOCK_SIZE).is_err());
    let mut gap = p[..pack::HEADER_LEN].to_vec();
    gap.push(0);
    gap.extend_from_slice(&p[pack::HEADER_LEN..]);
    let r = invalid_reason(pack::decode_pack_index(&gap, BLOCK_SIZE), "pack trailer");
    assert!(
        r.contains("blobs end at 304 but the trailer starts at 305"),
        "{r}"
    );
}

// ---------------------------------------------------------------- snapshots

fn full_bytes() -> Vec<u8> {
    parse_hex(SNAPSHOT_FULL_HEX)
}

fn delta_bytes() -> Vec<u8> {
    parse_hex(SNAPSHOT_DELTA_HEX)
}

fn check_full(obj: &SnapshotObject) {
    let m = &obj.meta;
    assert_eq!(m.id, snapshot_id(FULL_ID));
    assert_eq!(m.generation, 0);
    assert_eq!(m.time.to_rfc3339(), "2026-11-02T01:00:00+00:00");
    assert_eq!(m.hostname, "backup01");
    assert_eq!(m.source, SOURCE);
    assert_eq!(m.disk_size_bytes, 200_000);
    assert_eq!(m.block_size, BLOCK_SIZE);
    assert_eq!(m.block_count(), 4);
    assert_eq!(m.parent, None);
    assert_eq!(m.backup_set, m.id);
    assert_eq!(m.tags, vec!["nightly".to_string()]);
    assert_eq!(
        m.landmark,
        BTreeMap::from([(
            "vdi_snapshot".to_string(),
            "0f3b2c4d-1a2b-4c3d-8e9f-a0b1c2d3e4f5".to_string()
        )])
    );
    assert_eq!(m.read_mode, ReadMode::All);
    assert_eq!(m.new_set_reason.as_deref(), Some("first backup"));
    assert_eq!(
        obj.entries,
        vec![
            (0, BlockRef::Data(block_id(BLOCK_A_ID))),
            (3, BlockRef::Data(block_id(BLOCK_B_ID)))
        ]
    );
    assert_eq!(obj.bitmap, None);
}

fn check_delta(obj: &SnapshotObject) {
    let m = &obj.meta;
    assert_eq!(m.id, snapshot_id(DELTA_ID));
    assert_eq!(m.generation, 0);
    assert_eq!(m.time.to_rfc3339(), "2026-11-03T01:00:00+00:00");
    assert_eq!(m.hostname, "backup01");
    assert_eq!(m.source, SOURCE);
    assert_eq!(m.disk_size_bytes, 200_000);
    assert_eq!(m.block_size, BLOCK_SIZE);
    assert_eq!(m.parent, Some(snapshot_id(FULL_ID)));
    assert_eq!(m.backup_set, snapshot_id(FULL_ID));
    assert!(m.tags.is_empty());
    assert_eq!(
        m.landmark,
        BTreeMap::from([(
            "vdi_snapshot".to_string(),
            "7c6d5e4f-3a2b-4c1d-9e8f-b0a1c2d3e4f6".to_string()
        )])
    );
    assert_eq!(m.read_mode, ReadMode::ChangedBlocks);
    assert_eq!(m.new_set_reason, None);
    assert_eq!(
        obj.entries,
        vec![
            (0, BlockRef::Zero),
            (2, BlockRef::Data(block_id(BLOCK_A_ID)))
        ]
    );
    assert_eq!(obj.bitmap, Some(vec![0xe0]));
    let changed: Vec<u64> = bitmap::iter_set(obj.bitmap.as_ref().unwrap()).collect();
    assert_eq!(changed, vec![0, 1, 2]);
    // Every entry of a changed-blocks delta has its bit set.
    for (index, _) in &obj.entries {
        assert!(bitmap::is_set(obj.bitmap.as_ref().unwrap(), *index));
    }
}

#[test]
fn snapshot_full_vector_decodes_to_the_documented_fields() {
    let bytes = full_bytes();
    assert_eq!(bytes.len(), 542);
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), FULL_NAME);
    let obj = snapshot::decode(&bytes).unwrap();
    check_full(&obj);
    assert_eq!(snapshot::decode_meta(&bytes).unwrap(), obj.meta);
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 428);
    assert_eq!(snapshot::encode(&obj).unwrap(), bytes);
}

#[test]
fn snapshot_delta_vector_decodes_to_the_documented_fields() {
    let bytes = delta_bytes();
    assert_eq!(bytes.len(), 533);
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), DELTA_NAME);
    let obj = snapshot::decode(&bytes).unwrap();
    check_delta(&obj);
    assert_eq!(snapshot::decode_meta(&bytes).unwrap(), obj.meta);
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 450);
    assert_eq!(snapshot::encode(&obj).unwrap(), bytes);
}

/// Resolves a chain (oldest first) over the pack vector into disk bytes,
/// following format-spec/03-snapshot.md#resolution.
fn resolve(chain: &[SnapshotObject], pack_bytes: &[u8]) -> Vec<u8> {
    let entries = pack::decode_pack_index(pack_bytes, BLOCK_SIZE).unwrap();
    let mut map: Vec<BlockRef> = Vec::new();
    for (i, s) in chain.iter().enumerate() {
        assert_eq!(
            s.meta.parent.is_none(),
            i == 0,
            "chain starts at the full manifest"
        );
        if i > 0 {
            assert_eq!(s.meta.parent, Some(chain[i - 1].meta.id));
        }
        map.resize(s.meta.block_count() as usize, BlockRef::Zero);
        for (index, r) in &s.entries {
            map[*index as usize] = *r;
        }
    }
    let last = chain.last().unwrap();
    let block_size = last.meta.block_size as usize;
    let disk_size = last.meta.disk_size_bytes as usize;
    let mut disk = Vec::with_capacity(disk_size);
    for (i, r) in map.iter().enumerate() {
        let span = block_size.min(disk_size - i * block_size);
        let mut block = match r {
            BlockRef::Zero => Vec::new(),
            BlockRef::Data(id) => {
                let e = entries
                    .iter()
                    .find(|e| e.block_id == *id)
                    .expect("block in the pack");
                read_blob(pack_bytes, e).unwrap()
            }
        };
        block.resize(span, 0);
        disk.extend_from_slice(&block);
    }
    disk
}

#[test]
fn snapshot_vectors_resolve_to_the_documented_disks() {
    let p = pack_bytes();
    let full = snapshot::decode(&full_bytes()).unwrap();
    let delta = snapshot::decode(&delta_bytes()).unwrap();
    let mut want_full = vec![0u8; 200_000];
    want_full[..100].copy_from_slice(&block_a());
    want_full[196_608..].copy_from_slice(&block_b());
    assert_eq!(resolve(std::slice::from_ref(&full), &p), want_full);
    let mut want_delta = vec![0u8; 200_000];
    want_delta[131_072..131_172].copy_from_slice(&block_a());
    want_delta[196_608..].copy_from_slice(&block_b());
    assert_eq!(resolve(&[full, delta], &p), want_delta);
}

#[test]
fn snapshot_header_damage_is_rejected() {
    for bytes in [full_bytes(), delta_bytes()] {
        let e = snapshot::decode(&with_byte(&bytes, 2, |b| *b = b'X'));
        assert_eq!(e, Err(FormatError::BadMagic { what: "snapshot" }));
        let e = snapshot::decode(&with_byte(&bytes, 8, |b| *b = 3));
        assert_eq!(
            e,
            Err(FormatError::UnsupportedVersion {
                what: "snapshot",
                version: 3
            })
        );
        // Version 2 is valid, but not for the version 1 decoder.
        let e = snapshot::decode(&with_byte(&bytes, 8, |b| *b = 2));
        assert_eq!(
            e,
            Err(FormatError::UnsupportedVersion {
                what: "snapshot (version 1 expected)",
                version: 2
            })
        );
        // The metadata limit is checked before reading it.
        let mut big = bytes.clone();
        put_u32(&mut big, 12, snapshot::MAX_META_LEN + 1);
        let r = invalid_reason(snapshot::decode(&big), "snapshot");
        assert!(r.contains("exceeds 1 MiB"), "{r}");
        let r = invalid_reason(snapshot::decode_meta(&big), "snapshot");
        assert!(r.contains("exceeds 1 MiB"), "{r}");
        // Within the limit but past the end.
        let mut past = bytes.clone();
        put_u32(&mut past, 12, snapshot::MAX_META_LEN);
        assert!(matches!(
            snapshot::decode(&past),
            Err(FormatError::Truncated {
                what: "snapshot",
                ..
            })
        ));
        // One byte too many or too few: no longer a JSON object.
        for delta in [1i64, -1] {
            let mut m = bytes.clone();
            let len = u32::from_le_bytes(m[12..16].try_into().unwrap()) as i64 + delta;
            put_u32(&mut m, 12, len as u32);
            let r = invalid_reason(snapshot::decode(&m), "snapshot");
            assert!(r.starts_with("metadata:"), "{r}");
        }
    }
}

#[test]
fn snapshot_metadata_damage_is_rejected() {
    let bytes = delta_bytes();
    let find = |needle: &str| {
        bytes
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap()
    };
    let cases: [(usize, u8, &str); 6] = [
        // "generation" -> "Generation": unknown field in v1.
        (find("\"generation\"") + 1, b'G', "unknown field"),
        // A snapshot id digit that is not hex.
        (find(DELTA_ID), b'z', "not hex"),
        // read_mode value not one of the two.
        (find("changed-blocks"), b'C', "unknown variant"),
        // block_size 65536 -> 95536: not a power of two.
        (find("65536"), b'9', "block size 95536 invalid"),
        // A quote broken: not JSON.
        (find("\"hostname\""), b'x', "metadata:"),
        // time no longer RFC 3339.
        (find("2026-11-03T"), b'x', "metadata:"),
    ];
    for (at, value, want) in cases {
        let r = invalid_reason(
            snapshot::decode(&with_byte(&bytes, at, |b| *b = value)),
            "snapshot",
        );
        assert!(
            r.contains(want),
            "byte {at} = {value:#x}: want '{want}', got '{r}'"
        );
    }
}

#[test]
fn snapshot_manifest_damage_is_rejected() {
    let bytes = delta_bytes();
    let count_at = 16 + 450;
    let entry0 = count_at + 8;
    let entry1 = entry0 + 9;
    let bitmap_len_at = entry1 + 41;
    let bitmap_at = bitmap_len_at + 8;
    assert_eq!(bitmap_at, bytes.len() - 1);

    let r = invalid_reason(
        snapshot::decode(&with_byte(&bytes, entry0 + 8, |b| *b = 2)),
        "snapshot",
    );
    assert!(r.contains("block 0: unknown entry kind 2"), "{r}");

    let mut m = bytes.clone();
    put_u64(&mut m, entry1, 0);
    let r = invalid_reason(snapshot::decode(&m), "snapshot");
    assert!(
        r.contains("block index 0 not in strictly ascending order"),
        "{r}"
    );

    let mut m = bytes.clone();
    put_u64(&mut m, entry1, 4);
    let r = invalid_reason(snapshot::decode(&m), "snapshot");
    assert!(
        r.contains("block index 4 beyond the disk's 4 blocks"),
        "{r}"
    );

    // More entries than the disk has blocks, checked before reading them.
    let mut m = bytes.clone();
    put_u64(&mut m, count_at, 5);
    let r = invalid_reason(snapshot::decode(&m), "snapshot");
    assert!(r.contains("entry count 5 impossible"), "{r}");
    let mut m = bytes.clone();
    put_u64(&mut m, count_at, u64::MAX);
    invalid_reason(snapshot::decode(&m), "snapshot");

    // One entry more than written: the bitmap length is read as entry 2's
    // index and the bitmap byte as its kind.
    let mut m = bytes.clone();
    put_u64(&mut m, count_at, 3);
    let r = invalid_reason(snapshot::decode(&m), "snapshot");
    assert!(r.contains("block 1: unknown entry kind 224"), "{r}");
    // In the full vector (no bitmap) the same runs out of bytes.
    let mut m = full_bytes();
    put_u64(&mut m, 16 + 428, 3);
    assert!(matches!(
        snapshot::decode(&m),
        Err(FormatError::Truncated {
            what: "snapshot",
            ..
        })
    ));

    // Bitmap length beyond the object.
    let mut m = bytes.clone();
    put_u64(&mut m, bitmap_len_at, 2);
    assert_eq!(
        snapshot::decode(&m),
        Err(FormatError::Truncated {
            what: "snapshot bitmap",
            needed: 2,
            available: 1
        })
    );

    // A padding bit set after block 3.
    let r = invalid_reason(
        snapshot::decode(&with_byte(&bytes, bitmap_at, |b| *b |= 0x08)),
        "snapshot",
    );
    assert!(r.contains("padding bits"), "{r}");

    // bitmap_length 0 leaves the bitmap byte trailing.
    let mut m = bytes.clone();
    put_u64(&mut m, bitmap_len_at, 0);
    let r = invalid_reason(snapshot::decode(&m), "snapshot");
    assert!(r.contains("1 trailing bytes"), "{r}");

    // A bitmap of the wrong length for the disk.
    let mut m = bytes.clone();
    put_u64(&mut m, bitmap_len_at, 2);
    m.push(0);
    let r = invalid_reason(snapshot::decode(&m), "snapshot");
    assert!(
        r.contains("bitmap has 2 bytes but a disk of 4 blocks needs 1"),
        "{r}"
    );
}

#[test]
fn snapshot_truncated_or_extended_is_rejected() {
    for bytes in [full_bytes(), delta_bytes()] {
        for len in 0..bytes.len() {
            assert!(snapshot::decode(&bytes[..len]).is_err(), "prefix {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let r = invalid_reason(snapshot::decode(&longer), "snapshot");
        assert!(r.contains("trailing bytes"), "{r}");
    }
}

#[test]
fn snapshot_encode_refuses_what_decode_rejects() {
    let mut obj = snapshot::decode(&delta_bytes()).unwrap();
    obj.entries.swap(0, 1);
    invalid_reason(snapshot::encode(&obj), "snapshot");
    let mut obj = snapshot::decode(&delta_bytes()).unwrap();
    obj.bitmap = Some(vec![0xe1]);
    invalid_reason(snapshot::encode(&obj), "snapshot");
    let mut obj = snapshot::decode(&delta_bytes()).unwrap();
    obj.meta.block_size = 1000;
    invalid_reason(snapshot::encode(&obj), "snapshot");
}

// ---------------------------------------------------------------- bitmap

#[test]
fn bitmap_vector_decodes_msb_first() {
    let text = parse_base64_txt(BITMAP_XEN_TXT);
    assert_eq!(text, "gUA=");
    let bm = bitmap::decode_base64(text, 10).unwrap();
    assert_eq!(bm, vec![0x81, 0x40]);
    assert_eq!(bitmap::len_for(10), 2);
    assert_eq!(bitmap::iter_set(&bm).collect::<Vec<_>>(), vec![0, 7, 9]);
    assert_eq!(bitmap::count(&bm), 3);
    for i in 0..10 {
        assert_eq!(bitmap::is_set(&bm, i), [0, 7, 9].contains(&i), "block {i}");
    }
    assert_eq!(bitmap::encode_base64(&bm), text);
    // ASCII whitespace (line breaks in an XML-RPC answer) is ignored.
    assert_eq!(bitmap::decode_base64(" gU\nA=\r\n", 10).unwrap(), bm);
}

#[test]
fn bitmap_damage_is_rejected() {
    // 0x41: a padding bit after block 9 is set.
    let e = bitmap::decode_base64("gUE=", 10).unwrap_err();
    assert!(e.contains("padding bits"), "{e}");
    // The right bytes for another disk size.
    let e = bitmap::decode_base64("gUA=", 17).unwrap_err();
    assert!(
        e.contains("bitmap has 2 bytes but a disk of 17 blocks needs 3"),
        "{e}"
    );
    // 16 blocks use every bit: no padding to check.
    assert_eq!(bitmap::decode_base64("gUE=", 16).unwrap(), vec![0x81, 0x41]);
    for bad in ["gUA", "gU@=", "gUA==", "gUB="] {
        let e = bitmap::decode_base64(bad, 10).unwrap_err();
        assert!(e.contains("not valid base64"), "{bad}: {e}");
    }
}

// ---------------------------------------------------------------- config

#[test]
fn config_vector_decodes_and_reencodes() {
    let c = config::decode(CONFIG_JSON.as_bytes()).unwrap();
    assert_eq!(c.version, 1);
    assert_eq!(
        c.id,
        "41c20fcfe24752a81280ba16bf922dd27ff30e86b60cd139216aa8a7f7d05626"
    );
    assert_eq!(c.created.to_rfc3339(), "2026-11-01T00:00:00+00:00");
    assert_eq!(c.block_size, BLOCK_SIZE);
    assert_eq!(c.hash, "blake3");
    assert_eq!(c.compression, "zstd");
    assert_eq!(c.compression_level, 3);
    assert_eq!(c.pack_size_target_bytes, 33_554_432);
    assert_eq!(config::encode(&c), CONFIG_JSON.as_bytes());
    // The snapshot vectors belong to this repository.
    let full = snapshot::decode(&full_bytes()).unwrap();
    assert_eq!(full.meta.block_size, c.block_size);
}

#[test]
fn config_damage_is_rejected() {
    let edit = |from: &str, to: &str| {
        assert!(CONFIG_JSON.contains(from), "{from}");
        config::decode(CONFIG_JSON.replacen(from, to, 1).as_bytes())
    };
    assert_eq!(
        edit("\"version\": 1", "\"version\": 3"),
        Err(FormatError::UnsupportedVersion {
            what: "config",
            version: 3
        })
    );
    // A newer version is reported as such even if the rest would not parse.
    invalid_reason(edit("\"hash\": \"blake3\"", "\"hash\": 7"), "config");
    let newer = CONFIG_JSON
        .replacen("\"version\": 1", "\"version\": 3", 1)
        .replacen("\"hash\": \"blake3\"", "\"hash\": 7", 1);
    assert!(matches!(
        config::decode(newer.as_bytes()),
        Err(FormatError::UnsupportedVersion { version: 3, .. })
    ));
    let cases = [
        ("\"blake3\"", "\"blake2\"", "unsupported hash 'blake2'"),
        ("\"zstd\"", "\"lz4\"", "compression 'lz4'"),
        (
            "\"block_size\": 65536",
            "\"block_size\": 65535",
            "block size 65535 invalid",
        ),
        (
            "\"block_size\": 65536",
            "\"block_size\": 256",
            "block size 256 invalid",
        ),
        (
            "\"compression_level\": 3",
            "\"compression_level\": 0",
            "zstd level 0",
        ),
        (
            "\"compression_level\": 3",
            "\"compression_level\": 23",
            "zstd level 23",
        ),
        ("\"id\": \"41", "\"id\": \"4", "id is not 64 hex digits"),
        ("\"id\": \"41", "\"id\": \"4g", "id is not 64 hex digits"),
        ("\"created\"", "\"created_at\"", "unknown field"),
        (
            "  \"hash\"",
            "  \"encryption\": \"none\",\n  \"hash\"",
            "unknown field",
        ),
        (
            "\"created\": \"2026",
            "\"created\": \"x026",
            "input contains invalid characters",
        ),
        ("}", "", "EOF"),
    ];
    for (from, to, want) in cases {
        let r = invalid_reason(edit(from, to), "config");
        assert!(r.contains(want), "{from} -> {to}: want '{want}', got '{r}'");
    }
    let big = format!("{}{}", " ".repeat(config::MAX_CONFIG_LEN), CONFIG_JSON);
    let r = invalid_reason(config::decode(big.as_bytes()), "config");
    assert!(r.contains("larger than 64 KiB"), "{r}");
}

#[test]
fn raw_frame_vector_decodes_with_zstd_and_matches_the_encoder() {
    let frame = parse_hex(RAW_FRAME_HEX);
    let content: Vec<u8> = (0..300usize).map(|i| (i % 251) as u8).collect();
    assert_eq!(frame.len(), 310);
    assert_eq!(
        zstd::bulk::decompress(&frame, 300).expect("any zstd decoder reads a raw frame"),
        content
    );
    let mut ours = Vec::new();
    cbtvault::format::raw_frame::encode_into(&content, &mut ours);
    assert_eq!(ours, frame, "the encoder writes the documented bytes");
    assert_eq!(cbtvault::format::raw_frame::encoded_len(300), 310);
    // A damaged block header (size one too large) is rejected by zstd.
    let mut bad = frame.clone();
    bad[7] = 0x69;
    assert!(zstd::bulk::decompress(&bad, 301).is_err());
}

pub(crate) const INDEX_HEX: &str =
    include_str!("../../format-spec/test-vectors/index-one-pack.hex");
const INDEX_NAME: &str = "d53fa21e28526ddb9cf5b881c017ea5011ea63272330dd1ba30046234159aa66";

#[test]
fn index_vector_lists_the_pack_vector_exactly() {
    use cbtvault::format::index::{self, IndexedPack};
    use cbtvault::format::ObjectName;
    let bytes = parse_hex(INDEX_HEX);
    assert_eq!(bytes.len(), 164);
    assert_eq!(ObjectName::of(&bytes).to_hex(), INDEX_NAME);
    let packs = index::decode(&bytes, BLOCK_SIZE).unwrap();
    let pack = pack_bytes();
    let expected = vec![IndexedPack {
        name: ObjectName::of(&pack),
        size_bytes: pack.len() as u64,
        entries: expected_entries(),
        trailer_format: 0,
    }];
    assert_eq!(packs, expected);
    assert_eq!(packs[0].name.to_hex(), PACK_NAME);
    // The entries are the pack's own trailer, byte for byte.
    assert_eq!(
        pack::decode_pack_index(&pack, BLOCK_SIZE).unwrap(),
        packs[0].entries
    );
    // Re-encoding gives the same bytes (the encoding is canonical).
    assert_eq!(index::encode(&packs), bytes);
    // Damage is refused with the reason, never a panic.
    assert!(matches!(
        index::decode(&with_byte(&bytes, 0, |b| *b ^= 1), BLOCK_SIZE),
        Err(FormatError::BadMagic { .. })
    ));
    let mut v2 = bytes.clone();
    put_u32(&mut v2, 8, 2);
    assert!(matches!(
        index::decode(&v2, BLOCK_SIZE),
        Err(FormatError::UnsupportedVersion { version: 2, .. })
    ));
    let mut size = bytes.clone();
    put_u64(&mut size, 52, 453);
    assert!(invalid_reason(index::decode(&size, BLOCK_SIZE), "index object").contains("453"));
    let mut gap = bytes.clone();
    put_u64(&mut gap, 68 + 48 + 32, 34);
    assert!(invalid_reason(index::decode(&gap, BLOCK_SIZE), "index object").contains("offset 34"));
    assert!(index::decode(&bytes[..bytes.len() - 1], BLOCK_SIZE).is_err());
}

// ------------------------------------------------- version 2: page table

fn paged_bytes() -> Vec<u8> {
    parse_hex(SNAPSHOT_PAGED_HEX)
}

fn page_bytes() -> Vec<u8> {
    parse_hex(PAGE_DELTA_HEX)
}

fn paged() -> snapshot::PagedSnapshot {
    match snapshot::decode_any(&paged_bytes()).unwrap() {
        StoredSnapshot::Paged(p) => p,
        other => panic!("expected a version 2 object, got {other:?}"),
    }
}

#[test]
fn paged_snapshot_vector_decodes_to_the_documented_fields() {
    let bytes = paged_bytes();
    assert_eq!(bytes.len(), 523);
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), PAGED_NAME);
    let p = paged();
    // The metadata is byte for byte the delta vector's.
    let delta = snapshot::decode(&delta_bytes()).unwrap();
    assert_eq!(p.meta, delta.meta);
    assert_eq!(snapshot::decode_meta(&bytes).unwrap(), p.meta);
    assert_eq!(p.table.page_blocks, 64);
    assert!(p.table.has_bitmap);
    assert_eq!(
        p.table.rows,
        vec![PageRow {
            page_no: 0,
            entry_count: 2,
            id: PAGE_NAME.parse().unwrap(),
        }]
    );
    assert_eq!(p.table.entry_count(), 2);
    assert_eq!(snapshot::encode_paged(&p).unwrap(), bytes);
    // The version 1 decoder refuses it by kind, not as damage.
    assert_eq!(
        snapshot::decode(&bytes),
        Err(FormatError::UnsupportedVersion {
            what: "snapshot (version 1 expected)",
            version: 2
        })
    );
    // decode_any reads version 1 objects too.
    assert!(matches!(
        snapshot::decode_any(&delta_bytes()).unwrap(),
        StoredSnapshot::Inline(o) if o == delta
    ));
}

#[test]
fn page_vector_decodes_and_resolves_like_the_delta_manifest() {
    let bytes = page_bytes();
    assert_eq!(bytes.len(), 90);
    // The page's name is the hash of its bytes.
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), PAGE_NAME);
    let pg = page::decode(&bytes).unwrap();
    assert_eq!(
        pg,
        Page {
            page_blocks: 64,
            first_index: 0,
            entries: vec![
                (0, BlockRef::Zero),
                (2, BlockRef::Data(block_id(BLOCK_A_ID)))
            ],
            bitmap: Some(vec![0xe0, 0, 0, 0, 0, 0, 0, 0]),
        }
    );
    assert_eq!(page::encode(&pg).unwrap(), bytes);
    let p = paged();
    page::check_use(&pg, &p.table.rows[0], 64, p.meta.block_count(), true).unwrap();
    // Entries and bitmap as the version 1 delta's: the same snapshot.
    let delta = snapshot::decode(&delta_bytes()).unwrap();
    assert_eq!(pg.entries, delta.entries);
    let bits: Vec<u64> = bitmap::iter_set(pg.bitmap.as_ref().unwrap()).collect();
    assert_eq!(bits, vec![0, 1, 2]);
    // Resolved over the full snapshot: exactly the delta's disk.
    let full = snapshot::decode(&full_bytes()).unwrap();
    let as_v1 = SnapshotObject {
        meta: p.meta.clone(),
        entries: pg.entries.clone(),
        bitmap: Some(vec![0xe0]),
    };
    let pk = pack_bytes();
    assert_eq!(
        resolve(&[full.clone(), as_v1], &pk),
        resolve(&[full, delta], &pk)
    );
}

#[test]
fn paged_snapshot_damage_is_rejected() {
    let bytes = paged_bytes();
    let table = 16 + 450; // page_blocks
    let e = snapshot::decode_any(&with_byte(&bytes, 2, |b| *b = b'X'));
    assert_eq!(e, Err(FormatError::BadMagic { what: "snapshot" }));
    let e = snapshot::decode_any(&with_byte(&bytes, 8, |b| *b = 3));
    assert_eq!(
        e,
        Err(FormatError::UnsupportedVersion {
            what: "snapshot",
            version: 3
        })
    );
    // page_blocks not a power of two, too small, too large.
    for pb in [96u32, 32, 131072] {
        let mut b = bytes.clone();
        put_u32(&mut b, table, pb);
        let r = invalid_reason(snapshot::decode_any(&b), "snapshot");
        assert!(r.contains("page_blocks"), "{r}");
    }
    // An unknown flag.
    let r = invalid_reason(
        snapshot::decode_any(&with_byte(&bytes, table + 4, |b| *b = 0x03)),
        "snapshot",
    );
    assert!(r.contains("flags"), "{r}");
    // More pages than the disk has ranges (before any row is read), and
    // more than the bytes hold.
    for count in [2u64, u64::MAX] {
        let mut b = bytes.clone();
        put_u64(&mut b, table + 5, count);
        let r = invalid_reason(snapshot::decode_any(&b), "snapshot");
        assert!(r.contains("page count"), "{r}");
    }
    // A page number beyond the disk.
    let mut b = bytes.clone();
    put_u64(&mut b, table + 13, 1);
    let r = invalid_reason(snapshot::decode_any(&b), "snapshot");
    assert!(r.contains("beyond the disk"), "{r}");
    // More entries than the page has blocks.
    let mut b = bytes.clone();
    put_u32(&mut b, table + 21, 65);
    let r = invalid_reason(snapshot::decode_any(&b), "snapshot");
    assert!(r.contains("65 entries"), "{r}");
    // A trailing byte, and a truncated row.
    let mut b = bytes.clone();
    b.push(0);
    assert!(snapshot::decode_any(&b).is_err());
    assert!(snapshot::decode_any(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn page_damage_is_rejected() {
    let bytes = page_bytes();
    let what = "manifest page";
    assert_eq!(
        page::decode(&with_byte(&bytes, 0, |b| *b = b'X')),
        Err(FormatError::BadMagic { what })
    );
    assert_eq!(
        page::decode(&with_byte(&bytes, 8, |b| *b = 2)),
        Err(FormatError::UnsupportedVersion { what, version: 2 })
    );
    // first_index not a multiple of page_blocks.
    let mut b = bytes.clone();
    put_u64(&mut b, 16, 1);
    let r = invalid_reason(page::decode(&b), what);
    assert!(r.contains("not a multiple"), "{r}");
    // An entry count the bytes cannot hold.
    let mut b = bytes.clone();
    put_u32(&mut b, 24, 64);
    let r = invalid_reason(page::decode(&b), what);
    assert!(r.contains("entry count"), "{r}");
    // Entries out of order (second index 0).
    let mut b = bytes.clone();
    put_u64(&mut b, 37, 0);
    let r = invalid_reason(page::decode(&b), what);
    assert!(r.contains("ascending"), "{r}");
    // An index outside the page's range.
    let mut b = bytes.clone();
    put_u64(&mut b, 37, 64);
    let r = invalid_reason(page::decode(&b), what);
    assert!(r.contains("outside the page"), "{r}");
    // A kind that is neither 0 nor 1.
    assert!(page::decode(&with_byte(&bytes, 36, |b| *b = 2)).is_err());
    // A bitmap length other than 0 or page_blocks / 8.
    let mut b = bytes.clone();
    put_u32(&mut b, 78, 1);
    let r = invalid_reason(page::decode(&b), what);
    assert!(r.contains("bitmap length"), "{r}");
    // A trailing byte.
    let mut b = bytes.clone();
    b.push(0);
    assert!(page::decode(&b).is_err());
    // A page with neither entries nor bitmap.
    let empty = Page {
        page_blocks: 64,
        first_index: 0,
        entries: vec![],
        bitmap: None,
    };
    assert!(page::encode(&empty).is_err());

    // Checks against the naming snapshot.
    let pg = page::decode(&bytes).unwrap();
    let row = paged().table.rows[0];
    let r = invalid_reason(page::check_use(&pg, &row, 128, 4, true), what);
    assert!(r.contains("128-block"), "{r}");
    let r = invalid_reason(
        page::check_use(&pg, &PageRow { page_no: 1, ..row }, 64, 200, true),
        what,
    );
    assert!(r.contains("named as page 1"), "{r}");
    let r = invalid_reason(
        page::check_use(
            &pg,
            &PageRow {
                entry_count: 3,
                ..row
            },
            64,
            4,
            true,
        ),
        what,
    );
    assert!(r.contains("table says 3"), "{r}");
    // Block 2 beyond a 2-block disk; bitmap bit 2 too.
    let r = invalid_reason(page::check_use(&pg, &row, 64, 2, true), what);
    assert!(r.contains("beyond the disk"), "{r}");
    let r = invalid_reason(page::check_use(&pg, &row, 64, 4, false), what);
    assert!(r.contains("without one"), "{r}");
    let only_bits = Page {
        entries: vec![],
        ..pg.clone()
    };
    let r = invalid_reason(
        page::check_use(
            &only_bits,
            &PageRow {
                entry_count: 0,
                ..row
            },
            64,
            2,
            true,
        ),
        what,
    );
    assert!(r.contains("bitmap bit for block 2"), "{r}");
}

pub const LANDMARK_VMWARE: &str =
    include_str!("../../format-spec/test-vectors/landmark-vmware.json");

/// The key set of one of `landmark-vmware.json`'s maps.
pub fn vmware_landmark_keys(which: &str) -> std::collections::BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(LANDMARK_VMWARE).unwrap();
    v[which].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn vmware_landmark_vector_names_the_keys_the_writer_uses() {
    use cbtvault::source::vmware::workflow::keys;
    let disk = vmware_landmark_keys("disk");
    let want: std::collections::BTreeSet<String> = [
        keys::HOST,
        keys::VM,
        keys::VM_NAME,
        keys::DISK_KEY,
        keys::DISK_FILE,
        keys::DISK_LABEL,
        keys::CHANGE_ID,
        keys::VM_BACKUP,
        keys::KIND,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(disk, want);
    let config = vmware_landmark_keys("vm_config");
    let want_config: std::collections::BTreeSet<String> = [
        keys::HOST,
        keys::VM,
        keys::VM_NAME,
        keys::VM_BACKUP,
        keys::KIND,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(config, want_config);
    let v: serde_json::Value = serde_json::from_str(LANDMARK_VMWARE).unwrap();
    let c = vim_wire::ChangeId::parse(v["disk"][keys::CHANGE_ID].as_str().unwrap()).unwrap();
    assert_eq!(c.uuid, "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b");
    assert_eq!(c.sequence, 4);
    assert_eq!(
        v["disk"][keys::DISK_KEY]
            .as_str()
            .unwrap()
            .parse::<i32>()
            .unwrap(),
        2000
    );
    assert_eq!(
        cbtvault::source::vmware::workflow::flat_path(v["disk"][keys::DISK_FILE].as_str().unwrap()),
        Some(("datastore1".into(), "web01/web01-flat.vmdk".into()))
    );
    assert_eq!(v["disk"][keys::KIND], "disk");
    assert_eq!(v["vm_config"][keys::KIND], "vm-config");
}

/// The pack writer, given the vector's frames and pack id, writes the
/// tail-named vector byte for byte and names it as the vector says.
#[test]
fn the_pack_writer_writes_the_tail_named_vector() {
    use cbtvault::crypto::Codec;
    use cbtvault::pack::{CompressedBlock, PackWriter, Stored};
    let p = parse_hex(PACK_TAIL_HEX);
    let mut w = PackWriter::new(1 << 20, &Codec::Plain);
    for e in expected_entries() {
        let frame = p[e.offset as usize..][..e.stored_length as usize].to_vec();
        w.add(&CompressedBlock {
            id: e.block_id,
            raw_length: e.raw_length,
            stored: Stored::Verbatim(frame),
        })
        .unwrap();
    }
    let done = w.finish_with_id(PACK_TAIL_ID).unwrap();
    assert_eq!(done.tail.bytes(), &p[..]);
    assert_eq!(done.name.to_hex(), PACK_TAIL_NAME);
    assert_eq!(done.entries, expected_entries());
}
