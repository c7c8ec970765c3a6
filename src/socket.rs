//! What a socket's task and its worker share: the stream, the frames waiting to be
//! written, and the signals between the two.
//!
//! Both run on the same worker thread and never at the same time, so the shared state
//! is in `Cell`s and `RefCell`s, and no borrow is ever held across an `.await`. The
//! worker writes publications straight to the stream when it fans them out (one
//! vectored write per socket per batch, no task wake-up); the socket's task writes
//! when the kernel buffer had no room ([`Socket::wants_write`]), answers the client and
//! keeps the timers. An idle socket owns no buffer: its queue and its read state are
//! empty and allocate nothing.
//!
//! A socket that falls behind (more than `queue_bytes` waiting) is closed as a slow
//! consumer (4000), unless its facility conflates (`slow_consumer = "conflate"`): then
//! it keeps only the newest frame per key ([`Outbox::push_conflating`]), also for the
//! frames held during setup, and control frames make room by dropping publications.
//! Conflation is for slow readers, not dead ones: a conflating client that reads
//! nothing at all is still closed when no byte could be written for `ping_timeout`
//! (the stuck-write guard, [`crate::conn`]), and one whose control frames alone fill
//! the queue is still a slow consumer.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::task::Waker;

use bytes::Bytes;
use prometheus::IntCounter;

use crate::history::StreamId;
use crate::outbox::{self, Frame, Full, KeyIndex, Outbox, CONTROL, MAX_IOVECS};
use crate::registry::{fingerprint, Form, Publication};
use crate::wheel::Tick;
use crate::ws::Stream;

/// State bits, changed by the task and the worker.
mod flag {
    /// Setup is not done: live frames wait in `held` behind the stored messages.
    pub const HELD: u8 = 1;
    /// The last write found the kernel buffer full; the task waits for room.
    pub const WANT_WRITE: u8 = 2;
    /// In the worker's list of sockets to flush at the end of this batch.
    pub const DIRTY: u8 = 4;
    /// Closing: publications are no longer queued.
    pub const CLOSING: u8 = 8;
    /// The client asked for `echo`: its own messages come back to it.
    pub const ECHO: u8 = 16;
}

/// Why the worker woke the task.
pub mod signal {
    /// A deadline the task asked for has come.
    pub const TIMER: u8 = 1;
    /// A frame did not fit under `queue_bytes`: the socket is a slow consumer (on a
    /// conflating socket, only when its control frames alone fill the queue).
    pub const OVERFLOW: u8 = 2;
    /// A write failed: the peer is gone.
    pub const BROKEN: u8 = 4;
    /// A write stopped on a full kernel buffer: the task must wait for room.
    pub const BLOCKED: u8 = 8;
    /// The gateway is stopping: the task picks its moment in the drain window.
    pub const DRAIN: u8 = 16;
    /// A long-poll's socket holds a publication: its answer can go.
    pub const ARRIVED: u8 = 32;
}

/// Per subscribe key, the newest id a socket's setup handed out.
pub type Floors = Vec<(KeyIndex, StreamId)>;

/// Tick value meaning "never".
pub const NEVER: Tick = Tick::MAX;

/// A live frame held during setup, with what decides whether it is a duplicate of
/// what setup read.
struct Held {
    frame: Frame,
    key: KeyIndex,
    id: Option<StreamId>,
    /// On a long-poll's socket, the fingerprint of a publication without an id: what
    /// names it to the client (see [`crate::poll`]).
    named: Option<u64>,
}

pub struct Socket {
    pub stream: Stream,
    out: RefCell<Outbox>,
    /// Live frames that arrived during setup, before the stored messages, and their
    /// bytes.
    held: RefCell<Vec<Held>>,
    held_bytes: Cell<usize>,
    /// On a conflating socket, `wsrelay_conflated_total`, counting the frames dropped to
    /// make room for control frames (the worker counts the fan-out's, once per batch).
    conflated: Option<IntCounter>,
    /// How publications are written for this socket's transport.
    pub form: Form,
    flags: Cell<u8>,
    signals: Cell<u8>,
    waker: RefCell<Option<Waker>>,
    /// The tick this socket's wheel entry fires at ([`NEVER`]: none pending).
    pub due: Cell<Tick>,
    /// When a write last made progress (for heartbeats and the stuck-write guard).
    last_write: Cell<Tick>,
    /// When the kernel buffer first had no room since the queue was last empty
    /// ([`NEVER`] while the queue drains freely).
    blocked_since: Cell<Tick>,
    /// A fingerprint (length and hash) of the last message this client published: with
    /// `echo` off, the same message coming back from the broker is not sent to it
    /// (ws4redis behaviour). A fingerprint, so that no payload is kept per socket.
    last_published: Cell<Option<(usize, u64)>>,
    /// Per subscribe key, the newest id that setup handed this socket (stored or
    /// replayed messages): a live publication with an id up to it is a duplicate. An
    /// entry goes once a newer id arrives; empty (no allocation) for most sockets.
    floors: RefCell<Vec<(KeyIndex, StreamId)>>,
    /// This socket's index in its worker's list.
    pub index: Cell<usize>,
}

impl Socket {
    /// `form`: how its transport wants publications written. `conflated`: the
    /// counter of frames dropped by conflation, for a socket that conflates instead of
    /// closing when it falls behind.
    pub fn new(
        stream: Stream,
        echo: bool,
        form: Form,
        conflated: Option<IntCounter>,
        now: Tick,
    ) -> Self {
        let flags = flag::HELD | if echo { flag::ECHO } else { 0 };
        Socket {
            stream,
            out: RefCell::default(),
            held: RefCell::default(),
            held_bytes: Cell::new(0),
            conflated,
            form,
            flags: Cell::new(flags),
            signals: Cell::new(0),
            waker: RefCell::default(),
            due: Cell::new(NEVER),
            last_write: Cell::new(now),
            blocked_since: Cell::new(NEVER),
            last_published: Cell::new(None),
            floors: RefCell::default(),
            index: Cell::new(usize::MAX),
        }
    }

    fn has(&self, bits: u8) -> bool {
        self.flags.get() & bits != 0
    }

    fn set(&self, bits: u8, on: bool) {
        let flags = self.flags.get();
        self.flags
            .set(if on { flags | bits } else { flags & !bits });
    }

    /// Raises `bits` and wakes the task.
    pub fn signal(&self, bits: u8) {
        self.signals.set(self.signals.get() | bits);
        let waker = self.waker.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Takes the raised signals, and keeps `waker` to be woken by the next ones.
    pub fn take_signals(&self, waker: &Waker) -> u8 {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
        self.signals.replace(0)
    }

    pub fn wants_write(&self) -> bool {
        self.has(flag::WANT_WRITE)
    }

    pub fn last_write(&self) -> Tick {
        self.last_write.get()
    }

    /// While writes wait for room: since when no byte went out (the later of the last
    /// progress and the moment the kernel buffer first filled up).
    pub fn stalled_since(&self) -> Option<Tick> {
        self.wants_write()
            .then(|| self.last_write.get().max(self.blocked_since.get()))
            .filter(|&t| t != NEVER)
    }

    /// Unwritten bytes, live frames held during setup included.
    pub fn queued(&self) -> usize {
        self.out.borrow().unwritten() + self.held_bytes.get()
    }

    pub fn has_unwritten(&self) -> bool {
        !self.out.borrow().is_empty()
    }

    /// Queues `publication` (as `frame`, raw or in the envelope, on the socket's
    /// subscribe key number `key`) for this socket: the worker's fan-out. Returns
    /// `None` if it was not queued, or how many older frames conflation dropped to make
    /// room for it; `dirty` collects the sockets to flush at the end of the batch.
    pub fn deliver(
        self: &Rc<Self>,
        frame: &Frame,
        key: KeyIndex,
        publication: &Publication,
        limit: usize,
        now: Tick,
        dirty: &mut Vec<Rc<Socket>>,
    ) -> Option<usize> {
        if self.has(flag::CLOSING) {
            return None;
        }
        // The envelope's control messages are never conflated away.
        let key = if publication.is_control() {
            CONTROL
        } else if self.is_own_echo(publication.payload()) {
            return None;
        } else {
            key
        };
        if let Some(id) = publication.id {
            if self.below_floor(key, id) {
                return None;
            }
        }
        if self.has(flag::HELD) {
            return self.hold(frame, key, publication, limit);
        }
        let mut pushed = self.out.borrow_mut().push(frame, key, limit);
        if pushed == Err(Full) && !self.has(flag::WANT_WRITE) {
            // Give a socket that keeps up the chance to take the frame now.
            self.flush(now);
            pushed = self.out.borrow_mut().push(frame, key, limit);
        }
        let mut dropped = 0;
        if pushed.is_err() {
            if self.conflated.is_none() {
                self.overflow();
                return None;
            }
            dropped = self.out.borrow_mut().push_conflating(frame, key, limit);
        }
        if !self.has(flag::WANT_WRITE | flag::DIRTY) {
            self.set(flag::DIRTY, true);
            dirty.push(self.clone());
        }
        Some(dropped)
    }

    /// Keeps a live frame that arrived during setup, under the same bound as the
    /// queue: what is queued and held together may not pass `limit`. A conflating
    /// socket makes room by dropping the held frames of the same key, then the oldest
    /// held publications.
    fn hold(
        &self,
        frame: &Frame,
        key: KeyIndex,
        publication: &Publication,
        limit: usize,
    ) -> Option<usize> {
        let id = publication.id;
        let named = (self.form == Form::Poll && id.is_none() && !publication.is_control())
            .then(|| fingerprint(publication.payload()).1);
        let mut dropped = 0;
        if !outbox::fits(self.queued(), frame.len(), limit) {
            if self.conflated.is_none() {
                self.overflow();
                return None;
            }
            let mut held = self.held.borrow_mut();
            let before = held.len();
            held.retain(|h| h.key != key || key == CONTROL);
            let mut bytes: usize = held.iter().map(|h| h.frame.len()).sum();
            let queued = self.out.borrow().unwritten();
            while !outbox::fits(queued + bytes, frame.len(), limit) {
                let Some(i) = held.iter().position(|h| h.key != CONTROL) else {
                    break;
                };
                bytes -= held.remove(i).frame.len();
            }
            dropped = before - held.len();
            self.held_bytes.set(bytes);
        }
        self.held.borrow_mut().push(Held {
            frame: frame.clone(),
            key,
            id,
            named,
        });
        self.held_bytes.set(self.held_bytes.get() + frame.len());
        // A long-poll's socket stays held: what it holds is its answer.
        if self.form == Form::Poll {
            self.signal(signal::ARRIVED);
        }
        Some(dropped)
    }

    /// Whether `id` on subscribe key `key` was already handed out by setup; forgets
    /// the floor once a newer id passes it.
    fn below_floor(&self, key: KeyIndex, id: StreamId) -> bool {
        let mut floors = self.floors.borrow_mut();
        let Some(i) = floors.iter().position(|(k, _)| *k == key) else {
            return false;
        };
        if id <= floors[i].1 {
            return true;
        }
        floors.swap_remove(i);
        if floors.is_empty() {
            *floors = Vec::new();
        }
        false
    }

    /// Called by the worker for each socket it collected in a batch.
    pub fn flush_dirty(&self, now: Tick) {
        self.set(flag::DIRTY, false);
        self.flush(now);
    }

    fn overflow(&self) {
        self.set(flag::CLOSING, true);
        self.signal(signal::OVERFLOW);
    }

    /// Queues a control frame (pong, heartbeat) and writes what it can. Control frames
    /// count against `queue_bytes` like publications: a client that pings and never
    /// reads is a slow consumer. On a conflating socket, unstarted publications are
    /// dropped to make room for it first.
    pub fn send_control(&self, frame: Bytes, limit: usize, now: Tick) {
        let mut out = self.out.borrow_mut();
        if let Some(conflated) = &self.conflated {
            let dropped = out.make_room(None, frame.len(), limit);
            if dropped > 0 {
                conflated.inc_by(dropped as u64);
            }
        }
        let pushed = out.push_control(frame, limit);
        drop(out);
        match pushed {
            Ok(()) => self.flush(now),
            Err(Full) => self.overflow(),
        }
    }

    /// Queues the close frame (whatever the bound: it is the last) and writes what it
    /// can.
    pub fn send_close(&self, frame: Bytes, now: Tick) {
        self.out.borrow_mut().push_owned(std::rc::Rc::new(frame));
        self.flush(now);
    }

    /// Ends setup: `stored` go out first (as many as fit under `limit` on their own),
    /// then the live frames held meanwhile, except those with an id up to their key's
    /// floor (setup already handed them out). Returns how many stored messages did not
    /// fit.
    pub fn release(
        &self,
        stored: Vec<Bytes>,
        floors: Vec<(KeyIndex, StreamId)>,
        limit: usize,
        now: Tick,
    ) -> usize {
        *self.floors.borrow_mut() = floors;
        let mut out = self.out.borrow_mut();
        let skipped = out.push_front(stored, limit);
        for held in self.held.take() {
            if held.id.is_some_and(|id| self.below_floor(held.key, id)) {
                continue;
            }
            out.push_counted(held.frame, held.key);
        }
        self.held_bytes.set(0);
        drop(out);
        self.set(flag::HELD, false);
        self.flush(now);
        skipped
    }

    /// A long-poll's answer: sets the floors setup found (on the first call) and takes
    /// the publications held so far, except those the client has (an id up to its
    /// key's floor) and those `news` refuses: given a publication's key and, when it
    /// has no id, its fingerprint.
    pub fn take_held(
        &self,
        floors: Option<Floors>,
        news: impl Fn(KeyIndex, Option<u64>) -> bool,
    ) -> Vec<Frame> {
        if let Some(floors) = floors {
            *self.floors.borrow_mut() = floors;
        }
        self.held_bytes.set(0);
        self.held
            .take()
            .into_iter()
            .filter(|held| !held.id.is_some_and(|id| self.below_floor(held.key, id)))
            .filter(|held| news(held.key, held.named))
            .map(|held| held.frame)
            .collect()
    }

    /// Remembers what this client just published (see `last_published`).
    pub fn published(&self, payload: &[u8]) {
        if !self.has(flag::ECHO) {
            self.last_published.set(Some(fingerprint(payload)));
        }
    }

    /// Whether `payload` is this client's own last message coming back (echo off).
    fn is_own_echo(&self, payload: &[u8]) -> bool {
        match self.last_published.get() {
            Some((len, hash)) => len == payload.len() && fingerprint(payload).1 == hash,
            None => false,
        }
    }

    /// Stops queuing publications; with `keep_queued` off, drops every frame not yet
    /// started (a partly written one is finished first).
    pub fn start_closing(&self, keep_queued: bool) {
        self.set(flag::CLOSING, true);
        self.held.take();
        self.held_bytes.set(0);
        if !keep_queued {
            self.out.borrow_mut().drop_unstarted();
        }
    }

    /// Frees what an idle socket's queue kept from its last batches.
    pub fn shrink_idle(&self) {
        self.out.borrow_mut().shrink();
    }

    /// The kernel buffer has room again (the task saw the stream writable).
    pub fn writable(&self, now: Tick) {
        self.set(flag::WANT_WRITE, false);
        self.flush(now);
    }

    /// Writes queued frames until done or the kernel buffer is full. Never waits.
    fn flush(&self, now: Tick) {
        if self.has(flag::WANT_WRITE) {
            return;
        }
        let mut out = self.out.borrow_mut();
        loop {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = out.slices(&mut slices);
            if n == 0 {
                self.blocked_since.set(NEVER);
                return;
            }
            match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => {
                    drop(out);
                    self.signal(signal::BROKEN);
                    return;
                }
                Ok(written) => {
                    out.advance(written);
                    self.last_write.set(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(out);
                    if self.blocked_since.get() == NEVER {
                        self.blocked_since.set(now);
                    }
                    self.set(flag::WANT_WRITE, true);
                    self.signal(signal::BLOCKED);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    drop(out);
                    self.signal(signal::BROKEN);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::task::Waker;
    use std::time::Duration;

    use std::sync::Arc;

    use tokio::time::Instant;

    use super::*;

    const LIMIT: usize = 1000;
    /// Every test frame is this long, so the peer can cut what it read into frames.
    const LEN: usize = 100;

    /// A test frame: its key's letter, its number, padding.
    fn frame(key: u8, n: usize) -> Frame {
        let mut bytes = format!("{}{n:05}", key as char).into_bytes();
        bytes.resize(LEN, b'.');
        Rc::new(Bytes::from(bytes))
    }

    fn open(conflate: bool) -> (Rc<Socket>, UnixStream, IntCounter) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let ours = tokio::net::UnixStream::from_std(ours).unwrap();
        let counter = IntCounter::new("conflated", "test").unwrap();
        let conflated = conflate.then(|| counter.clone());
        let socket = Rc::new(Socket::new(
            Stream::Unix(ours),
            false,
            Form::Plain,
            conflated,
            0,
        ));
        (socket, theirs, counter)
    }

    /// Delivers `frame` on `key` and flushes as the worker would at the end of a batch.
    fn deliver(socket: &Rc<Socket>, frame: &Frame, key: KeyIndex) -> Option<usize> {
        let mut dirty = Vec::new();
        let publication = Publication::new(Arc::from("k"), &frame[..], None, Instant::now());
        let delivered = socket.deliver(frame, key, &publication, LIMIT, 0, &mut dirty);
        for socket in dirty {
            socket.flush_dirty(0);
        }
        delivered
    }

    /// Fills the kernel buffer with frames of key `f` until writes wait for room.
    fn fill_kernel_buffer(socket: &Rc<Socket>) {
        let filler = frame(b'f', 0);
        for _ in 0..100_000 {
            if socket.wants_write() {
                return;
            }
            assert_eq!(deliver(socket, &filler, 0), Some(0));
        }
        panic!("the kernel buffer never filled up");
    }

    /// Reads everything the socket writes, letting it write as the peer makes room
    /// (bounded); returns the frames, fillers left out, and the pongs.
    async fn read_all(socket: &Socket, mut peer: &UnixStream) -> (Vec<String>, usize) {
        let mut raw = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        for _ in 0..10_000 {
            match peer.read(&mut buf) {
                Ok(n) if n > 0 => raw.extend_from_slice(&buf[..n]),
                _ if socket.has_unwritten() => {
                    if socket.wants_write() {
                        let ready = std::future::poll_fn(|cx| socket.stream.poll_write_ready(cx));
                        tokio::time::timeout(Duration::from_secs(5), ready)
                            .await
                            .expect("room to write")
                            .unwrap();
                    }
                    socket.writable(0);
                }
                _ => break,
            }
        }
        assert!(!socket.has_unwritten());
        let (mut frames, mut pongs, mut at) = (Vec::new(), 0, 0);
        while at < raw.len() {
            if raw[at..].starts_with(&[0x8A, 0]) {
                pongs += 1;
                at += 2;
                continue;
            }
            let frame = String::from_utf8_lossy(&raw[at..at + 6]).into_owned();
            if !frame.starts_with('f') {
                frames.push(frame);
            }
            at += LEN;
        }
        (frames, pongs)
    }

    /// The last frame of each of keys `a` and `b`, and whether each key's frames came
    /// in order.
    fn last_per_key(frames: &[String]) -> (String, String) {
        for key in ["a", "b"] {
            let numbers: Vec<&String> = frames.iter().filter(|f| f.starts_with(key)).collect();
            assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        }
        let last = |key| frames.iter().rfind(|f| f.starts_with(key)).unwrap().clone();
        (last("a"), last("b"))
    }

    fn signals(socket: &Socket) -> u8 {
        socket.take_signals(Waker::noop())
    }

    #[tokio::test]
    async fn a_conflating_socket_that_falls_behind_keeps_the_newest_frame_per_key() {
        let (socket, peer, conflated) = open(true);
        socket.release(Vec::new(), Vec::new(), LIMIT, 0);
        fill_kernel_buffer(&socket);
        signals(&socket);
        let mut dropped = 0;
        for n in 0..200 {
            let (key, letter) = if n % 3 == 0 { (1, b'b') } else { (0, b'a') };
            dropped += deliver(&socket, &frame(letter, n), key).expect("queued");
            assert!(socket.queued() <= LIMIT, "{} bytes queued", socket.queued());
        }
        assert!(dropped > 150, "{dropped} dropped");
        assert_eq!(signals(&socket) & signal::OVERFLOW, 0);
        let mut n = 200;
        while socket.queued() < LIMIT {
            assert_eq!(deliver(&socket, &frame(b'a', n), 0), Some(0));
            n += 1;
        }
        // A pong makes room too (publications go for it), and is never dropped.
        socket.send_control(Bytes::from_static(&[0x8A, 0]), LIMIT, 0);
        assert_eq!(signals(&socket) & signal::OVERFLOW, 0);
        assert!(conflated.get() > 0, "publications made room for the pong");
        let (frames, pongs) = read_all(&socket, &peer).await;
        assert_eq!(pongs, 1);
        assert_eq!(
            last_per_key(&frames),
            (format!("a{:05}", n - 1), "b00198".into())
        );
    }

    #[tokio::test]
    async fn frames_held_during_setup_are_conflated_too() {
        let (socket, peer, _) = open(true);
        for n in 0..50 {
            let (key, letter) = if n % 2 == 0 { (0, b'a') } else { (1, b'b') };
            assert!(deliver(&socket, &frame(letter, n), key).is_some());
            assert!(socket.queued() <= LIMIT);
        }
        assert_eq!(signals(&socket) & signal::OVERFLOW, 0);
        // Stored messages first (bounded on their own), then the newest held frames.
        let stored = vec![Bytes::from(frame(b's', 0).to_vec())];
        assert_eq!(socket.release(stored, Vec::new(), LIMIT, 0), 0);
        let (frames, _) = read_all(&socket, &peer).await;
        assert_eq!(frames.first().map(String::as_str), Some("s00000"));
        assert_eq!(last_per_key(&frames), ("a00048".into(), "b00049".into()));
        assert!(frames.len() <= 1 + LIMIT / LEN, "{frames:?}");
    }

    #[tokio::test]
    async fn a_socket_that_does_not_conflate_is_a_slow_consumer() {
        let (socket, _peer, _) = open(false);
        for n in 0..LIMIT / LEN {
            assert_eq!(deliver(&socket, &frame(b'a', n), 0), Some(0));
        }
        assert_eq!(deliver(&socket, &frame(b'a', 99), 0), None);
        assert_ne!(signals(&socket) & signal::OVERFLOW, 0);
        let (socket, _peer, _) = open(false);
        socket.release(Vec::new(), Vec::new(), LIMIT, 0);
        fill_kernel_buffer(&socket);
        let mut taken = 0;
        while deliver(&socket, &frame(b'a', taken), 0) == Some(0) {
            taken += 1;
            assert!(taken <= LIMIT / LEN, "{taken} frames queued");
        }
        assert_ne!(signals(&socket) & signal::OVERFLOW, 0);
    }
}
