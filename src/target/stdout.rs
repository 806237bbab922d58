//! A sequential stream target (stdout): zeros are written out, bytes go
//! strictly in order. Knows nothing of where the stream leads.

use std::io::Write;

use super::ZEROS;
use crate::repo::restore::BlockSink;

/// A sequential stream (stdout): zeros are written out.
pub struct StreamSink<W: Write + Send> {
    out: W,
    position: u64,
}

impl<W: Write + Send> StreamSink<W> {
    pub fn new(out: W) -> Self {
        StreamSink { out, position: 0 }
    }

    /// The stream, to write after the disk's bytes (padding).
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write + Send> BlockSink for StreamSink<W> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        debug_assert_eq!(offset, self.position);
        self.out.write_all(data)?;
        self.position = offset + data.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, offset: u64, mut len: u64) -> std::io::Result<()> {
        debug_assert_eq!(offset, self.position);
        self.position = offset + len;
        while len > 0 {
            let n = len.min(ZEROS.len() as u64) as usize;
            self.out.write_all(&ZEROS[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
