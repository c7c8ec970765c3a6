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
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::conn;
use crate::handshake::{plain_http, Handshaker, Transport};
use crate::http::HttpState;
use crate::policy::IpSlot;
use crate::worker::{Relay, Worker};
use crate::ws::Stream;

use self::streams::{Seen, StreamRoutes};

mod streams;

/// Bytes of each request header line kept to read the body's framing.
const HEADER_PREFIX: usize = 40;
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
        let context = Rc::new(UpgradeContext {
            worker,
            handshaker: self.handshaker.clone(),
            http: awc::Client::default(),
            timeout: self.handshake_timeout,
            streams: StreamRoutes::new(&self.handshaker),
        });
        let this = self.clone();
        let accepting = context.clone();
        let accept = fn_service(move |tcp: TcpStream| {
            let accepted = this.accept(tcp, &accepting);
            async move { accepted }
        });
        let client = context.http.clone();
        let upgrade = {
            fn_factory(move || {
                let context = context.clone();
                async move {
                    Ok::<_, ()>(fn_service(move |(req, framed)| {
                        upgrade(context.clone(), req, framed)
                    }))
                }
            })
        };
        let http = self.http.clone();
        let handshaker = http.handshaker.clone();
        let max = http.max_message_size;
        let assets = self.assets.clone();
        let app = App::new()
            .app_data(http)
            // This worker's client, for the callbacks `POST /pub/` asks.
            .app_data(client)
            .configure(move |cfg| crate::http::configure(cfg, &handshaker, max))
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
        context: &Rc<UpgradeContext>,
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
                context.clone(),
                RequestClock::new(self.handshake_timeout, self.request_timeout),
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
    /// The requests that leave the dispatcher at their head.
    streams: StreamRoutes,
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
    let Some((mut tcp, slot)) = parts.io.into_inner() else {
        return Ok(());
    };
    let decided = context
        .handshaker
        .accept(req.head(), slot, &context.http, Transport::WebSocket)
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
/// of the request in progress; and the start of a request head held back while it may
/// be a stream request ([`streams`]).
pub struct HttpConn {
    /// `None` once a stream request took it.
    stream: Option<TcpStream>,
    slot: Option<IpSlot>,
    clock: RequestClock,
    held: Held,
    context: Rc<UpgradeContext>,
    _counted: Counted,
}

/// Bytes of a request head kept from the dispatcher.
enum Held {
    Nothing,
    /// May be a stream request: read on until the head says.
    Deciding(BytesMut),
    /// Not one: handed to the dispatcher, as much as its buffer takes each read.
    Returning(BytesMut),
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
        context: Rc<UpgradeContext>,
        mut clock: RequestClock,
    ) -> Self {
        // The first head's time runs from the connect.
        clock.start();
        HttpConn {
            stream: Some(stream),
            slot,
            clock,
            held: Held::Nothing,
            context,
            _counted: counted,
        }
    }

    /// The stream and the address's place, for the socket this connection becomes;
    /// `None` when a stream request took them (the dispatcher then reads the end of the
    /// connection, and never hands it to the upgrade hook).
    pub fn into_inner(self) -> Option<(TcpStream, Option<IpSlot>)> {
        Some((self.stream?, self.slot))
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Reads on into a head held back until it is whole, then either takes the stream
    /// for a stream request (the dispatcher then reads the end of the connection) or
    /// returns the bytes to the dispatcher.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Held::Deciding(head) = &mut self.held else {
                return Poll::Ready(Ok(()));
            };
            match self.context.streams.see(head) {
                Seen::Other => {
                    self.held = Held::Returning(std::mem::take(head));
                    return Poll::Ready(Ok(()));
                }
                Seen::Stream { transport, len } => {
                    let mut head = std::mem::take(head);
                    head.truncate(len);
                    self.take_stream(head, transport);
                    return Poll::Ready(Ok(()));
                }
                // An oversized head is taken too, to be refused with its reason.
                Seen::NeedMore if head.len() >= self.context.streams.max_head => {
                    let head = std::mem::take(head);
                    self.take_stream(head, Transport::EventStream);
                    return Poll::Ready(Ok(()));
                }
                Seen::NeedMore => {}
            }
            let mut chunk = [0u8; 2048];
            let mut read = ReadBuf::new(&mut chunk);
            let stream = self.stream()?;
            match Pin::new(stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The client left mid-head: the dispatcher gets what came.
                    if let Held::Deciding(head) = std::mem::replace(&mut self.held, Held::Nothing) {
                        self.held = Held::Returning(head);
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    self.clock.saw(read.filled());
                    if let Held::Deciding(head) = &mut self.held {
                        head.extend_from_slice(read.filled());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if self.clock.poll_passed(cx) => {
                    return Poll::Ready(Err(self.time_out()))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Hands the stream to a stream request's task on this worker.
    fn take_stream(&mut self, head: BytesMut, transport: Transport) {
        self.held = Held::Nothing;
        let (Some(tcp), slot) = (self.stream.take(), self.slot.take()) else {
            return;
        };
        let context = self.context.clone();
        let serving = streams::serve(context.clone(), tcp, slot, head, transport);
        tokio::task::spawn_local(context.worker.relay.tracker.track_future(serving));
    }

    /// A deadline passed: a late request head is answered 408 (if the socket takes it
    /// at once); any other stall just ends the connection.
    fn time_out(&self) -> io::Error {
        let head = matches!(self.clock.phase, Phase::Head { .. });
        if head && self.clock.write_blocked.is_none() {
            let body = "request head not received within policy.handshake_timeout";
            let answer = plain_http(StatusCode::REQUEST_TIMEOUT, body, None);
            if let Some(stream) = &self.stream {
                let _ = stream.try_write(&answer);
            }
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
///
/// It also knows where a request's body ends (its `Content-Length`), so that a stream
/// request is only taken at a real request boundary: a body, even one the client sends
/// after an early answer, is never read as a request of its own.
struct RequestClock {
    head_limit: Duration,
    request_limit: Duration,
    phase: Phase,
    /// The start of the current head line, lower case (enough for the framing headers).
    line: [u8; HEADER_PREFIX],
    /// The body length the current head announced.
    announced: u64,
    /// Body bytes of the last request not read yet.
    body_left: u64,
    /// A body without a length was announced (chunked): where the requests of this
    /// connection end is not followed any more.
    unframed: bool,
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
            line: [0; HEADER_PREFIX],
            announced: 0,
            body_left: 0,
            unframed: false,
            started: Instant::now(),
            write_blocked: None,
            timer: None,
            armed_for: None,
        }
    }

    /// Whether the next byte read begins a request head.
    fn at_head_start(&self) -> bool {
        matches!(
            self.phase,
            Phase::Idle
                | Phase::Head {
                    line_len: 0,
                    lines: 0
                }
        )
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
    fn saw(&mut self, mut bytes: &[u8]) {
        while let Some((&byte, rest)) = bytes.split_first() {
            if self.body_left > 0 {
                let n = bytes.len().min(self.body_left as usize);
                self.body_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            bytes = rest;
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

    /// Whether a stream request may be taken from here: the start of a head, with the
    /// last request's body all read.
    fn at_boundary(&self) -> bool {
        self.at_head_start() && self.body_left == 0 && !self.unframed
    }

    fn step(&mut self, byte: u8) {
        let Phase::Head { line_len, lines } = self.phase else {
            return;
        };
        self.phase = match byte {
            // An empty line after at least one line ends the head (empty lines before
            // the request line are skipped, as RFC 9112 allows).
            b'\n' if line_len == 0 && lines > 0 => {
                self.body_left = std::mem::take(&mut self.announced);
                Phase::Past
            }
            b'\n' if line_len == 0 => self.phase,
            b'\n' => {
                if lines > 0 {
                    self.header_line(line_len);
                }
                Phase::Head {
                    line_len: 0,
                    lines: lines + 1,
                }
            }
            b'\r' => self.phase,
            _ => {
                if line_len < HEADER_PREFIX {
                    self.line[line_len] = byte.to_ascii_lowercase();
                }
                Phase::Head {
                    line_len: line_len + 1,
                    lines,
                }
            }
        };
    }

    /// A header line of `len` bytes ended: notes the body it announces.
    fn header_line(&mut self, len: usize) {
        let line = &self.line[..len.min(HEADER_PREFIX)];
        if line.starts_with(b"transfer-encoding:") {
            self.unframed = true;
        } else if let Some(value) = line.strip_prefix(b"content-length:") {
            let digits = value.trim_ascii();
            let whole = len <= HEADER_PREFIX && digits.iter().all(u8::is_ascii_digit);
            self.announced = match std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
            {
                Some(n) if whole => n,
                // Not a length the gateway can follow: no stream request after it.
                _ => {
                    self.unframed = true;
                    0
                }
            };
        }
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
        if let Held::Deciding(_) = this.held {
            if let Poll::Ready(Err(e)) = this.poll_held(cx) {
                return Poll::Ready(Err(e));
            }
        }
        match &mut this.held {
            // The head is still coming (a taken stream leaves `Nothing`, and the
            // dispatcher then reads the end of the connection).
            Held::Deciding(_) => return Poll::Pending,
            Held::Returning(bytes) => {
                let n = bytes.len().min(buf.remaining());
                buf.put_slice(&bytes.split_to(n));
                if bytes.is_empty() {
                    this.held = Held::Nothing;
                }
                return Poll::Ready(Ok(()));
            }
            Held::Nothing => {}
        }
        let at_boundary = this.clock.at_boundary();
        let before = buf.filled().len();
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                this.clock.saw(read);
                if this.clock.passed() {
                    return Poll::Ready(Err(this.time_out()));
                }
                if at_boundary && !read.is_empty() && this.context.streams.see(read) != Seen::Other
                {
                    this.held = Held::Deciding(BytesMut::from(read));
                    buf.set_filled(before);
                    return Pin::new(this).poll_read(cx, buf);
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
        let written = match this.stream() {
            Ok(stream) => Pin::new(stream).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = match this.stream() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        };
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => Pin::new(stream).poll_flush(cx),
            Err(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => Pin::new(stream).poll_shutdown(cx),
            Err(_) => Poll::Ready(Ok(())),
        }
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
    fn a_body_is_never_read_as_a_request() {
        let mut clock = RequestClock::new(Duration::from_secs(1), Duration::from_secs(30));
        assert!(clock.at_boundary(), "the first request of a connection");
        clock.saw(b"POST /pub/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab");
        // An early answer (a refusal before the body is read).
        clock.wrote();
        assert!(!clock.at_boundary(), "three body bytes are still to come");
        clock.saw(b"cde");
        assert!(clock.at_boundary());
        clock.saw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        clock.wrote();
        assert!(clock.at_boundary(), "a request without a body");
        clock.saw(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        clock.wrote();
        assert!(!clock.at_boundary(), "a chunked body is not followed");
        let mut clock = RequestClock::new(Duration::from_secs(1), Duration::from_secs(30));
        clock.saw(b"POST / HTTP/1.1\r\ncontent-length:  +1\r\n\r\n");
        clock.wrote();
        assert!(!clock.at_boundary(), "a length that cannot be followed");
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
