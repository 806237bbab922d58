//! A hostile NBD client's bytes fed to the server: first to the sans-IO
//! server-side decoders (client flags, options, GO/INFO and meta context
//! data, requests), each of which must re-encode to the bytes it read; then
//! to a whole server connection (`nbd::server::serve_connection`, handshake
//! and transmission, over an in-memory pipe, against a small memory export,
//! in either personality). Never a panic, never a hang: the server ends the
//! connection when the bytes run out.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd::proto::{self, Decoded};
use nbd::server::{
    serve_connection, Export, ExportError, ExportResolver, MemoryExport, Mode, ServerOptions,
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
        let mode = if first & 1 == 0 {
            Mode::Standard
        } else {
            Mode::XapiLike
        };
        connection(mode, client);
    }
});
