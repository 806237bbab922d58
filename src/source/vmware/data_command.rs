//! The optional NBD data path of a vSphere backup (`--data-command`): for
//! each disk, once the run's snapshot exists, a command the user gives
//! (typically `nbdkit -U "$CBTVAULT_NBD_SOCKET" vddk ... snapshot=...`,
//! which needs VMware's VDDK library, not shipped by cbtvault) is started
//! with the disk's coordinates in its environment and must serve the
//! frozen disk over NBD on a Unix socket. The changed areas still come
//! from QueryChangedDiskAreas; only the bytes come over NBD. The server is
//! stopped (its whole process group) when the disk is done or anything
//! fails, and its socket folder removed. The command's environment is
//! this process's without its secrets (`CBTVAULT_*` and `AWS_*` variables
//! naming a password, secret, token or key).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ::nbd::{NbdUri, PoolOptions};

use super::VmwareError;
use crate::source::nbd::{NbdLimits, NbdSource};
use crate::source::BlockSource;

/// How long the command may take to serve its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running data server and the NBD connection to it.
pub struct DataServer {
    child: Option<Child>,
    dir: PathBuf,
    source: Option<NbdSource>,
}

fn stderr_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    if tail.is_empty() {
        "no output".into()
    } else {
        tail.join(" | ")
    }
}

impl DataServer {
    /// Starts `command` (`sh -c`) with `env` and `CBTVAULT_NBD_SOCKET`, waits
    /// until its socket accepts an NBD connection, and checks that the
    /// export is `capacity` bytes.
    pub fn start(
        command: &str,
        env: &[(&str, String)],
        identity: String,
        capacity: u64,
        limits: NbdLimits,
        timeout: Duration,
    ) -> Result<DataServer, VmwareError> {
        let failed = |why: String| VmwareError::Invalid(format!("--data-command: {why}"));
        let dir = std::env::temp_dir().join(format!(
            "cbtvault-data-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| failed(format!("create {}: {e}", dir.display())))?;
        }
        let socket = dir.join("nbd.sock");
        let log = dir.join("stderr");
        let mut server = DataServer {
            child: None,
            dir,
            source: None,
        };
        let stderr = std::fs::File::create(&log)
            .map_err(|e| failed(format!("create {}: {e}", log.display())))?;
        let mut cmd = Command::new("sh");
        // The command gets the disk's coordinates, never this process's
        // secrets (repository, host and object-store credentials).
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy().to_ascii_uppercase();
            let secret = (n.starts_with("CBTVAULT_") || n.starts_with("AWS_"))
                && ["PASSWORD", "SECRET", "TOKEN", "KEY"]
                    .iter()
                    .any(|w| n.contains(w));
            if secret {
                cmd.env_remove(&name);
            }
        }
        cmd.arg("-c")
            .arg(command)
            .env("CBTVAULT_NBD_SOCKET", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        server.child = Some(
            cmd.spawn()
                .map_err(|e| failed(format!("start the command with sh -c: {e}")))?,
        );
        let uri = NbdUri::parse(&format!(
            "nbd+unix:///?socket={}",
            url::form_urlencoded::byte_serialize(socket.to_string_lossy().as_bytes())
                .collect::<String>()
        ))
        .map_err(|e| failed(format!("socket path {}: {e}", socket.display())))?;
        let started = Instant::now();
        let mut last_error = String::from("no socket yet");
        loop {
            if let Some(child) = server.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(failed(format!(
                        "the command exited ({status}) before serving {} (it must stay in the foreground, e.g. nbdkit -f): {}",
                        socket.display(),
                        stderr_tail(&log)
                    )));
                }
            }
            if socket.exists() {
                match NbdSource::connect(
                    &uri,
                    identity.clone(),
                    None,
                    Vec::new(),
                    PoolOptions::default(),
                    limits,
                ) {
                    Ok(source) => {
                        if source.size_bytes() != capacity {
                            return Err(failed(format!(
                                "the export is {} bytes, the disk {capacity}: not this disk",
                                source.size_bytes()
                            )));
                        }
                        server.source = Some(source);
                        return Ok(server);
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            if started.elapsed() > timeout {
                return Err(failed(format!(
                    "nothing served NBD on {} within {}s ({last_error}): {}",
                    socket.display(),
                    timeout.as_secs(),
                    stderr_tail(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn source(&self) -> &NbdSource {
        self.source.as_ref().expect("connected once started")
    }

    /// Disconnects, stops the command's process group (TERM, then KILL
    /// after 5 s to whatever of the group is left, the shell's children
    /// included once the shell itself has exited) and removes the socket
    /// folder.
    pub fn stop(&mut self) {
        use rustix::process::{kill_process_group, test_kill_process_group, Signal};
        if let Some(source) = self.source.take() {
            source.close();
        }
        if let Some(mut child) = self.child.take() {
            let group = rustix::process::Pid::from_child(&child);
            let _ = kill_process_group(group, Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut reaped = false;
            loop {
                if !reaped {
                    reaped = !matches!(child.try_wait(), Ok(None));
                }
                let group_left = test_kill_process_group(group).is_ok();
                if reaped && !group_left {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = kill_process_group(group, Signal::KILL);
                    if !reaped {
                        let _ = child.wait();
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for DataServer {
    fn drop(&mut self) {
        self.stop();
    }
}
