//! The job configuration file (`/etc/cbtvault/cbtvault.toml`), parsed
//! into typed sections and validated. Pure: the caller reads the file and
//! gives its text and name; every error names the file, the line and the
//! key. Unknown keys are errors (a misspelt `concurency` must not quietly
//! mean "the default").
//!
//! Layout (README "Jobs" has a complete example):
//! - `[state]`: `dir`, where run reports are kept.
//! - `[repositories.NAME]`: `location` (a folder or `s3://...`),
//!   `password_file`, and the S3 settings of the command line.
//! - `[hosts.NAME]`: `type = "xenserver"` with `url` (`xen://[USER@]HOST[:PORT]`),
//!   `nbd_connections` and `verify_sr` (a scratch SR the jobs' read-backs
//!   restore into); or `type = "vsphere"` with `url`
//!   (`vmware://[USER@]HOST[:PORT]`) and `datacenter`; both: `user`,
//!   `password_file`, `ca_file`, `fingerprint`, `insecure`; or `type =
//!   "nbd"` with `exports` (URIs), `dirty_bitmap`, `tls_ca`, `tls_cert_pin`,
//!   `tls_name`, `nbd_connections`; all: `max_concurrent` (VMs of one
//!   physical host, or exports of one server, backed up at once).
//! - `[jobs.NAME]`: `repository`, `hosts`, `select` / `exclude` (VM uuids,
//!   name globs, tags, pool hosts, power states), `exclude_disks`,
//!   `concurrency`, `tags`, `schedule` (a hint for the timer), `full_every`,
//!   `enable_cbt`, `retention` (the `forget --keep-*` rules, `prune`),
//!   `offsite` (repositories to copy to), `verify_after` (how many VMs to
//!   read back), `notify` (`webhook`, `on_failure`, `on_completion`,
//!   `metrics_file`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::repo::policy::{Count, Period, Policy, Span};

/// Where the configuration is looked for when none is named.
pub const DEFAULT_PATH: &str = "/etc/cbtvault/cbtvault.toml";
/// Where run reports go when `[state] dir` is not set.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cbtvault";
/// Largest configuration file read.
pub const MAX_BYTES: usize = 1 << 20;

/// A configuration error: the file, where in it, the key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key (dotted path) the error is about, when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if let Some(k) = &self.key {
            write!(f, ": {k}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The parts of a parsed file a later error needs to say where it is.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    text: String,
}

impl Source {
    /// 1-based (line, column) of byte `at`.
    fn place(&self, at: usize) -> (usize, usize) {
        let at = at.min(self.text.len());
        let before = &self.text.as_bytes()[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let column = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
        (line, column)
    }

    /// An error at `span` about `key`.
    pub fn error(
        &self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = self.place(span.start);
        ConfigError {
            file: self.file.clone(),
            line: Some(line),
            column: Some(column),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// An error about `key` with no place of its own (a missing key).
    pub fn error_at_key(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: None,
            column: None,
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub state_dir: PathBuf,
    pub repositories: BTreeMap<String, RepositoryConfig>,
    pub hosts: BTreeMap<String, HostConfig>,
    pub jobs: BTreeMap<String, JobConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    repositories: BTreeMap<String, RepositoryConfig>,
    #[serde(default)]
    hosts: BTreeMap<String, RawHost>,
    #[serde(default)]
    jobs: BTreeMap<String, RawJob>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
}

/// A repository: a local folder or an S3 location, as `-r` takes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub location: String,
    /// The password of an encrypted repository (its first line).
    pub password_file: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    /// `path` or `virtual-host`.
    pub s3_url_style: Option<String>,
    pub s3_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    Xenserver,
    Vsphere,
    Nbd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    #[serde(rename = "type")]
    kind: HostKind,
    url: Option<Spanned<String>>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    fingerprint: Vec<String>,
    #[serde(default)]
    insecure: bool,
    nbd_connections: Option<Spanned<usize>>,
    max_concurrent: Option<Spanned<usize>>,
    verify_sr: Option<Spanned<String>>,
    datacenter: Option<Spanned<String>>,
    exports: Option<Spanned<Vec<Spanned<String>>>>,
    dirty_bitmap: Option<Spanned<String>>,
    tls_ca: Option<Spanned<PathBuf>>,
    tls_cert_pin: Option<Spanned<PathBuf>>,
    tls_name: Option<Spanned<String>>,
}

/// A XenServer pool (or host), a vSphere host or vCenter, or a set of NBD
/// exports to back up from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    pub kind: HostKind,
    /// `xen://[USER@]HOST[:PORT]` or `vmware://[USER@]HOST[:PORT]` (no
    /// object path: jobs select the VMs); empty for NBD hosts.
    pub url: String,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub fingerprint: Vec<String>,
    pub insecure: bool,
    pub nbd_connections: usize,
    /// VMs resident on one physical host backed up at once.
    pub max_concurrent: usize,
    /// A scratch SR (uuid): a job's read-back (`verify_after`) restores
    /// each disk of its VMs from this host into a new VDI there, reads it
    /// back over NBD and destroys it. `None`: the read-back reads the
    /// repository only. XenServer hosts only.
    pub verify_sr: Option<String>,
    /// vSphere: the datacenter of the datastores (default `ha-datacenter`).
    pub datacenter: Option<String>,
    /// NBD: the exports (URIs), each one disk a job may select by its
    /// export name.
    pub exports: Vec<String>,
    /// NBD: back up only what this QEMU dirty bitmap marks.
    pub dirty_bitmap: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert_pin: Option<PathBuf>,
    pub tls_name: Option<String>,
}

/// NBD connections per disk when a host does not say.
pub const DEFAULT_NBD_CONNECTIONS: usize = 4;
/// VMs per physical host at once when a host does not say.
pub const DEFAULT_PER_HOST: usize = 2;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelect {
    /// Every VM (the other criteria are ignored when true).
    #[serde(default)]
    all: bool,
    #[serde(default)]
    vms: Vec<Spanned<String>>,
    #[serde(default)]
    names: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    pool_hosts: Vec<String>,
    #[serde(default)]
    power_states: Vec<PowerState>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExclude {
    #[serde(default)]
    vms: Vec<Spanned<String>>,
    #[serde(default)]
    names: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiskExclude {
    /// VM name glob (default: every VM).
    vm: Option<Spanned<String>>,
    #[serde(default)]
    names: Vec<Spanned<String>>,
    #[serde(default)]
    userdevices: Vec<String>,
}

/// A VM's power state, as XenAPI spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum PowerState {
    Running,
    Halted,
    Paused,
    Suspended,
}

impl PowerState {
    pub fn parse(text: &str) -> Option<PowerState> {
        match text {
            "Running" => Some(PowerState::Running),
            "Halted" => Some(PowerState::Halted),
            "Paused" => Some(PowerState::Paused),
            "Suspended" => Some(PowerState::Suspended),
            _ => None,
        }
    }
}

/// A count rule's value: a number, or "unlimited".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum CountValue {
    Number(i64),
    Text(String),
}

impl CountValue {
    fn text(&self) -> String {
        match self {
            CountValue::Number(n) => n.to_string(),
            CountValue::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_last: Option<Spanned<CountValue>>,
    keep_hourly: Option<Spanned<CountValue>>,
    keep_daily: Option<Spanned<CountValue>>,
    keep_weekly: Option<Spanned<CountValue>>,
    keep_monthly: Option<Spanned<CountValue>>,
    keep_yearly: Option<Spanned<CountValue>>,
    keep_within: Option<Spanned<String>>,
    keep_within_hourly: Option<Spanned<String>>,
    keep_within_daily: Option<Spanned<String>>,
    keep_within_weekly: Option<Spanned<String>>,
    keep_within_monthly: Option<Spanned<String>>,
    keep_within_yearly: Option<Spanned<String>>,
    #[serde(default)]
    keep_tag: Vec<Vec<String>>,
    /// Prune after forgetting (default true).
    prune: Option<bool>,
    max_unused: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    webhook: Option<Spanned<String>>,
    webhook_ca_file: Option<PathBuf>,
    on_failure: Option<String>,
    on_completion: Option<String>,
    metrics_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    repository: Spanned<String>,
    hosts: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    select: RawSelect,
    #[serde(default)]
    exclude: RawExclude,
    #[serde(default)]
    exclude_disks: Vec<RawDiskExclude>,
    concurrency: Option<Spanned<usize>>,
    #[serde(default)]
    tags: Vec<String>,
    schedule: Option<String>,
    full_every: Option<u32>,
    enable_cbt: Option<bool>,
    retention: Option<Spanned<RawRetention>>,
    #[serde(default)]
    offsite: Vec<Spanned<String>>,
    verify_after: Option<usize>,
    #[serde(default)]
    notify: RawNotify,
}

/// Which VMs a job takes: every criterion given must hold (a VM matching
/// any one entry of a list satisfies that list); then the exclusions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub all: bool,
    /// VM uuids (lower case).
    pub vms: Vec<String>,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    /// Physical hosts of the pool (name_label or uuid) the VM runs on.
    pub pool_hosts: Vec<String>,
    pub power_states: Vec<PowerState>,
    pub exclude_vms: Vec<String>,
    pub exclude_names: Vec<String>,
    pub exclude_tags: Vec<String>,
    pub exclude_disks: Vec<DiskExclusion>,
}

/// Disks left out of a VM's backup: of VMs whose name matches `vm` (every
/// VM when None), those whose VDI name matches one of `names` or whose
/// VBD userdevice is one of `userdevices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskExclusion {
    pub vm: Option<String>,
    pub names: Vec<String>,
    pub userdevices: Vec<String>,
}

/// What to keep after a job's backups.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    pub policy: Policy,
    pub prune: bool,
    /// `prune --max-unused` as written (default 10%).
    pub max_unused: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notify {
    /// POSTed the run report as JSON (https only, unless http:// is written).
    pub webhook: Option<String>,
    pub webhook_ca_file: Option<PathBuf>,
    /// Run with `sh -c` when a VM failed (the report's path in
    /// `CBTVAULT_REPORT`).
    pub on_failure: Option<String>,
    /// Run with `sh -c` after every run.
    pub on_completion: Option<String>,
    /// Prometheus text-format metrics for node_exporter's textfile collector.
    pub metrics_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    pub name: String,
    pub repository: String,
    pub hosts: Vec<String>,
    pub selection: Selection,
    /// VMs backed up at once, across hosts.
    pub concurrency: usize,
    /// Tags put on every snapshot (besides `job:NAME`).
    pub tags: Vec<String>,
    pub schedule: Option<String>,
    pub full_every: Option<u32>,
    pub enable_cbt: bool,
    pub retention: Option<Retention>,
    pub offsite: Vec<String>,
    /// VMs whose newest backup is read back and checked after the run.
    pub verify_after: usize,
    pub notify: Notify,
}

/// Largest `concurrency` accepted.
pub const MAX_CONCURRENCY: usize = 64;

impl JobConfig {
    /// The tag every snapshot of this job carries: how retention finds
    /// the job's snapshots.
    pub fn job_tag(&self) -> String {
        format!("job:{}", self.name)
    }
}

/// Parses and validates `text`, the contents of `file`.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let source = Source {
        file: file.to_path_buf(),
        text: text.to_string(),
    };
    if text.len() > MAX_BYTES {
        return Err(ConfigError {
            file: file.to_path_buf(),
            line: None,
            column: None,
            key: None,
            message: format!("larger than {MAX_BYTES} bytes"),
        });
    }
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(s) => {
                let (l, c) = source.place(s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            key: None,
            message: e.message().trim().to_string(),
        }
    })?;
    let mut hosts = BTreeMap::new();
    for (name, h) in raw.hosts {
        hosts.insert(name.clone(), host(&source, &name, h)?);
    }
    let mut jobs = BTreeMap::new();
    for (name, j) in raw.jobs {
        let job = job(&source, &name, j, &raw.repositories, &hosts)?;
        jobs.insert(name, job);
    }
    for (name, r) in &raw.repositories {
        if r.location.trim().is_empty() {
            return Err(source.error_at_key(
                format!("repositories.{name}.location"),
                "is empty: give a folder or s3://BUCKET[/PREFIX]",
            ));
        }
        if let Some(style) = &r.s3_url_style {
            if style != "path" && style != "virtual-host" {
                return Err(source.error_at_key(
                    format!("repositories.{name}.s3_url_style"),
                    format!("'{style}': use 'path' or 'virtual-host'"),
                ));
            }
        }
    }
    Ok(Config {
        state_dir: raw
            .state
            .dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        repositories: raw.repositories,
        hosts,
        jobs,
        source,
    })
}

fn host(source: &Source, name: &str, h: RawHost) -> Result<HostConfig, ConfigError> {
    let key = |k: &str| format!("hosts.{name}.{k}");
    let only = |given: Option<std::ops::Range<usize>>, k: &str, kinds: &[HostKind], what: &str| {
        match given {
            Some(span) if !kinds.contains(&h.kind) => {
                Err(source.error(span, key(k), format!("'{k}' applies to {what} hosts only")))
            }
            _ => Ok(()),
        }
    };
    let (url, exports) = if h.kind == HostKind::Nbd {
        only(
            h.url.as_ref().map(Spanned::span),
            "url",
            &[HostKind::Xenserver, HostKind::Vsphere],
            "xenserver and vsphere (an nbd host lists its export URIs in 'exports')",
        )?;
        let exports = h
            .exports
            .as_ref()
            .map(|e| e.get_ref().clone())
            .unwrap_or_default();
        if exports.is_empty() {
            return Err(source.error_at_key(
                key("exports"),
                "an nbd host needs its export URIs: exports = [\"nbd://HOST[:PORT]/EXPORT\", ...]",
            ));
        }
        for e in &exports {
            ::nbd::NbdUri::parse(e.get_ref())
                .map_err(|err| source.error(e.span(), key("exports"), err.to_string()))?;
        }
        (
            String::new(),
            exports.into_iter().map(Spanned::into_inner).collect(),
        )
    } else {
        let scheme = match h.kind {
            HostKind::Vsphere => "vmware",
            _ => "xen",
        };
        let Some(u) = &h.url else {
            return Err(source.error_at_key(
                key("url"),
                format!("missing: give url = \"{scheme}://[USER@]HOST[:PORT]\""),
            ));
        };
        let url = u.get_ref().trim().to_string();
        let rest = url.strip_prefix(&format!("{scheme}://")).ok_or_else(|| {
            source.error(
                u.span(),
                key("url"),
                format!("'{url}' is not a {scheme}://[USER@]HOST[:PORT] URL"),
            )
        })?;
        if rest.is_empty() || rest.trim_end_matches('/').contains('/') {
            return Err(source.error(
                u.span(),
                key("url"),
                format!("'{url}': name the host only ({scheme}://[USER@]HOST[:PORT]); the jobs select the VMs"),
            ));
        }
        (url, Vec::new())
    };
    use HostKind::{Nbd, Vsphere, Xenserver};
    only(
        h.verify_sr.as_ref().map(Spanned::span),
        "verify_sr",
        &[Xenserver],
        "xenserver",
    )?;
    only(
        h.nbd_connections.as_ref().map(Spanned::span),
        "nbd_connections",
        &[Xenserver, Nbd],
        "xenserver and nbd",
    )?;
    only(
        h.datacenter.as_ref().map(Spanned::span),
        "datacenter",
        &[Vsphere],
        "vsphere",
    )?;
    only(
        h.exports.as_ref().map(Spanned::span),
        "exports",
        &[Nbd],
        "nbd",
    )?;
    only(
        h.dirty_bitmap.as_ref().map(Spanned::span),
        "dirty_bitmap",
        &[Nbd],
        "nbd",
    )?;
    only(
        h.tls_ca.as_ref().map(Spanned::span),
        "tls_ca",
        &[Nbd],
        "nbd",
    )?;
    only(
        h.tls_cert_pin.as_ref().map(Spanned::span),
        "tls_cert_pin",
        &[Nbd],
        "nbd",
    )?;
    only(
        h.tls_name.as_ref().map(Spanned::span),
        "tls_name",
        &[Nbd],
        "nbd",
    )?;
    if h.kind == Nbd
        && (h.password_file.is_some()
            || !h.fingerprint.is_empty()
            || h.ca_file.is_some()
            || h.user.is_some()
            || h.insecure)
    {
        return Err(source.error_at_key(
            key("password_file"),
            "user, password_file, ca_file, fingerprint and insecure apply to xenserver and vsphere hosts; an nbd host's TLS is tls_ca or tls_cert_pin",
        ));
    }
    let positive = |v: &Option<Spanned<usize>>, k: &str, default: usize, max: usize| match v {
        None => Ok(default),
        Some(s) if (1..=max).contains(s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(source.error(
            s.span(),
            key(k),
            format!("{} is out of range: give 1 to {max}", s.get_ref()),
        )),
    };
    Ok(HostConfig {
        kind: h.kind,
        url: url.trim_end_matches('/').to_string(),
        user: h.user,
        password_file: h.password_file,
        ca_file: h.ca_file,
        fingerprint: h.fingerprint,
        insecure: h.insecure,
        nbd_connections: positive(
            &h.nbd_connections,
            "nbd_connections",
            DEFAULT_NBD_CONNECTIONS,
            16,
        )?,
        max_concurrent: positive(
            &h.max_concurrent,
            "max_concurrent",
            DEFAULT_PER_HOST,
            MAX_CONCURRENCY,
        )?,
        verify_sr: h
            .verify_sr
            .as_ref()
            .map(|sr| uuid(source, sr, &key("verify_sr")))
            .transpose()?,
        datacenter: h.datacenter.map(Spanned::into_inner),
        exports,
        dirty_bitmap: h.dirty_bitmap.map(Spanned::into_inner),
        tls_ca: h.tls_ca.map(Spanned::into_inner),
        tls_cert_pin: h.tls_cert_pin.map(Spanned::into_inner),
        tls_name: h.tls_name.map(Spanned::into_inner),
    })
}

/// Checks a name pattern ([`super::select::NamePattern`]).
fn glob(source: &Source, s: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    let g = s.get_ref();
    if g.is_empty() {
        return Err(source.error(s.span(), key, "an empty pattern matches nothing"));
    }
    super::select::NamePattern::new(g)
        .map_err(|e| source.error(s.span(), key, format!("'{g}': {e}")))?;
    Ok(g.clone())
}

fn uuid(source: &Source, s: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    let u = s.get_ref().trim().to_ascii_lowercase();
    let shape = u.len() == 36
        && u.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !shape {
        return Err(source.error(s.span(), key, format!("'{}' is not a uuid", s.get_ref())));
    }
    Ok(u)
}

fn job(
    source: &Source,
    name: &str,
    j: RawJob,
    repositories: &BTreeMap<String, RepositoryConfig>,
    hosts: &BTreeMap<String, HostConfig>,
) -> Result<JobConfig, ConfigError> {
    let key = |k: &str| format!("jobs.{name}.{k}");
    let known = |names: Vec<&String>| {
        if names.is_empty() {
            "none is defined".to_string()
        } else {
            format!(
                "defined: {}",
                names
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    if !repositories.contains_key(j.repository.get_ref()) {
        return Err(source.error(
            j.repository.span(),
            key("repository"),
            format!(
                "no repository '{}' ([repositories.{}]; {})",
                j.repository.get_ref(),
                j.repository.get_ref(),
                known(repositories.keys().collect())
            ),
        ));
    }
    if j.hosts.get_ref().is_empty() {
        return Err(source.error(j.hosts.span(), key("hosts"), "names no host"));
    }
    for h in j.hosts.get_ref() {
        if !hosts.contains_key(h.get_ref()) {
            return Err(source.error(
                h.span(),
                key("hosts"),
                format!(
                    "no host '{}' ([hosts.{}]; {})",
                    h.get_ref(),
                    h.get_ref(),
                    known(hosts.keys().collect())
                ),
            ));
        }
    }
    for o in &j.offsite {
        if !repositories.contains_key(o.get_ref()) {
            return Err(source.error(
                o.span(),
                key("offsite"),
                format!(
                    "no repository '{}' ({})",
                    o.get_ref(),
                    known(repositories.keys().collect())
                ),
            ));
        }
        if o.get_ref() == j.repository.get_ref() {
            return Err(source.error(
                o.span(),
                key("offsite"),
                "is the job's own repository: an offsite copy goes elsewhere",
            ));
        }
    }
    let s = &j.select;
    let any_criterion = !s.vms.is_empty()
        || !s.names.is_empty()
        || !s.tags.is_empty()
        || !s.pool_hosts.is_empty()
        || !s.power_states.is_empty();
    if !s.all && !any_criterion {
        return Err(source.error_at_key(
            key("select"),
            "selects nothing: give vms, names, tags, pool_hosts or power_states, or all = true",
        ));
    }
    let mut selection = Selection {
        all: s.all,
        tags: s.tags.clone(),
        pool_hosts: s.pool_hosts.clone(),
        power_states: s.power_states.clone(),
        exclude_tags: j.exclude.tags.clone(),
        ..Selection::default()
    };
    for v in &s.vms {
        selection.vms.push(uuid(source, v, &key("select.vms"))?);
    }
    for g in &s.names {
        selection.names.push(glob(source, g, &key("select.names"))?);
    }
    for v in &j.exclude.vms {
        selection
            .exclude_vms
            .push(uuid(source, v, &key("exclude.vms"))?);
    }
    for g in &j.exclude.names {
        selection
            .exclude_names
            .push(glob(source, g, &key("exclude.names"))?);
    }
    for d in &j.exclude_disks {
        if d.names.is_empty() && d.userdevices.is_empty() {
            return Err(source.error_at_key(
                key("exclude_disks"),
                "an entry names no disk: give names or userdevices",
            ));
        }
        let mut e = DiskExclusion {
            vm: d
                .vm
                .as_ref()
                .map(|v| glob(source, v, &key("exclude_disks.vm")))
                .transpose()?,
            names: Vec::new(),
            userdevices: d.userdevices.clone(),
        };
        for g in &d.names {
            e.names.push(glob(source, g, &key("exclude_disks.names"))?);
        }
        selection.exclude_disks.push(e);
    }
    let concurrency = match &j.concurrency {
        None => 1,
        Some(c) if (1..=MAX_CONCURRENCY).contains(c.get_ref()) => *c.get_ref(),
        Some(c) => {
            return Err(source.error(
                c.span(),
                key("concurrency"),
                format!(
                    "{} is out of range: give 1 to {MAX_CONCURRENCY}",
                    c.get_ref()
                ),
            ))
        }
    };
    for t in &j.tags {
        if t.is_empty() || t.contains(',') {
            return Err(source.error_at_key(
                key("tags"),
                format!("'{t}' is not a tag (empty, or has a comma)"),
            ));
        }
    }
    let retention = j
        .retention
        .as_ref()
        .map(|r| retention(source, &key("retention"), r))
        .transpose()?;
    let n = &j.notify;
    if let Some(w) = &n.webhook {
        let ok = w.get_ref().starts_with("https://") || w.get_ref().starts_with("http://");
        if !ok || url::Url::parse(w.get_ref()).is_err() {
            return Err(source.error(
                w.span(),
                key("notify.webhook"),
                format!("'{}' is not an https:// (or http://) URL", w.get_ref()),
            ));
        }
    }
    Ok(JobConfig {
        name: name.to_string(),
        repository: j.repository.into_inner(),
        hosts: j
            .hosts
            .into_inner()
            .into_iter()
            .map(Spanned::into_inner)
            .collect(),
        selection,
        concurrency,
        tags: j.tags,
        schedule: j.schedule,
        full_every: j.full_every,
        enable_cbt: j.enable_cbt.unwrap_or(true),
        retention,
        offsite: j.offsite.into_iter().map(Spanned::into_inner).collect(),
        verify_after: j.verify_after.unwrap_or(0),
        notify: Notify {
            webhook: j.notify.webhook.map(Spanned::into_inner),
            webhook_ca_file: j.notify.webhook_ca_file,
            on_failure: j.notify.on_failure,
            on_completion: j.notify.on_completion,
            metrics_file: j.notify.metrics_file,
        },
    })
}

fn retention(
    source: &Source,
    key: &str,
    r: &Spanned<RawRetention>,
) -> Result<Retention, ConfigError> {
    let raw = r.get_ref();
    let count = |v: &Spanned<CountValue>, k: &str| {
        Count::parse(&v.get_ref().text())
            .map_err(|e| source.error(v.span(), format!("{key}.{k}"), e.to_string()))
    };
    let span = |v: &Spanned<String>, k: &str| {
        Span::parse(v.get_ref())
            .map_err(|e| source.error(v.span(), format!("{key}.{k}"), e.to_string()))
    };
    let mut policy = Policy {
        last: raw
            .keep_last
            .as_ref()
            .map(|v| count(v, "keep_last"))
            .transpose()?,
        within: raw
            .keep_within
            .as_ref()
            .map(|v| span(v, "keep_within"))
            .transpose()?,
        ..Policy::default()
    };
    let counted = [
        &raw.keep_hourly,
        &raw.keep_daily,
        &raw.keep_weekly,
        &raw.keep_monthly,
        &raw.keep_yearly,
    ];
    let within = [
        &raw.keep_within_hourly,
        &raw.keep_within_daily,
        &raw.keep_within_weekly,
        &raw.keep_within_monthly,
        &raw.keep_within_yearly,
    ];
    for (i, period) in Period::ALL.into_iter().enumerate() {
        if let Some(v) = counted[i] {
            policy.set_period(period, count(v, &format!("keep_{}", period.name()))?);
        }
        if let Some(v) = within[i] {
            policy.set_within_period(period, span(v, &format!("keep_within_{}", period.name()))?);
        }
    }
    for tags in &raw.keep_tag {
        if tags.is_empty() || tags.iter().any(|t| t.is_empty()) {
            return Err(source.error(
                r.span(),
                format!("{key}.keep_tag"),
                "a list names no tag, or an empty one",
            ));
        }
        policy.tags.push(tags.clone());
    }
    if policy.is_empty() {
        return Err(source.error(
            r.span(),
            key,
            "keeps nothing: give at least one keep_* rule (a job never forgets every snapshot)",
        ));
    }
    Ok(Retention {
        policy,
        prune: raw.prune.unwrap_or(true),
        max_unused: raw.max_unused.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
[state]
dir = "/var/lib/cbtvault"

[repositories.main]
location = "/srv/cbtvault"

[repositories.offsite]
location = "s3://backups/cbtvault"
s3_endpoint = "https://s3.example.net"
password_file = "/etc/cbtvault/offsite.pass"

[hosts.pool1]
type = "xenserver"
url = "xen://root@pool1.example.net"
password_file = "/etc/cbtvault/pool1.pass"
fingerprint = ["AB:CD"]
max_concurrent = 2

[jobs.daily]
repository = "main"
hosts = ["pool1"]
concurrency = 4
tags = ["nightly"]
schedule = "daily"
offsite = ["offsite"]
verify_after = 1

[jobs.daily.select]
tags = ["daily"]
power_states = ["Running", "Halted"]

[jobs.daily.exclude]
names = ["*-scratch"]

[[jobs.daily.exclude_disks]]
vm = "db-*"
userdevices = ["3"]

[jobs.daily.retention]
keep_daily = 14
keep_weekly = "unlimited"
keep_within = "2d"

[jobs.daily.notify]
webhook = "https://hooks.example.net/cbtvault"
on_failure = "mail -s 'cbtvault failed' root < \"$CBTVAULT_REPORT\""
metrics_file = "/var/lib/node_exporter/textfile/cbtvault.prom"
"#;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/cbtvault/cbtvault.toml"))
    }

    #[test]
    fn the_example_parses_into_what_it_says() {
        let c = parse_str(EXAMPLE).unwrap();
        let j = &c.jobs["daily"];
        assert_eq!(j.repository, "main");
        assert_eq!(j.hosts, ["pool1"]);
        assert_eq!(j.concurrency, 4);
        assert_eq!(j.selection.tags, ["daily"]);
        assert_eq!(
            j.selection.power_states,
            [PowerState::Running, PowerState::Halted]
        );
        assert_eq!(j.selection.exclude_names, ["*-scratch"]);
        assert_eq!(
            j.selection.exclude_disks,
            [DiskExclusion {
                vm: Some("db-*".into()),
                names: vec![],
                userdevices: vec!["3".into()]
            }]
        );
        let r = j.retention.as_ref().unwrap();
        assert_eq!(
            r.policy.to_string(),
            "--keep-daily 14 --keep-weekly unlimited --keep-within 2d"
        );
        assert!(r.prune);
        assert_eq!(j.offsite, ["offsite"]);
        assert_eq!(j.verify_after, 1);
        assert!(j.enable_cbt);
        assert_eq!(j.job_tag(), "job:daily");
        let h = &c.hosts["pool1"];
        assert_eq!(h.url, "xen://root@pool1.example.net");
        assert_eq!(h.max_concurrent, 2);
        assert_eq!(h.nbd_connections, DEFAULT_NBD_CONNECTIONS);
        assert_eq!(c.state_dir, Path::new("/var/lib/cbtvault"));
    }

    /// The line of `needle`'s first occurrence in `text` (1-based).
    fn line_of(text: &str, needle: &str) -> usize {
        text[..text.find(needle).unwrap()].matches('\n').count() + 1
    }

    #[test]
    fn a_misspelt_key_is_refused_with_its_line() {
        let text = EXAMPLE.replace("concurrency = 4", "concurency = 4");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.line, Some(line_of(&text, "concurency")), "{e}");
        assert!(e.message.contains("unknown field `concurency`"), "{e}");
        assert!(e.to_string().starts_with(&format!(
            "/etc/cbtvault/cbtvault.toml:{}:",
            line_of(&text, "concurency")
        )));
    }

    #[test]
    fn references_and_values_are_checked_where_they_are_written() {
        let cases = [
            (
                "repository = \"main\"",
                "repository = \"mian\"",
                "mian",
                "jobs.daily.repository",
                "no repository 'mian'",
            ),
            (
                "hosts = [\"pool1\"]",
                "hosts = [\"pool2\"]",
                "\"pool2\"",
                "jobs.daily.hosts",
                "no host 'pool2'",
            ),
            (
                "offsite = [\"offsite\"]",
                "offsite = [\"main\"]",
                "[\"main\"]",
                "jobs.daily.offsite",
                "own repository",
            ),
            (
                "concurrency = 4",
                "concurrency = 0",
                "0",
                "jobs.daily.concurrency",
                "out of range",
            ),
            (
                "keep_daily = 14",
                "keep_daily = 0",
                "keep_daily = 0",
                "jobs.daily.retention.keep_daily",
                "not a count",
            ),
            (
                "keep_within = \"2d\"",
                "keep_within = \"2 days\"",
                "\"2 days\"",
                "jobs.daily.retention.keep_within",
                "not a duration",
            ),
            (
                "names = [\"*-scratch\"]",
                "names = [\"[a-\"]",
                "\"[a-\"",
                "jobs.daily.exclude.names",
                "'[a-'",
            ),
            (
                "url = \"xen://root@pool1.example.net\"",
                "url = \"https://pool1\"",
                "\"https://pool1\"",
                "hosts.pool1.url",
                "not a xen://",
            ),
            (
                "url = \"xen://root@pool1.example.net\"",
                "url = \"xen://pool1/vm/x\"",
                "\"xen://pool1/vm/x\"",
                "hosts.pool1.url",
                "the jobs select",
            ),
            (
                "max_concurrent = 2",
                "max_concurrent = 100",
                "100",
                "hosts.pool1.max_concurrent",
                "out of range",
            ),
            (
                "max_concurrent = 2",
                "max_concurrent = 2\ndatacenter = \"DC1\"",
                "\"DC1\"",
                "hosts.pool1.datacenter",
                "vsphere hosts only",
            ),
            (
                "type = \"xenserver\"\nurl = \"xen://root@pool1.example.net\"",
                "type = \"vsphere\"\nurl = \"xen://root@pool1.example.net\"",
                "\"xen://root@pool1.example.net\"",
                "hosts.pool1.url",
                "not a vmware://",
            ),
            (
                "webhook = \"https://hooks.example.net/cbtvault\"",
                "webhook = \"ftp://x\"",
                "\"ftp://x\"",
                "jobs.daily.notify.webhook",
                "not an https://",
            ),
        ];
        for (from, to, at, key, says) in cases {
            let text = EXAMPLE.replace(from, to);
            assert_ne!(text, EXAMPLE, "{from}");
            let e = parse_str(&text).unwrap_err();
            let line = text[..text.find(to).unwrap() + to.find(at).unwrap()]
                .matches('\n')
                .count()
                + 1;
            assert_eq!(e.line, Some(line), "{to}: {e}");
            assert_eq!(e.key.as_deref(), Some(key), "{to}: {e}");
            assert!(e.message.contains(says), "{to}: {e}");
        }
    }

    #[test]
    fn a_job_must_select_something_and_keep_something() {
        let text = EXAMPLE
            .replace("tags = [\"daily\"]\n", "")
            .replace("power_states = [\"Running\", \"Halted\"]\n", "");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("jobs.daily.select"), "{e}");
        let text = EXAMPLE
            .replace("keep_daily = 14\n", "")
            .replace("keep_weekly = \"unlimited\"\n", "")
            .replace("keep_within = \"2d\"\n", "");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("jobs.daily.retention"), "{e}");
        assert!(e.message.contains("keeps nothing"), "{e}");
    }

    #[test]
    fn bad_toml_and_wrong_types_name_the_line() {
        let text = EXAMPLE.replace("concurrency = 4", "concurrency = \"four\"");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.line, Some(line_of(&text, "concurrency")), "{e}");
        let text = EXAMPLE.replace("[jobs.daily.select]", "[jobs.daily.select");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.line, Some(line_of(&text, "[jobs.daily.select")), "{e}");
        let text = EXAMPLE.replace(
            "power_states = [\"Running\", \"Halted\"]",
            "power_states = [\"running\"]",
        );
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.line, Some(line_of(&text, "power_states")), "{e}");
        assert!(e.message.contains("unknown variant"), "{e}");
    }

    #[test]
    fn minimal_config_takes_the_defaults() {
        let text = r#"
[repositories.r]
location = "/tmp/r"
[hosts.h]
type = "xenserver"
url = "xen://h"
[jobs.all]
repository = "r"
hosts = ["h"]
select.all = true
"#;
        let c = parse_str(text).unwrap();
        let j = &c.jobs["all"];
        assert!(j.selection.all);
        assert_eq!(j.concurrency, 1);
        assert!(j.retention.is_none() && j.offsite.is_empty());
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(c.hosts["h"].max_concurrent, DEFAULT_PER_HOST);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in [
            "\u{0}",
            "[[[",
            "a = ",
            "jobs = 3",
            "[jobs.x]\nhosts = 1",
            "\u{feff}x=1",
        ] {
            assert!(parse_str(text).is_err(), "{text:?}");
        }
    }
}
