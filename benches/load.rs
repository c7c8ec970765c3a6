//! Load benchmark: the release gateway on a real `redis-server`, driven from this
//! process over loopback.
//!
//! ```text
//! cargo bench --bench load -- [idle SOCKETS] [broadcast SOCKETS MESSAGES]
//! ```
//!
//! - `idle N`: opens N subscribed sockets (each on its own user key plus one shared
//!   broadcast) and reports the gateway's RSS growth per socket.
//! - `broadcast N M`: N sockets on one facility; M messages of 100 bytes published
//!   through Redis as fast as one pipelined connection allows; reports deliveries/s,
//!   lost and duplicated messages, and this process's CPU time (the client must not be
//!   the bottleneck).
//!
//! Every loop is bounded in count and time; everything started here is stopped here.
//! Client sockets are spread over 127.0.0.2-127.0.0.9 so that no source address runs out
//! of ports.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(120);
const SOURCES: u8 = 8;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
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

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds_self() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
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

fn cpu_seconds(pid: u32) -> f64 {
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

struct Rig {
    redis: Proc,
    redis_port: u16,
    gateway: Proc,
    addr: SocketAddr,
}

async fn start_rig() -> Rig {
    let redis_port = free_port();
    let redis = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let port = free_port();
    let gateway = Proc(
        Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .env("RUST_LOG", "warn")
            .env("WSRELAY__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "WSRELAY__REDIS__URL",
                format!("redis://127.0.0.1:{redis_port}/0"),
            )
            .stderr(Stdio::null())
            .spawn()
            .expect("wsrelay"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wait until the broker is up.
    loop {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        if out.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "broker did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Rig {
        redis,
        redis_port,
        gateway,
        addr,
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens a socket from source address 127.0.0.{2 + i % SOURCES}, with session cookie
/// `s{i}`.
async fn connect(addr: SocketAddr, i: usize, path: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let source: SocketAddr = format!("127.0.0.{}:0", 2 + (i % SOURCES as usize))
        .parse()
        .unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(source).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    let cookie = format!("sessionid=s{i}").parse().unwrap();
    request.headers_mut().insert("cookie", cookie);
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    ws
}

async fn redis_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn idle(sockets: usize) {
    let rig = start_rig().await;
    let pid = rig.gateway.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(sockets);
    let mut conn = redis_conn(rig.redis_port).await;
    // Each socket listens to its own session key plus the shared broadcast.
    let started = Instant::now();
    for i in 0..sockets {
        let ws = connect(
            rig.addr,
            i,
            "/ws/idle?subscribe-broadcast&subscribe-session",
        )
        .await;
        held.push(ws);
        assert!(started.elapsed() < DEADLINE, "connect phase over time");
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let numsub: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("broadcast:idle")
        .query_async(&mut conn)
        .await
        .unwrap();
    println!(
        "idle: sockets={sockets} gateway_rss_before={before}KiB after={after}KiB per_socket={:.2}KiB connect_rate={:.0}/s numsub={}",
        (after.saturating_sub(before)) as f64 / sockets as f64,
        sockets as f64 / connect_secs,
        numsub.1
    );
    drop(held);
    drop(rig.redis);
}

async fn broadcast(sockets: usize, messages: usize) {
    let rig = start_rig().await;
    let pid = rig.gateway.0.id();
    let received = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..sockets {
        let mut ws = connect(rig.addr, i, "/ws/fan?subscribe-broadcast").await;
        let (received, wrong) = (received.clone(), wrong.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = 0usize;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    // Payload starts with the sequence number: checks loss, order, duplicates.
                    let seq: usize = t[..8].parse().unwrap_or(usize::MAX);
                    if seq != next {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    next = seq + 1;
                    received.fetch_add(1, Ordering::Relaxed);
                    if next == messages {
                        return;
                    }
                }
            }
        }));
    }
    let mut conn = redis_conn(rig.redis_port).await;
    let (_, subs): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("broadcast:fan")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(subs, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu_client0 = cpu_seconds_self();
    let cpu_gw0 = cpu_seconds(pid);
    let started = Instant::now();
    let pad = "x".repeat(92);
    for chunk in (0..messages).collect::<Vec<_>>().chunks(100) {
        let mut pipe = redis::pipe();
        for seq in chunk {
            pipe.publish("broadcast:fan", format!("{seq:08}{pad}"))
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    let want = (sockets * messages) as u64;
    while received.load(Ordering::Relaxed) < want && started.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    println!(
        "broadcast: sockets={sockets} messages={messages} deliveries={got}/{want} in {secs:.2}s = {:.0}/s out_of_order_or_lost={} gateway_cpu={:.2}s client_cpu={:.2}s",
        got as f64 / secs,
        wrong.load(Ordering::Relaxed),
        cpu_seconds(pid) - cpu_gw0,
        cpu_seconds_self() - cpu_client0,
    );
    for t in tasks {
        t.abort();
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut it = args.iter();
    let mut ran = false;
    while let Some(cmd) = it.next() {
        let mut num = || {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .expect("a number")
        };
        match cmd.as_str() {
            "idle" => {
                let n = num();
                runtime.block_on(idle(n));
            }
            "broadcast" => {
                let (n, m) = (num(), num());
                runtime.block_on(broadcast(n, m));
            }
            other => panic!("unknown scenario {other}"),
        }
        ran = true;
    }
    if !ran {
        runtime.block_on(idle(10_000));
        runtime.block_on(broadcast(1_000, 2_000));
    }
}
