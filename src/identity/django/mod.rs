//! Django's own sessions and users, read natively (no Python at run time).
//!
//! The session engine (`identity.django.engine`, Django's `SESSION_ENGINE`) says where
//! the session is:
//!
//! | engine | Django's `SESSION_ENGINE` | where the gateway reads it |
//! |---|---|---|
//! | `db` | `django.contrib.sessions.backends.db` (Django's default) | the `django_session` row (unexpired), signed session data |
//! | `cached_db` | `…backends.cached_db` | the cache in Redis first, the database row on a miss |
//! | `cache` | `…backends.cache` | the cache in Redis: the pickled session dict |
//! | `signed_cookies` | `…backends.signed_cookies` | the cookie itself, signed, younger than `SESSION_COOKIE_AGE` |
//! | `redis_sessions` | `redis_sessions.session` (django-redis-sessions) | Redis: signed session data |
//!
//! Cache keys are `{KEY_PREFIX}:{VERSION}:django.contrib.sessions.cache{session_key}`
//! (`cached_db` for that engine); django-redis-sessions keys are
//! `{SESSION_REDIS prefix}:{session_key}`. Signed data is verified with `SECRET_KEY` and
//! then each of `SECRET_KEY_FALLBACKS` ([`signing`]); pickles are read without running
//! anything ([`session`]).
//!
//! **Who the user is.** With `database_url` (Django's database), a session's
//! `_auth_user_id` names the user row: its `USERNAME_FIELD` is the user name, an inactive
//! user is anonymous, `_auth_user_hash` must match the stored password hash (so a
//! password change ends the sessions it should, as in Django's `get_user`), and the
//! groups are read live from the membership table ([`database`]). Without a database,
//! the user name comes from a session field the app writes at login (`wsrelay:username`)
//! and the groups from ws4redis's `ws4redis:memberof`, kept for any logged-in session
//! (one with `_auth_user_id` or a user name). A session that cannot be verified or read
//! is anonymous and counted; a session the store does not have is anonymous, or asks the
//! identity callback when one is configured.

pub mod database;
pub mod session;
pub mod signing;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use log::{debug, warn};
use redis::aio::ConnectionManager;
use serde::Deserialize;

use self::database::{Database, DatabaseError, DatabaseSettings, Schema, UserIdType};
use self::session::{fields_from_pickle, FormatError, Serializer, SessionFields};
use self::signing::{session_hash_matches, unsign, SignatureError};
use super::callback::CallbackResolver;
use super::{cookie, session_key, Handshake, Identity, IdentityError, IdentityResolver};
use crate::broker::redis::command_connection;
use crate::metrics::Metrics;
use crate::secret::{secret_value, Secret};

/// The salt Django's `signed_cookies` engine signs the cookie with.
const SIGNED_COOKIES_SALT: &str = "django.contrib.sessions.backends.signed_cookies";

/// The shortest session key Django accepts.
const MIN_SESSION_KEY_LEN: usize = 8;

/// Handshakes with a session cookie after which, if none found a session, the
/// configuration is probably wrong and a warning says so (once).
const NEVER_FOUND_WARNING_AFTER: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// `django.contrib.sessions.backends.db`.
    Db,
    /// `django.contrib.sessions.backends.cached_db`.
    CachedDb,
    /// `django.contrib.sessions.backends.cache`.
    Cache,
    /// `django.contrib.sessions.backends.signed_cookies`.
    SignedCookies,
    /// django-redis-sessions.
    RedisSessions,
}

impl Engine {
    fn uses_redis(self) -> bool {
        matches!(
            self,
            Engine::CachedDb | Engine::Cache | Engine::RedisSessions
        )
    }
}

/// `identity.django.*` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DjangoConfig {
    pub engine: Engine,
    /// The Redis holding the sessions; default: `redis.url`.
    pub redis_url: Option<String>,
    /// `SESSION_REDIS_PREFIX` (redis_sessions) or the cache's `KEY_PREFIX`.
    pub key_prefix: String,
    /// The cache's `VERSION`.
    pub cache_version: u32,
    /// Django's `SECRET_KEY`; or read it from `secret_key_file`.
    pub secret_key: Option<Secret>,
    pub secret_key_file: Option<std::path::PathBuf>,
    /// Django's `SECRET_KEY_FALLBACKS`: older keys, tried after the current one.
    pub secret_key_fallbacks: Vec<Secret>,
    /// The salt Django signs session data with: `django.contrib.sessions.` + the class name.
    pub salt: String,
    /// `SESSION_SERIALIZER` of signed session data.
    pub serializer: Serializer,
    /// `SESSION_COOKIE_AGE`, seconds: how old a signed-cookie session may be.
    pub session_cookie_age: u64,
    pub user_field: String,
    pub groups_field: String,
    /// Django's database (`DATABASES["default"]`), read-only.
    pub database_url: Option<Secret>,
    /// Connections to the database, at most.
    pub database_pool: u32,
    /// Seconds a database query may take.
    pub database_timeout: f64,
    /// Seconds a session row or a user's answer is reused; 0 disables the cache.
    pub cache_ttl: f64,
    /// Entries kept in each cache, at most.
    pub cache_size: usize,
    pub session_table: String,
    /// `AUTH_USER_MODEL`'s table, its primary key column and type, and its
    /// `USERNAME_FIELD` column.
    pub user_table: String,
    pub user_id_column: String,
    pub user_id_type: UserIdType,
    pub username_column: String,
    /// Empty for a user model without `is_active`.
    pub active_column: String,
    pub group_table: String,
    /// The user model's many-to-many table to groups, and its column naming the user.
    pub user_groups_table: String,
    pub user_groups_column: String,
}

impl DjangoConfig {
    /// Range checks that serde cannot express; the message names the setting.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let seconds = |v: f64| v.is_finite() && (0.0..=86400.0).contains(&v);
        if !seconds(self.database_timeout) || self.database_timeout == 0.0 {
            return Err((
                "identity.django.database_timeout",
                "must be above 0 and at most 86400 seconds".into(),
            ));
        }
        if !seconds(self.cache_ttl) {
            return Err((
                "identity.django.cache_ttl",
                "must be 0 to 86400 seconds".into(),
            ));
        }
        if self.database_pool == 0 {
            return Err(("identity.django.database_pool", "must be >= 1".into()));
        }
        Ok(())
    }

    fn schema(&self) -> Schema {
        Schema {
            session_table: self.session_table.clone(),
            user_table: self.user_table.clone(),
            user_id_column: self.user_id_column.clone(),
            user_id_type: self.user_id_type,
            username_column: self.username_column.clone(),
            active_column: self.active_column.clone(),
            group_table: self.group_table.clone(),
            user_groups_table: self.user_groups_table.clone(),
            user_groups_column: self.user_groups_column.clone(),
        }
    }
}

/// Why a stored session could not be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("{0}")]
    Format(#[from] FormatError),
}

/// A session as its store holds it, before decoding.
enum Stored {
    Missing,
    Signed(Vec<u8>),
    Pickled(Vec<u8>),
}

/// Who a session stands for.
enum Verdict {
    /// The database decided: the user's name and groups, or nobody (no such user,
    /// inactive, or a session hash that does not match). The callback is not asked.
    Database(Option<(String, Vec<String>)>),
    /// The session's own fields decided (no database, or no `_auth_user_id`): a user name
    /// if it holds one, and the groups of a logged-in session.
    Session(Option<String>, Vec<String>),
}

/// Counts handshakes that carried a session cookie, to warn once when none of them
/// ever found a session: the configuration is then almost surely wrong.
#[derive(Default)]
struct FoundWatch {
    with_cookie: AtomicU64,
    found: AtomicBool,
    warned: AtomicBool,
}

impl FoundWatch {
    /// Records one lookup; true when it is time for the warning.
    fn record(&self, found: bool) -> bool {
        if found {
            self.found.store(true, Ordering::Relaxed);
            return false;
        }
        let seen = self.with_cookie.fetch_add(1, Ordering::Relaxed) + 1;
        seen >= NEVER_FOUND_WARNING_AFTER
            && !self.found.load(Ordering::Relaxed)
            && !self.warned.swap(true, Ordering::Relaxed)
    }
}

/// Resolves identities from Django's own sessions and, when configured, its database.
pub struct DjangoResolver {
    config: DjangoConfig,
    /// `SECRET_KEY`, then `SECRET_KEY_FALLBACKS`; empty when no key is configured.
    keys: Vec<String>,
    redis: Option<ConnectionManager>,
    database: Option<Database>,
    cookie: String,
    metrics: Arc<Metrics>,
    /// Asked when a session is missing or names no user, and no database decides.
    fallback: Option<CallbackResolver>,
    watch: FoundWatch,
}

impl DjangoResolver {
    /// Builds the resolver; connects to nothing yet. Must run inside the runtime that
    /// will run the database queries.
    pub fn new(
        config: DjangoConfig,
        default_url: Option<&str>,
        cookie: String,
        metrics: Arc<Metrics>,
        fallback: Option<CallbackResolver>,
    ) -> Result<Self, String> {
        let engine = config.engine;
        let redis = match (
            engine.uses_redis(),
            config.redis_url.as_deref().or(default_url),
        ) {
            (false, _) => None,
            (true, None) => {
                return Err("identity.django.redis_url (or redis.url) must be set".into())
            }
            (true, Some(url)) => Some(
                redis::Client::open(url)
                    .and_then(|c| command_connection(&c))
                    .map_err(|e| format!("identity.django.redis_url: {e}"))?,
            ),
        };
        let secret = secret_value(
            config.secret_key.as_ref(),
            config.secret_key_file.as_deref(),
            "identity.django.secret_key_file",
        )?;
        let has_secret = secret.is_some();
        let keys: Vec<String> = secret
            .into_iter()
            .chain(
                config
                    .secret_key_fallbacks
                    .iter()
                    .map(|k| k.expose().to_string()),
            )
            .collect();
        if keys.iter().any(String::is_empty) {
            return Err(
                "identity.django: an empty secret key (secret_key, secret_key_file or \
                 secret_key_fallbacks) would let anyone sign sessions; Django refuses one too"
                    .into(),
            );
        }
        let signed = matches!(
            engine,
            Engine::Db | Engine::SignedCookies | Engine::RedisSessions
        );
        if (signed || config.database_url.is_some()) && !has_secret {
            return Err(format!(
                "identity.django.secret_key or secret_key_file (Django's SECRET_KEY) is needed \
                 to verify {}",
                if signed {
                    "sessions of this engine"
                } else {
                    "users from the database"
                }
            ));
        }
        let database = match &config.database_url {
            None if engine == Engine::Db => {
                return Err("identity.django.database_url is needed by the db engine".into())
            }
            None => None,
            Some(url) => Some(
                Database::new(DatabaseSettings {
                    url: url.clone(),
                    schema: config.schema(),
                    pool_size: config.database_pool,
                    timeout: Duration::from_secs_f64(config.database_timeout),
                    cache_ttl: Duration::from_secs_f64(config.cache_ttl),
                    cache_size: config.cache_size,
                })
                .map_err(|e| format!("identity.django.database_url: {e}"))?,
            ),
        };
        Ok(DjangoResolver {
            config,
            keys,
            redis,
            database,
            cookie,
            metrics,
            fallback,
            watch: FoundWatch::default(),
        })
    }

    /// The Redis key of a session, as the configured engine writes it.
    pub fn key(&self, session: &str) -> String {
        let c = &self.config;
        match c.engine {
            Engine::RedisSessions if c.key_prefix.is_empty() => session.to_string(),
            Engine::RedisSessions => format!("{}:{session}", c.key_prefix),
            Engine::CachedDb => format!(
                "{}:{}:django.contrib.sessions.cached_db{session}",
                c.key_prefix, c.cache_version
            ),
            _ => format!(
                "{}:{}:django.contrib.sessions.cache{session}",
                c.key_prefix, c.cache_version
            ),
        }
    }

    async fn redis_get(&self, session: &str) -> Result<Option<Vec<u8>>, IdentityError> {
        let Some(conn) = &self.redis else {
            return Ok(None);
        };
        redis::cmd("GET")
            .arg(self.key(session))
            .query_async(&mut conn.clone())
            .await
            .map_err(|e| IdentityError::Unavailable(format!("session store: {e}")))
    }

    async fn database_row(&self, session: &str) -> Result<Stored, IdentityError> {
        let Some(db) = &self.database else {
            return Ok(Stored::Missing);
        };
        let data = db.session_data(session).await.map_err(unavailable)?;
        Ok(data.map_or(Stored::Missing, |d| Stored::Signed(d.into_bytes())))
    }

    /// The session under `session` as its engine stores it.
    async fn fetch(&self, session: &str) -> Result<Stored, IdentityError> {
        match self.config.engine {
            Engine::Db => self.database_row(session).await,
            Engine::CachedDb => match self.redis_get(session).await? {
                Some(raw) => Ok(self.stored_in_redis(raw)),
                None => self.database_row(session).await,
            },
            Engine::Cache | Engine::RedisSessions => Ok(self
                .redis_get(session)
                .await?
                .map_or(Stored::Missing, |raw| self.stored_in_redis(raw))),
            // The cookie is the session; `lookup` never fetches it.
            Engine::SignedCookies => Ok(Stored::Missing),
        }
    }

    /// A session value as this engine's Redis holds it: signed by django-redis-sessions,
    /// pickled by Django's cache.
    fn stored_in_redis(&self, raw: Vec<u8>) -> Stored {
        match self.config.engine {
            Engine::RedisSessions => Stored::Signed(raw),
            _ => Stored::Pickled(raw),
        }
    }

    /// The fields of a stored session; `None` when there is none.
    fn decode(&self, stored: &Stored) -> Option<Result<SessionFields, DecodeError>> {
        match stored {
            Stored::Missing => None,
            Stored::Pickled(raw) => Some(
                fields_from_pickle(raw, &self.config.user_field, &self.config.groups_field)
                    .map_err(DecodeError::from),
            ),
            Stored::Signed(raw) => Some(self.unsign(raw)),
        }
    }

    fn unsign(&self, stored: &[u8]) -> Result<SessionFields, DecodeError> {
        let (user, groups) = (&self.config.user_field, &self.config.groups_field);
        let (salt, max_age) = match self.config.engine {
            Engine::SignedCookies => (
                SIGNED_COOKIES_SALT,
                Some(Duration::from_secs(self.config.session_cookie_age)),
            ),
            _ => (self.config.salt.as_str(), None),
        };
        let data = unsign(stored, salt, &self.keys, max_age)?;
        Ok(self.config.serializer.fields(&data, user, groups)?)
    }

    /// Who a decoded session stands for.
    async fn authenticate(&self, fields: SessionFields) -> Result<Verdict, IdentityError> {
        let (Some(db), Some(id)) = (&self.database, &fields.user_id) else {
            let logged_in = fields.user.is_some() || fields.user_id.is_some();
            let groups = if logged_in { fields.groups } else { Vec::new() };
            return Ok(Verdict::Session(fields.user, groups));
        };
        let user = db.user(id).await.map_err(unavailable)?;
        let why = match &user {
            None => "no such user",
            Some(u) if !u.active => "user is inactive",
            Some(u) => match &fields.user_hash {
                Some(hash) if session_hash_matches(hash, &u.password, &self.keys) => {
                    return Ok(Verdict::Database(Some((u.name.clone(), u.groups.clone()))));
                }
                _ => "session hash does not match (password changed, or another SECRET_KEY)",
            },
        };
        self.metrics
            .identity_events
            .with_label_values(&["django_user_refused"])
            .inc();
        debug!("django session of user id {id:?} is anonymous: {why}");
        Ok(Verdict::Database(None))
    }

    async fn lookup(&self, handshake: &Handshake<'_>) -> Result<Identity, IdentityError> {
        let headers = &handshake.head.headers;
        let (session, stored) = if self.config.engine == Engine::SignedCookies {
            // The signed value is no session key (it holds ':'): no session audience.
            match cookie(headers, &self.cookie) {
                Some(value) => (None, Stored::Signed(value.as_bytes().to_vec())),
                None => return Ok(Identity::default()),
            }
        } else {
            let Some(key) = session_key(headers, &self.cookie)? else {
                return Ok(Identity::default());
            };
            // Django ignores keys shorter than this (`_validate_session_key`); no store is
            // asked for one.
            let stored = if key.len() < MIN_SESSION_KEY_LEN {
                Stored::Missing
            } else {
                self.fetch(&key).await?
            };
            (Some(key), stored)
        };
        let fields = match self.decode(&stored) {
            Some(Ok(fields)) => Some(fields),
            Some(Err(e)) => {
                self.metrics
                    .identity_events
                    .with_label_values(&["django_rejected"])
                    .inc();
                // Counted, not logged as a warning: clients choose their cookies. A wrong
                // SECRET_KEY shows in the never-found warning.
                debug!("django session refused ({e}); socket is anonymous");
                None
            }
            None => None,
        };
        if self.watch.record(fields.is_some()) {
            self.warn_never_found();
        }
        let verdict = match fields {
            Some(fields) => self.authenticate(fields).await?,
            None => Verdict::Session(None, Vec::new()),
        };
        let (user, groups) = match verdict {
            Verdict::Database(found) => found.map_or((None, Vec::new()), |(u, g)| (Some(u), g)),
            Verdict::Session(user, groups) => {
                if let (None, Some(fallback)) = (&user, &self.fallback) {
                    return fallback.resolve(handshake).await;
                }
                (user, groups)
            }
        };
        Ok(Identity::from_names(session, user, groups))
    }

    fn warn_never_found(&self) {
        let c = &self.config;
        let place = match c.engine {
            Engine::Db => format!("table {} of identity.django.database_url", c.session_table),
            Engine::SignedCookies => "the cookie itself (signed with SECRET_KEY)".into(),
            Engine::CachedDb if self.database.is_some() => format!(
                "Redis keys like {:?}, then table {}",
                self.key("<session key>"),
                c.session_table
            ),
            _ => format!("Redis keys like {:?}", self.key("<session key>")),
        };
        warn!(
            "identity.django: none of the first {NEVER_FOUND_WARNING_AFTER} session cookies \
             ({:?}) led to a session; looked in {place}. Check identity.django.engine \
             (SESSION_ENGINE), key_prefix and cache_version (the cache's KEY_PREFIX and \
             VERSION), redis_url or database_url, secret_key (SECRET_KEY), and session.cookie \
             (SESSION_COOKIE_NAME). `wsrelay --check-config` reads the stores.",
            self.cookie
        );
    }

    /// What the configured stores hold, for `--check-config`: connects, reads, and says
    /// what it found, one line per store.
    pub async fn probe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(conn) = &self.redis {
            lines.push(self.probe_redis(conn.clone()).await);
        }
        if let Some(db) = &self.database {
            let c = &self.config;
            lines.push(match db.probe().await {
                Ok(()) => format!(
                    "django database: reachable; sessions ({}), users ({}) and groups ({}, {}) \
                     read as configured",
                    c.session_table, c.user_table, c.user_groups_table, c.group_table
                ),
                Err(e) => format!("django database: FAILED: {e}"),
            });
        }
        lines
    }

    async fn probe_redis(&self, mut conn: ConnectionManager) -> String {
        let pattern = match (self.config.engine, self.config.key_prefix.is_empty()) {
            (Engine::RedisSessions, true) => {
                return match redis::cmd("PING").query_async::<String>(&mut conn).await {
                    Ok(_) => "django sessions in Redis: reachable (keys have no prefix: not \
                              counted)"
                        .into(),
                    Err(e) => format!("django sessions in Redis: FAILED: {e}"),
                }
            }
            // Glob characters of the prefix match themselves only.
            _ => {
                let escaped = self.key("\u{0}").chars().fold(String::new(), |mut out, c| {
                    if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                        out.push('\\');
                    }
                    out.push(c);
                    out
                });
                escaped.replace('\u{0}', "*")
            }
        };
        let mut cursor = 0u64;
        let mut count = 0;
        let mut first: Option<Vec<u8>> = None;
        for _ in 0..100 {
            let answer: redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await;
            match answer {
                Ok((next, keys)) => {
                    count += keys.len();
                    first = first.or(keys.into_iter().next());
                    cursor = next;
                }
                Err(e) => return format!("django sessions in Redis: FAILED: {e}"),
            }
            if cursor == 0 {
                break;
            }
        }
        let mut line = format!(
            "django sessions in Redis: reachable; {count}{} keys match {pattern:?}",
            if cursor == 0 { "" } else { "+" }
        );
        if let Some(key) = first {
            let raw: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .ok()
                .flatten();
            let verdict = match raw.and_then(|raw| self.decode(&self.stored_in_redis(raw))) {
                Some(Ok(f)) if f.user.is_some() || f.user_id.is_some() => "a logged-in session",
                Some(Ok(_)) => "an anonymous session",
                Some(Err(DecodeError::Signature(_))) => {
                    "NOT verified with secret_key (is it Django's SECRET_KEY?)"
                }
                Some(Err(_)) => "NOT readable (serializer, or a pickle with objects)",
                None => "gone before it was read",
            };
            line.push_str(&format!("; the first one read is {verdict}"));
        }
        line
    }
}

/// A database failure, as a handshake answers it (503); the database logs it.
fn unavailable(e: DatabaseError) -> IdentityError {
    IdentityError::Unavailable(format!("django database: {e}"))
}

impl IdentityResolver for DjangoResolver {
    fn resolve<'a>(
        &'a self,
        handshake: &'a Handshake<'a>,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>> {
        Box::pin(self.lookup(handshake))
    }

    fn probe(&self) -> LocalBoxFuture<'_, Vec<String>> {
        Box::pin(DjangoResolver::probe(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_comes_once_and_only_when_nothing_was_ever_found() {
        let watch = FoundWatch::default();
        let fired: Vec<bool> = (0..NEVER_FOUND_WARNING_AFTER + 5)
            .map(|_| watch.record(false))
            .collect();
        assert_eq!(fired.iter().filter(|f| **f).count(), 1);
        assert!(fired[NEVER_FOUND_WARNING_AFTER as usize - 1]);
        let found_once = FoundWatch::default();
        found_once.record(true);
        assert!((0..100).all(|_| !found_once.record(false)));
    }
}
