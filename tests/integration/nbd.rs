//! The NBD client against qemu-nbd as a real server: plain TCP, unix
//! socket, TLS with x509 credentials made by the test, raw and qcow2 images,
//! and QEMU persistent dirty bitmaps for incrementals. Plus a hostile
//! in-process server, named by what it does wrong.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{hash_file, random_block, Image, TestRepo, BS};

/// An NBD server child (qemu-nbd, nbdkit), killed on drop.
struct QemuNbd {
    child: Child,
    uri: String,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts qemu-nbd read-only on TCP or a unix socket, serving 8 clients
/// and staying up after they leave.
fn qemu_nbd(image: &Path, format: &str, unix: Option<&Path>, extra: &[&str]) -> QemuNbd {
    let mut flags = vec!["-r", "-t", "--shared=8"];
    flags.extend_from_slice(extra);
    qemu_nbd_with(image, format, unix, &flags)
}

/// Starts qemu-nbd on TCP or a unix socket with only `flags` besides the
/// format and export name (its defaults otherwise: one client).
fn qemu_nbd_with(image: &Path, format: &str, unix: Option<&Path>, flags: &[&str]) -> QemuNbd {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", format, "-x", "disk"]);
    cmd.args(flags);
    let uri = match unix {
        Some(sock) => {
            cmd.arg("-k").arg(sock);
            format!("nbd+unix:///disk?socket={}", sock.display())
        }
        None => {
            let port = free_port();
            cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            format!("nbd://127.0.0.1:{port}/disk")
        }
    };
    cmd.arg(image).stdout(Stdio::null()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("start qemu-nbd (qemu-utils)");
    let server = QemuNbd { child, uri };
    match unix {
        Some(sock) => wait_for(|| sock.exists(), "qemu-nbd socket"),
        None => {
            let addr = server
                .uri
                .trim_start_matches("nbd://")
                .split('/')
                .next()
                .unwrap()
                .to_string();
            wait_for(|| TcpStream::connect(&addr).is_ok(), "qemu-nbd port")
        }
    }
    server
}

/// An image with random, zero and text blocks (a ~ 1/3 each).
fn mixed_image(t: &TestRepo, name: &str, blocks: u64) -> Image {
    let img = Image::create(&t.path(name), blocks * BS);
    for i in 0..blocks {
        match i % 3 {
            0 => img.write_block(i, &random_block(7, i)),
            1 => {}
            _ => img.write_block(i, &crate::util::text_block(7, i)),
        }
    }
    img
}

fn data_blocks(blocks: u64) -> u64 {
    (0..blocks).filter(|i| i % 3 != 1).count() as u64
}

#[test]
fn tcp_raw_full_backup_reads_only_allocated_blocks_and_restores_exactly() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 48);
    let server = qemu_nbd(&img.path, "raw", None, &[]);
    let s = t.backup(Path::new(&server.uri), &[]);
    // base:allocation lets the zero blocks (holes) go unread.
    assert_eq!(s["blocks_read"], data_blocks(48), "{s}");
    assert_eq!(s["blocks_new"], data_blocks(48));
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

/// A full of an export larger than one block status window (1 GiB): the
/// allocation map is walked window by window while the blocks are read,
/// data on both sides of each window boundary and an extent across one
/// included; the incremental after it (a parent: the map is collected
/// first) finds the same blocks.
#[test]
fn an_export_of_several_status_windows_is_read_while_its_map_is_walked() {
    let t = TestRepo::new();
    let gib = 1u64 << 30;
    let img = Image::create(&t.path("big.raw"), 3 * gib + 5 * BS);
    let blocks: Vec<u64> = [
        0,
        gib / BS - 1,
        gib / BS,
        2 * gib / BS - 2,
        2 * gib / BS - 1,
        2 * gib / BS,
        2 * gib / BS + 1,
        3 * gib / BS + 4,
    ]
    .to_vec();
    for &b in &blocks {
        img.write_block(b, &random_block(11, b));
    }
    let server = qemu_nbd(&img.path, "raw", None, &[]);
    let s = t.backup(Path::new(&server.uri), &["--nbd-connections", "2"]);
    assert_eq!(s["blocks_read"], blocks.len() as u64, "{s}");
    assert_eq!(s["blocks_new"], blocks.len() as u64, "{s}");
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    let s2 = t.backup(Path::new(&server.uri), &[]);
    assert_eq!(s2["parent_id"], s["snapshot_id"]);
    assert_eq!(s2["blocks_read"], blocks.len() as u64, "{s2}");
    assert_eq!(s2["blocks_new"], 0, "{s2}");
}

#[test]
fn unix_socket_qcow2_round_trip() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 40);
    let qcow = t.path("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&img.path)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(st.success());
    let sock = t.path("nbd.sock");
    let server = qemu_nbd(&qcow, "qcow2", Some(&sock), &[]);
    let s = t.backup(Path::new(&server.uri), &["--nbd-connections", "2"]);
    assert_eq!(s["blocks_read"], data_blocks(40));
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    // The snapshot's source is the URI, so the next run finds its parent.
    let s2 = t.backup(Path::new(&server.uri), &[]);
    assert_eq!(s2["parent_id"], s["snapshot_id"]);
    assert_eq!(s2["blocks_new"], 0);
}

/// x509 credentials for qemu-nbd: a CA and a server certificate for
/// 127.0.0.1 and localhost.
struct Creds {
    dir: PathBuf,
    ca: PathBuf,
    server_cert: PathBuf,
    /// A client certificate the CA issued, and its key (mode 600).
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_creds(root: &Path) -> Creds {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = root.join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cbtvault test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cbtvault backup client");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = params.signed_by(&client_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("client-cert.pem"), client.pem()).unwrap();
    let key_path = dir.join("client-key.pem");
    std::fs::write(&key_path, client_key.serialize_pem()).unwrap();
    set_mode(&key_path, 0o600);
    Creds {
        ca: dir.join("ca-cert.pem"),
        server_cert: dir.join("server-cert.pem"),
        client_cert: dir.join("client-cert.pem"),
        client_key: key_path,
        dir,
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn qemu_nbd_tls(image: &Path, creds: &Creds) -> QemuNbd {
    qemu_nbd_tls_verifying(image, creds, false)
}

/// qemu-nbd with TLS; with `verify_peer`, clients must present a
/// certificate the CA issued.
fn qemu_nbd_tls_verifying(image: &Path, creds: &Creds, verify_peer: bool) -> QemuNbd {
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={}",
        creds.dir.display(),
        if verify_peer { "on" } else { "no" }
    );
    let mut s = qemu_nbd(
        image,
        "raw",
        None,
        &["--object", &object, "--tls-creds", "tls0"],
    );
    s.uri = s.uri.replacen("nbd://", "nbds://", 1);
    s
}

#[test]
fn tls_with_ca_and_with_pinned_certificate() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 24);
    let creds = make_creds(t.root());
    let server = qemu_nbd_tls(&img.path, &creds);
    let ca = creds.ca.to_str().unwrap();
    let s = t.backup(Path::new(&server.uri), &["--tls-ca", ca]);
    assert_eq!(s["blocks_read"], data_blocks(24));
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    let pin = creds.server_cert.to_str().unwrap();
    let s = t.backup(
        Path::new(&server.uri),
        &["--tls-cert-pin", pin, "--tls-name", "localhost"],
    );
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

#[test]
fn tls_refusals_read_no_data() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 8);
    let creds = make_creds(t.root());
    let other = make_creds(&t.path("other"));
    let server = qemu_nbd_tls(&img.path, &creds);
    let uri = Path::new(&server.uri);
    let presented = openssl_fingerprint(&creds.server_cert);
    // A pinned certificate that is not the server's: both fingerprints.
    let r = t.try_backup(
        uri,
        &["--tls-cert-pin", other.server_cert.to_str().unwrap()],
    );
    let r = r.expect_code(1);
    r.stderr_mentions(&[
        "tls",
        "not the pinned certificate",
        &presented,
        &openssl_fingerprint(&other.server_cert),
        "--tls-cert-pin",
    ]);
    assert_said_once(&r.stderr);
    // The right certificate, the wrong name: both names, and --tls-name.
    for trust in [
        ["--tls-cert-pin", creds.server_cert.to_str().unwrap()],
        ["--tls-ca", creds.ca.to_str().unwrap()],
    ] {
        let mut args = trust.to_vec();
        args.extend(["--tls-name", "backup.example"]);
        let r = t.try_backup(uri, &args);
        let r = r.expect_code(1);
        r.stderr_mentions(&[
            "tls",
            "not for 'backup.example'",
            "'localhost', '127.0.0.1'",
            "--tls-name",
            &presented,
        ]);
        assert_said_once(&r.stderr);
    }
    // A CA that did not issue the server certificate: its fingerprint and
    // the options that would trust it.
    let r = t.try_backup(uri, &["--tls-ca", other.ca.to_str().unwrap()]);
    let r = r.expect_code(1);
    r.stderr_mentions(&[
        "tls",
        "not issued by a certificate authority",
        &presented,
        "--tls-cert-pin",
        "--tls-ca",
    ]);
    assert!(!r.stderr.contains("self-signed"), "{}", r.stderr);
    assert_said_once(&r.stderr);
    // Trust files that hold no certificate: refused before connecting,
    // naming the file.
    let garbage = t.path("garbage.pem");
    std::fs::write(&garbage, b"not a certificate\n").unwrap();
    let key = creds.dir.join("server-key.pem");
    for (file, why) in [
        (&garbage, "is not PEM"),
        (&key, "holds no PEM certificate (it holds a private key)"),
    ] {
        let r = t.try_backup(uri, &["--tls-ca", file.to_str().unwrap()]);
        r.expect_code(1)
            .stderr_mentions(&[&format!("--tls-ca file '{}' {why}", file.display())]);
    }
    // Plaintext against a TLS-only server: refused, not downgraded.
    let plain = server.uri.replacen("nbds://", "nbd://", 1);
    let r = t.try_backup(Path::new(&plain), &[]);
    r.expect_code(1).stderr_mentions(&["tls"]);
    drop(server);
    // TLS asked for, the server has none: no plaintext fallback.
    let plain_server = qemu_nbd(&img.path, "raw", None, &[]);
    let r = t.try_backup(
        Path::new(&plain_server.uri),
        &["--tls-ca", creds.ca.to_str().unwrap()],
    );
    r.expect_code(1).stderr_mentions(&["tls"]);
    assert!(t.snapshot_ids().is_empty(), "nothing may be committed");
}

#[test]
fn tls_server_requiring_a_client_certificate_is_named_once() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 4);
    let creds = make_creds(t.root());
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=yes",
        creds.dir.display()
    );
    let mut server = qemu_nbd(
        &img.path,
        "raw",
        None,
        &["--object", &object, "--tls-creds", "tls0"],
    );
    server.uri = server
        .uri
        .replacen("nbds://", "nbd://", 1)
        .replacen("nbd://", "nbds://", 1);
    let r = t.try_backup(
        Path::new(&server.uri),
        &[
            "--tls-ca",
            creds.ca.to_str().unwrap(),
            "--nbd-connections",
            "1",
        ],
    );
    let r = r.expect_code(1);
    r.stderr_mentions(&["client certificate"]);
    assert_said_once(&r.stderr);
    assert!(t.snapshot_ids().is_empty());
}

/// `AB:CD:...` as `openssl x509 -fingerprint -sha256` prints it.
pub(crate) fn openssl_fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let (_, fp) = text.trim().split_once('=').expect("openssl's Fingerprint=");
    assert_eq!(fp.len(), 95, "{text}");
    fp.to_string()
}

/// One error line, no clause of it twice, no documentation link.
pub(crate) fn assert_said_once(stderr: &str) {
    // Text, or with --json the error message's text.
    let errors: Vec<String> = stderr
        .lines()
        .filter_map(|l| match l.strip_prefix("error:") {
            Some(_) => Some(l.to_string()),
            None => serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(|v| v["message_type"] == "error")
                .map(|v| format!("error: {}", v["message"].as_str().unwrap_or_default())),
        })
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let clauses: Vec<&str> = errors[0].split([':', ';']).map(str::trim).collect();
    for (i, c) in clauses.iter().enumerate() {
        assert!(
            c.len() < 12 || !clauses[i + 1..].contains(c),
            "'{c}' twice in {stderr}"
        );
    }
    assert!(!stderr.contains("docs.rs"), "{stderr}");
}

#[test]
fn tls_client_certificate_when_the_server_verifies_peers() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 16);
    let creds = make_creds(t.root());
    let other = make_creds(&t.path("other"));
    let server = qemu_nbd_tls_verifying(&img.path, &creds, true);
    let uri = Path::new(&server.uri);
    let ca = creds.ca.to_str().unwrap();
    let (cert, key) = (
        creds.client_cert.to_str().unwrap(),
        creds.client_key.to_str().unwrap(),
    );
    // Without a client certificate: refused, and the message says what to give.
    let r = t.try_backup(uri, &["--tls-ca", ca]).expect_code(1);
    r.stderr_mentions(&[
        "requires a TLS client certificate",
        "--tls-client-cert FILE --tls-client-key FILE",
    ]);
    // With one the CA issued: backed up and restored exactly, no warning.
    let r = t
        .try_backup(
            uri,
            &[
                "--tls-ca",
                ca,
                "--tls-client-cert",
                cert,
                "--tls-client-key",
                key,
            ],
        )
        .ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let s = r.json();
    assert_eq!(s["blocks_read"], data_blocks(16), "{s}");
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
    // A certificate another CA issued: the server refuses it.
    let r = t.try_backup(
        uri,
        &[
            "--tls-ca",
            ca,
            "--tls-client-cert",
            other.client_cert.to_str().unwrap(),
            "--tls-client-key",
            other.client_key.to_str().unwrap(),
        ],
    );
    r.expect_code(1).stderr_mentions(&["tls"]);
    // A key that is not the certificate's: named, before connecting.
    let other_key = other.client_key.to_str().unwrap();
    let r = t.try_backup(
        uri,
        &[
            "--tls-ca",
            ca,
            "--tls-client-cert",
            cert,
            "--tls-client-key",
            other_key,
        ],
    );
    r.expect_code(1)
        .stderr_mentions(&[other_key, "not the key of the first certificate"]);
    // Not PEM at all: the file is named.
    let junk = t.path("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    set_mode(&junk, 0o600);
    let junk = junk.to_str().unwrap();
    let r = t.try_backup(
        uri,
        &[
            "--tls-ca",
            ca,
            "--tls-client-cert",
            cert,
            "--tls-client-key",
            junk,
        ],
    );
    r.expect_code(1)
        .stderr_mentions(&[junk, "client key", "is not PEM"]);
    // A key readable by others works, with a warning.
    set_mode(&creds.client_key, 0o644);
    let r = t
        .try_backup(
            uri,
            &[
                "--tls-ca",
                ca,
                "--tls-client-cert",
                cert,
                "--tls-client-key",
                key,
            ],
        )
        .ok();
    r.stderr_mentions(&["warning", key, "readable by others", "644"]);
    // The two flags go together (a usage error).
    t.try_backup(uri, &["--tls-ca", ca, "--tls-client-cert", cert])
        .expect_code(2);
    t.try_backup(uri, &["--tls-ca", ca, "--tls-client-key", key])
        .expect_code(2);
}

/// README's example, qemu-nbd serving one client (its default): the extra
/// connections never get a handshake, so the backup goes on with one after
/// a short wait, says so, and reads everything right.
#[test]
fn qemu_nbd_serving_one_client_backs_up_in_seconds_on_one_connection() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 32);
    let sock = t.path("nbd.sock");
    let server = qemu_nbd_with(&img.path, "raw", Some(&sock), &["-r"]);
    let started = Instant::now();
    let r = t.try_backup(Path::new(&server.uri), &[]).ok();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "took {took:?}");
    r.stderr_mentions(&["continuing with 1 of 4 connections", "-e/--shared"]);
    // One line, nothing else (stdout has the JSON summary).
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    let s = r.json();
    assert_eq!(s["blocks_read"], data_blocks(32), "{s}");
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

/// A writable export without NBD_FLAG_CAN_MULTI_CONN (qemu-nbd's default
/// without -r) gets one connection at once, with one line saying so.
#[test]
fn writable_export_without_multi_conn_gets_one_connection_without_waiting() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 16);
    let sock = t.path("nbd.sock");
    let proxy = CountingProxy::start(&sock, &t.path("proxy.sock"));
    let _server = qemu_nbd_with(&img.path, "raw", Some(&sock), &[]);
    let r = t.try_backup(Path::new(&proxy.uri()), &[]).ok();
    r.stderr_mentions(&["using 1 of 4 connections", "NBD_FLAG_CAN_MULTI_CONN"]);
    assert_eq!(proxy.connections(), 1);
    t.assert_restores(&TestRepo::id_of(&r.json()), img.hash(), img.size());
}

/// qemu-nbd -e 4 (README's advice): four connections, all used, no line.
#[test]
fn qemu_nbd_shared_4_gets_4_connections() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 64);
    let sock = t.path("nbd.sock");
    let proxy = CountingProxy::start(&sock, &t.path("proxy.sock"));
    let _server = qemu_nbd_with(&img.path, "raw", Some(&sock), &["-e", "4"]);
    let started = Instant::now();
    let r = t.try_backup(Path::new(&proxy.uri()), &[]).ok();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!r.stderr.contains("connections"), "{}", r.stderr);
    assert_eq!(proxy.connections(), 4);
    // A connection is counted when its copy ends, which may be a moment
    // after the backup exits.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.served() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.served() >= 4, "every connection carried requests");
    t.assert_restores(&TestRepo::id_of(&r.json()), img.hash(), img.size());
}

/// A unix socket proxy in front of an NBD server's socket: counts the
/// connections clients open, and those that carried data past the
/// handshake.
struct CountingProxy {
    path: PathBuf,
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    busy: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingProxy {
    fn start(upstream: &Path, path: &Path) -> CountingProxy {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = UnixListener::bind(path).unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let (o, b, up) = (opened.clone(), busy.clone(), upstream.to_path_buf());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                o.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = UnixStream::connect(&up) else {
                    continue;
                };
                let (mut c1, mut s1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c1, &mut s1);
                    let _ = s1.shutdown(std::net::Shutdown::Write);
                });
                let b = b.clone();
                std::thread::spawn(move || {
                    let (mut s2, mut c2) = (server, client);
                    // Handshake replies are small; a read reply is not.
                    if let Ok(n) = std::io::copy(&mut s2, &mut c2) {
                        if n > 64 * 1024 {
                            b.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CountingProxy {
            path: path.to_path_buf(),
            opened,
            busy,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.path.display())
    }

    fn connections(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn served(&self) -> usize {
        self.busy.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn qemu_io(image: &Path, cmd: &str) {
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(image)
        .stdout(Stdio::null())
        .status()
        .expect("qemu-io");
    assert!(st.success(), "qemu-io {cmd}");
}

fn raw_of(qcow: &Path, out: &Path) -> (blake3::Hash, u64) {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
    (hash_file(out), std::fs::metadata(out).unwrap().len())
}

#[test]
fn dirty_bitmap_incremental_reads_exactly_the_written_blocks() {
    let t = TestRepo::new();
    let qcow = t.path("d.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    qemu_io(&qcow, "write -P 0x11 0 1M");
    qemu_io(&qcow, "write -P 0x22 4M 512k");
    // The checkpoint: a bitmap starts recording now; the full backup
    // describes the disk at this instant.
    let st = Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&qcow)
        .arg("b0")
        .status()
        .unwrap();
    assert!(st.success());
    let full = {
        let server = qemu_nbd(&qcow, "qcow2", Some(&t.path("a.sock")), &[]);
        t.backup(
            Path::new(&server.uri),
            &["--dirty-bitmap", "b0", "--source-id", "vm1/disk0"],
        )
    };
    assert_eq!(full["parent_id"], serde_json::Value::Null);
    assert_eq!(full["blocks_read"], 16 + 8, "{full}");
    // Guest writes: 4 KiB inside block 2, 64 KiB spanning blocks 100-101,
    // and zeroes over a block that had data (block 5).
    qemu_io(&qcow, "write -P 0x33 135168 4k");
    qemu_io(&qcow, "write -P 0x44 6586368 64k");
    qemu_io(&qcow, "write -z 327680 64k");
    // A new server on another socket: --source-id keeps the identity.
    let server = qemu_nbd(&qcow, "qcow2", Some(&t.path("b.sock")), &["-B", "b0"]);
    let inc = t.backup(
        Path::new(&server.uri),
        &["--dirty-bitmap", "b0", "--source-id", "vm1/disk0"],
    );
    drop(server);
    assert_eq!(inc["parent_id"], full["snapshot_id"], "{inc}");
    // Blocks 2, 5, 100, 101 read: with a bitmap over a found parent the
    // marked blocks are read whatever the allocation (block 5, zeroed,
    // reads as a zero block); the whole-disk block-status walk is not
    // paid for.
    assert_eq!(inc["blocks_read"], 4, "{inc}");
    let (h, len) = raw_of(&qcow, &t.path("after.raw"));
    t.assert_restores(&TestRepo::id_of(&inc), h, len);
    let snap = t.cat_snapshot(&TestRepo::id_of(&inc));
    assert!(
        snap["bitmap"].is_string(),
        "the dirty bitmap is kept with the snapshot"
    );
}

#[test]
fn missing_dirty_bitmap_starts_a_new_backup_set_loudly() {
    let t = TestRepo::new();
    let img = mixed_image(&t, "disk.raw", 8);
    let server = qemu_nbd(&img.path, "raw", None, &[]);
    let uri = Path::new(&server.uri);
    t.backup(uri, &[]);
    let r = t.try_backup(uri, &["--dirty-bitmap", "nosuch"]).ok();
    let s = r.json();
    assert_eq!(s["parent_id"], serde_json::Value::Null);
    assert!(s["new_set_reason"].as_str().unwrap().contains("nosuch"));
    // The export was first opened for the bitmap alone (a parent exists);
    // the new full opened it again with base:allocation, so the holes
    // still go unread.
    assert_eq!(s["blocks_read"], data_blocks(8), "{s}");
    r.stderr_mentions(&["warning", "nosuch", "full"]);
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}

// ---------------------------------------------------------------- hostile

const NBDMAGIC: u64 = 0x4e42444d41474943;
const IHAVEOPT: u64 = 0x49484156454f5054;
const REPLY_MAGIC: u64 = 0x0003e889045565a9;

/// What the hostile server does once a client reaches transmission.
#[derive(Clone, Copy)]
enum Misbehaviour {
    OptionReplyAbsurdLength,
    OversizedChunk,
    UnknownCookie,
    ShortBlockStatus,
    EofMidReply,
    DropAfterSomeReads,
    /// Serves a 4 MiB export; the first connection drops at its second
    /// read, every later one behaves.
    DropOnceMidBatch,
    /// Claims an export of 2^63 bytes.
    Claims2Pow63Bytes,
    /// The second and later connections claim one block more.
    OtherSizeOnSecondConnection,
    /// The first connection drops at its first read; every later one
    /// claims one block more.
    OtherSizeOnReconnect,
    /// Hands over block status, then reads every read request and never
    /// answers one.
    NeverAnswersReads,
    /// Accepts the connection and never sends its greeting.
    SilentInHandshake,
}

/// Whether a `DropOnceMidBatch` server has dropped its connection yet.
static DROPPED_ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn read_exact(s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok()?;
    Some(b)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn opt_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

const SIZE: u64 = 16 * BS;

/// What the hostile server's export holds at `[offset, offset+len)`: a
/// pattern that differs for every 512-byte sector of a 4 MiB export.
fn hostile_data(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|p| ((p / 512) % 251) as u8 ^ ((p / (512 * 251)) as u8).wrapping_mul(7))
        .collect()
}

/// Reads (and ignores) whatever the client sends until it hangs up.
fn drain(s: &mut TcpStream) -> Option<()> {
    let mut b = [0u8; 4096];
    while s.read(&mut b).ok()? > 0 {}
    Some(())
}

/// One client session (the `index`th of its server) of the hostile server.
fn hostile_session(mut s: TcpStream, how: Misbehaviour, index: usize) -> Option<()> {
    let size = match how {
        Misbehaviour::DropOnceMidBatch => 64 * BS,
        Misbehaviour::Claims2Pow63Bytes => 1 << 63,
        Misbehaviour::OtherSizeOnSecondConnection | Misbehaviour::OtherSizeOnReconnect
            if index > 0 =>
        {
            SIZE + BS
        }
        Misbehaviour::SilentInHandshake => return drain(&mut s),
        _ => SIZE,
    };
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes()); // fixed newstyle, no zeroes
    s.write_all(&g).ok()?;
    read_exact(&mut s, 4)?;
    let mut structured = false;
    loop {
        let h = read_exact(&mut s, 16)?;
        let option = be32(&h[8..]);
        let data = read_exact(&mut s, be32(&h[12..]) as usize)?;
        match option {
            8 => {
                if let Misbehaviour::OptionReplyAbsurdLength = how {
                    let mut v = opt_reply(8, 1, &[]);
                    v[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                    s.write_all(&v).ok()?;
                    return Some(());
                }
                structured = true;
                s.write_all(&opt_reply(8, 1, &[])).ok()?;
            }
            10 => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(b"base:allocation");
                s.write_all(&opt_reply(10, 4, &d)).ok()?;
                s.write_all(&opt_reply(10, 1, &[])).ok()?;
            }
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&3u16.to_be_bytes());
                s.write_all(&opt_reply(7, 3, &info)).ok()?;
                s.write_all(&opt_reply(7, 1, &[])).ok()?;
                break;
            }
            _ => {
                let _ = data;
                s.write_all(&opt_reply(option, 0x8000_0001, &[])).ok()?;
            }
        }
    }
    assert!(structured);
    let mut reads = 0;
    loop {
        let r = read_exact(&mut s, 28)?;
        let kind = u16::from_be_bytes([r[6], r[7]]);
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
        let length = be32(&r[24..]);
        let chunk = |flags: u16, ty: u16, cookie: u64, len: u32| {
            let mut v = 0x668e33efu32.to_be_bytes().to_vec();
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&ty.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
            v
        };
        match kind {
            7 => {
                if let Misbehaviour::ShortBlockStatus = how {
                    // Claims 2 descriptors, sends a payload too short for them.
                    let mut v = chunk(1, 5, cookie, 8);
                    v.extend_from_slice(&1u32.to_be_bytes());
                    v.extend_from_slice(&(size as u32).to_be_bytes());
                    s.write_all(&v).ok()?;
                    continue;
                }
                let mut v = chunk(1, 5, cookie, 12);
                v.extend_from_slice(&1u32.to_be_bytes());
                v.extend_from_slice(&(size as u32).to_be_bytes());
                v.extend_from_slice(&0u32.to_be_bytes());
                s.write_all(&v).ok()?;
            }
            0 => {
                reads += 1;
                match how {
                    Misbehaviour::OversizedChunk => {
                        s.write_all(&chunk(1, 1, cookie, 0x7fff_ffff)).ok()?;
                        return Some(());
                    }
                    Misbehaviour::UnknownCookie => {
                        s.write_all(&chunk(1, 0, cookie ^ 0xdead_beef, 0)).ok()?;
                        return Some(());
                    }
                    Misbehaviour::EofMidReply => {
                        let mut v = chunk(1, 1, cookie, length + 8);
                        v.extend_from_slice(&offset.to_be_bytes());
                        v.extend_from_slice(&vec![0x5a; (length / 2) as usize]);
                        s.write_all(&v).ok()?;
                        return Some(());
                    }
                    Misbehaviour::DropAfterSomeReads if reads > 0 => return Some(()),
                    Misbehaviour::OtherSizeOnReconnect if index == 0 => return Some(()),
                    Misbehaviour::NeverAnswersReads => continue,
                    Misbehaviour::DropOnceMidBatch
                        if reads > 1
                            && !DROPPED_ONCE.swap(true, std::sync::atomic::Ordering::SeqCst) =>
                    {
                        return Some(())
                    }
                    _ => {
                        let mut v = chunk(1, 1, cookie, length + 8);
                        v.extend_from_slice(&offset.to_be_bytes());
                        v.extend_from_slice(&hostile_data(offset, length as u64));
                        s.write_all(&v).ok()?;
                    }
                }
            }
            2 => return Some(()),
            _ => return Some(()),
        }
    }
}

/// Serves every connection (retries reconnect) with the same misbehaviour.
fn hostile_server(how: Misbehaviour) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (index, s) in l.incoming().flatten().enumerate() {
            std::thread::spawn(move || hostile_session(s, how, index));
        }
    });
    format!("nbd://127.0.0.1:{port}/x")
}

fn assert_fails_cleanly(how: Misbehaviour, words: &[&str]) {
    assert_fails_cleanly_with(how, &["--nbd-connections", "1"], words);
}

/// Backs up the hostile server's export with `args`, asserts the backup
/// failed cleanly naming `words`, and returns how long it took.
fn assert_fails_cleanly_with(how: Misbehaviour, args: &[&str], words: &[&str]) -> Duration {
    let t = TestRepo::new();
    let uri = hostile_server(how);
    let started = Instant::now();
    let r = t.try_backup(Path::new(&uri), args);
    let took = started.elapsed();
    assert_eq!(r.code, 1, "{}: {}", r.command, r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r.stderr_mentions(words);
    assert!(t.snapshot_ids().is_empty(), "no snapshot may be committed");
    // A pack being written when the read failed leaves nothing behind.
    assert!(
        t.files_under("tmp").is_empty(),
        "{:?}",
        t.files_under("tmp")
    );
    took
}

#[test]
fn server_option_reply_of_absurd_length() {
    assert_fails_cleanly(Misbehaviour::OptionReplyAbsurdLength, &["too long"]);
}

#[test]
fn server_oversize_reply_chunk() {
    assert_fails_cleanly(Misbehaviour::OversizedChunk, &["exceeds"]);
}

#[test]
fn server_unknown_cookie() {
    assert_fails_cleanly(Misbehaviour::UnknownCookie, &["unknown cookie"]);
}

#[test]
fn server_short_block_status() {
    assert_fails_cleanly(Misbehaviour::ShortBlockStatus, &["block_status"]);
}

#[test]
fn server_eof_mid_reply() {
    assert_fails_cleanly(Misbehaviour::EofMidReply, &["nbd"]);
}

#[test]
fn server_drops_the_connection_mid_backup() {
    assert_fails_cleanly(Misbehaviour::DropAfterSomeReads, &["nbd"]);
}

#[test]
fn server_claims_2_pow_63_bytes_is_refused() {
    let took = assert_fails_cleanly_with(
        Misbehaviour::Claims2Pow63Bytes,
        &[],
        &[
            "export 'x'",
            "claims 9223372036854775808 bytes",
            "limit of 70368744177664 bytes",
        ],
    );
    // Refused at the handshake, not after reading for ever.
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn export_above_max_disk_size_is_refused_and_below_accepted() {
    assert_fails_cleanly_with(
        Misbehaviour::OtherSizeOnSecondConnection,
        &["--nbd-connections", "1", "--max-disk-size", "1023K"],
        &["claims 1048576 bytes", "limit of 1047552 bytes"],
    );
    // Exactly the export's size is accepted.
    let t = TestRepo::new();
    let uri = hostile_server(Misbehaviour::OtherSizeOnSecondConnection);
    let s = t.backup(
        Path::new(&uri),
        &["--nbd-connections", "1", "--max-disk-size", "1M"],
    );
    assert_eq!(s["blocks_read"], SIZE / BS);
    let r = t.try_backup(Path::new(&uri), &["--max-disk-size", "12X"]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    r.stderr_mentions(&["--max-disk-size", "unit"]);
    assert_eq!(t.snapshot_ids().len(), 1);
}

#[test]
fn second_connection_reports_another_size() {
    assert_fails_cleanly_with(
        Misbehaviour::OtherSizeOnSecondConnection,
        &["--nbd-connections", "2"],
        &[
            "connection 2 of 2",
            &format!("{} bytes", SIZE + BS),
            &format!("first connection reported {SIZE} bytes"),
        ],
    );
}

#[test]
fn reconnect_reports_another_size() {
    assert_fails_cleanly_with(
        Misbehaviour::OtherSizeOnReconnect,
        &["--nbd-connections", "1"],
        &[
            "reconnect of connection 1",
            &format!("{} bytes", SIZE + BS),
            &format!("first connection reported {SIZE} bytes"),
        ],
    );
}

/// One I/O timeout per request (with at most one reconnect), not minutes
/// of retries: the backup fails soon after the timeout, says which request
/// got no answer and for how long, and commits nothing.
#[test]
fn server_stops_answering_fails_within_the_io_timeout() {
    let took = assert_fails_cleanly_with(
        Misbehaviour::NeverAnswersReads,
        &["--nbd-connections", "2", "--io-timeout", "2"],
        &[
            "stopped answering",
            "no reply to read of",
            "at offset",
            "after 2.",
        ],
    );
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(9), "{took:?}");
}

#[test]
fn server_silent_in_the_handshake_fails_within_the_io_timeout() {
    let took = assert_fails_cleanly_with(
        Misbehaviour::SilentInHandshake,
        &["--io-timeout", "2"],
        &["stopped answering", "handshake", "export 'x'"],
    );
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(9), "{took:?}");
}

/// `nbdkit null size=SIZE` on a unix socket: an export of zeros of any
/// claimed size, up to 2^63 - 1 bytes.
fn nbdkit_null(dir: &Path, size: &str) -> QemuNbd {
    let sock = dir.join(format!("nbdkit-{size}.sock"));
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(["null", &format!("size={size}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit (apt install nbdkit)");
    wait_for(|| sock.exists(), "nbdkit socket");
    QemuNbd {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    }
}

#[test]
fn nbdkit_claiming_2_pow_63_minus_1_bytes_is_refused() {
    let t = TestRepo::new();
    let huge = nbdkit_null(&t.path(""), "9223372036854775807");
    let started = Instant::now();
    let r = t.try_backup(Path::new(&huge.uri), &[]);
    assert_eq!(r.code, 1, "{}: {}", r.command, r.stderr);
    r.stderr_mentions(&[
        "claims 9223372036854775807 bytes",
        "limit of 70368744177664 bytes",
    ]);
    assert!(started.elapsed() < Duration::from_secs(20));
    // --max-disk-size lowers the limit, and exactly the size passes.
    let small = nbdkit_null(&t.path(""), "1M");
    let r = t.try_backup(Path::new(&small.uri), &["--max-disk-size", "1023K"]);
    assert_eq!(r.code, 1, "{}: {}", r.command, r.stderr);
    r.stderr_mentions(&["claims 1048576 bytes", "limit of 1047552 bytes"]);
    assert!(t.snapshot_ids().is_empty());
    let s = t.backup(Path::new(&small.uri), &["--max-disk-size", "1M"]);
    t.assert_restores(
        &TestRepo::id_of(&s),
        blake3::hash(&vec![0u8; 1 << 20]),
        1 << 20,
    );
}

/// A read that fails with the connection is retried on a new one into a
/// new buffer, whose data must still land in its place in the batch (the
/// batch is read in pieces that join back without a copy otherwise).
#[test]
fn server_drops_once_mid_batch_and_the_retry_completes_the_backup() {
    let t = TestRepo::new();
    let uri = hostile_server(Misbehaviour::DropOnceMidBatch);
    let s = t.backup(Path::new(&uri), &["--nbd-connections", "1"]);
    assert!(DROPPED_ONCE.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(s["blocks_read"], 64);
    let image = hostile_data(0, 64 * BS);
    t.assert_restores(
        &TestRepo::id_of(&s),
        blake3::hash(&image),
        image.len() as u64,
    );
}

mod codec {
    use nbd::proto::{self, ClientHandshake, Decoded, HandshakeOptions, Request, Step};
    use proptest::prelude::*;

    fn options(tls: bool) -> HandshakeOptions {
        HandshakeOptions {
            export: "disk".into(),
            tls,
            structured_replies: true,
            meta_contexts: vec!["base:allocation".into()],
        }
    }

    /// The bytes an xapi-nbd-like server sends for a plaintext handshake in
    /// which GO is unsupported: the client must fall back to EXPORT_NAME.
    #[test]
    fn export_name_fallback_when_go_is_unsupported() {
        let mut hs = ClientHandshake::new(options(false));
        let mut g = proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE).to_vec();
        let Step::Send(sent) = hs.feed(&g).unwrap() else {
            panic!()
        };
        assert_eq!(
            &sent[..4],
            &1u32.to_be_bytes(),
            "client flags: fixed newstyle only"
        );
        g.clear();
        let r = proto::encode_option_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ERR_UNSUP, &[]);
        let Step::Send(sent) = hs.feed(&r).unwrap() else {
            panic!()
        };
        assert_eq!(&sent[8..12], &proto::OPT_GO.to_be_bytes());
        let r = proto::encode_option_reply(proto::OPT_GO, proto::REP_ERR_UNSUP, &[]);
        let Step::Send(sent) = hs.feed(&r).unwrap() else {
            panic!()
        };
        assert_eq!(&sent[8..12], &proto::OPT_EXPORT_NAME.to_be_bytes());
        let reply = proto::encode_export_name_reply(1 << 30, 3, false);
        // Delivered in two pieces: the codec asks for the rest.
        assert!(matches!(hs.feed(&reply[..50]).unwrap(), Step::NeedMore(84)));
        let Step::Done(n) = hs.feed(&reply[50..]).unwrap() else {
            panic!()
        };
        assert!(n.used_export_name && !n.structured_replies);
        assert_eq!(n.export.size_bytes, 1 << 30);
    }

    #[test]
    fn refused_starttls_is_an_error_not_a_downgrade() {
        let mut hs = ClientHandshake::new(options(true));
        let Step::Send(sent) = hs.feed(&proto::encode_greeting(1)).unwrap() else {
            panic!()
        };
        assert_eq!(&sent[12..16], &proto::OPT_STARTTLS.to_be_bytes());
        let r = proto::encode_option_reply(proto::OPT_STARTTLS, proto::REP_ERR_POLICY, &[]);
        assert!(matches!(hs.feed(&r), Err(proto::ProtoError::TlsRefused(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn handshake_never_panics_on_server_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            piece in 1usize..64,
            tls: bool,
        ) {
            let mut hs = ClientHandshake::new(options(tls));
            // A valid greeting first, so the fuzz reaches the option phase.
            let mut all = proto::encode_greeting(3).to_vec();
            all.extend_from_slice(&bytes);
            for chunk in all.chunks(piece) {
                match hs.feed(chunk) {
                    Ok(Step::StartTls(_)) => { if hs.tls_established().is_err() { break } }
                    Ok(Step::Done(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }

        #[test]
        fn reply_decoders_never_panic_and_bound_lengths(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            kind: u16,
        ) {
            let _ = proto::decode_chunk(kind, &bytes);
            if let Ok(Decoded::Done(proto::ReplyHeader::Chunk { length, .. }, _)) =
                proto::decode_reply_header(&bytes, true, 4096)
            {
                prop_assert!(length <= 4096);
            }
            let _ = proto::decode_option_reply(&bytes);
        }

        #[test]
        fn requests_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            let b = proto::encode_request(&r);
            prop_assert_eq!(proto::decode_request(&b).unwrap(), Decoded::Done(r, 28));
        }
    }
}

/// SIGTERM while a full is still walking the export's allocation map (each
/// 1 GiB window slowed by a test delay, reads already under way): 143,
/// nothing committed, no lock or temporary file left; the next backup of
/// the same export works and restores bit for bit.
#[test]
fn a_signal_during_the_allocation_walk_commits_nothing() {
    use crate::exit_codes::{finish, signal};
    let t = TestRepo::new();
    let gib = 1u64 << 30;
    let img = Image::create(&t.path("big.raw"), 3 * gib);
    for b in [0, 2 * gib / BS, 3 * gib / BS - 1] {
        img.write_block(b, &random_block(21, b));
    }
    let server = qemu_nbd(&img.path, "raw", None, &[]);
    let mut child = crate::util::spawn(
        &t,
        &[&"backup", &server.uri, &"--nbd-connections", &"2"],
        &[("CBTVAULT_TEST_DELAY", "allocation_window:600")],
    );
    crate::util::wait_for_lock(&t, &mut child);
    std::thread::sleep(Duration::from_millis(700));
    signal(&child, "TERM");
    let (code, stderr) = finish(child);
    assert_eq!(code, 143, "{stderr}");
    assert_eq!(t.snapshot_ids(), Vec::<String>::new(), "{stderr}");
    assert_eq!(t.files_under("locks"), Vec::<String>::new());
    assert_eq!(t.files_under("tmp"), Vec::<String>::new());
    let s = t.backup(Path::new(&server.uri), &[]);
    assert_eq!(s["blocks_read"], 3, "{s}");
    t.assert_restores(&TestRepo::id_of(&s), img.hash(), img.size());
}
