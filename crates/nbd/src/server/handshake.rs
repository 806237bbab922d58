//! Drives the handshake state machine ([`ServerHandshake`]) over a
//! connection: writes what it says, reads what it asks for and runs the TLS
//! handshake when told. Reads never more than the message being read still
//! lacks, so nothing a client sends ahead of the TLS handshake is ever
//! taken as protected, and requests pipelined after GO or EXPORT_NAME stay
//! in the connection for the transmission phase.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::ConnError;
use super::export::{ExportResolver, ServerOptions};
use super::negotiate::{ServerHandshake, ServerStep, Transmission};
use crate::client::Io;

/// Runs the handshake. `None`: the client left, or was sent away, during
/// negotiation.
pub(super) async fn negotiate(
    mut io: Box<dyn Io>,
    resolver: &dyn ExportResolver,
    options: &ServerOptions,
) -> Result<Option<(Box<dyn Io>, Transmission)>, ConnError> {
    let mut hs = ServerHandshake::new(options.mode, options.tls.is_some(), resolver);
    let mut buf = Vec::new();
    // The first step is the greeting.
    let mut step = hs.feed(&[])?;
    loop {
        step = match step {
            ServerStep::Send(bytes) => {
                io.write_all(&bytes).await?;
                io.flush().await?;
                hs.feed(&[])?
            }
            ServerStep::NeedMore(n) => {
                // At most one option (64 KiB of data and its header).
                buf.resize(n, 0);
                let got = io.read(&mut buf).await?;
                if got == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                hs.feed(&buf[..got])?
            }
            ServerStep::StartTls => {
                let Some(tls) = options.tls.as_ref() else {
                    return Err(ConnError::Protocol("STARTTLS without TLS".into()));
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                let stream = acceptor
                    .accept(io)
                    .await
                    .map_err(|e| ConnError::Tls(e.to_string()))?;
                io = Box::new(stream);
                hs.tls_established()?
            }
            ServerStep::Transmit(t) => return Ok(Some((io, t))),
            ServerStep::Close { farewell, shutdown } => {
                if !farewell.is_empty() {
                    let _ = write_flush(&mut io, &farewell).await;
                }
                if shutdown {
                    let _ = io.shutdown().await;
                }
                return Ok(None);
            }
        };
    }
}

async fn write_flush(io: &mut Box<dyn Io>, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}
