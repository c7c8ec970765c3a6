//! The authorization callback (`policy.callback.*`): the web application decides, per
//! socket, which of its flags it may use — ws4redis's `WS4REDIS_ALLOWED_CHANNELS`,
//! which was a function of the request.
//!
//! A module of its own, not a part of [`crate::identity`]: identity says who a socket
//! belongs to, this asks what that someone may do on one facility, and it works with
//! every identity source (`record`, `django`, `callback`, `token`). It is the dynamic
//! half of the access policy; [`crate::policy`] is the static half. What it shares with
//! the identity callback (the request, its forwarded headers, the cache, the refusal
//! text) is in [`crate::webapp`].
//!
//! # When
//!
//! In the handshake, before the upgrade, in this order: identity is resolved (an
//! identity callback's `allowed` narrows the flags), the static policy
//! (`policy.rules`) accepts the flags, then the application is asked, then the
//! subscription limit (`policy.max_subscriptions`) is checked on what it allowed. So it
//! is only asked about sockets the gateway would otherwise accept, it sees the
//! identity the socket gets, and its narrowing counts toward the limit.
//!
//! # The question
//!
//! `POST {policy.callback.url}` with `Content-Type: application/json`, the browser's
//! `Cookie` header and the headers `policy.callback.forward_headers` lists (the
//! application may want its own session), and this body:
//!
//! ```json
//! {"facility": "chat/room1",
//!  "flags": ["subscribe-broadcast", "subscribe-user"],
//!  "user": "jane", "groups": ["staff"], "session": "…"}
//! ```
//!
//! `flags` are the ones requested and still allowed, in a fixed order; `user` and
//! `session` are `null` when the socket has none.
//!
//! # The answers
//!
//! - 200 with `{"allowed": ["subscribe-broadcast", …]}`: the socket keeps only the
//!   requested flags the list also names. The list narrows, it never widens; names it
//!   does not know are ignored, and `echo` is not an access matter and is kept.
//! - 200 with an empty body (or without `allowed`, or `"allowed": null`), or 204: the
//!   flags are allowed as requested.
//! - 401 or 403: the socket is refused with that status, and the body of the answer is
//!   the reason the browser reads (plain text, at most 1 KiB, control characters
//!   stripped: [`crate::webapp::refusal_text`]).
//! - Anything else (a body that is not such JSON included), or no whole answer within
//!   `policy.callback.timeout`: 503 (the browser retries), counted as
//!   `authorize_unavailable` in `wsrelay_handshakes_total` and logged.
//!
//! # Cache
//!
//! Answers, refusals included (with their status and text), are reused for
//! `policy.callback.cache_ttl` seconds (0 turns the cache off), at most
//! `policy.callback.cache_size` of them, keyed by a SHA-256 over the question's body
//! (facility, flags, identity) and the `Cookie` and forwarded headers. Failures are
//! never cached.

use actix_http::{Method, StatusCode};
use log::warn;
use serde::{Deserialize, Serialize};

use crate::channel::Flags;
use crate::identity::{Handshake, Identity};
use crate::webapp::{read_refusal, CallbackConfig, Endpoint, Refusal, MAX_ANSWER_BYTES};

/// Why the application did not let a socket open.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    /// Refused by the application: its status and its text.
    #[error("{0}")]
    Refused(Refusal),
    /// The application could not answer (503).
    #[error("authorization callback unavailable: {0}")]
    Unavailable(String),
}

/// What the application decided: the flags it allows (`None`: as requested), or a
/// refusal.
type Verdict = Result<Option<Flags>, Refusal>;

/// The question's body.
#[derive(Serialize)]
struct Question<'a> {
    facility: &'a str,
    flags: Vec<&'static str>,
    user: Option<&'a str>,
    groups: &'a [String],
    session: Option<&'a str>,
}

#[derive(Deserialize)]
struct Answer {
    allowed: Option<Vec<String>>,
}

/// Asks the web application which flags a socket may use; one per process.
pub struct Authorizer {
    endpoint: Endpoint<Verdict>,
}

impl Authorizer {
    /// The authorizer `policy.callback` describes; the error names the setting.
    pub fn new(config: &CallbackConfig) -> Result<Self, String> {
        Ok(Authorizer {
            endpoint: Endpoint::new("policy.callback", config)?,
        })
    }

    /// The flags of `handshake` the application allows this `identity`, or why not.
    pub async fn authorize(
        &self,
        handshake: &Handshake<'_>,
        identity: &Identity,
    ) -> Result<Flags, AuthorizeError> {
        let question = Question {
            facility: handshake.facility,
            flags: handshake.flags.names(),
            user: identity.user.as_deref(),
            groups: &identity.groups,
            session: identity.session.as_deref(),
        };
        // unwrap: a struct of strings always serializes.
        let question = serde_json::to_vec(&question).unwrap();
        let headers = &handshake.head.headers;
        let key = self.endpoint.key(&[&question], headers);
        let verdict = match self.endpoint.cached(&key) {
            Some(verdict) => verdict,
            None => {
                let asked =
                    tokio::time::timeout(self.endpoint.timeout(), self.ask(handshake, question))
                        .await
                        .unwrap_or_else(|_| Err("no answer in time".into()));
                let verdict = asked.map_err(|why| {
                    warn!(
                        "authorization callback failed (facility {}): {why}",
                        handshake.facility
                    );
                    AuthorizeError::Unavailable(why)
                })?;
                self.endpoint.remember(key, &verdict);
                verdict
            }
        };
        match verdict {
            Ok(Some(allowed)) => Ok(handshake.flags.narrow(&allowed)),
            Ok(None) => Ok(handshake.flags),
            Err(refusal) => Err(AuthorizeError::Refused(refusal)),
        }
    }

    /// One request to the application; `Err` when it did not answer usably.
    async fn ask(&self, handshake: &Handshake<'_>, question: Vec<u8>) -> Result<Verdict, String> {
        let url = &self.endpoint.url;
        let call = self
            .endpoint
            .request(handshake.http, Method::POST, url, &handshake.head.headers)
            .content_type("application/json");
        let mut response = call.send_body(question).await.map_err(|e| e.to_string())?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NO_CONTENT => return Ok(Ok(None)),
            status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Ok(Err(read_refusal(status, &mut response).await));
            }
            other => return Err(format!("status {}", other.as_u16())),
        }
        let body = response
            .body()
            .limit(MAX_ANSWER_BYTES)
            .await
            .map_err(|e| format!("bad answer: {e}"))?;
        if body.trim_ascii().is_empty() {
            return Ok(Ok(None));
        }
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|e| format!("bad answer: {e}"))?;
        Ok(Ok(answer
            .allowed
            .map(|names| Flags::parse(&names.join("&")))))
    }
}
