//! The access policy with its safe defaults, the Origin check and the limits.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{http, Client, Gateway};

use crate::harness::UPGRADE;

async fn handshake(gw: &Gateway, path: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let headers = [UPGRADE.as_slice(), extra].concat();
    let r = http(gw.addr, "GET", path, &headers, "").await;
    (r.status, r.body)
}

#[tokio::test]
async fn by_default_clients_may_subscribe_but_not_publish() {
    let gw = Gateway::start(&[("policy__compat", "false")]);
    assert_eq!(
        handshake(&gw, "/ws/chat?subscribe-broadcast&subscribe-session", &[])
            .await
            .0,
        101
    );
    for flag in [
        "publish-broadcast",
        "publish-user",
        "publish-group",
        "publish-session",
    ] {
        let (status, body) = handshake(&gw, &format!("/ws/chat?{flag}"), &[]).await;
        assert_eq!(status, 403, "{flag}");
        assert_eq!(body, format!("{flag} is not allowed on facility chat"));
    }
    let (_, health) = gw.health().await;
    assert_eq!(health["counters"]["refused.policy"], 4, "{health}");
}

#[tokio::test]
async fn rules_from_the_config_file_open_and_close_facilities() {
    let toml = r#"
        [policy]
        compat = false

        [[policy.rules]]
        facility = "chat/*"
        who = "anyone"
        subscribe = ["broadcast"]
        publish = ["broadcast"]

        [[policy.rules]]
        facility = "private"
        who = "authenticated"

        [[policy.rules]]
        facility = "private"
        subscribe = []
    "#;
    let gw = Gateway::start_with_file(toml, &[("policy__compat", "false")]);
    assert_eq!(
        handshake(
            &gw,
            "/ws/chat/lobby?subscribe-broadcast&publish-broadcast",
            &[]
        )
        .await
        .0,
        101
    );
    let (status, body) = handshake(&gw, "/ws/chat/lobby?subscribe-session", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (
            403,
            "subscribe-session is not allowed on facility chat/lobby"
        )
    );
    // Anonymous on "private": the authenticated rule does not apply, the closed one does.
    let (status, body) = handshake(&gw, "/ws/private?subscribe-broadcast", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (
            403,
            "subscribe-broadcast is not allowed on facility private"
        )
    );
    // A publication through an allowed flag works end to end.
    let mut listener = Client::connect(&gw.ws_url("/ws/chat/lobby?subscribe-broadcast")).await;
    let mut talker = Client::connect(&gw.ws_url("/ws/chat/lobby?publish-broadcast")).await;
    talker.send_text("hi").await;
    assert_eq!(listener.recv_text().await, "hi");
}

#[tokio::test]
async fn cross_site_pages_are_refused_by_origin() {
    let gw = Gateway::start(&[]);
    let host = gw.addr.to_string();
    let own = format!("http://{host}");
    let path = "/ws/chat?subscribe-broadcast";
    assert_eq!(handshake(&gw, path, &[("Origin", &own)]).await.0, 101);
    assert_eq!(
        handshake(&gw, path, &[]).await.0,
        101,
        "no Origin: not a browser page"
    );
    let (status, body) = handshake(&gw, path, &[("Origin", "https://evil.example")]).await;
    assert_eq!(
        (status, body.as_str()),
        (
            403,
            "origin \"https://evil.example\" is not allowed (list it in policy.allowed_origins)"
        )
    );
    let listed = Gateway::start(&[(
        "policy__allowed_origins",
        "https://app.example,https://evil.example",
    )]);
    assert_eq!(
        handshake(&listed, path, &[("Origin", "https://evil.example")])
            .await
            .0,
        101
    );
    assert_eq!(
        handshake(&listed, path, &[("Origin", "https://other.example")])
            .await
            .0,
        403
    );
    let (_, health) = gw.health().await;
    assert_eq!(health["counters"]["refused.origin"], 1);
}

#[tokio::test]
async fn connections_per_address_are_limited_and_released() {
    let gw = Gateway::start(&[("policy__max_connections_per_ip", "2")]);
    let url = gw.ws_url("/ws/chat?subscribe-broadcast");
    let first = Client::connect(&url).await;
    let _second = Client::connect(&url).await;
    let (status, body) = handshake(&gw, "/ws/chat", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (429, "too many connections from 127.0.0.1")
    );
    first.close().await;
    // The slot frees when the socket's task ends.
    crate::harness::until_upgraded(gw.addr, "/ws/chat").await;
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_address() {
    let gw = Gateway::start(&[
        ("policy__max_connections_per_ip", "1"),
        ("policy__trusted_proxies", "127.0.0.1"),
    ]);
    let url = gw.ws_url("/ws/chat?subscribe-broadcast");
    let _a = Client::connect_with(&url, &[("X-Forwarded-For", "203.0.113.7")]).await;
    let _b = Client::connect_with(&url, &[("X-Forwarded-For", "203.0.113.8")]).await;
    let (status, body) = handshake(&gw, "/ws/chat", &[("X-Forwarded-For", "203.0.113.7")]).await;
    assert_eq!(
        (status, body.as_str()),
        (429, "too many connections from 203.0.113.7")
    );
    // Without the trusted proxy, the header is ignored and the peer address counts.
    let direct = Gateway::start(&[("policy__max_connections_per_ip", "1")]);
    let _c = Client::connect_with(
        &direct.ws_url("/ws/chat"),
        &[("X-Forwarded-For", "203.0.113.9")],
    )
    .await;
    let (status, _) = handshake(&direct, "/ws/chat", &[("X-Forwarded-For", "198.51.100.1")]).await;
    assert_eq!(status, 429);
}

#[tokio::test]
async fn oversized_cookies_and_slow_handshakes_are_refused() {
    let gw = Gateway::start(&[
        ("policy__max_cookie_bytes", "100"),
        ("policy__handshake_timeout", "0.3"),
    ]);
    let big = format!("sessionid={}", "a".repeat(200));
    let (status, body) = handshake(&gw, "/ws/chat", &[("Cookie", &big)]).await;
    assert_eq!(
        (status, body.as_str()),
        (431, "cookie header is larger than 100 bytes")
    );
    // A client that never finishes its request head is answered 408 and dropped.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"GET /ws/chat HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(crate::harness::WAIT, tcp.read_to_string(&mut reply))
        .await
        .expect("closed in time")
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
}

#[tokio::test]
async fn subscriptions_per_socket_are_bounded() {
    let gw = Gateway::start(&[("policy__max_subscriptions", "1")]);
    assert_eq!(
        handshake(
            &gw,
            "/ws/chat?subscribe-broadcast",
            &[("Cookie", "sessionid=k")]
        )
        .await
        .0,
        101
    );
    let (status, body) = handshake(
        &gw,
        "/ws/chat?subscribe-broadcast&subscribe-session",
        &[("Cookie", "sessionid=k")],
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (403, "too many subscriptions: 2 keys, at most 1")
    );
}

/// Waits until the gateway's log has a line containing `text`, and returns the log.
async fn log_until(gw: &Gateway, text: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + crate::harness::WAIT;
    loop {
        let log = gw.log();
        if log.iter().any(|l| l.contains(text)) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {text:?} in {log:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn refused_sockets_and_mistyped_flags_are_logged_ten_per_reason_and_minute() {
    let mut gw = Gateway::start_process(&[], &[]);
    let origin = [("Origin", "http://localhost:8000")];
    for _ in 0..15 {
        let (status, body) = handshake(&gw, "/ws/chat?subscribe-broadcast", &origin).await;
        assert_eq!(status, 403);
        assert!(body.contains("policy.allowed_origins"), "{body}");
    }
    // A mistyped flag does not refuse the socket (as in ws4redis), but is logged and
    // counted.
    let (status, _) = handshake(&gw, "/ws/chat?subscribe-braodcast", &[]).await;
    assert_eq!(status, 101);
    let metrics = http(gw.addr, "GET", "/metrics", &[], "").await.body;
    assert_eq!(
        crate::harness::metric(&metrics, "wsrelay_unknown_flags_total"),
        1.0
    );
    // A refusal for another reason is logged after the others: once it is read, so is
    // every line before it.
    let (status, body) = handshake(&gw, "/ws/a%3Ab?subscribe-broadcast", &[]).await;
    assert_eq!(status, 400, "{body}");
    let log = log_until(&gw, "socket refused (bad_request)").await;
    let refused: Vec<_> = log
        .iter()
        .filter(|l| l.contains("socket refused (origin)"))
        .collect();
    assert_eq!(refused.len(), 10, "{log:#?}");
    let line = refused[0];
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("from 127.0.0.1"), "{line}");
    assert!(line.contains("for facility \"chat\""), "{line}");
    assert!(
        line.contains(
            "\"http://localhost:8000\" is not allowed (list it in policy.allowed_origins)"
        ),
        "{line}"
    );
    assert!(
        log.iter().any(|l| l.contains(" INFO ")
            && l.contains("for facility \"chat\" names an unknown flag \"subscribe-braodcast\"")),
        "{log:#?}"
    );
    // The summary of the other five comes when the minute is over (see the unit tests
    // of `ratelog`).
    assert!(!log.iter().any(|l| l.contains("more refused")), "{log:#?}");
    gw.terminate();
    assert!(gw.wait_exit().success());
}
