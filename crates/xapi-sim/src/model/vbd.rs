//! VBDs: create, destroy, plug/unplug, and the dom0 attach / detach that
//! NBD connections, raw VDI transfers and the `sim.attach_to_dom0` /
//! `sim.detach` hooks use.

use std::collections::BTreeMap;

use super::*;
use xapi_wire::ApiError;

impl State {
    pub fn vbd_create(&mut self, new: NewVbd) -> Result<Ref, ApiError> {
        self.vm(&new.vm)?;
        let v = self.vdi(&new.vdi)?;
        if v.vdi_type == "cbt_metadata" {
            return Err(ApiError::incompatible_type(&new.vdi, "cbt_metadata"));
        }
        if new.mode != "RO" && new.mode != "RW" {
            return Err(ApiError::new("INVALID_VALUE", ["mode", new.mode.as_str()]));
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
    /// on that host create.
    pub fn attach_to_dom0_of(
        &mut self,
        host: &str,
        vdi: &str,
        mode: &str,
    ) -> Result<Ref, ApiError> {
        let dom0 = self.dom0_of(host);
        let r = self.vbd_create(NewVbd {
            vm: dom0,
            vdi: vdi.to_string(),
            userdevice: "autodetect".into(),
            mode: mode.into(),
            bootable: false,
            other_config: BTreeMap::new(),
        })?;
        if let Some(b) = self.vbds.get_mut(&r) {
            b.currently_attached = true;
        }
        Ok(r)
    }

    /// Unplugs and destroys a VBD (no checks: the cleanup path).
    pub fn detach_and_destroy(&mut self, vbd: &str) {
        self.vbds.remove(vbd);
    }
}
