//! `GET /export_raw_vdi` and `PUT /import_raw_vdi` (xenapi-reference.md
//! §3): raw and `chunked` bodies streamed to and from the VDI's disk, the
//! import fault switches, and the writer that keeps one disk write in flight.
//! A `task.cancel` of the handler's task stops the transfer at the next
//! piece (1 MiB): the connection drops and the task ends `cancelled` with
//! `TASK_CANCELLED [task]`, as xapi's copy loops check
//! `TaskHelper.exn_if_cancelling`. An import also stops with `SR_FULL`
//! when a piece does not fit its SR (see `model/sr.rs`).

use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use super::{After, Conn, ConnError, IDLE_TIMEOUT, IO_CHUNK};
use crate::http::HttpError;
use crate::http::RequestHead;
use crate::model::Ref;
use crate::Core;
use xapi_wire::chunked::ChunkStep;
use xapi_wire::chunked::ChunkedImport;
use xapi_wire::xmlrpc;
use xapi_wire::ApiError;
use xapi_wire::Value;

/// The disk side of an import: each write runs on a blocking thread while
/// the connection receives the next piece (one write in flight), and the
/// simulator's state lock is held only to find the disk and to record the
/// change, not during the disk I/O.
struct ImportWriter {
    core: Arc<Core>,
    vdi: String,
    in_flight: Option<tokio::task::JoinHandle<Result<(), ApiError>>>,
    /// Recently written ranges, released from the page cache once old
    /// enough to have been written back (see `Disk::drop_cached`).
    written: std::collections::VecDeque<(u64, u64)>,
}

/// Writes an import keeps in the page cache before releasing the oldest.
const IMPORT_CACHE_WINDOW: usize = 8;

impl ImportWriter {
    fn new(core: &Arc<Core>, vdi: &str) -> Self {
        ImportWriter {
            core: core.clone(),
            vdi: vdi.to_string(),
            in_flight: None,
            written: std::collections::VecDeque::new(),
        }
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), ApiError> {
        self.finish().await?;
        let core = self.core.clone();
        let vdi = self.vdi.clone();
        self.written.push_back((offset, data.len() as u64));
        let release = (self.written.len() > IMPORT_CACHE_WINDOW)
            .then(|| self.written.pop_front())
            .flatten();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let disk = {
                let st = core.lock();
                let disk = st.disk_for_write(&vdi, offset, data.len() as u64)?;
                st.check_write_space(&vdi, offset, &data)?;
                disk
            };
            disk.write(offset, &data).map_err(ApiError::vdi_io_from)?;
            // Queue this write for writeback; drop an older one, now clean.
            disk.drop_cached(offset, data.len() as u64);
            if let Some((at, len)) = release {
                disk.drop_cached(at, len);
            }
            core.lock().mark_written(&vdi, offset, data.len() as u64);
            Ok(())
        }));
        Ok(())
    }

    /// Waits for the write in flight; its error, if any.
    async fn finish(&mut self) -> Result<(), ApiError> {
        match self.in_flight.take() {
            Some(h) => h
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(e.to_string()))),
            None => Ok(()),
        }
    }
}

impl Conn {
    /// Up to `max` body bytes, buffered ones first; empty at EOF.
    /// A body read of `/import_raw_vdi`: counted, and failed once the
    /// `import_fail_after_bytes` fault is reached.
    pub(super) async fn read_import(&mut self, max: usize) -> Result<Vec<u8>, ApiError> {
        let io_error = ApiError::vdi_io;
        let data = self.read_some(max).await.map_err(|_| io_error())?;
        self.count_import(data.len())?;
        Ok(data)
    }

    /// Counts `n` import body bytes received; fails once the
    /// `import_fail_after_bytes` fault is reached.
    pub(super) fn count_import(&mut self, n: usize) -> Result<(), ApiError> {
        self.core
            .import_bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.import_seen += n as u64;
        let (fail, _) = self.import_faults;
        if self.import_dropped() || fail.is_some_and(|l| self.import_seen > l) {
            return Err(ApiError::vdi_io());
        }
        Ok(())
    }

    /// `TASK_CANCELLED [task]` once `task.cancel` was called on the task.
    fn check_cancelled(&self, task: &str) -> Result<(), ApiError> {
        if self.core.lock().task_status(task) == Some("cancelling") {
            return Err(ApiError::new("TASK_CANCELLED", [task]));
        }
        Ok(())
    }

    /// The `import_drop_after_bytes` fault fired: close without lingering.
    pub(super) fn import_dropped(&self) -> bool {
        let (_, drop) = self.import_faults;
        drop.is_some_and(|l| self.import_seen > l)
    }

    /// `GET /export_raw_vdi` (§3.1): raw only; the VDI is attached RO to
    /// dom0 while its bytes stream; no Content-Length, the body ends at close.
    pub(super) async fn export_raw_vdi(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "export_raw_vdi").await? else {
            return Ok(After::Close);
        };
        let outcome = self.export_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    pub(super) async fn export_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        let Some(key) = head.param("vdi") else {
            return self
                .fail_task(task, 500, ApiError::internal("Missing vdi query parameter"))
                .await;
        };
        let format = head.param("format").unwrap_or_else(|| "raw".into());
        match format.as_str() {
            "raw" => {}
            "vhd" | "tar" | "qcow2" => {
                return self
                    .fail_task(
                        task,
                        404,
                        ApiError::internal(format!("the simulator exports raw only, not {format}")),
                    )
                    .await
            }
            other => {
                return self
                    .fail_task(
                        task,
                        404,
                        ApiError::internal(format!("Unknown format {other}")),
                    )
                    .await
            }
        }
        let sr = self.core.lock().sr_of_vdi(&key);
        if let Some(sr) = sr {
            if let Some(after) = self.redirect_unless_seen(head, task, &sr).await? {
                return Ok(after);
            }
        }
        let host = self.host.clone();
        let attached = {
            let mut st = self.core.lock();
            st.vdi_by_ref_or_uuid(&key).and_then(|vdi| {
                let v = st.vdi(&vdi)?;
                let (uuid, disk) = (v.uuid.clone(), v.data.clone());
                let disk = disk.ok_or_else(|| ApiError::incompatible_type(&vdi, "cbt_metadata"))?;
                let vbd = st.attach_to_dom0_of(&host, &vdi, "RO")?;
                Ok((uuid, disk, vbd))
            })
        };
        let (uuid, disk, vbd) = match attached {
            Ok(a) => a,
            Err(e) => return self.fail_task(task, 500, e).await,
        };
        let headers = [
            ("task-id", task.0.clone()),
            ("content-type", "application/octet-stream".to_string()),
            (
                "content-disposition",
                format!("attachment; filename=\"{uuid}.raw\""),
            ),
        ];
        let mut result = self
            .respond_streaming(&headers)
            .await
            .map_err(|_| ApiError::vdi_io());
        let size = disk.size_bytes();
        let mut offset = 0u64;
        while result.is_ok() && offset < size {
            if let Err(e) = self.check_cancelled(&task.0) {
                result = Err(e);
                break;
            }
            let n = (size - offset).min(IO_CHUNK as u64) as usize;
            let d = disk.clone();
            let read = tokio::task::spawn_blocking(move || d.read(offset, n)).await;
            result = match read {
                Ok(Ok(data)) => self
                    .io
                    .write_all(&data)
                    .await
                    .map_err(|_| ApiError::vdi_io()),
                Ok(Err(_)) | Err(_) => Err(ApiError::vdi_io()),
            };
            offset += n as u64;
        }
        let _ = self.io.flush().await;
        self.core.lock().detach_and_destroy(&vbd);
        let cancelled = matches!(&result, Err(e) if e.code == "TASK_CANCELLED");
        self.finish_task(task, result.map(|_| String::new()));
        if cancelled {
            // The body stops short: the client sees the connection drop.
            return Err(ConnError::Io(std::io::ErrorKind::ConnectionAborted.into()));
        }
        Ok(After::Close)
    }

    /// `PUT /import_raw_vdi` (§3.2): raw (Content-Length, or to EOF) or the
    /// `chunked` format, into an existing VDI or a new one in an SR.
    pub(super) async fn import_raw_vdi(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "import_raw_vdi").await? else {
            return Ok(After::Close);
        };
        let outcome = self.import_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    pub(super) async fn import_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        if let Some(te) = head.header("transfer-encoding") {
            let e = ApiError::internal(format!("Cannot handle encoding: {te}"));
            return self.fail_task(task, 404, e).await;
        }
        let format = head.param("format").unwrap_or_else(|| "raw".into());
        let chunked = head.has_query("chunked") || head.cookie("chunked").is_some();
        if chunked && format != "raw" {
            return self
                .fail_task(task, 404, ApiError::internal("Cannot handle chunked VHD"))
                .await;
        }
        let content_length = match head.content_length() {
            Ok(l) => l,
            Err(e) => return self.fail(400, &e.to_string()).await,
        };
        let vdi = match head.param("vdi") {
            Some(key) => {
                if format != "raw" {
                    let e =
                        ApiError::internal(format!("the simulator imports raw only, not {format}"));
                    return self.fail_task(task, 404, e).await;
                }
                let found = self.core.lock().vdi_by_ref_or_uuid(&key);
                match found {
                    Ok(v) => {
                        let sr = self.core.lock().sr_of_vdi(&v);
                        if let Some(sr) = sr {
                            if let Some(after) = self.redirect_unless_seen(head, task, &sr).await? {
                                return Ok(after);
                            }
                        }
                        v
                    }
                    Err(e) => return self.fail_task(task, 404, e).await,
                }
            }
            None => {
                let sr = {
                    let st = self.core.lock();
                    match (head.param("sr_id"), head.param("sr_uuid")) {
                        (Some(r), _) if st.srs.contains_key(&r) => Some(Ok(r)),
                        (Some(r), _) => Some(Err(ApiError::handle_invalid("SR", &r))),
                        (None, Some(u)) => Some(st.by_uuid(crate::model::Class::Sr, &u)),
                        (None, None) => None,
                    }
                };
                let sr = match sr {
                    None => {
                        return self
                            .fail_task(
                                task,
                                400,
                                ApiError::new("VDI_MISSING", Vec::<String>::new()),
                            )
                            .await
                    }
                    Some(Err(e)) => return self.fail_task(task, 400, e).await,
                    Some(Ok(sr)) => sr,
                };
                if let Some(after) = self.redirect_unless_seen(head, task, &sr).await? {
                    return Ok(after);
                }
                let Some(size) = content_length.filter(|_| format == "raw" && !chunked) else {
                    let e = ApiError::internal("a new VDI needs format=raw with a Content-Length");
                    return self.fail_task(task, 400, e).await;
                };
                let created = {
                    let mut st = self.core.lock();
                    st.vdi_create(crate::model::NewVdi::user("Imported VDI", sr, size))
                };
                match created {
                    Ok(v) => v,
                    Err(e) => return self.fail_task(task, 500, e).await,
                }
            }
        };
        let vbd = {
            let mut st = self.core.lock();
            let has_data = st.vdi(&vdi).map(|v| v.data.is_some()).unwrap_or(false);
            if has_data {
                st.attach_to_dom0_of(&self.host, &vdi, "RW")
            } else {
                Err(ApiError::incompatible_type(&vdi, "cbt_metadata"))
            }
        };
        let vbd = match vbd {
            Ok(b) => b,
            Err(e) => return self.fail_task(task, 500, e).await,
        };
        if head
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            self.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        // xapi answers 200 before it reads the body; the outcome is the task's.
        let headers = [
            ("task-id", task.0.clone()),
            ("content-type", "text/plain".to_string()),
        ];
        self.respond(200, &headers, b"", false).await?;
        self.import_faults = {
            let st = self.core.lock();
            (
                st.faults.import_fail_after_bytes,
                st.faults.import_drop_after_bytes,
            )
        };
        let written = if chunked {
            self.write_chunked(&vdi, &task.0).await
        } else {
            self.write_raw(&vdi, content_length, &task.0).await
        };
        let cancelled = matches!(&written, Err(e) if e.code == "TASK_CANCELLED");
        {
            let mut st = self.core.lock();
            st.detach_and_destroy(&vbd);
            self.core.changed(&st);
        }
        self.finish_task(
            task,
            written.map(|_| xmlrpc::value_fragment(&Value::str(&vdi))),
        );
        if self.import_dropped() || cancelled {
            // Unread body bytes make the kernel reset the connection.
            return Err(ConnError::Io(std::io::ErrorKind::ConnectionReset.into()));
        }
        Ok(After::Close)
    }

    /// Up to `want` body bytes gathered into one buffer (fewer only at the
    /// end of the body).
    pub(super) async fn read_import_chunk(&mut self, want: usize) -> Result<Vec<u8>, ApiError> {
        let io_error = ApiError::vdi_io;
        let mut out = Vec::with_capacity(want);
        // Bytes already buffered first, then straight from the stream into
        // `out` (its capacity bounds every read).
        let n = want.min(self.buf.len());
        out.extend_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        self.count_import(n)?;
        while out.len() < want {
            let read = tokio::time::timeout(IDLE_TIMEOUT, self.io.read_buf(&mut out))
                .await
                .map_err(|_| io_error())?
                .map_err(|_| io_error())?;
            if read == 0 {
                break;
            }
            self.count_import(read)?;
        }
        Ok(out)
    }

    pub(super) async fn write_raw(
        &mut self,
        vdi: &str,
        len: Option<u64>,
        task: &str,
    ) -> Result<(), ApiError> {
        let mut disk = ImportWriter::new(&self.core, vdi);
        let mut offset = 0u64;
        loop {
            self.check_cancelled(task)?;
            let want = match len {
                Some(l) if offset >= l => break,
                Some(l) => (l - offset).min(IO_CHUNK as u64) as usize,
                None => IO_CHUNK,
            };
            let data = self.read_import_chunk(want).await?;
            if data.is_empty() {
                if len.is_some() {
                    return Err(ApiError::vdi_io());
                }
                break;
            }
            let n = data.len() as u64;
            disk.write(offset, data).await?;
            offset += n;
        }
        disk.finish().await
    }

    pub(super) async fn write_chunked(&mut self, vdi: &str, task: &str) -> Result<(), ApiError> {
        let io_error = ApiError::vdi_io;
        let mut disk = ImportWriter::new(&self.core, vdi);
        let mut decoder = ChunkedImport::new();
        let mut input: Vec<u8> = Vec::new();
        let mut pos = 0;
        // Data of consecutive chunks gathered into writes of up to IO_CHUNK.
        let mut run: Option<(u64, Vec<u8>)> = None;
        while !decoder.is_done() {
            if pos == input.len() {
                self.check_cancelled(task)?;
                input = self.read_import(IO_CHUNK).await?;
                pos = 0;
                if input.is_empty() {
                    return Err(io_error());
                }
            }
            let (used, step) = decoder
                .feed(&input[pos..])
                .map_err(|e| ApiError::internal(HttpError::from(e).to_string()))?;
            if let ChunkStep::Data { offset, len } = step {
                let bytes = &input[pos + used - len..pos + used];
                match &mut run {
                    Some((at, buf)) if *at + buf.len() as u64 == offset => {
                        buf.extend_from_slice(bytes)
                    }
                    _ => {
                        if let Some((at, buf)) = run.take() {
                            disk.write(at, buf).await?;
                        }
                        let mut buf = Vec::with_capacity(IO_CHUNK);
                        buf.extend_from_slice(bytes);
                        run = Some((offset, buf));
                    }
                }
                if run.as_ref().is_some_and(|(_, b)| b.len() >= IO_CHUNK) {
                    let (at, buf) = run.take().expect("checked");
                    disk.write(at, buf).await?;
                }
            }
            pos += used;
        }
        if let Some((at, buf)) = run.take() {
            disk.write(at, buf).await?;
        }
        disk.finish().await
    }
}
