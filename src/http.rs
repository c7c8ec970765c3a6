//! HTTP routes: the WebSocket handshake, `/health` and `POST /api/publish`.
//!
//! Everything about a socket is decided here, before the upgrade: facility and flags
//! from the URL, identity from the request, and from those the exact Redis keys. A
//! request that cannot be served gets a plain-text reason and a 4xx/5xx status, never an
//! upgrade.

use std::sync::Arc;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Deserialize;

use crate::channel::{validate_name, Audience, AudienceKinds, Flags, NameError, NameKind};

use crate::conn::{self, ConnParams};
use crate::identity::{Handshake, Identity, IdentityError};
use crate::publisher::Recipients;
use crate::Gateway;
use log::debug;

/// Most keys one `POST /api/publish` may name.
pub const MAX_PUBLISH_KEYS: usize = 1024;
/// Longest expiry accepted (ten years), in seconds.
pub const MAX_EXPIRE: u64 = 315_360_000;
/// Room for the JSON around the message in a publish request.
const PUBLISH_ENVELOPE: usize = 64 * 1024;

/// Mounts every route; `websocket_url` is the configured prefix (`/ws/`).
pub fn configure(cfg: &mut web::ServiceConfig, websocket_url: &str, max_message_size: usize) {
    cfg.service(web::resource(format!("{websocket_url}{{facility:.*}}")).to(websocket))
        .service(web::resource("/health").get(health))
        .service(web::resource("/ready").get(ready))
        .service(web::resource("/metrics").get(metrics))
        .service(
            web::resource("/api/publish")
                .app_data(web::PayloadConfig::new(
                    max_message_size * 6 + PUBLISH_ENVELOPE,
                ))
                .post(publish),
        );
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("HTTP method must be a GET")]
    MethodNotGet,
    #[error("Client does not wish to upgrade to a websocket")]
    NotUpgrade,
    #[error("invalid WebSocket handshake: {0}")]
    Handshake(String),
    #[error("facility is not valid percent-encoded UTF-8")]
    BadPath,
    #[error("{0}")]
    Facility(NameError),
    #[error("cookie header is larger than {0} bytes")]
    CookieTooLarge(usize),
    #[error("{0}")]
    Origin(String),
    #[error("too many connections from {0}")]
    PerIpLimit(std::net::IpAddr),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Policy(String),
    #[error("too many subscriptions: {0} keys, at most {1}")]
    TooManySubscriptions(usize, usize),
    #[error("server is shutting down")]
    ShuttingDown,
}

impl HandshakeError {
    /// The reason this refusal is counted under (`wsrelay_handshakes_total{result}`).
    fn counter(&self) -> &'static str {
        match self {
            HandshakeError::CookieTooLarge(_) => "cookie_size",
            HandshakeError::Origin(_) => "origin",
            HandshakeError::PerIpLimit(_) => "per_ip_limit",
            HandshakeError::Identity(IdentityError::Unavailable(_)) => "identity_unavailable",
            HandshakeError::Identity(_) => "identity",
            HandshakeError::Policy(_) => "policy",
            HandshakeError::TooManySubscriptions(..) => "subscriptions",
            HandshakeError::ShuttingDown => "shutting_down",
            _ => "bad_request",
        }
    }
}

impl ResponseError for HandshakeError {
    fn status_code(&self) -> StatusCode {
        use HandshakeError::*;
        match self {
            Identity(IdentityError::Unavailable(_)) | ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Identity(IdentityError::Refused(_))
            | Origin(_)
            | Policy(_)
            | TooManySubscriptions(..) => StatusCode::FORBIDDEN,
            CookieTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            PerIpLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        plain(self.status_code(), self.to_string())
    }
}

fn plain(status: StatusCode, reason: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(reason)
}

async fn websocket(
    req: HttpRequest,
    body: web::Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, HandshakeError> {
    let accepted = accept(&req, body, &gateway).await;
    let result = match &accepted {
        Ok(_) => "accepted",
        Err(e) => {
            debug!("handshake refused ({}): {e}", e.counter());
            e.counter()
        }
    };
    gateway
        .metrics
        .handshakes
        .with_label_values(&[result])
        .inc();
    accepted
}

/// Checks a handshake in order (cheapest first), then upgrades and spawns the socket.
async fn accept(
    req: &HttpRequest,
    body: web::Payload,
    gateway: &web::Data<Gateway>,
) -> Result<HttpResponse, HandshakeError> {
    let policy = &gateway.policy;
    if gateway.shutdown.is_cancelled() {
        return Err(HandshakeError::ShuttingDown);
    }
    if req.method() != Method::GET {
        return Err(HandshakeError::MethodNotGet);
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if !upgrade.is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::NotUpgrade);
    }
    let cookie_bytes: usize = req.headers().get_all(header::COOKIE).map(|v| v.len()).sum();
    if cookie_bytes > policy.max_cookie_bytes {
        return Err(HandshakeError::CookieTooLarge(policy.max_cookie_bytes));
    }
    policy.check_origin(req).map_err(HandshakeError::Origin)?;
    let facility = facility_from_path(req.path(), &gateway.config.websocket_url)?;
    let client = policy.client_ip(req);
    let slot = match client {
        Some(ip) => Some(
            gateway
                .per_ip
                .acquire(ip, policy.max_connections_per_ip)
                .ok_or(HandshakeError::PerIpLimit(ip))?,
        ),
        None => None,
    };
    let requested = Flags::parse(req.query_string());
    let handshake = Handshake {
        request: req,
        facility: &facility,
        flags: requested,
    };
    let identity = gateway.resolver.resolve(&handshake).await?;
    let flags = match &identity.allowed {
        Some(allowed) => requested.narrow(allowed),
        None => requested,
    };
    policy
        .check_flags(&facility, &flags, &identity)
        .map_err(HandshakeError::Policy)?;
    let listening = audiences_for(flags.subscribe, &identity);
    let subscribe = keys_of(gateway, &facility, &listening);
    let publish = keys_of(gateway, &facility, &audiences_for(flags.publish, &identity));
    if subscribe.len() > policy.max_subscriptions {
        return Err(HandshakeError::TooManySubscriptions(
            subscribe.len(),
            policy.max_subscriptions,
        ));
    }
    // Identity resolution may have taken a while: a stop may have begun meanwhile.
    if gateway.shutdown.is_cancelled() {
        return Err(HandshakeError::ShuttingDown);
    }
    let protocol = first_requested_protocol(req);
    let (response, session, stream) =
        actix_ws::handle_with_protocols(req, body, protocol.as_slice())
            .map_err(|e| HandshakeError::Handshake(e.to_string()))?;
    let params = ConnParams {
        id: uuid::Uuid::new_v4(),
        peer: client.map_or_else(|| "-".into(), |ip| ip.to_string()),
        facility,
        // Metric labels: the kinds listened to, each once (audiences_for emits each
        // kind's audiences together, so adjacent duplicates are all the duplicates).
        audiences: {
            let mut kinds: Vec<&'static str> = listening.iter().map(Audience::kind).collect();
            kinds.dedup();
            kinds
        },
        user: identity.user,
        subscribe,
        publish,
        echo: flags.echo,
        _slot: slot,
    };
    let gateway = gateway.clone().into_inner();
    let task = gateway
        .tracker
        .track_future(conn::run(gateway.clone(), params, session, stream));
    actix_web::rt::spawn(task);
    Ok(response)
}

/// The facility is the rest of the path after `websocket_url`, percent-decoded and
/// validated (it becomes part of Redis keys).
fn facility_from_path(path: &str, websocket_url: &str) -> Result<String, HandshakeError> {
    let raw = path.strip_prefix(websocket_url).unwrap_or("");
    let facility = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| HandshakeError::BadPath)?;
    validate_name(NameKind::Facility, &facility).map_err(HandshakeError::Facility)?;
    Ok(facility.into_owned())
}

/// The first subprotocol the client offered; it is echoed, as ws4redis did.
fn first_requested_protocol(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| !p.is_empty())
}

/// The audiences of the requested kinds that this identity has: user and group need a
/// user, session needs a session key; the others are skipped.
fn audiences_for(kinds: AudienceKinds, identity: &Identity) -> Vec<Audience> {
    let mut audiences = Vec::new();
    if kinds.broadcast {
        audiences.push(Audience::Broadcast);
    }
    if let (true, Some(user)) = (kinds.user, &identity.user) {
        audiences.push(Audience::User(user.clone()));
    }
    if kinds.group && identity.user.is_some() {
        audiences.extend(identity.groups.iter().cloned().map(Audience::Group));
    }
    if let (true, Some(session)) = (kinds.session, &identity.session) {
        audiences.push(Audience::Session(session.clone()));
    }
    audiences
}

fn keys_of(gateway: &Gateway, facility: &str, audiences: &[Audience]) -> Vec<Arc<str>> {
    audiences
        .iter()
        .map(|a| Arc::from(gateway.keys.key(a, facility)))
        .collect()
}

async fn health(gateway: web::Data<Gateway>) -> HttpResponse {
    let stats = gateway.stats_json();
    match gateway.broker.health() {
        Ok(()) => HttpResponse::Ok().json(stats),
        Err(reason) => {
            let mut body = stats;
            body["status"] = "unavailable".into();
            body["reason"] = reason.into();
            HttpResponse::ServiceUnavailable().json(body)
        }
    }
}

/// Readiness for load balancers: 200 while the broker is connected and the gateway is
/// not stopping, 503 with the reason otherwise.
async fn ready(gateway: web::Data<Gateway>) -> HttpResponse {
    if gateway.shutdown.is_cancelled() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: the gateway is stopping".into(),
        );
    }
    match gateway.broker.health() {
        Ok(()) => plain(StatusCode::OK, "ready".into()),
        Err(reason) => plain(StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

/// Prometheus text format.
async fn metrics(gateway: web::Data<Gateway>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(gateway.metrics.render())
}

/// The body of `POST /api/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    facility: String,
    audiences: Audiences,
    message: String,
    /// Seconds to keep the message for late joiners; default `redis.expire`, 0 = not kept.
    expire: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Audiences {
    #[serde(default)]
    broadcast: bool,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    sessions: Vec<String>,
}

impl Audiences {
    /// Adds these audiences to `to`, validating every name.
    fn add_to(&self, to: Recipients) -> Result<Recipients, NameError> {
        let to = if self.broadcast { to.broadcast() } else { to };
        to.users(self.users.iter().map(String::as_str))?
            .groups(self.groups.iter().map(String::as_str))?
            .sessions(self.sessions.iter().map(String::as_str))
    }
}

async fn publish(req: HttpRequest, body: web::Bytes, gateway: web::Data<Gateway>) -> HttpResponse {
    let response = publish_checked(&req, &body, &gateway).await;
    let status = response.status();
    gateway
        .metrics
        .publish_api
        .with_label_values(&[status.as_str()])
        .inc();
    response
}

async fn publish_checked(req: &HttpRequest, body: &web::Bytes, gateway: &Gateway) -> HttpResponse {
    let Some(token) = &gateway.config.publish_token else {
        return plain(
            StatusCode::NOT_FOUND,
            "publish API is off: no publish_token is configured".into(),
        );
    };
    if !bearer_matches(req, token.expose()) {
        return HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
            .content_type("text/plain; charset=utf-8")
            .body("missing or wrong bearer token");
    }
    let request: PublishRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    let bad = |why: String| plain(StatusCode::BAD_REQUEST, why);
    let recipients = match Recipients::new(request.facility.as_str()) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    let recipients = match request.audiences.add_to(recipients) {
        Ok(r) if r.is_empty() => return bad("audiences: name at least one audience".into()),
        Ok(r) if r.len() > MAX_PUBLISH_KEYS => {
            return bad(format!("audiences: at most {MAX_PUBLISH_KEYS} per request"))
        }
        Ok(r) => r,
        Err(e) => return bad(format!("audiences: {e}")),
    };
    if request.message.len() > gateway.config.max_message_size {
        return bad(format!(
            "message is longer than max_message_size ({} bytes)",
            gateway.config.max_message_size
        ));
    }
    let keys: Vec<Arc<str>> = recipients
        .keys(&gateway.keys)
        .into_iter()
        .map(Arc::from)
        .collect();
    let expire = request.expire.unwrap_or(gateway.config.redis.expire);
    if expire > MAX_EXPIRE {
        return bad(format!("expire: at most {MAX_EXPIRE} seconds"));
    }
    let payload = web::Bytes::from(request.message);
    match gateway.broker.publish(&keys, &payload, expire).await {
        Ok(()) => {
            let keys: Vec<&str> = keys.iter().map(|k| &**k).collect();
            HttpResponse::Ok().json(serde_json::json!({ "keys": keys }))
        }
        Err(e) => plain(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Compares the bearer token in constant time.
fn bearer_matches(req: &HttpRequest, token: &str) -> bool {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, t)| t.trim());
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facility_is_the_decoded_rest_of_the_path() {
        assert_eq!(
            facility_from_path("/ws/chat/room1", "/ws/").unwrap(),
            "chat/room1"
        );
        assert_eq!(facility_from_path("/ws/caf%C3%A9", "/ws/").unwrap(), "café");
        assert!(matches!(
            facility_from_path("/ws/a%3Ab", "/ws/"),
            Err(HandshakeError::Facility(_))
        ));
        assert!(matches!(
            facility_from_path("/ws/%FF", "/ws/"),
            Err(HandshakeError::BadPath)
        ));
        assert!(matches!(
            facility_from_path("/ws/", "/ws/"),
            Err(HandshakeError::Facility(NameError::Empty(_)))
        ));
    }

    /// Fuzz-style: whatever a client sends in the path, query or cookie, nothing panics
    /// and every name that reaches a key passed validation.
    mod fuzz {
        use super::*;
        use crate::channel::KeySpace;
        use crate::identity::{session_key, Identity};
        use actix_web::test::TestRequest;
        use proptest::prelude::*;

        fn key_is_safe(key: &str) -> bool {
            !key.chars()
                .any(|c| c.is_control() || c.is_whitespace() || "*?[]{}\\\"'".contains(c))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            #[test]
            fn facility_paths(raw in "(/ws/)?([a-z:/%*?. \\[\\]{}\\x00-\\x1f\u{80}-\u{10ffff}]|%[0-9A-Fa-f]{2}){0,40}") {
                if let Ok(facility) = facility_from_path(&raw, "/ws/") {
                    prop_assert!(validate_name(NameKind::Facility, &facility).is_ok());
                    let key = KeySpace::new(Some("p")).key(&Audience::Broadcast, &facility);
                    prop_assert_eq!(key.matches(':').count(), 2);
                    prop_assert!(key_is_safe(&key));
                }
            }

            #[test]
            fn query_strings(query in "\\PC{0,200}") {
                let flags = Flags::parse(&query);
                let _ = flags.to_string();
            }

            #[test]
            fn cookies(header in "\\PC{0,300}") {
                if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&header) {
                    let req = TestRequest::default().insert_header((header::COOKIE, value)).to_http_request();
                    if let Ok(Some(key)) = session_key(&req, "sessionid") {
                        prop_assert!(!key.contains(':') && key_is_safe(&key) && key.len() <= crate::channel::MAX_NAME_LEN);
                    }
                }
            }

            #[test]
            fn identity_names(user in "\\PC{0,40}", groups in proptest::collection::vec("\\PC{0,20}", 0..100)) {
                let id = Identity::from_names(Some(user.clone()), Some(user), groups);
                for name in id.user.iter().chain(&id.groups).chain(&id.session) {
                    prop_assert!(!name.contains(':') && !name.contains('/') && key_is_safe(name));
                }
                prop_assert!(id.groups.len() <= crate::identity::MAX_GROUPS);
            }

            #[test]
            fn stored_sessions_and_tokens(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
                use crate::identity::django;
                let _ = django::unsign(&raw, "salt", "secret");
                let _ = django::fields_from_pickle(&raw, "u", "g");
                let _ = django::fields_from_json(&raw, "u", "g");
            }
        }
    }
}
