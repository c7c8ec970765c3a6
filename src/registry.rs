//! Which worker threads have sockets on which key, and the ordered log of subscription
//! changes; the meeting point of brokers and workers.
//!
//! Each worker keeps its own map of key → local sockets ([`crate::worker`]). This
//! registry only knows, per key, the set of workers with at least one socket on it, so
//! a publication is encoded once ([`Publication`]) and handed to each of those workers
//! through its inbox, and the worker fans it out to its sockets without locks.
//!
//! The registry is the source of truth for this process's Redis subscriptions: a key
//! is subscribed while some worker has a socket on it. [`Registry::add`] and
//! [`Registry::remove`] record the 0→1 and 1→0 transitions in a change log that the
//! Redis broker applies in order, so Redis sees one SUBSCRIBE when the first socket
//! arrives and one UNSUBSCRIBE after the last one leaves. Changes are sent while the
//! shard lock is held, so two racing transitions of one key reach the broker in the
//! order they happened. No lock is ever held across an `.await`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::event_stream;
use crate::history::{envelope, Retention, StreamId};
use crate::metrics::Metrics;
use crate::ws::frame;

const SHARDS: usize = 16;
/// Workers a process may have (one bit each in a key's worker set).
pub const MAX_WORKERS: usize = 64;
/// Publications waiting in one worker's inbox before the broker waits for it.
const INBOX: usize = 1024;

/// How a socket's transport wants publications written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// A WebSocket frame of the payload itself (ws4redis).
    Plain,
    /// A WebSocket text frame of the envelope's JSON (`wsrelay.v1`).
    Envelope,
    /// A Server-Sent Event ([`crate::event_stream`]).
    Event,
    /// An element of a long-poll answer: the envelope's JSON, every message with an id
    /// ([`crate::poll`]).
    Poll,
}

impl Form {
    /// How many forms there are ([`Form::index`] is below it).
    pub const COUNT: usize = 4;
    /// Forms other than `Plain`, each encoded on first need.
    pub const LAZY: usize = 3;

    /// This form's place among all of them.
    pub fn index(self) -> usize {
        self.lazy_index().map_or(0, |i| i + 1)
    }

    /// This form's place among the lazily encoded ones (`None`: `Plain`).
    pub fn lazy_index(self) -> Option<usize> {
        match self {
            Form::Plain => None,
            Form::Envelope => Some(0),
            Form::Event => Some(1),
            Form::Poll => Some(2),
        }
    }

    /// Whether this form is a WebSocket's (the others only receive).
    pub fn is_websocket(self) -> bool {
        matches!(self, Form::Plain | Form::Envelope)
    }

    /// Whether sockets of this form get the envelope's control messages.
    pub fn has_controls(self) -> bool {
        self != Form::Plain
    }

    /// A message as sockets of this form receive it, on the key named `label`;
    /// `stored` marks a late joiner's stored message.
    pub fn message(self, label: &str, id: Option<StreamId>, payload: &[u8], stored: bool) -> Bytes {
        match self {
            Form::Plain => frame::encode_message(payload),
            Form::Envelope => {
                let text = envelope::message(label, id, payload, stored);
                frame::encode(frame::OP_TEXT, text.as_bytes())
            }
            Form::Event => event_stream::message(id.map(|id| (label, id)), payload),
            Form::Poll => {
                let id = crate::poll::message_id(id, payload);
                envelope::message(label, Some(id), payload, stored).into()
            }
        }
    }

    /// A control message of the envelope (its JSON) as sockets of this form receive it
    /// (`None`: plain sockets get none).
    pub fn control(self, text: &str) -> Option<Bytes> {
        match self {
            Form::Plain => None,
            Form::Envelope => Some(frame::encode(frame::OP_TEXT, text.as_bytes())),
            Form::Event => Some(event_stream::control(text)),
            Form::Poll => Some(Bytes::copy_from_slice(text.as_bytes())),
        }
    }
}

/// A publication encoded once per form, shared by every socket it goes to.
#[derive(Debug)]
pub struct Publication {
    pub key: Arc<str>,
    /// Its id in the key's history, when it has one.
    pub id: Option<StreamId>,
    /// Header and payload: the exact bytes every plain socket receives; empty for a
    /// control message, which plain sockets do not receive.
    pub frame: Bytes,
    /// Where the payload starts in `frame`.
    header: usize,
    /// A control message's JSON (`reset`, `gap`).
    control: Option<Box<str>>,
    /// The other forms, encoded when the first socket of the form needs them.
    forms: [OnceLock<Bytes>; Form::LAZY],
    /// When the broker received it (for the delivery latency metric).
    pub received: Instant,
}

impl Publication {
    /// A payload carries no type: valid UTF-8 goes out as a text frame, anything else
    /// as binary. Checked once per publication, not once per socket.
    pub fn new(key: Arc<str>, payload: &[u8], id: Option<StreamId>, received: Instant) -> Self {
        Publication {
            key,
            id,
            frame: frame::encode_message(payload),
            header: frame::server_header_size(payload.len()),
            control: None,
            forms: Default::default(),
            received,
        }
    }

    /// A control message of the envelope (`reset`, `gap`) on `key`.
    pub fn control(key: Arc<str>, text: &str, received: Instant) -> Self {
        Publication {
            key,
            id: None,
            frame: Bytes::new(),
            header: 0,
            control: Some(text.into()),
            forms: Default::default(),
            received,
        }
    }

    pub fn is_control(&self) -> bool {
        self.control.is_some()
    }

    pub fn payload(&self) -> &[u8] {
        &self.frame[self.header..]
    }

    /// What a socket of `form` receives (`None`: nothing, a control message for a
    /// plain socket).
    pub fn encoded(&self, form: Form, retention: &Retention) -> Option<&Bytes> {
        match form.lazy_index() {
            None => (!self.is_control()).then_some(&self.frame),
            Some(i) => Some(self.forms[i].get_or_init(|| self.encode(form, retention))),
        }
    }

    /// A lazily encoded form (never `Plain`: that one is `frame`).
    fn encode(&self, form: Form, retention: &Retention) -> Bytes {
        match &self.control {
            // Only reached for forms that get control messages.
            Some(text) => form.control(text).unwrap_or_default(),
            None => form.message(&retention.label(&self.key), self.id, self.payload(), false),
        }
    }
}

/// A message's length and a 64-bit hash of it: enough to tell two messages apart
/// without keeping either.
pub fn fingerprint(payload: &[u8]) -> (usize, u64) {
    // XXH3: several times faster than the standard SipHash on payloads, and taken once
    // per publication (and per socket that published, for its echo).
    (payload.len(), xxhash_rust::xxh3::xxh3_64(payload))
}

/// What the registry keeps per live key: small, since an idle gateway may hold a key
/// per socket; what relaying has to remember is allocated by the first publication.
#[derive(Debug, Default)]
struct KeyState {
    /// The workers (one bit each) with a socket on the key.
    workers: u64,
    relayed: Option<Box<Relayed>>,
}

impl KeyState {
    fn relayed(&mut self) -> &mut Relayed {
        self.relayed.get_or_insert_with(Box::default)
    }

    /// A fingerprint of the last publication relayed, if any.
    fn last(&self) -> Option<(usize, u64)> {
        self.relayed.as_ref().and_then(|r| r.last)
    }
}

/// What a key's relaying remembers, for duplicates and for recoveries.
#[derive(Debug, Default)]
struct Relayed {
    /// The id of the newest publication relayed; publications with an id up to it are
    /// duplicates (a recovery read and the live link can both bring one).
    last_id: Option<StreamId>,
    /// The newest history id when the key's first socket started, before anything was
    /// relayed: where a recovery reads from when nothing was relayed since.
    first_seen: Option<StreamId>,
    /// A fingerprint of the last publication relayed (keys without history).
    last: Option<(usize, u64)>,
    /// The last publication was the stored message a recovery read: the same message
    /// coming next on the link (it was published in between) is not relayed again.
    recovered: bool,
}

/// A subscription change, in the order the broker must apply it.
#[derive(Debug)]
pub enum Change {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
    /// Answered `true` once every change logged before it has been applied; while Redis
    /// is unreachable it waits for the next successful connect.
    Barrier(oneshot::Sender<bool>),
}

/// Key → its workers and relay state.
type Shard = HashMap<Arc<str>, KeyState>;

pub struct Registry {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Each worker's inbox, by worker number; workers attach as they start.
    inboxes: RwLock<Vec<mpsc::Sender<Arc<Publication>>>>,
    /// The change log; `None` for a broker that needs none (the in-memory one).
    changes: Option<mpsc::UnboundedSender<Change>>,
    /// The process's metrics, counted where publications enter the fan-out.
    pub metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(changes: Option<mpsc::UnboundedSender<Change>>, metrics: Arc<Metrics>) -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            inboxes: RwLock::default(),
            changes,
            metrics,
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        // unwrap: no code panics while holding a shard lock.
        self.shards[i].lock().unwrap()
    }

    fn log(&self, change: Change) {
        if let Some(tx) = &self.changes {
            // The broker outlives every socket; if it is gone the process is stopping.
            let _ = tx.send(change);
        }
    }

    /// Gives a starting worker its number and its inbox.
    ///
    /// # Panics
    /// Beyond [`MAX_WORKERS`] workers (the configuration refuses more).
    pub fn attach_worker(&self) -> (usize, mpsc::Receiver<Arc<Publication>>) {
        let (tx, rx) = mpsc::channel(INBOX);
        // unwrap: nothing panics while the inbox list is locked.
        let mut inboxes = self.inboxes.write().unwrap();
        assert!(inboxes.len() < MAX_WORKERS, "at most {MAX_WORKERS} workers");
        inboxes.push(tx);
        (inboxes.len() - 1, rx)
    }

    /// Worker `worker` has its first socket on `key`.
    pub fn add(&self, key: &Arc<str>, worker: usize) {
        let mut shard = self.shard(key);
        let state = shard.entry(key.clone()).or_default();
        if state.workers == 0 {
            self.log(Change::Subscribe(key.clone()));
        }
        state.workers |= 1 << worker;
    }

    /// Worker `worker` has no socket left on `key`.
    pub fn remove(&self, key: &Arc<str>, worker: usize) {
        let mut shard = self.shard(key);
        let Some(state) = shard.get_mut(&**key) else {
            return;
        };
        state.workers &= !(1 << worker);
        if state.workers == 0 {
            shard.remove(&**key);
            self.log(Change::Unsubscribe(key.clone()));
        }
    }

    /// Resolves once the broker has applied every change logged before this call:
    /// `true` means those subscriptions are live in Redis; `false` that the broker is
    /// gone (the process is stopping). Callers bound the wait.
    pub async fn barrier(&self) -> bool {
        let Some(tx) = &self.changes else {
            return true;
        };
        let (done, wait) = oneshot::channel();
        if tx.send(Change::Barrier(done)).is_err() {
            return false;
        }
        wait.await.unwrap_or(false)
    }

    /// Every key with at least one socket, for resubscribing after a reconnect.
    pub fn keys(&self) -> Vec<Arc<str>> {
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            // unwrap: see `shard`.
            keys.extend(shard.lock().unwrap().keys().cloned());
        }
        keys
    }

    /// Where a recovery reads `key`'s history from: the id of the newest publication
    /// relayed on it, or the history's newest id when its first socket started.
    pub fn cursors(&self) -> Vec<(Arc<str>, Option<StreamId>)> {
        let mut cursors = Vec::new();
        for shard in self.shards.iter() {
            // unwrap: see `shard`.
            let shard = shard.lock().unwrap();
            cursors.extend(shard.iter().map(|(k, s)| {
                let cursor = s.relayed.as_ref().and_then(|r| r.last_id.or(r.first_seen));
                (k.clone(), cursor)
            }));
        }
        cursors
    }

    /// A starting socket read `key`: its history's newest id was `newest`, and it got
    /// `stored` as the key's stored message. Before anything is relayed on the key,
    /// they are where a recovery starts from: entries after `newest`, and a stored
    /// message other than `stored`.
    pub fn seen(&self, key: &str, newest: Option<StreamId>, stored: Option<&[u8]>) {
        if newest.is_none() && stored.is_none() {
            return;
        }
        if let Some(state) = self.shard(key).get_mut(key) {
            let relayed = state.relayed();
            if relayed.last_id.is_none() && relayed.first_seen.is_none() {
                relayed.first_seen = newest;
            }
            if relayed.last.is_none() {
                relayed.last = stored.map(fingerprint);
            }
        }
    }

    /// `key`'s history was reset (recreated, trimmed past the last id relayed, or its
    /// ids went back, as after a failover to a Redis whose clock is behind): ids are
    /// compared from `newest` on, not with the ones relayed before.
    pub fn restart_ids(&self, key: &str, newest: Option<StreamId>) {
        if let Some(state) = self.shard(key).get_mut(key) {
            let relayed = state.relayed();
            relayed.last_id = None;
            relayed.first_seen = newest;
        }
    }

    /// Relays `payload`, the stored message of `key` (a key without history) read
    /// after the link came back, unless it is the last publication relayed on the key:
    /// then nothing was missed. The same message arriving next on the link was
    /// published in between and is not relayed again.
    pub async fn dispatch_recovered(&self, key: &str, payload: &[u8]) -> usize {
        let print = fingerprint(payload);
        if self
            .shard(key)
            .get(key)
            .is_none_or(|state| state.last() == Some(print))
        {
            return 0;
        }
        let reached = self.dispatch(key, payload, None, Instant::now()).await;
        if let Some(state) = self.shard(key).get_mut(key) {
            state.relayed().recovered = true;
        }
        reached
    }

    /// Hands `payload`, published on `key`, to every worker with a socket on it;
    /// encodes it only if there is one, and not at all when it is a duplicate (an id
    /// already relayed, or the recovered message again). Waits only when a worker's
    /// inbox is full (the broker then stops reading, and Redis buffers). Returns the
    /// workers reached.
    pub async fn dispatch(
        &self,
        key: &str,
        payload: &[u8],
        id: Option<StreamId>,
        received: Instant,
    ) -> usize {
        let (key, workers) = {
            let mut shard = self.shard(key);
            let Some(state) = shard.get_mut(key) else {
                return 0;
            };
            let workers = state.workers;
            let relayed = state.relayed();
            if let Some(id) = id {
                if relayed.last_id.is_some_and(|last| id <= last) {
                    return 0;
                }
                relayed.last_id = Some(id);
            }
            let print = fingerprint(payload);
            if std::mem::take(&mut relayed.recovered) && relayed.last == Some(print) {
                return 0;
            }
            relayed.last = Some(print);
            // unwrap: the key was just found.
            (shard.get_key_value(key).unwrap().0.clone(), workers)
        };
        let publication = Publication::new(key, payload, id, received);
        self.hand_over(publication, workers).await
    }

    /// Hands a control message of the envelope to every worker with a socket on `key`.
    pub async fn dispatch_control(&self, key: &str, text: &str) -> usize {
        let (key, workers) = {
            let shard = self.shard(key);
            match shard.get_key_value(key) {
                Some((key, state)) => (key.clone(), state.workers),
                None => return 0,
            }
        };
        let publication = Publication::control(key, text, Instant::now());
        self.hand_over(publication, workers).await
    }

    async fn hand_over(&self, publication: Publication, workers: u64) -> usize {
        let publication = Arc::new(publication);
        let mut waiting = Vec::new();
        {
            // unwrap: see `attach_worker`.
            let inboxes = self.inboxes.read().unwrap();
            for (i, inbox) in inboxes.iter().enumerate() {
                if workers & (1 << i) == 0 {
                    continue;
                }
                if let Err(mpsc::error::TrySendError::Full(p)) = inbox.try_send(publication.clone())
                {
                    waiting.push((inbox.clone(), p));
                }
            }
        }
        for (inbox, p) in waiting {
            // A closed inbox belongs to a worker that stopped; nothing to deliver.
            let _ = inbox.send(p).await;
        }
        workers.count_ones() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn transitions_are_logged_once_per_key() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reg = Registry::new(Some(tx), Arc::default());
        let (k1, k2) = (key("broadcast:x"), key("user:u:x"));
        reg.add(&k1, 0);
        reg.add(&k2, 0);
        reg.add(&k1, 1);
        reg.remove(&k2, 0);
        reg.remove(&k1, 0);
        assert_eq!(reg.keys(), std::slice::from_ref(&k1));
        reg.remove(&k1, 1);
        let mut log = Vec::new();
        while let Ok(c) = rx.try_recv() {
            log.push(format!("{c:?}"));
        }
        assert_eq!(
            log,
            [
                r#"Subscribe("broadcast:x")"#,
                r#"Subscribe("user:u:x")"#,
                r#"Unsubscribe("user:u:x")"#,
                r#"Unsubscribe("broadcast:x")"#,
            ]
        );
        assert!(reg.keys().is_empty());
    }

    #[tokio::test]
    async fn dispatch_reaches_only_workers_of_the_key() {
        let reg = Registry::new(None, Arc::default());
        let (w0, mut rx0) = reg.attach_worker();
        let (w1, mut rx1) = reg.attach_worker();
        reg.add(&key("k1"), w0);
        reg.add(&key("k2"), w1);
        assert_eq!(reg.dispatch("k1", b"m", None, Instant::now()).await, 1);
        assert_eq!(reg.dispatch("nobody", b"m", None, Instant::now()).await, 0);
        let p = rx0.try_recv().unwrap();
        assert_eq!((&*p.key, p.payload()), ("k1", &b"m"[..]));
        assert_eq!(&p.frame[..], [0x81, 1, b'm']);
        assert!(rx1.try_recv().is_err());
    }

    #[tokio::test]
    async fn ids_already_relayed_and_the_recovered_message_are_not_relayed_twice() {
        let reg = Registry::new(None, Arc::default());
        let (w0, mut rx) = reg.attach_worker();
        reg.add(&key("k"), w0);
        let id = |ms| Some(StreamId { ms, seq: 0 });
        let now = Instant::now();
        assert_eq!(reg.dispatch("k", b"a", id(2), now).await, 1);
        assert_eq!(reg.dispatch("k", b"a", id(2), now).await, 0, "same id");
        assert_eq!(reg.dispatch("k", b"z", id(1), now).await, 0, "older id");
        assert_eq!(reg.dispatch("k", b"plain", None, now).await, 1);
        assert_eq!(reg.cursors(), [(key("k"), id(2))]);
        // After a lost link: the stored message equal to the last relayed is not new;
        // another one is, and its copy coming next on the link is dropped once.
        assert_eq!(reg.dispatch_recovered("k", b"plain").await, 0);
        assert_eq!(reg.dispatch_recovered("k", b"new").await, 1);
        assert_eq!(reg.dispatch("k", b"new", None, now).await, 0);
        assert_eq!(reg.dispatch("k", b"new", None, now).await, 1);
        // A history reset (ids went back): ids count from the stream's newest on.
        reg.restart_ids("k", id(1));
        assert_eq!(reg.cursors(), [(key("k"), id(1))]);
        assert_eq!(
            reg.dispatch("k", b"after", id(1).map(|i| StreamId { seq: 1, ..i }), now)
                .await,
            1
        );
        let mut got = Vec::new();
        while let Ok(p) = rx.try_recv() {
            got.push(p.payload().to_vec());
        }
        assert_eq!(got, [&b"a"[..], b"plain", b"new", b"new", b"after"]);
    }

    #[test]
    fn payloads_are_typed_by_utf8_validity() {
        let text = Publication::new(key("k"), b"hi", None, Instant::now());
        assert_eq!(text.frame[0], 0x81);
        let binary = Publication::new(key("k"), &[0xFF, 0], None, Instant::now());
        assert_eq!(binary.frame[0], 0x82);
        assert_eq!(binary.payload(), [0xFF, 0]);
    }
}
