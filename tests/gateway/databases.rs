//! Database servers of the tests' own: a PostgreSQL and a MariaDB on free ports, each in a
//! temporary directory, for the identity sources that read Django's database.
//!
//! They never touch the machine's own database services. When the tests run as root, the
//! servers run as `nobody` (initdb and mariadbd refuse root). A server a test starts stops
//! when the test drops it; the shared ones ([`shared_postgres`], [`shared_mariadb`]) stop
//! when the test binary exits, through an `atexit` handler, and also when it dies without
//! running one (the kernel signals them: `PR_SET_PDEATHSIG`).

use std::ffi::{c_int, OsStr};
use std::future::Future;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::harness::{free_port, TempDir, WAIT};

/// The bound for making a data directory and for a server to accept connections: both
/// take a few seconds at most, this only catches a server that never will.
const START_WAIT: Duration = Duration::from_secs(60);

/// A PostgreSQL server of the test's own: `postgres` superuser, trust authentication,
/// listening on 127.0.0.1 only, with a database `wsrelay`.
pub struct Postgres {
    port: u16,
    bin: PathBuf,
    _server: Server,
}

impl Postgres {
    /// Makes a data directory (`initdb`) and starts `postgres` on a free port; returns once
    /// a query succeeds and the database `wsrelay` exists.
    pub async fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = server_dir("postgres");
        let data = dir.join("data");
        let mut initdb = as_server_user(bin.join("initdb"), &dir);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        run(initdb, "initdb").await;
        let port = free_port();
        let mut postgres = as_server_user(bin.join("postgres"), &dir);
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&*dir)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            // Room for the pools of many gateways and sites sharing the server.
            .args(["-c", "max_connections=300"]);
        // SIGQUIT: immediate shutdown, which still removes the server's shared memory.
        let mut server = Server::spawn("postgres", postgres, libc::SIGQUIT, dir, "postgres.log");
        server
            .wait_ready(|| try_run(psql(&bin, port, "postgres", "SELECT 1")))
            .await;
        let pg = Postgres {
            port,
            bin,
            _server: server,
        };
        pg.query("postgres", "CREATE DATABASE wsrelay").await;
        pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/wsrelay`.
    pub fn url(&self) -> String {
        self.url_of("wsrelay")
    }

    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database `name` (letters, digits and `_`) and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        check_name(name);
        self.query("postgres", &format!("CREATE DATABASE \"{name}\""))
            .await;
        self.url_of(name)
    }

    /// Runs `sql` in `database` (psql, one statement or several) and returns what it
    /// printed: unaligned rows, `|` between columns, no header.
    pub async fn query(&self, database: &str, sql: &str) -> String {
        run(psql(&self.bin, self.port, database, sql), "psql").await
    }
}

fn psql(bin: &Path, port: u16, database: &str, sql: &str) -> Command {
    let mut psql = Command::new(bin.join("psql"));
    psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", database, "-c", sql]);
    psql
}

/// A MariaDB server of the test's own, listening on 127.0.0.1 only: user
/// [`MariaDb::USER`] with password [`MariaDb::PASSWORD`] may do anything from
/// 127.0.0.1, and a database `wsrelay` (utf8mb4) exists.
pub struct MariaDb {
    port: u16,
    socket: PathBuf,
    _server: Server,
}

impl MariaDb {
    pub const USER: &'static str = "wsrelay";
    pub const PASSWORD: &'static str = "wsrelay";

    /// Makes a data directory (`mariadb-install-db`, which also creates the user and the
    /// database) and starts `mariadbd` on a free port; returns once the user can query the
    /// database over TCP.
    pub async fn start() -> MariaDb {
        let dir = server_dir("mariadb");
        let data = dir.join("data");
        let socket = dir.join("mariadbd.sock");
        let init = dir.join("init.sql");
        let (user, password) = (Self::USER, Self::PASSWORD);
        // Bootstrap runs without grant tables until they are loaded.
        std::fs::write(
            &init,
            format!(
                "FLUSH PRIVILEGES;\n\
                 CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}';\n\
                 GRANT ALL PRIVILEGES ON *.* TO '{user}'@'127.0.0.1' WITH GRANT OPTION;\n\
                 CREATE DATABASE wsrelay {CHARSET};\n"
            ),
        )
        .unwrap();
        // Options install-db does not know go to the bootstrap server; the log size has to
        // match the one the server starts with.
        let mut install = as_server_user("mariadb-install-db", &dir);
        install
            .args(["--no-defaults", "--auth-root-authentication-method=normal"])
            .args(["--skip-test-db", "--skip-name-resolve"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--extra-file={}", init.display()))
            .args(SERVER_OPTIONS);
        run(install, "mariadb-install-db").await;
        let port = free_port();
        let mut mariadbd = as_server_user(mariadbd_path(), &dir);
        mariadbd
            .arg("--no-defaults")
            .args(SERVER_OPTIONS)
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg(format!("--tmpdir={}", dir.display()))
            .arg(format!("--port={port}"))
            .args(["--bind-address=127.0.0.1", "--skip-networking=0"])
            .args(["--skip-log-bin", "--skip-name-resolve"])
            .args([
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
            ]);
        let mut server = Server::spawn("mariadbd", mariadbd, libc::SIGKILL, dir, "mariadbd.log");
        // Over TCP as the tests' user: the way the gateway and Django connect.
        server
            .wait_ready(|| {
                let mut client = Command::new("mariadb");
                client
                    .args(["--no-defaults", "--protocol=tcp", "-h", "127.0.0.1"])
                    .arg(format!("--port={port}"))
                    .arg(format!("--user={user}"))
                    .arg(format!("--password={password}"))
                    .args(["-e", "SELECT 1", "wsrelay"]);
                try_run(client)
            })
            .await;
        MariaDb {
            port,
            socket,
            _server: server,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mysql://wsrelay:wsrelay@127.0.0.1:<port>/wsrelay`.
    pub fn url(&self) -> String {
        self.url_of("wsrelay")
    }

    pub fn url_of(&self, database: &str) -> String {
        format!(
            "mysql://{}:{}@127.0.0.1:{}/{database}",
            Self::USER,
            Self::PASSWORD,
            self.port
        )
    }

    /// Creates an empty database `name` (letters, digits and `_`; utf8mb4) and returns its
    /// URL.
    pub async fn create_database(&self, name: &str) -> String {
        check_name(name);
        self.query("mysql", &format!("CREATE DATABASE `{name}` {CHARSET}"))
            .await;
        self.url_of(name)
    }

    /// Runs `sql` in `database` as MariaDB's root (through the server's socket) and returns
    /// what it printed: tab-separated rows, no header.
    pub async fn query(&self, database: &str, sql: &str) -> String {
        let mut client = Command::new("mariadb");
        client
            .args([
                "--no-defaults",
                "--batch",
                "--skip-column-names",
                "-u",
                "root",
            ])
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-e", sql, database]);
        run(client, "mariadb").await
    }
}

const CHARSET: &str = "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci";

/// What both the bootstrap and the server run with: small, and no durability.
const SERVER_OPTIONS: [&str; 3] = [
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=4M",
    "--innodb-flush-log-at-trx-commit=0",
];

/// The PostgreSQL server started once for this test binary; tests take a database of
/// their own with [`Postgres::create_database`].
pub async fn shared_postgres() -> &'static Postgres {
    static SHARED: tokio::sync::OnceCell<Postgres> = tokio::sync::OnceCell::const_new();
    SHARED.get_or_init(Postgres::start).await
}

/// The MariaDB server started once for this test binary; tests take a database of their
/// own with [`MariaDb::create_database`].
pub async fn shared_mariadb() -> &'static MariaDb {
    static SHARED: tokio::sync::OnceCell<MariaDb> = tokio::sync::OnceCell::const_new();
    SHARED.get_or_init(MariaDb::start).await
}

fn check_name(name: &str) {
    assert!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "database names here are letters, digits and `_`: {name:?}"
    );
}

/// Debian keeps each PostgreSQL major version's server programs in
/// `/usr/lib/postgresql/<version>/bin`; the newest is used. Elsewhere they are looked up
/// on `PATH`.
fn postgres_bin() -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten();
    versions
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .unwrap_or_default()
}

/// Debian installs `mariadbd` in `/usr/sbin`, which is not on every user's `PATH`.
fn mariadbd_path() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/mariadbd");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("mariadbd")
    }
}

/// The user and group the servers run as: `nobody` when the tests run as root, the tests'
/// own otherwise (`None`).
fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, "nobody"]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            text.trim().parse().unwrap_or_else(|_| {
                panic!(
                    "the tests run as root and need the user `nobody` to run database servers as"
                )
            })
        };
        Some((id("-u"), id("-g")))
    })
}

/// A temporary directory the server user owns.
fn server_dir(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(&*dir, Some(uid), Some(gid)).unwrap();
    }
    dir
}

/// A command that runs as the server user, in `dir`.
fn as_server_user(program: impl AsRef<OsStr>, dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir).env("HOME", dir).stdin(Stdio::null());
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Runs a command to its end (bounded) and returns its standard output; panics with its
/// output when it fails.
async fn run(cmd: Command, what: &str) -> String {
    try_run(cmd)
        .await
        .unwrap_or_else(|failure| panic!("{what}: {failure}"))
}

async fn try_run(cmd: Command) -> Result<String, String> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = match tokio::time::timeout(START_WAIT, cmd.output()).await {
        Err(_) => return Err(format!("did not end within {START_WAIT:?}")),
        Ok(Err(e)) => return Err(format!("could not run it ({e}); .ci/run installs it")),
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!("{}\n{stdout}{stderr}", output.status))
    }
}

/// A server process and its directory; dropping it stops the process, then removes the
/// directory.
struct Server {
    what: &'static str,
    child: Option<Child>,
    stop: c_int,
    log: PathBuf,
    _dir: TempDir,
}

impl Server {
    /// Starts `cmd` with its output in `dir/<log>`; `stop` is the signal that ends it.
    fn spawn(what: &'static str, mut cmd: Command, stop: c_int, dir: TempDir, log: &str) -> Server {
        let log = dir.join(log);
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        let child = spawn_tied(cmd, stop)
            .unwrap_or_else(|e| panic!("{what} could not start ({e}); .ci/run installs it"));
        at_exit_registry().lock().unwrap().push(AtExit {
            pid: child.id(),
            stop,
            dir: dir.to_path_buf(),
        });
        Server {
            what,
            child: Some(child),
            stop,
            log,
            _dir: dir,
        }
    }

    /// Polls `ready` until it succeeds; panics with the server's log when the server
    /// ended or [`START_WAIT`] ran out.
    async fn wait_ready<F, Fut>(&mut self, mut ready: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<String, String>>,
    {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            let Err(failure) = ready().await else {
                return;
            };
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{} ended ({status}):\n{}", self.what, self.log());
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{} did not accept connections within {START_WAIT:?} ({failure}):\n{}",
                    self.what,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        at_exit_registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|entry| entry.pid != pid);
        stop_process(pid, self.stop, || {
            child.try_wait().map_or(true, |status| status.is_some())
        });
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.what, self.log());
        }
    }
}

/// Sends `signal`, waits (bounded) until `exited`, then kills.
fn stop_process(pid: u32, signal: c_int, mut exited: impl FnMut() -> bool) {
    let pid = pid as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; `pid` is a child of this process
    // that was not reaped yet, so it names no other process.
    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + WAIT;
    while !exited() {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `cmd` so that the kernel sends it `signal` when this test process ends, however
/// it ends. `PR_SET_PDEATHSIG` is set in the child after it changed user (a change of user
/// clears it) and fires when the *thread* that forked the child ends, not the process, so
/// every server is forked by one thread that lives as long as the process.
pub(crate) fn spawn_tied(mut cmd: Command, signal: c_int) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static FORKER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl and
    // getppid, which are async-signal-safe, and allocates nothing on success.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The test process may have ended before prctl: then nothing would signal us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the test process ended"));
            }
            Ok(())
        });
    }
    let forker = FORKER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("server-forker".into())
            .spawn(move || {
                for (mut cmd, reply) in incoming {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .unwrap();
        requests
    });
    let (reply, answer) = mpsc::channel();
    forker.send((cmd, reply)).unwrap();
    answer.recv().unwrap()
}

/// A server still running, to stop when the process exits: the shared servers live in
/// statics, which are never dropped.
struct AtExit {
    pid: u32,
    stop: c_int,
    dir: PathBuf,
}

static AT_EXIT: OnceLock<Mutex<Vec<AtExit>>> = OnceLock::new();

fn at_exit_registry() -> &'static Mutex<Vec<AtExit>> {
    AT_EXIT.get_or_init(|| {
        // SAFETY: `stop_at_exit` takes no arguments and does not unwind.
        unsafe { libc::atexit(stop_at_exit) };
        Mutex::new(Vec::new())
    })
}

extern "C" fn stop_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let Some(registry) = AT_EXIT.get() else {
            return;
        };
        let left = std::mem::take(&mut *registry.lock().unwrap_or_else(|e| e.into_inner()));
        for entry in &left {
            stop_process(entry.pid, entry.stop, || {
                let mut status = 0;
                // SAFETY: waitpid writes only `status`; `pid` is our unreaped child (the
                // `Child` in the static is never waited on). -1 (no such child) ends too.
                unsafe { libc::waitpid(entry.pid as libc::pid_t, &mut status, libc::WNOHANG) != 0 }
            });
            let _ = std::fs::remove_dir_all(&entry.dir);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The URLs say how to reach the `wsrelay` databases, as clients other than the tests'
    /// own helpers read them.
    #[tokio::test]
    async fn urls_reach_the_wsrelay_databases() {
        let pg = shared_postgres().await;
        assert!(
            pg.url().contains(&format!(":{}/", pg.port())),
            "{}",
            pg.url()
        );
        let mut psql = Command::new(pg.bin.join("psql"));
        psql.args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT current_user, current_database()",
        ])
        .arg(pg.url());
        assert_eq!(run(psql, "psql").await.trim(), "postgres|wsrelay");

        let db = shared_mariadb().await;
        let url = db.url();
        let expected = format!("mysql://wsrelay:wsrelay@127.0.0.1:{}/wsrelay", db.port());
        assert_eq!(url, expected);
        let mut client = Command::new("mariadb");
        client
            .args([
                "--no-defaults",
                "--batch",
                "--skip-column-names",
                "--protocol=tcp",
            ])
            .args(["-h", "127.0.0.1", "-P", &db.port().to_string()])
            .args(["-u", MariaDb::USER, &format!("-p{}", MariaDb::PASSWORD)])
            .args([
                "-e",
                "SELECT CURRENT_USER(), DATABASE(), @@character_set_database",
            ])
            .arg("wsrelay");
        let row = run(client, "mariadb").await;
        assert_eq!(row.trim(), "wsrelay@127.0.0.1\twsrelay\tutf8mb4");
    }
}
