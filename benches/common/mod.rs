//! What the load benchmarks share (`load.rs`, `transports.rs`): the knobs, the servers
//! under test (the release gateway, Nchan, a Redis of their own) as processes started and
//! stopped here by pid, WebSocket client fleets spread over source addresses
//! 127.0.0.2-127.0.0.17, and the publishers. Included by each benchmark with `mod common;`;
//! not every benchmark uses every item.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub const SOURCES: usize = 16;
pub const PAYLOAD: usize = 100;

// ---------------------------------------------------------------- knobs

/// A number from the environment, for exploring other sizes than the defaults.
pub fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A list of numbers from the environment (`1,2`).
pub fn env_list(name: &str, default: &[f64]) -> Vec<f64> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|l: &Vec<f64>| !l.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// A socket count, scaled by `WSRELAY_BENCH_SCALE` (smoke runs: 0.1).
pub fn scaled(n: usize) -> usize {
    ((n as f64 * env_or("WSRELAY_BENCH_SCALE", 1.0)).round() as usize).max(1)
}

/// A measuring duration, scaled by `WSRELAY_BENCH_TIME` (smoke runs: 0.25). Drain
/// limits are not scaled.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * env_or("WSRELAY_BENCH_TIME", 1.0))
}

// ---------------------------------------------------------------- processes

pub struct Proc(pub Child);

impl Drop for Proc {
    /// SIGTERM first, so that nginx's master takes its workers down with it (a SIGKILL
    /// would leave them running), then SIGKILL after 5 s. A process already waited for is
    /// left alone (its pid may belong to somebody else by now).
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn wait_port(addr: SocketAddr) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{addr} did not open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(rss KiB, cpu seconds)` of `pid` and all its descendants.
pub fn usage(pid: u32) -> (u64, f64) {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        let all: Vec<(u32, u32)> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                let ppid = stat
                    .rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some((p, ppid))
            })
            .collect();
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            pids.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
            i += 1;
        }
    }
    let mut rss = 0;
    let mut cpu = 0.0;
    for p in pids {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        rss += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        cpu += cpu_of(&format!("/proc/{p}/stat"));
    }
    (rss, cpu)
}

pub fn cpu_of(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
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

pub fn own_cpu() -> f64 {
    cpu_of("/proc/self/stat")
}

pub struct Redis {
    _proc: Proc,
    pub port: u16,
}

pub async fn start_redis() -> Redis {
    let port = free_port();
    let proc = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--maxclients", "20000"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    wait_port(([127, 0, 0, 1], port).into()).await;
    Redis { _proc: proc, port }
}

impl Redis {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Wsrelay,
    Nchan,
    Minimal,
}

/// A server under test: the gateway, Nchan or the minimal fan-out server.
pub struct Target {
    pub name: String,
    pub kind: Kind,
    pub proc: Proc,
    pub addr: SocketAddr,
    /// Kept for Nchan (its config and temp files); removed on drop.
    pub dir: Option<std::path::PathBuf>,
    pub restart: Option<Box<dyn Fn() -> Child + Send + Sync>>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Target {
    pub fn usage(&self) -> (u64, f64) {
        usage(self.proc.0.id())
    }

    pub fn is_nchan(&self) -> bool {
        self.kind == Kind::Nchan
    }

    /// The socket URL for channel `channel` (a facility with wsrelay; the minimal server
    /// takes any path and serves its one channel).
    pub fn url(&self, channel: &str, query: &str) -> String {
        if self.is_nchan() {
            format!("ws://{}/sub/{channel}", self.addr)
        } else {
            format!("ws://{}/ws/{channel}?{query}", self.addr)
        }
    }

    /// The key or channel a publication for `channel` goes to.
    pub fn key(&self, channel: &str) -> String {
        if self.is_nchan() {
            channel.to_string()
        } else {
            format!("broadcast:{channel}")
        }
    }
}

pub async fn start_wsrelay(redis: &Redis, extra: &[(&str, &str)]) -> Target {
    start_gateway(
        redis,
        extra,
        env!("CARGO_BIN_EXE_wsrelay").into(),
        "wsrelay",
        None,
    )
    .await
}

/// The gateway binary at `bin` (this build, or an earlier one to compare with), with
/// the TOML file `config` (`--config`) when given.
pub async fn start_gateway(
    redis: &Redis,
    extra: &[(&str, &str)],
    bin: std::path::PathBuf,
    name: &str,
    config: Option<PathBuf>,
) -> Target {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut env: Vec<(String, String)> = vec![
        ("RUST_LOG".into(), "warn".into()),
        ("WSRELAY__LISTEN".into(), addr.to_string()),
        ("WSRELAY__REDIS__URL".into(), redis.url()),
        ("WSRELAY__POLICY__MAX_CONNECTIONS_PER_IP".into(), "0".into()),
        ("WSRELAY__DRAIN_WINDOW".into(), "0".into()),
    ];
    if let Ok(workers) = std::env::var("WSRELAY_BENCH_WORKERS") {
        env.push(("WSRELAY__WORKERS".into(), workers));
    }
    env.extend(
        extra
            .iter()
            .map(|(k, v)| (format!("WSRELAY__{}", k.to_uppercase()), v.to_string())),
    );
    // WSRELAY_BENCH_LOG=1 shows the gateway's warnings (closes, errors) on stderr.
    let log = std::env::var_os("WSRELAY_BENCH_LOG").is_some();
    let spawn = move || {
        let mut command = Command::new(&bin);
        if let Some(config) = &config {
            command.arg("--config").arg(config);
        }
        command
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("wsrelay")
    };
    let proc = Proc(spawn());
    wait_port(addr).await;
    wait_ready(addr).await;
    Target {
        name: name.into(),
        kind: Kind::Wsrelay,
        proc,
        addr,
        dir: None,
        restart: Some(Box::new(spawn)),
    }
}

pub async fn wait_ready(addr: SocketAddr) {
    let started = Instant::now();
    loop {
        if http(addr, "GET", "/ready", "")
            .await
            .starts_with("HTTP/1.1 200")
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gateway not ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

/// The sum of a Prometheus metric's samples (all label sets) on the gateway's `/metrics`.
pub async fn metric(target: &Target, name: &str) -> f64 {
    http(target.addr, "GET", "/metrics", "")
        .await
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

pub fn start_nchan_proc(workers: usize) -> (Proc, SocketAddr, std::path::PathBuf) {
    assert!(
        std::path::Path::new(NCHAN_MODULE).exists(),
        "Nchan is missing: apt-get install -y nginx libnginx-mod-nchan"
    );
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("wsrelay-nchan-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        r#"load_module {NCHAN_MODULE};
user root;
daemon off;
worker_processes {workers};
worker_rlimit_nofile 40000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 40000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/sub/(\w+)$ {{ nchan_subscriber websocket; nchan_channel_id $1; }}
        location ~ ^/es/(\w+)$ {{ nchan_subscriber eventsource; nchan_channel_id $1; }}
        location ~ ^/lp/(\w+)$ {{ nchan_subscriber longpoll; nchan_channel_id $1; }}
        location ~ ^/pub/(\w+)$ {{ nchan_publisher; nchan_channel_id $1; }}
    }}
}}
"#,
        dir = dir.display()
    );
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf).unwrap();
    let proc = Proc(
        Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&file)
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx"),
    );
    (proc, ([127, 0, 0, 1], port).into(), dir)
}

pub async fn start_nchan(workers: usize) -> Target {
    let (proc, addr, dir) = start_nchan_proc(workers);
    wait_port(addr).await;
    Target {
        name: format!("nchan-{workers}w"),
        kind: Kind::Nchan,
        proc,
        addr,
        dir: Some(dir),
        restart: None,
    }
}

// ---------------------------------------------------------------- clients

/// Nanoseconds since the process's base instant: both publisher and receivers live in
/// this process, so the monotonic clock is shared.
pub fn now_ns(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// `seq` (10 digits) `time` (16 digits), padded to `size` bytes.
pub fn payload(seq: u64, base: Instant, size: usize) -> String {
    let mut s = format!("{seq:010} {:016} ", now_ns(base));
    s.extend(std::iter::repeat_n('x', size.saturating_sub(s.len())));
    s
}

pub fn parse(payload: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(payload.get(..27)?).ok()?;
    Some((text[..10].parse().ok()?, text[11..27].parse().ok()?))
}

/// What one client socket saw.
#[derive(Default)]
pub struct Seen {
    pub received: AtomicU64,
    pub lost: AtomicU64,
    pub dup: AtomicU64,
    pub closed: AtomicBool,
    pub close_code: AtomicU64,
    /// Latencies in microseconds, drained by the phase that reads them.
    pub latencies: Mutex<Vec<u32>>,
    /// The next expected sequence number (broadcast scenarios).
    pub next: AtomicU64,
}

impl Seen {
    /// Counts one received message (a payload of [`payload`]; anything else is
    /// ignored): its latency and, with `ordered`, a gap or a duplicate in the sequence.
    pub fn record(&self, data: &[u8], base: Instant, ordered: bool) {
        let Some((seq, sent)) = parse(data) else {
            return;
        };
        self.received.fetch_add(1, Ordering::Relaxed);
        let latency = now_ns(base).saturating_sub(sent) / 1000;
        self.latencies
            .lock()
            .unwrap()
            .push(latency.min(u32::MAX as u64) as u32);
        if ordered {
            let next = self.next.load(Ordering::Relaxed);
            if seq < next {
                self.dup.fetch_add(1, Ordering::Relaxed);
            } else {
                self.lost.fetch_add(seq - next, Ordering::Relaxed);
                self.next.store(seq + 1, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Default)]
pub struct Fleet {
    pub seen: Vec<Arc<Seen>>,
    /// Sockets whose reader is paused (slow consumers).
    pub paused: Vec<Arc<AtomicBool>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Handshakes that failed (the first error is printed).
    pub failed: usize,
    /// How long each handshake took (connect to 101), microseconds.
    pub handshake_us: Vec<u32>,
}

impl Fleet {
    /// Openings per second since `started`; says how many of `n` failed, if any.
    pub fn opened(&self, n: usize, what: &str, started: Instant) -> f64 {
        if self.failed > 0 {
            println!("    {} of {n} {what}s failed", self.failed);
        }
        self.seen.len() as f64 / started.elapsed().as_secs_f64()
    }

    pub fn total(&self) -> u64 {
        self.seen
            .iter()
            .map(|s| s.received.load(Ordering::Relaxed))
            .sum()
    }

    pub fn sum(&self, f: impl Fn(&Seen) -> u64) -> u64 {
        self.seen.iter().map(|s| f(s)).sum()
    }

    pub fn take_latencies(&self) -> Vec<u32> {
        let mut all = Vec::new();
        for s in &self.seen {
            all.append(&mut s.latencies.lock().unwrap());
        }
        all
    }

    pub fn reset_sequences(&self, next: u64) {
        for s in &self.seen {
            s.next.store(next, Ordering::Relaxed);
        }
    }

    /// `p50/p99/max` of the handshake times, milliseconds.
    pub fn handshake_ms(&self) -> (f64, f64, f64) {
        let mut t = self.handshake_us.clone();
        t.sort_unstable();
        (
            percentile(&t, 0.5),
            percentile(&t, 0.99),
            percentile(&t, 1.0),
        )
    }

    pub fn open(&self) -> usize {
        self.seen
            .iter()
            .filter(|s| !s.closed.load(Ordering::Relaxed))
            .count()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A TCP connection to `addr` from source address number `i % SOURCES`.
pub async fn connect_from(addr: SocketAddr, i: usize) -> Result<TcpStream, String> {
    let source: SocketAddr = format!("127.0.0.{}:0", 2 + i % SOURCES).parse().unwrap();
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(source).map_err(|e| e.to_string())?;
    socket.connect(addr).await.map_err(|e| e.to_string())
}

pub async fn dial(
    addr: SocketAddr,
    i: usize,
    url: &str,
    cookie: Option<String>,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, String> {
    let stream = connect_from(addr, i).await?;
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert("cookie", cookie.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Opens `n` sockets, `concurrency` handshakes at a time (each within 10 s); `url(i)` and
/// `cookie(i)` say where. `ordered`: check the broadcast sequence. Returns the fleet and
/// handshakes/s.
pub async fn connect_fleet(
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    url: impl Fn(usize) -> String,
    cookie: impl Fn(usize) -> Option<String>,
    ordered: bool,
    base: Instant,
) -> (Fleet, f64) {
    let started = Instant::now();
    let mut fleet = Fleet::default();
    let opened = open_concurrently(&mut fleet, n, concurrency, "socket", |i| {
        let (u, c) = (url(i), cookie(i));
        async move { dial(addr, i, &u, c).await }
    })
    .await;
    for mut ws in opened {
        let seen = Arc::new(Seen::default());
        let paused = Arc::new(AtomicBool::new(false));
        let (s, pz) = (seen.clone(), paused.clone());
        fleet.tasks.push(tokio::spawn(async move {
            loop {
                while pz.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let Some(Ok(m)) = ws.next().await else { break };
                let data = match &m {
                    Message::Text(t) => t.as_bytes(),
                    Message::Binary(b) => &b[..],
                    Message::Close(frame) => {
                        s.close_code.store(
                            frame.as_ref().map_or(0, |f| u16::from(f.code) as u64),
                            Ordering::Relaxed,
                        );
                        break;
                    }
                    _ => continue,
                };
                s.record(data, base, ordered);
            }
            s.closed.store(true, Ordering::Relaxed);
            let _ = ws.close(None).await;
        }));
        fleet.seen.push(seen);
        fleet.paused.push(paused);
    }
    let rate = fleet.opened(n, "socket", started);
    (fleet, rate)
}

/// Opens `n` connections with `open(i)`, at most `concurrency` at once, each within
/// 10 s; records each one's opening time in `fleet.handshake_us` and counts failures in
/// `fleet.failed` (the first is printed, named `what`). Returns the opened ones, in order.
pub async fn open_concurrently<T, F, Fut>(
    fleet: &mut Fleet,
    n: usize,
    concurrency: usize,
    what: &str,
    open: F,
) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let opening = open(i);
        let timed_out = format!("{what} open timed out (10 s)");
        pending.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(10), opening)
                .await
                .unwrap_or(Err(timed_out));
            drop(permit);
            let took = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
            (r, took)
        }));
    }
    let mut opened = Vec::with_capacity(n);
    for (i, p) in pending.into_iter().enumerate() {
        let (r, took) = p.await.unwrap();
        fleet.handshake_us.push(took);
        match r {
            Ok(one) => opened.push(one),
            Err(e) => {
                if fleet.failed == 0 {
                    println!("    {what} {i} failed: {e}");
                }
                fleet.failed += 1;
            }
        }
    }
    opened
}

/// How messages get to the target.
pub enum Publisher {
    Redis(redis::aio::MultiplexedConnection),
    Nchan(SocketAddr),
}

impl Publisher {
    pub async fn new(target: &Target, redis: Option<&Redis>) -> Publisher {
        match redis {
            Some(r) if !target.is_nchan() => Publisher::Redis(r.conn().await),
            _ => Publisher::Nchan(target.addr),
        }
    }

    pub async fn publish_batch(&mut self, batch: &[(String, String)]) {
        match self {
            Publisher::Redis(conn) => {
                let mut pipe = redis::pipe();
                for (key, msg) in batch {
                    pipe.publish(key, msg).ignore();
                }
                // An overloaded step may make Redis answer late: its messages then count
                // as lost, and the run goes on.
                if let Err(e) = pipe.query_async::<()>(conn).await {
                    eprintln!("publish failed ({e}); the step's messages count as lost");
                }
            }
            Publisher::Nchan(addr) => {
                // One keep-alive connection, requests pipelined, answers read.
                let mut s = tokio::net::TcpStream::connect(*addr).await.unwrap();
                let mut out = String::new();
                for (chan, msg) in batch {
                    out.push_str(&format!(
                        "POST /pub/{chan} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{msg}",
                        msg.len()
                    ));
                }
                s.write_all(out.as_bytes()).await.unwrap();
                let mut answers = 0;
                let mut buf = vec![0u8; 65536];
                let mut text = Vec::new();
                while answers < batch.len() {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    text.extend_from_slice(&buf[..n]);
                    answers = text.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
                }
            }
        }
    }
}

/// Publishes `rate` messages of `size` bytes per second for `duration`, in 5 ms ticks;
/// `pick(seq)` names the channel/key of message `seq`. Returns the number published.
pub async fn publish_at(
    publisher: &mut Publisher,
    rate: f64,
    duration: Duration,
    first_seq: u64,
    base: Instant,
    pick: &dyn Fn(u64) -> String,
    size: usize,
) -> u64 {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        if due > sent {
            let batch: Vec<(String, String)> = (sent..due)
                .map(|k| (pick(first_seq + k), payload(first_seq + k, base, size)))
                .collect();
            publisher.publish_batch(&batch).await;
            sent = due;
        }
    }
    sent
}

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Waits until `fleet` received `want` messages in all, or `limit` passed.
pub async fn drain(fleet: &Fleet, want: u64, limit: Duration) -> bool {
    let started = Instant::now();
    while fleet.total() < want {
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}
