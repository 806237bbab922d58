//! `restore SNAPSHOT --target vmware://[USER@]HOST[:PORT]/datastore/DS/PATH.vmdk`:
//! a new flat VMDK on a vSphere datastore (descriptor and `-flat.vmdk`
//! uploaded with `PUT /folder`), which an administrator attaches to a VM.
//! The bytes come from the one coalescing engine through `target::vmware`;
//! nothing is materialised locally. Existing files are never replaced
//! unless `--force`; after any failure neither new file is left behind,
//! and a `--force` replacement that fails leaves the old disk as it was.

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
    let mut target = options.target.clone();
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
    let datacenter_ref = session
        .datacenter(&datacenter)
        .with_context(|| format!("find datacenter '{datacenter}'"))?;
    // Nothing is replaced unless asked, and never a VM's disk.
    let mut replacing: Option<Replacement> = None;
    let mut existing = Vec::new();
    for (path, shown) in [
        (t.descriptor.clone(), descriptor_path.clone()),
        (t.flat(), t.datastore_path(&t.flat())),
    ] {
        let size = session
            .file_size(&datacenter, &t.datastore, &path)
            .with_context(|| format!("look for {shown}"))?;
        if let Some(size) = size {
            existing.push((path, shown.clone(), size));
        }
    }
    if !existing.is_empty() {
        let shown: Vec<&str> = existing.iter().map(|(_, s, _)| s.as_str()).collect();
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
        for (path, shown, _) in &existing {
            if let Some(vm) = disk_owner(&vms, &t.datastore, path) {
                bail!(
                    "{shown} is a disk of VM '{vm}': a restore never replaces a VM's disk, even with --force; restore under another name and attach that"
                );
            }
        }
        replacing = Some(plan_replacement(
            &session,
            &datacenter,
            &mut target,
            &existing,
            &vms,
        )?);
    }
    let t = &target;
    let flat_path = t.datastore_path(&t.flat());
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
    let summary = flat.with_context(|| match &replacing {
        None => {
            format!("restore of snapshot {id} to {flat_path} failed; no descriptor was written")
        }
        Some(_) => format!(
            "restore of snapshot {id} to {flat_path} failed; the old disk was left as it was"
        ),
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
    // Whether the descriptor was sent (a failure after that puts an old
    // one back).
    let descriptor_sent = std::cell::Cell::new(false);
    let finished = whole
        .and_then(|()| {
            descriptor_sent.set(true);
            upload.descriptor(disk, disk_id)
        })
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
        let cleanup = match &replacing {
            None => match upload.remove_both() {
                Ok(()) => format!("{descriptor_path} and {flat_path} were deleted"),
                Err(left) => left,
            },
            Some(old) => old.roll_back(&upload, descriptor_sent.get()),
        };
        return Err(anyhow::Error::new(e).context(format!(
            "restore of snapshot {id} to {descriptor_path} failed; {cleanup}"
        )));
    }
    // The new disk is whole (and read back with --verify): only now do the
    // old disk's data files go.
    if let Some(old) = &replacing {
        for path in &old.data_files {
            let shown = t.datastore_path(path);
            match session.delete_file(&datacenter_ref, &t.datastore, path) {
                Ok(()) => ui.info(format!("replaced: deleted the old {shown} (--force)")),
                Err(e) => ui.warn(format!(
                    "replaced {descriptor_path}, but the old {shown} could not be deleted ({e}): the new descriptor does not name it; delete it by hand"
                )),
            }
        }
        if let Some(why) = &old.left_alone {
            ui.warn(format!(
                "replaced {descriptor_path}; the old descriptor's data files were left in place ({why})"
            ));
        }
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

/// What a `--force` restore replaces, kept until the new disk is whole:
/// the old descriptor's bytes (put back if the replacement fails after it
/// was overwritten) and the old disk's data files (deleted once it
/// succeeds).
struct Replacement {
    descriptor: Option<Vec<u8>>,
    data_files: Vec<String>,
    /// Files the old descriptor names that are not deleted (not named as a
    /// restore names its flat files, or not a flat descriptor at all).
    left_alone: Option<String>,
}

/// Tries for a flat file name of a replacement that names no file yet.
const NEW_NAME_TRIES: usize = 4;

/// The names a restore gives a descriptor's flat file: `STEM-flat.vmdk`,
/// or `STEM-XXXXXXXX-flat.vmdk` (8 lower-case hex digits) for a
/// replacement. Only such files are ever deleted as an old disk's data.
fn restore_flat_name(stem: &str, name: &str) -> bool {
    name == format!("{stem}-flat.vmdk")
        || crate::source::vmware::inventory::is_replacement_flat(stem, name)
}

/// Plans a `--force` replacement of the `existing` files (none of them a
/// VM's disk, as `vms` tell): the old descriptor is read and kept, the old
/// disk's data files noted (each checked against `vms` too), and `target`
/// gets a flat file name no file has (`NAME-XXXXXXXX-flat.vmdk`), so that
/// the old disk stands untouched until the new one is whole.
fn plan_replacement(
    session: &crate::source::vmware::client::Session,
    datacenter: &str,
    target: &mut VmwareTarget,
    existing: &[(String, String, u64)],
    vms: &[crate::source::vmware::inventory::VmwareVm],
) -> Result<Replacement> {
    let t = target.clone();
    let stem = t.stem().to_string();
    let max = crate::target::vmdk::MAX_DESCRIPTOR_BYTES as u64;
    let descriptor = match existing.iter().find(|(p, _, _)| *p == t.descriptor) {
        Some((path, shown, size)) => {
            if *size > max {
                bail!(
                    "{shown} is {size} bytes, not a descriptor a restore can keep while it writes the new disk (at most {max}); restore under another name, or delete it first"
                );
            }
            Some(
                session
                    .read_file(datacenter, &t.datastore, path, max)
                    .with_context(|| {
                        format!("read the existing {shown}, to keep it until the new disk is whole")
                    })?,
            )
        }
        None => None,
    };
    let mut data_files: Vec<String> = existing
        .iter()
        .filter(|(p, _, _)| *p != t.descriptor)
        .map(|(p, _, _)| p.clone())
        .collect();
    let mut left_alone = None;
    if let Some(bytes) = &descriptor {
        match crate::target::vmdk::parse_flat_descriptor(bytes) {
            Ok(d) if restore_flat_name(&stem, &d.extent_file) => {
                let path = t.beside(&d.extent_file);
                if !data_files.iter().any(|f| f.eq_ignore_ascii_case(&path))
                    && !path.eq_ignore_ascii_case(&t.descriptor)
                    && session
                        .file_size(datacenter, &t.datastore, &path)
                        .with_context(|| format!("look for {}", t.datastore_path(&path)))?
                        .is_some()
                {
                    data_files.push(path);
                }
            }
            Ok(d) => {
                left_alone = Some(format!(
                    "it names '{}', not a flat file a restore of {stem}.vmdk writes; that file is left in place",
                    d.extent_file
                ))
            }
            Err(e) => {
                left_alone = Some(format!(
                    "it is not a flat descriptor cbtvault reads ({e}); the files it names are left in place"
                ))
            }
        }
    }
    for path in &data_files {
        if let Some(vm) = disk_owner(vms, &t.datastore, path) {
            bail!(
                "{} is a data file of VM '{vm}': a restore never replaces a VM's disk, even with --force; restore under another name and attach that",
                t.datastore_path(path)
            );
        }
    }
    for _ in 0..NEW_NAME_TRIES {
        let name = format!("{stem}-{:08x}-flat.vmdk", rand::random::<u32>());
        let path = t.beside(&name);
        let taken = session
            .file_size(datacenter, &t.datastore, &path)
            .with_context(|| format!("look for {}", t.datastore_path(&path)))?
            .is_some();
        if !taken && !data_files.iter().any(|f| f.eq_ignore_ascii_case(&path)) {
            target.flat_file = Some(name);
            return Ok(Replacement {
                descriptor,
                data_files,
                left_alone,
            });
        }
    }
    bail!(
        "found no free name beside {} for the new flat file after {NEW_NAME_TRIES} tries",
        t.datastore_path(&t.descriptor)
    )
}

impl Replacement {
    /// After a failed replacement: the new flat file deleted, and the old
    /// descriptor put back when `overwritten` (the new one was sent), or
    /// the new one deleted when there was none. Says what was done, or
    /// what is left; when the old descriptor could not be put back, its
    /// exact bytes are saved to a local file (this process holds the only
    /// copy left) and the message says where, and where they go.
    fn roll_back(&self, upload: &Upload<'_>, overwritten: bool) -> String {
        let t = upload.target;
        let flat = upload.remove_partial(&t.flat());
        let descriptor = match (&self.descriptor, overwritten) {
            (Some(bytes), true) => upload.put_descriptor(bytes.clone()).map_err(|e| {
                let copy = match keep_locally(bytes) {
                    Ok(path) => format!("its exact bytes are saved in {path:?}"),
                    Err(saving) => format!(
                        "it could not be saved locally either ({saving}); its text, with every byte but newline and tab that is not printable ASCII (and \\, ', \") escaped as \\xNN, \\\\, \\' or \\\": {}",
                        printable(bytes)
                    ),
                };
                let new_flat = if flat.is_ok() {
                    "the new data file, deleted"
                } else {
                    "the new data file"
                };
                format!(
                    "the old descriptor could not be put back ({e}): {} may name {} ({new_flat}); the old disk's data files were not touched; write the old descriptor ({} bytes) back to {}: {copy}",
                    t.datastore_path(&t.descriptor),
                    t.datastore_path(&t.flat()),
                    bytes.len(),
                    t.datastore_path(&t.descriptor),
                )
            }),
            (Some(_), false) => Ok(()),
            (None, _) => upload.remove_partial(&t.descriptor),
        };
        let old = "the old disk was left as it was";
        match (flat, descriptor) {
            (Ok(()), Ok(())) => format!(
                "the new {} was deleted and {old}",
                t.datastore_path(&t.flat())
            ),
            (Err(a), Ok(())) => format!("{old}; {a}"),
            (Ok(()), Err(a)) => a,
            (Err(a), Err(b)) => format!("{a}; {b}"),
        }
    }
}

/// Saves an old descriptor that could not be put back, byte for byte, in
/// a new file of the temporary directory that only the user can read (a
/// descriptor may hold an encrypted disk's key safe); returns its path.
fn keep_locally(bytes: &[u8]) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::temp_dir().join(format!(
        "cbtvault-old-descriptor-{:016x}.vmdk",
        rand::random::<u64>()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    match file.write_all(bytes).and_then(|()| file.sync_all()) {
        Ok(()) => Ok(path),
        Err(e) => {
            // A partial copy helps nobody and may hold a key safe.
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// A descriptor's bytes for a message when they could not be saved: each
/// byte that is printable ASCII (but `\`, `'` and `"`), newline or tab as
/// it is, every other one escaped (`\xNN`, `\\`, ...), so the text can
/// be turned back into the exact bytes and a datastore's file cannot
/// drive the terminal.
fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'\n' | b'\t' => char::from(b).to_string(),
            b => std::ascii::escape_default(b).to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{keep_locally, printable, restore_flat_name};

    /// A descriptor that could not be put back is kept byte for byte, for
    /// the user only; shown as text, control characters are escaped.
    #[test]
    fn an_old_descriptor_is_kept_exactly_and_shown_harmlessly() {
        use std::os::unix::fs::PermissionsExt;
        let bytes = b"# Disk DescriptorFile\nRW 8 VMFS \"caf\xe9-flat.vmdk\"\n";
        let path = keep_locally(bytes).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(printable(b"a\n\tb"), "a\n\tb");
        assert_eq!(printable(b"x\x1b[2Jy\r"), "x\\x1b[2Jy\\r");
        assert_eq!(printable(b"caf\xe9 \"\\"), "caf\\xe9 \\\"\\\\");
    }

    /// Only the names a restore gives flat files are deleted as an old
    /// disk's data.
    #[test]
    fn only_flat_names_a_restore_writes_are_old_data_files() {
        for ok in ["r1-flat.vmdk", "r1-0a1b2c3d-flat.vmdk"] {
            assert!(restore_flat_name("r1", ok), "{ok}");
        }
        for no in [
            "r1.vmdk",
            "db-flat.vmdk",
            "r1-0A1B2C3D-flat.vmdk",
            "r1-0a1b2c3-flat.vmdk",
            "r1-0a1b2c3d0-flat.vmdk",
            "r1-ctk.vmdk",
            "r1-0a1b2c3g-flat.vmdk",
            "r1flat.vmdk",
            "r10-flat.vmdk",
        ] {
            assert!(!restore_flat_name("r1", no), "{no}");
        }
    }
}
