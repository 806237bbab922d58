//! The server side of the fixed-newstyle handshake, from the greeting to
//! the start of transmission: STARTTLS when TLS is configured (mandatory
//! then), and the option set of the chosen [`Mode`]. Reads exactly the bytes
//! of each option, so nothing a client sends ahead of the TLS handshake is
//! ever taken as protected.
//!
//! spec: NBD doc/proto.md "Option haggling"; xapi-nbd: xenapi-reference.md §4

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::ConnError;
use super::export::{Export, ExportError, ExportResolver, Mode, ServerOptions};
use crate::client::Io;
use crate::proto::{self, ClientOption, Decoded};

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
pub(super) struct Transmission {
    pub export: Arc<dyn Export>,
    pub structured: bool,
    /// The id of `base:allocation` when the client selected it.
    pub base_allocation: Option<u32>,
}

/// What the option phase has agreed so far.
struct Agreed {
    tls_active: bool,
    structured: bool,
    no_zeroes: bool,
    /// Export name of the last SET_META_CONTEXT and whether it selected
    /// `base:allocation`.
    contexts: Option<(String, bool)>,
}

/// What one option led to.
enum Next {
    Continue,
    Close,
    Transmit(Transmission),
}

async fn send_reply(
    io: &mut Box<dyn Io>,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), ConnError> {
    io.write_all(&proto::encode_option_reply(option, reply, data))
        .await?;
    io.flush().await?;
    Ok(())
}

/// Reads one option, its length checked by the codec before allocation.
async fn read_option(io: &mut Box<dyn Io>) -> Result<ClientOption, ConnError> {
    let mut head = [0u8; 16];
    io.read_exact(&mut head).await?;
    match proto::decode_option(&head)? {
        Decoded::Done(option, _) => Ok(option),
        Decoded::Incomplete(more) => {
            let mut buf = head.to_vec();
            buf.resize(16 + more, 0);
            io.read_exact(&mut buf[16..]).await?;
            match proto::decode_option(&buf)? {
                Decoded::Done(option, _) => Ok(option),
                Decoded::Incomplete(_) => Err(ConnError::Protocol("option length changed".into())),
            }
        }
    }
}

/// Runs the handshake. `None`: the client left, or was sent away, during
/// negotiation.
pub(super) async fn negotiate(
    mut io: Box<dyn Io>,
    resolver: &dyn ExportResolver,
    options: &ServerOptions,
) -> Result<Option<(Box<dyn Io>, Transmission)>, ConnError> {
    let xapi = options.mode == Mode::XapiLike;
    let greeting = if xapi {
        proto::FLAG_FIXED_NEWSTYLE
    } else {
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
    };
    io.write_all(&proto::encode_greeting(greeting)).await?;
    io.flush().await?;
    let mut flag_bytes = [0u8; 4];
    io.read_exact(&mut flag_bytes).await?;
    let client_flags = match proto::decode_client_flags(&flag_bytes)? {
        Decoded::Done(flags, _) => flags,
        Decoded::Incomplete(_) => return Err(ConnError::Protocol("short client flags".into())),
    };
    let fixed = client_flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
    if !fixed && (xapi || options.tls.is_some()) {
        // Without fixed newstyle there is no way to refuse an option.
        return Ok(None);
    }
    let mut agreed = Agreed {
        tls_active: false,
        structured: false,
        no_zeroes: !xapi && client_flags & proto::FLAG_C_NO_ZEROES != 0,
        contexts: None,
    };
    loop {
        let option = read_option(&mut io).await?;
        if let Some(tls) = options.tls.as_ref().filter(|_| !agreed.tls_active) {
            match option.option {
                proto::OPT_STARTTLS if option.data.is_empty() => {
                    send_reply(&mut io, option.option, proto::REP_ACK, &[]).await?;
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                    let stream = acceptor
                        .accept(io)
                        .await
                        .map_err(|e| ConnError::Tls(e.to_string()))?;
                    io = Box::new(stream);
                    agreed.tls_active = true;
                }
                proto::OPT_STARTTLS => {
                    send_reply(&mut io, option.option, proto::REP_ERR_INVALID, &[]).await?;
                }
                proto::OPT_ABORT => {
                    // xapi-nbd just closes; the spec asks for an ACK first.
                    if !xapi {
                        let _ = send_reply(&mut io, option.option, proto::REP_ACK, &[]).await;
                    }
                    return Ok(None);
                }
                // EXPORT_NAME has no error reply: the only answer is to hang up.
                proto::OPT_EXPORT_NAME => {
                    let _ = io.shutdown().await;
                    return Ok(None);
                }
                other => {
                    send_reply(&mut io, other, proto::REP_ERR_TLS_REQD, b"TLS is required").await?;
                }
            }
            continue;
        }
        let next = if xapi {
            xapi_option(&mut io, resolver, options, &agreed, option).await?
        } else {
            standard_option(&mut io, resolver, &mut agreed, option).await?
        };
        match next {
            Next::Continue => {}
            Next::Close => {
                // A clean end (TLS close_notify, then FIN): the client can
                // tell "refused" from "connection broke".
                let _ = io.shutdown().await;
                return Ok(None);
            }
            Next::Transmit(t) => return Ok(Some((io, t))),
        }
    }
}

/// xapi-nbd's option loop (xapi-project/nbd `server.ml` `generic_loop`).
async fn xapi_option(
    io: &mut Box<dyn Io>,
    resolver: &dyn ExportResolver,
    options: &ServerOptions,
    agreed: &Agreed,
    option: ClientOption,
) -> Result<Next, ConnError> {
    match option.option {
        proto::OPT_EXPORT_NAME => {
            // Any failure (bad session, unknown VDI, refused VBD) closes
            // the connection without a reply.
            let Some((_, export)) =
                export_name(io, resolver, &option.data, XAPI_FLAGS, false).await?
            else {
                return Ok(Next::Close);
            };
            Ok(Next::Transmit(Transmission {
                export,
                structured: false,
                base_allocation: None,
            }))
        }
        proto::OPT_ABORT => {
            let _ = send_reply(io, option.option, proto::REP_ACK, &[]).await;
            Ok(Next::Close)
        }
        proto::OPT_LIST => {
            send_reply(io, option.option, proto::REP_ERR_POLICY, &[]).await?;
            Ok(Next::Continue)
        }
        proto::OPT_STARTTLS => {
            let reply = if agreed.tls_active || options.tls.is_some() {
                proto::REP_ERR_INVALID
            } else {
                proto::REP_ERR_POLICY
            };
            send_reply(io, option.option, reply, &[]).await?;
            Ok(Next::Continue)
        }
        other => {
            send_reply(io, other, proto::REP_ERR_UNSUP, &[]).await?;
            Ok(Next::Continue)
        }
    }
}

/// NBD_OPT_EXPORT_NAME: opens the export and sends the old-style reply
/// that ends the handshake. `None` when the name does not decode or the
/// export cannot be opened: the protocol has no error reply for this
/// option, so the caller closes the connection.
async fn export_name(
    io: &mut Box<dyn Io>,
    resolver: &dyn ExportResolver,
    data: &[u8],
    flags: u16,
    no_zeroes: bool,
) -> Result<Option<(String, Arc<dyn Export>)>, ConnError> {
    let Ok(name) = proto::decode_export_name_data(data) else {
        return Ok(None);
    };
    let Ok(export) = resolver.open(&name) else {
        return Ok(None);
    };
    io.write_all(&proto::encode_export_name_reply(
        export.size_bytes(),
        flags,
        no_zeroes,
    ))
    .await?;
    io.flush().await?;
    Ok(Some((name, export)))
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

async fn standard_option(
    io: &mut Box<dyn Io>,
    resolver: &dyn ExportResolver,
    agreed: &mut Agreed,
    option: ClientOption,
) -> Result<Next, ConnError> {
    let code = option.option;
    match code {
        proto::OPT_EXPORT_NAME => {
            let Some((name, export)) =
                export_name(io, resolver, &option.data, STANDARD_FLAGS, agreed.no_zeroes).await?
            else {
                return Ok(Next::Close);
            };
            Ok(Next::Transmit(transmission(export, &name, agreed)))
        }
        proto::OPT_GO | proto::OPT_INFO => {
            let (name, infos) = match proto::decode_go_data(&option.data) {
                Ok(v) => v,
                Err(e) => {
                    send_reply(io, code, proto::REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                    return Ok(Next::Continue);
                }
            };
            let export = match resolver.open(&name) {
                Ok(export) => export,
                Err(e) => {
                    send_reply(io, code, open_error_reply(&e), e.to_string().as_bytes()).await?;
                    return Ok(Next::Continue);
                }
            };
            let info = proto::encode_info_export(export.size_bytes(), STANDARD_FLAGS);
            send_reply(io, code, proto::REP_INFO, &info).await?;
            if infos.contains(&proto::INFO_BLOCK_SIZE) {
                let sizes = proto::encode_info_block_size(
                    BLOCK_SIZE_MIN,
                    BLOCK_SIZE_PREFERRED,
                    proto::MAX_READ,
                );
                send_reply(io, code, proto::REP_INFO, &sizes).await?;
            }
            send_reply(io, code, proto::REP_ACK, &[]).await?;
            if code == proto::OPT_GO {
                Ok(Next::Transmit(transmission(export, &name, agreed)))
            } else {
                Ok(Next::Continue)
            }
        }
        proto::OPT_ABORT => {
            let _ = send_reply(io, code, proto::REP_ACK, &[]).await;
            Ok(Next::Close)
        }
        proto::OPT_LIST => {
            if !option.data.is_empty() {
                send_reply(io, code, proto::REP_ERR_INVALID, b"LIST takes no data").await?;
                return Ok(Next::Continue);
            }
            for name in resolver.list() {
                if name.len() <= proto::MAX_NAME {
                    send_reply(
                        io,
                        code,
                        proto::REP_SERVER,
                        &proto::encode_server_reply_data(&name, ""),
                    )
                    .await?;
                }
            }
            send_reply(io, code, proto::REP_ACK, &[]).await?;
            Ok(Next::Continue)
        }
        proto::OPT_STARTTLS => {
            // Here TLS is either active already or not configured.
            let reply = if agreed.tls_active {
                proto::REP_ERR_INVALID
            } else {
                proto::REP_ERR_UNSUP
            };
            send_reply(io, code, reply, &[]).await?;
            Ok(Next::Continue)
        }
        proto::OPT_STRUCTURED_REPLY => {
            if !option.data.is_empty() {
                send_reply(
                    io,
                    code,
                    proto::REP_ERR_INVALID,
                    b"STRUCTURED_REPLY takes no data",
                )
                .await?;
                return Ok(Next::Continue);
            }
            agreed.structured = true;
            send_reply(io, code, proto::REP_ACK, &[]).await?;
            Ok(Next::Continue)
        }
        proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
            let list = code == proto::OPT_LIST_META_CONTEXT;
            if !list && !agreed.structured {
                send_reply(
                    io,
                    code,
                    proto::REP_ERR_INVALID,
                    b"structured replies were not negotiated",
                )
                .await?;
                return Ok(Next::Continue);
            }
            let (name, queries) = match proto::decode_meta_context_data(&option.data) {
                Ok(v) => v,
                Err(e) => {
                    send_reply(io, code, proto::REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                    return Ok(Next::Continue);
                }
            };
            let selected = matching_contexts(&queries, list);
            if selected {
                let id = if list { 0 } else { BASE_ALLOCATION_ID };
                let data = proto::encode_meta_context_reply_data(id, BASE_ALLOCATION);
                send_reply(io, code, proto::REP_META_CONTEXT, &data).await?;
            }
            if !list {
                agreed.contexts = Some((name, selected));
            }
            send_reply(io, code, proto::REP_ACK, &[]).await?;
            Ok(Next::Continue)
        }
        other => {
            send_reply(io, other, proto::REP_ERR_UNSUP, &[]).await?;
            Ok(Next::Continue)
        }
    }
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
