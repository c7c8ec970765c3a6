//! End-to-end tests of the gateway binary against a real `redis-server`.
//!
//! `wire` holds the behaviour both brokers must share; each of its tests runs twice,
//! once on Redis and once on the embedded broker. `on_redis` covers what only exists
//! with Redis (key names, identity records, outages, the single subscriber connection);
//! `http_api` the handshake answers, the publish API and the command line; `identity`
//! the identity sources (Django, HTTP callback, token); `databases` and `django_site` the
//! PostgreSQL and MariaDB servers and the real Django site they use; `access` the access policy,
//! `Origin` and the limits; `authorize` the authorization callback under each identity
//! source; `operations` systemd units, readiness, metrics and drains;
//! `nginx` the shipped nginx site in front of one and two gateways; `demo` the demo
//! page's publish route; `redis_topology` the Redis Cluster and Sentinel sets the tests
//! start, and `scaling` the gateway on them (sharded and classic pub/sub, failovers,
//! resharding, two gateways on one cluster).

mod access;
mod authorize;
mod browser;
mod conflation;
mod conformance;
mod databases;
mod demo;
mod django_db;
mod django_site;
mod harness;
mod history;
mod http_api;
mod identity;
mod limits;
mod nginx;
mod on_redis;
mod operations;
mod outage;
mod python;
mod redis_topology;
mod scaling;
mod transports;
mod wire;

use harness::{Gateway, RedisServer};

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Redis,
    Memory,
}

/// An audience to publish to, as a test names it.
pub enum To<'a> {
    Broadcast,
    User(&'a str),
    Session(&'a str),
}

/// A gateway on one backend (and its Redis, when it has one).
pub struct Setup {
    pub gw: Gateway,
    pub redis: Option<RedisServer>,
}

impl Setup {
    pub async fn new(backend: Backend, settings: &[(&str, &str)]) -> Setup {
        let redis = match backend {
            Backend::Redis => Some(RedisServer::start().await),
            Backend::Memory => None,
        };
        let mut all: Vec<(&str, &str)> = settings.to_vec();
        let url = redis.as_ref().map(|r| r.url());
        if let Some(url) = &url {
            all.push(("redis__url", url));
        }
        let gw = Gateway::start(&all);
        if redis.is_some() {
            gw.wait_health(200).await;
        }
        Setup { gw, redis }
    }

    pub fn url(&self, path: &str) -> String {
        self.gw.ws_url(path)
    }

    /// Publishes `message` to one audience of `facility`: on Redis as ws4redis's Python
    /// publisher does (PUBLISH + SETEX on the documented key, no prefix), on the
    /// embedded broker through the HTTP API.
    pub async fn publish(&self, facility: &str, to: To<'_>, message: &str, expire: u64) {
        match &self.redis {
            Some(redis) => {
                let key = match to {
                    To::Broadcast => format!("broadcast:{facility}"),
                    To::User(u) => format!("user:{u}:{facility}"),
                    To::Session(s) => format!("session:{s}:{facility}"),
                };
                redis.publish(&key, message.as_bytes(), expire).await;
            }
            None => {
                let audiences = match to {
                    To::Broadcast => serde_json::json!({ "broadcast": true }),
                    To::User(u) => serde_json::json!({ "users": [u] }),
                    To::Session(s) => serde_json::json!({ "sessions": [s] }),
                };
                let body = serde_json::json!({
                    "facility": facility, "audiences": audiences, "message": message, "expire": expire,
                });
                let reply = self.gw.api_publish(body).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
            }
        }
    }
}

/// Runs each listed `async fn(Backend)` once per backend, as `name::redis` and
/// `name::memory`.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(crate::Backend::Redis).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(crate::Backend::Memory).await
            }
        }
    )*};
}
pub(crate) use on_both_brokers;
