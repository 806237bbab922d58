//! Helpers for the simulator's tests, written independently of the
//! simulator's own code (a bitmap built here checks the one it returns).

/// One CBT block (64 KiB).
pub const BS: u64 = 65536;

/// Deterministic incompressible bytes, distinct for each (seed, stream).
pub fn random_bytes(seed: u64, stream: u64, len: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new_derive_key("cbtvault integration tests 2024 random bytes");
    h.update(&seed.to_le_bytes());
    h.update(&stream.to_le_bytes());
    let mut out = vec![0u8; len];
    h.finalize_xof().fill(&mut out);
    out
}

/// The bitmap `VDI.list_changed_blocks` returns for these marked blocks, as
/// base64: one bit per 64 KiB block, most significant bit of byte 0 =
/// block 0, `ceil(blocks / 8)` bytes.
pub fn bitmap_base64(size_bytes: u64, marked: &[u64]) -> String {
    use base64::Engine;
    let blocks = size_bytes.div_ceil(BS);
    let mut out = vec![0u8; blocks.div_ceil(8) as usize];
    for &b in marked {
        assert!(b < blocks, "block {b} beyond a disk of {blocks} blocks");
        out[(b / 8) as usize] |= 0x80 >> (b % 8);
    }
    base64::engine::general_purpose::STANDARD.encode(out)
}
