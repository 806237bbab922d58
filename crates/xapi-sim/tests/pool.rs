//! A simulated pool of two hosts against xenapi-reference.md: a member
//! refuses logins naming the master (§1.4), `VDI.get_nbd_info` lists every
//! host that sees the VDI's SR with that host's port and certificate
//! (§2.6), the HTTP handlers of a host that does not see the SR answer 302
//! to one that does (§3.1, §3.2), and xapi-nbd serves only what its host
//! sees. Over real HTTPS and NBD with each host's certificate pinned.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nbd::client::{Address, ConnectOptions, Connection};
use nbd::tls::{client_config, TlsOptions, Trust};
use xapi_sim::{ApiError, PoolMember, SimOptions, Simulator, Value};
use xapi_wire::xmlrpc;

const MIB: u64 = 1 << 20;

fn s(v: &str) -> Value {
    Value::str(v)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// TLS to `address`, trusting exactly `cert_pem`.
fn connect(address: SocketAddr, cert_pem: &str) -> Tls {
    let (config, name) = client_config(&TlsOptions {
        trust: Trust::PinnedPem(cert_pem.as_bytes().to_vec()),
        server_name: address.ip().to_string(),
        client: None,
    })
    .expect("tls config");
    let conn = rustls::ClientConnection::new(config, name).expect("tls client");
    let tcp = TcpStream::connect(address).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// One request; returns (status, head text, body).
fn request(
    address: SocketAddr,
    cert_pem: &str,
    method: &str,
    target: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut tls = connect(address, cert_pem);
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).unwrap();
    tls.write_all(body).unwrap();
    tls.flush().unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, raw[end..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn xml_call(
    address: SocketAddr,
    cert_pem: &str,
    method: &str,
    params: &[Value],
) -> Result<Value, ApiError> {
    let body = xmlrpc::encode_call(method, params);
    let (status, _, body) = request(address, cert_pem, "POST", "/", body.as_bytes());
    assert_eq!(status, 200);
    let v = xmlrpc::decode_response(&body).expect("a methodResponse");
    xmlrpc::status_result(v).expect("a Status struct")
}

struct Pool {
    sim: Simulator,
    member: PoolMember,
    session: String,
}

impl Pool {
    fn start() -> Pool {
        let sim = Simulator::start(SimOptions::default()).expect("start");
        let member = sim.add_pool_member("host2").expect("a pool member");
        let session = sim
            .call(
                "session.login_with_password",
                &[s(sim.username()), s(sim.password()), s("1.0"), s("t")],
            )
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        Pool {
            sim,
            member,
            session,
        }
    }

    fn call(&self, method: &str, args: &[Value]) -> Result<Value, ApiError> {
        let mut params = vec![s(&self.session)];
        params.extend_from_slice(args);
        self.sim.call(method, &params)
    }

    fn text(&self, method: &str, args: &[Value]) -> String {
        self.call(method, args)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
            .as_str()
            .unwrap_or_else(|| panic!("{method}: not a string"))
            .to_string()
    }

    /// (address, port, cert, subject) of each get_nbd_info entry.
    fn nbd_entries(&self, vdi: &str) -> Vec<(String, u16, String, String)> {
        let v = self.call("VDI.get_nbd_info", &[s(vdi)]).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let r = e.as_struct().unwrap();
                let t = |k: &str| r[k].as_str().unwrap().to_string();
                (
                    t("address"),
                    r["port"].as_int().unwrap() as u16,
                    t("cert"),
                    t("subject"),
                )
            })
            .collect()
    }
}

#[test]
fn sim_pool_member_refuses_logins_naming_the_master() {
    let p = Pool::start();
    let m = &p.member;
    assert_eq!(m.https.ip().to_string(), "127.0.0.2");
    assert_eq!(m.https.port(), p.sim.https_address().port());
    assert_ne!(m.fingerprint, p.sim.fingerprint());
    let login = [s("root"), s("wrong password"), s("1.0"), s("t")];
    let e = xml_call(
        m.https,
        &m.certificate_pem,
        "session.login_with_password",
        &login,
    )
    .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.params.clone()),
        ("HOST_IS_SLAVE", vec!["127.0.0.1".to_string()])
    );
    // The master answers, and a session works on either host's port.
    let good = [s(p.sim.username()), s(p.sim.password()), s("1.0"), s("t")];
    let session = xml_call(
        p.sim.https_address(),
        p.sim.certificate_pem(),
        "session.login_with_password",
        &good,
    )
    .unwrap();
    let hosts = xml_call(
        m.https,
        &m.certificate_pem,
        "host.get_all",
        std::slice::from_ref(&session),
    )
    .unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 2);
    let pools = p.call("pool.get_all", &[]).unwrap();
    let pool = pools.as_array().unwrap()[0].as_str().unwrap().to_string();
    let master = p.text("pool.get_master", &[s(&pool)]);
    assert_ne!(master, m.host_ref);
    assert_eq!(p.text("host.get_address", &[s(&m.host_ref)]), "127.0.0.2");
    assert_eq!(
        p.text("host.get_server_certificate", &[s(&m.host_ref)]),
        m.certificate_pem
    );
    let dom0_master = p.text("host.get_control_domain", &[s(&master)]);
    let dom0_member = p.text("host.get_control_domain", &[s(&m.host_ref)]);
    assert_ne!(dom0_master, dom0_member);
}

#[test]
fn sim_pool_nbd_info_lists_each_host_that_sees_the_sr() {
    let p = Pool::start();
    let m = &p.member;
    let shared = p.sim.add_shared_sr("NFS").unwrap();
    let vm = p.sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let on_master = &vm.disks[0];
    let on_shared = p
        .sim
        .add_disk_on_sr(&vm.vm_uuid, "shared", MIB, &shared)
        .unwrap();
    let on_member = p
        .sim
        .add_disk_on_sr(&vm.vm_uuid, "local", MIB, &m.local_sr_uuid)
        .unwrap();
    let master_entry = (
        "127.0.0.1".to_string(),
        p.sim.nbd_port(),
        p.sim.certificate_pem().to_string(),
        "localhost".to_string(),
    );
    let member_entry = (
        "127.0.0.2".to_string(),
        m.nbd.port(),
        m.certificate_pem.clone(),
        "host2".to_string(),
    );
    assert_eq!(
        p.nbd_entries(&on_master.vdi_ref),
        vec![master_entry.clone()]
    );
    assert_eq!(
        p.nbd_entries(&on_member.vdi_ref),
        vec![member_entry.clone()]
    );
    let mut both = p.nbd_entries(&on_shared.vdi_ref);
    both.sort();
    assert_eq!(both, vec![master_entry, member_entry]);
    // A shared SR made after the member joined is plugged there too.
    let sr_ref = p.text("SR.get_by_uuid", &[s(&shared)]);
    let pbds = p.call("SR.get_PBDs", &[s(&sr_ref)]).unwrap();
    assert_eq!(pbds.as_array().unwrap().len(), 2);
    assert_eq!(
        p.call("SR.get_shared", &[s(&sr_ref)]).unwrap(),
        Value::Bool(true)
    );
}

/// Opens an NBD connection and reads `len` bytes at 0.
fn nbd_read(
    address: SocketAddr,
    cert: &str,
    subject: &str,
    export: &str,
    len: u32,
) -> Result<Vec<u8>, String> {
    let options = ConnectOptions {
        address: Address::Tcp {
            host: address.ip().to_string(),
            port: address.port(),
        },
        export: export.to_string(),
        tls: Some(TlsOptions {
            trust: Trust::PinnedPem(cert.as_bytes().to_vec()),
            server_name: subject.to_string(),
            client: None,
        }),
        meta_contexts: Vec::new(),
        timeout: Duration::from_secs(10),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = Connection::open(&options)
            .await
            .map_err(|e| e.to_string())?;
        conn.read(0, len)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    })
}

#[test]
fn sim_pool_serves_data_only_from_hosts_that_see_the_sr() {
    let p = Pool::start();
    let m = &p.member;
    let vm = p.sim.create_vm_with_disks("vm", &[MIB]).unwrap();
    let disk = p
        .sim
        .add_disk_on_sr(&vm.vm_uuid, "local", MIB, &m.local_sr_uuid)
        .unwrap();
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    p.sim.guest_write(&disk.vdi_uuid, 0, &data).unwrap();

    // NBD: the member serves it; the master's xapi-nbd cannot attach it.
    let export = format!("/{}?session_id={}", disk.vdi_uuid, p.session);
    let read = nbd_read(m.nbd, &m.certificate_pem, "host2", &export, MIB as u32);
    assert!(read.expect("member NBD") == data, "member NBD bytes differ");
    let refused = nbd_read(
        p.sim.nbd_address(),
        p.sim.certificate_pem(),
        "localhost",
        &export,
        MIB as u32,
    );
    assert!(refused.is_err(), "the master served a VDI it does not see");
    assert_eq!(p.sim.dom0_attachments(), 0);

    // HTTP handlers: the master redirects, same query, to the member.
    let query = format!("vdi={}&format=raw&session_id={}", disk.vdi_uuid, p.session);
    let (status, head, _) = request(
        p.sim.https_address(),
        p.sim.certificate_pem(),
        "GET",
        &format!("/export_raw_vdi?{query}"),
        b"",
    );
    assert_eq!(status, 302, "{head}");
    let location = header(&head, "location").expect("a Location").to_string();
    let url = url::Url::parse(&location).unwrap();
    assert_eq!(url.host_str(), Some("127.0.0.2"));
    assert_eq!(url.port(), Some(m.https.port()));
    assert_eq!(url.path(), "/export_raw_vdi");
    let (status, _, body) = request(
        m.https,
        &m.certificate_pem,
        "GET",
        &format!("/export_raw_vdi?{}", url.query().unwrap()),
        b"",
    );
    assert_eq!(status, 200);
    assert_eq!(body, data);

    // An import is redirected before its body is read; nothing is written.
    let task = p.text("task.create", &[s("import"), s("")]);
    let zeros = vec![0u8; MIB as usize];
    let (status, head, _) = request(
        p.sim.https_address(),
        p.sim.certificate_pem(),
        "PUT",
        &format!("/import_raw_vdi?{query}&task_id={task}"),
        &zeros,
    );
    assert_eq!(status, 302, "{head}");
    assert!(header(&head, "location")
        .unwrap()
        .starts_with("https://127.0.0.2:"));
    assert_eq!(p.text("task.get_status", &[s(&task)]), "pending");
    assert_eq!(
        p.sim.read_vdi(&disk.vdi_uuid, 0, MIB as usize).unwrap(),
        data
    );
    assert_eq!(p.sim.dom0_attachments(), 0);
}

#[test]
fn sim_pool_members_need_a_temporary_simulator() {
    let dir = std::env::temp_dir().join(format!("cbtvault-pool-test-{}", std::process::id()));
    let sim = Simulator::start(SimOptions {
        dir: Some(dir.clone()),
        ..SimOptions::default()
    })
    .unwrap();
    let e = sim.add_pool_member("host2").unwrap_err();
    assert!(e.to_string().contains("not kept across restarts"), "{e}");
    drop(sim);
    let _ = std::fs::remove_dir_all(dir);
}
