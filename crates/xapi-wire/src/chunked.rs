//! The `chunked` body of `PUT /import_raw_vdi?chunked` (xenapi-reference.md
//! §3.2, vhd-tool `chunked.ml`): repeated `{offset: u64 LE, len: u32 LE}`
//! headers each followed by `len` bytes of disk data, ended by a header with
//! offset 0 and length 0. One encoder ([`chunk_header`], and
//! [`encode_chunk`] on top of it) and one decoder ([`ChunkedImport`]), used
//! by the product's import stream and by the simulator's handler.

use crate::error::ChunkedError;

/// Size of a chunk header and of the terminator.
pub const CHUNK_HEADER_BYTES: u64 = 12;

/// The terminating header: offset 0, length 0.
pub const END: [u8; CHUNK_HEADER_BYTES as usize] = [0; CHUNK_HEADER_BYTES as usize];

/// The header of one chunk: offset as u64 LE, then length as u32 LE.
/// `(0, 0)` is [`END`].
pub fn chunk_header(offset: u64, len: u32) -> [u8; CHUNK_HEADER_BYTES as usize] {
    let mut header = [0u8; CHUNK_HEADER_BYTES as usize];
    header[..8].copy_from_slice(&offset.to_le_bytes());
    header[8..].copy_from_slice(&len.to_le_bytes());
    header
}

/// Appends one whole chunk (header and data) to `out`. `data` must fit the
/// header's u32 length (the import stream checks before it writes).
pub fn encode_chunk(offset: u64, data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(u32::try_from(data.len()).is_ok(), "chunk longer than u32");
    out.extend_from_slice(&chunk_header(offset, data.len() as u32));
    out.extend_from_slice(data);
}

/// Body length of a chunked import of extents of these lengths.
pub fn chunked_body_bytes(extent_lengths: impl Iterator<Item = u64>) -> u64 {
    extent_lengths.map(|l| CHUNK_HEADER_BYTES + l).sum::<u64>() + CHUNK_HEADER_BYTES
}

/// What the chunked-import decoder found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStep {
    /// More input is needed.
    Need,
    /// The last `len` bytes consumed are data for disk offset `offset`.
    Data { offset: u64, len: usize },
    /// The terminating header was read.
    Done,
}

/// Incremental decoder of the `chunked` import body. Data is handed out
/// as it arrives, so a chunk's declared length never sizes an allocation.
#[derive(Debug, Default)]
pub struct ChunkedImport {
    header: Vec<u8>,
    /// Data of the current chunk still to come: (next offset, bytes left).
    data: Option<(u64, u64)>,
    done: bool,
}

impl ChunkedImport {
    pub fn new() -> ChunkedImport {
        ChunkedImport::default()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Consumes some of `input`; returns how many bytes and what they were.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, ChunkStep), ChunkedError> {
        if self.done {
            return if input.is_empty() {
                Ok((0, ChunkStep::Done))
            } else {
                Err(ChunkedError("data after the terminating header".into()))
            };
        }
        if let Some((offset, left)) = self.data {
            if input.is_empty() {
                return Ok((0, ChunkStep::Need));
            }
            let n = (left.min(input.len() as u64)) as usize;
            let rest = left - n as u64;
            self.data = (rest > 0).then_some((offset + n as u64, rest));
            return Ok((n, ChunkStep::Data { offset, len: n }));
        }
        let want = 12 - self.header.len();
        let n = want.min(input.len());
        self.header.extend_from_slice(&input[..n]);
        if self.header.len() < 12 {
            return Ok((n, ChunkStep::Need));
        }
        let mut offset_bytes = [0u8; 8];
        offset_bytes.copy_from_slice(&self.header[..8]);
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&self.header[8..12]);
        self.header.clear();
        let offset = u64::from_le_bytes(offset_bytes);
        let len = u32::from_le_bytes(len_bytes) as u64;
        if offset == 0 && len == 0 {
            self.done = true;
            return Ok((n, ChunkStep::Done));
        }
        if offset.checked_add(len).is_none() {
            return Err(ChunkedError(format!(
                "chunk at {offset} of {len} bytes overflows"
            )));
        }
        if len > 0 {
            self.data = Some((offset, len));
        }
        Ok((n, ChunkStep::Need))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_header_vector() {
        assert_eq!(
            chunk_header(0x0102_0304_0506_0708, 0x0001_0000),
            [
                0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // offset, u64 LE
                0x00, 0x00, 0x01, 0x00, // length 65536, u32 LE
            ]
        );
        assert_eq!(chunk_header(0, 0), END, "terminator");
    }

    #[test]
    fn chunked_body_decodes_with_the_simulator() {
        // Two extents and the terminator, as write_extent/finish send them.
        let mut body = Vec::new();
        body.extend_from_slice(&chunk_header(65536, 4));
        body.extend_from_slice(b"abcd");
        body.extend_from_slice(&chunk_header(1 << 20, 2));
        body.extend_from_slice(b"xy");
        body.extend_from_slice(&chunk_header(0, 0));
        assert_eq!(body.len() as u64, chunked_body_bytes([4u64, 2].into_iter()));
        let mut decoder = ChunkedImport::new();
        let mut input = &body[..];
        let mut seen = Vec::new();
        while !decoder.is_done() {
            let (used, step) = decoder.feed(input).unwrap();
            if let ChunkStep::Data { offset, len } = step {
                seen.push((offset, input[used - len..used].to_vec()));
            }
            input = &input[used..];
        }
        assert!(input.is_empty());
        assert_eq!(
            seen,
            vec![(65536, b"abcd".to_vec()), (1 << 20, b"xy".to_vec())]
        );
    }

    proptest::proptest! {
        /// Any byte stream: the decoder never hands out more data than the
        /// input held, and never panics.
        #[test]
        fn chunked_never_overreads(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), split in 1usize..40) {
            let mut d = ChunkedImport::new();
            for piece in raw.chunks(split) {
                let mut at = 0;
                while at < piece.len() {
                    match d.feed(&piece[at..]) {
                        Ok((n, step)) => {
                            if let ChunkStep::Data { len, .. } = step {
                                proptest::prop_assert!(len <= n);
                            }
                            proptest::prop_assert!(n <= piece.len() - at);
                            if n == 0 {
                                break;
                            }
                            at += n;
                        }
                        Err(_) => return Ok(()),
                    }
                }
            }
        }
    }

    #[test]
    fn chunked_import_byte_by_byte() {
        let mut body = Vec::new();
        encode_chunk(65536, b"hello", &mut body);
        encode_chunk(7, b"", &mut body);
        encode_chunk(1 << 40, b"xy", &mut body);
        body.extend_from_slice(&END);
        let mut d = ChunkedImport::new();
        let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut i = 0;
        while i < body.len() {
            let (n, step) = d.feed(&body[i..i + 1]).unwrap();
            assert!(n <= 1);
            if let ChunkStep::Data { offset, len } = step {
                got.push((offset, body[i + n - len..i + n].to_vec()));
            }
            i += n;
        }
        assert!(d.is_done());
        let joined: Vec<(u64, Vec<u8>)> = got.iter().fold(Vec::new(), |mut acc, (o, b)| {
            match acc.last_mut() {
                Some((lo, lb)) if *lo + lb.len() as u64 == *o => lb.extend_from_slice(b),
                _ => acc.push((*o, b.clone())),
            }
            acc
        });
        assert_eq!(
            joined,
            vec![(65536, b"hello".to_vec()), (1 << 40, b"xy".to_vec())]
        );
        assert!(d.feed(b"x").is_err());
    }
}
