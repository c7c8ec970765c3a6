//! Redis Cluster's key slots, computed here: the sharded subscriber places each key's
//! subscription on the master that owns its slot, and the command side groups a
//! batch of keys by slot (a transaction or a pipeline cannot span slots).

use std::collections::BTreeMap;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first `{`
/// and the next `}`, when not empty) or else of the whole key, modulo [`SLOTS`].
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Which master owns each slot, from `CLUSTER SLOTS`. Invariant: ranges do not overlap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// First slot of each range → (last slot, the master's `host:port`).
    ranges: BTreeMap<u16, (u16, String)>,
}

impl SlotMap {
    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …], replicas…], …]`.
    pub fn from_reply(reply: &redis::Value) -> Option<SlotMap> {
        let redis::Value::Array(entries) = reply else {
            return None;
        };
        let mut ranges = BTreeMap::new();
        for entry in entries {
            let redis::Value::Array(parts) = entry else {
                return None;
            };
            let (Some(start), Some(end), Some(redis::Value::Array(master))) =
                (int(parts.first()), int(parts.get(1)), parts.get(2))
            else {
                return None;
            };
            let host = text(master.first()?)?;
            let port = int(master.get(1))?;
            ranges.insert(start as u16, (end as u16, format!("{host}:{port}")));
        }
        Some(SlotMap { ranges })
    }

    /// The master owning `slot`, if any does.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        let (_, (end, node)) = self.ranges.range(..=slot).next_back()?;
        (slot <= *end).then_some(node.as_str())
    }

    /// Every master in the map.
    pub fn masters(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.ranges.values().map(|(_, n)| n.clone()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

fn int(value: Option<&redis::Value>) -> Option<i64> {
    match value? {
        redis::Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn text(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from Redis's own CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn the_map_answers_owners_and_gaps() {
        use redis::Value::{Array, BulkString, Int};
        let node = |port| Array(vec![BulkString(b"127.0.0.1".to_vec()), Int(port)]);
        let reply = Array(vec![
            Array(vec![Int(0), Int(5460), node(7000)]),
            Array(vec![Int(5461), Int(10922), node(7001)]),
            Array(vec![Int(12000), Int(16383), node(7002)]),
        ]);
        let map = SlotMap::from_reply(&reply).unwrap();
        assert_eq!(map.owner(0), Some("127.0.0.1:7000"));
        assert_eq!(map.owner(5461), Some("127.0.0.1:7001"));
        assert_eq!(map.owner(11000), None);
        assert_eq!(map.owner(16383), Some("127.0.0.1:7002"));
        assert_eq!(map.masters().len(), 3);
    }
}
