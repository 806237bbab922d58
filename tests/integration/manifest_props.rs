//! Property tests for layered manifests (`cbtvault::manifest`): random
//! chains of snapshot manifests, with disks that grow and shrink, resolve
//! to what a naive model says (apply each layer to a vector of blocks,
//! truncating or extending it on resize); `apply` extends a resolved chain
//! by one layer; `diff` is empty against itself and, applied as a delta,
//! turns one map into the other; `flatten` gives an equivalent full
//! manifest, so a synthetic full anywhere in a chain changes nothing.

use std::collections::BTreeMap;

use proptest::prelude::*;

use cbtvault::format::snapshot::{self, BlockRef, ReadMode, SnapshotMeta, SnapshotObject};
use cbtvault::format::{BlockId, SnapshotId};
use cbtvault::manifest::{apply, diff, flatten, resolve, BlockMap};

const BS: u32 = 65536;

/// One layer: disk size and its entries (index -> Some(content) or zero).
type Layer = (u64, BTreeMap<u64, Option<u8>>);

/// Few distinct contents, so equal ids across layers are common.
fn id(v: u8) -> BlockId {
    BlockId([v; 32])
}

fn layer() -> impl Strategy<Value = Layer> {
    (0u64..20, prop_oneof![2 => Just(0u64), 1 => 1..BS as u64])
        .prop_flat_map(|(blocks, extra)| {
            let size = blocks * BS as u64 + extra;
            let count = size.div_ceil(BS as u64);
            (
                Just(size),
                proptest::collection::btree_map(
                    0..count.max(1),
                    proptest::option::weighted(0.8, 0u8..6),
                    0..=count as usize,
                ),
            )
        })
        .prop_map(|(size, mut entries)| {
            let count = size.div_ceil(BS as u64);
            entries.retain(|i, _| *i < count);
            (size, entries)
        })
}

fn chain() -> impl Strategy<Value = Vec<Layer>> {
    proptest::collection::vec(layer(), 1..8)
}

fn meta(k: usize, size: u64) -> SnapshotMeta {
    SnapshotMeta {
        id: SnapshotId([k as u8 + 1; 16]),
        generation: 0,
        time: chrono::DateTime::from_timestamp(1_700_000_000 + k as i64, 0).unwrap(),
        hostname: "host".into(),
        source: "file:/disk.img".into(),
        disk_size_bytes: size,
        block_size: BS,
        parent: (k > 0).then_some(SnapshotId([k as u8; 16])),
        backup_set: SnapshotId([1; 16]),
        tags: vec![],
        landmark: BTreeMap::new(),
        read_mode: ReadMode::All,
        new_set_reason: None,
    }
}

fn objects(layers: &[Layer]) -> Vec<SnapshotObject> {
    layers
        .iter()
        .enumerate()
        .map(|(k, (size, entries))| SnapshotObject {
            meta: meta(k, *size),
            entries: entries
                .iter()
                .map(|(i, v)| {
                    (
                        *i,
                        v.map(|v| BlockRef::Data(id(v))).unwrap_or(BlockRef::Zero),
                    )
                })
                .collect(),
            bitmap: None,
        })
        .collect()
}

/// The naive model: a vector with one slot per block, resized per layer.
fn model(layers: &[Layer]) -> BlockMap {
    let mut disk: Vec<Option<u8>> = Vec::new();
    for (size, entries) in layers {
        disk.resize(size.div_ceil(BS as u64) as usize, None);
        for (i, v) in entries {
            disk[*i as usize] = *v;
        }
    }
    BlockMap {
        disk_size_bytes: layers.last().map(|l| l.0).unwrap_or(0),
        block_size: BS,
        data: disk
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i as u64, id(v))))
            .collect(),
    }
}

fn resolved(objs: &[SnapshotObject]) -> BlockMap {
    let refs: Vec<&SnapshotObject> = objs.iter().collect();
    resolve(&refs)
}

fn full_object(k: usize, map: &BlockMap) -> SnapshotObject {
    let mut m = meta(k, map.disk_size_bytes);
    m.parent = None;
    SnapshotObject {
        meta: m,
        entries: flatten(map),
        bitmap: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_layers_are_valid_snapshot_objects(layers in chain()) {
        for obj in objects(&layers) {
            let bytes = snapshot::encode(&obj).expect("the strategy makes valid objects");
            prop_assert_eq!(snapshot::decode(&bytes).unwrap(), obj);
        }
    }

    #[test]
    fn resolve_matches_the_naive_model(layers in chain()) {
        let objs = objects(&layers);
        let map = resolved(&objs);
        prop_assert_eq!(&map, &model(&layers));
        prop_assert!(map.data.iter().all(|(i, _)| *i < map.block_count()));
        prop_assert!(map.data.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn apply_extends_a_resolved_chain_by_one_layer(layers in chain()) {
        let objs = objects(&layers);
        for n in 1..objs.len() {
            let base = resolved(&objs[..n]);
            let next = apply(&base, &objs[n].entries, objs[n].meta.disk_size_bytes);
            prop_assert_eq!(next, resolved(&objs[..=n]), "layer {}", n);
        }
    }

    #[test]
    fn diff_with_itself_is_empty(layers in chain()) {
        let map = resolved(&objects(&layers));
        prop_assert!(diff(&map, &map).is_empty());
    }

    #[test]
    fn diff_matches_the_model_and_applies_back(a in chain(), b in chain()) {
        let ma = resolved(&objects(&a));
        let mb = resolved(&objects(&b));
        let changes = diff(&ma, &mb);
        let blocks = ma.block_count().max(mb.block_count());
        let expected: Vec<u64> = (0..blocks).filter(|&i| ma.get(i) != mb.get(i)).collect();
        prop_assert_eq!(changes.iter().map(|c| c.index).collect::<Vec<_>>(), expected);
        for c in &changes {
            prop_assert_eq!(c.before, ma.get(c.index));
            prop_assert_eq!(c.after, mb.get(c.index));
        }
        let delta: Vec<(u64, BlockRef)> = changes
            .iter()
            .map(|c| (c.index, c.after.map(BlockRef::Data).unwrap_or(BlockRef::Zero)))
            .collect();
        prop_assert_eq!(apply(&ma, &delta, mb.disk_size_bytes), mb);
    }

    #[test]
    fn a_synthetic_full_anywhere_changes_nothing(layers in chain(), cut in any::<prop::sample::Index>()) {
        let objs = objects(&layers);
        let n = cut.index(objs.len()) + 1; // 1..=len layers folded into one
        let full = full_object(n - 1, &resolved(&objs[..n]));
        prop_assert!(full.entries.iter().all(|(_, r)| matches!(r, BlockRef::Data(_))));
        let mut rebuilt = vec![full];
        rebuilt.extend_from_slice(&objs[n..]);
        prop_assert_eq!(resolved(&rebuilt), resolved(&objs));
    }
}

#[test]
fn empty_chain_resolves_to_an_empty_disk() {
    assert_eq!(resolve(&[]), BlockMap::default());
}

/// A shrink drops blocks for good: growing again brings zeros, not the old
/// data (the case a cache of the parent's map could get wrong).
#[test]
fn shrink_then_grow_brings_back_zeros() {
    let bs = BS as u64;
    let layers: Vec<Layer> = vec![
        (
            4 * bs,
            BTreeMap::from([(0, Some(1)), (1, Some(2)), (2, Some(3)), (3, Some(4))]),
        ),
        (2 * bs, BTreeMap::new()),
        (4 * bs, BTreeMap::from([(3, Some(5))])),
    ];
    let map = resolved(&objects(&layers));
    assert_eq!(map.data, vec![(0, id(1)), (1, id(2)), (3, id(5))]);
    assert_eq!(map, model(&layers));
}
