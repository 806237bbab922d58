//! `sim`: run the XenServer simulator until SIGINT or SIGTERM, with one VM
//! ready to back up, and say how to reach it (URL, certificate fingerprint,
//! credentials, NBD port) and how to write guest data.

use anyhow::{Context, Result};
use serde::Serialize;

use super::Outcome;
use crate::output::Ui;
use xapi_sim::{SimOptions, Simulator};

#[derive(Serialize)]
struct Started {
    url: String,
    jsonrpc_url: String,
    fingerprint_sha256: String,
    username: String,
    password: String,
    nbd_port: u16,
    vm_uuid: String,
    vdi_uuids: Vec<String>,
    state_dir: String,
}

/// A password nobody guesses: 16 random bytes, hex.
fn random_password() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Validated options of `sim`.
#[derive(Debug, Clone)]
pub struct SimHostOptions {
    /// State folder kept across restarts (default: a temporary one).
    pub dir: Option<std::path::PathBuf>,
    /// HTTPS address (HOST:PORT) for XenAPI and the HTTP handlers.
    pub listen: String,
    /// NBD address (default: the --listen host, port 10809).
    pub nbd_listen: Option<String>,
    pub user: String,
    /// Environment variable holding the accepted password.
    pub password_env: String,
    pub hostname: String,
    /// Size in MiB of each disk of the VM created at the first start.
    pub disk_mib: Vec<u64>,
    /// Behave as an old host without CBT.
    pub legacy_host: bool,
    pub log_calls: Option<std::path::PathBuf>,
    /// A vSphere (ESXi) host instead of a XenServer one.
    pub vmware: bool,
}

#[derive(Serialize)]
struct StartedVmware {
    url: String,
    fingerprint_sha256: String,
    username: String,
    password: String,
    vm_id: String,
    vm_instance_uuid: String,
    disk_keys: Vec<i32>,
    state_dir: String,
}

/// `sim --vmware`: a simulated ESXi host with one VM, until a signal.
fn run_vmware(
    ui: &Ui,
    options: &SimHostOptions,
    password: String,
    password_generated: bool,
    wait: impl FnOnce(),
) -> Result<Outcome> {
    if let Some(dir) = &options.dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create state folder '{}'", dir.display()))?;
    }
    let sim = vsphere_sim::Simulator::start(vsphere_sim::SimOptions {
        dir: options.dir.clone(),
        listen: options.listen.clone(),
        username: options.user.clone(),
        password: password.clone(),
        hostname: options.hostname.clone(),
        log_calls: options.log_calls.clone(),
        ..vsphere_sim::SimOptions::default()
    })
    .context("start the vSphere simulator")?;
    let sizes: Vec<u64> = options.disk_mib.iter().map(|m| m << 20).collect();
    let vm = match sim.vm("demo-vm") {
        Some(vm) => vm,
        None => sim
            .add_vm("demo-vm", &sizes)
            .context("create the demo VM")?,
    };
    let a = sim.address();
    let started = StartedVmware {
        url: sim.url(),
        fingerprint_sha256: sim.fingerprint().to_string(),
        username: sim.username().to_string(),
        password: password.clone(),
        vm_id: vm.id.clone(),
        vm_instance_uuid: vm.instance_uuid.clone(),
        disk_keys: vm.disks.iter().map(|d| d.key).collect(),
        state_dir: sim.dir().display().to_string(),
    };
    ui.listening(&started);
    ui.print(format!("vSphere (ESXi) simulator at {}", started.url));
    ui.print(format!(
        "  certificate SHA-256 {}",
        started.fingerprint_sha256
    ));
    ui.print(format!(
        "  login: user '{}', password {}",
        started.username,
        if password_generated {
            format!(
                "'{password}' (generated; set ${} to choose)",
                options.password_env
            )
        } else {
            format!("from ${}", options.password_env)
        }
    ));
    ui.print(format!("  VM 'demo-vm' {} ({})", vm.id, vm.instance_uuid));
    for d in &vm.disks {
        ui.print(format!(
            "    disk {} {} ({})",
            d.key,
            d.file_name,
            crate::output::human_bytes(d.capacity_bytes)
        ));
    }
    ui.info(format!(
        "back it up: CBTVAULT_VMWARE_PASSWORD=... cbtvault -r REPO backup vmware://{}@{}:{}/vm/{} --fingerprint {}",
        started.username,
        a.ip(),
        a.port(),
        vm.id,
        started.fingerprint_sha256
    ));
    ui.info(format!(
        "write guest data: curl -k -u {}:PASSWORD -X POST --data-binary @FILE 'https://{}/sim/guest_write?vm={}&disk={}&offset=0'",
        started.username,
        a,
        vm.id,
        vm.disks.first().map(|d| d.key).unwrap_or(2000)
    ));
    ui.info("stop with Ctrl-C or SIGTERM");
    wait();
    sim.shutdown();
    ui.info("stopped");
    Ok(Outcome::Ok)
}

pub fn run(ui: &Ui, options: &SimHostOptions) -> Result<Outcome> {
    // Signal handlers first: a client may stop us as soon as it has the URL.
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the signal handler")?;
    let (mut interrupt, mut terminate) = {
        let _guard = runtime.enter();
        (
            signal(SignalKind::interrupt()).context("install signal handlers")?,
            signal(SignalKind::terminate()).context("install signal handlers")?,
        )
    };
    let password = std::env::var(&options.password_env)
        .ok()
        .filter(|p| !p.is_empty());
    let password_generated = password.is_none();
    let password = password.unwrap_or_else(random_password);
    if options.vmware {
        return run_vmware(ui, options, password, password_generated, || {
            runtime.block_on(async {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            })
        });
    }
    let nbd_listen = match &options.nbd_listen {
        Some(a) => a.clone(),
        None => {
            let host = options
                .listen
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .context("--listen must be HOST:PORT")?;
            format!("{host}:10809")
        }
    };
    if let Some(dir) = &options.dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create state folder '{}'", dir.display()))?;
    }
    let sim = Simulator::start(SimOptions {
        dir: options.dir.clone(),
        listen: options.listen.clone(),
        nbd_listen: Some(nbd_listen),
        username: options.user.clone(),
        password: password.clone(),
        hostname: options.hostname.clone(),
        legacy_host: options.legacy_host,
        log_calls: options.log_calls.clone(),
        ..SimOptions::default()
    })
    .context("start the XenServer simulator")?;
    let sizes: Vec<u64> = options.disk_mib.iter().map(|m| m << 20).collect();
    // A state folder from an earlier run already has it.
    let vm = match sim.find_vm("demo-vm") {
        Some(vm) => vm,
        None => sim
            .create_vm_with_disks("demo-vm", &sizes)
            .context("create the demo VM")?,
    };
    let started = Started {
        url: sim.url(),
        jsonrpc_url: format!("{}jsonrpc", sim.url()),
        fingerprint_sha256: sim.fingerprint().to_string(),
        username: sim.username().to_string(),
        password: password.clone(),
        nbd_port: sim.nbd_port(),
        vm_uuid: vm.vm_uuid.clone(),
        vdi_uuids: vm.disks.iter().map(|d| d.vdi_uuid.clone()).collect(),
        state_dir: sim.dir().display().to_string(),
    };
    ui.listening(&started);
    ui.print(format!("XenServer simulator at {}", started.url));
    ui.print(format!(
        "  certificate SHA-256 {}",
        started.fingerprint_sha256
    ));
    ui.print(format!(
        "  login: user '{}', password {}",
        started.username,
        if password_generated {
            format!(
                "'{password}' (generated; set ${} to choose)",
                options.password_env
            )
        } else {
            format!("from ${}", options.password_env)
        }
    ));
    ui.print(format!(
        "  NBD (TLS, xapi-nbd style) on port {}",
        started.nbd_port
    ));
    ui.print(format!("  VM 'demo-vm' {}", vm.vm_uuid));
    for d in &vm.disks {
        ui.print(format!(
            "    VDI {} ({})",
            d.vdi_uuid,
            crate::output::human_bytes(d.size_bytes)
        ));
    }
    if let Some(first) = vm.disks.first() {
        ui.info("write guest data (as the running VM would; sets CBT bits):");
        ui.info(format!(
            "  curl -k -u {}:PASSWORD -X PUT --data-binary @FILE '{}sim/guest_write?vdi={}&offset=0'",
            started.username, started.url, first.vdi_uuid
        ));
        ui.info("  or the XenAPI call sim.guest_write(session, vdi_ref, offset, base64_data)");
    }
    ui.info("stop with Ctrl-C or SIGTERM");
    runtime.block_on(async {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    });
    sim.shutdown();
    ui.info("stopped");
    Ok(Outcome::Ok)
}
