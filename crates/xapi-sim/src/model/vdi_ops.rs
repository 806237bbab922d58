//! The VDI calls that grow a VDI or make one from another: `VDI.resize`
//! (and `resize_online`), `VDI.clone`, `VDI.copy` and `VDI.pool_migrate`,
//! with xapi_vdi.ml's `check_operation_error` checks in its order (an
//! attached VDI, the SM feature, `cbt_metadata`), then the implementation's.
//! The CBT chain stays `vdi`'s business: a resize grows the leaf's log, a
//! clone or copy starts none (`cbt_enabled=false`, xenapi-reference.md
//! §2.4), a migration needs CBT off (§5 rule 5).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::cbt::{ChangeBitmap, CBT_BLOCK_BYTES};
use crate::disk::Disk;
use xapi_wire::ApiError;

/// SM's `VDISize` fault (79) as xapi reports it.
fn vdi_size_error(detail: &str) -> ApiError {
    ApiError::new(
        "SR_BACKEND_FAILURE_79",
        ["", &format!("VDI Invalid size [opterr={detail}]"), ""],
    )
}

impl State {
    /// Any VBD of the VDI currently attached (dom0's included): what
    /// blocks an operation that cannot run live (`my_active_vbd_records`).
    fn vdi_attached(&self, r: &str) -> bool {
        self.vbds
            .values()
            .any(|b| b.vdi == r && b.currently_attached)
    }

    /// `VDI.resize` (`online` false) and `VDI.resize_online`.
    ///
    /// Checks (xapi_vdi.ml): no plugged PBD → `SR_HAS_NO_PBDS [sr]`
    /// (resize only); attached → `VDI_IN_USE [vdi; "resize"]` (resize
    /// only: resize_online may run live); the SM feature (`VDI_RESIZE`;
    /// no SM driver has `VDI_RESIZE_ONLINE`, so resize_online answers
    /// `SR_OPERATION_NOT_SUPPORTED [sr]`); `cbt_metadata` →
    /// `VDI_INCOMPATIBLE_TYPE`. Then SM FileSR.resize: smaller →
    /// `SR_BACKEND_FAILURE_79` "shrinking not allowed", the same size → no
    /// change, beyond 2040 GiB → `SR_BACKEND_FAILURE_79` "VDI size must be
    /// between 1 MB and 2088960 MB". The leaf's CBT log grows with the
    /// disk (SM `resize_cbt`); snapshots keep their size.
    pub fn vdi_resize(&mut self, r: &str, size: i64, online: bool) -> Result<(), ApiError> {
        let v = self.vdi(r)?;
        let sr = v.sr.clone();
        let sr_type = self
            .srs
            .get(&sr)
            .map(|s| s.sr_type.clone())
            .unwrap_or_default();
        if !online && !self.sr_pbds(&sr).iter().any(|p| p.currently_attached) {
            return Err(ApiError::new("SR_HAS_NO_PBDS", [sr.as_str()]));
        }
        if !online && self.vdi_attached(r) {
            return Err(ApiError::in_use(r, "resize"));
        }
        // Assumption: the simulated SRs have the capabilities of their SM
        // drivers (sm @ 471cf7ed: none offers VDI_RESIZE_ONLINE), although
        // xen-api @ e2ee48d6 publishes VDI.resize_online again.
        if online || !super::sr::can_resize(&sr_type) {
            return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [sr.as_str()]));
        }
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        self.check_sr_attached(&sr)?;
        let current = v.virtual_size;
        let size = u64::try_from(size).unwrap_or(0);
        if size < current {
            return Err(vdi_size_error("shrinking not allowed"));
        }
        if size == current {
            return Ok(());
        }
        if size > MAX_VDI_BYTES {
            return Err(vdi_size_error(&format!(
                "VDI size must be between 1 MB and {} MB",
                MAX_VDI_BYTES >> 20
            )));
        }
        // Assumption: no rounding up to 2 MiB (vhdutil rounds), as the
        // simulator's VDI.create does not round either. A size that is not
        // whole 512-byte sectors cannot be read to its end over NBD
        // (xapi-nbd wants sector-aligned reads); a real SR never has one.
        self.check_sr_space(&sr, size - current)?;
        let disk = v
            .data
            .clone()
            .ok_or_else(|| ApiError::incompatible_type(r, "cbt_metadata"))?;
        disk.resize(size).map_err(ApiError::vdi_io_from)?;
        let v = self.vdi_mut(r)?;
        v.virtual_size = size;
        if let Some(log) = v.log.as_mut() {
            // The log grows with zeros: list_changed_blocks across the
            // resize follows the larger size (§2.5 "Size growth").
            let mut bits = ChangeBitmap::new(size);
            bits.or_assign(&log.bits);
            log.bits = bits;
        }
        Ok(())
    }

    /// The checks `VDI.clone` and `VDI.copy` share, then the source's data.
    fn copy_source(&self, r: &str) -> Result<Arc<Disk>, ApiError> {
        self.vdi(r)?
            .data
            .clone()
            .ok_or_else(|| ApiError::incompatible_type(r, "cbt_metadata"))
    }

    /// `VDI.clone(vdi, driver_params)`: a new VDI (not a snapshot) with the
    /// same content, name, description, type, sharable, other_config,
    /// xenstore_data, on_boot and tags (xapi_vdi.ml `snapshot_and_clone`),
    /// `cbt_enabled=false` and no CBT log; the source's chain is untouched.
    /// Checks: the SM feature `VDI_CLONE`, `cbt_metadata`, the SR plugged.
    /// May run while the VDI is attached.
    pub fn vdi_clone(&mut self, r: &str) -> Result<Ref, ApiError> {
        let v = self.vdi(r)?.clone();
        let sr_type = self
            .srs
            .get(&v.sr)
            .map(|s| s.sr_type.clone())
            .unwrap_or_default();
        if !super::sr::can_clone(&sr_type) {
            return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [v.sr.as_str()]));
        }
        let source = self.copy_source(r)?;
        self.check_sr_attached(&v.sr)?;
        self.check_sr_space(&v.sr, v.virtual_size)?;
        let uuid = new_uuid();
        // Copy-on-write, as SM clones a VHD.
        let data = source
            .snapshot(
                &self.disk_path(&format!("{}.{}", v.uuid, new_uuid())),
                &self.disk_path(&uuid),
            )
            .map_err(ApiError::vdi_io_from)?;
        let clone = Vdi {
            uuid,
            sharable: v.sharable,
            read_only: false,
            sm_config: BTreeMap::new(),
            is_a_snapshot: false,
            snapshot_of: NULL_REF.into(),
            snapshot_time: None,
            cbt_enabled: false,
            log: None,
            suspend_of: None,
            data: Some(Arc::new(data)),
            ..v
        };
        let c = new_ref();
        self.vdis.insert(c.clone(), clone);
        Ok(c)
    }

    /// `VDI.copy(vdi, sr, base_vdi, into_vdi)`: the content of `vdi` into
    /// a new VDI on `sr` (`into` null) or into `into`; with a `base`, only
    /// the blocks where `vdi` differs from `base`. The result has
    /// `cbt_enabled=false` when new (an existing `into` keeps its CBT and
    /// its log marks the blocks written).
    ///
    /// Checks (xapi_vdi.ml): an attached RW VBD → `VDI_IN_USE [vdi;
    /// "copy"]`; `cbt_metadata` → `VDI_INCOMPATIBLE_TYPE`; `on_boot=reset`
    /// → `VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION []`; a read-only
    /// `into` → `VDI_READONLY [into]`; a smaller one → `VDI_TOO_SMALL
    /// [into; size of vdi]`. A VDI it created is destroyed on failure.
    pub fn vdi_copy(
        &mut self,
        r: &str,
        sr: &str,
        base: Option<&str>,
        into: Option<&str>,
    ) -> Result<Ref, ApiError> {
        let v = self.vdi(r)?.clone();
        if self
            .vbds
            .values()
            .any(|b| b.vdi == r && b.currently_attached && b.mode == "RW")
        {
            return Err(ApiError::in_use(r, "copy"));
        }
        let source = self.copy_source(r)?;
        if v.on_boot == "reset" {
            return Err(ApiError::new(
                "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
                Vec::<String>::new(),
            ));
        }
        let base = match base {
            Some(b) => Some(
                self.vdi(b)?
                    .data
                    .clone()
                    .ok_or_else(|| ApiError::incompatible_type(b, "cbt_metadata"))?,
            ),
            None => None,
        };
        let (dst, created) = match into {
            Some(d) => (d.to_string(), false),
            None => {
                if !self.srs.contains_key(sr) {
                    return Err(ApiError::handle_invalid("SR", sr));
                }
                let new = NewVdi {
                    name_label: v.name_label.clone(),
                    name_description: v.name_description.clone(),
                    sr: sr.to_string(),
                    virtual_size: v.virtual_size,
                    vdi_type: v.vdi_type.clone(),
                    sharable: v.sharable,
                    // CA-64962: always read-write, to copy a read-only source.
                    read_only: false,
                    other_config: v.other_config.clone(),
                    sm_config: BTreeMap::new(),
                    xenstore_data: v.xenstore_data.clone(),
                    tags: v.tags.clone(),
                };
                (self.vdi_create(new)?, true)
            }
        };
        let copied = self.copy_into(&source, base.as_deref(), &dst, v.virtual_size);
        if let Err(e) = copied {
            if created {
                let _ = self.vdi_destroy(&dst);
            }
            return Err(e);
        }
        Ok(dst)
    }

    /// The data part of `VDI.copy`: checks `dst`, then writes every block
    /// of `source` that differs from `base` (all blocks `source` or `dst`
    /// hold without one).
    fn copy_into(
        &mut self,
        source: &Disk,
        base: Option<&Disk>,
        dst: &str,
        size: u64,
    ) -> Result<(), ApiError> {
        let d = self.vdi(dst)?;
        if d.read_only {
            return Err(ApiError::new("VDI_READONLY", [dst]));
        }
        if d.virtual_size < size {
            return Err(ApiError::new(
                "VDI_TOO_SMALL",
                [dst.to_string(), size.to_string()],
            ));
        }
        let target = d
            .data
            .clone()
            .ok_or_else(|| ApiError::incompatible_type(dst, "cbt_metadata"))?;
        let mut blocks = source.allocated();
        match base {
            Some(b) => blocks.or_assign(&b.allocated()),
            None => blocks.or_assign(&target.allocated()),
        }
        for block in blocks.iter_set() {
            let offset = block * CBT_BLOCK_BYTES;
            if offset >= size {
                break;
            }
            let len = CBT_BLOCK_BYTES.min(size - offset) as usize;
            let data = source.read(offset, len).map_err(ApiError::vdi_io_from)?;
            if let Some(b) = base {
                let before = if offset + len as u64 <= b.size_bytes() {
                    b.read(offset, len).map_err(ApiError::vdi_io_from)?
                } else {
                    vec![0u8; len]
                };
                if before == data {
                    continue;
                }
            }
            self.check_write_space(dst, offset, &data)?;
            target.write(offset, &data).map_err(ApiError::vdi_io_from)?;
            self.mark_written(dst, offset, len as u64);
        }
        Ok(())
    }

    /// `VDI.pool_migrate(vdi, sr, options)`: the VDI moves to `sr` and, as
    /// after a storage migration, comes out as a new VDI (new uuid and
    /// ref; the old one is gone); the VBDs point at it. Returns the new ref.
    ///
    /// Checks: no VBD of a VM → `VDI_NEEDS_VM_FOR_MIGRATE [vdi]`
    /// (message_forwarding.ml); `cbt_metadata` → `VDI_INCOMPATIBLE_TYPE`;
    /// `cbt_enabled` → `VDI_CBT_ENABLED [vdi]` (xapi_vm_migrate.ml
    /// `vdi_pool_migrate`, xenapi-reference.md §5 rule 5); the SR plugged.
    pub fn vdi_pool_migrate(&mut self, r: &str, sr: &str) -> Result<Ref, ApiError> {
        let v = self.vdi(r)?.clone();
        // Assumption: xapi takes the VM of the VDI's first VBD; dom0's
        // (an open NBD connection) does not count as the VDI's VM here.
        let has_vm = self
            .vbds
            .values()
            .any(|b| b.vdi == r && self.vms.get(&b.vm).is_some_and(|vm| !vm.is_control_domain));
        if !has_vm {
            return Err(ApiError::new("VDI_NEEDS_VM_FOR_MIGRATE", [r]));
        }
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(r, "cbt_metadata"));
        }
        if v.cbt_enabled {
            return Err(ApiError::new("VDI_CBT_ENABLED", [r]));
        }
        self.check_sr_attached(sr)?;
        // Assumption: a VDI already on `sr` stays as it is (VM.migrate_send
        // copies only the VDIs whose SR changes).
        if v.sr == sr {
            return Ok(r.to_string());
        }
        self.check_sr_space(sr, v.virtual_size)?;
        let new = new_ref();
        let moved = Vdi {
            uuid: new_uuid(),
            sr: sr.to_string(),
            sm_config: BTreeMap::new(),
            log: None,
            ..v
        };
        self.vdis.remove(r);
        self.vdis.insert(new.clone(), moved);
        for b in self.vbds.values_mut().filter(|b| b.vdi == r) {
            b.vdi = new.clone();
        }
        // Assumption: the VDI's snapshots stay on their SR (a real
        // migration copies them along) and now are snapshots of the new VDI.
        for s in self.vdis.values_mut().filter(|s| s.snapshot_of == r) {
            s.snapshot_of = new.clone();
        }
        Ok(new)
    }
}
