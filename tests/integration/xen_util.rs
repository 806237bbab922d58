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
