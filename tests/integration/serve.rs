//! `cbtvault serve` and the NBD server behind it, driven by real clients:
//! qemu-img (qemu-utils), nbdinfo and nbdcopy (libnbd-bin) and our own NBD
//! client, over unix sockets, TCP and TLS. The XenServer personality
//! (xapi-nbd) and hostile clients are tested in process, at the library
//! level, against a memory export; a corrupt block against a real
//! repository.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cbtvault::nbdserver::SnapshotExport;
use cbtvault::source::nbd::{NbdLimits, NbdSource};
use cbtvault::source::BlockSource;
use nbd::client::{Address, ConnectOptions, Connection};
use nbd::server::{
    self as nbdserver, Export, ExportError, ExportResolver, Listener, MemoryExport, Mode,
    ServerOptions,
};
use nbd::tls::{TlsOptions, Trust};
use nbd::{proto, NbdError, NbdUri, PoolOptions};
use serde_json::Value;

use crate::util::*;

/// `cbtvault serve` as a child process, killed on drop.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) uri: String,
    pub(crate) stderr: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// Stops the server with `signal` and returns its exit code.
    pub(crate) fn stop(mut self, signal: &str) -> i32 {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -s {signal} {pid}");
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().expect("wait for serve") {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("serve did not stop on {signal}");
    }
}

/// Starts `cbtvault -r REPO --json serve ARGS...` and waits for the line
/// naming its URI.
pub(crate) fn serve(t: &TestRepo, args: &[&str]) -> Served {
    let stderr = t.path(&format!("serve-{}.stderr", rand::random::<u32>()));
    let mut child = Command::new(bin())
        .arg("-r")
        .arg(&t.repo)
        .args(["--json", "serve"])
        .args(args)
        .env_remove("CBTVAULT_REPOSITORY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start cbtvault serve");
    let mut line = String::new();
    let n = BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read serve output");
    let mut served = Served {
        child,
        uri: String::new(),
        stderr,
    };
    assert!(
        n > 0,
        "serve {args:?} printed nothing; stderr:\n{}",
        std::fs::read_to_string(&served.stderr).unwrap_or_default()
    );
    let v: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("serve output is not JSON ({e}): {line}"));
    served.uri = str_of(&v, "uri").to_string();
    served
}

/// Runs a tool that must succeed; its stdout.
#[track_caller]
pub(crate) fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); qemu-img is in qemu-utils, nbdinfo and nbdcopy in libnbd-bin"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 40 full blocks and a partial one of 12345 bytes: block i is zero when
/// i % 4 == 1 and for 20..=23 (a longer hole), random otherwise, text for
/// i % 7 == 0. The partial last block is random.
fn fixture() -> (TestRepo, Image, String) {
    let t = TestRepo::new();
    let img = Image::create(&t.path("disk.img"), 40 * BS + 12345);
    for i in 0..41 {
        if i % 4 == 1 || (20..=23).contains(&i) {
            continue;
        }
        if i % 7 == 0 {
            img.write_block(i, &text_block(3, i));
        } else {
            img.write_block(i, &random_block(3, i));
        }
    }
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    (t, img, id)
}

fn is_zero_block(i: u64) -> bool {
    i % 4 == 1 || (20..=23).contains(&i)
}

/// qemu rounds an NBD export up to 512 bytes: the copy must hold the image
/// and then only zeros.
#[track_caller]
fn assert_copy_of(copy: &Path, img: &Image) {
    let got = std::fs::read(copy).expect("read copy");
    let want = img.bytes();
    assert!(
        got.len() as u64 >= img.size() && got.len() as u64 - img.size() < 512,
        "copy has {} bytes",
        got.len()
    );
    assert!(got[..want.len()] == want[..], "copy differs from the image");
    assert!(
        got[want.len()..].iter().all(|&b| b == 0),
        "copy has data past the end"
    );
}

#[test]
fn unix_socket_qemu_img_and_nbdinfo_read_the_snapshot() {
    let (t, img, id) = fixture();
    let sock = t.path("serve.sock");
    let s = serve(&t, &[&id, "--socket", sock.to_str().unwrap()]);
    assert_eq!(s.uri, format!("nbd+unix:///{id}?socket={}", sock.display()));

    let out = t.path("out.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri,
            out.to_str().unwrap(),
        ],
    );
    assert_copy_of(&out, &img);
    // qemu's own syntax, the export named explicitly.
    let legacy = format!("nbd:unix:{}:exportname={id}", sock.display());
    tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.path.to_str().unwrap(),
            &legacy,
        ],
    );
    // nbdcopy keeps the exact size.
    let exact = t.path("exact.raw");
    tool("nbdcopy", &[&s.uri, exact.to_str().unwrap()]);
    assert_eq!(hash_file(&exact), img.hash());

    // The map: zero blocks are holes, the others data, nothing else.
    let map = tool("nbdinfo", &["--map", &s.uri]);
    let mut covered = 0u64;
    let (mut holes, mut data) = (0, 0);
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (offset, length, kind): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert_eq!(offset, covered, "map not contiguous: {map}");
        covered += length;
        for b in offset / BS..(offset + length).div_ceil(BS) {
            let want = if is_zero_block(b) { 3 } else { 0 };
            assert_eq!(kind, want, "block {b} in the map:\n{map}");
        }
        if kind == 3 {
            holes += 1;
        } else {
            data += 1;
        }
    }
    assert_eq!(covered, img.size());
    assert!(holes >= 2 && data >= 2, "map:\n{map}");
    assert!(
        map.contains(&format!("{}  {:>10}    3  hole,zero", 20 * BS, 4 * BS)),
        "the long hole:\n{map}"
    );

    let info: Value =
        serde_json::from_str(&tool("nbdinfo", &["--json", &s.uri])).expect("nbdinfo --json");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], img.size());
    assert_eq!(export["is_read_only"], true);
    assert_eq!(export["contexts"][0], "base:allocation");
    let list = tool("nbdinfo", &["--list", &s.uri]);
    assert!(list.contains(&format!("export=\"{id}\"")), "{list}");

    assert_eq!(s.stop("TERM"), 0);
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn tcp_default_and_empty_export_names_and_sigint() {
    let (t, img, id) = fixture();
    // `latest` picks the snapshot; port 0 lets the kernel choose.
    let s = serve(&t, &["latest", "--listen", "127.0.0.1:0"]);
    let prefix = "nbd://127.0.0.1:";
    assert!(
        s.uri.starts_with(prefix) && s.uri.ends_with(&format!("/{id}")),
        "{}",
        s.uri
    );
    let out = t.path("out.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri,
            out.to_str().unwrap(),
        ],
    );
    assert_copy_of(&out, &img);
    // An empty export name selects the snapshot too; another name nothing.
    let base = s.uri.trim_end_matches(&id).to_string();
    let info: Value = serde_json::from_str(&tool("nbdinfo", &["--json", &base])).unwrap();
    assert_eq!(info["exports"][0]["export-size"], img.size());
    let r = Command::new("nbdinfo")
        .arg(format!("{base}nonesuch"))
        .output()
        .unwrap();
    assert!(!r.status.success(), "an unknown export name is refused");
    assert_eq!(s.stop("INT"), 0);
}

#[test]
fn named_export_and_a_stale_socket_is_replaced() {
    let (t, img, _) = fixture();
    let sock = t.path("named.sock");
    // A socket file nobody listens on, as a crashed server leaves it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let s = serve(
        &t,
        &[
            "latest",
            "--socket",
            sock.to_str().unwrap(),
            "--export-name",
            "my disk",
        ],
    );
    assert!(
        s.uri.starts_with("nbd+unix:///my%20disk?socket="),
        "{}",
        s.uri
    );
    let exact = t.path("exact.raw");
    tool("nbdcopy", &[&s.uri, exact.to_str().unwrap()]);
    assert_eq!(hash_file(&exact), img.hash());
    // A second server on the same live socket is refused.
    let r = t.run(&[&"serve", &"latest", &"--socket", &sock]);
    r.expect_code(1).stderr_mentions(&["in use"]);
}

fn self_signed(t: &TestRepo) -> (PathBuf, PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = t.path("cert.pem");
    let key = t.path("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key, ck.cert.pem().into_bytes())
}

fn pinned(pem: &[u8]) -> TlsOptions {
    TlsOptions {
        trust: Trust::PinnedPem(pem.to_vec()),
        server_name: "localhost".into(),
        client: None,
    }
}

#[test]
fn tls_pinned_client_reads_every_byte_and_plaintext_is_refused() {
    let (t, img, id) = fixture();
    let (cert, key, pem) = self_signed(&t);
    let s = serve(
        &t,
        &[
            &id,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(s.uri.starts_with("nbds://127.0.0.1:"), "{}", s.uri);
    let uri = NbdUri::parse(&s.uri).unwrap();
    let source = NbdSource::connect(
        &uri,
        "test".into(),
        Some(pinned(&pem)),
        vec!["base:allocation".into()],
        PoolOptions::default(),
        NbdLimits::default(),
    )
    .expect("TLS connection with the pinned certificate");
    assert_eq!(source.size_bytes(), img.size());
    let mut got = vec![0u8; img.size() as usize];
    source.read_at(0, &mut got).unwrap();
    assert!(
        got == img.bytes(),
        "bytes read over TLS differ from the image"
    );
    // base:allocation over TLS: the long hole is one extent.
    let extents = source.extents("base:allocation").unwrap();
    assert!(extents.contains(&(20 * BS, 4 * BS, 3)), "{extents:?}");
    source.close();

    // No TLS against a TLS server: refused in plain words, no data read.
    let mut plain = uri.clone();
    plain.tls = false;
    let err = NbdSource::connect(
        &plain,
        "test".into(),
        None,
        vec![],
        PoolOptions::default(),
        NbdLimits::default(),
    )
    .err()
    .expect("plaintext must fail");
    assert!(err.to_string().contains("requires TLS"), "{err}");
    // nbdinfo without TLS cannot get in either.
    let r = Command::new("nbdinfo")
        .arg(s.uri.replacen("nbds://", "nbd://", 1))
        .output()
        .unwrap();
    assert!(!r.status.success());
}

#[test]
fn tls_qemu_img_with_x509_credentials() {
    let (t, img, id) = fixture();
    // qemu wants a directory with a CA certificate: a CA signs the server's.
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = t.path("pki");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "serve test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(t.path("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(t.path("server-key.pem"), key.serialize_pem()).unwrap();
    let s = serve(
        &t,
        &[
            &id,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            t.path("server-cert.pem").to_str().unwrap(),
            "--tls-key",
            t.path("server-key.pem").to_str().unwrap(),
        ],
    );
    let port = s
        .uri
        .trim_start_matches("nbds://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        dir.display()
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export={id},tls-creds=tls0");
    let out = t.path("out.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    assert_copy_of(&out, &img);
}

// ------------------------------------------------------ library level

/// A server in this process on its own runtime, stopped on drop.
struct InProcess {
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    address: Address,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(done) = self.done.take() {
            let _ = self.runtime.block_on(done);
        }
    }
}

fn start(resolver: Arc<dyn ExportResolver>, options: ServerOptions) -> InProcess {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime.block_on(Listener::bind_tcp("127.0.0.1:0")).unwrap();
    let port = listener.tcp_address().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = runtime.spawn(nbdserver::serve(listener, resolver, options, async {
        let _ = stopped.await;
    }));
    InProcess {
        runtime,
        stop: Some(stop),
        done: Some(done),
        address: Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
    }
}

impl InProcess {
    fn connect(
        &self,
        export: &str,
        tls: Option<TlsOptions>,
        contexts: &[&str],
    ) -> Result<Connection, NbdError> {
        let options = ConnectOptions {
            address: self.address.clone(),
            export: export.into(),
            tls,
            meta_contexts: contexts.iter().map(|c| c.to_string()).collect(),
            timeout: Duration::from_secs(20),
        };
        self.runtime.block_on(Connection::open(&options))
    }

    fn port(&self) -> u16 {
        match &self.address {
            Address::Tcp { port, .. } => *port,
            Address::Unix { .. } => unreachable!(),
        }
    }

    /// A raw TCP connection for speaking bytes by hand.
    fn raw(&self) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(("127.0.0.1", self.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }
}

/// Serves one memory export under any name except "refused".
struct OneDisk(Arc<MemoryExport>);

impl ExportResolver for OneDisk {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, ExportError> {
        if name == "refused" {
            return Err(ExportError::Refused {
                name: name.into(),
                reason: "session invalid".into(),
            });
        }
        Ok(self.0.clone())
    }

    fn list(&self) -> Vec<String> {
        vec!["disk".into()]
    }
}

fn memory_disk() -> (Vec<u8>, Arc<dyn ExportResolver>) {
    let mut data = random_bytes(9, 0, 8 * BSU + 4096);
    data[2 * BSU..4 * BSU].fill(0);
    (
        data.clone(),
        Arc::new(OneDisk(Arc::new(MemoryExport::new(data)))),
    )
}

#[test]
fn xapi_like_mode_negotiates_by_export_name_and_wants_512_byte_reads() {
    let t = TestRepo::new();
    let (_, key, pem) = self_signed(&t);
    let config = nbdserver::server_config_from_pem(&pem, &std::fs::read(key).unwrap()).unwrap();
    let (data, resolver) = memory_disk();
    let server = start(
        resolver,
        ServerOptions {
            tls: Some(config),
            mode: Mode::XapiLike,
            max_connections: 16,
            ..ServerOptions::default()
        },
    );
    let export = "/vdi-uuid?session_id=OpaqueRef:abc";
    let c = server
        .connect(export, Some(pinned(&pem)), &["base:allocation"])
        .expect("connect like XO does");
    let n = &c.negotiated;
    assert!(n.used_export_name, "GO must be refused, EXPORT_NAME used");
    assert!(!n.structured_replies, "xapi-nbd has no structured replies");
    assert!(n.meta_contexts.is_empty());
    assert_eq!(n.export.size_bytes, data.len() as u64);
    assert_eq!(n.export.transmission_flags, 3);
    let rt = &server.runtime;
    assert!(rt.block_on(c.read(512, 2 * BSU as u32)).unwrap() == data[512..512 + 2 * BSU]);
    assert!(rt.block_on(c.read(8 * BS, 4096)).unwrap() == data[8 * BSU..]);
    for (offset, len) in [(100u64, 512u32), (0, 100), (512, 1000)] {
        match rt.block_on(c.read(offset, len)) {
            Err(NbdError::Server { errno: 22, .. }) => {}
            other => panic!(
                "unaligned read {offset}+{len}: {:?}",
                other.map(|d| d.len())
            ),
        }
    }
    match rt.block_on(c.block_status(0, 4096)) {
        Err(NbdError::Server { errno: 22, .. }) => {}
        other => panic!("block status: {other:?}"),
    }
    // The connection survives refused requests.
    assert!(rt.block_on(c.read(0, 512)).unwrap() == data[..512]);

    // Without TLS: refused before any option is answered.
    match server.connect(export, None, &[]) {
        Err(NbdError::Protocol(proto::ProtoError::TlsRequired)) => {}
        other => panic!("plaintext client: {:?}", other.map(|_| ())),
    }
    // A refused session: the connection is closed without a reply.
    match server.connect("refused", Some(pinned(&pem)), &[]) {
        Err(NbdError::Closed(_)) => {}
        other => panic!("refused export: {:?}", other.map(|_| ())),
    }
    rt.block_on(c.close());
}

#[test]
fn xapi_like_mode_export_reply_is_134_bytes_and_options_are_refused() {
    let (data, resolver) = memory_disk();
    let server = start(
        resolver,
        ServerOptions {
            mode: Mode::XapiLike,
            ..ServerOptions::default()
        },
    );
    // Plaintext xapi-like (insecure_nbd), spoken by hand.
    let mut s = server.raw();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(
        greeting,
        proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE),
        "no NO_ZEROES"
    );
    s.write_all(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    for (option, reply) in [
        (proto::OPT_GO, proto::REP_ERR_UNSUP),
        (proto::OPT_INFO, proto::REP_ERR_UNSUP),
        (proto::OPT_STRUCTURED_REPLY, proto::REP_ERR_UNSUP),
        (proto::OPT_SET_META_CONTEXT, proto::REP_ERR_UNSUP),
        (proto::OPT_LIST, proto::REP_ERR_POLICY),
        (proto::OPT_STARTTLS, proto::REP_ERR_POLICY),
        (77, proto::REP_ERR_UNSUP),
    ] {
        s.write_all(&proto::encode_option(option, &[])).unwrap();
        let mut r = [0u8; 20];
        s.read_exact(&mut r).unwrap();
        match proto::decode_option_reply(&r).unwrap() {
            proto::Decoded::Done(got, _) => assert_eq!((got.option, got.reply), (option, reply)),
            other => panic!("{other:?}"),
        }
    }
    s.write_all(&proto::encode_option(proto::OPT_EXPORT_NAME, b"vdi"))
        .unwrap();
    let mut reply = [0u8; 134];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..8], (data.len() as u64).to_be_bytes());
    assert_eq!(reply[8..10], [0, 3]);
    assert!(reply[10..].iter().all(|&b| b == 0));
    // Simple replies only, in order, pipelined.
    let reqs: Vec<[u8; 28]> = (0..4u64)
        .map(|k| {
            proto::encode_request(&proto::Request {
                flags: 0,
                kind: proto::CMD_READ,
                cookie: 100 + k,
                offset: k * 1024,
                length: 1024,
            })
        })
        .collect();
    s.write_all(&reqs.concat()).unwrap();
    for k in 0..4u64 {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head, proto::encode_simple_reply(0, 100 + k));
        let mut body = vec![0u8; 1024];
        s.read_exact(&mut body).unwrap();
        assert!(body[..] == data[k as usize * 1024..(k as usize + 1) * 1024]);
    }
    // FLUSH, WRITE and TRIM as xapi-nbd answers them.
    for (kind, errno) in [
        (proto::CMD_FLUSH, proto::EINVAL),
        (proto::CMD_TRIM, proto::EINVAL),
    ] {
        let req = proto::Request {
            flags: 0,
            kind,
            cookie: 7,
            offset: 0,
            length: 512,
        };
        s.write_all(&proto::encode_request(&req)).unwrap();
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head, proto::encode_simple_reply(errno, 7));
    }
}

#[test]
fn xapi_like_mode_accepts_then_drops_the_connection_over_the_limit() {
    let (_, resolver) = memory_disk();
    let server = start(
        resolver,
        ServerOptions {
            mode: Mode::XapiLike,
            max_connections: 3,
            ..ServerOptions::default()
        },
    );
    let open: Vec<Connection> = (0..3)
        .map(|_| server.connect("vdi", None, &[]).expect("within the limit"))
        .collect();
    match server.connect("vdi", None, &[]) {
        Err(e) if e.is_connection_failure() => {}
        other => panic!("fourth connection: {:?}", other.map(|_| ())),
    }
    // Room again once one leaves.
    let mut open = open;
    server.runtime.block_on(open.pop().unwrap().close());
    let mut again = None;
    for _ in 0..100 {
        if let Ok(c) = server.connect("vdi", None, &[]) {
            again = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(again.is_some(), "a slot frees up when a client disconnects");
}

/// Sends the greeting exchange by hand, then GO with structured replies.
fn standard_handshake(s: &mut std::net::TcpStream) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(
        greeting,
        proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)
    );
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s.write_all(&proto::encode_option(
        proto::OPT_GO,
        &proto::encode_go_data("disk", &[]),
    ))
    .unwrap();
    // NBD_REP_INFO (export), then ACK.
    let mut info = [0u8; 32];
    s.read_exact(&mut info).unwrap();
    let mut ack = [0u8; 20];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(
        ack[..],
        proto::encode_option_reply(proto::OPT_GO, proto::REP_ACK, &[])[..]
    );
}

#[test]
fn client_bad_request_magic_loses_only_its_own_connection() {
    let (data, resolver) = memory_disk();
    let server = start(resolver, ServerOptions::default());
    let good = server.connect("disk", None, &["base:allocation"]).unwrap();
    let mut bad = server.raw();
    standard_handshake(&mut bad);
    let mut req = proto::encode_request(&proto::Request {
        flags: 0,
        kind: proto::CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    });
    req[0] ^= 0xff;
    bad.write_all(&req).unwrap();
    let mut rest = Vec::new();
    let n = bad
        .read_to_end(&mut rest)
        .expect("server closes the connection");
    assert_eq!(n, 0, "nothing is answered to a bad magic");
    assert!(server.runtime.block_on(good.read(0, 4096)).unwrap() == data[..4096]);
}

#[test]
fn client_oversize_option_is_cut_off() {
    let (_, resolver) = memory_disk();
    let server = start(resolver, ServerOptions::default());
    let mut s = server.raw();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    // Claims 1 GiB of option data: refused before anything is allocated.
    let mut head = proto::encode_option(proto::OPT_GO, &[]);
    head[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&head).unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn client_unknown_handshake_flags_are_refused() {
    let (_, resolver) = memory_disk();
    let server = start(resolver, ServerOptions::default());
    let mut s = server.raw();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | 1 << 9).to_be_bytes())
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn standard_mode_errors_and_block_status() {
    let (data, resolver) = memory_disk();
    let server = start(resolver, ServerOptions::default());
    let c = server.connect("disk", None, &["base:allocation"]).unwrap();
    assert!(!c.negotiated.used_export_name);
    assert!(c.negotiated.structured_replies);
    assert_eq!(c.negotiated.export.block_size, Some((1, 65536, 32 << 20)));
    let rt = &server.runtime;
    let size = data.len() as u64;
    // Any alignment; a read across data and a hole comes back whole.
    assert!(rt.block_on(c.read(BS + 3, 3 * BSU as u32)).unwrap() == data[BSU + 3..4 * BSU + 3]);
    assert!(rt.block_on(c.read(size - 5, 5)).unwrap() == data[data.len() - 5..]);
    for (offset, len) in [(size - 5, 6u32), (size, 1), (u64::MAX - 10, 512)] {
        match rt.block_on(c.read(offset, len)) {
            Err(NbdError::Server { errno: 22, .. }) => {}
            other => panic!("read {offset}+{len}: {:?}", other.map(|d| d.len())),
        }
    }
    let status = rt.block_on(c.block_status(0, size as u32)).unwrap();
    let (_, extents) = &status[0];
    assert_eq!(
        extents,
        &vec![
            (2 * BSU as u32, 0),
            (2 * BSU as u32, 3),
            ((size - 4 * BS) as u32, 0)
        ]
    );
    match rt.block_on(c.block_status(size, 1)) {
        Err(NbdError::Server { errno: 22, .. }) => {}
        other => panic!("block status beyond the end: {other:?}"),
    }
    // Structured replies without base:allocation: block status is refused.
    let plain = server.connect("disk", None, &[]).unwrap();
    match rt.block_on(plain.block_status(0, 4096)) {
        Err(NbdError::Server { errno: 22, .. }) => {}
        other => panic!("block status without a context: {other:?}"),
    }
}

#[test]
fn standard_mode_write_is_refused_and_payload_skipped() {
    let (data, resolver) = memory_disk();
    let server = start(resolver, ServerOptions::default());
    let mut s = server.raw();
    standard_handshake(&mut s);
    let write = proto::encode_request(&proto::Request {
        flags: 0,
        kind: proto::CMD_WRITE,
        cookie: 5,
        offset: 0,
        length: 1000,
    });
    let read = proto::encode_request(&proto::Request {
        flags: 0,
        kind: proto::CMD_READ,
        cookie: 6,
        offset: 0,
        length: 16,
    });
    let mut burst = write.to_vec();
    burst.extend_from_slice(&[0xAA; 1000]);
    burst.extend_from_slice(&read);
    s.write_all(&burst).unwrap();
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head, proto::encode_simple_reply(proto::EPERM, 5));
    // Simple replies (no STRUCTURED_REPLY asked for): the read follows.
    s.read_exact(&mut head).unwrap();
    assert_eq!(head, proto::encode_simple_reply(0, 6));
    let mut body = [0u8; 16];
    s.read_exact(&mut body).unwrap();
    assert_eq!(body[..], data[..16]);
}

/// Flips one bit in the middle of the stored blob of the block `content`.
fn corrupt_block(t: &TestRepo, content: &[u8]) {
    use std::os::unix::fs::FileExt;
    let id = blake3::hash(content);
    for pack in t.packs() {
        let bytes = std::fs::read(&pack).unwrap();
        let entries = cbtvault::format::pack::decode_pack_index(&bytes, BS as u32).unwrap();
        if let Some(e) = entries.iter().find(|e| e.block_id.0 == *id.as_bytes()) {
            let at = e.offset + e.stored_length as u64 / 2;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&pack)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
            return;
        }
    }
    panic!("block not found in any pack");
}

#[test]
fn corrupt_block_fails_its_reads_with_eio_and_nothing_else() {
    let (t, img, id) = fixture();
    corrupt_block(&t, &img.read_block(6));
    let repo = Arc::new(cbtvault::repo::Repository::open(&t.repo).unwrap());
    let snapshot = repo.find_snapshot(&id).unwrap().meta.id;
    let export = Arc::new(SnapshotExport::open(repo, snapshot).unwrap());
    assert_eq!(export.missing_blocks(), 0);
    // Directly: the error names the block and the next step.
    let err = export.read(6 * BS + 100, 10).unwrap_err();
    assert!(
        matches!(err, ExportError::Io(_)) && err.to_string().contains("check --read-data"),
        "{err}"
    );

    struct Fixed(Arc<SnapshotExport>);
    impl ExportResolver for Fixed {
        fn open(&self, _: &str) -> Result<Arc<dyn Export>, ExportError> {
            Ok(self.0.clone())
        }
    }
    let server = start(Arc::new(Fixed(export)), ServerOptions::default());
    let c = server.connect("", None, &[]).unwrap();
    let image = img.bytes();
    for b in 0..img.blocks() {
        let len = img.read_block(b).len() as u32;
        match server.runtime.block_on(c.read(b * BS, len)) {
            Err(NbdError::Server { errno: 5, .. }) if b == 6 => {}
            Ok(d) if b != 6 => assert!(
                d[..] == image[(b * BS) as usize..(b * BS) as usize + len as usize],
                "block {b}"
            ),
            other => panic!("block {b}: {:?}", other.map(|d| d.len())),
        }
    }
}

#[test]
fn snapshot_export_small_reads_and_extents_match_the_image() {
    let (t, img, id) = fixture();
    let repo = Arc::new(cbtvault::repo::Repository::open(&t.repo).unwrap());
    let snapshot = repo.find_snapshot(&id).unwrap().meta.id;
    let export = SnapshotExport::open(repo, snapshot).unwrap();
    let image = img.bytes();
    // Odd sizes at odd places, across block borders and the partial end.
    let mut at = 0u64;
    let mut step = 1u64;
    while at < img.size() {
        let len = step.min(img.size() - at) as u32;
        let got = export.read(at, len).unwrap();
        assert!(
            got[..] == image[at as usize..at as usize + len as usize],
            "read {at}+{len}"
        );
        at += len as u64;
        step = step * 3 % 200_003 + 1;
    }
    assert!(export.read(img.size() - 1, 2).is_err());
    let ext = export.zero_extents(20 * BS + 7, 5 * BSU as u32);
    // Blocks 20..=23 zero, 24 data, 25 zero.
    assert_eq!(ext, vec![(4 * BSU as u32 - 7, 3), (BSU as u32, 0), (7, 3)]);
}

#[test]
fn tls_expired_or_self_signed_certificate_is_explained() {
    use crate::nbd::{assert_said_once, openssl_fingerprint};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let (t, _img, id) = fixture();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 3, 4);
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (ca_path, cert_path, key_path) =
        (t.path("ca.pem"), t.path("old.pem"), t.path("old-key.pem"));
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let s = serve(
        &t,
        &[
            &id,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    let other = TestRepo::new();
    let r = other.try_backup(Path::new(&s.uri), &["--tls-ca", ca_path.to_str().unwrap()]);
    let r = r.expect_code(1);
    r.stderr_mentions(&[
        "it expired on 2002-03-04 00:00:00 UTC",
        &openssl_fingerprint(&cert_path),
        "renew",
    ]);
    assert_said_once(&r.stderr);
    drop(s);
    // A self-signed certificate checked against an unrelated CA: said so,
    // with its fingerprint and the options that would trust it.
    let (cert, key, _) = self_signed(&t);
    let s = serve(
        &t,
        &[
            &id,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let r = other.try_backup(
        Path::new(&s.uri),
        &[
            "--tls-ca",
            ca_path.to_str().unwrap(),
            "--tls-name",
            "localhost",
        ],
    );
    let r = r.expect_code(1);
    r.stderr_mentions(&[
        "it is self-signed",
        &openssl_fingerprint(&cert),
        "--tls-cert-pin FILE",
    ]);
    assert!(!r.stderr.contains("insecure"), "{}", r.stderr);
    assert_said_once(&r.stderr);
    assert!(other.snapshot_ids().is_empty());
}
