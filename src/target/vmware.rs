//! vSphere targets: a new flat VMDK on a datastore
//! (`vmware://[USER@]HOST[:PORT]/datastore/DS/PATH.vmdk`) that an
//! administrator attaches to a VM. The disk's bytes stream from the one
//! restore engine straight into `PUT /folder/PATH-flat.vmdk` (nothing
//! materialised locally); the descriptor `PATH.vmdk` is uploaded only after
//! the whole flat file was accepted, so a cut restore never leaves a disk
//! that vSphere would attach; a partial flat file is deleted
//! (`DeleteDatastoreFile_Task`). `--verify` reads both back. The command
//! workflow stays in `commands/restore_vmware.rs`. Never prints.

use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use std::io::{Read, Write};
use std::sync::Arc;

use ::bytes::BytesMut;

use super::vmdk::{self, FlatDescriptor, SECTOR_BYTES};
use super::StreamSink;
use crate::crypto::BlockHasher;
use crate::progress::Progress;
use crate::repo::restore::{self, RestoreOptions, RestoreSummary};
use crate::repo::{ChainReader, RepoError, Repository};
use crate::source::vmware::client::Session;
use crate::source::vmware::folder::FlatFile;
use crate::source::vmware::VmwareError;
use crate::source::BlockSource;
use vim_wire::Moref;

#[derive(Debug, thiserror::Error)]
pub enum VmwareTargetError {
    #[error("{what}: {error}")]
    Call { what: String, error: VmwareError },
    /// The restore stopped; the upload was cut.
    #[error("the upload was cut after bytes 0..{written_bytes} of the disk: {cause}")]
    Stopped {
        written_bytes: u64,
        cause: Box<RepoError>,
    },
    /// The host ended the upload (refused it or closed the connection).
    #[error(
        "the host stopped the upload of {path} after bytes 0..{written_bytes} of the disk: {host}"
    )]
    HostStopped {
        path: String,
        written_bytes: u64,
        host: Box<VmwareError>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("verify: block {index} of {path} differs from the snapshot (expected {expected})")]
    VerifyMismatch {
        index: u64,
        path: String,
        expected: String,
    },
}

fn call(what: impl Into<String>) -> impl FnOnce(VmwareError) -> VmwareTargetError {
    let what = what.into();
    move |error| VmwareTargetError::Call { what, error }
}

/// What a `vmware://` restore target names: a descriptor path on a
/// datastore (the flat file sits beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmwareTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
    pub datastore: String,
    /// The descriptor's path in the datastore (`dir/name.vmdk`).
    pub descriptor: String,
    /// The flat file's name beside the descriptor, when not the usual
    /// `name-flat.vmdk` (a `--force` restore writes a new disk under a
    /// name of its own while the old one still stands).
    pub flat_file: Option<String>,
}

impl VmwareTarget {
    pub fn parse(text: &str) -> Result<VmwareTarget, VmwareError> {
        let shown = crate::source::xenapi::redact(text);
        let bad = |why: &str| {
            VmwareError::Invalid(format!(
                "'{shown}' is not a vSphere restore target ({why}); expected vmware://[USER@]HOST[:PORT]/datastore/DATASTORE/PATH.vmdk"
            ))
        };
        let (url, user, host) = crate::source::vmware::parse_head(text).map_err(|why| bad(&why))?;
        let segments: Vec<String> = url
            .path_segments()
            .map(|s| {
                s.map(|p| {
                    url::form_urlencoded::parse(format!("v={}", p.replace('+', "%2B")).as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                })
                .collect()
            })
            .unwrap_or_default();
        let [kind, datastore, rest @ ..] = segments.as_slice() else {
            return Err(bad("the path must be /datastore/DATASTORE/PATH.vmdk"));
        };
        if kind != "datastore" || datastore.is_empty() || rest.is_empty() {
            return Err(bad("the path must be /datastore/DATASTORE/PATH.vmdk"));
        }
        if rest.iter().any(|p| {
            p.is_empty()
                || p == "."
                || p == ".."
                || p.contains(['"', '/', '\\', '[', ']'])
                || p.chars().any(char::is_control)
                || p.trim() != p
        }) {
            return Err(bad(
                "empty, '.', '..', quoted, bracketed, escaped-slash or control-character parts, or parts with leading or trailing spaces, in the file path",
            ));
        }
        // The datastore name goes into "[DATASTORE] path" strings that the
        // host parses: nothing that could end it early or be trimmed.
        if datastore.contains(['[', ']', '"', '/', '\\'])
            || datastore.chars().any(char::is_control)
            || datastore.trim() != datastore
        {
            return Err(bad("brackets, quotes, slashes, control characters or leading or trailing spaces in the datastore name"));
        }
        let descriptor = rest.join("/");
        let Some(stem) = descriptor.strip_suffix(".vmdk") else {
            return Err(bad("the file must end in .vmdk (its descriptor)"));
        };
        if stem.is_empty() || stem.ends_with('/') || stem.ends_with("-flat") {
            return Err(bad(
                "name the descriptor (NAME.vmdk), not the flat file; NAME-flat.vmdk is written beside it",
            ));
        }
        Ok(VmwareTarget {
            user,
            host,
            port: url.port().unwrap_or(443),
            datastore: datastore.clone(),
            descriptor,
            flat_file: None,
        })
    }

    /// The flat file's path in the datastore (`dir/name-flat.vmdk`, or
    /// [`Self::flat_file`] in the descriptor's folder).
    pub fn flat(&self) -> String {
        if let Some(name) = &self.flat_file {
            return self.beside(name);
        }
        self.beside(&format!("{}-flat.vmdk", self.stem()))
    }

    /// The descriptor's file name without `.vmdk` (`name`).
    pub fn stem(&self) -> &str {
        let file = self
            .descriptor
            .rsplit('/')
            .next()
            .unwrap_or(&self.descriptor);
        file.strip_suffix(".vmdk").unwrap_or(file)
    }

    /// The flat file's name, as the descriptor's extent line names it.
    pub fn flat_name(&self) -> String {
        let flat = self.flat();
        flat.rsplit('/').next().unwrap_or(&flat).to_string()
    }

    /// The path of file `name` in the descriptor's folder.
    pub fn beside(&self, name: &str) -> String {
        match self.folder() {
            Some(dir) => format!("{dir}/{name}"),
            None => name.to_string(),
        }
    }

    /// The descriptor's folder in the datastore (`None`: the top).
    pub fn folder(&self) -> Option<&str> {
        self.descriptor.rsplit_once('/').map(|(dir, _)| dir)
    }

    /// `[DATASTORE] PATH`, as vSphere shows it.
    pub fn datastore_path(&self, path: &str) -> String {
        format!("[{}] {path}", self.datastore)
    }

    /// `HOST:PORT`.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Bytes buffered before a chunk goes to the upload.
const PIPE_CHUNK: usize = 1 << 20;
/// An upload the host takes nothing of for this long has stalled.
const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Chunks queued for the upload (so at most 9 MiB in memory).
const PIPE_DEPTH: usize = 8;

/// The restore engine's side of the upload: bytes in order, in chunks.
struct PipeWriter {
    tx: Sender<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
}

impl PipeWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(PIPE_CHUNK));
        let closed = || {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the host stopped reading the upload",
            )
        };
        // The host takes the queued chunks at its pace; while it takes
        // none, a stop signal still ends the restore, and a host that takes
        // nothing for STALL_LIMIT has stalled.
        let mut chunk = Ok(chunk);
        let waiting = std::time::Instant::now();
        loop {
            match self
                .tx
                .send_timeout(chunk, std::time::Duration::from_millis(200))
            {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Disconnected(_)) => return Err(closed()),
                Err(SendTimeoutError::Timeout(back)) => chunk = back,
            }
            crate::interrupt::check().map_err(std::io::Error::other)?;
            if waiting.elapsed() > STALL_LIMIT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the host took no bytes of the upload for {} seconds",
                        STALL_LIMIT.as_secs()
                    ),
                ));
            }
        }
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PIPE_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIPE_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// The upload's side: exactly `len` bytes, else an error (a sender gone
/// early or a failure sent by the restore cuts the request).
struct PipeReader {
    rx: Receiver<Result<Vec<u8>, String>>,
    chunk: Vec<u8>,
    at: usize,
    delivered: u64,
    len: u64,
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.delivered == self.len {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Ok(Err(why)) => return Err(std::io::Error::other(why)),
                Err(_) => {
                    return Err(std::io::Error::other(format!(
                        "the restore ended after {} of {} bytes",
                        self.delivered, self.len
                    )))
                }
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        let n = n.min((self.len - self.delivered) as usize);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        self.delivered += n as u64;
        if n == 0 {
            return Err(std::io::Error::other(
                "the restore sent more bytes than the disk holds",
            ));
        }
        Ok(n)
    }
}

/// The bytes of the flat file of a disk of `disk_size_bytes`: whole
/// sectors (a partial last sector is padded with zeros).
pub fn flat_bytes(disk_size_bytes: u64) -> u64 {
    vmdk::sectors_for(disk_size_bytes) * SECTOR_BYTES
}

/// Where and how to upload.
pub struct Upload<'a> {
    pub session: &'a Session,
    pub target: &'a VmwareTarget,
    /// `dcPath` of the `/folder` requests.
    pub datacenter: &'a str,
    /// The same datacenter's moref (deleting a partial file).
    pub datacenter_ref: &'a Moref,
}

impl Upload<'_> {
    /// Streams the disk `reader` resolves into the flat file (every byte,
    /// zeros included, padded to whole sectors). On any failure the upload
    /// is cut and the partial flat file deleted when the host kept one.
    pub fn flat(
        &self,
        repo: &Repository,
        reader: ChainReader<'_>,
        progress: &dyn Progress,
    ) -> Result<RestoreSummary, VmwareTargetError> {
        let disk = reader.disk_size_bytes();
        let len = flat_bytes(disk);
        let flat = self.target.flat();
        let (tx, rx) = crossbeam_channel::bounded(PIPE_DEPTH);
        let fail = tx.clone();
        let result = std::thread::scope(|scope| {
            let upload = scope.spawn(|| {
                self.session.put_file(
                    self.datacenter,
                    &self.target.datastore,
                    &flat,
                    len,
                    PipeReader {
                        rx,
                        chunk: Vec::new(),
                        at: 0,
                        delivered: 0,
                        len,
                    },
                )
            });
            let mut sink = StreamSink::new(PipeWriter {
                tx,
                buf: Vec::with_capacity(PIPE_CHUNK),
            });
            let restored =
                restore::run(repo, reader, &mut sink, RestoreOptions::default(), progress);
            match restored {
                Ok(summary) => {
                    let mut w = sink.into_inner();
                    let padded = (|| {
                        let mut pad = len - disk;
                        while pad > 0 {
                            let n = pad.min(super::ZEROS.len() as u64) as usize;
                            w.write_all(&super::ZEROS[..n])?;
                            pad -= n as u64;
                        }
                        w.flush()
                    })();
                    drop(w);
                    drop(fail);
                    let host = upload.join().unwrap_or_else(|_| {
                        Err(VmwareError::Invalid("the upload thread panicked".into()))
                    });
                    match (padded, host) {
                        (_, Err(host)) => Err(VmwareTargetError::HostStopped {
                            path: self.target.datastore_path(&flat),
                            written_bytes: disk,
                            host: Box::new(host),
                        }),
                        (Err(e), Ok(())) => Err(VmwareTargetError::Invalid(format!(
                            "padding the last sector: {e}"
                        ))),
                        (Ok(()), Ok(())) => Ok(summary),
                    }
                }
                Err(e) => {
                    // Cut the upload: an error, not a short body that a
                    // host might take as the whole file.
                    let _ = fail.try_send(Err(format!("the restore stopped: {}", e.cause)));
                    drop(sink);
                    drop(fail);
                    let host = upload.join().ok().and_then(Result::err);
                    Err(match host {
                        // The host ended the upload first: it says why.
                        Some(h) if e.target_failed => VmwareTargetError::HostStopped {
                            path: self.target.datastore_path(&flat),
                            written_bytes: e.written_bytes,
                            host: Box::new(h),
                        },
                        _ => VmwareTargetError::Stopped {
                            written_bytes: e.written_bytes,
                            cause: e.cause,
                        },
                    })
                }
            }
        });
        if let Err(e) = result {
            return Err(match self.remove_partial(&flat) {
                Ok(()) => e,
                Err(left) => VmwareTargetError::Invalid(format!("{e}; {left}")),
            });
        }
        result
    }

    /// Deletes `path` (this run's) if the host kept it; says what is left
    /// if it cannot.
    pub fn remove_partial(&self, path: &str) -> Result<(), String> {
        let shown = self.target.datastore_path(path);
        match self
            .session
            .file_size(self.datacenter, &self.target.datastore, path)
        {
            Ok(None) => Ok(()),
            Ok(Some(_)) => self
                .session
                .delete_file(self.datacenter_ref, &self.target.datastore, path)
                .map_err(|e| {
                    format!(
                        "the partial file {shown} could not be deleted ({e}): delete it by hand"
                    )
                }),
            Err(e) => Err(format!(
                "whether the host kept a partial {shown} is unknown ({e}): check and delete it"
            )),
        }
    }

    /// Uploads the descriptor of the flat file (the last step: only now
    /// does the datastore hold an attachable disk).
    pub fn descriptor(&self, disk_size_bytes: u64, id: [u8; 16]) -> Result<(), VmwareTargetError> {
        let text = vmdk::flat_descriptor(
            &self.target.flat_name(),
            vmdk::sectors_for(disk_size_bytes),
            id,
        )
        .map_err(|e| VmwareTargetError::Invalid(format!("the descriptor: {e}")))?;
        self.put_descriptor(text.into_bytes())
    }

    /// Writes `bytes` as the descriptor (a new one, or an old one put
    /// back after a failed replacement).
    pub fn put_descriptor(&self, bytes: Vec<u8>) -> Result<(), VmwareTargetError> {
        let len = bytes.len() as u64;
        self.session
            .put_file(
                self.datacenter,
                &self.target.datastore,
                &self.target.descriptor,
                len,
                std::io::Cursor::new(bytes),
            )
            .map_err(call(format!(
                "upload the descriptor {}",
                self.target.datastore_path(&self.target.descriptor)
            )))
    }

    /// Deletes both files (after a failure once the flat file was whole).
    pub fn remove_both(&self) -> Result<(), String> {
        let a = self.remove_partial(&self.target.descriptor);
        let b = self.remove_partial(&self.target.flat());
        match (a, b) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(a), Ok(())) | (Ok(()), Err(a)) => Err(a),
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
        }
    }
}

/// Blocks read back at once by `--verify`.
const VERIFY_BATCH_BLOCKS: u64 = 64;

/// Reads the descriptor and the flat file back: the descriptor must name
/// the flat file and the disk's sectors, the flat file must hold every
/// block as the snapshot resolves it, and zeros after the disk's end.
pub fn verify(
    session: Arc<Session>,
    target: &VmwareTarget,
    datacenter: &str,
    mut reader: ChainReader<'_>,
    hasher: BlockHasher,
) -> Result<(), VmwareTargetError> {
    let disk = reader.disk_size_bytes();
    let shown = target.datastore_path(&target.descriptor);
    let text = session
        .read_file(
            datacenter,
            &target.datastore,
            &target.descriptor,
            vmdk::MAX_DESCRIPTOR_BYTES as u64,
        )
        .map_err(call(format!("verify: read {shown}")))?;
    let d: FlatDescriptor = vmdk::parse_flat_descriptor(&text)
        .map_err(|e| VmwareTargetError::Invalid(format!("verify: {shown}: {e}")))?;
    if d.extent_file != target.flat_name() || d.sectors != vmdk::sectors_for(disk) {
        return Err(VmwareTargetError::Invalid(format!(
            "verify: {shown} names {} sectors of '{}', not {} of '{}'",
            d.sectors,
            d.extent_file,
            vmdk::sectors_for(disk),
            target.flat_name()
        )));
    }
    let flat = target.flat();
    let flat_shown = target.datastore_path(&flat);
    let len = flat_bytes(disk);
    match session.file_size(datacenter, &target.datastore, &flat) {
        Ok(Some(n)) if n == len => {}
        Ok(found) => {
            return Err(VmwareTargetError::Invalid(format!(
                "verify: {flat_shown} holds {found:?} bytes, not {len}"
            )))
        }
        Err(e) => return Err(call(format!("verify: HEAD {flat_shown}"))(e)),
    }
    let file = FlatFile::new(
        session,
        flat_shown.clone(),
        datacenter.to_string(),
        target.datastore.clone(),
        flat.clone(),
        len,
    );
    let bs = reader.block_size() as u64;
    let mut buf = BytesMut::new();
    for first in (0..reader.block_count()).step_by(VERIFY_BATCH_BLOCKS as usize) {
        // A stop signal ends the read-back (the caller removes the files
        // of a restore that was not verified).
        crate::interrupt::check()
            .map_err(|e| VmwareTargetError::Invalid(format!("verify: {e}")))?;
        let at = first * bs;
        // The last batch takes the sector padding too.
        let end = ((first + VERIFY_BATCH_BLOCKS) * bs).min(disk);
        let end = if end == disk { len } else { end };
        buf.resize((end - at) as usize, 0);
        let mut reads = [(at, std::mem::take(&mut buf))];
        file.read_owned(&mut reads)
            .map_err(|e| VmwareTargetError::Invalid(format!("verify: {e}")))?;
        buf = std::mem::take(&mut reads[0].1);
        let data_end = ((end.min(disk)) - at) as usize;
        let expected = reader
            .data_in(first, first + VERIFY_BATCH_BLOCKS)
            .map_err(|e| VmwareTargetError::Invalid(format!("verify: {e}")))?;
        if let Some((index, expected)) =
            super::first_mismatch(&expected, bs, hasher, first, &buf[..data_end])
        {
            return Err(VmwareTargetError::VerifyMismatch {
                index,
                path: flat_shown,
                expected: expected.map_or("zeros".to_string(), |id| id.to_hex()),
            });
        }
        if !nbd::bytes::is_zero(&buf[data_end..]) {
            return Err(VmwareTargetError::Invalid(format!(
                "verify: {flat_shown}: the padding after byte {disk} is not zero"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = VmwareTarget::parse(
            "vmware://admin%40vsphere.local@esx.example:8443/datastore/datastore1/restored/web%2001.vmdk",
        )
        .unwrap();
        assert_eq!(t.user.as_deref(), Some("admin@vsphere.local"));
        assert_eq!((t.host.as_str(), t.port), ("esx.example", 8443));
        assert_eq!(t.datastore, "datastore1");
        assert_eq!(t.descriptor, "restored/web 01.vmdk");
        assert_eq!(t.flat(), "restored/web 01-flat.vmdk");
        assert_eq!(t.flat_name(), "web 01-flat.vmdk");
        assert_eq!(
            t.datastore_path(&t.flat()),
            "[datastore1] restored/web 01-flat.vmdk"
        );
        let top = VmwareTarget::parse("vmware://esx/datastore/ds%201/d.vmdk").unwrap();
        assert_eq!(
            (top.port, top.datastore.as_str(), top.flat().as_str()),
            (443, "ds 1", "d-flat.vmdk")
        );
        for bad in [
            "vmware://u:pw@esx/datastore/ds/d.vmdk",
            "vmware://esx/vm/vm-1",
            "vmware://esx/datastore/ds",
            "vmware://esx/datastore/ds/",
            "vmware://esx/datastore//d.vmdk",
            "vmware://esx/datastore/ds/d.img",
            "vmware://esx/datastore/ds/d-flat.vmdk",
            "vmware://esx/datastore/ds/../d.vmdk",
            "vmware://esx/datastore/ds/a//d.vmdk",
            "vmware://esx/datastore/ds/a%2F..%2Fd.vmdk",
            "vmware://esx/datastore/ds/%20d.vmdk",
            "vmware://esx/datastore/ds/d%09x.vmdk",
            "vmware://esx/datastore/ds/d%00.vmdk",
            "vmware://esx/datastore/ds/a%5Bb%5D.vmdk",
            "vmware://esx/datastore/d%5Ds/d.vmdk",
            "vmware://esx/datastore/%20ds/d.vmdk",
            "vmware://esx/datastore/ds/.vmdk",
            "xen://esx/datastore/ds/d.vmdk",
        ] {
            assert!(VmwareTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_pipe_delivers_exactly_the_length_or_an_error() {
        let run = |chunks: Vec<Result<Vec<u8>, String>>, len: u64, close: bool| {
            let (tx, rx) = crossbeam_channel::bounded(16);
            for c in chunks {
                tx.send(c).unwrap();
            }
            if close {
                drop(tx);
            } else {
                std::mem::forget(tx);
            }
            let mut r = PipeReader {
                rx,
                chunk: Vec::new(),
                at: 0,
                delivered: 0,
                len,
            };
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| out)
        };
        assert_eq!(
            run(vec![Ok(vec![1, 2]), Ok(vec![3])], 3, true).unwrap(),
            vec![1, 2, 3]
        );
        // Ends at the length even with the sender still open.
        assert_eq!(
            run(vec![Ok(vec![1, 2, 3])], 3, false).unwrap(),
            vec![1, 2, 3]
        );
        // A sender gone early, or a failure sent: an error, never a short body.
        assert!(run(vec![Ok(vec![1, 2])], 3, true).is_err());
        let e = run(vec![Ok(vec![1]), Err("damaged block 7".into())], 3, true).unwrap_err();
        assert!(e.to_string().contains("damaged block 7"));
        // More than the length: an error.
        assert!(run(vec![Ok(vec![1, 2, 3, 4])], 3, true).is_err());
        assert_eq!(flat_bytes(1), 512);
        assert_eq!(flat_bytes(1 << 20), 1 << 20);
    }
}
