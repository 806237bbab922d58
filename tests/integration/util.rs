//! Helpers shared by the integration tests: a temporary repository driven
//! through the real `cbtvault` binary, captured command results, images
//! generated deterministically from a seed, whole-file BLAKE3 hashes and
//! XenServer-style change bitmaps. Nothing here knows the repository format;
//! tests that need it use the library directly.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

/// The block size every test repository uses (XenServer CBT granularity).
pub const BS: u64 = 65536;
pub const BSU: usize = BS as usize;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cbtvault")
}

/// The captured result of one command.
#[derive(Debug)]
pub struct Run {
    /// What was run, for failure messages.
    pub command: String,
    /// Exit code; -1 when killed by a signal.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Every JSON line of stdout, each checked against docs/json.md (as
    /// are the JSON lines of stderr).
    #[track_caller]
    pub fn messages(&self) -> Vec<Value> {
        let err: String = self
            .stderr
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| format!("{l}\n"))
            .collect();
        crate::json_contract::validate_stream(&format!("{} (stderr)", self.command), &err);
        crate::json_contract::validate_stream(&self.command, &self.out())
    }

    /// The `summary` line, which must be the last line of stdout; every
    /// line checked against docs/json.md.
    #[track_caller]
    pub fn json(&self) -> Value {
        let mut messages = self.messages();
        match messages.pop() {
            Some(v) if v["message_type"] == "summary" => v,
            other => panic!(
                "{}: the last line of stdout is not a summary ({other:?}):\n{}\nstderr:\n{}",
                self.command,
                self.out(),
                self.stderr
            ),
        }
    }

    /// The lines of `message_type` (checked against docs/json.md).
    #[track_caller]
    pub fn items(&self, message_type: &str) -> Vec<Value> {
        self.messages()
            .into_iter()
            .filter(|m| m["message_type"] == message_type)
            .collect()
    }

    /// The one line of `message_type`.
    #[track_caller]
    pub fn item(&self, message_type: &str) -> Value {
        let mut items = self.items(message_type);
        assert_eq!(
            items.len(),
            1,
            "{}: one '{message_type}' line",
            self.command
        );
        items.remove(0)
    }

    #[track_caller]
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(
            self.code,
            code,
            "{}: exit code {} where {code} was expected\nstdout:\n{}\nstderr:\n{}",
            self.command,
            self.code,
            if self.stdout.len() > 4096 {
                "(long)".to_string()
            } else {
                self.out()
            },
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        self.expect_code(0)
    }

    /// Asserts that stderr contains every key word (case-insensitive).
    #[track_caller]
    pub fn stderr_mentions(&self, words: &[&str]) -> &Self {
        let lower = self.stderr.to_lowercase();
        for w in words {
            assert!(
                lower.contains(&w.to_lowercase()),
                "{}: stderr does not mention '{w}':\n{}",
                self.command,
                self.stderr
            );
        }
        self
    }
}

/// Runs the binary with `args` in `cwd`, without inheriting a repository
/// from the environment.
pub fn run_in(cwd: &Path, args: &[&dyn AsRef<OsStr>]) -> Run {
    run_in_env(cwd, args, &[])
}

/// [`run_in`] with extra environment variables.
pub fn run_in_env(cwd: &Path, args: &[&dyn AsRef<OsStr>], envs: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.envs(envs.iter().copied());
    cmd.current_dir(cwd)
        .env_remove("CBTVAULT_REPOSITORY")
        .stdin(Stdio::null());
    let mut shown = String::from("cbtvault");
    for a in args {
        cmd.arg(a.as_ref());
        shown.push(' ');
        shown.push_str(&a.as_ref().to_string_lossy());
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    Run {
        command: shown,
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Argon2id at its cheapest (8 MiB, one pass): tests open repositories
/// hundreds of times.
pub const FAST_KDF: &[&str] = &["--kdf-memory", "8", "--kdf-iterations", "1"];

/// The password of the test's encrypted repositories, written to
/// `dir/password`; the variable that names the file.
pub fn password_env(dir: &Path) -> (String, String) {
    let file = dir.join("password");
    std::fs::write(&file, "test password\n").expect("write the password file");
    (
        "CBTVAULT_PASSWORD_FILE".to_string(),
        file.display().to_string(),
    )
}

/// A temporary folder holding a repository (`repo/`) and scratch files.
pub struct TestRepo {
    dir: tempfile::TempDir,
    /// The repository folder (or, on S3, the `s3://` URL).
    pub repo: PathBuf,
    /// Environment every command of this repository runs with.
    pub env: Vec<(String, String)>,
}

impl TestRepo {
    /// `cbtvault -r DIR/repo init` with default options.
    pub fn new() -> TestRepo {
        TestRepo::init(&[])
    }

    /// `init` with extra options, e.g. `["--pack-size-mib", "1"]`.
    pub fn init(extra: &[&str]) -> TestRepo {
        let dir = tempfile::Builder::new()
            .prefix("cbtvault-it-")
            .tempdir()
            .expect("create a temporary folder");
        let repo = dir.path().join("repo");
        let t = TestRepo {
            dir,
            repo,
            env: Vec::new(),
        };
        t.init_with(extra);
        t
    }

    /// A repository at `url` (an `s3://` URL) whose commands run with
    /// `env` (endpoint, credentials), initialised with `extra` options:
    /// encrypted, as `init` makes repositories on object storage by
    /// default, unless `extra` holds `--no-encrypt`.
    pub fn at(url: &str, env: Vec<(String, String)>, extra: &[&str]) -> TestRepo {
        let dir = tempfile::Builder::new()
            .prefix("cbtvault-it-")
            .tempdir()
            .expect("create a temporary folder");
        let mut env = env;
        // This "machine's" catalog cache lives with the test.
        env.push((
            "CBTVAULT_CACHE_DIR".into(),
            dir.path().join("cache").display().to_string(),
        ));
        env.push(password_env(dir.path()));
        let t = TestRepo {
            dir,
            repo: PathBuf::from(url),
            env,
        };
        let mut args = FAST_KDF.to_vec();
        args.extend_from_slice(extra);
        t.init_with(&args);
        t
    }

    /// A local encrypted repository (`init --encrypt`, the password in a
    /// file named by CBTVAULT_PASSWORD_FILE, a cheap Argon2id cost).
    pub fn encrypted(extra: &[&str]) -> TestRepo {
        let dir = tempfile::Builder::new()
            .prefix("cbtvault-it-")
            .tempdir()
            .expect("create a temporary folder");
        let repo = dir.path().join("repo");
        let env = vec![
            (
                "CBTVAULT_CACHE_DIR".to_string(),
                dir.path().join("cache").display().to_string(),
            ),
            password_env(dir.path()),
        ];
        let t = TestRepo { dir, repo, env };
        let mut args = vec!["--encrypt"];
        args.extend_from_slice(FAST_KDF);
        args.extend_from_slice(extra);
        t.init_with(&args);
        t
    }

    /// The file holding this repository's password (encrypted ones).
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    /// The same repository seen from another "machine": a fresh catalog
    /// cache, the same endpoint and credentials.
    pub fn other_machine(&self) -> TestRepo {
        let dir = tempfile::Builder::new()
            .prefix("cbtvault-it-")
            .tempdir()
            .expect("create a temporary folder");
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| k != "CBTVAULT_CACHE_DIR")
            .cloned()
            .collect();
        env.push((
            "CBTVAULT_CACHE_DIR".into(),
            dir.path().join("cache").display().to_string(),
        ));
        TestRepo {
            dir,
            repo: self.repo.clone(),
            env,
        }
    }

    fn init_with(&self, extra: &[&str]) {
        let t = self;
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"init"];
        for e in extra {
            args.push(e);
        }
        t.run(&args).ok();
    }

    /// The temporary folder (images and restored files go here).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A path in the scratch folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `cbtvault -r REPO ARGS...`.
    pub fn run(&self, args: &[&dyn AsRef<OsStr>]) -> Run {
        self.run_env(args, &[])
    }

    /// [`TestRepo::run`] with extra environment variables.
    pub fn run_env(&self, args: &[&dyn AsRef<OsStr>], envs: &[(&str, &str)]) -> Run {
        let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"-r", &self.repo];
        all.extend_from_slice(args);
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.extend_from_slice(envs);
        run_in_env(self.dir.path(), &all, &env)
    }

    /// `backup --json IMAGE EXTRA...`, which must succeed; its JSON summary.
    #[track_caller]
    pub fn backup(&self, image: &Path, extra: &[&str]) -> Value {
        let r = self.try_backup(image, extra).ok();
        r.json()
    }

    pub fn try_backup(&self, image: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"backup", &image];
        for e in extra {
            args.push(e);
        }
        self.run(&args)
    }

    /// The snapshot id a backup summary names.
    pub fn id_of(summary: &Value) -> String {
        summary["snapshot_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no snapshot_id in {summary}"))
            .to_string()
    }

    /// `snapshots --json` (plus filters), oldest first.
    #[track_caller]
    pub fn snapshots(&self, filters: &[&str]) -> Vec<Value> {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"snapshots"];
        for f in filters {
            args.push(f);
        }
        self.run(&args).ok().items("snapshot")
    }

    pub fn snapshot_ids(&self) -> Vec<String> {
        self.snapshots(&[])
            .iter()
            .map(|s| s["snapshot_id"].as_str().expect("snapshot_id").to_string())
            .collect()
    }

    /// `restore ID --target TARGET EXTRA...`.
    pub fn restore(&self, id: &str, target: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"restore", &id, &"--target", &target];
        for e in extra {
            args.push(e);
        }
        self.run(&args)
    }

    /// Restores `id` to a new file, checks it succeeded and returns the
    /// whole-file hash and size; the file is removed afterwards.
    #[track_caller]
    pub fn restored_hash(&self, id: &str) -> (blake3::Hash, u64) {
        let target = self.path(&format!("restored-{id}-{}.img", rand::random::<u32>()));
        self.restore(id, &target, &[]).ok();
        let h = hash_file(&target);
        let len = std::fs::metadata(&target).expect("restored file").len();
        std::fs::remove_file(&target).expect("remove restored file");
        (h, len)
    }

    /// Asserts that snapshot `id` restores to exactly the bytes of `image`
    /// as hashed in `expected`.
    #[track_caller]
    pub fn assert_restores(&self, id: &str, expected: blake3::Hash, expected_len: u64) {
        let (h, len) = self.restored_hash(id);
        assert_eq!(len, expected_len, "snapshot {id}: restored size differs");
        assert_eq!(
            h, expected,
            "snapshot {id}: restored content differs from the source"
        );
    }

    /// `check --json [--read-data]`: the run (exit code unchecked) and its report.
    pub fn check(&self, read_data: bool) -> (Run, Value) {
        let r = if read_data {
            self.run(&[&"--json", &"check", &"--read-data"])
        } else {
            self.run(&[&"--json", &"check"])
        };
        let v = r.json();
        (r, v)
    }

    /// `cat snapshot ID`, its lines gathered into one value:
    /// `{object, meta, bitmap, entries: [{index, block}]}` where `block`
    /// is a hex id or `"zero"`.
    #[track_caller]
    pub fn cat_snapshot(&self, id: &str) -> Value {
        let r = self.run(&[&"cat", &"snapshot", &id]).ok();
        let head = r.item("snapshot_object");
        let entries: Vec<Value> = r
            .items("entry")
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "index": e["index"],
                    "block": if e["block_id"].is_null() { Value::from("zero") } else { e["block_id"].clone() },
                })
            })
            .collect();
        assert_eq!(head["entry_count"], entries.len(), "entry_count");
        serde_json::json!({
            "object": head["object"], "meta": head["meta"], "bitmap": head["bitmap"],
            "entries": entries,
        })
    }

    /// Names of the files under a repository sub-folder, recursively, sorted.
    pub fn files_under(&self, sub: &str) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let base = self.repo.join(sub);
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    /// Paths of every pack file.
    pub fn packs(&self) -> Vec<PathBuf> {
        self.files_under("data")
            .into_iter()
            .map(|n| self.repo.join("data").join(n))
            .collect()
    }
}

// ------------------------------------------------------------------ images

/// `len` pseudo-random bytes determined by `seed` and `stream` (BLAKE3 XOF).
pub fn random_bytes(seed: u64, stream: u64, len: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new_derive_key("cbtvault integration tests 2024 random bytes");
    h.update(&seed.to_le_bytes());
    h.update(&stream.to_le_bytes());
    let mut out = vec![0u8; len];
    h.finalize_xof().fill(&mut out);
    out
}

/// A full block of incompressible data, distinct for each (seed, n).
pub fn random_block(seed: u64, n: u64) -> Vec<u8> {
    random_bytes(seed, n, BSU)
}

/// A full block of compressible, text-like data, distinct for each (seed, n).
pub fn text_block(seed: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BSU);
    let mut line = 0u64;
    while out.len() < BSU {
        out.extend_from_slice(
            format!(
                "seed {seed} block {n} line {line}: the quick brown fox jumps over the lazy dog\n"
            )
            .as_bytes(),
        );
        line += 1;
    }
    out.truncate(BSU);
    out
}

pub fn zero_block() -> Vec<u8> {
    vec![0u8; BSU]
}

/// An image file edited block by block.
pub struct Image {
    pub path: PathBuf,
    file: File,
}

impl Image {
    /// Creates (or empties) `path` with `size` zero bytes (a sparse file).
    pub fn create(path: &Path, size: u64) -> Image {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap_or_else(|e| panic!("create image {}: {e}", path.display()));
        file.set_len(size).expect("size image");
        Image {
            path: path.to_path_buf(),
            file,
        }
    }

    /// Creates `path` holding exactly `bytes`.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Image {
        let img = Image::create(path, 0);
        img.file.write_all_at(bytes, 0).expect("write image");
        img
    }

    pub fn size(&self) -> u64 {
        self.file.metadata().expect("stat image").len()
    }

    pub fn set_len(&self, size: u64) {
        self.file.set_len(size).expect("resize image");
    }

    /// Writes block `index`, clipped to the image size (a partial last block).
    pub fn write_block(&self, index: u64, data: &[u8]) {
        let size = self.size();
        let start = index * BS;
        assert!(start < size, "block {index} beyond the image");
        let n = ((size - start) as usize).min(data.len());
        self.file
            .write_all_at(&data[..n], start)
            .expect("write block");
    }

    pub fn zero_block(&self, index: u64) {
        self.write_block(index, &zero_block());
    }

    /// The bytes of block `index` (shorter for a partial last block).
    pub fn read_block(&self, index: u64) -> Vec<u8> {
        let size = self.size();
        let start = index * BS;
        let n = (size.saturating_sub(start)).min(BS) as usize;
        let mut buf = vec![0u8; n];
        self.file
            .read_exact_at(&mut buf, start)
            .expect("read block");
        buf
    }

    pub fn blocks(&self) -> u64 {
        self.size().div_ceil(BS)
    }

    pub fn hash(&self) -> blake3::Hash {
        hash_file(&self.path)
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read image")
    }
}

/// BLAKE3 of a whole file.
pub fn hash_file(path: &Path) -> blake3::Hash {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read file");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

/// Bytes the file occupies on disk (st_blocks is in 512-byte units).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

// ----------------------------------------------------------------- bitmaps

/// The raw change bitmap of a disk of `size_bytes`: one bit per 64 KiB
/// block, most significant bit of byte 0 = block 0, `ceil(blocks / 8)`
/// bytes. Written independently of the crate's own bitmap code.
pub fn bitmap_raw(size_bytes: u64, marked: &[u64]) -> Vec<u8> {
    let blocks = size_bytes.div_ceil(BS);
    let mut out = vec![0u8; blocks.div_ceil(8) as usize];
    for &b in marked {
        assert!(b < blocks, "block {b} beyond a disk of {blocks} blocks");
        out[(b / 8) as usize] |= 0x80 >> (b % 8);
    }
    out
}

/// Standard base64 with padding, as `VDI.list_changed_blocks` returns it.
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn bitmap_base64(size_bytes: u64, marked: &[u64]) -> String {
    base64(&bitmap_raw(size_bytes, marked))
}

/// Writes a bitmap file (with a trailing newline, as a shell would).
pub fn write_bitmap(path: &Path, text: &str) {
    std::fs::write(path, format!("{text}\n")).expect("write bitmap");
}

// -------------------------------------------------------------------- json

pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("'{key}' is not a string in {v}"))
}

pub fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("'{key}' is not an unsigned number in {v}"))
}

/// Flips one bit pattern (0x40) of the byte at `offset` of `path`; flipping
/// twice puts it back.
pub fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

/// The messages of a `--json` stdout (each checked against docs/json.md).
#[track_caller]
pub fn messages_of(what: &str, stdout: &[u8]) -> Vec<Value> {
    crate::json_contract::validate_stream(what, &String::from_utf8_lossy(stdout))
}

/// The `summary` (last line) of a `--json` stdout.
#[track_caller]
pub fn summary_of(what: &str, stdout: &[u8]) -> Value {
    let last = messages_of(what, stdout).pop();
    match last {
        Some(v) if v["message_type"] == "summary" => v,
        other => panic!("{what}: no summary last: {other:?}"),
    }
}

/// The file of snapshot `id`'s live object, found through `snapshots --json`.
pub fn object_path(t: &TestRepo, id: &str) -> PathBuf {
    let object = t
        .snapshots(&[])
        .into_iter()
        .find(|s| s["snapshot_id"].as_str() == Some(id))
        .map(|s| str_of(&s, "object").to_string())
        .unwrap_or_else(|| panic!("{id} listed"));
    t.repo.join("snapshots").join(object)
}

/// Starts cbtvault on `t`'s repository with `args` and extra environment,
/// stderr piped, without waiting.
pub fn spawn(t: &TestRepo, args: &[&dyn AsRef<std::ffi::OsStr>], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(bin());
    cmd.arg("-r").arg(&t.repo);
    for a in args {
        cmd.arg(a);
    }
    cmd.envs(t.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(env.iter().copied())
        .current_dir(t.root())
        .env_remove("CBTVAULT_REPOSITORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cbtvault")
}

/// Waits until `locks/` holds a lock object (the child holds its lock).
pub fn wait_for_lock(t: &TestRepo, child: &mut Child) {
    let started = Instant::now();
    while t.files_under("locks").is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child ended before taking its lock"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "no lock");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The codec of `t`'s repository, built from its files as a reader with the
/// password would (the test password for encrypted ones): lets a test's
/// oracle read sealed objects without going through the code under test's
/// opening path.
pub fn repo_codec(t: &TestRepo) -> cbtvault::crypto::Codec {
    use cbtvault::crypto::{password, Codec, Keys};
    use cbtvault::format::{config, key};
    let bytes = std::fs::read(t.repo.join("config")).expect("read config");
    let id = match config::decode_outer(&bytes).expect("a config") {
        config::Outer::Plain(_) => return Codec::Plain,
        config::Outer::Encrypted { id, .. } => id,
    };
    let mut repo_id = [0u8; 32];
    hex::decode_to_slice(&id, &mut repo_id).unwrap();
    for entry in std::fs::read_dir(t.repo.join("keys")).expect("keys/") {
        let k = key::decode(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap();
        if let Some(m) = password::unwrap(&k, b"test password", &repo_id).unwrap() {
            return Codec::Sealed(std::sync::Arc::new(Keys::derive(&m)));
        }
    }
    panic!(
        "no key of {} opens with the test password",
        t.repo.display()
    )
}

/// Every manifest entry of the snapshot object `name` in `snapshots/`,
/// decoded with the format codecs alone (an oracle independent of the
/// repository code): a version 1 object's inline entries, or the entries
/// of every page a version 2 object names, each page opened with the
/// repository's codec and checked against its name.
pub fn object_entries(
    t: &TestRepo,
    codec: &cbtvault::crypto::Codec,
    name: &str,
) -> Result<Vec<(u64, cbtvault::format::snapshot::BlockRef)>, String> {
    use cbtvault::crypto::Bound;
    use cbtvault::format::{page, snapshot};
    let bytes = std::fs::read(t.repo.join("snapshots").join(name)).map_err(|e| e.to_string())?;
    let plain = codec
        .open_object(Bound::Snapshot, &bytes)
        .map_err(|e| format!("snapshot {name}: {e}"))?;
    match snapshot::decode_any(&plain).map_err(|e| format!("snapshot {name}: {e}"))? {
        snapshot::StoredSnapshot::Inline(o) => Ok(o.entries),
        snapshot::StoredSnapshot::Paged(p) => {
            let mut out = Vec::new();
            for row in &p.table.rows {
                let hex = row.id.to_hex();
                let stored = std::fs::read(t.repo.join("manifests").join(&hex))
                    .map_err(|e| format!("page {hex}: {e}"))?;
                let plain = codec
                    .open_object(Bound::Page(row.id.0), &stored)
                    .map_err(|e| format!("page {hex}: {e}"))?;
                if codec.hasher().id(&plain).0 != row.id.0 {
                    return Err(format!("page {hex}: content does not match its name"));
                }
                let pg = page::decode(&plain).map_err(|e| format!("page {hex}: {e}"))?;
                out.extend(pg.entries);
            }
            Ok(out)
        }
    }
}

/// A restore target in memory.
pub struct VecSink(pub Vec<u8>);

impl cbtvault::repo::restore::BlockSink for VecSink {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset as usize + data.len();
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn write_zeros(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let end = (offset + len) as usize;
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[offset as usize..end].fill(0);
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
