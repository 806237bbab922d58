//! `restore ... --target xen://HOST/vdi/UUID` (overwrite a disk),
//! `--target xen://HOST/sr/UUID` (a new disk in that SR) and
//! `--target xen://HOST/sr/UUID --new-vm` (every disk of a VM backup, then
//! a new VM from its stored metadata). The bytes come from the one
//! coalescing engine (`repo::restore::run`) through `target::xen` straight
//! into `/import_raw_vdi` (reference §3.2); nothing is materialised
//! locally. A VDI this command created is destroyed when anything fails.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use xapi_wire::Value;

use super::backup::{xen_session, XenOptions};
use crate::format::SnapshotId;
use crate::output::{human_bytes, plural, Ui};
use crate::repo::restore::{self, RestoreOptions, RestoreSummary};
use crate::repo::{Repository, SnapshotEntry};
use crate::source::xenapi::import::ImportFormat;
use crate::source::xenapi::workflow::keys;
use crate::source::xenapi::Session;
use crate::target::xen::{
    choose_format, describe, import_into, running_users, sr_by_uuid, verify, DiskShape, TargetKind,
    XenTarget,
};
use crate::target::StreamSink;

/// Options of a restore into XenServer.
pub struct XenRestoreOptions {
    /// The disk to overwrite or the SR to create disks in.
    pub target: XenTarget,
    pub xen: XenOptions,
    /// Import even when the disk is attached to a running VM or its size
    /// differs from the snapshot's.
    pub force: bool,
    /// Read the imported disk back over NBD and compare every block.
    pub verify: bool,
    /// Restore every disk of a VM backup into the SR, then a new VM from
    /// its stored metadata.
    pub new_vm: bool,
    /// `auto`, `raw` or `chunked`.
    pub import_format: String,
}

/// One disk written into XenServer.
#[derive(Debug, Serialize)]
pub(crate) struct XenDiskRestore {
    pub vdi_uuid: String,
    pub created: bool,
    pub import_format: ImportFormat,
    pub body_bytes: u64,
    pub verified: bool,
    #[serde(flatten)]
    pub summary: RestoreSummary,
}

/// `VDI.create` with all eleven fields (reference §2.9).
fn create_vdi(
    session: &Session,
    sr: &str,
    size: u64,
    name: &str,
    id: SnapshotId,
) -> Result<String> {
    let mut rec = BTreeMap::new();
    rec.insert("name_label".to_string(), Value::str(name));
    rec.insert(
        "name_description".to_string(),
        Value::str(format!("restored by cbtvault from snapshot {id}")),
    );
    rec.insert("SR".to_string(), Value::str(sr));
    rec.insert("virtual_size".to_string(), Value::Int(size as i64));
    rec.insert("type".to_string(), Value::str("user"));
    rec.insert("sharable".to_string(), Value::Bool(false));
    rec.insert("read_only".to_string(), Value::Bool(false));
    rec.insert(
        "other_config".to_string(),
        Value::Struct(BTreeMap::from([(
            "cbtvault.snapshot".to_string(),
            Value::str(id.to_string()),
        )])),
    );
    rec.insert("xenstore_data".to_string(), Value::Struct(BTreeMap::new()));
    rec.insert("sm_config".to_string(), Value::Struct(BTreeMap::new()));
    rec.insert("tags".to_string(), Value::Array(Vec::new()));
    let v = session
        .call("VDI.create", &[Value::Struct(rec)])
        .context("VDI.create")?;
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("VDI.create: not a string"))
}

/// The name of the disk the snapshot came from, when the host still has it.
fn original_name(session: &Session, entry: &SnapshotEntry) -> String {
    entry
        .meta
        .landmark
        .get(keys::VDI)
        .and_then(|uuid| session.vdi_by_uuid(uuid).ok())
        .and_then(|r| session.vdi_record(&r).ok())
        .map(|r| r.name_label)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| entry.meta.source.clone())
}

/// Restores one snapshot into `target`: an existing VDI, or a new one in
/// the SR (destroyed again when anything fails).
fn restore_disk(
    ui: &Ui,
    repo: &Repository,
    session: &Session,
    target: &XenTarget,
    entry: &SnapshotEntry,
    options: &XenRestoreOptions,
) -> Result<XenDiskRestore> {
    let id = entry.meta.id;
    // Every page read and the data counted before the host sees a byte.
    let mut reader = repo.chain_reader(id)?;
    let shape = DiskShape::of(&mut reader)?;
    let format = choose_format(
        &shape,
        &options.import_format,
        target.kind == TargetKind::Sr,
    )?;
    let uuid = &target.url.uuid;
    match target.kind {
        TargetKind::Vdi => {
            let vdi = session
                .vdi_by_uuid(uuid)
                .with_context(|| format!("VDI {uuid} does not exist on the host"))?;
            let rec = session.vdi_record(&vdi)?;
            if rec.virtual_size != shape.disk_size_bytes && !options.force {
                bail!(
                    "VDI {uuid} has {} bytes, snapshot {} has {}: pass --force to import anyway",
                    rec.virtual_size,
                    id.short(),
                    shape.disk_size_bytes
                );
            }
            let users = running_users(session, &vdi)?;
            if !users.is_empty() && !options.force {
                bail!(
                    "VDI {uuid} is in use by running VM(s) {}: shut them down or pass --force",
                    users.join(", ")
                );
            }
            let bar = ui.progress("restore", true);
            let (summary, body) = import_into(repo, session, reader, &shape, &vdi, format, &bar)
                .with_context(|| {
                    format!(
                        "restore of snapshot {id} into VDI {uuid} failed; the VDI may be partly overwritten"
                    )
                })?;
            if options.verify {
                verify(
                    session,
                    &vdi,
                    uuid,
                    repo.chain_reader(id)?,
                    repo.codec().hasher(),
                )?;
            }
            Ok(XenDiskRestore {
                vdi_uuid: uuid.clone(),
                created: false,
                import_format: format,
                body_bytes: body,
                verified: options.verify,
                summary,
            })
        }
        TargetKind::Sr => {
            let sr = sr_by_uuid(session, uuid)?;
            let name = format!("{} (restored)", original_name(session, entry));
            let vdi = create_vdi(session, &sr, shape.disk_size_bytes, &name, id)
                .with_context(|| format!("create a VDI in SR {uuid}"))?;
            let done = (|| -> Result<XenDiskRestore> {
                let vdi_uuid = session.vdi_uuid(&vdi)?;
                let bar = ui.progress("restore", true);
                let (summary, body) =
                    import_into(repo, session, reader, &shape, &vdi, format, &bar)?;
                bar.finish();
                if options.verify {
                    verify(
                        session,
                        &vdi,
                        &vdi_uuid,
                        repo.chain_reader(id)?,
                        repo.codec().hasher(),
                    )?;
                }
                Ok(XenDiskRestore {
                    vdi_uuid,
                    created: true,
                    import_format: format,
                    body_bytes: body,
                    verified: options.verify,
                    summary,
                })
            })();
            match done {
                Ok(d) => Ok(d),
                Err(e) => {
                    let cleanup = match session.vdi_destroy(&vdi) {
                        Ok(()) => "the new VDI was destroyed".to_string(),
                        Err(d) => format!("the new VDI {vdi} could not be destroyed: {d}"),
                    };
                    Err(e.context(format!(
                        "restore of snapshot {id} into SR {uuid} failed; {cleanup}"
                    )))
                }
            }
        }
    }
}

fn report_disk(ui: &Ui, d: &XenDiskRestore) {
    let s = &d.summary;
    ui.info(format!(
        "restored snapshot {} to VDI {}{}: {} ({} data blocks, {} zero), {} sent {}, in {:.2}s{}",
        s.snapshot_id.short(),
        d.vdi_uuid,
        if d.created { " (new)" } else { "" },
        human_bytes(s.disk_size_bytes),
        s.blocks_data,
        s.blocks_zero,
        human_bytes(d.body_bytes),
        match d.import_format {
            ImportFormat::Raw => "raw",
            ImportFormat::Chunked => "chunked",
        },
        s.seconds,
        if d.verified {
            ", verified over NBD"
        } else {
            ""
        }
    ));
}

/// A health check of one disk snapshot: restored into a new VDI of SR
/// `sr_uuid` on the host `session` is logged in to, read back over NBD and
/// compared block by block, then the VDI is destroyed, whatever happened.
/// Returns the bytes checked.
pub(crate) fn health_check(
    repo: &Repository,
    session: &Session,
    url: &crate::source::xenapi::XenUrl,
    sr_uuid: &str,
    entry: &SnapshotEntry,
) -> Result<u64> {
    let mut sr_url = url.clone();
    sr_url.uuid = sr_uuid.to_string();
    let options = XenRestoreOptions {
        target: XenTarget {
            url: sr_url,
            kind: TargetKind::Sr,
        },
        xen: Default::default(),
        force: false,
        verify: true,
        new_vm: false,
        import_format: "auto".into(),
    };
    let quiet = Ui::new(false, true, "run");
    let d = restore_disk(&quiet, repo, session, &options.target, entry, &options)?;
    let vdi = session.vdi_by_uuid(&d.vdi_uuid).with_context(|| {
        format!(
            "find the health check's VDI {} to destroy it (destroy it by hand)",
            d.vdi_uuid
        )
    })?;
    session
        .vdi_destroy(&vdi)
        .with_context(|| format!("destroy the health check's VDI {}", d.vdi_uuid))?;
    Ok(d.summary.disk_size_bytes)
}

/// `restore SNAPSHOT --target xen://...` (not --new-vm).
pub(crate) fn run_disk(
    ui: &Ui,
    repo: &Repository,
    options: &XenRestoreOptions,
    entry: &SnapshotEntry,
) -> Result<()> {
    let target = &options.target;
    let session = xen_session(ui, &target.url, &options.xen)?;
    let result = restore_disk(ui, repo, &session, target, entry, options);
    session.logout();
    let d = result?;
    ui.summary(&d);
    report_disk(ui, &d);
    Ok(())
}

/// What a new-VM restore created.
#[derive(Debug, Serialize)]
pub(crate) struct XenVmRestore {
    #[serde(rename = "vm_backup_id")]
    pub vm_backup: String,
    pub vm_uuid: String,
    pub disks: Vec<XenVmDisk>,
}

#[derive(Debug, Serialize)]
pub(crate) struct XenVmDisk {
    #[serde(rename = "original_vdi_uuid")]
    pub original_vdi: String,
    #[serde(flatten)]
    pub restore: XenDiskRestore,
}

/// The snapshots of one VM backup: (disk snapshots, metadata snapshot).
pub(crate) fn vm_backup_members(
    repo: &Repository,
    group: &str,
) -> Result<(Vec<SnapshotEntry>, SnapshotEntry)> {
    let all: Vec<SnapshotEntry> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.meta.landmark.get(keys::VM_BACKUP).map(String::as_str) == Some(group))
        .collect();
    let mut disks = Vec::new();
    let mut metadata = None;
    for s in all {
        match s.meta.landmark.get(keys::KIND).map(String::as_str) {
            Some("vm-metadata") => metadata = Some(s),
            _ => disks.push(s),
        }
    }
    let metadata =
        metadata.ok_or_else(|| anyhow!("VM backup {group} has no stored VM metadata"))?;
    if disks.is_empty() {
        bail!("VM backup {group} has no disk");
    }
    Ok((disks, metadata))
}

/// `restore VM-BACKUP --target xen://HOST/sr/UUID --new-vm`.
pub(crate) fn run_new_vm(
    ui: &Ui,
    repo: &Repository,
    options: &XenRestoreOptions,
    group: &str,
) -> Result<()> {
    // An SR target (checked with the options).
    let target = &options.target;
    let (disks, metadata) = vm_backup_members(repo, group)?;
    // The stored XVA tar (small): restored into memory through the engine.
    let tar = {
        let mut bytes = Vec::new();
        let mut sink = StreamSink::new(&mut bytes);
        restore::run(
            repo,
            repo.chain_reader(metadata.meta.id)?,
            &mut sink,
            RestoreOptions::default(),
            &crate::progress::NoProgress,
        )?;
        bytes
    };
    let session = xen_session(ui, &target.url, &options.xen)?;
    let mut restored: Vec<XenVmDisk> = Vec::new();
    let result = (|| -> Result<String> {
        for d in &disks {
            let original = d
                .meta
                .landmark
                .get(keys::VDI)
                .cloned()
                .ok_or_else(|| anyhow!("snapshot {} records no VDI", d.meta.id.short()))?;
            let r = restore_disk(ui, repo, &session, target, d, options)?;
            report_disk(ui, &r);
            restored.push(XenVmDisk {
                original_vdi: original,
                restore: r,
            });
        }
        let map: Vec<(String, String)> = restored
            .iter()
            .map(|d| {
                (
                    format!("vdi:{}", d.original_vdi),
                    d.restore.vdi_uuid.clone(),
                )
            })
            .collect();
        import_metadata(&session, &tar, &map)
    })();
    let outcome = match result {
        Ok(vm_uuid) => Ok(vm_uuid),
        Err(e) => {
            let mut left = Vec::new();
            for d in &restored {
                let gone = session
                    .vdi_by_uuid(&d.restore.vdi_uuid)
                    .and_then(|r| session.vdi_destroy(&r));
                if gone.is_err() {
                    left.push(d.restore.vdi_uuid.clone());
                }
            }
            Err(e.context(if left.is_empty() {
                format!("restore of VM backup {group} failed; the new VDIs were destroyed")
            } else {
                format!(
                    "restore of VM backup {group} failed; these new VDIs could not be destroyed: {}",
                    left.join(", ")
                )
            }))
        }
    };
    session.logout();
    let vm_uuid = outcome?;
    let report = XenVmRestore {
        vm_backup: group.to_string(),
        vm_uuid: vm_uuid.clone(),
        disks: restored,
    };
    ui.summary(&report);
    ui.info(format!(
        "created VM {vm_uuid} from VM backup {group} with {}",
        plural(report.disks.len(), "disk")
    ));
    Ok(())
}

/// `PUT /import_metadata` with the XVA tar and the VDI map (reference
/// §3.4); returns the new VM's uuid.
fn import_metadata(session: &Session, tar: &[u8], vdi_map: &[(String, String)]) -> Result<String> {
    let task = session.task_create("cbtvault restore", "import_metadata")?;
    let mut query: Vec<(&str, &str)> = vec![("task_id", &task)];
    for (k, v) in vdi_map {
        query.push((k, v));
    }
    let sent = session
        .http_put_request("/import_metadata", &query)
        .and_then(|req| {
            req.header("content-type", "application/octet-stream")
                .body(tar.to_vec())
                .send()
                .map_err(|e| session.transport_error(e))
        });
    let status = match sent {
        Ok(resp) => Some(resp.status().as_u16()),
        Err(_) => None,
    };
    let result = session
        .task_wait(&task, "import_metadata")
        .map_err(describe)
        .context("PUT /import_metadata")?;
    if status != Some(200) {
        bail!("PUT /import_metadata: HTTP {status:?}");
    }
    let vm = result
        .split("OpaqueRef:")
        .nth(1)
        .map(|rest| {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(rest.len());
            format!("OpaqueRef:{}", &rest[..end])
        })
        .ok_or_else(|| anyhow!("PUT /import_metadata: no VM in the task result '{result}'"))?;
    let uuid = session.call("VM.get_uuid", &[vm.as_str().into()])?;
    uuid.as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("VM.get_uuid: not a string"))
}
