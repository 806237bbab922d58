//! An NBD export as a block source: a synchronous [`BlockSource`] facade
//! over the `nbd` crate's connection pool, for the backup pipeline. The
//! protocol, the pool and URIs are the `nbd` crate's; the XenServer source
//! uses the pool directly (`source::xenapi::nbd`).

use std::time::Duration;

use ::bytes::BytesMut;
use ::nbd::client::ConnectOptions;
use ::nbd::tls::TlsOptions;
use ::nbd::{NbdError, NbdPool, NbdUri, PoolOptions};

use super::{BlockSource, SourceError};

/// The limits every NBD source of the product opens with (backup's
/// `--max-disk-size` and `--io-timeout`; the XenServer source and restore's
/// read-back use them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Largest export accepted; a larger one is refused before any read.
    pub max_disk_size_bytes: u64,
    /// The longest the handshake, and each request with its retry, may
    /// wait for the server.
    pub io_timeout: Duration,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            max_disk_size_bytes: ::nbd::pool::DEFAULT_MAX_SIZE_BYTES,
            io_timeout: Duration::from_secs(60),
        }
    }
}

impl NbdLimits {
    /// `pool` with this export size limit.
    pub fn pool(&self, pool: PoolOptions) -> PoolOptions {
        PoolOptions {
            max_size_bytes: self.max_disk_size_bytes,
            ..pool
        }
    }
}

/// An NBD export as a synchronous block source for the backup pipeline.
pub struct NbdSource {
    runtime: tokio::runtime::Runtime,
    pool: Option<NbdPool>,
    identity: String,
    size_bytes: u64,
}

impl NbdSource {
    /// Opens the pool under `limits` (whose size limit replaces `pool`'s).
    pub fn connect(
        uri: &NbdUri,
        identity: String,
        tls: Option<TlsOptions>,
        meta_contexts: Vec<String>,
        pool: PoolOptions,
        limits: NbdLimits,
    ) -> Result<NbdSource, NbdError> {
        if uri.tls && tls.is_none() {
            return Err(NbdError::Invalid(
                "the URI asks for TLS (nbds): give --tls-ca or --tls-cert-pin".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(NbdError::io("start runtime"))?;
        let options = ConnectOptions {
            address: uri.address.clone(),
            export: uri.export.clone(),
            tls,
            meta_contexts,
            timeout: limits.io_timeout,
        };
        let pool = runtime.block_on(NbdPool::connect(options, limits.pool(pool)))?;
        Ok(NbdSource {
            size_bytes: pool.size_bytes,
            runtime,
            pool: Some(pool),
            identity,
        })
    }

    pub fn pool(&self) -> &NbdPool {
        self.pool.as_ref().expect("open until dropped")
    }

    fn read_error(&self, first: u64, e: NbdError) -> SourceError {
        SourceError::Invalid {
            source_name: self.identity.clone(),
            reason: format!("read from byte {first}: {e}"),
        }
    }

    /// Extents for a negotiated meta context.
    pub fn extents(&self, name: &str) -> Result<Vec<(u64, u64, u32)>, NbdError> {
        self.runtime.block_on(self.pool().extents(name))
    }

    /// Extents for a negotiated meta context, window by window in
    /// ascending order ([`NbdPool::extents_each`]); `f` returns whether to
    /// go on.
    pub fn extents_each(
        &self,
        name: &str,
        f: impl FnMut(&[(u64, u64, u32)]) -> bool,
    ) -> Result<bool, NbdError> {
        self.runtime.block_on(self.pool().extents_each(name, f))
    }

    pub fn has_context(&self, name: &str) -> bool {
        self.pool()
            .negotiated
            .meta_contexts
            .iter()
            .any(|(_, n)| n == name)
    }

    /// Disconnects (NBD_CMD_DISC on every connection).
    pub fn close(mut self) {
        if let Some(pool) = self.pool.take() {
            self.runtime.block_on(pool.close());
        }
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            self.runtime.block_on(pool.close());
        }
    }
}

impl BlockSource for NbdSource {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_many(&mut [(offset, buf)])
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        let first = reads.first().map(|r| r.0).unwrap_or(0);
        self.runtime
            .block_on(self.pool().read_many(reads))
            .map_err(|e| self.read_error(first, e))
    }

    fn read_owned(&self, reads: &mut [(u64, BytesMut)]) -> Result<(), SourceError> {
        let first = reads.first().map(|r| r.0).unwrap_or(0);
        self.runtime
            .block_on(self.pool().read_owned(reads))
            .map_err(|e| self.read_error(first, e))
    }
}
