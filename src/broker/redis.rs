//! The Redis broker, on one Redis, a Redis Cluster, or a master watched by Sentinel.
//!
//! Commands (publications, stored messages, history reads) go through [`Commands`],
//! which splits a batch by slot in a cluster and follows Sentinel's master. Pub/sub has
//! two shapes:
//! - [`Subscriber`]: one classic pub/sub link (one Redis, Sentinel's master, or any one
//!   node of a cluster in `classic` mode, where every node sees every `PUBLISH`);
//! - [`sharded::ShardedSubscriber`]: one link per master of a cluster, each key
//!   subscribed (`SSUBSCRIBE`) on the master that owns its slot.
//!
//! Both apply the registry's change log in order (coalescing a burst of changes), hand
//! every message to the registry without waiting on any socket, watch their links
//! (a probe, or a `PING` per node), reconnect with capped exponential backoff, and
//! recover what live keys missed (see [`relay::Relay::recover`]). Sockets stay open
//! meanwhile; `/health` reports the outage, per node.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use log::{debug, info, warn};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;

use self::commands::{Commands, SentinelMaster};
use self::relay::{PendingId, Relay};
use super::{BrokerError, Inlet};
use crate::channel::KeySpace;
use crate::config::{PubSub, Topology};
use crate::history::{CatchUp, Retention, StreamId};
use crate::metrics::Metrics;
use crate::publisher::publish_keys;
use crate::registry::{Change, Registry};

pub mod commands;
mod history_read;
mod relay;
pub mod sharded;
pub mod slots;

/// The first pause after a failed connect; doubled up to `redis.reconnect_max`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Bound on one connect or one SUBSCRIBE/UNSUBSCRIBE round trip.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE/UNSUBSCRIBE command when many change at once.
const CHUNK: usize = 1024;
/// Keys read in one round trip by a recovery (each one a history script or a GET).
const RECOVERY_CHUNK: usize = 256;

/// Why a connect did not complete within [`OP_TIMEOUT`]. For a TLS URL (`rediss://`),
/// a plain TCP connect tells a server that does not answer at all from one that does
/// not speak TLS (a plain Redis reads the TLS greeting as a command and waits for the
/// rest of it, so the TLS handshake never completes).
async fn timed_out(addr: &redis::ConnectionAddr) -> String {
    let redis::ConnectionAddr::TcpTls { host, port, .. } = addr else {
        return "connect timed out".into();
    };
    let tcp = timeout(
        OP_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), *port)),
    )
    .await;
    match tcp {
        Ok(Ok(_)) => format!(
            "TLS handshake with {host}:{port} did not complete: the server accepts \
             connections but does not answer TLS (a plain Redis? then use redis://)"
        ),
        _ => format!("connect to {host}:{port} timed out (TLS)"),
    }
}

/// One Redis node the gateway holds a pub/sub link to, for `/health`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub connected: bool,
    pub subscribed_keys: usize,
    pub reconnects: u64,
}

/// Whether pub/sub works, and the state of each node's link, shared by the subscriber
/// and `/health`; every change is mirrored in the per-node metrics.
struct Link {
    state: Mutex<LinkState>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct LinkState {
    up: Result<(), String>,
    nodes: BTreeMap<String, NodeStatus>,
}

impl Link {
    fn new(metrics: Arc<Metrics>) -> Link {
        Link {
            state: Mutex::new(LinkState {
                up: Err("connecting to redis".into()),
                nodes: BTreeMap::new(),
            }),
            metrics,
        }
    }

    fn set(&self, up: Result<(), String>) {
        self.metrics.redis_connected.set(i64::from(up.is_ok()));
        // unwrap: nothing panics while the link state is locked.
        self.state.lock().unwrap().up = up;
    }

    fn get(&self) -> Result<(), String> {
        // unwrap: see `set`.
        self.state.lock().unwrap().up.clone()
    }

    fn nodes(&self) -> Vec<NodeStatus> {
        // unwrap: see `set`.
        self.state.lock().unwrap().nodes.values().cloned().collect()
    }

    /// The link to `node` is up with `keys` keys subscribed.
    fn node_up(&self, node: &str, keys: usize) {
        let m = &self.metrics;
        m.redis_node_connected.with_label_values(&[node]).set(1);
        m.redis_node_subscribed_keys
            .with_label_values(&[node])
            .set(keys as i64);
        // Shown from the start, at 0.
        m.redis_node_reconnects.with_label_values(&[node]).inc_by(0);
        // unwrap: see `set`.
        let mut state = self.state.lock().unwrap();
        let status = state
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| NodeStatus {
                node: node.to_string(),
                connected: true,
                subscribed_keys: keys,
                reconnects: 0,
            });
        status.connected = true;
        status.subscribed_keys = keys;
    }

    fn node_keys(&self, node: &str, keys: usize) {
        self.metrics
            .redis_node_subscribed_keys
            .with_label_values(&[node])
            .set(keys as i64);
        // unwrap: see `set`.
        if let Some(status) = self.state.lock().unwrap().nodes.get_mut(node) {
            status.subscribed_keys = keys;
        }
    }

    /// The link to `node` was lost (it is counted) or given up (the node left).
    fn node_down(&self, node: &str, lost: bool) {
        self.metrics
            .redis_node_connected
            .with_label_values(&[node])
            .set(0);
        if lost {
            self.metrics
                .redis_node_reconnects
                .with_label_values(&[node])
                .inc();
        }
        // unwrap: see `set`.
        if let Some(status) = self.state.lock().unwrap().nodes.get_mut(node) {
            status.connected = false;
            status.reconnects += u64::from(lost);
        }
    }

    /// `node` is no longer used (not a master any more): it leaves `/health` and the
    /// metrics.
    fn forget_node(&self, node: &str) {
        let m = &self.metrics;
        let _ = m.redis_node_connected.remove_label_values(&[node]);
        let _ = m.redis_node_subscribed_keys.remove_label_values(&[node]);
        // unwrap: see `set`.
        self.state.lock().unwrap().nodes.remove(node);
    }
}

/// `host:port` (or the socket's path) of a client's server.
fn node_name(client: &redis::Client) -> String {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        other => other.to_string(),
    }
}

/// The handle used by connections and the HTTP API.
pub struct RedisBroker {
    commands: Commands,
    link: Arc<Link>,
    retention: Retention,
}

/// How the pub/sub link is kept (from `redis.*` settings).
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The key prefix, for the probe channel's name.
    pub keys: KeySpace,
    /// Longest pause between reconnect attempts.
    pub reconnect_max: Duration,
    /// Period of the probe that detects a silently dead link.
    pub probe_interval: Duration,
}

/// The background task that keeps pub/sub, for the topology.
pub enum SubscriberTask {
    Classic(Box<Subscriber>),
    Sharded(Box<sharded::ShardedSubscriber>),
}

impl SubscriberTask {
    pub async fn run(self) {
        match self {
            SubscriberTask::Classic(s) => s.run().await,
            SubscriberTask::Sharded(s) => s.run().await,
        }
    }
}

impl RedisBroker {
    /// Creates the broker and its subscriber task (to be spawned once). Nothing connects
    /// yet, so the gateway starts even when Redis is down.
    pub fn new(
        topology: Topology,
        settings: LinkSettings,
        retention: Retention,
        inlet: Arc<Inlet>,
        changes: mpsc::UnboundedReceiver<Change>,
        shutdown: CancellationToken,
    ) -> redis::RedisResult<(RedisBroker, SubscriberTask)> {
        let link = Arc::new(Link::new(inlet.registry().metrics.clone()));
        let relay = Relay::new(inlet, retention.clone());
        let (commands, source) = match &topology {
            Topology::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let commands = Commands::single(&client)?;
                (commands, Source::nodes(vec![client]))
            }
            Topology::Cluster { seeds, pubsub } => {
                let commands = Commands::cluster(seeds, *pubsub)?;
                let clients = seeds
                    .iter()
                    .map(|s| redis::Client::open(s.as_str()))
                    .collect::<redis::RedisResult<Vec<_>>>()?;
                if *pubsub == PubSub::Sharded {
                    let subscriber = sharded::ShardedSubscriber::new(
                        clients,
                        commands.clone(),
                        relay,
                        changes,
                        link.clone(),
                        settings,
                        shutdown,
                    );
                    let broker = RedisBroker {
                        commands,
                        link,
                        retention,
                    };
                    return Ok((broker, SubscriberTask::Sharded(Box::new(subscriber))));
                }
                (commands, Source::nodes(clients))
            }
            Topology::Sentinel(config) => {
                let master = Arc::new(SentinelMaster::new(config)?);
                (Commands::Sentinel(master.clone()), Source::Sentinel(master))
            }
        };
        let probe_channel = settings
            .keys
            .internal(&format!("probe:{}", uuid::Uuid::new_v4()));
        let subscriber = Subscriber {
            source,
            relay,
            changes,
            commands: commands.clone(),
            link: link.clone(),
            probe_channel,
            waiting: Vec::new(),
            reconnect_max: settings.reconnect_max,
            probe_interval: settings.probe_interval,
            shutdown,
            pending_id: None,
            was_up: false,
            subscribed: 0,
        };
        let broker = RedisBroker {
            commands,
            link,
            retention,
        };
        Ok((broker, SubscriberTask::Classic(Box::new(subscriber))))
    }

    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    pub async fn publish(
        &self,
        keys: &[Arc<str>],
        payload: &Bytes,
        expire: u64,
    ) -> Result<Vec<Option<StreamId>>, BrokerError> {
        let keys: Vec<&str> = keys.iter().map(|k| &**k).collect();
        publish_keys(&self.commands, &self.retention, &keys, payload, expire)
            .await
            .map_err(unavailable)
    }

    pub async fn catch_up(
        &self,
        keys: &[Arc<str>],
        after: &[Option<StreamId>],
        budget: usize,
    ) -> Result<Vec<CatchUp>, BrokerError> {
        let read = history_read::catch_up(&self.commands, &self.retention, keys, after, budget);
        match read.await {
            // The first command after Redis came back fails on the old connection, and
            // the manager reconnects: a read is safe to repeat once.
            Err(_) => {
                history_read::catch_up(&self.commands, &self.retention, keys, after, budget).await
            }
            done => done,
        }
    }

    pub async fn fetch(&self, keys: &[Arc<str>]) -> Result<Vec<Option<Bytes>>, BrokerError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let build = |members: &[usize]| {
            let mut mget = redis::cmd("MGET");
            for &i in members {
                mget.arg(&*keys[i]);
            }
            let mut pipe = redis::pipe();
            pipe.add_command(mget);
            pipe
        };
        // A pipeline of one MGET answers one array.
        let decode = |_: &[usize], values: Vec<redis::Value>| {
            let values = values.into_iter().next().unwrap_or(redis::Value::Nil);
            redis::from_redis_value::<Vec<Option<Vec<u8>>>>(values).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Client, "MGET", e.to_string()))
            })
        };
        let values = self
            .commands
            .batch(keys.len(), build, decode)
            .await
            .map_err(unavailable)?;
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    pub fn health(&self) -> Result<(), String> {
        self.link.get()
    }

    /// The nodes holding this process's pub/sub links.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.link.nodes()
    }
}

/// A multiplexed command connection that connects on first use (so nothing fails while
/// Redis is down at start), answers within [`OP_TIMEOUT`], and fails fast while Redis
/// is unreachable instead of retrying at length.
pub fn command_connection(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(OP_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    client.get_connection_manager_lazy(config)
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Where the classic link connects: one Redis, or any node of a classic cluster (the
/// next one after a failed connect), or the master Sentinel names now.
enum Source {
    Nodes {
        clients: Vec<redis::Client>,
        next: usize,
    },
    Sentinel(Arc<SentinelMaster>),
}

impl Source {
    fn nodes(clients: Vec<redis::Client>) -> Source {
        Source::Nodes { clients, next: 0 }
    }

    async fn pick(&mut self) -> Result<redis::Client, String> {
        match self {
            Source::Nodes { clients, next } => Ok(clients[*next % clients.len()].clone()),
            Source::Sentinel(master) => {
                let (addr, client) = master
                    .resolve()
                    .await
                    .map_err(|e| format!("sentinel: {e}"))?;
                master.adopt(&addr, &client).map_err(|e| e.to_string())?;
                Ok(client)
            }
        }
    }

    fn failed(&mut self) {
        if let Source::Nodes { next, .. } = self {
            *next += 1;
        }
    }

    /// Reads of a recovery: on a connection just made to the node that has the data
    /// (the command connection may still be the one that failed with the link), or
    /// through the cluster's own routing.
    async fn reader(
        &self,
        client: &redis::Client,
        commands: &Commands,
    ) -> Result<Commands, String> {
        if matches!(commands, Commands::Cluster(_)) {
            return Ok(commands.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("recovery read: {e}"))?;
        Ok(Commands::Direct(conn))
    }
}

/// The background task that owns the classic pub/sub connection.
pub struct Subscriber {
    source: Source,
    relay: Relay,
    changes: mpsc::UnboundedReceiver<Change>,
    commands: Commands,
    link: Arc<Link>,
    probe_channel: String,
    reconnect_max: Duration,
    probe_interval: Duration,
    shutdown: CancellationToken,
    /// Barriers that arrived while the link was down or failing; answered once a later
    /// connect has subscribed every live key.
    waiting: Vec<oneshot::Sender<bool>>,
    /// The id just announced for the next publication on a key.
    pending_id: PendingId,
    /// Whether a link was up before: a reconnect then recovers what was missed.
    was_up: bool,
    /// Keys subscribed on the link now.
    subscribed: usize,
}

impl Subscriber {
    fn registry(&self) -> &Arc<Registry> {
        &self.relay.registry
    }

    /// Runs until shutdown: connect, serve, and on any failure wait and reconnect.
    pub async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u64;
        while !self.shutdown.is_cancelled() {
            let reason = match self.serve().await {
                Ok(()) => return,
                Err(Failure::Connect(reason)) => {
                    failures += 1;
                    self.source.failed();
                    if failures == 1 {
                        warn!(
                            "redis: cannot connect ({reason}); retrying, backoff up to {:?}",
                            self.reconnect_max
                        );
                    } else {
                        debug!("redis: connect attempt {failures} failed: {reason}");
                    }
                    reason
                }
                Err(Failure::Lost(reason)) => {
                    warn!("redis: pub/sub link lost ({reason}); sockets stay open, reconnecting");
                    self.registry().metrics.redis_reconnects.inc();
                    failures = 0;
                    backoff = MIN_BACKOFF;
                    reason
                }
            };
            self.link.set(Err(format!("redis unavailable: {reason}")));
            self.wait_disconnected(backoff).await;
            backoff = (backoff * 2).min(self.reconnect_max);
        }
    }

    /// While disconnected, changes are dropped (the registry is resubscribed whole on the
    /// next connect) and barriers wait for that connect.
    async fn wait_disconnected(&mut self, pause: Duration) {
        let deadline = sleep(pause);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = self.shutdown.cancelled() => return,
                change = self.changes.recv() => match change {
                    Some(Change::Barrier(done)) => {
                        // Sockets that left no longer wait.
                        self.waiting.retain(|w| !w.is_closed());
                        self.waiting.push(done);
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
    }

    /// Connects, resubscribes every live key, then relays until the link fails.
    async fn serve(&mut self) -> Result<(), Failure> {
        let client = self.source.pick().await.map_err(Failure::Connect)?;
        let node = node_name(&client);
        let connected = timeout(OP_TIMEOUT, client.get_async_pubsub()).await;
        let Ok(pubsub) = connected else {
            let addr = client.get_connection_info().addr();
            return Err(Failure::Connect(timed_out(addr).await));
        };
        let pubsub = pubsub.map_err(|e| Failure::Connect(e.to_string()))?;
        let (mut sink, mut stream) = pubsub.split();

        // Every change logged so far is superseded by the snapshot taken after it.
        while let Ok(change) = self.changes.try_recv() {
            if let Change::Barrier(done) = change {
                self.waiting.push(done);
            }
        }
        let keys: Vec<Arc<str>> = self.registry().keys();
        let mut channels = self.relay.channels(&keys);
        channels.push(Arc::from(self.probe_channel.as_str()));
        in_chunks(&mut sink, true, &channels)
            .await
            .map_err(Failure::Connect)?;
        info!(
            "redis: pub/sub connected to {node}, {} keys subscribed",
            keys.len()
        );
        self.subscribed = keys.len();
        self.link.node_up(&node, keys.len());
        let served = self
            .relay_until_lost(&client, &node, &mut sink, &mut stream)
            .await;
        if served.is_err() {
            self.link.node_down(&node, true);
        }
        served
    }

    async fn relay_until_lost(
        &mut self,
        client: &redis::Client,
        node: &str,
        sink: &mut PubSubSink,
        stream: &mut redis::aio::PubSubStream,
    ) -> Result<(), Failure> {
        self.pending_id = None;
        if std::mem::replace(&mut self.was_up, true) {
            let reader = self.source.reader(client, &self.commands).await;
            let cursors = self.registry().cursors();
            self.relay
                .recover(&reader.map_err(Failure::Lost)?, &cursors)
                .await
                .map_err(Failure::Lost)?;
        }
        self.link.set(Ok(()));
        for done in self.waiting.drain(..) {
            let _ = done.send(true);
        }

        let start = Instant::now() + self.probe_interval;
        let mut probe = tokio::time::interval_at(start, self.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the unanswered probe was sent. Any message received since proves the
        // link alive, so a busy link is never taken for a dead one.
        let mut probe_sent: Option<Instant> = None;
        // With Sentinel: the master it names, when that is not this link's node.
        let (moved_tx, mut moved) = mpsc::channel::<String>(1);
        loop {
            // Changes before messages: they are rare and cheap, and new sockets wait on
            // them; a stream of publications must not starve them.
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                change = self.changes.recv() => {
                    let Some(change) = change else { return Ok(()) };
                    self.apply(sink, change).await.map_err(Failure::Lost)?;
                    self.link.node_keys(node, self.subscribed);
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(Failure::Lost("connection closed".into()));
                    };
                    probe_sent = None;
                    let channel = message.get_channel_name();
                    if channel != self.probe_channel {
                        let payload = message.get_payload_bytes();
                        self.relay.relay(&mut self.pending_id, channel, payload).await;
                    }
                }
                Some(master) = moved.recv() => {
                    self.registry().metrics.redis_resubscribes
                        .with_label_values(&["failover"])
                        .inc_by(self.subscribed as u64);
                    return Err(Failure::Lost(format!("sentinel names {master} as master now")));
                }
                _ = probe.tick() => {
                    self.check_master(node, &moved_tx);
                    match probe_sent {
                        Some(sent) if sent.elapsed() >= self.probe_interval => {
                            let waited = self.probe_interval;
                            return Err(Failure::Lost(format!("probe not received within {waited:?}")));
                        }
                        Some(_) => {}
                        None => {
                            probe_sent = Some(Instant::now());
                            self.send_probe();
                        }
                    }
                },
            }
        }
    }

    /// With Sentinel: asks, aside, which master the sentinels name; another one than
    /// this link's node is sent on `moved` (the link is then replaced and recovered).
    fn check_master(&self, node: &str, moved: &mpsc::Sender<String>) {
        let Source::Sentinel(master) = &self.source else {
            return;
        };
        let (master, node, moved) = (master.clone(), node.to_string(), moved.clone());
        tokio::spawn(async move {
            match master.resolve().await {
                Ok((addr, client)) if addr != node => {
                    if master.adopt(&addr, &client).is_ok() {
                        let _ = moved.try_send(addr);
                    }
                }
                Ok(_) => {}
                Err(e) => debug!("redis: asking the sentinels failed: {e}"),
            }
        });
    }

    /// Applies `first` and every change already queued behind it, as one SUBSCRIBE and
    /// one UNSUBSCRIBE: the registry alternates transitions per key, so the last change
    /// of a key is its state.
    async fn apply(&mut self, sink: &mut PubSubSink, first: Change) -> Result<(), String> {
        let (on, off, barriers) = coalesce(first, &mut self.changes);
        let (on_keys, off_keys) = (on.len(), off.len());
        let (on, off) = (self.relay.channels(&on), self.relay.channels(&off));
        let applied = match in_chunks(sink, true, &on).await {
            Ok(()) => in_chunks(sink, false, &off).await,
            failed => failed,
        };
        match applied {
            Ok(()) => {
                self.subscribed = (self.subscribed + on_keys).saturating_sub(off_keys);
                for done in barriers {
                    let _ = done.send(true);
                }
            }
            // The link is about to be replaced; the next connect answers them.
            Err(_) => self.waiting.extend(barriers),
        }
        applied
    }

    /// Publishes a probe through the command connection; the pub/sub connection must
    /// receive it before the next tick. Runs aside so a slow reply never stalls relaying.
    fn send_probe(&self) {
        let commands = self.commands.clone();
        let channel = self.probe_channel.clone();
        tokio::spawn(async move {
            let sent: redis::RedisResult<()> = commands
                .run(|mut conn| {
                    let channel = channel.clone();
                    async move {
                        redis::cmd("PUBLISH")
                            .arg(channel)
                            .arg("probe")
                            .query_async(&mut conn)
                            .await
                    }
                })
                .await;
            if let Err(e) = sent {
                debug!("redis: probe publish failed: {e}");
            }
        });
    }
}

/// A burst of registry changes, coalesced: the keys to subscribe, the keys to
/// unsubscribe, and the barriers to answer once both are applied.
type Coalesced = (Vec<Arc<str>>, Vec<Arc<str>>, Vec<oneshot::Sender<bool>>);

/// Takes `first` and every change already queued behind it (the last change of a key
/// is its state: the registry alternates transitions per key).
fn coalesce(first: Change, changes: &mut mpsc::UnboundedReceiver<Change>) -> Coalesced {
    let mut wanted: HashMap<Arc<str>, bool> = HashMap::new();
    let mut barriers = Vec::new();
    let mut next = Some(first);
    while let Some(change) = next {
        match change {
            Change::Subscribe(key) => {
                wanted.insert(key, true);
            }
            Change::Unsubscribe(key) => {
                wanted.insert(key, false);
            }
            Change::Barrier(done) => barriers.push(done),
        }
        next = changes.try_recv().ok();
    }
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for (key, want) in wanted {
        if want {
            on.push(key);
        } else {
            off.push(key);
        }
    }
    (on, off, barriers)
}

/// SUBSCRIBE (or UNSUBSCRIBE) `keys`, [`CHUNK`] channels per command, each confirmed.
async fn in_chunks(
    sink: &mut PubSubSink,
    subscribe: bool,
    keys: &[Arc<str>],
) -> Result<(), String> {
    for chunk in keys.chunks(CHUNK) {
        let names: Vec<&str> = chunk.iter().map(|k| &**k).collect();
        if subscribe {
            round_trip(sink.subscribe(names)).await?;
        } else {
            round_trip(sink.unsubscribe(names)).await?;
        }
    }
    Ok(())
}

enum Failure {
    /// Never got to a working link.
    Connect(String),
    /// Had a working link and lost it.
    Lost(String),
}

async fn round_trip(
    op: impl std::future::Future<Output = redis::RedisResult<()>>,
) -> Result<(), String> {
    match timeout(OP_TIMEOUT, op).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("subscribe timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tls_url_against_a_server_that_accepts_says_tls_failed() {
        // A server that accepts and never answers, as a plain Redis does a TLS greeting.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = redis::Client::open(format!("rediss://127.0.0.1:{port}/0")).unwrap();
        let reason = timed_out(client.get_connection_info().addr()).await;
        assert!(
            reason.starts_with("TLS handshake with 127.0.0.1:"),
            "{reason}"
        );
        assert!(reason.contains("then use redis://"), "{reason}");
        let plain = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        assert_eq!(
            timed_out(plain.get_connection_info().addr()).await,
            "connect timed out"
        );
    }
}
