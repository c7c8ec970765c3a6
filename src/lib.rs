//! wsrelay: a WebSocket gateway that relays Redis publications to browsers, wire
//! compatible with django-websocket-redis (ws4redis).
//!
//! # Layout
//!
//! - [`config`]: settings (defaults < TOML file < `WSRELAY__*` environment).
//! - [`channel`]: facilities, audiences, query flags and the Redis keys they make.
//! - [`identity`]: who a socket belongs to (session key, user, groups), before the upgrade.
//! - [`http`]: the handshake, `/health` and `POST /api/publish`.
//! - [`conn`]: one task per socket; close codes.
//! - [`outbox`]: the per-socket queue, bounded in bytes.
//! - [`registry`]: key → local sockets, and the ordered log of subscription changes.
//! - [`broker`]: Redis (one pub/sub + one command connection per process) or the
//!   embedded in-memory broker.
//! - [`publisher`]: [`RedisPublisher`], for Rust web applications that publish.
//! - [`shutdown`]: the stop signal.
//!
//! # Data path
//!
//! ```text
//! Redis ──(one pub/sub connection)──► broker::redis::Subscriber
//!                                          │ key, payload (typed once: text or binary)
//!                                          ▼
//!                                 Registry::dispatch (never awaits)
//!                                          │ shared bytes, no copy per socket
//!                                          ▼
//!                                 Outbox (bounded) ──► conn task ──► socket
//! ```

pub mod broker;
pub mod channel;
pub mod config;
pub mod conn;
pub mod http;
pub mod identity;
pub mod outbox;
pub mod publisher;
pub mod registry;
pub mod shutdown;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use log::{info, warn};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, MemoryBroker, RedisBroker};
use crate::channel::KeySpace;
use crate::config::Config;
use crate::identity::{IdentityResolver, RecordResolver};
use crate::registry::Registry;

pub use crate::publisher::RedisPublisher;

/// Everything the handlers and connection tasks share; one per process.
pub struct Gateway {
    pub config: Config,
    pub keys: KeySpace,
    pub registry: Arc<Registry>,
    pub broker: Arc<Broker>,
    pub resolver: Box<dyn IdentityResolver>,
    /// Cancelled when the gateway stops: every connection closes with 1001.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks, so a stop can wait for them (bounded).
    pub tracker: TaskTracker,
    /// Open sockets.
    pub sockets: AtomicU64,
    /// Sockets closed because their outbox overflowed.
    pub slow_closes: AtomicU64,
}

impl Gateway {
    /// Builds the gateway and, with Redis, the subscriber task to spawn.
    fn new(config: Config) -> std::io::Result<(Gateway, Option<broker::redis::Subscriber>)> {
        let keys = KeySpace::new(config.redis.prefix.as_deref());
        let shutdown = CancellationToken::new();
        let (registry, broker, subscriber) = match &config.redis.url {
            Some(url) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let registry = Arc::new(Registry::new(Some(tx)));
                let (broker, subscriber) =
                    RedisBroker::new(&config, url, registry.clone(), rx, shutdown.clone())
                        .map_err(std::io::Error::other)?;
                (registry, Broker::Redis(broker), Some(subscriber))
            }
            None => {
                let registry = Arc::new(Registry::new(None));
                let broker = MemoryBroker::new(registry.clone(), config.heartbeat.clone());
                (registry, Broker::Memory(broker), None)
            }
        };
        let broker = Arc::new(broker);
        let resolver = Box::new(RecordResolver::new(
            broker.clone(),
            keys.clone(),
            config.session.cookie.clone(),
        ));
        let gateway = Gateway {
            config,
            keys,
            registry,
            broker,
            resolver,
            shutdown,
            tracker: TaskTracker::new(),
            sockets: AtomicU64::new(0),
            slow_closes: AtomicU64::new(0),
        };
        Ok((gateway, subscriber))
    }

    /// Counters for `/health`.
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "status": "ok",
            "broker": self.broker.kind(),
            "sockets": self.sockets.load(Ordering::Relaxed),
            "delivered": self.registry.stats.delivered.load(Ordering::Relaxed),
            "slow_consumer_closes": self.slow_closes.load(Ordering::Relaxed),
        })
    }
}

/// Serves on `listener` until `stop` completes, then closes every socket with 1001
/// (bounded by `shutdown_timeout`) and returns. Must run inside an actix system.
pub async fn run(
    config: Config,
    listener: std::net::TcpListener,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (gateway, subscriber) = Gateway::new(config)?;
    let gateway = web::Data::new(gateway);
    if let Some(subscriber) = subscriber {
        actix_web::rt::spawn(subscriber.run());
    }
    let config = &gateway.config;
    let (url, max) = (config.websocket_url.clone(), config.max_message_size);
    let data = gateway.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(|cfg| http::configure(cfg, &url, max))
    })
    .disable_signals()
    .shutdown_timeout(config.shutdown_timeout().as_secs().max(1));
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    let addr = listener.local_addr()?;
    let server = server.listen(listener)?.run();
    let handle = server.handle();
    let mut serving = actix_web::rt::spawn(server);
    info!("listening on {addr} ({})", gateway.config.summary());

    tokio::select! {
        _ = stop => info!("stop requested: closing sockets"),
        result = &mut serving => {
            warn!("HTTP server ended on its own");
            return result.map_err(std::io::Error::other)?;
        }
    }
    handle.pause().await;
    gateway.shutdown.cancel();
    gateway.tracker.close();
    let grace = gateway.config.shutdown_timeout();
    if tokio::time::timeout(grace, gateway.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "{} sockets still open after {grace:?}; dropping them",
            gateway.tracker.len()
        );
    }
    handle.stop(true).await;
    let _ = serving.await;
    info!("stopped");
    Ok(())
}
