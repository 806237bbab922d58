//! Parsed arguments -> validated options: every check that needs no I/O
//! happens here, before any work starts, and the commands receive plain
//! `*Options` values that know nothing of clap.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::{
    BackupArgs, CatArgs, CheckArgs, DiffArgs, DumpArgs, FilterArgs, FindArgs, ForgetArgs, InitArgs,
    LsArgs, NbdArgs, PruneArgs, RestoreArgs, ServeArgs, SnapshotsArgs, TagArgs, UnlockArgs,
    XenArgs, XenConnectArgs,
};
#[cfg(feature = "sim")]
use super::{DemoArgs, SimArgs};
use crate::commands::backup::{
    BackupOptions, BackupSource, NbdOptions, SnapshotOptions, XenOptions,
};
use crate::commands::check::CheckOptions;
#[cfg(feature = "sim")]
use crate::commands::demo::DemoOptions;
use crate::commands::files::{DumpOptions, FileRestoreTarget, FindOptions, LsOptions};
use crate::commands::forget::{ForgetOptions, Selection};
use crate::commands::forget_policy::GroupBy;
use crate::commands::inspect::{CatOptions, DiffOptions, UnlockOptions};
use crate::commands::restore::{
    LocalOptions, RestoreOptions, RestoreTarget, VmwareRestoreOptions, XenRestoreOptions,
};
use crate::commands::serve::ServeOptions;
#[cfg(feature = "sim")]
use crate::commands::sim::SimHostOptions;
use crate::commands::snapshots::SnapshotsOptions;
use crate::commands::tag::{TagOptions, TagSelection};
use crate::commands::SnapshotFilter;
use crate::repo::backup::plan::ParentRequest;
use crate::repo::check::DataSubset;
use crate::repo::prune::{MaxUnused, PruneOptions};
use crate::repo::tag::TagChange;
use crate::repo::InitOptions;
use crate::source::nbd::NbdLimits;
use crate::source::xenapi::XenUrl;
use crate::target::xen::{TargetKind, XenTarget};
use nbd::NbdUri;

impl From<&FilterArgs> for SnapshotFilter {
    fn from(a: &FilterArgs) -> Self {
        SnapshotFilter {
            source: a.source.clone(),
            tags: a.tags.clone(),
            vm: a.vm.clone(),
        }
    }
}

impl From<&XenArgs> for XenOptions {
    fn from(a: &XenArgs) -> Self {
        XenOptions {
            enable_cbt: !a.no_enable_cbt,
            keep_snapshot_data: a.keep_snapshot_data,
            ..XenOptions::from(&a.connect)
        }
    }
}

/// Connection options alone (forget's host side): nothing is enabled or
/// kept, as nothing is backed up.
impl From<&XenConnectArgs> for XenOptions {
    fn from(a: &XenConnectArgs) -> Self {
        XenOptions {
            user: a.user.clone(),
            password_file: a.password_file.clone(),
            ca_file: a.ca_file.clone(),
            fingerprint: a.fingerprint.clone(),
            insecure: a.insecure,
            enable_cbt: false,
            keep_snapshot_data: false,
        }
    }
}

impl TryFrom<&NbdArgs> for NbdOptions {
    type Error = anyhow::Error;

    fn try_from(a: &NbdArgs) -> Result<Self> {
        Ok(NbdOptions {
            tls_ca: a.tls_ca.clone(),
            tls_cert_pin: a.tls_cert_pin.clone(),
            tls_name: a.tls_name.clone(),
            tls_client_cert: a.tls_client_cert.clone(),
            tls_client_key: a.tls_client_key.clone(),
            connections: a.nbd_connections.max(1),
            limits: nbd_limits(a)?,
        })
    }
}

/// `--max-disk-size` and `--io-timeout`.
fn nbd_limits(a: &NbdArgs) -> Result<NbdLimits> {
    let max_disk_size_bytes = parse_size(&a.max_disk_size)
        .with_context(|| format!("--max-disk-size '{}'", a.max_disk_size))?;
    if max_disk_size_bytes == 0 {
        bail!("--max-disk-size must be more than 0");
    }
    if a.io_timeout == 0 {
        bail!("--io-timeout must be at least 1 second");
    }
    Ok(NbdLimits {
        max_disk_size_bytes,
        io_timeout: Duration::from_secs(a.io_timeout),
    })
}

/// A byte count: digits, then optionally K, M, G, T or P (powers of 1024,
/// also written KiB, ...; B alone is bytes).
fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| anyhow!("not a size: give bytes, or a number with K, M, G, T or P"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        "P" | "PIB" => 50,
        other => bail!("unknown unit '{other}': use K, M, G, T or P"),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| anyhow!("more than 2^64 bytes"))
}

pub fn init(a: &InitArgs) -> Result<InitOptions> {
    if !(1..=22).contains(&a.compression_level) {
        bail!("--compression-level {} outside 1..=22", a.compression_level);
    }
    Ok(InitOptions {
        block_size: a.block_size,
        compression_level: a.compression_level,
        pack_size_target_bytes: a.pack_size_mib.max(1) << 20,
        // Set by the dispatch, which knows the location and the password.
        encryption: None,
    })
}

/// Argon2id parameters from `--kdf-memory` / `--kdf-iterations`, checked
/// against the format's limits.
pub fn kdf(a: &super::KdfArgs) -> Result<crate::format::key::KdfParams> {
    let p = crate::format::key::KdfParams {
        memory_kib: a.kdf_memory.saturating_mul(1024),
        iterations: a.kdf_iterations,
        parallelism: 1,
    };
    if p.check().is_err() {
        bail!(
            "--kdf-memory {} MiB must be 8..=4096 and --kdf-iterations {} must be 1..=64",
            a.kdf_memory,
            a.kdf_iterations
        );
    }
    Ok(p)
}

fn is_nbd_uri(s: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|p| s.starts_with(p))
}

pub fn backup(a: &BackupArgs) -> Result<BackupOptions> {
    if a.full && a.changed_blocks.is_some() {
        bail!("--full reads every block; it cannot be combined with --changed-blocks");
    }
    let parent = match (&a.parent, a.full) {
        (_, true) => ParentRequest::NoParent,
        (Some(query), false) => ParentRequest::Named(query.clone()),
        (None, false) => ParentRequest::Newest,
    };
    let snapshot = SnapshotOptions {
        parent,
        full_every: (a.full_every > 0).then_some(a.full_every),
        tags: a.tags.clone(),
        strict: a.strict,
        concurrent: 1,
        defer_commit: false,
    };
    let source = if crate::source::vmware::VmwareUrl::is_vmware(&a.source) {
        if a.changed_blocks.is_some() || a.dirty_bitmap.is_some() || a.parent.is_some() {
            bail!("--changed-blocks, --dirty-bitmap and --parent do not apply to vmware:// sources: the host tracks changes");
        }
        if a.source_id.is_some() {
            bail!("--source-id does not apply to vmware:// sources: disks are identified by host, VM and device key");
        }
        BackupSource::Vmware {
            url: crate::source::vmware::VmwareUrl::parse(&a.source)?,
            vmware: crate::commands::backup_vmware::VmwareOptions {
                enable_cbt: !a.xen.no_enable_cbt,
                quiesce: a.vmware.quiesce,
                data_command: a.vmware.data_command.clone(),
                ..vmware_options(&a.xen.connect, &a.vmware.connect)
            },
        }
    } else if XenUrl::is_xen(&a.source) {
        if a.changed_blocks.is_some() || a.dirty_bitmap.is_some() || a.parent.is_some() {
            bail!("--changed-blocks, --dirty-bitmap and --parent do not apply to xen:// sources: the host tracks changes");
        }
        if a.source_id.is_some() {
            bail!("--source-id does not apply to xen:// sources: disks are identified by host and VDI uuid");
        }
        if a.nbd.tls_client_cert.is_some() {
            bail!("--tls-client-cert and --tls-client-key apply to NBD sources; xen:// sources use the TLS settings the host returns");
        }
        BackupSource::Xen {
            url: XenUrl::parse(&a.source)?,
            xen: (&a.xen).into(),
            nbd_connections: a.nbd.nbd_connections.max(1),
            nbd_limits: nbd_limits(&a.nbd)?,
        }
    } else if is_nbd_uri(&a.source) {
        if a.changed_blocks.is_some() {
            bail!("--changed-blocks applies to image files; for NBD use --dirty-bitmap");
        }
        BackupSource::Nbd {
            uri: NbdUri::parse(&a.source)?,
            text: a.source.clone(),
            dirty_bitmap: a.dirty_bitmap.clone(),
            nbd: (&a.nbd).try_into()?,
            source_id: a.source_id.clone(),
        }
    } else {
        if a.dirty_bitmap.is_some() {
            bail!("--dirty-bitmap applies to NBD sources");
        }
        BackupSource::File {
            path: a.source.clone().into(),
            changed_blocks: a.changed_blocks.clone(),
            source_id: a.source_id.clone(),
        }
    };
    Ok(BackupOptions { source, snapshot })
}

/// `--mode`: octal permission bits; 600 when not given.
fn parse_mode(text: Option<&str>) -> Result<u32> {
    let Some(text) = text else { return Ok(0o600) };
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            anyhow::anyhow!("--mode '{text}': expected octal permission bits, e.g. 600 or 0640")
        })
}

pub fn restore(a: &RestoreArgs) -> Result<RestoreOptions> {
    let at = match &a.at {
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&chrono::Utc))
                .with_context(|| {
                    format!("--at '{text}': expected RFC 3339, e.g. 2026-11-21T12:00:00Z")
                })?,
        ),
        None => None,
    };
    let text = a.target.to_string_lossy();
    let target = if !a.include.is_empty() {
        if XenUrl::is_xen(&text) || text == "-" {
            bail!("--include restores files into a directory: --target must be a directory, not '{text}'");
        }
        if a.allow_damaged || a.mode.is_some() || a.force || a.verify || a.new_vm {
            bail!("--allow-damaged, --mode, --force, --verify and --new-vm apply to whole-disk restores, not to --include");
        }
        let includes = a
            .include
            .iter()
            .map(|i| crate::files::restore::Include::parse(i))
            .collect::<Result<Vec<_>, _>>()
            .context("--include")?;
        RestoreTarget::Files(FileRestoreTarget {
            dir: a.target.clone(),
            includes,
            overwrite: a.overwrite,
        })
    } else if crate::source::vmware::VmwareUrl::is_vmware(&text) {
        if a.allow_damaged || a.mode.is_some() || a.new_vm || a.overwrite {
            bail!("--allow-damaged, --mode, --new-vm and --overwrite do not apply to vmware:// targets (--force deletes and replaces existing files)");
        }
        if a.import_format != "auto" {
            bail!("--import-format applies to xen:// targets only");
        }
        RestoreTarget::Vmware(VmwareRestoreOptions {
            target: crate::target::vmware::VmwareTarget::parse(&text)?,
            vmware: vmware_options(&a.xen.connect, &a.vmware),
            force: a.force,
            verify: a.verify,
        })
    } else if XenUrl::is_xen(&text) {
        if a.allow_damaged || a.mode.is_some() {
            bail!("--allow-damaged and --mode apply to file, block device and stdout targets only");
        }
        let target = XenTarget::parse(&text)?;
        if a.new_vm && target.kind != TargetKind::Sr {
            bail!("--new-vm needs an SR target: xen://HOST/sr/UUID");
        }
        if !["auto", "raw", "chunked"].contains(&a.import_format.as_str()) {
            bail!(
                "--import-format '{}': expected auto, raw or chunked",
                a.import_format
            );
        }
        RestoreTarget::Xen(XenRestoreOptions {
            target,
            xen: (&a.xen).into(),
            force: a.force,
            verify: a.verify,
            new_vm: a.new_vm,
            import_format: a.import_format.clone(),
        })
    } else {
        if a.verify || a.new_vm {
            bail!(
                "--verify applies to xen:// and vmware:// targets, --new-vm to xen:// targets only"
            );
        }
        RestoreTarget::Local {
            path: a.target.clone(),
            options: LocalOptions {
                restore: crate::repo::restore::RestoreOptions {
                    allow_damaged: a.allow_damaged,
                },
                overwrite: a.overwrite,
                mode: parse_mode(a.mode.as_deref())?,
                force_size: a.force,
            },
        }
    };
    Ok(RestoreOptions {
        snapshot: a.snapshot.clone(),
        filter: (&a.filter).into(),
        at,
        target,
    })
}

pub fn ls(a: &LsArgs) -> Result<LsOptions> {
    Ok(LsOptions {
        snapshot: a.snapshot.clone(),
        filter: (&a.filter).into(),
        path: a
            .path
            .as_deref()
            .map(crate::files::PathSpec::parse)
            .transpose()?,
        long: a.long,
        recursive: a.recursive,
    })
}

pub fn dump(a: &DumpArgs) -> Result<DumpOptions> {
    Ok(DumpOptions {
        snapshot: a.snapshot.clone(),
        filter: (&a.filter).into(),
        path: crate::files::PathSpec::parse(&a.path)?,
    })
}

pub fn find(a: &FindArgs) -> Result<FindOptions> {
    let (pattern, snapshots) = a
        .args
        .split_last()
        .context("find needs SNAPSHOT... PATTERN")?;
    Ok(FindOptions {
        snapshots: snapshots.to_vec(),
        filter: (&a.filter).into(),
        pattern: crate::commands::files::FindPattern::parse(pattern)?,
    })
}

/// `N%` or `n/t`.
fn parse_subset(s: &str) -> Result<DataSubset> {
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .with_context(|| format!("'{s}' is not a percentage"))?;
        if !(p > 0.0 && p <= 100.0) {
            bail!("--read-data-subset '{s}': percentage must be in (0, 100]");
        }
        return Ok(DataSubset::Percent(p));
    }
    if let Some((n, t)) = s.split_once('/') {
        let n: u32 = n
            .trim()
            .parse()
            .with_context(|| format!("'{s}': n is not a number"))?;
        let t: u32 = t
            .trim()
            .parse()
            .with_context(|| format!("'{s}': t is not a number"))?;
        if n == 0 || t == 0 || n > t {
            bail!("--read-data-subset '{s}': need 1 <= n <= t");
        }
        return Ok(DataSubset::Part { n, t });
    }
    bail!("--read-data-subset '{s}': use N% or n/t")
}

/// `--max-unused`: `N%`, `unlimited` or a size.
fn max_unused(v: &str) -> Result<MaxUnused> {
    let v = v.trim();
    Ok(if v.ends_with('%') || v.eq_ignore_ascii_case("unlimited") {
        MaxUnused::parse(v)?
    } else {
        MaxUnused::Bytes(parse_size(v).with_context(|| format!("--max-unused '{v}'"))?)
    })
}

pub fn prune(a: &PruneArgs) -> Result<PruneOptions> {
    Ok(PruneOptions {
        max_unused: max_unused(&a.max_unused)?,
        dry_run: a.dry_run,
    })
}

pub fn snapshots(a: &SnapshotsArgs) -> Result<SnapshotsOptions> {
    Ok(SnapshotsOptions {
        filter: SnapshotFilter::from(&a.filter),
        group_by: a
            .group_by
            .as_deref()
            .map(GroupBy::parse)
            .transpose()
            .map_err(|e| anyhow!(e))?,
    })
}

pub fn forget(a: &ForgetArgs) -> Result<ForgetOptions> {
    let (policy, group_by) = a.policy.to_policy()?;
    let selection = match (a.snapshots.is_empty(), policy.is_empty()) {
        (false, true) => {
            if a.filter.source.is_some() || !a.filter.tags.is_empty() || a.filter.vm.is_some() {
                bail!("--source, --tag and --vm select snapshots for a policy; with snapshot ids, name exactly the snapshots to remove");
            }
            Selection::Ids(a.snapshots.clone())
        }
        (true, false) => Selection::Policy { policy, group_by },
        (false, false) => bail!(
            "give either snapshot ids or a --keep-* policy, not both (forget removes exactly the named snapshots, or what the policy does not keep)"
        ),
        (true, true) => bail!(
            "nothing to forget: name snapshot ids, or give a policy (--keep-last, --keep-daily, --keep-within, --keep-tag, ...)"
        ),
    };
    Ok(ForgetOptions {
        selection,
        filter: SnapshotFilter::from(&a.filter),
        dry_run: a.dry_run,
        prune: if a.prune {
            Some(PruneOptions {
                max_unused: max_unused(&a.max_unused)?,
                dry_run: a.dry_run,
            })
        } else {
            None
        },
        no_host: a.no_host,
        xen: XenOptions::from(&a.xen),
        per_host: Default::default(),
    })
}

pub fn tag(a: &TagArgs) -> Result<TagOptions> {
    let filter = SnapshotFilter::from(&a.filter);
    let selection = match (a.snapshots.is_empty(), filter.is_empty()) {
        (false, true) => TagSelection::Ids(a.snapshots.clone()),
        (true, false) => TagSelection::Filter(filter),
        (false, false) => bail!(
            "give either snapshot ids or --source/--tag/--vm, not both (tag changes exactly the named snapshots, or every one the filters select)"
        ),
        (true, true) => bail!(
            "no snapshots named: give snapshot ids, or select with --source, --tag or --vm"
        ),
    };
    for t in a.add.iter().chain(&a.remove).chain(a.set.iter().flatten()) {
        if t.is_empty() {
            bail!("a tag cannot be empty");
        }
    }
    Ok(TagOptions {
        selection,
        change: TagChange {
            add: a.add.clone(),
            remove: a.remove.clone(),
            set: a.set.clone(),
        },
    })
}

pub fn check(a: &CheckArgs) -> Result<CheckOptions> {
    let read_data = match (&a.read_data_subset, a.read_data) {
        (Some(s), _) => Some(parse_subset(s)?),
        (None, true) => Some(DataSubset::All),
        (None, false) => None,
    };
    Ok(CheckOptions { read_data })
}

pub fn cat(a: &CatArgs) -> Result<CatOptions> {
    match (a.kind.as_str(), &a.id) {
        ("config", _) => Ok(CatOptions::Config),
        ("snapshot", Some(id)) => Ok(CatOptions::Snapshot(id.clone())),
        ("snapshot", None) => bail!("cat snapshot needs a snapshot id"),
        (other, _) => bail!("cannot cat '{other}': use config or snapshot"),
    }
}

pub fn diff(a: &DiffArgs) -> DiffOptions {
    DiffOptions {
        a: a.a.clone(),
        b: a.b.clone(),
        force: a.force,
    }
}

pub fn unlock(a: &UnlockArgs) -> UnlockOptions {
    UnlockOptions {
        remove_all: a.remove_all,
    }
}

pub fn serve(a: &ServeArgs) -> ServeOptions {
    ServeOptions {
        snapshot: a.snapshot.clone(),
        listen: a.listen.clone(),
        socket: a.socket.clone(),
        export_name: a.export_name.clone(),
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        filter: (&a.filter).into(),
    }
}

#[cfg(feature = "sim")]
pub fn demo(a: &DemoArgs) -> DemoOptions {
    DemoOptions {
        size_mib: a.size_mib.max(1),
        dir: a.dir.clone(),
        vmware: a.vmware,
    }
}

#[cfg(feature = "sim")]
pub fn sim(a: &SimArgs) -> SimHostOptions {
    SimHostOptions {
        dir: a.dir.clone(),
        listen: a.listen.clone(),
        nbd_listen: a.nbd_listen.clone(),
        user: a.user.clone(),
        password_env: a.password_env.clone(),
        hostname: a.hostname.clone(),
        disk_mib: a.disk_mib.clone(),
        legacy_host: a.legacy_host,
        log_calls: a.log_calls.clone(),
        vmware: a.vmware,
    }
}

/// The job configuration file `a` names, read and validated.
pub fn job_config(a: &super::ConfigFileArgs) -> Result<crate::jobs::config::Config> {
    use std::io::Read;
    let path = &a.config;
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "open the configuration '{}' (--config FILE or CBTVAULT_CONFIG)",
            path.display()
        )
    })?;
    let mut text = String::new();
    file.take(crate::jobs::config::MAX_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("read '{}'", path.display()))?;
    Ok(crate::jobs::config::parse(&text, path)?)
}

/// vSphere login and datastore options from the shared XenServer-style
/// connection flags and the vSphere ones.
fn vmware_options(
    c: &super::XenConnectArgs,
    v: &super::VmwareConnectArgs,
) -> crate::commands::backup_vmware::VmwareOptions {
    crate::commands::backup_vmware::VmwareOptions {
        user: c.user.clone(),
        password_file: v.vmware_password_file.clone(),
        ca_file: c.ca_file.clone(),
        fingerprint: c.fingerprint.clone(),
        insecure: c.insecure,
        enable_cbt: true,
        quiesce: false,
        datacenter: v.datacenter.clone(),
        data_command: None,
        exclude_keys: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn backup_of(args: &[&str]) -> Result<BackupOptions> {
        let cli =
            super::super::Cli::try_parse_from(["cbtvault", "backup"].iter().chain(args.iter()))
                .expect("clap accepts it");
        match cli.command {
            super::super::Command::Backup(a) => backup(&a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn backup_flags_that_do_not_fit_the_source_are_refused() {
        for args in [
            &["disk.img", "--dirty-bitmap", "b"][..],
            &["nbd://h/e", "--changed-blocks", "f"],
            &["xen://h/vdi/u", "--parent", "abc"],
            &["xen://h/vdi/u", "--source-id", "x"],
            &["disk.img", "--full", "--changed-blocks", "f"],
        ] {
            assert!(backup_of(args).is_err(), "{args:?} was accepted");
        }
        let every = |args: &[&str]| backup_of(args).unwrap().snapshot.full_every;
        assert_eq!(every(&["disk.img"]), Some(64));
        assert_eq!(every(&["disk.img", "--full-every", "8"]), Some(8));
        assert_eq!(every(&["disk.img", "--full-every", "0"]), None);
        let o = backup_of(&["disk.img", "--full"]).unwrap();
        assert_eq!(o.snapshot.parent, ParentRequest::NoParent);
        assert!(matches!(o.source, BackupSource::File { .. }));
    }

    #[test]
    fn max_disk_size_and_io_timeout_reach_nbd_and_xen_sources() {
        assert_eq!(parse_size("64T").unwrap(), 64 << 40);
        assert_eq!(parse_size("1023KiB").unwrap(), 1023 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "T", "12X", "1.5G", "-1", "99999999P"] {
            assert!(parse_size(bad).is_err(), "'{bad}' was accepted");
        }
        let o = backup_of(&["nbd://h/e"]).unwrap();
        let BackupSource::Nbd { nbd, .. } = o.source else {
            panic!("not an NBD source")
        };
        assert_eq!(nbd.limits, NbdLimits::default());
        assert_eq!(nbd.limits.max_disk_size_bytes, 64 << 40);
        assert_eq!(nbd.limits.io_timeout, Duration::from_secs(60));
        let args = ["--max-disk-size", "2G", "--io-timeout", "5"];
        let o = backup_of(
            &[
                &["xen://h/vdi/6f4a1c2e-3b5d-4e6f-8a9b-0c1d2e3f4a5b"][..],
                &args,
            ]
            .concat(),
        )
        .unwrap();
        let BackupSource::Xen { nbd_limits, .. } = o.source else {
            panic!("not a xen source")
        };
        assert_eq!(nbd_limits.max_disk_size_bytes, 2 << 30);
        assert_eq!(nbd_limits.io_timeout, Duration::from_secs(5));
        for bad in [["--io-timeout", "0"], ["--max-disk-size", "0"]] {
            assert!(backup_of(&[&["nbd://h/e"][..], &bad].concat()).is_err());
        }
    }

    fn restore_of(args: &[&str]) -> Result<RestoreOptions> {
        let cli =
            super::super::Cli::try_parse_from(["cbtvault", "restore"].iter().chain(args.iter()))
                .expect("clap accepts it");
        match cli.command {
            super::super::Command::Restore(a) => restore(&a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn restore_flags_that_do_not_fit_the_target_are_refused() {
        let vdi = "xen://h/vdi/0b0c7d3e-32f4-4a51-9f4e-7d0c5a8e1b2c";
        let sr = "xen://h/sr/0b0c7d3e-32f4-4a51-9f4e-7d0c5a8e1b2c";
        for (args, says) in [
            (
                &["latest", "--target", "out.img", "--verify"][..],
                "--verify",
            ),
            (&["latest", "--target", "-", "--new-vm"], "--new-vm"),
            (
                &["latest", "--target", vdi, "--allow-damaged"],
                "--allow-damaged",
            ),
            (&["latest", "--target", vdi, "--mode", "600"], "--mode"),
            (&["latest", "--target", vdi, "--new-vm"], "SR target"),
            (
                &["latest", "--target", sr, "--import-format", "zip"],
                "'zip'",
            ),
            (&["latest", "--target", "xen://h/vm/x"], "xen://h/vm/x"),
            (
                &["latest", "--target", "out.img", "--mode", "9"],
                "--mode '9'",
            ),
            (
                &["latest", "--target", "out.img", "--at", "yesterday"],
                "--at 'yesterday'",
            ),
        ] {
            match restore_of(args) {
                Ok(_) => panic!("{args:?} was accepted"),
                Err(e) => assert!(format!("{e:#}").contains(says), "{args:?}: {e:#}"),
            }
        }
    }

    #[test]
    fn restore_options_carry_the_target_and_its_flags() {
        let o = restore_of(&[
            "abc",
            "--target",
            "out.img",
            "--mode",
            "0640",
            "--overwrite",
            "--allow-damaged",
            "--at",
            "2026-11-21T12:00:00Z",
            "--tag",
            "t",
        ])
        .unwrap();
        assert_eq!(o.snapshot, "abc");
        assert_eq!(o.filter.tags, vec!["t".to_string()]);
        assert_eq!(o.at.unwrap().to_rfc3339(), "2026-11-21T12:00:00+00:00");
        match o.target {
            RestoreTarget::Local { path, options } => {
                assert_eq!(path, std::path::PathBuf::from("out.img"));
                assert_eq!(options.mode, 0o640);
                assert!(options.overwrite && options.restore.allow_damaged);
                assert!(!options.force_size);
            }
            RestoreTarget::Xen(_) | RestoreTarget::Vmware(_) | RestoreTarget::Files(_) => {
                panic!("a file target became something else")
            }
        }
        let sr = "xen://h/sr/0b0c7d3e-32f4-4a51-9f4e-7d0c5a8e1b2c";
        let o = restore_of(&["abc", "--target", sr, "--new-vm", "--verify"]).unwrap();
        match o.target {
            RestoreTarget::Xen(x) => {
                assert_eq!(x.target.kind, TargetKind::Sr);
                assert!(x.new_vm && x.verify && !x.force);
                assert_eq!(x.import_format, "auto");
            }
            RestoreTarget::Local { .. } | RestoreTarget::Vmware(_) | RestoreTarget::Files(_) => {
                panic!("a xen target became something else")
            }
        }
        let vmdk = "vmware://esx/datastore/ds1/r/a.vmdk";
        let o = restore_of(&["abc", "--target", vmdk, "--verify", "--datacenter", "dc1"]).unwrap();
        match o.target {
            RestoreTarget::Vmware(v) => {
                assert_eq!(
                    (v.target.datastore.as_str(), v.target.flat().as_str()),
                    ("ds1", "r/a-flat.vmdk")
                );
                assert!(v.verify && !v.force);
                assert_eq!(v.vmware.datacenter.as_deref(), Some("dc1"));
            }
            _ => panic!("a vmware target became something else"),
        }
        for (args, says) in [
            (&["x", "--target", vmdk, "--new-vm"][..], "--new-vm"),
            (
                &["x", "--target", vmdk, "--import-format", "raw"],
                "--import-format",
            ),
            (
                &["x", "--target", "vmware://esx/datastore/ds1/a-flat.vmdk"],
                "descriptor",
            ),
        ] {
            match restore_of(args) {
                Ok(_) => panic!("{args:?} was accepted"),
                Err(e) => assert!(format!("{e:#}").contains(says), "{args:?}: {e:#}"),
            }
        }
        let o = restore_of(&["abc", "--target", "dir", "--include", "p1:/etc/**"]).unwrap();
        match o.target {
            RestoreTarget::Files(f) => {
                assert_eq!(f.dir, std::path::PathBuf::from("dir"));
                assert_eq!(f.includes[0].partition, Some(1));
            }
            _ => panic!("--include became a disk restore"),
        }
        for (args, says) in [
            (&["x", "--target", "-", "--include", "/a"][..], "directory"),
            (&["x", "--target", "d", "--include", "etc"], "--include"),
            (
                &["x", "--target", "d", "--include", "/a", "--mode", "600"],
                "--mode",
            ),
        ] {
            match restore_of(args) {
                Ok(_) => panic!("{args:?} was accepted"),
                Err(e) => assert!(format!("{e:#}").contains(says), "{args:?}: {e:#}"),
            }
        }
    }

    #[test]
    fn read_data_subset_forms() {
        assert_eq!(parse_subset("10%").unwrap(), DataSubset::Percent(10.0));
        assert_eq!(
            parse_subset("2/5").unwrap(),
            DataSubset::Part { n: 2, t: 5 }
        );
        for bad in ["0%", "101%", "0/3", "4/3", "x", "1/x"] {
            assert!(parse_subset(bad).is_err(), "{bad}");
        }
    }
}
