//! Which snapshots a `--source` or `--vm` names, however the source was
//! typed: a XenServer URL with or without the user and the default port, a
//! VM URL (every disk and the metadata of its VM backups), an NBD URI in any
//! of its spellings, a path (its `file:` identity). Pure but for the path's
//! canonical form.

use crate::format::snapshot::SnapshotMeta;
use crate::source::xenapi::workflow::keys;
use crate::source::xenapi::{XenObject, XenUrl};

/// What a `--source` value selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceMatch {
    /// Snapshots whose stored identity is exactly this.
    Identity(String),
    /// Every snapshot of a XenServer disk, through whichever host of its
    /// pool it was taken: the identity typed, or the VDI's uuid.
    XenDisk { identity: String, vdi: String },
    /// Every snapshot of a VM's backups, through any host of its pool:
    /// its disks and its metadata.
    Vm { vm: String },
    /// Text that is a source id given with `--source-id` as typed, or a
    /// path: the image's identity (`file:` and its absolute path).
    IdOrPath { id: String, file: String },
}

/// `meta` is a disk snapshot of the XenServer VDI `vdi_uuid` (uuids are
/// unique: the host it was taken through does not matter).
pub fn is_xen_disk(meta: &SnapshotMeta, vdi_uuid: &str) -> bool {
    meta.landmark
        .get(keys::VDI)
        .is_some_and(|v| v.eq_ignore_ascii_case(vdi_uuid))
        && meta.landmark.get(keys::KIND).is_none_or(|k| k == "disk")
}

impl SourceMatch {
    /// The selection `text` means. A XenServer URL or NBD URI that does not
    /// parse is an error naming it (it could match nothing).
    pub fn parse(text: &str) -> Result<SourceMatch, String> {
        if XenUrl::is_xen(text) {
            let url = XenUrl::parse(text).map_err(|e| e.to_string())?;
            return Ok(match url.object {
                XenObject::Vdi => SourceMatch::XenDisk {
                    identity: url.disk_identity(&url.uuid),
                    vdi: url.uuid.to_ascii_lowercase(),
                },
                XenObject::Vm => SourceMatch::Vm {
                    vm: url.uuid.to_ascii_lowercase(),
                },
            });
        }
        if text.starts_with("nbd://")
            || text.starts_with("nbds://")
            || text.starts_with("nbd+unix://")
        {
            let uri = nbd::NbdUri::parse(text).map_err(|e| format!("'{text}': {e}"))?;
            return Ok(SourceMatch::Identity(uri.identity()));
        }
        if text.contains(':') {
            return Ok(SourceMatch::Identity(text.to_string()));
        }
        // A `--source-id` as typed, or a path: the image may be gone (that
        // is when one restores), so fall back to the absolute path it had.
        Ok(SourceMatch::IdOrPath {
            id: text.to_string(),
            file: match std::fs::canonicalize(text).or_else(|_| std::path::absolute(text)) {
                Ok(p) => format!("file:{}", p.display()),
                Err(_) => text.to_string(),
            },
        })
    }

    pub fn matches(&self, meta: &SnapshotMeta) -> bool {
        match self {
            SourceMatch::Identity(id) => meta.source == *id,
            SourceMatch::IdOrPath { id, file } => meta.source == *id || meta.source == *file,
            SourceMatch::XenDisk { identity, vdi } => {
                meta.source == *identity || is_xen_disk(meta, vdi)
            }
            SourceMatch::Vm { vm } => meta
                .landmark
                .get(keys::VM)
                .is_some_and(|v| v.eq_ignore_ascii_case(vm)),
        }
    }
}

/// A VM backup's landmark field, by its XenServer key, from a XenServer
/// or a vSphere snapshot (whose keys name the same things).
pub fn vm_field<'a>(meta: &'a SnapshotMeta, xen_key: &str) -> Option<&'a String> {
    use crate::source::vmware::workflow::keys as vmware;
    meta.landmark.get(xen_key).or_else(|| {
        let k = match xen_key {
            keys::KIND => vmware::KIND,
            keys::VM => vmware::VM,
            keys::VM_NAME => vmware::VM_NAME,
            keys::VDI_NAME => vmware::DISK_LABEL,
            keys::VM_BACKUP => vmware::VM_BACKUP,
            keys::HOST => vmware::HOST,
            _ => return None,
        };
        meta.landmark.get(k)
    })
}

/// Whether `meta` belongs to the VM `name_or_uuid` (its uuid, or its name
/// when backed up).
pub fn of_vm(meta: &SnapshotMeta, name_or_uuid: &str) -> bool {
    vm_field(meta, keys::VM).is_some_and(|v| v.eq_ignore_ascii_case(name_or_uuid))
        || vm_field(meta, keys::VM_NAME).map(String::as_str) == Some(name_or_uuid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const VDI: &str = "2a6e5b4f-3d2c-4b1a-9e8f-7a6b5c4d3e2f";
    const VM: &str = "9f8e7d6c-5b4a-4321-8fed-cba987654321";

    fn meta(source: &str, landmark: &[(&str, &str)]) -> SnapshotMeta {
        let mut m: SnapshotMeta = serde_json::from_value(serde_json::json!({
            "id": "00000000000000000000000000000001", "generation": 0,
            "time": "2026-01-01T00:00:00Z", "hostname": "h", "source": source,
            "disk_size_bytes": 0, "block_size": 65536, "parent": null,
            "backup_set": "00000000000000000000000000000001",
            "read_mode": "all",
        }))
        .expect("meta");
        m.landmark = landmark
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        m
    }

    #[test]
    fn xen_urls_match_however_typed() {
        let stored = format!("xen://host.example:443/vdi/{VDI}");
        let m = meta(&stored, &[]);
        for typed in [
            format!("xen://host.example/vdi/{VDI}"),
            format!("xen://root@host.example/vdi/{VDI}"),
            format!("xen://root@host.example:443/vdi/{VDI}"),
            stored.clone(),
        ] {
            let s = SourceMatch::parse(&typed).unwrap();
            assert!(s.matches(&m), "{typed} -> {s:?}");
        }
        let other_port = SourceMatch::parse(&format!("xen://host.example:8443/vdi/{VDI}")).unwrap();
        assert!(!other_port.matches(&m));
        // A snapshot that records the VDI matches through any host; the
        // VM's metadata, which records no VDI, does not.
        let through_member = meta(
            &format!("xen://member.example:443/vdi/{VDI}"),
            &[(keys::VDI, VDI), (keys::KIND, "disk")],
        );
        assert!(other_port.matches(&through_member));
        let metadata = meta("xen://h:443/vm/x/metadata", &[(keys::KIND, "vm-metadata")]);
        assert!(!other_port.matches(&metadata));
    }

    #[test]
    fn a_vm_url_matches_its_disks_and_metadata() {
        let s = SourceMatch::parse(&format!("xen://root@host.example/vm/{VM}")).unwrap();
        let disk = meta(
            &format!("xen://host.example:443/vdi/{VDI}"),
            &[(keys::HOST, "host.example:443"), (keys::VM, VM)],
        );
        let metadata = meta(
            &format!("xen://host.example:443/vm/{VM}/metadata"),
            &[(keys::HOST, "host.example:443"), (keys::VM, VM)],
        );
        let alone = meta(
            &format!("xen://host.example:443/vdi/{VDI}"),
            &[(keys::HOST, "host.example:443")],
        );
        // Through another host of the pool: the same VM.
        let member = meta(
            &format!("xen://other:443/vdi/{VDI}"),
            &[(keys::HOST, "other:443"), (keys::VM, VM)],
        );
        let other_vm = meta(
            &format!("xen://host.example:443/vm/{VDI}/metadata"),
            &[(keys::HOST, "host.example:443"), (keys::VM, VDI)],
        );
        assert!(s.matches(&disk) && s.matches(&metadata) && s.matches(&member));
        assert!(!s.matches(&alone) && !s.matches(&other_vm));
    }

    #[test]
    fn nbd_uris_match_their_identity() {
        let m = meta("nbd://10.0.0.5:10809/disk", &[]);
        for typed in ["nbd://10.0.0.5/disk", "nbds://10.0.0.5:10809/disk"] {
            assert!(SourceMatch::parse(typed).unwrap().matches(&m), "{typed}");
        }
        assert!(SourceMatch::parse("xen://bad").is_err());
    }

    #[test]
    fn a_source_id_matches_as_typed_and_a_path_by_its_identity() {
        // `backup IMAGE --source-id real`, then `snapshots --source real`.
        let named = meta("real", &[]);
        let s = SourceMatch::parse("real").unwrap();
        assert!(s.matches(&named));
        let abs = std::path::absolute("real").unwrap();
        assert!(s.matches(&meta(&format!("file:{}", abs.display()), &[])));
        assert!(!s.matches(&meta("realer", &[])));
    }

    #[test]
    fn vm_by_name_or_uuid() {
        let m = meta("x", &[(keys::VM, VM), (keys::VM_NAME, "web01")]);
        assert!(of_vm(&m, "web01") && of_vm(&m, &VM.to_uppercase()));
        assert!(!of_vm(&m, "web02"));
    }
}
