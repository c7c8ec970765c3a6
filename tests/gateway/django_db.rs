//! The Django identity source against Django itself: a real Django 5.2 site
//! ([`DjangoSite`]) logs users in with every session engine, on PostgreSQL, MariaDB and
//! SQLite, and the gateway must find the same user Django's own `auth.get_user` finds,
//! with the groups the database has now.
//!
//! A socket's identity shows in the keys it subscribes (`PUBSUB CHANNELS` on the test's
//! own Redis): a stored marker on the socket's broadcast key arrives only once every
//! subscription is live.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::databases::{shared_mariadb, shared_postgres};
use crate::django_site::{DjangoSite, DjangoSiteSettings, SessionEngine};
use crate::harness::{free_port, http, Client, Gateway, RedisServer, TempDir, UPGRADE};

const SECRET: &str = "wsrelay-test-current-key-do-not-use";
const OLD_SECRET: &str = "wsrelay-test-retired-key-do-not-use";
const CACHE_PREFIX: &str = "site";

/// The keys a socket of `identity` subscribes on `facility` with every flag.
fn keys(
    facility: &str,
    session: Option<&str>,
    user: Option<&str>,
    groups: &[&str],
) -> BTreeSet<String> {
    let mut keys = BTreeSet::from([format!("broadcast:{facility}")]);
    keys.extend(session.map(|s| format!("session:{s}:{facility}")));
    keys.extend(user.map(|u| format!("user:{u}:{facility}")));
    keys.extend(groups.iter().map(|g| format!("group:{g}:{facility}")));
    keys
}

/// The Django site on `database_url`, its cache on `redis`; with `rotated`, its
/// `SECRET_KEY_FALLBACKS` holds the retired key.
async fn site(redis: &RedisServer, database_url: String, rotated: bool) -> DjangoSite {
    DjangoSite::start(DjangoSiteSettings {
        database_url,
        redis_url: redis.url(),
        cache_key_prefix: CACHE_PREFIX.into(),
        secret_key: SECRET.into(),
        secret_key_fallbacks: if rotated {
            vec![OLD_SECRET.into()]
        } else {
            vec![]
        },
    })
    .await
}

/// One gateway reading `engine` sessions, with or without Django's database.
struct Reader {
    gw: Gateway,
    engine: SessionEngine,
}

impl Reader {
    async fn start(
        redis: &RedisServer,
        engine: SessionEngine,
        database_url: Option<&str>,
    ) -> Reader {
        let url = redis.url();
        let mut settings = vec![
            ("redis__url", url.as_str()),
            ("identity__source", "django"),
            ("identity__django__engine", engine.name()),
            ("identity__django__key_prefix", CACHE_PREFIX),
            ("identity__django__secret_key", SECRET),
            ("identity__django__secret_key_fallbacks", OLD_SECRET),
            // Every change in the database shows at the next socket.
            ("identity__django__cache_ttl", "0"),
        ];
        if let Some(db) = database_url {
            settings.push(("identity__django__database_url", db));
        }
        let gw = Gateway::start(&settings);
        gw.wait_health(200).await;
        Reader { gw, engine }
    }

    /// The keys a socket with this session cookie subscribes to.
    async fn keys_of(&self, redis: &RedisServer, cookie: &str) -> BTreeSet<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let facility = format!("dj{}", NEXT.fetch_add(1, Ordering::Relaxed));
        redis
            .publish(&format!("broadcast:{facility}"), b"ready", 60)
            .await;
        let path = format!(
            "/ws/{facility}?subscribe-broadcast&subscribe-user&subscribe-group&subscribe-session"
        );
        let cookie = format!("sessionid={cookie}");
        let mut c = Client::connect_with(&self.gw.ws_url(&path), &[("Cookie", &cookie)]).await;
        assert_eq!(c.recv_text().await, "ready");
        let list: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(format!("*:{facility}"))
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        c.close().await;
        // Only the facility at the end: a random session key may contain "dj12" too.
        list.into_iter()
            .map(|k| match k.strip_suffix(&facility) {
                Some(rest) => format!("{rest}F"),
                None => k,
            })
            .collect()
    }

    /// The session audience a cookie gives: none for signed cookies (the cookie is the
    /// session and holds `:`).
    fn session<'a>(&self, cookie: &'a str) -> Option<&'a str> {
        (self.engine != SessionEngine::SignedCookies).then_some(cookie)
    }

    /// Checks that the socket of `cookie` is `user` with `groups`, and that Django
    /// agrees on the user.
    async fn expect(
        &self,
        site: &DjangoSite,
        redis: &RedisServer,
        cookie: &str,
        user: Option<&str>,
        groups: &[&str],
        case: &str,
    ) {
        let case = format!("{case} ({:?})", self.engine);
        assert_eq!(
            site.session_user(self.engine, cookie).await.as_deref(),
            user,
            "{case}: Django's own verdict"
        );
        let groups = if user.is_some() { groups } else { &[] };
        assert_eq!(
            self.keys_of(redis, cookie).await,
            keys("F", self.session(cookie), user, groups),
            "{case}"
        );
    }
}

/// Every engine on one database: users and groups, inactive users, password changes,
/// live group membership, expired sessions, key rotation, and stock ws4redis sessions.
async fn every_engine_on(database_url: String) {
    let redis = RedisServer::start().await;
    let site = site(&redis, database_url.clone(), true).await;
    site.create_user("jane", "pw", true, &["staff", "editors"])
        .await;
    site.create_user("bob", "pw", false, &["staff"]).await;
    site.create_user("carl", "pw", true, &["staff"]).await;
    site.create_user("dora", "pw", true, &[]).await;
    site.create_user("eve", "pw", true, &["ops"]).await;
    for engine in SessionEngine::ALL {
        let r = Reader::start(&redis, engine, Some(&database_url)).await;
        let jane = site.login("jane", engine).await;
        r.expect(
            &site,
            &redis,
            &jane,
            Some("jane"),
            &["editors", "staff"],
            "user and groups",
        )
        .await;

        let bob = site.login("bob", engine).await;
        r.expect(&site, &redis, &bob, None, &[], "inactive user")
            .await;

        let carl = site.login("carl", engine).await;
        r.expect(
            &site,
            &redis,
            &carl,
            Some("carl"),
            &["staff"],
            "before the password change",
        )
        .await;
        site.set_password("carl", &format!("changed-{}", engine.name()))
            .await;
        r.expect(&site, &redis, &carl, None, &[], "after the password change")
            .await;

        let dora = site.login("dora", engine).await;
        r.expect(&site, &redis, &dora, Some("dora"), &[], "no group yet")
            .await;
        site.add_to_group("dora", "ops").await;
        r.expect(
            &site,
            &redis,
            &dora,
            Some("dora"),
            &["ops"],
            "group added, same session",
        )
        .await;
        site.remove_from_group("dora", "ops").await;

        let eve = site.login_with_key("eve", engine, OLD_SECRET).await;
        r.expect(
            &site,
            &redis,
            &eve,
            Some("eve"),
            &["ops"],
            "signed with a fallback key",
        )
        .await;

        let stock = site
            .stock_ws4redis_session("jane", engine, &["legacy"])
            .await;
        r.expect(
            &site,
            &redis,
            &stock,
            Some("jane"),
            &["editors", "staff"],
            "stock ws4redis session",
        )
        .await;

        if engine != SessionEngine::SignedCookies {
            site.expire_session(&jane).await;
            r.expect(&site, &redis, &jane, None, &[], "expired session")
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_on_postgres() {
    every_engine_on(
        shared_postgres()
            .await
            .create_database("django_every_engine")
            .await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_on_mariadb() {
    every_engine_on(
        shared_mariadb()
            .await
            .create_database("django_every_engine")
            .await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_on_sqlite() {
    let dir = TempDir::new("django-sqlite");
    every_engine_on(format!("sqlite://{}", dir.join("db.sqlite3").display())).await;
}

/// The migration scenario without the database: a stock ws4redis session (Django's login
/// fields and `ws4redis:memberof`, no user name) keeps ws4redis's groups, and has no user
/// name to subscribe with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_ws4redis_sessions_keep_their_groups_without_the_database() {
    let dir = TempDir::new("django-stock");
    let redis = RedisServer::start().await;
    let site = site(
        &redis,
        format!("sqlite://{}", dir.join("db.sqlite3").display()),
        false,
    )
    .await;
    site.create_user("jane", "pw", true, &["staff"]).await;
    let r = Reader::start(&redis, SessionEngine::Cache, None).await;
    let stock = site
        .stock_ws4redis_session("jane", SessionEngine::Cache, &["legacy", "staff"])
        .await;
    assert_eq!(
        r.keys_of(&redis, &stock).await,
        keys("F", Some(&stock), None, &["legacy", "staff"])
    );
    let anonymous = site.login("jane", SessionEngine::Cache).await;
    site.expire_session(&anonymous).await;
    assert_eq!(
        r.keys_of(&redis, &anonymous).await,
        keys("F", Some(&anonymous), None, &[]),
        "a session the cache no longer has is anonymous"
    );
}

/// `--check-config` (here `wsrelay::check`) reads the stores a Django source uses and
/// says what it found: the session keys in Redis under the configured prefix, and the
/// rows of Django's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_check_reads_the_session_store_and_the_database() {
    let database_url = shared_postgres()
        .await
        .create_database("django_check")
        .await;
    let redis = RedisServer::start().await;
    let site = site(&redis, database_url.clone(), false).await;
    site.create_user("jane", "pw", true, &["staff", "editors"])
        .await;
    site.login("jane", SessionEngine::CachedDb).await;
    let check = |database_url: String, username_column: &str| {
        let vars = [
            (
                "WSRELAY__IDENTITY__DJANGO__USERNAME_COLUMN",
                username_column.to_string(),
            ),
            ("WSRELAY__REDIS__URL", redis.url()),
            ("WSRELAY__IDENTITY__SOURCE", "django".into()),
            ("WSRELAY__IDENTITY__DJANGO__ENGINE", "cached_db".into()),
            ("WSRELAY__IDENTITY__DJANGO__KEY_PREFIX", CACHE_PREFIX.into()),
            ("WSRELAY__IDENTITY__DJANGO__SECRET_KEY", SECRET.into()),
            ("WSRELAY__IDENTITY__DJANGO__DATABASE_URL", database_url),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into_iter()
        .collect();
        let config = wsrelay::config::Config::load_from(None, vars).unwrap();
        async move { wsrelay::check(&config).await.unwrap() }
    };
    let found = check(database_url.clone(), "username").await;
    assert_eq!(
        found,
        [
            format!(
                "django sessions in Redis: reachable; 1 keys match \
                 \"{CACHE_PREFIX}:1:django.contrib.sessions.cached_db*\"; the first one read \
                 is a logged-in session"
            ),
            "django database: reachable; sessions (django_session), users (auth_user) and \
             groups (auth_user_groups, auth_group) read as configured"
                .into(),
        ]
    );
    let nobody_there = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let found = check(nobody_there, "username").await;
    assert!(
        found[1].starts_with("django database: FAILED: ") && found[1].contains("refused"),
        "the connection's own error: {found:?}"
    );
    // A custom user model whose USERNAME_FIELD is not configured shows before any login.
    let found = check(database_url, "email_address").await;
    assert!(
        found[1].starts_with("django database: FAILED: ") && found[1].contains("email_address"),
        "{found:?}"
    );
}

/// Answers are cached for `cache_ttl`: a user made inactive keeps their identity until
/// the cached answer ends (a gateway without the cache sees the change at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_cached_for_the_configured_time() {
    let dir = TempDir::new("django-cache");
    let database_url = format!("sqlite://{}", dir.join("db.sqlite3").display());
    let redis = RedisServer::start().await;
    let site = site(&redis, database_url.clone(), false).await;
    site.create_user("jane", "pw", true, &["staff"]).await;
    let jane = site.login("jane", SessionEngine::Db).await;
    let url = redis.url();
    let cached = Gateway::start(&[
        ("redis__url", url.as_str()),
        ("identity__source", "django"),
        ("identity__django__engine", "db"),
        ("identity__django__secret_key", SECRET),
        ("identity__django__database_url", &database_url),
        ("identity__django__cache_ttl", "600"),
    ]);
    cached.wait_health(200).await;
    let cached = Reader {
        gw: cached,
        engine: SessionEngine::Db,
    };
    let uncached = Reader::start(&redis, SessionEngine::Db, Some(&database_url)).await;
    let expected = keys("F", Some(&jane), Some("jane"), &["staff"]);
    assert_eq!(cached.keys_of(&redis, &jane).await, expected);
    site.set_active("jane", false).await;
    assert_eq!(
        cached.keys_of(&redis, &jane).await,
        expected,
        "the cached answer"
    );
    assert_eq!(
        uncached.keys_of(&redis, &jane).await,
        keys("F", Some(&jane), None, &[]),
        "read again"
    );
}

/// A database that cannot be reached refuses the handshakes that need it with 503
/// (the browser retries), within the deadline, and counts them; sockets without a
/// session cookie do not need it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_be_reached_gives_503() {
    let nobody_there = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let gw = Gateway::start(&[
        ("identity__source", "django"),
        ("identity__django__engine", "db"),
        ("identity__django__secret_key", SECRET),
        ("identity__django__database_url", &nobody_there),
        ("identity__django__database_timeout", "1"),
    ]);
    let path = "/ws/news?subscribe-broadcast&subscribe-user";
    let mut headers = UPGRADE.to_vec();
    headers.push(("Cookie", "sessionid=abcdefgh12345678"));
    for _ in 0..3 {
        let r = http(gw.addr, "GET", path, &headers, "").await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("django database"), "{}", r.body);
    }
    let r = http(gw.addr, "GET", path, &UPGRADE, "").await;
    assert_eq!(r.status, 101, "no cookie, no database: {}", r.body);
    let (_, health) = gw.health().await;
    assert_eq!(
        health["counters"]["refused.identity_unavailable"], 3,
        "{health}"
    );
}

/// Connections the database ended (a restart, a failover, `idle_session_timeout`) are
/// replaced: the next handshakes find their user, none gets a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_database_ended_are_replaced() {
    let postgres = shared_postgres().await;
    let database_url = postgres.create_database("django_ended").await;
    let redis = RedisServer::start().await;
    let site = site(&redis, database_url.clone(), false).await;
    site.create_user("jane", "pw", true, &["staff"]).await;
    let jane = site.login("jane", SessionEngine::Db).await;
    // The site's own connection is ended too; it is not asked anything after this.
    drop(site);
    let r = Reader::start(&redis, SessionEngine::Db, Some(&database_url)).await;
    let expected = keys("F", Some(&jane), Some("jane"), &["staff"]);
    assert_eq!(r.keys_of(&redis, &jane).await, expected);
    let ended = postgres
        .query(
            "postgres",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = 'django_ended'",
        )
        .await;
    assert_ne!(ended.trim(), "0", "the gateway's connections were ended");
    for _ in 0..3 {
        assert_eq!(r.keys_of(&redis, &jane).await, expected);
    }
}
