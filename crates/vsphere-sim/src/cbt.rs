//! Changed block tracking of one disk, as ESXi keeps it in the
//! `-ctk.vmdk`: an epoch (a UUID in vSphere's `52 2d 7b ... bb 7b` form;
//! a new one whenever tracking starts again) and a sequence number. The
//! changeId `<epoch>/<seq>` names a point in the disk's history.
//!
//! The model: writes made while the sequence is `k` are recorded in
//! `log[k]`; a snapshot first bumps the sequence to `t` and is stamped
//! `<epoch>/t`. So the areas changed between the point named `<epoch>/s`
//! and a snapshot stamped `<epoch>/t` are the union of `log[k]` for
//! `s <= k < t`. Disabling tracking drops everything; a changeId of
//! another epoch (or any changeId once tracking restarted) cannot be
//! answered (`FileFault`, as the VDDK guide says for changes "from
//! before change tracking was enabled").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::extents::ExtentSet;

/// A disk's tracking state while CBT is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    pub epoch: String,
    pub sequence: u64,
    /// sequence -> areas written while it was current.
    log: BTreeMap<u64, ExtentSet>,
}

/// Why a changeId cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CbtRefusal {
    /// Not `<epoch>/<seq>`.
    Malformed,
    /// Another epoch, or tracking restarted since.
    OtherEpoch,
    /// A sequence after the snapshot's own.
    AfterSnapshot,
}

impl Tracking {
    /// Tracking that starts now, in a new epoch.
    pub fn start() -> Tracking {
        Tracking {
            epoch: new_epoch(),
            sequence: 0,
            log: BTreeMap::new(),
        }
    }

    /// The current changeId (what the live disk's backing shows).
    pub fn change_id(&self) -> String {
        format!("{}/{}", self.epoch, self.sequence)
    }

    /// A guest write of `[start, end)` (widened to sectors).
    pub fn record(&mut self, start: u64, end: u64) {
        self.log
            .entry(self.sequence)
            .or_default()
            .insert_sectors(start, end);
    }

    /// A snapshot: the next sequence; returns the snapshot's changeId.
    pub fn snapshot(&mut self) -> String {
        self.sequence += 1;
        self.change_id()
    }

    /// Areas changed between changeId `since` and the point stamped
    /// `until` (a snapshot's changeId), both of this epoch.
    pub fn changes(&self, since: &str, until: &str) -> Result<ExtentSet, CbtRefusal> {
        let (e1, s) = split(since).ok_or(CbtRefusal::Malformed)?;
        let (e2, t) = split(until).ok_or(CbtRefusal::Malformed)?;
        if e1 != self.epoch || e2 != self.epoch {
            return Err(CbtRefusal::OtherEpoch);
        }
        if s > t {
            return Err(CbtRefusal::AfterSnapshot);
        }
        let mut out = ExtentSet::default();
        for (_, areas) in self.log.range(s..t) {
            out.union_with(areas);
        }
        Ok(out)
    }
}

/// `<epoch>/<seq>` split on the last '/'.
fn split(change_id: &str) -> Option<(&str, u64)> {
    let (e, s) = change_id.rsplit_once('/')?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((e, s.parse().ok()?))
}

/// 16 random bytes as vSphere prints a CBT epoch:
/// `52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b`.
pub fn new_epoch() -> String {
    let b: [u8; 16] = rand::random();
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!("{}-{}", hex(&b[..8]), hex(&b[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_between_snapshots() {
        let mut t = Tracking::start();
        let at_enable = t.change_id();
        t.record(0, 100);
        let s1 = t.snapshot();
        t.record(4096, 4097);
        t.record(8192, 9000);
        let s2 = t.snapshot();
        t.record(1 << 20, (1 << 20) + 512);
        let s3 = t.snapshot();
        let v = |s: ExtentSet| s.iter().collect::<Vec<_>>();
        assert_eq!(v(t.changes(&at_enable, &s1).unwrap()), vec![(0, 512)]);
        assert_eq!(
            v(t.changes(&s1, &s2).unwrap()),
            vec![(4096, 4608), (8192, 9216)]
        );
        assert_eq!(t.changes(&s1, &s3).unwrap().len(), 3);
        assert!(t.changes(&s2, &s2).unwrap().is_empty());
        assert_eq!(t.changes(&s3, &s2), Err(CbtRefusal::AfterSnapshot));
        let other = Tracking::start();
        assert_eq!(
            t.changes(&other.change_id(), &s2),
            Err(CbtRefusal::OtherEpoch)
        );
        assert_eq!(t.changes("junk", &s2), Err(CbtRefusal::Malformed));
        assert_eq!(new_epoch().len(), 47);
    }
}
