//! The wire contract, on both brokers.
//!
//! A socket is known to be subscribed once it has received a stored message: the gateway
//! reads stored messages only after its subscriptions are confirmed. `ready` uses that:
//! before connecting, it stores a marker on a session key that only the new socket
//! listens to, so no other socket sees the marker.

use std::sync::atomic::{AtomicU32, Ordering};

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::harness::{Client, WAIT};
use crate::{on_both_brokers, Backend, Setup, To};

/// Connects to `/ws/{facility}?{query}` with a fresh session and returns once every
/// subscription of the socket is live.
async fn ready(s: &Setup, facility: &str, query: &str) -> Client {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let session = format!("ready{}", NEXT.fetch_add(1, Ordering::Relaxed));
    s.publish(facility, To::Session(&session), "ready", 60)
        .await;
    let url = s.url(&format!("/ws/{facility}?{query}&subscribe-session"));
    let cookie = format!("sessionid={session}");
    let mut c = Client::connect_with(&url, &[("Cookie", &cookie)]).await;
    // Stored messages of the other keys come first (key order); the marker comes last.
    while c.recv_text().await != "ready" {}
    c
}

on_both_brokers!(
    broadcast_reaches_every_subscriber,
    stored_message_reaches_late_joiners,
    expired_or_unstored_messages_are_not_replayed,
    client_publications_reach_others_and_are_stored,
    a_message_sent_with_the_handshake_comes_after_the_stored_one,
    echo_is_off_by_default_and_on_by_flag,
    session_audience_follows_the_cookie,
    heartbeat_is_answered_and_never_published,
    heartbeat_is_sent_to_idle_sockets,
    silent_peer_is_closed_after_ping_timeout,
    text_and_binary_keep_their_type_and_bytes,
    fragmented_messages_are_reassembled,
    invalid_utf8_closes_with_1007,
    oversized_message_closes_with_1009,
    slow_consumer_is_closed_and_others_keep_up,
    stop_closes_sockets_with_1001,
);

async fn broadcast_reaches_every_subscriber(b: Backend) {
    let s = Setup::new(b, &[]).await;
    let mut one = ready(&s, "chat", "subscribe-broadcast").await;
    let mut two = ready(&s, "chat", "Subscribe-Broadcast=1&unknown=x").await;
    let mut other = ready(&s, "news", "subscribe-broadcast").await;
    s.publish("chat", To::Broadcast, "hello", 0).await;
    assert_eq!(one.recv_text().await, "hello");
    assert_eq!(two.recv_text().await, "hello");
    s.publish("news", To::Broadcast, "headline", 0).await;
    assert_eq!(
        other.recv_text().await,
        "headline",
        "news must not see chat's message"
    );
}

async fn stored_message_reaches_late_joiners(b: Backend) {
    let s = Setup::new(b, &[]).await;
    s.publish("chat/room1", To::Broadcast, "first", 60).await;
    s.publish("chat/room1", To::Broadcast, "last", 60).await;
    let mut late = Client::connect(&s.url("/ws/chat/room1?subscribe-broadcast")).await;
    assert_eq!(late.recv_text().await, "last");
}

async fn expired_or_unstored_messages_are_not_replayed(b: Backend) {
    let s = Setup::new(b, &[]).await;
    s.publish("chat", To::Broadcast, "short-lived", 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    s.publish("chat", To::Broadcast, "not kept", 0).await;
    // Stored values are sent in key order (broadcast before session), so the session
    // marker arriving first proves nothing was stored for broadcast.
    s.publish("chat", To::Session("s1"), "marker", 60).await;
    let mut c = Client::connect_with(
        &s.url("/ws/chat?subscribe-broadcast&subscribe-session"),
        &[("Cookie", "sessionid=s1")],
    )
    .await;
    assert_eq!(c.recv_text().await, "marker");
}

async fn client_publications_reach_others_and_are_stored(b: Backend) {
    let s = Setup::new(b, &[]).await;
    let mut listener = ready(&s, "chat", "subscribe-broadcast").await;
    let mut talker = ready(&s, "chat", "subscribe-broadcast&publish-broadcast").await;
    talker.send_text("from a browser").await;
    assert_eq!(listener.recv_text().await, "from a browser");
    let mut late = Client::connect(&s.url("/ws/chat?subscribe-broadcast")).await;
    assert_eq!(late.recv_text().await, "from a browser");
    // Without a publish flag, frames are not published.
    let mut mute = ready(&s, "chat", "subscribe-broadcast").await;
    mute.send_text("ignored").await;
    s.publish("chat", To::Broadcast, "next", 0).await;
    assert_eq!(listener.recv_text().await, "next");
}

/// A client that publishes at once (its first frame in the same TCP write as the
/// handshake request) still gets the stored message first, even when its own message is
/// the same text: stored messages go out before anything is read from the client and are
/// never taken for an echo. Its own live copy reaches the others and not itself.
async fn a_message_sent_with_the_handshake_comes_after_the_stored_one(b: Backend) {
    let s = Setup::new(b, &[]).await;
    s.publish("chat", To::Broadcast, "hello", 60).await;
    let mut listener = ready(&s, "chat", "subscribe-broadcast&publish-broadcast").await;
    let mut eager = TcpStream::connect(s.gw.addr).await.unwrap();
    let request = format!(
        "GET /ws/chat?subscribe-broadcast&publish-broadcast HTTP/1.1\r\nHost: {}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.gw.addr
    );
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(&masked_text("hello"));
    eager.write_all(&bytes).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(timeout(WAIT, eager.read_u8()).await.unwrap().unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(server_text(&mut eager).await, "hello", "the stored copy");
    assert_eq!(listener.recv_text().await, "hello", "the live copy");
    listener.send_text("next").await;
    assert_eq!(
        server_text(&mut eager).await,
        "next",
        "no second copy of its own message"
    );
}

/// A client text frame, masked.
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [7, 1, 9, 3];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The next server frame on a raw stream, which must be a short text frame.
async fn server_text(tcp: &mut TcpStream) -> String {
    let mut head = [0; 2];
    timeout(WAIT, tcp.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (head[0], head[1] & 0x80),
        (0x81, 0),
        "an unmasked text frame"
    );
    let mut payload = vec![0; usize::from(head[1] & 0x7F)];
    tcp.read_exact(&mut payload).await.unwrap();
    String::from_utf8(payload).unwrap()
}

async fn echo_is_off_by_default_and_on_by_flag(b: Backend) {
    let s = Setup::new(b, &[]).await;
    let mut quiet = ready(&s, "chat", "subscribe-broadcast&publish-broadcast").await;
    quiet.send_text("mine").await;
    let mut listener = Client::connect(&s.url("/ws/chat?subscribe-broadcast")).await;
    assert_eq!(listener.recv_text().await, "mine", "published and stored");
    s.publish("chat", To::Broadcast, "theirs", 0).await;
    assert_eq!(
        quiet.recv_text().await,
        "theirs",
        "own message must not come back"
    );

    let mut loud = ready(&s, "chat", "subscribe-broadcast&publish-broadcast&echo").await;
    loud.send_text("again").await;
    assert_eq!(loud.recv_text().await, "again");
}

async fn session_audience_follows_the_cookie(b: Backend) {
    let s = Setup::new(b, &[]).await;
    // Anonymous first, synchronised on a stored broadcast before anybody else listens.
    s.publish("inbox", To::Broadcast, "hello", 60).await;
    let query = "/ws/inbox?subscribe-broadcast&subscribe-session&subscribe-user&subscribe-group";
    let mut anonymous = Client::connect(&s.url(query)).await;
    assert_eq!(anonymous.recv_text().await, "hello");
    let cookie = [("Cookie", "csrftoken=abc; sessionid=s1")];
    s.publish("inbox", To::Session("s1"), "ready", 60).await;
    let mut mine = Client::connect_with(&s.url(query), &cookie).await;
    assert_eq!(mine.recv_text().await, "hello");
    assert_eq!(mine.recv_text().await, "ready");
    s.publish("inbox", To::Session("s1"), "for s1", 0).await;
    assert_eq!(mine.recv_text().await, "for s1");
    s.publish("inbox", To::Broadcast, "for all", 0).await;
    assert_eq!(mine.recv_text().await, "for all");
    assert_eq!(
        anonymous.recv_text().await,
        "for all",
        "anonymous has no session audience"
    );
}

async fn heartbeat_is_answered_and_never_published(b: Backend) {
    let s = Setup::new(
        b,
        &[
            ("heartbeat", "--heartbeat--"),
            ("heartbeat_interval", "3600"),
        ],
    )
    .await;
    let mut listener = ready(&s, "chat", "subscribe-broadcast").await;
    let mut talker = ready(&s, "chat", "subscribe-broadcast&publish-broadcast&echo").await;
    talker.send_text("--heartbeat--").await;
    assert_eq!(talker.recv_text().await, "--heartbeat--", "answered");
    s.publish("chat", To::Broadcast, "after", 0).await;
    assert_eq!(
        listener.recv_text().await,
        "after",
        "the heartbeat was not published"
    );
    assert_eq!(talker.recv_text().await, "after");
}

async fn heartbeat_is_sent_to_idle_sockets(b: Backend) {
    let s = Setup::new(
        b,
        &[
            ("heartbeat", "--heartbeat--"),
            ("heartbeat_interval", "0.2"),
        ],
    )
    .await;
    let mut idle = Client::connect(&s.url("/ws/chat?subscribe-broadcast")).await;
    assert_eq!(idle.recv_text().await, "--heartbeat--");
    assert_eq!(idle.recv_text().await, "--heartbeat--");
}

async fn silent_peer_is_closed_after_ping_timeout(b: Backend) {
    let s = Setup::new(b, &[("ping_interval", "0.2"), ("ping_timeout", "0.3")]).await;
    // A raw client that completes the handshake and then never answers anything.
    let mut tcp = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let request = format!(
        "GET /ws/chat?subscribe-broadcast HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.gw.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut received))
        .await
        .expect("the gateway must close a silent peer")
        .unwrap();
    let close = [0x88, 14, 0x03, 0xE9]; // Close, 14-byte payload, code 1001
    let at = received
        .windows(4)
        .position(|w| w == close)
        .expect("a Close 1001 frame");
    assert_eq!(&received[at + 4..at + 16], b"ping timeout");
}

async fn text_and_binary_keep_their_type_and_bytes(b: Backend) {
    let s = Setup::new(b, &[]).await;
    let mut listener = ready(&s, "files", "subscribe-broadcast").await;
    let mut talker = Client::connect(&s.url("/ws/files?publish-broadcast")).await;
    let raw = vec![0xff, 0x00, 0xfe, b'a'];
    talker.ws.send(Message::binary(raw.clone())).await.unwrap();
    assert_eq!(listener.next().await, Message::binary(raw));
    talker.send_text("héllo ✓").await;
    assert_eq!(listener.next().await, Message::text("héllo ✓"));
    // Valid UTF-8 sent as binary is typed by content on the way out (the broker keeps no type).
    talker
        .ws
        .send(Message::binary(b"plain".to_vec()))
        .await
        .unwrap();
    assert_eq!(listener.next().await, Message::text("plain"));
}

async fn fragmented_messages_are_reassembled(b: Backend) {
    let s = Setup::new(b, &[]).await;
    let mut listener = ready(&s, "chat", "subscribe-broadcast").await;
    let mut talker = Client::connect(&s.url("/ws/chat?publish-broadcast")).await;
    let first = Frame::message(b"frag".to_vec(), OpCode::Data(Data::Text), false);
    let last = Frame::message(b"mented".to_vec(), OpCode::Data(Data::Continue), true);
    talker.ws.send(Message::Frame(first)).await.unwrap();
    talker.ws.send(Message::Frame(last)).await.unwrap();
    assert_eq!(listener.recv_text().await, "fragmented");
}

async fn invalid_utf8_closes_with_1007(b: Backend) {
    let s = Setup::new(b, &[]).await;
    let mut c = Client::connect(&s.url("/ws/chat?publish-broadcast")).await;
    let bad = Frame::message(vec![0xc3, 0x28], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(c.closed().await.map(|c| c.0), Some(1007));
}

async fn oversized_message_closes_with_1009(b: Backend) {
    let s = Setup::new(b, &[("max_message_size", "1024")]).await;
    let mut c = Client::connect(&s.url("/ws/chat?publish-broadcast")).await;
    c.ws.send(Message::binary(vec![7u8; 1025])).await.unwrap();
    assert_eq!(c.closed().await.map(|c| c.0), Some(1009));
    let mut c = Client::connect(&s.url("/ws/chat?publish-broadcast")).await;
    let first = Frame::message(vec![b'a'; 600], OpCode::Data(Data::Text), false);
    let last = Frame::message(vec![b'b'; 600], OpCode::Data(Data::Continue), true);
    c.ws.send(Message::Frame(first)).await.unwrap();
    c.ws.send(Message::Frame(last)).await.unwrap();
    assert_eq!(
        c.closed().await.map(|c| c.0),
        Some(1009),
        "the bound covers fragments"
    );
}

async fn slow_consumer_is_closed_and_others_keep_up(b: Backend) {
    let s = Setup::new(
        b,
        &[("queue_bytes", "131072"), ("max_message_size", "65536")],
    )
    .await;
    let mut slow = ready(&s, "feed", "subscribe-broadcast").await;
    let mut fast = ready(&s, "feed", "subscribe-broadcast").await;
    let message = "x".repeat(16 * 1024);
    const ROUNDS: usize = 40;
    const PER_ROUND: usize = 40;
    for round in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            s.publish("feed", To::Broadcast, &message, 0).await;
        }
        for i in 0..PER_ROUND {
            let got = fast.recv_text().await;
            assert_eq!(got.len(), message.len(), "round {round} message {i}");
        }
    }
    let stats = loop {
        let (_, body) = s.gw.health().await;
        if body["slow_consumer_closes"].as_u64() >= Some(1) {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        stats["slow_consumer_closes"], 1,
        "only the slow socket: {stats}"
    );
    // The slow socket ends: with Close 4000 when the frame could still be written,
    // otherwise by the transport ending once its buffered data is read.
    let end = slow.closed().await;
    assert!(matches!(end, None | Some((4000, _))), "{end:?}");
}

async fn stop_closes_sockets_with_1001(b: Backend) {
    let mut s = Setup::new(b, &[]).await;
    let mut one = ready(&s, "chat", "subscribe-broadcast").await;
    let mut two = ready(&s, "chat", "subscribe-broadcast").await;
    let status = s.gw.stop();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        one.closed().await,
        Some((1001, "server shutting down".into()))
    );
    assert_eq!(two.closed().await.map(|c| c.0), Some(1001));
}
