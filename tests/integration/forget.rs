//! `forget` through the real binary: forgetting a middle snapshot, a base,
//! the newest one or several at once folds the forgotten deltas into the
//! kept children, and every kept snapshot restores exactly the bytes it
//! restored before (bit for bit, and `check --read-data` passes); the next
//! backup still layers on the newest kept snapshot; policies keep what
//! restic's rules keep, per source; `--dry-run` changes nothing; bad input
//! is refused before anything changes, naming what; forget and backup
//! exclude each other; a kill at each of forget's steps leaves a
//! repository that checks, restores, and finishes on a re-run.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::util::*;

const BLOCKS: u64 = 16;

/// A repository with `versions` backups of one image (a full, then
/// incrementals, each changing 3 of 16 blocks; the image grows by one
/// block at version `grow_at`, if given) and what each one holds.
struct Chain {
    t: TestRepo,
    img: Image,
    /// id -> (image hash, image length), in backup order.
    snaps: Vec<(String, blake3::Hash, u64)>,
}

fn chain_of(versions: u64, grow_at: Option<u64>) -> Chain {
    let t = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = Image::create(&t.path("disk.img"), BLOCKS * BS);
    for i in 0..BLOCKS {
        img.write_block(i, &random_block(1, i));
    }
    let mut c = Chain {
        t,
        img,
        snaps: Vec::new(),
    };
    for v in 0..versions {
        if grow_at == Some(v) {
            let n = c.img.blocks();
            c.img.set_len((n + 1) * BS);
            c.img.write_block(n, &random_block(77, v));
        }
        c.next(v);
    }
    c
}

impl Chain {
    /// Changes 3 blocks (none on the first version) and backs up.
    fn next(&mut self, v: u64) -> String {
        if v > 0 {
            for k in 0..3 {
                let i = (v * 5 + k * 3) % BLOCKS;
                self.img.write_block(i, &random_block(100 + v, i));
            }
        }
        let s = self.t.backup(&self.img.path, &[]);
        let id = TestRepo::id_of(&s);
        self.snaps
            .push((id.clone(), self.img.hash(), self.img.size()));
        id
    }

    fn id(&self, k: usize) -> String {
        self.snaps[k].0.clone()
    }

    fn forget(&self, args: &[&str]) -> Value {
        self.try_forget(args, &[]).ok().json()
    }

    fn try_forget(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--json", &"forget"];
        for a in args {
            all.push(a);
        }
        self.t.run_env(&all, env)
    }

    /// Drops the forgotten ids from `snaps`.
    fn drop_ids(&mut self, ids: &[String]) {
        self.snaps.retain(|(id, _, _)| !ids.contains(id));
    }

    /// Every kept snapshot restores bit for bit, the listing holds exactly
    /// them, and `check --read-data` passes.
    #[track_caller]
    fn assert_sound(&self) {
        let listed = self.t.snapshot_ids();
        let expected: Vec<String> = self.snaps.iter().map(|s| s.0.clone()).collect();
        assert_eq!(listed, expected, "the listed snapshots");
        for (id, h, len) in &self.snaps {
            self.t.assert_restores(id, *h, *len);
        }
        let (r, report) = self.t.check(true);
        assert_eq!(r.code, 0, "check --read-data: {report}\n{}", r.stderr);
    }

    /// [`Chain::assert_sound`], and `snapshots/` holds one object per
    /// kept snapshot: no older generation and nothing forgotten is left.
    #[track_caller]
    fn assert_sound_and_tidy(&self) {
        self.assert_sound();
        let objects = self.t.files_under("snapshots");
        assert_eq!(
            objects.len(),
            self.snaps.len(),
            "snapshot objects left: {objects:?}"
        );
    }

    /// The listing's entry of `id`.
    fn listed(&self, id: &str) -> Value {
        self.t
            .snapshots(&[])
            .into_iter()
            .find(|s| s["snapshot_id"] == id)
            .unwrap_or_else(|| panic!("snapshot {id} is not listed"))
    }
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|e| str_of(e, "snapshot_id").to_string())
        .collect()
}

#[test]
fn forgetting_a_middle_snapshot_folds_it_into_its_child() {
    let mut c = chain_of(5, None);
    let (gone, child) = (c.id(2), c.id(3));
    let report = c.forget(&[&gone[..10]]);
    assert_eq!(ids_of(&report["removed"]), vec![gone.clone()]);
    assert_eq!(ids_of(&report["rewritten"]), vec![child.clone()]);
    let rw = &report["rewritten"][0];
    assert_eq!(rw["old_parent_id"], gone.as_str());
    assert_eq!(rw["new_parent_id"], c.id(1).as_str());
    assert_eq!(u64_of(rw, "new_generation"), 1);
    assert_eq!(rw["became_full"], false);
    c.drop_ids(&[gone]);
    c.assert_sound_and_tidy();
    assert_eq!(c.listed(&child)["parent_id"], c.id(1).as_str());

    // The next backup still layers on the newest snapshot.
    let newest = c.id(3);
    let next = c.next(5);
    assert_eq!(c.listed(&next)["parent_id"], newest.as_str());
    c.assert_sound_and_tidy();
}

#[test]
fn forgetting_the_base_makes_the_next_snapshot_full() {
    let mut c = chain_of(4, None);
    let base = c.id(0);
    let report = c.forget(&[&base]);
    assert_eq!(report["rewritten"][0]["became_full"], true);
    c.drop_ids(&[base]);
    c.assert_sound_and_tidy();
    let first = c.listed(&c.id(0));
    assert_eq!(first["full"], true, "{first}");
    assert!(first["parent_id"].is_null(), "{first}");
}

#[test]
fn forgetting_the_newest_lets_the_next_backup_layer_on_the_one_before() {
    let mut c = chain_of(4, None);
    let newest = c.id(3);
    let report = c.forget(&[&newest]);
    assert!(ids_of(&report["rewritten"]).is_empty());
    c.drop_ids(&[newest]);
    c.assert_sound_and_tidy();
    let next = c.next(4);
    assert_eq!(c.listed(&next)["parent_id"], c.id(2).as_str());
    c.assert_sound_and_tidy();
}

#[test]
fn forgetting_several_at_once_across_a_resize_keeps_every_other_restore() {
    // The image grows at version 3; forget the base, two in the middle
    // (one on each side of the resize) and keep the rest.
    let mut c = chain_of(7, Some(3));
    let gone = vec![c.id(0), c.id(2), c.id(3), c.id(5)];
    let args: Vec<&str> = gone.iter().map(String::as_str).collect();
    let report = c.forget(&args);
    let mut removed = ids_of(&report["removed"]);
    removed.sort();
    let mut want = gone.clone();
    want.sort();
    assert_eq!(removed, want);
    c.drop_ids(&gone);
    c.assert_sound_and_tidy();
    // Forget everything but the newest: it becomes a full manifest.
    let rest: Vec<String> = c.snaps[..c.snaps.len() - 1]
        .iter()
        .map(|s| s.0.clone())
        .collect();
    let args: Vec<&str> = rest.iter().map(String::as_str).collect();
    c.forget(&args);
    c.drop_ids(&rest);
    c.assert_sound_and_tidy();
    assert_eq!(c.listed(&c.id(0))["full"], true);
}

#[test]
fn dry_run_changes_nothing_and_says_what_would_happen() {
    let c = chain_of(4, None);
    let before = c.t.files_under("snapshots");
    let report = c.forget(&["--dry-run", &c.id(1)]);
    assert_eq!(report["dry_run"], true);
    assert_eq!(ids_of(&report["removed"]), vec![c.id(1)]);
    assert_eq!(ids_of(&report["rewritten"]), vec![c.id(2)]);
    assert!(report["rewritten"][0]["object"].is_null());
    assert_eq!(c.t.files_under("snapshots"), before);
    c.assert_sound_and_tidy();
}

#[test]
fn bad_input_is_refused_before_anything_changes() {
    let c = chain_of(3, None);
    let before = c.t.files_under("snapshots");
    let unknown = "0123456789abcdef0123456789abcdef";
    c.try_forget(&[&c.id(0), unknown], &[])
        .expect_code(1)
        .stderr_mentions(&["no snapshot matches", unknown]);
    c.try_forget(&[], &[])
        .expect_code(1)
        .stderr_mentions(&["nothing to forget"]);
    c.try_forget(&[&c.id(0), "--keep-last", "1"], &[])
        .expect_code(1)
        .stderr_mentions(&["not both"]);
    c.try_forget(&["--keep-last", "x"], &[])
        .expect_code(1)
        .stderr_mentions(&["--keep-last"]);
    c.try_forget(&["--keep-within", "3q"], &[])
        .expect_code(1)
        .stderr_mentions(&["--keep-within"]);
    c.try_forget(&[&c.id(0), "--tag", "x"], &[])
        .expect_code(1)
        .stderr_mentions(&["--tag"]);
    assert_eq!(c.t.files_under("snapshots"), before);
    c.assert_sound_and_tidy();
}

#[test]
fn a_policy_keeps_each_sources_newest_and_the_tagged() {
    // Two disks, four backups each; the second backup of disk A is tagged.
    let t = TestRepo::init(&[]);
    let mut ids: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let imgs = [
        ("a", Image::create(&t.path("a.img"), 4 * BS)),
        ("b", Image::create(&t.path("b.img"), 4 * BS)),
    ];
    for v in 0..4u64 {
        for (name, img) in &imgs {
            img.write_block(v % 4, &random_block(v + 10, name.len() as u64 + v));
            let tag: &[&str] = if *name == "a" && v == 1 {
                &["--tag", "monthly"]
            } else {
                &[]
            };
            let s = t.backup(&img.path, tag);
            ids.entry(name).or_default().push(TestRepo::id_of(&s));
        }
    }
    let hashes: Vec<_> = ids
        .values()
        .flatten()
        .map(|id| (id.clone(), t.restored_hash(id)))
        .collect();

    let r = t
        .run(&[
            &"--json",
            &"forget",
            &"--keep-last",
            &"2",
            &"--keep-tag",
            &"monthly",
            &"--dry-run",
        ])
        .ok()
        .json();
    let groups = r["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "one group per source: {r}");
    for g in groups {
        let kept: Vec<&str> = g["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["keep"] == true)
            .map(|v| v["snapshot_id"].as_str().unwrap())
            .collect();
        let src = str_of(g, "group");
        let disk = if src.contains("a.img") { "a" } else { "b" };
        let mut want: Vec<&str> = vec![&ids[disk][2], &ids[disk][3]];
        if disk == "a" {
            want.insert(0, &ids[disk][1]);
        }
        assert_eq!(kept, want, "group {src}");
        for v in g["snapshots"].as_array().unwrap() {
            let reasons = v["reasons"].as_array().unwrap();
            assert_eq!(v["keep"] == true, !reasons.is_empty(), "{v}");
        }
    }
    assert_eq!(t.snapshot_ids().len(), 8, "the dry run removed something");

    t.run(&[&"forget", &"--keep-last", &"2", &"--keep-tag", &"monthly"])
        .ok();
    let left = t.snapshot_ids();
    assert_eq!(left.len(), 5, "{left:?}");
    for (id, (h, len)) in hashes.iter().filter(|(id, _)| left.contains(id)) {
        t.assert_restores(id, *h, *len);
    }
    let (r, report) = t.check(true);
    assert_eq!(r.code, 0, "{report}");

    // --source narrows the policy to one disk.
    let a = t.path("a.img");
    t.run(&[&"forget", &"--keep-last", &"1", &"--source", &a])
        .ok();
    let left = t.snapshot_ids();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(
        left.contains(&ids["a"][3]) && left.contains(&ids["b"][2]) && left.contains(&ids["b"][3])
    );
}

#[test]
fn forget_with_prune_leaves_no_unreferenced_data() {
    let c = chain_of(6, None);
    let packs_before = c.t.packs().len();
    let report = c.forget(&["--keep-last", "1", "--prune", "--max-unused", "0"]);
    assert_eq!(ids_of(&report["removed"]).len(), 5);
    let prune = &report["prune"];
    assert!(u64_of(prune, "reclaimed_bytes") > 0, "{prune}");
    let mut c = c;
    let keep = c.id(5);
    c.snaps.retain(|s| s.0 == keep);
    c.assert_sound_and_tidy();
    // A second prune finds nothing left to reclaim.
    let again =
        c.t.run(&[&"--json", &"prune", &"--dry-run", &"--max-unused", &"0"])
            .ok()
            .json();
    assert_eq!(u64_of(&again, "reclaimed_bytes"), 0, "{again}");
    assert!(c.t.packs().len() <= packs_before);
}

#[test]
fn forget_and_backup_exclude_each_other() {
    let c = chain_of(3, None);
    let mut backup = spawn(
        &c.t,
        &[&"backup", &c.img.path],
        &[("CBTVAULT_TEST_DELAY", "commit_snapshot:3000")],
    );
    wait_for_lock(&c.t, &mut backup);
    c.try_forget(&[&c.id(0)], &[])
        .expect_code(11)
        .stderr_mentions(&["locked by", "backup"]);
    let out = backup.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.t.snapshot_ids().len(), 4, "forget removed something");
}

#[test]
fn a_kill_at_each_step_of_forget_leaves_a_sound_repository() {
    for point in ["forget_rewrite", "forget_old_generation", "forget_remove"] {
        // Forget two snapshots with children, so that every step has
        // several passes; kill at the first pass of `point`.
        let mut c = chain_of(6, None);
        // An earlier fold leaves generation 1 of id(2); the killed run then
        // has an older generation to remove.
        c.forget(&[&c.id(1)]);
        c.drop_ids(&[c.id(1)]);
        let gone = [c.id(1), c.id(3)];
        let r = c.try_forget(
            &[&gone[0], &gone[1]],
            &[("CBTVAULT_TEST_KILL", &format!("{point}:1"))],
        );
        assert_ne!(r.code, 0, "{point}: the kill did not happen");
        // Whatever is listed restores as before; check passes.
        let listed = c.t.snapshot_ids();
        let still: Vec<String> = gone
            .iter()
            .filter(|id| listed.contains(id))
            .cloned()
            .collect();
        let went: Vec<String> = gone
            .iter()
            .filter(|id| !listed.contains(id))
            .cloned()
            .collect();
        c.drop_ids(&went);
        c.assert_sound();
        // A re-run finishes the job.
        if !still.is_empty() {
            let args: Vec<&str> = still.iter().map(String::as_str).collect();
            c.forget(&args);
            c.drop_ids(&still);
        }
        c.assert_sound_and_tidy();
        let next = c.next(9);
        assert_eq!(
            c.listed(&next)["parent_id"],
            c.snaps[c.snaps.len() - 2].0.as_str()
        );
    }
}

#[test]
fn forgetting_a_parent_and_its_child_removes_the_child_first() {
    // A kill after the first removal must not leave the child listed with
    // its parent gone. Pick a pair whose parent sorts before its child, so
    // that an order by id alone would remove the parent first.
    let mut c = chain_of(8, None);
    let k = (1..6)
        .find(|&k| c.id(k) < c.id(k + 1))
        .expect("a parent whose id sorts first");
    let (parent, child) = (c.id(k), c.id(k + 1));
    let r = c.try_forget(
        &[&parent, &child],
        &[("CBTVAULT_TEST_KILL", "forget_remove:1")],
    );
    assert_ne!(r.code, 0, "the kill did not happen");
    let listed = c.t.snapshot_ids();
    assert!(listed.contains(&parent), "the parent went first");
    assert!(!listed.contains(&child), "the child is still listed");
    c.drop_ids(std::slice::from_ref(&child));
    c.assert_sound();
    c.forget(&[&parent]);
    c.drop_ids(&[parent]);
    c.assert_sound_and_tidy();
}
