//! Transports benchmark (issue 13): Server-Sent Events and long-polling beside WebSockets
//! and Nchan, in the same run. See `benches/README.md` for the command; results go to
//! `benches/RESULTS.md`.
//!
//! - **idle**: server RSS growth per idle subscriber at 15,000: wsrelay event streams
//!   (`/sse/`), wsrelay WebSockets, Nchan EventSource and Nchan WebSocket subscribers.
//! - **deliveries**: 1,000 subscribers on one channel, 2,000 messages of 100 bytes
//!   published in 5 ms ticks at 2,000 per second (2 M deliveries offered per second;
//!   Nchan's publisher waits for its fan-out, so there it takes longer): deliveries
//!   per second until the last one arrived, for wsrelay event streams, wsrelay
//!   WebSockets and Nchan EventSource.
//! - **poll**: 1,000 long-pollers on wsrelay, each polling again with `since` = its last
//!   id as soon as it has an answer, while a publisher publishes at a steady rate for
//!   10 s: answers (requests) per second and messages per second, on a facility with
//!   history (every message reaches every poller) and on one without (a poller gets the
//!   latest stored message; what was published while it reconnected is skipped).
//!
//! The whole set runs `WSRELAY_BENCH_RUNS` times (3); medians and same-run ratios are
//! printed at the end, then one JSON line with everything. Every loop is bounded in count
//! and time; every process started here is stopped here, by its pid.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsrelay::publisher::{Recipients, RedisPublisher};

/// The facility rule of the long-poll scenario's history variant.
const FACILITIES: &str = r#"
[[facility]]
pattern = "feed/*"
history = 100
history_ttl = 600
"#;

/// The gateway's `poll_timeout` here: bounds how long a waiting poll holds on.
const POLL_TIMEOUT_S: f64 = 5.0;

// ---------------------------------------------------------------- event streams

/// Reads an event stream: the answer's head, then events (`\n\n`-terminated blocks),
/// through a chunked body when the server sends one (Nchan).
struct EventReader {
    stream: tokio::net::TcpStream,
    raw: Vec<u8>,
    /// Decoded body not yet split into events.
    body: Vec<u8>,
    chunked: bool,
    /// Bytes left in the current chunk; `None` between chunks.
    chunk_left: Option<usize>,
}

/// One event: a control event (`event:` named) or a message's data.
enum Event<'a> {
    Control(&'a [u8]),
    Data(&'a [u8]),
}

impl EventReader {
    /// Sends `request` and reads the answer's head; an error unless it is a 200.
    async fn open(mut stream: tokio::net::TcpStream, request: &str) -> Result<Self, String> {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        let end = loop {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!(
                    "closed before the head: {:?}",
                    String::from_utf8_lossy(&raw)
                ));
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if raw.len() > 16384 {
                return Err("head too long".into());
            }
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!(
                "answer {:?}",
                String::from_utf8_lossy(&raw).lines().next().unwrap_or("")
            ));
        }
        let chunked = head.contains("transfer-encoding: chunked");
        raw.drain(..end);
        let mut reader = EventReader {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            chunked,
            chunk_left: None,
        };
        reader.decode(&raw);
        reader.raw.shrink_to_fit();
        Ok(reader)
    }

    /// Moves `bytes` of the answer into `body`, taking off the chunked framing.
    fn decode(&mut self, bytes: &[u8]) {
        if !self.chunked {
            self.body.extend_from_slice(bytes);
            return;
        }
        self.raw.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            match self.chunk_left {
                Some(0) => {
                    // The CRLF after a chunk's data.
                    if self.raw.len() - at < 2 {
                        break;
                    }
                    at += 2;
                    self.chunk_left = None;
                }
                Some(left) => {
                    let take = left.min(self.raw.len() - at);
                    if take == 0 {
                        break;
                    }
                    self.body.extend_from_slice(&self.raw[at..at + take]);
                    at += take;
                    self.chunk_left = Some(left - take);
                }
                None => {
                    let Some(line) = self.raw[at..].windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let size = std::str::from_utf8(&self.raw[at..at + line])
                        .ok()
                        .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                        .unwrap_or(0);
                    at += line + 2;
                    self.chunk_left = Some(size);
                }
            }
        }
        self.raw.drain(..at);
    }

    /// Reads more of the stream; false once it ended.
    async fn fill(&mut self, buf: &mut [u8]) -> bool {
        match self.stream.read(buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.decode(&buf[..n]);
                true
            }
        }
    }

    /// Hands every complete event in `body` to `each`; comments and `retry:` blocks are
    /// skipped.
    fn events(&mut self, mut each: impl FnMut(Event)) {
        let mut at = 0;
        while let Some(end) = self.body[at..].windows(2).position(|w| w == b"\n\n") {
            let block = &self.body[at..at + end];
            at += end + 2;
            let mut named = false;
            let mut data: Option<&[u8]> = None;
            for line in block.split(|b| *b == b'\n') {
                if line.starts_with(b"event:") {
                    named = true;
                } else if let Some(d) = line.strip_prefix(b"data:") {
                    data = Some(d.strip_prefix(b" ").unwrap_or(d));
                }
            }
            match (named, data) {
                (true, Some(d)) => each(Event::Control(d)),
                (false, Some(d)) => each(Event::Data(d)),
                _ => {}
            }
        }
        self.body.drain(..at);
    }
}

/// Opens `n` event streams, `concurrency` at a time (each within 10 s); `path(i)` and
/// `cookie(i)` say where. A wsrelay stream is open once its `subscribed` event came, an
/// Nchan one at its 200. Every message's data is counted as a WebSocket fleet counts
/// frames.
async fn connect_streams(
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    path: impl Fn(usize) -> String,
    cookie: impl Fn(usize) -> Option<String>,
    wait_subscribed: bool,
    base: Instant,
) -> (Fleet, f64) {
    let started = Instant::now();
    let mut fleet = Fleet::default();
    let opened = open_concurrently(&mut fleet, n, concurrency, "stream", |i| {
        let cookie = cookie(i)
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{cookie}\r\n",
            path(i)
        );
        async move {
            let stream = connect_from(addr, i).await?;
            let mut reader = EventReader::open(stream, &request).await?;
            let mut buf = [0u8; 2048];
            let mut subscribed = !wait_subscribed;
            while !subscribed {
                reader.events(|e| {
                    if let Event::Control(d) = e {
                        subscribed |= d.windows(12).any(|w| w == b"\"subscribed\"");
                    }
                });
                if !subscribed && !reader.fill(&mut buf).await {
                    return Err("closed before subscribed".to_string());
                }
            }
            Ok::<_, String>(reader)
        }
    })
    .await;
    for mut reader in opened {
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        fleet.tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16384];
            loop {
                reader.events(|e| {
                    if let Event::Data(d) = e {
                        s.record(d, base, true);
                    }
                });
                if !reader.fill(&mut buf).await {
                    break;
                }
            }
            s.closed.store(true, Ordering::Relaxed);
        }));
        fleet.seen.push(seen);
        fleet.paused.push(Arc::new(AtomicBool::new(false)));
    }
    let rate = fleet.opened(n, "stream", started);
    (fleet, rate)
}

// ---------------------------------------------------------------- servers

/// What subscribes: a transport on a server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sub {
    WsrelaySse,
    WsrelayWs,
    NchanEs,
    NchanWs,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::WsrelaySse => "wsrelay-sse",
            Sub::WsrelayWs => "wsrelay-ws",
            Sub::NchanEs => "nchan-es",
            Sub::NchanWs => "nchan-ws",
        }
    }

    fn nchan(self) -> bool {
        matches!(self, Sub::NchanEs | Sub::NchanWs)
    }
}

/// A TOML file in the temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new() -> ConfigFile {
        let path = std::env::temp_dir().join(format!(
            "wsrelay-bench-transports-{}.toml",
            std::process::id()
        ));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(FACILITIES.as_bytes())
            .unwrap();
        ConfigFile(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The server of `sub`: a gateway (with its own Redis, the facility rules of
/// [`FACILITIES`], `queue_bytes` 16 MiB, `poll_timeout` 5 s) or Nchan.
async fn start(sub: Sub, config: &ConfigFile) -> (Target, Option<Redis>) {
    if sub.nchan() {
        let workers = env_or("WSRELAY_BENCH_NCHAN_WORKERS", 2.0) as usize;
        return (start_nchan(workers).await, None);
    }
    let redis = start_redis().await;
    let queue = (16u64 << 20).to_string();
    let timeout = POLL_TIMEOUT_S.to_string();
    let target = start_gateway(
        &redis,
        &[("queue_bytes", &queue), ("poll_timeout", &timeout)],
        env!("CARGO_BIN_EXE_wsrelay").into(),
        "wsrelay",
        Some(config.0.clone()),
    )
    .await;
    (target, Some(redis))
}

/// Subscribers of `sub` on `channel` (`i`: the subscriber's number): `query` and the
/// session cookie for wsrelay.
async fn subscribe(
    sub: Sub,
    target: &Target,
    n: usize,
    channel: impl Fn(usize) -> String,
    query: &str,
    session: bool,
    base: Instant,
) -> (Fleet, f64) {
    let cookie = |i: usize| session.then(|| format!("sessionid=s{i}"));
    match sub {
        Sub::WsrelaySse => {
            let path = |i: usize| format!("/sse/{}?{query}", channel(i));
            connect_streams(target.addr, n, 256, path, cookie, true, base).await
        }
        Sub::NchanEs => {
            let path = |i: usize| format!("/es/{}", channel(i));
            connect_streams(target.addr, n, 256, path, |_| None, false, base).await
        }
        Sub::WsrelayWs | Sub::NchanWs => {
            let url = |i: usize| target.url(&channel(i), query);
            connect_fleet(target.addr, n, 256, url, cookie, true, base).await
        }
    }
}

// ---------------------------------------------------------------- scenarios

/// Scenario `idle`: server RSS growth per idle subscriber (each on its own session key
/// plus one of 100 broadcast keys on wsrelay, as in `load.rs`'s `idle`; one of 100
/// channels on Nchan).
async fn idle(sub: Sub, n: usize, config: &ConfigFile, base: Instant) -> Value {
    let (target, redis) = start(sub, config).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, _) = target.usage();
    let channel = |i: usize| format!("idle{}", i % 100);
    let (fleet, rate) = subscribe(
        sub,
        &target,
        n,
        channel,
        "subscribe-broadcast&subscribe-session",
        true,
        base,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = target.usage();
    let per = after.saturating_sub(before) as f64 / n as f64;
    let open = fleet.open();
    println!(
        "  idle       {:<12} subscribers={n:>6} rss {before:>7} KiB -> {after:>8} KiB = {per:>6.2} KiB/subscriber  open={open} failed={} opened {rate:.0}/s",
        sub.name(),
        fleet.failed,
    );
    let failed = fleet.failed;
    drop(fleet);
    drop(target);
    drop(redis);
    json!({"subscriber": sub.name(), "subscribers": n, "open": open, "failed": failed,
        "rss_before_kib": before, "rss_after_kib": after, "kib_per_subscriber": per, "opened_per_s": rate})
}

/// Scenario `deliveries`: `n` subscribers on one channel; `messages` published in 5 ms
/// ticks within `within`; deliveries per second until the last one arrived (or 30 s).
async fn deliveries(
    sub: Sub,
    n: usize,
    messages: f64,
    within: Duration,
    config: &ConfigFile,
    base: Instant,
) -> Value {
    let (target, redis) = start(sub, config).await;
    let (fleet, _) = subscribe(
        sub,
        &target,
        n,
        |_| "fan".to_string(),
        "subscribe-broadcast",
        false,
        base,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publisher = Publisher::new(&target, redis.as_ref()).await;
    let key = target.key("fan");
    let pick = |_: u64| key.clone();
    let subscribers = fleet.seen.len() as u64;
    let (_, cpu0) = target.usage();
    let client0 = own_cpu();
    let started = Instant::now();
    let rate = messages / within.as_secs_f64();
    let sent = publish_count(&mut publisher, messages as u64, rate, base, &pick).await;
    let published_in = started.elapsed().as_secs_f64();
    let want = sent * subscribers;
    let (complete, last) = drain_until(&fleet, want, Duration::from_secs(30)).await;
    let elapsed = last.duration_since(started).as_secs_f64();
    let (_, cpu1) = target.usage();
    let got = fleet.total();
    let mut lat = fleet.take_latencies();
    lat.sort_unstable();
    let gaps = fleet.sum(|s| s.lost.load(Ordering::Relaxed));
    let lost = gaps + want.saturating_sub(got);
    let dup = fleet.sum(|s| s.dup.load(Ordering::Relaxed));
    let per_s = got as f64 / elapsed;
    let cpu = cpu1 - cpu0;
    let client = own_cpu() - client0;
    println!(
        "  deliveries {:<12} subscribers={subscribers:>5} published={sent} in {published_in:.2}s delivered={got}/{want} in {elapsed:.2}s = {per_s:>9.0}/s p50={:.1}ms p99={:.1}ms lost={lost} (gaps {gaps}) dup={dup} server_cpu={cpu:.2}s ({:.2} s/M) client_cpu={client:.2}s{}",
        sub.name(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        cpu / got.max(1) as f64 * 1e6,
        if complete { "" } else { " (incomplete)" },
    );
    let failed = fleet.failed;
    drop(fleet);
    drop(target);
    drop(redis);
    json!({"subscriber": sub.name(), "subscribers": subscribers, "failed": failed, "published": sent,
        "delivered": got, "expected": want, "seconds": elapsed, "deliveries_per_s": per_s,
        "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99), "lost": lost, "gaps": gaps, "dup": dup,
        "complete": complete, "server_cpu_s": cpu, "client_cpu_s": client})
}

/// Publishes `count` messages of [`PAYLOAD`] bytes at `rate` per second, in 5 ms ticks
/// as `publish_at` does, however long that takes (at most 60 s: a publisher that waits
/// for the server, as Nchan's does, may be slower than `rate`). Returns the number
/// published.
async fn publish_count(
    publisher: &mut Publisher,
    count: u64,
    rate: f64,
    base: Instant,
    pick: &dyn Fn(u64) -> String,
) -> u64 {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < count && started.elapsed() < Duration::from_secs(60) {
        tick.tick().await;
        let due = ((rate * started.elapsed().as_secs_f64()) as u64).min(count);
        if due > sent {
            let batch: Vec<(String, String)> = (sent..due)
                .map(|k| (pick(k), payload(k, base, PAYLOAD)))
                .collect();
            publisher.publish_batch(&batch).await;
            sent = due;
        }
    }
    sent
}

/// Waits until `fleet` received `want` messages in all, or `limit` passed; also returns
/// when the last message arrived (when the total last grew).
async fn drain_until(fleet: &Fleet, want: u64, limit: Duration) -> (bool, Instant) {
    let started = Instant::now();
    let (mut total, mut last) = (fleet.total(), Instant::now());
    while total < want && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = fleet.total();
        if now > total {
            (total, last) = (now, Instant::now());
        }
    }
    (total >= want, last)
}

/// What the long-pollers saw.
#[derive(Default)]
struct PollCounts {
    /// Answers with a 200 and a JSON array.
    answers: AtomicU64,
    /// Of those, empty arrays (`poll_timeout` passed).
    empty: AtomicU64,
    /// Message elements of this phase's publications.
    messages: AtomicU64,
    /// Of those, the ones newer than every message the poller had (not repeats).
    fresh: AtomicU64,
    /// Failed polls (connect, status, JSON); the first reason is kept.
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Messages skipped (sequence gaps) and received twice, over all pollers.
    skipped: AtomicU64,
    dup: AtomicU64,
    /// Elements other than messages, by type (`gap`, `reset`, ...).
    controls: Mutex<BTreeMap<String, u64>>,
    /// The first answer that repeated a message, as received.
    first_dup: Mutex<Option<String>>,
    latencies: Mutex<Vec<u32>>,
}

/// One poll: the request, the whole answer (the gateway closes after it), its body.
async fn poll_once(addr: SocketAddr, i: usize, path: &str) -> Result<Vec<u8>, String> {
    let mut stream = connect_from(addr, i).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::with_capacity(1024);
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "answer {:?}",
            String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or("")
        ));
    }
    let at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no head end")?;
    answer.drain(..at + 4);
    Ok(answer)
}

/// One poller: polls `facility` again as soon as it has an answer, with `since` = the
/// last id it got, until `stop`.
#[allow(clippy::too_many_arguments)]
async fn poller(
    addr: SocketAddr,
    i: usize,
    facility: String,
    first_seq: u64,
    next_seq: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    counts: Arc<PollCounts>,
    base: Instant,
) {
    let mut since: Option<String> = None;
    let mut next = first_seq;
    let mut polls = 0u64;
    while !stop.load(Ordering::Relaxed) && polls < 1_000_000 {
        polls += 1;
        let path = match &since {
            Some(id) => format!("/poll/{facility}?subscribe-broadcast&since=broadcast:{id}"),
            None => format!("/poll/{facility}?subscribe-broadcast"),
        };
        let limit = Duration::from_secs_f64(POLL_TIMEOUT_S + 5.0);
        let body = match tokio::time::timeout(limit, poll_once(addr, i, &path)).await {
            Ok(Ok(body)) => body,
            _ if stop.load(Ordering::Relaxed) => break,
            r => {
                let e = match r {
                    Ok(Err(e)) => e,
                    _ => "poll timed out".to_string(),
                };
                counts.errors.fetch_add(1, Ordering::Relaxed);
                counts.first_error.lock().unwrap().get_or_insert(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(Value::Array(elements)) = serde_json::from_slice::<Value>(&body) else {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            counts.first_error.lock().unwrap().get_or_insert_with(|| {
                format!("not a JSON array: {:?}", String::from_utf8_lossy(&body))
            });
            continue;
        };
        counts.answers.fetch_add(1, Ordering::Relaxed);
        if elements.is_empty() {
            counts.empty.fetch_add(1, Ordering::Relaxed);
        }
        let now = now_ns(base);
        for e in &elements {
            if e["type"] != "message" {
                let kind = e["type"].as_str().unwrap_or("?").to_string();
                *counts.controls.lock().unwrap().entry(kind).or_default() += 1;
                continue;
            }
            if let Some(id) = e["id"].as_str() {
                since = Some(id.to_string());
            }
            let Some((seq, sent)) = e["data"].as_str().and_then(|d| parse(d.as_bytes())) else {
                continue;
            };
            if seq < first_seq {
                continue;
            }
            counts.messages.fetch_add(1, Ordering::Relaxed);
            let latency = now.saturating_sub(sent) / 1000;
            counts
                .latencies
                .lock()
                .unwrap()
                .push(latency.min(u32::MAX as u64) as u32);
            if seq < next {
                counts.dup.fetch_add(1, Ordering::Relaxed);
                counts
                    .first_dup
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| format!("{path} -> {}", String::from_utf8_lossy(&body)));
            } else {
                counts.fresh.fetch_add(1, Ordering::Relaxed);
                counts.skipped.fetch_add(seq - next, Ordering::Relaxed);
                next = seq + 1;
            }
        }
        next_seq.store(next, Ordering::Relaxed);
    }
}

/// Scenario `poll`: `n` long-pollers on `facility` while `rate` messages/s are published
/// for `duration` (through `RedisPublisher`, as an application would, with the
/// gateway's facility rules); then up to 5 s for every poller to get the last one.
#[allow(clippy::too_many_arguments)]
async fn poll(
    target: &Target,
    redis: &Redis,
    facility: &str,
    n: usize,
    rate: f64,
    duration: Duration,
    first_seq: u64,
    base: Instant,
) -> Value {
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
    let to = Recipients::new(facility).unwrap().broadcast();
    let counts = Arc::new(PollCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let next: Vec<Arc<AtomicU64>> = (0..n)
        .map(|_| Arc::new(AtomicU64::new(first_seq)))
        .collect();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(poller(
                target.addr,
                i,
                facility.to_string(),
                first_seq,
                next[i].clone(),
                stop.clone(),
                counts.clone(),
                base,
            ))
        })
        .collect();
    // The pollers' first polls wait for the first publication.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers0 = counts.answers.load(Ordering::Relaxed);
    let errors0 = counts.errors.load(Ordering::Relaxed);
    let (_, cpu0) = target.usage();
    let client0 = own_cpu();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut publish_errors = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        while sent < due {
            let message = payload(first_seq + sent, base, PAYLOAD);
            if publisher.publish_message(&to, message, None).await.is_err() {
                publish_errors += 1;
            }
            sent += 1;
        }
    }
    let window = started.elapsed().as_secs_f64();
    let (_, cpu1) = target.usage();
    let client = own_cpu() - client0;
    let answers = counts.answers.load(Ordering::Relaxed) - answers0;
    let messages = counts.messages.load(Ordering::Relaxed);
    let fresh = counts.fresh.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed) - errors0;
    // Every poller has the last message within 5 s (the ones waiting get it at once;
    // the others on their next poll).
    let end = first_seq + sent;
    let caught_up = || {
        next.iter()
            .filter(|x| x.load(Ordering::Relaxed) >= end)
            .count()
    };
    let drained = Instant::now();
    while caught_up() < n && drained.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    let caught_up = caught_up();
    let total = counts.messages.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *counts.latencies.lock().unwrap());
    lat.sort_unstable();
    let expected = sent * n as u64;
    let requests_per_s = answers as f64 / window;
    let messages_per_s = messages as f64 / window;
    let fresh_per_s = fresh as f64 / window;
    let cpu = cpu1 - cpu0;
    let skipped = counts.skipped.load(Ordering::Relaxed);
    let dup = counts.dup.load(Ordering::Relaxed);
    let empty = counts.empty.load(Ordering::Relaxed);
    let first_error = counts.first_error.lock().unwrap().clone();
    let first_dup = counts.first_dup.lock().unwrap().clone();
    let controls = counts.controls.lock().unwrap().clone();
    if let Some(d) = &first_dup {
        println!(
            "    first answer with a repeated message: {}",
            d.chars().take(600).collect::<String>()
        );
    }
    println!(
        "  poll       {facility:<12} pollers={n} rate={rate:.0}/s published={sent} (failed {publish_errors}) in {window:.1}s: {answers} answers = {requests_per_s:.0} requests/s, {messages} messages = {messages_per_s:.0}/s ({:.2} per answer), not repeats {fresh} = {fresh_per_s:.0}/s; after: {total}/{expected} = {:.2}% delivered, skipped {skipped} dup {dup}, {caught_up}/{n} got the last; empty answers {empty}; other elements {controls:?}; errors {errors}{}; p50={:.1}ms p99={:.1}ms; server_cpu={cpu:.2}s ({:.0} µs/answer) client_cpu={client:.2}s",
        messages as f64 / answers.max(1) as f64,
        total as f64 / expected.max(1) as f64 * 100.0,
        first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        cpu / answers.max(1) as f64 * 1e6,
    );
    json!({"facility": facility, "pollers": n, "rate": rate, "published": sent, "publish_failed": publish_errors,
        "window_s": window, "answers": answers, "requests_per_s": requests_per_s, "messages": messages,
        "messages_per_s": messages_per_s, "fresh": fresh, "fresh_per_s": fresh_per_s, "delivered_after": total, "expected": expected, "skipped": skipped,
        "dup": dup, "caught_up": caught_up, "empty_answers": empty, "errors": errors, "first_error": first_error,
        "first_dup": first_dup, "controls": controls,
        "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99), "server_cpu_s": cpu,
        "client_cpu_s": client})
}

// ---------------------------------------------------------------- summary

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `name: median [run values]`.
fn med(v: &[f64], digits: usize) -> String {
    let all: Vec<String> = v.iter().map(|x| format!("{x:.digits$}")).collect();
    format!("{:.digits$} [{}]", median(v.to_vec()), all.join(", "))
}

/// The figure `field` of the entry whose `by` is `name`, in each run.
fn figures(
    runs: &[BTreeMap<&str, Vec<Value>>],
    scenario: &str,
    by: &str,
    name: &str,
    field: &str,
) -> Vec<f64> {
    runs.iter()
        .filter_map(|r| r.get(scenario)?.iter().find(|e| e[by] == name)?[field].as_f64())
        .collect()
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

fn summary(runs: &[BTreeMap<&str, Vec<Value>>]) {
    println!(
        "summary: medians of {} runs [each run], ratios per run",
        runs.len()
    );
    let idle = |name| figures(runs, "idle", "subscriber", name, "kib_per_subscriber");
    let (sse, ws, es, nws) = (
        idle("wsrelay-sse"),
        idle("wsrelay-ws"),
        idle("nchan-es"),
        idle("nchan-ws"),
    );
    if !sse.is_empty() {
        println!(
            "  idle KiB/subscriber: wsrelay-sse {}  wsrelay-ws {}  nchan-es {}  nchan-ws {}",
            med(&sse, 2),
            med(&ws, 2),
            med(&es, 2),
            med(&nws, 2)
        );
        println!(
            "  idle ratios: sse/ws {}  sse/nchan-es {}  nchan-es/nchan-ws {}",
            med(&ratios(&sse, &ws), 2),
            med(&ratios(&sse, &es), 2),
            med(&ratios(&es, &nws), 2)
        );
    }
    let del = |name| figures(runs, "deliveries", "subscriber", name, "deliveries_per_s");
    let (sse, ws, es) = (del("wsrelay-sse"), del("wsrelay-ws"), del("nchan-es"));
    if !sse.is_empty() {
        println!(
            "  deliveries/s: wsrelay-sse {}  wsrelay-ws {}  nchan-es {}",
            med(&sse, 0),
            med(&ws, 0),
            med(&es, 0)
        );
        println!(
            "  deliveries ratios: sse/ws {}  sse/nchan-es {}",
            med(&ratios(&sse, &ws), 2),
            med(&ratios(&sse, &es), 2)
        );
    }
    let facilities: Vec<String> = runs
        .first()
        .and_then(|r| r.get("poll"))
        .map(|p| {
            p.iter()
                .filter_map(|e| Some(e["facility"].as_str()?.to_string()))
                .collect()
        })
        .unwrap_or_default();
    for f in facilities {
        let req = figures(runs, "poll", "facility", &f, "requests_per_s");
        let msg = figures(runs, "poll", "facility", &f, "messages_per_s");
        let fresh = figures(runs, "poll", "facility", &f, "fresh_per_s");
        println!(
            "  poll {f:<12} requests/s {}  messages/s {}  of which not repeats {}",
            med(&req, 0),
            med(&msg, 0),
            med(&fresh, 0)
        );
    }
}

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = ["idle", "deliveries", "poll"];
    let wanted: Vec<&str> = if args.is_empty() {
        all.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    let open_files = wsrelay::raise_descriptor_limit().unwrap_or(0);
    let runs = env_or("WSRELAY_BENCH_RUNS", 3.0) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Instant::now();
    let config = ConfigFile::new();
    println!("client: open-files limit {open_files}");
    let mut all_runs: Vec<BTreeMap<&str, Vec<Value>>> = Vec::new();
    runtime.block_on(async {
        for run in 1..=runs.min(10) {
            println!("run {run}");
            let mut results: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
            if wanted.contains(&"idle") {
                let n = scaled(15_000);
                for sub in [Sub::WsrelaySse, Sub::WsrelayWs, Sub::NchanEs, Sub::NchanWs] {
                    let r = idle(sub, n, &config, base).await;
                    results.entry("idle").or_default().push(r);
                }
            }
            if wanted.contains(&"deliveries") {
                let n = scaled(1_000);
                let messages = env_or("WSRELAY_BENCH_MESSAGES", 2_000.0);
                for sub in [Sub::WsrelaySse, Sub::WsrelayWs, Sub::NchanEs] {
                    let r = deliveries(sub, n, messages, secs(1.0), &config, base).await;
                    results.entry("deliveries").or_default().push(r);
                }
            }
            if wanted.contains(&"poll") {
                let n = scaled(1_000);
                let (target, redis) = start(Sub::WsrelaySse, &config).await;
                let redis = redis.unwrap();
                let mut seq = 0;
                for rate in env_list("WSRELAY_BENCH_POLL_RATES", &[10.0, 100.0]) {
                    for history in [true, false] {
                        let facility = if history {
                            format!("feed/poll{rate}")
                        } else {
                            format!("poll{rate}")
                        };
                        let r =
                            poll(&target, &redis, &facility, n, rate, secs(10.0), seq, base).await;
                        seq += 1_000_000;
                        results.entry("poll").or_default().push(r);
                        // Aborted pollers' connections are let go.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                drop(target);
                drop(redis);
            }
            all_runs.push(results);
        }
    });
    summary(&all_runs);
    println!("{}", json!({"date": "see RESULTS.md", "runs": all_runs}));
}
