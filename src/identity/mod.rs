//! Who is on the other end of a socket: session key, user name and groups.
//!
//! Identity is resolved before the upgrade by one [`IdentityResolver`], chosen with
//! `identity.source`:
//!
//! | source | module | where the identity comes from |
//! |---|---|---|
//! | `record` (default) | [`record`] | a JSON record the web app writes at login |
//! | `django` | [`django`] | Django's own session (database, cache, signed cookie, django-redis-sessions) and, optionally, its user and group tables |
//! | `callback` | [`callback`] | an HTTP endpoint of the web app, asked with the browser's cookie |
//! | `token` | [`token`] | an HS256 token in the `token` query parameter or a cookie |
//!
//! Every name a resolver returns is validated before it becomes part of a key: a name
//! that does not fit is dropped with a warning, never trusted.

pub mod callback;
pub mod django;
pub mod record;
pub mod token;

use actix_http::header::{self, HeaderMap};
use actix_http::RequestHead;
use futures_util::future::LocalBoxFuture;
use log::warn;

use crate::channel::{validate_name, Flags, NameError, NameKind};
pub use crate::webapp::Refusal;

/// Most groups taken from one identity; each is one subscription.
pub const MAX_GROUPS: usize = 64;

/// The resolved identity of one socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The session key, validated.
    pub session: Option<String>,
    /// The user name, validated; `None` when anonymous.
    pub user: Option<String>,
    /// Group names, validated, at most [`MAX_GROUPS`].
    pub groups: Vec<String>,
    /// Flags the identity source allows; `None` allows every requested flag.
    pub allowed: Option<Flags>,
}

impl Identity {
    /// Builds an identity from names given by an identity source, validating each.
    pub fn from_names(session: Option<String>, user: Option<String>, groups: Vec<String>) -> Self {
        let valid = |kind, name: &String| match validate_name(kind, name) {
            Ok(()) => true,
            Err(e) => {
                warn!("identity: {e}; left out");
                false
            }
        };
        let mut groups = groups;
        let mut seen = std::collections::HashSet::new();
        groups.retain(|g| seen.insert(g.clone()));
        if groups.len() > MAX_GROUPS {
            warn!(
                "identity has {} groups; only the first {MAX_GROUPS} are used",
                groups.len()
            );
        }
        Identity {
            session: session.filter(|s| valid(NameKind::Session, s)),
            user: user.filter(|u| valid(NameKind::User, u)),
            groups: groups
                .into_iter()
                .take(MAX_GROUPS)
                .filter(|g| valid(NameKind::Group, g))
                .collect(),
            allowed: None,
        }
    }
}

/// Why a socket's identity could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The request carries something unusable (answered 400).
    #[error("session cookie: {0}")]
    BadCookie(NameError),
    /// The identity source refused this client: answered with the refusal's status
    /// (403, or the application's 401) and its reason as the body.
    #[error("{0}")]
    Refused(Refusal),
    /// The identity source cannot be reached (answered 503; the client retries).
    #[error("identity source unavailable: {0}")]
    Unavailable(String),
}

/// What a resolver may look at: the request head, before any upgrade.
pub struct Handshake<'a> {
    pub head: &'a RequestHead,
    pub facility: &'a str,
    pub flags: Flags,
    /// This worker's HTTP client (for the callback source).
    pub http: &'a awc::Client,
}

/// A source of identities. Implementations run before the WebSocket upgrade.
pub trait IdentityResolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        handshake: &'a Handshake<'a>,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>>;

    /// Connects to the stores this source reads and says what it found, one line each
    /// (for `--check-config`); nothing for a source with no store of its own.
    fn probe(&self) -> LocalBoxFuture<'_, Vec<String>> {
        Box::pin(async { Vec::new() })
    }
}

/// The value of cookie `name`, if present and non-empty (not validated).
pub fn cookie<'r>(headers: &'r HeaderMap, name: &str) -> Option<&'r str> {
    headers
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The value of cookie `name`, validated as a session key; `None` when absent or empty.
pub fn session_key(headers: &HeaderMap, name: &str) -> Result<Option<String>, IdentityError> {
    match cookie(headers, name) {
        None => Ok(None),
        Some(v) => {
            validate_name(NameKind::Session, v).map_err(IdentityError::BadCookie)?;
            Ok(Some(v.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header;
    use actix_web::test::TestRequest;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "csrftoken=x; sessionid=abc123; theme=dark"))
            .to_http_request();
        assert_eq!(
            session_key(req.headers(), "sessionid").unwrap().as_deref(),
            Some("abc123")
        );
        assert_eq!(session_key(req.headers(), "sid").unwrap(), None);
    }

    #[test]
    fn a_session_cookie_that_cannot_be_a_key_is_refused() {
        let req = TestRequest::default()
            .insert_header((header::COOKIE, "sessionid=a:b"))
            .to_http_request();
        assert!(matches!(
            session_key(req.headers(), "sessionid"),
            Err(IdentityError::BadCookie(_))
        ));
    }

    #[test]
    fn names_are_validated_one_by_one() {
        let groups = vec![
            "staff".into(),
            "bad:group".into(),
            "ops".into(),
            "staff".into(),
        ];
        let id = Identity::from_names(Some("k".into()), Some("x*".into()), groups);
        assert_eq!(id.user, None);
        assert_eq!(id.groups, ["staff", "ops"]);
        let many = (0..100).map(|i| format!("g{i}")).collect();
        assert_eq!(
            Identity::from_names(None, None, many).groups.len(),
            MAX_GROUPS
        );
    }
}
