//! Byte-slice helpers shared by the data paths.

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

#[cfg(test)]
mod tests {
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
