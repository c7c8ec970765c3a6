//! The message broker: where publications come from and where last messages are kept.
//!
//! Two implementations sit behind [`Broker`]:
//! - [`RedisBroker`]: production. Many gateway processes and any publisher share one
//!   Redis; each process holds one pub/sub connection (owned by [`redis::Subscriber`])
//!   and one multiplexed command connection, whatever the number of sockets.
//! - [`MemoryBroker`]: one process, no Redis. Publications come from clients and the
//!   HTTP API of this process only.
//!
//! Both hand every publication to the registry through one [`Inlet`], so the filtering
//! and the bounds on publications are the same for both.

mod memory;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use log::warn;
use tokio::time::Instant;

pub use self::memory::MemoryBroker;
pub use self::redis::RedisBroker;
use crate::history::{CatchUp, Retention, StreamId};
use crate::registry::Registry;

/// How often an oversized publication on one key is reported in the log.
const OVERSIZE_WARNING_EVERY: Duration = Duration::from_secs(60);
/// Keys remembered for those warnings; beyond, the memory of them starts over.
const OVERSIZE_KEYS: usize = 1024;

/// A broker operation that could not be done; sockets stay open, the caller decides.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

pub enum Broker {
    Redis(RedisBroker),
    Memory(MemoryBroker),
}

impl Broker {
    /// Publishes `payload` on every key, and stores it as the key's last message for
    /// `expire` seconds when `expire > 0`; on a facility with history it is also
    /// appended to the key's history and gets an id. On Redis the whole batch is one
    /// MULTI/EXEC round trip, so a reader never sees a stored value older than a
    /// publication. Returns each key's id (`None`: no history).
    pub async fn publish(
        &self,
        keys: &[Arc<str>],
        payload: &Bytes,
        expire: u64,
    ) -> Result<Vec<Option<StreamId>>, BrokerError> {
        match self {
            Broker::Redis(b) => b.publish(keys, payload, expire).await,
            Broker::Memory(b) => Ok(b.publish(keys, payload, expire).await),
        }
    }

    /// The stored value of each key (`None` where absent or expired), in order.
    pub async fn fetch(&self, keys: &[Arc<str>]) -> Result<Vec<Option<Bytes>>, BrokerError> {
        match self {
            Broker::Redis(b) => b.fetch(keys).await,
            Broker::Memory(b) => Ok(b.fetch(keys)),
        }
    }

    /// What each key gives a starting socket: its stored message, or, with an id to
    /// resume from (`after`, in the order of `keys`), what its history holds after it:
    /// at most `budget` payload bytes per key, else a reset (see [`CatchUp`]).
    pub async fn catch_up(
        &self,
        keys: &[Arc<str>],
        after: &[Option<StreamId>],
        budget: usize,
    ) -> Result<Vec<CatchUp>, BrokerError> {
        match self {
            Broker::Redis(b) => b.catch_up(keys, after, budget).await,
            Broker::Memory(b) => Ok(b.catch_up(keys, after, budget)),
        }
    }

    /// Which keys keep history.
    pub fn retention(&self) -> &Retention {
        match self {
            Broker::Redis(b) => b.retention(),
            Broker::Memory(b) => b.retention(),
        }
    }

    /// `Ok` while publications flow; otherwise why not.
    pub fn health(&self) -> Result<(), String> {
        match self {
            Broker::Redis(b) => b.health(),
            Broker::Memory(_) => Ok(()),
        }
    }

    /// The Redis nodes holding this process's pub/sub links (none on the embedded
    /// broker).
    pub fn nodes(&self) -> Vec<redis::NodeStatus> {
        match self {
            Broker::Redis(b) => b.nodes(),
            Broker::Memory(_) => Vec::new(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Redis(_) => "redis",
            Broker::Memory(_) => "memory",
        }
    }
}

/// Where publications enter the gateway, from either broker.
pub struct Inlet {
    registry: Arc<Registry>,
    /// The ws4redis heartbeat string: never relayed, whoever published it.
    heartbeat: Option<Bytes>,
    max_publication_size: usize,
    /// When an oversized publication was last reported, per key.
    oversize_warned: Mutex<HashMap<String, Instant>>,
}

impl Inlet {
    pub fn new(
        registry: Arc<Registry>,
        heartbeat: Option<&str>,
        max_publication_size: usize,
    ) -> Self {
        Inlet {
            registry,
            heartbeat: heartbeat.map(|h| Bytes::copy_from_slice(h.as_bytes())),
            max_publication_size,
            oversize_warned: Mutex::default(),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Relays one publication (with its id, on a key with history) to the sockets of
    /// `key`, on every worker. A publication over `max_publication_size` is dropped
    /// here, counted, and reported once per key per minute.
    pub async fn deliver(&self, key: &str, payload: &[u8], id: Option<StreamId>) {
        let received = Instant::now();
        let metrics = &self.registry.metrics;
        metrics.broker_messages.inc();
        if self.heartbeat.as_deref() == Some(payload) {
            return;
        }
        if payload.len() > self.max_publication_size {
            metrics
                .publications_dropped
                .with_label_values(&["too_large"])
                .inc();
            self.warn_oversize(key, payload.len());
            return;
        }
        self.registry.dispatch(key, payload, id, received).await;
    }

    fn warn_oversize(&self, key: &str, len: usize) {
        // unwrap: nothing panics while the map is locked.
        let mut warned = self.oversize_warned.lock().unwrap();
        if warned
            .get(key)
            .is_some_and(|at| at.elapsed() < OVERSIZE_WARNING_EVERY)
        {
            return;
        }
        if warned.len() >= OVERSIZE_KEYS {
            warned.clear();
        }
        warned.insert(key.to_string(), Instant::now());
        warn!(
            "publication on {key} dropped: {len} bytes, over max_publication_size ({}); \
             reported once a minute per key",
            self.max_publication_size
        );
    }
}
