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

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cbt::ChangeBitmap;
use super::disk::Disk;
use super::error::SimError;
use super::model::{
    Faults, Host, HostConfig, Network, Pbd, Pif, Pool, Ref, Sr, State, Vbd, Vdi, Vm,
};

/// The state file in the state folder.
pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

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
    /// Which blocks of each VDI image were ever written.
    disks: BTreeMap<&'a Ref, ChangeBitmap>,
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
    disks: BTreeMap<Ref, ChangeBitmap>,
    host: Ref,
    dom0: Ref,
    default_sr: Ref,
    nbd_network: Ref,
}

/// Writes the state durably to `dir/state.json`.
pub fn save(st: &State, dir: &Path, clean: bool) -> std::io::Result<()> {
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
        disks: st
            .vdis
            .iter()
            .filter_map(|(r, v)| v.data.as_ref().map(|d| (r, d.allocated())))
            .collect(),
        host: &st.host,
        dom0: &st.dom0,
        default_sr: &st.default_sr,
        nbd_network: &st.nbd_network,
    };
    let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
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
    if saved.format != FORMAT {
        return Err(invalid(format!(
            "state format {} is not {FORMAT}",
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
    for (r, v) in saved.vdis.iter_mut() {
        if let Some(allocated) = saved.disks.remove(r) {
            let image = config.data_dir.join(format!("{}.img", v.uuid));
            let disk = Disk::open(&image, v.virtual_size, allocated).map_err(|source| {
                SimError::Storage {
                    path: image.display().to_string(),
                    source,
                }
            })?;
            v.data = Some(Arc::new(disk));
        }
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
