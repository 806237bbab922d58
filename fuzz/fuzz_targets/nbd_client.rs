//! A hostile NBD server's bytes fed to the client: the handshake state
//! machine (in arbitrary pieces) and the transmission-phase reply decoders.
//! Never a panic; whatever decodes must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::{self, ClientHandshake, Decoded, HandshakeOptions, ReplyHeader, Step};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // Byte 0 picks the options and the piece size.
    let tls = data[0] & 1 != 0;
    let piece = 1 + (data[0] >> 2) as usize;
    let mut hs = ClientHandshake::new(HandshakeOptions {
        export: "disk".into(),
        tls,
        structured_replies: data[0] & 2 != 0,
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()],
    });
    let body = &data[1..];
    let _ = hs.feed(&[]);
    for chunk in body.chunks(piece) {
        match hs.feed(chunk) {
            Ok(Step::StartTls(_)) => {
                if hs.tls_established().is_err() {
                    break;
                }
            }
            Ok(Step::Done(n)) => {
                assert!(n.meta_contexts.len() <= 2);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }

    // Reply headers and chunk payloads.
    for structured in [false, true] {
        if let Ok(Decoded::Done(h, used)) = proto::decode_reply_header(body, structured, 1 << 20) {
            let again = match h {
                ReplyHeader::Simple { error, cookie } => {
                    proto::encode_simple_reply(error, cookie).to_vec()
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    cookie,
                    length,
                } => {
                    assert!(length <= 1 << 20);
                    proto::encode_chunk_header(flags, kind, cookie, length).to_vec()
                }
            };
            assert_eq!(&again[..], &body[..used]);
        }
    }
    if body.len() >= 2 {
        let kind = u16::from_be_bytes([body[0], body[1]]);
        if let Ok(proto::Chunk::BlockStatus { context, extents }) =
            proto::decode_chunk(kind, &body[2..])
        {
            assert_eq!(proto::encode_block_status(context, &extents), &body[2..]);
        }
    }
    if let Ok(Decoded::Done(r, used)) = proto::decode_option_reply(body) {
        assert_eq!(
            proto::encode_option_reply(r.option, r.reply, &r.data),
            &body[..used]
        );
    }
    if let Ok(Decoded::Done(r, used)) = proto::decode_request(body) {
        assert_eq!(&proto::encode_request(&r)[..], &body[..used]);
    }
});
