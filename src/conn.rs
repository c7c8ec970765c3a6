//! One task per socket: answer the client, publish what it sends, keep its timers, and
//! close with a documented code.
//!
//! Close codes sent by the gateway (the reason text is always set, except when a
//! client's close is echoed):
//!
//! | code | when | should the client reconnect |
//! |------|------|-----------------------------|
//! | 1000 | the client closed; its code is echoed (1010, which only clients send, is answered with 1000) | no |
//! | 1001 | the gateway is stopping ("server shutting down"), or the peer did not answer a ping in time ("ping timeout") | yes |
//! | 1002 | a WebSocket protocol error from the client (the reason names it) | after fixing the client |
//! | 1007 | a text message or close reason that is not UTF-8 | after fixing the client |
//! | 1009 | a message over `max_message_size`, refused from its frame header | after fixing the client |
//! | 1013 | a client publication failed because the broker is unavailable | yes, with backoff |
//! | 4000 | slow consumer: more than `queue_bytes` waiting (a facility with `slow_consumer = "conflate"` drops older messages instead), or no byte written for `ping_timeout` (conflating or not) | yes |
//!
//! After the close frame the gateway shuts its side down and waits, at most
//! `close_timeout`, for the client to close; a client that does not read or does not
//! close is then reset, so its descriptor and kernel buffers are released whatever it
//! does. The per-address slot and the `max_sockets` place are released only then.
//!
//! Setup order matters for late joiners: the socket is registered first, then the task
//! waits until Redis confirmed the subscriptions, and only then reads the stored last
//! messages, which go out ahead of any live message that arrived meanwhile. Pings and
//! a close are answered during setup; messages the client sends are published only
//! after it. A message published in between arrives live and may also be the stored
//! one, so it can be delivered twice; it is never lost.
//!
//! The task never sleeps on a timer of its own: it names the tick it next needs and the
//! worker's wheel wakes it ([`crate::worker`]). Its future stays small
//! ([`MAX_TASK_SIZE`]), and an idle socket holds no buffer.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use log::{debug, info};

use crate::broker::BrokerError;
use crate::channel::AudienceKinds;
use crate::event_stream;
use crate::facility::SlowConsumer;
use crate::history::{envelope, CatchUp, StreamId};
use crate::policy::{IpSlot, SocketPermit};
use crate::registry::Form;
use crate::socket::{signal, Socket, NEVER};

use self::catch_up::{setup, started, CatchUpFrames};
use crate::wheel::Tick;
use crate::worker::{Relay, Worker};
use crate::ws::frame::{self, encode, encode_close};
use crate::ws::reader::{CloseFrame, Input, Message, ReadError, Reader};
use crate::ws::Stream;

/// The documented bound on a socket task's future (asserted by a unit test).
pub const MAX_TASK_SIZE: usize = 512;
/// The application close code for slow consumers.
pub const CLOSE_SLOW_CONSUMER: u16 = 4000;
/// Socket reads in one turn of the loop before other sockets get their turn.
const READS_PER_TURN: usize = 4;
/// Bytes read and discarded while waiting for a closing client, before it is reset.
const MAX_DISCARD: usize = 1024 * 1024;
/// What a client message waiting to be published costs besides its payload (its
/// buffer and queue entry), so that empty messages count too.
const MESSAGE_OVERHEAD: usize = 64;
/// Ticks without a write after which a socket counts as idle and its queue's memory is
/// freed (checked when a timer wakes it: pings, heartbeats).
const IDLE: Tick = 100;

/// What the handshake decided for this socket.
#[derive(Debug)]
pub struct SocketParams {
    pub id: uuid::Uuid,
    /// The client's address (forwarded by a trusted proxy, or the peer's).
    pub peer: Option<IpAddr>,
    pub facility: Box<str>,
    pub user: Option<Box<str>>,
    /// Keys this socket listens to.
    pub subscribe: Arc<[Arc<str>]>,
    /// Keys that messages from this socket are published to.
    pub publish: Arc<[Arc<str>]>,
    pub echo: bool,
    /// What the socket gets when it falls behind (its facility's `slow_consumer`).
    pub slow_consumer: SlowConsumer,
    /// How publications are written: the transport (WebSocket, event stream, long-poll)
    /// and, on a WebSocket, whether the client speaks the envelope subprotocol
    /// ([`crate::history::SUBPROTOCOL`]).
    pub form: Form,
    /// Per key of `subscribe`, the id the client resumes from (`last-id`); empty when
    /// it resumes nothing.
    pub resume: Vec<Option<StreamId>>,
    /// The audience kinds this socket listens to (metric labels).
    pub listening: AudienceKinds,
    /// Held until the descriptor is released.
    pub holds: Holds,
}

/// Places a socket holds while its descriptor is open.
#[derive(Debug, Default)]
pub struct Holds {
    pub ip_slot: Option<IpSlot>,
    pub permit: Option<SocketPermit>,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Shutdown,
    PingTimeout,
    /// The outbound queue passed `queue_bytes`.
    SlowConsumer,
    /// No byte could be written for `ping_timeout`.
    StuckWrite,
    BrokerUnavailable,
    /// The client broke the protocol.
    Protocol(ReadError),
    /// The client sent a close frame.
    ClientClosed(Option<CloseFrame>),
    /// The transport ended without a close frame.
    ClientGone,
}

impl CloseReason {
    /// The close frame to send (code and reason), if any: the table in the module docs.
    pub fn close_frame(&self) -> Option<(u16, Cow<'static, str>)> {
        let (code, reason): (u16, Cow<'static, str>) = match self {
            CloseReason::Shutdown => (1001, "server shutting down".into()),
            CloseReason::PingTimeout => (1001, "ping timeout".into()),
            CloseReason::SlowConsumer => (
                CLOSE_SLOW_CONSUMER,
                "slow consumer: outbound queue full".into(),
            ),
            CloseReason::StuckWrite => (
                CLOSE_SLOW_CONSUMER,
                "slow consumer: nothing could be written".into(),
            ),
            CloseReason::BrokerUnavailable => (1013, "broker unavailable, try again later".into()),
            CloseReason::Protocol(e) => (e.close_code(), e.to_string().into()),
            CloseReason::ClientClosed(theirs) => match theirs {
                // 1010 is for clients only; every other valid code is echoed.
                Some(f) if f.code != 1010 => (f.code, "".into()),
                _ => (1000, "".into()),
            },
            CloseReason::ClientGone => return None,
        };
        Some((code, reason))
    }

    fn is_slow_consumer(&self) -> bool {
        matches!(self, CloseReason::SlowConsumer | CloseReason::StuckWrite)
    }
}

/// Serves one socket on this worker until it closes and its descriptor is released.
/// `leftover` is what the client sent right behind its handshake.
pub fn spawn(worker: &Rc<Worker>, stream: Stream, params: SocketParams, leftover: BytesMut) {
    let relay = &worker.relay;
    let task = relay
        .tracker
        .track_future(serve(worker.clone(), stream, params, leftover));
    tokio::task::spawn_local(task);
}

/// The socket task: registers the socket at once, and returns the future that serves
/// it. Everything the future needs lives in one [`Conn`], so the task stays small.
pub fn serve(
    worker: Rc<Worker>,
    stream: Stream,
    params: SocketParams,
    leftover: BytesMut,
) -> impl Future<Output = ()> {
    let now = worker.clock.now();
    let conflated = (params.slow_consumer == SlowConsumer::Conflate)
        .then(|| worker.relay.metrics.conflated.clone());
    let socket = Rc::new(Socket::new(
        stream,
        params.echo,
        params.form,
        conflated,
        now,
    ));
    let mut conn = Conn::new(worker, socket, params, now);
    conn.count(1);
    conn.log_open();
    let first = conn.on_leftover(leftover, now);
    async move {
        let reason = match first {
            Ok(()) => conn.run().await,
            Err(reason) => reason,
        };
        conn.close(&reason).await;
        conn.count(-1);
        conn.log_closed(&reason);
    }
}

/// Deadlines of one socket, in wheel ticks ([`NEVER`]: not set).
struct Timers {
    next_ping: Tick,
    pong_deadline: Tick,
    setup_deadline: Tick,
    closing_at: Tick,
}

type Setup = Pin<Box<dyn Future<Output = Option<Vec<CatchUp>>>>>;
type Publishing = Pin<Box<dyn Future<Output = Result<(), BrokerError>>>>;

enum Event {
    Signals(u8),
    SetupDone(Option<Vec<CatchUp>>),
    Published(Result<(), BrokerError>),
    Writable(std::io::Result<()>),
    Readable(std::io::Result<()>),
}

struct Conn {
    worker: Rc<Worker>,
    socket: Rc<Socket>,
    params: SocketParams,
    /// Whether the socket is still in the worker's fan-out.
    attached: bool,
    /// When the socket opened (for the log).
    opened: Tick,
    reader: Reader,
    timers: Timers,
    /// Waiting for the subscriptions and the stored messages.
    setup: Option<Setup>,
    /// The client message being published.
    publishing: Option<Publishing>,
    /// Client messages waiting to be published, in order, and their bytes.
    unpublished: VecDeque<Bytes>,
    unpublished_bytes: usize,
}

impl Drop for Conn {
    /// However the task ends (a stopped runtime drops it mid-way), the socket leaves
    /// the fan-out.
    fn drop(&mut self) {
        self.detach();
    }
}

impl Conn {
    fn new(worker: Rc<Worker>, socket: Rc<Socket>, params: SocketParams, now: Tick) -> Self {
        let config = &worker.relay.config;
        let pings = config.ping_interval.filter(|_| params.form.is_websocket());
        let timers = Timers {
            next_ping: pings.map_or(NEVER, |i| now + i),
            pong_deadline: NEVER,
            setup_deadline: now + config.setup_timeout,
            closing_at: NEVER,
        };
        worker.attach(&socket, &params.subscribe);
        let setup = setup(&worker, &params);
        let mut conn = Conn {
            worker,
            socket,
            params,
            attached: true,
            opened: now,
            reader: Reader::default(),
            timers,
            setup: Some(setup),
            publishing: None,
            unpublished: VecDeque::new(),
            unpublished_bytes: 0,
        };
        if conn.worker.relay.shutdown.is_cancelled() {
            conn.on_drain(now);
        }
        conn.schedule();
        conn
    }

    fn config(&self) -> &crate::worker::SocketConfig {
        &self.worker.relay.config
    }

    async fn run(&mut self) -> CloseReason {
        loop {
            let event = poll_fn(|cx| self.poll_event(cx)).await;
            let now = self.worker.clock.now();
            let handled = match event {
                Event::Signals(bits) => self.on_signals(bits, now),
                Event::SetupDone(stored) => {
                    self.on_setup_done(stored, now);
                    Ok(())
                }
                Event::Published(Ok(())) => {
                    self.publish_next();
                    Ok(())
                }
                Event::Published(Err(e)) => {
                    debug!("conn {}: publish failed: {e}", self.params.id);
                    Err(CloseReason::BrokerUnavailable)
                }
                Event::Writable(Ok(())) => {
                    self.socket.writable(now);
                    Ok(())
                }
                Event::Readable(Ok(())) => self.on_readable(now),
                Event::Writable(Err(_)) | Event::Readable(Err(_)) => Err(CloseReason::ClientGone),
            };
            if let Err(reason) = handled {
                return reason;
            }
            self.schedule();
        }
    }

    /// The next thing to do, in order of urgency. Every source registers the task's
    /// waker, so nothing is missed while the task sleeps.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let bits = self.socket.take_signals(cx.waker());
        if bits != 0 {
            return Poll::Ready(Event::Signals(bits));
        }
        if let Some(setup) = &mut self.setup {
            if let Poll::Ready(stored) = setup.as_mut().poll(cx) {
                self.setup = None;
                return Poll::Ready(Event::SetupDone(stored));
            }
        }
        if let Some(publishing) = &mut self.publishing {
            if let Poll::Ready(result) = publishing.as_mut().poll(cx) {
                self.publishing = None;
                return Poll::Ready(Event::Published(result));
            }
        }
        // Reading pauses while too many client messages wait to be published.
        self.poll_stream(cx, !self.reading_paused())
    }

    /// Whether reading waits for the client's earlier messages to be published.
    fn reading_paused(&self) -> bool {
        self.unpublished_bytes >= self.config().queue_bytes
    }

    /// What an idle socket is sent every `heartbeat_interval`: the ws4redis heartbeat
    /// string when one is set; on an event stream, always a comment line (proxies and
    /// browsers time out silent streams, and a stream has no pings).
    fn heartbeat(&self) -> Option<Bytes> {
        match self.params.form {
            Form::Event => Some(Bytes::from_static(event_stream::HEARTBEAT)),
            _ => self.config().heartbeat.as_ref().map(|h| h.frame.clone()),
        }
    }

    /// Asks the wheel to wake the task at its next deadline.
    fn schedule(&self) {
        let t = &self.timers;
        let config = self.config();
        let mut next = t.next_ping.min(t.pong_deadline).min(t.closing_at);
        if self.setup.is_some() {
            next = next.min(t.setup_deadline);
        }
        if self.heartbeat().is_some() && !self.socket.has_unwritten() {
            next = next.min(self.socket.last_write() + config.heartbeat_interval);
        }
        if let Some(since) = self.socket.stalled_since() {
            next = next.min(since + config.ping_timeout);
        }
        if next != NEVER {
            self.worker.schedule(&self.socket, next);
        }
    }

    fn on_signals(&mut self, bits: u8, now: Tick) -> Result<(), CloseReason> {
        if bits & signal::BROKEN != 0 {
            return Err(CloseReason::ClientGone);
        }
        if bits & signal::OVERFLOW != 0 {
            return Err(CloseReason::SlowConsumer);
        }
        if bits & signal::DRAIN != 0 {
            self.on_drain(now);
        }
        if bits & signal::TIMER != 0 {
            self.on_timer(now)?;
        }
        Ok(())
    }

    /// Each socket closes at its own point of the drain window, so that thousands of
    /// browsers do not reconnect in the same second.
    fn on_drain(&mut self, now: Tick) {
        if self.timers.closing_at == NEVER {
            let share = (self.params.id.as_u128() % 1000) as Tick;
            self.timers.closing_at = now + self.config().drain_window * share / 1000;
        }
    }

    fn on_timer(&mut self, now: Tick) -> Result<(), CloseReason> {
        let worker = self.worker.clone();
        let config = &worker.relay.config;
        if self.timers.closing_at <= now {
            return Err(CloseReason::Shutdown);
        }
        // While reading is paused the pong may be waiting unread: no verdict then.
        if self.timers.pong_deadline <= now && !self.reading_paused() {
            return Err(CloseReason::PingTimeout);
        }
        if self
            .socket
            .stalled_since()
            .is_some_and(|since| since + config.ping_timeout <= now)
        {
            return Err(CloseReason::StuckWrite);
        }
        if self.setup.is_some() && self.timers.setup_deadline <= now {
            debug!(
                "conn {}: stored messages skipped (setup timed out)",
                self.params.id
            );
            self.setup = None;
            self.on_setup_done(None, now);
        }
        if self.socket.last_write() + IDLE <= now {
            self.socket.shrink_idle();
        }
        if let Some(interval) = config.ping_interval {
            if self.timers.next_ping <= now && self.params.form.is_websocket() {
                self.socket
                    .send_control(ping_frame(), config.queue_bytes, now);
                self.timers.next_ping = now + interval;
                if self.timers.pong_deadline == NEVER {
                    self.timers.pong_deadline = now + config.ping_timeout;
                }
            }
        }
        if let Some(frame) = self.heartbeat() {
            // A socket with frames waiting is not idle, and one more would not help.
            let idle = !self.socket.has_unwritten();
            if idle && self.socket.last_write() + config.heartbeat_interval <= now {
                self.socket.send_control(frame, config.queue_bytes, now);
            }
        }
        Ok(())
    }

    /// The subscriptions are live (or setup gave up): stored (or replayed) messages go
    /// out first, then what arrived meanwhile; then the client's waiting messages are
    /// published.
    fn on_setup_done(&mut self, caught: Option<Vec<CatchUp>>, now: Tick) {
        let relay = self.worker.relay.clone();
        let config = &relay.config;
        let (caught, floors) = started(&relay, &self.params.subscribe, caught);
        // Setup gave up (Redis did not confirm in time): no `subscribed` then.
        let confirmed = caught.len() == self.params.subscribe.len();
        let frames = CatchUpFrames::build(&relay, self.params.form, &caught, confirmed);
        let trimmed = frames.trimmed;
        let metrics = &relay.metrics;
        let resume = &metrics.resume;
        resume
            .with_label_values(&["replayed"])
            .inc_by(frames.replayed as u64);
        resume
            .with_label_values(&["reset"])
            .inc_by(frames.resets as u64);
        // Counted before the write, so that no client sees a message the metrics do not.
        let sent = frames.frames.len();
        metrics.frames_delivered.inc_by(sent as u64);
        metrics
            .bytes_out
            .inc_by(frames.sizes[..sent].iter().sum::<usize>() as u64);
        let skipped = trimmed
            + self
                .socket
                .release(frames.frames, floors, config.queue_bytes, now);
        if skipped > 0 {
            debug!(
                "conn {}: {skipped} stored messages skipped: over queue_bytes together",
                self.params.id
            );
            metrics
                .publications_dropped
                .with_label_values(&["stored_over_queue"])
                .inc_by(skipped as u64);
        }
        self.publish_next();
    }

    /// Reads what the client sent (a bounded number of reads per turn).
    fn on_readable(&mut self, now: Tick) -> Result<(), CloseReason> {
        let worker = self.worker.clone();
        for _ in 0..READS_PER_TURN {
            let mut scratch = worker.scratch.borrow_mut();
            let n = match self.socket.stream.try_read(&mut scratch) {
                Ok(0) => return Err(CloseReason::ClientGone),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(CloseReason::ClientGone),
            };
            // Any frame proves the peer alive, not only the pong.
            self.timers.pong_deadline = NEVER;
            self.on_bytes(&mut scratch[..n], now)?;
        }
        Ok(())
    }

    fn on_bytes(&mut self, bytes: &mut [u8], now: Tick) -> Result<(), CloseReason> {
        // An event stream's client has nothing to say: what it sends is dropped.
        if !self.params.form.is_websocket() {
            return Ok(());
        }
        let limit = self.config().max_message_size;
        let mut input = Input::new(bytes);
        while let Some(message) = self
            .reader
            .next(&mut input, limit)
            .map_err(CloseReason::Protocol)?
        {
            self.on_message(message, now)?;
        }
        Ok(())
    }

    /// What the client sent in the same packets as its handshake.
    fn on_leftover(&mut self, mut leftover: BytesMut, now: Tick) -> Result<(), CloseReason> {
        if leftover.is_empty() {
            return Ok(());
        }
        self.on_bytes(&mut leftover, now)
    }

    fn on_message(&mut self, message: Message, now: Tick) -> Result<(), CloseReason> {
        let payload = match message {
            Message::Text(p) | Message::Binary(p) => p,
            Message::Ping(p) => {
                let limit = self.config().queue_bytes;
                self.socket
                    .send_control(encode(frame::OP_PONG, &p), limit, now);
                return Ok(());
            }
            Message::Pong => return Ok(()),
            Message::Close(theirs) => return Err(CloseReason::ClientClosed(theirs)),
        };
        if let Some(heartbeat) = &self.config().heartbeat {
            if payload == heartbeat.text {
                let limit = self.config().queue_bytes;
                self.socket
                    .send_control(heartbeat.frame.clone(), limit, now);
                return Ok(());
            }
        }
        if self.params.publish.is_empty() {
            debug!("conn {}: message ignored, no publish flag", self.params.id);
            return Ok(());
        }
        // Marked now: the broker may hand it back before the publish is confirmed.
        self.socket.published(&payload);
        self.unpublished_bytes += payload.len() + MESSAGE_OVERHEAD;
        self.unpublished.push_back(payload);
        self.publish_next();
        Ok(())
    }

    /// Starts publishing the oldest waiting message, one at a time, after setup.
    fn publish_next(&mut self) {
        if self.setup.is_some() || self.publishing.is_some() {
            return;
        }
        let Some(payload) = self.unpublished.pop_front() else {
            return;
        };
        self.unpublished_bytes -= payload.len() + MESSAGE_OVERHEAD;
        let relay = self.worker.relay.clone();
        let keys = self.params.publish.clone();
        self.publishing = Some(Box::pin(
            async move { publish(&relay, &keys, &payload).await },
        ));
    }

    /// Messages the client sent before the socket closed are still published, in
    /// order, by a task of their own (tracked, so a stop waits for them).
    fn finish_publishing(&mut self) {
        let publishing = self.publishing.take();
        let waiting = std::mem::take(&mut self.unpublished);
        if publishing.is_none() && waiting.is_empty() {
            return;
        }
        let relay = self.worker.relay.clone();
        let keys = self.params.publish.clone();
        let id = self.params.id;
        let task = async move {
            if let Some(publishing) = publishing {
                if publishing.await.is_err() {
                    return;
                }
            }
            for payload in waiting {
                if let Err(e) = publish(&relay, &keys, &payload).await {
                    debug!("conn {id}: publish after close failed: {e}");
                    return;
                }
            }
        };
        let task = self.worker.relay.tracker.track_future(task);
        tokio::task::spawn_local(task);
    }

    fn detach(&mut self) {
        if std::mem::take(&mut self.attached) {
            self.worker.detach(&self.socket, &self.params.subscribe);
        }
    }

    /// Sends the close frame, shuts the connection down, and waits (at most
    /// `close_timeout`) for the client to close; a client that does not is reset.
    async fn close(&mut self, reason: &CloseReason) {
        self.detach();
        self.setup = None;
        if *reason != CloseReason::BrokerUnavailable {
            self.finish_publishing();
        }
        self.socket
            .start_closing(matches!(reason, CloseReason::Shutdown));
        if reason.is_slow_consumer() {
            self.worker.relay.metrics.slow_consumer_closes.inc();
        }
        let Some((code, text)) = reason.close_frame() else {
            return;
        };
        let now = self.worker.clock.now();
        let last = match self.params.form.is_websocket() {
            true => encode_close(code, &text),
            false => event_stream::control(&envelope::close(code, &text)),
        };
        self.socket.send_close(last, now);
        let echoing = matches!(reason, CloseReason::ClientClosed(_));
        let parse = self.params.form.is_websocket() && !matches!(reason, CloseReason::Protocol(_));
        let deadline = now + self.config().close_timeout;
        if !self.finish_close(deadline, echoing, parse).await {
            self.socket.stream.discard_unsent_on_close();
        }
    }

    /// Flushes the close frame, then (unless it answered the client's close) shuts the
    /// write side and waits for the client's close frame or end of stream. Returns
    /// whether that happened before `deadline` and within [`MAX_DISCARD`].
    async fn finish_close(&mut self, deadline: Tick, echoing: bool, parse: bool) -> bool {
        self.worker.schedule(&self.socket, deadline);
        let mut shut = false;
        let mut discarded = 0;
        loop {
            if !shut && !self.socket.has_unwritten() {
                if echoing {
                    return true;
                }
                self.socket.stream.shutdown_write();
                shut = true;
            }
            let event = poll_fn(|cx| {
                let bits = self.socket.take_signals(cx.waker());
                if bits != 0 {
                    return Poll::Ready(Event::Signals(bits));
                }
                self.poll_stream(cx, shut)
            })
            .await;
            match event {
                Event::Signals(bits) if bits & signal::BROKEN != 0 => return true,
                Event::Signals(bits) if bits & signal::TIMER != 0 => {
                    if self.worker.clock.now() >= deadline {
                        return false;
                    }
                    self.worker.schedule(&self.socket, deadline);
                }
                Event::Writable(Ok(())) => self.socket.writable(self.worker.clock.now()),
                Event::Readable(Ok(())) => match self.discard(parse) {
                    Some(n) if discarded + n <= MAX_DISCARD => discarded += n,
                    Some(_) => return false,
                    None => return true,
                },
                Event::Writable(Err(_)) | Event::Readable(Err(_)) => return true,
                _ => {}
            }
        }
    }

    /// The stream's readiness: for writing while frames wait for room, for reading
    /// when `reading`.
    fn poll_stream(&self, cx: &mut Context<'_>, reading: bool) -> Poll<Event> {
        if self.socket.wants_write() {
            if let Poll::Ready(r) = self.socket.stream.poll_write_ready(cx) {
                return Poll::Ready(Event::Writable(r));
            }
        }
        if reading {
            if let Poll::Ready(r) = self.socket.stream.poll_read_ready(cx) {
                return Poll::Ready(Event::Readable(r));
            }
        }
        Poll::Pending
    }

    /// Reads what a closing client still sends, dropping messages; `None` once it
    /// closed (its close frame, or the end of the stream). After a protocol error its
    /// bytes are not parsed any more, only dropped.
    fn discard(&mut self, parse: bool) -> Option<usize> {
        let worker = self.worker.clone();
        let mut scratch = worker.scratch.borrow_mut();
        let n = match self.socket.stream.try_read(&mut scratch) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(0),
            Err(_) => return None,
        };
        if parse {
            let limit = self.config().max_message_size;
            let mut input = Input::new(&mut scratch[..n]);
            loop {
                match self.reader.next(&mut input, limit) {
                    Ok(Some(Message::Close(_))) | Err(_) => return None,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
        }
        Some(n)
    }

    /// Adds `delta` to the open-socket gauges of this socket's labels.
    fn count(&self, delta: i64) {
        let metrics = &self.worker.relay.metrics;
        metrics.sockets.add(delta);
        let transport = match self.params.form.is_websocket() {
            true => "websocket",
            false => "sse",
        };
        metrics
            .sockets_by_transport
            .with_label_values(&[transport])
            .add(delta);
        for audience in self.params.listening.names() {
            metrics
                .sockets_by_audience
                .with_label_values(&[audience])
                .add(delta);
        }
    }

    fn log_open(&self) {
        let p = &self.params;
        info!(
            "conn {} open: client={} facility={} user={} audiences={:?} subscribe={:?} publish={:?}",
            p.id,
            Peer(p.peer),
            p.facility,
            p.user.as_deref().unwrap_or("-"),
            p.listening.names().collect::<Vec<_>>(),
            p.subscribe,
            p.publish
        );
    }

    fn log_closed(&self, reason: &CloseReason) {
        let lived = self.worker.clock.now().saturating_sub(self.opened);
        let p = &self.params;
        info!(
            "conn {} closed: client={} facility={} user={} after {:.1}s: code={} {:?}",
            p.id,
            Peer(p.peer),
            p.facility,
            p.user.as_deref().unwrap_or("-"),
            lived as f64 * crate::wheel::TICK.as_secs_f64(),
            reason
                .close_frame()
                .map_or_else(|| "-".to_string(), |(code, _)| code.to_string()),
            reason
        );
    }
}

/// A client address in the log: `-` when unknown.
struct Peer(Option<IpAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Publishes a client's message to its publish keys, kept `redis.expire` seconds.
async fn publish(relay: &Relay, keys: &[Arc<str>], payload: &Bytes) -> Result<(), BrokerError> {
    relay
        .broker
        .publish(keys, payload, relay.config.expire)
        .await
        .map(drop)
}

fn ping_frame() -> Bytes {
    Bytes::from_static(&[0x80 | frame::OP_PING, 0])
}

pub(crate) mod catch_up;
#[cfg(test)]
mod tests;
