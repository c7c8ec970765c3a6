//! Handshake benchmark: WebSocket handshakes per second with identity from Django's own
//! database (PostgreSQL), cold and cached, beside a baseline without identity, in the
//! same run. Results go to `benches/RESULTS.md`.
//!
//! ```sh
//! cargo bench --bench identity                 # baseline, cold and cached, 3 runs each
//! cargo bench --bench identity -- cold         # some scenarios only
//! ```
//!
//! Knobs (environment): `WSRELAY_BENCH_USERS` (1000: users, each with one session),
//! `WSRELAY_BENCH_PASSES` (10: measured handshakes are this many passes over the
//! sessions), `WSRELAY_BENCH_CONCURRENCY` (32 in flight), `WSRELAY_BENCH_POOL` (4:
//! `identity.django.database_pool`).
//!
//! Everything is started here and stopped here, by pid: a PostgreSQL of its own on a free
//! port in a temporary directory (as `nobody` when run as root; `pg_stat_statements`
//! counts the queries), the Django test site (`tests/django/site.py`, in the Python of
//! `target/django-venv`) that creates the users (each in two groups) and logs each in
//! once with the `db` session engine, and the gateway itself, in this process
//! (`wsrelay::run` on a thread with its own runtime, embedded broker, 2 workers).
//!
//! Scenarios, each on a fresh gateway, three runs of each, interleaved:
//!
//! - **baseline**: `identity.source = "record"` on the embedded broker: the cookie's
//!   record is looked up in memory, found nowhere, and the socket is anonymous;
//! - **cold**: `identity.source = "django"`, `cache_ttl = 0`: every handshake reads the
//!   session row, the user and the user's groups;
//! - **cached**: `cache_ttl = 60`, after one pass over every session.
//!
//! The client writes the upgrade request on a raw TCP socket with the session cookie,
//! reads the response head (it must be `101`), sends a close frame and drops the socket.
//! Each measurement reports handshakes/s, the latency of each handshake (connect to the
//! end of the response head), the queries PostgreSQL ran and the CPU time of each part
//! (this process's threads by name, PostgreSQL's processes from `/proc`). Every loop is
//! bounded in count and time.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// Django's `SECRET_KEY` for the site and the gateway.
const SECRET_KEY: &str = "wsrelay-bench-identity-key-not-for-production";
/// The socket path and flags every handshake asks for.
const PATH: &str = "/ws/bench?subscribe-user&subscribe-group";
/// Client source addresses 127.0.0.2–127.0.0.17, so that no address runs out of ports.
const SOURCES: usize = 16;
/// Handshakes before each measurement (pool connections, caches of the kernel and
/// allocator); the cached scenario makes a whole pass instead.
const WARM_UP: usize = 64;
const RUNS: usize = 3;
/// Bound for one handshake, for a server to start, for one answer of the site.
const WAIT: Duration = Duration::from_secs(30);
/// Bound for one measured pass of handshakes.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

/// A number from the environment, for exploring other sizes than the defaults.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- processes

/// A child process, stopped by pid on drop: `signal`, then SIGKILL after 10 s.
struct Proc {
    child: Child,
    signal: libc::c_int,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the child was not reaped, so
        // its pid names no other process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, self.signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `nobody`'s uid and gid when this runs as root (initdb refuses root), else `None`.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "nobody"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("running as root needs the user `nobody` to run PostgreSQL as")
    };
    Some((id("-u"), id("-g")))
}

/// Debian's newest `/usr/lib/postgresql/<version>/bin`, else `PATH`.
fn postgres_bin() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
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

/// A PostgreSQL of the benchmark's own: superuser `postgres`, trust authentication,
/// 127.0.0.1 only, no fsync, a database `bench`.
struct Postgres {
    port: u16,
    bin: PathBuf,
    proc: Proc,
    dir: TempDir,
}

impl Postgres {
    fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = std::env::temp_dir().join(format!("wsrelay-bench-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let user = server_user();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let as_user = |program: PathBuf| {
            let mut cmd = Command::new(program);
            cmd.current_dir(&dir).env("HOME", &dir).stdin(Stdio::null());
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
            cmd
        };
        let data = dir.join("data");
        let out = as_user(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .expect("initdb (PostgreSQL's server package; `bash .ci/run` installs it)");
        assert!(
            out.status.success(),
            "initdb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join("postgres.log")).unwrap();
        let mut cmd = as_user(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-F")
            .arg("-k")
            .arg(&dir)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Counts every query and its execution time, as it runs.
            .args(["-c", "shared_preload_libraries=pg_stat_statements"])
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl and getppid are async-signal-safe and allocate nothing. The
        // server then dies with this process (the main thread, which forks it, lives as
        // long as the process), even when the benchmark is killed.
        let parent = std::process::id();
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the benchmark ended"));
                }
                Ok(())
            });
        }
        let proc = Proc {
            child: cmd.spawn().expect("postgres"),
            // Fast shutdown: sessions end, the server exits.
            signal: libc::SIGINT,
        };
        let mut pg = Postgres {
            port,
            bin,
            proc,
            dir: TempDir(dir),
        };
        let started = Instant::now();
        while pg.try_query("postgres", "SELECT 1").is_err() {
            if let Ok(Some(status)) = pg.proc.child.try_wait() {
                panic!("postgres ended ({status}): {}", pg.log());
            }
            assert!(
                started.elapsed() < WAIT,
                "postgres did not start: {}",
                pg.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pg.query("postgres", "CREATE DATABASE bench");
        pg.query("postgres", "CREATE EXTENSION pg_stat_statements");
        pg
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("postgres.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/bench", self.port)
    }

    fn try_query(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", database, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn query(&self, database: &str, sql: &str) -> String {
        self.try_query(database, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
    }

    /// Forgets the queries counted so far.
    fn reset_statements(&self) {
        self.query("postgres", "SELECT pg_stat_statements_reset()");
    }

    /// The queries run in `bench` since the last reset: `(count, execution ms)`.
    fn statements(&self) -> (f64, f64) {
        let row = self.query(
            "postgres",
            "SELECT coalesce(sum(calls), 0) || '|' || coalesce(sum(total_exec_time), 0) \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'bench')",
        );
        let (calls, ms) = row.split_once('|').expect("calls|ms");
        (calls.parse().unwrap(), ms.parse().unwrap())
    }
}

// ---------------------------------------------------------------- the Django site

const SETUP: &str = "the Django site needs target/django-venv (Django 5.2 and psycopg): run \
`bash .ci/run` once first, or set WSRELAY_DJANGO_PYTHON to such an interpreter";

/// `WSRELAY_DJANGO_PYTHON`, else the virtual environment `.ci/run` makes; `None` when
/// neither exists.
fn python() -> Option<PathBuf> {
    let python = std::env::var_os("WSRELAY_DJANGO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/django-venv/bin/python")
        });
    python.exists().then_some(python)
}

/// `tests/django/site.py`, driven one JSON line at a time (the protocol of
/// `tests/gateway/django_site.rs`); requests may be pipelined.
struct Site {
    proc: Proc,
    stdin: Option<ChildStdin>,
    answers: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Site {
    fn start(python: &Path, database_url: &str) -> Site {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(python)
            .arg(root.join("tests/django/site.py"))
            .current_dir(root)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .env("WSRELAY_DJANGO_DATABASE_URL", database_url)
            .env("WSRELAY_DJANGO_REDIS_URL", "")
            .env("WSRELAY_DJANGO_SECRET_KEY", SECRET_KEY)
            .env("WSRELAY_DJANGO_SECRET_KEY_FALLBACKS", "[]")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {SETUP}", python.display()));
        let (lines, answers) = mpsc::channel();
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
        std::thread::spawn(move || {
            for line in BufReader::new(errors).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdin = child.stdin.take();
        let site = Site {
            proc: Proc {
                child,
                signal: libc::SIGTERM,
            },
            stdin,
            answers,
            stderr,
        };
        let ready = site.answer("start");
        assert!(ready.get("ready").is_some(), "site answered {ready}");
        println!("django site: {}", ready["ready"]);
        site
    }

    fn answer(&self, what: &str) -> Value {
        let line = self.answers.recv_timeout(WAIT).unwrap_or_else(|e| {
            panic!(
                "django site, {what}: no answer ({e}):\n{}",
                self.stderr.lock().unwrap().join("\n")
            )
        });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("django site said {line:?}: {e}"))
    }

    /// Sends every request, then reads their answers in order; panics on an error.
    fn call_all(&mut self, requests: &[Value]) -> Vec<Value> {
        let stdin = self.stdin.as_mut().unwrap();
        let mut text = String::new();
        for request in requests {
            text.push_str(&request.to_string());
            text.push('\n');
        }
        // The site's answers are read by a thread of their own, so it never stops
        // reading its standard input while this writes.
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
        requests
            .iter()
            .map(|request| {
                let what = request["cmd"].as_str().unwrap_or_default();
                let mut answer = self.answer(what);
                if let Some(error) = answer.get("error") {
                    panic!("django site, {what}: {error}\n{}", answer["traceback"]);
                }
                answer["ok"].take()
            })
            .collect()
    }

    /// Closes its standard input (it exits), then stops it by pid.
    fn stop(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !matches!(self.proc.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Creates `n` users (each in two of 50 + 7 groups) and logs each in once with the `db`
/// engine; returns the session keys.
fn make_sessions(site: &mut Site, n: usize) -> Vec<String> {
    let started = Instant::now();
    let users: Vec<Value> = (0..n)
        .map(|i| {
            json!({"cmd": "create_user", "name": format!("bench{i:05}"), "password": "x",
                "active": true, "groups": [format!("team{:02}", i % 50), format!("region{}", i % 7)]})
        })
        .collect();
    site.call_all(&users);
    let created = started.elapsed();
    let logins: Vec<Value> = (0..n)
        .map(|i| json!({"cmd": "login", "name": format!("bench{i:05}"), "engine": "db"}))
        .collect();
    let keys: Vec<String> = site
        .call_all(&logins)
        .into_iter()
        .map(|k| k.as_str().expect("a session key").to_string())
        .collect();
    println!(
        "django site: {n} users in {:.1} s ({:.1} ms each), {n} db sessions in {:.1} s ({:.1} ms each)",
        created.as_secs_f64(),
        created.as_secs_f64() * 1e3 / n as f64,
        (started.elapsed() - created).as_secs_f64(),
        (started.elapsed() - created).as_secs_f64() * 1e3 / n as f64,
    );
    keys
}

// ---------------------------------------------------------------- the gateway

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Baseline,
    Cold,
    Cached,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::Baseline, Scenario::Cold, Scenario::Cached];

    fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Cold => "cold",
            Scenario::Cached => "cached",
        }
    }
}

/// `wsrelay::run` on a thread with a runtime of its own, as `main.rs` runs it.
struct Gateway {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    fn start(scenario: Scenario, database_url: &str, pool: usize) -> Gateway {
        let mut vars: HashMap<String, String> = [
            ("WORKERS", "2"),
            ("POLICY__COMPAT", "true"),
            ("POLICY__MAX_CONNECTIONS_PER_IP", "0"),
            ("DRAIN_WINDOW", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (format!("WSRELAY__{k}"), v.to_string()))
        .collect();
        let mut set = |k: &str, v: &str| vars.insert(format!("WSRELAY__{k}"), v.to_string());
        match scenario {
            Scenario::Baseline => {
                set("IDENTITY__SOURCE", "record");
            }
            Scenario::Cold | Scenario::Cached => {
                set("IDENTITY__SOURCE", "django");
                set("IDENTITY__DJANGO__ENGINE", "db");
                set("IDENTITY__DJANGO__DATABASE_URL", database_url);
                set("IDENTITY__DJANGO__SECRET_KEY", SECRET_KEY);
                set("IDENTITY__DJANGO__DATABASE_POOL", &pool.to_string());
                let ttl = if scenario == Scenario::Cold {
                    "0"
                } else {
                    "60"
                };
                set("IDENTITY__DJANGO__CACHE_TTL", ttl);
            }
        }
        let config = wsrelay::config::Config::load_from(None, vars).expect("configuration");
        let listener = wsrelay::bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("wsrelay-gateway".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(wsrelay::run(config, listener, async {
                    let _ = stopped.await;
                }))
            })
            .unwrap();
        Gateway {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    async fn wait_ready(&self) {
        let started = Instant::now();
        while !http(self.addr, "/ready").await.starts_with("HTTP/1.1 200") {
            assert!(started.elapsed() < WAIT, "the gateway did not get ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sum of a metric's samples whose labels contain `labels` (`""`: all).
    async fn metric(&self, name: &str, labels: &str) -> f64 {
        http(self.addr, "/metrics")
            .await
            .lines()
            .filter(|l| {
                l.strip_prefix(name).is_some_and(|rest| {
                    (rest.starts_with(' ') || rest.starts_with('{')) && rest.contains(labels)
                })
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Stops it and waits (bounded) for its thread.
    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let thread = self.thread.take().unwrap();
        let deadline = Instant::now() + WAIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            if let Ok(Err(e)) = thread.join() {
                println!("  the gateway ended with an error: {e}");
            }
        } else {
            println!("  the gateway did not stop within {WAIT:?}; left running");
        }
    }
}

async fn http(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(request.as_bytes()).await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

// ---------------------------------------------------------------- the client

/// A masked close frame, code 1000.
const CLOSE: [u8; 8] = [0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe8 ^ 2];

/// Lets `connect` pick the source port (`IP_BIND_ADDRESS_NO_PORT`), as it does for a
/// socket that was not bound: a port picked at `bind` must be free towards every
/// destination.
fn no_port_at_bind(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is the socket's own and open; the option value is a c_int
    // that lives across the call, and its size is passed.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One handshake: connect from `source`, write the upgrade request with the session
/// cookie, read the response head. `Ok(None)`: `101`, then a close frame is sent and the
/// socket dropped; `Ok(Some(why))`: another answer (its status line) or none.
async fn handshake(
    addr: SocketAddr,
    source: SocketAddr,
    session: &str,
) -> Result<Option<String>, std::io::Error> {
    let socket = TcpSocket::new_v4()?;
    no_port_at_bind(&socket)?;
    socket.bind(source)?;
    let mut stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Cookie: sessionid={session}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            return Ok(Some("closed before a whole response head".into()));
        }
        head.extend_from_slice(&buf[..n]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        let head = String::from_utf8_lossy(&head);
        return Ok(Some(head.lines().next().unwrap_or_default().to_string()));
    }
    stream.write_all(&CLOSE).await?;
    Ok(None)
}

/// What one pass of handshakes measured.
#[derive(Default)]
struct Pass {
    done: usize,
    failed: usize,
    /// First failures, for the report.
    errors: Vec<String>,
    elapsed: f64,
    latencies_us: Vec<u64>,
}

impl Pass {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed
    }

    fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 * q).ceil() as usize)
            .clamp(1, self.latencies_us.len());
        self.latencies_us[i - 1] as f64 / 1e3
    }
}

/// `total` handshakes over `sessions` (in order, round and round), `concurrency` in
/// flight, each bounded by [`WAIT`] and all by [`PHASE_LIMIT`].
async fn pass(
    addr: SocketAddr,
    sessions: &Arc<Vec<String>>,
    total: usize,
    concurrency: usize,
) -> Pass {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + PHASE_LIMIT;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, sessions) = (next.clone(), sessions.clone());
            tokio::spawn(async move {
                let mut own = Pass::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || Instant::now() > deadline {
                        return own;
                    }
                    let source: SocketAddr = ([127, 0, 0, 2 + (i % SOURCES) as u8], 0).into();
                    let t = Instant::now();
                    let result = tokio::time::timeout(
                        WAIT,
                        handshake(addr, source, &sessions[i % sessions.len()]),
                    )
                    .await;
                    own.done += 1;
                    match result {
                        Ok(Ok(None)) => own.latencies_us.push(t.elapsed().as_micros() as u64),
                        failure => {
                            own.failed += 1;
                            if own.errors.len() < 3 {
                                own.errors.push(match failure {
                                    Ok(Ok(Some(answer))) => answer,
                                    Ok(Ok(None)) => unreachable!("a 101 is no failure"),
                                    Ok(Err(e)) => e.to_string(),
                                    Err(_) => format!("no answer within {WAIT:?}"),
                                });
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut all = Pass::default();
    for task in tasks {
        let own = task.await.unwrap();
        all.done += own.done;
        all.failed += own.failed;
        all.errors.extend(own.errors);
        all.latencies_us.extend(own.latencies_us);
    }
    all.elapsed = started.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    all.errors.truncate(3);
    all
}

// ---------------------------------------------------------------- CPU accounting

fn cpu_ticks(stat: &str) -> f64 {
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    }) / 100.0
}

/// CPU seconds of this process's threads, by part: the client's runtime; the gateway's
/// database thread (its sqlx pool), main runtime, and workers with the acceptor.
fn own_threads() -> BTreeMap<&'static str, f64> {
    let mut by = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let part = match comm.trim() {
            c if c.starts_with("bench-client") => "client",
            "wsrelay-db" => "gateway db",
            "wsrelay-gateway" => "gateway main",
            c if c.starts_with("actix") => "gateway workers",
            _ => "other",
        };
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        *by.entry(part).or_default() += cpu_ticks(&stat);
    }
    by
}

/// CPU seconds of `pid` and its descendants.
fn tree_cpu(pid: u32) -> f64 {
    let all: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let ppid = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((p, ppid, cpu_ticks(&stat)))
        })
        .collect();
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(
            all.iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    all.iter()
        .filter(|(p, _, _)| pids.contains(p))
        .map(|(_, _, cpu)| cpu)
        .sum()
}

/// The machine's CPU seconds from `/proc/stat`: `(busy, stolen by the hypervisor)`.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / 100.0;
    // user nice system idle iowait irq softirq steal
    (at(0) + at(1) + at(2) + at(5) + at(6), at(7))
}

struct Cpu {
    threads: BTreeMap<&'static str, f64>,
    postgres: f64,
    machine: (f64, f64),
}

impl Cpu {
    fn now(pg: &Postgres) -> Cpu {
        Cpu {
            threads: own_threads(),
            postgres: tree_cpu(pg.proc.child.id()),
            machine: machine_cpu(),
        }
    }

    /// CPU microseconds per handshake, by part, from `self` to `later`.
    fn per_handshake(&self, later: &Cpu, n: usize) -> BTreeMap<String, f64> {
        let per = |d: f64| d * 1e6 / n as f64;
        let mut out: BTreeMap<String, f64> = later
            .threads
            .iter()
            .map(|(k, v)| (k.to_string(), per(v - self.threads.get(k).unwrap_or(&0.0))))
            .collect();
        out.insert("postgres".into(), per(later.postgres - self.postgres));
        // What ran beside the benchmark: other processes, and the hypervisor's steal.
        let ours: f64 = out.values().sum();
        out.insert(
            "elsewhere".into(),
            (per(later.machine.0 - self.machine.0) - ours).max(0.0),
        );
        out.insert("steal".into(), per(later.machine.1 - self.machine.1));
        out
    }
}

// ---------------------------------------------------------------- a measurement

struct Measured {
    pass: Pass,
    /// CPU microseconds per handshake, by part.
    cpu_us: BTreeMap<String, f64>,
    /// Database queries per handshake.
    queries: f64,
    /// PostgreSQL's execution time of those queries per handshake, microseconds.
    exec_us: f64,
}

/// One scenario on a fresh gateway: warm up, check that identities resolve, measure.
async fn measure(
    scenario: Scenario,
    pg: &Postgres,
    sessions: &Arc<Vec<String>>,
    total: usize,
    concurrency: usize,
    pool: usize,
) -> Measured {
    let gw = Gateway::start(scenario, &pg.url(), pool);
    gw.wait_ready().await;
    // One socket held open: its audiences show whether the identity resolved.
    let source: SocketAddr = ([127, 0, 0, 1], 0).into();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(source).unwrap();
    let mut held = socket.connect(gw.addr).await.unwrap();
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Cookie: sessionid={}\r\n\r\n",
        sessions[0]
    );
    held.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(WAIT, held.read_exact(&mut head))
        .await
        .expect("the first handshake timed out")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101", "the first handshake");
    let want = if scenario == Scenario::Baseline {
        0.0
    } else {
        1.0
    };
    let started = Instant::now();
    loop {
        let user = gw
            .metric("wsrelay_sockets_by_audience", "audience=\"user\"")
            .await;
        let group = gw
            .metric("wsrelay_sockets_by_audience", "audience=\"group\"")
            .await;
        let open = gw.metric("wsrelay_sockets", "").await;
        if open == 1.0 && user == want && group == want {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "{}: the held socket's audiences: user {user}, group {group} (want {want}), sockets {open}",
            scenario.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    let warm = if scenario == Scenario::Cached {
        sessions.len()
    } else {
        WARM_UP
    };
    let warmed = pass(gw.addr, sessions, warm, concurrency).await;
    assert_eq!(warmed.failed, 0, "warm-up failures: {:?}", warmed.errors);
    pg.reset_statements();
    let cpu = Cpu::now(pg);
    let measured = pass(gw.addr, sessions, total, concurrency).await;
    let cpu_us = cpu.per_handshake(&Cpu::now(pg), measured.done);
    let (queries, exec_ms) = pg.statements();
    if scenario == Scenario::Cached && started.elapsed() > Duration::from_secs(55) {
        println!("  warning: the cached pass ended after the cache's 60 s; some lookups were cold");
    }
    let refused = gw.metric("wsrelay_identity_events_total", "").await;
    let accepted = gw
        .metric("wsrelay_handshakes_total", "result=\"accepted\"")
        .await;
    let all = gw.metric("wsrelay_handshakes_total", "").await;
    gw.stop();
    assert_eq!(
        refused,
        0.0,
        "{}: identity events (sessions refused or users rejected)",
        scenario.name()
    );
    let expected = (1 + warm + measured.done) as f64;
    if accepted != expected || all != expected || measured.done < total {
        println!(
            "  {}: handshakes accepted {accepted} of {all}, sent {expected} ({} of {total} measured)",
            scenario.name(),
            measured.done
        );
    }
    let n = measured.done as f64;
    Measured {
        pass: measured,
        cpu_us,
        queries: queries / n,
        exec_us: exec_ms * 1e3 / n,
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let Some(python) = python() else {
        eprintln!("benches/identity: {SETUP}");
        std::process::exit(2);
    };
    let started = Instant::now();
    let users = env_or("WSRELAY_BENCH_USERS", 1_000);
    let passes = env_or("WSRELAY_BENCH_PASSES", 10);
    let concurrency = env_or("WSRELAY_BENCH_CONCURRENCY", 32);
    let pool = env_or("WSRELAY_BENCH_POOL", 4);
    let total = users * passes;
    // `cargo bench --bench identity -- cold`: some scenarios only.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| args.is_empty() || args.iter().any(|a| a == s.name()))
        .collect();
    assert!(
        !scenarios.is_empty(),
        "scenarios are baseline, cold and cached"
    );
    println!(
        "identity: {users} users and sessions, {total} handshakes per measurement, {concurrency} in \
         flight, database_pool {pool}, open-files limit {}",
        wsrelay::raise_descriptor_limit().unwrap_or(0)
    );

    let pg = Postgres::start();
    println!(
        "postgres: {} on port {}",
        pg.query("postgres", "SHOW server_version"),
        pg.port
    );
    let mut site = Site::start(&python, &pg.url());
    let sessions = Arc::new(make_sessions(&mut site, users));
    site.stop();
    let counts = pg.query(
        "bench",
        "SELECT (SELECT count(*) FROM django_session) || ' sessions, ' || \
         (SELECT count(*) FROM auth_user) || ' users, ' || \
         (SELECT count(*) FROM auth_user_groups) || ' memberships'",
    );
    println!("database: {counts}");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    let mut results: BTreeMap<&str, Vec<Measured>> = BTreeMap::new();
    runtime.block_on(async {
        for run in 1..=RUNS {
            for &scenario in &scenarios {
                let m = measure(scenario, &pg, &sessions, total, concurrency, pool).await;
                let p = &m.pass;
                let cpu: Vec<String> = m
                    .cpu_us
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect();
                println!(
                    "run {run} {:<8} {:>7.0} handshakes/s  p50 {:>6.2} ms  p99 {:>6.2} ms  failed {}{}  \
                     db queries/handshake {:.2} ({:.0} µs executing)  CPU µs/handshake: {}",
                    scenario.name(),
                    p.rate(),
                    p.percentile_ms(0.5),
                    p.percentile_ms(0.99),
                    p.failed,
                    if p.errors.is_empty() { String::new() } else { format!(" {:?}", p.errors) },
                    m.queries,
                    m.exec_us,
                    cpu.join(", ")
                );
                results.entry(scenario.name()).or_default().push(m);
            }
        }
    });

    println!();
    println!(
        "| scenario | handshakes/s | p50 ms | p99 ms | failed | ratio to baseline | \
         queries per handshake (PostgreSQL executing, µs) | CPU µs per handshake: postgres / \
         gateway db thread / gateway workers / gateway main / client |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let rate_of = |ms: &[Measured]| ms.iter().map(|m| m.pass.rate()).collect::<Vec<_>>();
    let baseline = results.get("baseline").map(|ms| rate_of(ms));
    let mut summary = Vec::new();
    for &scenario in &scenarios {
        let ms = &results[scenario.name()];
        let rates = rate_of(ms);
        let ratios: Vec<f64> = match &baseline {
            Some(b) => rates.iter().zip(b).map(|(r, b)| r / b).collect(),
            None => vec![f64::NAN; rates.len()],
        };
        let med = |f: &dyn Fn(&Measured) -> f64| median(&ms.iter().map(f).collect::<Vec<_>>());
        let cpu = |part: &str| med(&|m| m.cpu_us.get(part).copied().unwrap_or(0.0));
        let failed: usize = ms.iter().map(|m| m.pass.failed).sum();
        let list = |v: &[f64], digits: usize| {
            v.iter()
                .map(|x| format!("{x:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {} | **{:.0}** [{}] | {:.2} | {:.2} | {failed} | {:.2} [{}] | {:.2} ({:.0}) | {:.0} / {:.0} / {:.0} / {:.0} / {:.0} |",
            scenario.name(),
            median(&rates),
            list(&rates, 0),
            med(&|m| m.pass.percentile_ms(0.5)),
            med(&|m| m.pass.percentile_ms(0.99)),
            median(&ratios),
            list(&ratios, 2),
            med(&|m| m.queries),
            med(&|m| m.exec_us),
            cpu("postgres"),
            cpu("gateway db"),
            cpu("gateway workers"),
            cpu("gateway main"),
            cpu("client"),
        );
        summary.push(json!({
            "scenario": scenario.name(),
            "handshakes_per_s": rates,
            "ratio_to_baseline": ratios,
            "p50_ms": ms.iter().map(|m| m.pass.percentile_ms(0.5)).collect::<Vec<_>>(),
            "p99_ms": ms.iter().map(|m| m.pass.percentile_ms(0.99)).collect::<Vec<_>>(),
            "failed": failed,
            "db_queries_per_handshake": ms.iter().map(|m| m.queries).collect::<Vec<_>>(),
            "postgres_exec_us_per_handshake": ms.iter().map(|m| m.exec_us).collect::<Vec<_>>(),
            "cpu_us_per_handshake": ms.iter().map(|m| m.cpu_us.clone()).collect::<Vec<_>>(),
        }));
    }
    println!();
    println!(
        "{}",
        json!({"users": users, "handshakes_per_measurement": total, "concurrency": concurrency,
            "database_pool": pool, "runs": RUNS, "elapsed_s": started.elapsed().as_secs_f64(),
            "results": summary})
    );
    drop(pg);
}
