//! Changing a snapshot's tags. A snapshot object is immutable and named by
//! its hash, so a tag change is a rewrite (spec: 03-snapshot.md#identity):
//! the same object with the new tags and `generation + 1` is made durable,
//! then every older object of that id is removed. A crash between the two
//! leaves the new generation live beside garbage that readers ignore (and
//! the next `tag`, `forget` or `repair snapshots` removes), so the snapshot
//! is listed exactly once, with its old tags or its new ones. The manifest
//! and bitmap are copied unchanged: the restored disk cannot change.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{RepoError, Repository};
use crate::backend::Kind;
use crate::format::SnapshotId;

/// What to do to each snapshot's tags. `set` replaces them all (and then
/// `add` and `remove` are empty: the command line refuses both).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagChange {
    pub add: Vec<String>,
    pub remove: Vec<String>,
    pub set: Option<Vec<String>>,
}

impl TagChange {
    /// The tags `tags` become: `set` if given (duplicates dropped), else
    /// `tags` without `remove`, then each of `add` not already there, in
    /// order.
    pub fn apply(&self, tags: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let base = self.set.as_deref().unwrap_or(tags);
        for t in base.iter().chain(&self.add) {
            if !self.remove.contains(t) && !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }
}

/// One snapshot whose tags changed.
#[derive(Debug, Clone, Serialize)]
pub struct Retagged {
    pub id: SnapshotId,
    pub old_tags: Vec<String>,
    pub new_tags: Vec<String>,
    pub new_generation: u32,
}

#[derive(Debug, Clone, Default)]
pub struct TagReport {
    /// The snapshots rewritten, in the order asked.
    pub changed: Vec<Retagged>,
    /// Snapshots whose tags were already as asked (not rewritten).
    pub unchanged: Vec<SnapshotId>,
}

/// Applies `change` to the live snapshots `ids` (each once). The caller
/// holds the exclusive lock (a running backup may read a parent's object;
/// 05-locks.md). Every id is checked to be live and unique before anything
/// is written.
pub fn retag(
    repo: &Repository,
    ids: &[SnapshotId],
    change: &TagChange,
) -> Result<TagReport, RepoError> {
    repo.ensure_exclusive_lock("tag")?;
    let live: std::collections::HashMap<SnapshotId, super::SnapshotEntry> = repo
        .snapshots()?
        .into_iter()
        .map(|s| (s.meta.id, s))
        .collect();
    let mut seen = BTreeSet::new();
    let mut todo = Vec::new();
    for id in ids {
        if !seen.insert(*id) {
            continue;
        }
        let entry = live
            .get(id)
            .ok_or_else(|| RepoError::SnapshotNotFound { query: id.to_hex() })?;
        repo.ensure_unique(*id)?;
        todo.push(entry);
    }
    let mut report = TagReport::default();
    for entry in todo {
        let new_tags = change.apply(&entry.meta.tags);
        if new_tags == entry.meta.tags {
            // Not rewritten; an older generation left by an interrupted
            // earlier run is garbage, removed now.
            remove_older(repo, entry.meta.id, entry.meta.generation)?;
            report.unchanged.push(entry.meta.id);
            continue;
        }
        let mut obj = repo
            .load_snapshot(&entry.object)
            .map_err(|e| RepoError::InSnapshot {
                snapshot: entry.meta.id,
                cause: Box::new(e),
            })?;
        let old_tags = std::mem::replace(&mut obj.meta.tags, new_tags.clone());
        obj.meta.generation = obj.meta.generation.checked_add(1).ok_or_else(|| {
            RepoError::Invalid(format!(
                "snapshot {}: generation {} cannot be raised",
                entry.meta.id, entry.meta.generation
            ))
        })?;
        repo.ensure_exclusive_lock("tag")?;
        repo.commit_snapshot(&obj)?;
        #[cfg(debug_assertions)]
        super::test_kill("tag_rewrite");
        remove_older(repo, obj.meta.id, obj.meta.generation)?;
        report.changed.push(Retagged {
            id: obj.meta.id,
            old_tags,
            new_tags,
            new_generation: obj.meta.generation,
        });
    }
    Ok(report)
}

/// Removes every object of `id` older than `generation` (the one just
/// replaced, and any left by an interrupted rewrite), oldest first.
fn remove_older(repo: &Repository, id: SnapshotId, generation: u32) -> Result<(), RepoError> {
    let mut older: Vec<_> = repo
        .catalog()
        .snapshots()?
        .into_iter()
        .filter(|(_, m)| m.id == id && m.generation < generation)
        .map(|(o, m)| (m.generation, o))
        .collect();
    older.sort();
    for (_, object) in older {
        repo.ensure_exclusive_lock("tag")?;
        match repo.backend().remove(Kind::Snapshot, &object.to_hex()) {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
        repo.catalog().remove_snapshot(&object)?;
        #[cfg(debug_assertions)]
        super::test_kill("tag_remove");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn add_remove_set() {
        let add = TagChange {
            add: v(&["b", "c"]),
            ..Default::default()
        };
        assert_eq!(add.apply(&v(&["a", "b"])), v(&["a", "b", "c"]));
        let remove = TagChange {
            remove: v(&["a", "x"]),
            ..Default::default()
        };
        assert_eq!(remove.apply(&v(&["a", "b"])), v(&["b"]));
        let both = TagChange {
            add: v(&["c"]),
            remove: v(&["a"]),
            ..Default::default()
        };
        assert_eq!(both.apply(&v(&["a", "b"])), v(&["b", "c"]));
        let set = TagChange {
            set: Some(v(&["z", "z", "y"])),
            ..Default::default()
        };
        assert_eq!(set.apply(&v(&["a"])), v(&["z", "y"]));
        assert_eq!(set.apply(&v(&["z", "y"])), v(&["z", "y"]));
        let clear = TagChange {
            set: Some(vec![]),
            ..Default::default()
        };
        assert!(clear.apply(&v(&["a"])).is_empty());
    }
}
