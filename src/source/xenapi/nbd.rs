//! Reading a frozen VDI: over NBD as `VDI.get_nbd_info` describes it
//! (reference §2.6, §4): TLS with the returned `cert` pinned and `subject`
//! as the server name, `NBD_OPT_EXPORT_NAME` with the session-bearing
//! export name, connections spread over the returned entries and opened
//! one after another, never more than the host's 16; or, for hosts without
//! an NBD network, `/export_raw_vdi` spooled to a sparse temporary file.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ::bytes::BytesMut;
use ::nbd::client::{Address, ConnectOptions};
use ::nbd::tls::{TlsOptions, Trust};
use ::nbd::{NbdError, NbdPool, PoolOptions};

use super::client::{NbdInfo, Session};
use super::XenApiError;
use crate::source::nbd::NbdLimits;
use crate::source::{BlockSource, SourceError};

/// xapi-nbd's limit per host (reference §4).
pub const HOST_CONNECTION_LIMIT: usize = 16;

/// Fetches `VDI.get_nbd_info` again (logging in again when the session
/// died): what an [`NbdSet`] reconnects with once its export names hold a
/// dead session.
pub type Renew<'s> = Box<dyn Fn() -> Result<Vec<NbdInfo>, String> + Send + Sync + 's>;

/// Renewals of the connections per read before the read fails.
const RENEWALS_PER_READ: u32 = 3;
/// Tries of one renewal (a host whose xapi restarts answers again within
/// seconds): waits of 0.5, 1, 2, 4, 8 s between them.
const RENEW_TRIES: u32 = 6;

/// One VDI read over NBD through several entries of `get_nbd_info`.
pub struct NbdSet<'s> {
    runtime: tokio::runtime::Runtime,
    /// The pools, replaced whole when the connections are renewed.
    pools: std::sync::RwLock<Arc<Vec<NbdPool>>>,
    /// Counts renewals, so that threads that failed on the same pools
    /// renew once.
    generation: std::sync::atomic::AtomicU64,
    renewing: std::sync::Mutex<()>,
    next: AtomicUsize,
    identity: String,
    size_bytes: u64,
    connections: usize,
    limits: NbdLimits,
    renew: Option<Renew<'s>>,
    /// Successful renewals, shared with whoever reports them (the set
    /// itself is usually boxed as a `BlockSource` by then).
    renewed: Arc<AtomicUsize>,
}

/// Opens `connections` (at most 16) spread over `entries` in turn, one
/// after another. An entry that cannot be reached is skipped; no entry at
/// all is an error.
fn open_pools(
    runtime: &tokio::runtime::Runtime,
    entries: &[NbdInfo],
    expected_size: u64,
    connections: usize,
    limits: NbdLimits,
) -> Result<Vec<NbdPool>, NbdError> {
    let total = connections.clamp(1, HOST_CONNECTION_LIMIT);
    let used = entries.len().min(total).max(1);
    let mut pools = Vec::new();
    let mut last_error = None;
    // Entries in order until `used` answer: one that cannot be reached
    // gives its place to the next (another host, another network).
    for e in entries {
        if pools.len() == used {
            break;
        }
        // Spread the connections: the first entries take the remainder.
        let k = pools.len();
        let share = total / used + usize::from(k < total % used);
        let options = ConnectOptions {
            address: Address::Tcp {
                host: e.address.clone(),
                port: e.port,
            },
            export: e.exportname.clone(),
            tls: Some(TlsOptions {
                trust: Trust::PinnedPem(e.cert.as_bytes().to_vec()),
                server_name: e.subject.clone(),
                client: None,
            }),
            // xapi-nbd has no structured replies nor block status.
            meta_contexts: Vec::new(),
            timeout: limits.io_timeout,
        };
        let pool = limits.pool(PoolOptions {
            connections: share.max(1),
            ..PoolOptions::default()
        });
        match runtime.block_on(NbdPool::connect(options, pool)) {
            Ok(p) => pools.push(p),
            Err(err) if err.is_connection_failure() => last_error = Some(err),
            // The pin is the host's own answer: no option of ours helps.
            Err(NbdError::CertificateRefused { address, refused }) => {
                return Err(NbdError::Invalid(format!(
                    "the host's NBD server {address} does not present the certificate VDI.get_nbd_info describes: {refused}"
                )))
            }
            Err(err) => return Err(err),
        }
    }
    let Some(first) = pools.first() else {
        return Err(last_error
            .unwrap_or_else(|| NbdError::Invalid("VDI.get_nbd_info returned no entry".into())));
    };
    let size_bytes = first.size_bytes;
    if size_bytes != expected_size || pools.iter().any(|p| p.size_bytes != size_bytes) {
        return Err(NbdError::Invalid(format!(
            "the NBD export has {size_bytes} bytes where the VDI's virtual_size is {expected_size}"
        )));
    }
    Ok(pools)
}

impl<'s> NbdSet<'s> {
    /// Opens `connections` (at most 16) spread over `entries` in turn,
    /// one after another. An entry that cannot be reached is skipped; no
    /// entry at all is an error.
    pub fn connect(
        entries: &[NbdInfo],
        identity: String,
        expected_size: u64,
        connections: usize,
        limits: NbdLimits,
    ) -> Result<NbdSet<'s>, NbdError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(NbdError::io("start runtime"))?;
        let pools = open_pools(&runtime, entries, expected_size, connections, limits)?;
        Ok(NbdSet {
            runtime,
            pools: std::sync::RwLock::new(Arc::new(pools)),
            generation: std::sync::atomic::AtomicU64::new(0),
            renewing: std::sync::Mutex::new(()),
            next: AtomicUsize::new(0),
            identity,
            size_bytes: expected_size,
            connections,
            limits,
            renew: None,
            renewed: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// When a read fails (a connection dropped and could not reconnect,
    /// e.g. because its export name holds a session that died), `renew`
    /// fetches fresh entries and the connections are opened again, a
    /// bounded number of times, before the read is retried.
    pub fn renewing_with(mut self, renew: Renew<'s>) -> Self {
        self.renew = Some(renew);
        self
    }

    /// Counts the times the connections were renewed, readable after the
    /// set is handed on.
    pub fn renewal_counter(&self) -> Arc<AtomicUsize> {
        self.renewed.clone()
    }

    fn current(&self) -> (u64, Arc<Vec<NbdPool>>) {
        let pools = self.pools.read().unwrap_or_else(|e| e.into_inner()).clone();
        (
            self.generation.load(std::sync::atomic::Ordering::Acquire),
            pools,
        )
    }

    pub fn connection_count(&self) -> usize {
        self.current().1.iter().map(|p| p.connection_count()).sum()
    }

    /// Why fewer connections than `asked` are open, when that is so: one
    /// line, for the user (the backup goes on with those that opened).
    pub fn fewer_connections(&self, asked: usize) -> Option<String> {
        let open = self.connection_count();
        let asked = asked.clamp(1, HOST_CONNECTION_LIMIT);
        if open >= asked {
            return None;
        }
        let pools = self.current().1;
        let why: Vec<&str> = pools.iter().filter_map(|p| p.fewer_connections()).collect();
        Some(format!(
            "{open} of {asked} NBD connections open{}; continuing with {open}",
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join("; "))
            }
        ))
    }

    /// Opens the connections again from fresh `get_nbd_info` entries,
    /// unless another thread already did since `seen`.
    fn renew_after(&self, seen: u64, cause: &str) -> Result<(), String> {
        let Some(renew) = &self.renew else {
            return Err(cause.to_string());
        };
        let _one = self.renewing.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(std::sync::atomic::Ordering::Acquire) != seen {
            return Ok(());
        }
        let mut wait = std::time::Duration::from_millis(500);
        let mut last = cause.to_string();
        for attempt in 1..=RENEW_TRIES {
            if attempt > 1 {
                std::thread::sleep(wait);
                wait *= 2;
            }
            let entries = match renew() {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => {
                    last = "VDI.get_nbd_info returned no NBD server".into();
                    continue;
                }
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match open_pools(
                &self.runtime,
                &entries,
                self.size_bytes,
                self.connections,
                self.limits,
            ) {
                Ok(pools) => {
                    let old = std::mem::replace(
                        &mut *self.pools.write().unwrap_or_else(|e| e.into_inner()),
                        Arc::new(pools),
                    );
                    self.generation
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    self.renewed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(old) = Arc::try_unwrap(old) {
                        self.runtime.block_on(async move {
                            for p in old {
                                p.close().await;
                            }
                        });
                    }
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "{cause}; reconnecting with a fresh session failed {RENEW_TRIES} times, last: {last}"
        ))
    }

    /// Disconnects every connection (NBD_CMD_DISC), so that the host
    /// detaches the VDI from dom0 before VM.destroy / data_destroy.
    pub fn close(self) {
        drop(self);
    }

    /// One attempt at `reads` with the current pools: dealt round-robin
    /// over the hosts' pools, each filling the caller's buffer in place.
    fn read_once(&self, pools: &[NbdPool], reads: &mut [(u64, BytesMut)]) -> Result<(), NbdError> {
        let n = pools.len();
        if n == 0 {
            return Err(NbdError::Invalid("no NBD connection".into()));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut shares: Vec<Vec<(u64, BytesMut)>> = (0..n).map(|_| Vec::new()).collect();
        for (i, (at, buf)) in reads.iter_mut().enumerate() {
            shares[(start + i) % n].push((*at, std::mem::take(buf)));
        }
        let result = self.runtime.block_on(async {
            let futures = pools
                .iter()
                .zip(shares.iter_mut())
                .map(|(p, s)| p.read_owned(s));
            for r in ::nbd::join_all(futures).await {
                r?;
            }
            Ok::<(), NbdError>(())
        });
        // Hand the buffers back in their original order.
        let mut taken: Vec<_> = shares.into_iter().map(|s| s.into_iter()).collect();
        for (i, slot) in reads.iter_mut().enumerate() {
            if let Some((_, buf)) = taken[(start + i) % n].next() {
                slot.1 = buf;
            }
        }
        result
    }
}

impl Drop for NbdSet<'_> {
    fn drop(&mut self) {
        let pools = std::mem::take(&mut *self.pools.write().unwrap_or_else(|e| e.into_inner()));
        if let Ok(pools) = Arc::try_unwrap(pools) {
            if !pools.is_empty() {
                self.runtime.block_on(async move {
                    for p in pools {
                        p.close().await;
                    }
                });
            }
        }
    }
}

impl BlockSource for NbdSet<'_> {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_many(&mut [(offset, buf)])
    }

    /// Through [`Self::read_owned`] and a copy (only single reads use it).
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        let mut owned: Vec<(u64, BytesMut)> = reads
            .iter()
            .map(|(at, buf)| (*at, BytesMut::zeroed(buf.len())))
            .collect();
        self.read_owned(&mut owned)?;
        for ((_, dst), (_, src)) in reads.iter_mut().zip(&owned) {
            dst.copy_from_slice(src);
        }
        Ok(())
    }

    /// Every read in flight at once; when they fail and the set can renew
    /// its connections (a dead session in the export names, a host whose
    /// xapi restarted), renews them and reads again, a bounded number of
    /// times. Reads are idempotent, so a retried batch reads the same bytes.
    fn read_owned(&self, reads: &mut [(u64, BytesMut)]) -> Result<(), SourceError> {
        let first = reads.first().map(|r| r.0).unwrap_or(0);
        let failed = |reason: String| SourceError::Invalid {
            source_name: self.identity.clone(),
            reason,
        };
        // A failed attempt may keep some buffers: each retry starts from
        // buffers of the asked lengths, and a read that hands back another
        // length is an error, never short data.
        let lens: Vec<usize> = reads.iter().map(|r| r.1.len()).collect();
        let mut renewals = 0;
        loop {
            for ((_, buf), &len) in reads.iter_mut().zip(&lens) {
                if buf.len() != len {
                    *buf = BytesMut::zeroed(len);
                }
            }
            let (generation, pools) = self.current();
            match self.read_once(&pools, reads) {
                Ok(()) if reads.iter().zip(&lens).all(|(r, &len)| r.1.len() == len) => {
                    return Ok(())
                }
                Ok(()) => {
                    return Err(failed(format!(
                        "read from byte {first}: a read came back with a length other than asked"
                    )))
                }
                Err(e) if self.renew.is_some() && renewals < RENEWALS_PER_READ => {
                    renewals += 1;
                    drop(pools);
                    self.renew_after(generation, &e.to_string())
                        .map_err(|why| failed(format!("read from byte {first}: {why}")))?;
                }
                Err(e) => return Err(failed(format!("read from byte {first}: {e}"))),
            }
        }
    }
}

/// A whole VDI fetched with `/export_raw_vdi` into a sparse temporary
/// file (zero blocks are not written), removed when dropped.
pub struct SpooledExport {
    file: std::fs::File,
    path: PathBuf,
    identity: String,
    size_bytes: u64,
}

impl SpooledExport {
    pub fn fetch(
        session: &Session,
        vdi_uuid: &str,
        identity: String,
        size_bytes: u64,
        dir: &std::path::Path,
    ) -> Result<SpooledExport, XenApiError> {
        let path = dir.join(format!(
            "cbtvault-export-{}-{:08x}.raw",
            vdi_uuid,
            rand::random::<u32>()
        ));
        let io = |what: &str| {
            let what = format!("{what} '{}'", path.display());
            move |source| XenApiError::Io { what, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io("create spool file"))?;
        let spooled = SpooledExport {
            file,
            path: path.clone(),
            identity,
            size_bytes,
        };
        spooled
            .file
            .set_len(size_bytes)
            .map_err(io("size spool file"))?;
        let mut resp = session.export_raw_vdi(vdi_uuid)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            // Fill the buffer fully (or to EOF) so zero runs are skipped in big pieces.
            let mut filled = 0;
            while filled < buf.len() {
                match resp.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(XenApiError::Protocol {
                            what: "GET /export_raw_vdi".into(),
                            reason: format!("stream broke at byte {}: {e}", at + filled as u64),
                        })
                    }
                }
            }
            if filled == 0 {
                break;
            }
            if at + filled as u64 > size_bytes {
                return Err(XenApiError::Protocol {
                    what: "GET /export_raw_vdi".into(),
                    reason: format!("more than the VDI's {size_bytes} bytes"),
                });
            }
            for (k, chunk) in buf[..filled].chunks(65536).enumerate() {
                if chunk.iter().any(|b| *b != 0) {
                    spooled
                        .file
                        .write_all_at(chunk, at + (k * 65536) as u64)
                        .map_err(io("write spool file"))?;
                }
            }
            at += filled as u64;
        }
        if at != size_bytes {
            return Err(XenApiError::Protocol {
                what: "GET /export_raw_vdi".into(),
                reason: format!("stream ended at byte {at} of {size_bytes} (truncated export)"),
            });
        }
        Ok(spooled)
    }
}

impl Drop for SpooledExport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl BlockSource for SpooledExport {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if offset + buf.len() as u64 > self.size_bytes {
            return Err(SourceError::Invalid {
                source_name: self.identity.clone(),
                reason: format!("read {offset}+{} beyond the end", buf.len()),
            });
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|error| SourceError::Io {
                source_name: self.identity.clone(),
                op: "read spooled export",
                offset,
                error,
            })
    }
}

/// Bytes held in memory as a source (the VM metadata export).
pub struct MemorySource {
    pub identity: String,
    pub bytes: Vec<u8>,
}

impl BlockSource for MemorySource {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn size_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.bytes.get(start..start.saturating_add(buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(SourceError::Invalid {
                source_name: self.identity.clone(),
                reason: format!("read {offset}+{} beyond the end", buf.len()),
            }),
        }
    }
}
