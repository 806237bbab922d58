//! The command line: argument shape (clap derive, here), conversion into
//! validated `*Options` before any work starts (`options`), the dispatch
//! (`run`) and exit codes (`exit`). Nothing below `cli` sees clap.

pub mod exit;
mod generate;
mod options;
mod password;
pub mod policy;
mod run;

pub use run::run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cbtvault",
    version,
    about = "Incremental, deduplicating backup of virtual disks driven by changed block tracking",
    after_help = exit::TABLE
)]
pub struct Cli {
    /// Repository: a local folder, or s3://[ENDPOINT/]BUCKET[/PREFIX]
    /// (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the
    /// shared credentials file, never the command line).
    #[arg(short = 'r', long = "repo", env = "CBTVAULT_REPOSITORY", global = true)]
    pub repo: Option<String>,
    /// S3 endpoint: HOST[:PORT] or https://HOST[:PORT] (http:// only when
    /// written so); then the s3:// URL's first component is the bucket.
    #[arg(long, env = "CBTVAULT_S3_ENDPOINT", global = true, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, AWS_DEFAULT_REGION, us-east-1).
    #[arg(long, global = true, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// S3 addressing: path (ENDPOINT/BUCKET/KEY) or virtual-host
    /// (BUCKET.ENDPOINT/KEY); default: virtual-host on AWS, else path.
    #[arg(long, global = true, value_name = "STYLE", value_parser = ["path", "virtual-host"])]
    pub s3_url_style: Option<String>,
    /// PEM certificate authorities to trust for the S3 endpoint instead of
    /// the system's.
    #[arg(long, env = "CBTVAULT_S3_CA_FILE", global = true, value_name = "FILE")]
    pub s3_ca_file: Option<PathBuf>,
    /// Print machine-readable JSON results on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More detail on stderr: -v each step (connections, parent, blocks
    /// changed), -vv debug detail. Not with --quiet.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Take no repository lock (reading commands only; as restic's --no-lock).
    #[arg(long, global = true)]
    pub no_lock: bool,
    /// File whose first line is the repository password (encrypted
    /// repositories; or CBTVAULT_PASSWORD, or a prompt on a terminal;
    /// never on the command line).
    #[arg(
        long,
        env = "CBTVAULT_PASSWORD_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up a disk image or block device.
    Backup(BackupArgs),
    /// List snapshots (a VM backup's disks and metadata together).
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot to a file, block device or stdout; with
    /// --include, restore files from its file systems into a directory.
    Restore(RestoreArgs),
    /// List a snapshot's partitions, or a directory of one of its file
    /// systems (pN:/path).
    Ls(LsArgs),
    /// Write a file of a snapshot's file system to stdout (a directory as
    /// a tar stream).
    Dump(DumpArgs),
    /// Find files by name or path in the file systems of snapshots.
    Find(FindArgs),
    /// Verify the repository's structure and, optionally, its data.
    Check(CheckArgs),
    /// Print a repository object as JSON.
    Cat(CatArgs),
    /// List the blocks that differ between two snapshots.
    Diff(DiffArgs),
    /// Sizes, deduplication and compression of the repository.
    Stats,
    /// Remove stale locks.
    Unlock(UnlockArgs),
    /// Copy snapshots (with the snapshots they are layered on) from one
    /// repository to another, sending only the blocks the destination
    /// lacks; interrupted, run it again.
    Copy(CopyArgs),
    /// Add, remove or set the tags of snapshots (each changed snapshot is
    /// rewritten as a new generation; its data is not touched).
    Tag(TagArgs),
    /// Remove snapshots (by id or by a --keep-* policy), folding their
    /// changes into the snapshots layered on them, and destroy the
    /// XenServer landmarks only they recorded.
    Forget(ForgetArgs),
    /// Remove packs no snapshot references and repack packs whose unused
    /// share exceeds --max-unused.
    Prune(PruneArgs),
    /// Repair derived data.
    #[command(subcommand)]
    Repair(RepairCommand),
    /// Manage the passwords (keys) of an encrypted repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Export a snapshot read-only over NBD (for qemu-img, qemu-nbd --connect, guestmount).
    Serve(ServeArgs),
    /// Run jobs of the configuration file: back up the VMs they select,
    /// several at a time, then retention, offsite copies and read-backs;
    /// a report per run.
    Run(RunArgs),
    /// Check the configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List past job runs and their results.
    Runs(RunsArgs),
    /// Start a simulated XenServer host, back a VM up (full, then
    /// incremental with CBT), restore a disk and verify it bit for bit.
    #[cfg(feature = "sim")]
    Demo(DemoArgs),
    /// Run a simulated XenServer host (XenAPI over HTTPS, NBD with TLS) to
    /// try cbtvault without one.
    #[cfg(feature = "sim")]
    Sim(SimArgs),
    /// Write shell completions (--completions SHELL, on stdout) or man
    /// pages (--man DIR, one per command and subcommand).
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["completions", "man"])))]
pub struct GenerateArgs {
    /// Print a completion script for SHELL on stdout (bash, zsh, fish,
    /// elvish, powershell).
    #[arg(long, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,
    /// Write one man page per command and subcommand into DIR (created
    /// if missing): cbtvault.1, cbtvault-backup.1, ...
    #[arg(long, value_name = "DIR")]
    pub man: Option<PathBuf>,
}

impl Command {
    /// The command's name as typed (`repair index`), for JSON messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Init(_) => "init",
            Command::Backup(_) => "backup",
            Command::Snapshots(_) => "snapshots",
            Command::Restore(_) => "restore",
            Command::Ls(_) => "ls",
            Command::Dump(_) => "dump",
            Command::Find(_) => "find",
            Command::Check(_) => "check",
            Command::Cat(_) => "cat",
            Command::Diff(_) => "diff",
            Command::Stats => "stats",
            Command::Unlock(_) => "unlock",
            Command::Copy(_) => "copy",
            Command::Key(KeyCommand::List) => "key list",
            Command::Key(KeyCommand::Add(_)) => "key add",
            Command::Key(KeyCommand::Remove(_)) => "key remove",
            Command::Key(KeyCommand::Passwd(_)) => "key passwd",
            Command::Tag(_) => "tag",
            Command::Forget(_) => "forget",
            Command::Prune(_) => "prune",
            Command::Repair(RepairCommand::Index) => "repair index",
            Command::Repair(RepairCommand::Packs(_)) => "repair packs",
            Command::Repair(RepairCommand::Snapshots) => "repair snapshots",
            Command::Repair(RepairCommand::Tmp) => "repair tmp",
            Command::Serve(_) => "serve",
            Command::Run(_) => "run",
            Command::Config(ConfigCommand::Check(_)) => "config check",
            Command::Runs(_) => "runs",
            #[cfg(feature = "sim")]
            Command::Demo(_) => "demo",
            #[cfg(feature = "sim")]
            Command::Sim(_) => "sim",
            Command::Generate(_) => "generate",
        }
    }
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// State folder: disk images, the host certificate and the objects,
    /// kept across restarts (default: a temporary folder, removed on exit).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// HTTPS address for XenAPI (XML-RPC, JSON-RPC) and the HTTP handlers.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    pub listen: String,
    /// NBD address (default: the --listen host, port 10809).
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<String>,
    /// User name accepted by session.login_with_password.
    #[arg(long, default_value = "root")]
    pub user: String,
    /// Password accepted (default: a random one, printed at start).
    #[arg(
        long = "password-env",
        value_name = "VAR",
        default_value = "CBTVAULT_SIM_PASSWORD"
    )]
    pub password_env: String,
    /// Host name in the certificate and in VDI.get_nbd_info's `subject`.
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    /// Size in MiB of each disk of the VM 'demo-vm' created at the first
    /// start (repeatable).
    #[arg(long = "disk-mib", value_name = "MIB", default_values_t = [64u64])]
    pub disk_mib: Vec<u64>,
    /// Behave as an old host without CBT (the CBT calls are unknown).
    #[arg(long)]
    pub legacy_host: bool,
    /// A vSphere (ESXi) host instead: vim25 SOAP on /sdk, CBT,
    /// snapshots, datastore files on /folder (--nbd-listen and
    /// --legacy-host do not apply).
    #[arg(long, conflicts_with_all = ["legacy_host", "nbd_listen"])]
    pub vmware: bool,
    /// Append every XenAPI call (method and outcome) and NBD connection to
    /// FILE, one per line, to see (or test) the order of a workflow.
    #[arg(long, value_name = "FILE")]
    pub log_calls: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Snapshot id (or unique prefix), or `latest`.
    pub snapshot: String,
    /// TCP address to listen on (HOST:PORT).
    #[arg(long, value_name = "ADDR", conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Unix socket path to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Export name (default: the snapshot id; any name is accepted when empty).
    #[arg(long)]
    pub export_name: Option<String>,
    /// Server certificate (PEM) for TLS; requires --tls-key. TLS is then mandatory.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Encrypt the repository (the default on object storage): a password
    /// from --password-file, CBTVAULT_PASSWORD_FILE, CBTVAULT_PASSWORD or
    /// a prompt wraps a random master key.
    #[arg(long, conflicts_with = "no_encrypt")]
    pub encrypt: bool,
    /// Create a plain repository even on object storage.
    #[arg(long)]
    pub no_encrypt: bool,
    #[command(flatten)]
    pub kdf: KdfArgs,
    /// Block size in bytes (65536 matches XenServer CBT).
    #[arg(long, default_value_t = 65536)]
    pub block_size: u32,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = 3)]
    pub compression_level: i32,
    /// Target pack size in MiB.
    #[arg(long, default_value_t = 32)]
    pub pack_size_mib: u64,
}

/// Argon2id cost of a new key.
#[derive(Debug, Args, Clone)]
pub struct KdfArgs {
    /// Memory per password check, MiB (8 to 4096).
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub kdf_memory: u32,
    /// Passes over that memory (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub kdf_iterations: u32,
}

/// The key subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the repository's keys.
    List,
    /// Add a key for another password (from --new-password-file,
    /// CBTVAULT_NEW_PASSWORD_FILE, CBTVAULT_NEW_PASSWORD or a prompt).
    Add(KeyNewArgs),
    /// Remove a key (not the one given now, not the last).
    Remove(KeyRemoveArgs),
    /// Change the password of the key given now.
    Passwd(KeyNewArgs),
}

#[derive(Debug, Args)]
pub struct KeyNewArgs {
    /// File whose first line is the new password.
    #[arg(long, env = "CBTVAULT_NEW_PASSWORD_FILE", value_name = "FILE")]
    pub new_password_file: Option<PathBuf>,
    #[command(flatten)]
    pub kdf: KdfArgs,
}

#[derive(Debug, Args)]
pub struct KeyRemoveArgs {
    /// The key's id (or a unique prefix), as 'key list' shows it.
    pub key_id: String,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// A raw disk image or block device path, an NBD URI
    /// (nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=PATH),
    /// or a XenServer disk or VM (xen://[USER@]HOST[:PORT]/vdi/UUID,
    /// xen://[USER@]HOST[:PORT]/vm/UUID).
    pub source: String,
    #[command(flatten)]
    pub nbd: NbdArgs,
    #[command(flatten)]
    pub xen: XenArgs,
    #[command(flatten)]
    pub vmware: VmwareArgs,
    /// Identity of the disk for finding the parent (default: `file:` plus
    /// the absolute path, or the NBD URI). Use it when the path changes
    /// between runs, e.g. a new LVM snapshot device each time.
    #[arg(long, value_name = "ID")]
    pub source_id: Option<String>,
    /// NBD: back up only the extents this QEMU dirty bitmap marks
    /// (meta context qemu:dirty-bitmap:NAME), the rest from the parent.
    #[arg(long, value_name = "NAME")]
    pub dirty_bitmap: Option<String>,
    /// Base64 bitmap of changed 64 KiB blocks, as VDI.list_changed_blocks returns it.
    #[arg(long, value_name = "FILE")]
    pub changed_blocks: Option<PathBuf>,
    /// Layer on this snapshot instead of the newest of the same source.
    #[arg(long, value_name = "ID", conflicts_with = "full")]
    pub parent: Option<String>,
    /// Start a new backup set: read every block, write a full manifest.
    #[arg(long)]
    pub full: bool,
    /// Write a synthetic full manifest (no data rewritten) once the chain
    /// since the last full reaches N snapshots, so restores and
    /// incrementals never resolve more than N manifests; 0: never (chains
    /// grow without bound).
    #[arg(long, value_name = "N", default_value_t = crate::commands::backup::DEFAULT_FULL_EVERY)]
    pub full_every: u32,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Refuse to commit a snapshot of a source that changed while it was
    /// read (size, times or inode of an image file or block device); by
    /// default it is committed with a warning.
    #[arg(long)]
    pub strict: bool,
}

/// How to reach a XenServer host (xen:// sources).
#[derive(Debug, Args, Clone, Default)]
pub struct XenArgs {
    #[command(flatten)]
    pub connect: XenConnectArgs,
    /// Do not enable changed block tracking on disks that have it off
    /// (they are then read in full every time).
    #[arg(long)]
    pub no_enable_cbt: bool,
    /// Keep the host-side snapshot's data (skip VDI.data_destroy).
    #[arg(long)]
    pub keep_snapshot_data: bool,
}

/// How to log in to a XenServer host: the user, the password's source and
/// the certificate check.
#[derive(Debug, Args, Clone, Default)]
pub struct XenConnectArgs {
    /// XenServer user (default: the one in the URL, else root).
    #[arg(long)]
    pub user: Option<String>,
    /// File whose first line is the XenServer password (or set
    /// CBTVAULT_XEN_PASSWORD; never on the command line).
    #[arg(long = "xen-password-file", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Trust XenAPI certificates issued by these CAs (PEM) instead of the
    /// system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Trust exactly the XenAPI certificate with this SHA-256 fingerprint
    /// (AB:CD:... as `openssl x509 -fingerprint -sha256` prints it). Give
    /// it once per pool member the command may be sent to (the host in the
    /// URL and, when that is a member, the master).
    #[arg(long, value_name = "SHA256", conflicts_with = "ca_file")]
    pub fingerprint: Vec<String>,
    /// Do not verify the XenAPI certificate (NOT RECOMMENDED: warns every run).
    #[arg(long, conflicts_with_all = ["ca_file", "fingerprint"])]
    pub insecure: bool,
}

/// How to reach an NBD server.
/// vSphere options of `backup vmware://...` (with `--user`, `--ca-file`,
/// `--fingerprint`, `--insecure` and `--no-enable-cbt`, shared with
/// XenServer).
#[derive(Debug, Args, Clone, Default)]
pub struct VmwareArgs {
    #[command(flatten)]
    pub connect: VmwareConnectArgs,
    /// Ask VMware Tools to quiesce the guest's file systems for the
    /// snapshot.
    #[arg(long)]
    pub quiesce: bool,
    /// Read the disks' bytes over NBD instead of the datastore's /folder:
    /// for each disk, once the backup's snapshot exists, run this shell
    /// command, which must serve the frozen disk in the foreground on the
    /// Unix socket $CBTVAULT_NBD_SOCKET (e.g. nbdkit -f -U
    /// "$CBTVAULT_NBD_SOCKET" vddk ... file="$CBTVAULT_DISK_FILE"
    /// snapshot="$CBTVAULT_SNAPSHOT_MOREF"); it is stopped when the disk
    /// is read. See README "VMware vSphere" for its environment.
    #[arg(long, value_name = "COMMAND")]
    pub data_command: Option<String>,
}

/// How to log in to vSphere and which datacenter's datastores to use
/// (with `--user`, `--ca-file`, `--fingerprint` and `--insecure`).
#[derive(Debug, Args, Clone, Default)]
pub struct VmwareConnectArgs {
    /// File whose first line is the vSphere password (else
    /// CBTVAULT_VMWARE_PASSWORD; never on the command line).
    #[arg(long = "vmware-password-file", value_name = "FILE")]
    pub vmware_password_file: Option<PathBuf>,
    /// The datacenter of the datastores, as `/folder` wants it (default
    /// ha-datacenter, an ESXi host's; give it for vCenter).
    #[arg(long, value_name = "NAME")]
    pub datacenter: Option<String>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct NbdArgs {
    /// Trust server certificates issued by these CAs (PEM); enables TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Trust exactly this server certificate (PEM); enables TLS.
    #[arg(long, value_name = "FILE", conflicts_with = "tls_ca")]
    pub tls_cert_pin: Option<PathBuf>,
    /// Name the server certificate must carry (default: the URI's host).
    #[arg(long, value_name = "NAME")]
    pub tls_name: Option<String>,
    /// Client certificate (PEM, the chain from the client's own certificate
    /// up) for an NBD server that verifies its clients (qemu-nbd
    /// verify-peer=on); requires --tls-client-key.
    #[arg(long, value_name = "FILE", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert; should be readable by its
    /// owner only.
    #[arg(long, value_name = "FILE", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Connections to open to the export (fewer when the server does not
    /// allow several, or does not accept them within a few seconds).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub nbd_connections: usize,
    /// Refuse an NBD export larger than this (bytes, or with a K, M, G, T
    /// or P suffix, powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "64T")]
    pub max_disk_size: String,
    /// Fail when the NBD server sends nothing for this long during the
    /// handshake or a request (one reconnect is tried on a broken
    /// connection, within the same time).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub io_timeout: u64,
}

#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only snapshots of this source: a path, an identity (file:/path), an
    /// NBD URI or a XenServer URL however typed (user and default port may
    /// be left out; a VM URL selects its disks and metadata).
    #[arg(long)]
    pub source: Option<String>,
    /// Only snapshots with this tag (repeatable: all must match).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Only snapshots of this VM's backups (its uuid, or its name when it
    /// was backed up).
    #[arg(long, value_name = "NAME|UUID")]
    pub vm: Option<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Snapshot id (or unique prefix), or `latest`.
    pub snapshot: String,
    /// pN:/DIR (partition N's file system), or /DIR on a disk without a
    /// partition table; without it, the disk's partitions.
    pub path: Option<String>,
    /// Long listing: type, mode, owner, size, modification time, link target.
    #[arg(short = 'l', long = "long")]
    pub long: bool,
    /// List the directories beneath too (full paths).
    #[arg(short = 'R', long)]
    pub recursive: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Snapshot id (or unique prefix), or `latest`.
    pub snapshot: String,
    /// pN:/PATH, or /PATH on a disk without a partition table.
    pub path: String,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct FindArgs {
    /// Snapshots to search (ids, unique prefixes or `latest`), then the
    /// PATTERN: a glob over file names (`*.conf`), or with a `/` over whole
    /// paths (`/etc/**/*.conf`, `p1:/home/*/.ssh`).
    #[arg(value_name = "SNAPSHOT... PATTERN", required = true, num_args = 2..)]
    pub args: Vec<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot id (or unique prefix), or `latest`; with --new-vm, a VM
    /// backup id or any snapshot of that VM backup.
    pub snapshot: String,
    /// A file path, a block device, `-` for stdout, a XenServer disk to
    /// overwrite (xen://[USER@]HOST[:PORT]/vdi/UUID) or an SR to create a
    /// new disk in (xen://[USER@]HOST[:PORT]/sr/UUID), or a new flat VMDK
    /// on a vSphere datastore
    /// (vmware://[USER@]HOST[:PORT]/datastore/DATASTORE/PATH.vmdk).
    #[arg(long)]
    pub target: PathBuf,
    /// Replace an existing non-empty regular file; with --include, restore
    /// into a non-empty directory (replacing files and links of the same
    /// names, never following a link).
    #[arg(long)]
    pub overwrite: bool,
    /// Restore files instead of the disk: those of the snapshot's file
    /// systems matching PATTERN (pN:/GLOB, e.g. 'p1:/etc/**'; or /GLOB on
    /// a disk without a partition table; repeatable) into the directory
    /// --target, as TARGET/pN/PATH.
    #[arg(long = "include", value_name = "PATTERN")]
    pub include: Vec<String>,
    /// The newest snapshot of the same source taken at or before TIME
    /// (RFC 3339, e.g. 2026-11-21T12:00:00Z) instead of SNAPSHOT itself.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// xen://.../vdi/UUID: import even when the disk is attached to a
    /// running VM or its size differs from the snapshot's. vmware://
    /// targets: replace existing files of the same names. File and stdout
    /// targets: accept a snapshot disk above 64 TiB.
    #[arg(long)]
    pub force: bool,
    /// Salvage: write zeros for blocks that are missing or fail
    /// verification, list them, and exit 3 instead of stopping.
    #[arg(long)]
    pub allow_damaged: bool,
    /// Permission bits of a restored image file (octal), whatever the
    /// umask; default 600.
    #[arg(long, value_name = "OCTAL")]
    pub mode: Option<String>,
    /// xen:// and vmware:// targets: read the written disk back (over NBD,
    /// or the datastore's /folder) and compare every block's hash with the
    /// snapshot's.
    #[arg(long)]
    pub verify: bool,
    /// xen://.../sr/UUID: restore every disk of a VM backup and create a
    /// new VM from its stored metadata (/import_metadata).
    #[arg(long)]
    pub new_vm: bool,
    /// xen:// targets: `raw` (every byte), `chunked` (only data extents),
    /// or `auto` (chunked when fewer than half the blocks hold data).
    #[arg(long, value_name = "FORMAT", default_value = "auto")]
    pub import_format: String,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub xen: XenArgs,
    #[command(flatten)]
    pub vmware: VmwareConnectArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Decompress and re-hash every block.
    #[arg(long)]
    pub read_data: bool,
    /// Read only a subset of the packs: `N%` or `n/t`.
    #[arg(long, value_name = "SUBSET", conflicts_with = "read_data")]
    pub read_data_subset: Option<String>,
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// One table per group of snapshots sharing these fields: source (a VM
    /// backup: its VM), host, tags (comma-separated).
    #[arg(long, value_name = "FIELDS")]
    pub group_by: Option<String>,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Snapshot ids (or unique prefixes) to remove; or give a --keep-*
    /// policy instead.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    #[command(flatten)]
    pub policy: policy::PolicyArgs,
    /// With a policy: apply it only to the snapshots these select.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// List what would be kept and removed, with the reasons; change
    /// nothing, on the repository or on the hosts.
    #[arg(long)]
    pub dry_run: bool,
    /// Run prune afterwards.
    #[arg(long)]
    pub prune: bool,
    /// With --prune: unused data to tolerate (as prune's --max-unused).
    #[arg(long, value_name = "LIMIT", default_value = "10%", requires = "prune")]
    pub max_unused: String,
    /// Touch only the repository: list the XenServer landmark VDIs left
    /// to clean instead of destroying them.
    #[arg(long)]
    pub no_host: bool,
    /// How to reach the XenServer hosts named by the forgotten snapshots.
    #[command(flatten)]
    pub xen: XenConnectArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["add", "remove", "set"])))]
pub struct TagArgs {
    /// Snapshot ids (or unique prefixes); or select with --source, --tag,
    /// --vm instead.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    /// Add this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub add: Vec<String>,
    /// Remove this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub remove: Vec<String>,
    /// Replace all tags with these (repeatable; `--set` alone clears them).
    #[arg(long, value_name = "TAG", num_args = 0..=1, conflicts_with_all = ["add", "remove"])]
    pub set: Option<Vec<String>>,
    /// Without ids: the snapshots to re-tag.
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Unused data to tolerate: a share of the repository (`10%`, `0%`),
    /// a size (`0`, `500M`) or `unlimited` (delete only packs with no used
    /// block).
    #[arg(long, value_name = "LIMIT", default_value = "10%")]
    pub max_unused: String,
    /// Print what would be deleted and repacked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CatArgs {
    /// `config` or `snapshot`.
    pub kind: String,
    /// Snapshot id, for `snapshot`.
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    pub a: String,
    pub b: String,
    /// Compare snapshots of two different sources anyway.
    #[arg(long)]
    pub force: bool,
}

/// Where the job configuration is read from.
#[derive(Debug, Args, Clone)]
pub struct ConfigFileArgs {
    /// The configuration file.
    #[arg(
        long = "config",
        env = "CBTVAULT_CONFIG",
        value_name = "FILE",
        default_value = crate::jobs::config::DEFAULT_PATH
    )]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Jobs to run, in this order.
    #[arg(
        value_name = "JOB",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub jobs: Vec<String>,
    /// Run every job of the file.
    #[arg(long)]
    pub all: bool,
    /// VMs backed up at once (overrides the jobs' concurrency).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Read back this many VMs' new backups after the run, every block
    /// checked (overrides the jobs' verify_after).
    #[arg(long, value_name = "N")]
    pub verify_after: Option<usize>,
    #[command(flatten)]
    pub file: ConfigFileArgs,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the file and print what each job would back up now (its
    /// hosts are asked; --offline only validates).
    Check(ConfigCheckArgs),
}

#[derive(Debug, Args)]
pub struct ConfigCheckArgs {
    /// Jobs to show (default: all).
    #[arg(value_name = "JOB")]
    pub jobs: Vec<String>,
    /// Validate the file only; contact no host.
    #[arg(long)]
    pub offline: bool,
    #[command(flatten)]
    pub file: ConfigFileArgs,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only the runs of this job.
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,
    /// Only the N newest runs.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    #[command(flatten)]
    pub file: ConfigFileArgs,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The repository to copy from (a folder or s3://...).
    #[arg(long, value_name = "REPO")]
    pub from: String,
    /// The repository to copy to (a folder or s3://...; create it first
    /// with 'cbtvault init' and the same --block-size).
    #[arg(long, value_name = "REPO")]
    pub to: String,
    /// Snapshots to copy (ids or unique prefixes).
    #[arg(
        value_name = "SNAPSHOT",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub snapshots: Vec<String>,
    /// Copy every snapshot.
    #[arg(long)]
    pub all: bool,
    /// File holding the source repository's password (default: the
    /// common --password-file / CBTVAULT_PASSWORD).
    #[arg(long, env = "CBTVAULT_FROM_PASSWORD_FILE", value_name = "FILE")]
    pub from_password_file: Option<PathBuf>,
    /// File holding the destination repository's password (default: the
    /// common --password-file / CBTVAULT_PASSWORD).
    #[arg(long, env = "CBTVAULT_TO_PASSWORD_FILE", value_name = "FILE")]
    pub to_password_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// Remove every lock, not only stale ones.
    #[arg(long)]
    pub remove_all: bool,
}

#[derive(Debug, Subcommand)]
pub enum RepairCommand {
    /// Rebuild the catalog from the packs and snapshot objects.
    Index,
    /// Salvage the good blocks of damaged packs into new packs and drop
    /// the damaged ones; with --unreferenced, remove packs no snapshot uses.
    Packs(RepairPacksArgs),
    /// Rewrite snapshots whose parent is gone as full manifests where their
    /// own blocks suffice; report the others.
    Snapshots,
    /// Remove files left in tmp/ by interrupted writers.
    Tmp,
}

#[derive(Debug, Args)]
pub struct RepairPacksArgs {
    /// Instead: remove every pack none of whose blocks any snapshot
    /// references (packs of failed or killed backups).
    #[arg(long)]
    pub unreferenced: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the first simulated disk in MiB (the second is half).
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Work folder (default: a new temporary folder, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The vSphere workflow (a simulated ESXi host) instead of XenServer.
    #[arg(long)]
    pub vmware: bool,
}
