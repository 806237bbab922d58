//! `restore SNAPSHOT --target vmware://[USER@]HOST[:PORT]/datastore/DS/PATH.vmdk`:
//! a new flat VMDK on a vSphere datastore (descriptor and `-flat.vmdk`
//! uploaded with `PUT /folder`), which an administrator attaches to a VM.
//! The bytes come from the one coalescing engine through `target::vmware`;
//! nothing is materialised locally. Existing files are never replaced
//! unless `--force`; after any failure neither file is left behind.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::backup_vmware::{vmware_login, VmwareOptions};
use crate::output::{human_bytes, plural, Ui};
use crate::repo::restore::RestoreSummary;
use crate::repo::{Repository, SnapshotEntry};
use crate::source::vmware::inventory::{disk_owner, list_vms};
use crate::target::vmware::{flat_bytes, verify, Upload, VmwareTarget, VmwareTargetError};

/// The datacenter of an ESXi host, the default `dcPath`.
const ESXI_DATACENTER: &str = "ha-datacenter";

/// Options of a restore into vSphere.
pub struct VmwareRestoreOptions {
    pub target: VmwareTarget,
    pub vmware: VmwareOptions,
    /// Replace existing files of the same names.
    pub force: bool,
    /// Read the descriptor and every block back and compare.
    pub verify: bool,
}

/// What a vSphere restore wrote.
#[derive(Debug, Serialize)]
struct VmwareDiskRestore {
    target: String,
    complete: bool,
    /// `[DATASTORE] PATH` of the descriptor and of the flat file.
    descriptor_path: String,
    flat_path: String,
    /// Bytes of the flat file (the disk padded to whole sectors).
    flat_bytes: u64,
    replaced: bool,
    verified: bool,
    #[serde(flatten)]
    summary: RestoreSummary,
}

pub(crate) fn run_disk(
    ui: &Ui,
    repo: &Repository,
    options: &VmwareRestoreOptions,
    entry: &SnapshotEntry,
) -> Result<()> {
    let t = &options.target;
    let id = entry.meta.id;
    let datacenter = options
        .vmware
        .datacenter
        .clone()
        .unwrap_or_else(|| ESXI_DATACENTER.to_string());
    let mut reader = repo.chain_reader(id)?;
    let shape = crate::target::xen::DiskShape::of(&mut reader)?;
    let disk = shape.disk_size_bytes;
    if disk == 0 {
        bail!(
            "snapshot {} holds a disk of 0 bytes: vSphere has no empty disks",
            id.short()
        );
    }
    let session = Arc::new(vmware_login(
        ui,
        t.user.as_deref(),
        &t.host,
        t.port,
        &t.authority(),
        &options.vmware,
    )?);
    let descriptor_path = t.datastore_path(&t.descriptor);
    let flat_path = t.datastore_path(&t.flat());
    let datacenter_ref = session
        .datacenter(&datacenter)
        .with_context(|| format!("find datacenter '{datacenter}'"))?;
    // Nothing is replaced unless asked, and never a VM's disk.
    let mut existing = Vec::new();
    for (path, shown) in [
        (t.descriptor.clone(), &descriptor_path),
        (t.flat(), &flat_path),
    ] {
        let size = session
            .file_size(&datacenter, &t.datastore, &path)
            .with_context(|| format!("look for {shown}"))?;
        if size.is_some() {
            existing.push((path, shown.clone()));
        }
    }
    if !existing.is_empty() {
        let shown: Vec<&str> = existing.iter().map(|(_, s)| s.as_str()).collect();
        if !options.force {
            bail!(
                "{} already exist{} on '{}'; restore under another name, or pass --force to delete and replace {}",
                shown.join(" and "),
                if shown.len() == 1 { "s" } else { "" },
                t.authority(),
                if shown.len() == 1 { "it" } else { "them" }
            );
        }
        let vms = list_vms(&session, Some(&datacenter_ref))
            .context("list the VMs, to make sure no VM's disk is replaced")?;
        for (path, shown) in &existing {
            if let Some(vm) = disk_owner(&vms, &t.datastore, path) {
                bail!(
                    "{shown} is a disk of VM '{vm}': a restore never replaces a VM's disk, even with --force; restore under another name and attach that"
                );
            }
        }
        // Deleted first, so that a restore that fails leaves no descriptor
        // naming a half-written flat file.
        for (path, shown) in &existing {
            session
                .delete_file(&datacenter_ref, &t.datastore, path)
                .with_context(|| format!("delete {shown} (--force)"))?;
            ui.warn(format!("deleted the existing {shown} (--force)"));
        }
    }
    if let Some(dir) = t.folder() {
        if session
            .make_directory(&datacenter_ref, &t.datastore, dir)
            .with_context(|| format!("make folder [{}] {dir}", t.datastore))?
        {
            ui.detail(1, format!("made folder [{}] {dir}", t.datastore));
        }
    }
    if disk % crate::target::vmdk::SECTOR_BYTES != 0 {
        ui.warn(format!(
            "the disk is {disk} bytes, not whole 512-byte sectors: the VMDK holds {} bytes, the last {} zeros",
            flat_bytes(disk),
            flat_bytes(disk) - disk
        ));
    }
    ui.detail(
        1,
        format!(
            "restoring snapshot {} of '{}' ({}, {}) to {descriptor_path}",
            id.short(),
            entry.meta.source,
            human_bytes(disk),
            plural(shape.data_blocks, "data block")
        ),
    );
    // A long upload makes no SOAP calls: keep the session from expiring
    // before the steps after it (size check, descriptor, cleanup).
    let alive = session.keep_alive(
        datacenter_ref.clone(),
        crate::source::vmware::workflow::KEEP_ALIVE_EVERY,
    );
    let upload = Upload {
        session: &session,
        target: t,
        datacenter: &datacenter,
        datacenter_ref: &datacenter_ref,
    };
    let bar = ui.progress("restore", true);
    let flat = upload.flat(repo, reader, &bar);
    bar.finish();
    for line in repo.take_notices() {
        ui.warn(line);
    }
    let summary = flat.with_context(|| {
        format!("restore of snapshot {id} to {flat_path} failed; no descriptor was written")
    })?;
    let seed = blake3::hash(format!("{id} {descriptor_path}").as_bytes());
    let mut disk_id = [0u8; 16];
    disk_id.copy_from_slice(&seed.as_bytes()[..16]);
    // The host must hold the whole flat file before the descriptor makes
    // it a disk.
    let whole = match session.file_size(&datacenter, &t.datastore, &t.flat()) {
        Ok(Some(n)) if n == flat_bytes(disk) => Ok(()),
        Ok(n) => Err(VmwareTargetError::Invalid(format!(
            "the host {} after the upload, not {} bytes",
            match n {
                Some(n) => format!("holds {n} bytes of {flat_path}"),
                None => format!("reports no size for {flat_path}"),
            },
            flat_bytes(disk)
        ))),
        Err(e) => Err(VmwareTargetError::Call {
            what: format!("HEAD {flat_path}"),
            error: e,
        }),
    };
    let finished = whole
        .and_then(|()| upload.descriptor(disk, disk_id))
        .and_then(|()| {
            if options.verify {
                verify(
                    session.clone(),
                    t,
                    &datacenter,
                    repo.chain_reader(id)
                        .map_err(|e| VmwareTargetError::Invalid(format!("verify: {e}")))?,
                    repo.codec().hasher(),
                )
            } else {
                Ok(())
            }
        });
    if let Err(e) = finished {
        let cleanup = match upload.remove_both() {
            Ok(()) => format!("{descriptor_path} and {flat_path} were deleted"),
            Err(left) => left,
        };
        return Err(anyhow::Error::new(e).context(format!(
            "restore of snapshot {id} to {descriptor_path} failed; {cleanup}"
        )));
    }
    drop(alive);
    session.logout();
    let done = VmwareDiskRestore {
        target: format!(
            "vmware://{}/datastore/{}/{}",
            t.authority(),
            t.datastore,
            t.descriptor
        ),
        complete: true,
        descriptor_path,
        flat_path,
        flat_bytes: flat_bytes(disk),
        replaced: !existing.is_empty(),
        verified: options.verify,
        summary,
    };
    ui.summary(&done);
    let s = &done.summary;
    ui.info(format!(
        "restored snapshot {} to {} on '{}': {} ({} data blocks, {} zero) in {:.2}s{}; attach it to a VM as an existing disk",
        s.snapshot_id.short(),
        done.descriptor_path,
        t.authority(),
        human_bytes(s.disk_size_bytes),
        s.blocks_data,
        s.blocks_zero,
        s.seconds,
        if done.verified { ", verified" } else { "" }
    ));
    Ok(())
}
