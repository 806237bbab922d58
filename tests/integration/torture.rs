//! The torture test of issue 22, in the style of Kopia's robustness tests:
//! a seeded random sequence of actions (full and incremental backups of
//! images the harness mutates, with `--changed-blocks` bitmaps; restores
//! compared bit for bit with an oracle; check, check --read-data, repair
//! index) interleaved with faults (SIGKILL at random moments, backend
//! faults injected with CBTVAULT_TEST_FAULTS, byte flips and deletions of
//! repository objects, two cbtvault processes at once), driving the real
//! binary. After every fault the invariant is checked: every committed
//! snapshot restores exactly its oracle bytes, or `check --read-data`
//! reports the repository damaged; never wrong bytes, never silence.
//!
//! A snapshot is committed when its backup exited 0 and printed its id. A
//! killed or failed backup may have committed too: the listing afterwards
//! tells, and such a snapshot must restore to the image as it was when
//! that backup ran.
//!
//! The power-loss mode (`power_loss_*`) drives the library in-process over
//! the durability model of `cbtvault::backend::powerloss`.
//!
//! Replay: the seed is printed first and in every failure;
//! CBTVAULT_TORTURE_SEED=N replays, CBTVAULT_TORTURE_STEPS=N sets the
//! length (bench/torture.sh runs long ones).
//!
//! Adding an action is one line in [`ACTIONS`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::util::*;

// ---------------------------------------------------------------- switches
//
// Checks of behaviour issue 22 asks for that the product does not have yet.
// Each is off until its fix lands; turn it on in the commit of the fix.

/// Issue 22 item 1: a restore that fails has written only correct bytes (a
/// prefix of the snapshot) to stdout. Off: the writer fills the rest with
/// zeros after the failure.
const CHECK_FAILED_RESTORE_WRITES_ONLY_CORRECT_BYTES: bool = true;
/// Issue 22 items 1 and 3: a restore to a file that failed or was killed
/// leaves nothing under the target's name. Off: it leaves a full-size file.
const CHECK_FAILED_RESTORE_LEAVES_NO_TARGET: bool = true;
/// Issue 22 item 2 / DESIGN.md invariant 10: after damage has been found
/// (check --read-data), a full backup of an image holding the damaged
/// block stores it again and restores. Off: it deduplicates against the
/// damaged block.
const CHECK_BACKUP_HEALS_DAMAGED_BLOCKS: bool = true;
/// Issue 22 item 4 (format-spec/03-snapshot.md#identity): two snapshot
/// objects with the same id and generation are reported as damaged and
/// neither is picked. Off: `check` passes and `restore` silently returns
/// one of them (wrong bytes), so the action that forges one is disabled.
const CHECK_DUPLICATE_SNAPSHOT_OBJECTS: bool = true;
/// Issue 22 item 7 (format-spec/01-layout.md): a repository copied without
/// its empty folders (`tmp/`, `locks/`, empty `data/XX/`) works. Off:
/// restore fails on the lock, backup on a missing `data/XX/`.
const CHECK_MISSING_EMPTY_FOLDERS: bool = true;
/// Found by this harness (seed 3, step 35): `repair index` (and any
/// catalog rebuild) that cannot read a pack because of an I/O error skips
/// it, marks the catalog complete and exits 0; every snapshot with blocks
/// in that pack then fails to restore ("not in any pack") until the next
/// successful `repair index`. Off: repair index runs with write faults only.
const REPAIR_INDEX_UNDER_READ_FAULTS: bool = true;
/// Put damaged objects back after the invariant was checked, so that the
/// run goes on over a healthy repository, for damage no repair command
/// remedies (a flipped or forged snapshot object), and for the share of
/// pack damage not given to the remedies (below).
const UNDO_DAMAGE_AFTER_CHECK: bool = true;
/// Share of damage to packs and deletions of snapshot objects remedied by
/// the product instead of undone: `repair packs` (blocks of a damaged pack
/// salvaged, the rest dropped), `repair snapshots` (children of a deleted
/// snapshot rewritten), then a full backup of the content of every
/// snapshot that still fails, which must store the lost blocks again and
/// heal it (issue 22 item 2).
const REMEDY_SHARE: f64 = 0.5;

/// The block size of the repository and of the change bitmaps.
const IMAGE_BLOCKS: [u64; 2] = [24, 16];
/// The second image ends in a partial block.
const PARTIAL_TAIL_BYTES: u64 = 1000;
/// Distinct block contents shared between images and snapshots (dedup).
const SHARED_POOL: u64 = 12;
/// Committed snapshots restored in one invariant check (besides new ones).
const RESTORES_PER_CHECK: usize = 4;
/// An invariant check restores every snapshot at least this many steps apart.
const FULL_CHECK_EVERY: usize = 60;

// ------------------------------------------------------------------ actions

type ActionFn = fn(&mut World) -> Result<(), String>;

/// One kind of step: a name (in the log), a relative weight (0 disables it)
/// and what it does. Adding an action (forget, prune, copy, repair packs...)
/// is one line here plus its function.
struct Action {
    name: &'static str,
    weight: u32,
    run: ActionFn,
}

#[rustfmt::skip]
const ACTIONS: &[Action] = &[
    Action { name: "mutate", weight: 12, run: World::mutate },
    Action { name: "backup-full", weight: 3, run: World::backup_full },
    Action { name: "backup-bitmap", weight: 8, run: World::backup_bitmap },
    Action { name: "backup-bitmap-older-parent", weight: 2, run: World::backup_bitmap_older_parent },
    Action { name: "backup-incremental-read-all", weight: 2, run: World::backup_read_all },
    Action { name: "restore-file", weight: 5, run: World::restore_file },
    Action { name: "restore-stdout", weight: 2, run: World::restore_stdout },
    Action { name: "check", weight: 2, run: World::check_structure },
    Action { name: "check-read-data", weight: 1, run: World::check_read_data },
    Action { name: "repair-index", weight: 1, run: World::repair_index },
    Action { name: "delete-catalog", weight: 1, run: World::delete_catalog },
    Action { name: "fault-kill-backup", weight: 4, run: World::kill_backup },
    Action { name: "fault-kill-restore", weight: 1, run: World::kill_restore },
    Action { name: "fault-kill-repair-index", weight: 1, run: World::kill_repair_index },
    Action { name: "fault-backend-backup", weight: 4, run: World::faulty_backup },
    Action { name: "fault-backend-restore", weight: 2, run: World::faulty_restore },
    Action { name: "fault-backend-check", weight: 1, run: World::faulty_check },
    Action { name: "fault-backend-repair-index", weight: 1, run: World::faulty_repair_index },
    Action { name: "fault-flip-pack-byte", weight: 1, run: World::flip_pack_byte },
    Action { name: "fault-flip-snapshot-byte", weight: 1, run: World::flip_snapshot_byte },
    Action { name: "fault-delete-pack", weight: 1, run: World::delete_pack },
    Action { name: "fault-delete-snapshot", weight: 1, run: World::delete_snapshot },
    Action { name: "fault-concurrent", weight: 2, run: World::concurrent },
    Action { name: "fault-duplicate-snapshot-object", weight: if CHECK_DUPLICATE_SNAPSHOT_OBJECTS { 1 } else { 0 }, run: World::duplicate_snapshot_object },
    Action { name: "remove-empty-folders", weight: if CHECK_MISSING_EMPTY_FOLDERS { 1 } else { 0 }, run: World::remove_empty_folders },
    Action { name: "heal-damaged-block", weight: if CHECK_BACKUP_HEALS_DAMAGED_BLOCKS { 1 } else { 0 }, run: World::heal_damaged_block },
    Action { name: "repair-packs", weight: 1, run: World::repair_packs },
    Action { name: "repair-packs-unreferenced", weight: 1, run: World::repair_packs_unreferenced },
    Action { name: "repair-snapshots", weight: 1, run: World::repair_snapshots },
    Action { name: "repair-tmp", weight: 1, run: World::repair_tmp },
    Action { name: "no-lock-beside-backup", weight: 2, run: World::no_lock_beside_backup },
    Action { name: "forget-ids", weight: 2, run: World::forget_ids },
    Action { name: "forget-policy", weight: 1, run: World::forget_policy },
    Action { name: "prune", weight: 2, run: World::prune },
    Action { name: "fault-kill-forget", weight: 1, run: World::kill_forget },
    Action { name: "fault-kill-prune", weight: 1, run: World::kill_prune },
    Action { name: "fault-prune-beside-backup", weight: 1, run: World::prune_beside_backup },
];

// ------------------------------------------------------------------- oracle

/// The bytes an image had at one moment, as block hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    len: u64,
    hash: blake3::Hash,
    blocks: Vec<blake3::Hash>,
}

impl State {
    fn of(bytes: &[u8]) -> State {
        State {
            len: bytes.len() as u64,
            hash: blake3::hash(bytes),
            blocks: bytes.chunks(BSU).map(blake3::hash).collect(),
        }
    }

    /// Blocks whose content differs from `other` (same size).
    fn differs(&self, other: &State) -> Vec<u64> {
        (0..self.blocks.len())
            .filter(|&i| other.blocks.get(i) != Some(&self.blocks[i]))
            .map(|i| i as u64)
            .collect()
    }

    /// Whether the whole blocks of `bytes` are those this state starts with
    /// (a partial last block is not compared: only hashes are kept).
    fn has_prefix(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 <= self.len
            && bytes
                .chunks(BSU)
                .enumerate()
                .all(|(i, c)| c.len() < BSU || self.blocks[i] == blake3::hash(c))
    }
}

/// A snapshot the harness knows.
#[derive(Debug, Clone)]
struct Known {
    disk: usize,
    state: State,
    /// Learned from a listing after a backup that was killed or failed.
    learned: bool,
}

struct Disk {
    path: PathBuf,
    source: String,
    bytes: Vec<u8>,
}

/// A damaged object, with what undoes the damage.
enum Damage {
    Flipped { path: PathBuf, offset: u64, old: u8 },
    Moved { path: PathBuf, aside: PathBuf },
    Created { path: PathBuf },
}

struct World {
    t: TestRepo,
    /// An encrypted repository (its catalog lives in the test's cache).
    encrypted: bool,
    seed: u64,
    rng: StdRng,
    step: usize,
    disks: Vec<Disk>,
    known: BTreeMap<String, Known>,
    /// Image states of backups whose outcome is not known yet.
    attempts: Vec<(usize, State)>,
    damage: Vec<Damage>,
    /// Every block content the images ever held, by hash: rebuilds the
    /// bytes of any snapshot from its oracle state, to heal it.
    contents: std::collections::HashMap<blake3::Hash, Vec<u8>>,
    fresh: u64,
    /// The step of the last invariant check that restored every snapshot.
    last_full: usize,
    log: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
}

fn args_of<'a>(v: &'a [&'a str]) -> Vec<&'a dyn AsRef<OsStr>> {
    v.iter().map(|s| s as &dyn AsRef<OsStr>).collect()
}

impl World {
    fn new(seed: u64, encrypted: bool) -> World {
        let t = if encrypted {
            TestRepo::encrypted(&["--pack-size-mib", "1"])
        } else {
            TestRepo::init(&["--pack-size-mib", "1"])
        };
        let mut disks = Vec::new();
        for (k, &blocks) in IMAGE_BLOCKS.iter().enumerate() {
            let size = blocks * BS - if k == 1 { PARTIAL_TAIL_BYTES } else { 0 };
            let path = t.path(&format!("disk{k}.img"));
            let img = Image::create(&path, size);
            drop(img);
            let abs = std::fs::canonicalize(&path).unwrap();
            disks.push(Disk {
                path,
                source: format!("file:{}", abs.display()),
                bytes: vec![0u8; size as usize],
            });
        }
        // The image the healing backups are taken of (not mutated, not
        // backed up at random; its content is set per heal).
        let path = t.path("heal.img");
        std::fs::write(&path, b"").unwrap();
        let abs = std::fs::canonicalize(&path).unwrap();
        disks.push(Disk {
            path,
            source: format!("file:{}", abs.display()),
            bytes: Vec::new(),
        });
        World {
            t,
            encrypted,
            seed,
            rng: StdRng::seed_from_u64(seed),
            step: 0,
            disks,
            known: BTreeMap::new(),
            attempts: Vec::new(),
            damage: Vec::new(),
            contents: std::collections::HashMap::new(),
            fresh: 0,
            last_full: 0,
            log: Vec::new(),
            counts: BTreeMap::new(),
        }
    }

    fn note(&mut self, text: String) {
        if std::env::var_os("CBTVAULT_TORTURE_VERBOSE").is_some() {
            eprintln!("torture: step {}: {text}", self.step);
        }
        self.log.push(format!("step {}: {text}", self.step));
        if self.log.len() > 40 {
            self.log.remove(0);
        }
    }

    /// A failure message with everything needed to replay it.
    fn failure(&self, what: &str) -> String {
        format!(
            "torture failure at step {} (seed {}; replay with CBTVAULT_TORTURE_SEED={} \
             CBTVAULT_TORTURE_STEPS={}): {what}\nrecent steps:\n  {}",
            self.step,
            self.seed,
            self.seed,
            self.step + 1,
            self.log.join("\n  ")
        )
    }

    fn run(&self, args: &[&str]) -> Run {
        self.t.run(&args_of(args))
    }

    fn run_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        self.t.run_env(&args_of(args), envs)
    }

    /// A command's exit that is never acceptable: a panic or a signal.
    fn sane(&self, r: &Run) -> Result<(), String> {
        if r.code == 101 || r.stderr.contains("panicked at") || r.code < 0 {
            return Err(format!(
                "{} crashed (exit {}): {}",
                r.command, r.code, r.stderr
            ));
        }
        Ok(())
    }

    fn fault_spec(&mut self, kinds: &str) -> String {
        let rate = [0.01, 0.03, 0.1][self.rng.gen_range(0..3)];
        format!("{}:{rate}:{kinds}", self.rng.gen::<u32>())
    }

    fn random_kinds(&mut self) -> &'static str {
        ["eio", "enospc", "short", "fsync", "eio,enospc,short,fsync"][self.rng.gen_range(0..5)]
    }

    // --------------------------------------------------------- images

    fn mutate(&mut self) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let blocks = self.disks[d].bytes.len().div_ceil(BSU) as u64;
        let n = self.rng.gen_range(1..=4);
        let mut what = Vec::new();
        for _ in 0..n {
            let b = self.rng.gen_range(0..blocks);
            let (data, kind) = match self.rng.gen_range(0..10) {
                0..=3 => {
                    self.fresh += 1;
                    (random_block(self.seed, 1_000_000 + self.fresh), "new")
                }
                4..=6 => (
                    random_block(self.seed, self.rng.gen_range(0..SHARED_POOL)),
                    "shared",
                ),
                7 => (zero_block(), "zero"),
                _ => {
                    self.fresh += 1;
                    (text_block(self.seed, self.fresh), "text")
                }
            };
            let start = (b * BS) as usize;
            let end = (start + BSU).min(self.disks[d].bytes.len());
            self.disks[d].bytes[start..end].copy_from_slice(&data[..end - start]);
            what.push(format!("{b}:{kind}"));
        }
        std::fs::write(&self.disks[d].path, &self.disks[d].bytes).map_err(|e| e.to_string())?;
        self.remember(d);
        self.note(format!("mutate disk{d} blocks {}", what.join(" ")));
        Ok(())
    }

    /// Keeps every block of disk `d` as it is now (see `contents`).
    fn remember(&mut self, d: usize) {
        for c in self.disks[d].bytes.chunks(BSU) {
            self.contents
                .entry(blake3::hash(c))
                .or_insert_with(|| c.to_vec());
        }
    }

    fn state(&self, d: usize) -> State {
        State::of(&self.disks[d].bytes)
    }

    // -------------------------------------------------------- backups

    /// Live snapshots of disk `d` as listed, oldest first.
    fn listed_of(&self, d: usize) -> Result<Vec<String>, String> {
        let r = self.run(&[
            "--json",
            "snapshots",
            "--source",
            &self.disks[d].source.clone(),
        ]);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!(
                "snapshots failed in a healthy repository: {}",
                r.stderr
            ));
        }
        Ok(r.items("snapshot")
            .iter()
            .map(|s| s["snapshot_id"].as_str().unwrap().to_string())
            .collect())
    }

    /// Arguments of a backup of disk `d` by `how`, and the parent expected.
    fn backup_args(
        &mut self,
        d: usize,
        how: &str,
    ) -> Result<(Vec<String>, Option<String>), String> {
        let image = self.disks[d].path.display().to_string();
        let mut args = vec!["--json".to_string(), "backup".into(), image];
        let listed = self.listed_of(d)?;
        let parent = match how {
            "full" => None,
            "older" if listed.len() >= 2 => {
                let p = listed[self.rng.gen_range(0..listed.len() - 1)].clone();
                args.extend(["--parent".into(), p.clone()]);
                Some(p)
            }
            _ => listed.last().cloned(),
        };
        if how == "full" || parent.is_none() {
            args.push("--full".into());
            return Ok((args, None));
        }
        let parent = parent.unwrap();
        let Some(p) = self.known.get(&parent) else {
            return Err(format!(
                "listed snapshot {parent} is unknown to the harness"
            ));
        };
        if how != "read-all" {
            let now = self.state(d);
            let mut marked: BTreeSet<u64> = now.differs(&p.state).into_iter().collect();
            // Unchanged blocks marked too: the bitmap may say more.
            for _ in 0..self.rng.gen_range(0..3) {
                marked.insert(self.rng.gen_range(0..now.blocks.len() as u64));
            }
            let marked: Vec<u64> = marked.into_iter().collect();
            let file = self.t.path(&format!(
                "bitmap-{}-{}.b64",
                self.step,
                self.rng.gen::<u32>()
            ));
            write_bitmap(&file, &bitmap_base64(now.len, &marked));
            args.extend(["--changed-blocks".into(), file.display().to_string()]);
        }
        Ok((args, Some(parent)))
    }

    /// Records the outcome of a backup that ran to its end (no kill).
    fn backup_outcome(
        &mut self,
        d: usize,
        state: State,
        r: &Run,
        parent: Option<&str>,
        healthy: bool,
    ) -> Result<(), String> {
        self.sane(r)?;
        if r.code == 0 {
            let v = r.json();
            let id = v["snapshot_id"]
                .as_str()
                .ok_or_else(|| format!("backup exited 0 without an id: {}", r.out()))?
                .to_string();
            if v["parent_id"].as_str() != parent {
                return Err(format!(
                    "backup {id} of disk{d}: parent {:?} where {parent:?} was expected",
                    v["parent_id"]
                ));
            }
            self.note(format!("backup disk{d} committed {id} (parent {parent:?})"));
            self.known.insert(
                id,
                Known {
                    disk: d,
                    state,
                    learned: false,
                },
            );
            Ok(())
        } else if healthy {
            Err(format!(
                "{} failed in a healthy repository: {}",
                r.command, r.stderr
            ))
        } else {
            self.note(format!("backup disk{d} failed: {}", first_line(&r.stderr)));
            self.attempts.push((d, state));
            Ok(())
        }
    }

    fn backup_by(&mut self, how: &str) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let (args, parent) = self.backup_args(d, how)?;
        let state = self.state(d);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = self.run(&a);
        self.backup_outcome(d, state, &r, parent.as_deref(), true)
    }

    fn backup_full(&mut self) -> Result<(), String> {
        self.backup_by("full")
    }

    fn backup_bitmap(&mut self) -> Result<(), String> {
        self.backup_by("bitmap")
    }

    fn backup_bitmap_older_parent(&mut self) -> Result<(), String> {
        self.backup_by("older")
    }

    fn backup_read_all(&mut self) -> Result<(), String> {
        self.backup_by("read-all")
    }

    // ------------------------------------------------------- restores

    fn pick_known(&mut self) -> Option<String> {
        if self.known.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.known.len());
        self.known.keys().nth(i).cloned()
    }

    /// Restores `id` to a new file: Ok(true) when it restored exactly,
    /// Ok(false) when the restore failed (and left no wrong bytes where
    /// that is checked), Err on wrong bytes.
    fn restore_to_file(&self, id: &str, envs: &[(&str, &str)]) -> Result<bool, String> {
        let k = &self.known[id];
        let target = self.t.path(&format!("restore-{}-{id}.img", self.step));
        let tshown = target.display().to_string();
        let r = self.run_env(&["restore", id, "--target", &tshown], envs);
        self.sane(&r)?;
        let outcome = if r.code == 0 {
            let got = std::fs::read(&target).map_err(|e| format!("restored file: {e}"))?;
            if State::of(&got) != k.state {
                return Err(format!(
                    "snapshot {id} (disk{}) restored with exit 0 to WRONG bytes ({} bytes, \
                     expected {})",
                    k.disk,
                    got.len(),
                    k.state.len
                ));
            }
            true
        } else {
            if CHECK_FAILED_RESTORE_LEAVES_NO_TARGET {
                if target.exists() {
                    return Err(format!(
                        "failed restore of {id} left '{tshown}' under the target's name"
                    ));
                }
                // A restore that ended (not killed) removes its temporary file.
                let left = self.partials_of(&target);
                if !left.is_empty() {
                    return Err(format!(
                        "failed restore of {id} left its temporary file(s) {left:?}"
                    ));
                }
            }
            false
        };
        let _ = std::fs::remove_file(&target);
        Ok(outcome)
    }

    /// Temporary files of a restore to `target` (`.NAME.cbtvault-partial-PID`).
    fn partials_of(&self, target: &std::path::Path) -> Vec<PathBuf> {
        let name = target.file_name().unwrap().to_string_lossy();
        let prefix = format!(".{name}{}", cbtvault::target::file::PARTIAL_MARK);
        std::fs::read_dir(target.parent().unwrap())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    }

    fn restore_stdout_of(&self, id: &str, envs: &[(&str, &str)]) -> Result<bool, String> {
        let k = &self.known[id];
        let r = self.run_env(&["restore", id, "--target", "-"], envs);
        self.sane(&r)?;
        if r.code == 0 {
            if State::of(&r.stdout) != k.state {
                return Err(format!(
                    "snapshot {id} restored to stdout with exit 0 to WRONG bytes ({} bytes)",
                    r.stdout.len()
                ));
            }
            return Ok(true);
        }
        if CHECK_FAILED_RESTORE_WRITES_ONLY_CORRECT_BYTES && !k.state.has_prefix(&r.stdout) {
            return Err(format!(
                "failed restore of {id} to stdout wrote bytes that are not the snapshot's \
                 ({} bytes)",
                r.stdout.len()
            ));
        }
        Ok(false)
    }

    fn restore_file(&mut self) -> Result<(), String> {
        let Some(id) = self.pick_known() else {
            return Ok(());
        };
        if !self.restore_to_file(&id, &[])? {
            return Err(format!("restore of {id} failed in a healthy repository"));
        }
        self.note(format!("restore {id} to a file: exact"));
        Ok(())
    }

    fn restore_stdout(&mut self) -> Result<(), String> {
        let Some(id) = self.pick_known() else {
            return Ok(());
        };
        if !self.restore_stdout_of(&id, &[])? {
            return Err(format!(
                "restore of {id} to stdout failed in a healthy repository"
            ));
        }
        self.note(format!("restore {id} to stdout: exact"));
        Ok(())
    }

    // ------------------------------------------------- check, repair

    /// `check [--read-data] --json`: exit code and the damaged snapshot ids.
    fn check(
        &self,
        read_data: bool,
        envs: &[(&str, &str)],
    ) -> Result<(i32, BTreeSet<String>, String), String> {
        let args: &[&str] = if read_data {
            &["--json", "check", "--read-data"]
        } else {
            &["--json", "check"]
        };
        let r = self.run_env(args, envs);
        self.sane(&r)?;
        let mut affected = BTreeSet::new();
        let last = String::from_utf8_lossy(&r.stdout)
            .lines()
            .last()
            .map(str::to_string)
            .unwrap_or_default();
        if let Ok(v) = serde_json::from_str::<Value>(&last) {
            for a in v["affected_snapshots"].as_array().into_iter().flatten() {
                if let Some(id) = a["snapshot_id"].as_str() {
                    affected.insert(id.to_string());
                }
            }
        }
        Ok((r.code, affected, r.stderr))
    }

    fn check_structure(&mut self) -> Result<(), String> {
        let (code, _, err) = self.check(false, &[])?;
        if code != 0 {
            return Err(format!("check failed in a healthy repository: {err}"));
        }
        self.note("check: clean".into());
        Ok(())
    }

    fn check_read_data(&mut self) -> Result<(), String> {
        let (code, _, err) = self.check(true, &[])?;
        if code != 0 {
            return Err(format!(
                "check --read-data failed in a healthy repository: {err}"
            ));
        }
        self.note("check --read-data: clean".into());
        Ok(())
    }

    fn repair_index(&mut self) -> Result<(), String> {
        let r = self.run(&["--json", "repair", "index"]);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!(
                "repair index failed in a healthy repository: {}",
                r.stderr
            ));
        }
        self.note("repair index: ok".into());
        Ok(())
    }

    fn delete_catalog(&mut self) -> Result<(), String> {
        if self.encrypted {
            let _ = std::fs::remove_dir_all(self.t.path("cache"));
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(self.t.repo.join(format!("catalog.sqlite{suffix}")));
        }
        self.note("deleted the catalog".into());
        self.verify("after deleting the catalog", false)
    }

    // ----------------------------------------------------- the invariant

    /// The invariant (module comment). `damaged`: objects were damaged on
    /// purpose, so restores may fail, but then `check --read-data` must say
    /// so. Without damage every snapshot must restore and check be clean.
    fn verify(&mut self, context: &str, damaged: bool) -> Result<(), String> {
        let r = self.run(&["--json", "snapshots"]);
        self.sane(&r)?;
        if r.code != 0 {
            if damaged {
                // Listing may fail on a damaged repository; check must not pass.
                let (code, _, _) = self.check(true, &[])?;
                if code == 0 {
                    return Err(format!(
                        "{context}: snapshots fails ({}) but check passes",
                        r.stderr
                    ));
                }
                return Ok(());
            }
            return Err(format!("{context}: snapshots failed: {}", r.stderr));
        }
        let listed: Vec<(String, String)> = r
            .items("snapshot")
            .iter()
            .map(|s| {
                (
                    s["snapshot_id"].as_str().unwrap().to_string(),
                    s["source"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let listed_ids: BTreeSet<String> = listed.iter().map(|l| l.0.clone()).collect();
        // Snapshots the harness does not know: from killed or failed
        // backups; each must be the image of one of those attempts.
        let mut to_restore: Vec<String> = Vec::new();
        for (id, source) in &listed {
            if self.known.contains_key(id) {
                continue;
            }
            let Some(d) = self.disks.iter().position(|x| &x.source == source) else {
                return Err(format!(
                    "{context}: snapshot {id} of unknown source {source}"
                ));
            };
            let target = self.t.path(&format!("learn-{id}.img"));
            let r = self.run(&["restore", id, "--target", &target.display().to_string()]);
            self.sane(&r)?;
            if r.code != 0 {
                let _ = std::fs::remove_file(&target);
                if damaged {
                    continue;
                }
                return Err(format!(
                    "{context}: snapshot {id} left by a failed backup does not restore: {}",
                    r.stderr
                ));
            }
            let got = State::of(&std::fs::read(&target).unwrap());
            let _ = std::fs::remove_file(&target);
            if !self.attempts.iter().any(|(ad, s)| *ad == d && *s == got) {
                return Err(format!(
                    "{context}: snapshot {id} of disk{d} (from a failed backup) restores to \
                     bytes of no image state that backup could have read"
                ));
            }
            self.note(format!("learned {id} (disk{d}) from a failed backup"));
            self.known.insert(
                id.clone(),
                Known {
                    disk: d,
                    state: got,
                    learned: true,
                },
            );
        }
        // Committed snapshots never vanish (unless deleted on purpose).
        if !damaged {
            for id in self.known.keys() {
                if !listed_ids.contains(id) {
                    return Err(format!(
                        "{context}: committed snapshot {id} is not listed any more"
                    ));
                }
            }
            self.attempts.clear();
        }
        // Restore a sample (every one now and then).
        let mut ids: Vec<String> = self.known.keys().cloned().collect();
        let full = damaged || self.step >= self.last_full + FULL_CHECK_EVERY;
        if full {
            self.last_full = self.step;
        }
        if !full {
            rand::seq::SliceRandom::shuffle(&mut ids[..], &mut self.rng);
            ids.truncate(RESTORES_PER_CHECK);
        }
        to_restore.extend(ids);
        let mut failed = Vec::new();
        for id in &to_restore {
            if !listed_ids.contains(id) {
                // Deleted on purpose: its children must fail or restore.
                continue;
            }
            let exact = if self.rng.gen_bool(0.3) {
                self.restore_stdout_of(id, &[])?
            } else {
                self.restore_to_file(id, &[])?
            };
            if !exact {
                failed.push(id.clone());
            }
        }
        if !failed.is_empty() && !damaged {
            return Err(format!(
                "{context}: snapshots {failed:?} do not restore though nothing was damaged"
            ));
        }
        let (code, affected, err) = self.check(true, &[])?;
        if !damaged && code != 0 {
            return Err(format!("{context}: check --read-data is not clean: {err}"));
        }
        if !failed.is_empty() {
            if code == 0 {
                return Err(format!(
                    "{context}: snapshots {failed:?} fail to restore but check --read-data \
                     exits 0 (silence)"
                ));
            }
            let unnamed: Vec<&String> = failed.iter().filter(|f| !affected.contains(*f)).collect();
            if !unnamed.is_empty() {
                return Err(format!(
                    "{context}: snapshots {unnamed:?} fail to restore but check --read-data \
                     does not name them as damaged (it names {affected:?}): {err}"
                ));
            }
        }
        self.note(format!(
            "verified {context}: {} listed, {} restored, {} failed, check exit {code}",
            listed_ids.len(),
            to_restore.len(),
            failed.len()
        ));
        Ok(())
    }

    // ----------------------------------------------------- process faults

    fn spawn(&self, args: &[String], envs: &[(&str, &str)]) -> std::process::Child {
        Command::new(bin())
            .arg("-r")
            .arg(&self.t.repo)
            .args(args)
            .envs(self.t.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(envs.iter().copied())
            .current_dir(self.t.root())
            .env_remove("CBTVAULT_REPOSITORY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cbtvault")
    }

    /// Kills `child` after `delay` (unless it ended first); its run.
    fn kill_after(child: std::process::Child, delay: Duration, shown: String) -> (Run, bool) {
        let mut child = child;
        let started = Instant::now();
        while started.elapsed() < delay {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let out = child.wait_with_output().expect("reap cbtvault");
        (
            Run {
                command: shown,
                code: out.status.code().unwrap_or(-9),
                stdout: out.stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            },
            killed,
        )
    }

    fn kill_backup(&mut self) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let how = ["full", "bitmap", "read-all"][self.rng.gen_range(0..3)];
        let (args, parent) = self.backup_args(d, how)?;
        let state = self.state(d);
        let delay = Duration::from_millis(self.rng.gen_range(0..250));
        let child = self.spawn(&args, &[]);
        let (r, killed) = World::kill_after(child, delay, format!("backup {args:?}"));
        if killed {
            self.note(format!("backup disk{d} ({how}) killed after {delay:?}"));
            self.attempts.push((d, state));
        } else {
            self.backup_outcome(d, state, &r, parent.as_deref(), true)?;
        }
        self.verify("after a killed backup", false)
    }

    fn kill_restore(&mut self) -> Result<(), String> {
        let Some(id) = self.pick_known() else {
            return Ok(());
        };
        let target = self.t.path(&format!("killed-restore-{}.img", self.step));
        let args = vec![
            "restore".to_string(),
            id.clone(),
            "--target".into(),
            target.display().to_string(),
        ];
        let delay = Duration::from_millis(self.rng.gen_range(0..120));
        let child = self.spawn(&args, &[]);
        let (r, killed) = World::kill_after(child, delay, format!("restore {id}"));
        if !killed {
            self.sane(&r)?;
            if r.code != 0 {
                return Err(format!("restore of {id} failed: {}", r.stderr));
            }
            let got = State::of(&std::fs::read(&target).unwrap());
            if got != self.known[&id].state {
                return Err(format!("restore of {id} exited 0 with WRONG bytes"));
            }
        } else if CHECK_FAILED_RESTORE_LEAVES_NO_TARGET && target.exists() {
            // The kill may land after the rename that ends a restore: a
            // file under the final name must then be the whole snapshot.
            let got = State::of(&std::fs::read(&target).unwrap());
            if got != self.known[&id].state {
                return Err(format!(
                    "restore of {id} killed after {delay:?} (exit {}) left '{}' under the                      target's name with bytes that are not the snapshot's",
                    r.code,
                    target.display()
                ));
            }
        }
        // A killed restore may leave its temporary file (documented:
        // `.NAME.cbtvault-partial-PID`, never the final name); that is all
        // it may leave.
        for p in self.partials_of(&target) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(&target);
        self.note(format!(
            "restore {id} killed after {delay:?} (killed: {killed})"
        ));
        Ok(())
    }

    fn kill_repair_index(&mut self) -> Result<(), String> {
        let delay = Duration::from_millis(self.rng.gen_range(0..150));
        let child = self.spawn(&["repair".into(), "index".into()], &[]);
        let (r, killed) = World::kill_after(child, delay, "repair index".into());
        if !killed {
            self.sane(&r)?;
        }
        self.note(format!(
            "repair index killed after {delay:?} (killed: {killed})"
        ));
        self.verify("after a killed repair index", false)
    }

    // ----------------------------------------------------- backend faults

    fn faulty_backup(&mut self) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let how = ["full", "bitmap", "read-all"][self.rng.gen_range(0..3)];
        let (args, parent) = self.backup_args(d, how)?;
        let kinds = self.random_kinds();
        let spec = self.fault_spec(kinds);
        let state = self.state(d);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = self.run_env(&a, &[("CBTVAULT_TEST_FAULTS", &spec)]);
        self.note(format!(
            "backup disk{d} ({how}) with faults {spec}: exit {}",
            r.code
        ));
        self.backup_outcome(d, state, &r, parent.as_deref(), false)?;
        self.verify("after a backup with backend faults", false)
    }

    fn faulty_restore(&mut self) -> Result<(), String> {
        let Some(id) = self.pick_known() else {
            return Ok(());
        };
        let kinds = self.random_kinds();
        let spec = self.fault_spec(kinds);
        let envs = [("CBTVAULT_TEST_FAULTS", spec.as_str())];
        let exact = if self.rng.gen_bool(0.5) {
            self.restore_stdout_of(&id, &envs)?
        } else {
            self.restore_to_file(&id, &envs)?
        };
        self.note(format!("restore {id} with faults {spec}: exact {exact}"));
        Ok(())
    }

    fn faulty_check(&mut self) -> Result<(), String> {
        let spec = self.fault_spec("eio");
        let read_data = self.rng.gen_bool(0.5);
        let (code, _, _) = self.check(read_data, &[("CBTVAULT_TEST_FAULTS", &spec)])?;
        self.note(format!("check with faults {spec}: exit {code}"));
        self.verify("after a check with backend faults", false)
    }

    fn faulty_repair_index(&mut self) -> Result<(), String> {
        let kinds = if REPAIR_INDEX_UNDER_READ_FAULTS {
            self.random_kinds()
        } else {
            "enospc,short,fsync"
        };
        let spec = self.fault_spec(kinds);
        let r = self.run_env(&["repair", "index"], &[("CBTVAULT_TEST_FAULTS", &spec)]);
        self.sane(&r)?;
        self.note(format!("repair index with faults {spec}: exit {}", r.code));
        if r.code != 0 {
            // A failed rebuild may leave an incomplete catalog: the next
            // command must notice and rebuild, or repair index again.
            self.repair_index()?;
        }
        self.verify("after a repair index with backend faults", false)
    }

    // ------------------------------------------------ damaged objects

    fn files(&self, sub: &str) -> Vec<PathBuf> {
        self.t
            .files_under(sub)
            .into_iter()
            .map(|n| self.t.repo.join(sub).join(n))
            .collect()
    }

    fn pick_file(&mut self, sub: &str) -> Option<PathBuf> {
        let files = self.files(sub);
        if files.is_empty() {
            return None;
        }
        Some(files[self.rng.gen_range(0..files.len())].clone())
    }

    /// Checks the invariant over the damage, then remedies it with the
    /// repair commands (a share of pack damage and snapshot deletions) or
    /// undoes it (when so set).
    fn after_damage(&mut self, what: String) -> Result<(), String> {
        self.note(what.clone());
        self.verify(&format!("after {what}"), true)?;
        let remediable = !self.damage.is_empty()
            && self.damage.iter().all(|d| match d {
                Damage::Flipped { path, .. } => path.starts_with(self.t.repo.join("data")),
                Damage::Moved { .. } => true,
                Damage::Created { .. } => false,
            });
        if remediable && self.rng.gen_bool(REMEDY_SHARE) {
            return self.remedy(&what);
        }
        if UNDO_DAMAGE_AFTER_CHECK {
            for d in self.damage.drain(..).rev() {
                match d {
                    Damage::Flipped { path, offset, old } => {
                        use std::os::unix::fs::FileExt;
                        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                        f.write_all_at(&[old], offset).unwrap();
                    }
                    Damage::Moved { path, aside } => std::fs::rename(aside, path).unwrap(),
                    Damage::Created { path } => std::fs::remove_file(path).unwrap(),
                }
            }
            self.note("damage undone".into());
            self.verify("after the damage was undone", false)?;
        }
        Ok(())
    }

    /// The product's remedies for the damage just checked: `repair packs`
    /// for damaged packs, `repair snapshots` for children of a deleted
    /// snapshot; every snapshot that still fails must be named by check
    /// (never wrong bytes, never silence), and is then healed by a full
    /// backup of its content, which stores the lost blocks again.
    fn remedy(&mut self, what: &str) -> Result<(), String> {
        let mut deleted_snapshots = Vec::new();
        let mut deleted_packs = false;
        for d in std::mem::take(&mut self.damage) {
            if let Damage::Moved { path, aside } = d {
                if path.starts_with(self.t.repo.join("snapshots")) {
                    deleted_snapshots.push((path, aside));
                } else {
                    deleted_packs = true;
                    let _ = std::fs::remove_file(aside);
                }
            }
        }
        if deleted_packs {
            // What check names as the fix of a pack missing from storage:
            // its blocks leave the catalog, so a backup stores them again.
            let r = self.run(&["--json", "repair", "index"]);
            self.sane(&r)?;
            if r.code != 0 {
                return Err(format!("repair index after {what} failed: {}", r.stderr));
            }
            self.note("remedy: repair index".into());
        }
        let r = self.run(&["--json", "repair", "packs"]);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!("repair packs after {what} failed: {}", r.stderr));
        }
        self.note(format!("remedy: repair packs: {}", first_line(&r.stderr)));
        if !deleted_snapshots.is_empty() {
            let r = self.run(&["--json", "repair", "snapshots"]);
            self.sane(&r)?;
            // 3: a child whose blocks were known only to its parent.
            if r.code != 0 && r.code != 3 {
                return Err(format!(
                    "repair snapshots after {what} failed: {}",
                    r.stderr
                ));
            }
            self.note(format!("remedy: repair snapshots: exit {}", r.code));
            for (path, aside) in deleted_snapshots {
                if r.code == 0 {
                    let _ = std::fs::remove_file(aside);
                } else {
                    // A child it cannot repair (blocks known only to the
                    // deleted parent) stays damaged for good: the parent
                    // object is put back rather than keep it in the oracle.
                    std::fs::rename(aside, path).unwrap();
                }
            }
            // The deleted snapshot is gone for good.
            let listed: BTreeSet<String> =
                self.listed_all()?.into_iter().map(|(id, _)| id).collect();
            self.known.retain(|id, _| listed.contains(id));
        }
        // Loud, never wrong: every snapshot restored, failures named.
        self.verify(&format!("after repairing {what}"), true)?;
        // Healing: a full backup of the content of each snapshot that fails.
        let ids: Vec<String> = self.known.keys().cloned().collect();
        let mut healed = 0;
        for id in ids {
            if self.restore_to_file(&id, &[])? {
                continue;
            }
            let state = self.known[&id].state.clone();
            let mut bytes = Vec::with_capacity(state.len as usize);
            for h in &state.blocks {
                bytes.extend_from_slice(&self.contents[h]);
            }
            let h = self.disks.len() - 1;
            self.disks[h].bytes = bytes;
            std::fs::write(&self.disks[h].path, &self.disks[h].bytes).map_err(|e| e.to_string())?;
            let image = self.disks[h].path.display().to_string();
            let r = self.run(&["--json", "backup", &image, "--full"]);
            self.backup_outcome(h, state, &r, None, true)?;
            if !self.restore_to_file(&id, &[])? {
                return Err(format!(
                    "snapshot {id} still fails after a full backup of its content                      stored its blocks again (repair after {what})"
                ));
            }
            healed += 1;
        }
        self.note(format!("remedy: healed {healed} snapshots by backups"));
        self.verify(&format!("after the remedies for {what}"), false)
    }

    /// Every listed snapshot: (id, source).
    fn listed_all(&self) -> Result<Vec<(String, String)>, String> {
        let r = self.run(&["--json", "snapshots"]);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!("snapshots failed: {}", r.stderr));
        }
        Ok(r.items("snapshot")
            .iter()
            .map(|s| {
                (
                    s["snapshot_id"].as_str().unwrap().to_string(),
                    s["source"].as_str().unwrap().to_string(),
                )
            })
            .collect())
    }

    // ---------------------------------------------- repair on a healthy repo

    /// A repair command in a healthy repository: exit 0 and nothing lost.
    fn repair_healthy(&mut self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["--json", "repair"];
        all.extend_from_slice(args);
        let r = self.run(&all);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!(
                "repair {args:?} failed in a healthy repository: {}",
                r.stderr
            ));
        }
        self.note(format!("repair {args:?}: ok"));
        self.verify(&format!("after repair {args:?}"), false)
    }

    fn repair_packs(&mut self) -> Result<(), String> {
        self.repair_healthy(&["packs"])
    }

    fn repair_packs_unreferenced(&mut self) -> Result<(), String> {
        self.repair_healthy(&["packs", "--unreferenced"])
    }

    fn repair_snapshots(&mut self) -> Result<(), String> {
        self.repair_healthy(&["snapshots"])
    }

    fn repair_tmp(&mut self) -> Result<(), String> {
        self.repair_healthy(&["tmp"])
    }

    /// Reading commands with `--no-lock` beside a backup that holds its
    /// lock: `snapshots`, `check` or a restore; a restore that exits 0 has
    /// the exact bytes, and none of them may crash.
    fn no_lock_beside_backup(&mut self) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let (args, parent) = self.backup_args(d, "bitmap")?;
        let state = self.state(d);
        let other: Vec<String> = match (self.rng.gen_range(0..3), self.pick_known()) {
            (0, Some(id)) => vec!["restore".into(), id, "--target".into(), "-".into()],
            (1, _) => vec!["check".into()],
            _ => vec!["snapshots".into()],
        };
        let mut with_flag = vec!["--no-lock".to_string()];
        with_flag.extend(other.iter().cloned());
        let (ra, rb) = self.two_at_once(&args, &with_flag);
        self.sane(&rb)?;
        if other[0] == "restore" && rb.code == 0 {
            let id = &other[1];
            if State::of(&rb.stdout) != self.known[id].state {
                return Err(format!(
                    "restore --no-lock of {id} beside a backup: WRONG bytes"
                ));
            }
        }
        self.note(format!(
            "no-lock: backup disk{d} exit {} | {with_flag:?} exit {}",
            ra.code, rb.code
        ));
        self.backup_outcome(d, state, &ra, parent.as_deref(), false)?;
        self.verify("after a --no-lock reader beside a backup", false)
    }

    fn flip_in(&mut self, sub: &str) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let Some(path) = self.pick_file(sub) else {
            return Ok(());
        };
        let len = std::fs::metadata(&path).unwrap().len();
        if len == 0 {
            return Ok(());
        }
        let offset = self.rng.gen_range(0..len);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset).unwrap();
        let flip = self.rng.gen_range(1..=255u8);
        f.write_all_at(&[b[0] ^ flip], offset).unwrap();
        drop(f);
        self.damage.push(Damage::Flipped {
            path: path.clone(),
            offset,
            old: b[0],
        });
        self.after_damage(format!(
            "flipped byte {offset} of {} (^{flip:#04x})",
            path.strip_prefix(&self.t.repo).unwrap().display()
        ))
    }

    fn move_aside(&mut self, sub: &str) -> Result<(), String> {
        let Some(path) = self.pick_file(sub) else {
            return Ok(());
        };
        let aside = self.t.path(&format!("aside-{}", self.step));
        std::fs::rename(&path, &aside).unwrap();
        self.damage.push(Damage::Moved {
            path: path.clone(),
            aside,
        });
        self.after_damage(format!(
            "deleted {}",
            path.strip_prefix(&self.t.repo).unwrap().display()
        ))
    }

    fn flip_pack_byte(&mut self) -> Result<(), String> {
        self.flip_in("data")
    }

    fn flip_snapshot_byte(&mut self) -> Result<(), String> {
        self.flip_in("snapshots")
    }

    fn delete_pack(&mut self) -> Result<(), String> {
        self.move_aside("data")
    }

    fn delete_snapshot(&mut self) -> Result<(), String> {
        self.move_aside("snapshots")
    }

    /// A damaged block, found by check --read-data, comes back with the
    /// next full backup of an image that holds it (issue 22 item 2,
    /// DESIGN.md invariant 10): a fresh block is backed up (so it sits in
    /// the newest pack), a byte of that pack is flipped, check --read-data
    /// finds it, and a full backup of the same image must then restore
    /// exactly.
    fn heal_damaged_block(&mut self) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let b = self.rng.gen_range(0..IMAGE_BLOCKS[d]);
        self.fresh += 1;
        let data = random_block(self.seed, 1_000_000 + self.fresh);
        let start = (b * BS) as usize;
        let end = (start + BSU).min(self.disks[d].bytes.len());
        self.disks[d].bytes[start..end].copy_from_slice(&data[..end - start]);
        std::fs::write(&self.disks[d].path, &self.disks[d].bytes).map_err(|e| e.to_string())?;
        self.remember(d);
        let (args, _) = self.backup_args(d, "full")?;
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = self.run(&a);
        let state = self.state(d);
        self.backup_outcome(d, state.clone(), &r, None, true)?;
        let newest = self
            .files("data")
            .into_iter()
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .ok_or("no pack after a backup with new data")?;
        let len = std::fs::metadata(&newest).unwrap().len();
        let offset = self.rng.gen_range(0..len);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&newest)
                .unwrap();
            let mut old = [0u8];
            f.read_exact_at(&mut old, offset).unwrap();
            f.write_all_at(&[old[0] ^ 0x40], offset).unwrap();
            self.damage.push(Damage::Flipped {
                path: newest.clone(),
                offset,
                old: old[0],
            });
        }
        let (code, _, _) = self.check(true, &[])?;
        self.note(format!(
            "heal: flipped byte {offset} of the newest pack; check exit {code}"
        ));
        let r = self.run(&a);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!(
                "full backup of disk{d} after damage was found failed: {}",
                r.stderr
            ));
        }
        let id = r.json()["snapshot_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.known.insert(
            id.clone(),
            Known {
                disk: d,
                state,
                learned: false,
            },
        );
        if !self.restore_to_file(&id, &[])? {
            return Err(format!(
                "full backup {id} taken after check --read-data found damage does not \
                 restore (it reused a damaged block rather than store it again?)"
            ));
        }
        self.after_damage("heal: damage in the newest pack".into())
    }

    /// A second object for a snapshot with the same id and generation but
    /// every block zero (a forgery, or two writers that collided): it must
    /// be reported, and neither object picked silently.
    fn duplicate_snapshot_object(&mut self) -> Result<(), String> {
        use cbtvault::format::snapshot::{self, BlockRef};
        let Some(path) = self.pick_file("snapshots") else {
            return Ok(());
        };
        // In an encrypted repository the forger holds the key (a writer
        // that collided): without it nothing it writes would open.
        let codec = crate::util::repo_codec(&self.t);
        let bound = cbtvault::crypto::Bound::Snapshot;
        let plain = codec
            .open_object(bound, &std::fs::read(&path).unwrap())
            .map_err(|e| e.to_string())?;
        // Version 1: every entry made zero; version 2: the page table
        // emptied (a full then reads all zero, a delta as its parent).
        let (id, bytes) = match snapshot::decode_any(&plain).map_err(|e| e.to_string())? {
            snapshot::StoredSnapshot::Inline(mut obj) => {
                if obj.entries.is_empty() {
                    return Ok(());
                }
                for e in &mut obj.entries {
                    e.1 = BlockRef::Zero;
                }
                (
                    obj.meta.id,
                    snapshot::encode(&obj).map_err(|e| e.to_string())?,
                )
            }
            snapshot::StoredSnapshot::Paged(mut obj) => {
                if obj.table.rows.is_empty() {
                    return Ok(());
                }
                obj.table.rows.clear();
                (
                    obj.meta.id,
                    snapshot::encode_paged(&obj).map_err(|e| e.to_string())?,
                )
            }
        };
        let bytes = codec.seal_object(bound, bytes).map_err(|e| e.to_string())?;
        let name = cbtvault::format::ObjectName::of(&bytes).to_hex();
        let forged = self.t.repo.join("snapshots").join(&name);
        std::fs::write(&forged, &bytes).unwrap();
        self.damage.push(Damage::Created { path: forged });
        self.after_damage(format!(
            "forged a second object of snapshot {id} (same generation, other blocks)"
        ))
    }

    /// Removes the empty folders a copy may not carry (tmp/, locks/, empty
    /// data/XX/): every command must work without them.
    fn remove_empty_folders(&mut self) -> Result<(), String> {
        let mut removed = 0;
        let mut dirs: Vec<PathBuf> = vec![self.t.repo.join("tmp"), self.t.repo.join("locks")];
        for e in std::fs::read_dir(self.t.repo.join("data"))
            .unwrap()
            .flatten()
        {
            dirs.push(e.path());
        }
        for d in dirs {
            if std::fs::remove_dir(&d).is_ok() {
                removed += 1;
            }
        }
        self.note(format!("removed {removed} empty folders"));
        self.verify("after removing the empty folders", false)
    }

    // ------------------------------------------------------- retention

    /// 1 to 3 known snapshots, at random.
    fn pick_some_known(&mut self) -> Vec<String> {
        let mut ids: Vec<String> = self.known.keys().cloned().collect();
        rand::seq::SliceRandom::shuffle(&mut ids[..], &mut self.rng);
        ids.truncate(self.rng.gen_range(1..=3));
        ids
    }

    /// Forgets known snapshots that are no longer listed after a forget
    /// (only those it was asked to remove may go).
    fn learn_forgotten(&mut self, asked: &[String], context: &str) -> Result<usize, String> {
        let listed: BTreeSet<String> = self.listed_all()?.into_iter().map(|l| l.0).collect();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !listed.contains(*id))
            .cloned()
            .collect();
        for id in &gone {
            if !asked.contains(id) {
                return Err(format!(
                    "{context}: snapshot {id} vanished though it was not forgotten"
                ));
            }
            self.known.remove(id);
        }
        Ok(gone.len())
    }

    /// `forget ID...`: exactly those go, every other snapshot restores.
    fn forget_ids(&mut self) -> Result<(), String> {
        let ids = self.pick_some_known();
        if ids.is_empty() {
            return Ok(());
        }
        let mut args = vec!["--json", "forget", "--no-host"];
        args.extend(ids.iter().map(String::as_str));
        let r = self.run(&args);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!("forget {ids:?} failed: {}", r.stderr));
        }
        let gone = self.learn_forgotten(&ids, "forget")?;
        if gone != ids.len() {
            return Err(format!(
                "forget {ids:?} exited 0 but {gone} of them are gone"
            ));
        }
        self.note(format!("forgot {ids:?}"));
        self.verify("after forget", false)
    }

    /// `forget --keep-last K`: each source keeps exactly its K newest.
    fn forget_policy(&mut self) -> Result<(), String> {
        let k = self.rng.gen_range(1..=4usize);
        let before = self.listed_all()?;
        let mut per_source: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, source) in &before {
            per_source
                .entry(source.clone())
                .or_default()
                .push(id.clone());
        }
        let ks = k.to_string();
        let r = self.run(&["--json", "forget", "--no-host", "--keep-last", &ks]);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!("forget --keep-last {k} failed: {}", r.stderr));
        }
        let asked: Vec<String> = before.iter().map(|l| l.0.clone()).collect();
        self.learn_forgotten(&asked, "forget --keep-last")?;
        let after: BTreeSet<String> = self.listed_all()?.into_iter().map(|l| l.0).collect();
        // The listing is oldest first: the K last of each source stay.
        for (source, ids) in &per_source {
            let want: BTreeSet<String> = ids.iter().rev().take(k).cloned().collect();
            let have: BTreeSet<String> =
                ids.iter().filter(|i| after.contains(*i)).cloned().collect();
            if want != have {
                return Err(format!(
                    "forget --keep-last {k}: source {source} keeps {have:?}, expected {want:?}"
                ));
            }
        }
        self.note(format!("forget --keep-last {k}"));
        self.verify("after forget --keep-last", false)
    }

    /// `prune`: every kept snapshot restores; with --max-unused 0 nothing
    /// unused is left (a dry run finds nothing more to do).
    fn prune(&mut self) -> Result<(), String> {
        let max = ["0", "10%", "50%"][self.rng.gen_range(0..3)];
        let r = self.run(&["--json", "prune", "--max-unused", max]);
        self.sane(&r)?;
        if r.code != 0 {
            return Err(format!("prune --max-unused {max} failed: {}", r.stderr));
        }
        if max == "0" {
            let d = self.run(&["--json", "prune", "--dry-run", "--max-unused", "0"]);
            self.sane(&d)?;
            let v = d.json();
            let reclaim = v["reclaimed_bytes"].as_u64();
            if d.code != 0 || reclaim != Some(0) {
                return Err(format!(
                    "after prune --max-unused 0 a dry run still reclaims {reclaim:?} (exit {}): {}",
                    d.code,
                    d.out()
                ));
            }
            // And by an oracle of our own: no stored blob is one no
            // snapshot object names.
            let stray = crate::prune::unreferenced_blobs(&self.t)?;
            if !stray.is_empty() {
                return Err(format!(
                    "after prune --max-unused 0, {} stored blobs are referenced by no snapshot, e.g. {:?}",
                    stray.len(),
                    &stray[..stray.len().min(3)]
                ));
            }
        }
        self.note(format!("prune --max-unused {max}"));
        self.verify("after prune", false)
    }

    /// forget killed at a random moment: what it removed is only what it
    /// was asked to; everything else restores.
    fn kill_forget(&mut self) -> Result<(), String> {
        let ids = self.pick_some_known();
        if ids.is_empty() {
            return Ok(());
        }
        let mut args = vec!["forget".to_string(), "--no-host".to_string()];
        args.extend(ids.iter().cloned());
        let delay = Duration::from_millis(self.rng.gen_range(0..150));
        let child = self.spawn(&args, &[]);
        let (r, killed) = World::kill_after(child, delay, format!("forget {ids:?}"));
        if !killed {
            self.sane(&r)?;
        }
        let gone = self.learn_forgotten(&ids, "killed forget")?;
        self.note(format!(
            "forget {ids:?} killed after {delay:?} (killed: {killed}, {gone} gone)"
        ));
        self.verify("after a killed forget", false)
    }

    fn kill_prune(&mut self) -> Result<(), String> {
        let delay = Duration::from_millis(self.rng.gen_range(0..200));
        let args = vec![
            "prune".to_string(),
            "--max-unused".to_string(),
            "0".to_string(),
        ];
        let child = self.spawn(&args, &[]);
        let (r, killed) = World::kill_after(child, delay, "prune".into());
        if !killed {
            self.sane(&r)?;
        }
        self.note(format!("prune killed after {delay:?} (killed: {killed})"));
        self.verify("after a killed prune", false)
    }

    /// prune and a backup at once: the exclusive lock lets one through
    /// (or both, one after the other); a refused one says why.
    fn prune_beside_backup(&mut self) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let (args, parent) = self.backup_args(d, "bitmap")?;
        let state = self.state(d);
        let prune = vec![
            "prune".to_string(),
            "--max-unused".to_string(),
            "0".to_string(),
        ];
        let (ra, rb) = self.two_at_once(&args, &prune);
        self.sane(&rb)?;
        if rb.code != 0 && !rb.stderr.contains("lock") {
            return Err(format!(
                "prune beside a backup failed, not on the lock: {}",
                rb.stderr
            ));
        }
        if ra.code != 0 && !ra.stderr.contains("lock") {
            return Err(format!(
                "backup beside prune failed, not on the lock: {}",
                ra.stderr
            ));
        }
        self.note(format!(
            "prune beside backup disk{d}: backup exit {}, prune exit {}",
            ra.code, rb.code
        ));
        self.backup_outcome(d, state, &ra, parent.as_deref(), false)?;
        self.verify("after prune beside a backup", false)
    }

    // ----------------------------------------------------- concurrency

    /// Runs two cbtvault command lines as processes at the same time and
    /// waits for both.
    fn two_at_once(&self, a: &[String], b: &[String]) -> (Run, Run) {
        let (pa, pb) = (self.spawn(a, &[]), self.spawn(b, &[]));
        let run = |args: &[String], child: std::process::Child| {
            let out = child.wait_with_output().unwrap();
            Run {
                command: format!("{args:?}"),
                code: out.status.code().unwrap_or(-1),
                stdout: out.stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        };
        (run(a, pa), run(b, pb))
    }

    /// Two cbtvault processes at once: two backups (of two disks or of one),
    /// or a backup beside a restore, a check or a repair index. Lock
    /// conflicts may fail one.
    fn concurrent(&mut self) -> Result<(), String> {
        let d = self.rng.gen_range(0..IMAGE_BLOCKS.len());
        let how = ["full", "bitmap"][self.rng.gen_range(0..2)];
        let (mut args, parent) = self.backup_args(d, how)?;
        let state = self.state(d);
        let other: Vec<String> = match self.rng.gen_range(0..4) {
            0 => {
                // The other disk, or the same one (both on the same parent).
                let d2 = if self.rng.gen_bool(0.5) { 1 - d } else { d };
                if d2 == d && !args.iter().any(|a| a == "--parent") {
                    // Whichever commits first would otherwise be the
                    // other's "latest" parent: pin the one expected.
                    if let Some(p) = &parent {
                        args.extend(["--parent".into(), p.clone()]);
                    }
                }
                let (a, _) = self.backup_args(d2, how)?;
                // The second backup's outcome is learned by verify.
                self.attempts.push((d2, self.state(d2)));
                a
            }
            1 => match self.pick_known() {
                Some(id) => vec!["restore".into(), id, "--target".into(), "-".into()],
                None => vec!["snapshots".into()],
            },
            2 => vec!["check".into(), "--read-data".into()],
            _ => vec!["repair".into(), "index".into()],
        };
        let (ra, rb) = self.two_at_once(&args, &other);
        self.sane(&rb)?;
        if other[0] == "restore" && rb.code == 0 {
            let id = &other[1];
            if State::of(&rb.stdout) != self.known[id].state {
                return Err(format!("restore of {id} beside a backup: WRONG bytes"));
            }
        }
        self.note(format!(
            "concurrent: backup disk{d} exit {} | {other:?} exit {}",
            ra.code, rb.code
        ));
        self.backup_outcome(d, state, &ra, parent.as_deref(), false)?;
        self.verify("after two processes at once", false)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

/// Runs `steps` random actions from `seed`; panics with a replayable
/// message on the first violation.
pub fn torture(seed: u64, steps: usize) {
    torture_with(seed, steps, false)
}

/// [`torture`] on a plain or an encrypted repository.
pub fn torture_with(seed: u64, steps: usize, encrypted: bool) {
    eprintln!(
        "torture: seed {seed}, {steps} steps, {} repository (replay: CBTVAULT_TORTURE_SEED={seed} \
         CBTVAULT_TORTURE_STEPS={steps})",
        if encrypted { "encrypted" } else { "plain" }
    );
    let started = Instant::now();
    let mut w = World::new(seed, encrypted);
    for d in 0..w.disks.len() {
        w.remember(d);
    }
    let total: u32 = ACTIONS.iter().map(|a| a.weight).sum();
    // Some data and a first snapshot of each disk.
    for _ in 0..6 {
        w.mutate().unwrap();
    }
    for step in 0..steps {
        w.step = step;
        let mut pick = w.rng.gen_range(0..total);
        let action = ACTIONS
            .iter()
            .find(|a| {
                if pick < a.weight {
                    true
                } else {
                    pick -= a.weight;
                    false
                }
            })
            .expect("weights add up");
        *w.counts.entry(action.name).or_default() += 1;
        if let Err(e) = (action.run)(&mut w) {
            panic!("{}", w.failure(&format!("{}: {e}", action.name)));
        }
    }
    w.step = steps;
    // Everything, once more, at the end.
    if let Err(e) = w.verify("at the end", false) {
        panic!("{}", w.failure(&e));
    }
    let ids: Vec<String> = w.known.keys().cloned().collect();
    for id in ids {
        match w.restore_to_file(&id, &[]) {
            Ok(true) => {}
            Ok(false) => panic!("{}", w.failure(&format!("final restore of {id} failed"))),
            Err(e) => panic!("{}", w.failure(&e)),
        }
    }
    eprintln!(
        "torture: seed {seed}: {steps} steps in {:?}, {} snapshots ({} learned after a \
         failure); actions {:?}",
        started.elapsed(),
        w.known.len(),
        w.known.values().filter(|k| k.learned).count(),
        w.counts
    );
}

/// CBTVAULT_TORTURE_SEED: a number replays that seed, `random` picks one;
/// unset, CI runs a fixed seed so that a red run is the code's doing, not
/// the dice's (bench/torture.sh explores new seeds).
pub fn torture_seed() -> u64 {
    match std::env::var("CBTVAULT_TORTURE_SEED")
        .as_deref()
        .map(str::trim)
    {
        Ok("random") => rand::random(),
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("CBTVAULT_TORTURE_SEED='{n}': a number or 'random'")),
        Err(_) => 0x2222_2026,
    }
}

/// The short run of CI: a few hundred steps with the seed printed.
#[test]
fn torture_short_run_keeps_every_committed_snapshot_exact_or_reported() {
    let seed = torture_seed();
    let steps = env_u64("CBTVAULT_TORTURE_STEPS").unwrap_or(200) as usize;
    torture(seed, steps);
}

/// The same on an encrypted repository (sealed objects, keyed ids).
#[test]
fn torture_short_run_on_an_encrypted_repository() {
    let seed = std::env::var("CBTVAULT_TORTURE_SEED")
        .map(|_| torture_seed())
        .unwrap_or(0x2222_2026 ^ 0x0e0c);
    let steps = env_u64("CBTVAULT_TORTURE_STEPS").unwrap_or(120) as usize;
    torture_with(seed, steps, true);
}

/// The hook is alive (debug builds only, by design): a backup with every backend operation failing fails
/// with the injected error, and leaves the repository as it was.
#[test]
#[cfg(debug_assertions)]
fn fault_injection_reaches_the_cli_process() {
    let t = TestRepo::new();
    let img = Image::create(&t.path("d.img"), 4 * BS);
    img.write_block(1, &random_block(5, 1));
    let r = t.run_env(
        &[&"--json", &"backup", &img.path],
        &[("CBTVAULT_TEST_FAULTS", "1:1:enospc")],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    r.stderr_mentions(&["injected by CBTVAULT_TEST_FAULTS", "no space left"]);
    assert!(t.snapshot_ids().is_empty());
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}
