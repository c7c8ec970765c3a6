//! Django's own database, read-only: session rows (`db` and `cached_db` engines), the
//! logged-in user's row, and the user's groups, live.
//!
//! One small sqlx pool; the URL's scheme picks the driver (`postgres://`, `mysql://` or
//! `mariadb://`, `sqlite://`). Table and column names come from the configuration
//! (defaults: Django's `auth_user`, `auth_group`, `auth_user_groups`, `django_session`)
//! and are checked to be plain SQL identifiers before any query is built; values are
//! always bound, never spliced.
//!
//! The pool lives on a thread of its own with its own runtime, so database I/O never
//! delays the Redis subscriber on the main runtime nor a worker's sockets, and its
//! connections stay on one reactor whichever worker asked. The deadline is kept by the
//! asking worker (the query is aborted when it passes). A query on a connection the
//! server ended (restart, failover, idle timeout) runs again on another; connections are
//! not pinged before use, as that would cost a round trip per handshake. After a failure the database is
//! taken as down for [`OUTAGE_PAUSE`]: handshakes get their 503 at once instead of each
//! waiting for the deadline, and the failure is logged once per outage, not per socket.
//!
//! Answers are cached for `cache_ttl` (at most `cache_size` entries each): session rows
//! found (not misses, so that made-up session keys cannot push real ones out) and users
//! (found or not). A change in the database (logout, password, groups, `is_active`)
//! applies within `cache_ttl`. Concurrent misses for one key each run their query.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::Deserialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection, Row};

use crate::secret::Secret;
use crate::ttl_cache::TtlCache;

/// How long the database is taken as down after a failure.
pub const OUTAGE_PAUSE: Duration = Duration::from_secs(1);

/// Session data cached, at most, per entry; a real session is far smaller.
const MAX_CACHED_SESSION_BYTES: usize = 16 * 1024;

/// Most groups read for one user (the identity keeps [`crate::identity::MAX_GROUPS`]).
const MAX_GROUPS_READ: usize = 4 * crate::identity::MAX_GROUPS;

/// The SQL dialect: placeholders and the current time differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    fn of(url: &str) -> Result<Dialect, String> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            "sqlite" => Ok(Dialect::Sqlite),
            _ => Err(format!(
                "unsupported scheme {scheme:?} (postgres://, mysql://, mariadb:// or sqlite://)"
            )),
        }
    }

    /// The first parameter, as a value of the user model's primary key.
    fn user_id_param(self, kind: UserIdType) -> &'static str {
        match (self, kind) {
            (Dialect::Postgres, UserIdType::Uuid) => "CAST($1 AS uuid)",
            (Dialect::Postgres, _) => "$1",
            (Dialect::MySql | Dialect::Sqlite, _) => "?",
        }
    }

    fn param(self) -> &'static str {
        self.user_id_param(UserIdType::Text)
    }

    /// The current time as Django stores `expire_date` with `USE_TZ = True` (UTC).
    fn now(self) -> &'static str {
        match self {
            Dialect::Postgres => "CURRENT_TIMESTAMP",
            Dialect::MySql => "UTC_TIMESTAMP(6)",
            Dialect::Sqlite => "strftime('%Y-%m-%d %H:%M:%f', 'now')",
        }
    }
}

/// The type of the user model's primary key, which `_auth_user_id` holds as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserIdType {
    /// `AutoField` / `BigAutoField` (Django's default).
    Integer,
    /// `CharField` and other text keys.
    Text,
    /// `UUIDField`: a `uuid` on PostgreSQL, 32 hex digits elsewhere.
    Uuid,
}

/// Where Django keeps sessions, users and groups (`identity.django.*` names).
#[derive(Debug, Clone)]
pub struct Schema {
    pub session_table: String,
    pub user_table: String,
    pub user_id_column: String,
    pub user_id_type: UserIdType,
    pub username_column: String,
    /// Empty when the user model has no `is_active` column (every user is active).
    pub active_column: String,
    pub group_table: String,
    pub user_groups_table: String,
    pub user_groups_column: String,
}

/// Checks that `name` is a plain SQL identifier (optionally `schema.table`).
fn identifier(setting: &str, name: &str) -> Result<(), String> {
    let plain = |part: &str| {
        part.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.len() <= 63
    };
    if name.split('.').count() <= 2 && name.split('.').all(plain) {
        Ok(())
    } else {
        Err(format!(
            "identity.django.{setting}: {name:?} is not a plain SQL identifier"
        ))
    }
}

/// The three queries, built once.
struct Queries {
    session: String,
    user: String,
    groups: String,
}

impl Queries {
    fn new(schema: &Schema, dialect: Dialect) -> Result<Queries, String> {
        for (setting, name) in [
            ("session_table", &schema.session_table),
            ("user_table", &schema.user_table),
            ("user_id_column", &schema.user_id_column),
            ("username_column", &schema.username_column),
            ("group_table", &schema.group_table),
            ("user_groups_table", &schema.user_groups_table),
            ("user_groups_column", &schema.user_groups_column),
        ] {
            identifier(setting, name)?;
        }
        let active = if schema.active_column.is_empty() {
            "'y'".to_string()
        } else {
            identifier("active_column", &schema.active_column)?;
            format!("CASE WHEN {} THEN 'y' ELSE 'n' END", schema.active_column)
        };
        let p = dialect.param();
        let id = dialect.user_id_param(schema.user_id_type);
        Ok(Queries {
            session: format!(
                "SELECT session_data FROM {} WHERE session_key = {p} AND expire_date > {}",
                schema.session_table,
                dialect.now()
            ),
            user: format!(
                "SELECT {}, {active}, password FROM {} WHERE {} = {id}",
                schema.username_column, schema.user_table, schema.user_id_column
            ),
            groups: format!(
                "SELECT g.name FROM {} g JOIN {} m ON m.group_id = g.id WHERE m.{} = {id} \
                 ORDER BY g.name LIMIT {MAX_GROUPS_READ}",
                schema.group_table, schema.user_groups_table, schema.user_groups_column
            ),
        })
    }
}

/// A user as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub active: bool,
    /// The stored password hash, which `_auth_user_hash` is derived from.
    pub password: String,
    pub groups: Vec<String>,
}

/// Why the database gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Query(#[from] sqlx::Error),
    #[error("query task failed: {0}")]
    Task(String),
    #[error("down since a moment ago ({0})")]
    Down(String),
}

/// Settings of the pool and its caches.
pub struct DatabaseSettings {
    pub url: Secret,
    pub schema: Schema,
    pub pool_size: u32,
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// The database's own thread: its runtime runs the pool until the sender is dropped.
struct QueryThread {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl QueryThread {
    fn start() -> std::io::Result<QueryThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("wsrelay-db".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                })
            })?;
        Ok(QueryThread {
            handle,
            _stop: stop,
        })
    }
}

/// Django's database, read through a pool on its own thread.
pub struct Database {
    // Dropped before the thread stops (fields drop in order).
    pool: AnyPool,
    thread: QueryThread,
    url: Secret,
    queries: Arc<Queries>,
    dialect: Dialect,
    id_type: UserIdType,
    timeout: Duration,
    /// Until when the database is taken as down, and why.
    outage: Mutex<Option<(Instant, String)>>,
    sessions: TtlCache<String, String>,
    users: TtlCache<String, Option<Arc<User>>>,
}

/// A text column, whatever the driver calls its type (MySQL reports long text as a blob).
fn text(row: &AnyRow, index: usize) -> Result<String, sqlx::Error> {
    match row.try_get::<String, _>(index) {
        Ok(text) => Ok(text),
        Err(_) => {
            let bytes: Vec<u8> = row.try_get(index)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }
}

impl Database {
    /// Builds the pool on its own thread without connecting.
    pub fn new(settings: DatabaseSettings) -> Result<Database, String> {
        let dialect = Dialect::of(settings.url.expose())?;
        let queries = Queries::new(&settings.schema, dialect)?;
        sqlx::any::install_default_drivers();
        let url = Secret::new(driver_url(settings.url.expose(), dialect));
        let thread = QueryThread::start().map_err(|e| e.to_string())?;
        // sqlx spawns its pool's tasks on the runtime it is built in.
        let pool = {
            let _inside = thread.handle.enter();
            AnyPoolOptions::new()
                .max_connections(settings.pool_size.max(1))
                .min_connections(0)
                .acquire_timeout(settings.timeout)
                .test_before_acquire(false)
                .connect_lazy(url.expose())
                .map_err(|e| e.to_string())?
        };
        Ok(Database {
            pool,
            thread,
            url,
            queries: Arc::new(queries),
            dialect,
            id_type: settings.schema.user_id_type,
            timeout: settings.timeout,
            outage: Mutex::new(None),
            sessions: TtlCache::new(settings.cache_ttl, settings.cache_size),
            users: TtlCache::new(settings.cache_ttl, settings.cache_size),
        })
    }

    /// Runs `query` on the database's thread; the deadline is kept here, and a query
    /// that passes it is aborted. A query that fails on a broken connection (the server
    /// restarted, failed over, or ended idle sessions) is run again on another, as many
    /// times as the pool has connections: the queries only read.
    async fn run<T, F>(
        &self,
        query: impl Fn(AnyPool, Arc<Queries>) -> F + Send + 'static,
    ) -> Result<T, DatabaseError>
    where
        F: std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'static,
        T: Send + 'static,
    {
        if let Some(why) = self.down() {
            return Err(DatabaseError::Down(why));
        }
        let (pool, sql) = (self.pool.clone(), self.queries.clone());
        let tries = self.pool.options().get_max_connections() + 1;
        let task = self.thread.handle.spawn(async move {
            let mut tried = 1;
            loop {
                match query(pool.clone(), sql.clone()).await {
                    Err(e) if tried < tries && broken_connection(&e) => tried += 1,
                    answer => return answer,
                }
            }
        });
        let answer = self.within(task).await;
        if let Err(e) = &answer {
            self.failed(e);
        }
        answer
    }

    /// Why the database is taken as down, if it is.
    fn down(&self) -> Option<String> {
        // unwrap: nothing panics while the outage is locked.
        let outage = self.outage.lock().unwrap();
        let (until, why) = outage.as_ref()?;
        (Instant::now() < *until).then(|| why.clone())
    }

    /// Takes the database as down for [`OUTAGE_PAUSE`]; logs when an outage begins.
    fn failed(&self, error: &DatabaseError) {
        let why = error.to_string();
        // unwrap: see `down`.
        let mut outage = self.outage.lock().unwrap();
        let new = outage.is_none();
        *outage = Some((Instant::now() + OUTAGE_PAUSE, why.clone()));
        drop(outage);
        if new {
            warn!(
                "django database failed: {why}; handshakes that need it get 503 until it answers"
            );
        }
    }

    /// Ends an outage after a query that worked.
    fn answered(&self) {
        // unwrap: see `down`.
        if self.outage.lock().unwrap().take().is_some() {
            info!("django database answers again");
        }
    }

    /// The `session_data` of an unexpired session row.
    pub async fn session_data(&self, session_key: &str) -> Result<Option<String>, DatabaseError> {
        let key = session_key.to_string();
        if let Some(data) = self.sessions.get(&key) {
            return Ok(Some(data));
        }
        let bound = key.clone();
        let data = self
            .run(move |pool, sql| {
                let bound = bound.clone();
                async move {
                    let row = sqlx::query(&sql.session)
                        .bind(bound)
                        .fetch_optional(&pool)
                        .await?;
                    row.map(|r| text(&r, 0)).transpose()
                }
            })
            .await?;
        self.answered();
        if let Some(data) = data
            .as_ref()
            .filter(|d| d.len() <= MAX_CACHED_SESSION_BYTES)
        {
            self.sessions.put(key, data.clone());
        }
        Ok(data)
    }

    /// The user whose primary key is `id` (as `_auth_user_id` holds it), with groups.
    pub async fn user(&self, id: &str) -> Result<Option<Arc<User>>, DatabaseError> {
        if let Some(user) = self.users.get(&id.to_string()) {
            return Ok(user);
        }
        let Some(key) = UserKey::of(id, self.id_type, self.dialect) else {
            return Ok(None);
        };
        let user = self
            .run(move |pool, sql| {
                let key = key.clone();
                async move {
                    let mut conn = pool.acquire().await?;
                    let found = key
                        .bind(sqlx::query(&sql.user))
                        .fetch_optional(&mut *conn)
                        .await?;
                    let Some(row) = found else {
                        return Ok(None);
                    };
                    let groups = key
                        .bind(sqlx::query(&sql.groups))
                        .fetch_all(&mut *conn)
                        .await?
                        .iter()
                        .map(|r| text(r, 0))
                        .collect::<Result<_, _>>()?;
                    Ok(Some(Arc::new(User {
                        name: text(&row, 0)?,
                        active: text(&row, 1)? == "y",
                        password: text(&row, 2)?,
                        groups,
                    })))
                }
            })
            .await?;
        self.answered();
        self.users.put(id.to_string(), user.clone());
        Ok(user)
    }

    /// Connects without the pool (so that the error is the connection's own) and runs
    /// the session, user and group queries once with keys no row has: a wrong table or
    /// column shows here, not at the first login. For `--check-config`.
    pub async fn probe(&self) -> Result<(), DatabaseError> {
        let url = self.url.clone();
        let sql = self.queries.clone();
        let key = UserKey::of(&self.id_type.unused_id(), self.id_type, self.dialect);
        let task = self.thread.handle.spawn(async move {
            let mut conn = AnyConnection::connect(url.expose()).await?;
            sqlx::query(&sql.session)
                .bind(String::new())
                .fetch_optional(&mut conn)
                .await?;
            if let Some(key) = key {
                key.bind(sqlx::query(&sql.user))
                    .fetch_optional(&mut conn)
                    .await?;
                key.bind(sqlx::query(&sql.groups))
                    .fetch_all(&mut conn)
                    .await?;
            }
            conn.close().await
        });
        self.within(task).await
    }

    /// The answer of a query task, if it comes within the deadline; else the task is
    /// aborted.
    async fn within<T>(
        &self,
        task: tokio::task::JoinHandle<Result<T, sqlx::Error>>,
    ) -> Result<T, DatabaseError> {
        let abort = task.abort_handle();
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(answer)) => answer.map_err(DatabaseError::Query),
            Ok(Err(e)) => Err(DatabaseError::Task(e.to_string())),
            Err(_) => {
                abort.abort();
                Err(DatabaseError::Timeout(self.timeout))
            }
        }
    }
}

/// Whether `error` says the connection is gone rather than the query wrong: I/O and
/// protocol errors, and the server's connection exceptions (SQLSTATE class 08) and
/// operator interventions (57, as when it shuts down or ends a session).
fn broken_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
        _ => false,
    }
}

/// The URL as the driver takes it: `mariadb:` is `mysql:`, and SQLite opens read-only
/// (Django writes).
fn driver_url(url: &str, dialect: Dialect) -> String {
    let mut url = url.replacen("mariadb:", "mysql:", 1);
    if dialect == Dialect::Sqlite && !url.contains('?') {
        url.push_str("?mode=ro");
    }
    url
}

impl UserIdType {
    /// A primary key no user has, for probing.
    fn unused_id(self) -> String {
        match self {
            UserIdType::Integer => "-1".into(),
            UserIdType::Text => String::new(),
            UserIdType::Uuid => "00000000-0000-0000-0000-000000000000".into(),
        }
    }
}

/// `_auth_user_id` as bound.
#[derive(Clone)]
enum UserKey {
    Integer(i64),
    Text(String),
}

impl UserKey {
    /// `None` when `id` cannot be a key of this type (no user has it).
    fn of(id: &str, kind: UserIdType, dialect: Dialect) -> Option<UserKey> {
        match kind {
            UserIdType::Integer => id.parse().ok().map(UserKey::Integer),
            UserIdType::Text => Some(UserKey::Text(id.to_string())),
            // PostgreSQL casts the text; elsewhere Django stores 32 hex digits.
            UserIdType::Uuid if dialect == Dialect::Postgres => Some(UserKey::Text(id.into())),
            UserIdType::Uuid => Some(UserKey::Text(id.replace('-', "").to_ascii_lowercase())),
        }
    }

    fn bind<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        match self {
            UserKey::Integer(n) => query.bind(*n),
            UserKey::Text(s) => query.bind(s.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema {
            session_table: "django_session".into(),
            user_table: "auth_user".into(),
            user_id_column: "id".into(),
            user_id_type: UserIdType::Integer,
            username_column: "username".into(),
            active_column: "is_active".into(),
            group_table: "auth_group".into(),
            user_groups_table: "auth_user_groups".into(),
            user_groups_column: "user_id".into(),
        }
    }

    #[test]
    fn only_plain_identifiers_become_sql() {
        assert!(Queries::new(&schema(), Dialect::Postgres).is_ok());
        let mut bad = schema();
        bad.user_table = "auth_user; DROP TABLE x".into();
        assert!(Queries::new(&bad, Dialect::MySql).is_err());
        let mut bad = schema();
        bad.username_column = "a.b.c".into();
        assert!(Queries::new(&bad, Dialect::Sqlite).is_err());
        let mut custom = schema();
        custom.user_table = "accounts.member".into();
        custom.active_column = String::new();
        let q = Queries::new(&custom, Dialect::Postgres).unwrap();
        assert!(q
            .user
            .contains("'y', password FROM accounts.member WHERE id = $1"));
    }

    #[test]
    fn the_scheme_picks_the_dialect() {
        assert_eq!(Dialect::of("postgres://u@h/db").unwrap(), Dialect::Postgres);
        assert_eq!(Dialect::of("mariadb://u@h/db").unwrap(), Dialect::MySql);
        assert_eq!(
            Dialect::of("sqlite:///tmp/db.sqlite3").unwrap(),
            Dialect::Sqlite
        );
        assert!(Dialect::of("oracle://x").is_err());
    }
}
