//! VBDs: create (disks and CD drives, empty or with an ISO), destroy,
//! plug/unplug, and the dom0 attach / detach that NBD connections, raw VDI
//! transfers and the `sim.attach_to_dom0` / `sim.detach` hooks use.

use super::*;
use xapi_wire::ApiError;

/// The VDI types a VBD may point at (xapi_vbd.ml `create`).
const ATTACHABLE_TYPES: [&str; 8] = [
    "system",
    "user",
    "ephemeral",
    "suspend",
    "crashdump",
    "metadata",
    "rrd",
    "pvs_cache",
];

impl State {
    /// `VBD.create`, with xapi_vbd.ml's checks in its order: the VDI's
    /// type (unless empty), CDs read-only, only CDs empty, no RW VBD on a
    /// read-only VDI.
    pub fn vbd_create(&mut self, new: NewVbd) -> Result<Ref, ApiError> {
        self.vm(&new.vm)?;
        if !["Disk", "CD", "Floppy"].contains(&new.vbd_type.as_str()) {
            return Err(ApiError::new(
                "ENUM_VALUE_UNKNOWN",
                ["vbd_type", new.vbd_type.as_str()],
            ));
        }
        if new.mode != "RO" && new.mode != "RW" {
            return Err(ApiError::new("INVALID_VALUE", ["mode", new.mode.as_str()]));
        }
        let read_only = if new.empty {
            false
        } else {
            let v = self.vdi(&new.vdi)?;
            if !ATTACHABLE_TYPES.contains(&v.vdi_type.as_str()) {
                return Err(ApiError::incompatible_type(&new.vdi, &v.vdi_type));
            }
            v.read_only
        };
        if new.vbd_type == "CD" && new.mode != "RO" {
            return Err(ApiError::new(
                "VBD_CDS_MUST_BE_READONLY",
                Vec::<String>::new(),
            ));
        }
        if new.vbd_type != "CD" && new.empty {
            return Err(ApiError::new("VBD_NOT_REMOVABLE_MEDIA", ["in constructor"]));
        }
        if new.mode == "RW" && read_only {
            return Err(ApiError::new("VDI_READONLY", [new.vdi.as_str()]));
        }
        let r = new_ref();
        let device = match new.userdevice.parse::<u8>() {
            Ok(n) if n < 26 => format!("xvd{}", (b'a' + n) as char),
            _ => String::new(),
        };
        self.vbds.insert(
            r.clone(),
            Vbd {
                uuid: new_uuid(),
                vm: new.vm,
                vdi: new.vdi,
                userdevice: new.userdevice,
                device,
                mode: new.mode,
                bootable: new.bootable,
                currently_attached: false,
                other_config: new.other_config,
                vbd_type: new.vbd_type,
                empty: new.empty,
            },
        );
        Ok(r)
    }

    pub fn vbd_destroy(&mut self, r: &str) -> Result<(), ApiError> {
        let b = self
            .vbds
            .get(r)
            .ok_or_else(|| ApiError::handle_invalid("VBD", r))?;
        if b.currently_attached {
            return Err(ApiError::operation_not_allowed("VBD is currently attached"));
        }
        self.vbds.remove(r);
        Ok(())
    }

    pub fn vbd_set_attached(&mut self, r: &str, attached: bool) -> Result<(), ApiError> {
        let b = self
            .vbds
            .get(r)
            .ok_or_else(|| ApiError::handle_invalid("VBD", r))?;
        let vm_state = self.vm(&b.vm)?.power_state.clone();
        if vm_state != "Running" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [b.vm.as_str(), "running", &vm_state.to_ascii_lowercase()],
            ));
        }
        if b.currently_attached == attached {
            return Err(ApiError::new(
                if attached {
                    "DEVICE_ALREADY_ATTACHED"
                } else {
                    "DEVICE_ALREADY_DETACHED"
                },
                [r],
            ));
        }
        if let Some(b) = self.vbds.get_mut(r) {
            b.currently_attached = attached;
        }
        Ok(())
    }

    /// A VBD of the first host's dom0, attached (a test hook's leftover).
    pub fn attach_to_dom0(&mut self, vdi: &str, mode: &str) -> Result<Ref, ApiError> {
        let host = self.host.clone();
        self.attach_to_dom0_of(&host, vdi, mode)
    }

    /// A VBD of `host`'s dom0, attached, as xapi-nbd and the HTTP handlers
    /// on that host create. A read-write one (`/import_raw_vdi`) is refused
    /// with `VDI_IN_USE [vdi]` while a VM that is not suspended has the VDI
    /// attached, as xapi_vbd_helpers.ml's sharing check words it for a
    /// non-sharable VDI.
    // Assumption: xapi exempts dom0's own VBDs from that check
    // (`is_system_domain`), and the reference does not say what refuses
    // an import into a disk a running VM writes; the simulator applies the
    // sharing check to dom0's read-write VBD too, so nothing is written.
    pub fn attach_to_dom0_of(
        &mut self,
        host: &str,
        vdi: &str,
        mode: &str,
    ) -> Result<Ref, ApiError> {
        if mode == "RW" && self.attached_to_a_live_vm(vdi) && !self.vdi(vdi)?.sharable {
            return Err(ApiError::new("VDI_IN_USE", [vdi]));
        }
        let dom0 = self.dom0_of(host);
        let r = self.vbd_create(NewVbd::disk(&dom0, vdi, "autodetect", mode))?;
        if let Some(b) = self.vbds.get_mut(&r) {
            b.currently_attached = true;
        }
        Ok(r)
    }

    /// Whether a VBD of a VM other than a control domain, and not
    /// suspended, has the VDI attached (xapi_vbd_helpers.ml `vbds_to_check`).
    pub(super) fn attached_to_a_live_vm(&self, vdi: &str) -> bool {
        self.vbds.values().any(|b| {
            b.vdi == vdi
                && b.currently_attached
                && self
                    .vms
                    .get(&b.vm)
                    .is_some_and(|vm| !vm.is_control_domain && vm.power_state != "Suspended")
        })
    }

    /// Unplugs and destroys a VBD (no checks: the cleanup path).
    pub fn detach_and_destroy(&mut self, vbd: &str) {
        self.vbds.remove(vbd);
    }
}
