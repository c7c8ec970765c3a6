//! Who is on the other end of a socket: session key, user name and groups.
//!
//! Identity is resolved before the upgrade, from the request, by an [`IdentityResolver`].
//! The built-in one, [`RecordResolver`], reads a JSON record that the web application
//! writes at login (see [`crate::publisher::RedisPublisher::set_identity`]):
//!
//! ```text
//! key:   {p}wsrelay:identity:{session_key}
//! value: {"user": "jane", "groups": ["staff", "editors"]}
//! ```
//!
//! The session key is the value of the session cookie (`session.cookie`, Django's
//! `sessionid` by default). No record means an anonymous socket that still has its
//! session key, so `subscribe-session` works and user/group flags are skipped.
//! Every name is validated before it becomes part of a key; invalid ones are dropped
//! with a warning rather than trusted.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::HttpRequest;
use futures_util::future::LocalBoxFuture;
use log::warn;
use serde::Deserialize;

use crate::broker::Broker;
use crate::channel::{validate_name, KeySpace, NameError, NameKind};

/// Most groups taken from one identity record; each is one subscription.
pub const MAX_GROUPS: usize = 64;

/// The resolved identity of one socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The session cookie's value, validated.
    pub session: Option<String>,
    /// The user name, validated; `None` when anonymous.
    pub user: Option<String>,
    /// Group names, validated, at most [`MAX_GROUPS`].
    pub groups: Vec<String>,
}

/// Why a socket's identity could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The request carries something unusable (answered 400).
    #[error("session cookie: {0}")]
    BadCookie(NameError),
    /// The identity store cannot be reached (answered 503; the client retries).
    #[error("identity store unavailable: {0}")]
    Unavailable(String),
}

/// A source of identities. Implementations run before the WebSocket upgrade.
pub trait IdentityResolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        request: &'a HttpRequest,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>>;
}

/// The value of cookie `name`, validated as a session key; `None` when absent or empty.
pub fn session_key(request: &HttpRequest, name: &str) -> Result<Option<String>, IdentityError> {
    for value in request.headers().get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if k.trim() != name {
                continue;
            }
            let v = v.trim().trim_matches('"');
            if v.is_empty() {
                return Ok(None);
            }
            validate_name(NameKind::Session, v).map_err(IdentityError::BadCookie)?;
            return Ok(Some(v.to_string()));
        }
    }
    Ok(None)
}

/// The identity record as the web application writes it.
#[derive(Debug, Deserialize)]
pub struct IdentityRecord {
    pub user: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Reads `{p}wsrelay:identity:{session_key}` from the broker's store.
pub struct RecordResolver {
    broker: Arc<Broker>,
    keys: KeySpace,
    cookie: String,
}

impl RecordResolver {
    pub fn new(broker: Arc<Broker>, keys: KeySpace, cookie: String) -> Self {
        RecordResolver {
            broker,
            keys,
            cookie,
        }
    }

    async fn lookup(&self, request: &HttpRequest) -> Result<Identity, IdentityError> {
        let Some(session) = session_key(request, &self.cookie)? else {
            return Ok(Identity::default());
        };
        let key: Arc<str> = self.keys.internal(&format!("identity:{session}")).into();
        let stored = self
            .broker
            .fetch(&[key])
            .await
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let mut identity = match stored.into_iter().next().flatten() {
            Some(raw) => identity_from_record(&raw),
            None => Identity::default(),
        };
        identity.session = Some(session);
        Ok(identity)
    }
}

impl IdentityResolver for RecordResolver {
    fn resolve<'a>(
        &'a self,
        request: &'a HttpRequest,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>> {
        Box::pin(self.lookup(request))
    }
}

/// Decodes a record; a broken record or name is logged and left out, never trusted.
pub fn identity_from_record(raw: &[u8]) -> Identity {
    let record: IdentityRecord = match serde_json::from_slice(raw) {
        Ok(r) => r,
        Err(e) => {
            warn!("identity record is not valid JSON ({e}); treating the socket as anonymous");
            return Identity::default();
        }
    };
    let user = record
        .user
        .filter(|u| match validate_name(NameKind::User, u) {
            Ok(()) => true,
            Err(e) => {
                warn!("identity record: {e}; user audience skipped");
                false
            }
        });
    if record.groups.len() > MAX_GROUPS {
        warn!(
            "identity record has {} groups; only the first {MAX_GROUPS} are used",
            record.groups.len()
        );
    }
    let groups = record
        .groups
        .into_iter()
        .take(MAX_GROUPS)
        .filter(|g| match validate_name(NameKind::Group, g) {
            Ok(()) => true,
            Err(e) => {
                warn!("identity record: {e}; group skipped");
                false
            }
        })
        .collect();
    Identity {
        session: None,
        user,
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "csrftoken=x; sessionid=abc123; theme=dark"))
            .to_http_request();
        assert_eq!(
            session_key(&req, "sessionid").unwrap().as_deref(),
            Some("abc123")
        );
        assert_eq!(session_key(&req, "sid").unwrap(), None);
    }

    #[test]
    fn a_session_cookie_that_cannot_be_a_key_is_refused() {
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "sessionid=a:b"))
            .to_http_request();
        assert!(matches!(
            session_key(&req, "sessionid"),
            Err(IdentityError::BadCookie(_))
        ));
    }

    #[test]
    fn records_are_validated_name_by_name() {
        let id =
            identity_from_record(br#"{"user": "jane", "groups": ["staff", "bad:group", "ops"]}"#);
        assert_eq!(id.user.as_deref(), Some("jane"));
        assert_eq!(id.groups, ["staff", "ops"]);
        let id = identity_from_record(br#"{"user": "x*", "groups": []}"#);
        assert_eq!(id.user, None);
        assert_eq!(identity_from_record(b"not json"), Identity::default());
        let many: Vec<String> = (0..100).map(|i| format!("g{i}")).collect();
        let raw = serde_json::json!({ "user": "u", "groups": many }).to_string();
        assert_eq!(
            identity_from_record(raw.as_bytes()).groups.len(),
            MAX_GROUPS
        );
    }
}
