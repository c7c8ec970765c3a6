//! What only exists with Redis: exact key names, identity records, one subscriber
//! connection for many sockets, outages, and the Rust publisher.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use wsrelay::channel::Audience;
use wsrelay::publisher::{Recipients, RedisPublisher};

use crate::harness::{Client, Gateway, RedisServer, WAIT};

/// A Redis and a gateway on it, with extra settings.
async fn start(settings: &[(&str, &str)]) -> (RedisServer, Gateway) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut all = settings.to_vec();
    all.push(("redis__url", &url));
    let gw = Gateway::start(&all);
    gw.wait_health(200).await;
    (redis, gw)
}

/// Stores `marker` on `key`, connects, and waits for it: the subscriptions are live.
async fn ready_on(
    redis: &RedisServer,
    gw: &Gateway,
    key: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Client {
    redis.publish(key, b"ready", 60).await;
    let mut c = Client::connect_with(&gw.ws_url(path), headers).await;
    assert_eq!(c.recv_text().await, "ready");
    c
}

async fn wait_numsub(redis: &RedisServer, key: &str, want: i64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n = redis.numsub(key).await;
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NUMSUB {key} stayed {n}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_carry_the_configured_prefix() {
    let (redis, gw) = start(&[("redis__prefix", "app")]).await;
    let mut c = ready_on(
        &redis,
        &gw,
        "app:broadcast:chat",
        "/ws/chat?subscribe-broadcast",
        &[],
    )
    .await;
    redis.publish("broadcast:chat", b"unprefixed", 0).await;
    redis.publish("app:broadcast:chat", b"prefixed", 0).await;
    assert_eq!(c.recv_text().await, "prefixed");
    let mut talker = Client::connect(&gw.ws_url("/ws/chat?publish-broadcast")).await;
    talker.send_text("stored").await;
    assert_eq!(c.recv_text().await, "stored");
    assert_eq!(
        redis.get("app:broadcast:chat").await.as_deref(),
        Some(&b"stored"[..])
    );
    assert_eq!(redis.get("broadcast:chat").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_records_give_user_group_and_session_audiences() {
    let (redis, gw) = start(&[]).await;
    let publisher = RedisPublisher::connect(&redis.url(), None).await.unwrap();
    publisher
        .set_identity("k1", Some("jane"), &["staff", "ops"], 60)
        .await
        .unwrap();
    let cookie = [("Cookie", "sessionid=k1")];
    let query = "/ws/chat?subscribe-user&subscribe-group&subscribe-session";
    let mut jane = ready_on(&redis, &gw, "session:k1:chat", query, &cookie).await;
    for key in [
        "user:jane:chat",
        "group:staff:chat",
        "group:ops:chat",
        "session:k1:chat",
    ] {
        redis.publish(key, key.as_bytes(), 0).await;
        assert_eq!(jane.recv_text().await, key);
    }
    // A session without a record: session audience only, user and group skipped.
    let mut anon = ready_on(
        &redis,
        &gw,
        "session:k2:chat",
        query,
        &[("Cookie", "sessionid=k2")],
    )
    .await;
    redis.publish("group:staff:chat", b"staff only", 0).await;
    redis.publish("session:k2:chat", b"k2 only", 0).await;
    assert_eq!(anon.recv_text().await, "k2 only");
    assert_eq!(jane.recv_text().await, "staff only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_flags_write_the_exact_keys() {
    let (redis, gw) = start(&[("redis__expire", "120")]).await;
    let publisher = RedisPublisher::connect(&redis.url(), None).await.unwrap();
    publisher
        .set_identity("k1", Some("jane"), &["staff"], 60)
        .await
        .unwrap();
    let mut c = ready_on(
        &redis,
        &gw,
        "broadcast:news",
        "/ws/news?subscribe-broadcast&publish-broadcast&publish-user&publish-group&publish-session",
        &[("Cookie", "sessionid=k1")],
    )
    .await;
    c.send_text("everywhere").await;
    // The stored value on every key proves the publication happened; wait for the last.
    let keys = [
        "broadcast:news",
        "user:jane:news",
        "group:staff:news",
        "session:k1:news",
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    for key in keys {
        while redis.get(key).await.as_deref() != Some(&b"everywhere"[..]) {
            assert!(tokio::time::Instant::now() < deadline, "{key} not written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ttl: i64 = redis::cmd("TTL")
            .arg(key)
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        assert!((1..=120).contains(&ttl), "{key} ttl {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_payloads_that_are_not_utf8_go_out_as_binary() {
    let (redis, gw) = start(&[]).await;
    let mut c = ready_on(
        &redis,
        &gw,
        "broadcast:bin",
        "/ws/bin?subscribe-broadcast",
        &[],
    )
    .await;
    redis.publish("broadcast:bin", &[0x00, 0xff, 0x10], 0).await;
    assert_eq!(c.next().await, Message::binary(vec![0x00, 0xff, 0x10]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sockets_share_one_subscriber_connection() {
    let (redis, gw) = start(&[]).await;
    redis.publish("broadcast:crowd", b"ready", 60).await;
    let url = gw.ws_url("/ws/crowd?subscribe-broadcast");
    let mut clients = Vec::new();
    for _ in 0..1000 {
        let mut c = Client::connect(&url).await;
        assert_eq!(c.recv_text().await, "ready");
        clients.push(c);
    }
    assert_eq!(redis.numsub("broadcast:crowd").await, 1);
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let subscribers = list.lines().filter(|l| !l.contains(" sub=0 ")).count();
    assert_eq!(subscribers, 1, "one pub/sub connection:\n{list}");
    let all = list.lines().filter(|l| !l.contains("cmd=client")).count();
    assert!(
        all <= 3,
        "one command + one pub/sub connection (+ this test's):\n{list}"
    );

    redis.publish("broadcast:crowd", b"to all", 0).await;
    for c in clients.iter_mut() {
        assert_eq!(c.recv_text().await, "to all");
    }
    for c in clients {
        c.close().await;
    }
    wait_numsub(&redis, "broadcast:crowd", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_survive_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    // A process of its own: the test reads its log.
    let gw = Gateway::start_process(&[("redis__url", &redis.url())], &[]);
    gw.wait_health(200).await;
    let mut c = ready_on(
        &redis,
        &gw,
        "broadcast:chat",
        "/ws/chat?subscribe-broadcast",
        &[],
    )
    .await;
    redis.kill();
    let down = gw.wait_health(503).await;
    assert!(
        down["reason"].as_str().unwrap_or("").contains("redis"),
        "{down}"
    );
    redis.restart().await;
    gw.wait_health(200).await;
    // Resubscribed: a publication after the restart reaches the socket opened before it.
    wait_numsub(&redis, "broadcast:chat", 1).await;
    redis.publish("broadcast:chat", b"after restart", 0).await;
    assert_eq!(c.recv_text().await, "after restart");
    let log = gw.log().join("\n");
    assert_eq!(
        log.matches("pub/sub link lost").count(),
        1,
        "logged once:\n{log}"
    );
}

/// Threads that keep every core busy until dropped (at most `limit`), as a loaded
/// machine would.
struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start(threads: usize, limit: Duration) -> Busy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let started = std::time::Instant::now();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// `/ready`'s status, asked now.
async fn ready_status(gw: &Gateway) -> u16 {
    crate::harness::http(gw.addr, "GET", "/ready", &[], "")
        .await
        .status
}

/// After a Redis restart, `/ready` says 200 only once the pub/sub link is subscribed to
/// every live key: a publication made the moment it does reaches every socket, with
/// both cores busy and 300 keys to subscribe again, three restarts in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_a_redis_restart_means_publications_arrive() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let gw = Gateway::start(&[("redis__url", &url)]);
    gw.wait_health(200).await;
    let mut sockets = Vec::new();
    for i in 0..300 {
        sockets.push(Client::connect(&gw.ws_url(&format!("/ws/f{i}?subscribe-broadcast"))).await);
    }
    for i in 0..300 {
        wait_numsub(&redis, &format!("broadcast:f{i}"), 1).await;
    }
    let _busy = Busy::start(2, Duration::from_secs(120));
    for round in 0..3 {
        redis.kill();
        let deadline = tokio::time::Instant::now() + WAIT;
        while ready_status(&gw).await != 503 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "/ready never said 503"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        redis.restart().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while ready_status(&gw).await != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "/ready never said 200"
            );
        }
        // At once, in one pipeline: every key, every socket.
        let mut pipe = redis::pipe();
        for i in 0..300 {
            pipe.publish(format!("broadcast:f{i}"), format!("round {round}"))
                .ignore();
        }
        let _: () = pipe.query_async(&mut redis.conn().await).await.unwrap();
        for (i, socket) in sockets.iter_mut().enumerate() {
            assert_eq!(
                socket.recv_text().await,
                format!("round {round}"),
                "socket {i} after restart {round}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_starts_while_redis_is_down_and_recovers() {
    let mut redis = RedisServer::start().await;
    redis.kill();
    let url = redis.url();
    let gw = Gateway::start(&[("redis__url", &url)]);
    let (status, body) = gw.health().await;
    assert_eq!(status, 503, "{body}");
    // Sockets are accepted meanwhile (no identity needed) and get their subscriptions later.
    let mut early = Client::connect(&gw.ws_url("/ws/chat?subscribe-broadcast")).await;
    redis.restart().await;
    gw.wait_health(200).await;
    wait_numsub(&redis, "broadcast:chat", 1).await;
    redis.publish("broadcast:chat", b"up", 0).await;
    assert_eq!(early.recv_text().await, "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_while_redis_is_down_closes_with_1013() {
    let (mut redis, gw) = start(&[]).await;
    let mut c = Client::connect(&gw.ws_url("/ws/chat?publish-broadcast")).await;
    redis.kill();
    gw.wait_health(503).await;
    c.ws.send(Message::text("lost?")).await.unwrap();
    assert_eq!(c.closed().await.map(|c| c.0), Some(1013));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_publisher_reaches_sockets_and_stores() {
    let (redis, gw) = start(&[("redis__prefix", "site")]).await;
    let publisher = RedisPublisher::connect(&redis.url(), Some("site"))
        .await
        .unwrap();
    publisher
        .set_identity("k9", Some("bob"), &[], 60)
        .await
        .unwrap();
    let mut bob = ready_on(
        &redis,
        &gw,
        "site:broadcast:alerts",
        "/ws/alerts?subscribe-broadcast&subscribe-user",
        &[("Cookie", "sessionid=k9")],
    )
    .await;
    let to = Recipients::new("alerts")
        .unwrap()
        .broadcast()
        .user("bob")
        .unwrap();
    publisher
        .publish_message(&to, "deploy at 5", Some(30))
        .await
        .unwrap();
    assert_eq!(bob.recv_text().await, "deploy at 5");
    assert_eq!(bob.recv_text().await, "deploy at 5", "once per audience");
    let stored = publisher
        .fetch_message("alerts", &Audience::user("bob").unwrap())
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some(&b"deploy at 5"[..]));
    publisher.clear_identity("k9").await.unwrap();
    assert_eq!(redis.get("site:wsrelay:identity:k9").await, None);
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for 127.0.0.1, in `dir`.
fn make_certificates(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=wsrelay-test-ca",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_unix_socket_password_and_db_urls_all_work_and_share_publications() {
    let dir = crate::harness::TempDir::new("tls");
    make_certificates(&dir);
    let file = |name: &str| dir.join(name).to_string_lossy().to_string();
    let (port, socket) = (crate::harness::free_port(), file("redis.sock"));
    let args = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.pem"),
        "--tls-auth-clients",
        "no",
        "--unixsocket",
        &socket,
        "--requirepass",
        "s3cret",
    ];
    let unix_url = format!("redis+unix://{socket}?db=3&pass=s3cret");
    let redis = RedisServer::start_with(
        port,
        args.iter().map(|a| a.to_string()).collect(),
        unix_url.clone(),
    )
    .await;

    let tls_url = format!("rediss://:s3cret@127.0.0.1:{port}/3");
    // The CA file is handed over in the environment: a process of its own.
    let over_tls = Gateway::start_process(
        &[("redis__url", &tls_url)],
        &[("SSL_CERT_FILE", &file("ca.pem"))],
    );
    let over_unix = Gateway::start(&[("redis__url", &unix_url)]);
    over_tls.wait_health(200).await;
    over_unix.wait_health(200).await;

    // A socket on one gateway receives what a socket on the other publishes.
    let mut listener = ready_on(
        &redis,
        &over_tls,
        "broadcast:chat",
        "/ws/chat?subscribe-broadcast",
        &[],
    )
    .await;
    let mut talker = Client::connect(&over_unix.ws_url("/ws/chat?publish-broadcast")).await;
    talker.send_text("across gateways").await;
    assert_eq!(listener.recv_text().await, "across gateways");
    // Stored in db 3, where both gateways read.
    assert_eq!(
        redis.get("broadcast:chat").await.as_deref(),
        Some(&b"across gateways"[..])
    );
    let mut late = Client::connect(&over_tls.ws_url("/ws/chat?subscribe-broadcast")).await;
    assert_eq!(late.recv_text().await, "across gateways");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_pubsub_connection_is_detected_and_replaced() {
    let redis = RedisServer::start().await;
    let proxy = crate::harness::FreezingProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let url = format!("redis://127.0.0.1:{}/0", proxy.port);
    // A process of its own: the test reads its log.
    let gw = Gateway::start_process(
        &[("redis__url", &url), ("redis__probe_interval", "0.5")],
        &[],
    );
    gw.wait_health(200).await;
    let mut c = ready_on(
        &redis,
        &gw,
        "broadcast:chat",
        "/ws/chat?subscribe-broadcast",
        &[],
    )
    .await;
    proxy.freeze();
    gw.wait_health(503).await;
    gw.wait_health(200).await;
    // Publications flow again on the replacement connection; retry while the link settles.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        redis.publish("broadcast:chat", b"alive", 0).await;
        if let Ok(text) = tokio::time::timeout(Duration::from_millis(300), c.recv_text()).await {
            assert_eq!(text, "alive");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no publication after the freeze"
        );
    }
    assert!(gw.log().iter().any(|l| l.contains("probe not received")));
}
