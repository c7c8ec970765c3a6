//! Server-Sent Events (`/sse/`), long-polling (`/poll/`) and publishing without a
//! socket (`POST /pub/`): their wire, ids and resume, and that each transport refuses
//! what a WebSocket refuses, with the same reason.

use serde_json::{json, Value};

use crate::harness::{http, metric, Client, EventStream, Gateway, RedisServer, UPGRADE};
use crate::{on_both_brokers, Backend};

const FACILITIES: &str = r#"
[[facility]]
pattern = "feed/*"
history = 50
history_ttl = 600
"#;

/// A gateway with the rules above, on `backend`.
async fn gateway(backend: Backend, settings: &[(&str, &str)]) -> (Gateway, Option<RedisServer>) {
    Gateway::on_backend(backend, FACILITIES, settings).await
}

async fn publish(gw: &Gateway, facility: &str, message: &str) -> Option<String> {
    gw.publish_broadcast(facility, message).await
}

/// A long-poll's answer: its status and, on 200, the JSON array.
async fn poll(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, Value, String) {
    let reply = http(gw.addr, "GET", path, headers, "").await;
    let body = match reply.status {
        200 => serde_json::from_str(&reply.body).unwrap(),
        _ => Value::Null,
    };
    (reply.status, body, reply.head + "\r\n\r\n" + &reply.body)
}

async fn event_stream_wire(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[("heartbeat_interval", "0.3")]).await;
    publish(&gw, "news", "stored before").await;
    let mut sse = EventStream::open(gw.addr, "/sse/news?subscribe-broadcast", &[]).await;
    assert_eq!(sse.status, 200, "{}", sse.head);
    assert_eq!(sse.header("content-type").unwrap(), "text/event-stream");
    assert_eq!(sse.header("cache-control").unwrap(), "no-cache");
    assert_eq!(sse.header("x-accel-buffering").unwrap(), "no");
    assert_eq!(sse.header("access-control-allow-origin"), None);
    let first = sse.next().await.unwrap();
    assert_eq!(first.retry, Some(2000), "retry comes first: {first:?}");
    sse.subscribed().await;
    let stored = sse.next_message().await;
    assert_eq!(stored.data.as_deref(), Some("stored before"));
    assert_eq!(stored.id, None, "no history on this facility");
    publish(&gw, "news", "two\nlines").await;
    let live = sse.next_message().await;
    assert_eq!(live.data.as_deref(), Some("two\nlines"));
    assert_eq!(live.event, None);
    // Heartbeats: comment lines while nothing else is written.
    loop {
        let event = sse.next().await.unwrap();
        if event.comment {
            assert_eq!(event.data, None);
            break;
        }
    }
    // A binary payload (from a WebSocket that publishes) arrives base64-encoded.
    let mut ws = Client::connect(&gw.ws_url("/ws/news?publish-broadcast")).await;
    ws.send_binary(vec![0xFF, 0x00, 0x01]).await;
    let binary = sse.next_message().await;
    assert_eq!(binary.event.as_deref(), Some("binary"));
    assert_eq!(binary.data.as_deref(), Some("/wAB"));
}

async fn event_stream_ids_and_resume(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[]).await;
    let first = publish(&gw, "feed/a", "m1").await.expect("an id");
    let mut sse = EventStream::open(gw.addr, "/sse/feed/a?subscribe-broadcast", &[]).await;
    sse.subscribed().await;
    let stored = sse.next_message().await;
    assert_eq!(stored.id, Some(format!("broadcast:{first}")));
    drop(sse);
    for m in ["m2", "m3", "m4"] {
        publish(&gw, "feed/a", m).await;
    }
    // As the browser reconnects by itself: the Last-Event-ID header.
    let last = format!("broadcast:{first}");
    let mut sse = EventStream::open(
        gw.addr,
        "/sse/feed/a?subscribe-broadcast",
        &[("Last-Event-ID", &last)],
    )
    .await;
    sse.subscribed().await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sse.next_message().await.data.unwrap());
    }
    assert_eq!(
        got,
        ["m2", "m3", "m4"],
        "missed messages replayed in order, once"
    );
    let resumed = sse.next_data().await.control().unwrap();
    assert_eq!(
        resumed,
        json!({"type": "resumed", "key": "broadcast", "count": 3})
    );
    // The query parameter for a first connection; the header wins over it.
    let query = format!("/sse/feed/a?subscribe-broadcast&lastEventId={last}");
    let mut sse = EventStream::open(gw.addr, &query, &[]).await;
    sse.subscribed().await;
    let m2 = sse.next_message().await;
    assert_eq!(m2.data.as_deref(), Some("m2"));
    let m2 = m2.id.unwrap();
    // Both: the header (the browser's own reconnect) wins over the page's query.
    let mut sse = EventStream::open(gw.addr, &query, &[("Last-Event-ID", m2.as_str())]).await;
    sse.subscribed().await;
    assert_eq!(sse.next_message().await.data.unwrap(), "m3");
}

async fn long_poll_wire(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[("poll_timeout", "0.5")]).await;
    publish(&gw, "news", "stored").await;
    let (status, answer, raw) = poll(&gw, "/poll/news?subscribe-broadcast", &[]).await;
    assert_eq!(status, 200, "{raw}");
    assert!(raw.contains("content-type: application/json"), "{raw}");
    assert!(raw.contains("cache-control: no-store"), "{raw}");
    let stored = &answer[0];
    assert_eq!(stored["data"], "stored");
    assert_eq!(stored["stored"], true);
    assert_eq!(stored["key"], "broadcast");
    let id = stored["id"].as_str().unwrap().to_string();
    assert!(
        id.starts_with('~'),
        "a key without history names its stored message: {id}"
    );
    // Seen: nothing newer, so the poll waits out its timeout and answers [].
    let since = format!("/poll/news?subscribe-broadcast&since=broadcast:{id}");
    let (status, answer, _) = poll(&gw, &since, &[]).await;
    assert_eq!((status, answer), (200, json!([])));
    // A publication while the poll waits answers it (published until it does: the
    // answer is the marker that the poll was subscribed).
    let waiting = poll(&gw, &since, &[]);
    tokio::pin!(waiting);
    let answer = loop {
        publish(&gw, "news", "live").await;
        tokio::select! {
            answer = &mut waiting => break answer,
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
    };
    assert_eq!(answer.0, 200);
    let live = &answer.1[0];
    assert_eq!(live["data"], "live", "{}", answer.1);
}

async fn long_poll_history(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[("poll_timeout", "0.5")]).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for m in ["a", "b", "c"] {
            ids.push(publish(&gw, "feed/p", m).await.unwrap());
        }
        ids
    };
    let path = format!(
        "/poll/feed/p?subscribe-broadcast&since=broadcast:{}",
        ids[0]
    );
    let (_, answer, _) = poll(&gw, &path, &[]).await;
    let data: Vec<&str> = answer
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "message")
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, ["b", "c"], "{answer}");
    let last = answer
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["type"] == "message")
        .unwrap();
    assert_eq!(last["id"], ids[2].as_str());
    let path = format!(
        "/poll/feed/p?subscribe-broadcast&since=broadcast:{}",
        ids[2]
    );
    assert_eq!(poll(&gw, &path, &[]).await.1, json!([]));
}

on_both_brokers!(
    event_stream_wire,
    event_stream_ids_and_resume,
    long_poll_wire,
    long_poll_history
);

/// Any gateway process answers any poll: the client's position travels in `since`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_gateway_answers_any_poll() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let settings = [("redis__url", url.as_str()), ("poll_timeout", "0.5")];
    let a = Gateway::start_with_file(FACILITIES, &settings);
    let b = Gateway::start_with_file(FACILITIES, &settings);
    a.wait_health(200).await;
    b.wait_health(200).await;
    let first = publish(&a, "feed/x", "one").await.unwrap();
    publish(&a, "feed/x", "two").await;
    let path = format!("/poll/feed/x?subscribe-broadcast&since=broadcast:{first}");
    let (_, answer, _) = poll(&b, &path, &[]).await;
    assert_eq!(answer[0]["data"], "two", "{answer}");
}

/// Every transport refuses what a WebSocket refuses, with the same status and reason.
#[tokio::test]
async fn each_transport_refuses_what_a_websocket_refuses() {
    let toml = r#"
        [policy]
        compat = false
        [[policy.rules]]
        facility = "open"
        subscribe = ["broadcast"]
        publish = ["broadcast"]
        [[policy.rules]]
        facility = "closed"
        subscribe = []
        [[policy.rules]]
        facility = "mine"
        subscribe = ["user"]
    "#;
    let gw = Gateway::start_with_file(toml, &[("policy__compat", "false")]);
    let foreign = [("Origin", "http://elsewhere.example")];
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("closed?subscribe-broadcast", &[]),
        ("open?subscribe-session", &[]),
        ("open?subscribe-broadcast", &foreign),
        ("bad%FFname?subscribe-broadcast", &[]),
        ("open?subscribe-broadcast&subscribe-user", &[]),
    ];
    for (rest, headers) in cases {
        let mut ws_headers = UPGRADE.to_vec();
        ws_headers.extend_from_slice(headers);
        let ws = http(gw.addr, "GET", &format!("/ws/{rest}"), &ws_headers, "").await;
        assert_ne!(ws.status, 101, "{rest}");
        let mut sse = EventStream::open(gw.addr, &format!("/sse/{rest}"), headers).await;
        let sse_body = sse.body().await;
        assert_eq!(
            (sse.status, sse_body.as_str()),
            (ws.status, ws.body.as_str()),
            "{rest}"
        );
        let polled = http(gw.addr, "GET", &format!("/poll/{rest}"), headers, "").await;
        assert_eq!(
            (polled.status, &polled.body),
            (ws.status, &ws.body),
            "{rest}"
        );
    }
    // Publishing: the same rules as the WebSocket's publish flags.
    let pubs: [(&str, &[(&str, &str)]); 3] = [
        ("closed?publish-broadcast", &[]),
        ("open?publish-session", &[]),
        ("open?publish-broadcast", &foreign),
    ];
    for (rest, headers) in pubs {
        let mut ws_headers = UPGRADE.to_vec();
        ws_headers.extend_from_slice(headers);
        let ws = http(gw.addr, "GET", &format!("/ws/{rest}"), &ws_headers, "").await;
        let posted = http(gw.addr, "POST", &format!("/pub/{rest}"), headers, "m").await;
        assert_eq!(
            (posted.status, &posted.body),
            (ws.status, &ws.body),
            "{rest}"
        );
    }
    // What only a receiving transport refuses: nothing to listen to, publish flags.
    for path in ["/poll/open", "/sse/mine?subscribe-user"] {
        let refused = http(gw.addr, "GET", path, &[], "").await;
        assert_eq!(refused.status, 403, "{path}");
        assert!(
            refused.body.starts_with("nothing to listen to"),
            "{}",
            refused.body
        );
    }
    let (status, _, raw) = poll(&gw, "/poll/open?subscribe-broadcast&publish-broadcast", &[]).await;
    assert_eq!(status, 400, "{raw}");
    assert!(
        raw.contains("publish flags are for WebSocket sockets"),
        "{raw}"
    );
    let mut sse = EventStream::open(
        gw.addr,
        "/sse/open?subscribe-broadcast&lastEventId=broadcast:x",
        &[],
    )
    .await;
    assert_eq!(sse.status, 400);
    assert!(sse.body().await.contains("lastEventId"));
    let posted = http(gw.addr, "POST", "/pub/open?subscribe-broadcast", &[], "m").await;
    assert_eq!(posted.status, 400, "{}", posted.body);
}

/// Pages of an allowed origin read the answers (CORS with credentials); others do not.
#[tokio::test]
async fn cors_answers_only_allowed_origins() {
    let gw = Gateway::start(&[("policy__allowed_origins", "https://app.example")]);
    let allowed = [("Origin", "https://app.example")];
    let sse = EventStream::open(gw.addr, "/sse/c?subscribe-broadcast", &allowed).await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.header("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    assert_eq!(
        sse.header("access-control-allow-credentials").unwrap(),
        "true"
    );
    let pre = http(gw.addr, "OPTIONS", "/pub/c?publish-broadcast", &allowed, "").await;
    assert_eq!(pre.status, 204, "{}", pre.body);
    assert!(pre
        .head
        .contains("access-control-allow-origin: https://app.example"));
    assert!(pre.head.contains("access-control-allow-methods: POST"));
    let posted = http(gw.addr, "POST", "/pub/c?publish-broadcast", &allowed, "hi").await;
    assert_eq!(posted.status, 200, "{}", posted.body);
    assert!(posted
        .head
        .contains("access-control-allow-credentials: true"));
    let foreign = [("Origin", "https://evil.example")];
    let pre = http(gw.addr, "OPTIONS", "/pub/c?publish-broadcast", &foreign, "").await;
    assert_eq!(pre.status, 403);
    assert!(!pre.head.contains("access-control-allow-origin"));
    let mut sse = EventStream::open(gw.addr, "/sse/c?subscribe-broadcast", &foreign).await;
    assert_eq!(sse.status, 403);
    assert!(!sse.head.contains("access-control-allow-origin"));
    assert!(sse.body().await.contains("not allowed"));
}

/// `POST /pub/` reaches WebSocket and event-stream subscribers alike; its body is
/// bounded by `max_message_size`.
#[tokio::test]
async fn pages_publish_without_a_socket() {
    let gw = Gateway::start(&[("max_message_size", "1024")]);
    let mut ws = Client::connect(&gw.ws_url("/ws/room?subscribe-broadcast")).await;
    let mut sse = EventStream::open(gw.addr, "/sse/room?subscribe-broadcast", &[]).await;
    sse.subscribed().await;
    let posted = http(
        gw.addr,
        "POST",
        "/pub/room?publish-broadcast",
        &[],
        "hello all",
    )
    .await;
    assert_eq!(posted.status, 200, "{}", posted.body);
    assert_eq!(
        serde_json::from_str::<Value>(&posted.body).unwrap(),
        json!({"ids": [null]})
    );
    assert_eq!(ws.recv_text().await, "hello all");
    assert_eq!(sse.next_message().await.data.unwrap(), "hello all");
    let text = http(gw.addr, "GET", "/metrics", &[], "").await.body;
    let by = |transport: &str| {
        metric(
            &text,
            &format!("wsrelay_sockets_by_transport{{transport=\"{transport}\"}}"),
        )
    };
    assert_eq!((by("websocket"), by("sse")), (1.0, 1.0), "{text}");
    assert_eq!(metric(&text, "wsrelay_sockets"), 2.0);
    let big = "x".repeat(1025);
    let posted = http(gw.addr, "POST", "/pub/room?publish-broadcast", &[], &big).await;
    assert_eq!(posted.status, 413, "{}", posted.body);
}

/// An event stream that does not read is a slow consumer like a WebSocket: closed,
/// with the reason as its last event.
#[tokio::test]
async fn a_stream_that_does_not_read_is_closed_as_a_slow_consumer() {
    let gw = Gateway::start(&[("queue_bytes", "65536")]);
    let mut sse = EventStream::open(gw.addr, "/sse/flood?subscribe-broadcast", &[]).await;
    sse.subscribed().await;
    let big = "y".repeat(60_000);
    let mut ws = Client::connect(&gw.ws_url("/ws/flood?publish-broadcast")).await;
    // Far more than the kernel buffers and queue_bytes together.
    for _ in 0..400 {
        ws.send_text(&big).await;
    }
    let mut close = None;
    while let Some(event) = sse.next().await {
        if let Some(control) = event.control() {
            if control["type"] == "close" {
                close = Some(control);
            }
        }
    }
    let close = close.expect("a close event before the end of the stream");
    assert_eq!(close["code"], 4000, "{close}");
}

/// `EventSource` gives up for good on any status but 200: a refusal that passes (the
/// gateway full or stopping) is an empty stream that tells it when to come back.
#[tokio::test]
async fn a_passing_refusal_tells_an_event_stream_to_come_back() {
    let gw = Gateway::start(&[
        ("max_sockets", "1"),
        ("policy__allowed_origins", "https://app.example"),
    ]);
    let _ws = Client::connect(&gw.ws_url("/ws/full?subscribe-broadcast")).await;
    let refused = http(gw.addr, "GET", "/ws/full?subscribe-broadcast", &UPGRADE, "").await;
    assert_eq!(refused.status, 503);
    let allowed = [("Origin", "https://app.example")];
    let mut sse = EventStream::open(gw.addr, "/sse/full?subscribe-broadcast", &allowed).await;
    assert_eq!(sse.status, 200, "{}", sse.head);
    // A cross-origin page that could not read it would give up as well.
    assert_eq!(
        sse.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let retry = sse.next().await.unwrap().retry.unwrap();
    assert!((2000..10000).contains(&retry), "{retry}");
    let close = sse.next_data().await.control().unwrap();
    assert_eq!(close["code"], 1013, "{close}");
    assert_eq!(close["reason"], refused.body.as_str());
    assert!(sse.next().await.is_none(), "the stream ends");
    // A refusal that does not pass keeps its status: the page must not come back.
    let sse = EventStream::open(gw.addr, "/sse/bad%FF?subscribe-broadcast", &[]).await;
    assert_eq!(sse.status, 400);
}

/// A request body is never read as a request of its own, even when the gateway answered
/// before reading it (a refusal): it cannot smuggle in an event stream or a long-poll.
#[tokio::test]
async fn a_body_is_not_taken_for_a_stream_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start(&[]);
    let inner = format!(
        "GET /poll/c?subscribe-broadcast HTTP/1.1\r\nHost: {}\r\n\r\n",
        gw.addr
    );
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /pub/c?subscribe-broadcast HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
        gw.addr,
        inner.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tcp.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    tcp.write_all(inner.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(crate::harness::WAIT, tcp.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(read.is_ok(), "the connection ends");
    assert!(
        !rest.contains("application/json"),
        "the body was served as a poll: {rest}"
    );
}

/// A long-poll never answers with what the client has: on a key without history, a live
/// copy of the message its `since` names (still on its way, or published again) is no
/// news, and the poll waits on.
async fn a_poll_does_not_repeat_what_the_client_has(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[("poll_timeout", "0.5")]).await;
    publish(&gw, "same", "unchanged").await;
    let (_, answer, _) = poll(&gw, "/poll/same?subscribe-broadcast", &[]).await;
    let id = answer[0]["id"].as_str().unwrap().to_string();
    let since = format!("/poll/same?subscribe-broadcast&since=broadcast:{id}");
    let waiting = poll(&gw, &since, &[]);
    tokio::pin!(waiting);
    let answer = loop {
        publish(&gw, "same", "unchanged").await;
        tokio::select! {
            answer = &mut waiting => break answer,
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
        }
    };
    assert_eq!(answer.1, json!([]), "the client had it: {}", answer.2);
}

on_both_brokers!(a_poll_does_not_repeat_what_the_client_has);
