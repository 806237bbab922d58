//! A hostile NBD client's bytes fed to the server: first to the sans-IO
//! server-side decoders (client flags, options, GO/INFO and meta context
//! data, requests), each of which must re-encode to the bytes it read; then
//! to the handshake state machine (`nbd::server::ServerHandshake`) split at
//! points drawn from the first byte, which must say exactly what it says
//! when fed whole; then to a whole server connection (`nbd::server::serve_connection`, handshake
//! and transmission, over an in-memory pipe, against a small memory export,
//! in either personality). Never a panic, never a hang: the server ends the
//! connection when the bytes run out.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd::proto::{self, Decoded};
use nbd::server::{
    serve_connection, Export, ExportError, ExportResolver, MemoryExport, Mode, ServerHandshake,
    ServerOptions, ServerStep,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every name opens the same small export.
struct One(Arc<MemoryExport>);

impl ExportResolver for One {
    fn open(&self, _name: &str) -> Result<Arc<dyn Export>, ExportError> {
        Ok(self.0.clone())
    }

    fn list(&self) -> Vec<String> {
        vec!["disk".into()]
    }
}

/// Only "disk" (and the default, empty name) opens; other names fail.
struct Named(Arc<MemoryExport>);

impl ExportResolver for Named {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, ExportError> {
        match name {
            "" | "disk" => Ok(self.0.clone()),
            _ => Err(ExportError::NotFound(name.into())),
        }
    }

    fn list(&self) -> Vec<String> {
        vec!["disk".into(), "x".repeat(5000)]
    }
}

/// Everything the handshake machine said, in order.
#[derive(Debug, Default, PartialEq, Eq)]
struct Transcript {
    out: Vec<u8>,
    /// StartTls, the end (Transmit, Close, an error) or the last NeedMore.
    events: Vec<String>,
    /// Client bytes not consumed: fed but left over (greedy), or never
    /// read (bounded).
    rest: Vec<u8>,
}

/// Feeds `client` to a handshake machine in pieces of the given sizes
/// (cycled). `bounded`: the way the server's driver reads, never more than
/// `NeedMore` asks, TLS "established" at once after StartTls. Otherwise
/// greedy: whole pieces, stopping at StartTls (what follows depends on the
/// TLS layer, not on the machine).
fn handshake(mode: Mode, tls: bool, client: &[u8], pieces: &[usize], bounded: bool) -> Transcript {
    let resolver = Named(Arc::new(MemoryExport::new(vec![5; 4096])));
    let mut hs = ServerHandshake::new(mode, tls, &resolver);
    let mut t = Transcript::default();
    let mut input = client;
    let mut piece = pieces.iter().copied().cycle();
    let mut step = hs.feed(&[]);
    loop {
        step = match step {
            Err(e) => {
                t.events.push(format!("error: {e}"));
                break;
            }
            Ok(ServerStep::Send(bytes)) => {
                assert!(!bytes.is_empty(), "an empty Send");
                t.out.extend(bytes);
                hs.feed(&[])
            }
            Ok(ServerStep::NeedMore(n)) => {
                assert!(n > 0, "NeedMore(0)");
                if input.is_empty() {
                    t.events.push(format!("need {n}"));
                    break;
                }
                let mut take = piece.next().unwrap_or(usize::MAX).max(1).min(input.len());
                if bounded {
                    take = take.min(n);
                }
                let (now, later) = input.split_at(take);
                input = later;
                hs.feed(now)
            }
            Ok(ServerStep::StartTls) => {
                t.events.push("starttls".into());
                if !bounded {
                    break;
                }
                hs.tls_established()
            }
            Ok(ServerStep::Transmit(x)) => {
                if bounded {
                    assert!(hs.leftover().is_empty(), "bounded reads leave nothing over");
                }
                t.events.push(format!("{x:?}"));
                break;
            }
            Ok(ServerStep::Close { farewell, shutdown }) => {
                t.out.extend(farewell);
                t.events.push(format!("close shutdown={shutdown}"));
                break;
            }
        };
    }
    t.rest = hs.leftover().to_vec();
    t.rest.extend_from_slice(input);
    t
}

/// Piece sizes 1..=32 from a seed (xorshift).
fn pieces(seed: u8, n: usize) -> Vec<usize> {
    let mut x = u32::from(seed) | 0x100;
    (0..n.clamp(1, 4096))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 32) as usize + 1
        })
        .collect()
}

/// Splitting the client's bytes changes nothing the machine says, and the
/// driver's bounded reads see what a greedy feed sees.
fn split_handshake(seed: u8, client: &[u8]) {
    let mode = if seed & 1 == 0 {
        Mode::Standard
    } else {
        Mode::XapiLike
    };
    let tls = seed & 2 != 0;
    let split = pieces(seed, client.len());
    let greedy = handshake(mode, tls, client, &[usize::MAX], false);
    assert_eq!(greedy, handshake(mode, tls, client, &split, false));
    assert_eq!(greedy, handshake(mode, tls, client, &[1], false));
    let bounded = handshake(mode, tls, client, &[usize::MAX], true);
    assert_eq!(bounded, handshake(mode, tls, client, &split, true));
    if greedy.events.last().map(String::as_str) == Some("starttls") {
        // The bounded run went on through "TLS" from the same point.
        assert!(bounded.out.starts_with(&greedy.out));
        assert_eq!(bounded.events[..greedy.events.len()], greedy.events[..]);
    } else {
        assert_eq!(greedy, bounded);
    }
}

/// The sans-IO pieces in the order a server meets them.
fn decoders(data: &[u8]) {
    let mut rest = data;
    match proto::decode_client_flags(rest) {
        Ok(Decoded::Done(_, used)) => rest = &rest[used..],
        _ => return,
    }
    while let Ok(Decoded::Done(option, used)) = proto::decode_option(rest) {
        assert_eq!(
            proto::encode_option(option.option, &option.data),
            rest[..used],
            "option re-encodes to what was read"
        );
        if let Ok((name, infos)) = proto::decode_go_data(&option.data) {
            assert_eq!(proto::encode_go_data(&name, &infos), option.data);
        }
        if let Ok((name, queries)) = proto::decode_meta_context_data(&option.data) {
            assert_eq!(
                proto::encode_meta_context_data(&name, &queries),
                option.data
            );
        }
        let _ = proto::decode_export_name_data(&option.data);
        rest = &rest[used..];
    }
    while let Ok(Decoded::Done(request, used)) = proto::decode_request(rest) {
        assert_eq!(proto::encode_request(&request)[..], rest[..used]);
        rest = &rest[used..];
    }
}

/// A whole connection: the client's bytes in, everything the server says
/// read until it closes.
fn connection(mode: Mode, client: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let export = Arc::new(MemoryExport::new(
            (0..200_000u32).map(|i| (i % 251) as u8).collect(),
        ));
        let options = Arc::new(ServerOptions {
            mode,
            handshake_timeout: Duration::from_secs(5),
            ..ServerOptions::default()
        });
        let server = tokio::spawn(serve_connection(
            Box::new(theirs),
            Arc::new(One(export)),
            options,
        ));
        // Write and read at once: the server may answer before it has read
        // everything, and a full pipe must not stall either side.
        let (mut reader, mut writer) = tokio::io::split(&mut ours);
        let write = async {
            let _ = writer.write_all(client).await;
            let _ = writer.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink).await;
        };
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(write, read);
            server.await
        })
        .await;
        assert!(done.is_ok(), "the server neither answered nor closed");
    });
}

fuzz_target!(|data: &[u8]| {
    decoders(data);
    if let Some((&first, client)) = data.split_first() {
        split_handshake(first, client);
        let mode = if first & 1 == 0 {
            Mode::Standard
        } else {
            Mode::XapiLike
        };
        connection(mode, client);
    }
});
