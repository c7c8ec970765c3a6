//! Scaling out (issue 14): the same load on one Redis, on a 3-master Redis Cluster with
//! sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) and on the same cluster with classic pub/sub
//! (`PUBLISH`/`SUBSCRIBE`, which a cluster broadcasts to every node), each time with two
//! gateway processes sharing the sockets. Reports deliveries/s, latency, losses, the
//! gateways' CPU and every Redis node's CPU (seconds of CPU per second of wall time, from
//! `/proc/<pid>/stat`), for two scenarios:
//!
//! - `users`: the ws4redis shape, each socket on its own user key plus one of 100 group
//!   keys (identity records in Redis, on each key's owner); publications at a fixed rate
//!   to random users and random groups;
//! - `broadcast`: sockets on one broadcast key, a fixed rate of publications.
//!
//! The three topologies run `WSRELAY_BENCH_RUNS` times (3); medians, same-run ratios and
//! one JSON line at the end. Every process started here is stopped by its pid (drop
//! guards, also on panic; the kernel kills the Redis servers if this process dies).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

/// Group keys of `users`: socket `i` is in group `g{i % GROUPS}`.
const GROUPS: usize = 100;
const SLOTS: usize = 16384;

// ---------------------------------------------------------------- processes

/// Starts `cmd` with `PR_SET_PDEATHSIG` (SIGKILL): a fallback for when this process dies
/// without running its drop guards.
fn spawn_tied(mut cmd: Command) -> Proc {
    // SAFETY: prctl is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Proc(cmd.spawn().expect("spawn"))
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port with a free cluster bus port");
}

fn redis_server(port: u16, dir: &std::path::Path, cluster: bool) -> Proc {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--maxclients", "20000"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stdin(Stdio::null());
    if cluster {
        cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
            .arg("--cluster-config-file")
            .arg(dir.join(format!("nodes-{port}.conf")));
    }
    spawn_tied(cmd)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Topo {
    Single,
    Sharded,
    Classic,
}

impl Topo {
    fn name(self) -> &'static str {
        match self {
            Topo::Single => "single",
            Topo::Sharded => "sharded",
            Topo::Classic => "classic",
        }
    }
}

/// The Redis side of a topology: one server or a 3-master cluster.
struct Backend {
    topo: Topo,
    // Declared before `dir`: the servers go first.
    procs: Vec<Proc>,
    ports: Vec<u16>,
    _dir: TempDir,
}

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    tokio::time::timeout(Duration::from_secs(3), cmd.query_async(&mut conn))
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "command timed out")))?
}

async fn start_backend(topo: Topo, k: usize) -> Backend {
    let dir = std::env::temp_dir().join(format!("wsrelay-scaling-{}-{k}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = TempDir(dir);
    let cluster = topo != Topo::Single;
    let ports: Vec<u16> = if cluster {
        (0..3).map(|_| cluster_port()).collect()
    } else {
        vec![free_port()]
    };
    let procs: Vec<Proc> = ports
        .iter()
        .map(|&p| redis_server(p, &dir.0, cluster))
        .collect();
    for &p in &ports {
        wait_port(([127, 0, 0, 1], p).into()).await;
    }
    if cluster {
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let started = Instant::now();
        'wait: loop {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "cluster not ok in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            for &p in &ports {
                let info: String = query(p, &redis::cmd("CLUSTER").arg("INFO").clone())
                    .await
                    .unwrap_or_default();
                if !info.contains("cluster_state:ok") {
                    continue 'wait;
                }
                let nodes: String = query(p, &redis::cmd("CLUSTER").arg("NODES").clone())
                    .await
                    .unwrap_or_default();
                if nodes.lines().filter(|l| l.contains("master")).count() < 3 {
                    continue 'wait;
                }
            }
            break;
        }
    }
    Backend {
        topo,
        procs,
        ports,
        _dir: dir,
    }
}

impl Backend {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }

    fn cpu(&self) -> Vec<f64> {
        self.pids()
            .iter()
            .map(|p| cpu_of(&format!("/proc/{p}/stat")))
            .collect()
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The gateway's settings for this topology.
    fn env(&self) -> Vec<(String, String)> {
        match self.topo {
            Topo::Single => vec![("WSRELAY__REDIS__URL".into(), self.urls()[0].clone())],
            t => vec![
                ("WSRELAY__REDIS__CLUSTER".into(), self.urls().join(",")),
                (
                    "WSRELAY__REDIS__PUBSUB".into(),
                    if t == Topo::Sharded {
                        "sharded"
                    } else {
                        "classic"
                    }
                    .into(),
                ),
            ],
        }
    }

    /// One connection per master and which master owns each slot.
    async fn router(&self) -> Router {
        let mut conns = Vec::new();
        // A late answer (a busy box) is waited for; the default gives up after 500 ms.
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        for url in self.urls() {
            conns.push(
                redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .unwrap(),
            );
        }
        let mut owner = vec![0u8; SLOTS];
        if self.topo != Topo::Single {
            let nodes: String = query(self.ports[0], &redis::cmd("CLUSTER").arg("NODES").clone())
                .await
                .unwrap();
            for line in nodes.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 9 || !f[2].contains("master") {
                    continue;
                }
                let port: u16 = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap();
                let node = self.ports.iter().position(|&p| p == port).unwrap() as u8;
                for range in &f[8..] {
                    let mut ends = range.split('-').filter_map(|x| x.parse::<usize>().ok());
                    let Some(a) = ends.next() else { continue };
                    let b = ends.next().unwrap_or(a);
                    owner[a..=b.min(SLOTS - 1)].fill(node);
                }
            }
        }
        Router {
            conns,
            owner,
            cluster: self.topo != Topo::Single,
            command: if self.topo == Topo::Sharded {
                "SPUBLISH"
            } else {
                "PUBLISH"
            },
        }
    }
}

/// The hash slot of a key without hash tag: CRC16 (XMODEM) mod 16384.
fn slot_of(key: &str) -> usize {
    let mut crc: u16 = 0;
    for &byte in key.as_bytes() {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc as usize % SLOTS
}

/// Sends commands to the master owning each key's slot, one pipeline per master.
struct Router {
    conns: Vec<redis::aio::MultiplexedConnection>,
    owner: Vec<u8>,
    cluster: bool,
    command: &'static str,
}

impl Router {
    fn node(&self, key: &str) -> usize {
        if self.cluster {
            self.owner[slot_of(key)] as usize
        } else {
            0
        }
    }

    /// Runs `build(pipe, item)` for each item, grouped by the owner of `key(item)`; every
    /// pipeline at most 10 s. Returns the number of failed pipelines.
    async fn run<T>(
        &self,
        items: &[T],
        key: impl Fn(&T) -> &str,
        build: impl Fn(&mut redis::Pipeline, &T),
    ) -> usize {
        let mut pipes: Vec<redis::Pipeline> = self.conns.iter().map(|_| redis::pipe()).collect();
        let mut used = vec![false; self.conns.len()];
        for item in items {
            let n = self.node(key(item));
            build(&mut pipes[n], item);
            used[n] = true;
        }
        let runs = pipes
            .into_iter()
            .zip(self.conns.iter().cloned())
            .zip(used)
            .filter(|(_, used)| *used)
            .map(|((pipe, mut conn), _)| async move {
                tokio::time::timeout(Duration::from_secs(10), pipe.query_async::<()>(&mut conn))
                    .await
                    .is_ok_and(|r| r.is_ok())
            });
        futures_util::future::join_all(runs)
            .await
            .into_iter()
            .filter(|ok| !ok)
            .count()
    }

    async fn publish(&self, batch: &[(String, String)]) -> usize {
        let command = self.command;
        self.run(
            batch,
            |(k, _)| k.as_str(),
            |pipe, (k, m)| {
                pipe.cmd(command).arg(k).arg(m).ignore();
            },
        )
        .await
    }
}

/// A gateway process on its own port, with this topology's Redis settings; its stderr
/// (`RUST_LOG=warn`) goes to a file, counted at the end.
struct Gateway {
    proc: Proc,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // The process itself is stopped by its guard (`Proc`), dropped after this.
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Gateway {
    fn cpu(&self) -> f64 {
        usage(self.proc.0.id()).1
    }

    /// Warning and error lines written so far.
    fn log_lines(&self) -> (usize, Option<String>) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        (lines.len(), lines.first().map(|l| l.to_string()))
    }
}

async fn start_gateways(backend: &Backend, k: usize) -> Vec<Gateway> {
    let mut out = Vec::new();
    for g in 0..2 {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::env::temp_dir().join(format!(
            "wsrelay-scaling-gw-{}-{k}-{g}.log",
            std::process::id()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsrelay"));
        // The benchmark's own knobs are not the gateway's settings (it warns about them).
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSRELAY_BENCH")) {
            cmd.env_remove(name);
        }
        cmd.env("RUST_LOG", "warn")
            .env("WSRELAY__LISTEN", addr.to_string())
            .env("WSRELAY__POLICY__MAX_CONNECTIONS_PER_IP", "0")
            .env("WSRELAY__DRAIN_WINDOW", "0")
            .env("WSRELAY__QUEUE_BYTES", (16 << 20).to_string())
            .envs(backend.env())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdin(Stdio::null());
        let proc = spawn_tied(cmd);
        wait_port(addr).await;
        wait_ready(addr).await;
        out.push(Gateway { proc, addr, log });
    }
    out
}

/// `n` sockets, socket `i` on gateway `i % 2`; `url(i)`, `cookie(i)`.
async fn connect_both(
    gateways: &[Gateway],
    n: usize,
    url: impl Fn(&Gateway, usize) -> String,
    cookie: impl Fn(usize) -> Option<String>,
    ordered: bool,
    base: Instant,
) -> (Vec<Fleet>, usize) {
    let mut fleets = Vec::new();
    let mut failed = 0;
    for (g, gw) in gateways.iter().enumerate() {
        let count = (n + gateways.len() - 1 - g) / gateways.len();
        let global = move |j: usize| j * gateways.len() + g;
        let (fleet, _) = connect_fleet(
            gw.addr,
            count,
            256,
            |j| url(gw, global(j)),
            |j| cookie(global(j)),
            ordered,
            base,
        )
        .await;
        failed += fleet.failed;
        fleets.push(fleet);
    }
    (fleets, failed)
}

fn total(fleets: &[Fleet]) -> u64 {
    fleets.iter().map(Fleet::total).sum()
}

async fn drain_all(fleets: &[Fleet], want: u64, limit: Duration) -> bool {
    let started = Instant::now();
    while total(fleets) < want {
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// What one scenario measured on one topology.
#[derive(Clone, Default)]
struct Measure {
    published: u64,
    expected: u64,
    delivered: u64,
    wall: f64,
    deliveries_per_s: f64,
    p50: f64,
    p99: f64,
    lost: u64,
    failed_sockets: usize,
    publish_errors: usize,
    /// Per Redis node: CPU seconds per wall second.
    redis_cpu: Vec<f64>,
    /// Per Redis node: CPU microseconds per publication.
    redis_us_per_pub: Vec<f64>,
    gateway_cpu: f64,
    client_cpu: f64,
}

impl Measure {
    fn redis_max(&self) -> f64 {
        self.redis_cpu.iter().cloned().fold(0.0, f64::max)
    }

    fn redis_sum(&self) -> f64 {
        self.redis_cpu.iter().sum()
    }

    fn us_max(&self) -> f64 {
        self.redis_us_per_pub.iter().cloned().fold(0.0, f64::max)
    }

    fn json(&self) -> Value {
        json!({"published": self.published, "expected": self.expected, "delivered": self.delivered,
            "wall_s": self.wall, "deliveries_per_s": self.deliveries_per_s, "p50_ms": self.p50,
            "p99_ms": self.p99, "lost": self.lost, "failed_sockets": self.failed_sockets,
            "publish_errors": self.publish_errors, "redis_cpu_per_node": self.redis_cpu,
            "redis_us_per_publication_per_node": self.redis_us_per_pub,
            "gateway_cpu": self.gateway_cpu, "client_cpu": self.client_cpu})
    }

    fn line(&self, topo: Topo, scenario: &str) -> String {
        let nodes: Vec<String> = self
            .redis_cpu
            .iter()
            .zip(&self.redis_us_per_pub)
            .map(|(c, u)| format!("{c:.3} ({u:.1}us/pub)"))
            .collect();
        format!(
            "  {scenario:<9} {:<8} published={} delivered={}/{} ({:.0}/s) p50={:.2}ms p99={:.2}ms lost={} failed_sockets={} publish_errors={} redis_cpu/node=[{}] gateways_cpu={:.3} client_cpu={:.3}",
            topo.name(),
            self.published,
            self.delivered,
            self.expected,
            self.deliveries_per_s,
            self.p50,
            self.p99,
            self.lost,
            self.failed_sockets,
            self.publish_errors,
            nodes.join(", "),
            self.gateway_cpu,
            self.client_cpu,
        )
    }
}

/// Publishes for `duration` in 5 ms ticks: per tick, what `due(elapsed)` says is due
/// (the keys of the publications from `sent` on), then waits for the deliveries.
/// Measures CPU over publishing and draining.
#[allow(clippy::too_many_arguments)]
async fn measure(
    backend: &Backend,
    router: &Router,
    gateways: &[Gateway],
    fleets: &[Fleet],
    duration: Duration,
    base: Instant,
    due: &dyn Fn(f64) -> u64,
    key_of: &dyn Fn(u64) -> String,
    expect_of: &dyn Fn(&str) -> u64,
) -> Measure {
    for f in fleets {
        f.take_latencies();
    }
    let got0 = total(fleets);
    let redis0 = backend.cpu();
    let gw0: f64 = gateways.iter().map(Gateway::cpu).sum();
    let client0 = own_cpu();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut sent, mut expected, mut errors) = (0u64, 0u64, 0usize);
    while started.elapsed() < duration {
        tick.tick().await;
        let now = due(started.elapsed().as_secs_f64());
        if now > sent {
            let batch: Vec<(String, String)> = (sent..now)
                .map(|s| (key_of(s), payload(s, base, PAYLOAD)))
                .collect();
            expected += batch.iter().map(|(k, _)| expect_of(k)).sum::<u64>();
            errors += router.publish(&batch).await;
            sent = now;
        }
    }
    drain_all(fleets, got0 + expected, Duration::from_secs(10)).await;
    let wall = started.elapsed().as_secs_f64();
    let redis1 = backend.cpu();
    let gw1: f64 = gateways.iter().map(Gateway::cpu).sum();
    let client1 = own_cpu();
    // A little more for late duplicates or stragglers is not waited for.
    let delivered = total(fleets) - got0;
    let mut lat: Vec<u32> = fleets.iter().flat_map(|f| f.take_latencies()).collect();
    lat.sort_unstable();
    let redis_cpu: Vec<f64> = redis0
        .iter()
        .zip(&redis1)
        .map(|(a, b)| (b - a) / wall)
        .collect();
    let redis_us_per_pub = redis0
        .iter()
        .zip(&redis1)
        .map(|(a, b)| (b - a) * 1e6 / sent.max(1) as f64)
        .collect();
    Measure {
        published: sent,
        expected,
        delivered,
        wall,
        deliveries_per_s: delivered as f64 / wall,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        lost: expected.saturating_sub(delivered),
        failed_sockets: 0,
        publish_errors: errors,
        redis_cpu,
        redis_us_per_pub,
        gateway_cpu: (gw1 - gw0) / wall,
        client_cpu: (client1 - client0) / wall,
    }
}

/// Identity records for `n` sessions, each on its key's owner: session s{i} → user u{i},
/// group g{i % GROUPS}.
async fn write_identities(router: &Router, n: usize) {
    let records: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("wsrelay:identity:s{i}"),
                json!({"user": format!("u{i}"), "groups": [format!("g{}", i % GROUPS)]})
                    .to_string(),
            )
        })
        .collect();
    for chunk in records.chunks(2000) {
        let failed = router
            .run(
                chunk,
                |(k, _)| k.as_str(),
                |pipe, (k, v)| {
                    pipe.set_ex(k, v, 3600).ignore();
                },
            )
            .await;
        assert_eq!(failed, 0, "identity records not written");
    }
}

/// The ws4redis shape: `n` sockets on their own user key plus one group key; `user_rate`
/// publications/s to random users and `group_rate` to random groups.
async fn users(
    backend: &Backend,
    gateways: &[Gateway],
    n: usize,
    user_rate: f64,
    group_rate: f64,
    base: Instant,
) -> Measure {
    let router = backend.router().await;
    write_identities(&router, n).await;
    let (fleets, failed) = connect_both(
        gateways,
        n,
        |gw, _| format!("ws://{}/ws/inbox?subscribe-user&subscribe-group", gw.addr),
        |i| Some(format!("sessionid=s{i}")),
        false,
        base,
    )
    .await;
    let members = |g: usize| ((n + GROUPS - 1 - g) / GROUPS) as u64;
    // Publications in order of `seq`: one in `every` is for a group, the others for users.
    let total_rate = user_rate + group_rate;
    let every = if group_rate > 0.0 {
        (total_rate / group_rate).round().max(1.0) as u64
    } else {
        u64::MAX
    };
    let key_of = move |seq: u64| {
        // A multiplicative hash spreads consecutive sequence numbers.
        let h = seq.wrapping_mul(2654435761) >> 7;
        if seq % every == every - 1 {
            format!("group:g{}:inbox", h % GROUPS as u64)
        } else {
            format!("user:u{}:inbox", h % n as u64)
        }
    };
    let expect_of = move |key: &str| {
        key.strip_prefix("group:g")
            .and_then(|r| r.split(':').next()?.parse::<usize>().ok())
            .map_or(1, members)
    };
    let due = move |t: f64| (total_rate * t) as u64;
    let mut m = measure(
        backend,
        &router,
        gateways,
        &fleets,
        secs(10.0),
        base,
        &due,
        &key_of,
        &expect_of,
    )
    .await;
    m.failed_sockets = failed;
    m
}

/// Sockets on one broadcast key, `rate` publications/s.
async fn broadcast(
    backend: &Backend,
    gateways: &[Gateway],
    n: usize,
    rate: f64,
    base: Instant,
) -> Measure {
    let router = backend.router().await;
    let (fleets, failed) = connect_both(
        gateways,
        n,
        |gw, _| format!("ws://{}/ws/fan?subscribe-broadcast", gw.addr),
        |_| None,
        false,
        base,
    )
    .await;
    let connected = (n - failed) as u64;
    let key_of = |_: u64| "broadcast:fan".to_string();
    let expect_of = move |_: &str| connected;
    let due = move |t: f64| (rate * t) as u64;
    let mut m = measure(
        backend,
        &router,
        gateways,
        &fleets,
        secs(5.0),
        base,
        &due,
        &key_of,
        &expect_of,
    )
    .await;
    m.failed_sockets = failed;
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let k = v.len();
    if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2.0
    }
}

fn main() {
    let open_files = wsrelay::raise_descriptor_limit().unwrap_or(0);
    let runs = (env_or("WSRELAY_BENCH_RUNS", 3.0) as usize).clamp(1, 10);
    let sockets = env_or("WSRELAY_BENCH_SOCKETS", scaled(10_000) as f64) as usize;
    let user_rate = env_or("WSRELAY_BENCH_USERS_RATE", 10_000.0);
    let group_rate = env_or("WSRELAY_BENCH_GROUP_RATE", 50.0);
    let fan = env_or("WSRELAY_BENCH_FAN_SOCKETS", scaled(2_000) as f64) as usize;
    let fan_rate = env_or("WSRELAY_BENCH_FAN_RATE", 200.0);
    assert!(
        sockets + 100 < open_files.max(1024),
        "{sockets} sockets need more than the open-files limit {open_files}"
    );
    println!(
        "client: open-files limit {open_files}; users: {sockets} sockets, {user_rate}/s to users + {group_rate}/s to {GROUPS} groups for {:.1} s; broadcast: {fan} sockets, {fan_rate}/s for {:.1} s; {runs} runs",
        secs(10.0).as_secs_f64(),
        secs(5.0).as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Instant::now();
    let topos = [Topo::Single, Topo::Sharded, Topo::Classic];
    // results[scenario][topo] = one Measure per run
    let mut results: BTreeMap<&str, BTreeMap<&str, Vec<Measure>>> = BTreeMap::new();
    let mut log_notes: Vec<String> = Vec::new();
    runtime.block_on(async {
        let mut k = 0;
        for run in 1..=runs {
            println!("run {run}/{runs}");
            for topo in topos {
                for scenario in ["users", "broadcast"] {
                    k += 1;
                    let backend = start_backend(topo, k).await;
                    let gateways = start_gateways(&backend, k).await;
                    let m = if scenario == "users" {
                        users(&backend, &gateways, sockets, user_rate, group_rate, base).await
                    } else {
                        broadcast(&backend, &gateways, fan, fan_rate, base).await
                    };
                    println!("{}", m.line(topo, scenario));
                    for (g, gw) in gateways.iter().enumerate() {
                        let (count, first) = gw.log_lines();
                        if count > 0 {
                            let note = format!(
                                "run {run} {scenario} {} gateway {g}: {count} log lines, first: {}",
                                topo.name(),
                                first.unwrap_or_default()
                            );
                            println!("    {note}");
                            log_notes.push(note);
                        }
                    }
                    results
                        .entry(scenario)
                        .or_default()
                        .entry(topo.name())
                        .or_default()
                        .push(m);
                    // Sockets (in `users`/`broadcast`) are gone; gateways before Redis.
                    drop(gateways);
                    drop(backend);
                }
            }
        }
    });
    summarize(&results, &log_notes, runs);
}

fn summarize(
    results: &BTreeMap<&str, BTreeMap<&str, Vec<Measure>>>,
    log_notes: &[String],
    runs: usize,
) {
    println!("\nmedians of {runs} runs (every run's value in brackets)");
    let mut summary = serde_json::Map::new();
    for (scenario, by_topo) in results {
        println!("scenario {scenario}");
        let mut s = serde_json::Map::new();
        for topo in ["single", "sharded", "classic"] {
            let Some(ms) = by_topo.get(topo) else {
                continue;
            };
            let col = |f: &dyn Fn(&Measure) -> f64| -> (f64, String) {
                let v: Vec<f64> = ms.iter().map(f).collect();
                let all: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
                (median(v), all.join(", "))
            };
            let nodes = ms[0].redis_cpu.len();
            let (dps, dps_all) = col(&|m| m.deliveries_per_s);
            let (p50, _) = col(&|m| m.p50);
            let (p99, p99_all) = col(&|m| m.p99);
            let (lost, _) = col(&|m| m.lost as f64);
            let (gw, _) = col(&|m| m.gateway_cpu);
            let (rmax, rmax_all) = col(&|m| m.redis_max());
            let (rsum, _) = col(&|m| m.redis_sum());
            let (usmax, _) = col(&|m| m.us_max());
            let per_node: Vec<f64> = (0..nodes)
                .map(|i| median(ms.iter().map(|m| m.redis_cpu[i]).collect()))
                .collect();
            let us_node: Vec<f64> = (0..nodes)
                .map(|i| median(ms.iter().map(|m| m.redis_us_per_pub[i]).collect()))
                .collect();
            let (published, _) = col(&|m| m.published as f64);
            println!(
                "  {topo:<8} deliveries/s={dps:.0} [{dps_all}] p50={p50:.2}ms p99={p99:.2}ms [{p99_all}] lost={lost:.0} redis_cpu/node={per_node:.3?} max={rmax:.3} [{rmax_all}] sum={rsum:.3} redis_us_per_pub/node={us_node:.2?} gateways_cpu={gw:.3}"
            );
            s.insert(
                topo.into(),
                json!({"runs": ms.iter().map(Measure::json).collect::<Vec<_>>(),
                "median": {"published": published, "deliveries_per_s": dps, "p50_ms": p50, "p99_ms": p99, "lost": lost,
                    "redis_cpu_per_node": per_node, "redis_cpu_max_node": rmax, "redis_cpu_sum": rsum,
                    "redis_us_per_publication_per_node": us_node, "redis_us_per_publication_max_node": usmax,
                    "gateways_cpu": gw}}),
            );
        }
        // Same-run ratios against one Redis, and sharded vs classic.
        if let (Some(single), Some(sharded), Some(classic)) = (
            by_topo.get("single"),
            by_topo.get("sharded"),
            by_topo.get("classic"),
        ) {
            let ratio = |a: &[Measure], b: &[Measure], f: &dyn Fn(&Measure) -> f64| {
                let v: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
                let all: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
                (median(v), all.join(", "))
            };
            let mut r = serde_json::Map::new();
            for (label, a, b) in [
                ("sharded/single", sharded, single),
                ("classic/single", classic, single),
                ("sharded/classic", sharded, classic),
            ] {
                let (d, d_all) = ratio(a, b, &|m| m.deliveries_per_s);
                let (x, x_all) = ratio(a, b, &|m| m.redis_max());
                let (t, t_all) = ratio(a, b, &|m| m.redis_sum());
                println!(
                    "  ratio {label:<16} deliveries/s {d:.2} [{d_all}]  busiest redis node cpu {x:.2} [{x_all}]  all redis cpu {t:.2} [{t_all}]"
                );
                r.insert(
                    label.into(),
                    json!({"deliveries_per_s": d, "redis_cpu_max_node": x, "redis_cpu_sum": t}),
                );
            }
            s.insert("ratios".into(), Value::Object(r));
        }
        summary.insert(scenario.to_string(), Value::Object(s));
    }
    summary.insert("gateway_log".into(), json!(log_notes));
    println!("{}", Value::Object(summary));
}
