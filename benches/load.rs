//! Load benchmark: the release gateway (and Nchan, for comparison) on loopback, driven
//! from this separate process. See `benches/README.md` for the command and scenarios.
//!
//! Every loop is bounded in count and time; every process started here is killed here.
//! Client sockets are spread over source addresses 127.0.0.2-127.0.0.17 so that no
//! source address runs out of ports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SOURCES: usize = 16;
const PAYLOAD: usize = 100;

// ---------------------------------------------------------------- processes

struct Proc(Child);

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_port(addr: SocketAddr) {
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
fn usage(pid: u32) -> (u64, f64) {
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

fn cpu_of(stat_path: &str) -> f64 {
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

fn own_cpu() -> f64 {
    cpu_of("/proc/self/stat")
}

struct Redis {
    _proc: Proc,
    port: u16,
}

async fn start_redis() -> Redis {
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
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

/// A server under test: the gateway or Nchan.
struct Target {
    name: String,
    proc: Proc,
    addr: SocketAddr,
    /// Kept for Nchan (its config and temp files); removed on drop.
    dir: Option<std::path::PathBuf>,
    restart: Option<Box<dyn Fn() -> Child + Send + Sync>>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Target {
    fn usage(&self) -> (u64, f64) {
        usage(self.proc.0.id())
    }

    fn is_nchan(&self) -> bool {
        self.dir.is_some()
    }

    /// The socket URL for channel `channel` (a facility with wsrelay).
    fn url(&self, channel: &str, query: &str) -> String {
        if self.is_nchan() {
            format!("ws://{}/sub/{channel}", self.addr)
        } else {
            format!("ws://{}/ws/{channel}?{query}", self.addr)
        }
    }
}

async fn start_wsrelay(redis: &Redis, extra: &[(&str, &str)]) -> Target {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut env: Vec<(String, String)> = vec![
        ("RUST_LOG".into(), "warn".into()),
        ("WSRELAY__LISTEN".into(), addr.to_string()),
        (
            "WSRELAY__REDIS__URL".into(),
            format!("redis://127.0.0.1:{}/0", redis.port),
        ),
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
    let spawn = move || {
        Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stderr(Stdio::null())
            .spawn()
            .expect("wsrelay")
    };
    let proc = Proc(spawn());
    wait_port(addr).await;
    wait_ready(addr).await;
    Target {
        name: "wsrelay".into(),
        proc,
        addr,
        dir: None,
        restart: Some(Box::new(spawn)),
    }
}

async fn wait_ready(addr: SocketAddr) {
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

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

fn start_nchan_proc(workers: usize) -> (Proc, SocketAddr, std::path::PathBuf) {
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

async fn start_nchan(workers: usize) -> Target {
    let (proc, addr, dir) = start_nchan_proc(workers);
    wait_port(addr).await;
    Target {
        name: format!("nchan-{workers}w"),
        proc,
        addr,
        dir: Some(dir),
        restart: None,
    }
}

// ---------------------------------------------------------------- clients

/// Nanoseconds since the process's base instant: both publisher and receivers live in
/// this process, so the monotonic clock is shared.
fn now_ns(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// `seq` (10 digits) `time` (16 digits), padded to PAYLOAD bytes.
fn payload(seq: u64, base: Instant) -> String {
    let mut s = format!("{seq:010} {:016} ", now_ns(base));
    s.extend(std::iter::repeat_n('x', PAYLOAD - s.len()));
    s
}

fn parse(payload: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(payload.get(..27)?).ok()?;
    Some((text[..10].parse().ok()?, text[11..27].parse().ok()?))
}

/// What one client socket saw.
#[derive(Default)]
struct Seen {
    received: AtomicU64,
    lost: AtomicU64,
    dup: AtomicU64,
    closed: AtomicBool,
    close_code: AtomicU64,
    /// Latencies in microseconds, drained by the phase that reads them.
    latencies: Mutex<Vec<u32>>,
    /// The next expected sequence number (broadcast scenarios).
    next: AtomicU64,
}

struct Fleet {
    seen: Vec<Arc<Seen>>,
    /// Sockets whose reader is paused (slow consumers).
    paused: Vec<Arc<AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    fn total(&self) -> u64 {
        self.seen
            .iter()
            .map(|s| s.received.load(Ordering::Relaxed))
            .sum()
    }

    fn sum(&self, f: impl Fn(&Seen) -> u64) -> u64 {
        self.seen.iter().map(|s| f(s)).sum()
    }

    fn take_latencies(&self) -> Vec<u32> {
        let mut all = Vec::new();
        for s in &self.seen {
            all.append(&mut s.latencies.lock().unwrap());
        }
        all
    }

    fn reset_sequences(&self, next: u64) {
        for s in &self.seen {
            s.next.store(next, Ordering::Relaxed);
        }
    }

    fn open(&self) -> usize {
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

async fn dial(
    addr: SocketAddr,
    i: usize,
    url: &str,
    cookie: Option<String>,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String> {
    let source: SocketAddr = format!("127.0.0.{}:0", 2 + i % SOURCES).parse().unwrap();
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(source).map_err(|e| e.to_string())?;
    let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
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

/// Opens `n` sockets, `concurrency` handshakes at a time; `url(i)` and `cookie(i)` say
/// where. `ordered`: check the broadcast sequence. Returns the fleet and handshakes/s.
async fn connect_fleet(
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    url: impl Fn(usize) -> String,
    cookie: impl Fn(usize) -> Option<String>,
    ordered: bool,
    base: Instant,
) -> (Fleet, f64) {
    let started = Instant::now();
    let mut fleet = Fleet {
        seen: Vec::new(),
        paused: Vec::new(),
        tasks: Vec::new(),
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut pending = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (u, c) = (url(i), cookie(i));
        pending.push(tokio::spawn(async move {
            let r = dial(addr, i, &u, c).await;
            drop(permit);
            r
        }));
    }
    for (i, p) in pending.into_iter().enumerate() {
        let mut ws = match p.await.unwrap() {
            Ok(ws) => ws,
            Err(e) => panic!("socket {i}: {e}"),
        };
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
                let Some((seq, sent)) = parse(data) else {
                    continue;
                };
                s.received.fetch_add(1, Ordering::Relaxed);
                let latency = now_ns(base).saturating_sub(sent) / 1000;
                s.latencies
                    .lock()
                    .unwrap()
                    .push(latency.min(u32::MAX as u64) as u32);
                if ordered {
                    let next = s.next.load(Ordering::Relaxed);
                    if seq < next {
                        s.dup.fetch_add(1, Ordering::Relaxed);
                    } else {
                        s.lost.fetch_add(seq - next, Ordering::Relaxed);
                        s.next.store(seq + 1, Ordering::Relaxed);
                    }
                }
            }
            s.closed.store(true, Ordering::Relaxed);
            let _ = ws.close(None).await;
        }));
        fleet.seen.push(seen);
        fleet.paused.push(paused);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    (fleet, rate)
}

/// How messages get to the target.
enum Publisher {
    Redis(redis::aio::MultiplexedConnection),
    Nchan(SocketAddr),
}

impl Publisher {
    async fn publish_batch(&mut self, batch: &[(String, String)]) {
        match self {
            Publisher::Redis(conn) => {
                let mut pipe = redis::pipe();
                for (key, msg) in batch {
                    pipe.publish(key, msg).ignore();
                }
                let _: () = pipe.query_async(conn).await.unwrap();
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

/// Publishes `rate` messages per second for `duration`, in 5 ms ticks; `pick(seq)` names
/// the channel/key of message `seq`. Returns the number published.
async fn publish_at(
    publisher: &mut Publisher,
    rate: f64,
    duration: Duration,
    first_seq: u64,
    base: Instant,
    pick: &dyn Fn(u64) -> String,
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
                .map(|k| (pick(first_seq + k), payload(first_seq + k, base)))
                .collect();
            publisher.publish_batch(&batch).await;
            sent = due;
        }
    }
    sent
}

/// The gateway's own view since it started: quantiles of
/// `wsrelay_delivery_latency_seconds` (broker receipt → socket writer, per write batch),
/// read from `/metrics` bucket bounds (so "p99<=0.25" means within that bucket).
async fn gateway_latency(target: &Target) -> String {
    if target.is_nchan() {
        return String::new();
    }
    let text = http(target.addr, "GET", "/metrics", "").await;
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("wsrelay_delivery_latency_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            Some((
                le.parse::<f64>().unwrap_or(f64::INFINITY),
                rest.trim().parse::<f64>().ok()?,
            ))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let q = |p: f64| {
        buckets
            .iter()
            .find(|b| b.1 >= total * p)
            .map_or(f64::NAN, |b| b.0 * 1000.0)
    };
    format!(
        " [gateway side: p50<={}ms p99<={}ms over {total} batches]",
        q(0.5),
        q(0.99)
    )
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Waits until `fleet` received `want` messages in all, or `limit` passed.
async fn drain(fleet: &Fleet, want: u64, limit: Duration) -> bool {
    let started = Instant::now();
    while fleet.total() < want {
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

// ---------------------------------------------------------------- scenarios

/// Scenario 1: RSS per subscribed idle socket.
async fn idle(target: &Target, redis: Option<&Redis>, n: usize, base: Instant) -> Value {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, _) = target.usage();
    let url = |i: usize| {
        target.url(
            &format!("idle{}", i % 100),
            "subscribe-broadcast&subscribe-session",
        )
    };
    let cookie = |i: usize| Some(format!("sessionid=s{i}"));
    let (fleet, rate) = connect_fleet(target.addr, n, 256, url, cookie, false, base).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = target.usage();
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    let channels = match redis {
        Some(r) => {
            let list: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("*")
                .query_async(&mut r.conn().await)
                .await
                .unwrap();
            list.len()
        }
        None => 0,
    };
    println!(
        "  idle {:>10} sockets={n:>6} rss {before:>7} KiB -> {after:>8} KiB = {per:>6.2} KiB/socket  open={} handshakes={rate:.0}/s redis_channels={channels}",
        target.name,
        fleet.open()
    );
    drop(fleet);
    json!({"target": target.name, "sockets": n, "rss_before_kib": before, "rss_after_kib": after, "kib_per_socket": per, "handshakes_per_s": rate})
}

/// Scenario 2: broadcast fan-out to `n` sockets at rising rates, then latency at half of
/// the peak.
async fn broadcast(target: &Target, redis: Option<&Redis>, n: usize, base: Instant) -> Value {
    let url = |_: usize| target.url("fan", "subscribe-broadcast");
    let (fleet, _) = connect_fleet(target.addr, n, 256, url, |_| None, true, base).await;
    let mut publisher = match redis {
        Some(r) => Publisher::Redis(r.conn().await),
        None => Publisher::Nchan(target.addr),
    };
    let key = if target.is_nchan() {
        "fan".to_string()
    } else {
        "broadcast:fan".to_string()
    };
    let pick = |_: u64| key.clone();
    let mut seq = 0u64;
    let mut rate = 20_000.0 / n as f64 * 10.0; // messages/s; ×n deliveries
    let mut best = 0.0f64;
    let mut steps = Vec::new();
    for _ in 0..14 {
        fleet.reset_sequences(seq);
        let before = fleet.total();
        let (_, cpu0) = target.usage();
        let client0 = own_cpu();
        let started = Instant::now();
        let sent = publish_at(
            &mut publisher,
            rate,
            Duration::from_secs(2),
            seq,
            base,
            &pick,
        )
        .await;
        seq += sent;
        let want = before + sent * n as u64;
        let complete = drain(&fleet, want, Duration::from_secs(3)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let got = fleet.total() - before;
        let deliveries = got as f64 / elapsed;
        let (_, cpu1) = target.usage();
        let _ = fleet.take_latencies();
        steps.push(
            json!({"rate": rate, "deliveries_per_s": deliveries, "complete": complete,
            "server_cpu_s": cpu1 - cpu0, "client_cpu_s": own_cpu() - client0}),
        );
        println!(
            "    {:>10} n={n:>5} offered {:>9.0}/s -> {:>9.0} deliveries/s {} server_cpu={:.2}s client_cpu={:.2}s",
            target.name,
            rate * n as f64,
            deliveries,
            if complete { "" } else { "(backlog)" },
            cpu1 - cpu0,
            own_cpu() - client0
        );
        // Let any backlog clear before the next step.
        let _ = drain(&fleet, want, Duration::from_secs(10)).await;
        if deliveries > best * 1.05 {
            best = deliveries;
        } else if !complete || deliveries < best * 0.95 {
            break;
        }
        if !complete {
            break;
        }
        rate *= 1.6;
    }
    // Latency at half of the peak, and at two fixed rates for comparison across runs
    // and targets.
    let mut latency = Vec::new();
    for (label, deliveries) in [
        ("half", best / 2.0),
        ("100k", 100_000.0),
        ("300k", 300_000.0),
    ] {
        if deliveries > best {
            continue;
        }
        let rate = deliveries / n as f64;
        fleet.reset_sequences(seq);
        let lost0 = fleet.sum(|s| s.lost.load(Ordering::Relaxed));
        let dup0 = fleet.sum(|s| s.dup.load(Ordering::Relaxed));
        let before = fleet.total();
        let _ = fleet.take_latencies();
        let sent = publish_at(
            &mut publisher,
            rate,
            Duration::from_secs(3),
            seq,
            base,
            &pick,
        )
        .await;
        seq += sent;
        let want = before + sent * n as u64;
        let complete = drain(&fleet, want, Duration::from_secs(10)).await;
        let mut lat = fleet.take_latencies();
        lat.sort_unstable();
        let lost = fleet.sum(|s| s.lost.load(Ordering::Relaxed)) - lost0
            + (want - fleet.total().min(want));
        let dup = fleet.sum(|s| s.dup.load(Ordering::Relaxed)) - dup0;
        let (p50, p99, p999) = (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
        );
        println!(
            "  broadcast {:>10} sockets={n:>6} peak={best:>9.0}/s; at {label} ({deliveries:.0}/s): p50={p50:.2}ms p99={p99:.2}ms p999={p999:.2}ms lost={lost} dup={dup}{}",
            target.name,
            if complete { "" } else { " (incomplete)" },
        );
        latency.push(json!({"at": label, "deliveries_per_s": deliveries, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "lost": lost, "dup": dup}));
    }
    json!({"target": target.name, "sockets": n, "peak_deliveries_per_s": best, "latency": latency, "steps": steps})
}

/// Identity records for `n` sessions: session s{i} → user u{i}, group "everyone".
async fn write_identities(redis: &Redis, n: usize) {
    let mut conn = redis.conn().await;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let record = json!({"user": format!("u{i}"), "groups": ["everyone"]}).to_string();
            pipe.set_ex(format!("wsrelay:identity:s{i}"), record, 3600)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
}

/// Scenario 3: the ws4redis shape — each socket on its own user key plus one shared
/// group; publications to random users.
async fn users(target: &Target, redis: &Redis, n: usize, rate: f64, base: Instant) -> Value {
    write_identities(redis, n).await;
    let url = |_: usize| target.url("inbox", "subscribe-user&subscribe-group");
    let cookie = |i: usize| Some(format!("sessionid=s{i}"));
    let (fleet, _) = connect_fleet(target.addr, n, 256, url, cookie, false, base).await;
    let mut publisher = Publisher::Redis(redis.conn().await);
    // A multiplicative hash spreads consecutive sequence numbers over the users.
    let pick = move |seq: u64| format!("user:u{}:inbox", (seq.wrapping_mul(2654435761)) % n as u64);
    let (_, cpu0) = target.usage();
    let started = Instant::now();
    let sent = publish_at(&mut publisher, rate, Duration::from_secs(3), 0, base, &pick).await;
    let complete = drain(&fleet, sent, Duration::from_secs(10)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (_, cpu1) = target.usage();
    let mut lat = fleet.take_latencies();
    lat.sort_unstable();
    let got = fleet.total();
    let (p50, p99, p999) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
    );
    println!(
        "  users     {:>10} sockets={n:>6} published={sent} delivered={got} ({:.0}/s) p50={p50:.2}ms p99={p99:.2}ms p999={p999:.2}ms lost={} server_cpu={:.2}s{}{}",
        target.name,
        got as f64 / elapsed,
        sent.saturating_sub(got),
        cpu1 - cpu0,
        if complete { "" } else { " (incomplete)" },
        gateway_latency(target).await
    );
    json!({"target": target.name, "sockets": n, "published": sent, "delivered": got, "deliveries_per_s": got as f64 / elapsed,
        "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "lost": sent.saturating_sub(got)})
}

/// Scenario 4: handshakes/s with identity from Redis, and the time for every socket to
/// reconnect after a gateway restart.
async fn storm(target: &mut Target, redis: &Redis, n: usize, base: Instant) -> Value {
    write_identities(redis, n).await;
    let storm_url = target.url("storm", "subscribe-user&subscribe-group");
    let url = |_: usize| storm_url.clone();
    let cookie = |i: usize| Some(format!("sessionid=s{i}"));
    let (fleet, rate) = connect_fleet(target.addr, n, 512, url, cookie, false, base).await;
    println!(
        "  storm     {:>10} {n} handshakes with identity from Redis: {rate:.0}/s",
        target.name
    );
    // Restart: stop, start again on the same port, reconnect everybody.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(target.proc.0.id().to_string())
        .status();
    let _ = target.proc.0.wait();
    let closed = fleet
        .seen
        .iter()
        .filter(|s| s.closed.load(Ordering::Relaxed))
        .count();
    drop(fleet);
    let restart = target.restart.as_ref().unwrap();
    target.proc = Proc(restart());
    let started = Instant::now();
    wait_port(target.addr).await;
    wait_ready(target.addr).await;
    let (fleet, _) = connect_fleet(target.addr, n, 512, url, cookie, false, base).await;
    let reconnect = started.elapsed().as_secs_f64();
    println!("  storm     {:>10} {n} sockets back {reconnect:.2}s after the restart ({closed} saw the close)", target.name);
    drop(fleet);
    json!({"target": target.name, "sockets": n, "handshakes_per_s": rate, "reconnect_all_s": reconnect})
}

/// Scenario 5: 10 % of sockets stop reading during a broadcast run.
async fn slow(
    target: &Target,
    redis: &Redis,
    n: usize,
    rate: f64,
    queue_bytes: u64,
    base: Instant,
) -> Value {
    let url = |_: usize| target.url("slowfan", "subscribe-broadcast");
    let (fleet, _) = connect_fleet(target.addr, n, 256, url, |_| None, true, base).await;
    let slow_n = n / 10;
    for p in &fleet.paused[..slow_n] {
        p.store(true, Ordering::Relaxed);
    }
    let (rss0, _) = target.usage();
    let mut publisher = Publisher::Redis(redis.conn().await);
    let pick = |_: u64| "broadcast:slowfan".to_string();
    let mut peak_rss = rss0;
    let mut sent = 0;
    for round in 0..5 {
        sent += publish_at(
            &mut publisher,
            rate,
            Duration::from_secs(1),
            round * 1_000_000,
            base,
            &pick,
        )
        .await;
        peak_rss = peak_rss.max(target.usage().0);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fast: Vec<u32> = {
        let mut all = Vec::new();
        for s in &fleet.seen[slow_n..] {
            all.append(&mut s.latencies.lock().unwrap());
        }
        all.sort_unstable();
        all
    };
    let slow_closed = fleet.seen[..slow_n]
        .iter()
        .filter(|s| s.closed.load(Ordering::Relaxed) || s.close_code.load(Ordering::Relaxed) != 0)
        .count();
    let fast_got: u64 = fleet.seen[slow_n..]
        .iter()
        .map(|s| s.received.load(Ordering::Relaxed))
        .sum();
    let bound = slow_n as u64 * queue_bytes / 1024;
    println!(
        "  slow      {:>10} sockets={n} slow={slow_n} published={sent} fast_delivered={fast_got}/{} fast p99={:.2}ms; rss {rss0} KiB -> peak {peak_rss} KiB (slow queues bound {bound} KiB)",
        target.name,
        sent * (n - slow_n) as u64,
        percentile(&fast, 0.99)
    );
    for p in &fleet.paused[..slow_n] {
        p.store(false, Ordering::Relaxed);
    }
    let closed_after = {
        tokio::time::sleep(Duration::from_secs(2)).await;
        fleet.seen[..slow_n]
            .iter()
            .filter(|s| s.closed.load(Ordering::Relaxed))
            .count()
    };
    json!({"target": target.name, "sockets": n, "slow": slow_n, "published": sent, "fast_delivered": fast_got,
        "fast_expected": sent * (n - slow_n) as u64, "fast_p99_ms": percentile(&fast, 0.99), "rss_before_kib": rss0,
        "rss_peak_kib": peak_rss, "slow_queue_bound_kib": bound, "slow_closed": closed_after.max(slow_closed)})
}

// ---------------------------------------------------------------- main

/// A number from the environment, for exploring other sizes than the defaults.
fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = ["idle", "broadcast", "users", "storm", "slow", "nchan"];
    let wanted: Vec<&str> = if args.is_empty() {
        all.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Instant::now();
    let mut results: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let client_cpu0 = own_cpu();
    runtime.block_on(async {
        let queue_bytes = 16 << 20;
        if wanted.contains(&"idle") {
            println!("scenario 1: idle memory");
            for n in [1_000, 10_000, 15_000] {
                let redis = start_redis().await;
                let gw = start_wsrelay(&redis, &[]).await;
                results
                    .entry("idle")
                    .or_default()
                    .push(idle(&gw, Some(&redis), n, base).await);
            }
            if wanted.contains(&"nchan") {
                for workers in [1, 2] {
                    for n in [1_000, 10_000, 15_000] {
                        let nchan = start_nchan(workers).await;
                        results
                            .entry("idle")
                            .or_default()
                            .push(idle(&nchan, None, n, base).await);
                    }
                }
            }
        }
        if wanted.contains(&"broadcast") {
            println!("scenario 2: broadcast fan-out");
            for n in [1_000, 10_000] {
                let redis = start_redis().await;
                let q = queue_bytes.to_string();
                let gw = start_wsrelay(&redis, &[("queue_bytes", &q)]).await;
                results
                    .entry("broadcast")
                    .or_default()
                    .push(broadcast(&gw, Some(&redis), n, base).await);
                if wanted.contains(&"nchan") {
                    for workers in [1, 2] {
                        let nchan = start_nchan(workers).await;
                        results
                            .entry("broadcast")
                            .or_default()
                            .push(broadcast(&nchan, None, n, base).await);
                    }
                }
            }
        }
        if wanted.contains(&"users") {
            println!("scenario 3: ws4redis shape");
            let redis = start_redis().await;
            let gw = start_wsrelay(&redis, &[]).await;
            let n = env_or("WSRELAY_BENCH_USERS", 10_000.0) as usize;
            let rate = env_or("WSRELAY_BENCH_USERS_RATE", 50_000.0);
            results
                .entry("users")
                .or_default()
                .push(users(&gw, &redis, n, rate, base).await);
        }
        if wanted.contains(&"storm") {
            println!("scenario 4: connection storm");
            let redis = start_redis().await;
            let mut gw = start_wsrelay(&redis, &[]).await;
            results
                .entry("storm")
                .or_default()
                .push(storm(&mut gw, &redis, 10_000, base).await);
        }
        if wanted.contains(&"slow") {
            println!("scenario 5: slow consumers");
            let redis = start_redis().await;
            let gw = start_wsrelay(&redis, &[]).await;
            let bound = wsrelay::config::DEFAULT_QUEUE_BYTES as u64;
            results
                .entry("slow")
                .or_default()
                .push(slow(&gw, &redis, 1_000, 2_000.0, bound, base).await);
        }
    });
    let summary = json!({"date": "see RESULTS.md", "client_cpu_s": own_cpu() - client_cpu0, "results": results});
    println!("{summary}");
}
