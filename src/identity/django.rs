//! Django sessions stored in Redis, decoded natively (no Python at run time).
//!
//! Two setups are read:
//!
//! - **django-redis-sessions** (`SESSION_ENGINE = 'redis_sessions.session'`): key
//!   `{SESSION_REDIS_PREFIX}:{session_key}` (just the session key without a prefix). The
//!   value is Django's signed session encoding: base64url of the JSON session (zlib
//!   compressed and marked with a leading `.` when that is shorter), then `:timestamp`,
//!   then `:signature`, where the signature is base64url(HMAC-SHA256) keyed with
//!   SHA-256(salt + "signer" + SECRET_KEY) and the salt is
//!   `django.contrib.sessions.SessionStore`. Django 3.1 and later write this form.
//! - **Django's cache backends on Redis** (`backends.cache` or `backends.cached_db` with
//!   `django.core.cache.backends.redis.RedisCache`): key
//!   `{KEY_PREFIX}:{VERSION}:django.contrib.sessions.cache{session_key}` (`cached_db`
//!   for the other backend). The value is the session dict pickled by the cache; it is
//!   decoded by a pickle reader that builds plain values only and refuses any reference
//!   to a Python class or function, so nothing is ever executed.
//!
//! Groups come from the session field `ws4redis:memberof` (written by ws4redis at login),
//! the user name from a configurable field (`wsrelay:username` by default). A session
//! whose signature does not verify, or whose pickle holds anything but plain data, is
//! treated as anonymous and counted.

use std::io::Read;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::future::LocalBoxFuture;
use hmac::{Hmac, Mac};
use log::warn;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::callback::CallbackResolver;
use super::{session_key, Handshake, Identity, IdentityError, IdentityResolver};
use crate::broker::redis::command_connection;
use crate::metrics::Metrics;
use crate::secret::{secret_value, Secret};

/// Largest session value read (and largest decompressed payload), in bytes.
const MAX_SESSION_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// django-redis-sessions.
    RedisSessions,
    /// `django.contrib.sessions.backends.cache`.
    Cache,
    /// `django.contrib.sessions.backends.cached_db`.
    CachedDb,
}

/// `identity.django.*` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DjangoConfig {
    pub engine: Engine,
    /// The Redis holding the sessions; default: `redis.url`.
    pub redis_url: Option<String>,
    /// `SESSION_REDIS_PREFIX` (redis_sessions) or the cache's `KEY_PREFIX`.
    pub key_prefix: String,
    /// The cache's `VERSION`.
    pub cache_version: u32,
    /// Django's `SECRET_KEY` (needed for redis_sessions); or read it from `secret_key_file`.
    pub secret_key: Option<Secret>,
    pub secret_key_file: Option<std::path::PathBuf>,
    /// The salt Django signs sessions with: `django.contrib.sessions.` + the class name.
    pub salt: String,
    pub user_field: String,
    pub groups_field: String,
}

/// What a session holds that matters here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SessionFields {
    pub user: Option<String>,
    pub groups: Vec<String>,
}

/// Why a stored session could not be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a signed Django session")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("payload does not decompress")]
    Compression,
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("pickle refused: {0}")]
    Pickle(String),
    #[error("session larger than {MAX_SESSION_BYTES} bytes")]
    TooLarge,
}

/// The signing key of Django's `Signer`: SHA-256(salt + "signer" + secret).
fn signer_key(salt: &str, secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(b"signer");
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// Verifies and decodes `django.core.signing` output (a `TimestampSigner` value).
/// Returns the JSON payload. The timestamp is not checked: Redis expires sessions.
pub fn unsign(value: &[u8], salt: &str, secret: &str) -> Result<Vec<u8>, DecodeError> {
    let value = std::str::from_utf8(value).map_err(|_| DecodeError::Malformed)?;
    let (signed, signature) = value.rsplit_once(':').ok_or(DecodeError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| DecodeError::BadSignature)?;
    // unwrap: HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(&signer_key(salt, secret)).unwrap();
    mac.update(signed.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| DecodeError::BadSignature)?;
    let (payload, _timestamp) = signed.rsplit_once(':').ok_or(DecodeError::Malformed)?;
    let (compressed, payload) = match payload.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, payload),
    };
    let data = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| DecodeError::Malformed)?;
    if !compressed {
        return Ok(data);
    }
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(&data[..])
        .take(MAX_SESSION_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| DecodeError::Compression)?;
    if out.len() > MAX_SESSION_BYTES {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

/// The user and group fields of a JSON session.
pub fn fields_from_json(
    json: &[u8],
    user_field: &str,
    groups_field: &str,
) -> Result<SessionFields, DecodeError> {
    let session: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| DecodeError::Json(e.to_string()))?;
    let user = session
        .get(user_field)
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let groups = match session.get(groups_field) {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    Ok(SessionFields { user, groups })
}

/// The user and group fields of a pickled session dict. Any class reference in the
/// pickle (a datetime, a model instance…) refuses the whole session.
pub fn fields_from_pickle(
    raw: &[u8],
    user_field: &str,
    groups_field: &str,
) -> Result<SessionFields, DecodeError> {
    use serde_pickle::{HashableValue, Value};
    let value = serde_pickle::value_from_slice(raw, serde_pickle::DeOptions::new())
        .map_err(|e| DecodeError::Pickle(e.to_string()))?;
    let Value::Dict(session) = value else {
        return Err(DecodeError::Pickle("not a dict".into()));
    };
    let get = |field: &str| session.get(&HashableValue::String(field.to_string()));
    let user = match get(user_field) {
        Some(Value::String(u)) => Some(u.clone()),
        _ => None,
    };
    let groups = match get(groups_field) {
        Some(Value::List(items) | Value::Tuple(items)) => items
            .iter()
            .filter_map(|g| match g {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(SessionFields { user, groups })
}

/// Resolves identities from Django's own sessions.
pub struct DjangoResolver {
    config: DjangoConfig,
    secret: Option<String>,
    conn: ConnectionManager,
    cookie: String,
    metrics: Arc<Metrics>,
    /// Asked when a session has no user field.
    fallback: Option<CallbackResolver>,
}

impl DjangoResolver {
    pub fn new(
        config: DjangoConfig,
        default_url: Option<&str>,
        cookie: String,
        metrics: Arc<Metrics>,
        fallback: Option<CallbackResolver>,
    ) -> Result<Self, String> {
        let url = config
            .redis_url
            .as_deref()
            .or(default_url)
            .ok_or("identity.django.redis_url (or redis.url) must be set")?;
        let conn = redis::Client::open(url)
            .and_then(|c| command_connection(&c))
            .map_err(|e| format!("identity.django.redis_url: {e}"))?;
        let secret = secret_value(
            config.secret_key.as_ref(),
            config.secret_key_file.as_deref(),
            "identity.django.secret_key_file",
        )?;
        if config.engine == Engine::RedisSessions && secret.is_none() {
            return Err(
                "identity.django.secret_key or secret_key_file is needed to verify redis_sessions"
                    .into(),
            );
        }
        Ok(DjangoResolver {
            config,
            secret,
            conn,
            cookie,
            metrics,
            fallback,
        })
    }

    /// The Redis key of a session, as the configured engine writes it.
    pub fn key(&self, session: &str) -> String {
        let c = &self.config;
        match c.engine {
            Engine::RedisSessions if c.key_prefix.is_empty() => session.to_string(),
            Engine::RedisSessions => format!("{}:{session}", c.key_prefix),
            Engine::Cache => format!(
                "{}:{}:django.contrib.sessions.cache{session}",
                c.key_prefix, c.cache_version
            ),
            Engine::CachedDb => {
                format!(
                    "{}:{}:django.contrib.sessions.cached_db{session}",
                    c.key_prefix, c.cache_version
                )
            }
        }
    }

    fn decode(&self, raw: &[u8]) -> Result<SessionFields, DecodeError> {
        if raw.len() > MAX_SESSION_BYTES {
            return Err(DecodeError::TooLarge);
        }
        let (user, groups) = (&self.config.user_field, &self.config.groups_field);
        match self.config.engine {
            Engine::RedisSessions => {
                // unwrap-free: `new` refuses redis_sessions without a secret.
                let secret = self.secret.as_deref().unwrap_or_default();
                fields_from_json(&unsign(raw, &self.config.salt, secret)?, user, groups)
            }
            Engine::Cache | Engine::CachedDb => fields_from_pickle(raw, user, groups),
        }
    }

    async fn lookup(&self, handshake: &Handshake<'_>) -> Result<Identity, IdentityError> {
        let Some(session) = session_key(&handshake.head.headers, &self.cookie)? else {
            return Ok(Identity::default());
        };
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(&session))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let Some(raw) = raw else {
            // No session in Redis (expired, or a cached_db session out of the cache):
            // the application may still know the user.
            if let Some(fallback) = &self.fallback {
                return fallback.resolve(handshake).await;
            }
            return Ok(Identity::from_names(Some(session), None, Vec::new()));
        };
        let fields = match self.decode(&raw) {
            Ok(fields) => fields,
            Err(e) => {
                self.metrics
                    .identity_events
                    .with_label_values(&["django_rejected"])
                    .inc();
                warn!("django session refused ({e}); socket is anonymous");
                SessionFields::default()
            }
        };
        if fields.user.is_none() {
            if let Some(fallback) = &self.fallback {
                return fallback.resolve(handshake).await;
            }
        }
        Ok(Identity::from_names(
            Some(session),
            fields.user,
            fields.groups,
        ))
    }
}

impl IdentityResolver for DjangoResolver {
    fn resolve<'a>(
        &'a self,
        handshake: &'a Handshake<'a>,
    ) -> LocalBoxFuture<'a, Result<Identity, IdentityError>> {
        Box::pin(self.lookup(handshake))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: &str = "django.contrib.sessions.SessionStore";

    /// Signs like Django's TimestampSigner (used to build inputs, not as a reference).
    fn sign(payload_b64: &str, secret: &str) -> String {
        let value = format!("{payload_b64}:1qx2Ab");
        let mut mac = Hmac::<Sha256>::new_from_slice(&signer_key(SALT, secret)).unwrap();
        mac.update(value.as_bytes());
        format!(
            "{value}:{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn signed_sessions_verify_and_decode() {
        let json = br#"{"wsrelay:username":"jane","ws4redis:memberof":["staff"]}"#;
        let signed = sign(&URL_SAFE_NO_PAD.encode(json), "s3");
        let payload = unsign(signed.as_bytes(), SALT, "s3").unwrap();
        let fields = fields_from_json(&payload, "wsrelay:username", "ws4redis:memberof").unwrap();
        assert_eq!(
            fields,
            SessionFields {
                user: Some("jane".into()),
                groups: vec!["staff".into()]
            }
        );
        assert_eq!(
            unsign(signed.as_bytes(), SALT, "other"),
            Err(DecodeError::BadSignature)
        );
        assert_eq!(unsign(b"garbage", SALT, "s3"), Err(DecodeError::Malformed));
    }

    #[test]
    fn compressed_payloads_are_bounded() {
        use flate2::{write::ZlibEncoder, Compression};
        use std::io::Write;
        let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
        z.write_all(&vec![b' '; MAX_SESSION_BYTES + 10]).unwrap();
        let bomb = format!(".{}", URL_SAFE_NO_PAD.encode(z.finish().unwrap()));
        assert_eq!(
            unsign(sign(&bomb, "k").as_bytes(), SALT, "k"),
            Err(DecodeError::TooLarge)
        );
    }

    #[test]
    fn pickles_with_class_references_are_refused() {
        // {'u': 'jane'} then a datetime global: protocol 2 opcodes written by hand.
        let plain = b"\x80\x02}q\x00X\x01\x00\x00\x00uq\x01X\x04\x00\x00\x00janeq\x02s.";
        let fields = fields_from_pickle(plain, "u", "g").unwrap();
        assert_eq!(fields.user.as_deref(), Some("jane"));
        let global = b"\x80\x02cdatetime\ndatetime\nq\x00.";
        assert!(matches!(
            fields_from_pickle(global, "u", "g"),
            Err(DecodeError::Pickle(_))
        ));
        let os_system = b"cos\nsystem\n(S'true'\ntR.";
        assert!(matches!(
            fields_from_pickle(os_system, "u", "g"),
            Err(DecodeError::Pickle(_))
        ));
    }
}
