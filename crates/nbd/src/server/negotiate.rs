//! The server side of the fixed-newstyle handshake as a pure state machine
//! ([`ServerHandshake`]): the greeting, the client flags, STARTTLS when TLS
//! is configured (mandatory then) and the option set of the chosen
//! [`Mode`], up to the start of transmission. No sockets: it is fed the
//! client's bytes, split anywhere, and says what to write, when to run the
//! TLS handshake and what to serve. Exports are opened through the
//! [`ExportResolver`] while an option is answered, as the protocol needs.
//!
//! spec: NBD doc/proto.md "Option haggling"; xapi-nbd: xenapi-reference.md §4

use std::collections::VecDeque;
use std::sync::Arc;

use super::export::{Export, ExportError, ExportResolver, Mode};
use crate::proto::{self, ClientOption, Decoded, ProtoError};

/// The only meta context served, and the id it is given.
pub(super) const BASE_ALLOCATION: &str = "base:allocation";
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// Standard mode: read-only, and any number of connections see the same data.
const STANDARD_FLAGS: u16 =
    proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY | proto::TFLAG_CAN_MULTI_CONN;
/// xapi-nbd: HAS_FLAGS|READ_ONLY (= 3), nothing else.
const XAPI_FLAGS: u16 = proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY;

/// Block size constraints announced on request: any alignment, 64 KiB
/// preferred (the repository's block), reads up to the codec's limit.
const BLOCK_SIZE_MIN: u32 = 1;
const BLOCK_SIZE_PREFERRED: u32 = 64 * 1024;

/// What the transmission phase needs.
pub struct Transmission {
    pub export: Arc<dyn Export>,
    pub structured: bool,
    /// The id of `base:allocation` when the client selected it.
    pub base_allocation: Option<u32>,
}

impl std::fmt::Debug for Transmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transmission")
            .field("size_bytes", &self.export.size_bytes())
            .field("structured", &self.structured)
            .field("base_allocation", &self.base_allocation)
            .finish()
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub enum ServerStep {
    /// Write (and flush) these bytes, then call [`ServerHandshake::feed`]
    /// again (an empty slice will do: more steps may be queued).
    Send(Vec<u8>),
    /// Read at most this many bytes and feed them. It is never more than
    /// the message being read still lacks, so a driver that reads no more
    /// leaves in the connection whatever belongs to the TLS handshake or to
    /// the transmission phase.
    NeedMore(usize),
    /// The ACK to STARTTLS has been sent (the `Send` before): run the TLS
    /// handshake on the connection, then call
    /// [`ServerHandshake::tls_established`].
    StartTls,
    /// The handshake is over: serve this export.
    Transmit(Transmission),
    /// End the connection: write `farewell` (write errors do not matter,
    /// the connection is ending anyway), then hang up, cleanly when
    /// `shutdown` (FIN, and TLS close_notify, so the client can tell
    /// "refused" from "connection broke") or by just dropping it.
    Close { farewell: Vec<u8>, shutdown: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    /// STARTTLS was accepted; waiting for `tls_established`.
    Tls,
    Finished,
}

/// What the option phase has agreed so far.
#[derive(Default)]
struct Agreed {
    tls_active: bool,
    structured: bool,
    no_zeroes: bool,
    /// Export name of the last SET_META_CONTEXT and whether it selected
    /// `base:allocation`.
    contexts: Option<(String, bool)>,
}

/// The server side of the handshake, from the greeting to the start of
/// transmission. The first [`feed`](Self::feed) (of nothing) returns the
/// greeting. After an error or a `Transmit`/`Close` step the machine is
/// done; after `StartTls` only [`tls_established`](Self::tls_established)
/// moves it on.
pub struct ServerHandshake<'a> {
    xapi: bool,
    tls_configured: bool,
    resolver: &'a dyn ExportResolver,
    phase: Phase,
    /// Client bytes fed but not consumed yet.
    buf: Vec<u8>,
    /// Steps decided but not handed out yet.
    queue: VecDeque<ServerStep>,
    agreed: Agreed,
    /// The export an INFO reply describes, kept open until the reply is
    /// sent (until the next `feed`), as the [`ExportResolver`] promises.
    info_export: Option<Arc<dyn Export>>,
}

impl<'a> ServerHandshake<'a> {
    /// A handshake in personality `mode`; `tls` says whether TLS is
    /// configured, which makes it mandatory.
    pub fn new(mode: Mode, tls: bool, resolver: &'a dyn ExportResolver) -> Self {
        let xapi = mode == Mode::XapiLike;
        let greeting = if xapi {
            proto::FLAG_FIXED_NEWSTYLE
        } else {
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
        };
        ServerHandshake {
            xapi,
            tls_configured: tls,
            resolver,
            phase: Phase::ClientFlags,
            buf: Vec::new(),
            queue: VecDeque::from([ServerStep::Send(proto::encode_greeting(greeting).to_vec())]),
            agreed: Agreed::default(),
            info_export: None,
        }
    }

    /// Client bytes fed but not consumed. After `Transmit` they belong to
    /// the transmission phase (empty when the driver reads no more than
    /// `NeedMore` asks).
    pub fn leftover(&self) -> &[u8] {
        &self.buf
    }

    /// Called once the TLS handshake that `StartTls` asked for is done;
    /// returns the next step. Bytes fed before that arrived in plaintext:
    /// they are never taken as protected, the handshake fails instead.
    pub fn tls_established(&mut self) -> Result<ServerStep, ProtoError> {
        if self.phase != Phase::Tls || !self.queue.is_empty() {
            return Err(ProtoError::Protocol(
                "TLS established at the wrong time".into(),
            ));
        }
        if !self.buf.is_empty() {
            return Err(ProtoError::Protocol(
                "client sent plaintext after STARTTLS".into(),
            ));
        }
        self.agreed.tls_active = true;
        self.phase = Phase::Options;
        self.feed(&[])
    }

    /// Feeds bytes received from the client (any amount, including none)
    /// and returns the next step.
    pub fn feed(&mut self, input: &[u8]) -> Result<ServerStep, ProtoError> {
        self.info_export = None;
        self.buf.extend_from_slice(input);
        loop {
            if let Some(step) = self.queue.pop_front() {
                return Ok(step);
            }
            match self.phase {
                Phase::ClientFlags => match proto::decode_client_flags(&self.buf)? {
                    Decoded::Incomplete(n) => return Ok(ServerStep::NeedMore(n)),
                    Decoded::Done(flags, used) => {
                        self.buf.drain(..used);
                        self.client_flags(flags);
                    }
                },
                Phase::Options => match proto::decode_option(&self.buf)? {
                    Decoded::Incomplete(n) => return Ok(ServerStep::NeedMore(n)),
                    Decoded::Done(option, used) => {
                        self.buf.drain(..used);
                        self.option(option);
                    }
                },
                Phase::Tls => {
                    return Err(ProtoError::Protocol(
                        "client bytes fed during the TLS handshake".into(),
                    ))
                }
                Phase::Finished => {
                    return Err(ProtoError::Protocol("the handshake is over".into()))
                }
            }
        }
    }

    fn client_flags(&mut self, flags: u32) {
        let fixed = flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        if !fixed && (self.xapi || self.tls_configured) {
            // Without fixed newstyle there is no way to refuse an option.
            self.close(Vec::new(), false);
            return;
        }
        self.agreed.no_zeroes = !self.xapi && flags & proto::FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::Options;
    }

    fn close(&mut self, farewell: Vec<u8>, shutdown: bool) {
        self.phase = Phase::Finished;
        self.queue
            .push_back(ServerStep::Close { farewell, shutdown });
    }

    fn send(&mut self, bytes: Vec<u8>) {
        self.queue.push_back(ServerStep::Send(bytes));
    }

    /// Refuses option `code` as invalid, saying why.
    fn invalid(&mut self, code: u32, why: &[u8]) {
        self.send(reply(code, proto::REP_ERR_INVALID, why));
    }

    fn transmit(&mut self, t: Transmission) {
        self.phase = Phase::Finished;
        self.queue.push_back(ServerStep::Transmit(t));
    }

    fn option(&mut self, option: ClientOption) {
        if self.tls_configured && !self.agreed.tls_active {
            self.before_tls(option);
        } else if self.xapi {
            self.xapi_option(option);
        } else {
            self.standard_option(option);
        }
    }

    /// TLS is mandatory and not up yet: only STARTTLS gets anywhere.
    fn before_tls(&mut self, option: ClientOption) {
        match option.option {
            proto::OPT_STARTTLS if option.data.is_empty() => {
                self.send(reply(option.option, proto::REP_ACK, &[]));
                self.phase = Phase::Tls;
                self.queue.push_back(ServerStep::StartTls);
            }
            proto::OPT_STARTTLS => {
                self.send(reply(option.option, proto::REP_ERR_INVALID, &[]));
            }
            proto::OPT_ABORT => {
                // xapi-nbd just closes; the spec asks for an ACK first.
                let farewell = if self.xapi {
                    Vec::new()
                } else {
                    reply(option.option, proto::REP_ACK, &[])
                };
                self.close(farewell, false);
            }
            // EXPORT_NAME has no error reply: the only answer is to hang up.
            proto::OPT_EXPORT_NAME => self.close(Vec::new(), true),
            other => self.send(reply(other, proto::REP_ERR_TLS_REQD, b"TLS is required")),
        }
    }

    /// xapi-nbd's option loop (xapi-project/nbd `server.ml` `generic_loop`).
    fn xapi_option(&mut self, option: ClientOption) {
        match option.option {
            proto::OPT_EXPORT_NAME => {
                // Any failure (bad session, unknown VDI, refused VBD) closes
                // the connection without a reply.
                match self.export_name(&option.data, XAPI_FLAGS, false) {
                    None => self.close(Vec::new(), true),
                    Some((_, export)) => self.transmit(Transmission {
                        export,
                        structured: false,
                        base_allocation: None,
                    }),
                }
            }
            proto::OPT_ABORT => self.close(reply(option.option, proto::REP_ACK, &[]), true),
            proto::OPT_LIST => self.send(reply(option.option, proto::REP_ERR_POLICY, &[])),
            proto::OPT_STARTTLS => {
                let code = if self.agreed.tls_active || self.tls_configured {
                    proto::REP_ERR_INVALID
                } else {
                    proto::REP_ERR_POLICY
                };
                self.send(reply(option.option, code, &[]));
            }
            other => self.send(reply(other, proto::REP_ERR_UNSUP, &[])),
        }
    }

    /// NBD_OPT_EXPORT_NAME: opens the export and queues the old-style reply
    /// that ends the handshake. `None` when the name does not decode or the
    /// export cannot be opened: the protocol has no error reply for this
    /// option, so the caller closes the connection.
    fn export_name(
        &mut self,
        data: &[u8],
        flags: u16,
        no_zeroes: bool,
    ) -> Option<(String, Arc<dyn Export>)> {
        let name = proto::decode_export_name_data(data).ok()?;
        let export = self.resolver.open(&name).ok()?;
        self.send(proto::encode_export_name_reply(
            export.size_bytes(),
            flags,
            no_zeroes,
        ));
        Some((name, export))
    }

    fn standard_option(&mut self, option: ClientOption) {
        let code = option.option;
        match code {
            proto::OPT_EXPORT_NAME => {
                match self.export_name(&option.data, STANDARD_FLAGS, self.agreed.no_zeroes) {
                    None => self.close(Vec::new(), true),
                    Some((name, export)) => {
                        let t = transmission(export, &name, &self.agreed);
                        self.transmit(t);
                    }
                }
            }
            proto::OPT_GO | proto::OPT_INFO => self.go_or_info(code, &option.data),
            proto::OPT_ABORT => self.close(reply(code, proto::REP_ACK, &[]), true),
            proto::OPT_LIST => {
                if !option.data.is_empty() {
                    self.send(reply(code, proto::REP_ERR_INVALID, b"LIST takes no data"));
                    return;
                }
                let mut out = Vec::new();
                for name in self.resolver.list() {
                    if name.len() <= proto::MAX_NAME {
                        out.extend(reply(
                            code,
                            proto::REP_SERVER,
                            &proto::encode_server_reply_data(&name, ""),
                        ));
                    }
                }
                out.extend(reply(code, proto::REP_ACK, &[]));
                self.send(out);
            }
            proto::OPT_STARTTLS => {
                // Here TLS is either active already or not configured.
                let answer = if self.agreed.tls_active {
                    proto::REP_ERR_INVALID
                } else {
                    proto::REP_ERR_UNSUP
                };
                self.send(reply(code, answer, &[]));
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !option.data.is_empty() {
                    self.invalid(code, b"STRUCTURED_REPLY takes no data");
                    return;
                }
                self.agreed.structured = true;
                self.send(reply(code, proto::REP_ACK, &[]));
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                self.meta_context(code, &option.data)
            }
            other => self.send(reply(other, proto::REP_ERR_UNSUP, &[])),
        }
    }

    fn go_or_info(&mut self, code: u32, data: &[u8]) {
        let (name, infos) = match proto::decode_go_data(data) {
            Ok(v) => v,
            Err(e) => {
                self.invalid(code, e.to_string().as_bytes());
                return;
            }
        };
        let export = match self.resolver.open(&name) {
            Ok(export) => export,
            Err(e) => {
                self.send(reply(code, open_error_reply(&e), e.to_string().as_bytes()));
                return;
            }
        };
        let info = proto::encode_info_export(export.size_bytes(), STANDARD_FLAGS);
        let mut out = reply(code, proto::REP_INFO, &info);
        if infos.contains(&proto::INFO_BLOCK_SIZE) {
            let sizes = proto::encode_info_block_size(
                BLOCK_SIZE_MIN,
                BLOCK_SIZE_PREFERRED,
                proto::MAX_READ,
            );
            out.extend(reply(code, proto::REP_INFO, &sizes));
        }
        out.extend(reply(code, proto::REP_ACK, &[]));
        self.send(out);
        if code == proto::OPT_GO {
            let t = transmission(export, &name, &self.agreed);
            self.transmit(t);
        } else {
            self.info_export = Some(export);
        }
    }

    fn meta_context(&mut self, code: u32, data: &[u8]) {
        let list = code == proto::OPT_LIST_META_CONTEXT;
        if !list && !self.agreed.structured {
            self.invalid(code, b"structured replies were not negotiated");
            return;
        }
        let (name, queries) = match proto::decode_meta_context_data(data) {
            Ok(v) => v,
            Err(e) => {
                self.invalid(code, e.to_string().as_bytes());
                return;
            }
        };
        let selected = matching_contexts(&queries, list);
        let mut out = Vec::new();
        if selected {
            let id = if list { 0 } else { BASE_ALLOCATION_ID };
            let data = proto::encode_meta_context_reply_data(id, BASE_ALLOCATION);
            out.extend(reply(code, proto::REP_META_CONTEXT, &data));
        }
        if !list {
            self.agreed.contexts = Some((name, selected));
        }
        out.extend(reply(code, proto::REP_ACK, &[]));
        self.send(out);
    }
}

fn reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    proto::encode_option_reply(option, reply, data)
}

/// The option reply for an export that could not be opened.
fn open_error_reply(e: &ExportError) -> u32 {
    match e {
        ExportError::NotFound(_) | ExportError::Io(_) => proto::REP_ERR_UNKNOWN,
        ExportError::Refused { .. } => proto::REP_ERR_POLICY,
        ExportError::Invalid(_) => proto::REP_ERR_INVALID,
    }
}

/// Contexts matching the queries of LIST_META_CONTEXT (`list`) or
/// SET_META_CONTEXT: `base:allocation` by its name, and for LIST also by
/// its namespace or by an empty query list.
fn matching_contexts(queries: &[String], list: bool) -> bool {
    if list && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
}

/// Contexts selected for another export name do not carry over (spec).
fn transmission(export: Arc<dyn Export>, name: &str, agreed: &Agreed) -> Transmission {
    let base_allocation = match &agreed.contexts {
        Some((for_name, true)) if agreed.structured && for_name == name => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    Transmission {
        export,
        structured: agreed.structured,
        base_allocation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::MemoryExport;

    const DISK_SIZE: usize = 3 * 65536 + 512;

    /// "disk" and "other" exist; every other name is unknown.
    struct Disks;

    impl ExportResolver for Disks {
        fn open(&self, name: &str) -> Result<Arc<dyn Export>, ExportError> {
            match name {
                "disk" => Ok(Arc::new(MemoryExport::new(vec![7; DISK_SIZE]))),
                "other" => Ok(Arc::new(MemoryExport::new(vec![1; 512]))),
                _ => Err(ExportError::NotFound(name.into())),
            }
        }

        fn list(&self) -> Vec<String> {
            vec!["disk".into(), "other".into()]
        }
    }

    /// Everything the machine said, in order.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Transcript {
        out: Vec<u8>,
        /// StartTls, Transmit, Close, an error, or the final NeedMore.
        events: Vec<String>,
        leftover: Vec<u8>,
    }

    /// Feeds the client's bytes in pieces of `piece` bytes; each flight
    /// starts a new piece (the second flight is what arrives through TLS).
    fn run(mode: Mode, tls: bool, flights: &[Vec<u8>], piece: usize) -> Transcript {
        let resolver = Disks;
        let mut hs = ServerHandshake::new(mode, tls, &resolver);
        let mut t = Transcript::default();
        let chunks: Vec<&[u8]> = flights.iter().flat_map(|f| f.chunks(piece)).collect();
        let mut last_need = None;
        'chunks: for chunk in chunks {
            let mut step = hs.feed(chunk);
            loop {
                step = match step {
                    Err(e) => {
                        t.events.push(format!("error: {e}"));
                        break 'chunks;
                    }
                    Ok(ServerStep::Send(b)) => {
                        t.out.extend(b);
                        hs.feed(&[])
                    }
                    Ok(ServerStep::NeedMore(n)) => {
                        last_need = Some(n);
                        continue 'chunks;
                    }
                    Ok(ServerStep::StartTls) => {
                        t.events.push("starttls".into());
                        hs.tls_established()
                    }
                    Ok(ServerStep::Transmit(x)) => {
                        t.events.push(format!("{x:?}"));
                        break 'chunks;
                    }
                    Ok(ServerStep::Close { farewell, shutdown }) => {
                        t.out.extend(farewell);
                        t.events.push(format!("close shutdown={shutdown}"));
                        break 'chunks;
                    }
                };
            }
        }
        if t.events.last().is_none_or(|e| e == "starttls") {
            t.events.push(format!("need {last_need:?}"));
        }
        t.leftover = hs.leftover().to_vec();
        t
    }

    /// Whole flights and byte by byte give the same transcript.
    fn run_both(mode: Mode, tls: bool, flights: &[Vec<u8>]) -> Transcript {
        let whole = run(mode, tls, flights, usize::MAX);
        let bytewise = run(mode, tls, flights, 1);
        assert_eq!(whole, bytewise, "whole vs byte by byte");
        for piece in [2, 3, 7, 16, 17] {
            assert_eq!(whole, run(mode, tls, flights, piece), "pieces of {piece}");
        }
        whole
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        proto::encode_option(option, data)
    }

    fn rep(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
        proto::encode_option_reply(option, reply, data)
    }

    /// NBDMAGIC, IHAVEOPT, then the handshake flags.
    fn greeting(flags: u16) -> Vec<u8> {
        let mut b = b"NBDMAGICIHAVEOPT".to_vec();
        b.extend(flags.to_be_bytes());
        b
    }

    const FIXED_NO_ZEROES: [u8; 4] = [0, 0, 0, 3];
    const FIXED: [u8; 4] = [0, 0, 0, 1];

    #[test]
    fn standard_negotiation_with_mandatory_tls() {
        let mut plain = FIXED_NO_ZEROES.to_vec();
        plain.extend(opt(proto::OPT_GO, &proto::encode_go_data("disk", &[])));
        plain.extend(opt(proto::OPT_LIST, &[]));
        plain.extend(opt(proto::OPT_STARTTLS, b"x"));
        plain.extend(opt(proto::OPT_STARTTLS, &[]));
        let mut tls = opt(proto::OPT_STRUCTURED_REPLY, &[]);
        tls.extend(opt(proto::OPT_LIST, &[]));
        tls.extend(opt(
            proto::OPT_LIST_META_CONTEXT,
            &proto::encode_meta_context_data("disk", &[]),
        ));
        tls.extend(opt(
            proto::OPT_SET_META_CONTEXT,
            &proto::encode_meta_context_data("disk", &["base:allocation".into()]),
        ));
        tls.extend(opt(proto::OPT_INFO, &proto::encode_go_data("missing", &[])));
        tls.extend(opt(proto::OPT_STARTTLS, &[]));
        tls.extend(opt(77, &[]));
        tls.extend(opt(
            proto::OPT_GO,
            &proto::encode_go_data("disk", &[proto::INFO_BLOCK_SIZE]),
        ));
        let t = run_both(Mode::Standard, true, &[plain, tls]);

        let mut want = greeting(3);
        // Before TLS: everything but STARTTLS is refused.
        want.extend(rep(7, 0x8000_0005, b"TLS is required"));
        want.extend(rep(3, 0x8000_0005, b"TLS is required"));
        want.extend(rep(5, 0x8000_0003, &[]));
        want.extend(rep(5, 1, &[]));
        // Through TLS.
        want.extend(rep(8, 1, &[]));
        want.extend(rep(3, 2, b"\0\0\0\x04disk"));
        want.extend(rep(3, 2, b"\0\0\0\x05other"));
        want.extend(rep(3, 1, &[]));
        want.extend(rep(9, 4, b"\0\0\0\0base:allocation"));
        want.extend(rep(9, 1, &[]));
        want.extend(rep(10, 4, b"\0\0\0\x01base:allocation"));
        want.extend(rep(10, 1, &[]));
        want.extend(rep(6, 0x8000_0006, b"no export named 'missing'"));
        want.extend(rep(5, 0x8000_0003, &[]));
        want.extend(rep(77, 0x8000_0001, &[]));
        let mut info = vec![0, 0];
        info.extend((DISK_SIZE as u64).to_be_bytes());
        info.extend([0x01, 0x03]); // HAS_FLAGS|READ_ONLY|CAN_MULTI_CONN
        want.extend(rep(7, 3, &info));
        let mut sizes = vec![0, 3];
        sizes.extend([0, 0, 0, 1, 0, 1, 0, 0, 2, 0, 0, 0]);
        want.extend(rep(7, 3, &sizes));
        want.extend(rep(7, 1, &[]));
        assert!(t.out == want, "output differs:\n{:x?}\n{:x?}", t.out, want);
        assert_eq!(
            t.events,
            [
                "starttls".to_string(),
                format!(
                    "Transmission {{ size_bytes: {DISK_SIZE}, structured: true, base_allocation: Some(1) }}"
                )
            ]
        );
        assert!(t.leftover.is_empty());
    }

    #[test]
    fn contexts_for_another_export_and_go_without_structured_replies() {
        let mut c = FIXED_NO_ZEROES.to_vec();
        // SET before STRUCTURED_REPLY is refused.
        c.extend(opt(
            proto::OPT_SET_META_CONTEXT,
            &proto::encode_meta_context_data("disk", &["base:allocation".into()]),
        ));
        c.extend(opt(proto::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(
            proto::OPT_SET_META_CONTEXT,
            &proto::encode_meta_context_data("other", &["base:allocation".into()]),
        ));
        c.extend(opt(proto::OPT_GO, &proto::encode_go_data("disk", &[])));
        let t = run_both(Mode::Standard, false, &[c]);
        let mut want = greeting(3);
        want.extend(rep(
            10,
            0x8000_0003,
            b"structured replies were not negotiated",
        ));
        want.extend(rep(8, 1, &[]));
        want.extend(rep(10, 4, b"\0\0\0\x01base:allocation"));
        want.extend(rep(10, 1, &[]));
        assert_eq!(&t.out[..want.len()], &want[..]);
        assert_eq!(
            t.events,
            [format!(
                "Transmission {{ size_bytes: {DISK_SIZE}, structured: true, base_allocation: None }}"
            )]
        );
    }

    #[test]
    fn abort_before_and_after_tls_in_both_modes() {
        let mut c = FIXED.to_vec();
        c.extend(opt(proto::OPT_ABORT, &[]));
        let ack = rep(2, 1, &[]);
        for (mode, tls, farewell, shutdown) in [
            (Mode::Standard, false, true, true),
            (Mode::Standard, true, true, false),
            (Mode::XapiLike, false, true, true),
            (Mode::XapiLike, true, false, false),
        ] {
            let t = run_both(mode, tls, &[c.clone()]);
            let flags = if mode == Mode::Standard { 3 } else { 1 };
            let mut want = greeting(flags);
            if farewell {
                want.extend(&ack);
            }
            assert_eq!(t.out, want, "{mode:?} tls={tls}");
            assert_eq!(t.events, [format!("close shutdown={shutdown}")]);
        }
    }

    #[test]
    fn export_name_with_and_without_no_zeroes() {
        // A request pipelined after EXPORT_NAME stays for transmission.
        let request = proto::encode_request(&proto::Request {
            flags: 0,
            kind: proto::CMD_READ,
            cookie: 9,
            offset: 0,
            length: 512,
        });
        for (mode, flags, zeroes) in [
            (Mode::Standard, FIXED_NO_ZEROES, 0),
            (Mode::Standard, FIXED, 124),
            (Mode::XapiLike, FIXED_NO_ZEROES, 124),
            (Mode::XapiLike, FIXED, 124),
        ] {
            let mut c = flags.to_vec();
            c.extend(opt(proto::OPT_EXPORT_NAME, b"disk"));
            c.extend(request);
            let t = run(mode, false, &[c], usize::MAX);
            let tflags: [u8; 2] = if mode == Mode::Standard {
                [1, 3]
            } else {
                [0, 3]
            };
            let mut want = greeting(if mode == Mode::Standard { 3 } else { 1 });
            want.extend((DISK_SIZE as u64).to_be_bytes());
            want.extend(tflags);
            want.extend(vec![0; zeroes]);
            assert_eq!(t.out, want, "{mode:?} {flags:?}");
            assert_eq!(
                t.events,
                [format!(
                    "Transmission {{ size_bytes: {DISK_SIZE}, structured: false, base_allocation: None }}"
                )]
            );
            assert_eq!(t.leftover, request);
        }
    }

    #[test]
    fn export_name_refusals_hang_up() {
        for (mode, tls, name) in [
            (Mode::Standard, false, &b"missing"[..]),
            (Mode::XapiLike, false, &b"\xff"[..]),
            // Before TLS: no reply, whatever the name.
            (Mode::Standard, true, &b"disk"[..]),
        ] {
            let mut c = FIXED.to_vec();
            c.extend(opt(proto::OPT_EXPORT_NAME, name));
            let t = run_both(mode, tls, &[c]);
            assert_eq!(t.out.len(), 18);
            assert_eq!(t.events, ["close shutdown=true"]);
        }
    }

    #[test]
    fn xapi_like_options() {
        let mut c = FIXED.to_vec();
        for o in [6, 7, 8, 10, 3, 5, 77] {
            c.extend(opt(o, &[]));
        }
        let t = run_both(Mode::XapiLike, false, &[c]);
        let mut want = greeting(1);
        for (o, r) in [
            (6, 0x8000_0001),
            (7, 0x8000_0001),
            (8, 0x8000_0001),
            (10, 0x8000_0001),
            (3, 0x8000_0002),
            (5, 0x8000_0002),
            (77, 0x8000_0001),
        ] {
            want.extend(rep(o, r, &[]));
        }
        assert_eq!(t.out, want);
        assert_eq!(t.events, ["need Some(16)"]);
    }

    #[test]
    fn plaintext_pipelined_after_starttls_is_never_protected() {
        let mut c = FIXED.to_vec();
        c.extend(opt(proto::OPT_STARTTLS, &[]));
        c.extend(opt(proto::OPT_GO, &proto::encode_go_data("disk", &[])));
        let t = run(Mode::Standard, true, &[c], usize::MAX);
        let mut want = greeting(3);
        want.extend(rep(5, 1, &[]));
        assert_eq!(t.out, want, "nothing answered to the pipelined GO");
        assert_eq!(
            t.events,
            [
                "starttls",
                "error: nbd protocol: client sent plaintext after STARTTLS"
            ]
        );

        // Bytes fed while TLS is being set up are refused too.
        let resolver = Disks;
        let mut hs = ServerHandshake::new(Mode::Standard, true, &resolver);
        let mut c = FIXED.to_vec();
        c.extend(opt(proto::OPT_STARTTLS, &[]));
        assert!(matches!(hs.feed(&c), Ok(ServerStep::Send(_))));
        assert!(matches!(hs.feed(&[]), Ok(ServerStep::Send(_))));
        assert!(matches!(hs.feed(&[]), Ok(ServerStep::StartTls)));
        assert!(hs.feed(b"IHAVEOPT").is_err());
        assert!(hs.tls_established().is_err());
    }

    #[test]
    fn need_more_never_asks_past_the_current_message() {
        let resolver = Disks;
        let mut hs = ServerHandshake::new(Mode::Standard, false, &resolver);
        assert!(matches!(hs.feed(&[]), Ok(ServerStep::Send(_))));
        assert!(matches!(hs.feed(&[]), Ok(ServerStep::NeedMore(4))));
        assert!(matches!(hs.feed(&[0, 0]), Ok(ServerStep::NeedMore(2))));
        assert!(matches!(hs.feed(&[0, 1]), Ok(ServerStep::NeedMore(16))));
        let o = opt(proto::OPT_GO, &proto::encode_go_data("disk", &[]));
        assert!(matches!(hs.feed(&o[..16]), Ok(ServerStep::NeedMore(n)) if n == o.len() - 16));
        assert!(matches!(hs.feed(&o[16..17]), Ok(ServerStep::NeedMore(n)) if n == o.len() - 17));
    }

    #[test]
    fn bad_client_bytes_end_the_handshake() {
        // Unknown client flags.
        let t = run_both(Mode::Standard, false, &[vec![0, 0, 2, 1]]);
        assert!(t.events[0].starts_with("error:"), "{t:?}");
        // Not fixed newstyle where options must be refusable.
        for (mode, tls) in [(Mode::XapiLike, false), (Mode::Standard, true)] {
            let t = run_both(mode, tls, &[vec![0, 0, 0, 0]]);
            assert_eq!(t.events, ["close shutdown=false"]);
        }
        // Claims 1 GiB of option data: refused on the header alone.
        let mut c = FIXED.to_vec();
        let mut head = opt(proto::OPT_GO, &[]);
        head[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
        c.extend(head);
        let t = run_both(Mode::Standard, false, &[c]);
        assert!(t.events[0].contains("too long"), "{t:?}");
        // Bad option magic.
        let mut c = FIXED.to_vec();
        c.extend(b"IHAVEOPX\0\0\0\x01\0\0\0\0");
        let t = run_both(Mode::Standard, false, &[c]);
        assert!(t.events[0].contains("magic"), "{t:?}");
    }
}
