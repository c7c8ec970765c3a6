//! Sharded pub/sub on a Redis Cluster: one link per master, each key subscribed
//! (`SSUBSCRIBE`, with its id channel when it keeps history: both share its slot) on
//! the master that owns its slot, so each master carries only its own keys' traffic.
//!
//! The cluster moves keys under us in two ways, and both end the same way:
//! - a slot migrates (resharding): the old owner drops the subscriptions of that slot
//!   and says so with an unrequested `sunsubscribe`;
//! - a master goes away (failover): its link breaks, or stops answering `PING`.
//!
//! The keys concerned are *displaced*: the slot map is read again (`CLUSTER SLOTS`),
//! they are subscribed on their owner, and what they missed is recovered as after a
//! lost link ([`Relay::recover`]). Until a slot has an owner again (a replica is being
//! promoted) the attempt repeats with backoff; the map is also compared on every probe
//! tick, so a missed notice is caught within `redis.probe_interval`.
//!
//! Invariant: a key is in `placed` only while a live link holds its subscription;
//! every key of the registry is either placed or waiting in `displaced`/`unplaced`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use log::{debug, info, warn};
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::commands::Commands;
use super::relay::{PendingId, Relay};
use super::slots::{slot, SlotMap};
use super::{coalesce, Link, LinkSettings, MIN_BACKOFF, OP_TIMEOUT};
use crate::registry::Change;

/// Subscription commands in flight at once on one link.
const IN_FLIGHT: usize = 512;

/// Why keys are subscribed again elsewhere (the `reason` label of
/// `wsrelay_redis_resubscribes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Reason {
    Moved,
    Failover,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Moved => "moved",
            Reason::Failover => "failover",
        }
    }
}

/// The link to one master.
struct NodeLink {
    id: u64,
    conn: MultiplexedConnection,
    keys: usize,
}

pub struct ShardedSubscriber {
    seeds: Vec<redis::Client>,
    commands: Commands,
    relay: Relay,
    changes: mpsc::UnboundedReceiver<Change>,
    link: Arc<Link>,
    settings: LinkSettings,
    shutdown: CancellationToken,
    map: SlotMap,
    links: HashMap<String, NodeLink>,
    /// Where each subscribed key is subscribed.
    placed: HashMap<Arc<str>, String>,
    /// Keys that lost their subscription and wait to be subscribed again, then
    /// recovered.
    displaced: HashMap<Arc<str>, Reason>,
    /// Keys that never were subscribed (their owner was unreachable); no recovery due.
    unplaced: HashSet<Arc<str>>,
    /// Keys subscribed again whose recovery failed; tried again.
    to_recover: HashSet<Arc<str>>,
    pushes_tx: mpsc::UnboundedSender<(u64, PushInfo)>,
    pushes: mpsc::UnboundedReceiver<(u64, PushInfo)>,
    next_id: u64,
    pending: HashMap<u64, PendingId>,
    /// Barriers waiting for keys that could not be subscribed yet.
    waiting: Vec<oneshot::Sender<bool>>,
}

impl ShardedSubscriber {
    pub(super) fn new(
        seeds: Vec<redis::Client>,
        commands: Commands,
        relay: Relay,
        changes: mpsc::UnboundedReceiver<Change>,
        link: Arc<Link>,
        settings: LinkSettings,
        shutdown: CancellationToken,
    ) -> ShardedSubscriber {
        let (pushes_tx, pushes) = mpsc::unbounded_channel();
        ShardedSubscriber {
            seeds,
            commands,
            relay,
            changes,
            link,
            settings,
            shutdown,
            map: SlotMap::default(),
            links: HashMap::new(),
            placed: HashMap::new(),
            displaced: HashMap::new(),
            unplaced: HashSet::new(),
            to_recover: HashSet::new(),
            pushes_tx,
            pushes,
            next_id: 0,
            pending: HashMap::new(),
            waiting: Vec::new(),
        }
    }

    /// Runs until shutdown: places every key, relays, and repairs placements as the
    /// cluster changes.
    pub async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut retry_at = Instant::now();
        // Whether the map must be read even though every key looks settled (at start,
        // and after a probe found the cluster unreachable).
        let mut must = true;
        let start = Instant::now() + self.settings.probe_interval;
        let mut probe = tokio::time::interval_at(start, self.settings.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let idle = self.settled() && !must;
            let retry = async {
                if idle {
                    std::future::pending::<()>().await;
                }
                sleep_until(retry_at).await;
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                change = self.changes.recv() => {
                    let Some(change) = change else { return };
                    self.apply(change).await;
                }
                Some((id, push)) = self.pushes.recv() => self.on_push(id, push).await,
                _ = retry => {}
                _ = probe.tick() => must |= !self.probe().await,
            }
            if (self.settled() && !must) || retry_at > Instant::now() {
                continue;
            }
            match self.reconcile().await {
                Ok(()) if self.settled() => {
                    backoff = MIN_BACKOFF;
                    must = false;
                }
                outcome => {
                    if let Err(reason) = outcome {
                        self.link
                            .set(Err(format!("redis cluster unavailable: {reason}")));
                        debug!("redis: cluster not reconciled: {reason}");
                    }
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(self.settings.reconnect_max);
                }
            }
        }
    }

    /// Whether every key is subscribed and recovered.
    fn settled(&self) -> bool {
        self.displaced.is_empty() && self.unplaced.is_empty() && self.to_recover.is_empty()
    }

    /// Reads the slot map, subscribes every key that is not where its slot lives, and
    /// recovers the keys that had lost their subscription.
    async fn reconcile(&mut self) -> Result<(), String> {
        self.map = self.read_map().await?;
        // Links to nodes that are no longer masters go, and leave `/health`.
        let masters: HashSet<String> = self.map.masters().into_iter().collect();
        for status in self.link.nodes() {
            if !masters.contains(&status.node) {
                self.drop_link(&status.node, Reason::Failover, false);
                self.link.forget_node(&status.node);
            }
        }
        // Every key of the registry where its slot's owner is.
        let keys = self.relay.registry.keys();
        let mut misplaced = Vec::new();
        for key in &keys {
            let owner = self.map.owner(slot(key.as_bytes()));
            if owner.is_none() || owner != self.placed.get(key).map(String::as_str) {
                misplaced.push(key.clone());
            }
        }
        let wanted: HashSet<&Arc<str>> = keys.iter().collect();
        self.unplaced.retain(|k| wanted.contains(k));
        self.displaced.retain(|k, _| wanted.contains(k));
        self.to_recover.retain(|k| wanted.contains(k));
        for key in &misplaced {
            if let Some(node) = self.placed.remove(key) {
                // Still subscribed on a master that lost its slot: leave it there.
                self.unsubscribe_on(&node, std::slice::from_ref(key)).await;
                self.displaced.entry(key.clone()).or_insert(Reason::Moved);
            } else if !self.displaced.contains_key(key) {
                self.unplaced.insert(key.clone());
            }
        }
        self.place(misplaced).await;
        self.recover_displaced().await?;
        self.report();
        Ok(())
    }

    /// Subscribes `keys` on their owners; keys whose owner cannot be reached stay
    /// displaced or unplaced.
    async fn place(&mut self, keys: Vec<Arc<str>>) {
        let mut by_owner: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        for key in keys {
            if let Some(owner) = self.map.owner(slot(key.as_bytes())) {
                by_owner.entry(owner.to_string()).or_default().push(key);
            }
        }
        for (node, keys) in by_owner {
            if let Err(e) = self.subscribe_on(&node, &keys).await {
                // Repeats while a failed master's replica is promoted; `/health` says so.
                debug!("redis: cannot subscribe {} keys on {node}: {e}", keys.len());
                self.drop_link(&node, Reason::Failover, true);
            }
        }
        self.answer_barriers();
    }

    /// Recovers the keys subscribed again after losing their subscription.
    async fn recover_displaced(&mut self) -> Result<(), String> {
        let mut by_reason: HashMap<Reason, u64> = HashMap::new();
        let back: Vec<Arc<str>> = self
            .displaced
            .keys()
            .filter(|k| self.placed.contains_key(*k))
            .cloned()
            .collect();
        for key in back {
            if let Some(reason) = self.displaced.remove(&key) {
                *by_reason.entry(reason).or_default() += 1;
                self.to_recover.insert(key);
            }
        }
        let metrics = &self.relay.registry.metrics;
        for (reason, n) in &by_reason {
            metrics
                .redis_resubscribes
                .with_label_values(&[reason.label()])
                .inc_by(*n);
            info!(
                "redis: {n} keys subscribed again on their new master ({})",
                reason.label()
            );
        }
        if self.to_recover.is_empty() {
            return Ok(());
        }
        let cursors: Vec<_> = self
            .relay
            .registry
            .cursors()
            .into_iter()
            .filter(|(k, _)| self.to_recover.contains(k))
            .collect();
        self.relay.recover(&self.commands, &cursors).await?;
        self.to_recover.clear();
        Ok(())
    }

    /// `/health` and the link gauge: up when every key is subscribed.
    fn report(&self) {
        let waiting = self.displaced.len() + self.unplaced.len();
        if waiting == 0 {
            self.link.set(Ok(()));
        } else {
            self.link.set(Err(format!(
                "redis cluster: {waiting} keys wait for their slot's master"
            )));
        }
        for (node, link) in &self.links {
            self.link.node_keys(node, link.keys);
        }
    }

    /// `CLUSTER SLOTS` from a master we hold a link to, else from a seed.
    async fn read_map(&self) -> Result<SlotMap, String> {
        let mut last = String::from("no node answered");
        for link in self.links.values() {
            match slots_of(&mut link.conn.clone()).await {
                Ok(map) => return Ok(map),
                Err(e) => last = e,
            }
        }
        for seed in &self.seeds {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(OP_TIMEOUT));
            match seed
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(mut conn) => match slots_of(&mut conn).await {
                    Ok(map) => return Ok(map),
                    Err(e) => last = e,
                },
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// The link to `node`, made if needed: RESP3, its pushes tagged with its id.
    async fn link_to(&mut self, node: &str) -> Result<MultiplexedConnection, String> {
        if let Some(link) = self.links.get(node) {
            return Ok(link.conn.clone());
        }
        let (host, port) = node
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("not a node address: {node}"))?;
        let seed = self.seeds[0].get_connection_info().clone();
        let addr = match seed.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        let settings = seed
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = seed.set_addr(addr).set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| e.to_string())?;
        self.next_id += 1;
        let id = self.next_id;
        let pushes = self.pushes_tx.clone();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_push_sender(move |push: PushInfo| pushes.send((id, push)));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        self.links.insert(
            node.to_string(),
            NodeLink {
                id,
                conn: conn.clone(),
                keys: 0,
            },
        );
        self.link.node_up(node, 0);
        info!("redis: sharded pub/sub link to {node} up");
        Ok(conn)
    }

    /// SSUBSCRIBE the channels of `keys` on `node` (one channel per command: several
    /// channels in one command must share a slot).
    async fn subscribe_on(&mut self, node: &str, keys: &[Arc<str>]) -> Result<(), String> {
        let conn = self.link_to(node).await?;
        let mut moved = Vec::new();
        for chunk in keys.chunks(IN_FLIGHT) {
            let results = join_all(chunk.iter().map(|key| {
                let mut conn = conn.clone();
                let channels = self.relay.channels(std::slice::from_ref(key));
                async move {
                    for channel in channels {
                        redis::cmd("SSUBSCRIBE")
                            .arg(&*channel)
                            .query_async::<()>(&mut conn)
                            .await?;
                    }
                    Ok::<(), redis::RedisError>(())
                }
            }))
            .await;
            for (key, result) in chunk.iter().zip(results) {
                match result {
                    Ok(()) => {
                        self.placed.insert(key.clone(), node.to_string());
                        self.unplaced.remove(key);
                        if let Some(link) = self.links.get_mut(node) {
                            link.keys += 1;
                        }
                    }
                    // The map was stale: the next reconcile reads it again.
                    Err(e)
                        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) =>
                    {
                        moved.push(key.clone())
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        for key in moved {
            if !self.displaced.contains_key(&key) {
                self.unplaced.insert(key);
            }
        }
        Ok(())
    }

    async fn unsubscribe_on(&mut self, node: &str, keys: &[Arc<str>]) {
        let Some(link) = self.links.get_mut(node) else {
            return;
        };
        link.keys = link.keys.saturating_sub(keys.len());
        let conn = link.conn.clone();
        let channels = self.relay.channels(keys);
        let sent = join_all(channels.iter().map(|channel| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("SUNSUBSCRIBE")
                    .arg(&**channel)
                    .query_async::<()>(&mut conn)
                    .await
            }
        }))
        .await;
        if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
            debug!("redis: sunsubscribe on {node} failed: {e}");
        }
    }

    /// The link to `node` is gone (`lost`) or no longer needed: its keys are displaced.
    fn drop_link(&mut self, node: &str, reason: Reason, lost: bool) {
        let Some(link) = self.links.remove(node) else {
            return;
        };
        self.pending.remove(&link.id);
        let mut displaced = 0;
        for (key, at) in self.placed.iter() {
            if at == node {
                self.displaced.entry(key.clone()).or_insert(reason);
                displaced += 1;
            }
        }
        self.placed.retain(|_, at| at != node);
        self.link.node_down(node, lost);
        if lost {
            warn!("redis: link to {node} lost; {displaced} keys to subscribe again");
        }
    }

    /// Applies registry changes (coalesced as on a classic link).
    async fn apply(&mut self, first: Change) {
        let (on, off, barriers) = coalesce(first, &mut self.changes);
        let mut by_node: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        for key in off {
            self.unplaced.remove(&key);
            self.displaced.remove(&key);
            if let Some(node) = self.placed.remove(&key) {
                by_node.entry(node).or_default().push(key);
            }
        }
        for (node, keys) in by_node {
            self.unsubscribe_on(&node, &keys).await;
        }
        self.waiting.extend(barriers);
        if self.map == SlotMap::default() {
            // No map yet: the first reconcile places them.
            self.unplaced.extend(on);
            return;
        }
        self.place(on).await;
        self.report();
    }

    /// Barriers are answered once no key waits for a first subscription.
    fn answer_barriers(&mut self) {
        if self.unplaced.is_empty() {
            for done in self.waiting.drain(..) {
                let _ = done.send(true);
            }
        } else {
            self.waiting.retain(|w| !w.is_closed());
        }
    }

    async fn on_push(&mut self, id: u64, push: PushInfo) {
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                // A link already dropped says nothing any more.
                if !self.links.values().any(|l| l.id == id) {
                    return;
                }
                let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1)) else {
                    return;
                };
                let (Some(channel), Some(payload)) = (bulk(channel), bulk(payload)) else {
                    return;
                };
                let Ok(channel) = std::str::from_utf8(channel) else {
                    return;
                };
                let pending = self.pending.entry(id).or_default();
                self.relay.relay(pending, channel, payload).await;
            }
            PushKind::SUnsubscribe => {
                let (Some(node), Some(channel)) =
                    (self.node_of(id), push.data.first().and_then(bulk))
                else {
                    return;
                };
                let channel = String::from_utf8_lossy(channel);
                let key = self
                    .relay
                    .retention
                    .keys()
                    .key_of_id_channel(&channel)
                    .unwrap_or_else(|| channel.into_owned());
                // A key still placed here was dropped by the server: its slot moved.
                if self.placed.get(key.as_str()) == Some(&node) {
                    let key: Arc<str> = self
                        .placed
                        .remove_entry(key.as_str())
                        .map(|(k, _)| k)
                        .unwrap_or_else(|| Arc::from(key.as_str()));
                    if let Some(link) = self.links.get_mut(&node) {
                        link.keys = link.keys.saturating_sub(1);
                    }
                    debug!("redis: {node} dropped the subscription of {key} (slot moved)");
                    self.displaced.insert(key, Reason::Moved);
                }
            }
            PushKind::Disconnection => {
                if let Some(node) = self.node_of(id) {
                    self.drop_link(&node, Reason::Failover, true);
                }
            }
            _ => {}
        }
    }

    /// The node of the live link `id`.
    fn node_of(&self, id: u64) -> Option<String> {
        self.links
            .iter()
            .find(|(_, l)| l.id == id)
            .map(|(n, _)| n.clone())
    }

    /// Every probe tick: each link must answer `PING`, and the slot map must be what
    /// the links assume (a slot migration whose notice was missed shows here). Returns
    /// whether the cluster answered.
    async fn probe(&mut self) -> bool {
        let wait = self.settings.probe_interval;
        let links: Vec<(String, MultiplexedConnection)> = self
            .links
            .iter()
            .map(|(n, l)| (n.clone(), l.conn.clone()))
            .collect();
        let answers = join_all(links.into_iter().map(|(node, mut conn)| async move {
            let ping = redis::cmd("PING");
            let answered = timeout(wait, ping.query_async::<()>(&mut conn)).await;
            (node, matches!(answered, Ok(Ok(()))))
        }))
        .await;
        for (node, alive) in answers {
            if !alive {
                self.drop_link(&node, Reason::Failover, true);
            }
        }
        match self.read_map().await {
            Ok(map) => {
                for (key, node) in &self.placed {
                    if map.owner(slot(key.as_bytes())) != Some(node.as_str()) {
                        self.displaced.entry(key.clone()).or_insert(Reason::Moved);
                    }
                }
                true
            }
            Err(e) => {
                self.link
                    .set(Err(format!("redis cluster unavailable: {e}")));
                false
            }
        }
    }
}

async fn slots_of(conn: &mut MultiplexedConnection) -> Result<SlotMap, String> {
    let reply: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    SlotMap::from_reply(&reply).ok_or_else(|| "unexpected CLUSTER SLOTS reply".into())
}

fn bulk(value: &redis::Value) -> Option<&[u8]> {
    match value {
        redis::Value::BulkString(b) => Some(b),
        _ => None,
    }
}
