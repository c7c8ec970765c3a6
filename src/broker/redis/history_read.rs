//! Reading keys' stored messages and histories from Redis, for a starting socket and
//! for a recovery: one round trip for many keys, a `GET` for a key without history and
//! the history script for one with.

use std::sync::Arc;

use bytes::Bytes;

use super::commands::Commands;
use super::unavailable;
use crate::broker::BrokerError;
use crate::facility::History;
use crate::history::{self, CatchUp, Retention, StreamId};

/// Reads one key's stored message and history, in one step. KEYS: the stream, the
/// key. ARGV: the id to read after (empty: only the newest entry), the most entries to
/// read (`history` + 1: more means the stream holds more than a replay may send), and
/// the most payload bytes to send. Answers `{stored, 0}` when the stream does not
/// exist, else `{stored, 1, max-deleted-entry-id, last-generated-id, first entry's id,
/// entries, too_much}`: the entries after the id, or only the newest one when they
/// are not all there ([`history::Stream::gap_after`], decided here the same way, so
/// that nothing is sent only to be thrown away) or when they are too much (`too_much`
/// is then 1).
const READ_HISTORY: &str = r"
local stored = redis.call('GET', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {stored, 0}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local deleted, generated, first = '0-0', '0-0', ''
for i = 1, #info, 2 do
  local field, value = info[i], info[i + 1]
  if field == 'max-deleted-entry-id' then
    deleted = value
  elseif field == 'last-generated-id' then
    generated = value
  elseif field == 'first-entry' and value then
    first = value[1]
  end
end
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local newest = function()
  return redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
end
local after = ARGV[1]
if after == '' or before(after, deleted) or before(generated, after)
    or (deleted == '0-0' and after ~= '0-0' and first ~= '' and before(after, first)) then
  return {stored, 1, deleted, generated, first, newest(), 0}
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. after, '+', 'COUNT', ARGV[2])
local bytes = 0
for _, e in ipairs(entries) do
  bytes = bytes + string.len(e[2][2])
end
if #entries >= tonumber(ARGV[2]) or bytes > tonumber(ARGV[3]) then
  return {stored, 1, deleted, generated, first, newest(), 1}
end
return {stored, 1, deleted, generated, first, entries, 0}
";

/// What each key gives (see [`crate::broker::Broker::catch_up`]), in one round trip
/// (one per key in a cluster): `GET` for a key without history,
/// [`READ_HISTORY`] for one with.
pub async fn catch_up(
    commands: &Commands,
    retention: &Retention,
    keys: &[Arc<str>],
    after: &[Option<StreamId>],
    budget: usize,
) -> Result<Vec<CatchUp>, BrokerError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let after = |i: usize| after.get(i).copied().flatten();
    let bounds: Vec<Option<History>> = keys.iter().map(|k| retention.of(k)).collect();
    let build = |members: &[usize]| {
        let mut pipe = redis::pipe();
        for &i in members {
            let key = &keys[i];
            match bounds[i] {
                Some(bounds) => {
                    let from = after(i).map_or_else(String::new, |id| id.to_string());
                    pipe.cmd("EVAL")
                        .arg(READ_HISTORY)
                        .arg(2)
                        .arg(retention.keys().history(key))
                        .arg(&**key)
                        .arg(from)
                        .arg(bounds.len + 1)
                        .arg(budget);
                }
                None => {
                    pipe.get(&**key);
                }
            }
        }
        pipe
    };
    let replies = commands
        .batch(keys.len(), build, |_, values| Ok(values))
        .await
        .map_err(unavailable)?;
    replies
        .into_iter()
        .enumerate()
        .map(|(i, reply)| match bounds[i] {
            Some(_) => history_reply(reply, after(i)),
            None => Ok(CatchUp::Stored {
                stored: bytes(reply).map(|v| (v, None)),
                newest: None,
            }),
        })
        .collect()
}

fn bad_reply(what: &str) -> BrokerError {
    BrokerError::Unavailable(format!("unexpected reply from redis: expected {what}"))
}

fn bytes(value: redis::Value) -> Option<Bytes> {
    match value {
        redis::Value::BulkString(v) => Some(Bytes::from(v)),
        _ => None,
    }
}

fn id(value: &redis::Value) -> Option<StreamId> {
    match value {
        redis::Value::BulkString(v) => std::str::from_utf8(v).ok()?.parse().ok(),
        redis::Value::SimpleString(v) => v.parse().ok(),
        _ => None,
    }
}

/// Decodes [`READ_HISTORY`]'s answer.
fn history_reply(reply: redis::Value, after: Option<StreamId>) -> Result<CatchUp, BrokerError> {
    let redis::Value::Array(mut parts) = reply else {
        return Err(bad_reply("an array from the history script"));
    };
    if parts.len() < 2 {
        return Err(bad_reply(
            "the stored message and whether the stream exists",
        ));
    }
    let stored = bytes(std::mem::take(&mut parts[0]));
    if parts.len() < 7 {
        return Ok(history::decide(after, stored, None, false));
    }
    let info = history::Stream {
        max_deleted: id(&parts[2]).unwrap_or_default(),
        last_generated: id(&parts[3]).unwrap_or_default(),
        first: id(&parts[4]),
    };
    let redis::Value::Array(raw) = std::mem::take(&mut parts[5]) else {
        return Err(bad_reply("stream entries"));
    };
    let mut entries = Vec::with_capacity(raw.len());
    for entry in raw {
        let redis::Value::Array(mut entry) = entry else {
            return Err(bad_reply("a stream entry"));
        };
        let (Some(entry_id), Some(redis::Value::Array(fields))) = (
            entry.first().and_then(id),
            entry.get_mut(1).map(std::mem::take),
        ) else {
            return Err(bad_reply("a stream entry's id and fields"));
        };
        // The entry's one field, `d`, holds the payload.
        let payload = fields
            .into_iter()
            .nth(1)
            .and_then(bytes)
            .unwrap_or_default();
        entries.push((entry_id, payload));
    }
    let too_much = matches!(parts[6], redis::Value::Int(1));
    Ok(history::decide(
        after,
        stored,
        Some((info, entries)),
        too_much,
    ))
}
