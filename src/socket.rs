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

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::task::Waker;

use std::sync::Arc;

use bytes::Bytes;

use crate::history::StreamId;
use crate::outbox::{self, Frame, Full, Outbox, MAX_IOVECS};
use crate::registry::{fingerprint, Publication};
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
    /// The client speaks the envelope subprotocol (ids, control messages).
    pub const ENVELOPE: u8 = 32;
}

/// Why the worker woke the task.
pub mod signal {
    /// A deadline the task asked for has come.
    pub const TIMER: u8 = 1;
    /// A frame did not fit under `queue_bytes`: the socket is a slow consumer.
    pub const OVERFLOW: u8 = 2;
    /// A write failed: the peer is gone.
    pub const BROKEN: u8 = 4;
    /// A write stopped on a full kernel buffer: the task must wait for room.
    pub const BLOCKED: u8 = 8;
    /// The gateway is stopping: the task picks its moment in the drain window.
    pub const DRAIN: u8 = 16;
}

/// Tick value meaning "never".
pub const NEVER: Tick = Tick::MAX;

/// A live frame held during setup, with what decides whether it is a duplicate of
/// what setup read.
struct Held {
    frame: Frame,
    key: Arc<str>,
    id: Option<StreamId>,
}

pub struct Socket {
    pub stream: Stream,
    out: RefCell<Outbox>,
    /// Live frames that arrived during setup, before the stored messages, and their bytes.
    held: RefCell<Vec<Held>>,
    held_bytes: Cell<usize>,
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
    /// Per key, the newest id that setup handed this socket (stored or replayed
    /// messages): a live publication with an id up to it is a duplicate. An entry goes
    /// once a newer id arrives; empty (no allocation) for most sockets.
    floors: RefCell<Vec<(Arc<str>, StreamId)>>,
    /// This socket's index in its worker's list.
    pub index: Cell<usize>,
}

impl Socket {
    pub fn new(stream: Stream, echo: bool, envelope: bool, now: Tick) -> Self {
        let flags = flag::HELD
            | if echo { flag::ECHO } else { 0 }
            | if envelope { flag::ENVELOPE } else { 0 };
        Socket {
            stream,
            out: RefCell::default(),
            held: RefCell::default(),
            held_bytes: Cell::new(0),
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

    /// Whether this socket receives the envelope rather than raw payloads.
    pub fn wants_envelope(&self) -> bool {
        self.has(flag::ENVELOPE)
    }

    /// Queues `publication` (as `frame`, raw or in the envelope) for this socket: the
    /// worker's fan-out. Returns whether it was queued; `dirty` collects the sockets to
    /// flush at the end of the batch.
    pub fn deliver(
        self: &Rc<Self>,
        frame: &Frame,
        publication: &Publication,
        limit: usize,
        now: Tick,
        dirty: &mut Vec<Rc<Socket>>,
    ) -> bool {
        if self.has(flag::CLOSING) {
            return false;
        }
        if !publication.is_control() && self.is_own_echo(publication.payload()) {
            return false;
        }
        if let Some(id) = publication.id {
            if self.below_floor(&publication.key, id) {
                return false;
            }
        }
        if self.has(flag::HELD) {
            if !outbox::fits(self.queued(), frame.len(), limit) {
                self.overflow();
                return false;
            }
            self.held.borrow_mut().push(Held {
                frame: frame.clone(),
                key: publication.key.clone(),
                id: publication.id,
            });
            self.held_bytes.set(self.held_bytes.get() + frame.len());
            return true;
        }
        let mut pushed = self.out.borrow_mut().push(frame, limit);
        if pushed == Err(Full) && !self.has(flag::WANT_WRITE) {
            // Give a socket that keeps up the chance to take the frame now.
            self.flush(now);
            pushed = self.out.borrow_mut().push(frame, limit);
        }
        if pushed.is_err() {
            self.overflow();
            return false;
        }
        if !self.has(flag::WANT_WRITE | flag::DIRTY) {
            self.set(flag::DIRTY, true);
            dirty.push(self.clone());
        }
        true
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
    /// reads is a slow consumer.
    pub fn send_control(&self, frame: Bytes, limit: usize, now: Tick) {
        let pushed = self.out.borrow_mut().push_control(frame, limit);
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

    /// Whether `id` on `key` was already handed out by setup; forgets the floor once a
    /// newer id passes it.
    fn below_floor(&self, key: &Arc<str>, id: StreamId) -> bool {
        let mut floors = self.floors.borrow_mut();
        let Some(i) = floors.iter().position(|(k, _)| k == key) else {
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

    /// Ends setup: `stored` go out first (as many as fit under `limit` on their own),
    /// then the live frames held meanwhile, except those with an id up to the key's
    /// floor (setup already handed them out). Returns how many stored messages did not
    /// fit.
    pub fn release(
        &self,
        stored: Vec<Bytes>,
        floors: Vec<(Arc<str>, StreamId)>,
        limit: usize,
        now: Tick,
    ) -> usize {
        *self.floors.borrow_mut() = floors;
        let mut out = self.out.borrow_mut();
        let skipped = out.push_front(stored, limit);
        for held in self.held.take() {
            if held.id.is_some_and(|id| self.below_floor(&held.key, id)) {
                continue;
            }
            out.push_owned(held.frame);
        }
        self.held_bytes.set(0);
        drop(out);
        self.set(flag::HELD, false);
        self.flush(now);
        skipped
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
