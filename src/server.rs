//! The listener: every connection starts as HTTP/1 in actix-http's dispatcher, and a
//! WebSocket leaves it at the upgrade.
//!
//! ```text
//! accept ─► HttpConn (per-address slot, request-head deadline)
//!             │
//!             ▼
//!           actix-http HTTP/1 dispatcher ─► actix-web routes (crate::http, assets)
//!             │ request with `Upgrade: websocket`
//!             ▼
//!           upgrade hook ─► handshake (crate::handshake) ─► 101 ─► socket task (crate::conn)
//!                                                  └─► refusal: status + plain reason
//! ```
//!
//! The dispatcher keeps 16 KiB of buffers per connection; an upgraded socket leaves it
//! with its raw stream and whatever the client sent behind the handshake, so a socket
//! owns none of those buffers and holds none of actix-server's per-worker connection
//! places (those now only bound connections still speaking HTTP). Sockets are bounded
//! by `max_sockets` instead.
//!
//! [`HttpConn`] bounds the HTTP part: every request head on a connection, keep-alive
//! included, must arrive within `policy.handshake_timeout` (the dispatcher itself only
//! times the first one), the rest of a request (body, handler, answer) within
//! `policy.request_timeout`, and a blocked write must make progress within that time;
//! a connection from a client address holds one of that address's
//! `max_connections_per_ip` places until it closes or becomes a socket.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_codec::Framed;
use actix_http::{h1, HttpService, KeepAlive, Request, StatusCode};
use actix_server::Server;
use actix_service::{fn_factory, fn_service, map_config, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::conn;
use crate::handshake::{plain_http, Handshaker};
use crate::http::HttpState;
use crate::policy::IpSlot;
use crate::worker::{Relay, Worker};
use crate::ws::Stream;

/// How long a closing HTTP connection may take to flush its last answer.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a refused connection is kept to deliver its answer (see [`close_gently`]).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Bytes read and dropped from a refused client before its connection is closed.
const REFUSAL_DISCARD: usize = 64 * 1024;
/// Refused connections lingering at once; beyond, refusals are answered and dropped.
const MAX_LINGERING: usize = 1024;

/// What the listener needs to serve.
pub struct Listener {
    pub relay: Arc<Relay>,
    pub handshaker: Arc<Handshaker>,
    pub http: web::Data<HttpState>,
    pub assets: web::Data<crate::assets::Assets>,
    pub workers: usize,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    pub keep_alive: Duration,
    pub shutdown_timeout: Duration,
    /// Refused connections lingering now (see [`Listener::refuse`]).
    pub lingering: Arc<AtomicUsize>,
}

impl Listener {
    /// Starts serving on `listener` (worker threads are started by actix-server).
    pub fn start(self, listener: std::net::TcpListener) -> io::Result<Server> {
        let mut builder = Server::build()
            .disable_signals()
            .shutdown_timeout(self.shutdown_timeout.as_secs().max(1));
        // One per CPU by default, at most what the registry can address.
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        builder = builder.workers(workers.min(crate::registry::MAX_WORKERS));
        let this = Arc::new(self);
        Ok(builder
            .listen("wsrelay", listener, move || this.worker_service())?
            .run())
    }

    /// The service of one worker thread; called once on each.
    fn worker_service(
        self: &Arc<Self>,
    ) -> impl actix_service::ServiceFactory<
        TcpStream,
        Config = (),
        Response = (),
        Error = actix_http::error::DispatchError,
        InitError = (),
    > {
        let worker = Worker::start(self.relay.clone());
        let this = self.clone();
        let accept = fn_service(move |tcp: TcpStream| {
            let accepted = this.accept(tcp);
            async move { accepted }
        });
        let upgrade = {
            let this = self.clone();
            fn_factory(move || {
                let context = Rc::new(UpgradeContext {
                    worker: worker.clone(),
                    handshaker: this.handshaker.clone(),
                    http: awc::Client::default(),
                    timeout: this.handshake_timeout,
                });
                async move {
                    Ok::<_, ()>(fn_service(move |(req, framed)| {
                        upgrade(context.clone(), req, framed)
                    }))
                }
            })
        };
        let http = self.http.clone();
        let url = http.handshaker.websocket_url.clone();
        let max = http.max_message_size;
        let assets = self.assets.clone();
        let app = App::new()
            .app_data(http)
            .configure(move |cfg| crate::http::configure(cfg, &url, max))
            .configure(move |cfg| crate::assets::configure(cfg, assets));
        let keep_alive = if self.keep_alive.is_zero() {
            KeepAlive::Disabled
        } else {
            KeepAlive::Timeout(self.keep_alive)
        };
        let h1 = HttpService::<HttpConn, _, _>::build()
            .keep_alive(keep_alive)
            // Request heads are timed by `HttpConn`, the first one included.
            .client_request_timeout(Duration::ZERO)
            .client_disconnect_timeout(DISCONNECT_TIMEOUT)
            .upgrade(upgrade)
            .h1(map_config(app, |_| AppConfig::default()));
        accept.and_then(h1)
    }

    /// Takes the client address's place and wraps the connection.
    fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(HttpConn, Option<SocketAddr>), actix_http::error::DispatchError> {
        // An IPv4 client of a dual-stack listener shows as `::ffff:a.b.c.d`: the
        // policy's addresses are compared in their canonical form.
        let peer = tcp
            .peer_addr()
            .ok()
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()));
        let _ = tcp.set_nodelay(true);
        let policy = &self.handshaker.policy;
        let slot = match peer.map(|p| p.ip()) {
            // Behind a trusted proxy the client is known only from the request.
            Some(ip) if !policy.is_trusted_proxy(ip) => {
                match self
                    .handshaker
                    .per_ip
                    .acquire(ip, policy.max_connections_per_ip)
                {
                    Some(slot) => Some(slot),
                    None => {
                        let refusal = crate::handshake::HandshakeError::PerIpLimit(ip);
                        self.refuse(tcp, refusal.to_http());
                        self.handshaker.count(Some(&refusal), None);
                        return Err(io::Error::other("per-address limit").into());
                    }
                }
            }
            _ => None,
        };
        let counted = Counted::new(&self.handshaker.metrics.http_connections);
        Ok((
            HttpConn::new(
                tcp,
                slot,
                counted,
                self.handshake_timeout,
                self.request_timeout,
            ),
            peer,
        ))
    }

    /// Answers a connection refused at accept, gently while few are being refused (see
    /// [`close_gently`]), at once beyond [`MAX_LINGERING`].
    fn refuse(&self, tcp: TcpStream, answer: Vec<u8>) {
        let lingering = self.lingering.clone();
        if lingering.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING {
            lingering.fetch_sub(1, Ordering::AcqRel);
            let _ = tcp.try_write(&answer);
            return;
        }
        tokio::task::spawn_local(async move {
            close_gently(tcp, answer).await;
            lingering.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// What the upgrade hook of one worker needs.
struct UpgradeContext {
    worker: Rc<Worker>,
    handshaker: Arc<Handshaker>,
    /// This worker's HTTP client, for the identity callback.
    http: awc::Client,
    /// Bound on writing the handshake's answer.
    timeout: Duration,
}

/// Takes a WebSocket request out of the dispatcher: decides the handshake, answers it,
/// and hands the raw stream (and what the client sent behind the request) to a socket
/// task on this worker.
async fn upgrade(
    context: Rc<UpgradeContext>,
    req: Request,
    framed: Framed<HttpConn, h1::Codec>,
) -> Result<(), actix_http::Error> {
    let parts = framed.into_parts();
    let (mut tcp, slot) = parts.io.into_inner();
    let decided = context
        .handshaker
        .accept(req.head(), slot, &context.http)
        .await;
    let mut answer = parts.write_buf.to_vec();
    match decided {
        Ok(accepted) => {
            answer.extend_from_slice(&accepted.response);
            if write_bounded(&mut tcp, &answer, context.timeout).await {
                conn::spawn(
                    &context.worker,
                    Stream::Tcp(tcp),
                    accepted.params,
                    parts.read_buf,
                );
            }
        }
        Err(refusal) => {
            answer.extend_from_slice(&refusal.to_http());
            close_gently(tcp, answer).await;
        }
    }
    Ok(())
}

/// Sends `answer` and closes without a reset: closing a socket with unread bytes
/// makes the kernel reset it, and a reset can destroy the answer before the client
/// reads it. So the write side is shut first and what the client still sends is read
/// and dropped, within [`REFUSAL_LINGER`] and [`REFUSAL_DISCARD`].
async fn close_gently(mut tcp: TcpStream, answer: Vec<u8>) {
    let linger = async {
        tcp.write_all(&answer).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut dropped = 0;
        while dropped < REFUSAL_DISCARD {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => dropped += n,
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
}

async fn write_bounded(tcp: &mut TcpStream, bytes: &[u8], limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, tcp.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// An HTTP connection: the TCP stream, the client address's place, and the deadlines
/// of the request in progress.
pub struct HttpConn {
    stream: TcpStream,
    slot: Option<IpSlot>,
    clock: RequestClock,
    _counted: Counted,
}

/// Counts one connection in a gauge for as long as it lives.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl HttpConn {
    fn new(
        stream: TcpStream,
        slot: Option<IpSlot>,
        counted: Counted,
        head_limit: Duration,
        request_limit: Duration,
    ) -> Self {
        let mut clock = RequestClock::new(head_limit, request_limit);
        // The first head's time runs from the connect.
        clock.start();
        HttpConn {
            stream,
            slot,
            clock,
            _counted: counted,
        }
    }

    /// The stream and the address's place, for the socket this connection becomes.
    pub fn into_inner(self) -> (TcpStream, Option<IpSlot>) {
        (self.stream, self.slot)
    }

    /// A deadline passed: a late request head is answered 408 (if the socket takes it
    /// at once); any other stall just ends the connection.
    fn time_out(&self) -> io::Error {
        let head = matches!(self.clock.phase, Phase::Head { .. });
        if head && self.clock.write_blocked.is_none() {
            let body = "request head not received within policy.handshake_timeout";
            let answer = plain_http(StatusCode::REQUEST_TIMEOUT, body, None);
            let _ = self.stream.try_write(&answer);
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            "HTTP request stalled past its deadline",
        )
    }
}

/// Where a connection is in its current request, as seen from the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: the dispatcher's keep-alive timer applies.
    Idle,
    /// Receiving a request head: `line_len` bytes into the current line, after
    /// `lines` complete lines.
    Head { line_len: usize, lines: usize },
    /// Past the head: the body, the handler, the answer.
    Past,
}

/// The deadlines of an HTTP connection, followed from the bytes it reads and writes:
/// a request head must arrive within `policy.handshake_timeout` of its first byte (or
/// of the connect), a whole request within `policy.request_timeout`, and a write that
/// finds the kernel buffer full must make progress within `policy.request_timeout`.
/// Pipelined requests are followed only roughly (bytes behind a head are not parsed).
struct RequestClock {
    head_limit: Duration,
    request_limit: Duration,
    phase: Phase,
    /// When the current request began.
    started: Instant,
    /// Since when a write waits for room in the kernel buffer.
    write_blocked: Option<Instant>,
    /// Made on first use; `armed_for` is the deadline it is set to.
    timer: Option<Pin<Box<Sleep>>>,
    armed_for: Option<Instant>,
}

impl RequestClock {
    fn new(head_limit: Duration, request_limit: Duration) -> Self {
        RequestClock {
            head_limit,
            request_limit,
            phase: Phase::Idle,
            started: Instant::now(),
            write_blocked: None,
            timer: None,
            armed_for: None,
        }
    }

    fn start(&mut self) {
        self.phase = Phase::Head {
            line_len: 0,
            lines: 0,
        };
        self.started = Instant::now();
    }

    /// The earliest deadline in force, if any.
    fn deadline(&self) -> Option<Instant> {
        let request = match self.phase {
            Phase::Idle => None,
            Phase::Head { .. } => Some(self.started + self.head_limit),
            Phase::Past => Some(self.started + self.request_limit),
        };
        let write = self.write_blocked.map(|since| since + self.request_limit);
        match (request, write) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn passed(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Whether the deadline passed; otherwise the task is woken when it does.
    fn poll_passed(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline() else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if self.armed_for != Some(deadline) {
            timer.as_mut().reset(deadline);
            self.armed_for = Some(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Follows the bytes just read.
    fn saw(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            match self.phase {
                Phase::Past => return,
                Phase::Idle => {
                    self.start();
                    self.step(byte);
                }
                Phase::Head { .. } => self.step(byte),
            }
        }
    }

    fn step(&mut self, byte: u8) {
        let Phase::Head { line_len, lines } = self.phase else {
            return;
        };
        self.phase = match byte {
            // An empty line after at least one line ends the head (empty lines before
            // the request line are skipped, as RFC 9112 allows).
            b'\n' if line_len == 0 && lines > 0 => Phase::Past,
            b'\n' if line_len == 0 => self.phase,
            b'\n' => Phase::Head {
                line_len: 0,
                lines: lines + 1,
            },
            b'\r' => self.phase,
            _ => Phase::Head {
                line_len: line_len + 1,
                lines,
            },
        };
    }

    /// A write made progress; once the answer to a request has started, the next bytes
    /// begin a new request.
    fn wrote(&mut self) {
        self.write_blocked = None;
        if self.phase == Phase::Past {
            self.phase = Phase::Idle;
        }
    }
}

impl AsyncRead for HttpConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.clock.saw(&buf.filled()[before..]);
                if this.clock.passed() {
                    return Poll::Ready(Err(this.time_out()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.clock.poll_passed(cx) => Poll::Ready(Err(this.time_out())),
            other => other,
        }
    }
}

impl HttpConn {
    /// Follows a write's outcome for the deadlines.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) if n > 0 => self.clock.wrote(),
            Poll::Pending => {
                self.clock.write_blocked.get_or_insert_with(Instant::now);
                if self.clock.poll_passed(cx) {
                    return Poll::Ready(Err(self.time_out()));
                }
            }
            _ => {}
        }
        written
    }
}

impl AsyncWrite for HttpConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase_after(chunks: &[&[u8]]) -> Phase {
        let mut clock = RequestClock::new(Duration::from_secs(1), Duration::from_secs(30));
        for chunk in chunks {
            clock.saw(chunk);
        }
        clock.phase
    }

    #[test]
    fn a_head_ends_at_its_blank_line_whatever_the_pieces() {
        let head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(phase_after(&[head]), Phase::Past);
        let pieces: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(phase_after(&pieces), Phase::Past);
        assert!(matches!(phase_after(&[&head[..20]]), Phase::Head { .. }));
        // Bare line feeds, and empty lines before the request line.
        assert_eq!(
            phase_after(&[b"\r\n\r\nGET / HTTP/1.1\nA: b\n\n"]),
            Phase::Past
        );
        assert!(matches!(phase_after(&[b"\r\n\r\n"]), Phase::Head { .. }));
    }

    #[test]
    fn an_answer_starts_the_next_request() {
        let mut clock = RequestClock::new(Duration::from_secs(1), Duration::from_secs(30));
        clock.saw(b"GET / HTTP/1.1\r\n\r\nbody");
        assert_eq!(clock.phase, Phase::Past);
        assert!(
            clock.deadline().is_some(),
            "a request in progress has a deadline"
        );
        clock.wrote();
        assert_eq!(clock.phase, Phase::Idle);
        assert!(
            clock.deadline().is_none(),
            "between requests, keep-alive decides"
        );
        clock.saw(b"G");
        assert!(matches!(clock.phase, Phase::Head { .. }));
    }
}
