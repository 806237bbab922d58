//! The host side of `forget`: after the repository part, destroys on each
//! XenServer host the `cbt_metadata` landmarks that only forgotten
//! snapshots recorded (planning and checks in
//! [`crate::source::xenapi::landmarks`]). An unreachable host is a
//! warning naming what stays there, never a failure of the repository part.

use anyhow::{bail, Result};

use std::collections::BTreeMap;

use super::backup::{xen_password, xen_session, XenOptions};
use crate::format::snapshot::SnapshotMeta;
use crate::output::{plural, Ui};
use crate::source::xenapi::landmarks::{self, Landmark, Outcome, Released};
use crate::source::xenapi::XenUrl;

/// What the host side did (`--json`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostCleanup {
    /// Every landmark the hosts were asked about, with its outcome.
    pub released: Vec<Released>,
    /// Landmarks left to clean: `--no-host`, or their host not reached.
    pub left: Vec<LeftLandmark>,
}

/// A landmark not looked at on its host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeftLandmark {
    #[serde(flatten)]
    pub landmark: Landmark,
    pub reason: String,
}

/// How many hosts `left` names.
fn hosts_of(left: &[LeftLandmark]) -> usize {
    left.iter()
        .map(|l| l.landmark.host.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

impl HostCleanup {
    /// Landmarks the host part could not release: its host not reached
    /// (or `--no-host`), or the destroy failed. A refusal (the host says it
    /// is not ours to destroy) is not counted: leaving it is the answer.
    pub fn undone(&self) -> usize {
        self.left.len()
            + self
                .released
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Failed { .. }))
                .count()
    }

    /// Landmarks still on a host after this (left, refused or failed).
    pub fn remaining(&self) -> usize {
        self.left.len()
            + self
                .released
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Refused { .. } | Outcome::Failed { .. }))
                .count()
    }
}

/// A `xen://` URL for `authority` (`HOST:PORT`) that `xen_session` logs in with.
fn host_url(authority: &str) -> Result<XenUrl> {
    Ok(XenUrl::parse(&format!(
        "xen://{authority}/vdi/00000000-0000-0000-0000-000000000000"
    ))?)
}

/// Refuses, before anything changes, a forget whose host part could not
/// log in for want of a password: once the snapshots are gone nothing
/// records their landmarks, which would stay on the hosts for good.
/// (An unreachable host is only known later, and only warned about.)
pub fn preflight(
    xen: &XenOptions,
    per_host: &BTreeMap<String, XenOptions>,
    forgotten: &[SnapshotMeta],
    remaining: &[SnapshotMeta],
) -> Result<()> {
    let plan = landmarks::plan(forgotten, remaining);
    if plan.is_empty() {
        return Ok(());
    }
    let unusable = plan
        .keys()
        .filter(|h| per_host.is_empty() || per_host.contains_key(*h))
        .find_map(|h| xen_password(per_host.get(h).unwrap_or(xen)).err());
    if let Some(e) = unusable {
        let count: usize = plan.values().map(Vec::len).sum();
        let hosts: Vec<&str> = plan.keys().map(String::as_str).collect();
        let e = crate::json::one_line(&e);
        bail!(
            "{e}: forget would destroy {} on XenServer {} {}; nothing was changed (give the password, or --no-host to touch only the repository and list them)",
            plural(count, "landmark VDI"),
            if hosts.len() == 1 { "host" } else { "hosts" },
            hosts.join(", ")
        );
    }
    Ok(())
}

/// Plans which landmarks `forgotten` leaves useless (given `remaining`),
/// then releases them host by host (unless `no_host`), with the connection
/// options of `backup`. `repository` is this repository's id.
pub fn clean_host(
    ui: &Ui,
    xen: &XenOptions,
    per_host: &BTreeMap<String, XenOptions>,
    repository: &str,
    forgotten: &[SnapshotMeta],
    remaining: &[SnapshotMeta],
    no_host: bool,
) -> Result<HostCleanup> {
    let plan = landmarks::plan(forgotten, remaining);
    let mut report = HostCleanup::default();
    for (host, items) in plan {
        let leave = |report: &mut HostCleanup, reason: &str| {
            report
                .left
                .extend(items.iter().cloned().map(|landmark| LeftLandmark {
                    landmark,
                    reason: reason.to_string(),
                }))
        };
        if no_host {
            leave(&mut report, "--no-host");
            continue;
        }
        // A job names its hosts: another host's landmarks are left rather
        // than sent the credentials of one of them.
        if !per_host.is_empty() && !per_host.contains_key(&host) {
            leave(&mut report, "not one of the job's hosts");
            continue;
        }
        let login = per_host.get(&host).unwrap_or(xen);
        let session = match host_url(&host).and_then(|url| xen_session(ui, &url, login)) {
            Ok(s) => s,
            Err(e) => {
                let e = crate::json::one_line(&e);
                let names: Vec<&str> = items.iter().map(|l| l.landmark.as_str()).collect();
                ui.warn(format!(
                    "cannot reach XenServer host '{host}' ({e}): its landmark VDIs {} stay there until the next backup from this repository on that host removes them (they carry its marker), or destroy them by hand once the host is back (xe vdi-destroy uuid=UUID)",
                    names.join(", ")
                ));
                leave(&mut report, &format!("host not reached: {e}"));
                continue;
            }
        };
        let released = landmarks::release(&session, repository, &items);
        session.logout();
        for r in &released {
            let l = &r.landmark;
            match &r.outcome {
                Outcome::Destroyed => ui.info(format!(
                    "destroyed landmark {} of VDI {} on {host}",
                    l.landmark, l.vdi
                )),
                Outcome::AlreadyGone => ui.info(format!(
                    "landmark {} of VDI {} was already gone from {host}",
                    l.landmark, l.vdi
                )),
                Outcome::Refused { reason } => ui.warn(format!(
                    "left landmark {} of VDI {} on {host}: {reason}",
                    l.landmark, l.vdi
                )),
                Outcome::Failed { error } => ui.warn(format!(
                    "could not destroy landmark {} of VDI {} on {host}: {error}",
                    l.landmark, l.vdi
                )),
            }
        }
        report.released.extend(released);
    }
    if !report.left.is_empty() && no_host {
        ui.info(format!(
            "--no-host: {} left on {}; the next backup from this repository on each host removes them, or destroy them by hand (xe vdi-destroy uuid=UUID):",
            plural(report.left.len(), "landmark VDI"),
            if hosts_of(&report.left) == 1 { "the host" } else { "the hosts" }
        ));
        for l in &report.left {
            ui.info(format!(
                "  {} (VDI {} on {})",
                l.landmark.landmark, l.landmark.vdi, l.landmark.host
            ));
        }
    }
    Ok(report)
}
