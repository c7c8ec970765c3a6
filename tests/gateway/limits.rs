//! Bounds a client cannot get around, tried from outside as an attacker would: frame
//! sizes, slow consumers, slow and idle HTTP connections, per-address and per-process
//! socket limits, publication sizes, and the handshake's protocol answers.
//!
//! Where memory or descriptors are counted, the gateway runs as a process of its own
//! and is measured through `/proc`.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{
    descriptors, http, metric, rss_kib, until_upgraded, Client, Gateway, UPGRADE, WAIT,
};
use crate::operations::metrics;

/// A raw handshake on `tcp`; returns the answer's head (and whatever body came along).
async fn raw_handshake(tcp: &mut TcpStream, path: &str) -> String {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, tcp.read_u8())
            .await
            .expect("answer in time")
        {
            Ok(byte) => head.push(byte),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// `n` sockets on `path` that complete their handshake and then never read. Their
/// receive buffer is small: the kernel takes little before the gateway must queue.
async fn never_reading(gw: &Gateway, n: usize, path: &str) -> Vec<TcpStream> {
    let mut sockets = Vec::new();
    for _ in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = socket.connect(gw.addr).await.unwrap();
        let answer = raw_handshake(&mut tcp, path).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        sockets.push(tcp);
    }
    sockets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_announcing_2_40_bytes_is_refused_before_it_costs_memory() {
    let gw = Gateway::start_process(&[("max_message_size", "65536")], &[]);
    let pid = gw.pid();
    // Warm every worker's read path: a full-size message on a few sockets.
    for _ in 0..8 {
        let mut c =
            Client::connect(&gw.ws_url("/ws/warm?publish-broadcast&subscribe-broadcast&echo"))
                .await;
        c.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
            0xFF;
            65536
        ]))
        .await
        .unwrap();
        c.next().await;
        c.close().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib(pid);

    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let answer = raw_handshake(&mut tcp, "/ws/chat?subscribe-broadcast").await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let (mut reader, mut writer) = tcp.into_split();
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    writer.write_all(&header).await.unwrap();
    // Then stream payload, as the attack did, until the gateway stops taking it.
    let junk = tokio::spawn(async move {
        let chunk = vec![0x55; 64 * 1024];
        for _ in 0..64 {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut first = [0u8; 4];
    tokio::time::timeout(WAIT, reader.read_exact(&mut first))
        .await
        .expect("a close frame in time")
        .unwrap();
    assert_eq!(first[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([first[2], first[3]]), 1009);
    let _ = junk.await;
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 64 + 64, "gateway RSS grew by {grown} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_that_never_read_release_their_descriptors() {
    let settings = [
        ("max_message_size", "1048576"),
        ("queue_bytes", "1048576"),
        ("ping_interval", "0"),
    ];
    let gw = Gateway::start_process(&settings, &[]);
    let pid = gw.pid();
    let sockets = never_reading(&gw, 50, "/ws/flood?subscribe-broadcast").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&metrics(&gw).await, "wsrelay_sockets") < 50.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sockets never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each socket is one descriptor of the gateway.
    let idle = descriptors(pid) - 50;
    // More than the kernel buffers (up to 4 MiB per socket here) and the queue hold.
    let message = "x".repeat(1_000_000);
    for _ in 0..8 {
        let body = serde_json::json!({"facility": "flood", "audiences": {"broadcast": true}, "message": message, "expire": 0});
        assert_eq!(gw.api_publish(body).await.status, 200);
    }
    // None of them reads, yet each is closed as a slow consumer and its descriptor
    // released (after `close_timeout`, 2 s, for the close frame).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let open = descriptors(pid);
        if open <= idle {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.display().to_string())
                .collect();
            panic!("{} descriptors still open: {links:?}", open - idle);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics(&gw).await;
    assert_eq!(metric(&text, "wsrelay_slow_consumer_closes_total"), 50.0);
    assert_eq!(metric(&text, "wsrelay_sockets"), 0.0);
    drop(sockets);
}

#[tokio::test]
async fn a_slow_request_head_after_a_keep_alive_request_is_cut() {
    let gw = Gateway::start(&[
        ("policy__handshake_timeout", "0.5"),
        ("http_keep_alive", "30"),
    ]);
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // The next head, one byte at a time: cut with 408 well before it could end.
    let (mut reader, mut writer) = tcp.into_split();
    let dribble = tokio::spawn(async move {
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            if writer.write_all(&[*byte]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    });
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, reader.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .ok();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest:?}");
    assert!(!dribble.await.unwrap(), "the whole head was taken");
}

#[tokio::test]
async fn connections_still_in_their_handshake_count_against_the_address_limit() {
    let gw = Gateway::start(&[
        ("policy__max_connections_per_ip", "3"),
        ("policy__handshake_timeout", "30"),
    ]);
    let mut pending = Vec::new();
    for _ in 0..3 {
        pending.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // Wait until the gateway holds them: three, and the one asking for the metrics
    // (from another address, which has its own places).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let probe = TcpSocket::new_v4().unwrap();
        probe.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut tcp = probe.connect(gw.addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.unwrap();
        if metric(&text, "wsrelay_http_connections") >= 4.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = http(gw.addr, "GET", "/ws/chat", &UPGRADE, "").await;
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (429, "too many connections from 127.0.0.1")
    );
    // A closed pending connection gives its place back.
    pending.pop();
    until_upgraded(gw.addr, "/ws/chat").await;
}

#[tokio::test]
async fn max_sockets_is_the_ceiling_and_says_so() {
    let gw = Gateway::start(&[("max_sockets", "2")]);
    let url = gw.ws_url("/ws/chat?subscribe-broadcast");
    let first = Client::connect(&url).await;
    let _second = Client::connect(&url).await;
    let refused = http(gw.addr, "GET", "/ws/chat", &UPGRADE, "").await;
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (
            503,
            "too many sockets: this gateway holds at most 2 (max_sockets)"
        )
    );
    first.close().await;
    until_upgraded(gw.addr, "/ws/chat").await;
}

#[tokio::test]
async fn publications_over_max_publication_size_are_dropped_and_counted() {
    let gw = Gateway::start(&[("max_publication_size", "100")]);
    let mut c = Client::connect(&gw.ws_url("/ws/news?subscribe-broadcast")).await;
    for message in ["x".repeat(200), "small".to_string()] {
        let body = serde_json::json!({"facility": "news", "audiences": {"broadcast": true}, "message": message, "expire": 0});
        assert_eq!(gw.api_publish(body).await.status, 200);
    }
    assert_eq!(c.recv_text().await, "small");
    let text = metrics(&gw).await;
    assert_eq!(
        metric(
            &text,
            "wsrelay_publications_dropped_total{reason=\"too_large\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_handshake_answers_versions_as_rfc_6455_asks() {
    let gw = Gateway::start(&[]);
    let without: Vec<(&str, &str)> = UPGRADE[..3].to_vec();
    let r = http(gw.addr, "GET", "/ws/chat", &without, "").await;
    assert_eq!(r.status, 426, "{}", r.body);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{}",
        r.head
    );
    let v12 = [&UPGRADE[..3], &[("Sec-WebSocket-Version", "12")]].concat();
    let r = http(gw.addr, "GET", "/ws/chat", &v12, "").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            400,
            "unsupported WebSocket version \"12\"; this server speaks version 13"
        )
    );
    // ws4redis accepted the drafts that frame messages the same way.
    for version in ["8", "7"] {
        let old = [&UPGRADE[..3], &[("Sec-WebSocket-Version", version)]].concat();
        assert_eq!(
            http(gw.addr, "GET", "/ws/chat", &old, "").await.status,
            101,
            "{version}"
        );
    }
    let no_key = [&UPGRADE[..2], &UPGRADE[3..]].concat();
    assert_eq!(
        http(gw.addr, "GET", "/ws/chat", &no_key, "").await.status,
        400
    );
}

#[tokio::test]
async fn the_origin_check_compares_the_scheme() {
    let gw = Gateway::start(&[("policy__compat", "false")]);
    let host = gw.addr.to_string();
    let origin = |scheme: &str| format!("{scheme}://{host}");
    let with = |origin: String| {
        let mut headers = UPGRADE.to_vec();
        headers.push(("Origin", Box::leak(origin.into_boxed_str())));
        headers
    };
    let r = http(gw.addr, "GET", "/ws/chat", &with(origin("http")), "").await;
    assert_eq!(r.status, 101);
    for scheme in ["https", "ftp"] {
        let r = http(gw.addr, "GET", "/ws/chat", &with(origin(scheme)), "").await;
        assert_eq!(r.status, 403, "{scheme}: {}", r.body);
    }
    // Behind a trusted TLS proxy, the page is https.
    let proxied = Gateway::start(&[
        ("policy__compat", "false"),
        ("policy__trusted_proxies", "127.0.0.1"),
    ]);
    let host = proxied.addr.to_string();
    let mut headers = UPGRADE.to_vec();
    let https = format!("https://{host}");
    headers.push(("Origin", &https));
    headers.push(("X-Forwarded-Proto", "https"));
    assert_eq!(
        http(proxied.addr, "GET", "/ws/chat", &headers, "")
            .await
            .status,
        101
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_publication_costs_memory_once_not_per_socket() {
    let size = 16 * 1024 * 1024;
    let limit = (size + 1024 * 1024).to_string();
    let settings = [
        ("max_message_size", limit.as_str()),
        ("queue_bytes", limit.as_str()),
        ("max_publication_size", limit.as_str()),
        ("ping_interval", "0"),
    ];
    let gw = Gateway::start_process(&settings, &[]);
    let pid = gw.pid();
    let sockets = never_reading(&gw, 20, "/ws/big?subscribe-broadcast").await;
    let before = rss_kib(pid);
    let body = serde_json::json!({"facility": "big", "audiences": {"broadcast": true}, "message": "x".repeat(size), "expire": 0});
    assert_eq!(gw.api_publish(body).await.status, 200);
    // Twenty sockets that do not read hold the one shared frame: the request body, its
    // decoded copy and the frame, not twenty copies (320 MiB).
    let during = rss_kib(pid).saturating_sub(before);
    assert!(during < 64 * 1024, "RSS grew by {during} KiB while queued");
    drop(sockets);
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&metrics(&gw).await, "wsrelay_sockets") > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sockets never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = rss_kib(pid).saturating_sub(before);
    assert!(
        after < 8 * 1024,
        "RSS still {after} KiB above after the sockets closed"
    );
}

#[tokio::test]
async fn a_publication_as_large_as_the_queue_reaches_an_idle_subscriber() {
    // The defaults: queue_bytes and max_publication_size are both 1 MiB, so the frame
    // (payload and header) is a few bytes over the queue's bound.
    let gw = Gateway::start(&[("max_message_size", "1048576")]);
    let mut c = Client::connect(&gw.ws_url("/ws/big?subscribe-broadcast")).await;
    let message = "y".repeat(1024 * 1024);
    let body = serde_json::json!({"facility": "big", "audiences": {"broadcast": true}, "message": message, "expire": 0});
    assert_eq!(gw.api_publish(body).await.status, 200);
    assert_eq!(c.recv_text().await.len(), 1024 * 1024);
}

#[tokio::test]
async fn the_publish_api_refuses_before_reading_the_body_and_bounds_its_time() {
    let gw = Gateway::start(&[("policy__request_timeout", "0.5")]);
    // A wrong token is answered at once, whatever body is announced.
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Length: 300000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // With the token, a body that never comes holds the connection at most
    // `policy.request_timeout`.
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 1000\r\n\r\n",
        crate::harness::TOKEN
    );
    until_closed(gw.addr, &head).await;
}

/// Sends `request` on a fresh connection and reads until the gateway closes it (at
/// most [`WAIT`]); returns what came back.
async fn until_closed(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn handshakes_need_http_1_1_and_a_host() {
    let gw = Gateway::start(&[]);
    let request = "GET /ws/chat HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let answer = until_closed(gw.addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.ends_with("it needs HTTP/1.1 and a Host header"),
        "{answer}"
    );
}
