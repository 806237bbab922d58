//! A zstd frame that stores its content verbatim ("raw" zstd blocks), for
//! blocks that do not compress. Any zstd decoder reads it; writing it costs a
//! copy instead of a compressor pass (spec: format-spec/02-pack.md#raw-frames).
//!
//! Layout (RFC 8878 §3.1.1): magic `28 B5 2F FD`; a frame header descriptor
//! with Single_Segment set, no checksum, no dictionary, and the smallest
//! Frame_Content_Size field that holds the length; then the content in raw
//! blocks of at most 128 KiB, each behind a 3-byte block header
//! (`Last_Block | Block_Type=0 << 1 | Block_Size << 3`, little endian).

/// zstd's frame magic number, little endian.
const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// Largest zstd block (Block_Maximum_Size).
pub const MAX_BLOCK: usize = 128 * 1024;
const BLOCK_HEADER_LEN: usize = 3;

/// Frame header for `len` content bytes: magic, descriptor, content size.
fn frame_header(len: u64) -> ([u8; 13], usize) {
    let mut h = [0u8; 13];
    h[..4].copy_from_slice(&MAGIC);
    // Descriptor: bits 7-6 Frame_Content_Size_flag, bit 5 Single_Segment.
    // The 2-byte field stores the size minus 256.
    let (flag, width, value) = if len < 256 {
        (0u8, 1usize, len)
    } else if len <= 65535 + 256 {
        (1, 2, len - 256)
    } else if len <= u32::MAX as u64 {
        (2, 4, len)
    } else {
        (3, 8, len)
    };
    h[4] = (flag << 6) | (1 << 5);
    h[5..5 + width].copy_from_slice(&value.to_le_bytes()[..width]);
    (h, 5 + width)
}

/// Bytes a raw frame of `len` content bytes takes.
pub fn encoded_len(len: usize) -> usize {
    let blocks = len.div_ceil(MAX_BLOCK).max(1);
    frame_header(len as u64).1 + blocks * BLOCK_HEADER_LEN + len
}

/// Appends a raw frame holding `content` to `out`.
pub fn encode_into(content: &[u8], out: &mut Vec<u8>) {
    let (header, n) = frame_header(content.len() as u64);
    out.reserve(encoded_len(content.len()));
    out.extend_from_slice(&header[..n]);
    let mut chunks = content.chunks(MAX_BLOCK).peekable();
    if chunks.peek().is_none() {
        // An empty frame still needs one (last, empty) block.
        out.extend_from_slice(&block_header(0, true));
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.extend_from_slice(&block_header(chunk.len(), last));
        out.extend_from_slice(chunk);
    }
}

/// True when `frame` is exactly what [`encode_into`] makes of `content`
/// (compared in place, nothing allocated): how a writer checks a raw frame
/// it sealed, once opened again.
pub fn matches(frame: &[u8], content: &[u8]) -> bool {
    if frame.len() != encoded_len(content.len()) {
        return false;
    }
    let (header, n) = frame_header(content.len() as u64);
    if frame[..n] != header[..n] {
        return false;
    }
    let mut at = n;
    if content.is_empty() {
        return frame[at..] == block_header(0, true);
    }
    let mut chunks = content.chunks(MAX_BLOCK).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        if frame[at..at + BLOCK_HEADER_LEN] != block_header(chunk.len(), last) {
            return false;
        }
        at += BLOCK_HEADER_LEN;
        if &frame[at..at + chunk.len()] != chunk {
            return false;
        }
        at += chunk.len();
    }
    true
}

fn block_header(size: usize, last: bool) -> [u8; BLOCK_HEADER_LEN] {
    let v = ((size as u32) << 3) | u32::from(last); // Block_Type 0 = raw
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(content: &[u8]) {
        let mut out = Vec::new();
        encode_into(content, &mut out);
        assert_eq!(out.len(), encoded_len(content.len()));
        assert!(matches(&out, content));
        if !out.is_empty() {
            let mut bad = out.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(!matches(&bad, content));
        }
        let back = zstd::bulk::decompress(&out, content.len()).expect("zstd decodes a raw frame");
        assert_eq!(back, content);
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&out),
            Ok(Some(n)) if n == content.len() as u64
        ));
        assert_eq!(
            zstd::zstd_safe::find_frame_compressed_size(&out),
            Ok(out.len())
        );
    }

    #[test]
    fn zstd_decodes_every_size_class() {
        // Each Frame_Content_Size width and block-count boundary.
        for len in [
            0usize,
            1,
            255,
            256,
            65535,
            65536,
            65791,
            65792,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            3 * MAX_BLOCK + 17,
        ] {
            let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            round_trip(&content);
        }
    }
}
