//! The simulator's side of xapi-nbd (xenapi-reference.md §4): export names
//! are `/<vdi-uuid>?session_id=<ref>`; the session is checked at connect
//! time only; a cbt_metadata VDI is refused (xapi-nbd's `VBD.create`
//! fails); while the connection is open the VDI has an attached read-only
//! dom0 VBD, so `list_changed_blocks`, `data_destroy` and `destroy` on it
//! see `VDI_IN_USE`. The protocol itself is `nbd::server` in `XapiLike` mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cbt::CBT_BLOCK_BYTES;
use super::disk::Disk;
use super::model::{Class, Ref};
use super::Core;
use ::nbd::proto;
use ::nbd::server::{Export, ExportError, ExportResolver};

/// Resolves xapi-style export names against the simulator's state.
pub(crate) struct SimResolver {
    pub core: Arc<Core>,
    /// The host whose xapi-nbd this is.
    pub host: Ref,
}

/// `(vdi uuid, session ref)` from `/<uuid>?session_id=<ref>`.
pub fn parse_export_name(name: &str) -> Option<(String, String)> {
    let url = url::Url::parse(&format!("nbd://host{}", name)).ok()?;
    let uuid = url.path().strip_prefix('/')?.to_string();
    let session = url
        .query_pairs()
        .find(|(k, _)| k == "session_id")
        .map(|(_, v)| v.into_owned())?;
    (!uuid.is_empty() && !session.is_empty()).then_some((uuid, session))
}

impl ExportResolver for SimResolver {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, ExportError> {
        let refused = |reason: &str| ExportError::Refused {
            name: "(xapi export)".into(),
            reason: reason.to_string(),
        };
        let (uuid, session) =
            parse_export_name(name).ok_or_else(|| refused("malformed export name"))?;
        if self.core.unavailable() {
            // xapi-nbd cannot check the session while xapi restarts.
            self.core
                .log_call(format!("NBD refused {uuid}: xapi is restarting"));
            return Err(refused("xapi is restarting"));
        }
        let mut st = self.core.lock();
        if st.check_session(&session).is_err() {
            drop(st);
            self.core
                .log_call(format!("NBD refused {uuid}: invalid session"));
            return Err(refused("invalid session"));
        }
        let vdi = st
            .by_uuid(Class::Vdi, &uuid)
            .map_err(|_| ExportError::NotFound(uuid.clone()))?;
        let disk = st
            .vdi(&vdi)
            .ok()
            .and_then(|v| v.data.clone())
            .ok_or_else(|| refused("VDI_INCOMPATIBLE_TYPE cbt_metadata"))?;
        // Assumption: xapi-nbd on a host that does not see the VDI's SR
        // fails to plug its dom0 VBD and closes the connection; clients use
        // the get_nbd_info entries, which list only hosts that see it.
        if st.faults.nbd_down_hosts.contains(&self.host) {
            drop(st);
            self.core
                .log_call(format!("NBD refused {uuid}: xapi-nbd down on this host"));
            return Err(refused("injected fault: xapi-nbd is down on this host"));
        }
        let seen = st
            .vdis
            .get(&vdi)
            .is_some_and(|v| st.host_sees_sr(&self.host, &v.sr));
        if !seen {
            drop(st);
            self.core
                .log_call(format!("NBD refused {uuid}: SR not attached on this host"));
            return Err(refused("the VDI's SR is not attached on this host"));
        }
        self.core.log_call(format!("NBD connect {uuid}"));
        let vbd = st
            .attach_to_dom0_of(&self.host, &vdi, "RO")
            .map_err(|e| refused(&e.to_string()))?;
        let drop_after = st.faults.nbd_drop_after_bytes;
        let expire_after = st.faults.expire_sessions_after_nbd_bytes;
        let rate = st.faults.nbd_rate_bytes_per_s.filter(|r| *r > 0);
        drop(st);
        Ok(Arc::new(SimExport {
            core: self.core.clone(),
            vbd,
            disk,
            drop_after,
            expire_after,
            served: AtomicU64::new(0),
            rate,
            next_free: std::sync::Mutex::new(std::time::Instant::now()),
        }))
    }
}

/// One open NBD connection's view of a VDI; dropping it unplugs and
/// destroys the dom0 VBD.
struct SimExport {
    core: Arc<Core>,
    vbd: Ref,
    disk: Arc<Disk>,
    /// Fault injection: fail reads once this many bytes were served.
    drop_after: Option<u64>,
    /// Fault injection: end every session (a xapi restart) and drop this
    /// connection once this many bytes were served.
    expire_after: Option<u64>,
    served: AtomicU64,
    /// Bytes per second this connection serves at most.
    rate: Option<u64>,
    /// When the connection's link is free again (reads queue behind it).
    next_free: std::sync::Mutex<std::time::Instant>,
}

impl Drop for SimExport {
    fn drop(&mut self) {
        self.core.lock().detach_and_destroy(&self.vbd);
    }
}

impl Export for SimExport {
    fn size_bytes(&self) -> u64 {
        self.disk.size_bytes()
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ExportError> {
        let before = self.served.fetch_add(len as u64, Ordering::AcqRel);
        if let Some(limit) = self.expire_after {
            if before + len as u64 > limit {
                let mut st = self.core.lock();
                // One shot, whichever connection crosses it first.
                if st.faults.expire_sessions_after_nbd_bytes.take().is_some() {
                    self.core.restart_xapi(&mut st);
                    return Err(ExportError::Io(
                        "injected fault: xapi restarted, every session ended".into(),
                    ));
                }
            }
        }
        if let Some(limit) = self.drop_after {
            if before + len as u64 > limit {
                // xapi-nbd drops the connection on an I/O error mid-read.
                return Err(ExportError::Io("injected fault: connection dropped".into()));
            }
        }
        if let Some(rate) = self.rate {
            // The read leaves when the link has carried the ones before it.
            let done = {
                let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
                let start = (*next).max(std::time::Instant::now());
                *next = start + std::time::Duration::from_secs_f64(len as f64 / rate as f64);
                *next
            };
            let now = std::time::Instant::now();
            if done > now {
                std::thread::sleep(done - now);
            }
        }
        self.disk
            .read(offset, len as usize)
            .map_err(|e| ExportError::Io(e.to_string()))
    }

    fn reads_may_block(&self) -> bool {
        self.rate.is_some()
    }

    fn zero_extents(&self, offset: u64, len: u32) -> Vec<(u32, u32)> {
        // Never asked in XapiLike mode (no block status); answer honestly anyway.
        let end = offset
            .saturating_add(len as u64)
            .min(self.disk.size_bytes());
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        while at < end {
            let block = at / CBT_BLOCK_BYTES;
            let next = ((block + 1) * CBT_BLOCK_BYTES).min(end);
            let flags = if self.disk.is_allocated(block) {
                0
            } else {
                proto::STATE_HOLE | proto::STATE_ZERO
            };
            let n = (next - at) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => out.push((n, flags)),
            }
            at = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names() {
        assert_eq!(
            parse_export_name("/1f0e-aa?session_id=OpaqueRef:abc-1"),
            Some(("1f0e-aa".into(), "OpaqueRef:abc-1".into()))
        );
        assert_eq!(parse_export_name("/1f0e-aa"), None);
        assert_eq!(parse_export_name("?session_id=x"), None);
        assert_eq!(parse_export_name(""), None);
    }
}
