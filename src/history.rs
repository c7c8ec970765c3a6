//! Message ids, per-key history, and the envelope that carries them to clients that
//! ask for it.
//!
//! On a facility with history (`[[facility]] history = N`), every publication made
//! through wsrelay is appended to the key's stream (a Redis stream, or the embedded
//! broker's ring) and gets the stream's id, `<milliseconds>-<sequence>`, increasing
//! per key. Ids let a client resume after a reconnect and let the gateway heal after
//! losing its pub/sub link: both read the stream after the last id they have.
//!
//! A stream answers "what came after id X" completely only when no entry after X was
//! trimmed and the stream is the one X came from; otherwise the answer is a
//! [`CatchUp::Reset`], never a silent gap ([`Stream::after`] decides).
//!
//! Plain ws4redis clients keep receiving raw payloads. A client that offers the
//! [`SUBPROTOCOL`] receives every message in a JSON [`envelope`] with its key label and
//! id, and the control messages `resumed`, `reset` and `gap`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use crate::channel::KeySpace;
use crate::facility::{Facilities, History};

/// The WebSocket subprotocol of the envelope; its version is part of the name.
pub const SUBPROTOCOL: &str = "wsrelay.v1";

/// A stream entry id: milliseconds and a sequence number, ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An id that is not `<digits>-<digits>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a message id (expected <milliseconds>-<sequence>, like 1700000000000-0)")]
pub struct BadId;

impl FromStr for StreamId {
    type Err = BadId;

    fn from_str(s: &str) -> Result<Self, BadId> {
        let (ms, seq) = s.split_once('-').ok_or(BadId)?;
        let digits = |p: &str| {
            if p.is_empty() || p.len() > 20 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadId);
            }
            p.parse::<u64>().map_err(|_| BadId)
        };
        Ok(StreamId {
            ms: digits(ms)?,
            seq: digits(seq)?,
        })
    }
}

/// What one key gives a socket that starts (or a link that comes back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// No id to resume from: the key's stored last message, with its id when the
    /// stream's newest entry is that message, and the id of that newest entry (where
    /// the gateway resumes the key from if its link to the broker is lost).
    Stored {
        stored: Option<(Bytes, Option<StreamId>)>,
        newest: Option<StreamId>,
    },
    /// Every entry after the id, oldest first (possibly none), and the stream's
    /// newest id.
    Resumed {
        entries: Vec<(StreamId, Bytes)>,
        newest: StreamId,
    },
    /// The entries after the id are not all there; the stored message follows.
    Reset {
        reason: &'static str,
        stored: Option<(Bytes, Option<StreamId>)>,
        newest: Option<StreamId>,
    },
}

impl CatchUp {
    /// The newest id this catch-up hands out, if any: later publications with an
    /// id up to it are duplicates for the socket that got it.
    pub fn last_id(&self) -> Option<StreamId> {
        match self {
            CatchUp::Resumed { entries, .. } => entries.last().map(|(id, _)| *id),
            CatchUp::Stored {
                stored: Some((_, id)),
                ..
            }
            | CatchUp::Reset {
                stored: Some((_, id)),
                ..
            } => *id,
            _ => None,
        }
    }

    /// The newest id the socket that got this catch-up has: what it was handed, or on
    /// a resume, everything up to the stream's newest entry (a resume that found
    /// nothing new included: a live publication still on its way with an older id is
    /// not the client's news).
    pub fn floor(&self) -> Option<StreamId> {
        match self {
            CatchUp::Resumed { newest, .. } => Some(*newest),
            _ => self.last_id(),
        }
    }

    /// The newest id the key's history had when it was read.
    pub fn newest(&self) -> Option<StreamId> {
        match self {
            CatchUp::Stored { newest, .. } | CatchUp::Reset { newest, .. } => *newest,
            CatchUp::Resumed { newest, .. } => Some(*newest),
        }
    }
}

/// Why a replay that is complete is not sent: it is larger than a socket may have
/// waiting (`queue_bytes`), or the stream holds more than `history` entries after the id.
pub const TOO_MUCH: &str = "too much to replay (queue_bytes)";

/// Decides what one key gives: `after` is the id to resume from, `stored` the key's
/// stored last message, and `stream` what the history holds, if it exists: its
/// description and the entries after `after`, or, without `after`, when they are not
/// all there, or when they are `too_much` to send, its newest entry.
pub fn decide(
    after: Option<StreamId>,
    stored: Option<Bytes>,
    stream: Option<(Stream, Vec<(StreamId, Bytes)>)>,
    too_much: bool,
) -> CatchUp {
    // The stored message has an id when it is the stream's newest entry.
    let with_id = |stored: Option<Bytes>, entries: &[(StreamId, Bytes)]| {
        stored.map(|v| {
            let id = entries.last().filter(|(_, p)| *p == v).map(|(id, _)| *id);
            (v, id)
        })
    };
    match (after, stream) {
        (None, stream) => {
            let entries = stream.as_ref().map_or(&[][..], |(_, e)| &e[..]);
            CatchUp::Stored {
                stored: with_id(stored, entries),
                newest: stream.as_ref().map(|(info, _)| info.last_generated),
            }
        }
        (Some(_), None) => CatchUp::Reset {
            reason: "history expired",
            stored: with_id(stored, &[]),
            newest: None,
        },
        (Some(after), Some((info, entries))) => {
            match info.gap_after(after).or(too_much.then_some(TOO_MUCH)) {
                Some(reason) => CatchUp::Reset {
                    reason,
                    stored: with_id(stored, &entries),
                    newest: Some(info.last_generated),
                },
                None => CatchUp::Resumed {
                    entries,
                    newest: info.last_generated,
                },
            }
        }
    }
}

/// What a stream tells about itself, enough to decide whether a resume is complete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stream {
    /// The newest id of any entry ever deleted by trimming (`0-0`: none).
    pub max_deleted: StreamId,
    /// The oldest entry still there, if any.
    pub first: Option<StreamId>,
    /// The id the stream last generated.
    pub last_generated: StreamId,
}

impl Stream {
    /// Why the entries after `after` cannot all be read, if they cannot: an entry after
    /// it was trimmed, or `after` is not from this stream (it predates the stream's
    /// first entry while nothing was ever trimmed, so the stream was recreated, or it
    /// is newer than anything the stream made). `0-0` means "from the start": complete
    /// when nothing was ever trimmed. (The history script decides the same in Lua, so
    /// that no entries are sent only to be thrown away.)
    pub fn gap_after(&self, after: StreamId) -> Option<&'static str> {
        if after < self.max_deleted {
            return Some("history too short");
        }
        if after > self.last_generated {
            return Some("unknown id");
        }
        match self.first {
            Some(first)
                if self.max_deleted == StreamId::ZERO
                    && after != StreamId::ZERO
                    && after < first =>
            {
                Some("history lost")
            }
            _ => None,
        }
    }
}

/// Which keys keep history, and the names of their streams and id channels.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    facilities: Arc<Facilities>,
    keys: KeySpace,
}

impl Retention {
    pub fn new(facilities: Arc<Facilities>, keys: KeySpace) -> Self {
        Retention { facilities, keys }
    }

    /// The history bounds of `key`'s facility, if it keeps history.
    pub fn of(&self, key: &str) -> Option<History> {
        let parts = self.keys.parse(key)?;
        self.facilities.of(parts.facility).history
    }

    /// Where a publication on `key` is appended, if its facility keeps history.
    pub fn target(&self, key: &str) -> Option<Target> {
        Some(Target {
            bounds: self.of(key)?,
            stream: self.keys.history(key),
            id_channel: self.keys.id_channel(key),
        })
    }

    /// The envelope's label of `key` (see [`label`]).
    pub fn label(&self, key: &str) -> String {
        match self.keys.parse(key) {
            Some(parts) => label(parts.kind, parts.group),
            None => key.to_string(),
        }
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    pub fn any(&self) -> bool {
        self.facilities.any_history()
    }
}

/// Where one key's history goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub bounds: History,
    /// The stream holding the entries.
    pub stream: String,
    /// Where each entry's id is announced, right before the publication.
    pub id_channel: String,
}

/// The label of a key in the envelope: `broadcast`, `user`, `session` (the socket has
/// at most one of each; the session key itself is never sent) or `group:<name>`.
pub fn label(audience_kind: &str, group: Option<&str>) -> String {
    match group {
        Some(name) => format!("group:{name}"),
        None => audience_kind.to_string(),
    }
}

/// The envelope's JSON texts (each one WebSocket text frame).
pub mod envelope {
    use base64::Engine;
    use serde_json::json;

    /// A message: `data` is the payload when it is UTF-8 text, `data_base64` when not;
    /// `id` is absent for publications that did not go through wsrelay (plain Redis
    /// `PUBLISH`) or keys without history; `stored` marks a late joiner's stored message.
    pub fn message(
        label: &str,
        id: Option<impl std::fmt::Display>,
        payload: &[u8],
        stored: bool,
    ) -> String {
        let mut m = serde_json::Map::new();
        m.insert("type".into(), "message".into());
        m.insert("key".into(), label.into());
        if let Some(id) = id {
            m.insert("id".into(), id.to_string().into());
        }
        match std::str::from_utf8(payload) {
            Ok(text) => m.insert("data".into(), text.into()),
            Err(_) => m.insert(
                "data_base64".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(payload)
                    .into(),
            ),
        };
        if stored {
            m.insert("stored".into(), true.into());
        }
        serde_json::Value::Object(m).to_string()
    }

    /// The socket's subscriptions are live: what follows is the catch-up of each key
    /// (stored or replayed messages), then live messages, with nothing missed between.
    pub fn subscribed(labels: &[String]) -> String {
        json!({"type": "subscribed", "keys": labels}).to_string()
    }

    /// `count` missed messages were replayed on `label`, ahead of live ones.
    pub fn resumed(label: &str, count: usize) -> String {
        json!({"type": "resumed", "key": label, "count": count}).to_string()
    }

    /// The messages missed on `label` cannot be replayed; the stored one follows.
    pub fn reset(label: &str, reason: &str) -> String {
        json!({"type": "reset", "key": label, "reason": reason}).to_string()
    }

    /// The gateway ends an event stream (`code` and `reason` as a WebSocket's close).
    pub fn close(code: u16, reason: &str) -> String {
        json!({"type": "close", "code": code, "reason": reason}).to_string()
    }

    /// Messages may have been missed on `label`, a key without history.
    pub fn gap(label: &str, reason: &str) -> String {
        json!({"type": "gap", "key": label, "reason": reason}).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> StreamId {
        s.parse().unwrap()
    }

    #[test]
    fn ids_parse_print_and_order() {
        assert_eq!(id("1700000000000-3").to_string(), "1700000000000-3");
        assert!(id("5-10") > id("5-9"));
        assert!(id("6-0") > id("5-99"));
        for bad in [
            "",
            "5",
            "5-",
            "-1",
            "a-1",
            "1-2-3",
            " 1-2",
            "99999999999999999999999-0",
        ] {
            assert_eq!(bad.parse::<StreamId>(), Err(BadId), "{bad:?}");
        }
    }

    #[test]
    fn a_resume_is_complete_only_when_nothing_after_it_was_lost() {
        let trimmed = Stream {
            max_deleted: id("10-0"),
            first: Some(id("11-0")),
            last_generated: id("20-0"),
        };
        assert_eq!(trimmed.gap_after(id("10-0")), None);
        assert_eq!(trimmed.gap_after(id("20-0")), None);
        assert_eq!(trimmed.gap_after(id("9-5")), Some("history too short"));
        assert_eq!(trimmed.gap_after(id("21-0")), Some("unknown id"));
        let recreated = Stream {
            max_deleted: StreamId::ZERO,
            first: Some(id("30-0")),
            last_generated: id("31-0"),
        };
        assert_eq!(recreated.gap_after(id("20-0")), Some("history lost"));
        assert_eq!(recreated.gap_after(id("30-0")), None);
        assert_eq!(recreated.gap_after(StreamId::ZERO), None, "from the start");
        assert_eq!(trimmed.gap_after(StreamId::ZERO), Some("history too short"));
    }

    #[test]
    fn the_envelope_carries_text_binary_and_controls() {
        let m = envelope::message("broadcast", Some(id("1-2")), b"hi", false);
        assert_eq!(
            m,
            r#"{"data":"hi","id":"1-2","key":"broadcast","type":"message"}"#
        );
        let b = envelope::message("group:staff", None::<StreamId>, &[0xff, 0], true);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["data_base64"], "/wA=");
        assert_eq!(v["stored"], true);
        assert!(v.get("id").is_none());
        assert_eq!(
            envelope::resumed("user", 3),
            r#"{"count":3,"key":"user","type":"resumed"}"#
        );
    }
}
