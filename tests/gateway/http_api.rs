//! Handshake answers, the HTTP publish API and the command line.

use std::process::Command;

use crate::harness::{http, Client, Gateway, TOKEN, UPGRADE};

#[tokio::test]
async fn refused_handshakes_get_400_with_a_plain_reason() {
    let gw = Gateway::start(&[]);
    let post = http(gw.addr, "POST", "/ws/chat", &UPGRADE, "").await;
    assert_eq!(
        (post.status, post.body.as_str()),
        (400, "HTTP method must be a GET")
    );
    let plain = http(gw.addr, "GET", "/ws/chat?subscribe-broadcast", &[], "").await;
    assert_eq!(
        (plain.status, plain.body.as_str()),
        (400, "Client does not wish to upgrade to a websocket")
    );
    assert!(plain.head.contains("text/plain"), "{}", plain.head);
    let long = format!("/ws/{}", "x".repeat(257));
    for (path, reason) in [
        ("/ws/", "facility is empty"),
        ("/ws/a%3Ab", "facility contains ':'"),
        ("/ws/a*", "facility contains '*'"),
        ("/ws/a%20b", "facility contains ' '"),
        ("/ws/a//b", "facility has an empty"),
        ("/ws/%FF", "not valid percent-encoded UTF-8"),
        (long.as_str(), "longer than 256 bytes"),
    ] {
        let r = http(gw.addr, "GET", path, &UPGRADE, "").await;
        assert_eq!(r.status, 400, "{path}");
        assert!(r.body.contains(reason), "{path}: {}", r.body);
    }
    let bad_cookie = [UPGRADE.as_slice(), &[("Cookie", "sessionid=a:b")]].concat();
    let r = http(
        gw.addr,
        "GET",
        "/ws/chat?subscribe-session",
        &bad_cookie,
        "",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body
            .starts_with("session cookie: session key contains ':'"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_requested_subprotocol_is_echoed() {
    let gw = Gateway::start(&[]);
    let url = gw.ws_url("/ws/chat?subscribe-broadcast");
    let (_, headers) = Client::try_connect(&url, &[("Sec-WebSocket-Protocol", "wamp, chat")])
        .await
        .unwrap();
    assert_eq!(headers.get("sec-websocket-protocol").unwrap(), "wamp");
    let (_, headers) = Client::try_connect(&url, &[]).await.unwrap();
    assert!(headers.get("sec-websocket-protocol").is_none());
}

#[tokio::test]
async fn the_publish_api_needs_the_token_and_valid_json() {
    let gw = Gateway::start(&[]);
    let body = r#"{"facility": "chat", "audiences": {"broadcast": true}, "message": "hi"}"#;
    let none = http(gw.addr, "POST", "/api/publish", &[], body).await;
    assert_eq!(none.status, 401);
    assert!(
        none.head.contains("WWW-Authenticate: Bearer")
            || none.head.contains("www-authenticate: Bearer")
    );
    let wrong = http(
        gw.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer wrong-token-000000000")],
        body,
    )
    .await;
    assert_eq!(wrong.status, 401);
    let auth = format!("Bearer {TOKEN}");
    let post = |body: &'static str| {
        let auth = auth.clone();
        let addr = gw.addr;
        async move {
            http(
                addr,
                "POST",
                "/api/publish",
                &[("Authorization", &auth)],
                body,
            )
            .await
        }
    };
    for (body, reason) in [
        ("{not json", "invalid JSON body"),
        (
            r#"{"facility": "chat", "message": "hi"}"#,
            "missing field `audiences`",
        ),
        (
            r#"{"facility": "chat", "audiences": {}, "message": "hi"}"#,
            "name at least one audience",
        ),
        (
            r#"{"facility": "a:b", "audiences": {"broadcast": true}, "message": "hi"}"#,
            "facility contains ':'",
        ),
        (
            r#"{"facility": "chat", "audiences": {"users": ["x y"]}, "message": "hi"}"#,
            "user name contains ' '",
        ),
        (
            r#"{"facility": "chat", "audiences": {"broadcast": true}, "message": "hi", "extra": 1}"#,
            "unknown field `extra`",
        ),
    ] {
        let r = post(body).await;
        assert_eq!(r.status, 400, "{body}");
        assert!(r.body.contains(reason), "{body}: {}", r.body);
    }
    let mut c = Client::connect(&gw.ws_url("/ws/chat?subscribe-broadcast")).await;
    let ok = post(r#"{"facility": "chat", "audiences": {"broadcast": true, "users": ["jane"]}, "message": "hi"}"#).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // No facility keeps history here: no ids.
    assert_eq!(
        ok.body,
        r#"{"ids":[null,null],"keys":["broadcast:chat","user:jane:chat"]}"#
    );
    assert_eq!(c.recv_text().await, "hi");
    // Any other JSON value is published as its compact text, keys in the order given.
    let json = post(
        r#"{"facility": "chat", "audiences": {"broadcast": true},
            "message": {"type": "update", "ids": [3, 1], "note": "a \"b\"", "at": null}}"#,
    )
    .await;
    assert_eq!(json.status, 200, "{}", json.body);
    assert_eq!(
        c.recv_text().await,
        r#"{"type":"update","ids":[3,1],"note":"a \"b\"","at":null}"#
    );
    let number =
        post(r#"{"facility": "chat", "audiences": {"broadcast": true}, "message": 7}"#).await;
    assert_eq!(number.status, 200, "{}", number.body);
    assert_eq!(c.recv_text().await, "7");
}

#[tokio::test]
async fn the_publish_api_is_off_without_a_token() {
    let gw = Gateway::start(&[("publish_token", "")]);
    let r = http(
        gw.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer x")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no publish_token"), "{}", r.body);
}

#[test]
fn check_config_names_the_bad_setting() {
    let run = |vars: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsrelay"));
        cmd.arg("--check-config").env_clear();
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let ok = run(&[]);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("embedded in-memory broker"));
    let bad = run(&[("WSRELAY__PING_INTERVAL", "soon")]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ping_interval"));
    let dir = crate::harness::TempDir::new("check-config");
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9\"\n[redis]\nexpire = \"never\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["--check-config", "--config"])
        .arg(&file)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("redis.expire"),
        "{out:?}"
    );
}

#[test]
fn a_variable_with_one_underscore_is_warned_about() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .arg("--check-config")
        .env_clear()
        .env("WSRELAY_REDIS__URL", "redis://127.0.0.1:1/0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARN")
            && stderr.contains("environment variable WSRELAY_REDIS__URL is ignored")
            && stderr.contains("did you mean WSRELAY__REDIS__URL?"),
        "{stderr}"
    );
    // Not read: the embedded broker serves.
    assert!(String::from_utf8_lossy(&out.stdout).contains("embedded in-memory broker"));
}
