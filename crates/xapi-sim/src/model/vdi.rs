//! VDIs and their CBT chain: create, snapshot, destroy, enable/disable CBT,
//! `list_changed_blocks`, `data_destroy`, `get_nbd_info`, `on_boot`, and the
//! data writes that mark CBT logs. Disk bytes themselves live in `Disk`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;

use super::records::*;
use super::*;
use crate::cbt::ChangeBitmap;
use crate::disk::Disk;
use xapi_wire::value::Value;
use xapi_wire::ApiError;

impl State {
    pub(super) fn disk_path(&self, uuid: &str) -> PathBuf {
        self.config.data_dir.join(format!("{uuid}.img"))
    }

    /// `VDI.create` (xenapi-reference.md §2.9).
    pub fn vdi_create(&mut self, new: NewVdi) -> Result<Ref, ApiError> {
        if new.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type("", "cbt_metadata"));
        }
        if !self.srs.contains_key(&new.sr) {
            return Err(ApiError::handle_invalid("SR", &new.sr));
        }
        self.check_sr_attached(&new.sr)?;
        if new.virtual_size > MAX_VDI_BYTES {
            return Err(ApiError::new(
                "VDI_TOO_LARGE",
                [String::new(), MAX_VDI_BYTES.to_string()],
            ));
        }
        self.check_sr_space(&new.sr, new.virtual_size)?;
        let uuid = new_uuid();
        let disk = Disk::create(&self.disk_path(&uuid), new.virtual_size)
            .map_err(ApiError::vdi_io_from)?;
        let r = new_ref();
        self.vdis.insert(
            r.clone(),
            Vdi {
                uuid,
                name_label: new.name_label,
                name_description: new.name_description,
                sr: new.sr,
                virtual_size: new.virtual_size,
                vdi_type: new.vdi_type,
                sharable: new.sharable,
                read_only: new.read_only,
                other_config: new.other_config,
                sm_config: new.sm_config,
                xenstore_data: new.xenstore_data,
                is_a_snapshot: false,
                snapshot_of: NULL_REF.into(),
                snapshot_time: None,
                tags: new.tags,
                on_boot: "persist".into(),
                cbt_enabled: false,
                log: None,
                suspend_of: None,
                data: Some(Arc::new(disk)),
            },
        );
        Ok(r)
    }

    /// The checks xapi makes for `enable_cbt`/`disable_cbt`, in its order
    /// (§2.3: SM feature, cbt_metadata, snapshot, type, on_boot).
    pub(super) fn check_cbt_toggle(&self, r: &str) -> Result<(), ApiError> {
        let v = self.vdi(r)?;
        let sr_capable = self.srs.get(&v.sr).map(|s| s.cbt_capable).unwrap_or(false);
        if !sr_capable {
            return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [v.sr.as_str()]));
        }
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        if v.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(format!(
                "VDI is a snapshot: {r}"
            )));
        }
        if v.vdi_type != "user" && v.vdi_type != "system" {
            return Err(ApiError::incompatible_type(r, &v.vdi_type));
        }
        if v.on_boot == "reset" {
            return Err(ApiError::new(
                "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
                Vec::<String>::new(),
            ));
        }
        self.check_sr_attached(&v.sr)
    }

    /// `VDI.enable_cbt`: starts a new, empty log (a new backup set).
    pub fn enable_cbt(&mut self, r: &str) -> Result<(), ApiError> {
        self.check_cbt_toggle(r)?;
        if self.faults.cbt_unlicensed {
            return Err(ApiError::new("LICENCE_RESTRICTION", ["CBT"]));
        }
        // SM refuses CBT on RAW (non-VHD) VDIs (xenapi-reference.md §2.3,
        // `configure_blocktracking`). Assumption: the simulator marks a RAW
        // VDI with sm_config `type` = `raw`, as LVHD SRs record `vdi_type`.
        if self.vdi(r)?.sm_config.get("type").map(String::as_str) == Some("raw") {
            return Err(ApiError::new(
                "SR_BACKEND_FAILURE_66",
                [
                    "",
                    "Invalid VDI type [opterr=Raw VDI or snapshot not permitted]",
                    "",
                ],
            ));
        }
        let v = self.vdi_mut(r)?;
        if !v.cbt_enabled {
            v.cbt_enabled = true;
            v.log = Some(CbtLog {
                bits: ChangeBitmap::new(v.virtual_size),
                parent: None,
                child: None,
            });
        }
        Ok(())
    }

    /// `VDI.disable_cbt`: drops the leaf's log and the parent's pointer to
    /// it, so the chain to older snapshots is broken for good.
    pub fn disable_cbt(&mut self, r: &str) -> Result<(), ApiError> {
        self.check_cbt_toggle(r)?;
        self.drop_leaf_log(r);
        Ok(())
    }

    pub(super) fn drop_leaf_log(&mut self, r: &str) {
        let Some(v) = self.vdis.get_mut(r) else {
            return;
        };
        if !v.cbt_enabled && v.log.is_none() {
            return;
        }
        v.cbt_enabled = false;
        let parent = v.log.take().and_then(|l| l.parent);
        if let Some(p) = parent {
            if let Some(log) = self.vdis.get_mut(&p).and_then(|pv| pv.log.as_mut()) {
                if log.child.as_deref() == Some(r) {
                    log.child = None;
                }
            }
        }
    }

    /// CBT turned off by the system (SM `_disable_cbt_on_error`, §5 rule 4):
    /// like `disable_cbt` but without the API checks.
    pub fn system_disable_cbt(&mut self, r: &str) -> Result<(), ApiError> {
        self.vdi(r)?;
        self.drop_leaf_log(r);
        Ok(())
    }

    /// `VDI.snapshot`: a read-only copy; for a CBT leaf the current log moves
    /// to the snapshot and the leaf starts an empty one after it.
    pub fn vdi_snapshot(&mut self, r: &str) -> Result<Ref, ApiError> {
        let v = self.vdi(r)?.clone();
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        if v.sharable {
            return Err(ApiError::new("VDI_IS_SHARABLE", [r]));
        }
        if v.on_boot == "reset" {
            return Err(ApiError::new(
                "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
                Vec::<String>::new(),
            ));
        }
        self.check_sr_attached(&v.sr)?;
        let source = v
            .data
            .clone()
            .ok_or_else(|| ApiError::incompatible_type(r, "cbt_metadata"))?;
        self.check_sr_space(&v.sr, v.virtual_size)?;
        let uuid = new_uuid();
        // Copy-on-write: the source goes on in a new file of its own.
        let copy = source
            .snapshot(
                &self.disk_path(&format!("{}.{}", v.uuid, new_uuid())),
                &self.disk_path(&uuid),
            )
            .map_err(ApiError::vdi_io_from)?;
        let s = new_ref();
        let chain = v.cbt_enabled && !v.is_a_snapshot;
        let snap = Vdi {
            uuid,
            name_label: v.name_label.clone(),
            name_description: v.name_description.clone(),
            sr: v.sr.clone(),
            virtual_size: v.virtual_size,
            vdi_type: v.vdi_type.clone(),
            sharable: false,
            read_only: v.read_only,
            other_config: v.other_config.clone(),
            sm_config: BTreeMap::new(),
            xenstore_data: BTreeMap::new(),
            is_a_snapshot: true,
            snapshot_of: r.to_string(),
            snapshot_time: Some(Utc::now()),
            tags: v.tags.clone(),
            on_boot: v.on_boot.clone(),
            cbt_enabled: chain,
            log: None,
            suspend_of: None,
            data: Some(Arc::new(copy)),
        };
        self.vdis.insert(s.clone(), snap);
        if chain {
            // SM `_cbt_snapshot`: the leaf's log becomes the snapshot's.
            let leaf = self.vdi_mut(r)?;
            let size = leaf.virtual_size;
            let moved = leaf.log.replace(CbtLog {
                bits: ChangeBitmap::new(size),
                parent: Some(s.clone()),
                child: None,
            });
            let mut moved = moved.unwrap_or(CbtLog {
                bits: ChangeBitmap::new(size),
                parent: None,
                child: None,
            });
            moved.child = Some(r.to_string());
            if let Some(p) = moved.parent.clone() {
                if let Some(log) = self.vdis.get_mut(&p).and_then(|pv| pv.log.as_mut()) {
                    log.child = Some(s.clone());
                }
            }
            self.vdi_mut(&s)?.log = Some(moved);
        }
        Ok(s)
    }

    /// A VBD (attached or reserved) that blocks `list_changed_blocks` on
    /// `vdi_to`: any attached VBD unless it belongs to a snapshot VM.
    pub(super) fn attached_outside_snapshots(&self, vdi: &str) -> bool {
        self.vbds.values().any(|b| {
            b.vdi == vdi
                && b.currently_attached
                && !self
                    .vms
                    .get(&b.vm)
                    .map(|vm| vm.is_a_snapshot)
                    .unwrap_or(false)
        })
    }

    /// `VDI.list_changed_blocks(vdi_from, vdi_to)` (§2.5).
    pub fn list_changed_blocks(&self, from: &str, to: &str) -> Result<String, ApiError> {
        let to_vdi = self.vdi(to)?;
        self.vdi(from)?;
        if self.attached_outside_snapshots(to) {
            return Err(ApiError::in_use(to, "list_changed_blocks"));
        }
        self.check_sr_attached(&to_vdi.sr)?;
        if from == to {
            return Err(ApiError::cbt_changed_blocks(
                "Source and target VDI are same",
            ));
        }
        let unrelated = || ApiError::cbt_changed_blocks("Source and target VDI are unrelated");
        let mut acc = ChangeBitmap::new(to_vdi.virtual_size);
        let mut cursor = self
            .vdi(from)?
            .log
            .as_ref()
            .ok_or_else(unrelated)?
            .child
            .clone();
        // A chain can't be longer than the number of VDIs; the bound only
        // guards against a cycle from a bug.
        for _ in 0..=self.vdis.len() {
            let Some(c) = cursor else {
                break;
            };
            let Some(log) = self.vdis.get(&c).and_then(|v| v.log.as_ref()) else {
                break;
            };
            acc.or_assign(&log.bits);
            if c == to {
                return Ok(acc.to_base64());
            }
            cursor = log.child.clone();
        }
        Err(unrelated())
    }

    /// `VDI.data_destroy` checks before the wait for VBDs (§2.7). `Ok(true)`:
    /// already `cbt_metadata`, nothing to do.
    pub fn data_destroy_precheck(&self, r: &str) -> Result<bool, ApiError> {
        let v = self.vdi(r)?;
        if !v.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(format!(
                "VDI is not a snapshot: {r}"
            )));
        }
        if !v.cbt_enabled {
            return Err(ApiError::new("VDI_NO_CBT_METADATA", [r]));
        }
        if v.vdi_type == "cbt_metadata" {
            return Ok(true);
        }
        self.check_sr_attached(&v.sr)?;
        Ok(false)
    }

    /// Whether any VBD of the VDI still exists (data_destroy waits for them
    /// to be unplugged *and* destroyed).
    pub fn has_vbds(&self, r: &str) -> bool {
        self.vbds.values().any(|b| b.vdi == r)
    }

    /// The data part of `data_destroy`, once no VBD is left.
    pub fn data_destroy_finish(&mut self, r: &str) -> Result<(), ApiError> {
        if self.has_vbds(r) {
            return Err(ApiError::in_use(r, "data_destroy"));
        }
        let v = self.vdi_mut(r)?;
        if v.vdi_type == "cbt_metadata" {
            return Ok(());
        }
        v.vdi_type = "cbt_metadata".into();
        v.other_config
            .insert("content_id".into(), NO_CONTENT_ID.into());
        if let Some(d) = v.data.take() {
            d.remove();
        }
        Ok(())
    }

    /// `VDI.destroy` (§2.8): refused while attached; CBT bits move to the child.
    pub fn vdi_destroy(&mut self, r: &str) -> Result<(), ApiError> {
        self.vdi(r)?;
        if self
            .vbds
            .values()
            .any(|b| b.vdi == r && b.currently_attached)
        {
            return Err(ApiError::in_use(r, "destroy"));
        }
        let vbds = self.vbds_of_vdi(r);
        for b in vbds {
            self.vbds.remove(&b);
        }
        let v = self
            .vdis
            .remove(r)
            .ok_or_else(|| ApiError::handle_invalid("VDI", r))?;
        if let Some(log) = v.log {
            if let Some(c) = &log.child {
                if let Some(clog) = self.vdis.get_mut(c).and_then(|cv| cv.log.as_mut()) {
                    clog.bits.or_assign(&log.bits);
                    clog.parent = log.parent.clone();
                }
            }
            if let Some(p) = &log.parent {
                if let Some(plog) = self.vdis.get_mut(p).and_then(|pv| pv.log.as_mut()) {
                    plog.child = log.child.clone();
                }
            }
        }
        if let Some(d) = v.data {
            d.remove();
        }
        Ok(())
    }

    /// `VDI.get_nbd_info` (§2.6) for the caller's session.
    pub fn get_nbd_info(&self, session: &str, r: &str) -> Result<Value, ApiError> {
        let v = self.vdi(r)?;
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        let mut out = Vec::new();
        for pbd in self
            .sr_pbds(&v.sr)
            .into_iter()
            .filter(|p| p.currently_attached)
        {
            let Some(host) = self.hosts.get(&pbd.host) else {
                continue;
            };
            for pif in self
                .pifs
                .values()
                .filter(|p| p.host == pbd.host && p.currently_attached)
            {
                let nbd = self
                    .networks
                    .get(&pif.network)
                    .map(|n| n.purpose.iter().any(|p| p == "nbd" || p == "insecure_nbd"))
                    .unwrap_or(false);
                if !nbd {
                    continue;
                }
                let addresses = std::iter::once(pif.ip.clone())
                    .filter(|ip| !ip.is_empty())
                    .chain(pif.ipv6.iter().filter(|ip| !ip.is_empty()).cloned());
                for address in addresses {
                    out.push(Value::Struct(rec([
                        (
                            "exportname",
                            Value::String(format!("/{}?session_id={session}", v.uuid)),
                        ),
                        ("address", Value::String(address)),
                        ("port", Value::Int(self.nbd_port_of(&pbd.host) as i64)),
                        ("cert", Value::str(&host.certificate_pem)),
                        // The first strict DNS name of the host's certificate:
                        // its hostname, in the simulator's certificates.
                        ("subject", Value::str(&host.hostname)),
                    ])));
                }
            }
        }
        Ok(Value::Array(out))
    }

    pub fn set_on_boot(&mut self, r: &str, value: &str) -> Result<(), ApiError> {
        let v = self.vdi(r)?;
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        if v.cbt_enabled {
            return Err(ApiError::new("VDI_CBT_ENABLED", [r]));
        }
        if value != "reset" && value != "persist" {
            return Err(ApiError::new("INVALID_VALUE", ["on_boot", value]));
        }
        self.vdi_mut(r)?.on_boot = value.to_string();
        Ok(())
    }

    /// The disk behind VDI `r` for a write of `len` bytes at `offset`: a
    /// `cbt_metadata` VDI has none, and a write past the end fails as a
    /// block device would. The caller writes without holding the state.
    pub fn disk_for_write(
        &self,
        r: &str,
        offset: u64,
        len: u64,
    ) -> Result<std::sync::Arc<Disk>, ApiError> {
        let v = self.vdi(r)?;
        let disk = v
            .data
            .clone()
            .ok_or_else(|| ApiError::incompatible_type(r, "cbt_metadata"))?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > v.virtual_size)
        {
            return Err(ApiError::vdi_io());
        }
        Ok(disk)
    }

    /// A write by the guest (or an import): data, then the CBT bit of every
    /// 64 KiB block touched on the leaf's current log.
    pub fn write_vdi(&mut self, r: &str, offset: u64, data: &[u8]) -> Result<(), ApiError> {
        let disk = self.disk_for_write(r, offset, data.len() as u64)?;
        self.check_write_space(r, offset, data)?;
        disk.write(offset, data).map_err(ApiError::vdi_io_from)?;
        self.mark_written(r, offset, data.len() as u64);
        Ok(())
    }

    /// Sets CBT bits for a range already written to the disk.
    pub fn mark_written(&mut self, r: &str, offset: u64, len: u64) {
        if let Some(v) = self.vdis.get_mut(r) {
            if v.cbt_enabled && !v.is_a_snapshot {
                if let Some(log) = v.log.as_mut() {
                    log.bits.mark_range(offset, len);
                }
            }
        }
    }

    // ---- VBD and VM ----------------------------------------------------
}
