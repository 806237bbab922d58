//! Version 2 snapshot objects end to end (format-spec/03-snapshot.md#paged,
//! #pages): manifests split into content-addressed pages of 16,384 blocks.
//! A repository of 512-byte blocks puts several pages in a few MiB of disk;
//! every restore is compared bit for bit with the source, and a missing or
//! damaged page stops a restore before it writes a byte.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::*;

const BS: u64 = 512;
const PAGE: u64 = 16_384;
/// Three pages, the last one partial.
const BLOCKS: u64 = 2 * PAGE + 1000;

/// A sparse image of `BLOCKS` 512-byte blocks, edited block by block.
struct Disk {
    path: PathBuf,
    file: std::fs::File,
}

impl Disk {
    fn new(t: &TestRepo, name: &str) -> Disk {
        let path = t.path(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(BLOCKS * BS).unwrap();
        Disk { path, file }
    }

    fn put(&self, index: u64, seed: u64) {
        let data = random_bytes(seed, index, BS as usize);
        self.file.write_all_at(&data, index * BS).unwrap();
    }

    fn zero(&self, index: u64) {
        self.file
            .write_all_at(&[0u8; BS as usize], index * BS)
            .unwrap();
    }

    fn hash(&self) -> (blake3::Hash, u64) {
        (hash_file(&self.path), BLOCKS * BS)
    }
}

fn paged_repo(extra: &[&str]) -> TestRepo {
    let mut args = vec!["--block-size", "512"];
    args.extend_from_slice(extra);
    TestRepo::init(&args)
}

/// `cat snapshot ID --json`: the object line (version, pages).
fn object_line(t: &TestRepo, id: &str) -> Value {
    t.run(&[&"--json", &"cat", &"snapshot", &id])
        .ok()
        .item("snapshot_object")
}

fn page_nos(head: &Value) -> Vec<u64> {
    head["pages"]
        .as_array()
        .expect("pages")
        .iter()
        .map(|p| p["page_no"].as_u64().unwrap())
        .collect()
}

fn page_ids(head: &Value) -> Vec<String> {
    head["pages"]
        .as_array()
        .expect("pages")
        .iter()
        .map(|p| p["page_id"].as_str().unwrap().to_string())
        .collect()
}

/// Full with data in every page, then an incremental touching page 1
/// only: each restores bit for bit, the incremental's object names one
/// page, and exactly one new page file appears.
#[test]
fn pages_round_trip_and_an_incremental_writes_only_what_changed() {
    let t = paged_repo(&[]);
    let d = Disk::new(&t, "disk.img");
    for i in [0, 5, PAGE - 1, PAGE, PAGE + 7, 2 * PAGE, BLOCKS - 1] {
        d.put(i, 1);
    }
    let full = TestRepo::id_of(&t.backup(&d.path, &[]));
    let full_hash = d.hash();
    let head = object_line(&t, &full);
    assert_eq!(head["version"], 2);
    assert_eq!(page_nos(&head), vec![0, 1, 2]);
    assert_eq!(t.files_under("manifests").len(), 3);

    d.put(PAGE + 100, 2);
    d.zero(PAGE + 7);
    let inc = TestRepo::id_of(&t.backup(&d.path, &[]));
    let inc_hash = d.hash();
    let head = object_line(&t, &inc);
    assert_eq!(head["meta"]["parent"].as_str(), Some(full.as_str()));
    assert_eq!(page_nos(&head), vec![1], "a delta names only touched pages");
    assert_eq!(head["pages"][0]["entry_count"], 2);
    assert_eq!(t.files_under("manifests").len(), 4);

    t.assert_restores(&full, full_hash.0, full_hash.1);
    t.assert_restores(&inc, inc_hash.0, inc_hash.1);
    let (r, _) = t.check(true);
    r.ok();
    // The entries across pages, in order, as `cat` streams them.
    let entries = t.cat_snapshot(&full)["entries"].clone();
    let idx: Vec<u64> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        idx,
        vec![0, 5, PAGE - 1, PAGE, PAGE + 7, 2 * PAGE, BLOCKS - 1]
    );
}

/// A synthetic full names its predecessor's pages for ranges nothing
/// touched, and writes new pages only for the others.
#[test]
fn a_synthetic_full_shares_the_pages_of_unchanged_ranges() {
    let t = paged_repo(&[]);
    let d = Disk::new(&t, "disk.img");
    for i in [3, PAGE + 3, 2 * PAGE + 3] {
        d.put(i, 3);
    }
    let full = TestRepo::id_of(&t.backup(&d.path, &["--full-every", "1"]));
    d.put(2 * PAGE + 9, 4);
    let s = t.backup(&d.path, &["--full-every", "1"]);
    assert_eq!(s["synthetic_full"], true, "{s}");
    let synth = TestRepo::id_of(&s);
    let hash = d.hash();
    let a = page_ids(&object_line(&t, &full));
    let b = page_ids(&object_line(&t, &synth));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    assert_eq!(a[..2], b[..2], "pages 0 and 1 shared");
    assert_ne!(a[2], b[2], "page 2 rewritten");
    // The full's 3 pages and one new page: nothing else was written.
    assert_eq!(t.files_under("manifests").len(), 4);
    t.assert_restores(&synth, hash.0, hash.1);
    t.check(true).0.ok();
}

fn page_path(t: &TestRepo, id: &str) -> PathBuf {
    t.repo.join("manifests").join(id)
}

/// A page gone or damaged: restore refuses before it writes a byte (the
/// target is not created), naming the page; `check` reports the snapshot.
#[test]
fn a_missing_or_damaged_page_stops_restore_before_any_byte() {
    let t = paged_repo(&[]);
    let d = Disk::new(&t, "disk.img");
    for i in [0, PAGE + 1, 2 * PAGE + 2] {
        d.put(i, 5);
    }
    let id = TestRepo::id_of(&t.backup(&d.path, &[]));
    let pages = page_ids(&object_line(&t, &id));
    // The last page: a restore that streamed ranges in order would have
    // written two pages' worth of disk before it.
    let victim = page_path(&t, &pages[2]);
    let saved = std::fs::read(&victim).unwrap();

    for damage in ["missing", "flipped"] {
        match damage {
            "missing" => std::fs::remove_file(&victim).unwrap(),
            _ => {
                std::fs::write(&victim, &saved).unwrap();
                flip_byte(&victim, 30);
            }
        }
        let target = t.path(&format!("restored-{damage}.img"));
        t.restore(&id, &target, &[])
            .expect_code(1)
            .stderr_mentions(&[&pages[2][..16]]);
        assert!(
            !target.exists(),
            "{damage} page: restore created its target before failing"
        );
        // To stdout too: not one byte.
        let r = t.restore(&id, Path::new("-"), &[]).expect_code(1);
        assert!(
            r.stdout.is_empty(),
            "{damage} page: bytes written to stdout"
        );
        let (r, report) = t.check(false);
        r.expect_code(3);
        let text = report["problems"].to_string();
        assert!(
            text.contains(&id) && text.contains(&pages[2]),
            "{damage} page: check names neither the snapshot nor the page: {report}"
        );
    }
    std::fs::write(&victim, &saved).unwrap();
    let h = d.hash();
    t.assert_restores(&id, h.0, h.1);
    t.check(true).0.ok();
}

/// Pages no object names (a forgotten snapshot's) go at the next prune;
/// the pages the remaining snapshots name stay.
#[test]
fn prune_removes_pages_no_snapshot_names() {
    let t = paged_repo(&[]);
    let d = Disk::new(&t, "disk.img");
    d.put(1, 6);
    d.put(PAGE + 1, 6);
    let full = TestRepo::id_of(&t.backup(&d.path, &[]));
    let full_hash = d.hash();
    let full_pages = page_ids(&object_line(&t, &full));
    d.put(2 * PAGE + 5, 7);
    let inc = TestRepo::id_of(&t.backup(&d.path, &[]));
    assert_eq!(t.files_under("manifests").len(), 3);

    t.run(&[&"forget", &inc]).ok();
    // forget alone removes no page.
    assert_eq!(t.files_under("manifests").len(), 3);
    let r = t.run(&[&"--json", &"prune"]).ok();
    assert_eq!(r.json()["manifest_pages_removed"], 1, "{}", r.out());
    let mut left = t.files_under("manifests");
    left.sort();
    let mut want = full_pages.clone();
    want.sort();
    assert_eq!(left, want);
    t.assert_restores(&full, full_hash.0, full_hash.1);
    t.check(true).0.ok();
    // A second prune finds nothing more.
    let r = t.run(&[&"--json", &"prune"]).ok();
    assert_eq!(r.json()["manifest_pages_removed"], 0);
}

/// forget of a middle incremental folds its pages into its child's: the
/// child then names the union of both ranges and restores exactly.
#[test]
fn forget_folds_a_paged_delta_into_its_child() {
    let t = paged_repo(&[]);
    let d = Disk::new(&t, "disk.img");
    d.put(0, 8);
    let full = TestRepo::id_of(&t.backup(&d.path, &[]));
    d.put(PAGE + 2, 9);
    d.put(2 * PAGE + 2, 9);
    let mid = TestRepo::id_of(&t.backup(&d.path, &[]));
    d.put(2 * PAGE + 3, 10);
    d.zero(0);
    let last = TestRepo::id_of(&t.backup(&d.path, &[]));
    let last_hash = d.hash();
    assert_eq!(page_nos(&object_line(&t, &last)), vec![0, 2]);

    t.run(&[&"forget", &mid]).ok();
    let head = object_line(&t, &last);
    assert_eq!(head["meta"]["parent"].as_str(), Some(full.as_str()));
    assert_eq!(page_nos(&head), vec![0, 1, 2]);
    t.assert_restores(&last, last_hash.0, last_hash.1);
    t.run(&[&"prune"]).ok();
    t.assert_restores(&last, last_hash.0, last_hash.1);
    t.check(true).0.ok();
}

/// Copy into an encrypted repository and back: pages translated to each
/// repository's ids, sealed in the encrypted one; every snapshot restores
/// bit for bit in both.
#[test]
fn copy_between_plain_and_encrypted_carries_pages() {
    let a = paged_repo(&[]);
    let d = Disk::new(&a, "disk.img");
    d.put(4, 11);
    d.put(2 * PAGE + 4, 11);
    let full = TestRepo::id_of(&a.backup(&d.path, &[]));
    let h0 = d.hash();
    d.put(PAGE + 4, 12);
    let inc = TestRepo::id_of(&a.backup(&d.path, &[]));
    let h1 = d.hash();

    let b = TestRepo::encrypted(&["--block-size", "512"]);
    let c = paged_repo(&[]);
    let copy = |from: &TestRepo, to: &TestRepo| {
        let env: Vec<(&str, &str)> = b
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run_in_env(
            a.root(),
            &[
                &"--json", &"copy", &"--from", &from.repo, &"--to", &to.repo, &"--all",
            ],
            &env,
        )
        .ok();
    };
    copy(&a, &b);
    assert_eq!(b.files_under("manifests").len(), 3);
    for page in b.files_under("manifests") {
        let bytes = std::fs::read(b.repo.join("manifests").join(&page)).unwrap();
        assert!(
            !bytes.windows(8).any(|w| w == b"CBTVPAGE"),
            "page {page} stored in the clear in an encrypted repository"
        );
        assert!(
            !a.files_under("manifests").contains(&page),
            "page {page}: an encrypted repository names pages by its own keyed ids"
        );
    }
    b.assert_restores(&full, h0.0, h0.1);
    b.assert_restores(&inc, h1.0, h1.1);
    b.check(true).0.ok();

    // Back into a new plain repository: the plain source's pages again,
    // byte for byte (plain ids recomputed).
    copy(&b, &c);
    c.assert_restores(&full, h0.0, h0.1);
    c.assert_restores(&inc, h1.0, h1.1);
    assert_eq!(c.files_under("manifests"), a.files_under("manifests"));
    c.check(true).0.ok();
}

/// A repository made before version 2 has no `manifests/` folder: the
/// first backup creates it.
#[test]
fn a_repository_without_a_manifests_folder_still_backs_up() {
    let t = paged_repo(&[]);
    std::fs::remove_dir(t.repo.join("manifests")).unwrap();
    let d = Disk::new(&t, "disk.img");
    d.put(PAGE + 3, 13);
    let id = TestRepo::id_of(&t.backup(&d.path, &[]));
    assert_eq!(t.files_under("manifests").len(), 1);
    let h = d.hash();
    t.assert_restores(&id, h.0, h.1);
}

/// `serve` over a paged chain: the NBD export's bytes and its map across
/// page boundaries, read by nbdcopy and nbdinfo.
#[test]
fn serve_reads_a_paged_chain_across_page_boundaries() {
    let t = paged_repo(&[]);
    let d = Disk::new(&t, "disk.img");
    let data = [0, PAGE - 1, PAGE, 2 * PAGE + 999];
    for i in data {
        d.put(i, 14);
    }
    t.backup(&d.path, &[]);
    d.put(PAGE + 1, 15);
    let id = TestRepo::id_of(&t.backup(&d.path, &[]));
    let sock = t.path("serve.sock");
    let s = crate::serve::serve(&t, &[&id, "--socket", sock.to_str().unwrap()]);
    let out = t.path("copy.raw");
    crate::serve::tool("nbdcopy", &[&s.uri, out.to_str().unwrap()]);
    assert_eq!(hash_file(&out), d.hash().0);

    let map = crate::serve::tool("nbdinfo", &["--map", &s.uri]);
    let mut extents = Vec::new();
    for line in map.lines() {
        let f: Vec<u64> = line
            .split_whitespace()
            .take(3)
            .map(|x| x.parse().unwrap())
            .collect();
        let (lo, hi, kind) = (f[0] / BS, (f[0] + f[1]) / BS, f[2]);
        match extents.last_mut() {
            // The server may split where its ranges end; adjacent extents
            // of one kind are one.
            Some((_, end, k)) if *end == lo && *k == kind => *end = hi,
            _ => extents.push((lo, hi, kind)),
        }
    }
    // Data exactly at the written blocks (neighbours merged), holes
    // between, one hole spanning from page 1 into page 2.
    let want: Vec<(u64, u64, u64)> = vec![
        (0, 1, 0),
        (1, PAGE - 1, 3),
        (PAGE - 1, PAGE + 2, 0),
        (PAGE + 2, 2 * PAGE + 999, 3),
        (2 * PAGE + 999, 2 * PAGE + 1000, 0),
    ];
    assert_eq!(extents, want, "map:\n{map}");
    assert_eq!(s.stop("TERM"), 0);
}
