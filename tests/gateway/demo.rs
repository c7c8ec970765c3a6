//! The demo page's "publish from the server" route, `POST /demo/publish`: the body and
//! the code of `POST /api/publish` without the token, limited to what the demo's own
//! sockets may publish (`demo/…` facilities; everybody, or the caller's own session).
//!
//! A socket is known to be subscribed once it has received a stored marker (as in
//! `wire`): the marker is published through the route itself, to the socket's session.

use serde_json::json;

use crate::harness::{http, Client, Gateway, HttpReply};
use crate::{on_both_brokers, Backend, Setup};

/// `POST /demo/publish` with `body`, as the page of a browser whose `sessionid` cookie
/// is `session` (none: no cookie).
async fn demo_publish(gw: &Gateway, session: Option<&str>, body: &str) -> HttpReply {
    let cookie = session.map(|s| format!("csrftoken=x; sessionid={s}"));
    let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", c.as_str())).collect();
    http(gw.addr, "POST", "/demo/publish", &headers, body).await
}

/// The keys a successful publish answer names.
fn keys(reply: &HttpReply) -> Vec<String> {
    let answer: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    serde_json::from_value(answer["keys"].clone()).unwrap()
}

/// Connects to `/ws/{facility}?{query}&subscribe-session` as the browser of `session`
/// and returns once its subscriptions are live.
async fn ready(s: &Setup, facility: &str, query: &str, session: &str) -> Client {
    let marker = json!({
        "facility": facility, "audiences": {"sessions": [session]}, "message": "ready", "expire": 60,
    });
    let r = demo_publish(&s.gw, Some(session), &marker.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let url = s.url(&format!("/ws/{facility}?{query}&subscribe-session"));
    let cookie = format!("sessionid={session}");
    let mut c = Client::connect_with(&url, &[("Cookie", &cookie)]).await;
    while c.recv_text().await != "ready" {}
    c
}

on_both_brokers!(the_demo_publishes_from_the_server_to_everybody_and_to_its_own_session);

async fn the_demo_publishes_from_the_server_to_everybody_and_to_its_own_session(b: Backend) {
    // With Redis the demo is off unless asked for.
    let s = Setup::new(b, &[("demo", "true")]).await;
    let mut everybody = ready(&s, "demo/chat", "subscribe-broadcast", "browsera").await;
    let mut mine = ready(&s, "demo/notify", "subscribe-broadcast", "browsera").await;
    let mut theirs = ready(&s, "demo/notify", "subscribe-broadcast", "browserb").await;

    // Everybody on demo/chat, stored for late joiners: no token, the API's answer.
    let r = demo_publish(
        &s.gw,
        Some("browsera"),
        r#"{"facility": "demo/chat", "audiences": {"broadcast": true},
            "message": "hello from the server", "expire": 3600}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(keys(&r), ["broadcast:demo/chat"]);
    assert_eq!(everybody.recv_text().await, "hello from the server");

    // Only this browser's session on demo/notify; a JSON message as the API sends it.
    let r = demo_publish(
        &s.gw,
        Some("browsera"),
        r#"{"facility": "demo/notify", "audiences": {"sessions": ["browsera"]},
            "message": {"text": "for browser a only"}, "expire": 0}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(keys(&r), ["session:browsera:demo/notify"]);
    assert_eq!(mine.recv_text().await, r#"{"text":"for browser a only"}"#);
    // The other browser's first message is its own: it never saw browser a's.
    let r = demo_publish(
        &s.gw,
        Some("browserb"),
        r#"{"facility": "demo/notify", "audiences": {"sessions": ["browserb"]},
            "message": "for browser b only", "expire": 0}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(theirs.recv_text().await, "for browser b only");

    // A late joiner gets the stored message first.
    let mut late = Client::connect(&s.url("/ws/demo/chat?subscribe-broadcast")).await;
    assert_eq!(late.recv_text().await, "hello from the server");
    if let Some(redis) = &s.redis {
        // Stored where ws4redis's publisher stores it: what `redis-cli` on the page shows.
        assert_eq!(
            redis.get("broadcast:demo/chat").await.as_deref(),
            Some(&b"hello from the server"[..])
        );
        // A notification with expire 0 is not stored: the marker is still there.
        assert_eq!(
            redis.get("session:browsera:demo/notify").await.as_deref(),
            Some(&b"ready"[..])
        );
    }
    for c in [everybody, mine, theirs, late] {
        c.close().await;
    }
}

#[tokio::test]
async fn the_demo_route_refuses_what_the_demo_sockets_could_not_publish() {
    let gw = Gateway::start(&[("max_message_size", "1000")]);
    for (session, body, status, reason) in [
        (
            Some("browsera"),
            r#"{"facility": "chat", "audiences": {"broadcast": true}, "message": "x"}"#,
            403,
            "the demo publishes only on demo/* facilities, not \"chat\"",
        ),
        (
            Some("browsera"),
            r#"{"facility": "demochat", "audiences": {"broadcast": true}, "message": "x"}"#,
            403,
            "only on demo/* facilities",
        ),
        (
            Some("browsera"),
            r#"{"facility": "demo/chat", "audiences": {"sessions": ["browserb"]}, "message": "x"}"#,
            403,
            "only to this browser's own session (its sessionid cookie)",
        ),
        (
            Some("browsera"),
            r#"{"facility": "demo/chat", "audiences": {"broadcast": true, "sessions": ["browsera", "browserb"]}, "message": "x"}"#,
            403,
            "only to this browser's own session",
        ),
        (
            None,
            r#"{"facility": "demo/notify", "audiences": {"sessions": ["browsera"]}, "message": "x"}"#,
            403,
            "no sessionid cookie",
        ),
        (
            Some("browsera"),
            r#"{"facility": "demo/chat", "audiences": {"users": ["jane"]}, "message": "x"}"#,
            403,
            "users and groups go through POST /api/publish",
        ),
        (
            Some("browsera"),
            r#"{"facility": "demo/chat", "audiences": {"groups": ["staff"]}, "message": "x"}"#,
            403,
            "users and groups go through POST /api/publish",
        ),
        // A session key is validated as at the handshake.
        (
            Some("a:b"),
            r#"{"facility": "demo/chat", "audiences": {"broadcast": true}, "message": "x"}"#,
            400,
            "session cookie: session key contains ':'",
        ),
        // The API's own checks still apply.
        (
            Some("browsera"),
            r#"{"facility": "demo/chat", "audiences": {}, "message": "x"}"#,
            400,
            "name at least one audience",
        ),
        (
            Some("browsera"),
            r#"{"facility": "demo/a:b", "audiences": {"broadcast": true}, "message": "x"}"#,
            400,
            "facility contains ':'",
        ),
        (Some("browsera"), "{not json", 400, "invalid JSON body"),
    ] {
        let r = demo_publish(&gw, session, body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.body.contains(reason), "{body}: {}", r.body);
        assert!(r.head.contains("text/plain"), "{}", r.head);
    }
    // The body is bounded as the API's is (here 6 × 1000 bytes + 64 KiB).
    let big = format!(
        r#"{{"facility": "demo/chat", "audiences": {{"broadcast": true}}, "message": "{}"}}"#,
        "x".repeat(80 * 1024)
    );
    let r = demo_publish(&gw, None, &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("larger than 71536 bytes"), "{}", r.body);
    let api = gw.api_publish(serde_json::from_str(&big).unwrap()).await;
    assert_eq!((api.status, api.body), (r.status, r.body));
    let long = format!(
        r#"{{"facility": "demo/chat", "audiences": {{"broadcast": true}}, "message": "{}"}}"#,
        "x".repeat(1001)
    );
    let r = demo_publish(&gw, None, &long).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("max_message_size"), "{}", r.body);
    // A page of another site may not use it: the sockets' Origin check applies.
    let body = r#"{"facility": "demo/chat", "audiences": {"broadcast": true}, "message": "x"}"#;
    let foreign = http(
        gw.addr,
        "POST",
        "/demo/publish",
        &[("Origin", "http://elsewhere.example")],
        body,
    )
    .await;
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    assert!(foreign.body.contains("is not allowed"), "{}", foreign.body);
    let own = format!("http://{}", gw.addr);
    let same = http(gw.addr, "POST", "/demo/publish", &[("Origin", &own)], body).await;
    assert_eq!(same.status, 200, "{}", same.body);
}

#[tokio::test]
async fn without_the_demo_there_is_no_demo_route() {
    let body = r#"{"facility": "demo/chat", "audiences": {"broadcast": true}, "message": "x"}"#;
    let off = Gateway::start(&[("demo", "false")]);
    let r = demo_publish(&off, Some("browsera"), body).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        http(off.addr, "GET", "/", &[], "").await.status,
        404,
        "the demo page"
    );
    // With Redis the demo is off by default.
    let s = Setup::new(Backend::Redis, &[]).await;
    let r = demo_publish(&s.gw, Some("browsera"), body).await;
    assert_eq!(r.status, 404, "{}", r.body);
}

/// The page has its panel, and every file it names is served: a browser's console
/// shows no 404.
#[tokio::test]
async fn the_demo_page_has_its_publish_panel_and_names_only_served_files() {
    let gw = Gateway::start(&[]);
    let page = http(gw.addr, "GET", "/", &[], "").await;
    assert_eq!(page.status, 200);
    for part in [
        "Publish from the server",
        "/demo/publish",
        "/api/publish",
        "redis-cli",
    ] {
        assert!(page.body.contains(part), "the page lacks {part:?}");
    }
    let mut named = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for rest in page.body.split(attribute).skip(1) {
            named.push(rest.split('"').next().unwrap().to_string());
        }
    }
    assert!(named.iter().any(|n| n == "/wsrelay.js"), "{named:?}");
    for name in named.iter().filter(|n| !n.starts_with("data:")) {
        assert!(name.starts_with('/'), "the page names another site: {name}");
        let r = http(gw.addr, "GET", name, &[], "").await;
        assert_eq!(r.status, 200, "{name}");
    }
}
