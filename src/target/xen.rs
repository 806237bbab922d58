//! XenServer targets: what a `xen://` restore target names (a VDI to
//! overwrite, an SR to create a disk in), the checks before writing (the
//! SR exists, which running VMs use a VDI), the import of a snapshot into
//! a VDI through the one restore engine (`/import_raw_vdi`, reference
//! §3.2; cut at the first failure so the host never takes a partial disk
//! as whole), and the read-back verification over NBD. The command
//! workflow (which disks, creating and destroying VDIs, the new VM) stays
//! in `commands/restore_xen.rs`. Never prints.

use super::first_mismatch;
use crate::crypto::BlockHasher;
use ::bytes::BytesMut;

use crate::progress::Progress;
use crate::repo::restore::{self, BlockSink, RestoreOptions, RestoreSummary};
use crate::repo::{ChainReader, RepoError, Repository};
use crate::source::nbd::NbdLimits;
use crate::source::xenapi::import::{ImportFormat, ImportStream};
use crate::source::xenapi::nbd::NbdSet;
use crate::source::xenapi::{Session, XenApiError, XenObject, XenUrl};
use crate::source::BlockSource;
use xapi_wire::chunked::chunked_body_bytes;

#[derive(Debug, thiserror::Error)]
pub enum XenTargetError {
    /// A XenAPI call or step failed; `what` names it.
    #[error("{what}: {error}")]
    Call { what: String, error: XenApiError },
    /// The host's import task failed: its code first.
    #[error("the host failed the import: {code} {params:?}")]
    HostFailed { code: String, params: Vec<String> },
    /// The restore stopped; the upload was cut.
    #[error("the upload was cut after bytes 0..{written_bytes} of the disk: {cause}")]
    Stopped {
        written_bytes: u64,
        cause: Box<RepoError>,
    },
    /// Sending failed because the host stopped reading; its task says why.
    #[error("sending stopped ({cause}); the upload was cut after bytes 0..{written_bytes} of the disk: {host}")]
    HostStopped {
        written_bytes: u64,
        cause: Box<RepoError>,
        host: Box<XenTargetError>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "verify: block {index} of VDI {vdi_uuid} differs from the snapshot (expected {expected})"
    )]
    VerifyMismatch {
        index: u64,
        vdi_uuid: String,
        expected: String,
    },
}

fn call(what: impl Into<String>) -> impl FnOnce(XenApiError) -> XenTargetError {
    let what = what.into();
    move |error| XenTargetError::Call { what, error }
}

/// A XenAPI error with the host's code first, for the one-line report.
pub fn describe(e: XenApiError) -> XenTargetError {
    match e {
        XenApiError::Api { code, params, .. } => XenTargetError::HostFailed { code, params },
        error => XenTargetError::Call {
            what: "import".into(),
            error,
        },
    }
}

/// What the import body of a disk depends on: its size and its data
/// blocks, counted once over the whole chain ([`ChainReader::survey`],
/// which also reads every manifest page before anything is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskShape {
    pub disk_size_bytes: u64,
    pub block_size: u32,
    pub data_blocks: u64,
    /// Bytes of the data blocks (the last block may be partial).
    pub data_bytes: u64,
}

impl DiskShape {
    pub fn of(reader: &mut ChainReader<'_>) -> Result<DiskShape, RepoError> {
        let disk = reader.disk_size_bytes();
        let bs = reader.block_size() as u64;
        let mut data_bytes = 0u64;
        let data_blocks = reader.survey(|m| {
            data_bytes += m
                .data
                .iter()
                .map(|(i, _)| bs.min(disk.saturating_sub(i * bs)))
                .sum::<u64>();
        })?;
        Ok(DiskShape {
            disk_size_bytes: disk,
            block_size: reader.block_size(),
            data_blocks,
            data_bytes,
        })
    }
}

/// Streams the disk `reader` resolves into the existing VDI `vdi_ref` and
/// follows the task; returns the summary and the body's length.
pub fn import_into(
    repo: &Repository,
    session: &Session,
    reader: ChainReader<'_>,
    shape: &DiskShape,
    vdi_ref: &str,
    format: ImportFormat,
    progress: &dyn Progress,
) -> Result<(RestoreSummary, u64), XenTargetError> {
    let body = body_bytes(shape, format);
    let stream = ImportStream::start(session, vdi_ref, format, body)
        .map_err(call("start PUT /import_raw_vdi"))?;
    let mut sink = XenSink {
        stream,
        disk_size_bytes: shape.disk_size_bytes,
        block_size: shape.block_size as u64,
    };
    match restore::run(repo, reader, &mut sink, RestoreOptions::default(), progress) {
        Ok(summary) => {
            sink.stream.finish(session).map_err(|e| match describe(e) {
                XenTargetError::Call { error, .. } => XenTargetError::Call {
                    what: "import into XenServer".into(),
                    error,
                },
                other => other,
            })?;
            Ok((summary, body))
        }
        Err(e) => {
            // Cut the upload: the host must not take a partial disk as whole.
            let task_error = sink.stream.abort(session);
            let written_bytes = e.written_bytes;
            Err(match (e.cause, task_error) {
                // The host stopped reading: its task says why, with the code.
                (cause, Some(t)) if matches!(*cause, RepoError::Io { .. }) => {
                    XenTargetError::HostStopped {
                        written_bytes,
                        cause,
                        host: Box::new(describe(t)),
                    }
                }
                (cause, _) => XenTargetError::Stopped {
                    written_bytes,
                    cause,
                },
            })
        }
    }
}

/// Blocks read back at once by `--verify`.
const VERIFY_BATCH_BLOCKS: usize = 64;

/// Reads the VDI back over NBD and compares every block's hash with the
/// disk `reader` resolves (range by range).
pub fn verify(
    session: &Session,
    vdi_ref: &str,
    vdi_uuid: &str,
    mut reader: ChainReader<'_>,
    hasher: BlockHasher,
) -> Result<(), XenTargetError> {
    let disk_size_bytes = reader.disk_size_bytes();
    let entries = session
        .vdi_nbd_info(vdi_ref)
        .map_err(call("verify: VDI.get_nbd_info"))?;
    if entries.is_empty() {
        return Err(XenTargetError::Invalid(format!(
            "verify: the host offers no NBD network for VDI {vdi_uuid}"
        )));
    }
    let nbd = NbdSet::connect(
        &entries,
        format!("xen-verify:{vdi_uuid}"),
        disk_size_bytes,
        4,
        NbdLimits::default(),
    )
    .map_err(|e| {
        XenTargetError::Invalid(format!("verify: connect to VDI {vdi_uuid} over NBD: {e}"))
    })?;
    let bs = reader.block_size() as u64;
    let mut buf = BytesMut::new();
    let result = (|| -> Result<(), XenTargetError> {
        // Batches of blocks, each one read with all its requests in flight
        // (not a round trip per block), hashed in parallel.
        for first in (0..reader.block_count()).step_by(VERIFY_BATCH_BLOCKS) {
            let at = first * bs;
            let len = (VERIFY_BATCH_BLOCKS as u64 * bs).min(disk_size_bytes - at);
            buf.resize(len as usize, 0);
            let mut reads = [(at, std::mem::take(&mut buf))];
            nbd.read_owned(&mut reads).map_err(|e| {
                XenTargetError::Invalid(format!(
                    "verify: read blocks from {first} of VDI {vdi_uuid}: {e}"
                ))
            })?;
            buf = std::mem::take(&mut reads[0].1);
            let expected = reader
                .data_in(first, first + VERIFY_BATCH_BLOCKS as u64)
                .map_err(|e| XenTargetError::Invalid(format!("verify: {e}")))?;
            if let Some((index, expected)) = first_mismatch(&expected, bs, hasher, first, &buf) {
                return Err(XenTargetError::VerifyMismatch {
                    index,
                    vdi_uuid: vdi_uuid.to_string(),
                    expected: expected.map_or("zeros".to_string(), |id| id.to_hex()),
                });
            }
        }
        Ok(())
    })();
    nbd.close();
    result
}

/// The reference of the SR with `uuid`.
pub fn sr_by_uuid(session: &Session, uuid: &str) -> Result<String, XenTargetError> {
    let v = session
        .call("SR.get_by_uuid", &[uuid.into()])
        .map_err(call(format!("SR {uuid} does not exist on the host")))?;
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| XenTargetError::Invalid("SR.get_by_uuid: not a string".into()))
}

/// Running VMs (name or uuid) with a VBD on `vdi`.
pub fn running_users(session: &Session, vdi: &str) -> Result<Vec<String>, XenTargetError> {
    let get =
        |method: &'static str, arg: &str| session.call(method, &[arg.into()]).map_err(call(method));
    let vbds = get("VDI.get_VBDs", vdi)?;
    let mut users = Vec::new();
    for vbd in vbds.as_array().unwrap_or_default() {
        let Some(vbd) = vbd.as_str() else { continue };
        let vm = get("VBD.get_VM", vbd)?;
        let Some(vm) = vm.as_str() else { continue };
        let state = get("VM.get_power_state", vm)?;
        let attached = session
            .call("VBD.get_currently_attached", &[vbd.into()])
            .ok()
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if attached
            || state
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("running"))
        {
            let label = session
                .call("VM.get_uuid", &[vm.into()])
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| vm.to_string());
            users.push(label);
        }
    }
    Ok(users)
}

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
    shape: &DiskShape,
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
            if body_bytes(shape, ImportFormat::Chunked) < body_bytes(shape, ImportFormat::Raw) =>
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

/// Bytes of the import body of a disk of `shape` in `format`: the disk
/// for raw; for chunked, one header and the bytes of each data block, and
/// the terminating header.
pub fn body_bytes(shape: &DiskShape, format: ImportFormat) -> u64 {
    match format {
        ImportFormat::Raw => shape.disk_size_bytes,
        ImportFormat::Chunked => {
            chunked_body_bytes(std::iter::empty())
                + shape.data_blocks * xapi_wire::chunked::CHUNK_HEADER_BYTES
                + shape.data_bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BlockId;

    fn map(blocks: u64, data: impl Iterator<Item = u64>) -> DiskShape {
        let n = data.count() as u64;
        DiskShape {
            disk_size_bytes: blocks * 65536,
            block_size: 65536,
            data_blocks: n,
            data_bytes: n * 65536,
        }
    }

    #[test]
    fn verify_names_the_first_block_that_differs() {
        let a = vec![1u8; 65536];
        let b = vec![2u8; 65536];
        // Blocks 10.. of a disk: 10 = a, 11 = zeros, 12 = b, 13 = zeros.
        let m = vec![(10, BlockId::of(&a)), (12, BlockId::of(&b))];
        let good = [a.clone(), vec![0; 65536], b.clone(), vec![0; 65536]].concat();
        assert_eq!(
            first_mismatch(&m, 65536, BlockHasher::Plain, 10, &good),
            None
        );
        let mut bad = good.clone();
        bad[3 * 65536 + 5] = 1; // data where zeros are expected
        bad[2 * 65536] ^= 1; // a changed byte in block 12 (reported first)
        assert_eq!(
            first_mismatch(&m, 65536, BlockHasher::Plain, 10, &bad),
            Some((12, Some(BlockId::of(&b))))
        );
        bad[2 * 65536] ^= 1;
        assert_eq!(
            first_mismatch(&m, 65536, BlockHasher::Plain, 10, &bad),
            Some((13, None))
        );
    }

    #[test]
    fn auto_sends_the_smaller_body_into_a_new_vdi_and_raw_into_an_existing_one() {
        let half = map(1000, (0..1000).step_by(2));
        let dense = map(1000, 0..1000);
        let one_hole = map(10_000, 1..10_000);
        let chunked =
            |m: &DiskShape, new| choose_format(m, "auto", new).unwrap() == ImportFormat::Chunked;
        assert!(chunked(&half, true));
        assert!(!chunked(&half, false));
        assert!(!chunked(&dense, true));
        // One zero block saves 64 KiB, less than 12 bytes of header for
        // each of 9999 blocks.
        assert!(!chunked(&one_hole, true));
        assert!(choose_format(&half, "chunked", false).is_err());
    }
}
