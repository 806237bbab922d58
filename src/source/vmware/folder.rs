//! One disk's frozen base `-flat.vmdk`, read over the datastore's
//! `/folder` with Range requests, as a [`BlockSource`]. Adjacent reads are
//! merged into one request (up to [`MAX_REQUEST`]) and [`LANES`] requests
//! are in flight at once. Every answer is checked: 206, a matching
//! `Content-Range`, exactly the bytes asked for; a host that ignores Range
//! is an error, never a whole-file read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::client::Session;
use crate::source::{BlockSource, SourceError};

/// Largest Range request.
pub const MAX_REQUEST: u64 = 8 << 20;
/// Requests in flight.
pub const LANES: usize = 8;

pub struct FlatFile {
    session: Arc<Session>,
    identity: String,
    datacenter: String,
    datastore: String,
    /// Path of the `-flat.vmdk` in the datastore.
    path: String,
    size: u64,
}

impl FlatFile {
    pub fn new(
        session: Arc<Session>,
        identity: String,
        datacenter: String,
        datastore: String,
        path: String,
        size: u64,
    ) -> FlatFile {
        FlatFile {
            session,
            identity,
            datacenter,
            datastore,
            path,
            size,
        }
    }

    fn error(&self, e: super::VmwareError) -> SourceError {
        SourceError::Invalid {
            source_name: self.identity.clone(),
            reason: e.to_string(),
        }
    }

    /// One Range request for adjacent buffers from `offset` on, read
    /// straight into them.
    fn read_run(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), SourceError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(SourceError::Invalid {
                source_name: self.identity.clone(),
                reason: format!(
                    "read of {len} bytes at {offset} past the end ({} bytes)",
                    self.size
                ),
            });
        }
        self.session
            .read_range(&self.datacenter, &self.datastore, &self.path, offset, bufs)
            .map_err(|e| self.error(e))
    }
}

/// One run of reads, taken by the lane that serves it.
type Slot<'r, 'b> = Mutex<Option<&'r mut [(u64, &'b mut [u8])]>>;

/// `(offset, buffer)` reads grouped into runs of adjacent ones, each run at
/// most `max` bytes: indexes into the sorted reads.
fn runs(offsets: &[(u64, usize)], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=offsets.len() {
        let end_of_run = i == offsets.len() || {
            let (prev_at, prev_len) = offsets[i - 1];
            let (at, len) = offsets[i];
            let run_bytes = at + len as u64 - offsets[start].0;
            at != prev_at + prev_len as u64 || run_bytes > max
        };
        if end_of_run {
            out.push(start..i);
            start = i;
        }
    }
    out
}

impl BlockSource for FlatFile {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_run(offset, &mut [buf])
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        reads.sort_by_key(|r| r.0);
        let shape: Vec<(u64, usize)> = reads.iter().map(|(at, b)| (*at, b.len())).collect();
        let groups = runs(&shape, MAX_REQUEST);
        // Each run fills its own buffers; runs go to the lanes in turn.
        let slots: Vec<Slot<'_, '_>> = {
            let mut rest: &mut [(u64, &mut [u8])] = reads;
            let mut v = Vec::with_capacity(groups.len());
            for g in &groups {
                let (head, tail) = rest.split_at_mut(g.len());
                v.push(Mutex::new(Some(head)));
                rest = tail;
            }
            v
        };
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<SourceError>> = Mutex::new(None);
        let lane = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= slots.len() || failed.lock().is_ok_and(|f| f.is_some()) {
                return;
            }
            let Some(run) = slots[i].lock().ok().and_then(|mut s| s.take()) else {
                return;
            };
            let at = run[0].0;
            let mut bufs: Vec<&mut [u8]> = run.iter_mut().map(|(_, b)| &mut **b).collect();
            if let Err(e) = self.read_run(at, &mut bufs) {
                if let Ok(mut f) = failed.lock() {
                    f.get_or_insert(e);
                }
                return;
            }
        };
        // This thread is one of the lanes: a batch that is one run (a
        // full's contiguous blocks) starts no thread at all.
        std::thread::scope(|scope| {
            for _ in 1..LANES.min(slots.len()) {
                scope.spawn(lane);
            }
            lane();
        });
        match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_reads_merge_up_to_the_cap() {
        let k = 65536usize;
        let reads = [(0, k), (65536, k), (131072, k), (393216, k), (458752, k)];
        assert_eq!(runs(&reads, 1 << 20), vec![0..3, 3..5]);
        assert_eq!(runs(&reads, 131072), vec![0..2, 2..3, 3..5]);
        assert_eq!(runs(&[(0, k)], 1), vec![0..1]);
        assert!(runs(&[], 1).is_empty());
    }
}
