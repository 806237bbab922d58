//! Backup planning: which snapshot a backup layers on, and which blocks it
//! reads, takes from the parent, or knows to be zero. Turns the parent
//! snapshot, what the source says changed ([`Changes`]) and what it says
//! holds data into a [`BackupPlan`] for the pipeline. Reads snapshot objects
//! but writes nothing and prints nothing: what the user must be told comes
//! back in [`BackupPlan::warnings`] and [`BackupPlan::new_set_reason`].
//!
//! Lost change tracking, and a parent whose chain is gone, are normal
//! events: a new backup set with a full read, said loudly (DESIGN.md
//! invariant 6). spec: format-spec/03-snapshot.md#sets

use std::collections::BTreeMap;

use super::bitmap::BlockBitmap;
use crate::format::snapshot::{block_count, SnapshotMeta};
use crate::repo::{RepoError, Repository, Snapshot};
use crate::source::{Changes, Extents};

/// The parent a new snapshot is layered on.
pub struct ParentInfo {
    pub meta: SnapshotMeta,
    /// Its chain, full manifest first, the parent last (version 2 objects
    /// without their pages: the backup reads them range by range).
    pub chain: Vec<Snapshot>,
    /// Manifests between the parent and the last full one.
    pub depth: u32,
}

/// Which blocks a backup does not read are known to be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownZero {
    /// None: an unread block is the parent's.
    None,
    /// Every unread block: the source said it holds no data.
    Unread,
    /// Every unread block of the change bitmap: changed, and the source
    /// says it holds no data now.
    UnreadChanged,
}

impl BackupPlan {
    /// Whether block `index`, which the backup does not read, is known to
    /// be zero.
    pub fn known_zero_at(&self, index: u64) -> bool {
        known_zero_at(
            self.known_zero,
            self.read.as_ref(),
            self.change_bitmap.as_ref(),
            index,
        )
    }

    /// Blocks known zero without reading them.
    pub fn known_zero_count(&self) -> u64 {
        let read = self.read.as_ref().map_or(0, BlockBitmap::count);
        match (self.known_zero, &self.read, &self.change_bitmap) {
            (KnownZero::Unread, Some(r), _) => r.blocks() - read,
            (KnownZero::UnreadChanged, Some(_), Some(c)) => c.count().saturating_sub(read),
            _ => 0,
        }
    }
}

/// [`BackupPlan::known_zero_at`] over borrowed parts (the manifest sink
/// holds them while the plan is split up).
pub fn known_zero_at(
    rule: KnownZero,
    read: Option<&BlockBitmap>,
    changed: Option<&BlockBitmap>,
    index: u64,
) -> bool {
    let unread = read.is_some_and(|r| !r.is_set(index));
    match rule {
        KnownZero::None => false,
        KnownZero::Unread => unread,
        KnownZero::UnreadChanged => unread && changed.is_some_and(|c| c.is_set(index)),
    }
}

/// Everything decided before the pipeline runs.
pub struct BackupPlan {
    pub parent: Option<ParentInfo>,
    /// Blocks to read; `None` reads every block. A block neither read nor
    /// known zero (`known_zero`) is taken from the parent (zero without one).
    pub read: Option<BlockBitmap>,
    /// Which unread blocks are known to be zero (e.g. NBD block status):
    /// a rule over `read` and `change_bitmap` rather than a third bitmap,
    /// so a plan holds at most two bits per block of the disk.
    pub known_zero: KnownZero,
    /// The change bitmap that produced this backup, kept with the snapshot.
    pub change_bitmap: Option<BlockBitmap>,
    /// Write a full manifest while continuing the parent's backup set.
    pub synthetic_full: bool,
    pub tags: Vec<String>,
    pub hostname: String,
    pub landmark: BTreeMap<String, String>,
    /// Why a new backup set starts (no parent), for the snapshot and output.
    pub new_set_reason: Option<String>,
    /// What the user must be told before the backup runs, in order.
    pub warnings: Vec<String>,
    /// Commit nothing when the source changed while it was read
    /// (`backup --strict`); otherwise the change is reported with the
    /// snapshot ([`super::BackupSummary::source_changed`]).
    pub strict: bool,
    /// `read` comes from the source's allocation map walked while the
    /// backup reads ([`super::AllocationWalk`]): `None` until the walk is
    /// done, every unread block known zero. Only without a parent.
    pub streamed: bool,
}

/// Which snapshot a backup may layer on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentRequest {
    /// The newest snapshot of the same source identity.
    Newest,
    /// The newest snapshot of the same disk as the caller found it (a
    /// XenServer VDI through any host of its pool); otherwise as `Newest`.
    NewestFound(crate::format::SnapshotId),
    /// This snapshot (an id or unique prefix), whatever its source.
    Named(String),
    /// None: a new backup set (`--full`).
    NoParent,
}

/// What looking for the parent found.
pub enum ParentLookup {
    Found(Box<ParentInfo>),
    /// No parent: a new backup set starts, for this reason. `lost`: the
    /// backup was expected to continue a set (change tracking lost, or the
    /// parent's chain broken), so the user is warned.
    NewSet {
        reason: String,
        lost: bool,
    },
}

/// Finds and loads the parent of a backup of `identity` that saw
/// `changes`. A named parent that cannot be loaded is an error (the user
/// asked for it); the newest snapshot of the source whose chain is broken
/// (a snapshot of it deleted or unreadable) starts a new set instead.
pub fn find_parent(
    repo: &Repository,
    identity: &str,
    request: &ParentRequest,
    changes: &Changes,
) -> Result<ParentLookup, RepoError> {
    let new_set = |reason: String, lost: bool| Ok(ParentLookup::NewSet { reason, lost });
    let candidate = match request {
        ParentRequest::NoParent => {
            return new_set("full backup requested (--full)".to_string(), false)
        }
        ParentRequest::Named(query) => repo.find_snapshot(query)?,
        ParentRequest::NewestFound(id) => repo.find_snapshot(&id.to_hex())?,
        ParentRequest::Newest => match repo
            .snapshots()?
            .into_iter()
            .rfind(|s| s.meta.source == identity)
        {
            Some(s) => s,
            None => return new_set("first backup of this source".to_string(), false),
        },
    };
    if let Changes::FullNeeded(reason) = changes {
        return new_set(reason.clone(), true);
    }
    if candidate.meta.block_size != repo.config().block_size {
        return Err(RepoError::Invalid(format!(
            "parent {} uses another block size",
            candidate.meta.id
        )));
    }
    let id = candidate.meta.id;
    let chain = match repo.load_chain(id) {
        Ok(chain) => chain,
        Err(RepoError::SnapshotNotFound { query })
            if matches!(
                request,
                ParentRequest::Newest | ParentRequest::NewestFound(_)
            ) =>
        {
            return new_set(
                format!(
                    "the parent chain of snapshot {} (the last backup of '{identity}') is broken: snapshot {query} is gone (deleted or unreadable)",
                    id.short()
                ),
                true,
            );
        }
        Err(e) => {
            return Err(RepoError::Invalid(format!(
                "load parent snapshot {id}: {e}; back up with --full to start a new backup set"
            )))
        }
    };
    Ok(ParentLookup::Found(Box::new(ParentInfo {
        depth: chain.len() as u32 - 1,
        chain,
        meta: candidate.meta,
    })))
}

/// What is recorded with the snapshot besides its blocks.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Write a synthetic full once the chain since the last full reaches
    /// this many snapshots.
    pub full_every: Option<u32>,
    pub tags: Vec<String>,
    pub hostname: String,
    pub landmark: BTreeMap<String, String>,
    /// Refuse a source that changed while it was read.
    pub strict: bool,
}

/// The disk being backed up, as its source describes it.
pub struct SourceDisk<'a> {
    pub identity: &'a str,
    pub size_bytes: u64,
    pub changes: Changes,
    /// Bytes that may hold data (NBD `base:allocation`), when the source can
    /// tell; everything else reads as zero.
    pub allocated: Option<Extents>,
    /// The allocation is walked while the backup reads instead
    /// (`allocated` is then `None`); honoured only without a parent.
    pub allocation_streamed: bool,
}

/// Decides what a backup of `disk` reads, given the parent lookup.
pub fn plan(
    parent: ParentLookup,
    disk: SourceDisk<'_>,
    block_size: u32,
    options: &PlanOptions,
) -> BackupPlan {
    let disk_size = disk.size_bytes;
    let blocks = block_count(disk_size, block_size);
    let mut warnings = Vec::new();
    let mut new_set_reason = None;
    let mut lost = false;
    let parent = match parent {
        ParentLookup::Found(p) => Some(*p),
        ParentLookup::NewSet { reason, lost: l } => {
            if l {
                warnings.push(format!(
                    "{reason}; starting a new backup set with a full read"
                ));
            }
            lost = l;
            new_set_reason = Some(reason);
            None
        }
    };
    let nonzero = disk
        .allocated
        .as_ref()
        .map(|a| BlockBitmap::covering(a, block_size, blocks));
    let streamed = disk.allocation_streamed && parent.is_none() && nonzero.is_none();
    let (mut read, known_zero, change_bitmap) = match (&parent, disk.changes) {
        (Some(_), Changes::Since(extents)) => {
            let changed = BlockBitmap::covering(&extents, block_size, blocks);
            match nonzero {
                // Read what changed and holds data; the rest of the change
                // is known zero (a rule, not a third bitmap).
                Some(mut nz) => {
                    nz.and_assign(&changed);
                    (Some(nz), KnownZero::UnreadChanged, Some(changed))
                }
                None => (Some(changed.clone()), KnownZero::None, Some(changed)),
            }
        }
        (None, Changes::Since(_)) => {
            if !lost {
                warnings.push(format!(
                    "no parent snapshot of '{}': a change bitmap alone cannot describe the disk; reading every block",
                    disk.identity
                ));
            }
            let rule = if nonzero.is_some() || streamed {
                KnownZero::Unread
            } else {
                KnownZero::None
            };
            (nonzero, rule, None)
        }
        (_, _) => {
            let rule = if nonzero.is_some() || streamed {
                KnownZero::Unread
            } else {
                KnownZero::None
            };
            (nonzero, rule, None)
        }
    };
    // A size change leaves a partial block at the old or the new end whose
    // stored bytes no longer describe it: always read those blocks again.
    if let (Some(p), Some(read)) = (&parent, read.as_mut()) {
        if p.meta.disk_size_bytes != disk_size {
            let bs = block_size as u64;
            for end in [disk_size, p.meta.disk_size_bytes] {
                if end > 0 {
                    read.set((end - 1) / bs);
                }
            }
        }
    }
    let synthetic_full = match (&parent, options.full_every) {
        (Some(p), Some(n)) => p.depth + 1 >= n,
        _ => false,
    };
    BackupPlan {
        parent,
        read,
        known_zero,
        change_bitmap,
        synthetic_full,
        tags: options.tags.clone(),
        hostname: options.hostname.clone(),
        landmark: options.landmark.clone(),
        new_set_reason,
        warnings,
        strict: options.strict,
        streamed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::SnapshotId;

    const BS: u32 = 65536;

    fn parent(size: u64, depth: u32) -> ParentLookup {
        let id = SnapshotId([7; 16]);
        ParentLookup::Found(Box::new(ParentInfo {
            meta: SnapshotMeta {
                id,
                generation: 0,
                time: chrono::Utc::now(),
                hostname: "h".into(),
                source: "file:/d".into(),
                disk_size_bytes: size,
                block_size: BS,
                parent: None,
                backup_set: id,
                tags: vec![],
                landmark: BTreeMap::new(),
                read_mode: crate::format::snapshot::ReadMode::All,
                new_set_reason: None,
            },
            chain: Vec::new(),
            depth,
        }))
    }

    fn disk(size: u64, changes: Changes) -> SourceDisk<'static> {
        SourceDisk {
            identity: "file:/d",
            size_bytes: size,
            changes,
            allocated: None,
            allocation_streamed: false,
        }
    }

    fn since(ranges: &[(u64, u64)], size: u64) -> Changes {
        Changes::Since(Extents::from_ranges(ranges.iter().copied(), size))
    }

    #[test]
    fn changed_extents_are_read_and_kept_as_the_bitmap() {
        let size = 10 * BS as u64;
        let p = plan(
            parent(size, 0),
            disk(size, since(&[(BS as u64 * 3 + 5, 2 * BS as u64)], size)),
            BS,
            &PlanOptions::default(),
        );
        assert!(p.parent.is_some() && p.new_set_reason.is_none() && p.warnings.is_empty());
        let read: Vec<u64> = p.read.unwrap().iter().collect();
        assert_eq!(read, vec![3, 4, 5]);
        assert_eq!(p.change_bitmap.unwrap().count(), 3);
    }

    #[test]
    fn allocation_splits_changes_into_read_and_known_zero() {
        let size = 8 * BS as u64;
        let mut d = disk(size, since(&[(0, 4 * BS as u64)], size));
        d.allocated = Some(Extents::from_ranges([(BS as u64, BS as u64)], size));
        let p = plan(parent(size, 0), d, BS, &PlanOptions::default());
        assert_eq!(p.known_zero, KnownZero::UnreadChanged);
        let zero: Vec<u64> = (0..8).filter(|i| p.known_zero_at(*i)).collect();
        assert_eq!(zero, vec![0, 2, 3]);
        assert_eq!(p.known_zero_count(), 3);
        assert_eq!(p.read.unwrap().iter().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn lost_tracking_starts_a_new_set_with_a_warning() {
        let size = 4 * BS as u64;
        let p = plan(
            ParentLookup::NewSet {
                reason: "bitmap gone".into(),
                lost: true,
            },
            disk(size, Changes::Unknown),
            BS,
            &PlanOptions::default(),
        );
        assert!(p.parent.is_none() && p.read.is_none());
        assert_eq!(p.new_set_reason.as_deref(), Some("bitmap gone"));
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn a_lost_parent_with_changed_extents_warns_once() {
        let size = 4 * BS as u64;
        let p = plan(
            ParentLookup::NewSet {
                reason: "chain broken".into(),
                lost: true,
            },
            disk(size, since(&[(0, 10)], size)),
            BS,
            &PlanOptions::default(),
        );
        assert!(p.parent.is_none() && p.read.is_none() && p.change_bitmap.is_none());
        assert_eq!(p.new_set_reason.as_deref(), Some("chain broken"));
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("new backup set"));
    }

    #[test]
    fn a_resized_disk_rereads_the_blocks_at_both_ends() {
        let old = 4 * BS as u64 + 100;
        let new = 6 * BS as u64 + 10;
        let p = plan(
            parent(old, 0),
            disk(new, since(&[], new)),
            BS,
            &PlanOptions::default(),
        );
        assert_eq!(p.read.unwrap().iter().collect::<Vec<_>>(), vec![4, 6]);
    }

    #[test]
    fn full_every_makes_a_synthetic_full_at_the_chain_length() {
        let size = BS as u64;
        let options = PlanOptions {
            full_every: Some(3),
            ..PlanOptions::default()
        };
        assert!(!plan(parent(size, 1), disk(size, Changes::Unknown), BS, &options).synthetic_full);
        assert!(plan(parent(size, 2), disk(size, Changes::Unknown), BS, &options).synthetic_full);
    }
}
