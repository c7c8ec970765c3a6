//! wsrelay: a WebSocket gateway that relays Redis publications to browsers, wire
//! compatible with django-websocket-redis (ws4redis).
//!
//! # Layout
//!
//! - [`assets`]: the browser helper (`/wsrelay.js`) and the demo page, embedded.
//! - [`config`]: settings (defaults < TOML file < `WSRELAY__*` environment).
//! - [`channel`]: facilities, audiences, query flags and the Redis keys they make.
//! - [`identity`]: who a socket belongs to (session key, user, groups), before the upgrade:
//!   an identity record, Django's own sessions, an HTTP callback, or a signed token.
//! - [`policy`]: which flags each socket may use, `Origin`, per-address and size limits.
//! - [`http`]: the handshake, `/health` and `POST /api/publish`.
//! - [`conn`]: one task per socket; close codes.
//! - [`outbox`]: the per-socket queue, bounded in bytes.
//! - [`registry`]: key → local sockets, and the ordered log of subscription changes.
//! - [`broker`]: Redis (one pub/sub + one command connection per process) or the
//!   embedded in-memory broker.
//! - [`publisher`]: [`RedisPublisher`], for Rust web applications that publish.
//! - [`shutdown`]: the stop signal.
//! - [`metrics`]: Prometheus metrics at `/metrics`, summarised by `/health`.
//! - [`notify`]: readiness and stop notifications to systemd.
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

pub mod assets;
pub mod broker;
pub mod channel;
pub mod config;
pub mod conn;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod policy;
pub mod publisher;
pub mod registry;
pub mod shutdown;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use log::{info, warn};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, MemoryBroker, RedisBroker};
use crate::channel::KeySpace;
use crate::config::{Config, IdentitySource};
use crate::identity::callback::CallbackResolver;
use crate::identity::django::DjangoResolver;
use crate::identity::record::RecordResolver;
use crate::identity::token::TokenResolver;
use crate::identity::IdentityResolver;
use crate::metrics::Metrics;
use crate::policy::IpLimiter;
use crate::registry::Registry;

pub use crate::publisher::RedisPublisher;

/// Everything the handlers and connection tasks share; one per process.
pub struct Gateway {
    pub config: Config,
    /// The access policy in force (`policy`, plus the demo's rule when it is on).
    pub policy: policy::PolicyConfig,
    pub keys: KeySpace,
    pub registry: Arc<Registry>,
    pub broker: Arc<Broker>,
    pub resolver: Box<dyn IdentityResolver>,
    /// Cancelled when the gateway stops: every connection closes with 1001.
    pub shutdown: CancellationToken,
    /// Cancelled after the drain: stops the Redis subscriber.
    pub broker_stop: CancellationToken,
    /// Tracks connection tasks, so a stop can wait for them (bounded).
    pub tracker: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// The embedded browser helper and demo page.
    pub assets: assets::Assets,
    /// Open sockets per client address.
    pub per_ip: Arc<IpLimiter>,
}

/// Builds the resolver `identity.source` names; an error names the setting.
fn build_resolver(
    config: &Config,
    broker: &Arc<Broker>,
    keys: &KeySpace,
    metrics: &Arc<Metrics>,
) -> Result<Box<dyn IdentityResolver>, String> {
    let identity = &config.identity;
    let cookie = config.session.cookie.clone();
    let callback = || CallbackResolver::new(identity.callback.clone(), metrics.clone());
    Ok(match identity.source {
        IdentitySource::Record => {
            Box::new(RecordResolver::new(broker.clone(), keys.clone(), cookie))
        }
        IdentitySource::Callback => Box::new(callback()?),
        IdentitySource::Token => Box::new(TokenResolver::new(identity.token.clone())?),
        IdentitySource::Django => {
            let fallback = identity.callback.url.is_some().then(callback).transpose()?;
            Box::new(DjangoResolver::new(
                identity.django.clone(),
                config.redis.url.as_deref(),
                cookie,
                metrics.clone(),
                fallback,
            )?)
        }
    })
}

impl Gateway {
    /// Builds the gateway and, with Redis, the subscriber task to spawn.
    pub fn new(config: Config) -> std::io::Result<(Gateway, Option<broker::redis::Subscriber>)> {
        let keys = KeySpace::new(config.redis.prefix.as_deref());
        let shutdown = CancellationToken::new();
        // The broker keeps relaying during the drain; it stops after the last socket.
        let broker_stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let (registry, broker, subscriber) = match &config.redis.url {
            Some(url) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let registry = Arc::new(Registry::new(Some(tx), metrics.clone()));
                let (broker, subscriber) =
                    RedisBroker::new(&config, url, registry.clone(), rx, broker_stop.clone())
                        .map_err(std::io::Error::other)?;
                (registry, Broker::Redis(broker), Some(subscriber))
            }
            None => {
                let registry = Arc::new(Registry::new(None, metrics.clone()));
                let broker = MemoryBroker::new(registry.clone(), config.heartbeat.clone());
                (registry, Broker::Memory(broker), None)
            }
        };
        let broker = Arc::new(broker);
        let resolver = build_resolver(&config, &broker, &keys, &metrics)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let gateway = Gateway {
            policy: config.effective_policy(),
            config,
            keys,
            registry,
            broker,
            resolver,
            shutdown,
            broker_stop,
            tracker: TaskTracker::new(),
            metrics,
            assets: assets::Assets::default(),
            per_ip: Arc::default(),
        };
        Ok((gateway, subscriber))
    }

    /// Counters for `/health`.
    pub fn stats_json(&self) -> serde_json::Value {
        let m = &self.metrics;
        serde_json::json!({
            "status": "ok",
            "broker": self.broker.kind(),
            "sockets": m.sockets.get(),
            "delivered": m.frames_delivered.get(),
            "slow_consumer_closes": m.slow_consumer_closes.get(),
            "counters": m.counters_json(),
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
            // The identity callback's HTTP client; one per worker thread.
            .app_data(awc::Client::default())
            .configure(|cfg| http::configure(cfg, &url, max))
            .configure(assets::configure)
    })
    .disable_signals()
    .client_request_timeout(Duration::from_secs_f64(config.policy.handshake_timeout))
    .shutdown_timeout(config.shutdown_timeout().as_secs().max(1));
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    let addr = listener.local_addr()?;
    let server = server.listen(listener)?.run();
    let handle = server.handle();
    let mut serving = actix_web::rt::spawn(server);
    info!("listening on {addr} ({})", gateway.config.summary());
    notify::notify("READY=1");

    tokio::select! {
        _ = stop => {
            let window = gateway.config.drain_window();
            info!("stop requested: draining, sockets close over {window:?}");
        }
        result = &mut serving => {
            warn!("HTTP server ended on its own");
            return result.map_err(std::io::Error::other)?;
        }
    }
    // Drain: `/ready` answers 503 and new handshakes get 503 (the listener stays open so
    // load balancers can read that), existing sockets close with 1001 spread over the
    // drain window; then the listener stops.
    notify::notify("STOPPING=1");
    gateway.shutdown.cancel();
    gateway.tracker.close();
    let grace = gateway.config.drain_window() + gateway.config.shutdown_timeout();
    if tokio::time::timeout(grace, gateway.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "{} sockets still open after {grace:?}; dropping them",
            gateway.tracker.len()
        );
    }
    gateway.broker_stop.cancel();
    handle.pause().await;
    handle.stop(true).await;
    let _ = serving.await;
    info!("stopped");
    Ok(())
}
