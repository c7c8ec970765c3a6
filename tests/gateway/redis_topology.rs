//! Redis topologies of the tests' own, on free ports, each in a temporary directory: a
//! Redis Cluster of 3 masters with one replica each ([`RedisCluster`]) and a Sentinel set
//! of 1 master, 1 replica and 3 sentinels ([`RedisSentinel`]).
//!
//! A test that kills nodes or moves slots starts a cluster of its own
//! ([`RedisCluster::start`]); tests that leave the cluster as they found it share one per
//! test binary ([`RedisCluster::shared`]). Every server is started by one long-lived
//! thread with `PR_SET_PDEATHSIG`, so the kernel kills it when the test binary ends, however
//! it ends; the shared cluster, which lives in a static and is never dropped, is also
//! killed and its directory removed by an `atexit` handler.
//!
//! Connections are opened per call and never kept: each `#[tokio::test]` has a runtime of
//! its own, and a connection dies with the runtime that drives it.
//!
//! Every wait is bounded; a bound that runs out fails the test. Nothing asserts on timings.

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::{sleep, timeout, Instant};

use crate::harness::{free_port, TempDir};

/// The bound for a topology to form, fail over or settle: a few seconds at most here,
/// this only catches one that never will.
pub const TOPOLOGY_WAIT: Duration = Duration::from_secs(30);
/// The bound on one command to one node.
const COMMAND_WAIT: Duration = Duration::from_secs(3);
/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first
/// `{` and the next `}`, when that is not empty) or of the whole key, mod 16384.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tag = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &byte in tag {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// One server of a topology: its place in the topology's list and its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub index: usize,
    pub port: u16,
}

impl Node {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, as the gateway names nodes in `/health` and `/metrics`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A connection to the server on `port`, or why there is none (bounded).
pub async fn try_conn(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    match timeout(COMMAND_WAIT, client.get_multiplexed_async_connection()).await {
        Ok(conn) => conn,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out").into()),
    }
}

/// Runs `cmd` on the server on `port` (bounded).
pub async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let mut conn = try_conn(port).await?;
    match timeout(COMMAND_WAIT, cmd.query_async(&mut conn)).await {
        Ok(answer) => answer,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "command timed out").into()),
    }
}

/// Runs `cmd` on the server on `port`; a failure fails the test.
pub async fn must<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> T {
    match query(port, cmd).await {
        Ok(v) => v,
        Err(e) => panic!("127.0.0.1:{port}: {cmd:?}: {e}"),
    }
}

/// `ROLE`'s first field: `master`, `slave` or `sentinel`.
async fn role(port: u16) -> Option<String> {
    let answer: redis::Value = query(port, &redis::cmd("ROLE")).await.ok()?;
    match answer {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(redis::Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Waits (bounded by [`TOPOLOGY_WAIT`]) until `ready` says yes; `what` names the wait in
/// the failure, with the last thing `ready` said.
async fn until<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + TOPOLOGY_WAIT;
    loop {
        let why = match ready().await {
            Ok(()) => return,
            Err(why) => why,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {TOPOLOGY_WAIT:?}: {why}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Processes

/// A free port whose cluster bus port (the port + 10000) is free too.
fn cluster_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port with a free cluster bus port");
}

/// A `redis-server` of a topology, started with `args`, logging to `log`.
struct Server {
    port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn new(port: u16, args: Vec<String>, log: PathBuf) -> Server {
        let mut server = Server {
            port,
            args,
            log,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "127.0.0.1:{} runs already", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args(&self.args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        let child = crate::databases::spawn_tied(cmd, libc::SIGKILL)
            .expect("redis-server must be installed (see .ci/run)");
        self.child = Some(child);
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, by PID, and reaped.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() && self.alive() {
            eprintln!(
                "--- redis 127.0.0.1:{} log ---\n{}",
                self.port,
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// The shared cluster's servers and directory: killed and removed when the process exits
/// (statics are never dropped).
static AT_EXIT: OnceLock<Mutex<(Vec<u32>, Vec<PathBuf>)>> = OnceLock::new();

fn stop_at_exit(pids: Vec<u32>, dir: PathBuf) {
    let registry = AT_EXIT.get_or_init(|| {
        // SAFETY: `at_exit` takes no arguments and does not unwind.
        unsafe { libc::atexit(at_exit) };
        Mutex::new((Vec::new(), Vec::new()))
    });
    let mut registry = registry.lock().unwrap();
    registry.0.extend(pids);
    registry.1.push(dir);
}

extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let Some(registry) = AT_EXIT.get() else {
            return;
        };
        let (pids, dirs) = std::mem::take(&mut *registry.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in pids {
            // SAFETY: `pid` is an unreaped child of this process (the `Child` lives in a
            // static and is never waited on), so it names no other process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(pid as libc::pid_t, &mut status, 0);
            }
        }
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Redis Cluster

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    port: u16,
    flags: Vec<String>,
    /// Slot ranges served (open slots, `[s->-id]`, left out).
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn is(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn failing(&self) -> bool {
        self.is("fail") || self.is("fail?")
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // ip:port@cport[,hostname]
            let port = fields[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(NodeLine {
                port,
                flags: fields[2].split(',').map(String::from).collect(),
                slots,
            })
        })
        .collect()
}

/// A Redis Cluster of 3 masters with one replica each, on free ports.
pub struct RedisCluster {
    servers: Vec<Server>,
    dir: TempDir,
}

impl RedisCluster {
    /// A cluster of the test's own: six servers, `redis-cli --cluster create` with one
    /// replica per master; returns once every node says `cluster_state:ok`, all 16384
    /// slots are served and every replica is in sync with its master.
    pub async fn start() -> RedisCluster {
        let dir = TempDir::new("cluster");
        let servers: Vec<Server> = (0..6)
            .map(|_| {
                let port = cluster_port();
                let d = dir.to_string_lossy().into_owned();
                let args = vec![
                    "--bind".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    port.to_string(),
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    format!("{d}/nodes-{port}.conf"),
                    "--cluster-node-timeout".into(),
                    "1000".into(),
                    "--save".into(),
                    "".into(),
                    "--appendonly".into(),
                    "no".into(),
                    // A replica's first sync starts at once (the default waits 5 s).
                    "--repl-diskless-sync-delay".into(),
                    "0".into(),
                    // A replica may be promoted however long ago it last heard from its
                    // master (a restarted node would otherwise never be).
                    "--cluster-replica-validity-factor".into(),
                    "0".into(),
                    "--dir".into(),
                    d,
                ];
                Server::new(port, args, dir.join(format!("redis-{port}.log")))
            })
            .collect();
        let cluster = RedisCluster { servers, dir };
        for server in &cluster.servers {
            let port = server.port;
            until(&format!("127.0.0.1:{port} answers PING"), || async move {
                query::<String>(port, &redis::cmd("PING"))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await;
        }
        let mut create = tokio::process::Command::new("redis-cli");
        create
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .servers
                    .iter()
                    .map(|s| format!("127.0.0.1:{}", s.port)),
            )
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = timeout(TOPOLOGY_WAIT, create.output())
            .await
            .expect("redis-cli --cluster create in time")
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_healthy().await;
        cluster
    }

    /// The cluster shared by the tests of this binary that leave it as they found it (no
    /// kills, no slot moves; keys of their own).
    pub async fn shared() -> &'static RedisCluster {
        static SHARED: tokio::sync::OnceCell<RedisCluster> = tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                let cluster = RedisCluster::start().await;
                let pids = cluster.servers.iter().filter_map(Server::pid).collect();
                // The static is never dropped: the servers and then the directory go at
                // exit.
                stop_at_exit(pids, cluster.dir.to_path_buf());
                cluster
            })
            .await
    }

    /// Every node, live or not.
    pub fn nodes(&self) -> Vec<Node> {
        self.servers
            .iter()
            .enumerate()
            .map(|(index, s)| Node {
                index,
                port: s.port,
            })
            .collect()
    }

    fn live_ports(&self) -> Vec<u16> {
        self.servers
            .iter()
            .filter(|s| s.alive())
            .map(|s| s.port)
            .collect()
    }

    fn node_of_port(&self, port: u16) -> Node {
        let index = self
            .servers
            .iter()
            .position(|s| s.port == port)
            .unwrap_or_else(|| panic!("127.0.0.1:{port} is not a node of this cluster"));
        Node { index, port }
    }

    /// `redis://127.0.0.1:PORT` of all six nodes, comma-separated: the gateway's
    /// `redis__cluster` setting.
    pub fn seeds(&self) -> String {
        self.seed_list().join(",")
    }

    pub fn seed_list(&self) -> Vec<String> {
        self.nodes().iter().map(Node::url).collect()
    }

    /// `CLUSTER NODES` as the first live node that answers sees it.
    async fn view(&self) -> Vec<NodeLine> {
        let mut last = String::new();
        for port in self.live_ports() {
            match query::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await {
                Ok(text) => return parse_nodes(&text),
                Err(e) => last = e.to_string(),
            }
        }
        panic!("no live node answers CLUSTER NODES: {last}");
    }

    /// Masters that serve slots, healthy in the view of a live node, ordered by their
    /// first slot.
    pub async fn masters(&self) -> Vec<Node> {
        let mut masters: Vec<NodeLine> = self
            .view()
            .await
            .into_iter()
            .filter(|n| n.is("master") && !n.failing() && !n.slots.is_empty())
            .collect();
        masters.sort_by_key(|n| n.slots[0].0);
        masters.iter().map(|n| self.node_of_port(n.port)).collect()
    }

    /// The master that serves `slot`, in the view of a live node.
    pub async fn owner_of_slot(&self, slot: u16) -> Node {
        let view = self.view().await;
        let owner = view
            .iter()
            .find(|n| n.is("master") && n.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {view:?}"));
        self.node_of_port(owner.port)
    }

    /// The master that serves `key`'s slot.
    pub async fn owner_of(&self, key: &str) -> Node {
        self.owner_of_slot(slot_of(key)).await
    }

    /// For each master (in [`RedisCluster::masters`] order), the first `i` whose
    /// `key(i)` hashes to one of its slots.
    pub async fn index_on_each_master(&self, key: impl Fn(usize) -> String) -> Vec<usize> {
        let view = self.view().await;
        let mut masters: Vec<&NodeLine> = view
            .iter()
            .filter(|n| n.is("master") && !n.failing() && !n.slots.is_empty())
            .collect();
        masters.sort_by_key(|n| n.slots[0].0);
        masters
            .iter()
            .map(|m| {
                (0..100_000)
                    .find(|&i| m.serves(slot_of(&key(i))))
                    .expect("a key on every master")
            })
            .collect()
    }

    /// For each master (in [`RedisCluster::masters`] order), a key `key(i)` that hashes to
    /// one of its slots: to spread sockets over all masters.
    /// Facility names `{stem}{i}`, one whose broadcast key (under `prefix`, as in
    /// `redis.prefix`) lives on each master.
    pub async fn facilities_on_each_master(&self, prefix: Option<&str>, stem: &str) -> Vec<String> {
        let p = prefix.map(|p| format!("{p}:")).unwrap_or_default();
        let picks = self
            .index_on_each_master(|i| format!("{p}broadcast:{stem}{i}"))
            .await;
        picks.into_iter().map(|i| format!("{stem}{i}")).collect()
    }

    pub async fn key_on_each_master(&self, key: impl Fn(usize) -> String) -> Vec<String> {
        let picks = self.index_on_each_master(&key).await;
        picks.into_iter().map(key).collect()
    }

    /// Kills `node` at once (SIGKILL, by PID), as a crash would.
    pub fn kill(&mut self, node: &Node) {
        self.servers[node.index].kill();
    }

    /// Starts a killed node again with its own `nodes.conf`: it rejoins (a former master
    /// comes back as a replica of its successor); returns once the cluster is healthy.
    pub async fn restart(&mut self, node: &Node) {
        self.servers[node.index].spawn();
        self.wait_healthy().await;
    }

    /// Waits until a live node serves `slot` as master, every live node agrees and says
    /// `cluster_state:ok`, and the new owner answers `ROLE` master; returns the owner.
    pub async fn wait_promoted(&self, slot: u16) -> Node {
        let live = self.live_ports();
        let owner = std::sync::Mutex::new(None);
        until(&format!("a live master serves slot {slot}"), || {
            let (live, owner) = (&live, &owner);
            async move {
                let mut agreed = None;
                for &port in live {
                    let info: String = query(port, redis::cmd("CLUSTER").arg("INFO"))
                        .await
                        .map_err(|e| format!("{port}: {e}"))?;
                    if !info.contains("cluster_state:ok") {
                        return Err(format!("{port}: cluster_state not ok"));
                    }
                    let text: String = query(port, redis::cmd("CLUSTER").arg("NODES"))
                        .await
                        .map_err(|e| format!("{port}: {e}"))?;
                    let view = parse_nodes(&text);
                    let serving = view
                        .iter()
                        .find(|n| n.is("master") && !n.failing() && n.serves(slot))
                        .ok_or_else(|| format!("{port}: no healthy master serves {slot}"))?;
                    if !live.contains(&serving.port) {
                        return Err(format!("{port}: {slot} still on dead {}", serving.port));
                    }
                    if agreed.is_some_and(|p| p != serving.port) {
                        return Err(format!("nodes disagree on the owner of {slot}"));
                    }
                    agreed = Some(serving.port);
                }
                let port = agreed.ok_or("no live node")?;
                if role(port).await.as_deref() != Some("master") {
                    return Err(format!("{port} is not master yet"));
                }
                *owner.lock().unwrap() = Some(port);
                Ok(())
            }
        })
        .await;
        let port = owner.into_inner().unwrap().unwrap();
        self.node_of_port(port)
    }

    /// Waits until every live node says `cluster_state:ok`, all slots are served by live
    /// masters in every node's view, and every live replica's link to its master is up.
    pub async fn wait_healthy(&self) {
        let live = self.live_ports();
        until("the cluster is healthy", || {
            let live = &live;
            async move {
                for &port in live {
                    let info: String = query(port, redis::cmd("CLUSTER").arg("INFO"))
                        .await
                        .map_err(|e| format!("{port}: {e}"))?;
                    if !info.contains("cluster_state:ok")
                        || !info.contains("cluster_slots_ok:16384")
                    {
                        return Err(format!(
                            "{port}: {}",
                            info.lines().take(3).collect::<Vec<_>>().join(" ")
                        ));
                    }
                    let text: String = query(port, redis::cmd("CLUSTER").arg("NODES"))
                        .await
                        .map_err(|e| format!("{port}: {e}"))?;
                    let view = parse_nodes(&text);
                    let served: u32 = view
                        .iter()
                        .filter(|n| n.is("master") && !n.failing() && live.contains(&n.port))
                        .flat_map(|n| n.slots.iter())
                        .map(|&(a, b)| (b - a) as u32 + 1)
                        .sum();
                    if served != SLOTS as u32 {
                        return Err(format!("{port} sees {served} slots on live masters"));
                    }
                    let me = view.iter().find(|n| n.is("myself")).ok_or("no myself")?;
                    if me.is("slave") {
                        let info: String = query(port, redis::cmd("INFO").arg("replication"))
                            .await
                            .map_err(|e| format!("{port}: {e}"))?;
                        if !info.contains("master_link_status:up") {
                            return Err(format!("{port}: replica not in sync"));
                        }
                    }
                }
                Ok(())
            }
        })
        .await;
    }

    /// `WAIT 1 2000` on `master`: how many replicas acknowledged its writes so far.
    pub async fn wait_replicated(&self, master: &Node) -> i64 {
        must(master.port, redis::cmd("WAIT").arg(1).arg(2000)).await
    }

    /// The node id of `node` (`CLUSTER MYID`).
    pub async fn id_of(&self, node: &Node) -> String {
        must(node.port, redis::cmd("CLUSTER").arg("MYID")).await
    }

    /// Moves `slot`, with the keys it holds, to the master `to`, live, as
    /// `redis-cli --cluster reshard` does: IMPORTING on the target, MIGRATING on the
    /// source, `MIGRATE … KEYS` in batches until the source holds none, then
    /// `SETSLOT … NODE` on the target, the source and the other masters. Returns once
    /// every live node agrees that `to` serves the slot.
    pub async fn move_slot(&self, slot: u16, to: &Node) {
        let from = self.owner_of_slot(slot).await;
        assert_ne!(&from, to, "slot {slot} is on {} already", to.addr());
        let (from_id, to_id) = (self.id_of(&from).await, self.id_of(to).await);
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let _: () = must(to.port, &setslot("IMPORTING", &from_id)).await;
        let _: () = must(from.port, &setslot("MIGRATING", &to_id)).await;
        let mut moved = 0usize;
        for round in 0.. {
            assert!(round < 10_000, "slot {slot}: keys keep coming");
            let keys: Vec<Vec<u8>> = must(
                from.port,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100),
            )
            .await;
            if keys.is_empty() {
                break;
            }
            moved += keys.len();
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to.port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys);
            let _: redis::Value = must(from.port, &migrate).await;
        }
        let _: () = must(to.port, &setslot("NODE", &to_id)).await;
        let _: () = must(from.port, &setslot("NODE", &to_id)).await;
        for master in self.masters().await {
            if master != from && &master != to {
                let _: () = must(master.port, &setslot("NODE", &to_id)).await;
            }
        }
        let live = self.live_ports();
        until(
            &format!("every node sees slot {slot} on {}", to.addr()),
            || {
                let live = &live;
                async move {
                    for &port in live {
                        let text: String = query(port, redis::cmd("CLUSTER").arg("NODES"))
                            .await
                            .map_err(|e| e.to_string())?;
                        let owner = parse_nodes(&text)
                            .into_iter()
                            .find(|n| n.is("master") && n.serves(slot))
                            .map(|n| n.port);
                        if owner != Some(to.port) {
                            return Err(format!("{port} sees {owner:?}"));
                        }
                    }
                    Ok(())
                }
            },
        )
        .await;
        log::debug!("slot {slot}: {moved} keys moved to {}", to.addr());
    }

    /// ws4redis's way to publish in a cluster: `SETEX` on the key's owner (when
    /// `expire > 0`) and a classic `PUBLISH` on one node (the cluster bus carries it to
    /// every node). Returns the receivers the publishing node counted.
    pub async fn publish_classic(&self, key: &str, message: &[u8], expire: u64) -> i64 {
        if expire > 0 {
            let owner = self.owner_of(key).await;
            let _: () = must(
                owner.port,
                redis::cmd("SETEX").arg(key).arg(expire).arg(message),
            )
            .await;
        }
        let port = self.live_ports()[0];
        must(port, redis::cmd("PUBLISH").arg(key).arg(message)).await
    }

    /// `SPUBLISH` on the key's owner; returns the receivers it counted.
    pub async fn spublish(&self, key: &str, message: &[u8]) -> i64 {
        let owner = self.owner_of(key).await;
        must(owner.port, redis::cmd("SPUBLISH").arg(key).arg(message)).await
    }

    /// `GET` from the key's owner.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let owner = self.owner_of(key).await;
        must(owner.port, redis::cmd("GET").arg(key)).await
    }

    /// `PUBSUB SHARDNUMSUB` on the key's owner: sharded subscribers of `key`.
    pub async fn shard_numsub(&self, key: &str) -> i64 {
        let owner = self.owner_of(key).await;
        let (_, n): (String, i64) =
            must(owner.port, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(key)).await;
        n
    }

    /// `PUBSUB NUMSUB` summed over the live nodes (a classic subscription lives on the
    /// one node the subscriber is connected to).
    pub async fn numsub(&self, key: &str) -> i64 {
        let mut total = 0;
        for port in self.live_ports() {
            let (_, n): (String, i64) =
                must(port, redis::cmd("PUBSUB").arg("NUMSUB").arg(key)).await;
            total += n;
        }
        total
    }
}

// ---------------------------------------------------------------------------------------
// Sentinel

/// 1 master, 1 replica and 3 sentinels monitoring them as [`RedisSentinel::MASTER`].
pub struct RedisSentinel {
    /// The two data servers (the master at the start first); sentinels follow.
    data: Vec<Server>,
    sentinels: Vec<Server>,
    _dir: TempDir,
}

impl RedisSentinel {
    pub const MASTER: &'static str = "wsm";

    /// Starts the set; returns once every sentinel knows the master, its replica (in
    /// sync) and the two other sentinels, so that a failover can be agreed on.
    pub async fn start() -> RedisSentinel {
        let dir = TempDir::new("sentinel");
        let d = dir.to_string_lossy().into_owned();
        let master_port = free_port();
        let data_args = |port: u16| -> Vec<String> {
            vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                "--repl-diskless-sync-delay".into(),
                "0".into(),
                // Fencing, as the README recommends for Sentinel: a master that lost its
                // replica (promoted away from it) refuses writes instead of taking ones
                // that the failover throws away.
                "--min-replicas-to-write".into(),
                "1".into(),
                "--min-replicas-max-lag".into(),
                "2".into(),
                "--dir".into(),
                d.clone(),
            ]
        };
        let master = Server::new(
            master_port,
            data_args(master_port),
            dir.join(format!("redis-{master_port}.log")),
        );
        let replica_port = free_port();
        let mut args = data_args(replica_port);
        args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            master_port.to_string(),
        ]);
        let replica = Server::new(
            replica_port,
            args,
            dir.join(format!("redis-{replica_port}.log")),
        );
        // The sentinels find the replica in the master's INFO, which they read every 10 s:
        // start them once the replica is there, so that the first read finds it.
        until("the replica is in sync", || async move {
            let info: String = query(replica_port, redis::cmd("INFO").arg("replication"))
                .await
                .map_err(|e| e.to_string())?;
            match info.contains("master_link_status:up") {
                true => Ok(()),
                false => Err("not in sync".into()),
            }
        })
        .await;
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let own = dir.join(format!("sentinel-{port}"));
                std::fs::create_dir_all(&own).unwrap();
                let conf = own.join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\n\
                         sentinel resolve-hostnames no\n\
                         sentinel monitor {m} 127.0.0.1 {master_port} 2\n\
                         sentinel down-after-milliseconds {m} 1000\n\
                         sentinel failover-timeout {m} 5000\n",
                        own.display(),
                        m = Self::MASTER,
                    ),
                )
                .unwrap();
                let args = vec![conf.to_string_lossy().into_owned(), "--sentinel".into()];
                Server::new(port, args, own.join("sentinel.log"))
            })
            .collect();
        let set = RedisSentinel {
            data: vec![master, replica],
            sentinels,
            _dir: dir,
        };
        let sentinel_ports: Vec<u16> = set.sentinels.iter().map(|s| s.port).collect();
        until(
            "the sentinels know the master, its replica and each other",
            || {
                let sentinel_ports = &sentinel_ports;
                async move {
                    let info: String = query(replica_port, redis::cmd("INFO").arg("replication"))
                        .await
                        .map_err(|e| e.to_string())?;
                    if !info.contains("master_link_status:up") {
                        return Err("the replica is not in sync".into());
                    }
                    for &port in sentinel_ports {
                        let fields: Vec<String> =
                            query(port, redis::cmd("SENTINEL").arg("MASTER").arg(Self::MASTER))
                                .await
                                .map_err(|e| format!("sentinel {port}: {e}"))?;
                        let field = |name: &str| {
                            fields
                                .chunks(2)
                                .find(|kv| kv[0] == name)
                                .map(|kv| kv[1].clone())
                                .unwrap_or_default()
                        };
                        if field("port") != master_port.to_string()
                            || field("num-slaves") != "1"
                            || field("num-other-sentinels") != "2"
                            || field("flags") != "master"
                        {
                            return Err(format!("sentinel {port}: {fields:?}"));
                        }
                    }
                    Ok(())
                }
            },
        )
        .await;
        set
    }

    pub fn master_name(&self) -> &'static str {
        Self::MASTER
    }

    /// `redis://127.0.0.1:PORT` of the three sentinels, comma-separated: the gateway's
    /// `redis__sentinel__nodes` setting.
    pub fn nodes(&self) -> String {
        self.node_list().join(",")
    }

    pub fn node_list(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The data servers (index 0 was the master at the start).
    pub fn data_nodes(&self) -> Vec<Node> {
        self.data
            .iter()
            .enumerate()
            .map(|(index, s)| Node {
                index,
                port: s.port,
            })
            .collect()
    }

    /// The master's port as one sentinel reports it.
    async fn master_port_from(port: u16) -> redis::RedisResult<u16> {
        let (_, p): (String, u16) = query(
            port,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(Self::MASTER),
        )
        .await?;
        Ok(p)
    }

    /// The master as the first live sentinel that answers reports it.
    pub async fn master(&self) -> Node {
        let mut last = String::new();
        for s in self.sentinels.iter().filter(|s| s.alive()) {
            match Self::master_port_from(s.port).await {
                Ok(port) => {
                    let index = self.data.iter().position(|d| d.port == port).unwrap();
                    return Node { index, port };
                }
                Err(e) => last = e.to_string(),
            }
        }
        panic!("no sentinel names the master: {last}");
    }

    /// `redis://127.0.0.1:PORT` of the master, asked from a sentinel.
    pub async fn master_url(&self) -> String {
        self.master().await.url()
    }

    /// `SENTINEL FAILOVER` (retried while the sentinel is not ready for one), then waits
    /// until every sentinel names the other data server and it answers `ROLE` master.
    /// Returns the new master. The old one still says master until a sentinel converts
    /// it (see [`RedisSentinel::wait_settled`]).
    pub async fn failover(&self) -> Node {
        let old = self.master().await;
        let sentinel = self.sentinels[0].port;
        until("a sentinel starts a failover", || async move {
            query::<String>(
                sentinel,
                redis::cmd("SENTINEL").arg("FAILOVER").arg(Self::MASTER),
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        })
        .await;
        self.wait_switched(&old).await
    }

    /// Kills the current master (SIGKILL, by PID); the sentinels elect the replica after
    /// `down-after-milliseconds`. Returns the killed node.
    pub async fn kill_master(&mut self) -> Node {
        let old = self.master().await;
        self.data[old.index].kill();
        old
    }

    /// Waits until every live sentinel names a master other than `old` and that server
    /// answers `ROLE` master; returns it.
    pub async fn wait_switched(&self, old: &Node) -> Node {
        let sentinels: Vec<u16> = self
            .sentinels
            .iter()
            .filter(|s| s.alive())
            .map(|s| s.port)
            .collect();
        let old_port = old.port;
        until("the sentinels switch the master", || {
            let sentinels = &sentinels;
            async move {
                for &s in sentinels {
                    let port = Self::master_port_from(s).await.map_err(|e| e.to_string())?;
                    if port == old_port {
                        return Err(format!("sentinel {s} still names {port}"));
                    }
                    if role(port).await.as_deref() != Some("master") {
                        return Err(format!("{port} is not master yet"));
                    }
                }
                Ok(())
            }
        })
        .await;
        self.master().await
    }

    /// Waits until every live data server other than the master answers `ROLE` slave:
    /// after a `SENTINEL FAILOVER` the old master keeps accepting writes until a sentinel
    /// converts it (some seconds later).
    pub async fn wait_settled(&self) {
        let master = self.master().await;
        let others: Vec<u16> = self
            .data
            .iter()
            .filter(|d| d.alive() && d.port != master.port)
            .map(|d| d.port)
            .collect();
        until("the old master becomes a replica", || {
            let others = &others;
            async move {
                for &port in others {
                    if role(port).await.as_deref() != Some("slave") {
                        return Err(format!("{port} is not a replica yet"));
                    }
                }
                Ok(())
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared cluster: three masters, `slot_of` agrees with `CLUSTER KEYSLOT`, keys
    /// spread over every master, classic and sharded publications, stored messages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_routes_keys_to_their_owners() {
        let started = Instant::now();
        let cluster = RedisCluster::shared().await;
        eprintln!("shared cluster ready after {:?}", started.elapsed());
        let masters = cluster.masters().await;
        assert_eq!(masters.len(), 3, "{masters:?}");
        assert_eq!(cluster.seed_list().len(), 6);
        assert!(cluster.seeds().starts_with("redis://127.0.0.1:"));
        let port = masters[0].port;
        for key in [
            "",
            "foo",
            "broadcast:chat",
            "user:jane:chat",
            "app:broadcast:f1",
            "wsrelay:history:{broadcast:feed/x}",
            "{}broadcast",
            "{user1000}.following",
            "foo{}{bar}",
            "foo{{bar}}zap",
            "{bar",
            "é{ü}",
        ] {
            let want: u16 = must(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await;
            assert_eq!(slot_of(key), want, "{key:?}");
        }
        assert_eq!(slot_of("123456789"), 0x31C3 % SLOTS);
        // A history stream and id channel share their key's slot.
        assert_eq!(
            slot_of("app:wsrelay:history:{app:broadcast:feed/x}"),
            slot_of("app:broadcast:feed/x")
        );
        let keys = cluster
            .key_on_each_master(|i| format!("broadcast:selftest{i}"))
            .await;
        assert_eq!(keys.len(), 3);
        for (key, master) in keys.iter().zip(&masters) {
            assert_eq!(&cluster.owner_of(key).await, master, "{key}");
            assert_eq!(cluster.publish_classic(key, b"stored", 60).await, 0);
            assert_eq!(cluster.get(key).await.as_deref(), Some(&b"stored"[..]));
            assert_eq!(cluster.spublish(key, b"x").await, 0);
            assert_eq!(cluster.shard_numsub(key).await, 0);
            assert_eq!(cluster.numsub(key).await, 0);
        }
    }

    /// A cluster of the test's own: a slot holding keys moves to another master, then its
    /// master is killed, its replica takes over with the keys, and the killed node
    /// rejoins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_moves_slots_and_fails_over() {
        let started = Instant::now();
        let mut cluster = RedisCluster::start().await;
        eprintln!("cluster ready after {:?}", started.elapsed());
        let key = "broadcast:feed/move";
        let stream = format!("wsrelay:history:{{{key}}}");
        let slot = slot_of(key);
        let from = cluster.owner_of_slot(slot).await;
        let _: () = must(from.port, redis::cmd("SET").arg(key).arg("v1")).await;
        let _: String = must(
            from.port,
            redis::cmd("XADD").arg(&stream).arg("*").arg("m").arg("v1"),
        )
        .await;
        // Keys of other slots stay where they are.
        let masters = cluster.masters().await;
        let to = masters.iter().find(|m| **m != from).unwrap().clone();
        cluster.move_slot(slot, &to).await;
        assert_eq!(cluster.owner_of_slot(slot).await, to);
        assert_eq!(cluster.get(key).await.as_deref(), Some(&b"v1"[..]));
        let len: i64 = must(to.port, redis::cmd("XLEN").arg(&stream)).await;
        assert_eq!(len, 1);
        let gone: Option<String> = query(from.port, redis::cmd("GET").arg(key))
            .await
            .ok()
            .flatten();
        assert_eq!(gone, None, "the old owner redirects or has no copy");
        cluster.wait_healthy().await;
        // The new owner fails: its replica takes over, with what was replicated.
        let _: () = must(to.port, redis::cmd("SET").arg(key).arg("v2")).await;
        assert_eq!(cluster.wait_replicated(&to).await, 1);
        let killed_at = Instant::now();
        cluster.kill(&to);
        let promoted = cluster.wait_promoted(slot).await;
        eprintln!(
            "slot {slot}: {} promoted {:?} after the SIGKILL",
            promoted.addr(),
            killed_at.elapsed()
        );
        assert_ne!(promoted, to);
        assert_eq!(cluster.get(key).await.as_deref(), Some(&b"v2"[..]));
        assert_eq!(cluster.masters().await.len(), 3);
        cluster.restart(&to).await;
        // The restarted node reads itself as a master in its nodes file until the
        // others' gossip tells it it was failed over.
        let port = to.port;
        until("the restarted node turns replica", || async move {
            match role(port).await.as_deref() {
                Some("slave") => Ok(()),
                other => Err(format!("role {other:?}")),
            }
        })
        .await;
        assert_eq!(cluster.masters().await.len(), 3);
    }

    /// `SENTINEL FAILOVER` switches the master to the replica, with the data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sentinel_failover_switches_the_master() {
        let started = Instant::now();
        let mut sentinel = RedisSentinel::start().await;
        eprintln!("sentinel set ready after {:?}", started.elapsed());
        assert_eq!(sentinel.master_name(), "wsm");
        assert_eq!(sentinel.nodes().split(',').count(), 3);
        let first = sentinel.master().await;
        assert_eq!(first.index, 0);
        assert_eq!(sentinel.master_url().await, first.url());
        let _: () = must(first.port, redis::cmd("SET").arg("k").arg("v")).await;
        let _: i64 = must(first.port, redis::cmd("WAIT").arg(1).arg(2000)).await;
        let asked = Instant::now();
        let second = sentinel.failover().await;
        eprintln!("sentinel failover done after {:?}", asked.elapsed());
        assert_eq!(second.index, 1);
        assert_eq!(sentinel.master_url().await, second.url());
        let v: Option<String> = must(second.port, redis::cmd("GET").arg("k")).await;
        assert_eq!(v.as_deref(), Some("v"));
        let settling = Instant::now();
        sentinel.wait_settled().await;
        eprintln!("old master a replica after {:?}", settling.elapsed());
        // A crash of the new master: the sentinels elect the first one again.
        let killed = sentinel.kill_master().await;
        assert_eq!(killed, second);
        let killed_at = Instant::now();
        let third = sentinel.wait_switched(&killed).await;
        eprintln!(
            "sentinel failover after a SIGKILL: {:?}",
            killed_at.elapsed()
        );
        assert_eq!(third, sentinel.data_nodes()[0]);
        let v: Option<String> = must(third.port, redis::cmd("GET").arg("k")).await;
        assert_eq!(v.as_deref(), Some("v"));
    }
}
