//! The authorization callback (`policy.callback.url`) end to end, against a real HTTP
//! server standing in for the web application, under identity sources that are not
//! the identity callback (records, tokens, and Django's database sessions from a real
//! Django site). Each scenario is an `async fn(Source)`, run once per source
//! by [`for_sources`]; a new source needs a [`Source`] variant and a line there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::databases::shared_postgres;
use crate::django_site::{DjangoSite, DjangoSiteSettings, SessionEngine};
use crate::harness::{free_port, http, Client, HttpReply, UPGRADE};
use crate::{Backend, Setup, To};

/// One question the application received.
#[derive(Debug, Clone)]
struct Question {
    method: String,
    path: String,
    /// Header names in lower case.
    headers: HashMap<String, String>,
    body: Value,
}

/// What the application answers a `garbled` facility: 401 with escape sequences, a
/// bell, a tab, a line break and more than 1 KiB of text.
fn garbled_refusal() -> String {
    format!("\u{1b}[1mNo access\u{7}\tfor you\r\n{}", "ü".repeat(600))
}

/// A real HTTP server standing in for the web application's authorization endpoint.
/// It answers by facility (and refuses the user `jim` everywhere):
///
/// | facility | answer |
/// |---|---|
/// | `refuse` | 403 `Your subscription has expired` |
/// | `garbled` | 401 [`garbled_refusal`] |
/// | `narrow` | 200 `{"allowed": ["subscribe-broadcast"]}` |
/// | `open` | 204 |
/// | `empty` | 200, no body |
/// | `broken` | 500 |
/// | `nonsense` | 200 with a body that is not JSON |
/// | `hang` | nothing, ever |
/// | others | 200 `{"allowed": null}` |
struct App {
    port: u16,
    seen: Arc<Mutex<Vec<Question>>>,
}

impl App {
    async fn start() -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let Some(question) = read_question(BufReader::new(read)).await else {
                        return;
                    };
                    log.lock().unwrap().push(question.clone());
                    let (status, body) = answer(&question).await;
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = write.write_all(reply.as_bytes()).await;
                });
            }
        });
        App { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/authorize", self.port)
    }

    /// The questions asked about `facility`, oldest first.
    fn asked(&self, facility: &str) -> Vec<Question> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|q| q.body["facility"] == facility)
            .cloned()
            .collect()
    }
}

async fn read_question(mut read: BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Question> {
    let mut line = String::new();
    read.read_line(&mut line).await.ok()?;
    let mut words = line.split_whitespace();
    let (method, path) = (words.next()?.to_string(), words.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        line.clear();
        read.read_line(&mut line).await.ok()?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
    }
    let length = headers.get("content-length").map_or(Ok(0), |l| l.parse());
    let mut body = vec![0; length.ok()?];
    read.read_exact(&mut body).await.ok()?;
    Some(Question {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or_default(),
    })
}

async fn answer(question: &Question) -> (&'static str, String) {
    if question.body["user"] == "jim" {
        return ("403 Forbidden", "not for jim".into());
    }
    match question.body["facility"].as_str().unwrap_or("") {
        "refuse" => ("403 Forbidden", "Your subscription has expired".into()),
        "garbled" => ("401 Unauthorized", garbled_refusal()),
        "narrow" => (
            "200 OK",
            json!({"allowed": ["subscribe-broadcast"]}).to_string(),
        ),
        "open" => ("204 No Content", String::new()),
        "empty" => ("200 OK", String::new()),
        "broken" => ("500 Internal Server Error", "oops".into()),
        "nonsense" => ("200 OK", "yes please".into()),
        "hang" => std::future::pending().await,
        _ => ("200 OK", json!({"allowed": null}).to_string()),
    }
}

const TOKEN_SECRET: &str = "a-token-secret-of-at-least-32-bytes!!";

/// An identity source the authorization callback is tried with.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// Identity records in Redis, found by the session cookie.
    Record,
    /// Signed tokens in the query, on the embedded broker.
    Token,
    /// Django's `db` sessions and its users and groups, from a real Django site on
    /// PostgreSQL.
    Django,
}

/// The Django site of the [`Source::Django`] tests (shared by them) and its database URL.
async fn django() -> &'static (DjangoSite, String) {
    static SITE: tokio::sync::OnceCell<(DjangoSite, String)> = tokio::sync::OnceCell::const_new();
    SITE.get_or_init(|| async {
        let url = shared_postgres()
            .await
            .create_database("authorize_django")
            .await;
        let site = DjangoSite::start(DjangoSiteSettings {
            database_url: url.clone(),
            secret_key: DJANGO_SECRET.into(),
            ..Default::default()
        })
        .await;
        site.create_user("jane", "pw", true, &["staff"]).await;
        site.create_user("jim", "pw", true, &[]).await;
        (site, url)
    })
    .await
}

const DJANGO_SECRET: &str = "wsrelay-test-django-secret-do-not-use";

/// How a test socket shows who it is: appended to its query, and headers.
struct Login {
    query: String,
    headers: Vec<(&'static str, String)>,
    /// The session key the gateway finds.
    session: String,
}

impl Login {
    /// `path` (which has a query already) with this login.
    fn path(&self, path: &str) -> String {
        format!("{path}{}", self.query)
    }

    /// The headers of a WebSocket handshake with this login, and `extra`.
    fn upgrade<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut headers = UPGRADE.to_vec();
        headers.extend(self.headers.iter().map(|(n, v)| (*n, v.as_str())));
        headers.extend_from_slice(extra);
        headers
    }
}

impl Source {
    fn backend(self) -> Backend {
        match self {
            Source::Record | Source::Django => Backend::Redis,
            Source::Token => Backend::Memory,
        }
    }

    async fn settings(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Source::Django => vec![
                ("identity__source", "django"),
                ("identity__django__engine", "db"),
                ("identity__django__secret_key", DJANGO_SECRET),
                ("identity__django__database_url", django().await.1.as_str()),
            ],
            Source::Record => vec![("identity__source", "record")],
            Source::Token => vec![
                ("identity__source", "token"),
                ("identity__token__secret", TOKEN_SECRET),
            ],
        }
    }

    /// A gateway with this source and the authorization callback at `url`.
    async fn gateway(self, url: &str, settings: &[(&str, &str)]) -> Setup {
        let mut all = self.settings().await;
        all.push(("policy__callback__url", url));
        all.extend_from_slice(settings);
        Setup::new(self.backend(), &all).await
    }

    /// Makes `user` (session key `s-{user}`, in `groups`) known to the source. Django's
    /// users and groups are the site's own (jane in staff, jim in none); its session
    /// keys are Django's.
    async fn login(self, setup: &Setup, user: &str, groups: &[&str]) -> Login {
        let session = format!("s-{user}");
        match self {
            Source::Record => {
                let redis = setup.redis.as_ref().expect("the record source needs Redis");
                let record = json!({"user": user, "groups": groups}).to_string();
                redis
                    .publish(
                        &format!("wsrelay:identity:{session}"),
                        record.as_bytes(),
                        600,
                    )
                    .await;
                Login {
                    query: String::new(),
                    headers: vec![("Cookie", format!("sessionid={session}"))],
                    session,
                }
            }
            Source::Django => {
                let session = django().await.0.login(user, SessionEngine::Db).await;
                Login {
                    query: String::new(),
                    headers: vec![("Cookie", format!("sessionid={session}"))],
                    session,
                }
            }
            Source::Token => {
                let exp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    + 600;
                let claims = json!({"sub": user, "groups": groups, "session": session, "exp": exp});
                let token = wsrelay::identity::token::sign_token(TOKEN_SECRET.as_bytes(), &claims);
                Login {
                    query: format!("&token={token}"),
                    headers: Vec::new(),
                    session,
                }
            }
        }
    }
}

/// Runs each listed `async fn(Source)` once per identity source, as `name::record`,
/// `name::token` and `name::django`.
macro_rules! for_sources {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn record() {
                super::$name(super::Source::Record).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn token() {
                super::$name(super::Source::Token).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn django() {
                super::$name(super::Source::Django).await
            }
        }
    )*};
}

for_sources!(
    refusals_reach_the_browser_verbatim,
    the_application_narrows_the_flags,
    an_application_that_cannot_answer_gives_503,
);

fn is_plain_text(reply: &HttpReply) -> bool {
    reply
        .head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; charset=utf-8")
}

/// The application's refusal is the browser's answer: its status and its body, bounded
/// and stripped of control characters; cached with both; the identity is part of the
/// question and of the cache key.
async fn refusals_reach_the_browser_verbatim(source: Source) {
    let app = App::start().await;
    let setup = source
        .gateway(
            &app.url(),
            &[
                ("policy__callback__cache_ttl", "60"),
                ("policy__callback__forward_headers", "x-app-tenant"),
            ],
        )
        .await;
    let addr = setup.gw.addr;
    let jane = source.login(&setup, "jane", &["staff"]).await;
    let tenant = [("X-App-Tenant", "acme")];
    let path = jane.path("/ws/refuse?subscribe-broadcast");
    for _ in 0..2 {
        let r = http(addr, "GET", &path, &jane.upgrade(&tenant), "").await;
        assert_eq!(r.status, 403, "{}", r.head);
        assert_eq!(r.body, "Your subscription has expired");
        assert!(is_plain_text(&r), "{}", r.head);
    }
    // Asked once: the second refusal, status and text, came from the cache.
    let asked = app.asked("refuse");
    assert_eq!(asked.len(), 1);
    let question = &asked[0];
    assert_eq!(
        (question.method.as_str(), question.path.as_str()),
        ("POST", "/authorize")
    );
    assert_eq!(question.headers["content-type"], "application/json");
    assert_eq!(question.headers["x-app-tenant"], "acme");
    assert_eq!(
        question.body,
        json!({"facility": "refuse", "flags": ["subscribe-broadcast"],
               "user": "jane", "groups": ["staff"], "session": jane.session})
    );
    if let Some((_, cookie)) = jane.headers.iter().find(|(name, _)| *name == "Cookie") {
        assert_eq!(&question.headers["cookie"], cookie);
    }

    let r = http(
        addr,
        "GET",
        &jane.path("/ws/garbled?subscribe-broadcast"),
        &jane.upgrade(&[]),
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.head);
    let kept = "[1mNo access for you  ";
    assert_eq!(
        r.body,
        format!("{kept}{}", "ü".repeat((1024 - kept.len()) / 2))
    );
    assert!(garbled_refusal().len() > 1024 && r.body.len() <= 1024);

    // Jane may open `other`; that answer, cached, is not jim's.
    let open = jane.path("/ws/other?subscribe-broadcast");
    let r = http(addr, "GET", &open, &jane.upgrade(&[]), "").await;
    assert_eq!(r.status, 101, "{}", r.body);
    let jim = source.login(&setup, "jim", &[]).await;
    let r = http(
        addr,
        "GET",
        &jim.path("/ws/other?subscribe-broadcast"),
        &jim.upgrade(&[]),
        "",
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (403, "not for jim"));

    let (_, health) = setup.gw.health().await;
    assert_eq!(health["counters"]["refused.authorize"], 4, "{health}");
}

/// `allowed` narrows the requested flags: a socket that asked for broadcast and user
/// messages but was allowed broadcast only never hears the user's messages. The
/// application's empty answers let every flag through.
async fn the_application_narrows_the_flags(source: Source) {
    let app = App::start().await;
    let setup = source.gateway(&app.url(), &[]).await;
    let jane = source.login(&setup, "jane", &[]).await;
    let headers: Vec<(&str, &str)> = jane.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    for (facility, hears_jane) in [("narrow", false), ("open", true), ("empty", true)] {
        // Stored before the socket opens: its arrival means every key is subscribed.
        setup.publish(facility, To::Broadcast, "ready", 60).await;
        let path = jane.path(&format!(
            "/ws/{facility}?subscribe-broadcast&subscribe-user"
        ));
        let mut socket = Client::connect_with(&setup.url(&path), &headers).await;
        assert_eq!(socket.recv_text().await, "ready", "{facility}");
        setup
            .publish(facility, To::User("jane"), "for jane", 0)
            .await;
        // Published after jane's message: if jane's were delivered, it would come first.
        setup.publish(facility, To::Broadcast, "after", 0).await;
        if hears_jane {
            assert_eq!(socket.recv_text().await, "for jane", "{facility}");
        }
        assert_eq!(socket.recv_text().await, "after", "{facility}");
        socket.close().await;
        let asked = app.asked(facility);
        assert_eq!(
            asked[0].body["flags"],
            json!(["subscribe-broadcast", "subscribe-user"]),
            "{facility}"
        );
    }
}

/// An application that fails, answers nonsense, does not answer in time or cannot be
/// reached: 503, counted, never cached.
async fn an_application_that_cannot_answer_gives_503(source: Source) {
    let app = App::start().await;
    let setup = source
        .gateway(&app.url(), &[("policy__callback__timeout", "0.5")])
        .await;
    let jane = source.login(&setup, "jane", &[]).await;
    let cases = ["broken", "nonsense", "hang", "broken"];
    for facility in cases {
        let path = jane.path(&format!("/ws/{facility}?subscribe-broadcast"));
        let r = http(setup.gw.addr, "GET", &path, &jane.upgrade(&[]), "").await;
        assert_eq!(r.status, 503, "{facility}: {}", r.body);
        assert!(
            r.body.starts_with("authorization callback unavailable: "),
            "{facility}: {}",
            r.body
        );
    }
    assert_eq!(app.asked("broken").len(), 2, "failures are not cached");
    let (_, health) = setup.gw.health().await;
    assert_eq!(
        health["counters"]["refused.authorize_unavailable"],
        cases.len(),
        "{health}"
    );

    // Nobody listens at the callback's address.
    let nowhere = format!("http://127.0.0.1:{}/authorize", free_port());
    let setup = source.gateway(&nowhere, &[]).await;
    let jane = source.login(&setup, "jane", &[]).await;
    let path = jane.path("/ws/any?subscribe-broadcast");
    let r = http(setup.gw.addr, "GET", &path, &jane.upgrade(&[]), "").await;
    assert_eq!(r.status, 503, "{}", r.body);
    let (_, health) = setup.gw.health().await;
    assert_eq!(
        health["counters"]["refused.authorize_unavailable"], 1,
        "{health}"
    );
}
