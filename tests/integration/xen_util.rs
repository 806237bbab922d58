//! Shared by the XenServer backup and restore tests: an in-process
//! simulator with a known password, and a XenAPI session on it for setup
//! and inspection.

use std::time::Duration;

use xapi_sim::{ApiError, SimOptions, Simulator, Value};

use crate::util::{random_bytes, BS};

const MIB: u64 = 1 << 20;

/// A simulator whose `root` password is `password`; data_destroy waits a
/// little, as a real host's does.
pub fn start(password: &str) -> Simulator {
    Simulator::start(SimOptions {
        password: password.into(),
        data_destroy_wait: Duration::from_millis(500),
        ..SimOptions::default()
    })
    .expect("start the simulator")
}

/// An in-process session on the simulator.
pub struct Host<'a> {
    pub sim: &'a Simulator,
    pub session: String,
}

impl<'a> Host<'a> {
    pub fn login(sim: &'a Simulator, password: &str) -> Host<'a> {
        let s = sim
            .call(
                "session.login_with_password",
                &[Value::str("root"), Value::str(password)],
            )
            .expect("login");
        Host {
            sim,
            session: s.as_str().unwrap().to_string(),
        }
    }

    /// `method(session, args...)` with string arguments.
    pub fn try_call(&self, method: &str, args: &[&str]) -> Result<Value, ApiError> {
        let mut p = vec![Value::str(&self.session)];
        p.extend(args.iter().map(|a| Value::str(*a)));
        self.sim.call(method, &p)
    }

    /// The whole content of VDI `uuid` as the host holds it.
    pub fn disk(&self, uuid: &str, size: u64) -> Vec<u8> {
        self.sim.read_vdi(uuid, 0, size as usize).unwrap()
    }
}

/// Random guest writes: `1 + seed % 5` whole blocks and one unaligned piece.
pub fn guest_writes(sim: &Simulator, vdi: &str, size: u64, seed: u64) {
    let blocks = size / BS;
    for k in 0..1 + seed % 5 {
        let b = (seed.wrapping_mul(2654435761).wrapping_add(k * 40503)) % blocks;
        sim.guest_write(vdi, b * BS, &random_bytes(seed, k, BS as usize))
            .unwrap();
    }
    let off = (seed.wrapping_mul(7919) % (size - 5000)) | 1;
    sim.guest_write(vdi, off, &random_bytes(seed, 99, 4000))
        .unwrap();
}

/// Half the disk with data: 1 MiB pieces, every other MiB.
pub fn fill(sim: &Simulator, vdi: &str, size: u64, seed: u64) {
    let mut at = 0;
    while at < size {
        sim.guest_write(vdi, at, &random_bytes(seed, at, MIB as usize))
            .unwrap();
        at += 2 * MIB;
    }
}

/// `xen://root@HOST:PORT/KIND/UUID` for the simulator.
pub fn xen_url(sim: &Simulator, kind: &str, uuid: &str) -> String {
    let a = sim.https_address();
    format!("xen://root@{}:{}/{kind}/{uuid}", a.ip(), a.port())
}

/// What the cleanup tests read of a VM or VDI on the host.
#[derive(Debug, Clone)]
pub struct HostRecord {
    pub uuid: String,
    pub is_a_snapshot: bool,
    /// VDI type; empty for a VM.
    pub vdi_type: String,
    pub other_config: std::collections::BTreeMap<String, String>,
}

impl HostRecord {
    /// The `cbtvault.run` marker, if any.
    pub fn run(&self) -> Option<&str> {
        self.other_config.get("cbtvault.run").map(String::as_str)
    }
}

impl Host<'_> {
    /// Every snapshot object of `class` (`VM` or `VDI`) on the host.
    pub fn snapshot_records(&self, class: &str) -> Vec<HostRecord> {
        let all = self
            .try_call(&format!("{class}.get_all_records"), &[])
            .unwrap();
        all.as_struct()
            .unwrap()
            .values()
            .filter_map(|r| {
                let r = r.as_struct()?;
                let rec = HostRecord {
                    uuid: r["uuid"].as_str()?.to_string(),
                    is_a_snapshot: r.get("is_a_snapshot")?.as_bool()?,
                    vdi_type: r
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    other_config: r
                        .get("other_config")
                        .and_then(Value::as_struct)
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                rec.is_a_snapshot.then_some(rec)
            })
            .collect()
    }

    /// Waits (up to 60 s) until `disks` snapshot VDIs marked
    /// `in-progress` by one run not in `except_runs` exist (a VM backup
    /// marks its snapshot VM before them); returns that run id.
    pub fn wait_for_marked_run(&self, except_runs: &[&str], disks: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut runs = std::collections::BTreeMap::<String, usize>::new();
            for v in self.snapshot_records("VDI") {
                if v.other_config.contains_key("cbtvault.repository")
                    && v.other_config.get("cbtvault.state").map(String::as_str)
                        == Some("in-progress")
                {
                    if let Some(run) = v.run().filter(|r| !except_runs.contains(r)) {
                        *runs.entry(run.to_string()).or_default() += 1;
                    }
                }
            }
            if let Some((run, _)) = runs.into_iter().find(|(_, n)| *n == disks) {
                return run;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no marked snapshot appeared on the host"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
