//! Identity from an HTTP endpoint of the web application, for any framework.
//!
//! For each handshake (or cache miss) the gateway sends
//! `GET {url}?facility={facility}&flags={flag,flag,…}` with the browser's `Cookie` header
//! and the headers listed in `identity.callback.forward_headers`. The application answers:
//!
//! - 200 with `{"user": "jane" | null, "groups": ["staff"], "session": "…" | null,
//!   "allowed": ["subscribe-broadcast", …] | null}`; `allowed`, when present, narrows
//!   the flags the socket gets (the programmable equivalent of ws4redis's
//!   `WS4REDIS_ALLOWED_CHANNELS`);
//! - 401 or 403: the socket is refused with 403;
//! - anything else, or no answer within `timeout`: the socket is refused with 503 (the
//!   browser retries) and the failure is counted.
//!
//! Answers (including refusals) are cached per cookie, facility, flags and forwarded
//! headers for `cache_ttl` seconds, at most `cache_size` entries; a TTL of 0 disables
//! the cache. The endpoint is plain HTTP: it is the web application next to the gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderName, COOKIE};
use futures_util::future::LocalBoxFuture;
use log::warn;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;

use super::{Handshake, Identity, IdentityError, IdentityResolver};
use crate::channel::Flags;
use crate::metrics::Metrics;

/// Largest answer body read from the application.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// `identity.callback.*` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackConfig {
    pub url: Option<String>,
    /// Seconds to wait for the application.
    pub timeout: f64,
    /// Seconds an answer is reused; 0 disables the cache.
    pub cache_ttl: f64,
    pub cache_size: usize,
    /// Request headers passed on to the application (lower case).
    pub forward_headers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Answer {
    user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    session: Option<String>,
    allowed: Option<Vec<String>>,
}

type Cached = (Instant, Result<Identity, String>);

pub struct CallbackResolver {
    url: String,
    config: CallbackConfig,
    forward: Vec<HeaderName>,
    cache: Mutex<HashMap<String, Cached>>,
    metrics: Arc<Metrics>,
}

impl CallbackResolver {
    pub fn new(config: CallbackConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let url = config
            .url
            .clone()
            .ok_or("identity.callback.url is not set")?;
        if !url.starts_with("http://") {
            return Err(
                "identity.callback.url must be an http:// URL of the web application".into(),
            );
        }
        let forward = config
            .forward_headers
            .iter()
            .map(|h| {
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    format!("identity.callback.forward_headers: bad header name {h:?}")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(CallbackResolver {
            url,
            config,
            forward,
            cache: Mutex::default(),
            metrics,
        })
    }

    /// The cache key: a SHA-256 over everything the answer may depend on, each part
    /// length-prefixed so that no two different requests share a key, and the key's
    /// size is fixed whatever the size of the headers.
    fn cache_key(&self, handshake: &Handshake<'_>) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        part(handshake.facility.as_bytes());
        part(handshake.flags.to_string().as_bytes());
        let headers = &handshake.head.headers;
        for name in std::iter::once(&COOKIE).chain(&self.forward) {
            let values: Vec<_> = headers.get_all(name).collect();
            part(name.as_str().as_bytes());
            part(&(values.len() as u64).to_le_bytes());
            for value in values {
                part(value.as_bytes());
            }
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn cached(&self, key: &str) -> Option<Result<Identity, String>> {
        let ttl = Duration::from_secs_f64(self.config.cache_ttl);
        // unwrap: nothing panics while the cache is locked.
        let cache = self.cache.lock().unwrap();
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, answer)| answer.clone())
    }

    fn remember(&self, key: String, answer: &Result<Identity, String>) {
        if self.config.cache_ttl <= 0.0 {
            return;
        }
        let ttl = Duration::from_secs_f64(self.config.cache_ttl);
        // unwrap: see `cached`.
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= self.config.cache_size {
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        if cache.len() < self.config.cache_size {
            cache.insert(key, (Instant::now(), answer.clone()));
        }
    }

    async fn ask(
        &self,
        handshake: &Handshake<'_>,
    ) -> Result<Result<Identity, String>, IdentityError> {
        let client = handshake.http;
        let sep = if self.url.contains('?') { '&' } else { '?' };
        let flags = handshake.flags.to_string();
        let url = format!(
            "{}{sep}facility={}&flags={}",
            self.url,
            utf8_percent_encode(handshake.facility, NON_ALPHANUMERIC),
            utf8_percent_encode(&flags, NON_ALPHANUMERIC)
        );
        let mut call = client
            .get(url)
            .timeout(Duration::from_secs_f64(self.config.timeout));
        for name in std::iter::once(&COOKIE).chain(&self.forward) {
            for value in handshake.head.headers.get_all(name) {
                call = call.append_header((name.clone(), value.clone()));
            }
        }
        let unavailable = |why: String| {
            self.metrics
                .identity_events
                .with_label_values(&["callback_unavailable"])
                .inc();
            warn!("identity callback failed: {why}");
            IdentityError::Unavailable(format!("identity callback: {why}"))
        };
        let mut response = call.send().await.map_err(|e| unavailable(e.to_string()))?;
        match response.status().as_u16() {
            200 => {}
            401 | 403 => return Ok(Err("refused by the application".into())),
            other => return Err(unavailable(format!("status {other}"))),
        }
        let answer: Answer = response
            .json()
            .limit(MAX_ANSWER_BYTES)
            .await
            .map_err(|e| unavailable(format!("bad answer: {e}")))?;
        let mut identity = Identity::from_names(answer.session, answer.user, answer.groups);
        identity.allowed = answer.allowed.map(|flags| Flags::parse(&flags.join("&")));
        Ok(Ok(identity))
    }

    async fn lookup(&self, handshake: &Handshake<'_>) -> Result<Identity, IdentityError> {
        let key = self.cache_key(handshake);
        let answer = match self.cached(&key) {
            Some(answer) => answer,
            None => {
                let answer = self.ask(handshake).await?;
                self.remember(key, &answer);
                answer
            }
        };
        answer.map_err(|why| {
            self.metrics
                .identity_events
                .with_label_values(&["callback_refused"])
                .inc();
            IdentityError::Refused(why)
        })
    }
}

impl IdentityResolver for CallbackResolver {
    fn resolve<'a>(
        &'a self,
        handshake: &'a Handshake<'a>,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>> {
        Box::pin(self.lookup(handshake))
    }
}
