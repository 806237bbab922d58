//! cbtvault's vSphere SOAP plumbing against a second, independent peer:
//! govmomi's vcsim (Debian's golang-github-vmware-govmomi-dev 0.24.2,
//! built with Debian's Go by tests/vcsim/build.sh around our own
//! tests/vcsim/main.go). Our own simulator (crates/vsphere-sim) shares the
//! `vim-wire` codec with the client, so a codec mistake would be made on
//! both ends; vcsim was written from the WSDL by others.
//!
//! Through the library: login (a wrong password is `InvalidLogin`), the
//! service content, an inventory traversal with the PropertyCollector,
//! SearchIndex lookups, the VM's CBT properties and disks,
//! `ReconfigVM_Task` on and off, a tree of snapshots created and removed,
//! the faults vcsim answers (`MethodNotFound` for QueryChangedDiskAreas,
//! `ManagedObjectNotFound`, `NotAuthenticated` after logout) and `/folder`
//! Range reads checked byte for byte. Through the binary: a backup of a
//! vcsim VM, which fails cleanly on vcsim's empty flat file and succeeds,
//! restoring bit for bit, once the flat file holds the disk's bytes.
//!
//! What vcsim 0.24.2 does not do, and so what this cannot check: it sets
//! no `changeId` and no `capability.changeTrackingSupported`, and it does
//! not implement QueryChangedDiskAreas; the backup workflow therefore
//! takes its "no change tracking: read in full" path and never calls it.
//!
//! Without Go or govmomi's sources the tests skip with a note; with
//! CI=true they fail (.ci/run installs both).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cbtvault::source::vmware::client::Session;
use cbtvault::source::vmware::folder::FlatFile;
use cbtvault::source::vmware::workflow::flat_path;
use cbtvault::source::vmware::VmwareError;
use cbtvault::source::xenapi::tls::{parse_fingerprint, HttpsTrust};
use cbtvault::source::BlockSource;
use serde_json::Value;
use vim_wire::{
    ConfigSpec, Moref, ObjectContent, ObjectSpec, PropertyFilterSpec, PropertySpec, PropertyValue,
    Request, Response, RetrieveOptions, SelectionSpec, SnapshotInfo, TaskResult, TaskState,
    TraversalSpec, VimFault, VirtualDisk,
};

use crate::util::{hash_file, random_bytes, Run, TestRepo};

const PASSWORD: &str = "vcsim-secret";
const USER: &str = "root";
/// Where Debian's golang-github-vmware-govmomi-dev puts the simulator.
const GOVMOMI_SIMULATOR: &str = "/usr/share/gocode/src/github.com/vmware/govmomi/simulator";
/// vcsim's VM disks: `capacityInKB` 1024.
const DISK_BYTES: u64 = 1 << 20;
const TASKS: Duration = Duration::from_secs(60);

// ------------------------------------------------------------ the binary

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The vcsim binary, built once per run into the target's tmp dir and
/// rebuilt only when main.go or build.sh is newer; `None` (a skip) when
/// Go or govmomi's sources are missing, a failure then under CI=true.
fn vcsim_binary() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT.get_or_init(build).clone()
}

fn build() -> Option<PathBuf> {
    let missing = if !on_path("go") {
        Some("go (apt package golang-go)")
    } else if !Path::new(GOVMOMI_SIMULATOR).is_dir() {
        Some("govmomi's simulator sources (apt package golang-github-vmware-govmomi-dev)")
    } else {
        None
    };
    if let Some(what) = missing {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} is missing on CI (.ci/run installs it)"
        );
        eprintln!("skipped: {what} is missing, so vcsim cannot be built");
        return None;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vcsim");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vcsim");
    let bin = out.join("vcsim");
    // Rebuilt when our sources change or Debian's govmomi is upgraded.
    let sources = [
        src.join("main.go"),
        src.join("build.sh"),
        Path::new(GOVMOMI_SIMULATOR).join("simulator.go"),
    ]
    .iter()
    .filter_map(|p| modified(p))
    .max();
    if let (Some(built), Some(sources)) = (modified(&bin), sources) {
        if built >= sources {
            return Some(bin);
        }
    }
    let started = Instant::now();
    let r = Command::new("bash")
        .arg(src.join("build.sh"))
        .arg(&out)
        .output()
        .expect("run tests/vcsim/build.sh");
    assert!(
        r.status.success(),
        "tests/vcsim/build.sh failed ({}):\n{}{}",
        r.status,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    eprintln!("built vcsim in {:.1}s", started.elapsed().as_secs_f64());
    Some(bin)
}

// ------------------------------------------------------------- a server

/// The model: a standalone ESXi host or a vCenter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Model {
    Esx,
    Vpx,
}

impl Model {
    fn flag(self) -> &'static str {
        match self {
            Model::Esx => "esx",
            Model::Vpx => "vpx",
        }
    }

    fn datacenter(self) -> &'static str {
        match self {
            Model::Esx => "ha-datacenter",
            Model::Vpx => "DC0",
        }
    }

    fn api_type(self) -> &'static str {
        match self {
            Model::Esx => "HostAgent",
            Model::Vpx => "VirtualCenter",
        }
    }

    /// The VMs vcsim creates, by name, sorted.
    fn vm_names(self) -> Vec<&'static str> {
        match self {
            Model::Esx => vec!["ha-host_VM0", "ha-host_VM1"],
            Model::Vpx => vec![
                "DC0_C0_RP0_VM0",
                "DC0_C0_RP0_VM1",
                "DC0_H0_VM0",
                "DC0_H0_VM1",
            ],
        }
    }
}

/// One running vcsim; stopped (stdin closed, then killed) when dropped.
/// Its datastore folders live in its own temporary folder.
struct Vcsim {
    child: Child,
    dir: tempfile::TempDir,
    model: Model,
    host: String,
    port: u16,
    fingerprint: String,
    cert_file: PathBuf,
    datastore: String,
    /// The datastore's folder on this machine.
    datastore_dir: PathBuf,
}

impl Vcsim {
    /// `None` when vcsim cannot be built here (skipped).
    fn start(model: Model, tls: &str) -> Option<Vcsim> {
        let bin = vcsim_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("cbtvault-vcsim-")
            .tempdir()
            .expect("temp dir");
        let cert_file = dir.path().join("vcsim.pem");
        let log = std::fs::File::create(dir.path().join("vcsim.log")).expect("log file");
        let mut child = Command::new(&bin)
            .args(["-model", model.flag(), "-tls", tls, "-exit-on-eof"])
            .args(["-user", USER, "-password", PASSWORD])
            .arg("-cert-out")
            .arg(&cert_file)
            // vcsim makes its datastore folders in TMPDIR.
            .env("TMPDIR", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start vcsim");
        let stdout = child.stdout.take().expect("vcsim's stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = tx.send(first);
            // Drain whatever follows, so vcsim never blocks on stdout.
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(json) = line.strip_prefix("VCSIM ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vcsim did not announce itself (got {line:?}); its log:\n{}",
                std::fs::read_to_string(dir.path().join("vcsim.log")).unwrap_or_default()
            );
        };
        let a: Value = serde_json::from_str(json).expect("vcsim's announcement");
        let ds = &a["datastores"][0];
        let s = |v: &Value| v.as_str().expect("a string").to_string();
        Some(Vcsim {
            model,
            host: s(&a["host"]),
            port: s(&a["port"]).parse().expect("a port"),
            fingerprint: s(&a["fingerprint"]),
            cert_file,
            datastore: s(&ds["name"]),
            datastore_dir: PathBuf::from(s(&ds["path"])),
            child,
            dir,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vcsim.log")).unwrap_or_default()
    }

    fn pinned(&self) -> HttpsTrust {
        HttpsTrust::Fingerprint(vec![
            parse_fingerprint(&self.fingerprint).expect("a fingerprint")
        ])
    }

    fn login(&self) -> Session {
        Session::login(&self.host, self.port, &self.pinned(), USER, PASSWORD)
            .unwrap_or_else(|e| panic!("log in to vcsim: {e}\n{}", self.log()))
    }

    fn url(&self, vm: &str) -> String {
        format!("vmware://{USER}@{}:{}/vm/{vm}", self.host, self.port)
    }

    /// `cbtvault --json backup vmware://... --fingerprint FP EXTRA...`.
    fn backup(&self, t: &TestRepo, vm: &str, extra: &[&str]) -> Run {
        let u = self.url(vm);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"--json",
            &"backup",
            &u,
            &"--fingerprint",
            &self.fingerprint,
        ];
        for e in extra {
            args.push(e);
        }
        t.run_env(&args, &[("CBTVAULT_VMWARE_PASSWORD", PASSWORD)])
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        // -exit-on-eof: closing stdin stops it (and it removes its
        // folders); killed if it does not.
        drop(self.child.stdin.take());
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ the reads

/// Every VM (name, instance uuid), datacenter (name) and datastore (name)
/// under the root folder, by one traversing PropertyCollector read (paged
/// with ContinueRetrievePropertiesEx when the host pages).
fn inventory(s: &Session) -> Vec<ObjectContent> {
    let t = |name: &str, kind: &str, path: &str, next: &[&str]| {
        SelectionSpec::Traversal(TraversalSpec {
            name: Some(name.into()),
            kind: kind.into(),
            path: path.into(),
            skip: Some(false),
            select_set: next
                .iter()
                .map(|n| SelectionSpec::Named(n.to_string()))
                .collect(),
        })
    };
    let spec = PropertyFilterSpec {
        prop_set: vec![
            PropertySpec::new("VirtualMachine", &["name", "config.instanceUuid"]),
            PropertySpec::new("Datacenter", &["name"]),
            PropertySpec::new("Datastore", &["name"]),
        ],
        object_set: vec![ObjectSpec {
            obj: s.content().root_folder.clone(),
            skip: Some(false),
            select_set: vec![
                t(
                    "folder",
                    "Folder",
                    "childEntity",
                    &["folder", "dcVm", "dcDs"],
                ),
                t("dcVm", "Datacenter", "vmFolder", &["folder"]),
                t("dcDs", "Datacenter", "datastore", &[]),
            ],
        }],
    };
    let mut r = s
        .call(Request::RetrievePropertiesEx {
            this: s.content().property_collector.clone(),
            spec_set: vec![spec],
            options: RetrieveOptions {
                max_objects: Some(2),
            },
        })
        .expect("RetrievePropertiesEx of the inventory");
    let mut all = Vec::new();
    loop {
        let Response::RetrieveResult(Some(page)) = r else {
            panic!("RetrievePropertiesEx answered {r:?}");
        };
        all.extend(page.objects);
        let Some(token) = page.token else { break };
        r = s
            .call(Request::ContinueRetrievePropertiesEx {
                this: s.content().property_collector.clone(),
                token,
            })
            .expect("ContinueRetrievePropertiesEx");
    }
    all
}

fn names_of(objects: &[ObjectContent], kind: &str) -> Vec<String> {
    let mut v: Vec<String> = objects
        .iter()
        .filter(|o| o.obj.kind == kind)
        .map(|o| match o.property("name") {
            Some(PropertyValue::String(n)) => n.clone(),
            other => panic!("{}: name is {other:?}", o.obj),
        })
        .collect();
    v.sort();
    v
}

fn string(p: Option<&PropertyValue>) -> String {
    match p {
        Some(PropertyValue::String(s)) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

/// The VM's one disk, from `config.hardware.device` of `obj` (the VM or
/// one of its snapshots).
fn the_disk(s: &Session, obj: &Moref) -> VirtualDisk {
    let p = s
        .properties(obj, &["config.hardware.device"])
        .expect("read config.hardware.device");
    let Some(PropertyValue::Devices(devices)) = p.property("config.hardware.device") else {
        panic!("{obj}: config.hardware.device is {p:?}");
    };
    let disks = vim_wire::device::disks(devices);
    assert_eq!(disks.len(), 1, "{obj}: {devices:?}");
    // The other devices (controllers, NIC, ...) decode as opaque ones.
    assert!(devices.len() > 1, "{obj}: only the disk: {devices:?}");
    disks[0].clone()
}

fn cbt_enabled(s: &Session, vm: &Moref) -> Option<bool> {
    let p = s
        .properties(vm, &["config.changeTrackingEnabled"])
        .expect("read config.changeTrackingEnabled");
    match p.property("config.changeTrackingEnabled") {
        None => None,
        Some(PropertyValue::Bool(b)) => Some(*b),
        other => panic!("config.changeTrackingEnabled is {other:?}"),
    }
}

/// The VM's `snapshot` (absent when it has none).
fn snapshots(s: &Session, vm: &Moref) -> Option<SnapshotInfo> {
    let p = s.properties(vm, &["snapshot"]).expect("read snapshot");
    match p.property("snapshot") {
        None => None,
        Some(PropertyValue::SnapshotInfo(i)) => Some(i.clone()),
        other => panic!("snapshot is {other:?}"),
    }
}

fn snapshot_task(s: &Session, vm: &Moref, name: &str) -> Moref {
    let info = s
        .run_task(
            Request::CreateSnapshotTask {
                this: vm.clone(),
                name: name.into(),
                description: Some(format!("{name}, by cbtvault's vcsim test")),
                memory: false,
                quiesce: false,
            },
            TASKS,
        )
        .expect("CreateSnapshot_Task");
    assert_eq!(info.state, TaskState::Success);
    assert_eq!(info.entity.as_ref(), Some(vm));
    match info.result {
        Some(TaskResult::Moref(m)) if m.kind == "VirtualMachineSnapshot" => m,
        other => panic!("CreateSnapshot_Task returned {other:?}"),
    }
}

fn remove_task(s: &Session, snapshot: &Moref) -> Result<(), VmwareError> {
    s.run_task(
        Request::RemoveSnapshotTask {
            this: snapshot.clone(),
            remove_children: false,
            consolidate: Some(true),
        },
        TASKS,
    )
    .map(|info| assert_eq!(info.state, TaskState::Success))
}

/// The vim fault of an error, which must be a SOAP fault of `call`.
#[track_caller]
fn fault_of(r: Result<Response, VmwareError>, call: &str) -> (VimFault, String) {
    match r {
        Err(VmwareError::Fault { call: c, fault }) => {
            assert_eq!(c, call);
            let detail = fault
                .detail
                .clone()
                .unwrap_or_else(|| panic!("{call}: a fault without detail: {fault:?}"));
            (detail, fault.message.clone())
        }
        other => panic!("{call}: not a fault: {other:?}"),
    }
}

/// Status of an HTTP error from a `/folder` read.
#[track_caller]
fn http_status(r: Result<(), VmwareError>) -> u16 {
    match r {
        Err(VmwareError::Http { status, .. }) => status,
        other => panic!("not an HTTP error: {other:?}"),
    }
}

// ---------------------------------------------------------------- tests

fn plumbing(model: Model) {
    let Some(sim) = Vcsim::start(model, "generated") else {
        return;
    };
    let dc = model.datacenter();

    // A wrong password: InvalidLogin, decoded from vcsim's fault, and the
    // password in no message.
    let wrong = Session::login(&sim.host, sim.port, &sim.pinned(), USER, "not-the-password");
    let Err(e) = wrong else {
        panic!("a wrong password logged in");
    };
    assert_eq!(e.fault_type().as_deref(), Some("InvalidLogin"), "{e}");
    assert!(!e.to_string().contains("not-the-password"), "{e}");
    // Pinned to another certificate: refused before any password is sent.
    let other = HttpsTrust::Fingerprint(vec![[7u8; 32]]);
    match Session::login(&sim.host, sim.port, &other, USER, PASSWORD) {
        Err(VmwareError::CertificateRefused { .. }) => {}
        Err(e) => panic!("another pinned certificate: {e:?}"),
        Ok(_) => panic!("another pinned certificate was accepted"),
    }
    // And by the CA file vcsim wrote (its certificate, self-signed).
    let pem = std::fs::read(&sim.cert_file).expect("vcsim's certificate");
    drop(
        Session::login(&sim.host, sim.port, &HttpsTrust::CaPem(pem), USER, PASSWORD)
            .expect("log in trusting vcsim's certificate as a CA"),
    );

    let s = sim.login();
    let content = s.content().clone();
    assert_eq!(content.about.api_type, model.api_type());
    assert!(content.about.full_name.starts_with("VMware"), "{content:?}");
    assert!(content.session_manager.is_some() && content.search_index.is_some());
    assert_eq!(content.root_folder.kind, "Folder");
    assert_eq!(content.property_collector.kind, "PropertyCollector");

    // The inventory, in pages of two objects.
    let inv = inventory(&s);
    assert_eq!(names_of(&inv, "Datacenter"), vec![dc.to_string()]);
    assert_eq!(names_of(&inv, "Datastore"), vec![sim.datastore.clone()]);
    assert_eq!(names_of(&inv, "VirtualMachine"), model.vm_names());
    let name = model.vm_names()[0];
    let found = inv
        .iter()
        .find(|o| o.obj.kind == "VirtualMachine" && string(o.property("name")) == name)
        .expect("the first VM");
    let vm = found.obj.clone();
    let uuid = string(found.property("config.instanceUuid"));
    assert!(vm.value.starts_with("vm-"), "{vm}");

    // The SearchIndex: by inventory path and by instance uuid.
    let index = content.search_index.clone().expect("a SearchIndex");
    let by_path = |path: &str| {
        s.call(Request::FindByInventoryPath {
            this: index.clone(),
            inventory_path: path.into(),
        })
        .expect("FindByInventoryPath")
    };
    assert_eq!(
        by_path(&format!("{dc}/vm/{name}")),
        Response::Found(Some(vm.clone()))
    );
    assert_eq!(
        by_path(&format!("{dc}/vm/no-such-vm")),
        Response::Found(None)
    );
    let by_uuid = s
        .call(Request::FindByUuid {
            this: index.clone(),
            datacenter: None,
            uuid: uuid.clone(),
            vm_search: true,
            instance_uuid: Some(true),
        })
        .expect("FindByUuid");
    assert_eq!(by_uuid, Response::Found(Some(vm.clone())));

    // The CBT properties and the disk.
    let p = s
        .properties(
            &vm,
            &[
                "name",
                "capability.changeTrackingSupported",
                "config.changeTrackingEnabled",
                "snapshot",
            ],
        )
        .expect("read the VM");
    assert_eq!(p.obj, vm);
    assert_eq!(string(p.property("name")), name);
    // vcsim 0.24.2 sets no capability.changeTrackingSupported (later ones
    // compute it from the backing: true for a flat disk).
    assert!(
        matches!(
            p.property("capability.changeTrackingSupported"),
            None | Some(PropertyValue::Bool(true))
        ),
        "{p:?}"
    );
    assert_ne!(cbt_enabled(&s, &vm), Some(true));
    assert_eq!(p.property("snapshot"), None);
    let disk = the_disk(&s, &vm);
    assert!(disk.key > 0, "{disk:?}");
    assert_eq!(disk.capacity_bytes(), DISK_BYTES as i64, "{disk:?}");
    assert_eq!(
        disk.backing.kind.type_name(),
        "VirtualDiskFlatVer2BackingInfo"
    );
    let file = format!("[{}] {name}/disk1.vmdk", sim.datastore);
    assert_eq!(disk.backing.file_name, file);
    assert_eq!(disk.backing.change_id, None, "vcsim sets no changeId");
    let (ds, flat) = flat_path(&file).expect("a [datastore] path");
    assert_eq!(
        (ds.as_str(), flat.clone()),
        (sim.datastore.as_str(), format!("{name}/disk1-flat.vmdk"))
    );

    // ReconfigVM_Task: CBT on, read back, and off again.
    for on in [true, false] {
        let info = s
            .run_task(
                Request::ReconfigVmTask {
                    this: vm.clone(),
                    spec: ConfigSpec {
                        change_tracking_enabled: Some(on),
                        ..ConfigSpec::default()
                    },
                },
                TASKS,
            )
            .expect("ReconfigVM_Task");
        assert_eq!(info.state, TaskState::Success);
        assert_eq!(cbt_enabled(&s, &vm), Some(on));
        assert_eq!(the_disk(&s, &vm).backing.change_id, None);
    }

    // Snapshots: one, a child of it, the child removed, then the first.
    let first = snapshot_task(&s, &vm, "cbtvault-vcsim-1");
    let tree = snapshots(&s, &vm).expect("a snapshot tree");
    assert_eq!(tree.current_snapshot.as_ref(), Some(&first));
    let all = tree.all();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (
            all[0].snapshot.clone(),
            all[0].vm.clone(),
            all[0].name.as_str()
        ),
        (first.clone(), vm.clone(), "cbtvault-vcsim-1")
    );
    assert_eq!(
        all[0].description,
        "cbtvault-vcsim-1, by cbtvault's vcsim test"
    );
    assert!(!all[0].quiesced);
    // The snapshot's own configuration, as the backup reads it.
    let frozen = the_disk(&s, &first);
    assert_eq!((frozen.key, &frozen.backing.file_name), (disk.key, &file));
    let cfg = s
        .properties(&first, &["config"])
        .expect("the snapshot's config");
    assert!(
        matches!(cfg.property("config"), Some(PropertyValue::Other(e)) if e.child("hardware").is_some()),
        "{cfg:?}"
    );
    let second = snapshot_task(&s, &vm, "cbtvault-vcsim-2");
    assert_ne!(second, first);
    let tree = snapshots(&s, &vm).expect("a snapshot tree");
    assert_eq!(tree.current_snapshot.as_ref(), Some(&second));
    assert_eq!(tree.root_snapshot_list.len(), 1);
    let children = &tree.root_snapshot_list[0].children;
    assert_eq!(children.len(), 1);
    assert_eq!(
        (&children[0].snapshot, children[0].name.as_str()),
        (&second, "cbtvault-vcsim-2")
    );
    remove_task(&s, &second).expect("RemoveSnapshot_Task of the child");
    let tree = snapshots(&s, &vm).expect("the first snapshot stays");
    assert_eq!(tree.all().len(), 1);
    assert_eq!(tree.current_snapshot.as_ref(), Some(&first));
    remove_task(&s, &first).expect("RemoveSnapshot_Task");
    assert_eq!(snapshots(&s, &vm), None);
    // A removed snapshot: ManagedObjectNotFound naming it.
    let (f, _) = fault_of(
        s.call(Request::RemoveSnapshotTask {
            this: first.clone(),
            remove_children: false,
            consolidate: Some(true),
        }),
        "RemoveSnapshot_Task",
    );
    assert_eq!(f, VimFault::ManagedObjectNotFound { obj: first.clone() });

    // QueryChangedDiskAreas: vcsim does not implement it.
    let (f, message) = fault_of(
        s.call(Request::QueryChangedDiskAreas {
            this: vm.clone(),
            snapshot: None,
            device_key: disk.key,
            start_offset: 0,
            change_id: "*".into(),
        }),
        "QueryChangedDiskAreas",
    );
    assert_eq!(
        f,
        VimFault::MethodNotFound {
            receiver: vm.clone(),
            method: "QueryChangedDiskAreas".into()
        }
    );
    assert!(message.contains("does not implement"), "{message}");

    // /folder: a file of our own in the datastore (a space in its path),
    // read in ranges and compared byte for byte.
    let size = DISK_BYTES as usize + 12_345;
    let bytes = random_bytes(41, 0, size);
    let rel = "cbtvault test/range file.bin";
    let local = sim.datastore_dir.join(rel);
    std::fs::create_dir_all(local.parent().expect("a parent")).expect("mkdir");
    std::fs::write(&local, &bytes).expect("write into the datastore");
    for (at, len) in [
        (0usize, 1usize),
        (0, 4096),
        (65_536, 100_000),
        (size - 1, 1),
        (size - 12_345, 12_345),
        (0, size),
    ] {
        let mut buf = vec![0u8; len];
        s.read_range(dc, &sim.datastore, rel, at as u64, &mut [&mut buf[..]])
            .unwrap_or_else(|e| panic!("bytes {at}+{len}: {e}"));
        assert!(buf == bytes[at..at + len], "bytes {at}+{len} differ");
    }
    // One request read straight into several buffers, one after the other.
    let (mut a, mut b, mut c) = (vec![0u8; 5], vec![0u8; 70_000], vec![0u8; 3]);
    s.read_range(
        dc,
        &sim.datastore,
        rel,
        1000,
        &mut [&mut a[..], &mut b[..], &mut c[..]],
    )
    .unwrap();
    assert!(
        [a, b, c].concat() == bytes[1000..71_008],
        "vectored read differs"
    );
    // The same through the disk reader: adjacent reads merged, 4 lanes.
    let source = FlatFile::new(
        std::sync::Arc::new(sim.login()),
        "vcsim-file".into(),
        dc.into(),
        sim.datastore.clone(),
        rel.into(),
        size as u64,
    );
    let offsets = [
        0u64,
        65_536,
        131_072,
        393_216,
        458_752,
        size as u64 - 65_536,
    ];
    let mut bufs: Vec<Vec<u8>> = offsets.iter().map(|_| vec![0u8; 65_536]).collect();
    let mut reads: Vec<(u64, &mut [u8])> = offsets
        .iter()
        .zip(bufs.iter_mut())
        .map(|(o, b)| (*o, b.as_mut_slice()))
        .collect();
    source.read_many(&mut reads).expect("read_many");
    for (o, b) in offsets.iter().zip(&bufs) {
        let o = *o as usize;
        assert!(b[..] == bytes[o..o + 65_536], "read_many at {o} differs");
    }
    let mut one = [0u8; 1];
    assert!(
        source.read_at(size as u64, &mut one).is_err(),
        "past the end"
    );
    drop(source);
    // Past the end: 416 from vcsim; across the end: the shorter
    // Content-Range vcsim answers is refused.
    let mut buf = [0u8; 10];
    assert_eq!(
        http_status(s.read_range(dc, &sim.datastore, rel, size as u64, &mut [&mut buf[..]])),
        416
    );
    let mut buf = [0u8; 20];
    match s.read_range(
        dc,
        &sim.datastore,
        rel,
        size as u64 - 10,
        &mut [&mut buf[..]],
    ) {
        Err(VmwareError::Protocol { reason, .. }) => {
            assert!(reason.contains("Content-Range"), "{reason}")
        }
        other => panic!("a range across the end: {other:?}"),
    }
    // No such file, no such datastore: 404.
    let mut buf = [0u8; 10];
    assert_eq!(
        http_status(s.read_range(
            dc,
            &sim.datastore,
            "cbtvault test/none",
            0,
            &mut [&mut buf[..]]
        )),
        404
    );
    assert_eq!(
        http_status(s.read_range(dc, "no-such-ds", rel, 0, &mut [&mut buf[..]])),
        404
    );
    // vcsim's own flat file of the VM's disk is empty: any read is 416.
    assert_eq!(
        std::fs::metadata(sim.datastore_dir.join(&flat))
            .map(|m| m.len())
            .ok(),
        Some(0)
    );
    assert_eq!(
        http_status(s.read_range(dc, &sim.datastore, &flat, 0, &mut [&mut buf[..]])),
        416
    );

    // Logout: the PropertyCollector then answers every property in
    // missingSet, NotAuthenticated (as vSphere does); `properties` makes
    // that an error, not absent properties.
    s.logout();
    let after = s
        .call(Request::RetrievePropertiesEx {
            this: content.property_collector.clone(),
            spec_set: vec![PropertyFilterSpec::of(&vm, &["name"])],
            options: RetrieveOptions::default(),
        })
        .expect("RetrievePropertiesEx after logout");
    let Response::RetrieveResult(Some(r)) = after else {
        panic!("after logout: {after:?}");
    };
    assert!(r.objects[0].prop_set.is_empty(), "{r:?}");
    assert_eq!(
        r.objects[0].missing_set[0].fault.fault.type_name(),
        "NotAuthenticated"
    );
    let e = s
        .properties(&vm, &["config.changeTrackingEnabled"])
        .expect_err("a property read after logout");
    assert_eq!(e.fault_type().as_deref(), Some("NotAuthenticated"), "{e}");
    assert!(
        e.to_string().contains("config.changeTrackingEnabled"),
        "{e}"
    );
    // Other calls: a NotAuthenticated fault.
    let (f, _) = fault_of(
        s.call(Request::FindByInventoryPath {
            this: index.clone(),
            inventory_path: format!("{dc}/vm/{name}"),
        }),
        "FindByInventoryPath",
    );
    assert_eq!(f.type_name(), "NotAuthenticated", "{f:?}");
    assert!(
        !sim.log().contains("panic"),
        "vcsim panicked:\n{}",
        sim.log()
    );
}

#[test]
fn soap_plumbing_against_vcsim_esx() {
    plumbing(Model::Esx);
}

#[test]
fn soap_plumbing_against_vcsim_vcenter() {
    plumbing(Model::Vpx);
}

/// The VM's moref and disk file path in the datastore (its `-flat.vmdk`).
fn first_vm(sim: &Vcsim) -> (Moref, String) {
    let s = sim.login();
    let name = sim.model.vm_names()[0];
    let Response::Found(Some(vm)) = s
        .call(Request::FindByInventoryPath {
            this: s.content().search_index.clone().expect("a SearchIndex"),
            inventory_path: format!("{}/vm/{name}", sim.model.datacenter()),
        })
        .expect("FindByInventoryPath")
    else {
        panic!("no VM {name}");
    };
    (vm, format!("{name}/disk1-flat.vmdk"))
}

#[test]
fn the_backup_command_against_vcsim() {
    let Some(sim) = Vcsim::start(Model::Esx, "generated") else {
        return;
    };
    let (vm, flat) = first_vm(&sim);
    let s = sim.login();
    let t = TestRepo::new();

    // vcsim's flat file is empty: the read fails, clearly, after the run
    // took and removed its snapshot; nothing is committed.
    let r = sim.backup(&t, &vm.value, &[]).expect_code(1);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r.stderr_mentions(&["disk1-flat.vmdk", "416"]);
    // No changeId, no capability: CBT is taken as unsupported, so
    // QueryChangedDiskAreas (which vcsim lacks) is never called.
    r.stderr_mentions(&["does not support changed block tracking"]);
    assert!(!r.stderr.contains("QueryChangedDiskAreas"), "{}", r.stderr);
    assert_eq!(
        snapshots(&s, &vm),
        None,
        "a vSphere snapshot was left behind"
    );
    assert!(t.snapshot_ids().is_empty(), "something was committed");
    assert_ne!(cbt_enabled(&s, &vm), Some(true), "CBT was enabled");

    // The flat file given the disk's bytes: a full backup that restores
    // bit for bit, its configuration saved, no snapshot left.
    let local = sim.datastore_dir.join(&flat);
    std::fs::write(&local, random_bytes(43, 1, DISK_BYTES as usize)).expect("fill the flat file");
    let r = sim.backup(&t, &vm.value, &[]).ok();
    r.stderr_mentions(&["does not support changed block tracking"]);
    let j = r.json();
    let disks = j["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 1, "{j}");
    let d = &disks[0];
    assert_eq!(d["full"], true, "{d}");
    assert_eq!(d["change_id"], Value::Null, "{d}");
    assert_eq!(d["disk_size_bytes"], DISK_BYTES, "{d}");
    assert_eq!(d["blocks_read"], DISK_BYTES / crate::util::BS, "{d}");
    t.assert_restores(
        d["snapshot_id"].as_str().expect("snapshot_id"),
        hash_file(&local),
        DISK_BYTES,
    );
    assert!(j["config"]["snapshot_id"].is_string(), "{j}");
    assert_eq!(t.snapshot_ids().len(), 2);
    assert_eq!(snapshots(&s, &vm), None, "the backup's snapshot stays");

    // The VM by its inventory path: the same disk (its identity is the
    // instance uuid), read in full again.
    let path = format!("ha-datacenter/vm/{}", sim.model.vm_names()[0]);
    let again = sim.backup(&t, &path, &[]).ok().json();
    assert_eq!(again["disks"][0]["full"], true);
    assert!(
        again["disks"][0]["full_reason"]
            .as_str()
            .unwrap_or("")
            .contains("does not support changed block tracking"),
        "{again}"
    );
    let listed = t.snapshots(&[]);
    assert_eq!(listed.len(), 4, "{listed:?}");
    let disk_sources: Vec<&Value> = listed
        .iter()
        .filter(|l| l["kind"] == "disk")
        .map(|l| &l["source"])
        .collect();
    assert_eq!(disk_sources.len(), 2, "{listed:?}");
    assert_eq!(disk_sources[0], disk_sources[1], "{listed:?}");
    assert!(!sim.log().contains("panic"), "{}", sim.log());
}

#[test]
fn a_vcenter_backup_needs_its_datacenter() {
    let Some(sim) = Vcsim::start(Model::Vpx, "generated") else {
        return;
    };
    let (vm, flat) = first_vm(&sim);
    let local = sim.datastore_dir.join(&flat);
    std::fs::write(&local, random_bytes(44, 1, DISK_BYTES as usize)).expect("fill the flat file");
    let s = sim.login();
    let t = TestRepo::new();
    // The default datacenter (ha-datacenter, an ESXi host's) is not
    // vCenter's: vcsim answers 404, and nothing is left or committed.
    let r = sim.backup(&t, &vm.value, &[]).expect_code(1);
    r.stderr_mentions(&["disk1-flat.vmdk", "404"]);
    assert_eq!(snapshots(&s, &vm), None);
    assert!(t.snapshot_ids().is_empty());
    let j = sim
        .backup(&t, &vm.value, &["--datacenter", "DC0"])
        .ok()
        .json();
    let d = &j["disks"][0];
    t.assert_restores(
        d["snapshot_id"].as_str().expect("snapshot_id"),
        hash_file(&local),
        DISK_BYTES,
    );
    assert_eq!(snapshots(&s, &vm), None);
}

/// vcsim's own certificate (the one Go's httptest carries) has an RSA key
/// of 1024 bits: the TLS stack refuses its handshake signature even with
/// its fingerprint pinned, so tests/vcsim/main.go serves one of its own.
#[test]
fn vcsim_s_builtin_certificate_is_refused() {
    let Some(sim) = Vcsim::start(Model::Esx, "builtin") else {
        return;
    };
    let pem = std::fs::read_to_string(&sim.cert_file).expect("the builtin certificate");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let e = match Session::login(&sim.host, sim.port, &sim.pinned(), USER, PASSWORD) {
        Ok(_) => panic!("a 1024-bit RSA certificate was accepted"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("certificate"), "{e:?}");
    let t = TestRepo::new();
    let r = sim.backup(&t, "vm-1", &[]).expect_code(1);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r.stderr_mentions(&["certificate"]);
    eprintln!(
        "vcsim's builtin certificate, pinned: {e}\nthe command: {}",
        r.stderr
    );
}

/// The restore plumbing against vcsim: FileManager.MakeDirectory, PUT of
/// the flat file and the descriptor, HEAD, the Range read-back of
/// `--verify`, and DeleteDatastoreFile_Task for `--force`; the VM
/// inventory walk that refuses to replace a VM's disk.
#[test]
fn a_restore_into_vcsim_writes_a_flat_vmdk_and_refuses_a_vms_disk() {
    let Some(sim) = Vcsim::start(Model::Esx, "generated") else {
        return;
    };
    let (vm, flat) = first_vm(&sim);
    let local = sim.datastore_dir.join(&flat);
    let bytes = random_bytes(45, 1, DISK_BYTES as usize);
    std::fs::write(&local, &bytes).expect("fill the flat file");
    let t = TestRepo::new();
    let j = sim.backup(&t, &vm.value, &[]).ok().json();
    let id = j["disks"][0]["snapshot_id"]
        .as_str()
        .expect("snapshot_id")
        .to_string();
    let restore = |path: &str, extra: &[&str]| {
        let to = format!(
            "vmware://{USER}@{}:{}/datastore/{}/{path}",
            sim.host, sim.port, sim.datastore
        );
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"--json",
            &"restore",
            &id,
            &"--target",
            &to,
            &"--fingerprint",
            &sim.fingerprint,
        ];
        for e in extra {
            args.push(e);
        }
        t.run_env(&args, &[("CBTVAULT_VMWARE_PASSWORD", PASSWORD)])
    };
    let r = restore("restored/r1.vmdk", &["--verify"]).ok().json();
    assert_eq!(r["verified"], true, "{r}");
    let written =
        std::fs::read(sim.datastore_dir.join("restored/r1-flat.vmdk")).expect("the flat file");
    assert_eq!(blake3::hash(&written), blake3::hash(&bytes));
    let descriptor = std::fs::read_to_string(sim.datastore_dir.join("restored/r1.vmdk"))
        .expect("the descriptor");
    assert!(descriptor.contains("VMFS \"r1-flat.vmdk\""), "{descriptor}");
    // Again with --force: the new disk under a flat file of its own name,
    // the descriptor replaced, the old flat file deleted last.
    let r = restore("restored/r1.vmdk", &["--force", "--verify"]).ok();
    let j = r.json();
    assert_eq!(j["replaced"], true);
    let new_flat = j["flat_path"].as_str().expect("flat_path");
    let new_name = new_flat.rsplit('/').next().expect("a name");
    assert!(
        new_name.starts_with("r1-") && new_name != "r1-flat.vmdk",
        "{new_flat}"
    );
    assert!(!sim.datastore_dir.join("restored/r1-flat.vmdk").exists());
    let descriptor = std::fs::read_to_string(sim.datastore_dir.join("restored/r1.vmdk"))
        .expect("the descriptor");
    assert!(
        descriptor.contains(&format!("VMFS \"{new_name}\"")),
        "{descriptor}"
    );
    assert_eq!(
        blake3::hash(&std::fs::read(sim.datastore_dir.join("restored").join(new_name)).unwrap()),
        blake3::hash(&bytes)
    );
    // The VM's own disk: refused even with --force, its bytes untouched.
    let own = flat.replace("-flat.vmdk", ".vmdk");
    let r = restore(&own, &["--force"]).expect_code(1);
    r.stderr_mentions(&["is a disk of VM"]);
    assert_eq!(
        blake3::hash(&std::fs::read(&local).unwrap()),
        blake3::hash(&bytes)
    );
    assert!(!sim.log().contains("panic"), "{}", sim.log());
}
