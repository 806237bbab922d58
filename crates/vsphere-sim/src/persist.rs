//! `state.json` in the state folder: the VMs (disks, CBT epochs and
//! logs, allocation) and snapshots, so that a simulator restarted on the
//! same folder is the same host. Sessions, tasks and fault switches are
//! not kept (a restarted hostd forgets them too). Written to a temporary
//! name and renamed.

use std::path::Path;

use crate::error::SimError;
use crate::model::State;

pub const STATE_FILE: &str = "state.json";

pub fn save(st: &State, dir: &Path) -> Result<(), SimError> {
    let path = dir.join(STATE_FILE);
    let storage = |source| SimError::Storage {
        path: path.display().to_string(),
        source,
    };
    let json = serde_json::to_vec_pretty(st).map_err(|e| SimError::State {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, json).map_err(storage)?;
    std::fs::rename(&tmp, &path).map_err(storage)
}

/// The saved state, `None` when the folder has none.
pub fn load(dir: &Path) -> Result<Option<State>, SimError> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SimError::Storage {
                path: path.display().to_string(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| SimError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}
