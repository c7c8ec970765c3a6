//! A bounded map whose entries expire, for the answers the gateway reuses: the web
//! application's (identity and authorization callbacks) and Django's database's. Their
//! keys come from what clients send (cookies), so a flood of made-up keys must neither
//! grow the map nor make every insert scan it: when full, expired entries are swept at
//! most once per TTL, and a new entry that still does not fit is not kept.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bounded map whose entries expire; a TTL of zero caches nothing. When full, expired
/// entries are swept (at most once per TTL); a new entry that still does not fit is not
/// kept.
pub struct TtlCache<K, V> {
    ttl: Duration,
    size: usize,
    entries: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    map: HashMap<K, (Instant, V)>,
    swept: Instant,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration, size: usize) -> Self {
        TtlCache {
            ttl,
            size,
            entries: Mutex::new(Entries {
                map: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        // unwrap: nothing panics while the map is locked.
        let entries = self.entries.lock().unwrap();
        let (at, value) = entries.map.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    pub fn put(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        // unwrap: see `get`.
        let Entries { map, swept } = &mut *self.entries.lock().unwrap();
        if map.len() >= self.size && swept.elapsed() >= self.ttl {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            *swept = Instant::now();
        }
        if map.len() < self.size {
            map.insert(key, (Instant::now(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_expires_and_stays_bounded() {
        let cache = TtlCache::new(Duration::from_secs(60), 2);
        cache.put("a", 1);
        cache.put("b", 2);
        // Full of live entries: the new one is not kept.
        cache.put("c", 3);
        assert_eq!((cache.get(&"a"), cache.get(&"c")), (Some(1), None));
        let off = TtlCache::new(Duration::ZERO, 2);
        off.put("a", 1);
        assert_eq!(off.get(&"a"), None);
    }
}
