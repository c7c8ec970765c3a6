//! Identity sources end to end: Django sessions written by real Django (committed
//! fixtures from `tests/django/make_sessions.py`), the HTTP callback against a real HTTP
//! server started here, and signed tokens.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use wsrelay::identity::django;

use crate::harness::{http, Client, Gateway, RedisServer};

fn fixtures() -> Value {
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/django_sessions.json"
    ))
    .expect("fixture file");
    serde_json::from_str(&raw).unwrap()
}

fn raw_value(case: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(case["value_b64"].as_str().unwrap())
        .unwrap()
}

const USER_FIELD: &str = "wsrelay:username";
const GROUPS_FIELD: &str = "ws4redis:memberof";
const SALT: &str = "django.contrib.sessions.SessionStore";

/// Every fixture case decodes to what Django stored, or is refused when it must be.
#[test]
fn every_django_fixture_decodes_as_django_wrote_it() {
    let f = fixtures();
    let secret = f["secret_key"].as_str().unwrap();
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "fixture has {} cases", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let raw = raw_value(case);
        let decoded = match case["engine"].as_str().unwrap() {
            "redis_sessions" => django::signing::unsign(&raw, SALT, &[secret.to_string()], None)
                .map_err(|e| e.to_string())
                .and_then(|json| {
                    django::session::fields_from_json(&json, USER_FIELD, GROUPS_FIELD)
                        .map_err(|e| e.to_string())
                }),
            _ => django::session::fields_from_pickle(&raw, USER_FIELD, GROUPS_FIELD)
                .map_err(|e| e.to_string()),
        };
        let expected = &case["expected"];
        if expected["valid"] == false {
            assert!(decoded.is_err(), "{name} must be refused: {decoded:?}");
            continue;
        }
        let fields = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(fields.user.as_deref(), expected["user"].as_str(), "{name}");
        let groups: Vec<&str> = expected["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap())
            .collect();
        assert_eq!(fields.groups, groups, "{name}");
    }
}

/// The keys a socket of this identity listens to on `facility`.
fn expected_keys(case: &Value, facility: &str) -> BTreeSet<String> {
    let session = case["session_key"].as_str().unwrap();
    let mut keys = BTreeSet::from([format!("session:{session}:{facility}")]);
    let expected = &case["expected"];
    if expected["valid"] == true {
        if let Some(user) = expected["user"].as_str() {
            keys.insert(format!("user:{user}:{facility}"));
        }
        // A logged-in session keeps ws4redis's groups with or without a user name
        // (`groups_only`); an anonymous one has none.
        let mut seen = BTreeSet::new();
        for g in expected["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g.as_str())
        {
            if seen.insert(g) && seen.len() <= wsrelay::identity::MAX_GROUPS {
                keys.insert(format!("group:{g}:{facility}"));
            }
        }
    }
    keys
}

async fn channels(redis: &RedisServer, pattern: &str) -> BTreeSet<String> {
    let list: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(pattern)
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    list.into_iter().collect()
}

/// Each engine configuration end to end: the gateway reads the session Django wrote
/// and subscribes exactly the user, group and session keys it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_sessions_give_the_sockets_their_keys() {
    let f = fixtures();
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut conn = redis.conn().await;
    let cases = f["cases"].as_array().unwrap();
    let mut configs: Vec<(String, String, String)> = cases
        .iter()
        .map(|c| {
            let version = c["version"].as_u64().map_or("1".into(), |v| v.to_string());
            (
                c["engine"].as_str().unwrap().into(),
                c["key_prefix"].as_str().unwrap().into(),
                version,
            )
        })
        .collect();
    configs.sort();
    configs.dedup();
    let mut checked = 0;
    for (engine, prefix, version) in configs {
        let gw = Gateway::start(&[
            ("redis__url", &url),
            ("identity__source", "django"),
            ("identity__django__engine", &engine),
            ("identity__django__key_prefix", &prefix),
            ("identity__django__cache_version", &version),
            (
                "identity__django__secret_key",
                f["secret_key"].as_str().unwrap(),
            ),
            ("policy__max_subscriptions", "100"),
        ]);
        gw.wait_health(200).await;
        let mine = cases.iter().filter(|c| {
            c["engine"] == engine.as_str()
                && c["key_prefix"] == prefix.as_str()
                && c["version"].as_u64().map_or("1".into(), |v| v.to_string()) == version
        });
        let mut rejected = 0;
        for case in mine {
            checked += 1;
            let name = case["name"].as_str().unwrap();
            let key = case["redis_key"].as_str().unwrap();
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(raw_value(case))
                .query_async(&mut conn)
                .await
                .unwrap();
            let facility = format!("f{checked}");
            let session = case["session_key"].as_str().unwrap();
            // A stored marker on the session key: its arrival means every key is subscribed.
            redis
                .publish(&format!("session:{session}:{facility}"), b"ready", 60)
                .await;
            let cookie = format!("sessionid={session}");
            let path = format!("/ws/{facility}?subscribe-user&subscribe-group&subscribe-session");
            let mut c = Client::connect_with(&gw.ws_url(&path), &[("Cookie", &cookie)]).await;
            assert_eq!(c.recv_text().await, "ready", "{name}");
            assert_eq!(
                channels(&redis, &format!("*:{facility}")).await,
                expected_keys(case, &facility),
                "{name}"
            );
            c.close().await;
            if case["expected"]["valid"] == false {
                rejected += 1;
            }
        }
        let (_, health) = gw.health().await;
        assert_eq!(
            health["counters"]["identity.django_rejected"]
                .as_u64()
                .unwrap_or(0),
            rejected,
            "{engine}"
        );
    }
    assert_eq!(checked, cases.len());
}

/// What the test's application server saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    last_target: Mutex<String>,
    last_forwarded: Mutex<Option<String>>,
}

/// What the test application answers the `garbled` session: 401 with escape
/// sequences, a bell, a tab, a line break and more than 1 KiB of text.
fn garbled_refusal() -> String {
    format!("\u{1b}[1mNo access\u{7}\tfor you\r\n{}", "ü".repeat(600))
}

/// A real HTTP server standing in for the web application's identity endpoint. It
/// answers by session cookie: `good`, `narrow`, `denied` (403), `expired` (403 with a
/// reason), `garbled` (401 with [`garbled_refusal`]), `broken` (500), `slow`.
async fn application() -> (u16, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut target = String::new();
                let (mut cookie, mut forwarded) = (String::new(), None);
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.is_empty() {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if target.is_empty() {
                        target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    } else if let Some(v) = lower.strip_prefix("cookie: ") {
                        cookie = v.to_string();
                    } else if let Some(v) = lower.strip_prefix("x-app-tenant: ") {
                        forwarded = Some(v.to_string());
                    }
                }
                state.requests.fetch_add(1, Ordering::SeqCst);
                *state.last_target.lock().unwrap() = target;
                *state.last_forwarded.lock().unwrap() = forwarded;
                let session = cookie
                    .split("sessionid=")
                    .nth(1)
                    .unwrap_or("")
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .to_string();
                let (status, body) = match session.as_str() {
                    "good" => (
                        "200 OK",
                        json!({"user": "jane", "groups": ["staff"], "session": "s-good"})
                            .to_string(),
                    ),
                    "narrow" => (
                        "200 OK",
                        json!({"user": "jim", "groups": [], "session": null, "allowed": ["subscribe-broadcast"]}).to_string(),
                    ),
                    "denied" => ("403 Forbidden", String::new()),
                    "expired" => ("403 Forbidden", "Your subscription has expired".into()),
                    "garbled" => ("401 Unauthorized", garbled_refusal()),
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        ("200 OK", json!({"user": "late"}).to_string())
                    }
                    "broken" => ("500 Internal Server Error", "{}".into()),
                    _ => ("200 OK", json!({"user": null}).to_string()),
                };
                let reply = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = write.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

const UPGRADE: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_decides_identity_and_is_cached() {
    let (port, seen) = application().await;
    let redis = RedisServer::start().await;
    let (url, callback) = (redis.url(), format!("http://127.0.0.1:{port}/ws-auth?v=1"));
    let gw = Gateway::start(&[
        ("redis__url", &url),
        ("identity__source", "callback"),
        ("identity__callback__url", &callback),
        ("identity__callback__timeout", "0.5"),
        ("identity__callback__cache_ttl", "60"),
        ("identity__callback__forward_headers", "x-app-tenant"),
    ]);
    gw.wait_health(200).await;

    redis.publish("user:jane:inbox", b"for jane", 60).await;
    let path = "/ws/inbox?subscribe-user&subscribe-group&subscribe-session";
    let headers = [("Cookie", "sessionid=good"), ("X-App-Tenant", "acme")];
    let mut jane = Client::connect_with(&gw.ws_url(path), &headers).await;
    assert_eq!(jane.recv_text().await, "for jane");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    let target = seen.last_target.lock().unwrap().clone();
    assert!(
        target.starts_with("/ws-auth?v=1&facility=inbox&flags="),
        "{target}"
    );
    assert!(target.contains("subscribe%2Duser"), "{target}");
    assert_eq!(seen.last_forwarded.lock().unwrap().as_deref(), Some("acme"));
    let subscribed = channels(&redis, "*:inbox").await;
    let want: BTreeSet<String> = [
        "user:jane:inbox",
        "group:staff:inbox",
        "session:s-good:inbox",
    ]
    .map(String::from)
    .into();
    assert_eq!(subscribed, want);
    // Same cookie, facility, flags and forwarded header: answered from the cache.
    let again = Client::connect_with(&gw.ws_url(path), &headers).await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    drop(again);

    // `allowed` narrows the flags: jim asked for user too but only gets broadcast.
    redis.publish("broadcast:news", b"news", 60).await;
    let mut jim = Client::connect_with(
        &gw.ws_url("/ws/news?subscribe-broadcast&subscribe-user"),
        &[("Cookie", "sessionid=narrow")],
    )
    .await;
    assert_eq!(jim.recv_text().await, "news");
    assert!(!channels(&redis, "*:news").await.contains("user:jim:news"));

    for (cookie, status, counter) in [
        ("sessionid=denied", 403, "refused.identity"),
        ("sessionid=broken", 503, "refused.identity_unavailable"),
        ("sessionid=slow", 503, "refused.identity_unavailable"),
    ] {
        let headers = [UPGRADE.as_slice(), &[("Cookie", cookie)]].concat();
        let r = http(gw.addr, "GET", "/ws/news?subscribe-broadcast", &headers, "").await;
        assert_eq!(r.status, status, "{cookie}: {}", r.body);
        let (_, health) = gw.health().await;
        assert!(
            health["counters"][counter].as_u64() >= Some(1),
            "{cookie}: {health}"
        );
    }
    let (_, health) = gw.health().await;
    assert_eq!(
        health["counters"]["identity.callback_unavailable"], 2,
        "{health}"
    );
}

/// The application's refusal reaches the browser with its status and its text, as
/// ws4redis passed it on; bounded, stripped of control characters, and cached with
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applications_refusal_reaches_the_browser() {
    let (port, seen) = application().await;
    let callback = format!("http://127.0.0.1:{port}/ws-auth");
    let gw = Gateway::start(&[
        ("identity__source", "callback"),
        ("identity__callback__url", &callback),
        ("identity__callback__cache_ttl", "60"),
    ]);
    let refuse = |cookie: &'static str| {
        let headers = [UPGRADE.as_slice(), &[("Cookie", cookie)]].concat();
        async move { http(gw.addr, "GET", "/ws/news?subscribe-broadcast", &headers, "").await }
    };
    for _ in 0..2 {
        let r = refuse("sessionid=expired").await;
        assert_eq!(r.status, 403, "{}", r.head);
        assert_eq!(r.body, "Your subscription has expired");
        assert!(r
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; charset=utf-8"));
    }
    // The second refusal came from the cache, status and text included.
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);

    // Control characters go (tab and line break become spaces), and the text stops
    // at 1 KiB on a character boundary.
    let r = refuse("sessionid=garbled").await;
    assert_eq!(r.status, 401, "{}", r.head);
    let kept = "[1mNo access for you  ";
    let expected = format!("{kept}{}", "ü".repeat((1024 - kept.len()) / 2));
    assert_eq!(r.body, expected);
    assert!(garbled_refusal().len() > 1024 && r.body.len() <= 1024);

    // A refusal without a body gets the default reason.
    let r = refuse("sessionid=denied").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (403, "refused by the application")
    );
    let (_, health) = gw.health().await;
    assert_eq!(
        health["counters"]["identity.callback_refused"], 4,
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_falls_back_to_the_callback_without_a_user_field() {
    let f = fixtures();
    let case = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .unwrap()
                .starts_with("redis_sessions/prefix-session/groups_only/")
        })
        .unwrap();
    let (port, seen) = application().await;
    let redis = RedisServer::start().await;
    let key = case["redis_key"].as_str().unwrap();
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(raw_value(case))
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let (url, callback) = (redis.url(), format!("http://127.0.0.1:{port}/auth"));
    let gw = Gateway::start(&[
        ("redis__url", &url),
        ("identity__source", "django"),
        ("identity__django__engine", "redis_sessions"),
        ("identity__django__key_prefix", "session"),
        (
            "identity__django__secret_key",
            f["secret_key"].as_str().unwrap(),
        ),
        ("identity__callback__url", &callback),
    ]);
    gw.wait_health(200).await;
    redis.publish("broadcast:x", b"ready", 60).await;
    // The application is asked with the browser's cookie; here it does not know it.
    let cookie = format!("sessionid={}", case["session_key"].as_str().unwrap());
    let mut c = Client::connect_with(
        &gw.ws_url("/ws/x?subscribe-broadcast&subscribe-user"),
        &[("Cookie", &cookie)],
    )
    .await;
    assert_eq!(c.recv_text().await, "ready");
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        1,
        "asked the callback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_tokens_give_identity_and_bad_ones_are_refused() {
    use wsrelay::identity::token::sign_token;
    let secret = "a-token-secret-of-at-least-32-bytes!!";
    let redis = RedisServer::start().await;
    let url = redis.url();
    let gw = Gateway::start(&[
        ("redis__url", &url),
        ("identity__source", "token"),
        ("identity__token__secret", secret),
        ("identity__token__cookie", "wsrelay_token"),
    ]);
    gw.wait_health(200).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = sign_token(
        secret.as_bytes(),
        &json!({"sub": "tess", "groups": ["ops"], "exp": now + 60}),
    );
    redis.publish("group:ops:alerts", b"for ops", 60).await;
    let mut tess =
        Client::connect(&gw.ws_url(&format!("/ws/alerts?subscribe-group&token={good}"))).await;
    assert_eq!(tess.recv_text().await, "for ops");
    let cookie = format!("wsrelay_token={good}");
    let mut by_cookie = Client::connect_with(
        &gw.ws_url("/ws/alerts?subscribe-group"),
        &[("Cookie", &cookie)],
    )
    .await;
    assert_eq!(by_cookie.recv_text().await, "for ops");

    let expired = sign_token(secret.as_bytes(), &json!({"sub": "tess", "exp": now - 10}));
    let forged = sign_token(
        b"not-the-secret-not-the-secret-not!!",
        &json!({"sub": "tess", "exp": now + 60}),
    );
    for (token, reason) in [(expired, "expired"), (forged, "bad signature")] {
        let r = http(
            gw.addr,
            "GET",
            &format!("/ws/alerts?token={token}"),
            &UPGRADE,
            "",
        )
        .await;
        assert_eq!(r.status, 403);
        assert_eq!(r.body, format!("invalid token: {reason}"));
    }
    // No token: anonymous, group flag skipped.
    redis.publish("broadcast:alerts", b"public", 60).await;
    let mut anon =
        Client::connect(&gw.ws_url("/ws/alerts?subscribe-broadcast&subscribe-group")).await;
    assert_eq!(anon.recv_text().await, "public");
}
