//! Django's own database, read-only: session rows (`db` and `cached_db` engines), the
//! logged-in user's row, and the user's groups, live.
//!
//! One small sqlx pool; the URL's scheme picks the driver (`postgres://`, `mysql://` or
//! `mariadb://`, `sqlite://`). Table and column names come from the configuration
//! (defaults: Django's `auth_user`, `auth_group`, `auth_user_groups`, `django_session`)
//! and are checked to be plain SQL identifiers before any query is built; values are
//! always bound, never spliced.
//!
//! Every query runs on the runtime that built the pool (the process's main runtime), so
//! the pool's connections stay on one reactor whichever worker thread asked; each has a
//! deadline. Answers are cached per session key and per user for `cache_ttl` (at most
//! `cache_size` entries each), so a reconnect storm costs one query per user, and a
//! change in the database (logout, password, groups, `is_active`) applies within
//! `cache_ttl`.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

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

    fn param(self) -> &'static str {
        match self {
            Dialect::Postgres => "$1",
            Dialect::MySql | Dialect::Sqlite => "?",
        }
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

/// Where Django keeps sessions, users and groups (`identity.django.*` names).
#[derive(Debug, Clone)]
pub struct Schema {
    pub session_table: String,
    pub user_table: String,
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
    /// Row counts of the session, user and membership tables.
    counts: [String; 3],
}

impl Queries {
    fn new(schema: &Schema, dialect: Dialect) -> Result<Queries, String> {
        for (setting, name) in [
            ("session_table", &schema.session_table),
            ("user_table", &schema.user_table),
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
        Ok(Queries {
            session: format!(
                "SELECT session_data FROM {} WHERE session_key = {p} AND expire_date > {}",
                schema.session_table,
                dialect.now()
            ),
            user: format!(
                "SELECT {}, {active}, password FROM {} WHERE id = {p}",
                schema.username_column, schema.user_table
            ),
            groups: format!(
                "SELECT g.name FROM {} g JOIN {} m ON m.group_id = g.id WHERE m.{} = {p} \
                 ORDER BY g.name LIMIT {MAX_GROUPS_READ}",
                schema.group_table, schema.user_groups_table, schema.user_groups_column
            ),
            counts: [
                &schema.session_table,
                &schema.user_table,
                &schema.user_groups_table,
            ]
            .map(|table| format!("SELECT COUNT(*) FROM {table}")),
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
}

/// A bounded map whose entries expire; a TTL of zero caches nothing.
struct TtlCache<K, V> {
    ttl: Duration,
    size: usize,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    fn new(ttl: Duration, size: usize) -> Self {
        TtlCache {
            ttl,
            size,
            entries: Mutex::default(),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        // unwrap: nothing panics while the map is locked.
        let entries = self.entries.lock().unwrap();
        let (at, value) = entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    fn put(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        // unwrap: see `get`.
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= self.size {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        if entries.len() < self.size {
            entries.insert(key, (Instant::now(), value));
        }
    }
}

/// Settings of the pool and its caches.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: String,
    pub schema: Schema,
    pub pool_size: u32,
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// Django's database, read through a pool owned by the main runtime.
pub struct Database {
    pool: AnyPool,
    queries: Arc<Queries>,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    sessions: TtlCache<String, Option<String>>,
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
    /// Builds the pool without connecting. Must run inside the runtime that will run
    /// the queries.
    pub fn new(settings: DatabaseSettings) -> Result<Database, String> {
        let dialect = Dialect::of(&settings.url)?;
        let queries = Queries::new(&settings.schema, dialect)?;
        sqlx::any::install_default_drivers();
        let mut url = settings.url.replacen("mariadb:", "mysql:", 1);
        if dialect == Dialect::Sqlite && !url.contains('?') {
            // The gateway only reads; Django writes.
            url.push_str("?mode=ro");
        }
        let pool = AnyPoolOptions::new()
            .max_connections(settings.pool_size.max(1))
            .min_connections(0)
            .acquire_timeout(settings.timeout)
            .connect_lazy(&url)
            .map_err(|e| e.to_string())?;
        Ok(Database {
            pool,
            queries: Arc::new(queries),
            timeout: settings.timeout,
            runtime: tokio::runtime::Handle::current(),
            sessions: TtlCache::new(settings.cache_ttl, settings.cache_size),
            users: TtlCache::new(settings.cache_ttl, settings.cache_size),
        })
    }

    /// Runs `query` on the pool's runtime, with the deadline.
    async fn run<T, F>(
        &self,
        query: impl FnOnce(AnyPool, Arc<Queries>) -> F,
    ) -> Result<T, DatabaseError>
    where
        F: std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let timeout = self.timeout;
        let task = query(self.pool.clone(), self.queries.clone());
        let answer = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, task).await })
            .await
            .map_err(|e| DatabaseError::Task(e.to_string()))?;
        Ok(answer.map_err(|_| DatabaseError::Timeout(timeout))??)
    }

    /// The `session_data` of an unexpired session row.
    pub async fn session_data(&self, session_key: &str) -> Result<Option<String>, DatabaseError> {
        let key = session_key.to_string();
        if let Some(data) = self.sessions.get(&key) {
            return Ok(data);
        }
        let bound = key.clone();
        let data = self
            .run(|pool, sql| async move {
                let row = sqlx::query(&sql.session)
                    .bind(bound)
                    .fetch_optional(&pool)
                    .await?;
                row.map(|r| text(&r, 0)).transpose()
            })
            .await?;
        self.sessions.put(key, data.clone());
        Ok(data)
    }

    /// The user whose primary key is `id` (as `_auth_user_id` holds it), with groups.
    pub async fn user(&self, id: &str) -> Result<Option<Arc<User>>, DatabaseError> {
        if let Some(user) = self.users.get(&id.to_string()) {
            return Ok(user);
        }
        let key = UserKey::of(id);
        let user = self
            .run(|pool, sql| async move {
                let Some(row) = key
                    .bind(sqlx::query(&sql.user))
                    .fetch_optional(&pool)
                    .await?
                else {
                    return Ok(None);
                };
                let groups = key
                    .bind(sqlx::query(&sql.groups))
                    .fetch_all(&pool)
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
            })
            .await?;
        self.users.put(id.to_string(), user.clone());
        Ok(user)
    }

    /// Counts the rows of each table read (for `--check-config`): session rows,
    /// users, and group memberships.
    pub async fn probe(&self) -> Result<[i64; 3], DatabaseError> {
        self.run(|pool, sql| async move {
            let mut counts = [0; 3];
            for (count, query) in counts.iter_mut().zip(&sql.counts) {
                *count = sqlx::query(query).fetch_one(&pool).await?.try_get(0)?;
            }
            Ok(counts)
        })
        .await
    }
}

/// `_auth_user_id` as bound: an integer when it is one (Django's default `AutoField`),
/// text otherwise.
#[derive(Clone)]
enum UserKey {
    Integer(i64),
    Text(String),
}

impl UserKey {
    fn of(id: &str) -> UserKey {
        match id.parse() {
            Ok(n) => UserKey::Integer(n),
            Err(_) => UserKey::Text(id.to_string()),
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

    #[test]
    fn the_cache_expires_and_stays_bounded() {
        let cache = TtlCache::new(Duration::from_secs(60), 2);
        cache.put("a", 1);
        cache.put("b", 2);
        cache.put("c", 3);
        assert_eq!((cache.get(&"a"), cache.get(&"c")), (Some(1), None));
        let off = TtlCache::new(Duration::ZERO, 2);
        off.put("a", 1);
        assert_eq!(off.get(&"a"), None);
    }
}
