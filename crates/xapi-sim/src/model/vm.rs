//! VMs: create, power state (suspended with a `suspend_VDI` too),
//! snapshot/checkpoint (a VDI snapshot per disk, `ignore_vdis` honoured,
//! CD drives copied as they are) and destroy.

use std::collections::BTreeMap;

use chrono::Utc;

use super::*;
use xapi_wire::ApiError;

/// The size of a suspend image: the VM records' `memory_static_max`.
const SUSPEND_IMAGE_BYTES: u64 = 1 << 30;

impl State {
    pub fn vm_create(&mut self, name_label: &str) -> Ref {
        let r = new_ref();
        self.vms.insert(
            r.clone(),
            Vm {
                uuid: new_uuid(),
                name_label: name_label.to_string(),
                name_description: String::new(),
                power_state: "Halted".into(),
                is_control_domain: false,
                is_a_snapshot: false,
                snapshot_of: NULL_REF.into(),
                snapshot_time: None,
                other_config: BTreeMap::new(),
                tags: Vec::new(),
            },
        );
        r
    }

    pub fn vm_set_power(&mut self, r: &str, running: bool) -> Result<(), ApiError> {
        let vm = self.vm(r)?;
        if vm.is_control_domain || vm.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(
                "VM is a snapshot or the control domain",
            ));
        }
        if vm.power_state == "Suspended" {
            // A resume or a hard shutdown: either way xapi destroys the
            // suspend VDI (xapi_vm.ml `hard_shutdown`; after a resume).
            if let Some(vdi) = self.suspend_vdi(r) {
                let _ = self.vdi_destroy(&vdi);
            }
            for b in self.vbds_of_vm(r) {
                if let Some(vbd) = self.vbds.get_mut(&b) {
                    vbd.currently_attached = running;
                }
            }
            if let Some(vm) = self.vms.get_mut(r) {
                vm.power_state = if running { "Running" } else { "Halted" }.into();
            }
            return Ok(());
        }
        let (expected, actual) = if running {
            ("halted", "running")
        } else {
            ("running", "halted")
        };
        let now_running = vm.power_state == "Running";
        if now_running == running {
            return Err(ApiError::new("VM_BAD_POWER_STATE", [r, expected, actual]));
        }
        for b in self.vbds_of_vm(r) {
            if let Some(vbd) = self.vbds.get_mut(&b) {
                vbd.currently_attached = running;
            }
        }
        if let Some(vm) = self.vms.get_mut(r) {
            vm.power_state = if running { "Running" } else { "Halted" }.into();
        }
        Ok(())
    }

    /// The VM's `suspend_VDI`, if it has one.
    pub(super) fn suspend_vdi(&self, vm: &str) -> Option<Ref> {
        self.vdis
            .iter()
            .find(|(_, v)| v.suspend_of.as_deref() == Some(vm))
            .map(|(r, _)| r.clone())
    }

    /// The VM record's `suspend_VDI` (`OpaqueRef:NULL` when none).
    pub(super) fn suspend_vdi_of(&self, vm: &str) -> Ref {
        self.suspend_vdi(vm).unwrap_or_else(|| NULL_REF.into())
    }

    /// A VM suspended as `VM.suspend` leaves it: `power_state` Suspended,
    /// its VBDs still marked attached (xapi keeps them for the resume; the
    /// sharing checks skip suspended VMs), and a new `suspend_VDI` of
    /// type `suspend` on the pool's suspend SR (the default SR) holding
    /// its memory image (`memory_static_max` bytes, a header written).
    /// From Running or Halted (a hook, not `VM.suspend`); returns the
    /// suspend VDI.
    pub fn vm_suspend(&mut self, r: &str) -> Result<Ref, ApiError> {
        let vm = self.vm(r)?;
        if vm.is_control_domain || vm.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(
                "VM is a snapshot or the control domain",
            ));
        }
        if vm.power_state == "Suspended" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [r, "running", "suspended"],
            ));
        }
        let name = format!("Suspend image for {}", vm.name_label);
        let sr = self.default_sr.clone();
        let vdi = self.vdi_create(NewVdi {
            vdi_type: "suspend".into(),
            ..NewVdi::user(name, sr, SUSPEND_IMAGE_BYTES)
        })?;
        self.write_vdi(&vdi, 0, b"XenSavedDomain\n")?;
        self.vdi_mut(&vdi)?.suspend_of = Some(r.to_string());
        for b in self.vbds_of_vm(r) {
            if let Some(vbd) = self.vbds.get_mut(&b) {
                vbd.currently_attached = true;
            }
        }
        if let Some(vm) = self.vms.get_mut(r) {
            vm.power_state = "Suspended".into();
        }
        Ok(vdi)
    }

    /// `VM.snapshot` / `VM.checkpoint`: every disk VDI not ignored is
    /// snapshotted (same rules as `VDI.snapshot`); the snapshot VM's VBDs
    /// point at the VDI snapshots. A checkpoint copies `currently_attached`.
    ///
    /// As xapi_vm_clone.ml does: a CD drive is copied as it is (the same
    /// ISO VDI, or empty), never snapshotted; a snapshot (any power state,
    /// xapi_vm_lifecycle.ml) is Halted with no `suspend_VDI`; a checkpoint
    /// (Running or Suspended) is Suspended, and of a suspended VM gets a
    /// snapshot of its `suspend_VDI`. Before anything is made, the disks
    /// must fit their SRs together (`SR_FULL`).
    pub fn vm_snapshot(
        &mut self,
        r: &str,
        new_name: &str,
        ignore_vdis: &[Ref],
        checkpoint: bool,
    ) -> Result<Ref, ApiError> {
        let vm = self.vm(r)?.clone();
        if vm.is_control_domain || vm.is_a_snapshot {
            return Err(ApiError::operation_not_allowed(
                "VM is a snapshot or the control domain",
            ));
        }
        if checkpoint && vm.power_state != "Running" && vm.power_state != "Suspended" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [r, "running", &vm.power_state.to_ascii_lowercase()],
            ));
        }
        let vbds: Vec<Vbd> = self
            .vbds_of_vm(r)
            .iter()
            .filter_map(|b| self.vbds.get(b).cloned())
            .filter(|b| !ignore_vdis.contains(&b.vdi))
            .collect();
        let is_disk = |b: &Vbd| !b.empty && b.vbd_type != "CD";
        // Check every disk before changing anything.
        let mut needed: BTreeMap<Ref, u64> = BTreeMap::new();
        for b in vbds.iter().filter(|b| is_disk(b)) {
            let v = self.vdi(&b.vdi)?;
            if v.vdi_type == "cbt_metadata" || v.data.is_none() {
                return Err(ApiError::incompatible_type(&b.vdi, "cbt_metadata"));
            }
            *needed.entry(v.sr.clone()).or_default() += v.virtual_size;
        }
        let suspend_image = if checkpoint {
            self.suspend_vdi(r)
        } else {
            None
        };
        if let Some(s) = &suspend_image {
            let v = self.vdi(s)?;
            *needed.entry(v.sr.clone()).or_default() += v.virtual_size;
        }
        for (sr, bytes) in &needed {
            self.check_sr_space(sr, *bytes)?;
        }
        let snap_vm = new_ref();
        self.vms.insert(
            snap_vm.clone(),
            Vm {
                uuid: new_uuid(),
                name_label: new_name.to_string(),
                name_description: vm.name_description.clone(),
                power_state: if checkpoint { "Suspended" } else { "Halted" }.into(),
                is_control_domain: false,
                is_a_snapshot: true,
                snapshot_of: r.to_string(),
                snapshot_time: Some(Utc::now()),
                other_config: vm.other_config.clone(),
                tags: vm.tags.clone(),
            },
        );
        for b in vbds {
            let snap_vdi = if is_disk(&b) {
                self.vdi_snapshot(&b.vdi)?
            } else {
                b.vdi.clone()
            };
            let vbd = self.vbd_create(NewVbd {
                vm: snap_vm.clone(),
                vdi: snap_vdi,
                userdevice: b.userdevice.clone(),
                mode: b.mode.clone(),
                bootable: b.bootable,
                other_config: b.other_config.clone(),
                vbd_type: b.vbd_type.clone(),
                empty: b.empty,
            })?;
            if checkpoint && b.currently_attached {
                if let Some(v) = self.vbds.get_mut(&vbd) {
                    v.currently_attached = true;
                }
            }
        }
        if let Some(s) = suspend_image {
            let image = self.vdi_snapshot(&s)?;
            self.vdi_mut(&image)?.suspend_of = Some(snap_vm.clone());
        }
        Ok(snap_vm)
    }

    /// `VM.destroy`: the VM and its VBDs, never its VDIs.
    pub fn vm_destroy(&mut self, r: &str) -> Result<(), ApiError> {
        let vm = self.vm(r)?;
        if vm.is_control_domain {
            return Err(ApiError::operation_not_allowed(
                "cannot destroy the control domain",
            ));
        }
        if vm.power_state == "Running" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [r, "halted", "running"],
            ));
        }
        for b in self.vbds_of_vm(r) {
            self.vbds.remove(&b);
        }
        // The suspend VDI stays, no longer any VM's.
        for v in self.vdis.values_mut() {
            if v.suspend_of.as_deref() == Some(r) {
                v.suspend_of = None;
            }
        }
        self.vms.remove(r);
        Ok(())
    }

    // ---- network -------------------------------------------------------
}
