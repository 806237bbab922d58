//! Keeping a simulated host across restarts (`cbtvault sim --dir D`): the
//! objects go to `D/state.json` (written to a temporary name, fsynced,
//! renamed) after every call that changes them, marked `clean: false`, and
//! once more with `clean: true` at a clean stop. Sessions, tasks and dom0
//! attachments are not kept (a restarted xapi has none either).
//!
//! A state left `clean: false` means the host went down hard: as SM does
//! for a log it finds inconsistent at attach (xenapi-reference.md §5 rule
//! 4), CBT is then disabled on every live VDI that had it, so clients see
//! the broken chain a real crash leaves.
//!
//! VDI data stays in its files under `D/vdis`; the state names them. Each
//! disk is a chain of layers (see `disk`): `disks` gives, per VDI, its
//! shared layers bottom to top and its own top file with the blocks written
//! in it; `layers` gives the blocks written in each shared layer, once
//! however many disks use it. Files are named relative to `D/vdis`. Format
//! 1 (one `<uuid>.img` per VDI, `disks` holding its bitmap) still loads.
//! A disk that grew (`VDI.resize`) has shared layers smaller than itself:
//! `layer_sizes` gives each shared layer's size (absent: the disk's size,
//! as every state written before resizing existed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cbt::ChangeBitmap;
use super::disk::{Disk, Layer};
use super::error::SimError;
use super::model::{
    Faults, Host, HostConfig, Network, Pbd, Pif, Pool, Ref, Sr, State, Vbd, Vdi, Vm,
};

/// The state file in the state folder.
pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 2;
/// One image per VDI, `disks` holding each one's bitmap.
const FORMAT_SINGLE_FILE: u32 = 1;

/// A disk's chain of layers.
#[derive(Serialize, Deserialize)]
struct SavedDisk {
    /// Read-only layers, bottom to top: file names, keys of `layers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    shared: Vec<String>,
    /// The disk's own top layer: its file name and the blocks written in it.
    file: String,
    written: ChangeBitmap,
}

#[derive(Serialize)]
struct SavedRef<'a> {
    format: u32,
    clean: bool,
    pools: &'a BTreeMap<Ref, Pool>,
    hosts: &'a BTreeMap<Ref, Host>,
    srs: &'a BTreeMap<Ref, Sr>,
    pbds: &'a BTreeMap<Ref, Pbd>,
    networks: &'a BTreeMap<Ref, Network>,
    pifs: &'a BTreeMap<Ref, Pif>,
    vms: &'a BTreeMap<Ref, Vm>,
    vbds: BTreeMap<&'a Ref, &'a Vbd>,
    vdis: &'a BTreeMap<Ref, Vdi>,
    /// Each VDI's layers.
    disks: BTreeMap<&'a Ref, SavedDisk>,
    /// The blocks written in each shared layer.
    layers: BTreeMap<String, ChangeBitmap>,
    /// The size of each shared layer.
    layer_sizes: BTreeMap<String, u64>,
    host: &'a Ref,
    dom0: &'a Ref,
    default_sr: &'a Ref,
    nbd_network: &'a Ref,
}

#[derive(Deserialize)]
struct Saved {
    format: u32,
    clean: bool,
    pools: BTreeMap<Ref, Pool>,
    hosts: BTreeMap<Ref, Host>,
    srs: BTreeMap<Ref, Sr>,
    pbds: BTreeMap<Ref, Pbd>,
    networks: BTreeMap<Ref, Network>,
    pifs: BTreeMap<Ref, Pif>,
    vms: BTreeMap<Ref, Vm>,
    vbds: BTreeMap<Ref, Vbd>,
    vdis: BTreeMap<Ref, Vdi>,
    /// [`SavedDisk`]s, or bitmaps in format 1.
    disks: BTreeMap<Ref, serde_json::Value>,
    #[serde(default)]
    layers: BTreeMap<String, ChangeBitmap>,
    #[serde(default)]
    layer_sizes: BTreeMap<String, u64>,
    host: Ref,
    dom0: Ref,
    default_sr: Ref,
    nbd_network: Ref,
}

/// The name of a file of the data folder.
fn file_name(path: &Path) -> std::io::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::other(format!("bad image name {}", path.display())))
}

/// Writes the state durably to `dir/state.json`.
pub fn save(st: &State, dir: &Path, clean: bool) -> std::io::Result<()> {
    write(dir, &encode(st, clean)?)
}

/// The bytes of `dir/state.json` for `st` (in memory; cheap next to
/// [`write`]).
pub fn encode(st: &State, clean: bool) -> std::io::Result<Vec<u8>> {
    let mut disks = BTreeMap::new();
    let mut layers = BTreeMap::new();
    let mut layer_sizes = BTreeMap::new();
    for (r, v) in &st.vdis {
        let Some(d) = &v.data else { continue };
        let layout = d.layout();
        let mut shared = Vec::with_capacity(layout.shared.len());
        for l in &layout.shared {
            let name = file_name(l.path())?;
            layers
                .entry(name.clone())
                .or_insert_with(|| l.written().clone());
            layer_sizes.insert(name.clone(), l.size_bytes());
            shared.push(name);
        }
        let saved = SavedDisk {
            shared,
            file: file_name(&layout.top)?,
            written: layout.top_written,
        };
        disks.insert(r, saved);
    }
    let saved = SavedRef {
        format: FORMAT,
        clean,
        pools: &st.pools,
        hosts: &st.hosts,
        srs: &st.srs,
        pbds: &st.pbds,
        networks: &st.networks,
        pifs: &st.pifs,
        vms: &st.vms,
        vbds: st.vbds.iter().filter(|(_, b)| b.vm != st.dom0).collect(),
        vdis: &st.vdis,
        disks,
        layers,
        layer_sizes,
        host: &st.host,
        dom0: &st.dom0,
        default_sr: &st.default_sr,
        nbd_network: &st.nbd_network,
    };
    serde_json::to_vec(&saved).map_err(std::io::Error::other)
}

/// Writes encoded state durably: a temporary file, fsynced, renamed.
pub fn write(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Encodes the state now (taking its lock), or `None` when it is gone.
pub type Encoder = Box<dyn Fn() -> Option<Vec<u8>> + Send>;

/// How long the saver lets changes gather before it encodes the state: a
/// backup makes a burst of calls, and one encoding serves them all.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// Saves the state in the background. A change only marks the state dirty
/// and returns; a thread waits [`GATHER`], encodes the state once under its
/// lock (not on the call's path, nor once per call) and writes it. Calls no
/// longer wait on encoding or fsync (xapi does not flush its database on
/// every call either); the file lags the state by at most one gathering
/// and one write, and a clean stop writes the final state.
pub struct Saver {
    dir: PathBuf,
    slot: std::sync::Arc<(std::sync::Mutex<SaverSlot>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct SaverSlot {
    dirty: bool,
    stop: bool,
}

impl Saver {
    /// A saver whose thread encodes the state with `encode`.
    pub fn start(dir: PathBuf, encode: Encoder) -> Saver {
        let slot = std::sync::Arc::new((
            std::sync::Mutex::new(SaverSlot::default()),
            std::sync::Condvar::new(),
        ));
        let shared = slot.clone();
        let to = dir.clone();
        let thread = std::thread::Builder::new()
            .name("sim-saver".into())
            .spawn(move || loop {
                {
                    let (m, cv) = &*shared;
                    let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
                    while !s.dirty && !s.stop {
                        s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
                    }
                    if s.stop {
                        // The final state is written by whoever stops us.
                        return;
                    }
                    let (s, _) = cv
                        .wait_timeout_while(s, GATHER, |s| !s.stop)
                        .unwrap_or_else(|e| e.into_inner());
                    let mut s = s;
                    if s.stop {
                        return;
                    }
                    s.dirty = false;
                }
                // A failed save is not a call's failure; the next may work.
                if let Some(bytes) = encode() {
                    let _ = write(&to, &bytes);
                }
            })
            .ok();
        Saver { dir, slot, thread }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Notes a change of `st` (whose lock the caller holds).
    pub fn changed(&self, st: &State) {
        if self.thread.is_none() {
            // No thread could be started: save on the call's path.
            if let Ok(bytes) = encode(st, false) {
                let _ = write(&self.dir, &bytes);
            }
            return;
        }
        let (m, cv) = &*self.slot;
        m.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
        cv.notify_one();
    }

    /// Stops the thread (the caller then saves the final state).
    pub fn finish(&mut self) {
        {
            let (m, cv) = &*self.slot;
            m.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Loads `dir/state.json` if there is one.
pub fn load(config: HostConfig, dir: &Path) -> Result<Option<State>, SimError> {
    let path = dir.join(STATE_FILE);
    let storage = |source: std::io::Error| SimError::Storage {
        path: path.display().to_string(),
        source,
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(storage(e)),
    };
    let invalid = |why: String| storage(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    let mut saved: Saved = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if saved.format != FORMAT && saved.format != FORMAT_SINGLE_FILE {
        return Err(invalid(format!(
            "state format {} is not {FORMAT} (or {FORMAT_SINGLE_FILE})",
            saved.format
        )));
    }
    // Host facts follow this run's configuration (port, address, certificate).
    for h in saved.hosts.values_mut() {
        h.address = config.nbd_address.clone();
        h.hostname = config.hostname.clone();
        h.certificate_pem = config.certificate_pem.clone();
    }
    for p in saved.pifs.values_mut() {
        p.ip = config.nbd_address.clone();
    }
    let mut opened = Opened::default();
    for (r, v) in saved.vdis.iter_mut() {
        let Some(disk) = saved.disks.remove(r) else {
            continue;
        };
        let disk = if saved.format == FORMAT_SINGLE_FILE {
            let allocated: ChangeBitmap =
                serde_json::from_value(disk).map_err(|e| invalid(format!("disk of {r}: {e}")))?;
            let image = config.data_dir.join(format!("{}.img", v.uuid));
            Disk::open(&image, v.virtual_size, allocated).map_err(|source| SimError::Storage {
                path: image.display().to_string(),
                source,
            })?
        } else {
            let disk: SavedDisk =
                serde_json::from_value(disk).map_err(|e| invalid(format!("disk of {r}: {e}")))?;
            let layers = (&saved.layers, &saved.layer_sizes);
            opened.disk(&config.data_dir, layers, disk, v.virtual_size)?
        };
        v.data = Some(Arc::new(disk));
    }
    let mut st = State {
        config,
        faults: Faults::default(),
        sessions: BTreeMap::new(),
        pools: saved.pools,
        hosts: saved.hosts,
        srs: saved.srs,
        pbds: saved.pbds,
        networks: saved.networks,
        pifs: saved.pifs,
        vms: saved.vms,
        vbds: saved.vbds,
        vdis: saved.vdis,
        tasks: BTreeMap::new(),
        host: saved.host,
        dom0: saved.dom0,
        default_sr: saved.default_sr,
        nbd_network: saved.nbd_network,
    };
    if !saved.clean {
        let leaves: Vec<Ref> = st
            .vdis
            .iter()
            .filter(|(_, v)| v.cbt_enabled && !v.is_a_snapshot)
            .map(|(r, _)| r.clone())
            .collect();
        for r in leaves {
            st.system_disable_cbt(&r)?;
        }
    }
    Ok(Some(st))
}

/// The layers opened so far while loading: each shared one opened once and
/// shared again, each file used either as one shared layer or as one top.
#[derive(Default)]
struct Opened {
    shared: BTreeMap<String, Arc<Layer>>,
    tops: BTreeSet<String>,
}

impl Opened {
    fn disk(
        &mut self,
        data_dir: &Path,
        (layers, layer_sizes): (&BTreeMap<String, ChangeBitmap>, &BTreeMap<String, u64>),
        saved: SavedDisk,
        size_bytes: u64,
    ) -> Result<Disk, SimError> {
        let failed = |name: &str, why: String| SimError::Storage {
            path: data_dir.join(name).display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
        };
        let mut shared = Vec::with_capacity(saved.shared.len());
        for name in &saved.shared {
            check_name(name).map_err(|why| failed(name, why))?;
            if self.tops.contains(name) || saved.file == *name {
                return Err(failed(name, "a shared layer is also a disk's own".into()));
            }
            if shared
                .iter()
                .any(|l: &Arc<Layer>| l.path().file_name() == Some(name.as_ref()))
            {
                return Err(failed(name, "a layer twice in one chain".into()));
            }
            if let Some(l) = self.shared.get(name) {
                shared.push(l.clone());
                continue;
            }
            let written = layers
                .get(name)
                .cloned()
                .ok_or_else(|| failed(name, "a shared layer missing from `layers`".into()))?;
            let path = data_dir.join(name);
            let layer_size = layer_sizes.get(name).copied().unwrap_or(size_bytes);
            let layer =
                Layer::open(&path, layer_size, written).map_err(|source| SimError::Storage {
                    path: path.display().to_string(),
                    source,
                })?;
            let layer = Arc::new(layer);
            self.shared.insert(name.clone(), layer.clone());
            shared.push(layer);
        }
        let name = &saved.file;
        check_name(name).map_err(|why| failed(name, why))?;
        if self.shared.contains_key(name) || !self.tops.insert(name.clone()) {
            return Err(failed(name, "a disk's own file is used twice".into()));
        }
        let path = data_dir.join(name);
        Disk::open_layered(shared, &path, size_bytes, saved.written).map_err(|source| {
            SimError::Storage {
                path: path.display().to_string(),
                source,
            }
        })
    }
}

/// A file name of the data folder, nothing else.
fn check_name(name: &str) -> Result<(), String> {
    let plain = Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name);
    if plain && name != "." && name != ".." {
        Ok(())
    } else {
        Err(format!("{name:?} is not a file name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NewVdi;

    const MIB: u64 = 1 << 20;

    fn config(dir: &Path) -> HostConfig {
        HostConfig {
            username: "root".into(),
            password: "pw".into(),
            hostname: "localhost".into(),
            nbd_address: "127.0.0.1".into(),
            nbd_port: 10809,
            certificate_pem: String::new(),
            data_dir: dir.join("vdis"),
            data_destroy_wait_ms: 0,
        }
    }

    fn start(dir: &Path) -> State {
        std::fs::create_dir_all(dir.join("vdis")).unwrap();
        State::new(config(dir))
    }

    fn create(st: &mut State, size: u64) -> Ref {
        let sr = st.default_sr.clone();
        st.vdi_create(NewVdi::user("disk", sr, size)).unwrap()
    }

    fn content(st: &State) -> BTreeMap<Ref, Vec<u8>> {
        st.vdis
            .iter()
            .filter_map(|(r, v)| {
                let d = v.data.as_ref()?;
                Some((r.clone(), d.read(0, d.size_bytes() as usize).unwrap()))
            })
            .collect()
    }

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("vdis")).unwrap().count()
    }

    #[test]
    fn layered_disks_survive_a_restart_and_share_their_layers_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = start(dir.path());
        let leaf = create(&mut st, 4 * MIB);
        let other = create(&mut st, MIB);
        st.write_vdi(&leaf, 0, &[7u8; 300_000]).unwrap();
        st.write_vdi(&other, 5, b"alone").unwrap();
        let s1 = st.vdi_snapshot(&leaf).unwrap();
        st.write_vdi(&leaf, 70_000, b"after the first").unwrap();
        let s2 = st.vdi_snapshot(&leaf).unwrap();
        st.write_vdi(&leaf, 2 * MIB, b"after the second").unwrap();
        st.write_vdi(&s1, 3 * MIB, b"on the snapshot").unwrap();
        let s3 = st.vdi_snapshot(&s1).unwrap();
        let before = content(&st);
        let text = |st: &State| {
            save(st, dir.path(), true).unwrap();
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap())
                    .unwrap();
            (v["disks"].clone(), v["layers"].clone())
        };
        let original = text(&st);
        drop(st);

        let mut st = load(config(dir.path()), dir.path()).unwrap().unwrap();
        assert_eq!(content(&st), before);
        let shared = |r: &str| st.vdis[r].data.as_ref().unwrap().layout().shared;
        let (l, a, b, c) = (shared(&leaf), shared(&s1), shared(&s2), shared(&s3));
        assert_eq!((l.len(), a.len(), b.len(), c.len()), (2, 2, 2, 2));
        assert!(Arc::ptr_eq(&l[0], &a[0]) && Arc::ptr_eq(&l[0], &c[0]));
        assert!(Arc::ptr_eq(&l[1], &b[1]));
        assert!(Arc::ptr_eq(&a[1], &c[1]) && !Arc::ptr_eq(&a[1], &l[1]));
        assert!(shared(&other).is_empty());
        // Saved again as it was loaded.
        let saved = text(&st);
        assert_eq!(saved, original);
        assert_eq!(saved.1.as_object().unwrap().len(), 3);

        // The files go with the last disk that uses them, as before.
        let files_before = files(dir.path());
        st.vdi_destroy(&s2).unwrap();
        assert_eq!(files(dir.path()), files_before - 1);
        st.vdi_destroy(&leaf).unwrap();
        assert_eq!(files(dir.path()), files_before - 3);
        assert_eq!(
            content(&st)[&s3],
            before[&s3],
            "the snapshot of the snapshot keeps its layers"
        );
        st.vdi_destroy(&s1).unwrap();
        st.vdi_destroy(&s3).unwrap();
        st.vdi_destroy(&other).unwrap();
        assert_eq!(files(dir.path()), 0);
        assert_eq!(text(&st).1.as_object().map(|l| l.len()), Some(0));
    }

    /// A state file whose disks and layers do not fit together is refused
    /// with the reason, naming the file concerned.
    #[test]
    fn inconsistent_layer_records_are_clear_errors() {
        type Edit = fn(&mut serde_json::Value, &str, &str, &str);
        let cases: [(&str, Edit); 4] = [
            ("also a disk's own", |v, leaf, _, layer| {
                v["disks"][leaf]["file"] = layer.into();
            }),
            ("twice in one chain", |v, leaf, _, layer| {
                v["disks"][leaf]["shared"] = serde_json::json!([layer, layer]);
            }),
            ("missing from `layers`", |v, _, _, layer| {
                v["layers"].as_object_mut().unwrap().remove(layer);
            }),
            ("own file is used twice", |v, leaf, other, _| {
                v["disks"][other]["file"] = v["disks"][leaf]["file"].clone();
            }),
        ];
        for (why, edit) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut st = start(dir.path());
            let leaf = create(&mut st, MIB);
            let other = create(&mut st, MIB);
            st.write_vdi(&leaf, 0, b"data").unwrap();
            st.vdi_snapshot(&leaf).unwrap();
            save(&st, dir.path(), true).unwrap();
            let layout = st.vdis[&leaf].data.as_ref().unwrap().layout();
            let layer = layout.shared[0].path().file_name().unwrap();
            let layer = layer.to_str().unwrap().to_string();
            drop(st);
            let state = dir.path().join(STATE_FILE);
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
            edit(&mut v, &leaf, &other, &layer);
            std::fs::write(&state, serde_json::to_vec(&v).unwrap()).unwrap();
            match load(config(dir.path()), dir.path()) {
                Err(e @ SimError::Storage { .. }) => {
                    assert!(e.to_string().contains(why), "{why}: {e}")
                }
                other => panic!("{why}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn a_missing_layer_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = start(dir.path());
        let leaf = create(&mut st, MIB);
        st.write_vdi(&leaf, 0, b"data").unwrap();
        let snap = st.vdi_snapshot(&leaf).unwrap();
        save(&st, dir.path(), true).unwrap();
        let layer = st.vdis[&snap].data.as_ref().unwrap().layout().shared[0]
            .path()
            .to_path_buf();
        drop(st);
        std::fs::remove_file(&layer).unwrap();
        match load(config(dir.path()), dir.path()) {
            Err(SimError::Storage { path, source }) => {
                assert_eq!(path, layer.display().to_string());
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // A name that leaves the data folder is refused.
        let state = dir.path().join(STATE_FILE);
        let text = std::fs::read_to_string(&state).unwrap();
        let name = layer.file_name().unwrap().to_str().unwrap();
        std::fs::write(&state, text.replace(name, "../state.json")).unwrap();
        let e = load(config(dir.path()), dir.path()).err().unwrap();
        assert!(e.to_string().contains("not a file name"), "{e}");
    }

    #[test]
    fn a_state_of_format_1_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = start(dir.path());
        let leaf = create(&mut st, MIB);
        st.write_vdi(&leaf, 65_530, b"format one").unwrap();
        let before = content(&st);
        save(&st, dir.path(), true).unwrap();
        drop(st);
        let state = dir.path().join(STATE_FILE);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        v["format"] = 1.into();
        let written = v["disks"][&leaf]["written"].clone();
        v["disks"][&leaf] = written;
        v.as_object_mut().unwrap().remove("layers");
        std::fs::write(&state, serde_json::to_vec(&v).unwrap()).unwrap();
        let st = load(config(dir.path()), dir.path()).unwrap().unwrap();
        assert_eq!(content(&st), before);
        assert!(st.vdis[&leaf].data.as_ref().unwrap().is_allocated(1));
    }
}
