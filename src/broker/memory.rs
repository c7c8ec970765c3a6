//! The embedded broker: publications are dispatched in-process, last messages are kept
//! in a map with their expiry. It serves one process; use Redis for more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Inlet;

/// Expired entries are swept when the map has grown by this many inserts.
const SWEEP_EVERY: usize = 1024;

#[derive(Default)]
struct Store {
    values: HashMap<Arc<str>, (Bytes, Instant)>,
    inserts: usize,
}

pub struct MemoryBroker {
    inlet: Arc<Inlet>,
    store: Mutex<Store>,
}

impl MemoryBroker {
    pub fn new(inlet: Arc<Inlet>) -> Self {
        MemoryBroker {
            inlet,
            store: Mutex::default(),
        }
    }

    pub async fn publish(&self, keys: &[Arc<str>], payload: &Bytes, expire: u64) {
        if expire > 0 {
            let until = Instant::now() + Duration::from_secs(expire);
            let mut store = self.lock();
            for key in keys {
                store.values.insert(key.clone(), (payload.clone(), until));
            }
            store.inserts += keys.len();
            if store.inserts >= SWEEP_EVERY {
                let now = Instant::now();
                store.values.retain(|_, (_, until)| *until > now);
                store.inserts = 0;
            }
        }
        for key in keys {
            self.inlet.deliver(key, payload).await;
        }
    }

    pub fn fetch(&self, keys: &[Arc<str>]) -> Vec<Option<Bytes>> {
        let now = Instant::now();
        let store = self.lock();
        keys.iter()
            .map(|k| match store.values.get(k) {
                Some((value, until)) if *until > now => Some(value.clone()),
                _ => None,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // unwrap: nothing panics while the store is locked.
        self.store.lock().unwrap()
    }
}
