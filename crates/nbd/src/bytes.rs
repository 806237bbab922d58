//! Byte-slice helpers shared by the data paths (the NBD client's reads,
//! the backup pipeline, the server and the simulator): zero detection and
//! splitting a buffer into pieces that join back without a copy.

use ::bytes::BytesMut;

/// True when every byte is zero. Compares 64 bytes at a time (the compiler
/// turns the fold into vector instructions): zero detection runs over every
/// block a backup reads and every byte an import writes.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    let whole = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0);
    whole && chunks.remainder().iter().all(|b| *b == 0)
}

/// Splits `buf` into consecutive pieces of `lens` bytes (summing to its
/// length) that share its memory: each can be filled by its own owner,
/// another thread included, and [`join`] puts them back without a copy.
pub fn split(mut buf: BytesMut, lens: impl IntoIterator<Item = usize>) -> Vec<BytesMut> {
    let pieces = lens.into_iter().map(|len| buf.split_to(len)).collect();
    debug_assert!(buf.is_empty(), "piece lengths must cover the buffer");
    pieces
}

/// Joins pieces back into one buffer: O(1) for consecutive pieces of one
/// buffer ([`split`]), a copy for a piece that was replaced.
pub fn join(pieces: impl IntoIterator<Item = BytesMut>) -> BytesMut {
    pieces
        .into_iter()
        .fold(BytesMut::new(), |mut whole, piece| {
            whole.unsplit(piece);
            whole
        })
}

#[cfg(test)]
mod tests {
    use ::bytes::BytesMut;

    #[test]
    fn split_pieces_join_back_in_place_and_a_replaced_one_is_copied() {
        let mut buf = BytesMut::zeroed(10_000);
        let at = buf.as_ptr();
        buf[..4].copy_from_slice(b"head");
        let mut pieces = super::split(buf, [4, 4000, 5996]);
        pieces[1].fill(7);
        let whole = super::join(pieces);
        assert_eq!(whole.as_ptr(), at, "consecutive pieces join without a copy");
        assert_eq!(&whole[..4], b"head");
        assert!(whole[4..4004].iter().all(|&b| b == 7));
        let mut pieces = super::split(whole, [4, 4000, 5996]);
        pieces[1] = BytesMut::from(&[9u8; 4000][..]);
        let whole = super::join(pieces);
        assert_eq!(whole.len(), 10_000);
        assert!(whole[4..4004].iter().all(|&b| b == 9));
        assert_eq!(&whole[..4], b"head");
    }

    #[test]
    fn any_nonzero_byte_anywhere_is_seen() {
        for len in [0usize, 1, 63, 64, 65, 200, 65536] {
            let mut b = vec![0u8; len];
            assert!(super::is_zero(&b));
            for at in [0, len / 2, len.saturating_sub(1)] {
                if at < len {
                    b[at] = 1;
                    assert!(!super::is_zero(&b), "len {len} at {at}");
                    b[at] = 0;
                }
            }
        }
    }
}
