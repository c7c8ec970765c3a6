//! Which local sockets listen to which key, and the ordered log of subscription changes.
//!
//! The registry is the source of truth for this process's Redis subscriptions: a key is
//! subscribed while at least one local socket listens to it. [`Registry::register`] and
//! [`Registry::unregister`] record the 0→1 and 1→0 transitions in a change log that the
//! Redis broker consumes in order, so Redis sees one SUBSCRIBE when the first socket
//! arrives and one UNSUBSCRIBE after the last one leaves, whatever the number of sockets.
//! Changes are sent while the shard lock is held, so two racing transitions of one key
//! reach the broker in the order they happened.
//!
//! The map is split into shards by key hash so that connects, disconnects and fan-out on
//! different keys do not contend on one lock. No lock is ever held across an `.await`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::outbox::{Frame, Outbox, Pushed};

const SHARDS: usize = 16;

/// A subscription change, in the order the broker must apply it.
#[derive(Debug)]
pub enum Change {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
    /// Answered `true` once every change logged before it has been applied; while Redis
    /// is unreachable it waits for the next successful connect.
    Barrier(oneshot::Sender<bool>),
}

type Shard = HashMap<Arc<str>, Vec<Arc<Outbox>>>;

pub struct Registry {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
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

    /// Adds `outbox` as a listener of every key in `keys`.
    pub fn register(&self, keys: &[Arc<str>], outbox: &Arc<Outbox>) {
        for key in keys {
            let mut shard = self.shard(key);
            let listeners = shard.entry(key.clone()).or_default();
            listeners.push(outbox.clone());
            if listeners.len() == 1 {
                self.log(Change::Subscribe(key.clone()));
            }
        }
    }

    /// Removes `outbox` from every key in `keys`.
    pub fn unregister(&self, keys: &[Arc<str>], outbox: &Arc<Outbox>) {
        for key in keys {
            let mut shard = self.shard(key);
            let Some(listeners) = shard.get_mut(&**key) else {
                continue;
            };
            if let Some(i) = listeners.iter().position(|o| Arc::ptr_eq(o, outbox)) {
                listeners.swap_remove(i);
            }
            if listeners.is_empty() {
                shard.remove(&**key);
                self.log(Change::Unsubscribe(key.clone()));
            }
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

    /// Every key with at least one listener, for resubscribing after a reconnect.
    pub fn keys(&self) -> Vec<Arc<str>> {
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            // unwrap: see `shard`.
            keys.extend(shard.lock().unwrap().keys().cloned());
        }
        keys
    }

    /// Hands `frame` to every listener of `key`. Never waits: a listener whose outbox is
    /// full is marked as a slow consumer and closes itself. Returns the number queued.
    pub fn dispatch(&self, key: &str, frame: &Frame, received: Instant) -> usize {
        let shard = self.shard(key);
        let Some(listeners) = shard.get(key) else {
            return 0;
        };
        let mut queued = 0;
        for outbox in listeners {
            match outbox.push(frame, received) {
                Pushed::Queued => queued += 1,
                // The connection sees the overflow and closes itself.
                Pushed::Overflowed | Pushed::Refused => {}
            }
        }
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn transitions_are_logged_once_per_key() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reg = Registry::new(Some(tx), Arc::default());
        let (a, b) = (Arc::new(Outbox::new(100)), Arc::new(Outbox::new(100)));
        let keys = [key("broadcast:x"), key("user:u:x")];
        reg.register(&keys, &a);
        reg.register(&keys[..1], &b);
        reg.unregister(&keys, &a);
        reg.unregister(&keys[..1], &b);
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

    #[test]
    fn dispatch_reaches_only_listeners_of_the_key() {
        let reg = Registry::new(None, Arc::default());
        let (a, b) = (Arc::new(Outbox::new(100)), Arc::new(Outbox::new(100)));
        reg.register(&[key("k1")], &a);
        reg.register(&[key("k2")], &b);
        assert_eq!(
            reg.dispatch("k1", &Frame::Text("m".into()), Instant::now()),
            1
        );
        assert_eq!(
            reg.dispatch("nobody", &Frame::Text("m".into()), Instant::now()),
            0
        );
        let mut batch = VecDeque::new();
        a.take_into(&mut batch);
        assert_eq!(batch.len(), 1);
        b.take_into(&mut batch);
        assert!(batch.is_empty());
    }

    #[test]
    fn a_full_outbox_does_not_hold_back_the_others() {
        let reg = Registry::new(None, Arc::default());
        let (slow, fine) = (Arc::new(Outbox::new(3)), Arc::new(Outbox::new(100)));
        reg.register(&[key("k")], &slow);
        reg.register(&[key("k")], &fine);
        let frame = Frame::Text("ab".into());
        assert_eq!(reg.dispatch("k", &frame, Instant::now()), 2);
        assert_eq!(reg.dispatch("k", &frame, Instant::now()), 1);
        assert!(slow.overflowed() && !fine.overflowed());
    }
}
