//! Shared by the XenServer backup and restore tests: an in-process
//! simulator with a known password, and a XenAPI session on it for setup
//! and inspection.

use std::time::Duration;

use cbtvault::sim::{ApiError, SimOptions, Simulator, Value};

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
