//! One client connection: the handshake, then the transmission phase.
//!
//! Requests are read one after another and answered in the order they
//! came, but not one at a time: a large read runs on tokio's blocking pool
//! as soon as it is read (small ones are cheaper to answer in place), and a
//! writer sends the finished replies in order. A client that pipelines
//! large reads therefore keeps both cores busy, while the bytes in flight
//! per connection stay bounded by [`IN_FLIGHT_BYTES`].
//!
//! spec: NBD doc/proto.md "Transmission phase"; xapi-nbd: xenapi-reference.md §4

use std::ops::Range;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::error::ConnError;
use super::export::{Export, ExportResolver, Mode, ServerOptions};
use super::handshake;
use super::negotiate::Transmission;
use crate::client::Io;
use crate::proto::{self, Decoded, Request};

/// Bytes of read replies being prepared or queued per connection, counted
/// in 64 KiB units of a semaphore: one largest read, so the server holds at
/// most `max_connections` x 32 MiB of reply data however clients behave.
const IN_FLIGHT_UNIT: u32 = 64 * 1024;
const IN_FLIGHT_BYTES: u32 = proto::MAX_READ;
/// Reads up to this size are answered on the connection's own task: a
/// hand-off to the blocking pool and back costs more than decompressing a
/// few blocks (measured: half again as much server CPU for qemu-img's
/// 192 KiB reads). Larger reads go to the pool, where they run in parallel.
const INLINE_READ_BYTES: u32 = 256 * 1024;
/// Replies queued for the writer (ready or being prepared).
const QUEUE_DEPTH: usize = 64;
/// Descriptors in one block status reply (one per 64 KiB block of a 4 GiB
/// request at worst).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// A reply ready to be written: chunks of (header bytes, range of `data`).
struct Reply {
    chunks: Vec<(Vec<u8>, Range<usize>)>,
    data: Vec<u8>,
    /// Drop the connection instead of replying (xapi-nbd on a read error).
    close: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Reply {
    fn new(chunks: Vec<(Vec<u8>, Range<usize>)>, data: Vec<u8>) -> Reply {
        Reply {
            chunks,
            data,
            close: false,
            _permit: None,
        }
    }

    fn simple(cookie: u64, error: u32) -> Reply {
        Reply::new(
            vec![(proto::encode_simple_reply(error, cookie).to_vec(), 0..0)],
            Vec::new(),
        )
    }

    fn simple_data(cookie: u64, data: Vec<u8>) -> Reply {
        let len = data.len();
        Reply::new(
            vec![(proto::encode_simple_reply(0, cookie).to_vec(), 0..len)],
            data,
        )
    }

    /// A final ERROR chunk.
    fn structured_error(cookie: u64, error: u32, message: &str) -> Reply {
        let payload = proto::encode_error_chunk(error, message);
        let mut head = proto::encode_chunk_header(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR,
            cookie,
            payload.len() as u32,
        )
        .to_vec();
        head.extend_from_slice(&payload);
        Reply::new(vec![(head, 0..0)], Vec::new())
    }

    /// An error in the form the request's replies take.
    fn error(req: &Request, structured: bool, error: u32, message: &str) -> Reply {
        let structured_kind = matches!(req.kind, proto::CMD_READ | proto::CMD_BLOCK_STATUS);
        if structured && structured_kind {
            Reply::structured_error(req.cookie, error, message)
        } else {
            Reply::simple(req.cookie, error)
        }
    }

    fn close() -> Reply {
        Reply {
            close: true,
            ..Reply::new(Vec::new(), Vec::new())
        }
    }
}

enum Queued {
    Ready(Reply),
    Pending(JoinHandle<Reply>),
}

/// Serves one client from its first byte to its last.
pub(super) async fn run(
    io: Box<dyn Io>,
    resolver: Arc<dyn ExportResolver>,
    options: Arc<ServerOptions>,
) -> Result<(), ConnError> {
    let negotiated = tokio::time::timeout(
        options.handshake_timeout,
        handshake::negotiate(io, resolver.as_ref(), &options),
    )
    .await
    .map_err(|_| ConnError::Timeout)??;
    let Some((io, transmission)) = negotiated else {
        return Ok(());
    };
    transmit(io, transmission, options.mode).await
}

async fn transmit(io: Box<dyn Io>, t: Transmission, mode: Mode) -> Result<(), ConnError> {
    let (rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let writer = write_replies(wr, rx);
    let reader = read_requests(rd, tx, t, mode);
    tokio::pin!(writer);
    tokio::select! {
        // The writer stopped (client gone, or a reply that closes): hang up.
        r = &mut writer => r.map_err(ConnError::from),
        // The reader stopped (DISC, EOF, or a violation): its queue is
        // closed; replies already owed are still sent, then we hang up.
        r = reader => {
            let written = writer.await;
            r?;
            written.map_err(ConnError::from)
        }
    }
}

/// Sends queued replies in order, flushing whenever it would otherwise wait.
async fn write_replies(
    wr: WriteHalf<Box<dyn Io>>,
    mut rx: mpsc::Receiver<Queued>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    loop {
        let queued = match rx.try_recv() {
            Ok(q) => q,
            Err(mpsc::error::TryRecvError::Empty) => {
                w.flush().await?;
                match rx.recv().await {
                    Some(q) => q,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let reply = match queued {
            Queued::Ready(r) => r,
            Queued::Pending(handle) => {
                if !handle.is_finished() {
                    w.flush().await?;
                }
                match handle.await {
                    Ok(r) => r,
                    // A panicking export: this connection cannot go on.
                    Err(_) => Reply::close(),
                }
            }
        };
        if reply.close {
            return Ok(());
        }
        for (head, range) in &reply.chunks {
            w.write_all(head).await?;
            if !range.is_empty() {
                w.write_all(&reply.data[range.clone()]).await?;
            }
        }
    }
    w.flush().await?;
    w.shutdown().await
}

/// Reads requests until DISC, EOF or a protocol violation, queueing one
/// reply per request.
async fn read_requests(
    rd: ReadHalf<Box<dyn Io>>,
    tx: mpsc::Sender<Queued>,
    t: Transmission,
    mode: Mode,
) -> Result<(), ConnError> {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let in_flight = Arc::new(Semaphore::new((IN_FLIGHT_BYTES / IN_FLIGHT_UNIT) as usize));
    let xapi = mode == Mode::XapiLike;
    let size = t.export.size_bytes();
    loop {
        let mut head = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            // A client that hangs up without DISC is rude, not wrong.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = match proto::decode_request(&head)? {
            Decoded::Done(req, _) => req,
            Decoded::Incomplete(_) => return Err(ConnError::Protocol("short request".into())),
        };
        let queued = match req.kind {
            proto::CMD_READ => {
                if let Err((errno, why)) = check_read(&req, size, mode) {
                    Queued::Ready(Reply::error(&req, t.structured, errno, &why))
                } else if req.length == 0 {
                    // Only xapi mode lets a zero-length read through.
                    Queued::Ready(Reply::simple(req.cookie, 0))
                } else {
                    let units = req.length.div_ceil(IN_FLIGHT_UNIT).max(1);
                    let permit = in_flight.clone().acquire_many_owned(units).await.ok();
                    let export = t.export.clone();
                    let structured = t.structured;
                    let work = move || {
                        let mut reply = read_reply(export.as_ref(), &req, structured, xapi);
                        reply._permit = permit;
                        reply
                    };
                    if req.length <= INLINE_READ_BYTES && !t.export.reads_may_block() {
                        Queued::Ready(work())
                    } else {
                        Queued::Pending(tokio::task::spawn_blocking(work))
                    }
                }
            }
            proto::CMD_WRITE => {
                // Read-only, but the payload must still be consumed to stay
                // in step; one larger than any request is a violation.
                if req.length > proto::MAX_READ {
                    return Err(ConnError::Protocol(format!(
                        "write of {} bytes",
                        req.length
                    )));
                }
                let skipped = tokio::io::copy(
                    &mut (&mut rd).take(req.length as u64),
                    &mut tokio::io::sink(),
                )
                .await?;
                if skipped != req.length as u64 {
                    return Ok(());
                }
                Queued::Ready(Reply::simple(req.cookie, proto::EPERM))
            }
            proto::CMD_DISC => return Ok(()),
            // Nothing to flush on a read-only export; xapi-nbd says EINVAL.
            proto::CMD_FLUSH if !xapi => Queued::Ready(Reply::simple(req.cookie, 0)),
            proto::CMD_TRIM | proto::CMD_WRITE_ZEROES if !xapi => {
                Queued::Ready(Reply::simple(req.cookie, proto::EPERM))
            }
            proto::CMD_BLOCK_STATUS if !xapi => match (t.base_allocation, t.structured) {
                (Some(context), true) => {
                    if req.length == 0 || req.offset >= size {
                        let why = format!(
                            "block status of {}+{} outside the export",
                            req.offset, req.length
                        );
                        Queued::Ready(Reply::error(&req, true, proto::EINVAL, &why))
                    } else {
                        let length = (req.length as u64).min(size - req.offset) as u32;
                        let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
                        // Answered in place: qemu-img asks once per extent
                        // and waits, so a thread hand-off would cost more
                        // than the answer (Export::zero_extents is quick).
                        Queued::Ready(block_status_reply(
                            t.export.as_ref(),
                            &req,
                            length,
                            context,
                            one,
                        ))
                    }
                }
                _ => Queued::Ready(Reply::error(
                    &req,
                    t.structured,
                    proto::EINVAL,
                    "no meta context selected",
                )),
            },
            _ => Queued::Ready(Reply::error(
                &req,
                t.structured,
                proto::EINVAL,
                "command not supported",
            )),
        };
        if tx.send(queued).await.is_err() {
            return Ok(()); // the writer has stopped
        }
        // Let the writer send what is ready before the next request is
        // worked on, rather than after a whole pipelined burst.
        if rd.buffer().len() >= proto::REQUEST_LEN {
            tokio::task::yield_now().await;
        }
    }
}

/// Checks a READ against the export and the mode's rules.
fn check_read(req: &Request, size: u64, mode: Mode) -> Result<(), (u32, String)> {
    let end = req.offset.checked_add(req.length as u64);
    if end.is_none_or(|end| end > size) {
        return Err((
            proto::EINVAL,
            format!(
                "read of {}+{} beyond the end ({size} bytes)",
                req.offset, req.length
            ),
        ));
    }
    if req.length > proto::MAX_READ {
        return Err((
            proto::EINVAL,
            format!("read of {} bytes is too long", req.length),
        ));
    }
    match mode {
        Mode::Standard if req.length == 0 => Err((proto::EINVAL, "read of 0 bytes".into())),
        Mode::XapiLike if (req.offset | req.length as u64) & 511 != 0 => Err((
            proto::EINVAL,
            "offset and length must be multiples of 512".into(),
        )),
        _ => Ok(()),
    }
}

/// Descriptors covering `[offset, offset+len)`, or its start in at most
/// `max` descriptors, flags masked by `mask` and equal neighbours merged. An export that
/// describes nothing has the rest called data.
fn allocation(
    export: &dyn Export,
    offset: u64,
    len: u32,
    mask: u32,
    max: usize,
) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut done = 0u32;
    'calls: while done < len {
        let before = done;
        for (dlen, flags) in export.zero_extents(offset + done as u64, len - done) {
            if done >= len {
                break;
            }
            let dlen = dlen.min(len - done);
            if dlen == 0 {
                continue;
            }
            let flags = flags & mask;
            let full = out.len() == max;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += dlen,
                _ if full => break 'calls,
                _ => out.push((dlen, flags)),
            }
            done += dlen;
        }
        if done == before {
            let full = out.len() == max;
            match out.last_mut() {
                Some(last) if last.1 == 0 => last.0 += len - done,
                _ if full => break,
                _ => out.push((len - done, 0)),
            }
            done = len;
        }
    }
    out
}

/// Answers a READ that passed [`check_read`] (runs on the blocking pool).
fn read_reply(export: &dyn Export, req: &Request, structured: bool, xapi: bool) -> Reply {
    let (offset, len) = (req.offset, req.length);
    if !structured {
        return match export.read(offset, len) {
            Ok(data) if data.len() == len as usize => Reply::simple_data(req.cookie, data),
            // xapi-nbd drops the connection on an I/O error mid-read.
            _ if xapi => Reply::close(),
            Ok(_) => Reply::simple(req.cookie, proto::EIO),
            Err(e) => Reply::simple(req.cookie, e.errno()),
        };
    }
    // Structured: holes as OFFSET_HOLE, the data between them read once.
    let extents = allocation(export, offset, len, proto::STATE_ZERO, usize::MAX);
    let mut at = offset;
    let mut spans = Vec::with_capacity(extents.len());
    for &(elen, flags) in &extents {
        spans.push((at, elen, flags & proto::STATE_ZERO != 0));
        at += elen as u64;
    }
    let first = spans.iter().find(|s| !s.2).map(|s| s.0);
    let last = spans.iter().rev().find(|s| !s.2).map(|s| s.0 + s.1 as u64);
    let (data, data_start) = match (first, last) {
        (Some(start), Some(end)) => match export.read(start, (end - start) as u32) {
            Ok(data) if data.len() as u64 == end - start => (data, start),
            Ok(_) => {
                return Reply::structured_error(
                    req.cookie,
                    proto::EIO,
                    "export returned a short read",
                )
            }
            Err(e) => return Reply::structured_error(req.cookie, e.errno(), &e.to_string()),
        },
        _ => (Vec::new(), offset),
    };
    let count = spans.len();
    let mut chunks = Vec::with_capacity(count);
    for (k, (at, elen, hole)) in spans.into_iter().enumerate() {
        let flags = if k + 1 == count {
            proto::REPLY_FLAG_DONE
        } else {
            0
        };
        if hole {
            let mut head =
                proto::encode_chunk_header(flags, proto::REPLY_TYPE_OFFSET_HOLE, req.cookie, 12)
                    .to_vec();
            head.extend_from_slice(&proto::encode_offset_hole(at, elen));
            chunks.push((head, 0..0));
        } else {
            let mut head = proto::encode_chunk_header(
                flags,
                proto::REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + elen,
            )
            .to_vec();
            head.extend_from_slice(&at.to_be_bytes());
            let rel = (at - data_start) as usize;
            chunks.push((head, rel..rel + elen as usize));
        }
    }
    Reply::new(chunks, data)
}

/// Answers a BLOCK_STATUS for `base:allocation`.
fn block_status_reply(
    export: &dyn Export,
    req: &Request,
    length: u32,
    context: u32,
    one: bool,
) -> Reply {
    let mask = proto::STATE_HOLE | proto::STATE_ZERO;
    let max = if one { 1 } else { MAX_DESCRIPTORS };
    let extents = allocation(export, req.offset, length, mask, max);
    let payload = proto::encode_block_status(context, &extents);
    let mut head = proto::encode_chunk_header(
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        payload.len() as u32,
    )
    .to_vec();
    head.extend_from_slice(&payload);
    Reply::new(vec![(head, 0..0)], Vec::new())
}
