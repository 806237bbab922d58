//! SRs beyond the one the host boots with (made on demand by the hooks),
//! and every SR's capacity: `physical_size`, `physical_utilisation`, and
//! the `SR_FULL` refusal of what would not fit.
//!
//! Assumption: the reference only lists `SR_FULL` among `VM.snapshot`'s
//! errors (§2.4); its parameters are datamodel_errors.ml's `[requested;
//! maximum]`, here in bytes as decimal strings (a real SM host may answer
//! `SR_BACKEND_FAILURE_44` "There is insufficient space" instead). The
//! capacity model is the simulator's own:
//! - `physical_utilisation` is the data written: the 64 KiB blocks held by
//!   the data layers of the SR's VDIs (a layer shared by snapshots once),
//!   times 64 KiB.
//! - An operation is refused with `SR_FULL [physical_utilisation + what it
//!   asks; physical_size]`, changing nothing, when that exceeds
//!   `physical_size`. What it asks: a new VDI's `virtual_size`
//!   (`VDI.create`, `snapshot`, `clone`, `copy`, each disk of
//!   `VM.snapshot`, together), a resize's growth, and for a write (an
//!   import, a copy into an existing VDI, a guest write) the blocks it
//!   newly allocates times 64 KiB.

use super::*;
use crate::cbt::CBT_BLOCK_BYTES;
use xapi_wire::ApiError;

/// `physical_size` of an SR with no size set in `Faults::sr_physical_size`.
pub const DEFAULT_SR_PHYSICAL_SIZE: u64 = MAX_VDI_BYTES * 4;

/// SR types [`State::sr_create`] makes, and whether their SM driver has
/// `VDI_CONFIG_CBT` (sm `CAPABILITIES`: not ISO and raw HBA SRs).
const SR_TYPES: [(&str, bool); 8] = [
    ("ext", true),
    ("nfs", true),
    ("lvm", true),
    ("lvmoiscsi", true),
    ("lvmohba", true),
    ("smb", true),
    ("iso", false),
    ("rawhba", false),
];

/// The SR record's `content_type`: `iso` for ISO libraries.
pub(super) fn content_type(sr_type: &str) -> &'static str {
    if sr_type == "iso" {
        "iso"
    } else {
        "user"
    }
}

/// Whether the SM driver of an SR type has `VDI_RESIZE` (ISO and raw HBA
/// SRs do not; sm `CAPABILITIES`).
pub(super) fn can_resize(sr_type: &str) -> bool {
    !matches!(sr_type, "iso" | "rawhba" | "udev")
}

/// Whether the SM driver of an SR type has `VDI_CLONE`.
pub(super) fn can_clone(sr_type: &str) -> bool {
    can_resize(sr_type)
}

impl State {
    /// A new SR of `sr_type` (`ext`, `nfs`, `lvm`, `lvmoiscsi`, `lvmohba`,
    /// `smb`, `iso`, `rawhba`) with a plugged PBD on the first host, or on
    /// every host for the shared types (`nfs`, `smb`, `lvmoiscsi`,
    /// `lvmohba`).
    pub fn sr_create(&mut self, name_label: &str, sr_type: &str) -> Result<Ref, ApiError> {
        let Some(&(_, cbt_capable)) = SR_TYPES.iter().find(|(t, _)| *t == sr_type) else {
            return Err(ApiError::new("INVALID_VALUE", ["type", sr_type]));
        };
        // Network storage is shared by the pool (a PBD on every host);
        // local disks belong to the first host.
        let shared = matches!(sr_type, "nfs" | "smb" | "lvmoiscsi" | "lvmohba");
        let sr = new_ref();
        self.srs.insert(
            sr.clone(),
            Sr {
                uuid: new_uuid(),
                name_label: name_label.to_string(),
                name_description: format!("simulated {sr_type} SR"),
                sr_type: sr_type.to_string(),
                cbt_capable,
                shared,
            },
        );
        let hosts: Vec<Ref> = if shared {
            self.hosts.keys().cloned().collect()
        } else {
            vec![self.host.clone()]
        };
        for host in hosts {
            self.pbds.insert(
                new_ref(),
                Pbd {
                    uuid: new_uuid(),
                    host,
                    sr: sr.clone(),
                    currently_attached: true,
                },
            );
        }
        Ok(sr)
    }

    /// The first SR of `sr_type`, made (named `name_label`) if there is none.
    pub fn sr_of_type(&mut self, name_label: &str, sr_type: &str) -> Result<Ref, ApiError> {
        match self.srs.iter().find(|(_, s)| s.sr_type == sr_type) {
            Some((r, _)) => Ok(r.clone()),
            None => self.sr_create(name_label, sr_type),
        }
    }

    pub fn sr_physical_size(&self, sr: &str) -> u64 {
        self.faults
            .sr_physical_size
            .get(sr)
            .copied()
            .unwrap_or(DEFAULT_SR_PHYSICAL_SIZE)
    }

    /// The data written on the SR (see the module docs).
    pub fn sr_physical_utilisation(&self, sr: &str) -> u64 {
        let mut shared = std::collections::BTreeSet::new();
        let mut blocks = 0u64;
        for d in self
            .vdis
            .values()
            .filter(|v| v.sr == sr)
            .filter_map(|v| v.data.as_ref())
        {
            let layout = d.layout();
            blocks += layout.top_written.count();
            for l in &layout.shared {
                if shared.insert(l.path().to_path_buf()) {
                    blocks += l.written().count();
                }
            }
        }
        blocks * CBT_BLOCK_BYTES
    }

    /// `SR_FULL [requested; maximum]` unless `added` more bytes fit.
    pub(super) fn check_sr_space(&self, sr: &str, added: u64) -> Result<(), ApiError> {
        if added == 0 {
            return Ok(());
        }
        let maximum = self.sr_physical_size(sr);
        let requested = self.sr_physical_utilisation(sr).saturating_add(added);
        if requested > maximum {
            return Err(ApiError::new(
                "SR_FULL",
                [requested.to_string(), maximum.to_string()],
            ));
        }
        Ok(())
    }

    /// The space check of a write of `data` at `offset` into VDI `r`:
    /// the blocks it newly allocates must fit.
    pub fn check_write_space(&self, r: &str, offset: u64, data: &[u8]) -> Result<(), ApiError> {
        let v = self.vdi(r)?;
        // Only an SR given a size can fill up (the default one is larger
        // than any test writes); this spares big imports the count.
        if !self.faults.sr_physical_size.contains_key(&v.sr) {
            return Ok(());
        }
        let Some(disk) = &v.data else {
            return Ok(());
        };
        let added = disk.blocks_to_allocate(offset, data) * CBT_BLOCK_BYTES;
        self.check_sr_space(&v.sr, added)
    }
}
