//! The embedded broker: publications are dispatched in-process, last messages are kept
//! in a map with their expiry, and keys with history keep a ring of their newest
//! entries with ids, as a Redis stream would. It serves one process; use Redis for more.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::Inlet;
use crate::facility::History;
use crate::history::{self, CatchUp, Retention, StreamId};

/// Expired entries are swept when the map has grown by this many inserts.
const SWEEP_EVERY: usize = 1024;

/// One key's history: what a Redis stream keeps, trimmed the same way.
struct Ring {
    entries: VecDeque<(StreamId, Bytes)>,
    /// The newest id ever trimmed.
    max_deleted: StreamId,
    last_generated: StreamId,
    /// Renewed by every append, as the stream's `EXPIRE`.
    until: Instant,
}

impl Ring {
    fn new() -> Self {
        Ring {
            entries: VecDeque::new(),
            max_deleted: StreamId::ZERO,
            last_generated: StreamId::ZERO,
            until: Instant::now(),
        }
    }

    /// Appends `payload` with the next id: the wall clock's milliseconds, or the last
    /// id's with the next sequence number when the clock has not moved on.
    fn append(&mut self, payload: Bytes, bounds: History) -> StreamId {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_generated;
        let id = if ms > last.ms {
            StreamId { ms, seq: 0 }
        } else {
            StreamId {
                ms: last.ms,
                seq: last.seq + 1,
            }
        };
        self.last_generated = id;
        self.entries.push_back((id, payload));
        let oldest_ms = ms.saturating_sub(bounds.ttl.saturating_mul(1000));
        while self.entries.len() > bounds.len
            || self
                .entries
                .front()
                .is_some_and(|(id, _)| id.ms < oldest_ms)
        {
            // unwrap: the loop runs only while there is a first entry.
            let (gone, _) = self.entries.pop_front().unwrap();
            self.max_deleted = self.max_deleted.max(gone);
        }
        self.until = Instant::now() + Duration::from_secs(bounds.ttl);
        id
    }

    /// What [`history::decide`] needs: the description, and the entries after `after`,
    /// unless they are not all there or their payloads pass `budget` bytes (then the
    /// newest entry, and whether it was the budget).
    fn read(
        &self,
        after: Option<StreamId>,
        budget: usize,
    ) -> (history::Stream, Vec<(StreamId, Bytes)>, bool) {
        let info = history::Stream {
            max_deleted: self.max_deleted,
            first: self.entries.front().map(|(id, _)| *id),
            last_generated: self.last_generated,
        };
        let newest = || self.entries.back().cloned().into_iter().collect();
        let Some(after) = after.filter(|&a| info.gap_after(a).is_none()) else {
            return (info, newest(), false);
        };
        let entries: Vec<(StreamId, Bytes)> = self
            .entries
            .iter()
            .filter(|(id, _)| *id > after)
            .cloned()
            .collect();
        if entries.iter().map(|(_, p)| p.len()).sum::<usize>() > budget {
            return (info, newest(), true);
        }
        (info, entries, false)
    }
}

#[derive(Default)]
struct Store {
    values: HashMap<Arc<str>, (Bytes, Instant)>,
    rings: HashMap<Arc<str>, Ring>,
    inserts: usize,
}

impl Store {
    fn sweep(&mut self) {
        let now = Instant::now();
        self.values.retain(|_, (_, until)| *until > now);
        self.rings.retain(|_, ring| ring.until > now);
        self.inserts = 0;
    }

    fn value(&self, key: &str, now: Instant) -> Option<Bytes> {
        match self.values.get(key) {
            Some((value, until)) if *until > now => Some(value.clone()),
            _ => None,
        }
    }

    fn ring(&self, key: &str, now: Instant) -> Option<&Ring> {
        self.rings.get(key).filter(|ring| ring.until > now)
    }
}

pub struct MemoryBroker {
    inlet: Arc<Inlet>,
    retention: Retention,
    store: Mutex<Store>,
    /// Held from a publication's append to its hand-over, so that publications reach
    /// the registry in the order of their ids (it drops an id older than the last).
    order: tokio::sync::Mutex<()>,
}

impl MemoryBroker {
    pub fn new(inlet: Arc<Inlet>, retention: Retention) -> Self {
        MemoryBroker {
            inlet,
            retention,
            store: Mutex::default(),
            order: tokio::sync::Mutex::new(()),
        }
    }

    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    pub async fn publish(
        &self,
        keys: &[Arc<str>],
        payload: &Bytes,
        expire: u64,
    ) -> Vec<Option<StreamId>> {
        let _in_order = self.order.lock().await;
        let ids: Vec<Option<StreamId>> = {
            let mut store = self.lock();
            let now = Instant::now();
            let ids = keys
                .iter()
                .map(|key| {
                    let bounds = self.retention.of(key)?;
                    let ring = store.rings.entry(key.clone()).or_insert_with(Ring::new);
                    if ring.until <= now {
                        *ring = Ring::new();
                    }
                    Some(ring.append(payload.clone(), bounds))
                })
                .collect();
            if expire > 0 {
                let until = now + Duration::from_secs(expire);
                for key in keys {
                    store.values.insert(key.clone(), (payload.clone(), until));
                }
            }
            store.inserts += keys.len();
            if store.inserts >= SWEEP_EVERY {
                store.sweep();
            }
            ids
        };
        for (key, id) in keys.iter().zip(&ids) {
            self.inlet.deliver(key, payload, *id).await;
        }
        ids
    }

    pub fn fetch(&self, keys: &[Arc<str>]) -> Vec<Option<Bytes>> {
        let now = Instant::now();
        let store = self.lock();
        keys.iter().map(|k| store.value(k, now)).collect()
    }

    pub fn catch_up(
        &self,
        keys: &[Arc<str>],
        after: &[Option<StreamId>],
        budget: usize,
    ) -> Vec<CatchUp> {
        let now = Instant::now();
        let store = self.lock();
        keys.iter()
            .enumerate()
            .map(|(i, key)| {
                let stored = store.value(key, now);
                let after = after.get(i).copied().flatten();
                if self.retention.of(key).is_none() {
                    return CatchUp::Stored {
                        stored: stored.map(|v| (v, None)),
                        newest: None,
                    };
                }
                match store.ring(key, now).map(|ring| ring.read(after, budget)) {
                    Some((info, entries, too_much)) => {
                        history::decide(after, stored, Some((info, entries)), too_much)
                    }
                    None => history::decide(after, stored, None, false),
                }
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // unwrap: nothing panics while the store is locked.
        self.store.lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_publications_reach_the_registry_in_id_order() {
        use crate::facility::{Facilities, FacilityRule};
        let registry = Arc::new(crate::registry::Registry::new(None, Arc::default()));
        let (worker, mut inbox) = registry.attach_worker();
        let key: Arc<str> = Arc::from("broadcast:feed/x");
        registry.add(&key, worker);
        let rules = vec![FacilityRule {
            pattern: "feed/*".into(),
            history: 10,
            history_ttl: 60,
            slow_consumer: Default::default(),
        }];
        let retention = Retention::new(Arc::new(Facilities::new(rules)), Default::default());
        let inlet = Arc::new(Inlet::new(registry.clone(), None, 1 << 20));
        let broker = Arc::new(MemoryBroker::new(inlet, retention));
        let (tasks, each) = (4, 500);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            while got < tasks * each {
                if inbox.recv().await.is_none() {
                    break;
                }
                got += 1;
            }
            got
        });
        let publishers: Vec<_> = (0..tasks)
            .map(|t| {
                let (broker, key) = (broker.clone(), key.clone());
                tokio::spawn(async move {
                    for i in 0..each {
                        let payload = Bytes::from(format!("{t}-{i}"));
                        broker
                            .publish(std::slice::from_ref(&key), &payload, 0)
                            .await;
                    }
                })
            })
            .collect();
        for p in publishers {
            p.await.unwrap();
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("every publication relayed")
            .unwrap();
        assert_eq!(got, tasks * each, "none dropped as out of order");
    }

    #[test]
    fn a_ring_keeps_its_bounds_and_remembers_what_it_trimmed() {
        let mut ring = Ring::new();
        let bounds = History { len: 2, ttl: 60 };
        let a = ring.append(Bytes::from_static(b"a"), bounds);
        let b = ring.append(Bytes::from_static(b"b"), bounds);
        let c = ring.append(Bytes::from_static(b"c"), bounds);
        assert!(a < b && b < c);
        let (info, entries, too_much) = ring.read(Some(a), usize::MAX);
        assert_eq!(info.max_deleted, a);
        assert_eq!(info.gap_after(a), None);
        assert!(!too_much);
        assert_eq!(
            entries.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [b, c]
        );
        let newest = vec![(c, Bytes::from_static(b"c"))];
        assert_eq!(ring.read(None, usize::MAX).1, newest);
        // Not all there, or over the budget: only the newest entry.
        let (info, entries, _) = ring.read(Some(StreamId::ZERO), usize::MAX);
        assert_eq!(info.gap_after(StreamId::ZERO), Some("history too short"));
        assert_eq!(entries, newest);
        assert_eq!(ring.read(Some(a), 1), (info, newest, true));
    }
}
