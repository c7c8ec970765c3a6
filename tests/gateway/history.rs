//! Message ids, history, resume and recovery (`[[facility]] history`), with the
//! envelope subprotocol: on both brokers for what a client sees, on Redis for the
//! recovery after a lost pub/sub link.

use serde_json::json;

use crate::harness::{metric, Client, FreezingProxy, Gateway, RedisServer, TempDir, ENVELOPE};
use crate::{on_both_brokers, Backend};

const FACILITIES: &str = r#"
[[facility]]
pattern = "feed/*"
history = 5
history_ttl = 600
"#;

/// A gateway with the rules above, on `backend`.
async fn gateway(backend: Backend, settings: &[(&str, &str)]) -> (Gateway, Option<RedisServer>) {
    Gateway::on_backend(backend, FACILITIES, settings).await
}

async fn publish(gw: &Gateway, facility: &str, message: &str) -> Option<String> {
    gw.publish_broadcast(facility, message).await
}

/// An envelope socket, once its subscriptions are live (`subscribed`, its first message).
async fn envelope_client(gw: &Gateway, path: &str) -> Client {
    let (mut client, headers) = Client::try_connect(&gw.ws_url(path), &[ENVELOPE])
        .await
        .unwrap();
    assert_eq!(
        headers.get("sec-websocket-protocol").unwrap(),
        "wsrelay.v1",
        "the envelope subprotocol is chosen"
    );
    let first = client.recv_envelope().await;
    assert_eq!(first["type"], "subscribed", "{first}");
    client
}

async fn ids_and_envelope(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[]).await;
    let (mut first, _) = Client::try_connect(
        &gw.ws_url("/ws/feed/a?subscribe-broadcast&subscribe-session"),
        &[ENVELOPE, ("Cookie", "sessionid=s1")],
    )
    .await
    .unwrap();
    assert_eq!(
        first.recv_envelope().await,
        json!({"type": "subscribed", "keys": ["broadcast", "session"]})
    );
    let mut wrapped = envelope_client(&gw, "/ws/feed/a?subscribe-broadcast").await;
    let mut plain = Client::connect(&gw.ws_url("/ws/feed/a?subscribe-broadcast")).await;
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        ids.push(publish(&gw, "feed/a", text).await.expect("an id"));
    }
    for (text, id) in ["one", "two", "three"].iter().zip(&ids) {
        assert_eq!(
            plain.recv_text().await,
            *text,
            "plain clients get raw payloads"
        );
        let m = wrapped.recv_envelope().await;
        assert_eq!(
            m,
            json!({"type": "message", "key": "broadcast", "id": id, "data": text})
        );
    }
    assert!(ids.windows(2).all(|w| w[0] != w[1]));
    // A facility without history: no id, in the envelope and in the API's answer.
    let mut other = envelope_client(&gw, "/ws/chat?subscribe-broadcast").await;
    assert_eq!(publish(&gw, "chat", "x").await, None);
    // The socket is live (`subscribed` came): the publication arrives live, once.
    assert_eq!(
        other.recv_envelope().await,
        json!({"type": "message", "key": "broadcast", "data": "x"})
    );
    // A late joiner's stored message carries its id and says it is stored.
    let mut late = envelope_client(&gw, "/ws/feed/a?subscribe-broadcast").await;
    let m = late.recv_envelope().await;
    assert_eq!(
        (&m["id"], &m["stored"], &m["data"]),
        (&json!(ids[2]), &json!(true), &json!("three"))
    );
}

async fn resume_within_and_beyond_history(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[]).await;
    let mut first = envelope_client(&gw, "/ws/feed/r?subscribe-broadcast").await;
    let one = publish(&gw, "feed/r", "m1").await.unwrap();
    assert_eq!(first.recv_envelope().await["id"], json!(one));
    first.close().await;
    // Missed while away: m2, m3.
    publish(&gw, "feed/r", "m2").await.unwrap();
    let three = publish(&gw, "feed/r", "m3").await.unwrap();
    let path = format!("/ws/feed/r?subscribe-broadcast&last-id=broadcast:{one}");
    let mut back = envelope_client(&gw, &path).await;
    assert_eq!(back.recv_envelope().await["data"], "m2");
    let m = back.recv_envelope().await;
    assert_eq!((&m["data"], &m["id"]), (&json!("m3"), &json!(three)));
    assert_eq!(
        back.recv_envelope().await,
        json!({"type": "resumed", "key": "broadcast", "count": 2})
    );
    let four = publish(&gw, "feed/r", "m4").await.unwrap();
    let m = back.recv_envelope().await;
    assert_eq!((&m["data"], &m["id"]), (&json!("m4"), &json!(four)));
    // Nothing missed: an empty resume.
    let path = format!("/ws/feed/r?subscribe-broadcast&last-id=broadcast:{four}");
    let mut current = envelope_client(&gw, &path).await;
    assert_eq!(current.recv_envelope().await["count"], 0);
    // Beyond the five kept: a reset, then the newest message.
    for i in 5..=11 {
        publish(&gw, "feed/r", &format!("m{i}")).await.unwrap();
    }
    let path = format!("/ws/feed/r?subscribe-broadcast&last-id=broadcast:{one}");
    let mut stale = envelope_client(&gw, &path).await;
    assert_eq!(
        stale.recv_envelope().await,
        json!({"type": "reset", "key": "broadcast", "reason": "history too short"})
    );
    let m = stale.recv_envelope().await;
    assert_eq!((&m["data"], &m["stored"]), (&json!("m11"), &json!(true)));
    // An id newer than anything the stream made: a reset, not a failed read.
    let path = "/ws/feed/r?subscribe-broadcast&last-id=broadcast:18446744073709551615-18446744073709551615";
    let mut future = envelope_client(&gw, path).await;
    assert_eq!(future.recv_envelope().await["reason"], "unknown id");
    let metrics = crate::harness::http(gw.addr, "GET", "/metrics", &[], "").await;
    assert!(metric(&metrics.body, "wsrelay_resume_total{outcome=\"reset\"}") >= 1.0);
    assert!(metric(&metrics.body, "wsrelay_resume_total{outcome=\"replayed\"}") >= 2.0);
}

async fn bad_resume_points_are_refused(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[]).await;
    for (query, reason) in [
        ("last-id=broadcast:abc", "not a message id"),
        ("last-id=1-0", "is not <key>:<id>"),
    ] {
        let path = format!("/ws/feed/a?subscribe-broadcast&{query}");
        let reply = crate::harness::http(
            gw.addr,
            "GET",
            &path,
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
            "",
        )
        .await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
        assert!(reply.body.contains(reason), "{query}: {}", reply.body);
    }
    // An id for a key this socket does not have (a user who logged out) is skipped.
    let path = "/ws/feed/a?subscribe-broadcast&last-id=user:1-0";
    let mut c = envelope_client(&gw, path).await;
    publish(&gw, "feed/a", "still here").await;
    assert_eq!(c.recv_envelope().await["data"], "still here");
}

/// A replay larger than `queue_bytes` is not sent (nor read whole): a reset, and the
/// newest message.
async fn too_much_to_replay_is_a_reset(backend: Backend) {
    let (gw, _redis) = gateway(backend, &[("queue_bytes", "65536")]).await;
    let big = "x".repeat(20_000);
    let first = publish(&gw, "feed/big", &format!("0{big}")).await.unwrap();
    for i in 1..=4 {
        publish(&gw, "feed/big", &format!("{i}{big}"))
            .await
            .unwrap();
    }
    let path = format!("/ws/feed/big?subscribe-broadcast&last-id=broadcast:{first}");
    let mut c = envelope_client(&gw, &path).await;
    assert_eq!(
        c.recv_envelope().await,
        json!({"type": "reset", "key": "broadcast", "reason": "too much to replay (queue_bytes)"})
    );
    let m = c.recv_envelope().await;
    assert_eq!(m["data"], format!("4{big}"));
    assert_eq!(m["stored"], true);
}

on_both_brokers!(
    too_much_to_replay_is_a_reset,
    ids_and_envelope,
    resume_within_and_beyond_history,
    bad_resume_points_are_refused
);

/// Publishes on Redis as the Rust publisher of an application does (with the same
/// facility rules as the gateway, so history keys get ids).
async fn app_publisher(redis: &RedisServer) -> wsrelay::publisher::RedisPublisher {
    let rules: Vec<wsrelay::facility::FacilityRule> = vec![wsrelay::facility::FacilityRule {
        pattern: "feed/*".into(),
        history: 5,
        history_ttl: 600,
        slow_consumer: Default::default(),
    }];
    wsrelay::publisher::RedisPublisher::connect(&redis.url(), None)
        .await
        .unwrap()
        .with_facilities(rules)
}

/// A gateway with the history rules above whose pub/sub link goes through a proxy that
/// can freeze it, probing the link every 0.3 s, with its Redis and the proxy.
async fn behind_a_freezing_proxy() -> (RedisServer, FreezingProxy, Gateway) {
    let redis = RedisServer::start().await;
    let proxy = FreezingProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let via_proxy = format!("redis://127.0.0.1:{}/0", proxy.port);
    let gw = Gateway::start_with_file(
        FACILITIES,
        &[("redis__url", &via_proxy), ("redis__probe_interval", "0.3")],
    );
    gw.wait_health(200).await;
    (redis, proxy, gw)
}

/// The gateway's pub/sub link goes through a proxy that freezes it; meanwhile the
/// application keeps publishing straight to Redis. Once the gateway notices (its probe)
/// and reconnects, every socket gets what it missed, in order, once: history keys
/// from their streams, keys without history their newest stored message; envelope
/// sockets on keys without history are told of the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_link_loses_nothing_on_history_keys() {
    let (redis, proxy, gw) = behind_a_freezing_proxy().await;
    let publisher = app_publisher(&redis).await;
    let feed = || {
        wsrelay::publisher::Recipients::new("feed/x")
            .unwrap()
            .broadcast()
    };
    let chat = || {
        wsrelay::publisher::Recipients::new("chat")
            .unwrap()
            .broadcast()
    };
    let mut wrapped = envelope_client(&gw, "/ws/feed/x?subscribe-broadcast").await;
    let mut plain = Client::connect(&gw.ws_url("/ws/feed/x?subscribe-broadcast")).await;
    let mut chat_plain = Client::connect(&gw.ws_url("/ws/chat?subscribe-broadcast")).await;
    let mut chat_wrapped = envelope_client(&gw, "/ws/chat?subscribe-broadcast").await;
    publisher
        .publish_message(&feed(), "before", None)
        .await
        .unwrap();
    assert_eq!(plain.recv_text().await, "before");
    assert_eq!(wrapped.recv_envelope().await["data"], "before");

    proxy.freeze();
    let mut sent = Vec::new();
    for i in 0..4 {
        let text = format!("during {i}");
        let ids = publisher
            .publish_message(&feed(), &text, None)
            .await
            .unwrap();
        sent.push((text, ids[0].unwrap().to_string()));
    }
    publisher
        .publish_message(&chat(), "chat during", None)
        .await
        .unwrap();
    // The probe notices the frozen link; the reconnect recovers.
    let ready = gw.wait_health(503).await;
    assert!(ready.to_string().contains("redis"), "{ready}");
    gw.wait_health(200).await;
    publisher
        .publish_message(&feed(), "after", None)
        .await
        .unwrap();

    for (text, id) in &sent {
        assert_eq!(plain.recv_text().await, *text);
        let m = wrapped.recv_envelope().await;
        assert_eq!((&m["data"], &m["id"]), (&json!(text), &json!(id)));
    }
    assert_eq!(plain.recv_text().await, "after", "no duplicate, no gap");
    assert_eq!(wrapped.recv_envelope().await["data"], "after");
    assert_eq!(chat_plain.recv_text().await, "chat during");
    assert_eq!(
        chat_wrapped.recv_envelope().await,
        json!({"type": "gap", "key": "broadcast", "reason": "the link to redis was lost"})
    );
    assert_eq!(chat_wrapped.recv_envelope().await["data"], "chat during");
    let metrics = crate::harness::http(gw.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(
        metric(
            &metrics.body,
            "wsrelay_recovery_total{outcome=\"replayed\"}"
        ),
        4.0
    );
}

/// The same on a key whose history did not exist when its sockets started: they still
/// get every message published while the link was frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_link_loses_nothing_on_a_new_history_key() {
    let (redis, proxy, gw) = behind_a_freezing_proxy().await;
    let publisher = app_publisher(&redis).await;
    let feed = || {
        wsrelay::publisher::Recipients::new("feed/new")
            .unwrap()
            .broadcast()
    };
    let mut wrapped = envelope_client(&gw, "/ws/feed/new?subscribe-broadcast").await;
    proxy.freeze();
    let mut sent = Vec::new();
    for i in 0..3 {
        let text = format!("during {i}");
        publisher
            .publish_message(&feed(), &text, Some(0))
            .await
            .unwrap();
        sent.push(text);
    }
    gw.wait_health(503).await;
    gw.wait_health(200).await;
    for text in &sent {
        assert_eq!(wrapped.recv_envelope().await["data"], json!(text));
    }
}

/// Redis killed (SIGKILL) and restarted with its append-only file: what was published
/// after the restart but before the gateway resubscribed reaches the open sockets,
/// once, and a plain `PUBLISH` (ws4redis's own publisher) on a history key is relayed
/// without an id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing_on_history_keys() {
    let dir = TempDir::new("aof");
    let mut redis = RedisServer::start_durable(&dir).await;
    let gw = Gateway::start_with_file(
        FACILITIES,
        &[("redis__url", &redis.url()), ("redis__reconnect_max", "2")],
    );
    gw.wait_health(200).await;
    let publisher = app_publisher(&redis).await;
    let feed = || {
        wsrelay::publisher::Recipients::new("feed/k")
            .unwrap()
            .broadcast()
    };
    let mut wrapped = envelope_client(&gw, "/ws/feed/k?subscribe-broadcast").await;
    publisher
        .publish_message(&feed(), "m0", None)
        .await
        .unwrap();
    assert_eq!(wrapped.recv_envelope().await["data"], "m0");

    redis.kill();
    gw.wait_health(503).await;
    redis.restart().await;
    // Published as soon as Redis is back, likely before the gateway resubscribed.
    let publisher = app_publisher(&redis).await;
    let mut ids = Vec::new();
    for text in ["m1", "m2"] {
        let got = publisher
            .publish_message(&feed(), text, None)
            .await
            .unwrap();
        ids.push(got[0].unwrap().to_string());
    }
    gw.wait_health(200).await;
    redis.publish("broadcast:feed/k", b"plain", 0).await;
    for (text, id) in ["m1", "m2"].iter().zip(&ids) {
        let m = wrapped.recv_envelope().await;
        assert_eq!((&m["data"], &m["id"]), (&json!(text), &json!(id)));
    }
    let m = wrapped.recv_envelope().await;
    assert_eq!(
        m,
        json!({"type": "message", "key": "broadcast", "data": "plain"})
    );
    // Nothing more: a marker published now is the next message.
    publisher
        .publish_message(&feed(), "marker", None)
        .await
        .unwrap();
    assert_eq!(wrapped.recv_envelope().await["data"], "marker");
    drop(wrapped);
    // A binary payload is carried as base64.
    let mut late = envelope_client(&gw, "/ws/feed/k?subscribe-broadcast").await;
    assert_eq!(late.recv_envelope().await["data"], "marker");
    publisher
        .publish_message(&feed(), [0xffu8, 0x00], None)
        .await
        .unwrap();
    let m = late.recv_envelope().await;
    assert_eq!(m["data_base64"], "/wA=");
}
