//! RFC 6455 conformance of the gateway's own framing, organised like the sections of
//! the Autobahn testsuite: framing, pings and pongs, reserved bits, opcodes,
//! fragmentation, UTF-8 in text and close frames, close handling, limits.
//!
//! Every case opens a real TCP connection to a gateway, speaks raw frames (encoded
//! here, independently of the gateway's code) and checks the exact answer: the echoed
//! message, or the close code, followed by the end of the connection. A socket with
//! `publish-broadcast&subscribe-broadcast&echo` on the embedded broker gets its own
//! messages back, which makes the gateway an echo server for these cases.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Gateway, WAIT};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const FIN: u8 = 0x80;

/// A client frame: `first` is the whole first byte (FIN, RSV bits, opcode); the
/// payload is masked as RFC 6455 §5.3 asks of clients.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x1F, 0x2E, 0x3D, 0x4C];
    let mut out = vec![first];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    [&code.to_be_bytes()[..], reason].concat()
}

/// A raw WebSocket client.
struct Raw {
    tcp: TcpStream,
}

impl Raw {
    /// Opens an echo socket on a facility of its own.
    async fn open(gw: &Gateway) -> Raw {
        Self::open_at(gw).await.0
    }

    /// Opens an echo socket on a facility of its own; also returns its path.
    async fn open_at(gw: &Gateway) -> (Raw, String) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = format!("/ws/case{n}?subscribe-broadcast&publish-broadcast&echo");
        (Self::open_path(gw, &path).await, path)
    }

    async fn open_path(gw: &Gateway, path: &str) -> Raw {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            gw.addr
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = tokio::time::timeout(WAIT, tcp.read_u8())
                .await
                .expect("handshake answer in time")
                .expect("handshake answer");
            head.push(byte);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101 "),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Raw { tcp }
    }

    async fn send(&mut self, first: u8, payload: &[u8]) {
        self.send_raw(&client_frame(first, payload)).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        // The gateway may already have closed after an earlier bad frame.
        let _ = self.tcp.write_all(bytes).await;
    }

    /// The next server frame (first byte, payload); `None` when the connection ended.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(WAIT, async {
            let first = self.tcp.read_u8().await.ok()?;
            let second = self.tcp.read_u8().await.ok()?;
            assert_eq!(second & 0x80, 0, "server frames are not masked");
            let len = match second & 0x7F {
                126 => u64::from(self.tcp.read_u16().await.ok()?),
                127 => self.tcp.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0; len as usize];
            self.tcp.read_exact(&mut payload).await.ok()?;
            Some((first, payload))
        })
        .await
        .expect("a frame or the end in time")
    }

    /// Expects `first`/`payload` next.
    async fn expect(&mut self, first: u8, payload: &[u8], case: &str) {
        let got = self.frame().await;
        assert_eq!(
            got.as_ref().map(|(f, p)| (*f, p.len())),
            Some((first, payload.len())),
            "{case}"
        );
        assert!(got.unwrap().1 == payload, "{case}: payload differs");
    }

    /// Expects a close frame with `code`, then the end of the connection; returns the
    /// reason.
    async fn expect_close(&mut self, code: u16, case: &str) -> String {
        let (first, payload) = self
            .frame()
            .await
            .unwrap_or_else(|| panic!("{case}: ended without a close frame"));
        assert_eq!(
            first,
            FIN | CLOSE,
            "{case}: not a close frame ({payload:?})"
        );
        let got = u16::from_be_bytes([payload[0], payload[1]]);
        let reason = String::from_utf8(payload[2..].to_vec()).expect("a UTF-8 reason");
        assert_eq!(got, code, "{case}: reason {reason:?}");
        // Answer as a client does; the gateway then ends the connection.
        self.send(FIN | CLOSE, &close_payload(code.max(1000), b""))
            .await;
        assert!(
            self.frame().await.is_none(),
            "{case}: connection still open"
        );
        reason
    }
}

/// Sends `frames` on a fresh socket and expects the close `code`.
async fn refused(gw: &Gateway, frames: &[Vec<u8>], code: u16, case: &str) -> String {
    let mut c = Raw::open(gw).await;
    for frame in frames {
        c.send_raw(frame).await;
    }
    c.expect_close(code, case).await
}

#[tokio::test]
async fn s1_framing_text_and_binary_of_every_length_encoding() {
    let gw = Gateway::start(&[]);
    let mut c = Raw::open(&gw).await;
    for len in [0, 1, 125, 126, 127, 128, 1000, 65535, 65536] {
        let text = "*".repeat(len);
        c.send(FIN | TEXT, text.as_bytes()).await;
        c.expect(FIN | TEXT, text.as_bytes(), &format!("text of {len}"))
            .await;
        // A publication carries no type: it goes out as binary when it is not UTF-8
        // (the ws4redis contract), which these payloads are not.
        if len > 0 {
            let binary: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 0x80).collect();
            c.send(FIN | BINARY, &binary).await;
            c.expect(FIN | BINARY, &binary, &format!("binary of {len}"))
                .await;
        }
    }
    // Many frames in one write come back in order.
    let burst: Vec<u8> = (0..50)
        .flat_map(|i| client_frame(FIN | TEXT, format!("m{i}").as_bytes()))
        .collect();
    c.send_raw(&burst).await;
    for i in 0..50 {
        c.expect(FIN | TEXT, format!("m{i}").as_bytes(), "burst")
            .await;
    }
    c.send(FIN | CLOSE, &close_payload(1000, b"")).await;
    c.expect_close(1000, "normal close").await;
}

#[tokio::test]
async fn s2_pings_and_pongs() {
    let gw = Gateway::start(&[]);
    let mut c = Raw::open(&gw).await;
    c.send(FIN | PING, b"").await;
    c.expect(FIN | PONG, b"", "empty ping").await;
    let payload: Vec<u8> = (0..125).collect();
    c.send(FIN | PING, &payload).await;
    c.expect(FIN | PONG, &payload, "125-byte ping").await;
    // An unsolicited pong is ignored.
    c.send(FIN | PONG, b"unasked").await;
    for i in 0..10u8 {
        c.send(FIN | PING, &[i]).await;
    }
    for i in 0..10u8 {
        c.expect(FIN | PONG, &[i], "pings in a row").await;
    }
    c.send(FIN | TEXT, b"still here").await;
    c.expect(FIN | TEXT, b"still here", "after pongs").await;

    let long_ping = client_frame(FIN | PING, &[0; 126]);
    refused(&gw, &[long_ping], 1002, "ping of 126 bytes").await;
    let fragmented_ping = client_frame(PING, b"x");
    refused(&gw, &[fragmented_ping], 1002, "fragmented ping").await;
}

#[tokio::test]
async fn s3_reserved_bits() {
    let gw = Gateway::start(&[]);
    for (rsv, name) in [
        (0x40, "RSV1"),
        (0x20, "RSV2"),
        (0x10, "RSV3"),
        (0x70, "all"),
    ] {
        let reason = refused(&gw, &[client_frame(FIN | rsv | TEXT, b"x")], 1002, name).await;
        assert!(reason.contains("reserved bits"), "{reason}");
        refused(&gw, &[client_frame(FIN | rsv | PING, b"")], 1002, name).await;
    }
    // A message sent before the bad frame is still published (and stored: a later
    // socket on the facility receives it).
    let (mut c, path) = Raw::open_at(&gw).await;
    c.send_raw(
        &[
            client_frame(FIN | TEXT, b"ok"),
            client_frame(FIN | 0x40 | TEXT, b"bad"),
        ]
        .concat(),
    )
    .await;
    loop {
        match c.frame().await {
            Some((first, _)) if first == FIN | CLOSE => break,
            Some((_, payload)) => assert_eq!(payload, b"ok"),
            None => panic!("ended without a close frame"),
        }
    }
    let mut late = Raw::open_path(&gw, &path).await;
    late.expect(FIN | TEXT, b"ok", "published before the bad frame")
        .await;
}

#[tokio::test]
async fn s4_reserved_opcodes() {
    let gw = Gateway::start(&[]);
    for opcode in [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        let reason = refused(
            &gw,
            &[client_frame(FIN | opcode, b"")],
            1002,
            &format!("opcode {opcode:#x}"),
        )
        .await;
        assert!(reason.contains("opcode"), "{reason}");
    }
}

#[tokio::test]
async fn s5_fragmentation() {
    let gw = Gateway::start(&[]);
    let mut c = Raw::open(&gw).await;
    c.send(TEXT, b"frag").await;
    c.send(0, b"").await;
    c.send(FIN, b"ment").await;
    c.expect(FIN | TEXT, b"fragment", "three fragments").await;
    c.send(BINARY, &[0xFF, 2]).await;
    c.send(FIN | PING, b"between").await;
    c.send(FIN, &[3]).await;
    c.expect(FIN | PONG, b"between", "ping between fragments")
        .await;
    c.expect(FIN | BINARY, &[0xFF, 2, 3], "binary fragments")
        .await;
    // A fragmented message of empty fragments.
    c.send(TEXT, b"").await;
    c.send(FIN, b"").await;
    c.expect(FIN | TEXT, b"", "empty fragments").await;

    let reason = refused(
        &gw,
        &[client_frame(FIN, b"x")],
        1002,
        "continuation without start",
    )
    .await;
    assert!(reason.contains("continuation"), "{reason}");
    let nested = [client_frame(TEXT, b"a"), client_frame(FIN | TEXT, b"b")];
    refused(&gw, &nested, 1002, "new message inside a fragmented one").await;
}

#[tokio::test]
async fn s6_utf8_in_text_messages() {
    let gw = Gateway::start(&[]);
    let mut c = Raw::open(&gw).await;
    let kosme = "κόσμε".as_bytes();
    c.send(FIN | TEXT, kosme).await;
    c.expect(FIN | TEXT, kosme, "valid UTF-8").await;
    // A code point split across fragments is fine once the message is whole.
    c.send(TEXT, &kosme[..1]).await;
    c.send(FIN, &kosme[1..]).await;
    c.expect(FIN | TEXT, kosme, "split code point").await;

    let truncated = client_frame(FIN | TEXT, &[0xCE, 0xBA, 0xE1, 0xBD]);
    refused(&gw, &[truncated], 1007, "truncated sequence").await;
    let surrogate = client_frame(FIN | TEXT, &[0xED, 0xA0, 0x80]);
    refused(&gw, &[surrogate], 1007, "surrogate").await;
    let across = [client_frame(TEXT, b"ok"), client_frame(FIN, &[0xFF])];
    refused(&gw, &across, 1007, "invalid across fragments").await;
    // Binary messages carry any bytes.
    let mut c = Raw::open(&gw).await;
    c.send(FIN | BINARY, &[0xFF, 0xFE]).await;
    c.expect(FIN | BINARY, &[0xFF, 0xFE], "binary").await;
}

#[tokio::test]
async fn s7_close_handling() {
    let gw = Gateway::start(&[]);
    let mut c = Raw::open(&gw).await;
    c.send(FIN | CLOSE, b"").await;
    c.expect_close(1000, "empty close").await;
    let mut c = Raw::open(&gw).await;
    c.send(FIN | CLOSE, &close_payload(1000, b"bye")).await;
    c.expect_close(1000, "close with a reason").await;
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
    ] {
        let mut c = Raw::open(&gw).await;
        c.send(FIN | CLOSE, &close_payload(code, b"")).await;
        c.expect_close(code, &format!("echo of {code}")).await;
    }
    // 1010 is for clients only.
    let mut c = Raw::open(&gw).await;
    c.send(FIN | CLOSE, &close_payload(1010, b"")).await;
    c.expect_close(1000, "answer to 1010").await;
    for code in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let reason = refused(
            &gw,
            &[client_frame(FIN | CLOSE, &close_payload(code, b""))],
            1002,
            &format!("code {code}"),
        )
        .await;
        assert_eq!(reason, format!("invalid close code {code}"));
    }
    refused(
        &gw,
        &[client_frame(FIN | CLOSE, &[0x03])],
        1002,
        "1-byte close",
    )
    .await;
    let bad_reason = client_frame(FIN | CLOSE, &close_payload(1000, &[0xCE, 0xBA, 0xE1]));
    refused(&gw, &[bad_reason], 1007, "close reason not UTF-8").await;
    let mut c = Raw::open(&gw).await;
    c.send(FIN | CLOSE, &close_payload(1000, &[b'r'; 123]))
        .await;
    c.expect_close(1000, "123-byte reason").await;
    // Nothing sent after the close is answered.
    let mut c = Raw::open(&gw).await;
    c.send_raw(
        &[
            client_frame(FIN | CLOSE, &close_payload(1000, b"")),
            client_frame(FIN | TEXT, b"late"),
        ]
        .concat(),
    )
    .await;
    c.expect_close(1000, "data after close").await;
}

#[tokio::test]
async fn s9_limits_are_checked_from_the_header() {
    let gw = Gateway::start(&[("max_message_size", "1024"), ("queue_bytes", "65536")]);
    let mut c = Raw::open(&gw).await;
    c.send(FIN | TEXT, &[b'a'; 1024]).await;
    c.expect(FIN | TEXT, &[b'a'; 1024], "at the limit").await;
    c.send(FIN | TEXT, &[b'a'; 1025]).await;
    let reason = c.expect_close(1009, "over the limit").await;
    assert_eq!(reason, "message larger than 1024 bytes");
    // A header announcing 2^40 bytes is refused before any payload is sent.
    let mut huge = vec![FIN | BINARY, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    refused(&gw, &[huge], 1009, "2^40-byte header").await;
    let fragments = [
        client_frame(TEXT, &[b'a'; 600]),
        client_frame(FIN, &[b'a'; 600]),
    ];
    refused(&gw, &fragments, 1009, "fragments over the limit").await;
    // Client frames must be masked.
    let unmasked = vec![FIN | TEXT, 2, b'h', b'i'];
    let reason = refused(&gw, &[unmasked], 1002, "unmasked").await;
    assert!(reason.contains("not masked"), "{reason}");
}
