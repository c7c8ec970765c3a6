//! HTTP routes: `/health`, `/ready`, `/metrics`, `POST /api/publish`,
//! `POST /pub/<facility>` (a page publishing without a WebSocket), and the answer to a
//! request for a WebSocket URL that does not upgrade. The demo's `POST /demo/publish`
//! ([`crate::assets`]) publishes through [`publish_body`] too.
//!
//! WebSocket upgrades, event streams and long-polls never reach these routes: they
//! leave the HTTP server ([`crate::server`]) and are decided by [`crate::handshake`].

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::channel::{KeySpace, NameError};
use crate::config::MAX_EXPIRE;
use crate::handshake::{HandshakeError, Handshaker};
use crate::metrics::Metrics;
use crate::publisher::Recipients;
use crate::secret::Secret;

/// Most keys one `POST /api/publish` may name.
pub const MAX_PUBLISH_KEYS: usize = 1024;
/// Room for the JSON around the message in a publish request.
const PUBLISH_ENVELOPE: usize = 64 * 1024;

/// What the HTTP routes need; one per process.
pub struct HttpState {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    pub keys: KeySpace,
    pub handshaker: Arc<Handshaker>,
    /// Bearer token of `POST /api/publish`; `None` turns the endpoint off.
    pub publish_token: Option<Secret>,
    pub max_message_size: usize,
    /// Default expiry of published messages (`redis.expire`).
    pub expire: u64,
    /// Cancelled when the gateway stops: `/ready` answers 503.
    pub shutdown: CancellationToken,
}

impl HttpState {
    /// Counters for `/health`.
    pub fn stats_json(&self) -> serde_json::Value {
        let m = &self.metrics;
        serde_json::json!({
            "status": "ok",
            "broker": self.broker.kind(),
            "sockets": m.sockets.get(),
            "delivered": m.frames_delivered.get(),
            "slow_consumer_closes": m.slow_consumer_closes.get(),
            "counters": m.counters_json(),
            "redis_nodes": self.broker.nodes(),
        })
    }
}

/// Mounts every route; `websocket_url` is the configured prefix (`/ws/`).
pub fn configure(cfg: &mut web::ServiceConfig, urls: &Handshaker, max_message_size: usize) {
    let websocket_url = &urls.websocket_url;
    cfg.service(web::resource(format!("{websocket_url}{{facility:.*}}")).to(not_upgraded))
        .service(
            web::resource(format!("{}{{facility:.*}}", urls.pub_url))
                .post(publish_from_page)
                .route(web::method(actix_web::http::Method::OPTIONS).to(publish_preflight)),
        )
        .service(web::resource(format!("{}{{facility:.*}}", urls.sse_url)).get(pipelined))
        .service(web::resource(format!("{}{{facility:.*}}", urls.poll_url)).get(pipelined))
        .service(web::resource("/health").get(health))
        .service(web::resource("/ready").get(ready))
        .service(web::resource("/metrics").get(metrics))
        .service(
            web::resource("/api/publish")
                .app_data(web::Data::new(PublishLimit(publish_limit(
                    max_message_size,
                ))))
                .post(publish),
        );
}

/// The largest `POST /api/publish` body, in bytes.
struct PublishLimit(usize);

/// The largest body of a publish request (`POST /api/publish`, and the demo's
/// `POST /demo/publish`), in bytes: room for a message of `max_message_size` bytes
/// written with JSON escapes, and the JSON around it.
pub fn publish_limit(max_message_size: usize) -> usize {
    max_message_size * 6 + PUBLISH_ENVELOPE
}

/// A request for a WebSocket URL that did not ask to upgrade: refused with the
/// handshake's reason (ws4redis's texts).
async fn not_upgraded(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    state.handshaker.refuse_plain(req.head()).error_response()
}

/// An event stream or long-poll request that reached the routes: it came behind
/// another request on its connection (see [`crate::server`]).
async fn pipelined() -> HttpResponse {
    let why = "an event stream or long-poll request must not be pipelined behind another \
               request on its connection";
    plain(StatusCode::BAD_REQUEST, why.to_string())
}

/// `POST /pub/<facility>?publish-…`: a page on an event stream or a long-poll
/// publishes its body as a WebSocket with these publish flags would (same identity,
/// `Origin` rule, policy and authorization callback); answers the message's ids.
async fn publish_from_page(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<HttpState>,
) -> HttpResponse {
    let head = req.head();
    let handshaker = &state.handshaker;
    let rest = head.uri.path().strip_prefix(handshaker.pub_url.as_str());
    let Some(http) = req.app_data::<awc::Client>() else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "no HTTP client".into());
    };
    let keys = match handshaker
        .accept_publish(head, rest.unwrap_or(""), http)
        .await
    {
        Ok(keys) => keys,
        // The page of an allowed origin may read why it was refused.
        Err(HandshakeError::Origin(why)) => return plain(StatusCode::FORBIDDEN, why),
        Err(refusal) => return with_cors(refusal.error_response(), head),
    };
    let limit = state.max_message_size;
    let answer = match body.to_bytes_limited(limit).await {
        Ok(Ok(payload)) => match state.broker.publish(&keys, &payload, state.expire).await {
            Ok(ids) => {
                let ids: Vec<Option<String>> =
                    ids.iter().map(|id| id.map(|id| id.to_string())).collect();
                HttpResponse::Ok().json(serde_json::json!({ "ids": ids }))
            }
            Err(e) => plain(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        },
        Ok(Err(e)) => plain(StatusCode::BAD_REQUEST, format!("request body: {e}")),
        Err(_) => plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("message is longer than max_message_size ({limit} bytes)"),
        ),
    };
    with_cors(answer, head)
}

/// The CORS preflight of `POST /pub/`: allowed for the origins the policy allows.
async fn publish_preflight(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    let head = req.head();
    let peer = head.peer_addr.map(|a| a.ip());
    if let Err(why) = state.handshaker.policy.check_origin(head, peer) {
        return plain(StatusCode::FORBIDDEN, why);
    }
    let mut answer = HttpResponse::NoContent();
    answer
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "POST"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, "content-type"))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"));
    with_cors(answer.finish(), head)
}

/// Lets the page of an allowed origin read the answer (only allowed origins get this
/// far), with its cookies.
fn with_cors(mut answer: HttpResponse, head: &actix_web::dev::RequestHead) -> HttpResponse {
    if let Some(origin) = head.headers.get(header::ORIGIN) {
        let headers = answer.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::HeaderValue::from_static("true"),
        );
        headers.insert(header::VARY, header::HeaderValue::from_static("origin"));
    }
    answer
}

/// An answer with a plain-text reason.
pub fn plain(status: StatusCode, reason: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(reason)
}

async fn health(state: web::Data<HttpState>) -> HttpResponse {
    let stats = state.stats_json();
    match state.broker.health() {
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
async fn ready(state: web::Data<HttpState>) -> HttpResponse {
    if state.shutdown.is_cancelled() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: the gateway is stopping".into(),
        );
    }
    match state.broker.health() {
        Ok(()) => plain(StatusCode::OK, "ready".into()),
        Err(reason) => plain(StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

/// Prometheus text format.
async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// The body of `POST /api/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub facility: String,
    pub audiences: Audiences,
    /// A string is published as is; any other JSON value as its compact text, its
    /// object keys in the order given.
    message: Box<serde_json::value::RawValue>,
    /// Seconds to keep the message for late joiners; default `redis.expire`, 0 = not kept.
    pub expire: Option<u64>,
}

/// Who a publish request names (names not validated yet).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audiences {
    #[serde(default)]
    pub broadcast: bool,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub sessions: Vec<String>,
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

async fn publish(
    req: HttpRequest,
    body: web::Payload,
    limit: web::Data<PublishLimit>,
    state: web::Data<HttpState>,
) -> HttpResponse {
    let response = publish_checked(&req, body, limit.0, &state).await;
    let status = response.status();
    state
        .metrics
        .publish_api
        .with_label_values(&[status.as_str()])
        .inc();
    response
}

/// The token is checked before the body is read: a caller without it costs no body.
async fn publish_checked(
    req: &HttpRequest,
    body: web::Payload,
    limit: usize,
    state: &HttpState,
) -> HttpResponse {
    let Some(token) = &state.publish_token else {
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
    publish_body(body, limit, state, |_| Ok(())).await
}

/// Reads a publish request from `body` (at most `limit` bytes), asks `allowed` whether
/// this caller may make it (`Err`: 403 with the reason), then validates and publishes
/// it: what `POST /api/publish` does once the caller is known, also for the demo page
/// ([`crate::assets`]).
pub async fn publish_body(
    body: web::Payload,
    limit: usize,
    state: &HttpState,
    allowed: impl FnOnce(&PublishRequest) -> Result<(), String>,
) -> HttpResponse {
    // The outer error is the limit; the inner one, the body's own (a broken transfer).
    let body = match body.to_bytes_limited(limit).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => return plain(StatusCode::BAD_REQUEST, format!("request body: {e}")),
        Err(_) => {
            let why = format!("request body is larger than {limit} bytes");
            return plain(StatusCode::PAYLOAD_TOO_LARGE, why);
        }
    };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    if let Err(why) = allowed(&request) {
        return plain(StatusCode::FORBIDDEN, why);
    }
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
    let message = match message_text(&request.message) {
        Ok(m) => m,
        Err(e) => return bad(format!("message: {e}")),
    };
    if message.len() > state.max_message_size {
        return bad(format!(
            "message is longer than max_message_size ({} bytes)",
            state.max_message_size
        ));
    }
    let keys: Vec<Arc<str>> = recipients
        .keys(&state.keys)
        .into_iter()
        .map(Arc::from)
        .collect();
    let expire = request.expire.unwrap_or(state.expire);
    if expire > MAX_EXPIRE {
        return bad(format!("expire: at most {MAX_EXPIRE} seconds"));
    }
    let payload = web::Bytes::from(message);
    match state.broker.publish(&keys, &payload, expire).await {
        Ok(ids) => {
            let keys: Vec<&str> = keys.iter().map(|k| &**k).collect();
            let ids: Vec<Option<String>> =
                ids.iter().map(|id| id.map(|id| id.to_string())).collect();
            HttpResponse::Ok().json(serde_json::json!({ "keys": keys, "ids": ids }))
        }
        Err(e) => plain(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The text a publication's `message` stands for: a JSON string's value, or any other
/// JSON value without the whitespace between its tokens.
fn message_text(raw: &serde_json::value::RawValue) -> serde_json::Result<String> {
    let text = raw.get();
    if text.starts_with('"') {
        return serde_json::from_str(text);
    }
    let mut compact = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        }
        compact.push(c);
    }
    Ok(compact)
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

    fn text(json: &str) -> String {
        let raw: Box<serde_json::value::RawValue> = serde_json::from_str(json).unwrap();
        message_text(&raw).unwrap()
    }

    #[test]
    fn a_string_is_published_as_is_and_other_json_compact() {
        assert_eq!(text(r#""hi \"there\"""#), r#"hi "there""#);
        assert_eq!(text(r#""{\"a\": 1}""#), r#"{"a": 1}"#);
        assert_eq!(
            text(" { \"z\" : [1, 2.5, true, null],\n \"a\": \"x y \\\" {\" } "),
            r#"{"z":[1,2.5,true,null],"a":"x y \" {"}"#
        );
        assert_eq!(text("42"), "42");
        assert_eq!(text("null"), "null");
    }
}
