//! The Redis broker: one multiplexed command connection and one pub/sub connection per
//! process.
//!
//! [`Subscriber`] owns the pub/sub connection. It applies the registry's change log in
//! order (coalescing a burst of changes into one SUBSCRIBE and one UNSUBSCRIBE), hands
//! every message to the registry without waiting on any socket, and watches the link:
//! when the connection drops, or when a probe published on a service channel does not
//! come back in time (a connection that died silently), it reconnects with capped
//! exponential backoff and subscribes every key the registry still holds. Sockets stay
//! open meanwhile; `/health` reports the outage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use log::{debug, info, warn};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;

use self::history_read::catch_up;
use super::{BrokerError, Inlet};
use crate::channel::KeySpace;
use crate::history::{envelope, CatchUp, Retention, StreamId};
use crate::publisher::publish_keys;
use crate::registry::{Change, Registry};

mod history_read;

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

/// Whether the pub/sub link is up, shared by the subscriber and `/health`.
#[derive(Debug)]
struct Link(Mutex<Result<(), String>>);

impl Link {
    fn set(&self, state: Result<(), String>) {
        // unwrap: nothing panics while the link state is locked.
        *self.0.lock().unwrap() = state;
    }

    fn get(&self) -> Result<(), String> {
        // unwrap: see `set`.
        self.0.lock().unwrap().clone()
    }
}

/// The handle used by connections and the HTTP API.
pub struct RedisBroker {
    commands: ConnectionManager,
    link: Arc<Link>,
    retention: Retention,
}

/// How the pub/sub link is kept (from `redis.*` settings).
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub url: String,
    /// The key prefix, for the probe channel's name.
    pub keys: KeySpace,
    /// Longest pause between reconnect attempts.
    pub reconnect_max: Duration,
    /// Period of the probe that detects a silently dead link.
    pub probe_interval: Duration,
}

impl RedisBroker {
    /// Creates the broker and its subscriber task (to be spawned once). Nothing connects
    /// yet, so the gateway starts even when Redis is down.
    pub fn new(
        settings: LinkSettings,
        retention: Retention,
        inlet: Arc<Inlet>,
        changes: mpsc::UnboundedReceiver<Change>,
        shutdown: CancellationToken,
    ) -> redis::RedisResult<(RedisBroker, Subscriber)> {
        let client = redis::Client::open(settings.url.as_str())?;
        let commands = command_connection(&client)?;
        let link = Arc::new(Link(Mutex::new(Err("connecting to redis".into()))));
        let probe_channel = settings
            .keys
            .internal(&format!("probe:{}", uuid::Uuid::new_v4()));
        let subscriber = Subscriber {
            client,
            registry: inlet.registry().clone(),
            inlet,
            changes,
            commands: commands.clone(),
            link: link.clone(),
            probe_channel,
            waiting: Vec::new(),
            reconnect_max: settings.reconnect_max,
            probe_interval: settings.probe_interval,
            shutdown,
            retention: retention.clone(),
            pending_id: None,
            was_up: false,
        };
        let broker = RedisBroker {
            commands,
            link,
            retention,
        };
        Ok((broker, subscriber))
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
        let mut conn = self.commands.clone();
        publish_keys(&mut conn, &self.retention, &keys, payload, expire)
            .await
            .map_err(unavailable)
    }

    pub async fn catch_up(
        &self,
        keys: &[Arc<str>],
        after: &[Option<StreamId>],
        budget: usize,
    ) -> Result<Vec<CatchUp>, BrokerError> {
        let mut conn = self.commands.clone();
        match catch_up(&mut conn, &self.retention, keys, after, budget).await {
            // The first command after Redis came back fails on the old connection, and
            // the manager reconnects: a read is safe to repeat once.
            Err(_) => catch_up(&mut conn, &self.retention, keys, after, budget).await,
            done => done,
        }
    }

    pub async fn fetch(&self, keys: &[Arc<str>]) -> Result<Vec<Option<Bytes>>, BrokerError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.commands.clone();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(keys.iter().map(|k| &**k).collect::<Vec<_>>())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    pub fn health(&self) -> Result<(), String> {
        self.link.get()
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

/// The background task that owns the pub/sub connection.
pub struct Subscriber {
    client: redis::Client,
    registry: Arc<Registry>,
    inlet: Arc<Inlet>,
    changes: mpsc::UnboundedReceiver<Change>,
    commands: ConnectionManager,
    link: Arc<Link>,
    probe_channel: String,
    reconnect_max: Duration,
    probe_interval: Duration,
    shutdown: CancellationToken,
    /// Barriers that arrived while the link was down or failing; answered once a later
    /// connect has subscribed every live key.
    waiting: Vec<oneshot::Sender<bool>>,
    /// Which keys keep history (their id channels are subscribed with them).
    retention: Retention,
    /// The id just announced for the next publication on a key (see
    /// [`Subscriber::relay`]).
    pending_id: Option<(String, StreamId)>,
    /// Whether a link was up before: a reconnect then recovers what was missed.
    was_up: bool,
}

impl Subscriber {
    /// Runs until shutdown: connect, serve, and on any failure wait and reconnect.
    pub async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u64;
        while !self.shutdown.is_cancelled() {
            let reason = match self.serve().await {
                Ok(()) => return,
                Err(Failure::Connect(reason)) => {
                    failures += 1;
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
                    self.registry.metrics.redis_reconnects.inc();
                    failures = 0;
                    backoff = MIN_BACKOFF;
                    reason
                }
            };
            self.link.set(Err(format!("redis unavailable: {reason}")));
            self.registry.metrics.redis_connected.set(0);
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
        let connected = timeout(OP_TIMEOUT, self.client.get_async_pubsub()).await;
        let Ok(pubsub) = connected else {
            let addr = self.client.get_connection_info().addr();
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
        let keys: Vec<Arc<str>> = self.registry.keys();
        let mut channels = self.channels(&keys);
        channels.push(Arc::from(self.probe_channel.as_str()));
        in_chunks(&mut sink, true, &channels)
            .await
            .map_err(Failure::Connect)?;
        info!("redis: pub/sub connected, {} keys subscribed", keys.len());
        self.pending_id = None;
        if std::mem::replace(&mut self.was_up, true) {
            self.recover().await.map_err(Failure::Lost)?;
        }
        self.link.set(Ok(()));
        self.registry.metrics.redis_connected.set(1);
        for done in self.waiting.drain(..) {
            let _ = done.send(true);
        }

        let start = Instant::now() + self.probe_interval;
        let mut probe = tokio::time::interval_at(start, self.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the unanswered probe was sent. Any message received since proves the
        // link alive, so a busy link is never taken for a dead one.
        let mut probe_sent: Option<Instant> = None;
        loop {
            // Changes before messages: they are rare and cheap, and new sockets wait on
            // them; a stream of publications must not starve them.
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                change = self.changes.recv() => {
                    let Some(change) = change else { return Ok(()) };
                    self.apply(&mut sink, change).await.map_err(Failure::Lost)?;
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(Failure::Lost("connection closed".into()));
                    };
                    probe_sent = None;
                    self.relay(message.get_channel_name(), message.get_payload_bytes()).await;
                }
                _ = probe.tick() => match probe_sent {
                    Some(sent) if sent.elapsed() >= self.probe_interval => {
                        let waited = self.probe_interval;
                        return Err(Failure::Lost(format!("probe not received within {waited:?}")));
                    }
                    Some(_) => {}
                    None => {
                        probe_sent = Some(Instant::now());
                        self.send_probe();
                    }
                },
            }
        }
    }

    /// Relays one message of the link. A publication on a key with history comes right
    /// behind its id, announced on the key's id channel by the same server-side script
    /// (nothing else can come between the two on this connection); a publication
    /// without an announced id (a plain `PUBLISH`) is relayed without one.
    async fn relay(&mut self, channel: &str, payload: &[u8]) {
        if channel == self.probe_channel {
            return;
        }
        if let Some(key) = self.retention.keys().key_of_id_channel(channel) {
            let id = std::str::from_utf8(payload)
                .ok()
                .and_then(|p| p.parse().ok());
            self.pending_id = id.map(|id| (key, id));
            return;
        }
        let id = match self.pending_id.take() {
            Some((key, id)) if key == channel => Some(id),
            _ => None,
        };
        self.inlet.deliver(channel, payload, id).await;
    }

    /// The channels that carry `keys`: each key, and before it its id channel when it
    /// keeps history.
    fn channels(&self, keys: &[Arc<str>]) -> Vec<Arc<str>> {
        let mut channels = Vec::with_capacity(keys.len());
        for key in keys {
            if self.retention.of(key).is_some() {
                channels.push(Arc::from(self.retention.keys().id_channel(key)));
            }
            channels.push(key.clone());
        }
        channels
    }

    /// After a lost link came back: what every live key missed, before anything live.
    /// A key with history gets the entries after the last id relayed on it (or a
    /// `reset` and its stored message when they are not all there); a key without
    /// history gets its stored message when it is not the last one relayed, and its
    /// envelope sockets a `gap`. Live publications that the read already brought are
    /// dropped as duplicates by the registry. A read that fails is an error: the link
    /// is replaced and the recovery tried again, rather than skipped.
    async fn recover(&mut self) -> Result<(), String> {
        let cursors = self.registry.cursors();
        if cursors.is_empty() {
            return Ok(());
        }
        // On a connection of its own, just made: the command connection may still be
        // the one that failed with the link, waiting to time out.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("recovery read: {e}"))?;
        let metrics = self.registry.metrics.clone();
        let mut replayed = 0u64;
        for chunk in cursors.chunks(RECOVERY_CHUNK) {
            let keys: Vec<Arc<str>> = chunk.iter().map(|(k, _)| k.clone()).collect();
            let after: Vec<Option<StreamId>> = chunk
                .iter()
                .map(|(k, c)| self.retention.of(k).and(*c))
                .collect();
            let caught_up = catch_up(&mut conn, &self.retention, &keys, &after, usize::MAX)
                .await
                .map_err(|e| format!("recovery read: {e}"))?;
            for (key, caught) in keys.iter().zip(caught_up) {
                replayed += self.recover_key(key, caught).await;
            }
        }
        metrics
            .recovery
            .with_label_values(&["replayed"])
            .inc_by(replayed);
        info!(
            "redis: recovered {} keys after reconnecting, {replayed} missed messages replayed",
            cursors.len()
        );
        Ok(())
    }

    /// Relays what one key missed (see [`Subscriber::recover`]); returns how many
    /// entries were replayed.
    async fn recover_key(&self, key: &Arc<str>, caught: CatchUp) -> u64 {
        let metrics = &self.registry.metrics;
        let label = self.retention.label(key);
        let history = self.retention.of(key).is_some();
        match caught {
            CatchUp::Resumed { entries, .. } => {
                let replayed = entries.len() as u64;
                for (id, payload) in entries {
                    self.inlet.deliver(key, &payload, Some(id)).await;
                }
                replayed
            }
            // A history key whose position is not known (no socket finished its setup,
            // nothing was relayed) reads as a key without one: its stored message.
            CatchUp::Reset {
                reason,
                stored,
                newest,
            } => {
                self.registry.restart_ids(key, newest);
                self.reset(key, &label, reason, stored).await;
                0
            }
            CatchUp::Stored { stored, .. } if history => {
                self.reset(key, &label, "position unknown", stored).await;
                0
            }
            CatchUp::Stored { stored, .. } => {
                metrics.recovery.with_label_values(&["gap"]).inc();
                let text = envelope::gap(&label, "the link to redis was lost");
                self.registry.dispatch_control(key, &text).await;
                if let Some((payload, _)) = stored {
                    self.registry.dispatch_recovered(key, &payload).await;
                }
                0
            }
        }
    }

    /// What a history key missed cannot be replayed: `reset`, then its stored message
    /// if it is the stream's newest entry (an older stored message, from a publication
    /// not kept, would arrive as if new).
    async fn reset(
        &self,
        key: &Arc<str>,
        label: &str,
        reason: &str,
        stored: Option<(Bytes, Option<StreamId>)>,
    ) {
        self.registry
            .metrics
            .recovery
            .with_label_values(&["reset"])
            .inc();
        self.registry
            .dispatch_control(key, &envelope::reset(label, reason))
            .await;
        if let Some((payload, Some(id))) = stored {
            self.inlet.deliver(key, &payload, Some(id)).await;
        }
    }

    /// Applies `first` and every change already queued behind it, as one SUBSCRIBE and
    /// one UNSUBSCRIBE: the registry alternates transitions per key, so the last change
    /// of a key is its state.
    async fn apply(&mut self, sink: &mut PubSubSink, first: Change) -> Result<(), String> {
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
            next = self.changes.try_recv().ok();
        }
        let wanted_as = |on: bool| -> Vec<Arc<str>> {
            wanted
                .iter()
                .filter(|&(_, &w)| w == on)
                .map(|(k, _)| k.clone())
                .collect()
        };
        let (on, off) = (
            self.channels(&wanted_as(true)),
            self.channels(&wanted_as(false)),
        );
        let applied = match in_chunks(sink, true, &on).await {
            Ok(()) => in_chunks(sink, false, &off).await,
            failed => failed,
        };
        match applied {
            Ok(()) => {
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
        let mut conn = self.commands.clone();
        let channel = self.probe_channel.clone();
        tokio::spawn(async move {
            let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
                .arg(channel)
                .arg("probe")
                .query_async(&mut conn)
                .await;
            if let Err(e) = sent {
                debug!("redis: probe publish failed: {e}");
            }
        });
    }
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
