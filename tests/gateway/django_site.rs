//! A real Django site for the identity tests: `tests/django/site.py` in a Python of its
//! own, driven one JSON line at a time (see `tests/django/README.md`).
//!
//! The site creates users and groups in Django's database and logs users in the way a
//! Django site does, with any session engine, so that the gateway is tested against
//! what Django really writes. It also answers with Django's own verdict on a session
//! ([`DjangoSite::session_user`]), for the gateway to agree with.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// Start-up includes applying the migrations of contenttypes, auth and sessions.
const START_WAIT: Duration = Duration::from_secs(60);
/// The bound for one command; each takes milliseconds.
const COMMAND_WAIT: Duration = Duration::from_secs(30);

/// What the Django site is configured with.
#[derive(Clone, Debug, Default)]
pub struct DjangoSiteSettings {
    /// `postgres://user@host:port/name`, `mysql://user:password@host:port/name` or
    /// `sqlite:///absolute/path`.
    pub database_url: String,
    /// The Redis of Django's cache (django-redis), which holds the `cache` and `cached_db`
    /// sessions. Empty: Django's local-memory cache, which only the site itself sees.
    pub redis_url: String,
    /// The cache's `KEY_PREFIX`.
    pub cache_key_prefix: String,
    pub secret_key: String,
    pub secret_key_fallbacks: Vec<String>,
}

/// A Django session engine (`django.contrib.sessions.backends.<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEngine {
    Db,
    CachedDb,
    Cache,
    SignedCookies,
}

impl SessionEngine {
    pub const ALL: [SessionEngine; 4] = [
        SessionEngine::Db,
        SessionEngine::CachedDb,
        SessionEngine::Cache,
        SessionEngine::SignedCookies,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SessionEngine::Db => "db",
            SessionEngine::CachedDb => "cached_db",
            SessionEngine::Cache => "cache",
            SessionEngine::SignedCookies => "signed_cookies",
        }
    }
}

/// The running site. Commands are serialized; each waits at most [`COMMAND_WAIT`] and
/// panics with the site's error and standard error when it fails.
pub struct DjangoSite {
    child: Child,
    io: tokio::sync::Mutex<Io>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Ends when the site closes its standard error.
    stderr_reader: Mutex<Option<std::thread::JoinHandle<()>>>,
    settings: DjangoSiteSettings,
    /// What the site reported when it was ready: `{"django", "python", "database"}`.
    pub versions: Value,
}

struct Io {
    stdin: ChildStdin,
    answers: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl DjangoSite {
    /// Starts the site and applies Django's migrations to its database.
    pub async fn start(settings: DjangoSiteSettings) -> DjangoSite {
        let python = python();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(&python)
            .arg(root.join("tests/django/site.py"))
            .current_dir(root)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .env("WSRELAY_DJANGO_DATABASE_URL", &settings.database_url)
            .env("WSRELAY_DJANGO_REDIS_URL", &settings.redis_url)
            .env(
                "WSRELAY_DJANGO_CACHE_KEY_PREFIX",
                &settings.cache_key_prefix,
            )
            .env("WSRELAY_DJANGO_SECRET_KEY", &settings.secret_key)
            .env(
                "WSRELAY_DJANGO_SECRET_KEY_FALLBACKS",
                json!(settings.secret_key_fallbacks).to_string(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}. {SETUP}", python.display()));
        let (lines, answers) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let errors = child.stderr.take().unwrap();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(errors).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdin = child.stdin.take().unwrap();
        let mut site = DjangoSite {
            child,
            io: tokio::sync::Mutex::new(Io { stdin, answers }),
            stderr,
            stderr_reader: Mutex::new(Some(stderr_reader)),
            settings,
            versions: Value::Null,
        };
        let ready = {
            let mut io = site.io.lock().await;
            site.answer(&mut io.answers, START_WAIT, "start").await
        };
        site.versions = match ready.get("ready") {
            Some(versions) => versions.clone(),
            None => site.fail("start", &format!("unexpected first line {ready}")),
        };
        site
    }

    pub fn settings(&self) -> &DjangoSiteSettings {
        &self.settings
    }

    /// Creates a user (and the groups it is put in, when they do not exist yet); returns
    /// its id.
    pub async fn create_user(
        &self,
        name: &str,
        password: &str,
        active: bool,
        groups: &[&str],
    ) -> i64 {
        let id = self
            .call(json!({
                "cmd": "create_user", "name": name, "password": password,
                "active": active, "groups": groups,
            }))
            .await;
        id.as_i64().expect("a user id")
    }

    /// Logs `name` in with `engine` (`django.contrib.auth.login` through the test client's
    /// `force_login`, which does not check the password or `is_active`); returns the
    /// `sessionid` cookie value. The session holds Django's fields only.
    pub async fn login(&self, name: &str, engine: SessionEngine) -> String {
        let key = self
            .call(json!({"cmd": "login", "name": name, "engine": engine.name()}))
            .await;
        key.as_str().expect("a session key").to_string()
    }

    /// [`login`](Self::login) with another `SECRET_KEY`: the session (when signed) and its
    /// `_auth_user_hash` are made with `secret_key`, as a site did before its key changed.
    pub async fn login_with_key(
        &self,
        name: &str,
        engine: SessionEngine,
        secret_key: &str,
    ) -> String {
        let key = self
            .call(json!({
                "cmd": "login", "name": name, "engine": engine.name(), "secret_key": secret_key,
            }))
            .await;
        key.as_str().expect("a session key").to_string()
    }

    /// A session as a stock ws4redis site has it: Django's login fields and
    /// `ws4redis:memberof` (stored by a `user_logged_in` receiver during the login), no
    /// `wsrelay:username`. Returns the `sessionid` cookie value.
    pub async fn stock_ws4redis_session(
        &self,
        name: &str,
        engine: SessionEngine,
        memberof: &[&str],
    ) -> String {
        let key = self
            .call(json!({
                "cmd": "stock_ws4redis_session", "name": name, "engine": engine.name(),
                "memberof": memberof,
            }))
            .await;
        key.as_str().expect("a session key").to_string()
    }

    /// Adds the user to `group`, creating the group when needed.
    pub async fn add_to_group(&self, name: &str, group: &str) {
        self.call(json!({"cmd": "add_to_group", "name": name, "group": group}))
            .await;
    }

    pub async fn remove_from_group(&self, name: &str, group: &str) {
        self.call(json!({"cmd": "remove_from_group", "name": name, "group": group}))
            .await;
    }

    /// `user.set_password` and save: the password hash changes, so sessions made before
    /// no longer match their `_auth_user_hash`.
    pub async fn set_password(&self, name: &str, password: &str) {
        self.call(json!({"cmd": "set_password", "name": name, "password": password}))
            .await;
    }

    pub async fn set_active(&self, name: &str, active: bool) {
        self.call(json!({"cmd": "set_active", "name": name, "active": active}))
            .await;
    }

    /// Ends a session as time does: its `django_session` row (db, cached_db) gets an
    /// `expire_date` in the past, and its cache entries (cache, cached_db) are deleted, as
    /// their TTL would have deleted them. A signed cookie cannot be expired on the server;
    /// asking for one, or for a session that is nowhere, panics.
    pub async fn expire_session(&self, session_key: &str) {
        let found = self
            .call(json!({"cmd": "expire_session", "session_key": session_key}))
            .await;
        self.check_found("expire_session", session_key, &found);
    }

    /// Ends a session as a logout does: its row and its cache entries are deleted.
    pub async fn delete_session(&self, session_key: &str) {
        let found = self
            .call(json!({"cmd": "delete_session", "session_key": session_key}))
            .await;
        self.check_found("delete_session", session_key, &found);
    }

    /// The `session_data` column of the session's `django_session` row, if there is one.
    pub async fn session_row(&self, session_key: &str) -> Option<String> {
        let row = self
            .call(json!({"cmd": "session_row", "session_key": session_key}))
            .await;
        row.as_str().map(str::to_string)
    }

    /// The Redis key under which Django's cache keeps the session for `engine` (`Cache` or
    /// `CachedDb`): `<KEY_PREFIX>:1:django.contrib.sessions.<engine><session key>`.
    pub async fn cache_key(&self, engine: SessionEngine, session_key: &str) -> String {
        assert!(
            matches!(engine, SessionEngine::Cache | SessionEngine::CachedDb),
            "{engine:?} sessions are not kept in the cache"
        );
        let keys = self
            .call(json!({"cmd": "session_cache_keys", "session_key": session_key}))
            .await;
        keys[engine.name()]
            .as_str()
            .expect("a cache key")
            .to_string()
    }

    /// The session as Django loads it with `engine`: empty when Django has none or
    /// refuses it (bad signature, expired). It does not check the user. Like a request
    /// would, it puts a `cached_db` session found only in the database back in the cache.
    pub async fn load_session(
        &self,
        engine: SessionEngine,
        session_key: &str,
    ) -> serde_json::Map<String, Value> {
        let data = self
            .call(
                json!({"cmd": "load_session", "engine": engine.name(), "session_key": session_key}),
            )
            .await;
        match data {
            Value::Object(map) => map,
            other => panic!("load_session answered {other}"),
        }
    }

    /// Django's own verdict on a session: the user name `django.contrib.auth.get_user`
    /// finds for it, or `None`. That checks the signature and expiry, that the user exists
    /// and is active, and `_auth_user_hash` against `SECRET_KEY` and its fallbacks. The
    /// session is left as it is (Django would delete one that failed the hash check).
    pub async fn session_user(&self, engine: SessionEngine, session_key: &str) -> Option<String> {
        let user = self
            .call(
                json!({"cmd": "session_user", "engine": engine.name(), "session_key": session_key}),
            )
            .await;
        user.as_str().map(str::to_string)
    }

    async fn call(&self, request: Value) -> Value {
        let what = request["cmd"].as_str().unwrap_or_default().to_string();
        let mut io = self.io.lock().await;
        let io = &mut *io;
        let sent = writeln!(io.stdin, "{request}").and_then(|()| io.stdin.flush());
        if let Err(e) = sent {
            self.fail(&what, &format!("the site is gone ({e})"));
        }
        let mut answer = self.answer(&mut io.answers, COMMAND_WAIT, &what).await;
        if let Some(error) = answer.get("error") {
            let traceback = answer["traceback"].as_str().unwrap_or_default();
            self.fail(&what, &format!("{error}\n{traceback}"));
        }
        answer["ok"].take()
    }

    async fn answer(
        &self,
        answers: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        wait: Duration,
        what: &str,
    ) -> Value {
        match tokio::time::timeout(wait, answers.recv()).await {
            Err(_) => self.fail(what, &format!("no answer within {wait:?}")),
            Ok(None) => {
                // Its last words (a traceback) may still be on their way.
                if let Some(reader) = self.stderr_reader.lock().unwrap().take() {
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    while !reader.is_finished() && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                self.fail(what, "the site ended")
            }
            Ok(Some(line)) => serde_json::from_str(&line)
                .unwrap_or_else(|e| self.fail(what, &format!("answered {line:?}: {e}"))),
        }
    }

    fn check_found(&self, what: &str, session_key: &str, found: &Value) {
        let in_db = found["db_row"].as_bool() == Some(true);
        let cached = found["cache"].as_array().is_some_and(|c| !c.is_empty());
        if !in_db && !cached {
            self.fail(
                what,
                &format!("no session {session_key:?} in the database or the cache"),
            );
        }
    }

    fn fail(&self, what: &str, why: &str) -> ! {
        let stderr = self.stderr.lock().unwrap().join("\n");
        panic!("Django site, {what}: {why}\n--- its standard error ---\n{stderr}");
    }
}

impl Drop for DjangoSite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SETUP: &str = "The Django site needs a Python with the packages of \
tests/django/requirements.txt; the tests make target/django-venv with them on first use \
(python3 with venv and access to the package registry are needed), or set \
WSRELAY_DJANGO_PYTHON to such an interpreter";

/// The longest making the virtual environment may take.
const INSTALL_LIMIT: Duration = Duration::from_secs(300);

/// `WSRELAY_DJANGO_PYTHON`, else the virtual environment `target/django-venv`, made (once
/// per test binary, and again when `tests/django/requirements.txt` changes) on first use.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("WSRELAY_DJANGO_PYTHON") {
        let python = PathBuf::from(python);
        assert!(
            python.exists(),
            "WSRELAY_DJANGO_PYTHON is {}, which does not exist. {SETUP}",
            python.display()
        );
        return python;
    }
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

/// Makes `target/django-venv` unless it exists with the current requirement list.
fn make_venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/django-venv");
    let python = venv.join("bin/python");
    let wanted = std::fs::read_to_string(root.join("tests/django/requirements.txt"))
        .expect("tests/django/requirements.txt");
    // Written last: an install that failed halfway is made again on the next run.
    let marker = venv.join("requirements.txt");
    if python.exists() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command, what: &str| {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}. {SETUP}"));
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut errors = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut errors);
            errors
        });
        let deadline = std::time::Instant::now() + INSTALL_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{what} took longer than {INSTALL_LIMIT:?}. {SETUP}");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let errors = errors.join().unwrap_or_default();
        assert!(
            status.success(),
            "{what} failed ({status}): {errors}\n{SETUP}"
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    );
    let packages: Vec<&str> = wanted.lines().filter(|l| !l.trim().is_empty()).collect();
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(&packages),
        "pip install",
    );
    std::fs::write(&marker, &wanted).unwrap();
    python
}

/// The site and the database servers work: users, logins with every engine, stock
/// ws4redis sessions and Django's verdicts, on each database.
mod smoke {
    use super::{DjangoSite, DjangoSiteSettings, SessionEngine};
    use crate::databases::{shared_mariadb, shared_postgres};
    use crate::harness::{RedisServer, TempDir};
    use serde_json::json;

    #[tokio::test]
    async fn postgres() {
        let url = shared_postgres()
            .await
            .create_database("django_smoke")
            .await;
        smoke(url).await;
    }

    #[tokio::test]
    async fn mariadb() {
        let url = shared_mariadb().await.create_database("django_smoke").await;
        smoke(url).await;
    }

    #[tokio::test]
    async fn sqlite() {
        let dir = TempDir::new("django-sqlite");
        smoke(format!("sqlite://{}", dir.join("db.sqlite3").display())).await;
    }

    async fn smoke(database_url: String) -> DjangoSite {
        let redis = RedisServer::start().await;
        let site = DjangoSite::start(DjangoSiteSettings {
            database_url,
            redis_url: redis.url(),
            cache_key_prefix: "site".into(),
            secret_key: "smoke-secret-new".into(),
            secret_key_fallbacks: vec!["smoke-secret-old".into()],
        })
        .await;
        let id = site.create_user("jane", "secret", true, &["staff"]).await;

        for engine in SessionEngine::ALL {
            let key = site.login("jane", engine).await;
            assert!(!key.is_empty(), "{engine:?}");
            assert_eq!(
                site.session_user(engine, &key).await.as_deref(),
                Some("jane")
            );
            let row = site.session_row(&key).await;
            let in_db = matches!(engine, SessionEngine::Db | SessionEngine::CachedDb);
            assert_eq!(row.is_some(), in_db, "{engine:?}: row {row:?}");
            if matches!(engine, SessionEngine::Cache | SessionEngine::CachedDb) {
                let cache_key = site.cache_key(engine, &key).await;
                let prefix = &site.settings().cache_key_prefix;
                assert!(cache_key.starts_with(&format!("{prefix}:1:django.contrib.sessions.")));
                assert!(
                    redis.get(&cache_key).await.is_some(),
                    "{engine:?}: {cache_key}"
                );
            }
            if engine == SessionEngine::SignedCookies {
                assert_eq!(key.matches(':').count(), 2, "a signed value: {key}");
            }
        }

        let stock = site
            .stock_ws4redis_session("jane", SessionEngine::Db, &["staff", "editors"])
            .await;
        let data = site.load_session(SessionEngine::Db, &stock).await;
        assert_eq!(data["ws4redis:memberof"], json!(["staff", "editors"]));
        assert_eq!(data["_auth_user_id"], json!(id.to_string()));
        assert!(data["_auth_user_hash"].is_string(), "{data:?}");
        assert!(!data.contains_key("wsrelay:username"), "{data:?}");

        // A session signed with the previous key is Django's as long as the key is a
        // fallback.
        let old = site
            .login_with_key("jane", SessionEngine::SignedCookies, "smoke-secret-old")
            .await;
        let user = site.session_user(SessionEngine::SignedCookies, &old).await;
        assert_eq!(user.as_deref(), Some("jane"));
        let other = site
            .login_with_key("jane", SessionEngine::Db, "some-other-key")
            .await;
        assert_eq!(site.session_user(SessionEngine::Db, &other).await, None);

        // Django's verdict follows the user's record and the session's life.
        site.set_active("jane", false).await;
        assert_eq!(site.session_user(SessionEngine::Db, &stock).await, None);
        site.set_active("jane", true).await;
        assert_eq!(
            site.session_user(SessionEngine::Db, &stock)
                .await
                .as_deref(),
            Some("jane")
        );
        let cached = site.login("jane", SessionEngine::CachedDb).await;
        site.expire_session(&cached).await;
        assert_eq!(
            site.session_user(SessionEngine::CachedDb, &cached).await,
            None
        );
        assert!(
            site.session_row(&cached).await.is_some(),
            "expired, not deleted"
        );
        site.set_password("jane", "changed").await;
        assert_eq!(site.session_user(SessionEngine::Db, &stock).await, None);
        site.add_to_group("jane", "editors").await;
        site.remove_from_group("jane", "staff").await;
        site.delete_session(&stock).await;
        assert_eq!(site.session_row(&stock).await, None);
        site
    }
}
