//! One [`Worker`] per worker thread: the sockets that live on it, their fan-out, and
//! their timers.
//!
//! A socket stays on the thread that accepted it. The worker's task receives each
//! publication once from the [`Registry`] (through its inbox), looks up its own sockets
//! on the key, queues the shared frame for each, and then writes every socket it
//! touched once, with one vectored write. It also advances the worker's timing wheel
//! ([`crate::wheel`]), which wakes a socket's task when one of its deadlines comes, and
//! starts the drain when the gateway stops.
//!
//! Everything here is owned by the thread: `Rc`, `RefCell`, no locks. The only
//! cross-thread handoff is the inbox.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::{key_index, KeyIndex};
use crate::registry::{Form, Publication, Registry};
use crate::socket::{signal, Socket, NEVER};
use crate::wheel::{Clock, Tick, Wheel, TICK};
use crate::ws::frame;

/// Publications taken from the inbox in one batch.
const BATCH: usize = 256;
/// The read buffer shared by a worker's sockets.
const SCRATCH: usize = 64 * 1024;

/// How long a new socket waits for its subscriptions and stored messages before it
/// goes live without the stored messages.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The settings a socket uses, in the unit its task works in (wheel ticks).
#[derive(Debug, Clone)]
pub struct SocketConfig {
    pub max_message_size: usize,
    pub queue_bytes: usize,
    pub max_publication_size: usize,
    /// Seconds a client's publication is kept for late joiners (`redis.expire`).
    pub expire: u64,
    pub ping_interval: Option<Tick>,
    pub ping_timeout: Tick,
    pub heartbeat: Option<Heartbeat>,
    pub heartbeat_interval: Tick,
    pub close_timeout: Tick,
    pub drain_window: Tick,
    pub setup_timeout: Tick,
    /// How long a long-poll waits for a message.
    pub poll_timeout: Tick,
}

/// The ws4redis heartbeat string, and the frame that carries it (encoded once).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub text: Bytes,
    pub frame: Bytes,
}

impl SocketConfig {
    pub fn new(config: &Config) -> Self {
        SocketConfig {
            max_message_size: config.max_message_size,
            queue_bytes: config.queue_bytes,
            max_publication_size: config.max_publication_size,
            expire: config.redis.expire,
            ping_interval: config.ping_interval().map(Clock::ticks),
            ping_timeout: Clock::ticks(config.ping_timeout()),
            heartbeat: config.heartbeat.as_ref().map(|h| Heartbeat {
                text: Bytes::copy_from_slice(h.as_bytes()),
                frame: frame::encode(frame::OP_TEXT, h.as_bytes()),
            }),
            heartbeat_interval: Clock::ticks(config.heartbeat_interval()),
            close_timeout: Clock::ticks(config.close_timeout()),
            drain_window: Clock::ticks(config.drain_window()),
            setup_timeout: Clock::ticks(SETUP_TIMEOUT),
            poll_timeout: Clock::ticks(config.poll_timeout()),
        }
    }
}

/// What every worker and socket task of the process shares.
pub struct Relay {
    pub config: SocketConfig,
    pub broker: Arc<Broker>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the gateway stops: every socket closes with 1001 within the
    /// drain window.
    pub shutdown: CancellationToken,
    /// Tracks socket tasks, so a stop can wait for them (bounded).
    pub tracker: TaskTracker,
}

/// A socket on a key, and the key's place in the socket's subscribe keys (what a
/// conflating socket's queue tells keys apart by).
type Listener = (Rc<Socket>, KeyIndex);

pub struct Worker {
    pub id: usize,
    pub relay: Arc<Relay>,
    pub clock: Clock,
    /// Key → this worker's sockets on it.
    listeners: RefCell<HashMap<Arc<str>, Vec<Listener>>>,
    /// Every socket of this worker, for the drain.
    sockets: RefCell<slab::Slab<Weak<Socket>>>,
    wheel: RefCell<Wheel<Weak<Socket>>>,
    /// Wakes the worker's task when the wheel gets its first entry.
    wheel_armed: Notify,
    /// Sockets queued for in the current batch, to be written at its end.
    dirty: RefCell<Vec<Rc<Socket>>>,
    /// Where sockets read into; only borrowed inside one read.
    pub scratch: RefCell<Box<[u8]>>,
}

impl Worker {
    /// Creates this thread's worker and spawns its task on the thread's local set.
    pub fn start(relay: Arc<Relay>) -> Rc<Worker> {
        let (id, inbox) = relay.registry.attach_worker();
        let worker = Rc::new(Worker {
            id,
            relay,
            clock: Clock::new(),
            listeners: RefCell::default(),
            sockets: RefCell::default(),
            wheel: RefCell::default(),
            wheel_armed: Notify::new(),
            dirty: RefCell::default(),
            scratch: RefCell::new(vec![0; SCRATCH].into_boxed_slice()),
        });
        tokio::task::spawn_local(worker.clone().run(inbox));
        worker
    }

    /// Open sockets on this worker.
    pub fn len(&self) -> usize {
        self.sockets.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `socket` as a listener of `keys`.
    pub fn attach(&self, socket: &Rc<Socket>, keys: &[Arc<str>]) {
        let index = self.sockets.borrow_mut().insert(Rc::downgrade(socket));
        socket.index.set(index);
        let mut listeners = self.listeners.borrow_mut();
        for (i, key) in keys.iter().enumerate() {
            let sockets = listeners.entry(key.clone()).or_default();
            if sockets.is_empty() {
                self.relay.registry.add(key, self.id);
            }
            sockets.push((socket.clone(), key_index(i)));
        }
    }

    /// Removes `socket` from `keys` and from the worker.
    pub fn detach(&self, socket: &Rc<Socket>, keys: &[Arc<str>]) {
        self.sockets.borrow_mut().try_remove(socket.index.get());
        let mut listeners = self.listeners.borrow_mut();
        for key in keys {
            let Some(sockets) = listeners.get_mut(key) else {
                continue;
            };
            if let Some(i) = sockets.iter().position(|(s, _)| Rc::ptr_eq(s, socket)) {
                sockets.swap_remove(i);
            }
            if sockets.is_empty() {
                listeners.remove(key);
                self.relay.registry.remove(key, self.id);
            }
        }
    }

    /// Wakes `socket`'s task at `tick` (or earlier, if it already asked for that).
    pub fn schedule(&self, socket: &Rc<Socket>, tick: Tick) {
        if tick >= socket.due.get() {
            return;
        }
        socket.due.set(tick);
        let mut wheel = self.wheel.borrow_mut();
        if wheel.is_empty() {
            self.wheel_armed.notify_one();
        }
        wheel.insert(tick, Rc::downgrade(socket));
    }

    async fn run(self: Rc<Self>, mut inbox: mpsc::Receiver<Arc<Publication>>) {
        let mut batch = Vec::with_capacity(BATCH);
        let shutdown = self.relay.shutdown.clone();
        let mut draining = false;
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let idle = self.wheel.borrow().is_empty();
            // Ticks before publications, so a flood of publications cannot hold back
            // pings, deadlines or the drain.
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    self.drain();
                }
                _ = ticker.tick(), if !idle => self.advance(),
                received = inbox.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    self.fan_out(&batch);
                    batch.clear();
                }
                _ = self.wheel_armed.notified(), if idle => {}
            }
        }
    }

    /// Queues each publication for this worker's sockets on its key, then writes each
    /// socket once. Never waits on a socket.
    fn fan_out(&self, batch: &[Arc<Publication>]) {
        let now = self.clock.now();
        let limit = self.relay.config.queue_bytes;
        let mut dirty = self.dirty.take();
        let (mut frames, mut bytes, mut conflated) = (0u64, 0u64, 0u64);
        {
            let listeners = self.listeners.borrow();
            let retention = self.relay.broker.retention();
            for publication in batch {
                let Some(sockets) = listeners.get(&publication.key) else {
                    continue;
                };
                // Each form wrapped once per worker, when a socket needs it.
                let mut wrapped: [Option<Option<Rc<Bytes>>>; Form::COUNT] = Default::default();
                let payload = publication.payload().len() as u64;
                for (socket, key) in sockets {
                    let form = socket.form;
                    let frame = wrapped[form.index()].get_or_insert_with(|| {
                        publication
                            .encoded(form, retention)
                            .map(|frame| Rc::new(frame.clone()))
                    });
                    let Some(frame) = frame else {
                        continue;
                    };
                    if let Some(dropped) =
                        socket.deliver(frame, *key, publication, limit, now, &mut dirty)
                    {
                        frames += 1;
                        bytes += payload;
                        conflated += dropped as u64;
                    }
                }
            }
        }
        // Counted before the writes, so that no client sees a frame the metrics do not.
        let metrics = &self.relay.metrics;
        metrics.frames_delivered.inc_by(frames);
        metrics.bytes_out.inc_by(bytes);
        if conflated > 0 {
            metrics.conflated.inc_by(conflated);
        }
        for socket in dirty.drain(..) {
            socket.flush_dirty(now);
        }
        self.dirty.replace(dirty);
        if let Some(oldest) = batch.first() {
            metrics
                .delivery_latency
                .observe(oldest.received.elapsed().as_secs_f64());
        }
    }

    /// Wakes every socket whose deadline has come.
    fn advance(&self) {
        let now = self.clock.now();
        self.wheel.borrow_mut().advance(now, |tick, socket| {
            let Some(socket) = socket.upgrade() else {
                return;
            };
            // An entry for a tick the socket no longer waits for is stale.
            if socket.due.get() == tick {
                socket.due.set(NEVER);
                socket.signal(signal::TIMER);
            }
        });
    }

    /// Tells every socket that the gateway is stopping; each picks its own moment in
    /// the drain window.
    fn drain(&self) {
        for (_, socket) in self.sockets.borrow().iter() {
            if let Some(socket) = socket.upgrade() {
                socket.signal(signal::DRAIN);
            }
        }
    }
}
