//! Write-behind for extracted content: while a large file is written to a
//! regular file, a helper thread makes what was written so far durable
//! (`fdatasync`) every [`FLUSH_EVERY`] bytes, so the disk writes while the
//! snapshot is still being read instead of all at the end, and dirty pages
//! stay bounded. Does nothing for pipes, terminals and devices.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// Bytes written between two requests to the helper.
pub const FLUSH_EVERY: u64 = 32 << 20;

/// Asks a helper thread to sync a file as it grows.
pub struct Flusher {
    helper: Option<(SyncSender<()>, JoinHandle<()>)>,
    since: u64,
}

impl Flusher {
    /// A flusher for `fd` if it is a regular file (another handle on the
    /// same open file is synced), else one that does nothing.
    pub fn new(fd: impl AsFd) -> Flusher {
        let regular = rustix::fs::fstat(&fd)
            .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file());
        let helper = regular
            .then(|| fd.as_fd().try_clone_to_owned().ok())
            .flatten()
            .and_then(|owned| {
                let file = File::from(owned);
                // At most one request waits while one is served.
                let (tx, rx) = sync_channel::<()>(1);
                std::thread::Builder::new()
                    .name("cbtvault-flush".into())
                    .spawn(move || {
                        for () in rx {
                            // A failure here is found again by the writer's
                            // own final sync or close; this is only early.
                            let _ = file.sync_data();
                        }
                    })
                    .ok()
                    .map(|h| (tx, h))
            });
        Flusher { helper, since: 0 }
    }

    /// Counts `n` bytes handed to the file (already written to it, not
    /// buffered): every [`FLUSH_EVERY`] bytes the helper is asked to sync,
    /// unless it is still busy with the last request.
    pub fn wrote(&mut self, n: u64) {
        self.since += n;
        if self.since < FLUSH_EVERY {
            return;
        }
        self.since = 0;
        if let Some((tx, _)) = &self.helper {
            match tx.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => self.helper = None,
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.helper.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// A writer whose bytes go to a file with a [`Flusher`] behind it.
pub struct WriteBehind<W: Write> {
    inner: W,
    flusher: Flusher,
}

impl<W: Write> WriteBehind<W> {
    pub fn new(inner: W, flusher: Flusher) -> WriteBehind<W> {
        WriteBehind { inner, flusher }
    }
}

impl<W: Write> Write for WriteBehind<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.flusher.wrote(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_gets_a_helper_and_a_pipe_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::create(dir.path().join("f")).unwrap();
        let mut flusher = Flusher::new(&f);
        assert!(flusher.helper.is_some());
        for _ in 0..3 {
            f.write_all(&vec![7u8; 1 << 20]).unwrap();
            flusher.wrote(FLUSH_EVERY / 2);
        }
        drop(flusher);
        assert_eq!(f.metadata().unwrap().len(), 3 << 20);
        let (r, _w) = std::io::pipe().unwrap();
        assert!(Flusher::new(&r).helper.is_none());
    }
}
