//! Real parts for the tests: a `redis-server` on a free port, the `wsrelay` binary as a
//! child process, a WebSocket client and a tiny HTTP client.
//!
//! Every wait is bounded ([`WAIT`]); a bound that runs out fails the test. Nothing here
//! asserts on timings.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);
/// The header that asks for the envelope subprotocol (message ids, control messages).
pub const ENVELOPE: (&str, &str) = ("Sec-WebSocket-Protocol", "wsrelay.v1");
/// The publish token every test gateway is started with.
pub const TOKEN: &str = "test-token-0123456789";

/// A directory of the test's own under the system temp dir, removed when dropped, also
/// when the test fails.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsrelay-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    // The port is free once the probe listener is dropped; a race with another process
    // is possible but harmless on a test machine (the start fails loudly).
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// A `redis-server` of the test's own, on a free port, that can be killed and restarted.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    /// How the test itself reaches the server.
    url: String,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = free_port();
        let args = vec!["--port".to_string(), port.to_string()];
        Self::start_with(port, args, format!("redis://127.0.0.1:{port}/0")).await
    }

    /// A server with its own arguments (TLS, unix socket, password…); `url` is how the
    /// test reaches it.
    pub async fn start_with(port: u16, args: Vec<String>, url: String) -> RedisServer {
        let mut server = RedisServer {
            port,
            args,
            url,
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A server with an append-only file fsynced on every write, in `dir`: what it
    /// acknowledged survives a SIGKILL and [`RedisServer::restart`].
    pub async fn start_durable(dir: &TempDir) -> RedisServer {
        let port = free_port();
        let args = vec![
            "--port".to_string(),
            port.to_string(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            "always".into(),
            "--dir".into(),
            dir.to_string_lossy().into_owned(),
        ];
        Self::start_with(port, args, format!("redis://127.0.0.1:{port}/0")).await
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut conn) = self.try_connect().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server (SIGSTOP): its sockets stay open and nothing answers, like a
    /// server stalled by a long fork or a frozen VM, until [`RedisServer::resume`].
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child, "STOP");
        }
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child, "CONT");
        }
    }

    async fn try_connect(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_connect().await.expect("connect to test redis")
    }

    /// ws4redis's way to publish: PUBLISH, plus SETEX when `expire > 0`.
    pub async fn publish(&self, key: &str, message: &[u8], expire: u64) {
        let mut conn = self.conn().await;
        if expire > 0 {
            let _: () = conn.set_ex(key, message, expire).await.unwrap();
        }
        let _: i64 = conn.publish(key, message).await.unwrap();
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.conn().await.get(key).await.unwrap()
    }

    pub async fn numsub(&self, key: &str) -> i64 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(key)
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        n
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings every test gateway starts with (as `WSRELAY__*` names); a test's own
/// settings win.
const DEFAULTS: [(&str, &str); 6] = [
    ("WORKERS", "2"),
    ("PUBLISH_TOKEN", TOKEN),
    // Most tests publish from clients; the access tests turn this off again.
    ("POLICY__COMPAT", "true"),
    ("REDIS__RECONNECT_MAX", "0.5"),
    ("REDIS__PROBE_INTERVAL", "1"),
    ("DRAIN_WINDOW", "0.2"),
];

/// How a test gateway exits.
#[derive(Debug)]
pub struct Exit(Result<(), String>);

impl Exit {
    pub fn success(&self) -> bool {
        self.0.is_ok()
    }
}

enum Runner {
    /// `wsrelay::run` on a thread of its own, in this process.
    InProcess {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    },
    /// The `wsrelay` binary, for what only a process shows: signals, exit status,
    /// the service-manager protocol, the log.
    Process {
        child: Child,
        log: Arc<Mutex<Vec<String>>>,
    },
}

/// A gateway on a free port with the given settings (named as in `WSRELAY__*`
/// variables, lower case, without the prefix: `("redis__url", …)`).
pub struct Gateway {
    pub addr: SocketAddr,
    runner: Runner,
}

impl Gateway {
    /// `wsrelay::run` in this process.
    pub fn start(settings: &[(&str, &str)]) -> Gateway {
        Self::in_process(settings, None)
    }

    /// In this process, with a TOML configuration file (settings still win).
    pub fn start_with_file(toml: &str, settings: &[(&str, &str)]) -> Gateway {
        let dir = TempDir::new("config");
        let path = dir.join("wsrelay.toml");
        std::fs::write(&path, toml).unwrap();
        Self::in_process(settings, Some(&path))
    }

    /// The binary, with settings and other environment variables.
    pub fn start_process(settings: &[(&str, &str)], env: &[(&str, &str)]) -> Gateway {
        Self::launch(settings, env, None)
    }

    /// The binary with a TOML configuration file (`--config`; settings still win): for
    /// tests that measure the gateway's own process (its memory, its descriptors).
    pub fn start_process_with_file(toml: &str, settings: &[(&str, &str)]) -> Gateway {
        let dir = TempDir::new("config");
        let path = dir.join("wsrelay.toml");
        std::fs::write(&path, toml).unwrap();
        // The file is read before the gateway says it listens; `dir` may go then.
        Self::launch(settings, &[], Some(&path))
    }

    fn in_process(settings: &[(&str, &str)], file: Option<&std::path::Path>) -> Gateway {
        init_test_process();
        let mut vars: std::collections::HashMap<String, String> = DEFAULTS
            .iter()
            .map(|(k, v)| (format!("WSRELAY__{k}"), v.to_string()))
            .collect();
        for (name, value) in settings {
            vars.insert(
                format!("WSRELAY__{}", name.to_uppercase()),
                value.to_string(),
            );
        }
        let config = wsrelay::config::Config::load_from(file, vars).expect("test configuration");
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
            runner: Runner::InProcess {
                stop: Some(stop),
                thread: Some(thread),
            },
        }
    }

    fn launch(
        settings: &[(&str, &str)],
        env: &[(&str, &str)],
        file: Option<&std::path::Path>,
    ) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsrelay"));
        if let Some(file) = file {
            cmd.arg("--config").arg(file);
        }
        cmd.env_clear()
            .env("RUST_LOG", "info")
            .env("WSRELAY__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in DEFAULTS {
            cmd.env(format!("WSRELAY__{name}"), value);
        }
        for (name, value) in settings {
            cmd.env(format!("WSRELAY__{}", name.to_uppercase()), value);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("start wsrelay");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(WAIT) {
            Ok(addr) => addr.parse().expect("listening address"),
            Err(_) => panic!("wsrelay did not start: {:?}", log.lock().unwrap()),
        };
        Gateway {
            addr,
            runner: Runner::Process { child, log },
        }
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Asks the gateway to stop (SIGTERM for the binary) without waiting.
    pub fn terminate(&mut self) {
        match &mut self.runner {
            Runner::InProcess { stop, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            }
            Runner::Process { child, .. } => signal(child, "TERM"),
        }
    }

    /// Stops the gateway and waits (bounded) for it to end.
    pub fn stop(&mut self) -> Exit {
        self.terminate();
        self.wait_exit()
    }

    /// Waits (bounded) for the gateway to end.
    pub fn wait_exit(&mut self) -> Exit {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match &mut self.runner {
                Runner::InProcess { thread, .. } => {
                    if thread.as_ref().is_none_or(|t| t.is_finished()) {
                        return match thread.take().map(|t| t.join()) {
                            Some(Ok(Ok(()))) | None => Exit(Ok(())),
                            Some(Ok(Err(e))) => Exit(Err(e.to_string())),
                            Some(Err(_)) => Exit(Err("the gateway thread panicked".into())),
                        };
                    }
                }
                Runner::Process { child, .. } => {
                    if let Some(status) = child.try_wait().unwrap() {
                        return Exit(if status.success() {
                            Ok(())
                        } else {
                            Err(status.to_string())
                        });
                    }
                }
            }
            assert!(std::time::Instant::now() < deadline, "wsrelay did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of a gateway started as a process.
    pub fn pid(&self) -> u32 {
        match &self.runner {
            Runner::Process { child, .. } => child.id(),
            Runner::InProcess { .. } => panic!("an in-process gateway has no process of its own"),
        }
    }

    /// The binary's log lines (in-process gateways log through this process's logger).
    pub fn log(&self) -> Vec<String> {
        match &self.runner {
            Runner::Process { log, .. } => log.lock().unwrap().clone(),
            Runner::InProcess { .. } => panic!("only a gateway started as a process has a log"),
        }
    }

    pub async fn health(&self) -> (u16, serde_json::Value) {
        let r = http(self.addr, "GET", "/health", &[], "").await;
        (r.status, serde_json::from_str(&r.body).unwrap_or_default())
    }

    /// Waits until `/health` answers `status`.
    pub async fn wait_health(&self, status: u16) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (got, body) = self.health().await;
            if got == status {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "health stayed {got}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /api/publish` with the test token.
    pub async fn api_publish(&self, body: serde_json::Value) -> HttpReply {
        let auth = format!("Bearer {TOKEN}");
        http(
            self.addr,
            "POST",
            "/api/publish",
            &[("Authorization", &auth)],
            &body.to_string(),
        )
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        match &mut self.runner {
            Runner::Process { child, log } => {
                let _ = child.kill();
                let _ = child.wait();
                if std::thread::panicking() {
                    eprintln!("--- wsrelay log ---\n{}", log.lock().unwrap().join("\n"));
                }
            }
            Runner::InProcess { .. } => {
                self.terminate();
                // Bounded: a gateway that does not stop is left behind, the test has
                // its answer already.
                let deadline = std::time::Instant::now() + WAIT;
                while let Runner::InProcess {
                    thread: Some(thread),
                    ..
                } = &self.runner
                {
                    if thread.is_finished() || std::time::Instant::now() > deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Once per test process: a logger (`RUST_LOG`, off by default) and the open-files
/// limit raised, since clients and in-process gateways share this process.
fn init_test_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"))
            .is_test(true)
            .try_init();
        wsrelay::raise_descriptor_limit();
    });
}

pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Open descriptors of process `pid`.
pub fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The value of a metric line (`name{labels} value`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// The headers of a valid WebSocket handshake request.
pub const UPGRADE: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

/// Retries a handshake for `path` until it is accepted (a place was given back), at
/// most [`WAIT`].
pub async fn until_upgraded(addr: SocketAddr, path: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while http(addr, "GET", path, &UPGRADE, "").await.status != 101 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: place never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request on a fresh connection. `Connection: close` is added unless the
/// caller sets `Connection`; a 101 answer is returned as soon as its head arrives.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.unwrap();
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            raw.extend_from_slice(&buf[..n]);
            if n == 0
                || (raw.starts_with(b"HTTP/1.1 101") && raw.windows(4).any(|w| w == b"\r\n\r\n"))
            {
                return raw;
            }
        }
    };
    let raw = tokio::time::timeout(WAIT, read).await.expect("HTTP reply");
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    HttpReply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client with bounded waits.
pub struct Client {
    pub ws: Ws,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::connect_with(url, &[]).await
    }

    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Client {
        match Self::try_connect(url, headers).await {
            Ok((client, _)) => client,
            Err(e) => panic!("connect {url}: {e}"),
        }
    }

    /// Connects; on success also returns the handshake response headers.
    pub async fn try_connect(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Client, tungstenite::http::HeaderMap), tungstenite::Error> {
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake timed out")?;
        Ok((Client { ws }, response.headers().clone()))
    }

    /// The next data or close message (pings and pongs are skipped).
    pub async fn next(&mut self) -> Message {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no message in time")
                .expect("socket ended")
                .expect("socket error");
            if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
                return message;
            }
        }
    }

    pub async fn recv_text(&mut self) -> String {
        match self.next().await {
            Message::Text(t) => t.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next message of the envelope (a socket opened with [`ENVELOPE`]).
    pub async fn recv_envelope(&mut self) -> serde_json::Value {
        serde_json::from_str(&self.recv_text().await).unwrap()
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        tokio::time::timeout(WAIT, self.ws.send(Message::Binary(bytes.into())))
            .await
            .expect("send in time")
            .expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Reads until the server's Close frame and returns its code and reason. A transport
    /// that ends without one returns `None`.
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no close in time");
            match next {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A TCP proxy that can freeze the connections it carries: a frozen connection stays
/// open but forwards nothing, like a peer behind a dead network path. Connections
/// accepted after a freeze work normally.
pub struct FreezingProxy {
    pub port: u16,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    frozen_before: Arc<std::sync::atomic::AtomicU64>,
    /// While set, new connections are closed as soon as they are accepted.
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    pub async fn start(target: SocketAddr) -> FreezingProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let frozen_before = Arc::new(AtomicU64::new(0));
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, frozen, refuse) = (accepted.clone(), frozen_before.clone(), refusing.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let id = count.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, id, frozen.clone()));
                tokio::spawn(pump(sr, cw, id, frozen.clone()));
            }
        });
        FreezingProxy {
            port,
            accepted,
            frozen_before,
            refusing,
        }
    }

    /// While `on`, closes new connections at once (as a peer that cannot reach the
    /// server would); connections already carried are left as they are.
    pub fn refuse_new(&self, on: bool) {
        self.refusing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Freezes every connection accepted so far.
    pub fn freeze(&self) {
        use std::sync::atomic::Ordering;
        let n = self.accepted.load(Ordering::SeqCst);
        self.frozen_before.store(n, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    frozen_before: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if id < frozen_before.load(std::sync::atomic::Ordering::SeqCst) {
            // Hold both sockets open and forward nothing, until the test ends.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One Server-Sent Event as the browser reads it: a comment-only block has `comment`
/// set and nothing else.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
    pub comment: bool,
}

impl Event {
    /// The data of a control message (`event: wsrelay`), parsed.
    pub fn control(&self) -> Option<serde_json::Value> {
        (self.event.as_deref() == Some("wsrelay"))
            .then(|| serde_json::from_str(self.data.as_deref().unwrap_or("")).unwrap())
    }
}

/// A Server-Sent Events client on a raw connection (what `EventSource` does), with
/// bounded waits.
pub struct EventStream {
    stream: TcpStream,
    buf: Vec<u8>,
    pub status: u16,
    pub head: String,
}

impl EventStream {
    /// Sends `GET path` with `headers` and reads the answer's head. A refusal's body is
    /// read whole (`body()`).
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> EventStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut this = EventStream {
            stream,
            buf: Vec::new(),
            status: 0,
            head: String::new(),
        };
        let end = this
            .read_until(b"\r\n\r\n")
            .await
            .expect("an answer's head");
        let head: Vec<u8> = this.buf.drain(..end).collect();
        this.head = String::from_utf8_lossy(&head).to_string();
        this.status = this
            .head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        this
    }

    /// A header of the answer (name in lower case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// Reads until `pattern` is in the buffer; its end, or `None` at the end of stream.
    async fn read_until(&mut self, pattern: &[u8]) -> Option<usize> {
        let read = async {
            loop {
                if let Some(i) = self.buf.windows(pattern.len()).position(|w| w == pattern) {
                    return Some(i + pattern.len());
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("event stream stalled")
    }

    /// The rest of the answer, until the gateway closes (a refusal's reason).
    pub async fn body(&mut self) -> String {
        let read = async {
            let mut rest = Vec::new();
            let _ = self.stream.read_to_end(&mut rest).await;
            rest
        };
        let rest = tokio::time::timeout(WAIT, read).await.expect("body");
        self.buf.extend_from_slice(&rest);
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).to_string()
    }

    /// The next event (comment-only blocks included); `None` once the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        let end = self.read_until(b"\n\n").await?;
        let block: Vec<u8> = self.buf.drain(..end).collect();
        let mut event = Event::default();
        for line in String::from_utf8(block).unwrap().lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "" => event.comment = true,
                "id" => event.id = Some(value),
                "event" => event.event = Some(value),
                "retry" => event.retry = value.parse().ok(),
                "data" => {
                    event.data = Some(match event.data.take() {
                        Some(before) => format!("{before}\n{value}"),
                        None => value,
                    })
                }
                _ => {}
            }
        }
        Some(event)
    }

    /// The next event that carries data (heartbeats and `retry:` skipped).
    pub async fn next_data(&mut self) -> Event {
        let wait = async {
            loop {
                let event = self
                    .next()
                    .await
                    .expect("an event, not the end of the stream");
                if event.data.is_some() {
                    return event;
                }
            }
        };
        // Bounded as a whole: heartbeats alone do not keep a test waiting.
        tokio::time::timeout(WAIT, wait)
            .await
            .expect("an event with data")
    }

    /// The next message (control messages skipped as well).
    pub async fn next_message(&mut self) -> Event {
        loop {
            let event = self.next_data().await;
            if event.control().is_none() {
                return event;
            }
        }
    }

    /// Waits for the `subscribed` control message: from here on nothing is missed.
    pub async fn subscribed(&mut self) {
        let event = self.next_data().await;
        assert_eq!(
            event.control().map(|c| c["type"].clone()),
            Some("subscribed".into()),
            "{event:?}"
        );
    }
}

impl Gateway {
    /// An in-process gateway with the TOML configuration `toml` on `backend` (a Redis
    /// server of its own, returned so that it lives as long as the test wants; ready
    /// once the gateway reports its link healthy).
    pub async fn on_backend(
        backend: crate::Backend,
        toml: &str,
        settings: &[(&str, &str)],
    ) -> (Gateway, Option<RedisServer>) {
        let redis = match backend {
            crate::Backend::Redis => Some(RedisServer::start().await),
            crate::Backend::Memory => None,
        };
        let url = redis.as_ref().map(|r| r.url());
        let mut all = settings.to_vec();
        if let Some(url) = &url {
            all.push(("redis__url", url));
        }
        let gw = Gateway::start_with_file(toml, &all);
        if redis.is_some() {
            gw.wait_health(200).await;
        }
        (gw, redis)
    }

    /// Publishes `message` to the facility's broadcast key through the HTTP API (kept
    /// for late joiners); returns its id on a facility with history.
    pub async fn publish_broadcast(&self, facility: &str, message: &str) -> Option<String> {
        let reply = self
            .api_publish(serde_json::json!({
                "facility": facility, "audiences": {"broadcast": true}, "message": message,
            }))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        body["ids"][0].as_str().map(String::from)
    }
}
