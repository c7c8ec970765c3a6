//! The WebSocket handshake, decided on the request head before anything is upgraded.
//!
//! Everything about a socket is settled here: the RFC 6455 headers, the access policy
//! (`Origin`, limits, rules), facility and flags from the URL, identity from the
//! request, the web application's say (the authorization callback, when configured),
//! and from those the exact Redis keys. Checks run cheapest first. A request that
//! cannot be served gets an HTTP status and a plain-text reason, never an upgrade; an
//! accepted one gets the `101` answer and the [`SocketParams`] its task runs with. A
//! refusal by the web application keeps its own status (401 or 403) and text.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use actix_http::header::{self, HeaderMap};
use actix_http::{Method, RequestHead, StatusCode};
use base64::Engine as _;
use sha1::{Digest, Sha1};
use tokio_util::sync::CancellationToken;

use crate::authorize::{AuthorizeError, Authorizer};
use crate::channel::{
    validate_name, Audience, AudienceKinds, Flags, KeySpace, NameError, NameKind,
};
use crate::conn::{Holds, SocketParams};
use crate::event_stream;
use crate::facility::Facilities;
use crate::history::{self, StreamId, SUBPROTOCOL};
use crate::identity::{Handshake, Identity, IdentityError, IdentityResolver};
use crate::metrics::Metrics;
use crate::policy::{IpLimiter, IpSlot, PolicyConfig, SocketLimit};
use crate::ratelog::RateLog;
use crate::registry::Form;

/// The GUID of RFC 6455 §1.3, hashed with the client's key.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Versions accepted: 13 (RFC 6455) and the drafts 7 and 8, which ws4redis accepted
/// and which frame messages the same way.
const VERSIONS: [&str; 3] = ["13", "8", "7"];

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not found: WebSocket URLs start with {0}")]
    NotFound(String),
    #[error("HTTP method must be a GET")]
    MethodNotGet,
    #[error("Client does not wish to upgrade to a websocket")]
    NotUpgrade,
    #[error("invalid WebSocket handshake: it needs HTTP/1.1 and a Host header")]
    NotHttp11,
    #[error("invalid WebSocket handshake: the Connection header must include 'upgrade'")]
    NoConnectionUpgrade,
    #[error("Sec-WebSocket-Version is missing; this server speaks version 13")]
    MissingVersion,
    #[error("unsupported WebSocket version {0:?}; this server speaks version 13")]
    UnsupportedVersion(String),
    #[error("invalid WebSocket handshake: Sec-WebSocket-Key must be 16 bytes in base64")]
    BadKey,
    #[error("facility is not valid percent-encoded UTF-8")]
    BadPath,
    #[error("{0}")]
    Facility(NameError),
    #[error("cookie header is larger than {0} bytes")]
    CookieTooLarge(usize),
    #[error("{0}")]
    Origin(String),
    #[error("too many sockets: this gateway holds at most {0} (max_sockets)")]
    TooManySockets(usize),
    #[error("too many connections from {0}")]
    PerIpLimit(IpAddr),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Authorize(#[from] AuthorizeError),
    #[error("{0}")]
    Policy(String),
    #[error("too many subscriptions: {0} keys, at most {1}")]
    TooManySubscriptions(usize, usize),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("{0}: {1}")]
    BadResume(&'static str, String),
    #[error(
        "publish flags are for WebSocket sockets: an event stream or a long-poll only \
         receives (publish with POST to the pub_url)"
    )]
    PublishOnStream,
    #[error(
        "nothing to listen to: name subscribe-broadcast, -user, -group or -session \
         (user, group and session need a logged-in client)"
    )]
    NothingToListen,
    #[error("subscribe flags are for sockets: POST to the pub_url only publishes")]
    SubscribeOnPublish,
    #[error(
        "nothing to publish to: name publish-broadcast, -user, -group or -session \
         (user, group and session need a logged-in client)"
    )]
    NothingToPublish,
}

/// What a request opens: a WebSocket, or one of the transports that only receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    /// Server-Sent Events ([`crate::event_stream`]).
    EventStream,
    /// One long-poll request ([`crate::poll`]).
    Poll,
}

impl HandshakeError {
    /// The reason this refusal is counted under (`wsrelay_handshakes_total{result}`).
    pub fn counter(&self) -> &'static str {
        use HandshakeError::*;
        match self {
            CookieTooLarge(_) => "cookie_size",
            Origin(_) => "origin",
            PerIpLimit(_) => "per_ip_limit",
            TooManySockets(_) => "max_sockets",
            Identity(IdentityError::Unavailable(_)) => "identity_unavailable",
            Identity(_) => "identity",
            Authorize(AuthorizeError::Unavailable(_)) => "authorize_unavailable",
            Authorize(_) => "authorize",
            Policy(_) => "policy",
            TooManySubscriptions(..) => "subscriptions",
            ShuttingDown => "shutting_down",
            _ => "bad_request",
        }
    }

    pub fn status(&self) -> StatusCode {
        use HandshakeError::*;
        match self {
            NotFound(_) => StatusCode::NOT_FOUND,
            MissingVersion => StatusCode::UPGRADE_REQUIRED,
            Identity(IdentityError::Unavailable(_))
            | Authorize(AuthorizeError::Unavailable(_))
            | ShuttingDown
            | TooManySockets(_) => StatusCode::SERVICE_UNAVAILABLE,
            Identity(IdentityError::Refused(refusal))
            | Authorize(AuthorizeError::Refused(refusal)) => refusal.status,
            Origin(_) | Policy(_) | TooManySubscriptions(..) => StatusCode::FORBIDDEN,
            NothingToListen | NothingToPublish => StatusCode::FORBIDDEN,
            CookieTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            PerIpLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// A header the answer carries besides the reason (RFC 6455 §4.4: the versions
    /// this server speaks).
    pub fn header(&self) -> Option<(&'static str, &'static str)> {
        matches!(
            self,
            HandshakeError::MissingVersion | HandshakeError::UnsupportedVersion(_)
        )
        .then_some(("sec-websocket-version", "13, 8, 7"))
    }

    /// The whole HTTP answer, for a connection that leaves the HTTP server.
    pub fn to_http(&self) -> Vec<u8> {
        plain_http(self.status(), &self.to_string(), self.header())
    }
}

/// A whole plain-text HTTP answer that closes the connection, for connections that
/// are answered outside the HTTP server.
pub fn plain_http(status: StatusCode, body: &str, header: Option<(&str, &str)>) -> Vec<u8> {
    let extra = header.map_or_else(String::new, |(n, v)| format!("{n}: {v}\r\n"));
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

impl actix_web::ResponseError for HandshakeError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> actix_web::HttpResponse {
        let mut response = actix_web::HttpResponse::build(self.status());
        if let Some(header) = self.header() {
            response.insert_header(header);
        }
        response
            .content_type("text/plain; charset=utf-8")
            .body(self.to_string())
    }
}

/// An accepted handshake: the answer's head to send (`101`, or an event stream's;
/// for a long-poll, the head's lines before its length), and the socket it opens.
pub struct Accepted {
    pub response: Vec<u8>,
    pub params: SocketParams,
    /// Long-poll only: per key of `params.subscribe`, the fingerprint of the stored
    /// message the client has seen (`since=<label>:~<hex>` on keys without history).
    pub seen: Vec<Option<u64>>,
}

/// Decides handshakes; one per process, shared by the workers.
pub struct Handshaker {
    pub websocket_url: String,
    pub sse_url: String,
    pub poll_url: String,
    pub pub_url: String,
    /// The access policy in force (`policy`, plus the demo's rule when it is on).
    pub policy: PolicyConfig,
    pub keys: KeySpace,
    pub facilities: Arc<Facilities>,
    pub resolver: Box<dyn IdentityResolver>,
    /// The authorization callback (`policy.callback.url`), asked after the static
    /// policy passed.
    pub authorizer: Option<Authorizer>,
    /// Open sockets and pending connections per client address.
    pub per_ip: Arc<IpLimiter>,
    pub sockets: Arc<SocketLimit>,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// Refusals logged at `info`, rate-limited per reason.
    pub refusals: RateLog,
    /// Sockets with mistyped flags, logged at `info`, rate-limited.
    pub mistyped_flags: RateLog,
}

impl Handshaker {
    /// Decides the handshake of `head` and counts the result. `slot` is the place the
    /// connection took under `max_connections_per_ip` when it was accepted; `http` is
    /// the worker's client for the identity and authorization callbacks.
    pub async fn accept(
        &self,
        head: &RequestHead,
        slot: Option<IpSlot>,
        http: &awc::Client,
        transport: Transport,
    ) -> Result<Accepted, HandshakeError> {
        let accepted = self.decide(head, slot, http, transport).await;
        self.count(accepted.as_ref().err(), Some(head));
        accepted
    }

    /// The refusal for a request that reached the HTTP routes (it did not ask to
    /// upgrade, or not properly), counted like any other.
    pub fn refuse_plain(&self, head: &RequestHead) -> HandshakeError {
        let refusal = self
            .check_protocol(head)
            .err()
            .unwrap_or(HandshakeError::NotUpgrade);
        self.count(Some(&refusal), Some(head));
        refusal
    }

    /// Counts a handshake's result (`None`: accepted) in `wsrelay_handshakes_total`
    /// and logs a refusal (rate-limited per reason, see [`RateLog`]) with the client's
    /// address and the facility asked for; `head` is the request, when one was read.
    pub fn count(&self, refusal: Option<&HandshakeError>, head: Option<&RequestHead>) {
        let result = match refusal {
            None => "accepted",
            Some(e) => {
                self.refusals
                    .info(e.counter(), || self.refusal_line(e, head));
                e.counter()
            }
        };
        self.metrics.handshakes.with_label_values(&[result]).inc();
    }

    /// `socket refused (origin) from 10.0.0.7 for facility "chat": origin …`.
    fn refusal_line(&self, e: &HandshakeError, head: Option<&RequestHead>) -> String {
        let client = match (e, head) {
            (HandshakeError::PerIpLimit(ip), _) => Some(*ip),
            (_, Some(head)) => self
                .policy
                .client_ip(head, head.peer_addr.map(|a: SocketAddr| a.ip())),
            _ => None,
        };
        let client = client.map_or_else(|| "an unknown address".to_string(), |ip| ip.to_string());
        let facility = head
            .and_then(|h| {
                let path = h.uri.path();
                [&self.websocket_url, &self.sse_url, &self.poll_url]
                    .iter()
                    .find_map(|prefix| path.strip_prefix(prefix.as_str()))
            })
            .map(|raw| percent_encoding::percent_decode_str(raw).decode_utf8_lossy());
        match facility {
            Some(facility) => format!(
                "socket refused ({}) from {client} for facility {facility:?}: {e}",
                e.counter()
            ),
            None => format!("socket refused ({}) from {client}: {e}", e.counter()),
        }
    }

    /// RFC 6455 §4.2.1: method, upgrade headers, version and key.
    fn check_protocol<'h>(&self, head: &'h RequestHead) -> Result<&'h str, HandshakeError> {
        if head.method != Method::GET {
            return Err(HandshakeError::MethodNotGet);
        }
        let headers = &head.headers;
        if head.version < actix_http::Version::HTTP_11 || !headers.contains_key(header::HOST) {
            return Err(HandshakeError::NotHttp11);
        }
        if !has_token(headers, header::UPGRADE, "websocket") {
            return Err(HandshakeError::NotUpgrade);
        }
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return Err(HandshakeError::NoConnectionUpgrade);
        }
        let version = headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .ok_or(HandshakeError::MissingVersion)?;
        let version = version.to_str().unwrap_or("").trim();
        if !VERSIONS.contains(&version) {
            return Err(HandshakeError::UnsupportedVersion(version.to_string()));
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .and_then(|k| k.to_str().ok())
            .map(str::trim)
            .filter(|k| {
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .is_ok_and(|raw| raw.len() == 16)
            })
            .ok_or(HandshakeError::BadKey)?;
        Ok(key)
    }

    /// What every request for a facility must pass first: the cookie's size, the
    /// `Origin` (a page of a foreign site must not use the visitor's cookie), and a
    /// valid facility (`rest` of the path after the transport's prefix).
    fn check_request(&self, head: &RequestHead, rest: &str) -> Result<String, HandshakeError> {
        let policy = &self.policy;
        let peer = head.peer_addr.map(|a: SocketAddr| a.ip());
        policy
            .check_origin(head, peer)
            .map_err(HandshakeError::Origin)?;
        let cookie_bytes: usize = head.headers.get_all(header::COOKIE).map(|v| v.len()).sum();
        if cookie_bytes > policy.max_cookie_bytes {
            return Err(HandshakeError::CookieTooLarge(policy.max_cookie_bytes));
        }
        facility_from_path(rest)
    }

    /// The request's `Origin`, when it has one and the policy allows it (a page of that
    /// origin may then read answers: CORS with credentials).
    pub fn allowed_origin<'h>(&self, head: &'h RequestHead) -> Option<&'h str> {
        let peer = head.peer_addr.map(|a: SocketAddr| a.ip());
        self.policy.check_origin(head, peer).ok()?;
        head.headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
    }

    /// The flags the client may use and who it is: its query's flags, narrowed by the
    /// identity and checked by the policy, then by the web application. `transport`:
    /// the socket's (only a WebSocket publishes), or `None` for `POST /pub/` (only
    /// publishes).
    async fn authorize(
        &self,
        head: &RequestHead,
        facility: &str,
        client: Option<IpAddr>,
        http: &awc::Client,
        transport: Option<Transport>,
    ) -> Result<(Flags, Identity), HandshakeError> {
        let policy = &self.policy;
        let query = head.uri.query().unwrap_or("");
        let requested = Flags::parse(query);
        match transport {
            Some(Transport::WebSocket) => {}
            Some(_) if requested.publish.any() => return Err(HandshakeError::PublishOnStream),
            None if requested.subscribe.any() => return Err(HandshakeError::SubscribeOnPublish),
            None if !requested.publish.any() => return Err(HandshakeError::NothingToPublish),
            _ => {}
        }
        if let Some(name) = Flags::mistyped(query) {
            // The client chose it: bounded in the log.
            let name: String = name.chars().take(64).collect();
            self.metrics.unknown_flags.inc();
            self.mistyped_flags.info("unknown flags", || {
                let client = client.map_or_else(|| "-".to_string(), |ip| ip.to_string());
                format!(
                    "socket from {client} for facility {facility:?} names an unknown flag \
                     {name:?}; it opens without it (flags: subscribe-/publish- followed by \
                     broadcast, user, group or session, and echo)"
                )
            });
        }
        let handshake = Handshake {
            head,
            facility,
            flags: requested,
            http,
        };
        let identity = self.resolver.resolve(&handshake).await?;
        let flags = match &identity.allowed {
            Some(allowed) => requested.narrow(allowed),
            None => requested,
        };
        policy
            .check_flags(facility, &flags, &identity)
            .map_err(HandshakeError::Policy)?;
        // The application is asked last: about a socket the gateway would accept, with
        // the identity it gets (see `crate::authorize`).
        let flags = match &self.authorizer {
            Some(authorizer) => {
                let asked = Handshake { flags, ..handshake };
                authorizer.authorize(&asked, &identity).await?
            }
            None => flags,
        };
        Ok((flags, identity))
    }

    /// Decides a `POST /pub/<facility>?publish-…` (publishing without a socket) and
    /// counts the result: the keys the body goes to.
    pub async fn accept_publish(
        &self,
        head: &RequestHead,
        rest: &str,
        http: &awc::Client,
    ) -> Result<Vec<Arc<str>>, HandshakeError> {
        let decided = async {
            let facility = self.check_request(head, rest)?;
            let peer = head.peer_addr.map(|a: SocketAddr| a.ip());
            let client = self.policy.client_ip(head, peer);
            let (flags, identity) = self.authorize(head, &facility, client, http, None).await?;
            let publish = self.keys_of(&facility, &audiences_for(flags.publish, &identity));
            match publish.is_empty() {
                true => Err(HandshakeError::NothingToPublish),
                false => Ok(publish.to_vec()),
            }
        }
        .await;
        self.count(decided.as_ref().err(), Some(head));
        decided
    }

    /// The URL prefix of `transport`.
    pub fn url(&self, transport: Transport) -> &str {
        match transport {
            Transport::WebSocket => &self.websocket_url,
            Transport::EventStream => &self.sse_url,
            Transport::Poll => &self.poll_url,
        }
    }

    async fn decide(
        &self,
        head: &RequestHead,
        slot: Option<IpSlot>,
        http: &awc::Client,
        transport: Transport,
    ) -> Result<Accepted, HandshakeError> {
        let policy = &self.policy;
        if self.shutdown.is_cancelled() {
            return Err(HandshakeError::ShuttingDown);
        }
        let path = head.uri.path();
        let url = self.url(transport);
        let Some(rest) = path.strip_prefix(url) else {
            return Err(HandshakeError::NotFound(url.to_string()));
        };
        let key = match transport {
            Transport::WebSocket => Some(self.check_protocol(head)?),
            _ if head.method != Method::GET => return Err(HandshakeError::MethodNotGet),
            _ => None,
        };
        let facility = self.check_request(head, rest)?;
        let peer = head.peer_addr.map(|a: SocketAddr| a.ip());
        let permit = self
            .sockets
            .try_acquire()
            .ok_or(HandshakeError::TooManySockets(self.sockets.max()))?;
        let client = policy.client_ip(head, peer);
        let ip_slot = match (slot, client) {
            // The connection came through a proxy: the client's own slot is taken now.
            (None, Some(ip)) => Some(
                self.per_ip
                    .acquire(ip, policy.max_connections_per_ip)
                    .ok_or(HandshakeError::PerIpLimit(ip))?,
            ),
            (slot, _) => slot,
        };
        let (flags, identity) = self
            .authorize(head, &facility, client, http, Some(transport))
            .await?;
        let listening = audiences_for(flags.subscribe, &identity);
        let Positions {
            ids: resume, seen, ..
        } = self.positions(head, transport, &listening)?;
        let subscribe = self.keys_of(&facility, &listening);
        let publish = self.keys_of(&facility, &audiences_for(flags.publish, &identity));
        if subscribe.len() > policy.max_subscriptions {
            return Err(HandshakeError::TooManySubscriptions(
                subscribe.len(),
                policy.max_subscriptions,
            ));
        }
        // Identity and authorization may have taken a while: a stop may have begun
        // meanwhile.
        if self.shutdown.is_cancelled() {
            return Err(HandshakeError::ShuttingDown);
        }
        let params = SocketParams {
            id: uuid::Uuid::new_v4(),
            peer: client,
            slow_consumer: self.facilities.of(&facility).slow_consumer,
            facility: facility.into(),
            listening: AudienceKinds::of(&listening),
            user: identity.user.map(Into::into),
            subscribe,
            publish,
            echo: flags.echo,
            form: match transport {
                Transport::WebSocket if offers_protocol(&head.headers, SUBPROTOCOL) => {
                    Form::Envelope
                }
                Transport::WebSocket => Form::Plain,
                Transport::EventStream => Form::Event,
                Transport::Poll => Form::Poll,
            },
            resume,
            holds: Holds {
                ip_slot,
                permit: Some(permit),
            },
        };
        // Only an origin the policy let through reaches here: it may read the answer.
        let origin = head
            .headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if transport != Transport::WebSocket && listening.is_empty() {
            return Err(HandshakeError::NothingToListen);
        }
        let response = match (transport, key) {
            (Transport::WebSocket, Some(key)) => {
                switching_protocols(key, chosen_protocol(&head.headers))
            }
            (Transport::EventStream, _) => event_stream::response_head(origin),
            _ => crate::poll::response_lines(origin),
        };
        Ok(Accepted {
            response,
            params,
            seen,
        })
    }

    /// Where the client resumes from, per key of `listening`: a WebSocket's
    /// `last-id=`; an event stream's `lastEventId=` and `Last-Event-ID` header (the
    /// header, which the browser sends on its own reconnects, wins); a long-poll's
    /// `since=`, whose ids on keys without history name the stored message seen.
    fn positions<'l>(
        &self,
        head: &RequestHead,
        transport: Transport,
        listening: &'l [Audience],
    ) -> Result<Positions<'l>, HandshakeError> {
        let query = head.uri.query().unwrap_or("");
        let param = match transport {
            Transport::WebSocket => "last-id",
            Transport::EventStream => "lastEventId",
            Transport::Poll => "since",
        };
        let bad = |e| HandshakeError::BadResume(param, e);
        let mut positions = Positions::new(listening, transport == Transport::Poll);
        for value in query_values(query, param) {
            positions.add(&value.map_err(bad)?).map_err(bad)?;
        }
        if transport == Transport::EventStream {
            if let Some(value) = head.headers.get("last-event-id") {
                let value = value.to_str().map_err(|_| {
                    HandshakeError::BadResume("Last-Event-ID", "not ASCII".to_string())
                })?;
                positions
                    .add(value)
                    .map_err(|e| HandshakeError::BadResume("Last-Event-ID", e))?;
            }
        }
        Ok(positions)
    }

    fn keys_of(&self, facility: &str, audiences: &[Audience]) -> Arc<[Arc<str>]> {
        audiences
            .iter()
            .map(|a| Arc::from(self.keys.key(a, facility)))
            .collect()
    }
}

/// Whether a comma-separated header lists `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `101` answer for `key`, echoing `protocol` when the client offered one.
pub fn switching_protocols(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let protocol =
        protocol.map_or_else(String::new, |p| format!("sec-websocket-protocol: {p}\r\n"));
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n{protocol}\r\n"
    )
    .into_bytes()
}

/// The facility is the rest of the path after `websocket_url`, percent-decoded and
/// validated (it becomes part of Redis keys).
fn facility_from_path(raw: &str) -> Result<String, HandshakeError> {
    let facility = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| HandshakeError::BadPath)?;
    validate_name(NameKind::Facility, &facility).map_err(HandshakeError::Facility)?;
    Ok(facility.into_owned())
}

/// The subprotocols the client offered, in its order.
fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

fn offers_protocol(headers: &HeaderMap, protocol: &str) -> bool {
    offered_protocols(headers).any(|p| p == protocol)
}

/// The subprotocol the answer names: the envelope's ([`SUBPROTOCOL`]) when offered;
/// otherwise the first one offered, if it is a valid token, echoed as ws4redis did.
fn chosen_protocol(headers: &HeaderMap) -> Option<&str> {
    if offers_protocol(headers, SUBPROTOCOL) {
        return Some(SUBPROTOCOL);
    }
    offered_protocols(headers).next().filter(|p| {
        p.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    })
}

/// The percent-decoded values of the query parameter `name`.
fn query_values<'q>(
    query: &'q str,
    name: &'q str,
) -> impl Iterator<Item = Result<std::borrow::Cow<'q, str>, String>> + 'q {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, value)| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| "not valid percent-encoded UTF-8".to_string())
        })
}

/// The positions a client resumes from, one per audience in `listening` (in its
/// order), from lists of `<label>:<id>,…` (labels as the envelope names keys:
/// `broadcast`, `user`, `session`, `group:<name>`). A label the socket does not listen
/// to is skipped: the page may hold an id for a key its identity no longer gives (a
/// user who logged out, a group left), and a browser cannot read why a request failed.
/// A later list wins for a label both name.
struct Positions<'l> {
    listening: &'l [Audience],
    /// Whether `~<hex>` (a long-poll's stored-message fingerprint) is accepted.
    fingerprints: bool,
    /// Empty (no allocation) when nothing resumes: most sockets.
    ids: Vec<Option<StreamId>>,
    seen: Vec<Option<u64>>,
}

impl<'l> Positions<'l> {
    fn new(listening: &'l [Audience], fingerprints: bool) -> Self {
        Positions {
            listening,
            fingerprints,
            ids: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn add(&mut self, list: &str) -> Result<(), String> {
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (label, id) = item
                .rsplit_once(':')
                .ok_or_else(|| format!("{item:?} is not <key>:<id>"))?;
            let at = self
                .listening
                .iter()
                .position(|a| history::label(a.kind(), a.group_name()) == label);
            let fingerprint = id.strip_prefix('~').filter(|_| self.fingerprints);
            let Some(at) = at else {
                continue;
            };
            let n = self.listening.len();
            match fingerprint {
                Some(hex) => {
                    let hash = u64::from_str_radix(hex, 16)
                        .map_err(|_| format!("{item:?}: not a message id"))?;
                    self.seen.resize(n, None);
                    self.seen[at] = Some(hash);
                }
                None => {
                    let id: StreamId = id.parse().map_err(|e| format!("{item:?}: {e}"))?;
                    self.ids.resize(n, None);
                    self.ids[at] = Some(id);
                }
            }
        }
        Ok(())
    }
}

/// The audiences of the requested kinds that this identity has: user needs a user name,
/// session a session key, group the identity's groups (which every source gives only
/// to a logged-in client, named or not: a stock ws4redis session holds groups and a user
/// id but no user name); the others are skipped.
fn audiences_for(kinds: AudienceKinds, identity: &Identity) -> Vec<Audience> {
    let mut audiences = Vec::new();
    if kinds.broadcast {
        audiences.push(Audience::Broadcast);
    }
    if let (true, Some(user)) = (kinds.user, &identity.user) {
        audiences.push(Audience::User(user.clone()));
    }
    if kinds.group {
        audiences.extend(identity.groups.iter().cloned().map(Audience::Group));
    }
    if let (true, Some(session)) = (kinds.session, &identity.session) {
        audiences.push(Audience::Session(session.clone()));
    }
    audiences
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_the_rfc_example() {
        let answer =
            String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
        assert!(answer.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!answer.contains("protocol"));
        let answer = String::from_utf8(switching_protocols("k", Some("chat"))).unwrap();
        assert!(answer.contains("sec-websocket-protocol: chat\r\n"));
    }

    #[test]
    fn refusals_carry_status_reason_and_version() {
        let raw = String::from_utf8(HandshakeError::MissingVersion.to_http()).unwrap();
        assert!(
            raw.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{raw}"
        );
        assert!(raw.contains("sec-websocket-version: 13, 8, 7\r\n"));
        assert!(raw
            .ends_with("\r\n\r\nSec-WebSocket-Version is missing; this server speaks version 13"));
        let e = HandshakeError::UnsupportedVersion("12".into());
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("\"12\""));
    }

    #[test]
    fn every_refusal_has_a_plain_text_body_with_its_reason() {
        use crate::webapp::Refusal;
        use HandshakeError::*;
        let refusals = [
            NotFound("/ws/".into()),
            MethodNotGet,
            NotUpgrade,
            NotHttp11,
            NoConnectionUpgrade,
            MissingVersion,
            UnsupportedVersion("12".into()),
            BadKey,
            BadPath,
            Facility(NameError::BadSegment),
            CookieTooLarge(8192),
            Origin("origin \"http://x\" is not allowed".into()),
            TooManySockets(1),
            PerIpLimit([127, 0, 0, 1].into()),
            Identity(IdentityError::BadCookie(NameError::Empty(
                NameKind::Session,
            ))),
            Identity(IdentityError::Refused(Refusal::forbidden("not logged in"))),
            Identity(IdentityError::Unavailable("redis down".into())),
            Authorize(AuthorizeError::Refused(Refusal::forbidden("no"))),
            Authorize(AuthorizeError::Unavailable("status 500".into())),
            Policy("publish-broadcast is not allowed on facility chat".into()),
            TooManySubscriptions(3, 2),
            ShuttingDown,
        ];
        for e in refusals {
            let reason = e.to_string();
            assert!(!reason.trim().is_empty(), "{e:?}");
            let raw = String::from_utf8(e.to_http()).unwrap();
            assert!(raw.contains("content-type: text/plain; charset=utf-8\r\n"));
            assert!(raw.ends_with(&format!("\r\n\r\n{reason}")), "{raw}");
            let response = actix_web::ResponseError::error_response(&e);
            assert_eq!(response.status(), e.status());
        }
    }

    #[test]
    fn the_applications_refusals_keep_their_status_and_text() {
        use crate::webapp::Refusal;
        let refusal = Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: "Your subscription has expired".into(),
        };
        let by_identity = HandshakeError::from(IdentityError::Refused(refusal.clone()));
        let by_authorization = HandshakeError::from(AuthorizeError::Refused(refusal));
        for e in [&by_identity, &by_authorization] {
            let raw = String::from_utf8(e.to_http()).unwrap();
            assert!(raw.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{raw}");
            assert!(raw.contains("content-type: text/plain; charset=utf-8\r\n"));
            assert!(
                raw.ends_with("\r\n\r\nYour subscription has expired"),
                "{raw}"
            );
        }
        assert_eq!(by_identity.counter(), "identity");
        assert_eq!(by_authorization.counter(), "authorize");
        let down = HandshakeError::from(AuthorizeError::Unavailable("status 500".into()));
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.counter(), "authorize_unavailable");
    }

    #[test]
    fn facility_is_the_decoded_rest_of_the_path() {
        assert_eq!(facility_from_path("chat/room1").unwrap(), "chat/room1");
        assert_eq!(facility_from_path("caf%C3%A9").unwrap(), "café");
        assert!(matches!(
            facility_from_path("a%3Ab"),
            Err(HandshakeError::Facility(_))
        ));
        assert!(matches!(
            facility_from_path("%FF"),
            Err(HandshakeError::BadPath)
        ));
        assert!(matches!(
            facility_from_path(""),
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
                let rest = raw.strip_prefix("/ws/").unwrap_or(&raw);
                if let Ok(facility) = facility_from_path(rest) {
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
                    let req = TestRequest::default().insert_header((actix_web::http::header::COOKIE, value)).to_http_request();
                    if let Ok(Some(key)) = session_key(req.headers(), "sessionid") {
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
                let keys = ["secret".to_string()];
                let _ = django::signing::unsign(&raw, "salt", &keys, Some(std::time::Duration::from_secs(60)));
                let _ = django::signing::session_hash_matches(&String::from_utf8_lossy(&raw), "pw", &keys);
                let _ = django::session::fields_from_pickle(&raw, "u", "g");
                let _ = django::session::fields_from_json(&raw, "u", "g");
            }
        }
    }
}
