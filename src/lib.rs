//! wsrelay: a WebSocket gateway that relays Redis publications to browsers, wire
//! compatible with django-websocket-redis (ws4redis).
//!
//! # Layout
//!
//! - [`config`]: settings (defaults < TOML file < `WSRELAY__*` environment).
//! - [`channel`]: facilities, audiences, query flags and the Redis keys they make;
//!   [`facility`]: the `[[facility]]` rules (history, slow consumers).
//! - [`history`]: message ids, per-key history, resume, and the `wsrelay.v1` envelope.
//! - [`identity`]: who a socket belongs to (session key, user, groups), before the upgrade:
//!   an identity record, Django's own sessions and database (`identity::django`: its
//!   signing, session formats, and the read-only database on a thread of its own), an
//!   HTTP callback, or a signed token.
//! - [`policy`]: which flags each socket may use, `Origin`, per-address and socket limits.
//! - [`authorize`]: the authorization callback: the web application narrows or refuses
//!   each socket's flags, whatever the identity source.
//! - [`webapp`]: what the identity and authorization callbacks share: the request to
//!   the web application, the cache of its answers, its refusal text.
//! - [`server`]: the listener: HTTP/1 in actix-http, and the upgrade hook where a
//!   WebSocket leaves it.
//! - [`handshake`]: the WebSocket handshake, decided on the request head.
//! - [`http`]: the HTTP routes (`/health`, `/ready`, `/metrics`, `POST /api/publish`);
//!   [`assets`]: the browser helper (`/wsrelay.js`), the demo page and its publish
//!   route (`POST /demo/publish`).
//! - [`ws`]: RFC 6455 framing and the socket's stream.
//! - [`conn`]: one task per socket: its loop, its timers, its close; the close codes.
//! - [`socket`]: what a socket's task and its worker share; [`outbox`]: its queue of
//!   frames, bounded in bytes.
//! - [`worker`]: one per worker thread: its sockets' fan-out and timing [`wheel`].
//! - [`registry`]: key → workers, and the ordered log of subscription changes.
//! - [`broker`]: Redis (one Redis, Sentinel's master, or a Redis Cluster: one command
//!   side, and one pub/sub link per process, or per master with sharded pub/sub) or
//!   the embedded in-memory broker.
//! - [`publisher`]: [`RedisPublisher`], for Rust web applications that publish.
//! - [`ratelog`]: log lines rate-limited per reason (refused sockets, mistyped flags).
//! - [`metrics`]: Prometheus metrics at `/metrics`, summarised by `/health`.
//! - [`shutdown`], [`notify`]: the stop signal; readiness notifications to systemd.
//! - [`secret`]: secrets in the configuration (never logged; inline or from a file);
//!   [`ttl_cache`]: the bounded, expiring map of reused answers (callbacks, database).
//!
//! # Data path
//!
//! ```text
//! Redis ──(pub/sub: one link per process, ──► broker::redis::Subscriber (classic),
//!   or one per master of a sharded cluster)     or sharded::ShardedSubscriber
//!   keys, and the id channels of keys           relay::Relay pairs each history id with
//!   with history                                its payload; after a lost link or a moved
//!                                               key, replays what it missed
//!                                               (history::CatchUp)
//!                                                       │
//!                                                       ▼
//!                                          broker::Inlet (max_publication_size,
//!                                          heartbeat filter)
//!                                                       │ key, payload, id
//!                                                       ▼
//!                              Registry::dispatch: ids already relayed dropped;
//!                              encoded once as a frame (Bytes), the envelope on
//!                              first need, handed to each worker with a socket on
//!                              the key
//!                                                       │ one inbox per worker thread
//!                                                       ▼
//!                              Worker: key → its sockets; the frame wrapped once in
//!                              an Rc and queued in each socket's Outbox (bounded, no
//!                              atomics per socket), then one vectored write per
//!                              socket per batch
//!                                                       │ kernel buffer full?
//!                                                       ▼
//!                              socket task waits for room, answers the client,
//!                              keeps the timers (woken by the worker's wheel)
//! ```

pub mod assets;
pub mod authorize;
pub mod broker;
pub mod channel;
pub mod config;
pub mod conn;
pub mod event_stream;
pub mod facility;
pub mod handshake;
pub mod history;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod policy;
pub mod poll;
pub mod publisher;
pub mod ratelog;
pub mod registry;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod ttl_cache;
pub mod webapp;
pub mod wheel;
pub mod worker;
pub mod ws;

use std::future::Future;
use std::io;
use std::sync::Arc;

use actix_web::web;
use log::{info, warn};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authorize::Authorizer;
use crate::broker::redis::{LinkSettings, SubscriberTask};
use crate::broker::{Broker, Inlet, MemoryBroker, RedisBroker};
use crate::channel::KeySpace;
use crate::config::{Config, IdentitySource};
use crate::facility::Facilities;
use crate::handshake::Handshaker;
use crate::history::Retention;
use crate::http::HttpState;
use crate::identity::callback::CallbackResolver;
use crate::identity::django::DjangoResolver;
use crate::identity::record::RecordResolver;
use crate::identity::token::TokenResolver;
use crate::identity::IdentityResolver;
use crate::metrics::Metrics;
use crate::policy::SocketLimit;
use crate::ratelog::RateLog;
use crate::registry::Registry;
use crate::worker::{Relay, SocketConfig};

pub use crate::publisher::RedisPublisher;

/// Connections the kernel queues for accepting (Linux caps it at `net.core.somaxconn`):
/// a storm of reconnecting browsers must not find the queue full, or each retries a
/// second later.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Descriptors kept for everything but sockets (listener, Redis, logs, HTTP clients).
const RESERVED_DESCRIPTORS: usize = 128;

/// The parts of one gateway process, built from its configuration. Nothing connects
/// yet, so a gateway starts even when Redis is down.
struct Parts {
    config: Config,
    relay: Arc<Relay>,
    handshaker: Arc<Handshaker>,
    http: web::Data<HttpState>,
    assets: web::Data<assets::Assets>,
    /// The Redis subscriber task, to spawn (none with the embedded broker).
    subscriber: Option<SubscriberTask>,
    /// Cancelled after the drain: stops the Redis subscriber.
    broker_stop: CancellationToken,
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

/// `max_sockets`, lowered to what the open-files limit allows, so that the refusal a
/// client gets is the documented 503 and not a failed accept.
fn effective_max_sockets(configured: usize) -> usize {
    let Some(limit) = descriptor_limit() else {
        return configured;
    };
    // Left for HTTP connections, Redis, the listener and files: a sixteenth, and more.
    let allowed = limit
        .saturating_sub(RESERVED_DESCRIPTORS + limit / 16)
        .max(1);
    if configured > allowed {
        warn!(
            "max_sockets lowered from {configured} to {allowed}: the open-files limit is {limit} \
             (raise LimitNOFILE / ulimit -n for more)"
        );
        return allowed;
    }
    configured
}

/// Binds `addr` for [`run`], with a listen queue of [`LISTEN_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The process's open-files limit (soft), if it can be read and is finite.
fn descriptor_limit() -> Option<usize> {
    let limit = open_files()?;
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as usize)
}

fn open_files() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (read == 0).then_some(limit)
}

/// Raises the open-files limit to its hard limit (as nginx's `worker_rlimit_nofile`
/// and Go's runtime do): every socket is a descriptor. Returns the limit in force.
pub fn raise_descriptor_limit() -> Option<usize> {
    let mut limit = open_files()?;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some(limit.rlim_cur as usize)
}

impl Parts {
    fn build(config: Config) -> io::Result<Parts> {
        let keys = KeySpace::new(config.redis.prefix.as_deref());
        let shutdown = CancellationToken::new();
        // The broker keeps relaying during the drain; it stops after the last socket.
        let broker_stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let topology = config.topology();
        let (changes, changes_rx) = match topology {
            Some(_) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let registry = Arc::new(Registry::new(changes, metrics.clone()));
        let inlet = Arc::new(Inlet::new(
            registry.clone(),
            config.heartbeat.as_deref(),
            config.max_publication_size,
        ));
        let facilities = Arc::new(Facilities::new(config.facility.clone()));
        let retention = Retention::new(facilities.clone(), keys.clone());
        let (broker, subscriber) = match (topology, changes_rx) {
            (Some(topology), Some(rx)) => {
                let link = LinkSettings {
                    keys: keys.clone(),
                    reconnect_max: config.reconnect_max(),
                    probe_interval: config.probe_interval(),
                };
                let (broker, subscriber) =
                    RedisBroker::new(topology, link, retention, inlet, rx, broker_stop.clone())
                        .map_err(io::Error::other)?;
                (Broker::Redis(broker), Some(subscriber))
            }
            _ => (Broker::Memory(MemoryBroker::new(inlet, retention)), None),
        };
        let broker = Arc::new(broker);
        let resolver = build_resolver(&config, &broker, &keys, &metrics)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let authorizer = match &config.policy.callback.url {
            Some(_) => Some(
                Authorizer::new(&config.policy.callback)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let handshaker = Arc::new(Handshaker {
            websocket_url: config.websocket_url.clone(),
            sse_url: config.sse_url.clone(),
            poll_url: config.poll_url.clone(),
            pub_url: config.pub_url.clone(),
            policy: config.effective_policy(),
            keys: keys.clone(),
            facilities,
            resolver,
            authorizer,
            per_ip: Arc::default(),
            sockets: SocketLimit::new(effective_max_sockets(config.max_sockets)),
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
            refusals: RateLog::new("wsrelay::handshake", "refused for"),
            mistyped_flags: RateLog::new("wsrelay::handshake", "sockets with"),
        });
        let relay = Arc::new(Relay {
            config: SocketConfig::new(&config),
            broker: broker.clone(),
            registry,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            tracker: TaskTracker::new(),
        });
        let http = web::Data::new(HttpState {
            broker,
            metrics,
            keys,
            handshaker: handshaker.clone(),
            publish_token: config.publish_token.clone(),
            max_message_size: config.max_message_size,
            expire: config.redis.expire,
            shutdown,
        });
        let assets = web::Data::new(assets::Assets::new(config.demo_enabled()));
        Ok(Parts {
            config,
            relay,
            handshaker,
            http,
            assets,
            subscriber,
            broker_stop,
        })
    }
}

/// Checks what the settings alone cannot (secret files, URLs, identity sources) by
/// building the gateway, then connects to the stores the identity source reads and
/// returns one line for each saying what it found (a store that cannot be reached is
/// reported, not an error: the gateway starts without it and retries). Must run inside
/// a tokio runtime.
pub async fn check(config: &Config) -> io::Result<Vec<String>> {
    let parts = Parts::build(config.clone())?;
    Ok(parts.handshaker.resolver.probe().await)
}

/// Logs the summaries of refusals and mistyped flags not logged (see [`ratelog`]) once
/// their minute is over, until `stop`.
async fn summarize_refusals(handshaker: Arc<Handshaker>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ratelog::WINDOW / 6);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                handshaker.refusals.flush_to_log();
                handshaker.mistyped_flags.flush_to_log();
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Serves on `listener` until `stop` completes, then closes every socket with 1001
/// (spread over `drain_window`, bounded by `shutdown_timeout`) and returns. Runs on
/// any tokio runtime; the worker threads are its own.
pub async fn run(
    config: Config,
    listener: std::net::TcpListener,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let Parts {
        config,
        relay,
        handshaker,
        http,
        assets,
        subscriber,
        broker_stop,
    } = Parts::build(config)?;
    if let Some(subscriber) = subscriber {
        tokio::spawn(subscriber.run());
    }
    tokio::spawn(summarize_refusals(handshaker.clone(), broker_stop.clone()));
    let addr = listener.local_addr()?;
    let server = server::Listener {
        relay: relay.clone(),
        handshaker,
        http,
        assets,
        workers: config.workers,
        handshake_timeout: config.handshake_timeout(),
        request_timeout: config.request_timeout(),
        keep_alive: config.http_keep_alive(),
        shutdown_timeout: config.shutdown_timeout(),
        lingering: Arc::default(),
    }
    .start(listener)?;
    let handle = server.handle();
    let mut serving = tokio::spawn(server);
    info!("listening on {addr} ({})", config.summary());
    notify::notify("READY=1");

    tokio::select! {
        _ = stop => {
            let window = config.drain_window();
            info!("stop requested: draining, sockets close over {window:?}");
        }
        result = &mut serving => {
            warn!("HTTP server ended on its own");
            return result.map_err(io::Error::other)?;
        }
    }
    // Drain: `/ready` answers 503 and new handshakes get 503 (the listener stays open so
    // load balancers can read that), existing sockets close with 1001 spread over the
    // drain window; then the listener stops.
    notify::notify("STOPPING=1");
    relay.shutdown.cancel();
    relay.tracker.close();
    let grace = config.drain_window() + config.shutdown_timeout() + config.close_timeout();
    if tokio::time::timeout(grace, relay.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "{} sockets still open after {grace:?}; dropping them",
            relay.tracker.len()
        );
    }
    broker_stop.cancel();
    handle.pause().await;
    handle.stop(true).await;
    let _ = serving.await;
    info!("stopped");
    Ok(())
}
