//! Running the gateway as a service: systemd units, readiness notification, metrics,
//! readiness during a drain.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use crate::harness::{http, metric, Client, Gateway, RedisServer, TempDir, WAIT};

pub async fn metrics(gw: &Gateway) -> String {
    let r = http(gw.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.head
    );
    r.body
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = TempDir::new("units");
    for (unit, name) in [
        ("wsrelay.service", "wsrelay.service"),
        ("wsrelay@.service", "wsrelay@8080.service"),
    ] {
        let shipped =
            std::fs::read_to_string(format!("{}/systemd/{unit}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        assert!(shipped.contains("ExecStart=wsrelay "), "{unit}");
        // Verify the shipped unit with the binary just built in place of the installed one.
        let derived = shipped.replace(
            "ExecStart=wsrelay ",
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_wsrelay")),
        );
        let path = dir.join(name);
        std::fs::write(&path, derived).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect(
                "systemd-analyze (Debian package systemd) must be installed; .ci/run installs it",
            );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{unit}: {stderr}"
        );
        for required in [
            "Type=notify",
            "Restart=on-failure",
            "LimitNOFILE=131072",
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "EnvironmentFile=",
            "TimeoutStopSec=30",
        ] {
            assert!(shipped.contains(required), "{unit} lacks {required:?}");
        }
    }
}

#[tokio::test]
async fn readiness_and_stop_are_notified_to_the_service_manager() {
    let dir = TempDir::new("notify");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let notify = path.to_string_lossy().to_string();
    let mut gw = Gateway::start_process(&[], &[("NOTIFY_SOCKET", &notify)]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 in time");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means serving: a socket opens at once.
    Client::connect(&gw.ws_url("/ws/chat?subscribe-broadcast")).await;
    gw.terminate();
    let n = socket.recv(&mut buf).expect("STOPPING=1 in time");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(gw.wait_exit().success());
}

#[tokio::test]
async fn a_drain_reports_not_ready_refuses_new_sockets_and_closes_the_rest() {
    let mut gw = Gateway::start(&[("drain_window", "1.5")]);
    let r = http(gw.addr, "GET", "/ready", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready"));
    // Each socket closes at its own point of the window; with twenty, the listener
    // stays up long enough to watch the drain.
    let mut open = Vec::new();
    for _ in 0..20 {
        open.push(Client::connect(&gw.ws_url("/ws/chat?subscribe-broadcast")).await);
    }
    gw.terminate();
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let r = http(gw.addr, "GET", "/ready", &[], "").await;
        if r.status == 503 {
            break r.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reported draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(body, "draining: the gateway is stopping");
    let refused = Client::try_connect(&gw.ws_url("/ws/chat"), &[]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a socket opened during the drain"),
    }
    for mut socket in open {
        assert_eq!(
            socket.closed().await,
            Some((1001, "server shutting down".into()))
        );
    }
    assert!(gw.wait_exit().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sockets_handshakes_deliveries_and_the_redis_link() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let gw = Gateway::start(&[("redis__url", &url)]);
    gw.wait_health(200).await;
    redis.publish("broadcast:m", b"ready", 60).await;
    let mut a = Client::connect(&gw.ws_url("/ws/m?subscribe-broadcast")).await;
    let mut b = Client::connect_with(
        &gw.ws_url("/ws/m?subscribe-broadcast&subscribe-session"),
        &[("Cookie", "sessionid=k")],
    )
    .await;
    assert_eq!(a.recv_text().await, "ready");
    assert_eq!(b.recv_text().await, "ready");
    let refused = http(
        gw.addr,
        "GET",
        "/ws/m",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", "https://evil.example"),
        ],
        "",
    )
    .await;
    assert_eq!(refused.status, 403);
    for i in 0..3 {
        redis
            .publish("broadcast:m", format!("m{i}").as_bytes(), 0)
            .await;
    }
    for i in 0..3 {
        assert_eq!(a.recv_text().await, format!("m{i}"));
        assert_eq!(b.recv_text().await, format!("m{i}"));
    }
    let api = gw.api_publish(serde_json::json!({"facility": "m", "audiences": {"broadcast": true}, "message": "api"})).await;
    assert_eq!(api.status, 200);
    assert_eq!(a.recv_text().await, "api");
    assert_eq!(b.recv_text().await, "api");

    let text = metrics(&gw).await;
    assert_eq!(metric(&text, "wsrelay_sockets"), 2.0);
    assert_eq!(
        metric(&text, "wsrelay_sockets_by_audience{audience=\"broadcast\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "wsrelay_sockets_by_audience{audience=\"session\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "wsrelay_handshakes_total{result=\"accepted\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "wsrelay_handshakes_total{result=\"origin\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "wsrelay_broker_messages_total"),
        4.0,
        "3 from redis-cli + 1 from the API"
    );
    // 2 stored + 2 × 4 live frames.
    assert_eq!(metric(&text, "wsrelay_frames_delivered_total"), 10.0);
    assert_eq!(
        metric(&text, "wsrelay_bytes_out_total"),
        2.0 * 5.0 + 2.0 * (3.0 * 2.0 + 3.0)
    );
    assert_eq!(
        metric(&text, "wsrelay_publish_api_requests_total{status=\"200\"}"),
        1.0
    );
    assert_eq!(metric(&text, "wsrelay_redis_connected"), 1.0);
    assert!(metric(&text, "wsrelay_delivery_latency_seconds_count") >= 2.0);

    redis.kill();
    gw.wait_health(503).await;
    assert_eq!(metric(&metrics(&gw).await, "wsrelay_redis_connected"), 0.0);
    redis.restart().await;
    gw.wait_health(200).await;
    let text = metrics(&gw).await;
    assert_eq!(metric(&text, "wsrelay_redis_connected"), 1.0);
    assert_eq!(metric(&text, "wsrelay_redis_reconnects_total"), 1.0);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_keep_flowing_while_a_drain_closes_sockets() {
    use tokio_tungstenite::tungstenite::Message;
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut gw = Gateway::start(&[("redis__url", &url), ("drain_window", "3")]);
    gw.wait_health(200).await;
    redis.publish("broadcast:d", b"ready", 60).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut c = Client::connect(&gw.ws_url("/ws/d?subscribe-broadcast")).await;
        assert_eq!(c.recv_text().await, "ready");
        clients.push(c);
    }
    gw.terminate();
    let deadline = tokio::time::Instant::now() + WAIT;
    while http(gw.addr, "GET", "/ready", &[], "").await.status != 503 {
        assert!(tokio::time::Instant::now() < deadline, "never drained");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.publish("broadcast:d", b"during the drain", 0).await;
    // Each socket closes at its own point of the 3 s window: those still open get the
    // publication first (a stopped subscriber would leave them all with only the close).
    let mut delivered = 0;
    for mut c in clients {
        match c.next().await {
            Message::Text(t) if t.as_str() == "during the drain" => {
                delivered += 1;
                assert_eq!(c.closed().await.map(|c| c.0), Some(1001));
            }
            Message::Close(frame) => assert_eq!(frame.map(|f| u16::from(f.code)), Some(1001)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        delivered >= 1,
        "no socket got the publication made during the drain"
    );
    assert!(gw.wait_exit().success());
}
