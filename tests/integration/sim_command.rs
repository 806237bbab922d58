//! `cbtvault sim`, the command around the XenServer simulator: it prints
//! how to connect, serves what it printed, and stops on SIGTERM. (The
//! simulator itself is tested in crates/xapi-sim/tests.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nbd::tls::{client_config, TlsOptions, Trust};
use xapi_wire::{xmlrpc, Value};

fn s(v: &str) -> Value {
    Value::str(v)
}

/// Sends SIGTERM; the process must exit 0 within 10 s.
fn stops_on_sigterm(child: &mut std::process::Child) {
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-s", "TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "sim exited with {status}");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sim did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sim_command_prints_how_to_connect_and_stops_on_sigterm() {
    use std::io::BufRead;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("calls.log");
    let mut child = std::process::Command::new(crate::util::bin())
        .args([
            "--json",
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--nbd-listen",
            "127.0.0.1:0",
        ])
        .args(["--disk-mib", "2", "--disk-mib", "3"])
        .arg("--log-calls")
        .arg(&log)
        .env("CBTVAULT_SIM_PASSWORD", "secret-for-test")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cbtvault sim");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read the first line");
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON line");
    assert_eq!(v["username"], "root");
    assert_eq!(v["password"], "secret-for-test");
    assert_eq!(v["vdi_uuids"].as_array().unwrap().len(), 2);
    assert_eq!(v["fingerprint_sha256"].as_str().unwrap().len(), 95);
    let url = v["url"].as_str().unwrap();
    let address: std::net::SocketAddr = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    // Log in over the wire with what it printed.
    let body = xmlrpc::encode_call(
        "session.login_with_password",
        &[s("root"), s("secret-for-test")],
    );
    // The certificate it serves is in its state folder; its fingerprint
    // is the one printed.
    let pem =
        std::fs::read(std::path::Path::new(v["state_dir"].as_str().unwrap()).join("host-cert.pem"))
            .expect("the host certificate in the state folder");
    assert_eq!(
        xapi_sim::certificate_fingerprint(std::str::from_utf8(&pem).unwrap()).unwrap(),
        v["fingerprint_sha256"].as_str().unwrap()
    );
    let (config, name) = client_config(&TlsOptions {
        trust: Trust::PinnedPem(pem),
        server_name: "localhost".into(),
        client: None,
    })
    .unwrap();
    let mut tcp = TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, &mut tcp);
    let req = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("<value>Success</value>"), "{text}");
    // --log-calls: the login is in the call log.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("XenAPI session.login_with_password ok"),
        "{logged}"
    );
    stops_on_sigterm(&mut child);
}

/// `sim --vmware`: a simulated ESXi host that the product backs up with
/// exactly what it printed, and that stops on SIGTERM.
#[test]
fn sim_vmware_serves_what_it_prints_and_a_backup_of_it_restores() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(crate::util::bin())
        .args(["--json", "sim", "--vmware", "--listen", "127.0.0.1:0"])
        .args(["--disk-mib", "2", "--disk-mib", "3"])
        .env("CBTVAULT_SIM_PASSWORD", "vsphere-for-test")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cbtvault sim --vmware");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read the first line");
    let v = crate::json_contract::validate_stream("sim --vmware", &line)
        .pop()
        .expect("the listening line");
    assert_eq!(v["message_type"], "listening");
    assert_eq!(v["disk_keys"], serde_json::json!([2000, 2001]));
    let address = v["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("https://")
        .trim_end_matches("/sdk")
        .to_string();
    let t = crate::util::TestRepo::new();
    let source = format!(
        "vmware://root@{address}/vm/{}",
        v["vm_id"].as_str().unwrap()
    );
    let fp = v["fingerprint_sha256"].as_str().unwrap().to_string();
    let r = t
        .run_env(
            &[&"--json", &"backup", &source, &"--fingerprint", &fp],
            &[("CBTVAULT_VMWARE_PASSWORD", "vsphere-for-test")],
        )
        .ok();
    let s = r.json();
    let sizes: Vec<u64> = s["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["disk_size_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [2 << 20, 3 << 20]);
    // An empty disk restores as zeros.
    let id = s["disks"][0]["snapshot_id"].as_str().unwrap();
    t.assert_restores(id, blake3::hash(&vec![0u8; 2 << 20]), 2 << 20);
    stops_on_sigterm(&mut child);
}

/// `demo` and `demo --vmware`, as the README's first command runs them
/// (small disks): both end verified, with what they say checked against
/// docs/json.md.
#[test]
fn both_demos_pass_and_verify_bit_for_bit() {
    for extra in [&[][..], &["--vmware"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"--json", &"demo", &"--size-mib", &"4"];
        for e in extra {
            args.push(e);
        }
        let r = crate::util::run_in(dir.path(), &args).ok();
        let s = r.json();
        assert_eq!(s["verified"], true, "{extra:?}: {s}");
        let inc: u64 = s["incremental_backup"]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["blocks_read"].as_u64().unwrap())
            .sum();
        let full: u64 = s["full_backup"]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["blocks_read"].as_u64().unwrap())
            .sum();
        assert!(
            inc > 0 && inc * 10 < full,
            "{extra:?}: incremental {inc}, full {full}"
        );
    }
}
