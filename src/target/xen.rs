//! XenServer targets: what a `xen://` restore target names (a VDI to
//! overwrite, an SR to create a disk in), the sink that pushes the
//! engine's blocks into an `/import_raw_vdi` body, the choice of body
//! format, and the check of a disk read back. The session workflow
//! (create, import, verify, destroy on failure) stays in
//! `commands/restore_xen.rs`.

use crate::format::BlockId;
use crate::manifest::BlockMap;
use crate::repo::restore::BlockSink;
use crate::source::xenapi::import::{chunked_body_bytes, ImportFormat, ImportStream};
use crate::source::xenapi::{XenApiError, XenObject, XenUrl};

/// What a `xen://` restore target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Vdi,
    Sr,
}

pub struct XenTarget {
    /// Host, port and user; `uuid` is the VDI's or the SR's.
    pub url: XenUrl,
    pub kind: TargetKind,
}

impl XenTarget {
    pub fn parse(text: &str) -> Result<XenTarget, XenApiError> {
        // XenUrl knows /vdi/ and /vm/ only: an SR target has the same form.
        if let Some((head, uuid)) = text.rsplit_once("/sr/") {
            let url = XenUrl::parse(&format!("{head}/vdi/{uuid}"))
                .map_err(|e| XenApiError::Invalid(e.to_string().replace("/vdi/", "/sr/")))?;
            return Ok(XenTarget {
                url,
                kind: TargetKind::Sr,
            });
        }
        let url = XenUrl::parse(text)?;
        if url.object != XenObject::Vdi {
            return Err(XenApiError::Invalid(format!(
                "restore target '{text}' must be xen://HOST/vdi/UUID or xen://HOST/sr/UUID"
            )));
        }
        Ok(XenTarget {
            url,
            kind: TargetKind::Vdi,
        })
    }
}

/// The engine's output, pushed into an import. Every data block is sent
/// as its whole span (a short last block padded) so the chunked body has
/// the length computed up front.
pub struct XenSink {
    pub stream: ImportStream,
    pub disk_size_bytes: u64,
    pub block_size: u64,
}

impl BlockSink for XenSink {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let span = self.block_size.min(self.disk_size_bytes - offset);
        let span = span.max(data.len() as u64);
        self.stream.write_extent(offset, data, span)
    }

    fn write_zeros(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.stream.zeros_until(offset + len)
    }

    fn finish(&mut self) -> std::io::Result<()> {
        // The body is ended by `ImportStream::finish`, which needs the session.
        Ok(())
    }
}

/// Chunked only into a new VDI: the chunked body writes the data extents
/// only, so an existing disk would keep its old bytes where the snapshot
/// has zeros.
pub fn choose_format(
    map: &BlockMap,
    wanted: &str,
    new_vdi: bool,
) -> Result<ImportFormat, XenApiError> {
    Ok(match wanted {
        "raw" => ImportFormat::Raw,
        "chunked" if !new_vdi => return Err(XenApiError::Invalid(
            "--import-format chunked writes only the data blocks, so an existing VDI would keep stale bytes where the snapshot has zeros: use raw or auto".into()
        )),
        "chunked" => ImportFormat::Chunked,
        "auto" if !new_vdi => ImportFormat::Raw,
        // A new VDI reads as zeros: send only the data (reference §3.2
        // `chunked`) whenever that is the smaller body, i.e. when the zero
        // blocks left out outweigh the chunk headers.
        "auto"
            if body_bytes(map, ImportFormat::Chunked) < body_bytes(map, ImportFormat::Raw) =>
        {
            ImportFormat::Chunked
        }
        "auto" => ImportFormat::Raw,
        other => {
            return Err(XenApiError::Invalid(format!(
                "--import-format '{other}': expected auto, raw or chunked"
            )))
        }
    })
}

/// Bytes of the import body for `map` in `format`.
pub fn body_bytes(map: &BlockMap, format: ImportFormat) -> u64 {
    let bs = map.block_size as u64;
    let disk = map.disk_size_bytes;
    match format {
        ImportFormat::Raw => disk,
        ImportFormat::Chunked => chunked_body_bytes(
            map.data
                .iter()
                .filter(|(i, _)| *i < map.block_count())
                .map(|(i, _)| bs.min(disk - i * bs)),
        ),
    }
}

/// The first block of `data` (blocks from `first` on) that differs from
/// `map`: its index and what the map expects there (None: zeros).
pub fn first_mismatch(map: &BlockMap, first: u64, data: &[u8]) -> Option<(u64, Option<BlockId>)> {
    use rayon::prelude::*;
    let bs = map.block_size as usize;
    data.par_chunks(bs)
        .enumerate()
        .map(|(k, block)| (first + k as u64, block))
        .filter_map(|(index, block)| {
            let expected = map.get(index);
            let ok = match expected {
                Some(id) => BlockId::of(block) == id,
                None => crate::bytes::is_zero(block),
            };
            (!ok).then_some((index, expected))
        })
        .min_by_key(|m| m.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(blocks: u64, data: impl Iterator<Item = u64>) -> BlockMap {
        BlockMap {
            disk_size_bytes: blocks * 65536,
            block_size: 65536,
            data: data.map(|i| (i, BlockId([i as u8; 32]))).collect(),
        }
    }

    #[test]
    fn verify_names_the_first_block_that_differs() {
        let a = vec![1u8; 65536];
        let b = vec![2u8; 65536];
        // Blocks 10.. of a disk: 10 = a, 11 = zeros, 12 = b, 13 = zeros.
        let mut m = map(20, [10u64, 12].into_iter());
        m.data = vec![(10, BlockId::of(&a)), (12, BlockId::of(&b))];
        let good = [a.clone(), vec![0; 65536], b.clone(), vec![0; 65536]].concat();
        assert_eq!(first_mismatch(&m, 10, &good), None);
        let mut bad = good.clone();
        bad[3 * 65536 + 5] = 1; // data where zeros are expected
        bad[2 * 65536] ^= 1; // a changed byte in block 12 (reported first)
        assert_eq!(
            first_mismatch(&m, 10, &bad),
            Some((12, Some(BlockId::of(&b))))
        );
        bad[2 * 65536] ^= 1;
        assert_eq!(first_mismatch(&m, 10, &bad), Some((13, None)));
    }

    #[test]
    fn auto_sends_the_smaller_body_into_a_new_vdi_and_raw_into_an_existing_one() {
        let half = map(1000, (0..1000).step_by(2));
        let dense = map(1000, 0..1000);
        let one_hole = map(10_000, 1..10_000);
        let chunked =
            |m: &BlockMap, new| choose_format(m, "auto", new).unwrap() == ImportFormat::Chunked;
        assert!(chunked(&half, true));
        assert!(!chunked(&half, false));
        assert!(!chunked(&dense, true));
        // One zero block saves 64 KiB, less than 12 bytes of header for
        // each of 9999 blocks.
        assert!(!chunked(&one_hole, true));
        assert!(choose_format(&half, "chunked", false).is_err());
    }
}
