//! Load benchmark: the release gateway, Nchan and a minimal fan-out server (the yardstick,
//! `benches/minimal_fanout.rs`) on loopback, driven from this separate process. See
//! `benches/README.md` for the commands and scenarios.
//!
//! Every loop is bounded in count and time; every process started here is killed here,
//! by its pid. Client sockets are spread over source addresses 127.0.0.2-127.0.0.17 so
//! that no source address runs out of ports.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The latency bound of the broadcast scenario's peak.
const P99_BOUND_MS: f64 = 100.0;

/// The minimal fan-out server's binary: `WSRELAY_BENCH_MINIMAL`, or built once with
/// `cargo build --profile bench --example minimal_fanout` (at most 10 minutes) next to this
/// benchmark's own binary (`<target>/release/deps/load-…` →
/// `<target>/release/examples/minimal_fanout`).
fn minimal_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("WSRELAY_BENCH_MINIMAL") {
                return PathBuf::from(path);
            }
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("the benchmark runs from <target>/<profile>/deps");
            let binary = profile_dir.join("examples").join("minimal_fanout");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            // The `bench` profile is `release` (it inherits it) and shares this
            // benchmark's artifacts, so nothing else is rebuilt.
            println!("building the minimal fan-out server: cargo build --profile bench --example minimal_fanout");
            let mut command = Command::new(cargo);
            // What cargo set for this process only: build scripts that watch these
            // (ring's) would otherwise see them change and rebuild half the tree.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if name.starts_with("CARGO_PKG_")
                    || [
                        "CARGO_MANIFEST_DIR",
                        "CARGO_MANIFEST_PATH",
                        "CARGO_CRATE_NAME",
                        "CARGO_BIN_NAME",
                        "CARGO_PRIMARY_PACKAGE",
                        "CARGO_TARGET_TMPDIR",
                        "OUT_DIR",
                    ]
                    .contains(&name.as_ref())
                {
                    command.env_remove(name.as_ref());
                }
            }
            let mut child = command
                .args(["build", "--profile", "bench", "--example", "minimal_fanout"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stdout(Stdio::null())
                .spawn()
                .expect("cargo");
            let deadline = Instant::now() + Duration::from_secs(600);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("building minimal_fanout took more than 10 minutes");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert!(status.success(), "building minimal_fanout failed");
            assert!(binary.exists(), "{} is missing", binary.display());
            binary
        })
        .clone()
}

/// The minimal fan-out server on a free port, subscribed to `key` only.
async fn start_minimal(redis: &Redis, key: &str) -> Target {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let proc = Proc(
        Command::new(minimal_binary())
            .arg(addr.to_string())
            .arg(redis.url())
            .arg(key)
            .stdout(Stdio::null())
            .spawn()
            .expect("minimal_fanout"),
    );
    wait_port(addr).await;
    Target {
        name: "minimal".into(),
        kind: Kind::Minimal,
        proc,
        addr,
        dir: None,
        restart: None,
    }
}

/// The servers a comparison runs: wsrelay, the minimal server, and Nchan with each of
/// `WSRELAY_BENCH_NCHAN_WORKERS` (default 1 and 2) worker processes when asked for.
#[derive(Clone)]
enum Server {
    Wsrelay,
    /// A gateway binary built from an earlier commit (`WSRELAY_BENCH_BEFORE`), to show
    /// before and after in the same run.
    Before(std::path::PathBuf),
    Minimal,
    Nchan(usize),
}

fn servers(nchan: bool) -> Vec<Server> {
    let mut list = vec![Server::Wsrelay];
    if let Some(before) = std::env::var_os("WSRELAY_BENCH_BEFORE") {
        list.push(Server::Before(before.into()));
    }
    list.push(Server::Minimal);
    if nchan {
        list.extend(
            env_list("WSRELAY_BENCH_NCHAN_WORKERS", &[1.0, 2.0])
                .into_iter()
                .map(|w| Server::Nchan(w as usize)),
        );
    }
    list
}

/// Starts `server` (with its own Redis for wsrelay and the minimal server, which then
/// listens to `minimal_key`). `wsrelay_extra`: settings of the gateway.
async fn start(
    server: Server,
    minimal_key: &str,
    wsrelay_extra: &[(&str, &str)],
) -> (Target, Option<Redis>) {
    match server {
        Server::Wsrelay => {
            let redis = start_redis().await;
            (start_wsrelay(&redis, wsrelay_extra).await, Some(redis))
        }
        Server::Before(bin) => {
            let redis = start_redis().await;
            let target = start_gateway(&redis, wsrelay_extra, bin, "wsrelay-before", None).await;
            (target, Some(redis))
        }
        Server::Minimal => {
            let redis = start_redis().await;
            (start_minimal(&redis, minimal_key).await, Some(redis))
        }
        Server::Nchan(workers) => (start_nchan(workers).await, None),
    }
}

/// A handshake by hand (no WebSocket client): sends the upgrade request for `path`,
/// reads the answer's head (with `whole`, everything until the server closes, at most
/// 5 s) and returns it with the connection, which is never read again.
async fn raw_handshake(
    addr: SocketAddr,
    i: usize,
    path: &str,
    whole: bool,
) -> Result<(String, TcpStream), String> {
    let mut stream = connect_from(addr, i).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if !whole && answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    Ok((String::from_utf8_lossy(&answer).into_owned(), stream))
}

/// The gateway's own view since it started: quantiles of
/// `wsrelay_delivery_latency_seconds` (broker receipt → socket writer, per write batch),
/// read from `/metrics` bucket bounds (so "p99<=0.25" means within that bucket).
async fn gateway_latency(target: &Target) -> String {
    if target.kind != Kind::Wsrelay {
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

/// Samples the peak RSS of a process tree every 100 ms until dropped.
struct PeakRss {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    fn start(pid: u32) -> PeakRss {
        let peak = Arc::new(AtomicU64::new(usage(pid).0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                p.fetch_max(usage(pid).0, Ordering::Relaxed);
            }
        });
        PeakRss { peak, task }
    }

    fn get(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- scenarios

/// Scenario `idle`: RSS per subscribed idle socket.
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
    let hs = fleet.handshake_ms();
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
        "  idle {:>10} sockets={n:>6} rss {before:>7} KiB -> {after:>8} KiB = {per:>6.2} KiB/socket  open={} failed={} handshakes={rate:.0}/s (p50/p99/max {:.1}/{:.1}/{:.1} ms) redis_channels={channels}",
        target.name,
        fleet.open(),
        fleet.failed,
        hs.0,
        hs.1,
        hs.2,
    );
    let (open, failed) = (fleet.open(), fleet.failed);
    drop(fleet);
    json!({"target": target.name, "sockets": n, "open": open, "failed": failed, "rss_before_kib": before,
        "rss_after_kib": after, "kib_per_socket": per, "handshakes_per_s": rate,
        "handshake_ms_p50_p99_max": [hs.0, hs.1, hs.2]})
}

/// One measured publishing phase of the broadcast scenario.
struct Phase {
    offered: f64,
    deliveries_per_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    lost: u64,
    dup: u64,
    complete: bool,
    server_cpu: f64,
    client_cpu: f64,
    /// Deliveries of this phase that arrived.
    delivered: u64,
    /// The fleet's total once every delivery of this phase has arrived.
    until: u64,
}

impl Phase {
    fn cpu_per_million(&self) -> f64 {
        if self.delivered == 0 {
            return f64::NAN;
        }
        self.server_cpu / self.delivered as f64 * 1e6
    }

    /// Within the bound: everything delivered, nothing lost, p99 ≤ 100 ms.
    fn ok(&self) -> bool {
        self.complete && self.lost == 0 && self.p99 <= P99_BOUND_MS
    }

    fn json(&self) -> Value {
        json!({"offered_deliveries_per_s": self.offered, "deliveries_per_s": self.deliveries_per_s,
            "p50_ms": self.p50, "p99_ms": self.p99, "p999_ms": self.p999, "lost": self.lost, "dup": self.dup,
            "complete": self.complete, "server_cpu_s": self.server_cpu, "client_cpu_s": self.client_cpu,
            "server_cpu_s_per_million": self.cpu_per_million(), "within_bound": self.ok()})
    }

    fn line(&self, target: &Target, n: usize, label: &str) -> String {
        format!(
            "  broadcast {:>10} n={n:>5} {label:<6} offered {:>9.0}/s -> {:>9.0}/s p50={:.2}ms p99={:.2}ms p999={:.2}ms lost={} dup={} cpu={:.2}s ({:.2} s/M deliveries) client_cpu={:.2}s{}",
            target.name,
            self.offered,
            self.deliveries_per_s,
            self.p50,
            self.p99,
            self.p999,
            self.lost,
            self.dup,
            self.server_cpu,
            self.cpu_per_million(),
            self.client_cpu,
            if self.complete { "" } else { " (incomplete)" },
        )
    }
}

/// Publishes `deliveries` per second (÷ `n` messages/s) for `duration`, then waits up to
/// `drain_limit` for every delivery; latencies, losses and CPU of this phase only.
#[allow(clippy::too_many_arguments)]
async fn phase(
    target: &Target,
    fleet: &Fleet,
    publisher: &mut Publisher,
    pick: &dyn Fn(u64) -> String,
    deliveries: f64,
    duration: Duration,
    drain_limit: Duration,
    seq: &mut u64,
    base: Instant,
) -> Phase {
    let n = fleet.seen.len().max(1);
    fleet.reset_sequences(*seq);
    let lost0 = fleet.sum(|s| s.lost.load(Ordering::Relaxed));
    let dup0 = fleet.sum(|s| s.dup.load(Ordering::Relaxed));
    let before = fleet.total();
    let _ = fleet.take_latencies();
    let (_, cpu0) = target.usage();
    let client0 = own_cpu();
    let started = Instant::now();
    let rate = deliveries / n as f64;
    let sent = publish_at(publisher, rate, duration, *seq, base, pick, PAYLOAD).await;
    *seq += sent;
    let want = before + sent * n as u64;
    let complete = drain(fleet, want, drain_limit).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (_, cpu1) = target.usage();
    let got = fleet.total() - before;
    let mut lat = fleet.take_latencies();
    lat.sort_unstable();
    let lost =
        fleet.sum(|s| s.lost.load(Ordering::Relaxed)) - lost0 + (want - fleet.total().min(want));
    let dup = fleet.sum(|s| s.dup.load(Ordering::Relaxed)) - dup0;
    Phase {
        offered: deliveries,
        deliveries_per_s: got as f64 / elapsed,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        p999: percentile(&lat, 0.999),
        lost,
        dup,
        complete,
        server_cpu: cpu1 - cpu0,
        client_cpu: own_cpu() - client0,
        delivered: got,
        until: want,
    }
}

/// Scenario `broadcast`: `n` sockets on one channel. Rising rates (×1.6 per step) until a
/// step misses p99 ≤ 100 ms or loses anything: the peak is the last step within. Then
/// latency and CPU at fixed rates.
async fn broadcast(target: &Target, redis: Option<&Redis>, n: usize, base: Instant) -> Value {
    let url = |_: usize| target.url("fan", "subscribe-broadcast");
    let (fleet, _) = connect_fleet(target.addr, n, 256, url, |_| None, true, base).await;
    let mut publisher = Publisher::new(target, redis).await;
    let key = target.key("fan");
    let pick = |_: u64| key.clone();
    let mut seq = 0u64;
    let mut deliveries = env_or("WSRELAY_BENCH_START", 20_000.0);
    let max_steps = env_or("WSRELAY_BENCH_STEPS", 14.0) as usize;
    let mut peak: Option<Phase> = None;
    let mut max_seen = 0.0f64;
    let mut steps = Vec::new();
    for _ in 0..max_steps {
        let p = phase(
            target,
            &fleet,
            &mut publisher,
            &pick,
            deliveries,
            secs(2.0),
            Duration::from_secs(3),
            &mut seq,
            base,
        )
        .await;
        println!("{}", p.line(target, n, "step"));
        steps.push(p.json());
        max_seen = max_seen.max(p.deliveries_per_s);
        if !p.ok() {
            // Let any backlog clear before the fixed rates.
            if !drain(&fleet, p.until, Duration::from_secs(10)).await {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            break;
        }
        peak = Some(p);
        deliveries *= 1.6;
    }
    let peak_rate = peak.as_ref().map_or(0.0, |p| p.deliveries_per_s);
    println!(
        "  broadcast {:>10} n={n:>5} PEAK within p99<={P99_BOUND_MS}ms, no loss: {peak_rate:.0} deliveries/s{} (highest measured {max_seen:.0}/s)",
        target.name,
        peak.as_ref()
            .map(|p| format!(" (step offered {:.0}/s, p99 {:.2} ms)", p.offered, p.p99))
            .unwrap_or_default(),
    );
    let mut fixed = Vec::new();
    for rate in env_list("WSRELAY_BENCH_RATES", &[50_000.0, 100_000.0]) {
        let p = phase(
            target,
            &fleet,
            &mut publisher,
            &pick,
            rate,
            secs(3.0),
            Duration::from_secs(10),
            &mut seq,
            base,
        )
        .await;
        println!("{}", p.line(target, n, "fixed"));
        fixed.push(p.json());
    }
    json!({"target": target.name, "sockets": n, "failed": fleet.failed,
        "peak_deliveries_per_s_p99_100ms": peak_rate, "peak_step": peak.map(|p| p.json()),
        "highest_deliveries_per_s": max_seen, "steps": steps, "fixed": fixed})
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

/// Scenario `users`: the ws4redis shape — each socket on its own user key plus one shared
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
    let sent = publish_at(&mut publisher, rate, secs(3.0), 0, base, &pick, PAYLOAD).await;
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

/// Scenario `storm`: handshakes/s with identity from Redis at each concurrency, and the
/// time for every socket to reconnect after a gateway restart.
async fn storm(target: &mut Target, redis: &Redis, n: usize, base: Instant) -> Value {
    write_identities(redis, n).await;
    let storm_url = target.url("storm", "subscribe-user&subscribe-group");
    let url = |_: usize| storm_url.clone();
    let cookie = |i: usize| Some(format!("sessionid=s{i}"));
    let mut rates = Vec::new();
    let mut fleet = None;
    for concurrency in env_list("WSRELAY_BENCH_STORM_INFLIGHT", &[512.0, 1024.0]) {
        // The previous fleet's sockets are closed first, and the gateway given time to
        // let them go.
        if fleet.take().is_some() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let concurrency = concurrency as usize;
        let (f, rate) = connect_fleet(target.addr, n, concurrency, url, cookie, false, base).await;
        let hs = f.handshake_ms();
        println!(
            "  storm     {:>10} {n} handshakes with identity from Redis, {concurrency} in flight: {rate:.0}/s (failed {}; each p50/p99/max {:.1}/{:.1}/{:.1} ms)",
            target.name, f.failed, hs.0, hs.1, hs.2
        );
        rates.push(
            json!({"in_flight": concurrency, "handshakes_per_s": rate, "failed": f.failed,
            "handshake_ms_p50_p99_max": [hs.0, hs.1, hs.2]}),
        );
        fleet = Some(f);
    }
    // Restart: stop, start again on the same port, reconnect everybody.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(target.proc.0.id().to_string())
        .status();
    let _ = target.proc.0.wait();
    let closed = fleet.as_ref().map_or(0, |f| {
        f.seen
            .iter()
            .filter(|s| s.closed.load(Ordering::Relaxed))
            .count()
    });
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
    json!({"target": target.name, "sockets": n, "storms": rates, "reconnect_all_s": reconnect})
}

/// Scenario `slow`: 10 % of sockets stop reading during a broadcast run.
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
            secs(1.0),
            round * 1_000_000,
            base,
            &pick,
            PAYLOAD,
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

/// Scenario `oneworker`: one worker thread holding `n` sockets with `max_sockets = n`:
/// all open, one broadcast reaches all, one more handshake gets 503 naming max_sockets.
async fn oneworker(n: usize, base: Instant) -> Value {
    let redis = start_redis().await;
    let max = n.to_string();
    let target = start_wsrelay(&redis, &[("workers", "1"), ("max_sockets", &max)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, _) = target.usage();
    let url = |_: usize| target.url("one", "subscribe-broadcast");
    let (fleet, rate) = connect_fleet(target.addr, n, 256, url, |_| None, false, base).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = target.usage();
    let per = after.saturating_sub(before) as f64 / n as f64;
    let mut publisher = Publisher::Redis(redis.conn().await);
    let started = Instant::now();
    let pick = |_: u64| "broadcast:one".to_string();
    publisher
        .publish_batch(&[(pick(0), payload(0, base, PAYLOAD))])
        .await;
    let all = drain(&fleet, n as u64, Duration::from_secs(10)).await;
    let reach_s = started.elapsed().as_secs_f64();
    let reached = fleet
        .seen
        .iter()
        .filter(|s| s.received.load(Ordering::Relaxed) > 0)
        .count();
    let answer = match raw_handshake(target.addr, n, "/ws/one?subscribe-broadcast", true).await {
        Ok((answer, _)) => answer,
        Err(e) => format!("(no answer: {e})"),
    };
    let refused = answer.starts_with("HTTP/1.1 503") && answer.contains("max_sockets");
    let pass = fleet.failed == 0 && reached == n && all && refused;
    let first_line = answer.lines().next().unwrap_or("").to_string();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    println!(
        "  oneworker    wsrelay sockets={n} opened={} failed={} handshakes={rate:.0}/s rss {before} KiB -> {after} KiB = {per:.2} KiB/socket; broadcast reached {reached}/{n} in {reach_s:.2}s; one more: {first_line:?} {body:?} => {}",
        fleet.seen.len(),
        fleet.failed,
        if pass { "PASS" } else { "FAIL" }
    );
    let open_gauge = metric(&target, "wsrelay_sockets").await;
    let (opened, failed) = (fleet.seen.len(), fleet.failed);
    drop(fleet);
    json!({"target": "wsrelay", "workers": 1, "max_sockets": n, "opened": opened, "failed": failed,
        "handshakes_per_s": rate, "rss_before_kib": before, "rss_after_kib": after, "kib_per_socket": per,
        "broadcast_reached": reached, "broadcast_reach_s": reach_s, "refusal_status": first_line, "refusal_body": body,
        "gateway_open_sockets": open_gauge, "pass": pass})
}

/// Scenario `readers`: `readers` reading sockets and `idlers` that never read, one
/// broadcast channel at `rate` messages/s of `size` bytes; how the readers fared.
async fn readers(
    queue_bytes: u64,
    readers: usize,
    idlers: usize,
    rate: f64,
    size: usize,
    base: Instant,
) -> Value {
    let redis = start_redis().await;
    let q = queue_bytes.to_string();
    let target = start_wsrelay(&redis, &[("queue_bytes", &q)]).await;
    let path = "/ws/readers?subscribe-broadcast";
    let mut silent = Vec::new();
    let mut silent_failed = 0;
    for i in 0..idlers {
        match raw_handshake(target.addr, i, path, false).await {
            Ok((head, stream)) if head.starts_with("HTTP/1.1 101") => silent.push(stream),
            _ => silent_failed += 1,
        }
    }
    let url = |_: usize| target.url("readers", "subscribe-broadcast");
    let (fleet, _) = connect_fleet(target.addr, readers, 64, url, |_| None, true, base).await;
    let peak = PeakRss::start(target.proc.0.id());
    let rss0 = peak.get();
    let mut publisher = Publisher::Redis(redis.conn().await);
    let pick = |_: u64| "broadcast:readers".to_string();
    let sent = publish_at(&mut publisher, rate, secs(5.0), 0, base, &pick, size).await;
    let want = sent * fleet.seen.len() as u64;
    let complete = drain(&fleet, want, Duration::from_secs(5)).await;
    let peak_rss = peak.get();
    drop(peak);
    let closed_4000 = fleet
        .seen
        .iter()
        .filter(|s| s.close_code.load(Ordering::Relaxed) == 4000)
        .count();
    let closed = fleet
        .seen
        .iter()
        .filter(|s| s.closed.load(Ordering::Relaxed))
        .count();
    let got = fleet.total();
    let fraction = got as f64 / want.max(1) as f64;
    let mut lat = fleet.take_latencies();
    lat.sort_unstable();
    let slow_closes = metric(&target, "wsrelay_slow_consumer_closes_total").await;
    println!(
        "  readers   queue_bytes={queue_bytes:>8} readers={} silent={} (failed {silent_failed}) published={sent}×{size}B: readers closed 4000: {closed_4000} (closed in all: {closed}), readers got {got}/{want} = {:.2}%{} p99={:.2}ms; gateway slow-consumer closes {slow_closes}; rss {rss0} KiB -> peak {peak_rss} KiB",
        fleet.seen.len(),
        silent.len(),
        fraction * 100.0,
        if complete { "" } else { " (incomplete)" },
        percentile(&lat, 0.99),
    );
    drop(silent);
    drop(fleet);
    json!({"queue_bytes": queue_bytes, "readers": readers, "silent": idlers, "silent_failed": silent_failed,
        "published": sent, "message_bytes": size, "readers_closed_4000": closed_4000, "readers_closed": closed,
        "readers_delivered": got, "readers_expected": want, "readers_fraction": fraction,
        "readers_p99_ms": percentile(&lat, 0.99), "gateway_slow_consumer_closes": slow_closes,
        "rss_before_kib": rss0, "rss_peak_kib": peak_rss})
}

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = [
        "idle",
        "broadcast",
        "users",
        "storm",
        "slow",
        "oneworker",
        "readers",
        "nchan",
    ];
    let wanted: Vec<&str> = if args.is_empty() {
        all.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    let nchan = wanted.contains(&"nchan");
    // Every client socket is a descriptor.
    let open_files = wsrelay::raise_descriptor_limit().unwrap_or(0);
    if ["idle", "broadcast"].iter().any(|s| wanted.contains(s)) {
        minimal_binary();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Instant::now();
    let mut results: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let client_cpu0 = own_cpu();
    println!("client: open-files limit {open_files}");
    runtime.block_on(async {
        let queue_bytes = 16 << 20;
        if wanted.contains(&"idle") {
            println!("scenario idle: memory per idle subscribed socket");
            for n in [1_000, 10_000, 15_000].map(scaled) {
                for server in servers(nchan) {
                    let (target, redis) = start(server, "broadcast:idle", &[]).await;
                    results
                        .entry("idle")
                        .or_default()
                        .push(idle(&target, redis.as_ref(), n, base).await);
                    // The server goes before its Redis.
                    drop(target);
                    drop(redis);
                }
            }
        }
        if wanted.contains(&"broadcast") {
            println!("scenario broadcast: fan-out of 100-byte messages on one channel");
            let q = queue_bytes.to_string();
            for n in [1_000, 10_000].map(scaled) {
                for server in servers(nchan) {
                    let (target, redis) =
                        start(server, "broadcast:fan", &[("queue_bytes", &q)]).await;
                    results
                        .entry("broadcast")
                        .or_default()
                        .push(broadcast(&target, redis.as_ref(), n, base).await);
                    drop(target);
                    drop(redis);
                }
            }
        }
        if wanted.contains(&"users") {
            println!("scenario users: the ws4redis shape");
            let redis = start_redis().await;
            let gw = start_wsrelay(&redis, &[]).await;
            let n = env_or("WSRELAY_BENCH_USERS", scaled(10_000) as f64) as usize;
            let rate = env_or("WSRELAY_BENCH_USERS_RATE", 50_000.0);
            results
                .entry("users")
                .or_default()
                .push(users(&gw, &redis, n, rate, base).await);
        }
        if wanted.contains(&"storm") {
            println!("scenario storm: connection storm");
            let redis = start_redis().await;
            let mut gw = start_wsrelay(&redis, &[]).await;
            results
                .entry("storm")
                .or_default()
                .push(storm(&mut gw, &redis, scaled(10_000), base).await);
        }
        if wanted.contains(&"slow") {
            println!("scenario slow: slow consumers");
            let redis = start_redis().await;
            let gw = start_wsrelay(&redis, &[]).await;
            let bound = wsrelay::config::DEFAULT_QUEUE_BYTES as u64;
            results
                .entry("slow")
                .or_default()
                .push(slow(&gw, &redis, scaled(1_000), 2_000.0, bound, base).await);
        }
        if wanted.contains(&"oneworker") {
            println!("scenario oneworker: one worker, max_sockets");
            results
                .entry("oneworker")
                .or_default()
                .push(oneworker(scaled(19_000), base).await);
        }
        if wanted.contains(&"readers") {
            println!("scenario readers: healthy readers keep their place");
            let readers_n = env_or("WSRELAY_BENCH_READERS", 20.0) as usize;
            let silent_n = env_or("WSRELAY_BENCH_SILENT", 200.0) as usize;
            for q in env_list(
                "WSRELAY_BENCH_QUEUES",
                &[262_144.0, 1_048_576.0, 4_194_304.0],
            ) {
                results
                    .entry("readers")
                    .or_default()
                    .push(readers(q as u64, readers_n, silent_n, 1_000.0, 4096, base).await);
            }
        }
    });
    let summary = json!({"date": "see RESULTS.md", "client_cpu_s": own_cpu() - client_cpu0, "results": results});
    println!("{summary}");
}
