//! Named event counters (refusals by reason, identity warnings), shown by `/health`.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A set of counters keyed by a static name such as `refused.origin`.
#[derive(Debug, Default)]
pub struct Counters(Mutex<BTreeMap<&'static str, u64>>);

impl Counters {
    pub fn incr(&self, name: &'static str) {
        // unwrap: nothing panics while the map is locked.
        *self.0.lock().unwrap().entry(name).or_default() += 1;
    }

    pub fn get(&self, name: &str) -> u64 {
        // unwrap: see `incr`.
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    pub fn to_json(&self) -> serde_json::Value {
        // unwrap: see `incr`.
        let map = self.0.lock().unwrap();
        map.iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}
