//! The random-access byte source every reader in this crate works over, and
//! a window onto part of one (a partition). Owns no parsing.

use std::io;
use std::sync::Arc;

/// A random-access, read-only byte source: a disk image file, a snapshot's
/// block reader, or bytes in memory.
pub trait ReadAt {
    /// Fills all of `buf` from `offset`; a read that would pass the end is an
    /// `UnexpectedEof` error, never a short read.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The source's length in bytes.
    fn size(&self) -> u64;
}

/// Shared handle to a source, as the file-system readers keep it.
pub type Source = Arc<dyn ReadAt + Send + Sync>;

fn past_end(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at offset {offset} passes the end ({size} bytes)"),
    )
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(past_end(offset, len, size)),
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len() as u64)?;
        // In range: offset + len <= self.len(), which fits usize.
        let start = offset as usize;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_at(offset, buf)
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // pread: no shared cursor, so `&self` is enough.
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
}

/// `len` bytes of `inner` from `start` (a partition), clamped to the source:
/// a partition that claims to run past the disk's end reads as ending there.
#[derive(Clone)]
pub struct Window {
    inner: Source,
    start: u64,
    len: u64,
}

impl Window {
    pub fn new(inner: Source, start: u64, len: u64) -> Window {
        let size = inner.size();
        let start = start.min(size);
        let len = len.min(size - start);
        Window { inner, start, len }
    }
}

impl ReadAt for Window {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        self.inner.read_at(self.start + offset, buf)
    }
    fn size(&self) -> u64 {
        self.len
    }
}

/// Reads up to `max` bytes from the start of `src` (fewer if it is shorter).
pub(crate) fn read_head(src: &dyn ReadAt, max: usize) -> io::Result<Vec<u8>> {
    let len = (src.size().min(max as u64)) as usize;
    let mut buf = vec![0u8; len];
    src.read_at(0, &mut buf)?;
    Ok(buf)
}

/// Where a `Seek` to `pos` lands for a stream of `len` bytes now at `pos_now`
/// (every `Seek` impl of this crate): before the start is an error, past
/// the end is allowed (reads there return nothing).
pub(crate) fn seek_target(pos: std::io::SeekFrom, len: u64, pos_now: u64) -> std::io::Result<u64> {
    use std::io::SeekFrom;
    match pos {
        SeekFrom::Start(p) => Some(p),
        SeekFrom::End(d) => len.checked_add_signed(d),
        SeekFrom::Current(d) => pos_now.checked_add_signed(d),
    }
    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_read_past_end_is_an_error() {
        let data = vec![1u8, 2, 3, 4];
        let mut buf = [0u8; 2];
        data.read_at(2, &mut buf).unwrap();
        assert_eq!(buf, [3, 4]);
        assert!(data.read_at(3, &mut buf).is_err());
        assert!(data.read_at(u64::MAX, &mut buf).is_err());
    }

    #[test]
    fn window_clamps_to_the_source() {
        let data: Source = Arc::new((0u8..100).collect::<Vec<u8>>());
        let w = Window::new(data, 90, 50);
        assert_eq!(w.size(), 10);
        let mut buf = [0u8; 10];
        w.read_at(0, &mut buf).unwrap();
        assert_eq!(buf[0], 90);
        assert!(w.read_at(1, &mut buf).is_err());
    }
}
