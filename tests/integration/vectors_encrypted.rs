//! The encrypted (format version 2) test vectors of
//! `format-spec/test-vectors/`: a key object, a config, a pack and a
//! snapshot of one tiny repository, decoded and opened here with the
//! password the README states, every derived value checked, and damaged or
//! swapped copies refused. `regenerate_encrypted_vectors` (ignored) wrote
//! them once from the fixed inputs below.

use cbtvault::crypto::codec::{open_sealed_object, SEALED_MAGIC};
use cbtvault::crypto::{self, password, Bound, Codec, Keys, MasterSecret};
use cbtvault::format::key::{self, KdfParams};
use cbtvault::format::pack::{self, Framing, TrailerEntry};
use cbtvault::format::{config, snapshot, snapshot::BlockRef, BlockId, ObjectName};
use cbtvault::pack::decompress_verified;

use crate::vectors::{parse_hex, PACK_HEX, SNAPSHOT_FULL_HEX};

const KEY_JSON: &str = include_str!("../../format-spec/test-vectors/key-object.json");
const CONFIG_JSON: &str = include_str!("../../format-spec/test-vectors/config-encrypted.json");
const PACK_ENC_HEX: &str = include_str!("../../format-spec/test-vectors/pack-encrypted.hex");
const SNAPSHOT_ENC_HEX: &str =
    include_str!("../../format-spec/test-vectors/snapshot-encrypted.hex");

const PASSWORD: &str = "correct horse battery staple";
const REPO_ID: &str = "41c20fcfe24752a81280ba16bf922dd27ff30e86b60cd139216aa8a7f7d05626";
const KDF: KdfParams = KdfParams {
    memory_kib: 8192,
    iterations: 1,
    parallelism: 1,
};
// Derived values, as the README states them (K_obj is
// 35ca9046a6bcf38d965f49ff6aac732c7c02aee2459a515ddc52b5d771807db0).
const K_ID: &str = "184148b6e1fd077d0148ab530583aef054da72a33bf09c6acdb199111b291e61";
const BLOCK_A_KEYED: &str = "8642df90ba23112270cb44ce6a31b18d79d46f70c8d3fb429d069312b25abef6";
const BLOCK_B_KEYED: &str = "9945744d918e20ddfca9117726add5b6dbb09d0bbc4a1fe8210534c0c2b385c2";
const PACK_NAME: &str = "4ad302a3706bbb2864aa1f952548ccada14471197e1e573127f1c85149f339ab";
const SNAPSHOT_NAME: &str = "896aeb5fdd198fa4b1e2d4d117169061230e84c8d5f224dd8cafad752366b13a";
const KEY_NAME: &str = "41d0d213291130fbfcc43fed7c832df2673b286ca5013ca34b4174948bd9f9ff";

fn master() -> MasterSecret {
    MasterSecret(std::array::from_fn(|i| i as u8))
}

fn salt() -> [u8; 32] {
    std::array::from_fn(|i| 0x20 + i as u8)
}

fn nonce(b: u8) -> [u8; 24] {
    [b; 24]
}

fn repo_id() -> [u8; 32] {
    let mut b = [0u8; 32];
    hex::decode_to_slice(REPO_ID, &mut b).unwrap();
    b
}

fn block_a() -> Vec<u8> {
    vec![0x61; 100]
}

fn block_b() -> Vec<u8> {
    (0..3392u32).map(|i| (i % 251) as u8).collect()
}

/// The zstd frames of the two blocks, as the version-1 pack vector holds them.
fn frames() -> (Vec<u8>, Vec<u8>) {
    let p = parse_hex(PACK_HEX);
    (p[16..33].to_vec(), p[33..304].to_vec())
}

struct Built {
    key: Vec<u8>,
    config: Vec<u8>,
    pack: Vec<u8>,
    snapshot: Vec<u8>,
}

/// Builds every vector from the fixed inputs.
fn build() -> Built {
    let keys = Keys::derive(&master());
    let k = *keys.object_key();
    let wrapped = password::wrap_with(
        &master(),
        PASSWORD.as_bytes(),
        &salt(),
        &KDF,
        &repo_id(),
        nonce(1),
    )
    .unwrap();
    let key_obj = key::KeyObject {
        created: "2026-11-01T00:00:00Z".parse().unwrap(),
        hostname: "backup01".into(),
        username: "root".into(),
        kdf: KDF,
        salt: salt(),
        master: wrapped,
    };
    let cfg = config::RepoConfig {
        version: 2,
        id: REPO_ID.into(),
        created: "2026-11-01T00:00:00Z".parse().unwrap(),
        block_size: 65536,
        hash: "blake3-keyed".into(),
        compression: "zstd".into(),
        compression_level: 3,
        pack_size_target_bytes: 33554432,
    };
    let sealed_body = crypto::seal_with(
        &k,
        nonce(2),
        &Bound::Config(repo_id()),
        &config::encode_body(&cfg),
    );
    let (fa, fb) = frames();
    let (ia, ib) = (keys.block_id(&block_a()), keys.block_id(&block_b()));
    let sa = crypto::seal_with(&k, nonce(3), &Bound::Blob(ia), &fa);
    let sb = crypto::seal_with(&k, nonce(4), &Bound::Blob(ib), &fb);
    let mut p = pack::encode_header_framed(Framing::SEALED).to_vec();
    let entries = [
        TrailerEntry {
            block_id: ia,
            offset: 16,
            stored_length: sa.len() as u32,
            raw_length: 100,
        },
        TrailerEntry {
            block_id: ib,
            offset: 16 + sa.len() as u64,
            stored_length: sb.len() as u32,
            raw_length: 3392,
        },
    ];
    p.extend_from_slice(&sa);
    p.extend_from_slice(&sb);
    let trailer = crypto::seal_with(
        &k,
        nonce(5),
        &Bound::Trailer,
        &pack::encode_trailer_body(&entries),
    );
    p.extend_from_slice(&trailer);
    p.extend_from_slice(&pack::encode_footer(trailer.len() as u32));
    let mut snap = snapshot::decode(&parse_hex(SNAPSHOT_FULL_HEX)).unwrap();
    snap.entries = vec![(0, BlockRef::Data(ia)), (3, BlockRef::Data(ib))];
    let mut s = SEALED_MAGIC.to_vec();
    s.extend_from_slice(&crypto::seal_with(
        &k,
        nonce(6),
        &Bound::Snapshot,
        &snapshot::encode(&snap).unwrap(),
    ));
    Built {
        key: key::encode(&key_obj),
        config: config::encode_encrypted(REPO_ID, &sealed_body),
        pack: p,
        snapshot: s,
    }
}

/// Annotated hex: one line per field, `# offset name` comments.
fn annotate(fields: &[(&str, &[u8])]) -> String {
    let mut out = String::new();
    let mut at = 0usize;
    for (name, bytes) in fields {
        out.push_str(&format!("# {at:#06x} {name} ({} bytes)\n", bytes.len()));
        for chunk in bytes.chunks(32) {
            out.push_str(&hex::encode(chunk));
            out.push('\n');
        }
        at += bytes.len();
    }
    out
}

#[test]
#[ignore = "writes format-spec/test-vectors; run once when the format changes"]
fn regenerate_encrypted_vectors() {
    let b = build();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("format-spec/test-vectors");
    std::fs::write(dir.join("key-object.json"), &b.key).unwrap();
    std::fs::write(dir.join("config-encrypted.json"), &b.config).unwrap();
    let p = &b.pack;
    let sa_end = 16 + 17 + 40;
    let sb_end = sa_end + 271 + 40;
    let t_end = p.len() - 12;
    let pack_hex = format!(
        "# pack-encrypted.hex: a version-2 pack of two sealed blobs; see README.md#encrypted\n{}",
        annotate(&[
            ("header: CBTVPACK, version 2, reserved", &p[..16]),
            ("blob 0 nonce", &p[16..40]),
            ("blob 0 ciphertext of the zstd frame", &p[40..sa_end - 16]),
            ("blob 0 tag", &p[sa_end - 16..sa_end]),
            ("blob 1 nonce", &p[sa_end..sa_end + 24]),
            ("blob 1 ciphertext", &p[sa_end + 24..sb_end - 16]),
            ("blob 1 tag", &p[sb_end - 16..sb_end]),
            ("trailer nonce", &p[sb_end..sb_end + 24]),
            ("trailer ciphertext", &p[sb_end + 24..t_end - 16]),
            ("trailer tag", &p[t_end - 16..t_end]),
            ("footer: CBTVTRLR, trailer length", &p[t_end..]),
        ])
    );
    std::fs::write(dir.join("pack-encrypted.hex"), pack_hex).unwrap();
    let s = &b.snapshot;
    let snap_hex = format!(
        "# snapshot-encrypted.hex: a sealed snapshot object; see README.md#encrypted\n{}",
        annotate(&[
            ("magic CBTVSEAL", &s[..8]),
            ("nonce", &s[8..32]),
            ("ciphertext of the version-1 snapshot", &s[32..s.len() - 16]),
            ("tag", &s[s.len() - 16..]),
        ])
    );
    std::fs::write(dir.join("snapshot-encrypted.hex"), snap_hex).unwrap();
    let keys = Keys::derive(&master());
    println!(
        "K_id {}",
        hex::encode(blake3::derive_key("cbtvault 2026-12 block id", &master().0))
    );
    println!("K_obj {}", hex::encode(keys.object_key()));
    println!("block a {}", keys.block_id(&block_a()));
    println!("block b {}", keys.block_id(&block_b()));
    println!("pack {} ({} bytes)", ObjectName::of(&b.pack), b.pack.len());
    println!(
        "snapshot {} ({} bytes)",
        ObjectName::of(&b.snapshot),
        b.snapshot.len()
    );
    println!("key {} ({} bytes)", ObjectName::of(&b.key), b.key.len());
}

#[test]
fn encrypted_vectors_are_what_the_fixed_inputs_make() {
    // Generated once and stored: the code still makes exactly these bytes.
    let b = build();
    assert_eq!(b.key, KEY_JSON.as_bytes());
    assert_eq!(b.config, CONFIG_JSON.as_bytes());
    assert_eq!(b.pack, parse_hex(PACK_ENC_HEX));
    assert_eq!(b.snapshot, parse_hex(SNAPSHOT_ENC_HEX));
}

#[test]
fn encrypted_vectors_open_with_the_password_and_nothing_else() {
    // The key object: its name, its fields, the master secret.
    assert_eq!(ObjectName::of(KEY_JSON.as_bytes()).to_hex(), KEY_NAME);
    let k = key::decode(KEY_JSON.as_bytes()).unwrap();
    assert_eq!(k.kdf, KDF);
    assert_eq!(k.salt, salt());
    let m = password::unwrap(&k, PASSWORD.as_bytes(), &repo_id())
        .unwrap()
        .expect("the README's password opens the key");
    assert_eq!(m.0, master().0);
    assert!(
        password::unwrap(&k, b"Correct horse battery staple", &repo_id())
            .unwrap()
            .is_none()
    );
    // Bound to its repository: another id does not open it.
    let mut other = repo_id();
    other[0] ^= 1;
    assert!(password::unwrap(&k, PASSWORD.as_bytes(), &other)
        .unwrap()
        .is_none());
    let keys = Keys::derive(&m);
    assert_eq!(
        hex::encode(blake3::derive_key("cbtvault 2026-12 block id", &m.0)),
        K_ID
    );
    let (ia, ib) = (keys.block_id(&block_a()), keys.block_id(&block_b()));
    assert_eq!(ia.to_hex(), BLOCK_A_KEYED);
    assert_eq!(ib.to_hex(), BLOCK_B_KEYED);
    assert_ne!(ia, BlockId::of(&block_a()));

    // The config: the id in the clear, the body sealed.
    let config::Outer::Encrypted { id, sealed } =
        config::decode_outer(CONFIG_JSON.as_bytes()).unwrap()
    else {
        panic!("an encrypted config")
    };
    assert_eq!(id, REPO_ID);
    let body = crypto::open(keys.object_key(), &Bound::Config(repo_id()), &sealed).unwrap();
    let c = config::decode_body(&id, &body).unwrap();
    assert_eq!(
        (c.version, c.block_size, c.hash.as_str()),
        (2, 65536, "blake3-keyed")
    );
    assert!(crypto::open(keys.object_key(), &Bound::Config(other), &sealed).is_err());

    // The pack: trailer opened, both blobs opened, decompressed, verified.
    let codec = Codec::Sealed(std::sync::Arc::new(keys.clone()));
    let p = parse_hex(PACK_ENC_HEX);
    assert_eq!(ObjectName::of(&p).to_hex(), PACK_NAME);
    let entries = pack::decode_pack_index_framed(&p, 65536, Framing::SEALED, |t| {
        codec.open_trailer(t).map_err(|e| e.to_string())
    })
    .unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].block_id, entries[1].block_id), (ia, ib));
    assert_eq!((entries[0].offset, entries[0].stored_length), (16, 17 + 40));
    let pname = ObjectName::of(&p);
    for (e, raw) in entries.iter().zip([block_a(), block_b()]) {
        let blob = &p[e.offset as usize..(e.offset + e.stored_length as u64) as usize];
        assert_eq!(
            decompress_verified(&codec, blob, e.raw_length, e.block_id, pname).unwrap(),
            raw
        );
    }
    // Blob 0 presented as block b's, a flipped byte anywhere in a blob,
    // the plain codec: refused.
    let blob0 = &p[16..16 + 57];
    assert!(decompress_verified(&codec, blob0, 3392, ib, pname).is_err());
    for i in 0..blob0.len() {
        let mut bad = blob0.to_vec();
        bad[i] ^= 0x40;
        assert!(
            decompress_verified(&codec, &bad, 100, ia, pname).is_err(),
            "byte {i}"
        );
    }
    assert!(decompress_verified(&Codec::Plain, blob0, 100, ia, pname).is_err());
    // A version-1 reader refuses the pack (header version 2).
    assert!(pack::decode_pack_index(&p, 65536).is_err());
    // A flipped trailer byte: the trailer does not open.
    let mut bad = p.clone();
    let at = bad.len() - 20;
    bad[at] ^= 1;
    assert!(
        pack::decode_pack_index_framed(&bad, 65536, Framing::SEALED, |t| {
            codec.open_trailer(t).map_err(|e| e.to_string())
        })
        .is_err()
    );

    // The snapshot: opened, a version-1 snapshot with keyed ids inside.
    let s = parse_hex(SNAPSHOT_ENC_HEX);
    assert_eq!(ObjectName::of(&s).to_hex(), SNAPSHOT_NAME);
    let plain = open_sealed_object(keys.object_key(), Bound::Snapshot, &s).unwrap();
    let snap = snapshot::decode(&plain).unwrap();
    assert_eq!(
        snap.entries,
        vec![(0, BlockRef::Data(ia)), (3, BlockRef::Data(ib))]
    );
    // A sealed snapshot cannot pass for an index or lock object.
    assert!(open_sealed_object(keys.object_key(), Bound::Index, &s).is_err());
    let mut cut = s.clone();
    cut.pop();
    assert!(open_sealed_object(keys.object_key(), Bound::Snapshot, &cut).is_err());
}
