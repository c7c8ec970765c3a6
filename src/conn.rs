//! One task per socket: relay the outbox to the socket, publish what the client sends,
//! keep the link alive, and close with a documented code.
//!
//! Close codes sent by the gateway (the reason text is always set):
//!
//! | code | when | should the client reconnect |
//! |------|------|-----------------------------|
//! | 1000 | the client closed; its code is echoed | no |
//! | 1001 | the gateway is stopping ("server shutting down"), or the peer did not answer a ping in time ("ping timeout") | yes |
//! | 1002 | a WebSocket protocol error from the client | after fixing the client |
//! | 1007 | a text frame that is not UTF-8 | after fixing the client |
//! | 1009 | a message over `max_message_size` | after fixing the client |
//! | 1013 | a client publication failed because the broker is unavailable | yes, with backoff |
//! | 4000 | slow consumer: more than `queue_bytes` were waiting for this socket | yes |
//!
//! Setup order matters for late joiners: the socket is registered first, then the task
//! waits until Redis confirmed the subscriptions, and only then reads the stored last
//! messages, which go out ahead of any live message queued meanwhile. A message
//! published in between arrives live and may also be the stored one, so it can be
//! delivered twice; it is never lost, and the last frame a key delivers is its newest.
//!
//! Every write is bounded: a write still stuck after `ping_timeout` (the peer stopped
//! reading) closes the socket as a slow consumer, like an overflowing outbox.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use actix_ws::{CloseCode, Item, Message, MessageStream, ProtocolError, Session};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use log::{debug, info};
use tokio::time::{timeout, Instant};

use crate::outbox::{Frame, Outbox, Queued};
use crate::Gateway;

/// Bound on sending a Close frame before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the setup (subscription confirmation and stored messages).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The application close code for slow consumers.
pub const CLOSE_SLOW_CONSUMER: u16 = 4000;

/// What the handshake decided for this socket.
#[derive(Debug)]
pub struct ConnParams {
    pub id: uuid::Uuid,
    /// The client's address (forwarded by a trusted proxy, or the peer's).
    pub peer: String,
    pub facility: String,
    pub user: Option<String>,
    /// Keys this socket listens to.
    pub subscribe: Vec<Arc<str>>,
    /// Keys that frames from this socket are published to.
    pub publish: Vec<Arc<str>>,
    pub echo: bool,
    /// The audience kinds this socket listens to (metric labels).
    pub audiences: Vec<&'static str>,
    /// Holds this socket's place in the per-address limit until the socket ends.
    pub _slot: Option<crate::policy::IpSlot>,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Shutdown,
    PingTimeout,
    SlowConsumer,
    BrokerUnavailable,
    InvalidUtf8,
    TooBig,
    Protocol(String),
    /// The client sent a Close frame (its code, if any).
    ClientClosed(Option<actix_ws::CloseReason>),
    /// The transport ended without a Close frame.
    ClientGone,
}

impl CloseReason {
    /// The Close frame to send, if any.
    pub fn frame(&self) -> Option<actix_ws::CloseReason> {
        let (code, text) = match self {
            CloseReason::Shutdown => (CloseCode::Away, "server shutting down"),
            CloseReason::PingTimeout => (CloseCode::Away, "ping timeout"),
            CloseReason::SlowConsumer => (
                CloseCode::Other(CLOSE_SLOW_CONSUMER),
                "slow consumer: outbound queue full",
            ),
            CloseReason::BrokerUnavailable => {
                (CloseCode::Again, "broker unavailable, try again later")
            }
            CloseReason::InvalidUtf8 => (CloseCode::Invalid, "text frame is not valid UTF-8"),
            CloseReason::TooBig => (CloseCode::Size, "message too big"),
            CloseReason::Protocol(why) => {
                return Some((CloseCode::Protocol, why.as_str()).into());
            }
            CloseReason::ClientClosed(theirs) => {
                // Echo the client's code, except those that must never be sent.
                let code = match theirs.as_ref().map(|r| r.code) {
                    Some(CloseCode::Abnormal | CloseCode::Tls) | None => CloseCode::Normal,
                    Some(CloseCode::Other(c)) if !(3000..5000).contains(&c) => CloseCode::Normal,
                    Some(code) => code,
                };
                return Some(code.into());
            }
            CloseReason::ClientGone => return None,
        };
        Some((code, text).into())
    }

    fn from_protocol_error(e: ProtocolError) -> CloseReason {
        match e {
            ProtocolError::Overflow => CloseReason::TooBig,
            ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                CloseReason::InvalidUtf8
            }
            ProtocolError::Io(_) => CloseReason::ClientGone,
            other => CloseReason::Protocol(other.to_string()),
        }
    }
}

/// Registers the socket and counts it; undoes both however the task ends.
struct Registration<'a> {
    gateway: &'a Gateway,
    params: &'a ConnParams,
    outbox: Arc<Outbox>,
}

impl<'a> Registration<'a> {
    fn new(gateway: &'a Gateway, params: &'a ConnParams, outbox: Arc<Outbox>) -> Self {
        gateway.registry.register(&params.subscribe, &outbox);
        let registration = Registration {
            gateway,
            params,
            outbox,
        };
        registration.count(1);
        registration
    }

    /// Adds `delta` to the open-socket gauges of this socket's labels.
    fn count(&self, delta: i64) {
        let metrics = &self.gateway.metrics;
        metrics.sockets.add(delta);
        for audience in &self.params.audiences {
            metrics
                .sockets_by_audience
                .with_label_values(&[audience])
                .add(delta);
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.gateway
            .registry
            .unregister(&self.params.subscribe, &self.outbox);
        self.count(-1);
    }
}

/// Serves one socket until it closes.
pub async fn run(
    gateway: Arc<Gateway>,
    params: ConnParams,
    session: Session,
    stream: MessageStream,
) {
    let started = Instant::now();
    let outbox = Arc::new(Outbox::new(gateway.config.queue_bytes));
    let _registration = Registration::new(&gateway, &params, outbox.clone());
    info!(
        "conn {} open: client={} facility={} user={} audiences={:?} subscribe={:?} publish={:?}",
        params.id,
        params.peer,
        params.facility,
        params.user.as_deref().unwrap_or("-"),
        params.audiences,
        params.subscribe,
        params.publish
    );
    if timeout(SETUP_TIMEOUT, send_stored(&gateway, &params, &outbox))
        .await
        .is_err()
    {
        debug!(
            "conn {}: stored messages skipped (setup timed out)",
            params.id
        );
    }
    let max = gateway.config.max_message_size;
    let mut conn = Conn {
        gateway: &gateway,
        params: &params,
        outbox: &outbox,
        session,
        fragments: Fragments::new(max),
        last_published: None,
    };
    let reason = conn.serve(stream.max_frame_size(max)).await;
    if let Some(frame) = reason.frame() {
        let _ = timeout(CLOSE_TIMEOUT, conn.session.close(Some(frame))).await;
    }
    if reason == CloseReason::SlowConsumer {
        gateway.metrics.slow_consumer_closes.inc();
    }
    info!(
        "conn {} closed: client={} facility={} user={} after {:.1}s: code={} {:?}",
        params.id,
        params.peer,
        params.facility,
        params.user.as_deref().unwrap_or("-"),
        started.elapsed().as_secs_f64(),
        reason
            .frame()
            .map_or_else(|| "-".to_string(), |f| u16::from(f.code).to_string()),
        reason
    );
}

/// Queues each subscribed key's stored message, once the subscriptions are live.
async fn send_stored(gateway: &Gateway, params: &ConnParams, outbox: &Outbox) {
    if params.subscribe.is_empty() || !gateway.registry.barrier().await {
        return;
    }
    match gateway.broker.fetch(&params.subscribe).await {
        Ok(values) => {
            let heartbeat = gateway.config.heartbeat.as_deref().map(str::as_bytes);
            let stored = values
                .into_iter()
                .flatten()
                .filter(|v| Some(&v[..]) != heartbeat)
                .map(Frame::from_payload)
                .collect();
            outbox.push_front(stored);
        }
        Err(e) => debug!("conn {}: stored messages skipped: {e}", params.id),
    }
}

struct Conn<'a> {
    gateway: &'a Gateway,
    params: &'a ConnParams,
    outbox: &'a Outbox,
    session: Session,
    fragments: Fragments,
    /// The last frame this client published; with `echo` off, an equal message coming
    /// back from the broker is not sent to it (ws4redis behaviour).
    last_published: Option<Bytes>,
}

/// Something to write to the socket.
enum Outgoing {
    Frame(Frame),
    Text(String),
    Ping,
    Pong(Bytes),
}

/// When the next keep-alive action is due.
struct Timers {
    ping_interval: Option<Duration>,
    ping_timeout: Duration,
    heartbeat_interval: Option<Duration>,
    next_ping: Instant,
    pong_deadline: Option<Instant>,
    last_write: Instant,
    /// When this socket closes during a drain (spread over `drain_window`).
    closing_at: Option<Instant>,
}

impl Timers {
    fn next(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(86400);
        let ping = self.ping_interval.map_or(far, |_| self.next_ping);
        let pong = self.pong_deadline.unwrap_or(far);
        let heartbeat = self.heartbeat_interval.map_or(far, |i| self.last_write + i);
        let closing = self.closing_at.unwrap_or(far);
        ping.min(pong).min(heartbeat).min(closing)
    }
}

enum Inbound {
    Continue,
    Close(CloseReason),
}

impl Conn<'_> {
    async fn serve(&mut self, mut stream: MessageStream) -> CloseReason {
        let config = &self.gateway.config;
        let now = Instant::now();
        let mut timers = Timers {
            ping_interval: config.ping_interval(),
            ping_timeout: config.ping_timeout(),
            heartbeat_interval: config
                .heartbeat
                .as_ref()
                .map(|_| config.heartbeat_interval()),
            next_ping: now + config.ping_interval().unwrap_or_default(),
            pong_deadline: None,
            last_write: now,
            closing_at: None,
        };
        let mut batch = VecDeque::new();
        let wake = tokio::time::sleep_until(timers.next());
        tokio::pin!(wake);
        let shutdown = self.gateway.shutdown.clone();
        loop {
            // Inbound and timers before the outbox, so a busy stream of publications
            // cannot starve pongs, client frames or the ping deadline.
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if timers.closing_at.is_none() => {
                    // Each socket closes at its own point of the drain window, so that
                    // thousands of browsers do not reconnect in the same second.
                    let window = self.gateway.config.drain_window();
                    let share = (self.params.id.as_u128() % 1_000_000) as f64 / 1e6;
                    timers.closing_at = Some(Instant::now() + window.mul_f64(share));
                }
                _ = &mut wake => {
                    if let Err(reason) = self.on_timer(&mut timers).await {
                        return reason;
                    }
                }
                message = stream.recv() => {
                    // Any frame proves the peer alive, not only the pong.
                    timers.pong_deadline = None;
                    if let Inbound::Close(reason) = self.on_inbound(message, &mut timers).await {
                        return reason;
                    }
                }
                _ = self.outbox.ready() => match self.flush(&mut batch).await {
                    Err(reason) => return reason,
                    Ok(0) => {}
                    Ok(_) => timers.last_write = Instant::now(),
                },
            }
            let next = timers.next();
            if next != wake.deadline() {
                wake.as_mut().reset(next);
            }
        }
    }

    /// Writes what is queued now, as one batch; returns the number of frames written.
    /// Frames queued meanwhile wait for the next turn of the loop, so a steady stream of
    /// publications cannot keep pings, the drain or the client's frames waiting.
    async fn flush(&mut self, batch: &mut VecDeque<Queued>) -> Result<u64, CloseReason> {
        let metrics = &self.gateway.metrics;
        if !self.outbox.take_into(batch) {
            return Err(CloseReason::SlowConsumer);
        }
        let Some(oldest) = batch.front().map(|q| q.received) else {
            return Ok(0);
        };
        let (mut frames, mut bytes) = (0, 0);
        while let Some(Queued { frame, .. }) = batch.pop_front() {
            let len = frame.len();
            let echo_of_own =
                !self.params.echo && self.last_published.as_deref() == Some(frame.as_bytes());
            if !echo_of_own {
                self.send(Outgoing::Frame(frame)).await?;
                frames += 1;
                bytes += len as u64;
            }
            self.outbox.written(len);
        }
        metrics.frames_delivered.inc_by(frames);
        metrics.bytes_out.inc_by(bytes);
        metrics
            .delivery_latency
            .observe(oldest.elapsed().as_secs_f64());
        Ok(frames)
    }

    /// Sends one message. Every write goes through here: an overflow of the outbox, or a
    /// write stuck longer than `ping_timeout` (the peer stopped reading) ends the wait,
    /// so no peer can hold the task.
    async fn send(&mut self, message: Outgoing) -> Result<(), CloseReason> {
        let outbox = self.outbox;
        let session = &mut self.session;
        let send = async move {
            match message {
                Outgoing::Frame(Frame::Text(t)) => session.text(t).await,
                Outgoing::Frame(Frame::Binary(b)) => session.binary(b).await,
                Outgoing::Text(t) => session.text(t).await,
                Outgoing::Ping => session.ping(b"").await,
                Outgoing::Pong(p) => session.pong(&p).await,
            }
        };
        tokio::pin!(send);
        // Fast path: the writer has room (the common case), so no timer is armed.
        let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
        if let Poll::Ready(sent) = first {
            return sent.map_err(|_| CloseReason::ClientGone);
        }
        let stuck = tokio::time::sleep(self.gateway.config.ping_timeout());
        tokio::pin!(stuck);
        let mut rearm = false;
        let result = loop {
            tokio::select! {
                biased;
                sent = &mut send => break sent.map_err(|_| CloseReason::ClientGone),
                _ = &mut stuck => break Err(CloseReason::SlowConsumer),
                _ = outbox.ready() => {
                    if outbox.overflowed() {
                        break Err(CloseReason::SlowConsumer);
                    }
                    // The wake-up was meant for the main loop; give it back.
                    rearm = true;
                }
            }
        };
        if rearm {
            outbox.wake();
        }
        result
    }

    async fn on_timer(&mut self, timers: &mut Timers) -> Result<(), CloseReason> {
        let now = Instant::now();
        if timers.closing_at.is_some_and(|t| t <= now) {
            return Err(CloseReason::Shutdown);
        }
        if timers.pong_deadline.is_some_and(|d| d <= now) {
            return Err(CloseReason::PingTimeout);
        }
        if let Some(interval) = timers.ping_interval {
            if timers.next_ping <= now {
                self.send(Outgoing::Ping).await?;
                timers.next_ping = now + interval;
                timers
                    .pong_deadline
                    .get_or_insert(now + timers.ping_timeout);
            }
        }
        if let (Some(interval), Some(heartbeat)) =
            (timers.heartbeat_interval, &self.gateway.config.heartbeat)
        {
            if timers.last_write + interval <= now {
                self.send(Outgoing::Text(heartbeat.clone())).await?;
                timers.last_write = now;
            }
        }
        Ok(())
    }

    async fn on_inbound(
        &mut self,
        message: Option<Result<Message, ProtocolError>>,
        timers: &mut Timers,
    ) -> Inbound {
        let message = match message {
            None => return Inbound::Close(CloseReason::ClientGone),
            Some(Err(e)) => return Inbound::Close(CloseReason::from_protocol_error(e)),
            Some(Ok(m)) => m,
        };
        let result = match message {
            Message::Text(_) | Message::Binary(_) if self.fragments.in_progress() => Err(
                CloseReason::Protocol("new message inside a fragmented one".into()),
            ),
            Message::Text(text) => self.on_frame(Frame::Text(text), timers).await,
            Message::Binary(bytes) => self.on_frame(Frame::Binary(bytes), timers).await,
            Message::Continuation(item) => match self.fragments.push(item) {
                Ok(Some(frame)) => self.on_frame(frame, timers).await,
                Ok(None) => Ok(()),
                Err(reason) => Err(reason),
            },
            Message::Ping(payload) => self.send(Outgoing::Pong(payload)).await,
            Message::Pong(_) | Message::Nop => Ok(()),
            Message::Close(theirs) => Err(CloseReason::ClientClosed(theirs)),
        };
        match result {
            Ok(()) => Inbound::Continue,
            Err(reason) => Inbound::Close(reason),
        }
    }

    /// A complete message from the client: answer a heartbeat, publish anything else.
    async fn on_frame(&mut self, frame: Frame, timers: &mut Timers) -> Result<(), CloseReason> {
        if let Some(heartbeat) = &self.gateway.config.heartbeat {
            if frame.as_bytes() == heartbeat.as_bytes() {
                self.send(Outgoing::Text(heartbeat.clone())).await?;
                timers.last_write = Instant::now();
                return Ok(());
            }
        }
        if self.params.publish.is_empty() {
            debug!("conn {}: frame ignored, no publish flag", self.params.id);
            return Ok(());
        }
        let payload = frame.payload();
        let expire = self.gateway.config.redis.expire;
        let broker = &self.gateway.broker;
        if let Err(e) = broker.publish(&self.params.publish, &payload, expire).await {
            debug!("conn {}: publish failed: {e}", self.params.id);
            return Err(CloseReason::BrokerUnavailable);
        }
        self.last_published = Some(payload);
        Ok(())
    }
}

/// Reassembles a fragmented message, bounded by `max_message_size`.
struct Fragments {
    parts: BytesMut,
    text: Option<bool>,
    limit: usize,
}

impl Fragments {
    fn new(limit: usize) -> Self {
        Fragments {
            parts: BytesMut::new(),
            text: None,
            limit,
        }
    }

    fn in_progress(&self) -> bool {
        self.text.is_some()
    }

    fn push(&mut self, item: Item) -> Result<Option<Frame>, CloseReason> {
        let (data, first, last) = match item {
            Item::FirstText(d) => (d, Some(true), false),
            Item::FirstBinary(d) => (d, Some(false), false),
            Item::Continue(d) => (d, None, false),
            Item::Last(d) => (d, None, true),
        };
        match (first, self.text) {
            (Some(_), Some(_)) => {
                return Err(CloseReason::Protocol(
                    "new message inside a fragmented one".into(),
                ))
            }
            (None, None) => {
                return Err(CloseReason::Protocol(
                    "continuation without a first fragment".into(),
                ))
            }
            (Some(kind), None) => self.text = Some(kind),
            (None, Some(_)) => {}
        }
        if self.parts.len() + data.len() > self.limit {
            return Err(CloseReason::TooBig);
        }
        self.parts.extend_from_slice(&data);
        if !last {
            return Ok(None);
        }
        let payload = std::mem::take(&mut self.parts).freeze();
        match self.text.take() {
            Some(true) => ByteString::try_from(payload)
                .map(|t| Some(Frame::Text(t)))
                .map_err(|_| CloseReason::InvalidUtf8),
            _ => Ok(Some(Frame::Binary(payload))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_reassemble_within_the_bound() {
        let mut f = Fragments::new(6);
        assert_eq!(f.push(Item::FirstText(Bytes::from_static(b"ab"))), Ok(None));
        assert_eq!(f.push(Item::Continue(Bytes::from_static(b"cd"))), Ok(None));
        assert_eq!(
            f.push(Item::Last(Bytes::from_static(b"ef"))),
            Ok(Some(Frame::Text("abcdef".into())))
        );
        assert_eq!(
            f.push(Item::FirstBinary(Bytes::from_static(b"1234"))),
            Ok(None)
        );
        assert_eq!(
            f.push(Item::Last(Bytes::from_static(b"567"))),
            Err(CloseReason::TooBig)
        );
    }

    #[test]
    fn bad_fragment_sequences_are_protocol_errors() {
        let mut f = Fragments::new(100);
        assert!(matches!(
            f.push(Item::Continue(Bytes::new())),
            Err(CloseReason::Protocol(_))
        ));
        let mut f = Fragments::new(100);
        f.push(Item::FirstText(Bytes::from_static(b"\xff")))
            .unwrap();
        assert_eq!(
            f.push(Item::Last(Bytes::new())),
            Err(CloseReason::InvalidUtf8)
        );
    }

    #[test]
    fn close_reasons_carry_documented_codes() {
        let code = |r: CloseReason| r.frame().map(|f| u16::from(f.code));
        assert_eq!(code(CloseReason::Shutdown), Some(1001));
        assert_eq!(code(CloseReason::SlowConsumer), Some(4000));
        assert_eq!(code(CloseReason::InvalidUtf8), Some(1007));
        assert_eq!(code(CloseReason::TooBig), Some(1009));
        assert_eq!(code(CloseReason::BrokerUnavailable), Some(1013));
        assert_eq!(code(CloseReason::ClientClosed(None)), Some(1000));
        assert_eq!(code(CloseReason::ClientGone), None);
    }
}
