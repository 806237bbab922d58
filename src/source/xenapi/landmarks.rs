//! The host side of retention: which `cbt_metadata` landmarks a forget
//! leaves useless ([`plan`], pure), and releasing them on the host with
//! every safety check ([`release`]). Also used by a backup that starts a
//! new set because tracking was lost, for the landmark it supersedes.
//!
//! A landmark is released only when no remaining snapshot records it, and
//! destroyed only when the host confirms it is a `cbt_metadata` snapshot of
//! the live VDI the repository recorded, not marked by another repository
//! (reference §2.7, §2.8: destroying a chain member merges its CBT bits
//! into the next one, so later incrementals are unaffected).

use std::collections::{BTreeMap, BTreeSet};

use super::client::Session;
use super::workflow::{keys, marker};
use super::XenApiError;
use crate::format::snapshot::SnapshotMeta;

/// One landmark VDI to release, as the repository recorded it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Landmark {
    /// `HOST:PORT` (`xen.host`).
    pub host: String,
    /// The live VDI it is a snapshot of (`xen.vdi`).
    #[serde(rename = "vdi_uuid")]
    pub vdi: String,
    /// The landmark's own uuid (`xen.snapshot_vdi`).
    #[serde(rename = "landmark_vdi_uuid")]
    pub landmark: String,
}

impl Landmark {
    /// The landmark a disk snapshot records, if it records a whole one.
    pub fn of(meta: &SnapshotMeta) -> Option<Landmark> {
        let l = &meta.landmark;
        if l.get(keys::KIND).is_some_and(|k| k != "disk") {
            return None;
        }
        Some(Landmark {
            host: l.get(keys::HOST)?.clone(),
            vdi: l.get(keys::VDI)?.clone(),
            landmark: l.get(keys::SNAPSHOT_VDI)?.clone(),
        })
    }
}

/// The landmarks to release, by host (`HOST:PORT`), each once.
///
/// A landmark of a forgotten disk snapshot is released unless a remaining
/// snapshot records the same uuid (a re-run, a folded child): the next
/// incremental of a disk starts from the landmark of its newest remaining
/// snapshot, so no other landmark can be used any more. Snapshots that
/// record no host, live VDI or landmark uuid have nothing to release.
pub fn plan(
    forgotten: &[SnapshotMeta],
    remaining: &[SnapshotMeta],
) -> BTreeMap<String, Vec<Landmark>> {
    let kept: BTreeSet<&str> = remaining
        .iter()
        .filter_map(|m| m.landmark.get(keys::SNAPSHOT_VDI))
        .map(String::as_str)
        .collect();
    let mut seen = BTreeSet::new();
    let mut out: BTreeMap<String, Vec<Landmark>> = BTreeMap::new();
    for l in forgotten.iter().filter_map(Landmark::of) {
        if kept.contains(l.landmark.as_str()) || !seen.insert(l.landmark.clone()) {
            continue;
        }
        out.entry(l.host.clone()).or_default().push(l);
    }
    out
}

/// What happened to one landmark.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// `VDI.destroy` succeeded.
    Destroyed,
    /// The host no longer has it (`UUID_INVALID`, `VDI_MISSING`,
    /// `HANDLE_INVALID`).
    AlreadyGone,
    /// A safety check failed: left on the host (why).
    Refused { reason: String },
    /// A call failed: left on the host (the error).
    Failed { error: String },
}

/// One landmark and its outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Released {
    #[serde(flatten)]
    pub landmark: Landmark,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Codes that mean the object is gone.
fn gone(e: &XenApiError) -> bool {
    matches!(
        e.code(),
        Some("UUID_INVALID" | "VDI_MISSING" | "HANDLE_INVALID")
    )
}

fn failed(step: &str, e: &XenApiError) -> Outcome {
    Outcome::Failed {
        error: format!("{step}: {e}"),
    }
}

/// Releases each landmark in turn (one failure does not stop the others);
/// `repository` is this repository's id.
pub fn release(session: &Session, repository: &str, items: &[Landmark]) -> Vec<Released> {
    items
        .iter()
        .map(|l| Released {
            landmark: l.clone(),
            outcome: release_one(session, repository, l),
        })
        .collect()
}

/// Destroys `l` only if the host confirms: a snapshot (`is_a_snapshot`) of
/// type `cbt_metadata` (one that kept its data is kept), `snapshot_of` the
/// recorded live VDI (or, when that VDI is gone, marked by this
/// repository), and no marker of another repository. Unmarked landmarks
/// (older versions) pass on the type and `snapshot_of` checks alone.
pub fn release_one(session: &Session, repository: &str, l: &Landmark) -> Outcome {
    let vdi_ref = match session.vdi_by_uuid(&l.landmark) {
        Ok(r) => r,
        Err(e) if gone(&e) => return Outcome::AlreadyGone,
        Err(e) => return failed("VDI.get_by_uuid", &e),
    };
    let rec = match session.vdi_record(&vdi_ref) {
        Ok(r) => r,
        Err(e) if gone(&e) => return Outcome::AlreadyGone,
        Err(e) => return failed("VDI.get_record", &e),
    };
    let refuse = |reason: String| Outcome::Refused { reason };
    let mark = rec.other_config.get(marker::REPOSITORY);
    if let Some(other) = mark.filter(|m| *m != repository) {
        return refuse(format!("marked by another repository ({other})"));
    }
    if !rec.is_a_snapshot {
        return refuse("not a snapshot".into());
    }
    if rec.vdi_type != "cbt_metadata" {
        return refuse(format!(
            "type '{}', not cbt_metadata: it still has data",
            rec.vdi_type
        ));
    }
    match session.vdi_by_uuid(&l.vdi) {
        Ok(live) if rec.snapshot_of == live => {}
        Ok(_) => return refuse(format!("not a snapshot of VDI {}", l.vdi)),
        Err(e) if gone(&e) => {
            if mark.is_none() {
                return refuse(format!(
                    "VDI {} is gone and the landmark carries no marker of this repository",
                    l.vdi
                ));
            }
        }
        Err(e) => return failed("VDI.get_by_uuid of the live VDI", &e),
    }
    match session.vdi_destroy(&vdi_ref) {
        Ok(()) => Outcome::Destroyed,
        Err(e) if gone(&e) => Outcome::AlreadyGone,
        Err(e) => failed("VDI.destroy", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ids::SnapshotId;
    use crate::format::snapshot::ReadMode;

    fn meta(n: u8, vdi: &str, landmark: Option<&str>, kind: &str) -> SnapshotMeta {
        let mut l = BTreeMap::new();
        l.insert(keys::HOST.to_string(), "h1:443".to_string());
        l.insert(keys::VDI.to_string(), vdi.to_string());
        l.insert(keys::KIND.to_string(), kind.to_string());
        if let Some(u) = landmark {
            l.insert(keys::SNAPSHOT_VDI.to_string(), u.to_string());
        }
        SnapshotMeta {
            id: SnapshotId([n; 16]),
            generation: 0,
            time: chrono::DateTime::from_timestamp(1_700_000_000 + n as i64 * 3600, 0).unwrap(),
            hostname: "h".into(),
            source: format!("xen://h1:443/vdi/{vdi}"),
            disk_size_bytes: 1 << 20,
            block_size: 65536,
            parent: None,
            backup_set: SnapshotId([n; 16]),
            tags: Vec::new(),
            landmark: l,
            read_mode: ReadMode::All,
            new_set_reason: None,
        }
    }

    fn uuids(p: &BTreeMap<String, Vec<Landmark>>) -> Vec<&str> {
        p.values().flatten().map(|l| l.landmark.as_str()).collect()
    }

    #[test]
    fn newest_kept_keeps_its_landmark() {
        let all = [
            meta(1, "a", Some("l1"), "disk"),
            meta(2, "a", Some("l2"), "disk"),
            meta(3, "a", Some("l3"), "disk"),
        ];
        let p = plan(&all[..2], &all[2..]);
        assert_eq!(uuids(&p), ["l1", "l2"]);
        let l = &p["h1:443"][0];
        assert_eq!((l.host.as_str(), l.vdi.as_str()), ("h1:443", "a"));
    }

    #[test]
    fn newest_forgotten_releases_its_landmark() {
        let all = [
            meta(1, "a", Some("l1"), "disk"),
            meta(2, "a", Some("l2"), "disk"),
        ];
        let p = plan(&all[1..], &all[..1]);
        assert_eq!(uuids(&p), ["l2"]);
    }

    #[test]
    fn a_landmark_a_remaining_snapshot_records_is_never_released() {
        // A re-run (or a folded child) recording the same uuid.
        let all = [
            meta(1, "a", Some("l1"), "disk"),
            meta(2, "a", Some("l1"), "disk"),
            meta(3, "b", Some("l3"), "disk"),
            meta(4, "b", Some("l3"), "disk"),
        ];
        let p = plan(
            &[all[0].clone(), all[2].clone(), all[3].clone()],
            &all[1..2],
        );
        assert_eq!(uuids(&p), ["l3"], "each landmark once");
        assert!(plan(&all, &all).is_empty());
    }

    #[test]
    fn only_disks_with_a_whole_record_count() {
        let mut no_host = meta(3, "a", Some("l3"), "disk");
        no_host.landmark.remove(keys::HOST);
        let forgotten = [
            meta(1, "a", None, "disk"),
            meta(2, "a", Some("l2"), "vm-metadata"),
            no_host,
        ];
        assert!(plan(&forgotten, &[]).is_empty());
    }

    #[test]
    fn grouped_by_host() {
        let mut other = meta(2, "b", Some("l2"), "disk");
        other
            .landmark
            .insert(keys::HOST.to_string(), "h2:443".to_string());
        let p = plan(&[meta(1, "a", Some("l1"), "disk"), other], &[]);
        assert_eq!(p.keys().collect::<Vec<_>>(), ["h1:443", "h2:443"]);
        assert_eq!(p["h2:443"][0].vdi, "b");
    }

    #[test]
    fn outcomes_serialise_with_their_kind() {
        let r = Released {
            landmark: Landmark {
                host: "h:443".into(),
                vdi: "v".into(),
                landmark: "l".into(),
            },
            outcome: Outcome::Refused {
                reason: "not a snapshot".into(),
            },
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["outcome"], "refused");
        assert_eq!(j["reason"], "not a snapshot");
        assert_eq!(j["landmark_vdi_uuid"], "l");
    }
}
