//! History benchmark (issue 12): what message ids and history cost. Results go to
//! `benches/RESULTS.md`.
//!
//! ```sh
//! cargo bench --bench history                  # both scenarios, 3 runs each
//! cargo bench --bench history -- publish       # one scenario
//! cargo bench --bench history -- resume
//! ```
//!
//! - **publish**: publications/s with history on (`feed/bench`, a `[[facility]]` with
//!   `history = 100`) and off (`plain/bench`, no rule), in the same run, through the
//!   HTTP API (`POST /api/publish` with the publish token, 32 keep-alive connections, one
//!   request at a time on each) and through `RedisPublisher` (`with_facilities`, 32
//!   publications in flight on its one multiplexed connection). 20,000 publications per
//!   measurement (`WSRELAY_BENCH_PUBLICATIONS`), at most 60 s; one plain socket listens
//!   on each key, so the gateway relays every publication (and, with history, its id
//!   announcement). Also Redis CPU per publication (`INFO cpu`) and, for the API, the
//!   gateway's CPU per publication.
//! - **resume**: a fresh gateway; one message is published on `feed/storm`, then 20 more
//!   (`WSRELAY_BENCH_MISSED`); then 10,000 envelope sockets (`WSRELAY_BENCH_SOCKETS`)
//!   connect at once (512 handshakes in flight) with `last-id=broadcast:<first id>`:
//!   the time until every one has its 20 messages and its `resumed`, against the same
//!   storm without `last-id` (each socket live once it has the stored message), with
//!   Redis's and the gateway's CPU during each storm.
//!
//! Redis (a `redis-server` of its own on a free port) and the gateway (the release
//! binary, `CARGO_BIN_EXE_wsrelay`, 2 workers) are separate processes started here and
//! stopped here by pid. Client sockets come from 127.0.0.2–127.0.0.17. Every loop is
//! bounded in count and time.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wsrelay::publisher::{Recipients, RedisPublisher};

const RUNS: usize = 3;
const TOKEN: &str = "bench-publish-token-0123456789";
const FACILITIES: &str = r#"
[[facility]]
pattern = "feed/*"
history = 100
history_ttl = 600
"#;
/// Publications in flight (API connections, or publisher tasks).
const CONCURRENCY: usize = 32;
/// Bound on one publish measurement.
const PUBLISH_LIMIT: Duration = Duration::from_secs(60);
/// Handshakes in flight in the resume storm.
const INFLIGHT: usize = 512;
/// Bound on one storm.
const STORM_LIMIT: Duration = Duration::from_secs(120);
/// Client source addresses 127.0.0.2–127.0.0.17.
const SOURCES: usize = 16;
const PAYLOAD: &str = "a message of about one hundred bytes, as an application would publish to its pages: 0123456789";

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

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn list(values: &[f64], digits: usize) -> String {
    let v: Vec<String> = values.iter().map(|x| format!("{x:.digits$}")).collect();
    v.join(", ")
}

// ---------------------------------------------------------------- processes

/// A child process, stopped by pid on drop: SIGTERM, then SIGKILL after 5 s.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the child was not reaped, so
        // its pid names no other process.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) of process `pid`.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

async fn wait_port(addr: SocketAddr) {
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{addr} did not open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Redis {
    _proc: Proc,
    port: u16,
}

impl Redis {
    async fn start() -> Redis {
        let port = free_port();
        let proc = Proc(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--maxclients", "20000"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server"),
        );
        wait_port(([127, 0, 0, 1], port).into()).await;
        Redis { _proc: proc, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Redis's CPU seconds so far (`INFO cpu`: used_cpu_sys + used_cpu_user).
    async fn cpu(&self) -> f64 {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .filter_map(|l| {
                let (k, v) = l.trim().split_once(':')?;
                matches!(k, "used_cpu_sys" | "used_cpu_user")
                    .then(|| v.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }
}

struct Gateway {
    proc: Proc,
    addr: SocketAddr,
    _config: tempfile_path::Path,
}

/// A path in the temp dir, removed on drop.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Gateway {
    async fn start(redis: &Redis) -> Gateway {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "wsrelay-bench-history-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(FACILITIES.as_bytes())
            .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = std::env::var_os("WSRELAY_BENCH_LOG").is_some();
        let child = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .env("WSRELAY__LISTEN", addr.to_string())
            .env("WSRELAY__REDIS__URL", redis.url())
            .env("WSRELAY__WORKERS", "2")
            .env("WSRELAY__PUBLISH_TOKEN", TOKEN)
            .env("WSRELAY__POLICY__MAX_CONNECTIONS_PER_IP", "0")
            .env("WSRELAY__DRAIN_WINDOW", "0")
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("wsrelay");
        let gw = Gateway {
            proc: Proc(child),
            addr,
            _config: tempfile_path::Path(path),
        };
        wait_port(addr).await;
        let started = Instant::now();
        while !get(addr, "/ready").await.starts_with("HTTP/1.1 200") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "gateway not ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw
    }

    fn cpu(&self) -> f64 {
        cpu_of(self.proc.0.id())
    }
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- publish

/// One keep-alive HTTP/1.1 connection to the publish API.
struct ApiConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl ApiConn {
    /// `POST /api/publish`; true on a 200.
    async fn publish(&mut self, facility: &str) -> bool {
        let body = serde_json::json!({
            "facility": facility, "audiences": {"broadcast": true}, "message": PAYLOAD,
        })
        .to_string();
        let request = format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        for _ in 0..2 {
            if self.stream.is_none() {
                self.stream = TcpStream::connect(self.addr).await.ok();
                self.buf.clear();
            }
            let Some(stream) = self.stream.as_mut() else {
                return false;
            };
            if stream.write_all(request.as_bytes()).await.is_err() {
                self.stream = None;
                continue;
            }
            match read_response(stream, &mut self.buf).await {
                Some((status, close)) => {
                    if close {
                        self.stream = None;
                    }
                    return status == 200;
                }
                None => self.stream = None,
            }
        }
        false
    }
}

/// Reads one response (head and `Content-Length` body): its status, and whether the
/// server closes the connection after it.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, bool)> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                let close = head.contains("connection: close");
                buf.drain(..end + 4 + length);
                return Some((status, close));
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A socket that reads and drops everything, until dropped.
async fn listener(gw: &Gateway, facility: &str) -> tokio::task::JoinHandle<()> {
    let url = format!("ws://{}/ws/{facility}?subscribe-broadcast", gw.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    })
}

/// Publications/s, Redis µs per publication, gateway µs per publication, failures.
struct Rate {
    per_s: f64,
    redis_us: f64,
    gateway_us: f64,
    failed: usize,
}

async fn measure_api(gw: &Gateway, redis: &Redis, facility: &str, n: usize) -> Rate {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (r0, g0) = (redis.cpu().await, gw.cpu());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, failed, facility) = (next.clone(), failed.clone(), facility.to_string());
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let mut conn = ApiConn {
                addr,
                stream: None,
                buf: Vec::new(),
            };
            while next.fetch_add(1, Ordering::SeqCst) < n && started.elapsed() < PUBLISH_LIMIT {
                if !conn.publish(&facility).await {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    finish(
        started,
        n.min(next.load(Ordering::SeqCst)),
        &failed,
        redis,
        r0,
        Some((gw, g0)),
    )
    .await
}

async fn measure_publisher(
    publisher: &RedisPublisher,
    gw: &Gateway,
    redis: &Redis,
    facility: &str,
    n: usize,
) -> Rate {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (r0, g0) = (redis.cpu().await, gw.cpu());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, failed) = (next.clone(), failed.clone());
        let publisher = publisher.clone();
        let to = Recipients::new(facility).unwrap().broadcast();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < n && started.elapsed() < PUBLISH_LIMIT {
                if publisher.publish_message(&to, PAYLOAD, None).await.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    finish(
        started,
        n.min(next.load(Ordering::SeqCst)),
        &failed,
        redis,
        r0,
        Some((gw, g0)),
    )
    .await
}

async fn finish(
    started: Instant,
    done: usize,
    failed: &AtomicUsize,
    redis: &Redis,
    r0: f64,
    gateway: Option<(&Gateway, f64)>,
) -> Rate {
    let elapsed = started.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::SeqCst);
    let ok = done.saturating_sub(failed).max(1) as f64;
    let redis_us = (redis.cpu().await - r0) / ok * 1e6;
    let gateway_us = gateway.map_or(0.0, |(gw, g0)| (gw.cpu() - g0) / ok * 1e6);
    Rate {
        per_s: ok / elapsed,
        redis_us,
        gateway_us,
        failed,
    }
}

async fn publish_scenario() {
    let n = env_or("WSRELAY_BENCH_PUBLICATIONS", 20_000);
    let redis = Redis::start().await;
    let gw = Gateway::start(&redis).await;
    let _on = listener(&gw, "feed/bench").await;
    let _off = listener(&gw, "plain/bench").await;
    let rules = vec![wsrelay::facility::FacilityRule {
        pattern: "feed/*".into(),
        history: 100,
        history_ttl: 600,
        slow_consumer: Default::default(),
    }];
    let publisher = RedisPublisher::connect(&redis.url(), None)
        .await
        .unwrap()
        .with_facilities(rules);
    println!(
        "publish: {n} publications per measurement, {CONCURRENCY} in flight, 100-byte payload"
    );
    // [path][on/off] → per-run rates.
    let mut rates: Vec<[Vec<Rate>; 2]> = vec![[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for run in 1..=RUNS {
        for (p, path) in ["api", "publisher"].iter().enumerate() {
            for (h, facility) in ["feed/bench", "plain/bench"].iter().enumerate() {
                let rate = if p == 0 {
                    measure_api(&gw, &redis, facility, n).await
                } else {
                    measure_publisher(&publisher, &gw, &redis, facility, n).await
                };
                println!(
                    "run {run} {path:>9} history {}: {:>8.0} publications/s, redis {:.1} µs/publication, gateway {:.1} µs/publication, {} failed",
                    if h == 0 { "on " } else { "off" },
                    rate.per_s,
                    rate.redis_us,
                    rate.gateway_us,
                    rate.failed
                );
                rates[p][h].push(rate);
            }
        }
    }
    for (p, path) in ["HTTP API", "RedisPublisher"].iter().enumerate() {
        let [on, off] = &rates[p];
        let f = |v: &[Rate], g: fn(&Rate) -> f64| v.iter().map(g).collect::<Vec<f64>>();
        let ratio: Vec<f64> = on.iter().zip(off).map(|(a, b)| a.per_s / b.per_s).collect();
        println!(
            "SUMMARY {path}: on {:.0}/s [{}], off {:.0}/s [{}], ratio on/off {:.2} [{}]; redis µs on {:.1} [{}] off {:.1} [{}]; gateway µs on {:.1} [{}] off {:.1} [{}]; failed {}",
            median(&f(on, |r| r.per_s)),
            list(&f(on, |r| r.per_s), 0),
            median(&f(off, |r| r.per_s)),
            list(&f(off, |r| r.per_s), 0),
            median(&ratio),
            list(&ratio, 2),
            median(&f(on, |r| r.redis_us)),
            list(&f(on, |r| r.redis_us), 1),
            median(&f(off, |r| r.redis_us)),
            list(&f(off, |r| r.redis_us), 1),
            median(&f(on, |r| r.gateway_us)),
            list(&f(on, |r| r.gateway_us), 1),
            median(&f(off, |r| r.gateway_us)),
            list(&f(off, |r| r.gateway_us), 1),
            on.iter().chain(off).map(|r| r.failed).sum::<usize>(),
        );
    }
}

// ---------------------------------------------------------------- resume storm

/// A TCP connection from source address number `i % SOURCES`.
async fn connect_from(addr: SocketAddr, i: usize) -> std::io::Result<TcpStream> {
    let source: SocketAddr = format!("127.0.0.{}:0", 2 + i % SOURCES).parse().unwrap();
    let socket = TcpSocket::new_v4()?;
    socket.bind(source)?;
    socket.connect(addr).await
}

/// One envelope socket: handshake for `path`, then frames until it is live (`resumed`
/// with `resume`, else its first message). Returns the socket (kept open by the caller),
/// and the messages received before it was live.
async fn storm_socket(
    addr: SocketAddr,
    i: usize,
    path: &str,
    resume: bool,
) -> Result<(TcpStream, usize), String> {
    let mut stream = connect_from(addr, i).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: wsrelay.v1\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut head_done = false;
    let mut messages = 0;
    loop {
        if !head_done {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 101") {
                    return Err(String::from_utf8_lossy(&buf[..end]).into_owned());
                }
                buf.drain(..end + 4);
                head_done = true;
            }
        }
        // Server frames: unmasked; the gateway sends text frames here.
        while head_done && buf.len() >= 2 {
            let (len, start) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < start + len {
                break;
            }
            let opcode = buf[0] & 0x0f;
            if opcode == 1 {
                let v: Value =
                    serde_json::from_slice(&buf[start..start + len]).map_err(|e| e.to_string())?;
                match v["type"].as_str() {
                    Some("message") if !resume => return Ok((stream, 1)),
                    Some("message") => messages += 1,
                    Some("resumed") => return Ok((stream, messages)),
                    other => return Err(format!("unexpected {other:?}: {v}")),
                }
            } else if opcode == 8 {
                return Err("closed".into());
            }
            buf.drain(..start + len);
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct Storm {
    secs: f64,
    live: usize,
    failed: usize,
    /// Messages each resumed socket got before `resumed` (min, max).
    replayed: (usize, usize),
    redis_cpu: f64,
    gateway_cpu: f64,
}

async fn storm(redis: &Redis, resume: bool, sockets: usize, missed: usize) -> Storm {
    let gw = Gateway::start(redis).await;
    let publisher = RedisPublisher::connect(&redis.url(), None)
        .await
        .unwrap()
        .with_facilities(vec![wsrelay::facility::FacilityRule {
            pattern: "feed/*".into(),
            history: 100,
            history_ttl: 600,
            slow_consumer: Default::default(),
        }]);
    let to = Recipients::new("feed/storm").unwrap().broadcast();
    let first = publisher.publish_message(&to, PAYLOAD, None).await.unwrap()[0].unwrap();
    for _ in 0..missed {
        publisher.publish_message(&to, PAYLOAD, None).await.unwrap();
    }
    let path = if resume {
        format!("/ws/feed/storm?subscribe-broadcast&last-id=broadcast:{first}")
    } else {
        "/ws/feed/storm?subscribe-broadcast".to_string()
    };
    let (r0, g0) = (redis.cpu().await, gw.cpu());
    let gate = Arc::new(tokio::sync::Semaphore::new(INFLIGHT));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let (gate, path, addr) = (gate.clone(), path.clone(), gw.addr);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            tokio::time::timeout(STORM_LIMIT, storm_socket(addr, i, &path, resume))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r)
                .map(|(stream, n)| (stream, n, started.elapsed()))
        }));
    }
    let mut open = Vec::with_capacity(sockets);
    let mut failed = 0;
    let mut first_error = None;
    let mut last = Duration::ZERO;
    let mut replayed = (usize::MAX, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok((stream, n, at)) => {
                last = last.max(at);
                replayed = (replayed.0.min(n), replayed.1.max(n));
                open.push(stream);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let (redis_cpu, gateway_cpu) = (redis.cpu().await - r0, gw.cpu() - g0);
    if let Some(e) = first_error {
        println!("  first failure: {e}");
    }
    let live = open.len();
    drop(open);
    drop(gw);
    Storm {
        secs: last.as_secs_f64(),
        live,
        failed,
        replayed,
        redis_cpu,
        gateway_cpu,
    }
}

async fn resume_scenario() {
    let sockets = env_or("WSRELAY_BENCH_SOCKETS", 10_000);
    let missed = env_or("WSRELAY_BENCH_MISSED", 20);
    let redis = Redis::start().await;
    println!("resume: {sockets} envelope sockets, {INFLIGHT} handshakes in flight, {missed} messages missed");
    let mut results: [Vec<Storm>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=RUNS {
        for (m, resume) in [false, true].into_iter().enumerate() {
            let s = storm(&redis, resume, sockets, missed).await;
            println!(
                "run {run} {}: {} live in {:.2} s ({:.0}/s), {} failed, messages before live {:?}, redis CPU {:.2} s, gateway CPU {:.2} s",
                if resume { "last-id " } else { "no last-id" },
                s.live,
                s.secs,
                s.live as f64 / s.secs,
                s.failed,
                s.replayed,
                s.redis_cpu,
                s.gateway_cpu
            );
            results[m].push(s);
            // Let the closed sockets' TIME_WAIT and the gateway's exit settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let f = |v: &[Storm], g: fn(&Storm) -> f64| v.iter().map(g).collect::<Vec<f64>>();
    let [plain, resumed] = &results;
    let ratio: Vec<f64> = resumed
        .iter()
        .zip(plain)
        .map(|(a, b)| a.secs / b.secs)
        .collect();
    let redis_ratio: Vec<f64> = resumed
        .iter()
        .zip(plain)
        .map(|(a, b)| a.redis_cpu / b.redis_cpu)
        .collect();
    println!(
        "SUMMARY resume storm: last-id {:.2} s [{}], no last-id {:.2} s [{}], ratio {:.2} [{}]; redis CPU last-id {:.2} s [{}], no last-id {:.2} s [{}], ratio {:.2} [{}]; gateway CPU last-id {:.2} s [{}], no last-id {:.2} s [{}]; failed {}",
        median(&f(resumed, |s| s.secs)),
        list(&f(resumed, |s| s.secs), 2),
        median(&f(plain, |s| s.secs)),
        list(&f(plain, |s| s.secs), 2),
        median(&ratio),
        list(&ratio, 2),
        median(&f(resumed, |s| s.redis_cpu)),
        list(&f(resumed, |s| s.redis_cpu), 2),
        median(&f(plain, |s| s.redis_cpu)),
        list(&f(plain, |s| s.redis_cpu), 2),
        median(&redis_ratio),
        list(&redis_ratio, 2),
        median(&f(resumed, |s| s.gateway_cpu)),
        list(&f(resumed, |s| s.gateway_cpu), 2),
        median(&f(plain, |s| s.gateway_cpu)),
        list(&f(plain, |s| s.gateway_cpu), 2),
        resumed.iter().chain(plain).map(|s| s.failed).sum::<usize>(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; anything else names scenarios.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let limit = wsrelay::raise_descriptor_limit().unwrap_or(0);
    println!("open-files limit {limit}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if wants("publish") {
            publish_scenario().await;
        }
        if wants("resume") {
            resume_scenario().await;
        }
    });
}
