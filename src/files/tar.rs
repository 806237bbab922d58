//! A minimal tar writer (the GNU format GNU tar, bsdtar and Python's
//! tarfile read): ustar headers, `././@LongLink` entries for names and
//! link targets over 100 bytes, base-256 numbers for sizes over 8 GiB.
//! Pure framing over a `Write`; the caller streams file content between
//! [`TarWriter::header`] and [`TarWriter::finish_entry`].

use std::io::{self, Write};

const BLOCK: usize = 512;

/// The kind of a tar entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    File,
    Dir,
    Symlink,
}

/// One entry's header fields.
pub struct Header<'a> {
    /// Relative, `/`-separated (a directory's gets a trailing `/`).
    pub name: &'a [u8],
    pub kind: EntryType,
    pub size_bytes: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_seconds: i64,
    pub link_target: &'a [u8],
}

pub struct TarWriter<W: Write> {
    out: W,
    /// Content bytes of the current entry still to be padded.
    pending: u64,
}

/// `value` as `width - 1` octal digits and a NUL, or base-256 (GNU) when
/// it does not fit.
fn number(field: &mut [u8], value: u64) {
    let width = field.len();
    let digits = width - 1;
    if value < 1u64.checked_shl(3 * digits as u32).unwrap_or(u64::MAX) {
        let text = format!("{value:0digits$o}");
        field[..digits].copy_from_slice(text.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        field[0] = 0x80;
        let bytes = value.to_be_bytes();
        field[width - 8..].copy_from_slice(&bytes);
    }
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out, pending: 0 }
    }

    fn raw_header(
        &mut self,
        name: &[u8],
        typeflag: u8,
        size: u64,
        h: &Header<'_>,
        link: &[u8],
    ) -> io::Result<()> {
        let mut b = [0u8; BLOCK];
        let n = name.len().min(100);
        b[..n].copy_from_slice(&name[..n]);
        number(&mut b[100..108], u64::from(h.mode & 0o7777));
        number(&mut b[108..116], u64::from(h.uid));
        number(&mut b[116..124], u64::from(h.gid));
        number(&mut b[124..136], size);
        number(&mut b[136..148], h.mtime_seconds.max(0) as u64);
        b[156] = typeflag;
        let l = link.len().min(100);
        b[157..157 + l].copy_from_slice(&link[..l]);
        b[257..265].copy_from_slice(b"ustar  \0");
        b[148..156].fill(b' ');
        let sum: u32 = b.iter().map(|x| u32::from(*x)).sum();
        let text = format!("{sum:06o}\0 ");
        b[148..156].copy_from_slice(text.as_bytes());
        self.out.write_all(&b)
    }

    fn long_link(&mut self, typeflag: u8, value: &[u8], h: &Header<'_>) -> io::Result<()> {
        let mut data = value.to_vec();
        data.push(0);
        self.raw_header(b"././@LongLink", typeflag, data.len() as u64, h, b"")?;
        self.out.write_all(&data)?;
        self.pad(data.len() as u64)
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rest = (BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64;
        self.out.write_all(&[0u8; BLOCK][..rest as usize])
    }

    /// Starts an entry; a file's `size_bytes` of content follow.
    pub fn header(&mut self, h: &Header<'_>) -> io::Result<()> {
        let mut name = h.name.to_vec();
        if h.kind == EntryType::Dir && !name.ends_with(b"/") {
            name.push(b'/');
        }
        if name.len() > 100 {
            self.long_link(b'L', &name, h)?;
        }
        if h.link_target.len() > 100 {
            self.long_link(b'K', h.link_target, h)?;
        }
        let (flag, size) = match h.kind {
            EntryType::File => (b'0', h.size_bytes),
            EntryType::Dir => (b'5', 0),
            EntryType::Symlink => (b'2', 0),
        };
        self.raw_header(&name, flag, size, h, h.link_target)?;
        self.pending = size;
        Ok(())
    }

    /// Content of the current file entry.
    pub fn write_content(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)
    }

    /// Pads the current entry's content to a whole block.
    pub fn finish_entry(&mut self) -> io::Result<()> {
        let len = self.pending;
        self.pending = 0;
        self.pad(len)
    }

    /// The end-of-archive marker (two zero blocks); returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_octal_and_base_256() {
        let mut f = [0u8; 12];
        number(&mut f, 0o755);
        assert_eq!(&f, b"00000000755\0");
        number(&mut f, 9 << 30);
        assert_eq!(f[0], 0x80);
        assert_eq!(u64::from_be_bytes(f[4..].try_into().unwrap()), 9 << 30);
    }

    #[test]
    fn a_long_name_gets_a_longlink_entry() {
        let name = vec![b'a'; 150];
        let mut w = TarWriter::new(Vec::new());
        w.header(&Header {
            name: &name,
            kind: EntryType::File,
            size_bytes: 3,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_seconds: 1,
            link_target: b"",
        })
        .unwrap();
        w.write_content(b"abc").unwrap();
        w.finish_entry().unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len(), 512 * 2 + 512 + 512 + 1024);
        assert_eq!(&out[..13], b"././@LongLink");
        assert_eq!(out[156], b'L');
    }
}
