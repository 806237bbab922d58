//! The CBT change bitmap: one bit per block, most significant bit of byte 0
//! is block 0 (XenServer `VDI.list_changed_blocks`, decoded from base64).
//! spec: format-spec/03-snapshot.md#bitmap

use base64::Engine;

/// Bytes a bitmap for `blocks` blocks has.
pub fn len_for(blocks: u64) -> u64 {
    blocks.div_ceil(8)
}

pub fn is_set(bitmap: &[u8], block: u64) -> bool {
    bitmap
        .get((block / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (block % 8)) != 0)
}

pub fn set(bitmap: &mut [u8], block: u64) {
    bitmap[(block / 8) as usize] |= 0x80 >> (block % 8);
}

/// Number of set bits.
pub fn count(bitmap: &[u8]) -> u64 {
    bitmap.iter().map(|b| b.count_ones() as u64).sum()
}

/// Checks the length and that padding bits after the last block are zero.
pub fn validate(bitmap: &[u8], blocks: u64) -> Result<(), String> {
    let want = len_for(blocks);
    if bitmap.len() as u64 != want {
        return Err(format!(
            "bitmap has {} bytes but a disk of {blocks} blocks needs {want}",
            bitmap.len()
        ));
    }
    let used_bits = blocks % 8;
    if used_bits != 0 {
        let last = bitmap[bitmap.len() - 1];
        if last & (0xffu8 >> used_bits) != 0 {
            return Err("padding bits after the last block are set".into());
        }
    }
    Ok(())
}

/// Decodes the base64 text XenServer returns and checks it against the disk.
pub fn decode_base64(text: &str, blocks: u64) -> Result<Vec<u8>, String> {
    let cleaned: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| format!("not valid base64: {e}"))?;
    validate(&raw, blocks)?;
    Ok(raw)
}

pub fn encode_base64(bitmap: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bitmap)
}

/// Iterates the indices of set bits in ascending order.
pub fn iter_set(bitmap: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(byte_index, &b)| {
        (0..8u64)
            .filter_map(move |bit| (b & (0x80 >> bit) != 0).then_some(byte_index as u64 * 8 + bit))
    })
}
