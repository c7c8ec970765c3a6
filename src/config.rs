//! Settings: built-in defaults < TOML file (`--config PATH`) < environment.
//!
//! Environment variables are `WSRELAY__{KEY}` with `__` between sections, for example
//! `WSRELAY__LISTEN=0.0.0.0:8080` or `WSRELAY__REDIS__URL=redis://127.0.0.1:6379/0`.
//! Every setting, its default and its meaning is listed in the README; the defaults live
//! here as `DEFAULT_*` constants. [`Config::load`] fails with a message that names the
//! offending setting, so a bad configuration stops the process at start.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use crate::channel::DEFAULT_EXPIRE;
use crate::facility::FacilityRule;
use crate::identity::callback::CallbackConfig;
use crate::identity::django::DjangoConfig;
use crate::identity::token::TokenConfig;
use crate::policy::PolicyConfig;
pub use crate::secret::Secret;
use crate::webapp::{
    DEFAULT_CALLBACK_CACHE_SIZE, DEFAULT_CALLBACK_CACHE_TTL, DEFAULT_CALLBACK_TIMEOUT,
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// ws4redis's `WEBSOCKET_URL`.
pub const DEFAULT_WEBSOCKET_URL: &str = "/ws/";
/// Where Server-Sent Events streams, long-polls and publishing without a socket live.
pub const DEFAULT_SSE_URL: &str = "/sse/";
pub const DEFAULT_POLL_URL: &str = "/poll/";
pub const DEFAULT_PUB_URL: &str = "/pub/";
/// How long a long-poll waits for a message before it answers `[]`, in seconds.
pub const DEFAULT_POLL_TIMEOUT: f64 = 25.0;
/// How often the ws4redis heartbeat string is sent to an idle socket, in seconds.
pub const DEFAULT_HEARTBEAT_INTERVAL: f64 = 4.0;
/// WebSocket ping period, in seconds; 0 disables pings. Keep it below nginx's
/// `proxy_read_timeout` (60 s by default).
pub const DEFAULT_PING_INTERVAL: f64 = 30.0;
/// How long a peer may stay silent after a ping before it is closed, in seconds.
pub const DEFAULT_PING_TIMEOUT: f64 = 10.0;
/// Largest frame (or fragmented message) accepted from a client, in bytes.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Outbound bytes a socket may have pending before it is closed as a slow consumer.
/// Chosen from the load benchmark's slow-consumer scenario (see `benches/RESULTS.md`):
/// about a quarter second of a 1,000 × 4 KB/s broadcast.
pub const DEFAULT_QUEUE_BYTES: usize = 1024 * 1024;
/// Largest publication relayed to sockets; bigger ones are dropped (and counted) where
/// they enter the gateway, so no payload can cost memory per socket.
pub const DEFAULT_MAX_PUBLICATION_SIZE: usize = 1024 * 1024;
/// Sockets one gateway process holds at most; beyond, handshakes get 503.
pub const DEFAULT_MAX_SOCKETS: usize = 100_000;
/// How long a closing socket may take to flush its close frame and close, in seconds;
/// after that it is reset and its descriptor released.
pub const DEFAULT_CLOSE_TIMEOUT: f64 = 2.0;
/// Seconds an idle HTTP keep-alive connection stays open; 0 turns keep-alive off.
pub const DEFAULT_HTTP_KEEP_ALIVE: f64 = 5.0;
/// Longest expiry accepted for a stored message (ten years), in seconds.
pub const MAX_EXPIRE: u64 = 315_360_000;
/// Django's `SESSION_COOKIE_NAME`.
pub const DEFAULT_SESSION_COOKIE: &str = "sessionid";
/// Longest pause between two Redis reconnect attempts, in seconds.
pub const DEFAULT_RECONNECT_MAX: f64 = 5.0;
/// Period of the probe that detects a silently dead pub/sub connection, in seconds.
pub const DEFAULT_PROBE_INTERVAL: f64 = 5.0;
/// How long a stop may take to close every socket after the drain window, in seconds.
pub const DEFAULT_SHUTDOWN_TIMEOUT: f64 = 10.0;
/// Sockets are closed spread over this many seconds when the gateway stops.
pub const DEFAULT_DRAIN_WINDOW: f64 = 5.0;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub websocket_url: String,
    pub sse_url: String,
    pub poll_url: String,
    pub pub_url: String,
    pub poll_timeout: f64,
    /// Worker threads; 0 means one per CPU.
    pub workers: usize,
    pub heartbeat: Option<String>,
    pub heartbeat_interval: f64,
    pub ping_interval: f64,
    pub ping_timeout: f64,
    pub max_message_size: usize,
    pub queue_bytes: usize,
    pub max_publication_size: usize,
    pub max_sockets: usize,
    pub close_timeout: f64,
    pub http_keep_alive: f64,
    /// Bearer token of `POST /api/publish`; absent turns the endpoint off.
    pub publish_token: Option<Secret>,
    pub shutdown_timeout: f64,
    pub drain_window: f64,
    /// Serve the demo page at `/` and its publish route `POST /demo/publish`; default:
    /// only with the embedded broker.
    pub demo: Option<bool>,
    pub redis: RedisConfig,
    pub session: SessionConfig,
    pub identity: IdentityConfig,
    pub policy: PolicyConfig,
    /// `[[facility]]`: history and slow-consumer behaviour per facility pattern.
    #[serde(default)]
    pub facility: Vec<FacilityRule>,
}

/// Where identities come from (see [`crate::identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    Record,
    Django,
    Callback,
    Token,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub source: IdentitySource,
    pub django: DjangoConfig,
    pub callback: CallbackConfig,
    pub token: TokenConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// One Redis. Absent, with neither `cluster` nor `sentinel`: the embedded in-memory
    /// broker serves this process alone.
    pub url: Option<String>,
    /// Redis Cluster: seed nodes (any of them; the rest is discovered).
    #[serde(default)]
    pub cluster: Vec<String>,
    /// How publications travel in a cluster; default [`PubSub::Sharded`].
    pub pubsub: Option<PubSub>,
    /// A master watched by Redis Sentinel.
    pub sentinel: Option<SentinelConfig>,
    pub prefix: Option<String>,
    pub expire: u64,
    pub reconnect_max: f64,
    pub probe_interval: f64,
}

/// How publications travel in a Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PubSub {
    /// `SPUBLISH`/`SSUBSCRIBE`: each key's publications stay on the shard that owns its
    /// slot; the load divides over the masters.
    Sharded,
    /// `PUBLISH`/`SUBSCRIBE` on one node: every publication is broadcast to every node.
    /// For publishers that can only `PUBLISH` (ws4redis's own); does not scale.
    Classic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The master's name in the sentinels' configuration.
    pub master: String,
    /// The sentinels: `redis://host:26379`, …
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The master's database number (default 0).
    #[serde(default)]
    pub db: i64,
    /// The master's password, if it has one.
    pub password: Option<Secret>,
}

/// Which Redis the gateway uses, from `redis.url`, `redis.cluster` or `redis.sentinel`.
#[derive(Debug, Clone)]
pub enum Topology {
    Single(String),
    Cluster { seeds: Vec<String>, pubsub: PubSub },
    Sentinel(SentinelConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    pub cookie: String,
}

/// A configuration that cannot be used; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Source(#[from] config::ConfigError),
    #[error("setting `{0}`: {1}")]
    Invalid(&'static str, String),
    /// A value that is not one of an enum setting's names.
    #[error("setting `{key}`: {value:?} is not one of {valid}")]
    UnknownValue {
        key: String,
        value: String,
        valid: String,
    },
}

/// The names an enum setting accepts, as serde lists them (`` `a`, `b`, `c` ``), for
/// the error the config crate gives, which names the type but not its values.
fn enum_values(type_name: &str) -> Option<String> {
    fn names<T: serde::de::DeserializeOwned>() -> String {
        // No variant is named NUL: serde's refusal lists the ones there are.
        let probe = serde::de::value::StrDeserializer::<serde::de::value::Error>::new("\0");
        let refusal = T::deserialize(probe).err().map(|e| e.to_string());
        let listed = refusal.as_deref().and_then(|m| m.split_once("expected "));
        listed.map_or_else(String::new, |(_, names)| {
            names.trim_start_matches("one of ").to_string()
        })
    }
    use crate::identity::django::{database::UserIdType, session::Serializer, Engine};
    use crate::policy::{Kind, Who};
    Some(match type_name {
        "IdentitySource" => names::<IdentitySource>(),
        "Engine" => names::<Engine>(),
        "Serializer" => names::<Serializer>(),
        "UserIdType" => names::<UserIdType>(),
        "Kind" => names::<Kind>(),
        "Who" => names::<Who>(),
        _ => return None,
    })
}

impl ConfigError {
    /// The config crate's error, with the valid values added where it refused a value
    /// of an enum setting (`enum IdentitySource does not have variant constructor
    /// djano for key `identity.source``).
    fn from_source(error: config::ConfigError) -> ConfigError {
        let text = error.to_string();
        let refused = text
            .strip_prefix("enum ")
            .and_then(|rest| rest.split_once(" does not have variant constructor "))
            .and_then(|(type_name, rest)| Some((enum_values(type_name)?, rest)));
        match refused {
            Some((valid, rest)) if !valid.is_empty() => {
                let (value, key) = rest.split_once(" for key `").unwrap_or((rest, ""));
                ConfigError::UnknownValue {
                    key: key.trim_end_matches('`').to_string(),
                    value: value.to_string(),
                    valid,
                }
            }
            _ => ConfigError::Source(error),
        }
    }
}

/// Variables that look meant for wsrelay but are not read: `WSRELAY_REDIS__URL` (one
/// underscore after `WSRELAY`). Settings are `WSRELAY__{KEY}`.
pub fn misnamed_variables(names: impl IntoIterator<Item = String>) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| n.starts_with("WSRELAY_") && !n.starts_with("WSRELAY__"))
        .collect()
}

fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

impl Config {
    /// Reads defaults, then the TOML file at `path` (if any), then `WSRELAY__*` variables.
    /// A variable that starts with `WSRELAY_` but not `WSRELAY__` is warned about.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        for name in
            misnamed_variables(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))
        {
            let meant = format!("WSRELAY__{}", &name["WSRELAY_".len()..]);
            log::warn!(
                "environment variable {name} is ignored: settings are WSRELAY__<KEY>, with two \
                 underscores after WSRELAY (did you mean {meant}?)"
            );
        }
        let vars = std::env::vars()
            .filter(|(k, _)| k.starts_with("WSRELAY__"))
            .collect();
        Self::load_from(path, vars)
    }

    /// Settings that are lists; in the environment, their items are comma-separated.
    const LISTS: [&'static str; 7] = [
        "redis.cluster",
        "redis.sentinel.nodes",
        "identity.django.secret_key_fallbacks",
        "policy.allowed_origins",
        "policy.trusted_proxies",
        "identity.callback.forward_headers",
        "policy.callback.forward_headers",
    ];

    /// Reads defaults, then the TOML file at `path` (if any), then `vars`: settings
    /// named as in the environment (`WSRELAY__REDIS__URL`). For tests and embedders
    /// that build a configuration without touching the process environment.
    pub fn load_from(
        path: Option<&Path>,
        vars: std::collections::HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder()
            .set_default("listen", DEFAULT_LISTEN)?
            .set_default("websocket_url", DEFAULT_WEBSOCKET_URL)?
            .set_default("sse_url", DEFAULT_SSE_URL)?
            .set_default("poll_url", DEFAULT_POLL_URL)?
            .set_default("pub_url", DEFAULT_PUB_URL)?
            .set_default("poll_timeout", DEFAULT_POLL_TIMEOUT)?
            .set_default("workers", 0)?
            .set_default("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)?
            .set_default("ping_interval", DEFAULT_PING_INTERVAL)?
            .set_default("ping_timeout", DEFAULT_PING_TIMEOUT)?
            .set_default("max_message_size", DEFAULT_MAX_MESSAGE_SIZE as u64)?
            .set_default("queue_bytes", DEFAULT_QUEUE_BYTES as u64)?
            .set_default("max_publication_size", DEFAULT_MAX_PUBLICATION_SIZE as u64)?
            .set_default("max_sockets", DEFAULT_MAX_SOCKETS as u64)?
            .set_default("close_timeout", DEFAULT_CLOSE_TIMEOUT)?
            .set_default("http_keep_alive", DEFAULT_HTTP_KEEP_ALIVE)?
            .set_default("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)?
            .set_default("drain_window", DEFAULT_DRAIN_WINDOW)?
            .set_default("redis.expire", DEFAULT_EXPIRE)?
            .set_default("redis.reconnect_max", DEFAULT_RECONNECT_MAX)?
            .set_default("redis.probe_interval", DEFAULT_PROBE_INTERVAL)?
            .set_default("session.cookie", DEFAULT_SESSION_COOKIE)?
            .set_default("identity.source", "record")?
            .set_default("identity.django.engine", "redis_sessions")?
            .set_default("identity.django.key_prefix", "")?
            .set_default("identity.django.cache_version", 1)?
            .set_default(
                "identity.django.salt",
                "django.contrib.sessions.SessionStore",
            )?
            .set_default("identity.django.user_field", "wsrelay:username")?
            .set_default("identity.django.groups_field", "ws4redis:memberof")?
            .set_default("identity.django.secret_key_fallbacks", Vec::<String>::new())?
            .set_default("identity.django.serializer", "json")?
            .set_default("identity.django.session_cookie_age", 1_209_600)?
            .set_default("identity.django.database_pool", 4)?
            .set_default("identity.django.database_timeout", 2.0)?
            .set_default("identity.django.cache_ttl", 5.0)?
            .set_default("identity.django.cache_size", 10_000)?
            .set_default("identity.django.session_table", "django_session")?
            .set_default("identity.django.user_table", "auth_user")?
            .set_default("identity.django.user_id_column", "id")?
            .set_default("identity.django.user_id_type", "integer")?
            .set_default("identity.django.username_column", "username")?
            .set_default("identity.django.active_column", "is_active")?
            .set_default("identity.django.group_table", "auth_group")?
            .set_default("identity.django.user_groups_table", "auth_user_groups")?
            .set_default("identity.django.user_groups_column", "user_id")?
            .set_default("identity.callback.timeout", 2.0)?
            .set_default("identity.callback.cache_ttl", 5.0)?
            .set_default("identity.callback.cache_size", 10_000)?
            .set_default("identity.callback.forward_headers", Vec::<String>::new())?
            .set_default("identity.token.leeway", 0)?
            .set_default("policy.compat", false)?
            .set_default("policy.allowed_origins", Vec::<String>::new())?
            .set_default("policy.trusted_proxies", Vec::<String>::new())?
            .set_default("policy.max_connections_per_ip", 1000)?
            .set_default("policy.max_subscriptions", 128)?
            .set_default("policy.max_cookie_bytes", 8192)?
            .set_default("policy.handshake_timeout", 5.0)?
            .set_default("policy.request_timeout", 30.0)?
            .set_default("policy.rules", Vec::<String>::new())?
            .set_default("policy.callback.timeout", DEFAULT_CALLBACK_TIMEOUT)?
            .set_default("policy.callback.cache_ttl", DEFAULT_CALLBACK_CACHE_TTL)?
            .set_default(
                "policy.callback.cache_size",
                DEFAULT_CALLBACK_CACHE_SIZE as u64,
            )?
            .set_default("policy.callback.forward_headers", Vec::<String>::new())?;
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        // Values stay strings (a token of digits keeps its leading zeros); serde turns
        // them into numbers where a setting is a number. Lists are split here.
        let env = config::Environment::with_prefix("WSRELAY")
            .prefix_separator("__")
            .separator("__")
            .source(Some(vars.clone()));
        builder = builder.add_source(env);
        for list in Self::LISTS {
            let var = format!("WSRELAY__{}", list.replace('.', "__").to_uppercase());
            if let Some(value) = vars.get(&var) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(String::from)
                    .collect();
                builder = builder.set_override(list, items)?;
            }
        }
        let built = builder.build()?;
        // The config crate's message for an address does not show the value.
        if let Ok(listen) = built.get_string("listen") {
            if listen.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(
                    "listen",
                    format!(
                        "{listen:?} is not an IP address and port (like 127.0.0.1:8080, \
                         0.0.0.0:8080 or [::]:8080)"
                    ),
                ));
            }
        }
        let mut config: Config = built.try_deserialize().map_err(ConfigError::from_source)?;
        // An empty value (`WSRELAY__PUBLISH_TOKEN=`) means "not set".
        for optional in [
            &mut config.heartbeat,
            &mut config.redis.url,
            &mut config.redis.prefix,
            &mut config.policy.callback.url,
        ] {
            if optional.as_deref() == Some("") {
                *optional = None;
            }
        }
        for secret in [
            &mut config.publish_token,
            &mut config.identity.django.secret_key,
            &mut config.identity.django.database_url,
            &mut config.identity.token.secret,
        ] {
            if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                *secret = None;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Cross-field and range checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name, why: &str| Err(ConfigError::Invalid(name, why.to_string()));
        let urls = [
            ("websocket_url", &self.websocket_url),
            ("sse_url", &self.sse_url),
            ("poll_url", &self.poll_url),
            ("pub_url", &self.pub_url),
        ];
        for (i, (name, url)) in urls.iter().enumerate() {
            if !url.starts_with('/') || !url.ends_with('/') {
                return bad(name, "must start and end with '/' (like /ws/)");
            }
            // One prefix inside another would send requests to the wrong transport.
            if let Some((other, _)) = urls[..i]
                .iter()
                .find(|(_, u)| u.starts_with(url.as_str()) || url.starts_with(u.as_str()))
            {
                return bad(name, &format!("must not overlap {other}"));
            }
        }
        for (name, value, zero_ok) in [
            ("heartbeat_interval", self.heartbeat_interval, false),
            ("ping_interval", self.ping_interval, true),
            ("ping_timeout", self.ping_timeout, false),
            ("poll_timeout", self.poll_timeout, false),
            ("close_timeout", self.close_timeout, false),
            ("http_keep_alive", self.http_keep_alive, true),
            ("shutdown_timeout", self.shutdown_timeout, true),
            ("drain_window", self.drain_window, true),
            ("redis.reconnect_max", self.redis.reconnect_max, false),
            ("redis.probe_interval", self.redis.probe_interval, false),
            (
                "policy.handshake_timeout",
                self.policy.handshake_timeout,
                false,
            ),
            ("policy.request_timeout", self.policy.request_timeout, false),
            (
                "policy.callback.timeout",
                self.policy.callback.timeout,
                false,
            ),
            (
                "policy.callback.cache_ttl",
                self.policy.callback.cache_ttl,
                true,
            ),
        ] {
            if !value.is_finite() || value < 0.0 || (value == 0.0 && !zero_ok) || value > 86400.0 {
                return bad(
                    name,
                    "must be a number of seconds, above 0 and at most 86400",
                );
            }
        }
        if self.redis.expire > MAX_EXPIRE {
            return bad(
                "redis.expire",
                "must be at most ten years (315360000 seconds)",
            );
        }
        if self.max_message_size == 0 {
            return bad("max_message_size", "must be at least 1 byte");
        }
        if self.queue_bytes < self.max_message_size {
            return bad("queue_bytes", "must be at least max_message_size");
        }
        if self.max_publication_size == 0 {
            return bad("max_publication_size", "must be at least 1 byte");
        }
        if self.max_sockets == 0 {
            return bad("max_sockets", "must be at least 1");
        }
        if self.workers > crate::registry::MAX_WORKERS {
            return bad("workers", "must be at most 64");
        }
        if let Some(h) = &self.heartbeat {
            if h.is_empty() || h.len() > self.max_message_size {
                return bad("heartbeat", "must be non-empty and fit in max_message_size");
            }
        }
        if let Some(t) = &self.publish_token {
            if t.expose().len() < 16 {
                return bad("publish_token", "must be at least 16 characters");
            }
        }
        self.validate_redis()?;
        if let Some(p) = &self.redis.prefix {
            if p.contains(|c: char| {
                c == ':' || c.is_whitespace() || c.is_control() || "*?[]".contains(c)
            }) {
                return bad(
                    "redis.prefix",
                    "must not contain ':', spaces, control or pattern characters",
                );
            }
        }
        let policy = &self.policy;
        // A socket's queue tells its keys apart by a 16-bit index (crate::outbox).
        if !(1..=crate::outbox::MAX_KEYED).contains(&policy.max_subscriptions) {
            return bad(
                "policy.max_subscriptions",
                &format!("must be between 1 and {}", crate::outbox::MAX_KEYED),
            );
        }
        for rule in &policy.rules {
            if rule.facility.is_empty() {
                return bad("policy.rules", "every rule needs a facility pattern");
            }
        }
        if let Some(url) = &self.policy.callback.url {
            if !url.starts_with("http://") {
                return bad(
                    "policy.callback.url",
                    "must be an http:// URL of the web application",
                );
            }
        }
        let callback = &self.identity.callback;
        if !callback.timeout.is_finite()
            || callback.timeout <= 0.0
            || !callback.cache_ttl.is_finite()
            || callback.cache_ttl < 0.0
        {
            return bad(
                "identity.callback",
                "timeout must be above 0 and cache_ttl at least 0",
            );
        }
        if let Err(why) = crate::facility::validate(&self.facility, MAX_EXPIRE) {
            return bad("facility", &why);
        }
        if let Err((name, why)) = self.identity.django.validate() {
            return bad(name, &why);
        }
        let cookie = &self.session.cookie;
        if cookie.is_empty()
            || !cookie
                .chars()
                .all(|c| c.is_ascii_graphic() && !";,=".contains(c))
        {
            return bad("session.cookie", "must be a valid cookie name");
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        seconds(self.heartbeat_interval)
    }

    /// `None` when pings are off.
    pub fn ping_interval(&self) -> Option<Duration> {
        (self.ping_interval > 0.0).then(|| seconds(self.ping_interval))
    }

    pub fn ping_timeout(&self) -> Duration {
        seconds(self.ping_timeout)
    }

    pub fn poll_timeout(&self) -> Duration {
        seconds(self.poll_timeout)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        seconds(self.shutdown_timeout)
    }

    pub fn close_timeout(&self) -> Duration {
        seconds(self.close_timeout)
    }

    pub fn http_keep_alive(&self) -> Duration {
        seconds(self.http_keep_alive)
    }

    pub fn handshake_timeout(&self) -> Duration {
        seconds(self.policy.handshake_timeout)
    }

    pub fn request_timeout(&self) -> Duration {
        seconds(self.policy.request_timeout)
    }

    pub fn demo_enabled(&self) -> bool {
        self.demo.unwrap_or(self.topology().is_none())
    }

    /// The access policy in force: the configured one, plus, with the demo on, a rule
    /// that lets the demo page publish on its own facilities (`demo/…`).
    pub fn effective_policy(&self) -> PolicyConfig {
        let mut policy = self.policy.clone();
        // Peers are compared in canonical form (`::ffff:a.b.c.d` is `a.b.c.d`).
        for proxy in &mut policy.trusted_proxies {
            *proxy = proxy.to_canonical();
        }
        if self.demo_enabled() {
            policy.rules.insert(0, crate::policy::Rule::demo());
        }
        policy
    }

    pub fn drain_window(&self) -> Duration {
        seconds(self.drain_window)
    }

    /// The Redis the gateway uses; `None`: the embedded broker.
    pub fn topology(&self) -> Option<Topology> {
        let redis = &self.redis;
        if let Some(sentinel) = &redis.sentinel {
            return Some(Topology::Sentinel(sentinel.clone()));
        }
        if !redis.cluster.is_empty() {
            return Some(Topology::Cluster {
                seeds: redis.cluster.clone(),
                pubsub: redis.pubsub.unwrap_or(PubSub::Sharded),
            });
        }
        redis.url.clone().map(Topology::Single)
    }

    /// At most one topology; every URL parses; `pubsub` only with a cluster.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let bad = |name, why: &str| Err(ConfigError::Invalid(name, why.to_string()));
        let redis = &self.redis;
        let given = [
            redis.url.is_some(),
            !redis.cluster.is_empty(),
            redis.sentinel.is_some(),
        ];
        if given.iter().filter(|&&g| g).count() > 1 {
            return bad(
                "redis",
                "set one of redis.url (one Redis), redis.cluster (Redis Cluster seeds) \
                 and redis.sentinel (a master watched by Sentinel), not several",
            );
        }
        if redis.pubsub.is_some() && redis.cluster.is_empty() {
            return bad(
                "redis.pubsub",
                "only applies to a Redis Cluster (redis.cluster); one Redis and Sentinel \
                 always use classic pub/sub",
            );
        }
        let urls = redis.url.iter().map(|u| ("redis.url", u));
        let seeds = redis.cluster.iter().map(|u| ("redis.cluster", u));
        let sentinels = redis
            .sentinel
            .iter()
            .flat_map(|s| s.nodes.iter().map(|u| ("redis.sentinel.nodes", u)));
        for (setting, url) in urls.chain(seeds).chain(sentinels) {
            if let Err(e) = redis::Client::open(url.as_str()) {
                // Neither the value shown nor the redis crate's text has the password.
                return bad(
                    setting,
                    &format!(
                        "{:?} is not a Redis URL ({e}); accepted: redis://[[user]:password@]host[:port][/db], \
                         rediss://… (TLS), redis+unix:///path/to/socket[?db=N] or unix:///path/to/socket",
                        redis_url_without_password(url)
                    ),
                );
            }
        }
        if let Some(sentinel) = &redis.sentinel {
            if sentinel.master.is_empty() {
                return bad("redis.sentinel.master", "must name the master");
            }
            if sentinel.nodes.is_empty() {
                return bad("redis.sentinel.nodes", "must list at least one sentinel");
            }
        }
        Ok(())
    }

    pub fn reconnect_max(&self) -> Duration {
        seconds(self.redis.reconnect_max)
    }

    pub fn probe_interval(&self) -> Duration {
        seconds(self.redis.probe_interval)
    }

    /// A one-line summary for the start-up log; never shows secrets.
    pub fn summary(&self) -> String {
        let broker = match self.topology() {
            Some(Topology::Single(url)) => redis_url_without_password(&url),
            Some(Topology::Cluster { seeds, pubsub }) => format!(
                "redis-cluster({}, {pubsub:?} pub/sub)",
                urls_without_passwords(&seeds)
            ),
            Some(Topology::Sentinel(s)) => format!(
                "redis-sentinel(master {:?} via {})",
                s.master,
                urls_without_passwords(&s.nodes)
            ),
            None => "embedded in-memory broker".into(),
        };
        format!(
            "listen={} websocket_url={} broker={} prefix={:?} expire={}s heartbeat={:?} publish_api={}",
            self.listen,
            self.websocket_url,
            broker,
            self.redis.prefix.as_deref().unwrap_or(""),
            self.redis.expire,
            self.heartbeat.as_deref().unwrap_or(""),
            if self.publish_token.is_some() { "on" } else { "off" },
        )
    }
}

/// Several URLs, comma-separated, each without its password.
fn urls_without_passwords(urls: &[String]) -> String {
    let shown: Vec<String> = urls.iter().map(|u| redis_url_without_password(u)).collect();
    shown.join(",")
}

/// `redis://:secret@host/0` → `redis://***@host/0`.
fn redis_url_without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(None, map)
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = load(&[]).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.websocket_url, "/ws/");
        assert!(c.redis.url.is_none() && c.redis.prefix.is_none());
        assert_eq!(c.redis.expire, 3600);
        assert_eq!(c.session.cookie, "sessionid");
        assert!(c.heartbeat.is_none() && c.publish_token.is_none());
        assert!(!c.policy.compat && c.policy.rules.is_empty());
        assert_eq!(c.identity.source, IdentitySource::Record);
    }

    #[test]
    fn environment_overrides_nested_settings() {
        let c = load(&[
            ("WSRELAY__REDIS__URL", "redis://127.0.0.1:7000/2"),
            ("WSRELAY__REDIS__PREFIX", "app"),
            ("WSRELAY__PING_INTERVAL", "0.5"),
            ("WSRELAY__HEARTBEAT", "--heartbeat--"),
            ("WSRELAY__SESSION__COOKIE", "sid"),
            ("WSRELAY__PUBLISH_TOKEN", "0000000000000000123"),
            ("WSRELAY__POLICY__MAX_SUBSCRIPTIONS", "7"),
            ("WSRELAY__POLICY__TRUSTED_PROXIES", "127.0.0.1,10.0.0.1"),
            ("WSRELAY__DEMO", "false"),
        ])
        .unwrap();
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:7000/2"));
        assert_eq!(c.redis.prefix.as_deref(), Some("app"));
        assert_eq!(c.ping_interval(), Some(Duration::from_millis(500)));
        assert_eq!(c.heartbeat.as_deref(), Some("--heartbeat--"));
        assert_eq!(c.session.cookie, "sid");
        assert_eq!(c.publish_token.unwrap().expose(), "0000000000000000123");
        assert_eq!(c.policy.max_subscriptions, 7);
        assert_eq!(c.policy.trusted_proxies.len(), 2);
        assert_eq!(c.demo, Some(false));
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
            ("WSRELAY__LISTEN", "nowhere", "listen"),
            ("WSRELAY__PING_TIMEOUT", "-1", "ping_timeout"),
            ("WSRELAY__WEBSOCKET_URL", "ws", "websocket_url"),
            ("WSRELAY__REDIS__URL", "http://x", "redis.url"),
            ("WSRELAY__REDIS__PREFIX", "a:b", "redis.prefix"),
            ("WSRELAY__PUBLISH_TOKEN", "short", "publish_token"),
            ("WSRELAY__QUEUE_BYTES", "10", "queue_bytes"),
            (
                "WSRELAY__POLICY__CALLBACK__TIMEOUT",
                "0",
                "policy.callback.timeout",
            ),
            (
                "WSRELAY__POLICY__CALLBACK__TIMEOUT",
                "NaN",
                "policy.callback.timeout",
            ),
            (
                "WSRELAY__POLICY__CALLBACK__CACHE_TTL",
                "-1",
                "policy.callback.cache_ttl",
            ),
            (
                "WSRELAY__POLICY__CALLBACK__URL",
                "https://app",
                "policy.callback.url",
            ),
        ];
        for (var, value, setting) in cases {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(setting), "{var}={value}: {err}");
        }
    }

    #[test]
    fn an_unknown_value_lists_the_valid_ones() {
        let err = load(&[("WSRELAY__IDENTITY__SOURCE", "djano")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "setting `identity.source`: \"djano\" is not one of `record`, `django`, `callback`, `token`"
        );
        let err = load(&[("WSRELAY__IDENTITY__DJANGO__SERIALIZER", "xml")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("setting `identity.django.serializer`: \"xml\" is not one of `json`"),
            "{err}"
        );
        for name in [
            "IdentitySource",
            "Engine",
            "Serializer",
            "UserIdType",
            "Kind",
            "Who",
        ] {
            let valid = enum_values(name).unwrap();
            assert!(
                valid.starts_with('`') && valid.ends_with('`'),
                "{name}: {valid}"
            );
        }
    }

    #[test]
    fn one_redis_topology_is_chosen() {
        let c = load(&[(
            "WSRELAY__REDIS__CLUSTER",
            "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
        )])
        .unwrap();
        match c.topology() {
            Some(Topology::Cluster { seeds, pubsub }) => {
                assert_eq!(seeds, ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]);
                assert_eq!(pubsub, PubSub::Sharded);
            }
            other => panic!("not a cluster: {other:?}"),
        }
        assert!(!c.demo_enabled());
        let c = load(&[
            ("WSRELAY__REDIS__SENTINEL__MASTER", "mymaster"),
            ("WSRELAY__REDIS__SENTINEL__NODES", "redis://127.0.0.1:26379"),
        ])
        .unwrap();
        assert!(matches!(c.topology(), Some(Topology::Sentinel(s)) if s.master == "mymaster"));
        let refused = |vars: &[(&str, &str)]| load(vars).unwrap_err().to_string();
        let both = refused(&[
            ("WSRELAY__REDIS__URL", "redis://127.0.0.1/0"),
            ("WSRELAY__REDIS__CLUSTER", "redis://127.0.0.1:7000"),
        ]);
        assert!(both.contains("not several"), "{both}");
        let pubsub = refused(&[
            ("WSRELAY__REDIS__URL", "redis://127.0.0.1/0"),
            ("WSRELAY__REDIS__PUBSUB", "classic"),
        ]);
        assert!(pubsub.starts_with("setting `redis.pubsub`"), "{pubsub}");
        let seed = refused(&[("WSRELAY__REDIS__CLUSTER", "http://x")]);
        assert!(seed.starts_with("setting `redis.cluster`"), "{seed}");
        let no_nodes = refused(&[("WSRELAY__REDIS__SENTINEL__MASTER", "m")]);
        assert!(no_nodes.contains("redis.sentinel.nodes"), "{no_nodes}");
    }

    #[test]
    fn a_redis_url_that_does_not_parse_is_shown_without_its_password() {
        let err = load(&[("WSRELAY__REDIS__URL", "redis://:sekrit@host:port/0")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("sekrit"), "{err}");
        assert!(
            err.starts_with("setting `redis.url`: \"redis://***@host:port/0\" is not a Redis URL"),
            "{err}"
        );
        assert!(
            err.contains("accepted: redis://[[user]:password@]host[:port][/db], rediss://"),
            "{err}"
        );
        let err = load(&[("WSRELAY__REDIS__URL", "http://x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"http://x\" is not a Redis URL"), "{err}");
    }

    #[test]
    fn a_bad_listen_address_is_echoed() {
        let err = load(&[("WSRELAY__LISTEN", "localhost:80800")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("setting `listen`: \"localhost:80800\" is not an IP address and port"),
            "{err}"
        );
    }

    #[test]
    fn variables_with_one_underscore_are_found() {
        let names = [
            "WSRELAY_REDIS__URL",
            "WSRELAY__LISTEN",
            "WSRELAYX",
            "PATH",
            "WSRELAY_",
        ];
        assert_eq!(
            misnamed_variables(names.map(String::from)),
            ["WSRELAY_REDIS__URL", "WSRELAY_"]
        );
    }

    #[test]
    fn the_authorization_callback_has_its_own_settings() {
        let c = load(&[]).unwrap();
        let callback = &c.policy.callback;
        assert!(callback.url.is_none() && callback.forward_headers.is_empty());
        assert_eq!(
            (callback.timeout, callback.cache_ttl, callback.cache_size),
            (2.0, 5.0, 10_000)
        );
        let c = load(&[
            (
                "WSRELAY__POLICY__CALLBACK__URL",
                "http://127.0.0.1:8000/ws-authorize",
            ),
            ("WSRELAY__POLICY__CALLBACK__CACHE_TTL", "0"),
            (
                "WSRELAY__POLICY__CALLBACK__FORWARD_HEADERS",
                "x-tenant, authorization",
            ),
        ])
        .unwrap();
        let callback = &c.policy.callback;
        assert_eq!(
            callback.url.as_deref(),
            Some("http://127.0.0.1:8000/ws-authorize")
        );
        assert_eq!(callback.cache_ttl, 0.0);
        assert_eq!(callback.forward_headers, ["x-tenant", "authorization"]);
        let unset = load(&[("WSRELAY__POLICY__CALLBACK__URL", "")]).unwrap();
        assert!(unset.policy.callback.url.is_none());
    }

    #[test]
    fn passwords_are_hidden_in_the_summary() {
        assert_eq!(
            redis_url_without_password("redis://:pw@h:1/0"),
            "redis://***@h:1/0"
        );
        assert_eq!(redis_url_without_password("redis://h/0"), "redis://h/0");
    }

    #[test]
    fn facility_rules_come_from_the_file_in_order() {
        let dir = std::env::temp_dir().join(format!("wsrelay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("facility.toml");
        std::fs::write(
            &path,
            "[[facility]]\npattern = \"prices/*\"\nslow_consumer = \"conflate\"\n\n\
             [[facility]]\npattern = \"*\"\nhistory = 50\n",
        )
        .unwrap();
        let c = Config::load_from(Some(&path), HashMap::new()).unwrap();
        let f = crate::facility::Facilities::new(c.facility);
        assert_eq!(
            f.of("prices/x").slow_consumer,
            crate::facility::SlowConsumer::Conflate
        );
        let h = f.of("chat").history.unwrap();
        assert_eq!((h.len, h.ttl), (50, crate::facility::DEFAULT_HISTORY_TTL));
        std::fs::write(
            &path,
            "[[facility]]\npattern = \"*\"\nhistory = 5\nhistroy_ttl = 1\n",
        )
        .unwrap();
        let err = Config::load_from(Some(&path), HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("histroy_ttl"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
