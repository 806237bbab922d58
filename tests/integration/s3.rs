//! Repositories on S3-compatible object storage (issue 14), against a real
//! S3 server started on loopback: moto in server mode (installed by
//! .ci/run). One backend conformance suite runs against the local backend
//! and against S3; the command line is driven end to end: backup, restore
//! bit for bit, a second machine with an empty cache, concurrent writers,
//! forget and prune, multipart uploads, refused locations.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cbtvault::backend::s3::{self, S3Backend, S3Options};
use cbtvault::backend::{Backend, BackendError, Kind, LocalBackend};

use crate::util::*;

/// Starts `command(port)` on a free loopback port under a watchdog shell
/// that stops it once this test process is gone; waits until it listens.
fn launch(command: impl Fn(u16) -> String, what: &str) -> (u16, Child) {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().unwrap().port()
    };
    let script = format!(
        "{} >/dev/null 2>&1 & m=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $m 2>/dev/null; do sleep 0.5; done; kill $m 2>/dev/null",
        command(port),
        parent = std::process::id()
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sh");
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (port, child)
}

/// A moto S3 server on a free loopback port, stopped when the test
/// process ends (a watchdog shell kills it once its parent is gone).
pub struct S3Server {
    pub endpoint: String,
    _child: Child,
}

impl S3Server {
    /// The server shared by this test process (started on first use).
    pub fn shared() -> &'static S3Server {
        static SERVER: OnceLock<S3Server> = OnceLock::new();
        SERVER.get_or_init(S3Server::start)
    }

    /// A server of its own (for tests that stop it).
    pub fn start() -> S3Server {
        let (port, child) = launch(
            |port| format!("moto_server -H 127.0.0.1 -p {port}"),
            "moto_server: install it with pip install 'moto[server]' (.ci/run does)",
        );
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            _child: child,
        }
    }

    /// The environment a command needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("CBTVAULT_S3_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "cbtvault-test"),
            ("AWS_SECRET_ACCESS_KEY", "cbtvault-test-secret"),
            ("AWS_REGION", "us-east-1"),
            // Fail fast when something is really down.
            ("CBTVAULT_RETRY", "4,20,200"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// An `s3://` URL in a bucket of its own.
    pub fn fresh_url(&self, prefix: &str) -> String {
        format!("s3://t-{}/{prefix}", hex::encode(rand_bytes()))
    }

    /// A backend on a fresh bucket (created), with small multipart parts.
    fn backend(&self) -> S3Backend {
        let b = self.backend_at(&self.fresh_url("conf/repo"));
        assert!(b.ensure_bucket().unwrap(), "a fresh bucket is created");
        assert!(!b.ensure_bucket().unwrap(), "an existing bucket is kept");
        b
    }

    /// A backend on the repository at `url` (an `s3://` URL on this server).
    pub fn backend_at(&self, url: &str) -> S3Backend {
        let parsed = s3::parse_url(url, true).unwrap();
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("k".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("s".to_string()),
            _ => None,
        };
        S3Backend::new(S3Options {
            endpoint: url::Url::parse(&self.endpoint).unwrap(),
            bucket: parsed.bucket,
            prefix: parsed.prefix,
            region: "us-east-1".into(),
            style: s3::UrlStyle::Path,
            credentials: s3::credentials(&s3::CredentialSources {
                env: &env,
                shared_file: None,
            })
            .unwrap(),
            ca_pem: None,
            request_timeout: Duration::from_secs(60),
            multipart_threshold: 6 << 20,
            part_size: 5 << 20,
            connections: s3::CONNECTIONS,
        })
        .unwrap()
    }
}

fn rand_bytes() -> [u8; 6] {
    let mut b = [0u8; 6];
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let h = blake3::hash(format!("{t}-{:?}", std::thread::current().id()).as_bytes());
    b.copy_from_slice(&h.as_bytes()[..6]);
    b
}

fn hex_name(seed: u8, i: u32) -> String {
    blake3::hash(&[&[seed][..], &i.to_le_bytes()].concat())
        .to_hex()
        .to_string()
}

/// What every backend must do (backend/mod.rs's contract).
fn conformance(b: &dyn Backend) {
    let what = b.location();
    // Empty, and missing objects are not-found for every operation.
    for kind in [Kind::Pack, Kind::Snapshot, Kind::Lock] {
        assert!(b.list(kind).unwrap().is_empty(), "{what}: {kind} not empty");
    }
    let missing = hex_name(0, 0);
    assert!(b.load(Kind::Snapshot, &missing).unwrap_err().is_not_found());
    assert!(b.stat(Kind::Snapshot, &missing).unwrap_err().is_not_found());
    assert!(b
        .remove(Kind::Snapshot, &missing)
        .unwrap_err()
        .is_not_found());
    assert!(b
        .load_into(Kind::Pack, &missing, 0, &mut [0u8; 10])
        .unwrap_err()
        .is_not_found());

    // Save, stat, load, ranges; a range past the end is an error.
    let data = random_bytes(1, 1, 100_000);
    let snap = hex_name(1, 1);
    b.save(Kind::Snapshot, &snap, &data).unwrap();
    assert_eq!(b.stat(Kind::Snapshot, &snap).unwrap(), data.len() as u64);
    assert_eq!(b.load(Kind::Snapshot, &snap).unwrap(), data);
    let mut buf = vec![0u8; 1000];
    b.load_into(Kind::Snapshot, &snap, 4321, &mut buf).unwrap();
    assert_eq!(buf, data[4321..5321]);
    let mut tail = vec![0u8; 10];
    let e = b
        .load_into(Kind::Snapshot, &snap, data.len() as u64 - 5, &mut tail)
        .unwrap_err();
    assert!(
        !e.is_not_found(),
        "{what}: a short read is not not-found: {e}"
    );
    // Saving the same name again (same content) is harmless.
    b.save(Kind::Snapshot, &snap, &data).unwrap();
    assert_eq!(
        b.list(Kind::Snapshot).unwrap(),
        vec![(snap.clone(), 100_000)]
    );

    // New objects: appended in pieces, visible only once committed.
    let pack = hex_name(2, 1);
    let mut o = b.create(Kind::Pack).unwrap();
    for i in 0..3 {
        o.append(&random_bytes(2, i, 70_000)).unwrap();
    }
    assert!(
        b.list(Kind::Pack).unwrap().is_empty(),
        "{what}: visible before commit"
    );
    o.commit(&pack).unwrap();
    let whole: Vec<u8> = (0..3).flat_map(|i| random_bytes(2, i, 70_000)).collect();
    assert_eq!(b.load(Kind::Pack, &pack).unwrap(), whole);
    {
        let mut dropped = b.create(Kind::Pack).unwrap();
        dropped.append(b"never committed").unwrap();
    }
    assert_eq!(b.list(Kind::Pack).unwrap(), vec![(pack.clone(), 210_000)]);

    // A large object (several multipart parts on S3), read across parts.
    let big_name = hex_name(3, 1);
    let big = random_bytes(3, 1, 13 << 20);
    b.save(Kind::Pack, &big_name, &big).unwrap();
    assert_eq!(b.stat(Kind::Pack, &big_name).unwrap(), big.len() as u64);
    let mut across = vec![0u8; 3 << 20];
    b.load_into(Kind::Pack, &big_name, (4 << 20) + 7, &mut across)
        .unwrap();
    assert_eq!(across, big[(4 << 20) + 7..(7 << 20) + 7]);
    assert_eq!(
        blake3::hash(&b.load(Kind::Pack, &big_name).unwrap()),
        blake3::hash(&big)
    );

    // Remove: gone from loads and listings.
    b.remove(Kind::Pack, &big_name).unwrap();
    assert!(b.load(Kind::Pack, &big_name).unwrap_err().is_not_found());
    assert!(b.remove(Kind::Pack, &big_name).unwrap_err().is_not_found());
    assert_eq!(b.list(Kind::Pack).unwrap().len(), 1);

    // Concurrent writers: distinct objects and one shared name. A test
    // server may answer a transient error (s3s-fs: HTTP 500) to PUTs of
    // one key racing each other; the product's RetryBackend retries those,
    // and so does this test, a few times.
    let save = |kind: Kind, name: &str, data: &[u8]| {
        for attempt in 0.. {
            match b.save(kind, name, data) {
                Err(BackendError::Transient { .. }) if attempt < 5 => {
                    std::thread::sleep(std::time::Duration::from_millis(50 << attempt))
                }
                other => return other.unwrap(),
            }
        }
    };
    std::thread::scope(|s| {
        for t in 0..6u8 {
            s.spawn(move || {
                for i in 0..10 {
                    let name = hex_name(10 + t, i);
                    save(Kind::Lock, &name, name.as_bytes());
                }
                save(Kind::Lock, &hex_name(99, 0), b"same bytes");
            });
        }
    });
    let locks = b.list(Kind::Lock).unwrap();
    assert_eq!(locks.len(), 61, "{what}: {locks:?}");
    for (name, size) in &locks {
        let body = b.load(Kind::Lock, name).unwrap();
        assert_eq!(body.len() as u64, *size);
        if *name != hex_name(99, 0) {
            assert_eq!(body, name.as_bytes());
        }
    }

    // Listings longer than one page (S3 pages hold 1000 keys).
    let objects: Vec<String> = (0..1010).map(|i| hex_name(200, i)).collect();
    std::thread::scope(|s| {
        for chunk in objects.chunks(200) {
            s.spawn(move || {
                for name in chunk {
                    save(Kind::Snapshot, name, b"x");
                }
            });
        }
    });
    assert_eq!(b.list(Kind::Snapshot).unwrap().len(), 1011, "{what}");
}

#[test]
fn conformance_local() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(dir.path().join("repo"));
    b.create_layout().unwrap();
    conformance(&b);
}

#[test]
fn conformance_s3() {
    let b = S3Server::shared().backend();
    conformance(&b);
    assert!(
        b.location().starts_with("s3://127.0.0.1:"),
        "{}",
        b.location()
    );
}

/// `check --read-data` finds nothing wrong.
#[track_caller]
fn assert_clean(t: &TestRepo) {
    let (run, report) = t.check(true);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    assert!(report["packs_read"].as_u64().unwrap() > 0, "{report}");
}

/// A repository in a fresh bucket of the shared server.
fn s3_repo(extra: &[&str]) -> TestRepo {
    let server = S3Server::shared();
    TestRepo::at(&server.fresh_url("vault/one"), server.env(), extra)
}

#[test]
fn backup_and_restore_on_s3_bit_exact_and_from_a_second_machine() {
    let t = s3_repo(&["--pack-size-mib", "1"]);
    let img = Image::create(&t.path("disk.img"), 48 * BS);
    for i in 0..48 {
        match i % 4 {
            0 => img.write_block(i, &zero_block()),
            1 => img.write_block(i, &text_block(7, i)),
            _ => img.write_block(i, &random_block(7, i)),
        }
    }
    let full = t.backup(&img.path, &[]);
    let first = TestRepo::id_of(&full);
    let h1 = img.hash();
    for i in [2, 3, 30] {
        img.write_block(i, &random_block(8, i));
    }
    let inc = t.backup(&img.path, &[]);
    let second = TestRepo::id_of(&inc);
    assert!(u64_of(&inc, "blocks_new") <= 3, "{inc}");
    t.assert_restores(&first, h1, img.size());
    t.assert_restores(&second, img.hash(), img.size());
    assert_clean(&t);

    // Another machine: no catalog cache; it lists and restores the same.
    let other = t.other_machine();
    let ids: Vec<String> = other.snapshot_ids();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&first) && ids.contains(&second));
    other.assert_restores(&second, img.hash(), img.size());
    other.assert_restores(&first, h1, img.size());
    // And backs up into it, deduplicating against the first machine's packs.
    let again = other.backup(&img.path, &[]);
    assert_eq!(u64_of(&again, "blocks_new"), 0, "{again}");
}

#[test]
fn multipart_packs_round_trip() {
    let server = S3Server::shared();
    let mut env = server.env();
    env.push(("CBTVAULT_S3_PART_SIZE".into(), (5u64 << 20).to_string()));
    let t = TestRepo::at(&server.fresh_url("mp"), env, &["--pack-size-mib", "12"]);
    let blocks = 200;
    let img = Image::create(&t.path("disk.img"), blocks * BS);
    for i in 0..blocks {
        img.write_block(i, &random_block(9, i));
    }
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    assert_clean(&t);
}

#[test]
fn two_processes_back_up_into_one_s3_repository_at_once() {
    let t = s3_repo(&["--pack-size-mib", "1"]);
    let a = Image::create(&t.path("a.img"), 64 * BS);
    let b = Image::create(&t.path("b.img"), 64 * BS);
    for i in 0..64 {
        a.write_block(i, &random_block(21, i));
        // Half of b's blocks are a's: both may store them; no harm.
        b.write_block(
            i,
            &if i % 2 == 0 {
                random_block(21, i)
            } else {
                random_block(22, i)
            },
        );
    }
    let pa = a.path.clone();
    let pb = b.path.clone();
    let mut ca = spawn(&t, &[&"backup", &pa], &[]);
    let mut cb = spawn(&t, &[&"backup", &pb], &[]);
    for (c, what) in [(&mut ca, "a"), (&mut cb, "b")] {
        let status = c.wait().unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "backup {what}: {err}");
    }
    let snaps = t.snapshots(&[]);
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert_clean(&t);
    for (img, name) in [(&a, "a.img"), (&b, "b.img")] {
        let snap = snaps
            .iter()
            .find(|s| str_of(s, "source").ends_with(name))
            .unwrap_or_else(|| panic!("no snapshot of {name}: {snaps:?}"));
        t.assert_restores(str_of(snap, "snapshot_id"), img.hash(), img.size());
    }
}

#[test]
fn forget_and_prune_on_s3_keep_what_is_kept() {
    let t = s3_repo(&["--pack-size-mib", "1"]);
    let img = Image::create(&t.path("disk.img"), 32 * BS);
    let mut kept = Vec::new();
    for round in 0..3u64 {
        for i in 0..32 {
            if round == 0 || i % 3 == round {
                img.write_block(i, &random_block(30 + round, i));
            }
        }
        let s = t.backup(&img.path, &[]);
        kept.push((TestRepo::id_of(&s), img.hash()));
    }
    // Forget the full (its overwritten blocks become unused); prune; the
    // rest restore bit for bit.
    t.run(&[&"forget", &kept[0].0]).ok();
    let p = t.run(&[&"--json", &"prune", &"--max-unused", &"0"]).ok();
    let summary = p.json();
    assert!(
        u64_of(&summary, "deleted_bytes") + u64_of(&summary, "rewritten_bytes") > 0,
        "{summary}"
    );
    assert_clean(&t);
    for (id, hash) in [&kept[1], &kept[2]] {
        t.assert_restores(id, *hash, img.size());
    }
    // A machine whose cache predates the prune sees the packs as they are.
    let other = t.other_machine();
    other.assert_restores(&kept[2].0, kept[2].1, img.size());
}

#[test]
fn init_twice_is_refused_and_a_missing_bucket_is_named() {
    let server = S3Server::shared();
    let url = server.fresh_url("x");
    let t = TestRepo::at(&url, server.env(), &[]);
    let again = t.run(&[&"init"]);
    assert_ne!(again.code, 0);
    again.stderr_mentions(&["already holds a repository"]);
    let nobucket = server.fresh_url("y");
    let r = run_in_env(
        t.root(),
        &[&"-r", &nobucket, &"snapshots"],
        &server
            .env()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
    );
    assert_ne!(r.code, 0);
    r.stderr_mentions(&["NoSuchBucket"]);
}

#[test]
fn unsupported_locations_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (arg, says) in [
        ("sftp://host/backups", "does not support 'sftp://'"),
        ("s3:host/bucket", "looks like a restic location"),
        ("https://host/bucket", "does not support 'https://'"),
    ] {
        for cmd in ["init", "snapshots"] {
            let r = run_in(dir.path(), &[&"-r", &arg, &cmd]);
            assert_eq!(r.code, 1, "{arg} {cmd}: {}", r.stderr);
            r.stderr_mentions(&[arg, says]);
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files created: {left:?}");
}

#[test]
fn credentials_come_from_the_environment_or_the_shared_file_never_argv() {
    let server = S3Server::shared();
    let url = server.fresh_url("c");
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<(String, String)> = server
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .chain([
            ("HOME".to_string(), dir.path().display().to_string()),
            (
                "CBTVAULT_CACHE_DIR".to_string(),
                dir.path().join("cache").display().to_string(),
            ),
        ])
        .collect();
    let env = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    };
    let run = |e: &[(String, String)], args: &[&dyn AsRef<OsStr>]| {
        let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"-r", &url];
        all.extend_from_slice(args);
        let pairs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut cmd_env = pairs.clone();
        cmd_env.push(("AWS_ACCESS_KEY_ID", ""));
        cmd_env.push(("AWS_SECRET_ACCESS_KEY", ""));
        run_in_env(dir.path(), &all, &cmd_env)
    };
    // None at all: the error says where they come from.
    let r = run(&env(&[]), &[&"init"]);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&["AWS_ACCESS_KEY_ID", "credentials file"]);
    // The shared credentials file, profile chosen by AWS_PROFILE.
    std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
    std::fs::write(
        dir.path().join(".aws/credentials"),
        "[default]\naws_access_key_id = a\naws_secret_access_key = b\n[ops]\naws_access_key_id=c\naws_secret_access_key=d\n",
    )
    .unwrap();
    run(&env(&[]), &[&"init", &"--no-encrypt"]).ok();
    let r = run(&env(&[("AWS_PROFILE", "nope")]), &[&"snapshots"]);
    assert_eq!(r.code, 1);
    r.stderr_mentions(&["[nope]"]);
    run(&env(&[("AWS_PROFILE", "ops")]), &[&"snapshots"]).ok();
    // There is no option that takes a key.
    let r = run(&env(&[]), &[&"--s3-secret-access-key", &"x", &"snapshots"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// What the fault proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Pass,
    /// `503 SlowDown`, as throttling S3 answers.
    SlowDown,
    /// The connection closed without an answer.
    Drop,
    /// Held longer than the client's request timeout, then passed.
    Stall,
}

/// A proxy in front of the real server that injects faults: request `n`
/// (counting from 0) gets `plan(n)`. Each request is forwarded on a
/// connection of its own (`Connection: close`).
struct FaultProxy {
    endpoint: String,
    counts: Arc<Mutex<HashMap<&'static str, u64>>>,
}

impl FaultProxy {
    fn start(upstream: &str, plan: fn(u64) -> Fault) -> FaultProxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let counts: Arc<Mutex<HashMap<&'static str, u64>>> = Default::default();
        let seen = counts.clone();
        let next = Arc::new(AtomicU64::new(0));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let upstream = upstream.clone();
                let seen = seen.clone();
                let next = next.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(conn, &upstream, plan, &next, &seen);
                });
            }
        });
        FaultProxy { endpoint, counts }
    }

    fn count(&self, what: &str) -> u64 {
        self.counts.lock().unwrap().get(what).copied().unwrap_or(0)
    }
}

/// Reads one request (head and Content-Length body), applies the plan.
fn serve_one(
    mut conn: TcpStream,
    upstream: &str,
    plan: fn(u64) -> Fault,
    next: &AtomicU64,
    seen: &Mutex<HashMap<&'static str, u64>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let length: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    let fault = plan(next.fetch_add(1, Ordering::SeqCst));
    let name = match fault {
        Fault::Pass => "pass",
        Fault::SlowDown => "slowdown",
        Fault::Drop => "drop",
        Fault::Stall => "stall",
    };
    *seen.lock().unwrap().entry(name).or_default() += 1;
    match fault {
        Fault::Drop => return Ok(()),
        Fault::SlowDown => {
            let doc = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            write!(
                conn,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{doc}",
                doc.len()
            )?;
            return Ok(());
        }
        Fault::Stall => std::thread::sleep(Duration::from_millis(2500)),
        Fault::Pass => {}
    }
    // Forward with Connection: close, relay the answer until it ends.
    let mut request: Vec<u8> = Vec::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        request.extend_from_slice(line.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    request.extend_from_slice(&body);
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&request)?;
    std::io::copy(&mut up, &mut conn)?;
    Ok(())
}

#[test]
fn transient_faults_are_retried_and_the_backup_is_whole() {
    let server = S3Server::shared();
    // Every 3rd request throttled, every 5th dropped, every 11th stalled
    // past the 1 s request timeout; the rest pass.
    let proxy = FaultProxy::start(&server.endpoint, |n| match n {
        n if n % 11 == 10 => Fault::Stall,
        n if n % 5 == 4 => Fault::Drop,
        n if n % 3 == 2 => Fault::SlowDown,
        _ => Fault::Pass,
    });
    let mut env: Vec<(String, String)> = server
        .env()
        .into_iter()
        .filter(|(k, _)| k != "CBTVAULT_S3_ENDPOINT" && k != "CBTVAULT_RETRY")
        .collect();
    env.push(("CBTVAULT_S3_ENDPOINT".into(), proxy.endpoint.clone()));
    env.push(("CBTVAULT_RETRY".into(), "8,10,100".into()));
    env.push(("CBTVAULT_S3_TIMEOUT_SECS".into(), "1".into()));
    let t = TestRepo::at(&server.fresh_url("faults"), env, &["--pack-size-mib", "1"]);
    let img = Image::create(&t.path("disk.img"), 40 * BS);
    for i in 0..40 {
        img.write_block(i, &random_block(41, i));
    }
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    assert_clean(&t);
    for what in ["slowdown", "drop", "stall", "pass"] {
        assert!(proxy.count(what) > 0, "no '{what}' fault was injected");
    }
}

#[test]
fn a_backup_that_cannot_upload_commits_nothing() {
    let server = S3Server::shared();
    // Everything passes until the first pack upload; then S3 throttles
    // for good.
    let proxy = FaultProxy::start(&server.endpoint, |n| {
        if n < 6 {
            Fault::Pass
        } else {
            Fault::SlowDown
        }
    });
    let url = server.fresh_url("down");
    let direct = TestRepo::at(&url, server.env(), &["--pack-size-mib", "1"]);
    let img = Image::create(&direct.path("disk.img"), 40 * BS);
    for i in 0..40 {
        img.write_block(i, &random_block(42, i));
    }
    let mut env: Vec<(String, String)> = direct
        .env
        .iter()
        .filter(|(k, _)| k != "CBTVAULT_S3_ENDPOINT" && k != "CBTVAULT_RETRY")
        .cloned()
        .collect();
    env.push(("CBTVAULT_S3_ENDPOINT".into(), proxy.endpoint.clone()));
    env.push(("CBTVAULT_RETRY".into(), "3,5,20".into()));
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"-r", &direct.repo, &"backup", &img.path];
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = run_in_env(direct.root(), &args, &pairs);
    assert_ne!(r.code, 0, "the backup went through: {}", r.stderr);
    r.stderr_mentions(&["SlowDown", "gave up after 3 tries"]);
    args.clear();
    assert!(direct.snapshots(&[]).is_empty(), "a snapshot was committed");
    assert!(proxy.count("slowdown") >= 3);
    // The repository is sound, and the next backup (server back) works.
    let (run, report) = direct.check(false);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    let s = direct.backup(&img.path, &[]);
    direct.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

/// An s3s-fs server (a second, independent S3 implementation, which
/// enforces SigV4) over a folder of its own, stopped with the test
/// process; it accepts exactly one key pair.
struct S3sFs {
    endpoint: String,
    _dir: tempfile::TempDir,
    _child: Child,
}

const S3S_KEY: &str = "cbtvault-key";
const S3S_SECRET: &str = "cbtvault-secret-0123456789";

impl S3sFs {
    fn start() -> S3sFs {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        let (port, child) = launch(
            |port| {
                format!(
                    "s3s-fs --host 127.0.0.1 --port {port} --access-key {S3S_KEY} --secret-key {S3S_SECRET} '{root}'"
                )
            },
            "s3s-fs: install it with cargo install s3s-fs@0.14.1 --features binary --locked (.ci/run does)",
        );
        S3sFs {
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            _child: child,
        }
    }

    fn env(&self, key: &str, secret: &str) -> Vec<(String, String)> {
        [
            ("CBTVAULT_S3_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", key),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("CBTVAULT_RETRY", "4,20,200"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

#[test]
fn a_server_that_checks_signatures_accepts_ours_and_refuses_wrong_keys_at_once() {
    let server = S3sFs::start();
    let t = TestRepo::at(
        "s3://signed/vault",
        server.env(S3S_KEY, S3S_SECRET),
        &["--pack-size-mib", "1"],
    );
    let img = Image::create(&t.path("disk.img"), 40 * BS);
    for i in 0..40 {
        img.write_block(i, &random_block(60, i));
    }
    let s = t.backup(&img.path, &[]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    assert_clean(&t);
    // Refused credentials are permanent: no retries, a clear word.
    for (key, secret, says) in [
        (S3S_KEY, "not-the-secret", "secret key does not match"),
        ("someone-else", S3S_SECRET, "AWS_ACCESS_KEY_ID"),
    ] {
        let mut env = server.env(key, secret);
        env.push((
            "CBTVAULT_CACHE_DIR".into(),
            t.path("cache-wrong").display().to_string(),
        ));
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let started = Instant::now();
        let r = run_in_env(t.root(), &[&"-r", &t.repo, &"snapshots"], &pairs);
        assert_eq!(r.code, 1, "{key}: {}", r.stderr);
        r.stderr_mentions(&[says]);
        assert!(!r.stderr.contains("gave up after"), "retried: {}", r.stderr);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!r.stderr.contains(secret), "the secret was printed");
    }
}
