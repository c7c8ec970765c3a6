//! Requests for an event stream (`sse_url`) or a long-poll (`poll_url`) leave the HTTP
//! dispatcher at their head, as a WebSocket leaves it at its upgrade: they become
//! sockets on the worker's lean path (its fan-out, queues and timers), and hold none of
//! the dispatcher's buffers while they wait.
//!
//! actix-http hands only `Upgrade: websocket` requests to a hook, so the decision is
//! taken below it, in [`super::HttpConn`], which already follows request heads for
//! their deadlines. At the start of each request head (the first on the connection, or
//! the next one after an answer) it looks at the first bytes: when they may begin
//! `GET <sse_url>` or `GET <poll_url>`, it holds them back from the dispatcher until the
//! head is complete; a stream request then takes the TCP stream and the dispatcher sees
//! the connection end between two requests, as after any client's close. Anything else
//! is handed back, byte for byte. Browsers and proxies do not pipeline, so a stream
//! request arrives when the answer before it is complete; a pipelined one reaches the
//! routes, which refuse it with a reason ([`crate::http`]).

use std::net::SocketAddr;
use std::rc::Rc;

use actix_http::header::{HeaderName, HeaderValue};
use actix_http::{Method, RequestHead, StatusCode, Uri, Version};
use bytes::BytesMut;
use tokio::net::TcpStream;

use super::{close_gently, write_bounded, UpgradeContext};
use crate::event_stream;
use crate::handshake::{plain_http, Handshaker, Transport};
use crate::policy::IpSlot;
use crate::ws::Stream;

/// Room in a stream request's head besides its cookies (`policy.max_cookie_bytes`).
const HEAD_BESIDES_COOKIES: usize = 8 * 1024;
/// Headers a stream request may have.
const MAX_HEADERS: usize = 64;

/// The request lines that start a stream request, `GET <prefix>` each.
pub struct StreamRoutes {
    routes: Vec<(Vec<u8>, Transport)>,
    /// The longest head a stream request may have: what the cookie limit allows, and
    /// room for the rest.
    pub max_head: usize,
}

/// What the first bytes of a request head say.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not a stream request: the dispatcher's.
    Other,
    /// Too few bytes to tell, or a stream request whose head is not complete.
    NeedMore,
    /// A whole stream request head, `len` bytes.
    Stream { transport: Transport, len: usize },
}

impl StreamRoutes {
    /// The routes of `handshaker`'s prefixes.
    pub fn new(handshaker: &Handshaker) -> Self {
        let mut routes = Self::of(&handshaker.sse_url, &handshaker.poll_url);
        routes.max_head = handshaker.policy.max_cookie_bytes + HEAD_BESIDES_COOKIES;
        routes
    }

    fn of(sse_url: &str, poll_url: &str) -> Self {
        let line = |url: &str| format!("GET {url}").into_bytes();
        StreamRoutes {
            routes: vec![
                (line(sse_url), Transport::EventStream),
                (line(poll_url), Transport::Poll),
            ],
            max_head: HEAD_BESIDES_COOKIES,
        }
    }

    /// Looks at what arrived of a request head.
    pub fn see(&self, head: &[u8]) -> Seen {
        let mut undecided = false;
        for (line, transport) in &self.routes {
            if head.starts_with(line) {
                return match head_len(head) {
                    Some(len) => Seen::Stream {
                        transport: *transport,
                        len,
                    },
                    None => Seen::NeedMore,
                };
            }
            undecided |= line.starts_with(head);
        }
        if undecided {
            Seen::NeedMore
        } else {
            Seen::Other
        }
    }
}

/// The length of the head in `bytes` (up to and including its blank line), if complete.
fn head_len(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Why a stream request's head could not be read.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error("request head is too large (policy.max_cookie_bytes and 8 KiB besides)")]
    TooLarge,
    #[error("request has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("malformed request head: {0}")]
    Malformed(String),
}

impl HeadError {
    fn answer(&self) -> Vec<u8> {
        let status = match self {
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        };
        plain_http(status, &self.to_string(), None)
    }
}

/// Parses a complete request head into actix-http's form, for the handshake.
fn parse_head(bytes: &[u8], peer: Option<SocketAddr>) -> Result<RequestHead, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::TooLarge),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    }
    let malformed = |what: &str| HeadError::Malformed(what.to_string());
    let mut head = RequestHead::default();
    head.method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
        .map_err(|_| malformed("method"))?;
    head.uri = request
        .path
        .unwrap_or("")
        .parse::<Uri>()
        .map_err(|_| malformed("request target"))?;
    head.version = match request.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    for header in request.headers.iter() {
        let name =
            HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| malformed("header name"))?;
        let value = HeaderValue::from_bytes(header.value).map_err(|_| malformed("header value"))?;
        head.headers.append(name, value);
    }
    head.peer_addr = peer;
    Ok(head)
}

/// Serves a stream request taken from the dispatcher: decides it as a handshake, then
/// answers its head and hands the stream to a socket task of this worker, or refuses
/// it with a status and a plain reason.
pub async fn serve(
    context: Rc<UpgradeContext>,
    mut tcp: TcpStream,
    slot: Option<IpSlot>,
    head: BytesMut,
    transport: Transport,
) {
    let peer = tcp
        .peer_addr()
        .ok()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()));
    let head = match parse_head(&head, peer) {
        Ok(head) => head,
        Err(e) => return close_gently(tcp, e.answer()).await,
    };
    let decided = context
        .handshaker
        .accept(&head, slot, &context.http, transport)
        .await;
    let accepted = match decided {
        Ok(accepted) => accepted,
        Err(refusal) => {
            let status = refusal.status();
            let passing = status == StatusCode::SERVICE_UNAVAILABLE
                || status == StatusCode::TOO_MANY_REQUESTS;
            let answer = match transport {
                Transport::EventStream if passing => {
                    let origin = context.handshaker.allowed_origin(&head);
                    event_stream::try_again_later(&refusal.to_string(), origin)
                }
                _ => refusal.to_http(),
            };
            return close_gently(tcp, answer).await;
        }
    };
    match transport {
        Transport::Poll => crate::poll::spawn(&context.worker, Stream::Tcp(tcp), accepted),
        _ => {
            if write_bounded(&mut tcp, &accepted.response, context.timeout).await {
                let stream = Stream::Tcp(tcp);
                crate::conn::spawn(&context.worker, stream, accepted.params, BytesMut::new());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_stream_request_heads_are_taken() {
        let routes = StreamRoutes::of("/sse/", "/poll/");
        assert_eq!(routes.see(b"GE"), Seen::NeedMore);
        assert_eq!(routes.see(b"GET /ss"), Seen::NeedMore);
        assert_eq!(
            routes.see(b"GET /sse/chat?subscribe-broadcast HTTP/1.1\r\n"),
            Seen::NeedMore
        );
        let head = b"GET /sse/chat HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            routes.see(head),
            Seen::Stream {
                transport: Transport::EventStream,
                len: head.len()
            }
        );
        assert_eq!(
            routes.see(b"GET /poll/c HTTP/1.1\n\nrest"),
            Seen::Stream {
                transport: Transport::Poll,
                len: 22
            }
        );
        assert_eq!(routes.see(b"GET /ws/chat HTTP/1.1\r\n"), Seen::Other);
        assert_eq!(routes.see(b"POST /sse/"), Seen::Other);
        assert_eq!(routes.see(b"GET /ssx"), Seen::Other);
    }

    #[test]
    fn heads_parse_into_the_handshake_form_and_bad_ones_are_refused() {
        let head = parse_head(
            b"GET /sse/chat?subscribe-broadcast HTTP/1.1\r\nHost: x\r\nLast-Event-ID: broadcast:1-0\r\n\r\n",
            None,
        )
        .unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.path(), "/sse/chat");
        assert_eq!(head.uri.query(), Some("subscribe-broadcast"));
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers.get("last-event-id").unwrap(), "broadcast:1-0");
        assert!(matches!(
            parse_head(b"GET /sse/\x01 HTTP/1.1\r\n\r\n", None),
            Err(HeadError::Malformed(_))
        ));
        let many: String = (0..70).map(|i| format!("h{i}: v\r\n")).collect();
        let head = format!("GET /sse/c HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_head(head.as_bytes(), None),
            Err(HeadError::TooManyHeaders)
        ));
    }
}
