//! The message broker: where publications come from and where last messages are kept.
//!
//! Two implementations sit behind [`Broker`]:
//! - [`RedisBroker`]: production. Many gateway processes and any publisher share one
//!   Redis; each process holds one pub/sub connection (owned by [`redis::Subscriber`])
//!   and one multiplexed command connection, whatever the number of sockets.
//! - [`MemoryBroker`]: one process, no Redis. Publications come from clients and the
//!   HTTP API of this process only.
//!
//! Both hand every publication to [`Registry::dispatch`] through [`deliver`], so the
//! filtering and typing of payloads is the same for both.

mod memory;
pub mod redis;

use std::sync::Arc;

use bytes::Bytes;

pub use self::memory::MemoryBroker;
pub use self::redis::RedisBroker;
use crate::outbox::Frame;
use crate::registry::Registry;

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
    /// `expire` seconds when `expire > 0`. On Redis the whole batch is one MULTI/EXEC
    /// round trip, so a reader never sees a stored value older than a publication.
    pub async fn publish(
        &self,
        keys: &[Arc<str>],
        payload: &Bytes,
        expire: u64,
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Redis(b) => b.publish(keys, payload, expire).await,
            Broker::Memory(b) => {
                b.publish(keys, payload, expire);
                Ok(())
            }
        }
    }

    /// The stored value of each key (`None` where absent or expired), in order.
    pub async fn fetch(&self, keys: &[Arc<str>]) -> Result<Vec<Option<Bytes>>, BrokerError> {
        match self {
            Broker::Redis(b) => b.fetch(keys).await,
            Broker::Memory(b) => Ok(b.fetch(keys)),
        }
    }

    /// `Ok` while publications flow; otherwise why not.
    pub fn health(&self) -> Result<(), String> {
        match self {
            Broker::Redis(b) => b.health(),
            Broker::Memory(_) => Ok(()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Redis(_) => "redis",
            Broker::Memory(_) => "memory",
        }
    }
}

/// Relays one publication to the local sockets of `key`. The ws4redis heartbeat string
/// is never relayed, whoever published it.
pub fn deliver(registry: &Registry, heartbeat: Option<&str>, key: &str, payload: Bytes) -> usize {
    let received = tokio::time::Instant::now();
    registry.metrics.broker_messages.inc();
    if heartbeat.is_some_and(|h| h.as_bytes() == payload) {
        return 0;
    }
    registry.dispatch(key, &Frame::from_payload(payload), received)
}
