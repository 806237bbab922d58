//! VMs: create, power state, snapshot/checkpoint (a VDI snapshot per disk,
//! `ignore_vdis` honoured) and destroy.

use std::collections::BTreeMap;

use chrono::Utc;

use super::*;
use xapi_wire::ApiError;

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

    /// `VM.snapshot` / `VM.checkpoint`: every disk VDI not ignored is
    /// snapshotted (same rules as `VDI.snapshot`); the snapshot VM's VBDs
    /// point at the VDI snapshots. A checkpoint copies `currently_attached`.
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
        if checkpoint && vm.power_state != "Running" {
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
        // Check every disk before changing anything.
        for b in &vbds {
            let v = self.vdi(&b.vdi)?;
            if v.vdi_type == "cbt_metadata" || v.data.is_none() {
                return Err(ApiError::incompatible_type(&b.vdi, "cbt_metadata"));
            }
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
            let snap_vdi = self.vdi_snapshot(&b.vdi)?;
            let vbd = self.vbd_create(NewVbd {
                vm: snap_vm.clone(),
                vdi: snap_vdi,
                userdevice: b.userdevice.clone(),
                mode: b.mode.clone(),
                bootable: b.bootable,
                other_config: b.other_config.clone(),
            })?;
            if checkpoint && b.currently_attached {
                if let Some(v) = self.vbds.get_mut(&vbd) {
                    v.currently_attached = true;
                }
            }
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
        self.vms.remove(r);
        Ok(())
    }

    // ---- network -------------------------------------------------------
}
