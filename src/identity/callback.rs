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
//! - 401 or 403: the socket is refused with that status, and the body of the answer is
//!   the reason the browser reads (plain text, at most 1 KiB, control characters
//!   stripped: [`crate::webapp::refusal_text`]), as ws4redis passed the application's
//!   message on;
//! - anything else, or no whole answer within `timeout`: the socket is refused with 503
//!   (the browser retries) and the failure is counted.
//!
//! Answers (including refusals, with their status and text) are cached per cookie,
//! facility, flags and forwarded headers for `cache_ttl` seconds, at most `cache_size`
//! entries; a TTL of 0 disables the cache. The endpoint is plain HTTP: it is the web
//! application next to the gateway. What this shares with the authorization callback
//! lives in [`crate::webapp`].

use std::sync::Arc;

use actix_http::{Method, StatusCode};
use futures_util::future::LocalBoxFuture;
use log::warn;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;

use super::{Handshake, Identity, IdentityError, IdentityResolver};
use crate::channel::Flags;
use crate::metrics::Metrics;
use crate::webapp::{read_refusal, Endpoint, Refusal, MAX_ANSWER_BYTES};

pub use crate::webapp::CallbackConfig;

#[derive(Debug, Deserialize)]
struct Answer {
    user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    session: Option<String>,
    allowed: Option<Vec<String>>,
}

pub struct CallbackResolver {
    endpoint: Endpoint<Result<Identity, Refusal>>,
    metrics: Arc<Metrics>,
}

impl CallbackResolver {
    pub fn new(config: CallbackConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        Ok(CallbackResolver {
            endpoint: Endpoint::new("identity.callback", &config)?,
            metrics,
        })
    }

    /// Asks the application; `Err` when it could not answer (not cached).
    async fn ask(&self, handshake: &Handshake<'_>) -> Result<Result<Identity, Refusal>, String> {
        let url = &self.endpoint.url;
        let sep = if url.contains('?') { '&' } else { '?' };
        let flags = handshake.flags.to_string();
        let url = format!(
            "{url}{sep}facility={}&flags={}",
            utf8_percent_encode(handshake.facility, NON_ALPHANUMERIC),
            utf8_percent_encode(&flags, NON_ALPHANUMERIC)
        );
        let call =
            self.endpoint
                .request(handshake.http, Method::GET, &url, &handshake.head.headers);
        let mut response = call.send().await.map_err(|e| e.to_string())?;
        match response.status() {
            StatusCode::OK => {}
            status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Ok(Err(read_refusal(status, &mut response).await));
            }
            other => return Err(format!("status {}", other.as_u16())),
        }
        let answer: Answer = response
            .json()
            .limit(MAX_ANSWER_BYTES)
            .await
            .map_err(|e| format!("bad answer: {e}"))?;
        let mut identity = Identity::from_names(answer.session, answer.user, answer.groups);
        identity.allowed = answer.allowed.map(|flags| Flags::parse(&flags.join("&")));
        Ok(Ok(identity))
    }

    async fn lookup(&self, handshake: &Handshake<'_>) -> Result<Identity, IdentityError> {
        let flags = handshake.flags.to_string();
        let parts = [handshake.facility.as_bytes(), flags.as_bytes()];
        let key = self.endpoint.key(&parts, &handshake.head.headers);
        let answer = match self.endpoint.cached(&key) {
            Some(answer) => answer,
            None => {
                let asked = tokio::time::timeout(self.endpoint.timeout(), self.ask(handshake))
                    .await
                    .unwrap_or_else(|_| Err("no answer in time".into()));
                let answer = asked.map_err(|why| {
                    self.metrics
                        .identity_events
                        .with_label_values(&["callback_unavailable"])
                        .inc();
                    warn!("identity callback failed: {why}");
                    IdentityError::Unavailable(format!("identity callback: {why}"))
                })?;
                self.endpoint.remember(key, &answer);
                answer
            }
        };
        answer.map_err(|refusal| {
            self.metrics
                .identity_events
                .with_label_values(&["callback_refused"])
                .inc();
            IdentityError::Refused(refusal)
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
