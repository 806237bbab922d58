//! The NBD protocol as a pure codec (no sockets): every message of the
//! fixed-newstyle handshake and the transmission phase, encoded into and
//! decoded from byte slices. Decoders return [`Decoded::Incomplete`] with the
//! number of bytes still needed instead of reading, and check every
//! peer-supplied length against a limit before anything is allocated.
//!
//! Reference: the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md).
//! Both sides live here: the client handshake state machine
//! ([`ClientHandshake`]) and the pieces the server (`serve`) needs.

use std::fmt;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Block status flags of base:allocation, and of qemu:dirty-bitmap.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const STATE_DIRTY: u32 = 1 << 0;

// Errors (errno values on the wire).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Limits on peer-supplied lengths.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
pub const MAX_NAME: usize = 4096;
/// Largest read we request and the largest chunk payload we accept.
pub const MAX_READ: u32 = 32 << 20;
/// Block status descriptors accepted in one chunk.
pub const MAX_EXTENTS: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("nbd protocol: {0}")]
    Protocol(String),
    #[error("nbd server refused {option}: {reply}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    OptionRefused {
        option: &'static str,
        reply: &'static str,
        message: String,
    },
    #[error("nbd server refused TLS ({0}); not continuing in plaintext")]
    TlsRefused(String),
    #[error("nbd server requires TLS; give --tls-ca or --tls-cert-pin")]
    TlsRequired,
}

fn proto(msg: impl Into<String>) -> ProtoError {
    ProtoError::Protocol(msg.into())
}

/// Result of a decoder over a possibly short buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// At least this many more bytes are needed.
    Incomplete(usize),
    /// The value and the number of bytes it used.
    Done(T, usize),
}

pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an unknown option",
    }
}

pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown reply",
    }
}

pub fn errno_name(e: u32) -> &'static str {
    match e {
        0 => "ok",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------- handshake

/// The server's first 18 bytes.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Decodes the greeting into the server's handshake flags. Oldstyle and
/// non-fixed newstyle servers are refused.
pub fn decode_greeting(buf: &[u8]) -> Result<Decoded<u16>, ProtoError> {
    if buf.len() < 16 {
        return Ok(Decoded::Incomplete(16 - buf.len()));
    }
    if be64(buf) != NBDMAGIC {
        return Err(proto("not an NBD server (bad greeting magic)"));
    }
    if be64(&buf[8..]) != IHAVEOPT {
        return Err(proto("oldstyle NBD servers are not supported"));
    }
    if buf.len() < 18 {
        return Ok(Decoded::Incomplete(18 - buf.len()));
    }
    let flags = be16(&buf[16..]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("server does not speak fixed newstyle"));
    }
    Ok(Decoded::Done(flags, 18))
}

/// A client option: magic, option, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A decoded client option (server side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOption {
    pub option: u32,
    pub data: Vec<u8>,
}

pub fn decode_option(buf: &[u8]) -> Result<Decoded<ClientOption>, ProtoError> {
    if buf.len() < 16 {
        return Ok(Decoded::Incomplete(16 - buf.len()));
    }
    if be64(buf) != IHAVEOPT {
        return Err(proto("bad option magic"));
    }
    let option = be32(&buf[8..]);
    let len = be32(&buf[12..]);
    if len > MAX_OPTION_DATA {
        return Err(proto(format!("option data of {len} bytes is too long")));
    }
    let total = 16 + len as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete(total - buf.len()));
    }
    Ok(Decoded::Done(
        ClientOption {
            option,
            data: buf[16..total].to_vec(),
        },
        total,
    ))
}

/// An option reply: magic, option, type, length, data.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

pub fn decode_option_reply(buf: &[u8]) -> Result<Decoded<OptionReply>, ProtoError> {
    if buf.len() < 20 {
        return Ok(Decoded::Incomplete(20 - buf.len()));
    }
    if be64(buf) != OPTION_REPLY_MAGIC {
        return Err(proto("bad option reply magic"));
    }
    let option = be32(&buf[8..]);
    let reply = be32(&buf[12..]);
    let len = be32(&buf[16..]);
    if len > MAX_OPTION_DATA {
        return Err(proto(format!("option reply of {len} bytes is too long")));
    }
    let total = 20 + len as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete(total - buf.len()));
    }
    Ok(Decoded::Done(
        OptionReply {
            option,
            reply,
            data: buf[20..total].to_vec(),
        },
        total,
    ))
}

/// Data of NBD_OPT_GO / NBD_OPT_INFO.
pub fn encode_go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// Export name and info requests of a GO/INFO option (server side).
pub fn decode_go_data(data: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    if data.len() < 4 {
        return Err(proto("GO data too short"));
    }
    let n = be32(data) as usize;
    if n > MAX_NAME || data.len() < 4 + n + 2 {
        return Err(proto("GO export name length invalid"));
    }
    let name =
        String::from_utf8(data[4..4 + n].to_vec()).map_err(|_| proto("export name not UTF-8"))?;
    let count = be16(&data[4 + n..]) as usize;
    let rest = &data[4 + n + 2..];
    if rest.len() != count * 2 {
        return Err(proto("GO info request count does not match its data"));
    }
    Ok((name, rest.chunks(2).map(be16).collect()))
}

/// Data of LIST/SET_META_CONTEXT.
pub fn encode_meta_context_data(export: &str, queries: &[String]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Export name and queries of a meta context option (server side).
pub fn decode_meta_context_data(data: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let mut pos = 0usize;
    let mut take = |n: usize| -> Result<&[u8], ProtoError> {
        if data.len() - pos < n {
            return Err(proto("meta context data truncated"));
        }
        pos += n;
        Ok(&data[pos - n..pos])
    };
    let n = be32(take(4)?) as usize;
    if n > MAX_NAME {
        return Err(proto("export name too long"));
    }
    let name = String::from_utf8(take(n)?.to_vec()).map_err(|_| proto("export name not UTF-8"))?;
    let count = be32(take(4)?) as usize;
    let mut queries = Vec::new();
    for _ in 0..count {
        let l = be32(take(4)?) as usize;
        if l > MAX_NAME {
            return Err(proto("meta context query too long"));
        }
        queries.push(String::from_utf8(take(l)?.to_vec()).map_err(|_| proto("query not UTF-8"))?);
    }
    if pos != data.len() {
        return Err(proto("trailing bytes after meta context queries"));
    }
    Ok((name, queries))
}

/// Export size and transmission flags, and block size constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum) when the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless
/// NO_ZEROES was agreed.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

pub fn decode_export_name_reply(buf: &[u8], no_zeroes: bool) -> Decoded<ExportInfo> {
    let total = if no_zeroes { 10 } else { 134 };
    if buf.len() < total {
        return Decoded::Incomplete(total - buf.len());
    }
    Decoded::Done(
        ExportInfo {
            size_bytes: be64(buf),
            transmission_flags: be16(&buf[8..]),
            block_size: None,
        },
        total,
    )
}

pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

pub fn encode_meta_context_reply_data(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// What the client handshake wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeOptions {
    pub export: String,
    pub tls: bool,
    pub structured_replies: bool,
    /// Meta contexts to select (only with structured replies).
    pub meta_contexts: Vec<String>,
}

/// The result of a finished handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured_replies: bool,
    /// Selected meta contexts: (id, name).
    pub meta_contexts: Vec<(u32, String)>,
    /// Whether NBD_OPT_GO was refused and EXPORT_NAME used (xapi-nbd).
    pub used_export_name: bool,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes, then feed what the server sends.
    Send(Vec<u8>),
    /// Feed more bytes from the server (at least this many).
    NeedMore(usize),
    /// Write these bytes, then run the TLS handshake on the connection and
    /// call [`ClientHandshake::tls_established`].
    StartTls(Vec<u8>),
    Done(Negotiated),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    StartTls,
    TlsHandshake,
    StructuredReply,
    MetaContext,
    Go,
    ExportName,
    Finished,
}

/// The client side of the fixed-newstyle handshake as a state machine:
/// feed it the server's bytes, it says what to send.
pub struct ClientHandshake {
    opts: HandshakeOptions,
    state: State,
    buf: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
    info: ExportInfo,
    got_export_info: bool,
}

impl ClientHandshake {
    pub fn new(opts: HandshakeOptions) -> Self {
        ClientHandshake {
            opts,
            state: State::Greeting,
            buf: Vec::new(),
            no_zeroes: false,
            structured: false,
            contexts: Vec::new(),
            info: ExportInfo::default(),
            got_export_info: false,
        }
    }

    /// Bytes the server sent that were not consumed yet (after `Done` they
    /// belong to the transmission phase).
    pub fn leftover(&self) -> &[u8] {
        &self.buf
    }

    /// Called once TLS is up; returns the next step.
    pub fn tls_established(&mut self) -> Result<Step, ProtoError> {
        if self.state != State::TlsHandshake {
            return Err(proto("TLS established at the wrong time"));
        }
        if !self.buf.is_empty() {
            return Err(proto("server sent plaintext after accepting STARTTLS"));
        }
        Ok(self.after_tls())
    }

    fn after_tls(&mut self) -> Step {
        if self.opts.structured_replies {
            self.state = State::StructuredReply;
            Step::Send(encode_option(OPT_STRUCTURED_REPLY, &[]))
        } else {
            self.send_go()
        }
    }

    fn send_go(&mut self) -> Step {
        self.state = State::Go;
        Step::Send(encode_option(
            OPT_GO,
            &encode_go_data(&self.opts.export, &[INFO_BLOCK_SIZE]),
        ))
    }

    fn refused(option: u32, r: &OptionReply) -> ProtoError {
        ProtoError::OptionRefused {
            option: option_name(option),
            reply: reply_name(r.reply),
            message: String::from_utf8_lossy(&r.data[..r.data.len().min(512)]).into_owned(),
        }
    }

    /// Feeds bytes received from the server.
    pub fn feed(&mut self, input: &[u8]) -> Result<Step, ProtoError> {
        self.buf.extend_from_slice(input);
        loop {
            match self.state {
                State::Greeting => match decode_greeting(&self.buf)? {
                    Decoded::Incomplete(n) => return Ok(Step::NeedMore(n)),
                    Decoded::Done(flags, used) => {
                        self.buf.drain(..used);
                        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
                        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
                        if self.no_zeroes {
                            cflags |= FLAG_C_NO_ZEROES;
                        }
                        let mut out = cflags.to_be_bytes().to_vec();
                        if self.opts.tls {
                            self.state = State::StartTls;
                            out.extend_from_slice(&encode_option(OPT_STARTTLS, &[]));
                            return Ok(Step::Send(out));
                        }
                        let next = self.after_tls();
                        let Step::Send(more) = next else {
                            unreachable!("after_tls always sends")
                        };
                        out.extend_from_slice(&more);
                        return Ok(Step::Send(out));
                    }
                },
                State::StartTls => {
                    let r = match self.next_reply(OPT_STARTTLS)? {
                        None => return Ok(Step::NeedMore(1)),
                        Some(r) => r,
                    };
                    if r.reply != REP_ACK {
                        return Err(ProtoError::TlsRefused(reply_name(r.reply).into()));
                    }
                    self.state = State::TlsHandshake;
                    return Ok(Step::StartTls(Vec::new()));
                }
                State::TlsHandshake => {
                    return Err(proto("server sent data before the TLS handshake"));
                }
                State::StructuredReply => {
                    let r = match self.next_reply(OPT_STRUCTURED_REPLY)? {
                        None => return Ok(Step::NeedMore(1)),
                        Some(r) => r,
                    };
                    match r.reply {
                        REP_ACK => self.structured = true,
                        REP_ERR_TLS_REQD => return Err(ProtoError::TlsRequired),
                        e if e & REP_FLAG_ERROR != 0 => self.structured = false,
                        other => {
                            return Err(proto(format!(
                                "unexpected reply {other:#x} to NBD_OPT_STRUCTURED_REPLY"
                            )))
                        }
                    }
                    if self.structured && !self.opts.meta_contexts.is_empty() {
                        self.state = State::MetaContext;
                        return Ok(Step::Send(encode_option(
                            OPT_SET_META_CONTEXT,
                            &encode_meta_context_data(&self.opts.export, &self.opts.meta_contexts),
                        )));
                    }
                    return Ok(self.send_go());
                }
                State::MetaContext => {
                    let r = match self.next_reply(OPT_SET_META_CONTEXT)? {
                        None => return Ok(Step::NeedMore(1)),
                        Some(r) => r,
                    };
                    match r.reply {
                        REP_META_CONTEXT => {
                            if r.data.len() < 4 || r.data.len() > 4 + MAX_NAME {
                                return Err(proto("meta context reply of bad length"));
                            }
                            let id = be32(&r.data);
                            let name = String::from_utf8(r.data[4..].to_vec())
                                .map_err(|_| proto("meta context name not UTF-8"))?;
                            if !self.opts.meta_contexts.contains(&name) {
                                return Err(proto(format!(
                                    "server selected meta context '{name}' that was not asked for"
                                )));
                            }
                            self.contexts.push((id, name));
                            continue;
                        }
                        REP_ACK => return Ok(self.send_go()),
                        // Not supported: no contexts; the caller decides.
                        e if e & REP_FLAG_ERROR != 0 => {
                            self.contexts.clear();
                            return Ok(self.send_go());
                        }
                        other => {
                            return Err(proto(format!(
                                "unexpected reply {other:#x} to NBD_OPT_SET_META_CONTEXT"
                            )))
                        }
                    }
                }
                State::Go => {
                    let r = match self.next_reply(OPT_GO)? {
                        None => return Ok(Step::NeedMore(1)),
                        Some(r) => r,
                    };
                    match r.reply {
                        REP_INFO => {
                            self.parse_info(&r.data)?;
                            continue;
                        }
                        REP_ACK => {
                            if !self.got_export_info {
                                return Err(proto(
                                    "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT",
                                ));
                            }
                            self.state = State::Finished;
                            return Ok(Step::Done(self.negotiated(false)));
                        }
                        REP_ERR_UNSUP => {
                            // xapi-nbd: fall back to the oldest way in.
                            self.state = State::ExportName;
                            // Structured replies and contexts were negotiated
                            // for GO; EXPORT_NAME keeps structured replies only.
                            return Ok(Step::Send(encode_option(
                                OPT_EXPORT_NAME,
                                self.opts.export.as_bytes(),
                            )));
                        }
                        REP_ERR_TLS_REQD => return Err(ProtoError::TlsRequired),
                        _ => return Err(Self::refused(OPT_GO, &r)),
                    }
                }
                State::ExportName => match decode_export_name_reply(&self.buf, self.no_zeroes) {
                    Decoded::Incomplete(n) => return Ok(Step::NeedMore(n)),
                    Decoded::Done(info, used) => {
                        self.buf.drain(..used);
                        self.info = info;
                        self.state = State::Finished;
                        return Ok(Step::Done(self.negotiated(true)));
                    }
                },
                State::Finished => return Err(proto("handshake already finished")),
            }
        }
    }

    fn negotiated(&self, used_export_name: bool) -> Negotiated {
        Negotiated {
            export: self.info,
            structured_replies: self.structured,
            meta_contexts: self.contexts.clone(),
            used_export_name,
        }
    }

    fn parse_info(&mut self, data: &[u8]) -> Result<(), ProtoError> {
        if data.len() < 2 {
            return Err(proto("NBD_REP_INFO too short"));
        }
        match be16(data) {
            INFO_EXPORT => {
                if data.len() != 12 {
                    return Err(proto("NBD_INFO_EXPORT of bad length"));
                }
                self.info.size_bytes = be64(&data[2..]);
                self.info.transmission_flags = be16(&data[10..]);
                self.got_export_info = true;
            }
            INFO_BLOCK_SIZE => {
                if data.len() != 14 {
                    return Err(proto("NBD_INFO_BLOCK_SIZE of bad length"));
                }
                let (min, pref, max) = (be32(&data[2..]), be32(&data[6..]), be32(&data[10..]));
                if !min.is_power_of_two() || min > 65536 || pref < min || max < pref.max(min) {
                    return Err(proto(format!(
                        "impossible block size constraints {min}/{pref}/{max}"
                    )));
                }
                self.info.block_size = Some((min, pref, max));
            }
            _ => {} // names and descriptions are ignored
        }
        Ok(())
    }

    /// Takes the next option reply for `option` from the buffer.
    fn next_reply(&mut self, option: u32) -> Result<Option<OptionReply>, ProtoError> {
        match decode_option_reply(&self.buf)? {
            Decoded::Incomplete(_) => Ok(None),
            Decoded::Done(r, used) => {
                self.buf.drain(..used);
                if r.option != option {
                    return Err(proto(format!(
                        "reply for {} while waiting for {}",
                        option_name(r.option),
                        option_name(option)
                    )));
                }
                Ok(Some(r))
            }
        }
    }
}

// ------------------------------------------------------------ transmission

/// A transmission-phase request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// Decodes a request header (server side); write payloads follow it.
pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request>, ProtoError> {
    if buf.len() < REQUEST_LEN {
        return Ok(Decoded::Incomplete(REQUEST_LEN - buf.len()));
    }
    if be32(buf) != REQUEST_MAGIC {
        return Err(proto("bad request magic"));
    }
    Ok(Decoded::Done(
        Request {
            flags: be16(&buf[4..]),
            kind: be16(&buf[6..]),
            cookie: be64(&buf[8..]),
            offset: be64(&buf[16..]),
            length: be32(&buf[24..]),
        },
        REQUEST_LEN,
    ))
}

/// A reply header: simple (data, if any, follows and its length is known
/// only from the request) or one structured chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u32,
    },
}

pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn encode_chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&length.to_be_bytes());
    b
}

/// Decodes a reply header. Chunk payload lengths above `max_payload` are a
/// protocol error (checked before the payload is read).
pub fn decode_reply_header(
    buf: &[u8],
    structured: bool,
    max_payload: u32,
) -> Result<Decoded<ReplyHeader>, ProtoError> {
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete(4 - buf.len()));
    }
    match be32(buf) {
        SIMPLE_REPLY_MAGIC => {
            if buf.len() < 16 {
                return Ok(Decoded::Incomplete(16 - buf.len()));
            }
            Ok(Decoded::Done(
                ReplyHeader::Simple {
                    error: be32(&buf[4..]),
                    cookie: be64(&buf[8..]),
                },
                16,
            ))
        }
        STRUCTURED_REPLY_MAGIC if structured => {
            if buf.len() < 20 {
                return Ok(Decoded::Incomplete(20 - buf.len()));
            }
            let length = be32(&buf[16..]);
            if length > max_payload {
                return Err(proto(format!(
                    "reply chunk of {length} bytes exceeds the {max_payload} byte limit"
                )));
            }
            Ok(Decoded::Done(
                ReplyHeader::Chunk {
                    flags: be16(&buf[4..]),
                    kind: be16(&buf[6..]),
                    cookie: be64(&buf[8..]),
                    length,
                },
                20,
            ))
        }
        STRUCTURED_REPLY_MAGIC => Err(proto("structured reply without negotiation")),
        m => Err(proto(format!("bad reply magic {m:#010x}"))),
    }
}

/// A decoded structured reply chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// (length, flags) descriptors of one meta context.
    BlockStatus {
        context: u32,
        extents: Vec<(u32, u32)>,
    },
    Error {
        error: u32,
        message: String,
        offset: Option<u64>,
    },
}

/// Parses a chunk payload of `kind`.
pub fn decode_chunk(kind: u16, payload: &[u8]) -> Result<Chunk<'_>, ProtoError> {
    match kind {
        REPLY_TYPE_NONE => {
            if !payload.is_empty() {
                return Err(proto("NONE chunk with payload"));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            if payload.len() < 9 {
                return Err(proto("OFFSET_DATA chunk too short"));
            }
            Ok(Chunk::OffsetData {
                offset: be64(payload),
                data: &payload[8..],
            })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if payload.len() != 12 {
                return Err(proto("OFFSET_HOLE chunk of bad length"));
            }
            let length = be32(&payload[8..]);
            if length == 0 {
                return Err(proto("OFFSET_HOLE of length 0"));
            }
            Ok(Chunk::OffsetHole {
                offset: be64(payload),
                length,
            })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
                return Err(proto("BLOCK_STATUS chunk of bad length"));
            }
            let count = (payload.len() - 4) / 8;
            if count as u32 > MAX_EXTENTS {
                return Err(proto("BLOCK_STATUS chunk with too many extents"));
            }
            let extents: Vec<(u32, u32)> = payload[4..]
                .chunks_exact(8)
                .map(|c| (be32(c), be32(&c[4..])))
                .collect();
            if extents.iter().any(|e| e.0 == 0) {
                return Err(proto("BLOCK_STATUS extent of length 0"));
            }
            Ok(Chunk::BlockStatus {
                context: be32(payload),
                extents,
            })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            if payload.len() < 6 {
                return Err(proto("ERROR chunk too short"));
            }
            let error = be32(payload);
            let mlen = be16(&payload[4..]) as usize;
            let want = 6
                + mlen
                + if kind == REPLY_TYPE_ERROR_OFFSET {
                    8
                } else {
                    0
                };
            if payload.len() != want {
                return Err(proto("ERROR chunk of bad length"));
            }
            let message = String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned();
            let offset = (kind == REPLY_TYPE_ERROR_OFFSET).then(|| be64(&payload[6 + mlen..]));
            if error == 0 {
                return Err(proto("ERROR chunk with error 0"));
            }
            Ok(Chunk::Error {
                error,
                message,
                offset,
            })
        }
        k if k & (1 << 15) != 0 => Err(proto(format!("unknown error chunk type {k}"))),
        // Unknown non-error types must be ignored? The spec says a client
        // MUST NOT be sent types it did not negotiate: treat as hostile.
        k => Err(proto(format!("unknown reply chunk type {k}"))),
    }
}

/// Encodes a BLOCK_STATUS chunk payload.
pub fn encode_block_status(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + extents.len() * 8);
    b.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
    }
    b
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "command {} at {} length {} (cookie {})",
            self.kind, self.offset, self.length, self.cookie
        )
    }
}

// ------------------------------------------------------------- server side
//
// Appended for the NBD server (`crate::server`); everything above is the
// shared contract and stays as it is.

pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Client flags this codec knows; any other bit set by a client is a
/// protocol violation (the spec says the server MUST close).
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// The longest error message an ERROR chunk carries (the spec's limit).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Decodes the client's 4 flag bytes that follow the greeting. Unknown bits
/// are refused.
pub fn decode_client_flags(buf: &[u8]) -> Result<Decoded<u32>, ProtoError> {
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete(4 - buf.len()));
    }
    let flags = be32(buf);
    if flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(proto(format!(
            "client sent unknown handshake flags {flags:#x}"
        )));
    }
    Ok(Decoded::Done(flags, 4))
}

/// The export name carried by NBD_OPT_EXPORT_NAME (the whole option data).
pub fn decode_export_name_data(data: &[u8]) -> Result<String, ProtoError> {
    if data.len() > MAX_NAME {
        return Err(proto("export name too long"));
    }
    String::from_utf8(data.to_vec()).map_err(|_| proto("export name not UTF-8"))
}

/// Data of an NBD_REP_SERVER reply to NBD_OPT_LIST: name length, name,
/// then an optional description filling the rest.
pub fn encode_server_reply_data(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// Payload of an OFFSET_HOLE chunk: offset, length.
pub fn encode_offset_hole(offset: u64, length: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&offset.to_be_bytes());
    b[8..].copy_from_slice(&length.to_be_bytes());
    b
}

/// Payload of an ERROR chunk: errno, message length, message (cut at a
/// character boundary to [`MAX_ERROR_MESSAGE`] bytes). `error` must not be 0.
pub fn encode_error_chunk(error: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message[..end];
    let mut b = Vec::with_capacity(6 + message.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message.as_bytes());
    b
}
